//! Building clusters: the template data directory, per-cluster settings, roles and the replica.
//!
//! `initdb` costs most of a cluster's start-up, and every cluster here is initialised with the
//! same options, so it runs once per machine, binaries and OS user: the result is kept in
//! `$TMPDIR/pgrouter-template-<hash>/data` (published by an atomic rename, so concurrent test
//! processes never see half of one) and each cluster starts as a `cp -a` of it. The template's
//! `postgresql.conf` ends by including `pgrouter.conf`, the one file each cluster rewrites with
//! its own port, socket folder and settings; a replica made by `pg_basebackup` rewrites the copy
//! it got from its primary. Clusters themselves live on tmpfs when there is room (see
//! [`cluster_root`]): on a VM disk, creating files is what makes copies and base backups slow.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::server::{PgBin, Server, run};
use super::{
    CLUSTER_ROOT_ENV, ClusterError, REPLICATOR, REPLICATOR_PASSWORD, SUPERUSER, SUPERUSER_PASSWORD, TopologyOptions,
    UserSpec, free_port,
};

const INITDB_ARGS: [&str; 8] =
    ["-U", SUPERUSER, "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync", "-E", "UTF8", "--locale=C"];
/// Bump when the template's contents change, so stale cached templates are not reused.
const TEMPLATE_REVISION: &str = "1";
/// The per-cluster settings file, included at the end of `postgresql.conf`.
const CONF_FILE: &str = "pgrouter.conf";
/// Start attempts, each on a fresh port, before a port someone else took is an error.
const PORT_ATTEMPTS: u32 = 5;
/// Free space `/dev/shm` needs before clusters go there.
const SHM_MIN_FREE_KIB: u64 = 1024 * 1024;
/// How long a new replica may take to stream from its primary.
const STREAMING_WAIT: Duration = Duration::from_secs(60);
const STREAMING_SQL: &str = "SELECT pg_is_in_recovery() \
    AND pg_last_wal_replay_lsn() IS NOT NULL \
    AND EXISTS (SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming')";

/// What a cluster is for; only shards may trade durability for speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Primary,
    Replica,
    Shard,
}

/// The folder holding every cluster's folder; removed at the end only if we made it.
#[derive(Debug)]
pub(super) struct BaseDir {
    path: PathBuf,
    owned: bool,
}

impl BaseDir {
    pub(super) fn create(given: Option<PathBuf>, bin: &PgBin) -> Result<BaseDir, ClusterError> {
        let Some(path) = given else {
            let path = unique_dir(&cluster_root(), "pgrouter-cluster", bin)?;
            return Ok(BaseDir { path, owned: true });
        };
        // Not chowned: it may be a shared folder. The service user only passes through it into
        // the cluster folders, which are created and chowned one by one.
        fs::create_dir_all(&path).map_err(ClusterError::io(format!("create {}", path.display())))?;
        Ok(BaseDir { path, owned: false })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    pub(super) fn remove(&self) {
        if !self.owned {
            return;
        }
        match fs::remove_dir_all(&self.path) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => {
                tracing::warn!(dir = %self.path.display(), %err, "cannot remove cluster dir")
            }
        }
    }
}

/// Parent of the base directories `start` makes: [`CLUSTER_ROOT_ENV`], else `/dev/shm` when
/// it is a tmpfs with [`SHM_MIN_FREE_KIB`] free, else the temp dir. Creating a data directory's
/// thousand files costs ~1 s on a VM disk and ~0.1 s on tmpfs, and with `fsync = off` the disk
/// buys nothing. The threshold keeps us off Docker's default 64 MB `/dev/shm`.
pub(super) fn cluster_root() -> PathBuf {
    if let Some(root) = std::env::var_os(CLUSTER_ROOT_ENV) {
        return PathBuf::from(root);
    }
    let shm = Path::new("/dev/shm");
    if is_tmpfs(shm) && free_kib(shm).is_some_and(|kib| kib >= SHM_MIN_FREE_KIB) {
        shm.to_owned()
    } else {
        std::env::temp_dir()
    }
}

fn is_tmpfs(dir: &Path) -> bool {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts.lines().any(|line| {
        let mut fields = line.split_whitespace().skip(1);
        fields.next() == dir.to_str() && fields.next() == Some("tmpfs")
    })
}

/// Free KiB on `dir`'s file system, from `df -Pk` (std has no statvfs).
fn free_kib(dir: &Path) -> Option<u64> {
    let out = Command::new("df").arg("-Pk").arg(dir).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines().nth(1)?.split_whitespace().nth(3)?.parse().ok()
}

