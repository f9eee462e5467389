//! Which of the proxy-wide prepared statements a server connection has (the renaming itself
//! is `frontend::prepared`). Bounded: the least recently used statement makes room.

use std::collections::HashMap;

/// Statements a server connection keeps prepared; beyond this the least recently used is
/// closed.
pub const SERVER_STATEMENTS: usize = 512;

/// The proxy-wide statements prepared on one server connection, least recently used first
/// out.
#[derive(Debug, Default)]
pub struct ServerStatements {
    used: HashMap<u64, u64>,
    tick: u64,
}

impl ServerStatements {
    pub(crate) fn has(&mut self, id: u64) -> bool {
        self.tick += 1;
        match self.used.get_mut(&id) {
            Some(t) => {
                *t = self.tick;
                true
            }
            None => false,
        }
    }

    /// Records `id` as prepared; returns the id to close if the connection is full.
    pub(crate) fn add(&mut self, id: u64) -> Option<u64> {
        self.tick += 1;
        let evict = (self.used.len() >= SERVER_STATEMENTS)
            .then(|| self.used.iter().min_by_key(|(_, t)| **t).map(|(id, _)| *id))
            .flatten();
        if let Some(old) = evict {
            self.used.remove(&old);
        }
        self.used.insert(id, self.tick);
        evict
    }

    pub(crate) fn remove(&mut self, id: u64) {
        self.used.remove(&id);
    }

    /// Forgets everything (the server dropped its prepared statements: DISCARD ALL).
    pub fn clear(&mut self) {
        self.used.clear();
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.used.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }
}
