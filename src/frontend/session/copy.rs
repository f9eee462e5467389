//! `COPY table FROM STDIN` into a sharded table, split row by row (DESIGN §5).
//!
//! Every shard's primary opens a transaction and starts the COPY; the client gets one
//! CopyInResponse. Its CopyData is cut into rows (`router::copy::RowSplitter`), each row's
//! shard key is read and placed, and the row goes to its shard, gathered into CopyData
//! messages of up to 64 KiB per shard (a header line goes to every shard). CopyDone ends the
//! COPY on every shard; if every shard succeeded, each commits and the client gets one
//! CommandComplete with the summed count. A row whose key is NULL or cannot be placed, a
//! CopyFail from the client, or an error on any shard rolls the COPY back on every shard,
//! and the client gets the error (naming the shard, for a shard's).

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;

use super::scatter::{name_shard, shard_lost, split_tag};
use super::{LOOKUP_TIMEOUT, Session};
use crate::backend::Checkout;
use crate::error::{Error, SqlState};
use crate::frontend::client::ClientIo;
use crate::frontend::routing::CopySplit;
use crate::protocol::framing::Frame;
use crate::protocol::messages::{self, Severity, TxStatus};
use crate::router::ShardId;
use crate::router::copy::RowSplitter;
use crate::router::policy::quote_literal;

/// Rows gathered for a shard before they are sent to it.
const SEND_AT: usize = 64 * 1024;
/// How long a shard may take to finish its COPY, or to commit.
const FINISH_TIMEOUT: Duration = Duration::from_secs(600);

/// Why a split COPY failed: an ErrorResponse body for the client.
type Failure = Vec<u8>;

