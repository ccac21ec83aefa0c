//! The vhost-net path against a fake kernel that records what the device asks of it: what the
//! rings are handed over with, that its interrupts reach the driver, that its IOTLB misses are
//! answered from the IOMMU with whole mappings (and refused outside them), and that what the
//! guest unmaps is invalidated.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use net_util::{IotlbMiss, RingAddresses};
use virtio_bindings::virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::{VIRTIO_NET_F_CSUM, VIRTIO_NET_F_MRG_RXBUF};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_iommu::{ExternalMapper, MapPerms, MapperError};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, Permissions};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::tests::SocketBackend;
use super::*;
use crate::test_utils::{eventually, guest_memory, iommu_memory, Driver, FakeInterrupt};

const RX_BASE: u64 = 0;
const TX_BASE: u64 = 0x8000;
const QUEUE_SIZE: u16 = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Features(u64),
    Memory,
    Ring(usize, u16, RingAddresses),
    Tap(usize, Option<RawFd>),
    Update(u64, u64, u64, bool, bool),
    Invalidate(u64, u64),
}

/// A vhost-net that records every request; misses are queued by the test and signalled on
/// its fd, as the kernel makes its fd readable.
struct FakeKernel {
    calls: Mutex<Vec<Call>>,
    /// The call eventfd of each ring, as handed over.
    ring_calls: Mutex<Vec<EventFd>>,
    misses: Mutex<VecDeque<IotlbMiss>>,
    readable: EventFd,
    /// What `iotlb_invalidate` fails with, as an OS error.
    invalidate_error: Mutex<Option<i32>>,
    features: u64,
}

/// What the fake kernel implements: no indirect descriptors, which must then not be offered.
const KERNEL_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_F_ACCESS_PLATFORM)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_NET_F_MRG_RXBUF);

impl FakeKernel {
    fn new() -> Arc<Self> {
        Self::with_features(KERNEL_FEATURES)
    }

    fn with_features(features: u64) -> Arc<Self> {
        Arc::new(FakeKernel {
            features,
            calls: Mutex::default(),
            ring_calls: Mutex::default(),
            misses: Mutex::default(),
            readable: EventFd::new(EFD_NONBLOCK).unwrap(),
            invalidate_error: Mutex::default(),
        })
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    fn miss(&self, iova: u64, write: bool) {
        self.misses.lock().unwrap().push_back(IotlbMiss {
            iova,
            read: !write,
            write,
        });
        self.readable.write(1).unwrap();
    }

    fn record(&self, call: Call) -> io::Result<()> {
        self.calls.lock().unwrap().push(call);
        Ok(())
    }
}

impl AsRawFd for FakeKernel {
    fn as_raw_fd(&self) -> RawFd {
        self.readable.as_raw_fd()
    }
}

impl VhostKernel for FakeKernel {
    fn supported_features(&self) -> io::Result<u64> {
        Ok(self.features)
    }

    fn set_acked_features(&self, features: u64) -> io::Result<()> {
        self.record(Call::Features(features))
    }

    fn set_guest_memory(&self) -> io::Result<()> {
        self.record(Call::Memory)
    }

    fn set_ring(
        &self,
        index: usize,
        _size: u16,
        next_avail: u16,
        addresses: RingAddresses,
        _kick: &EventFd,
        call: &EventFd,
    ) -> io::Result<()> {
        self.ring_calls.lock().unwrap().push(call.try_clone()?);
        self.record(Call::Ring(index, next_avail, addresses))
    }

    fn set_tap(&self, index: usize, tap: Option<RawFd>) -> io::Result<()> {
        self.record(Call::Tap(index, tap))
    }

    fn iotlb_update(
        &self,
        iova: u64,
        size: u64,
        host: u64,
        read: bool,
        write: bool,
    ) -> io::Result<()> {
        self.record(Call::Update(iova, size, host, read, write))
    }

    fn iotlb_invalidate(&self, iova: u64, size: u64) -> io::Result<()> {
        if let Some(errno) = *self.invalidate_error.lock().unwrap() {
            return Err(io::Error::from_raw_os_error(errno));
        }
        self.record(Call::Invalidate(iova, size))
    }

