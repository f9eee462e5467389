//! Read/write routing against a real primary and streaming replica: classification end to
//! end, transactions, hints and rules, read-your-writes, lag, and a replica failing under load.

use std::time::{Duration, Instant};

use pgrouter::router::Target;
use pgrouter::router::classify::TxModes;
use tokio_postgres::types::Type;

use crate::harness::{
    APP_PASSWORD, APP_USER, Env, EnvOptions, assert_ok, connect, describe, frontend_message, runtime, stdout,
    wait_until,
};

/// An environment with a replica, quick health checks and extra databases.
fn replica_env(proxy: &str, databases: &str, pg_conf: &[&str]) -> Env {
    let mut conf = vec!["max_connections = 150".to_owned()];
    conf.extend(pg_conf.iter().map(|s| (*s).to_owned()));
    Env::start(EnvOptions {
        replica: true,
        proxy: if proxy.is_empty() {
            "health_check_interval = \"200ms\"\nban_time = \"1s\"".to_owned()
        } else {
            proxy.to_owned()
        },
        databases: databases.to_owned(),
        pg_conf: conf,
        ..EnvOptions::default()
    })
}

/// A database entry on the test topology (primary + replica) with extra settings.
fn database(name: &str, routing: &str) -> String {
    format!(
        "\n[[databases]]\nname = \"{name}\"\nserver_database = \"app\"\npool_size = 4\n[databases.routing]\n{routing}\n\
         [[databases.shards]]\nprimary = \"{{PRIMARY}}\"\nreplicas = [\"{{REPLICA}}\"]\n"
    )
}

/// Through pgrouter with psql: the single value the statement returns.
fn value(env: &Env, db: &str, sql: &str) -> String {
    let out = env.proxy.psql(db, &["-qAt", "-c", sql]);
    assert_ok(&out, sql);
    stdout(&out).trim().to_owned()
}

/// Waits until the replica has replayed everything the primary has written so far.
pub fn wait_replica_caught_up(env: &Env) {
    let target = env.primary_sql("select pg_current_wal_lsn()");
    let replica = env.topo.replica.as_ref().expect("replica");
    let caught_up = wait_until(Duration::from_secs(20), || {
        replica.psql("postgres", &format!("select pg_last_wal_replay_lsn() >= '{target}'::pg_lsn")).ok().as_deref()
            == Some("t")
    });
    assert!(caught_up, "the replica did not replay up to {target}");
}

/// Waits until reads through `db` reach the replica (its first health check passed).
fn wait_replica_in_rotation(env: &Env, db: &str) {
    // before the first health check a database with replica_fallback = "error" refuses reads
    let ok = wait_until(Duration::from_secs(20), || {
        stdout(&env.proxy.psql(db, &["-qAt", "-c", "select pg_is_in_recovery()"])).trim() == "t"
    });
    assert!(ok, "reads never reached the replica");
}

