//! The guest's ACPI tables: RSDP, XSDT, FADT, DSDT, MADT, MCFG and, when the machine has a
//! virtio-iommu, VIOT.
//!
//! The input is [`AcpiLayout`], a plain description of the machine (no KVM handles), so the
//! tables can be built and inspected in tests ([`build_tables`]) and written into guest memory
//! by the VMM ([`write_tables`]).
//!
//! The machine is an ACPI *hardware-reduced* platform: there is no PM1 event/control block, no
//! GPE block, no SCI and no PM timer. Power-off goes through the FADT sleep control register,
//! which Linux writes with `SLP_TYP | SLP_EN` after evaluating `\_S5_` (see
//! [`requested_sleep_type`] for the VMM side).
//!
//! Tables are laid out from the RSDP address upwards in this order, each 8-byte aligned:
//! RSDP, XSDT, FADT (`FACP`), DSDT, MADT (`APIC`), MCFG, VIOT. The XSDT lists FACP, APIC, MCFG
//! and VIOT; the DSDT is reached through the FADT's `X_DSDT`.

mod dsdt;
mod fadt;
mod madt;
mod viot;

use std::fmt;
use std::ops::Range;

use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

/// OEM ID in every table header (and the RSDP).
const OEM_ID: [u8; 6] = *b"WARDEN";
/// OEM table ID in every table header.
const OEM_TABLE_ID: [u8; 8] = *b"WARDENVM";
const OEM_REVISION: u32 = 1;

/// Guest-physical range the tables must fit in: the legacy BIOS area, where Linux scans for the
/// RSDP on 16-byte boundaries when the boot protocol does not hand it the RSDP address. The VMM
/// marks it reserved in the E820 map.
pub const ACPI_AREA: Range<u64> = 0x000E_0000..0x0010_0000;

/// Each table starts on this boundary (the RSDP itself must be on a 16-byte one).
const TABLE_ALIGN: u64 = 8;
const RSDP_ALIGN: u64 = 16;

/// ACPI sleep type written to the sleep control register for S5 (soft off); also the value our
/// `\_S5_` package hands to the OS.
pub const SLEEP_TYPE_S5: u8 = 5;

/// `SLP_EN` in the hardware-reduced sleep control register (ACPI 6.5, 4.8.3.7).
const SLEEP_CONTROL_SLP_EN: u8 = 1 << 5;
/// `SLP_TYP` occupies bits 2..=4 of the sleep control register.
const SLEEP_CONTROL_SLP_TYP_SHIFT: u8 = 2;
const SLEEP_CONTROL_SLP_TYP_MASK: u8 = 0b111;

/// Errors from building or writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The layout cannot be described by consistent ACPI tables.
    #[error("invalid ACPI layout: {0}")]
    InvalidLayout(String),
    /// The RSDP address is not on a 16-byte boundary, so the guest's RSDP scan would miss it.
    #[error("RSDP address {0:#x} is not 16-byte aligned")]
    MisalignedRsdp(u64),
    /// The tables do not fit in [`ACPI_AREA`].
    #[error(
        "ACPI tables need {start:#x}..{end:#x}, outside the reserved ACPI area {:#x}..{:#x}",
        ACPI_AREA.start,
        ACPI_AREA.end
    )]
    DoesNotFit {
        /// First byte the tables would use.
        start: u64,
        /// One past the last byte the tables would use.
        end: u64,
    },
    /// Writing a table into guest memory failed.
    #[error("writing the {table} table at {addr:#x} into guest memory: {source}")]
    GuestMemory {
        /// Which table.
        table: &'static str,
        /// Where it was going.
        addr: u64,
        /// What vm-memory said.
        #[source]
        source: GuestMemoryError,
    },
}

/// A PCI function address: segment (domain), bus, device, function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciBdf {
    pub segment: u16,
    pub bus: u8,
    /// 0..32.
    pub device: u8,
    /// 0..8.
    pub function: u8,
}

impl PciBdf {
    pub const fn new(segment: u16, bus: u8, device: u8, function: u8) -> Self {
        Self {
            segment,
            bus,
            device,
            function,
        }
    }

    /// The 16-bit routing ID within the segment: `bus << 8 | device << 3 | function`.
    pub fn bdf(&self) -> u16 {
        (u16::from(self.bus) << 8) | (u16::from(self.device) << 3) | u16::from(self.function)
    }

