//! The server loop: one thread, non-blocking sockets and `poll(2)`, so that no client (one
//! that sends half a request and waits, or never reads its answer) holds up another.

use std::io::{self, ErrorKind, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::files::Files;
use crate::http::{self, HttpRequest, Parsed};
use crate::routes::{self, Request};
use crate::Vmm;

/// Bounds on what a client can make the server hold and wait for.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Request line and headers; more is refused with 431.
    pub max_header_bytes: usize,
    /// A request body; more is refused with 413.
    pub max_body_bytes: usize,
    /// Time from a request's first byte to all of it, and from then to its answer being
    /// read; a client slower than that is answered 408 and dropped. A connection between
    /// requests has no deadline: Kata's runtime keeps one for the VMM's whole life.
    pub request_timeout: Duration,
    /// Clients served at once; more wait in the listen backlog, or take the place of the
    /// connection idle the longest.
    pub max_connections: usize,
    /// File descriptors passed with one request; more are closed and the request refused
    /// with 400.
    pub max_files: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 8 << 10,
            max_body_bytes: 64 << 10,
            request_timeout: Duration::from_secs(10),
            max_connections: 16,
            // A tap queue each, for the most queue pairs a net takes.
            max_files: 16,
        }
    }
}

/// How long a connection must have been idle before a new client may take its place (one
/// that just connected has sent nothing yet either).
const IDLE_GRACE: Duration = Duration::from_secs(1);

/// How long a closing connection waits for the client to hang up, discarding what it still
/// sends: closing a Unix socket with unread input resets it, and the client could lose its
/// answer.
const LINGER: Duration = Duration::from_secs(1);

/// One client, its unparsed input and its unsent output (at most one answer: the next
/// request is read only once the last answer is out).
struct Connection {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    sent: usize,
    deadline: Instant,
    /// When it last sent a byte or was answered: the connection idle the longest gives its
    /// place to a new client when all are taken.
    last_active: Instant,
    /// Close once `output` is sent.
    closing: bool,
    /// The client sent all it will.
    eof: bool,
    /// Answered and shut down for writing: waiting for the client to hang up.
    lingering: bool,
    /// The accepted request whose answer is in `output`, for [`Vmm::answered`].
    answering: Option<Request>,
    /// The request being received was told to go on (`100`): told once.
    continued: bool,
    /// Descriptors passed with the request being received.
    files: Vec<OwnedFd>,
    /// More descriptors came than a request may pass: refused once its bytes are in.
    too_many_files: bool,
}

impl Connection {
    fn new(stream: UnixStream, limits: &Limits) -> Self {
        Connection {
            stream,
            input: Vec::new(),
            output: Vec::new(),
            sent: 0,
            deadline: Instant::now() + limits.request_timeout,
            last_active: Instant::now(),
            closing: false,
            eof: false,
            lingering: false,
            answering: None,
            continued: false,
            files: Vec::new(),
            too_many_files: false,
        }
    }

    /// Between requests, with nothing received or to send: no deadline runs.
    fn idle(&self) -> bool {
        self.input.is_empty()
            && self.output.is_empty()
            && self.files.is_empty()
            && !self.closing
            && !self.lingering
            && !self.too_many_files
    }

    /// Idle long enough that a new client may take its place.
    fn evictable(&self, now: Instant) -> bool {
        self.idle() && self.last_active + IDLE_GRACE <= now
    }

    /// Reads what the client sent, up to what a largest request could take, and the
    /// descriptors that came with it; a request's first byte starts its deadline.
    fn read(&mut self, limits: &Limits) {
        let was_idle = self.idle();
        self.read_available(limits);
        if !self.idle() || self.eof {
            self.last_active = Instant::now();
            if was_idle {
                self.deadline = self.last_active + limits.request_timeout;
            }
        }
    }

