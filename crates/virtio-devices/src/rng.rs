//! virtio-rng, the entropy device (virtio v1.2 §5.4).
//!
//! One request queue whose device-writable buffers are filled from a host source, by default
//! `/dev/urandom`. Each request is capped so that a slow source (`/dev/random` on old kernels)
//! or a huge buffer cannot keep the worker busy indefinitely: the driver just asks again.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::debug;
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::QueueT;
use vm_device::warn_limited;
use vm_memory::{GuestMemory, Permissions, ReadVolatile, VolatileMemoryError};

use crate::buffers::{self, Buffer, Chain};
use crate::counters::RngCounters;
use crate::device_queue::{DeviceQueue, Served};
use crate::worker::{DeviceThread, DeviceWorker, Poller, WorkerHandler};
use crate::{
    common_features, take_queue, ActivateError, ActivatedQueue, DeviceCounters, DeviceMemory,
    VirtioDevice, VirtioInterrupt,
};

/// The entropy source used unless the VMM is told otherwise.
pub const DEFAULT_SOURCE: &str = "/dev/urandom";
/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes delivered per request.
pub const MAX_REQUEST_BYTES: u64 = 64 * 1024;

/// Why an entropy device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// The entropy source could not be opened.
    #[error("cannot open entropy source {}: {source}", path.display())]
    Open {
        /// The source path given.
        path: PathBuf,
        /// What `open` said.
        source: io::Error,
    },
}

/// A virtio-rng device over guest memory `M` (plain or behind the IOMMU).
pub struct Rng<M> {
    mem: M,
    source: Arc<File>,
    core: DeviceWorker,
    counters: Arc<RngCounters>,
}

impl<M: DeviceMemory> Rng<M> {
    /// An entropy device reading from `source` (e.g. [`DEFAULT_SOURCE`]); `access_platform` is
    /// set when `mem` goes through the IOMMU.
    pub fn new(mem: M, source: &Path, access_platform: bool) -> Result<Self, RngError> {
        let file = File::open(source).map_err(|err| RngError::Open {
            path: source.to_owned(),
            source: err,
        })?;
        Ok(Rng {
            mem,
            source: Arc::new(file),
            core: DeviceWorker::new(DeviceThread::Rng, common_features(access_platform)),
            counters: Arc::default(),
        })
    }
}

impl<M: DeviceMemory> VirtioDevice for Rng<M> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.core.features()
    }

    fn ack_features(&mut self, features: u64) {
        self.core.ack_features(features);
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // The entropy device has no configuration space.
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        debug!(
            "virtio-rng: ignoring config write of {} bytes at {offset}",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mut queues: Vec<ActivatedQueue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let activated = take_queue(&mut queues, 0)?;
        if !activated.queue.is_valid(&self.mem) {
            warn_limited!("virtio-rng: queue 0 is not accessible; requests will fail");
        }
        let features = self.core.acked_features();
        let handler = RngWorker {
            mem: self.mem.clone(),
            source: Arc::clone(&self.source),
            queue: DeviceQueue::new(0, activated.queue, features, interrupt),
            counters: Arc::clone(&self.counters),
        };
        self.core.start(vec![(0, activated.notifier)], handler)
    }

    fn counters(&self) -> Option<Arc<dyn DeviceCounters>> {
        Some(self.counters.clone())
    }

    fn reset(&mut self) {
        self.core.reset();
    }
}

struct RngWorker<M> {
    mem: M,
    source: Arc<File>,
    queue: DeviceQueue,
    counters: Arc<RngCounters>,
}

#[cfg(feature = "fuzzing")]
impl<M: DeviceMemory> Rng<M> {
    /// Serves one notification of the request queue as the worker would, on the calling
    /// thread (see [`crate::fuzzing::rng`]).
    pub(crate) fn serve_for_fuzzing(
        &self,
        queue: virtio_queue::Queue,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) {
        let features = self.core.acked_features();
        RngWorker {
            mem: self.mem.clone(),
            source: Arc::clone(&self.source),
            queue: DeviceQueue::new(0, queue, features, interrupt),
            counters: Arc::clone(&self.counters),
        }
        .serve_all();
    }
}