    /// The virtio-iommu endpoint ID the guest uses for this device: `segment << 16 | bdf`,
    /// as Cloud Hypervisor numbers them.
    ///
    /// Linux derives it from the VIOT PCI range node that covers the device as
    /// `endpoint_start + ((segment - segment_start) << 16) + (bdf - bdf_start)`. Each of our
    /// nodes covers one segment and starts its endpoints at this ID of its first function
    /// (see `viot.rs`). The virtio-iommu device must use the same mapping to find the device
    /// an ATTACH names.
    pub fn endpoint_id(&self) -> u32 {
        u32::from(self.segment) << 16 | u32::from(self.bdf())
    }

    fn check(&self) -> Result<(), Error> {
        if self.device >= 32 || self.function >= 8 {
            return Err(Error::InvalidLayout(format!(
                "PCI address {self} has device >= 32 or function >= 8"
            )));
        }
        Ok(())
    }
}

impl fmt::Display for PciBdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{}",
            self.segment, self.bus, self.device, self.function
        )
    }
}

/// The IOAPIC as the MADT describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoApic {
    pub id: u8,
    /// MMIO base, e.g. 0xFEC0_0000.
    pub address: u32,
    /// First GSI its pins deliver (0 for the only IOAPIC).
    pub gsi_base: u32,
}

/// The PCI Express enhanced configuration region of one host bridge (a PCI segment).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ecam {
    /// ECAM address of bus 0 of the segment, as MCFG defines it: bus `n` is at
    /// `base + (n << 20)`. Only the buses `bus_start..=bus_end` are decoded.
    pub base: u64,
    pub segment: u16,
    pub bus_start: u8,
    pub bus_end: u8,
}

impl Ecam {
    /// The guest-physical range actually decoded, 1 MiB per bus.
    pub fn region(&self) -> Range<u64> {
        let bus_offset = |bus: u64| bus << 20;
        self.base + bus_offset(self.bus_start.into())
            ..self.base + bus_offset(u64::from(self.bus_end) + 1)
    }
}

/// A 16550 UART on legacy I/O ports (COM1 is port 0x3F8, IRQ 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Serial {
    /// First of its 8 I/O ports.
    pub port: u16,
    /// IOAPIC GSI (edge-triggered, active-high, as for an ISA interrupt).
    pub irq: u32,
}

/// The I/O ports of the hardware-reduced sleep control and status registers (one byte each;
/// they may be the same port).
///
/// To power off, Linux first writes `WAK_STS` (0x80) to the status register, then
/// `SLP_TYP << 2 | SLP_EN` to the control register; see [`requested_sleep_type`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SleepRegisters {
    pub control_port: u16,
    pub status_port: u16,
}

/// The FADT reset register: an I/O port where writing `value` resets the machine.
///
/// It is the first way Linux tries to reboot (and to restart after a panic); without it Linux
/// falls back to the keyboard controller and a triple fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResetRegister {
    pub port: u16,
    pub value: u8,
}

/// The Generic Event Device (ACPI0013) through which the VMM presses the guest's power button
/// (PNP0C0C), the hardware-reduced way: it raises `irq`, and the device's `_EVT` reads the
/// one-byte event register at `port` and notifies the button for bit [`GED_POWER_BUTTON`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenericEvents {
    pub port: u16,
    /// IOAPIC GSI, edge-triggered, active-high.
    pub irq: u32,
}

/// The event register's bit for a power button press.
pub const GED_POWER_BUTTON: u8 = 1;
/// The event register's bit for a change in the PCI hotplug slots (see [`PciHotplug`]).
pub const GED_PCI_HOTPLUG: u8 = 2;

/// ACPI PCI hotplug on bus 0 of a segment (the way Linux's `acpiphp` drives it): each slot in
/// `slots` is an ACPI device under the segment's host bridge with `_ADR`, `_SUN` and `_EJ0`,
/// and the Generic Event Device's `_EVT`, on [`GED_PCI_HOTPLUG`], runs the bridge's `PCNT`
/// (`\_SB_.PC00.PCNT` for segment 0), which reads the segment's controller's registers and
/// notifies each slot they name.
///
/// The controller's registers, 32 bits each, from `port` on (see the `PCI_HOTPLUG_*` offsets):
/// the slots to check for a new device (bit `n` is slot `n`; reading clears them), the slots
/// whose device the VMM asks the guest to release (reading clears them), and the eject
/// register, to which a slot's `_EJ0` writes its bit once the guest has let go of the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciHotplug {
    pub port: u16,
    /// Device numbers on bus 0; the host bridge's 0 is not one.
    pub slots: Range<u8>,
}

