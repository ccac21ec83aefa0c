//! The kernel's vhost-net as the data path (`--net ...,vhost=on`): each queue pair's rings are
//! handed to a vhost-net instance that moves frames between them and the pair's tap queue in a
//! kernel thread, so a frame costs no exit to warden and no copy through it. Warden keeps the
//! configuration space, the control queue, and one thread per device that turns the kernel's
//! "call" eventfds into interrupts and answers its IOTLB misses.
//!
//! Behind the IOMMU the kernel translates through a device IOTLB of its own: the driver's I/O
//! virtual addresses (rings included) go to the kernel as they are, and
//! - a miss is answered with the block of the mapping that serves it (its page), looked up in
//!   the virtio-iommu with its state locked ([`virtio_iommu::MappingLookup`]), or refused and reported as a
//!   fault;
//! - every mapping the guest takes away (UNMAP, DETACH, an ATTACH elsewhere, bypass turned off)
//!   is invalidated in the kernel before the request completes, through the endpoint's
//!   [`ExternalMapper`] ([`VhostIotlb`]), which the model calls under the same lock; a MAP is
//!   sent ahead, so that most accesses never miss.
//!
//! Interrupts go through warden's [`VirtioInterrupt`] rather than straight from the kernel to
//! KVM: the driver may move a queue to another MSI-X vector at any time, which the transport
//! tracks, and the thread costs one wake-up per interrupt the kernel asks for.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use net_util::{IotlbMiss, RingAddresses, VhostNet};
use virtio_bindings::virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_iommu::{ExternalMapper, MapPerms, MappedBlock, MapperError};
use virtio_queue::{Queue, QueueT};
use vm_device::warn_limited;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::control::ControlQueue;
use super::NetBackend;
use crate::host_rings::{host_ring_addresses, ring_lengths};
use crate::worker::{Poller, WorkerHandler};
use crate::{ActivateError, DeviceMemory, VirtioInterrupt};

/// The features of the rings the kernel serves; the others (offloads, MAC, queue pairs) are
/// the tap's or warden's.
pub(super) const RING_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_F_ACCESS_PLATFORM)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << VIRTIO_NET_F_MRG_RXBUF);

/// Receive ring of a vhost-net instance (its pair's `2n`), then transmit (`2n + 1`).
const RINGS: [usize; 2] = [0, 1];

/// One vhost-net instance, as the device drives it (in warden [`VhostNet`]; the tests fake
/// it).
pub trait VhostKernel: AsRawFd + Send + Sync + 'static {
    /// The virtio features the kernel's data path implements.
    fn supported_features(&self) -> io::Result<u64>;
    /// Starts the kernel on the ring features the driver accepted.
    fn set_acked_features(&self, features: u64) -> io::Result<()>;
    /// Hands the kernel all of guest RAM.
    fn set_guest_memory(&self) -> io::Result<()>;
    /// Sets up ring `index` (0 receive, 1 transmit).
    fn set_ring(
        &self,
        index: usize,
        size: u16,
        next_avail: u16,
        addresses: RingAddresses,
        kick: &EventFd,
        call: &EventFd,
    ) -> io::Result<()>;
    /// Starts ring `index` on a tap queue, or stops it.
    fn set_tap(&self, index: usize, tap: Option<RawFd>) -> io::Result<()>;
    /// Tells the device IOTLB that `[iova, iova + size)` is at host address `host`.
    fn iotlb_update(
        &self,
        iova: u64,
        size: u64,
        host: u64,
        read: bool,
        write: bool,
    ) -> io::Result<()>;
    /// Makes the device IOTLB forget `[iova, iova + size)`.
    fn iotlb_invalidate(&self, iova: u64, size: u64) -> io::Result<()>;
    /// The next miss the kernel reported, if any.
    fn next_miss(&self) -> io::Result<Option<IotlbMiss>>;
}

impl VhostKernel for VhostNet {
    fn supported_features(&self) -> io::Result<u64> {
        VhostNet::supported_features(self)
    }

