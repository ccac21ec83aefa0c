//! The radix page table of a domain, like a hardware IOMMU's: translation, overlap checks
//! and ordered walks (the leaf at a mapping's first IOVA is tagged START). It has 512-entry
//! nodes over the IOVA page number, grows its height only as far as the highest mapped IOVA
//! needs (typical guests map below 4 GiB: three levels at 4 KiB granule), and stores large
//! aligned blocks as leaves at upper levels, so a 1 GiB mapping costs one entry, not 262144.
//! A lookup is a handful of dependent loads with no comparisons, which is what makes random
//! hits over a million mappings several times faster than an ordered-map search.
//!
//! One writer (under the device's lock) and lock-free readers: see [`RadixRoot`].

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::arena::{self, NodeArena, OutOfMemory};
use super::{Hit, Mapping};
use crate::seqlock::{race_point, RacePoint, SeqCount};
use crate::stats::HitCounter;

const BITS: u32 = 9;
const FANOUT: usize = 1 << BITS;
const TAG_LEAF: u64 = 1;
/// Tags the leaf at a mapping's first IOVA.
pub(super) const TAG_START: u64 = 0b1000;
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
pub(super) struct Node {
    pub(super) entries: [AtomicU64; FANOUT],
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
pub(super) struct Radix {
    pub(super) root: NonNull<RadixRoot>,
    max_levels: u32,
    /// Non-empty entries of the top node (the others' counts are in their parents' entries).
    top_live: u32,
    pub(super) arena: NodeArena,
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
    pub(super) fn new(shift: u32, max_nodes: usize) -> Self {
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
    pub(super) fn root(&self) -> &RadixRoot {
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
    pub(super) fn lookup(&self, iova: u64) -> Option<Hit> {
        self.root().lookup(iova)
    }

    /// Run a change under the sequence count, so lock-free readers retry around it.
    pub(super) fn write<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        self.root().seq.write_begin();
        let r = f(self);
        self.root().seq.write_end();
        r
    }

    /// Make sure the next `map` cannot run out of nodes halfway: growing the tree takes at
    /// most one node per level, and filling a range at most two per level (one partial block
    /// at each end).
    pub(super) fn reserve(&mut self) -> Result<(), OutOfMemory> {
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

    pub(super) fn map(&mut self, m: &Mapping) -> Result<(), OutOfMemory> {
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
    pub(super) fn unmap(&mut self, start: u64, end: u64) {
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
    pub(super) fn clear(&mut self) {
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
    pub(super) fn range_is_empty(&self, start: u64, end: u64) -> bool {
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
    pub(super) fn first_leaf(&self, from: u64, to: u64) -> Option<(u64, u64)> {
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

    pub(super) fn node_count(&self) -> usize {
        self.arena.in_use()
    }
}
