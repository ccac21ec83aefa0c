//! Virtio device back-ends, independent of the transport that carries them.
//!
//! A device here sees queues and guest memory, never PCI registers: the virtio-pci transport
//! (crate `virtio-pci`) owns feature negotiation, queue configuration and interrupt vectors, and
//! hands a device its ready queues on DRIVER_OK through [`VirtioDevice::activate`].
//!
//! Devices are generic over the memory they access ([`DeviceMemory`]): plain guest RAM
//! (`GuestMemoryMmap`) for a device outside the IOMMU, or `vm_memory::IommuMemory` for one
//! behind it, where every access is translated and permission-checked. Each device is
//! monomorphised for its memory type, so the unprotected path pays nothing for the IOMMU.

use std::io;
use std::sync::Arc;

use virtio_bindings::virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_iommu::{DmaFence, DmaGuard, Footprint, MappingLookup};
use virtio_queue::Queue;
use vm_memory::{GuestMemory, GuestMemoryMmap, IommuMemory};
use vmm_sys_util::eventfd::EventFd;

pub mod block;
mod buffers;
pub mod console;
mod counters;
mod device_queue;
pub mod fs;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod host_rings;
pub mod iommu;
pub mod net;
pub mod rng;
#[cfg(test)]
mod test_utils;
pub mod vsock;
mod worker;

pub use block::{Block, BlockError, BlockOptions};
pub use console::Console;
pub use counters::DeviceCounters;
pub use fs::{Fs, FsBackend, FsError, VhostUserConnection};
pub use iommu::{Iommu, PollConfig};
pub use net::{Net, NetBackend, NetOptions};
pub use rng::{Rng, RngError};
pub use vsock::{Vsock, VsockError};
pub use worker::{set_thread_start_hook, DeviceThread, ThreadStartHook};

/// The memory a device reads and writes guest buffers through: the device's I/O address space.
///
/// Implemented by `GuestMemoryMmap` (direct access to guest RAM) and by
/// `IommuMemory<GuestMemoryMmap, I>` (every access translated by a virtual IOMMU). The device
/// keeps its own clone and hands another to its worker thread.
///
/// Without dirty-page tracking (`Bitmap = ()`): an asynchronous disk read lands after the
/// slices it was translated to are gone, so nothing could mark those pages dirty.
pub trait DeviceMemory: GuestMemory<Bitmap = ()> + Clone + Send + Sync + 'static {
    /// Starts one transfer (a request, a frame) that touches no I/O address outside
    /// `footprint`: held from before its first translation until its last byte moved, it makes
    /// an UNMAP of any of those addresses wait for it (see `virtio_iommu::inflight`). `None`
    /// where nothing translates.
    fn begin_dma_within(&self, footprint: Footprint) -> Option<DmaGuard>;
    /// [`DeviceMemory::begin_dma_within`] for a transfer whose buffers are not known up front:
    /// every UNMAP waits for it.
    fn begin_dma(&self) -> Option<DmaGuard> {
        self.begin_dma_within(Footprint::EVERYTHING)
    }
    /// Guest RAM itself, for a data path the kernel runs (vhost-net), which reaches it by
    /// host address.
    fn ram(&self) -> &GuestMemoryMmap;
    /// Where such a data path gets the mappings it may use: the IOMMU in front of this
    /// memory, `None` where nothing translates.
    fn mappings(&self) -> Option<&dyn MappingLookup>;
}

impl DeviceMemory for GuestMemoryMmap {
    fn begin_dma_within(&self, _footprint: Footprint) -> Option<DmaGuard> {
        None
    }

    fn ram(&self) -> &GuestMemoryMmap {
        self
    }

    fn mappings(&self) -> Option<&dyn MappingLookup> {
        None
    }
}

impl<I> DeviceMemory for IommuMemory<GuestMemoryMmap, I>
where
    I: vm_memory::Iommu + DmaFence + MappingLookup + Send + Sync + 'static,
{
    fn begin_dma_within(&self, footprint: Footprint) -> Option<DmaGuard> {
        self.get_iommu_enabled()
            .then(|| self.iommu().begin_dma(footprint))
    }

    fn ram(&self) -> &GuestMemoryMmap {
        self.get_backend()
    }

    fn mappings(&self) -> Option<&dyn MappingLookup> {
        let iommu: &dyn MappingLookup = self.iommu().as_ref();
        self.get_iommu_enabled().then_some(iommu)
    }
}

/// Feature bits every device here offers. `access_platform` is set for a device behind the
/// IOMMU, so the driver uses DMA addresses rather than guest-physical ones.
///
/// Indirect descriptor tables are offered to unprotected devices only: behind the IOMMU the
/// driver maps each table for DMA, one more synchronous MAP request per I/O (a quarter of
/// the four a 4 KiB read otherwise costs), to save ring slots a virtio-blk queue rarely lacks.
fn common_features(access_platform: bool) -> u64 {
    let mut features = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX);
    if access_platform {
        features |= 1 << VIRTIO_F_ACCESS_PLATFORM;
    } else {
        features |= 1 << VIRTIO_RING_F_INDIRECT_DESC;
    }
    features
}

