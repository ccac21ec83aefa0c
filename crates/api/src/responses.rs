//! Response bodies, as Cloud Hypervisor's description gives them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use vm_config::VmConfig;

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

/// `PciDeviceInfo`: where a hot-added device landed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciDeviceInfo {
    pub id: String,
    pub bdf: String,
}
