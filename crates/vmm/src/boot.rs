//! Loading the guest kernel and describing the machine to it, through `linux-loader`.
//!
//! An ELF `vmlinux` with a PVH note starts at its PVH entry in 32-bit protected mode with an
//! `hvm_start_info`; any other ELF `vmlinux` and every bzImage start at their 64-bit entry with
//! a Linux zero page, as the x86 boot protocol describes.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{self, BzImage, KernelLoader};
use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, ReadVolatile,
};

use crate::layout;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const PVH_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// Offset of the 64-bit entry point (`startup_64`) in a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("payload.kernel: cannot open {path}: {source}")]
    OpenKernel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("payload.kernel: {path} is neither an ELF vmlinux nor a bzImage ({elf}; {bzimage})")]
    UnknownKernelFormat {
        path: PathBuf,
        elf: loader::Error,
        bzimage: loader::Error,
    },
    #[error("payload.initramfs: cannot open {path}: {source}")]
    OpenInitramfs {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("payload.initramfs: {path} ({size} bytes) does not fit in guest RAM below {limit:#x}; give more memory")]
    InitramfsTooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("payload.initramfs: cannot copy {path} into guest RAM: {reason}")]
    LoadInitramfs { path: PathBuf, reason: String },
    #[error("payload.cmdline: {0}")]
    Cmdline(String),
    #[error("cannot write boot parameters: {0}")]
    BootParams(String),
}

/// Where and how the boot vCPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// 64-bit long mode at `entry`, `rsi` pointing at the zero page.
    Linux64 { entry: GuestAddress },
    /// 32-bit protected mode at `entry`, `rbx` pointing at the `hvm_start_info`.
    Pvh { entry: GuestAddress },
}

/// What the boot code needs to know about the machine besides RAM.
pub struct BootInfo<'a> {
    pub kernel: &'a Path,
    pub initramfs: Option<&'a Path>,
    pub cmdline: &'a str,
    pub rsdp: GuestAddress,
}

/// Loads kernel, initramfs and command line, and writes the boot protocol's structures.
pub fn load_kernel(mem: &GuestMemoryMmap, info: &BootInfo) -> Result<EntryPoint, BootError> {
    let mut kernel = File::open(info.kernel).map_err(|source| BootError::OpenKernel {
        path: info.kernel.to_path_buf(),
        source,
    })?;
    let high_mem = Some(GuestAddress(layout::HIGH_RAM_START));
    let (loaded, is_bzimage) = match Elf::load(mem, None, &mut kernel, high_mem) {
        Ok(loaded) => (loaded, false),
        Err(elf) => {
            kernel
                .seek(SeekFrom::Start(0))
                .map_err(|source| BootError::OpenKernel {
                    path: info.kernel.to_path_buf(),
                    source,
                })?;
            match BzImage::load(mem, None, &mut kernel, high_mem) {
                Ok(loaded) => (loaded, true),
                Err(bzimage) => {
                    return Err(BootError::UnknownKernelFormat {
                        path: info.kernel.to_path_buf(),
                        elf,
                        bzimage,
                    })
                }
            }
        }
    };

    let cmdline = write_cmdline(mem, info.cmdline)?;
    write_reset_vector(mem)?;
    let initrd_limit = loaded
        .setup_header
        .filter(|_| is_bzimage)
        .map_or(u64::from(u32::MAX), |hdr| u64::from(hdr.initrd_addr_max));
    let initramfs = info
        .initramfs
        .map(|path| load_initramfs(mem, path, initrd_limit))
        .transpose()?;
    let e820 = e820_map(mem);

    if let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap {
        write_pvh_start_info(mem, &e820, initramfs, info.rsdp)?;
        return Ok(EntryPoint::Pvh { entry });
    }

    let mut params = boot_params::default();
    match loaded.setup_header.filter(|_| is_bzimage) {
        Some(hdr) => params.hdr = hdr,
        None => {
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
        }
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline.len() as u32;
    if let Some((start, size)) = initramfs {
        params.hdr.ramdisk_image = start.raw_value() as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = info.rsdp.raw_value();
    for (index, &(addr, size, type_)) in e820.iter().enumerate() {
        params.e820_table[index] = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(layout::ZERO_PAGE_START)),
        mem,
    )
    .map_err(|err| BootError::BootParams(err.to_string()))?;

    let entry = if is_bzimage {
        loaded.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET)
    } else {
        loaded.kernel_load
    };
    Ok(EntryPoint::Linux64 { entry })
}

