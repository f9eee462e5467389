//! Pooling under load: pgbench in both pool modes, many clients over a small pool, wait
//! timeouts, clients that vanish mid-transaction, cancel, pipelining and COPY over the
//! extended protocol.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt, TryStreamExt};
use tokio_postgres::types::Type;

use crate::harness::{
    APP_PASSWORD, APP_USER, Env, EnvOptions, assert_ok, connect, describe, runtime, sqlstate, stdout, wait_until,
};

fn pgbench_ok(env: &Env, db: &str, args: &[&str]) -> String {
    let out = env.proxy.pgbench(db, args);
    assert_ok(&out, &format!("pgbench {args:?} on {db}"));
    let text = stdout(&out);
    assert!(text.contains("number of failed transactions: 0 (0.000%)"), "pgbench {args:?}:\n{text}");
    let tps = text.lines().find(|l| l.starts_with("tps")).unwrap_or("tps = ?").to_owned();
    eprintln!("measured: pgbench {args:?} on {db}: {tps}");
    text
}

/// pgbench -i, then every protocol mode in session pooling and simple/extended in transaction
/// pooling with 16 clients over pool_size 4; the TPC-B invariant holds afterwards.
#[test]
fn pgbench_in_both_pool_modes_keeps_the_invariant() {
    let env = Env::start(EnvOptions { pool_size: 4, ..EnvOptions::default() });
    let out = env.proxy.pgbench("app", &["-i", "-s", "1", "-q"]);
    assert_ok(&out, "pgbench -i");
    for mode in ["simple", "extended", "prepared"] {
        pgbench_ok(&env, "app_session", &["-n", "-c", "4", "-j", "2", "-t", "150", "-M", mode]);
    }
    for mode in ["simple", "extended"] {
        pgbench_ok(&env, "app", &["-n", "-c", "16", "-j", "2", "-t", "100", "-M", mode]);
    }
    let counts = env.primary_sql(
        "select (select sum(abalance) from pgbench_accounts) = (select sum(delta) from pgbench_history), \
         (select count(*) from pgbench_history)",
    );
    assert_eq!(counts, format!("t|{}", 3 * 4 * 150 + 2 * 16 * 100), "TPC-B invariant or history count");
    // at most pool_size server connections per pool were ever needed
    let servers: u32 = env
        .primary_sql("select count(*) from pg_stat_activity where usename = 'app' and application_name <> 'pgrouter health check'")
        .parse()
        .unwrap();
    assert!(servers <= 8, "{servers} server connections for two pools of 4");
}

