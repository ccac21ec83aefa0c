//! `PayloadConfig`: what the guest boots.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::common::absent;
use crate::error::{refuse, ConfigError, Problem, Section};

const SECTION: Section = Section::Payload;

/// `PayloadConfig`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<PathBuf>,
    /// An ELF vmlinux (PVH or 64-bit entry) or a bzImage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
}

impl PayloadConfig {
    /// A kernel to boot directly: warden has no firmware.
    pub fn validate(&self) -> Result<(), ConfigError> {
        absent(SECTION, "firmware", &self.firmware)?;
        match &self.kernel {
            Some(kernel) if !kernel.as_os_str().is_empty() => Ok(()),
            _ => refuse(SECTION, "kernel", Problem::Required),
        }
    }

    /// The kernel, once validated.
    pub fn kernel(&self) -> &std::path::Path {
        self.kernel.as_deref().unwrap_or(std::path::Path::new(""))
    }

    pub fn cmdline(&self) -> &str {
        self.cmdline.as_deref().unwrap_or_default()
    }
}
