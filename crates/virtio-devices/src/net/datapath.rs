//! The network worker of one queue pair: frames between its tap queue and its receive and
//! transmit queues.
//!
//! Receive: a frame is read from the tap into a bounce buffer (its size is only known once
//! read), then copied into receive chains. With `VIRTIO_NET_F_MRG_RXBUF` a frame takes as
//! many chains as it needs and `num_buffers` in its header says how many; without it, one
//! chain must hold it. When the driver has too few buffers, the frame (and the chains already
//! taken for it) wait, and the tap is not read until the driver adds buffers: the kernel
//! queues, then drops, what arrives meanwhile, as a full NIC ring would.
//!
//! Transmit: each chain is one frame with its header in front, written to the tap with one
//! `writev` straight from the guest's buffers.
//!
//! A pair the driver does not use (see `control.rs`) reads nothing from its tap queue and
//! drops a frame it still held; its worker is woken when that changes.
//!
//! A malformed chain (a buffer in the wrong direction, out of guest memory or refused by the
//! IOMMU, a frame of impossible size) costs its frame, never the worker: it is logged and
//! returned to the driver unused.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use log::debug;
use net_util::VNET_HDR_LEN;
use virtio_queue::DescriptorChain;
use vm_device::warn_limited;
use vm_memory::{GuestMemory, Permissions};
use vmm_sys_util::eventfd::EventFd;

use super::control::{ControlQueue, TapQueues};
use super::NetBackend;
use crate::buffers::{self, Buffer};
use crate::counters::NetCounters;
use crate::worker::{DeviceQueue, Poller, WorkerHandler};
use crate::DeviceMemory;

/// Largest Ethernet frame a tap delivers or accepts: a 64 KiB segmentation-offload packet
/// with an Ethernet header and a VLAN tag.
pub(super) const MAX_FRAME_LEN: usize = 65_536 + 14 + 4;
/// Largest frame with its virtio-net header.
pub(super) const MAX_PACKET_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// Shortest frame worth delivering: a header and an Ethernet header.
const MIN_PACKET_LEN: usize = VNET_HDR_LEN + 14;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_OFFSET: usize = 10;
/// Frames received per wake-up, so that a flood cannot starve the transmit queue.
const RX_BUDGET: usize = 64;
/// Most iovecs one `writev` takes (Linux's `UIO_MAXIOV`).
const MAX_IOVECS: usize = 1024;
/// Epoll token of the tap queue.
const TAP_TOKEN: u32 = 0;
/// Epoll token of the wake-up the control queue writes when the pair joins or leaves use.
const WAKE_TOKEN: u32 = 1;

/// One queue pair's queues, and the eventfd that tells its worker the pair's use changed.
pub(super) struct PairQueues {
    pub(super) pair: usize,
    pub(super) rx: DeviceQueue,
    pub(super) tx: DeviceQueue,
    pub(super) wake: EventFd,
}

/// A receive chain taken for the waiting frame: its head and device-writable buffers.
struct RxChain {
    head: u16,
    buffers: Vec<Buffer>,
    capacity: u64,
}

/// What became of the waiting frame.
enum Delivery {
    /// Written into the guest's buffers.
    Delivered,
    /// Discarded (its chains, if any, returned unused).
    Dropped,
    /// Not enough receive buffers: it keeps waiting.
    NoBuffers,
}

pub(super) struct NetWorker<M, B> {
    mem: M,
    taps: Arc<TapQueues<B>>,
    pair: usize,
    rx: DeviceQueue,
    tx: DeviceQueue,
    wake: EventFd,
    /// The first pair's worker also answers the control queue.
    control: Option<ControlQueue<B>>,
    mrg_rxbuf: bool,
    /// Bounce buffer for one received frame; one byte longer than the longest frame, so that
    /// a truncated read shows.
    frame: Box<[u8]>,
    /// Length of the received frame in `frame` not yet delivered.
    pending: Option<usize>,
    /// Chains taken for the pending frame, in order.
    reserved: Vec<RxChain>,
    /// Whether the tap is in the worker's epoll set.
    tap_watched: bool,
    /// Set after an unexpected tap read error: the tap is left alone until the driver next
    /// notifies a queue, rather than retried in a busy loop.
    tap_failed: bool,
    /// Whether used receive chains await an interrupt.
    rx_used: bool,
    counters: Arc<NetCounters>,
}

