//! The connection lifecycle at the edges: startup packets (SSL/GSS negotiation, protocol
//! version negotiation, garbage), limits, and shutdown by SIGTERM (drain) and SIGINT (fast).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::harness::{
    APP_PASSWORD, APP_USER, Env, EnvOptions, assert_ok, connect, describe, frontend_message, runtime, sqlstate, stderr,
    stdout,
};

fn startup_packet(code: u32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = code.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    if code >> 16 == 3 {
        body.push(0);
    }
    let mut packet = u32::try_from(body.len() + 4).unwrap().to_be_bytes().to_vec();
    packet.extend(body);
    packet
}

fn read_some(stream: &mut TcpStream) -> Vec<u8> {
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = stream.read(&mut buf).unwrap_or(0);
    buf.truncate(n);
    buf
}

fn error_code(bytes: &[u8]) -> Option<String> {
    if bytes.first() != Some(&b'E') {
        return None;
    }
    let body = &bytes[5..];
    let pos = body.windows(1).position(|w| w[0] == b'C')?;
    let rest = &body[pos + 1..];
    Some(String::from_utf8_lossy(&rest[..5]).into_owned())
}

#[test]
fn startup_negotiation_edges() {
    let env = Env::start(EnvOptions { proxy: "client_login_timeout = \"1s\"".into(), ..EnvOptions::default() });
    let addr = ("127.0.0.1", env.proxy.port);

    // SSLRequest and GSSENCRequest are answered 'N'; the client then goes on in plaintext.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&startup_packet(80_877_104, &[])).unwrap();
    assert_eq!(read_some(&mut s), b"N");
    s.write_all(&startup_packet(80_877_103, &[])).unwrap();
    assert_eq!(read_some(&mut s), b"N");
    s.write_all(&startup_packet(196_608, &[("user", APP_USER), ("database", "app")])).unwrap();
    let reply = read_some(&mut s);
    assert_eq!(reply[0], b'R', "an authentication request follows");
    assert_eq!(&reply[5..9], &10u32.to_be_bytes(), "SASL is offered");

    // Protocol 3.2 (PostgreSQL 18 libpq) gets NegotiateProtocolVersion for 3.0, then auth.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&startup_packet(196_610, &[("user", APP_USER), ("_pq_.fancy", "1")])).unwrap();
    let reply = read_some(&mut s);
    assert_eq!(reply[0], b'v', "NegotiateProtocolVersion first: {reply:?}");
    assert_eq!(&reply[5..9], &0u32.to_be_bytes(), "newest minor version 0");
    assert!(String::from_utf8_lossy(&reply).contains("_pq_.fancy"));

    // Garbage instead of a startup packet: a protocol error, then the connection closes.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&startup_packet(0x0002_0000, &[])).unwrap();
    assert_eq!(error_code(&read_some(&mut s)).as_deref(), Some("08P01"));
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&[0, 0, 0, 2]).unwrap();
    assert_eq!(error_code(&read_some(&mut s)).as_deref(), Some("08P01"));

    // A client that says nothing is closed after client_login_timeout.
    let mut s = TcpStream::connect(addr).unwrap();
    let started = Instant::now();
    let reply = read_some(&mut s);
    assert_eq!(error_code(&reply).as_deref(), Some("08P01"), "{reply:?}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // Replication connections are refused clearly.
    let out = crate::harness::pg_tool("psql")
        .args(["-X", "-At", "-c", "IDENTIFY_SYSTEM"])
        .arg(format!("{} replication=database", env.proxy.url(APP_USER, APP_PASSWORD, "app")))
        .output()
        .unwrap();
    assert!(stderr(&out).contains("replication connections are not supported"), "{}", stderr(&out));

    // psql with sslmode=require is told plainly that TLS is not offered.
    let out = crate::harness::pg_tool("psql")
        .args(["-X", "-At", "-c", "select 1"])
        .arg(format!("{} sslmode=require", env.proxy.url(APP_USER, APP_PASSWORD, "app")))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("does not support SSL"), "{}", stderr(&out));
}

