//! Virtio device back-ends, independent of the transport that carries them.
//!
//! A device here sees queues and guest memory, never PCI registers: the virtio-pci transport
//! (crate `virtio-pci`) owns feature negotiation, queue configuration and interrupt vectors, and
//! hands a device its ready queues on DRIVER_OK through [`VirtioDevice::activate`].

use std::fmt;
use std::io;
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

/// Raised by a device to tell the driver about used buffers or a config change.
///
/// The transport maps a queue to the MSI-X vector the driver chose for it, so devices need not
/// know about vectors at all.
pub trait VirtioInterrupt: Send + Sync {
    /// Signals that queue `queue_index` has new used buffers.
    fn notify_queue(&self, queue_index: usize) -> io::Result<()>;
    /// Signals that the device configuration space changed.
    fn notify_config(&self) -> io::Result<()>;
}

/// A queue the driver enabled, handed to the device on activation.
pub struct ActivatedQueue {
    /// Index of the queue in the device's queue list.
    pub index: usize,
    /// The queue with the addresses and size the driver configured.
    pub queue: Queue,
    /// Written (by KVM through an ioeventfd, or by the transport) when the driver notifies.
    pub notifier: EventFd,
}

/// Why a device could not start.
#[derive(Debug)]
pub enum ActivateError {
    /// The driver did not enable a queue the device needs.
    MissingQueue(usize),
    /// The worker could not be started.
    Io(io::Error),
}

impl fmt::Display for ActivateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ActivateError::MissingQueue(index) => write!(f, "queue {index} was not enabled"),
            ActivateError::Io(err) => write!(f, "cannot start device worker: {err}"),
        }
    }
}

impl std::error::Error for ActivateError {}

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
    /// Stops processing and forgets the queues (the driver reset the device); returns only once
    /// no worker touches guest memory any more.
    fn reset(&mut self);
}
