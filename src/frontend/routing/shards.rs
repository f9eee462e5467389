//! Routing on sharded databases: the shard a request's keys choose, statements that need
//! every shard (`Scatter`), and the guard that keeps a transaction's statements on its shard.

use bytes::{Bytes, BytesMut};

use super::{Request, RoutingState, Statement};
use crate::error::Error;
use crate::protocol::framing::Frame;
use crate::protocol::messages;
use crate::router::classify::Access;
use crate::router::classify::{Classification, TxControl};
use crate::router::copy::{CopyIn, copy_from_stdin};
use crate::router::hint;
use crate::router::keys::{Aggregate, OrderedMerge, ordered_merge};
use crate::router::sharded::{BindParams, ShardRoute, Shards, Values, needs_every_shard};
use crate::router::{Policy, ShardId};

/// A statement for every shard: the messages to send (a simple query, or one unnamed
/// extended-protocol statement up to its Sync) and how to combine the answers.
#[derive(Debug)]
pub struct Scatter {
    pub frames: Vec<Frame>,
    /// Empty: concatenate the rows; else combine each shard's one row column by column.
    pub aggregates: Vec<Aggregate>,
    /// ORDER BY and LIMIT/OFFSET applied to the shards' rows (already sorted by each shard).
    pub order: Option<OrderedMerge>,
    /// When not empty, each of these shards gets its own messages instead of `frames` going
    /// to every shard (a multi-row INSERT split by row).
    pub per_shard: Vec<(ShardId, Vec<Frame>)>,
    /// For a split INSERT, the shard of each original row: RETURNING rows are answered in
    /// that order.
    pub row_order: Vec<ShardId>,
    /// For a split INSERT, the parameter types a Describe of the statement answers.
    pub described: Option<Vec<u32>>,
}

/// A COPY FROM STDIN into a sharded table, whose rows the session splits between the shards
/// (`session/copy.rs`).
#[derive(Debug)]
pub struct CopySplit {
    pub frame: Frame,
    pub copy: CopyIn,
    /// The table's shard key column.
    pub column: String,
}

/// A Query or Parse message with its SQL text replaced (a Parse keeps its name and parameter
/// types); None for other messages.
fn with_sql(frame: &Frame, sql: &str) -> Option<Frame> {
    let mut body = Vec::new();
    match frame.tag() {
        b'Q' => {
            body.extend_from_slice(sql.as_bytes());
            body.push(0);
        }
        b'P' => {
            let mut rest = frame.body();
            let name = crate::protocol::framing::get_cstr(&mut rest)?;
            let _old_sql = crate::protocol::framing::get_cstr(&mut rest)?;
            body.extend_from_slice(name);
            body.push(0);
            body.extend_from_slice(sql.as_bytes());
            body.push(0);
            body.extend_from_slice(rest);
        }
        _ => return None,
    }
    Some(Frame::new(frame.tag(), &body))
}

/// A Describe of a prepared statement (its ParameterDescription would differ per shard once
/// the statement is split).
fn describes_statement(frame: &Frame) -> bool {
    frame.tag() == b'D' && frame.body().first() == Some(&b'S')
}

/// Numbers the statement's `$n` parameters 1, 2, ... in order of first appearance; returns
/// the old number of each new one.
fn renumber_params(statement: &mut sqlparser::ast::Statement) -> Vec<usize> {
    use sqlparser::ast::{Expr, Value, visit_expressions_mut};
    let mut used: Vec<usize> = Vec::new();
    let _ = visit_expressions_mut(statement, |expr| {
        if let Expr::Value(v) = expr
            && let Value::Placeholder(p) = &mut v.value
            && let Some(old) = p.strip_prefix('$').and_then(|n| n.parse::<usize>().ok())
        {
            let new = match used.iter().position(|&u| u == old) {
                Some(i) => i + 1,
                None => {
                    used.push(old);
                    used.len()
                }
            };
            *p = format!("${new}");
        }
        std::ops::ControlFlow::<()>::Continue(())
    });
    used
}

