//! A session's routing state and the decisions that need it: which statements a request
//! carries (a Query's text, a batch's Parses and the prepared statements its Binds use), the
//! route they take together, the transaction the proxy holds after a client's BEGIN, the
//! `pgrouter.route` session setting, and the client's last write for read-your-writes.
//!
//! Pure: no sockets. The session does the waiting; this decides and answers locally.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::prepared::{ClientStatements, Registry};
use super::settings;
use crate::backend::health::Lsn;
use crate::error::{Error, SqlState};
use crate::protocol::framing::Frame;
use crate::protocol::messages::{self, TxStatus};
use crate::router::classify::{Access, Classification, TxControl, TxModes};
use crate::router::hint::{self, Hints, RouteHint, SessionCommand};
use crate::router::policy::Undecided;
use crate::router::sharded::Shards;
use crate::router::{Decision, Policy, Router, Target};
use crate::telemetry::RouteLabel;
pub use shards::{CopySplit, Scatter};

mod shards;
#[cfg(test)]
mod tests;

/// Prepared statements remembered per session for routing their Binds; beyond this the
/// oldest knowledge is simply forgotten (a Bind of a forgotten statement goes to the primary).
const MAX_PREPARED: usize = 10_000;

/// What a detached session received and must route.
#[derive(Debug)]
pub enum Request {
    /// A simple Query.
    Query(Frame),
    /// Extended-protocol messages up to and including a Sync or Flush.
    Batch(Vec<Frame>),
    /// A FunctionCall (the fast-path interface, used for large objects).
    Function(Frame),
}

impl Request {
    /// The request's messages: a lone Query or FunctionCall, or a batch (whose list the
    /// caller may reuse once it is drained).
    #[must_use]
    pub fn into_parts(self) -> (Option<Frame>, Vec<Frame>) {
        match self {
            Self::Query(f) | Self::Function(f) => (Some(f), Vec::new()),
            Self::Batch(frames) => (None, frames),
        }
    }

    /// Whether the client expects a ReadyForQuery for this request as it stands: after a
    /// Query or FunctionCall, or a batch that ends with Sync. Otherwise an error must be
    /// followed by skipping to the client's next Sync.
    #[must_use]
    pub fn expects_ready(&self) -> bool {
        match self {
            Self::Query(_) | Self::Function(_) => true,
            Self::Batch(frames) => frames.last().is_some_and(|f| f.tag() == b'S'),
        }
    }
}

/// A transaction the client opened that the proxy has not started on a server yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldTx {
    /// BEGIN and any SET TRANSACTION, replayed on the server when the first statement comes.
    pub statements: Vec<String>,
    pub modes: TxModes,
    /// Hints on the BEGIN itself (`/* pgrouter: route=primary */ BEGIN READ ONLY`).
    pub hints: Hints,
    /// Starting it on the server failed; the client must end it.
    pub failed: bool,
}

/// The client's last write, for read-your-writes.
#[derive(Debug, Clone, Copy)]
pub struct WriteMark {
    /// The primary's WAL position after the write committed (`read_your_writes = "lsn"`).
    pub lsn: Option<Lsn>,
    pub at: Instant,
}

#[derive(Debug, Clone)]
struct Prepared {
    sql: Bytes,
    class: Arc<Classification>,
    /// Parameter types the Parse declared (a binary key is read by them).
    types: Arc<[u32]>,
}

impl Prepared {
    fn new(sql: &[u8], class: Arc<Classification>, parse: &Frame) -> Self {
        let types = messages::parse_param_types(parse.body()).unwrap_or_default();
        Self { sql: Bytes::copy_from_slice(sql), class, types: types.into() }
    }

    /// Whether the Parse of `name` and `sql` (`parse`) prepares exactly this again (same
    /// text, same declared types): drivers that use the unnamed statement send the same Parse
    /// with every execution.
    fn is(&self, name: &[u8], sql: &[u8], parse: &Frame) -> bool {
        // the types follow the name and the text, each ended by a zero byte
        let types = parse.body().get(name.len() + sql.len() + 2..).unwrap_or_default();
        self.sql == sql && messages::parse_param_types_eq(types, &self.types)
    }
}

