//! Arbitrary split rings in a small guest memory, shared by the virtio-devices targets.
//!
//! The input decides each ring's size, descriptor table, avail ring and a shared area of
//! indirect tables. Descriptors point into the data area, across the end of guest memory,
//! far outside it or at addresses that wrap, with lengths up to 4 GiB, but never at the rings
//! or the indirect area: a device's writes then cannot change what a chain is, so the chains
//! virtio-queue walks before the device runs are the reference the targets check against.
//!
//! Guest memory starts filled with a pattern; [`Written`] finds any byte a device changed
//! outside what it was allowed to write.

use std::ops::Range;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest RAM: 64 KiB at 0.
pub const MEM_SIZE: u64 = 0x1_0000;
/// Where descriptors point: everything above the rings and indirect tables.
pub const DATA: u64 = 0x2000;
/// Each ring's descriptor table, avail and used rings, in one 2 KiB block.
const RING_BLOCK: u64 = 0x800;
const AVAIL_OFFSET: u64 = 0x200;
const USED_OFFSET: u64 = 0x300;
/// Indirect tables: 128 descriptors from the input, shared by all rings.
const INDIRECT: u64 = 0x1000;
const INDIRECT_SLOTS: u64 = 128;
/// Longest indirect table a descriptor names, so that every table stays in the area.
const MAX_INDIRECT_LEN: u64 = 8;
/// Largest queue: 32 descriptors (512 bytes), avail 70 bytes, used 262 bytes per block.
const MAX_SIZE_LOG2: u8 = 5;

const F_NEXT: u8 = 1;
const F_WRITE: u8 = 2;
const F_INDIRECT: u8 = 4;
/// Not virtio flags: both bits set make the length huge (up to 4 GiB).
const F_HUGE: u8 = 0x18;

/// The input as a byte stream; past its end every read is zero, so any input is valid.
pub struct Input<'a>(pub &'a [u8]);

impl Input<'_> {
    pub fn u8(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    /// Whatever is left.
    pub fn rest(&mut self) -> &[u8] {
        std::mem::take(&mut self.0)
    }
}

/// Guest memory filled with the pattern [`Written`] compares against.
pub fn guest_memory() -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let pattern: Vec<u8> = (0..MEM_SIZE).map(|i| (i * 131 + (i >> 8)) as u8).collect();
    mem.write_slice(&pattern, GuestAddress(0)).unwrap();
    mem
}

/// Copies `payload` into the data area, as far as it goes: request headers, frames.
pub fn fill_data(mem: &GuestMemoryMmap, payload: &[u8]) {
    let len = payload.len().min((MEM_SIZE - DATA) as usize);
    mem.write_slice(&payload[..len], GuestAddress(DATA))
        .unwrap();
}

/// A copy of all guest memory.
pub fn snapshot(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut bytes = vec![0; MEM_SIZE as usize];
    mem.read_slice(&mut bytes, GuestAddress(0)).unwrap();
    bytes
}

/// One descriptor of a reference chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

impl Desc {
    /// The part inside guest memory, as a byte range of it.
    pub fn in_memory(&self) -> Range<usize> {
        let start = self.addr.min(MEM_SIZE);
        let end = self.addr.saturating_add(u64::from(self.len)).min(MEM_SIZE);
        start as usize..end as usize
    }

    /// Whether all of it is guest memory (so an access to it must succeed). An empty buffer
    /// is, wherever it points: a device moves nothing through it (found by `rng` and
    /// `console`: empty descriptors at 1 TiB between real ones).
    pub fn accessible(&self) -> bool {
        self.len == 0
            || self
                .addr
                .checked_add(u64::from(self.len))
                .is_some_and(|end| end <= MEM_SIZE)
    }

    /// Its bytes in `mem`, if all are guest memory.
    pub fn bytes<'m>(&self, mem: &'m [u8]) -> Option<&'m [u8]> {
        self.accessible().then(|| &mem[self.in_memory()])
    }
}