/// A fresh folder under `parent`, owned by the service user.
fn unique_dir(parent: &Path, prefix: &str, bin: &PgBin) -> Result<PathBuf, ClusterError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let name = format!("{prefix}-{}-{}-{nanos}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
    let path = parent.join(name);
    fs::create_dir(&path).map_err(ClusterError::io(format!("create {}", path.display())))?;
    bin.chown(&path)?;
    Ok(path)
}

/// Everything the clusters of one topology share.
pub(super) struct Blueprint<'a> {
    bin: &'a Arc<PgBin>,
    base: &'a Path,
    template: PathBuf,
    hba: String,
    setup_sql: String,
    extra_conf: &'a [String],
}

impl<'a> Blueprint<'a> {
    pub(super) fn new(
        bin: &'a Arc<PgBin>,
        base: &'a Path,
        opts: &'a TopologyOptions,
    ) -> Result<Blueprint<'a>, ClusterError> {
        Ok(Blueprint {
            bin,
            base,
            template: template(bin)?,
            hba: hba_conf(&opts.users),
            setup_sql: setup_sql(&opts.users, &opts.databases),
            extra_conf: &opts.extra_conf,
        })
    }

    /// A primary or shard: copy of the template, started, with roles and databases created.
    pub(super) fn primary(&self, name: &str, kind: Kind) -> Result<Server, ClusterError> {
        let dir = self.cluster_dir(name)?;
        let mut copy = self.bin.command("cp", &[]);
        copy.arg("-a").arg(&self.template).arg(dir.join("data"));
        run(copy)?;
        self.bin.write_file(&dir.join("data").join("pg_hba.conf"), &self.hba)?;
        let server = self.boot(name, &dir, kind)?;
        if let Err(err) = server.psql("postgres", &self.setup_sql) {
            let err = server.fail(err);
            server.halt();
            return Err(err);
        }
        Ok(server)
    }

    /// A streaming replica of `primary`, returned once it streams.
    pub(super) fn replica(&self, primary: &Server) -> Result<Server, ClusterError> {
        let dir = self.cluster_dir("replica")?;
        let bin = self.bin;
        let mut backup = bin.command(bin.program("pg_basebackup"), &[("PGPASSWORD", REPLICATOR_PASSWORD)]);
        backup.arg("-D").arg(dir.join("data"));
        backup.args(["-R", "-X", "stream", "-c", "fast", "--no-sync", "-w"]);
        backup.args(["-h", primary.host(), "-p", &primary.port.to_string(), "-U", REPLICATOR]);
        // A refused backup is explained in the primary's log.
        run(backup).map_err(|err| primary.fail(err))?;
        let server = self.boot("replica", &dir, Kind::Replica)?;
        if let Err(err) = server.wait_until("the replica to stream", STREAMING_SQL, STREAMING_WAIT) {
            server.halt();
            return Err(err);
        }
        Ok(server)
    }

    /// `base/name`, new and owned by the service user.
    fn cluster_dir(&self, name: &str) -> Result<PathBuf, ClusterError> {
        let dir = self.base.join(name);
        fs::create_dir(&dir).map_err(ClusterError::io(format!("create {}", dir.display())))?;
        self.bin.chown(&dir)?;
        Ok(dir)
    }

    /// Writes the settings and starts the server, on a new port whenever the last one was
    /// taken between `free_port` and the server's bind.
    fn boot(&self, name: &str, dir: &Path, kind: Kind) -> Result<Server, ClusterError> {
        for attempt in 1.. {
            let server = Server::new(name, free_port(), dir, self.bin);
            let conf = self.conf(&server, kind);
            self.bin.write_file(&server.data_dir.join(CONF_FILE), &conf)?;
            let log_start = server.log_len();
            let Err(err) = server.start() else {
                return Ok(server);
            };
            // pg_ctl may have given up on a server that is still coming up.
            server.halt();
            let taken = port_taken(&server.log_since(log_start, u64::MAX));
            if !taken || attempt == PORT_ATTEMPTS {
                return Err(err);
            }
            tracing::warn!(server = name, port = server.port, "port taken, retrying");
        }
        unreachable!("the loop returns")
    }

    fn conf(&self, server: &Server, kind: Kind) -> String {
        let socket_dir = server.socket_dir().display().to_string();
        let mut lines = vec![
            "# Written by pgrouter's cluster harness; postgresql.conf includes it last.".to_owned(),
            "listen_addresses = '127.0.0.1'".to_owned(),
            format!("port = {}", server.port),
            format!("unix_socket_directories = '{}'", socket_dir.replace('\'', "''")),
            "fsync = off".to_owned(),
            "full_page_writes = off".to_owned(),
            "shared_buffers = 16MB".to_owned(),
            "max_connections = 100".to_owned(),
            "wal_level = replica".to_owned(),
            "max_wal_senders = 10".to_owned(),
            "hot_standby = on".to_owned(),
            "logging_collector = off".to_owned(),
        ];
        if kind == Kind::Shard {
            // Only shards: the primary's replica is used to test read-your-writes.
            lines.push("synchronous_commit = off".to_owned());
        }
        lines.extend(self.extra_conf.iter().cloned());
        lines.join("\n") + "\n"
    }
}

