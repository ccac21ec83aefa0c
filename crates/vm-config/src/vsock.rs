//! `VsockConfig`: the virtio-vsock device, its host side on a Unix socket.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::common::{absent, id, is_false};
use crate::error::{refuse, ConfigError, Problem, Section};
use crate::options::KeyValues;

const SECTION: Section = Section::Vsock;
/// Longest socket path, in bytes: `<path>_4294967295` must still fit a Unix socket address.
pub const MAX_SOCKET_PATH: usize = 96;

/// `VsockConfig`: `cid` and `socket` are required, as in Cloud Hypervisor.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    pub cid: u32,
    pub socket: PathBuf,
    #[serde(default, skip_serializing_if = "is_false")]
    pub iommu: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default)]
    pub pci_segment: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_device_id: Option<u8>,
}

impl VsockConfig {
    /// `--vsock cid=N,socket=PATH[,iommu=on][,id=ID][,pci_segment=N]`.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let kv = KeyValues::parse(
            SECTION,
            text,
            &["cid", "socket", "iommu", "id", "pci_segment"],
        )?;
        Ok(VsockConfig {
            cid: kv
                .number("cid")?
                .ok_or_else(|| ConfigError::new(SECTION, "cid", Problem::Required))?,
            socket: kv.given("socket").map(PathBuf::from).unwrap_or_default(),
            iommu: kv.switch("iommu", false)?,
            id: kv.given("id").map(String::from),
            pci_segment: kv.number("pci_segment")?.unwrap_or(0),
            pci_device_id: None,
        })
    }

    /// A guest CID (0 to 2 are the hypervisor's and the host's, `u32::MAX` means any) and a
    /// socket path.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cid < 3 || self.cid == u32::MAX {
            return refuse(
                SECTION,
                "cid",
                Problem::OutOfRange {
                    value: u64::from(self.cid),
                    min: 3,
                    max: u64::from(u32::MAX - 1),
                },
            );
        }
        if self.socket.as_os_str().is_empty() {
            return refuse(SECTION, "socket", Problem::Required);
        }
        // A Unix socket's path holds 107 bytes, and the guest's connections go to
        // `socket_<port>`: up to 11 more.
        let len = self.socket.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return refuse(
                SECTION,
                "socket",
                Problem::OutOfRange {
                    value: len as u64,
                    min: 1,
                    max: MAX_SOCKET_PATH as u64,
                },
            );
        }
        absent(SECTION, "pci_device_id", &self.pci_device_id)?;
        id(SECTION, self.id.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_and_the_api_describe_the_same_device() {
        let parsed = VsockConfig::parse("cid=3,socket=/run/v.sock,iommu=on").unwrap();
        let json: VsockConfig =
            serde_json::from_str(r#"{"cid":3,"socket":"/run/v.sock","iommu":true}"#).unwrap();
        assert_eq!(parsed, json);
        parsed.validate().unwrap();
        assert_eq!(
            serde_json::to_value(&parsed).unwrap(),
            serde_json::json!({"cid": 3, "socket": "/run/v.sock", "iommu": true, "pci_segment": 0})
        );
    }

    #[test]
    fn a_cid_that_is_not_a_guests_and_a_missing_socket_are_refused() {
        for cid in [0, 1, 2, u32::MAX] {
            let err = VsockConfig {
                cid,
                socket: "/run/v.sock".into(),
                ..Default::default()
            }
            .validate()
            .unwrap_err();
            assert!(err.to_string().contains("vsock.cid"), "{err}");
        }
        let err = VsockConfig::parse("cid=3").unwrap().validate().unwrap_err();
        assert!(err.to_string().contains("socket"), "{err}");
        let long = format!("cid=3,socket=/{}", "s".repeat(MAX_SOCKET_PATH));
        let err = VsockConfig::parse(&long).unwrap().validate().unwrap_err();
        assert!(
            err.to_string()
                .contains("vsock.socket: 97 is not from 1 to 96"),
            "{err}"
        );
        let err = VsockConfig::parse("socket=/run/v.sock").unwrap_err();
        assert!(err.to_string().contains("cid"), "{err}");
        assert!(serde_json::from_str::<VsockConfig>(r#"{"cid":3}"#).is_err());
    }
}
