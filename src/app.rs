//! Builds the shared handles (the config snapshot with its pools, policies and credentials;
//! cancel keys, the shutdown token and task tracker), starts the listener and the pool
//! upkeep, and turns signals into a reload (SIGHUP), a drain (SIGTERM) or a fast exit
//! (SIGINT). A reload (`reload.rs`) swaps in a new snapshot; sessions move to it between
//! transactions.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use std::time::Instant;

use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use std::collections::HashMap;

use arc_swap::ArcSwap;
use std::path::PathBuf;

use crate::backend::Pools;
use crate::backend::health::{CheckSettings, run_checks};
use crate::backend::tick::Ticker;
use crate::config::Config;
use crate::frontend::auth::Verifiers;
use crate::frontend::cancel::CancelRegistry;
use crate::frontend::clients::ClientRegistry;
use crate::frontend::listener::accept_loop;
use crate::frontend::prepared::Registry;
use crate::router::{Policy, Router};
use crate::telemetry::{DatabaseMetrics, Telemetry};

mod gauges;
mod reload;

/// How often idle server connections are checked for expiry and min_pool_size is topped up.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Distinct statement shapes whose classification is kept.
const SHAPE_CACHE_CAPACITY: usize = 10_000;

/// What one version of the config makes: the config itself, its pools and health records,
/// routing policies, client credentials and per-database metrics.
pub struct Snapshot {
    /// Counts reloads; sessions compare it to notice a new snapshot.
    pub generation: u64,
    pub config: Arc<Config>,
    pub pools: Pools,
    /// Each database's routing policy.
    pub policies: HashMap<String, Arc<Policy>>,
    pub verifiers: Verifiers,
    pub database_metrics: HashMap<String, Arc<DatabaseMetrics>>,
    /// TLS to clients, from `[proxy.tls]` (None: disabled).
    pub tls: Option<crate::frontend::tls::ClientTls>,
    /// Stops this snapshot's health checkers when a reload replaces it.
    checkers: CancellationToken,
}

impl Snapshot {
    /// Builds what `config` makes; an error (with its key path) when its TLS certificate or
    /// key cannot be used.
    fn build(
        config: Config,
        telemetry: &Telemetry,
        previous: Option<&Snapshot>,
        shutdown: &CancellationToken,
    ) -> Result<Self, String> {
        let tls = crate::frontend::tls::acceptor(&config.proxy.tls)?;
        let mut server_tls = HashMap::new();
        for (i, db) in config.databases.iter().enumerate() {
            if let Some(settings) = crate::backend::tls::settings(db, &format!("databases[{i}]"))? {
                server_tls.insert(db.name.clone(), settings);
            }
        }
        let database_metrics = config
            .databases
            .iter()
            .map(|db| {
                let kept = previous.and_then(|p| p.database_metrics.get(&db.name)).cloned();
                (db.name.clone(), kept.unwrap_or_else(|| Arc::new(DatabaseMetrics::new(telemetry, &db.name))))
            })
            .collect();
        Ok(Self {
            tls,
            generation: previous.map_or(0, |p| p.generation + 1),
            pools: Pools::build(&config, telemetry, previous.map(|p| &p.pools), &server_tls),
            policies: config.databases.iter().map(|db| (db.name.clone(), Policy::new(db))).collect(),
            verifiers: Verifiers::build(&config),
            database_metrics,
            config: Arc::new(config),
            checkers: shutdown.child_token(),
        })
    }
}

