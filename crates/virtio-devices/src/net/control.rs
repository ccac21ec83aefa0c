//! The control queue of a multi-queue virtio-net (virtio v1.2 §5.1.6.5), and the tap queues
//! it switches on and off.
//!
//! With `VIRTIO_NET_F_MQ` the driver starts on one queue pair and asks for more with
//! `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`. Each pair has a tap queue of its own; the pairs the
//! driver does not use are detached from the tap (`TUNSETQUEUE`), so the host kernel spreads
//! its frames over the pairs the driver polls and queues none where nobody reads (the device
//! must not use receive queues past `virtqueue_pairs`, §5.1.6.5.5). Only that command is
//! served: every other class belongs to a feature this device does not offer and is answered
//! `VIRTIO_NET_ERR`.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_ERR, VIRTIO_NET_OK,
};
use vm_device::{lock, warn_limited};
use vm_memory::GuestMemory;
use vmm_sys_util::eventfd::EventFd;

use super::NetBackend;
use crate::buffers::{self, Chain};
use crate::device_queue::{DeviceQueue, Served};
use crate::worker::Poller;
use crate::DeviceMemory;

/// The part of a control request the device reads: class, command and a 16-bit argument.
const REQUEST_PREFIX: usize = 4;

/// A control request, as far as this device understands it.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ControlCommand {
    /// `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`: use the first `n` queue pairs.
    SetQueuePairs(u16),
    /// A class or command of a feature not offered.
    Unsupported { class: u8, command: u8 },
    /// Too short to hold its class, command and argument.
    Malformed,
}

/// Reads the command at the start of a request's device-readable bytes (`request` holds at
/// most [`REQUEST_PREFIX`] of them).
pub(super) fn parse(request: &[u8]) -> ControlCommand {
    match *request {
        [class, command, ..] if (class, command) != (MQ_CLASS, PAIRS_SET) => {
            ControlCommand::Unsupported { class, command }
        }
        [_, _, low, high, ..] => ControlCommand::SetQueuePairs(u16::from_le_bytes([low, high])),
        _ => ControlCommand::Malformed,
    }
}

const MQ_CLASS: u8 = VIRTIO_NET_CTRL_MQ as u8;
const PAIRS_SET: u8 = VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8;

/// The tap queues of a device, one per queue pair, and how many pairs the driver uses.
pub(super) struct TapQueues<B> {
    backends: Vec<Arc<B>>,
    /// Which queues the kernel has attached to the tap (all, as opened).
    attached: Mutex<Vec<bool>>,
    /// The pairs in use: the first `active` queues, all attached.
    active: AtomicUsize,
}

impl<B: NetBackend> TapQueues<B> {
    /// The queues of one tap, all attached as they were opened; at least one.
    pub(super) fn new(backends: Vec<B>) -> Self {
        assert!(!backends.is_empty(), "a network device needs a tap queue");
        let count = backends.len();
        TapQueues {
            backends: backends.into_iter().map(Arc::new).collect(),
            attached: Mutex::new(vec![true; count]),
            active: AtomicUsize::new(count),
        }
    }

    /// How many queue pairs the device has.
    pub(super) fn len(&self) -> usize {
        self.backends.len()
    }

    pub(super) fn backend(&self, pair: usize) -> &B {
        &self.backends[pair]
    }

    /// Whether the driver uses `pair`.
    pub(super) fn is_active(&self, pair: usize) -> bool {
        pair < self.active.load(Ordering::Acquire)
    }

    /// Puts the first `pairs` queues in use and detaches the others. Returns the pairs whose
    /// use changed, whose workers must look again, and whether every queue could be switched
    /// (if not, the pairs in use are the ones whose queues are attached). A pair leaving use
    /// stops delivering before its queue is detached; one joining is attached first.
    pub(super) fn use_pairs(&self, pairs: usize) -> (Vec<usize>, io::Result<()>) {
        let pairs = pairs.clamp(1, self.len());
        let mut attached = lock(&self.attached);
        let before = self.active.load(Ordering::Acquire);
        self.active.store(pairs.min(before), Ordering::Release);
        let mut result = Ok(());
        let mut usable = pairs;
        for (pair, state) in attached.iter_mut().enumerate() {
            let want = pair < pairs;
            if *state == want {
                continue;
            }
            if let Err(err) = self.backends[pair].set_queue_attached(want) {
                usable = usable.min(pair);
                result = Err(err);
                break;
            }
            *state = want;
        }
        self.active.store(usable, Ordering::Release);
        let changed = (0..self.len())
            .filter(|&pair| (pair < before) != (pair < usable))
            .collect();
        (changed, result)
    }
}

