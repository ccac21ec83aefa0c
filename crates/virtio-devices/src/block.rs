//! virtio-blk (virtio v1.2 §5.2) backed by a raw image file.
//!
//! One request queue. Data moves between the image and guest memory with `pread`/`pwrite`
//! straight into (out of) the guest's buffers, so there is no bounce buffer and no shared file
//! position. Every request is validated before any data moves; anything hostile or malformed is
//! answered with `VIRTIO_BLK_S_IOERR` when the status byte is writable, and completed with
//! length 0 otherwise.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use log::{debug, warn};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    GuestMemory, Permissions, ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile,
};

use crate::buffers::{self, AccessError, Buffer};
use crate::worker::{DeviceQueue, Poller, Worker, WorkerHandler};
use crate::{
    common_features, read_config_bytes, take_queue, ActivateError, ActivatedQueue, DeviceMemory,
    VirtioDevice, VirtioInterrupt,
};

/// Bytes per virtio-blk sector, whatever the image's own block size.
pub const SECTOR_SIZE: u64 = 512;
/// Size of the single request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request: a chain without indirect descriptors also needs the header and
/// the status descriptor, so this is what always fits in the ring.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// `struct virtio_blk_req` header: type, reserved (ioprio), sector.
const HEADER_LEN: u64 = 16;
const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;

/// Numbers worker threads `virtio-blk-N`.
static NEXT_INSTANCE: AtomicUsize = AtomicUsize::new(0);

/// How the VMM wants the disk presented.
#[derive(Clone, Debug, Default)]
pub struct BlockOptions {
    /// Offer `VIRTIO_BLK_F_RO` and fail every write with `VIRTIO_BLK_S_IOERR`.
    pub readonly: bool,
    /// Answer to `VIRTIO_BLK_T_GET_ID`, truncated to 20 bytes. [`Block::open`] defaults it to the
    /// image's file name; [`Block::new`] to empty.
    pub serial: Option<String>,
    /// Offer `VIRTIO_F_ACCESS_PLATFORM`: set when the device's memory is an `IommuMemory`.
    pub access_platform: bool,
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
}

/// A virtio-blk device over guest memory `M` (plain or behind the IOMMU).
pub struct Block<M> {
    mem: M,
    disk: Arc<Disk>,
    features: u64,
    acked_features: u64,
    config: Vec<u8>,
    thread_name: String,
    worker: Option<Worker>,
}

impl<M: DeviceMemory> Block<M> {
    /// A disk over an already opened raw image (opened read-write unless `options.readonly`).
    /// The capacity is the file's size rounded down to whole sectors.
    pub fn new(mem: M, mut image: File, options: BlockOptions) -> Result<Self, BlockError> {
        // Seeking to the end also sizes block devices, whose metadata length is 0.
        let size = image.seek(SeekFrom::End(0)).map_err(BlockError::Size)?;
        if !size.is_multiple_of(SECTOR_SIZE) {
            warn!(
                "virtio-blk: image size {size} is not a multiple of {SECTOR_SIZE}; the tail is not visible"
            );
        }
        let capacity = size / SECTOR_SIZE;

        let mut serial = [0u8; ID_LEN];
        if let Some(id) = &options.serial {
            let len = id.len().min(ID_LEN);
            serial[..len].copy_from_slice(&id.as_bytes()[..len]);
        }

        let mut features = common_features(options.access_platform)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_FLUSH);
        if options.readonly {
            features |= 1 << VIRTIO_BLK_F_RO;
        }

        // Config layout: capacity (le64) at 0, size_max (le32, not offered) at 8, seg_max (le32)
        // at 12; the fields after it belong to features this device does not offer.
        let mut config = Vec::with_capacity(16);
        config.extend_from_slice(&capacity.to_le_bytes());
        config.extend_from_slice(&0u32.to_le_bytes());
        config.extend_from_slice(&SEG_MAX.to_le_bytes());

        Ok(Block {
            mem,
            disk: Arc::new(Disk {
                file: image,
                capacity,
                readonly: options.readonly,
                serial,
            }),
            features,
            acked_features: 0,
            config,
            thread_name: format!(
                "virtio-blk-{}",
                NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed)
            ),
            worker: None,
        })
    }

    /// Opens the raw image at `path` (read-only if `options.readonly`) and creates the disk. The
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
}

