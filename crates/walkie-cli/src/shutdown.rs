//! Waking every open connection at shutdown, for a few bytes each; and the
//! peer's address of the connections that keep it here rather than in
//! their task (see [`TaskSlot`]).
//!
//! A connection that waits for shutdown with `CancellationToken::cancelled()`
//! holds that future (72 bytes, an intrusive list node) for its whole life;
//! here it holds a [`Slot`] (16 bytes; a [`TaskSlot`], 4, where the future
//! is a task's own) and its waker sits in one shared slab.
//! The lock is taken when a connection starts to wait (twice for a
//! [`TaskSlot`]: entered, then its waker), when it ends, for a log line that
//! names a [`TaskSlot`]'s peer, and once at shutdown; never per message.

use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};

use slab::Slab;

/// The wakers of the connections waiting for shutdown.
#[derive(Debug, Default)]
pub struct ShutdownWakers {
    fired: AtomicBool,
    wakers: Mutex<Slab<Entry>>,
}

/// One waiter: its waker, and its peer if it keeps it here.
#[derive(Debug)]
struct Entry {
    waker: Waker,
    peer: Option<Peer>,
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

/// A [`Slot`] for a future that is a task's own, spawned as it is made:
/// tokio polls it with that task's waker, always the same, so it registers
/// that waker once and never compares wakers. It also keeps the peer's
/// address in the list, for the log lines, where the task would hold 24
/// bytes more. 4 bytes where a `Slot` takes 16 (and the address 24): what
/// every idle echo or chat connection pays for. Made by
/// [`ShutdownWakers::enter`]; give it back with
/// [`ShutdownWakers::remove_task`].
#[derive(Debug, Default)]
pub struct TaskSlot {
    /// The slab key plus one, 0 for none, below [`TASK_WAKER`]; that bit
    /// once the task's own waker replaced the placeholder.
    key: u32,
}

/// [`TaskSlot::key`]'s bit for "the task's waker is registered".
const TASK_WAKER: u32 = 1 << 31;

impl TaskSlot {
    fn index(&self) -> Option<usize> {
        let key = self.key & !TASK_WAKER;
        (key != 0).then(|| key as usize - 1)
    }
}

impl ShutdownWakers {
    /// A list with room for `n` waiters, reserved but not touched: the
    /// pages fill as connections come, and the list never grows by copying
    /// (a growing slab leaves its old, smaller copies to the allocator, as
    /// memory the process still holds).
    pub fn with_capacity(n: usize) -> Self {
        ShutdownWakers {
            fired: AtomicBool::new(false),
            wakers: Mutex::new(Slab::with_capacity(n)),
        }
    }

    /// A place in the list for a connection from `peer`, whose task's
    /// waker comes with its first [`poll_task`](ShutdownWakers::poll_task).
    pub fn enter(&self, peer: SocketAddr) -> TaskSlot {
        let mut wakers = self.lock();
        let entry = Entry {
            waker: Waker::noop().clone(),
            peer: Some(Peer::from(peer)),
        };
        match Self::insert(&mut wakers, entry) {
            Some(key) if key.get() < TASK_WAKER => TaskSlot { key: key.get() },
            Some(key) => {
                wakers.remove(key.get() as usize - 1);
                TaskSlot::default()
            }
            None => TaskSlot::default(),
        }
    }

    /// Ready once [`fire`](ShutdownWakers::fire) was called; until then the
    /// task is registered to be woken by it, on its first poll. For a
    /// future that only its own task polls (see [`TaskSlot`]).
    pub fn poll_task(&self, slot: &mut TaskSlot, cx: &mut Context<'_>) -> Poll<()> {
        if self.fired.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        if slot.key & TASK_WAKER == 0 {
            let mut wakers = self.lock();
            // See `poll`: the flag again, under the lock.
            if self.fired.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            match slot.index().and_then(|i| wakers.get_mut(i)) {
                Some(e) => e.waker.clone_from(cx.waker()),
                // No place (past 2 billion): not woken at shutdown, which
                // then ends this connection by its timeout.
                None => return Poll::Pending,
            }
            slot.key |= TASK_WAKER;
        }
        Poll::Pending
    }

    /// The peer a [`TaskSlot`] was entered with, if the list has it.
    pub fn peer(&self, slot: &TaskSlot) -> Option<SocketAddr> {
        let i = slot.index()?;
        self.lock().get(i)?.peer.map(SocketAddr::from)
    }

    /// Forgets a [`TaskSlot`]'s waiter; returns its peer.
    pub fn remove_task(&self, slot: &mut TaskSlot) -> Option<SocketAddr> {
        let i = slot.index()?;
        slot.key = 0;
        self.lock().try_remove(i)?.peer.map(SocketAddr::from)
    }

