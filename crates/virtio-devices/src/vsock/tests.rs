//! The vsock state machine driven packet by packet (the muxer with its host sockets, no
//! thread), then the device whole behind an IOMMU.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, Permissions};
use vmm_sys_util::epoll::{Epoll, EpollEvent};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempdir::TempDir;

use super::connection::{BUF_ALLOC, MAX_PAYLOAD};
use super::muxer::{Muxer, LISTENER_TOKEN, MAX_CONNECTIONS, MAX_HANDSHAKES};
use super::packet::{Header, Op, HEADER_LEN, HOST_CID, SHUTDOWN_BOTH, SHUTDOWN_SEND};
use super::*;
use crate::counters::VsockCounters;
use crate::test_utils::{guest_memory, iommu_memory, ro, wo, Driver, FakeInterrupt};
use crate::worker::Poller;

const GUEST_CID: u64 = 3;
/// Where the rig's transmitted packets and receive buffers sit in guest memory.
const TX_HEADER: u64 = 0x1_0000;
const TX_PAYLOAD: u64 = 0x2_0000;
const RX_BUFFER: u64 = 0x4_0000;
/// What Linux posts: a header and 4 KiB.
const RX_LEN: u32 = HEADER_LEN as u32 + 4096;

/// A guest packet from `src_port` to host port `dst_port`, offering the default credit.
fn packet(op: Op, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        buf_alloc: BUF_ALLOC,
        ..Header::new(op)
    }
}

/// The muxer over real Unix sockets in a temporary directory, fed chains by hand.
struct Rig {
    mem: GuestMemoryMmap,
    epoll: Epoll,
    muxer: Muxer,
    dir: TempDir,
}

impl Rig {
    fn new() -> Rig {
        let dir = TempDir::new_with_prefix("/tmp/warden-vsock-").unwrap();
        let path = dir.as_path().join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let epoll = Epoll::new().unwrap();
        let muxer = Muxer::new(
            GUEST_CID,
            Arc::new(listener),
            path,
            Arc::new(VsockCounters::default()),
        );
        Poller::new(&epoll)
            .add(muxer.listener_fd(), LISTENER_TOKEN)
            .unwrap();
        Rig {
            mem: guest_memory(),
            epoll,
            muxer,
            dir,
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.as_path().join("v.sock")
    }

    /// Hands the muxer the host events pending now, as the worker would.
    fn pump(&mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let count = self.epoll.wait(0, &mut events).unwrap();
            if count == 0 {
                return;
            }
            for event in &events[..count] {
                let poller = Poller::new(&self.epoll);
                self.muxer.host_ready(event.data() as u32, &poller);
            }
        }
    }

    /// The guest transmits `header` (its `len` set here) with `payload`.
    fn send(&mut self, mut header: Header, payload: &[u8]) {
        header.len = payload.len() as u32;
        self.mem
            .write_slice(&header.encode(), GuestAddress(TX_HEADER))
            .unwrap();
        self.mem
            .write_slice(payload, GuestAddress(TX_PAYLOAD))
            .unwrap();
        let mut driver = Driver::new(&self.mem, 0, 16);
        let mut descs = vec![ro(TX_HEADER, HEADER_LEN as u32)];
        if !payload.is_empty() {
            descs.push(ro(TX_PAYLOAD, payload.len() as u32));
        }
        let chain = driver.chain(&descs);
        let poller = Poller::new(&self.epoll);
        self.muxer.guest_sent(&self.mem, &chain, &poller);
    }

    /// The next packet for the guest, in a 4 KiB receive buffer.
    fn receive(&mut self) -> Option<(Header, Vec<u8>)> {
        self.pump();
        let mut driver = Driver::new(&self.mem, 0x1000, 16);
        let chain = driver.chain(&[wo(RX_BUFFER, RX_LEN)]);
        let poller = Poller::new(&self.epoll);
        let len = self.muxer.next_for_guest(&self.mem, &chain, &poller)?;
        assert!(len as usize >= HEADER_LEN, "{len}");
        let mut bytes = [0u8; HEADER_LEN];
        self.mem
            .read_slice(&mut bytes, GuestAddress(RX_BUFFER))
            .unwrap();
        let header = Header::parse(&bytes);
        assert_eq!(header.len + HEADER_LEN as u32, len);
        let mut payload = vec![0u8; header.len as usize];
        self.mem
            .read_slice(&mut payload, GuestAddress(RX_BUFFER + HEADER_LEN as u64))
            .unwrap();
        Some((header, payload))
    }

