//! How a routed request gets its server connection: the attachment itself (`Attached`, and
//! what its statements do to the session: `Effects`), picking the server (health, lag,
//! read-your-writes, load balancing, fallback), waiting for the pool, starting a held
//! transaction, looking up function volatility, and recording writes for read-your-writes.

use std::sync::Arc;
use std::time::Instant;

use super::{LOOKUP_TIMEOUT, RESET_TIMEOUT, Session};
use crate::backend::health::{BanReason, parse_lsn};
use crate::backend::{Checkout, Pool, ReadNeeds, ShardPools};
use crate::config::{ReadYourWrites, ReplicaFallback};
use crate::error::Error;
use crate::frontend::client::ClientIo;
use crate::frontend::clients::ClientState;
use crate::frontend::routing::{Routed, WriteMark};
use crate::frontend::settings;
use crate::protocol::messages::TxStatus;
use crate::router::classify::Classification;
use crate::router::policy::volatility_query;
use crate::router::{Decision, Role, Target, Why};

/// How often applying a client's settings is tried on a connection with a statement_timeout
/// (see `apply_settings`).
const APPLY_ATTEMPTS: usize = 5;

/// A server connection lent to the session, with the decision that chose it.
pub(super) struct Attached {
    pub(super) checkout: Checkout,
    pub(super) decision: Decision,
    /// The attachment began outside a transaction block, so losing the server loses no
    /// state the client relies on.
    pub(super) started_idle: bool,
    /// What the statements relayed on it do to the session.
    pub(super) effects: Effects,
    /// DDL on sharded tables run in this transaction, to be run on the other shards when it
    /// commits (`schema.rs`).
    pub(super) elsewhere: Vec<bytes::Bytes>,
}

/// What statements do to the session beyond their results.
#[derive(Default)]
pub(super) struct Effects {
    /// Settings may have changed: read them back before the connection goes back.
    pub(super) session_state: bool,
    /// State that cannot move was created: the client keeps the connection.
    pub(super) pins: Option<&'static str>,
    /// DISCARD ALL: the server dropped its prepared statements.
    pub(super) discards_all: bool,
    /// A statement that may change data ran. Kept only when the route was forced (a hint,
    /// `pgrouter.route` or a rule), the one case where the decision does not tell.
    pub(super) may_write: bool,
}

impl Effects {
    pub(super) fn add(&mut self, class: &Classification) {
        self.session_state |= class.session_state;
        self.discards_all |= class.discards_all;
        self.pins = self.pins.or(class.pins);
    }
}

impl Attached {
    pub(super) fn role(&self) -> Role {
        self.checkout.pool().key.role
    }

    /// Whether data may have changed on this server: the decision says so, or, for a forced
    /// route, one of the statements relayed may write. A read sent to the primary by
    /// `SET pgrouter.route = 'primary'` is not a write for read-your-writes.
    fn may_have_written(&self) -> bool {
        if self.decision.why.forced() { self.effects.may_write } else { self.decision.why.writes() }
    }
}

