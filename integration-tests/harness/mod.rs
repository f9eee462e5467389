//! Test harness: a real PostgreSQL topology (from `pgrouter::cluster`) and the real pgrouter
//! binary in front of it, with a generated config, on free loopback ports. Everything is torn
//! down on drop, also when a test fails; a failing test prints the proxy's log.

#![allow(dead_code)] // each test file uses a different part of the harness

use std::fmt::Write as _;
use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use pgrouter::cluster::{AuthMethod, Topology, TopologyOptions, UserSpec, free_port, pg_bindir};

pub const APP_USER: &str = "app";
pub const APP_PASSWORD: &str = "app-secret";
/// A role stored with an md5 password and reached through an md5 pg_hba line.
pub const MD5_USER: &str = "legacy";
pub const MD5_PASSWORD: &str = "legacy-secret";
/// A role whose pg_hba line asks for the password in cleartext.
pub const CLEAR_USER: &str = "plain";
pub const CLEAR_PASSWORD: &str = "plain-secret";

/// What a test needs from its environment.
#[derive(Debug, Clone)]
pub struct EnvOptions {
    pub replica: bool,
    pub shards: usize,
    /// Extra lines for the `[proxy]` section.
    pub proxy: String,
    /// Extra `[[users]]` entries (TOML), after the default ones.
    pub users: String,
    /// `[[databases]]` entries beyond the default `app` (transaction) and `app_session`.
    pub databases: String,
    pub pool_size: usize,
    pub pg_conf: Vec<String>,
    /// Databases created on the primary (owned by `app`) besides `app`.
    pub server_databases: Vec<String>,
}

impl Default for EnvOptions {
    fn default() -> Self {
        Self {
            replica: false,
            shards: 0,
            proxy: String::new(),
            users: String::new(),
            databases: String::new(),
            pool_size: 4,
            pg_conf: vec!["max_connections = 120".into()],
            server_databases: Vec::new(),
        }
    }
}

/// PostgreSQL servers plus a running pgrouter.
pub struct Env {
    pub topo: Topology,
    pub proxy: Proxy,
}

impl Env {
    pub fn start(opts: EnvOptions) -> Self {
        let topo = Topology::start(TopologyOptions {
            replica: opts.replica,
            shards: opts.shards,
            users: vec![
                UserSpec { name: APP_USER.into(), password: APP_PASSWORD.into(), auth: AuthMethod::ScramSha256 },
                UserSpec { name: MD5_USER.into(), password: MD5_PASSWORD.into(), auth: AuthMethod::Md5 },
                UserSpec { name: CLEAR_USER.into(), password: CLEAR_PASSWORD.into(), auth: AuthMethod::Cleartext },
            ],
            databases: std::iter::once("app".to_owned()).chain(opts.server_databases.iter().cloned()).collect(),
            extra_conf: opts.pg_conf.clone(),
            base_dir: None,
        })
        .expect("start PostgreSQL topology");
        let proxy = Proxy::start(|port| config_text(&topo, &opts, port));
        Self { topo, proxy }
    }

    /// A superuser query on the primary, bypassing the proxy.
    pub fn primary_sql(&self, sql: &str) -> String {
        self.topo.primary.psql("app", sql).expect("query on primary")
    }
}

/// The config a test environment runs with: `app` (transaction pooling) and `app_session`
/// (session pooling) on the primary, plus whatever the options add.
pub fn config_text(topo: &Topology, opts: &EnvOptions, port: u16) -> String {
    let mut shards = format!("[[databases.shards]]\nprimary = \"{}\"\n", topo.primary.addr());
    if let Some(replica) = &topo.replica {
        writeln!(shards, "replicas = [\"{}\"]", replica.addr()).unwrap();
    }
    let mut text = format!(
        r#"[proxy]
listen = "127.0.0.1:{port}"
shutdown_timeout = "10s"
{proxy}

[[users]]
name = "{APP_USER}"
password = "{APP_PASSWORD}"

[[users]]
name = "{MD5_USER}"
password = "{MD5_PASSWORD}"
auth = "md5"

[[users]]
name = "{CLEAR_USER}"
password = "{CLEAR_PASSWORD}"
{users}
"#,
        proxy = opts.proxy,
        users = opts.users,
    );
    for (name, mode) in [("app", "transaction"), ("app_session", "session")] {
        write!(
            text,
            "\n[[databases]]\nname = \"{name}\"\nserver_database = \"app\"\npool_mode = \"{mode}\"\npool_size = {}\n{shards}",
            opts.pool_size
        )
        .unwrap();
    }
    // `{PRIMARY}`, `{REPLICA}` and `{SHARD<n>}` in extra databases stand for those servers'
    // addresses.
    let replica = topo.replica.as_ref().map(|r| r.addr()).unwrap_or_default();
    let mut databases = opts.databases.replace("{PRIMARY}", &topo.primary.addr()).replace("{REPLICA}", &replica);
    for (n, shard) in topo.shards.iter().enumerate() {
        databases = databases.replace(&format!("{{SHARD{n}}}"), &shard.addr());
    }
    text.push_str(&databases);
    text
}