impl<M: DeviceMemory, B: NetBackend> NetWorker<M, B> {
    pub(super) fn new(
        mem: M,
        taps: Arc<TapQueues<B>>,
        queues: PairQueues,
        mrg_rxbuf: bool,
        counters: Arc<NetCounters>,
    ) -> Self {
        NetWorker {
            mem,
            taps,
            pair: queues.pair,
            rx: queues.rx,
            tx: queues.tx,
            wake: queues.wake,
            control: None,
            mrg_rxbuf,
            frame: vec![0; MAX_PACKET_LEN + 1].into_boxed_slice(),
            pending: None,
            reserved: Vec::new(),
            tap_watched: false,
            tap_failed: false,
            rx_used: false,
            counters,
        }
    }

    /// Makes this worker answer the control queue too.
    pub(super) fn with_control(mut self, control: ControlQueue<B>) -> Self {
        self.control = Some(control);
        self
    }

    fn backend(&self) -> &B {
        self.taps.backend(self.pair)
    }

    /// Delivers the waiting frame, then reads and delivers more until the tap is empty, the
    /// budget is spent or the driver runs out of buffers. A pair out of use drops its frame.
    fn receive(&mut self, poller: &Poller) {
        if !self.taps.is_active(self.pair) && self.pending.take().is_some() {
            self.drop_frame();
        }
        for _ in 0..RX_BUDGET {
            if !self.taps.is_active(self.pair) {
                break;
            }
            let len = match self.pending {
                Some(len) => len,
                None => match self.read_frame() {
                    Some(len) => {
                        self.pending = Some(len);
                        len
                    }
                    None => break,
                },
            };
            match self.deliver(len) {
                Delivery::Delivered | Delivery::Dropped => self.pending = None,
                Delivery::NoBuffers => break,
            }
        }
        if std::mem::take(&mut self.rx_used) {
            self.rx.signal_used(&self.mem);
        }
        self.update_tap_watch(poller);
    }

