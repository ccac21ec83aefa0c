//! `RngConfig`: the virtio-rng entropy device.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::common::{id, is_false};
use crate::error::{refuse, ConfigError, Problem, Section};
use crate::options::KeyValues;

const SECTION: Section = Section::Rng;

/// `RngConfig`. Given as an object, `src` is required, as in Cloud Hypervisor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngConfig {
    pub src: PathBuf,
    #[serde(default, skip_serializing_if = "is_false")]
    pub iommu: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default)]
    pub pci_segment: u16,
}

impl Default for RngConfig {
    fn default() -> Self {
        RngConfig {
            src: PathBuf::from("/dev/urandom"),
            iommu: false,
            id: None,
            pci_segment: 0,
        }
    }
}

impl RngConfig {
    /// `--rng [src=PATH][,iommu=on]`.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let kv = KeyValues::parse(SECTION, text, &["src", "iommu"])?;
        Ok(RngConfig {
            src: kv
                .given("src")
                .map_or_else(|| RngConfig::default().src, PathBuf::from),
            iommu: kv.switch("iommu", false)?,
            ..Default::default()
        })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.src.as_os_str().is_empty() {
            return refuse(SECTION, "src", Problem::Required);
        }
        id(SECTION, self.id.as_deref())
    }
}