impl<M: DeviceMemory> RngWorker<M> {
    /// Fills the requests the driver made available, a queue's worth at a time.
    fn serve(&mut self) -> Served {
        let source = &*self.source;
        let mem = &self.mem;
        let counters = &self.counters;
        self.queue.process(mem, |chain| {
            let _dma = mem.begin_dma();
            let delivered = fill_chain(source, mem, chain);
            counters.bytes.add(u64::from(delivered));
            Some(delivered)
        })
    }
}

#[cfg(feature = "fuzzing")]
impl<M: DeviceMemory> RngWorker<M> {
    /// Serves until the driver's requests are all filled.
    fn serve_all(&mut self) {
        while self.serve() == Served::Budget {}
    }
}

impl<M: DeviceMemory> WorkerHandler for RngWorker<M> {
    fn queue_notified(&mut self, index: usize, poller: &Poller) {
        if self.serve() == Served::Budget {
            poller.rearm(index);
        }
    }
}

/// Fills the chain's device-writable buffers (up to [`MAX_REQUEST_BYTES`]) from `source`;
/// returns how many bytes were delivered. Device-readable buffers carry nothing for this device
/// and are skipped.
fn fill_chain<M: GuestMemory>(source: &File, mem: &M, chain: &Chain) -> u32 {
    let head = chain.head;
    let writable: Vec<Buffer> = chain
        .buffers
        .iter()
        .copied()
        .filter(|b| b.writable)
        .collect();
    let len = buffers::total_len(&writable).min(MAX_REQUEST_BYTES);
    let slices = match buffers::slices(mem, &writable, 0, len, Permissions::Write) {
        Ok(slices) => slices,
        Err(err) => {
            warn_limited!("virtio-rng: request {head}: {err}");
            return 0;
        }
    };

    let mut source = source;
    let mut delivered = 0usize;
    for slice in slices {
        let mut filled = 0;
        while filled < slice.len() {
            let mut rest = match slice.offset(filled) {
                Ok(rest) => rest,
                Err(err) => {
                    warn_limited!("virtio-rng: request {head}: {err}");
                    return delivered as u32;
                }
            };
            match source.read_volatile(&mut rest) {
                Ok(0) => {
                    warn_limited!("virtio-rng: entropy source is exhausted");
                    return (delivered + filled) as u32;
                }
                Ok(read) => filled += read,
                Err(VolatileMemoryError::IOError(err))
                    if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => {
                    warn_limited!("virtio-rng: cannot read the entropy source: {err}");
                    return (delivered + filled) as u32;
                }
            }
        }
        delivered += filled;
    }
    // At most MAX_REQUEST_BYTES.
    delivered as u32
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::tempfile::TempFile;

    use super::*;
    use crate::test_utils::{guest_memory, iommu_memory, ro, wo, Driver};

    const BUF: u64 = 0x2_0000;

    /// A source file of 256 KiB whose byte `i` is `i % 251`.
    fn source() -> TempFile {
        let temp = TempFile::new().unwrap();
        let bytes: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
        temp.as_file().write_all_at(&bytes, 0).unwrap();
        temp
    }

    fn expected(offset: usize, len: usize) -> Vec<u8> {
        (offset..offset + len).map(|i| (i % 251) as u8).collect()
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    #[test]
    fn fills_writable_buffers_and_skips_readable_ones() {
        let mem = guest_memory();
        let temp = source();
        let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);
        mem.write_slice(&[0xee; 16], GuestAddress(BUF + 0x1000))
            .unwrap();

        let chain = driver.chain(&[wo(BUF, 100), ro(BUF + 0x1000, 16), wo(BUF + 100, 50)]);
        assert_eq!(fill_chain(temp.as_file(), &mem, &chain), 150);
        assert_eq!(read(&mem, BUF, 150), expected(0, 150));
        assert_eq!(read(&mem, BUF + 0x1000, 16), vec![0xee; 16]);
    }

    #[test]
    fn requests_are_capped() {
        let mem = guest_memory();
        let temp = source();
        let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);
        let cap = MAX_REQUEST_BYTES as usize;
        mem.write_slice(&[0xee; 16], GuestAddress(BUF + cap as u64))
            .unwrap();

        let chain = driver.chain(&[wo(BUF, 2 * cap as u32)]);
        assert_eq!(fill_chain(temp.as_file(), &mem, &chain), cap as u32);
        assert_eq!(read(&mem, BUF, cap), expected(0, cap));
        assert_eq!(read(&mem, BUF + cap as u64, 16), vec![0xee; 16]);
    }

    #[test]
    fn inaccessible_buffers_deliver_nothing() {
        let mem = iommu_memory();
        let temp = source();
        let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);
        mem.iommu()
            .map(0x1000_0000, BUF, 0x1000, Permissions::Write);
        mem.get_backend()
            .write_slice(&[0xee; 64], GuestAddress(BUF))
            .unwrap();

        // The second buffer is not mapped: the first must not be filled either.
        let chain = driver.chain(&[wo(0x1000_0000, 64), wo(0x3000_0000, 64)]);
        assert_eq!(fill_chain(temp.as_file(), &mem, &chain), 0);
        assert_eq!(read(mem.get_backend(), BUF, 64), vec![0xee; 64]);

        // Outside guest RAM altogether.
        let plain = guest_memory();
        let mut driver = Driver::new(&plain, 0, QUEUE_SIZE);
        let chain = driver.chain(&[wo(0x20_0000, 64)]);
        assert_eq!(fill_chain(temp.as_file(), &plain, &chain), 0);

        // Through the mapping alone, the device fills the translated RAM.
        let chain = Driver::new(&mem, 0, QUEUE_SIZE).chain(&[wo(0x1000_0000, 64)]);
        assert_eq!(fill_chain(temp.as_file(), &mem, &chain), 64);
        assert_eq!(read(mem.get_backend(), BUF, 64), expected(0, 64));
    }

    #[test]
    fn missing_source_is_reported() {
        let err = Rng::new(guest_memory(), Path::new("/nonexistent/entropy"), false)
            .err()
            .unwrap();
        assert!(err.to_string().contains("/nonexistent/entropy"), "{err}");
    }

    #[test]
    fn worker_fills_requests_from_urandom_until_reset() {
        let mem = guest_memory();
        let mut dev = Rng::new(mem.clone(), Path::new(DEFAULT_SOURCE), true).unwrap();
        assert_eq!(dev.device_type(), VIRTIO_ID_RNG);
        assert_ne!(
            dev.features() & (1 << virtio_bindings::virtio_config::VIRTIO_F_ACCESS_PLATFORM),
            0
        );
        let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);
        let features = dev.features();
        let (notifier, interrupt) = driver.activate(&mut dev, features);

        let head = driver.add(&[wo(BUF, 64)]);
        notifier.write(1).unwrap();
        assert!(interrupt.wait_for(0, 1));
        assert_eq!(driver.used(), vec![(u32::from(head), 64)]);
        assert_ne!(read(&mem, BUF, 64), vec![0; 64]);
        // What reached the guest is counted: a chain outside its RAM delivers nothing.
        driver.add(&[wo(0x20_0000, 64)]);
        notifier.write(1).unwrap();
        assert!(crate::test_utils::eventually(|| driver.used().len() == 2));
        assert_eq!(dev.counters().unwrap().read(), [("bytes", 64)]);

        dev.reset();
        driver.add(&[wo(BUF, 64)]);
        notifier.write(1).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(driver.used().len(), 2);
    }
}