/// One avail entry and the chain a device reads from it.
#[derive(Clone, Debug)]
pub struct Chain {
    pub head: u16,
    pub descs: Vec<Desc>,
    /// The chain breaks the rules (an indirect table not negotiated, malformed or nested, a
    /// loop, a next index or head past its table, more than 4 GiB): the device returns it
    /// unused (length 0) without handling it, and `descs` is empty.
    pub refused: bool,
}

impl Chain {
    pub fn writable_len(&self) -> u64 {
        self.descs
            .iter()
            .filter(|d| d.writable)
            .map(|d| u64::from(d.len))
            .sum()
    }
}

/// A ring laid out from the input.
pub struct Ring {
    base: u64,
    pub size: u16,
    /// What the driver made available, walked before any device ran.
    pub chains: Vec<Chain>,
}

impl Ring {
    /// Reads ring number `index` (each has its own block) from `input` and lays it out.
    /// Its avail index is the number of entries, at most the size.
    pub fn build(mem: &GuestMemoryMmap, index: u64, input: &mut Input) -> Ring {
        let base = index * RING_BLOCK;
        // A driver starts with zeroed rings.
        let zeros = [0u8; (RING_BLOCK - AVAIL_OFFSET) as usize];
        mem.write_slice(&zeros, GuestAddress(base + AVAIL_OFFSET))
            .unwrap();
        let size = 1u16 << (1 + input.u8() % MAX_SIZE_LOG2);
        for i in 0..u64::from(size) {
            write_desc(mem, base + i * 16, input);
        }
        let count = u16::from(input.u8()) % (size + 1);
        for i in 0..count {
            let b = input.u8();
            // Mostly chains at their own index; sometimes any head, repeated or past the table.
            let head = if b & 0x80 != 0 {
                u16::from(b & 0x7f)
            } else {
                i
            };
            mem.write_obj(
                head,
                GuestAddress(base + AVAIL_OFFSET + 4 + 2 * u64::from(i)),
            )
            .unwrap();
        }
        let ring = Ring {
            base,
            size,
            chains: Vec::new(),
        };
        ring.set_avail_idx(mem, count);
        // used_event, for EVENT_IDX.
        let used_event = input.u16();
        mem.write_obj(
            used_event,
            GuestAddress(base + AVAIL_OFFSET + 4 + 2 * u64::from(size)),
        )
        .unwrap();
        ring
    }

    /// Walks the chains made available, as a device will (taking indirect tables if
    /// `indirect` was negotiated, and chains of at most `max` descriptors, or of a queue's
    /// worth with `None`): the reference.
    pub fn walk(&mut self, mem: &GuestMemoryMmap, indirect: bool, max: Option<u16>) {
        let max = max.unwrap_or(self.size);
        let mut queue = self.queue();
        let heads: Vec<u16> = std::iter::from_fn(|| queue.pop_descriptor_chain(mem))
            .map(|chain| chain.head_index())
            .collect();
        self.chains = heads
            .into_iter()
            .map(|head| {
                let descs = walk_chain(mem, self.base, self.size, head, indirect)
                    .filter(|descs| descs.len() <= usize::from(max));
                Chain {
                    head,
                    refused: descs.is_none(),
                    descs: descs.unwrap_or_default(),
                }
            })
            .collect();
    }

    pub fn set_avail_idx(&self, mem: &GuestMemoryMmap, idx: u16) {
        mem.write_obj(idx, GuestAddress(self.base + AVAIL_OFFSET + 2))
            .unwrap();
    }

    /// A device-side queue as the transport hands it over.
    pub fn queue(&self) -> Queue {
        let mut queue = Queue::new(self.size).unwrap();
        let set = |addr: u64| (Some(addr as u32), Some((addr >> 32) as u32));
        let (lo, hi) = set(self.base);
        queue.set_desc_table_address(lo, hi);
        let (lo, hi) = set(self.base + AVAIL_OFFSET);
        queue.set_avail_ring_address(lo, hi);
        let (lo, hi) = set(self.base + USED_OFFSET);
        queue.set_used_ring_address(lo, hi);
        queue.set_ready(true);
        queue
    }

