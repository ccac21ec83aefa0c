//! The host side of a passed-through device's DMA: a VFIO type1 container, behind the
//! [`DmaContainer`] trait so that the mapper can be tested without VFIO.
//!
//! `vfio-ioctls` opens the container, binds groups and sets the type1 IOMMU; two ioctls it does
//! not wrap the way we need are issued here on its file descriptor:
//! - `VFIO_IOMMU_MAP_DMA`: its `vfio_dma_map` always asks for read *and* write, but a guest
//!   mapping that is read-only must stay read-only for the device, or the device could write
//!   to pages the guest only lent it for reading;
//! - `VFIO_IOMMU_GET_INFO` with capabilities: the page sizes and IOVA ranges the host IOMMU
//!   supports, which bound what the virtio-iommu may advertise to the guest.

use std::io;
use std::mem::size_of;
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    vfio_info_cap_header, vfio_iommu_type1_dma_map, vfio_iommu_type1_info, vfio_iova_range,
    VFIO_BASE, VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE, VFIO_IOMMU_INFO_CAPS,
    VFIO_IOMMU_INFO_PGSIZES, VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, VFIO_TYPE,
};
use vfio_ioctls::VfioContainer;
use virtio_iommu::protocol::VIRTIO_IOMMU_RESV_MEM_T_RESERVED;
use virtio_iommu::{MapPerms, ReservedRegion};
use vmm_sys_util::ioctl::{ioctl_with_mut_ptr, ioctl_with_ref};
use vmm_sys_util::ioctl_io_nr;

ioctl_io_nr!(VFIO_IOMMU_GET_INFO, VFIO_TYPE as u32, VFIO_BASE + 12);
ioctl_io_nr!(VFIO_IOMMU_MAP_DMA, VFIO_TYPE as u32, VFIO_BASE + 13);

/// Where a device's DMA is mapped: IOVA → host virtual address, pinned by the host.
pub trait DmaContainer: Send + Sync {
    /// Maps `size` bytes at `iova` to the host virtual range starting at `vaddr`.
    ///
    /// # Safety
    ///
    /// `vaddr..vaddr + size` must be guest RAM mapped in this process for as long as the
    /// mapping exists: the device reads and writes it by DMA, behind the compiler's back.
    unsafe fn map(&self, iova: u64, size: u64, vaddr: u64, perms: MapPerms) -> io::Result<()>;

    /// Removes the mapping of `size` bytes at `iova`, a range earlier passed to `map`.
    fn unmap(&self, iova: u64, size: u64) -> io::Result<()>;
}

/// What the host IOMMU behind a container supports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostIommuInfo {
    /// Bitmap of the IOMMU page sizes; the lowest set bit is the mapping granule.
    pub page_sizes: u64,
    /// Usable IOVA ranges, inclusive, sorted, and (from [`parse_info`]) disjoint and not
    /// adjacent; the gaps are reserved by the host (e.g. its own MSI doorbell window).
    pub iova_ranges: Vec<(u64, u64)>,
}

impl HostIommuInfo {
    /// What the guest must not map for a device behind this container: the x86 MSI doorbell
    /// plus the gaps between the usable IOVA ranges, since the host IOMMU would refuse them (or
    /// the host's MSI window would shadow them).
    pub fn reserved_regions(&self) -> Vec<ReservedRegion> {
        let mut regions = vec![ReservedRegion::X86_MSI];
        for pair in self.iova_ranges.windows(2) {
            // Checked: the fields are public, so the ranges may not be what parse_info makes.
            let (Some(start), Some(end)) = (pair[0].1.checked_add(1), pair[1].0.checked_sub(1))
            else {
                continue;
            };
            // The host's own MSI window usually is the x86 doorbell, already reserved.
            let msi = start >= ReservedRegion::X86_MSI.start && end <= ReservedRegion::X86_MSI.end;
            if start <= end && !msi {
                regions.push(ReservedRegion {
                    subtype: VIRTIO_IOMMU_RESV_MEM_T_RESERVED,
                    start,
                    end,
                });
            }
        }
        regions
    }
}

/// A VFIO type1 container holding one passed-through device's group.
pub struct HostContainer {
    container: Arc<VfioContainer>,
}

impl HostContainer {
    pub fn new(container: Arc<VfioContainer>) -> Self {
        Self { container }
    }