#[test]
fn reads_go_to_the_replica_and_writes_to_the_primary() {
    let rule = "[[databases.routing.rules]]\npattern = \"(?i)as forced_to_primary\"\nroute = \"primary\"\n";
    let env = replica_env("", &database("ruled", rule), &[]);
    assert_ok(
        &env.proxy.psql("app", &["-c", "create table t (id serial primary key, v int); create sequence s"]),
        "DDL",
    );
    wait_replica_caught_up(&env);
    wait_replica_in_rotation(&env, "app");
    let on = |sql: &str| value(&env, "app", sql);
    // writes: each would fail on the standby, and reports where it ran
    assert_eq!(on("insert into t (v) values (1) returning pg_is_in_recovery()"), "f");
    assert_eq!(on("update t set v = 2 returning pg_is_in_recovery()"), "f");
    assert_eq!(on("with d as (delete from t where id < 0 returning 1) select pg_is_in_recovery()"), "f");
    assert_eq!(on("select pg_is_in_recovery() from t for update"), "f");
    assert_eq!(
        on("select pg_is_in_recovery() from t for no key update"),
        "f",
        "sqlparser cannot parse this: fails closed"
    );
    assert_eq!(on("select nextval('s') > 0 and not pg_is_in_recovery()"), "t");
    assert_ok(&env.proxy.psql("app", &["-c", "select pg_is_in_recovery() as r into t_into"]), "SELECT INTO");
    assert_ok(&env.proxy.psql("app", &["-c", "create table t_ddl (a int); drop table t_ddl"]), "DDL");
    assert_eq!(on("delete from t where id < 0 returning 1"), "");
    wait_replica_caught_up(&env);
    // reads
    assert_eq!(on("select pg_is_in_recovery()"), "t");
    assert_eq!(on("select r from t_into"), "f", "SELECT INTO ran on the primary");
    assert_eq!(on("/* pgrouter: route=primary */ select pg_is_in_recovery()"), "f", "hint");
    assert_eq!(value(&env, "ruled", "select pg_is_in_recovery() as forced_to_primary"), "f", "rule");
    assert_eq!(value(&env, "ruled", "select pg_is_in_recovery() as free"), "t");
    // SET pgrouter.route is answered by pgrouter and sticks to the session
    let out = env.proxy.psql(
        "app",
        &[
            "-At",
            "-c",
            "set pgrouter.route = 'primary'",
            "-c",
            "show pgrouter.route",
            "-c",
            "select pg_is_in_recovery()",
            "-c",
            "reset pgrouter.route",
            "-c",
            "select pg_is_in_recovery()",
        ],
    );
    assert_ok(&out, "SET pgrouter.route");
    assert_eq!(
        stdout(&out).split_whitespace().filter(|w| !matches!(*w, "SET" | "RESET")).collect::<Vec<_>>(),
        ["primary", "f", "t"]
    );

    let url = env.proxy.url(APP_USER, APP_PASSWORD, "app");
    runtime().block_on(async {
        let mut c = connect(&url).await.unwrap();
        let recovery = |rows: Vec<tokio_postgres::SimpleQueryMessage>| {
            rows.into_iter()
                .find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap().to_owned()),
                    _ => None,
                })
                .unwrap()
        };
        // a read-write transaction runs on the primary, held BEGIN and all
        c.simple_query("BEGIN").await.unwrap();
        assert_eq!(recovery(c.simple_query("select pg_is_in_recovery()").await.unwrap()), "f");
        c.simple_query("update t set v = v + 1").await.unwrap();
        c.simple_query("COMMIT").await.unwrap();
        // read-only transactions run on the replica, however they are written (a client that
        // has not written: read-your-writes would rightly keep this one on the primary for a
        // moment; a standby refuses SERIALIZABLE, so the DEFERRABLE form uses REPEATABLE READ)
        let writer = std::mem::replace(&mut c, connect(&url).await.unwrap());
        for begin in [
            "BEGIN READ ONLY",
            "START TRANSACTION READ ONLY",
            "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY, DEFERRABLE",
        ] {
            c.simple_query(begin).await.unwrap();
            assert_eq!(recovery(c.simple_query("select pg_is_in_recovery()").await.unwrap()), "t", "{begin}");
            c.simple_query("COMMIT").await.unwrap();
        }
        c.simple_query("BEGIN").await.unwrap();
        c.simple_query("SET TRANSACTION READ ONLY").await.unwrap();
        assert_eq!(
            recovery(c.simple_query("select pg_is_in_recovery()").await.unwrap()),
            "t",
            "SET TRANSACTION READ ONLY"
        );
        c.simple_query("ROLLBACK").await.unwrap();
        // inside a transaction on a server, SET pgrouter.route is still pgrouter's, never the server's
        c.simple_query("BEGIN").await.unwrap();
        c.simple_query("select 1").await.unwrap();
        c.simple_query("SET pgrouter.route = 'primary'").await.unwrap();
        let seen = recovery(
            c.simple_query("select coalesce(current_setting('pgrouter.route', true), 'unset')").await.unwrap(),
        );
        assert_eq!(seen, "unset", "the server saw SET pgrouter.route");
        c.simple_query("COMMIT").await.unwrap();
        assert_eq!(recovery(c.simple_query("SHOW pgrouter.route").await.unwrap()), "primary");
        assert_eq!(recovery(c.simple_query("select pg_is_in_recovery()").await.unwrap()), "f");
        c.simple_query("RESET pgrouter.route").await.unwrap();
        // behind a comment it is still pgrouter's; prepared, or for another pgrouter setting,
        // it is refused, never passed to the server
        c.simple_query("/* c */ SET pgrouter.route TO replica").await.unwrap();
        assert_eq!(recovery(c.simple_query("show pgrouter.route").await.unwrap()), "replica");
        c.simple_query("RESET pgrouter.route").await.unwrap();
        let prepared = c.query("SHOW pgrouter.route", &[]).await.map_err(|e| format!("{e:?}"));
        assert!(prepared.as_ref().is_err_and(|e| e.contains("as a simple query")), "{prepared:?}");
        let other = c.simple_query("SET pgrouter.nope = 1").await.map_err(|e| format!("{e:?}"));
        assert!(other.as_ref().is_err_and(|e| e.contains("pgrouter.nope")), "{other:?}");
        // pipelined requests are routed one by one: a write behind a read still reaches the primary
        let p = connect(&url).await.unwrap(); // no earlier write: read-your-writes stays out of it
        let (read, write) = tokio::join!(
            p.simple_query("select pg_is_in_recovery()"),
            p.simple_query("insert into t (v) values (7) returning pg_is_in_recovery()")
        );
        assert_eq!(recovery(read.unwrap()), "t");
        assert_eq!(recovery(write.unwrap()), "f");
        // an empty held transaction never touches a server
        c.simple_query("BEGIN; COMMIT").await.unwrap();
        c.simple_query("BEGIN").await.unwrap();
        c.simple_query("ROLLBACK").await.unwrap();
        // the extended protocol routes the same way
        let c = writer;
        let reader = connect(&url).await.unwrap();
        let rows = reader.query_typed("select pg_is_in_recovery()", &[]).await.unwrap();
        assert!(rows[0].get::<_, bool>(0));
        let rows = c
            .query_typed("insert into t (v) values ($1) returning pg_is_in_recovery()", &[(&5i32, Type::INT4)])
            .await
            .unwrap();
        assert!(!rows[0].get::<_, bool>(0));
        // a tokio-postgres transaction (BEGIN as a simple query, then extended statements)
        let mut c = c;
        let tx = c.transaction().await.unwrap();
        let rows = tx.query_typed("select pg_is_in_recovery()", &[]).await.unwrap();
        assert!(!rows[0].get::<_, bool>(0), "read-write transaction on the primary");
        tx.commit().await.unwrap();
    });
}

