//! Per-domain mapping table.
//!
//! Two structures describe the same mappings:
//! - a record per mapping (hash map keyed by first IOVA) that remembers each mapping exactly
//!   as one MAP request created it, which UNMAP semantics need (no splitting, whole-mapping
//!   removal); MAP and UNMAP touch one hash slot instead of walking an ordered map;
//! - a radix page table, like a hardware IOMMU's (`radix.rs`), for translation, overlap checks
//!   and ordered walks.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::ptr::NonNull;

pub use arena::OutOfMemory;
pub(crate) use radix::RadixRoot;
use radix::{Radix, TAG_START};

use crate::stats::HitCounter;

mod arena;
mod radix;

/// Access rights of a mapping, as MAP flags grant them.
pub const PERM_READ: u8 = 1;
/// See [`PERM_READ`].
pub const PERM_WRITE: u8 = 2;

/// Smallest supported granule shift: leaf entries keep four tag bits below the address.
pub const MIN_GRANULE_SHIFT: u32 = 4;
/// Most radix nodes a table holds (4 KiB each: 256 MiB). Mappings placed densely, as drivers
/// allocate IOVAs, need far fewer: 1 M 4 KiB mappings at every other page take about 4100;
/// mappings scattered one per 2 MiB take a leaf node each and hit this after 65536.
pub const MAX_TABLE_NODES: usize = 1 << 16;

/// One mapping as created by a single MAP request. `end` is inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// First IOVA.
    pub start: u64,
    /// Last IOVA (inclusive).
    pub end: u64,
    /// Guest-physical address of `start`.
    pub phys: u64,
    /// `PERM_READ` / `PERM_WRITE` bits.
    pub perms: u8,
    /// Whether the MAP carried the MMIO memory-type flag.
    pub mmio: bool,
}

impl Mapping {
    /// Size in bytes, saturated at `u64::MAX` for a mapping of the whole 64-bit space.
    pub fn size(&self) -> u64 {
        (self.end - self.start).saturating_add(1)
    }
}

/// The result of a radix lookup: where `iova` goes, within which contiguous leaf block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hit {
    /// Guest-physical address of the looked-up IOVA.
    pub phys: u64,
    /// `PERM_*` bits of the mapping.
    pub perms: u8,
    /// First IOVA of the leaf block (inside one mapping, translated contiguously).
    pub first: u64,
    /// Last IOVA (inclusive) of the leaf block.
    pub last: u64,
}

/// Why [`MappingTable::insert`] changed nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InsertError {
    /// The mapping overlaps an existing one.
    Overlap,
    /// The host had no memory for the radix nodes it needs.
    OutOfMemory,
}

/// UNMAP would split the mapping containing `at`, so nothing was removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitError {
    /// An IOVA of the mapping that would be split.
    pub at: u64,
}

/// Hasher for page-aligned IOVA keys: a multiply, then the high product bits folded down,
/// since the table index uses the low bits and the keys' low bits are all zero.
#[derive(Default, Clone, Copy)]
struct IovaHasher(u64);

impl Hasher for IovaHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64((self.0 << 8) | u64::from(b));
        }
    }
    fn write_u64(&mut self, i: u64) {
        let h = (self.0 ^ i).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = h ^ (h >> 29);
    }
}

#[derive(Clone, Copy, Debug)]
struct RangeEntry {
    end: u64,
    phys: u64,
    perms: u8,
    mmio: bool,
}

/// All mappings of one domain.
#[derive(Debug)]
pub struct MappingTable {
    ranges: HashMap<u64, RangeEntry, BuildHasherDefault<IovaHasher>>,
    radix: Radix,
}

impl MappingTable {
    /// A table whose mappings are aligned on `1 << granule_shift` bytes, with at most
    /// [`MAX_TABLE_NODES`] radix nodes. `granule_shift` must be at least [`MIN_GRANULE_SHIFT`]
    /// (the device config enforces it).
    pub fn new(granule_shift: u32) -> Self {
        Self::with_node_limit(granule_shift, MAX_TABLE_NODES)
    }

    /// [`Self::new`] with at most `max_nodes` radix nodes: an insert needing more fails with
    /// [`InsertError::OutOfMemory`] (MAP answers NOMEM).
    pub fn with_node_limit(granule_shift: u32, max_nodes: usize) -> Self {
        MappingTable {
            ranges: HashMap::default(),
            radix: Radix::new(granule_shift.max(MIN_GRANULE_SHIFT), max_nodes),
        }
    }

    /// Number of mappings.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Whether there is no mapping.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Number of live radix nodes (a memory-use indicator).
    pub fn node_count(&self) -> usize {
        self.radix.node_count()
    }

