//! Server health: every `health_check_interval` each server of each shard is asked whether it
//! is in recovery and how far its WAL has got (`pg_current_wal_lsn()` on a primary,
//! `pg_last_wal_replay_lsn()` and the replay lag on a replica). A server that fails a check,
//! or a replica lagging more than `max_replica_lag`, is banned for `ban_time` with a log line
//! giving the reason; it is used again once the ban is over and a check passes.
//!
//! Readers (the routing path) only load atomics: no lock per query.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::conn::{ConnectSpec, ServerConn};
use super::tick::Ticker;
use crate::config::ServerAddr;
use crate::router::{Role, ShardId};

/// A WAL position (`pg_lsn`) as one number: high 32 bits, low 32 bits.
pub type Lsn = u64;

/// Parses `pg_lsn` text such as `0/16B3748`.
#[must_use]
pub fn parse_lsn(text: &str) -> Option<Lsn> {
    let (hi, lo) = text.trim().split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// Why a server was taken out of rotation (the `reason` label of `pgrouter_bans_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BanReason {
    /// A health check failed (connect, login or query).
    HealthCheck,
    /// A configured replica is not in recovery.
    NotInRecovery,
    /// Replication lag beyond max_replica_lag (or unknown).
    Lag,
    /// A client's connection to it failed or was lost.
    ServerLost,
}

impl BanReason {
    pub const ALL: [Self; 4] = [Self::HealthCheck, Self::NotInRecovery, Self::Lag, Self::ServerLost];

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HealthCheck => "health_check",
            Self::NotInRecovery => "not_in_recovery",
            Self::Lag => "lag",
            Self::ServerLost => "server_lost",
        }
    }
}

/// What pgrouter knows about one server of one database.
#[derive(Debug)]
pub struct ServerHealth {
    pub database: String,
    pub shard: ShardId,
    pub role: Role,
    pub addr: ServerAddr,
    epoch: Instant,
    /// At least one check has completed.
    checked: AtomicBool,
    /// The last check succeeded.
    ok: AtomicBool,
    in_recovery: AtomicBool,
    /// Replay position on a replica, current WAL position on a primary.
    lsn: AtomicU64,
    lag_ms: AtomicU64,
    /// Milliseconds since `epoch` until which the server is banned; 0 when never banned.
    banned_until_ms: AtomicU64,
    /// Whether routing could use it at the last check (for "back in rotation" log lines).
    usable: AtomicBool,
    last_error: Mutex<String>,
    /// Bans so far, by [`BanReason`].
    bans: [AtomicU64; 4],
}

