//! Parsing of Cloud-Hypervisor-style option values: `key=value,key=value`.

use std::collections::BTreeMap;

/// A parse failure, already phrased for the user: the caller prefixes the option name.
pub type ParseResult<T> = Result<T, String>;

/// The `key=value` pairs of one option value, checked against the keys the option knows.
pub struct KeyValues<'a> {
    values: BTreeMap<&'a str, &'a str>,
}

impl<'a> KeyValues<'a> {
    /// Splits `text` on commas; every key must be in `known`, and appear once.
    pub fn parse(text: &'a str, known: &[&str]) -> ParseResult<Self> {
        let mut values = BTreeMap::new();
        for item in text.split(',').filter(|item| !item.is_empty()) {
            let (key, value) = item.split_once('=').unwrap_or((item, ""));
            if !known.contains(&key) {
                return Err(format!(
                    "unknown key '{key}' in '{text}'; expected {}",
                    known.join(", ")
                ));
            }
            if values.insert(key, value).is_some() {
                return Err(format!("key '{key}' given twice in '{text}'"));
            }
        }
        Ok(KeyValues { values })
    }

    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.values.get(key).copied()
    }

    /// An `on`/`off` switch (also `true`/`false`), `false` when absent.
    pub fn switch(&self, key: &str) -> ParseResult<bool> {
        match self.get(key) {
            None | Some("off") | Some("false") => Ok(false),
            Some("on") | Some("true") => Ok(true),
            Some(other) => Err(format!("{key}={other} is not on or off")),
        }
    }
}

/// Parses a size such as `512M`, `8G`, `4096K` or a plain byte count.
pub fn parse_size(text: &str) -> ParseResult<u64> {
    let (digits, shift) = match text.as_bytes().last() {
        Some(b'K' | b'k') => (&text[..text.len() - 1], 10),
        Some(b'M' | b'm') => (&text[..text.len() - 1], 20),
        Some(b'G' | b'g') => (&text[..text.len() - 1], 30),
        Some(b'T' | b't') => (&text[..text.len() - 1], 40),
        _ => (text, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|value| value.checked_mul(1 << shift))
        .ok_or_else(|| format!("'{text}' is not a size (e.g. 512M, 8G)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("8G"), Ok(8 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1k"), Ok(1024));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn key_values() {
        let kv = KeyValues::parse("path=/a,b,readonly=on", &["path", "readonly", "b"]).unwrap();
        assert_eq!(kv.get("path"), Some("/a"));
        assert_eq!(kv.get("b"), Some(""));
        assert_eq!(kv.switch("readonly"), Ok(true));
        assert_eq!(kv.switch("iommu"), Ok(false));
        let err = KeyValues::parse("pth=/a", &["path"]).err().unwrap();
        assert_eq!(err, "unknown key 'pth' in 'pth=/a'; expected path");
        assert!(KeyValues::parse("path=/a,path=/b", &["path"]).is_err());
        let kv = KeyValues::parse("iommu=maybe", &["iommu"]).unwrap();
        assert_eq!(
            kv.switch("iommu"),
            Err("iommu=maybe is not on or off".into())
        );
    }
}
