//! The VM's configuration in Cloud Hypervisor's shape: its OpenAPI `VmConfig` and the objects
//! it holds, with its field names and its defaults for what a body leaves out, so that
//! `vm.create` takes what its clients send and `vm.info` gives back what they read.
//!
//! One model for every way a VM is described: the command line parses its options into it
//! (each section's `parse`, Cloud Hypervisor's `key=value` syntax), `vm.create` and the
//! `vm.add-*` calls deserialize it, and [`VmConfig::validate`] decides once what warden can
//! build. A field warden cannot honour is refused naming the field (never ignored), except
//! unknown keys, which serde skips as Cloud Hypervisor's own server does.

mod common;
pub mod console;
pub mod cpus;
pub mod device;
pub mod disk;
mod error;
pub mod fs;
pub mod memory;
pub mod net;
pub mod options;
pub mod payload;
pub mod platform;
pub mod rng;
pub mod vsock;

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

pub use common::MAX_QUEUE_SIZE;
pub use console::{ConsoleConfig, ConsoleMode, SerialConfig};
pub use cpus::{CpuTopology, CpusConfig};
pub use device::DeviceConfig;
pub use disk::DiskConfig;
pub use error::{ConfigError, Problem, Section};
pub use fs::FsConfig;
pub use memory::{MemoryBacking, MemoryConfig};
pub use net::NetConfig;
pub use net_util::MacAddr;
pub use payload::PayloadConfig;
pub use platform::{PlatformConfig, MAX_PCI_SEGMENTS};
pub use rng::RngConfig;
pub use vsock::VsockConfig;

use error::refuse;

/// The id `vm.info` and `vm.counters` give the virtio-iommu; its domains' counters are
/// `virtio-iommu-domain-N`, so no device may take an id beginning with it.
pub const IOMMU_ID: &str = "virtio-iommu";

/// Devices Cloud Hypervisor has and warden does not yet: refused by name when given.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotYet {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pmem: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vdpa: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_devices: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generic_vhost_user: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtc: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_segments: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_groups: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub landlock_rules: Option<serde_json::Value>,
    /// Accepted when its mode is `Off` (Cloud Hypervisor's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debug_console: Option<serde_json::Value>,
}

impl NotYet {
    fn validate(&self) -> Result<(), ConfigError> {
        let given = [
            ("balloon", &self.balloon),
            ("pmem", &self.pmem),
            ("vdpa", &self.vdpa),
            ("user_devices", &self.user_devices),
            ("generic_vhost_user", &self.generic_vhost_user),
            ("numa", &self.numa),
            ("rtc", &self.rtc),
            ("tpm", &self.tpm),
            ("pci_segments", &self.pci_segments),
            ("rate_limit_groups", &self.rate_limit_groups),
            ("landlock_rules", &self.landlock_rules),
        ];
        for (key, value) in given {
            if value.as_ref().is_some_and(|v| !v.is_null()) {
                return refuse(Section::Vm, key, Problem::Unsupported);
            }
        }
        match self.debug_console.as_ref().and_then(|d| d.get("mode")) {
            None => Ok(()),
            Some(mode) if mode == "Off" => Ok(()),
            Some(mode) => refuse(
                Section::Vm,
                "debug_console",
                Problem::UnsupportedValue(format!("mode {mode}")),
            ),
        }
    }
}

/// `VmConfig`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    #[serde(default)]
    pub cpus: CpusConfig,
    #[serde(default)]
    pub memory: MemoryConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<PayloadConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net: Vec<NetConfig>,
    #[serde(default)]
    pub rng: RngConfig,
    #[serde(default)]
    pub serial: SerialConfig,
    #[serde(default)]
    pub console: ConsoleConfig,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fs: Vec<FsConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// The machine has a virtio-iommu: asked for, or because a device sits behind it.
    #[serde(default)]
    pub iommu: bool,
    #[serde(default)]
    pub pvpanic: bool,
    #[serde(default)]
    pub watchdog: bool,
    #[serde(default)]
    pub landlock_enable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<PlatformConfig>,
    #[serde(flatten)]
    pub not_yet: NotYet,
}

impl VmConfig {
    /// The platform section, Cloud Hypervisor's defaults when none was given.
    pub fn platform(&self) -> PlatformConfig {
        self.platform.clone().unwrap_or_default()
    }

    /// What the guest boots, once validated.
    pub fn payload(&self) -> PayloadConfig {
        self.payload.clone().unwrap_or_default()
    }