impl ServerHealth {
    #[must_use]
    pub fn new(database: &str, shard: ShardId, role: Role, addr: ServerAddr) -> Arc<Self> {
        Arc::new(Self {
            database: database.to_owned(),
            shard,
            role,
            addr,
            epoch: Instant::now(),
            checked: AtomicBool::new(false),
            ok: AtomicBool::new(false),
            in_recovery: AtomicBool::new(false),
            lsn: AtomicU64::new(0),
            lag_ms: AtomicU64::new(0),
            banned_until_ms: AtomicU64::new(0),
            usable: AtomicBool::new(false),
            last_error: Mutex::new(String::new()),
            bans: Default::default(),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    #[must_use]
    pub fn is_banned(&self) -> bool {
        self.now_ms() < self.banned_until_ms.load(Ordering::Acquire)
    }

    /// A replica reads may use: checked and healthy, not banned, lag within `max_lag`.
    #[must_use]
    pub fn usable_replica(&self, max_lag: Duration) -> bool {
        self.checked.load(Ordering::Acquire)
            && self.ok.load(Ordering::Acquire)
            && !self.is_banned()
            && Duration::from_millis(self.lag_ms.load(Ordering::Acquire)) <= max_lag
    }

    /// The primary said it is in recovery at the last check: writes must not go there.
    #[must_use]
    pub fn in_recovery(&self) -> bool {
        self.ok.load(Ordering::Acquire) && self.in_recovery.load(Ordering::Acquire)
    }

    #[must_use]
    pub fn lsn(&self) -> Lsn {
        self.lsn.load(Ordering::Acquire)
    }

    #[must_use]
    pub fn lag(&self) -> Duration {
        Duration::from_millis(self.lag_ms.load(Ordering::Acquire))
    }

    /// Bans the server for `ban_time` unless it is banned already; logs the reason once.
    pub fn ban(&self, ban_time: Duration, kind: BanReason, reason: &str) {
        let until = self.now_ms().saturating_add(u64::try_from(ban_time.as_millis()).unwrap_or(u64::MAX));
        let previous = self.banned_until_ms.load(Ordering::Acquire);
        if self.now_ms() < previous {
            return;
        }
        if self.banned_until_ms.compare_exchange(previous, until, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            self.usable.store(false, Ordering::Release);
            self.bans[kind as usize].fetch_add(1, Ordering::Relaxed);
            tracing::warn!(database = %self.database, shard = %self.shard, role = self.role.as_str(), server = %self.addr,
                reason, ban_time = ?ban_time, "server banned");
        }
    }

    /// Bans so far for `kind`.
    #[must_use]
    pub fn bans(&self, kind: BanReason) -> u64 {
        self.bans[kind as usize].load(Ordering::Relaxed)
    }

    /// The last health check succeeded and the server is not banned.
    #[must_use]
    pub fn up(&self) -> bool {
        self.checked.load(Ordering::Acquire) && self.ok.load(Ordering::Acquire) && !self.is_banned()
    }

    fn record_failure(&self, error: String) {
        self.ok.store(false, Ordering::Release);
        self.checked.store(true, Ordering::Release);
        *self.last_error.lock().expect("health lock") = error;
    }

    /// Records a passing check by hand (unit tests of replica choice).
    #[cfg(test)]
    pub(crate) fn set_observed(&self, lsn: Lsn, lag: Duration) {
        self.lsn.store(lsn, Ordering::Release);
        self.lag_ms.store(u64::try_from(lag.as_millis()).unwrap_or(u64::MAX), Ordering::Release);
        self.ok.store(true, Ordering::Release);
        self.checked.store(true, Ordering::Release);
    }

    /// Why the server is not usable, for error messages.
    #[must_use]
    pub fn describe(&self) -> String {
        if !self.checked.load(Ordering::Acquire) {
            return format!("{} not checked yet", self.addr);
        }
        if self.is_banned() || !self.ok.load(Ordering::Acquire) {
            let error = self.last_error.lock().expect("health lock").clone();
            return format!("{} banned ({})", self.addr, if error.is_empty() { "lagging" } else { &error });
        }
        format!("{} lag {:?}", self.addr, self.lag())
    }
}

/// The servers of one shard of one database, checked together so replica lag can be
/// measured against the primary.
pub struct ShardHealth {
    pub primary: Arc<ServerHealth>,
    pub replicas: Vec<Arc<ServerHealth>>,
    /// How the checker logs in (the database's name on the servers, the first user).
    pub spec: ConnectSpec,
}

/// Settings of the checker.
#[derive(Debug, Clone, Copy)]
pub struct CheckSettings {
    pub interval: Duration,
    pub ban_time: Duration,
    pub max_lag: Duration,
}

const CHECK_SQL: &str = "SELECT pg_is_in_recovery(), \
     CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END, \
     CASE WHEN pg_is_in_recovery() THEN extract(epoch FROM now() - pg_last_xact_replay_timestamp()) ELSE 0 END";

/// Checks one shard's servers every interval until `shutdown`.
pub async fn run_checks(shard: Arc<ShardHealth>, settings: CheckSettings, shutdown: CancellationToken) {
    let mut conns: Vec<Option<ServerConn>> = std::iter::repeat_with(|| None).take(1 + shard.replicas.len()).collect();
    let servers: Vec<Arc<ServerHealth>> = std::iter::once(&shard.primary).chain(&shard.replicas).cloned().collect();
    let mut tick = Ticker::new(settings.interval);
    let mut primary = PrimaryHistory::default();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tick.tick() => {}
        }
        // before the checks: the primary's position is read after this
        let started = Instant::now();
        let checks =
            servers.iter().zip(conns.iter_mut()).map(|(server, conn)| check_one(&shard.spec, server, conn, settings));
        let results = futures_util::future::join_all(checks).await;
        let primary_lsn = results[0].as_ref().ok().map(|r| r.lsn);
        if let Some(lsn) = primary_lsn
            && primary.0.is_empty()
        {
            // first round: compare with the primary's position now rather than with nothing
            primary.push(started, lsn);
        }
        let now = Instant::now();
        for (server, result) in servers.iter().zip(results) {
            judge(server, result, &primary, now, settings);
        }
        if let Some(lsn) = primary_lsn {
            primary.push(started, lsn);
        }
    }
}

/// Checks of the primary remembered for [`PrimaryHistory`]; an idle primary fills one.
const PRIMARY_HISTORY: usize = 128;

/// The primary's WAL position at its recent checks (oldest first, with when each check
/// began), to bound a replica's lag: WAL beyond the position a replica has replayed was
/// written after the last check that found the primary no further than that.
#[derive(Debug, Default)]
struct PrimaryHistory(VecDeque<(Instant, Lsn)>);

impl PrimaryHistory {
    fn push(&mut self, at: Instant, lsn: Lsn) {
        match self.0.back_mut() {
            // the primary has not moved: its newest check is the one to remember
            Some(last) if last.1 == lsn => last.0 = at,
            _ => {
                if self.0.len() == PRIMARY_HISTORY {
                    self.0.pop_front();
                }
                self.0.push_back((at, lsn));
            }
        }
    }

