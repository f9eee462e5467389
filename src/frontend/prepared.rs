//! Named prepared statements under transaction pooling (DESIGN §6).
//!
//! A client's statement names mean nothing on the next server connection it borrows, so the
//! proxy renames them: every distinct statement (query text plus parameter types) gets a
//! proxy-wide name `pgr_<id>`, each server connection remembers which of those it has
//! prepared, and the proxy sends the Parse where it is missing — or skips a client's Parse
//! where it is already there, answering ParseComplete itself. A client's Close of a named
//! statement is answered by the proxy too (other clients may share the server-side one).
//!
//! Answers the proxy adds or hides must appear exactly where PostgreSQL would have put them,
//! so [`Exchange`] keeps the queue of replies the server owes and replays PostgreSQL's rule
//! that after an error everything up to the next Sync is skipped ("Message Flow" in the
//! protocol docs). Sans IO: frames in, bytes out.
//!
//! A statement whose plan went stale ("cached plan must not change result type" after a
//! schema change) gets a new proxy-wide name, so every connection prepares it afresh instead
//! of failing again.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};

pub use crate::backend::statements::{SERVER_STATEMENTS, ServerStatements};
use crate::protocol::framing::{Frame, get_cstr};
use crate::protocol::messages::parse_error_fields;

mod deallocate;

pub use deallocate::{Deallocate, deallocate, may_deallocate};

/// Proxy-wide statement ids, by statement (query text and parameter types).
#[derive(Default)]
pub struct Registry {
    ids: Mutex<HashMap<Key, u64>>,
    next: AtomicU64,
    /// Bumped whenever a statement gets a new id, so cached ids can be checked cheaply.
    epoch: AtomicU64,
}

impl Registry {
    fn id(&self, key: &Key) -> u64 {
        let mut ids = self.ids.lock().expect("registry lock");
        if let Some(&id) = ids.get(key) {
            return id;
        }
        if ids.len() >= 100_000 {
            // forget old statements rather than grow without bound; ids are never reused
            ids.clear();
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        ids.insert(key.clone(), id);
        id
    }

    /// Gives a statement a new id (its plan went stale on the servers).
    fn renew(&self, key: &Key) {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.ids.lock().expect("registry lock").insert(key.clone(), id);
        self.epoch.fetch_add(1, Ordering::Release);
    }

    fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }
}

/// The name a statement has on the servers.
fn server_name(id: u64) -> String {
    format!("pgr_{id}")
}

/// Appends a message of type `tag` whose body is `head`, [`server_name`]`(id)` with its
/// terminating zero, then `tail`: a renamed Parse, Bind, Describe or Close, written straight
/// into the outgoing buffer without allocating.
fn push_named(out: &mut BytesMut, tag: u8, head: &[u8], id: u64, tail: &[u8]) {
    use std::fmt::Write;
    let name_len = 4 + id.checked_ilog10().map_or(1, |digits| digits as usize + 1);
    let len = 4 + head.len() + name_len + 1 + tail.len();
    out.extend_from_slice(&[tag]);
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(head);
    let _ = write!(out, "pgr_{id}");
    out.extend_from_slice(b"\0");
    out.extend_from_slice(tail);
}

/// One named statement of a client.
#[derive(Debug, Clone)]
struct Entry {
    /// The Parse body after the name: query text, parameter count and types.
    key: Key,
    id: u64,
    epoch: u64,
}

/// What makes two Parses one statement: the Parse body after the name (query text and
/// parameter types) and the search_path it is prepared under, which decides what its names
/// mean (schema-per-tenant clients share texts, not tables).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    body: Bytes,
    search_path: Bytes,
}

/// At most this many closed statements are remembered per client (see `released`).
const MAX_RELEASED: usize = 1024;

/// A client's named statements.
#[derive(Default)]
pub struct ClientStatements {
    by_name: super::NameMap<Entry>,
    /// Statements the client closed or deallocated. Preparing one again asks for a fresh
    /// plan (psycopg deallocates everything after DDL, then prepares again), so it gets a
    /// new proxy-wide name instead of a server-side statement whose plan may be stale.
    released: std::collections::HashSet<Key>,
    /// The client's search_path (empty: the server's default).
    search_path: Bytes,
}

