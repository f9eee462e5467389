//! The logged-in clients, for the `pgrouter_clients` gauges and the admin console's
//! SHOW CLIENTS / SHOW POOLS. A client is registered once at login and removed when its
//! session ends (the [`Registered`] guard); its state changes are atomic stores, so the
//! per-request path takes no lock.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// What a client is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    /// Between requests, without a server connection.
    Idle,
    /// Waiting for a server connection.
    Waiting,
    /// Holding a server connection.
    Active,
}

impl ClientState {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Waiting => "waiting",
            Self::Active => "active",
        }
    }
}

/// One logged-in client.
#[derive(Debug)]
pub struct ClientEntry {
    pub id: u64,
    pub database: String,
    pub user: String,
    pub addr: SocketAddr,
    pub connected_at: SystemTime,
    state: AtomicU8,
    /// When the client began waiting, in µs since the registry's epoch.
    waiting_since_us: AtomicU64,
    pinned: AtomicBool,
    epoch: Instant,
}

impl ClientEntry {
    pub fn set_state(&self, state: ClientState) {
        if state == ClientState::Waiting {
            self.set_waiting_since(Instant::now());
        } else {
            self.state.store(state as u8, Ordering::Relaxed);
        }
    }

    /// The client began waiting at `since` (a clock reading the caller has anyway).
    pub fn set_waiting_since(&self, since: Instant) {
        let us = u64::try_from(since.saturating_duration_since(self.epoch).as_micros()).unwrap_or(u64::MAX);
        self.waiting_since_us.store(us, Ordering::Relaxed);
        self.state.store(ClientState::Waiting as u8, Ordering::Relaxed);
    }

    #[must_use]
    pub fn state(&self) -> ClientState {
        match self.state.load(Ordering::Relaxed) {
            1 => ClientState::Waiting,
            2 => ClientState::Active,
            _ => ClientState::Idle,
        }
    }

    /// How long the client has been waiting for a server connection (zero if it is not).
    #[must_use]
    pub fn waiting_for(&self) -> Duration {
        if self.state() != ClientState::Waiting {
            return Duration::ZERO;
        }
        let since = Duration::from_micros(self.waiting_since_us.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(since)
    }

    pub fn set_pinned(&self) {
        self.pinned.store(true, Ordering::Relaxed);
    }

    #[must_use]
    pub fn pinned(&self) -> bool {
        self.pinned.load(Ordering::Relaxed)
    }
}

/// Every logged-in client.
#[derive(Debug)]
pub struct ClientRegistry {
    epoch: Instant,
    next_id: AtomicU64,
    entries: Mutex<HashMap<u64, Arc<ClientEntry>>>,
}

impl Default for ClientRegistry {
    fn default() -> Self {
        Self { epoch: Instant::now(), next_id: AtomicU64::new(1), entries: Mutex::new(HashMap::new()) }
    }
}

impl ClientRegistry {
    /// Registers a client that just logged in; it is removed when the guard is dropped.
    pub fn register(self: &Arc<Self>, database: &str, user: &str, addr: SocketAddr) -> Registered {
        let entry = Arc::new(ClientEntry {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            database: database.to_owned(),
            user: user.to_owned(),
            addr,
            connected_at: SystemTime::now(),
            state: AtomicU8::new(ClientState::Idle as u8),
            waiting_since_us: AtomicU64::new(0),
            pinned: AtomicBool::new(false),
            epoch: self.epoch,
        });
        self.entries.lock().expect("client registry lock").insert(entry.id, Arc::clone(&entry));
        Registered { entry, registry: Arc::clone(self) }
    }

    /// The clients now, oldest first.
    #[must_use]
    pub fn snapshot(&self) -> Vec<Arc<ClientEntry>> {
        let mut all: Vec<_> = self.entries.lock().expect("client registry lock").values().cloned().collect();
        all.sort_by_key(|e| e.id);
        all
    }
}

/// A client's place in the registry, for as long as its session runs.
#[derive(Debug)]
pub struct Registered {
    pub entry: Arc<ClientEntry>,
    registry: Arc<ClientRegistry>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.entries.lock().expect("client registry lock").remove(&self.entry.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_come_and_go_with_their_state() {
        let registry = Arc::new(ClientRegistry::default());
        let addr: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let a = registry.register("app", "u", addr);
        let b = registry.register("app", "u", addr);
        b.entry.set_state(ClientState::Waiting);
        std::thread::sleep(Duration::from_millis(5));
        let states: Vec<_> = registry.snapshot().iter().map(|e| e.state()).collect();
        assert_eq!(states, [ClientState::Idle, ClientState::Waiting]);
        assert!(b.entry.waiting_for() >= Duration::from_millis(5));
        assert_eq!(a.entry.waiting_for(), Duration::ZERO);
        drop(a);
        assert_eq!(registry.snapshot().len(), 1);
    }
}
