//! One client's session after login: waits for a request, routes it (transaction pooling),
//! borrows a server connection for the route, relays until the pair is idle, and gives the
//! connection back (transaction pooling) or keeps it until the client leaves (session
//! pooling, which sends everything to the primary of the home shard).
//!
//! When the client leaves, its server connection is only returned to the pool clean: a
//! running statement is cancelled and the connection closed; an open transaction is rolled
//! back; in session mode the connection is reset with DISCARD ALL.
//!
//! Submodules: `attach` (how a routed request gets its server connection), `dispose` (the
//! server connection when things end), `scatter`, `copy` and `schema` (sharded databases:
//! one query on every shard, COPY split by row, DDL committed on every shard).
//!
//! Those rare paths are awaited boxed, so their state is allocated only while they run: a
//! session's task then stays small however many clients sit idle (see docs/BENCHMARKS.md).

mod attach;
mod copy;
mod dispose;
mod scatter;
mod schema;
mod shutdown;

use std::collections::BTreeSet;
use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use attach::Attached;

use super::cancel::Registration;
use super::client::{ClientIo, ClientStream};
use super::clients::{ClientState, Registered};
use super::flow::Flow;
use super::prepared::{self, ClientStatements, Deallocate, Exchange};
use super::relay::Renaming;
use super::relay::{self, RelayEnd, RelayOptions};
use super::routing::{Plan, PlanError, Request, Routed, RoutingState};
use crate::app::App;
use crate::backend::conn::Settings;
use crate::backend::{ClusterPools, Waiting};
use crate::config::PoolMode;
use crate::error::{Error, SqlState};
use crate::protocol::framing::Frame;
use crate::protocol::messages::{self, Severity, TxStatus};
use crate::router::hint;
use crate::router::policy::Undecided;
use crate::router::{Decision, Policy, Role, Target, Why};
use crate::telemetry::{DatabaseMetrics, RouteLabel};
use bytes::BytesMut;
use shutdown::ShutdownWait;
use tokio_util::sync::CancellationToken;

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
    /// The session settings the client asked for at startup (name lower-cased -> value).
    pub settings: Settings,
    pub pools: Arc<ClusterPools>,
    pub policy: Arc<Policy>,
    pub cancel: Registration,
    /// The config snapshot `pools` and `policy` come from.
    pub generation: u64,
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
    /// The session settings the client has made (from startup, SET, RESET, set_config),
    /// applied to each server connection it borrows.
    settings: Arc<Settings>,
    /// Why the client keeps its server connection for good (transaction pooling), if it does.
    pinned: Option<&'static str>,
    /// The client's named prepared statements (transaction pooling renames them).
    statements: ClientStatements,
    /// The replies owed while relaying and the renaming of statements, reused across relays.
    exchange: Exchange,
    /// The list an extended-protocol batch is read into, reused from batch to batch.
    batch: Vec<Frame>,
    /// Custom settings (`myapp.x`) the client's statements mention: pg_settings does not
    /// show them, so they are read back by name.
    custom_settings: BTreeSet<String>,
    /// The client's entry in the app's client list (state for SHOW CLIENTS and metrics).
    me: Registered,
    /// The database's request metrics.
    metrics: Arc<DatabaseMetrics>,
    /// The app's shutdown signal, as a child token of its own: waiting on it between requests
    /// then touches only this session's state, not a lock every session shares.
    shutdown: CancellationToken,
    /// Waiting for `shutdown` between requests.
    shutdown_wait: ShutdownWait,
    /// `client_idle_timeout` of the config snapshot the session follows.
    idle_timeout: Duration,
    /// Times the session's waits for a pool slot (`query_wait_timeout`).
    waiting: Waiting,
}

