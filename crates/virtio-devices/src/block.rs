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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use log::{debug, warn};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{DescriptorChain, QueueT};
use vm_device::warn_limited;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{GuestMemory, Permissions, VolatileSlice};

use crate::buffers::{self, AccessError, Buffer};
use crate::worker::{DeviceQueue, DeviceThread, DeviceWorker, Poller, WorkerHandler};
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
/// Offset of `writeback` in the configuration space (VIRTIO_BLK_F_CONFIG_WCE).
const WRITEBACK_OFFSET: usize = 32;

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
    core: DeviceWorker,
    config: Vec<u8>,
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

        // No VIRTIO_BLK_F_SIZE_MAX: any segment length is served, so there is no limit to
        // announce; SEG_MAX keeps requests within what the ring can always carry.
        let mut features = common_features(options.access_platform)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_CONFIG_WCE);
        if options.readonly {
            features |= 1 << VIRTIO_BLK_F_RO;
        }

        // Config layout: capacity (le64) at 0, size_max (le32, not offered) at 8, seg_max (le32)
        // at 12, geometry, blk_size and topology (not offered, zero) up to `writeback` (u8) at
        // 32; the fields after it belong to features this device does not offer.
        let mut config = Vec::with_capacity(WRITEBACK_OFFSET + 1);
        config.extend_from_slice(&capacity.to_le_bytes());
        config.extend_from_slice(&0u32.to_le_bytes());
        config.extend_from_slice(&SEG_MAX.to_le_bytes());
        config.resize(WRITEBACK_OFFSET + 1, 0);

        Ok(Block {
            mem,
            disk: Arc::new(Disk {
                file: image,
                capacity,
                readonly: options.readonly,
                serial,
                writeback: AtomicBool::new(false),
                #[cfg(test)]
                syncs: Default::default(),
            }),
            core: DeviceWorker::new(DeviceThread::Block, features),
            config,
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
        let (true, &[mode]) = (offset == WRITEBACK_OFFSET as u64, data) else {
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
        if !writeback && self.disk.writeback.load(Ordering::Relaxed) {
            // Writes completed under write-back become stable now, as write-through promises.
            if let Err(err) = self.disk.sync() {
                warn_limited!("virtio-blk: cannot flush on switching to write-through: {err}");
            }
        }
        self.set_writeback(writeback);
    }

    fn activate(
        &mut self,
        mut queues: Vec<ActivatedQueue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let activated = take_queue(&mut queues, 0)?;
        if !activated.queue.is_valid(&self.mem) {
            warn_limited!("virtio-blk: queue 0 is not accessible; requests will fail");
        }
        let event_idx = self.core.acked(VIRTIO_RING_F_EVENT_IDX);
        let handler = BlockWorker {
            mem: self.mem.clone(),
            disk: Arc::clone(&self.disk),
            queue: DeviceQueue::new(0, activated.queue, event_idx, interrupt),
        };
        self.core.start(vec![(0, activated.notifier)], handler)
    }

    fn reset(&mut self) {
        self.core.reset();
        self.set_writeback(false);
    }
}

impl<M> Block<M> {
    /// Sets the cache mode the worker applies and the driver reads in `writeback`.
    fn set_writeback(&mut self, on: bool) {
        self.disk.writeback.store(on, Ordering::Relaxed);
        self.config[WRITEBACK_OFFSET] = u8::from(on);
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
    /// Write-back cache: writes complete once written, and stable after a FLUSH. Otherwise
    /// (a driver without VIRTIO_BLK_F_FLUSH, which cannot ask for durability, or one that set
    /// write-through) each write is made stable before it completes (virtio 1.2 §5.2.6.2).
    writeback: AtomicBool,
    /// `fdatasync`s done, for tests.
    #[cfg(test)]
    syncs: std::sync::atomic::AtomicUsize,
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
    fn handle_chain<M: DeviceMemory>(&self, mem: &M, chain: DescriptorChain<&M>) -> u32 {
        // From the first translation to the status byte, one transfer: an UNMAP of any of
        // its buffers completes only once the data stopped moving.
        let _dma = mem.begin_dma();
        let head = chain.head_index();
        let chain = buffers::collect(chain);
        // The status byte is the last byte of the last descriptor, which must be writable, and
        // reachable before any data moves: a request that cannot be answered is not carried out.
        let Some(status_desc) = chain.last().filter(|b| b.writable && b.len > 0) else {
            warn_limited!("virtio-blk: request {head} has no writable status byte; dropping it");
            return 0;
        };
        let status_offset = u64::from(status_desc.len) - 1;
        let status_slice = buffers::slices(
            mem,
            std::slice::from_ref(status_desc),
            status_offset,
            1,
            Permissions::Write,
        )
        .map(|slices| slices.into_iter().next());
        let Ok(Some(status_slice)) = status_slice else {
            warn_limited!("virtio-blk: request {head}: status byte not accessible; dropping it");
            return 0;
        };

        let (status, data_written) = match self.execute(mem, &chain) {
            Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
            Err(err) => {
                warn_limited!("virtio-blk: request {head} failed: {err}");
                (err.status(), 0)
            }
        };
        status_slice.copy_from(&[status]);
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
                transfer_vectored(&self.file, offset, &slices, Direction::FromImage)?;
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
                transfer_vectored(&self.file, offset, &slices, Direction::ToImage)?;
                if !self.writeback.load(Ordering::Relaxed) {
                    self.sync()?;
                }
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                self.sync()?;
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

    /// Makes the writes done so far stable (`fdatasync`).
    fn sync(&self) -> io::Result<()> {
        #[cfg(test)]
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.file.sync_data()
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

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    FromImage,
    ToImage,
}

/// Most iovecs one `preadv`/`pwritev` takes (Linux's `UIO_MAXIOV`).
const MAX_IOVECS: usize = 1024;

/// Moves a request's data between the image at `offset` and the guest's buffers with one
/// `preadv`/`pwritev` per batch of slices, positioned so that no seek state is shared.
///
/// A request's data usually arrives as one descriptor per guest page: a system call per
/// slice made a 1 MiB read cost 256 of them, the dominant cost of unprotected I/O.
fn transfer_vectored<B: BitmapSlice>(
    file: &File,
    offset: u64,
    slices: &[VolatileSlice<B>],
    direction: Direction,
) -> Result<(), RequestError> {
    // The guards keep the slices' pointers valid until the system calls are done (a mutable
    // guard for both directions: `pwritev` only reads through it).
    let guards: Vec<_> = slices.iter().map(|slice| slice.ptr_guard_mut()).collect();
    let mut iovecs: Vec<libc::iovec> = guards
        .iter()
        .zip(slices)
        .map(|(guard, slice)| libc::iovec {
            iov_base: guard.as_ptr().cast(),
            iov_len: slice.len(),
        })
        .collect();
    let mut done = 0usize;
    let mut position = offset;
    while done < iovecs.len() {
        let batch = &iovecs[done..iovecs.len().min(done + MAX_IOVECS)];
        let file_offset = libc::off_t::try_from(position)
            .map_err(|_| RequestError::Io(io::Error::from_raw_os_error(libc::EOVERFLOW)))?;
        // SAFETY: every iovec points into a live guest-memory slice of the length given (the
        // guards above pin them), writable when reading from the image; the fd is open.
        let moved = unsafe {
            match direction {
                Direction::FromImage => libc::preadv(
                    file.as_raw_fd(),
                    batch.as_ptr(),
                    batch.len() as libc::c_int,
                    file_offset,
                ),
                Direction::ToImage => libc::pwritev(
                    file.as_raw_fd(),
                    batch.as_ptr(),
                    batch.len() as libc::c_int,
                    file_offset,
                ),
            }
        };
        let mut moved = match moved {
            n if n < 0 => {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(RequestError::Io(err));
            }
            0 => return Err(RequestError::Io(io::ErrorKind::UnexpectedEof.into())),
            n => n as usize,
        };
        position += moved as u64;
        // Skip what was fully transferred and trim a partially transferred iovec.
        while moved > 0 {
            let iovec = &mut iovecs[done];
            let step = moved.min(iovec.iov_len);
            if direction == Direction::FromImage {
                slices[done]
                    .bitmap()
                    .mark_dirty(slices[done].len() - iovec.iov_len, step);
            }
            iovec.iov_len -= step;
            // SAFETY: stays within the slice the iovec was built from.
            iovec.iov_base = unsafe { iovec.iov_base.cast::<u8>().add(step).cast() };
            moved -= step;
            if iovec.iov_len == 0 {
                done += 1;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;
    use std::thread;
    use std::time::Duration;

    use virtio_bindings::virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
    use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::tempfile::TempFile;

    use super::*;
    use crate::test_utils::{guest_memory, iommu_memory, ro, wo, Desc, Driver, FakeInterrupt};

    const HDR: u64 = 0x1_0000;
    const DATA: u64 = 0x2_0000;
    const STATUS: u64 = 0x3_0000;
    const DISK_SECTORS: u64 = 16;

    /// A 16-sector image whose sector `n` is filled with byte `n`.
    fn image() -> TempFile {
        let temp = TempFile::new().unwrap();
        for sector in 0..DISK_SECTORS {
            temp.as_file()
                .write_all_at(&[sector as u8; 512], sector * SECTOR_SIZE)
                .unwrap();
        }
        temp
    }

    fn block<M: DeviceMemory>(mem: M, temp: &TempFile, options: BlockOptions) -> Block<M> {
        Block::new(mem, temp.as_file().try_clone().unwrap(), options).unwrap()
    }

    fn header<M: GuestMemory>(mem: &M, addr: u64, request_type: u32, sector: u64) {
        let mut bytes = [0u8; 16];
        bytes[..4].copy_from_slice(&request_type.to_le_bytes());
        bytes[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
    }

    fn status<M: GuestMemory>(mem: &M, addr: u64) -> u32 {
        u32::from(mem.read_obj::<u8>(GuestAddress(addr)).unwrap())
    }

    fn submit<M: DeviceMemory>(
        disk: &Disk,
        driver: &mut Driver<M>,
        mem: &M,
        descs: &[Desc],
    ) -> u32 {
        let chain = driver.chain(descs);
        disk.handle_chain(mem, chain)
    }

    fn file_bytes(temp: &TempFile, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        temp.as_file().read_exact_at(&mut buf, offset).unwrap();
        buf
    }

    /// Writes 0xFF over the status byte so a test sees whether the device wrote it.
    fn poison_status<M: GuestMemory>(mem: &M) {
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    #[test]
    fn write_then_read_back_across_split_buffers() {
        let mem = guest_memory();
        let temp = image();
        let dev = block(mem.clone(), &temp, BlockOptions::default());
        let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);

        let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 % 251) as u8).collect();
        mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
        header(&mem, HDR, VIRTIO_BLK_T_OUT, 3);
        let used = submit(
            &dev.disk,
            &mut driver,
            &mem,
            &[
                ro(HDR, 16),
                ro(DATA, 300),
                ro(DATA + 300, 724),
                wo(STATUS, 1),
            ],
        );
        assert_eq!(used, 1);
        assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_OK);
        assert_eq!(file_bytes(&temp, 3 * 512, 1024), pattern);
        // Neighbouring sectors are untouched.
        assert_eq!(file_bytes(&temp, 2 * 512, 512), vec![2; 512]);
        assert_eq!(file_bytes(&temp, 5 * 512, 512), vec![5; 512]);

        let back = DATA + 0x1000;
        header(&mem, HDR, VIRTIO_BLK_T_IN, 3);
        poison_status(&mem);
        let used = submit(
            &dev.disk,
            &mut driver,
            &mem,
            &[
                ro(HDR, 16),
                wo(back, 100),
                wo(back + 100, 900),
                wo(back + 1000, 24),
                wo(STATUS, 1),
            ],
        );
        assert_eq!(used, 1024 + 1);
        assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_OK);
        let mut read = vec![0u8; 1024];
        mem.read_slice(&mut read, GuestAddress(back)).unwrap();
        assert_eq!(read, pattern);
    }

    #[test]
    fn header_split_across_descriptors_and_status_sharing_the_data_buffer() {
        let mem = guest_memory();
        let temp = image();
        let dev = block(mem.clone(), &temp, BlockOptions::default());
        let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);

        header(&mem, HDR, VIRTIO_BLK_T_IN, 9);
        // Header in three pieces, data and status in one writable descriptor.
        let used = submit(
            &dev.disk,
            &mut driver,
            &mem,
            &[ro(HDR, 3), ro(HDR + 3, 9), ro(HDR + 12, 4), wo(DATA, 513)],
        );
        assert_eq!(used, 513);
        assert_eq!(status(&mem, DATA + 512), VIRTIO_BLK_S_OK);
        let mut read = vec![0u8; 512];
        mem.read_slice(&mut read, GuestAddress(DATA)).unwrap();
        assert_eq!(read, vec![9; 512]);
    }

    #[test]
    fn flush_and_get_id() {
        let mem = guest_memory();
        let temp = image();
        let options = BlockOptions {
            serial: Some("a-serial-longer-than-twenty-bytes".into()),
            ..Default::default()
        };
        let dev = block(mem.clone(), &temp, options);
        let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);

        header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
        poison_status(&mem);
        let used = submit(&dev.disk, &mut driver, &mem, &[ro(HDR, 16), wo(STATUS, 1)]);
        assert_eq!(used, 1);
        assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_OK);

        header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
        poison_status(&mem);
        let used = submit(
            &dev.disk,
            &mut driver,
            &mem,
            &[ro(HDR, 16), wo(DATA, 20), wo(STATUS, 1)],
        );
        assert_eq!(used, 21);
        assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_OK);
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"a-serial-longer-than");
    }

    #[test]
    fn open_by_path_defaults_the_serial_to_the_file_name() {
        let mem = guest_memory();
        let temp = image();
        let dev = Block::open(mem.clone(), temp.as_path(), BlockOptions::default()).unwrap();
        let name = temp.as_path().file_name().unwrap().to_str().unwrap();
        let expected = &name.as_bytes()[..name.len().min(20)];
        assert_eq!(&dev.disk.serial[..expected.len()], expected);
        assert_eq!(dev.capacity(), DISK_SECTORS);

        let missing = temp.as_path().with_extension("missing");
        let err = Block::open(mem, &missing, BlockOptions::default())
            .err()
            .unwrap();
        assert!(matches!(err, BlockError::Open { .. }));
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn sectors_beyond_capacity_fail_with_ioerr() {
        let mem = guest_memory();
        let temp = image();
        let dev = block(mem.clone(), &temp, BlockOptions::default());
        let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);

        for (request_type, sector, data) in [
            // Last sector plus one more.
            (VIRTIO_BLK_T_IN, DISK_SECTORS - 1, 1024),
            (VIRTIO_BLK_T_OUT, DISK_SECTORS, 512),
            // sector + count wraps around.
            (VIRTIO_BLK_T_IN, u64::MAX, 512),
            // Byte offset would overflow.
            (VIRTIO_BLK_T_OUT, u64::MAX / 256, 512),
        ] {
            header(&mem, HDR, request_type, sector);
            poison_status(&mem);
            let data_desc = if request_type == VIRTIO_BLK_T_IN {
                wo(DATA, data)
            } else {
                ro(DATA, data)
            };
            let used = submit(
                &dev.disk,
                &mut driver,
                &mem,
                &[ro(HDR, 16), data_desc, wo(STATUS, 1)],
            );
            assert_eq!(used, 1, "type {request_type} sector {sector}");
            assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_IOERR);
        }
        assert_eq!(file_bytes(&temp, 15 * 512, 512), vec![15; 512]);
    }

    #[test]
    fn hostile_layouts_fail_with_ioerr() {
        let mem = guest_memory();
        let temp = image();
        let dev = block(mem.clone(), &temp, BlockOptions::default());
        let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);

        let cases: [(u32, Vec<Desc>); 5] = [
            // Length not a multiple of the sector size.
            (
                VIRTIO_BLK_T_IN,
                vec![ro(HDR, 16), wo(DATA, 500), wo(STATUS, 1)],
            ),
            // A read that also carries device-readable data.
            (
                VIRTIO_BLK_T_IN,
                vec![ro(HDR, 16), ro(DATA, 512), wo(STATUS, 1)],
            ),
            // A write whose data is device-writable.
            (
                VIRTIO_BLK_T_OUT,
                vec![ro(HDR, 16), wo(DATA, 512), wo(STATUS, 1)],
            ),
            // Readable descriptor after a writable one.
            (
                VIRTIO_BLK_T_OUT,
                vec![ro(HDR, 16), wo(DATA, 512), ro(DATA, 512), wo(STATUS, 1)],
            ),
            // Header shorter than 16 bytes.
            (VIRTIO_BLK_T_IN, vec![ro(HDR, 8), wo(STATUS, 1)]),
        ];
        for (request_type, descs) in cases {
            header(&mem, HDR, request_type, 0);
            poison_status(&mem);
            let used = submit(&dev.disk, &mut driver, &mem, &descs);
            assert_eq!(used, 1, "{descs:?}");
            assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_IOERR, "{descs:?}");
        }
        assert_eq!(file_bytes(&temp, 0, 512), vec![0; 512]);
    }

    #[test]
    fn readonly_disk_refuses_writes_but_serves_reads() {
        let mem = guest_memory();
        let temp = image();
        let options = BlockOptions {
            readonly: true,
            ..Default::default()
        };
        let dev = block(mem.clone(), &temp, options);
        assert_ne!(dev.features() & (1 << VIRTIO_BLK_F_RO), 0);
        let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);

        mem.write_slice(&[0xee; 512], GuestAddress(DATA)).unwrap();
        header(&mem, HDR, VIRTIO_BLK_T_OUT, 1);
        let used = submit(
            &dev.disk,
            &mut driver,
            &mem,
            &[ro(HDR, 16), ro(DATA, 512), wo(STATUS, 1)],
        );
        assert_eq!(used, 1);
        assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_IOERR);
        assert_eq!(file_bytes(&temp, 512, 512), vec![1; 512]);

        header(&mem, HDR, VIRTIO_BLK_T_IN, 1);
        poison_status(&mem);
        let used = submit(
            &dev.disk,
            &mut driver,
            &mem,
            &[ro(HDR, 16), wo(DATA, 512), wo(STATUS, 1)],
        );
        assert_eq!(used, 513);
        assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_OK);
    }

    #[test]
    fn unknown_request_types_are_unsupported() {
        let mem = guest_memory();
        let temp = image();
        let dev = block(mem.clone(), &temp, BlockOptions::default());
        let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);

        for request_type in [2, 11, 13, 0xdead_beef] {
            header(&mem, HDR, request_type, 0);
            poison_status(&mem);
            let used = submit(&dev.disk, &mut driver, &mem, &[ro(HDR, 16), wo(STATUS, 1)]);
            assert_eq!(used, 1);
            assert_eq!(
                status(&mem, STATUS),
                VIRTIO_BLK_S_UNSUPP,
                "type {request_type}"
            );
        }
    }

    #[test]
    fn buffers_outside_guest_memory_never_panic() {
        let mem = guest_memory();
        let temp = image();
        let dev = block(mem.clone(), &temp, BlockOptions::default());
        let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);
        let outside = 0x20_0000; // guest RAM ends at 1 MiB

        // Data buffer outside RAM: error reported in the (valid) status byte.
        header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        poison_status(&mem);
        let used = submit(
            &dev.disk,
            &mut driver,
            &mem,
            &[ro(HDR, 16), wo(outside, 512), wo(STATUS, 1)],
        );
        assert_eq!(used, 1);
        assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_IOERR);

        // Data buffer straddling the end of RAM: nothing of it is written.
        mem.write_slice(&[0xaa; 256], GuestAddress(0x10_0000 - 256))
            .unwrap();
        poison_status(&mem);
        let used = submit(
            &dev.disk,
            &mut driver,
            &mem,
            &[ro(HDR, 16), wo(0x10_0000 - 256, 512), wo(STATUS, 1)],
        );
        assert_eq!(used, 1);
        assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_IOERR);
        let mut tail = [0u8; 256];
        mem.read_slice(&mut tail, GuestAddress(0x10_0000 - 256))
            .unwrap();
        assert_eq!(tail, [0xaa; 256]);

        // Header outside RAM, and an address range that wraps around.
        for descs in [
            vec![ro(outside, 16), wo(STATUS, 1)],
            vec![ro(HDR, 16), wo(u64::MAX - 100, 512), wo(STATUS, 1)],
        ] {
            poison_status(&mem);
            let used = submit(&dev.disk, &mut driver, &mem, &descs);
            assert_eq!(used, 1);
            assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_IOERR);
        }

        // Status byte outside RAM, or not writable at all: completed with nothing written.
        for descs in [
            vec![ro(HDR, 16), wo(DATA, 512), wo(outside, 1)],
            vec![ro(HDR, 16), ro(STATUS, 1)],
            vec![ro(HDR, 16), wo(STATUS, 0)],
        ] {
            let used = submit(&dev.disk, &mut driver, &mem, &descs);
            assert_eq!(used, 0, "{descs:?}");
        }
    }

    /// Writes `byte` over sector 7 through the worker, with `features` negotiated; returns how
    /// many `fdatasync`s the disk did.
    fn write_through_worker(features: u64, byte: u8) -> usize {
        let mem = guest_memory();
        let temp = image();
        let mut dev = block(mem.clone(), &temp, BlockOptions::default());
        let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);
        let (notifier, interrupt) = driver.activate(&mut dev, features);
        mem.write_slice(&[byte; 512], GuestAddress(DATA)).unwrap();
        header(&mem, HDR, VIRTIO_BLK_T_OUT, 7);
        driver.add(&[ro(HDR, 16), ro(DATA, 512), wo(STATUS, 1)]);
        notifier.write(1).unwrap();
        assert!(interrupt.wait_for(0, 1));
        assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_OK);
        assert_eq!(file_bytes(&temp, 7 * 512, 512), vec![byte; 512]);
        dev.reset();
        dev.disk.syncs.load(Ordering::Relaxed)
    }

    /// Without VIRTIO_BLK_F_FLUSH the driver cannot ask for durability, so the device must
    /// make each write stable before completing it (virtio 1.2 §5.2.6.2); with it, writes may
    /// stay in the host's cache until a FLUSH.
    #[test]
    fn writes_are_stable_on_completion_unless_flush_was_negotiated() {
        let version_1 = 1u64 << VIRTIO_F_VERSION_1;
        assert_eq!(write_through_worker(version_1, 0x5a), 1);
        assert_eq!(
            write_through_worker(version_1 | 1 << VIRTIO_BLK_F_FLUSH, 0xa5),
            0
        );
    }

    /// With CONFIG_WCE the driver reads and sets the cache mode in `writeback`: write-back
    /// (1) only if it can flush; switching to write-through makes earlier writes stable, and
    /// from then on each write is made stable before it completes.
    #[test]
    fn the_driver_sets_the_cache_mode_with_config_wce() {
        let syncs = |dev: &Block<GuestMemoryMmap>| dev.disk.syncs.load(Ordering::Relaxed);
        let writeback = |dev: &Block<GuestMemoryMmap>| {
            let mut mode = [0xffu8];
            dev.read_config(WRITEBACK_OFFSET as u64, &mut mode);
            mode[0]
        };
        let mem = guest_memory();
        let temp = image();
        let mut dev = block(mem.clone(), &temp, BlockOptions::default());
        let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);
        let wce = 1u64 << VIRTIO_BLK_F_CONFIG_WCE;
        let flush = 1u64 << VIRTIO_BLK_F_FLUSH;
        let write = |dev: &Block<GuestMemoryMmap>, driver: &mut Driver<GuestMemoryMmap>| {
            header(&mem, HDR, VIRTIO_BLK_T_OUT, 4);
            poison_status(&mem);
            submit(
                &dev.disk,
                driver,
                &mem,
                &[ro(HDR, 16), ro(DATA, 512), wo(STATUS, 1)],
            );
            assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_OK);
        };

        dev.ack_features(wce | flush);
        assert_eq!(writeback(&dev), 1);
        write(&dev, &mut driver);
        assert_eq!(syncs(&dev), 0, "write-back");
        dev.write_config(WRITEBACK_OFFSET as u64, &[0]);
        assert_eq!(writeback(&dev), 0);
        assert_eq!(syncs(&dev), 1, "earlier writes made stable");
        write(&dev, &mut driver);
        assert_eq!(syncs(&dev), 2, "write-through");
        dev.write_config(WRITEBACK_OFFSET as u64, &[1]);
        assert_eq!(writeback(&dev), 1);
        write(&dev, &mut driver);
        assert_eq!(syncs(&dev), 2);

        // Without FLUSH the driver cannot have write-back; without CONFIG_WCE it cannot set it.
        dev.reset();
        dev.ack_features(wce);
        assert_eq!(writeback(&dev), 0);
        dev.write_config(WRITEBACK_OFFSET as u64, &[1]);
        assert_eq!(writeback(&dev), 0);
        dev.reset();
        dev.ack_features(flush);
        dev.write_config(WRITEBACK_OFFSET as u64, &[0]);
        assert_eq!(writeback(&dev), 1);
    }

    /// The status byte is checked before any data moves: a request whose status cannot be
    /// written changes neither the image nor guest memory.
    #[test]
    fn an_unwritable_status_byte_moves_no_data() {
        let mem = guest_memory();
        let temp = image();
        let dev = block(mem.clone(), &temp, BlockOptions::default());
        let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);
        let outside = 0x20_0000; // guest RAM ends at 1 MiB

        mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
        header(&mem, HDR, VIRTIO_BLK_T_OUT, 2);
        let used = submit(
            &dev.disk,
            &mut driver,
            &mem,
            &[ro(HDR, 16), ro(DATA, 512), wo(outside, 1)],
        );
        assert_eq!(used, 0);
        assert_eq!(
            file_bytes(&temp, 2 * 512, 512),
            vec![2; 512],
            "image unchanged"
        );

        header(&mem, HDR, VIRTIO_BLK_T_IN, 3);
        let used = submit(
            &dev.disk,
            &mut driver,
            &mem,
            &[ro(HDR, 16), wo(DATA, 512), wo(0x10_0000 - 1, 2)],
        );
        assert_eq!(used, 0);
        let mut data = [0u8; 512];
        mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
        assert_eq!(data, [0x5a; 512], "guest memory unchanged");
    }

    #[test]
    fn config_and_features() {
        let mem = guest_memory();
        let temp = image();
        let options = BlockOptions {
            access_platform: true,
            ..Default::default()
        };
        let dev = block(mem, &temp, options);
        assert_eq!(dev.device_type(), VIRTIO_ID_BLOCK);
        assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE]);
        let features = dev.features();
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_F_ACCESS_PLATFORM,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_CONFIG_WCE,
        ] {
            assert_ne!(features & (1 << bit), 0, "bit {bit}");
        }
        assert_eq!(features & (1 << VIRTIO_BLK_F_RO), 0);

        let mut capacity = [0u8; 8];
        dev.read_config(0, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), DISK_SECTORS);
        let mut seg_max = [0u8; 4];
        dev.read_config(12, &mut seg_max);
        assert_eq!(u32::from_le_bytes(seg_max), SEG_MAX);
        let mut past_end = [0xffu8; 8];
        dev.read_config(20, &mut past_end);
        assert_eq!(past_end, [0; 8]);

        assert_eq!(
            features & (1 << VIRTIO_RING_F_INDIRECT_DESC),
            0,
            "behind the IOMMU an indirect table costs a MAP request per I/O"
        );

        let plain = block(guest_memory(), &temp, BlockOptions::default());
        assert_eq!(plain.features() & (1 << VIRTIO_F_ACCESS_PLATFORM), 0);
        assert_ne!(plain.features() & (1 << VIRTIO_RING_F_INDIRECT_DESC), 0);
    }

    #[test]
    fn worker_serves_the_queue_until_reset() {
        let mem = guest_memory();
        let temp = image();
        let mut dev = block(mem.clone(), &temp, BlockOptions::default());
        let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);
        let features = dev.features();
        let (notifier, interrupt) = driver.activate(&mut dev, features);

        mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
        header(&mem, HDR, VIRTIO_BLK_T_OUT, 7);
        let head = driver.add(&[ro(HDR, 16), ro(DATA, 512), wo(STATUS, 1)]);
        notifier.write(1).unwrap();
        assert!(interrupt.wait_for(0, 1));
        assert_eq!(driver.used(), vec![(u32::from(head), 1)]);
        assert_eq!(file_bytes(&temp, 7 * 512, 512), vec![0x5a; 512]);

        dev.reset();
        mem.write_slice(&[0x11; 512], GuestAddress(DATA)).unwrap();
        driver.add(&[ro(HDR, 16), ro(DATA, 512), wo(STATUS, 1)]);
        notifier.write(1).unwrap();
        thread::sleep(Duration::from_millis(100));
        assert_eq!(driver.used().len(), 1);
        assert_eq!(file_bytes(&temp, 7 * 512, 512), vec![0x5a; 512]);
    }

    #[test]
    fn protected_device_serves_requests_through_the_worker() {
        let mem = iommu_memory();
        mem.iommu()
            .map(0x1000_0000, 0x2_0000, 0x1_0000, Permissions::ReadWrite);
        let temp = image();
        let mut dev = block(
            mem.clone(),
            &temp,
            BlockOptions {
                access_platform: true,
                ..Default::default()
            },
        );
        let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);
        let features = dev.features();
        let (notifier, interrupt) = driver.activate(&mut dev, features);

        let (hdr, data, status_iova) = (0x1000_0000, 0x1000_1000, 0x1000_3000);
        header(&mem, hdr, VIRTIO_BLK_T_IN, 11);
        let head = driver.add(&[ro(hdr, 16), wo(data, 1024), wo(status_iova, 1)]);
        notifier.write(1).unwrap();
        assert!(interrupt.wait_for(0, 1));
        assert_eq!(driver.used(), vec![(u32::from(head), 1025)]);
        let mut read = vec![0u8; 1024];
        mem.get_backend()
            .read_slice(&mut read, GuestAddress(0x2_1000))
            .unwrap();
        assert_eq!(&read[..512], &[11; 512][..]);
        assert_eq!(&read[512..], &[12; 512][..]);
        dev.reset();
    }

    #[test]
    fn activation_needs_queue_zero() {
        let mem = guest_memory();
        let temp = image();
        let mut dev = block(mem, &temp, BlockOptions::default());
        let err = dev
            .activate(Vec::new(), Arc::new(FakeInterrupt::default()))
            .unwrap_err();
        assert!(matches!(err, ActivateError::MissingQueue(0)));
    }

    #[test]
    fn requests_through_the_iommu_are_translated() {
        let mem = iommu_memory();
        let phys: &GuestMemoryMmap = mem.get_backend();
        // The guest mapped its request buffers at IOVA 0x1000_0000, backed by RAM at 0x2_0000.
        mem.iommu()
            .map(0x1000_0000, 0x2_0000, 0x1_0000, Permissions::ReadWrite);
        let temp = image();
        let dev = block(
            mem.clone(),
            &temp,
            BlockOptions {
                access_platform: true,
                ..Default::default()
            },
        );
        let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);

        let (hdr, data, status_iova) = (0x1000_0000, 0x1000_1000, 0x1000_3000);
        mem.write_slice(&[0x77; 512], GuestAddress(data)).unwrap();
        header(&mem, hdr, VIRTIO_BLK_T_OUT, 4);
        let used = submit(
            &dev.disk,
            &mut driver,
            &mem,
            &[ro(hdr, 16), ro(data, 512), wo(status_iova, 1)],
        );
        assert_eq!(used, 1);
        assert_eq!(status(phys, 0x2_3000), VIRTIO_BLK_S_OK);
        assert_eq!(file_bytes(&temp, 4 * 512, 512), vec![0x77; 512]);

        header(&mem, hdr, VIRTIO_BLK_T_IN, 6);
        let used = submit(
            &dev.disk,
            &mut driver,
            &mem,
            &[ro(hdr, 16), wo(0x1000_2000, 512), wo(status_iova, 1)],
        );
        assert_eq!(used, 513);
        let mut read = vec![0u8; 512];
        phys.read_slice(&mut read, GuestAddress(0x2_2000)).unwrap();
        assert_eq!(read, vec![6; 512]);
    }

    #[test]
    fn unmapped_or_readonly_buffers_give_ioerr_without_touching_memory() {
        let mem = iommu_memory();
        let phys: &GuestMemoryMmap = mem.get_backend();
        mem.iommu()
            .map(0x1000_0000, 0x2_0000, 0x1_0000, Permissions::ReadWrite);
        // A buffer the guest exposed to the device for reading only.
        mem.iommu()
            .map(0x2000_0000, 0x4_0000, 0x1000, Permissions::Read);
        let temp = image();
        let dev = block(mem.clone(), &temp, BlockOptions::default());
        let mut driver = Driver::new(&mem, 0, QUEUE_SIZE);
        let (hdr, mapped, status_iova) = (0x1000_0000, 0x1000_4000, 0x1000_3000);
        phys.write_slice(&[0xaa; 512], GuestAddress(0x2_4000))
            .unwrap();
        phys.write_slice(&[0xbb; 512], GuestAddress(0x4_0000))
            .unwrap();

        header(&mem, hdr, VIRTIO_BLK_T_IN, 2);
        for data in [
            // First half mapped, second half not: the mapped half must stay untouched too.
            vec![wo(mapped, 512), wo(0x3000_0000, 512)],
            // Mapped, but not for device writes.
            vec![wo(0x2000_0000, 512)],
            // Mapped RAM addresses are not IOVAs: physical 0x2_4000 is not mapped.
            vec![wo(0x2_4000, 512)],
        ] {
            let mut descs = vec![ro(hdr, 16)];
            descs.extend(data);
            descs.push(wo(status_iova, 1));
            phys.write_obj(0xffu8, GuestAddress(0x2_3000)).unwrap();
            let used = submit(&dev.disk, &mut driver, &mem, &descs);
            assert_eq!(used, 1, "{descs:?}");
            assert_eq!(status(phys, 0x2_3000), VIRTIO_BLK_S_IOERR, "{descs:?}");
        }
        let mut buf = [0u8; 512];
        phys.read_slice(&mut buf, GuestAddress(0x2_4000)).unwrap();
        assert_eq!(buf, [0xaa; 512]);
        phys.read_slice(&mut buf, GuestAddress(0x4_0000)).unwrap();
        assert_eq!(buf, [0xbb; 512]);

        // An unmapped status byte cannot be reported: completed with length 0.
        let used = submit(
            &dev.disk,
            &mut driver,
            &mem,
            &[ro(hdr, 16), wo(mapped, 512), wo(0x3000_0000, 1)],
        );
        assert_eq!(used, 0);
    }
}
