//! A pool of server connections for one (database, user, server).
//!
//! A semaphore with `pool_size` permits bounds the connections in use; a waiting client holds
//! no connection and gives up after `query_wait_timeout` with an error naming the pool. Idle
//! connections are kept most-recently-used first, so surplus ones age out through
//! `server_idle_timeout`. A connection is checked (nothing unread, still open, within
//! `server_lifetime`) every time before it is handed out: a broken one is dropped and
//! replaced, never handed out.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use metrics::{Counter, Histogram};
use tokio::sync::Semaphore;
use tokio::time::Sleep;

use super::conn::{ConnectSpec, ServerConn};
use super::health::ServerHealth;

/// ParameterStatus name/value pairs as a server reported them.
pub type ServerParams = Arc<Vec<(String, String)>>;
use crate::config::ServerAddr;
use crate::error::Error;
use crate::protocol::messages::TxStatus;
use crate::router::{Role, ShardId};

/// What a pool serves; also its name in logs and errors (`app/alice@10.0.0.5:5432`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub database: String,
    pub user: String,
    pub shard: ShardId,
    pub role: Role,
    pub server: ServerAddr,
}

impl fmt::Display for PoolKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}@{}", self.database, self.user, self.server)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    pub size: usize,
    pub min_size: usize,
    pub wait_timeout: Duration,
    pub idle_timeout: Duration,
    pub lifetime: Duration,
}

/// Counters for the admin console and metrics.
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Connections that exist: idle, in use or being opened.
    pub open: AtomicUsize,
    pub in_use: AtomicUsize,
    pub connecting: AtomicUsize,
    pub waiting: AtomicUsize,
    pub wait_timeouts: AtomicU64,
    /// Microseconds clients spent waiting for a connection, in all.
    pub wait_us: AtomicU64,
    pub connect_failures: AtomicU64,
}

/// The metric handles a pool records into.
#[derive(Clone)]
pub struct PoolMetrics {
    /// `pgrouter_pool_wait_seconds`
    pub wait: Histogram,
    /// `pgrouter_pool_wait_timeouts_total`
    pub wait_timeouts: Counter,
}

impl Default for PoolMetrics {
    /// Handles that record nothing (unit tests).
    fn default() -> Self {
        Self { wait: Histogram::noop(), wait_timeouts: Counter::noop() }
    }
}

pub struct Pool {
    pub key: PoolKey,
    /// The server's health, shared by every user's pool for this (database, server).
    pub health: Arc<ServerHealth>,
    pub(super) spec: ConnectSpec,
    /// Changed by a config reload (`resize`).
    settings: ArcSwap<PoolSettings>,
    /// The two settings each request reads, copied out of `settings` (loading that costs
    /// more): `wait_timeout` and `lifetime`, in microseconds.
    wait_timeout_us: AtomicU64,
    lifetime_us: AtomicU64,
    /// A lent connection's permit is forgotten when taken and added back by its
    /// [`Checkout`]'s drop: borrowing the semaphore costs no reference count.
    permits: Semaphore,
    /// Permits to take out of circulation as they come back (a reload shrank the pool
    /// while they were lent).
    owed: AtomicUsize,
    /// A reload removed the pool: connections coming back are closed.
    retired: AtomicBool,
    /// Boxed, as a checkout holds it: lending one moves a pointer, not the connection.
    idle: Mutex<VecDeque<Box<ServerConn>>>,
    /// ParameterStatus values reported by the newest connection, shown to logging-in clients.
    params: Mutex<Option<ServerParams>>,
    pub stats: PoolStats,
    metrics: PoolMetrics,
    /// Open connections by server process id, with when each was opened (SHOW SERVERS).
    open_since: Mutex<std::collections::BTreeMap<i32, SystemTime>>,
    /// Set while an upkeep round runs, so rounds never overlap.
    maintaining: AtomicBool,
}

