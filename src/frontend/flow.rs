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

use crate::protocol::messages::TxStatus;

#[derive(Debug, Clone)]
pub struct Flow {
    /// Requests sent whose ReadyForQuery has not arrived yet.
    pending: u32,
    /// Extended-protocol messages sent since the last Sync.
    unsynced: bool,
    /// Syncs sent since the last Query or Execute (the message that may have started a COPY).
    syncs_since_exec: u32,
    /// The server said CopyInResponse and the client has not finished the copy yet.
    copy_in: bool,
    status: TxStatus,
}

impl Default for Flow {
    fn default() -> Self {
        Self {
            pending: 0,
            unsynced: false,
            syncs_since_exec: 0,
            copy_in: false,
            status: TxStatus::Idle,
        }
    }
}

impl Flow {
    /// A message the client sent on to the server.
    pub fn on_client(&mut self, tag: u8) {
        match tag {
            b'Q' | b'F' => {
                self.pending += 1;
                self.syncs_since_exec = 0;
            }
            b'E' => {
                self.unsynced = true;
                self.syncs_since_exec = 0;
            }
            b'S' => {
                self.pending += 1;
                self.unsynced = false;
                self.syncs_since_exec += 1;
            }
            b'P' | b'B' | b'D' | b'C' | b'H' => self.unsynced = true,
            b'c' | b'f' if self.copy_in => {
                // The Syncs sent while the server was copying in were swallowed.
                self.pending = self.pending.saturating_sub(self.syncs_since_exec);
                self.syncs_since_exec = 0;
                self.copy_in = false;
            }
            _ => {}
        }
    }

    /// A message the server sent; `ready` carries ReadyForQuery's status byte.
    pub fn on_server(&mut self, tag: u8, ready: Option<TxStatus>) {
        match (tag, ready) {
            (b'G', _) => self.copy_in = true,
            (b'Z', Some(status)) => {
                self.pending = self.pending.saturating_sub(1);
                self.status = status;
                self.copy_in = false;
            }
            _ => {}
        }
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

    #[must_use]
    pub fn status(&self) -> TxStatus {
        self.status
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
        client(&mut f, b"dddcS");
        assert!(!f.at_rest());
        ready(&mut f, b'I');
        assert!(f.idle());
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
