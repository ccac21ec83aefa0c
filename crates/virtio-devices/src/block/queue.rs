//! The thread serving one request queue: takes chains while there is room, keeps their I/O
//! in flight, and returns them to the driver as they complete, one interrupt per batch.

use crate::worker::{DeviceQueue, Poller, WorkerHandler};
use crate::DeviceMemory;

use super::inflight::{Requests, Started};

/// Epoll token of the engine's completion fd.
const COMPLETIONS: u32 = 0;

pub(super) struct QueueWorker<M> {
    pub(super) mem: M,
    pub(super) queue: DeviceQueue,
    pub(super) requests: Requests,
}

impl<M: DeviceMemory> WorkerHandler for QueueWorker<M> {
    fn start(&mut self, poller: &Poller) -> std::io::Result<()> {
        poller.add(self.requests.completion_fd(), COMPLETIONS)
    }

    fn queue_notified(&mut self, _index: usize, _poller: &Poller) {
        self.serve();
    }

    fn fd_ready(&mut self, _token: u32, _poller: &Poller) {
        self.serve();
    }
}

impl<M: DeviceMemory> QueueWorker<M> {
    /// Completes what finished and takes what the driver made available, until the queue is
    /// either drained (notifications on) or full with I/O in flight (its completions wake the
    /// thread again); then interrupts the driver once, if it wants to be (EVENT_IDX).
    fn serve(&mut self) {
        let mut used = false;
        loop {
            used |= self.reap();
            let full = self.take_available(&mut used);
            self.requests.submit();
            // A synchronous engine completed everything at once.
            used |= self.reap();
            if !full || self.requests.busy() {
                break;
            }
        }
        if used {
            self.queue.signal_used(&self.mem);
        }
    }

    /// The worker's loop without its thread: serves, then waits for the I/O in flight and
    /// serves again, until nothing is in flight and the ring is drained.
    #[cfg(feature = "fuzzing")]
    pub(super) fn serve_to_completion(&mut self) {
        loop {
            self.serve();
            if self.requests.in_flight() == 0 {
                return;
            }
            let (queue, mem) = (&mut self.queue, &self.mem);
            self.requests.wait_all(mem, |head, len| {
                queue.add_used(mem, head, len);
            });
        }
    }

    fn reap(&mut self) -> bool {
        let (queue, mem) = (&mut self.queue, &self.mem);
        self.requests.reap(mem, |head, len| {
            queue.add_used(mem, head, len);
        }) > 0
    }

    /// Starts the available chains while there is room; whether it stopped for want of room
    /// (notifications stay off: completions bring the thread back) rather than because the
    /// ring was empty (notifications on, the ring re-checked).
    fn take_available(&mut self, used: &mut bool) -> bool {
        let mut idle_rounds = 0;
        loop {
            self.queue.disable_notification(&self.mem);
            let mut progressed = false;
            while self.requests.has_room() {
                let Some(chain) = self.queue.pop(&self.mem) else {
                    break;
                };
                progressed = true;
                match self.requests.start(&self.mem, chain) {
                    Started::Done(head, len) => *used |= self.queue.add_used(&self.mem, head, len),
                    Started::Queued => {}
                    Started::NoRoom => {
                        self.queue.undo_pop();
                        return true;
                    }
                }
            }
            if !self.requests.has_room() {
                return true;
            }
            if !self.queue.enable_notification(&self.mem) {
                return false;
            }
            // More buffers arrived while notifications were off: go round again. Two rounds
            // in a row without a chain mean the avail index itself is bogus.
            idle_rounds = if progressed { 0 } else { idle_rounds + 1 };
            if idle_rounds > 1 {
                vm_device::error_limited!("virtio-blk: available ring index is invalid");
                return false;
            }
        }
    }
}

impl<M> Drop for QueueWorker<M> {
    /// The device is being reset: no I/O may land after `reset` returned.
    fn drop(&mut self) {
        self.requests.drain();
    }
}