    fn next_miss(&self) -> io::Result<Option<IotlbMiss>> {
        let _ = self.readable.read();
        Ok(self.misses.lock().unwrap().pop_front())
    }
}

struct Started<M: DeviceMemory> {
    dev: Net<M, SocketBackend>,
    kernel: Arc<FakeKernel>,
    tap: RawFd,
    interrupt: Arc<FakeInterrupt>,
}

fn options(access_platform: bool) -> NetOptions {
    NetOptions {
        mac: MacAddr::new([0x52, 0x54, 0, 0, 0, 1]),
        queue_size: QUEUE_SIZE,
        access_platform,
    }
}

/// A one-pair device on a fake kernel over `mem`, activated with every feature it offers.
fn start<M: DeviceMemory>(mem: &M, access_platform: bool) -> Started<M> {
    let kernel = FakeKernel::new();
    let (backend, _peer) = SocketBackend::pair(libc::TUN_F_CSUM);
    let tap = backend.as_raw_fd();
    let kernels: Vec<Arc<dyn VhostKernel>> = vec![kernel.clone()];
    let mut dev = Net::with_vhost(
        mem.clone(),
        vec![backend],
        options(access_platform),
        kernels,
    )
    .unwrap();
    let rx = Driver::new(mem, RX_BASE, QUEUE_SIZE);
    let tx = Driver::new(mem, TX_BASE, QUEUE_SIZE);
    let interrupt = Arc::new(FakeInterrupt::default());
    dev.ack_features(dev.features());
    let queue = |index, driver: &Driver<M>| ActivatedQueue {
        index,
        queue: driver.queue(),
        notifier: EventFd::new(EFD_NONBLOCK).unwrap(),
    };
    dev.activate(
        vec![queue(RX_QUEUE, &rx), queue(TX_QUEUE, &tx)],
        interrupt.clone(),
    )
    .unwrap();
    Started {
        dev,
        kernel,
        tap,
        interrupt,
    }
}

/// The driver's queues as the kernel must see them: the addresses `Driver` lays out.
fn driver_addresses<M: DeviceMemory>(mem: &M, base: u64) -> (u64, u64, u64) {
    let queue = Driver::new(mem, base, QUEUE_SIZE).queue();
    (queue.desc_table(), queue.avail_ring(), queue.used_ring())
}

/// Plain RAM: the kernel gets the ring features the driver accepted (and no feature it
/// lacks is offered), all of RAM, host addresses of the rings, and the pair's tap; a reset
/// takes the tap away from both rings.
#[test]
fn the_rings_go_to_the_kernel_and_a_reset_takes_them_back() {
    let mem = guest_memory();
    let mut started = start(&mem, false);
    let offered = started.dev.features();
    assert_eq!(offered & (1 << VIRTIO_RING_F_INDIRECT_DESC), 0);
    assert_ne!(
        offered & (1 << VIRTIO_NET_F_CSUM),
        0,
        "offloads stay the tap's"
    );
    let host = |gpa: u64| mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;
    let rings = [RX_BASE, TX_BASE].map(|base| {
        let (desc, avail, used) = driver_addresses(&mem, base);
        RingAddresses {
            desc: host(desc),
            avail: host(avail),
            used: host(used),
        }
    });
    let tap = Some(started.tap);
    assert_eq!(
        started.kernel.calls(),
        vec![
            Call::Features(
                (1 << VIRTIO_F_VERSION_1)
                    | (1 << VIRTIO_RING_F_EVENT_IDX)
                    | (1 << VIRTIO_NET_F_MRG_RXBUF)
            ),
            Call::Memory,
            Call::Ring(0, 0, rings[0]),
            Call::Tap(0, tap),
            Call::Ring(1, 0, rings[1]),
            Call::Tap(1, tap),
        ]
    );
    started.dev.reset();
    assert_eq!(
        started.kernel.calls()[6..],
        [Call::Tap(0, None), Call::Tap(1, None)]
    );
}

/// What the kernel signals on a ring's call eventfd reaches the driver as that queue's
/// interrupt.
#[test]
fn the_kernels_signals_become_queue_interrupts() {
    let mem = guest_memory();
    let mut started = start(&mem, false);
    let calls = started.kernel.ring_calls.lock().unwrap();
    calls[1].write(1).unwrap();
    assert!(started.interrupt.wait_for(TX_QUEUE, 1));
    calls[0].write(1).unwrap();
    assert!(started.interrupt.wait_for(RX_QUEUE, 1));
    drop(calls);
    started.dev.reset();
}

/// Behind the IOMMU the rings go as the driver's addresses; a miss inside a mapping gets it
/// (as host addresses, with the rights the test IOMMU grants: those asked), a miss outside
/// every mapping gets nothing.
#[test]
fn behind_the_iommu_misses_are_answered_from_the_mappings() {
    let mem = iommu_memory();
    mem.iommu()
        .map(0x1000_0000, 0x4_0000, 0x1000, Permissions::ReadWrite);
    let mut started = start(&mem, true);
    let (desc, avail, used) = driver_addresses(&mem, RX_BASE);
    assert!(started.kernel.calls().contains(&Call::Ring(
        0,
        0,
        RingAddresses { desc, avail, used }
    )));
    let host = mem
        .get_backend()
        .get_host_address(GuestAddress(0x4_0000))
        .unwrap() as u64;
    let before = started.kernel.calls().len();
    started.kernel.miss(0x1000_0010, true);
    assert!(eventually(|| started.kernel.calls().len() > before));
    assert_eq!(
        started.kernel.calls()[before..],
        [Call::Update(0x1000_0000, 0x1000, host, false, true)]
    );
    started.kernel.miss(0x2000_0000, false);
    started.kernel.miss(0x1000_0020, false);
    assert!(eventually(|| started.kernel.calls().len() > before + 1));
    assert_eq!(
        started.kernel.calls()[before + 1..],
        [Call::Update(0x1000_0000, 0x1000, host, true, false)],
        "the unmapped IOVA got no answer"
    );
    started.dev.reset();
}

/// The endpoint's mapper: a MAP goes ahead (split where RAM regions end), an UNMAP and
/// leaving bypass invalidate, and an invalidation the kernel refuses fails the request,
/// unless the kernel has no IOTLB yet.
#[test]
fn the_mapper_invalidates_what_the_guest_takes_away() {
    let ram = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x1_0000),
        (GuestAddress(0x1_0000), 0x1_0000),
    ])
    .unwrap();
    let host = |gpa: u64| ram.get_host_address(GuestAddress(gpa)).unwrap() as u64;
    let kernel = FakeKernel::new();
    let mapper = VhostIotlb::new(vec![kernel.clone()], ram.clone());
    let rw = MapPerms {
        read: true,
        write: true,
    };
    mapper.map(0x9000_0000, 0xf000, 0x2000, rw).unwrap();
    mapper.unmap(0x9000_0000, 0x2000).unwrap();
    mapper.set_identity(false).unwrap();
    assert_eq!(
        kernel.calls(),
        vec![
            Call::Update(0x9000_0000, 0x1000, host(0xf000), true, true),
            Call::Update(0x9000_1000, 0x1000, host(0x1_0000), true, true),
            Call::Invalidate(0x9000_0000, 0x2000),
            Call::Invalidate(0, u64::MAX),
        ]
    );
    *kernel.invalidate_error.lock().unwrap() = Some(libc::EFAULT);
    mapper.unmap(0x9000_0000, 0x1000).unwrap();
    *kernel.invalidate_error.lock().unwrap() = Some(libc::EIO);
    assert!(matches!(
        mapper.unmap(0x9000_0000, 0x1000),
        Err(MapperError::Failed(_))
    ));
}

