//! The virtio-fs device over a fake back end: what the driver sees, what the back end is
//! handed, and what the guest gets once the back end is gone.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::VIRTIO_F_ACCESS_PLATFORM;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::test_utils::{eventually, guest_memory, ro, wo, Driver, FakeInterrupt};
use crate::ActivatedQueue;

const QUEUE_SIZE: u16 = 16;
/// A FUSE request's header and a reply's room, in guest memory above the rings.
const REQUEST: u64 = 0x1_0000;
const REPLY: u64 = 0x2_0000;
const FUSE_LOOKUP: u32 = 1;
const FUSE_FORGET: u32 = 2;

/// A ring as the back end was given it: index, size, next available, descriptor table.
type GivenRing = (usize, u16, u16, u64);

/// What the fake back end was asked, for the test to look at after the device took it.
#[derive(Default)]
struct Log {
    /// Per start: the features, and each ring.
    starts: Vec<(u64, Vec<GivenRing>)>,
    calls: Vec<EventFd>,
    stops: usize,
    reconnects: usize,
    /// Starts that fail before one succeeds.
    failing_starts: usize,
}

struct FakeBackend {
    features: u64,
    iotlb: bool,
    /// The device's end of the back end's socket; the test holds the other.
    socket: UnixStream,
    log: Arc<Mutex<Log>>,
}

impl AsRawFd for FakeBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

impl FsBackend for FakeBackend {
    fn features(&self) -> u64 {
        self.features
    }

    fn offers_iotlb(&self) -> bool {
        self.iotlb
    }

    fn start(
        &mut self,
        acked: u64,
        _ram: &GuestMemoryMmap,
        rings: &[vhost_user::Ring],
    ) -> Result<(), vhost_user::Error> {
        let mut log = self.log.lock().unwrap();
        if log.failing_starts > 0 {
            log.failing_starts -= 1;
            return Err(vhost_user::Error::Lacks("a live connection"));
        }
        let described = rings
            .iter()
            .map(|r| (r.index, r.size, r.next_avail, r.desc))
            .collect();
        log.starts.push((acked, described));
        log.calls = rings.iter().map(|r| r.call.try_clone().unwrap()).collect();
        Ok(())
    }

    fn stop(&mut self) -> Result<(), vhost_user::Error> {
        self.log.lock().unwrap().stops += 1;
        Ok(())
    }

    fn reconnect(&mut self) -> Result<(), vhost_user::Error> {
        self.log.lock().unwrap().reconnects += 1;
        let (ours, theirs) = UnixStream::pair().unwrap();
        self.socket = ours;
        // The new back end stays up for the rest of the test.
        std::mem::forget(theirs);
        Ok(())
    }
}

const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
const EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;

/// A share on `mem` with one request queue over a fake back end offering `features`; the
/// test's end of the back end's socket, and the log.
fn share(mem: &GuestMemoryMmap, features: u64) -> (Fs, UnixStream, Arc<Mutex<Log>>) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let log = Arc::new(Mutex::new(Log::default()));
    let backend = FakeBackend {
        features,
        iotlb: false,
        socket: ours,
        log: Arc::clone(&log),
    };
    let fs = Fs::new(
        mem.clone(),
        "kataShared",
        1,
        QUEUE_SIZE,
        Box::new(backend),
        false,
    )
    .unwrap();
    (fs, theirs, log)
}

/// The driver's side of a started share.
struct Started<'a> {
    drivers: [Driver<'a, GuestMemoryMmap>; 2],
    /// Each queue's notifier, as the transport's ioeventfd.
    kicks: Vec<EventFd>,
    interrupt: Arc<FakeInterrupt>,
}

/// The driver's two queues (hiprio at 0, requests at 0x1000), handed to `fs` with `features`.
fn activate<'a>(fs: &mut Fs, mem: &'a GuestMemoryMmap, features: u64) -> Started<'a> {
    let drivers = [
        Driver::new(mem, 0, QUEUE_SIZE),
        Driver::new(mem, 0x1000, QUEUE_SIZE),
    ];
    let kicks: Vec<EventFd> = (0..2)
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
    fs.ack_features(features);
    fs.activate(queues, interrupt.clone()).unwrap();
    Started {
        drivers,
        kicks,
        interrupt,
    }
}

