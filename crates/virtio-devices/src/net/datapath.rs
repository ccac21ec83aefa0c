//! The network worker of one queue pair: frames between its tap queue and its receive and
//! transmit queues.
//!
//! Receive: a frame's size is only known once it is read, so the worker holds receive chains
//! for the size of the frames it has been getting and reads the next frame straight into
//! them, with one `readv` whose last iovec is a bounce buffer for whatever does not fit; only
//! that overflow is copied, into further chains. (Cloud Hypervisor reads each frame into one
//! chain and does not offer `VIRTIO_NET_F_MRG_RXBUF`; QEMU's virtio-net copies each frame from
//! its tap buffer.) With MRG_RXBUF a frame
//! takes as many chains as it needs and `num_buffers` in its header says how many; without
//! it, one chain must hold it. Chains held and not needed serve the next frame. When the
//! driver has too few buffers, the frame (and the chains already taken for it) wait, and the
//! tap is not read until the driver adds buffers: the kernel queues, then drops, what arrives
//! meanwhile, as a full NIC ring would.
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
use vm_device::warn_limited;
use vm_memory::{GuestMemory, Permissions};
use vmm_sys_util::eventfd::EventFd;

use super::control::{ControlQueue, TapQueues};
use super::NetBackend;
use crate::buffers::{self, Buffer, Chain};
use crate::counters::NetCounters;
use crate::device_queue::{DeviceQueue, Served};
use crate::worker::{Poller, WorkerHandler};
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
/// Most descriptors one receive or transmit chain may have: a frame takes far fewer (Linux
/// uses at most `MAX_SKB_FRAGS + 2`, 19 by default and 47 at most).
pub(super) const MAX_CHAIN_DESCRIPTORS: u16 = 256;
/// Most descriptors the receive chains held for one frame may have in all (64 KiB of
/// buffer records): a frame that needs more is dropped rather than held.
pub(super) const MAX_HELD_DESCRIPTORS: usize = 4096;
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

/// A receive chain held for the next frame: its head and device-writable buffers. A chain
/// found unusable (a buffer the device would read, too small for a header, refused by the
/// IOMMU) is held too, and costs the frame that reaches it, as it would have had the frame
/// been read first; so the IOMMU refuses it once, not once per look.
struct RxChain {
    head: u16,
    buffers: Vec<Buffer>,
    capacity: u64,
    usable: bool,
}

/// The frame read from the tap and not yet delivered: `len` bytes with their header, of which
/// the first `in_guest` went straight into the first `chains` held chains (filling them) and
/// the rest wait in the bounce buffer.
#[derive(Clone, Copy, Debug)]
struct Pending {
    len: usize,
    in_guest: usize,
    chains: usize,
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
    /// Bounce buffer for the part of a received frame that did not fit the held chains; one
    /// byte longer than the longest frame, so that a truncated read shows.
    frame: Box<[u8]>,
    /// The received frame not yet delivered.
    pending: Option<Pending>,
    /// Chains held for the pending or the next frame, in ring order: the last ones popped,
    /// so they can be given back (`undo_pop`) when the pair leaves use.
    reserved: Vec<RxChain>,
    /// How many bytes of chains to hold before reading: the larger of the last frame and
    /// seven eighths of the previous guess, so a bulk stream of 64 KiB frames holds enough
    /// for one while a trickle of small frames does not hold a ring's worth.
    expected_len: usize,
    /// Whether the tap is in the worker's epoll set.
    tap_watched: bool,
    /// Set after an unexpected tap read error: the tap is left alone until the driver next
    /// notifies a queue, rather than retried in a busy loop.
    tap_failed: bool,
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
            expected_len: MAX_PACKET_LEN,
            tap_watched: false,
            tap_failed: false,
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
    /// budget is spent or the driver runs out of buffers. A pair out of use drops its frame
    /// and gives back the chains it held.
    fn receive(&mut self, poller: &Poller) {
        if !self.taps.is_active(self.pair) {
            self.leave_use();
        }
        for _ in 0..RX_BUDGET {
            if !self.taps.is_active(self.pair) {
                break;
            }
            if self.pending.is_none() {
                self.hold_chains();
                match self.read_frame() {
                    Some(pending) => self.pending = Some(pending),
                    None => break,
                }
            }
            match self.deliver() {
                Delivery::Delivered | Delivery::Dropped => self.pending = None,
                Delivery::NoBuffers => break,
            }
        }
        self.rx.signal_used(&self.mem);
        self.update_tap_watch(poller);
    }

