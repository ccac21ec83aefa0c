//! The VIOT: one virtio-pci IOMMU node and PCI range nodes for exactly the protected devices
//! and the slots kept for protected hotplug.
//!
//! acpi_tables 0.2.1's VIOT builder writes the virtio-pci IOMMU node as segment then BDF, the
//! order ACPI 6.5 (5.2.32.3) and Linux's `struct acpi_viot_virtio_iommu_pci` use (an earlier
//! revision had them swapped); the tests pin that down byte by byte. Its PCI range node sets
//! `endpoint_start` to the first function's BDF alone, so on a segment other than 0 the
//! node's endpoint IDs would be segment 0's: those are set afterwards to the segment's
//! ([`PciBdf::endpoint_id`]).

use std::collections::BTreeMap;

use acpi_tables::viot::{PciDevice, PciRange, VirtIoPciIommu, VIOT};

use crate::{aml_bytes, PciBdf, Viot, OEM_ID, OEM_REVISION, OEM_TABLE_ID};

fn pci_device(dev: &PciBdf) -> PciDevice {
    // The layout check has already rejected device >= 32 and function >= 8, which
    // `PciDevice::new` would panic on.
    PciDevice::new(dev.segment, dev.bus, dev.device, dev.function)
}

/// The protected devices as inclusive runs of consecutive BDFs, in BDF order.
///
/// A PCI range node covers every BDF from its start to its end, so one node per run covers
/// exactly the protected devices: functions 0..n of a multi-function device share a node,
/// while single-function devices at different slots (BDFs 8 apart) each get their own.
/// All devices are in one segment, as the caller groups them.
pub(crate) fn protected_runs(protected: &[PciBdf]) -> Vec<(PciBdf, PciBdf)> {
    let mut devices = protected.to_vec();
    devices.sort_by_key(PciBdf::bdf);
    devices.dedup();
    let mut runs: Vec<(PciBdf, PciBdf)> = Vec::new();
    for dev in devices {
        match runs.last_mut() {
            Some((_, last)) if u32::from(last.bdf()) + 1 == u32::from(dev.bdf()) => *last = dev,
            _ => runs.push((dev, dev)),
        }
    }
    runs
}

/// Where the nodes start (after the header, the node count and offset, and 8 reserved
/// bytes), and where a PCI range node keeps its `endpoint_start`.
const NODES: usize = 48;
const IOMMU_NODE_LEN: usize = 16;
const RANGE_NODE_LEN: usize = 24;
const ENDPOINT_START: usize = 4;

/// The VIOT's bytes (checksum left to the caller).
pub(crate) fn build(viot: &Viot) -> Vec<u8> {
    let mut table = VIOT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let iommu = table.add_virtio_pci_iommu(VirtIoPciIommu::new(pci_device(&viot.iommu)));
    // Every function of a protected slot, so that one node covers the whole range.
    let slots = viot.protected_slots.iter().flat_map(|(segment, slots)| {
        let segment = *segment;
        slots.clone().flat_map(move |device| {
            (0..8).map(move |function| PciBdf::new(segment, 0, device, function))
        })
    });
    let mut by_segment: BTreeMap<u16, Vec<PciBdf>> = BTreeMap::new();
    for dev in viot.protected.iter().copied().chain(slots) {
        by_segment.entry(dev.segment).or_default().push(dev);
    }
    let runs: Vec<(PciBdf, PciBdf)> = by_segment
        .values()
        .flat_map(|devices| protected_runs(devices))
        .collect();
    for (first, last) in &runs {
        table.add_pci_range(PciRange::new(pci_device(first), pci_device(last), &iommu));
    }
    let mut bytes = aml_bytes(&table);
    for (i, (first, _)) in runs.iter().enumerate() {
        let at = NODES + IOMMU_NODE_LEN + i * RANGE_NODE_LEN + ENDPOINT_START;
        bytes[at..at + 4].copy_from_slice(&first.endpoint_id().to_le_bytes());
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_only_consecutive_bdfs() {
        let d = |dev, func| PciBdf::new(0, 0, dev, func);
        let protected = [d(4, 0), d(2, 1), d(2, 0), d(3, 0), d(2, 0), d(2, 2)];
        assert_eq!(
            protected_runs(&protected),
            vec![(d(2, 0), d(2, 2)), (d(3, 0), d(3, 0)), (d(4, 0), d(4, 0))]
        );
        // Function 7 of one slot and function 0 of the next are adjacent BDFs.
        assert_eq!(
            protected_runs(&[d(5, 7), d(6, 0)]),
            vec![(d(5, 7), d(6, 0))]
        );
        assert!(protected_runs(&[]).is_empty());
    }
}
