//! libFuzzer entry point of [`virtio_iommu_fuzz::pci_config`].
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| virtio_iommu_fuzz::pci_config::run(data));