/// 200 concurrent clients over pool_size 5 in transaction mode all succeed.
#[test]
fn two_hundred_clients_over_five_connections() {
    let env = Env::start(EnvOptions {
        pool_size: 5,
        proxy: "query_wait_timeout = \"60s\"\nclient_login_timeout = \"60s\"".into(),
        ..EnvOptions::default()
    });
    let url = env.proxy.url(APP_USER, APP_PASSWORD, "app");
    let rt = runtime();
    let results: Vec<Result<i64, String>> = rt.block_on(async {
        let tasks: Vec<_> = (0..200i64)
            .map(|i| {
                let url = url.clone();
                tokio::spawn(async move {
                    let client = connect(&url).await.map_err(|e| describe(&e))?;
                    let mut sum = 0;
                    for j in 0..5i64 {
                        // unnamed statements: named ones across transactions arrive with issue 4
                        let rows = client
                            .query_typed("select $1::int8 * 10 + $2::int8", &[(&i, Type::INT8), (&j, Type::INT8)])
                            .await
                            .map_err(|e| describe(&e))?;
                        sum += rows[0].get::<_, i64>(0);
                    }
                    let tx_row = client
                        .simple_query("begin; select pg_backend_pid(); commit")
                        .await
                        .map_err(|e| describe(&e))?;
                    drop(tx_row);
                    Ok(sum)
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("task"));
        }
        out
    });
    let failures: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failures.is_empty(), "{} of 200 clients failed, e.g. {:?}", failures.len(), failures.first());
    for (i, r) in results.iter().enumerate() {
        let i = i as i64;
        assert_eq!(*r.as_ref().unwrap(), 50 * i + 10, "client {i} got someone else's answer");
    }
    let servers: u32 = env
        .primary_sql("select count(*) from pg_stat_activity where usename = 'app' and application_name <> 'pgrouter health check'")
        .parse()
        .unwrap();
    assert!(servers <= 5, "{servers} server connections for pool_size 5");
}

/// Clients holding every server in a transaction: a waiting client gets the pool-timeout error
/// after about query_wait_timeout, its session stays usable, and other pools keep serving.
#[test]
fn pool_wait_timeout_names_the_pool_and_the_wait() {
    let env =
        Env::start(EnvOptions { pool_size: 2, proxy: "query_wait_timeout = \"1s\"".into(), ..EnvOptions::default() });
    let url = env.proxy.url(APP_USER, APP_PASSWORD, "app");
    let rt = runtime();
    rt.block_on(async {
        let mut holders = Vec::new();
        for _ in 0..2 {
            let c = connect(&url).await.unwrap();
            c.batch_execute("begin; select 1").await.unwrap();
            holders.push(c);
        }
        let waiter = connect(&url).await.unwrap();
        // a wait that ends well first, half a second in: the session's timer stays set from
        // it, to fire half-way through the next wait, which must still last its full second
        let (served, ()) = tokio::join!(waiter.simple_query("select 1"), async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            holders[0].batch_execute("commit").await.unwrap();
        });
        served.expect("served once a holder commits");
        holders[0].batch_execute("begin; select 1").await.unwrap();
        let started = Instant::now();
        let err = waiter.simple_query("select 1").await.expect_err("pool is exhausted");
        let waited = started.elapsed();
        eprintln!("measured: pool timeout error after {waited:?} (query_wait_timeout = 1s)");
        assert_eq!(sqlstate(&err).as_deref(), Some("53000"), "{err}");
        let msg = err.as_db_error().unwrap().message().to_owned();
        assert!(
            msg.contains("app/app@127.0.0.1:") && msg.contains("query_wait_timeout") && msg.contains("waited"),
            "{msg}"
        );
        assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(5), "waited {waited:?}");
        // extended protocol: the error is followed by a usable session too
        let err = waiter.query_typed("select $1::int", &[(&1i32, Type::INT4)]).await.expect_err("still exhausted");
        assert_eq!(sqlstate(&err).as_deref(), Some("53000"), "{err}");
        // other pools are unaffected meanwhile
        let other = connect(&env.proxy.url(APP_USER, APP_PASSWORD, "app_session")).await.unwrap();
        other.simple_query("select 1").await.expect("another pool serves");
        // the holders finish; the waiter's session works again
        for h in &holders {
            h.batch_execute("commit").await.unwrap();
        }
        let rows = waiter
            .query_typed("select 41 + $1::int", &[(&1i32, Type::INT4)])
            .await
            .expect("session usable after timeout");
        assert_eq!(rows[0].get::<_, i32>(0), 42);
    });
}

fn idle_in_transaction(env: &Env) -> u32 {
    env.primary_sql("select count(*) from pg_stat_activity where usename = 'app' and application_name <> 'pgrouter health check' and state like 'idle in transaction%'")
        .parse()
        .unwrap()
}