impl<S: ClientIo> Session<S> {
    pub fn new(app: Arc<App>, client: ClientStream<S>, params: SessionParams, me: Registered) -> Self {
        let settings = Arc::new(params.settings.clone());
        let mut statements = ClientStatements::default();
        statements.set_search_path(settings.get("search_path").map(String::as_str));
        let snapshot = app.now();
        let metrics = snapshot
            .database_metrics
            .get(&params.database)
            .cloned()
            .unwrap_or_else(|| Arc::new(DatabaseMetrics::new(&app.telemetry, &params.database)));
        let shutdown = app.shutdown.child_token();
        Self {
            me,
            metrics,
            shutdown_wait: ShutdownWait::new(&shutdown),
            shutdown,
            idle_timeout: snapshot.config.proxy.client_idle_timeout,
            app,
            client,
            params,
            server: None,
            flow: Flow::default(),
            routing: RoutingState::default(),
            settings,
            pinned: None,
            statements,
            exchange: Exchange::default(),
            batch: Vec::new(),
            custom_settings: BTreeSet::new(),
            skip_until_sync: false,
            left: None,
            waiting: Waiting::default(),
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
                self.app.telemetry.counter("pgrouter_errors_total", &[("kind", e.kind())]).increment(1);
                self.client.send_error(Severity::Fatal, e).await;
            }
        }
        let server_usable = !matches!(outcome, Err(Error::ServerLost { .. } | Error::ServerProtocol { .. }));
        Box::pin(self.dispose_server(server_usable)).await;
        if self.pinned.is_some() {
            self.app.pinned_clients.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    async fn serve(&mut self) -> Result<Exit, Error> {
        loop {
            let first = if self.server.is_some() {
                None
            } else {
                let request = match self.await_request().await? {
                    Waited::Request(request) => request,
                    Waited::Exit(exit) => return Ok(exit),
                };
                self.follow_reload()?;
                let attached = match self.route(&request).await {
                    Ok(Some(routed)) => self.attach(routed).await,
                    Ok(None) => continue,
                    Err(e) => Err(e),
                };
                match attached {
                    Ok(true) => Some(request),
                    Ok(false) => return Ok(Exit::ClientGone),
                    Err(e) => {
                        self.reject(request.expects_ready(), &e).await?;
                        continue;
                    }
                }
            };
            let route = self.route_label();
            let renaming = (self.params.mode == PoolMode::Transaction)
                .then(|| Renaming { registry: &self.app.statements, client: &mut self.statements });
            let movable = self.params.mode == PoolMode::Transaction && self.pinned.is_none();
            let attached = self.server.as_mut().expect("attached above");
            // every statement of the attachment counts, not only the request that routed it
            // (a SET or LISTEN later in a transaction, say)
            let (routing, router, custom) = (&mut self.routing, &self.app.router, &mut self.custom_settings);
            let (effects, shard, policy) = (&mut attached.effects, attached.decision.shard, &self.params.policy);
            let forced = attached.decision.why.forced();
            let commit_elsewhere = AtomicBool::new(!attached.elsewhere.is_empty());
            let elsewhere = &mut attached.elsewhere;
            let mut observe = |frame: &Frame, routed: bool| {
                let class = routing.observe(router, frame, custom, routed);
                if forced && !effects.may_write {
                    // a FunctionCall has no text to judge: it may write
                    effects.may_write = class.as_ref().map_or(frame.tag() == b'F', |c| policy.may_write(c));
                }
                let class = class?;
                if matches!(frame.tag(), b'Q' | b'B') {
                    class.usage.note(route.code());
                }
                effects.add(&class);
                let replaced = routing.guard_shard(policy, frame, &class, shard, elsewhere);
                commit_elsewhere.store(!elsewhere.is_empty(), Ordering::Relaxed);
                replaced
            };
            let opts = RelayOptions {
                release_when_idle: movable,
                shutdown: &self.shutdown,
                intercept: |sql, statements| {
                    hint::session_command(sql).is_some()
                        || statements.is_some_and(|s| s.local_deallocate(sql).is_some())
                },
                intercept_commit: Some(&commit_elsewhere),
                metrics: Some((&self.metrics, route)),
                renaming,
                observe: movable.then_some(&mut observe as &mut relay::Observer<'_>),
            };
            let (one, mut batch) = first.map_or((None, Vec::new()), Request::into_parts);
            let first = one.into_iter().chain(batch.drain(..));
            let outcome =
                relay::run(&mut self.client, attached.checkout.conn(), &mut self.flow, &mut self.exchange, first, opts)
                    .await;
            if batch.capacity() > 0 {
                self.batch = batch;
            }
            match outcome {
                Ok(RelayEnd::ClientGone { terminated, server_dirty }) => {
                    self.left = Some(Departure { terminated, server_dirty });
                    return Ok(Exit::ClientGone);
                }
                Ok(RelayEnd::Intercepted(frame)) if schema::commits_elsewhere(&frame, self.server.as_ref()) => {
                    let started = std::time::Instant::now();
                    let committed = Box::pin(self.commit_everywhere(frame)).await?;
                    self.count_all_shards(started);
                    if !committed {
                        self.left = Some(Departure { terminated: false, server_dirty: false });
                        return Ok(Exit::ClientGone);
                    }
                }
                Ok(RelayEnd::Intercepted(frame)) => {
                    // SET/RESET/SHOW pgrouter.route inside a transaction: answered here too
                    let status = self.flow.status();
                    let sql = messages::query_text(frame.body()).unwrap_or_default();
                    if let Some(answer) = self.answer_deallocate(sql, status) {
                        self.client.send(&answer).await?;
                        continue;
                    }
                    let answer = match hint::session_command(sql) {
                        Some(Ok(cmd)) => self.routing.session_command(cmd, status),
                        other => {
                            let msg =
                                other.and_then(Result::err).unwrap_or_else(|| "malformed pgrouter command".into());
                            let mut out =
                                BytesMut::from(&messages::error_response(Severity::Error, SqlState("22023"), &msg)[..]);
                            out.extend_from_slice(&messages::ready_for_query(status));
                            out.freeze()
                        }
                    };
                    self.client.send(&answer).await?;
                }
                Ok(RelayEnd::Idle) => {
                    if self.params.mode == PoolMode::Transaction && self.pinned.is_none() {
                        self.after_request().await;
                        if self.pinned.is_none() {
                            self.detach();
                        }
                    }
                    if self.app.draining() {
                        return Ok(Exit::Shutdown);
                    }
                }
                Err(e @ (Error::ServerLost { .. } | Error::ServerProtocol { .. })) => {
                    if !Box::pin(self.survive_lost_server(&e)).await? {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits, without a server connection, for the next request that needs one.
    async fn await_request(&mut self) -> Result<Waited, Error> {
        self.me.entry.set_state(ClientState::Idle);
        loop {
            // the read first: a request that is already here is served, and the shutdown wait
            // (a lock in the token) is polled only when there is nothing to read
            let read = tokio::select! {
                biased;
                read = self.client.read_frame() => read?,
                () = poll_fn(|cx| self.shutdown_wait.poll(cx, &self.app)), if self.routing.held.is_none() => {
                    return Ok(Waited::Exit(Exit::Shutdown));
                }
                () = sleep_unless_zero(self.idle_timeout) => return Ok(Waited::Exit(Exit::IdleTimeout)),
            };
            let Some(frame) = read else {
                return Ok(Waited::Exit(Exit::ClientGone));
            };
            match frame.tag() {
                b'X' => return Ok(Waited::Exit(Exit::ClientGone)),
                // Nothing is pending, so a lone Sync is answered here.
                b'S' => {
                    self.skip_until_sync = false;
                    self.client.send(&messages::ready_for_query(self.routing.client_status())).await?;
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
        let mut frames = std::mem::take(&mut self.batch);
        frames.push(first);
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
    async fn route(&mut self, request: &Request) -> Result<Option<Routed>, Error> {
        if self.params.mode == PoolMode::Session {
            let decision =
                Decision { shard: self.params.policy.home(), target: Target::Primary, why: Why::SessionPooling };
            return Ok(Some(Routed::primary(decision)));
        }
        if let Some(answer) =
            self.routing.prepare_locally(&self.app.router, request, &mut self.statements, &self.app.statements)
        {
            self.client.send(&answer).await?;
            return Ok(None);
        }
        if let Request::Query(frame) = request
            && prepared::may_deallocate(frame.body())
            && let Some(answer) = self
                .answer_deallocate(messages::query_text(frame.body()).unwrap_or_default(), self.routing.client_status())
        {
            self.client.send(&answer).await?;
            return Ok(None);
        }
        for _ in 0..2 {
            match self.routing.plan(&self.app.router, &self.params.policy, request) {
                Ok(Plan::Local(answer)) => {
                    self.client.send(&answer).await?;
                    return Ok(None);
                }
                Ok(Plan::Server(routed)) => return Ok(Some(routed)),
                Ok(Plan::Scatter(query)) => {
                    if !self.pause_gate().await {
                        return Err(Error::ClientIo(std::io::ErrorKind::UnexpectedEof.into()));
                    }
                    let started = std::time::Instant::now();
                    Box::pin(self.scatter(query)).await?;
                    self.count_all_shards(started);
                    return Ok(None);
                }
                Ok(Plan::CopyIn(split)) => {
                    if !self.pause_gate().await {
                        return Err(Error::ClientIo(std::io::ErrorKind::UnexpectedEof.into()));
                    }
                    let started = std::time::Instant::now();
                    if !Box::pin(self.copy_in(split)).await? {
                        return Err(Error::ClientIo(std::io::ErrorKind::UnexpectedEof.into()));
                    }
                    self.count_all_shards(started);
                    return Ok(None);
                }
                Err(PlanError::Error(e)) => return Err(e),
                Err(PlanError::Undecided(Undecided::Invalid(msg))) => {
                    return Err(Error::Invalid(msg));
                }
                Err(PlanError::Undecided(Undecided::NeedVolatility(names))) => {
                    if let Err(e) = Box::pin(self.look_up_volatility(&names)).await {
                        let policy = &self.params.policy;
                        tracing::warn!(database = %policy.database, error = %e, "cannot look up function volatility; treating the call as a write");
                        let why = Why::VolatileFunction(format!("{} (volatility unknown: {e})", names.join(", ")));
                        let decision = Decision { shard: policy.home(), target: Target::Primary, why };
                        return Ok(Some(Routed::primary(decision)));
                    }
                }
            }
        }
        Err(Error::Internal("function volatility still unknown after looking it up".into()))
    }

    /// Moves to the config snapshot a reload made, between transactions (never inside one):
    /// the new pools, routing policy and metrics serve the next request. A database or user
    /// the reload removed ends the session.
    fn follow_reload(&mut self) -> Result<(), Error> {
        if self.params.generation == self.app.generation() || self.routing.held.is_some() || self.server.is_some() {
            return Ok(());
        }
        let snapshot = self.app.now();
        let (database, user) = (&self.params.database, &self.params.user);
        if snapshot.config.user(user).is_none() {
            return Err(Error::Unauthorized(format!("user \"{user}\" was removed from pgrouter's config")));
        }
        let pools = snapshot.pools.get(database, user).cloned();
        let policy = snapshot.policies.get(database).cloned();
        let (Some(pools), Some(policy)) = (pools, policy) else {
            return Err(Error::UnknownDatabase(database.clone()));
        };
        self.params.pools = pools;
        self.params.policy = policy;
        if let Some(metrics) = snapshot.database_metrics.get(database) {
            self.metrics = Arc::clone(metrics);
        }
        self.idle_timeout = snapshot.config.proxy.client_idle_timeout;
        self.params.generation = snapshot.generation;
        Ok(())
    }

    /// Counts a request the proxy ran on every shard, and the transaction it was.
    fn count_all_shards(&self, started: std::time::Instant) {
        self.metrics.query(RouteLabel::AllShards, started.elapsed());
        self.metrics.transaction();
    }

    /// The `route` label for requests relayed on the attached connection.
    fn route_label(&self) -> RouteLabel {
        match self.server.as_ref().map(Attached::role) {
            _ if self.params.pools.shards.len() > 1 => RouteLabel::Shard,
            Some(Role::Replica) => RouteLabel::Replica,
            _ => RouteLabel::Primary,
        }
    }

    fn detach(&mut self) {
        self.params.cancel.set_target(None);
        if let Some(attached) = self.server.take() {
            // SHOW STATS' transaction time, and the connection's last use: the flow's clock
            // readings serve, so lending and returning a connection read no clock of their own
            if let Some(held) = self.flow.span() {
                self.metrics.held(held);
            }
            if self.flow.tainted() {
                tracing::debug!(server = %attached.checkout.conn_ref().addr, "closing a connection whose answers could not be counted exactly");
            } else if let Some(at) = self.flow.last_ready() {
                attached.checkout.release_at(at);
            } else {
                attached.checkout.release();
            }
        }
    }

    /// Answers DEALLOCATE of the client's named statements (transaction pooling): they exist
    /// on the servers under other names, shared with other clients.
    fn answer_deallocate(&mut self, sql: &[u8], status: TxStatus) -> Option<bytes::Bytes> {
        if self.params.mode != PoolMode::Transaction {
            return None;
        }
        let what = self.statements.local_deallocate(sql)?;
        self.statements.deallocate(&what);
        let tag = if what == Deallocate::All { "DEALLOCATE ALL" } else { "DEALLOCATE" };
        let mut out = BytesMut::from(&messages::command_complete(tag)[..]);
        out.extend_from_slice(&messages::ready_for_query(status));
        Some(out.freeze())
    }

    /// Answers a request that could not be served, keeping the session usable.
    async fn reject(&mut self, expects_ready: bool, err: &Error) -> Result<(), Error> {
        tracing::debug!(error = %err, kind = err.kind(), "request refused");
        self.app.telemetry.counter("pgrouter_errors_total", &[("kind", err.kind())]).increment(1);
        self.client.send_error(Severity::Error, err).await;
        // an error inside a transaction aborts it, as on PostgreSQL
        if let Some(held) = &mut self.routing.held {
            held.failed = true;
        }
        if expects_ready {
            self.client.send(&messages::ready_for_query(self.routing.client_status())).await
        } else {
            self.skip_until_sync = true;
            Ok(())
        }
    }
}

async fn sleep_unless_zero(d: Duration) {
    if d.is_zero() {
        std::future::pending::<()>().await;
    } else {
        crate::timer::sleep(d).await;
    }
}
