//! One client's session after login: waits for a request, borrows a server connection from the
//! pool, relays until the pair is idle, and gives the connection back (transaction pooling) or
//! keeps it until the client leaves (session pooling).
//!
//! When the client leaves, its server connection is only returned to the pool clean: a
//! running statement is cancelled and the connection closed; an open transaction is rolled
//! back; in session mode the connection is reset with DISCARD ALL.

use std::sync::Arc;
use std::time::Duration;

use super::cancel::{CancelTarget, Registration};
use super::client::{ClientIo, ClientStream};
use super::flow::Flow;
use super::relay::{self, RelayEnd, RelayOptions};
use crate::app::App;
use crate::backend::conn::send_cancel;
use crate::backend::{Checkout, ClusterPools};
use crate::config::PoolMode;
use crate::error::{Error, SqlState};
use crate::protocol::framing::Frame;
use crate::protocol::messages::{self, Severity, TxStatus};
use crate::router::Route;

/// How long the proxy waits for a server to roll back or reset before closing it instead.
const RESET_TIMEOUT: Duration = Duration::from_secs(5);
/// How long what a client sent before Terminate may still run before it is abandoned.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// How the client left, as the relay saw it.
#[derive(Debug, Clone, Copy)]
struct Departure {
    terminated: bool,
    server_dirty: bool,
}

/// What the session is waiting for a server connection for.
enum Request {
    Frame(Frame),
    Exit(Exit),
}

/// Why a session ended normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    ClientGone,
    Shutdown,
    IdleTimeout,
}

/// Everything login established about the client.
pub struct SessionParams {
    pub user: String,
    pub database: String,
    pub mode: PoolMode,
    pub pools: Arc<ClusterPools>,
    pub route: Route,
    pub cancel: Registration,
}

pub struct Session<S> {
    app: Arc<App>,
    client: ClientStream<S>,
    params: SessionParams,
    server: Option<Checkout>,
    flow: Flow,
    /// After an error answered to an extended-protocol message, skip until Sync.
    skip_until_sync: bool,
    /// Set when the client left while the relay ran.
    left: Option<Departure>,
}

impl<S: ClientIo> Session<S> {
    pub fn new(app: Arc<App>, client: ClientStream<S>, params: SessionParams) -> Self {
        Self {
            app,
            client,
            params,
            server: None,
            flow: Flow::default(),
            skip_until_sync: false,
            left: None,
        }
    }

    pub async fn run(mut self) {
        let outcome = self.serve().await;
        match &outcome {
            Ok(Exit::ClientGone) => {}
            Ok(Exit::Shutdown) => {
                let msg = messages::error_response(
                    Severity::Fatal,
                    SqlState::ADMIN_SHUTDOWN,
                    "terminating connection: pgrouter is shutting down",
                );
                let _ = self.client.send(&msg).await;
            }
            Ok(Exit::IdleTimeout) => {
                let msg = messages::error_response(
                    Severity::Fatal,
                    SqlState("57P05"),
                    "terminating connection due to client_idle_timeout",
                );
                let _ = self.client.send(&msg).await;
            }
            Err(e @ Error::ClientIo(_)) => tracing::debug!(error = %e, "client connection failed"),
            Err(e) => {
                tracing::warn!(user = %self.params.user, database = %self.params.database, error = %e, kind = e.kind(), "session ended by error");
                self.client.send_error(Severity::Fatal, e).await;
            }
        }
        let server_usable = !matches!(
            outcome,
            Err(Error::ServerLost { .. } | Error::ServerProtocol { .. })
        );
        self.dispose_server(server_usable).await;
    }

    async fn serve(&mut self) -> Result<Exit, Error> {
        loop {
            let first = if self.server.is_some() {
                None
            } else {
                let frame = match self.await_request().await? {
                    Request::Frame(frame) => frame,
                    Request::Exit(exit) => return Ok(exit),
                };
                match self.attach().await {
                    Ok(true) => {}
                    Ok(false) => return Ok(Exit::ClientGone),
                    Err(e) => {
                        self.reject(frame.tag(), &e).await?;
                        continue;
                    }
                }
                Some(frame)
            };
            let opts = RelayOptions {
                release_when_idle: self.params.mode == PoolMode::Transaction,
                shutdown: &self.app.shutdown,
            };
            let checkout = self.server.as_mut().expect("attached above");
            match relay::run(
                &mut self.client,
                checkout.conn(),
                &mut self.flow,
                first,
                opts,
            )
            .await?
            {
                RelayEnd::ClientGone {
                    terminated,
                    server_dirty,
                } => {
                    self.left = Some(Departure {
                        terminated,
                        server_dirty,
                    });
                    return Ok(Exit::ClientGone);
                }
                RelayEnd::Idle => {
                    if self.params.mode == PoolMode::Transaction {
                        self.detach();
                    }
                    if self.app.shutdown.is_cancelled() {
                        return Ok(Exit::Shutdown);
                    }
                }
            }
        }
    }

