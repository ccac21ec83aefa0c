//! `CpusConfig`: how many vCPUs, and what they look like to the guest.

use serde::{Deserialize, Serialize};

use crate::common::{absent, off};
use crate::error::{refuse, ConfigError, Problem, Section};
use crate::options::KeyValues;

/// Most vCPUs: xAPIC IDs are 8 bits and 0xff is the broadcast ID.
pub const MAX_VCPUS: u32 = 254;
/// Cloud Hypervisor's default guest physical address width.
pub const DEFAULT_MAX_PHYS_BITS: u8 = 46;

const SECTION: Section = Section::Cpus;

/// `CpuTopology`: threads per core, cores per die, dies per package, packages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuTopology {
    pub threads_per_core: u16,
    pub cores_per_die: u16,
    pub dies_per_package: u16,
    pub packages: u16,
}

/// `CpuFeatures`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuFeatures {
    #[serde(default)]
    pub amx: bool,
}

/// `CpusConfig`. Given as an object, `boot_vcpus` and `max_vcpus` are required, as in Cloud
/// Hypervisor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpusConfig {
    pub boot_vcpus: u32,
    /// At least `boot_vcpus`; warden has no vCPU hotplug yet, so `vm.resize` cannot go past
    /// `boot_vcpus`.
    pub max_vcpus: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<CpuTopology>,
    #[serde(default)]
    pub kvm_hyperv: bool,
    /// The guest physical address width the vCPUs report (CPUID 0x80000008), at most the
    /// host's.
    #[serde(default = "default_max_phys_bits")]
    pub max_phys_bits: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<serde_json::Value>,
    #[serde(default)]
    pub features: CpuFeatures,
    /// Whether the guest may run its own guests (VMX or SVM in its CPUID).
    #[serde(default = "crate::common::yes")]
    pub nested: bool,
}

fn default_max_phys_bits() -> u8 {
    DEFAULT_MAX_PHYS_BITS
}

impl Default for CpusConfig {
    /// Cloud Hypervisor's: one vCPU.
    fn default() -> Self {
        CpusConfig {
            boot_vcpus: 1,
            max_vcpus: 1,
            topology: None,
            kvm_hyperv: false,
            max_phys_bits: DEFAULT_MAX_PHYS_BITS,
            affinity: None,
            features: CpuFeatures::default(),
            nested: true,
        }
    }
}

impl CpusConfig {
    /// `--cpus`: `N`, or `boot=N[,max=M][,topology=T:C:D:P][,max_phys_bits=B][,nested=on]`.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        if let Ok(count) = text.parse::<u32>() {
            return Ok(CpusConfig {
                boot_vcpus: count,
                max_vcpus: count,
                ..Default::default()
            });
        }
        let kv = KeyValues::parse(
            SECTION,
            text,
            &[
                "boot",
                "max",
                "topology",
                "kvm_hyperv",
                "max_phys_bits",
                "nested",
            ],
        )?;
        let boot_vcpus = kv.number("boot")?.unwrap_or(1);
        let topology = kv.given("topology").map(parse_topology).transpose()?;
        Ok(CpusConfig {
            boot_vcpus,
            max_vcpus: kv.number("max")?.unwrap_or(boot_vcpus),
            topology,
            kvm_hyperv: kv.switch("kvm_hyperv", false)?,
            max_phys_bits: kv.number("max_phys_bits")?.unwrap_or(DEFAULT_MAX_PHYS_BITS),
            nested: kv.switch("nested", true)?,
            ..Default::default()
        })
    }

    /// The vCPU count, the topology warden can describe, and the address width.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=MAX_VCPUS).contains(&self.boot_vcpus) {
            return refuse(
                SECTION,
                "boot_vcpus",
                Problem::OutOfRange {
                    value: u64::from(self.boot_vcpus),
                    min: 1,
                    max: u64::from(MAX_VCPUS),
                },
            );
        }
        if !(self.boot_vcpus..=MAX_VCPUS).contains(&self.max_vcpus) {
            return refuse(
                SECTION,
                "max_vcpus",
                Problem::OutOfRange {
                    value: u64::from(self.max_vcpus),
                    min: u64::from(self.boot_vcpus),
                    max: u64::from(MAX_VCPUS),
                },
            );
        }
        if let Some(topology) = &self.topology {
            validate_topology(topology, self.max_vcpus)?;
        }
        off(SECTION, "kvm_hyperv", self.kvm_hyperv)?;
        absent(SECTION, "affinity", &self.affinity)?;
        off(SECTION, "features.amx", self.features.amx)?;
        if !(32..=64).contains(&self.max_phys_bits) {
            return refuse(
                SECTION,
                "max_phys_bits",
                Problem::OutOfRange {
                    value: u64::from(self.max_phys_bits),
                    min: 32,
                    max: 64,
                },
            );
        }
        Ok(())
    }
}

