//! Byte-level checks of the tables against the ACPI 6.5 layouts.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::fadt::{
    BOOT_ARCH_8042, BOOT_ARCH_CMOS_RTC_NOT_PRESENT, BOOT_ARCH_PCIE_ASPM_CONTROLS,
    BOOT_ARCH_VGA_NOT_PRESENT, HYPERVISOR_VENDOR_ID,
};

const RSDP_AT: GuestAddress = GuestAddress(0xE_0000);

fn layout() -> AcpiLayout {
    AcpiLayout {
        cpus: 3,
        ioapic: IoApic {
            id: 4,
            address: 0xFEC0_0000,
            gsi_base: 0,
        },
        lapic_address: 0xFEE0_0000,
        segments: vec![PciSegment {
            ecam: Ecam {
                base: 0xE000_0000,
                segment: 0,
                bus_start: 0,
                bus_end: 0,
            },
            mmio32: 0xC000_0000..0xE000_0000,
            mmio64: 0x1_0000_0000..0x11_0000_0000,
            pci_io: Some(0x1000..0x1_0000),
            hotplug: None,
        }],
        serial: Some(Serial {
            port: 0x3F8,
            irq: 4,
        }),
        sleep: SleepRegisters {
            control_port: 0x3C0,
            status_port: 0x3C1,
        },
        reset: Some(ResetRegister {
            port: 0x3C2,
            value: 0x0E,
        }),
        events: Some(GenericEvents {
            port: 0x3c3,
            irq: 5,
        }),
        i8042: false,
        iommu: Some(Viot {
            iommu: PciBdf::new(0, 0, 3, 0),
            protected: vec![PciBdf::new(0, 0, 4, 0), PciBdf::new(0, 0, 5, 0)],
            protected_slots: vec![],
        }),
    }
}

/// A layout with a second segment whose buses, IOMMU BDF and protected BDFs are all
/// different non-zero numbers, so a field written at the wrong offset shows. The windows are
/// split between the two segments.
fn segment1_layout() -> AcpiLayout {
    let mut l = layout();
    l.segments[0].mmio32 = 0xC000_0000..0xD000_0000;
    l.segments[0].mmio64 = 0x1_0000_0000..0x9_0000_0000;
    l.segments[0].pci_io = Some(0x1000..0x8000);
    l.segments.push(PciSegment {
        ecam: Ecam {
            base: 0xE010_0000,
            segment: 1,
            bus_start: 0,
            bus_end: 1,
        },
        mmio32: 0xD000_0000..0xE000_0000,
        mmio64: 0x9_0000_0000..0x11_0000_0000,
        pci_io: Some(0x8000..0x1_0000),
        hotplug: None,
    });
    l.iommu = Some(Viot {
        iommu: PciBdf::new(1, 0, 3, 0),
        protected: vec![
            PciBdf::new(1, 1, 0, 1),
            PciBdf::new(1, 0, 5, 0),
            PciBdf::new(1, 1, 0, 0),
            PciBdf::new(1, 0, 4, 0),
        ],
        protected_slots: vec![],
    });
    l
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}
fn byte_sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |acc, x| acc.wrapping_add(*x))
}

fn table<'a>(tables: &'a [AcpiTable], name: &str) -> &'a AcpiTable {
    tables
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no {name} table"))
}

/// Checks the standard header and checksum of a system description table.
fn check_sdt(name: &str, bytes: &[u8]) {
    assert_eq!(&bytes[0..4], name.as_bytes(), "signature");
    assert_eq!(u32_at(bytes, 4) as usize, bytes.len(), "{name} length");
    assert_eq!(byte_sum(bytes), 0, "{name} checksum");
    assert_eq!(&bytes[10..16], b"WARDEN", "{name} OEM ID");
}

#[test]
fn every_table_has_a_valid_header_and_checksum() {
    for layout in [layout(), segment1_layout()] {
        let tables = build_tables(&layout, RSDP_AT).unwrap();
        let names: Vec<_> = tables.iter().map(|t| t.name).collect();
        assert_eq!(
            names,
            ["RSDP", "XSDT", "FACP", "DSDT", "APIC", "MCFG", "VIOT"]
        );
        let rsdp = &tables[0].bytes;
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(byte_sum(&rsdp[0..20]), 0, "RSDP ACPI 1.0 checksum");
        assert_eq!(rsdp.len(), 36);
        assert_eq!(u32_at(rsdp, 20), 36, "RSDP length");
        assert_eq!(byte_sum(rsdp), 0, "RSDP extended checksum");
        for t in &tables[1..] {
            check_sdt(t.name, &t.bytes);
            assert_eq!(t.addr.0 % TABLE_ALIGN, 0);
        }
        // Tables do not overlap.
        for pair in tables.windows(2) {
            assert!(pair[0].addr.0 + pair[0].bytes.len() as u64 <= pair[1].addr.0);
        }
    }
}

