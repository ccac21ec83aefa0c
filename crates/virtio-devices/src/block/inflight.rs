//! The requests of one queue between their parsing and their completion: many at a time in
//! the engine, finished in whatever order the engine reports them.
//!
//! A read or write holds its `DmaGuard` until its data moved, so an UNMAP of any of its buffers
//! waits until the engine stopped touching them; the host addresses it uses are only those the
//! IOMMU granted when it was parsed. What moves no guest data while in flight (FLUSH, DISCARD,
//! WRITE_ZEROES, the sync of a write-through write) holds no guard meanwhile, so a slow host
//! holds up no UNMAP, and translates its status byte again to complete. A FLUSH waits for the
//! writes, discards and zeroings the queue took before it, then `fdatasync`s; under
//! write-through each of those is made stable before it completes; the status byte is written
//! after the data moved.

use std::alloc::{self, Layout};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use io_engine::{Completion, Engine, IoVecs, Op};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use virtio_iommu::DmaGuard;
use vm_device::warn_limited;

use super::image::{Disk, ImageKind};
use super::request::{self, Action, GuestPtr, Segment, StatusByte};
use crate::buffers::Chain;
use crate::counters::BlockCounters;
use crate::DeviceMemory;

/// Most bytes of bounce buffers one queue holds at once (O_DIRECT with guest buffers the
/// host cannot use as they are); a request that needs more is refused with IOERR.
pub(super) const BOUNCE_BUDGET: usize = 16 << 20;
/// Most pieces of guest memory the requests of one queue hold in flight at once (each a
/// `Segment` here and an iovec in the engine, 32 bytes in all): 2 MiB whatever the queue's
/// size and however the guest fragments its buffers. A request that does not fit waits for
/// requests in flight to complete; one alone always fits (`request::MAX_SEGMENTS`).
pub(super) const SEGMENT_BUDGET: usize = request::MAX_SEGMENTS;

/// How a request started.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Started {
    /// Already complete: put `(head, len)` on the used ring.
    Done(u16, u32),
    /// In flight; its completion comes from [`Requests::reap`].
    Queued,
    /// Not carried out for want of bounce-buffer room: give the chain back to the ring and
    /// retry once requests in flight completed.
    NoRoom,
}

/// The in-flight requests of one queue.
pub(super) struct Requests {
    disk: Arc<Disk>,
    engine: Arc<Mutex<Engine>>,
    /// The disk's, shared by all its queues.
    counters: Arc<BlockCounters>,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    /// Numbers requests in the order the queue took them, for FLUSH ordering.
    next_seq: u64,
    /// FLUSHes waiting for earlier writes, oldest first.
    parked_flushes: VecDeque<usize>,
    bounce_bytes: usize,
    /// Guest segments of the requests in flight, against [`SEGMENT_BUDGET`].
    segments: usize,
    completions: Vec<Completion>,
    /// Data bytes of the reads and writes started since the last [`Requests::submit`].
    unsubmitted_bytes: u64,
}

struct InFlight {
    head: u16,
    status: StatusByte,
    seq: u64,
    stage: Stage,
    /// The operation is done and an `fdatasync` is making it stable (write-through).
    stabilizing: bool,
    /// Data bytes the request writes into the chain when it succeeds.
    written: u32,
    /// Data bytes a read or write moves between the image and the guest, for the counters.
    data_len: u64,
    /// Guest segments it holds (counted against [`SEGMENT_BUDGET`]).
    segments: usize,
    /// A WRITE_ZEROES done with `FALLOC_FL_ZERO_RANGE`, which some file systems lack (tmpfs,
    /// NFS): its range, to punch a hole instead (which reads back as zeroes too).
    zero_range: Option<(u64, u64)>,
    /// A read through a bounce buffer copies it to these guest segments when it completes.
    read_back: Vec<Segment>,
    bounce: Option<Bounce>,
    /// Held while the engine may move data between the image and the request's buffers: no
    /// UNMAP of them completes before that.
    dma: Option<DmaGuard>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Read,
    Write,
    /// A FLUSH, waiting or in flight.
    Flush,
    Discard,
    WriteZeroes,
}

