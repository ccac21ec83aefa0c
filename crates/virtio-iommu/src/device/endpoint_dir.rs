//! Endpoint ID -> binding, as lock-free translations read it: the directory of
//! [`EndpointSlot`]s and how a binding is published.

use std::sync::atomic::{AtomicPtr, AtomicU32, Ordering};

use super::{State, VirtioIommu};
use crate::seqlock::SeqCount;
use crate::table::RadixRoot;
/// Endpoint bindings as lock-free readers see them ([`EndpointSlot::kind`]).
pub(super) const BIND_UNREGISTERED: u32 = 0;
/// Unattached, global bypass off: every access faults (locked path).
pub(super) const BIND_FAULT: u32 = 1;
/// Unattached, global bypass on: identity, counted in the device totals.
pub(super) const BIND_BYPASS: u32 = 2;
/// Attached to a translating domain whose table is [`EndpointSlot::table`].
pub(super) const BIND_DOMAIN: u32 = 3;
/// Attached to a bypass domain: identity, counted in [`EndpointSlot::table`]'s hits.
pub(super) const BIND_BYPASS_DOMAIN: u32 = 4;

/// What a lock-free translation needs to know about one endpoint ID, valid while `seq` is
/// even and unchanged. Written only under the state write lock.
#[derive(Debug, Default)]
pub(super) struct EndpointSlot {
    pub(super) seq: SeqCount,
    pub(super) kind: AtomicU32,
    /// The domain's table root for `BIND_DOMAIN` / `BIND_BYPASS_DOMAIN`, else null. Always
    /// null or the root of a table the device keeps until it is dropped.
    pub(super) table: AtomicPtr<RadixRoot>,
}

const DIR_LEAF_BITS: u32 = 8;
const DIR_LEAF: usize = 1 << DIR_LEAF_BITS;

struct DirLeaf([EndpointSlot; DIR_LEAF]);

/// Endpoint ID -> [`EndpointSlot`] without a lock, for IDs below 65536: a fixed array of
/// lazily allocated leaves of 256 slots. Leaves (6 KiB each) are freed only with the device,
/// and a removed endpoint's slot is kept (marked unregistered) for a reader that may still
/// look at it and for the next endpoint with that ID.
pub(super) struct EndpointDir {
    leaves: [AtomicPtr<DirLeaf>; DIR_LEAF],
}

impl EndpointDir {
    pub(super) fn new() -> Self {
        EndpointDir {
            leaves: std::array::from_fn(|_| AtomicPtr::new(std::ptr::null_mut())),
        }
    }

    #[inline]
    pub(super) fn get(&self, id: u32) -> Option<&EndpointSlot> {
        let leaf = self.leaves.get((id >> DIR_LEAF_BITS) as usize)?;
        // SAFETY: a non-null leaf pointer comes from `Box::into_raw` in `get_or_create` and
        // is freed only in `drop` (which has `&mut self`). Acquire pairs with its publication.
        let leaf = unsafe { leaf.load(Ordering::Acquire).as_ref() }?;
        Some(&leaf.0[id as usize & (DIR_LEAF - 1)])
    }

    /// The slot of `id`, allocating its leaf if needed; `None` for IDs the directory does not
    /// cover.
    fn get_or_create(&self, id: u32) -> Option<&EndpointSlot> {
        let cell = self.leaves.get((id >> DIR_LEAF_BITS) as usize)?;
        if cell.load(Ordering::Acquire).is_null() {
            let leaf = Box::into_raw(Box::new(DirLeaf(std::array::from_fn(|_| {
                EndpointSlot::default()
            }))));
            let raced = cell.compare_exchange(
                std::ptr::null_mut(),
                leaf,
                Ordering::Release,
                Ordering::Acquire,
            );
            if raced.is_err() {
                // SAFETY: `leaf` was never published, so this is its only owner.
                drop(unsafe { Box::from_raw(leaf) });
            }
        }
        self.get(id)
    }
}

impl Drop for EndpointDir {
    fn drop(&mut self) {
        for leaf in &mut self.leaves {
            let p = *leaf.get_mut();
            if !p.is_null() {
                // SAFETY: published by `get_or_create` from `Box::into_raw`, freed only here.
                drop(unsafe { Box::from_raw(p) });
            }
        }
    }
}

impl VirtioIommu {
    /// Start changing what endpoint `id` translates with: its lock-free readers retry (or
    /// take the locked path) until [`Self::publish`]. Must precede any change that could make
    /// the endpoint's published binding stale, above all destroying its domain.
    pub(super) fn unpublish(&self, id: u32) {
        if let Some(slot) = self.dir.get(id) {
            slot.seq.write_begin();
        }
    }

    /// Publish endpoint `id`'s binding as `st` now has it, ending any change in progress.
    pub(super) fn publish(&self, st: &State, id: u32) {
        let (kind, table) = match st.endpoints.get(&id) {
            None => (BIND_UNREGISTERED, std::ptr::null_mut()),
            Some(ep) => match ep.domain.map(|d| st.domains.get(&d)) {
                None if st.bypass => (BIND_BYPASS, std::ptr::null_mut()),
                None | Some(None) => (BIND_FAULT, std::ptr::null_mut()),
                Some(Some(d)) => (
                    if d.bypass {
                        BIND_BYPASS_DOMAIN
                    } else {
                        BIND_DOMAIN
                    },
                    d.table.root().as_ptr(),
                ),
            },
        };
        let slot = if kind == BIND_UNREGISTERED {
            self.dir.get(id)
        } else {
            self.dir.get_or_create(id)
        };
        if let Some(slot) = slot {
            slot.seq.write_begin();
            slot.kind.store(kind, Ordering::Relaxed);
            // Release: a reader that sees the pointer sees the table's initialisation.
            slot.table.store(table, Ordering::Release);
            slot.seq.write_end();
        }
    }
}