/// An error pgrouter raises inside a transaction it holds aborts the transaction, as
/// PostgreSQL would: the COMMIT that follows rolls back.
#[test]
fn proxy_errors_abort_the_held_transaction() {
    let env = replica_env("", "", &[]);
    assert_ok(&env.proxy.psql("app", &["-c", "create table aborted (id int)"]), "DDL");
    let url = env.proxy.url(APP_USER, APP_PASSWORD, "app");
    runtime().block_on(async {
        let c = connect(&url).await.unwrap();
        c.simple_query("BEGIN").await.unwrap();
        let err = c.simple_query("/* pgrouter: shard=9 */ insert into aborted values (1)").await.unwrap_err();
        assert!(describe(&err).starts_with("22023") && describe(&err).contains("shard=9"), "{}", describe(&err));
        let err = c.simple_query("insert into aborted values (2)").await.unwrap_err();
        assert!(describe(&err).starts_with("25P02"), "{}", describe(&err));
        c.simple_query("COMMIT").await.unwrap();
        // and the session is usable afterwards
        c.simple_query("insert into aborted values (3)").await.unwrap();
    });
    assert_eq!(env.primary_sql("select string_agg(id::text, ',') from aborted"), "3");
}

/// A misconfigured "primary" that is in fact a standby: writes are refused with a clear
/// error instead of being sent.
#[test]
fn writes_are_never_sent_to_a_server_in_recovery() {
    let backwards = "\n[[databases]]\nname = \"backwards\"\nserver_database = \"app\"\n[[databases.shards]]\nprimary = \"{REPLICA}\"\n";
    let env = replica_env("", backwards, &[]);
    let url = env.proxy.url(APP_USER, APP_PASSWORD, "backwards");
    runtime().block_on(async {
        let c = connect(&url).await.unwrap();
        let mut refused = None;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            match c.simple_query("create table never (a int)").await {
                Err(e) if describe(&e).contains("refusing to send a write") => {
                    refused = Some(describe(&e));
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await, // not checked yet: the standby itself refuses
                Ok(_) => panic!("a write succeeded on a standby"),
            }
        }
        let refused = refused.expect("pgrouter refused the write itself");
        assert!(refused.starts_with("25006"), "{refused}");
        // reads are fine
        let rows = c.query_typed("select 1", &[]).await.unwrap();
        assert_eq!(rows[0].get::<_, i32>(0), 1);
    });
}