    /// Whether warden can build this machine: every section, and what they must agree on
    /// (ids and taps used once, segments that exist, one terminal).
    pub fn validate(&self) -> Result<(), ConfigError> {
        match &self.payload {
            Some(payload) => payload.validate()?,
            None => return refuse(Section::Payload, "kernel", Problem::Required),
        }
        self.cpus.validate()?;
        self.memory.validate()?;
        let platform = self.platform();
        platform.validate()?;
        self.rng.validate()?;
        self.serial.validate()?;
        self.console.validate()?;
        if self.serial.mode == ConsoleMode::Tty && self.console.mode == ConsoleMode::Tty {
            return refuse(
                Section::Console,
                "mode",
                Problem::Conflict(
                    "only one of serial and console can be Tty; set the other to Null, Off or File",
                ),
            );
        }
        for (i, disk) in self.disks.iter().enumerate() {
            disk.validate().map_err(|e| e.at(i))?;
        }
        for (i, net) in self.net.iter().enumerate() {
            net.validate().map_err(|e| e.at(i))?;
            if let Some(tap) = &net.tap {
                if self.net[..i]
                    .iter()
                    .any(|other| other.tap.as_ref() == Some(tap))
                {
                    return Err(ConfigError::new(
                        Section::Net,
                        "tap",
                        Problem::DuplicateTap(tap.clone()),
                    )
                    .at(i));
                }
            }
        }
        for (i, device) in self.devices.iter().enumerate() {
            device.validate().map_err(|e| e.at(i))?;
        }
        for (i, fs) in self.fs.iter().enumerate() {
            fs.validate().map_err(|e| e.at(i))?;
        }
        if !self.fs.is_empty() && !self.memory.shared {
            return refuse(
                Section::Memory,
                "shared",
                Problem::Conflict(
                    "virtio-fs needs guest RAM its vhost-user back end can map: set shared=on",
                ),
            );
        }
        if let Some(vsock) = &self.vsock {
            vsock.validate()?;
        }
        for (section, index, segment) in self.segments() {
            if segment >= platform.num_pci_segments {
                let err = ConfigError::new(
                    section,
                    "pci_segment",
                    Problem::OutOfRange {
                        value: u64::from(segment),
                        min: 0,
                        max: u64::from(platform.num_pci_segments - 1),
                    },
                );
                return Err(match index {
                    Some(i) => err.at(i),
                    None => err,
                });
            }
        }
        self.validate_ids()?;
        common::off(Section::Vm, "pvpanic", self.pvpanic)?;
        common::off(Section::Vm, "watchdog", self.watchdog)?;
        common::off(Section::Vm, "landlock_enable", self.landlock_enable)?;
        self.not_yet.validate()
    }

    /// Every device's PCI segment, with its section and index.
    fn segments(&self) -> Vec<(Section, Option<usize>, u16)> {
        let mut segments = vec![
            (Section::Rng, None, self.rng.pci_segment),
            (Section::Console, None, self.console.pci_segment),
        ];
        segments.extend(
            self.disks
                .iter()
                .enumerate()
                .map(|(i, d)| (Section::Disks, Some(i), d.pci_segment)),
        );
        segments.extend(
            self.net
                .iter()
                .enumerate()
                .map(|(i, n)| (Section::Net, Some(i), n.pci_segment)),
        );
        segments.extend(
            self.devices
                .iter()
                .enumerate()
                .map(|(i, d)| (Section::Devices, Some(i), d.pci_segment)),
        );
        segments.extend(
            self.fs
                .iter()
                .enumerate()
                .map(|(i, f)| (Section::Fs, Some(i), f.pci_segment)),
        );
        segments.extend(
            self.vsock
                .iter()
                .map(|v| (Section::Vsock, None, v.pci_segment)),
        );
        segments
    }

    /// The ids given, with their section and index.
    fn given_ids(&self) -> Vec<(Section, Option<usize>, &str)> {
        let mut ids = Vec::new();
        ids.extend(self.rng.id.as_deref().map(|id| (Section::Rng, None, id)));
        ids.extend(
            self.console
                .id
                .as_deref()
                .map(|id| (Section::Console, None, id)),
        );
        ids.extend(
            self.disks
                .iter()
                .enumerate()
                .filter_map(|(i, d)| Some((Section::Disks, Some(i), d.id.as_deref()?))),
        );
        ids.extend(
            self.net
                .iter()
                .enumerate()
                .filter_map(|(i, n)| Some((Section::Net, Some(i), n.id.as_deref()?))),
        );
        ids.extend(
            self.devices
                .iter()
                .enumerate()
                .filter_map(|(i, d)| Some((Section::Devices, Some(i), d.id.as_deref()?))),
        );
        ids.extend(
            self.fs
                .iter()
                .enumerate()
                .filter_map(|(i, f)| Some((Section::Fs, Some(i), f.id.as_deref()?))),
        );
        ids.extend(
            self.vsock
                .iter()
                .filter_map(|v| Some((Section::Vsock, None, v.id.as_deref()?))),
        );
        ids
    }

