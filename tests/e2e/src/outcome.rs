//! What a scenario run printed and how it ended, and the readings the tests take from it:
//! the guest's and the host check's sections, `KEY=value` markers, feature bits, warden's
//! IOMMU totals, API replies kept by the host scripts, files of a Debian guest's disk.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::{distro, Mode};

/// What a scenario run printed and how it ended.
#[derive(Debug)]
pub struct Outcome {
    /// Where warden ran.
    pub mode: Mode,
    /// Everything printed: the KVM host's console (L1's kernel log in nested mode), the host
    /// scripts' output and warden's output, which includes the guest's serial console.
    pub console: String,
    /// warden's exit status; `None` if it never ran or its end wasn't seen (host setup failed,
    /// the whole run timed out). The scenario's timeout shows as 124 (or 143 in L1's busybox).
    pub warden_exit: Option<i32>,
    /// Whether the whole run (QEMU, or the host scripts in direct mode) had to be killed.
    pub timed_out: bool,
    /// The scenario's scratch directory; `console.log` there holds [`Outcome::console`].
    pub run_dir: PathBuf,
    /// Wall time of the run, without building images or warden.
    pub elapsed: Duration,
    /// Whether this is a second run, after the nested KVM host's kernel crashed in the first.
    pub retried: bool,
    /// The copy of the scenario's [`crate::Scenario::host_disk`] after the run, if it had one.
    pub host_disk: Option<PathBuf>,
    /// The byte offset of the Debian image's root file system in `host_disk`, for
    /// [`Outcome::guest_file`].
    pub(crate) distro_root_offset: Option<u64>,
}

impl Outcome {
    /// What warden printed: the guest's console (L2's kernel log, its /init's and the guest
    /// script's output) and warden's own messages.
    pub fn guest_output(&self) -> &str {
        self.between("WARDEN-START\n", "\nWARDEN-EXIT=")
    }

    /// What the host check printed.
    pub fn host_check_output(&self) -> &str {
        self.between("WARDEN-HOST-CHECK\n", "\nWARDEN-HOST-CHECK-EXIT=")
    }

    /// The value of the last `KEY=value` marker anywhere in the console (the text after `=` up
    /// to the end of its line); markers may follow other output on a line, as serial output
    /// from different sources interleaves.
    pub fn marker(&self, key: &str) -> Option<&str> {
        let needle = format!("{key}=");
        self.console
            .lines()
            .rev()
            .find_map(|line| line.find(&needle).map(|i| line[i + needle.len()..].trim()))
    }

    /// [`Outcome::marker`], which the run must have printed: a test fails naming it, with the
    /// whole outcome, if it did not.
    pub fn required_marker(&self, key: &str) -> &str {
        self.marker(key)
            .unwrap_or_else(|| panic!("no {key}\n{self}"))
    }

    /// The virtio feature bits a guest printed as `KEY=` followed by sysfs's string of 0s and
    /// 1s (a device's `features` file), as bit numbers.
    pub fn feature_bits(&self, key: &str) -> Vec<u32> {
        let bits = self
            .marker(key)
            .unwrap_or_else(|| panic!("no {key}\n{self}"));
        bits.chars()
            .enumerate()
            .filter(|&(_, c)| c == '1')
            .map(|(bit, _)| bit as u32)
            .collect()
    }

    /// One count of warden's exit report of the virtio-iommu's totals (the lines `warden:
    /// virtio-iommu total: 5 maps, 0 unmaps, ...` and `warden: virtio-iommu: 9 IOTLB hits,
    /// ...`), by the name after its number (`maps`, `faults`, `IOTLB hits`, ...).
    pub fn iommu_counter(&self, name: &str) -> u64 {
        let totals: Vec<&str> = self
            .guest_output()
            .lines()
            .filter_map(|line| {
                let line = line.trim();
                line.strip_prefix("warden: virtio-iommu total: ")
                    .or_else(|| line.strip_prefix("warden: virtio-iommu: "))
            })
            .collect();
        if totals.is_empty() {
            panic!("warden printed no IOMMU statistics\n{self}");
        }
        let suffix = format!(" {name}");
        totals
            .iter()
            .flat_map(|line| line.split(", "))
            .find_map(|field| field.strip_suffix(&suffix)?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} count in the IOMMU's totals {totals:?}\n{self}"))
    }