/// A message of a split statement for one shard: a Query or Parse gets `sql` (a Parse only
/// the types of the parameters `used` keeps), a Bind only the `used` parameters' values (and
/// formats), in their new order; others as they are.
fn with_params(frame: &Frame, sql: &str, used: &[usize]) -> Option<Frame> {
    match frame.tag() {
        b'Q' => with_sql(frame, sql),
        b'P' => {
            let (name, _) = messages::parse_parse(frame.body())?;
            let types = messages::parse_param_types(frame.body())?;
            let kept: Vec<u32> = if types.is_empty() {
                Vec::new()
            } else {
                used.iter().map(|&n| types.get(n - 1).copied().unwrap_or(0)).collect()
            };
            Some(Frame::new(b'P', &messages::parse_body(name, sql, &kept)))
        }
        b'B' => {
            let (portal, statement) = messages::parse_bind_names(frame.body())?;
            let bind = messages::parse_bind(frame.body())?;
            let per_param = bind.param_formats.len() > 1;
            let formats = if per_param {
                used.iter().map(|&n| bind.param_formats.get(n - 1).copied()).collect::<Option<Vec<_>>>()?
            } else {
                bind.param_formats.clone()
            };
            let values = used.iter().map(|&n| bind.values.get(n - 1).copied()).collect::<Option<Vec<_>>>()?;
            let split = messages::BindView { param_formats: formats, values, result_formats: bind.result_formats };
            Some(Frame::new(b'B', &split.encode(portal, statement)))
        }
        _ => Some(frame.clone()),
    }
}

/// One extended-protocol statement, unnamed, executed once, ending with Sync: what can be
/// sent to every shard as it is (a named statement would bypass the per-connection renaming).
fn one_unnamed_statement(frames: &[Frame]) -> bool {
    let unnamed = |f: &Frame| match f.tag() {
        b'P' => messages::parse_parse(f.body()).is_some_and(|(name, _)| name.is_empty()),
        b'B' => messages::parse_bind_names(f.body()).is_some_and(|(portal, name)| portal.is_empty() && name.is_empty()),
        b'D' | b'E' | b'S' => true,
        _ => false,
    };
    frames.last().is_some_and(|f| f.tag() == b'S')
        && frames.iter().filter(|f| f.tag() == b'E').count() == 1
        && frames.iter().filter(|f| f.tag() == b'S').count() == 1
        && frames.iter().all(unnamed)
}

impl RoutingState {
    /// A statement that needs every shard may run on all of them if the combined answer is
    /// its true result: a simple query outside a transaction, whose rows can simply be
    /// concatenated (or DDL, or a write whose counts add up), as `cross_shard_*` allow.
    pub(super) fn scatter(
        &self,
        policy: &Policy,
        request: &Request,
        statements: &[Statement],
        why: &str,
    ) -> Result<Scatter, Error> {
        let refuse = |because: &str| Err(Error::NotSupported(needs_every_shard(why, because)));
        let frames = match request {
            Request::Query(frame) => vec![frame.clone()],
            Request::Batch(frames) if one_unnamed_statement(frames) => frames.clone(),
            _ => {
                return refuse(
                    "fan-out across shards takes one statement, unnamed if prepared, ending with Sync (not a named \
                     prepared statement or a pipeline)",
                );
            }
        };
        let Some((first, class, _)) = statements.first() else {
            return refuse("the request has no statement");
        };
        if statements.iter().any(|(sql, ..)| sql != first) {
            return refuse("it must be sent alone");
        }
        let facts = &class.tables;
        if self.held.is_some() {
            return refuse("a transaction runs on one shard");
        }
        if let Some(what) = facts.unmergeable {
            return refuse(&format!("merging {what} across shards is not built yet"));
        }
        if facts.insert.is_some() {
            return refuse("an INSERT without a usable key cannot be placed");
        }
        match &class.access {
            _ if facts.ddl => {}
            Access::Read if policy.cross_shard_reads => {}
            Access::Read => return refuse("cross_shard_reads = \"deny\""),
            Access::Write(_) if policy.cross_shard_writes => {}
            Access::Write(_) => {
                return refuse("writes without a shard key are refused (cross_shard_writes = \"deny\")");
            }
        }
        let mut frames = frames;
        let order = if facts.ordered {
            let text =
                std::str::from_utf8(first).map_err(|_| Error::Invalid("the statement is not valid UTF-8".into()))?;
            let plan = match ordered_merge(text) {
                Ok(plan) => plan,
                Err(what) => return refuse(&format!("merging {what} across shards is not built yet")),
            };
            for frame in &mut frames {
                *frame = with_sql(frame, &plan.sql).unwrap_or_else(|| frame.clone());
            }
            Some(plan)
        } else {
            None
        };
        Ok(Scatter {
            frames,
            aggregates: facts.aggregates.clone(),
            order,
            per_shard: Vec::new(),
            row_order: Vec::new(),
            described: None,
        })
    }

