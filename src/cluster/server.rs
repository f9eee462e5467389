//! One running PostgreSQL server, and how to run PostgreSQL's programs at all.
//!
//! `initdb`, `pg_ctl`, `postgres` and `pg_basebackup` refuse to run as root, so when this process
//! is root they run as the `postgres` OS user through `runuser`, and the files they touch must be
//! owned by that user. [`PgBin`] hides that choice; [`Server`] is what the tests hold on to.
//! `psql` is a client and runs as whoever we are, over the server's own unix socket, where the
//! superuser is trusted.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::{ClusterError, SUPERUSER};

/// Seconds `pg_ctl` may wait for a start or a polite stop.
const PG_CTL_WAIT: &str = "60";
/// Seconds `pg_ctl stop -m immediate` may wait before we fall back to SIGKILL.
const HALT_WAIT: &str = "10";
/// How much of a log an error quotes.
const LOG_TAIL_BYTES: u64 = 4096;

/// Where PostgreSQL's programs live and which OS user runs them.
#[derive(Debug)]
pub(super) struct PgBin {
    dir: PathBuf,
    run_as: RunAs,
}

/// The OS user server-side programs run as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunAs {
    /// We are not root: run them directly.
    Me,
    /// We are root: `runuser -u postgres`, files chowned to this uid/gid.
    Postgres { uid: u32, gid: u32 },
}

const SERVICE_USER: &str = "postgres";

impl PgBin {
    pub(super) fn locate() -> Result<PgBin, ClusterError> {
        let dir = super::pg_bindir()?;
        let run_as = if effective_uid()? == 0 {
            let (uid, gid) = passwd_entry(SERVICE_USER)?;
            RunAs::Postgres { uid, gid }
        } else {
            RunAs::Me
        };
        Ok(PgBin { dir, run_as })
    }

    pub(super) fn program(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Identifies binaries plus owner, so a cached template never crosses either.
    pub(super) fn identity(&self) -> String {
        format!("{}|{:?}", self.dir.display(), self.run_as)
    }

    /// `program` run as the service user. `env` is passed through `env(1)` because `runuser`
    /// resets part of the environment.
    pub(super) fn command(&self, program: impl AsRef<OsStr>, env: &[(&str, &str)]) -> Command {
        let mut cmd = match self.run_as {
            RunAs::Me => {
                let mut cmd = Command::new(program);
                cmd.envs(env.iter().copied());
                cmd
            }
            RunAs::Postgres { .. } => {
                let mut cmd = Command::new("runuser");
                cmd.args(["-u", SERVICE_USER, "--", "env"]);
                cmd.args(env.iter().map(|(k, v)| format!("{k}={v}")));
                cmd.arg(program);
                cmd
            }
        };
        // The service user may not be able to enter our working directory.
        cmd.current_dir("/");
        cmd
    }

    /// Hands `path` to the service user (a no-op when we are that user).
    pub(super) fn chown(&self, path: &Path) -> Result<(), ClusterError> {
        match self.run_as {
            RunAs::Me => Ok(()),
            RunAs::Postgres { uid, gid } => std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .map_err(ClusterError::io(format!("chown {}", path.display()))),
        }
    }

    /// Writes a file the server will read, owned by the service user.
    pub(super) fn write_file(&self, path: &Path, contents: &str) -> Result<(), ClusterError> {
        std::fs::write(path, contents).map_err(ClusterError::io(format!("write {}", path.display())))?;
        self.chown(path)
    }
}

/// Runs `cmd` to completion; stdout on success, a `Command` error with stderr otherwise.
pub(super) fn run(mut cmd: Command) -> Result<String, ClusterError> {
    cmd.stdin(Stdio::null());
    let output = cmd.output();
    finish(&cmd, output)
}

fn finish(cmd: &Command, output: std::io::Result<Output>) -> Result<String, ClusterError> {
    let describe = || {
        let program = cmd.get_program().to_string_lossy().into_owned();
        cmd.get_args().fold(program, |line, arg| line + " " + &arg.to_string_lossy())
    };
    match output {
        Ok(out) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        Ok(out) => Err(ClusterError::Command {
            command: describe(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }),
        Err(err) => {
            Err(ClusterError::Command { command: describe(), status: "not run".to_owned(), stderr: err.to_string() })
        }
    }
}

/// The effective uid, from /proc (std has no `geteuid` and this crate takes no libc).
fn effective_uid() -> Result<u32, ClusterError> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(ClusterError::io("read /proc/self/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|euid| euid.parse().ok())
        .ok_or_else(|| ClusterError::Options("no Uid line in /proc/self/status".to_owned()))
}

/// `(uid, gid)` of `user` from /etc/passwd.
fn passwd_entry(user: &str) -> Result<(u32, u32), ClusterError> {
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(ClusterError::io("read /etc/passwd"))?;
    parse_passwd(&passwd, user).ok_or_else(|| ClusterError::NoServiceUser(user.to_owned()))
}

fn parse_passwd(passwd: &str, user: &str) -> Option<(u32, u32)> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != user {
            return None;
        }
        let mut ids = fields.skip(1);
        Some((ids.next()?.parse().ok()?, ids.next()?.parse().ok()?))
    })
}

