//! virtio-iommu device model for warden.
//!
//! The crate holds the device's whole behaviour and no I/O of its own: guest memory is
//! reached through `vm-memory`, queues through `virtio-queue`, and the outside world through
//! three thin adapter points:
//! - **queues**: [`VirtioIommu::process_request_queue`] and
//!   [`VirtioIommu::process_event_queue`], plus a [`FaultNotifier`] telling the VMM that
//!   faults wait for the event queue;
//! - **translation**: [`VirtioIommu::translate`] for device models that translate explicitly,
//!   and [`EndpointIommu`] (`vm_memory::Iommu`) for devices whose memory is an
//!   `IommuMemory<GuestMemoryMmap, EndpointIommu>`;
//! - **external mappers**: [`ExternalMapper`], registered per endpoint, mirrors a domain's
//!   mappings into e.g. a VFIO container.
//!
//! Fuzzing: see `README.md` in this crate.

mod device;
pub mod inflight;
mod iommu_memory;
mod iotlb;
pub mod mapper;
pub mod protocol;
mod queue;
mod seqlock;
mod stats;
pub mod table;

#[cfg(test)]
mod race_tests;
/// The integration tests' helpers, shared with the unit tests; they name the crate, hence the
/// alias below.
#[cfg(test)]
#[path = "../tests/common/mod.rs"]
mod test_common;
#[cfg(test)]
extern crate self as virtio_iommu;

pub use device::{
    Access, ConfigError, EndpointConfig, Fault, FaultNotifier, FaultReason, GuestRange,
    IommuConfig, MappedBlock, Translation, VirtioIommu, PROTECTED_DEVICE_FEATURES,
    RETIRED_DOMAINS_KEPT, VIRTIO_F_VERSION_1,
};
pub use inflight::{DmaFence, DmaGuard, Footprint};
pub use iommu_memory::{EndpointIommu, MappingLookup};
pub use iotlb::{IotlbGuard, IOTLB_MAX_ENTRIES};
pub use mapper::{ExternalMapper, MapPerms, MapperError};
pub use protocol::{ReservedRegion, Status};
pub use queue::{Answer, ChainLayout, Error};
pub use stats::{IommuStats, StatsSnapshot};
