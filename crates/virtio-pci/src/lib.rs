//! The modern virtio-pci transport (virtio 1.x only, no legacy interface).
//!
//! [`VirtioPciDevice`] wraps a [`virtio_devices::VirtioDevice`] in a PCI function the Linux
//! `virtio_pci` driver binds to: vendor-specific capabilities locate the common configuration,
//! notification, ISR and device-configuration structures in one 64-bit BAR, whose tail also
//! holds the MSI-X table and PBA (one vector per queue plus one for configuration changes).
//! The transport negotiates features, collects queue configuration, and on DRIVER_OK hands the
//! device its queues together with a [`virtio_devices::VirtioInterrupt`] that routes each
//! queue to the MSI-X vector the driver chose.

mod interrupt;
mod transport;

pub use transport::{
    msix_vectors, VirtioPciDevice, NOTIFY_OFF_MULTIPLIER, VIRTIO_MSI_NO_VECTOR,
    VIRTIO_PCI_DEVICE_ID_BASE, VIRTIO_PCI_VENDOR_ID,
};

/// Why a virtio device cannot be put behind the transport.
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    #[error("device does not offer VIRTIO_F_VERSION_1, which a modern-only transport requires")]
    VersionOneMissing,
    #[error("queue {index} has maximum size {size}: not a power of two in 1..=32768")]
    QueueSizeInvalid { index: usize, size: u16 },
    #[error("device has {0} queues; the transport supports 1..=1024")]
    QueueCountInvalid(usize),
    #[error("PCI setup failed: {0}")]
    Pci(#[from] pci::PciError),
    #[error("cannot create a queue notifier: {0}")]
    EventFd(#[source] std::io::Error),
}
