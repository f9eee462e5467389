//! The whole per-query path of a session under transaction pooling: a simple Query read from
//! the client, shaped, classified (cache hit) and routed, a pooled server connection lent,
//! the request relayed, the answer relayed back up to its ReadyForQuery, the connection
//! returned. The client is an in-memory pipe (`tokio::io::duplex`) into `serve_client`; the
//! server is a fake PostgreSQL in this process, reached over loopback TCP because pgrouter's
//! server connections are TCP (so each query also costs the two system calls to it and the
//! two from it). Everything runs on one thread.
//!
//! After the timing, it counts the heap allocations of 10,000 queries (stats_alloc's
//! counting global allocator) and prints them per query; more than one per query fails the run, since the
//! steady state should allocate nothing per forwarded message.
//!
//! Run with `cargo bench --bench session`.

use std::alloc::System;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use pgrouter::app::App;
use pgrouter::config::Config;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::TcpListener;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const QUERY: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = 48213";

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&u32::try_from(body.len() + 4).unwrap().to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Reads one message (tag and body) from `io`.
async fn read_message<R: AsyncReadExt + Unpin>(io: &mut R, body: &mut Vec<u8>) -> Option<u8> {
    let mut header = [0u8; 5];
    io.read_exact(&mut header).await.ok()?;
    let len = u32::from_be_bytes(header[1..5].try_into().unwrap()) as usize;
    body.resize(len - 4, 0);
    io.read_exact(body).await.ok()?;
    Some(header[0])
}

/// A fake PostgreSQL: trusts everyone and answers every Query with one row of three text
/// columns ("f", "0/1", "0"), which also satisfies pgrouter's health check of a primary.
async fn fake_server(listener: TcpListener) {
    let mut answer = Vec::new();
    let mut columns = vec![0, 3];
    for name in ["a", "b", "c"] {
        columns.extend_from_slice(name.as_bytes());
        columns.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 25, 255, 255, 255, 255, 255, 255, 0, 0]);
    }
    answer.extend(message(b'T', &columns));
    let mut row = vec![0, 3];
    for value in ["f", "0/1", "0"] {
        row.extend_from_slice(&u32::try_from(value.len()).unwrap().to_be_bytes());
        row.extend_from_slice(value.as_bytes());
    }
    answer.extend(message(b'D', &row));
    answer.extend(message(b'C', b"SELECT 1\0"));
    answer.extend(message(b'Z', b"I"));
    while let Ok((mut conn, _)) = listener.accept().await {
        conn.set_nodelay(true).unwrap();
        let answer = answer.clone();
        tokio::spawn(async move {
            let mut len = [0u8; 4];
            if conn.read_exact(&mut len).await.is_err() {
                return;
            }
            let mut startup = vec![0u8; u32::from_be_bytes(len) as usize - 4];
            if conn.read_exact(&mut startup).await.is_err() {
                return;
            }
            let mut greeting = message(b'R', &[0, 0, 0, 0]);
            for (name, value) in [("server_version", "15.0"), ("client_encoding", "UTF8"), ("DateStyle", "ISO, MDY")] {
                greeting.extend(message(b'S', format!("{name}\0{value}\0").as_bytes()));
            }
            greeting.extend(message(b'K', &[0, 0, 0, 1, 0, 0, 0, 2]));
            greeting.extend(message(b'Z', b"I"));
            if conn.write_all(&greeting).await.is_err() {
                return;
            }
            let mut body = Vec::new();
            while let Some(tag) = read_message(&mut conn, &mut body).await {
                match tag {
                    b'Q' if conn.write_all(&answer).await.is_ok() => {}
                    _ => return,
                }
            }
        });
    }
}

/// Sends the query and reads its answer up to ReadyForQuery.
async fn round_trip(client: &mut DuplexStream, query: &[u8], body: &mut Vec<u8>) {
    client.write_all(query).await.unwrap();
    while let Some(tag) = read_message(client, body).await {
        assert_ne!(tag, b'E', "error: {}", String::from_utf8_lossy(body));
        if tag == b'Z' {
            return;
        }
    }
    panic!("the session closed");
}

struct Setup {
    client: DuplexStream,
    // kept alive for the session's sake
    _app: pgrouter::app::Running,
}

async fn setup() -> Setup {
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = backend.local_addr().unwrap();
    tokio::spawn(fake_server(backend));
    let config = Config::from_toml(&format!(
        r#"
[proxy]
listen = "127.0.0.1:0"

[[users]]
name = "app"
auth = "trust"

[[databases]]
name = "app"
pool_size = 4

[[databases.shards]]
primary = "{backend_addr}"
"#
    ))
    .expect("bench config");
    let running = App::start(config, None).await.unwrap();
    let (mut client, proxy_side) = tokio::io::duplex(64 << 10);
    let peer = "127.0.0.1:1".parse().unwrap();
    tokio::spawn(pgrouter::frontend::login::serve_client(std::sync::Arc::clone(&running.app), proxy_side, peer, None));
    let mut startup = 196_608u32.to_be_bytes().to_vec();
    startup.extend_from_slice(b"user\0app\0database\0app\0\0");
    let mut packet = u32::try_from(startup.len() + 4).unwrap().to_be_bytes().to_vec();
    packet.extend(startup);
    client.write_all(&packet).await.unwrap();
    let mut body = Vec::new();
    while let Some(tag) = read_message(&mut client, &mut body).await {
        assert_ne!(tag, b'E', "login failed: {}", String::from_utf8_lossy(&body));
        if tag == b'Z' {
            break;
        }
    }
    Setup { client, _app: running }
}

fn session(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut setup = rt.block_on(setup());
    let mut query = b"Q".to_vec();
    query.extend_from_slice(&u32::try_from(QUERY.len() + 5).unwrap().to_be_bytes());
    query.extend_from_slice(QUERY.as_bytes());
    query.push(0);
    let mut body = Vec::new();
    // warm up: the pool's connection, the shape cache, the buffers
    rt.block_on(async {
        for _ in 0..1000 {
            round_trip(&mut setup.client, &query, &mut body).await;
        }
    });
    c.bench_function("session: one simple query through pgrouter (fake server)", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    round_trip(&mut setup.client, black_box(&query), &mut body).await;
                }
                started.elapsed()
            })
        });
    });
    let queries = 10_000u64;
    let region = Region::new(GLOBAL);
    let took = rt.block_on(async {
        let started = Instant::now();
        for _ in 0..queries {
            round_trip(&mut setup.client, &query, &mut body).await;
        }
        started.elapsed()
    });
    let change = region.change();
    let per_query = (change.allocations + change.reallocations) as f64 / queries as f64;
    println!(
        "session: {per_query:.3} heap allocations per query over {queries} queries ({:.1} µs per query, all included)",
        took.as_secs_f64() * 1e6 / queries as f64
    );
    assert!(per_query < 1.0, "the per-query path allocates ({per_query:.3} per query)");
    drop(setup);
    rt.shutdown_timeout(Duration::from_millis(100));
}

criterion_group!(benches, session);
criterion_main!(benches);
