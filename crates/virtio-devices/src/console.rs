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
use std::sync::{Arc, Mutex, PoisonError};

use log::{debug, warn};
use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_queue::QueueT;
use vm_device::warn_limited;
use vm_memory::Permissions;

use crate::buffers::{self, Buffer, Chain};
use crate::device_queue::{DeviceQueue, Served};
use crate::worker::{DeviceThread, DeviceWorker, Poller, WorkerHandler};
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
/// Guest output is copied out of guest memory this much at a time.
const OUTPUT_CHUNK: usize = 4096;

/// Where guest output goes; shared with the worker so it survives a reset.
type Output = Arc<Mutex<Box<dyn Write + Send>>>;

/// A virtio-console device over guest memory `M` (plain or behind the IOMMU).
pub struct Console<M> {
    mem: M,
    output: Output,
    input: Option<Arc<File>>,
    core: DeviceWorker,
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
            core: DeviceWorker::new(DeviceThread::Console, common_features(access_platform)),
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
        self.core.features()
    }

    fn ack_features(&mut self, features: u64) {
        self.core.ack_features(features);
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
        let rx = take_queue(&mut queues, RX_QUEUE)?;
        let tx = take_queue(&mut queues, TX_QUEUE)?;
        for activated in [&rx, &tx] {
            if !activated.queue.is_valid(&self.mem) {
                warn_limited!(
                    "virtio-console: queue {} is not accessible; it will not work",
                    activated.index
                );
            }
        }
        let features = self.core.acked_features();
        let handler = ConsoleWorker {
            mem: self.mem.clone(),
            rx: DeviceQueue::new(RX_QUEUE, rx.queue, features, Arc::clone(&interrupt)),
            tx: DeviceQueue::new(TX_QUEUE, tx.queue, features, interrupt),
            output: Arc::clone(&self.output),
            input: self.input.clone(),
            input_watched: false,
            pending: VecDeque::new(),
        };
        self.core.start(
            vec![(RX_QUEUE, rx.notifier), (TX_QUEUE, tx.notifier)],
            handler,
        )
    }

    fn reset(&mut self) {
        // Dropping the worker stops and joins its thread, which also drops the queues and any
        // input not yet delivered.
        self.core.reset();
    }
}

