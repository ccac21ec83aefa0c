//! Guest RAM: anonymous memory, a file, or huge pages, mapped through `vm-memory`.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::FromRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use vm_config::{MemoryBacking, MemoryConfig};

use crate::layout;

const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memory: cannot open file {path}: {source}; give an existing directory (e.g. a hugetlbfs mount such as /dev/hugepages) or a file path")]
    OpenBacking { path: PathBuf, source: io::Error },
    #[error("memory: cannot size the backing file to {size} bytes: {source}")]
    SizeBacking { size: u64, source: io::Error },
    #[error(
        "memory: size {size} is not a multiple of the {page_size}-byte huge page size; round it up"
    )]
    Unaligned { size: u64, page_size: u64 },
    #[error("memory: {needed} huge pages of {} KiB are needed but only {free} are free; reserve them with `echo {needed} > /proc/sys/vm/nr_hugepages` (or via /sys/kernel/mm/hugepages/hugepages-{}kB/nr_hugepages)", page_size >> 10, page_size >> 10)]
    HugepagesNotReserved {
        needed: u64,
        free: u64,
        page_size: u64,
    },
    #[error("memory: hugepages needs huge page support in the host kernel: {0}")]
    NoHugepages(io::Error),
    #[error("memory: cannot map guest RAM: {0}")]
    Mmap(String),
}

/// Guest RAM together with the page size that backs it, which bounds the IOMMU page sizes worth
/// advertising: a 2 MiB IOMMU page is only contiguous on the host when RAM is on 2 MiB pages.
pub struct GuestRam {
    pub memory: GuestMemoryMmap,
    pub backing_page_size: u64,
}

/// Maps guest RAM as `config` (validated) asks.
pub fn create_guest_ram(config: &MemoryConfig) -> Result<GuestRam, MemoryError> {
    let (file, backing_page_size) = match config.backing() {
        // Shared RAM is a memfd, which a vhost-user back end can map too.
        MemoryBacking::Anonymous if config.shared => {
            (Some(create_memfd(config.size, 0)?), host_page_size())
        }
        MemoryBacking::Anonymous => (None, host_page_size()),
        MemoryBacking::File(path) => {
            let file = open_backing_file(path, config.size)?;
            let page_size = hugetlbfs_page_size(&file).unwrap_or_else(host_page_size);
            if page_size > host_page_size() {
                check_hugepages_free(config.size, page_size)?;
            }
            (Some(file), page_size)
        }
        MemoryBacking::Hugepages => {
            let page_size = default_hugepage_size().map_err(MemoryError::NoHugepages)?;
            check_hugepages_free(config.size, page_size)?;
            (
                Some(create_memfd(config.size, libc::MFD_HUGETLB)?),
                page_size,
            )
        }
    };

    let mut regions = Vec::new();
    let mut file_offset = 0;
    for (start, len) in layout::ram_regions(config.size) {
        let flags = match (&file, config.shared) {
            (None, _) => libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            (Some(_), true) => libc::MAP_SHARED,
            // Huge pages mapped privately are still reserved at mmap time, so a missing
            // reservation fails here rather than as a SIGBUS inside the guest.
            (Some(_), false) => libc::MAP_PRIVATE,
        } | if config.prefault {
            libc::MAP_POPULATE
        } else {
            0
        };
        let mut builder = MmapRegionBuilder::new(len as usize)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .with_hugetlbfs(backing_page_size > host_page_size());
        if let Some(file) = &file {
            let clone = file
                .try_clone()
                .map_err(|err| MemoryError::Mmap(err.to_string()))?;
            builder = builder.with_file_offset(FileOffset::new(clone, file_offset));
        }
        let mapping = builder
            .build()
            .map_err(|err| MemoryError::Mmap(err.to_string()))?;
        advise(&mapping, config, backing_page_size == host_page_size())?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| MemoryError::Mmap(format!("region at {start:#x} overflows")))?;
        regions.push(region);
        file_offset += len;
    }
    let memory =
        GuestMemoryMmap::from_regions(regions).map_err(|err| MemoryError::Mmap(err.to_string()))?;
    Ok(GuestRam {
        memory,
        backing_page_size,
    })
}

/// What the kernel is told about RAM: transparent huge pages or not (`thp`), and
/// whether KSM may merge its pages (`mergeable`).
fn advise(
    mapping: &vm_memory::mmap::MmapRegion,
    config: &MemoryConfig,
    base_pages: bool,
) -> Result<(), MemoryError> {
    let mut advice = Vec::new();
    // RAM in base pages, shared RAM's memfd included (shmem takes the advice where
    // `shmem_enabled` is `advise`), as Cloud Hypervisor advises it; hugetlbfs RAM has its own.
    if base_pages {
        advice.push(if config.thp {
            libc::MADV_HUGEPAGE
        } else {
            libc::MADV_NOHUGEPAGE
        });
    }
    if config.mergeable {
        advice.push(libc::MADV_MERGEABLE);
    }
    for advice in advice {
        // SAFETY: the range is the mapping `mapping` owns; madvise changes only how the kernel
        // backs it, not its contents or its validity.
        let ret = unsafe { libc::madvise(mapping.as_ptr().cast(), mapping.size(), advice) };
        if ret != 0 {
            let err = io::Error::last_os_error();
            // A kernel without THP or KSM refuses the advice: the RAM works all the same.
            if err.raw_os_error() != Some(libc::EINVAL) {
                return Err(MemoryError::Mmap(format!("madvise: {err}")));
            }
            log::info!("memory: the kernel does not take madvise({advice}): {err}");
        }
    }
    Ok(())
}

