//! Throwaway PostgreSQL clusters for the integration tests and `pgrouter demo`.
//!
//! The proxy is only worth testing against a real server, with a real streaming replica and real
//! shards, so this module starts them: a primary, an optional replica made with `pg_basebackup -R`,
//! and any number of independent shard primaries, all on loopback with ports picked at run time.
//! Everything is blocking and std-only because it runs before and after the code under test, not
//! inside it; it knows nothing of the proxy.
//!
//! Why it looks the way it does:
//! - PostgreSQL refuses to run as root, so when we are root every server-side program runs as the
//!   `postgres` OS user (`runuser`) in directories owned by that user ([`server`]).
//! - `initdb` is the slow step, so one template data directory is made per machine and user
//!   and each cluster is a `cp -a` of it, on tmpfs when `/dev/shm` has room ([`setup`]).
//! - A `Topology` owns its servers: dropping it (also while a test panics) stops them with
//!   `pg_ctl stop -m immediate` and removes the directory it made, and a failed `start` cleans up
//!   what it had already started before it returns the error.

mod server;
mod setup;

use std::fmt;
use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use server::PgBin;
pub use server::Server;
use setup::{BaseDir, Blueprint, Kind};

/// Superuser made by `initdb -U`; trusted over the unix socket.
pub const SUPERUSER: &str = "postgres";
/// The superuser's password, for TCP connections (pg_hba asks for SCRAM there).
pub const SUPERUSER_PASSWORD: &str = "postgres";
/// Role the replica streams WAL as.
pub const REPLICATOR: &str = "replicator";
/// Password of [`REPLICATOR`].
pub const REPLICATOR_PASSWORD: &str = "replicator-secret";
/// Environment variable naming the folder of `initdb`, `pg_ctl`, `postgres`, ...
pub const BINDIR_ENV: &str = "PGROUTER_PG_BINDIR";
/// Environment variable naming the folder fresh base directories are made in (default: `/dev/shm`
/// if it is a tmpfs with 1 GiB free, else the temp dir).
pub const CLUSTER_ROOT_ENV: &str = "PGROUTER_CLUSTER_ROOT";

/// What to start. `Default` is the integration tests' usual shape.
#[derive(Debug, Clone)]
pub struct TopologyOptions {
    /// Start a streaming replica of the primary (`pg_basebackup -R`).
    pub replica: bool,
    /// Number of extra, independent primaries used as shards.
    pub shards: usize,
    /// Roles created on every primary (and so on the replica).
    pub users: Vec<UserSpec>,
    /// Databases created on every primary, owned by the first user.
    pub databases: Vec<String>,
    /// Extra `postgresql.conf` lines for every cluster, e.g. `max_connections = 200`.
    /// They come last, so they win; do not set `port` or `unix_socket_directories` here.
    pub extra_conf: Vec<String>,
    /// Where to put everything; `None` makes a fresh directory, removed on drop, under
    /// `$PGROUTER_CLUSTER_ROOT`, else `/dev/shm` if it has 1 GiB free, else the temp dir.
    /// A given directory is kept, but must not already hold clusters of the same names.
    pub base_dir: Option<PathBuf>,
}

impl Default for TopologyOptions {
    fn default() -> Self {
        TopologyOptions {
            replica: true,
            shards: 2,
            users: vec![UserSpec::new("app", "app-secret", AuthMethod::ScramSha256)],
            databases: vec!["app".to_owned()],
            extra_conf: Vec::new(),
            base_dir: None,
        }
    }
}

/// A login role. Names are limited to ASCII letters, digits, `_` and `-` so they can be written
/// into `pg_hba.conf` and SQL without surprises.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSpec {
    pub name: String,
    pub password: String,
    pub auth: AuthMethod,
}

impl UserSpec {
    pub fn new(name: &str, password: &str, auth: AuthMethod) -> UserSpec {
        UserSpec { name: name.to_owned(), password: password.to_owned(), auth }
    }
}

