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
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends", "prometheus"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        let _ = Command::new("apt-get").args(["update", "-qq"]).status();
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
