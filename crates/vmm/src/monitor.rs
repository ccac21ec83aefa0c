//! The event monitor (`--event-monitor path=|fd=`): Cloud Hypervisor's stream of what happens
//! to the VMM and its VM, which libvirt reads to learn that a VM shut down or rebooted.
//!
//! Each event is one JSON object, pretty-printed and followed by a blank line, as Cloud
//! Hypervisor writes it: `timestamp` (`secs`, `nanos` since the monitor opened), `source`
//! (`vmm`, `vm`), `event` (`booted`, `shutdown`, `device-removed`, ...) and `properties`
//! (`null`, or a map of strings). The file is non-blocking: a reader that falls behind loses
//! events rather than stalling the VMM.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;
use vm_device::lock;

/// Where the monitor writes (`--event-monitor`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MonitorTarget {
    /// A file or a FIFO, opened (and, for a file, truncated) at start: a FIFO's open waits for
    /// its reader, as libvirt's is.
    Path(PathBuf),
    /// A descriptor warden inherited.
    Fd(i32),
}

/// The open event stream.
pub struct EventMonitor {
    file: Mutex<File>,
    start: Instant,
}

#[derive(Serialize)]
struct Event<'a> {
    timestamp: Duration,
    source: &'a str,
    event: &'a str,
    properties: Option<BTreeMap<&'a str, &'a str>>,
}

impl EventMonitor {
    pub fn open(target: &MonitorTarget) -> io::Result<Self> {
        let file = match target {
            MonitorTarget::Path(path) => OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)?,
            // SAFETY: the command line checked `fd` is above stdio; warden owns it from here.
            MonitorTarget::Fd(fd) => unsafe { File::from_raw_fd(*fd) },
        };
        // SAFETY: fcntl on a descriptor `file` owns.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        // SAFETY: as above.
        if flags < 0
            || unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(EventMonitor {
            file: Mutex::new(file),
            start: Instant::now(),
        })
    }

    /// Writes one event; a reader that is gone or behind costs the event, nothing else.
    pub fn emit(&self, source: &str, event: &str, properties: &[(&str, &str)]) {
        let record = Event {
            timestamp: self.start.elapsed(),
            source,
            event,
            properties: (!properties.is_empty()).then(|| properties.iter().copied().collect()),
        };
        let Ok(mut text) = serde_json::to_string_pretty(&record) else {
            return;
        };
        text.push_str("\n\n");
        log::info!("event: {source} {event} {properties:?}");
        let _ = lock(&self.file).write_all(text.as_bytes());
    }
}

/// Emits on the monitor if there is one.
pub(crate) fn emit(
    monitor: Option<&EventMonitor>,
    source: &str,
    event: &str,
    properties: &[(&str, &str)],
) {
    if let Some(monitor) = monitor {
        monitor.emit(source, event, properties);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape libvirt parses and Cloud Hypervisor writes: pretty JSON objects, each
    /// followed by a blank line.
    #[test]
    fn events_are_pretty_json_objects_separated_by_a_blank_line() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("events");
        let monitor = EventMonitor::open(&MonitorTarget::Path(path.clone())).unwrap();
        monitor.emit("vm", "booted", &[]);
        monitor.emit(
            "vm",
            "device-removed",
            &[("id", "hot0"), ("bdf", "0000:00:18.0")],
        );
        let text = std::fs::read_to_string(&path).unwrap();
        let events: Vec<serde_json::Value> = text
            .split("\n\n")
            .filter(|chunk| !chunk.is_empty())
            .map(|chunk| serde_json::from_str(chunk).unwrap())
            .collect();
        assert_eq!(events.len(), 2, "{text}");
        assert!(text.contains("\n  \"source\": \"vm\""), "pretty: {text}");
        assert_eq!(events[0]["event"], "booted");
        assert!(events[0]["properties"].is_null());
        assert!(
            events[0]["timestamp"]["secs"].is_u64() && events[0]["timestamp"]["nanos"].is_u64()
        );
        assert_eq!(events[1]["properties"]["bdf"], "0000:00:18.0");
    }
}