    fn read_available(&mut self, limits: &Limits) {
        let most = limits.max_header_bytes + limits.max_body_bytes + 1;
        let mut chunk = [0u8; 4096];
        while self.lingering || self.input.len() < most {
            let room = chunk.len().min(most - self.input.len());
            match self.receive(&mut chunk[..room], limits) {
                Ok(0) => {
                    self.eof = true;
                    return;
                }
                Ok(_) if self.lingering => {}
                Ok(n) => self.input.extend_from_slice(&chunk[..n]),
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(err) if err.kind() == ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.eof = true;
                    self.closing = true;
                    return;
                }
            }
        }
    }

    /// One `recvmsg`: bytes into `buffer`, descriptors onto `files` (at most `max_files` for
    /// the request; past that they are closed and the request is to be refused).
    fn receive(&mut self, buffer: &mut [u8], limits: &Limits) -> io::Result<usize> {
        let mut raw = [-1; 16];
        let room = limits
            .max_files
            .saturating_sub(self.files.len())
            .min(raw.len());
        let mut iovec = [libc::iovec {
            iov_base: buffer.as_mut_ptr().cast(),
            iov_len: buffer.len(),
        }];
        // Room for one more than allowed, so that one too many is seen, not lost.
        let slots = &mut raw[..(room + 1).min(16)];
        // SAFETY: the iovec points at `buffer`, which recvmsg may fill; the descriptors it
        // reports are ours, wrapped right below.
        let received = unsafe { self.stream.recv_with_fds(&mut iovec, slots) };
        match received {
            Ok((bytes, count)) => {
                for &fd in &slots[..count] {
                    // SAFETY: a descriptor the kernel just gave this process, owned by nobody.
                    self.files.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
                if self.files.len() > limits.max_files {
                    self.files.clear();
                    self.too_many_files = true;
                }
                Ok(bytes)
            }
            // More descriptors than room: they are closed, and so is the connection once it
            // is told why (the bytes that came with them are lost).
            Err(err) if err.errno() == libc::ENOBUFS => {
                self.files.clear();
                self.too_many_files = true;
                Err(io::Error::from(ErrorKind::WouldBlock))
            }
            Err(err) => Err(io::Error::from_raw_os_error(err.errno())),
        }
    }

    /// Answers the next complete request, if any and if the last answer is out.
    fn process(&mut self, vmm: &dyn Vmm, limits: &Limits) {
        if !self.output.is_empty() || self.closing {
            return;
        }
        if self.too_many_files {
            let message = format!(
                "more than {} file descriptors passed with one request",
                limits.max_files
            );
            self.output = http::response(400, Some(&http::error_body(&message)), true, None);
            self.closing = true;
            return;
        }
        match http::parse(&self.input, limits) {
            Ok(Parsed::Partial { wants_continue }) => {
                if wants_continue && !self.continued {
                    self.continued = true;
                    self.output = http::CONTINUE.to_vec();
                }
                self.closing = self.eof;
            }
            Ok(Parsed::Complete(request)) => {
                self.continued = false;
                self.input.drain(..request.length);
                let close = !request.keep_alive || self.eof;
                let files = Files::new(std::mem::take(&mut self.files));
                (self.output, self.answering) = answer(vmm, &request, files, close);
                self.closing = close;
                self.deadline = Instant::now() + limits.request_timeout;
            }
            Err(err) => {
                log::debug!("api: refused request: {} {}", err.status, err.message);
                let body = http::error_body(&err.message);
                self.output = http::response(err.status, Some(&body), true, None);
                self.closing = true;
            }
        }
    }

    /// Answers requests, pipelined ones too, while the socket takes the answers.
    fn serve(&mut self, vmm: &dyn Vmm, limits: &Limits) {
        loop {
            let unparsed = self.input.len();
            self.process(vmm, limits);
            self.flush(vmm);
            if !self.output.is_empty() || self.closing || self.input.len() == unparsed {
                return;
            }
        }
    }

    /// Sends what the socket takes of the pending answer.
    fn flush(&mut self, vmm: &dyn Vmm) {
        while self.sent < self.output.len() {
            match self.stream.write(&self.output[self.sent..]) {
                Ok(n) => self.sent += n,
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(err) if err.kind() == ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.closing = true;
                    break;
                }
            }
        }
        self.output.clear();
        self.sent = 0;
        self.last_active = Instant::now();
        if let Some(request) = self.answering.take() {
            vmm.answered(&request);
        }
    }

    /// Whether the connection has nothing left to do; one that is done but whose client has
    /// not hung up starts lingering.
    fn finished(&mut self) -> bool {
        if !self.closing || !self.output.is_empty() {
            return false;
        }
        if self.eof {
            return true;
        }
        if !self.lingering {
            self.lingering = true;
            self.input.clear();
            let _ = self.stream.shutdown(Shutdown::Write);
            self.deadline = self.deadline.min(Instant::now() + LINGER);
        }
        false
    }

    /// Tells a client that ran out of time so, as far as its socket takes it, and gives up.
    fn time_out(&mut self) {
        let body = http::error_body("request not received (or its answer not read) in time");
        let _ = self
            .stream
            .write(&http::response(408, Some(&body), true, None));
    }
}