/// The control queue, served by the first pair's worker.
pub(super) struct ControlQueue<B> {
    pub(super) queue: DeviceQueue,
    commands: Commands<B>,
}

/// What control requests act on.
struct Commands<B> {
    taps: Arc<TapQueues<B>>,
    /// The most pairs the driver may ask for: all of them with `VIRTIO_NET_F_MQ`, else one.
    max_pairs: usize,
    /// Each pair's worker wake-up, written when its pair joins or leaves use.
    wakes: Vec<EventFd>,
}

impl<B: NetBackend> ControlQueue<B> {
    pub(super) fn new(
        queue: DeviceQueue,
        taps: Arc<TapQueues<B>>,
        max_pairs: usize,
        wakes: Vec<EventFd>,
    ) -> Self {
        ControlQueue {
            queue,
            commands: Commands {
                taps,
                max_pairs,
                wakes,
            },
        }
    }

    /// Answers the requests the driver has queued (a queue's worth at a time), each inside a
    /// transfer of its own: an UNMAP of its buffers waits until its request is read and its
    /// ack written. Comes back through `poller` if it stopped at its budget.
    pub(super) fn serve<M: DeviceMemory>(&mut self, mem: &M, poller: &Poller) {
        let commands = &self.commands;
        let served = self.queue.process(mem, |chain| {
            let _dma = mem.begin_dma();
            Some(commands.answer(mem, chain))
        });
        if served == Served::Budget {
            poller.rearm(self.queue.index());
        }
    }
}

impl<B: NetBackend> Commands<B> {
    /// Carries out one request and writes its ack; returns the bytes written (the ack, or
    /// nothing when the chain has no room for it).
    fn answer<M: GuestMemory>(&self, mem: &M, chain: &Chain) -> u32 {
        let (head, buffers) = (chain.head, &chain.buffers);
        // Device-readable buffers first, then device-writable ones (§2.7.4.2).
        let split = buffers
            .iter()
            .position(|b| b.writable)
            .unwrap_or(buffers.len());
        let (readable, writable) = buffers.split_at(split);
        // A request the driver cannot be told the outcome of is not carried out.
        if buffers::total_len(writable) == 0 {
            warn_limited!("virtio-net: control request {head} has no room for its ack");
            return 0;
        }
        let ack = if writable.iter().any(|b| !b.writable) {
            warn_limited!("virtio-net: control request {head} mixes buffer directions");
            VIRTIO_NET_ERR as u8
        } else {
            let mut request = [0u8; REQUEST_PREFIX];
            let len = buffers::total_len(readable).min(REQUEST_PREFIX as u64) as usize;
            match buffers::read_into(mem, readable, 0, &mut request[..len]) {
                Ok(()) => self.execute(parse(&request[..len])),
                Err(err) => {
                    warn_limited!("virtio-net: control request {head}: {err}");
                    VIRTIO_NET_ERR as u8
                }
            }
        };
        // Into the first writable byte (the ack ends the request, which is one byte here).
        let ack_buffers: Vec<_> = writable.iter().copied().filter(|b| b.writable).collect();
        match buffers::write_from(mem, &ack_buffers, 0, &[ack]) {
            Ok(()) => 1,
            Err(err) => {
                warn_limited!("virtio-net: control request {head}: cannot write the ack: {err}");
                0
            }
        }
    }

    fn execute(&self, command: ControlCommand) -> u8 {
        let pairs = match command {
            ControlCommand::SetQueuePairs(pairs)
                if (1..=self.max_pairs).contains(&pairs.into()) =>
            {
                usize::from(pairs)
            }
            ControlCommand::SetQueuePairs(pairs) => {
                warn_limited!(
                    "virtio-net: the driver asked for {pairs} queue pairs, not from 1 to {}",
                    self.max_pairs
                );
                return VIRTIO_NET_ERR as u8;
            }
            ControlCommand::Unsupported { class, command } => {
                log::debug!("virtio-net: control class {class} command {command} is not served");
                return VIRTIO_NET_ERR as u8;
            }
            ControlCommand::Malformed => {
                warn_limited!("virtio-net: a control request too short for its command");
                return VIRTIO_NET_ERR as u8;
            }
        };
        let (changed, switched) = self.taps.use_pairs(pairs);
        for pair in changed {
            if let Err(err) = self.wakes[pair].write(1) {
                warn_limited!("virtio-net: cannot wake queue pair {pair}: {err}");
            }
        }
        if let Err(err) = switched {
            warn_limited!("virtio-net: cannot switch to {pairs} queue pairs: {err}");
            return VIRTIO_NET_ERR as u8;
        }
        log::info!("virtio-net: the driver uses {pairs} queue pairs");
        VIRTIO_NET_OK as u8
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, RawFd};