    /// The used ring so far, as (head, len).
    pub fn used(&self, mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        let used = self.base + USED_OFFSET;
        let idx: u16 = mem.read_obj(GuestAddress(used + 2)).unwrap();
        (0..u64::from(idx))
            .map(|i| {
                let at = used + 4 + 8 * (i % u64::from(self.size));
                (
                    mem.read_obj(GuestAddress(at)).unwrap(),
                    mem.read_obj(GuestAddress(at + 4)).unwrap(),
                )
            })
            .collect()
    }

    /// The used ring's bytes (flags, index, entries, avail_event): the device writes them.
    pub fn used_range(&self) -> Range<usize> {
        let start = self.base + USED_OFFSET;
        start as usize..(start + 6 + 8 * u64::from(self.size)) as usize
    }

    /// The reference chain at `head`: chains of one head are all the same.
    pub fn chain(&self, head: u32) -> Option<&Chain> {
        self.chains.iter().find(|c| u32::from(c.head) == head)
    }

    /// The chains a device returns before it stops at a head that names no descriptor
    /// (which it refuses and cannot return): each handled, or refused and returned unused.
    pub fn served(&self) -> &[Chain] {
        let end = self
            .chains
            .iter()
            .position(|c| c.head >= self.size)
            .unwrap_or(self.chains.len());
        &self.chains[..end]
    }

    /// Whether every head made available names a descriptor: otherwise returning that chain
    /// fails and the device must report the queue broken.
    pub fn heads_valid(&self) -> bool {
        self.chains.iter().all(|c| c.head < self.size)
    }
}

/// The chain at `head` of the table at `table` (`size` entries), as virtio 1.2 §2.7.5 has
/// it: one indirect table at most, as the last descriptor, of whole entries, followed only if
/// `indirect`; `None` if it breaks a rule.
fn walk_chain(
    mem: &GuestMemoryMmap,
    table: u64,
    size: u16,
    head: u16,
    indirect: bool,
) -> Option<Vec<Desc>> {
    let read = |at: u64| -> Option<(u64, u32, u16, u16)> {
        let mut raw = [0u8; 16];
        mem.read_slice(&mut raw, GuestAddress(at)).ok()?;
        Some((
            u64::from_le_bytes(raw[..8].try_into().unwrap()),
            u32::from_le_bytes(raw[8..12].try_into().unwrap()),
            u16::from_le_bytes(raw[12..14].try_into().unwrap()),
            u16::from_le_bytes(raw[14..].try_into().unwrap()),
        ))
    };
    let (mut table, mut size, mut index, mut in_table) = (table, size, head, false);
    let mut visits = 0u32;
    let mut total = 0u64;
    let mut descs = Vec::new();
    loop {
        visits += 1;
        if index >= size || visits > u32::from(size) {
            return None;
        }
        let (addr, len, flags, next) = read(table.checked_add(16 * u64::from(index))?)?;
        let more = flags & u16::from(F_NEXT) != 0;
        if flags & u16::from(F_INDIRECT) != 0 {
            if !indirect || in_table || more || len % 16 != 0 || len == 0 || len / 16 > 0xffff {
                return None;
            }
            (table, size, index, in_table, visits) = (addr, (len / 16) as u16, 0, true, 0);
            continue;
        }
        total += u64::from(len);
        if total > u64::from(u32::MAX) {
            return None;
        }
        descs.push(Desc {
            addr,
            len,
            writable: flags & u16::from(F_WRITE) != 0,
        });
        if !more {
            return Some(descs);
        }
        index = next;
    }
}

/// Whether the first `len` bytes of `descs`, in chain order, are all guest memory: a device
/// that moves only that much must then succeed, and otherwise must fail.
pub fn prefix_accessible(descs: &[&Desc], len: u64) -> bool {
    let mut left = len;
    for d in descs {
        if left == 0 {
            break;
        }
        let take = left.min(u64::from(d.len));
        let part = Desc {
            len: take as u32,
            ..**d
        };
        if !part.accessible() {
            return false;
        }
        left -= take;
    }
    true
}

