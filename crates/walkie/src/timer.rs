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
//! nothing due: harmless. The queue is a binary heap of 24-byte entries
//! (every idle connection has one): registrations are rare enough that a
//! hashed wheel would not pay off.
//!
//! An entry holds a waker, hence its task's memory. So that a closed
//! connection's task is not kept until its deadline (a ping interval), a
//! connection cancels its entry when dropped, and the entry it replaces
//! when it registers an earlier one. A heap cannot remove an entry in the
//! middle: cancelled entries are counted aside, skipped when they come due,
//! and swept out all at once when they reach an eighth of the heap. Dead
//! tasks held are then bounded by the live connections, and a live
//! connection costs no more than the heap's entry.
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

impl Entry {
    fn key(&self) -> Key {
        (self.at, self.waker.data() as usize)
    }
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

/// An entry's key: its nanoseconds and its waker's data pointer (the task).
/// Two entries may share one (two connections that one task polls, with
/// the same deadline): hence counts.
type Key = (u64, usize);

/// Cancelled entries below this many are never swept (only skipped when
/// due): sweeping a small heap often gains nothing.
const SWEEP_MIN: usize = 64;

#[derive(Default)]
struct Queue {
    heap: BinaryHeap<Reverse<Entry>>,
    /// Entries cancelled but still in `heap`, by key.
    cancelled: HashMap<Key, u32>,
    cancelled_total: usize,
}

impl Queue {
    /// Takes the cancelled entry `key` out of the count, if it is one.
    fn uncount(&mut self, key: Key) -> bool {
        let Some(count) = self.cancelled.get_mut(&key) else {
            return false;
        };
        *count -= 1;
        if *count == 0 {
            self.cancelled.remove(&key);
        }
        self.cancelled_total -= 1;
        true
    }

    /// Counts `key` as cancelled, and sweeps the heap when cancelled
    /// entries reach an eighth of it; returns the wakers swept out, to drop
    /// outside the lock.
    fn cancel(&mut self, key: Key) -> Vec<Reverse<Entry>> {
        *self.cancelled.entry(key).or_insert(0) += 1;
        self.cancelled_total += 1;
        if self.cancelled_total < SWEEP_MIN.max(self.heap.len() / 8) {
            return Vec::new();
        }
        let (kept, swept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.heap)
            .into_vec()
            .into_iter()
            .partition(|Reverse(e)| !self.uncount(e.key()));
        self.heap = BinaryHeap::from(kept);
        swept
    }
}

/// The deadlines of one runtime's connections, and its coarse clock.
pub(crate) struct Timers {
    queue: Mutex<Queue>,
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

    /// Wakes `waker` once `at` has passed (within one tick), and cancels
    /// the entry `replace` (nanoseconds a registration for the same waker
    /// returned; 0 for none). Returns the entry's nanoseconds, for
    /// [`Timers::cancel`].
    pub(crate) fn register(&self, at: Instant, waker: &Waker, replace: u64) -> u64 {
        let at = self.nanos(at);
        let task = waker.data() as usize;
        let swept = {
            let mut q = lock(&self.queue);
            q.heap.push(Reverse(Entry {
                at,
                waker: waker.clone(),
            }));
            self.cancel_locked(&mut q, replace, task)
        };
        // Outside the lock: the last waker of a task frees it.
        drop(swept);
        at
    }

    /// Cancels the entry that [`Timers::register`] made for `task` at `at`
    /// nanoseconds, unless it has fired (or is firing) already.
    pub(crate) fn cancel(&self, at: u64, task: usize) {
        let swept = self.cancel_locked(&mut lock(&self.queue), at, task);
        drop(swept);
    }

    /// Under the queue's lock, so that an entry is either still in the heap
    /// or fired: the ticker moves the clock past a deadline before it pops
    /// what is due, so an entry not yet due by the clock is in the heap.
    fn cancel_locked(&self, q: &mut Queue, at: u64, task: usize) -> Vec<Reverse<Entry>> {
        if at == 0 || task == 0 || at <= self.ticked.load(Ordering::Relaxed) {
            return Vec::new();
        }
        q.cancel((at, task))
    }

    /// Wakes every entry due at `now` (cancelled ones are dropped instead).
    fn fire(&self, now: Instant) {
        let now = self.nanos(now);
        let mut due = Vec::new();
        let mut dropped = Vec::new();
        {
            let mut q = lock(&self.queue);
            while q.heap.peek().is_some_and(|e| e.0.at <= now) {
                let Some(Reverse(e)) = q.heap.pop() else {
                    break;
                };
                if q.uncount(e.key()) {
                    dropped.push(e.waker);
                } else {
                    due.push(e.waker);
                }
            }
        }
        drop(dropped);
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

    /// A cancelled or replaced entry never fires, and lets go of its
    /// waker when it comes due or when the cancelled entries are swept;
    /// of two entries of one waker at one instant, one is cancelled; an
    /// entry that fired is not cancelled afterwards.
    #[tokio::test(start_paused = true)]
    async fn cancelled_and_replaced_entries_never_fire() {
        let timers = current().unwrap();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let task = waker.data() as usize;
        let now = crate::driver::now();
        let later = now + Duration::from_secs(5);

        let at = timers.register(later, &waker, 0);
        timers.cancel(at, task);
        let replaced = timers.register(later, &waker, 0);
        let earlier = timers.register(now + Duration::from_secs(1), &waker, replaced);
        // Two connections of one task, one deadline: two entries.
        let first = timers.register(later, &waker, 0);
        let second = timers.register(later, &waker, 0);
        assert_eq!(first, second);
        timers.cancel(first, task);
        assert_eq!(Arc::strong_count(&count), 2 + 5, "nothing swept yet");

        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "the earlier one");
        // Fired already: not cancelled, nor counted as such.
        timers.cancel(earlier, task);
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(count.0.load(Ordering::SeqCst), 2, "one of the two");
        assert_eq!(Arc::strong_count(&count), 2, "all let go");
    }

    /// Cancelled entries are swept out once they are an eighth of the heap
    /// (and at least `SWEEP_MIN`): their wakers are let go before they are
    /// due, the others stay and fire.
    #[tokio::test(start_paused = true)]
    async fn cancelled_entries_are_swept() {
        let timers = current().unwrap();
        let (a, b) = (
            Arc::new(Count(AtomicUsize::new(0))),
            Arc::new(Count(AtomicUsize::new(0))),
        );
        let (a_waker, b_waker) = (Waker::from(a.clone()), Waker::from(b.clone()));
        let at = crate::driver::now() + Duration::from_secs(20);
        for _ in 0..1000 {
            timers.register(at, &a_waker, 0);
        }
        let b_keys: Vec<u64> = (0..200).map(|_| timers.register(at, &b_waker, 0)).collect();
        // 1,200 entries: swept at the 150th cancelled.
        for key in &b_keys[..149] {
            timers.cancel(*key, b_waker.data() as usize);
        }
        assert_eq!(Arc::strong_count(&b), 2 + 200, "swept too early");
        timers.cancel(b_keys[149], b_waker.data() as usize);
        assert_eq!(Arc::strong_count(&b), 2 + 50, "not swept");
        assert_eq!(Arc::strong_count(&a), 2 + 1000);
        tokio::time::sleep(Duration::from_secs(21)).await;
        assert_eq!(a.0.load(Ordering::SeqCst), 1000);
        assert_eq!(b.0.load(Ordering::SeqCst), 50);
    }
}
