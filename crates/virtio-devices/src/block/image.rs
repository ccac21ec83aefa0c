//! The disk image: a raw file or a host block device, and what the driver was told about it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr};

use super::{BlockError, ID_LEN, SECTOR_SIZE};
use crate::counters::BlockCounters;

// <linux/fs.h>
ioctl_ior_nr!(BLKGETSIZE64, 0x12, 114, u64);
ioctl_io_nr!(BLKSSZGET, 0x12, 104);
ioctl_io_nr!(BLKDISCARD, 0x12, 119);
ioctl_io_nr!(BLKZEROOUT, 0x12, 127);

/// What backs the disk, which decides how DISCARD and WRITE_ZEROES are done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ImageKind {
    /// A regular file: `fallocate` punches holes and zeroes ranges, through the engine.
    File,
    /// A host block device: `BLKDISCARD` and `BLKZEROOUT`, in the worker thread.
    BlockDevice,
}

/// The image and what the driver was told about it; shared by the device and its workers.
pub(super) struct Disk {
    pub(super) file: Arc<File>,
    pub(super) capacity: u64,
    pub(super) readonly: bool,
    pub(super) serial: [u8; ID_LEN],
    pub(super) kind: ImageKind,
    /// With O_DIRECT, the alignment the host requires of offsets, lengths and buffers (guest
    /// buffers that miss it go through a bounce buffer); `None` through the page cache.
    pub(super) direct_alignment: Option<usize>,
    /// Write-back cache: writes complete once written, and stable after a FLUSH. Otherwise
    /// (a driver without VIRTIO_BLK_F_FLUSH, which cannot ask for durability, or one that set
    /// write-through) each write is made stable before it completes (virtio 1.2 §5.2.6.2).
    pub(super) writeback: AtomicBool,
    /// The disk's counters, for the `fdatasync`s asked for.
    counters: Arc<BlockCounters>,
}

impl Disk {
    /// Sizes `file` (a regular file, or a block device through `BLKGETSIZE64`) and, with
    /// `direct`, switches it to O_DIRECT.
    pub(super) fn new(
        file: File,
        readonly: bool,
        serial: [u8; ID_LEN],
        direct: bool,
        counters: Arc<BlockCounters>,
    ) -> Result<Self, BlockError> {
        let metadata = file.metadata().map_err(BlockError::Size)?;
        let kind = if metadata.file_type().is_block_device() {
            ImageKind::BlockDevice
        } else {
            ImageKind::File
        };
        let size = match kind {
            ImageKind::File => metadata.len(),
            ImageKind::BlockDevice => {
                let mut size = 0u64;
                // SAFETY: BLKGETSIZE64 writes one u64 into `size`.
                ioctl_result(unsafe {
                    libc::ioctl(file.as_raw_fd(), BLKGETSIZE64(), &mut size as *mut u64)
                })
                .map_err(BlockError::Size)?;
                size
            }
        };
        if !size.is_multiple_of(SECTOR_SIZE) {
            log::warn!(
                "virtio-blk: image size {size} is not a multiple of {SECTOR_SIZE}; the tail is not visible"
            );
        }
        lock_image(&file, readonly)?;
        let direct_alignment = if direct {
            set_direct(&file).map_err(BlockError::Direct)?;
            Some(direct_alignment(&file, kind))
        } else {
            None
        };
        Ok(Disk {
            file: Arc::new(file),
            capacity: size / SECTOR_SIZE,
            readonly,
            serial,
            kind,
            direct_alignment,
            writeback: AtomicBool::new(false),
            counters,
        })
    }

