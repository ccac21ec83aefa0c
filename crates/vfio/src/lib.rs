//! VFIO passthrough: a host PCI function given to the guest.
//!
//! - [`container`]: the host VFIO container, behind the [`DmaContainer`] seam;
//! - [`mapper`]: [`VfioMapper`], the device's DMA mappings as the host IOMMU sees them, either
//!   all guest RAM at start or mirrored from the virtio-iommu (an
//!   [`virtio_iommu::ExternalMapper`]), with the host's entry limit and statistics;
//! - [`device`]: [`VfioPciDevice`], the function on warden's PCI bus (configuration space
//!   forwarded with BARs and MSI-X emulated, BARs trapped or mapped into the guest);
//! - [`open`]: opening a device from its sysfs path, with the checks that turn the usual host
//!   mistakes into one-line errors.

pub mod container;
pub mod device;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod mapper;
pub mod open;

pub use container::{DmaContainer, HostContainer, HostIommuInfo};
pub use device::{BarMmap, VfioPciDevice};
pub use mapper::{host_dma_entry_limit, VfioMapper, VfioStats, DMA_ENTRY_LIMIT_PATH};
pub use open::{open, OpenError, OpenedDevice};
/// The VM's KVM VFIO device, as [`open`] takes it.
pub use vfio_ioctls::VfioDeviceFd;