/// A route forced to the primary (`SET pgrouter.route`, a hint) says nothing about writing:
/// only a statement that may write makes the client's next reads follow it there. With
/// primary_after_write and a long max_replica_lag the window after a write is certain, so a
/// forced read that counted as a write would fail this at once.
#[test]
fn a_read_forced_to_the_primary_is_not_a_write() {
    let env = Env::start(EnvOptions {
        replica: true,
        proxy: "health_check_interval = \"200ms\"\nban_time = \"1s\"".into(),
        databases: database("after_write", "read_your_writes = \"primary_after_write\"\nmax_replica_lag = \"60s\""),
        users: crate::operations::trusted_user(),
        pg_conf: vec!["max_connections = 150".into()],
        ..EnvOptions::default()
    });
    assert_ok(&env.proxy.psql("app", &["-c", "create table forced (v int)"]), "DDL");
    wait_replica_caught_up(&env);
    wait_replica_in_rotation(&env, "after_write");
    let reads = [
        // a read on the replica first: pg_is_in_recovery's volatility is then known
        "select pg_is_in_recovery()",
        "set pgrouter.route = 'primary'",
        "select pg_is_in_recovery()",
        "reset pgrouter.route",
        "select pg_is_in_recovery()",
        "/* pgrouter: route=primary */ select pg_is_in_recovery()",
        "select pg_is_in_recovery()",
        "/* pgrouter: route=primary */ insert into forced values (1) returning pg_is_in_recovery()",
        "select pg_is_in_recovery()",
    ];
    let args: Vec<&str> = ["-qAt"].into_iter().chain(reads.iter().flat_map(|sql| ["-c", *sql])).collect();
    let out = env.proxy.psql("after_write", &args);
    assert_ok(&out, "forced routes");
    let printed = stdout(&out);
    let answers: Vec<&str> = printed.split_whitespace().collect();
    // replica; forced; replica again; hinted; replica again; a hinted write; read-your-writes
    assert_eq!(answers, ["t", "f", "t", "f", "t", "f", "f"]);

    // a FunctionCall has no text to judge: under a forced route it counts as a write
    use std::io::Write;
    let oid: u32 = value(&env, "after_write", "select 'pg_is_in_recovery'::regproc::oid").parse().unwrap();
    let (mut raw, _, _) = crate::operations::raw_login_to(env.proxy.port, "after_write");
    // no argument format codes, no arguments, a text result
    let call = frontend_message(b'F', &[&oid.to_be_bytes()[..], &[0, 0, 0, 0, 0, 0]].concat());
    let query = |sql: &str| frontend_message(b'Q', format!("{sql}\0").as_bytes());
    let mut ask = |bytes: &[u8]| {
        raw.write_all(bytes).unwrap();
        let mut got = Vec::new();
        loop {
            match crate::operations::read_message(&mut raw) {
                (b'Z', _) => return got,
                (b'E', body) => panic!("{}", String::from_utf8_lossy(&body)),
                (b'D' | b'V', body) => got.push(body[body.len() - 1]),
                _ => {}
            }
        }
    };
    assert_eq!(ask(&query("select pg_is_in_recovery()")), [b't']);
    ask(&query("set pgrouter.route = 'primary'"));
    assert_eq!(ask(&call), [b'f'], "the call ran on the primary");
    ask(&query("reset pgrouter.route"));
    assert_eq!(ask(&query("select pg_is_in_recovery()")), [b'f'], "read-your-writes after the call");
}