    use super::*;

    /// A tap queue that records its attach calls and refuses them once `refuse` is set.
    #[derive(Default)]
    struct Queue {
        calls: Mutex<Vec<bool>>,
        refuse: bool,
    }

    impl AsRawFd for Queue {
        fn as_raw_fd(&self) -> RawFd {
            -1
        }
    }

    impl NetBackend for Queue {
        fn supported_offloads(&self) -> u32 {
            0
        }

        fn set_offloads(&self, _offloads: u32) -> io::Result<()> {
            Ok(())
        }

        fn set_queue_attached(&self, attached: bool) -> io::Result<()> {
            if self.refuse {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
            lock(&self.calls).push(attached);
            Ok(())
        }
    }

    #[test]
    fn pairs_in_use_are_those_attached_even_when_the_host_refuses_one() {
        let refusing = Queue {
            refuse: true,
            ..Queue::default()
        };
        let taps = TapQueues::new(vec![Queue::default(), Queue::default(), refusing]);
        let (changed, result) = taps.use_pairs(1);
        assert_eq!(changed, [1, 2]);
        assert!(result.is_err(), "pair 2 cannot be detached");
        assert!(taps.is_active(0) && !taps.is_active(1) && !taps.is_active(2));
        assert_eq!(*lock(&taps.backend(1).calls), [false]);

        let (changed, result) = taps.use_pairs(3);
        assert!(result.is_ok(), "pair 2 was never detached: nothing to ask");
        assert_eq!(changed, [1, 2]);
        assert!((0..3).all(|pair| taps.is_active(pair)));
        assert_eq!(*lock(&taps.backend(1).calls), [false, true]);
        // Asking for more pairs than there are uses them all; none is switched twice.
        let (changed, result) = taps.use_pairs(9);
        assert!(changed.is_empty() && result.is_ok());
    }

    /// Behind the IOMMU, a control request is read and its ack written inside a transfer, as
    /// every other buffer access of a protected device is.
    #[test]
    fn control_requests_behind_the_iommu_are_served_inside_a_transfer() {
        use crate::test_utils::{iommu_memory, ro, wo, Driver, FakeInterrupt, BUFFERS_START};
        use vm_memory::{Bytes, GuestAddress, Permissions};

        let mem = iommu_memory();
        let (request, ack) = (BUFFERS_START, BUFFERS_START + 0x100);
        mem.iommu()
            .map(BUFFERS_START, BUFFERS_START, 0x1000, Permissions::ReadWrite);
        mem.write_slice(&[MQ_CLASS, PAIRS_SET, 2, 0], GuestAddress(request))
            .unwrap();
        let mut driver = Driver::new(&mem, 0, 16);
        let taps = Arc::new(TapQueues::new(vec![Queue::default(), Queue::default()]));
        let queue = DeviceQueue::new(0, driver.queue(), 0, Arc::new(FakeInterrupt::default()));
        let wakes = (0..2)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let mut control = ControlQueue::new(queue, Arc::clone(&taps), 2, wakes);
        driver.add(&[ro(request, 4), wo(ack, 1)]);
        mem.iommu().unguarded.store(0, Ordering::SeqCst);
        let epoll = vmm_sys_util::epoll::Epoll::new().unwrap();
        control.serve(&mem, &Poller::new(&epoll));
        let unguarded = mem.iommu().unguarded.load(Ordering::SeqCst);
        assert_eq!(unguarded, 0, "buffer translations outside a transfer");
        assert_eq!(driver.used(), [(0, 1)]);
        let answer: u8 = mem.read_obj(GuestAddress(ack)).unwrap();
        assert_eq!(answer, VIRTIO_NET_OK as u8);
        assert!(taps.is_active(1));
    }

    #[test]
    fn requests_are_read_as_their_spec_layout() {
        assert_eq!(parse(&[4, 0, 3, 0]), ControlCommand::SetQueuePairs(3));
        assert_eq!(parse(&[4, 0, 0, 1]), ControlCommand::SetQueuePairs(256));
        assert_eq!(
            parse(&[0, 1, 1]),
            ControlCommand::Unsupported {
                class: 0,
                command: 1
            }
        );
        assert_eq!(
            parse(&[4, 1, 0, 0]),
            ControlCommand::Unsupported {
                class: 4,
                command: 1
            }
        );
        for short in [&[][..], &[4], &[4, 0], &[4, 0, 2]] {
            assert_eq!(parse(short), ControlCommand::Malformed, "{short:?}");
        }
    }
}
