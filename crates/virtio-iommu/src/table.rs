//! Per-domain mapping table.
//!
//! Two structures describe the same mappings:
//! - a record per mapping (hash map keyed by first IOVA) that remembers each mapping exactly
//!   as one MAP request created it, which UNMAP semantics need (no splitting, whole-mapping
//!   removal);
//! - a radix page table, like a hardware IOMMU's, used for translation, overlap checks and
//!   ordered walks (the leaf at a mapping's first IOVA is tagged START). It has 512-entry
//!   nodes over the IOVA page number, grows its height only as far as the highest mapped IOVA
//!   needs (typical guests map below 4 GiB: three levels at 4 KiB granule), and stores large
//!   aligned blocks as leaves at upper levels, so a 1 GiB mapping costs one entry, not 262144.
//!   A lookup is a handful of dependent loads with no comparisons, which is what makes random
//!   hits over a million mappings several times faster than an ordered-map search, and MAP or
//!   UNMAP touch one hash slot instead of walking an ordered map.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Access rights of a mapping, as MAP flags grant them.
pub const PERM_READ: u8 = 1;
/// See [`PERM_READ`].
pub const PERM_WRITE: u8 = 2;

/// Smallest supported granule shift: leaf entries keep four tag bits below the address.
pub const MIN_GRANULE_SHIFT: u32 = 4;

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

const BITS: u32 = 9;
const FANOUT: usize = 1 << BITS;
const TAG_LEAF: u64 = 1;
const TAG_START: u64 = 0b1000;
const TAG_MASK: u64 = 0b1111;

/// Radix page table. Entry encoding (u64): 0 = empty; bit 0 set = leaf whose upper bits are the
/// guest-physical address of the block start, bits 1-2 the permissions and bit 3 set when the
/// block starts its mapping; otherwise a table entry holding `child_index << 3` (child indices
/// start at 1, so a table entry is non-zero).
#[derive(Debug)]
struct Radix {
    shift: u32,
    levels: u32,
    max_levels: u32,
    nodes: Vec<[u64; FANOUT]>,
    live: Vec<u16>,
    free: Vec<usize>,
}

impl Radix {
    fn new(shift: u32) -> Self {
        Radix {
            shift,
            levels: 1,
            max_levels: (64 - shift).div_ceil(BITS),
            nodes: vec![[0; FANOUT]],
            live: vec![0],
            free: Vec::new(),
        }
    }

    fn level_shift(&self, level: u32) -> u32 {
        self.shift + BITS * level
    }

    /// Number of low IOVA bits the current tree covers (may exceed 64 at full height).
    fn covered_bits(&self) -> u32 {
        self.shift + BITS * self.levels
    }

    #[inline]
    fn lookup(&self, iova: u64) -> Option<Hit> {
        let top = self.covered_bits();
        if top < 64 && iova >> top != 0 {
            return None;
        }
        let mut node = 0usize;
        let mut level = self.levels - 1;
        loop {
            let shift = self.level_shift(level);
            let entry = self.nodes[node][(iova >> shift) as usize & (FANOUT - 1)];
            if entry & TAG_LEAF != 0 {
                let mask = (1u64 << shift) - 1;
                return Some(Hit {
                    phys: (entry & !TAG_MASK).wrapping_add(iova & mask),
                    perms: ((entry >> 1) & 0b11) as u8,
                    first: iova & !mask,
                    last: iova | mask,
                });
            }
            if entry == 0 || level == 0 {
                return None;
            }
            node = (entry >> 3) as usize;
            level -= 1;
        }
    }

    fn alloc(&mut self) -> usize {
        if let Some(i) = self.free.pop() {
            return i;
        }
        self.nodes.push([0; FANOUT]);
        self.live.push(0);
        self.nodes.len() - 1
    }

    fn release(&mut self, i: usize) {
        debug_assert_eq!(self.live[i], 0);
        self.free.push(i);
    }

    /// Add levels on top until `end` is covered. The old root moves under slot 0.
    fn ensure_covers(&mut self, end: u64) {
        while self.levels < self.max_levels && end >> self.covered_bits() != 0 {
            if self.live[0] != 0 {
                let child = self.alloc();
                self.nodes[child] = self.nodes[0];
                self.live[child] = self.live[0];
                self.nodes[0] = [0; FANOUT];
                self.nodes[0][0] = (child as u64) << 3;
                self.live[0] = 1;
            }
            self.levels += 1;
        }
    }

