//! Counters readable by the VMM while the device runs.
//!
//! Request-side counters are relaxed atomics updated under the device's state lock. Successful
//! translations are counted by [`HitCounter`], which the lock-free translation path updates
//! without any read-modify-write: a locked RMW is a full barrier on x86 and would serialize
//! the otherwise overlapping radix walks of consecutive translations.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Live counters of one domain (or of destroyed domains, folded into the device totals).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    maps: AtomicU64,
    unmaps: AtomicU64,
    bytes_mapped: AtomicU64,
    bytes_unmapped: AtomicU64,
    faults: AtomicU64,
    translations: AtomicU64,
}

/// A point-in-time copy of counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Successful MAP requests.
    pub maps: u64,
    /// Mappings removed (by UNMAP, or by the domain being destroyed).
    pub unmaps: u64,
    /// Bytes mapped by successful MAP requests, cumulative.
    pub bytes_mapped: u64,
    /// Bytes of mappings removed, cumulative; `bytes_mapped - bytes_unmapped` is live.
    pub bytes_unmapped: u64,
    /// Translation faults.
    pub faults: u64,
    /// Successful translations served by the model (IOTLB hits are counted per endpoint).
    pub translations: u64,
}

impl StatsSnapshot {
    /// Bytes currently mapped.
    pub fn live_bytes(&self) -> u64 {
        self.bytes_mapped.wrapping_sub(self.bytes_unmapped)
    }

    fn add(&mut self, o: &StatsSnapshot) {
        self.maps = self.maps.wrapping_add(o.maps);
        self.unmaps = self.unmaps.wrapping_add(o.unmaps);
        self.bytes_mapped = self.bytes_mapped.wrapping_add(o.bytes_mapped);
        self.bytes_unmapped = self.bytes_unmapped.wrapping_add(o.bytes_unmapped);
        self.faults = self.faults.wrapping_add(o.faults);
        self.translations = self.translations.wrapping_add(o.translations);
    }

    /// Sum of several snapshots.
    pub fn sum<'a>(items: impl IntoIterator<Item = &'a StatsSnapshot>) -> StatsSnapshot {
        let mut total = StatsSnapshot::default();
        for s in items {
            total.add(s);
        }
        total
    }
}

impl Counters {
    pub(crate) fn mapped(&self, bytes: u64) {
        self.maps.fetch_add(1, Ordering::Relaxed);
        self.bytes_mapped.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn unmapped(&self, bytes: u64) {
        self.unmaps.fetch_add(1, Ordering::Relaxed);
        self.bytes_unmapped.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn fault(&self) {
        self.faults.fetch_add(1, Ordering::Relaxed);
    }

    /// Fold translations counted elsewhere (a [`HitCounter`]) into these counters.
    pub(crate) fn add_translations(&self, n: u64) {
        self.translations.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            maps: self.maps.load(Ordering::Relaxed),
            unmaps: self.unmaps.load(Ordering::Relaxed),
            bytes_mapped: self.bytes_mapped.load(Ordering::Relaxed),
            bytes_unmapped: self.bytes_unmapped.load(Ordering::Relaxed),
            faults: self.faults.load(Ordering::Relaxed),
            translations: self.translations.load(Ordering::Relaxed),
        }
    }

    /// Fold a destroyed domain's counters in, so device totals never go backwards.
    pub(crate) fn absorb(&self, s: &StatsSnapshot) {
        self.maps.fetch_add(s.maps, Ordering::Relaxed);
        self.unmaps.fetch_add(s.unmaps, Ordering::Relaxed);
        self.bytes_mapped
            .fetch_add(s.bytes_mapped, Ordering::Relaxed);
        self.bytes_unmapped
            .fetch_add(s.bytes_unmapped, Ordering::Relaxed);
        self.faults.fetch_add(s.faults, Ordering::Relaxed);
        self.translations
            .fetch_add(s.translations, Ordering::Relaxed);
    }
}

/// Threads that own a slot of every [`HitCounter`]; later threads share the last slot.
const EXCLUSIVE_SLOTS: usize = 8;
const SHARED_SLOT: usize = EXCLUSIVE_SLOTS;
const UNASSIGNED: usize = usize::MAX;

/// Exclusive slot indices handed out so far, and those given back by exited threads.
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);
static FREE_SLOTS: Mutex<Vec<usize>> = Mutex::new(Vec::new());