/// The state every task shares. Nothing in it is process-global.
pub struct App {
    /// The config in effect and what it makes; replaced whole by a reload.
    current: ArcSwap<Snapshot>,
    /// `current`'s generation, which every request compares with its session's: an atomic
    /// read is cheaper than loading the snapshot. Stored after the snapshot it names.
    generation: AtomicU64,
    /// Where the config was read from, to read it again on reload.
    config_path: Option<PathBuf>,
    /// Held while a reload builds its snapshot, so two reloads cannot interleave.
    reloading: Mutex<()>,
    /// Statement classification, cached by shape, shared by every session.
    pub router: Router,
    pub cancels: Arc<CancelRegistry>,
    /// Fired when the proxy stops accepting; sessions close at their next safe point.
    pub shutdown: CancellationToken,
    /// Set just before `shutdown` fires: what a session checks after each request (a token's
    /// own check takes its lock).
    draining: std::sync::atomic::AtomicBool,
    /// Every client session, so a drain can wait for them.
    pub tracker: TaskTracker,
    /// Connected clients, for max_client_connections.
    pub clients: AtomicUsize,
    /// Proxy-wide names of prepared statements (transaction pooling).
    pub statements: Registry,
    /// Transaction-pooled clients pinned to a server connection (LISTEN, temp tables, ...).
    pub pinned_clients: AtomicUsize,
    /// Logged-in clients and what each is doing.
    pub sessions: Arc<ClientRegistry>,
    /// The metrics recorder.
    pub telemetry: Telemetry,
    /// When the proxy started (SHOW STATS' averages).
    pub started: Instant,
    /// Fired by the admin console's SHUTDOWN: drain as on SIGTERM.
    pub stop_requested: CancellationToken,
    /// Databases paused by the admin console's PAUSE, and the wake-up for RESUME.
    paused: Mutex<HashSet<String>>,
    /// Some database is paused (checked without the lock on every checkout).
    any_paused: std::sync::atomic::AtomicBool,
    resumed: Notify,
}

/// A started proxy.
pub struct Running {
    pub app: Arc<App>,
    pub local_addr: SocketAddr,
    /// The accept loop; a drain waits for it to end (and close the listener) before it says
    /// it is draining, so no connection is accepted after that.
    accepting: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// How the proxy was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM: stop accepting, let transactions finish, up to shutdown_timeout.
    Drain,
    /// SIGINT: exit now; the servers roll back whatever was open.
    Fast,
}

impl App {
    /// Binds the listener and starts serving. `config_path` is where a reload reads the
    /// config again.
    pub async fn start(config: Config, config_path: Option<PathBuf>) -> std::io::Result<Running> {
        let listener = bind_clients(config.proxy.listen, config.proxy.reuse_port)?;
        let local_addr = listener.local_addr()?;
        let metrics_listener = match config.proxy.metrics_listen {
            Some(addr) => Some(TcpListener::bind(addr).await?),
            None => None,
        };
        let telemetry = Telemetry::new();
        let shutdown = CancellationToken::new();
        let instance_id = config.proxy.instance_id;
        let snapshot = Snapshot::build(config, &telemetry, None, &shutdown).map_err(std::io::Error::other)?;
        let app = Arc::new(Self {
            generation: AtomicU64::new(snapshot.generation),
            current: ArcSwap::from_pointee(snapshot),
            config_path,
            reloading: Mutex::new(()),
            telemetry,
            sessions: Arc::new(ClientRegistry::default()),
            started: Instant::now(),
            stop_requested: CancellationToken::new(),
            paused: Mutex::new(HashSet::new()),
            any_paused: std::sync::atomic::AtomicBool::new(false),
            resumed: Notify::new(),
            router: Router::new(SHAPE_CACHE_CAPACITY),
            cancels: Arc::new(CancelRegistry::new(instance_id)),
            shutdown,
            draining: std::sync::atomic::AtomicBool::new(false),
            tracker: TaskTracker::new(),
            clients: AtomicUsize::new(0),
            pinned_clients: AtomicUsize::new(0),
            statements: Registry::default(),
        });
        let accepting = tokio::spawn(accept_loop(Arc::clone(&app), listener));
        if let Some(metrics_listener) = metrics_listener {
            tracing::info!(listen = %metrics_listener.local_addr()?, "serving /metrics, /healthz and /readyz");
            tokio::spawn(crate::telemetry::http::serve(Arc::clone(&app), metrics_listener));
        }
        tokio::spawn(upkeep(Arc::clone(&app)));
        start_health_checks(&app.now());
        tracing::info!(listen = %local_addr, "pgrouter is accepting clients");
        Ok(Running { app, local_addr, accepting: std::sync::Mutex::new(Some(accepting)) })
    }
}

