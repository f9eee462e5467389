//! A simple query on every shard at once (DESIGN §5), answered as one result: one
//! RowDescription, every shard's rows in shard order, one CommandComplete whose count is the
//! sum, one ReadyForQuery. Routing only sends here what this answers truly (see
//! `routing::RoutingState::scatter`): DDL, writes whose counts add up, reads without ORDER BY,
//! LIMIT, DISTINCT or GROUP BY, and queries of only count/sum/min/max, whose one row per
//! shard is combined column by column (`sharding::combine`).
//!
//! Connections are taken from the shards' primaries in shard order, so two scatters cannot
//! each hold a shard the other waits for. Shards are read one after another; the others'
//! answers wait in their sockets meanwhile (TCP pushes back), so memory stays bounded. An
//! error from a shard names it; a shard that fails leaves what the others did done (DDL on
//! some shards only, say), which the error says.

use bytes::BytesMut;

use super::Session;
use crate::backend::Checkout;
use crate::error::Error;
use crate::frontend::client::ClientIo;
use crate::frontend::routing::Scatter;
use crate::protocol::framing::Frame;
use crate::protocol::messages::{self, TxStatus};
use crate::router::ShardId;
use crate::router::keys::{Aggregate, OrderedMerge, SortColumn};
use crate::sharding::combine::{combine, compare};

/// Bytes of rows gathered before they are sent on to the client.
const FLUSH_AT: usize = 64 * 1024;

/// What the shards have answered so far.
#[derive(Default)]
struct Combined {
    /// The first shard asked: its ParseComplete and the like are the client's.
    lead: Option<ShardId>,
    /// The ParameterDescription to answer instead of the lead's (a split statement).
    described: Option<Vec<u8>>,
    row_description: Option<Vec<u8>>,
    count: u64,
    tag: Option<String>,
    error: Option<Vec<u8>>,
    empty_query: bool,
    /// Each shard's row, for aggregates.
    rows: Vec<Vec<u8>>,
}

impl<S: ClientIo> Session<S> {
    /// Runs `request` (a simple query, or one unnamed extended-protocol statement up to its
    /// Sync) on every shard's primary and answers the client.
    pub(super) async fn scatter(&mut self, scatter: Scatter) -> Result<(), Error> {
        let Scatter { frames: request, aggregates, order, per_shard, row_order, described } = scatter;
        // a RowDescription answering Describe Statement shows format 0 whatever the Bind asked
        let binary = request.iter().any(|f| f.tag() == b'B' && binary_results(f.body()));
        let pools = std::sync::Arc::clone(&self.params.pools);
        // what each shard runs, in shard order
        let sends: Vec<(ShardId, Vec<Frame>)> = if per_shard.is_empty() {
            (0..).map(ShardId).take_while(|id| pools.shard(*id).is_some()).map(|id| (id, request.clone())).collect()
        } else {
            per_shard
        };
        let mut checkouts: Vec<(ShardId, Checkout)> = Vec::new();
        for (id, _) in &sends {
            let pool = pools
                .shard(*id)
                .map(|s| std::sync::Arc::clone(&s.primary))
                .ok_or_else(|| Error::Internal(format!("no shard {id}")))?;
            let Some(mut checkout) = self.checkout(&pool).await? else {
                return Ok(()); // the client left while waiting
            };
            self.apply_settings(&mut checkout).await?;
            checkouts.push((*id, checkout));
        }
        for ((id, checkout), (_, frames)) in checkouts.iter_mut().zip(&sends) {
            let mut bytes = BytesMut::new();
            for frame in frames {
                bytes.extend_from_slice(frame.as_bytes());
            }
            let conn = checkout.conn();
            conn.send(&bytes).await.map_err(|e| shard_lost(*id, conn.addr.to_string(), &e.to_string()))?;
        }
        let mut combined = Combined {
            lead: checkouts.first().map(|(id, _)| *id),
            described: described.map(|types| parameter_description(&types)),
            ..Combined::default()
        };
        let mut returned: Vec<Vec<Vec<u8>>> = vec![Vec::new(); checkouts.len()];
        let mut out = BytesMut::new();
        if let Some(order) = &order {
            self.merge_ordered(&mut checkouts, order, binary, &mut combined, &mut out).await?;
        } else {
            for (i, (id, checkout)) in checkouts.iter_mut().enumerate() {
                let conn = checkout.conn();
                loop {
                    let frame = conn.read_frame().await.map_err(|e| shard_lost(*id, conn.addr.to_string(), &e))?;
                    match combined.take(*id, &conn.addr.to_string(), &frame, &mut out) {
                        Step::Row if combined.error.is_some() => {}
                        Step::Row if !row_order.is_empty() => returned[i].push(frame.body().to_vec()),
                        Step::Row if aggregates.is_empty() => out.extend_from_slice(frame.as_bytes()),
                        Step::Row => combined.rows.push(frame.body().to_vec()),
                        Step::Done => {
                            conn.status = TxStatus::Idle;
                            break;
                        }
                        Step::Other => {}
                    }
                    if out.len() >= FLUSH_AT {
                        self.client.send(&out.split().freeze()).await?;
                    }
                }
            }
        }
        if combined.error.is_none() {
            let shards: Vec<ShardId> = checkouts.iter().map(|(id, _)| *id).collect();
            for row in in_row_order(&shards, returned, &row_order) {
                out.extend_from_slice(&Frame::new(b'D', &row).into_bytes());
            }
        }
        for (_, checkout) in checkouts {
            checkout.release();
        }
        if combined.error.is_none() && !aggregates.is_empty() {
            let combined_row = if binary {
                Err("combining aggregates in binary format across shards is not built yet".to_owned())
            } else {
                combine_rows(&aggregates, combined.row_description.as_deref(), &combined.rows)
            };
            match combined_row {
                Ok(row) => {
                    out.extend_from_slice(&Frame::new(b'D', &row).into_bytes());
                    combined.count = 1;
                }
                Err(why) => combined.error = Some(plain_error(&why)),
            }
        }
        match (&combined.error, &combined.tag) {
            (Some(error), _) => out.extend_from_slice(&Frame::new(b'E', error).into_bytes()),
            (None, Some(word)) => out.extend_from_slice(&messages::command_complete(&join_tag(word, combined.count))),
            (None, None) if combined.empty_query => out.extend_from_slice(&Frame::new(b'I', &[]).into_bytes()),
            (None, None) => {}
        }
        out.extend_from_slice(&messages::ready_for_query(TxStatus::Idle));
        self.client.send(&out.freeze()).await?;
        Ok(())
    }
}

