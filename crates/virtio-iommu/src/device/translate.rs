//! Translation of device accesses: the lock-free hit path, the locked walk that decides
//! faults, IOTLB fills, and the fault queue the event queue drains.
//!
//! A locked read path costs two atomic read-modify-writes for the lock and one for the
//! statistics counter; on x86 each is a full barrier that stops consecutive random radix walks
//! from overlapping in the CPU (83 ns instead of ~10 ns per random hit at 1 M mappings). So
//! [`VirtioIommu::translate`] first tries a path made only of loads and plain stores:
//! - endpoint ID -> [`EndpointSlot`] through `EndpointDir`, a lazily filled two-level array
//!   for IDs below 65536 (PCI BDFs); larger IDs always take the locked path;
//! - the slot holds the endpoint's binding (unregistered, unattached, bypass, or the domain's
//!   table) under a sequence count ([`SeqCount`](crate::seqlock::SeqCount)) that writers make odd around every change;
//! - the domain's radix table ([`RadixRoot`]) has its own sequence count, odd around every
//!   MAP/UNMAP/clear;
//! - a walk is kept only if neither count moved, so it equals the state at one instant;
//!   otherwise it is retried, and after [`READ_ATTEMPTS`] (or for an unregistered or
//!   unattached endpoint) the locked path decides and records faults exactly as before;
//! - a validated miss (no mapping or permission) is a fault, recorded under the read lock
//!   without walking again, provided the endpoint's binding is still the one that missed;
//! - success is counted in a [`HitCounter`](crate::stats::HitCounter) (per-thread slots, no read-modify-write).
//!
//! Memory safety does not depend on the counts: everything a reader can reach is type-stable.
//! Slots and directory leaves live until the device is dropped. A destroyed domain's table is
//! emptied and parked in `State::table_pool` for the next new domain instead of being freed,
//! since a reader may still be walking it; the counts make such a reader retry.

use std::sync::atomic::Ordering;

use vm_memory::Permissions;

use super::endpoint_dir::{EndpointSlot, BIND_BYPASS, BIND_BYPASS_DOMAIN, BIND_DOMAIN};
use super::{lock, read_lock, write_lock, EndpointShared, State, VirtioIommu};
use crate::protocol::*;
use crate::seqlock::{race_point, read_fence, RacePoint};
use crate::table::{RadixRoot, PERM_READ, PERM_WRITE};

/// Kind of a device access being translated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// The endpoint reads guest memory (DMA to the device).
    Read,
    /// The endpoint writes guest memory.
    Write,
}

impl Access {
    fn perms(self) -> u8 {
        match self {
            Access::Read => PERM_READ,
            Access::Write => PERM_WRITE,
        }
    }
}

pub(crate) fn perms_of(p: Permissions) -> u8 {
    match p {
        Permissions::No => 0,
        Permissions::Read => PERM_READ,
        Permissions::Write => PERM_WRITE,
        Permissions::ReadWrite => PERM_READ | PERM_WRITE,
    }
}

pub(super) fn permissions_from(perms: u8) -> Permissions {
    match perms & (PERM_READ | PERM_WRITE) {
        0 => Permissions::No,
        PERM_READ => Permissions::Read,
        PERM_WRITE => Permissions::Write,
        _ => Permissions::ReadWrite,
    }
}

/// Why a translation was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultReason {
    /// The endpoint is not registered with the device.
    Unknown,
    /// The endpoint is not attached to a domain and not in bypass mode.
    Domain,
    /// The address is not mapped, or not with the needed permission.
    Mapping,
}

/// A refused translation. It has been counted and, for registered endpoints, queued as an
/// event-queue FAULT record by the time the caller sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Why.
    pub reason: FaultReason,
    /// Faulting endpoint.
    pub endpoint: u32,
    /// First IOVA that could not be translated.
    pub address: u64,
    /// `PERM_*` bits the access needed.
    pub(crate) need: u8,
}

