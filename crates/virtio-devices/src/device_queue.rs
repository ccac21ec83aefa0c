//! A queue as a worker-backed device serves it: chains read and checked before the device
//! sees them, a budget per call, notification suppression, interrupts once per batch, and a
//! queue the driver broke left alone until reset.

use std::sync::Arc;

use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_device::{error_limited, warn_limited};
use vm_memory::{GuestAddress, GuestMemory};

use crate::buffers::{self, Chain, ChainRules};
use crate::VirtioInterrupt;

/// Whether a handler served everything the driver made available, or stopped at its budget
/// (and must come back, see [`Poller::rearm`]).
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Served {
    All,
    Budget,
}

/// An activated queue together with the means to tell the driver about used buffers. It hands
/// devices chains already read and checked ([`Chain`]): one that breaks the rules (an indirect
/// table not negotiated, more descriptors than the device takes, a loop) is returned unused.
pub(crate) struct DeviceQueue {
    index: usize,
    queue: Queue,
    interrupt: Arc<dyn VirtioInterrupt>,
    rules: ChainRules,
    /// Chains returned to the driver since it was last interrupted for them.
    unsignalled: bool,
    /// The driver broke the queue (see [`DeviceQueue::mark_broken`]): it is not served until
    /// the device is reset, which builds a new `DeviceQueue`.
    broken: bool,
}

