//! libFuzzer entry point of [`virtio_iommu_fuzz::console`].
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| virtio_iommu_fuzz::console::run(data));
