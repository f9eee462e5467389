//! The `[proxy]` section: listener, limits, timeouts, logging and client-facing TLS.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::reader::{ByteSize, Errors, Section, toml_enum};
use super::{ConfigError, ServerAddr};

toml_enum!(
    /// Log line format.
    LogFormat { Text => "text", Json => "json" }
);

toml_enum!(
    /// Client-facing TLS: `disable` answers SSLRequest with 'N'.
    TlsMode { Disable => "disable", Allow => "allow", Require => "require" }
);

#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub mode: TlsMode,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    /// Tokio worker threads; 0 = one per core.
    pub workers: usize,
    pub metrics_listen: Option<SocketAddr>,
    pub admin_users: Vec<String>,
    pub max_client_connections: usize,
    pub max_message_size: usize,
    pub client_login_timeout: Duration,
    pub query_wait_timeout: Duration,
    /// Zero means never.
    pub client_idle_timeout: Duration,
    pub server_idle_timeout: Duration,
    pub server_lifetime: Duration,
    pub server_connect_timeout: Duration,
    pub health_check_interval: Duration,
    pub ban_time: Duration,
    pub shutdown_timeout: Duration,
    pub log_format: LogFormat,
    pub tls: TlsConfig,
    /// This instance's number among several behind one address (0-127); its clients' cancel
    /// keys carry it.
    pub instance_id: u32,
    /// The other instances' client addresses: a CancelRequest for another instance's client
    /// is forwarded to them.
    pub peers: Vec<ServerAddr>,
    /// Bind the client listener with SO_REUSEPORT, so several processes share one port.
    pub reuse_port: bool,
}

/// Cancel keys keep the instance in the top byte of a positive process id.
pub const MAX_INSTANCE_ID: u32 = 127;

/// The smallest frame limit that still lets every ordinary client message through.
const MIN_MESSAGE_SIZE: usize = 8 << 10;

pub(super) fn read(mut s: Section<'_>, errs: &mut Errors) -> ProxyConfig {
    let secs = Duration::from_secs;
    let config = ProxyConfig {
        listen: s.or("listen", SocketAddr::from(([127, 0, 0, 1], 6432)), errs),
        workers: s.or("workers", 0, errs),
        metrics_listen: s.opt("metrics_listen", errs),
        admin_users: s.or("admin_users", Vec::new(), errs),
        max_client_connections: s.or("max_client_connections", 10_000, errs),
        max_message_size: s.or("max_message_size", ByteSize(64 << 20), errs).0,
        client_login_timeout: s.or("client_login_timeout", secs(5), errs),
        query_wait_timeout: s.or("query_wait_timeout", secs(10), errs),
        client_idle_timeout: s.or("client_idle_timeout", Duration::ZERO, errs),
        server_idle_timeout: s.or("server_idle_timeout", secs(600), errs),
        server_lifetime: s.or("server_lifetime", secs(3600), errs),
        server_connect_timeout: s.or("server_connect_timeout", secs(3), errs),
        health_check_interval: s.or("health_check_interval", secs(1), errs),
        ban_time: s.or("ban_time", secs(30), errs),
        shutdown_timeout: s.or("shutdown_timeout", secs(30), errs),
        log_format: s.or("log_format", LogFormat::Text, errs),
        tls: read_tls(s.table("tls", errs), errs),
        instance_id: s.or("instance_id", 0, errs),
        peers: s.or("peers", Vec::new(), errs),
        reuse_port: s.or("reuse_port", false, errs),
    };
    let path = s.path().to_owned();
    s.finish(errs);
    check(&config, &path, errs);
    config
}

fn read_tls(mut s: Section<'_>, errs: &mut Errors) -> TlsConfig {
    let tls = TlsConfig {
        mode: s.or("mode", TlsMode::Disable, errs),
        cert: s.opt::<String>("cert", errs).map(PathBuf::from),
        key: s.opt::<String>("key", errs).map(PathBuf::from),
    };
    if tls.mode != TlsMode::Disable {
        for (key, value) in [("cert", &tls.cert), ("key", &tls.key)] {
            if value.is_none() {
                errs.push(ConfigError::new(s.key_path(key), format!("required when mode is \"{}\"", tls.mode)));
            }
        }
    }
    s.finish(errs);
    tls
}

fn check(c: &ProxyConfig, path: &str, errs: &mut Errors) {
    let at = |key: &str| format!("{path}.{key}");
    if c.max_client_connections == 0 {
        errs.push(ConfigError::new(at("max_client_connections"), "must be at least 1"));
    }
    if c.max_message_size < MIN_MESSAGE_SIZE {
        errs.push(ConfigError::new(at("max_message_size"), "must be at least 8KiB"));
    }
    for (key, value) in [
        ("client_login_timeout", c.client_login_timeout),
        ("query_wait_timeout", c.query_wait_timeout),
        ("server_connect_timeout", c.server_connect_timeout),
        ("health_check_interval", c.health_check_interval),
        ("ban_time", c.ban_time),
    ] {
        if value.is_zero() {
            errs.push(ConfigError::new(at(key), "must be greater than zero"));
        }
    }
    if c.instance_id > MAX_INSTANCE_ID {
        errs.push(ConfigError::new(at("instance_id"), format!("must be between 0 and {MAX_INSTANCE_ID}")));
    }
    if c.metrics_listen.is_some_and(|m| m == c.listen) {
        errs.push(ConfigError::new(at("metrics_listen"), "must differ from proxy.listen"));
    }
}
