//! Waking every open connection at shutdown, for a few bytes each.
//!
//! A connection that waits for shutdown with `CancellationToken::cancelled()`
//! holds that future (72 bytes, an intrusive list node) for its whole life;
//! here it holds a [`Slot`] (16 bytes) and its waker sits in one shared slab.
//! The lock is taken when a connection starts and ends to wait, and once at
//! shutdown; never per message.

use std::num::NonZeroU32;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};

use slab::Slab;

/// The wakers of the connections waiting for shutdown.
#[derive(Debug, Default)]
pub struct ShutdownWakers {
    fired: AtomicBool,
    wakers: Mutex<Slab<Waker>>,
}

/// One waiter's place in [`ShutdownWakers`]. Give it back with
/// [`ShutdownWakers::remove`] when the connection ends.
#[derive(Debug, Default)]
pub struct Slot {
    /// The slab key plus one; 4 bytes, as nobody opens 4 billion
    /// connections.
    key: Option<NonZeroU32>,
    /// The registered waker's data pointer: a task polled with another
    /// waker registers again.
    waker: usize,
}

impl ShutdownWakers {
    /// Wakes every waiter, now and later.
    pub fn fire(&self) {
        self.fired.store(true, Ordering::Release);
        let wakers = std::mem::take(&mut *self.lock());
        for (_, waker) in wakers {
            waker.wake();
        }
    }

    /// Ready once [`fire`](ShutdownWakers::fire) was called; until then the
    /// task of `cx` is registered to be woken by it.
    pub fn poll(&self, slot: &mut Slot, cx: &mut Context<'_>) -> Poll<()> {
        if self.fired.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        let data = cx.waker().data() as usize;
        if slot.key.is_some() && slot.waker == data {
            return Poll::Pending;
        }
        let mut wakers = self.lock();
        // Checked again under the lock: `fire` sets the flag before it
        // takes the wakers, so a waiter registered after that would never
        // be woken.
        if self.fired.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        match slot
            .key
            .and_then(|key| wakers.get_mut(key.get() as usize - 1))
        {
            Some(waker) => waker.clone_from(cx.waker()),
            None => {
                let key = wakers.insert(cx.waker().clone());
                match u32::try_from(key + 1).ok().and_then(NonZeroU32::new) {
                    Some(k) => slot.key = Some(k),
                    // Past 4 billion: not woken at shutdown, which then
                    // ends this connection by its timeout.
                    None => drop(wakers.remove(key)),
                }
            }
        }
        slot.waker = data;
        Poll::Pending
    }

    /// Forgets a waiter.
    pub fn remove(&self, slot: &mut Slot) {
        if let Some(key) = slot.key.take() {
            // After `fire` the slab was emptied, and its keys mean nothing.
            if !self.fired.load(Ordering::Acquire) {
                self.lock().try_remove(key.get() as usize - 1);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slab<Waker>> {
        // A panic while holding the lock leaves the slab consistent.
        self.wakers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A [`Slot`] that leaves the list when dropped, for `async` code:
/// `poll_fn(|cx| waiter.poll(cx))` is a shutdown branch for `select!`.
#[derive(Debug)]
pub struct Waiter<'a> {
    list: &'a ShutdownWakers,
    slot: Slot,
}

impl ShutdownWakers {
    /// A waiter for shutdown, registered on its first poll.
    pub fn waiter(&self) -> Waiter<'_> {
        Waiter {
            list: self,
            slot: Slot::default(),
        }
    }
}

impl Waiter<'_> {
    /// Ready once shutdown began.
    pub fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.list.poll(&mut self.slot, cx)
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.list.remove(&mut self.slot);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    use super::*;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn waker() -> (Arc<Count>, Waker) {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        (count.clone(), Waker::from(count))
    }

    /// Whether `slot` polled with `waker` waits (is not ready).
    fn waits(list: &ShutdownWakers, slot: &mut Slot, waker: &Waker) -> bool {
        list.poll(slot, &mut Context::from_waker(waker))
            .is_pending()
    }

    #[test]
    fn fire_wakes_the_registered_and_readies_everyone() {
        let list = ShutdownWakers::default();
        let (a_count, a) = waker();
        let (b_count, b) = waker();
        let (mut sa, mut sb) = (Slot::default(), Slot::default());
        assert!(waits(&list, &mut sa, &a));
        // Polled again with the same waker: still one entry.
        assert!(waits(&list, &mut sa, &a));
        assert!(waits(&list, &mut sb, &b));
        assert_eq!(list.lock().len(), 2);
        list.remove(&mut sb);
        assert_eq!(list.lock().len(), 1);
        list.fire();
        assert_eq!(a_count.0.load(Ordering::SeqCst), 1);
        assert_eq!(b_count.0.load(Ordering::SeqCst), 0, "removed: not woken");
        assert!(!waits(&list, &mut sa, &a));
        let mut late = Slot::default();
        assert!(!waits(&list, &mut late, &b));
        list.remove(&mut sa);
    }

    #[test]
    fn a_dropped_waiter_leaves_the_list() {
        let list = ShutdownWakers::default();
        let (_, w) = waker();
        let mut waiter = list.waiter();
        assert!(waiter.poll(&mut Context::from_waker(&w)).is_pending());
        assert_eq!(list.lock().len(), 1);
        drop(waiter);
        assert_eq!(list.lock().len(), 0);
    }

    #[test]
    fn a_new_waker_replaces_the_old_one() {
        let list = ShutdownWakers::default();
        let (old_count, old) = waker();
        let (new_count, new) = waker();
        let mut slot = Slot::default();
        assert!(waits(&list, &mut slot, &old));
        assert!(waits(&list, &mut slot, &new));
        assert_eq!(list.lock().len(), 1);
        list.fire();
        assert_eq!(old_count.0.load(Ordering::SeqCst), 0);
        assert_eq!(new_count.0.load(Ordering::SeqCst), 1);
    }
}
