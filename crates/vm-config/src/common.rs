//! Checks and serde helpers the device sections share.

use crate::error::{refuse, ConfigError, Problem, Section};

/// The largest queue a virtio device takes (virtio 1.2 §2.7).
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// `size` as a virtio queue size: a power of two from 2 to 32768.
pub(crate) fn queue_size(section: Section, size: u16) -> Result<(), ConfigError> {
    if size.is_power_of_two() && size >= 2 {
        Ok(())
    } else {
        refuse(
            section,
            "queue_size",
            Problem::NotPowerOfTwo {
                value: u64::from(size),
                min: 2,
                max: u64::from(MAX_QUEUE_SIZE),
            },
        )
    }
}

/// Ids name devices in `vm.info`, `vm.counters` and `vm.remove-device`: short, printable, and
/// not in the `__` namespace Cloud Hypervisor keeps for itself.
pub(crate) fn id(section: Section, id: Option<&str>) -> Result<(), ConfigError> {
    match id {
        Some(id)
            if id.is_empty()
                || id.len() > 64
                || id.starts_with("__")
                || !id.chars().all(|c| c.is_ascii_graphic()) =>
        {
            refuse(section, "id", Problem::BadId(id.to_string()))
        }
        _ => Ok(()),
    }
}

/// A switch warden does not implement: refused when on.
pub(crate) fn off(section: Section, key: &'static str, on: bool) -> Result<(), ConfigError> {
    if on {
        refuse(section, key, Problem::Unsupported)
    } else {
        Ok(())
    }
}

/// A field warden does not implement: refused when given.
pub(crate) fn absent<T>(
    section: Section,
    key: &'static str,
    value: &Option<T>,
) -> Result<(), ConfigError> {
    off(section, key, value.is_some())
}

pub(crate) fn is_false(value: &bool) -> bool {
    !*value
}

pub(crate) fn yes() -> bool {
    true
}

/// MAC addresses in JSON: `"52:54:00:12:34:56"`.
pub(crate) mod mac {
    use net_util::MacAddr;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(mac: &Option<MacAddr>, s: S) -> Result<S::Ok, S::Error> {
        match mac {
            Some(mac) => s.collect_str(mac),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<MacAddr>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| text.parse().map_err(serde::de::Error::custom))
            .transpose()
    }
}