/// A client killed inside a transaction leaves nothing open on the server, its writes are
/// rolled back, and the next clients get clean connections.
#[test]
fn client_killed_mid_transaction_leaves_no_open_transaction() {
    let env = Env::start(EnvOptions { pool_size: 1, ..EnvOptions::default() });
    assert_ok(&env.proxy.psql("app", &["-c", "create table killed (id int)"]), "create table");
    for db in ["app", "app_session"] {
        let mut psql = crate::harness::pg_tool("psql")
            .args(["-X", "-h", "127.0.0.1", "-p", &env.proxy.port.to_string(), "-U", APP_USER, "-d", db])
            .env("PGPASSWORD", APP_PASSWORD)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            let stdin = psql.stdin.as_mut().unwrap();
            stdin.write_all(b"begin;\ninsert into killed values (1);\nset work_mem = '1MB';\n").unwrap();
            stdin.flush().unwrap();
        }
        assert!(
            wait_until(Duration::from_secs(10), || idle_in_transaction(&env) == 1),
            "psql never got idle in transaction"
        );
        psql.kill().unwrap(); // SIGKILL: no Terminate message, just a closed socket
        psql.wait().unwrap();
        assert!(
            wait_until(Duration::from_secs(10), || idle_in_transaction(&env) == 0),
            "{db}: a transaction stayed open"
        );
        assert_eq!(
            env.primary_sql("select count(*) from killed"),
            "0",
            "{db}: the killed client's insert was committed"
        );
        // pool_size 1: the next client gets that same server connection, and it is clean
        let out =
            env.proxy.psql(db, &["-At", "-c", "select current_setting('work_mem'), now() = statement_timestamp()"]);
        assert_ok(&out, "next client");
        assert_eq!(stdout(&out).trim(), "4MB|t", "{db}: next client saw leftover state");
    }
}

/// A client killed while its statement runs: the statement is cancelled on the server.
#[test]
fn client_killed_mid_statement_stops_the_statement() {
    let env = Env::start(EnvOptions::default());
    let mut psql = crate::harness::pg_tool("psql")
        .args([
            "-X",
            "-h",
            "127.0.0.1",
            "-p",
            &env.proxy.port.to_string(),
            "-U",
            APP_USER,
            "-d",
            "app",
            "-c",
            "select pg_sleep(60)",
        ])
        .env("PGPASSWORD", APP_PASSWORD)
        .spawn()
        .unwrap();
    let sleeping = || {
        env.primary_sql(
            "select count(*) from pg_stat_activity where query = 'select pg_sleep(60)' and state = 'active'",
        )
    };
    assert!(wait_until(Duration::from_secs(10), || sleeping() == "1"), "statement never started");
    psql.kill().unwrap();
    psql.wait().unwrap();
    assert!(wait_until(Duration::from_secs(10), || sleeping() == "0"), "statement kept running after its client died");
}

/// A CancelRequest with the proxy's key cancels the client's running statement.
#[test]
fn cancel_request_reaches_the_right_statement() {
    let env = Env::start(EnvOptions::default());
    let url = env.proxy.url(APP_USER, APP_PASSWORD, "app");
    runtime().block_on(async {
        let victim = connect(&url).await.unwrap();
        let bystander = connect(&url).await.unwrap();
        let token = victim.cancel_token();
        let bystander_task = tokio::spawn(async move {
            bystander.query_typed("select 7 from pg_sleep(1.5)", &[]).await.map(|r| r[0].get::<_, i32>(0))
        });
        let running = tokio::spawn(async move { victim.simple_query("select pg_sleep(30)").await });
        tokio::time::sleep(Duration::from_millis(500)).await;
        let started = Instant::now();
        token.cancel_query(tokio_postgres::NoTls).await.expect("send cancel");
        let err = running.await.unwrap().expect_err("statement was cancelled");
        assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(bystander_task.await.unwrap().expect("bystander not cancelled"), 7);
    });
}