impl App {
    /// The config snapshot in effect.
    #[must_use]
    pub fn now(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// The current snapshot's generation (cheaper than [`App::now`]).
    #[must_use]
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// PAUSE (`on`) or RESUME the databases: while paused, a client that needs a server
    /// connection waits.
    pub fn pause(&self, databases: &[String], on: bool) {
        let mut paused = self.paused.lock().expect("pause lock");
        for db in databases {
            if on {
                paused.insert(db.clone());
            } else {
                paused.remove(db);
            }
        }
        self.any_paused.store(!paused.is_empty(), std::sync::atomic::Ordering::Release);
        drop(paused);
        if !on {
            self.resumed.notify_waiters();
        }
    }

    /// The proxy is draining (`shutdown` has fired or is about to).
    #[must_use]
    pub fn draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Acquire)
    }

    #[must_use]
    pub fn is_paused(&self, database: &str) -> bool {
        self.any_paused.load(std::sync::atomic::Ordering::Acquire)
            && self.paused.lock().expect("pause lock").contains(database)
    }

    /// Returns once `database` is not paused (or the proxy is shutting down).
    pub async fn wait_unpaused(&self, database: &str) {
        loop {
            let resumed = self.resumed.notified();
            tokio::pin!(resumed);
            resumed.as_mut().enable();
            if !self.is_paused(database) {
                return;
            }
            tokio::select! {
                () = resumed => {}
                () = self.shutdown.cancelled() => return,
            }
        }
    }
}

impl Running {
    /// Drains: stops accepting, lets every session reach a safe point, and waits up to
    /// `shutdown_timeout`. Returns whether every session ended in time.
    pub async fn drain(&self) -> bool {
        let app = &self.app;
        app.draining.store(true, std::sync::atomic::Ordering::Release);
        app.shutdown.cancel();
        let accepting = self.accepting.lock().expect("accept lock").take();
        if let Some(accepting) = accepting {
            let _ = accepting.await;
        }
        app.tracker.close();
        let limit = app.now().config.proxy.shutdown_timeout;
        tracing::info!(clients = app.tracker.len(), timeout = ?limit, "draining");
        let done = crate::timer::timeout(limit, app.tracker.wait()).await.is_ok();
        if !done {
            tracing::warn!(clients = app.tracker.len(), "shutdown_timeout reached with clients still connected");
        }
        done
    }
}

/// Waits for SIGTERM (or the admin console's SHUTDOWN) or SIGINT; reloads the config on
/// each SIGHUP meanwhile.
pub async fn wait_for_stop(app: &App) -> std::io::Result<Stop> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(Stop::Drain),
            () = app.stop_requested.cancelled() => return Ok(Stop::Drain),
            _ = int.recv() => return Ok(Stop::Fast),
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the config");
                // a refused config was logged key by key and counted
                let _ = app.reload();
            }
        }
    }
}

/// The client listener; with `reuse_port`, bound with SO_REUSEPORT so that several pgrouter
/// processes can share the port (the kernel spreads new connections between them).
fn bind_clients(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(reuse_port)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// One checker task per shard of every database.
fn start_health_checks(snapshot: &Snapshot) {
    for shard in &snapshot.pools.health {
        let policy = &snapshot.policies[&shard.primary.database];
        let settings = CheckSettings {
            interval: snapshot.config.proxy.health_check_interval,
            ban_time: snapshot.config.proxy.ban_time,
            max_lag: policy.max_replica_lag,
        };
        tokio::spawn(run_checks(Arc::clone(shard), settings, snapshot.checkers.clone()));
    }
}

/// Expires idle server connections and keeps min_pool_size, for every pool.
async fn upkeep(app: Arc<App>) {
    let mut tick = Ticker::new(UPKEEP_INTERVAL);
    loop {
        tokio::select! {
            () = app.shutdown.cancelled() => return,
            () = tick.tick() => {}
        }
        // Each pool on its own task, so one unreachable server (waiting out its connect
        // timeout) does not hold up the others.
        for pool in app.now().pools.all() {
            let pool = Arc::clone(pool);
            tokio::spawn(async move { pool.maintain().await });
        }
    }
}