/// Insert a row, read it back at once, 1,000 times. With read_your_writes = lsn or
/// primary_after_write every read sees its row although the replica applies WAL 500 ms late;
/// with off, stale reads happen (so the test can fail).
#[test]
fn read_your_writes_on_a_delayed_replica() {
    let dbs = [("ryw_lsn", "lsn"), ("ryw_paw", "primary_after_write"), ("ryw_off", "off")]
        .iter()
        .map(|(name, mode)| database(name, &format!("read_your_writes = \"{mode}\"")))
        .collect::<String>();
    let env = replica_env("", &dbs, &["recovery_min_apply_delay = '500ms'"]);
    assert_ok(&env.proxy.psql("app", &["-c", "create table ryw (mode text, id int, primary key (mode, id))"]), "DDL");
    wait_replica_caught_up(&env);
    for (db, _) in [("ryw_lsn", ()), ("ryw_paw", ()), ("ryw_off", ())] {
        wait_replica_in_rotation(&env, db);
    }
    let rt = runtime();
    let mut stale = Vec::new();
    for db in ["ryw_lsn", "ryw_paw", "ryw_off"] {
        let url = env.proxy.url(APP_USER, APP_PASSWORD, db);
        let misses = rt.block_on(async {
            let c = connect(&url).await.unwrap();
            let mut misses = 0;
            for i in 0..1000i32 {
                c.query_typed("insert into ryw values ($1, $2)", &[(&db, Type::TEXT), (&i, Type::INT4)]).await.unwrap();
                let rows = c
                    .query_typed(
                        "select count(*) from ryw where mode = $1 and id = $2",
                        &[(&db, Type::TEXT), (&i, Type::INT4)],
                    )
                    .await
                    .unwrap();
                if rows[0].get::<_, i64>(0) != 1 {
                    misses += 1;
                }
            }
            misses
        });
        eprintln!("measured: read_your_writes via {db}: {misses} of 1000 reads missed the row just written");
        stale.push(misses);
    }
    assert_eq!(stale[0], 0, "lsn: stale reads");
    assert_eq!(stale[1], 0, "primary_after_write: stale reads");
    assert!(stale[2] > 0, "off: no stale read observed, so the test proves nothing");
    // with lsn, reads return to the replica once it has replayed the client's writes
    wait_replica_in_rotation(&env, "ryw_lsn");
}

/// A replica lagging beyond max_replica_lag is skipped; when it catches up, reads return.
#[test]
fn lagging_replica_is_skipped_until_it_catches_up() {
    let env = replica_env("", &database("lagged", "max_replica_lag = \"1s\""), &["recovery_min_apply_delay = '4s'"]);
    assert_ok(&env.proxy.psql("app", &["-c", "create table ticks (at timestamptz default now())"]), "DDL");
    wait_replica_caught_up(&env);
    wait_replica_in_rotation(&env, "lagged");
    let url = env.proxy.url(APP_USER, APP_PASSWORD, "app");
    let rt = runtime();
    let writer = rt.spawn(async move {
        let c = connect(&url).await.unwrap();
        for _ in 0..300 {
            c.simple_query("insert into ticks default values").await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let started = Instant::now();
    let skipped = wait_until(Duration::from_secs(15), || value(&env, "lagged", "select pg_is_in_recovery()") == "f");
    assert!(skipped, "reads kept going to a replica 4s behind");
    eprintln!("measured: lagging replica skipped after {:?}", started.elapsed());
    assert!(env.proxy.log().contains("exceeds max_replica_lag"), "no log line gives the reason");
    let replica = env.topo.replica.as_ref().unwrap();
    replica.psql("postgres", "alter system set recovery_min_apply_delay = 0").unwrap();
    replica.psql("postgres", "select pg_reload_conf()").unwrap();
    let started = Instant::now();
    let back = wait_until(Duration::from_secs(15), || value(&env, "lagged", "select pg_is_in_recovery()") == "t");
    assert!(back, "reads did not return to the replica after it caught up");
    eprintln!("measured: caught-up replica back in rotation after {:?}", started.elapsed());
    writer.abort();
}

#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Replica,
    Primary,
    Failed(String),
}

/// 16 clients read while the replica is stopped with -m immediate and restarted: in-flight
/// statements fail with a clear error (no hang), later ones succeed on the primary, and the
/// replica is back in rotation soon after it restarts.
#[test]
fn replica_failure_under_read_load() {
    const INTERVAL: Duration = Duration::from_millis(300);
    let env = replica_env("health_check_interval = \"300ms\"\nban_time = \"300ms\"", "", &[]);
    wait_replica_in_rotation(&env, "app");
    let url = env.proxy.url(APP_USER, APP_PASSWORD, "app");
    let rt = runtime();
    let epoch = Instant::now();
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let url = url.clone();
            rt.spawn(async move {
                let c = connect(&url).await.unwrap();
                let mut log = Vec::new();
                while epoch.elapsed() < Duration::from_secs(9) {
                    let started = epoch.elapsed();
                    let q = c.query_typed("select pg_is_in_recovery(), pg_sleep(0.02)", &[]);
                    let outcome = match tokio::time::timeout(Duration::from_secs(5), q).await {
                        Err(_) => Outcome::Failed("hung for 5s".into()),
                        Ok(Ok(rows)) if rows[0].get::<_, bool>(0) => Outcome::Replica,
                        Ok(Ok(_)) => Outcome::Primary,
                        Ok(Err(e)) => Outcome::Failed(describe(&e)),
                    };
                    log.push((started, epoch.elapsed(), outcome));
                }
                log
            })
        })
        .collect();
    let replica = env.topo.replica.as_ref().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let stopped_at = epoch.elapsed();
    replica.halt();
    std::thread::sleep(Duration::from_secs(3));
    // the replica may serve before start() returns: the primary-only window ends here
    let restarting_at = epoch.elapsed();
    replica.start().expect("restart replica");
    let restarted_at = epoch.elapsed();
    let logs: Vec<_> = clients.into_iter().flat_map(|h| rt.block_on(h).unwrap()).collect();

    let failures: Vec<_> = logs
        .iter()
        .filter_map(|(s, e, o)| match o {
            Outcome::Failed(m) => Some((s, e, m)),
            _ => None,
        })
        .collect();
    for (_, _, message) in &failures {
        assert!(message.starts_with("08006"), "unclear error: {message}");
    }
    let last_failure_start = failures.iter().map(|(s, _, _)| **s).max().unwrap_or(stopped_at);
    assert!(
        last_failure_start < stopped_at + 4 * INTERVAL,
        "statements kept failing {:?} after the stop",
        last_failure_start - stopped_at
    );
    let after_ban: Vec<_> = logs.iter().filter(|(s, _, _)| *s > last_failure_start && *s < restarting_at).collect();
    assert!(
        !after_ban.is_empty() && after_ban.iter().all(|(_, _, o)| *o == Outcome::Primary),
        "statements after the ban must succeed on the primary"
    );
    let back = logs
        .iter()
        .filter(|(s, _, o)| *s > restarted_at && *o == Outcome::Replica)
        .map(|(s, _, _)| *s)
        .min()
        .expect("replica never back");
    let total = logs.len();
    eprintln!(
        "measured: {total} statements; {} failed (all 08006) within {:?} of the stop; replica back {:?} after its restart (health_check_interval {INTERVAL:?})",
        failures.len(),
        last_failure_start.saturating_sub(stopped_at),
        back - restarted_at
    );
    assert!(
        back - restarted_at <= 2 * INTERVAL + Duration::from_millis(300),
        "replica back only after {:?}",
        back - restarted_at
    );
}

