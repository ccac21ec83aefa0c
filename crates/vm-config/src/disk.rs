//! `DiskConfig`: a virtio-blk disk on a raw image or a host block device.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::common::{absent, id, is_false, off, queue_size};
use crate::error::{refuse, ConfigError, Problem, Section};
use crate::options::KeyValues;

const SECTION: Section = Section::Disks;

/// Most request queues a disk takes: each is a thread and an io_uring.
pub const MAX_DISK_QUEUES: usize = 64;
/// Cloud Hypervisor's queue size when a body gives none.
pub const DEFAULT_DISK_QUEUE_SIZE: u16 = 128;
/// The command line's queue size when `--disk` gives none: deeper than Cloud Hypervisor's
/// default, which a disk at depth fills.
pub const COMMAND_LINE_DISK_QUEUE_SIZE: u16 = 256;

/// `ImageType`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageType {
    FlatVmdk,
    FixedVhd,
    Qcow2,
    Raw,
    Vhdx,
    /// Probed from the image: warden takes every image as raw.
    #[default]
    Unknown,
}

/// `DiskConfig`, with Cloud Hypervisor's defaults for what a body leaves out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub readonly: bool,
    /// `O_DIRECT` on the image.
    #[serde(default)]
    pub direct: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub iommu: bool,
    /// Request queues, each served by its own thread.
    #[serde(default = "default_num_queues")]
    pub num_queues: usize,
    #[serde(default = "default_queue_size")]
    pub queue_size: u16,
    #[serde(default)]
    pub vhost_user: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost_socket: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter_config: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default)]
    pub pci_segment: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_device_id: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_affinity: Option<serde_json::Value>,
    #[serde(default)]
    pub backing_files: bool,
    /// Discards free the image's blocks (warden punches holes).
    #[serde(default = "crate::common::yes")]
    pub sparse: bool,
    #[serde(default)]
    pub image_type: ImageType,
    #[serde(default)]
    pub disable_io_uring: bool,
    #[serde(default)]
    pub disable_aio: bool,
}

fn default_num_queues() -> usize {
    1
}

fn default_queue_size() -> u16 {
    DEFAULT_DISK_QUEUE_SIZE
}

impl Default for DiskConfig {
    fn default() -> Self {
        DiskConfig {
            path: None,
            readonly: false,
            direct: false,
            iommu: false,
            num_queues: 1,
            queue_size: DEFAULT_DISK_QUEUE_SIZE,
            vhost_user: false,
            vhost_socket: None,
            rate_limit_group: None,
            rate_limiter_config: None,
            id: None,
            pci_segment: 0,
            pci_device_id: None,
            serial: None,
            queue_affinity: None,
            backing_files: false,
            sparse: true,
            image_type: ImageType::Unknown,
            disable_io_uring: false,
            disable_aio: false,
        }
    }
}