impl ClientStatements {
    /// Records a client's Parse of a named statement (`rest`: the Parse body after the name).
    /// Returns the proxy-wide id and key.
    pub fn define(&mut self, name: &[u8], rest: &[u8], registry: &Registry) -> (u64, Key) {
        let key = Key { body: Bytes::copy_from_slice(rest), search_path: self.search_path.clone() };
        if self.released.remove(&key) {
            registry.renew(&key);
        }
        let id = registry.id(&key);
        self.by_name.insert(name.into(), Entry { key: key.clone(), id, epoch: registry.epoch() });
        (id, key)
    }

    fn resolve(&mut self, name: &[u8], registry: &Registry) -> Option<Entry> {
        let entry = self.by_name.get_mut(name)?;
        let epoch = registry.epoch();
        if entry.epoch != epoch {
            entry.id = registry.id(&entry.key);
            entry.epoch = epoch;
        }
        Some(entry.clone())
    }

    /// Forgets every statement (DEALLOCATE ALL, DISCARD ALL).
    pub fn clear(&mut self) {
        for (_, entry) in self.by_name.drain() {
            Self::release(&mut self.released, entry.key);
        }
    }

    /// Forgets one statement (DEALLOCATE name, Close); false if the client has no such statement.
    pub fn remove(&mut self, name: &[u8]) -> bool {
        match self.by_name.remove(name) {
            Some(entry) => {
                Self::release(&mut self.released, entry.key);
                true
            }
            None => false,
        }
    }

    /// Statements prepared from now on are prepared under this search_path.
    pub fn set_search_path(&mut self, search_path: Option<&str>) {
        let search_path = search_path.unwrap_or_default().as_bytes();
        if search_path != self.search_path {
            self.search_path = Bytes::copy_from_slice(search_path);
        }
    }

    fn release(released: &mut std::collections::HashSet<Key>, key: Key) {
        if released.len() >= MAX_RELEASED {
            released.clear();
        }
        released.insert(key);
    }
}

/// What a reply the server owes answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Parse,
    Bind,
    Close,
    DescribeStatement,
    DescribePortal,
    Execute,
    Sync,
    /// A simple Query or a FunctionCall: everything up to ReadyForQuery.
    UntilReady,
}

/// What a server message does to the reply owed at the front of the queue.
enum Effect {
    /// Nothing: it is part of the reply.
    None,
    /// It is the reply (or its last message).
    Answers,
    /// An ErrorResponse: this reply and the rest up to Sync are cut short.
    Error,
    /// The Execute started COPY FROM STDIN.
    CopyStarts,
    /// A ReadyForQuery before the reply came.
    OutOfStep,
}

fn effect(tag: u8, kind: Kind) -> Effect {
    match (tag, kind) {
        (b'E', Kind::UntilReady) => Effect::None,
        (b'E', _) => Effect::Error,
        (b'G', Kind::Execute) => Effect::CopyStarts,
        (b'1', Kind::Parse)
        | (b'2', Kind::Bind)
        | (b'3', Kind::Close)
        | (b'T' | b'n', Kind::DescribeStatement | Kind::DescribePortal)
        | (b'C' | b'I' | b's', Kind::Execute)
        | (b'Z', Kind::Sync | Kind::UntilReady) => Effect::Answers,
        (b'Z', _) => Effect::OutOfStep,
        _ => Effect::None,
    }
}

#[derive(Debug)]
enum Expect {
    Reply {
        kind: Kind,
        /// An answer to a message the proxy added: not forwarded.
        hidden: bool,
        /// The statement it concerns: marked prepared (Parse) or renewed (stale plan).
        statement: Option<(u64, Key)>,
        /// An Execute that started COPY FROM STDIN.
        copying: bool,
    },
    /// An answer the proxy gives itself, due at this point of the stream.
    Local(Bytes),
}

/// What to do with a server message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Forward,
    Hide,
}