/// Where the library says an entry of the corpus goes, given the transaction it is in.
fn predicted_target(
    policy: &pgrouter::router::Policy,
    router: &pgrouter::router::Router,
    env: &Env,
    sql: &str,
    in_tx: &mut Option<(TxModes, Option<Target>)>,
) -> Target {
    use pgrouter::router::classify::{Access, TxControl};
    use pgrouter::router::hint::Hints;
    use pgrouter::router::policy::{Undecided, volatility_query};
    let class = router.classify(sql.as_bytes(), &mut pgrouter::router::shape::Shape::default());
    match (class.tx, in_tx.as_mut()) {
        (Some(TxControl::Begin { modes, .. }), None) => {
            *in_tx = Some((modes, None));
            return Target::Primary; // held: answered by pgrouter
        }
        (Some(TxControl::SetTransaction { modes }), Some((held, None))) => {
            *held = held.then(modes);
            return Target::Primary; // still held
        }
        (Some(TxControl::End { .. }), Some((_, target))) => {
            let target = target.unwrap_or(Target::Primary);
            *in_tx = None;
            return target;
        }
        (_, Some((_, Some(target)))) => return *target,
        (_, Some((modes, chosen @ None))) => {
            let on_standby = modes.on_standby() && class.access == Access::Read;
            let target = policy.transaction(on_standby, &Hints::default(), None, None).target;
            *chosen = Some(target);
            return target;
        }
        _ => {}
    }
    loop {
        match policy.decide(sql.as_bytes(), &class, &Hints::default(), None, None) {
            Ok(d) => return d.target,
            Err(Undecided::NeedVolatility(names)) => {
                let rows = env.primary_sql(&format!(
                    "select string_agg(name || '=' || v::text, ',') from ({}) x(name, v)",
                    volatility_query(&names)
                ));
                policy.learn_volatility(
                    rows.split(',').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_owned(), v == "true")),
                );
                policy.learn_volatility(policy.unknown_functions(&names).into_iter().map(|n| (n, false)));
            }
            Err(e) => panic!("{sql}: {e:?}"),
        }
    }
}