/// Offset of the slots-up register: Notify(slot, 1), device check.
pub const PCI_HOTPLUG_UP: u64 = 0;
/// Offset of the slots-down register: Notify(slot, 3), eject request.
pub const PCI_HOTPLUG_DOWN: u64 = 4;
/// Offset of the eject register.
pub const PCI_HOTPLUG_EJECT: u64 = 8;
/// The controller's I/O ports.
pub const PCI_HOTPLUG_PORTS: u16 = 12;

/// The virtio-iommu and the devices whose DMA it translates, for the VIOT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Viot {
    /// The virtio-iommu's own PCI function.
    pub iommu: PciBdf,
    /// The endpoints behind it (order and duplicates do not matter). Devices not listed
    /// bypass the IOMMU: the guest does not attach them to it.
    pub protected: Vec<PciBdf>,
    /// Slots on bus 0 of a segment, empty for now, whose every function is behind the IOMMU
    /// too: where protected devices are hot-plugged. The VIOT is read once, at boot, so a
    /// device the guest is to put behind the IOMMU later must sit where the table already
    /// said so.
    pub protected_slots: Vec<(u16, Range<u8>)>,
}

/// One PCI segment: a host bridge of its own (`\_SB_.PC00`, `PC01`, ...) with its bus 0, its
/// ECAM region and the windows its devices' BARs are placed in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciSegment {
    pub ecam: Ecam,
    /// 32-bit PCI memory window (half-open, must end at or below 4 GiB); empty to omit it.
    pub mmio32: Range<u64>,
    /// 64-bit PCI memory window (half-open), typically above RAM; empty to omit it.
    pub mmio64: Range<u64>,
    /// PCI I/O port window (half-open, e.g. 0x1000..0x10000). If it covers the 0xCF8..0xD00
    /// configuration ports, the window is split around them, since segment 0's host bridge
    /// owns those ports.
    pub pci_io: Option<Range<u32>>,
    /// Slots that take devices while the guest runs; needs the Generic Event Device.
    pub hotplug: Option<PciHotplug>,
}

/// Everything the tables describe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiLayout {
    /// vCPU count: one enabled MADT Local APIC each, with APIC IDs and processor UIDs 0..cpus.
    pub cpus: u8,
    pub ioapic: IoApic,
    /// Local APIC MMIO base, e.g. 0xFEE0_0000.
    pub lapic_address: u32,
    /// The PCI segments, segment `n` at index `n`; segment 0 is reached through the 0xCF8
    /// ports too.
    pub segments: Vec<PciSegment>,
    /// COM1, declared in the DSDT so that Linux's PNP serial driver finds its IRQ (in
    /// hardware-reduced mode Linux sets up no legacy ISA IRQs on its own).
    pub serial: Option<Serial>,
    pub sleep: SleepRegisters,
    pub reset: Option<ResetRegister>,
    /// The VMM emulates an i8042 controller at 0x60/0x64: sets the FADT `8042` boot flag,
    /// without which Linux does not probe the controller (it still uses port 0x64 to reset).
    pub i8042: bool,
    /// A power button the VMM can press, and its event device.
    pub events: Option<GenericEvents>,
    /// When set, a VIOT table describes the virtio-iommu and its endpoints.
    pub iommu: Option<Viot>,
}

impl AcpiLayout {
    /// The segments with hotplug slots, with their numbers.
    fn hotplug(&self) -> impl Iterator<Item = (u16, &PciHotplug)> {
        self.segments
            .iter()
            .filter_map(|s| Some((s.ecam.segment, s.hotplug.as_ref()?)))
    }
}

/// One table as built: where it goes and its bytes (checksum included).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiTable {
    /// The table's signature (`"FACP"`, `"APIC"`, ...), or `"RSDP"` for the root pointer.
    pub name: &'static str,
    pub addr: GuestAddress,
    pub bytes: Vec<u8>,
}

