//! A small reader over a parsed TOML table that records every problem with its key path
//! instead of stopping at the first one, and reports keys nobody asked for.
//!
//! serde's derive stops at the first error and cannot tell a user about the second typo in the
//! same file; the contract (DESIGN §3) asks for all of them, so sections are read by hand with
//! these helpers.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use toml::Value;

use super::{ConfigError, ServerAddr};

/// Collected validation problems.
pub(super) type Errors = Vec<ConfigError>;

/// One TOML table being read, with the path used in error messages.
pub(super) struct Section<'t> {
    table: &'t toml::Table,
    path: String,
    used: BTreeSet<&'t str>,
}

impl<'t> Section<'t> {
    pub(super) fn new(table: &'t toml::Table, path: impl Into<String>) -> Self {
        Self { table, path: path.into(), used: BTreeSet::new() }
    }

    pub(super) fn path(&self) -> &str {
        &self.path
    }

    /// The path of one key of this section, for error messages.
    pub(super) fn key_path(&self, key: &str) -> String {
        if self.path.is_empty() { key.to_owned() } else { format!("{}.{key}", self.path) }
    }

    fn raw(&mut self, key: &'t str) -> Option<&'t Value> {
        self.used.insert(key);
        self.table.get(key)
    }

    /// The value of `key` if it is present and valid; a bad value is recorded and gives `None`.
    pub(super) fn opt<T: FromToml>(&mut self, key: &'t str, errs: &mut Errors) -> Option<T> {
        let value = self.raw(key)?;
        match T::from_toml(value) {
            Ok(v) => Some(v),
            Err(message) => {
                errs.push(ConfigError::new(self.key_path(key), message));
                None
            }
        }
    }

    /// The value of `key`, or `default` when it is absent or invalid (invalid is recorded).
    pub(super) fn or<T: FromToml>(&mut self, key: &'t str, default: T, errs: &mut Errors) -> T {
        self.opt(key, errs).unwrap_or(default)
    }

    /// The value of a key that must be present.
    pub(super) fn req<T: FromToml>(&mut self, key: &'t str, errs: &mut Errors) -> Option<T> {
        if !self.table.contains_key(key) {
            self.used.insert(key);
            errs.push(ConfigError::new(self.key_path(key), "is required"));
            return None;
        }
        self.opt(key, errs)
    }

    /// A sub-table (`[a.b]`); an absent one reads as empty.
    pub(super) fn table(&mut self, key: &'t str, errs: &mut Errors) -> Section<'t> {
        static EMPTY: std::sync::OnceLock<toml::Table> = std::sync::OnceLock::new();
        let path = self.key_path(key);
        match self.raw(key) {
            Some(Value::Table(t)) => Section::new(t, path),
            Some(_) => {
                errs.push(ConfigError::new(path.clone(), "must be a table"));
                Section::new(EMPTY.get_or_init(toml::Table::new), path)
            }
            None => Section::new(EMPTY.get_or_init(toml::Table::new), path),
        }
    }

    /// An array of tables (`[[a.b]]` or `b = [{...}, ...]`); an absent one reads as empty.
    pub(super) fn tables(&mut self, key: &'t str, errs: &mut Errors) -> Vec<Section<'t>> {
        let path = self.key_path(key);
        match self.raw(key) {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .filter_map(|(i, item)| match item {
                    Value::Table(t) => Some(Section::new(t, format!("{path}[{i}]"))),
                    _ => {
                        errs.push(ConfigError::new(format!("{path}[{i}]"), "must be a table"));
                        None
                    }
                })
                .collect(),
            Some(_) => {
                errs.push(ConfigError::new(path, "must be an array of tables"));
                Vec::new()
            }
        }
    }

    /// Records every key of this section that no reader asked for.
    pub(super) fn finish(self, errs: &mut Errors) {
        for key in self.table.keys() {
            if !self.used.contains(key.as_str()) {
                errs.push(ConfigError::new(self.key_path(key), "unknown key"));
            }
        }
    }
}

/// A value that can be read from one TOML value, with a human error message.
pub(super) trait FromToml: Sized {
    fn from_toml(v: &Value) -> Result<Self, String>;
}

impl FromToml for String {
    fn from_toml(v: &Value) -> Result<Self, String> {
        v.as_str().map(str::to_owned).ok_or_else(|| format!("must be a string, found {}", v.type_str()))
    }
}

impl FromToml for bool {
    fn from_toml(v: &Value) -> Result<Self, String> {
        v.as_bool().ok_or_else(|| format!("must be true or false, found {}", v.type_str()))
    }
}

impl FromToml for i64 {
    fn from_toml(v: &Value) -> Result<Self, String> {
        v.as_integer().ok_or_else(|| format!("must be an integer, found {}", v.type_str()))
    }
}

macro_rules! unsigned_from_toml {
    ($($t:ty),*) => {$(
        impl FromToml for $t {
            fn from_toml(v: &Value) -> Result<Self, String> {
                let n = i64::from_toml(v)?;
                <$t>::try_from(n).map_err(|_| {
                    format!("must be between {} and {}, found {n}", <$t>::MIN, <$t>::MAX)
                })
            }
        }
    )*};
}
unsigned_from_toml!(u16, u32, usize);

impl<T: FromToml> FromToml for Vec<T> {
    fn from_toml(v: &Value) -> Result<Self, String> {
        let items = v.as_array().ok_or_else(|| format!("must be an array, found {}", v.type_str()))?;
        items.iter().enumerate().map(|(i, item)| T::from_toml(item).map_err(|e| format!("item {i}: {e}"))).collect()
    }
}

impl FromToml for Duration {
    fn from_toml(v: &Value) -> Result<Self, String> {
        let s = v
            .as_str()
            .ok_or_else(|| format!("must be a duration string such as \"5s\" or \"250ms\", found {}", v.type_str()))?;
        humantime::parse_duration(s.trim())
            .map_err(|e| format!("\"{s}\" is not a duration ({e}); write e.g. \"5s\", \"250ms\", \"10m\""))
    }
}

impl FromToml for SocketAddr {
    fn from_toml(v: &Value) -> Result<Self, String> {
        let s = String::from_toml(v)?;
        s.parse().map_err(|_| format!("\"{s}\" is not an IP address with a port, e.g. \"127.0.0.1:6432\""))
    }
}

impl FromToml for ServerAddr {
    fn from_toml(v: &Value) -> Result<Self, String> {
        let s = String::from_toml(v)?;
        s.parse()
    }
}

/// A byte size such as `"64MiB"`, `"512KiB"`, `"1GB"` or a plain integer number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ByteSize(pub usize);

impl FromToml for ByteSize {
    fn from_toml(v: &Value) -> Result<Self, String> {
        if let Some(n) = v.as_integer() {
            return usize::try_from(n).map(ByteSize).map_err(|_| format!("{n} is not a size"));
        }
        let s = v.as_str().ok_or_else(|| format!("must be a size such as \"64MiB\", found {}", v.type_str()))?;
        parse_size(s)
            .map(ByteSize)
            .ok_or_else(|| format!("\"{s}\" is not a size; write e.g. \"64MiB\", \"512KiB\" or a number of bytes"))
    }
}

fn parse_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: usize = digits.parse().ok()?;
    let factor: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(factor)
}

/// Implements [`FromToml`] and `as_str` for an enum read from a fixed set of strings.
macro_rules! toml_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident => $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name { $($variant),+ }

        impl $name {
            #[must_use]
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $s),+ }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl $crate::config::reader::FromToml for $name {
            fn from_toml(v: &toml::Value) -> Result<Self, String> {
                let s = <String as $crate::config::reader::FromToml>::from_toml(v)?;
                match s.as_str() {
                    $($s => Ok(Self::$variant),)+
                    _ => Err(format!(
                        "\"{s}\" is not one of: {}",
                        [$($s),+].join(", ")
                    )),
                }
            }
        }
    };
}
pub(crate) use toml_enum;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64MiB"), Some(64 << 20));
        assert_eq!(parse_size("512 KiB"), Some(512 << 10));
        assert_eq!(parse_size("1GB"), Some(1_000_000_000));
        assert_eq!(parse_size("100"), Some(100));
        assert_eq!(parse_size("12 parsecs"), None);
        assert_eq!(parse_size("MiB"), None);
    }
}
