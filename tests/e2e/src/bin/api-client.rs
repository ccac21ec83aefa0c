//! A minimal client of warden's API for the KVM host of the end-to-end tests, whose busybox
//! has no curl and no Unix-socket `nc`: `api-client SOCKET METHOD PATH [BODY]` prints the
//! status and the body on one line and exits 0 for a 2xx status, 1 otherwise.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (socket, method, path, body) = match args.as_slice() {
        [socket, method, path] => (socket, method, path, ""),
        [socket, method, path, body] => (socket, method, path, body.as_str()),
        _ => {
            eprintln!("usage: api-client SOCKET METHOD PATH [BODY]");
            return ExitCode::from(2);
        }
    };
    match call(socket, method, path, body) {
        Ok((status, body)) => {
            println!("{status} {body}");
            if (200..300).contains(&status) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(err) => {
            eprintln!("api-client: {err}");
            ExitCode::FAILURE
        }
    }
}

fn call(socket: &str, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    let bad = || std::io::Error::other(format!("not an HTTP reply: {reply:?}"));
    let (head, body) = reply.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    Ok((status, body.to_string()))
}