    /// A COPY FROM STDIN (simple query) into a sharded table, to be split row by row; None
    /// for any other statement.
    pub(super) fn copy_split(
        &self,
        policy: &Policy,
        request: &Request,
        statements: &[Statement],
    ) -> Result<Option<CopySplit>, Error> {
        let (Request::Query(frame), [(sql, class, _)]) = (request, statements) else { return Ok(None) };
        if class.tables.several || !matches!(class.access, Access::Write(_)) {
            return Ok(None);
        }
        let Some(copy) = std::str::from_utf8(sql).ok().and_then(copy_from_stdin) else { return Ok(None) };
        let copy = copy.map_err(Error::NotSupported)?;
        let Some((column, placement)) = policy.shards.table(&copy.table) else { return Ok(None) };
        placement.map_err(|e| Error::NotSupported(e.clone()))?;
        if self.held.is_some() {
            return Err(Error::NotSupported(format!(
                "COPY into sharded table {} splits its rows between the shards, and a transaction runs on one shard: \
                 run it outside a transaction",
                copy.table
            )));
        }
        if !copy.columns.is_empty() && !copy.columns.iter().any(|c| c == column) {
            return Err(Error::NotSupported(format!(
                "COPY into sharded table {} must include its shard key column {column}",
                copy.table
            )));
        }
        Ok(Some(CopySplit { frame: frame.clone(), copy, column: column.to_owned() }))
    }

