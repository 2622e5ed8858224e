//! Each connection's bounded outgoing queue, and what happens when a slow
//! consumer fills it.

use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

use tokio::sync::Notify;
use walkie_proto::PreparedMessage;

use crate::memory::lock;

/// What a full queue does with one more message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OverflowPolicy {
    /// Drop everything queued and end the connection, telling the client to
    /// reconnect and recover what it missed from history.
    #[default]
    Disconnect,
    /// For state-like channels (scores, positions): a message replaces the
    /// queued one with the same key, so a slow client skips to the latest
    /// state. A message without a key, or with a key not queued, still
    /// disconnects when the queue is full.
    LatestPerKey,
}

/// How much a connection may have queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// The most messages queued. Default 1024.
    pub messages: usize,
    /// The most payload bytes queued. Default 4 MiB.
    pub bytes: usize,
    /// What a full queue does.
    pub policy: OverflowPolicy,
}

impl Default for QueueLimits {
    fn default() -> Self {
        QueueLimits {
            messages: 1024,
            bytes: 4 << 20,
            policy: OverflowPolicy::Disconnect,
        }
    }
}

/// One queued message.
#[derive(Debug, Clone)]
pub struct Queued {
    /// The frame to write.
    pub message: PreparedMessage,
    /// Its key, for [`OverflowPolicy::LatestPerKey`].
    pub key: Option<Arc<str>>,
}

/// What a queue holds: one message, or a batch of messages shared by
/// every subscriber that gets all of it (one fan-out batch is stored once,
/// however many queues hold it).
#[derive(Debug, Clone)]
pub enum Entry {
    One(Queued),
    Shared(Arc<[Queued]>),
}

impl Entry {
    /// The messages, in order.
    pub fn messages(&self) -> &[Queued] {
        match self {
            Entry::One(q) => std::slice::from_ref(q),
            Entry::Shared(batch) => batch,
        }
    }
}

/// Why a queue stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueClosed {
    /// It overflowed: the client reads too slowly.
    SlowConsumer,
    /// The hub disconnected the client (say, through the publish API).
    Disconnected,
}

#[derive(Debug, Default)]
struct State {
    /// In order. A `Vec` rather than a deque: it is only ever emptied whole,
    /// by swapping it with the connection's (empty) batch.
    items: Vec<Entry>,
    /// Messages in `items`. This and `bytes` are `u32`s, as the limits
    /// (see `Limits`): a queue is one allocation per connection, and they
    /// keep it at 128 bytes with its `Arc`.
    count: u32,
    /// Payload bytes in `items` (saturating at 4 GiB).
    bytes: u32,
    closed: Option<QueueClosed>,
    /// The connection's task waiting in `pop_all`, woken by the next push
    /// (kept under the same lock: one lock per push, no separate notifier).
    waiting: Option<Waker>,
}

/// A connection's outgoing queue: the hub pushes, the connection's task
/// pops. Pushing never blocks and never grows past the limits.
#[derive(Debug)]
pub struct Queue {
    state: Mutex<State>,
    /// Wakes everyone waiting in `closed`, once.
    closing: Notify,
    limits: Limits,
}

/// [`QueueLimits`] as a queue keeps them: 12 bytes instead of 24, with
/// limits past 4 Gi (messages or bytes) taken as 4 Gi.
#[derive(Debug, Clone, Copy)]
struct Limits {
    messages: u32,
    bytes: u32,
    policy: OverflowPolicy,
}

impl From<QueueLimits> for Limits {
    fn from(l: QueueLimits) -> Self {
        let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Limits {
            messages: clamp(l.messages),
            bytes: clamp(l.bytes),
            policy: l.policy,
        }
    }
}

