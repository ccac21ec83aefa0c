//! The device through its worker: real split queues in guest memory on the driver side, a
//! datagram socket pair (one frame per message, like a tap) on the host side.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use virtio_bindings::virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::datapath::MAX_PACKET_LEN;
use super::*;
use crate::test_utils::{guest_memory, iommu_memory, ro, wo, Desc, Driver, FakeInterrupt};

const RX_BASE: u64 = 0;
const TX_BASE: u64 = 0x8000;
const BUF: u64 = 0x2_0000;
const QUEUE_SIZE: u16 = 256;
const HDR: usize = net_util::VNET_HDR_LEN;
const MAC: MacAddr = MacAddr::new([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
const ALL_OFFLOADS: u32 = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;

/// A backend whose frames go to and come from the other end of a socket pair.
pub(super) struct SocketBackend {
    socket: UnixDatagram,
    offloads: u32,
    /// Every `set_offloads`, in order.
    pub(super) set: Arc<Mutex<Vec<u32>>>,
    /// Every `set_queue_attached`, in order.
    pub(super) attached: Arc<Mutex<Vec<bool>>>,
}

impl SocketBackend {
    /// A backend offering `offloads`, and the host's end of it (5-second receive timeout).
    pub(super) fn pair(offloads: u32) -> (SocketBackend, UnixDatagram) {
        let (socket, peer) = UnixDatagram::pair().unwrap();
        socket.set_nonblocking(true).unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let backend = SocketBackend {
            socket,
            offloads,
            set: Arc::default(),
            attached: Arc::default(),
        };
        (backend, peer)
    }
}

impl AsRawFd for SocketBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

impl NetBackend for SocketBackend {
    fn supported_offloads(&self) -> u32 {
        self.offloads
    }

    fn set_offloads(&self, offloads: u32) -> io::Result<()> {
        self.set.lock().unwrap().push(offloads);
        Ok(())
    }

    fn set_queue_attached(&self, attached: bool) -> io::Result<()> {
        self.attached.lock().unwrap().push(attached);
        Ok(())
    }
}

/// A device on a socket backend, activated with the driver's queues; `peer` is the host end.
struct Harness<'a, M: GuestMemory> {
    dev: Net<M, SocketBackend>,
    rx: Driver<'a, M>,
    tx: Driver<'a, M>,
    rx_kick: EventFd,
    tx_kick: EventFd,
    interrupt: Arc<FakeInterrupt>,
    peer: UnixDatagram,
    offloads_set: Arc<Mutex<Vec<u32>>>,
}

fn device<M: DeviceMemory>(
    mem: M,
    offloads: u32,
    access_platform: bool,
) -> (Net<M, SocketBackend>, UnixDatagram, Arc<Mutex<Vec<u32>>>) {
    let (backend, peer) = SocketBackend::pair(offloads);
    let set = Arc::clone(&backend.set);
    let options = NetOptions {
        mac: MAC,
        queue_size: QUEUE_SIZE,
        access_platform,
    };
    (Net::new(mem, vec![backend], options), peer, set)
}

/// Activates a device over `mem` with the driver accepting every offered feature but those
/// in `refused`. EVENT_IDX is refused unless a test asks for it, so that every used batch
/// interrupts and tests can count on it.
fn start<M: DeviceMemory>(mem: &M, refused: u64) -> Harness<'_, M> {
    let (mut dev, peer, offloads_set) = device(mem.clone(), ALL_OFFLOADS, false);
    let rx = Driver::new(mem, RX_BASE, QUEUE_SIZE);
    let tx = Driver::new(mem, TX_BASE, QUEUE_SIZE);
    let rx_kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let tx_kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let interrupt = Arc::new(FakeInterrupt::default());
    dev.ack_features(dev.features() & !refused);
    dev.activate(
        vec![
            ActivatedQueue {
                index: RX_QUEUE,
                queue: rx.queue(),
                notifier: rx_kick.try_clone().unwrap(),
            },
            ActivatedQueue {
                index: TX_QUEUE,
                queue: tx.queue(),
                notifier: tx_kick.try_clone().unwrap(),
            },
        ],
        interrupt.clone(),
    )
    .unwrap();
    Harness {
        dev,
        rx,
        tx,
        rx_kick,
        tx_kick,
        interrupt,
        peer,
        offloads_set,
    }
}

const NO_EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;

