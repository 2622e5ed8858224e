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
//! entry that fires early (its deadline moved) wakes a task that finds
//! nothing due: harmless. A connection remembers its entry's key, replaces
//! the entry when it registers an earlier deadline for the same task, and
//! cancels it when dropped: an entry holds a waker, hence the task's
//! memory, which a closed connection's task would otherwise keep until the
//! deadline (a ping interval). The queue is an ordered map: registrations
//! are rare enough that a hashed wheel would not pay off.
//!
//! The ticker runs on the runtime and sleeps with tokio's clock, so tests on
//! a paused clock drive connection deadlines too.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::Waker;
use std::time::{Duration, Instant};

/// How often the per-runtime ticker wakes. Deadlines fire up to this late.
pub(crate) const TICK: Duration = Duration::from_millis(100);

/// A waiting deadline's key: nanoseconds after the timers' `base`, and the
/// data pointer of the waker it wakes. Keys are unique (see
/// [`Timers::register`]), so that a connection cancels its own entry only.
type Key = (u64, usize);

/// The deadlines of one runtime's connections, and its coarse clock.
pub(crate) struct Timers {
    /// One entry (32 bytes and the map's share) for every idle connection.
    queue: Mutex<BTreeMap<Key, Waker>>,
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

    /// `nanos` after `base`, as an instant.
    pub(crate) fn instant(&self, nanos: u64) -> Instant {
        self.base + Duration::from_nanos(nanos)
    }

    /// `t` as nanoseconds after `base` (0 for anything before it).
    pub(crate) fn nanos(&self, t: Instant) -> u64 {
        let nanos = t.saturating_duration_since(self.base).as_nanos();
        u64::try_from(nanos).unwrap_or(u64::MAX)
    }

    fn set_now(&self, now: Instant) {
        self.ticked.fetch_max(self.nanos(now), Ordering::Relaxed);
    }

    /// Wakes `waker` once `at` has passed (within one tick), and removes
    /// the entry `replace` (nanoseconds a registration for the same waker
    /// returned; 0 for none). Returns the entry's nanoseconds, for
    /// [`Timers::cancel`]: at most `at`'s, a few nanoseconds earlier if
    /// another registration for the same waker (two connections that one
    /// task polls) has that instant.
    pub(crate) fn register(&self, at: Instant, waker: &Waker, replace: u64) -> u64 {
        let task = waker.data() as usize;
        let mut at = self.nanos(at);
        let replaced = {
            let mut q = lock(&self.queue);
            let replaced = if replace == 0 {
                None
            } else {
                q.remove(&(replace, task))
            };
            while at > 1 && q.contains_key(&(at, task)) {
                at -= 1;
            }
            q.insert((at, task), waker.clone());
            replaced
        };
        // Outside the lock: the last waker of a task frees it.
        drop(replaced);
        at
    }

    /// Removes the entry that [`Timers::register`] made for `task` at `at`
    /// nanoseconds, if it has not fired.
    pub(crate) fn cancel(&self, at: u64, task: usize) {
        let removed = lock(&self.queue).remove(&(at, task));
        drop(removed);
    }

    /// Wakes every entry due at `now`.
    fn fire(&self, now: Instant) {
        let now = self.nanos(now);
        let mut due = Vec::new();
        {
            let mut q = lock(&self.queue);
            while let Some(entry) = q.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                due.push(entry.remove());
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
        let waker = Waker::from(count.clone());
        timers.register(now + Duration::from_secs(1), &waker, 0);
        timers.register(now + Duration::from_secs(5), &waker, 0);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
        // The same runtime shares one set of timers.
        assert!(Arc::ptr_eq(&timers, &current().unwrap()));
    }

    /// A cancelled or replaced entry lets go of its waker at once, and
    /// never fires; two entries of one waker at one instant are cancelled
    /// one at a time.
    #[tokio::test(start_paused = true)]
    async fn cancelled_and_replaced_entries_let_go_of_their_waker() {
        let timers = current().unwrap();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let task = waker.data() as usize;
        let now = crate::driver::now();
        let later = now + Duration::from_secs(5);

        let at = timers.register(later, &waker, 0);
        assert_eq!(Arc::strong_count(&count), 3);
        timers.cancel(at, task);
        assert_eq!(Arc::strong_count(&count), 2);

        let at = timers.register(later, &waker, 0);
        let earlier = timers.register(now + Duration::from_secs(1), &waker, at);
        assert_eq!(Arc::strong_count(&count), 3, "replaced");

        // Two connections of one task, one deadline: two entries.
        let first = timers.register(later, &waker, 0);
        let second = timers.register(later, &waker, 0);
        assert_ne!(first, second);
        timers.cancel(first, task);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(count.0.load(Ordering::SeqCst), 2, "the second still fires");
        assert_eq!(Arc::strong_count(&count), 2);
        timers.cancel(earlier, task);
    }
}