/// The bytes of the answer to `request` (which came with `files`), and the request if the
/// VMM accepted it.
fn answer(
    vmm: &dyn Vmm,
    request: &HttpRequest,
    files: Files,
    close: bool,
) -> (Vec<u8>, Option<Request>) {
    let mut accepted = None;
    let routed = routes::route(&request.method, &request.path, &request.body, files);
    let (status, body) = match routed {
        Ok(typed) => {
            let answer = vmm.handle(typed.clone());
            accepted = answer.is_ok().then_some(typed);
            routes::status_and_body(answer)
        }
        Err(err) => routes::status_and_body(Err(err)),
    };
    log::debug!("api: {} {} -> {status}", request.method, request.path);
    // A wrong method is told the right one, whatever the status.
    let allow = routes::allowed_method(&request.path).filter(|&method| method != request.method);
    (
        http::response(status, body.as_deref(), close, allow),
        accepted,
    )
}

/// Serves `listener` with `vmm` until the listener fails (which it returns).
pub fn serve(listener: UnixListener, vmm: &dyn Vmm, limits: &Limits) -> io::Error {
    if let Err(err) = listener.set_nonblocking(true) {
        return err;
    }
    let mut connections: Vec<Connection> = Vec::new();
    loop {
        let now = Instant::now();
        connections.retain_mut(|c| {
            let expired = !c.idle() && c.deadline <= now;
            if expired && !c.lingering {
                c.time_out();
            }
            !expired && !c.finished()
        });
        let full = connections.len() >= limits.max_connections;
        let accepting = !full || connections.iter().any(|c| c.evictable(now));
        let mut fds = Vec::with_capacity(connections.len() + 1);
        fds.push(pollfd(&listener, if accepting { libc::POLLIN } else { 0 }));
        for c in &connections {
            let events = if !c.output.is_empty() {
                libc::POLLOUT
            } else {
                libc::POLLIN
            };
            fds.push(pollfd(&c.stream, events));
        }
        // Deadlines of requests under way; when full, also the moment an idle connection may
        // give its place to a waiting client.
        let timeout = connections
            .iter()
            .filter_map(|c| match c.idle() {
                false => Some(c.deadline),
                true if full => Some(c.last_active + IDLE_GRACE),
                true => None,
            })
            .map(|at| at.saturating_duration_since(now))
            .min()
            .map_or(-1, |wait| {
                i32::try_from(wait.as_millis() + 1).unwrap_or(i32::MAX)
            });
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if ready < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == ErrorKind::Interrupted {
                continue;
            }
            return err;
        }
        for (c, fd) in connections.iter_mut().zip(&fds[1..]) {
            if fd.revents == 0 {
                continue;
            }
            if fd.revents & libc::POLLOUT != 0 {
                c.flush(vmm);
            } else if fd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                c.read(limits);
            }
            c.serve(vmm, limits);
        }
        if fds[0].revents & libc::POLLIN != 0 {
            if let Err(err) = accept_all(&listener, &mut connections, limits) {
                return err;
            }
        }
    }
}

/// Takes every waiting client, as many as there is room for, a place taken by a connection
/// idle for [`IDLE_GRACE`] counting as room: the one idle the longest is closed for it.
fn accept_all(
    listener: &UnixListener,
    connections: &mut Vec<Connection>,
    limits: &Limits,
) -> io::Result<()> {
    let now = Instant::now();
    while connections.len() < limits.max_connections || connections.iter().any(|c| c.evictable(now))
    {
        match listener.accept() {
            Ok((stream, _)) => {
                // A client that cannot be made non-blocking is dropped, not waited on.
                if stream.set_nonblocking(true).is_err() {
                    continue;
                }
                if connections.len() >= limits.max_connections {
                    let longest_idle = connections
                        .iter()
                        .enumerate()
                        .filter(|(_, c)| c.evictable(now))
                        .min_by_key(|(_, c)| c.last_active)
                        .map(|(index, _)| index);
                    if let Some(index) = longest_idle {
                        log::debug!("api: all places taken: closing the longest idle client");
                        connections.swap_remove(index);
                    }
                }
                connections.push(Connection::new(stream, limits));
            }
            Err(err) if err.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(err) if err.kind() == ErrorKind::Interrupted => {}
            // The client hung up before it was accepted, or a descriptor limit: not fatal.
            Err(err)
                if matches!(
                    err.raw_os_error(),
                    Some(libc::ECONNABORTED | libc::EMFILE | libc::ENFILE | libc::ENOBUFS)
                ) =>
            {
                log::warn!("api: cannot accept a client: {err}");
                // The client stays in the backlog: wait instead of polling it again at once.
                std::thread::sleep(Duration::from_millis(100));
                return Ok(());
            }
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

fn pollfd(fd: &impl AsRawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    }
}
