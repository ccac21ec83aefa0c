//! The command line's option values, as Cloud Hypervisor writes them: `key=value,key=value`,
//! where a value may be a bracketed list (`iommu_segments=[0,1]`, `fd=[3,4]`).

use std::collections::BTreeMap;

use crate::error::{ConfigError, Problem, Section};

/// The `key=value` pairs of one option value, checked against the keys the option knows.
pub struct KeyValues<'a> {
    section: Section,
    values: BTreeMap<&'a str, &'a str>,
}

impl<'a> KeyValues<'a> {
    /// Splits `text` on the commas outside brackets; every key must be in `known`, and appear
    /// once.
    pub fn parse(section: Section, text: &'a str, known: &[&str]) -> Result<Self, ConfigError> {
        let syntax = |message: String| ConfigError::new(section, "", Problem::Syntax(message));
        let mut values = BTreeMap::new();
        for item in split_outside_brackets(text).filter(|item| !item.is_empty()) {
            let (key, value) = item.split_once('=').unwrap_or((item, ""));
            if !known.contains(&key) {
                return Err(syntax(format!(
                    "unknown key '{key}' in '{text}'; expected {}",
                    known.join(", ")
                )));
            }
            if values.insert(key, value).is_some() {
                return Err(syntax(format!("key '{key}' given twice in '{text}'")));
            }
        }
        Ok(KeyValues { section, values })
    }

    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.values.get(key).copied()
    }

    /// The value of `key` if it is given and not empty.
    pub fn given(&self, key: &str) -> Option<&'a str> {
        self.get(key).filter(|value| !value.is_empty())
    }

    /// An `on`/`off` switch (also `true`/`false`), `default` when absent.
    pub fn switch(&self, key: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some("on") | Some("true") => Ok(true),
            Some("off") | Some("false") => Ok(false),
            Some(other) => Err(self.error(key, format!("{other} is not on or off"))),
        }
    }

    /// A number, `None` when absent.
    pub fn number<T: std::str::FromStr>(
        &self,
        key: &'static str,
    ) -> Result<Option<T>, ConfigError> {
        self.given(key)
            .map(|value| {
                parse_number(value)
                    .ok_or_else(|| self.error(key, format!("{value} is not a number")))
            })
            .transpose()
    }

    /// A size such as `512M`, `None` when absent.
    pub fn size(&self, key: &'static str) -> Result<Option<u64>, ConfigError> {
        self.given(key)
            .map(|value| parse_size(value).map_err(|message| self.error(key, message)))
            .transpose()
    }

    /// A bracketed list of numbers (`[0,1]`), `None` when absent.
    pub fn numbers<T: std::str::FromStr>(
        &self,
        key: &'static str,
    ) -> Result<Option<Vec<T>>, ConfigError> {
        let Some(value) = self.given(key) else {
            return Ok(None);
        };
        let inner = value
            .strip_prefix('[')
            .and_then(|v| v.strip_suffix(']'))
            .ok_or_else(|| self.error(key, format!("{value} is not a list like [0,1]")))?;
        inner
            .split(',')
            .filter(|item| !item.is_empty())
            .map(|item| {
                parse_number(item)
                    .ok_or_else(|| self.error(key, format!("{item} in {value} is not a number")))
            })
            .collect::<Result<Vec<T>, _>>()
            .map(Some)
    }

    fn error(&self, key: &'static str, message: String) -> ConfigError {
        ConfigError::new(self.section, key, Problem::Syntax(message))
    }
}

/// A decimal number, or hexadecimal with `0x`.
fn parse_number<T: std::str::FromStr>(text: &str) -> Option<T> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16)
            .ok()
            .and_then(|value| value.to_string().parse().ok()),
        None => text.parse().ok(),
    }
}

/// `text` split on the commas that are not inside `[...]`.
fn split_outside_brackets(text: &str) -> impl Iterator<Item = &str> {
    let mut depth = 0usize;
    let mut start = 0;
    let mut items = Vec::new();
    for (i, c) in text.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                items.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&text[start..]);
    items.into_iter()
}

/// Parses a size such as `512M`, `8G`, `4096K` or a plain byte count.
pub fn parse_size(text: &str) -> Result<u64, String> {
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
        let kv = KeyValues::parse(
            Section::Disks,
            "path=/a,b,readonly=on",
            &["path", "readonly", "b"],
        )
        .unwrap();
        assert_eq!(kv.get("path"), Some("/a"));
        assert_eq!(kv.get("b"), Some(""));
        assert_eq!(kv.switch("readonly", false), Ok(true));
        assert_eq!(kv.switch("iommu", false), Ok(false));
        let err = KeyValues::parse(Section::Disks, "pth=/a", &["path"])
            .err()
            .unwrap();
        assert_eq!(
            err.for_command_line(),
            "--disk: unknown key 'pth' in 'pth=/a'; expected path"
        );
        assert!(KeyValues::parse(Section::Disks, "path=/a,path=/b", &["path"]).is_err());
        let kv = KeyValues::parse(Section::Disks, "iommu=maybe", &["iommu"]).unwrap();
        assert_eq!(
            kv.switch("iommu", false).unwrap_err().for_command_line(),
            "--disk: iommu: maybe is not on or off"
        );
    }

    #[test]
    fn lists_keep_their_commas() {
        let kv = KeyValues::parse(
            Section::Platform,
            "num_pci_segments=2,iommu_segments=[0,1]",
            &["num_pci_segments", "iommu_segments"],
        )
        .unwrap();
        assert_eq!(kv.numbers::<u16>("iommu_segments"), Ok(Some(vec![0, 1])));
        assert_eq!(kv.number::<u16>("num_pci_segments"), Ok(Some(2)));
        let kv = KeyValues::parse(Section::Net, "fd=3", &["fd"]).unwrap();
        assert!(kv.numbers::<i32>("fd").is_err());
        let kv = KeyValues::parse(Section::Platform, "x=0x10", &["x"]).unwrap();
        assert_eq!(kv.number::<u16>("x"), Ok(Some(16)));
    }
}
