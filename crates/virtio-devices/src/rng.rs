//! virtio-rng, the entropy device (virtio v1.2 §5.4).
//!
//! One request queue whose device-writable buffers are filled from a host source, by default
//! `/dev/urandom`. Each request is capped so that a slow source (`/dev/random` on old kernels)
//! or a huge buffer cannot keep the worker busy indefinitely: the driver just asks again.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use log::{debug, warn};
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{GuestMemory, Permissions, ReadVolatile, VolatileMemoryError};

use crate::buffers::{self, Buffer};
use crate::worker::{DeviceQueue, Poller, Worker, WorkerHandler};
use crate::{
    common_features, take_queue, ActivateError, ActivatedQueue, DeviceMemory, VirtioDevice,
    VirtioInterrupt,
};

/// The entropy source used unless the VMM is told otherwise.
pub const DEFAULT_SOURCE: &str = "/dev/urandom";
/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes delivered per request.
pub const MAX_REQUEST_BYTES: u64 = 64 * 1024;

/// Numbers worker threads `virtio-rng-N`.
static NEXT_INSTANCE: AtomicUsize = AtomicUsize::new(0);

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
    features: u64,
    acked_features: u64,
    thread_name: String,
    worker: Option<Worker>,
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
            features: common_features(access_platform),
            acked_features: 0,
            thread_name: format!(
                "virtio-rng-{}",
                NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed)
            ),
            worker: None,
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
        self.features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features;
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
        // A second activation without reset replaces the running worker.
        self.worker = None;
        let activated = take_queue(&mut queues, 0)?;
        if !activated.queue.is_valid(&self.mem) {
            warn!("virtio-rng: queue 0 is not accessible; requests will fail");
        }
        let event_idx = self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let handler = RngWorker {
            mem: self.mem.clone(),
            source: Arc::clone(&self.source),
            queue: DeviceQueue::new(0, activated.queue, event_idx, interrupt),
        };
        let worker = Worker::spawn(
            self.thread_name.clone(),
            vec![(0, activated.notifier)],
            handler,
        )
        .map_err(ActivateError::Io)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        // Dropping the worker stops and joins its thread, which also drops the queue.
        self.worker = None;
        self.acked_features = 0;
    }
}

struct RngWorker<M> {
    mem: M,
    source: Arc<File>,
    queue: DeviceQueue,
}

impl<M: DeviceMemory> WorkerHandler for RngWorker<M> {
    fn queue_notified(&mut self, _index: usize, _poller: &Poller) {
        let source = &*self.source;
        let mem = &self.mem;
        self.queue
            .process(mem, |chain| Some(fill_chain(source, mem, chain)));
    }
}

/// Fills the chain's device-writable buffers (up to [`MAX_REQUEST_BYTES`]) from `source`;
/// returns how many bytes were delivered. Device-readable buffers carry nothing for this device
/// and are skipped.
fn fill_chain<M: GuestMemory>(source: &File, mem: &M, chain: DescriptorChain<&M>) -> u32 {
    let head = chain.head_index();
    let writable: Vec<Buffer> = buffers::collect(chain)
        .into_iter()
        .filter(|b| b.writable)
        .collect();
    let len = buffers::total_len(&writable).min(MAX_REQUEST_BYTES);
    let slices = match buffers::slices(mem, &writable, 0, len, Permissions::Write) {
        Ok(slices) => slices,
        Err(err) => {
            warn!("virtio-rng: request {head}: {err}");
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
                    warn!("virtio-rng: request {head}: {err}");
                    return delivered as u32;
                }
            };
            match source.read_volatile(&mut rest) {
                Ok(0) => {
                    warn!("virtio-rng: entropy source is exhausted");
                    return (delivered + filled) as u32;
                }
                Ok(read) => filled += read,
                Err(VolatileMemoryError::IOError(err))
                    if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => {
                    warn!("virtio-rng: cannot read the entropy source: {err}");
                    return (delivered + filled) as u32;
                }
            }
        }
        delivered += filled;
    }
    // At most MAX_REQUEST_BYTES.
    delivered as u32
}
