//! Guest tool: the guest's end of `vsock-peer` (see there) for a guest without socat (the
//! busybox initramfs of the Kata replay). Port 5000 answers each connection with the sha256
//! of what it read, port 5001 sends the guest's blob, port 5002 ends the run; meanwhile the
//! guest sends its blob to host port 6000 and reads host port 6001 to its end.
//!
//! `vsock-guest MIB`: prints `VSOCK-GUEST-BLOB=`, `VSOCK-GUEST-GOT-6001=`,
//! `VSOCK-GUEST-UPLOAD=done` and `VSOCK-GUEST-DONE` as the socat script of `tests/vsock.rs`
//! does; exits once the host said it is done.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use e2e::vsock::{self, checksum_of, Sha256Sum, HOST_CID};

/// How long the host may take to listen on its ports.
const HOST_DEADLINE: Duration = Duration::from_secs(300);

fn main() -> ExitCode {
    let Some(Ok(mib)) = std::env::args().nth(1).map(|m| m.parse::<usize>()) else {
        eprintln!("usage: vsock-guest MIB");
        return ExitCode::from(2);
    };
    match run(mib << 20) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            println!("VSOCK-GUEST-FAILED={err}");
            ExitCode::FAILURE
        }
    }
}

fn run(bytes: usize) -> io::Result<()> {
    let mut blob = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut blob)?;
    let mut sum = Sha256Sum::start()?;
    sum.feed(&blob)?;
    println!("VSOCK-GUEST-BLOB={}", sum.finish()?);
    let blob = Arc::new(blob);

    let checksums = vsock::listen(5000)?;
    thread::spawn(move || serve(checksums, reply_checksum));
    let senders = vsock::listen(5001)?;
    let sent = Arc::clone(&blob);
    thread::spawn(move || serve(senders, move |stream| send(stream, &sent)));
    let done = vsock::listen(5002)?;

    let upload = thread::spawn(move || -> io::Result<()> {
        send(connect_host(6000)?, &blob)?;
        println!("VSOCK-GUEST-UPLOAD=done");
        Ok(())
    });
    let (sum, _) = checksum_of(connect_host(6001)?)?;
    println!("VSOCK-GUEST-GOT-6001={sum}");
    upload.join().expect("the upload thread panicked")?;
    let mut line = String::new();
    BufReader::new(vsock::accept(&done)?).read_line(&mut line)?;
    println!("VSOCK-GUEST-DONE");
    Ok(())
}

/// Serves each connection to `listener` on a thread of its own.
fn serve<F>(listener: std::os::fd::OwnedFd, handle: F)
where
    F: Fn(UnixStream) -> io::Result<()> + Send + Sync + Clone + 'static,
{
    while let Ok(stream) = vsock::accept(&listener) {
        let handle = handle.clone();
        thread::spawn(move || {
            if let Err(err) = handle(stream) {
                println!("VSOCK-GUEST-FAILED={err}");
            }
        });
    }
}

fn reply_checksum(stream: UnixStream) -> io::Result<()> {
    let mut writer = stream.try_clone()?;
    let (sum, _) = checksum_of(stream)?;
    writeln!(writer, "{sum}")
}

fn send(mut stream: UnixStream, blob: &[u8]) -> io::Result<()> {
    stream.write_all(blob)?;
    stream.shutdown(Shutdown::Write)
}

/// A stream to host port `port`, once the host listens there.
fn connect_host(port: u32) -> io::Result<UnixStream> {
    let deadline = Instant::now() + HOST_DEADLINE;
    loop {
        match vsock::connect(HOST_CID, port) {
            Ok(stream) => return Ok(stream),
            Err(err) if Instant::now() > deadline => return Err(err),
            Err(_) => thread::sleep(Duration::from_millis(250)),
        }
    }
}