/// The PCI configuration mechanism #1 ports (0xCF8 address, 0xCFC data), owned by the host
/// bridge itself.
const PCI_CONFIG_PORTS: Range<u32> = 0xCF8..0xD00;

fn overlaps<T: PartialOrd>(a: &Range<T>, b: &Range<T>) -> bool {
    a.start < b.end && b.start < a.end
}

impl AcpiLayout {
    /// Rejects layouts the tables could only describe wrongly.
    fn check(&self) -> Result<(), Error> {
        let invalid = |msg: String| Err(Error::InvalidLayout(msg));
        if self.cpus == 0 {
            return invalid("no vCPUs".into());
        }
        if self.segments.is_empty() {
            return invalid("no PCI segment".into());
        }
        let ecam_regions: Vec<Range<u64>> = self.segments.iter().map(|s| s.ecam.region()).collect();
        let mut windows: Vec<(String, Range<u64>)> = Vec::new();
        let mut io_windows: Vec<Range<u32>> = Vec::new();
        for (index, segment) in self.segments.iter().enumerate() {
            self.check_segment(index, segment, &ecam_regions)?;
            for (name, window) in [("mmio32", &segment.mmio32), ("mmio64", &segment.mmio64)] {
                let name = format!("segment {index}'s {name} window");
                if let Some((other, _)) = windows.iter().find(|(_, w)| overlaps(w, window)) {
                    return invalid(format!("{name} {window:#x?} overlaps {other}"));
                }
                windows.push((name, window.clone()));
            }
            if let Some(io) = &segment.pci_io {
                if io_windows.iter().any(|other| overlaps(other, io)) {
                    return invalid(format!(
                        "segment {index}'s PCI I/O window {io:#x?} overlaps another segment's"
                    ));
                }
                io_windows.push(io.clone());
            }
        }
        if let Some(viot) = &self.iommu {
            self.check_viot(viot)?;
        }
        let mut hotplug_ports: Vec<Range<u32>> = Vec::new();
        for (segment, hotplug) in self.hotplug() {
            if hotplug.slots.is_empty() || hotplug.slots.start == 0 || hotplug.slots.end > 32 {
                return invalid(format!(
                    "segment {segment}'s hotplug slots {:?} must be a non-empty range within 1..32",
                    hotplug.slots
                ));
            }
            if self.events.is_none() {
                return invalid("PCI hotplug needs the Generic Event Device".into());
            }
            let ports =
                u32::from(hotplug.port)..u32::from(hotplug.port) + u32::from(PCI_HOTPLUG_PORTS);
            let taken = io_windows
                .iter()
                .chain(&hotplug_ports)
                .any(|other| overlaps(other, &ports));
            if ports.end > 0x1_0000 || taken {
                return invalid(format!(
                    "segment {segment}'s PCI hotplug registers at {ports:#x?} overlap a PCI I/O window or other registers, or end above 0xFFFF"
                ));
            }
            hotplug_ports.push(ports);
        }
        Ok(())
    }

