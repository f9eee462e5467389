//! Faults (issue 7): a backend that accepts TCP but never answers, a backend that closes
//! mid-result, the primary restarted under write load. pgrouter reports clear errors,
//! never hangs past its timeouts, and recovers by itself.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use crate::harness::{APP_PASSWORD, APP_USER, Env, EnvOptions, connect, describe, pg_tool, runtime, stderr, stdout};

/// A database whose primary accepts connections and never says a word: the client gets a
/// clear error once server_connect_timeout passes, and other databases are unaffected.
#[test]
fn a_silent_backend_times_out() {
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let held = std::thread::spawn(move || {
        // accept and hold connections, answering nothing
        let mut kept = Vec::new();
        for stream in silent.incoming().take(8).flatten() {
            kept.push(stream);
        }
        kept
    });
    let env = Env::start(EnvOptions {
        proxy: "server_connect_timeout = \"1s\"\n".into(),
        databases: format!(
            "\n[[databases]]\nname = \"silent\"\nserver_database = \"app\"\n[[databases.shards]]\nprimary = \"{addr}\"\n"
        ),
        ..EnvOptions::default()
    });
    let started = Instant::now();
    let out = env.proxy.psql("silent", &["-c", "select 1"]);
    let took = started.elapsed();
    let err = stderr(&out);
    println!("faults: a silent backend: error after {took:?}: {}", err.trim());
    assert!(!out.status.success());
    assert!(err.contains("server_connect_timeout") || err.contains("no answer"), "{err}");
    assert!(took < Duration::from_secs(8), "bounded by the timeouts: {took:?}");
    let out = env.proxy.psql("app", &["-At", "-c", "select 1"]);
    assert_eq!(stdout(&out).trim(), "1", "other databases work: {}", stderr(&out));
    drop(env);
    drop(held);
}

/// The server closes a client's connection in the middle of a large result: the client
/// gets an error, and the next clients are served.
#[test]
fn a_backend_closing_mid_result() {
    let env = Env::start(EnvOptions::default());
    let url = env.proxy.url(APP_USER, APP_PASSWORD, "app");
    let rt = runtime();
    let streaming = rt.spawn({
        let url = url.clone();
        async move {
            let c = connect(&url).await.unwrap();
            c.simple_query("select g, repeat('x', 1000) from generate_series(1, 5000000) g -- faults_mid_result")
                .await
                .map(|_| ())
                .map_err(|e| describe(&e))
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let killed = env.primary_sql(
            "select count(pg_terminate_backend(pid)) from pg_stat_activity where query like '%faults_mid_result%' \
             and pid <> pg_backend_pid()",
        );
        if killed.trim() == "1" {
            break;
        }
        assert!(Instant::now() < deadline, "the streaming query never showed up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let outcome = rt.block_on(streaming).unwrap();
    println!("faults: mid-result close: {outcome:?}");
    assert!(outcome.is_err(), "the client is told");
    let out = env.proxy.psql("app", &["-At", "-c", "select 42"]);
    assert_eq!(stdout(&out).trim(), "42", "pgrouter serves the next client: {}", stderr(&out));
}

/// The primary restarted during pgbench: every transaction pgbench saw committed is in
/// pgbench_history (at most one more per client that was cut off), TPC-B's balances agree,
/// and pgrouter serves new clients once the primary is back.
#[test]
fn primary_restart_under_write_load() {
    let env = Env::start(EnvOptions::default());
    assert!(env.proxy.pgbench("app", &["-i", "-s", "1", "-q"]).status.success(), "pgbench -i");
    let port = env.proxy.port;
    let load = std::thread::spawn(move || {
        pg_tool("pgbench")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                APP_USER,
                "-c",
                "8",
                "-j",
                "2",
                "-T",
                "12",
                "-n",
                "app",
            ])
            .env("PGPASSWORD", APP_PASSWORD)
            .output()
            .expect("run pgbench")
    });
    std::thread::sleep(Duration::from_secs(4));
    env.topo.primary.restart().expect("restart the primary");
    let restarted = Instant::now();
    let out = load.join().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let processed: u64 = report
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .unwrap_or_else(|| panic!("no transaction count in pgbench's report:\n{report}"));
    let cut_off = report.lines().filter(|l| l.contains(" aborted in command ")).count() as u64;
    // pgrouter serves again by itself
    let mut recovered = None;
    while restarted.elapsed() < Duration::from_secs(20) {
        if stdout(&env.proxy.psql("app", &["-At", "-c", "select 1"])).trim() == "1" {
            recovered = Some(restarted.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let recovered = recovered.expect("pgrouter serves new clients after the restart");
    let history: u64 = env.primary_sql("select count(*) from pgbench_history").parse().unwrap();
    let balances = env.primary_sql(
        "select (select sum(abalance) from pgbench_accounts) = (select coalesce(sum(delta), 0) from pgbench_history) \
         and (select sum(tbalance) from pgbench_tellers) = (select coalesce(sum(delta), 0) from pgbench_history)",
    );
    println!(
        "faults: primary restarted under load: pgbench saw {processed} committed, {cut_off} clients cut off; \
         history has {history}; serving again {recovered:?} after the restart"
    );
    assert!(history >= processed, "every committed transaction is there: {history} < {processed}");
    assert!(history <= processed + cut_off, "at most one in doubt per cut-off client");
    assert_eq!(balances, "t", "TPC-B balances agree");
}
