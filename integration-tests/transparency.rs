//! Transaction pooling must be invisible: session settings follow their client and never
//! leak to another, state that cannot move pins the client, cancel reaches the right query.

use std::time::{Duration, Instant};

use tokio_postgres::SimpleQueryMessage;

use crate::harness::{
    APP_PASSWORD, APP_USER, Env, EnvOptions, assert_ok, connect, describe, runtime, stdout, wait_until,
};

/// The first value of the first row of a simple query.
async fn one(c: &tokio_postgres::Client, sql: &str) -> String {
    c.simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {}", describe(&e)))
        .into_iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("NULL").to_owned()),
            _ => None,
        })
        .unwrap_or_default()
}

/// One client's SET search_path follows it through 100 transactions over a pool of 2, while
/// 8 other clients on the same server connections never see it.
#[test]
fn settings_follow_their_client_and_never_leak() {
    let env = Env::start(EnvOptions { pool_size: 2, ..EnvOptions::default() });
    assert_ok(
        &env.proxy.psql(
            "app",
            &["-c", "create schema s1; create table s1.marker (v text); insert into s1.marker values ('s1')"],
        ),
        "schema",
    );
    let url = env.proxy.url(APP_USER, APP_PASSWORD, "app");
    let rt = runtime();
    rt.block_on(async {
        let setter = connect(&url).await.unwrap();
        setter.simple_query("SET search_path = s1, public").await.unwrap();
        let others: Vec<_> = (0..8)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move {
                    let c = connect(&url).await.unwrap();
                    let mut leaks = 0;
                    for _ in 0..100 {
                        if one(&c, "show search_path").await.contains("s1") {
                            leaks += 1;
                        }
                        c.simple_query("begin; select 1; commit").await.unwrap();
                    }
                    leaks
                })
            })
            .collect();
        for i in 0..100 {
            let tx = format!("begin; select v from marker; select {i}; commit");
            let seen = one(&setter, &tx).await;
            assert_eq!(seen, "s1", "transaction {i} did not see search_path s1");
        }
        let mut leaks = 0;
        for o in others {
            leaks += o.await.unwrap();
        }
        eprintln!("measured: 100 transactions saw search_path s1; 800 reads by 8 other clients on the same 2 connections saw it {leaks} times");
        assert_eq!(leaks, 0, "search_path leaked to other clients");
        // RESET brings the default back for this client
        setter.simple_query("RESET search_path").await.unwrap();
        assert!(!one(&setter, "show search_path").await.contains("s1"));
    });
}

#[test]
fn set_local_reset_all_set_config_and_rollback() {
    let env = Env::start(EnvOptions { pool_size: 1, ..EnvOptions::default() });
    let url = env.proxy.url(APP_USER, APP_PASSWORD, "app");
    runtime().block_on(async {
        let a = connect(&url).await.unwrap();
        let b = connect(&url).await.unwrap();
        // SET LOCAL ends with its transaction
        a.simple_query("begin; set local work_mem = '7MB'").await.unwrap();
        assert_eq!(one(&a, "show work_mem").await, "7MB");
        a.simple_query("commit").await.unwrap();
        assert_eq!(one(&a, "show work_mem").await, "4MB");
        // a SET inside a rolled-back transaction is undone
        a.simple_query("begin; set work_mem = '9MB'; rollback").await.unwrap();
        assert_eq!(one(&a, "show work_mem").await, "4MB");
        // set_config(..., false) sticks to the client only
        one(&a, "select set_config('statement_timeout', '12s', false)").await;
        assert_eq!(one(&a, "show statement_timeout").await, "12s");
        assert_eq!(one(&b, "show statement_timeout").await, "0", "b shares the only server connection");
        assert_eq!(one(&a, "show statement_timeout").await, "12s");
        // RESET ALL and DISCARD ALL clear it
        a.simple_query("set timezone = 'Asia/Tokyo'; reset all").await.unwrap();
        assert_eq!(one(&a, "show statement_timeout").await, "0");
        a.simple_query("set timezone = 'Asia/Tokyo'").await.unwrap();
        a.simple_query("discard all").await.unwrap();
        assert_ne!(one(&a, "show timezone").await, "Asia/Tokyo");
    });
}

