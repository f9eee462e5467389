//! Cancel keys: each client gets pgrouter's own BackendKeyData, mapped to whichever server
//! connection is running that client's query right now.
//!
//! A CancelRequest arrives on a fresh connection with a pid and secret. If the secret
//! matches (compared in constant time) and the client has a query on a server, the request
//! is forwarded to that server with the server's own key; otherwise nothing is cancelled and
//! nothing is said, as PostgreSQL does.
//!
//! Several instances behind one address (a load balancer, SO_REUSEPORT): each key's process
//! id carries its instance in its top byte, so an instance that receives a CancelRequest for
//! another instance's client forwards it to its peers (`proxy.peers`) with pgrouter's own
//! request code, which a peer serves for its own clients only.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use crate::backend::conn::CancelTarget;
use crate::backend::conn::{send_cancel, send_cancel_packet};
use crate::config::ServerAddr;
use crate::protocol::ct_eq;
use crate::protocol::startup::{CancelKey, PEER_CANCEL_REQUEST};

struct Slot {
    secret: [u8; 4],
    /// Where the client's current query runs; set and cleared per transaction (the lock is
    /// this client's own: only a CancelRequest for it ever contends).
    target: Mutex<Option<Arc<CancelTarget>>>,
}

#[derive(Default)]
pub struct CancelRegistry {
    slots: Mutex<HashMap<i32, Arc<Slot>>>,
    next_pid: AtomicI32,
    /// This instance's number (`proxy.instance_id`), the top byte of every pid it gives.
    instance: i32,
}

/// The instance a cancel key's process id was given by.
#[must_use]
pub fn instance_of(pid: i32) -> i32 {
    pid >> 24
}

impl CancelRegistry {
    #[must_use]
    pub fn new(instance_id: u32) -> Self {
        Self { instance: i32::try_from(instance_id).unwrap_or(0) & 0x7f, ..Self::default() }
    }

    /// Was this key given by this instance?
    #[must_use]
    pub fn is_local(&self, key: &CancelKey) -> bool {
        instance_of(key.pid) == self.instance
    }

    /// Forwards a CancelRequest for another instance's client to every peer; a peer serves it
    /// if the client is its own. Returns how many peers took it.
    pub async fn forward_to_peers(&self, key: &CancelKey, peers: &[ServerAddr], limit: Duration) -> usize {
        let sends = peers.iter().map(|peer| async move {
            let sent = send_cancel_packet(peer, PEER_CANCEL_REQUEST, key, limit).await;
            if let Err(e) = &sent {
                tracing::warn!(peer = %peer, pid = key.pid, error = %e, "cannot forward cancel request to peer");
            }
            sent.is_ok()
        });
        let taken = futures_util::future::join_all(sends).await.into_iter().filter(|ok| *ok).count();
        tracing::info!(
            pid = key.pid,
            instance = instance_of(key.pid),
            peers = taken,
            "cancel request for another instance forwarded to peers"
        );
        taken
    }

    /// Gives a new client its key. The registration ends when the returned handle is dropped.
    pub fn register(self: &Arc<Self>) -> Registration {
        let secret: [u8; 4] = rand::random();
        let slot = Arc::new(Slot { secret, target: Mutex::new(None) });
        let mut slots = self.slots.lock().expect("cancel lock");
        let pid = loop {
            // Positive pids only (some drivers print or compare them as PostgreSQL pids), the
            // instance in the top byte.
            let pid =
                (self.instance << 24) | (self.next_pid.fetch_add(1, Ordering::Relaxed).wrapping_add(1) & 0x00ff_ffff);
            if pid & 0x00ff_ffff != 0 && !slots.contains_key(&pid) {
                break pid;
            }
        };
        slots.insert(pid, Arc::clone(&slot));
        Registration { registry: Arc::clone(self), pid, slot }
    }

    /// Forwards a CancelRequest to the server running the owner's query, if the key is right.
    /// Returns whether a request was forwarded.
    pub async fn cancel(&self, key: &CancelKey, limit: Duration) -> bool {
        let target = {
            let slots = self.slots.lock().expect("cancel lock");
            let Some(slot) = slots.get(&key.pid) else {
                return false;
            };
            if !ct_eq(&slot.secret, &key.secret) {
                tracing::warn!(pid = key.pid, "cancel request with a wrong secret ignored");
                return false;
            }
            slot.target.lock().expect("cancel lock").clone()
        };
        let Some(target) = target else { return false };
        match send_cancel(&target.addr, &target.key, limit).await {
            Ok(()) => {
                tracing::info!(pid = key.pid, server = %target.addr, "cancel request forwarded");
                true
            }
            Err(e) => {
                tracing::warn!(pid = key.pid, server = %target.addr, error = %e, "cannot forward cancel request");
                false
            }
        }
    }
}

/// A client's entry in the registry; dropping it unregisters the key.
pub struct Registration {
    registry: Arc<CancelRegistry>,
    pid: i32,
    slot: Arc<Slot>,
}

impl Registration {
    #[must_use]
    pub fn key(&self) -> CancelKey {
        CancelKey { pid: self.pid, secret: self.slot.secret.to_vec() }
    }

    /// Records which server runs the client's queries now (`None` when it has none).
    pub fn set_target(&self, target: Option<Arc<CancelTarget>>) {
        *self.slot.target.lock().expect("cancel lock") = target;
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.slots.lock().expect("cancel lock").remove(&self.pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wrong_secret_or_unknown_pid_cancels_nothing() {
        let registry = Arc::new(CancelRegistry::default());
        let reg = registry.register();
        // a target that would fail loudly if contacted
        reg.set_target(Some(Arc::new(CancelTarget {
            addr: ServerAddr { host: "127.0.0.1".into(), port: 9 },
            key: CancelKey { pid: 1, secret: vec![0; 4] },
        })));
        let mut wrong = reg.key();
        wrong.secret[0] ^= 0xff;
        assert!(!registry.cancel(&wrong, Duration::from_millis(200)).await);
        let unknown = CancelKey { pid: reg.key().pid + 1, secret: reg.key().secret };
        assert!(!registry.cancel(&unknown, Duration::from_millis(200)).await);
    }

    #[test]
    fn keys_are_unique_and_unregistered_on_drop() {
        let registry = Arc::new(CancelRegistry::default());
        let a = registry.register();
        let b = registry.register();
        assert_ne!(a.key().pid, b.key().pid);
        let pid = a.key().pid;
        drop(a);
        assert!(!registry.slots.lock().unwrap().contains_key(&pid));
    }
}