    /// The pair left use: its waiting frame is dropped, the chains held for the next one go
    /// back to the ring unused (they are the last popped, and nothing was written for the
    /// driver to see).
    fn leave_use(&mut self) {
        if self.pending.take().is_some() {
            self.drop_frame();
        }
        for _ in self.reserved.drain(..) {
            self.rx.undo_pop();
        }
    }

    /// Pops receive chains until those held can take a frame of the expected size (one
    /// chain without MRG_RXBUF), the ring is empty or a chain proves unusable.
    fn hold_chains(&mut self) {
        loop {
            if self.reserved.iter().any(|c| !c.usable)
                || (!self.mrg_rxbuf && !self.reserved.is_empty())
                || self.reserved.len() >= usize::from(self.rx.size())
                || self.held_descriptors() >= MAX_HELD_DESCRIPTORS
            {
                return;
            }
            let capacity: u64 = self.reserved.iter().map(|c| c.capacity).sum();
            if capacity >= self.expected_len as u64 {
                return;
            }
            let Some(chain) = self.pop_chain() else {
                return;
            };
            self.reserved.push(chain);
        }
    }

    /// Takes the next available chain, checked: `usable` is false for a chain with a
    /// device-readable buffer, or, with MRG_RXBUF, one smaller than a header (which the driver
    /// must not post, virtio 1.2 §5.1.6.3.1: each held chain so brings at least a header's
    /// worth of room).
    fn pop_chain(&mut self) -> Option<RxChain> {
        let Chain { head, buffers } = self.rx.pop(&self.mem)?;
        let capacity = buffers::total_len(&buffers);
        let usable = if buffers.iter().any(|b| !b.writable) {
            warn_limited!(
                "virtio-net: receive chain {head} has device-readable buffers; dropping a frame"
            );
            false
        } else if self.mrg_rxbuf && capacity < VNET_HDR_LEN as u64 {
            warn_limited!(
                "virtio-net: receive chain {head} holds {capacity} bytes, less than a header; \
                 dropping a frame"
            );
            false
        } else {
            true
        };
        Some(RxChain {
            head,
            buffers,
            capacity,
            usable,
        })
    }