impl Fault {
    /// The event-queue record for this fault.
    pub fn record(&self) -> FaultRecord {
        let mut flags = VIRTIO_IOMMU_FAULT_F_ADDRESS;
        if self.need & PERM_READ != 0 {
            flags |= VIRTIO_IOMMU_FAULT_F_READ;
        }
        if self.need & PERM_WRITE != 0 {
            flags |= VIRTIO_IOMMU_FAULT_F_WRITE;
        }
        FaultRecord {
            reason: match self.reason {
                FaultReason::Unknown => VIRTIO_IOMMU_FAULT_R_UNKNOWN,
                FaultReason::Domain => VIRTIO_IOMMU_FAULT_R_DOMAIN,
                FaultReason::Mapping => VIRTIO_IOMMU_FAULT_R_MAPPING,
            },
            flags,
            endpoint: self.endpoint,
            address: self.address,
        }
    }
}

/// One guest-physical piece of a translated access.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestRange {
    /// Guest-physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
}

const INLINE_PIECES: usize = 2;

/// The guest-physical pieces covering a translated IOVA range, in order. Physically
/// contiguous pieces are merged; up to two pieces are stored without heap allocation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Translation {
    inline: [GuestRange; INLINE_PIECES],
    n: usize,
    spill: Vec<GuestRange>,
}

impl Translation {
    /// One piece. Built whole, not pushed: the lock-free path returns this by value, and
    /// piecewise stores read back as a whole stall store forwarding.
    #[inline]
    fn single(gpa: u64, len: u64) -> Self {
        Translation {
            inline: [GuestRange { gpa, len }, GuestRange::default()],
            n: 1,
            spill: Vec::new(),
        }
    }

    #[inline]
    fn push(&mut self, gpa: u64, len: u64) {
        let last = if !self.spill.is_empty() {
            self.spill.last_mut()
        } else if self.n > 0 {
            Some(&mut self.inline[self.n - 1])
        } else {
            None
        };
        if let Some(l) = last {
            if l.gpa.checked_add(l.len) == Some(gpa) {
                l.len += len;
                return;
            }
        }
        if self.n < INLINE_PIECES {
            self.inline[self.n] = GuestRange { gpa, len };
            self.n += 1;
        } else {
            self.spill.push(GuestRange { gpa, len });
        }
    }

    /// Pieces in IOVA order.
    pub fn iter(&self) -> impl Iterator<Item = &GuestRange> {
        self.inline[..self.n].iter().chain(self.spill.iter())
    }

    /// Number of pieces.
    pub fn len(&self) -> usize {
        self.n + self.spill.len()
    }

    /// Whether the translated access was empty.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The first piece (the whole translation when the access stays in one mapping).
    pub fn first(&self) -> Option<GuestRange> {
        (self.n > 0).then_some(self.inline[0])
    }
}

/// A block of a mapping: IOVAs `first..=last` go to guest-physical `gpa` onwards, with these
/// rights (bypass is one block over the whole space, at `gpa` 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappedBlock {
    pub first: u64,
    pub last: u64,
    pub gpa: u64,
    pub read: bool,
    pub write: bool,
}

/// A validated lock-free miss: no mapping (or permission) for `at`, with the endpoint bound
/// as `slot` says at count `seq`.
struct Miss<'a> {
    slot: &'a EndpointSlot,
    seq: u64,
    at: u64,
}

/// How many times the lock-free path retries a walk that raced with a writer before it
/// leaves the decision to the locked path.
const READ_ATTEMPTS: usize = 4;