impl<M: GuestMemory> Harness<'_, M> {
    fn post_rx(&mut self, descs: &[Desc]) -> u16 {
        let head = self.rx.add(descs);
        self.rx_kick.write(1).unwrap();
        head
    }

    fn send_tx(&mut self, descs: &[Desc]) -> u16 {
        let head = self.tx.add(descs);
        self.tx_kick.write(1).unwrap();
        head
    }

    /// Waits for the `count`th receive interrupt and returns the used receive entries.
    fn rx_used_after(&self, count: usize) -> Vec<(u32, u32)> {
        assert!(
            self.interrupt.wait_for(RX_QUEUE, count),
            "no receive interrupt #{count}"
        );
        self.rx.used()
    }

    fn peer_recv(&self) -> Vec<u8> {
        let mut buf = vec![0; MAX_PACKET_LEN + 16];
        let len = self.peer.recv(&mut buf).expect("the device sent a frame");
        buf.truncate(len);
        buf
    }

    /// Whether the peer gets nothing within 100 ms.
    fn peer_gets_nothing(&self) -> bool {
        self.peer
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut buf = [0u8; 64];
        let nothing = self.peer.recv(&mut buf).is_err();
        self.peer
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        nothing
    }
}

/// A frame as the tap delivers it: a header with `flags` and `gso_type`, then `len` bytes of
/// Ethernet frame numbered from `seed`. `num_buffers` is garbage: the tap leaves it alone.
fn packet(flags: u8, gso_type: u8, len: usize, seed: u8) -> Vec<u8> {
    let mut packet = vec![flags, gso_type, 0, 0, 0, 0, 0, 0, 0, 0, 0xee, 0xee];
    packet.extend((0..len).map(|i| (i as u8).wrapping_add(seed)));
    packet
}

