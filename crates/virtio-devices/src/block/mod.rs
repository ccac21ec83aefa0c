//! virtio-blk (virtio v1.2 §5.2) backed by a raw image file or a host block device.
//!
//! Each request queue has its own thread and its own I/O engine (`io-engine`: io_uring, or
//! synchronous calls where the host refuses it), with up to a queue's worth of requests in
//! flight, completed in the order the engine finishes them. Data moves straight between the
//! image and the guest's buffers (through an aligned bounce buffer only under O_DIRECT with
//! buffers the host cannot take). Every request is validated before any data moves; anything
//! hostile or malformed is answered with the spec's status when the status byte is writable,
//! and completed with length 0 otherwise.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use io_engine::Engine;
use log::debug;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_ID_BYTES,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::QueueT;
use vm_device::warn_limited;

use crate::counters::BlockCounters;
use crate::device_queue::DeviceQueue;
use crate::worker::{DeviceThread, DeviceWorker};
use crate::{
    common_features, read_config_bytes, take_queue, ActivateError, ActivatedQueue, DeviceCounters,
    DeviceMemory, VirtioDevice, VirtioInterrupt,
};

mod image;
mod inflight;
mod queue;
mod request;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_async;
#[cfg(test)]
mod tests_bounds;
#[cfg(test)]
mod tests_counters;

use image::{Disk, ImageKind};
use inflight::Requests;
use queue::QueueWorker;

/// Bytes per virtio-blk sector, whatever the image's own block size.
pub const SECTOR_SIZE: u64 = 512;
/// Default size of each request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most request queues: each is a thread and an io_uring.
pub const MAX_QUEUES: u16 = 64;
const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Most sectors one DISCARD or WRITE_ZEROES covers (2 GiB): one `fallocate` or ioctl each.
const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// DISCARD granularity announced to the driver, in sectors (4 KiB, a host page and block).
const DISCARD_SECTOR_ALIGNMENT: u32 = 8;

/// Offsets in the configuration space (virtio 1.2 §5.2.4).
mod config {
    pub const CAPACITY: usize = 0;
    pub const SEG_MAX: usize = 12;
    pub const BLK_SIZE: usize = 20;
    pub const WRITEBACK: usize = 32;
    pub const NUM_QUEUES: usize = 34;
    pub const MAX_DISCARD_SECTORS: usize = 36;
    pub const MAX_DISCARD_SEG: usize = 40;
    pub const DISCARD_SECTOR_ALIGNMENT: usize = 44;
    pub const MAX_WRITE_ZEROES_SECTORS: usize = 48;
    pub const MAX_WRITE_ZEROES_SEG: usize = 52;
    pub const WRITE_ZEROES_MAY_UNMAP: usize = 56;
    /// Up to the end of `unused1`, after `write_zeroes_may_unmap`.
    pub const LEN: usize = 60;
}

/// How the VMM wants the disk presented.
#[derive(Clone, Debug)]
pub struct BlockOptions {
    /// Offer `VIRTIO_BLK_F_RO` and fail every write with `VIRTIO_BLK_S_IOERR`.
    pub readonly: bool,
    /// Answer to `VIRTIO_BLK_T_GET_ID`, truncated to 20 bytes. [`Block::open`] defaults it to the
    /// image's file name; [`Block::new`] to empty.
    pub serial: Option<String>,
    /// Offer `VIRTIO_F_ACCESS_PLATFORM`: set when the device's memory is an `IommuMemory`.
    pub access_platform: bool,
    /// O_DIRECT on the image: no host page cache.
    pub direct: bool,
    /// Request queues, each with its own thread (`VIRTIO_BLK_F_MQ` when more than one).
    pub num_queues: u16,
    /// Size of each request queue: also how many requests each keeps in flight.
    pub queue_size: u16,
}

impl Default for BlockOptions {
    fn default() -> Self {
        BlockOptions {
            readonly: false,
            serial: None,
            access_platform: false,
            direct: false,
            num_queues: 1,
            queue_size: QUEUE_SIZE,
        }
    }
}

/// Why a block device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened.
    #[error("cannot open disk image {}: {source}", path.display())]
    Open {
        /// The image path given.
        path: PathBuf,
        /// What `open` said.
        source: io::Error,
    },
    /// The image's size could not be determined.
    #[error("cannot determine the size of the disk image: {0}")]
    Size(io::Error),
    /// O_DIRECT could not be set on the image.
    #[error("cannot use direct I/O (O_DIRECT) on the disk image: {0}")]
    Direct(io::Error),
    /// The queue count or size is out of range.
    #[error("{0}")]
    Queues(String),
    /// An I/O engine could not be set up.
    #[error("cannot set up disk I/O: {0}")]
    Engine(io::Error),
    /// Another user holds the image's lock (see `image::lock_image`).
    #[error(
        "the disk image is in use: another VM, or another disk of this one, has it open{}; give each its own image{}",
        if *readonly { " for writing" } else { "" },
        if *readonly { "" } else { ", or readonly=on to all of them" }
    )]
    Locked { readonly: bool },
    /// The image's lock could not be taken for another reason.
    #[error("cannot lock the disk image: {0}")]
    Lock(io::Error),
}

