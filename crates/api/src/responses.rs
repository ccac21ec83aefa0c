//! Response bodies, as Cloud Hypervisor's description gives them, with the fields warden has
//! the data for.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::bodies::{DeviceConfig, DiskConfig, NetConfig};

/// `VmCounters`: device id → counter name → value.
pub type Counters = BTreeMap<String, BTreeMap<String, u64>>;

/// `VmmPingResponse`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmPingResponse {
    pub build_version: String,
    pub version: String,
    pub pid: i64,
    pub features: Vec<String>,
}

/// `VmState`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Created,
    Running,
    Shutdown,
    Paused,
}

/// `VmInfo`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    pub config: VmConfig,
    pub state: VmState,
    pub memory_actual_size: u64,
    pub device_tree: BTreeMap<String, DeviceNode>,
}

/// `DeviceNode`: one device of the machine, by id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceNode {
    pub id: String,
    /// Cloud Hypervisor lists BARs and interrupts here; warden lists none yet.
    pub resources: Vec<serde_json::Value>,
    pub children: Vec<String>,
    /// `segment:bus:device.function`, e.g. `0000:00:03.0`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pci_bdf: Option<String>,
}

/// `VmConfig`, as far as warden has the data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmConfig {
    pub cpus: CpusConfig,
    pub memory: MemoryConfig,
    pub payload: PayloadConfig,
    pub disks: Vec<DiskConfig>,
    pub net: Vec<NetConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rng: Option<RngConfig>,
    pub serial: SerialConfig,
    pub console: ConsoleConfig,
    pub devices: Vec<DeviceConfig>,
    /// Whether the machine has a virtio-iommu.
    pub iommu: bool,
}

/// `CpusConfig`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpusConfig {
    pub boot_vcpus: u8,
    pub max_vcpus: u8,
}

/// `MemoryConfig`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryConfig {
    pub size: u64,
    pub shared: bool,
    pub hugepages: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

/// `PayloadConfig`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadConfig {
    pub kernel: String,
    pub cmdline: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<String>,
}

/// `RngConfig`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngConfig {
    pub src: String,
    pub iommu: bool,
}

/// `SerialConfig`; `mode` is a `ConsoleMode`: `Off`, `Null`, `Tty` or `File`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialConfig {
    pub mode: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

/// `ConsoleConfig`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleConfig {
    pub mode: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    pub iommu: bool,
}

/// `PciDeviceInfo`: where a hot-added device landed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciDeviceInfo {
    pub id: String,
    pub bdf: String,
}
