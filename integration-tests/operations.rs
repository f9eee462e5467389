//! Operating pgrouter (DESIGN §8–§10): the metrics endpoint under load, with promtool's
//! check of the exposition; health and readiness.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use futures_util::future::join_all;

use crate::harness::{APP_PASSWORD, APP_USER, Env, EnvOptions, connect, describe, runtime};

/// GET `path` from `port` on loopback: (status code, body).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics listener");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read the response");
    let (head, body) = response.split_once("\r\n\r\n").expect("a response head");
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("a status code");
    (status, body.to_owned())
}

/// The value of the series `name` whose labels include all of `labels` (summed when several
/// match), from a Prometheus text exposition.
pub fn metric(exposition: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (series_name, rest) = series.split_once('{').unwrap_or((series, ""));
            (series_name == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// promtool from Debian's prometheus package, installed on first use.
fn promtool() -> &'static str {
    if Command::new("promtool").arg("--version").output().is_ok_and(|o| o.status.success()) {
        return "promtool";
    }
    // the driver setup may be installing at the same time: wait for dpkg's lock
    let apt_get = |args: &[&str]| {
        let mut command = Command::new("apt-get");
        command.args(["-o", "DPkg::Lock::Timeout=600"]).args(args).env("DEBIAN_FRONTEND", "noninteractive");
        command.status().is_ok_and(|s| s.success())
    };
    let install = || apt_get(&["install", "-y", "-qq", "--no-install-recommends", "prometheus"]);
    if !install() {
        let _ = apt_get(&["update", "-qq"]);
        assert!(install(), "cannot install promtool (Debian package prometheus)");
    }
    "promtool"
}

fn metrics_env(pool_size: usize) -> (Env, u16) {
    let port = pgrouter::cluster::free_port();
    let env = Env::start(EnvOptions {
        pool_size,
        proxy: format!("metrics_listen = \"127.0.0.1:{port}\"\n"),
        ..EnvOptions::default()
    });
    (env, port)
}

/// 50 clients over pool_size 5: /metrics shows clients waiting and the wait histogram
/// growing, waiting goes back to 0 after the load, and promtool accepts the exposition.
#[test]
fn metrics_show_pool_saturation_under_load() {
    let (env, port) = metrics_env(5);
    let (status, body) = http_get(port, "/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let ready = Instant::now();
    while http_get(port, "/readyz").0 != 200 {
        assert!(ready.elapsed() < Duration::from_secs(20), "never ready: {}", http_get(port, "/readyz").1);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(http_get(port, "/nothing").0, 404);
    let waits = |text: &str| metric(text, "pgrouter_pool_wait_seconds_count", &[]);
    let before = http_get(port, "/metrics").1;
    let url = env.proxy.url(APP_USER, APP_PASSWORD, "app");
    let (max_waiting, scrapes, during) = runtime().block_on(async {
        let stop = Instant::now() + Duration::from_secs(4);
        let clients = (0..50).map(|_| {
            let url = url.clone();
            async move {
                let c = connect(&url).await.unwrap();
                let mut n = 0u32;
                while Instant::now() < stop {
                    c.simple_query("select pg_sleep(0.02)").await.map_err(|e| describe(&e)).unwrap();
                    n += 1;
                }
                n
            }
        });
        let scraper = async {
            let (mut max_waiting, mut scrapes, mut last) = (0f64, 0, String::new());
            tokio::time::sleep(Duration::from_millis(500)).await;
            while Instant::now() + Duration::from_millis(500) < stop {
                last = tokio::task::spawn_blocking(move || http_get(port, "/metrics").1).await.unwrap();
                let waiting = metric(&last, "pgrouter_clients", &[("database", "app"), ("state", "waiting")]);
                max_waiting = max_waiting.max(waiting);
                scrapes += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            (max_waiting, scrapes, last)
        };
        let (done, scraped) = tokio::join!(join_all(clients), scraper);
        assert!(done.iter().all(|n| *n > 0), "every client ran queries");
        scraped
    });
    let after = http_get(port, "/metrics").1;
    println!(
        "metrics: max pgrouter_clients{{state=\"waiting\"}} {max_waiting} over {scrapes} scrapes; \
         pool_wait_seconds_count {} -> {} -> {}",
        waits(&before),
        waits(&during),
        waits(&after)
    );
    assert!(max_waiting > 0.0, "clients were seen waiting for the pool of 5");
    assert!(waits(&before) < waits(&during) && waits(&during) < waits(&after), "the wait histogram grows");
    assert!(metric(&after, "pgrouter_pool_wait_seconds_sum", &[]) > 0.0, "waits took time");
    assert_eq!(metric(&after, "pgrouter_clients", &[("database", "app"), ("state", "waiting")]), 0.0);
    assert_eq!(
        metric(&after, "pgrouter_pool_size", &[("database", "app"), ("role", "primary")]),
        5.0 * 3.0,
        "one pool per user"
    );
    assert!(metric(&after, "pgrouter_queries_total", &[("database", "app"), ("route", "primary")]) > 100.0);
    assert!(metric(&after, "pgrouter_query_duration_seconds_count", &[("database", "app")]) > 100.0);
    assert!(metric(&after, "pgrouter_transactions_total", &[("database", "app")]) > 100.0);
    assert_eq!(metric(&after, "pgrouter_server_up", &[("database", "app"), ("role", "primary")]), 1.0);
    // promtool's lint of the exposition
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &after).unwrap();
    let checked = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(file.path()).unwrap())
        .output()
        .expect("run promtool");
    let said = format!("{}{}", String::from_utf8_lossy(&checked.stdout), String::from_utf8_lossy(&checked.stderr));
    assert!(checked.status.success() && said.trim().is_empty(), "promtool check metrics: {said}");
}

/// A psql command's CSV output on the admin console: the header, then the rows.
fn admin_csv(env: &Env, command: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let out = env.proxy.psql("pgrouter", &["--csv", "-c", command]);
    assert!(out.status.success(), "{command}: {}", crate::harness::stderr(&out));
    let text = crate::harness::stdout(&out);
    let mut lines = text.lines().map(|l| l.split(',').map(str::to_owned).collect::<Vec<_>>());
    let header = lines.next().unwrap_or_default();
    (header, lines.collect())
}

fn column<'a>(header: &[String], row: &'a [String], name: &str) -> &'a str {
    let i = header.iter().position(|h| h == name).unwrap_or_else(|| panic!("no column {name} in {header:?}"));
    &row[i]
}