fn port_taken(log: &str) -> bool {
    log.contains("could not bind") || log.contains("Address already in use")
}

/// The template data directory, made by `initdb` on first use (see the module docs).
fn template(bin: &PgBin) -> Result<PathBuf, ClusterError> {
    static BUILDING: Mutex<()> = Mutex::new(());
    let _one_at_a_time = BUILDING.lock().unwrap_or_else(PoisonError::into_inner);
    let identity = [bin.identity().as_str(), TEMPLATE_REVISION, SUPERUSER_PASSWORD]
        .into_iter()
        .chain(INITDB_ARGS)
        .collect::<Vec<_>>()
        .join("|");
    let home = std::env::temp_dir().join(format!("pgrouter-template-{:016x}", fnv1a(&identity)));
    let data = home.join("data");
    if is_data_dir(&data) {
        return Ok(data);
    }
    let staging = unique_dir(&std::env::temp_dir(), "pgrouter-template-staging", bin)?;
    let built = initdb(bin, &staging).and_then(|()| publish(&staging, &home));
    let _ = fs::remove_dir_all(&staging);
    built.map(|()| data)
}

fn is_data_dir(dir: &Path) -> bool {
    dir.join("global").join("pg_control").is_file() && dir.join("postgresql.conf").is_file()
}

fn initdb(bin: &PgBin, dir: &Path) -> Result<(), ClusterError> {
    let started = std::time::Instant::now();
    let pwfile = dir.join("superuser-password");
    bin.write_file(&pwfile, SUPERUSER_PASSWORD)?;
    let data = dir.join("data");
    let mut cmd = bin.command(bin.program("initdb"), &[]);
    cmd.arg("-D").arg(&data).args(INITDB_ARGS);
    cmd.arg(format!("--pwfile={}", pwfile.display()));
    run(cmd)?;
    let conf = data.join("postgresql.conf");
    OpenOptions::new()
        .append(true)
        .open(&conf)
        .and_then(|mut file| writeln!(file, "include = '{CONF_FILE}'"))
        .map_err(ClusterError::io(format!("append to {}", conf.display())))?;
    tracing::info!(elapsed_ms = started.elapsed().as_millis(), "initdb template made");
    Ok(())
}

/// Moves a finished `staging` to `home` in one rename; losing the race to another process
/// that published first is fine.
fn publish(staging: &Path, home: &Path) -> Result<(), ClusterError> {
    if home.exists() && !is_data_dir(&home.join("data")) {
        // A damaged leftover (say, half-cleaned by a tmp reaper).
        let _ = fs::remove_dir_all(home);
    }
    match fs::rename(staging, home) {
        Ok(()) => Ok(()),
        Err(_) if is_data_dir(&home.join("data")) => Ok(()),
        Err(err) => Err(ClusterError::io(format!("rename to {}", home.display()))(err)),
    }
}

/// FNV-1a: a hash that, unlike `DefaultHasher`, is the same in every build.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3))
}

/// Local superuser trusted; replication and every role over SCRAM, except roles whose
/// `AuthMethod` asks for md5 or cleartext.
/// Names are validated plain and quoted, so a role called `all` means only itself.
fn hba_conf(users: &[UserSpec]) -> String {
    let mut lines = vec![
        "# Written by pgrouter's cluster harness.".to_owned(),
        "local all all trust".to_owned(),
        format!("host replication {REPLICATOR} 127.0.0.1/32 scram-sha-256"),
    ];
    lines.extend(users.iter().map(|user| {
        let method = user.auth.hba_method();
        format!("host all \"{}\" 127.0.0.1/32 {method}", user.name)
    }));
    lines.push("host all all 127.0.0.1/32 scram-sha-256".to_owned());
    lines.join("\n") + "\n"
}

