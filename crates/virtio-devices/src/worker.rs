//! The thread that serves a device between `activate` and `reset`.
//!
//! Each active device gets one thread that waits in epoll on its queue notifiers, a kill eventfd
//! and whatever file descriptors the device itself needs (console input). Device logic lives in a
//! [`WorkerHandler`]; this module owns the thread and the wake-up plumbing (the queues
//! themselves are `device_queue.rs`'s). A stop request wins over anything else ready, and
//! every handler call is bounded, so stopping a worker takes one round of calls whatever the
//! driver keeps queueing.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::thread::{self, JoinHandle};

use log::{error, warn};
use vm_device::error_limited;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::ActivateError;

/// Epoll data of the kill eventfd.
const KILL_TOKEN: u64 = u64::MAX;
/// Set in the epoll data of device-specific fds, to tell them apart from queue notifiers.
const DEVICE_TOKEN_BIT: u64 = 1 << 32;

/// Lets a handler add and remove its own file descriptors in the worker's epoll set, and come
/// back to a queue it left with work to do.
pub(crate) struct Poller<'a> {
    epoll: &'a Epoll,
    notifiers: &'a [(usize, EventFd)],
}

impl<'a> Poller<'a> {
    /// A poller over `epoll`, for driving a handler without its thread (fuzz targets).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn new(epoll: &'a Epoll) -> Self {
        Poller {
            epoll,
            notifiers: &[],
        }
    }

    /// A poller over `epoll` that comes back to the queues of `notifiers`, for driving a
    /// handler without its thread.
    #[cfg(test)]
    pub(crate) fn with_notifiers(epoll: &'a Epoll, notifiers: &'a [(usize, EventFd)]) -> Self {
        Poller { epoll, notifiers }
    }

    /// Has the worker serve queue `index` again after it looked at its other events (a stop
    /// request among them): a handler that spent its budget on a queue the driver keeps
    /// full yields this way instead of serving it for as long as the driver likes.
    pub(crate) fn rearm(&self, index: usize) {
        let Some((_, notifier)) = self.notifiers.iter().find(|(i, _)| *i == index) else {
            return;
        };
        if let Err(err) = notifier.write(1) {
            error_limited!("queue {index}: cannot come back to it: {err}");
        }
    }

    /// Starts waiting for `fd` to become readable; [`WorkerHandler::fd_ready`] gets `token`.
    pub(crate) fn add(&self, fd: RawFd, token: u32) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, DEVICE_TOKEN_BIT | u64::from(token)),
        )
    }

    /// Starts watching socket `fd` both ways, edge-triggered: [`WorkerHandler::fd_ready`]
    /// gets `token` each time it becomes readable or writable or hangs up, and the handler
    /// reads or writes until it would block (a socket it cannot serve now, for want of guest
    /// buffers or credit, then costs no wake-ups until something changes).
    pub(crate) fn add_stream(&self, fd: RawFd, token: u32) -> io::Result<()> {
        let events =
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(events, DEVICE_TOKEN_BIT | u64::from(token)),
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

    /// A device-specific fd added with `token` is readable (or hung up), or, added with
    /// [`Poller::add_stream`], writable.
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
    /// virtio-vsock: its queues and the host's Unix sockets.
    Vsock,
    /// virtio-fs: relays a vhost-user back end's interrupts, and answers the guest while the
    /// back end is gone.
    Fs,
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
            DeviceThread::Vsock => "vsock",
            DeviceThread::Fs => "fs",
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
        handler.start(&Poller {
            epoll: &epoll,
            notifiers: &notifiers,
        })?;

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
    let poller = Poller {
        epoll: &epoll,
        notifiers: &notifiers,
    };
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
        // A stop request wins over whatever else is ready: each handler call is bounded, so
        // the thread ends within one round of them whatever the driver keeps queueing.
        if events[..count].iter().any(|e| e.data() == KILL_TOKEN) {
            return;
        }
        for event in &events[..count] {
            let token = event.data();
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

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{channel, Sender};
    use std::time::Duration;

    use super::*;

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