impl Stage {
    /// Whether the request changes the image: a FLUSH waits for it, and write-through makes
    /// it stable before it completes.
    fn modifies(self) -> bool {
        matches!(self, Stage::Write | Stage::Discard | Stage::WriteZeroes)
    }
}

impl Requests {
    /// Room for `depth` requests (the queue's size) on `engine`; what completes is added to
    /// `counters`.
    pub(super) fn new(
        disk: Arc<Disk>,
        engine: Arc<Mutex<Engine>>,
        depth: u16,
        counters: Arc<BlockCounters>,
    ) -> Self {
        let depth = usize::from(depth);
        Requests {
            disk,
            engine,
            counters,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth).rev().collect(),
            next_seq: 0,
            parked_flushes: VecDeque::new(),
            bounce_bytes: 0,
            segments: 0,
            completions: Vec::new(),
            unsubmitted_bytes: 0,
        }
    }

    fn engine(&self) -> MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether another request fits: the queue stops taking chains when not.
    pub(super) fn has_room(&self) -> bool {
        !self.free.is_empty()
    }

    /// Whether requests wait for the engine (whose completion fd then wakes the worker).
    pub(super) fn busy(&self) -> bool {
        self.engine().in_flight() > 0
    }

    /// Reads and writes of at most `max_bytes` in the engine: their completions come soon,
    /// at the device's pace (no `fdatasync` or `fallocate` in them), and each wakes the
    /// queue's thread.
    pub(super) fn short_transfers(&self, max_bytes: u64) -> usize {
        if !self.busy() {
            return 0;
        }
        self.slots
            .iter()
            .flatten()
            .filter(|r| {
                matches!(r.stage, Stage::Read | Stage::Write)
                    && !r.stabilizing
                    && r.data_len <= max_bytes
            })
            .count()
    }

    /// Data bytes the reads and writes started since the last submission move.
    pub(super) fn unsubmitted_bytes(&self) -> u64 {
        self.unsubmitted_bytes
    }

    pub(super) fn completion_fd(&self) -> std::os::fd::RawFd {
        self.engine().completion_fd()
    }

    /// Parses and starts the request in `chain`; the caller checked [`Requests::has_room`].
    pub(super) fn start<M: DeviceMemory>(&mut self, mem: &M, chain: &Chain) -> Started {
        let head = chain.head;
        let Some(slot) = self.free.last().copied() else {
            return Started::NoRoom;
        };
        // From before the first translation to the completion, one transfer, of the chain's
        // buffers: an UNMAP of another request's waits for that one only.
        let dma = mem.begin_dma_within(chain.footprint());
        let Some(request) = request::parse(&self.disk, mem, chain) else {
            return Started::Done(head, 0);
        };
        let segments = request.action.segments();
        if self.segments + segments > SEGMENT_BUDGET {
            return Started::NoRoom;
        }
        let seq = self.next_seq;
        let mut entry = InFlight {
            head,
            status: request.status,
            seq,
            stage: Stage::Read,
            stabilizing: false,
            written: 0,
            data_len: 0,
            segments: 0,
            zero_range: None,
            read_back: Vec::new(),
            bounce: None,
            dma,
        };
        let op = match request.action {
            Action::Done { status, written } => {
                return Started::Done(head, entry.finish(mem, status, written))
            }
            Action::Read {
                offset,
                segments,
                len,
            } => {
                entry.written = u32::try_from(len).unwrap_or(u32::MAX);
                entry.data_len = len;
                match self.transfer_buffers(&segments, len, false) {
                    Err(started) => {
                        return started.unwrap_or_else(|| Started::Done(head, entry.fail(mem)))
                    }
                    Ok(None) => Op::Read {
                        offset,
                        buffers: iovecs(&segments),
                    },
                    Ok(Some(bounce)) => {
                        let buffers = bounce.iovecs();
                        entry.bounce = Some(bounce);
                        entry.read_back = segments;
                        Op::Read { offset, buffers }
                    }
                }
            }
            Action::Write {
                offset,
                segments,
                len,
            } => {
                entry.stage = Stage::Write;
                entry.data_len = len;
                match self.transfer_buffers(&segments, len, true) {
                    Err(started) => {
                        return started.unwrap_or_else(|| Started::Done(head, entry.fail(mem)))
                    }
                    Ok(None) => Op::Write {
                        offset,
                        buffers: iovecs(&segments),
                    },
                    Ok(Some(bounce)) => {
                        let buffers = bounce.iovecs();
                        entry.bounce = Some(bounce);
                        Op::Write { offset, buffers }
                    }
                }
            }
            Action::Flush => {
                entry.stage = Stage::Flush;
                entry.release_dma();
                if self.writes_before(seq) {
                    self.next_seq += 1;
                    self.free.pop();
                    self.slots[slot] = Some(entry);
                    self.parked_flushes.push_back(slot);
                    return Started::Queued;
                }
                self.disk.count_sync();
                Op::SyncData
            }
            Action::Discard {
                offset,
                len,
                zero,
                unmap,
            } => {
                entry.stage = if zero {
                    Stage::WriteZeroes
                } else {
                    Stage::Discard
                };
                entry.release_dma();
                match self.disk.kind {
                    // An ioctl in this thread (io_uring has none for it), with no guard held.
                    ImageKind::BlockDevice => {
                        if let Err(err) = self.disk.discard_block_device(offset, len, zero) {
                            warn_limited!("virtio-blk: request {head}: discard failed: {err}");
                            return Started::Done(head, entry.fail(mem));
                        }
                        if self.disk.writeback() {
                            entry.count(&self.counters);
                            return Started::Done(
                                head,
                                entry.finish(mem, VIRTIO_BLK_S_OK as u8, 0),
                            );
                        }
                        entry.stabilizing = true;
                        self.disk.count_sync();
                        Op::SyncData
                    }
                    ImageKind::File => {
                        let mode = fallocate_mode(zero, unmap);
                        if mode & libc::FALLOC_FL_ZERO_RANGE != 0 {
                            entry.zero_range = Some((offset, len));
                        }
                        Op::Fallocate { mode, offset, len }
                    }
                }
            }
        };
        self.next_seq += 1;
        self.free.pop();
        self.unsubmitted_bytes += entry.data_len;
        self.bounce_bytes += entry.bounce.as_ref().map_or(0, |b| b.layout.size());
        entry.segments = segments;
        self.segments += segments;
        self.slots[slot] = Some(entry);
        if !self.push(slot, op) {
            if let Some(mut entry) = self.take(slot) {
                return Started::Done(head, entry.fail(mem));
            }
        }
        Started::Queued
    }

    /// Under O_DIRECT, a bounce buffer for guest segments the host cannot take as they are
    /// (filled from them for a write). `Err(None)`: refused (too large); `Err(Some(NoRoom))`:
    /// wait for room.
    fn transfer_buffers(
        &mut self,
        segments: &[Segment],
        len: u64,
        write: bool,
    ) -> Result<Option<Bounce>, Option<Started>> {
        let Some(alignment) = self.disk.direct_alignment else {
            return Ok(None);
        };
        let aligned = segments.iter().all(|s| {
            (s.ptr.0 as usize).is_multiple_of(alignment) && s.len.is_multiple_of(alignment)
        });
        if aligned {
            return Ok(None);
        }
        let len = usize::try_from(len).map_err(|_| None)?;
        if len > BOUNCE_BUDGET {
            warn_limited!(
                "virtio-blk: unaligned O_DIRECT request of {len} bytes exceeds the bounce budget"
            );
            return Err(None);
        }
        if self.bounce_bytes + len > BOUNCE_BUDGET {
            return Err(Some(Started::NoRoom));
        }
        let bounce = Bounce::new(len, alignment).ok_or(None)?;
        if write {
            bounce.fill_from(segments);
        }
        Ok(Some(bounce))
    }

    /// Whether a change of the image the queue took before request `seq` (a write, a discard,
    /// a zeroing) is still being made.
    fn writes_before(&self, seq: u64) -> bool {
        self.slots
            .iter()
            .flatten()
            .any(|r| r.stage.modifies() && !r.stabilizing && r.seq < seq)
    }

    /// Hands `op` for slot `slot` to the engine; `false` if the engine refused it.
    fn push(&mut self, slot: usize, op: Op) -> bool {
        // SAFETY: the buffers are guest memory granted to the request (its DmaGuard, held in
        // the slot until the completion is handled, keeps an UNMAP waiting; the worker's
        // memory handle keeps the RAM mapped) or its bounce buffer, freed with the slot.
        // `drain` waits for the engine before slots are dropped.
        match unsafe { self.engine().push(slot as u64, op) } {
            Ok(()) => true,
            Err(err) => {
                warn_limited!("virtio-blk: cannot queue I/O: {err}");
                false
            }
        }
    }

    /// Frees slot `slot`, returning its request.
    fn take(&mut self, slot: usize) -> Option<InFlight> {
        let entry = self.slots.get_mut(slot)?.take()?;
        self.free.push(slot);
        if let Some(bounce) = &entry.bounce {
            self.bounce_bytes -= bounce.layout.size();
        }
        self.segments -= entry.segments;
        Some(entry)
    }

    /// Hands the queued operations to the kernel.
    pub(super) fn submit(&mut self) {
        self.unsubmitted_bytes = 0;
        if let Err(err) = self.engine().submit() {
            warn_limited!("virtio-blk: cannot submit I/O: {err}");
        }
    }

    /// Completes the requests whose I/O finished, calling `done(head, len)` for each; returns
    /// how many. What completing them queued (a FLUSH the writes held back, a write-through
    /// write's sync) is submitted before returning: the worker may sleep next, and only
    /// completions would wake it.
    pub(super) fn reap<M: DeviceMemory>(
        &mut self,
        mem: &M,
        mut done: impl FnMut(u16, u32),
    ) -> usize {
        let mut completions = std::mem::take(&mut self.completions);
        self.engine().reap(&mut completions);
        let count = self.complete(mem, &mut completions, &mut done);
        self.completions = completions;
        self.submit();
        count
    }

    fn complete<M: DeviceMemory>(
        &mut self,
        mem: &M,
        completions: &mut Vec<Completion>,
        done: &mut impl FnMut(u16, u32),
    ) -> usize {
        let mut count = 0;
        for completion in completions.drain(..) {
            let slot = completion.token as usize;
            let Some(Some(entry)) = self.slots.get_mut(slot) else {
                continue;
            };
            let failed = match completion.result {
                Err(err)
                    if err.raw_os_error() == Some(libc::EOPNOTSUPP)
                        && entry.zero_range.is_some() =>
                {
                    let (offset, len) = entry.zero_range.take().unwrap_or_default();
                    let mode = fallocate_mode(true, true);
                    if self.push(slot, Op::Fallocate { mode, offset, len }) {
                        continue;
                    }
                    true
                }
                Err(err) => {
                    warn_limited!("virtio-blk: request {} failed: {err}", entry.head);
                    true
                }
                Ok(())
                    if entry.stage.modifies() && !entry.stabilizing && !self.disk.writeback() =>
                {
                    // Write-through: stable before it completes. The sync moves no guest data.
                    entry.stabilizing = true;
                    entry.release_dma();
                    self.disk.count_sync();
                    if self.push(slot, Op::SyncData) {
                        continue;
                    }
                    true
                }
                Ok(()) => false,
            };
            let Some(mut entry) = self.take(slot) else {
                continue;
            };
            count += 1;
            if failed {
                done(entry.head, entry.fail(mem));
                continue;
            }
            if let Some(bounce) = &entry.bounce {
                bounce.copy_to(&entry.read_back);
            }
            entry.count(&self.counters);
            let written = entry.written;
            done(
                entry.head,
                entry.finish(mem, VIRTIO_BLK_S_OK as u8, written),
            );
        }
        count + self.release_flushes(mem, done)
    }

    /// Starts the parked FLUSHes whose earlier writes have all completed; returns how many
    /// of them failed to start (and were completed).
    fn release_flushes<M: DeviceMemory>(
        &mut self,
        mem: &M,
        done: &mut impl FnMut(u16, u32),
    ) -> usize {
        let mut failed = 0;
        while let Some(&slot) = self.parked_flushes.front() {
            let seq = self.slots[slot].as_ref().map_or(0, |r| r.seq);
            if self.writes_before(seq) {
                break;
            }
            self.parked_flushes.pop_front();
            self.disk.count_sync();
            if !self.push(slot, Op::SyncData) {
                if let Some(mut entry) = self.take(slot) {
                    done(entry.head, entry.fail(mem));
                    failed += 1;
                }
            }
        }
        failed
    }

    /// Waits until the engine finished every operation of this queue, completing nothing
    /// (the device is being reset): then no I/O touches guest memory or a bounce buffer, and
    /// the requests' guards can go.
    pub(super) fn drain(&mut self) {
        self.drain_with(Engine::wait);
    }

    /// [`Requests::drain`], waiting with `wait`. A wait that fails does not end the drain:
    /// until the kernel reports an operation done it may still write into the guest page
    /// or the bounce buffer it was given, so the guards stay held and the buffers allocated
    /// meanwhile. Completions land in the ring whether or not anyone waits for them, so the
    /// drain sleeps on the completion fd and looks again; it ends when the kernel is done.
    pub(super) fn drain_with(
        &mut self,
        mut wait: impl FnMut(&mut Engine, &mut Vec<Completion>) -> std::io::Result<()>,
    ) {
        let mut engine = self.engine.lock().unwrap_or_else(|e| e.into_inner());
        let mut discarded = Vec::new();
        let mut failures = 0u32;
        while engine.in_flight() > 0 {
            if let Err(err) = wait(&mut engine, &mut discarded) {
                if failures.is_multiple_of(100) {
                    log::error!(
                        "virtio-blk: cannot wait for I/O in flight ({} operations): {err}; \
                         looking again",
                        engine.in_flight()
                    );
                }
                failures = failures.saturating_add(1);
                wait_readable(engine.completion_fd(), DRAIN_POLL_MS);
                engine.reap(&mut discarded);
            }
            discarded.clear();
        }
        drop(engine);
        self.slots.iter_mut().for_each(|slot| *slot = None);
    }

    /// Completes everything in flight, waiting for the engine (tests and fuzz targets drive
    /// requests this way).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(super) fn wait_all<M: DeviceMemory>(&mut self, mem: &M, mut done: impl FnMut(u16, u32)) {
        self.submit();
        while self.slots.iter().any(Option::is_some) {
            let mut completions = std::mem::take(&mut self.completions);
            self.engine().wait(&mut completions).unwrap();
            self.complete(mem, &mut completions, &mut done);
            self.completions = completions;
            self.submit();
        }
    }

    #[cfg(any(test, feature = "fuzzing"))]
    pub(super) fn in_flight(&self) -> usize {
        self.slots.iter().flatten().count()
    }

    #[cfg(test)]
    pub(super) fn bounce_bytes(&self) -> usize {
        self.bounce_bytes
    }

    #[cfg(test)]
    pub(super) fn segments(&self) -> usize {
        self.segments
    }
}