impl VirtioIommu {
    /// Translate a DMA access of `len` bytes at `iova` by `endpoint`: the guest-physical
    /// pieces covering it (the access may span several mappings), or the fault, which has
    /// already been counted and queued for the event queue.
    ///
    /// Hits take no lock and make no atomic read-modify-write (see the module doc); faults,
    /// and translations that keep racing with requests, take the state read lock.
    #[inline]
    pub fn translate(
        &self,
        endpoint: u32,
        iova: u64,
        len: u64,
        access: Access,
    ) -> Result<Translation, Fault> {
        let need = access.perms();
        let mut miss = None;
        if let Some(t) = self.translate_unlocked(endpoint, iova, len, need, &mut miss) {
            return Ok(t);
        }
        if let Some(Miss { slot, seq, at }) = miss {
            if let Some(fault) = self.record_miss(endpoint, slot, seq, at, need) {
                return Err(fault);
            }
        }
        self.translate_locked(endpoint, iova, len, access)
    }

    /// The lock-free attempt: a successful translation, or `None` with `miss` set for a
    /// missing mapping, each validated against both sequence counts; `None` alone leaves the
    /// decision to the locked path. (A miss goes through `miss` rather than in the return
    /// value so that the hit's `Translation` is built in place: a wider return type cost
    /// ~2 ns per hit in moves.)
    #[inline]
    fn translate_unlocked<'a>(
        &'a self,
        endpoint: u32,
        iova: u64,
        len: u64,
        need: u8,
        miss: &mut Option<Miss<'a>>,
    ) -> Option<Translation> {
        let slot = self.dir.get(endpoint)?;
        let last = iova.checked_add(len.checked_sub(1)?)?;
        for _ in 0..READ_ATTEMPTS {
            let Some(e1) = slot.seq.read_begin() else {
                std::hint::spin_loop();
                continue;
            };
            let kind = slot.kind.load(Ordering::Relaxed);
            let out;
            let hits = match kind {
                BIND_BYPASS => {
                    out = Translation::single(iova, len);
                    read_fence();
                    if !slot.seq.unchanged(e1) {
                        continue;
                    }
                    &self.bypass_hits
                }
                BIND_DOMAIN | BIND_BYPASS_DOMAIN => {
                    // SAFETY: `table` is null or the root of a table this device keeps until
                    // it is dropped (tables of destroyed domains are pooled, never freed), and
                    // `self` is borrowed. Acquire pairs with the Release in `publish`.
                    let Some(table) = (unsafe { slot.table.load(Ordering::Acquire).as_ref() })
                    else {
                        continue;
                    };
                    race_point(RacePoint::Bound);
                    let Some(t1) = table.seq().read_begin() else {
                        std::hint::spin_loop();
                        continue;
                    };
                    // A missing mapping or permission is a fault, recorded under the lock once
                    // the miss is validated like a hit.
                    let mut missed = None;
                    if kind == BIND_BYPASS_DOMAIN {
                        out = Translation::single(iova, len);
                    } else {
                        match table.lookup(iova).filter(|h| h.perms & need == need) {
                            Some(hit) if hit.last >= last => {
                                out = Translation::single(hit.phys, len)
                            }
                            Some(hit) => match Self::walk_rest(table, hit, iova, last, need) {
                                Ok(t) => out = t,
                                Err(at) => {
                                    out = Translation::default();
                                    missed = Some(at);
                                }
                            },
                            None => {
                                out = Translation::default();
                                missed = Some(iova);
                            }
                        }
                    }
                    race_point(RacePoint::Walked);
                    read_fence();
                    if !table.seq().unchanged(t1) || !slot.seq.unchanged(e1) {
                        continue;
                    }
                    if let Some(at) = missed {
                        *miss = Some(Miss { slot, seq: e1, at });
                        return None;
                    }
                    table.hits()
                }
                _ => return None,
            };
            hits.bump();
            return Some(out);
        }
        None
    }

    /// Record the fault of a validated lock-free miss, without walking again (at 1 M
    /// mappings the second walk doubled the cost of a miss: the lock's read-modify-write
    /// waits for the first walk's cache misses, then the second one pays them again).
    /// `None` if the endpoint's binding changed since: the locked path decides then.
    #[cold]
    fn record_miss(
        &self,
        endpoint: u32,
        slot: &EndpointSlot,
        seq: u64,
        at: u64,
        need: u8,
    ) -> Option<Fault> {
        race_point(RacePoint::Missed);
        let st = read_lock(&self.state);
        // Bindings change only under the write lock, so with the read lock held an unchanged
        // count means the endpoint is still attached to the domain whose table missed, and
        // the fault is counted there. The miss itself was the table's state at one instant.
        if !slot.seq.unchanged(seq) {
            return None;
        }
        let f = Fault {
            reason: FaultReason::Mapping,
            endpoint,
            address: at,
            need,
        };
        Some(self.fault(&st, f))
    }

    /// The rest of a lock-free walk whose first block (`first`, at `iova`) ends before `last`.
    #[inline(never)]
    fn walk_rest(
        table: &RadixRoot,
        first: crate::table::Hit,
        iova: u64,
        last: u64,
        need: u8,
    ) -> Result<Translation, u64> {
        let mut out = Translation::default();
        let (mut cur, mut hit) = (iova, first);
        loop {
            out.push(hit.phys, hit.last.min(last) - cur + 1);
            if hit.last >= last {
                return Ok(out);
            }
            cur = hit.last + 1;
            hit = table
                .lookup(cur)
                .filter(|h| h.perms & need == need)
                .ok_or(cur)?;
        }
    }

    #[cold]
    fn translate_locked(
        &self,
        endpoint: u32,
        iova: u64,
        len: u64,
        access: Access,
    ) -> Result<Translation, Fault> {
        let st = read_lock(&self.state);
        let mut out = Translation::default();
        let end = iova.saturating_add(len.saturating_sub(1));
        self.walk(
            &st,
            endpoint,
            iova,
            len,
            access.perms(),
            |first, last, phys, _| {
                // Clip the block to the access.
                let from = first.max(iova);
                out.push(phys + (from - first), last.min(end) - from + 1)
            },
        )?;
        Ok(out)
    }

    /// Resolve `[iova, iova + len)` for `endpoint`, calling `block(first, last, gpa, perms)`
    /// for each contiguous block covering it (`gpa` is where `first` goes; blocks may extend
    /// past the access), with the state lock held by the caller. Bypass is one identity block
    /// over the whole space, so that an IOTLB holds a single entry for it.
    #[inline]
    fn walk(
        &self,
        st: &State,
        endpoint: u32,
        iova: u64,
        len: u64,
        need: u8,
        mut block: impl FnMut(u64, u64, u64, u8),
    ) -> Result<(), Fault> {
        let fault = |reason, address| Fault {
            reason,
            endpoint,
            address,
            need,
        };
        let Some(ep) = st.endpoints.get(&endpoint) else {
            return Err(self.fault(st, fault(FaultReason::Unknown, iova)));
        };
        if len == 0 {
            return Ok(());
        }
        let Some(last) = iova.checked_add(len - 1) else {
            return Err(self.fault(st, fault(FaultReason::Mapping, iova)));
        };
        let domain = match ep.domain {
            None if st.bypass => {
                block(0, u64::MAX, 0, PERM_READ | PERM_WRITE);
                self.bypass_hits.bump();
                return Ok(());
            }
            None => return Err(self.fault(st, fault(FaultReason::Domain, iova))),
            Some(d) => d,
        };
        let Some(d) = st.domains.get(&domain) else {
            return Err(self.fault(st, fault(FaultReason::Unknown, iova)));
        };
        if d.bypass {
            block(0, u64::MAX, 0, PERM_READ | PERM_WRITE);
            d.table.hits().bump();
            return Ok(());
        }
        let mut cur = iova;
        loop {
            let hit = match d.table.lookup(cur) {
                Some(h) if h.perms & need == need => h,
                _ => return Err(self.fault(st, fault(FaultReason::Mapping, cur))),
            };
            block(hit.first, hit.last, hit.phys - (cur - hit.first), hit.perms);
            if hit.last >= last {
                break;
            }
            cur = hit.last + 1;
        }
        d.table.hits().bump();
        Ok(())
    }

    /// Fill an endpoint IOTLB so that `[iova, iova + len)` hits, with whole mappings so that
    /// neighbouring accesses hit too. Holding the state read lock while inserting is what
    /// keeps a concurrent UNMAP from being undone by a stale fill.
    pub(crate) fn fill_iotlb(
        &self,
        endpoint: u32,
        shared: &EndpointShared,
        iova: u64,
        len: u64,
        need: u8,
    ) -> Result<(), Fault> {
        let st = read_lock(&self.state);
        // Whole leaf blocks go in (the IOTLB merges neighbouring blocks of one mapping), so
        // the next accesses to the same page or mapping hit.
        let mut entries = Vec::new();
        self.walk(
            &st,
            endpoint,
            iova,
            len,
            need,
            |first, last, phys, perms| entries.push((first, last, phys, permissions_from(perms))),
        )?;
        write_lock(&shared.iotlb).insert_all(&entries);
        Ok(())
    }

    /// The block of the mapping that serves `endpoint`'s access at `iova` (`need`: the rights
    /// it wants; a block is a leaf of the table, the page the guest mapped), handed to `fill`
    /// with the state read lock held, for an IOTLB outside the model (vhost's). An UNMAP holds the write lock while its endpoints' mappers invalidate such
    /// IOTLBs, so what `fill` inserts cannot outlive the mapping; a refusal is a fault,
    /// counted and queued like any other.
    pub(crate) fn with_mapping(
        &self,
        endpoint: u32,
        iova: u64,
        need: u8,
        fill: &mut dyn FnMut(MappedBlock),
    ) -> Result<(), Fault> {
        let st = read_lock(&self.state);
        let mut found = None;
        self.walk(&st, endpoint, iova, 1, need, |first, last, phys, perms| {
            found.get_or_insert(MappedBlock {
                first,
                last,
                gpa: phys,
                read: perms & PERM_READ != 0,
                write: perms & PERM_WRITE != 0,
            });
        })?;
        if let Some(block) = found {
            fill(block);
        }
        Ok(())
    }

    /// Record the fault for an access the IOTLB cannot represent (it reaches the last byte of
    /// the 64-bit space).
    pub(crate) fn translate_fault_at_top(&self, endpoint: u32, iova: u64, need: u8) -> Fault {
        let st = read_lock(&self.state);
        let reason = if st.endpoints.contains_key(&endpoint) {
            FaultReason::Mapping
        } else {
            FaultReason::Unknown
        };
        self.fault(
            &st,
            Fault {
                reason,
                endpoint,
                address: iova,
                need,
            },
        )
    }

    /// Count a fault and queue its record (registered endpoints only), then notify.
    fn fault(&self, st: &State, f: Fault) -> Fault {
        let domain = st
            .endpoints
            .get(&f.endpoint)
            .and_then(|e| e.domain)
            .and_then(|d| st.domains.get(&d));
        match domain {
            Some(d) => d.counters.fault(),
            None => self.totals.fault(),
        }
        if f.reason == FaultReason::Unknown && !st.endpoints.contains_key(&f.endpoint) {
            // No valid endpoint ID to report: counted only.
            return f;
        }
        {
            let mut q = lock(&self.faults);
            if q.pending.len() >= self.config.max_pending_faults {
                q.dropped += 1;
                return f;
            }
            q.pending.push_back(f.record());
        }
        if let Some(n) = read_lock(&self.notifier).as_ref() {
            n();
        }
        f
    }

    /// Fault records waiting for event-queue buffers.
    pub fn pending_faults(&self) -> usize {
        lock(&self.faults).pending.len()
    }

    pub(crate) fn front_fault(&self) -> Option<FaultRecord> {
        lock(&self.faults).pending.front().copied()
    }

    pub(crate) fn pop_fault(&self) {
        lock(&self.faults).pending.pop_front();
    }
}
