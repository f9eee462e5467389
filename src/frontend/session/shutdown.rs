//! A session's wait for the app's drain between requests.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::app::App;

/// A session's wait for the app's drain, made once: a wait made per request would join and
/// leave the token's list of waiters each time, and even polling the token's future takes
/// two locks, after every request. Once the future holds this task's waker, a poll reads
/// only the app's draining flag (set before the token fires, whose firing wakes the task).
pub(super) struct ShutdownWait {
    token: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The waker the token's future last took.
    registered: Option<Waker>,
}

impl ShutdownWait {
    pub(super) fn new(shutdown: &CancellationToken) -> Self {
        Self { token: Box::pin(shutdown.clone().cancelled_owned()), registered: None }
    }

    pub(super) fn poll(&mut self, cx: &mut Context<'_>, app: &App) -> Poll<()> {
        if !app.draining() && self.registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return Poll::Pending;
        }
        let poll = self.token.as_mut().poll(cx);
        if poll.is_pending() {
            self.registered = Some(cx.waker().clone());
        }
        poll
    }
}