#[test]
fn no_viot_without_an_iommu() {
    let mut l = layout();
    l.iommu = None;
    let tables = build_tables(&l, RSDP_AT).unwrap();
    assert!(tables.iter().all(|t| t.name != "VIOT"));
    let xsdt = &table(&tables, "XSDT").bytes;
    assert_eq!(xsdt.len(), 36 + 3 * 8);
}

#[test]
fn pointers_resolve_from_the_rsdp_in_guest_memory() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let rsdp_addr = write_tables(&layout(), &mem, RSDP_AT).unwrap();
    assert_eq!(rsdp_addr, RSDP_AT);

    let read = |addr: u64, len: usize| {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    };
    // Reads a whole table given its address, using the length in its header.
    let read_sdt = |addr: u64| {
        let len = u32_at(&read(addr, 8), 4) as usize;
        read(addr, len)
    };

    let rsdp = read(rsdp_addr.0, 36);
    assert_eq!(&rsdp[0..8], b"RSD PTR ");
    assert_eq!(rsdp[15], 2, "RSDP revision (ACPI 2.0+, has an XSDT)");
    assert_eq!(u32_at(&rsdp, 16), 0, "no RSDT");
    let xsdt = read_sdt(u64_at(&rsdp, 24));
    check_sdt("XSDT", &xsdt);

    let mut found = Vec::new();
    for entry in xsdt[36..].chunks(8) {
        let t = read_sdt(u64::from_le_bytes(entry.try_into().unwrap()));
        let sig = std::str::from_utf8(&t[0..4]).unwrap().to_owned();
        check_sdt(&sig, &t);
        if sig == "FACP" {
            assert_eq!(u32_at(&t, 40), 0, "32-bit DSDT pointer unused");
            let dsdt = read_sdt(u64_at(&t, 140));
            check_sdt("DSDT", &dsdt);
            found.push("DSDT".to_owned());
        }
        found.push(sig);
    }
    found.sort();
    assert_eq!(found, ["APIC", "DSDT", "FACP", "MCFG", "VIOT"]);
}

#[test]
fn madt_has_each_cpu_the_ioapic_the_timer_override_and_the_nmi() {
    let tables = build_tables(&layout(), RSDP_AT).unwrap();
    let madt = &table(&tables, "APIC").bytes;
    assert_eq!(u32_at(madt, 36), 0xFEE0_0000, "local APIC address");
    assert_eq!(u32_at(madt, 40), 0, "flags: no PCAT_COMPAT");

    let mut lapics = Vec::new();
    let (mut ioapics, mut overrides, mut nmis) = (Vec::new(), Vec::new(), Vec::new());
    let mut off = 44;
    while off < madt.len() {
        let (kind, len) = (madt[off], madt[off + 1] as usize);
        let s = &madt[off..off + len];
        match kind {
            0 => {
                assert_eq!(len, 8);
                lapics.push((s[2], s[3], u32_at(s, 4)));
            }
            1 => {
                assert_eq!(len, 12);
                ioapics.push((s[2], u32_at(s, 4), u32_at(s, 8)));
            }
            2 => {
                assert_eq!(len, 10);
                overrides.push((s[2], s[3], u32_at(s, 4), u16_at(s, 8)));
            }
            4 => {
                assert_eq!(len, 6);
                nmis.push((s[2], u16_at(s, 3), s[5]));
            }
            other => panic!("unexpected MADT structure type {other}"),
        }
        off += len;
    }
    assert_eq!(off, madt.len());
    // (processor UID, APIC ID, flags = enabled)
    assert_eq!(lapics, [(0, 0, 1), (1, 1, 1), (2, 2, 1)]);
    assert_eq!(ioapics, [(4, 0xFEC0_0000, 0)]);
    // ISA IRQ0 -> GSI 2, bus-conforming polarity and trigger.
    assert_eq!(overrides, [(0, 0, 2, 0)]);
    // All processors, active-high edge, LINT1.
    assert_eq!(nmis, [(0xFF, 0b0101, 1)]);
}