impl<M: DeviceMemory> VirtioDevice for Block<M> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
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

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `wce` (with VIRTIO_BLK_F_CONFIG_WCE, not offered) would be writable.
        debug!(
            "virtio-blk: ignoring config write of {} bytes at {offset}",
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
            warn!("virtio-blk: queue 0 is not accessible; requests will fail");
        }
        let event_idx = self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let handler = BlockWorker {
            mem: self.mem.clone(),
            disk: Arc::clone(&self.disk),
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

struct BlockWorker<M> {
    mem: M,
    disk: Arc<Disk>,
    queue: DeviceQueue,
}

impl<M: DeviceMemory> WorkerHandler for BlockWorker<M> {
    fn queue_notified(&mut self, _index: usize, _poller: &Poller) {
        let disk = &self.disk;
        let mem = &self.mem;
        self.queue
            .process(mem, |chain| Some(disk.handle_chain(mem, chain)));
    }
}

/// The image and what the driver was told about it; shared with the worker thread.
struct Disk {
    file: File,
    capacity: u64,
    readonly: bool,
    serial: [u8; ID_LEN],
}

/// Why a request failed; everything but an unknown type is an I/O error for the driver.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("request is shorter than its header")]
    ShortHeader,
    #[error("a device-readable descriptor follows a device-writable one")]
    Misordered,
    #[error("request carries data in the wrong direction")]
    WrongDirection,
    #[error("data length {0} is not a multiple of {SECTOR_SIZE}")]
    UnalignedLength(u64),
    #[error("sectors {sector}+{count} are beyond the capacity of {capacity}")]
    OutOfRange {
        sector: u64,
        count: u64,
        capacity: u64,
    },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("cannot access the request's buffers: {0}")]
    Buffers(#[from] AccessError),
    #[error("image I/O failed: {0}")]
    Io(#[from] io::Error),
}

impl RequestError {
    fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

impl Disk {
    /// Executes one request and returns the number of bytes written into the chain (data plus
    /// status byte), which is what the used ring reports.
    fn handle_chain<M: GuestMemory>(&self, mem: &M, chain: DescriptorChain<&M>) -> u32 {
        let head = chain.head_index();
        let chain = buffers::collect(chain);
        // The status byte is the last byte of the last descriptor, which must be writable.
        let Some(status_desc) = chain.last().filter(|b| b.writable && b.len > 0) else {
            warn!("virtio-blk: request {head} has no writable status byte; dropping it");
            return 0;
        };
        let status_offset = u64::from(status_desc.len) - 1;

        let (status, data_written) = match self.execute(mem, &chain) {
            Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
            Err(err) => {
                warn!("virtio-blk: request {head} failed: {err}");
                (err.status(), 0)
            }
        };
        if let Err(err) = buffers::write_from(
            mem,
            std::slice::from_ref(status_desc),
            status_offset,
            &[status],
        ) {
            warn!("virtio-blk: cannot write the status of request {head}: {err}");
            return 0;
        }
        // Below 2^32: the data is part of a chain the queue limits to 2^32 - 1 bytes.
        u32::try_from(data_written + 1).unwrap_or(u32::MAX)
    }

    /// Validates and carries out a request whose last descriptor holds the status byte;
    /// returns how many data bytes it wrote into guest memory.
    fn execute<M: GuestMemory>(&self, mem: &M, chain: &[Buffer]) -> Result<u64, RequestError> {
        let split = chain.iter().position(|b| b.writable).unwrap_or(chain.len());
        let (readable, writable) = chain.split_at(split);
        if writable.iter().any(|b| !b.writable) {
            return Err(RequestError::Misordered);
        }
        let out_len = buffers::total_len(readable);
        // The status byte (checked by the caller) is not data.
        let in_len = buffers::total_len(writable).saturating_sub(1);
        if out_len < HEADER_LEN {
            return Err(RequestError::ShortHeader);
        }
        let mut header = [0u8; HEADER_LEN as usize];
        buffers::read_into(mem, readable, 0, &mut header)?;
        let request_type = u32::from_le_bytes(header[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
        let out_data = out_len - HEADER_LEN;

        match request_type {
            VIRTIO_BLK_T_IN => {
                if out_data != 0 {
                    return Err(RequestError::WrongDirection);
                }
                let offset = self.check_range(sector, in_len)?;
                let slices = buffers::slices(mem, writable, 0, in_len, Permissions::Write)?;
                let mut file = FileAt {
                    file: &self.file,
                    offset,
                };
                for mut slice in slices {
                    file.read_exact_volatile(&mut slice).map_err(volatile_io)?;
                }
                Ok(in_len)
            }
            VIRTIO_BLK_T_OUT => {
                if self.readonly {
                    return Err(RequestError::ReadOnly);
                }
                if in_len != 0 {
                    return Err(RequestError::WrongDirection);
                }
                let offset = self.check_range(sector, out_data)?;
                let slices =
                    buffers::slices(mem, readable, HEADER_LEN, out_data, Permissions::Read)?;
                let mut file = FileAt {
                    file: &self.file,
                    offset,
                };
                for slice in slices {
                    file.write_all_volatile(&slice).map_err(volatile_io)?;
                }
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                self.file.sync_data()?;
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let len = self
                    .serial
                    .len()
                    .min(usize::try_from(in_len).unwrap_or(ID_LEN));
                buffers::write_from(mem, writable, 0, &self.serial[..len])?;
                Ok(len as u64)
            }
            other => Err(RequestError::Unsupported(other)),
        }
    }

    /// Checks that `len` bytes at `sector` are whole sectors inside the disk; returns the byte
    /// offset in the image.
    fn check_range(&self, sector: u64, len: u64) -> Result<u64, RequestError> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(RequestError::UnalignedLength(len));
        }
        let count = len / SECTOR_SIZE;
        match sector.checked_add(count) {
            // capacity <= u64::MAX / 512, so the byte offset cannot overflow.
            Some(end) if end <= self.capacity => Ok(sector * SECTOR_SIZE),
            _ => Err(RequestError::OutOfRange {
                sector,
                count,
                capacity: self.capacity,
            }),
        }
    }
}

fn volatile_io(err: VolatileMemoryError) -> RequestError {
    match err {
        VolatileMemoryError::IOError(err) => RequestError::Io(err),
        other => RequestError::Io(io::Error::other(other)),
    }
}

/// Positional I/O on the image: each transfer carries its own offset, so no seek state is shared
/// and guest buffers are handed to the kernel directly.
struct FileAt<'a> {
    file: &'a File,
    offset: u64,
}

impl FileAt<'_> {
    fn offset(&self) -> Result<libc::off_t, VolatileMemoryError> {
        libc::off_t::try_from(self.offset).map_err(|_| {
            VolatileMemoryError::IOError(io::Error::from_raw_os_error(libc::EOVERFLOW))
        })
    }
}

