//! Accepts client connections and gives each its own task, within max_client_connections.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use super::client::ClientStream;
use super::tls::serve_connection;
use crate::app::App;
use crate::error::SqlState;
use crate::protocol::messages::{self, Severity};

/// Accepts until shutdown begins. Every session runs on the app's task tracker so a drain
/// can wait for them.
pub async fn accept_loop(app: Arc<App>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            () = app.shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of file descriptors and the like: back off briefly rather than spin.
                tracing::warn!(error = %e, "accept failed");
                crate::timer::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let config = Arc::clone(&app.now().config);
        let max = config.proxy.max_client_connections;
        if app.clients.fetch_add(1, Ordering::AcqRel) >= max {
            app.clients.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(client = %peer, max, "max_client_connections reached, client refused");
            tokio::spawn(refuse(stream, config.proxy.max_message_size));
            continue;
        }
        let app2 = Arc::clone(&app);
        app.tracker.spawn(async move {
            serve_connection(Arc::clone(&app2), stream, peer).await;
            app2.clients.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

async fn refuse(stream: TcpStream, max_message: usize) {
    let mut client = ClientStream::new(stream, max_message);
    let msg = messages::error_response(
        Severity::Fatal,
        SqlState::TOO_MANY_CONNECTIONS,
        "sorry, too many clients already (max_client_connections)",
    );
    let _ = crate::timer::timeout(Duration::from_secs(1), client.send(&msg)).await;
}