impl Pool {
    #[must_use]
    pub fn new(
        key: PoolKey,
        spec: ConnectSpec,
        settings: PoolSettings,
        health: Arc<ServerHealth>,
        metrics: PoolMetrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            metrics,
            open_since: Mutex::new(std::collections::BTreeMap::new()),
            health,
            permits: Semaphore::new(settings.size),
            owed: AtomicUsize::new(0),
            retired: AtomicBool::new(false),
            key,
            spec,
            wait_timeout_us: AtomicU64::new(crate::telemetry::micros(settings.wait_timeout)),
            lifetime_us: AtomicU64::new(crate::telemetry::micros(settings.lifetime)),
            settings: ArcSwap::from_pointee(settings),
            idle: Mutex::new(VecDeque::new()),
            params: Mutex::new(None),
            stats: PoolStats::default(),
            maintaining: AtomicBool::new(false),
        })
    }

    /// A clean idle connection if one is free right now, taken without waiting, a clock
    /// reading or a timer (the usual case under transaction pooling).
    pub fn try_checkout(self: &Arc<Self>) -> Option<Checkout> {
        let permit = self.permits.try_acquire().ok()?;
        if self.retired.load(Ordering::Acquire) {
            return None;
        }
        let conn = self.take_idle()?;
        permit.forget();
        self.metrics.wait.record(0.0);
        self.stats.in_use.fetch_add(1, Ordering::Relaxed);
        Some(Checkout { conn: Some(conn), pool: Arc::clone(self), permit: true })
    }

    /// Waits (up to `query_wait_timeout`) for a free slot, then hands out a clean idle
    /// connection or opens a new one.
    pub async fn checkout(self: &Arc<Self>) -> Result<Checkout, Error> {
        self.checkout_timed(&mut WaitTimer::default(), Instant::now()).await
    }

    /// [`Pool::checkout`], timing the wait with the caller's reusable `timer`; a wait counts
    /// from `started`. It goes straight to the semaphore: a caller that wants the clock-free
    /// path for a free connection tries [`Pool::try_checkout`] first (the session does).
    pub async fn checkout_timed(self: &Arc<Self>, timer: &mut WaitTimer, started: Instant) -> Result<Checkout, Error> {
        match self.permits.try_acquire() {
            Ok(permit) => {
                permit.forget();
                self.metrics.wait.record(0.0);
            }
            Err(_) => self.wait_for_slot(timer, started).await?,
        }
        // holds the permit from here: an early return gives it back
        let mut checkout = Checkout { conn: None, pool: Arc::clone(self), permit: true };
        if self.retired.load(Ordering::Acquire) {
            // a reload removed the pool while this client waited: no new connection to it
            return Err(Error::Connect {
                server: self.key.server.to_string(),
                reason: "the pool was removed by a config reload; run the request again".into(),
            });
        }
        let conn = match self.take_idle() {
            Some(conn) => conn,
            // boxed: connecting (TLS, authentication) is a large future, rarely run
            None => Box::pin(self.open()).await?,
        };
        self.stats.in_use.fetch_add(1, Ordering::Relaxed);
        checkout.conn = Some(conn);
        Ok(checkout)
    }

    /// Waits up to `query_wait_timeout` for a free slot; the permit is the caller's then
    /// (forgotten here, to be added back by a [`Checkout`]).
    async fn wait_for_slot(&self, timer: &mut WaitTimer, started: Instant) -> Result<(), Error> {
        let deadline = started + Duration::from_micros(self.wait_timeout_us.load(Ordering::Relaxed));
        let _waiting = Gauge::enter(&self.stats.waiting);
        let mut acquire = std::pin::pin!(self.permits.acquire());
        let waited = loop {
            tokio::select! {
                biased;
                permit = &mut acquire => {
                    let waited = started.elapsed();
                    self.metrics.wait.record(waited.as_secs_f64());
                    self.stats.wait_us.fetch_add(crate::telemetry::micros(waited), Ordering::Relaxed);
                    return permit
                        .map(tokio::sync::SemaphorePermit::forget)
                        .map_err(|_| Error::Internal("pool semaphore closed".into()));
                }
                // the timer may have been set by an earlier wait, to fire before this deadline
                () = timer.by(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        break now - started;
                    }
                }
            }
        };
        self.metrics.wait.record(waited.as_secs_f64());
        self.metrics.wait_timeouts.increment(1);
        self.stats.wait_timeouts.fetch_add(1, Ordering::Relaxed);
        // the session logs it, with the client
        tracing::debug!(pool = %self.key, ?waited, "query_wait_timeout: no server connection became free");
        Err(Error::PoolTimeout { pool: self.key.to_string(), waited })
    }

    /// Pops idle connections until one is clean; the others are closed. Its age was judged
    /// when it came back (no clock reading per checkout): one that outlived server_lifetime
    /// while idle is closed by the upkeep round.
    fn take_idle(&self) -> Option<Box<ServerConn>> {
        loop {
            let conn = self.idle.lock().expect("pool lock").pop_back()?;
            if conn.is_clean() {
                return Some(conn);
            }
            self.close(conn, "not reusable");
        }
    }

    fn fit(&self, conn: &ServerConn, now: Instant) -> bool {
        conn.is_clean() && self.young(conn, now)
    }

    /// Within server_lifetime at `now`.
    fn young(&self, conn: &ServerConn, now: Instant) -> bool {
        now.duration_since(conn.created) < Duration::from_micros(self.lifetime_us.load(Ordering::Relaxed))
    }

    async fn open(&self) -> Result<Box<ServerConn>, Error> {
        // Counted as open from the start; the guard takes it back if the connect fails or the
        // waiting client goes away mid-connect (the future is dropped).
        let reserved = Reservation::new(&self.stats.open);
        let result = {
            let _connecting = Gauge::enter(&self.stats.connecting);
            ServerConn::connect(&self.spec).await
        };
        match result {
            Ok(conn) => {
                reserved.keep();
                self.open_since.lock().expect("pool lock").insert(conn.cancel.key.pid, SystemTime::now());
                tracing::debug!(pool = %self.key, server_pid = conn.cancel.key.pid, "server connection opened");
                *self.params.lock().expect("pool lock") = Some(Arc::new(conn.params.clone()));
                Ok(Box::new(conn))
            }
            Err(e) => {
                self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(pool = %self.key, error = %e, "cannot open server connection");
                Err(e)
            }
        }
    }

    /// Puts a connection back if it is idle and clean; otherwise closes it.
    fn give_back(&self, mut conn: Box<ServerConn>, last_used: Instant) {
        if self.retired.load(Ordering::Acquire) {
            self.close(conn, "pool removed by a config reload");
            return;
        }
        // the socket is asked when the connection is next lent (`take_idle`)
        if !conn.is_settled() || !self.young(&conn, last_used) {
            self.close(conn, "not clean or past server_lifetime");
            return;
        }
        conn.last_used = last_used;
        self.idle.lock().expect("pool lock").push_back(conn);
    }

    fn close(&self, conn: Box<ServerConn>, why: &str) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
        self.open_since.lock().expect("pool lock").remove(&conn.cancel.key.pid);
        tracing::debug!(pool = %self.key, server_pid = conn.cancel.key.pid, why, "server connection closed");
        tokio::spawn((*conn).terminate());
    }

    /// The server's ParameterStatus values, connecting once if no connection was made yet.
    pub async fn server_params(self: &Arc<Self>) -> Result<ServerParams, Error> {
        if let Some(params) = self.params.lock().expect("pool lock").clone() {
            return Ok(params);
        }
        let checkout = self.checkout().await?;
        let params = Arc::new(checkout.conn_ref().params.clone());
        checkout.release();
        Ok(params)
    }

    /// Closes idle connections past `server_idle_timeout` or `server_lifetime` or found
    /// broken, then opens connections up to `min_pool_size`. Called periodically.
    pub async fn maintain(self: &Arc<Self>) {
        if self.maintaining.swap(true, Ordering::AcqRel) {
            return; // the previous round is still opening connections
        }
        self.expire_idle();
        while !self.retired.load(Ordering::Relaxed)
            && self.stats.open.load(Ordering::Relaxed) < self.settings().min_size
        {
            match self.open().await {
                Ok(conn) => self.give_back(conn, Instant::now()),
                Err(_) => break,
            }
        }
        self.maintaining.store(false, Ordering::Release);
    }

    fn expire_idle(&self) {
        let now = Instant::now();
        let expired: Vec<Box<ServerConn>> = {
            let mut idle = self.idle.lock().expect("pool lock");
            let mut expired = Vec::new();
            for conn in std::mem::take(&mut *idle) {
                if self.fit(&conn, now) && now.duration_since(conn.last_used) < self.settings().idle_timeout {
                    idle.push_back(conn);
                } else {
                    expired.push(conn);
                }
            }
            expired
        };
        for conn in expired {
            self.close(conn, "idle timeout, lifetime or broken");
        }
    }

    /// The settings in effect.
    #[must_use]
    pub fn settings(&self) -> PoolSettings {
        **self.settings.load()
    }

    /// Applies new settings (a config reload). A larger pool_size takes effect at once; a
    /// smaller one as lent connections come back.
    pub fn resize(&self, settings: PoolSettings) {
        let old = self.settings.swap(Arc::new(settings));
        self.wait_timeout_us.store(crate::telemetry::micros(settings.wait_timeout), Ordering::Relaxed);
        self.lifetime_us.store(crate::telemetry::micros(settings.lifetime), Ordering::Relaxed);
        if settings.size > old.size {
            let mut grow = settings.size - old.size;
            // permits still owed from an earlier shrink are cancelled first
            while grow > 0 && self.take_owed() {
                grow -= 1;
            }
            self.permits.add_permits(grow);
        } else if settings.size < old.size {
            let shrink = old.size - settings.size;
            let forgotten = self.permits.forget_permits(shrink);
            self.owed.fetch_add(shrink - forgotten, Ordering::AcqRel);
        }
        if settings != *old {
            tracing::info!(pool = %self.key, pool_size = settings.size, "pool settings changed by reload");
        }
    }

    /// Takes one owed permit, if any is owed.
    fn take_owed(&self) -> bool {
        self.owed.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1)).is_ok()
    }

    /// A reload removed the pool: its idle connections close now, lent ones when they
    /// come back.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        let idle: Vec<Box<ServerConn>> = self.idle.lock().expect("pool lock").drain(..).collect();
        for conn in idle {
            self.close(conn, "pool removed by a config reload");
        }
    }

    /// Connections in use plus clients waiting: the load `least_busy` compares.
    #[must_use]
    pub fn busy(&self) -> usize {
        self.stats.in_use.load(Ordering::Relaxed) + self.stats.waiting.load(Ordering::Relaxed)
    }

    /// The open connections: server process id, when it was opened, and whether it is idle
    /// in the pool (otherwise a client holds it).
    #[must_use]
    pub fn servers(&self) -> Vec<(i32, SystemTime, bool)> {
        let idle: Vec<i32> = self.idle.lock().expect("pool lock").iter().map(|c| c.cancel.key.pid).collect();
        let open = self.open_since.lock().expect("pool lock");
        open.iter().map(|(pid, since)| (*pid, *since, idle.contains(pid))).collect()
    }

    #[must_use]
    pub fn idle_count(&self) -> usize {
        self.idle.lock().expect("pool lock").len()
    }
}