/// How a role's password is stored, and so the `pg_hba.conf` method that checks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    ScramSha256,
    Md5,
    /// Stored as SCRAM, but pg_hba asks for the password in cleartext (method `password`).
    Cleartext,
}

impl AuthMethod {
    /// The `password_encryption` the role's password is stored with.
    fn storage(self) -> &'static str {
        match self {
            AuthMethod::ScramSha256 | AuthMethod::Cleartext => "scram-sha-256",
            AuthMethod::Md5 => "md5",
        }
    }

    /// The `pg_hba.conf` method that checks it.
    fn hba_method(self) -> &'static str {
        match self {
            AuthMethod::ScramSha256 => "scram-sha-256",
            AuthMethod::Md5 => "md5",
            AuthMethod::Cleartext => "password",
        }
    }
}

/// Running servers; stopped and cleaned up on drop.
#[derive(Debug)]
pub struct Topology {
    pub primary: Server,
    pub replica: Option<Server>,
    pub shards: Vec<Server>,
    base: BaseDir,
    stopped: bool,
}

impl Topology {
    /// Starts every server and blocks until all accept connections and the replica streams.
    pub fn start(opts: TopologyOptions) -> Result<Topology, ClusterError> {
        let began = Instant::now();
        setup::validate(&opts)?;
        let bin = Arc::new(PgBin::locate()?);
        let base = BaseDir::create(opts.base_dir.clone(), &bin)?;
        match launch(&bin, &base, &opts) {
            Ok((primary, replica, shards)) => {
                tracing::info!(
                    base = %base.path().display(),
                    elapsed_ms = began.elapsed().as_millis(),
                    "postgres topology ready"
                );
                Ok(Topology { primary, replica, shards, base, stopped: false })
            }
            Err(err) => {
                base.remove();
                Err(err)
            }
        }
    }

    /// Primary, then replica, then shards.
    pub fn servers(&self) -> impl Iterator<Item = &Server> {
        std::iter::once(&self.primary).chain(self.replica.iter()).chain(self.shards.iter())
    }

    /// The folder holding every cluster's directory.
    pub fn base_dir(&self) -> &Path {
        self.base.path()
    }

    /// Stops every server at once (`-m immediate`) and removes the base directory if `start`
    /// created it. Safe to call twice; `Drop` calls it.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let began = Instant::now();
        // In parallel: each `pg_ctl stop -w` spends most of its time polling.
        thread::scope(|scope| {
            for server in self.servers() {
                scope.spawn(|| server.halt());
            }
        });
        self.base.remove();
        tracing::info!(elapsed_ms = began.elapsed().as_millis(), "postgres topology stopped");
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.stop();
    }
}

type Started = (Server, Option<Server>, Vec<Server>);

/// Starts the shards on their own threads while the primary and then its replica start here:
/// initdb-free clusters are cheap, so the wall time is mostly server start-up, which overlaps.
fn launch(bin: &Arc<PgBin>, base: &BaseDir, opts: &TopologyOptions) -> Result<Started, ClusterError> {
    let blueprint = Blueprint::new(bin, base.path(), opts)?;
    let blueprint = &blueprint;
    thread::scope(|scope| {
        let shard_threads: Vec<_> = (1..=opts.shards)
            .map(|n| scope.spawn(move || blueprint.primary(&format!("shard{n}"), Kind::Shard)))
            .collect();
        let primary = blueprint.primary("primary", Kind::Primary);
        let replica = match &primary {
            Ok(primary) if opts.replica => Some(blueprint.replica(primary)),
            _ => None,
        };
        let shards: Vec<_> = shard_threads
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
            .collect();
        assemble(primary, replica, shards)
    })
}