    /// Every packet owed now.
    fn receive_all(&mut self) -> Vec<(Header, Vec<u8>)> {
        std::iter::from_fn(|| self.receive()).collect()
    }

    /// A host client connected to guest port `port` and accepted by the guest (from its
    /// port `port`): the client's socket and the host port it was given.
    fn host_connection(&mut self, port: u32) -> (UnixStream, u32) {
        let mut client = UnixStream::connect(self.path()).unwrap();
        client
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .unwrap();
        let (request, _) = self.receive().expect("a request for the guest");
        assert_eq!(request.op(), Some(Op::Request));
        self.send(packet(Op::Response, port, request.src_port), &[]);
        let mut line = String::new();
        let mut byte = [0u8; 1];
        while !line.ends_with('\n') {
            client.read_exact(&mut byte).unwrap();
            line.push(byte[0] as char);
        }
        assert_eq!(line, format!("OK {}\n", request.src_port));
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        (client, request.src_port)
    }
}

/// The other end closed `client`: its end of stream, or a reset where it left bytes unread.
fn assert_closed(client: &mut UnixStream) {
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut rest = Vec::new();
    match client.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(err) => assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}"),
    }
}

fn ops(packets: &[(Header, Vec<u8>)]) -> Vec<Op> {
    packets.iter().map(|(h, _)| h.op().unwrap()).collect()
}

#[test]
fn a_host_client_reaches_a_guest_port_once_the_guest_accepts() {
    let mut rig = Rig::new();
    let mut client = UnixStream::connect(rig.path()).unwrap();
    client.write_all(b"CONNECT 1234\n").unwrap();
    let (request, payload) = rig.receive().unwrap();
    assert_eq!(request.op(), Some(Op::Request));
    assert_eq!(
        (request.src_cid, request.dst_cid, request.dst_port),
        (HOST_CID, GUEST_CID, 1234)
    );
    assert!(request.src_port >= 1 << 30, "{}", request.src_port);
    assert_eq!((request.buf_alloc, payload.len()), (BUF_ALLOC, 0));
    // Nothing more until the guest answers; the client hears nothing either.
    assert!(rig.receive().is_none());

    rig.send(packet(Op::Response, 1234, request.src_port), &[]);
    let mut ok = [0u8; 14];
    client.read_exact(&mut ok).unwrap();
    assert_eq!(&ok, format!("OK {}\n", request.src_port).as_bytes());

    client.write_all(b"hello").unwrap();
    let (data, payload) = rig.receive().unwrap();
    assert_eq!(data.op(), Some(Op::Rw));
    assert_eq!((data.src_port, data.dst_port), (request.src_port, 1234));
    assert_eq!(payload, b"hello");

    rig.send(packet(Op::Rw, 1234, request.src_port), b"world");
    let mut back = [0u8; 5];
    client.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"world");
}

#[test]
fn a_guest_refusing_a_host_client_closes_it() {
    let mut rig = Rig::new();
    let mut client = UnixStream::connect(rig.path()).unwrap();
    client.write_all(b"CONNECT 9\n").unwrap();
    let (request, _) = rig.receive().unwrap();
    rig.send(packet(Op::Rst, 9, request.src_port), &[]);
    assert_eq!(rig.muxer.connections(), 0);
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{rest:?}");
}

/// A guest that posts no receive buffers and resets every connection a host client opens
/// leaves nothing queued behind: the queue holds live connections only.
#[test]
fn closed_connections_leave_the_queue_for_the_guest() {
    let mut rig = Rig::new();
    for port in 0..300 {
        let mut client = UnixStream::connect(rig.path()).unwrap();
        client
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .unwrap();
        rig.pump();
        let local = 1 << 30 | port;
        rig.send(packet(Op::Rst, port, local), &[]);
        assert_eq!(rig.muxer.connections(), 0);
        assert_eq!(rig.muxer.queued(), 0, "after {port}");
    }
}