/// The timer a client's waits for a connection share. Arming a timer for each wait and
/// removing it when the wait ends early (the usual end) cost more than the rest of a
/// checkout; this one stays armed from wait to wait and is moved only when it would fire too
/// late. So most waits arm nothing: one that finds the timer set by an earlier wait, to
/// fire early, looks at the clock when it fires and sets it again.
#[derive(Default)]
pub struct WaitTimer(Option<Pin<Box<Sleep>>>);

impl WaitTimer {
    /// The timer, set to fire at `deadline` or earlier.
    fn by(&mut self, deadline: Instant) -> Pin<&mut Sleep> {
        let deadline = tokio::time::Instant::from_std(deadline);
        let sleep = self.0.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() > deadline || sleep.is_elapsed() {
            sleep.as_mut().reset(deadline);
        }
        sleep.as_mut()
    }
}

/// A server connection lent to one session. Dropping it without [`Checkout::release`] closes
/// the connection: that is the safe default for a connection in an unknown state.
pub struct Checkout {
    conn: Option<Box<ServerConn>>,
    pool: Arc<Pool>,
    /// Holds one of the pool's permits (forgotten when taken; added back on drop).
    permit: bool,
}

impl Checkout {
    pub fn conn(&mut self) -> &mut ServerConn {
        self.conn.as_mut().expect("connection present until release")
    }