/// psql on the admin console: SHOW POOLS and SHOW STATS with PgBouncer's columns, SHOW
/// CLIENTS and SHOW SERVERS listing the live connections, a non-admin refused; PAUSE waits
/// for the open transaction and holds new requests until RESUME; SHUTDOWN drains and exits.
#[test]
fn admin_console_shows_pools_stats_clients_and_servers() {
    let mut env =
        Env::start(EnvOptions { proxy: format!("admin_users = [\"{APP_USER}\"]\n"), ..EnvOptions::default() });
    let url = env.proxy.url(APP_USER, APP_PASSWORD, "app");
    let rt = runtime();
    let (busy, idle1, idle2) = rt.block_on(async {
        let busy = connect(&url).await.unwrap();
        busy.simple_query("begin; select 1").await.unwrap();
        let idle1 = connect(&url).await.unwrap();
        idle1.simple_query("select 1").await.unwrap();
        (busy, idle1, connect(&url).await.unwrap())
    });
    let (header, rows) = admin_csv(&env, "SHOW POOLS;");
    assert_eq!(
        header,
        [
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
            "pool_mode"
        ]
    );
    let app = rows.iter().find(|r| r[0] == "app" && r[1] == APP_USER).expect("a pool row for app/app");
    assert_eq!(
        (column(&header, app, "cl_active"), column(&header, app, "sv_active"), column(&header, app, "pool_mode")),
        ("3", "1", "transaction"),
        "as in PgBouncer, cl_active counts every logged-in client not waiting; one holds a server"
    );
    let (header, rows) = admin_csv(&env, "show stats");
    assert_eq!(
        header,
        [
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
            "avg_wait_time"
        ]
    );
    let app = rows.iter().find(|r| r[0] == "app").expect("a stats row for app");
    for counted in ["total_xact_count", "total_query_count", "total_received", "total_sent", "total_query_time"] {
        assert!(column(&header, app, counted).parse::<u64>().unwrap() > 0, "{counted} counts: {app:?}");
    }
    let (header, rows) = admin_csv(&env, "show clients");
    let clients: Vec<_> = rows.iter().filter(|r| column(&header, r, "database") == "app").collect();
    assert_eq!(clients.len(), 3, "the three live clients: {rows:?}");
    assert_eq!(clients.iter().filter(|r| column(&header, r, "state") == "active").count(), 1);
    let (header, rows) = admin_csv(&env, "show servers");
    let servers: Vec<_> = rows.iter().filter(|r| column(&header, r, "database") == "app").collect();
    assert!(servers.iter().any(|r| column(&header, r, "state") == "active"), "the busy client's server: {rows:?}");
    assert!(servers.iter().all(|r| column(&header, r, "remote_pid").parse::<i32>().unwrap() > 0));
    let (header, rows) = admin_csv(&env, "show routes");
    assert_eq!(header, ["shape", "access", "route", "count"]);
    let select = rows.iter().find(|r| r[0].to_lowercase().starts_with("select") && r.len() == 4);
    let select = select.unwrap_or_else(|| panic!("the clients' select in SHOW ROUTES: {rows:?}"));
    assert_eq!((select[1].as_str(), select[2].as_str()), ("read", "primary"), "{select:?}");
    assert!(select[3].parse::<u64>().unwrap() >= 1);
    for command in ["show databases", "show config", "show version", "show help"] {
        assert!(!admin_csv(&env, command).1.is_empty(), "{command}");
    }
    let config = admin_csv(&env, "show config").1;
    assert!(config.iter().any(|r| r[0] == "proxy.admin_users" && r[1] == APP_USER));
    // a user not in admin_users is refused, after a correct password
    let out =
        env.proxy.psql_as(crate::harness::MD5_USER, crate::harness::MD5_PASSWORD, "pgrouter", &["-c", "show pools"]);
    assert!(crate::harness::stderr(&out).contains("not in proxy.admin_users"), "{}", crate::harness::stderr(&out));
    // PAUSE waits for the open transaction; new requests wait until RESUME
    let pause = {
        let port = env.proxy.port;
        std::thread::spawn(move || {
            let started = Instant::now();
            let out = crate::harness::pg_tool("psql")
                .args([
                    "-X",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "-U",
                    APP_USER,
                    "-d",
                    "pgrouter",
                    "-c",
                    "pause app",
                ])
                .env("PGPASSWORD", APP_PASSWORD)
                .output()
                .unwrap();
            (out.status.success(), started.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(700));
    assert!(!pause.is_finished(), "PAUSE waits while a transaction holds a server connection");
    rt.block_on(busy.simple_query("commit")).unwrap();
    let (paused, took) = pause.join().unwrap();
    assert!(paused && took >= Duration::from_millis(700), "PAUSE answered once the transaction ended ({took:?})");
    let held = rt.spawn(async move { idle1.simple_query("select 2").await.map(|_| ()).map_err(|e| describe(&e)) });
    std::thread::sleep(Duration::from_millis(500));
    assert!(!held.is_finished(), "a request waits while the database is paused");
    let (header, rows) = admin_csv(&env, "show pools");
    let app = rows.iter().find(|r| r[0] == "app" && r[1] == APP_USER).unwrap();
    assert_eq!(column(&header, app, "cl_waiting"), "1", "the held client shows as waiting");
    assert_eq!(admin_csv(&env, "resume").0, ["RESUME"], "psql prints the command tag");
    rt.block_on(held).unwrap().expect("the held request runs after RESUME");
    drop(idle2);
    // SHUTDOWN drains and exits
    let out = env.proxy.psql("pgrouter", &["-c", "shutdown"]);
    assert!(out.status.success(), "{}", crate::harness::stderr(&out));
    let status = env.proxy.wait_exit(Duration::from_secs(20)).expect("pgrouter exits after SHUTDOWN");
    assert!(status.success(), "{status}");
}

/// Seconds of pgbench load around the reload (PGROUTER_RELOAD_SECONDS to change it).
fn reload_load_seconds() -> u64 {
    std::env::var("PGROUTER_RELOAD_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(20)
}

/// Under pgbench load (16 clients, transaction pooling), SIGHUP with a bigger pool_size and a
/// new routing rule: no transaction fails, the new rule applies to new statements, also on a
/// connection opened before the reload; a broken config is refused (logged with its key
/// path) and the proxy runs on; RELOAD on the admin console does the same as SIGHUP.
#[test]
fn reload_under_load_drops_nobody() {
    // a replica caught behind by pgbench -i is banned for ban_time: short here, so that it
    // comes back into rotation well within the wait below
    let env = Env::start(EnvOptions {
        replica: true,
        proxy: format!("admin_users = [\"{APP_USER}\"]\nban_time = \"2s\"\n"),
        ..EnvOptions::default()
    });
    assert!(env.proxy.pgbench("app", &["-i", "-s", "1", "-q"]).status.success(), "pgbench -i");
    let url = env.proxy.url(APP_USER, APP_PASSWORD, "app");
    let rt = runtime();
    let early = rt.block_on(connect(&url)).unwrap();
    // a read goes to the replica until a rule says otherwise
    let probe = "select pg_is_in_recovery()::text, 'rule_probe'";
    let on_replica = |c: &tokio_postgres::Client| -> bool {
        let rows = rt.block_on(c.simple_query(probe)).map_err(|e| describe(&e)).unwrap();
        rows.iter().any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("true")))
    };
    let ready = Instant::now();
    while !on_replica(&early) {
        assert!(ready.elapsed() < Duration::from_secs(20), "the replica never came into rotation");
        std::thread::sleep(Duration::from_millis(200));
    }
    let seconds = reload_load_seconds();
    let load = {
        let port = env.proxy.port;
        std::thread::spawn(move || {
            crate::harness::pg_tool("pgbench")
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", APP_USER, "-c", "16", "-j", "2"])
                .args(["-T", &seconds.to_string(), "-n", "app"])
                .env("PGPASSWORD", APP_PASSWORD)
                .output()
                .expect("run pgbench")
        })
    };
    std::thread::sleep(Duration::from_secs(seconds / 3));
    let path = env.proxy.config_path();
    let original = std::fs::read_to_string(&path).unwrap();
    let app_db = "name = \"app\"\nserver_database = \"app\"\npool_mode = \"transaction\"\npool_size = 4\n";
    assert!(original.contains(app_db), "the test knows the harness's config");
    let changed = original.replace(
        app_db,
        &format!(
            "{}[[databases.routing.rules]]\npattern = \"rule_probe\"\nroute = \"primary\"\n",
            app_db.replace("pool_size = 4", "pool_size = 8")
        ),
    );
    std::fs::write(&path, &changed).unwrap();
    env.proxy.signal("HUP");
    let reloaded = Instant::now();
    while !env.proxy.log().contains("config reloaded") {
        assert!(reloaded.elapsed() < Duration::from_secs(10), "no reload in the log");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!on_replica(&early), "the new rule sends the probe to the primary, on a connection opened before");
    assert!(!on_replica(&rt.block_on(connect(&url)).unwrap()), "and on a new connection");
    // a broken config is refused, logged with its key path, and changes nothing
    std::thread::sleep(Duration::from_secs(seconds / 3));
    std::fs::write(&path, changed.replace("pool_size = 8", "pool_size = \"many\"")).unwrap();
    env.proxy.signal("HUP");
    let refused = Instant::now();
    while !env.proxy.log().contains("config reload refused") {
        assert!(refused.elapsed() < Duration::from_secs(10), "the broken config was not reported");
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = env.proxy.log();
    let line = log.lines().find(|l| l.contains("config reload refused")).unwrap();
    assert!(line.contains("databases[0].pool_size"), "the error names the key: {line}");
    assert!(!on_replica(&early), "the running config (with the rule) stays");
    let out = load.join().unwrap();
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "pgbench: {report}{}", String::from_utf8_lossy(&out.stderr));
    let failed = report.lines().find(|l| l.starts_with("number of failed transactions")).unwrap_or_default();
    let done = report.lines().find(|l| l.starts_with("number of transactions actually processed")).unwrap_or_default();
    println!("reload: {seconds} s of pgbench, 16 clients, 2 reloads: {done}; {failed}");
    assert!(failed.starts_with("number of failed transactions: 0 "), "{failed}");
    // the pool grew: up to 8 server connections for app on the primary
    let (header, rows) = admin_csv(&env, "show databases");
    let app = rows.iter().find(|r| r[0] == "app").unwrap();
    assert_eq!(column(&header, app, "pool_size"), "8");
    // RELOAD on the admin console: refused while the file is broken, then accepted
    let out = env.proxy.psql("pgrouter", &["-c", "reload"]);
    assert!(crate::harness::stderr(&out).contains("databases[0].pool_size"), "{}", crate::harness::stderr(&out));
    std::fs::write(&path, &original).unwrap();
    let out = env.proxy.psql("pgrouter", &["-c", "reload"]);
    assert!(out.status.success(), "{}", crate::harness::stderr(&out));
    assert!(on_replica(&early), "the rule is gone again");
}

/// SIGTERM under pgbench load: transactions in flight complete (every transaction pgbench
/// saw committed is there, and no other; TPC-B's balances agree), clients are turned away
/// only between transactions, new connections are refused, and the process exits 0 within
/// shutdown_timeout (10 s here).
#[test]
fn sigterm_under_load_lets_transactions_finish() {
    let mut env = Env::start(EnvOptions::default());
    assert!(env.proxy.pgbench("app", &["-i", "-s", "1", "-q"]).status.success(), "pgbench -i");
    let port = env.proxy.port;
    let load = std::thread::spawn(move || {
        crate::harness::pg_tool("pgbench")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", APP_USER, "-c", "8", "-j", "2", "-T", "30"])
            .args(["-n", "app"])
            .env("PGPASSWORD", APP_PASSWORD)
            .output()
            .expect("run pgbench")
    });
    std::thread::sleep(Duration::from_secs(3));
    env.proxy.signal("TERM");
    let signalled = Instant::now();
    // the drain's own line, written once the listener is closed (the CLI's earlier
    // "SIGTERM or SHUTDOWN: draining" comes before that)
    assert!(crate::harness::wait_until(Duration::from_secs(5), || env.proxy.log().contains("pgrouter::app: draining")));
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "new connections are refused while draining");
    let status = env.proxy.wait_exit(Duration::from_secs(15)).expect("pgrouter exits");
    let took = signalled.elapsed();
    assert!(status.success(), "exit status {status}");
    assert!(took < Duration::from_secs(10), "exited within shutdown_timeout: {took:?}");
    let out = load.join().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let processed: u64 = report
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .unwrap_or_else(|| panic!("no transaction count in pgbench's report:\n{report}"));
    // pgbench's TPC-B script: \set x4, BEGIN (command 4), ..., END; a client turned away
    // between transactions fails at its next BEGIN
    let aborts: Vec<&str> = report.lines().filter(|l| l.contains(" aborted in command ")).collect();
    assert!(!aborts.is_empty(), "clients were turned away:\n{report}");
    assert!(
        aborts.iter().all(|l| l.contains("aborted in command 4 ")),
        "only between transactions, at the next BEGIN:\n{}",
        aborts.join("\n")
    );
    let history: u64 = env.primary_sql("select count(*) from pgbench_history").parse().unwrap();
    assert_eq!(history, processed, "every transaction pgbench saw committed is there, and no other");
    let balances = env.primary_sql(
        "select (select sum(abalance) from pgbench_accounts) = (select coalesce(sum(delta), 0) from pgbench_history) \
         and (select sum(bbalance) from pgbench_branches) = (select coalesce(sum(delta), 0) from pgbench_history)",
    );
    assert_eq!(balances, "t", "TPC-B balances agree");
    println!("drain: {processed} transactions committed, {} clients turned away, exit 0 after {took:?}", aborts.len());
}

/// Reads one backend message: (type, body).
pub fn read_message(stream: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 5];
    stream.read_exact(&mut head).expect("a message header");
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut body = vec![0u8; len - 4];
    stream.read_exact(&mut body).expect("a message body");
    (head[0], body)
}