#[cfg(feature = "fuzzing")]
impl<M: DeviceMemory> Console<M> {
    /// Serves one notification of the transmit queue, then delivers `input` as if just read
    /// from the input fd, as the worker would, on the calling thread (see
    /// [`crate::fuzzing::console`]). Returns how many input bytes are still pending.
    pub(crate) fn serve_for_fuzzing(
        &self,
        rx: virtio_queue::Queue,
        tx: virtio_queue::Queue,
        input: &[u8],
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> usize {
        let features = self.core.acked_features();
        let mut worker = ConsoleWorker {
            mem: self.mem.clone(),
            rx: DeviceQueue::new(RX_QUEUE, rx, features, Arc::clone(&interrupt)),
            tx: DeviceQueue::new(TX_QUEUE, tx, features, interrupt),
            output: Arc::clone(&self.output),
            input: None,
            input_watched: false,
            pending: input[..input.len().min(PENDING_MAX)]
                .iter()
                .copied()
                .collect(),
        };
        let Ok(epoll) = vmm_sys_util::epoll::Epoll::new() else {
            return worker.pending.len();
        };
        let poller = Poller::new(&epoll);
        worker.drain_output(&poller);
        worker.deliver_input(&poller);
        worker.pending.len()
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
    fn deliver_input(&mut self, poller: &Poller) {
        if self.pending.is_empty() {
            return;
        }
        let mem = &self.mem;
        let pending = &mut self.pending;
        let served = self.rx.process(mem, |chain| {
            if pending.is_empty() {
                return None;
            }
            Some(fill_rx_chain(mem, chain, pending))
        });
        if served == Served::Budget {
            poller.rearm(RX_QUEUE);
        }
    }

    fn drain_output(&mut self, poller: &Poller) {
        let mem = &self.mem;
        let mut output = self.output.lock().unwrap_or_else(PoisonError::into_inner);
        let served = self.tx.process(mem, |chain| {
            write_tx_chain(mem, chain, &mut **output);
            Some(0)
        });
        if let Err(err) = output.flush() {
            warn_limited!("virtio-console: cannot flush output: {err}");
        }
        if served == Served::Budget {
            poller.rearm(TX_QUEUE);
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
                self.deliver_input(poller);
                self.update_input_watch(poller);
            }
            _ => self.drain_output(poller),
        }
    }

    fn fd_ready(&mut self, _token: u32, poller: &Poller) {
        self.read_input(poller);
        self.deliver_input(poller);
        self.update_input_watch(poller);
    }
}

/// Copies as much of `pending` as fits into the chain's device-writable buffers; returns the
/// number of bytes delivered. Input stays pending if the buffers cannot be accessed.
fn fill_rx_chain<M: DeviceMemory>(mem: &M, chain: &Chain, pending: &mut VecDeque<u8>) -> u32 {
    let writable: Vec<Buffer> = chain
        .buffers
        .iter()
        .copied()
        .filter(|b| b.writable)
        .collect();
    let capacity = usize::try_from(buffers::total_len(&writable)).unwrap_or(usize::MAX);
    let len = pending.len().min(capacity);
    let data = &pending.make_contiguous()[..len];
    let _dma = mem.begin_dma();
    if let Err(err) = buffers::write_from(mem, &writable, 0, data) {
        warn_limited!("virtio-console: receive buffer {}: {err}", chain.head);
        return 0;
    }
    pending.drain(..len);
    // At most PENDING_MAX.
    len as u32
}

/// Writes the chain's device-readable buffers to `output`, a chunk at a time: each chunk is
/// copied out of guest memory inside a transfer of its own and written after it ended, so an
/// output that blocks (a terminal nobody reads) holds up no UNMAP. Guest output that cannot
/// be read or written is dropped with a warning: the console must not stall the guest.
fn write_tx_chain<M: DeviceMemory>(mem: &M, chain: &Chain, output: &mut dyn Write) {
    let readable: Vec<Buffer> = chain
        .buffers
        .iter()
        .copied()
        .filter(|b| !b.writable)
        .collect();
    let len = buffers::total_len(&readable);
    // A chain whose buffers are not all readable is dropped whole, not cut short.
    let reachable = {
        let _dma = mem.begin_dma();
        buffers::slices(mem, &readable, 0, len, Permissions::Read).map(|_| ())
    };
    if let Err(err) = reachable {
        warn_limited!("virtio-console: transmit buffer {}: {err}", chain.head);
        return;
    }
    let mut chunk = [0u8; OUTPUT_CHUNK];
    let mut offset = 0;
    while offset < len {
        let count = (len - offset).min(OUTPUT_CHUNK as u64) as usize;
        let copied = {
            let _dma = mem.begin_dma();
            buffers::read_into(mem, &readable, offset, &mut chunk[..count])
        };
        if let Err(err) = copied {
            warn_limited!("virtio-console: transmit buffer {}: {err}", chain.head);
            return;
        }
        if let Err(err) = output.write_all(&chunk[..count]) {
            warn_limited!("virtio-console: cannot write output: {err}");
            return;
        }
        offset += count as u64;
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;
    use std::thread;
    use std::time::Duration;

    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;
    use crate::test_utils::{
        eventually, guest_memory, iommu_memory, ro, wo, Driver, FakeInterrupt,
    };

    const RX_BASE: u64 = 0;
    const TX_BASE: u64 = 0x8000;
    const BUF: u64 = 0x2_0000;

    /// Output captured for inspection.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Captured {
        fn bytes(&self) -> Vec<u8> {
            self.0.lock().unwrap().clone()
        }
    }

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    #[test]
    fn transmit_writes_every_readable_buffer_in_order() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, TX_BASE, QUEUE_SIZE);
        mem.write_slice(b"hello ", GuestAddress(BUF)).unwrap();
        mem.write_slice(b"world", GuestAddress(BUF + 0x100))
            .unwrap();
        let mut out = Vec::new();

        let chain = driver.chain(&[ro(BUF, 6), wo(BUF + 0x200, 8), ro(BUF + 0x100, 5)]);
        write_tx_chain(&mem, &chain, &mut out);
        assert_eq!(out, b"hello world");