    /// Reads one frame from the tap, into the usable chains held (in order, each filled before
    /// the next) and the bounce buffer after them; `None` when there is none (or the tap
    /// failed). A held chain the IOMMU refuses is marked unusable and ends the chains read
    /// into.
    fn read_frame(&mut self) -> Option<Pending> {
        let fd = self.backend().as_raw_fd();
        // The chains' buffers are translated before the read and written by it: one transfer.
        let _dma = self.mem.begin_dma();
        let mut slices = Vec::new();
        let mut direct = (0usize, 0usize);
        for chain in &mut self.reserved {
            // Never more than the longest frame, so the bounce buffer keeps the byte that
            // shows a truncated read; a frame never spills past a chain this cuts short.
            let take = chain.capacity.min((MAX_PACKET_LEN - direct.1) as u64);
            if !chain.usable || take == 0 {
                break;
            }
            match buffers::slices(&self.mem, &chain.buffers, 0, take, Permissions::Write) {
                Ok(more) if slices.len() + more.len() < MAX_IOVECS => slices.extend(more),
                Ok(_) => break,
                Err(err) => {
                    warn_limited!(
                        "virtio-net: receive chain {}: {err}; dropping a frame",
                        chain.head
                    );
                    chain.usable = false;
                    break;
                }
            }
            // At most MAX_PACKET_LEN in all.
            direct = (direct.0 + 1, direct.1 + take as usize);
        }
        let (chains, in_guest) = direct;
        // The guards keep the slices' pointers valid until the system call is done.
        let guards: Vec<_> = slices.iter().map(|slice| slice.ptr_guard_mut()).collect();
        let mut iovecs: Vec<libc::iovec> = guards
            .iter()
            .zip(&slices)
            .map(|(guard, slice)| libc::iovec {
                iov_base: guard.as_ptr().cast(),
                iov_len: slice.len(),
            })
            .collect();
        let bounce = &mut self.frame[..MAX_PACKET_LEN + 1 - in_guest];
        iovecs.push(libc::iovec {
            iov_base: bounce.as_mut_ptr().cast(),
            iov_len: bounce.len(),
        });
        loop {
            // SAFETY: every iovec points into a live guest-memory slice (writable, its guard
            // held) or the bounce buffer, of the length given; fewer than MAX_IOVECS of them.
            let read = unsafe { libc::readv(fd, iovecs.as_ptr(), iovecs.len() as libc::c_int) };
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
                self.expected_len = len.max(self.expected_len - self.expected_len / 8);
                return Some(Pending {
                    len,
                    in_guest: in_guest.min(len),
                    chains,
                });
            }
            warn_limited!("virtio-net: dropping a {len}-byte frame from the tap");
        }
    }

    /// Takes receive chains until the pending frame fits, writes what of it is in the bounce
    /// buffer into them, and returns the chains it filled to the driver, `num_buffers` in the
    /// header saying how many.
    ///
    /// The chains held for a frame are bounded whatever the driver posts: an unusable chain
    /// costs the frame instead of being held, and a frame that a queue size of chains cannot
    /// hold (more than the ring has, so the driver reused heads, or the frame can never fit)
    /// is dropped.
    fn deliver(&mut self) -> Delivery {
        let Some(Pending {
            len,
            in_guest,
            chains: direct,
        }) = self.pending
        else {
            return Delivery::Delivered;
        };
        let len64 = len as u64;
        let mut rechecked = false;
        loop {
            // The frame may use the chains before the first unusable one; reaching that one
            // costs it the frame.
            let usable = self.reserved.iter().take_while(|c| c.usable).count();
            let capacity: u64 = self.reserved[..usable].iter().map(|c| c.capacity).sum();
            if capacity >= len64 || (!self.mrg_rxbuf && usable > 0) {
                break;
            }
            if usable < self.reserved.len() {
                return self.drop_frame();
            }
            if self.reserved.len() >= usize::from(self.rx.size())
                || self.held_descriptors() >= MAX_HELD_DESCRIPTORS
            {
                warn_limited!(
                    "virtio-net: a {len}-byte frame does not fit {} receive chains \
                     ({capacity} bytes, {} descriptors); dropping it",
                    self.reserved.len(),
                    self.held_descriptors()
                );
                return self.drop_frame();
            }
            let Some(chain) = self.pop_chain() else {
                // The driver notifies once it adds buffers, unless it did so just now.
                if !rechecked && self.rx.enable_notification(&self.mem) {
                    rechecked = true;
                    continue;
                }
                return Delivery::NoBuffers;
            };
            rechecked = false;
            self.reserved.push(chain);
        }

        let capacity: u64 = self.reserved.iter().map(|c| c.capacity).sum();
        if capacity < len64 {
            warn_limited!(
                "virtio-net: a {len}-byte frame does not fit the {capacity}-byte receive chain {}; dropping it",
                self.reserved[0].head
            );
            return self.drop_frame();
        }
        // The chains the frame fills, each up to its capacity; those after it stay held.
        let mut lens = Vec::with_capacity(self.reserved.len());
        let mut left = len64;
        for chain in &self.reserved {
            if left == 0 {
                break;
            }
            let count = chain.capacity.min(left);
            lens.push(count as u32);
            left -= count;
        }
        // At most the queue size (<= 32768) chains.
        let num_buffers = (lens.len() as u16).to_le_bytes();

        let _dma = self.mem.begin_dma();
        let written = if in_guest == 0 {
            self.frame[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&num_buffers);
            Ok(())
        } else {
            // The header went straight into the first chain.
            buffers::write_from(
                &self.mem,
                &self.reserved[0].buffers,
                NUM_BUFFERS_OFFSET as u64,
                &num_buffers,
            )
        }
        .and_then(|()| {
            // The rest, from the bounce buffer, into the chains after those read into.
            let mut offset = 0;
            for (chain, &count) in self.reserved.iter().zip(&lens).skip(direct) {
                let data = &self.frame[offset..offset + count as usize];
                buffers::write_from(&self.mem, &chain.buffers, 0, data).map_err(|err| {
                    warn_limited!(
                        "virtio-net: receive chain {}: {err}; dropping a frame",
                        chain.head
                    );
                    err
                })?;
                offset += count as usize;
            }
            debug_assert_eq!(offset, len - in_guest);
            Ok(())
        });
        if written.is_err() {
            return self.drop_frame();
        }
        let filled: Vec<RxChain> = self.reserved.drain(..lens.len()).collect();
        for (chain, written) in filled.into_iter().zip(lens) {
            self.rx.add_used(&self.mem, chain.head, written);
        }
        self.counters.rx_frames.add(1);
        self.counters.rx_bytes.add((len - VNET_HDR_LEN) as u64);
        self.counters.rx_bounced_bytes.add((len - in_guest) as u64);
        Delivery::Delivered
    }

    /// Descriptors of the receive chains held.
    fn held_descriptors(&self) -> usize {
        self.reserved.iter().map(|c| c.buffers.len()).sum()
    }

    /// Discards the pending frame and returns the chains taken for it unused: those held up to
    /// and including the first unusable one, or all of them.
    fn drop_frame(&mut self) -> Delivery {
        let count = self
            .reserved
            .iter()
            .position(|c| !c.usable)
            .map_or(self.reserved.len(), |i| i + 1);
        for chain in self.reserved.drain(..count).collect::<Vec<_>>() {
            self.rx.add_used(&self.mem, chain.head, 0);
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

    fn transmit(&mut self, poller: &Poller) {
        let mem = &self.mem;
        let fd = self.taps.backend(self.pair).as_raw_fd();
        let counters = &self.counters;
        let served = self.tx.process(mem, |chain| {
            let _dma = mem.begin_dma();
            if let Some(frame_len) = send_chain(mem, fd, chain) {
                counters.tx_frames.add(1);
                counters.tx_bytes.add(frame_len as u64);
            }
            Some(0)
        });
        if served == Served::Budget {
            poller.rearm(self.tx.index());
        }
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
            self.transmit(poller);
            self.update_tap_watch(poller);
        } else if let Some(control) = &mut self.control {
            control.serve(&self.mem, poller);
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
fn send_chain<M: GuestMemory>(mem: &M, fd: RawFd, chain: &Chain) -> Option<usize> {
    let (head, buffers) = (chain.head, &chain.buffers);
    if buffers.iter().any(|b| b.writable) {
        warn_limited!("virtio-net: transmit chain {head} has device-writable buffers; dropping it");
        return None;
    }
    let len = buffers::total_len(buffers);
    if !(MIN_PACKET_LEN as u64..=MAX_PACKET_LEN as u64).contains(&len) {
        warn_limited!(
            "virtio-net: transmit chain {head} holds {len} bytes, not a frame; dropping it"
        );
        return None;
    }
    let slices = match buffers::slices(mem, buffers, 0, len, Permissions::Read) {
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