/// A user pgrouter trusts (no password over the raw socket), logged in to the server as app.
pub fn trusted_user() -> String {
    format!(
        "[[users]]\nname = \"raw\"\nauth = \"trust\"\nserver_user = \"{APP_USER}\"\nserver_password = \"{APP_PASSWORD}\"\n"
    )
}

/// Logs in as the trusted user over a raw socket; returns the stream and the cancel key
/// pgrouter gave (pid, secret).
pub fn raw_login(port: u16) -> (TcpStream, i32, Vec<u8>) {
    raw_login_to(port, "app")
}

/// [`raw_login`] to `database`.
pub fn raw_login_to(port: u16, database: &str) -> (TcpStream, i32, Vec<u8>) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut body = 196_608u32.to_be_bytes().to_vec();
    for (k, v) in [("user", "raw"), ("database", database)] {
        body.extend_from_slice(format!("{k}\0{v}\0").as_bytes());
    }
    body.push(0);
    let mut packet = u32::try_from(body.len() + 4).unwrap().to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    stream.write_all(&packet).unwrap();
    let mut key = None;
    loop {
        match read_message(&mut stream) {
            (b'K', body) => key = Some((i32::from_be_bytes(body[..4].try_into().unwrap()), body[4..].to_vec())),
            (b'Z', _) => break,
            (b'E', body) => panic!("login failed: {}", String::from_utf8_lossy(&body)),
            _ => {}
        }
    }
    let (pid, secret) = key.expect("BackendKeyData");
    (stream, pid, secret)
}