/// All started, or the first error after halting whatever did start.
fn assemble(
    primary: Result<Server, ClusterError>,
    replica: Option<Result<Server, ClusterError>>,
    shards: Vec<Result<Server, ClusterError>>,
) -> Result<Started, ClusterError> {
    let has_replica = replica.is_some();
    let mut started = Vec::new();
    let mut first_error = None;
    for result in std::iter::once(primary).chain(replica).chain(shards) {
        match result {
            Ok(server) => started.push(server),
            Err(err) => {
                first_error.get_or_insert(err);
            }
        }
    }
    if let Some(err) = first_error {
        started.iter().for_each(Server::halt);
        return Err(err);
    }
    let mut started = started.into_iter();
    let primary = started.next().expect("no error, so the primary started");
    let replica = if has_replica { started.next() } else { None };
    Ok((primary, replica, started.collect()))
}

/// Folder of the PostgreSQL server programs: `$PGROUTER_PG_BINDIR`, else `pg_config --bindir`,
/// else the newest `/usr/lib/postgresql/*/bin` (Debian keeps them off PATH). A folder counts only
/// if it holds `initdb`: libpq-dev's `pg_config` answers `/usr/bin`, which has no server.
pub fn pg_bindir() -> Result<PathBuf, ClusterError> {
    let has_initdb = |dir: &PathBuf| dir.join("initdb").is_file();
    if let Some(dir) = std::env::var_os(BINDIR_ENV) {
        let dir = PathBuf::from(dir);
        return if has_initdb(&dir) { Ok(dir) } else { Err(ClusterError::NoBindir) };
    }
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    if let Some(dir) = from_pg_config.filter(has_initdb) {
        return Ok(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, dir)| has_initdb(dir))
        .collect();
    versions.sort();
    versions.pop().map(|(_, dir)| dir).ok_or(ClusterError::NoBindir)
}

/// A port that was free a moment ago on 127.0.0.1. Another process may take it before the
/// server binds it, which is why server start-up retries with a fresh one.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("cannot bind an ephemeral port on 127.0.0.1")
}

/// Why a topology or a server could not be started, stopped or queried.
#[derive(Debug)]
pub enum ClusterError {
    /// No folder with PostgreSQL's server programs was found.
    NoBindir,
    /// The OS user that must own the data directories is missing from /etc/passwd.
    NoServiceUser(String),
    /// The options asked for something this module will not build.
    Options(String),
    /// A file-system step failed.
    Io { context: String, source: io::Error },
    /// A program exited unsuccessfully (or could not be run).
    Command { command: String, status: String, stderr: String },
    /// Waiting for a condition passed its deadline.
    Timeout(String),
    /// A step on one server failed; carries the end of that server's log.
    Server { name: String, port: u16, log_tail: String, source: Box<ClusterError> },
}

impl ClusterError {
    fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> ClusterError {
        let context = context.into();
        move |source| ClusterError::Io { context, source }
    }
}

impl fmt::Display for ClusterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClusterError::NoBindir => {
                write!(f, "no PostgreSQL server binaries found (set {BINDIR_ENV}, or put pg_config on PATH)")
            }
            ClusterError::NoServiceUser(user) => {
                write!(f, "OS user {user:?} not found in /etc/passwd")
            }
            ClusterError::Options(why) => write!(f, "invalid topology options: {why}"),
            ClusterError::Io { context, source } => write!(f, "{context}: {source}"),
            ClusterError::Command { command, status, stderr } => {
                write!(f, "{command} failed ({status}): {}", stderr.trim())
            }
            ClusterError::Timeout(what) => write!(f, "timed out waiting for {what}"),
            ClusterError::Server { name, port, log_tail, source } => {
                write!(f, "{name} (port {port}): {source}\n--- end of {name}'s log ---\n{log_tail}")
            }
        }
    }
}

