//! Fuzz targets of warden's guest-facing parsers, as plain functions of one input so that
//! libFuzzer (`fuzz_targets/`, through cargo-fuzz) and the smoke test (`tests/smoke.rs`, seeds
//! plus seeded random inputs under `cargo test`) run the same code.

pub mod block;
pub mod chain_walk;
pub mod console;
pub mod iommu_domains;
pub mod msix;
pub mod net;
pub mod pci_config;
pub mod request_queue;
pub mod ring;
pub mod rng;
pub mod vfio_caps;
pub mod virtio_pci_registers;
