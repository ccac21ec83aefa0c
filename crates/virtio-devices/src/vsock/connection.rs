//! One stream between a guest port and a host Unix socket: the credit each side gives the
//! other (virtio 1.2 §5.10.6.3), the guest's bytes the host has not taken yet, and what the
//! guest is owed next (a request or reply, a credit update, a shutdown, a reset).
//!
//! Host bytes go straight from the socket into the guest's receive buffer; guest bytes go
//! straight from its transmit buffer into the socket, and only what the socket does not take
//! at once is copied aside, never more than the credit given to the guest.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use vm_memory::{GuestMemory, Permissions, ReadVolatile, VolatileMemoryError, WriteVolatile};

use super::packet::{Header, Op, HEADER_LEN, HOST_CID, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND};
use crate::buffers::{self, AccessError, Buffer};

/// The receive buffer each connection offers the guest: the most guest bytes warden holds
/// for a host socket that does not read (Linux's default `buf_alloc` too).
pub(crate) const BUF_ALLOC: u32 = 256 << 10;
/// Most payload bytes in one packet, either way (Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub(crate) const MAX_PAYLOAD: u32 = 64 << 10;
/// Most pieces a packet's payload may be in (IOMMU mappings, RAM regions).
const MAX_PIECES: usize = 64;

/// A connection's address: the host side's port and the guest's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Key {
    pub(crate) local_port: u32,
    pub(crate) peer_port: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// A host client asked for a guest port: REQUEST owed or sent, RESPONSE awaited.
    HostConnecting,
    Established,
}

/// Why a guest packet ends its connection (with a reset).
#[derive(Debug, thiserror::Error)]
pub(crate) enum Broken {
    #[error("the guest sent {0} bytes beyond the credit it was given")]
    OverCredit(u32),
    #[error("the guest sent data where the stream does not take any")]
    NotWritable,
    #[error("the guest answered a request nobody made")]
    UnexpectedResponse,
    #[error("the guest sent operation {0}, which a stream does not have")]
    UnknownOp(u16),
    #[error("the payload cannot be read: {0}")]
    Access(#[from] AccessError),
    #[error("the host socket failed: {0}")]
    Host(#[from] io::Error),
}

/// Packets the connection owes the guest, sent in this order.
#[derive(Clone, Copy, Debug, Default)]
struct Owed {
    rst: bool,
    request: bool,
    response: bool,
    credit_update: bool,
    shutdown: bool,
}

/// What [`Connection::send`] put in a receive buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Sent {
    /// Nothing to send now.
    Nothing,
    /// A packet of `len` bytes (header included), of which `payload` are stream bytes.
    Packet { len: u32, payload: u32 },
    /// A reset: the connection is over.
    Reset,
}

pub(crate) struct Connection {
    stream: UnixStream,
    /// The worker's epoll token for `stream`.
    pub(crate) token: u32,
    key: Key,
    guest_cid: u64,
    state: State,
    /// Bytes the host socket has not taken yet: the guest's, after `ok_line` of warden's own
    /// (the hybrid protocol's `OK <port>` line).
    to_host: VecDeque<u8>,
    ok_line: usize,
    /// Stream bytes received from the guest, and how many of them reached the host socket.
    rx_cnt: Wrapping<u32>,
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as the guest last saw it.
    advertised_fwd_cnt: Wrapping<u32>,
    /// Stream bytes sent to the guest, and its receive buffer as it last described it.
    tx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// The host socket may have bytes (readiness is edge-triggered: set on every event,
    /// cleared when a read would block).
    readable: bool,
    /// The host socket ended its side (a read returned 0).
    host_eof: bool,
    host_write_shut: bool,
    /// `SHUTDOWN` flags the guest sent.
    guest_shutdown: u32,
    owed: Owed,
    /// In the muxer's queue of connections with something for the guest.
    pub(crate) queued: bool,
}

impl Key {
    /// The connection a guest packet belongs to: its destination is the host side's port.
    pub(crate) fn of(header: &Header) -> Self {
        Key {
            local_port: header.dst_port,
            peer_port: header.src_port,
        }
    }
}

impl Connection {
    /// A host client's connection to guest port `key.peer_port`: a REQUEST is owed. Bytes
    /// the client wrote after its `CONNECT` line may wait in the socket already, with no
    /// readiness event left to say so: it starts readable.
    pub(crate) fn from_host(stream: UnixStream, token: u32, key: Key, guest_cid: u64) -> Self {
        let mut connection = Connection::new(stream, token, key, guest_cid);
        connection.state = State::HostConnecting;
        connection.owed.request = true;
        connection.readable = true;
        connection
    }

    /// The guest's connection to host port `key.local_port`, whose socket `stream` is: a
    /// RESPONSE is owed, and the guest's REQUEST gave its credit.
    pub(crate) fn from_guest(
        stream: UnixStream,
        token: u32,
        key: Key,
        guest_cid: u64,
        request: &Header,
    ) -> Self {
        let mut connection = Connection::new(stream, token, key, guest_cid);
        connection.owed.response = true;
        connection.update_credit(request);
        connection
    }

