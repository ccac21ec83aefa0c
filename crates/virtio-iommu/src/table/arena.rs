//! Where radix nodes live.
//!
//! A random translation over a large table touches one leaf node among thousands, and on
//! 4 KiB pages each of those is also a TLB miss: a page walk that, in a VMM nested in a VM,
//! is two-dimensional. At 1 M scattered mappings that walk, not the radix lookup itself,
//! made random hits two to five times slower, and how much depended on how busy the host's
//! caches were. So once a table is large, its nodes come from 2 MiB chunks advised to live
//! on transparent huge pages, where a few TLB entries cover every leaf.
//!
//! A small table keeps individually allocated nodes: most domains hold a few mappings, and a
//! huge page each would cost 2 MiB of RAM per domain for nothing.
//!
//! Nodes are page-sized and page-aligned, zeroed when handed out, and freed only when the
//! arena is dropped (emptied ones go to a free list): lock-free readers rely on that. An arena
//! hands out at most its limit of nodes: the guest decides where its mappings go, and one
//! 4 KiB mapping per 2 MiB costs a leaf node each, so without a limit a domain's 2 M mappings
//! could take 8 GiB of host memory.

use std::alloc::Layout;
use std::ptr::NonNull;

use super::radix::Node;

/// Size and alignment of a node.
pub(super) const NODE_SIZE: usize = 4096;
/// Size and alignment of a huge-page chunk.
const CHUNK_SIZE: usize = 2 << 20;
const CHUNK_NODES: usize = CHUNK_SIZE / NODE_SIZE;
/// Nodes allocated one by one before a table switches to chunks (256 KiB).
const SMALL_TABLE_NODES: usize = 64;

const _: () = assert!(std::mem::size_of::<Node>() == NODE_SIZE);

