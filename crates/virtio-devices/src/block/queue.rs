//! The thread serving one request queue: takes chains while there is room, keeps their I/O
//! in flight, and returns them to the driver as they complete, one interrupt per batch.

use crate::device_queue::{DeviceQueue, Served};

use crate::worker::{Poller, WorkerHandler};
use crate::DeviceMemory;

use super::inflight::{Requests, Started};

/// Epoll token of the engine's completion fd.
const COMPLETIONS: u32 = 0;
/// Short reads and writes in flight from which a drained queue asks for no notification: a
/// request the driver makes available meanwhile waits for the next completion, which costs
/// at most one request of depth in this many. From 4 on (when every read and write counted),
/// 1 MiB reads at depth 4 (two requests each: 6 left in flight) lost a third in the nested
/// host.
const QUIET_FROM: usize = 8;
/// The longest transfer counted for [`QUIET_FROM`]: a request waiting for the next
/// completion waits for one transfer, short for these, as long as many VM exits for a
/// 512 KiB one.
const QUIET_TRANSFER_MAX_BYTES: u64 = 64 << 10;
/// Data the chains taken in one go may move before they are submitted and what completed is
/// returned to the driver. An engine that completes page-cache reads inside the submission
/// copies the whole batch before the first completion: 1 MiB reads at depth 4 made
/// available together were all copied (4 MiB) before the driver heard of the first, the
/// driver then made the next four available while the disk idled, and so on (one
/// interrupt per 3.7 reads, the vCPU at 0.67 of a CPU). 4 KiB requests at depth 16 never
/// reach it.
const BATCH_BYTES: u64 = 256 << 10;

pub(super) struct QueueWorker<M> {
    pub(super) mem: M,
    pub(super) queue: DeviceQueue,
    pub(super) requests: Requests,
}

impl<M: DeviceMemory> WorkerHandler for QueueWorker<M> {
    fn start(&mut self, poller: &Poller) -> std::io::Result<()> {
        poller.add(self.requests.completion_fd(), COMPLETIONS)
    }

    fn queue_notified(&mut self, _index: usize, poller: &Poller) {
        let _ = self.serve(poller);
    }

    fn fd_ready(&mut self, _token: u32, poller: &Poller) {
        let _ = self.serve(poller);
    }
}

/// Why [`QueueWorker::take_available`] stopped taking chains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Taken {
    /// The ring is empty (notifications still off).
    Drained,
    /// No room for another request: notifications stay off, completions bring the thread
    /// back.
    Full,
    /// A queue's worth of chains taken in this call, and more available.
    Budget,
    /// [`BATCH_BYTES`] of reads and writes taken: submit them and return what completed.
    Batch,
}

impl<M: DeviceMemory> QueueWorker<M> {
    /// Completes what finished and takes what the driver made available, until the queue is
    /// either drained or full with I/O in flight (its completions wake the thread again), or
    /// a queue's worth of chains was taken (then it comes back through `poller` after the
    /// worker's other events); then interrupts the driver once, if it wants to be
    /// (EVENT_IDX).
    ///
    /// A drained queue with [`QUIET_FROM`] short reads or writes in flight asks the driver for
    /// no notification: their completions bring the thread back, and the chains made available
    /// meanwhile are taken then. At depth each request would otherwise cost the guest a
    /// notification, a VM exit, for a thread about to look anyway (4 KiB reads at depth 16:
    /// 4452 to 7292 IOPS in the nested host, docs/iommu-performance.md). FLUSHes, discards
    /// and zeroings are not counted (an `fdatasync` or `fallocate` may take long: no read
    /// waits behind one), and a queue with less in flight, or idle, asks as before.
    fn serve(&mut self, poller: &Poller) -> Served {
        self.serve_at_most(poller, usize::from(self.queue.size()))
    }

    /// [`QueueWorker::serve`], taking at most `budget` chains.
    pub(super) fn serve_at_most(&mut self, poller: &Poller, mut budget: usize) -> Served {
        let mut served = Served::All;
        let mut idle_rounds = 0;
        loop {
            self.reap();
            let before = budget;
            let taken = self.take_available(&mut budget);
            let taken_any = budget != before;
            self.requests.submit();
            // A synchronous engine completed everything at once.
            self.reap();
            match taken {
                Taken::Drained
                    if self.requests.short_transfers(QUIET_TRANSFER_MAX_BYTES) >= QUIET_FROM =>
                {
                    break
                }
                Taken::Drained => {
                    if !self.queue.enable_notification(&self.mem) {
                        break;
                    }
                    // More arrived while notifications were off. A ring that says so twice
                    // without a chain to take has a bogus available index.
                    idle_rounds = if taken_any { 0 } else { idle_rounds + 1 };
                    if idle_rounds > 1 {
                        vm_device::error_limited!("virtio-blk: available ring index is invalid");
                        break;
                    }
                }
                Taken::Full if self.requests.busy() => break,
                Taken::Full => {}
                Taken::Batch => self.queue.signal_used(&self.mem),
                Taken::Budget => {
                    poller.rearm(self.queue.index());
                    served = Served::Budget;
                    break;
                }
            }
        }
        self.queue.signal_used(&self.mem);
        served
    }

    /// The worker's loop without its thread: serves, then waits for the I/O in flight and
    /// serves again, until nothing is in flight and the ring is drained.
    #[cfg(feature = "fuzzing")]
    pub(super) fn serve_to_completion(&mut self, poller: &Poller) {
        loop {
            let served = self.serve(poller);
            if self.requests.in_flight() == 0 && served == Served::All {
                return;
            }
            let (queue, mem) = (&mut self.queue, &self.mem);
            self.requests.wait_all(mem, |head, len| {
                queue.add_used(mem, head, len);
            });
        }
    }

    /// Returns the requests that completed to the driver.
    fn reap(&mut self) {
        let (queue, mem) = (&mut self.queue, &self.mem);
        self.requests.reap(mem, |head, len| {
            queue.add_used(mem, head, len);
        });
    }

    /// Starts the available chains while there is room and budget left, notifications off.
    fn take_available(&mut self, budget: &mut usize) -> Taken {
        self.queue.disable_notification(&self.mem);
        while self.requests.has_room() {
            if *budget == 0 {
                return Taken::Budget;
            }
            let Some(chain) = self.queue.pop(&self.mem) else {
                return Taken::Drained;
            };
            *budget -= 1;
            match self.requests.start(&self.mem, &chain) {
                Started::Done(head, len) => {
                    self.queue.add_used(&self.mem, head, len);
                }
                Started::Queued if self.requests.unsubmitted_bytes() >= BATCH_BYTES => {
                    return Taken::Batch;
                }
                Started::Queued => {}
                Started::NoRoom => {
                    self.queue.undo_pop();
                    return Taken::Full;
                }
            }
        }
        Taken::Full
    }
}

impl<M> Drop for QueueWorker<M> {
    /// The device is being reset: no I/O may land after `reset` returned.
    fn drop(&mut self) {
        self.requests.drain();
    }
}