/// Two instances (instance_id 1 and 2) of pgrouter in front of one server: a CancelRequest
/// for instance 1's client sent to instance 2 is forwarded to its peer and cancels the query.
#[test]
fn a_cancel_sent_to_the_wrong_instance_still_cancels() {
    let env =
        Env::start(EnvOptions { proxy: "instance_id = 1\n".into(), users: trusted_user(), ..EnvOptions::default() });
    let second_opts = EnvOptions {
        proxy: format!("instance_id = 2\npeers = [\"127.0.0.1:{}\"]\n", env.proxy.port),
        users: trusted_user(),
        ..EnvOptions::default()
    };
    let second = crate::harness::Proxy::start(|port| crate::harness::config_text(&env.topo, &second_opts, port));
    let (mut stream, pid, secret) = raw_login(env.proxy.port);
    assert_eq!(pgrouter::frontend::cancel::instance_of(pid), 1, "the key carries its instance");
    stream.write_all(&crate::harness::frontend_message(b'Q', b"select pg_sleep(30)\0")).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let mut cancel = TcpStream::connect(("127.0.0.1", second.port)).unwrap();
    let mut packet = 16u32.to_be_bytes().to_vec();
    packet.extend_from_slice(&80_877_102u32.to_be_bytes());
    packet.extend_from_slice(&pid.to_be_bytes());
    packet.extend_from_slice(&secret);
    cancel.write_all(&packet).unwrap();
    let mut code = String::new();
    loop {
        match read_message(&mut stream) {
            (b'E', body) => {
                code = body
                    .split(|&b| b == 0)
                    .find_map(|f| f.strip_prefix(b"C"))
                    .map(|c| String::from_utf8_lossy(c).into_owned())
                    .unwrap_or_default();
            }
            (b'Z', _) => break,
            _ => {}
        }
    }
    println!("peers: a cancel sent to instance 2 cancelled instance 1's query after {:?}", started.elapsed());
    assert_eq!(code, "57014", "the query was cancelled");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        crate::harness::wait_until(Duration::from_secs(5), || second.log().contains("forwarded to peers")),
        "instance 2 logs the forward"
    );
}

