//! DDL on sharded tables inside a transaction (DESIGN §5: `create_all()` and migration tools
//! run their DDL in one). A transaction runs on one shard; each DDL statement on a sharded
//! table runs there as it comes, and `routing::guard_shard` also records its text. When the
//! client commits, the recorded statements run on every other shard, each in a transaction of
//! its own; the transaction's own shard commits first and the others right after it. If a
//! statement fails on another shard, or the own shard's COMMIT fails, nothing commits
//! anywhere and the COMMIT answers an error that names the shard.
//!
//! This is not two-phase commit: a crash between the commits can leave the schema changed on
//! some shards only.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;

use super::Session;
use super::attach::Attached;
use crate::backend::Checkout;
use crate::error::{Error, SqlState};
use crate::frontend::client::ClientIo;
use crate::protocol::framing::Frame;
use crate::protocol::messages::{self, Severity, TxStatus};
use crate::router::ShardId;
use crate::router::hint;

/// How long DDL replayed on another shard, and each COMMIT, may take.
const SCHEMA_TIMEOUT: Duration = Duration::from_secs(600);

/// Is this intercepted message a COMMIT of a transaction with DDL for the other shards?
pub(super) fn commits_elsewhere(frame: &Frame, attached: Option<&Attached>) -> bool {
    attached.is_some_and(|a| !a.elsewhere.is_empty()) && commit_text(frame).is_some_and(hint::is_commit)
}

fn commit_text(frame: &Frame) -> Option<&[u8]> {
    match frame.tag() {
        b'Q' => messages::query_text(frame.body()),
        b'P' => messages::parse_parse(frame.body()).map(|(_, sql)| sql),
        _ => None,
    }
}

impl<S: ClientIo> Session<S> {
    /// Commits the attached transaction after running its DDL on every other shard, and
    /// answers the client's COMMIT (a Query, or a Parse whose batch is read up to its Sync).
    /// `Ok(false)` when the client left meanwhile.
    pub(super) async fn commit_everywhere(&mut self, first: Frame) -> Result<bool, Error> {
        let commit = String::from_utf8_lossy(commit_text(&first).unwrap_or(b"COMMIT")).into_owned();
        let mut batch = vec![first];
        while batch[0].tag() == b'P' && batch.last().is_some_and(|f| f.tag() != b'S') {
            match self.client.read_frame().await? {
                Some(frame) if frame.tag() != b'X' => batch.push(frame),
                _ => return Ok(false),
            }
        }
        let attached = self.server.as_mut().ok_or_else(|| Error::Internal("COMMIT without a server".into()))?;
        let statements = std::mem::take(&mut attached.elsewhere);
        let own = attached.decision.shard;
        let failed = self.flow.status() == TxStatus::Failed;
        let mut others: Vec<(ShardId, Checkout)> = Vec::new();
        let mut refusal = None;
        if !failed {
            let pools = Arc::clone(&self.params.pools);
            for id in (0..).map(ShardId).take_while(|id| pools.shard(*id).is_some()).filter(|id| *id != own) {
                let pool = pools.shard(id).map(|s| Arc::clone(&s.primary)).expect("listed above");
                let Some(mut checkout) = self.checkout(&pool).await? else { return Ok(false) };
                self.apply_settings(&mut checkout).await?;
                let conn = checkout.conn();
                let mut outcome = conn.run_simple("BEGIN", SCHEMA_TIMEOUT).await.map(drop);
                for sql in &statements {
                    if outcome.is_ok() {
                        outcome = conn.run_simple(&String::from_utf8_lossy(sql), SCHEMA_TIMEOUT).await.map(drop);
                    }
                }
                let addr = conn.addr.to_string();
                others.push((id, checkout));
                if let Err(why) = outcome {
                    refusal = Some(format!("shard {id} ({addr}): {why}"));
                    break;
                }
            }
        }
        let conn = self.server.as_mut().expect("attached above").checkout.conn();
        let error = match refusal {
            Some(why) => {
                let _ = conn.run_simple("ROLLBACK", SCHEMA_TIMEOUT).await;
                Some(why)
            }
            None => conn.run_simple(&commit, SCHEMA_TIMEOUT).await.err().map(|why| format!("shard {own}: {why}")),
        };
        let status =
            if conn.status == TxStatus::InTransaction && error.is_none() { conn.status } else { TxStatus::Idle };
        self.flow.set_status(status);
        let finish = if error.is_none() && !failed { "COMMIT" } else { "ROLLBACK" };
        let mut late = Vec::new();
        for (id, mut checkout) in others {
            let conn = checkout.conn();
            match conn.run_simple(finish, SCHEMA_TIMEOUT).await {
                Ok(_) => checkout.release(),
                Err(why) => late.push(format!("shard {id} ({}): {why}", conn.addr)),
            }
        }
        if !late.is_empty() {
            tracing::error!(database = %self.params.database, failures = %late.join("; "), "schema change committed on some shards only");
        }
        let error = error
            .map(|why| format!("pgrouter: the transaction's DDL could not be committed on every shard, and nothing was committed: {why}"))
            .or_else(|| (!late.is_empty()).then(|| format!("pgrouter: the transaction committed on shard {own}, but {finish} failed on {}", late.join("; "))));
        if error.is_some() {
            tracing::warn!(database = %self.params.database, error = ?error, "COMMIT of DDL for every shard failed");
        }
        let tag = if failed { "ROLLBACK" } else { "COMMIT" };
        self.client.send(&answer(&batch, tag, error.as_deref(), status)).await?;
        Ok(true)
    }
}

/// The client's answer for a COMMIT sent as `batch` (a Query, or Parse..Sync).
fn answer(batch: &[Frame], tag: &str, error: Option<&str>, status: TxStatus) -> bytes::Bytes {
    let mut out = BytesMut::new();
    let result = || match error {
        Some(why) => messages::error_response(Severity::Error, SqlState("40000"), why),
        None => messages::command_complete(tag),
    };
    for frame in batch {
        match frame.tag() {
            b'Q' | b'E' => out.extend_from_slice(&result()),
            b'P' => out.extend_from_slice(&Frame::new(b'1', &[]).into_bytes()),
            b'B' => out.extend_from_slice(&Frame::new(b'2', &[]).into_bytes()),
            b'D' => out.extend_from_slice(&Frame::new(b'n', &[]).into_bytes()),
            _ => {}
        }
    }
    out.extend_from_slice(&messages::ready_for_query(status));
    out.freeze()
}
