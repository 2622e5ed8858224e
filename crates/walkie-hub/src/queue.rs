//! Each connection's bounded outgoing queue, and what happens when a slow
//! consumer fills it.

use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

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
    /// Its key, for [`OverflowPolicy::LatestPerKey`]: a message replaces
    /// only the queued one with the same key. One connection's queue holds
    /// many channels' messages, so the key names the channel too (see
    /// [`queue_key`]).
    pub key: Option<Arc<str>>,
}

/// The queue key of `publication` of `channel`: its state key, after the
/// channel's name and a newline (which no channel name holds), so that
/// `home` of `scores:m1` and `home` of `scores:m2` are different keys.
pub(crate) fn queue_key(
    channel: &crate::channel::ChannelName,
    publication: &crate::publication::Publication,
) -> Option<Arc<str>> {
    let key = publication.key.as_deref()?;
    Some(format!("{channel}\n{key}").into())
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

/// A connection that can take messages at once, from the thread that
/// pushes them: fan-out then writes a subscriber's socket from its own loop
/// over the subscribers, instead of waking the subscriber's task to do it
/// (see [`Queue::set_sink`]). The connection's task still writes whatever
/// the sink leaves, and the queue still absorbs and limits what a slow
/// consumer cannot take.
pub trait Sink: Send + Sync + std::fmt::Debug {
    /// Takes the leading messages of `messages` that the connection can
    /// take now, in order, and writes what the socket takes without
    /// waiting. Taking none is always allowed (the connection is busy, on
    /// another thread, or over its high-water mark).
    fn try_send(&self, messages: &[Queued]) -> Taken;
}

/// What a [`Sink`] took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    /// How many of the messages, from the first.
    pub count: usize,
    /// Whether all of what it took left, or the connection's task must be
    /// woken to write the rest.
    pub written: bool,
}

impl Taken {
    /// None taken.
    pub const NONE: Taken = Taken {
        count: 0,
        written: true,
    };
}

/// Why a queue stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueClosed {
    /// It overflowed: the client reads too slowly.
    SlowConsumer,
    /// The hub disconnected the client (say, through the publish API).
    Disconnected,
    /// The hub could not read what the client needs next (its recovery's
    /// next piece): the engine failed. The client may reconnect and
    /// recover.
    Unavailable,
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
    /// The connection's task waiting in `pop_all` or `closed`, woken by the
    /// next push or the close (kept under the same lock: one lock per push,
    /// no separate notifier). One slot: only the connection's own task
    /// waits on its queue.
    waiting: Option<Waker>,
    /// Where messages go directly while nothing is queued, if anywhere.
    sink: Option<Arc<dyn Sink>>,
}

