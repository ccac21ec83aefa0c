//! What the vsock tools share: guest-side `AF_VSOCK` stream sockets (the guest tools), the
//! `sha256sum` both ends compare, and the check of what `vsock-peer` and its guest side moved.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};

use crate::Outcome;

/// The host's CID, as a guest reaches it.
pub const HOST_CID: u32 = 2;

/// A stream socket bound to vsock port `port` of any local CID, listening.
pub fn listen(port: u32) -> io::Result<OwnedFd> {
    let socket = stream_socket()?;
    let address = address(libc::VMADDR_CID_ANY, port);
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: `address` is a valid sockaddr_vm of `len` bytes; the socket is open.
    let bound = unsafe {
        libc::bind(
            raw(&socket),
            (&address as *const libc::sockaddr_vm).cast(),
            len,
        )
    };
    // SAFETY: listen(2) on the socket just bound.
    if bound < 0 || unsafe { libc::listen(raw(&socket), 16) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

/// The next connection to `listener`, as a stream (a Unix stream's std type only reads,
/// writes and shuts it down, which a vsock stream takes alike).
pub fn accept(listener: &OwnedFd) -> io::Result<UnixStream> {
    // SAFETY: accept(2) on a listening socket; the peer address is not asked for.
    let fd = unsafe { libc::accept(raw(listener), std::ptr::null_mut(), std::ptr::null_mut()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a connected stream socket nothing else owns.
    Ok(unsafe { UnixStream::from_raw_fd(fd) })
}

/// A stream to port `port` of `cid`.
pub fn connect(cid: u32, port: u32) -> io::Result<UnixStream> {
    let socket = stream_socket()?;
    let address = address(cid, port);
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: `address` is a valid sockaddr_vm of `len` bytes; the socket is open.
    let rc = unsafe {
        libc::connect(
            raw(&socket),
            (&address as *const libc::sockaddr_vm).cast(),
            len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(socket))
}

fn stream_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just made and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn address(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: an all-zero sockaddr_vm is a valid value of the plain C struct.
    let mut address: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    address.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    address.svm_port = port;
    address.svm_cid = cid;
    address
}

fn raw(fd: &OwnedFd) -> libc::c_int {
    std::os::fd::AsRawFd::as_raw_fd(fd)
}

/// `sha256sum` (the KVM host's coreutils, the guest's busybox), fed as bytes go by, so that
/// both ends' checksums compare as text.
pub struct Sha256Sum(Child);

impl Sha256Sum {
    pub fn start() -> io::Result<Self> {
        Command::new("sha256sum")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map(Sha256Sum)
    }

    pub fn feed(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.0.stdin.as_mut().expect("piped").write_all(bytes)
    }

    pub fn finish(mut self) -> io::Result<String> {
        drop(self.0.stdin.take());
        let mut out = String::new();
        BufReader::new(self.0.stdout.take().expect("piped")).read_line(&mut out)?;
        self.0.wait()?;
        Ok(out
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string())
    }
}

/// Reads `stream` to its end: the sha256 and the length of what came.
pub fn checksum_of(mut stream: impl Read) -> io::Result<(String, usize)> {
    let mut sum = Sha256Sum::start()?;
    let mut chunk = vec![0u8; 64 << 10];
    let mut len = 0;
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        sum.feed(&chunk[..n])?;
        len += n;
    }
    Ok((sum.finish()?, len))
}

/// Asserts that `vsock-peer` and the guest's side (socat, or `vsock-guest`) moved `mib` MiB
/// intact each way on the host's connections and on the guest's, and four streams at once.
pub fn assert_peer_moved_data(out: &Outcome, mib: usize) {
    let marker = |key: &str| out.required_marker(key).to_string();
    let whole = format!("{} {}", marker("VSOCK-GUEST-BLOB"), mib << 20);
    // Host to guest, on the host's connection.
    assert_eq!(
        marker("VSOCK-HOST-REPLY-5000"),
        marker("VSOCK-HOST-SENT-5000"),
        "{out}"
    );
    // Guest to host, on the host's connection and on the guest's.
    assert_eq!(marker("VSOCK-HOST-GOT-5001"), whole, "{out}");
    assert_eq!(marker("VSOCK-HOST-GOT-6000"), whole, "{out}");
    // Host to guest, on the guest's connection.
    assert_eq!(
        marker("VSOCK-GUEST-GOT-6001"),
        marker("VSOCK-HOST-SENT-6001"),
        "{out}"
    );
    assert_eq!(marker("VSOCK-HOST-PARALLEL"), "4/4", "{out}");
    assert_eq!(marker("VSOCK-GUEST-UPLOAD"), "done", "{out}");
    assert!(out.console.contains("VSOCK-GUEST-DONE"), "{out}");
}
