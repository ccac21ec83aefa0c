//! The guest-physical address map of an x86_64 warden machine.
//!
//! Low RAM runs from 0 up to the 32-bit hole at 3 GiB; the hole holds the 32-bit PCI window, the
//! ECAM region, the IOAPIC and the LAPIC; RAM beyond 3 GiB continues at 4 GiB; the 64-bit PCI
//! window sits above the end of RAM.

use std::ops::Range;

/// Where the boot GDT lives (four 8-byte entries).
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT right after the GDT: interrupts stay off until the kernel installs its own.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, then its module list and memory map.
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MODLIST_START: u64 = 0x6040;
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// The Linux boot protocol's zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack for the 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables covering the first GiB with 2 MiB pages.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Start of the extended BIOS data area: RAM below it is usable by the guest.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables, RSDP first, in the legacy BIOS area where Linux also scans for the RSDP.
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = 0x100000;
/// The x86 reset vector, where a CPU leaving for "the BIOS" resumes (real mode, 0xF000:0xFFF0).
pub const RESET_VECTOR: u64 = 0xffff0;
/// Where protected-mode kernels are loaded.
pub const HIGH_RAM_START: u64 = 0x100000;

/// Start of the 32-bit hole; low RAM ends here at the latest.
pub const MEM_32BIT_HOLE_START: u64 = 0xc000_0000;
/// The 32-bit PCI MMIO window, for BARs that must stay below 4 GiB.
pub const PCI_MMIO32_START: u64 = 0xc000_0000;
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// PCI Express enhanced configuration (ECAM): bus 0 of each PCI segment, segment `n`'s at
/// `PCI_ECAM_START + n MiB`; the area for every segment a machine may have is reserved.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 1 << 20;
pub const PCI_ECAM_AREA_SIZE: u64 = (vm_config::MAX_PCI_SEGMENTS as u64) * PCI_ECAM_SIZE;
/// In-kernel IOAPIC and LAPIC.
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;
/// KVM needs three pages for the real-mode TSS and one for the identity map, in the hole.
pub const KVM_IDENTITY_MAP_START: u64 = 0xfffb_c000;
pub const KVM_TSS_START: u64 = 0xfffb_d000;
/// RAM beyond the hole continues here.
pub const RAM_64BIT_START: u64 = 0x1_0000_0000;
/// Size of the 64-bit PCI window placed after the end of RAM.
pub const PCI_MMIO64_SIZE: u64 = 64 << 30;

/// The x86 MSI doorbell: writes here are interrupts, never DMA.
pub const MSI_DOORBELL_START: u64 = 0xfee0_0000;
pub const MSI_DOORBELL_END: u64 = 0xfeef_ffff;

/// The PCI I/O port window, above every legacy port, for I/O BARs (virtio notifications).
pub const PCI_IO_START: u32 = 0x1000;
pub const PCI_IO_END: u32 = 0x1_0000;

/// Legacy I/O ports.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const PCI_CONFIG_PORT: u16 = 0xcf8;
pub const PCI_CONFIG_PORT_SIZE: u16 = 8;
pub const RTC_PORT: u16 = 0x70;
pub const I8042_PORT: u16 = 0x60;
/// ACPI hardware-reduced sleep control and status registers (one byte each).
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x3c0;
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x3c1;
/// ACPI reset register, and the value that resets.
pub const ACPI_RESET_PORT: u16 = 0x3c2;
pub const ACPI_RESET_VALUE: u8 = 0x0e;
/// The Generic Event Device's event register (one byte) and interrupt: the power button.
pub const GED_PORT: u16 = 0x3c3;
pub const GED_IRQ: u32 = 5;
/// The PCI hotplug controllers' registers (`acpi::PCI_HOTPLUG_PORTS` ports each): segment
/// 0's beside the ACPI registers, the other segments' 16 ports apart in a free block below the
/// PCI I/O window.
pub const PCI_HOTPLUG_PORT: u16 = 0x3d0;
const PCI_HOTPLUG_PORTS_OTHER_SEGMENTS: u16 = 0x0b00;

/// Segment `segment`'s PCI hotplug controller.
pub fn pci_hotplug_port(segment: u16) -> u16 {
    match segment {
        0 => PCI_HOTPLUG_PORT,
        _ => PCI_HOTPLUG_PORTS_OTHER_SEGMENTS + 16 * (segment - 1),
    }
}

/// First GSI handed to MSI vectors; 0..24 are the IOAPIC pins.
pub const MSI_GSI_BASE: u32 = 24;
pub const IOAPIC_PINS: u32 = 24;

/// The RAM regions for `size` bytes of guest memory: below the hole, then above 4 GiB.
pub fn ram_regions(size: u64) -> Vec<(u64, u64)> {
    let low = size.min(MEM_32BIT_HOLE_START);
    let mut regions = vec![(0, low)];
    if size > low {
        regions.push((RAM_64BIT_START, size - low));
    }
    regions
}

/// Where one PCI segment's host bridge decodes: its ECAM MiB and its share of the windows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentWindows {
    pub ecam: u64,
    pub mmio32: Range<u64>,
    pub mmio64: Range<u64>,
    pub io: Range<u32>,
}

