//! HTTP/1.1 on a Unix socket, written byte for byte as an orchestrator writes it (its header
//! lines, its split into writes, descriptors riding on a write with `SCM_RIGHTS`) and read
//! back as strictly as it reads: for the replays of Kata Containers and libvirt
//! (`src/bin/kata-replay.rs`, `src/bin/libvirt-replay.rs`).

use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// One reply.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    /// The status line as received, without its CRLF.
    pub status_line: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The body on one line, for a report.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).replace(['\n', '\r'], " ")
    }
}

/// Writes `chunks`, one `sendmsg` each, with `fds` on the first.
pub fn send(stream: &UnixStream, chunks: &[&[u8]], fds: &[RawFd]) -> io::Result<()> {
    for (index, chunk) in chunks.iter().enumerate() {
        let fds = if index == 0 { fds } else { &[] };
        send_one(stream, chunk, fds)?;
    }
    Ok(())
}

fn send_one(stream: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut control = vec![0u8; if fds.is_empty() { 0 } else { space }];
    // SAFETY: msghdr is plain data; all zeroes is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len();
        // SAFETY: the control buffer has room for one header and `fds` (CMSG_SPACE above),
        // so CMSG_FIRSTHDR is non-null and CMSG_DATA points inside it.
        unsafe {
            let header = libc::CMSG_FIRSTHDR(&msg);
            (*header).cmsg_level = libc::SOL_SOCKET;
            (*header).cmsg_type = libc::SCM_RIGHTS;
            (*header).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(header),
                fd_bytes,
            );
        }
    }
    // SAFETY: `msg` points at `iov` and `control`, alive for the call.
    let sent = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    if sent as usize != bytes.len() {
        return Err(io::Error::other(format!(
            "sendmsg took {sent} of {} bytes",
            bytes.len()
        )));
    }
    Ok(())
}

/// Reads one reply within `timeout`: its head, then as many body bytes as `Content-Length`
/// says (none without one, as Cloud Hypervisor's own client reads it).
pub fn read_reply(stream: &mut UnixStream, timeout: Duration) -> io::Result<Reply> {
    let deadline = Instant::now() + timeout;
    let mut received = Vec::new();
    let head_end = loop {
        if let Some(at) = find(&received, b"\r\n\r\n") {
            break at;
        }
        read_some(stream, &mut received, deadline)?;
    };
    let head = String::from_utf8_lossy(&received[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default().to_string();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line {status_line:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(key, value)| (key.trim().to_string(), value.trim().to_string()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(key, _)| key.eq_ignore_ascii_case("content-length"))
        .map_or(Ok(0), |(_, value)| value.parse())
        .map_err(|_| io::Error::other("bad Content-Length"))?;
    let body_start = head_end + 4;
    while received.len() < body_start + length {
        read_some(stream, &mut received, deadline)?;
    }
    Ok(Reply {
        status,
        status_line,
        headers,
        body: received[body_start..body_start + length].to_vec(),
    })
}

fn read_some(stream: &mut UnixStream, into: &mut Vec<u8>, deadline: Instant) -> io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "no reply in time"));
    }
    stream.set_read_timeout(Some(left))?;
    let mut buffer = [0u8; 4096];
    match stream.read(&mut buffer) {
        Ok(0) => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the VMM closed the connection",
        )),
        Ok(count) => {
            into.extend_from_slice(&buffer[..count]);
            Ok(())
        }
        Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
            Err(io::Error::new(io::ErrorKind::TimedOut, "no reply in time"))
        }
        Err(err) => Err(err),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// A child's stdout copied to ours line by line, each line also kept so that the replay can
/// wait for a marker the guest prints (as Kata's console watcher and libvirt's `virsh console`
/// read the guest's console).
pub mod console {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::{Arc, Condvar, Mutex};
    use std::time::{Duration, Instant};

    #[derive(Clone, Default)]
    pub struct Lines(Arc<(Mutex<Vec<String>>, Condvar)>);

    impl Lines {
        /// Copies `source` to stdout and into these lines, on a thread of its own; with
        /// `stamped`, each copied line starts with the milliseconds since then (`+12.3 `).
        pub fn follow(&self, source: impl Read + Send + 'static, stamped: Option<Instant>) {
            let lines = self.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(source);
                let mut line = Vec::new();
                while matches!(reader.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                    let mut out = std::io::stdout().lock();
                    if let Some(since) = stamped {
                        let ms = since.elapsed().as_secs_f64() * 1e3;
                        let _ = write!(out, "+{ms:.1} ");
                    }
                    let _ = out.write_all(&line);
                    let _ = out.flush();
                    drop(out);
                    let text = String::from_utf8_lossy(&line)
                        .trim_end_matches(['\n', '\r'])
                        .to_string();
                    let (kept, changed) = &*lines.0;
                    kept.lock().unwrap().push(text);
                    changed.notify_all();
                    line.clear();
                }
            });
        }

        /// The first line that starts with `prefix`, after waiting for it at most `timeout`.
        pub fn wait_for(&self, prefix: &str, timeout: Duration) -> Option<String> {
            let deadline = Instant::now() + timeout;
            let (kept, changed) = &*self.0;
            let mut lines = kept.lock().unwrap();
            loop {
                if let Some(line) = lines.iter().find(|l| l.trim_start().starts_with(prefix)) {
                    return Some(line.trim_start().to_string());
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return None;
                }
                lines = changed.wait_timeout(lines, left).unwrap().0;
            }
        }
    }
}

/// Opens a tap as Kata Containers and libvirt do (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, and
/// `IFF_MULTI_QUEUE` with more than one queue) and gives its host end `address` (`A.B.C.D/N`).
pub fn open_tap(name: &str, queues: usize, address: &str) -> io::Result<Vec<std::fs::File>> {
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    if queues > 1 {
        flags |= libc::IFF_MULTI_QUEUE;
    }
    let mut files = Vec::new();
    for _ in 0..queues {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        // SAFETY: ifreq is plain data for which all zeroes is valid.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = flags as i16;
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `ifr` is.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } < 0 {
            return Err(io::Error::last_os_error());
        }
        files.push(file);
    }
    for ip in [
        vec!["addr", "add", address, "dev", name],
        vec!["link", "set", name, "up"],
    ] {
        let status = std::process::Command::new("ip").args(&ip).status()?;
        if !status.success() {
            return Err(io::Error::other(format!("ip {}: {status}", ip.join(" "))));
        }
    }
    Ok(files)
}