    /// Reads one frame from the tap; `None` when there is none (or the tap failed).
    fn read_frame(&mut self) -> Option<usize> {
        let fd = self.backend().as_raw_fd();
        loop {
            // SAFETY: reads into the live bounce buffer, at most its length.
            let read = unsafe { libc::read(fd, self.frame.as_mut_ptr().cast(), self.frame.len()) };
            if read < 0 {
                let err = io::Error::last_os_error();
                match err.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => {}
                    _ => {
                        warn_limited!("virtio-net: cannot read from the tap: {err}");
                        self.tap_failed = true;
                    }
                }
                return None;
            }
            let len = read as usize;
            if (MIN_PACKET_LEN..=MAX_PACKET_LEN).contains(&len) {
                return Some(len);
            }
            warn_limited!("virtio-net: dropping a {len}-byte frame from the tap");
        }
    }

    /// Takes receive chains until the pending `len`-byte frame fits, and writes it into them.
    ///
    /// The chains held for a frame are bounded whatever the driver posts: with MRG_RXBUF a
    /// chain smaller than a header (which the driver must not post, virtio 1.2 §5.1.6.3.1)
    /// costs the frame instead of being held, so each held chain brings at least a header's
    /// worth of room; and a frame that a queue size of chains cannot hold (more than the ring
    /// has, so the driver reused heads, or the frame can never fit) is dropped.
    fn deliver(&mut self, len: usize) -> Delivery {
        let len64 = len as u64;
        let mut rechecked = false;
        loop {
            let capacity: u64 = self.reserved.iter().map(|c| c.capacity).sum();
            if capacity >= len64 || (!self.mrg_rxbuf && !self.reserved.is_empty()) {
                break;
            }
            if self.reserved.len() >= usize::from(self.rx.size()) {
                warn_limited!(
                    "virtio-net: a {len}-byte frame does not fit {} receive chains \
                     ({capacity} bytes); dropping it",
                    self.reserved.len()
                );
                return self.drop_frame();
            }
            let Some(chain) = self.rx.pop(&self.mem) else {
                // The driver notifies once it adds buffers, unless it did so just now.
                if !rechecked && self.rx.enable_notification(&self.mem) {
                    rechecked = true;
                    continue;
                }
                return Delivery::NoBuffers;
            };
            rechecked = false;
            let head = chain.head_index();
            let buffers = buffers::collect(chain);
            if buffers.iter().any(|b| !b.writable) {
                warn_limited!("virtio-net: receive chain {head} has device-readable buffers; dropping a frame");
                self.reserved.push(RxChain {
                    head,
                    buffers: Vec::new(),
                    capacity: 0,
                });
                return self.drop_frame();
            }
            let capacity = buffers::total_len(&buffers);
            self.reserved.push(RxChain {
                head,
                buffers,
                capacity,
            });
            if self.mrg_rxbuf && capacity < VNET_HDR_LEN as u64 {
                warn_limited!(
                    "virtio-net: receive chain {head} holds {capacity} bytes, less than a \
                     header; dropping a frame"
                );
                return self.drop_frame();
            }
        }

        let capacity: u64 = self.reserved.iter().map(|c| c.capacity).sum();
        if capacity < len64 {
            warn_limited!(
                "virtio-net: a {len}-byte frame does not fit the {capacity}-byte receive chain {}; dropping it",
                self.reserved[0].head
            );
            return self.drop_frame();
        }
        // At most the queue size (<= 32768) chains.
        let num_buffers = self.reserved.len() as u16;
        self.frame[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&num_buffers.to_le_bytes());

        // The chains' buffers are translated as they are written: one transfer.
        let _dma = self.mem.begin_dma();
        let mut lens = Vec::with_capacity(self.reserved.len());
        let mut offset = 0usize;
        for chain in &self.reserved {
            // Below `len`, so fits in usize.
            let count = chain.capacity.min((len - offset) as u64) as usize;
            let data = &self.frame[offset..offset + count];
            if let Err(err) = buffers::write_from(&self.mem, &chain.buffers, 0, data) {
                warn_limited!(
                    "virtio-net: receive chain {}: {err}; dropping a frame",
                    chain.head
                );
                break;
            }
            lens.push(count as u32);
            offset += count;
        }
        if lens.len() < self.reserved.len() {
            return self.drop_frame();
        }
        for (chain, written) in std::mem::take(&mut self.reserved).into_iter().zip(lens) {
            self.rx_used |= self.rx.add_used(&self.mem, chain.head, written);
        }
        self.counters.rx_frames.add(1);
        self.counters.rx_bytes.add((len - VNET_HDR_LEN) as u64);
        Delivery::Delivered
    }

    /// Discards the pending frame and returns the chains taken for it unused.
    fn drop_frame(&mut self) -> Delivery {
        for chain in std::mem::take(&mut self.reserved) {
            self.rx_used |= self.rx.add_used(&self.mem, chain.head, 0);
        }
        Delivery::Dropped
    }

    /// Watches the tap only while a frame read from it has somewhere to go: level-triggered
    /// epoll would otherwise wake the worker in a loop while the driver has no buffers.
    fn update_tap_watch(&mut self, poller: &Poller) {
        let want = self.pending.is_none() && !self.tap_failed && self.taps.is_active(self.pair);
        if want == self.tap_watched {
            return;
        }
        let fd = self.backend().as_raw_fd();
        let result = if want {
            poller.add(fd, TAP_TOKEN)
        } else {
            poller.remove(fd)
        };
        match result {
            Ok(()) => self.tap_watched = want,
            Err(err) => warn_limited!("virtio-net: cannot (un)watch the tap: {err}"),
        }
    }

    fn transmit(&mut self) {
        let mem = &self.mem;
        let fd = self.taps.backend(self.pair).as_raw_fd();
        let counters = &self.counters;
        self.tx.process(mem, |chain| {
            let _dma = mem.begin_dma();
            if let Some(frame_len) = send_chain(mem, fd, chain) {
                counters.tx_frames.add(1);
                counters.tx_bytes.add(frame_len as u64);
            }
            Some(0)
        });
    }
}