/// tokio-postgres pipelines concurrent queries on one connection; COPY over the extended
/// protocol (Bind/Execute/Sync, CopyData, CopyDone/Sync) both ways.
#[test]
fn pipelining_and_extended_protocol_copy() {
    let env = Env::start(EnvOptions { pool_size: 2, ..EnvOptions::default() });
    for db in ["app", "app_session"] {
        let url = env.proxy.url(APP_USER, APP_PASSWORD, db);
        runtime().block_on(async {
            let client = connect(&url).await.unwrap();
            let params: Vec<i32> = (0..50).collect();
            let futures: Vec<_> = params
                .iter()
                .map(|i| {
                    let client = &client;
                    async move { client.query_typed("select $1::int4 * 2", &[(i, Type::INT4)]).await }
                })
                .collect();
            let results = futures_util::future::try_join_all(futures).await.expect("pipelined queries");
            for (i, rows) in results.iter().enumerate() {
                assert_eq!(rows[0].get::<_, i32>(0), 2 * i as i32);
            }
            let table = format!("xcopy_{db}");
            client.batch_execute(&format!("create table {table} (id int, v text)")).await.unwrap();
            let sink = client.copy_in(&format!("copy {table} from stdin")).await.unwrap();
            futures_util::pin_mut!(sink);
            for i in 0..1000 {
                sink.send(bytes::Bytes::from(format!("{i}\tvalue {i}\n"))).await.unwrap();
            }
            assert_eq!(sink.finish().await.unwrap(), 1000);
            // after the COPY the connection is at rest and reusable
            let n: i64 = client.query_typed(&format!("select count(*) from {table}"), &[]).await.unwrap()[0].get(0);
            assert_eq!(n, 1000);
            let stream = client.copy_out(&format!("copy (select * from {table} order by id) to stdout")).await.unwrap();
            let chunks: Vec<bytes::Bytes> = stream.try_collect().await.unwrap();
            let text: String = chunks.iter().map(|c| String::from_utf8_lossy(c).into_owned()).collect();
            assert_eq!(text.lines().count(), 1000);
            assert!(text.starts_with("0\tvalue 0\n"));
            // a failed COPY (bad data) leaves the session usable
            let sink = client.copy_in(&format!("copy {table} from stdin")).await.unwrap();
            futures_util::pin_mut!(sink);
            sink.send(bytes::Bytes::from_static(b"not-a-number\tx\n")).await.unwrap();
            assert!(sink.finish().await.is_err());
            let n: i64 = client.query_typed(&format!("select count(*) from {table}"), &[]).await.unwrap()[0].get(0);
            assert_eq!(n, 1000);
            client.simple_query("select 1").await.unwrap();
            let rows = client.query_raw("select generate_series(1, 3)", std::iter::empty::<i32>()).await.unwrap();
            futures_util::pin_mut!(rows);
            let mut count = 0;
            while let Some(row) = rows.next().await {
                row.unwrap();
                count += 1;
            }
            assert_eq!(count, 3);
        });
    }
}

fn app_backend_pids(env: &Env) -> Vec<String> {
    let pids = env.primary_sql("select coalesce(string_agg(pid::text, ',' order by pid), '') from pg_stat_activity where usename = 'app' and application_name <> 'pgrouter health check'");
    pids.split(',').filter(|p| !p.is_empty()).map(str::to_owned).collect()
}

/// Pool upkeep: min_pool_size is kept open, idle connections expire after server_idle_timeout,
/// connections are replaced after server_lifetime, and broken connections (terminated by the
/// server, or a server restart) are replaced rather than handed out.
#[test]
fn pool_upkeep_and_broken_connections() {
    let env = Env::start(EnvOptions {
        proxy: "server_idle_timeout = \"2s\"\nserver_lifetime = \"3s\"".into(),
        databases: String::new(),
        pool_size: 3,
        ..EnvOptions::default()
    });
    let pid_of = |db: &str| {
        let out = env.proxy.psql(db, &["-At", "-c", "select pg_backend_pid()"]);
        assert_ok(&out, "query through pgrouter");
        stdout(&out).trim().to_owned()
    };
    // a broken idle connection is never handed out: terminate it behind pgrouter's back
    let first = pid_of("app");
    env.primary_sql(&format!("select pg_terminate_backend({first})"));
    assert!(wait_until(Duration::from_secs(5), || !app_backend_pids(&env).contains(&first)));
    let second = pid_of("app");
    assert_ne!(first, second, "a new server connection replaced the terminated one");
    // a restarted server: every pooled connection is dead, the next client still succeeds
    env.topo.primary.restart().expect("restart primary");
    let third = pid_of("app");
    assert_ne!(second, third);
    // server_idle_timeout: idle connections are closed
    assert!(
        wait_until(Duration::from_secs(10), || app_backend_pids(&env).is_empty()),
        "idle connections were not closed"
    );
    // server_lifetime: a connection older than 3s is not reused even if busy in between
    let url = env.proxy.url(APP_USER, APP_PASSWORD, "app");
    runtime().block_on(async {
        let client = connect(&url).await.unwrap();
        let pid = |rows: Vec<tokio_postgres::Row>| rows[0].get::<_, i32>(0);
        let a = pid(client.query_typed("select pg_backend_pid()", &[]).await.unwrap());
        let mut b = a;
        let started = Instant::now();
        while b == a && started.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(500)).await;
            b = pid(client.query_typed("select pg_backend_pid()", &[]).await.unwrap());
        }
        assert_ne!(a, b, "connection outlived server_lifetime");
        eprintln!("measured: server connection replaced after {:?} (server_lifetime = 3s)", started.elapsed());
    });
}