    fn set_acked_features(&self, features: u64) -> io::Result<()> {
        VhostNet::set_acked_features(self, features)
    }

    fn set_guest_memory(&self) -> io::Result<()> {
        VhostNet::set_guest_memory(self)
    }

    fn set_ring(
        &self,
        index: usize,
        size: u16,
        next_avail: u16,
        addresses: RingAddresses,
        kick: &EventFd,
        call: &EventFd,
    ) -> io::Result<()> {
        VhostNet::set_ring(self, index, size, next_avail, addresses, kick, call)
    }

    fn set_tap(&self, index: usize, tap: Option<RawFd>) -> io::Result<()> {
        VhostNet::set_tap(self, index, tap)
    }

    fn iotlb_update(
        &self,
        iova: u64,
        size: u64,
        host: u64,
        read: bool,
        write: bool,
    ) -> io::Result<()> {
        VhostNet::iotlb_update(self, iova, size, host, read, write)
    }

    fn iotlb_invalidate(&self, iova: u64, size: u64) -> io::Result<()> {
        VhostNet::iotlb_invalidate(self, iova, size)
    }

    fn next_miss(&self) -> io::Result<Option<IotlbMiss>> {
        VhostNet::next_miss(self)
    }
}

/// Sets up every pair's rings on its vhost-net instance and tap queue; returns the eventfds
/// the kernel signals, by queue index, for [`VhostRelay`].
pub(super) fn start_pairs<M: DeviceMemory>(
    mem: &M,
    kernels: &[Arc<dyn VhostKernel>],
    taps: impl Fn(usize) -> RawFd,
    pairs: Vec<[(usize, Queue, EventFd); 2]>,
    acked: u64,
) -> Result<Vec<(usize, EventFd)>, ActivateError> {
    let io = ActivateError::Io;
    // The kernel translates through its IOTLB exactly when ACCESS_PLATFORM is among the
    // features it is given; without it, it takes ring and buffer addresses as warden's own.
    // That must be what the memory says: the transport refuses a driver that leaves the bit
    // out behind the IOMMU, and this holds whoever calls.
    let translated = mem.mappings().is_some();
    if translated != (acked & (1 << VIRTIO_F_ACCESS_PLATFORM) != 0) {
        return Err(ActivateError::Refused(if translated {
            "the device is behind the IOMMU but the driver did not accept ACCESS_PLATFORM"
        } else {
            "ACCESS_PLATFORM accepted by a device outside the IOMMU"
        }));
    }
    let event_idx = acked & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
    let mut calls = Vec::with_capacity(2 * pairs.len());
    for (pair, rings) in pairs.into_iter().enumerate() {
        let kernel = &kernels[pair];
        kernel
            .set_acked_features(acked & RING_FEATURES)
            .map_err(io)?;
        kernel.set_guest_memory().map_err(io)?;
        for (ring, (index, queue, kick)) in RINGS.into_iter().zip(rings) {
            let call = EventFd::new(EFD_NONBLOCK).map_err(io)?;
            let addresses = ring_addresses(mem, &queue, event_idx)?;
            // The kernel reads and writes the used ring as the tap is set, before it would
            // ask: the ring's translations must already be in its (new, empty) IOTLB.
            prefill_ring(mem, kernel.as_ref(), &queue);
            kernel
                .set_ring(
                    ring,
                    queue.size(),
                    queue.next_avail(),
                    addresses,
                    &kick,
                    &call,
                )
                .map_err(io)?;
            kernel.set_tap(ring, Some(taps(pair))).map_err(io)?;
            calls.push((index, call));
        }
    }
    Ok(calls)
}

/// Stops every ring: the kernel touches guest memory no more once this returns.
pub(super) fn stop_pairs(kernels: &[Arc<dyn VhostKernel>]) {
    for kernel in kernels {
        for ring in RINGS {
            match kernel.set_tap(ring, None) {
                // A ring never set up: the kernel checks its addresses first.
                Err(err) if err.raw_os_error() == Some(libc::EFAULT) => {}
                Err(err) => warn_limited!("vhost-net: cannot stop ring {ring}: {err}"),
                Ok(()) => {}
            }
        }
    }
}