/// The rows each of `shards` returned (a split INSERT's RETURNING), in the order of the
/// original rows whose shards `row_order` lists; shard by shard if the counts do not match
/// (ON CONFLICT DO NOTHING, say).
fn in_row_order(shards: &[ShardId], returned: Vec<Vec<Vec<u8>>>, row_order: &[ShardId]) -> Vec<Vec<u8>> {
    let matches =
        shards.iter().zip(&returned).all(|(id, rows)| row_order.iter().filter(|s| *s == id).count() == rows.len());
    if !matches {
        return returned.into_iter().flatten().collect();
    }
    let mut streams: Vec<_> = returned.into_iter().map(Vec::into_iter).collect();
    row_order.iter().filter_map(|id| shards.iter().position(|s| s == id).and_then(|i| streams[i].next())).collect()
}

/// A ParameterDescription body for these types.
fn parameter_description(types: &[u32]) -> Vec<u8> {
    let mut body = i16::try_from(types.len()).unwrap_or(i16::MAX).to_be_bytes().to_vec();
    types.iter().for_each(|oid| body.extend_from_slice(&oid.to_be_bytes()));
    body
}

/// What one shard message means for the combined answer.
enum Step {
    /// A DataRow, for the caller.
    Row,
    /// ReadyForQuery: this shard is done.
    Done,
    Other,
}