impl DeviceQueue {
    /// Wraps queue `index`, given the features the driver accepted: the device (not the
    /// transport) applies `VIRTIO_RING_F_EVENT_IDX` to the queue, and takes indirect tables
    /// only with `VIRTIO_RING_F_INDIRECT_DESC`. A chain may have as many descriptors as the
    /// queue has entries (a chain without indirect tables cannot have more), unless
    /// [`DeviceQueue::with_max_descriptors`] says fewer.
    pub(crate) fn new(
        index: usize,
        mut queue: Queue,
        features: u64,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Self {
        queue.set_event_idx(features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        let rules = ChainRules {
            indirect: features & (1 << VIRTIO_RING_F_INDIRECT_DESC) != 0,
            max_descriptors: queue.size(),
        };
        DeviceQueue {
            index,
            queue,
            interrupt,
            rules,
            unsignalled: false,
            broken: false,
        }
    }

    /// Refuses chains of more than `max` descriptors (no fewer than one).
    pub(crate) fn with_max_descriptors(mut self, max: u16) -> Self {
        self.rules.max_descriptors = max.max(1);
        self
    }

    /// Pops the next available chain and reads it; a chain that breaks the rules is returned
    /// to the driver unused (interrupted for with the others), and the next one tried.
    fn next_chain<M: GuestMemory>(&mut self, mem: &M) -> Option<Chain> {
        loop {
            if self.broken {
                return None;
            }
            let head = self.queue.pop_descriptor_chain(mem)?.head_index();
            let table = GuestAddress(self.queue.desc_table());
            match buffers::walk(mem, table, self.queue.size(), head, self.rules) {
                Ok(chain) => return Some(chain),
                Err(err) => {
                    warn_limited!("queue {}: chain {head} refused: {err}", self.index);
                    if !self.add_used(mem, head, 0) {
                        return None;
                    }
                }
            }
        }
    }

    /// Stops serving the queue for good and tells the driver the device needs a reset: an
    /// available index the ring cannot hold, or rings the device cannot write, are driver
    /// errors no later notification repairs, and serving on would only redo the same work.
    fn mark_broken(&mut self, why: std::fmt::Arguments) {
        if self.broken {
            return;
        }
        self.broken = true;
        error_limited!(
            "queue {}: {why}; not served until the driver resets the device",
            self.index
        );
        if let Err(err) = self.interrupt.needs_reset() {
            error_limited!("queue {}: cannot signal NEEDS_RESET: {err}", self.index);
        }
    }

    /// Hands the available chains to `handle` and returns each to the driver as used, up to a
    /// queue's worth of them: [`Served::Budget`] if it stopped there with more available
    /// (notifications stay off; the caller comes back through [`Poller::rearm`]).
    ///
    /// `handle` returns how many bytes it wrote into the chain, or `None` to leave the chain in
    /// the ring and stop (the console's receive queue does so when it has nothing to deliver).
    /// Notifications from the driver are suppressed while the ring is drained and re-enabled
    /// before returning, re-checking the ring afterwards, so a buffer added meanwhile is never
    /// left without either a notification or processing. The driver is interrupted at most
    /// once per call, and only if the queue says it wants to be. A broken queue (see
    /// [`DeviceQueue::mark_broken`]) is not served.
    pub(crate) fn process<M, F>(&mut self, mem: &M, mut handle: F) -> Served
    where
        M: GuestMemory,
        F: FnMut(&Chain) -> Option<u32>,
    {
        if self.broken {
            return Served::All;
        }
        let mut budget = usize::from(self.queue.size());
        let mut idle_rounds = 0;
        let mut served = Served::All;
        'rounds: loop {
            if let Err(err) = self.queue.disable_notification(mem) {
                warn_limited!("queue {}: cannot disable notifications: {err}", self.index);
            }
            let mut progressed = false;
            loop {
                if budget == 0 {
                    served = Served::Budget;
                    break 'rounds;
                }
                let Some(chain) = self.next_chain(mem) else {
                    if self.broken {
                        break 'rounds;
                    }
                    break;
                };
                budget -= 1;
                let head = chain.head;
                let Some(len) = handle(&chain) else {
                    self.queue.go_to_previous_position();
                    break 'rounds;
                };
                if !self.add_used(mem, head, len) {
                    break 'rounds;
                }
                progressed = true;
            }
            match self.queue.enable_notification(mem) {
                Ok(false) => break,
                Ok(true) => {
                    // More buffers arrived while notifications were off: go round again. Two
                    // rounds in a row without a chain mean the avail index itself is bogus.
                    idle_rounds = if progressed { 0 } else { idle_rounds + 1 };
                    if idle_rounds > 1 {
                        self.mark_broken(format_args!("available ring index is invalid"));
                        break;
                    }
                }
                Err(err) => {
                    self.mark_broken(format_args!("cannot enable notifications: {err}"));
                    break;
                }
            }
        }
        self.signal_used(mem);
        served
    }

    /// The queue's index in the device.
    pub(crate) fn index(&self) -> usize {
        self.index
    }

    /// The queue size the driver chose: the most chains it can have available at once.
    pub(crate) fn size(&self) -> u16 {
        self.queue.size()
    }

    /// Takes the next available chain, for devices that cannot complete chains one at a
    /// time (virtio-net's receive queue spreads one packet over several). `None` once the
    /// queue is broken.
    pub(crate) fn pop<M: GuestMemory>(&mut self, mem: &M) -> Option<Chain> {
        if self.broken {
            return None;
        }
        self.next_chain(mem)
    }

    /// Returns chain `head` to the driver with `len` bytes written; `false` if the used ring
    /// cannot be written, which breaks the queue.
    pub(crate) fn add_used<M: GuestMemory>(&mut self, mem: &M, head: u16, len: u32) -> bool {
        if self.broken {
            return false;
        }
        match self.queue.add_used(mem, head, len) {
            Ok(()) => {
                self.unsignalled = true;
                true
            }
            Err(err) => {
                self.mark_broken(format_args!("cannot return descriptor {head}: {err}"));
                false
            }
        }
    }

    /// Stops the driver's notifications while the device drains the ring.
    pub(crate) fn disable_notification<M: GuestMemory>(&mut self, mem: &M) {
        if let Err(err) = self.queue.disable_notification(mem) {
            warn_limited!("queue {}: cannot disable notifications: {err}", self.index);
        }
    }

    /// Gives the chain popped last back to the ring, to be popped again later.
    pub(crate) fn undo_pop(&mut self) {
        self.queue.go_to_previous_position();
    }

    /// Asks the driver to notify when it makes buffers available beyond those already taken
    /// (with EVENT_IDX, from the current avail index on); returns whether some already are,
    /// in which case no notification will come for them. An unreachable ring breaks the
    /// queue (and reads as nothing available).
    pub(crate) fn enable_notification<M: GuestMemory>(&mut self, mem: &M) -> bool {
        if self.broken {
            return false;
        }
        match self.queue.enable_notification(mem) {
            Ok(more) => more,
            Err(err) => {
                self.mark_broken(format_args!("cannot enable notifications: {err}"));
                false
            }
        }
    }

    /// Interrupts the driver about the chains returned since the last call, if there are any
    /// and it wants to be.
    pub(crate) fn signal_used<M: GuestMemory>(&mut self, mem: &M) {
        if !std::mem::take(&mut self.unsignalled) {
            return;
        }
        let needed = self.queue.needs_notification(mem).unwrap_or_else(|err| {
            // A spurious interrupt is harmless; a lost one hangs the driver.
            warn_limited!("queue {}: cannot read used_event: {err}", self.index);
            true
        });
        if needed {
            if let Err(err) = self.interrupt.notify_queue(self.index) {
                error_limited!("queue {}: cannot interrupt the driver: {err}", self.index);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::{guest_memory, ro, wo, Driver, FakeInterrupt};
    use vm_memory::GuestMemoryMmap;

    const BUF: u64 = 0x2_0000;
    const EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;

    #[test]
    fn one_interrupt_per_batch_without_event_idx() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, 0, 16);
        let interrupt = Arc::new(FakeInterrupt::default());
        let mut queue = DeviceQueue::new(0, driver.queue(), 0, interrupt.clone());

        let heads: Vec<u16> = (0..3)
            .map(|i| driver.add(&[wo(BUF + i * 16, 16)]))
            .collect();
        let mut seen = Vec::new();
        let _ = queue.process(&mem, |chain| {
            seen.push(chain.head);
            Some(8)
        });
        assert_eq!(seen, heads);
        assert_eq!(
            driver.used(),
            heads.iter().map(|&h| (u32::from(h), 8)).collect::<Vec<_>>()
        );
        assert_eq!(interrupt.count(0), 1);

        // Nothing used, nothing signalled.
        let _ = queue.process(&mem, |_| Some(0));
        assert_eq!(interrupt.count(0), 1);
    }

    #[test]
    fn event_idx_suppresses_interrupts_the_driver_did_not_ask_for() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, 0, 16);
        let interrupt = Arc::new(FakeInterrupt::default());
        let mut queue = DeviceQueue::new(0, driver.queue(), EVENT_IDX, interrupt.clone());

        // The driver wants an interrupt only once the fourth buffer is used.
        driver.set_used_event(3);
        driver.add(&[wo(BUF, 16)]);
        let _ = queue.process(&mem, |_| Some(1));
        assert_eq!(driver.used().len(), 1);
        assert_eq!(interrupt.count(0), 0);

        driver.set_used_event(1);
        driver.add(&[wo(BUF, 16)]);
        let _ = queue.process(&mem, |_| Some(1));
        assert_eq!(interrupt.count(0), 1);
    }