    /// The lag at `now` of a replica that has replayed up to `lsn`, the last transaction it
    /// replayed being `replay_age` old (`None`: none yet). None at all if it has what the
    /// primary had at the previous check. Otherwise the smaller of two upper bounds: the
    /// age of the last replayed transaction (which alone overstates the lag of a replica of
    /// an idle primary whose WAL moved without a commit: a checkpoint, say), and the time
    /// since the primary was last seen no further than the replica is. Unknown (`MAX`)
    /// when neither exists.
    fn lag(&self, lsn: Lsn, replay_age: Option<Duration>, now: Instant) -> Duration {
        if self.0.back().is_none_or(|&(_, primary)| lsn >= primary) {
            return Duration::ZERO;
        }
        let since =
            self.0.iter().rev().find(|&&(_, primary)| primary <= lsn).map(|&(at, _)| now.saturating_duration_since(at));
        match (since, replay_age) {
            (Some(since), Some(age)) => since.min(age),
            (bound, age) => bound.or(age).unwrap_or(Duration::MAX),
        }
    }
}

/// One server's answer to the check query.
struct Observation {
    in_recovery: bool,
    lsn: Lsn,
    replay_age: Option<Duration>,
}

async fn check_one(
    spec: &ConnectSpec,
    server: &ServerHealth,
    conn: &mut Option<ServerConn>,
    settings: CheckSettings,
) -> Result<Observation, String> {
    if conn.is_none() {
        let spec = ConnectSpec { addr: server.addr.clone(), ..spec.clone() };
        *conn = Some(ServerConn::connect(&spec).await.map_err(|e| e.to_string())?);
    }
    let c = conn.as_mut().expect("connected above");
    let limit = settings.interval.max(Duration::from_secs(1));
    let result = c.query_rows(CHECK_SQL, limit).await.and_then(|rows| {
        let row = rows.first().ok_or("no row")?;
        let text = |i: usize| row.get(i).cloned().flatten();
        Ok(Observation {
            in_recovery: text(0).as_deref() == Some("t"),
            lsn: text(1).as_deref().and_then(parse_lsn).unwrap_or(0),
            // NULL while the replica has not replayed any transaction yet
            replay_age: text(2).and_then(|s| s.parse::<f64>().ok()).map(|secs| Duration::from_secs_f64(secs.max(0.0))),
        })
    });
    if result.is_err() {
        *conn = None;
    }
    result
}

/// Applies one observation: records it, bans on failure or lag, logs returns to rotation.
fn judge(
    server: &ServerHealth,
    result: Result<Observation, String>,
    primary: &PrimaryHistory,
    now: Instant,
    settings: CheckSettings,
) {
    let obs = match result {
        Ok(obs) => obs,
        Err(error) => {
            server.ban(settings.ban_time, BanReason::HealthCheck, &format!("health check failed: {error}"));
            server.record_failure(error);
            return;
        }
    };
    let was_in_recovery = server.in_recovery.swap(obs.in_recovery, Ordering::AcqRel);
    server.lsn.store(obs.lsn, Ordering::Release);
    // unknown counts as too much
    let lag = primary.lag(obs.lsn, obs.replay_age, now);
    server.lag_ms.store(u64::try_from(lag.as_millis()).unwrap_or(u64::MAX), Ordering::Release);
    server.ok.store(true, Ordering::Release);
    server.checked.store(true, Ordering::Release);
    server.last_error.lock().expect("health lock").clear();
    match server.role {
        Role::Primary => {
            if obs.in_recovery && !was_in_recovery {
                tracing::warn!(database = %server.database, server = %server.addr, "the primary reports it is in recovery: writes to it are refused");
            }
        }
        Role::Replica => {
            if !obs.in_recovery {
                server.ban(settings.ban_time, BanReason::NotInRecovery, "configured as a replica but not in recovery");
            } else if lag > settings.max_lag {
                let reason = if lag == Duration::MAX {
                    "behind the primary, replication lag unknown".to_owned()
                } else {
                    format!("replication lag {lag:.1?} exceeds max_replica_lag {:?}", settings.max_lag)
                };
                (*server.last_error.lock().expect("health lock")).clone_from(&reason);
                server.ban(settings.ban_time, BanReason::Lag, &reason);
            }
            let usable = server.usable_replica(settings.max_lag);
            if usable && !server.usable.swap(true, Ordering::AcqRel) {
                tracing::info!(database = %server.database, shard = %server.shard, server = %server.addr, lag = ?lag, "replica in rotation");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_text() {
        assert_eq!(parse_lsn("0/16B3748"), Some(0x16B_3748));
        assert_eq!(parse_lsn("1/0"), Some(1 << 32));
        assert_eq!(parse_lsn("bogus"), None);
    }

    fn replica() -> Arc<ServerHealth> {
        ServerHealth::new("app", ShardId(0), Role::Replica, ServerAddr { host: "h".into(), port: 1 })
    }

    const SETTINGS: CheckSettings = CheckSettings {
        interval: Duration::from_millis(100),
        ban_time: Duration::from_secs(60),
        max_lag: Duration::from_secs(1),
    };

    #[test]
    fn unchecked_replicas_are_not_used() {
        assert!(!replica().usable_replica(Duration::from_secs(10)));
    }

    /// The primary's checks: positions with how long before now each check began.
    fn primary(checks: &[(u64, Lsn)]) -> PrimaryHistory {
        let now = Instant::now();
        let mut history = PrimaryHistory::default();
        for &(ms_ago, lsn) in checks {
            history.push(now - Duration::from_millis(ms_ago), lsn);
        }
        history
    }

    fn seen(r: &ServerHealth, lsn: Lsn, replay_age: Option<Duration>, checks: &[(u64, Lsn)]) {
        judge(r, Ok(Observation { in_recovery: true, lsn, replay_age }), &primary(checks), Instant::now(), SETTINGS);
    }

    #[test]
    fn lag_and_failures_ban() {
        let r = replica();
        seen(&r, 100, Some(Duration::from_secs(30)), &[(100, 100)]);
        assert!(r.usable_replica(SETTINGS.max_lag), "caught up with the primary: no lag");
        seen(&r, 100, Some(Duration::from_secs(3)), &[(100, 200)]);
        assert!(!r.usable_replica(SETTINGS.max_lag) && r.is_banned(), "3s behind: banned");
        let r = replica();
        judge(&r, Err("connection refused".into()), &primary(&[]), Instant::now(), SETTINGS);
        assert!(r.is_banned() && r.describe().contains("connection refused"), "{}", r.describe());
        let r = replica();
        let promoted = Observation { in_recovery: false, lsn: 1, replay_age: Some(Duration::ZERO) };
        judge(&r, Ok(promoted), &primary(&[]), Instant::now(), SETTINGS);
        assert!(r.is_banned(), "a promoted replica is not a replica");
    }

    #[test]
    fn lag_is_bounded_by_when_the_primary_was_where_the_replica_is() {
        // an idle primary whose WAL moved without a commit (a checkpoint): the replica's last
        // replayed transaction is old, but it had all the primary had 300 ms ago
        let r = replica();
        seen(&r, 120, Some(Duration::from_secs(30)), &[(300, 100), (100, 150)]);
        assert!(r.usable_replica(SETTINGS.max_lag), "{}", r.describe());
        assert!(r.lag() >= Duration::from_millis(300) && r.lag() < Duration::from_secs(1), "{:?}", r.lag());
        // really behind: the primary passed the replica's position 5 s ago
        let r = replica();
        seen(&r, 120, Some(Duration::from_secs(30)), &[(5000, 100), (4000, 150), (100, 300)]);
        assert!(r.is_banned() && r.lag() >= Duration::from_secs(5), "{:?}", r.lag());
        // older than anything remembered: the replay age is all there is
        let r = replica();
        seen(&r, 50, Some(Duration::from_secs(3)), &[(100, 100)]);
        assert!(r.is_banned() && r.lag() == Duration::from_secs(3), "{:?}", r.lag());
        // a primary that stays put keeps one entry, timed by its newest check
        let mut history = primary(&[(500, 100), (200, 100)]);
        history.push(Instant::now(), 110);
        assert_eq!(history.0.len(), 2);
        let lag = history.lag(105, None, Instant::now());
        assert!(lag >= Duration::from_millis(200) && lag < Duration::from_millis(500), "{lag:?}");
    }

    #[test]
    fn unknown_lag_keeps_a_replica_out() {
        let r = replica();
        seen(&r, 10, None, &[(100, 100)]);
        assert!(!r.usable_replica(SETTINGS.max_lag) && r.describe().contains("unknown"), "{}", r.describe());
        let r = replica();
        seen(&r, 100, None, &[(100, 100)]);
        assert!(r.usable_replica(SETTINGS.max_lag), "caught up, nothing to replay");
    }

    #[test]
    fn bans_expire() {
        let r = replica();
        seen(&r, 1, Some(Duration::ZERO), &[]);
        r.ban(Duration::from_millis(30), BanReason::Lag, "test");
        assert!(!r.usable_replica(SETTINGS.max_lag));
        std::thread::sleep(Duration::from_millis(40));
        assert!(r.usable_replica(SETTINGS.max_lag));
    }
}