    fn new(stream: UnixStream, token: u32, key: Key, guest_cid: u64) -> Self {
        Connection {
            stream,
            token,
            key,
            guest_cid,
            state: State::Established,
            to_host: VecDeque::new(),
            ok_line: 0,
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            advertised_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            readable: false,
            host_eof: false,
            host_write_shut: false,
            guest_shutdown: 0,
            owed: Owed::default(),
            queued: false,
        }
    }

    pub(crate) fn key(&self) -> Key {
        self.key
    }

    pub(crate) fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Every guest packet describes its receive buffer.
    pub(crate) fn update_credit(&mut self, header: &Header) {
        self.peer_buf_alloc = header.buf_alloc;
        self.peer_fwd_cnt = Wrapping(header.fwd_cnt);
    }

    /// The guest accepted a host client's connection: the client is told its port.
    pub(crate) fn accepted(&mut self) -> Result<(), Broken> {
        if self.state != State::HostConnecting || self.owed.request {
            return Err(Broken::UnexpectedResponse);
        }
        self.state = State::Established;
        let line = format!("OK {}\n", self.key.local_port);
        self.ok_line = line.len();
        self.to_host.extend(line.as_bytes());
        self.flush()
    }

    /// The guest sent `len` stream bytes, at `offset` in `buffers`: to the host socket, or
    /// aside until it takes them.
    pub(crate) fn receive<M: GuestMemory>(
        &mut self,
        mem: &M,
        buffers: &[Buffer],
        offset: u64,
        len: u32,
    ) -> Result<(), Broken> {
        if self.state != State::Established || self.guest_shutdown & SHUTDOWN_SEND != 0 {
            return Err(Broken::NotWritable);
        }
        // The guest may have seen an older `fwd_cnt` than the last sent, never a newer one.
        let allowed = BUF_ALLOC.saturating_sub((self.rx_cnt - self.advertised_fwd_cnt).0);
        if len > allowed {
            return Err(Broken::OverCredit(len - allowed));
        }
        let slices = buffers::slices_at_most(
            mem,
            buffers,
            offset,
            u64::from(len),
            Permissions::Read,
            MAX_PIECES,
        )?;
        self.rx_cnt += len;
        let mut written = 0usize;
        for slice in &slices {
            if !self.to_host.is_empty() {
                self.hold(slice);
                continue;
            }
            let mut done = 0;
            while done < slice.len() {
                let rest = slice.offset(done).expect("inside the slice");
                match io(self.stream.write_volatile(&rest)) {
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                    Err(err) => return Err(Broken::Host(err)),
                }
            }
            written += done;
            if done < slice.len() {
                self.hold(&slice.offset(done).expect("inside the slice"));
            }
        }
        self.fwd_cnt += written as u32;
        self.settle();
        Ok(())
    }

    /// Keeps guest bytes the host socket did not take, after those it is waiting for.
    fn hold<B: vm_memory::bitmap::BitmapSlice>(&mut self, slice: &vm_memory::VolatileSlice<B>) {
        let mut bytes = vec![0u8; slice.len()];
        slice.copy_to(&mut bytes[..]);
        self.to_host.extend(bytes);
    }

    /// The guest shut its side down (`flags`: it receives, sends no more).
    pub(crate) fn guest_shutdown(&mut self, flags: u32) {
        self.guest_shutdown |= flags & SHUTDOWN_BOTH;
        self.settle();
    }

    /// The guest asked how much it may send.
    pub(crate) fn credit_requested(&mut self) {
        self.owed.credit_update = true;
    }

    /// The host socket is ready (or hung up): write what waits for it, and look for bytes.
    pub(crate) fn host_ready(&mut self) -> Result<(), Broken> {
        self.readable = true;
        self.flush()
    }

    /// Writes what waits for the host socket, as much as it takes.
    fn flush(&mut self) -> Result<(), Broken> {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(0) => break,
                Ok(n) => {
                    self.to_host.drain(..n);
                    // `fwd_cnt` counts guest bytes only, as `rx_cnt` does.
                    let own = n.min(self.ok_line);
                    self.ok_line -= own;
                    self.fwd_cnt += (n - own) as u32;
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(Broken::Host(err)),
            }
        }
        self.settle();
        Ok(())
    }

    /// Applies what both sides said once the host has taken every guest byte: the guest's
    /// end of sending becomes the host socket's, and a stream both sides ended (or the
    /// guest ended both ways) is closed with a reset, which Linux waits for. A guest left
    /// with little credit is told of what the host took.
    fn settle(&mut self) {
        let guest_view = BUF_ALLOC - (self.rx_cnt - self.advertised_fwd_cnt).0.min(BUF_ALLOC);
        if self.fwd_cnt != self.advertised_fwd_cnt && guest_view < BUF_ALLOC / 2 {
            self.owed.credit_update = true;
        }
        if !self.to_host.is_empty() {
            return;
        }
        if self.guest_shutdown & SHUTDOWN_SEND != 0 && !self.host_write_shut {
            self.host_write_shut = true;
            // A socket already gone says so on the next read or write.
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        let both_done = self.host_eof && self.guest_shutdown & SHUTDOWN_SEND != 0;
        if self.guest_shutdown == SHUTDOWN_BOTH || both_done {
            self.owed.rst = true;
        }
    }

    /// Ends the connection with a reset owed to the guest (a broken rule, a failed socket).
    pub(crate) fn reset(&mut self) {
        self.owed.rst = true;
    }

    /// Stream bytes the guest can take now.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn may_read(&self) -> bool {
        self.state == State::Established
            && self.readable
            && !self.host_eof
            && self.guest_shutdown & SHUTDOWN_RCV == 0
            && self.peer_credit() > 0
    }