/// `T:C:D:P`, as Cloud Hypervisor's `--cpus topology=` takes it.
fn parse_topology(text: &str) -> Result<CpuTopology, ConfigError> {
    let parts: Vec<Option<u16>> = text.split(':').map(|p| p.parse().ok()).collect();
    match parts.as_slice() {
        [Some(threads), Some(cores), Some(dies), Some(packages)] => Ok(CpuTopology {
            threads_per_core: *threads,
            cores_per_die: *cores,
            dies_per_package: *dies,
            packages: *packages,
        }),
        _ => refuse(
            SECTION,
            "topology",
            Problem::Syntax(format!(
                "{text} is not threads_per_core:cores_per_die:dies_per_package:packages"
            )),
        ),
    }
}

/// A topology must account for every vCPU; warden describes each vCPU as a core of one
/// package, so that is the topology it takes (what Kata and libvirt ask for).
fn validate_topology(topology: &CpuTopology, max_vcpus: u32) -> Result<(), ConfigError> {
    let CpuTopology {
        threads_per_core,
        cores_per_die,
        dies_per_package,
        packages,
    } = *topology;
    let product = [threads_per_core, cores_per_die, dies_per_package, packages]
        .iter()
        .map(|&n| u32::from(n))
        .product::<u32>();
    if product != max_vcpus {
        return refuse(
            SECTION,
            "topology",
            Problem::Syntax(format!(
                "{threads_per_core}:{cores_per_die}:{dies_per_package}:{packages} makes {product} vCPUs, not max_vcpus {max_vcpus}"
            )),
        );
    }
    if (threads_per_core, dies_per_package, packages) != (1, 1, 1) {
        return refuse(
            SECTION,
            "topology",
            Problem::UnsupportedValue(format!(
                "{threads_per_core}:{cores_per_die}:{dies_per_package}:{packages} (warden describes one thread per core, one die, one package)"
            )),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_count_or_boot_and_max() {
        assert_eq!(CpusConfig::parse("2").unwrap().max_vcpus, 2);
        let cpus = CpusConfig::parse("boot=2,max=4,topology=1:4:1:1").unwrap();
        assert_eq!((cpus.boot_vcpus, cpus.max_vcpus), (2, 4));
        cpus.validate().unwrap();
        assert!(cpus.nested);
        assert_eq!(cpus.max_phys_bits, 46);
    }

    #[test]
    fn counts_topologies_and_features_warden_cannot_give_are_refused_by_name() {
        let err = |text: &str| {
            CpusConfig::parse(text)
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string()
        };
        assert_eq!(err("0"), "cpus.boot_vcpus: 0 is not from 1 to 254");
        assert_eq!(
            err("boot=4,max=2"),
            "cpus.max_vcpus: 2 is not from 4 to 254"
        );
        assert!(err("boot=2,topology=2:1:1:1").contains("warden describes one thread per core"));
        assert!(err("boot=2,topology=1:1:1:1").contains("makes 1 vCPUs"));
        assert_eq!(
            err("boot=1,kvm_hyperv=on"),
            "cpus.kvm_hyperv is not supported by warden"
        );
    }

    #[test]
    fn json_needs_the_counts_and_fills_cloud_hypervisors_defaults() {
        let cpus: CpusConfig = serde_json::from_str(r#"{"boot_vcpus":1,"max_vcpus":8}"#).unwrap();
        assert_eq!(cpus.max_phys_bits, 46);
        assert!(cpus.nested);
        assert!(serde_json::from_str::<CpusConfig>(r#"{"boot_vcpus":1}"#).is_err());
    }
}
