//! virtio-console (virtio v1.2 §5.3), single port, no multiport and no size reporting.
//!
//! The transmit queue goes to a host writer (stdout or a log file, as the VMM decides); the
//! receive queue is fed from an optional input fd (stdin when it is a terminal), watched in the
//! same epoll loop as the queues. Input read while the driver has no receive buffers is kept,
//! up to a bound, after which the fd is no longer watched until the driver catches up.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use log::{debug, warn};
use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{GuestMemory, Permissions};

use crate::buffers::{self, Buffer};
use crate::worker::{DeviceQueue, Poller, Worker, WorkerHandler};
use crate::{
    common_features, take_queue, ActivateError, ActivatedQueue, DeviceMemory, VirtioDevice,
    VirtioInterrupt,
};

/// Index of the receive queue (host to guest).
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue (guest to host).
pub const TX_QUEUE: usize = 1;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Input bytes held while the driver has no receive buffers.
const PENDING_MAX: usize = 64 * 1024;
/// Bytes read from the input fd per wake-up.
const INPUT_CHUNK: usize = 4096;
/// Epoll token of the input fd.
const INPUT_TOKEN: u32 = 0;

/// Numbers worker threads `virtio-con-N`.
static NEXT_INSTANCE: AtomicUsize = AtomicUsize::new(0);

/// Where guest output goes; shared with the worker so it survives a reset.
type Output = Arc<Mutex<Box<dyn Write + Send>>>;

/// A virtio-console device over guest memory `M` (plain or behind the IOMMU).
pub struct Console<M> {
    mem: M,
    output: Output,
    input: Option<Arc<File>>,
    features: u64,
    acked_features: u64,
    thread_name: String,
    worker: Option<Worker>,
}

impl<M: DeviceMemory> Console<M> {
    /// A console writing guest output to `output` and, if given, feeding the guest what can be
    /// read from `input` (any readable fd, e.g. a dup of stdin; the VMM sets up the terminal).
    /// `access_platform` is set when `mem` goes through the IOMMU.
    pub fn new(
        mem: M,
        output: Box<dyn Write + Send>,
        input: Option<OwnedFd>,
        access_platform: bool,
    ) -> Self {
        Console {
            mem,
            output: Arc::new(Mutex::new(output)),
            input: input.map(|fd| Arc::new(File::from(fd))),
            features: common_features(access_platform),
            acked_features: 0,
            thread_name: format!(
                "virtio-con-{}",
                NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed)
            ),
            worker: None,
        }
    }
}

impl<M: DeviceMemory> VirtioDevice for Console<M> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features;
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // cols/rows/max_nr_ports/emerg_wr are only meaningful with features not offered here.
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        debug!(
            "virtio-console: ignoring config write of {} bytes at {offset}",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mut queues: Vec<ActivatedQueue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        // A second activation without reset replaces the running worker.
        self.worker = None;
        let rx = take_queue(&mut queues, RX_QUEUE)?;
        let tx = take_queue(&mut queues, TX_QUEUE)?;
        for activated in [&rx, &tx] {
            if !activated.queue.is_valid(&self.mem) {
                warn!(
                    "virtio-console: queue {} is not accessible; it will not work",
                    activated.index
                );
            }
        }
        let event_idx = self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let handler = ConsoleWorker {
            mem: self.mem.clone(),
            rx: DeviceQueue::new(RX_QUEUE, rx.queue, event_idx, Arc::clone(&interrupt)),
            tx: DeviceQueue::new(TX_QUEUE, tx.queue, event_idx, interrupt),
            output: Arc::clone(&self.output),
            input: self.input.clone(),
            input_watched: false,
            pending: VecDeque::new(),
        };
        let worker = Worker::spawn(
            self.thread_name.clone(),
            vec![(RX_QUEUE, rx.notifier), (TX_QUEUE, tx.notifier)],
            handler,
        )
        .map_err(ActivateError::Io)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        // Dropping the worker stops and joins its thread, which also drops the queues and any
        // input not yet delivered.
        self.worker = None;
        self.acked_features = 0;
    }
}

struct ConsoleWorker<M> {
    mem: M,
    rx: DeviceQueue,
    tx: DeviceQueue,
    output: Output,
    /// Dropped at end of input or on a read error, so a dead fd cannot spin the loop.
    input: Option<Arc<File>>,
    input_watched: bool,
    /// Input read but not yet delivered, oldest first.
    pending: VecDeque<u8>,
}

impl<M: DeviceMemory> ConsoleWorker<M> {
    /// Watches the input fd only while there is room to keep what it yields; level-triggered
    /// epoll would otherwise wake the worker in a loop while the guest is not reading.
    fn update_input_watch(&mut self, poller: &Poller) {
        let want = self.input.is_some() && self.pending.len() < PENDING_MAX;
        if want == self.input_watched {
            return;
        }
        // `stop_input` clears `input_watched` with `input`, so `want` differs only with an fd.
        let Some(input) = &self.input else {
            return;
        };
        let fd = input.as_raw_fd();
        let result = if want {
            poller.add(fd, INPUT_TOKEN)
        } else {
            poller.remove(fd)
        };
        match result {
            Ok(()) => self.input_watched = want,
            Err(err) => {
                warn!("virtio-console: cannot (un)watch the input: {err}; input disabled");
                self.stop_input(poller);
            }
        }
    }

