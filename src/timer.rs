//! Timers on the reactor, without tokio's time driver.
//!
//! tokio's time driver runs on every park of the runtime, timers or not: it takes its lock,
//! polls its wheel and reads the clock, about 850 instructions per query with one client
//! (docs/BENCHMARKS.md), and pgrouter's timers are few and rarely due (login, connect, a pool
//! wait, statement bounds). So the runtime is built without it, and each runtime gets one
//! [`Service`] instead: the pending deadlines in order and one kernel timer (`timerfd`) set
//! to the earliest, which the reactor waits for like a socket. A park costs nothing for it;
//! setting a timer takes a lock, and a system call only when the timer is the new earliest.
//!
//! [`sleep`], [`timeout`] and [`Sleep`] stand in for tokio's; they work on
//! any runtime with I/O enabled, the tests' included.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;
use rustix::time::{
    Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec, timerfd_create, timerfd_settime,
};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::runtime::{Handle, Id};

/// A kernel timer the reactor can wait for: readable once it expires.
pub(crate) fn timer_fd() -> io::Result<AsyncFd<OwnedFd>> {
    let fd = timerfd_create(TimerfdClockId::Monotonic, TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC)?;
    // Deprecated since tokio 1.54 for types whose descriptor could change or close under the
    // reactor; an `OwnedFd` owns its one descriptor until dropped, which is the condition the
    // `unsafe` replacement states. (This crate forbids `unsafe`.)
    #[allow(deprecated)]
    AsyncFd::with_interest(fd, Interest::READABLE)
}

/// Sets `fd` to expire after `after` (at least a nanosecond: zero would disarm it) and then
/// every `every` (zero: once).
pub(crate) fn set_timer(fd: &AsyncFd<OwnedFd>, after: Duration, every: Duration) -> io::Result<()> {
    let spec = |d: Duration| Timespec {
        tv_sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(d.subsec_nanos()),
    };
    let value = Itimerspec { it_interval: spec(every), it_value: spec(after.max(Duration::from_nanos(1))) };
    timerfd_settime(fd.get_ref(), TimerfdTimerFlags::empty(), &value)?;
    Ok(())
}

/// Waits until `fd` expired (at least once since the last wait).
pub(crate) async fn expired(fd: &AsyncFd<OwnedFd>) -> io::Result<()> {
    loop {
        let mut ready = fd.readable().await?;
        // the descriptor reads as the number of expirations since the last read
        let mut expirations = [0u8; 8];
        if let Ok(result) = ready.try_io(|fd| Ok(rustix::io::read(fd.get_ref(), &mut expirations[..])?)) {
            return result.map(drop);
        }
        // woken without an expiration to read: wait again
    }
}

/// One pending timer's shared part: the service marks it fired and wakes its task.
#[derive(Default)]
struct Entry {
    fired: AtomicBool,
    waker: AtomicWaker,
}

/// A runtime's timers: the pending deadlines and the kernel timer set to the earliest.
struct Service {
    fd: AsyncFd<OwnedFd>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Pending timers by deadline; the number breaks ties.
    pending: BTreeMap<(Instant, u64), Arc<Entry>>,
    next: u64,
    /// The deadline the kernel timer is set to.
    armed: Option<Instant>,
}

/// The services by runtime (a process has one runtime, the tests many).
static SERVICES: Mutex<Vec<(Id, Weak<Service>)>> = Mutex::new(Vec::new());

thread_local! {
    /// The service this thread found last: most timers are set without the lock of the list
    /// all threads share (an idle timeout sets one per request).
    static LAST: RefCell<Option<(Id, Weak<Service>)>> = const { RefCell::new(None) };
}

impl Service {
    /// The current runtime's service, started at its first timer.
    fn current() -> io::Result<Arc<Service>> {
        let handle = Handle::try_current().map_err(io::Error::other)?;
        let id = handle.id();
        let last = LAST.with_borrow(|last| last.as_ref().filter(|(i, _)| *i == id).and_then(|(_, s)| s.upgrade()));
        if let Some(service) = last {
            return Ok(service);
        }
        let service = Self::shared(&handle)?;
        LAST.set(Some((id, Arc::downgrade(&service))));
        Ok(service)
    }