/// A kernel that lacks ACCESS_PLATFORM cannot serve a protected device: the device is
/// refused rather than offered without it, which would let the driver bypass the IOMMU.
#[test]
fn a_kernel_without_access_platform_is_refused_behind_the_iommu() {
    let kernel = FakeKernel::with_features(KERNEL_FEATURES & !(1 << VIRTIO_F_ACCESS_PLATFORM));
    let (backend, _peer) = SocketBackend::pair(0);
    let refused = Net::with_vhost(iommu_memory(), vec![backend], options(true), vec![kernel]);
    assert!(refused.is_err());
    let kernel = FakeKernel::with_features(KERNEL_FEATURES & !(1 << VIRTIO_F_ACCESS_PLATFORM));
    let (backend, _peer) = SocketBackend::pair(0);
    assert!(Net::with_vhost(guest_memory(), vec![backend], options(false), vec![kernel]).is_ok());
}

/// Activates a fresh one-pair device over `mem` with `features` accepted and the receive
/// ring's used ring moved to `rx_used` (if given); the kernel's calls and the outcome.
fn activate_with<M: DeviceMemory>(
    mem: &M,
    access_platform: bool,
    features: impl FnOnce(u64) -> u64,
    rx_used: Option<u64>,
) -> (Arc<FakeKernel>, Result<(), ActivateError>) {
    let kernel = FakeKernel::new();
    let (backend, _peer) = SocketBackend::pair(0);
    let kernels: Vec<Arc<dyn VhostKernel>> = vec![kernel.clone()];
    let mut dev = Net::with_vhost(
        mem.clone(),
        vec![backend],
        options(access_platform),
        kernels,
    )
    .unwrap();
    dev.ack_features(features(dev.features()));
    let mut rx = Driver::new(mem, RX_BASE, QUEUE_SIZE).queue();
    if let Some(used) = rx_used {
        rx.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
    }
    let tx = Driver::new(mem, TX_BASE, QUEUE_SIZE).queue();
    let queue = |index, queue| ActivatedQueue {
        index,
        queue,
        notifier: EventFd::new(EFD_NONBLOCK).unwrap(),
    };
    let result = dev.activate(
        vec![queue(RX_QUEUE, rx), queue(TX_QUEUE, tx)],
        Arc::new(FakeInterrupt::default()),
    );
    (kernel, result)
}

