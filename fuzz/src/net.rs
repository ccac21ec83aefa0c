//! virtio-net on a datagram socket pair (one frame per message, like a tap): arbitrary
//! transmit chains go out, then frames waiting in the socket are delivered into arbitrary
//! receive chains, with or without MRG_RXBUF.
//!
//! Input layout: byte 0 = options (bit 0 MRG_RXBUF accepted, bit 1 EVENT_IDX accepted, bits
//! 2..7 the number of frames waiting, up to 8, bit 7 INDIRECT_DESC accepted); 2 bytes of length per frame; the receive ring,
//! the transmit ring ([`crate::ring::Ring::build`]), the indirect tables, and the rest copied
//! to the data area (the transmitted frames).
//!
//! Asserts: every transmit chain is returned with length 0, and what reached the socket is,
//! in order, the bytes of well-formed transmit chains (keeping the ring's rules) (all of them when few and small); a
//! receive chain's used length fits its writable buffers, and one with a length has no
//! device-readable buffer; the receive chains used with a length hold, in order, whole
//! frames that were waiting, `num_buffers` saying how many chains each took (1 without
//! MRG_RXBUF); nothing outside the receive chains' writable buffers and the used rings
//! changed.

use std::io::{self, ErrorKind};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_devices::fuzzing::{self, Interrupts};
use virtio_devices::NetBackend;

use crate::ring::{self, Chain, Input, Ring, Written};

/// `virtio_net_hdr` with `num_buffers`, which the device fills in.
const HDR_LEN: usize = 12;
/// The shortest and longest packet (header and frame) the device takes.
const MIN_PACKET: u64 = HDR_LEN as u64 + 14;
const MAX_PACKET: u64 = HDR_LEN as u64 + 65_536 + 14 + 4;
const MAX_FRAMES: u8 = 8;
/// Below the socket's default send buffer: up to this much the device must send everything.
const SURE_TX_BYTES: u64 = 64 << 10;

struct SocketBackend(UnixDatagram);

impl AsRawFd for SocketBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl NetBackend for SocketBackend {
    fn supported_offloads(&self) -> u32 {
        0
    }

    fn set_offloads(&self, _offloads: u32) -> io::Result<()> {
        Ok(())
    }

    fn set_queue_attached(&self, _attached: bool) -> io::Result<()> {
        Ok(())
    }
}

/// The bytes a transmit chain sends, if the device must send it: readable buffers only, in
/// guest memory, of a packet's length.
fn packet(chain: &Chain, mem: &[u8]) -> Option<Vec<u8>> {
    let mut bytes = Vec::new();
    for d in &chain.descs {
        if d.writable {
            return None;
        }
        bytes.extend_from_slice(d.bytes(mem)?);
    }
    (MIN_PACKET..=MAX_PACKET)
        .contains(&(bytes.len() as u64))
        .then_some(bytes)
}

/// Most descriptors the device takes in a chain (`net::datapath::MAX_CHAIN_DESCRIPTORS`).
const NET_MAX_DESCRIPTORS: u16 = 256;

/// One input; any byte string is valid.
pub fn run(data: &[u8]) {
    let mut input = Input(data);
    let options = input.u8();
    let mrg_rxbuf = options & 1 != 0;
    let mut features = 1 << VIRTIO_F_VERSION_1;
    if mrg_rxbuf {
        features |= 1 << VIRTIO_NET_F_MRG_RXBUF;
    }
    if options & 2 != 0 {
        features |= 1 << VIRTIO_RING_F_EVENT_IDX;
    }
    let indirect = options & 0x80 != 0;
    if indirect {
        features |= 1 << VIRTIO_RING_F_INDIRECT_DESC;
    }
    let frames: Vec<Vec<u8>> = (0..(options >> 2 & 0x1f) % (MAX_FRAMES + 1))
        .map(|n| {
            let len = input.u16();
            // Mostly MTU-sized, sometimes up to 64 KiB (an offload packet) or too short.
            let len = if len & 0x8000 != 0 {
                usize::from(len & 0x7fff) * 2
            } else {
                usize::from(len) % 1600
            };
            (0..len)
                .map(|i| (i * 7 + usize::from(n) * 61) as u8)
                .collect()
        })
        .collect();

    let mem = ring::guest_memory();
    let mut rx = Ring::build(&mem, 0, &mut input);
    let mut tx = Ring::build(&mem, 1, &mut input);
    ring::indirect_tables(&mem, &mut input);
    ring::fill_data(&mem, input.rest());
    rx.walk(&mem, indirect, Some(NET_MAX_DESCRIPTORS));
    tx.walk(&mem, indirect, Some(NET_MAX_DESCRIPTORS));
    let before = ring::snapshot(&mem);

    let (socket, peer) = UnixDatagram::pair().unwrap();
    socket.set_nonblocking(true).unwrap();
    peer.set_nonblocking(true).unwrap();
    // The kernel queues a few datagrams per socket: those it refused were never waiting.
    let waiting: Vec<&Vec<u8>> = frames.iter().filter(|f| peer.send(f).is_ok()).collect();
    let interrupts = Arc::new(Interrupts::default());
    fuzzing::net(
        &mem,
        SocketBackend(socket),
        features,
        rx.queue(),
        tx.queue(),
        Arc::clone(&interrupts),
    )
    .unwrap();
    let after = ring::snapshot(&mem);

    check_tx(&tx, &mem, &before, &peer);
    check_rx(&rx, &mem, &before, &after, &waiting, mrg_rxbuf);
    let mut written = Written::default();
    written.allow(rx.used_range());
    written.allow(tx.used_range());
    written.allow_writable(&rx.chains);
    written.check(&before, &after);
    let broken = usize::from(!rx.heads_valid()) + usize::from(!tx.heads_valid());
    assert!(interrupts.needs_reset() <= broken);
}

