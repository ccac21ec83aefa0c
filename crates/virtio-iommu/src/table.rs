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
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use arena::NodeArena;
pub use arena::OutOfMemory;

use crate::seqlock::{race_point, RacePoint, SeqCount};
use crate::stats::HitCounter;

mod arena;

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

const BITS: u32 = 9;
const FANOUT: usize = 1 << BITS;
const TAG_LEAF: u64 = 1;
const TAG_START: u64 = 0b1000;
const TAG_MASK: u64 = 0b1111;
/// Where a table entry keeps its child's count of non-empty entries (0..=512).
const LIVE_SHIFT: u32 = 1;
const LIVE_MASK: u64 = 0x3ff;
/// The child's address in a table entry (nodes are page-aligned).
const NODE_ADDR_MASK: u64 = !(arena::NODE_SIZE as u64 - 1);

/// One radix node: exactly a page, so that nodes pack into huge pages (see [`arena`]).
/// Entry encoding (u64): 0 = empty; bit 0 set = leaf whose upper bits are the guest-physical
/// address of the block start, bits 1-2 the permissions and bit 3 set when the block starts
/// its mapping; otherwise a table entry: the child node's address, and in bits 1-10 how many
/// of the child's entries are non-empty (kept there for the writer, which frees a child when
/// it empties, so that a node carries no bookkeeping of its own).
///
/// Entries are atomics because lock-free readers (see `RadixRoot`) walk nodes while the
/// writer changes them.
struct Node {
    entries: [AtomicU64; FANOUT],
}

impl Node {
    #[inline]
    fn get(&self, idx: usize) -> u64 {
        self.entries[idx].load(Ordering::Relaxed)
    }

    /// Release: a reader that sees a child address also sees the child's initialisation.
    #[inline]
    fn set(&self, idx: usize, entry: u64) {
        self.entries[idx].store(entry, Ordering::Release)
    }
}

/// The table entry pointing at `node`, which has `live` non-empty entries.
fn table_entry(node: NonNull<Node>, live: u32) -> u64 {
    // Nodes are page-aligned, so the low bits are free: bit 0 (the leaf tag) stays clear and
    // the entry is non-zero.
    node.as_ptr().expose_provenance() as u64 | (u64::from(live) << LIVE_SHIFT)
}

/// The node a table entry (non-zero, bit 0 clear) points at.
#[inline]
fn child_of(entry: u64) -> *const Node {
    std::ptr::with_exposed_provenance((entry & NODE_ADDR_MASK) as usize)
}

/// The blocks of a node at the level of `shift` (its span starting at `base`) that
/// `[start, end]` touches: each block's entry index, first and last IOVA.
fn blocks(shift: u32, base: u64, start: u64, end: u64) -> impl Iterator<Item = (usize, u64, u64)> {
    let mask = (1u64 << shift) - 1;
    let first = ((start - base) >> shift) as usize;
    let last = ((end - base) >> shift) as usize;
    (first..=last).map(move |idx| {
        let bstart = base + ((idx as u64) << shift);
        (idx, bstart, bstart | mask)
    })
}

/// How many non-empty entries the child of a table entry has.
fn live_of(entry: u64) -> u32 {
    ((entry >> LIVE_SHIFT) & LIVE_MASK) as u32
}

/// The reader-visible half of a radix table: what a lock-free translation needs, at an
/// address that stays put while the owning [`MappingTable`] moves, and the sequence count
/// that tells readers whether a walk raced with a change.
///
/// Soundness of lock-free walks rests on type-stable memory: a table's nodes (and this root)
/// are freed only when the table is dropped, never while it lives (emptied nodes go to the
/// table's own free list and are reused zeroed), and every non-zero, non-leaf entry ever
/// stored holds the address of one of them. So a racing reader always dereferences live
/// nodes of the same table, whatever mix of old and new entries it sees; the sequence count
/// then rejects the mix. The device never drops a table while readers may hold it.
#[derive(Debug)]
pub(crate) struct RadixRoot {
    seq: SeqCount,
    levels: AtomicU32,
    shift: u32,
    top: NonNull<Node>,
    /// Successful translations through this table, counted by the device.
    hits: HitCounter,
}

