//! The per-endpoint IOTLB: vm-memory's `Iotlb` with a bound on its entries. What goes in is
//! the guest's choice (every miss fill and every MAP prefill adds), and the range map never
//! evicts, so without a bound a guest could grow host memory without limit.

use std::ops::Deref;
use std::sync::RwLockReadGuard;

use vm_memory::{GuestAddress, Iotlb, Permissions};

/// Most entries an endpoint IOTLB holds: about 40 bytes each in the range map, so at most
/// ~650 KiB per endpoint. Room for MAP's prefill of 4096 mappings per domain twice over;
/// past it the IOTLB is emptied and refilled on demand.
pub const IOTLB_MAX_ENTRIES: usize = 16384;

/// An IOTLB and an upper bound on its entries. `Iotlb` has no length, so the bound counts what
/// each change can add: an insert removes what it covers and splits at most one entry (+2), an
/// invalidation splits at most one (+1). A change that could pass the maximum empties the IOTLB
/// first; misses bring back what is still used.
#[derive(Debug, Default)]
pub(crate) struct EndpointIotlb {
    tlb: Iotlb,
    bound: usize,
}

impl EndpointIotlb {
    /// Makes room for a change adding up to `added` entries.
    fn reserve(&mut self, added: usize) {
        if self.bound + added > IOTLB_MAX_ENTRIES {
            self.invalidate_all();
        }
        self.bound += added;
    }

    /// Puts `[start, end]` -> `phys` in. The IOTLB cannot hold the last byte of the 64-bit
    /// space (`EndpointIommu` refuses accesses reaching it), so entries stop short of it.
    pub(crate) fn insert(&mut self, start: u64, end: u64, phys: u64, perms: Permissions) {
        self.reserve(2);
        // Cannot fail: set_mapping only reports errors for invalid permissions.
        let _ = self.tlb.set_mapping(
            GuestAddress(start),
            GuestAddress(phys),
            len(start, end),
            perms,
        );
    }

    /// Drops whatever is cached for `[start, end]`.
    pub(crate) fn invalidate(&mut self, start: u64, end: u64) {
        self.reserve(1);
        self.tlb
            .invalidate_mapping(GuestAddress(start), len(start, end));
    }

    pub(crate) fn invalidate_all(&mut self) {
        self.tlb.invalidate_all();
        self.bound = 0;
    }
}

/// The entry length for `[start, end]`, short of the last byte of the address space so that
/// it cannot overflow.
fn len(start: u64, end: u64) -> usize {
    (end.min(u64::MAX - 1) - start + 1) as usize
}

/// A read lock on an endpoint IOTLB, as `vm_memory::Iommu` wants it: the `Iotlb` itself.
#[derive(Debug)]
pub struct IotlbGuard<'a>(pub(crate) RwLockReadGuard<'a, EndpointIotlb>);

impl Deref for IotlbGuard<'_> {
    type Target = Iotlb;

    fn deref(&self) -> &Iotlb {
        &self.0.tlb
    }
}