impl InFlight {
    /// Writes the status byte (after the data) and returns the length for the used ring: 0
    /// if the driver took the status byte away meanwhile (it cannot learn the outcome).
    fn finish<M: DeviceMemory>(&mut self, mem: &M, status: u8, written: u32) -> u32 {
        if !self.status.write(mem, status) {
            return 0;
        }
        self.dma = None;
        // Below 2^32: the data is part of a chain the queue limits to 2^32 - 1 bytes.
        written.saturating_add(1)
    }

    fn fail<M: DeviceMemory>(&mut self, mem: &M) -> u32 {
        self.finish(mem, VIRTIO_BLK_S_IOERR as u8, 0)
    }

    /// The request touches no guest buffer until it completes: it gives its guard up, and
    /// with it the translation of its status byte.
    fn release_dma(&mut self) {
        if self.dma.take().is_some() {
            self.status.ptr = None;
        }
    }

    /// Adds the request, which succeeded, to the disk's counters.
    fn count(&self, counters: &BlockCounters) {
        match self.stage {
            Stage::Read => {
                counters.read_ops.add(1);
                counters.read_bytes.add(self.data_len);
            }
            Stage::Write => {
                counters.write_ops.add(1);
                counters.write_bytes.add(self.data_len);
            }
            Stage::Flush => counters.flush_ops.add(1),
            Stage::Discard => counters.discard_ops.add(1),
            Stage::WriteZeroes => counters.write_zeroes_ops.add(1),
        }
    }
}