    pub(super) fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Relaxed)
    }

    /// Counts an `fdatasync` about to be asked of the engine (`host_syncs`: what makes
    /// durability visible from outside).
    pub(super) fn count_sync(&self) {
        self.counters.host_syncs.add(1);
    }

    /// The `fdatasync`s asked for so far.
    #[cfg(test)]
    pub(super) fn syncs(&self) -> u64 {
        self.counters.host_syncs.get()
    }

    /// Makes the writes done so far stable, in the calling thread.
    pub(super) fn sync(&self) -> io::Result<()> {
        self.count_sync();
        self.file.sync_data()
    }

    /// Discards (or, with `zero`, zeroes) `len` bytes at `offset` of a block device.
    pub(super) fn discard_block_device(&self, offset: u64, len: u64, zero: bool) -> io::Result<()> {
        let range = [offset, len];
        let request = if zero { BLKZEROOUT() } else { BLKDISCARD() };
        // SAFETY: both ioctls read two u64s (offset, length) from `range`.
        ioctl_result(unsafe { libc::ioctl(self.file.as_raw_fd(), request, range.as_ptr()) })
    }
}

/// Takes an advisory lock on the whole image for as long as `file` is open: shared for a
/// read-only disk, exclusive otherwise, so two writers (two VMs on one image, or one image
/// attached twice) or a writer and a reader are refused, as QEMU and Cloud Hypervisor refuse
/// them. An open-file-description lock (`F_OFD_SETLK`): it belongs to this open of the image,
/// so a second open in the same process conflicts too, and it goes when the file is closed.
fn lock_image(file: &File, readonly: bool) -> Result<(), BlockError> {
    // SAFETY: F_GETFL takes no argument and returns the file's flags.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    // A file opened read-only cannot take a write lock, nor write: a read lock then.
    let read_only_file = flags >= 0 && flags & libc::O_ACCMODE == libc::O_RDONLY;
    let kind = if readonly || read_only_file {
        libc::F_RDLCK
    } else {
        libc::F_WRLCK
    };
    let lock = libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        // Zero: to the end of the file, however it grows.
        l_len: 0,
        // Must be zero for OFD locks.
        l_pid: 0,
    };
    // SAFETY: F_OFD_SETLK reads one struct flock, which `lock` is.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
    if ret == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EAGAIN | libc::EACCES) => Err(BlockError::Locked { readonly }),
        _ => Err(BlockError::Lock(err)),
    }
}

impl Disk {
    /// Gives the image's lock back (the disk is going): the io_uring rings hold the file, and
    /// so the lock, for a while after they are closed, and a disk removed and added again must
    /// find its image free. Called by the device's owner once its workers are gone (a worker
    /// may not make this call: its thread's allow-list has no `fcntl`).
    pub(super) fn release_lock(&self) {
        let unlock = libc::flock {
            l_type: libc::F_UNLCK as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: 0,
            l_len: 0,
            l_pid: 0,
        };
        // SAFETY: F_OFD_SETLK reads one struct flock, which `unlock` is.
        unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_OFD_SETLK, &unlock) };
    }
}

fn ioctl_result(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn set_direct(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL and F_SETFL take and return plain flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    ioctl_result(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_DIRECT) })
}

/// The alignment O_DIRECT needs: a block device's logical block size, or for a file what a
/// probe finds (a sector unless a 512-byte read at offset 512 is refused), never below a sector.
fn direct_alignment(file: &File, kind: ImageKind) -> usize {
    const SECTOR: usize = SECTOR_SIZE as usize;
    const LARGE: usize = 4096;
    match kind {
        ImageKind::File => {
            let layout = std::alloc::Layout::from_size_align(LARGE, LARGE).unwrap();
            // SAFETY: the layout has a non-zero size; freed below.
            let buf = unsafe { std::alloc::alloc(layout) };
            if buf.is_null() {
                return LARGE;
            }
            // SAFETY: `buf` has room for the sector read into it.
            let ret = unsafe { libc::pread(file.as_raw_fd(), buf.cast(), SECTOR, SECTOR as i64) };
            let refused =
                ret < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL);
            // SAFETY: allocated above with this layout.
            unsafe { std::alloc::dealloc(buf, layout) };
            if refused {
                LARGE
            } else {
                SECTOR
            }
        }
        ImageKind::BlockDevice => {
            let mut size: libc::c_int = 0;
            // SAFETY: BLKSSZGET writes one int into `size`.
            let ret = unsafe { libc::ioctl(file.as_raw_fd(), BLKSSZGET(), &mut size) };
            if ret < 0 || size <= 0 {
                LARGE
            } else {
                (size as usize).max(SECTOR)
            }
        }
    }
}