/// A message larger than max_message_size is refused (54000) without hurting other clients.
#[test]
fn oversized_messages_are_refused() {
    let env = Env::start(EnvOptions { proxy: "max_message_size = \"64KiB\"".into(), ..EnvOptions::default() });
    let url = env.proxy.url(APP_USER, APP_PASSWORD, "app");
    runtime().block_on(async {
        let bystander = connect(&url).await.unwrap();
        let client = connect(&url).await.unwrap();
        let big = format!("select '{}'", "x".repeat(100 << 10));
        let err = client.simple_query(&big).await.expect_err("too large");
        assert_eq!(sqlstate(&err).as_deref(), Some("54000"), "{err}");
        assert!(describe(&err).contains("max_message_size"), "{err}");
        let small = format!("select length('{}')", "x".repeat(30 << 10));
        let rows = bystander.query_typed(&small, &[]).await.expect("bystander unaffected");
        assert_eq!(rows[0].get::<_, i32>(0), 30 << 10);
    });
}

/// SIGTERM: new clients are refused, an open transaction may finish, idle clients get 57P01,
/// and the process exits 0.
#[test]
fn sigterm_drains_and_sigint_exits_fast() {
    let mut env = Env::start(EnvOptions::default());
    assert_ok(&env.proxy.psql("app", &["-c", "create table drained (id int)"]), "create table");
    let url = env.proxy.url(APP_USER, APP_PASSWORD, "app");
    let rt = runtime();
    let (in_tx, idle, silent) = rt.block_on(async {
        let in_tx = connect(&url).await.unwrap();
        in_tx.batch_execute("begin; insert into drained values (1)").await.unwrap();
        let idle = connect(&url).await.unwrap();
        idle.simple_query("select 1").await.unwrap();
        let silent = connect(&url).await.unwrap();
        silent.simple_query("select 1").await.unwrap();
        (in_tx, idle, silent)
    });
    env.proxy.signal("TERM");
    assert!(
        crate::harness::wait_until(Duration::from_secs(10), || env.proxy.log().contains("draining")),
        "no drain started"
    );
    // an idle client that sends nothing is closed by the drain itself
    assert!(
        crate::harness::wait_until(Duration::from_secs(5), || silent.is_closed()),
        "the idle client that sends nothing was not closed by the drain"
    );
    rt.block_on(async {
        // the idle client is told the proxy is shutting down; a query that raced the drain
        // (here before its session woke up) is served first, and then the client is told
        let err = match idle.simple_query("select 1").await {
            Err(err) => err,
            Ok(_) => idle.simple_query("select 1").await.expect_err("idle client closed after the query that raced"),
        };
        let code = sqlstate(&err);
        assert!(code.as_deref() == Some("57P01") || idle.is_closed(), "{err}");
        // the transaction in flight finishes normally
        in_tx
            .batch_execute("insert into drained values (2); commit")
            .await
            .expect("transaction completes during drain");
    });
    let status = env.proxy.wait_exit(Duration::from_secs(10)).expect("pgrouter exits after the drain");
    assert!(status.success(), "exit status {status}");
    assert_eq!(env.primary_sql("select count(*) from drained"), "2");
    assert!(env.proxy.log().contains("draining"));

    // SIGINT: exit now, even with a transaction open; the server rolls it back.
    let mut env = Env::start(EnvOptions::default());
    assert_ok(&env.proxy.psql("app", &["-c", "create table fast (id int)"]), "create table");
    let url = env.proxy.url(APP_USER, APP_PASSWORD, "app");
    let client = rt.block_on(async {
        let c = connect(&url).await.unwrap();
        c.batch_execute("begin; insert into fast values (1)").await.unwrap();
        c
    });
    env.proxy.signal("INT");
    let status = env.proxy.wait_exit(Duration::from_secs(5)).expect("SIGINT exits at once");
    assert!(status.success(), "exit status {status}");
    drop(client);
    let rolled_back = crate::harness::wait_until(Duration::from_secs(10), || {
        env.primary_sql("select count(*) from fast") == "0"
            && env.primary_sql("select count(*) from pg_stat_activity where usename = 'app' and application_name <> 'pgrouter health check'") == "0"
    });
    assert!(rolled_back, "the open transaction was not rolled back");
}