/// The replies one attachment is owed, and the renaming of its statements.
#[derive(Default)]
pub struct Exchange {
    queue: VecDeque<Expect>,
    /// Portal name -> the statement bound to it (for stale-plan errors).
    portals: super::NameMap<(u64, Key)>,
    /// The server reported an error and discards everything up to the next Sync, including
    /// messages the client sends only now (after a Flush, say).
    skipping: bool,
    /// An answer of the proxy's own may be queued. Set when one is queued, cleared when the
    /// queue is empty, so most requests (no named statement) never look for one.
    locals: bool,
}

const PARSE_COMPLETE: &[u8] = &[b'1', 0, 0, 0, 4];
const CLOSE_COMPLETE: &[u8] = &[b'3', 0, 0, 0, 4];

impl Exchange {
    /// Forgets everything, keeping the allocations (a session reuses one exchange).
    pub fn clear(&mut self) {
        self.queue.clear();
        self.portals.clear();
        self.skipping = false;
        self.locals = false;
    }

    /// True when no reply is owed.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Server message types whose arrival moves the queue (the others pass untouched).
    #[must_use]
    pub fn watches(&self, tag: u8) -> bool {
        !self.queue.is_empty()
            && matches!(tag, b'1' | b'2' | b'3' | b't' | b'n' | b'T' | b'C' | b'I' | b's' | b'Z' | b'E' | b'G')
    }

    /// Takes one client message: what goes to the server is appended to `to_server`, and any
    /// answer due now to `to_client`.
    pub fn client_frame(
        &mut self,
        frame: Frame,
        ctx: &mut Context<'_>,
        to_server: &mut BytesMut,
        to_client: &mut BytesMut,
    ) {
        if self.skipping {
            if !matches!(frame.tag(), b'S' | b'X') {
                // PostgreSQL ignores it, so it prepares and closes nothing and owes no reply
                to_server.extend_from_slice(frame.as_bytes());
                return;
            }
            self.skipping = false;
        }
        let body = frame.body();
        match frame.tag() {
            b'P' => self.parse(&frame, ctx, to_server),
            b'B' => {
                let mut rest = body;
                let portal = get_cstr(&mut rest).unwrap_or_default();
                let name = get_cstr(&mut rest).unwrap_or_default();
                let statement = self.prepare_for(name, ctx, to_server);
                match statement.clone() {
                    Some((id, key)) => {
                        self.portals.insert(portal.into(), (id, key));
                        // the portal name with its zero, then the statement's new name
                        push_named(to_server, b'B', &body[..=portal.len()], id, rest);
                    }
                    None => {
                        // (removing hashes the name even from an empty map)
                        if !self.portals.is_empty() {
                            self.portals.remove(portal);
                        }
                        to_server.extend_from_slice(frame.as_bytes());
                    }
                }
                // a stale plan is reported at Bind
                self.expect(Kind::Bind, statement);
            }
            b'D' | b'C' if body.first() == Some(&b'S') && body.get(1).is_some_and(|&b| b != 0) => {
                let name = &body[1..body.len().saturating_sub(1)];
                if frame.tag() == b'C' {
                    // other clients may share the server-side statement: answer it here
                    ctx.client.remove(name);
                    self.push_local(CLOSE_COMPLETE);
                } else {
                    match self.prepare_for(name, ctx, to_server) {
                        Some((id, _)) => push_named(to_server, b'D', b"S", id, b""),
                        None => to_server.extend_from_slice(frame.as_bytes()),
                    }
                    self.expect(Kind::DescribeStatement, None);
                }
            }
            tag => {
                to_server.extend_from_slice(frame.as_bytes());
                match tag {
                    b'D' if body.first() == Some(&b'S') => self.expect(Kind::DescribeStatement, None),
                    b'D' => self.expect(Kind::DescribePortal, None),
                    b'C' => self.expect(Kind::Close, None),
                    b'E' => {
                        let mut rest = body;
                        let portal = get_cstr(&mut rest).unwrap_or_default();
                        let statement = self.portals.get(portal).cloned();
                        self.expect(Kind::Execute, statement);
                    }
                    b'S' => self.expect(Kind::Sync, None),
                    b'Q' | b'F' => self.expect(Kind::UntilReady, None),
                    b'c' | b'f' => self.copy_done(),
                    _ => {}
                }
            }
        }
        self.emit_due(to_client);
    }