/// The misroute oracle: every corpus entry runs through pgrouter in order; whatever the
/// classifier sends to the standby must run there without a read-only error (25006), and no
/// entry may fail at all. Reads have no fallback (replica_fallback = "error") and the test
/// waits for the standby to replay each write, so reads really run on the standby.
#[test]
fn misroute_oracle() {
    let routing = "read_your_writes = \"off\"\nreplica_fallback = \"error\"\n\
                   write_functions = [\"audit_log\"]\nread_only_functions = [\"cheap_volatile\"]";
    let env = replica_env("", &database("oracle", routing), &[]);
    wait_replica_in_rotation(&env, "oracle");
    let config = pgrouter::config::Config::load(&env.proxy.config_path()).unwrap();
    let policy = pgrouter::router::Policy::new(config.database("oracle").unwrap());
    let router = pgrouter::router::Router::new(4096);
    let corpus = include_str!("corpus/routing.sql");
    let entries: Vec<&str> = corpus.split("\n---\n").map(str::trim).filter(|e| !e.is_empty()).collect();
    assert!(entries.len() >= 300, "only {} corpus entries", entries.len());

    let url = env.proxy.url(APP_USER, APP_PASSWORD, "oracle");
    let rt = runtime();
    let client = rt.block_on(connect(&url)).unwrap();
    let (mut to_replica, mut to_primary, mut misroutes, mut failures) = (0, 0, Vec::new(), Vec::new());
    let mut in_tx = None;
    for entry in &entries {
        let was_in_tx = in_tx.is_some();
        let target = predicted_target(&policy, &router, &env, entry, &mut in_tx);
        let result = run_entry(&env, &rt, &client, entry, was_in_tx);
        match target {
            Target::Replica => to_replica += 1,
            _ => to_primary += 1,
        }
        match result {
            Ok(()) => {}
            Err(e) if e.starts_with("25006") || e.contains("ERROR:  25006") => {
                misroutes.push(format!("{entry}\n  -> {e}"))
            }
            Err(e) => failures.push(format!("{entry}\n  -> {e}")),
        }
        if target != Target::Replica && in_tx.is_none() {
            wait_replica_caught_up(&env);
        }
    }
    eprintln!(
        "measured: misroute oracle: {} entries, {to_replica} sent to the replica, {to_primary} to the primary, {} misroutes",
        entries.len(),
        misroutes.len()
    );
    assert!(misroutes.is_empty(), "misroutes:\n{}", misroutes.join("\n"));
    assert!(failures.is_empty(), "entries failed:\n{}", failures.join("\n"));
    assert!(to_replica >= 100, "too few reads to prove anything: {to_replica}");
}

/// Runs one corpus entry. COPY goes through psql (COPY FROM STDIN with no rows): psql runs it
/// with the simple protocol, while tokio-postgres would prepare a named statement, which
/// transaction pooling cannot carry across transactions yet. Everything else runs as a
/// simple query on the oracle's client, so transaction blocks spanning entries hold. Errors
/// come back as "SQLSTATE: message".
fn run_entry(
    env: &Env,
    rt: &tokio::runtime::Runtime,
    client: &tokio_postgres::Client,
    entry: &str,
    in_tx: bool,
) -> Result<(), String> {
    let upper = entry.to_ascii_uppercase();
    if upper.contains("COPY ") && (upper.contains("STDIN") || upper.contains("STDOUT")) {
        assert!(!in_tx, "corpus: a COPY entry inside a transaction block spanning entries: {entry}");
        let out =
            env.proxy.psql("oracle", &["-X", "-q", "-v", "ON_ERROR_STOP=1", "-v", "VERBOSITY=sqlstate", "-c", entry]);
        let err = crate::harness::stderr(&out);
        return if out.status.success() {
            Ok(())
        } else {
            Err(err.trim().trim_start_matches("ERROR:").trim().to_owned())
        };
    }
    rt.block_on(client.simple_query(entry)).map(drop).map_err(|e| describe(&e))
}
