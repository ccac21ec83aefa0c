//! Request bodies of the hotplug endpoints, as Cloud Hypervisor's description gives them, and
//! their validation: what warden cannot honour is refused with a reason, never ignored.
//!
//! Fields a client may send that warden has no use for are accepted and ignored only where
//! their value is Cloud Hypervisor's default; anything else names the field.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// `DiskConfig`: a virtio-blk disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DiskConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub readonly: bool,
    pub direct: bool,
    pub iommu: bool,
    pub num_queues: u64,
    pub queue_size: u64,
    pub vhost_user: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vhost_socket: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limiter_config: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit_group: Option<String>,
    pub pci_segment: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
}

impl Default for DiskConfig {
    /// Cloud Hypervisor's defaults.
    fn default() -> Self {
        DiskConfig {
            path: None,
            readonly: false,
            direct: false,
            iommu: false,
            num_queues: 1,
            queue_size: 128,
            vhost_user: false,
            vhost_socket: None,
            rate_limiter_config: None,
            rate_limit_group: None,
            pci_segment: 0,
            id: None,
            serial: None,
        }
    }
}

impl DiskConfig {
    /// Whether warden can build this disk.
    pub fn validate(&self) -> Result<(), String> {
        if self.path.as_deref().unwrap_or_default().is_empty() {
            return Err("DiskConfig: path is required".into());
        }
        unsupported("DiskConfig", "vhost_user", self.vhost_user)?;
        unsupported(
            "DiskConfig",
            "rate_limiter_config",
            self.rate_limiter_config.is_some() || self.rate_limit_group.is_some(),
        )?;
        if !(1..=MAX_DISK_QUEUES).contains(&self.num_queues) {
            return Err(format!(
                "DiskConfig: num_queues {} is not from 1 to {MAX_DISK_QUEUES}",
                self.num_queues
            ));
        }
        queue_size("DiskConfig", self.queue_size)?;
        pci_segment("DiskConfig", self.pci_segment)?;
        id("DiskConfig", self.id.as_deref())
    }
}

/// `NetConfig`: a virtio-net device on a tap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NetConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_mac: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u64>,
    pub iommu: bool,
    pub num_queues: u64,
    pub queue_size: u64,
    pub vhost_user: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vhost_socket: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub pci_segment: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limiter_config: Option<serde_json::Value>,
    pub offload_tso: bool,
    pub offload_ufo: bool,
    pub offload_csum: bool,
}

impl Default for NetConfig {
    /// Cloud Hypervisor's defaults.
    fn default() -> Self {
        NetConfig {
            tap: None,
            ip: None,
            mask: None,
            mac: None,
            host_mac: None,
            mtu: None,
            iommu: false,
            num_queues: 2,
            queue_size: 256,
            vhost_user: false,
            vhost_socket: None,
            id: None,
            pci_segment: 0,
            rate_limiter_config: None,
            offload_tso: true,
            offload_ufo: true,
            offload_csum: true,
        }
    }
}

impl NetConfig {
    /// Whether warden can build this net.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(tap) = &self.tap {
            if tap.len() >= 16 || tap.contains(['/', ' ', '\0']) || tap == "." || tap == ".." {
                return Err(format!("NetConfig: tap {tap:?} is not an interface name"));
            }
        }
        let ip = self.ip.as_deref().map(|ip| ipv4("ip", ip)).transpose()?;
        let mask = self.mask.as_deref().map(|m| ipv4("mask", m)).transpose()?;
        if let Some(mask) = mask {
            if u32::from(mask).leading_ones() + u32::from(mask).trailing_zeros() != 32 {
                return Err(format!("NetConfig: mask {mask} is not a netmask"));
            }
            if ip.is_none() {
                return Err("NetConfig: mask needs ip, the host end's address".into());
            }
        }
        if let Some(mac) = &self.mac {
            if !is_unicast_mac(mac) {
                return Err(format!(
                    "NetConfig: mac {mac:?} is not a unicast MAC address like 52:54:00:12:34:56"
                ));
            }
        }
        unsupported("NetConfig", "host_mac", self.host_mac.is_some())?;
        unsupported("NetConfig", "mtu", self.mtu.is_some())?;
        unsupported("NetConfig", "vhost_user", self.vhost_user)?;
        unsupported(
            "NetConfig",
            "rate_limiter_config",
            self.rate_limiter_config.is_some(),
        )?;
        if !self.num_queues.is_multiple_of(2) || !(2..=MAX_NET_QUEUES).contains(&self.num_queues) {
            return Err(format!(
                "NetConfig: num_queues {} is not an even number from 2 to {MAX_NET_QUEUES} (a receive and a transmit queue per pair)",
                self.num_queues
            ));
        }
        queue_size("NetConfig", self.queue_size)?;
        pci_segment("NetConfig", self.pci_segment)?;
        id("NetConfig", self.id.as_deref())
    }
}

