//! Several queue pairs through their workers: what they add to features, queues and config,
//! the control queue's answers, and each pair carrying frames on its own tap queue only while
//! the driver uses it.

use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use virtio_bindings::virtio_net::{VIRTIO_NET_ERR, VIRTIO_NET_OK};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::tests::SocketBackend;
use super::*;
use crate::test_utils::{guest_memory, ro, wo, Driver, FakeInterrupt};

const SIZE: u16 = 16;
const PAIRS: usize = 3;
const HDR: usize = net_util::VNET_HDR_LEN;
/// A control request's device-readable bytes, and its ack.
const REQUEST: u64 = 0x1_0000;
const ACK: u64 = 0x1_0100;
/// Frame buffers, 4 KiB each.
const FRAMES: u64 = 0x2_0000;
const NO_EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;
const OK: u8 = VIRTIO_NET_OK as u8;
const ERR: u8 = VIRTIO_NET_ERR as u8;

/// A device with [`PAIRS`] pairs on socket backends, activated with a driver per queue.
struct Mq<'a> {
    dev: Net<GuestMemoryMmap, SocketBackend>,
    /// By queue index: the pairs' receive and transmit queues, then the control queue.
    drivers: Vec<Driver<'a, GuestMemoryMmap>>,
    kicks: Vec<EventFd>,
    interrupt: Arc<FakeInterrupt>,
    /// The host end of each pair's tap queue.
    peers: Vec<UnixDatagram>,
    /// Each pair's attach and detach calls.
    attached: Vec<Arc<Mutex<Vec<bool>>>>,
    mem: &'a GuestMemoryMmap,
    next_frame: u64,
}

/// The device, the host end of each pair's tap queue, and each pair's attach calls.
type Device = (
    Net<GuestMemoryMmap, SocketBackend>,
    Vec<UnixDatagram>,
    Vec<Arc<Mutex<Vec<bool>>>>,
);

fn device(mem: &GuestMemoryMmap) -> Device {
    let (backends, peers): (Vec<_>, Vec<_>) = (0..PAIRS).map(|_| SocketBackend::pair(0)).unzip();
    let attached = backends.iter().map(|b| Arc::clone(&b.attached)).collect();
    let options = NetOptions {
        mac: MacAddr::new([0x52, 0x54, 0, 0, 0, 9]),
        queue_size: SIZE,
        access_platform: false,
    };
    (Net::new(mem.clone(), backends, options), peers, attached)
}

/// Activates the device with the driver accepting all it offers but `refused`: every queue
/// with `VIRTIO_NET_F_MQ`, else the first pair and the control queue.
fn start(mem: &GuestMemoryMmap, refused: u64) -> Mq<'_> {
    let (mut dev, peers, attached) = device(mem);
    dev.ack_features(dev.features() & !refused);
    let count = if refused & (1 << VIRTIO_NET_F_MQ) != 0 {
        3
    } else {
        dev.queue_max_sizes().len()
    };
    let drivers: Vec<_> = (0..count)
        .map(|i| Driver::new(mem, 0x1000 * i as u64, SIZE))
        .collect();
    let kicks: Vec<_> = (0..count)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let interrupt = Arc::new(FakeInterrupt::default());
    let queues = drivers
        .iter()
        .zip(&kicks)
        .enumerate()
        .map(|(index, (driver, kick))| ActivatedQueue {
            index,
            queue: driver.queue(),
            notifier: kick.try_clone().unwrap(),
        })
        .collect();
    dev.activate(queues, interrupt.clone()).unwrap();
    Mq {
        dev,
        drivers,
        kicks,
        interrupt,
        peers,
        attached,
        mem,
        next_frame: FRAMES,
    }
}

impl Mq<'_> {
    fn control_index(&self) -> usize {
        self.drivers.len() - 1
    }

    /// Queues `request` with a one-byte ack buffer (or none); returns the used length and
    /// the ack.
    fn control(&mut self, request: &[u8], with_ack: bool) -> (u32, u8) {
        self.mem
            .write_slice(request, GuestAddress(REQUEST))
            .unwrap();
        self.mem.write_obj(0xeeu8, GuestAddress(ACK)).unwrap();
        let index = self.control_index();
        let mut chain = vec![ro(REQUEST, request.len() as u32)];
        if with_ack {
            chain.push(wo(ACK, 1));
        }
        self.drivers[index].add(&chain);
        let answered = self.interrupt.count(index) + 1;
        self.kicks[index].write(1).unwrap();
        assert!(self.interrupt.wait_for(index, answered), "no answer");
        let used = *self.drivers[index].used().last().unwrap();
        (used.1, self.mem.read_obj(GuestAddress(ACK)).unwrap())
    }

    fn set_pairs(&mut self, pairs: u16) -> u8 {
        let [low, high] = pairs.to_le_bytes();
        self.control(&[4, 0, low, high], true).1
    }

    /// Posts a 4 KiB receive buffer on `pair`.
    fn post_rx(&mut self, pair: usize) {
        let addr = self.next_frame;
        self.next_frame += 0x1000;
        self.drivers[2 * pair].add(&[wo(addr, 0x1000)]);
        self.kicks[2 * pair].write(1).unwrap();
    }

    /// Sends a transmit chain on `pair`; returns the frame.
    fn transmit(&mut self, pair: usize, seed: u8) -> Vec<u8> {
        let frame = frame(seed);
        let addr = self.next_frame;
        self.next_frame += 0x1000;
        self.mem.write_slice(&frame, GuestAddress(addr)).unwrap();
        self.drivers[2 * pair + 1].add(&[ro(addr, frame.len() as u32)]);
        self.kicks[2 * pair + 1].write(1).unwrap();
        frame
    }

    /// Receive chains `pair` has used so far.
    fn received(&self, pair: usize) -> usize {
        self.drivers[2 * pair].used().len()
    }
}