impl Combined {
    /// Notes one message of shard `id` (everything but rows), adding to `out` what the client
    /// gets of it.
    fn take(&mut self, id: ShardId, server: &str, frame: &Frame, out: &mut BytesMut) -> Step {
        match frame.tag() {
            b'T' => match &self.row_description {
                None => {
                    self.row_description = Some(frame.body().to_vec());
                    out.extend_from_slice(frame.as_bytes());
                }
                Some(first) if first.as_slice() == frame.body() => {}
                Some(_) => {
                    self.error.get_or_insert_with(|| {
                        shard_error(
                            id,
                            "the shards answered with different columns (is the schema the same on every shard?)",
                        )
                    });
                }
            },
            b'D' => return Step::Row,
            b'C' => {
                let tag = String::from_utf8_lossy(frame.body().strip_suffix(&[0]).unwrap_or(frame.body()));
                let (word, count) = split_tag(&tag);
                self.count += count.unwrap_or(0);
                self.tag.get_or_insert(word);
            }
            b'I' => self.empty_query = true,
            b'E' => {
                let named = name_shard(frame.body(), id, server);
                self.error.get_or_insert(named);
            }
            b'N' => out.extend_from_slice(frame.as_bytes()),
            b't' if Some(id) == self.lead && self.error.is_none() && self.described.is_some() => {
                out.extend_from_slice(&Frame::new(b't', self.described.as_deref().unwrap_or_default()).into_bytes());
            }
            // ParseComplete, BindComplete, ParameterDescription, NoData: once
            b'1' | b'2' | b't' | b'n' if Some(id) == self.lead && self.error.is_none() => {
                out.extend_from_slice(frame.as_bytes())
            }
            b'Z' => return Step::Done,
            _ => {} // ParameterStatus and the like: the session's own state is not changed here
        }
        Step::Other
    }
}

impl<S: ClientIo> Session<S> {
    /// The shards' rows, each shard's already in ORDER BY order, merged (k-way) into one
    /// ordered stream, with OFFSET and LIMIT applied after the merge. Every shard is read to
    /// its end, also when LIMIT stops the merge early.
    async fn merge_ordered(
        &mut self,
        checkouts: &mut [(ShardId, Checkout)],
        order: &OrderedMerge,
        binary: bool,
        combined: &mut Combined,
        out: &mut BytesMut,
    ) -> Result<(), Error> {
        let mut heads: Vec<Option<Vec<u8>>> = Vec::with_capacity(checkouts.len());
        let mut done = vec![false; checkouts.len()];
        for ((id, checkout), done) in checkouts.iter_mut().zip(&mut done) {
            heads.push(next_row(*id, checkout, done, combined, out).await?);
        }
        let keys = match (binary, combined.row_description.as_deref()) {
            (true, _) => Err("merging rows in binary format across shards is not built yet".to_owned()),
            (false, Some(description)) => sort_keys(order, description),
            (false, None) => Ok(Vec::new()),
        };
        let keys = match keys {
            Ok(keys) => keys,
            Err(why) => {
                combined.error.get_or_insert(plain_error(&why));
                Vec::new()
            }
        };
        let (mut skipped, mut sent) = (0u64, 0u64);
        while combined.error.is_none() && order.limit.is_none_or(|limit| sent < limit) {
            let mut best: Option<usize> = None;
            for (i, head) in heads.iter().enumerate() {
                let Some(row) = head else { continue };
                let better = match best.and_then(|b| heads[b].as_ref()) {
                    None => true,
                    Some(current) => match compare_rows(&keys, row, current) {
                        Ok(ordering) => ordering.is_lt(),
                        Err(why) => {
                            combined.error.get_or_insert(plain_error(&why));
                            false
                        }
                    },
                };
                if better {
                    best = Some(i);
                }
            }
            let Some(i) = best.filter(|_| combined.error.is_none()) else { break };
            let row = heads[i].take().unwrap_or_default();
            if skipped < order.offset {
                skipped += 1;
            } else {
                out.extend_from_slice(&Frame::new(b'D', &row).into_bytes());
                sent += 1;
            }
            let (id, checkout) = &mut checkouts[i];
            heads[i] = next_row(*id, checkout, &mut done[i], combined, out).await?;
            if out.len() >= FLUSH_AT {
                self.client.send(&out.split().freeze()).await?;
            }
        }
        // what the merge did not need is read and dropped, so every connection ends at rest
        for ((id, checkout), done) in checkouts.iter_mut().zip(&mut done) {
            while next_row(*id, checkout, done, combined, &mut BytesMut::new()).await?.is_some() {}
        }
        combined.count = sent;
        combined.tag = Some("SELECT".into());
        Ok(())
    }
}