/// psql's \c and a plain query in session pooling keep working across reconnects.
#[test]
fn session_pooling_reuses_reset_connections() {
    let env = Env::start(EnvOptions { pool_size: 1, ..EnvOptions::default() });
    let out = env.proxy.psql(
        "app_session",
        &["-qAt", "-c", "set work_mem = '7MB'", "-c", "prepare p as select 1", "-c", "select pg_backend_pid()"],
    );
    assert_ok(&out, "first session");
    let first_pid = stdout(&out).trim().to_owned();
    let out = env.proxy.psql(
        "app_session",
        &[
            "-At",
            "-c",
            "select pg_backend_pid(), current_setting('work_mem'), (select count(*) from pg_prepared_statements)",
        ],
    );
    assert_ok(&out, "second session");
    assert_eq!(stdout(&out).trim(), format!("{first_pid}|4MB|0"), "same server connection, reset by DISCARD ALL");
}

/// Reads until a ReadyForQuery or an ErrorResponse arrives (or the socket closes).
fn read_until_ready(stream: &mut TcpStream) -> Vec<u8> {
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let mut at = 0;
        let mut done = false;
        while at + 5 <= all.len() {
            let len = u32::from_be_bytes([all[at + 1], all[at + 2], all[at + 3], all[at + 4]]) as usize;
            if all[at] == b'Z' || all[at] == b'E' {
                done = true;
            }
            at += 1 + len;
        }
        if done && at <= all.len() {
            return all;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return all,
            Ok(n) => all.extend_from_slice(&buf[..n]),
        }
    }
}

/// Raw protocol edge cases after login (a `trust` user keeps the client side simple):
/// an invalid message type is refused and never reaches a server; work sent just before
/// Terminate still runs, as it would on PostgreSQL.
#[test]
fn invalid_messages_and_terminate() {
    let env = Env::start(EnvOptions {
        users:
            "\n[[users]]\nname = \"raw\"\nauth = \"trust\"\nserver_user = \"app\"\nserver_password = \"app-secret\"\n"
                .into(),
        pool_size: 1,
        ..EnvOptions::default()
    });
    assert_ok(&env.proxy.psql("app", &["-c", "create table after_terminate (id int)"]), "create table");
    let login = || {
        let mut s = TcpStream::connect(("127.0.0.1", env.proxy.port)).unwrap();
        s.write_all(&startup_packet(196_608, &[("user", "raw"), ("database", "app")])).unwrap();
        let greeting = read_until_ready(&mut s);
        assert_eq!(greeting[0], b'R', "{greeting:?}");
        assert_eq!(greeting.last(), Some(&b'I'));
        s
    };
    // a password message after login is not a valid message type
    let mut s = login();
    s.write_all(&frontend_message(b'p', b"secret\0")).unwrap();
    let reply = read_until_ready(&mut s);
    assert_eq!(error_code(&reply).as_deref(), Some("08P01"), "{reply:?}");
    // Query + Terminate in one write: the insert still happens
    let mut s = login();
    let mut batch = frontend_message(b'Q', b"insert into after_terminate values (1)\0");
    batch.extend(frontend_message(b'X', b""));
    s.write_all(&batch).unwrap();
    drop(s);
    let inserted = crate::harness::wait_until(Duration::from_secs(10), || {
        env.primary_sql("select count(*) from after_terminate") == "1"
    });
    assert!(inserted, "work sent before Terminate was dropped");
    // and the pool's only connection is still fine for the next client
    let out = env.proxy.psql("app", &["-At", "-c", "select count(*) from after_terminate"]);
    assert_ok(&out, "next client");
    assert_eq!(stdout(&out).trim(), "1");
}
