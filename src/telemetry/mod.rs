//! Prometheus metrics (DESIGN §8) and the HTTP endpoint that serves them (`http`).
//!
//! The recorder belongs to the app, not to the process: parts of the proxy get metric
//! handles from [`Telemetry`] when they are built (a pool its wait histogram, a session its
//! database's query counters), so the per-query path only bumps atomics. Gauges that
//! describe state (clients, pools, server health) are set from that state at each scrape
//! (`App::refresh_gauges`), so they cannot drift from it. Label values come from the config
//! and from fixed sets of words, never from SQL or client input, so series stay bounded.

mod histogram;
pub mod http;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use histogram::Histograms;

/// Latency buckets (seconds): from 50 µs (a cached statement on loopback) to 30 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0,
];

const METADATA: Metadata<'static> = Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// What each series means, for the exposition's HELP lines.
const DESCRIPTIONS: &[(&str, &str)] = &[
    ("pgrouter_clients", "Client connections by state (active: has a server connection; waiting: for one; idle)"),
    ("pgrouter_pool_servers", "Server connections by state (active: lent to a client; idle; connecting)"),
    ("pgrouter_pool_size", "Configured pool_size of each pool"),
    ("pgrouter_pool_wait_seconds", "Time clients waited for a server connection"),
    ("pgrouter_pool_wait_timeouts_total", "Clients that gave up waiting for a server connection (query_wait_timeout)"),
    ("pgrouter_queries_total", "Requests (a simple query, or an extended-protocol batch up to Sync) by route"),
    ("pgrouter_query_duration_seconds", "Request latency through the proxy, until the server's ReadyForQuery"),
    ("pgrouter_transactions_total", "Transactions ended (explicit ones and single statements outside a block)"),
    ("pgrouter_server_up", "1 if the server is usable, 0 if banned, down or not checked yet"),
    ("pgrouter_replica_lag_seconds", "Replication lag of a replica, from the health checker"),
    ("pgrouter_bans_total", "Servers taken out of rotation, by reason"),
    ("pgrouter_pinned_clients", "Transaction-pooled clients pinned to one server connection"),
    ("pgrouter_errors_total", "Errors pgrouter answered to clients, by kind"),
    ("pgrouter_parse_cache_hits_total", "Statements whose classification came from the shape cache"),
    ("pgrouter_parse_cache_misses_total", "Statements parsed because their shape was not cached"),
    ("pgrouter_config_reloads_total", "Config reloads by result (ok, error)"),
];

/// The app's metrics: counters and gauges in the Prometheus exporter's recorder,
/// histograms in [`Histograms`].
pub struct Telemetry {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    histograms: Histograms,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    #[must_use]
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new().build_recorder();
        for (name, help) in DESCRIPTIONS {
            let (key, help) = (KeyName::from_const_str(name), SharedString::const_str(help));
            let unit = name.ends_with("_seconds").then_some(Unit::Seconds);
            if name.ends_with("_total") {
                recorder.describe_counter(key, None, help);
            } else if !is_histogram(name) {
                recorder.describe_gauge(key, unit, help);
            }
        }
        let handle = recorder.handle();
        Self { recorder, handle, histograms: Histograms::default() }
    }

    pub fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        self.recorder.register_counter(&key(name, labels), &METADATA)
    }

    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
        self.recorder.register_gauge(&key(name, labels), &METADATA)
    }

    /// A histogram of seconds (`name` ends with `_seconds`), bucketed by `SECONDS_BUCKETS`.
    pub fn histogram(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Histogram {
        debug_assert!(is_histogram(name), "{name} is not a histogram of seconds");
        Histogram::from_arc(self.histograms.series(name, labels, SECONDS_BUCKETS))
    }

    /// The Prometheus text exposition of every series.
    #[must_use]
    pub fn render(&self) -> String {
        let mut text = self.handle.render();
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        let help = |name: &str| DESCRIPTIONS.iter().find(|(n, _)| *n == name).map(|(_, help)| *help);
        self.histograms.render(help, &mut text);
        text
    }
}

/// The series of seconds that are histograms (`pgrouter_replica_lag_seconds` is a gauge).
fn is_histogram(name: &str) -> bool {
    name.ends_with("_seconds") && !name.contains("lag")
}

fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
    let labels: Vec<Label> = labels.iter().map(|(k, v)| Label::new(*k, (*v).to_owned())).collect();
    Key::from_parts(name, labels)
}

/// The `route` label of `pgrouter_queries_total` and `pgrouter_query_duration_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteLabel {
    Primary,
    Replica,
    /// One shard of a sharded database.
    Shard,
    AllShards,
}

impl RouteLabel {
    const ALL: [Self; 4] = [Self::Primary, Self::Replica, Self::Shard, Self::AllShards];

    /// A code for `router::classify::Usage` (0 means none).
    #[must_use]
    pub fn code(self) -> u8 {
        self as u8 + 1
    }

    #[must_use]
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.get(usize::from(code.checked_sub(1)?)).copied()
    }

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Replica => "replica",
            Self::Shard => "shard",
            Self::AllShards => "all_shards",
        }
    }
}

/// One database's request metrics, registered once.
pub struct DatabaseMetrics {
    routes: [(Counter, Histogram); 4],
    transactions: Counter,
    /// Totals since start, for the admin console's SHOW STATS.
    pub totals: Totals,
}

/// Running totals of one database (PgBouncer's SHOW STATS counters).
#[derive(Debug, Default)]
pub struct Totals {
    pub transactions: AtomicU64,
    pub queries: AtomicU64,
    /// Microseconds requests took until their ReadyForQuery.
    pub query_us: AtomicU64,
    /// Microseconds clients held a server connection (in a transaction, or a request).
    pub xact_us: AtomicU64,
    /// Bytes from clients relayed to servers, and from servers to clients.
    pub received: AtomicU64,
    pub sent: AtomicU64,
}

impl DatabaseMetrics {
    #[must_use]
    pub fn new(telemetry: &Telemetry, database: &str) -> Self {
        let routes = RouteLabel::ALL.map(|route| {
            let labels = [("database", database), ("route", route.as_str())];
            (
                telemetry.counter("pgrouter_queries_total", &labels),
                telemetry.histogram("pgrouter_query_duration_seconds", &labels),
            )
        });
        Self {
            routes,
            transactions: telemetry.counter("pgrouter_transactions_total", &[("database", database)]),
            totals: Totals::default(),
        }
    }

    /// Counts one request on `route` that took `took`.
    pub fn query(&self, route: RouteLabel, took: Duration) {
        let (count, duration) = &self.routes[route as usize];
        count.increment(1);
        duration.record(took.as_secs_f64());
        self.totals.queries.fetch_add(1, Ordering::Relaxed);
        self.totals.query_us.fetch_add(micros(took), Ordering::Relaxed);
    }

    /// Counts one transaction ended.
    pub fn transaction(&self) {
        self.transactions.increment(1);
        self.totals.transactions.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds the time a server connection was held.
    pub fn held(&self, took: Duration) {
        self.totals.xact_us.fetch_add(micros(took), Ordering::Relaxed);
    }

    /// Adds bytes relayed from clients (received) and to them (sent).
    pub fn relayed(&self, received: u64, sent: u64) {
        self.totals.received.fetch_add(received, Ordering::Relaxed);
        self.totals.sent.fetch_add(sent, Ordering::Relaxed);
    }
}

#[must_use]
pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
