//! A pool of server connections for one (database, user, server).
//!
//! `pool_size` slots bound the connections in use. A client that finds none free waits in a
//! queue, holding no connection, and gives up after `query_wait_timeout` with an error naming
//! the pool; a connection coming back goes straight to the oldest waiting client. Idle
//! connections are kept most-recently-used first, so surplus ones age out through
//! `server_idle_timeout`. A connection is checked (nothing unread, still open, within
//! `server_lifetime`) every time before it is handed out: a broken one is dropped and
//! replaced, never handed out.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use metrics::{Counter, Histogram};

use super::conn::{ConnectSpec, ServerConn};
use super::health::ServerHealth;
use super::waiting::{Grant, Queued, Waiter, Waiting, timer_by};

/// ParameterStatus name/value pairs as a server reported them.
pub type ServerParams = Arc<Vec<(String, String)>>;
use crate::config::ServerAddr;
use crate::error::Error;
use crate::protocol::messages::TxStatus;
use crate::router::{Role, ShardId};
use crate::timer::Sleep;

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
    /// The free slots, the idle connections and the waiting clients, under one lock: a
    /// checkout takes it once and a return takes it once.
    slots: Mutex<Slots>,
    /// A reload removed the pool: connections coming back are closed.
    retired: AtomicBool,
    /// ParameterStatus values reported by the newest connection, shown to logging-in clients.
    params: Mutex<Option<ServerParams>>,
    pub stats: PoolStats,
    metrics: PoolMetrics,
    /// Open connections by server process id, with when each was opened (SHOW SERVERS).
    open_since: Mutex<std::collections::BTreeMap<i32, SystemTime>>,
    /// Set while an upkeep round runs, so rounds never overlap.
    maintaining: AtomicBool,
}