/// A connection's outgoing queue: the hub pushes, the connection's task
/// pops. Pushing never blocks and never grows past the limits.
#[derive(Debug)]
pub struct Queue {
    state: Mutex<State>,
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
            limits: limits.into(),
        }
    }

    /// Gives the queue a [`Sink`]: from now on, a push to the empty queue
    /// first offers its messages to the sink, and queues only what the sink
    /// does not take. `None` takes it away (a connection that is ending).
    pub fn set_sink(&self, sink: Option<Arc<dyn Sink>>) {
        // Dropped after the lock is released: it may hold a connection.
        let _old = std::mem::replace(&mut lock(&self.state).sink, sink);
    }

    /// Offers `messages` to the sink if nothing is queued before them (so
    /// that order holds); returns how many it took, having woken the
    /// connection's task if it has more to write.
    fn offer(&self, s: &mut std::sync::MutexGuard<'_, State>, messages: &[Queued]) -> usize {
        if !s.items.is_empty() || s.closed.is_some() {
            return 0;
        }
        let Some(sink) = &s.sink else {
            return 0;
        };
        let taken = sink.try_send(messages);
        if !taken.written {
            if let Some(w) = s.waiting.take() {
                w.wake();
            }
        }
        taken.count
    }

    /// Queues a message, applying the overflow policy when full. Returns
    /// false if the queue is (now) closed.
    pub fn push(&self, item: Queued) -> bool {
        let mut s = lock(&self.state);
        if self.offer(&mut s, std::slice::from_ref(&item)) == 1 {
            return true;
        }
        let open = self.push_locked(&mut s, item);
        self.wake(s, open)
    }

    /// Queues every message of `items` (in order, leaving it empty) under
    /// one lock and with one wake, as [`Queue::push`] would one by one.
    /// Returns false if the queue is (now) closed.
    pub fn push_all(&self, items: &mut Vec<Queued>) -> bool {
        let mut s = lock(&self.state);
        let taken = self.offer(&mut s, items);
        if taken == items.len() {
            items.clear();
            return s.closed.is_none();
        }
        let open = self.push_each(&mut s, items.drain(..).skip(taken));
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
        let taken = self.offer(&mut s, batch);
        if taken == batch.len() {
            return true;
        }
        // Whole, as one shared entry, unless the sink took part of it. Over
        // the byte limit only as one message into an empty queue, as a
        // push would take it.
        let fits = taken == 0
            && s.count as usize + batch.len() <= self.limits.messages as usize
            && (s.bytes as usize + bytes <= self.limits.bytes as usize
                || (s.count == 0 && batch.len() == 1));
        if fits {
            s.count += size32(batch.len());
            s.bytes = s.bytes.saturating_add(size32(bytes));
            s.items.push(Entry::Shared(batch.clone()));
            return self.wake(s, true);
        }
        let open = self.push_each(&mut s, batch[taken..].iter().cloned());
        self.wake(s, open)
    }

    /// Pushes each of `items` in turn, under the lock, until the queue
    /// closes; false if it did.
    fn push_each(&self, s: &mut State, items: impl Iterator<Item = Queued>) -> bool {
        let mut open = true;
        for item in items {
            if open {
                open = self.push_locked(s, item);
            }
        }
        open
    }

    /// Wakes the connection's task after a push; `open` is what the push
    /// returned.
    fn wake(&self, mut s: std::sync::MutexGuard<'_, State>, open: bool) -> bool {
        let waiting = s.waiting.take();
        drop(s);
        if let Some(w) = waiting {
            w.wake();
        }
        open
    }

    /// One push, under the lock; false if the queue is (now) closed.
    fn push_locked(&self, s: &mut State, item: Queued) -> bool {
        if s.closed.is_some() {
            return false;
        }
        let size = item.message.message().len();
        // Full: the policy may replace the queued message with the same
        // key, if the new one then fits (a larger state may not).
        if self.full(s, size) && (!self.replace_same_key(s, &item) || self.full(s, size)) {
            s.items.clear();
            s.count = 0;
            s.bytes = 0;
            s.closed = Some(QueueClosed::SlowConsumer);
            return false;
        }
        s.bytes = s.bytes.saturating_add(size32(size));
        s.count += 1;
        s.items.push(Entry::One(item));
        true
    }

    /// Whether a message of `size` bytes would overflow the queue (one
    /// message always fits an empty one).
    fn full(&self, s: &State, size: usize) -> bool {
        s.count >= self.limits.messages
            || (s.bytes as usize + size > self.limits.bytes as usize && s.count != 0)
    }

    /// Under [`OverflowPolicy::LatestPerKey`], removes the queued message
    /// with `item`'s key; false if there is none.
    fn replace_same_key(&self, s: &mut State, item: &Queued) -> bool {
        let (Some(key), OverflowPolicy::LatestPerKey) = (&item.key, self.limits.policy) else {
            return false;
        };
        unshare(&mut s.items);
        let same = |e: &Entry| matches!(e, Entry::One(q) if q.key.as_deref() == Some(&**key));
        let Some(i) = s.items.iter().position(same) else {
            return false;
        };
        if let Entry::One(old) = s.items.remove(i) {
            s.bytes = s.bytes.saturating_sub(size32(old.message.message().len()));
            s.count -= 1;
        }
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
    }

    /// Resolves once the queue is closed, with why. A connection blocked
    /// writing to a slow socket waits on this too, so that it notices when
    /// its queue overflowed. For the connection's own task, which it wakes
    /// on every push too (see `State::waiting`).
    pub async fn closed(&self) -> QueueClosed {
        std::future::poll_fn(|cx| {
            let mut s = lock(&self.state);
            if let Some(why) = s.closed {
                return Poll::Ready(why);
            }
            // Registered under the lock that closing takes.
            register(&mut s.waiting, cx);
            Poll::Pending
        })
        .await
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
                register(&mut s.waiting, cx);
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

    /// How many more messages, and bytes of them, fit before a push would
    /// overflow.
    pub fn room(&self) -> (usize, usize) {
        let s = lock(&self.state);
        (
            self.limits.messages.saturating_sub(s.count) as usize,
            self.limits.bytes.saturating_sub(s.bytes) as usize,
        )
    }

    /// The most messages, and bytes of them, the queue holds.
    pub fn limits(&self) -> (usize, usize) {
        (self.limits.messages as usize, self.limits.bytes as usize)
    }

    /// Whether the queue was closed (see [`Queue::close`]).
    pub fn is_closed(&self) -> bool {
        lock(&self.state).closed.is_some()
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

/// Keeps the waker of `cx` in `slot`, unless it holds one that wakes the
/// same task.
fn register(slot: &mut Option<Waker>, cx: &std::task::Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        slot => *slot = Some(cx.waker().clone()),
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
    use std::future::Future;
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

    /// A batch over the byte limit goes in whole only as one message into
    /// an empty queue; more overflow as they would one by one.
    #[tokio::test]
    async fn a_shared_batch_over_the_byte_limit_overflows_an_empty_queue() {
        let q = Queue::new(QueueLimits {
            messages: 100,
            bytes: 10,
            policy: OverflowPolicy::Disconnect,
        });
        let (one, bytes) = shared(&["0123456789abc"], None);
        assert!(q.push_shared(&one, bytes), "one message always fits");
        assert_eq!(pop_texts(&q).await.len(), 1);
        let (batch, bytes) = shared(&["01234567", "89abcdef"], None);
        assert!(!q.push_shared(&batch, bytes));
        assert!(q.is_empty());
    }

    /// A larger state that still does not fit after the one it replaces
    /// is gone: the byte limit holds.
    #[tokio::test]
    async fn latest_per_key_keeps_the_byte_limit() {
        let q = Queue::new(QueueLimits {
            messages: 100,
            bytes: 10,
            policy: OverflowPolicy::LatestPerKey,
        });
        assert!(q.push(item("a 1", Some("a"))));
        assert!(q.push(item("b 1", Some("b"))));
        assert!(q.push(item("b 2 ..", Some("b"))), "7 bytes in all");
        assert!(!q.push(item("b 3 ........", Some("b"))), "15 bytes");
    }

    /// Two channels' states with the same key are not one state: the
    /// hub's queue keys name the channel.
    #[test]
    fn queue_keys_name_the_channel() {
        use crate::channel::ChannelName;
        use crate::publication::NewPublication;
        let mut p = NewPublication::text("1").at(1);
        p.key = Some("home".into());
        let m1 = ChannelName::new("scores:m1").unwrap();
        let m2 = ChannelName::new("scores:m2").unwrap();
        assert_ne!(queue_key(&m1, &p), queue_key(&m2, &p));
        assert_eq!(queue_key(&m1, &p), queue_key(&m1, &p));
        p.key = None;
        assert_eq!(queue_key(&m1, &p), None);
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

    /// A sink that takes up to `room` messages in all, and says whether
    /// they were written as `written` says.
    #[derive(Debug)]
    struct Room {
        room: Mutex<usize>,
        taken: Mutex<Vec<String>>,
        written: bool,
    }

    impl Room {
        fn new(room: usize, written: bool) -> Arc<Self> {
            Arc::new(Room {
                room: Mutex::new(room),
                taken: Mutex::default(),
                written,
            })
        }

        fn taken(&self) -> Vec<String> {
            lock(&self.taken).clone()
        }
    }

    impl Sink for Room {
        fn try_send(&self, messages: &[Queued]) -> Taken {
            let mut room = lock(&self.room);
            let count = messages.len().min(*room);
            *room -= count;
            lock(&self.taken).extend(
                messages[..count]
                    .iter()
                    .map(|q| q.message.message().as_text().unwrap().to_owned()),
            );
            Taken {
                count,
                written: self.written,
            }
        }
    }

    #[tokio::test]
    async fn a_sink_takes_what_it_can_and_the_queue_keeps_the_rest_in_order() {
        let q = Queue::new(limits(100, OverflowPolicy::Disconnect));
        let sink = Room::new(4, true);
        q.set_sink(Some(sink.clone()));
        let (batch, bytes) = shared(&["a", "b", "c"], None);
        assert!(q.push_shared(&batch, bytes));
        assert!(q.is_empty(), "all three taken");
        let (batch, bytes) = shared(&["d", "e", "f"], None);
        assert!(q.push_shared(&batch, bytes));
        assert_eq!(q.len(), 2, "one taken, two queued");
        // Something is queued: what comes next queues behind it, even
        // though the sink has room again.
        *lock(&sink.room) = 10;
        assert!(q.push(item("g", None)));
        assert!(q.push_all(&mut vec![item("h", None)]));
        assert_eq!(sink.taken(), ["a", "b", "c", "d"]);
        assert_eq!(pop_texts(&q).await, ["e", "f", "g", "h"]);
        // Empty again: the sink takes it.
        assert!(q.push_all(&mut vec![item("i", None), item("j", None)]));
        assert!(q.is_empty());
        // Without a sink, the queue keeps everything.
        q.set_sink(None);
        assert!(q.push(item("k", None)));
        assert_eq!(sink.taken(), ["a", "b", "c", "d", "i", "j"]);
        assert_eq!(pop_texts(&q).await, ["k"]);
    }

    #[tokio::test]
    async fn a_sink_that_could_not_write_everything_wakes_the_connection() {
        let q = Arc::new(Queue::new(QueueLimits::default()));
        q.set_sink(Some(Room::new(10, false)));
        let q2 = q.clone();
        let waiter = tokio::spawn(async move {
            let mut out = Vec::new();
            let mut polls = 0;
            std::future::poll_fn(|cx| {
                polls += 1;
                if polls > 1 {
                    return Poll::Ready(());
                }
                let popped = std::pin::pin!(q2.pop_all(&mut out)).poll(cx);
                assert!(popped.is_pending(), "nothing is queued yet");
                Poll::Pending
            })
            .await;
            out.len()
        });
        tokio::task::yield_now().await;
        assert!(q.push(item("x", None)));
        let queued = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("the connection's task was not woken")
            .unwrap();
        assert_eq!(queued, 0, "the sink took it: nothing is queued");
        assert!(q.is_empty());
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