    /// Whether any mapping intersects `[start, end]`. Answered by the radix table, which
    /// mirrors the range table exactly and is cheaper to walk than an ordered-map search.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        start <= end && !self.radix.range_is_empty(start, end)
    }

    /// Insert a mapping. The caller has validated alignment and range. Changes nothing if
    /// the mapping overlaps an existing one, or if the host has no memory for the nodes it
    /// needs (which cannot happen right after a successful [`Self::reserve`]).
    pub fn insert(&mut self, m: Mapping) -> Result<(), InsertError> {
        if m.end < m.start || self.overlaps(m.start, m.end) {
            return Err(InsertError::Overlap);
        }
        self.radix.map(&m).map_err(|_| InsertError::OutOfMemory)?;
        self.ranges.insert(
            m.start,
            RangeEntry {
                end: m.end,
                phys: m.phys,
                perms: m.perms,
                mmio: m.mmio,
            },
        );
        Ok(())
    }

    /// Set aside the memory the next [`Self::insert`] may need, so that a caller with other
    /// side effects to order (the external mappers) can fail first.
    pub fn reserve(&mut self) -> Result<(), OutOfMemory> {
        self.radix.reserve()
    }

    /// The mappings UNMAP `[start, end]` would remove (in IOVA order), or the mapping it
    /// would split. Walks the radix leaves of the range, jumping over each mapping found.
    pub fn unmap_plan(&self, start: u64, end: u64) -> Result<Vec<Mapping>, SplitError> {
        let mut out = Vec::new();
        let mut from = start;
        while let Some((bstart, entry)) = self.radix.first_leaf(from, end) {
            // A leaf that is not the first of its mapping (or begins before the range) belongs
            // to a mapping that started before `from`, hence before `start`.
            let Some(e) = self
                .ranges
                .get(&bstart)
                .filter(|_| bstart >= from && entry & TAG_START != 0)
            else {
                return Err(SplitError { at: from });
            };
            if e.end > end {
                return Err(SplitError { at: bstart });
            }
            out.push(to_mapping(bstart, e));
            if e.end == end {
                break;
            }
            from = e.end + 1;
        }
        Ok(out)
    }

    /// Remove one mapping that starts exactly at `start`.
    pub fn remove(&mut self, start: u64) -> Option<Mapping> {
        let e = self.ranges.remove(&start)?;
        self.radix.write(|r| r.unmap(start, e.end));
        Some(to_mapping(start, &e))
    }

    /// Remove the mappings starting at each of `starts` as one change: a lock-free reader
    /// sees all of them or none of them gone.
    pub fn remove_all(&mut self, starts: impl IntoIterator<Item = u64>) {
        let Self { ranges, radix } = self;
        radix.write(|r| {
            for s in starts {
                if let Some(e) = ranges.remove(&s) {
                    r.unmap(s, e.end);
                }
            }
        });
    }

    /// UNMAP semantics in one call: remove every mapping inside `[start, end]`, or nothing if
    /// that would split one.
    pub fn unmap(&mut self, start: u64, end: u64) -> Result<Vec<Mapping>, SplitError> {
        let plan = self.unmap_plan(start, end)?;
        self.remove_all(plan.iter().map(|m| m.start));
        Ok(plan)
    }

    /// Remove every mapping. Radix nodes stay allocated on the table's free list.
    pub fn clear(&mut self) {
        self.ranges.clear();
        self.radix.clear();
    }

    /// Fast-path translation of one IOVA through the radix table.
    #[inline]
    pub fn lookup(&self, iova: u64) -> Option<Hit> {
        self.radix.lookup(iova)
    }

    /// The reader-visible half of the table, for lock-free translation. It stays valid (at
    /// the same address) as long as the table lives, wherever the table itself moves.
    pub(crate) fn root(&self) -> NonNull<RadixRoot> {
        self.radix.root
    }

    /// Successful translations through this table (counted by the device).
    pub(crate) fn hits(&self) -> &HitCounter {
        self.radix.root().hits()
    }

    /// All mappings, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = Mapping> + '_ {
        self.ranges.iter().map(|(&s, e)| to_mapping(s, e))
    }
}

