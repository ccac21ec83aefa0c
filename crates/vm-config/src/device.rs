//! `DeviceConfig`: a host PCI function passed through with VFIO.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::common::{absent, id, is_false};
use crate::error::{refuse, ConfigError, Problem, Section};
use crate::options::KeyValues;

const SECTION: Section = Section::Devices;

/// `DeviceConfig`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceConfig {
    /// Its sysfs directory, e.g. `/sys/bus/pci/devices/0000:01:00.0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Behind the virtio-iommu: its DMA mappings follow the guest's MAP/UNMAP requests instead
    /// of covering all guest RAM.
    #[serde(default, skip_serializing_if = "is_false")]
    pub iommu: bool,
    /// Names the device in `vm.info`, `vm.counters` and messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default)]
    pub pci_segment: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_device_id: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x_nv_gpudirect_clique: Option<u8>,
}

impl DeviceConfig {
    /// `--device path=SYSFS_PATH[,iommu=on][,id=ID][,pci_segment=N]`.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let kv = KeyValues::parse(SECTION, text, &["path", "iommu", "id", "pci_segment"])?;
        Ok(DeviceConfig {
            path: kv.given("path").map(PathBuf::from),
            iommu: kv.switch("iommu", false)?,
            id: kv.given("id").map(String::from),
            pci_segment: kv.number("pci_segment")?.unwrap_or(0),
            ..Default::default()
        })
    }

    /// Its sysfs directory, once validated.
    pub fn path(&self) -> &std::path::Path {
        self.path.as_deref().unwrap_or(std::path::Path::new(""))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        match &self.path {
            None => return refuse(SECTION, "path", Problem::Required),
            Some(path) if !path.is_absolute() => {
                return refuse(
                    SECTION,
                    "path",
                    Problem::Syntax(format!(
                        "{} is not an absolute sysfs path like /sys/bus/pci/devices/0000:01:00.0",
                        path.display()
                    )),
                )
            }
            Some(_) => {}
        }
        absent(SECTION, "pci_device_id", &self.pci_device_id)?;
        absent(
            SECTION,
            "x_nv_gpudirect_clique",
            &self.x_nv_gpudirect_clique,
        )?;
        id(SECTION, self.id.as_deref())
    }
}