/// A virtio-blk device over guest memory `M` (plain or behind the IOMMU).
pub struct Block<M> {
    mem: M,
    disk: Arc<Disk>,
    /// One per queue, kept across activations: rings are made here, before the VMM confines
    /// its threads, so no device thread needs `io_uring_setup`.
    engines: Vec<Arc<Mutex<Engine>>>,
    queue_sizes: Vec<u16>,
    core: DeviceWorker,
    config: Vec<u8>,
    /// Fed by every queue's thread.
    counters: Arc<BlockCounters>,
    /// What a request's chain may have: the header, `SEG_MAX` data segments and the status.
    max_descriptors: u16,
}

impl<M: DeviceMemory> Block<M> {
    /// A disk over an already opened raw image or block device (opened read-write unless
    /// `options.readonly`). The capacity is its size rounded down to whole sectors.
    pub fn new(mem: M, image: File, options: BlockOptions) -> Result<Self, BlockError> {
        if !(1..=MAX_QUEUES).contains(&options.num_queues) {
            return Err(BlockError::Queues(format!(
                "num_queues={} is not from 1 to {MAX_QUEUES}",
                options.num_queues
            )));
        }
        if !options.queue_size.is_power_of_two() || options.queue_size < 2 {
            return Err(BlockError::Queues(format!(
                "queue_size={} is not a power of two from 2 to 32768",
                options.queue_size
            )));
        }
        let mut serial = [0u8; ID_LEN];
        if let Some(id) = &options.serial {
            let len = id.len().min(ID_LEN);
            serial[..len].copy_from_slice(&id.as_bytes()[..len]);
        }
        let counters = Arc::new(BlockCounters::default());
        let disk = Disk::new(
            image,
            options.readonly,
            serial,
            options.direct,
            Arc::clone(&counters),
        )?;
        let engines = (0..options.num_queues)
            .map(|_| {
                Engine::new(Arc::clone(&disk.file), u32::from(options.queue_size))
                    .map(|engine| Arc::new(Mutex::new(engine)))
                    .map_err(BlockError::Engine)
            })
            .collect::<Result<Vec<_>, _>>()?;

        // Data segments per request: a chain without indirect descriptors also needs the
        // header and the status descriptor, so this is what always fits in the ring. It is
        // enforced (indirect tables included): a longer chain is returned unused.
        let seg_max = u32::from(options.queue_size).saturating_sub(2).max(1);
        // No VIRTIO_BLK_F_SIZE_MAX: any segment length is served, so there is no limit to
        // announce; SEG_MAX keeps requests within what the ring can always carry.
        let mut features = common_features(options.access_platform)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_CONFIG_WCE);
        if options.readonly {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        if options.num_queues > 1 {
            features |= 1 << VIRTIO_BLK_F_MQ;
        }
        let blk_size = disk.direct_alignment.filter(|&a| a as u64 > SECTOR_SIZE);
        if blk_size.is_some() {
            // The driver then sends whole blocks, which O_DIRECT needs.
            features |= 1 << VIRTIO_BLK_F_BLK_SIZE;
        }

        // Fields of features not offered stay zero (geometry, topology, secure erase).
        let mut config = vec![0u8; config::LEN];
        let mut put = |offset: usize, bytes: &[u8]| {
            config[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        put(config::CAPACITY, &disk.capacity.to_le_bytes());
        put(config::SEG_MAX, &seg_max.to_le_bytes());
        put(
            config::BLK_SIZE,
            &(blk_size.unwrap_or(0) as u32).to_le_bytes(),
        );
        put(config::NUM_QUEUES, &options.num_queues.to_le_bytes());
        put(
            config::MAX_DISCARD_SECTORS,
            &MAX_DISCARD_SECTORS.to_le_bytes(),
        );
        put(config::MAX_DISCARD_SEG, &1u32.to_le_bytes());
        put(
            config::DISCARD_SECTOR_ALIGNMENT,
            &DISCARD_SECTOR_ALIGNMENT.to_le_bytes(),
        );
        put(
            config::MAX_WRITE_ZEROES_SECTORS,
            &MAX_DISCARD_SECTORS.to_le_bytes(),
        );
        put(config::MAX_WRITE_ZEROES_SEG, &1u32.to_le_bytes());
        // A file punches a hole for a WRITE_ZEROES with UNMAP; a block device zeroes.
        put(
            config::WRITE_ZEROES_MAY_UNMAP,
            &[u8::from(disk.kind == ImageKind::File)],
        );

        Ok(Block {
            mem,
            disk: Arc::new(disk),
            engines,
            queue_sizes: vec![options.queue_size; usize::from(options.num_queues)],
            core: DeviceWorker::new(DeviceThread::Block, features),
            config,
            counters,
            max_descriptors: u16::try_from(seg_max + 2).unwrap_or(u16::MAX),
        })
    }

    /// Opens the image at `path` (read-only if `options.readonly`) and creates the disk. The
    /// serial defaults to the image's file name.
    pub fn open(mem: M, path: &Path, mut options: BlockOptions) -> Result<Self, BlockError> {
        let image = OpenOptions::new()
            .read(true)
            .write(!options.readonly)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_owned(),
                source,
            })?;
        if options.serial.is_none() {
            options.serial = path
                .file_name()
                .map(|name| name.to_string_lossy().into_owned());
        }
        Self::new(mem, image, options)
    }

