//! The admin console's SHOW result sets. SHOW POOLS and SHOW STATS use PgBouncer's column
//! names (PgBouncer 1.18), so dashboards and exporters made for it can read them; their
//! values come from the same state the metrics report.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::app::App;
use crate::frontend::clients::ClientState;
use crate::protocol::messages;
use crate::telemetry::RouteLabel;

type Row = Vec<Option<String>>;

fn result(columns: &[&str], rows: &[Row]) -> Bytes {
    messages::text_result(columns, rows, &format!("SHOW {}", rows.len()))
}

fn cell(v: impl ToString) -> Option<String> {
    Some(v.to_string())
}

/// A wall-clock time as PgBouncer prints it (UTC, seconds).
fn timestamp(t: SystemTime) -> Option<String> {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // civil date from days since 1970-01-01 (Howard Hinnant's algorithm)
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    Some(format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC", rest / 3600, rest % 3600 / 60, rest % 60))
}

fn split_addr(addr: &str) -> (String, String) {
    match addr.rsplit_once(':') {
        Some((host, port)) => (host.to_owned(), port.to_owned()),
        None => (addr.to_owned(), String::new()),
    }
}

/// One row per (database, user): clients by state, server connections by state, the
/// longest current wait.
pub fn pools(app: &App) -> Bytes {
    let now = app.now();
    const COLUMNS: &[&str] = &[
        "database",
        "user",
        "cl_active",
        "cl_waiting",
        "cl_active_cancel_req",
        "cl_waiting_cancel_req",
        "sv_active",
        "sv_active_cancel",
        "sv_being_canceled",
        "sv_idle",
        "sv_used",
        "sv_tested",
        "sv_login",
        "maxwait",
        "maxwait_us",
        "pool_mode",
    ];
    // clients: (active, waiting, longest wait)
    let mut clients: BTreeMap<(String, String), (u64, u64, Duration)> = BTreeMap::new();
    for c in app.sessions.snapshot() {
        let entry = clients.entry((c.database.clone(), c.user.clone())).or_default();
        // as in PgBouncer, cl_active is every logged-in client not waiting for a server
        match c.state() {
            ClientState::Active | ClientState::Idle => entry.0 += 1,
            ClientState::Waiting => {
                entry.1 += 1;
                entry.2 = entry.2.max(c.waiting_for());
            }
        }
    }
    let mut rows = Vec::new();
    for db in &now.config.databases {
        for user in &now.config.users {
            let Some(cluster) = now.pools.get(&db.name, &user.name) else { continue };
            let (mut active, mut idle, mut login) = (0, 0, 0);
            for pool in cluster.all() {
                active += pool.stats.in_use.load(Ordering::Relaxed);
                idle += pool.idle_count();
                login += pool.stats.connecting.load(Ordering::Relaxed);
            }
            let (cl_active, cl_waiting, wait) =
                clients.get(&(db.name.clone(), user.name.clone())).copied().unwrap_or_default();
            rows.push(vec![
                cell(&db.name),
                cell(&user.name),
                cell(cl_active),
                cell(cl_waiting),
                cell(0), // cancel requests are forwarded at once, never queued
                cell(0),
                cell(active),
                cell(0),
                cell(0),
                cell(idle),
                cell(0), // connections are checked before every hand-out, not tested later
                cell(0),
                cell(login),
                cell(wait.as_secs()),
                cell(wait.subsec_micros()),
                cell(db.pool_mode.as_str()),
            ]);
        }
    }
    result(COLUMNS, &rows)
}

/// One row per database: totals since start, and averages (counts and bytes per second
/// since start; times per transaction or query, in microseconds).
pub fn stats(app: &App) -> Bytes {
    let now = app.now();
    const COLUMNS: &[&str] = &[
        "database",
        "total_xact_count",
        "total_query_count",
        "total_received",
        "total_sent",
        "total_xact_time",
        "total_query_time",
        "total_wait_time",
        "avg_xact_count",
        "avg_query_count",
        "avg_recv",
        "avg_sent",
        "avg_xact_time",
        "avg_query_time",
        "avg_wait_time",
    ];
    let seconds = app.started.elapsed().as_secs().max(1);
    let mut rows = Vec::new();
    for db in &now.config.databases {
        let Some(m) = now.database_metrics.get(&db.name) else { continue };
        let t = &m.totals;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let (xacts, queries) = (load(&t.transactions), load(&t.queries));
        let wait: u64 = now
            .pools
            .all()
            .filter(|p| p.key.database == db.name)
            .map(|p| p.stats.wait_us.load(Ordering::Relaxed))
            .sum();
        let per = |total: u64, n: u64| total.checked_div(n).unwrap_or(0);
        rows.push(vec![
            cell(&db.name),
            cell(xacts),
            cell(queries),
            cell(load(&t.received)),
            cell(load(&t.sent)),
            cell(load(&t.xact_us)),
            cell(load(&t.query_us)),
            cell(wait),
            cell(xacts / seconds),
            cell(queries / seconds),
            cell(load(&t.received) / seconds),
            cell(load(&t.sent) / seconds),
            cell(per(load(&t.xact_us), xacts)),
            cell(per(load(&t.query_us), queries)),
            cell(per(wait, xacts)),
        ]);
    }
    result(COLUMNS, &rows)
}

/// Every logged-in client.
pub fn clients(app: &App) -> Bytes {
    const COLUMNS: &[&str] =
        &["type", "user", "database", "state", "addr", "port", "connect_time", "wait", "wait_us", "pinned", "id"];
    let rows: Vec<Row> = app
        .sessions
        .snapshot()
        .iter()
        .map(|c| {
            let wait = c.waiting_for();
            vec![
                cell("C"),
                cell(&c.user),
                cell(&c.database),
                cell(c.state().as_str()),
                cell(c.addr.ip()),
                cell(c.addr.port()),
                timestamp(c.connected_at),
                cell(wait.as_secs()),
                cell(wait.subsec_micros()),
                cell(c.pinned()),
                cell(c.id),
            ]
        })
        .collect();
    result(COLUMNS, &rows)
}

/// Every open server connection.
pub fn servers(app: &App) -> Bytes {
    let now = app.now();
    const COLUMNS: &[&str] =
        &["type", "user", "database", "state", "addr", "port", "shard", "role", "connect_time", "remote_pid"];
    let mut rows = Vec::new();
    for pool in now.pools.all() {
        let key = &pool.key;
        let (host, port) = split_addr(&key.server.to_string());
        for (pid, since, idle) in pool.servers() {
            rows.push(vec![
                cell("S"),
                cell(&key.user),
                cell(&key.database),
                cell(if idle { "idle" } else { "active" }),
                cell(&host),
                cell(&port),
                cell(key.shard),
                cell(key.role.as_str()),
                timestamp(since),
                cell(pid),
            ]);
        }
    }
    result(COLUMNS, &rows)
}

/// Every configured database.
pub fn databases(app: &App) -> Bytes {
    let now = app.now();
    const COLUMNS: &[&str] = &[
        "name",
        "host",
        "port",
        "database",
        "pool_size",
        "min_pool_size",
        "pool_mode",
        "shards",
        "replicas",
        "current_connections",
        "paused",
    ];
    let rows: Vec<Row> = now
        .config
        .databases
        .iter()
        .map(|db| {
            let (host, port) = db.shards.first().map(|s| split_addr(&s.primary.to_string())).unwrap_or_default();
            let open: usize = now
                .pools
                .all()
                .filter(|p| p.key.database == db.name)
                .map(|p| p.stats.open.load(Ordering::Relaxed))
                .sum();
            vec![
                cell(&db.name),
                cell(host),
                cell(port),
                cell(&db.server_database),
                cell(db.pool_size),
                cell(db.min_pool_size),
                cell(db.pool_mode.as_str()),
                cell(db.shards.len()),
                cell(db.shards.iter().map(|s| s.replicas.len()).sum::<usize>()),
                cell(open),
                cell(u8::from(app.is_paused(&db.name))),
            ]
        })
        .collect();
    result(COLUMNS, &rows)
}

/// The `[proxy]` settings in effect (no secrets live there; user passwords are never shown),
/// and whether a reload can change each.
pub fn config(app: &App) -> Bytes {
    let now = app.now();
    let p = &now.config.proxy;
    let d = |d: Duration| humantime::format_duration(d).to_string();
    let settings: Vec<(&str, String)> = vec![
        ("listen", p.listen.to_string()),
        ("workers", p.workers.to_string()),
        ("metrics_listen", p.metrics_listen.map(|a| a.to_string()).unwrap_or_default()),
        ("admin_users", p.admin_users.join(", ")),
        ("max_client_connections", p.max_client_connections.to_string()),
        ("max_message_size", p.max_message_size.to_string()),
        ("client_login_timeout", d(p.client_login_timeout)),
        ("query_wait_timeout", d(p.query_wait_timeout)),
        ("client_idle_timeout", d(p.client_idle_timeout)),
        ("server_idle_timeout", d(p.server_idle_timeout)),
        ("server_lifetime", d(p.server_lifetime)),
        ("server_connect_timeout", d(p.server_connect_timeout)),
        ("health_check_interval", d(p.health_check_interval)),
        ("ban_time", d(p.ban_time)),
        ("shutdown_timeout", d(p.shutdown_timeout)),
        ("log_format", p.log_format.as_str().to_owned()),
        ("tls.mode", p.tls.mode.as_str().to_owned()),
    ];
    // what a reload cannot change (see app/reload.rs)
    const RESTART_ONLY: &[&str] = &["listen", "metrics_listen", "workers", "log_format"];
    let rows: Vec<Row> = settings
        .into_iter()
        .map(|(k, v)| {
            let changeable = if RESTART_ONLY.contains(&k) { "no" } else { "yes" };
            vec![cell(format!("proxy.{k}")), Some(v), cell(changeable)]
        })
        .collect();
    result(&["key", "value", "changeable"], &rows)
}

/// The statement shapes that ran most (transaction pooling, where routing happens): the
/// shape (literals replaced), read or write, the route the last one took, how many ran.
pub fn routes(app: &App) -> Bytes {
    const SHOWN: usize = 100;
    const SHAPE_CHARS: usize = 200;
    let mut shapes: Vec<(u64, u8, String, &'static str)> = app
        .router
        .shapes()
        .filter_map(|(shape, class)| {
            let (count, route) = class.usage.get();
            let access = if matches!(class.access, crate::router::classify::Access::Read) { "read" } else { "write" };
            let text: String = String::from_utf8_lossy(&shape).chars().take(SHAPE_CHARS).collect();
            (count > 0).then_some((count, route, text, access))
        })
        .collect();
    shapes.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.2.cmp(&b.2)));
    let rows: Vec<Row> = shapes
        .into_iter()
        .take(SHOWN)
        .map(|(count, route, shape, access)| {
            let route = RouteLabel::from_code(route).map_or("", RouteLabel::as_str);
            vec![cell(shape), cell(access), cell(route), cell(count)]
        })
        .collect();
    result(&["shape", "access", "route", "count"], &rows)
}