/// Puts a three-instruction stand-in for firmware at the reset vector: it writes the ACPI reset
/// register and halts.
///
/// Linux on x86_64 can reboot "through the BIOS" (`reboot=b`, which Debian's 6.12 kernel picks
/// here for panics and `reboot`): it drops to real mode and jumps to the reset vector. Without
/// code there the vCPU would run through zeroed memory forever instead of stopping the VM.
pub fn write_reset_vector(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let port = layout::ACPI_RESET_PORT.to_le_bytes();
    let stub = [
        0xba,
        port[0],
        port[1], // mov dx, ACPI_RESET_PORT
        0xb0,
        layout::ACPI_RESET_VALUE, // mov al, ACPI_RESET_VALUE
        0xee,                     // out dx, al
        0xf4,                     // hlt
    ];
    vm_memory::Bytes::write_slice(mem, &stub, GuestAddress(layout::RESET_VECTOR))
        .map_err(|err| BootError::BootParams(format!("reset vector: {err}")))
}

fn write_cmdline(mem: &GuestMemoryMmap, text: &str) -> Result<String, BootError> {
    let mut cmdline = Cmdline::new(layout::CMDLINE_MAX_SIZE)
        .map_err(|err| BootError::Cmdline(err.to_string()))?;
    cmdline
        .insert_str(text)
        .map_err(|err| BootError::Cmdline(err.to_string()))?;
    loader::load_cmdline(mem, GuestAddress(layout::CMDLINE_START), &cmdline)
        .map_err(|err| BootError::Cmdline(err.to_string()))?;
    Ok(text.to_string())
}

