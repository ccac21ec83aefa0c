//! The DSDT: a PCI host bridge per segment (with its hotplug slots), COM1, a
//! motherboard-resource device, the power button with its Generic Event Device, and `\_S5_`.

use std::ops::Range;

use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, And, Device, EISAName, Equal, Field, FieldAccessType,
    FieldEntry, FieldLockRule, FieldUpdateRule, If, Interrupt, Local, Memory32Fixed, Method,
    MethodCall, Name, Notify, OpRegion, OpRegionSpace, Package, Path, ResourceTemplate, Scope,
    Store, IO,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;

use crate::{
    aml_bytes, AcpiLayout, GenericEvents, PciHotplug, PciSegment, GED_PCI_HOTPLUG,
    GED_POWER_BUTTON, OEM_ID, OEM_REVISION, OEM_TABLE_ID, PCI_CONFIG_PORTS, PCI_HOTPLUG_PORTS,
    SLEEP_TYPE_S5,
};

/// Revision 2 and later make AML integers 64 bits wide, which the 64-bit window needs.
const DSDT_REVISION: u8 = 6;

/// The PCI I/O window minus the configuration ports, as inclusive `(min, max)` pairs.
fn io_windows(io: &Range<u32>) -> Vec<(u16, u16)> {
    let pieces = [
        io.start..io.end.min(PCI_CONFIG_PORTS.start),
        io.start.max(PCI_CONFIG_PORTS.end)..io.end,
    ];
    pieces
        .into_iter()
        .filter(|r| !r.is_empty())
        // The layout check keeps every port below 0x10000.
        .map(|r| (r.start as u16, (r.end - 1) as u16))
        .collect()
}

/// The AML name of segment `segment`'s host bridge: `PC` and its number in hex, as Cloud
/// Hypervisor names them.
pub(crate) fn bridge_name(segment: u16) -> String {
    format!("PC{segment:02X}")
}

/// `\_SB.PCnn`: the host bridge of one segment, a PCI Express host bridge (PNP0A08,
/// compatible with conventional PNP0A03) whose `_SEG` and `_UID` are the segment's number.
///
/// Segment 0's `_CRS` consumes the configuration ports 0xCF8..=0xCFF (Linux drops exactly that
/// entry from the bridge's windows); each produces its bus range and the I/O and memory
/// windows that Linux allocates its BARs from.
fn pci_host_bridge(segment: &PciSegment) -> Vec<u8> {
    let ecam = segment.ecam;
    let buses = AddressSpace::<u16>::new_bus_number(ecam.bus_start.into(), ecam.bus_end.into());
    let config_ports = IO::new(
        PCI_CONFIG_PORTS.start as u16,
        PCI_CONFIG_PORTS.start as u16,
        1,
        (PCI_CONFIG_PORTS.end - PCI_CONFIG_PORTS.start) as u8,
    );
    let io: Vec<AddressSpace<u16>> = segment
        .pci_io
        .as_ref()
        .map(io_windows)
        .unwrap_or_default()
        .into_iter()
        .map(|(min, max)| AddressSpace::new_io(min, max, None))
        .collect();
    // The layout check keeps mmio32 below 4 GiB.
    let mmio32 = (!segment.mmio32.is_empty()).then(|| {
        AddressSpace::<u32>::new_memory(
            AddressSpaceCacheable::NotCacheable,
            true,
            segment.mmio32.start as u32,
            (segment.mmio32.end - 1) as u32,
            None,
        )
    });
    let mmio64 = (!segment.mmio64.is_empty()).then(|| {
        AddressSpace::<u64>::new_memory(
            AddressSpaceCacheable::NotCacheable,
            true,
            segment.mmio64.start,
            segment.mmio64.end - 1,
            None,
        )
    });

    let mut resources: Vec<&dyn Aml> = vec![&buses];
    if ecam.segment == 0 {
        resources.push(&config_ports);
    }
    resources.extend(io.iter().map(|w| w as &dyn Aml));
    if let Some(w) = &mmio32 {
        resources.push(w);
    }
    if let Some(w) = &mmio64 {
        resources.push(w);
    }

    let hid = Name::new("_HID".into(), &EISAName::new("PNP0A08"));
    let cid = Name::new("_CID".into(), &EISAName::new("PNP0A03"));
    let seg = Name::new("_SEG".into(), &ecam.segment);
    let bbn = Name::new("_BBN".into(), &ecam.bus_start);
    let uid = Name::new("_UID".into(), &ecam.segment);
    let crs = Name::new("_CRS".into(), &ResourceTemplate::new(resources));
    let name = bridge_name(ecam.segment);
    let mut bridge = aml_bytes(&Device::new(
        name.as_str().into(),
        vec![&hid, &cid, &seg, &bbn, &uid, &crs],
    ));
    if let Some(hotplug) = &segment.hotplug {
        let path = format!("\\_SB_.{name}");
        bridge.extend(Scope::raw(Path::new(&path), hotplug_slots(&path, hotplug)));
    }
    bridge
}