impl ReadVolatile for FileAt<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let offset = self.offset()?;
        let guard = buf.ptr_guard_mut();
        // SAFETY: the fd is open for as long as `self.file` is borrowed, and the pointer is valid
        // for writes of `buf.len()` bytes by the invariants of `VolatileSlice`.
        let read = unsafe {
            libc::pread(
                self.file.as_raw_fd(),
                guard.as_ptr().cast(),
                buf.len(),
                offset,
            )
        };
        if read < 0 {
            // A partial read may have happened: dirty-page tracking must assume it did.
            buf.bitmap().mark_dirty(0, buf.len());
            return Err(VolatileMemoryError::IOError(io::Error::last_os_error()));
        }
        let read = read as usize;
        buf.bitmap().mark_dirty(0, read);
        self.offset += read as u64;
        Ok(read)
    }
}

impl WriteVolatile for FileAt<'_> {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let offset = self.offset()?;
        let guard = buf.ptr_guard();
        // SAFETY: the fd is open for as long as `self.file` is borrowed, and the pointer is valid
        // for reads of `buf.len()` bytes by the invariants of `VolatileSlice`.
        let written = unsafe {
            libc::pwrite(
                self.file.as_raw_fd(),
                guard.as_ptr().cast(),
                buf.len(),
                offset,
            )
        };
        if written < 0 {
            return Err(VolatileMemoryError::IOError(io::Error::last_os_error()));
        }
        self.offset += written as u64;
        Ok(written as usize)
    }
}