    /// The runtime's service from the shared list, started if it has none yet.
    fn shared(handle: &Handle) -> io::Result<Arc<Service>> {
        let id = handle.id();
        let mut services = SERVICES.lock().expect("timer services lock");
        if let Some(service) = services.iter().find(|(i, _)| *i == id).and_then(|(_, s)| s.upgrade()) {
            return Ok(service);
        }
        let service = Arc::new(Service { fd: timer_fd()?, state: Mutex::new(State::default()) });
        // the runtime's own task owns it; sleeps find it through the weak reference
        services.retain(|(_, s)| s.strong_count() > 0);
        services.push((id, Arc::downgrade(&service)));
        handle.spawn(Arc::clone(&service).run());
        Ok(service)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("timer lock")
    }

    /// Fires the timers that are due whenever the kernel timer expires.
    async fn run(self: Arc<Self>) {
        loop {
            if let Err(e) = expired(&self.fd).await {
                tracing::error!(error = %e, "the kernel timer failed; timers no longer fire");
                return;
            }
            let now = Instant::now();
            let mut due = Vec::new();
            {
                let mut state = self.lock();
                while let Some(entry) = state.pending.first_entry() {
                    if entry.key().0 > now {
                        break;
                    }
                    due.push(entry.remove());
                }
                state.armed = None;
                self.arm(&mut state, now);
            }
            for entry in due {
                entry.fired.store(true, Ordering::Release);
                entry.waker.wake();
            }
        }
    }

    /// Sets the kernel timer to the earliest pending deadline if it is not set to it.
    fn arm(&self, state: &mut State, now: Instant) {
        let Some(&(earliest, _)) = state.pending.keys().next() else {
            return; // nothing pending: an expiry still set just finds nothing due
        };
        if state.armed == Some(earliest) {
            return;
        }
        match set_timer(&self.fd, earliest.saturating_duration_since(now), Duration::ZERO) {
            Ok(()) => state.armed = Some(earliest),
            Err(e) => tracing::error!(error = %e, "cannot set the kernel timer; timers may fire late"),
        }
    }

    fn add(&self, deadline: Instant, entry: &Arc<Entry>) -> u64 {
        let mut state = self.lock();
        let id = state.next;
        state.next += 1;
        state.pending.insert((deadline, id), Arc::clone(entry));
        if state.armed.is_none_or(|armed| deadline < armed) {
            self.arm(&mut state, Instant::now());
        }
        id
    }

    fn remove(&self, key: (Instant, u64)) {
        // the kernel timer stays set: if it expires first, it finds nothing due
        self.lock().pending.remove(&key);
    }
}

/// A timer, set at its first poll (a timeout whose work ends at once sets nothing).
pub struct Sleep {
    deadline: Instant,
    set: Option<Set>,
    /// It was polled at or after its deadline.
    elapsed: bool,
}

struct Set {
    service: Arc<Service>,
    key: (Instant, u64),
    entry: Arc<Entry>,
}

impl Sleep {
    #[must_use]
    pub fn until(deadline: Instant) -> Self {
        Self { deadline, set: None, elapsed: false }
    }

    #[must_use]
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// It fired, or was polled at or after its deadline (a timer not polled yet has not).
    #[must_use]
    pub fn is_elapsed(&self) -> bool {
        self.elapsed || self.set.as_ref().is_some_and(|set| set.entry.fired.load(Ordering::Acquire))
    }

    /// Sets it again, to fire at `deadline`.
    pub fn reset(&mut self, deadline: Instant) {
        self.cancel();
        self.deadline = deadline;
        self.elapsed = false;
    }