/// A frame with its header, bytes numbered from `seed`.
fn frame(seed: u8) -> Vec<u8> {
    let mut frame = vec![0u8; HDR];
    frame.extend((0..60).map(|i: u8| i.wrapping_add(seed)));
    frame
}

/// Waits until `pair` has used `count` receive chains, or 5 s.
fn wait_received(mq: &Mq, pair: usize, count: usize) -> bool {
    crate::test_utils::eventually(|| mq.received(pair) >= count)
}

#[test]
fn several_pairs_add_mq_a_control_queue_and_their_count_in_config() {
    let mem = guest_memory();
    let (dev, _, _) = device(&mem);
    for bit in [VIRTIO_NET_F_MQ, VIRTIO_NET_F_CTRL_VQ] {
        assert_ne!(dev.features() & (1 << bit), 0, "bit {bit}");
    }
    assert_eq!(dev.queue_max_sizes(), &[SIZE; 2 * PAIRS + 1]);
    let mut pairs = [0u8; 2];
    dev.read_config(8, &mut pairs);
    assert_eq!(u16::from_le_bytes(pairs), PAIRS as u16);
}

#[test]
fn the_driver_starts_on_one_pair_and_switches_pairs_on_and_off() {
    let mem = guest_memory();
    let mut mq = start(&mem, NO_EVENT_IDX);
    // Opened attached; activation leaves only the first pair's queue on the tap.
    let calls = |mq: &Mq, pair: usize| mq.attached[pair].lock().unwrap().clone();
    assert_eq!(calls(&mq, 0), []);
    assert_eq!(calls(&mq, 1), [false]);
    assert_eq!(calls(&mq, 2), [false]);

    // A frame on a pair out of use waits; the first pair carries traffic.
    mq.post_rx(1);
    mq.peers[1].send(&frame(1)).unwrap();
    mq.post_rx(0);
    mq.peers[0].send(&frame(0)).unwrap();
    assert!(wait_received(&mq, 0, 1));
    thread::sleep(Duration::from_millis(100));
    assert_eq!(mq.received(1), 0, "pair 1 is not in use");

    // Two pairs: the second is attached and its worker delivers what waited.
    assert_eq!(mq.set_pairs(2), OK);
    assert_eq!(calls(&mq, 1), [false, true]);
    assert_eq!(calls(&mq, 2), [false], "pair 2 stays out");
    assert!(
        wait_received(&mq, 1, 1),
        "woken when its pair came into use"
    );
    assert_eq!(mq.drivers[2].used(), [(0, frame(1).len() as u32)]);
    let sent = mq.transmit(1, 7);
    let mut got = vec![0u8; 256];
    let len = mq.peers[1].recv(&mut got).unwrap();
    assert_eq!(
        &got[..len],
        &sent[..],
        "pair 1 transmits on its own tap queue"
    );

    // Back to one: the second pair's queue leaves the tap and receives nothing more.
    assert_eq!(mq.set_pairs(1), OK);
    assert_eq!(calls(&mq, 1), [false, true, false]);
    mq.post_rx(1);
    mq.peers[1].send(&frame(2)).unwrap();
    thread::sleep(Duration::from_millis(100));
    assert_eq!(mq.received(1), 1, "pair 1 is out of use again");

    // Reset and activate again: the driver starts on one pair once more.
    mq.dev.reset();
    assert_eq!(calls(&mq, 1), [false, true, false], "already detached");
}

#[test]
fn bad_control_requests_are_refused_and_change_nothing() {
    let mem = guest_memory();
    let mut mq = start(&mem, NO_EVENT_IDX);
    assert_eq!(
        mq.set_pairs(PAIRS as u16 + 1),
        ERR,
        "more pairs than there are"
    );
    assert_eq!(mq.set_pairs(0), ERR, "no pair");
    // VIRTIO_NET_CTRL_RX_PROMISC: its feature is not offered.
    assert_eq!(mq.control(&[0, 0, 1], true), (1, ERR));
    assert_eq!(mq.control(&[4, 0, 2], true), (1, ERR), "short argument");
    assert_eq!(mq.control(&[4], true), (1, ERR), "no command");
    // Without a writable byte nothing can be acked; the chain comes back empty.
    assert_eq!(mq.control(&[4, 0, 2, 0], false), (0, 0xee));
    assert_eq!(mq.attached[1].lock().unwrap().clone(), [false]);
    assert_eq!(mq.attached[2].lock().unwrap().clone(), [false]);
    assert_eq!(mq.set_pairs(3), OK, "the device still answers");
    assert_eq!(mq.attached[2].lock().unwrap().clone(), [false, true]);
}

#[test]
fn without_mq_the_control_queue_follows_the_first_pair() {
    let mem = guest_memory();
    let mut mq = start(&mem, NO_EVENT_IDX | (1 << VIRTIO_NET_F_MQ));
    assert_eq!(mq.control_index(), 2);
    assert_eq!(mq.set_pairs(2), ERR, "one pair without MQ");
    assert_eq!(mq.set_pairs(1), OK);
    mq.post_rx(0);
    mq.peers[0].send(&frame(3)).unwrap();
    assert!(wait_received(&mq, 0, 1));
}
