//! Periodic ticks from a kernel timer (`timerfd`) rather than tokio's timer wheel, for the
//! chores that run forever (health checks, pool upkeep).
//!
//! While tokio's wheel holds any timer, every time the runtime sleeps it reads the clock to
//! compute the next deadline, and its `epoll_wait` gets a timeout, which the kernel arms and
//! cancels as a timer of its own. With one client that is two sleeps per query: about 330
//! instructions per query in the runtime (docs/BENCHMARKS.md), and the kernel's timer on top
//! (not measured apart: below this machine's noise). A timerfd is
//! a socket-like descriptor the kernel makes readable at each period: the runtime waits for
//! it as for any socket, and its wheel stays empty while clients' requests are relayed.

use std::io;
use std::os::fd::OwnedFd;
use std::time::Duration;

use rustix::time::{
    Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec, timerfd_create, timerfd_settime,
};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::time::{Interval, MissedTickBehavior};

/// Ticks every `period`, the first at once. Ticks missed while the owner was busy come as
/// one, at once. Falls back to tokio's timer if the kernel's cannot be had (no descriptor
/// left, say), with a warning: the chores must go on.
pub struct Ticker {
    period: Duration,
    source: Source,
}

enum Source {
    Kernel(AsyncFd<OwnedFd>),
    Wheel(Interval),
}

impl Ticker {
    #[must_use]
    pub fn new(period: Duration) -> Self {
        let period = period.max(Duration::from_millis(1));
        let source = timer_fd(period).map_or_else(
            |e| {
                tracing::warn!(error = %e, "no kernel timer for a periodic chore; using tokio's");
                Source::Wheel(interval(period))
            },
            Source::Kernel,
        );
        Self { period, source }
    }

    /// Waits for the next tick.
    pub async fn tick(&mut self) {
        if let Source::Kernel(fd) = &self.source {
            match read_tick(fd).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "a periodic chore's kernel timer failed; using tokio's");
                    self.source = Source::Wheel(interval(self.period));
                }
            }
        }
        if let Source::Wheel(interval) = &mut self.source {
            interval.tick().await;
        }
    }
}

fn timer_fd(period: Duration) -> io::Result<AsyncFd<OwnedFd>> {
    let fd = timerfd_create(TimerfdClockId::Monotonic, TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC)?;
    let every = Timespec {
        tv_sec: i64::try_from(period.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(period.subsec_nanos()),
    };
    // a zero it_value would disarm the timer: the first tick is one nanosecond away
    let first = Timespec { tv_sec: 0, tv_nsec: 1 };
    timerfd_settime(&fd, TimerfdTimerFlags::empty(), &Itimerspec { it_interval: every, it_value: first })?;
    // Deprecated since tokio 1.54 for types whose descriptor could change or close under the
    // reactor; an `OwnedFd` owns its one descriptor until dropped, which is the condition the
    // `unsafe` replacement states. (This crate forbids `unsafe`.)
    #[allow(deprecated)]
    AsyncFd::with_interest(fd, Interest::READABLE)
}

async fn read_tick(fd: &AsyncFd<OwnedFd>) -> io::Result<()> {
    loop {
        let mut ready = fd.readable().await?;
        // the descriptor reads as the number of periods elapsed since the last read
        let mut expirations = [0u8; 8];
        if let Ok(result) = ready.try_io(|fd| Ok(rustix::io::read(fd.get_ref(), &mut expirations[..])?)) {
            return result.map(drop);
        }
        // woken without a tick to read: wait again
    }
}

fn interval(period: Duration) -> Interval {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    interval
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
