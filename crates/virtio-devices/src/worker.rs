//! The thread that serves a device between `activate` and `reset`.
//!
//! Each active device gets one thread that waits in epoll on its queue notifiers, a kill eventfd
//! and whatever file descriptors the device itself needs (console input). Device logic lives in a
//! [`WorkerHandler`]; this module owns the thread, the wake-up plumbing and the
//! enable/disable-notification loop that every queue shares.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::{self, JoinHandle};

use log::{error, warn};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_device::{error_limited, warn_limited};
use vm_memory::GuestMemory;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{ActivateError, VirtioInterrupt};

/// Epoll data of the kill eventfd.
const KILL_TOKEN: u64 = u64::MAX;
/// Set in the epoll data of device-specific fds, to tell them apart from queue notifiers.
const DEVICE_TOKEN_BIT: u64 = 1 << 32;

/// Lets a handler add and remove its own file descriptors in the worker's epoll set.
pub(crate) struct Poller<'a> {
    epoll: &'a Epoll,
}

impl<'a> Poller<'a> {
    /// A poller over `epoll`, for driving a handler without its thread (fuzz targets).
    #[cfg(feature = "fuzzing")]
    pub(crate) fn new(epoll: &'a Epoll) -> Self {
        Poller { epoll }
    }

    /// Starts waiting for `fd` to become readable; [`WorkerHandler::fd_ready`] gets `token`.
    pub(crate) fn add(&self, fd: RawFd, token: u32) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, DEVICE_TOKEN_BIT | u64::from(token)),
        )
    }

    /// Stops waiting for `fd`.
    pub(crate) fn remove(&self, fd: RawFd) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }
}

/// The device-specific half of a worker thread.
pub(crate) trait WorkerHandler: Send + 'static {
    /// Registers device-specific fds before the thread starts waiting.
    fn start(&mut self, _poller: &Poller) -> io::Result<()> {
        Ok(())
    }

    /// The driver notified queue `index` (or the worker just started). The notifier has already
    /// been drained, so the handler must consume everything that is available.
    fn queue_notified(&mut self, index: usize, poller: &Poller);

    /// A device-specific fd added with `token` is readable (or hung up).
    fn fd_ready(&mut self, _token: u32, _poller: &Poller) {}
}

/// What a device thread does, for whoever confines threads by what they do (the VMM's
/// seccomp filters): this crate only names the kind and calls the hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceThread {
    Block,
    Net,
    Rng,
    Console,
    /// The virtio-iommu's worker: its event queue and fault reports.
    IommuEvents,
    /// The virtio-iommu's request queue poller.
    IommuPoller,
}

impl DeviceThread {
    /// The kind in thread names (`virtio-blk-0`).
    fn label(self) -> &'static str {
        match self {
            DeviceThread::Block => "blk",
            DeviceThread::Net => "net",
            DeviceThread::Rng => "rng",
            DeviceThread::Console => "con",
            DeviceThread::IommuEvents | DeviceThread::IommuPoller => "iommu",
        }
    }
}

/// Runs first in every device thread, before it touches a queue.
pub type ThreadStartHook = Box<dyn Fn(DeviceThread) + Send + Sync>;

/// Process-wide, like the filters it installs: devices are built in many places and activated
/// through the transport, and none of them should carry a parameter they do not use.
static THREAD_START: OnceLock<ThreadStartHook> = OnceLock::new();

/// Sets the hook every device thread runs when it starts; `false` if one was already set (it
/// stays).
pub fn set_thread_start_hook(hook: ThreadStartHook) -> bool {
    THREAD_START.set(hook).is_ok()
}

/// Called by each device thread, in that thread, as it starts.
pub(crate) fn thread_started(kind: DeviceThread) {
    if let Some(hook) = THREAD_START.get() {
        hook(kind);
    }
}

/// Numbers worker threads (`virtio-blk-0`, `virtio-rng-1`, ...) across all devices.
static NEXT_INSTANCE: AtomicUsize = AtomicUsize::new(0);

/// What every worker-backed device keeps besides its own resources: the features it offers,
/// those the driver accepted, and its worker thread while it is active.
pub(crate) struct DeviceWorker {
    features: u64,
    acked_features: u64,
    kind: DeviceThread,
    thread_name: String,
    /// One per thread: most devices have one, a multi-queue disk one per queue.
    workers: Vec<Worker>,
}

