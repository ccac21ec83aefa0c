//! `MemoryConfig`: guest RAM and what backs it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::common::absent;
use crate::error::{refuse, ConfigError, Problem, Section};
use crate::options::KeyValues;

/// The least guest RAM warden boots with: the kernel, its page tables and an initramfs.
pub const MIN_MEMORY: u64 = 64 << 20;
/// Cloud Hypervisor's default guest RAM.
pub const DEFAULT_MEMORY: u64 = 512 << 20;

const SECTION: Section = Section::Memory;

/// `HotplugMethod`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HotplugMethod {
    #[default]
    Acpi,
    VirtioMem,
}

/// `MemoryConfig`. Given as an object, `size` is required, as in Cloud Hypervisor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryConfig {
    pub size: u64,
    /// Pages the host may merge with identical ones (KSM, `MADV_MERGEABLE`).
    #[serde(default)]
    pub mergeable: bool,
    #[serde(default)]
    pub hotplug_method: HotplugMethod,
    /// Room for RAM added later. Recorded: warden has no memory hotplug yet, so `vm.resize`
    /// cannot go past `size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplug_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplugged_size: Option<u64>,
    /// Map the backing `MAP_SHARED`, visible to other processes (vhost-user back ends).
    #[serde(default)]
    pub shared: bool,
    /// Back RAM with huge pages (an anonymous `MFD_HUGETLB` memfd).
    #[serde(default)]
    pub hugepages: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugepage_size: Option<u64>,
    /// Fault every page in at start (`MAP_POPULATE`).
    #[serde(default)]
    pub prefault: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zones: Option<serde_json::Value>,
    /// Ask for transparent huge pages on anonymous RAM (`MADV_HUGEPAGE`; off:
    /// `MADV_NOHUGEPAGE`).
    #[serde(default = "crate::common::yes")]
    pub thp: bool,
    /// warden's own: a file, or a directory (a hugetlbfs mount) to make an unlinked file in,
    /// to back RAM with (`--memory file=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
}

impl Default for MemoryConfig {
    /// Cloud Hypervisor's: 512 MiB of anonymous memory.
    fn default() -> Self {
        MemoryConfig {
            size: DEFAULT_MEMORY,
            mergeable: false,
            hotplug_method: HotplugMethod::Acpi,
            hotplug_size: None,
            hotplugged_size: None,
            shared: false,
            hugepages: false,
            hugepage_size: None,
            prefault: false,
            zones: None,
            thp: true,
            file: None,
        }
    }
}

/// What backs guest RAM, from the fields that choose it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemoryBacking<'a> {
    /// Private anonymous memory.
    Anonymous,
    /// A file, or an unlinked file created inside a directory (e.g. a hugetlbfs mount).
    File(&'a std::path::Path),
    /// A `memfd` with `MFD_HUGETLB`: huge pages without a mounted hugetlbfs.
    Hugepages,
}

impl MemoryConfig {
    /// `--memory size=SIZE[,file=PATH][,hugepages=on][,shared=on][,prefault=on][,thp=off]
    /// [,mergeable=on][,hotplug_size=SIZE]`.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let kv = KeyValues::parse(
            SECTION,
            text,
            &[
                "size",
                "file",
                "hugepages",
                "shared",
                "prefault",
                "thp",
                "mergeable",
                "hotplug_size",
            ],
        )?;
        let size = kv
            .size("size")?
            .ok_or_else(|| ConfigError::new(SECTION, "size", Problem::Required))?;
        if kv.get("file") == Some("") {
            return refuse(
                SECTION,
                "file",
                Problem::Syntax("file= needs a path".into()),
            );
        }
        Ok(MemoryConfig {
            size,
            file: kv.given("file").map(PathBuf::from),
            hugepages: kv.switch("hugepages", false)?,
            shared: kv.switch("shared", false)?,
            prefault: kv.switch("prefault", false)?,
            thp: kv.switch("thp", true)?,
            mergeable: kv.switch("mergeable", false)?,
            hotplug_size: kv.size("hotplug_size")?,
            ..Default::default()
        })
    }

    pub fn backing(&self) -> MemoryBacking<'_> {
        match (&self.file, self.hugepages) {
            (Some(path), _) => MemoryBacking::File(path),
            (None, true) => MemoryBacking::Hugepages,
            (None, false) => MemoryBacking::Anonymous,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.size < MIN_MEMORY {
            return refuse(
                SECTION,
                "size",
                Problem::Syntax(format!(
                    "{} is too small; give at least {} MiB",
                    self.size,
                    MIN_MEMORY >> 20
                )),
            );
        }
        if self.file.is_some() && self.hugepages {
            return refuse(
                SECTION,
                "hugepages",
                Problem::Conflict("file and hugepages exclude each other; for huge pages from a hugetlbfs mount give file=/dev/hugepages alone"),
            );
        }
        if self.shared && self.mergeable {
            return refuse(
                SECTION,
                "mergeable",
                Problem::Conflict("shared memory cannot be mergeable"),
            );
        }
        if self.hotplug_method == HotplugMethod::VirtioMem {
            return refuse(
                SECTION,
                "hotplug_method",
                Problem::UnsupportedValue("VirtioMem".into()),
            );
        }
        absent(SECTION, "hotplugged_size", &self.hotplugged_size)?;
        absent(SECTION, "hugepage_size", &self.hugepage_size)?;
        absent(SECTION, "zones", &self.zones)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_and_json_agree_on_defaults() {
        let parsed = MemoryConfig::parse("size=512M").unwrap();
        let json: MemoryConfig = serde_json::from_str(r#"{"size":536870912}"#).unwrap();
        assert_eq!(parsed, json);
        assert!(json.thp);
        assert_eq!(json.backing(), MemoryBacking::Anonymous);
    }

    #[test]
    fn conflicting_and_unsupported_fields_are_named() {
        let err = |text: &str| {
            MemoryConfig::parse(text)
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string()
        };
        assert!(err("size=32M").starts_with("memory.size: 33554432 is too small"));
        assert!(err("size=1G,file=/dev/hugepages,hugepages=on")
            .starts_with("memory.hugepages: file and hugepages exclude"));
        let zones: MemoryConfig =
            serde_json::from_str(r#"{"size":536870912,"zones":[{"id":"z","size":1}]}"#).unwrap();
        assert_eq!(
            zones.validate().unwrap_err().to_string(),
            "memory.zones is not supported by warden"
        );
        assert!(MemoryConfig::parse("file=/x").is_err(), "size is required");
    }
}
