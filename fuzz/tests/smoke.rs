//! Every fuzz target over its committed seeds and a few thousand inputs from a seeded
//! generator: seconds, on stable, so a target that stops building or starts panicking on
//! simple input is noticed by `cargo test` without libFuzzer.

use std::path::Path;

/// Random inputs per target.
const RANDOM_INPUTS: usize = 4000;

/// xorshift64*: deterministic, so a failure reproduces from its index.
struct Inputs(u64);

impl Inputs {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// An input of up to 1 KiB; short ones are common, as most parsers stop early.
    fn input(&mut self) -> Vec<u8> {
        let len = (self.next_u64() % 1024) as usize >> (self.next_u64() % 4);
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

fn run_target(name: &str, target: fn(&[u8])) {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(name);
    let mut seeded = 0;
    for entry in std::fs::read_dir(&seeds).unwrap_or_else(|e| panic!("{seeds:?}: {e}")) {
        target(&std::fs::read(entry.unwrap().path()).unwrap());
        seeded += 1;
    }
    assert!(seeded > 0, "{name} has no seeds");
    let mut inputs = Inputs(0x9e37_79b9_7f4a_7c15 ^ name.len() as u64);
    for _ in 0..RANDOM_INPUTS {
        target(&inputs.input());
    }
}

#[test]
fn request_queue() {
    run_target("request_queue", virtio_iommu_fuzz::request_queue::run);
}

#[test]
fn block() {
    run_target("block", virtio_iommu_fuzz::block::run);
}

#[test]
fn net() {
    run_target("net", virtio_iommu_fuzz::net::run);
}

#[test]
fn chain_walk() {
    run_target("chain_walk", virtio_iommu_fuzz::chain_walk::run);
}

#[test]
fn console() {
    run_target("console", virtio_iommu_fuzz::console::run);
}

#[test]
fn rng() {
    run_target("rng", virtio_iommu_fuzz::rng::run);
}

#[test]
fn msix() {
    run_target("msix", virtio_iommu_fuzz::msix::run);
}

#[test]
fn pci_config() {
    run_target("pci_config", virtio_iommu_fuzz::pci_config::run);
}

#[test]
fn virtio_pci_registers() {
    run_target(
        "virtio_pci_registers",
        virtio_iommu_fuzz::virtio_pci_registers::run,
    );
}

#[test]
fn vfio_caps() {
    run_target("vfio_caps", virtio_iommu_fuzz::vfio_caps::run);
}

#[test]
fn iommu_domains() {
    run_target("iommu_domains", virtio_iommu_fuzz::iommu_domains::run);
}
