//! The differential suite: the cases in `corpus/differential.sql` run once directly against
//! PostgreSQL and once through pgrouter (transaction pooling, pool_size 2, with noisy
//! neighbours changing their own settings on the same server connections), and the two
//! transcripts must be identical. Each case runs with the simple protocol (text results) and,
//! unless it is marked simple-only, with the extended protocol (binary results, raw bytes).
//!
//! Case syntax, one case per line (`--` lines are comments):
//! - `SQL` runs both ways;
//! - `! SQL ;; SQL` runs only as simple queries, one per `;;`-separated part, in order;
//! - `SQL ||| p1 | p2` runs only extended, with text-format parameters (`NULL` for null);
//! - `COPY ... TO STDOUT ...` collects the copied bytes;
//! - `COPY ... FROM STDIN ... <<< data` sends `data` (with `\n` for newlines).

use std::error::Error as _;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt, TryStreamExt, pin_mut};
use tokio_postgres::types::{FromSql, ToSql, Type};
use tokio_postgres::{AsyncMessage, Client, SimpleQueryMessage};

use crate::harness::{APP_PASSWORD, APP_USER, Env, EnvOptions, TextParam, connect, runtime};

const CASES: &str = include_str!("corpus/differential.sql");
/// Results longer than this many rows are summarised by count and digest.
const ROWS_SHOWN: usize = 200;

/// A column value as the server sent it, whatever its type.
struct Raw(Option<Vec<u8>>);

impl<'a> FromSql<'a> for Raw {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Self(Some(raw.to_vec())))
    }
    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Self(None))
    }
    fn accepts(_: &Type) -> bool {
        true
    }
}

/// A client whose notices are kept for the transcript.
struct Session {
    client: Client,
    notices: Arc<Mutex<Vec<String>>>,
}

async fn session(url: &str) -> Session {
    let (client, mut conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("connect");
    let notices = Arc::new(Mutex::new(Vec::new()));
    let sink = notices.clone();
    tokio::spawn(async move {
        let messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        pin_mut!(messages);
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notice(n) = message {
                sink.lock().unwrap().push(format!("{} {}: {}", n.severity(), n.code().code(), n.message()));
            }
        }
    });
    Session { client, notices }
}

/// Runs every case on one session and returns the transcript.
async fn transcript(url: &str) -> (String, usize) {
    let mut s = session(url).await;
    let mut out = String::new();
    let mut runs = 0;
    for (n, line) in CASES.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with("--") {
            continue;
        }
        writeln!(out, "## line {}: {line}", n + 1).unwrap();
        if let Some(parts) = line.strip_prefix('!') {
            for part in parts.split(";;") {
                simple(&s.client, part.trim(), &mut out).await;
            }
            runs += 1;
        } else if let Some((sql, params)) = line.split_once("|||") {
            let params: Vec<TextParam> =
                params.split('|').map(|p| p.trim()).map(|p| TextParam((p != "NULL").then(|| p.to_owned()))).collect();
            extended(&s.client, sql.trim(), &params, &mut out).await;
            runs += 1;
        } else if line.to_ascii_uppercase().starts_with("COPY") {
            if !copy(&s.client, line, &mut out).await && line.contains("<<<") {
                // after a failed COPY FROM STDIN, tokio-postgres's connection may or may not
                // survive depending on timing: go on with a new one
                s = session(url).await;
            }
            runs += 1;
        } else {
            simple(&s.client, line, &mut out).await;
            extended(&s.client, line, &[], &mut out).await;
            runs += 2;
        }
        // Let the connection task deliver notices before they are read.
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        for notice in s.notices.lock().unwrap().drain(..) {
            writeln!(out, "  notice {notice}").unwrap();
        }
    }
    (out, runs)
}

fn error_line(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!(
            "  error {} {}: {} | detail={:?} hint={:?} position={:?}",
            db.severity(),
            db.code().code(),
            db.message(),
            db.detail(),
            db.hint(),
            db.position()
        ),
        None => format!("  error (not from the server): {e} {:?}", e.source()),
    }
}

/// Rows are listed up to ROWS_SHOWN, then only counted and digested (FNV-1a).
struct Rows {
    lines: Vec<String>,
    count: usize,
    digest: u64,
}

