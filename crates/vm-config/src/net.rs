//! `NetConfig`: a virtio-net device on a tap.

use std::net::{IpAddr, Ipv4Addr};

use net_util::MacAddr;
use serde::{Deserialize, Serialize};

use crate::common::{absent, id, is_false, off, queue_size};
use crate::error::{refuse, ConfigError, Problem, Section};
use crate::options::KeyValues;

const SECTION: Section = Section::Net;

/// The most queue pairs a net takes.
pub const MAX_QUEUE_PAIRS: usize = 16;
/// Queue size unless a body or `queue_size=` says otherwise (Cloud Hypervisor's default).
pub const DEFAULT_NET_QUEUE_SIZE: u16 = 256;
/// The host end's netmask when only `ip` is given.
pub const DEFAULT_MASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);

/// `VhostMode` (for vhost-user, which warden does not have).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum VhostMode {
    #[default]
    Client,
    Server,
}

/// `NetConfig`, with Cloud Hypervisor's defaults for what a body leaves out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// The tap to open, created if it does not exist; none: a new tap `vmtapN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// The host end's address, which warden gives a tap it opens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<IpAddr>,
    /// The guest's address; none: a random locally administered one, chosen when the net is
    /// added (and then listed).
    #[serde(
        default,
        with = "crate::common::mac",
        skip_serializing_if = "Option::is_none"
    )]
    pub mac: Option<MacAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub iommu: bool,
    /// Receive and transmit queues: two per pair, each pair on a queue of the tap.
    #[serde(default = "default_num_queues")]
    pub num_queues: usize,
    #[serde(default = "default_queue_size")]
    pub queue_size: u16,
    #[serde(default)]
    pub vhost_user: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost_socket: Option<String>,
    #[serde(default)]
    pub vhost_mode: VhostMode,
    /// The descriptors of the taps a client passed with `vm.add-net` (`SCM_RIGHTS`), one per
    /// queue pair, as `vm.info` lists them; never taken from a body, as Cloud Hypervisor
    /// never takes them.
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub fds: Option<Vec<i32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default)]
    pub pci_segment: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter_config: Option<serde_json::Value>,
    #[serde(default = "crate::common::yes")]
    pub offload_tso: bool,
    #[serde(default = "crate::common::yes")]
    pub offload_ufo: bool,
    #[serde(default = "crate::common::yes")]
    pub offload_csum: bool,
    /// warden's own: the kernel's vhost-net moves the frames (an instance per pair), behind
    /// the IOMMU too (its device IOTLB), instead of warden's threads (`--net vhost=on`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub vhost: bool,
}

fn default_num_queues() -> usize {
    2
}

fn default_queue_size() -> u16 {
    DEFAULT_NET_QUEUE_SIZE
}

impl Default for NetConfig {
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
            queue_size: DEFAULT_NET_QUEUE_SIZE,
            vhost_user: false,
            vhost_socket: None,
            vhost_mode: VhostMode::Client,
            fds: None,
            id: None,
            pci_segment: 0,
            rate_limiter_config: None,
            offload_tso: true,
            offload_ufo: true,
            offload_csum: true,
            vhost: false,
        }
    }
}