/// A size as the queue counts it (saturating at 4 GiB, past any limit).
fn size32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl Queue {
    /// An empty queue.
    pub fn new(limits: QueueLimits) -> Self {
        Queue {
            state: Mutex::default(),
            closing: Notify::new(),
            limits: limits.into(),
        }
    }

    /// Queues a message, applying the overflow policy when full. Returns
    /// false if the queue is (now) closed.
    pub fn push(&self, item: Queued) -> bool {
        let mut s = lock(&self.state);
        let open = self.push_locked(&mut s, item);
        self.wake(s, open)
    }

    /// Queues every message of `items` (in order, leaving it empty) under
    /// one lock and with one wake, as [`Queue::push`] would one by one.
    /// Returns false if the queue is (now) closed.
    pub fn push_all(&self, items: &mut Vec<Queued>) -> bool {
        let mut s = lock(&self.state);
        let mut open = true;
        for item in items.drain(..) {
            if open {
                open = self.push_locked(&mut s, item);
            }
        }
        self.wake(s, open)
    }

    /// Queues a shared batch of `bytes` payload bytes, under one lock and
    /// with one wake, as [`Queue::push`] would message by message (and
    /// message by message where it does not fit whole). Returns false if
    /// the queue is (now) closed.
    pub fn push_shared(&self, batch: &Arc<[Queued]>, bytes: usize) -> bool {
        let mut s = lock(&self.state);
        if s.closed.is_some() {
            return false;
        }
        let fits = s.count as usize + batch.len() <= self.limits.messages as usize
            && (s.bytes as usize + bytes <= self.limits.bytes as usize || s.count == 0);
        if fits {
            s.count += size32(batch.len());
            s.bytes = s.bytes.saturating_add(size32(bytes));
            s.items.push(Entry::Shared(batch.clone()));
            return self.wake(s, true);
        }
        let mut open = true;
        for item in batch.iter() {
            if open {
                open = self.push_locked(&mut s, item.clone());
            }
        }
        self.wake(s, open)
    }

    /// Wakes the connection's task after a push; `open` is what the push
    /// returned.
    fn wake(&self, mut s: std::sync::MutexGuard<'_, State>, open: bool) -> bool {
        let waiting = s.waiting.take();
        drop(s);
        if let Some(w) = waiting {
            w.wake();
        }
        if !open {
            self.closing.notify_waiters();
        }
        open
    }

    /// One push, under the lock; false if the queue is (now) closed.
    fn push_locked(&self, s: &mut State, item: Queued) -> bool {
        if s.closed.is_some() {
            return false;
        }
        let size = item.message.message().len();
        let full = s.count >= self.limits.messages
            || (s.bytes as usize + size > self.limits.bytes as usize && s.count != 0);
        if full {
            let replaced = match (&item.key, self.limits.policy) {
                (Some(key), OverflowPolicy::LatestPerKey) => {
                    unshare(&mut s.items);
                    s.items.iter().position(
                        |e| matches!(e, Entry::One(q) if q.key.as_deref() == Some(&**key)),
                    )
                }
                _ => None,
            };
            match replaced {
                Some(i) => {
                    if let Entry::One(old) = s.items.remove(i) {
                        s.bytes = s.bytes.saturating_sub(size32(old.message.message().len()));
                        s.count -= 1;
                    }
                }
                None => {
                    s.items.clear();
                    s.count = 0;
                    s.bytes = 0;
                    s.closed = Some(QueueClosed::SlowConsumer);
                    return false;
                }
            }
        }
        s.bytes = s.bytes.saturating_add(size32(size));
        s.count += 1;
        s.items.push(Entry::One(item));
        true
    }

    /// Closes the queue: the connection's next [`Queue::pop_all`] says why.
    pub fn close(&self, why: QueueClosed) {
        let mut s = lock(&self.state);
        if s.closed.is_none() {
            s.closed = Some(why);
            s.items.clear();
            s.count = 0;
            s.bytes = 0;
        }
        let waiting = s.waiting.take();
        drop(s);
        if let Some(w) = waiting {
            w.wake();
        }
        self.closing.notify_waiters();
    }

    /// Resolves once the queue is closed, with why. A connection blocked
    /// writing to a slow socket waits on this too, so that it notices when
    /// its queue overflowed.
    pub async fn closed(&self) -> QueueClosed {
        loop {
            let notified = self.closing.notified();
            tokio::pin!(notified);
            // Registered before the check: a close in between still wakes it.
            notified.as_mut().enable();
            if let Some(why) = lock(&self.state).closed {
                return why;
            }
            notified.await;
        }
    }

    /// Waits for messages and moves all of them into `out` (in order), or
    /// says why the queue closed. Cancel-safe: nothing is taken until it
    /// resolves.
    pub async fn pop_all(&self, out: &mut Vec<Entry>) -> Result<(), QueueClosed> {
        std::future::poll_fn(|cx| {
            let mut s = lock(&self.state);
            if let Some(why) = s.closed {
                return Poll::Ready(Err(why));
            }
            if s.items.is_empty() {
                // Registered under the lock that pushes take: a push after
                // this check finds the waker.
                match &mut s.waiting {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    slot => *slot = Some(cx.waker().clone()),
                }
                return Poll::Pending;
            }
            if out.is_empty() {
                // Swap buffers: no element is moved.
                std::mem::swap(&mut s.items, out);
            } else {
                out.append(&mut s.items);
            }
            s.count = 0;
            s.bytes = 0;
            Poll::Ready(Ok(()))
        })
        .await
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        lock(&self.state).count as usize
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Replaces every shared batch with its messages, for a replacement by
/// key (state-like channels only).
fn unshare(items: &mut Vec<Entry>) {
    if items.iter().any(|e| matches!(e, Entry::Shared(_))) {
        *items = items
            .drain(..)
            .flat_map(|e| match e {
                Entry::One(q) => vec![Entry::One(q)],
                Entry::Shared(b) => b.iter().cloned().map(Entry::One).collect(),
            })
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use walkie_proto::Message;

    fn item(text: &str, key: Option<&str>) -> Queued {
        Queued {
            message: PreparedMessage::new(Message::text(text.to_owned())),
            key: key.map(Into::into),
        }
    }

    async fn pop_texts(q: &Queue) -> Vec<String> {
        let mut out = Vec::new();
        q.pop_all(&mut out).await.unwrap();
        out.iter()
            .flat_map(Entry::messages)
            .map(|q| q.message.message().as_text().unwrap().to_owned())
            .collect()
    }

    fn shared(texts: &[&str], key: Option<&str>) -> (Arc<[Queued]>, usize) {
        let batch: Arc<[Queued]> = texts.iter().map(|t| item(t, key)).collect();
        (batch, texts.iter().map(|t| t.len()).sum())
    }

    #[tokio::test]
    async fn a_shared_batch_counts_each_of_its_messages() {
        let q = Queue::new(limits(4, OverflowPolicy::Disconnect));
        let (batch, bytes) = shared(&["a", "b", "c"], None);
        assert!(q.push(item("0", None)));
        assert!(q.push_shared(&batch, bytes));
        assert_eq!(q.len(), 4);
        assert_eq!(pop_texts(&q).await, ["0", "a", "b", "c"]);
        // Three fit, the fourth would make five: the queue overflows after
        // the messages that fitted, as one by one.
        assert!(q.push(item("1", None)));
        assert!(q.push(item("2", None)));
        assert!(!q.push_shared(&batch, bytes));
        let mut out = Vec::new();
        assert_eq!(q.pop_all(&mut out).await, Err(QueueClosed::SlowConsumer));
    }

    #[tokio::test]
    async fn latest_per_key_replaces_inside_a_shared_batch() {
        let q = Queue::new(limits(3, OverflowPolicy::LatestPerKey));
        let (batch, bytes) = shared(&["x 1"], Some("x"));
        assert!(q.push_shared(&batch, bytes));
        assert!(q.push(item("y 1", Some("y"))));
        assert!(q.push(item("z 1", Some("z"))));
        assert!(q.push(item("x 2", Some("x"))));
        assert_eq!(pop_texts(&q).await, ["y 1", "z 1", "x 2"]);
    }

    /// Every connection of the hub has a queue behind an `Arc` (16 bytes
    /// of counts): at most 112 bytes keep the allocation at 128.
    #[test]
    fn a_queue_with_its_arc_takes_128_bytes() {
        let size = std::mem::size_of::<Queue>();
        assert!(
            size <= 112,
            "a Queue is {size} bytes: with its Arc, over 128"
        );
    }

    fn limits(messages: usize, policy: OverflowPolicy) -> QueueLimits {
        QueueLimits {
            messages,
            bytes: 1 << 20,
            policy,
        }
    }

    #[tokio::test]
    async fn overflow_disconnects_by_default() {
        let q = Queue::new(limits(2, OverflowPolicy::Disconnect));
        assert!(q.push(item("a", None)));
        assert!(q.push(item("b", None)));
        assert!(!q.push(item("c", None)));
        assert!(q.is_empty(), "memory is released at once");
        let mut out = Vec::new();
        assert_eq!(q.pop_all(&mut out).await, Err(QueueClosed::SlowConsumer));
    }

    #[tokio::test]
    async fn byte_limit_counts_payloads() {
        let q = Queue::new(QueueLimits {
            messages: 100,
            bytes: 10,
            policy: OverflowPolicy::Disconnect,
        });
        assert!(
            q.push(item("0123456789abc", None)),
            "one message always fits"
        );
        assert!(!q.push(item("x", None)));
    }

    #[tokio::test]
    async fn latest_per_key_replaces_the_queued_state() {
        let q = Queue::new(limits(2, OverflowPolicy::LatestPerKey));
        assert!(q.push(item("home 1", Some("home"))));
        assert!(q.push(item("away 1", Some("away"))));
        assert!(q.push(item("home 2", Some("home"))));
        assert_eq!(pop_texts(&q).await, ["away 1", "home 2"]);
        assert!(q.push(item("a", Some("a"))));
        assert!(q.push(item("b", Some("b"))));
        assert!(
            !q.push(item("c", Some("c"))),
            "a new key cannot be collapsed"
        );
    }

    #[tokio::test]
    async fn closed_wakes_a_waiter_on_overflow() {
        let q = Arc::new(Queue::new(limits(1, OverflowPolicy::Disconnect)));
        let q2 = q.clone();
        let waiter = tokio::spawn(async move { q2.closed().await });
        tokio::task::yield_now().await;
        q.push(item("a", None));
        q.push(item("b", None));
        assert_eq!(waiter.await.unwrap(), QueueClosed::SlowConsumer);
        assert_eq!(
            q.closed().await,
            QueueClosed::SlowConsumer,
            "already closed"
        );
    }

    #[tokio::test]
    async fn pop_waits_for_a_push() {
        let q = Arc::new(Queue::new(QueueLimits::default()));
        let q2 = q.clone();
        let waiter = tokio::spawn(async move {
            let mut out = Vec::new();
            q2.pop_all(&mut out).await.map(|()| out.len())
        });
        tokio::task::yield_now().await;
        q.push(item("x", None));
        assert_eq!(waiter.await.unwrap(), Ok(1));
    }
}
