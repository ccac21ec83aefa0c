//! Guest tool for the Kata replay (`tests/orchestrators.rs`): stands where Kata's agent
//! listens, on vsock port 1024, so that the runtime's side of its channel (the hybrid vsock
//! `CONNECT 1024` through the VMM's socket) has someone to reach. Each connection is greeted
//! with `KATA-AGENT-HELLO <its own CID>` and then gets back every line it sends.
//!
//! `vsock-agent [PORT]` (1024 by default); serves one connection at a time, for ever.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;

use e2e::vsock;

fn main() -> ExitCode {
    let port = match std::env::args().nth(1).map(|p| p.parse::<u32>()) {
        None => 1024,
        Some(Ok(port)) => port,
        Some(Err(_)) => {
            eprintln!("usage: vsock-agent [PORT]");
            return ExitCode::from(2);
        }
    };
    let listener = match vsock::listen(port) {
        Ok(fd) => fd,
        Err(err) => {
            eprintln!("vsock-agent: cannot listen on vsock port {port}: {err}");
            return ExitCode::FAILURE;
        }
    };
    let cid = local_cid().unwrap_or(u32::MAX);
    loop {
        if let Ok(stream) = vsock::accept(&listener) {
            let _ = serve(stream, cid);
        }
    }
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