    fn map(&mut self, m: &Mapping) {
        self.ensure_covers(m.end);
        let leaf_bits = (u64::from(m.perms & 0b11) << 1) | TAG_LEAF;
        self.map_in(0, self.levels - 1, 0, m.start, m.end, m, leaf_bits);
    }

    /// Fill `[start, end]` (inside the node's span starting at `base`) with leaves, using the
    /// largest blocks that fit. The range table guarantees the range is empty here.
    #[allow(clippy::too_many_arguments)]
    fn map_in(
        &mut self,
        node: usize,
        level: u32,
        base: u64,
        start: u64,
        end: u64,
        m: &Mapping,
        leaf_bits: u64,
    ) {
        let shift = self.level_shift(level);
        let mask = (1u64 << shift) - 1;
        let first = ((start - base) >> shift) as usize;
        let last = ((end - base) >> shift) as usize;
        for idx in first..=last {
            let bstart = base + ((idx as u64) << shift);
            let bend = bstart | mask;
            let s = start.max(bstart);
            let e = end.min(bend);
            let entry = self.nodes[node][idx];
            if s == bstart && e == bend {
                debug_assert_eq!(entry, 0, "radix overlap at {bstart:#x}");
                let phys = m.phys.wrapping_add(bstart - m.start);
                let start_bit = if bstart == m.start { TAG_START } else { 0 };
                self.nodes[node][idx] = (phys & !TAG_MASK) | leaf_bits | start_bit;
                self.live[node] += 1;
            } else {
                debug_assert!(level > 0 && entry & TAG_LEAF == 0);
                let child = if entry == 0 {
                    let c = self.alloc();
                    self.nodes[node][idx] = (c as u64) << 3;
                    self.live[node] += 1;
                    c
                } else {
                    (entry >> 3) as usize
                };
                self.map_in(child, level - 1, bstart, s, e, m, leaf_bits);
            }
        }
    }

    fn unmap(&mut self, start: u64, end: u64) {
        self.unmap_in(0, self.levels - 1, 0, start, end);
    }

    /// Clear the leaves `map_in` created for exactly `[start, end]`, freeing emptied nodes.
    fn unmap_in(&mut self, node: usize, level: u32, base: u64, start: u64, end: u64) {
        let shift = self.level_shift(level);
        let mask = (1u64 << shift) - 1;
        let first = ((start - base) >> shift) as usize;
        let last = ((end - base) >> shift) as usize;
        for idx in first..=last {
            let bstart = base + ((idx as u64) << shift);
            let bend = bstart | mask;
            let entry = self.nodes[node][idx];
            if entry == 0 {
                continue;
            }
            if entry & TAG_LEAF != 0 {
                self.nodes[node][idx] = 0;
                self.live[node] -= 1;
            } else {
                let child = (entry >> 3) as usize;
                self.unmap_in(child, level - 1, bstart, start.max(bstart), end.min(bend));
                if self.live[child] == 0 {
                    self.release(child);
                    self.nodes[node][idx] = 0;
                    self.live[node] -= 1;
                }
            }
        }
    }

    /// Whether no leaf intersects `[start, end]`. Table entries always hold at least one
    /// leaf (emptied nodes are freed), so a table wholly inside the range means "not empty".
    fn range_is_empty(&self, start: u64, end: u64) -> bool {
        let top = self.covered_bits();
        if top < 64 && start >> top != 0 {
            return true;
        }
        let end = if top < 64 {
            end.min((1u64 << top) - 1)
        } else {
            end
        };
        self.empty_in(0, self.levels - 1, 0, start, end)
    }

    fn empty_in(&self, node: usize, level: u32, base: u64, start: u64, end: u64) -> bool {
        let shift = self.level_shift(level);
        let mask = (1u64 << shift) - 1;
        let first = ((start - base) >> shift) as usize;
        let last = ((end - base) >> shift) as usize;
        (first..=last).all(|idx| {
            let entry = self.nodes[node][idx];
            let bstart = base + ((idx as u64) << shift);
            let bend = bstart | mask;
            if entry == 0 {
                true
            } else if entry & TAG_LEAF != 0 || (start <= bstart && bend <= end) {
                false
            } else {
                let child = (entry >> 3) as usize;
                self.empty_in(child, level - 1, bstart, start.max(bstart), end.min(bend))
            }
        })
    }