#[cfg(test)]
thread_local! {
    /// Test-only: `map_chunk` fails on this thread, as when the kernel refuses memory.
    static REFUSE_CHUNKS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The host refused memory for new nodes, or the arena reached its limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfMemory;

#[derive(Debug)]
pub(super) struct NodeArena {
    /// Most nodes ever taken from the allocator or the kernel.
    limit: usize,
    /// Nodes allocated one by one (the first [`SMALL_TABLE_NODES`]).
    singles: Vec<NonNull<Node>>,
    /// Chunks of [`CHUNK_NODES`] nodes; only the last one may have nodes never handed out.
    chunks: Vec<NonNull<Node>>,
    /// Nodes of the last chunk handed out so far.
    chunk_used: usize,
    /// Zeroed nodes ready to be handed out again.
    free: Vec<NonNull<Node>>,
}

// SAFETY: the arena owns its memory exclusively (like a `Box`); the pointers are only
// addresses of that memory.
unsafe impl Send for NodeArena {}
// SAFETY: as above; `&NodeArena` gives no access to the nodes.
unsafe impl Sync for NodeArena {}

impl NodeArena {
    /// An empty arena that hands out at most `limit` nodes (at least one).
    pub(super) fn new(limit: usize) -> Self {
        NodeArena {
            limit: limit.max(1),
            singles: Vec::new(),
            chunks: Vec::new(),
            chunk_used: 0,
            free: Vec::new(),
        }
    }

    /// Make sure `n` nodes can be handed out without asking the host for memory.
    pub(super) fn reserve(&mut self, n: usize) -> Result<(), OutOfMemory> {
        while self.free.len() < n {
            let node = self.fresh()?;
            self.free.push(node);
        }
        Ok(())
    }

    /// A zeroed node.
    pub(super) fn alloc(&mut self) -> Result<NonNull<Node>, OutOfMemory> {
        match self.free.pop() {
            Some(node) => Ok(node),
            None => self.fresh(),
        }
    }

    /// Take back a node whose entries are all zero again.
    pub(super) fn release(&mut self, node: NonNull<Node>) {
        self.free.push(node);
    }

    /// Nodes handed out and not released.
    pub(super) fn in_use(&self) -> usize {
        self.allocated() - self.free.len()
    }

    /// Nodes ever taken from the allocator or the kernel (all of them are kept).
    pub(super) fn allocated(&self) -> usize {
        let chunked = match self.chunks.len() {
            0 => 0,
            n => (n - 1) * CHUNK_NODES + self.chunk_used,
        };
        self.singles.len() + chunked
    }

    /// Memory never handed out before (zero from the allocator or the kernel).
    fn fresh(&mut self) -> Result<NonNull<Node>, OutOfMemory> {
        if self.allocated() >= self.limit {
            return Err(OutOfMemory);
        }
        if self.singles.len() < SMALL_TABLE_NODES {
            // SAFETY: the layout has a non-zero size.
            let p = unsafe { std::alloc::alloc_zeroed(node_layout()) };
            let node = NonNull::new(p.cast::<Node>()).ok_or(OutOfMemory)?;
            self.singles.push(node);
            return Ok(node);
        }
        if self.chunks.is_empty() || self.chunk_used == CHUNK_NODES {
            self.chunks.push(map_chunk()?);
            self.chunk_used = 0;
        }
        let chunk = self.chunks[self.chunks.len() - 1];
        // SAFETY: `chunk_used < CHUNK_NODES`, so the node lies inside the chunk.
        let node = unsafe { chunk.add(self.chunk_used) };
        self.chunk_used += 1;
        Ok(node)
    }
}

impl Drop for NodeArena {
    fn drop(&mut self) {
        for node in self.singles.drain(..) {
            // SAFETY: allocated in `fresh` with this layout, freed only here, once.
            unsafe { std::alloc::dealloc(node.as_ptr().cast(), node_layout()) };
        }
        for chunk in self.chunks.drain(..) {
            // SAFETY: mapped by `map_chunk` with this length, unmapped only here, once.
            unsafe { libc::munmap(chunk.as_ptr().cast(), CHUNK_SIZE) };
        }
    }
}

pub(super) fn node_layout() -> Layout {
    // Page alignment also leaves the low 12 bits of a node's address free for the entry
    // that points at it (see `table_entry`).
    Layout::from_size_align(NODE_SIZE, NODE_SIZE).unwrap_or_else(|_| unreachable!())
}

/// A zeroed, `CHUNK_SIZE`-aligned anonymous mapping advised onto transparent huge pages. The
/// advice is only that: without huge pages the chunk works on small ones.
fn map_chunk() -> Result<NonNull<Node>, OutOfMemory> {
    #[cfg(test)]
    if REFUSE_CHUNKS.get() {
        return Err(OutOfMemory);
    }
    // Twice the size, then the unaligned ends trimmed: mmap only promises page alignment.
    let len = 2 * CHUNK_SIZE;
    // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return Err(OutOfMemory);
    }
    let raw = raw.cast::<u8>();
    let head = raw.align_offset(CHUNK_SIZE);
    // SAFETY: `head < CHUNK_SIZE`, so the aligned chunk and both trimmed ends lie inside the
    // mapping just made, which nothing else uses yet.
    unsafe {
        let chunk = raw.add(head);
        if head > 0 {
            libc::munmap(raw.cast(), head);
        }
        libc::munmap(chunk.add(CHUNK_SIZE).cast(), CHUNK_SIZE - head);
        libc::madvise(chunk.cast(), CHUNK_SIZE, libc::MADV_HUGEPAGE);
        Ok(NonNull::new_unchecked(chunk.cast()))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::protocol::VIRTIO_IOMMU_MAP_F_READ;
    use crate::table::{InsertError, Mapping, MappingTable, PERM_READ};
    use crate::test_common::{attach, device, gpa_of, map};
    use crate::{Access, EndpointConfig, ExternalMapper, MapPerms, MapperError, Status};

    #[test]
    fn small_tables_allocate_nodes_one_by_one_then_chunks() {
        let mut a = NodeArena::new(usize::MAX);
        let nodes: Vec<_> = (0..SMALL_TABLE_NODES + 3)
            .map(|_| a.alloc().unwrap())
            .collect();
        assert_eq!(a.singles.len(), SMALL_TABLE_NODES);
        assert_eq!(a.chunks.len(), 1);
        assert_eq!(a.in_use(), SMALL_TABLE_NODES + 3);
        for n in &nodes {
            assert_eq!(n.as_ptr() as usize % NODE_SIZE, 0);
        }
        let first_chunked = nodes[SMALL_TABLE_NODES].as_ptr() as usize;
        assert_eq!(first_chunked % CHUNK_SIZE, 0);
        assert_eq!(
            nodes[SMALL_TABLE_NODES + 2].as_ptr() as usize,
            first_chunked + 2 * NODE_SIZE
        );
    }

    #[test]
    fn released_nodes_are_reused_before_new_memory() {
        let mut a = NodeArena::new(usize::MAX);
        let n = a.alloc().unwrap();
        a.release(n);
        assert_eq!(a.in_use(), 0);
        assert_eq!(a.alloc().unwrap(), n);
        a.reserve(5).unwrap();
        assert_eq!(a.free.len(), 5);
        assert_eq!(a.in_use(), 1);
    }

    #[test]
    fn chunks_fill_before_the_next_one_is_mapped() {
        let mut a = NodeArena::new(usize::MAX);
        a.reserve(SMALL_TABLE_NODES + CHUNK_NODES + 1).unwrap();
        assert_eq!(a.chunks.len(), 2);
        assert_eq!(a.chunk_used, 1);
        assert_eq!(a.in_use(), 0);
        // Fresh chunk memory reads as zero, as a node handed out must.
        let last = a.alloc().unwrap();
        // SAFETY: a node of this arena, alive until it is dropped.
        let node = unsafe { last.as_ref() };
        assert!(node
            .entries
            .iter()
            .all(|e| e.load(std::sync::atomic::Ordering::Relaxed) == 0));
    }

    fn page_at(i: u64) -> Mapping {
        // One 4 KiB mapping per 2 MiB: each needs a leaf node of its own.
        Mapping {
            start: i << 21,
            end: (i << 21) + 0xfff,
            phys: i << 12,
            perms: PERM_READ,
            mmio: false,
        }
    }

    /// However the guest places its mappings, a table takes at most its node limit; the
    /// insert that would need more fails cleanly, and inserts work again once UNMAPs have
    /// given nodes back.
    #[test]
    fn a_table_stops_at_its_node_limit() {
        const LIMIT: usize = 200;
        let mut t = MappingTable::with_node_limit(12, LIMIT);
        let mut i = 0;
        let refused = loop {
            match t.insert(page_at(i)) {
                Ok(()) => i += 1,
                Err(e) => break e,
            }
            assert!(i < 10 * LIMIT as u64, "no limit");
        };
        assert_eq!(refused, InsertError::OutOfMemory);
        assert!(t.radix.arena.allocated() <= LIMIT);
        assert!(i > LIMIT as u64 / 2, "{i}");
        assert_eq!(t.len() as u64, i);
        assert!(t.lookup(i << 21).is_none());
        // Full until nodes come back: an insert reserves a worst case of nodes first.
        for j in 0..20 {
            assert!(t.remove(j << 21).is_some());
        }
        assert_eq!(t.insert(page_at(i)), Ok(()));
        assert!(t.radix.arena.allocated() <= LIMIT);
    }

    #[test]
    fn insert_without_memory_changes_nothing() {
        let mut t = MappingTable::new(12);
        REFUSE_CHUNKS.set(true);
        let mut i = 0;
        let refused = loop {
            match t.insert(page_at(i)) {
                Ok(()) => i += 1,
                Err(e) => break e,
            }
        };
        assert_eq!(refused, InsertError::OutOfMemory);
        assert!(i > 0 && i < SMALL_TABLE_NODES as u64, "{i}");
        assert_eq!(t.len() as u64, i);
        assert!(t.lookup(i << 21).is_none());
        assert_eq!(t.reserve(), Err(OutOfMemory));
        REFUSE_CHUNKS.set(false);
        assert_eq!(t.insert(page_at(i)), Ok(()));
        assert_eq!(t.lookup(i << 21).unwrap().phys, i << 12);
    }

    #[derive(Default)]
    struct CountingMapper(AtomicU64);

    impl ExternalMapper for CountingMapper {
        fn map(&self, _: u64, _: u64, _: u64, _: MapPerms) -> Result<(), MapperError> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        fn unmap(&self, _: u64, _: u64) -> Result<(), MapperError> {
            Ok(())
        }
        fn set_identity(&self, _: bool) -> Result<(), MapperError> {
            Ok(())
        }
    }

    #[test]
    fn map_without_memory_is_nomem_before_the_mapper_sees_it() {
        let dev = device();
        let mapper = Arc::new(CountingMapper::default());
        let config = EndpointConfig {
            mapper: Some(mapper.clone()),
            ..Default::default()
        };
        dev.add_endpoint(8, config).unwrap();
        assert_eq!(attach(&dev, 1, 8), Status::Ok);
        let map_page = |i: u64| {
            let m = page_at(i);
            map(&dev, 1, m.start, m.end, m.phys, VIRTIO_IOMMU_MAP_F_READ)
        };
        REFUSE_CHUNKS.set(true);
        let mut i = 0;
        while map_page(i) == Status::Ok {
            i += 1;
        }
        assert!(i > 0 && i < SMALL_TABLE_NODES as u64, "{i}");
        assert_eq!(map_page(i), Status::NoMem);
        assert_eq!(mapper.0.load(Ordering::Relaxed), i);
        assert!(dev.translate(8, i << 21, 8, Access::Read).is_err());
        REFUSE_CHUNKS.set(false);
        assert_eq!(map_page(i), Status::Ok);
        assert_eq!(mapper.0.load(Ordering::Relaxed), i + 1);
        assert_eq!(gpa_of(&dev, 8, i << 21), i << 12);
    }
}