/// A FUSE request (`opcode`, `unique`) with room for a reply, made available on `driver`.
fn request(driver: &mut Driver<GuestMemoryMmap>, mem: &GuestMemoryMmap, opcode: u32, unique: u64) {
    let mut header = [0u8; 40];
    header[..4].copy_from_slice(&40u32.to_le_bytes());
    header[4..8].copy_from_slice(&opcode.to_le_bytes());
    header[8..16].copy_from_slice(&unique.to_le_bytes());
    let at = REQUEST + unique * 0x100;
    mem.write_slice(&header, GuestAddress(at)).unwrap();
    driver.add(&[ro(at, 40), wo(REPLY + unique * 0x100, 256)]);
}

/// The `fuse_out_header` the device wrote for request `unique`: (len, error, unique).
fn reply(mem: &GuestMemoryMmap, unique: u64) -> (u32, i32, u64) {
    let mut out = [0u8; 16];
    mem.read_slice(&mut out, GuestAddress(REPLY + unique * 0x100))
        .unwrap();
    (
        u32::from_le_bytes(out[..4].try_into().unwrap()),
        i32::from_le_bytes(out[4..8].try_into().unwrap()),
        u64::from_le_bytes(out[8..].try_into().unwrap()),
    )
}

#[test]
fn the_driver_sees_the_tag_its_queues_and_the_back_ends_ring_features() {
    let offered = VERSION_1 | EVENT_IDX | (1 << 30) | (1 << 5);
    let (fs, _backend, _) = share(&guest_memory(), offered);
    assert_eq!(fs.device_type(), 26);
    assert_eq!(fs.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
    assert_eq!(fs.features(), VERSION_1 | EVENT_IDX);
    let mut config = [0xffu8; 40];
    fs.read_config(0, &mut config);
    assert_eq!(&config[..10], b"kataShared");
    assert!(config[10..36].iter().all(|&b| b == 0));
    assert_eq!(u32::from_le_bytes(config[36..].try_into().unwrap()), 1);
}

#[test]
fn a_share_behind_the_iommu_and_a_bad_tag_are_refused_with_the_reason() {
    for iotlb in [false, true] {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let backend = FakeBackend {
            features: VERSION_1 | (1 << VIRTIO_F_ACCESS_PLATFORM),
            iotlb,
            socket: ours,
            log: Arc::default(),
        };
        let err = Fs::new(guest_memory(), "t", 1, 16, Box::new(backend), true)
            .err()
            .unwrap();
        let expected = if iotlb {
            "does not relay"
        } else {
            "segment outside"
        };
        assert!(err.to_string().contains(expected), "{err}");
    }
    let (ours, _theirs) = UnixStream::pair().unwrap();
    let backend = FakeBackend {
        features: VERSION_1,
        iotlb: false,
        socket: ours,
        log: Arc::default(),
    };
    let long = "t".repeat(TAG_LEN + 1);
    assert!(Fs::new(guest_memory(), &long, 1, 16, Box::new(backend), false).is_err());
}

#[test]
fn the_back_end_gets_every_ring_by_host_address_and_its_calls_become_interrupts() {
    let mem = guest_memory();
    let (mut fs, _backend, log) = share(&mem, VERSION_1 | EVENT_IDX);
    let started = activate(&mut fs, &mem, VERSION_1 | EVENT_IDX);
    let base = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
    {
        let log = log.lock().unwrap();
        let (acked, rings) = &log.starts[0];
        assert_eq!(*acked, VERSION_1 | EVENT_IDX);
        assert_eq!(
            rings,
            &[(0, QUEUE_SIZE, 0, base), (1, QUEUE_SIZE, 0, base + 0x1000)]
        );
        log.calls[1].write(1).unwrap();
    }
    assert!(
        started.interrupt.wait_for(1, 1),
        "the call for queue 1 was relayed"
    );
    fs.reset();
    assert_eq!(
        log.lock().unwrap().stops,
        1,
        "the rings are stopped on reset"
    );
}

#[test]
fn once_the_back_end_is_gone_every_request_fails_with_enotconn_and_the_next_start_reconnects() {
    let mem = guest_memory();
    let (mut fs, backend, log) = share(&mem, VERSION_1);
    let Started {
        mut drivers,
        kicks,
        interrupt,
    } = activate(&mut fs, &mem, VERSION_1);
    // Made available while the back end runs: it took them and never answered.
    request(&mut drivers[1], &mem, FUSE_LOOKUP, 1);
    request(&mut drivers[0], &mem, FUSE_FORGET, 2);
    drop(backend);
    assert!(eventually(|| drivers[1].used().len() == 1));
    assert_eq!(reply(&mem, 1), (16, -libc::ENOTCONN, 1));
    assert!(eventually(|| drivers[0].used() == vec![(0, 0)]));
    assert_eq!(reply(&mem, 2).0, 0, "a FORGET gets no reply");
    assert_eq!(interrupt.needs_reset_count(), 1);
    // Made available after: served as the driver notifies.
    request(&mut drivers[1], &mem, FUSE_LOOKUP, 3);
    kicks[1].write(1).unwrap();
    assert!(eventually(|| drivers[1].used().len() == 2));
    assert_eq!(reply(&mem, 3), (16, -libc::ENOTCONN, 3));
    let counters = fs.counters().unwrap().read();
    assert!(counters.contains(&("backend_lost", 1)), "{counters:?}");
    assert!(counters.contains(&("failed_requests", 3)), "{counters:?}");

    fs.reset();
    assert_eq!(
        log.lock().unwrap().stops,
        0,
        "a gone back end is not asked to stop"
    );
    let _ = activate(&mut fs, &mem, VERSION_1);
    let log = log.lock().unwrap();
    assert_eq!((log.reconnects, log.starts.len()), (1, 2));
}

#[test]
fn a_start_that_fails_on_a_stale_connection_reconnects_once() {
    let mem = guest_memory();
    let (mut fs, _backend, log) = share(&mem, VERSION_1);
    log.lock().unwrap().failing_starts = 1;
    let _ = activate(&mut fs, &mem, VERSION_1);
    let log = log.lock().unwrap();
    assert_eq!((log.reconnects, log.starts.len()), (1, 1));
}

#[test]
fn a_ring_that_leaves_guest_ram_is_refused_before_the_back_end_sees_it() {
    let mem = guest_memory();
    let (mut fs, _backend, log) = share(&mem, VERSION_1);
    let ram_end = mem.last_addr().0 + 1;
    let queues = (0..2)
        .map(|index| {
            let mut queue = Driver::new(&mem, 0x1000 * index as u64, QUEUE_SIZE).queue();
            if index == 1 {
                // The used ring's 134 bytes start 64 bytes before the end of RAM.
                let used = ram_end - 64;
                queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
            }
            ActivatedQueue {
                index,
                queue,
                notifier: EventFd::new(EFD_NONBLOCK).unwrap(),
            }
        })
        .collect();
    fs.ack_features(VERSION_1);
    let err = fs
        .activate(queues, Arc::new(FakeInterrupt::default()))
        .unwrap_err();
    assert!(
        matches!(
            err,
            ActivateError::RingOutsideRam {
                ring: "used ring",
                ..
            }
        ),
        "{err}"
    );
    assert!(log.lock().unwrap().starts.is_empty());
}

/// An interrupt whose queues have irqfds, as the virtio-pci transport's have once the driver
/// gave them MSI-X vectors.
struct WithIrqfds {
    relayed: FakeInterrupt,
    irqfds: Vec<EventFd>,
}

impl crate::VirtioInterrupt for WithIrqfds {
    fn notify_queue(&self, queue_index: usize) -> std::io::Result<()> {
        self.relayed.notify_queue(queue_index)
    }

    fn notify_config(&self) -> std::io::Result<()> {
        self.relayed.notify_config()
    }

    fn needs_reset(&self) -> std::io::Result<()> {
        self.relayed.needs_reset()
    }

    fn queue_irqfd(&self, queue_index: usize) -> Option<EventFd> {
        self.irqfds.get(queue_index)?.try_clone().ok()
    }
}

#[test]
fn with_an_irqfd_per_queue_the_back_end_signals_kvm_without_warden() {
    let mem = guest_memory();
    let (mut fs, _backend, log) = share(&mem, VERSION_1);
    let drivers = [
        Driver::new(&mem, 0, QUEUE_SIZE),
        Driver::new(&mem, 0x1000, QUEUE_SIZE),
    ];
    let interrupt = Arc::new(WithIrqfds {
        relayed: FakeInterrupt::default(),
        irqfds: (0..2)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect(),
    });
    let queues = drivers
        .iter()
        .enumerate()
        .map(|(index, driver)| ActivatedQueue {
            index,
            queue: driver.queue(),
            notifier: EventFd::new(EFD_NONBLOCK).unwrap(),
        })
        .collect();
    fs.ack_features(VERSION_1);
    fs.activate(queues, interrupt.clone()).unwrap();
    // The relay's first pass over its queues, as every worker's, is behind us after this.
    let settle = || std::thread::sleep(std::time::Duration::from_millis(50));
    settle();
    let relayed = interrupt.relayed.count(1);
    log.lock().unwrap().calls[1].write(1).unwrap();
    assert_eq!(interrupt.irqfds[1].read().unwrap(), 1, "the irqfd itself");
    settle();
    assert_eq!(interrupt.relayed.count(1), relayed, "nothing relayed");
}