/// How long a drain whose wait failed sleeps on the completion fd before it looks again.
const DRAIN_POLL_MS: i32 = 10;

/// Waits up to `ms` for `fd` to become readable.
fn wait_readable(fd: std::os::fd::RawFd, ms: i32) {
    let mut pollfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd, valid for the call.
    unsafe { libc::poll(&mut pollfd, 1, ms) };
}

/// `fallocate` mode for a DISCARD (punch a hole), or a WRITE_ZEROES (zero the range, or
/// punch it when the driver allowed deallocation: reads of a hole return zeroes too).
fn fallocate_mode(zero: bool, unmap: bool) -> i32 {
    if zero && !unmap {
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
    } else {
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
    }
}

fn iovecs(segments: &[Segment]) -> IoVecs {
    IoVecs::new(segments.iter().map(|s| (s.ptr.0, s.len)))
}

/// An aligned host buffer standing in for guest buffers O_DIRECT cannot use.
struct Bounce {
    ptr: GuestPtr,
    layout: Layout,
}

impl Bounce {
    fn new(len: usize, alignment: usize) -> Option<Self> {
        let layout = Layout::from_size_align(len.max(1), alignment).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        (!ptr.is_null()).then_some(Bounce {
            ptr: GuestPtr(ptr),
            layout,
        })
    }

    fn iovecs(&self) -> IoVecs {
        IoVecs::new([(self.ptr.0, self.layout.size())])
    }

    /// Copies the guest's data in (a write).
    fn fill_from(&self, segments: &[Segment]) {
        let mut done = 0;
        for s in segments {
            // SAFETY: `s` is guest memory translated for reading, under the request's guard;
            // the bounce buffer holds the request's total length, the sum of the segments.
            let guest = unsafe { vm_memory::VolatileSlice::new(s.ptr.0, s.len) };
            let bounce = unsafe { std::slice::from_raw_parts_mut(self.ptr.0.add(done), s.len) };
            guest.copy_to(bounce);
            done += s.len;
        }
    }

    /// Copies the data read out to the guest (a read).
    fn copy_to(&self, segments: &[Segment]) {
        let mut done = 0;
        for s in segments {
            // SAFETY: as in `fill_from`, the segments translated for writing.
            let guest = unsafe { vm_memory::VolatileSlice::new(s.ptr.0, s.len) };
            let bounce = unsafe { std::slice::from_raw_parts(self.ptr.0.add(done), s.len) };
            guest.copy_from(bounce);
            done += s.len;
        }
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { alloc::dealloc(self.ptr.0, self.layout) };
    }
}
