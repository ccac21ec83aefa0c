//! The host side of virtio-vsock, as Cloud Hypervisor and Firecracker have it (their "hybrid"
//! vsock), so that tools written for them work unchanged: one Unix socket at PATH.
//!
//! - A host client connects to PATH and writes `CONNECT <port>\n`; once the guest accepts,
//!   it reads `OK <host port>\n` and then the stream. A guest that refuses closes the client.
//! - A guest connecting to host port P gets a stream to the Unix socket `PATH_P`, or a
//!   reset if nothing listens there.
//!
//! Everything is bounded: connections and half-open handshakes in number, each connection's
//! held bytes by the credit it gives the guest, resets owed to the guest in number. A guest
//! or host peer that breaks the rules loses its own connection, nothing else.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::debug;
use vm_device::warn_limited;
use vm_memory::GuestMemory;

use super::connection::{Broken, Connection, Key, Sent, BUF_ALLOC, MAX_PAYLOAD};
use super::packet::{Header, Op, HEADER_LEN, HOST_CID, TYPE_STREAM};
use crate::buffers::{self, Chain};
use crate::counters::VsockCounters;
use crate::worker::Poller;

/// Most connections (and handshakes) at once: with [`BUF_ALLOC`] each, at most 64 MiB of
/// guest bytes wait for slow host sockets.
pub(crate) const MAX_CONNECTIONS: usize = 256;
/// Most host clients yet to send their `CONNECT` line; a new one pushes out the oldest.
pub(crate) const MAX_HANDSHAKES: usize = 32;
/// `CONNECT 4294967295` and some room for spaces.
const MAX_LINE: usize = 32;
/// Most resets owed to the guest for packets of no connection; more are dropped (the guest
/// only hurts itself).
const MAX_RESETS: usize = 256;
/// Host ports given to host clients' connections, from here on.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Accepts per wake-up (the listener is level-triggered: more wake it again).
const MAX_ACCEPTS: usize = 64;
/// The listener's epoll token; connections and handshakes take others.
pub(crate) const LISTENER_TOKEN: u32 = 0;

/// A host client that has not sent its `CONNECT` line yet.
struct Handshake {
    stream: UnixStream,
    token: u32,
    line: Vec<u8>,
}

pub(crate) struct Muxer {
    guest_cid: u64,
    listener: Arc<UnixListener>,
    path: PathBuf,
    connections: HashMap<Key, Connection>,
    tokens: HashMap<u32, Key>,
    handshakes: VecDeque<Handshake>,
    /// Connections with a packet for the guest, served in turn.
    ready: VecDeque<Key>,
    /// Resets owed for guest packets that belong to no connection.
    resets: VecDeque<Header>,
    next_port: u32,
    next_token: u32,
    /// The listener is in the worker's epoll set: it leaves it while the process is out of
    /// descriptors (a level-triggered listener it cannot accept from would wake it for ever)
    /// and comes back when a connection closes.
    listening: bool,
    counters: Arc<VsockCounters>,
}

impl Muxer {
    pub(crate) fn new(
        guest_cid: u64,
        listener: Arc<UnixListener>,
        path: PathBuf,
        counters: Arc<VsockCounters>,
    ) -> Self {
        Muxer {
            guest_cid,
            listener,
            path,
            connections: HashMap::new(),
            tokens: HashMap::new(),
            handshakes: VecDeque::new(),
            ready: VecDeque::new(),
            resets: VecDeque::new(),
            next_port: FIRST_LOCAL_PORT,
            next_token: LISTENER_TOKEN,
            listening: true,
            counters,
        }
    }

    pub(crate) fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Connections open now (handshakes not counted).
    #[cfg(test)]
    pub(crate) fn connections(&self) -> usize {
        self.connections.len()
    }

