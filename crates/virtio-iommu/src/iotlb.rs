//! The per-endpoint IOTLB: vm-memory's `Iotlb` with a bound on its entries. What goes in is
//! the guest's choice (every miss fill and every MAP prefill adds), and the range map never
//! evicts, so without a bound a guest could grow host memory without limit.

use std::ops::Deref;
use std::sync::RwLockReadGuard;

use vm_memory::{GuestAddress, Iotlb, Permissions};

/// Most entries an endpoint IOTLB holds: about 40 bytes each in the range map, so at most
/// ~650 KiB per endpoint. Room for MAP's prefill of 4096 mappings per domain twice over;
/// past it the IOTLB is emptied and refilled on demand. One access that covers more blocks
/// than this is still filled whole (it must hit to be served) and emptied by the next change:
/// an access is at most a descriptor, 4 GiB, so 1 M blocks of 4 KiB.
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
    /// Makes room for a change adding up to `added` entries (all of them, if more than the
    /// maximum).
    fn reserve(&mut self, added: usize) {
        if self.bound + added > IOTLB_MAX_ENTRIES {
            self.invalidate_all();
        }
        self.bound += added;
    }

    /// Puts each `[start, end]` -> `phys` in, all or none evicted by the bound: what one
    /// access needs must be there together for it to hit. The IOTLB cannot hold the last byte
    /// of the 64-bit space (`EndpointIommu` refuses accesses reaching it), so entries stop
    /// short of it.
    pub(crate) fn insert_all(&mut self, entries: &[(u64, u64, u64, Permissions)]) {
        self.reserve(2 * entries.len());
        for &(start, end, phys, perms) in entries {
            // Cannot fail: set_mapping only reports errors for invalid permissions.
            let _ = self.tlb.set_mapping(
                GuestAddress(start),
                GuestAddress(phys),
                len(start, end),
                perms,
            );
        }
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
