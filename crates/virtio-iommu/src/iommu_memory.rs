//! `vm_memory::Iommu` for one endpoint, so a protected device's memory can be built as
//! `IommuMemory<GuestMemoryMmap, EndpointIommu>` and every descriptor, ring and buffer access
//! virtio-queue makes for that device is translated (and refused when unmapped).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use vm_memory::iommu::{Error as IommuError, IotlbIterator, IovaRange};
use vm_memory::{GuestAddress, Iommu, Iotlb, Permissions};

use crate::device::{perms_of, read_lock, EndpointShared, FaultReason, MappedBlock, VirtioIommu};
use crate::inflight::{DmaFence, DmaGuard, Footprint};
use crate::iotlb::IotlbGuard;
use crate::table::{PERM_READ, PERM_WRITE};

/// How many times a miss is refilled before giving up: a refill can only be lost to an
/// UNMAP racing with it, and an UNMAP makes the next fill fault for real.
const FILL_ATTEMPTS: usize = 3;

/// The IOMMU seen by one endpoint: a per-endpoint IOTLB in front of the device model. The
/// IOTLB holds at most [`crate::IOTLB_MAX_ENTRIES`] entries, and in bypass a single identity
/// entry.
///
/// Hits only take the IOTLB read lock. Misses consult the model, which records a fault
/// (counters, event queue, notifier) and refuses when the access is not allowed.
#[derive(Debug, Clone)]
pub struct EndpointIommu {
    device: Arc<VirtioIommu>,
    endpoint: u32,
    shared: Arc<EndpointShared>,
}

impl EndpointIommu {
    /// The IOMMU of a registered endpoint; `None` if `endpoint` is not registered.
    pub fn new(device: Arc<VirtioIommu>, endpoint: u32) -> Option<Self> {
        let shared = device.endpoint_shared(endpoint)?;
        Some(EndpointIommu {
            device,
            endpoint,
            shared,
        })
    }

    /// The endpoint ID this IOMMU translates for.
    pub fn endpoint(&self) -> u32 {
        self.endpoint
    }

    /// Translations served from the IOTLB without consulting the model.
    pub fn iotlb_hits(&self) -> u64 {
        self.shared.hits.load(Ordering::Relaxed)
    }
}

fn refused(iova: GuestAddress, length: usize, reason: String) -> IommuError {
    IommuError::CannotResolve {
        iova_range: IovaRange { base: iova, length },
        reason,
    }
}

impl Iommu for EndpointIommu {
    type IotlbGuard<'a> = IotlbGuard<'a>;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<Self::IotlbGuard<'_>>, IommuError> {
        // The IOTLB computes `iova + length` unchecked and cannot hold the last byte of the
        // address space: refuse such accesses up front (and report them like any fault).
        if iova.0.checked_add(length as u64).is_none() {
            let f = self
                .device
                .translate_fault_at_top(self.endpoint, iova.0, perms_of(access));
            return Err(refused(iova, length, format!("{:?}", f.reason)));
        }
        for _ in 0..FILL_ATTEMPTS {
            if let Ok(it) = Iotlb::lookup(
                IotlbGuard(read_lock(&self.shared.iotlb)),
                iova,
                length,
                access,
            ) {
                self.shared.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(it);
            }
            self.device
                .fill_iotlb(
                    self.endpoint,
                    &self.shared,
                    iova.0,
                    length as u64,
                    perms_of(access),
                )
                .map_err(|f| refused(iova, length, format!("{:?} fault", f.reason)))?;
        }
        Err(refused(
            iova,
            length,
            "mappings changed during translation".into(),
        ))
    }
}

/// An IOMMU that hands out its mappings to a data path keeping an IOTLB of its own (the
/// kernel's vhost), which must invalidate it when the IOMMU says so.
pub trait MappingLookup {
    /// Calls `fill` with the block of the mapping serving an access at `iova` with these
    /// rights (a page or larger), while no request can take it away; a refused access is reported as a fault, and its reason
    /// returned.
    fn with_mapping(
        &self,
        iova: u64,
        read: bool,
        write: bool,
        fill: &mut dyn FnMut(MappedBlock),
    ) -> Result<(), FaultReason>;
}

impl MappingLookup for EndpointIommu {
    fn with_mapping(
        &self,
        iova: u64,
        read: bool,
        write: bool,
        fill: &mut dyn FnMut(MappedBlock),
    ) -> Result<(), FaultReason> {
        let need = (if read { PERM_READ } else { 0 }) | (if write { PERM_WRITE } else { 0 });
        self.device
            .with_mapping(self.endpoint, iova, need, fill)
            .map_err(|f| f.reason)
    }
}

impl DmaFence for EndpointIommu {
    fn begin_dma(&self, footprint: Footprint) -> DmaGuard {
        self.shared.dma.begin(footprint)
    }
}