// SAFETY: `top` points at a node owned by the same table and valid as long as this root;
// shared access only performs atomic operations on it.
unsafe impl Send for RadixRoot {}
// SAFETY: as above.
unsafe impl Sync for RadixRoot {}

impl RadixRoot {
    fn level_shift(&self, level: u32) -> u32 {
        self.shift + BITS * level
    }

    /// Radix walk with atomic loads only. Exact when no writer runs (the caller holds the
    /// table or the device state lock); otherwise validate through [`Self::seq`].
    #[inline]
    pub(crate) fn lookup(&self, iova: u64) -> Option<Hit> {
        let levels = self.levels.load(Ordering::Relaxed);
        // Read once: the acquire loads below keep the compiler from reusing a field load made
        // after them, so `level_shift` inside the loop would reload `shift` at every level.
        let base_shift = self.shift;
        let top = base_shift + BITS * levels;
        if top < 64 && iova >> top != 0 {
            return None;
        }
        // SAFETY: `top` lives as long as `self` (see the type's doc).
        let mut node: &Node = unsafe { self.top.as_ref() };
        let mut level = levels.saturating_sub(1);
        loop {
            let shift = base_shift + BITS * level;
            // Acquire: a child address read here comes with the child's initialisation.
            let entry =
                node.entries[(iova >> shift) as usize & (FANOUT - 1)].load(Ordering::Acquire);
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
            race_point(RacePoint::Level);
            // SAFETY: a non-zero entry with bit 0 clear was stored by `table_entry` from a
            // node of this table, and nodes are freed only with the table (type's doc).
            node = unsafe { &*child_of(entry) };
            level -= 1;
        }
    }

    /// The table's sequence count (odd while the table changes).
    #[inline]
    pub(crate) fn seq(&self) -> &SeqCount {
        &self.seq
    }

    /// Successful translations through this table.
    #[inline]
    pub(crate) fn hits(&self) -> &HitCounter {
        &self.hits
    }
}

/// Radix page table (writer side). Nodes come from the table's [`NodeArena`] and never move;
/// see [`RadixRoot`] for the reader side.
#[derive(Debug)]
struct Radix {
    root: NonNull<RadixRoot>,
    max_levels: u32,
    /// Non-empty entries of the top node (the others' counts are in their parents' entries).
    top_live: u32,
    arena: NodeArena,
}

// SAFETY: `Radix` owns its root and nodes exclusively (like a `Box`); through `&Radix` only
// atomic operations touch them.
unsafe impl Send for Radix {}
// SAFETY: as above.
unsafe impl Sync for Radix {}

impl Drop for Radix {
    fn drop(&mut self) {
        // SAFETY: allocated in `Radix::new` and freed only here, once. The nodes go with the
        // arena.
        drop(unsafe { Box::from_raw(self.root.as_ptr()) });
    }
}

impl Radix {
    fn new(shift: u32, max_nodes: usize) -> Self {
        let mut arena = NodeArena::new(max_nodes);
        let Ok(top) = arena.alloc() else {
            // What `Box::new` does when the allocator fails, as the arena's first nodes come
            // from the same allocator.
            std::alloc::handle_alloc_error(arena::node_layout())
        };
        let root = Box::new(RadixRoot {
            seq: SeqCount::default(),
            levels: AtomicU32::new(1),
            shift,
            top,
            hits: HitCounter::default(),
        });
        Radix {
            root: NonNull::from(Box::leak(root)),
            max_levels: (64 - shift).div_ceil(BITS),
            top_live: 0,
            arena,
        }
    }

    #[inline]
    fn root(&self) -> &RadixRoot {
        // SAFETY: allocated in `new`, freed only in `drop`.
        unsafe { self.root.as_ref() }
    }

    #[inline]
    fn node(&self, n: NonNull<Node>) -> &Node {
        // SAFETY: every node handled by this radix comes from `self.arena`, which frees nodes
        // only when it is dropped.
        unsafe { n.as_ref() }
    }

    fn child(&self, entry: u64) -> NonNull<Node> {
        // Table entries are never null (see `table_entry`).
        NonNull::new(child_of(entry).cast_mut()).unwrap_or(self.root().top)
    }

    fn top(&self) -> NonNull<Node> {
        self.root().top
    }