    /// Segment `index` alone: its ECAM region, and windows that stay clear of every
    /// segment's ECAM region and of the ports the motherboard owns.
    fn check_segment(
        &self,
        index: usize,
        segment: &PciSegment,
        ecam_regions: &[Range<u64>],
    ) -> Result<(), Error> {
        let invalid = |msg: String| Err(Error::InvalidLayout(msg));
        let ecam = segment.ecam;
        if usize::from(ecam.segment) != index {
            return invalid(format!(
                "segment {index} is described as segment {}",
                ecam.segment
            ));
        }
        let ecam_region = ecam.region();
        if ecam.bus_start > ecam.bus_end {
            return invalid(format!(
                "ECAM bus range {}..={} is empty",
                ecam.bus_start, ecam.bus_end
            ));
        }
        if !ecam.base.is_multiple_of(1 << 20) {
            return invalid(format!("ECAM base {:#x} is not 1 MiB aligned", ecam.base));
        }
        // The motherboard resource that reserves ECAM for Linux is a 32-bit descriptor.
        if ecam_region.end > 1 << 32 {
            return invalid(format!("ECAM region {ecam_region:#x?} is above 4 GiB"));
        }
        if let Some(other) = ecam_regions[..index]
            .iter()
            .find(|other| overlaps(other, &ecam_region))
        {
            return invalid(format!(
                "ECAM region {ecam_region:#x?} overlaps {other:#x?}"
            ));
        }
        for (name, window) in [("mmio32", &segment.mmio32), ("mmio64", &segment.mmio64)] {
            if window.start > window.end {
                return invalid(format!("{name} window {window:#x?} is reversed"));
            }
            if let Some(region) = ecam_regions.iter().find(|r| overlaps(window, r)) {
                return invalid(format!(
                    "{name} window {window:#x?} overlaps ECAM {region:#x?}"
                ));
            }
        }
        if segment.mmio32.end > 1 << 32 {
            return invalid(format!(
                "mmio32 window {:#x?} ends above 4 GiB",
                segment.mmio32
            ));
        }
        if let Some(io) = &segment.pci_io {
            if io.start >= io.end || io.end > 0x1_0000 {
                return invalid(format!("PCI I/O window {io:#x?} is empty or above 0xFFFF"));
            }
            // Ports the motherboard owns must not be handed out to BARs.
            let mut fixed = vec![
                (
                    "sleep control register",
                    u32::from(self.sleep.control_port)..u32::from(self.sleep.control_port) + 1,
                ),
                (
                    "sleep status register",
                    u32::from(self.sleep.status_port)..u32::from(self.sleep.status_port) + 1,
                ),
            ];
            if let Some(serial) = &self.serial {
                fixed.push((
                    "serial port",
                    u32::from(serial.port)..u32::from(serial.port) + 8,
                ));
            }
            if let Some((name, ports)) = fixed.iter().find(|(_, ports)| overlaps(io, ports)) {
                return invalid(format!(
                    "PCI I/O window {io:#x?} overlaps the {name} at {ports:#x?}"
                ));
            }
        }
        Ok(())
    }

    /// The VIOT names functions the host bridges reach, and not the IOMMU behind itself.
    fn check_viot(&self, viot: &Viot) -> Result<(), Error> {
        let invalid = |msg: String| Err(Error::InvalidLayout(msg));
        let reaches = |segment: u16, bus: u8| {
            self.segments
                .get(usize::from(segment))
                .is_some_and(|s| (s.ecam.bus_start..=s.ecam.bus_end).contains(&bus))
        };
        for dev in std::iter::once(&viot.iommu).chain(&viot.protected) {
            dev.check()?;
            if !reaches(dev.segment, dev.bus) {
                return invalid(format!("{dev} is outside every host bridge"));
            }
        }
        for (segment, slots) in &viot.protected_slots {
            if !reaches(*segment, 0) || slots.end > 32 {
                return invalid(format!(
                    "protected slots {slots:?} of segment {segment} are not on a host bridge's bus 0"
                ));
            }
        }
        // Linux would wait for the IOMMU to probe before probing the IOMMU.
        let iommu = viot.iommu;
        let in_a_protected_slot = viot.protected_slots.iter().any(|(segment, slots)| {
            *segment == iommu.segment && iommu.bus == 0 && slots.contains(&iommu.device)
        });
        if viot.protected.contains(&iommu) || in_a_protected_slot {
            return invalid(format!("the virtio-iommu {iommu} cannot be behind itself"));
        }
        Ok(())
    }
}

/// If a value written to the sleep control register requests a sleep state (`SLP_EN` set),
/// returns its `SLP_TYP`; [`SLEEP_TYPE_S5`] means power off.
pub fn requested_sleep_type(control: u8) -> Option<u8> {
    (control & SLEEP_CONTROL_SLP_EN != 0)
        .then_some((control >> SLEEP_CONTROL_SLP_TYP_SHIFT) & SLEEP_CONTROL_SLP_TYP_MASK)
}

fn aml_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    aml.to_aml_bytes(&mut bytes);
    bytes
}

/// Recomputes a system description table's checksum (byte 9) over its whole length.
///
/// The acpi_tables builders keep running checksums, but we do not depend on them: the VIOT
/// builder's goes wrong once the node count passes 255 (it adds one per node, whereas the
/// count's byte sum drops by 254 when it reaches 256).
fn seal(mut table: Vec<u8>) -> Vec<u8> {
    table[9] = 0;
    let sum = table.iter().fold(0u8, |acc, b| acc.wrapping_add(*b));
    table[9] = sum.wrapping_neg();
    table
}

fn align_up(addr: u64, align: u64) -> u64 {
    addr.next_multiple_of(align)
}