/// With reuse_port, two instances share one port and both take clients.
#[test]
fn instances_share_a_port_with_reuse_port() {
    let env = Env::start(EnvOptions { proxy: "reuse_port = true\ninstance_id = 1\n".into(), ..EnvOptions::default() });
    let shared = env.proxy.port;
    let opts = EnvOptions { proxy: "reuse_port = true\ninstance_id = 2\n".into(), ..EnvOptions::default() };
    // the second instance listens on the shared port; its own port serves /metrics, which
    // is what tells the harness it is up
    let second = crate::harness::Proxy::start(|port| {
        crate::harness::config_text(&env.topo, &opts, port).replacen(
            &format!("listen = \"127.0.0.1:{port}\""),
            &format!("listen = \"127.0.0.1:{shared}\"\nmetrics_listen = \"127.0.0.1:{port}\""),
            1,
        )
    });
    let url = env.proxy.url(APP_USER, APP_PASSWORD, "app");
    runtime().block_on(async {
        for _ in 0..24 {
            let c = connect(&url).await.unwrap();
            c.simple_query("select 1").await.unwrap();
        }
    });
    let count = |log: String| log.matches("client connected").count();
    let (first, other) = (count(env.proxy.log()), count(second.log()));
    println!("reuse_port: 24 connections to one port: {first} to instance 1, {other} to instance 2");
    assert!(first > 0 && other > 0 && first + other == 24, "both instances took clients: {first} + {other}");
}

