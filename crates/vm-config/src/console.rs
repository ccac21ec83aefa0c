//! `SerialConfig` and `ConsoleConfig`: where the COM1 UART's and the virtio-console's output
//! goes (and, on a terminal, where input comes from).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::common::{absent, id, is_false};
use crate::error::{refuse, ConfigError, Problem, Section};
use crate::options::KeyValues;

/// `ConsoleMode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleMode {
    /// No device at all.
    Off,
    Pty,
    Tty,
    File,
    Socket,
    /// The device exists; what the guest writes is discarded.
    Null,
}

/// `SerialConfig`: the COM1 8250 UART. Cloud Hypervisor's default is `Null`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    pub mode: ConsoleMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
}

impl Default for SerialConfig {
    fn default() -> Self {
        SerialConfig {
            file: None,
            mode: ConsoleMode::Null,
            socket: None,
        }
    }
}

/// `ConsoleConfig`: the virtio-console. Cloud Hypervisor's default is `Tty`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    pub mode: ConsoleMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub iommu: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default)]
    pub pci_segment: u16,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        ConsoleConfig {
            file: None,
            mode: ConsoleMode::Tty,
            socket: None,
            iommu: false,
            id: None,
            pci_segment: 0,
        }
    }
}

/// `off|null|tty|file=PATH`, with `,iommu=on` where `dma` (the virtio-console).
fn parse_mode(
    section: Section,
    text: &str,
    dma: bool,
) -> Result<(ConsoleMode, Option<PathBuf>, bool), ConfigError> {
    let known: &[&str] = if dma {
        &["off", "null", "tty", "pty", "file", "socket", "iommu"]
    } else {
        &["off", "null", "tty", "pty", "file", "socket"]
    };
    let kv = KeyValues::parse(section, text, known)?;
    let modes: Vec<(ConsoleMode, Option<&str>)> = [
        ("off", ConsoleMode::Off),
        ("null", ConsoleMode::Null),
        ("tty", ConsoleMode::Tty),
        ("pty", ConsoleMode::Pty),
        ("file", ConsoleMode::File),
        ("socket", ConsoleMode::Socket),
    ]
    .into_iter()
    .filter_map(|(key, mode)| kv.get(key).map(|value| (mode, Some(value))))
    .collect();
    let iommu = dma && kv.switch("iommu", false)?;
    match modes.as_slice() {
        [(ConsoleMode::File, Some(""))] => refuse(
            section,
            "file",
            Problem::Syntax("file= needs a path".into()),
        ),
        [(ConsoleMode::File, Some(path))] => {
            Ok((ConsoleMode::File, Some(PathBuf::from(path)), iommu))
        }
        [(mode, _)] => Ok((*mode, None, iommu)),
        _ => refuse(
            section,
            "mode",
            Problem::Syntax(format!(
                "'{text}' must name exactly one of off, null, tty, pty or file=PATH"
            )),
        ),
    }
}

/// The modes warden has: `Socket` is not yet, and `File` needs its file. A `Pty`'s `file` is
/// the path warden gives its pseudo-terminal when the VM is created (what a client asked for
/// there is replaced).
fn validate_mode(
    section: Section,
    mode: ConsoleMode,
    file: &Option<PathBuf>,
    socket: &Option<PathBuf>,
) -> Result<(), ConfigError> {
    match mode {
        ConsoleMode::Socket => refuse(
            section,
            "mode",
            Problem::UnsupportedValue(format!("{mode:?}")),
        ),
        ConsoleMode::File if file.as_ref().is_none_or(|f| f.as_os_str().is_empty()) => {
            refuse(section, "file", Problem::Required)
        }
        _ => absent(section, "socket", socket),
    }
}

impl SerialConfig {
    /// `--serial off|null|tty|pty|file=PATH`.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let (mode, file, _) = parse_mode(Section::Serial, text, false)?;
        Ok(SerialConfig {
            file,
            mode,
            socket: None,
        })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_mode(Section::Serial, self.mode, &self.file, &self.socket)
    }
}

impl ConsoleConfig {
    /// `--console off|null|tty|pty|file=PATH[,iommu=on]`.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let (mode, file, iommu) = parse_mode(Section::Console, text, true)?;
        Ok(ConsoleConfig {
            file,
            mode,
            iommu,
            ..Default::default()
        })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_mode(Section::Console, self.mode, &self.file, &self.socket)?;
        id(Section::Console, self.id.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_as_cloud_hypervisor_writes_them() {
        let serial = SerialConfig::parse("file=/tmp/serial.log").unwrap();
        assert_eq!(serial.mode, ConsoleMode::File);
        let console = ConsoleConfig::parse("null,iommu=on").unwrap();
        assert_eq!((console.mode, console.iommu), (ConsoleMode::Null, true));
        assert!(SerialConfig::parse("tty,null").is_err());
        assert!(
            SerialConfig::parse("tty,iommu=on").is_err(),
            "the UART does no DMA"
        );
        let json: SerialConfig = serde_json::from_str(r#"{"mode":"Pty"}"#).unwrap();
        assert!(json.validate().is_ok());
        assert_eq!(SerialConfig::parse("pty").unwrap(), json);
        let json: SerialConfig =
            serde_json::from_str(r#"{"mode":"Socket","socket":"/tmp/s"}"#).unwrap();
        assert_eq!(
            json.validate().unwrap_err().to_string(),
            "serial.mode: Socket is not supported by warden"
        );
        let json: ConsoleConfig = serde_json::from_str(r#"{"mode":"File"}"#).unwrap();
        assert_eq!(
            json.validate().unwrap_err().to_string(),
            "console.file is required"
        );
    }
}