        // A buffer beyond guest RAM drops the whole chain, and nothing panics.
        let chain = driver.chain(&[ro(BUF, 6), ro(0x20_0000, 16)]);
        write_tx_chain(&mem, &chain, &mut out);
        assert_eq!(out, b"hello world");
    }

    #[test]
    fn receive_fills_buffers_and_keeps_the_rest_pending() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, RX_BASE, QUEUE_SIZE);
        let mut pending: VecDeque<u8> = b"abcdefgh".iter().copied().collect();

        let chain = driver.chain(&[wo(BUF, 3), wo(BUF + 0x100, 2)]);
        assert_eq!(fill_rx_chain(&mem, &chain, &mut pending), 5);
        assert_eq!(read(&mem, BUF, 3), b"abc");
        assert_eq!(read(&mem, BUF + 0x100, 2), b"de");

        // An inaccessible buffer takes nothing from the pending input.
        let chain = driver.chain(&[wo(0x20_0000, 16)]);
        assert_eq!(fill_rx_chain(&mem, &chain, &mut pending), 0);
        assert_eq!(pending.iter().copied().collect::<Vec<_>>(), b"fgh");

        let chain = driver.chain(&[wo(BUF, 64)]);
        assert_eq!(fill_rx_chain(&mem, &chain, &mut pending), 3);
        assert_eq!(read(&mem, BUF, 3), b"fgh");
        assert!(pending.is_empty());
    }

    #[test]
    fn transmit_through_the_iommu() {
        let mem = iommu_memory();
        mem.iommu()
            .map(0x1000_0000, BUF, 0x1000, vm_memory::Permissions::Read);
        mem.get_backend()
            .write_slice(b"dma", GuestAddress(BUF))
            .unwrap();
        let mut driver = Driver::new(&mem, TX_BASE, QUEUE_SIZE);
        let mut out = Vec::new();

        let chain = driver.chain(&[ro(0x1000_0000, 3)]);
        write_tx_chain(&mem, &chain, &mut out);
        assert_eq!(out, b"dma");

        // The guest-physical address is not an I/O address for this device.
        let chain = driver.chain(&[ro(BUF, 3)]);
        write_tx_chain(&mem, &chain, &mut out);
        assert_eq!(out, b"dma");
    }

    struct Running {
        dev: Console<GuestMemoryMmap>,
        rx_notifier: EventFd,
        tx_notifier: EventFd,
        interrupt: Arc<FakeInterrupt>,
        output: Captured,
    }

    fn start(
        mem: &GuestMemoryMmap,
        rx: &Driver<GuestMemoryMmap>,
        tx: &Driver<GuestMemoryMmap>,
        input: Option<OwnedFd>,
    ) -> Running {
        let output = Captured::default();
        let mut dev = Console::new(mem.clone(), Box::new(output.clone()), input, false);
        assert_eq!(dev.device_type(), VIRTIO_ID_CONSOLE);
        assert_eq!(dev.queue_max_sizes().len(), 2);
        let rx_notifier = EventFd::new(EFD_NONBLOCK).unwrap();
        let tx_notifier = EventFd::new(EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(FakeInterrupt::default());
        dev.ack_features(dev.features());
        dev.activate(
            vec![
                ActivatedQueue {
                    index: TX_QUEUE,
                    queue: tx.queue(),
                    notifier: tx_notifier.try_clone().unwrap(),
                },
                ActivatedQueue {
                    index: RX_QUEUE,
                    queue: rx.queue(),
                    notifier: rx_notifier.try_clone().unwrap(),
                },
            ],
            interrupt.clone(),
        )
        .unwrap();
        Running {
            dev,
            rx_notifier,
            tx_notifier,
            interrupt,
            output,
        }
    }

    #[test]
    fn worker_delivers_input_and_writes_output_until_reset() {
        let mem = guest_memory();
        let mut rx = Driver::new(&mem, RX_BASE, QUEUE_SIZE);
        let mut tx = Driver::new(&mem, TX_BASE, QUEUE_SIZE);
        let (mut host, guest) = UnixStream::pair().unwrap();
        let mut running = start(&mem, &rx, &tx, Some(OwnedFd::from(guest)));

        // Typed before the guest posted a receive buffer: held until one arrives.
        host.write_all(b"ping").unwrap();
        thread::sleep(Duration::from_millis(50));
        let head = rx.add(&[wo(BUF, 64)]);
        running.rx_notifier.write(1).unwrap();
        assert!(running.interrupt.wait_for(RX_QUEUE, 1));
        assert_eq!(rx.used(), vec![(u32::from(head), 4)]);
        assert_eq!(read(&mem, BUF, 4), b"ping");

        // With a buffer already posted, input goes straight through. Like a real driver with
        // EVENT_IDX, ask for an interrupt once the used index moves past what was seen.
        rx.set_used_event(1);
        let head = rx.add(&[wo(BUF + 0x100, 64)]);
        running.rx_notifier.write(1).unwrap();
        host.write_all(b"pong").unwrap();
        assert!(running.interrupt.wait_for(RX_QUEUE, 2));
        assert_eq!(rx.used()[1], (u32::from(head), 4));
        assert_eq!(read(&mem, BUF + 0x100, 4), b"pong");

        // End of input does not stop the console.
        drop(host);
        mem.write_slice(b"hello", GuestAddress(BUF + 0x200))
            .unwrap();
        let head = tx.add(&[ro(BUF + 0x200, 5)]);
        running.tx_notifier.write(1).unwrap();
        assert!(running.interrupt.wait_for(TX_QUEUE, 1));
        assert_eq!(tx.used(), vec![(u32::from(head), 0)]);
        assert_eq!(running.output.bytes(), b"hello");

        running.dev.reset();
        tx.add(&[ro(BUF + 0x200, 5)]);
        running.tx_notifier.write(1).unwrap();
        thread::sleep(Duration::from_millis(100));
        assert_eq!(tx.used().len(), 1);
        assert_eq!(running.output.bytes(), b"hello");
    }

    #[test]
    fn input_beyond_the_pending_bound_waits_for_the_guest() {
        let mem = guest_memory();
        let mut rx = Driver::new(&mem, RX_BASE, QUEUE_SIZE);
        let tx = Driver::new(&mem, TX_BASE, QUEUE_SIZE);
        let (mut host, guest) = UnixStream::pair().unwrap();
        let running = start(&mem, &rx, &tx, Some(OwnedFd::from(guest)));

        let total = PENDING_MAX + 5000;
        let input: Vec<u8> = (0..total).map(|i| (i % 253) as u8).collect();
        let writer = {
            let input = input.clone();
            thread::spawn(move || host.write_all(&input).unwrap())
        };
        // Let the worker fill its pending buffer and stop reading.
        thread::sleep(Duration::from_millis(200));
        // Each read of the input fills its own buffer, so post more than the minimum.
        const BUFFERS: u64 = 6;
        for i in 0..BUFFERS {
            rx.add(&[wo(BUF + i * 0x8000, 0x8000)]);
        }
        running.rx_notifier.write(1).unwrap();
        assert!(eventually(|| {
            rx.used()
                .iter()
                .map(|&(_, len)| len as usize)
                .sum::<usize>()
                == total
        }));
        writer.join().unwrap();
        let mut received = Vec::new();
        for (i, (head, len)) in rx.used().into_iter().enumerate() {
            assert_eq!(head as usize, i);
            received.extend(read(&mem, BUF + i as u64 * 0x8000, len as usize));
        }
        assert_eq!(received, input);
    }

    #[test]
    fn activation_needs_both_queues() {
        let mem = guest_memory();
        let rx = Driver::new(&mem, RX_BASE, QUEUE_SIZE);
        let mut dev = Console::new(mem.clone(), Box::new(io::sink()), None, false);
        let err = dev
            .activate(
                vec![ActivatedQueue {
                    index: RX_QUEUE,
                    queue: rx.queue(),
                    notifier: EventFd::new(EFD_NONBLOCK).unwrap(),
                }],
                Arc::new(FakeInterrupt::default()),
            )
            .unwrap_err();
        assert!(matches!(err, ActivateError::MissingQueue(TX_QUEUE)));
    }
}