impl std::error::Error for ClusterError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClusterError::Io { source, .. } => Some(source),
            ClusterError::Server { source, .. } => Some(source.as_ref()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Mutex, MutexGuard, PoisonError};
    use std::time::Duration;

    /// Topologies are heavy for a 2-core box, and one test counts leftover directories.
    fn one_at_a_time() -> MutexGuard<'static, ()> {
        static LOCK: Mutex<()> = Mutex::new(());
        LOCK.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs psql over TCP as `user`, the way a real client would log in.
    fn tcp_psql(server: &Server, user: &str, password: &str) -> Result<String, ClusterError> {
        let mut cmd = Command::new(pg_bindir()?.join("psql"));
        cmd.args(["-X", "-A", "-t", "-h", server.host(), "-p", &server.port.to_string()])
            .args(["-U", user, "-d", "app", "-c", "SELECT current_user"])
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "10");
        server::run(cmd).map(|out| out.trim().to_owned())
    }

    /// Polls `check` for up to 30 s.
    fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Live (non-zombie) processes whose pid is in `pids` or whose command line names `path`.
    fn live_processes(pids: &[u32], path: &Path) -> Vec<u32> {
        let needle = path.to_string_lossy().into_owned();
        let entries = std::fs::read_dir("/proc").expect("read /proc");
        entries
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| pid != std::process::id())
            .filter(|pid| {
                let proc_dir = PathBuf::from(format!("/proc/{pid}"));
                let cmdline = std::fs::read(proc_dir.join("cmdline")).unwrap_or_default();
                let stat = std::fs::read_to_string(proc_dir.join("stat")).unwrap_or_default();
                let zombie = stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z'));
                let named = String::from_utf8_lossy(&cmdline).contains(&needle);
                !zombie && (pids.contains(pid) || named)
            })
            .collect()
    }

    fn leftover_base_dirs() -> Vec<PathBuf> {
        let prefix = format!("pgrouter-cluster-{}-", std::process::id());
        std::fs::read_dir(setup::cluster_root())
            .expect("read temp dir")
            .flatten()
            .filter(|entry| entry.file_name().to_string_lossy().starts_with(&prefix))
            .map(|entry| entry.path())
            .collect()
    }

    #[test]
    fn full_topology_serves_replicates_authenticates_and_cleans_up() {
        let _lock = one_at_a_time();
        let mut opts = TopologyOptions::default();
        opts.users.push(UserSpec::new("legacy", "old-secret", AuthMethod::Md5));
        let started = Instant::now();
        let topology = Topology::start(opts).expect("topology starts");
        eprintln!("topology start: {:?}", started.elapsed());
        assert_eq!(topology.servers().count(), 4);

        let replica = topology.replica.as_ref().expect("a replica");
        assert_eq!(replica.psql("postgres", "SELECT pg_is_in_recovery()").unwrap(), "t");
        let primary = &topology.primary;
        primary.psql("app", "CREATE TABLE seen (x int); INSERT INTO seen VALUES (42);").unwrap();
        eventually("the replica to see the table", || {
            replica.psql("app", "SELECT x FROM seen").is_ok_and(|x| x == "42")
        });

        let names: Vec<_> = topology.shards.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["shard1", "shard2"]);
        for shard in &topology.shards {
            assert_eq!(shard.psql("app", "SELECT 1").unwrap(), "1");
            assert_eq!(shard.psql("app", "SHOW synchronous_commit").unwrap(), "off");
        }
        assert_eq!(primary.psql("app", "SHOW synchronous_commit").unwrap(), "on");

        let stored = "SELECT rolname || ':' || CASE WHEN rolpassword LIKE 'md5%' THEN 'md5' \
                      ELSE split_part(rolpassword, '$', 1) END FROM pg_authid \
                      WHERE rolname IN ('app', 'legacy') ORDER BY 1";
        let expected = "app:SCRAM-SHA-256\nlegacy:md5";
        assert_eq!(primary.psql("postgres", stored).unwrap(), expected);
        for server in [primary, replica, &topology.shards[0]] {
            assert_eq!(tcp_psql(server, "legacy", "old-secret").unwrap(), "legacy");
            assert_eq!(tcp_psql(server, "app", "app-secret").unwrap(), "app");
            let wrong = tcp_psql(server, "legacy", "nope").unwrap_err().to_string();
            assert!(wrong.contains("password authentication failed"), "{wrong}");
        }
        assert_eq!(tcp_psql(primary, SUPERUSER, SUPERUSER_PASSWORD).unwrap(), SUPERUSER);

        let restarted = Instant::now();
        topology.shards[1].restart().unwrap();
        eprintln!("shard restart: {:?}", restarted.elapsed());
        assert_eq!(topology.shards[1].psql("app", "SELECT 2").unwrap(), "2");

        let base = topology.base_dir().to_owned();
        let pids: Vec<u32> = topology.servers().filter_map(Server::postmaster_pid).collect();
        assert_eq!(pids.len(), 4);
        let stopping = Instant::now();
        drop(topology);
        eprintln!("topology stop: {:?}", stopping.elapsed());
        assert!(!base.exists(), "{} still exists", base.display());
        assert_eq!(live_processes(&pids, &base), Vec::<u32>::new());
    }

    #[test]
    fn a_panicking_test_still_stops_and_removes_everything() {
        let _lock = one_at_a_time();
        let (tx, rx) = std::sync::mpsc::channel();
        let test = thread::spawn(move || {
            let opts = TopologyOptions { shards: 1, ..TopologyOptions::default() };
            let topology = Topology::start(opts).unwrap();
            let pids: Vec<u32> = topology.servers().filter_map(Server::postmaster_pid).collect();
            tx.send((topology.base_dir().to_owned(), pids)).unwrap();
            panic!("the test failed");
        });
        assert!(test.join().is_err());
        let (base, pids) = rx.recv().unwrap();
        assert_eq!(pids.len(), 3);
        assert!(!base.exists(), "{} still exists", base.display());
        assert_eq!(live_processes(&pids, &base), Vec::<u32>::new());
    }

    #[test]
    fn a_server_that_will_not_start_leaves_nothing_behind() {
        let _lock = one_at_a_time();
        let opts =
            TopologyOptions { extra_conf: vec!["shared_buffers = banana".to_owned()], ..TopologyOptions::default() };
        let err = Topology::start(opts).expect_err("bad setting").to_string();
        assert!(err.contains("end of") && err.contains("shared_buffers"), "{err}");
        assert_eq!(leftover_base_dirs(), Vec::<PathBuf>::new());
    }

    #[test]
    fn a_failed_setup_stops_the_servers_it_started() {
        let _lock = one_at_a_time();
        let base = std::env::temp_dir().join(format!("pgrouter-given-{}", std::process::id()));
        let opts = TopologyOptions {
            // Servers start, then CREATE ROLE fails in a read-only transaction.
            extra_conf: vec!["default_transaction_read_only = on".to_owned()],
            base_dir: Some(base.clone()),
            ..TopologyOptions::default()
        };
        let err = Topology::start(opts).expect_err("read-only").to_string();
        assert!(err.contains("read-only transaction"), "{err}");
        assert!(base.exists(), "a given base dir is kept");
        assert_eq!(live_processes(&[], &base), Vec::<u32>::new());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn stop_is_idempotent_and_a_lone_primary_works() {
        let _lock = one_at_a_time();
        let opts = TopologyOptions { replica: false, shards: 0, ..TopologyOptions::default() };
        let mut topology = Topology::start(opts).unwrap();
        assert_eq!(topology.servers().count(), 1);
        let primary = &topology.primary;
        primary.stop().unwrap();
        assert!(primary.psql("postgres", "SELECT 1").is_err());
        primary.start().unwrap();
        assert_eq!(primary.psql("postgres", "SELECT 1").unwrap(), "1");
        topology.stop();
        topology.stop();
        assert!(!topology.base_dir().exists());
    }
}
