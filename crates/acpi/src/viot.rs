//! The VIOT: one virtio-pci IOMMU node and PCI range nodes for exactly the protected devices
//! and the slots kept for protected hotplug.
//!
//! acpi_tables 0.2.1's VIOT builder writes the virtio-pci IOMMU node as segment then BDF, the
//! order ACPI 6.5 (5.2.32.3) and Linux's `struct acpi_viot_virtio_iommu_pci` use (an earlier
//! revision had them swapped); the tests pin that down byte by byte.

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
/// All devices are in one segment (the host bridge's), checked by the caller.
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

/// The VIOT's bytes.
pub(crate) fn build(viot: &Viot) -> Vec<u8> {
    let mut table = VIOT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let iommu = table.add_virtio_pci_iommu(VirtIoPciIommu::new(pci_device(&viot.iommu)));
    // Every function of a protected slot, so that one node covers the whole range.
    let slots = viot
        .protected_slots
        .clone()
        .flat_map(|device| (0..8).map(move |function| (device, function)))
        .map(|(device, function)| {
            PciBdf::new(viot.iommu.segment, viot.iommu.bus, device, function)
        });
    let protected: Vec<PciBdf> = viot.protected.iter().copied().chain(slots).collect();
    for (first, last) in protected_runs(&protected) {
        // Sets endpoint_start to first's BDF: see `PciBdf::endpoint_id`.
        table.add_pci_range(PciRange::new(pci_device(&first), pci_device(&last), &iommu));
    }
    aml_bytes(&table)
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