/// Bytes a host client sends right behind its CONNECT line reach the guest once it accepts,
/// with nothing more from the client; a receive buffer with no room past the header is
/// returned unused and the bytes wait for the next one.
#[test]
fn bytes_behind_the_connect_line_and_a_buffer_too_small_for_them() {
    let mut rig = Rig::new();
    let mut client = UnixStream::connect(rig.path()).unwrap();
    client.write_all(b"CONNECT 50\nearly").unwrap();
    let (request, _) = rig.receive().unwrap();
    rig.send(packet(Op::Response, 50, request.src_port), &[]);
    let mut driver = Driver::new(&rig.mem, 0x1000, 16);
    let header_only = driver.chain(&[wo(RX_BUFFER, HEADER_LEN as u32)]);
    let poller = Poller::new(&rig.epoll);
    assert_eq!(
        rig.muxer.next_for_guest(&rig.mem, &header_only, &poller),
        Some(0)
    );
    let (data, payload) = rig.receive().unwrap();
    assert_eq!(
        (data.op(), payload.as_slice()),
        (Some(Op::Rw), &b"early"[..])
    );
}

#[test]
fn a_guest_connects_to_the_socket_named_after_the_port() {
    let mut rig = Rig::new();
    let mut name = rig.path().into_os_string();
    name.push("_5000");
    let listener = UnixListener::bind(&name).unwrap();

    rig.send(packet(Op::Request, 77, 5000), &[]);
    let (response, _) = rig.receive().unwrap();
    assert_eq!(response.op(), Some(Op::Response));
    assert_eq!((response.src_port, response.dst_port), (5000, 77));
    let (mut host, _) = listener.accept().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    rig.send(packet(Op::Rw, 77, 5000), b"from the guest");
    let mut got = [0u8; 14];
    host.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"from the guest");
    host.write_all(b"from the host").unwrap();
    let (data, payload) = rig.receive().unwrap();
    assert_eq!(
        (data.op(), payload.as_slice()),
        (Some(Op::Rw), &b"from the host"[..])
    );

    // Nobody listens on port 5001.
    rig.send(packet(Op::Request, 78, 5001), &[]);
    let (reset, _) = rig.receive().unwrap();
    assert_eq!(reset.op(), Some(Op::Rst));
    assert_eq!((reset.src_port, reset.dst_port), (5001, 78));
    assert_eq!(rig.muxer.connections(), 1);
}

#[test]
fn the_guest_is_sent_no_more_than_its_credit_and_more_once_it_reads() {
    let mut rig = Rig::new();
    let (mut client, port) = rig.host_connection(40);
    // The guest offers 8 KiB.
    let mut small = packet(Op::CreditUpdate, 40, port);
    small.buf_alloc = 8192;
    rig.send(small, &[]);
    client.write_all(&[7u8; 20000]).unwrap();
    let received: usize = rig.receive_all().iter().map(|(_, p)| p.len()).sum();
    assert_eq!(received, 8192);

    // It read 8 KiB: 8 KiB more.
    rig.send(
        Header {
            fwd_cnt: 8192,
            ..small
        },
        &[],
    );
    let received: usize = rig.receive_all().iter().map(|(_, p)| p.len()).sum();
    assert_eq!(received, 8192);
}

#[test]
fn a_guest_sending_beyond_its_credit_is_reset() {
    let mut rig = Rig::new();
    let (mut client, port) = rig.host_connection(41);
    let chunk = vec![1u8; MAX_PAYLOAD as usize];
    // The whole buffer, in packets the host takes or warden holds; the guest has not been
    // sent a credit update (it does not read), so that is all it may send.
    for _ in 0..BUF_ALLOC / MAX_PAYLOAD {
        rig.send(packet(Op::Rw, 41, port), &chunk);
    }
    rig.send(packet(Op::Rw, 41, port), &[2]);
    let packets = rig.receive_all();
    assert_eq!(ops(&packets).last(), Some(&Op::Rst), "{packets:?}");
    assert_eq!(rig.muxer.connections(), 0);
    // The host got no byte beyond the credit (what warden still held for it went with the
    // connection), then its end.
    let mut all = Vec::new();
    client.read_to_end(&mut all).unwrap();
    assert!(all.len() <= BUF_ALLOC as usize, "{}", all.len());
    assert!(all.iter().all(|&b| b == 1));
}