    /// The host check's `API-REPLY NAME STATUS BODY` line for `name` (the tests' convention for
    /// calls made with `$API_CLIENT`): the status and the JSON body (null when empty).
    pub fn api_reply(&self, name: &str) -> (u16, serde_json::Value) {
        let prefix = format!("API-REPLY {name} ");
        let line = self
            .host_check_output()
            .lines()
            .find_map(|l| l.trim().strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no reply to {name}\n{self}"));
        let (status, body) = line.split_once(' ').unwrap_or((line, ""));
        let status = status
            .parse()
            .unwrap_or_else(|_| panic!("{name}: no status in {line:?}\n{self}"));
        let body = if body.trim().is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(body).unwrap_or_else(|e| panic!("{name}: {e}: {body}\n{self}"))
        };
        (status, body)
    }

    /// File `path` in the root file system of a [`crate::Scenario::distro`] run's disk, as
    /// the guest left it (read with debugfs after the run); `None` if it isn't there.
    pub fn guest_file(&self, path: &str) -> Option<Vec<u8>> {
        let offset = self.distro_root_offset?;
        distro::read_file(self.host_disk.as_deref()?, offset, path)
    }

    /// The guest script's exit status, as reported by the guest's /init.
    pub fn guest_script_exit(&self) -> Option<i32> {
        self.marker("WARDEN-L2-SCRIPT-EXIT")?.parse().ok()
    }

    /// The host check's exit status.
    pub fn host_check_exit(&self) -> Option<i32> {
        self.marker("WARDEN-HOST-CHECK-EXIT")?.parse().ok()
    }

    fn between(&self, start: &str, end: &str) -> &str {
        let Some(i) = self.console.find(start) else {
            return "";
        };
        let rest = &self.console[i + start.len()..];
        &rest[..rest.find(end).unwrap_or(rest.len())]
    }
}

/// A summary for assertion messages: how the run ended and the console's tail.
impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const TAIL: usize = 80;
        let lines: Vec<&str> = self.console.lines().collect();
        writeln!(
            f,
            "mode {:?}, warden exit {:?}, guest script exit {:?}, host check exit {:?}, timed out {}, {:.1?}",
            self.mode,
            self.warden_exit,
            self.guest_script_exit(),
            self.host_check_exit(),
            self.timed_out,
            self.elapsed
        )?;
        writeln!(
            f,
            "full console: {} -- last {TAIL} lines:",
            self.run_dir.join("console.log").display()
        )?;
        for line in &lines[lines.len().saturating_sub(TAIL)..] {
            writeln!(f, "| {line}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A run that printed `console`.
    pub(crate) fn outcome(console: &str) -> Outcome {
        Outcome {
            mode: Mode::Direct,
            console: console.to_string(),
            warden_exit: None,
            timed_out: false,
            run_dir: PathBuf::new(),
            elapsed: Duration::ZERO,
            retried: false,
            host_disk: None,
            distro_root_offset: None,
        }
    }

    #[test]
    fn markers_and_sections_are_parsed() {
        let o = outcome(
            "boot\nWARDEN-START\nguest line\n[ 1.0] WARDEN-L2-SCRIPT-EXIT=3\n\
             WARDEN-EXIT=0\nWARDEN-HOST-CHECK\nchecked\nWARDEN-HOST-CHECK-EXIT=0\n",
        );
        assert_eq!(
            o.guest_output(),
            "guest line\n[ 1.0] WARDEN-L2-SCRIPT-EXIT=3"
        );
        assert_eq!(o.host_check_output(), "checked");
        assert_eq!(o.guest_script_exit(), Some(3));
        assert_eq!(o.marker("WARDEN-EXIT"), Some("0"));
        assert_eq!(o.marker("MISSING"), None);
    }
}
