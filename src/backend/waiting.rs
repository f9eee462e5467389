//! A client's side of waiting for a pool's connection: its place in a pool's queue
//! ([`Waiter`]), what it is handed when its turn comes ([`Grant`]), leaving the queue early
//! ([`Queued`]), and what its waits reuse ([`Waiting`]). The queue itself, and handing out
//! the turns, are the pool's (`pool.rs`).

use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use super::conn::ServerConn;
use super::pool::Pool;
use crate::timer::Sleep;

/// What a waiting client is handed when its turn comes.
pub(super) enum Grant {
    /// A slot, with the connection that was just returned on it.
    Conn(Box<ServerConn>),
    /// A slot alone: its connection was closed, or a reload grew the pool.
    Slot,
}

/// A client's place in a pool's queue, reused from wait to wait.
#[derive(Default)]
pub struct Waiter(Mutex<Turn>);

#[derive(Default)]
pub(super) struct Turn {
    /// In a pool's queue; set and cleared under that pool's lock.
    pub(super) queued: bool,
    pub(super) grant: Option<Grant>,
    waker: Option<Waker>,
}

impl Waiter {
    pub(super) fn lock(&self) -> MutexGuard<'_, Turn> {
        self.0.lock().expect("waiter lock")
    }

    /// Hands the waiter its turn (the caller holds the pool's lock and has taken it off the
    /// queue); the waker to call once that lock is let go.
    pub(super) fn grant(&self, grant: Grant) -> Option<Waker> {
        let mut turn = self.lock();
        turn.queued = false;
        turn.grant = Some(grant);
        turn.waker.take()
    }

    /// Ready with the grant when the turn has come.
    pub(super) fn poll_turn(&self, cx: &mut Context<'_>) -> Poll<Grant> {
        let mut turn = self.lock();
        if let Some(grant) = turn.grant.take() {
            return Poll::Ready(grant);
        }
        if !turn.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            turn.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// A place in a pool's queue: leaves it when dropped before the turn came, passing on a
/// grant that came meanwhile (the wait timed out, or the waiting future was dropped).
pub(super) struct Queued<'a> {
    pub(super) pool: &'a Pool,
    pub(super) waiter: Option<&'a Waiter>,
}

impl Queued<'_> {
    /// The turn came: nothing to leave.
    pub(super) fn served(mut self) {
        self.waiter = None;
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        let Some(waiter) = self.waiter else {
            return;
        };
        let grant = {
            let mut slots = self.pool.lock();
            let mut turn = waiter.lock();
            if turn.queued {
                turn.queued = false;
                slots.waiters.retain(|w| !std::ptr::eq(Arc::as_ptr(w), waiter));
            }
            turn.grant.take()
        };
        match grant {
            Some(Grant::Conn(conn)) => self.pool.restore(Some(conn)),
            Some(Grant::Slot) => self.pool.restore(None),
            None => {}
        }
    }
}

/// What a client's waits for a connection reuse: its place in a pool's queue (made at its
/// first wait) and its timer. Arming a timer for each wait and removing it when the wait
/// ends early (the usual end) cost more than the rest of a checkout; this one stays armed
/// from wait to wait and is moved only when it would fire too late. So most waits arm
/// nothing: one that finds the timer set by an earlier wait, to fire early, looks at the
/// clock when it fires and sets it again.
#[derive(Default)]
pub struct Waiting {
    pub(super) waiter: Option<Arc<Waiter>>,
    pub(super) timer: Option<Sleep>,
}

/// The timer, set to fire at `deadline` or earlier.
pub(super) fn timer_by(timer: &mut Option<Sleep>, deadline: Instant) -> &mut Sleep {
    let sleep = timer.get_or_insert_with(|| Sleep::until(deadline));
    if sleep.deadline() > deadline || sleep.is_elapsed() {
        sleep.reset(deadline);
    }
    sleep
}