#[test]
fn what_the_host_takes_is_credited_back_before_the_guest_runs_dry() {
    let mut rig = Rig::new();
    let (mut client, port) = rig.host_connection(42);
    let chunk = vec![3u8; MAX_PAYLOAD as usize];
    let mut sent = 0;
    let mut fwd_seen = 0u32;
    // A guest that sends whenever it has credit, as Linux does, and a host that reads.
    for _ in 0..64 {
        let free = BUF_ALLOC - (sent - fwd_seen);
        if free < MAX_PAYLOAD {
            let updates = rig.receive_all();
            let last = updates
                .last()
                .expect("a credit update while the guest waits");
            assert_eq!(last.0.op(), Some(Op::CreditUpdate));
            fwd_seen = last.0.fwd_cnt;
            continue;
        }
        rig.send(packet(Op::Rw, 42, port), &chunk);
        sent += MAX_PAYLOAD;
        let mut drained = vec![0u8; MAX_PAYLOAD as usize];
        client.read_exact(&mut drained).unwrap();
    }
    assert!(sent >= 32 * MAX_PAYLOAD, "{sent}");
}

#[test]
fn the_host_ending_its_side_shuts_the_guests_and_both_ends_reset() {
    let mut rig = Rig::new();
    let (client, port) = rig.host_connection(43);
    client.shutdown(Shutdown::Write).unwrap();
    let packets = rig.receive_all();
    assert_eq!(ops(&packets), [Op::Shutdown]);
    assert_eq!(packets[0].0.flags, SHUTDOWN_SEND);
    // The guest still sends, then ends too: a reset closes the connection.
    rig.send(packet(Op::Rw, 43, port), b"last words");
    rig.send(
        Header {
            flags: SHUTDOWN_SEND,
            ..packet(Op::Shutdown, 43, port)
        },
        &[],
    );
    assert_eq!(ops(&rig.receive_all()), [Op::Rst]);
    assert_eq!(rig.muxer.connections(), 0);
    let mut rest = Vec::new();
    (&client).read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"last words");
}