impl<S: ClientIo> Session<S> {
    /// Asks the primary which of `names` are VOLATILE user functions, once per name.
    pub(super) async fn look_up_volatility(&mut self, names: &[String]) -> Result<(), Error> {
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
            .map_err(|reason| Error::ServerLost { server: pool.key.server.to_string(), reason })?;
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
    pub(super) async fn attach(&mut self, routed: Routed) -> Result<bool, Error> {
        if !self.pause_gate().await {
            return Ok(false);
        }
        let Routed { mut decision, prelude } = routed;
        let balance = self.params.policy.load_balance;
        let pools = Arc::clone(&self.params.pools);
        let shard =
            pools.shard(decision.shard).ok_or_else(|| Error::Internal(format!("no shard {}", decision.shard)))?;
        let needs = self.read_needs(&mut decision, shard);
        // each failed replica is banned, so this ends; the bound guards against a ban that
        // does not hold (a replica refusing only this user, say)
        let mut attempts = shard.replicas.len() + 1;
        let checkout = loop {
            attempts -= 1;
            let fallback;
            let pool = match shard.pick(decision.target, needs, balance) {
                Some(pool) => pool,
                None => {
                    fallback = self.fallback(&mut decision, shard)?;
                    &fallback
                }
            };
            if pool.key.role == Role::Primary && decision.why.writes() && pool.health.in_recovery() {
                return Err(Error::PrimaryInRecovery { server: pool.key.server.to_string() });
            }
            match self.checkout(pool).await {
                Ok(Some(checkout)) => break checkout,
                Ok(None) => return Ok(false),
                // nothing was sent yet: ban the replica and route again
                Err(e @ Error::Connect { .. }) if pool.key.role == Role::Replica && attempts > 0 => {
                    pool.health.ban(self.app.now().config.proxy.ban_time, BanReason::ServerLost, &e.to_string());
                }
                Err(e) => return Err(e),
            }
        };
        let mut checkout = checkout;
        self.apply_settings(&mut checkout).await?;
        let conn = checkout.conn_ref();
        self.params.cancel.set_target(Some(Arc::clone(&conn.cancel)));
        self.flow.reset();
        let mut attached = Attached {
            checkout,
            decision,
            started_idle: prelude.is_none(),
            effects: Effects::default(),
            elsewhere: Vec::new(),
        };
        if let Some(prelude) = prelude {
            let conn = attached.checkout.conn();
            match Box::pin(conn.run_simple(&prelude, RESET_TIMEOUT)).await {
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

    /// Makes the connection's session settings the client's (one round trip, only when they
    /// differ). A setting the server refuses is the client's error, as at PostgreSQL's login.
    pub(super) async fn apply_settings(&mut self, checkout: &mut Checkout) -> Result<(), Error> {
        let conn = checkout.conn();
        if Arc::ptr_eq(&self.settings, &conn.settings) {
            return Ok(());
        }
        let Some(sql) = settings::apply_sql(&self.settings, &conn.settings) else {
            // Equal settings in two copies: both sides keep the one at the lower address (any
            // fixed choice would do), so clients and connections with the same settings
            // converge on one copy and later checks compare pointers only.
            if Arc::as_ptr(&conn.settings) < Arc::as_ptr(&self.settings) {
                self.settings = Arc::clone(&conn.settings);
            } else {
                conn.settings = Arc::clone(&self.settings);
            }
            return Ok(());
        };
        // A statement_timeout on the connection (another client's, say) applies to this
        // statement too, until it resets it: a server that stalls longer (a busy machine, a
        // timeout of a millisecond) cancels it, and nothing changed. It is tried again then, a
        // few times, before the client gets the error.
        let mut attempts = if settings::times_out(&conn.settings) { APPLY_ATTEMPTS } else { 1 };
        let outcome = loop {
            let outcome = Box::pin(conn.run_simple(&sql, RESET_TIMEOUT)).await;
            attempts -= 1;
            match &outcome {
                Err(reason) if attempts > 0 && !conn.broken && conn.status == TxStatus::Idle => {
                    tracing::debug!(server = %conn.addr, %reason, "applying session settings failed on a connection with a statement_timeout; trying again");
                }
                _ => break outcome,
            }
        };
        match outcome {
            Ok(TxStatus::Idle) => {
                conn.settings = Arc::clone(&self.settings);
                Ok(())
            }
            Ok(_) | Err(_) if conn.broken => Err(Error::ServerLost {
                server: conn.addr.to_string(),
                reason: "no answer while applying session settings".into(),
            }),
            Ok(_) => Err(Error::Internal("applying session settings left a transaction open".into())),
            Err(reason) => Err(Error::Invalid(format!("cannot apply session settings: {reason}"))),
        }
    }

    /// After a request on a transaction-pooled connection, before the connection is given
    /// back: read back settings the request may have changed, pin the client if it created
    /// state that cannot move, and remember a write for read-your-writes.
    pub(super) async fn after_request(&mut self) {
        let Some(attached) = self.server.as_mut() else {
            return;
        };
        if attached.effects.discards_all {
            attached.checkout.conn().statements.clear();
            self.statements.clear();
        }
        if attached.effects.session_state {
            let conn = attached.checkout.conn();
            let sql =
                settings::capture_sql(self.custom_settings.iter().chain(conn.settings.keys()).map(String::as_str));
            match Box::pin(conn.query_rows(&sql, LOOKUP_TIMEOUT)).await {
                Ok(rows) => {
                    self.settings = Arc::new(settings::from_rows(rows));
                    conn.settings = Arc::clone(&self.settings);
                    self.statements.set_search_path(self.settings.get("search_path").map(String::as_str));
                }
                Err(e) if conn.broken => {
                    tracing::warn!(server = %conn.addr, error = %e, "cannot read back session settings; the connection will be closed");
                }
                Err(e) => {
                    // the server refused the read-back (a tiny statement_timeout, say): the
                    // connection still has the client's settings, so the client keeps it
                    tracing::warn!(server = %conn.addr, error = %e, "cannot read back session settings; the client keeps its connection");
                    attached.effects.pins =
                        attached.effects.pins.or(Some("session settings pgrouter could not read back"));
                }
            }
        }
        if let Some(why) = attached.effects.pins {
            self.pinned = Some(why);
            self.me.entry.set_pinned();
            let pinned = self.app.pinned_clients.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            tracing::info!(user = %self.params.user, database = %self.params.database, reason = why, pinned_clients = pinned,
                "client pinned to its server connection until it disconnects");
        }
        self.note_write().await;
    }

    /// What a read needs of a replica; read-your-writes may also send it to the primary.
    pub(super) fn read_needs(&self, decision: &mut Decision, shard: &ShardPools) -> ReadNeeds {
        let policy = &self.params.policy;
        let mut needs = ReadNeeds { max_lag: policy.max_replica_lag, min_lsn: None };
        let Some(write) = self.routing.last_write else {
            return needs;
        };
        if decision.target == Target::Primary {
            return needs;
        }
        match policy.read_your_writes {
            ReadYourWrites::Off => {}
            ReadYourWrites::PrimaryAfterWrite if write.at.elapsed() < policy.max_replica_lag => {
                *decision = Decision { target: Target::Primary, why: Why::ReadYourWrites, ..decision.clone() };
            }
            ReadYourWrites::PrimaryAfterWrite => {}
            ReadYourWrites::Lsn => {
                let with_lsn = ReadNeeds { min_lsn: write.lsn, ..needs };
                if write.lsn.is_some()
                    && shard.pick(decision.target, with_lsn, policy.load_balance).is_none()
                    && shard.pick(decision.target, needs, policy.load_balance).is_some()
                {
                    // replicas are up but none has replayed this client's last write yet
                    *decision = Decision { target: Target::Primary, why: Why::ReadYourWrites, ..decision.clone() };
                }
                needs = with_lsn;
            }
        }
        needs
    }

    /// No replica qualifies: fall back to the primary or fail, as replica_fallback says.
    pub(super) fn fallback(&self, decision: &mut Decision, shard: &ShardPools) -> Result<Arc<Pool>, Error> {
        let policy = &self.params.policy;
        let report = shard.replica_report();
        match policy.replica_fallback {
            ReplicaFallback::Primary => {
                *decision = Decision { target: Target::Primary, why: Why::Fallback(report), ..decision.clone() };
                Ok(Arc::clone(&shard.primary))
            }
            ReplicaFallback::Error => {
                Err(Error::NoReplica { database: policy.database.clone(), shard: decision.shard.0, report })
            }
        }
    }

    /// Before a request takes its first server connection: while the database is paused
    /// (PAUSE on the admin console), wait for RESUME. Never called while the session holds a
    /// connection, so a PAUSE cannot wait on a session that waits on it. False if the client
    /// left meanwhile.
    pub(super) async fn pause_gate(&mut self) -> bool {
        if !self.app.is_paused(&self.params.database) {
            return true;
        }
        self.me.entry.set_state(ClientState::Waiting);
        let stays = tokio::select! {
            biased;
            () = self.app.wait_unpaused(&self.params.database) => true,
            said_goodbye = self.client.closed() => said_goodbye,
        };
        self.me.entry.set_state(ClientState::Idle);
        stays
    }

    /// Waits for a connection from `pool`; `None` if the client vanished while waiting. A
    /// free connection is taken at once; a client that said goodbye with Terminate still has
    /// what it sent before run, as PostgreSQL would.
    pub(super) async fn checkout(&mut self, pool: &Arc<Pool>) -> Result<Option<Checkout>, Error> {
        if let Some(checkout) = pool.try_checkout() {
            self.me.entry.set_state(ClientState::Active);
            return Ok(Some(checkout));
        }
        let started = Instant::now();
        self.me.entry.set_waiting_since(started);
        let checkout = tokio::select! {
            biased;
            checkout = pool.checkout_timed(&mut self.waiting, started) => checkout.map(Some),
            said_goodbye = self.client.closed() => {
                if said_goodbye { pool.checkout().await.map(Some) } else { Ok(None) }
            }
        };
        if let Err(Error::PoolTimeout { pool, waited }) = &checkout {
            tracing::warn!(client = %self.me.entry.addr, user = %self.params.user, database = %self.params.database,
                %pool, ?waited, "query_wait_timeout: no server connection became free; the request fails");
        }
        let now = if matches!(checkout, Ok(Some(_))) { ClientState::Active } else { ClientState::Idle };
        self.me.entry.set_state(now);
        checkout
    }

    /// After an idle point on the primary following a write: remember it for read-your-writes.
    pub(super) async fn note_write(&mut self) {
        let policy = &self.params.policy;
        let Some(attached) = self.server.as_mut() else {
            return;
        };
        if attached.role() != Role::Primary
            || !attached.may_have_written()
            || !policy.has_replicas(attached.decision.shard)
        {
            return;
        }
        let lsn = match policy.read_your_writes {
            ReadYourWrites::Off => return,
            ReadYourWrites::PrimaryAfterWrite => None,
            ReadYourWrites::Lsn => {
                let rows =
                    Box::pin(attached.checkout.conn().query_rows("SELECT pg_current_wal_insert_lsn()", LOOKUP_TIMEOUT))
                        .await;
                // if the position cannot be read, no replica qualifies until the next write
                Some(rows.ok().and_then(|r| r.first()?.first()?.as_deref().and_then(parse_lsn)).unwrap_or(u64::MAX))
            }
        };
        self.routing.last_write = Some(WriteMark { lsn, at: Instant::now() });
    }
}