/// min_pool_size connections are opened and kept without any client.
#[test]
fn min_pool_size_is_kept_open() {
    let env = Env::start(EnvOptions {
        databases: "\n[[databases]]\nname = \"warm\"\nserver_database = \"app\"\npool_size = 4\nmin_pool_size = 3\n\
                    [[databases.shards]]\nprimary = \"{PRIMARY}\"\n"
            .to_owned(),
        ..EnvOptions::default()
    });
    assert!(wait_until(Duration::from_secs(10), || app_backend_pids(&env).len() == 3), "{:?}", app_backend_pids(&env));
    let before = app_backend_pids(&env);
    let out = env.proxy.psql("warm", &["-At", "-c", "select pg_backend_pid()"]);
    assert_ok(&out, "query on the warm pool");
    assert!(before.contains(&stdout(&out).trim().to_owned()), "the query used a pre-opened connection");
}

/// The pool's queue, driven directly against a real server: a returned connection goes to the
/// oldest waiting client, a newcomer does not jump the queue, a closed connection hands on its
/// slot, a waiter that times out or is dropped leaves the queue (passing on a turn that came
/// meanwhile), and a reload's resize grants new slots to waiters first and takes slots out as
/// they come back.
#[test]
fn pool_queue_hands_slots_to_the_oldest_waiter() {
    use std::sync::Arc;

    use pgrouter::backend::health::ServerHealth;
    use pgrouter::backend::{Checkout, ConnectSpec, Pool, PoolKey, PoolMetrics, PoolSettings};
    use pgrouter::cluster::{AuthMethod, Topology, TopologyOptions, UserSpec};
    use pgrouter::config::ServerAddr;
    use pgrouter::error::Error;
    use pgrouter::router::{Role, ShardId};

    let topo = Topology::start(TopologyOptions {
        users: vec![UserSpec { name: APP_USER.into(), password: APP_PASSWORD.into(), auth: AuthMethod::ScramSha256 }],
        databases: vec!["app".into()],
        ..TopologyOptions::default()
    })
    .expect("start PostgreSQL");
    let addr = ServerAddr { host: "127.0.0.1".into(), port: topo.primary.port };
    let settings = |size, wait_ms| PoolSettings {
        size,
        min_size: 0,
        wait_timeout: Duration::from_millis(wait_ms),
        idle_timeout: Duration::from_secs(60),
        lifetime: Duration::from_secs(3600),
    };
    let pool = |size, wait_ms| {
        Pool::new(
            PoolKey {
                database: "app".into(),
                user: APP_USER.into(),
                shard: ShardId(0),
                role: Role::Primary,
                server: addr.clone(),
            },
            ConnectSpec {
                addr: addr.clone(),
                user: APP_USER.into(),
                password: Some(APP_PASSWORD.into()),
                database: "app".into(),
                connect_timeout: Duration::from_secs(10),
                application_name: None,
                tls: None,
            },
            settings(size, wait_ms),
            ServerHealth::new("app", ShardId(0), Role::Primary, addr.clone()),
            PoolMetrics::default(),
        )
    };
    let pid = |c: &Checkout| c.conn_ref().cancel.key.pid;
    // each step waits for the queue to reach a state, with a bound so a broken pool fails
    async fn until(what: &str, check: impl Fn() -> bool) {
        let limit = Instant::now() + Duration::from_secs(20);
        while !check() {
            assert!(Instant::now() < limit, "timed out waiting for: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        // FIFO handoff, no queue jumping, a closed connection's slot handed on
        let p = pool(2, 20_000);
        let (c1, c2) = (p.checkout().await.unwrap(), p.checkout().await.unwrap());
        let (pid1, pid2) = (pid(&c1), pid(&c2));
        let first = tokio::spawn({
            let p = Arc::clone(&p);
            async move { p.checkout().await }
        });
        until("one waiter", || p.stats.waiting.load(std::sync::atomic::Ordering::Relaxed) == 1).await;
        let (tx, mut second_got) = tokio::sync::mpsc::unbounded_channel();
        let second = tokio::spawn({
            let p = Arc::clone(&p);
            async move {
                let c = p.checkout().await.unwrap();
                tx.send(pid(&c)).unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
                c.release();
            }
        });
        until("two waiters", || p.stats.waiting.load(std::sync::atomic::Ordering::Relaxed) == 2).await;
        c1.release();
        let first = first.await.unwrap().unwrap();
        assert_eq!(pid(&first), pid1, "the oldest waiter gets the returned connection");
        assert!(p.try_checkout().is_none(), "a newcomer does not take a slot while a client waits");
        drop(c2); // closed, not returned: its slot goes to the next waiter, who opens a connection
        let opened = second_got.recv().await.unwrap();
        assert!(opened != pid2 && opened != pid1, "a new connection on the closed one's slot");
        second.await.unwrap();
        first.release();
        assert_eq!(p.stats.waiting.load(std::sync::atomic::Ordering::Relaxed), 0);
        assert_eq!(p.idle_count(), 2, "both connections idle again: {:?}", p.servers());

        // a waiter that times out leaves the queue: the connection returned later stays free
        let p = pool(1, 100);
        let held = p.checkout().await.unwrap();
        let held_pid = pid(&held);
        match p.checkout().await {
            Err(Error::PoolTimeout { .. }) => {}
            other => panic!("expected a pool timeout, got {:?}", other.map(|c| pid(&c))),
        }
        held.release();
        let again = p.try_checkout().expect("the returned connection is free, not given to the gone waiter");
        assert_eq!(pid(&again), held_pid);

        // a waiter dropped after its turn came, before it ran, passes the connection on
        let mut waiting = Box::pin(p.checkout());
        assert!(futures_util::poll!(waiting.as_mut()).is_pending(), "queued");
        again.release(); // handed to the queued waiter
        drop(waiting);
        let third = p.try_checkout().expect("the dropped waiter's turn was passed back to the pool");
        assert_eq!(pid(&third), held_pid);

        // a grow grants the new slot to the waiter at once; a shrink takes slots as they come back
        let waiter = tokio::spawn({
            let p = Arc::clone(&p);
            async move { p.checkout().await.map(|c| pid(&c)) }
        });
        until("a waiter", || p.stats.waiting.load(std::sync::atomic::Ordering::Relaxed) == 1).await;
        p.resize(settings(2, 100));
        let got = waiter.await.unwrap().expect("the grown pool serves the waiter before its timeout");
        assert_ne!(got, held_pid, "a new connection on the new slot");
        let fourth = p.checkout().await.unwrap(); // the new connection, idle again
        p.resize(settings(1, 100));
        third.release();
        assert!(p.try_checkout().is_none(), "the first slot back is taken out of circulation");
        fourth.release();
        let last = p.try_checkout().expect("one slot left after the shrink");
        assert!(p.try_checkout().is_none(), "only one");
        last.release();
    });
}