/// A driver of a protected device that leaves ACCESS_PLATFORM out would have the kernel
/// take its I/O virtual addresses as warden's own: the rings never reach the kernel, whoever
/// let the features through.
#[test]
fn behind_the_iommu_the_kernel_never_starts_without_access_platform() {
    let mem = iommu_memory();
    let (kernel, result) = activate_with(
        &mem,
        true,
        |offered| offered & !(1 << VIRTIO_F_ACCESS_PLATFORM),
        None,
    );
    assert!(
        matches!(result, Err(ActivateError::Refused(_))),
        "{result:?}"
    );
    assert!(
        !kernel
            .calls()
            .iter()
            .any(|c| matches!(c, Call::Ring(..) | Call::Tap(_, Some(_)) | Call::Memory)),
        "{:?}",
        kernel.calls()
    );
}

/// Outside the IOMMU the kernel gets host addresses and writes a whole used ring from the
/// one it is given: a ring that starts inside guest RAM but runs past the end of its region
/// is refused before the kernel sees any ring (the check was of the first byte only).
#[test]
fn a_ring_running_past_its_ram_region_is_refused() {
    let mem = guest_memory();
    let end = 0x10_0000u64;
    // The used ring's index fits, its entries do not.
    let (kernel, result) = activate_with(&mem, false, |offered| offered, Some(end - 4));
    assert!(
        matches!(
            result,
            Err(ActivateError::RingOutsideRam {
                ring: "used ring",
                ..
            })
        ),
        "{result:?}"
    );
    assert!(
        !kernel.calls().iter().any(|c| matches!(c, Call::Ring(..))),
        "{:?}",
        kernel.calls()
    );
    // The last place a whole used ring fits is accepted.
    let [_, _, used_len] = crate::host_rings::ring_lengths(QUEUE_SIZE, true);
    let last = (end - used_len) & !3;
    let (kernel, result) = activate_with(&mem, false, |offered| offered, Some(last));
    assert!(result.is_ok(), "{result:?}");
    assert!(kernel.calls().iter().any(|c| matches!(c, Call::Ring(..))));
}