/// The AML name of hotplug slot `device`: `SL` and its number in hex.
fn slot_name(device: u8) -> String {
    format!("SL{device:02X}")
}

/// Inside the bridge at `bridge` (`\_SB_.PC00`): the segment's controller's registers as
/// fields, one device per slot and `PCNT`.
///
/// Linux's acpiphp takes every device under the host bridge that has `_ADR` and `_EJ0` for a
/// hotplug slot. Notify 1 (device check) makes it scan the slot and probe what it finds;
/// Notify 3 (eject request) makes it unbind and remove the slot's functions and then run
/// `_EJ0`, whose write tells the VMM the device is released.
fn hotplug_slots(bridge: &str, hotplug: &PciHotplug) -> Vec<u8> {
    let port = usize::from(hotplug.port);
    let len = usize::from(PCI_HOTPLUG_PORTS);
    let region = OpRegion::new("PHPR".into(), OpRegionSpace::SystemIO, &port, &len);
    let field = Field::new(
        "PHPR".into(),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![
            FieldEntry::Named(*b"PCIU", 32),
            FieldEntry::Named(*b"PCID", 32),
            FieldEntry::Named(*b"B0EJ", 32),
        ],
    );
    let mut aml = aml_bytes(&region);
    aml.extend(aml_bytes(&field));
    let eject_register = Path::new(&format!("{bridge}.B0EJ"));
    for device in hotplug.slots.clone() {
        let adr = Name::new("_ADR".into(), &(u32::from(device) << 16));
        let sun = Name::new("_SUN".into(), &u32::from(device));
        let bit = 1u32 << device;
        let eject = Store::new(&eject_register, &bit);
        let ej0 = Method::new("_EJ0".into(), 1, false, vec![&eject]);
        aml.extend(aml_bytes(&Device::new(
            slot_name(device).as_str().into(),
            vec![&adr, &sun, &ej0],
        )));
    }
    aml.extend(slot_notifications(bridge, hotplug));
    aml
}

/// `PCNT`: reads both bitmaps once (reading clears them), then notifies each slot named: 1
/// (device check) for the slots up, 3 (eject request) for the slots down.
fn slot_notifications(bridge: &str, hotplug: &PciHotplug) -> Vec<u8> {
    let (up_register, down_register) = (Path::new("PCIU"), Path::new("PCID"));
    let up = Store::new(&Local(0), &up_register);
    let down = Store::new(&Local(1), &down_register);
    let slots: Vec<(Path, u32)> = hotplug
        .slots
        .clone()
        .map(|device| {
            let path = format!("{bridge}.{}", slot_name(device));
            (Path::new(&path), 1u32 << device)
        })
        .collect();
    let (device_check, eject_request) = (1u8, 3u8);
    let mut terms: Vec<(And, Equal, Notify)> = Vec::new();
    for (bitmap, event) in [(&Local(0), &device_check), (&Local(1), &eject_request)] {
        for (path, bit) in &slots {
            terms.push((
                And::new(&Local(2), bitmap, bit),
                Equal::new(&Local(2), bit),
                Notify::new(path, event),
            ));
        }
    }
    let ifs: Vec<If> = terms
        .iter()
        .map(|(_, is_set, notify)| If::new(is_set, vec![notify]))
        .collect();
    let mut body: Vec<&dyn Aml> = vec![&up, &down];
    for ((bit, _, _), check) in terms.iter().zip(&ifs) {
        body.push(bit);
        body.push(check);
    }
    aml_bytes(&Method::new("PCNT".into(), 0, true, body))
}