fn check_tx(tx: &Ring, mem: &vm_memory::GuestMemoryMmap, before: &[u8], peer: &UnixDatagram) {
    let used = tx.used(mem);
    if tx.heads_valid() {
        assert_eq!(
            used.len(),
            tx.chains.len(),
            "every transmit chain is returned"
        );
    }
    assert!(used.iter().all(|&(_, len)| len == 0));
    // The chains that went out before the queue broke (if it did).
    let expected: Vec<Vec<u8>> = tx.chains[..used.len()]
        .iter()
        .filter(|c| !c.refused)
        .filter_map(|c| packet(c, before))
        .collect();
    let mut sent = Vec::new();
    let mut buf = vec![0; MAX_PACKET as usize + 1];
    loop {
        match peer.recv(&mut buf) {
            Ok(len) => sent.push(buf[..len].to_vec()),
            Err(err) if err.kind() == ErrorKind::WouldBlock => break,
            Err(err) => panic!("recv: {err}"),
        }
    }
    let mut rest = expected.iter();
    for packet in &sent {
        assert!(
            rest.any(|e| e == packet),
            "a {}-byte packet was not a transmit chain's, in order",
            packet.len()
        );
    }
    let total: u64 = expected.iter().map(|p| p.len() as u64).sum();
    if expected.len() <= usize::from(MAX_FRAMES) && total <= SURE_TX_BYTES {
        assert_eq!(
            sent.len(),
            expected.len(),
            "every well-formed packet is sent"
        );
    }
}

fn check_rx(
    rx: &Ring,
    mem: &vm_memory::GuestMemoryMmap,
    before: &[u8],
    after: &[u8],
    waiting: &[&Vec<u8>],
    mrg_rxbuf: bool,
) {
    let used = rx.used(mem);
    assert!(used.len() <= rx.chains.len());
    let mut written = Written::default();
    written.allow_writable(&rx.chains);
    // Frame contents can be checked only where no other chain may have written over them.
    let mut exclusive = true;
    let mut pieces = Vec::new();
    for &(head, len) in &used {
        let chain = rx.chain(head).expect("a used head was made available");
        assert!(u64::from(len) <= chain.writable_len());
        if len == 0 {
            continue;
        }
        assert!(
            !chain.refused,
            "chain {head} breaks the rules and was written"
        );
        assert!(chain.descs.iter().all(|d| d.writable));
        let mut bytes = Vec::new();
        for d in &chain.descs {
            let take = (len as usize - bytes.len()).min(d.len as usize);
            let range = d.in_memory();
            assert!(range.len() >= take, "the frame was written in guest memory");
            bytes.extend_from_slice(&after[range.start..range.start + take]);
            if written.exclusive(&range) {
                let rest = range.start + take..range.end;
                assert!(
                    after[rest.clone()] == before[rest],
                    "written past the frame"
                );
            } else {
                exclusive = false;
            }
        }
        pieces.push(bytes);
    }
    if !exclusive {
        return;
    }
    let mut frames = waiting.iter();
    let mut pieces = pieces.into_iter();
    while let Some(first) = pieces.next() {
        assert!(first.len() >= HDR_LEN, "a frame starts with its header");
        let num_buffers = u16::from_le_bytes([first[10], first[11]]);
        assert!(num_buffers >= 1 && (mrg_rxbuf || num_buffers == 1));
        let mut packet = first;
        for _ in 1..num_buffers {
            packet.extend(pieces.next().expect("num_buffers chains were used"));
        }
        let delivered = frames.any(|f| {
            f.len() == packet.len() && f[..10] == packet[..10] && f[HDR_LEN..] == packet[HDR_LEN..]
        });
        assert!(
            delivered,
            "a {}-byte frame was not waiting, in order",
            packet.len()
        );
    }
}