fn to_mapping(start: u64, e: &RangeEntry) -> Mapping {
    Mapping {
        start,
        end: e.end,
        phys: e.phys,
        perms: e.perms,
        mmio: e.mmio,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(start: u64, end: u64, phys: u64) -> Mapping {
        Mapping {
            start,
            end,
            phys,
            perms: PERM_READ | PERM_WRITE,
            mmio: false,
        }
    }

    #[test]
    fn large_aligned_blocks_use_few_nodes() {
        let mut t = MappingTable::new(12);
        // 1 GiB at a 1 GiB-aligned IOVA and phys: one leaf two levels up.
        assert_eq!(t.insert(m(0x4000_0000, 0x7fff_ffff, 0x1_0000_0000)), Ok(()));
        assert_eq!(t.node_count(), 1);
        let hit = t.lookup(0x4123_4567).unwrap();
        assert_eq!(hit.phys, 0x1_0123_4567);
        assert_eq!(hit.last, 0x7fff_ffff);
        assert!(t.lookup(0x3fff_ffff).is_none());
        assert!(t.lookup(0x8000_0000).is_none());
    }

    #[test]
    fn unaligned_phys_still_translates_exactly() {
        let mut t = MappingTable::new(12);
        // 2 MiB IOVA-aligned block to a phys that is only 4 KiB aligned.
        assert_eq!(t.insert(m(0x20_0000, 0x3f_ffff, 0x1234_5000)), Ok(()));
        assert_eq!(t.lookup(0x20_0000).unwrap().phys, 0x1234_5000);
        assert_eq!(t.lookup(0x3f_fff8).unwrap().phys, 0x1234_5000 + 0x1f_fff8);
    }

    #[test]
    fn mapping_at_top_of_address_space() {
        let mut t = MappingTable::new(12);
        let top = m(0xffff_ffff_ffff_f000, u64::MAX, 0x5000);
        assert_eq!(t.insert(top), Ok(()));
        assert_eq!(t.lookup(u64::MAX).unwrap().phys, 0x5fff);
        assert_eq!(t.lookup(u64::MAX).unwrap().last, u64::MAX);
        assert_eq!(t.insert(m(0, 0xfff, 0x9000)), Ok(()));
        assert_eq!(t.lookup(0x10).unwrap().phys, 0x9010);
        assert_eq!(t.unmap(0xffff_ffff_ffff_0000, u64::MAX), Ok(vec![top]));
        assert!(t.lookup(u64::MAX).is_none());
        assert_eq!(t.lookup(0x10).unwrap().phys, 0x9010);
    }

    #[test]
    fn whole_address_space_mapping() {
        let mut t = MappingTable::new(12);
        let all = m(0, u64::MAX, 0);
        assert_eq!(t.insert(all), Ok(()));
        assert_eq!(all.size(), u64::MAX);
        assert_eq!(t.lookup(0xdead_beef).unwrap().phys, 0xdead_beef);
        assert_eq!(t.insert(m(0x1000, 0x1fff, 0)), Err(InsertError::Overlap));
        assert_eq!(t.unmap(0, u64::MAX), Ok(vec![all]));
        assert!(t.lookup(0).is_none());
        assert_eq!(t.node_count(), 1, "emptied nodes are freed");
    }

    #[test]
    fn spec_unmap_examples() {
        // The seven UNMAP examples of the spec, scaled to 4 KiB pages.
        let p = |n: u64| n * 0x1000;
        let e = |n: u64| n * 0x1000 + 0xfff;
        let fresh = || MappingTable::new(12);

        let mut t = fresh();
        assert_eq!(t.unmap(p(0), e(4)), Ok(vec![])); // (1)

        let mut t = fresh();
        t.insert(m(p(0), e(9), 0)).unwrap();
        assert_eq!(t.unmap(p(0), e(9)).unwrap().len(), 1); // (2)

        let mut t = fresh();
        t.insert(m(p(0), e(4), 0)).unwrap();
        t.insert(m(p(5), e(9), 0)).unwrap();
        assert_eq!(t.unmap(p(0), e(9)).unwrap().len(), 2); // (3)
        assert!(t.is_empty());

        let mut t = fresh();
        t.insert(m(p(0), e(9), 0)).unwrap();
        assert!(t.unmap(p(0), e(4)).is_err()); // (4)
        assert_eq!(t.len(), 1);
        assert!(t.lookup(p(7)).is_some());

        let mut t = fresh();
        t.insert(m(p(0), e(4), 0)).unwrap();
        t.insert(m(p(5), e(9), 0)).unwrap();
        assert_eq!(t.unmap(p(0), e(4)).unwrap()[0].start, p(0)); // (5)
        assert!(t.lookup(p(6)).is_some());
        assert!(t.lookup(p(1)).is_none());

        let mut t = fresh();
        t.insert(m(p(0), e(4), 0)).unwrap();
        assert_eq!(t.unmap(p(0), e(9)).unwrap().len(), 1); // (6)

        let mut t = fresh();
        t.insert(m(p(0), e(4), 0)).unwrap();
        t.insert(m(p(10), e(14), 0)).unwrap();
        assert_eq!(t.unmap(p(0), e(14)).unwrap().len(), 2); // (7)
    }

    #[test]
    fn split_at_start_is_rejected_too() {
        let mut t = MappingTable::new(12);
        t.insert(m(0x1000, 0x4fff, 0)).unwrap();
        assert_eq!(t.unmap(0x2000, 0x8fff), Err(SplitError { at: 0x2000 }));
        assert_eq!(t.unmap(0x0, 0x1fff), Err(SplitError { at: 0x1000 }));
        assert_eq!(t.len(), 1);
        // A large leaf (2 MiB block) straddling the range start is caught too.
        assert_eq!(t.insert(m(0x20_0000, 0x5f_ffff, 0x20_0000)), Ok(()));
        assert!(t.unmap(0x30_0000, 0x6f_ffff).is_err());
        assert_eq!(t.unmap(0x5000, 0x5f_ffff).unwrap().len(), 1);
    }

    #[test]
    fn clear_keeps_nodes_for_reuse() {
        let mut t = MappingTable::new(12);
        for i in 0..600u64 {
            assert_eq!(t.insert(m(i << 21, (i << 21) + 0xfff, i << 12)), Ok(()));
        }
        let nodes = t.node_count();
        let allocated = t.radix.arena.allocated();
        let root = t.root();
        t.clear();
        assert!(t.is_empty());
        assert_eq!(t.node_count(), 1);
        assert!(t.lookup(0).is_none() && t.lookup(599 << 21).is_none());
        // Refilling takes nodes from the free list; the reader-visible root never moves.
        for i in 0..600u64 {
            assert_eq!(
                t.insert(m(i << 21, (i << 21) + 0xfff, (i + 1) << 12)),
                Ok(())
            );
        }
        assert_eq!(t.node_count(), nodes);
        assert_eq!(t.radix.arena.allocated(), allocated);
        assert_eq!(t.root(), root);
        assert_eq!(t.lookup(599 << 21).unwrap().phys, 600 << 12);
    }

    #[test]
    fn removing_every_mapping_frees_every_node() {
        // Enough scattered mappings for the nodes to spill from single allocations into a
        // huge-page chunk, removed in an order unrelated to the insertion order: the
        // per-child counts kept in table entries must reach zero exactly when a node empties.
        let mut t = MappingTable::new(12);
        let iova = |i: u64| ((i * 0x9e37) % 4096) << 21 | (i % 7) << 12;
        for i in 0..3000u64 {
            assert_eq!(
                t.insert(m(iova(i), iova(i) + 0xfff, i << 12)),
                Ok(()),
                "{i}"
            );
        }
        assert!(t.node_count() > 100, "{} nodes", t.node_count());
        for k in 0..3000u64 {
            let i = (k * 1237) % 3000;
            assert_eq!(t.remove(iova(i)).map(|m| m.phys), Some(i << 12));
            assert!(t.lookup(iova(i)).is_none());
            let j = (i + 1) % 3000;
            assert_eq!(
                t.lookup(iova(j)).is_some(),
                (0..=k).all(|x| (x * 1237) % 3000 != j)
            );
        }
        assert_eq!(t.node_count(), 1);
    }

    #[test]
    fn remove_all_is_one_change() {
        let mut t = MappingTable::new(12);
        t.insert(m(0x1000, 0x1fff, 0)).unwrap();
        t.insert(m(0x3000, 0x3fff, 0)).unwrap();
        let seq = t.radix.root().seq().read_begin().unwrap();
        t.remove_all([0x1000, 0x3000, 0x5000]);
        assert!(t.is_empty());
        // One write: the count moved by exactly one begin/end pair.
        assert_eq!(t.radix.root().seq().read_begin(), Some(seq + 2));
    }

    #[test]
    fn permissions_are_kept_per_leaf() {
        let mut t = MappingTable::new(12);
        let mut ro = m(0x1000, 0x1fff, 0x8000);
        ro.perms = PERM_READ;
        let mut wo = m(0x2000, 0x2fff, 0x9000);
        wo.perms = PERM_WRITE;
        t.insert(ro).unwrap();
        t.insert(wo).unwrap();
        assert_eq!(t.lookup(0x1004).unwrap().perms, PERM_READ);
        assert_eq!(t.lookup(0x2004).unwrap().perms, PERM_WRITE);
        assert_eq!(t.lookup(0x2ff0).unwrap().first, 0x2000);
        assert!(t.lookup(0x3000).is_none());
        let mut all: Vec<Mapping> = t.iter().collect();
        all.sort_by_key(|x| x.start);
        assert_eq!(all, vec![ro, wo]);
    }
}