    fn push_local(&mut self, answer: &'static [u8]) {
        self.queue.push_back(Expect::Local(Bytes::from_static(answer)));
        self.locals = true;
    }

    fn expect(&mut self, kind: Kind, statement: Option<(u64, Key)>) {
        self.queue.push_back(Expect::Reply { kind, hidden: false, statement, copying: false });
    }

    /// A client's Parse: a named one is renamed, or skipped if the server has it already.
    fn parse(&mut self, frame: &Frame, ctx: &mut Context<'_>, to_server: &mut BytesMut) {
        let mut rest = frame.body();
        let name = get_cstr(&mut rest).unwrap_or_default();
        if name.is_empty() {
            to_server.extend_from_slice(frame.as_bytes());
            self.expect(Kind::Parse, None);
            return;
        }
        let (id, key) = ctx.client.define(name, rest, ctx.registry);
        if ctx.server.has(id) {
            self.push_local(PARSE_COMPLETE);
        } else {
            self.send_parse(id, &key, false, ctx, to_server);
        }
    }

    /// Makes sure the statement a Bind or Describe names is prepared on this server.
    /// `None` if the client has no such named statement (the message goes on unchanged and
    /// the server reports the error with the client's own name).
    fn prepare_for(&mut self, name: &[u8], ctx: &mut Context<'_>, to_server: &mut BytesMut) -> Option<(u64, Key)> {
        if name.is_empty() {
            return None;
        }
        let entry = ctx.client.resolve(name, ctx.registry)?;
        if !ctx.server.has(entry.id) {
            self.send_parse(entry.id, &entry.key, true, ctx, to_server);
        }
        Some((entry.id, entry.key))
    }

    /// Sends Parse for a proxy-wide statement, closing the least recently used one first if
    /// the server is full. The statement counts as prepared from now on (a second Parse in
    /// the same pipeline must not be sent); an error takes that back.
    fn send_parse(&mut self, id: u64, key: &Key, hidden: bool, ctx: &mut Context<'_>, to_server: &mut BytesMut) {
        if let Some(old) = ctx.server.add(id) {
            push_named(to_server, b'C', b"S", old, b"");
            self.queue.push_back(Expect::Reply { kind: Kind::Close, hidden: true, statement: None, copying: false });
        }
        push_named(to_server, b'P', b"", id, &key.body);
        self.queue.push_back(Expect::Reply {
            kind: Kind::Parse,
            hidden,
            statement: Some((id, key.clone())),
            copying: false,
        });
    }

    /// CopyDone/CopyFail after an Execute that started COPY FROM STDIN: the Syncs the client
    /// sent meanwhile were swallowed by the server (see `flow`), so no reply is owed for them.
    fn copy_done(&mut self) {
        let Some(pos) = self.queue.iter().position(|e| matches!(e, Expect::Reply { copying: true, .. })) else {
            return;
        };
        let mut i = pos + 1;
        while i < self.queue.len() {
            if matches!(self.queue[i], Expect::Reply { kind: Kind::Sync, .. }) {
                self.queue.remove(i);
            } else {
                i += 1;
            }
        }
        if let Some(Expect::Reply { copying, .. }) = self.queue.get_mut(pos) {
            *copying = false;
        }
    }

    /// Takes one watched server message (see [`Exchange::watches`]). After forwarding it (or
    /// not), the caller calls [`Exchange::emit_due`] for answers that became due.
    pub fn server_message(&mut self, tag: u8, body: &[u8], ctx: &mut Context<'_>) -> Disposition {
        let Some(Expect::Reply { kind, hidden, .. }) = self.queue.front() else {
            return Disposition::Forward; // nothing owed: an unsolicited message
        };
        let (kind, hidden) = (*kind, *hidden);
        let disposition = if hidden { Disposition::Hide } else { Disposition::Forward };
        match effect(tag, kind) {
            Effect::None => disposition,
            Effect::Error => {
                self.on_error(body, ctx);
                Disposition::Forward // an error always reaches the client
            }
            Effect::CopyStarts => {
                self.copy_starts();
                disposition
            }
            Effect::Answers => {
                self.queue.pop_front();
                disposition
            }
            Effect::OutOfStep => {
                // out of step (should not happen): stop rewriting answers for this request
                tracing::warn!(expected = ?kind, "ReadyForQuery arrived early; dropping the reply queue");
                self.queue.clear();
                Disposition::Forward
            }
        }
    }