impl NetConfig {
    /// `--net tap=NAME,mac=MAC[,ip=IP,mask=MASK][,num_queues=2][,queue_size=256][,iommu=on]
    /// [,vhost=on][,id=ID]`. An empty `tap=` or `mac=` is the same as none.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let kv = KeyValues::parse(
            SECTION,
            text,
            &[
                "tap",
                "mac",
                "ip",
                "mask",
                "num_queues",
                "queue_size",
                "iommu",
                "vhost",
                "id",
                "pci_segment",
            ],
        )?;
        let address = |key: &'static str| -> Result<Option<IpAddr>, ConfigError> {
            kv.given(key)
                .map(|text| {
                    text.parse()
                        .map_err(|_| ConfigError::new(SECTION, key, Problem::NotIpv4(text.into())))
                })
                .transpose()
        };
        let mac = kv
            .given("mac")
            .map(|text| {
                text.parse()
                    .map_err(|_| ConfigError::new(SECTION, "mac", Problem::NotMac(text.into())))
            })
            .transpose()?;
        Ok(NetConfig {
            tap: kv.given("tap").map(String::from),
            mac,
            ip: address("ip")?,
            mask: address("mask")?,
            num_queues: kv.number("num_queues")?.unwrap_or(2),
            queue_size: kv.number("queue_size")?.unwrap_or(DEFAULT_NET_QUEUE_SIZE),
            iommu: kv.switch("iommu", false)?,
            vhost: kv.switch("vhost", false)?,
            id: kv.given("id").map(String::from),
            pci_segment: kv.number("pci_segment")?.unwrap_or(0),
            ..Default::default()
        })
    }

    /// Receive and transmit queue pairs.
    pub fn queue_pairs(&self) -> usize {
        self.num_queues / 2
    }

    /// The host end's address and netmask (255.255.255.0 unless given), once validated.
    pub fn host_ipv4(&self) -> Option<(Ipv4Addr, Ipv4Addr)> {
        let v4 = |address: Option<IpAddr>| match address {
            Some(IpAddr::V4(v4)) => Some(v4),
            _ => None,
        };
        v4(self.ip).map(|ip| (ip, v4(self.mask).unwrap_or(DEFAULT_MASK)))
    }

    /// A tap served by warden's threads or the kernel's vhost-net.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(tap) = &self.tap {
            if net_util::validate_tap_name(tap).is_err() {
                return refuse(SECTION, "tap", Problem::NotInterfaceName(tap.clone()));
            }
        }
        let v4 = |key: &'static str, address: Option<IpAddr>| match address {
            Some(IpAddr::V6(v6)) => refuse(SECTION, key, Problem::NotIpv4(v6.to_string())),
            Some(IpAddr::V4(v4)) => Ok(Some(v4)),
            None => Ok(None),
        };
        let ip = v4("ip", self.ip)?;
        if let Some(mask) = v4("mask", self.mask)? {
            if u32::from(mask).leading_ones() + u32::from(mask).trailing_zeros() != 32 {
                return refuse(SECTION, "mask", Problem::NotNetmask(mask.to_string()));
            }
            if ip.is_none() {
                return refuse(SECTION, "mask", Problem::MaskWithoutIp);
            }
        }
        if let Some(mac) = self.mac {
            if mac.is_multicast() {
                return refuse(SECTION, "mac", Problem::MulticastMac(mac.to_string()));
            }
        }
        absent(SECTION, "host_mac", &self.host_mac)?;
        absent(SECTION, "mtu", &self.mtu)?;
        off(SECTION, "vhost_user", self.vhost_user)?;
        absent(SECTION, "vhost_socket", &self.vhost_socket)?;
        absent(SECTION, "rate_limiter_config", &self.rate_limiter_config)?;
        for (key, on) in [
            ("offload_tso", self.offload_tso),
            ("offload_ufo", self.offload_ufo),
            ("offload_csum", self.offload_csum),
        ] {
            if !on {
                return refuse(SECTION, key, Problem::UnsupportedValue("false".into()));
            }
        }
        let max = 2 * MAX_QUEUE_PAIRS;
        if !self.num_queues.is_multiple_of(2) || !(2..=max).contains(&self.num_queues) {
            return refuse(
                SECTION,
                "num_queues",
                Problem::NotPairs {
                    value: self.num_queues as u64,
                    min: 2,
                    max: max as u64,
                },
            );
        }
        queue_size(SECTION, self.queue_size)?;
        if let Some(fds) = &self.fds {
            if 2 * fds.len() != self.num_queues {
                return refuse(
                    SECTION,
                    "num_queues",
                    Problem::FdsForQueues {
                        fds: fds.len(),
                        num_queues: self.num_queues,
                    },
                );
            }
            if self.tap.is_some() {
                return refuse(
                    SECTION,
                    "tap",
                    Problem::Conflict("a net on taps passed as descriptors names no tap"),
                );
            }
            if self.vhost {
                return refuse(
                    SECTION,
                    "vhost",
                    Problem::Conflict(
                        "a net on taps passed as descriptors uses warden's own data path",
                    ),
                );
            }
        }
        id(SECTION, self.id.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kata's `vm.add-net` body (its tap comes as a file descriptor), field for field.
    #[test]
    fn katas_net_body_is_taken() {
        let kata = r#"{"iommu":true,"ip":"192.168.249.1","mac":"aa:bb:cc:dd:ee:01","mask":"255.255.255.0","num_queues":2,"offload_csum":true,"offload_tso":true,"offload_ufo":true,"queue_size":256,"vhost_mode":"Client","vhost_user":false}"#;
        let net: NetConfig = serde_json::from_str(kata).unwrap();
        net.validate().unwrap();
        assert_eq!(net.mac.unwrap().to_string(), "aa:bb:cc:dd:ee:01");
        assert_eq!(
            net.host_ipv4(),
            Some((Ipv4Addr::new(192, 168, 249, 1), DEFAULT_MASK))
        );
    }

    #[test]
    fn the_command_line_defaults_the_mask_and_refuses_what_it_cannot_parse() {
        let net = NetConfig::parse("tap=vmtap0,ip=10.0.0.1,iommu=on,num_queues=4").unwrap();
        net.validate().unwrap();
        assert_eq!(
            net.host_ipv4(),
            Some((Ipv4Addr::new(10, 0, 0, 1), DEFAULT_MASK))
        );
        assert_eq!(net.queue_pairs(), 2);
        assert_eq!(
            NetConfig::parse("mac=nope").unwrap_err().for_command_line(),
            "--net: mac: \"nope\" is not a MAC address like 52:54:00:12:34:56"
        );
        let refused = |text: &str| {
            NetConfig::parse(text)
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            refused("mask=255.255.0.0"),
            "net.mask needs ip, the host end's address"
        );
        assert_eq!(
            refused("ip=10.0.0.1,mask=255.0.255.0"),
            "net.mask: 255.0.255.0 is not a netmask like 255.255.255.0"
        );
        assert_eq!(refused("mac=01:00:00:00:00:01"), "net.mac: 01:00:00:00:00:01 is a multicast address; give a unicast one (even first octet)");
        assert!(refused("num_queues=3").starts_with("net.num_queues: 3 is not an even number"));
        assert!(refused("tap=a/b").starts_with("net.tap:"));
    }

    /// Descriptors come with the request, never in its body; their count must match the
    /// queue pairs.
    #[test]
    fn tap_descriptors_are_not_taken_from_a_body_and_must_match_the_pairs() {
        let net: NetConfig = serde_json::from_str(r#"{"fds":[3,4],"num_queues":4}"#).unwrap();
        assert_eq!(net.fds, None);
        let net = NetConfig {
            fds: Some(vec![7]),
            num_queues: 4,
            ..Default::default()
        };
        assert_eq!(
            net.validate().unwrap_err().to_string(),
            "net.num_queues: 1 tap descriptors for 4 queues: give one per queue pair (2 queues)"
        );
        let net = NetConfig {
            fds: Some(vec![7, 8]),
            num_queues: 4,
            ..Default::default()
        };
        net.validate().unwrap();
        assert!(serde_json::to_string(&net)
            .unwrap()
            .contains(r#""fds":[7,8]"#));
    }

    #[test]
    fn a_body_with_a_field_warden_lacks_names_it() {
        let net: NetConfig = serde_json::from_str(r#"{"mtu":9000}"#).unwrap();
        assert_eq!(
            net.validate().unwrap_err().to_string(),
            "net.mtu is not supported by warden"
        );
        let net: NetConfig = serde_json::from_str(r#"{"offload_tso":false}"#).unwrap();
        assert_eq!(
            net.validate().unwrap_err().to_string(),
            "net.offload_tso: false is not supported by warden"
        );
    }
}
