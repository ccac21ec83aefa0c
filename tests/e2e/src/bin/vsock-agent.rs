//! Guest tool for the Kata replay (`tests/orchestrators.rs`): stands where Kata's agent
//! listens, on vsock port 1024, so that the runtime's side of its channel (the hybrid vsock
//! `CONNECT 1024` through the VMM's socket) has someone to reach. Each connection is greeted
//! with `KATA-AGENT-HELLO <its own CID>` and then gets back every line it sends.
//!
//! `vsock-agent [PORT]` (1024 by default); serves one connection at a time, for ever.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::process::ExitCode;

fn main() -> ExitCode {
    let port = match std::env::args().nth(1).map(|p| p.parse::<u32>()) {
        None => 1024,
        Some(Ok(port)) => port,
        Some(Err(_)) => {
            eprintln!("usage: vsock-agent [PORT]");
            return ExitCode::from(2);
        }
    };
    let listener = match listen(port) {
        Ok(fd) => fd,
        Err(err) => {
            eprintln!("vsock-agent: cannot listen on vsock port {port}: {err}");
            return ExitCode::FAILURE;
        }
    };
    let cid = local_cid().unwrap_or(u32::MAX);
    loop {
        // SAFETY: accept(2) on the listening socket; the peer address is not asked for.
        let fd = unsafe { libc::accept(listener, std::ptr::null_mut(), std::ptr::null_mut()) };
        if fd < 0 {
            continue;
        }
        // SAFETY: `fd` is a connected stream socket nothing else owns; a Unix stream's std
        // type only reads and writes it.
        let stream = unsafe { UnixStream::from_raw_fd(fd) };
        let _ = serve(stream, cid);
    }
}

/// A stream socket bound to vsock port `port` of any local CID, listening.
fn listen(port: u32) -> std::io::Result<libc::c_int> {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: an all-zero sockaddr_vm is a valid value of the plain C struct.
    let mut address: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    address.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    address.svm_port = port;
    address.svm_cid = libc::VMADDR_CID_ANY;
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: `address` is a valid sockaddr_vm of `len` bytes; `fd` is open.
    let bound = unsafe { libc::bind(fd, (&address as *const libc::sockaddr_vm).cast(), len) };
    // SAFETY: listen(2) on the socket just bound.
    if bound < 0 || unsafe { libc::listen(fd, 16) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// This guest's CID, as `/dev/vsock` tells it.
fn local_cid() -> Option<u32> {
    const IOCTL_VM_SOCKETS_GET_LOCAL_CID: libc::c_ulong = 0x7b9;
    let file = std::fs::File::open("/dev/vsock").ok()?;
    let mut cid: u32 = 0;
    // SAFETY: the ioctl writes one u32 at the pointer given.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            IOCTL_VM_SOCKETS_GET_LOCAL_CID,
            &mut cid,
        )
    };
    (rc == 0).then_some(cid)
}

fn serve(stream: UnixStream, cid: u32) -> std::io::Result<()> {
    let mut writer = stream.try_clone()?;
    writeln!(writer, "KATA-AGENT-HELLO {cid}")?;
    for line in BufReader::new(stream).lines() {
        writeln!(writer, "{}", line?)?;
    }
    Ok(())
}
