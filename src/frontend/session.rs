//! One client's session after login: waits for a request, routes it (transaction pooling),
//! borrows a server connection for the route, relays until the pair is idle, and gives the
//! connection back (transaction pooling) or keeps it until the client leaves (session
//! pooling, which sends everything to the primary of the home shard).
//!
//! When the client leaves, its server connection is only returned to the pool clean: a
//! running statement is cancelled and the connection closed; an open transaction is rolled
//! back; in session mode the connection is reset with DISCARD ALL.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::cancel::{CancelTarget, Registration};
use super::client::{ClientIo, ClientStream};
use super::flow::Flow;
use super::relay::{self, RelayEnd, RelayOptions};
use super::routing::{Plan, PlanError, Request, RoutingState, WriteMark};
use crate::app::App;
use crate::backend::conn::send_cancel;
use crate::backend::health::parse_lsn;
use crate::backend::{Checkout, ClusterPools, Pool, ReadNeeds};
use crate::config::{PoolMode, ReadYourWrites, ReplicaFallback};
use crate::error::{Error, SqlState};
use crate::protocol::framing::Frame;
use crate::protocol::messages::{self, Severity, TxStatus};
use crate::router::hint;
use crate::router::policy::{Undecided, volatility_query};
use crate::router::{Decision, Policy, Role, Target, Why};
use bytes::BytesMut;

/// How long the proxy waits for a server to roll back or reset before closing it instead.
const RESET_TIMEOUT: Duration = Duration::from_secs(5);
/// How long what a client sent before Terminate may still run before it is abandoned.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the proxy's own small queries (WAL position, function volatility) may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// An extended-protocol batch is routed once it reaches Sync or Flush, or this size.
const BATCH_MAX_MESSAGES: usize = 512;
const BATCH_MAX_BYTES: usize = 1 << 20;

/// How the client left, as the relay saw it.
#[derive(Debug, Clone, Copy)]
struct Departure {
    terminated: bool,
    server_dirty: bool,
}

/// What waiting for the client produced.
enum Waited {
    Request(Request),
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
    pub policy: Arc<Policy>,
    pub cancel: Registration,
}

/// A server connection lent to the session, with the decision that chose it.
struct Attached {
    checkout: Checkout,
    decision: Decision,
    /// The attachment began outside a transaction block, so losing the server loses no
    /// state the client relies on.
    started_idle: bool,
}

impl Attached {
    fn role(&self) -> Role {
        self.checkout.pool().key.role
    }
}