#[test]
fn mcfg_has_the_ecam_entry() {
    let tables = build_tables(&segment1_layout(), RSDP_AT).unwrap();
    let mcfg = &table(&tables, "MCFG").bytes;
    assert_eq!(mcfg.len(), 44 + 2 * 16, "an entry per segment");
    assert_eq!(u64_at(mcfg, 36), 0, "reserved");
    assert_eq!(u64_at(mcfg, 44), 0xE000_0000, "base address");
    assert_eq!(u16_at(mcfg, 52), 0, "segment");
    assert_eq!((mcfg[54], mcfg[55]), (0, 0), "bus range");
    assert_eq!(u64_at(mcfg, 60), 0xE010_0000, "base address");
    assert_eq!(u16_at(mcfg, 68), 1, "segment");
    assert_eq!((mcfg[70], mcfg[71]), (0, 1), "bus range");
}

#[test]
fn fadt_without_reset_register_says_so() {
    let mut l = layout();
    l.reset = None;
    let tables = build_tables(&l, RSDP_AT).unwrap();
    let fadt = &table(&tables, "FACP").bytes;
    assert_eq!(u32_at(fadt, 112) & (1 << 10), 0, "no RESET_REG_SUP");
    assert_eq!(u64_at(fadt, 120), 0);
}