/// A PostgreSQL server on 127.0.0.1. Its directory holds `data/`, the unix socket and
/// `server.log`.
#[derive(Debug)]
pub struct Server {
    /// "primary", "replica", "shard1", ...
    pub name: String,
    pub port: u16,
    pub data_dir: PathBuf,
    socket_dir: PathBuf,
    log_file: PathBuf,
    bin: Arc<PgBin>,
}

impl Server {
    pub(super) fn new(name: &str, port: u16, dir: &Path, bin: &Arc<PgBin>) -> Server {
        Server {
            name: name.to_owned(),
            port,
            data_dir: dir.join("data"),
            socket_dir: dir.to_owned(),
            log_file: dir.join("server.log"),
            bin: Arc::clone(bin),
        }
    }

    pub fn host(&self) -> &str {
        "127.0.0.1"
    }

    pub fn addr(&self) -> String {
        format!("{}:{}", self.host(), self.port)
    }

    /// Folder of the unix socket (also what `psql -h` takes).
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The server's log (`pg_ctl -l`), for when a test wants to know why.
    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    /// Runs `sql` as the superuser over the unix socket with `psql -X -A -t -q -v
    /// ON_ERROR_STOP=1`, feeding it on stdin so that several statements (even `CREATE DATABASE`)
    /// run one after another. Returns trimmed stdout; the error carries psql's stderr.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, ClusterError> {
        let mut cmd = Command::new(self.bin.program("psql"));
        cmd.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-f", "-"])
            .arg("-h")
            .arg(&self.socket_dir)
            .args(["-p", &self.port.to_string(), "-U", SUPERUSER, "-d", db])
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let output = cmd.spawn().and_then(|mut child| {
            let mut stdin = child.stdin.take().expect("stdin is piped");
            // Write from a thread so a chatty psql cannot block us on a full stdout pipe.
            thread::scope(|scope| {
                scope.spawn(move || stdin.write_all(sql.as_bytes()));
                child.wait_with_output()
            })
        });
        finish(&cmd, output).map(|out| out.trim().to_owned())
    }

    /// `pg_ctl start -w`; the error quotes the end of the log.
    pub fn start(&self) -> Result<(), ClusterError> {
        let mut cmd = self.pg_ctl("start", &["-w", "-t", PG_CTL_WAIT]);
        cmd.arg("-l").arg(&self.log_file);
        run(cmd).map_err(|err| self.fail(err))?;
        tracing::info!(
            server = %self.name,
            port = self.port,
            data_dir = %self.data_dir.display(),
            "postgres started"
        );
        Ok(())
    }

    /// `pg_ctl stop -m fast -w`.
    pub fn stop(&self) -> Result<(), ClusterError> {
        let cmd = self.pg_ctl("stop", &["-m", "fast", "-w", "-t", PG_CTL_WAIT]);
        run(cmd).map(drop).map_err(|err| self.fail(err))
    }

    /// `pg_ctl restart -m fast -w`.
    pub fn restart(&self) -> Result<(), ClusterError> {
        let mut cmd = self.pg_ctl("restart", &["-m", "fast", "-w", "-t", PG_CTL_WAIT]);
        // Without -l the new postmaster would inherit (and hold open) our output pipes.
        cmd.arg("-l").arg(&self.log_file);
        run(cmd).map(drop).map_err(|err| self.fail(err))
    }

    /// Stops now, whatever it is doing: `pg_ctl stop -m immediate`, then SIGKILL to the
    /// postmaster if that did not work in time. Never fails, never hangs for long.
    pub fn halt(&self) {
        let cmd = self.pg_ctl("stop", &["-m", "immediate", "-w", "-t", HALT_WAIT]);
        if run(cmd).is_ok() {
            return;
        }
        if let Some(pid) = self.postmaster_pid() {
            tracing::warn!(server = %self.name, pid, "pg_ctl stop failed; killing postmaster");
            let mut kill = Command::new("kill");
            kill.args(["-KILL", &pid.to_string()]);
            let _ = run(kill);
        }
    }

    /// The postmaster's pid, if `postmaster.pid` names a live process started on this data
    /// directory (so a stale file never gets a recycled pid killed).
    pub fn postmaster_pid(&self) -> Option<u32> {
        let pidfile = std::fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        let pid: u32 = pidfile.lines().next()?.trim().parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let data_dir = self.data_dir.to_string_lossy();
        String::from_utf8_lossy(&cmdline).split('\0').any(|arg| arg == data_dir).then_some(pid)
    }

    fn pg_ctl(&self, action: &str, args: &[&str]) -> Command {
        let mut cmd = self.bin.command(self.bin.program("pg_ctl"), &[]);
        cmd.arg(action).arg("-s").arg("-D").arg(&self.data_dir).args(args);
        cmd
    }

    /// Polls `sql` (as the superuser, database `postgres`) until it returns `t`.
    pub(super) fn wait_until(&self, what: &str, sql: &str, timeout: Duration) -> Result<(), ClusterError> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.psql("postgres", sql) {
                Ok(answer) if answer == "t" => return Ok(()),
                Ok(answer) => answer,
                Err(err) => err.to_string(),
            };
            if Instant::now() >= deadline {
                let what = format!("{what} (last answer: {last})");
                return Err(self.fail(ClusterError::Timeout(what)));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wraps `err` with this server's name, port and the end of its log.
    pub(super) fn fail(&self, err: ClusterError) -> ClusterError {
        ClusterError::Server {
            name: self.name.clone(),
            port: self.port,
            log_tail: self.log_since(0, LOG_TAIL_BYTES),
            source: Box::new(err),
        }
    }

    /// Current log length, to read only what a later attempt adds.
    pub(super) fn log_len(&self) -> u64 {
        std::fs::metadata(&self.log_file).map_or(0, |meta| meta.len())
    }

    /// At most the last `max` bytes of the log written after byte `offset`.
    pub(super) fn log_since(&self, offset: u64, max: u64) -> String {
        let Ok(mut file) = File::open(&self.log_file) else {
            return format!("(no log at {})", self.log_file.display());
        };
        let len = file.metadata().map_or(0, |meta| meta.len());
        let start = offset.max(len.saturating_sub(max));
        let mut text = Vec::new();
        let _ = file.seek(SeekFrom::Start(start)).and_then(|_| file.read_to_end(&mut text));
        String::from_utf8_lossy(&text).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_lookup_reads_uid_and_gid() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      postgres:x:101:104:PostgreSQL administrator:/var/lib/postgresql:/bin/bash\n";
        assert_eq!(parse_passwd(passwd, "postgres"), Some((101, 104)));
        assert_eq!(parse_passwd(passwd, "nobody"), None);
    }

    #[test]
    fn env_goes_through_env_under_runuser() {
        let bin = PgBin { dir: PathBuf::from("/pg/bin"), run_as: RunAs::Postgres { uid: 1, gid: 1 } };
        let cmd = bin.command("/pg/bin/pg_basebackup", &[("PGPASSWORD", "pw")]);
        let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(cmd.get_program(), "runuser");
        assert_eq!(args, ["-u", "postgres", "--", "env", "PGPASSWORD=pw", "/pg/bin/pg_basebackup"]);
    }
}
