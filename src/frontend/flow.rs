//! Knows, from the message types flowing each way, whether the client and its server are at
//! rest: every request answered and nothing half-sent. Only then may a server connection be
//! released (transaction mode) or a session be stopped. Sans IO.
//!
//! Rules from the PostgreSQL docs ("Message Flow"):
//! - every Query, Sync and FunctionCall is answered by exactly one ReadyForQuery, except that
//! - a Sync the server reads while in COPY-in mode is ignored (drivers such as tokio-postgres
//!   send Bind/Execute/Sync before they know the statement is a COPY, then CopyDone/Sync);
//! - Parse/Bind/Describe/Execute/Close/Flush are answered only after a later Sync, so until
//!   then the server connection belongs to this client (never release on Flush).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::protocol::messages::TxStatus;

#[derive(Debug, Clone)]
pub struct Flow {
    /// Requests sent whose ReadyForQuery has not arrived yet.
    pending: u32,
    /// Extended-protocol messages sent since the last Sync.
    unsynced: bool,
    /// Syncs sent since the last Query or Execute (the message that may have started a COPY).
    syncs_since_exec: u32,
    /// The last Query-or-Execute was an Execute (extended protocol).
    exec_extended: bool,
    /// The server said CopyInResponse and the client has not finished the copy yet.
    client_copy: bool,
    /// The server said CopyInResponse and has not ended the copy yet (CommandComplete,
    /// ErrorResponse or ReadyForQuery).
    server_copy: bool,
    /// The count of answers may be off: an extended-protocol COPY failed, and whether the
    /// Syncs sent during it were swallowed depends on when the server failed. Such a
    /// connection is closed rather than pooled.
    tainted: bool,
    status: TxStatus,
    /// When each pending request was sent, oldest first (for latency metrics).
    sent: VecDeque<Instant>,
    /// How long the request the last ReadyForQuery answered took.
    answered: Option<Duration>,
    /// When the first request since the flow began was sent, and when the last
    /// ReadyForQuery came (the clock is read only there).
    first_sent: Option<Instant>,
    last_ready: Option<Instant>,
}

impl Default for Flow {
    fn default() -> Self {
        Self {
            pending: 0,
            unsynced: false,
            syncs_since_exec: 0,
            exec_extended: false,
            client_copy: false,
            server_copy: false,
            tainted: false,
            status: TxStatus::Idle,
            sent: VecDeque::new(),
            answered: None,
            first_sent: None,
            last_ready: None,
        }
    }
}

impl Flow {
    /// Back to the state of a fresh connection, keeping the allocation of `sent` (a session
    /// starts a flow per transaction under transaction pooling).
    pub fn reset(&mut self) {
        let mut sent = std::mem::take(&mut self.sent);
        sent.clear();
        *self = Self { sent, ..Self::default() };
    }

    /// A message the client sent on to the server.
    pub fn on_client(&mut self, tag: u8) {
        match tag {
            // A Query after successful extended messages closes their implicit batch too.
            b'Q' | b'F' => {
                self.note_sent();
                self.pending += 1;
                self.unsynced = false;
                self.syncs_since_exec = 0;
                self.exec_extended = false;
            }
            b'E' => {
                self.unsynced = true;
                self.syncs_since_exec = 0;
                self.exec_extended = true;
            }
            b'S' => {
                self.note_sent();
                self.pending += 1;
                self.unsynced = false;
                self.syncs_since_exec += 1;
            }
            b'P' | b'B' | b'D' | b'C' => self.unsynced = true,
            b'c' | b'f' if self.client_copy => {
                // The Syncs sent while the server was copying in were swallowed; the COPY
                // started by an Execute is then answered only after the client's next Sync.
                self.pending = self.pending.saturating_sub(self.syncs_since_exec);
                let answered = self.sent.len().saturating_sub(self.syncs_since_exec as usize);
                self.sent.truncate(answered);
                self.unsynced |= self.exec_extended;
                self.syncs_since_exec = 0;
                self.client_copy = false;
            }
            // Flush asks for output and changes nothing else.
            _ => {}
        }
    }

