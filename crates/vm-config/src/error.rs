//! Why a configuration is refused: the field, as both the API and the command line name it,
//! and what is wrong with it.

use std::fmt;

/// A part of [`crate::VmConfig`], which the command line gives as one option.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    Cpus,
    Memory,
    Payload,
    Disks,
    Net,
    Rng,
    Serial,
    Console,
    Devices,
    Fs,
    Vsock,
    Platform,
    /// The top level of `VmConfig` (`balloon`, `fs`, ...).
    Vm,
}

impl Section {
    /// Its key in `VmConfig`'s JSON.
    pub fn json(self) -> &'static str {
        match self {
            Section::Cpus => "cpus",
            Section::Memory => "memory",
            Section::Payload => "payload",
            Section::Disks => "disks",
            Section::Net => "net",
            Section::Rng => "rng",
            Section::Serial => "serial",
            Section::Console => "console",
            Section::Devices => "devices",
            Section::Fs => "fs",
            Section::Vsock => "vsock",
            Section::Platform => "platform",
            Section::Vm => "VmConfig",
        }
    }

    /// The command-line option that gives it.
    pub fn option(self) -> &'static str {
        match self {
            Section::Cpus => "--cpus",
            Section::Memory => "--memory",
            Section::Payload => "--kernel",
            Section::Disks => "--disk",
            Section::Net => "--net",
            Section::Rng => "--rng",
            Section::Serial => "--serial",
            Section::Console => "--console",
            Section::Devices => "--device",
            Section::Fs => "--fs",
            Section::Vsock => "--vsock",
            Section::Platform => "--platform",
            Section::Vm => "the configuration",
        }
    }
}

/// What is wrong with a field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("is required")]
    Required,
    #[error("is not supported by warden")]
    Unsupported,
    #[error("{0} is not supported by warden")]
    UnsupportedValue(String),
    #[error("{value} is not from {min} to {max}")]
    OutOfRange { value: u64, min: u64, max: u64 },
    #[error("{value} is not a power of two from {min} to {max}")]
    NotPowerOfTwo { value: u64, min: u64, max: u64 },
    #[error("{value} is not an even number from {min} to {max} (a receive and a transmit queue per pair)")]
    NotPairs { value: u64, min: u64, max: u64 },
    #[error("{0:?} is not an IPv4 address like 192.168.249.1")]
    NotIpv4(String),
    #[error("{0} is not a netmask like 255.255.255.0")]
    NotNetmask(String),
    #[error("{0:?} is not a MAC address like 52:54:00:12:34:56")]
    NotMac(String),
    #[error("{0} is a multicast address; give a unicast one (even first octet)")]
    MulticastMac(String),
    #[error("{0:?} is not an interface name")]
    NotInterfaceName(String),
    #[error(
        "{0:?} must be 1 to 64 printable ASCII characters without spaces, not starting with __"
    )]
    BadId(String),
    #[error("id {0:?} is used twice")]
    DuplicateId(String),
    #[error("{0:?} is given twice; each net needs its own tap")]
    DuplicateTap(String),
    #[error("needs ip, the host end's address")]
    MaskWithoutIp,
    #[error("{fds} tap descriptors for {num_queues} queues: give one per queue pair (2 queues)")]
    FdsForQueues { fds: usize, num_queues: usize },
    #[error("{0}")]
    Conflict(&'static str),
    /// The command line's `key=value` syntax.
    #[error("{0}")]
    Syntax(String),
}

impl Problem {
    /// Whether the message reads as the rest of a sentence about the field ("is required")
    /// rather than as a statement of its own.
    fn continues_the_field(&self) -> bool {
        matches!(
            self,
            Problem::Required | Problem::Unsupported | Problem::MaskWithoutIp
        )
    }

    fn separator(&self) -> &'static str {
        if self.continues_the_field() {
            " "
        } else {
            ": "
        }
    }
}

/// A refused configuration: which field, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub section: Section,
    /// Which element of a list section (`disks[1]`).
    pub index: Option<usize>,
    /// The field in the section; empty for the section itself.
    pub key: &'static str,
    pub problem: Problem,
}

impl ConfigError {
    pub fn new(section: Section, key: &'static str, problem: Problem) -> Self {
        ConfigError {
            section,
            index: None,
            key,
            problem,
        }
    }

    /// The same error about element `index` of its list.
    pub fn at(mut self, index: usize) -> Self {
        self.index = Some(index);
        self
    }

    /// The error as the command line says it: the option, then the key
    /// (`--disk: num_queues: 0 is not from 1 to 64`).
    pub fn for_command_line(&self) -> String {
        match self.key {
            "" => format!("{}: {}", self.section.option(), self.problem),
            key => format!(
                "{}: {key}{}{}",
                self.section.option(),
                self.problem.separator(),
                self.problem
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

/// The error as the API says it: the field's path in `VmConfig`
/// (`disks[1].num_queues: 0 is not from 1 to 64`).
impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.section.json())?;
        if let Some(index) = self.index {
            write!(f, "[{index}]")?;
        }
        if !self.key.is_empty() {
            write!(f, ".{}", self.key)?;
        }
        write!(f, "{}{}", self.problem.separator(), self.problem)
    }
}

/// Shorthand for the checks: a result about `key` of `section`.
pub(crate) fn refuse<T>(
    section: Section,
    key: &'static str,
    problem: Problem,
) -> Result<T, ConfigError> {
    Err(ConfigError::new(section, key, problem))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_names_the_path_and_the_command_line_the_option() {
        let err = ConfigError::new(
            Section::Disks,
            "num_queues",
            Problem::OutOfRange {
                value: 0,
                min: 1,
                max: 64,
            },
        )
        .at(1);
        assert_eq!(
            err.to_string(),
            "disks[1].num_queues: 0 is not from 1 to 64"
        );
        assert_eq!(
            err.for_command_line(),
            "--disk: num_queues: 0 is not from 1 to 64"
        );
        let err = ConfigError::new(Section::Vm, "balloon", Problem::Unsupported);
        assert_eq!(
            err.to_string(),
            "VmConfig.balloon is not supported by warden"
        );
    }
}