thread_local! {
    static SLOT: Cell<usize> = const { Cell::new(UNASSIGNED) };
    static SLOT_RELEASE: SlotRelease = const { SlotRelease };
}

/// Gives the thread's exclusive slot back when the thread exits.
struct SlotRelease;

impl Drop for SlotRelease {
    fn drop(&mut self) {
        // Anything this thread still counts (from later destructors) goes to the shared slot.
        let i = SLOT.with(|s| s.replace(SHARED_SLOT));
        if i < EXCLUSIVE_SLOTS {
            FREE_SLOTS.lock().unwrap_or_else(|e| e.into_inner()).push(i);
        }
    }
}

#[cold]
fn assign_slot() -> usize {
    // A thread already tearing down its thread-locals cannot register the release: share.
    let i = if SLOT_RELEASE.try_with(|_| ()).is_err() {
        SHARED_SLOT
    } else {
        let reused = FREE_SLOTS.lock().unwrap_or_else(|e| e.into_inner()).pop();
        reused.unwrap_or_else(|| {
            NEXT_SLOT
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    (n < EXCLUSIVE_SLOTS).then_some(n + 1)
                })
                .unwrap_or(SHARED_SLOT)
        })
    };
    SLOT.with(|s| s.set(i));
    i
}

/// This thread's slot index in every [`HitCounter`].
#[inline]
fn thread_slot() -> usize {
    let i = SLOT.with(Cell::get);
    if i == UNASSIGNED {
        assign_slot()
    } else {
        i
    }
}

#[derive(Debug, Default)]
#[repr(align(64))]
struct PaddedU64(AtomicU64);

/// An exact event counter that the counting threads update without read-modify-write.
///
/// Each thread owns one slot (the same index in every counter, assigned on first use and
/// given back when the thread exits) and is its only writer, so `load` + `store` loses no
/// update. Threads beyond [`EXCLUSIVE_SLOTS`] share a last slot with `fetch_add`. Slots are
/// cache-line padded so counting threads do not bounce each other's line. The value is the
/// sum of the slots; it never decreases.
#[derive(Debug, Default)]
pub(crate) struct HitCounter {
    slots: [PaddedU64; EXCLUSIVE_SLOTS + 1],
}

impl HitCounter {
    /// Count one event.
    #[inline]
    pub(crate) fn bump(&self) {
        let i = thread_slot();
        match self.slots.get(i).filter(|_| i < EXCLUSIVE_SLOTS) {
            Some(PaddedU64(c)) => {
                c.store(c.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed)
            }
            None => {
                self.slots[SHARED_SLOT].0.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Events counted so far (each slot read once; concurrent bumps may or may not show).
    pub(crate) fn sum(&self) -> u64 {
        self.slots
            .iter()
            .fold(0u64, |a, s| a.wrapping_add(s.0.load(Ordering::Relaxed)))
    }
}

/// Device-wide statistics: totals plus each live domain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IommuStats {
    /// Totals over all domains that ever existed plus faults of unattached endpoints.
    pub total: StatsSnapshot,
    /// Live domains, by domain ID.
    pub domains: Vec<(u32, StatsSnapshot)>,
    /// Destroyed domains (by detach or reset), oldest first, up to
    /// [`crate::device::RETIRED_DOMAINS_KEPT`] of them.
    pub retired_domains: Vec<(u32, StatsSnapshot)>,
    /// Fault records dropped because the pending queue was full.
    pub dropped_fault_events: u64,
    /// Translations answered from endpoint IOTLBs without consulting the model.
    pub iotlb_hits: u64,
    /// UNMAP, ATTACH and DETACH requests that completed only once the device transfers in
    /// flight through the translations they took away had ended: how often the guest's
    /// driver waited for DMA, and the evidence that a race of the two was met.
    pub requests_waited_for_dma: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hit_counter_is_exact_beyond_the_exclusive_slots() {
        let c = std::sync::Arc::new(HitCounter::default());
        // Threads come and go (slots are given back), more at once than there are slots.
        for round in 0..3 {
            let threads: Vec<_> = (0..EXCLUSIVE_SLOTS as u64 + 5)
                .map(|_| {
                    let c = c.clone();
                    std::thread::spawn(move || {
                        for _ in 0..10_000 {
                            c.bump();
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            assert_eq!(c.sum(), (round + 1) * (EXCLUSIVE_SLOTS as u64 + 5) * 10_000);
        }
        assert!(NEXT_SLOT.load(Ordering::Relaxed) <= EXCLUSIVE_SLOTS);
    }
}