impl DiskConfig {
    /// `--disk path=PATH[,readonly=on][,direct=on][,num_queues=N][,queue_size=N][,iommu=on]
    /// [,id=ID][,pci_segment=N]`.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let kv = KeyValues::parse(
            SECTION,
            text,
            &[
                "path",
                "readonly",
                "iommu",
                "direct",
                "num_queues",
                "queue_size",
                "id",
                "pci_segment",
            ],
        )?;
        Ok(DiskConfig {
            path: kv.given("path").map(PathBuf::from),
            readonly: kv.switch("readonly", false)?,
            iommu: kv.switch("iommu", false)?,
            direct: kv.switch("direct", false)?,
            num_queues: kv.number("num_queues")?.unwrap_or(1),
            queue_size: kv
                .number("queue_size")?
                .unwrap_or(COMMAND_LINE_DISK_QUEUE_SIZE),
            id: kv.given("id").map(String::from),
            pci_segment: kv.number("pci_segment")?.unwrap_or(0),
            ..Default::default()
        })
    }

    /// The image, once validated.
    pub fn path(&self) -> &std::path::Path {
        self.path.as_deref().unwrap_or(std::path::Path::new(""))
    }

    /// A raw image or block device served by warden's own threads.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.path.as_ref().is_none_or(|p| p.as_os_str().is_empty()) {
            return refuse(SECTION, "path", Problem::Required);
        }
        if !(1..=MAX_DISK_QUEUES).contains(&self.num_queues) {
            return refuse(
                SECTION,
                "num_queues",
                Problem::OutOfRange {
                    value: self.num_queues as u64,
                    min: 1,
                    max: MAX_DISK_QUEUES as u64,
                },
            );
        }
        queue_size(SECTION, self.queue_size)?;
        off(SECTION, "vhost_user", self.vhost_user)?;
        absent(SECTION, "vhost_socket", &self.vhost_socket)?;
        absent(SECTION, "rate_limit_group", &self.rate_limit_group)?;
        absent(SECTION, "rate_limiter_config", &self.rate_limiter_config)?;
        absent(SECTION, "pci_device_id", &self.pci_device_id)?;
        absent(SECTION, "serial", &self.serial)?;
        absent(SECTION, "queue_affinity", &self.queue_affinity)?;
        off(SECTION, "backing_files", self.backing_files)?;
        off(SECTION, "disable_io_uring", self.disable_io_uring)?;
        if !self.sparse {
            return refuse(SECTION, "sparse", Problem::UnsupportedValue("false".into()));
        }
        if !matches!(self.image_type, ImageType::Raw | ImageType::Unknown) {
            return refuse(
                SECTION,
                "image_type",
                Problem::UnsupportedValue(format!(
                    "{:?} (warden reads raw images)",
                    self.image_type
                )),
            );
        }
        id(SECTION, self.id.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_gets_cloud_hypervisors_defaults_and_the_command_line_its_own_queue_size() {
        let json: DiskConfig = serde_json::from_str(r#"{"path":"/d.img"}"#).unwrap();
        assert_eq!((json.num_queues, json.queue_size), (1, 128));
        assert!(json.sparse);
        json.validate().unwrap();
        let parsed = DiskConfig::parse("path=/d.img,iommu=on").unwrap();
        assert_eq!(parsed.queue_size, 256);
        assert!(parsed.iommu);
        assert_eq!(
            serde_json::to_value(&parsed).unwrap()["iommu"],
            serde_json::json!(true)
        );
        assert!(serde_json::to_value(&json).unwrap().get("iommu").is_none());
    }

    /// Kata's body for a hot-added disk, field for field.
    #[test]
    fn katas_disk_body_is_taken() {
        let kata = r#"{"backing_files":false,"direct":false,"image_type":"Raw","iommu":true,"num_queues":1,"path":"/dev/vdx","queue_size":1024,"readonly":false,"sparse":true,"vhost_user":false}"#;
        let disk: DiskConfig = serde_json::from_str(kata).unwrap();
        disk.validate().unwrap();
        assert!(disk.iommu);
    }

    #[test]
    fn what_warden_cannot_do_is_refused_by_name() {
        let refused = |json: &str| {
            serde_json::from_str::<DiskConfig>(json)
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string()
        };
        assert_eq!(refused(r#"{}"#), "disks.path is required");
        assert_eq!(
            refused(r#"{"path":"/d","vhost_user":true}"#),
            "disks.vhost_user is not supported by warden"
        );
        assert_eq!(
            refused(r#"{"path":"/d","image_type":"Qcow2"}"#),
            "disks.image_type: Qcow2 (warden reads raw images) is not supported by warden"
        );
        assert_eq!(
            refused(r#"{"path":"/d","queue_size":100}"#),
            "disks.queue_size: 100 is not a power of two from 2 to 32768"
        );
        assert_eq!(
            refused(r#"{"path":"/d","num_queues":0}"#),
            "disks.num_queues: 0 is not from 1 to 64"
        );
    }
}