impl<S: ClientIo> Session<S> {
    /// Runs a COPY FROM STDIN on every shard, sending each row of the client's data to its
    /// shard, and answers the client. `Ok(false)` when the client left meanwhile.
    pub(super) async fn copy_in(&mut self, split: CopySplit) -> Result<bool, Error> {
        let CopySplit { frame, copy, column } = split;
        let policy = Arc::clone(&self.params.policy);
        let Some((_, Ok(placement))) = policy.shards.table(&copy.table) else {
            return Err(Error::Internal(format!("{} is not a sharded table", copy.table)));
        };
        let pools = Arc::clone(&self.params.pools);
        let mut shards: Vec<(ShardId, Checkout)> = Vec::new();
        for id in (0..).map(ShardId).take_while(|id| pools.shard(*id).is_some()) {
            let pool = pools.shard(id).map(|s| Arc::clone(&s.primary)).expect("listed above");
            let Some(mut checkout) = self.checkout(&pool).await? else { return Ok(false) };
            self.apply_settings(&mut checkout).await?;
            let conn = checkout.conn();
            conn.run_simple("BEGIN", LOOKUP_TIMEOUT).await.map_err(|e| shard_lost(id, conn.addr.to_string(), &e))?;
            shards.push((id, checkout));
        }
        let started = self.start_everywhere(&mut shards, &frame, &copy.table_sql, &copy.columns, &column).await?;
        let (index, copy_in_response) = match started {
            Ok(started) => started,
            Err(failure) => {
                let _ = finish(&mut shards, false).await;
                self.answer_error(&failure).await?;
                return Ok(true);
            }
        };
        self.client.send(&copy_in_response).await?;
        let mut splitter = RowSplitter::new(copy.format.clone());
        let mut pending: Vec<BytesMut> = vec![BytesMut::new(); shards.len()];
        let mut header = copy.header;
        let mut failure: Option<Failure> = None;
        let mut place = |row: &[u8], splitter: &RowSplitter, pending: &mut [BytesMut]| -> Result<(), Failure> {
            let line = row.strip_suffix(b"\n").unwrap_or(row);
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if std::mem::take(&mut header) || line == b"\\." {
                // the header line, or the end-of-data marker: every shard's COPY expects it
                pending.iter_mut().for_each(|p| p.extend_from_slice(row));
                return Ok(());
            }
            let bad = |why: String| messages_error("22P04", &format!("COPY into sharded table {}: {why}", copy.table));
            let key = splitter.field(row, index).map_err(bad)?;
            let key = key.ok_or_else(|| bad(format!("a row's shard key {column} is NULL")))?;
            let key = placement.key_from_text(&key).map_err(|e| bad(format!("{column}: {e}")))?;
            let shard = placement.shard(&key).map_err(bad)?;
            pending[shard].extend_from_slice(row);
            Ok(())
        };
        let client_failed = loop {
            let Some(frame) = self.client.read_frame().await? else {
                return Ok(false); // dropping the checkouts closes the shards' connections
            };
            match frame.tag() {
                b'd' if failure.is_none() => {
                    splitter.feed(frame.body());
                    failure = splitter.rows().try_for_each(|row| place(row, &splitter, &mut pending)).err();
                    send_full(&mut shards, &mut pending, SEND_AT).await?;
                }
                b'd' | b'H' | b'S' => {}
                b'c' => break None,
                b'f' => {
                    let why = String::from_utf8_lossy(frame.body().strip_suffix(&[0]).unwrap_or(frame.body()));
                    break Some(messages_error("57014", &format!("COPY from stdin failed: {why}")));
                }
                tag => {
                    let why = format!("unexpected message type 0x{tag:02x} during COPY from stdin");
                    break Some(messages_error(SqlState::PROTOCOL_VIOLATION.0, &why));
                }
            }
        };
        if failure.is_none() && client_failed.is_none() && !splitter.rest().is_empty() {
            failure = place(splitter.rest(), &splitter, &mut pending).err();
        }
        let failure = failure.or(client_failed);
        if failure.is_none() {
            send_full(&mut shards, &mut pending, 0).await?;
        }
        let end = match failure {
            None => Frame::new(b'c', &[]),
            Some(_) => Frame::new(b'f', b"pgrouter: the COPY failed on another shard or in the proxy\0"),
        };
        let mut count = 0;
        let mut shard_failure = None;
        for (id, checkout) in &mut shards {
            let conn = checkout.conn();
            let addr = conn.addr.to_string();
            conn.send(end.as_bytes()).await.map_err(|e| shard_lost(*id, addr.clone(), &e.to_string()))?;
            let answer = crate::timer::timeout(FINISH_TIMEOUT, read_answer(checkout)).await;
            match answer.unwrap_or_else(|_| Err(format!("no answer to CopyDone within {FINISH_TIMEOUT:?}"))) {
                Ok(Ok(n)) => count += n,
                Ok(Err(error)) => {
                    shard_failure.get_or_insert_with(|| name_shard(&error, *id, &addr));
                }
                Err(lost) => return Err(shard_lost(*id, addr, &lost)),
            }
        }
        let failure = failure.or(shard_failure);
        let committed = finish(&mut shards, failure.is_none()).await;
        match (failure, committed) {
            (Some(failure), _) => self.answer_error(&failure).await?,
            (None, Err(why)) => self.answer_error(&messages_error("40000", &why)).await?,
            (None, Ok(())) => {
                let mut out = BytesMut::from(&messages::command_complete(&format!("COPY {count}"))[..]);
                out.extend_from_slice(&messages::ready_for_query(TxStatus::Idle));
                self.client.send(&out.freeze()).await?;
            }
        }
        Ok(true)
    }

    /// Finds the key column's place in the rows and starts the COPY on every shard; returns
    /// the place and the CopyInResponse for the client, or why it could not start.
    async fn start_everywhere(
        &mut self,
        shards: &mut [(ShardId, Checkout)],
        frame: &Frame,
        table_sql: &str,
        columns: &[String],
        column: &str,
    ) -> Result<Result<(usize, bytes::Bytes), Failure>, Error> {
        let index = if columns.is_empty() {
            let sql = format!(
                "select attname from pg_attribute where attrelid = {}::regclass and attnum > 0 and not attisdropped \
                 order by attnum",
                quote_literal(table_sql)
            );
            let (id, checkout) = &mut shards[0];
            let conn = checkout.conn();
            match conn.query_rows(&sql, LOOKUP_TIMEOUT).await {
                Ok(rows) => rows.iter().position(|r| r.first().and_then(Option::as_deref) == Some(column)),
                Err(why) => return Ok(Err(name_shard(&messages_error("42P01", &why), *id, &conn.addr.to_string()))),
            }
        } else {
            columns.iter().position(|c| c == column)
        };
        let Some(index) = index else {
            return Ok(Err(messages_error(
                "42703",
                &format!("the shard key column {column} is not in the COPY's rows"),
            )));
        };
        let mut response = None;
        for i in 0..shards.len() {
            let (id, checkout) = &mut shards[i];
            let conn = checkout.conn();
            let addr = conn.addr.to_string();
            conn.send(frame.as_bytes()).await.map_err(|e| shard_lost(*id, addr.clone(), &e.to_string()))?;
            loop {
                let reply = conn.read_frame().await.map_err(|e| shard_lost(*id, addr.clone(), &e))?;
                match reply.tag() {
                    b'G' => {
                        response.get_or_insert_with(|| bytes::Bytes::copy_from_slice(reply.as_bytes()));
                        break;
                    }
                    b'E' => {
                        let error = name_shard(reply.body(), *id, &addr);
                        while conn.read_frame().await.map_err(|e| shard_lost(*id, addr.clone(), &e))?.tag() != b'Z' {}
                        conn.status = TxStatus::Failed;
                        // the shards before it are copying: end their COPY too
                        let stop = Frame::new(b'f', b"pgrouter: the COPY failed on another shard\0");
                        for (id, checkout) in &mut shards[..i] {
                            let addr = checkout.conn().addr.to_string();
                            let sent = checkout.conn().send(stop.as_bytes()).await;
                            sent.map_err(|e| shard_lost(*id, addr.clone(), &e.to_string()))?;
                            let _its_error = read_answer(checkout).await.map_err(|e| shard_lost(*id, addr, &e))?;
                        }
                        return Ok(Err(error));
                    }
                    _ => {}
                }
            }
        }
        Ok(Ok((index, response.unwrap_or_default())))
    }