/// `DeviceConfig`: a host PCI function to pass through with VFIO.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeviceConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub iommu: bool,
    pub pci_segment: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

impl DeviceConfig {
    /// Whether warden can pass this device through.
    pub fn validate(&self) -> Result<(), String> {
        match self.path.as_deref() {
            None | Some("") => {
                return Err(
                    "DeviceConfig: path is required, e.g. /sys/bus/pci/devices/0000:01:00.0".into(),
                )
            }
            Some(path) if !path.starts_with('/') => {
                return Err(format!(
                    "DeviceConfig: path {path:?} is not an absolute sysfs path"
                ))
            }
            Some(_) => {}
        }
        pci_segment("DeviceConfig", self.pci_segment)?;
        id("DeviceConfig", self.id.as_deref())
    }
}

/// `VmRemoveDevice`: the id of the device to eject.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct VmRemoveDevice {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

impl VmRemoveDevice {
    pub fn validate(&self) -> Result<(), String> {
        match self.id.as_deref() {
            None | Some("") => Err("VmRemoveDevice: id is required".into()),
            Some(id) => self::id("VmRemoveDevice", Some(id)),
        }
    }
}

fn unsupported(body: &str, field: &str, given: bool) -> Result<(), String> {
    if given {
        Err(format!("{body}: {field} is not supported by warden"))
    } else {
        Ok(())
    }
}

/// Most request queues a disk takes (as on the command line).
pub const MAX_DISK_QUEUES: u64 = 64;
/// The most queues a net takes: 16 receive and transmit pairs.
pub const MAX_NET_QUEUES: u64 = 32;

fn queue_size(body: &str, size: u64) -> Result<(), String> {
    if size.is_power_of_two() && (2..=32768).contains(&size) {
        Ok(())
    } else {
        Err(format!(
            "{body}: queue_size {size} is not a power of two from 2 to 32768"
        ))
    }
}

fn pci_segment(body: &str, segment: u16) -> Result<(), String> {
    if segment == 0 {
        Ok(())
    } else {
        Err(format!(
            "{body}: pci_segment {segment} does not exist: warden has PCI segment 0 only"
        ))
    }
}

/// Ids name devices in `vm.info`, `vm.counters` and `vm.remove-device`: short and printable.
fn id(body: &str, id: Option<&str>) -> Result<(), String> {
    match id {
        Some(id) if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_graphic()) => {
            Err(format!(
                "{body}: id {id:?} must be 1 to 64 printable ASCII characters without spaces"
            ))
        }
        _ => Ok(()),
    }
}

fn ipv4(field: &str, text: &str) -> Result<Ipv4Addr, String> {
    text.parse()
        .map_err(|_| format!("NetConfig: {field} {text:?} is not an IPv4 address"))
}

fn is_unicast_mac(text: &str) -> bool {
    let octets: Vec<Option<u8>> = text
        .split(':')
        .map(|o| {
            (o.len() == 2)
                .then(|| u8::from_str_radix(o, 16).ok())
                .flatten()
        })
        .collect();
    octets.len() == 6 && octets.iter().all(Option::is_some) && octets[0].is_some_and(|o| o & 1 == 0)
}
