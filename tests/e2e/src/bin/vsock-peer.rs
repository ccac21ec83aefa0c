//! For the KVM host of the end-to-end tests: the host programs at the other end of a guest's
//! vsock, as tools written for Cloud Hypervisor's hybrid vsock talk to it (`CONNECT <port>`
//! on the device's Unix socket, `PATH_<port>` sockets for the guest's connections).
//!
//! `vsock-peer SOCKET MIB`, started before the VMM (it waits for SOCKET), against a guest
//! that serves port 5000 (replies with the sha256 of what it read), port 5001 (sends its
//! blob), and connects to host ports 6000 (to send its blob) and 6001 (to fetch MIB of the
//! host's data). Moves MIB MiB each way both ways, then four streams at once, checksums
//! through `sha256sum`, and connects to port 5002 to tell the guest it is done. Prints
//! `VSOCK-HOST-...=` lines; exits non-zero on a failure.
//!
//! `vsock-peer --serve SOCKET`, for the benchmark (`src/bin/bench`): host port 7000 reads each
//! connection to its end and answers `ok`; host port 7001 reads a byte count and sends that
//! many bytes. Runs until killed.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use e2e::vsock::{checksum_of, Sha256Sum};

/// How long the guest may take to listen (its boot included).
const GUEST_DEADLINE: Duration = Duration::from_secs(600);
const CHUNK: usize = 64 << 10;
/// Streams moved at once in the parallel round, and each one's share.
const PARALLEL: usize = 4;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [serve, socket] = args.as_slice() {
        if serve == "--serve" {
            if let Err(err) = serve_bench(socket) {
                eprintln!("vsock-peer: {err}");
            }
            return ExitCode::FAILURE;
        }
    }
    let [socket, mib] = args.as_slice() else {
        eprintln!("usage: vsock-peer SOCKET MIB | vsock-peer --serve SOCKET");
        return ExitCode::from(2);
    };
    let Ok(mib) = mib.parse::<usize>() else {
        eprintln!("vsock-peer: {mib} is not a number of MiB");
        return ExitCode::from(2);
    };
    match run(socket, mib << 20) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            println!("VSOCK-HOST-FAILED={err}");
            ExitCode::FAILURE
        }
    }
}

fn run(socket: &str, bytes: usize) -> io::Result<()> {
    // The guest's own connections: to 6000 it sends its blob, from 6001 it fetches ours.
    let upload = UnixListener::bind(format!("{socket}_6000"))?;
    let download = UnixListener::bind(format!("{socket}_6001"))?;
    let from_guest = thread::spawn(move || -> io::Result<()> {
        let (stream, _) = upload.accept()?;
        let (sum, len) = checksum_of(stream)?;
        println!("VSOCK-HOST-GOT-6000={sum} {len}");
        Ok(())
    });
    let to_guest = thread::spawn(move || -> io::Result<()> {
        let (mut stream, _) = download.accept()?;
        let sum = send(&mut stream, 6001, bytes)?;
        stream.shutdown(Shutdown::Write)?;
        println!("VSOCK-HOST-SENT-6001={sum}");
        Ok(())
    });

    let started = Instant::now();
    let mut first = connect(socket, 5000, GUEST_DEADLINE)?;
    println!(
        "VSOCK-HOST-CONNECTED after {} ms",
        started.elapsed().as_millis()
    );
    let started = Instant::now();
    let sent = send(&mut first, 5000, bytes)?;
    first.shutdown(Shutdown::Write)?;
    let reply = read_line(&mut first)?;
    println!("VSOCK-HOST-SENT-5000={sent}");
    println!("VSOCK-HOST-REPLY-5000={reply}");
    println!(
        "VSOCK-HOST-5000-MS={} (host to guest)",
        started.elapsed().as_millis()
    );

    let started = Instant::now();
    let blob = connect(socket, 5001, Duration::from_secs(30))?;
    let (sum, len) = checksum_of(blob)?;
    println!("VSOCK-HOST-GOT-5001={sum} {len}");
    println!(
        "VSOCK-HOST-5001-MS={} (guest to host)",
        started.elapsed().as_millis()
    );

    let streams: Vec<_> = (0..PARALLEL)
        .map(|i| {
            let socket = socket.to_string();
            thread::spawn(move || -> io::Result<bool> {
                let mut stream = connect(&socket, 5000, Duration::from_secs(30))?;
                let sent = send(&mut stream, i as u64, bytes / PARALLEL)?;
                stream.shutdown(Shutdown::Write)?;
                Ok(read_line(&mut stream)? == sent)
            })
        })
        .collect();
    let mut matched = 0;
    for stream in streams {
        if stream.join().expect("a stream thread panicked")? {
            matched += 1;
        }
    }
    println!("VSOCK-HOST-PARALLEL={matched}/{PARALLEL}");

    from_guest.join().expect("the 6000 thread panicked")?;
    to_guest.join().expect("the 6001 thread panicked")?;
    // Done: the guest may power off.
    let mut done = connect(socket, 5002, Duration::from_secs(30))?;
    done.write_all(b"done\n")?;
    println!("VSOCK-HOST-DONE");
    Ok(())
}