/// What the pool's lock guards.
pub(super) struct Slots {
    /// Slots that may be lent now: `pool_size` less the lent ones (and less those a reload
    /// that shrank the pool took out of circulation).
    free: usize,
    /// Lent slots to take out of circulation as they come back (a reload shrank the pool
    /// while they were lent).
    owed: usize,
    /// Boxed, as a checkout holds it: lending one moves a pointer, not the connection. The
    /// most recently used is last.
    idle: VecDeque<Box<ServerConn>>,
    /// Clients waiting for a slot, oldest first. A slot that comes back goes straight to the
    /// oldest, with its connection, so `free` is 0 while anyone waits.
    pub(super) waiters: VecDeque<Arc<Waiter>>,
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
            slots: Mutex::new(Slots { free: settings.size, owed: 0, idle: VecDeque::new(), waiters: VecDeque::new() }),
            retired: AtomicBool::new(false),
            key,
            spec,
            wait_timeout_us: AtomicU64::new(crate::telemetry::micros(settings.wait_timeout)),
            lifetime_us: AtomicU64::new(crate::telemetry::micros(settings.lifetime)),
            settings: ArcSwap::from_pointee(settings),
            params: Mutex::new(None),
            stats: PoolStats::default(),
            maintaining: AtomicBool::new(false),
        })
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().expect("pool lock")
    }

    /// A clean idle connection if one is free right now, taken without waiting, a clock
    /// reading or a timer (the usual case under transaction pooling).
    pub fn try_checkout(self: &Arc<Self>) -> Option<Checkout> {
        if self.retired.load(Ordering::Acquire) {
            return None;
        }
        let conn = {
            let mut slots = self.lock();
            if slots.free == 0 {
                return None;
            }
            let conn = self.take_idle(&mut slots)?;
            slots.free -= 1;
            conn
        };
        self.metrics.wait.record(0.0);
        self.stats.in_use.fetch_add(1, Ordering::Relaxed);
        Some(Checkout { conn: Some(conn), pool: Arc::clone(self), slot: true })
    }

    /// Waits (up to `query_wait_timeout`) for a free slot, then hands out a clean idle
    /// connection or opens a new one.
    pub async fn checkout(self: &Arc<Self>) -> Result<Checkout, Error> {
        self.checkout_timed(&mut Waiting::default(), Instant::now()).await
    }

    /// [`Pool::checkout`], waiting with the caller's reusable `waiting`; a wait counts from
    /// `started`. A caller that wants the clock-free path for a free connection tries
    /// [`Pool::try_checkout`] first (the session does).
    pub async fn checkout_timed(self: &Arc<Self>, waiting: &mut Waiting, started: Instant) -> Result<Checkout, Error> {
        let waiter = waiting.waiter.get_or_insert_with(Arc::default);
        let taken = {
            let mut slots = self.lock();
            if slots.free > 0 {
                slots.free -= 1;
                Some(self.take_idle(&mut slots))
            } else {
                waiter.lock().queued = true;
                slots.waiters.push_back(Arc::clone(waiter));
                None
            }
        };
        let conn = match taken {
            Some(conn) => {
                self.metrics.wait.record(0.0);
                conn
            }
            // a slot that came without a usable connection takes an idle one if there is one
            None => match self.wait_turn(waiter, &mut waiting.timer, started).await? {
                Grant::Conn(conn) if conn.is_clean() => Some(conn),
                Grant::Conn(conn) => {
                    self.close(conn, "not reusable");
                    self.take_idle(&mut self.lock())
                }
                Grant::Slot => self.take_idle(&mut self.lock()),
            },
        };
        // the slot is held from here: an early return gives it back
        let mut checkout = Checkout { conn: None, pool: Arc::clone(self), slot: true };
        if self.retired.load(Ordering::Acquire) {
            if let Some(conn) = conn {
                self.close(conn, "pool removed by a config reload");
            }
            // a reload removed the pool while this client waited: no new connection to it
            return Err(Error::Connect {
                server: self.key.server.to_string(),
                reason: "the pool was removed by a config reload; run the request again".into(),
            });
        }
        let conn = match conn {
            Some(conn) => conn,
            // boxed: connecting (TLS, authentication) is a large future, rarely run
            None => Box::pin(self.open()).await?,
        };
        self.stats.in_use.fetch_add(1, Ordering::Relaxed);
        checkout.conn = Some(conn);
        Ok(checkout)
    }

    /// Waits up to `query_wait_timeout` for the turn of `waiter` (queued by the caller); the
    /// slot granted is the caller's then.
    async fn wait_turn(&self, waiter: &Waiter, timer: &mut Option<Sleep>, started: Instant) -> Result<Grant, Error> {
        let queued = Queued { pool: self, waiter: Some(waiter) };
        let deadline = started + Duration::from_micros(self.wait_timeout_us.load(Ordering::Relaxed));
        let _waiting = Gauge::enter(&self.stats.waiting);
        let mut turn = std::future::poll_fn(|cx| waiter.poll_turn(cx));
        let waited = loop {
            tokio::select! {
                biased;
                grant = &mut turn => {
                    queued.served();
                    let waited = started.elapsed();
                    self.metrics.wait.record(waited.as_secs_f64());
                    self.stats.wait_us.fetch_add(crate::telemetry::micros(waited), Ordering::Relaxed);
                    return Ok(grant);
                }
                // the timer may have been set by an earlier wait, to fire before this deadline
                () = timer_by(timer, deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        break now - started;
                    }
                }
            }
        };
        // leaves the queue; a turn that came meanwhile is passed on
        drop(queued);
        self.metrics.wait.record(waited.as_secs_f64());
        self.metrics.wait_timeouts.increment(1);
        self.stats.wait_timeouts.fetch_add(1, Ordering::Relaxed);
        // the session logs it, with the client
        tracing::debug!(pool = %self.key, ?waited, "query_wait_timeout: no server connection became free");
        Err(Error::PoolTimeout { pool: self.key.to_string(), waited })
    }

    /// A lent slot comes back, with its connection if that may be lent again: to the oldest
    /// waiting client if there is one, else to the free slots and the idle list.
    pub(super) fn restore(&self, conn: Option<Box<ServerConn>>) {
        let mut slots = self.lock();
        if slots.owed > 0 {
            // a shrink takes the slot out of circulation; the connection ages out if surplus
            slots.owed -= 1;
            slots.idle.extend(conn);
            return;
        }
        if let Some(waiter) = slots.waiters.pop_front() {
            let waker = waiter.grant(conn.map_or(Grant::Slot, Grant::Conn));
            drop(slots);
            if let Some(waker) = waker {
                waker.wake();
            }
            return;
        }
        slots.idle.extend(conn);
        slots.free += 1;
    }

    /// Pops idle connections until one is clean; the others are closed. Its age was judged
    /// when it came back (no clock reading per checkout): one that outlived server_lifetime
    /// while idle is closed by the upkeep round.
    fn take_idle(&self, slots: &mut Slots) -> Option<Box<ServerConn>> {
        loop {
            let conn = slots.idle.pop_back()?;
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

    /// Why a connection coming back, last used at `last_used`, may not be lent again.
    fn unfit(&self, conn: &ServerConn, last_used: Instant) -> Option<&'static str> {
        if conn.status != TxStatus::Idle {
            Some("released inside a transaction")
        } else if self.retired.load(Ordering::Acquire) {
            Some("pool removed by a config reload")
        } else if !conn.is_settled() || !self.young(conn, last_used) {
            // the socket is asked when the connection is next lent (`take_idle`)
            Some("not clean or past server_lifetime")
        } else {
            None
        }
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
                // a new connection on no slot: idle, for the next checkout
                Ok(conn) if !self.retired.load(Ordering::Acquire) => self.lock().idle.push_back(conn),
                Ok(conn) => self.close(conn, "pool removed by a config reload"),
                Err(_) => break,
            }
        }
        self.maintaining.store(false, Ordering::Release);
    }

    fn expire_idle(&self) {
        let now = Instant::now();
        let idle_timeout = self.settings().idle_timeout;
        let expired: VecDeque<Box<ServerConn>> = {
            let mut slots = self.lock();
            let (kept, expired) = std::mem::take(&mut slots.idle)
                .into_iter()
                .partition(|conn| self.fit(conn, now) && now.duration_since(conn.last_used) < idle_timeout);
            slots.idle = kept;
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

    /// Applies new settings (a config reload). A larger pool_size takes effect at once (the
    /// new slots go to waiting clients first); a smaller one as lent connections come back.
    pub fn resize(&self, settings: PoolSettings) {
        let old = self.settings.swap(Arc::new(settings));
        self.wait_timeout_us.store(crate::telemetry::micros(settings.wait_timeout), Ordering::Relaxed);
        self.lifetime_us.store(crate::telemetry::micros(settings.lifetime), Ordering::Relaxed);
        let mut wakers = Vec::new();
        {
            let mut slots = self.lock();
            if settings.size > old.size {
                // slots still owed from an earlier shrink are cancelled first
                let grow = settings.size - old.size;
                let cancelled = grow.min(slots.owed);
                slots.owed -= cancelled;
                for _ in cancelled..grow {
                    match slots.waiters.pop_front() {
                        Some(waiter) => wakers.extend(waiter.grant(Grant::Slot)),
                        None => slots.free += 1,
                    }
                }
            } else if settings.size < old.size {
                let shrink = old.size - settings.size;
                let now = shrink.min(slots.free);
                slots.free -= now;
                slots.owed += shrink - now;
            }
        }
        wakers.into_iter().for_each(Waker::wake);
        if settings != *old {
            tracing::info!(pool = %self.key, pool_size = settings.size, "pool settings changed by reload");
        }
    }

    /// A reload removed the pool: its idle connections close now, lent ones when they
    /// come back.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        let idle = std::mem::take(&mut self.lock().idle);
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
        let idle: Vec<i32> = self.lock().idle.iter().map(|c| c.cancel.key.pid).collect();
        let open = self.open_since.lock().expect("pool lock");
        open.iter().map(|(pid, since)| (*pid, *since, idle.contains(pid))).collect()
    }

    #[must_use]
    pub fn idle_count(&self) -> usize {
        self.lock().idle.len()
    }
}

/// A server connection lent to one session, on one of the pool's slots. Dropping it without
/// [`Checkout::release`] closes the connection: that is the safe default for a connection in
/// an unknown state.
pub struct Checkout {
    conn: Option<Box<ServerConn>>,
    pool: Arc<Pool>,
    /// Holds one of the pool's slots (given back on drop, unless passed on with the
    /// connection by `release`).
    slot: bool,
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
        if let Some(mut conn) = self.conn.take() {
            self.pool.stats.in_use.fetch_sub(1, Ordering::Relaxed);
            match self.pool.unfit(&conn, last_used) {
                // the slot comes back with the drop
                Some(why) => self.pool.close(conn, why),
                None => {
                    conn.last_used = last_used;
                    self.slot = false;
                    self.pool.restore(Some(conn));
                }
            }
        }
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.stats.in_use.fetch_sub(1, Ordering::Relaxed);
            self.pool.close(conn, "discarded by its session");
        }
        if std::mem::take(&mut self.slot) {
            self.pool.restore(None);
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
