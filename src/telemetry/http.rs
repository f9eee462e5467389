//! The metrics listener (`metrics_listen`): a small HTTP/1.1 server for three paths.
//!
//! - `GET /metrics`: the Prometheus text exposition.
//! - `GET /healthz`: 200 while the process runs.
//! - `GET /readyz`: 200 once the config is loaded, the client listener is bound and at least
//!   one primary answers its health checks; 503 with the reason otherwise.
//!
//! One request per connection, answered with `Connection: close`.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::app::App;

/// A request head larger than this is refused; a client that sends none in time is dropped.
const MAX_HEAD: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves until shutdown.
pub async fn serve(app: Arc<App>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            () = app.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                tokio::spawn(answer(Arc::clone(&app), stream));
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener: accept failed");
                crate::timer::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn answer(app: Arc<App>, mut stream: TcpStream) {
    let Ok(Some(path)) = crate::timer::timeout(READ_TIMEOUT, read_request(&mut stream)).await else {
        return;
    };
    let (status, content_type, body) = match path.as_deref() {
        Ok("/metrics") => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", app.render_metrics()),
        Ok("/healthz") => ("200 OK", "text/plain; charset=utf-8", "ok\n".to_owned()),
        Ok("/readyz") => match app.readiness() {
            Ok(()) => ("200 OK", "text/plain; charset=utf-8", "ready\n".to_owned()),
            Err(why) => ("503 Service Unavailable", "text/plain; charset=utf-8", format!("not ready: {why}\n")),
        },
        Ok(_) => {
            ("404 Not Found", "text/plain; charset=utf-8", "not found: try /metrics, /healthz or /readyz\n".into())
        }
        Err(status) => (*status, "text/plain; charset=utf-8", format!("{status}\n")),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Reads a request head; the path of a GET, or the status to refuse it with. None when the
/// client went away.
async fn read_request(stream: &mut TcpStream) -> Option<Result<String, &'static str>> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        if head.len() > MAX_HEAD {
            return Some(Err("431 Request Header Fields Too Large"));
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    Some(match (words.next(), words.next()) {
        (Some("GET"), Some(target)) => Ok(target.split('?').next().unwrap_or(target).to_owned()),
        (Some(_), Some(_)) => Err("405 Method Not Allowed"),
        _ => Err("400 Bad Request"),
    })
}