/// docker/: what can be checked without a Docker engine (see docker/check.sh).
#[test]
fn docker_files_check_out() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/check.sh");
    let out =
        Command::new("bash").arg(script).arg(env!("CARGO_BIN_EXE_pgrouter")).output().expect("run docker/check.sh");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "docker/check.sh failed:\n{said}");
    println!("{}", said.trim());
}

/// log_format = "json": every line is a JSON object; connection open and close lines carry
/// the client address, user and database; a pool timeout names the client; no password ever
/// appears.
#[test]
fn json_logs_name_clients_and_never_passwords() {
    let env = Env::start(EnvOptions {
        pool_size: 1,
        proxy: "log_format = \"json\"\nquery_wait_timeout = \"300ms\"\n".into(),
        ..EnvOptions::default()
    });
    let url = env.proxy.url(APP_USER, APP_PASSWORD, "app");
    runtime().block_on(async {
        let holder = connect(&url).await.unwrap();
        holder.simple_query("begin; select 1").await.unwrap();
        let waiter = connect(&url).await.unwrap();
        let err = waiter.simple_query("select 1").await.expect_err("the pool of 1 is held");
        assert!(describe(&err).starts_with("53000"), "{}", describe(&err));
        holder.simple_query("commit").await.unwrap();
    });
    let wrong = env.proxy.psql_as(APP_USER, "not-the-password", "app", &["-c", "select 1"]);
    assert!(!wrong.status.success());
    assert!(crate::harness::wait_until(Duration::from_secs(5), || env.proxy.log().contains("client disconnected")));
    let log = env.proxy.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let with = |message: &str| -> Option<&serde_json::Value> {
        lines.iter().find(|l| l["fields"]["message"].as_str().is_some_and(|m| m.starts_with(message)))
    };
    for message in ["client connected", "client disconnected"] {
        let line = with(message).unwrap_or_else(|| panic!("no \"{message}\" line"));
        for field in ["client", "user", "database"] {
            assert!(line["fields"][field].is_string(), "{message} has {field}: {line}");
        }
    }
    let timeout = lines
        .iter()
        .find(|l| {
            l["level"] == "WARN" && l["fields"]["message"].as_str().is_some_and(|m| m.starts_with("query_wait_timeout"))
        })
        .expect("a pool timeout warning");
    assert!(timeout["fields"]["client"].is_string() && timeout["fields"]["pool"].is_string(), "{timeout}");
    for secret in [APP_PASSWORD, "not-the-password", crate::harness::MD5_PASSWORD] {
        assert!(!log.contains(secret), "a password in the log");
    }
    println!("logs: {} JSON lines, no password", lines.len());
}