/// Copies the bytes of `config` at `offset` into `data`; bytes past its end read as zero.
fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(offset) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(offset..) {
        let len = src.len().min(data.len());
        data[..len].copy_from_slice(&src[..len]);
    }
}

/// Takes queue `index` out of `queues`, or reports that the driver did not enable it.
fn take_queue(
    queues: &mut Vec<ActivatedQueue>,
    index: usize,
) -> Result<ActivatedQueue, ActivateError> {
    let position = queues
        .iter()
        .position(|q| q.index == index)
        .ok_or(ActivateError::MissingQueue(index))?;
    Ok(queues.swap_remove(position))
}

/// Raised by a device to tell the driver about used buffers or a config change.
///
/// The transport maps a queue to the MSI-X vector the driver chose for it, so devices need not
/// know about vectors at all.
pub trait VirtioInterrupt: Send + Sync {
    /// Signals that queue `queue_index` has new used buffers.
    fn notify_queue(&self, queue_index: usize) -> io::Result<()>;
    /// Signals that the device configuration space changed.
    fn notify_config(&self) -> io::Result<()>;
    /// Tells the driver the device stopped serving until it is reset, because the driver broke
    /// a queue (virtio 1.2 §2.1.2): the transport sets DEVICE_NEEDS_RESET in the device status
    /// and signals a configuration change, once until the next reset.
    fn needs_reset(&self) -> io::Result<()>;
    /// An eventfd that raises queue `queue_index`'s interrupt when written, for a data path
    /// in another process (a vhost-user back end) to signal without a hop through warden: the
    /// irqfd of the MSI-X vector the driver gave the queue. `None` where there is none (no
    /// vector yet, or an interrupt not delivered through KVM); the device relays then.
    ///
    /// Such writes bypass the MSI-X table's mask bits (a masked vector still fires), which
    /// only the driver of that device can observe.
    fn queue_irqfd(&self, _queue_index: usize) -> Option<EventFd> {
        None
    }
}

/// A queue the driver enabled, handed to the device on activation.
pub struct ActivatedQueue {
    /// Index of the queue in the device's queue list.
    pub index: usize,
    /// The queue with the addresses and size the driver configured. The transport need not
    /// call `set_event_idx`: the device applies `VIRTIO_RING_F_EVENT_IDX` from the features it
    /// was given through [`VirtioDevice::ack_features`].
    pub queue: Queue,
    /// Written (by KVM through an ioeventfd, or by the transport) when the driver notifies.
    pub notifier: EventFd,
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver did not enable a queue the device needs.
    #[error("queue {0} was not enabled")]
    MissingQueue(usize),
    /// The worker could not be started.
    #[error("cannot start device worker: {0}")]
    Io(#[from] io::Error),
    /// A ring handed to a data path that reaches it by host address is not inside one RAM
    /// region.
    #[error("the {ring} ({len} bytes at {gpa:#x}) is not inside one guest RAM region")]
    RingOutsideRam {
        ring: &'static str,
        gpa: u64,
        len: u64,
    },
    /// The driver's configuration would let the device reach memory it was not granted.
    #[error("refused: {0}")]
    Refused(&'static str),
    /// The device's back-end process refused the rings, or is gone.
    #[error(transparent)]
    Backend(#[from] vhost_user::Error),
}

/// The behaviour of one virtio device type, as the transport sees it.
pub trait VirtioDevice: Send {
    /// Virtio device ID (`VIRTIO_ID_*`).
    fn device_type(&self) -> u32;
    /// Maximum size of each of the device's queues; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered to the driver (including `VIRTIO_F_VERSION_1`, and
    /// `VIRTIO_F_ACCESS_PLATFORM` when the device sits behind the IOMMU).
    fn features(&self) -> u64;
    /// The features the driver accepted: always a subset of [`VirtioDevice::features`].
    fn ack_features(&mut self, features: u64);
    /// Reads the device-specific configuration space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space; writes to read-only fields are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts processing the queues (the driver set DRIVER_OK).
    fn activate(
        &mut self,
        queues: Vec<ActivatedQueue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError>;
    /// Whether notifications of queue `index` are served on the notifying vCPU's own thread
    /// (through [`VirtioDevice::serve_inline`]) instead of by a worker woken through an
    /// ioeventfd. The transport then exposes no ioeventfd for that queue.
    fn serves_inline(&self, _index: usize) -> bool {
        false
    }
    /// Serves a notification of queue `index` on the calling vCPU thread.
    fn serve_inline(&mut self, _index: usize) {}
    /// The counters the device keeps for `vm.counters`, shared with its threads: the VMM
    /// reads them while the device runs. `None` for a device that counts nothing.
    fn counters(&self) -> Option<Arc<dyn DeviceCounters>> {
        None
    }
    /// Stops processing and forgets the queues (the driver reset the device); returns only once
    /// no worker touches guest memory any more.
    fn reset(&mut self);
}
