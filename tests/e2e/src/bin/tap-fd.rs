//! For the KVM host of the end-to-end tests: opens a tap the way Kata Containers and libvirt
//! do (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, multi-queue with more than one queue), brings
//! it up with an address, and runs a command with the queues as descriptors 3, 4, ... (for
//! `ch-remote add-net fd=[3,...]`, which passes them to the VMM with `SCM_RIGHTS`).
//!
//! `tap-fd NAME QUEUES ADDRESS/PREFIX COMMAND [ARGS...]`

use std::ffi::CString;
use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, IntoRawFd};
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [name, queues, address, command @ ..] = args.as_slice() else {
        eprintln!("usage: tap-fd NAME QUEUES ADDRESS/PREFIX COMMAND [ARGS...]");
        return ExitCode::from(2);
    };
    if command.is_empty() {
        eprintln!("usage: tap-fd NAME QUEUES ADDRESS/PREFIX COMMAND [ARGS...]");
        return ExitCode::from(2);
    };
    let Ok(queues) = queues.parse::<usize>() else {
        eprintln!("tap-fd: {queues} is not a number of queues");
        return ExitCode::from(2);
    };
    let err = run(name, queues, address, command);
    eprintln!("tap-fd: {err}");
    ExitCode::FAILURE
}

/// Opens the tap, configures it and becomes `command`; returns only what went wrong.
fn run(name: &str, queues: usize, address: &str, command: &[String]) -> std::io::Error {
    match open_and_exec(name, queues, address, command) {
        Ok(never) => match never {},
        Err(err) => err,
    }
}

fn open_and_exec(
    name: &str,
    queues: usize,
    address: &str,
    command: &[String],
) -> std::io::Result<std::convert::Infallible> {
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    if queues > 1 {
        flags |= libc::IFF_MULTI_QUEUE;
    }
    for queue in 0..queues {
        let file = OpenOptions::new()
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
            return Err(std::io::Error::last_os_error());
        }
        let target = 3 + queue as i32;
        let fd = file.into_raw_fd();
        if fd != target {
            // SAFETY: dup2 onto a descriptor number this process does not otherwise use; the
            // copy has no close-on-exec flag, so the command inherits it.
            if unsafe { libc::dup2(fd, target) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: `fd` is ours and no longer needed.
            unsafe { libc::close(fd) };
        } else {
            // SAFETY: clears close-on-exec on a descriptor this process owns.
            unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
        }
    }
    for ip in [
        vec!["addr", "add", address, "dev", name],
        vec!["link", "set", name, "up"],
    ] {
        let status = Command::new("ip").args(&ip).status()?;
        if !status.success() {
            return Err(std::io::Error::other(format!(
                "ip {}: {status}",
                ip.join(" ")
            )));
        }
    }
    let program = CString::new(command[0].as_str()).map_err(std::io::Error::other)?;
    let argv: Vec<CString> = command
        .iter()
        .map(|a| CString::new(a.as_str()))
        .collect::<Result<_, _>>()
        .map_err(std::io::Error::other)?;
    let mut pointers: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    pointers.push(std::ptr::null());
    // SAFETY: `program` and `pointers` are NUL-terminated strings and a null-terminated
    // array of them, alive for the call; execvp only returns on failure.
    unsafe { libc::execvp(program.as_ptr(), pointers.as_ptr()) };
    Err(std::io::Error::last_os_error())
}