fn host_page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as u64 }
}

/// Opens `path` as RAM backing: a directory gets a fresh unlinked file inside it.
fn open_backing_file(path: &Path, size: u64) -> Result<File, MemoryError> {
    let open_error = |source| MemoryError::OpenBacking {
        path: path.to_path_buf(),
        source,
    };
    let file = if path.is_dir() {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .mode(0o600)
            .open(path)
            .map_err(open_error)?
    } else {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(open_error)?
    };
    let current = file.metadata().map_err(open_error)?.len();
    if current < size {
        if let Some(page_size) = hugetlbfs_page_size(&file) {
            if !size.is_multiple_of(page_size) {
                return Err(MemoryError::Unaligned { size, page_size });
            }
        }
        file.set_len(size)
            .map_err(|source| MemoryError::SizeBacking { size, source })?;
    }
    Ok(file)
}

/// The huge page size of the hugetlbfs holding `file`, or `None` for other filesystems.
fn hugetlbfs_page_size(file: &File) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: fstatfs writes a statfs into the buffer we own and reports failure by its return.
    let ret = unsafe { libc::fstatfs(file.as_raw_fd(), stat.as_mut_ptr()) };
    if ret != 0 {
        return None;
    }
    // SAFETY: fstatfs succeeded, so the structure is initialised.
    let stat = unsafe { stat.assume_init() };
    (stat.f_type == HUGETLBFS_MAGIC).then_some(stat.f_bsize as u64)
}

fn default_hugepage_size() -> io::Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix("Hugepagesize:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib << 10)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::Unsupported,
                "no Hugepagesize in /proc/meminfo",
            )
        })
}

/// Fails early, with the remedy, when the host has not reserved enough huge pages; otherwise
/// the guest would die of SIGBUS at its first touch of an unbacked page.
fn check_hugepages_free(size: u64, page_size: u64) -> Result<(), MemoryError> {
    if !size.is_multiple_of(page_size) {
        return Err(MemoryError::Unaligned { size, page_size });
    }
    let needed = size / page_size;
    let path = format!(
        "/sys/kernel/mm/hugepages/hugepages-{}kB/free_hugepages",
        page_size >> 10
    );
    let free = std::fs::read_to_string(&path)
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .unwrap_or(0);
    if free < needed {
        return Err(MemoryError::HugepagesNotReserved {
            needed,
            free,
            page_size,
        });
    }
    Ok(())
}

/// An anonymous file of `size` bytes to back RAM (`MFD_HUGETLB` in `flags` for huge pages).
fn create_memfd(size: u64, flags: libc::c_uint) -> Result<File, MemoryError> {
    let name = CString::new("warden-ram").expect("no interior NUL");
    // SAFETY: memfd_create takes a valid C string and flags; the fd it returns is owned below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | flags) };
    if fd < 0 {
        let err = io::Error::last_os_error();
        return Err(if flags & libc::MFD_HUGETLB != 0 {
            MemoryError::NoHugepages(err)
        } else {
            MemoryError::Mmap(format!("memfd_create: {err}"))
        });
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|source| MemoryError::SizeBacking { size, source })?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    fn anonymous(size: u64) -> MemoryConfig {
        MemoryConfig {
            size,
            ..Default::default()
        }
    }

    #[test]
    fn anonymous_ram_is_usable() {
        let ram = create_guest_ram(&anonymous(128 << 20)).unwrap();
        ram.memory
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            ram.memory.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        assert_eq!(ram.memory.last_addr(), GuestAddress((128 << 20) - 1));
    }

    /// The `VmFlags` of the mapping that starts at `address` (`/proc/self/smaps`).
    fn vm_flags(address: u64) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let start = format!("{address:x}-");
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&start));
        lines
            .find_map(|l| l.strip_prefix("VmFlags:"))
            .unwrap_or_else(|| panic!("no mapping at {address:#x}"))
            .to_string()
    }

    #[test]
    fn shared_ram_is_advised_as_anonymous_ram_is() {
        for shared in [false, true] {
            let config = MemoryConfig {
                shared,
                ..anonymous(64 << 20)
            };
            let ram = create_guest_ram(&config).unwrap();
            let region = ram.memory.iter().next().unwrap();
            let host = region.as_ptr() as u64;
            let flags = vm_flags(host);
            assert!(flags.contains(" hg"), "shared={shared}: {flags}");
        }
    }

    #[test]
    fn a_directory_gets_an_unlinked_backing_file() {
        let dir = std::env::temp_dir();
        let config = MemoryConfig {
            size: 64 << 20,
            file: Some(dir),
            shared: true,
            ..Default::default()
        };
        let ram = create_guest_ram(&config).unwrap();
        ram.memory.write_obj(7u8, GuestAddress(0)).unwrap();
        assert_eq!(ram.memory.read_obj::<u8>(GuestAddress(0)).unwrap(), 7);
    }

    #[test]
    fn a_missing_backing_directory_is_named() {
        let config = MemoryConfig {
            size: 64 << 20,
            file: Some("/nonexistent/dir/ram".into()),
            ..Default::default()
        };
        let err = create_guest_ram(&config).err().unwrap().to_string();
        assert!(
            err.starts_with("memory: cannot open file /nonexistent/dir/ram"),
            "{err}"
        );
    }
}
