//! Periodic ticks from a kernel timer (`timerfd`) of their own, for the chores that run
//! forever (health checks, pool upkeep).
//!
//! A timerfd is a socket-like descriptor the kernel makes readable at each period; the
//! runtime waits for it as for any socket. A chore could instead sleep on [`crate::timer`]
//! each period; a repeating kernel timer of its own costs no lock and no re-arming per tick,
//! and these chores last as long as the process.

use std::os::fd::OwnedFd;
use std::time::Duration;

use tokio::io::unix::AsyncFd;

use crate::timer;

/// Ticks every `period`, the first at once. Ticks missed while the owner was busy come as
/// one, at once. Falls back to a [`timer::sleep`] per period if a kernel timer of its own
/// cannot be had (no descriptor left, say), with a warning: the chores must go on.
pub struct Ticker {
    period: Duration,
    source: Source,
}

enum Source {
    Kernel(AsyncFd<OwnedFd>),
    Sleeps { first: bool },
}

impl Ticker {
    #[must_use]
    pub fn new(period: Duration) -> Self {
        let period = period.max(Duration::from_millis(1));
        // the first tick one nanosecond away (`set_timer`'s least), then every period
        let source = timer::timer_fd().and_then(|fd| timer::set_timer(&fd, Duration::ZERO, period).map(|()| fd));
        let source = source.map_or_else(
            |e| {
                tracing::warn!(error = %e, "no kernel timer of its own for a periodic chore; sleeping instead");
                Source::Sleeps { first: true }
            },
            Source::Kernel,
        );
        Self { period, source }
    }

    /// Waits for the next tick.
    pub async fn tick(&mut self) {
        if let Source::Kernel(fd) = &self.source {
            match timer::expired(fd).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "a periodic chore's kernel timer failed; sleeping instead");
                    self.source = Source::Sleeps { first: false };
                }
            }
        }
        if let Source::Sleeps { first } = &mut self.source {
            if !std::mem::take(first) {
                timer::sleep(self.period).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// Guards against a hang; no test here bounds how fast a tick comes.
    const HANG: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn the_first_tick_comes_at_once_and_the_next_waits_a_period() {
        let mut ticker = Ticker::new(Duration::from_secs(3600));
        assert!(matches!(ticker.source, Source::Kernel(_)));
        tokio::time::timeout(HANG, ticker.tick()).await.expect("the first tick is not an hour away");
        let next = tokio::time::timeout(Duration::from_millis(50), ticker.tick()).await;
        assert!(next.is_err(), "the second tick waits for the period");
    }

    #[tokio::test]
    async fn ticks_keep_the_period_and_missed_ones_come_as_one() {
        let period = Duration::from_millis(20);
        let mut ticker = Ticker::new(period);
        let started = Instant::now();
        for _ in 0..4 {
            tokio::time::timeout(HANG, ticker.tick()).await.unwrap();
        }
        assert!(started.elapsed() >= period * 3 - Duration::from_millis(2), "{:?}", started.elapsed());
        std::thread::sleep(period * 5);
        tokio::time::timeout(HANG, ticker.tick()).await.unwrap();
        let caught_up = Instant::now();
        for _ in 0..2 {
            tokio::time::timeout(HANG, ticker.tick()).await.unwrap();
        }
        // the next boundary, then a whole period; five missed ticks given one by one would
        // have made both immediate
        assert!(caught_up.elapsed() >= period - Duration::from_millis(2), "{:?}", caught_up.elapsed());
    }
}
