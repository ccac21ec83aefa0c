//! Ethernet MAC addresses as the command line writes them (`52:54:00:12:34:56`).

use std::fmt;
use std::io;
use std::str::FromStr;

/// A 48-bit Ethernet address.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr([u8; 6]);

/// Why a string is not a MAC address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0} is not a MAC address like 52:54:00:12:34:56")]
pub struct MacParseError(String);

impl MacAddr {
    /// The address with these octets, first octet first (as written and as sent on the wire).
    pub const fn new(octets: [u8; 6]) -> Self {
        MacAddr(octets)
    }

    pub const fn octets(&self) -> [u8; 6] {
        self.0
    }

    /// A random unicast, locally administered address (bit 1 of the first octet set, bit 0
    /// clear), so it can collide neither with a vendor-assigned address nor with a group.
    ///
    /// A MAC needs no secrecy, so the bytes come from `GRND_INSECURE`, which does not wait for
    /// the kernel's entropy pool: on a freshly booted host (a nested test host, a VM without a
    /// hardware RNG) a blocking `getrandom` can hold the VMM's start for minutes. Kernels
    /// before 5.6 refuse the flag; they get a blocking call.
    pub fn random_local() -> io::Result<Self> {
        let mut octets = [0u8; 6];
        let mut filled = 0;
        let mut flags = libc::GRND_INSECURE;
        while filled < octets.len() {
            let rest = &mut octets[filled..];
            // SAFETY: the kernel writes at most `rest.len()` bytes into `rest`.
            let got = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), flags) };
            if got < 0 {
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EINVAL) if flags != 0 => flags = 0,
                    _ => return Err(err),
                }
                continue;
            }
            filled += got as usize;
        }
        octets[0] = (octets[0] & !0x01) | 0x02;
        Ok(MacAddr(octets))
    }

    /// A group address (bit 0 of the first octet): never valid as a NIC's own address.
    pub const fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }
}

impl FromStr for MacAddr {
    type Err = MacParseError;

    /// Six two-digit hex octets separated by colons, in either case.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = || MacParseError(text.to_string());
        let mut octets = [0u8; 6];
        let mut parts = text.split(':');
        for octet in &mut octets {
            let part = parts.next().ok_or_else(error)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(error());
            }
            *octet = u8::from_str_radix(part, 16).map_err(|_| error())?;
        }
        if parts.next().is_some() {
            return Err(error());
        }
        Ok(MacAddr(octets))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_both_cases() {
        let mac: MacAddr = "52:54:00:AB:cd:0f".parse().unwrap();
        assert_eq!(mac.octets(), [0x52, 0x54, 0x00, 0xab, 0xcd, 0x0f]);
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:0f");
        assert!(!mac.is_multicast());
        assert!("01:00:5e:00:00:01"
            .parse::<MacAddr>()
            .unwrap()
            .is_multicast());
    }

    #[test]
    fn rejects_everything_else() {
        for bad in [
            "",
            "zz",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52:54:00:12:34:5",
            "52:54:00:12:34:567",
            "52-54-00-12-34-56",
            "52:54:00:12:34:+5",
            "52:54:00:12::34:56",
        ] {
            let err = bad.parse::<MacAddr>().unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("{bad} is not a MAC address like 52:54:00:12:34:56")
            );
        }
    }

    #[test]
    fn random_addresses_are_local_unicast_and_differ() {
        let a = MacAddr::random_local().unwrap();
        let b = MacAddr::random_local().unwrap();
        for mac in [a, b] {
            assert_eq!(mac.octets()[0] & 0x03, 0x02, "{mac}");
        }
        // 46 random bits: equal twice in a row means the randomness is broken.
        assert_ne!(a, b);
    }
}
