//! `PlatformConfig`: the machine's PCI segments and what sits behind the IOMMU.

use serde::{Deserialize, Serialize};

use crate::common::{absent, off};
use crate::error::{refuse, ConfigError, Problem, Section};
use crate::options::KeyValues;

const SECTION: Section = Section::Platform;

/// The virtio-iommu's longest poll window when `--platform` gives none.
pub const DEFAULT_IOMMU_POLL_US: u64 = 2000;
/// Longest accepted poll window: a second of spinning is surely a typo.
pub const MAX_IOMMU_POLL_US: u64 = 1_000_000;

/// PCI segments a machine may have: each is a host bridge with its bus 0, its ECAM MiB and a
/// share of the PCI windows (Cloud Hypervisor allows 96; Kata asks for 2).
pub const MAX_PCI_SEGMENTS: u16 = 16;

/// `PlatformConfig`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlatformConfig {
    #[serde(default = "one")]
    pub num_pci_segments: u16,
    /// Every device on these segments sits behind the virtio-iommu, whatever its own `iommu`
    /// says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommu_segments: Option<Vec<u16>>,
    /// The width of the addresses the guest may map through the virtio-iommu.
    #[serde(default = "sixty_four")]
    pub iommu_address_width_bits: u8,
    #[serde(
        default,
        alias = "serial_number",
        skip_serializing_if = "Option::is_none"
    )]
    pub system_serial_number: Option<String>,
    #[serde(default, alias = "uuid", skip_serializing_if = "Option::is_none")]
    pub system_uuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oem_strings: Option<Vec<String>>,
    #[serde(default)]
    pub tdx: bool,
    #[serde(default)]
    pub sev_snp: bool,
    #[serde(default)]
    pub iommufd: bool,
    /// warden's own: the longest (µs) the virtio-iommu polls its request queue after a
    /// request before waiting for a notification again (`--platform iommu_poll_us=`); 0 turns
    /// polling off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommu_poll_us: Option<u64>,
}

fn one() -> u16 {
    1
}

fn sixty_four() -> u8 {
    64
}

impl Default for PlatformConfig {
    fn default() -> Self {
        PlatformConfig {
            num_pci_segments: 1,
            iommu_segments: None,
            iommu_address_width_bits: 64,
            system_serial_number: None,
            system_uuid: None,
            oem_strings: None,
            tdx: false,
            sev_snp: false,
            iommufd: false,
            iommu_poll_us: None,
        }
    }
}

impl PlatformConfig {
    /// `--platform [num_pci_segments=1][,iommu_segments=[0]][,iommu_address_width=N]
    /// [,iommu_poll_us=N]`, and warden's `iommu=on` (returned beside it: it is `VmConfig`'s
    /// `iommu`).
    pub fn parse(text: &str) -> Result<(Self, bool), ConfigError> {
        let kv = KeyValues::parse(
            SECTION,
            text,
            &[
                "num_pci_segments",
                "iommu_segments",
                "iommu_address_width",
                "iommu_poll_us",
                "iommu",
            ],
        )?;
        let platform = PlatformConfig {
            num_pci_segments: kv.number("num_pci_segments")?.unwrap_or(1),
            iommu_segments: kv.numbers("iommu_segments")?,
            iommu_address_width_bits: kv.number("iommu_address_width")?.unwrap_or(64),
            iommu_poll_us: kv.number("iommu_poll_us")?,
            ..Default::default()
        };
        Ok((platform, kv.switch("iommu", false)?))
    }

    /// Whether devices on `segment` sit behind the IOMMU whatever their own flag says.
    pub fn protects(&self, segment: u16) -> bool {
        self.iommu_segments
            .as_ref()
            .is_some_and(|segments| segments.contains(&segment))
    }

    /// The poll window, in microseconds.
    pub fn iommu_poll_us(&self) -> u64 {
        self.iommu_poll_us.unwrap_or(DEFAULT_IOMMU_POLL_US)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=MAX_PCI_SEGMENTS).contains(&self.num_pci_segments) {
            return refuse(
                SECTION,
                "num_pci_segments",
                Problem::OutOfRange {
                    value: u64::from(self.num_pci_segments),
                    min: 1,
                    max: u64::from(MAX_PCI_SEGMENTS),
                },
            );
        }
        for &segment in self.iommu_segments.iter().flatten() {
            if segment >= self.num_pci_segments {
                return refuse(
                    SECTION,
                    "iommu_segments",
                    Problem::OutOfRange {
                        value: u64::from(segment),
                        min: 0,
                        max: u64::from(self.num_pci_segments - 1),
                    },
                );
            }
        }
        if !(1..=64).contains(&self.iommu_address_width_bits) {
            return refuse(
                SECTION,
                "iommu_address_width_bits",
                Problem::OutOfRange {
                    value: u64::from(self.iommu_address_width_bits),
                    min: 1,
                    max: 64,
                },
            );
        }
        if self.iommu_poll_us.is_some_and(|us| us > MAX_IOMMU_POLL_US) {
            return refuse(
                SECTION,
                "iommu_poll_us",
                Problem::OutOfRange {
                    value: self.iommu_poll_us.unwrap_or_default(),
                    min: 0,
                    max: MAX_IOMMU_POLL_US,
                },
            );
        }
        absent(SECTION, "system_serial_number", &self.system_serial_number)?;
        absent(SECTION, "system_uuid", &self.system_uuid)?;
        absent(SECTION, "oem_strings", &self.oem_strings)?;
        off(SECTION, "tdx", self.tdx)?;
        off(SECTION, "sev_snp", self.sev_snp)?;
        off(SECTION, "iommufd", self.iommufd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iommu_segments_protect_their_devices_and_segments_are_bounded() {
        let (platform, iommu) =
            PlatformConfig::parse("iommu_segments=[0],iommu_poll_us=0").unwrap();
        platform.validate().unwrap();
        assert!(platform.protects(0) && !platform.protects(1));
        assert_eq!(platform.iommu_poll_us(), 0);
        assert!(!iommu);
        let kata: PlatformConfig = serde_json::from_str(
            r#"{"num_pci_segments":2,"iommu_segments":[0],"sev_snp":false,"tdx":false}"#,
        )
        .unwrap();
        kata.validate().unwrap();
        for count in [0, MAX_PCI_SEGMENTS + 1] {
            let err = PlatformConfig {
                num_pci_segments: count,
                ..Default::default()
            }
            .validate()
            .unwrap_err();
            assert!(
                err.to_string().starts_with(&format!(
                    "platform.num_pci_segments: {count} is not from 1 to 16"
                )),
                "{err}"
            );
        }
        let (_, iommu) = PlatformConfig::parse("iommu=on").unwrap();
        assert!(iommu);
        let aliased: PlatformConfig = serde_json::from_str(r#"{"uuid":"x"}"#).unwrap();
        assert_eq!(
            aliased.validate().unwrap_err().to_string(),
            "platform.system_uuid is not supported by warden"
        );
    }
}