    fn note_sent(&mut self) {
        let now = Instant::now();
        self.sent.push_back(now);
        self.first_sent.get_or_insert(now);
    }

    /// From the first request sent to the last ReadyForQuery (how long the server worked
    /// for this flow), if both happened.
    #[must_use]
    pub fn span(&self) -> Option<Duration> {
        Some(self.last_ready?.saturating_duration_since(self.first_sent?))
    }

    /// When the last ReadyForQuery came.
    #[must_use]
    pub fn last_ready(&self) -> Option<Instant> {
        self.last_ready
    }

    /// Server message types the flow must see (beyond ReadyForQuery), given its state.
    #[must_use]
    pub fn watches(&self, tag: u8) -> bool {
        match tag {
            b'Z' | b'G' => true,
            b'C' | b'E' => self.server_copy,
            _ => false,
        }
    }

    /// A message the server sent; `ready` carries ReadyForQuery's status byte.
    pub fn on_server(&mut self, tag: u8, ready: Option<TxStatus>) {
        match (tag, ready) {
            (b'G', _) => {
                self.client_copy = true;
                self.server_copy = true;
            }
            (b'C', _) => self.server_copy = false,
            (b'E', _) => {
                // A failed extended-protocol COPY: the server may or may not have read the
                // client's Syncs in copy mode (where they are ignored).
                self.tainted |= self.server_copy && self.exec_extended;
                self.server_copy = false;
            }
            (b'Z', Some(status)) => {
                let now = Instant::now();
                self.answered = self.sent.pop_front().map(|sent| now.duration_since(sent));
                self.last_ready = Some(now);
                self.pending = self.pending.saturating_sub(1);
                self.status = status;
                self.client_copy = false;
                self.server_copy = false;
            }
            _ => {}
        }
    }

    /// How long the request the last ReadyForQuery answered took, once.
    pub fn take_answered(&mut self) -> Option<Duration> {
        self.answered.take()
    }

    /// Every request answered, nothing half-sent.
    #[must_use]
    pub fn at_rest(&self) -> bool {
        self.pending == 0 && !self.unsynced
    }

    /// At rest and outside any transaction block: the server connection may change hands.
    #[must_use]
    pub fn idle(&self) -> bool {
        self.at_rest() && self.status == TxStatus::Idle
    }

    /// The connection should be closed rather than pooled (see the field).
    #[must_use]
    pub fn tainted(&self) -> bool {
        self.tainted
    }

    #[must_use]
    pub fn status(&self) -> TxStatus {
        self.status
    }

    /// The status a freshly attached server is in (after the proxy started a transaction).
    pub fn set_status(&mut self, status: TxStatus) {
        self.status = status;
    }

    /// Requests sent whose ReadyForQuery has not arrived.
    #[must_use]
    pub fn pending(&self) -> u32 {
        self.pending
    }