fn read<M: GuestMemory>(mem: &M, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

#[test]
fn features_follow_the_backend_and_config_holds_mac_and_link() {
    let (dev, _, _) = device(guest_memory(), ALL_OFFLOADS, true);
    assert_eq!(dev.device_type(), VIRTIO_ID_NET);
    assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
    let features = dev.features();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_F_ACCESS_PLATFORM,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
    ] {
        assert_ne!(features & (1 << bit), 0, "bit {bit}");
    }

    let mut config = [0xffu8; 12];
    dev.read_config(0, &mut config);
    assert_eq!(&config[..6], &MAC.octets());
    assert_eq!(u16::from_le_bytes([config[6], config[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([config[8], config[9]]), 1, "one pair");
    assert_eq!(&config[10..], &[0, 0], "nothing past the end");

    // A tap that takes no offloads: the guest is offered none to receive, and no IOMMU.
    let (plain, _, _) = device(guest_memory(), 0, false);
    let features = plain.features();
    for bit in [
        VIRTIO_F_ACCESS_PLATFORM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
    ] {
        assert_eq!(features & (1 << bit), 0, "bit {bit}");
    }
    assert_ne!(features & (1 << VIRTIO_NET_F_CSUM), 0);
}

#[test]
fn the_tap_delivers_only_offloads_the_driver_accepted() {
    let mem = guest_memory();
    let refused = NO_EVENT_IDX | (1 << VIRTIO_NET_F_GUEST_TSO6);
    let mut h = start(&mem, refused);
    assert_eq!(
        *h.offloads_set.lock().unwrap(),
        [libc::TUN_F_CSUM | libc::TUN_F_TSO4]
    );
    h.dev.reset();
    assert_eq!(h.offloads_set.lock().unwrap().last(), Some(&0));
    assert_eq!(tap_offloads(0), 0);
}

#[test]
fn transmit_sends_header_and_frame_as_one_message() {
    let mem = guest_memory();
    let mut h = start(&mem, NO_EVENT_IDX);
    // A TSO frame asking for checksum completion, its header split across descriptors.
    let sent = packet(1, 1, 3000, 7);
    mem.write_slice(&sent, GuestAddress(BUF)).unwrap();
    let head = h.send_tx(&[ro(BUF, 6), ro(BUF + 6, 1000), ro(BUF + 1006, 2006)]);
    assert_eq!(h.peer_recv(), sent);
    assert!(h.interrupt.wait_for(TX_QUEUE, 1));
    assert_eq!(h.tx.used(), [(u32::from(head), 0)]);
}

#[test]
fn receive_merges_buffers_and_counts_them_in_the_header() {
    let mem = guest_memory();
    let mut h = start(&mem, NO_EVENT_IDX);
    let heads: Vec<u16> = (0..4)
        .map(|i| h.post_rx(&[wo(BUF + i * 0x1000, 1000)]))
        .collect();
    let sent = packet(2, 0, 2500, 3);
    h.peer.send(&sent).unwrap();

    let used = h.rx_used_after(1);
    let expected: Vec<(u32, u32)> = heads[..3]
        .iter()
        .zip([1000, 1000, 512])
        .map(|(&head, len)| (u32::from(head), len))
        .collect();
    assert_eq!(used, expected);
    let mut received = Vec::new();
    for (i, len) in [1000, 1000, 512].into_iter().enumerate() {
        received.extend(read(&mem, BUF + i as u64 * 0x1000, len));
    }
    // num_buffers (le16 at 10) says three chains; everything else is the tap's.
    assert_eq!(&received[10..12], &[3, 0]);
    assert_eq!(&received[..10], &sent[..10]);
    assert_eq!(&received[12..], &sent[12..]);

    // The fourth chain serves the next small frame alone.
    h.peer.send(&packet(0, 0, 60, 9)).unwrap();
    let used = h.rx_used_after(2);
    assert_eq!(used[3], (u32::from(heads[3]), (HDR + 60) as u32));
    assert_eq!(&read(&mem, BUF + 0x3000 + 10, 2), &[1, 0]);
}

#[test]
fn without_mrg_rxbuf_a_frame_takes_one_chain_or_is_dropped() {
    let mem = guest_memory();
    let mut h = start(&mem, NO_EVENT_IDX | (1 << VIRTIO_NET_F_MRG_RXBUF));
    // A chain of header + 1514-byte buffer, then a second one.
    let small = h.post_rx(&[wo(BUF, HDR as u32), wo(BUF + 0x100, 1514)]);
    let next = h.post_rx(&[wo(BUF + 0x1000, 2048)]);

    // Too big for the first chain: dropped, its chain returned unused.
    h.peer.send(&packet(0, 0, 1600, 1)).unwrap();
    let sent = packet(0, 0, 1000, 5);
    h.peer.send(&sent).unwrap();
    let used = h.rx_used_after(1);
    let used = if used.len() < 2 {
        h.rx_used_after(2)
    } else {
        used
    };
    assert_eq!(
        used,
        [
            (u32::from(small), 0),
            (u32::from(next), (HDR + 1000) as u32)
        ]
    );
    let received = read(&mem, BUF + 0x1000, HDR + 1000);
    assert_eq!(&received[10..12], &[1, 0], "num_buffers is 1");
    assert_eq!(&received[12..], &sent[12..]);
}

#[test]
fn frames_wait_for_receive_buffers() {
    let mem = guest_memory();
    // With EVENT_IDX: the device must ask to be notified of the next buffer.
    let mut h = start(&mem, 0);
    let first = packet(0, 0, 100, 1);
    let second = packet(0, 0, 200, 2);
    h.peer.send(&first).unwrap();
    h.peer.send(&second).unwrap();
    thread::sleep(Duration::from_millis(100));
    assert!(h.rx.used().is_empty());
    assert_eq!(h.rx.avail_event(), h.rx.avail_idx());

    // A buffer too small for the waiting frame: taken and held, and the device asks for more.
    let part = h.rx.add(&[wo(BUF, 50)]);
    h.rx_kick.write(1).unwrap();
    thread::sleep(Duration::from_millis(100));
    assert!(h.rx.used().is_empty());
    assert_eq!(h.rx.avail_event(), 1);

    let rest = h.post_rx(&[wo(BUF + 0x1000, 4096)]);
    assert!(h.interrupt.wait_for(RX_QUEUE, 1));
    // The first frame spans both chains; the second waits for a chain of its own.
    assert_eq!(
        h.rx.used(),
        [
            (u32::from(part), 50),
            (u32::from(rest), (HDR + 100 - 50) as u32)
        ]
    );
    let mut received = read(&mem, BUF, 50);
    received.extend(read(&mem, BUF + 0x1000, HDR + 100 - 50));
    assert_eq!(&received[10..12], &[2, 0]);
    assert_eq!(&received[12..], &first[12..]);

    h.rx.set_used_event(2);
    let last = h.post_rx(&[wo(BUF + 0x2000, 4096)]);
    assert!(h.interrupt.wait_for(RX_QUEUE, 2));
    assert_eq!(h.rx.used()[2], (u32::from(last), (HDR + 200) as u32));
    assert_eq!(&read(&mem, BUF + 0x2000 + 12, 200), &second[12..]);
}

#[test]
fn hostile_transmit_chains_are_dropped() {
    let mem = guest_memory();
    let mut h = start(&mem, NO_EVENT_IDX);
    mem.write_slice(&packet(0, 0, 100, 0), GuestAddress(BUF))
        .unwrap();
    let outside = 0x20_0000; // guest RAM ends at 1 MiB
    let cases: [Vec<Desc>; 5] = [
        // A buffer the device would write.
        vec![ro(BUF, 50), wo(BUF + 50, 62)],
        // Shorter than a header and an Ethernet header.
        vec![ro(BUF, 20)],
        // Outside guest RAM, or straddling its end.
        vec![ro(BUF, 12), ro(outside, 100)],
        vec![ro(0x10_0000 - 50, 100)],
        // An address range that wraps around.
        vec![ro(BUF, 12), ro(u64::MAX - 10, 100)],
    ];
    for (i, descs) in cases.iter().enumerate() {
        let head = h.send_tx(descs);
        assert!(h.interrupt.wait_for(TX_QUEUE, i + 1), "{descs:?}");
        assert_eq!(h.tx.used()[i], (u32::from(head), 0), "{descs:?}");
        assert!(h.peer_gets_nothing(), "{descs:?}");
    }
    // Longer than any frame.
    let huge = h.send_tx(&[ro(BUF, 0x8_0000), ro(BUF, 0x8_0000)]);
    assert!(h.interrupt.wait_for(TX_QUEUE, cases.len() + 1));
    assert_eq!(h.tx.used().last(), Some(&(u32::from(huge), 0)));
    assert!(h.peer_gets_nothing());

    // The worker is still serving.
    h.send_tx(&[ro(BUF, 112)]);
    assert_eq!(h.peer_recv(), packet(0, 0, 100, 0));
}

#[test]
fn hostile_receive_chains_cost_their_frame_and_write_nothing_outside() {
    let mem = guest_memory();
    let mut h = start(&mem, NO_EVENT_IDX);
    mem.write_slice(&[0xaa; 256], GuestAddress(0x10_0000 - 256))
        .unwrap();
    let cases: [Vec<Desc>; 4] = [
        // A buffer the device would read.
        vec![ro(BUF, 2048)],
        // Outside guest RAM.
        vec![wo(0x20_0000, 2048)],
        // Straddling the end of RAM: none of it may be written.
        vec![wo(0x10_0000 - 256, 2048)],
        // Wrapping around the address space.
        vec![wo(u64::MAX - 100, 2048)],
    ];
    for (i, descs) in cases.iter().enumerate() {
        let head = h.post_rx(descs);
        h.peer.send(&packet(0, 0, 1000, i as u8)).unwrap();
        let used = h.rx_used_after(i + 1);
        assert_eq!(used[i], (u32::from(head), 0), "{descs:?}");
    }
    assert_eq!(read(&mem, 0x10_0000 - 256, 256), vec![0xaa; 256]);

    // A merged frame whose second chain is bad loses both chains.
    let good = h.post_rx(&[wo(BUF, 500)]);
    let bad = h.rx.add(&[wo(0x20_0000, 4096)]);
    h.peer.send(&packet(0, 0, 1000, 0)).unwrap();
    let used = h.rx_used_after(cases.len() + 1);
    assert_eq!(
        &used[cases.len()..],
        [(u32::from(good), 0), (u32::from(bad), 0)]
    );

    // A runt from the host is dropped without taking a buffer; the next frame is delivered.
    h.peer.send(&[0; 20]).unwrap();
    let head = h.post_rx(&[wo(BUF, 2048)]);
    let sent = packet(0, 0, 64, 1);
    h.peer.send(&sent).unwrap();
    let used = h.rx_used_after(cases.len() + 2);
    assert_eq!(used.last(), Some(&(u32::from(head), (HDR + 64) as u32)));
    assert_eq!(&read(&mem, BUF + 12, 64), &sent[12..]);
}

/// With MRG_RXBUF a chain too small for a header (zero-length writable buffers, which a
/// driver could post again and again) is not held: it costs the frame waiting for it and is
/// returned at once, and the next chain serves the next frame.
#[test]
fn receive_chains_smaller_than_a_header_are_not_held() {
    let mem = guest_memory();
    let mut h = start(&mem, NO_EVENT_IDX);
    let empty = h.post_rx(&[wo(BUF, 0), wo(BUF + 0x100, 0)]);
    let short = h.rx.add(&[wo(BUF + 0x200, HDR as u32 - 1)]);
    let good = h.rx.add(&[wo(BUF + 0x1000, 2048)]);
    h.peer.send(&packet(0, 0, 100, 1)).unwrap();
    assert_eq!(h.rx_used_after(1), [(u32::from(empty), 0)]);
    h.peer.send(&packet(0, 0, 100, 2)).unwrap();
    assert_eq!(h.rx_used_after(2)[1], (u32::from(short), 0));
    let sent = packet(0, 0, 100, 3);
    h.peer.send(&sent).unwrap();
    assert_eq!(h.rx_used_after(3)[2], (u32::from(good), (HDR + 100) as u32));
    assert_eq!(&read(&mem, BUF + 0x1000 + 12, 100), &sent[12..]);
}

/// A frame that a whole ring of chains cannot hold is dropped and the chains returned, rather
/// than held while the device waits for buffers the driver has no descriptors left for.
#[test]
fn a_frame_larger_than_a_ring_of_chains_is_dropped() {
    let mem = guest_memory();
    let mut h = start(&mem, NO_EVENT_IDX);
    let heads: Vec<u16> = (0..u64::from(QUEUE_SIZE))
        .map(|i| h.rx.add(&[wo(BUF + i * 16, HDR as u32)]))
        .collect();
    h.rx_kick.write(1).unwrap();
    h.peer
        .send(&packet(0, 0, QUEUE_SIZE as usize * HDR, 0))
        .unwrap();
    let used = h.rx_used_after(1);
    assert_eq!(
        used,
        heads.iter().map(|&h| (u32::from(h), 0)).collect::<Vec<_>>()
    );
}

/// Frames are read straight into the chains held for them; what a stream of small frames
/// taught the worker to hold is not enough for a large one, whose rest goes through the
/// bounce buffer into the chains the driver posts next, `num_buffers` counting them all.
#[test]
fn a_frame_larger_than_the_chains_held_spills_into_the_next_ones() {
    let mem = guest_memory();
    let mut h = start(&mem, NO_EVENT_IDX);
    for i in 0..50u64 {
        h.rx.add(&[wo(BUF + i * 0x800, 1500)]);
    }
    h.rx_kick.write(1).unwrap();
    for i in 0..50 {
        let sent = packet(0, 0, 100, i as u8);
        h.peer.send(&sent).unwrap();
        let used = h.rx_used_after(i + 1);
        assert_eq!(used[i].1, (HDR + 100) as u32);
        assert_eq!(&read(&mem, BUF + i as u64 * 0x800 + 12, 100), &sent[12..]);
    }
    // One chain is now enough for what the worker expects: it holds that one only.
    let big = 0x4_0000;
    let first = h.post_rx(&[wo(big, 1500)]);
    thread::sleep(Duration::from_millis(100));
    let second = h.rx.add(&[wo(big + 0x1000, 1500)]);
    let third = h.rx.add(&[wo(big + 0x2000, 1500)]);
    let sent = packet(3, 4, 3000, 7);
    h.peer.send(&sent).unwrap();
    let used = h.rx_used_after(51);
    assert_eq!(
        &used[50..],
        [
            (u32::from(first), 1500),
            (u32::from(second), 1500),
            (u32::from(third), 12)
        ]
    );
    let mut received = read(&mem, big, 1500);
    received.extend(read(&mem, big + 0x1000, 1500));
    received.extend(read(&mem, big + 0x2000, 12));
    assert_eq!(&received[10..12], &[3, 0], "num_buffers");
    assert_eq!(&received[..10], &sent[..10]);
    assert_eq!(&received[12..], &sent[12..]);
    // The small frames went straight into held chains; of the large one, all but the first
    // chain's 1500 bytes were copied.
    assert_eq!(
        counters(&h.dev)["rx_bounced_bytes"],
        (HDR + 3000 - 1500) as u64
    );
}

/// Without MRG_RXBUF the driver posts chains for the longest frame (Linux's big packets,
/// 17 pages and more): one longer than any frame still takes the longest whole.
#[test]
fn the_longest_frame_fits_one_chain_longer_than_it() {
    let mem = guest_memory();
    let mut h = start(&mem, NO_EVENT_IDX | (1 << VIRTIO_NET_F_MRG_RXBUF));
    let head = h.post_rx(&[wo(BUF, HDR as u32), wo(BUF + 0x100, 70_000)]);
    thread::sleep(Duration::from_millis(100));
    let sent = packet(0, 0, MAX_PACKET_LEN - HDR, 5);
    h.peer.send(&sent).unwrap();
    assert_eq!(
        h.rx_used_after(1),
        [(u32::from(head), MAX_PACKET_LEN as u32)]
    );
    let mut received = read(&mem, BUF, HDR);
    received.extend(read(&mem, BUF + 0x100, MAX_PACKET_LEN - HDR));
    assert_eq!(&received[10..12], &[1, 0]);
    assert_eq!(&received[12..], &sent[12..]);
}

/// A chain held before its frame came is translated through the IOMMU for the read that
/// fills it.
#[test]
fn protected_frames_are_read_straight_into_translated_chains() {
    let mem = iommu_memory();
    let phys: &GuestMemoryMmap = mem.get_backend();
    mem.iommu()
        .map(0x1000_0000, BUF, 0x1_0000, Permissions::ReadWrite);
    let mut h = start(&mem, NO_EVENT_IDX);
    let head = h.post_rx(&[wo(0x1000_0000, 1000), wo(0x1000_2000, 1000)]);
    thread::sleep(Duration::from_millis(100));
    let sent = packet(0, 0, 1800, 2);
    h.peer.send(&sent).unwrap();
    assert_eq!(h.rx_used_after(1), [(u32::from(head), (HDR + 1800) as u32)]);
    let mut received = read(phys, BUF, 1000);
    received.extend(read(phys, BUF + 0x2000, HDR + 800));
    assert_eq!(&received[10..12], &[1, 0]);
    assert_eq!(&received[12..], &sent[12..]);
    assert_eq!(counters(&h.dev)["rx_bounced_bytes"], 0);
}

#[test]
fn protected_device_translates_every_buffer() {
    let mem = iommu_memory();
    let phys: &GuestMemoryMmap = mem.get_backend();
    // The guest mapped its packet buffers at IOVA 0x1000_0000, backed by RAM at BUF.
    mem.iommu()
        .map(0x1000_0000, BUF, 0x1_0000, Permissions::ReadWrite);
    let mut h = start(&mem, NO_EVENT_IDX);

    let sent = packet(0, 0, 1500, 4);
    h.peer.send(&sent).unwrap();
    let head = h.post_rx(&[wo(0x1000_0000, 4096)]);
    assert_eq!(h.rx_used_after(1), [(u32::from(head), (HDR + 1500) as u32)]);
    assert_eq!(&read(phys, BUF + 12, 1500), &sent[12..]);

    let frame = packet(0, 0, 900, 8);
    phys.write_slice(&frame, GuestAddress(BUF + 0x2000))
        .unwrap();
    h.send_tx(&[ro(0x1000_2000, (HDR + 900) as u32)]);
    assert_eq!(h.peer_recv(), frame);

    // Physical addresses are not IOVAs: unmapped, so refused, and RAM stays untouched.
    phys.write_slice(&[0xbb; 64], GuestAddress(BUF + 0x4000))
        .unwrap();
    let head = h.post_rx(&[wo(BUF + 0x4000, 4096)]);
    h.peer.send(&packet(0, 0, 64, 0)).unwrap();
    assert_eq!(h.rx_used_after(2)[1], (u32::from(head), 0));
    assert_eq!(read(phys, BUF + 0x4000, 64), vec![0xbb; 64]);
    h.send_tx(&[ro(BUF + 0x2000, (HDR + 900) as u32)]);
    assert!(h.interrupt.wait_for(TX_QUEUE, 2));
    assert!(h.peer_gets_nothing());
}

#[test]
fn reset_stops_the_worker_and_activation_needs_both_queues() {
    let mem = guest_memory();
    let mut h = start(&mem, NO_EVENT_IDX);
    h.dev.reset();
    mem.write_slice(&packet(0, 0, 100, 0), GuestAddress(BUF))
        .unwrap();
    h.send_tx(&[ro(BUF, 112)]);
    assert!(h.peer_gets_nothing());
    assert!(h.tx.used().is_empty());

    let err = h
        .dev
        .activate(Vec::new(), Arc::new(FakeInterrupt::default()))
        .unwrap_err();
    assert!(matches!(err, ActivateError::MissingQueue(RX_QUEUE)));
}

/// The counters the device gives the VMM, by name.
fn counters<M: DeviceMemory, B: NetBackend>(
    dev: &Net<M, B>,
) -> std::collections::BTreeMap<&'static str, u64> {
    dev.counters()
        .expect("a net counts")
        .read()
        .into_iter()
        .collect()
}

/// A frame counts its Ethernet bytes (not the virtio-net header) once the tap took it or
/// the guest's buffers hold it; a dropped frame counts nothing.
#[test]
fn frames_that_got_through_are_counted_without_their_header() {
    let mem = guest_memory();
    let mut h = start(&mem, NO_EVENT_IDX);
    mem.write_slice(&packet(0, 0, 100, 0), GuestAddress(BUF))
        .unwrap();
    h.send_tx(&[ro(BUF, (HDR + 100) as u32)]);
    h.peer_recv();
    assert!(h.interrupt.wait_for(TX_QUEUE, 1));
    // A chain the device would write: dropped.
    h.send_tx(&[ro(BUF, 50), wo(BUF + 50, 62)]);
    assert!(h.interrupt.wait_for(TX_QUEUE, 2));

    // Without MRG_RXBUF, a 1600-byte frame does not fit the first chain and is dropped;
    // the 1000-byte one after it is delivered.
    let mem2 = guest_memory();
    let mut h2 = start(&mem2, NO_EVENT_IDX | (1 << VIRTIO_NET_F_MRG_RXBUF));
    h2.post_rx(&[wo(BUF + 0x1000, HDR as u32 + 1514)]);
    h2.post_rx(&[wo(BUF + 0x2000, 2048)]);
    h2.peer.send(&packet(0, 0, 1600, 1)).unwrap();
    h2.peer.send(&packet(0, 0, 1000, 5)).unwrap();
    assert!(crate::test_utils::eventually(|| h2.rx.used().len() == 2));
    assert!(h2.interrupt.wait_for(RX_QUEUE, 1));

    let expected = |rx_bytes, rx_frames, tx_bytes, tx_frames| {
        std::collections::BTreeMap::from([
            ("rx_bytes", rx_bytes),
            ("rx_frames", rx_frames),
            // The second chain was held before its frame came: read straight into.
            ("rx_bounced_bytes", 0),
            ("tx_bytes", tx_bytes),
            ("tx_frames", tx_frames),
        ])
    };
    assert_eq!(counters(&h.dev), expected(0, 0, 100, 1));
    assert_eq!(counters(&h2.dev), expected(1000, 1, 0, 0));
}

/// The receive chains held for one frame are bounded by their descriptors, not only by the
/// ring: a driver posting chains of many one-byte buffers (through indirect tables) cannot
/// make the device hold a ring's worth of them for one frame. A frame that needs more is
/// dropped, and the chains taken for it go back unused; the next frame that fits is received.
#[test]
fn the_descriptors_held_for_one_frame_are_bounded() {
    const PER_CHAIN: u64 = 32;
    const CHAINS: u64 = 140;
    let mem = guest_memory();
    let mut h = start(&mem, NO_EVENT_IDX);
    let heads: Vec<u16> = (0..CHAINS)
        .map(|i| {
            let buffers: Vec<_> = (0..PER_CHAIN)
                .map(|j| wo(BUF + i * PER_CHAIN + j, 1))
                .collect();
            h.rx.add_indirect(0x8_0000 + i * PER_CHAIN * 16, &buffers)
        })
        .collect();
    h.rx_kick.write(1).unwrap();
    // 4200 bytes need 132 chains, 4224 descriptors.
    h.peer.send(&packet(0, 0, 4200 - HDR, 1)).unwrap();
    let used = h.rx_used_after(1);
    let held = super::datapath::MAX_HELD_DESCRIPTORS / PER_CHAIN as usize;
    assert_eq!(used.len(), held, "{used:?}");
    assert!(used.iter().all(|&(_, len)| len == 0), "{used:?}");
    assert_eq!(used[0].0, u32::from(heads[0]));

    h.peer.send(&packet(0, 0, 100 - HDR, 2)).unwrap();
    let used = h.rx_used_after(2);
    let next: Vec<u32> = heads[held..held + 4]
        .iter()
        .map(|&h| u32::from(h))
        .collect();
    assert_eq!(
        used[held..],
        [(next[0], 32), (next[1], 32), (next[2], 32), (next[3], 4)]
    );
}