    /// A multi-row INSERT whose rows belong to different shards becomes one INSERT per shard
    /// with that shard's rows, run together and answered as one (`INSERT 0 <sum>`, RETURNING
    /// rows in the order of the original rows). Sent with parameters (one unnamed statement,
    /// as SQLAlchemy's insertmanyvalues does), each shard's INSERT gets its rows' parameters,
    /// renumbered.
    pub(super) fn split_insert(
        &self,
        request: &Request,
        statements: &[Statement],
        rows: &[ShardId],
    ) -> Result<Scatter, Error> {
        let refuse = |because: &str| {
            Err(Error::NotSupported(format!(
                "the INSERT's rows belong to different shards, and {because}: send one INSERT per shard"
            )))
        };
        let frames: &[Frame] = match request {
            Request::Query(frame) => std::slice::from_ref(frame),
            Request::Batch(frames) if one_unnamed_statement(frames) => frames,
            _ => return refuse("splitting it takes a simple query or one unnamed prepared statement"),
        };
        // a Describe of the statement is answered with the parameters the client declared:
        // each shard's part has fewer
        let described = match frames.iter().find(|f| f.tag() == b'P') {
            Some(parse) if frames.iter().any(describes_statement) => {
                let types = messages::parse_param_types(parse.body()).unwrap_or_default();
                let values = frames.iter().find(|f| f.tag() == b'B').and_then(|b| messages::parse_bind(b.body()));
                if types.contains(&0) || values.is_none_or(|v| v.values.len() != types.len()) {
                    return refuse("a Describe of it needs every parameter's type declared in its Parse");
                }
                Some(types)
            }
            _ => None,
        };
        if self.held.is_some() {
            return refuse("a transaction runs on one shard");
        }
        let Some((sql, _, _)) = statements.first().filter(|(first, ..)| statements.iter().all(|(s, ..)| s == first))
        else {
            return refuse("it must be sent alone");
        };
        let text = std::str::from_utf8(sql).map_err(|_| Error::Invalid("the statement is not valid UTF-8".into()))?;
        let parsed = sqlparser::parser::Parser::parse_sql(&sqlparser::dialect::PostgreSqlDialect {}, text)
            .map_err(|e| Error::Invalid(e.to_string()))?;
        let [sqlparser::ast::Statement::Insert(insert)] = parsed.as_slice() else {
            return refuse("it is not one INSERT");
        };
        let Some(sqlparser::ast::SetExpr::Values(values)) = insert.source.as_ref().map(|q| q.body.as_ref()) else {
            return refuse("it has no VALUES list");
        };
        if values.rows.len() != rows.len() {
            return refuse("its rows could not all be placed");
        }
        let mut shards: Vec<ShardId> = rows.to_vec();
        shards.sort();
        shards.dedup();
        let mut per_shard = Vec::with_capacity(shards.len());
        for shard in shards {
            let mut part = insert.clone();
            let mut kept = values.clone();
            kept.rows = values.rows.iter().zip(rows).filter(|(_, s)| **s == shard).map(|(r, _)| r.clone()).collect();
            if let Some(source) = part.source.as_mut() {
                *source.body = sqlparser::ast::SetExpr::Values(kept);
            }
            let mut statement = sqlparser::ast::Statement::Insert(part);
            let used = renumber_params(&mut statement);
            let sql = statement.to_string();
            let sent = frames.iter().map(|f| with_params(f, &sql, &used)).collect::<Option<Vec<_>>>();
            let Some(sent) = sent else { return Err(Error::Protocol("malformed Parse or Bind message".into())) };
            per_shard.push((shard, sent));
        }
        Ok(Scatter {
            frames: Vec::new(),
            aggregates: Vec::new(),
            order: None,
            per_shard,
            row_order: rows.to_vec(),
            described,
        })
    }