/// `\_SB.COM1` (PNP0501) with its ports and an edge-triggered, active-high interrupt.
fn serial(port: u16, irq: u32) -> Vec<u8> {
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0501"));
    let uid = Name::new("_UID".into(), &1u8);
    let ports = IO::new(port, port, 1, 8);
    let interrupt = Interrupt::new(true, true, false, false, irq);
    let crs = Name::new(
        "_CRS".into(),
        &ResourceTemplate::new(vec![&ports, &interrupt]),
    );
    aml_bytes(&Device::new("COM1".into(), vec![&hid, &uid, &crs]))
}

/// `\_SB.MBRS` (PNP0C02, motherboard resources): every segment's ECAM region, the sleep
/// registers, the event register and the hotplug controllers' registers.
///
/// Linux only uses the MCFG's ECAM region if it finds it reserved, either in the E820 map (the
/// VMM does that too) or among the `_CRS` of PNP0C01/PNP0C02 devices; declaring it here makes
/// the guest not depend on the E820 map alone, and keeps BARs off it. The sleep registers are
/// listed so that nothing else claims those ports.
fn motherboard_resources(layout: &AcpiLayout) -> Vec<u8> {
    // The layout check keeps the ECAM regions below 4 GiB.
    let ecams: Vec<Memory32Fixed> = layout
        .segments
        .iter()
        .map(|segment| {
            let region = segment.ecam.region();
            Memory32Fixed::new(
                true,
                region.start as u32,
                (region.end - region.start) as u32,
            )
        })
        .collect();
    let control = layout.sleep.control_port;
    let status = layout.sleep.status_port;
    let control_port = IO::new(control, control, 1, 1);
    let status_port = IO::new(status, status, 1, 1);
    let events = layout.events.map(|e| IO::new(e.port, e.port, 1, 1));
    let hotplug: Vec<IO> = layout
        .hotplug()
        .map(|(_, h)| IO::new(h.port, h.port, 1, PCI_HOTPLUG_PORTS as u8))
        .collect();
    let mut resources: Vec<&dyn Aml> = ecams.iter().map(|e| e as &dyn Aml).collect();
    resources.push(&control_port);
    if status != control {
        resources.push(&status_port);
    }
    if let Some(events) = &events {
        resources.push(events);
    }
    resources.extend(hotplug.iter().map(|h| h as &dyn Aml));

    let hid = Name::new("_HID".into(), &EISAName::new("PNP0C02"));
    let uid = Name::new("_UID".into(), &0u8);
    let crs = Name::new("_CRS".into(), &ResourceTemplate::new(resources));
    aml_bytes(&Device::new("MBRS".into(), vec![&hid, &uid, &crs]))
}

/// `\_SB.PWRB`, the power button as a control-method device (the FADT's `PWR_BUTTON` flag
/// says there is no fixed-feature one), which Linux's `button` driver turns into KEY_POWER.
fn power_button() -> Vec<u8> {
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0C0C"));
    let uid = Name::new("_UID".into(), &0u8);
    aml_bytes(&Device::new("PWRB".into(), vec![&hid, &uid]))
}