impl Rows {
    fn new() -> Self {
        Self { lines: Vec::new(), count: 0, digest: 0xcbf2_9ce4_8422_2325 }
    }
    fn push(&mut self, line: String) {
        for b in line.bytes().chain([b'\n']) {
            self.digest = (self.digest ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        if self.count < ROWS_SHOWN {
            self.lines.push(line);
        }
        self.count += 1;
    }
    fn write(self, out: &mut String) {
        for line in &self.lines {
            writeln!(out, "  row {line}").unwrap();
        }
        if self.count > ROWS_SHOWN {
            writeln!(out, "  rows {} digest {:016x}", self.count, self.digest).unwrap();
        }
    }
}

async fn simple(client: &Client, sql: &str, out: &mut String) {
    writeln!(out, " simple").unwrap();
    match client.simple_query(sql).await {
        Ok(messages) => {
            let mut rows = Rows::new();
            for m in messages {
                match m {
                    SimpleQueryMessage::RowDescription(cols) => {
                        let names: Vec<&str> = cols.iter().map(|c| c.name()).collect();
                        writeln!(out, "  columns {names:?}").unwrap();
                    }
                    SimpleQueryMessage::Row(r) => {
                        let values: Vec<Option<&str>> = (0..r.len()).map(|i| r.get(i)).collect();
                        rows.push(short(&format!("{values:?}")));
                    }
                    SimpleQueryMessage::CommandComplete(n) => {
                        std::mem::replace(&mut rows, Rows::new()).write(out);
                        writeln!(out, "  complete {n}").unwrap();
                    }
                    _ => writeln!(out, "  other message").unwrap(),
                }
            }
        }
        Err(e) => out.push_str(&(error_line(&e) + "\n")),
    }
}

async fn extended(client: &Client, sql: &str, params: &[TextParam], out: &mut String) {
    writeln!(out, " extended").unwrap();
    let result = async {
        let stmt = client.prepare(sql).await?;
        let types: Vec<&str> = stmt.params().iter().map(Type::name).collect();
        let cols: Vec<String> = stmt.columns().iter().map(|c| format!("{} {}", c.name(), c.type_().name())).collect();
        writeln!(out, "  params {types:?} columns {cols:?}").unwrap();
        let stream = client.query_raw(&stmt, params.iter().map(|p| p as &dyn ToSql)).await?;
        pin_mut!(stream);
        let mut rows = Rows::new();
        while let Some(row) = stream.try_next().await? {
            let values: Vec<String> = (0..row.len())
                .map(|i| match row.get::<_, Raw>(i).0 {
                    Some(bytes) => hex(&bytes),
                    None => "NULL".to_owned(),
                })
                .collect();
            rows.push(short(&values.join(" ")));
        }
        rows.write(out);
        writeln!(out, "  complete {:?}", stream.rows_affected()).unwrap();
        Ok::<_, tokio_postgres::Error>(())
    }
    .await;
    if let Err(e) = result {
        out.push_str(&(error_line(&e) + "\n"));
    }
}

/// Runs a COPY case; false if it failed. How a failed COPY FROM STDIN ends depends on when
/// tokio-postgres sees the server's error (a server error, or its connection closed), so only
/// the failure is recorded; the next cases show that nothing was copied.
async fn copy(client: &Client, line: &str, out: &mut String) -> bool {
    writeln!(out, " copy").unwrap();
    let result = if let Some((sql, data)) = line.split_once("<<<") {
        async {
            let sink = client.copy_in::<_, Bytes>(sql.trim()).await?;
            pin_mut!(sink);
            let data = data.trim().replace("\\n", "\n");
            sink.send(Bytes::from(data)).await?;
            let n = sink.finish().await?;
            writeln!(out, "  copied in {n}").unwrap();
            Ok::<_, tokio_postgres::Error>(())
        }
        .await
    } else {
        async {
            let stream = client.copy_out(line).await?;
            let chunks: Vec<Bytes> = stream.try_collect().await?;
            let data: Vec<u8> = chunks.concat();
            match std::str::from_utf8(&data) {
                Ok(text) => {
                    let mut rows = Rows::new();
                    text.lines().for_each(|l| rows.push(short(l)));
                    rows.write(out);
                }
                Err(_) => writeln!(out, "  bytes {}", short(&hex(&data))).unwrap(),
            }
            Ok(())
        }
        .await
    };
    match result {
        Ok(()) => true,
        Err(_) if line.contains("<<<") => {
            writeln!(out, "  copy in failed").unwrap();
            false
        }
        Err(e) => {
            out.push_str(&(error_line(&e) + "\n"));
            false
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Long values are shown by length and digest, so a transcript stays readable.
fn short(s: &str) -> String {
    if s.len() <= 400 {
        return s.to_owned();
    }
    let mut rows = Rows::new();
    rows.push(s.to_owned());
    format!("{}... ({} bytes, digest {:016x})", s.chars().take(100).collect::<String>(), s.len(), rows.digest)
}

/// Clients that keep changing their own session settings on the same server connections while
/// the suite runs through the proxy: if a setting leaked, a case would print it.
fn neighbours(url: &str, stop: Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<u64>> {
    let settings = [
        "SET DateStyle = 'SQL, DMY'; SET TimeZone = 'Asia/Tokyo'",
        "SET bytea_output = 'escape'; SET extra_float_digits = 0",
        "SET IntervalStyle = 'iso_8601'; SET search_path = pg_catalog",
        "SET standard_conforming_strings = off; SET lc_monetary = 'C'",
    ];
    settings
        .into_iter()
        .map(|set| {
            let (url, stop) = (url.to_owned(), stop.clone());
            tokio::spawn(async move {
                let c = connect(&url).await.expect("neighbour connects");
                c.simple_query(set).await.expect("neighbour SET");
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    c.simple_query("begin; select now()::text, 1.5::float8, '1 day'::interval; commit")
                        .await
                        .expect("neighbour query");
                    n += 1;
                }
                n
            })
        })
        .collect()
}

/// The same cases give identical transcripts directly and through pgrouter.
#[test]
fn direct_and_proxied_results_are_identical() {
    let databases = "[[databases]]\nname = \"proxied\"\npool_mode = \"transaction\"\npool_size = 2\n\
                     [[databases.shards]]\nprimary = \"{PRIMARY}\"\n";
    let env = Env::start(EnvOptions {
        pool_size: 2,
        databases: databases.into(),
        server_databases: vec!["direct".into(), "proxied".into()],
        ..EnvOptions::default()
    });
    let direct =
        format!("host=127.0.0.1 port={} user={APP_USER} password={APP_PASSWORD} dbname=direct", env.topo.primary.port);
    let proxied = env.proxy.url(APP_USER, APP_PASSWORD, "proxied");
    let rt = runtime();
    let (expected, runs) = rt.block_on(transcript(&direct));
    let (got, neighbour_queries) = rt.block_on(async {
        let stop = Arc::new(AtomicBool::new(false));
        let noisy = neighbours(&proxied, stop.clone());
        let (got, _) = transcript(&proxied).await;
        stop.store(true, Ordering::Relaxed);
        let mut n = 0;
        for task in noisy {
            n += task.await.expect("neighbour");
        }
        (got, n)
    });
    // an error tokio-postgres raised itself (a lost connection, say) would hide later cases
    assert!(!expected.contains("(not from the server)"), "the direct run broke its connection:\n{expected}");
    let errors = expected.matches("\n  error ").count();
    println!(
        "differential: {} cases, {runs} runs ({errors} expected errors), {neighbour_queries} neighbour transactions",
        CASES.lines().filter(|l| !l.trim().is_empty() && !l.trim().starts_with("--")).count()
    );
    if got != expected {
        let first = expected.lines().zip(got.lines()).position(|(a, b)| a != b).unwrap_or(0);
        let case_start =
            expected.lines().take(first + 1).collect::<Vec<_>>().iter().rposition(|l| l.starts_with("## "));
        let from = case_start.unwrap_or(first);
        let show = |t: &str| t.lines().skip(from).take(first - from + 14).collect::<Vec<_>>().join("\n");
        panic!("transcripts differ at line {first}\n--- direct:\n{}\n--- proxied:\n{}", show(&expected), show(&got));
    }
}