    /// The first leaf intersecting `[from, to]`, in IOVA order: `(block start, entry)`. The
    /// block may start before `from` when `from` falls inside a large leaf.
    fn first_leaf(&self, from: u64, to: u64) -> Option<(u64, u64)> {
        let top = self.covered_bits();
        if top < 64 && from >> top != 0 {
            return None;
        }
        let to = if top < 64 {
            to.min((1u64 << top) - 1)
        } else {
            to
        };
        self.first_in(0, self.levels - 1, 0, from, to)
    }

    fn first_in(
        &self,
        node: usize,
        level: u32,
        base: u64,
        from: u64,
        to: u64,
    ) -> Option<(u64, u64)> {
        let shift = self.level_shift(level);
        let mask = (1u64 << shift) - 1;
        let first = ((from - base) >> shift) as usize;
        let last = ((to - base) >> shift) as usize;
        for idx in first..=last {
            let entry = self.nodes[node][idx];
            if entry == 0 {
                continue;
            }
            let bstart = base + ((idx as u64) << shift);
            if entry & TAG_LEAF != 0 {
                return Some((bstart, entry));
            }
            let child = (entry >> 3) as usize;
            let hit = self.first_in(
                child,
                level - 1,
                bstart,
                from.max(bstart),
                to.min(bstart | mask),
            );
            if hit.is_some() {
                return hit;
            }
        }
        None
    }

    fn node_count(&self) -> usize {
        self.nodes.len() - self.free.len()
    }
}

/// All mappings of one domain.
#[derive(Debug)]
pub struct MappingTable {
    ranges: HashMap<u64, RangeEntry, BuildHasherDefault<IovaHasher>>,
    radix: Radix,
}