/// Counts statements the proxy runs on every shard itself (they are not relayed, where the
/// session's observer counts the others) for SHOW ROUTES.
fn note_all_shards(statements: &[Statement]) {
    for (_, class, _) in statements {
        class.usage.note(RouteLabel::AllShards.code());
    }
}

/// DDL alone in its text: in a transaction it may run on every shard (see `guard_shard`).
fn schema_only(class: &Classification) -> bool {
    class.tables.ddl && !class.tables.several
}

/// What routing a request led to.
#[derive(Debug)]
pub enum Plan {
    /// Answered by the proxy; these bytes go to the client.
    Local(Bytes),
    /// Send to a server.
    Server(Routed),
    /// Run a statement on every shard and answer with the combined result.
    Scatter(Scatter),
    /// Split a COPY FROM STDIN's rows between the shards.
    CopyIn(CopySplit),
}

/// A statement of a request: its text, classification, and the Bind that executes it.
type Statement = (Bytes, Arc<Classification>, Option<Frame>);

/// Where a request goes.
#[derive(Debug)]
pub struct Routed {
    pub decision: Decision,
    /// A held BEGIN (and SET TRANSACTION) to run on the server first.
    pub prelude: Option<String>,
}

impl Routed {
    /// Everything on the primary of `shard` (session pooling, pinned clients).
    #[must_use]
    pub fn primary(decision: Decision) -> Self {
        Self { decision, prelude: None }
    }
}

#[derive(Default)]
pub struct RoutingState {
    pub route_setting: Option<RouteHint>,
    pub held: Option<HeldTx>,
    pub last_write: Option<WriteMark>,
    prepared: super::NameMap<Prepared>,
    /// Lists `plan` fills and empties per request, kept for their allocations.
    statements_buf: Vec<Statement>,
    hints_buf: Vec<Hints>,
    /// The shape of `shaped` (and where its literals are, for shard keys).
    scratch: crate::router::shape::Shape,
    /// The text last shaped, and its classification once looked up: routing, the shard-key
    /// reader and the relay's observer meet the same text in turn, shaped and looked up once.
    shaped: Vec<u8>,
    shaped_class: Option<Arc<Classification>>,
}

impl RoutingState {
    /// The classification of `sql`: the one just made if `sql` is the text last classified
    /// or has its shape, else from the router (its shape cache, or a parse). Leaves `sql`'s
    /// shape in `scratch`.
    fn classify(&mut self, router: &Router, sql: &[u8]) -> Arc<Classification> {
        let new_text = self.shape(sql);
        if let Some(class) = &self.shaped_class {
            if new_text {
                // the shape of the statement before, run again with other values
                router.count_hit();
            }
            return Arc::clone(class);
        }
        let class = router.classify_shaped(sql, &self.scratch);
        self.shaped_class = Some(Arc::clone(&class));
        class
    }