#[cfg(feature = "fuzzing")]
impl<M: DeviceMemory, B: NetBackend> NetWorker<M, B> {
    /// One notification of each queue, transmit first, on the calling thread.
    pub(super) fn serve_for_fuzzing(&mut self) -> io::Result<()> {
        let epoll = vmm_sys_util::epoll::Epoll::new()?;
        let poller = Poller::new(&epoll);
        self.queue_notified(self.tx.index(), &poller);
        self.queue_notified(self.rx.index(), &poller);
        Ok(())
    }
}

impl<M: DeviceMemory, B: NetBackend> WorkerHandler for NetWorker<M, B> {
    fn start(&mut self, poller: &Poller) -> io::Result<()> {
        poller.add(self.wake.as_raw_fd(), WAKE_TOKEN)
    }

    fn queue_notified(&mut self, index: usize, poller: &Poller) {
        // Any sign of life from the driver is a reason to try the tap again.
        self.tap_failed = false;
        if index == self.rx.index() {
            self.receive(poller);
        } else if index == self.tx.index() {
            self.transmit();
            self.update_tap_watch(poller);
        } else if let Some(control) = &mut self.control {
            control.serve(&self.mem);
        }
    }

    fn fd_ready(&mut self, token: u32, poller: &Poller) {
        if token == WAKE_TOKEN {
            if let Err(err) = self.wake.read() {
                debug!("virtio-net: pair {}: wake-up: {err}", self.pair);
            }
        }
        self.receive(poller);
    }
}

/// Writes the frame in `chain` (header first) to the tap `fd`; returns the frame's length
/// (without its header) once the tap took it. A frame that cannot be sent is dropped with a
/// message, like a NIC drops what it cannot transmit.
fn send_chain<M: GuestMemory>(mem: &M, fd: RawFd, chain: DescriptorChain<&M>) -> Option<usize> {
    let head = chain.head_index();
    let buffers = buffers::collect(chain);
    if buffers.iter().any(|b| b.writable) {
        warn_limited!("virtio-net: transmit chain {head} has device-writable buffers; dropping it");
        return None;
    }
    let len = buffers::total_len(&buffers);
    if !(MIN_PACKET_LEN as u64..=MAX_PACKET_LEN as u64).contains(&len) {
        warn_limited!(
            "virtio-net: transmit chain {head} holds {len} bytes, not a frame; dropping it"
        );
        return None;
    }
    let slices = match buffers::slices(mem, &buffers, 0, len, Permissions::Read) {
        Ok(slices) => slices,
        Err(err) => {
            warn_limited!("virtio-net: transmit chain {head}: {err}; dropping it");
            return None;
        }
    };
    if slices.len() > MAX_IOVECS {
        warn_limited!(
            "virtio-net: transmit chain {head} has {} segments; dropping it",
            slices.len()
        );
        return None;
    }
    // The guards keep the slices' pointers valid until the system call is done.
    let guards: Vec<_> = slices.iter().map(|slice| slice.ptr_guard()).collect();
    let iovecs: Vec<libc::iovec> = guards
        .iter()
        .zip(&slices)
        .map(|(guard, slice)| libc::iovec {
            iov_base: guard.as_ptr() as *mut libc::c_void,
            iov_len: slice.len(),
        })
        .collect();
    loop {
        // SAFETY: every iovec points into a live guest-memory slice of the length given,
        // which `writev` only reads; at most MAX_IOVECS of them.
        let written = unsafe { libc::writev(fd, iovecs.as_ptr(), iovecs.len() as libc::c_int) };
        if written >= 0 {
            return Some((written as usize).saturating_sub(VNET_HDR_LEN));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            // The kernel rejected the header the driver wrote.
            Some(libc::EINVAL) => {
                warn_limited!("virtio-net: transmit chain {head}: the tap refused the frame: {err}")
            }
            // The tap is down or its queue full: a host condition, not the guest's fault.
            _ => debug!("virtio-net: transmit chain {head}: {err}; dropped"),
        }
        return None;
    }
}
