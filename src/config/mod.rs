//! Configuration: load a TOML file, validate all of it (every problem with its key path,
//! unknown keys rejected, human durations and sizes), and hand out an immutable snapshot.
//!
//! Each submodule owns one section of the file (DESIGN §3). Nothing here opens sockets or
//! knows about sessions; the rest of the proxy only ever sees a validated [`Config`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

mod databases;
mod proxy;
pub(crate) mod reader;
mod users;

pub use databases::{
    ADMIN_DATABASE, CrossShard, DatabaseConfig, KeyType, KeyValue, ListMapping, LoadBalance, PoolMode, RangeMapping,
    ReadYourWrites, ReadsTo, ReplicaFallback, RoutingConfig, RoutingRule, RuleRoute, Scheme, ServerTls, ShardConfig,
    ShardedTable, ShardingConfig,
};
pub use proxy::{LogFormat, ProxyConfig, TlsConfig, TlsMode};
pub use users::{AuthMethod, Password, UserConfig};

use reader::{Errors, Section};

/// A validated configuration. Shared as `Arc<Config>`; never mutated after load.
#[derive(Debug, Clone)]
pub struct Config {
    pub proxy: ProxyConfig,
    pub users: Vec<UserConfig>,
    pub databases: Vec<DatabaseConfig>,
    /// The file this was loaded from, if any (relative paths in the config are resolved from
    /// the process's working directory, as PostgreSQL tools do).
    pub source: Option<PathBuf>,
}

impl Config {
    /// Reads and validates a config file. `PGROUTER_INSTANCE_ID` in the environment, when
    /// set, overrides `proxy.instance_id` (so identical pods of a StatefulSet can each take
    /// their ordinal).
    pub fn load(path: &Path) -> Result<Self, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError::new(path.display().to_string(), format!("cannot read: {e}"))])
        })?;
        let mut config = Self::from_toml(&text)?;
        config.source = Some(path.to_owned());
        if let Ok(value) = std::env::var("PGROUTER_INSTANCE_ID") {
            config.proxy.instance_id =
                value.trim().parse().ok().filter(|id| *id <= proxy::MAX_INSTANCE_ID).ok_or_else(|| {
                    let message = format!("must be a number from 0 to {}, found {value:?}", proxy::MAX_INSTANCE_ID);
                    ConfigErrors(vec![ConfigError::new("PGROUTER_INSTANCE_ID", message)])
                })?;
        }
        Ok(config)
    }

    /// Parses and validates config text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigErrors> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let message = e.message().to_owned();
            let location = e.span().map_or_else(String::new, |span| {
                let line = text[..span.start].matches('\n').count() + 1;
                format!("line {line}")
            });
            ConfigErrors(vec![ConfigError::new(location, format!("TOML syntax: {message}"))])
        })?;
        let mut errs = Errors::new();
        let mut root = Section::new(&table, "");
        let proxy = proxy::read(root.table("proxy", &mut errs), &mut errs);
        let users = users::read(root.tables("users", &mut errs), &mut errs);
        let databases = databases::read(root.tables("databases", &mut errs), &mut errs);
        root.finish(&mut errs);
        cross_check(&proxy, &users, &databases, &mut errs);
        if errs.is_empty() { Ok(Self { proxy, users, databases, source: None }) } else { Err(ConfigErrors(errs)) }
    }

    #[must_use]
    pub fn user(&self, name: &str) -> Option<&UserConfig> {
        self.users.iter().find(|u| u.name == name)
    }

    #[must_use]
    pub fn database(&self, name: &str) -> Option<&DatabaseConfig> {
        self.databases.iter().find(|d| d.name == name)
    }
}

/// Checks that need more than one section.
fn cross_check(proxy: &ProxyConfig, users: &[UserConfig], dbs: &[DatabaseConfig], errs: &mut Errors) {
    if users.is_empty() {
        errs.push(ConfigError::new("users", "at least one [[users]] entry is required"));
    }
    if dbs.is_empty() {
        errs.push(ConfigError::new("databases", "at least one [[databases]] entry is required"));
    }
    for (i, admin) in proxy.admin_users.iter().enumerate() {
        if !users.iter().any(|u| &u.name == admin) {
            errs.push(ConfigError::new(
                format!("proxy.admin_users[{i}]"),
                format!("\"{admin}\" is not a user listed in [[users]]"),
            ));
        }
    }
}

/// One validation problem: where it is and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self { path: path.into(), message: message.into() }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found in one config, in file order.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// A backend address: `host:port`, where host may be a name (resolved at connect time, so
/// Docker and Kubernetes service names work) or an IP literal (`[::1]:5432` for IPv6).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerAddr {
    pub host: String,
    pub port: u16,
}

impl FromStr for ServerAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("\"{s}\" is not host:port, e.g. \"127.0.0.1:5432\" or \"db1:5432\"");
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port: u16 = port.parse().map_err(|_| bad())?;
        if host.is_empty() || port == 0 || host.contains(char::is_whitespace) {
            return Err(bad());
        }
        Ok(Self { host: host.to_owned(), port })
    }
}

impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests;