/// Settings made by any statement of a transaction (not only its first request), custom
/// settings (`myapp.x`) and `SET ROLE` follow their client and never reach another; LISTEN
/// later in a transaction pins.
#[test]
fn later_statements_custom_settings_and_role_follow_their_client() {
    let env = Env::start(EnvOptions { pool_size: 1, ..EnvOptions::default() });
    env.primary_sql("create role reader; grant reader to app");
    let url = env.proxy.url(APP_USER, APP_PASSWORD, "app");
    runtime().block_on(async {
        let a = connect(&url).await.unwrap();
        let b = connect(&url).await.unwrap();
        a.simple_query("begin").await.unwrap();
        one(&a, "select 1").await;
        a.simple_query("set search_path = later_in_tx").await.unwrap();
        a.simple_query("set myapp.tenant = 'a'").await.unwrap();
        a.simple_query("commit").await.unwrap();
        a.simple_query("set role reader").await.unwrap();
        one(&a, "select set_config('myapp.user', 'alice', false)").await;
        for _ in 0..3 {
            assert_eq!(one(&b, "show search_path").await, "\"$user\", public", "b shares the only connection");
            assert_eq!(one(&b, "select coalesce(current_setting('myapp.tenant', true), '')").await, "");
            assert_eq!(one(&b, "select coalesce(current_setting('myapp.user', true), '')").await, "");
            assert_eq!(one(&b, "select current_user").await, "app");
            assert_eq!(one(&a, "show search_path").await, "later_in_tx");
            assert_eq!(one(&a, "select current_setting('myapp.tenant')").await, "a");
            assert_eq!(one(&a, "select current_setting('myapp.user')").await, "alice");
            assert_eq!(one(&a, "select current_user").await, "reader");
        }
        a.simple_query("reset role; reset myapp.tenant").await.unwrap();
        assert_eq!(one(&a, "select current_user").await, "app");
        assert_eq!(one(&a, "select coalesce(current_setting('myapp.tenant', true), '')").await, "");
        // LISTEN as a later statement of a transaction pins too
        a.simple_query("begin").await.unwrap();
        one(&a, "select 1").await;
        a.simple_query("listen later_channel").await.unwrap();
        a.simple_query("commit").await.unwrap();
    });
    assert!(
        wait_until(Duration::from_secs(5), || env.proxy.log().contains("pinned_clients=1")),
        "LISTEN inside a transaction did not pin"
    );
}

/// The same statement text means different tables under different search_paths
/// (schema-per-tenant), and a statement prepared again after DDL gets a fresh plan.
#[test]
fn prepared_statements_respect_search_path_and_schema_changes() {
    let env = Env::start(EnvOptions { pool_size: 1, ..EnvOptions::default() });
    let setup = "create schema ta; create schema tb; create table ta.t (x int); create table tb.t (x int, y text); \
                 insert into ta.t values (1); insert into tb.t values (2, 'b'); create table alt (x int); insert into alt values (1)";
    assert_ok(&env.proxy.psql("app", &["-c", setup]), "schemas");
    let url = env.proxy.url(APP_USER, APP_PASSWORD, "app");
    runtime().block_on(async {
        let a = connect(&url).await.unwrap();
        let b = connect(&url).await.unwrap();
        a.simple_query("set search_path = ta").await.unwrap();
        b.simple_query("set search_path = tb").await.unwrap();
        for _ in 0..3 {
            let rows = a.query("select * from t", &[]).await.map_err(|e| describe(&e)).unwrap();
            assert_eq!((rows[0].len(), rows[0].get::<_, i32>(0)), (1, 1), "a reads ta.t");
            let rows = b.query("select * from t", &[]).await.map_err(|e| describe(&e)).unwrap();
            assert_eq!((rows[0].len(), rows[0].get::<_, i32>(0)), (2, 2), "b reads tb.t");
        }
        let stmt = a.prepare("select * from public.alt").await.unwrap();
        assert_eq!(a.query(&stmt, &[]).await.unwrap()[0].len(), 1);
        a.simple_query("alter table public.alt add column y text default 'y'").await.unwrap();
        drop(stmt);
        let rows = a.query("select * from public.alt", &[]).await.map_err(|e| describe(&e)).unwrap();
        assert_eq!(rows[0].len(), 2, "prepared again after the ALTER: the new column is there");
    });
}

