//! Counters readable by the VMM while the device runs.
//!
//! Counters are relaxed atomics so the translation hot path pays one uncontended increment and
//! readers never take the device lock for long: a snapshot is a handful of loads.

use std::sync::atomic::{AtomicU64, Ordering};

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

    #[inline]
    pub(crate) fn translation(&self) {
        self.translations.fetch_add(1, Ordering::Relaxed);
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
}