/// The pgrouter binary running with a config file in a temporary directory.
pub struct Proxy {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Proxy {
    /// Starts pgrouter with the config `make_config(port)` and waits until it accepts.
    pub fn start(make_config: impl Fn(u16) -> String) -> Self {
        let mut last_log = String::new();
        for _ in 0..3 {
            let port = free_port();
            let dir = tempfile::tempdir().expect("temp dir");
            let config = dir.path().join("pgrouter.toml");
            std::fs::write(&config, make_config(port)).expect("write config");
            let child = spawn_proxy(&config, &dir.path().join("pgrouter.log"));
            let mut proxy = Self { child, port, dir };
            if proxy.wait_ready(Duration::from_secs(20)) {
                return proxy;
            }
            last_log = proxy.log();
            let _ = proxy.child.kill();
            let _ = proxy.child.wait();
        }
        panic!("pgrouter did not start; last log:\n{last_log}");
    }

    fn wait_ready(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return false;
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    #[must_use]
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("pgrouter.toml")
    }

    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pgrouter.log")).unwrap_or_default()
    }

    /// A field of /proc/<pid>/status in KiB (VmRSS, VmHWM).
    #[must_use]
    pub fn mem_kib(&self, field: &str) -> u64 {
        proc_status_kib(self.pid(), field)
    }

    pub fn signal(&self, sig: &str) {
        let ok =
            Command::new("kill").args([&format!("-{sig}"), &self.pid().to_string()]).status().expect("kill").success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for the process to exit, up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// A libpq connection string for this proxy.
    #[must_use]
    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        format!("host=127.0.0.1 port={} user={user} password={password} dbname={db} connect_timeout=10", self.port)
    }

    /// Runs psql against the proxy (as `app` unless the args say otherwise).
    pub fn psql(&self, db: &str, args: &[&str]) -> Output {
        self.psql_as(APP_USER, APP_PASSWORD, db, args)
    }

    pub fn psql_as(&self, user: &str, password: &str, db: &str, args: &[&str]) -> Output {
        pg_tool("psql")
            .args(["-X", "-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", user, "-d", db])
            .args(args)
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null())
            .output()
            .expect("run psql")
    }

    /// Runs pgbench against the proxy as `app`.
    pub fn pgbench(&self, db: &str, args: &[&str]) -> Output {
        pg_tool("pgbench")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", APP_USER])
            .args(args)
            .arg(db)
            .env("PGPASSWORD", APP_PASSWORD)
            .stdin(Stdio::null())
            .output()
            .expect("run pgbench")
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("---- pgrouter log (last {} lines) ----", tail.len());
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

fn spawn_proxy(config: &Path, log: &Path) -> Child {
    let log = std::fs::File::create(log).expect("log file");
    Command::new(env!("CARGO_BIN_EXE_pgrouter"))
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info,pgrouter=debug")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .spawn()
        .expect("spawn pgrouter")
}

/// A PostgreSQL client program from the server's bindir (falls back to PATH).
pub fn pg_tool(name: &str) -> Command {
    let path = pg_bindir().map(|d| d.join(name)).ok().filter(|p| p.exists()).unwrap_or_else(|| PathBuf::from(name));
    Command::new(path)
}

pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let mut text = String::new();
    std::fs::File::open(format!("/proc/{pid}/status"))
        .and_then(|mut f| f.read_to_string(&mut text))
        .expect("read /proc status");
    text.lines()
        .find_map(|l| {
            l.strip_prefix(field).and_then(|rest| rest.trim_start_matches(':').split_whitespace().next()?.parse().ok())
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Polls `check` until it returns true or `limit` passes.
pub fn wait_until(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One frontend message, for tests that speak the protocol over a raw socket.
pub fn frontend_message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&u32::try_from(body.len() + 4).unwrap().to_be_bytes());
    out.extend_from_slice(body);
    out
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts a tool succeeded, showing its output otherwise.
pub fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        stdout(out),
        stderr(out)
    );
}

/// A multi-threaded runtime for tests that drive async clients.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

/// Connects with tokio-postgres and drives the connection on the current runtime.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// The SQLSTATE of a tokio-postgres error, if the server (or proxy) sent one.
pub fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.as_db_error().map(|db| db.code().code().to_owned())
}

/// "SQLSTATE: message" of a tokio-postgres error (its Display says only "db error").
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

/// A parameter sent in text format, so one statement can bind any type as PostgreSQL would
/// parse it from text.
#[derive(Debug)]
pub struct TextParam(pub Option<String>);

impl tokio_postgres::types::ToSql for TextParam {
    fn to_sql(
        &self,
        _: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match &self.0 {
            Some(s) => {
                out.extend_from_slice(s.as_bytes());
                Ok(tokio_postgres::types::IsNull::No)
            }
            None => Ok(tokio_postgres::types::IsNull::Yes),
        }
    }
    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }
    fn encode_format(&self, _: &tokio_postgres::types::Type) -> tokio_postgres::types::Format {
        tokio_postgres::types::Format::Text
    }
    tokio_postgres::types::to_sql_checked!();
}