impl DeviceWorker {
    /// A device whose thread is of `kind`, offering `features`, not yet active.
    pub(crate) fn new(kind: DeviceThread, features: u64) -> Self {
        let instance = NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed);
        DeviceWorker {
            features,
            acked_features: 0,
            kind,
            thread_name: format!("virtio-{}-{instance}", kind.label()),
            workers: Vec::new(),
        }
    }

    pub(crate) fn features(&self) -> u64 {
        self.features
    }

    /// Records what the driver accepted, dropping bits the device never offered.
    pub(crate) fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features;
    }

    pub(crate) fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Whether the driver accepted feature `bit`.
    pub(crate) fn acked(&self, bit: u32) -> bool {
        self.acked_features & (1 << bit) != 0
    }

    /// Starts the device's thread serving `handler`; a second activation without reset
    /// replaces the running thread.
    pub(crate) fn start<H: WorkerHandler>(
        &mut self,
        notifiers: Vec<(usize, EventFd)>,
        handler: H,
    ) -> Result<(), ActivateError> {
        self.start_each(vec![(notifiers, handler)])
    }

    /// Starts one thread per `(notifiers, handler)`: `virtio-blk-3` for the first, then
    /// `virtio-blk-3-q1`, ... Running threads are stopped first.
    pub(crate) fn start_each<H: WorkerHandler>(
        &mut self,
        threads: Vec<(Vec<(usize, EventFd)>, H)>,
    ) -> Result<(), ActivateError> {
        self.stop();
        for (i, (notifiers, handler)) in threads.into_iter().enumerate() {
            let name = match i {
                0 => self.thread_name.clone(),
                i => format!("{}-q{i}", self.thread_name),
            };
            let worker =
                Worker::spawn(self.kind, name, notifiers, handler).map_err(ActivateError::Io)?;
            self.workers.push(worker);
        }
        Ok(())
    }

    /// Stops and joins the threads (which drops the queues).
    pub(crate) fn stop(&mut self) {
        self.workers.clear();
    }

    /// Device reset: stops the threads and forgets the negotiated features.
    pub(crate) fn reset(&mut self) {
        self.stop();
        self.acked_features = 0;
    }
}

/// A running worker thread; dropping it stops the thread and waits for it.
pub(crate) struct Worker {
    kill: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts thread `name`, of `kind`, serving `handler`; `notifiers` pairs each queue index
    /// with the eventfd the driver's notifications arrive on.
    pub(crate) fn spawn<H: WorkerHandler>(
        kind: DeviceThread,
        name: String,
        notifiers: Vec<(usize, EventFd)>,
        mut handler: H,
    ) -> io::Result<Worker> {
        let epoll = Epoll::new()?;
        let kill = EventFd::new(EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            kill.as_raw_fd(),
            EpollEvent::new(EventSet::IN, KILL_TOKEN),
        )?;
        for (position, (_, notifier)) in notifiers.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                notifier.as_raw_fd(),
                EpollEvent::new(EventSet::IN, position as u64),
            )?;
        }
        handler.start(&Poller { epoll: &epoll })?;

        let thread = thread::Builder::new().name(name).spawn(move || {
            thread_started(kind);
            run(epoll, notifiers, handler)
        })?;
        Ok(Worker {
            kill,
            thread: Some(thread),
        })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        if let Err(err) = self.kill.write(1) {
            // Without the kill event the thread would never end; joining would hang the VMM.
            error!("cannot stop device worker: {err}");
            return;
        }
        if thread.join().is_err() {
            error!("device worker panicked");
        }
    }
}

fn run<H: WorkerHandler>(epoll: Epoll, notifiers: Vec<(usize, EventFd)>, mut handler: H) {
    let poller = Poller { epoll: &epoll };
    // Buffers made available before activation (or whose notification raced with it) must not
    // wait for the next kick; this first pass also arms EVENT_IDX.
    for (index, _) in &notifiers {
        handler.queue_notified(*index, &poller);
    }

    let mut events = vec![EpollEvent::default(); notifiers.len() + 4];
    loop {
        let count = match epoll.wait(-1, &mut events) {
            Ok(count) => count,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => {
                error!("device worker cannot wait for events: {err}");
                return;
            }
        };
        for event in &events[..count] {
            let token = event.data();
            if token == KILL_TOKEN {
                return;
            }
            if token & DEVICE_TOKEN_BIT != 0 {
                handler.fd_ready(token as u32, &poller);
                continue;
            }
            let Some((index, notifier)) = notifiers.get(token as usize) else {
                warn!("device worker woken with unknown token {token:#x}");
                continue;
            };
            if let Err(err) = notifier.read() {
                if err.kind() != io::ErrorKind::WouldBlock {
                    warn!("cannot drain queue {index} notifier: {err}");
                }
            }
            handler.queue_notified(*index, &poller);
        }
    }
}