    #[must_use]
    pub fn conn_ref(&self) -> &ServerConn {
        self.conn.as_ref().expect("connection present until release")
    }

    #[must_use]
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Returns the connection to the pool if it is idle and clean, else closes it.
    pub fn release(self) {
        self.release_at(Instant::now());
    }

    /// [`Checkout::release`], with the time the connection was last used known already.
    pub fn release_at(mut self, last_used: Instant) {
        if let Some(conn) = self.conn.take() {
            self.pool.stats.in_use.fetch_sub(1, Ordering::Relaxed);
            if conn.status == TxStatus::Idle {
                self.pool.give_back(conn, last_used);
            } else {
                self.pool.close(conn, "released inside a transaction");
            }
        }
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        // a permit owed to a shrink is kept out of circulation
        if std::mem::take(&mut self.permit) && !self.pool.take_owed() {
            self.pool.permits.add_permits(1);
        }
        if let Some(conn) = self.conn.take() {
            self.pool.stats.in_use.fetch_sub(1, Ordering::Relaxed);
            self.pool.close(conn, "discarded by its session");
        }
    }
}

/// A unit added to a counter that is taken back on drop unless [`Reservation::keep`] is called.
struct Reservation<'a>(Option<&'a AtomicUsize>);

impl<'a> Reservation<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(Some(counter))
    }

    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let Some(counter) = self.0 {
            counter.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Increments a gauge for as long as it lives (also when the future holding it is dropped).
struct Gauge<'a>(&'a AtomicUsize);

impl<'a> Gauge<'a> {
    fn enter(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