/// The benchmark's host ports, each connection on a thread of its own.
fn serve_bench(socket: &str) -> io::Result<()> {
    let sink = UnixListener::bind(format!("{socket}_7000"))?;
    let source = UnixListener::bind(format!("{socket}_7001"))?;
    thread::spawn(move || {
        for stream in sink.incoming().flatten() {
            thread::spawn(move || -> io::Result<()> {
                let mut stream = stream;
                io::copy(&mut stream, &mut io::sink())?;
                stream.write_all(b"ok\n")
            });
        }
    });
    for stream in source.incoming() {
        let mut stream = stream?;
        thread::spawn(move || -> io::Result<()> {
            let count: u64 = read_line(&mut stream)?
                .parse()
                .map_err(|_| io::Error::other("not a byte count"))?;
            io::copy(&mut io::repeat(0).take(count), &mut stream)?;
            stream.shutdown(Shutdown::Write)
        });
    }
    Ok(())
}

/// A stream to guest `port` through the device's socket: `CONNECT`, then `OK`. Until the
/// guest listens (or the socket exists), tries again.
fn connect(socket: &str, port: u32, patience: Duration) -> io::Result<UnixStream> {
    let deadline = Instant::now() + patience;
    loop {
        match try_connect(socket, port) {
            Ok(stream) => return Ok(stream),
            Err(err) if Instant::now() > deadline => {
                return Err(io::Error::other(format!("guest port {port}: {err}")))
            }
            Err(_) => thread::sleep(Duration::from_millis(250)),
        }
    }
}

fn try_connect(socket: &str, port: u32) -> io::Result<UnixStream> {
    let mut stream = UnixStream::connect(socket)?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let line = read_line(&mut stream)?;
    if !line.starts_with("OK ") {
        return Err(io::Error::other(format!("answered {line:?}")));
    }
    stream.set_read_timeout(None)?;
    Ok(stream)
}

/// One line, byte by byte (what follows it is the stream's).
fn read_line(stream: &mut UnixStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte)? {
            0 if line.is_empty() => return Err(io::ErrorKind::UnexpectedEof.into()),
            0 => break,
            _ if byte[0] == b'\n' => break,
            _ => line.push(byte[0]),
        }
    }
    Ok(String::from_utf8_lossy(&line).trim().to_string())
}

/// Sends `len` bytes of the stream seeded with `seed`; their sha256.
fn send(stream: &mut UnixStream, seed: u64, len: usize) -> io::Result<String> {
    let mut sum = Sha256Sum::start()?;
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut chunk = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = left.min(CHUNK);
        for word in chunk[..n].chunks_mut(8) {
            // xorshift64: cheap bytes no compressor or pattern check would flatter.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
        }
        stream.write_all(&chunk[..n])?;
        sum.feed(&chunk[..n])?;
        left -= n;
    }
    sum.finish()
}