pub struct Session<S> {
    app: Arc<App>,
    client: ClientStream<S>,
    params: SessionParams,
    server: Option<Attached>,
    flow: Flow,
    routing: RoutingState,
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
            routing: RoutingState::default(),
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
                Vec::new()
            } else {
                let request = match self.await_request().await? {
                    Waited::Request(request) => request,
                    Waited::Exit(exit) => return Ok(exit),
                };
                let attached = match self.route(&request).await {
                    Ok(Some((decision, prelude))) => self.attach(decision, prelude).await,
                    Ok(None) => continue,
                    Err(e) => Err(e),
                };
                match attached {
                    Ok(true) => request.into_frames(),
                    Ok(false) => return Ok(Exit::ClientGone),
                    Err(e) => {
                        self.reject(request.expects_ready(), &e).await?;
                        continue;
                    }
                }
            };
            let opts = RelayOptions {
                release_when_idle: self.params.mode == PoolMode::Transaction,
                shutdown: &self.app.shutdown,
                intercept: |sql| hint::session_command(sql).is_some(),
            };
            let attached = self.server.as_mut().expect("attached above");
            let outcome = relay::run(
                &mut self.client,
                attached.checkout.conn(),
                &mut self.flow,
                first,
                opts,
            )
            .await;
            match outcome {
                Ok(RelayEnd::ClientGone {
                    terminated,
                    server_dirty,
                }) => {
                    self.left = Some(Departure {
                        terminated,
                        server_dirty,
                    });
                    return Ok(Exit::ClientGone);
                }
                Ok(RelayEnd::Intercepted(frame)) => {
                    // SET/RESET/SHOW pgrouter.route inside a transaction: answered here too
                    let status = self.flow.status();
                    let answer = match messages::query_text(frame.body())
                        .and_then(hint::session_command)
                    {
                        Some(Ok(cmd)) => self.routing.session_command(cmd, status),
                        other => {
                            let msg = other
                                .and_then(Result::err)
                                .unwrap_or_else(|| "malformed pgrouter command".into());
                            let mut out = BytesMut::from(
                                &messages::error_response(Severity::Error, SqlState("22023"), &msg)
                                    [..],
                            );
                            out.extend_from_slice(&messages::ready_for_query(status));
                            out.freeze()
                        }
                    };
                    self.client.send(&answer).await?;
                }
                Ok(RelayEnd::Idle) => {
                    if self.params.mode == PoolMode::Transaction {
                        self.note_write().await;
                        self.detach();
                    }
                    if self.app.shutdown.is_cancelled() {
                        return Ok(Exit::Shutdown);
                    }
                }
                Err(e @ (Error::ServerLost { .. } | Error::ServerProtocol { .. })) => {
                    if !self.survive_lost_server(&e).await? {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits, without a server connection, for the next request that needs one.
    async fn await_request(&mut self) -> Result<Waited, Error> {
        let idle_timeout = self.app.config.proxy.client_idle_timeout;
        loop {
            let read = tokio::select! {
                biased;
                () = self.app.shutdown.cancelled(), if self.routing.held.is_none() => return Ok(Waited::Exit(Exit::Shutdown)),
                read = self.client.read_frame() => read?,
                () = sleep_unless_zero(idle_timeout) => return Ok(Waited::Exit(Exit::IdleTimeout)),
            };
            let Some(frame) = read else {
                return Ok(Waited::Exit(Exit::ClientGone));
            };
            match frame.tag() {
                b'X' => return Ok(Waited::Exit(Exit::ClientGone)),
                // Nothing is pending, so a lone Sync is answered here.
                b'S' => {
                    self.skip_until_sync = false;
                    self.client
                        .send(&messages::ready_for_query(self.routing.client_status()))
                        .await?;
                }
                tag if !relay::is_frontend_tag(tag) => return Err(relay::unexpected_message(tag)),
                _ if self.skip_until_sync => {}
                // Flush with nothing pending; COPY data outside COPY (ignored, as PostgreSQL does).
                b'H' | b'd' | b'c' | b'f' => {}
                b'Q' => return Ok(Waited::Request(Request::Query(frame))),
                b'F' => return Ok(Waited::Request(Request::Function(frame))),
                _ => return self.collect_batch(frame).await,
            }
        }
    }

    /// Reads extended-protocol messages up to Sync or Flush (or a size limit), so the whole
    /// batch is routed together.
    async fn collect_batch(&mut self, first: Frame) -> Result<Waited, Error> {
        let mut bytes = first.as_bytes().len();
        let mut frames = vec![first];
        while frames.len() < BATCH_MAX_MESSAGES && bytes < BATCH_MAX_BYTES {
            let Some(frame) = self.client.read_frame().await? else {
                return Ok(Waited::Exit(Exit::ClientGone));
            };
            let tag = frame.tag();
            if tag == b'X' {
                return Ok(Waited::Exit(Exit::ClientGone));
            }
            if !relay::is_frontend_tag(tag) {
                return Err(relay::unexpected_message(tag));
            }
            bytes += frame.as_bytes().len();
            frames.push(frame);
            if !matches!(tag, b'P' | b'B' | b'D' | b'E' | b'C') {
                break;
            }
        }
        Ok(Waited::Request(Request::Batch(frames)))
    }

    /// Decides where a request goes; `None` when the proxy answered it itself.
    async fn route(
        &mut self,
        request: &Request,
    ) -> Result<Option<(Decision, Option<String>)>, Error> {
        let policy = Arc::clone(&self.params.policy);
        if self.params.mode == PoolMode::Session {
            return Ok(Some((
                Decision {
                    shard: policy.home(),
                    target: Target::Primary,
                    why: Why::SessionPooling,
                },
                None,
            )));
        }
        for _ in 0..2 {
            match self.routing.plan(&self.app.router, &policy, request) {
                Ok(Plan::Local(answer)) => {
                    self.client.send(&answer).await?;
                    return Ok(None);
                }
                Ok(Plan::Server { decision, prelude }) => return Ok(Some((decision, prelude))),
                Err(PlanError::Error(e)) => return Err(e),
                Err(PlanError::Undecided(Undecided::Invalid(msg))) => {
                    return Err(Error::Invalid(msg));
                }
                Err(PlanError::Undecided(Undecided::NeedVolatility(names))) => {
                    if let Err(e) = self.look_up_volatility(&names).await {
                        tracing::warn!(database = %policy.database, error = %e, "cannot look up function volatility; treating the call as a write");
                        let why = Why::VolatileFunction(format!(
                            "{} (volatility unknown: {e})",
                            names.join(", ")
                        ));
                        return Ok(Some((
                            Decision {
                                shard: policy.home(),
                                target: Target::Primary,
                                why,
                            },
                            None,
                        )));
                    }
                }
            }
        }
        Err(Error::Internal(
            "function volatility still unknown after looking it up".into(),
        ))
    }

    /// Asks the primary which of `names` are VOLATILE user functions, once per name.
    async fn look_up_volatility(&mut self, names: &[String]) -> Result<(), Error> {
        let policy = Arc::clone(&self.params.policy);
        let pool = self
            .params
            .pools
            .shard(policy.home())
            .map(|s| Arc::clone(&s.primary))
            .ok_or_else(|| Error::Internal("no home shard".into()))?;
        let mut checkout = pool.checkout().await?;
        let rows = checkout
            .conn()
            .query_rows(&volatility_query(names), LOOKUP_TIMEOUT)
            .await
            .map_err(|reason| Error::ServerLost {
                server: pool.key.server.to_string(),
                reason,
            })?;
        checkout.release();
        let learned: Vec<(String, bool)> = rows
            .into_iter()
            .filter_map(|row| Some((row.first()?.clone()?, row.get(1)?.as_deref() == Some("t"))))
            .collect();
        tracing::debug!(database = %policy.database, ?learned, "function volatility looked up");
        policy.learn_volatility(learned);
        // names pg_proc does not know (not functions at all) are not writers
        let unknown = policy.unknown_functions(names);
        policy.learn_volatility(unknown.into_iter().map(|n| (n, false)));
        Ok(())
    }

    /// Borrows a server connection as `decision` says, starting a held transaction on it.
    /// `Ok(false)` if the client left while waiting.
    async fn attach(
        &mut self,
        mut decision: Decision,
        prelude: Option<String>,
    ) -> Result<bool, Error> {
        let policy = Arc::clone(&self.params.policy);
        let pools = Arc::clone(&self.params.pools);
        let shard = pools
            .shard(decision.shard)
            .ok_or_else(|| Error::Internal(format!("no shard {}", decision.shard)))?;
        let needs = self.read_needs(&mut decision, shard);
        let ban_time = self.app.config.proxy.ban_time;
        // each failed replica is banned, so this ends; the bound guards against a ban that
        // does not hold (a replica refusing only this user, say)
        let mut attempts = shard.replicas.len() + 1;
        let checkout = loop {
            attempts -= 1;
            let pool = match shard.pick(decision.target, needs, policy.load_balance) {
                Some(pool) => Arc::clone(pool),
                None => self.fallback(&mut decision, shard)?,
            };
            if pool.key.role == Role::Primary && decision.why.writes() && pool.health.in_recovery()
            {
                return Err(Error::PrimaryInRecovery {
                    server: pool.key.server.to_string(),
                });
            }
            match self.checkout(&pool).await {
                Ok(Some(checkout)) => break checkout,
                Ok(None) => return Ok(false),
                // nothing was sent yet: ban the replica and route again
                Err(e @ Error::Connect { .. })
                    if pool.key.role == Role::Replica && attempts > 0 =>
                {
                    pool.health.ban(ban_time, &e.to_string());
                }
                Err(e) => return Err(e),
            }
        };
        let conn = checkout.conn_ref();
        self.params.cancel.set_target(Some(CancelTarget {
            addr: conn.addr.clone(),
            key: conn.backend_key.clone(),
        }));
        self.flow = Flow::default();
        let mut attached = Attached {
            checkout,
            decision,
            started_idle: prelude.is_none(),
        };
        if let Some(prelude) = prelude {
            let conn = attached.checkout.conn();
            match conn.run_simple(&prelude, RESET_TIMEOUT).await {
                Ok(status) => {
                    self.flow.set_status(status);
                    self.routing.held = None;
                }
                Err(reason) => {
                    if let Some(held) = &mut self.routing.held {
                        held.failed = true;
                    }
                    let server = conn.addr.to_string();
                    if conn.status == TxStatus::Idle {
                        attached.checkout.release();
                    }
                    self.params.cancel.set_target(None);
                    return Err(Error::TransactionStart { server, reason });
                }
            }
        }
        self.server = Some(attached);
        Ok(true)
    }

    /// What a read needs of a replica; read-your-writes may also send it to the primary.
    fn read_needs(&self, decision: &mut Decision, shard: &crate::backend::ShardPools) -> ReadNeeds {
        let policy = &self.params.policy;
        let mut needs = ReadNeeds {
            max_lag: policy.max_replica_lag,
            min_lsn: None,
        };
        let Some(write) = self.routing.last_write else {
            return needs;
        };
        if decision.target == Target::Primary {
            return needs;
        }
        match policy.read_your_writes {
            ReadYourWrites::Off => {}
            ReadYourWrites::PrimaryAfterWrite if write.at.elapsed() < policy.max_replica_lag => {
                *decision = Decision {
                    target: Target::Primary,
                    why: Why::ReadYourWrites,
                    ..decision.clone()
                };
            }
            ReadYourWrites::PrimaryAfterWrite => {}
            ReadYourWrites::Lsn => {
                let with_lsn = ReadNeeds {
                    min_lsn: write.lsn,
                    ..needs
                };
                if write.lsn.is_some()
                    && shard
                        .pick(decision.target, with_lsn, policy.load_balance)
                        .is_none()
                    && shard
                        .pick(decision.target, needs, policy.load_balance)
                        .is_some()
                {
                    // replicas are up but none has replayed this client's last write yet
                    *decision = Decision {
                        target: Target::Primary,
                        why: Why::ReadYourWrites,
                        ..decision.clone()
                    };
                }
                needs = with_lsn;
            }
        }
        needs
    }

    /// No replica qualifies: fall back to the primary or fail, as replica_fallback says.
    fn fallback(
        &self,
        decision: &mut Decision,
        shard: &crate::backend::ShardPools,
    ) -> Result<Arc<Pool>, Error> {
        let policy = &self.params.policy;
        let report = shard.replica_report();
        match policy.replica_fallback {
            ReplicaFallback::Primary => {
                *decision = Decision {
                    target: Target::Primary,
                    why: Why::Fallback(report),
                    ..decision.clone()
                };
                Ok(Arc::clone(&shard.primary))
            }
            ReplicaFallback::Error => Err(Error::NoReplica {
                database: policy.database.clone(),
                shard: decision.shard.0,
                report,
            }),
        }
    }

    /// Waits for a connection from `pool`; `None` if the client vanished while waiting. A
    /// free connection is taken at once; a client that said goodbye with Terminate still has
    /// what it sent before run, as PostgreSQL would.
    async fn checkout(&mut self, pool: &Arc<Pool>) -> Result<Option<Checkout>, Error> {
        tokio::select! {
            biased;
            checkout = pool.checkout() => checkout.map(Some),
            said_goodbye = self.client.closed() => {
                if said_goodbye { pool.checkout().await.map(Some) } else { Ok(None) }
            }
        }
    }

    /// After an idle point on the primary following a write: remember it for read-your-writes.
    async fn note_write(&mut self) {
        let policy = Arc::clone(&self.params.policy);
        let Some(attached) = self.server.as_mut() else {
            return;
        };
        if attached.role() != Role::Primary
            || !attached.decision.why.writes()
            || !policy.has_replicas(attached.decision.shard)
        {
            return;
        }
        let lsn = match policy.read_your_writes {
            ReadYourWrites::Off => return,
            ReadYourWrites::PrimaryAfterWrite => None,
            ReadYourWrites::Lsn => {
                let rows = attached
                    .checkout
                    .conn()
                    .query_rows("SELECT pg_current_wal_insert_lsn()", LOOKUP_TIMEOUT)
                    .await;
                // if the position cannot be read, no replica qualifies until the next write
                Some(
                    rows.ok()
                        .and_then(|r| r.first()?.first()?.as_deref().and_then(parse_lsn))
                        .unwrap_or(u64::MAX),
                )
            }
        };
        self.routing.last_write = Some(WriteMark {
            lsn,
            at: Instant::now(),
        });
    }

    fn detach(&mut self) {
        self.params.cancel.set_target(None);
        if let Some(attached) = self.server.take() {
            if self.flow.tainted() {
                tracing::debug!(server = %attached.checkout.conn_ref().addr, "closing a connection whose answers could not be counted exactly");
            } else {
                attached.checkout.release();
            }
        }
    }

    /// The server went away mid-request. A replica is banned. Outside a transaction nothing
    /// the client relies on was lost: it gets an error for the request and keeps its session.
    async fn survive_lost_server(&mut self, error: &Error) -> Result<bool, Error> {
        self.params.cancel.set_target(None);
        let Some(attached) = self.server.take() else {
            return Ok(false);
        };
        if attached.role() == Role::Replica {
            attached
                .checkout
                .pool()
                .health
                .ban(self.app.config.proxy.ban_time, &error.to_string());
        }
        if !attached.started_idle
            || self.flow.status() != TxStatus::Idle
            || self.params.mode == PoolMode::Session
        {
            return Ok(false);
        }
        drop(attached); // closes the dead connection
        tracing::info!(error = %error, "server lost outside a transaction; the client keeps its session");
        self.client.send_error(Severity::Error, error).await;
        for _ in 0..self.flow.pending() {
            self.client
                .send(&messages::ready_for_query(TxStatus::Idle))
                .await?;
        }
        self.skip_until_sync = self.flow.unsynced();
        Ok(true)
    }

    /// Answers a request that could not be served, keeping the session usable.
    async fn reject(&mut self, expects_ready: bool, err: &Error) -> Result<(), Error> {
        tracing::debug!(error = %err, kind = err.kind(), "request refused");
        self.client.send_error(Severity::Error, err).await;
        // an error inside a transaction aborts it, as on PostgreSQL
        if let Some(held) = &mut self.routing.held {
            held.failed = true;
        }
        if expects_ready {
            self.client
                .send(&messages::ready_for_query(self.routing.client_status()))
                .await
        } else {
            self.skip_until_sync = true;
            Ok(())
        }
    }

    /// Returns the session's server connection to the pool only if it can be made clean.
    async fn dispose_server(&mut self, usable: bool) {
        self.params.cancel.set_target(None);
        let Some(mut attached) = self.server.take() else {
            return;
        };
        let left = self.left.unwrap_or(Departure {
            terminated: false,
            server_dirty: false,
        });
        if !usable || left.server_dirty || self.flow.tainted() {
            return; // dropping the checkout closes the connection
        }
        let conn = attached.checkout.conn();
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
        attached.checkout.release();
    }
}

async fn sleep_unless_zero(d: Duration) {
    if d.is_zero() {
        std::future::pending::<()>().await;
    } else {
        tokio::time::sleep(d).await;
    }
}