    /// Extended-protocol messages were sent after the last Sync.
    #[must_use]
    pub fn unsynced(&self) -> bool {
        self.unsynced
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(flow: &mut Flow, tags: &[u8]) {
        tags.iter().for_each(|&t| flow.on_client(t));
    }

    fn ready(flow: &mut Flow, status: u8) {
        flow.on_server(b'Z', TxStatus::from_byte(status));
    }

    #[test]
    fn simple_query_round_trip() {
        let mut f = Flow::default();
        client(&mut f, b"Q");
        assert!(!f.at_rest());
        ready(&mut f, b'I');
        assert!(f.idle());
    }

    #[test]
    fn span_runs_from_the_first_request_to_the_last_ready() {
        let mut f = Flow::default();
        assert_eq!(f.span(), None);
        client(&mut f, b"Q");
        assert_eq!(f.span(), None, "nothing answered yet");
        ready(&mut f, b'T');
        let first = f.span().expect("one request answered");
        std::thread::sleep(std::time::Duration::from_millis(2));
        client(&mut f, b"Q");
        ready(&mut f, b'I');
        assert!(f.span().expect("two answered") >= first + std::time::Duration::from_millis(2));
        assert!(f.last_ready().is_some());
        f.reset();
        assert_eq!((f.span(), f.last_ready()), (None, None));
    }

    #[test]
    fn pipelined_extended_batches_wait_for_every_sync() {
        let mut f = Flow::default();
        client(&mut f, b"PBDES");
        client(&mut f, b"BES");
        ready(&mut f, b'I');
        assert!(!f.at_rest(), "one Sync still unanswered");
        ready(&mut f, b'I');
        assert!(f.idle());
    }

    #[test]
    fn flush_never_releases() {
        let mut f = Flow::default();
        client(&mut f, b"PDH");
        assert!(!f.at_rest());
        client(&mut f, b"S");
        ready(&mut f, b'I');
        assert!(f.idle());
        // a Flush after everything was answered asks for nothing
        client(&mut f, b"H");
        assert!(f.idle());
    }

    #[test]
    fn query_after_unsynced_extended_messages() {
        let mut f = Flow::default();
        client(&mut f, b"PBEQ");
        ready(&mut f, b'I');
        assert!(f.idle());
    }

    #[test]
    fn transaction_block_is_at_rest_but_not_idle() {
        let mut f = Flow::default();
        client(&mut f, b"Q");
        ready(&mut f, b'T');
        assert!(f.at_rest());
        assert!(!f.idle());
        client(&mut f, b"Q");
        ready(&mut f, b'E');
        assert_eq!(f.status(), TxStatus::Failed);
        client(&mut f, b"Q");
        ready(&mut f, b'I');
        assert!(f.idle());
    }

    #[test]
    fn extended_copy_in_swallows_the_first_sync() {
        // tokio-postgres: Bind, Execute, Sync, then CopyData..., CopyDone, Sync
        let mut f = Flow::default();
        client(&mut f, b"BES");
        f.on_server(b'2', None);
        f.on_server(b'G', None);
        client(&mut f, b"dddc");
        assert!(!f.at_rest(), "the COPY's answer still needs the next Sync");
        client(&mut f, b"S");
        assert!(!f.at_rest());
        ready(&mut f, b'I');
        assert!(f.idle());
    }

    #[test]
    fn failed_extended_copy_is_tainted() {
        // data error mid-copy: the first Sync was swallowed, the last one is answered
        let mut f = Flow::default();
        client(&mut f, b"BES");
        f.on_server(b'G', None);
        client(&mut f, b"dd");
        f.on_server(b'E', None);
        client(&mut f, b"cS");
        ready(&mut f, b'I');
        assert!(f.idle());
        assert!(f.tainted(), "the answer count was a guess: do not pool");
    }

    #[test]
    fn failed_simple_copy_is_not_tainted() {
        let mut f = Flow::default();
        client(&mut f, b"Q");
        f.on_server(b'G', None);
        client(&mut f, b"d");
        f.on_server(b'E', None);
        ready(&mut f, b'I');
        client(&mut f, b"dc");
        assert!(f.idle());
        assert!(!f.tainted());
    }

    #[test]
    fn simple_copy_in() {
        let mut f = Flow::default();
        client(&mut f, b"Q");
        f.on_server(b'G', None);
        client(&mut f, b"ddc");
        assert!(!f.at_rest());
        ready(&mut f, b'I');
        assert!(f.idle());
    }

    #[test]
    fn copy_done_outside_copy_changes_nothing() {
        let mut f = Flow::default();
        client(&mut f, b"Sc");
        ready(&mut f, b'I');
        assert!(f.idle());
    }
}