    /// Asks the host IOMMU what it supports. Valid once a group is in the container (the
    /// IOMMU type is only set then).
    pub fn info(&self) -> io::Result<HostIommuInfo> {
        // First call with the bare structure: the kernel answers with the size it needs for
        // the capability chain in `argsz`.
        let mut info = vfio_iommu_type1_info {
            argsz: size_of::<vfio_iommu_type1_info>() as u32,
            ..Default::default()
        };
        // SAFETY: the kernel writes at most `argsz` bytes into `info`, which is that large.
        let ret = unsafe {
            ioctl_with_mut_ptr(
                self.container.as_ref(),
                VFIO_IOMMU_GET_INFO(),
                &mut info as *mut vfio_iommu_type1_info,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        let needed = (info.argsz as usize).max(size_of::<vfio_iommu_type1_info>());
        // u64 words keep the buffer aligned for the structures inside it.
        let mut buffer = vec![0u64; needed.div_ceil(8)];
        let bytes = buffer.len() * 8;
        // SAFETY: the buffer is at least as large as the structure and aligned for it.
        let head = unsafe { &mut *(buffer.as_mut_ptr() as *mut vfio_iommu_type1_info) };
        head.argsz = bytes as u32;
        // SAFETY: the kernel writes at most `argsz` bytes, the size of the buffer.
        let ret = unsafe {
            ioctl_with_mut_ptr(
                self.container.as_ref(),
                VFIO_IOMMU_GET_INFO(),
                buffer.as_mut_ptr() as *mut vfio_iommu_type1_info,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: u64 words reinterpreted as bytes, within the allocation.
        let raw = unsafe { std::slice::from_raw_parts(buffer.as_ptr() as *const u8, bytes) };
        Ok(parse_info(raw))
    }
}

/// Decodes a `VFIO_IOMMU_GET_INFO` answer (the structure followed by its capability chain).
/// Without an IOVA-range capability (kernels before 5.4) the whole 64-bit space is usable.
pub fn parse_info(raw: &[u8]) -> HostIommuInfo {
    let u32_at = |off: usize| {
        raw.get(off..off + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let u64_at = |off: usize| {
        raw.get(off..off + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    let flags = u32_at(4).unwrap_or(0);
    let page_sizes = if flags & VFIO_IOMMU_INFO_PGSIZES != 0 {
        u64_at(8).unwrap_or(0)
    } else {
        0
    };
    let mut iova_ranges = Vec::new();
    if flags & VFIO_IOMMU_INFO_CAPS != 0 {
        let mut offset = u32_at(16).unwrap_or(0) as usize;
        // Each capability moves forward; a malformed chain cannot loop.
        while offset >= size_of::<vfio_iommu_type1_info>() && offset < raw.len() {
            let id = raw
                .get(offset..offset + 2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]));
            let next = u32_at(offset + 4).unwrap_or(0) as usize;
            if id == Some(VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE as u16) {
                let count = u32_at(offset + size_of::<vfio_info_cap_header>()).unwrap_or(0);
                let first = offset + size_of::<vfio_info_cap_header>() + 8;
                // A count beyond the answer's end stops at the end.
                for i in 0..count as usize {
                    let at = first + i * size_of::<vfio_iova_range>();
                    let (Some(start), Some(end)) = (u64_at(at), u64_at(at + 8)) else {
                        break;
                    };
                    iova_ranges.push((start, end));
                }
            }
            if next <= offset {
                break;
            }
            offset = next;
        }
    }
    HostIommuInfo {
        page_sizes,
        iova_ranges: merged(iova_ranges),
    }
}

/// The host's IOVA ranges sorted, with overlapping and adjacent ones merged and inverted ones
/// dropped, so that the gaps between them are what is really unusable; none at all means
/// the whole space.
fn merged(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.retain(|&(start, end)| start <= end);
    if ranges.is_empty() {
        return vec![(0, u64::MAX)];
    }
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match out.last_mut() {
            Some(last) if start <= last.1.saturating_add(1) => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
    }
    out
}

impl DmaContainer for HostContainer {
    unsafe fn map(&self, iova: u64, size: u64, vaddr: u64, perms: MapPerms) -> io::Result<()> {
        let mut flags = 0;
        if perms.read {
            flags |= VFIO_DMA_MAP_FLAG_READ;
        }
        if perms.write {
            flags |= VFIO_DMA_MAP_FLAG_WRITE;
        }
        let map = vfio_iommu_type1_dma_map {
            argsz: size_of::<vfio_iommu_type1_dma_map>() as u32,
            flags,
            vaddr,
            iova,
            size,
        };
        // SAFETY: the kernel only reads the structure; the caller guarantees the host range.
        let ret = unsafe { ioctl_with_ref(self.container.as_ref(), VFIO_IOMMU_MAP_DMA(), &map) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn unmap(&self, iova: u64, size: u64) -> io::Result<()> {
        let size = usize::try_from(size).map_err(io::Error::other)?;
        self.container
            .vfio_dma_unmap(iova, size)
            .map_err(io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info_bytes(flags: u32, pgsizes: u64, ranges: &[(u64, u64)]) -> Vec<u8> {
        let mut raw = Vec::new();
        raw.extend_from_slice(&0u32.to_le_bytes()); // argsz
        raw.extend_from_slice(&flags.to_le_bytes());
        raw.extend_from_slice(&pgsizes.to_le_bytes());
        raw.extend_from_slice(&24u32.to_le_bytes()); // cap_offset
        raw.extend_from_slice(&0u32.to_le_bytes());
        // An unrelated capability first (migration, id 2), then the IOVA ranges.
        raw.extend_from_slice(&2u16.to_le_bytes());
        raw.extend_from_slice(&1u16.to_le_bytes());
        raw.extend_from_slice(&40u32.to_le_bytes());
        raw.extend_from_slice(&[0; 8]);
        raw.extend_from_slice(&(VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE as u16).to_le_bytes());
        raw.extend_from_slice(&1u16.to_le_bytes());
        raw.extend_from_slice(&0u32.to_le_bytes());
        raw.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
        raw.extend_from_slice(&0u32.to_le_bytes());
        for (start, end) in ranges {
            raw.extend_from_slice(&start.to_le_bytes());
            raw.extend_from_slice(&end.to_le_bytes());
        }
        raw
    }

    #[test]
    fn info_with_iova_ranges() {
        // What an emulated Intel IOMMU with 39 address bits reports.
        let raw = info_bytes(
            VFIO_IOMMU_INFO_PGSIZES | VFIO_IOMMU_INFO_CAPS,
            0x4020_1000,
            &[(0xfef0_0000, 0x7f_ffff_ffff), (0, 0xfedf_ffff)],
        );
        let info = parse_info(&raw);
        assert_eq!(info.page_sizes, 0x4020_1000);
        assert_eq!(
            info.iova_ranges,
            [(0, 0xfedf_ffff), (0xfef0_0000, 0x7f_ffff_ffff)]
        );
    }

    /// Overlapping, adjacent and inverted ranges from the host: merged, so the gaps (the
    /// reserved regions) are only what no range covers, and computing them cannot overflow.
    #[test]
    fn overlapping_host_iova_ranges_are_merged() {
        let raw = info_bytes(
            VFIO_IOMMU_INFO_CAPS,
            0,
            &[(0, 0x2000), (0x1000, u64::MAX), (0x1000, 0x3000), (9, 8)],
        );
        let info = parse_info(&raw);
        assert_eq!(info.iova_ranges, [(0, u64::MAX)]);
        assert_eq!(info.reserved_regions(), [ReservedRegion::X86_MSI]);

        let raw = info_bytes(
            VFIO_IOMMU_INFO_CAPS,
            0,
            &[
                (0x1_0000, 0x1_ffff),
                (0, 0xffff),
                (0x4_0000, 0x5_0000),
                (0x4_8000, 0x4_9000),
            ],
        );
        let info = parse_info(&raw);
        assert_eq!(info.iova_ranges, [(0, 0x1_ffff), (0x4_0000, 0x5_0000)]);
        assert_eq!(
            info.reserved_regions(),
            [
                ReservedRegion::X86_MSI,
                ReservedRegion {
                    subtype: VIRTIO_IOMMU_RESV_MEM_T_RESERVED,
                    start: 0x2_0000,
                    end: 0x3_ffff,
                }
            ]
        );
        // Unnormalised ranges built by hand do not overflow either.
        let info = HostIommuInfo {
            page_sizes: 0,
            iova_ranges: vec![(0, u64::MAX), (0, 0x1000)],
        };
        assert_eq!(info.reserved_regions(), [ReservedRegion::X86_MSI]);
    }

    /// A host whose MSI window is the x86 doorbell: nothing reserved beyond the doorbell.
    #[test]
    fn the_host_msi_window_is_the_doorbell() {
        let raw = info_bytes(
            VFIO_IOMMU_INFO_CAPS,
            0,
            &[(0, 0xfedf_ffff), (0xfef0_0000, 0x7f_ffff_ffff)],
        );
        assert_eq!(
            parse_info(&raw).reserved_regions(),
            [ReservedRegion::X86_MSI]
        );
    }

    /// A range count far beyond the answer stops at its end.
    #[test]
    fn an_iova_range_count_beyond_the_answer() {
        let mut raw = info_bytes(VFIO_IOMMU_INFO_CAPS, 0, &[(0x1000, 0x1fff)]);
        raw[40 + 8..40 + 12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(parse_info(&raw).iova_ranges, [(0x1000, 0x1fff)]);
    }

    #[test]
    fn info_without_capabilities_allows_everything() {
        let raw = info_bytes(VFIO_IOMMU_INFO_PGSIZES, 0x1000, &[]);
        let info = parse_info(&raw[..24]);
        assert_eq!(info.page_sizes, 0x1000);
        assert_eq!(info.iova_ranges, [(0, u64::MAX)]);
    }
}