/// Builds every table for `layout`, placed from `rsdp_addr` upwards (see the crate docs for the
/// order), with all pointers and checksums filled in.
pub fn build_tables(layout: &AcpiLayout, rsdp_addr: GuestAddress) -> Result<Vec<AcpiTable>, Error> {
    layout.check()?;
    if !rsdp_addr.0.is_multiple_of(RSDP_ALIGN) {
        return Err(Error::MisalignedRsdp(rsdp_addr.0));
    }

    // Everything but XSDT and FADT is independent of where it lands.
    let dsdt = seal(dsdt::build(layout));
    let madt = seal(madt::build(layout));
    let mcfg = {
        let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
        for segment in &layout.segments {
            let ecam = segment.ecam;
            mcfg.add_ecam(ecam.base, ecam.segment, ecam.bus_start, ecam.bus_end);
        }
        seal(aml_bytes(&mcfg))
    };
    let viot = layout.iommu.as_ref().map(|v| seal(viot::build(v)));

    let mut cursor = rsdp_addr.0;
    let mut place = |len: usize| {
        let addr = align_up(cursor, TABLE_ALIGN);
        cursor = addr + len as u64;
        addr
    };
    let xsdt_entries = 3 + usize::from(viot.is_some());
    place(Rsdp::len());
    let xsdt_addr = place(36 + 8 * xsdt_entries);
    let fadt_addr = place(acpi_tables::fadt::FADT::len());
    let dsdt_addr = place(dsdt.len());
    let madt_addr = place(madt.len());
    let mcfg_addr = place(mcfg.len());
    let viot_addr = viot.as_ref().map(|v| place(v.len()));

    let fadt = seal(fadt::build(layout, dsdt_addr));
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for addr in [Some(fadt_addr), Some(madt_addr), Some(mcfg_addr), viot_addr]
        .into_iter()
        .flatten()
    {
        xsdt.add_entry(addr);
    }
    let xsdt = seal(aml_bytes(&xsdt));
    debug_assert_eq!(xsdt.len(), 36 + 8 * xsdt_entries);
    let rsdp = aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr));

    let mut tables = vec![
        AcpiTable {
            name: "RSDP",
            addr: rsdp_addr,
            bytes: rsdp,
        },
        AcpiTable {
            name: "XSDT",
            addr: GuestAddress(xsdt_addr),
            bytes: xsdt,
        },
        AcpiTable {
            name: "FACP",
            addr: GuestAddress(fadt_addr),
            bytes: fadt,
        },
        AcpiTable {
            name: "DSDT",
            addr: GuestAddress(dsdt_addr),
            bytes: dsdt,
        },
        AcpiTable {
            name: "APIC",
            addr: GuestAddress(madt_addr),
            bytes: madt,
        },
        AcpiTable {
            name: "MCFG",
            addr: GuestAddress(mcfg_addr),
            bytes: mcfg,
        },
    ];
    if let (Some(bytes), Some(addr)) = (viot, viot_addr) {
        tables.push(AcpiTable {
            name: "VIOT",
            addr: GuestAddress(addr),
            bytes,
        });
    }
    Ok(tables)
}

/// Builds the tables and writes them into `mem`, the RSDP at `at` and the rest after it.
///
/// `at` must be 16-byte aligned and everything must fit in [`ACPI_AREA`]; nothing is written
/// otherwise. Returns the RSDP address, for the boot protocol's `acpi_rsdp_addr`.
pub fn write_tables<M: GuestMemoryBackend>(
    layout: &AcpiLayout,
    mem: &M,
    at: GuestAddress,
) -> Result<GuestAddress, Error> {
    let tables = build_tables(layout, at)?;
    let end = tables
        .iter()
        .map(|t| t.addr.0 + t.bytes.len() as u64)
        .max()
        .unwrap_or(at.0);
    if at.0 < ACPI_AREA.start || end > ACPI_AREA.end {
        return Err(Error::DoesNotFit { start: at.0, end });
    }
    for table in &tables {
        mem.write_slice(&table.bytes, table.addr)
            .map_err(|source| Error::GuestMemory {
                table: table.name,
                addr: table.addr.0,
                source,
            })?;
        log::debug!(
            "ACPI {} at {:#x}, {} bytes",
            table.name,
            table.addr.0,
            table.bytes.len()
        );
    }
    Ok(at)
}

#[cfg(test)]
mod tests;