/// Copies the initramfs to the top of low RAM (below `limit`), page-aligned, where it cannot
/// collide with a kernel loaded at 1 MiB.
fn load_initramfs(
    mem: &GuestMemoryMmap,
    path: &Path,
    limit: u64,
) -> Result<(GuestAddress, u64), BootError> {
    let mut file = File::open(path).map_err(|source| BootError::OpenInitramfs {
        path: path.to_path_buf(),
        source,
    })?;
    let size = file
        .metadata()
        .map_err(|source| BootError::OpenInitramfs {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let low_ram_end = mem
        .iter()
        .next()
        .map_or(0, |region| region.start_addr().raw_value() + region.len());
    let top = low_ram_end.min(limit.saturating_add(1));
    let start = top
        .checked_sub(size)
        .map(|start| start & !0xfff)
        .filter(|&start| start >= layout::HIGH_RAM_START + (16 << 20))
        .ok_or_else(|| BootError::InitramfsTooLarge {
            path: path.to_path_buf(),
            size,
            limit: top,
        })?;
    let load_error = |reason: String| BootError::LoadInitramfs {
        path: path.to_path_buf(),
        reason,
    };
    let mut slice = mem
        .get_slice(GuestAddress(start), size as usize)
        .map_err(|err| load_error(err.to_string()))?;
    file.read_exact_volatile(&mut slice)
        .map_err(|err| load_error(err.to_string()))?;
    Ok((GuestAddress(start), size))
}

/// The guest's memory map: RAM regions with the legacy BIOS area and the ECAM window reserved
/// (Linux only trusts the MCFG table when its ECAM range is reserved).
fn e820_map(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, layout::EBDA_START, E820_RAM),
        (
            layout::EBDA_START,
            layout::HIGH_RAM_START - layout::EBDA_START,
            E820_RESERVED,
        ),
    ];
    for region in mem.iter() {
        let start = region.start_addr().raw_value();
        let end = start + region.len();
        let start = start.max(layout::HIGH_RAM_START);
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map.push((
        layout::PCI_ECAM_START,
        layout::PCI_ECAM_AREA_SIZE,
        E820_RESERVED,
    ));
    map.sort_unstable();
    map
}

fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    e820: &[(u64, u64, u32)],
    initramfs: Option<(GuestAddress, u64)>,
    rsdp: GuestAddress,
) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|&(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    let mut start_info = hvm_start_info {
        magic: PVH_START_MAGIC,
        version: 1,
        cmdline_paddr: layout::CMDLINE_START,
        rsdp_paddr: rsdp.raw_value(),
        memmap_paddr: layout::PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(layout::PVH_INFO_START));
    if let Some((start, size)) = initramfs {
        start_info.nr_modules = 1;
        start_info.modlist_paddr = layout::PVH_MODLIST_START;
        params = BootParams::new(&start_info, GuestAddress(layout::PVH_INFO_START));
        params.set_modules(
            &[hvm_modlist_entry {
                paddr: start.raw_value(),
                size,
                ..Default::default()
            }],
            GuestAddress(layout::PVH_MODLIST_START),
        );
    }
    params.set_sections(&memmap, GuestAddress(layout::PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(|err| BootError::BootParams(err.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(
            &layout::ram_regions(size)
                .into_iter()
                .map(|(start, len)| (GuestAddress(start), len as usize))
                .collect::<Vec<_>>(),
        )
        .unwrap()
    }

    #[test]
    fn the_reset_vector_writes_the_acpi_reset_register() {
        let mem = ram(128 << 20);
        write_reset_vector(&mem).unwrap();
        let mut code = [0u8; 7];
        vm_memory::Bytes::read_slice(&mem, &mut code, GuestAddress(layout::RESET_VECTOR)).unwrap();
        assert_eq!(
            code,
            [0xba, 0xc2, 0x03, 0xb0, layout::ACPI_RESET_VALUE, 0xee, 0xf4]
        );
        let reserved = e820_map(&mem).into_iter().any(|(start, len, kind)| {
            kind == E820_RESERVED
                && start <= layout::RESET_VECTOR
                && layout::RESET_VECTOR + 16 <= start + len
        });
        assert!(reserved, "the guest must not reuse the reset vector's page");
    }

    #[test]
    fn e820_reserves_bios_area_and_ecam() {
        let map = e820_map(&ram(256 << 20));
        assert_eq!(
            map,
            vec![
                (0, layout::EBDA_START, E820_RAM),
                (
                    layout::EBDA_START,
                    0x100000 - layout::EBDA_START,
                    E820_RESERVED
                ),
                (0x100000, (256 << 20) - 0x100000, E820_RAM),
                (
                    layout::PCI_ECAM_START,
                    layout::PCI_ECAM_AREA_SIZE,
                    E820_RESERVED
                ),
            ]
        );
    }

    #[test]
    fn garbage_kernel_is_refused_with_the_option_name() {
        let mem = ram(128 << 20);
        let file = vmm_sys_util::tempfile::TempFile::new().unwrap();
        std::fs::write(file.as_path(), b"not a kernel at all").unwrap();
        let info = BootInfo {
            kernel: file.as_path(),
            initramfs: None,
            cmdline: "console=ttyS0",
            rsdp: GuestAddress(layout::ACPI_START),
        };
        let err = load_kernel(&mem, &info).unwrap_err().to_string();
        assert!(err.starts_with("payload.kernel: "), "{err}");
        assert!(
            err.contains("neither an ELF vmlinux nor a bzImage"),
            "{err}"
        );
    }

    #[test]
    fn initramfs_goes_to_the_top_of_low_ram() {
        let mem = ram(128 << 20);
        let file = vmm_sys_util::tempfile::TempFile::new().unwrap();
        std::fs::write(file.as_path(), vec![0x5a; 10_000]).unwrap();
        let (start, size) = load_initramfs(&mem, file.as_path(), u64::from(u32::MAX)).unwrap();
        assert_eq!(size, 10_000);
        assert_eq!(start.raw_value() % 4096, 0);
        assert!(start.raw_value() + size <= 128 << 20);
        assert!(start.raw_value() + size + 4096 > 128 << 20);
        let mut byte = [0u8];
        vm_memory::Bytes::read_slice(&mem, &mut byte, start).unwrap();
        assert_eq!(byte[0], 0x5a);
    }
}