/// Fills the indirect area from `input` (zeros past its end).
pub fn indirect_tables(mem: &GuestMemoryMmap, input: &mut Input) {
    for i in 0..INDIRECT_SLOTS {
        write_desc(mem, INDIRECT + i * 16, input);
    }
}

/// One descriptor from 6 input bytes: address selector, length, flags, next.
fn write_desc(mem: &GuestMemoryMmap, at: u64, input: &mut Input) {
    let sel = input.u16();
    let len = input.u16();
    let f = input.u8();
    let next = u16::from(input.u8());
    let (addr, len) = if f & F_INDIRECT != 0 {
        let slot = u64::from(sel) % (INDIRECT_SLOTS - MAX_INDIRECT_LEN);
        // Mostly a well-formed table, sometimes a length that is not whole descriptors.
        let len = if len & 0x8000 != 0 {
            u32::from(len & 0x7f)
        } else {
            (u32::from(len) % MAX_INDIRECT_LEN as u32 + 1) * 16
        };
        (INDIRECT + slot * 16, len)
    } else {
        let off = u64::from(sel & 0xfff);
        let addr = match sel >> 12 {
            // Across the end of guest memory, far outside it, wrapping.
            0 => MEM_SIZE - off,
            1 => u64::MAX - off,
            2 => (1 << 40) + off,
            _ => DATA + u64::from(sel & 0x3fff) * 4 % (MEM_SIZE - DATA + 0x100),
        };
        let len = if f & F_HUGE == F_HUGE {
            u32::MAX - u32::from(len)
        } else {
            u32::from(len)
        };
        (addr, len)
    };
    let flags = u16::from(f & (F_NEXT | F_WRITE | F_INDIRECT));
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&addr.to_le_bytes());
    raw[8..12].copy_from_slice(&len.to_le_bytes());
    raw[12..14].copy_from_slice(&flags.to_le_bytes());
    raw[14..].copy_from_slice(&next.to_le_bytes());
    mem.write_slice(&raw, GuestAddress(at)).unwrap();
}

/// The bytes a device may change: ranges of guest memory, one per chain instance.
#[derive(Default)]
pub struct Written {
    ranges: Vec<Range<usize>>,
}

impl Written {
    /// Allows `range` (a used ring).
    pub fn allow(&mut self, range: Range<usize>) {
        self.ranges.push(range);
    }

    /// Allows the writable buffers of `chains`, once per instance.
    pub fn allow_writable<'a>(&mut self, chains: impl IntoIterator<Item = &'a Chain>) {
        for chain in chains {
            for d in chain.descs.iter().filter(|d| d.writable) {
                self.allow(d.in_memory());
            }
        }
    }

    /// Whether at most one of the ranges allowed meets `range`: then nothing but the one
    /// that covers it may have written there.
    pub fn exclusive(&self, range: &Range<usize>) -> bool {
        let meets = |r: &&Range<usize>| r.start < range.end && range.start < r.end;
        self.ranges.iter().filter(meets).count() <= 1
    }

    /// Panics at the first byte that changed between `before` and `after` though nothing
    /// was allowed to write it.
    pub fn check(&self, before: &[u8], after: &[u8]) {
        let mut merged: Vec<Range<usize>> = Vec::new();
        let mut ranges = self.ranges.clone();
        ranges.sort_by_key(|r| r.start);
        for r in ranges {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        for (i, (b, a)) in before.iter().zip(after).enumerate() {
            if b == a {
                continue;
            }
            let at = merged.partition_point(|r| r.end <= i);
            assert!(
                merged.get(at).is_some_and(|r| r.contains(&i)),
                "byte {i:#x} outside every writable buffer changed: {b:#x} -> {a:#x}"
            );
        }
    }
}