/// Startup parameters (application_name, options -c ...) follow the client to every
/// server connection, and an invalid one fails the login like PostgreSQL.
#[test]
fn startup_parameters_follow_the_client() {
    let env = Env::start(EnvOptions { pool_size: 1, ..EnvOptions::default() });
    let run = |app: &str, options: &str, sql: &str| {
        let out = crate::harness::pg_tool("psql")
            .args(["-X", "-At", "-c", sql])
            .arg(format!("{} application_name={app} options='{options}'", env.proxy.url(APP_USER, APP_PASSWORD, "app")))
            .output()
            .unwrap();
        (stdout(&out).trim().to_owned(), crate::harness::stderr(&out))
    };
    let (out, err) = run(
        "first",
        "-c search_path=pg_catalog -c DateStyle=SQL,DMY",
        "select current_setting('application_name'), current_setting('search_path'), current_setting('DateStyle')",
    );
    assert_eq!(out, "first|pg_catalog|SQL, DMY", "{err}");
    let (out, err) = run(
        "second",
        "",
        "select current_setting('application_name'), current_setting('search_path'), current_setting('DateStyle')",
    );
    assert_eq!(out, "second|\"$user\", public|ISO, MDY", "{err}");
    let (_, err) = run("third", "-c work_mem=lots", "select 1");
    assert!(err.contains("invalid startup parameter") && err.contains("work_mem"), "{err}");
}

/// LISTEN pins the client: it keeps its connection, receives NOTIFY from others, and the
/// proxy logs the pinned count. Others still share the rest of the pool.
#[test]
fn listen_pins_the_client_and_notifications_arrive() {
    let env = Env::start(EnvOptions { pool_size: 2, ..EnvOptions::default() });
    let url = env.proxy.url(APP_USER, APP_PASSWORD, "app");
    runtime().block_on(async {
        let (listener, mut conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
            use futures_util::StreamExt;
            while let Some(Ok(msg)) = stream.next().await {
                if let tokio_postgres::AsyncMessage::Notification(n) = msg {
                    let _ = tx.send(n.payload().to_owned());
                }
            }
        });
        listener.simple_query("LISTEN jobs").await.unwrap();
        let backend = one(&listener, "select pg_backend_pid()").await;
        let other = connect(&url).await.unwrap();
        for i in 0..5 {
            other.simple_query(&format!("NOTIFY jobs, 'job {i}'")).await.unwrap();
            let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("notification arrives");
            assert_eq!(got.as_deref(), Some(format!("job {i}").as_str()));
        }
        assert_eq!(one(&listener, "select pg_backend_pid()").await, backend, "the pinned client kept its connection");
    });
    assert!(env.proxy.log().contains("pinned_clients=1"), "{}", env.proxy.log());
}