    /// Ids name one device each, and none is the virtio-iommu's.
    fn validate_ids(&self) -> Result<(), ConfigError> {
        let mut seen = BTreeSet::new();
        for (section, index, id) in self.given_ids() {
            let problem = if id.starts_with(IOMMU_ID) {
                Some(Problem::BadId(id.to_string()))
            } else if !seen.insert(id) {
                Some(Problem::DuplicateId(id.to_string()))
            } else {
                None
            };
            if let Some(problem) = problem {
                let err = ConfigError::new(section, "id", problem);
                return Err(match index {
                    Some(i) => err.at(i),
                    None => err,
                });
            }
        }
        Ok(())
    }

    /// Takes the device `id` out (a disk, net, passed-through device, share or the vsock: what
    /// `vm.remove-device` removes); whether there was one.
    pub fn remove_device(&mut self, id: &str) -> bool {
        let named = |given: &Option<String>| given.as_deref() == Some(id);
        let count = |c: &Self| c.disks.len() + c.net.len() + c.devices.len() + c.fs.len();
        let before = count(self);
        self.disks.retain(|d| !named(&d.id));
        self.net.retain(|n| !named(&n.id));
        self.devices.retain(|d| !named(&d.id));
        self.fs.retain(|f| !named(&f.id));
        let vsock = self.vsock.take_if(|v| named(&v.id)).is_some();
        vsock || count(self) < before
    }

    /// Whether an id is taken by a device of this configuration.
    pub fn has_id(&self, id: &str) -> bool {
        self.given_ids().iter().any(|&(_, _, given)| given == id)
    }

    /// Settles what a validated configuration leaves open, as Cloud Hypervisor does when it
    /// builds the machine, so that `vm.info` lists what the guest has: devices on the
    /// platform's IOMMU segments sit behind the IOMMU (Kata's IOMMU mode leaves its root disk's
    /// flag off on such a segment: warden protects it rather than refuse it), the machine has
    /// a virtio-iommu if any device sits behind it, each device without an id gets Cloud
    /// Hypervisor's (`_disk0`, `_net0`, `_vfio0`, `_fs0`, `_vsock0`, the first free), and each net without a MAC a
    /// random locally administered one.
    pub fn resolve(&mut self) -> std::io::Result<()> {
        let platform = self.platform();
        let protect = |iommu: &mut bool, segment: u16| *iommu |= platform.protects(segment);
        protect(&mut self.rng.iommu, self.rng.pci_segment);
        protect(&mut self.console.iommu, self.console.pci_segment);
        for disk in &mut self.disks {
            protect(&mut disk.iommu, disk.pci_segment);
        }
        for net in &mut self.net {
            protect(&mut net.iommu, net.pci_segment);
        }
        for device in &mut self.devices {
            protect(&mut device.iommu, device.pci_segment);
        }
        for fs in &mut self.fs {
            protect(&mut fs.iommu, fs.pci_segment);
        }
        if let Some(vsock) = &mut self.vsock {
            protect(&mut vsock.iommu, vsock.pci_segment);
        }
        self.iommu |= platform
            .iommu_segments
            .as_ref()
            .is_some_and(|s| !s.is_empty())
            || (self.console.mode != ConsoleMode::Off && self.console.iommu)
            || self.rng.iommu
            || self.disks.iter().any(|d| d.iommu)
            || self.net.iter().any(|n| n.iommu)
            || self.devices.iter().any(|d| d.iommu)
            || self.fs.iter().any(|f| f.iommu)
            || self.vsock.as_ref().is_some_and(|v| v.iommu);
        for i in 0..self.disks.len() {
            if self.disks[i].id.is_none() {
                self.disks[i].id = Some(self.free_id("_disk"));
            }
        }
        for i in 0..self.net.len() {
            if self.net[i].id.is_none() {
                self.net[i].id = Some(self.free_id("_net"));
            }
            if self.net[i].mac.is_none() {
                self.net[i].mac = Some(MacAddr::random_local()?);
            }
        }
        for i in 0..self.devices.len() {
            if self.devices[i].id.is_none() {
                self.devices[i].id = Some(self.free_id("_vfio"));
            }
        }
        for i in 0..self.fs.len() {
            if self.fs[i].id.is_none() {
                self.fs[i].id = Some(self.free_id("_fs"));
            }
        }
        if self.vsock.as_ref().is_some_and(|v| v.id.is_none()) {
            let id = self.free_id("_vsock");
            if let Some(vsock) = &mut self.vsock {
                vsock.id = Some(id);
            }
        }
        Ok(())
    }

    /// The first `{prefix}{n}` no device has.
    pub fn free_id(&self, prefix: &str) -> String {
        (0..)
            .map(|n| format!("{prefix}{n}"))
            .find(|id| !self.has_id(id))
            .expect("fewer devices than numbers")
    }
}

#[cfg(test)]
mod tests;