/// Behind the IOMMU, sends the kernel the translations of every page of `queue`'s rings (as
/// QEMU does for the used ring before it starts a vhost device).
fn prefill_ring<M: DeviceMemory>(mem: &M, kernel: &dyn VhostKernel, queue: &Queue) {
    if mem.mappings().is_none() {
        return;
    }
    let [desc_len, avail_len, used_len] = ring_lengths(queue.size(), true);
    let rings = [
        (queue.desc_table(), desc_len, false),
        (queue.avail_ring(), avail_len, false),
        (queue.used_ring(), used_len, true),
    ];
    for (start, len, write) in rings {
        let mut page = start & !(PAGE_SIZE - 1);
        while page < start.saturating_add(len) {
            answer_miss(
                mem,
                kernel,
                IotlbMiss {
                    iova: page.max(start),
                    read: true,
                    write,
                },
            );
            page = match page.checked_add(PAGE_SIZE) {
                Some(next) => next,
                None => break,
            };
        }
    }
}

/// The smallest page the virtio-iommu maps.
const PAGE_SIZE: u64 = 4096;

/// Where the kernel finds `queue`: the driver's addresses as they are behind the IOMMU (the
/// device IOTLB translates them, and refuses what is not mapped), else host addresses of
/// guest RAM ([`host_ring_addresses`]).
fn ring_addresses<M: DeviceMemory>(
    mem: &M,
    queue: &Queue,
    event_idx: bool,
) -> Result<RingAddresses, ActivateError> {
    if mem.mappings().is_some() {
        let (desc, avail, used) = (queue.desc_table(), queue.avail_ring(), queue.used_ring());
        return Ok(RingAddresses { desc, avail, used });
    }
    host_ring_addresses(mem.ram(), queue, event_idx)
}

/// The device's thread beside the kernel's: interrupts for the rings, IOTLB misses, and the
/// control queue when there are several pairs.
pub(super) struct VhostRelay<M, B> {
    pub(super) mem: M,
    pub(super) kernels: Vec<Arc<dyn VhostKernel>>,
    pub(super) interrupt: Arc<dyn VirtioInterrupt>,
    /// The control queue's index and handler.
    pub(super) control: Option<(usize, ControlQueue<B>)>,
}

impl<M: DeviceMemory, B: NetBackend> WorkerHandler for VhostRelay<M, B> {
    fn start(&mut self, poller: &Poller) -> io::Result<()> {
        if self.mem.mappings().is_none() {
            return Ok(());
        }
        for (pair, kernel) in self.kernels.iter().enumerate() {
            poller.add(kernel.as_raw_fd(), pair as u32)?;
        }
        Ok(())
    }

    fn queue_notified(&mut self, index: usize, poller: &Poller) {
        match &mut self.control {
            Some((control_index, control)) if *control_index == index => {
                control.serve(&self.mem, poller)
            }
            _ => {
                if let Err(err) = self.interrupt.notify_queue(index) {
                    warn_limited!("vhost-net: cannot interrupt for queue {index}: {err}");
                }
            }
        }
    }

    fn fd_ready(&mut self, token: u32, _poller: &Poller) {
        let Some(kernel) = self.kernels.get(token as usize) else {
            return;
        };
        loop {
            match kernel.next_miss() {
                Ok(Some(miss)) => answer_miss(&self.mem, kernel.as_ref(), miss),
                Ok(None) => return,
                Err(err) => {
                    warn_limited!("vhost-net: cannot read the kernel's IOTLB messages: {err}");
                    return;
                }
            }
        }
    }
}