/// `\_SB.GED_`, the Generic Event Device: Linux runs its `_EVT` on each edge of the interrupt;
/// `_EVT` reads (and so clears) the event register, notifies the power button (0x80: pressed)
/// if its bit is set, and runs the `PCNT` of each segment in `hotplug` if theirs is.
fn generic_event_device(events: &GenericEvents, hotplug: &[u16]) -> Vec<u8> {
    let hid = Name::new("_HID".into(), &"ACPI0013");
    let uid = Name::new("_UID".into(), &0u8);
    let interrupt = Interrupt::new(true, true, false, false, events.irq);
    let crs = Name::new("_CRS".into(), &ResourceTemplate::new(vec![&interrupt]));
    let port = usize::from(events.port);
    let region = OpRegion::new("GDST".into(), OpRegionSpace::SystemIO, &port, &1usize);
    let field = Field::new(
        "GDST".into(),
        FieldAccessType::Byte,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![FieldEntry::Named(*b"GDAT", 8)],
    );
    let register = Path::new("GDAT");
    let read = Store::new(&Local(0), &register);
    let bit = And::new(&Local(1), &Local(0), &GED_POWER_BUTTON);
    let button = Path::new("\\_SB_.PWRB");
    let notify = Notify::new(&button, &0x80u8);
    let is_set = Equal::new(&Local(1), &GED_POWER_BUTTON);
    let pressed = If::new(&is_set, vec![&notify]);
    let slots_bit = And::new(&Local(2), &Local(0), &GED_PCI_HOTPLUG);
    let pcnts: Vec<MethodCall> = hotplug
        .iter()
        .map(|&segment| {
            let path = format!("\\_SB_.{}.PCNT", bridge_name(segment));
            MethodCall::new(path.as_str().into(), vec![])
        })
        .collect();
    let slots_changed = Equal::new(&Local(2), &GED_PCI_HOTPLUG);
    let changed = If::new(
        &slots_changed,
        pcnts.iter().map(|call| call as &dyn Aml).collect(),
    );
    let mut body: Vec<&dyn Aml> = vec![&read, &bit, &pressed];
    if !hotplug.is_empty() {
        body.extend([&slots_bit as &dyn Aml, &changed]);
    }
    let evt = Method::new("_EVT".into(), 1, true, body);
    aml_bytes(&Device::new(
        "GED_".into(),
        vec![&hid, &uid, &crs, &region, &field, &evt],
    ))
}

/// The DSDT's bytes, header included (checksum left to the caller).
pub(crate) fn build(layout: &AcpiLayout) -> Vec<u8> {
    let mut devices: Vec<Vec<u8>> = layout.segments.iter().map(pci_host_bridge).collect();
    devices.push(motherboard_resources(layout));
    if let Some(s) = &layout.serial {
        devices.push(serial(s.port, s.irq));
    }
    if let Some(events) = &layout.events {
        devices.push(power_button());
        let hotplug: Vec<u16> = layout.hotplug().map(|(segment, _)| segment).collect();
        devices.push(generic_event_device(events, &hotplug));
    }
    let system_bus = Scope::raw(Path::new("\\_SB_"), devices.concat());
    // `_S5_` = { SLP_TYP for the sleep control register, (PM1b SLP_TYP, unused) }. Linux
    // offers ACPI power-off only if this exists and the FADT has both sleep registers.
    let s5 = Name::new("_S5_".into(), &Package::new(vec![&SLEEP_TYPE_S5, &0u8]));

    let mut dsdt = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    dsdt.append_slice(&system_bus);
    dsdt.append_slice(&aml_bytes(&s5));
    dsdt.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_window_is_split_around_the_config_ports() {
        assert_eq!(io_windows(&(0x1000..0x10000)), vec![(0x1000, 0xffff)]);
        assert_eq!(
            io_windows(&(0x0c00..0x2000)),
            vec![(0x0c00, 0x0cf7), (0x0d00, 0x1fff)]
        );
        assert_eq!(io_windows(&(0x0cf8..0x0d00)), vec![]);
        assert_eq!(io_windows(&(0x0400..0x0cf8)), vec![(0x0400, 0x0cf7)]);
    }
}