/// A shard's next row, or None once it has answered ReadyForQuery.
async fn next_row(
    id: ShardId,
    checkout: &mut Checkout,
    done: &mut bool,
    combined: &mut Combined,
    out: &mut BytesMut,
) -> Result<Option<Vec<u8>>, Error> {
    if *done {
        return Ok(None);
    }
    let conn = checkout.conn();
    loop {
        let frame = conn.read_frame().await.map_err(|e| shard_lost(id, conn.addr.to_string(), &e))?;
        match combined.take(id, &conn.addr.to_string(), &frame, out) {
            Step::Row => return Ok(Some(frame.body().to_vec())),
            Step::Done => {
                conn.status = TxStatus::Idle;
                *done = true;
                return Ok(None);
            }
            Step::Other => {}
        }
    }
}

/// A resolved sort key: column index, type, direction.
struct Key {
    index: usize,
    type_oid: u32,
    descending: bool,
    nulls_first: bool,
}

fn sort_keys(order: &OrderedMerge, description: &[u8]) -> Result<Vec<Key>, String> {
    let columns = column_types(description).ok_or("the shards sent no usable row description")?;
    let names = column_names(description).ok_or("the shards sent no usable row description")?;
    order
        .order
        .iter()
        .map(|key| {
            let index = match &key.column {
                SortColumn::Position(p) => Some(*p).filter(|p| *p < columns.len()),
                SortColumn::Name(name) => {
                    let mut found = names.iter().enumerate().filter(|(_, n)| *n == name).map(|(i, _)| i);
                    match (found.next(), found.next()) {
                        (Some(i), None) => Some(i),
                        _ => None,
                    }
                }
            }
            .ok_or_else(|| format!("ORDER BY {:?} is not exactly one column of the result", key.column))?;
            Ok(Key { index, type_oid: columns[index].0, descending: key.descending, nulls_first: key.nulls_first })
        })
        .collect()
}

/// Compares two DataRow bodies by the sort keys.
fn compare_rows(keys: &[Key], a: &[u8], b: &[u8]) -> Result<std::cmp::Ordering, String> {
    use std::cmp::Ordering;
    let (a, b) = (
        messages::data_row_values(a).ok_or("a shard sent a malformed row")?,
        messages::data_row_values(b).ok_or("a shard sent a malformed row")?,
    );
    for key in keys {
        let ordering = match (a.get(key.index).copied().flatten(), b.get(key.index).copied().flatten()) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) => {
                if key.nulls_first {
                    Ordering::Less
                } else {
                    Ordering::Greater
                }
            }
            (Some(_), None) => {
                if key.nulls_first {
                    Ordering::Greater
                } else {
                    Ordering::Less
                }
            }
            (Some(x), Some(y)) => {
                let o = compare(key.type_oid, x, y)?;
                if key.descending { o.reverse() } else { o }
            }
        };
        if ordering != Ordering::Equal {
            return Ok(ordering);
        }
    }
    Ok(Ordering::Equal)
}

/// The column names of a RowDescription body.
fn column_names(body: &[u8]) -> Option<Vec<String>> {
    let n = usize::try_from(i16::from_be_bytes(body.get(..2)?.try_into().ok()?)).ok()?;
    let mut rest = &body[2..];
    let mut names = Vec::with_capacity(n);
    for _ in 0..n {
        let end = rest.iter().position(|&b| b == 0)?;
        names.push(String::from_utf8_lossy(&rest[..end]).into_owned());
        rest = rest.get(end + 19..)?;
    }
    Some(names)
}

pub(super) fn shard_lost(shard: ShardId, server: String, reason: &str) -> Error {
    Error::ServerLost { server, reason: format!("shard {shard}: {reason}") }
}

/// An ErrorResponse body about one shard's answer.
fn shard_error(shard: ShardId, message: &str) -> Vec<u8> {
    error_body("XX000", &format!("shard {shard}: {message}"))
}

/// An ErrorResponse body for what the proxy cannot do with the answers.
fn plain_error(message: &str) -> Vec<u8> {
    error_body("0A000", &format!("pgrouter: {message}"))
}