#[test]
fn a_guest_shutting_down_both_ways_gets_a_reset_and_the_host_its_end() {
    let mut rig = Rig::new();
    let (mut client, port) = rig.host_connection(44);
    rig.send(
        Header {
            flags: SHUTDOWN_BOTH,
            ..packet(Op::Shutdown, 44, port)
        },
        &[],
    );
    assert_eq!(ops(&rig.receive_all()), [Op::Rst]);
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn a_guest_reset_closes_the_host_socket() {
    let mut rig = Rig::new();
    let (mut client, port) = rig.host_connection(45);
    rig.send(packet(Op::Rst, 45, port), &[]);
    assert_eq!(rig.muxer.connections(), 0);
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(rig.receive().is_none());
}

#[test]
fn a_host_socket_gone_resets_the_guests_connection() {
    let mut rig = Rig::new();
    let (client, port) = rig.host_connection(46);
    drop(client);
    // Its end of stream first; the guest's data then finds no one.
    assert_eq!(ops(&rig.receive_all()), [Op::Shutdown]);
    rig.send(packet(Op::Rw, 46, port), b"anyone?");
    assert_eq!(ops(&rig.receive_all()), [Op::Rst]);
    assert_eq!(rig.muxer.connections(), 0);
}

#[test]
fn packets_of_no_connection_get_resets_and_no_more_than_a_bounded_number() {
    let mut rig = Rig::new();
    rig.send(packet(Op::Rw, 1, 2), b"x");
    let packets = rig.receive_all();
    assert_eq!(ops(&packets), [Op::Rst]);
    assert_eq!((packets[0].0.src_port, packets[0].0.dst_port), (2, 1));
    // A reset is not answered, nor is a packet for another CID.
    rig.send(packet(Op::Rst, 1, 2), &[]);
    rig.send(
        Header {
            dst_cid: 9,
            ..packet(Op::Rw, 1, 2)
        },
        b"x",
    );
    assert!(rig.receive().is_none());
    for port in 0..1000 {
        rig.send(packet(Op::CreditRequest, port, 2), &[]);
    }
    assert_eq!(rig.receive_all().len(), 256);
}

#[test]
fn malformed_packets_reset_their_connection() {
    let mut rig = Rig::new();
    let (_client, port) = rig.host_connection(47);
    // A length beyond the buffers given.
    let mut header = packet(Op::Rw, 47, port);
    header.len = 100;
    rig.mem
        .write_slice(&header.encode(), GuestAddress(TX_HEADER))
        .unwrap();
    let chain = Driver::new(&rig.mem, 0, 16).chain(&[ro(TX_HEADER, HEADER_LEN as u32)]);
    rig.muxer
        .guest_sent(&rig.mem, &chain, &Poller::new(&rig.epoll));
    assert_eq!(ops(&rig.receive_all()), [Op::Rst]);
    assert_eq!(rig.muxer.connections(), 0);

    // An unknown operation, and a payload on a control packet.
    let (_client, port) = rig.host_connection(48);
    rig.send(
        Header {
            op: 99,
            ..packet(Op::Rw, 48, port)
        },
        &[],
    );
    assert_eq!(ops(&rig.receive_all()), [Op::Rst]);
    let (_client, port) = rig.host_connection(49);
    rig.send(packet(Op::CreditUpdate, 49, port), b"junk");
    assert_eq!(ops(&rig.receive_all()), [Op::Rst]);
    assert_eq!(rig.muxer.connections(), 0);
}

#[test]
fn host_clients_without_a_connect_line_are_bounded_and_bad_lines_closed() {
    let mut rig = Rig::new();
    let mut silent: Vec<UnixStream> = (0..MAX_HANDSHAKES + 3)
        .map(|_| UnixStream::connect(rig.path()).unwrap())
        .collect();
    rig.pump();
    // The three oldest made room for the newest.
    for client in &mut silent[..3] {
        assert_closed(client);
    }
    let mut junk = UnixStream::connect(rig.path()).unwrap();
    junk.write_all(b"HELLO 5\n").unwrap();
    let mut long = UnixStream::connect(rig.path()).unwrap();
    long.write_all(&[b'1'; 100]).unwrap();
    rig.pump();
    for client in [&mut junk, &mut long] {
        assert_closed(client);
    }
    assert!(rig.receive().is_none());
    assert_eq!(rig.muxer.connections(), 0);
}

#[test]
fn connections_are_bounded_and_a_full_device_refuses_both_ways() {
    let mut rig = Rig::new();
    let mut clients = Vec::new();
    for port in 0..MAX_CONNECTIONS as u32 {
        let mut client = UnixStream::connect(rig.path()).unwrap();
        client
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .unwrap();
        clients.push(client);
        rig.pump();
    }
    assert_eq!(rig.muxer.connections(), MAX_CONNECTIONS);
    let mut extra = UnixStream::connect(rig.path()).unwrap();
    rig.pump();
    let mut rest = Vec::new();
    extra.read_to_end(&mut rest).unwrap();
    let mut name = rig.path().into_os_string();
    name.push("_6000");
    let _listener = UnixListener::bind(&name).unwrap();
    rig.send(packet(Op::Request, 1, 6000), &[]);
    let packets = ops(&rig.receive_all());
    let count = |op| packets.iter().filter(|&&o| o == op).count();
    assert_eq!((count(Op::Request), count(Op::Rst)), (MAX_CONNECTIONS, 1));
}

#[test]
fn the_device_needs_a_guest_cid_and_a_free_path_and_removes_its_socket() {
    let dir = TempDir::new_with_prefix("/tmp/warden-vsock-").unwrap();
    let path = dir.as_path().join("v.sock");
    for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        let err = Vsock::new(guest_memory(), cid, &path, false).err().unwrap();
        assert!(err.to_string().contains("cid"), "{err}");
    }
    let device = Vsock::new(guest_memory(), 42, &path, false).unwrap();
    let taken = Vsock::new(guest_memory(), 43, &path, false).err().unwrap();
    assert!(taken.to_string().contains("v.sock"), "{taken}");
    let mut config = [0u8; 8];
    device.read_config(0, &mut config);
    assert_eq!(u64::from_le_bytes(config), 42);
    assert_eq!(device.device_type(), VIRTIO_ID_VSOCK);
    assert_eq!(device.queue_max_sizes().len(), 3);
    drop(device);
    assert!(!path.exists());
    // A socket another process put at the path since is not the device's to remove.
    let device = Vsock::new(guest_memory(), 43, &path, false).unwrap();
    std::fs::remove_file(&path).unwrap();
    let _other = UnixListener::bind(&path).unwrap();
    drop(device);
    assert!(path.exists());
}