/// A reload that adds a user lets it log in; one that removes a user ends that user's
/// session at its next request, with a clear error; everyone else carries on.
#[test]
fn reload_changes_users() {
    let env = Env::start(EnvOptions::default());
    let rt = runtime();
    let legacy_url = env.proxy.url(crate::harness::MD5_USER, crate::harness::MD5_PASSWORD, "app");
    let legacy = rt.block_on(connect(&legacy_url)).unwrap();
    let app = rt.block_on(connect(&env.proxy.url(APP_USER, APP_PASSWORD, "app"))).unwrap();
    let path = env.proxy.config_path();
    let original = std::fs::read_to_string(&path).unwrap();
    let md5_user = format!(
        "[[users]]\nname = \"{}\"\npassword = \"{}\"\nauth = \"md5\"\n",
        crate::harness::MD5_USER,
        crate::harness::MD5_PASSWORD
    );
    assert!(original.contains(&md5_user), "the test knows the harness's config");
    let newcomer = format!(
        "[[users]]\nname = \"newcomer\"\npassword = \"new-secret\"\nserver_user = \"{APP_USER}\"\nserver_password = \"{APP_PASSWORD}\"\n"
    );
    std::fs::write(&path, original.replace(&md5_user, &newcomer)).unwrap();
    env.proxy.signal("HUP");
    assert!(crate::harness::wait_until(Duration::from_secs(10), || env.proxy.log().contains("config reloaded")));
    let err = rt.block_on(legacy.simple_query("select 1")).expect_err("the removed user's session ends");
    assert!(describe(&err).contains("removed from pgrouter's config"), "{}", describe(&err));
    rt.block_on(app.simple_query("select 1")).expect("other sessions carry on");
    let newcomer = rt.block_on(connect(&env.proxy.url("newcomer", "new-secret", "app"))).expect("the new user logs in");
    rt.block_on(newcomer.simple_query("select 1")).unwrap();
    assert!(rt.block_on(connect(&legacy_url)).is_err(), "the removed user cannot log in again");
}