    /// Adds an entry; `None` past 4 billion keys, when it is not kept: its
    /// connection is then not woken at shutdown, and ends by its timeout.
    fn insert(wakers: &mut Slab<Entry>, entry: Entry) -> Option<NonZeroU32> {
        let key = wakers.insert(entry);
        let k = u32::try_from(key + 1).ok().and_then(NonZeroU32::new);
        if k.is_none() {
            drop(wakers.remove(key));
        }
        k
    }

    fn forget(&self, key: Option<NonZeroU32>) {
        if let Some(key) = key {
            self.lock().try_remove(key.get() as usize - 1);
        }
    }

    /// Wakes every waiter, now and later. The entries stay until their
    /// connections end, with their peers for the log lines.
    pub fn fire(&self) {
        self.fired.store(true, Ordering::Release);
        let wakers: Vec<Waker> = self.lock().iter().map(|(_, e)| e.waker.clone()).collect();
        // Woken outside the lock: a waker may run code of its own.
        for waker in wakers {
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
            Some(e) => e.waker.clone_from(cx.waker()),
            None => {
                let entry = Entry {
                    waker: cx.waker().clone(),
                    peer: None,
                };
                slot.key = Self::insert(&mut wakers, entry);
            }
        }
        slot.waker = data;
        Poll::Pending
    }

    /// Forgets a waiter.
    pub fn remove(&self, slot: &mut Slot) {
        self.forget(slot.key.take());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slab<Entry>> {
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

/// A peer's address, for the log lines: 23 bytes with no alignment, where a
/// `SocketAddr` takes 32 (with an IPv6 flow label, which no log shows).
#[derive(Debug, Clone, Copy)]
struct Peer {
    ip: [u8; 16],
    port: [u8; 2],
    /// An IPv6 scope id (`fe80::1%2`).
    scope: [u8; 4],
    v6: bool,
}

impl From<SocketAddr> for Peer {
    fn from(addr: SocketAddr) -> Self {
        let (ip, scope, v6) = match addr {
            SocketAddr::V4(a) => (a.ip().to_ipv6_mapped().octets(), 0, false),
            SocketAddr::V6(a) => (a.ip().octets(), a.scope_id(), true),
        };
        Peer {
            ip,
            port: addr.port().to_ne_bytes(),
            scope: scope.to_ne_bytes(),
            v6,
        }
    }
}

impl From<Peer> for SocketAddr {
    fn from(peer: Peer) -> Self {
        let v6 = Ipv6Addr::from(peer.ip);
        let port = u16::from_ne_bytes(peer.port);
        match v6.to_ipv4_mapped() {
            Some(v4) if !peer.v6 => SocketAddr::new(IpAddr::V4(v4), port),
            _ => SocketAddrV6::new(v6, port, 0, u32::from_ne_bytes(peer.scope)).into(),
        }
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

    #[test]
    fn a_task_slot_registers_once_and_keeps_its_peer_past_shutdown() {
        let list = ShutdownWakers::default();
        let (count, w) = waker();
        let (other_count, other) = waker();
        let peer: SocketAddr = "[fe80::1%2]:5000".parse().unwrap();
        let mut slot = list.enter(peer);
        let mut cx = Context::from_waker(&w);
        assert!(list.poll_task(&mut slot, &mut cx).is_pending());
        assert!(list.poll_task(&mut slot, &mut cx).is_pending());
        assert_eq!(list.lock().len(), 1, "one entry, its placeholder replaced");
        let mut gone = list.enter("127.0.0.1:1".parse().unwrap());
        assert!(
            list.poll_task(&mut gone, &mut Context::from_waker(&other))
                .is_pending()
        );
        assert_eq!(
            list.remove_task(&mut gone),
            Some("127.0.0.1:1".parse().unwrap())
        );
        assert_eq!(list.remove_task(&mut gone), None, "removed once");
        list.fire();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert_eq!(
            other_count.0.load(Ordering::SeqCst),
            0,
            "removed: not woken"
        );
        assert!(list.poll_task(&mut slot, &mut cx).is_ready());
        assert_eq!(list.peer(&slot), Some(peer), "kept after shutdown began");
        assert_eq!(list.remove_task(&mut slot), Some(peer));
        assert_eq!(list.lock().len(), 0);
    }

    #[test]
    fn a_peer_keeps_its_address() {
        for addr in [
            "127.0.0.1:3000",
            "[::1]:443",
            "[::ffff:10.0.0.1]:80",
            "0.0.0.0:0",
            "[fe80::1%2]:5000",
        ] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(SocketAddr::from(Peer::from(addr)), addr);
        }
    }
}