/// The device whole, behind an IOMMU that maps the guest's buffers: a host client's bytes
/// reach the guest and back, every buffer touched inside a DMA transfer; a receive buffer
/// not mapped is returned unwritten.
#[test]
fn behind_the_iommu_packets_move_only_through_mapped_buffers_inside_transfers() {
    let mem = iommu_memory();
    for (iova, perm) in [
        (TX_HEADER, Permissions::Read),
        (TX_PAYLOAD, Permissions::Read),
        (RX_BUFFER, Permissions::Write),
        (RX_BUFFER + 0x1000, Permissions::Write),
    ] {
        mem.iommu().map(iova, iova, 0x1000, perm);
    }
    let dir = TempDir::new_with_prefix("/tmp/warden-vsock-").unwrap();
    let path = dir.as_path().join("v.sock");
    let mut device = Vsock::new(mem.clone(), GUEST_CID, &path, true).unwrap();
    let mut rx = Driver::new(&mem, 0, 16);
    let mut tx = Driver::new(&mem, 0x1000, 16);
    let event = Driver::new(&mem, 0x2000, 16);
    let interrupt = Arc::new(FakeInterrupt::default());
    let notifiers: Vec<EventFd> = (0..3)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    device.ack_features(device.features());
    let queues = [&rx, &tx, &event]
        .iter()
        .zip(&notifiers)
        .enumerate()
        .map(|(index, (driver, notifier))| crate::ActivatedQueue {
            index,
            queue: driver.queue(),
            notifier: notifier.try_clone().unwrap(),
        })
        .collect();
    device.activate(queues, interrupt.clone()).unwrap();

    let mut client = UnixStream::connect(&path).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client.write_all(b"CONNECT 1024\n").unwrap();
    rx.add(&[wo(RX_BUFFER, RX_LEN)]);
    notifiers[RX].write(1).unwrap();
    assert!(interrupt.wait_for(RX, 1));
    let mut bytes = [0u8; HEADER_LEN];
    mem.get_backend()
        .read_slice(&mut bytes, GuestAddress(RX_BUFFER))
        .unwrap();
    let request = Header::parse(&bytes);
    assert_eq!(request.op(), Some(Op::Request));

    let response = Header {
        len: 0,
        ..packet(Op::Response, 1024, request.src_port)
    };
    mem.get_backend()
        .write_slice(&response.encode(), GuestAddress(TX_HEADER))
        .unwrap();
    tx.add(&[ro(TX_HEADER, HEADER_LEN as u32)]);
    notifiers[TX].write(1).unwrap();
    let mut ok = vec![0u8; format!("OK {}\n", request.src_port).len()];
    client.read_exact(&mut ok).unwrap();

    // A receive buffer outside the mappings first: returned unwritten, the next one used.
    rx.add(&[wo(0x8_0000, RX_LEN)]);
    rx.add(&[wo(RX_BUFFER, RX_LEN)]);
    client.write_all(b"ping").unwrap();
    notifiers[RX].write(1).unwrap();
    assert!(crate::test_utils::eventually(|| rx.used().len() == 3));
    let used = rx.used();
    assert_eq!(used[1].1, 0, "the unmapped buffer is returned empty");
    assert_eq!(used[2].1, HEADER_LEN as u32 + 4);
    let mut payload = [0u8; 4];
    mem.get_backend()
        .read_slice(&mut payload, GuestAddress(RX_BUFFER + HEADER_LEN as u64))
        .unwrap();
    assert_eq!(&payload, b"ping");
    assert_eq!(
        mem.get_backend()
            .read_obj::<u64>(GuestAddress(0x8_0000))
            .unwrap(),
        0
    );

    let data = Header {
        len: 4,
        ..packet(Op::Rw, 1024, request.src_port)
    };
    mem.get_backend()
        .write_slice(&data.encode(), GuestAddress(TX_HEADER))
        .unwrap();
    mem.get_backend()
        .write_slice(b"pong", GuestAddress(TX_PAYLOAD))
        .unwrap();
    tx.add(&[ro(TX_HEADER, HEADER_LEN as u32), ro(TX_PAYLOAD, 4)]);
    notifiers[TX].write(1).unwrap();
    let mut back = [0u8; 4];
    client.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"pong");

    assert_eq!(mem.iommu().unguarded.load(Ordering::SeqCst), 0);
    // The worker counts a packet once the host socket took it: the client may read it first.
    let counters = device.counters().unwrap();
    assert!(crate::test_utils::eventually(|| counters
        .read()
        .contains(&("tx_bytes", 4))));
    let counters: Vec<_> = counters.read();
    assert!(counters.contains(&("rx_bytes", 4)), "{counters:?}");
    assert!(counters.contains(&("tx_bytes", 4)), "{counters:?}");
    assert!(counters.contains(&("connections", 1)), "{counters:?}");

    // A reset ends the connection: the client sees its end.
    device.reset();
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}