impl MappingTable {
    /// A table whose mappings are aligned on `1 << granule_shift` bytes.
    /// `granule_shift` must be at least [`MIN_GRANULE_SHIFT`] (the device config enforces it).
    pub fn new(granule_shift: u32) -> Self {
        MappingTable {
            ranges: HashMap::default(),
            radix: Radix::new(granule_shift.max(MIN_GRANULE_SHIFT)),
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

    /// Insert a mapping. The caller has validated alignment and range; returns `false` (and
    /// changes nothing) if it overlaps an existing mapping.
    pub fn insert(&mut self, m: Mapping) -> bool {
        if m.end < m.start || self.overlaps(m.start, m.end) {
            return false;
        }
        self.ranges.insert(
            m.start,
            RangeEntry {
                end: m.end,
                phys: m.phys,
                perms: m.perms,
                mmio: m.mmio,
            },
        );
        self.radix.map(&m);
        true
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
        self.radix.unmap(start, e.end);
        Some(to_mapping(start, &e))
    }

    /// UNMAP semantics in one call: remove every mapping inside `[start, end]`, or nothing if
    /// that would split one.
    pub fn unmap(&mut self, start: u64, end: u64) -> Result<Vec<Mapping>, SplitError> {
        let plan = self.unmap_plan(start, end)?;
        for m in &plan {
            self.remove(m.start);
        }
        Ok(plan)
    }

    /// Fast-path translation of one IOVA through the radix table.
    #[inline]
    pub fn lookup(&self, iova: u64) -> Option<Hit> {
        self.radix.lookup(iova)
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
        assert!(t.insert(m(0x4000_0000, 0x7fff_ffff, 0x1_0000_0000)));
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
        assert!(t.insert(m(0x20_0000, 0x3f_ffff, 0x1234_5000)));
        assert_eq!(t.lookup(0x20_0000).unwrap().phys, 0x1234_5000);
        assert_eq!(t.lookup(0x3f_fff8).unwrap().phys, 0x1234_5000 + 0x1f_fff8);
    }

    #[test]
    fn mapping_at_top_of_address_space() {
        let mut t = MappingTable::new(12);
        let top = m(0xffff_ffff_ffff_f000, u64::MAX, 0x5000);
        assert!(t.insert(top));
        assert_eq!(t.lookup(u64::MAX).unwrap().phys, 0x5fff);
        assert_eq!(t.lookup(u64::MAX).unwrap().last, u64::MAX);
        assert!(t.insert(m(0, 0xfff, 0x9000)));
        assert_eq!(t.lookup(0x10).unwrap().phys, 0x9010);
        assert_eq!(t.unmap(0xffff_ffff_ffff_0000, u64::MAX), Ok(vec![top]));
        assert!(t.lookup(u64::MAX).is_none());
        assert_eq!(t.lookup(0x10).unwrap().phys, 0x9010);
    }

    #[test]
    fn whole_address_space_mapping() {
        let mut t = MappingTable::new(12);
        let all = m(0, u64::MAX, 0);
        assert!(t.insert(all));
        assert_eq!(all.size(), u64::MAX);
        assert_eq!(t.lookup(0xdead_beef).unwrap().phys, 0xdead_beef);
        assert!(!t.insert(m(0x1000, 0x1fff, 0)));
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
        t.insert(m(p(0), e(9), 0));
        assert_eq!(t.unmap(p(0), e(9)).unwrap().len(), 1); // (2)

        let mut t = fresh();
        t.insert(m(p(0), e(4), 0));
        t.insert(m(p(5), e(9), 0));
        assert_eq!(t.unmap(p(0), e(9)).unwrap().len(), 2); // (3)
        assert!(t.is_empty());

        let mut t = fresh();
        t.insert(m(p(0), e(9), 0));
        assert!(t.unmap(p(0), e(4)).is_err()); // (4)
        assert_eq!(t.len(), 1);
        assert!(t.lookup(p(7)).is_some());

        let mut t = fresh();
        t.insert(m(p(0), e(4), 0));
        t.insert(m(p(5), e(9), 0));
        assert_eq!(t.unmap(p(0), e(4)).unwrap()[0].start, p(0)); // (5)
        assert!(t.lookup(p(6)).is_some());
        assert!(t.lookup(p(1)).is_none());

        let mut t = fresh();
        t.insert(m(p(0), e(4), 0));
        assert_eq!(t.unmap(p(0), e(9)).unwrap().len(), 1); // (6)

        let mut t = fresh();
        t.insert(m(p(0), e(4), 0));
        t.insert(m(p(10), e(14), 0));
        assert_eq!(t.unmap(p(0), e(14)).unwrap().len(), 2); // (7)
    }

    #[test]
    fn split_at_start_is_rejected_too() {
        let mut t = MappingTable::new(12);
        t.insert(m(0x1000, 0x4fff, 0));
        assert_eq!(t.unmap(0x2000, 0x8fff), Err(SplitError { at: 0x2000 }));
        assert_eq!(t.unmap(0x0, 0x1fff), Err(SplitError { at: 0x1000 }));
        assert_eq!(t.len(), 1);
        // A large leaf (2 MiB block) straddling the range start is caught too.
        assert!(t.insert(m(0x20_0000, 0x5f_ffff, 0x20_0000)));
        assert!(t.unmap(0x30_0000, 0x6f_ffff).is_err());
        assert_eq!(t.unmap(0x5000, 0x5f_ffff).unwrap().len(), 1);
    }

    #[test]
    fn permissions_are_kept_per_leaf() {
        let mut t = MappingTable::new(12);
        let mut ro = m(0x1000, 0x1fff, 0x8000);
        ro.perms = PERM_READ;
        let mut wo = m(0x2000, 0x2fff, 0x9000);
        wo.perms = PERM_WRITE;
        t.insert(ro);
        t.insert(wo);
        assert_eq!(t.lookup(0x1004).unwrap().perms, PERM_READ);
        assert_eq!(t.lookup(0x2004).unwrap().perms, PERM_WRITE);
        assert_eq!(t.lookup(0x2ff0).unwrap().first, 0x2000);
        assert!(t.lookup(0x3000).is_none());
        let mut all: Vec<Mapping> = t.iter().collect();
        all.sort_by_key(|x| x.start);
        assert_eq!(all, vec![ro, wo]);
    }
}