/// A client cancels its own pg_sleep(30): it ends within a second with 57014. A CancelRequest
/// with a wrong secret cancels nothing.
#[test]
fn cancel_ends_the_query_and_a_wrong_secret_does_nothing() {
    use std::io::Write;
    let env = Env::start(EnvOptions::default());
    let url = env.proxy.url(APP_USER, APP_PASSWORD, "app");
    runtime().block_on(async {
        let c = connect(&url).await.unwrap();
        let pid: i32 = one(&c, "select 1").await.parse().unwrap_or(1); // warm up
        let _ = pid;
        let token = c.cancel_token();
        let sleeper = tokio::spawn(async move {
            let started = Instant::now();
            let r = c.simple_query("select pg_sleep(30)").await;
            (r, started)
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let cancelled_at = Instant::now();
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
        let (result, _) = sleeper.await.unwrap();
        let took = cancelled_at.elapsed();
        let err = result.expect_err("cancelled");
        assert!(describe(&err).starts_with("57014"), "{}", describe(&err));
        eprintln!("measured: pg_sleep(30) ended {took:?} after the cancel request");
        assert!(took < Duration::from_secs(1), "{took:?}");
    });
    // a wrong secret: the statement runs to completion
    runtime().block_on(async {
        let c = connect(&url).await.unwrap();
        let running = tokio::spawn(async move { c.simple_query("select pg_sleep(1.5)").await.map(drop) });
        tokio::time::sleep(Duration::from_millis(300)).await;
        // BackendKeyData from our own login is not exposed by tokio-postgres: forge one with
        // every pid pgrouter may have handed out and a secret that is surely wrong
        for pid in 1..64i32 {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", env.proxy.port)).unwrap();
            let mut packet = 16u32.to_be_bytes().to_vec();
            packet.extend(80_877_102u32.to_be_bytes());
            packet.extend(pid.to_be_bytes());
            packet.extend(0x5eed_u32.to_be_bytes());
            s.write_all(&packet).unwrap();
        }
        running.await.unwrap().expect("nothing cancelled the statement");
    });
    assert!(
        wait_until(Duration::from_secs(2), || env.proxy.log().contains("wrong secret")),
        "no log of the refused cancel"
    );
}

/// Named prepared statements under transaction pooling: many clients preparing once and
/// executing many times over a pool of 2, each on whichever connection it gets.
#[test]
fn named_prepared_statements_move_between_connections() {
    let env = Env::start(EnvOptions { pool_size: 2, ..EnvOptions::default() });
    let url = env.proxy.url(APP_USER, APP_PASSWORD, "app");
    let rt = runtime();
    let failures: Vec<String> = rt.block_on(async {
        let tasks: Vec<_> = (0..20i64)
            .map(|i| {
                let url = url.clone();
                tokio::spawn(async move {
                    let c = connect(&url).await.map_err(|e| describe(&e))?;
                    let double = c.prepare("select $1::int8 * 2").await.map_err(|e| describe(&e))?;
                    let text = c.prepare("select $1::text || '-' || $2::int8").await.map_err(|e| describe(&e))?;
                    for j in 0..50i64 {
                        let row = c.query_one(&double, &[&(i * 1000 + j)]).await.map_err(|e| describe(&e))?;
                        if row.get::<_, i64>(0) != 2 * (i * 1000 + j) {
                            return Err(format!("client {i}: wrong answer"));
                        }
                        let row = c.query_one(&text, &[&format!("c{i}"), &j]).await.map_err(|e| describe(&e))?;
                        if row.get::<_, String>(0) != format!("c{i}-{j}") {
                            return Err(format!("client {i}: wrong text"));
                        }
                    }
                    Ok::<_, String>(())
                })
            })
            .collect();
        let mut failures = Vec::new();
        for t in tasks {
            if let Err(e) = t.await.unwrap() {
                failures.push(e);
            }
        }
        failures
    });
    assert!(failures.is_empty(), "{failures:?}");
    // at most 2 distinct statements per server connection, whatever the number of clients
    let prepared: u32 = env
        .primary_sql("select count(*) from pg_stat_activity where usename = 'app' and application_name <> 'pgrouter health check'")
        .parse()
        .unwrap();
    assert!(prepared <= 2);
    rt.block_on(async {
        let c = connect(&url).await.unwrap();
        let s = c.prepare("select 1").await.unwrap();
        c.query_one(&s, &[]).await.unwrap();
        // DEALLOCATE ALL is honoured: the statement is gone for this client
        c.simple_query("DEALLOCATE ALL").await.unwrap();
        let err = c.query_one(&s, &[]).await.unwrap_err();
        assert!(describe(&err).starts_with("26000"), "{}", describe(&err));
        // and DISCARD ALL too
        let s = c.prepare("select 2").await.unwrap();
        c.simple_query("DISCARD ALL").await.unwrap();
        let err = c.query_one(&s, &[]).await.unwrap_err();
        assert!(describe(&err).starts_with("26000"), "{}", describe(&err));
        // a pipeline with an error in the middle follows Sync semantics
        let good = c.prepare("select 3").await.unwrap();
        let bad = c.prepare("select 1 / $1::int").await.unwrap();
        let (a, b, d) = tokio::join!(c.query_one(&good, &[]), c.query_one(&bad, &[&0i32]), c.query_one(&good, &[]));
        assert_eq!(a.unwrap().get::<_, i32>(0), 3);
        assert!(describe(&b.unwrap_err()).starts_with("22012"));
        assert_eq!(d.unwrap().get::<_, i32>(0), 3);
    });
}

/// pgbench -M prepared in transaction pooling, 16 clients over pool_size 4.
#[test]
fn pgbench_prepared_in_transaction_mode() {
    let env = Env::start(EnvOptions { pool_size: 4, ..EnvOptions::default() });
    assert_ok(&env.proxy.pgbench("app", &["-i", "-s", "1", "-q"]), "pgbench -i");
    let out = env.proxy.pgbench("app", &["-n", "-c", "16", "-j", "2", "-t", "100", "-M", "prepared"]);
    assert_ok(&out, "pgbench -M prepared");
    let text = stdout(&out);
    assert!(text.contains("number of failed transactions: 0 (0.000%)"), "{text}");
    eprintln!(
        "measured: pgbench -M prepared, transaction pooling, 16 clients over pool_size 4: {}",
        text.lines().find(|l| l.starts_with("tps")).unwrap_or("")
    );
    assert_eq!(
        env.primary_sql("select (select sum(abalance) from pgbench_accounts) = (select sum(delta) from pgbench_history), (select count(*) from pgbench_history)"),
        "t|1600"
    );
}