/// Segment `segment` of `segments` (at most `vm_config::MAX_PCI_SEGMENTS`) in a guest with
/// `ram_size` bytes of RAM: the 32-bit window, the 64-bit window and the I/O ports shared
/// equally, as Cloud Hypervisor shares its windows by default (in 1 MiB, 1 GiB and 256-port
/// units; the last segment takes what rounding leaves). Every segment gets I/O ports: virtio
/// queue notifications are in I/O BARs.
pub fn segment_windows(ram_size: u64, segment: u16, segments: u16) -> SegmentWindows {
    fn share(range: Range<u64>, unit: u64, index: u64, count: u64) -> Range<u64> {
        let each = (range.end - range.start) / count / unit * unit;
        let start = range.start + index * each;
        let end = if index + 1 == count {
            range.end
        } else {
            start + each
        };
        start..end
    }
    let (index, count) = (u64::from(segment), u64::from(segments.max(1)));
    let mmio64_start = pci_mmio64_start(ram_size);
    let io = share(
        u64::from(PCI_IO_START)..u64::from(PCI_IO_END),
        0x100,
        index,
        count,
    );
    SegmentWindows {
        ecam: PCI_ECAM_START + index * PCI_ECAM_SIZE,
        mmio32: share(
            PCI_MMIO32_START..PCI_MMIO32_START + PCI_MMIO32_SIZE,
            1 << 20,
            index,
            count,
        ),
        mmio64: share(
            mmio64_start..mmio64_start + PCI_MMIO64_SIZE,
            1 << 30,
            index,
            count,
        ),
        // Below 0x10000.
        io: io.start as u32..io.end as u32,
    }
}

/// The 64-bit PCI window for a guest with `ram_size` bytes of RAM: 1 GiB-aligned past its end.
pub fn pci_mmio64_start(ram_size: u64) -> u64 {
    let ram_end = ram_regions(ram_size)
        .last()
        .map_or(0, |&(start, len)| start + len);
    ram_end.max(RAM_64BIT_START).next_multiple_of(1 << 30)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guests_fit_below_the_hole() {
        assert_eq!(ram_regions(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(pci_mmio64_start(512 << 20), RAM_64BIT_START);
    }

    #[test]
    fn segments_share_the_windows_without_overlap_and_cover_them() {
        let one = segment_windows(512 << 20, 0, 1);
        assert_eq!(one.ecam, PCI_ECAM_START);
        assert_eq!(
            one.mmio32,
            PCI_MMIO32_START..PCI_MMIO32_START + PCI_MMIO32_SIZE
        );
        assert_eq!(one.io, PCI_IO_START..PCI_IO_END);
        for count in [2u16, 3, vm_config::MAX_PCI_SEGMENTS] {
            let all: Vec<SegmentWindows> = (0..count)
                .map(|s| segment_windows(8 << 30, s, count))
                .collect();
            for pair in all.windows(2) {
                assert_eq!(pair[0].mmio32.end, pair[1].mmio32.start);
                assert_eq!(pair[0].mmio64.end, pair[1].mmio64.start);
                assert_eq!(pair[0].io.end, pair[1].io.start);
                assert_eq!(pair[0].ecam + PCI_ECAM_SIZE, pair[1].ecam);
            }
            let last = all.last().unwrap();
            assert_eq!(last.mmio32.end, PCI_MMIO32_START + PCI_MMIO32_SIZE);
            assert_eq!(last.io.end, PCI_IO_END);
            assert!(last.ecam + PCI_ECAM_SIZE <= PCI_ECAM_START + PCI_ECAM_AREA_SIZE);
            assert!(all.iter().all(|w| !w.mmio32.is_empty() && !w.io.is_empty()));
            assert!(all
                .iter()
                .all(|w| w.mmio64.start >= pci_mmio64_start(8 << 30)));
        }
    }

    #[test]
    fn every_segments_hotplug_registers_have_ports_of_their_own() {
        let ports: Vec<std::ops::Range<u16>> = (0..vm_config::MAX_PCI_SEGMENTS)
            .map(|s| pci_hotplug_port(s)..pci_hotplug_port(s) + acpi::PCI_HOTPLUG_PORTS)
            .collect();
        for (i, a) in ports.iter().enumerate() {
            assert!(
                a.end as u32 <= PCI_IO_START,
                "{a:#x?} below the PCI I/O window"
            );
            let fixed = [
                COM1_PORT..COM1_PORT + 8,
                PCI_CONFIG_PORT..PCI_CONFIG_PORT + 8,
            ];
            for b in ports[..i].iter().chain(&fixed) {
                assert!(a.end <= b.start || b.end <= a.start, "{a:#x?} and {b:#x?}");
            }
        }
    }

    #[test]
    fn large_guests_continue_above_4g() {
        let regions = ram_regions(8 << 30);
        assert_eq!(regions, vec![(0, 3 << 30), (RAM_64BIT_START, 5 << 30)]);
        assert_eq!(pci_mmio64_start(8 << 30), 9 << 30);
    }
}