/// An ErrorResponse body (fields, then a zero).
fn error_body(code: &str, message: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (kind, value) in [(b'S', "ERROR"), (b'V', "ERROR"), (b'C', code), (b'M', message)] {
        body.push(kind);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    body
}

/// The one row of an aggregate query, from each shard's row.
fn combine_rows(aggregates: &[Aggregate], description: Option<&[u8]>, rows: &[Vec<u8>]) -> Result<Vec<u8>, String> {
    let columns = description.and_then(column_types).ok_or("the shards sent no usable row description")?;
    if columns.len() != aggregates.len() {
        return Err("the shards' columns do not match the statement's aggregates".into());
    }
    if columns.iter().any(|&(_, format)| format != 0) {
        return Err("combining aggregates in binary format across shards is not built yet".into());
    }
    let rows: Vec<Vec<Option<&[u8]>>> = rows
        .iter()
        .map(|r| messages::data_row_values(r))
        .collect::<Option<_>>()
        .ok_or("a shard sent a malformed row")?;
    let mut out = Vec::new();
    out.extend_from_slice(&i16::try_from(columns.len()).unwrap_or(i16::MAX).to_be_bytes());
    for (i, (&aggregate, &(oid, _))) in aggregates.iter().zip(&columns).enumerate() {
        let values: Vec<Option<&[u8]>> = rows.iter().map(|r| r.get(i).copied().flatten()).collect();
        match combine(aggregate, oid, &values)? {
            Some(text) => {
                out.extend_from_slice(&i32::try_from(text.len()).unwrap_or(i32::MAX).to_be_bytes());
                out.extend_from_slice(text.as_bytes());
            }
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    Ok(out)
}

/// Does a Bind body ask for any result column in binary format?
fn binary_results(body: &[u8]) -> bool {
    messages::parse_bind(body).is_none_or(|bind| bind.result_formats.contains(&1))
}

/// (type OID, format) of each column of a RowDescription body.
fn column_types(body: &[u8]) -> Option<Vec<(u32, i16)>> {
    let n = usize::try_from(i16::from_be_bytes(body.get(..2)?.try_into().ok()?)).ok()?;
    let mut rest = &body[2..];
    let mut columns = Vec::with_capacity(n);
    for _ in 0..n {
        let name_end = rest.iter().position(|&b| b == 0)?;
        let field = rest.get(name_end + 1..name_end + 19)?;
        let oid = u32::from_be_bytes(field[6..10].try_into().ok()?);
        let format = i16::from_be_bytes(field[16..18].try_into().ok()?);
        columns.push((oid, format));
        rest = &rest[name_end + 19..];
    }
    Some(columns)
}

/// A shard's ErrorResponse body with the shard named at the front of its message.
pub(super) fn name_shard(body: &[u8], shard: ShardId, server: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 32);
    let mut rest = body;
    while let Some((&code, tail)) = rest.split_first() {
        if code == 0 {
            break;
        }
        let Some(end) = tail.iter().position(|&b| b == 0) else { break };
        out.push(code);
        if code == b'M' {
            out.extend_from_slice(format!("shard {shard} ({server}): ").as_bytes());
        }
        out.extend_from_slice(&tail[..=end]);
        rest = &tail[end + 1..];
    }
    out.push(0);
    out
}

/// "INSERT 0 5" -> ("INSERT 0", Some(5)); "CREATE TABLE" -> ("CREATE TABLE", None).
pub(super) fn split_tag(tag: &str) -> (String, Option<u64>) {
    match tag.rsplit_once(' ') {
        Some((word, n)) if n.bytes().all(|b| b.is_ascii_digit()) && !n.is_empty() => (word.to_owned(), n.parse().ok()),
        _ => (tag.to_owned(), None),
    }
}

fn join_tag(word: &str, count: u64) -> String {
    const COUNTED: &[&str] = &["SELECT", "INSERT 0", "UPDATE", "DELETE", "MERGE", "COPY", "FETCH", "MOVE"];
    if COUNTED.contains(&word) { format!("{word} {count}") } else { word.to_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_add_up() {
        assert_eq!(split_tag("SELECT 12"), ("SELECT".into(), Some(12)));
        assert_eq!(split_tag("INSERT 0 3"), ("INSERT 0".into(), Some(3)));
        assert_eq!(split_tag("CREATE TABLE"), ("CREATE TABLE".into(), None));
        assert_eq!(join_tag("UPDATE", 7), "UPDATE 7");
        assert_eq!(join_tag("CREATE INDEX", 0), "CREATE INDEX");
    }

    #[test]
    fn errors_name_their_shard() {
        let body = b"SERROR\0C42P01\0Mrelation \"x\" does not exist\0\0";
        let named = name_shard(body, ShardId(1), "127.0.0.1:5433");
        let fields = messages::parse_error_fields(&named);
        assert_eq!(fields.message, "shard 1 (127.0.0.1:5433): relation \"x\" does not exist");
        assert_eq!(fields.code, "42P01");
    }
}