    /// Waits, without a server connection, for the next message that needs one.
    async fn await_request(&mut self) -> Result<Request, Error> {
        let idle_timeout = self.app.config.proxy.client_idle_timeout;
        loop {
            let read = tokio::select! {
                biased;
                () = self.app.shutdown.cancelled() => return Ok(Request::Exit(Exit::Shutdown)),
                read = self.client.read_frame() => read?,
                () = sleep_unless_zero(idle_timeout) => return Ok(Request::Exit(Exit::IdleTimeout)),
            };
            let Some(frame) = read else {
                return Ok(Request::Exit(Exit::ClientGone));
            };
            match frame.tag() {
                b'X' => return Ok(Request::Exit(Exit::ClientGone)),
                // Nothing is pending, so a lone Sync is answered here.
                b'S' => {
                    self.skip_until_sync = false;
                    self.client
                        .send(&messages::ready_for_query(TxStatus::Idle))
                        .await?;
                }
                tag if !relay::is_frontend_tag(tag) => return Err(relay::unexpected_message(tag)),
                _ if self.skip_until_sync => {}
                // Flush with nothing pending; COPY data outside COPY (ignored, as PostgreSQL does).
                b'H' | b'd' | b'c' | b'f' => {}
                _ => return Ok(Request::Frame(frame)),
            }
        }
    }

    /// Borrows a server connection for the session's route. `Ok(false)` if the client left
    /// while waiting.
    async fn attach(&mut self) -> Result<bool, Error> {
        let pool = self
            .params
            .pools
            .pool(self.params.route)
            .ok_or_else(|| Error::Internal(format!("no pool for route {:?}", self.params.route)))?
            .clone();
        // A free connection is taken at once. A client that vanishes while waiting gives up its
        // request (PgBouncer does the same); one that said goodbye with Terminate still has
        // what it sent before run, as PostgreSQL would.
        let checkout = tokio::select! {
            biased;
            checkout = pool.checkout() => checkout?,
            said_goodbye = self.client.closed() => {
                if !said_goodbye {
                    return Ok(false);
                }
                pool.checkout().await?
            }
        };
        let conn = checkout.conn_ref();
        self.params.cancel.set_target(Some(CancelTarget {
            addr: conn.addr.clone(),
            key: conn.backend_key.clone(),
        }));
        self.flow = Flow::default();
        self.server = Some(checkout);
        Ok(true)
    }

    fn detach(&mut self) {
        self.params.cancel.set_target(None);
        if let Some(checkout) = self.server.take() {
            if self.flow.tainted() {
                tracing::debug!(server = %checkout.conn_ref().addr, "closing a connection whose answers could not be counted exactly");
            } else {
                checkout.release();
            }
        }
    }

    /// Answers a request that could not get a server connection, keeping the session usable.
    async fn reject(&mut self, tag: u8, err: &Error) -> Result<(), Error> {
        self.client.send_error(Severity::Error, err).await;
        match tag {
            b'Q' | b'F' => {
                self.client
                    .send(&messages::ready_for_query(TxStatus::Idle))
                    .await
            }
            _ => {
                self.skip_until_sync = true;
                Ok(())
            }
        }
    }

    /// Returns the session's server connection to the pool only if it can be made clean.
    async fn dispose_server(&mut self, usable: bool) {
        self.params.cancel.set_target(None);
        let Some(mut checkout) = self.server.take() else {
            return;
        };
        if !usable {
            return; // dropping the checkout closes the connection
        }
        let left = self.left.unwrap_or(Departure {
            terminated: false,
            server_dirty: false,
        });
        if left.server_dirty || self.flow.tainted() {
            return;
        }
        let conn = checkout.conn();
        if left.terminated
            && !self.flow.at_rest()
            && !relay::drain(conn, &mut self.flow, DRAIN_TIMEOUT).await
        {
            return;
        }
        if !self.flow.at_rest() {
            // A statement is still running for a client that vanished: stop it, then close.
            if let Err(e) = send_cancel(&conn.addr, &conn.backend_key, RESET_TIMEOUT).await {
                tracing::debug!(server = %conn.addr, error = %e, "cancel of an orphaned statement failed");
            }
            return;
        }
        if self.flow.status() != TxStatus::Idle
            && conn.run_simple("ROLLBACK", RESET_TIMEOUT).await != Ok(TxStatus::Idle)
        {
            return;
        }
        if self.params.mode == PoolMode::Session
            && conn.run_simple("DISCARD ALL", RESET_TIMEOUT).await != Ok(TxStatus::Idle)
        {
            return;
        }
        checkout.release();
    }
}

async fn sleep_unless_zero(d: Duration) {
    if d.is_zero() {
        std::future::pending::<()>().await;
    } else {
        tokio::time::sleep(d).await;
    }
}