pub fn version() -> Bytes {
    result(&["version"], &[vec![cell(format!("pgrouter {}", env!("CARGO_PKG_VERSION")))]])
}

pub fn help() -> Bytes {
    let commands = [
        ("SHOW POOLS", "clients and server connections per database and user (PgBouncer's columns)"),
        ("SHOW STATS", "totals and averages per database (PgBouncer's columns)"),
        ("SHOW CLIENTS", "every logged-in client"),
        ("SHOW SERVERS", "every open server connection"),
        ("SHOW DATABASES", "the configured databases"),
        ("SHOW CONFIG", "the [proxy] settings in effect"),
        ("SHOW ROUTES", "the statement shapes that ran most, with their route and count"),
        ("SHOW VERSION", "pgrouter's version"),
        ("RELOAD", "read the config file again (as SIGHUP does)"),
        ("PAUSE [db]", "new requests wait; answered once every server connection is back"),
        ("RESUME [db]", "ends a PAUSE"),
        ("SHUTDOWN", "drain and exit, as on SIGTERM"),
    ];
    let rows: Vec<Row> = commands.iter().map(|(c, what)| vec![cell(c), cell(what)]).collect();
    result(&["command", "description"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_civil_utc() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_824_000 + 3_723);
        assert_eq!(timestamp(t).unwrap(), "2026-11-28 01:02:03 UTC");
        assert_eq!(timestamp(SystemTime::UNIX_EPOCH).unwrap(), "1970-01-01 00:00:00 UTC");
    }
}
