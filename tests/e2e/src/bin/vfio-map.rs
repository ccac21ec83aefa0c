//! Guest tool for the mapping-cost measurement: maps one buffer for DMA by a device bound to
//! vfio-pci, the way a user-space driver would, and keeps it mapped.
//!
//! `vfio-map SYSFS_DEVICE_PATH 4k|4k-fragmented|2m MIB`: opens the device's group in a fresh
//! type1 container, allocates MIB MiB from 4 KiB pages (transparent huge pages refused) or from
//! 2 MiB hugetlb pages, maps it with one `VFIO_IOMMU_MAP_DMA`, prints
//! `VFIO-MAP-<MODE>=mapped ms=<time>`, creates `/tmp/vfio-map.done` and then sleeps holding the
//! mapping.
//!
//! The type1 driver sends the IOMMU one mapping per *physically contiguous* run of the buffer,
//! so with 4 KiB pages the count depends on how fragmented the guest's free memory is: a fresh
//! guest hands out long contiguous runs. `4k-fragmented` reproduces a long-running guest's
//! memory: each buffer page is faulted in alternately with a page of a spacer buffer that is
//! then freed, so that no two buffer pages are physically adjacent.

use std::ffi::CString;
use std::fs;
use std::os::raw::c_ulong;
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

const VFIO_TYPE: c_ulong = b';' as c_ulong;
const VFIO_BASE: c_ulong = 100;
const fn io(nr: c_ulong) -> c_ulong {
    (VFIO_TYPE << 8) | (VFIO_BASE + nr)
}
const VFIO_GET_API_VERSION: c_ulong = io(0);
const VFIO_SET_IOMMU: c_ulong = io(2);
const VFIO_GROUP_GET_STATUS: c_ulong = io(3);
const VFIO_GROUP_SET_CONTAINER: c_ulong = io(4);
const VFIO_IOMMU_MAP_DMA: c_ulong = io(13);
const VFIO_TYPE1V2_IOMMU: c_ulong = 3;
const VFIO_GROUP_FLAGS_VIABLE: u32 = 1;
/// IOVA of the buffer: clear of the x86 MSI window and of page 0.
const IOVA: u64 = 1 << 30;

#[repr(C)]
struct GroupStatus {
    argsz: u32,
    flags: u32,
}

#[repr(C)]
struct DmaMap {
    argsz: u32,
    flags: u32,
    vaddr: u64,
    iova: u64,
    size: u64,
}

fn open(path: &str) -> Result<i32, String> {
    let c = CString::new(path).unwrap();
    // SAFETY: a valid C string; the descriptor is kept for the process's life.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR) };
    if fd < 0 {
        return Err(format!("open {path}: {}", std::io::Error::last_os_error()));
    }
    Ok(fd)
}

fn check(what: &str, ret: i32) -> Result<i32, String> {
    if ret < 0 {
        return Err(format!("{what}: {}", std::io::Error::last_os_error()));
    }
    Ok(ret)
}

fn run(device: &Path, mode: &str, mib: u64) -> Result<(), String> {
    let group = fs::read_link(device.join("iommu_group"))
        .map_err(|e| format!("{}: no IOMMU group: {e}", device.display()))?;
    let group = group.file_name().unwrap().to_string_lossy().into_owned();
    let container = open("/dev/vfio/vfio")?;
    // SAFETY: plain ioctls on descriptors we own, with argument structures that outlive them.
    unsafe {
        check(
            "VFIO_GET_API_VERSION",
            libc::ioctl(container, VFIO_GET_API_VERSION),
        )?;
        let group_fd = open(&format!("/dev/vfio/{group}"))?;
        let mut status = GroupStatus { argsz: 8, flags: 0 };
        check(
            "VFIO_GROUP_GET_STATUS",
            libc::ioctl(group_fd, VFIO_GROUP_GET_STATUS, &mut status),
        )?;
        if status.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(format!("group {group} is not viable"));
        }
        check(
            "VFIO_GROUP_SET_CONTAINER",
            libc::ioctl(group_fd, VFIO_GROUP_SET_CONTAINER, &container),
        )?;
        check(
            "VFIO_SET_IOMMU",
            libc::ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1V2_IOMMU),
        )?;
    }

    let size = mib << 20;
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    if mode == "2m" {
        flags |= libc::MAP_HUGETLB | (21 << libc::MAP_HUGE_SHIFT) | libc::MAP_POPULATE;
    }
    // SAFETY: a fresh anonymous mapping, only ever touched through the kernel.
    let buffer = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    if buffer == libc::MAP_FAILED {
        return Err(format!(
            "mmap {mib} MiB ({mode}): {} (for 2m, reserve huge pages first)",
            std::io::Error::last_os_error()
        ));
    }
    if mode.starts_with("4k") {
        let spacer = if mode == "4k-fragmented" {
            // SAFETY: a fresh anonymous mapping, freed below.
            let spacer = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    size as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if spacer == libc::MAP_FAILED {
                return Err(format!("mmap spacer: {}", std::io::Error::last_os_error()));
            }
            Some(spacer)
        } else {
            None
        };
        // The guest kernel's transparent huge pages are "always": refuse them before the first
        // touch, so the buffer really is made of 4 KiB pages.
        // SAFETY: the ranges are our mappings; the spacer is unmapped once the buffer is in.
        unsafe {
            for region in std::iter::once(buffer).chain(spacer) {
                check(
                    "madvise",
                    libc::madvise(region, size as usize, libc::MADV_NOHUGEPAGE),
                )?;
            }
            for page in (0..size).step_by(4096) {
                *(buffer as *mut u8).add(page as usize) = 1;
                if let Some(spacer) = spacer {
                    *(spacer as *mut u8).add(page as usize) = 1;
                }
            }
            if let Some(spacer) = spacer {
                libc::munmap(spacer, size as usize);
            }
        }
    }

    let map = DmaMap {
        argsz: std::mem::size_of::<DmaMap>() as u32,
        flags: 3,
        vaddr: buffer as u64,
        iova: IOVA,
        size,
    };
    let start = Instant::now();
    // SAFETY: the buffer stays mapped for the process's life.
    unsafe {
        check(
            "VFIO_IOMMU_MAP_DMA",
            libc::ioctl(container, VFIO_IOMMU_MAP_DMA, &map),
        )?
    };
    let ms = start.elapsed().as_millis();
    println!("VFIO-MAP-{}=mapped ms={ms}", mode.to_uppercase());
    fs::write("/tmp/vfio-map.done", b"").map_err(|e| e.to_string())?;
    loop {
        // SAFETY: pause has no preconditions.
        unsafe { libc::pause() };
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let parsed = match args.as_slice() {
        [_, device, mode, mib] if ["4k", "4k-fragmented", "2m"].contains(&mode.as_str()) => {
            mib.parse::<u64>().ok().map(|mib| (device, mode, mib))
        }
        _ => None,
    };
    let Some((device, mode, mib)) = parsed else {
        eprintln!("usage: vfio-map SYSFS_DEVICE_PATH 4k|4k-fragmented|2m MIB");
        return ExitCode::from(2);
    };
    match run(Path::new(device), mode, mib) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            println!("VFIO-MAP-ERROR={err}");
            ExitCode::FAILURE
        }
    }
}