/// An activated queue together with the means to tell the driver about used buffers.
pub(crate) struct DeviceQueue {
    index: usize,
    queue: Queue,
    interrupt: Arc<dyn VirtioInterrupt>,
    /// The driver broke the queue (see [`DeviceQueue::mark_broken`]): it is not served until
    /// the device is reset, which builds a new `DeviceQueue`.
    broken: bool,
}

impl DeviceQueue {
    /// Wraps queue `index`; `event_idx` says whether the driver accepted
    /// `VIRTIO_RING_F_EVENT_IDX`, which the device (not the transport) applies to the queue.
    pub(crate) fn new(
        index: usize,
        mut queue: Queue,
        event_idx: bool,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Self {
        queue.set_event_idx(event_idx);
        DeviceQueue {
            index,
            queue,
            interrupt,
            broken: false,
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

    /// Hands every available chain to `handle` and returns it to the driver as used.
    ///
    /// `handle` returns how many bytes it wrote into the chain, or `None` to leave the chain in
    /// the ring and stop (the console's receive queue does so when it has nothing to deliver).
    /// Notifications from the driver are suppressed while the ring is drained and re-enabled
    /// before returning, re-checking the ring afterwards, so a buffer added meanwhile is never
    /// left without either a notification or processing. The driver is interrupted at most
    /// once per call, and only if the queue says it wants to be. A broken queue (see
    /// [`DeviceQueue::mark_broken`]) is not served.
    pub(crate) fn process<M, F>(&mut self, mem: &M, mut handle: F)
    where
        M: GuestMemory,
        F: FnMut(DescriptorChain<&M>) -> Option<u32>,
    {
        if self.broken {
            return;
        }
        let mut used_any = false;
        let mut idle_rounds = 0;
        'rounds: loop {
            if let Err(err) = self.queue.disable_notification(mem) {
                warn_limited!("queue {}: cannot disable notifications: {err}", self.index);
            }
            let mut progressed = false;
            while let Some(chain) = self.queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let Some(len) = handle(chain) else {
                    self.queue.go_to_previous_position();
                    break 'rounds;
                };
                if let Err(err) = self.queue.add_used(mem, head, len) {
                    self.mark_broken(format_args!("cannot return descriptor {head}: {err}"));
                    break 'rounds;
                }
                used_any = true;
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
        if used_any {
            self.signal_used(mem);
        }
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
    pub(crate) fn pop<'m, M: GuestMemory>(&mut self, mem: &'m M) -> Option<DescriptorChain<&'m M>> {
        if self.broken {
            return None;
        }
        self.queue.pop_descriptor_chain(mem)
    }

    /// Returns chain `head` to the driver with `len` bytes written; `false` if the used ring
    /// cannot be written, which breaks the queue.
    pub(crate) fn add_used<M: GuestMemory>(&mut self, mem: &M, head: u16, len: u32) -> bool {
        if self.broken {
            return false;
        }
        match self.queue.add_used(mem, head, len) {
            Ok(()) => true,
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

    /// Interrupts the driver about used buffers, if it wants to be.
    pub(crate) fn signal_used<M: GuestMemory>(&mut self, mem: &M) {
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
    use std::sync::mpsc::{channel, Sender};
    use std::time::Duration;

    use super::*;
    use crate::test_utils::{guest_memory, wo, Driver, FakeInterrupt};

    const BUF: u64 = 0x2_0000;

    #[test]
    fn one_interrupt_per_batch_without_event_idx() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, 0, 16);
        let interrupt = Arc::new(FakeInterrupt::default());
        let mut queue = DeviceQueue::new(0, driver.queue(), false, interrupt.clone());

        let heads: Vec<u16> = (0..3)
            .map(|i| driver.add(&[wo(BUF + i * 16, 16)]))
            .collect();
        let mut seen = Vec::new();
        queue.process(&mem, |chain| {
            seen.push(chain.head_index());
            Some(8)
        });
        assert_eq!(seen, heads);
        assert_eq!(
            driver.used(),
            heads.iter().map(|&h| (u32::from(h), 8)).collect::<Vec<_>>()
        );
        assert_eq!(interrupt.count(0), 1);

        // Nothing used, nothing signalled.
        queue.process(&mem, |_| Some(0));
        assert_eq!(interrupt.count(0), 1);
    }

    #[test]
    fn event_idx_suppresses_interrupts_the_driver_did_not_ask_for() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, 0, 16);
        let interrupt = Arc::new(FakeInterrupt::default());
        let mut queue = DeviceQueue::new(0, driver.queue(), true, interrupt.clone());

        // The driver wants an interrupt only once the fourth buffer is used.
        driver.set_used_event(3);
        driver.add(&[wo(BUF, 16)]);
        queue.process(&mem, |_| Some(1));
        assert_eq!(driver.used().len(), 1);
        assert_eq!(interrupt.count(0), 0);

        driver.set_used_event(1);
        driver.add(&[wo(BUF, 16)]);
        queue.process(&mem, |_| Some(1));
        assert_eq!(interrupt.count(0), 1);
    }

    #[test]
    fn a_declined_chain_stays_available() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, 0, 16);
        let interrupt = Arc::new(FakeInterrupt::default());
        let mut queue = DeviceQueue::new(0, driver.queue(), false, interrupt.clone());