    /// Takes a server message of type `tag` as it goes by, when its type alone says what it
    /// does: true if taken (it goes to the client untouched and unread), false if it must be
    /// handed whole to `server_message` (its body matters, it is not forwarded, or an answer
    /// of the proxy's own falls due right after it). False changes nothing. Most answers are
    /// taken so: handling each whole cost as much as the rest of the relay.
    pub fn pass(&mut self, tag: u8) -> bool {
        let kind = match self.queue.front() {
            None => return true,
            Some(Expect::Reply { kind, hidden: false, .. }) => *kind,
            Some(_) => return !self.watches(tag),
        };
        match effect(tag, kind) {
            Effect::None => true,
            Effect::CopyStarts => {
                self.copy_starts();
                true
            }
            Effect::Answers if !(self.locals && matches!(self.queue.get(1), Some(Expect::Local(_)))) => {
                self.queue.pop_front();
                true
            }
            Effect::Answers | Effect::Error | Effect::OutOfStep => false,
        }
    }

    fn copy_starts(&mut self) {
        if let Some(Expect::Reply { copying, .. }) = self.queue.front_mut() {
            *copying = true;
        }
    }

    /// An ErrorResponse ends the current reply, and the server skips everything up to the
    /// next Sync: those replies (and the proxy's own answers among them) are no longer due.
    fn on_error(&mut self, body: &[u8], ctx: &mut Context<'_>) {
        if matches!(self.queue.front(), Some(Expect::Reply { kind: Kind::Sync, .. })) {
            return; // an error of the Sync itself (the implicit COMMIT failed): ReadyForQuery follows
        }
        if let Some(Expect::Reply { kind, statement: Some((id, key)), .. }) = self.queue.pop_front() {
            match kind {
                Kind::Parse => ctx.server.remove(id),
                _ if is_stale_plan(body) => {
                    tracing::info!(statement = %server_name(id), "prepared statement's plan is stale after a schema change; it will be prepared again under a new name");
                    ctx.registry.renew(&key);
                }
                _ => {}
            }
        }
        // the server now skips to the next Sync; if the client has not sent it yet, what it
        // sends until then is skipped too
        self.skipping = true;
        while let Some(front) = self.queue.front() {
            match front {
                Expect::Reply { kind: Kind::Sync, .. } => {
                    self.skipping = false;
                    break;
                }
                Expect::Reply { kind: Kind::Parse, statement: Some((id, _)), .. } => {
                    ctx.server.remove(*id);
                    self.queue.pop_front();
                }
                _ => {
                    self.queue.pop_front();
                }
            }
        }
    }

    /// Writes the proxy's own answers that are now at the head of the queue.
    #[inline]
    pub fn emit_due(&mut self, to_client: &mut BytesMut) {
        if self.locals {
            self.emit_locals(to_client);
        }
    }

    fn emit_locals(&mut self, to_client: &mut BytesMut) {
        while let Some(Expect::Local(bytes)) = self.queue.front() {
            to_client.extend_from_slice(bytes);
            self.queue.pop_front();
        }
        self.locals = !self.queue.is_empty();
    }
}

/// "cached plan must not change result type" (SQLSTATE 0A000).
fn is_stale_plan(error_body: &[u8]) -> bool {
    let f = parse_error_fields(error_body);
    f.code == "0A000" && f.message.contains("cached plan must not change result type")
}

/// What the exchange works with besides its queue.
pub struct Context<'a> {
    pub registry: &'a Registry,
    pub client: &'a mut ClientStatements,
    pub server: &'a mut ServerStatements,
}

#[cfg(test)]
mod tests;