    /// Disk size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.capacity
    }

    /// How the disk does its I/O (io_uring, or the synchronous fallback).
    pub fn engine_kind(&self) -> io_engine::EngineKind {
        self.engines[0]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .kind()
    }
}

impl<M: DeviceMemory> VirtioDevice for Block<M> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.core.features()
    }

    fn ack_features(&mut self, features: u64) {
        self.core.ack_features(features);
        // A driver that can flush gets a write-back cache, one that cannot gets write-through
        // (virtio 1.2 §5.2.6.1: with CONFIG_WCE but not FLUSH, writeback starts at 0).
        self.set_writeback(self.core.acked(VIRTIO_BLK_F_FLUSH));
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `writeback` is writable, and only with VIRTIO_BLK_F_CONFIG_WCE.
        let (true, &[mode]) = (offset == config::WRITEBACK as u64, data) else {
            debug!(
                "virtio-blk: ignoring config write of {} bytes at {offset}",
                data.len()
            );
            return;
        };
        if !self.core.acked(VIRTIO_BLK_F_CONFIG_WCE) {
            debug!("virtio-blk: ignoring writeback write: CONFIG_WCE not negotiated");
            return;
        }
        // Write-back without FLUSH would leave the driver no way to make writes stable.
        let writeback = mode == 1 && self.core.acked(VIRTIO_BLK_F_FLUSH);
        if !writeback && self.disk.writeback() {
            // Writes completed under write-back become stable now, as write-through promises;
            // if they cannot, the cache stays write-back (the driver reads the mode back), so
            // the driver still flushes and is never told they are stable.
            if let Err(err) = self.disk.sync() {
                warn_limited!(
                    "virtio-blk: cannot flush on switching to write-through: {err}; \
                     the cache stays write-back"
                );
                return;
            }
        }
        self.set_writeback(writeback);
    }

    fn activate(
        &mut self,
        mut queues: Vec<ActivatedQueue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        // The engines go back to the device only once the old threads are gone.
        self.core.stop();
        let features = self.core.acked_features();
        // The driver may enable fewer queues than offered (virtio 1.2 §5.2.6.1): serve those.
        let mut threads = Vec::new();
        for (index, engine) in self.engines.iter().enumerate() {
            let activated = match take_queue(&mut queues, index) {
                Ok(activated) => activated,
                Err(err) if index == 0 => return Err(err),
                Err(_) => continue,
            };
            if !activated.queue.is_valid(&self.mem) {
                warn_limited!("virtio-blk: queue {index} is not accessible; requests will fail");
            }
            let depth = activated.queue.size();
            let handler = QueueWorker {
                mem: self.mem.clone(),
                queue: DeviceQueue::new(index, activated.queue, features, Arc::clone(&interrupt))
                    .with_max_descriptors(self.max_descriptors),
                requests: Requests::new(
                    Arc::clone(&self.disk),
                    Arc::clone(engine),
                    depth,
                    Arc::clone(&self.counters),
                ),
            };
            threads.push((vec![(index, activated.notifier)], handler));
        }
        self.core.start_each(threads)
    }

    fn counters(&self) -> Option<Arc<dyn DeviceCounters>> {
        Some(self.counters.clone())
    }

    fn reset(&mut self) {
        self.core.reset();
        self.set_writeback(false);
    }
}

#[cfg(feature = "fuzzing")]
impl<M: DeviceMemory> Block<M> {
    /// Serves `queue` as queue 0's worker would, on the calling thread, until every chain
    /// made available is complete (see [`crate::fuzzing::block`]).
    pub(crate) fn serve_for_fuzzing(
        &self,
        queue: virtio_queue::Queue,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) {
        let depth = queue.size();
        let features = self.core.acked_features();
        let Ok(epoll) = vmm_sys_util::epoll::Epoll::new() else {
            return;
        };
        QueueWorker {
            mem: self.mem.clone(),
            queue: DeviceQueue::new(0, queue, features, interrupt)
                .with_max_descriptors(self.max_descriptors),
            requests: Requests::new(
                Arc::clone(&self.disk),
                Arc::clone(&self.engines[0]),
                depth,
                Arc::clone(&self.counters),
            ),
        }
        .serve_to_completion(&crate::worker::Poller::new(&epoll));
    }
}

impl<M> Drop for Block<M> {
    /// Stops the workers (which hold the image too), then gives the image's lock back, in the
    /// thread that drops the disk (the hotplug thread's, on removal).
    fn drop(&mut self) {
        self.core.stop();
        self.disk.release_lock();
    }
}

impl<M> Block<M> {
    /// Sets the cache mode the workers apply and the driver reads in `writeback`.
    fn set_writeback(&mut self, on: bool) {
        self.disk.writeback.store(on, Ordering::Relaxed);
        self.config[config::WRITEBACK] = u8::from(on);
    }
}