    #[test]
    fn a_declined_chain_stays_available() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, 0, 16);
        let interrupt = Arc::new(FakeInterrupt::default());
        let mut queue = DeviceQueue::new(0, driver.queue(), 0, interrupt.clone());

        let head = driver.add(&[wo(BUF, 16)]);
        let _ = queue.process(&mem, |_| None);
        assert!(driver.used().is_empty());
        assert_eq!(interrupt.count(0), 0);

        let _ = queue.process(&mem, |chain| {
            assert_eq!(chain.head, head);
            Some(4)
        });
        assert_eq!(driver.used(), vec![(u32::from(head), 4)]);
    }

    /// An available index more than a queue size ahead: virtio-queue refuses to pop, and the
    /// two-idle-rounds guard ends the call instead of going round forever. The queue is then
    /// broken: the driver is told once that the device needs a reset, and nothing is served
    /// until then, even once the index looks sane again.
    #[test]
    fn an_avail_index_beyond_the_ring_breaks_the_queue_until_reset() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, 0, 16);
        let interrupt = Arc::new(FakeInterrupt::default());
        let mut queue = DeviceQueue::new(0, driver.queue(), 0, interrupt.clone());
        driver.set_avail_idx(17);
        let _ = queue.process(&mem, |_| panic!("nothing can be popped"));
        assert!(driver.used().is_empty());
        assert_eq!(interrupt.count(0), 0);
        assert_eq!(interrupt.needs_reset_count(), 1);

        driver.set_avail_idx(0);
        driver.add(&[wo(BUF, 16)]);
        let _ = queue.process(&mem, |_| panic!("a broken queue is not served"));
        assert!(queue.pop(&mem).is_none());
        assert!(!queue.enable_notification(&mem));
        assert_eq!(interrupt.needs_reset_count(), 1, "reported once");

        // Reset hands the device a fresh queue, which serves again.
        let mut queue = DeviceQueue::new(0, driver.queue(), 0, interrupt.clone());
        let _ = queue.process(&mem, |_| Some(1));
        assert_eq!(driver.used().len(), 1);
    }

    /// A used ring outside guest memory cannot take the completion: the queue is broken and
    /// the driver told, instead of the chain being popped and lost again on every kick.
    #[test]
    fn an_unwritable_used_ring_breaks_the_queue() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, 0, 16);
        let interrupt = Arc::new(FakeInterrupt::default());
        let mut ring = driver.queue();
        ring.set_used_ring_address(Some(0xffff_0000), Some(0xf));
        let mut queue = DeviceQueue::new(0, ring, 0, interrupt.clone());
        driver.add(&[wo(BUF, 16)]);
        driver.add(&[wo(BUF, 16)]);
        let mut handled = 0;
        let _ = queue.process(&mem, |_| {
            handled += 1;
            Some(1)
        });
        assert_eq!(
            handled, 1,
            "processing stopped at the first failed completion"
        );
        assert_eq!(interrupt.needs_reset_count(), 1);
        let _ = queue.process(&mem, |_| panic!("a broken queue is not served"));
        assert!(!queue.add_used(&mem, 1, 0));
    }

    /// A driver that keeps the ring full (here the handler refills it as each chain comes,
    /// as other vCPUs would) gets a queue's worth of chains served per call: the worker
    /// then looks at its other events, a stop request among them, before it comes back.
    #[test]
    fn a_ring_kept_full_is_served_a_queue_at_a_time() {
        let mem = guest_memory();
        let driver = std::cell::RefCell::new(Driver::new(&mem, 0, 4));
        let interrupt = Arc::new(FakeInterrupt::default());
        let mut queue = DeviceQueue::new(0, driver.borrow().queue(), 0, interrupt.clone());
        for _ in 0..4 {
            driver.borrow_mut().add(&[wo(BUF, 16)]);
        }
        let mut served = 0;
        let outcome = queue.process(&mem, |_| {
            served += 1;
            assert!(served <= 64, "the driver keeps the device serving for ever");
            driver.borrow_mut().add(&[wo(BUF, 16)]);
            Some(1)
        });
        assert_eq!(outcome, Served::Budget);
        assert_eq!(served, 4);
        assert_eq!(driver.borrow().used().len(), 4);
        assert_eq!(interrupt.count(0), 1, "what was used is signalled");
        // The next call serves what the driver added meanwhile (a queue's worth again, so
        // it cannot tell whether more came), the one after finds the ring empty.
        assert_eq!(queue.process(&mem, |_| Some(1)), Served::Budget);
        assert_eq!(queue.process(&mem, |_| Some(1)), Served::All);
        assert_eq!(driver.borrow().used().len(), 8);
    }

    /// A chain referring to an indirect table is served only if the driver accepted
    /// INDIRECT_DESC; otherwise it goes back unused and the device never sees it.
    #[test]
    fn indirect_tables_are_followed_only_when_negotiated() {
        let mem = guest_memory();
        let table = 0x3_0000;
        for (features, expect) in [(0, None), (1 << VIRTIO_RING_F_INDIRECT_DESC, Some(2))] {
            let mut driver = Driver::new(&mem, 0, 16);
            let interrupt = Arc::new(FakeInterrupt::default());
            let mut queue = DeviceQueue::new(0, driver.queue(), features, interrupt.clone());
            let head = driver.add_indirect(table, &[ro(BUF, 16), wo(BUF + 0x100, 16)]);
            let mut seen = None;
            let _ = queue.process(&mem, |chain| {
                seen = Some(chain.buffers.len());
                Some(7)
            });
            assert_eq!(seen, expect, "features {features:#x}");
            let len = if expect.is_some() { 7 } else { 0 };
            assert_eq!(driver.used(), [(u32::from(head), len)]);
            assert_eq!(interrupt.count(0), 1);
        }
    }

    /// A chain longer than the device takes is refused before it is read whole: an indirect
    /// table of 65535 entries, reused by every head, cannot make each request hold a megabyte
    /// of descriptors. What follows it is served.
    #[test]
    fn chains_longer_than_the_device_takes_go_back_unused() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        let mut driver = Driver::new(&mem, 0, 32);
        let interrupt = Arc::new(FakeInterrupt::default());
        let features = 1 << VIRTIO_RING_F_INDIRECT_DESC;
        let mut queue =
            DeviceQueue::new(0, driver.queue(), features, interrupt).with_max_descriptors(8);
        let huge: Vec<_> = (0..u16::MAX).map(|_| ro(BUF, 1)).collect();
        let long = driver.add_indirect(0x10_0000, &huge);
        let nine = driver.add(&[ro(BUF, 1); 9]);
        let eight = driver.add(&[ro(BUF, 1); 8]);
        let mut seen = Vec::new();
        let _ = queue.process(&mem, |chain| {
            seen.push((chain.head, chain.buffers.len()));
            Some(1)
        });
        assert_eq!(seen, [(eight, 8)]);
        assert_eq!(
            driver.used(),
            [
                (u32::from(long), 0),
                (u32::from(nine), 0),
                (u32::from(eight), 1)
            ]
        );
    }
}
