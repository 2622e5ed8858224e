//! One coarse timer per runtime instead of one per connection.
//!
//! Connection deadlines (keepalive ping, pong, idle, close handshake) are
//! seconds away and rarely need more than a tenth of a second of precision,
//! while a per-connection `tokio::time::Sleep` costs every connection about
//! 130 bytes and a timer-wheel update whenever its deadline moves. Here each
//! runtime has one queue of `(deadline, waker)` entries and one task that
//! ticks every [`TICK`] and wakes the connections whose deadline passed.
//!
//! A connection registers a deadline only when it needs a wake-up earlier
//! than the one it already has; keepalive deadlines move *later* with every
//! message, so a busy connection registers about once per ping interval. An
//! entry that fires early (its deadline moved) or for a finished connection
//! wakes a task that finds nothing due: harmless. The queue is a binary heap:
//! registrations are rare enough that a hashed wheel would not pay off.
//!
//! The ticker runs on the runtime and sleeps with tokio's clock, so tests on
//! a paused clock drive connection deadlines too.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::Waker;
use std::time::{Duration, Instant};

/// How often the per-runtime ticker wakes. Deadlines fire up to this late.
pub(crate) const TICK: Duration = Duration::from_millis(100);

/// One waiting deadline: 24 bytes, as every idle connection has one.
struct Entry {
    /// Nanoseconds after the timers' `base`.
    at: u64,
    waker: Waker,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.at.cmp(&other.at)
    }
}

/// The deadlines of one runtime's connections, and its coarse clock.
pub(crate) struct Timers {
    queue: Mutex<BinaryHeap<Reverse<Entry>>>,
    /// The clock connections read for every message: the time of the
    /// latest tick, as nanoseconds after `base`. Reading it is one atomic
    /// load, where the system clock can cost a system call (in some virtual
    /// machines) several times per message. Deadlines are judged against it
    /// too, so an entry that fired is always due by this clock.
    base: Instant,
    ticked: AtomicU64,
}

impl Default for Timers {
    fn default() -> Self {
        Timers {
            queue: Mutex::default(),
            base: crate::driver::now(),
            ticked: AtomicU64::new(0),
        }
    }
}

impl std::fmt::Debug for Timers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timers").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Timers {
    /// The time at the latest tick: at most [`TICK`] (and the ticker's own
    /// lateness) behind the runtime's clock, and never going back.
    pub(crate) fn now(&self) -> Instant {
        self.base + Duration::from_nanos(self.ticked.load(Ordering::Relaxed))
    }

    /// `t` as nanoseconds after `base` (0 for anything before it).
    pub(crate) fn nanos(&self, t: Instant) -> u64 {
        let nanos = t.saturating_duration_since(self.base).as_nanos();
        u64::try_from(nanos).unwrap_or(u64::MAX)
    }

    fn set_now(&self, now: Instant) {
        self.ticked.fetch_max(self.nanos(now), Ordering::Relaxed);
    }

    /// Wakes `waker` once `at` has passed (within one tick).
    pub(crate) fn register(&self, at: Instant, waker: Waker) {
        let at = self.nanos(at);
        lock(&self.queue).push(Reverse(Entry { at, waker }));
    }

    /// Wakes every entry due at `now`.
    fn fire(&self, now: Instant) {
        let now = self.nanos(now);
        let mut due = Vec::new();
        {
            let mut q = lock(&self.queue);
            while q.peek().is_some_and(|e| e.0.at <= now) {
                if let Some(Reverse(e)) = q.pop() {
                    due.push(e.waker);
                }
            }
        }
        // Woken outside the lock: a waker may run code of its own.
        for w in due {
            w.wake();
        }
    }
}

/// The timers of the runtime we are running on, created (with its ticker)
/// on first use; `None` outside a tokio runtime.
pub(crate) fn current() -> Option<Arc<Timers>> {
    static REGISTRY: OnceLock<Mutex<HashMap<tokio::runtime::Id, Weak<Timers>>>> = OnceLock::new();
    let handle = tokio::runtime::Handle::try_current().ok()?;
    let id = handle.id();
    let mut registry = lock(REGISTRY.get_or_init(Default::default));
    if let Some(t) = registry.get(&id).and_then(Weak::upgrade) {
        return Some(t);
    }
    // A runtime that was shut down dropped its ticker, hence its timers.
    registry.retain(|_, w| w.strong_count() > 0);
    let timers = Arc::new(Timers::default());
    registry.insert(id, Arc::downgrade(&timers));
    let ticking = timers.clone();
    handle.spawn(async move {
        let mut interval = tokio::time::interval(TICK);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            interval.tick().await;
            let now = crate::driver::now();
            // The clock first: whatever fires below is due by it.
            ticking.set_now(now);
            ticking.fire(now);
        }
    });
    Some(timers)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    use super::*;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn wakes_due_entries_only() {
        let timers = current().unwrap();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let now = crate::driver::now();
        timers.register(now + Duration::from_secs(1), Waker::from(count.clone()));
        timers.register(now + Duration::from_secs(5), Waker::from(count.clone()));
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
        // The same runtime shares one set of timers.
        assert!(Arc::ptr_eq(&timers, &current().unwrap()));
    }
}