    /// Connections queued for the guest.
    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        self.ready.len()
    }

    /// Whether the guest is owed a packet.
    pub(crate) fn has_packets(&self) -> bool {
        !self.resets.is_empty() || !self.ready.is_empty()
    }

    /// The host side of `token` is ready: the listener, a handshake or a connection.
    pub(crate) fn host_ready(&mut self, token: u32, poller: &Poller) {
        if token == LISTENER_TOKEN {
            self.accept(poller);
        } else if let Some(&key) = self.tokens.get(&token) {
            if let Some(connection) = self.connections.get_mut(&key) {
                if let Err(why) = connection.host_ready() {
                    debug!("vsock: connection {key:?} reset: {why}");
                    connection.reset();
                }
            }
            self.mark(key);
        } else if let Some(at) = self.handshakes.iter().position(|h| h.token == token) {
            self.handshake(at, poller);
        }
    }

    fn accept(&mut self, poller: &Poller) {
        for _ in 0..MAX_ACCEPTS {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                Err(err) if matches!(err.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    warn_limited!(
                        "vsock: out of descriptors ({err}); host clients wait until a connection closes"
                    );
                    self.listening = poller.remove(self.listener_fd()).is_err();
                    return;
                }
                Err(err) => {
                    // A client gone before it was accepted, and the like: the next one.
                    debug!("vsock: cannot accept a host connection: {err}");
                    continue;
                }
            };
            if self.connections.len() + self.handshakes.len() >= MAX_CONNECTIONS {
                warn_limited!(
                    "vsock: {MAX_CONNECTIONS} connections open; a host client is refused"
                );
                continue;
            }
            if self.handshakes.len() == MAX_HANDSHAKES {
                if let Some(oldest) = self.handshakes.pop_front() {
                    debug!("vsock: a host client that never asked for a port is dropped");
                    let _ = poller.remove(oldest.stream.as_raw_fd());
                }
            }
            let token = self.new_token();
            if let Err(err) = stream
                .set_nonblocking(true)
                .and_then(|()| poller.add_stream(stream.as_raw_fd(), token))
            {
                warn_limited!("vsock: cannot watch a host connection: {err}");
                continue;
            }
            self.handshakes.push_back(Handshake {
                stream,
                token,
                line: Vec::new(),
            });
        }
    }

    /// Reads the `CONNECT <port>` line of handshake `at` a byte at a time (what follows it
    /// is the stream's, for once the guest accepted), and opens the connection once it is
    /// whole. A client that hangs up or sends anything else is closed.
    fn handshake(&mut self, at: usize, poller: &Poller) {
        let handshake = &mut self.handshakes[at];
        let port = loop {
            let mut byte = [0u8; 1];
            match handshake.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break parse_connect(&handshake.line),
                Ok(1) if handshake.line.len() < MAX_LINE => handshake.line.push(byte[0]),
                Ok(_) => break None,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break None,
            }
        };
        let Some(handshake) = self.handshakes.remove(at) else {
            return;
        };
        let Some(peer_port) = port else {
            debug!("vsock: a host client sent no valid CONNECT line; closed");
            let _ = poller.remove(handshake.stream.as_raw_fd());
            return;
        };
        let key = Key {
            local_port: self.local_port(peer_port),
            peer_port,
        };
        let connection =
            Connection::from_host(handshake.stream, handshake.token, key, self.guest_cid);
        self.open(connection);
    }

    /// A host port for a host client's connection to guest port `peer_port`.
    fn local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let port = self.next_port;
            self.next_port = self.next_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
            let key = Key {
                local_port: port,
                peer_port,
            };
            if !self.connections.contains_key(&key) {
                return port;
            }
        }
    }

    fn new_token(&mut self) -> u32 {
        loop {
            self.next_token = self.next_token.wrapping_add(1);
            let token = self.next_token;
            let taken = token == LISTENER_TOKEN
                || self.tokens.contains_key(&token)
                || self.handshakes.iter().any(|h| h.token == token);
            if !taken {
                return token;
            }
        }
    }

    fn open(&mut self, connection: Connection) {
        let key = connection.key();
        self.tokens.insert(connection.token, key);
        self.connections.insert(key, connection);
        self.counters.connections.add(1);
        self.mark(key);
    }

    fn close(&mut self, key: Key, poller: &Poller) {
        if let Some(connection) = self.connections.remove(&key) {
            self.tokens.remove(&connection.token);
            let _ = poller.remove(connection.stream().as_raw_fd());
            if connection.queued {
                self.ready.retain(|queued| *queued != key);
            }
        }
        if !self.listening {
            self.listening = poller.add(self.listener_fd(), LISTENER_TOKEN).is_ok();
        }
    }

    /// Queues `key` for the guest if it has a packet and is not queued already.
    fn mark(&mut self, key: Key) {
        if let Some(connection) = self.connections.get_mut(&key) {
            if !connection.queued && connection.has_packet() {
                connection.queued = true;
                self.ready.push_back(key);
            }
        }
    }

    /// Answers guest packet `header` with a reset (unless the queue of them is full).
    fn reply_reset(&mut self, header: &Header) {
        if self.resets.len() == MAX_RESETS {
            return;
        }
        self.resets.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: header.dst_port,
            dst_port: header.src_port,
            buf_alloc: BUF_ALLOC,
            ..Header::new(Op::Rst)
        });
    }

    /// One packet from the guest's transmit queue.
    pub(crate) fn guest_sent<M: GuestMemory>(&mut self, mem: &M, chain: &Chain, poller: &Poller) {
        if chain.buffers.iter().any(|b| b.writable) {
            warn_limited!("vsock: a transmitted packet has device-writable buffers; dropped");
            return;
        }
        let mut bytes = [0u8; HEADER_LEN];
        if let Err(err) = buffers::read_into(mem, &chain.buffers, 0, &mut bytes) {
            warn_limited!("vsock: a packet header cannot be read: {err}");
            return;
        }
        let header = Header::parse(&bytes);
        if header.src_cid != self.guest_cid || header.dst_cid != HOST_CID {
            warn_limited!(
                "vsock: a packet from cid {} to cid {} dropped (the guest is {}, the host {HOST_CID})",
                header.src_cid,
                header.dst_cid,
                self.guest_cid
            );
            return;
        }
        self.counters.tx_packets.add(1);
        let op = header.op();
        let key = Key::of(&header);
        let payload = buffers::total_len(&chain.buffers) - HEADER_LEN as u64;
        let malformed = header.kind != TYPE_STREAM
            || header.len > MAX_PAYLOAD
            || u64::from(header.len) > payload
            || (header.len != 0 && op != Some(Op::Rw));
        if malformed {
            warn_limited!("vsock: a malformed packet ({header:?}); its connection is reset");
            self.broken(key, &header);
            return;
        }
        if op == Some(Op::Request) {
            self.guest_connects(&header, poller);
            return;
        }
        if op == Some(Op::Rst) {
            self.close(key, poller);
            return;
        }
        let Some(connection) = self.connections.get_mut(&key) else {
            self.reply_reset(&header);
            return;
        };
        connection.update_credit(&header);
        let result = match op {
            Some(Op::Response) => connection.accepted(),
            Some(Op::Rw) => {
                let received =
                    connection.receive(mem, &chain.buffers, HEADER_LEN as u64, header.len);
                if received.is_ok() {
                    self.counters.tx_bytes.add(u64::from(header.len));
                }
                received
            }
            Some(Op::Shutdown) => {
                connection.guest_shutdown(header.flags);
                Ok(())
            }
            // The credit came with the header.
            Some(Op::CreditUpdate) => Ok(()),
            Some(Op::CreditRequest) => {
                connection.credit_requested();
                Ok(())
            }
            Some(Op::Request | Op::Rst) | None => Err(Broken::UnknownOp(header.op)),
        };
        if let Err(why) = result {
            debug!("vsock: connection {key:?} reset: {why}");
            connection.reset();
        }
        self.mark(key);
    }

    /// Resets the connection `header` belongs to, or answers it with a reset if none.
    fn broken(&mut self, key: Key, header: &Header) {
        match self.connections.get_mut(&key) {
            Some(connection) => {
                connection.reset();
                self.mark(key);
            }
            None if header.op() != Some(Op::Rst) => self.reply_reset(header),
            None => {}
        }
    }

    /// The guest connects to host port `header.dst_port`: to the Unix socket `PATH_<port>`.
    fn guest_connects(&mut self, header: &Header, poller: &Poller) {
        let key = Key::of(header);
        if self.connections.contains_key(&key) {
            // A second request on a live connection: the guest lost track of it.
            self.broken(key, header);
            return;
        }
        if self.connections.len() + self.handshakes.len() >= MAX_CONNECTIONS {
            warn_limited!("vsock: {MAX_CONNECTIONS} connections open; the guest's is refused");
            self.reply_reset(header);
            return;
        }
        let mut path = OsString::from(self.path.as_os_str());
        path.push(format!("_{}", header.dst_port));
        let token = self.new_token();
        let stream = connect(Path::new(&path)).and_then(|stream| {
            poller.add_stream(stream.as_raw_fd(), token)?;
            Ok(stream)
        });
        match stream {
            Ok(stream) => {
                let connection = Connection::from_guest(stream, token, key, self.guest_cid, header);
                self.open(connection);
            }
            Err(err) => {
                debug!(
                    "vsock: the guest's connection to {} refused: {err}",
                    Path::new(&path).display()
                );
                self.reply_reset(header);
            }
        }
    }

    /// Puts the next packet the guest is owed in receive chain `chain`: its length, or
    /// `None` (the chain left in the ring) with nothing to send.
    pub(crate) fn next_for_guest<M: GuestMemory>(
        &mut self,
        mem: &M,
        chain: &Chain,
        poller: &Poller,
    ) -> Option<u32> {
        if !self.has_packets() {
            return None;
        }
        if chain.buffers.iter().any(|b| !b.writable)
            || buffers::total_len(&chain.buffers) < HEADER_LEN as u64
        {
            warn_limited!("vsock: a receive buffer is read-only or too small; returned unused");
            return Some(0);
        }
        if let Some(reset) = self.resets.front() {
            if let Err(err) = buffers::write_from(mem, &chain.buffers, 0, &reset.encode()) {
                warn_limited!("vsock: a receive buffer cannot be written: {err}");
                return Some(0);
            }
            self.resets.pop_front();
            self.counters.rx_packets.add(1);
            return Some(HEADER_LEN as u32);
        }
        // Connections whose data does not fit this chain (a header's worth of it, which no
        // driver should post), queued again after it.
        let mut no_room = Vec::new();
        let sent = self.send_next(mem, chain, poller, &mut no_room);
        for key in no_room {
            self.mark(key);
        }
        match sent {
            None if self.has_packets() => {
                warn_limited!("vsock: a receive buffer has no room for data; returned unused");
                Some(0)
            }
            sent => sent,
        }
    }

    /// [`Muxer::next_for_guest`]'s turn through the connections queued.
    fn send_next<M: GuestMemory>(
        &mut self,
        mem: &M,
        chain: &Chain,
        poller: &Poller,
        no_room: &mut Vec<Key>,
    ) -> Option<u32> {
        while let Some(key) = self.ready.pop_front() {
            let Some(connection) = self.connections.get_mut(&key) else {
                continue;
            };
            connection.queued = false;
            match connection.send(mem, &chain.buffers) {
                Ok(Sent::Nothing) => {
                    if connection.has_packet() {
                        no_room.push(key);
                    }
                }
                Ok(Sent::Packet { len, payload }) => {
                    self.counters.rx_packets.add(1);
                    self.counters.rx_bytes.add(u64::from(payload));
                    self.mark(key);
                    return Some(len);
                }
                Ok(Sent::Reset) => {
                    self.counters.rx_packets.add(1);
                    self.counters.resets.add(1);
                    self.close(key, poller);
                    return Some(HEADER_LEN as u32);
                }
                Err(err) => {
                    warn_limited!("vsock: a receive buffer cannot be written: {err}");
                    self.mark(key);
                    return Some(0);
                }
            }
        }
        None
    }
}