/// Answers a miss with the mapping block that serves it, clipped to the RAM region it lands in; a
/// refused access (already counted and reported as a fault) gets no answer, and the ring
/// waits, as a device's DMA to an unmapped address fails.
fn answer_miss<M: DeviceMemory>(mem: &M, kernel: &dyn VhostKernel, miss: IotlbMiss) {
    let Some(mappings) = mem.mappings() else {
        return;
    };
    let ram = mem.ram();
    let result = mappings.with_mapping(miss.iova, miss.read, miss.write, &mut |block| {
        let Some((iova, size, host)) = host_span(ram, &block, miss.iova) else {
            warn_limited!(
                "vhost-net: IOVA {:#x} is mapped outside guest RAM; the kernel cannot reach it",
                miss.iova
            );
            return;
        };
        if let Err(err) = kernel.iotlb_update(iova, size, host, block.read, block.write) {
            warn_limited!(
                "vhost-net: cannot answer the miss at {:#x}: {err}",
                miss.iova
            );
        }
    });
    if let Err(reason) = result {
        warn_limited!(
            "vhost-net: access at {:#x} refused ({reason:?}), reported as a fault",
            miss.iova
        );
    }
}

/// The part of `block` around `iova` that one RAM region backs: `(iova, size, host address)`.
fn host_span(ram: &GuestMemoryMmap, block: &MappedBlock, iova: u64) -> Option<(u64, u64, u64)> {
    let gpa = block.gpa.checked_add(iova - block.first)?;
    let region = ram.find_region(GuestAddress(gpa))?;
    let region_start = region.start_addr().0;
    let region_last = region_start + (region.len() - 1);
    let first = block.first.max(iova.saturating_sub(gpa - region_start));
    let last = block.last.min(iova.saturating_add(region_last - gpa));
    let first_gpa = gpa - (iova - first);
    let host = region.as_ptr() as u64 + (first_gpa - region_start);
    Some((first, last - first + 1, host))
}

/// The kernels' device IOTLBs as an endpoint's mapper: whatever the guest maps is sent ahead,
/// whatever it takes away is invalidated before its request completes.
pub struct VhostIotlb {
    kernels: Vec<Arc<dyn VhostKernel>>,
    ram: GuestMemoryMmap,
}

impl VhostIotlb {
    pub fn new(kernels: Vec<Arc<dyn VhostKernel>>, ram: GuestMemoryMmap) -> Self {
        VhostIotlb { kernels, ram }
    }

    /// Sends `[iova, iova + size)` at `gpa` ahead, one update per RAM region it covers. An
    /// update that fails (no IOTLB before the driver's features, or the kernel's IOTLB
    /// full) costs only a miss later.
    fn update(&self, iova: u64, gpa: u64, size: u64, read: bool, write: bool) {
        let mut done = 0;
        while done < size {
            let block = MappedBlock {
                first: iova,
                last: iova + (size - 1),
                gpa,
                read,
                write,
            };
            let Some((first, len, host)) = host_span(&self.ram, &block, iova + done) else {
                return;
            };
            for kernel in &self.kernels {
                let _ = kernel.iotlb_update(first, len, host, read, write);
            }
            done = first - iova + len;
        }
    }

    fn invalidate(&self, iova: u64, size: u64) -> Result<(), MapperError> {
        for kernel in &self.kernels {
            match kernel.iotlb_invalidate(iova, size) {
                // No device IOTLB yet (the driver has not started the device): nothing cached.
                Err(err) if err.raw_os_error() == Some(libc::EFAULT) => {}
                Err(err) => {
                    return Err(MapperError::Failed(format!(
                        "vhost-net IOTLB invalidation at {iova:#x}: {err}"
                    )))
                }
                Ok(()) => {}
            }
        }
        Ok(())
    }
}

impl ExternalMapper for VhostIotlb {
    fn map(&self, iova: u64, gpa: u64, size: u64, perms: MapPerms) -> Result<(), MapperError> {
        self.update(iova, gpa, size, perms.read, perms.write);
        Ok(())
    }

    fn unmap(&self, iova: u64, size: u64) -> Result<(), MapperError> {
        self.invalidate(iova, size)
    }

    fn set_identity(&self, enabled: bool) -> Result<(), MapperError> {
        if enabled {
            for region in self.ram.iter() {
                let start = region.start_addr().0;
                self.update(start, start, region.len(), true, true);
            }
            return Ok(());
        }
        self.invalidate(0, u64::MAX)
    }
}
