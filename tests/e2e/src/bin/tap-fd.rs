//! For the KVM host of the end-to-end tests: opens a tap the way Kata Containers and libvirt
//! do (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, multi-queue with more than one queue), brings
//! it up with an address, and runs a command with the queues as descriptors 3, 4, ... (for
//! `ch-remote add-net fd=[3,...]`, which passes them to the VMM with `SCM_RIGHTS`).
//!
//! `tap-fd NAME QUEUES ADDRESS/PREFIX COMMAND [ARGS...]`

use std::ffi::CString;
use std::os::fd::IntoRawFd;
use std::process::ExitCode;

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
    for (queue, file) in e2e::wire::open_tap(name, queues, address)?
        .into_iter()
        .enumerate()
    {
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