/// The port of a `CONNECT <port>` line (without its newline). The word in any case: Kata's
/// Rust runtime sends `connect`, its Go runtime `CONNECT`.
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let (word, port) = line.split_once(' ')?;
    if !word.eq_ignore_ascii_case("connect") {
        return None;
    }
    port.trim().parse().ok()
}

/// Connects to the Unix socket at `path` without waiting: a listener whose backlog is full
/// refuses (`EAGAIN`) instead of stalling the device's thread.
fn connect(path: &Path) -> io::Result<UnixStream> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket that nothing else owns.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    // SAFETY: an all-zero `sockaddr_un` is a valid value of the plain C struct.
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    address.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= address.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the socket path is too long",
        ));
    }
    for (to, from) in address.sun_path.iter_mut().zip(bytes) {
        *to = *from as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `address` is a valid `sockaddr_un` whose first `len` bytes hold the family and
    // the NUL-terminated path; `fd` is open.
    let rc = unsafe {
        libc::connect(
            fd,
            (&address as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::parse_connect;

    #[test]
    fn only_a_connect_line_with_a_port_opens_a_connection() {
        assert_eq!(parse_connect(b"CONNECT 1024"), Some(1024));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295"), Some(u32::MAX));
        assert_eq!(parse_connect(b"connect 1024"), Some(1024));
        for bad in [
            &b"CONNECT"[..],
            b"CONNECT ",
            b"CONNECTED 1024",
            b"CONNECT -1",
            b"CONNECT 4294967296",
            b"CONNECT 1024 1",
            b"\xff\xfe",
        ] {
            assert_eq!(parse_connect(bad), None, "{bad:?}");
        }
    }
}