#[test]
fn fadt_is_hardware_reduced_with_sleep_registers_and_x_dsdt() {
    for i8042 in [false, true] {
        let mut l = layout();
        l.i8042 = i8042;
        let tables = build_tables(&l, RSDP_AT).unwrap();
        let fadt = &table(&tables, "FACP").bytes;
        assert_eq!(fadt.len(), 276, "ACPI 6.x FADT length");
        assert_eq!((fadt[8], fadt[131]), (6, 5), "FADT version 6.5");
        assert_eq!(u64_at(fadt, 140), table(&tables, "DSDT").addr.0, "X_DSDT");

        let flags = u32_at(fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_eq!(
            flags & (1 << 4 | 1 << 5),
            1 << 4 | 1 << 5,
            "no fixed buttons"
        );
        assert_eq!(u16_at(fadt, 46), 0, "no SCI");
        assert_eq!(u32_at(fadt, 64), 0, "no PM1a control block");
        assert_eq!(u32_at(fadt, 76), 0, "no PM timer");

        let boot_arch = u16_at(fadt, 109);
        assert_ne!(boot_arch & BOOT_ARCH_VGA_NOT_PRESENT, 0);
        assert_ne!(boot_arch & BOOT_ARCH_PCIE_ASPM_CONTROLS, 0);
        assert_eq!(
            boot_arch & BOOT_ARCH_CMOS_RTC_NOT_PRESENT,
            0,
            "the RTC is there"
        );
        assert_eq!(boot_arch & BOOT_ARCH_8042 != 0, i8042);

        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        assert_eq!(fadt[116], 1, "reset register in system I/O space");
        assert_eq!(u64_at(fadt, 120), 0x3C2, "reset register port");
        assert_eq!(fadt[128], 0x0E, "reset value");

        // Sleep control / status: GAS in system I/O, 8 bits at offset 0, byte access.
        assert_eq!(&fadt[244..248], [1, 8, 0, 1]);
        assert_eq!(u64_at(fadt, 248), 0x3C0);
        assert_eq!(&fadt[256..260], [1, 8, 0, 1]);
        assert_eq!(u64_at(fadt, 260), 0x3C1);
        assert_eq!(u64_at(fadt, 268), HYPERVISOR_VENDOR_ID);
        assert_eq!(&fadt[268..276], b"WARDENVM");
    }
}

/// One VIOT PCI range node as ACPI 6.5 table 5.167 lays it out.
#[derive(Debug, PartialEq)]
struct RangeNode {
    endpoint_start: u32,
    segment_start: u16,
    segment_end: u16,
    bdf_start: u16,
    bdf_end: u16,
    output_node: u16,
}

/// Parses the VIOT, checking the header and the virtio-pci IOMMU node on the way; returns
/// the IOMMU's (segment, BDF), its node offset and the range nodes.
fn parse_viot(viot: &[u8]) -> ((u16, u16), u16, Vec<RangeNode>) {
    let node_count = u16_at(viot, 36) as usize;
    let node_offset = u16_at(viot, 38) as usize;
    assert_eq!(node_offset, 48, "nodes right after the 48-byte header");
    assert_eq!(u64_at(viot, 40), 0, "reserved");

    let mut iommu = None;
    let mut ranges = Vec::new();
    let mut off = node_offset;
    for _ in 0..node_count {
        let (kind, reserved, len) = (viot[off], viot[off + 1], u16_at(viot, off + 2) as usize);
        assert_eq!(reserved, 0);
        let n = &viot[off..off + len];
        match kind {
            3 => {
                assert_eq!(len, 16, "virtio-pci IOMMU node length");
                assert_eq!(u64_at(n, 8), 0, "reserved");
                assert!(iommu.is_none(), "one IOMMU");
                iommu = Some(((u16_at(n, 4), u16_at(n, 6)), off as u16));
            }
            1 => {
                assert_eq!(len, 24, "PCI range node length");
                assert_eq!(&n[18..24], [0; 6], "reserved");
                ranges.push(RangeNode {
                    endpoint_start: u32_at(n, 4),
                    segment_start: u16_at(n, 8),
                    segment_end: u16_at(n, 10),
                    bdf_start: u16_at(n, 12),
                    bdf_end: u16_at(n, 14),
                    output_node: u16_at(n, 16),
                });
            }
            other => panic!("unexpected VIOT node type {other}"),
        }
        off += len;
    }
    assert_eq!(off, viot.len(), "node count matches the table length");
    let (iommu, iommu_offset) = iommu.expect("a virtio-pci IOMMU node");
    (iommu, iommu_offset, ranges)
}

#[test]
fn viot_bytes_follow_the_spec() {
    let tables = build_tables(&segment1_layout(), RSDP_AT).unwrap();
    let viot = &table(&tables, "VIOT").bytes;
    let (iommu, iommu_offset, ranges) = parse_viot(viot);
    // Segment first, then the BDF of 00:03.0: the order acpi_tables once got wrong.
    assert_eq!(iommu, (1, 0x0018));
    assert_eq!(&viot[48..56], [3, 0, 16, 0, 1, 0, 0x18, 0]);
    assert_eq!(iommu_offset, 48);

    // Segment 1's endpoints are numbered from 1 << 16, as `PciBdf::endpoint_id` says.
    let node = |start: u16, end: u16| RangeNode {
        endpoint_start: 1 << 16 | u32::from(start),
        segment_start: 1,
        segment_end: 1,
        bdf_start: start,
        bdf_end: end,
        output_node: 48,
    };
    // 00:04.0, 00:05.0, then 01:00.0-01:00.1 merged.
    assert_eq!(
        ranges,
        [
            node(0x0020, 0x0020),
            node(0x0028, 0x0028),
            node(0x0100, 0x0101)
        ]
    );
}

/// Resolves a device the way Linux's VIOT driver does: the first range node covering it gives
/// `endpoint_start + (segment - segment_start) << 16 + (bdf - bdf_start)`.
fn guest_endpoint(ranges: &[RangeNode], segment: u16, bdf: u16) -> Option<u32> {
    ranges
        .iter()
        .find(|r| {
            (r.segment_start..=r.segment_end).contains(&segment)
                && (r.bdf_start..=r.bdf_end).contains(&bdf)
        })
        .map(|r| {
            ((u32::from(segment - r.segment_start)) << 16)
                + u32::from(bdf - r.bdf_start)
                + r.endpoint_start
        })
}

#[test]
fn viot_covers_exactly_the_protected_devices_with_their_endpoint_ids() {
    let layout = segment1_layout();
    let protected = layout.iommu.as_ref().unwrap().protected.clone();
    let tables = build_tables(&layout, RSDP_AT).unwrap();
    let (_, _, ranges) = parse_viot(&table(&tables, "VIOT").bytes);
    for bus in 0..=255u8 {
        for device in 0..32 {
            for function in 0..8 {
                let dev = PciBdf::new(1, bus, device, function);
                let expected = protected.contains(&dev).then(|| dev.endpoint_id());
                assert_eq!(guest_endpoint(&ranges, 1, dev.bdf()), expected, "{dev}");
            }
        }
    }
    assert_eq!(guest_endpoint(&ranges, 0, 0x0020), None, "other segment");
}

#[test]
fn viot_checksum_holds_past_255_nodes() {
    let mut l = layout();
    l.segments[0].ecam.bus_end = 9;
    // Function 0 of every slot on buses 1..=9: 288 devices, none adjacent.
    let protected: Vec<_> = (1..=9)
        .flat_map(|bus| (0..32).map(move |dev| PciBdf::new(0, bus, dev, 0)))
        .collect();
    l.iommu = Some(Viot {
        iommu: PciBdf::new(0, 0, 3, 0),
        protected,
        protected_slots: vec![],
    });
    let tables = build_tables(&l, RSDP_AT).unwrap();
    let viot = &table(&tables, "VIOT").bytes;
    check_sdt("VIOT", viot);
    assert_eq!(u16_at(viot, 36), 289);
    assert_eq!(parse_viot(viot).2.len(), 288);
}

/// A change that makes the sample layout invalid, and what the error must say.
type BadLayout = (&'static str, fn(&mut AcpiLayout));

#[test]
fn inconsistent_layouts_are_rejected() {
    let cases: Vec<BadLayout> = vec![
        ("no vCPUs", |l| l.cpus = 0),
        ("overlaps the serial port", |l| {
            l.segments[0].pci_io = Some(0x3F0..0x3F9)
        }),
        ("overlaps the sleep control register", |l| {
            l.segments[0].pci_io = Some(0x3C0..0x3C1)
        }),
        ("above 0xFFFF", |l| {
            l.segments[0].pci_io = Some(0x1000..0x1_0001)
        }),
        ("overlaps ECAM", |l| {
            l.segments[0].mmio32 = 0xC000_0000..0xE000_1000
        }),
        ("above 4 GiB", |l| l.segments[0].ecam.base = 0x1_0000_0000),
        ("cannot be behind itself", |l| {
            let v = l.iommu.as_mut().unwrap();
            v.protected.push(v.iommu);
        }),
        ("device >= 32", |l| {
            l.iommu.as_mut().unwrap().protected[0].device = 32
        }),
        ("outside every host bridge", |l| {
            l.iommu.as_mut().unwrap().protected[0].bus = 1
        }),
        ("outside every host bridge", |l| {
            l.iommu.as_mut().unwrap().iommu.segment = 2
        }),
        ("cannot be behind itself", |l| {
            l.iommu.as_mut().unwrap().protected_slots = vec![(0, 2..4)]
        }),
        ("are not on a host bridge's bus 0", |l| {
            l.iommu.as_mut().unwrap().protected_slots = vec![(0, 24..33)]
        }),
        ("within 1..32", |l| {
            l.segments[0].hotplug = Some(hotplug(0..4))
        }),
        ("within 1..32", |l| {
            l.segments[0].hotplug = Some(hotplug(24..24))
        }),
        ("within 1..32", |l| {
            l.segments[0].hotplug = Some(hotplug(24..33))
        }),
        ("needs the Generic Event Device", |l| {
            l.segments[0].hotplug = Some(hotplug(24..32));
            l.events = None;
        }),
        ("overlap a PCI I/O window", |l| {
            l.segments[0].hotplug = Some(PciHotplug {
                port: 0x1000,
                slots: 24..32,
            })
        }),
    ];
    for (expected, mutate) in cases {
        let mut l = layout();
        mutate(&mut l);
        match build_tables(&l, RSDP_AT) {
            Err(Error::InvalidLayout(msg)) => {
                assert!(msg.contains(expected), "{msg:?} lacks {expected:?}")
            }
            other => panic!("{expected}: got {other:?}"),
        }
    }
}

#[test]
fn io_window_around_the_config_ports_is_accepted() {
    let mut l = layout();
    l.segments[0].pci_io = Some(0x0C00..0x1_0000);
    assert!(build_tables(&l, RSDP_AT).is_ok());
}

#[test]
fn write_tables_refuses_what_does_not_fit_and_writes_nothing() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let untouched = |mem: &GuestMemoryMmap| {
        let mut buf = vec![0u8; 0x2_0000];
        mem.read_slice(&mut buf, GuestAddress(0xE_0000)).unwrap();
        buf.iter().all(|b| *b == 0)
    };

    let err = write_tables(&layout(), &mem, GuestAddress(0xF_FF00)).unwrap_err();
    assert!(
        matches!(err, Error::DoesNotFit { start: 0xF_FF00, end } if end > 0x10_0000),
        "{err}"
    );
    assert!(err.to_string().contains("0xe0000..0x100000"), "{err}");
    let err = write_tables(&layout(), &mem, GuestAddress(0x1000)).unwrap_err();
    assert!(matches!(err, Error::DoesNotFit { .. }), "{err}");
    let err = write_tables(&layout(), &mem, GuestAddress(0xE_0008)).unwrap_err();
    assert!(matches!(err, Error::MisalignedRsdp(0xE_0008)), "{err}");
    assert!(untouched(&mem));

    // Guest memory that does not back the ACPI area.
    let small = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
    let err = write_tables(&layout(), &small, RSDP_AT).unwrap_err();
    assert!(
        matches!(
            err,
            Error::GuestMemory {
                table: "RSDP",
                addr: 0xE_0000,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn sleep_control_values_decode_like_linux_writes_them() {
    // Linux writes (SLP_TYP << 2) | SLP_EN with SLP_TYP from \_S5_.
    assert_eq!(requested_sleep_type((SLEEP_TYPE_S5 << 2) | 0x20), Some(5));
    assert_eq!(requested_sleep_type(0x20), Some(0));
    assert_eq!(requested_sleep_type(SLEEP_TYPE_S5 << 2), None, "no SLP_EN");
    assert_eq!(requested_sleep_type(0x80), None, "WAK_STS clear");
}

#[test]
fn the_power_button_and_its_event_device_are_in_the_dsdt_only_when_asked_for() {
    let has = |layout: &AcpiLayout, needle: &[u8]| {
        let tables = build_tables(layout, GuestAddress(0xe0000)).unwrap();
        let dsdt = &table(&tables, "DSDT").bytes;
        dsdt.windows(needle.len()).any(|w| w == needle)
    };
    let mut l = layout();
    for needle in [&b"ACPI0013"[..], b"PWRB", b"GDAT", b"_EVT"] {
        assert!(has(&l, needle), "{}", String::from_utf8_lossy(needle));
    }
    l.events = None;
    for needle in [&b"ACPI0013"[..], b"PWRB", b"_EVT"] {
        assert!(!has(&l, needle), "{}", String::from_utf8_lossy(needle));
    }
}

fn hotplug(slots: std::ops::Range<u8>) -> PciHotplug {
    PciHotplug { port: 0x3d0, slots }
}

#[test]
fn viot_covers_the_protected_hotplug_slots_with_one_node() {
    let mut l = layout();
    l.iommu.as_mut().unwrap().protected_slots = vec![(0, 24..28)];
    let tables = build_tables(&l, RSDP_AT).unwrap();
    let (_, _, ranges) = parse_viot(&table(&tables, "VIOT").bytes);
    let node = |start: u16, end: u16| RangeNode {
        endpoint_start: start.into(),
        segment_start: 0,
        segment_end: 0,
        bdf_start: start,
        bdf_end: end,
        output_node: 48,
    };
    // 00:04.0 and 00:05.0 as before, then 00:18.0 to 00:1b.7 in one node.
    assert_eq!(
        ranges,
        [node(0x20, 0x20), node(0x28, 0x28), node(0xc0, 0xdf)]
    );
    for device in 0..32u8 {
        let bdf = PciBdf::new(0, 0, device, 0);
        let behind = matches!(device, 4 | 5 | 24..=27);
        assert_eq!(
            guest_endpoint(&ranges, 0, bdf.bdf()),
            behind.then(|| bdf.endpoint_id()),
            "{bdf}"
        );
    }
}

#[test]
fn hotplug_slots_are_in_the_dsdt_only_when_asked_for() {
    let dsdt = |layout: &AcpiLayout| {
        let tables = build_tables(layout, RSDP_AT).unwrap();
        table(&tables, "DSDT").bytes.clone()
    };
    let has = |bytes: &[u8], needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    let mut l = layout();
    let plain = dsdt(&l);
    for needle in [&b"PCNT"[..], b"PHPR", b"_EJ0", b"SL18"] {
        assert!(!has(&plain, needle), "{}", String::from_utf8_lossy(needle));
    }
    l.segments[0].hotplug = Some(hotplug(24..26));
    let bytes = dsdt(&l);
    for needle in [
        &b"PCNT"[..],
        b"PHPR",
        b"PCIU",
        b"PCID",
        b"B0EJ",
        b"SL18",
        b"SL19",
    ] {
        assert!(has(&bytes, needle), "{}", String::from_utf8_lossy(needle));
    }
    assert!(!has(&bytes, b"SL1A"), "one device per slot in the range");
    // Two slots, each with _ADR, _SUN and _EJ0.
    assert_eq!(bytes.windows(4).filter(|w| w == b"_EJ0").count(), 2);
}