    /// A Bind's parameters, with the types its statement's Parse declared.
    fn bind_params<'f>(&self, bind: &'f Frame) -> Option<BindParams<'f>> {
        let mut params = BindParams::parse(bind.body())?;
        let (_, name) = messages::parse_bind_names(bind.body())?;
        params.types = self.prepared.get(name).map(|p| p.types.to_vec()).unwrap_or_default();
        Some(params)
    }

    /// The shard a sharded database's request must run on, by its statements' shard keys
    /// (None: no key decides it; hints and the home shard do).
    pub(super) fn keyed_shard(&mut self, policy: &Policy, statements: &[Statement]) -> Result<Shards, Error> {
        if policy.shards.is_empty() {
            return Ok(Shards::One(None));
        }
        let mut routes = Vec::with_capacity(statements.len());
        for (i, (sql, class, bind)) in statements.iter().enumerate() {
            if hint::parse_hints(sql).is_ok_and(|h| policy.shard_is_given(sql, &h)) {
                continue;
            }
            // a Parse followed by the Bind of the same statement: the Bind (with its values) decides
            if bind.is_none() && statements.get(i + 1).is_some_and(|(next, _, b)| next == sql && b.is_some()) {
                continue;
            }
            self.shape(sql);
            let params = bind.as_ref().and_then(|b| self.bind_params(b));
            routes.push(policy.shards.route(&class.tables, &Values { sql, literals: &self.scratch.literals, params }));
        }
        policy.shards.request_shards(&routes, policy.home()).map_err(Error::NotSupported)
    }

    /// On a sharded database, a statement relayed inside a transaction that runs on `shard`
    /// must be for that shard. If its key (or its unsharded tables, or its need for every
    /// shard) says otherwise, this returns the message to send instead: one the server
    /// rejects with a message saying why, so the transaction fails as on any error and
    /// nothing of it commits on any shard. A shard hint is the client's word and is trusted.
    ///
    /// DDL on sharded tables (one statement per text) is the exception: it runs here and its
    /// text is added to `elsewhere`, to be run on the other shards when the transaction
    /// commits (`session/schema.rs`).
    ///
    /// Called right after [`RoutingState::observe`] with the frame's classification, whose
    /// shape pass left the literal positions of a Query's or Parse's text in the scratch shape.
    pub fn guard_shard(
        &mut self,
        policy: &Policy,
        frame: &Frame,
        class: &Classification,
        shard: ShardId,
        elsewhere: &mut Vec<Bytes>,
    ) -> Option<Frame> {
        if policy.shards.is_empty() {
            return None;
        }
        if matches!(class.tx, Some(TxControl::End { tag: "ROLLBACK", .. })) {
            elsewhere.clear();
        }
        let (sql, params): (Bytes, _) = match frame.tag() {
            b'Q' => (frame.share(messages::query_text(frame.body())?), None),
            b'P' => (frame.share(messages::parse_parse(frame.body())?.1), None),
            b'B' => {
                let (_, name) = messages::parse_bind_names(frame.body())?;
                let sql = self.prepared.get(name)?.sql.clone();
                self.shape(&sql);
                (sql, self.bind_params(frame))
            }
            _ => return None,
        };
        let sql = &sql[..];
        if hint::parse_hints(sql).is_ok_and(|h| policy.shard_is_given(sql, &h)) {
            return None;
        }
        let route = policy.shards.route(&class.tables, &Values { sql, literals: &self.scratch.literals, params });
        if super::schema_only(class) && matches!(route, ShardRoute::All { .. }) {
            // the Bind of a DDL statement adds nothing: its Parse was recorded
            if frame.tag() != b'B' {
                elsewhere.push(Bytes::copy_from_slice(sql));
            }
            return None;
        }
        let why = match policy.shards.request_shard(std::slice::from_ref(&route), policy.home()) {
            Ok(None) => return None,
            Ok(Some(wanted)) if wanted == shard => return None,
            Ok(Some(wanted)) => {
                format!("this transaction runs on shard {}; the statement is for shard {}", shard.0, wanted.0)
            }
            Err(why) => why,
        };
        tracing::info!(shard = shard.0, reason = %why, "statement for another shard refused inside a transaction");
        // identifiers are cut at 63 bytes: keep what the server echoes short
        let short = format!("pgrouter: not for shard {} of this transaction", shard.0);
        let mut body = BytesMut::new();
        match frame.tag() {
            b'Q' => {
                let message = format!("pgrouter: a transaction runs on one shard: {why}");
                body.extend_from_slice(
                    format!(
                        "DO $pgrouter$ BEGIN RAISE EXCEPTION USING ERRCODE = '0A000', MESSAGE = {}; END $pgrouter$\0",
                        crate::router::policy::quote_literal(&message)
                    )
                    .as_bytes(),
                );
            }
            b'P' => {
                let (name, _) = messages::parse_parse(frame.body())?;
                body.extend_from_slice(name);
                body.extend_from_slice(format!("\0SELECT * FROM \"{short}\"\0").as_bytes());
                body.extend_from_slice(&0i16.to_be_bytes());
            }
            _ => {
                let mut rest = frame.body();
                let portal = crate::protocol::framing::get_cstr(&mut rest)?;
                let _statement = crate::protocol::framing::get_cstr(&mut rest)?;
                body.extend_from_slice(portal);
                body.extend_from_slice(format!("\0{short}\0").as_bytes());
                body.extend_from_slice(rest);
            }
        }
        Some(Frame::new(frame.tag(), &body))
    }
}