/// Roles (replicator, then users, each password stored as its `AuthMethod` says) and
/// databases owned by the first user, which is all pgbench needs on PostgreSQL 15.
fn setup_sql(users: &[UserSpec], databases: &[String]) -> String {
    let mut sql =
        vec![format!("CREATE ROLE {} REPLICATION LOGIN PASSWORD {};", ident(REPLICATOR), literal(REPLICATOR_PASSWORD))];
    for user in users {
        sql.push(format!("SET password_encryption = '{}';", user.auth.storage()));
        sql.push(format!("CREATE ROLE {} LOGIN CREATEDB PASSWORD {};", ident(&user.name), literal(&user.password)));
    }
    sql.push("RESET password_encryption;".to_owned());
    let owner = users.first().map_or(SUPERUSER, |user| user.name.as_str());
    sql.extend(databases.iter().map(|db| format!("CREATE DATABASE {} OWNER {};", ident(db), ident(owner))));
    sql.join("\n")
}

fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Rejects options that would produce a broken or ambiguous topology.
pub(super) fn validate(opts: &TopologyOptions) -> Result<(), ClusterError> {
    let reserved = [SUPERUSER, REPLICATOR, "template0", "template1"];
    let names = opts.users.iter().map(|u| ("user", u.name.as_str()));
    let names = names.chain(opts.databases.iter().map(|d| ("database", d.as_str())));
    let mut seen = Vec::new();
    for (what, name) in names {
        if !plain_name(name) || reserved.contains(&name) {
            return Err(ClusterError::Options(format!(
                "{what} name {name:?}: use ASCII letters, digits, _ or -, and not {reserved:?}"
            )));
        }
        if seen.contains(&(what, name)) {
            return Err(ClusterError::Options(format!("{what} {name:?} listed twice")));
        }
        seen.push((what, name));
    }
    if let Some(line) = opts.extra_conf.iter().find(|line| line.contains('\n')) {
        return Err(ClusterError::Options(format!("extra_conf line {line:?} has a newline")));
    }
    Ok(())
}

fn plain_name(name: &str) -> bool {
    (1..64).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::AuthMethod;

    fn users() -> Vec<UserSpec> {
        vec![UserSpec::new("app", "s3'cret", AuthMethod::ScramSha256), UserSpec::new("legacy", "old", AuthMethod::Md5)]
    }

    #[test]
    fn hba_puts_user_lines_before_the_catch_all() {
        let hba = hba_conf(&users());
        let expected = "# Written by pgrouter's cluster harness.\n\
            local all all trust\n\
            host replication replicator 127.0.0.1/32 scram-sha-256\n\
            host all \"app\" 127.0.0.1/32 scram-sha-256\n\
            host all \"legacy\" 127.0.0.1/32 md5\n\
            host all all 127.0.0.1/32 scram-sha-256\n";
        assert_eq!(hba, expected);
    }

    #[test]
    fn setup_sql_stores_each_password_its_way() {
        let sql = setup_sql(&users(), &["app".to_owned()]);
        assert!(sql.contains("SET password_encryption = 'md5';\nCREATE ROLE \"legacy\""));
        assert!(sql.contains("PASSWORD 's3''cret'"));
        assert!(sql.ends_with("CREATE DATABASE \"app\" OWNER \"app\";"));
    }

    #[test]
    fn validate_rejects_odd_and_reserved_names() {
        let mut opts = TopologyOptions::default();
        assert!(validate(&opts).is_ok());
        opts.users.push(UserSpec::new("replicator", "x", AuthMethod::Md5));
        assert!(validate(&opts).is_err());
        opts.users.pop();
        opts.databases.push("a b".to_owned());
        assert!(validate(&opts).is_err());
        opts.databases = vec!["app".to_owned(), "app".to_owned()];
        assert!(validate(&opts).is_err());
    }

    #[test]
    fn port_taken_recognises_postgres_bind_failure() {
        let log = "LOG:  could not bind IPv4 address \"127.0.0.1\": Address already in use\n\
                   FATAL:  could not create any TCP/IP sockets\n";
        assert!(port_taken(log));
        assert!(!port_taken("FATAL:  invalid value for parameter \"shared_buffers\""));
    }

    #[test]
    fn fnv1a_is_stable() {
        assert_eq!(fnv1a(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a("a"), 0xaf63_dc4c_8601_ec8c);
    }
}