        let head = driver.add(&[wo(BUF, 16)]);
        queue.process(&mem, |_| None);
        assert!(driver.used().is_empty());
        assert_eq!(interrupt.count(0), 0);

        queue.process(&mem, |chain| {
            assert_eq!(chain.head_index(), head);
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
        let mut queue = DeviceQueue::new(0, driver.queue(), false, interrupt.clone());
        driver.set_avail_idx(17);
        queue.process(&mem, |_| panic!("nothing can be popped"));
        assert!(driver.used().is_empty());
        assert_eq!(interrupt.count(0), 0);
        assert_eq!(interrupt.needs_reset_count(), 1);

        driver.set_avail_idx(0);
        driver.add(&[wo(BUF, 16)]);
        queue.process(&mem, |_| panic!("a broken queue is not served"));
        assert!(queue.pop(&mem).is_none());
        assert!(!queue.enable_notification(&mem));
        assert_eq!(interrupt.needs_reset_count(), 1, "reported once");

        // Reset hands the device a fresh queue, which serves again.
        let mut queue = DeviceQueue::new(0, driver.queue(), false, interrupt.clone());
        queue.process(&mem, |_| Some(1));
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
        let mut queue = DeviceQueue::new(0, ring, false, interrupt.clone());
        driver.add(&[wo(BUF, 16)]);
        driver.add(&[wo(BUF, 16)]);
        let mut handled = 0;
        queue.process(&mem, |_| {
            handled += 1;
            Some(1)
        });
        assert_eq!(
            handled, 1,
            "processing stopped at the first failed completion"
        );
        assert_eq!(interrupt.needs_reset_count(), 1);
        queue.process(&mem, |_| panic!("a broken queue is not served"));
        assert!(!queue.add_used(&mem, 1, 0));
    }

    struct Recorder {
        calls: Sender<usize>,
    }

    impl WorkerHandler for Recorder {
        fn queue_notified(&mut self, index: usize, _poller: &Poller) {
            self.calls.send(index).unwrap();
        }
    }

    #[test]
    fn the_start_hook_runs_in_the_new_thread_before_it_serves() {
        static STARTED: std::sync::Mutex<Vec<(String, DeviceThread)>> =
            std::sync::Mutex::new(Vec::new());
        assert!(set_thread_start_hook(Box::new(|kind| {
            let name = thread::current().name().unwrap_or_default().to_owned();
            STARTED.lock().unwrap().push((name, kind));
        })));
        assert!(!set_thread_start_hook(Box::new(|_| {})), "set once");
        let (calls, seen) = channel();
        let notifier = EventFd::new(EFD_NONBLOCK).unwrap();
        let _worker = Worker::spawn(
            DeviceThread::Console,
            "hook-test".into(),
            vec![(0, notifier)],
            Recorder { calls },
        )
        .unwrap();
        assert_eq!(seen.recv_timeout(Duration::from_secs(5)).unwrap(), 0);
        let started = STARTED.lock().unwrap();
        assert!(
            started.contains(&("hook-test".to_owned(), DeviceThread::Console)),
            "{started:?}"
        );
    }

    #[test]
    fn worker_dispatches_notifiers_and_stops_when_dropped() {
        let (calls, seen) = channel();
        let a = EventFd::new(EFD_NONBLOCK).unwrap();
        let b = EventFd::new(EFD_NONBLOCK).unwrap();
        let worker = Worker::spawn(
            DeviceThread::Rng,
            "worker-test".into(),
            vec![(3, a.try_clone().unwrap()), (5, b.try_clone().unwrap())],
            Recorder { calls },
        )
        .unwrap();
        let timeout = Duration::from_secs(5);
        // The initial pass visits every queue.
        assert_eq!(seen.recv_timeout(timeout).unwrap(), 3);
        assert_eq!(seen.recv_timeout(timeout).unwrap(), 5);

        b.write(1).unwrap();
        assert_eq!(seen.recv_timeout(timeout).unwrap(), 5);
        a.write(1).unwrap();
        assert_eq!(seen.recv_timeout(timeout).unwrap(), 3);
        // The worker drained the notifier it woke for.
        assert!(a.read().is_err());

        drop(worker);
        // The handler (and its sender) went away with the thread.
        assert!(seen.recv_timeout(timeout).is_err());
    }
}