    fn levels(&self) -> u32 {
        self.root().levels.load(Ordering::Relaxed)
    }

    fn level_shift(&self, level: u32) -> u32 {
        self.root().level_shift(level)
    }

    /// Number of low IOVA bits the current tree covers (may exceed 64 at full height).
    fn covered_bits(&self) -> u32 {
        self.level_shift(self.levels())
    }

    #[inline]
    fn lookup(&self, iova: u64) -> Option<Hit> {
        self.root().lookup(iova)
    }

    /// Run a change under the sequence count, so lock-free readers retry around it.
    fn write<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        self.root().seq.write_begin();
        let r = f(self);
        self.root().seq.write_end();
        r
    }

    /// Make sure the next `map` cannot run out of nodes halfway: growing the tree takes at
    /// most one node per level, and filling a range at most two per level (one partial block
    /// at each end).
    fn reserve(&mut self) -> Result<(), OutOfMemory> {
        self.arena.reserve(3 * self.max_levels as usize)
    }

    /// A node `reserve` set aside.
    fn alloc(&mut self) -> NonNull<Node> {
        self.arena
            .alloc()
            .unwrap_or_else(|_| unreachable!("`map` reserves its nodes before changing the tree"))
    }

    /// Add levels on top until `end` is covered. The old top's content moves under slot 0.
    fn ensure_covers(&mut self, end: u64) {
        while self.levels() < self.max_levels && end >> self.covered_bits() != 0 {
            if self.top_live != 0 {
                let child = self.alloc();
                let (t, c) = (self.node(self.top()), self.node(child));
                for i in 0..FANOUT {
                    c.set(i, t.get(i));
                    t.set(i, 0);
                }
                t.set(0, table_entry(child, self.top_live));
                self.top_live = 1;
            }
            self.root()
                .levels
                .store(self.levels() + 1, Ordering::Relaxed);
        }
    }

    fn map(&mut self, m: &Mapping) -> Result<(), OutOfMemory> {
        self.reserve()?;
        self.write(|r| {
            r.ensure_covers(m.end);
            let leaf_bits = (u64::from(m.perms & 0b11) << 1) | TAG_LEAF;
            r.top_live += r.map_in(r.top(), r.levels() - 1, 0, m.start, m.end, m, leaf_bits);
        });
        Ok(())
    }

    /// Fill `[start, end]` (inside the node's span starting at `base`) with leaves, using the
    /// largest blocks that fit; returns how many of the node's entries it filled. The range
    /// table guarantees the range is empty here.
    #[allow(clippy::too_many_arguments)]
    fn map_in(
        &mut self,
        node: NonNull<Node>,
        level: u32,
        base: u64,
        start: u64,
        end: u64,
        m: &Mapping,
        leaf_bits: u64,
    ) -> u32 {
        let mut filled = 0;
        for (idx, bstart, bend) in blocks(self.level_shift(level), base, start, end) {
            let s = start.max(bstart);
            let e = end.min(bend);
            let entry = self.node(node).get(idx);
            if s == bstart && e == bend {
                debug_assert_eq!(entry, 0, "radix overlap at {bstart:#x}");
                let phys = m.phys.wrapping_add(bstart - m.start);
                let start_bit = if bstart == m.start { TAG_START } else { 0 };
                self.node(node)
                    .set(idx, (phys & !TAG_MASK) | leaf_bits | start_bit);
                filled += 1;
            } else {
                debug_assert!(level > 0 && entry & TAG_LEAF == 0);
                let (child, live) = if entry == 0 {
                    filled += 1;
                    (self.alloc(), 0)
                } else {
                    (self.child(entry), live_of(entry))
                };
                // The child is filled before its (new) entry publishes it.
                let added = self.map_in(child, level - 1, bstart, s, e, m, leaf_bits);
                self.node(node).set(idx, table_entry(child, live + added));
            }
        }
        filled
    }

    /// Clear the leaves `map_in` created for exactly `[start, end]` (no sequence count: the
    /// caller wraps it in `write`).
    fn unmap(&mut self, start: u64, end: u64) {
        self.top_live -= self.unmap_in(self.top(), self.levels() - 1, 0, start, end);
    }

    /// Clear the leaves `map_in` created for exactly `[start, end]`, freeing emptied nodes;
    /// returns how many of the node's entries it emptied.
    fn unmap_in(
        &mut self,
        node: NonNull<Node>,
        level: u32,
        base: u64,
        start: u64,
        end: u64,
    ) -> u32 {
        let mut emptied = 0;
        for (idx, bstart, bend) in blocks(self.level_shift(level), base, start, end) {
            let entry = self.node(node).get(idx);
            if entry == 0 {
                continue;
            }
            if entry & TAG_LEAF != 0 {
                self.node(node).set(idx, 0);
                emptied += 1;
            } else {
                let child = self.child(entry);
                let removed =
                    self.unmap_in(child, level - 1, bstart, start.max(bstart), end.min(bend));
                let live = live_of(entry) - removed;
                if live == 0 {
                    self.node(node).set(idx, 0);
                    self.arena.release(child);
                    emptied += 1;
                } else {
                    self.node(node).set(idx, table_entry(child, live));
                }
            }
        }
        emptied
    }

    /// Remove everything: every node but the top goes to the free list, one level remains.
    fn clear(&mut self) {
        self.write(|r| {
            let top = r.top();
            r.clear_in(top, r.levels() - 1);
            r.top_live = 0;
            r.root().levels.store(1, Ordering::Relaxed);
        })
    }

    fn clear_in(&mut self, node: NonNull<Node>, level: u32) {
        for idx in 0..FANOUT {
            let entry = self.node(node).get(idx);
            if entry == 0 {
                continue;
            }
            if entry & TAG_LEAF == 0 && level > 0 {
                let child = self.child(entry);
                self.clear_in(child, level - 1);
                self.arena.release(child);
            }
            self.node(node).set(idx, 0);
        }
    }

    /// The end of `[start, end]` clipped to the IOVAs the tree covers now, or `None` if the
    /// range starts beyond them.
    fn clip(&self, start: u64, end: u64) -> Option<u64> {
        let top = self.covered_bits();
        if top >= 64 {
            Some(end)
        } else if start >> top != 0 {
            None
        } else {
            Some(end.min((1u64 << top) - 1))
        }
    }

    /// Whether no leaf intersects `[start, end]`. Table entries always hold at least one
    /// leaf (emptied nodes are freed), so a table wholly inside the range means "not empty".
    fn range_is_empty(&self, start: u64, end: u64) -> bool {
        match self.clip(start, end) {
            Some(end) => self.empty_in(self.top(), self.levels() - 1, 0, start, end),
            None => true,
        }
    }

    fn empty_in(&self, node: NonNull<Node>, level: u32, base: u64, start: u64, end: u64) -> bool {
        blocks(self.level_shift(level), base, start, end).all(|(idx, bstart, bend)| {
            let entry = self.node(node).get(idx);
            if entry == 0 {
                true
            } else if entry & TAG_LEAF != 0 || (start <= bstart && bend <= end) {
                false
            } else {
                let child = self.child(entry);
                self.empty_in(child, level - 1, bstart, start.max(bstart), end.min(bend))
            }
        })
    }

    /// The first leaf intersecting `[from, to]`, in IOVA order: `(block start, entry)`. The
    /// block may start before `from` when `from` falls inside a large leaf.
    fn first_leaf(&self, from: u64, to: u64) -> Option<(u64, u64)> {
        let to = self.clip(from, to)?;
        self.first_in(self.top(), self.levels() - 1, 0, from, to)
    }

    fn first_in(
        &self,
        node: NonNull<Node>,
        level: u32,
        base: u64,
        from: u64,
        to: u64,
    ) -> Option<(u64, u64)> {
        for (idx, bstart, bend) in blocks(self.level_shift(level), base, from, to) {
            let entry = self.node(node).get(idx);
            if entry == 0 {
                continue;
            }
            if entry & TAG_LEAF != 0 {
                return Some((bstart, entry));
            }
            let child = self.child(entry);
            let hit = self.first_in(child, level - 1, bstart, from.max(bstart), to.min(bend));
            if hit.is_some() {
                return hit;
            }
        }
        None
    }

    fn node_count(&self) -> usize {
        self.arena.in_use()
    }
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
        &self.radix.root().hits
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