    fn cancel(&mut self) {
        if let Some(set) = self.set.take()
            && !set.entry.fired.load(Ordering::Acquire)
        {
            set.service.remove(set.key);
        }
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        self.cancel();
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.elapsed {
            return Poll::Ready(());
        }
        let set = match &this.set {
            Some(set) => set,
            None => {
                if this.deadline <= Instant::now() {
                    this.elapsed = true;
                    return Poll::Ready(());
                }
                let service = match Service::current() {
                    Ok(service) => service,
                    Err(e) => {
                        // no descriptor left, say: the wait ends now rather than never
                        tracing::error!(error = %e, "cannot set a timer; the wait it bounds ends now");
                        this.elapsed = true;
                        return Poll::Ready(());
                    }
                };
                let entry = Arc::new(Entry::default());
                entry.waker.register(cx.waker());
                let id = service.add(this.deadline, &entry);
                this.set.insert(Set { service, key: (this.deadline, id), entry })
            }
        };
        set.entry.waker.register(cx.waker());
        if set.entry.fired.load(Ordering::Acquire) {
            this.elapsed = true;
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

/// Waits `duration`.
#[must_use]
pub fn sleep(duration: Duration) -> Sleep {
    Sleep::until(Instant::now() + duration)
}

/// `work` did not finish within its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

/// Runs `work` for at most `limit`.
pub async fn timeout<F: Future>(limit: Duration, work: F) -> Result<F::Output, Elapsed> {
    let sleep = sleep(limit);
    tokio::select! {
        biased;
        out = work => Ok(out),
        () = sleep => Err(Elapsed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HANG: Duration = Duration::from_secs(30);

    async fn within<F: Future>(work: F) -> F::Output {
        tokio::time::timeout(HANG, work).await.expect("hung")
    }

    /// The runtime is built without tokio's time driver (`cli::runtime`), so a tokio timer in
    /// pgrouter's own code would panic where it is reached. Tests may use them: their
    /// runtimes have the driver.
    #[test]
    fn no_tokio_timer_outside_tests() {
        fn walk(dir: &std::path::Path, found: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, found);
                } else if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("tests.rs") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    let code = text.split("#[cfg(test)]").next().unwrap_or_default();
                    if code.contains("tokio::time") {
                        found.push(path.display().to_string());
                    }
                }
            }
        }
        let mut found = Vec::new();
        walk(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut found);
        assert!(found.is_empty(), "tokio's timers outside tests (use crate::timer): {found:?}");
    }

    #[tokio::test]
    async fn timers_fire_in_deadline_order_and_not_early() {
        let start = Instant::now();
        let (mut a, mut b) = (Box::pin(sleep(Duration::from_millis(60))), Box::pin(sleep(Duration::from_millis(20))));
        within(&mut b).await;
        assert!(start.elapsed() >= Duration::from_millis(20));
        assert!(!a.is_elapsed() && b.is_elapsed());
        within(&mut a).await;
        assert!(start.elapsed() >= Duration::from_millis(60));
        // a deadline already past: ready at once, nothing set
        let mut past = Sleep::until(start);
        assert!(futures_util::poll!(&mut past).is_ready());
        assert!(past.is_elapsed(), "a timer polled past its deadline is elapsed, as the pool's reuse needs");
    }

    /// The default runtime (`workers = 0`) has a worker per core: timers set from tasks on
    /// any of them fire, each at its own deadline.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn timers_fire_on_a_multi_thread_runtime() {
        let start = Instant::now();
        let tasks: Vec<_> = (1..=20u64)
            .map(|i| {
                tokio::spawn(async move {
                    sleep(Duration::from_millis(5 * i)).await;
                    Instant::now()
                })
            })
            .collect();
        for (i, task) in (1..=20u64).zip(tasks) {
            let fired = within(task).await.unwrap();
            assert!(fired.duration_since(start) >= Duration::from_millis(5 * i), "timer {i} fired early");
        }
    }

    /// Two runtimes driven in turn on one thread: each timer goes to its own runtime's
    /// service (one set with the other's would only fire while that one runs: it would hang).
    #[test]
    fn runtimes_taking_turns_on_a_thread_fire_their_own_timers() {
        let build = || tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (a, b) = (build(), build());
        for runtime in [&a, &b, &a, &b] {
            runtime.block_on(within(sleep(Duration::from_millis(5))));
        }
    }

    #[tokio::test]
    async fn timeout_ends_the_work_or_lets_it_finish() {
        assert_eq!(within(timeout(Duration::from_millis(10), std::future::pending::<()>())).await, Err(Elapsed));
        assert_eq!(within(timeout(HANG, async { 7 })).await, Ok(7));
    }

    #[tokio::test]
    async fn a_reset_or_dropped_timer_does_not_fire() {
        let start = Instant::now();
        let dropped = Box::pin(sleep(Duration::from_millis(10)));
        let mut moved = Box::pin(sleep(Duration::from_millis(10)));
        {
            let mut dropped = dropped;
            assert!(futures_util::poll!(dropped.as_mut()).is_pending());
        }
        assert!(futures_util::poll!(moved.as_mut()).is_pending());
        moved.as_mut().get_mut().reset(start + Duration::from_millis(80));
        within(&mut moved).await;
        assert!(start.elapsed() >= Duration::from_millis(80), "fired at the new deadline, not the old");
        // earlier than the one the kernel timer is set to: the kernel timer moves
        let mut late = Box::pin(sleep(Duration::from_secs(3600)));
        assert!(futures_util::poll!(late.as_mut()).is_pending());
        let t = Instant::now();
        within(sleep(Duration::from_millis(20))).await;
        assert!(t.elapsed() < Duration::from_secs(3600) && !late.is_elapsed());
    }
}