    async fn answer_error(&mut self, body: &[u8]) -> Result<(), Error> {
        let mut out = BytesMut::from(&Frame::new(b'E', body).into_bytes()[..]);
        out.extend_from_slice(&messages::ready_for_query(TxStatus::Idle));
        self.client.send(&out.freeze()).await
    }
}

/// An ErrorResponse body.
fn messages_error(code: &'static str, message: &str) -> Failure {
    let full = messages::error_response(Severity::Error, SqlState(code), message);
    full[5..].to_vec()
}

/// Sends each shard the rows gathered for it once there are at least `at` bytes of them.
async fn send_full(shards: &mut [(ShardId, Checkout)], pending: &mut [BytesMut], at: usize) -> Result<(), Error> {
    for ((id, checkout), rows) in shards.iter_mut().zip(pending) {
        if rows.is_empty() || rows.len() < at {
            continue;
        }
        let conn = checkout.conn();
        let data = Frame::new(b'd', &rows[..]);
        rows.clear();
        conn.send(data.as_bytes()).await.map_err(|e| shard_lost(*id, conn.addr.to_string(), &e.to_string()))?;
    }
    Ok(())
}

/// A shard's answer to CopyDone or CopyFail, up to ReadyForQuery: the row count, or its
/// ErrorResponse body. The outer error is a lost connection.
async fn read_answer(checkout: &mut Checkout) -> Result<Result<u64, Vec<u8>>, String> {
    let conn = checkout.conn();
    let mut outcome = Ok(0);
    loop {
        let frame = conn.read_frame().await?;
        match frame.tag() {
            b'C' => {
                let tag = String::from_utf8_lossy(frame.body().strip_suffix(&[0]).unwrap_or(frame.body()));
                outcome = Ok(split_tag(&tag).1.unwrap_or(0));
            }
            b'E' => outcome = Err(frame.body().to_vec()),
            b'Z' => {
                conn.status = frame.body().first().copied().and_then(TxStatus::from_byte).unwrap_or(TxStatus::Failed);
                return Ok(outcome);
            }
            _ => {}
        }
    }
}

/// Commits (or rolls back) the transaction on every shard and returns the connections to
/// their pools; an error names the shards whose COMMIT failed.
async fn finish(shards: &mut Vec<(ShardId, Checkout)>, commit: bool) -> Result<(), String> {
    let mut failed = Vec::new();
    for (id, mut checkout) in shards.drain(..) {
        let conn = checkout.conn();
        let end = if commit && conn.status == TxStatus::InTransaction { "COMMIT" } else { "ROLLBACK" };
        match conn.run_simple(end, FINISH_TIMEOUT).await {
            Ok(TxStatus::Idle) if end == "COMMIT" || !commit => checkout.release(),
            Ok(_) => failed.push(format!("shard {id}: {end} did not end the transaction")),
            Err(why) => failed.push(format!("shard {id}: {why}")),
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        tracing::error!(failures = %failed.join("; "), "a split COPY committed on some shards only");
        Err(format!("pgrouter: the COPY committed on some shards only: {}", failed.join("; ")))
    }
}
