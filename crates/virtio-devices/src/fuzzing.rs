//! Entry points for the fuzz targets in `fuzz/` (cargo feature `fuzzing`, off by default).
//!
//! For fuzzing only, not an API: each runs one guest-facing path of a device the way its
//! worker thread would, but synchronously on the caller's thread, over queues the caller laid
//! out in guest memory, so that a fuzz input maps to one deterministic run.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::buffers::{self, Buffer};
use crate::device_queue::{DeviceQueue, Served};
use crate::{
    Block, BlockError, BlockOptions, Console, Net, NetBackend, NetOptions, Rng, RngError,
    VirtioDevice,
};

/// Counts what a device raised, so a target can check it.
#[derive(Debug, Default)]
pub struct Interrupts {
    queue: AtomicUsize,
    needs_reset: AtomicUsize,
}

impl Interrupts {
    /// Used-buffer interrupts, all queues together.
    pub fn queue(&self) -> usize {
        self.queue.load(Ordering::Relaxed)
    }

    /// DEVICE_NEEDS_RESET reports.
    pub fn needs_reset(&self) -> usize {
        self.needs_reset.load(Ordering::Relaxed)
    }
}

impl crate::VirtioInterrupt for Interrupts {
    fn notify_queue(&self, _queue_index: usize) -> io::Result<()> {
        self.queue.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn notify_config(&self) -> io::Result<()> {
        Ok(())
    }

    fn needs_reset(&self) -> io::Result<()> {
        self.needs_reset.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// A virtio-blk disk over `image` with `features` accepted serves `queue` (ready, in `mem`)
/// until every chain made available is complete.
pub fn block(
    mem: &GuestMemoryMmap,
    image: File,
    readonly: bool,
    features: u64,
    queue: Queue,
    interrupts: Arc<Interrupts>,
) -> Result<(), BlockError> {
    let options = BlockOptions {
        readonly,
        queue_size: queue.size(),
        ..BlockOptions::default()
    };
    let mut dev = Block::new(mem.clone(), image, options)?;
    dev.ack_features(features);
    dev.serve_for_fuzzing(queue, interrupts);
    Ok(())
}

/// A virtio-net device on `backend` with `features` accepted serves one notification of the
/// transmit queue `tx`, then of the receive queue `rx` (frames waiting in the backend).
pub fn net<B: NetBackend>(
    mem: &GuestMemoryMmap,
    backend: B,
    features: u64,
    rx: Queue,
    tx: Queue,
    interrupts: Arc<Interrupts>,
) -> io::Result<()> {
    let options = NetOptions {
        mac: net_util::MacAddr::new([0x52, 0x54, 0, 0, 0, 1]),
        queue_size: rx.size().max(tx.size()),
        access_platform: false,
    };
    let mut dev = Net::new(mem.clone(), vec![backend], options);
    dev.ack_features(features);
    dev.serve_for_fuzzing(rx, tx, interrupts)
}

/// A virtio-console writing to `output`, with `features` accepted, serves one notification
/// of the transmit queue `tx`, then delivers `input` (as if typed) into the receive queue
/// `rx`. Returns how many input bytes found no receive buffer.
pub fn console(
    mem: &GuestMemoryMmap,
    output: Box<dyn Write + Send>,
    features: u64,
    rx: Queue,
    tx: Queue,
    input: &[u8],
    interrupts: Arc<Interrupts>,
) -> usize {
    let mut dev = Console::new(mem.clone(), output, None, false);
    dev.ack_features(features);
    dev.serve_for_fuzzing(rx, tx, input, interrupts)
}

/// A virtio-rng reading `source`, with `features` accepted, serves one notification of
/// `queue`. Returns the bytes its counters say reached the guest.
pub fn rng(
    mem: &GuestMemoryMmap,
    source: &Path,
    features: u64,
    queue: Queue,
    interrupts: Arc<Interrupts>,
) -> Result<u64, RngError> {
    let mut dev = Rng::new(mem.clone(), source, false)?;
    dev.ack_features(features);
    dev.serve_for_fuzzing(queue, interrupts);
    let counted = dev
        .counters()
        .map_or(0, |c| c.read().iter().map(|&(_, n)| n).sum());
    Ok(counted)
}

/// A queue as every worker-backed device serves it ([`DeviceQueue`]).
pub struct ChainQueue {
    queue: DeviceQueue,
}

impl ChainQueue {
    /// Wraps `queue` as a device does on activation.
    pub fn new(queue: Queue, features: u64, interrupts: Arc<Interrupts>) -> Self {
        ChainQueue {
            queue: DeviceQueue::new(0, queue, features, interrupts),
        }
    }

    /// One [`DeviceQueue::process`] call: `handle` gets each chain as a device sees it and
    /// returns the used length, or `None` to leave the chain in the ring and stop.
    /// Returns whether it stopped at its budget (a queue's worth of chains) with more
    /// available.
    pub fn process(
        &mut self,
        mem: &GuestMemoryMmap,
        mut handle: impl FnMut(&Chain<'_>) -> Option<u32>,
    ) -> bool {
        let served = self.queue.process(mem, |chain| {
            handle(&Chain {
                mem,
                head: chain.head,
                buffers: chain.buffers.clone(),
            })
        });
        served == Served::Budget
    }
}

/// A popped chain: its descriptors and the device's accessors over them.
pub struct Chain<'a> {
    mem: &'a GuestMemoryMmap,
    head: u16,
    buffers: Vec<Buffer>,
}

impl Chain<'_> {
    /// The head index, as returned in the used ring.
    pub fn head(&self) -> u16 {
        self.head
    }

    /// The descriptors, in chain order, as (address, length, device-writable).
    pub fn buffers(&self) -> Vec<(u64, u32, bool)> {
        self.buffers
            .iter()
            .map(|b| (b.addr.0, b.len, b.writable))
            .collect()
    }

    fn part(&self, writable: bool) -> Vec<Buffer> {
        self.buffers
            .iter()
            .filter(|b| b.writable == writable)
            .copied()
            .collect()
    }

    /// [`buffers::read_into`] over the device-readable descriptors; whether it succeeded.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> bool {
        buffers::read_into(self.mem, &self.part(false), offset, buf).is_ok()
    }

    /// [`buffers::write_from`] over the device-writable descriptors; whether it succeeded.
    pub fn write(&self, offset: u64, data: &[u8]) -> bool {
        buffers::write_from(self.mem, &self.part(true), offset, data).is_ok()
    }
}