    /// A Query body's text; the text shaped last (the Query just routed, which the relay
    /// observes) is known without a search for its end, as no shaped text holds a zero byte.
    fn query_text<'a>(&self, body: &'a [u8]) -> Option<&'a [u8]> {
        let known = matches!(body.split_last(), Some((0, text)) if *text == self.shaped[..]);
        known.then(|| &body[..body.len() - 1]).or_else(|| messages::query_text(body))
    }

    /// `sql` as a command about pgrouter's own settings (`hint::session_command`), if it is
    /// one. `sql` must be the text just classified: its shape, in `scratch`, turns away most
    /// statements by their first word.
    fn pgrouter_command(&self, sql: &[u8]) -> Option<Result<SessionCommand, String>> {
        let shape = &self.scratch.text;
        if !(shape.starts_with(b"set ") || shape.starts_with(b"reset ") || shape.starts_with(b"show ")) {
            return None;
        }
        hint::session_command(sql)
    }

    /// Leaves `sql`'s shape in `scratch`, shaping it only if it is not there already; true if
    /// `sql` is not the text shaped last. The classification known stays when `sql` has the
    /// shape of the text before and the class holds for every text of that shape (`cacheable`).
    fn shape(&mut self, sql: &[u8]) -> bool {
        if self.shaped == sql {
            return false;
        }
        if !self.scratch.relit(&self.shaped, sql) {
            self.scratch.of(sql);
            self.shaped_class = None;
        } else if self.shaped_class.as_ref().is_some_and(|class| !class.cacheable) {
            self.shaped_class = None;
        }
        self.shaped.clear();
        self.shaped.extend_from_slice(sql);
        true
    }

    /// The transaction status the client believes in while no server is attached.
    #[must_use]
    pub fn client_status(&self) -> TxStatus {
        match &self.held {
            None => TxStatus::Idle,
            Some(held) if held.failed => TxStatus::Failed,
            Some(_) => TxStatus::InTransaction,
        }
    }

    /// Routes a request (transaction pooling). `Err(Undecided::NeedVolatility)` asks the
    /// caller to look functions up on the primary and try again.
    pub fn plan(&mut self, router: &Router, policy: &Policy, request: &Request) -> Result<Plan, PlanError> {
        if self.held.as_ref().is_some_and(|h| h.failed) {
            return self.in_failed_transaction(router, request);
        }
        // a Query or FunctionCall is one statement; a batch's are listed below
        let query = match request {
            Request::Query(frame) => {
                let sql = messages::query_text(frame.body())
                    .ok_or_else(|| Error::Protocol("malformed Query message".into()))?;
                let class = self.classify(router, sql);
                if let Some(cmd) = self.pgrouter_command(sql) {
                    return Ok(Plan::Local(self.session_command(cmd.map_err(Error::Invalid)?, self.client_status())));
                }
                if let Some(tx) = class.tx
                    && let Some(answer) = self.transaction_control(tx, sql)
                {
                    return Ok(Plan::Local(answer));
                }
                Some((frame.share(sql), class, None))
            }
            Request::Function(_) => {
                Some((Bytes::new(), Arc::new(Classification::unparsable("a FunctionCall may write")), None))
            }
            Request::Batch(_) => None,
        };
        // the lists of statements and hints are reused from request to request
        let mut statements = std::mem::take(&mut self.statements_buf);
        let mut hints = std::mem::take(&mut self.hints_buf);
        let listed = if let Request::Batch(frames) = request {
            self.batch_statements(router, frames, &mut statements)
        } else {
            statements.extend(query);
            Ok(())
        };
        let planned = listed
            .map_err(PlanError::from)
            .and_then(|()| self.plan_statements(policy, request, &statements, &mut hints));
        statements.clear();
        hints.clear();
        self.statements_buf = statements;
        self.hints_buf = hints;
        planned
    }

    /// Routes a request's statements (see `plan`); `hints` is an empty list to fill.
    fn plan_statements(
        &mut self,
        policy: &Policy,
        request: &Request,
        statements: &[Statement],
        hints: &mut Vec<Hints>,
    ) -> Result<Plan, PlanError> {
        let keyed = match self.keyed_shard(policy, statements)? {
            Shards::One(keyed) => keyed,
            // DDL in a transaction runs on its shard and, at COMMIT, on the others (guard_shard)
            Shards::Every(_) if self.held.is_some() && statements.iter().all(|(_, c, _)| schema_only(c)) => {
                Some(policy.home())
            }
            Shards::Every(why) => {
                let plan = match self.copy_split(policy, request, statements)? {
                    Some(copy) => Plan::CopyIn(copy),
                    None => Plan::Scatter(self.scatter(policy, request, statements, &why)?),
                };
                note_all_shards(statements);
                return Ok(plan);
            }
            Shards::Split(rows) => {
                let plan = Plan::Scatter(self.split_insert(request, statements, &rows)?);
                note_all_shards(statements);
                return Ok(plan);
            }
        };
        for (sql, _, _) in statements {
            hints.push(hint::parse_hints(sql).map_err(Error::Invalid)?);
        }
        let first_hints = || hints.iter().find(|h| !h.is_empty()).cloned();
        let routed = |decision, prelude| Ok(Plan::Server(Routed { decision, prelude }));
        if let Some(held) = &self.held {
            // a read-only transaction goes to a replica if its first statements are reads (a
            // SET TRANSACTION SNAPSHOT, say, needs the primary)
            let reads = statements.iter().all(|(_, c, _)| c.access == Access::Read);
            let hints = first_hints().unwrap_or_else(|| held.hints.clone());
            policy.hinted_shard(&hints, keyed).map_err(PlanError::Undecided)?;
            let decision = policy.transaction(held.modes.on_standby() && reads, &hints, self.route_setting, keyed);
            // newline before each `;` so a trailing `-- comment` cannot swallow what follows
            let prelude = Some(held.statements.join("\n;\n"));
            return routed(decision, prelude);
        }
        let begin = statements.iter().find_map(|(_, c, _)| match c.tx {
            Some(TxControl::Begin { modes, .. }) => Some(modes),
            _ => None,
        });
        if let Some(modes) = begin {
            // an extended-protocol BEGIN: the batch itself opens the transaction
            let hints = first_hints().unwrap_or_default();
            policy.hinted_shard(&hints, keyed).map_err(PlanError::Undecided)?;
            let decision = policy.transaction(modes.on_standby(), &hints, self.route_setting, keyed);
            return routed(decision, None);
        }
        let mut strongest: Option<Decision> = None;
        for ((sql, class, _), hints) in statements.iter().zip(hints.iter()) {
            let d = policy.decide(sql, class, hints, self.route_setting, keyed).map_err(PlanError::Undecided)?;
            if strongest.as_ref().is_none_or(|s| rank(d.target) > rank(s.target)) {
                strongest = Some(d);
            }
        }
        let decision =
            strongest.unwrap_or_else(|| policy.read(keyed.unwrap_or(policy.home()), crate::router::Why::Read));
        routed(decision, None)
    }

    /// The statements an extended-protocol batch carries, with their classifications (and,
    /// for a Bind, the Bind, whose parameters may be shard keys). Parses are remembered so
    /// later Binds of the same statement route the same way.
    fn batch_statements(&mut self, router: &Router, frames: &[Frame], out: &mut Vec<Statement>) -> Result<(), Error> {
        let malformed = |what: &str| Error::Protocol(format!("malformed {what} message"));
        // the name the last statement in `out` was prepared under by this batch, while
        // no Bind has executed it yet
        let mut parsed: Option<&[u8]> = None;
        for frame in frames {
            match frame.tag() {
                b'P' => {
                    let (name, sql) = messages::parse_parse(frame.body()).ok_or_else(|| malformed("Parse"))?;
                    let class = self.classify(router, sql);
                    if self.pgrouter_command(sql).is_some() {
                        // answering it would mean emulating the extended protocol:
                        // refuse rather than let the server silently accept it
                        return Err(Error::NotSupported(
                            "send SET/RESET/SHOW pgrouter.route as a simple query, not a prepared statement".into(),
                        ));
                    }
                    let sql = self.remember(name, sql, &class, frame);
                    out.push((sql, class, None));
                    parsed = Some(name);
                }
                b'B' => {
                    let (_, name) = messages::parse_bind_names(frame.body()).ok_or_else(|| malformed("Bind"))?;
                    // the Bind of the statement just parsed: one statement, routed once
                    if parsed.take() == Some(name)
                        && let Some((_, _, bind @ None)) = out.last_mut()
                    {
                        *bind = Some(frame.clone());
                        continue;
                    }
                    let known = self.prepared.get(name).cloned();
                    out.push(known.map_or_else(
                        || {
                            (
                                Bytes::new(),
                                Arc::new(Classification::unparsable(
                                    "Bind of a statement pgrouter has not seen prepared",
                                )),
                                None,
                            )
                        },
                        |p| (p.sql, p.class, Some(frame.clone())),
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// A batch that only prepares named statements (Parse..., then Sync or Flush) needs no
    /// server: the proxy records them and answers ParseComplete itself; the real Parse goes to
    /// whichever server connection first executes them. This keeps clients that prepare
    /// synchronously while holding other transactions open (pgbench -M prepared) from
    /// waiting on a busy pool; errors in such a statement are reported when it is first used.
    pub fn prepare_locally(
        &mut self,
        router: &Router,
        request: &Request,
        statements: &mut ClientStatements,
        registry: &Registry,
    ) -> Option<Bytes> {
        let Request::Batch(frames) = request else { return None };
        let (last, parses) = frames.split_last()?;
        let named_parse = |f: &Frame| {
            f.tag() == b'P'
                && messages::parse_parse(f.body())
                    .is_some_and(|(name, sql)| !name.is_empty() && hint::session_command(sql).is_none())
        };
        if parses.is_empty() || !matches!(last.tag(), b'S' | b'H') || !parses.iter().all(named_parse) {
            return None;
        }
        let mut out = BytesMut::new();
        for frame in parses {
            let mut rest = frame.body();
            let name = crate::protocol::framing::get_cstr(&mut rest)?;
            let (_, sql) = messages::parse_parse(frame.body())?;
            let class = self.classify(router, sql);
            self.remember(name, sql, &class, frame);
            statements.define(name, rest, registry);
            out.extend_from_slice(&[b'1', 0, 0, 0, 4]);
        }
        if last.tag() == b'S' {
            out.extend_from_slice(&messages::ready_for_query(self.client_status()));
        }
        Some(out.freeze())
    }

    /// What a message relayed on an attached connection (a later request of a transaction,
    /// say) does to the session: its statement's classification, for Query, Parse and the
    /// Bind of a named statement. Parses are remembered for later routing too, unless `plan`
    /// remembered them already (`routed`: the frame is of the request it routed).
    /// Names of custom settings a statement that changes settings mentions are added to
    /// `custom` (see `settings::custom_names`).
    pub fn observe(
        &mut self,
        router: &Router,
        frame: &Frame,
        custom: &mut BTreeSet<String>,
        routed: bool,
    ) -> Option<Arc<Classification>> {
        let (class, sql) = match frame.tag() {
            b'Q' => {
                let sql = self.query_text(frame.body())?;
                (self.classify(router, sql), sql)
            }
            b'P' => {
                let (name, sql) = messages::parse_parse(frame.body())?;
                let class = self.classify(router, sql);
                if !routed {
                    self.remember(name, sql, &class, frame);
                }
                (class, sql)
            }
            b'B' => {
                let (_, name) = messages::parse_bind_names(frame.body())?;
                let known = self.prepared.get(name)?;
                if known.class.session_state {
                    settings::custom_names(&known.sql, custom);
                }
                return Some(Arc::clone(&known.class));
            }
            _ => return None,
        };
        if class.session_state {
            settings::custom_names(sql, custom);
        }
        Some(class)
    }

    /// Remembers what the Parse `frame` prepares as `name`; returns its text.
    fn remember(&mut self, name: &[u8], sql: &[u8], class: &Arc<Classification>, frame: &Frame) -> Bytes {
        if let Some(known) = self.prepared.get_mut(name) {
            if !known.is(name, sql, frame) {
                *known = Prepared::new(sql, Arc::clone(class), frame);
            }
            return known.sql.clone();
        }
        if self.prepared.len() >= MAX_PREPARED {
            self.prepared.clear();
        }
        let prepared = Prepared::new(sql, Arc::clone(class), frame);
        let sql = prepared.sql.clone();
        self.prepared.insert(name.into(), prepared);
        sql
    }

    /// BEGIN, SET TRANSACTION, COMMIT and ROLLBACK while no server is attached: the proxy
    /// holds the transaction until its first statement. `None` when the statement must go to
    /// a server after all.
    fn transaction_control(&mut self, tx: TxControl, sql: &[u8]) -> Option<Bytes> {
        let text = String::from_utf8_lossy(sql).trim().trim_end_matches(';').to_owned();
        match (tx, &mut self.held) {
            (TxControl::Begin { modes, tag }, None) => {
                let hints = hint::parse_hints(sql).unwrap_or_default();
                self.held = Some(HeldTx { statements: vec![text], modes, hints, failed: false });
                Some(answer(tag, TxStatus::InTransaction))
            }
            (TxControl::Begin { tag, .. }, Some(_)) => {
                let mut out = BytesMut::from(
                    &messages::notice(SqlState("25001"), "there is already a transaction in progress")[..],
                );
                out.extend_from_slice(&answer(tag, TxStatus::InTransaction));
                Some(out.freeze())
            }
            (TxControl::SetTransaction { modes }, Some(held)) => {
                held.statements.push(text);
                held.modes = held.modes.then(modes);
                Some(answer("SET", TxStatus::InTransaction))
            }
            // AND CHAIN starts the next transaction at once, with the same modes
            (TxControl::End { tag, chain: true }, Some(held)) => {
                held.failed = false;
                Some(answer(tag, TxStatus::InTransaction))
            }
            (TxControl::End { tag, chain: false }, Some(_)) => {
                self.held = None;
                Some(answer(tag, TxStatus::Idle))
            }
            _ => None,
        }
    }

    /// Inside a transaction whose start failed only its end is accepted, as PostgreSQL does.
    fn in_failed_transaction(&mut self, router: &Router, request: &Request) -> Result<Plan, PlanError> {
        if let Request::Query(frame) = request
            && let Some(sql) = messages::query_text(frame.body())
            && let Some(TxControl::End { .. }) = self.classify(router, sql).tx
        {
            self.held = None;
            return Ok(Plan::Local(answer("ROLLBACK", TxStatus::Idle)));
        }
        Err(PlanError::Error(Error::TransactionAborted))
    }

    /// Answers `SET/RESET/SHOW pgrouter.route`; `status` is the transaction status to report.
    pub fn session_command(&mut self, cmd: SessionCommand, status: TxStatus) -> Bytes {
        match cmd {
            SessionCommand::SetRoute(value) => {
                self.route_setting = value;
                answer("SET", status)
            }
            SessionCommand::ResetRoute => {
                self.route_setting = None;
                answer("RESET", status)
            }
            SessionCommand::ShowRoute => {
                let value = self.route_setting.map_or("default", RouteHint::as_str);
                let mut out = BytesMut::from(
                    &messages::text_result(&["pgrouter.route"], &[vec![Some(value.to_owned())]], "SHOW")[..],
                );
                out.extend_from_slice(&messages::ready_for_query(status));
                out.freeze()
            }
        }
    }
}

/// Which of two targets wins when a request carries several statements.
fn rank(target: Target) -> u8 {
    match target {
        Target::Replica => 0,
        Target::Any => 1,
        Target::Primary => 2,
    }
}

fn answer(tag: &str, status: TxStatus) -> Bytes {
    let mut out = BytesMut::from(&messages::command_complete(tag)[..]);
    out.extend_from_slice(&messages::ready_for_query(status));
    out.freeze()
}

/// Why a request could not be routed yet.
#[derive(Debug)]
pub enum PlanError {
    Undecided(Undecided),
    Error(Error),
}

impl From<Error> for PlanError {
    fn from(e: Error) -> Self {
        Self::Error(e)
    }
}
