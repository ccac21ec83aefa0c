//! `FsConfig`: a virtio-fs share served by a vhost-user back end (virtiofsd) on a Unix socket.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::common::{absent, id, is_false, queue_size};
use crate::error::{refuse, ConfigError, Problem, Section};
use crate::options::KeyValues;

const SECTION: Section = Section::Fs;
/// The longest tag: the device's configuration space holds 36 bytes (virtio 1.2 §5.11.4).
pub const MAX_TAG_LEN: usize = 36;
/// Request queues a share may have; virtiofsd serves one, Linux asks for up to one per CPU.
pub const MAX_REQUEST_QUEUES: usize = 16;

/// `FsConfig`, with Cloud Hypervisor's defaults: one request queue of 1024 entries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsConfig {
    pub tag: String,
    pub socket: PathBuf,
    #[serde(default = "default_num_queues")]
    pub num_queues: usize,
    #[serde(default = "default_queue_size")]
    pub queue_size: u16,
    /// Not Cloud Hypervisor's (it refuses vhost-user behind its IOMMU); warden takes it to
    /// refuse it with the reason.
    #[serde(default, skip_serializing_if = "is_false")]
    pub iommu: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default)]
    pub pci_segment: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_device_id: Option<u8>,
}

fn default_num_queues() -> usize {
    1
}

fn default_queue_size() -> u16 {
    1024
}

impl Default for FsConfig {
    fn default() -> Self {
        FsConfig {
            tag: String::new(),
            socket: PathBuf::new(),
            num_queues: default_num_queues(),
            queue_size: default_queue_size(),
            iommu: false,
            id: None,
            pci_segment: 0,
            pci_device_id: None,
        }
    }
}

impl FsConfig {
    /// `--fs tag=T,socket=PATH[,num_queues=N][,queue_size=N][,iommu=on][,id=ID][,pci_segment=N]`.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let kv = KeyValues::parse(
            SECTION,
            text,
            &[
                "tag",
                "socket",
                "num_queues",
                "queue_size",
                "iommu",
                "id",
                "pci_segment",
            ],
        )?;
        Ok(FsConfig {
            tag: kv.given("tag").unwrap_or_default().to_string(),
            socket: kv.given("socket").map(PathBuf::from).unwrap_or_default(),
            num_queues: kv.number("num_queues")?.unwrap_or(default_num_queues()),
            queue_size: kv.number("queue_size")?.unwrap_or(default_queue_size()),
            iommu: kv.switch("iommu", false)?,
            id: kv.given("id").map(String::from),
            pci_segment: kv.number("pci_segment")?.unwrap_or(0),
            pci_device_id: None,
        })
    }

    /// A tag the guest can mount by (1 to 36 bytes), a socket, and queues a driver can use.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.tag.is_empty() {
            return refuse(SECTION, "tag", Problem::Required);
        }
        if self.tag.len() > MAX_TAG_LEN {
            return refuse(
                SECTION,
                "tag",
                Problem::OutOfRange {
                    value: self.tag.len() as u64,
                    min: 1,
                    max: MAX_TAG_LEN as u64,
                },
            );
        }
        if self.socket.as_os_str().is_empty() {
            return refuse(SECTION, "socket", Problem::Required);
        }
        if !(1..=MAX_REQUEST_QUEUES).contains(&self.num_queues) {
            return refuse(
                SECTION,
                "num_queues",
                Problem::OutOfRange {
                    value: self.num_queues as u64,
                    min: 1,
                    max: MAX_REQUEST_QUEUES as u64,
                },
            );
        }
        queue_size(SECTION, self.queue_size)?;
        absent(SECTION, "pci_device_id", &self.pci_device_id)?;
        id(SECTION, self.id.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_and_katas_body_describe_the_same_share() {
        let parsed = FsConfig::parse("tag=kataShared,socket=/run/fs.sock,pci_segment=1").unwrap();
        let kata: FsConfig = serde_json::from_str(
            r#"{"tag":"kataShared","socket":"/run/fs.sock","num_queues":1,"queue_size":1024,"pci_segment":1}"#,
        )
        .unwrap();
        assert_eq!(parsed, kata);
        parsed.validate().unwrap();
        assert_eq!(
            serde_json::to_value(&parsed).unwrap(),
            serde_json::json!({"tag": "kataShared", "socket": "/run/fs.sock", "num_queues": 1,
                               "queue_size": 1024, "pci_segment": 1})
        );
    }

    #[test]
    fn a_missing_or_long_tag_a_missing_socket_and_bad_queues_are_refused() {
        let refused = |text: &str, field: &str| {
            let err = FsConfig::parse(text).unwrap().validate().unwrap_err();
            assert!(err.to_string().contains(field), "{text}: {err}");
        };
        refused("socket=/s", "fs.tag is required");
        refused(&format!("tag={},socket=/s", "t".repeat(37)), "fs.tag: 37");
        refused("tag=t", "fs.socket is required");
        refused("tag=t,socket=/s,num_queues=0", "fs.num_queues: 0");
        refused("tag=t,socket=/s,num_queues=17", "fs.num_queues: 17");
        refused("tag=t,socket=/s,queue_size=1000", "fs.queue_size: 1000");
        assert!(FsConfig::parse("tag=t,socket=/s,cache=always").is_err());
        assert!(serde_json::from_str::<FsConfig>(r#"{"tag":"t"}"#).is_err());
    }
}