    /// Whether the guest is owed a packet now.
    pub(crate) fn has_packet(&self) -> bool {
        let owed = self.owed;
        owed.rst
            || owed.request
            || owed.response
            || owed.credit_update
            || owed.shutdown
            || self.may_read()
    }

    fn header(&mut self, op: Op) -> Header {
        self.advertised_fwd_cnt = self.fwd_cnt;
        self.owed.credit_update = false;
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
            ..Header::new(op)
        }
    }

    /// Puts the next packet the guest is owed in receive buffers `buffers` (device-writable,
    /// at least a header's worth): a reset first, then the request or reply, then stream
    /// bytes read from the host socket (every packet carries the credit update), then the
    /// host's end of the stream.
    pub(crate) fn send<M: GuestMemory>(
        &mut self,
        mem: &M,
        buffers: &[Buffer],
    ) -> Result<Sent, AccessError> {
        let head = buffers::slices(mem, buffers, 0, HEADER_LEN as u64, Permissions::Write)?;
        let header = if self.owed.rst {
            self.header(Op::Rst)
        } else if std::mem::take(&mut self.owed.request) {
            self.header(Op::Request)
        } else if std::mem::take(&mut self.owed.response) {
            self.header(Op::Response)
        } else if let Some(header) = self.read_host(mem, buffers)? {
            header
        } else if std::mem::take(&mut self.owed.shutdown) {
            Header {
                flags: SHUTDOWN_SEND,
                ..self.header(Op::Shutdown)
            }
        } else if self.owed.credit_update {
            self.header(Op::CreditUpdate)
        } else {
            return Ok(Sent::Nothing);
        };
        let bytes = header.encode();
        let mut done = 0;
        for slice in &head {
            slice.copy_from(&bytes[done..]);
            done += slice.len();
        }
        if header.op() == Some(Op::Rst) {
            return Ok(Sent::Reset);
        }
        Ok(Sent::Packet {
            len: HEADER_LEN as u32 + header.len,
            payload: header.len,
        })
    }

    /// Reads host bytes into the payload part of `buffers`, as many as fit and the guest has
    /// credit for: the RW header for them, or `None` with nothing read. A host socket at its
    /// end leaves the shutdown owed; one that failed, a reset.
    fn read_host<M: GuestMemory>(
        &mut self,
        mem: &M,
        buffers: &[Buffer],
    ) -> Result<Option<Header>, AccessError> {
        if !self.may_read() {
            return Ok(None);
        }
        let room = buffers::total_len(buffers).saturating_sub(HEADER_LEN as u64);
        let want = room
            .min(u64::from(self.peer_credit()))
            .min(u64::from(MAX_PAYLOAD));
        if want == 0 {
            return Ok(None);
        }
        let body = buffers::slices_at_most(
            mem,
            buffers,
            HEADER_LEN as u64,
            want,
            Permissions::Write,
            MAX_PIECES,
        )?;
        let mut read = 0usize;
        let mut failed = None;
        'slices: for slice in &body {
            let mut done = 0;
            while done < slice.len() {
                let mut rest = slice.offset(done).expect("inside the slice");
                match io(self.stream.read_volatile(&mut rest)) {
                    Ok(0) => {
                        self.host_eof = true;
                        read += done;
                        break 'slices;
                    }
                    Ok(n) => done += n,
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                        self.readable = false;
                        read += done;
                        break 'slices;
                    }
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                    Err(err) => {
                        failed = Some(err);
                        read += done;
                        break 'slices;
                    }
                }
            }
            read += done;
        }
        if self.host_eof {
            self.owed.shutdown = true;
            self.settle();
        }
        if read == 0 {
            if failed.is_some() {
                self.owed.rst = true;
            }
            return Ok(None);
        }
        if failed.is_some() {
            // Deliver what was read; the reset follows.
            self.owed.rst = true;
        }
        self.tx_cnt += read as u32;
        let mut header = self.header(Op::Rw);
        header.len = read as u32;
        Ok(Some(header))
    }
}

/// A socket's error out of vm-memory's volatile I/O, which wraps it.
fn io<T>(result: Result<T, VolatileMemoryError>) -> io::Result<T> {
    result.map_err(|err| match err {
        VolatileMemoryError::IOError(err) => err,
        other => io::Error::other(other.to_string()),
    })
}