    fn stop_input(&mut self, poller: &Poller) {
        if let Some(input) = self.input.take() {
            if self.input_watched {
                // The device keeps its own clone of the fd open, so it must leave the set.
                if let Err(err) = poller.remove(input.as_raw_fd()) {
                    warn!("virtio-console: cannot unwatch the input: {err}");
                }
            }
        }
        self.input_watched = false;
    }

    fn read_input(&mut self, poller: &Poller) {
        let Some(input) = &self.input else {
            return;
        };
        let mut chunk = [0u8; INPUT_CHUNK];
        let room = (PENDING_MAX - self.pending.len()).min(INPUT_CHUNK);
        match (&**input).read(&mut chunk[..room]) {
            Ok(0) => {
                debug!("virtio-console: end of input");
                self.stop_input(poller);
            }
            Ok(read) => self.pending.extend(&chunk[..read]),
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(err) => {
                warn!("virtio-console: cannot read input: {err}; input disabled");
                self.stop_input(poller);
            }
        }
    }

    /// Moves pending input into the driver's receive buffers, as far as there are buffers.
    fn deliver_input(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mem = &self.mem;
        let pending = &mut self.pending;
        self.rx.process(mem, |chain| {
            if pending.is_empty() {
                return None;
            }
            Some(fill_rx_chain(mem, chain, pending))
        });
    }

    fn drain_output(&mut self) {
        let mem = &self.mem;
        let mut output = self.output.lock().unwrap_or_else(PoisonError::into_inner);
        self.tx.process(mem, |chain| {
            write_tx_chain(mem, chain, &mut **output);
            Some(0)
        });
        if let Err(err) = output.flush() {
            warn!("virtio-console: cannot flush output: {err}");
        }
    }
}

impl<M: DeviceMemory> WorkerHandler for ConsoleWorker<M> {
    fn start(&mut self, poller: &Poller) -> io::Result<()> {
        self.update_input_watch(poller);
        Ok(())
    }

    fn queue_notified(&mut self, index: usize, poller: &Poller) {
        match index {
            RX_QUEUE => {
                self.deliver_input();
                self.update_input_watch(poller);
            }
            _ => self.drain_output(),
        }
    }

    fn fd_ready(&mut self, _token: u32, poller: &Poller) {
        self.read_input(poller);
        self.deliver_input();
        self.update_input_watch(poller);
    }
}

/// Copies as much of `pending` as fits into the chain's device-writable buffers; returns the
/// number of bytes delivered. Input stays pending if the buffers cannot be accessed.
fn fill_rx_chain<M: GuestMemory>(
    mem: &M,
    chain: DescriptorChain<&M>,
    pending: &mut VecDeque<u8>,
) -> u32 {
    let head = chain.head_index();
    let writable: Vec<Buffer> = buffers::collect(chain)
        .into_iter()
        .filter(|b| b.writable)
        .collect();
    let capacity = usize::try_from(buffers::total_len(&writable)).unwrap_or(usize::MAX);
    let len = pending.len().min(capacity);
    let data = &pending.make_contiguous()[..len];
    if let Err(err) = buffers::write_from(mem, &writable, 0, data) {
        warn!("virtio-console: receive buffer {head}: {err}");
        return 0;
    }
    pending.drain(..len);
    // At most PENDING_MAX.
    len as u32
}

/// Writes the chain's device-readable buffers to `output`. Guest output that cannot be read or
/// written is dropped with a warning: the console must not stall the guest.
fn write_tx_chain<M: GuestMemory>(mem: &M, chain: DescriptorChain<&M>, output: &mut dyn Write) {
    let head = chain.head_index();
    let readable: Vec<Buffer> = buffers::collect(chain)
        .into_iter()
        .filter(|b| !b.writable)
        .collect();
    let len = buffers::total_len(&readable);
    let slices = match buffers::slices(mem, &readable, 0, len, Permissions::Read) {
        Ok(slices) => slices,
        Err(err) => {
            warn!("virtio-console: transmit buffer {head}: {err}");
            return;
        }
    };
    let mut chunk = [0u8; 4096];
    for slice in slices {
        let mut offset = 0;
        while offset < slice.len() {
            let part = match slice.subslice(offset, (slice.len() - offset).min(chunk.len())) {
                Ok(part) => part,
                Err(err) => {
                    warn!("virtio-console: transmit buffer {head}: {err}");
                    return;
                }
            };
            let copied = part.copy_to(&mut chunk[..]);
            if let Err(err) = output.write_all(&chunk[..copied]) {
                warn!("virtio-console: cannot write output: {err}");
                return;
            }
            offset += copied;
        }
    }
}
