//! Delivering one channel to the hub: in order, each saved publication
//! once, with what was missed read back from the channel's stream.
//!
//! A read-back can fail: a request times out, or JetStream has no leader
//! yet after a server restart. The channel is then *behind*: nothing saved
//! is delivered past the gap (that would skip what it holds for good), and
//! the read-back is tried again, waiting longer each time, until it
//! succeeds. Saved messages that arrive meanwhile are held in order, up to
//! [`MAX_HELD`] messages or [`MAX_HELD_BYTES`]; past that they are let go
//! and read from the stream with the rest (they are saved there: holding
//! them only spares reading them back, and keeps them should the history
//! turn over meanwhile). A publication without history is delivered at
//! once even then: it is not ordered against saved ones.
//!
//! A channel behind for [`LONG_BEHIND`] is logged as an error, and the hub
//! is told ([`BrokerEvents::channel_unavailable`]): it cuts the channel's
//! members off, to reconnect and recover from history. Retries go on.
//!
//! A read-back that succeeds but finds the first missed messages trimmed
//! (a burst larger than history, or older than its TTL, while the node was
//! behind) tells the hub at once: nothing past the gap is delivered, and
//! delivery goes on from the stream's position. Held messages that go on
//! from where delivery is count as read: they are no gap.
//!
//! [`BrokerEvents::channel_unavailable`]: crate::engine::BrokerEvents::channel_unavailable

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{CatchUps, Fail, Inner, epoch_of};
use crate::channel::ChannelName;
use crate::codec::decode;
use crate::engine::EngineError;
use crate::publication::{HistoryFilter, Publication, StreamPosition};

/// The wait before the first retry of a failed read-back.
const FIRST_RETRY: Duration = Duration::from_millis(200);

/// The longest wait between two retries.
const LAST_RETRY: Duration = Duration::from_secs(5);

/// How many channels of a node catch up from their streams at once.
pub(super) const MAX_CATCH_UPS: usize = 16;

/// How long a channel may be behind before it is logged as an error.
const LONG_BEHIND: Duration = Duration::from_secs(30);

/// How many saved messages a channel holds while behind...
const MAX_HELD: usize = 1024;

/// ...and how many bytes of their payloads.
const MAX_HELD_BYTES: usize = 8 << 20;

/// A saved publication as it came on the delivery subject.
#[derive(Debug)]
struct Saved {
    /// The stream that saved it.
    stream: String,
    seq: u64,
    /// The sequence its stream saved before it.
    previous: u64,
    payload: Bytes,
}

/// What came on a channel's delivery subject.
enum Incoming {
    /// A publication without history (offset 0).
    Live(Bytes),
    Saved(Saved),
    /// A sequence without its stream: not ours.
    Foreign,
}

impl Incoming {
    fn of(m: async_nats::Message) -> Incoming {
        let header = |name: async_nats::HeaderName| {
            m.headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        let seq = header(async_nats::header::NATS_SEQUENCE).and_then(|s| s.parse::<u64>().ok());
        let Some(seq) = seq else {
            return Incoming::Live(m.payload);
        };
        let Some(stream) = header(async_nats::header::NATS_STREAM) else {
            return Incoming::Foreign;
        };
        let previous = header(async_nats::header::NATS_LAST_SEQUENCE)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(seq.saturating_sub(1));
        Incoming::Saved(Saved {
            stream,
            seq,
            previous,
            payload: m.payload,
        })
    }
}

/// Where a channel's delivery stands.
#[derive(Debug)]
pub(super) struct Cursor {
    /// The latest saved publication delivered (at first, the stream's
    /// position when this node subscribed): what a read-back starts after.
    at: StreamPosition,
    /// The epochs delivery moved on from, latest last.
    left: Left,
    /// Set while a read-back failed and is to be tried again.
    behind: Option<Behind>,
}

/// A channel whose missed messages could not be read back yet.
#[derive(Debug)]
struct Behind {
    /// When the first read-back failed (or the reconnect came).
    since: Instant,
    /// When to try again.
    next_try: Instant,
    /// The wait after the next try, if it fails too.
    wait: Duration,
    /// How many tries failed.
    failures: u32,
    /// Read the whole stream after `at` (after a reconnect, or once held
    /// messages were let go), rather than the gap before the first held.
    catch_up: bool,
    /// Look the channel's stream up again first (after a reconnect: it may
    /// have been replaced meanwhile).
    forget: bool,
    /// Saved messages not delivered yet, in the order they came.
    held: VecDeque<Saved>,
    held_bytes: usize,
    /// Whether being behind for long was logged.
    reported: bool,
    /// Whether the hub was told so.
    told: bool,
}

/// The last [`MAX_LEFT`] epochs a channel's delivery moved on from: their
/// streams were deleted (the history was removed), so a message of one that
/// arrives late (republished by another server of a cluster, say) is
/// dropped. Taken for a newer epoch, it would switch delivery back to a
/// removed history, and the next message of the current one would have
/// its whole stream read back and delivered again.
#[derive(Debug, Default)]
struct Left(VecDeque<Arc<str>>);

/// How many epochs [`Left`] remembers.
const MAX_LEFT: usize = 8;

impl Left {
    fn contains(&self, epoch: &str) -> bool {
        self.0.iter().any(|e| **e == *epoch)
    }

    fn remember(&mut self, epoch: Arc<str>) {
        if !self.contains(&epoch) {
            if self.0.len() == MAX_LEFT {
                self.0.pop_front();
            }
            self.0.push_back(epoch);
        }
    }

    /// Remembers `before` if delivery moved on from it to `at`'s epoch
    /// (which is then no longer one left, if it was).
    fn moved(&mut self, before: Arc<str>, at: &StreamPosition) {
        if *before != *at.epoch {
            self.0.retain(|e| **e != *at.epoch);
            self.remember(before);
        }
    }
}

impl Behind {
    fn new(now: Instant) -> Behind {
        Behind {
            since: now,
            next_try: now,
            wait: FIRST_RETRY,
            failures: 0,
            catch_up: false,
            forget: false,
            held: VecDeque::new(),
            held_bytes: 0,
            reported: false,
            told: false,
        }
    }

    /// Keeps a message for later; past the bounds, lets every held one go,
    /// to be read from the stream instead.
    fn hold(&mut self, s: Saved) {
        self.held_bytes += s.payload.len();
        self.held.push_back(s);
        if self.held.len() > MAX_HELD || self.held_bytes > MAX_HELD_BYTES {
            self.held.clear();
            self.held_bytes = 0;
            self.catch_up = true;
        }
    }

    fn next_held(&mut self) -> Option<Saved> {
        let s = self.held.pop_front()?;
        self.held_bytes -= s.payload.len();
        Some(s)
    }

    /// Puts back the message `next_held` gave, first in line.
    fn unhold(&mut self, s: Saved) {
        self.held_bytes += s.payload.len();
        self.held.push_front(s);
    }

    /// A try failed: schedules the next, each wait twice the one before
    /// up to [`LAST_RETRY`], and logs (once more as an error when the
    /// channel has been behind for [`LONG_BEHIND`]).
    fn failed(&mut self, channel: &ChannelName, e: &EngineError, now: Instant) {
        self.failures += 1;
        self.next_try = now + self.wait;
        self.wait = (self.wait * 2).min(LAST_RETRY);
        let behind_for = now.saturating_duration_since(self.since);
        if self.failures == 1 {
            tracing::warn!(%channel, "nats engine: cannot read back missed messages, retrying: {e}");
        } else if behind_for >= LONG_BEHIND && !self.reported {
            self.reported = true;
            tracing::error!(
                %channel,
                secs = behind_for.as_secs(),
                "nats engine: missed messages still cannot be read back; nothing newer is delivered on this channel until they are: {e}"
            );
        } else {
            tracing::debug!(%channel, failures = self.failures, "nats engine: read-back failed again: {e}");
        }
    }
}

impl Cursor {
    pub(super) fn new(at: StreamPosition) -> Cursor {
        Cursor {
            at,
            left: Left::default(),
            behind: None,
        }
    }

    /// Whether the channel has been behind for [`LONG_BEHIND`] and the
    /// hub was not told yet; true once per stretch behind.
    fn newly_long_behind(&mut self) -> bool {
        match &mut self.behind {
            Some(b) if b.reported && !b.told => {
                b.told = true;
                true
            }
            _ => false,
        }
    }

    /// When to try a failed read-back again, if one failed.
    fn retry_at(&self) -> Option<Instant> {
        self.behind.as_ref().map(|b| b.next_try)
    }

    /// After a reconnect: read the stream after `at` now.
    fn need_catch_up(&mut self, now: Instant, forget: bool) {
        let b = self.behind.get_or_insert_with(|| Behind::new(now));
        b.catch_up = true;
        b.forget |= forget;
        b.next_try = now;
        b.wait = FIRST_RETRY;
    }

    /// The gap before `s` could not be read back: `s` waits for it.
    fn fall_behind(&mut self, channel: &ChannelName, s: Saved, e: &EngineError, now: Instant) {
        let b = self.behind.get_or_insert_with(|| Behind::new(now));
        b.failed(channel, e, now);
        b.hold(s);
    }
}

/// Whether trying again may help: data that is not a publication stays so.
fn retryable(e: &EngineError) -> bool {
    !matches!(e, EngineError::Storage(_))
}

impl Inner {
    /// The channel's position now (its stream made if there is none).
    pub(super) async fn position(
        &self,
        channel: &ChannelName,
    ) -> Result<StreamPosition, EngineError> {
        let only_position = HistoryFilter {
            since: None,
            limit: Some(0),
            reverse: false,
        };
        Ok(self.history(channel, only_position).await?.position)
    }

    /// Hands a publication to the hub, unless it is a saved one at or
    /// before `at` (delivered already); moves `at` past it.
    fn emit(&self, channel: &ChannelName, p: &Publication, epoch: &str, at: &mut StreamPosition) {
        if p.offset != 0 {
            if *at.epoch == *epoch && p.offset <= at.offset {
                return;
            }
            if *at.epoch != *epoch {
                at.epoch = epoch.into();
            }
            at.offset = p.offset;
        }
        if let Some(events) = self.events.get() {
            events.handle_publication(channel, p, epoch);
        }
    }

    /// One message on a channel's delivery subject.
    async fn on_message(&self, channel: &ChannelName, m: async_nats::Message, cursor: &mut Cursor) {
        match Incoming::of(m) {
            Incoming::Live(payload) => match decode(0, &payload) {
                Ok(p) => {
                    let epoch = cursor.at.epoch.clone();
                    self.emit(channel, &p, &epoch, &mut cursor.at);
                }
                Err(e) => tracing::warn!(%channel, "nats engine: {e}"),
            },
            Incoming::Saved(s) => {
                if let Some(b) = &mut cursor.behind {
                    b.hold(s);
                } else if let Err(e) = self.advance(channel, &s, cursor).await {
                    cursor.fall_behind(channel, s, &e, Instant::now());
                }
            }
            Incoming::Foreign => {}
        }
    }

    /// Delivers `s` after what its stream saved before it and was not
    /// delivered (read back). Delivers nothing if that read-back fails, or
    /// if `s` is of an epoch delivery moved on from.
    async fn advance(
        &self,
        channel: &ChannelName,
        s: &Saved,
        cursor: &mut Cursor,
    ) -> Result<(), EngineError> {
        let epoch = epoch_of(&s.stream);
        if cursor.left.contains(epoch) {
            tracing::debug!(%channel, epoch, "nats engine: a message of a removed history, dropped");
            return Ok(());
        }
        // An epoch not delivered yet is newer, unless its stream is gone
        // already: a late message of a history removed since (twice
        // removed while this node skipped the middle epoch, say), which
        // would take delivery away from the live epoch.
        if *cursor.at.epoch != *epoch && !self.stream_exists(&s.stream).await? {
            tracing::debug!(%channel, epoch, "nats engine: a message of a removed history, dropped");
            cursor.left.remember(epoch.into());
            return Ok(());
        }
        let before = cursor.at.epoch.clone();
        let outcome = self.advance_in(channel, s, epoch, &mut cursor.at).await;
        cursor.left.moved(before, &cursor.at);
        outcome
    }

    /// [`Inner::advance`] once `s` is known to be of the current epoch or
    /// a newer one (`epoch`).
    async fn advance_in(
        &self,
        channel: &ChannelName,
        s: &Saved,
        epoch: &str,
        at: &mut StreamPosition,
    ) -> Result<(), EngineError> {
        let same = *at.epoch == *epoch;
        if same && s.seq <= at.offset {
            return Ok(());
        }
        // The first not delivered: the one after `at`, or the first of a
        // new stream (the history was removed: what it saved was missed).
        let from = if same { at.offset + 1 } else { 1 };
        if s.previous >= from {
            match self.fetch(&s.stream, from..=s.previous).await {
                // Some no longer kept (trimmed oldest first): not `s`
                // either, past the gap.
                Ok(missed) if missed.first().map(|p| p.offset) != Some(from) => {
                    let position = StreamPosition {
                        offset: s.seq,
                        epoch: epoch.into(),
                    };
                    self.cut_off(channel, &position, at);
                    return Ok(());
                }
                Ok(missed) => {
                    for p in &missed {
                        self.emit(channel, p, epoch, at);
                    }
                }
                // Deleted meanwhile: what it held went with it.
                Err(Fail::Gone) => {}
                Err(Fail::Engine(e)) if retryable(&e) => return Err(e),
                Err(Fail::Engine(e)) => {
                    tracing::error!(%channel, "nats engine: missed messages cannot be read, skipped: {e}");
                }
            }
        }
        match decode(s.seq, &s.payload) {
            Ok(p) => self.emit(channel, &p, epoch, at),
            Err(e) => tracing::warn!(%channel, "nats engine: {e}"),
        }
        Ok(())
    }

    /// Delivers what the channel's stream saved after `cursor.at`: all it
    /// holds if it is a new stream (the history was removed meanwhile).
    async fn catch_up(
        &self,
        channel: &ChannelName,
        cursor: &mut Cursor,
        forget: bool,
    ) -> Result<(), EngineError> {
        let before = cursor.at.epoch.clone();
        let outcome = self.catch_up_at(channel, &mut cursor.at, forget).await;
        cursor.left.moved(before, &cursor.at);
        outcome
    }

    pub(super) async fn catch_up_at(
        &self,
        channel: &ChannelName,
        at: &mut StreamPosition,
        forget: bool,
    ) -> Result<(), EngineError> {
        // The stream may have been replaced while this node was away.
        if forget {
            self.forget(channel);
        }
        let after = HistoryFilter {
            since: Some(at.offset),
            limit: None,
            reverse: false,
        };
        let mut h = self.history(channel, after).await?;
        let mut from = at.offset;
        if h.position.epoch != at.epoch {
            tracing::warn!(%channel, "nats engine: history removed while disconnected (new epoch)");
            let all = HistoryFilter {
                since: None,
                ..after
            };
            h = self.history(channel, all).await?;
            from = 0;
        }
        // Saved after `from` but not read back: trimmed by size or age.
        // Nothing past the gap is delivered: the channel's members here
        // are cut off to recover, and delivery goes on from the stream's
        // position.
        let first = h.publications.first().map(|p| p.offset);
        if h.position.offset > from && first != Some(from + 1) {
            self.cut_off(channel, &h.position, at);
            return Ok(());
        }
        for p in &h.publications {
            self.emit(channel, p, &h.position.epoch, at);
        }
        Ok(())
    }

    /// Some of `channel`'s missed messages are no longer kept: delivers
    /// nothing past the gap, moves `at` to `position` (what comes next
    /// is delivered from there) and tells the hub, which cuts the
    /// channel's members off to recover, as after a channel stayed behind.
    fn cut_off(&self, channel: &ChannelName, position: &StreamPosition, at: &mut StreamPosition) {
        tracing::warn!(%channel, "nats engine: some of the missed messages are no longer kept");
        *at = position.clone();
        if let Some(events) = self.events.get() {
            events.channel_unavailable(channel);
        }
    }

    /// Tries again what a failed read-back (or a reconnect) left: the
    /// catch-up, then the held messages in order. On failure, schedules
    /// the next try.
    async fn resume(&self, channel: &ChannelName, cursor: &mut Cursor) {
        let Some(mut b) = cursor.behind.take() else {
            return;
        };
        if b.catch_up {
            // Held messages that go on from where delivery is are delivered
            // first: history may have been trimmed past them meanwhile (a
            // burst larger than it), which is no gap for this node.
            while b.held.front().is_some_and(|s| {
                *epoch_of(&s.stream) == *cursor.at.epoch && s.previous == cursor.at.offset
            }) {
                let s = b.next_held().expect("a held message");
                match decode(s.seq, &s.payload) {
                    Ok(p) => {
                        let epoch = cursor.at.epoch.clone();
                        self.emit(channel, &p, &epoch, &mut cursor.at);
                    }
                    Err(e) => tracing::warn!(%channel, "nats engine: {e}"),
                }
            }
            match self.catch_up(channel, cursor, b.forget).await {
                // Everything held was saved before this read: delivered now.
                Ok(()) => {
                    b.held.clear();
                    b.held_bytes = 0;
                }
                Err(e) if retryable(&e) => {
                    b.failed(channel, &e, Instant::now());
                    cursor.behind = Some(b);
                    return;
                }
                Err(e) => {
                    tracing::error!(%channel, "nats engine: cannot catch up, skipped: {e}");
                }
            }
            b.catch_up = false;
            b.forget = false;
        }
        while let Some(s) = b.next_held() {
            if let Err(e) = self.advance(channel, &s, cursor).await {
                b.unhold(s);
                b.failed(channel, &e, Instant::now());
                cursor.behind = Some(b);
                return;
            }
        }
        if b.failures > 0 {
            tracing::info!(%channel, failures = b.failures, "nats engine: missed messages read back");
        }
    }
}

/// A place in the queue for a catch-up slot (see [`MAX_CATCH_UPS`]).
type SlotWait = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<tokio::sync::OwnedSemaphorePermit, tokio::sync::AcquireError>,
            > + Send,
    >,
>;

/// Delivers one channel to the hub, from `start` (the stream's position
/// when this node subscribed) until unsubscribed. `seen` is what
/// `catch_ups` held when the node subscribed.
///
/// A read-back or catch-up to (re)try waits for one of the node's
/// [`MAX_CATCH_UPS`] slots (a slow-consumer event or a reconnect makes
/// every channel catch up at once), and keeps its place in the queue while
/// the task goes on reading its subscription: saved messages are held,
/// live ones delivered.
pub(super) async fn deliver(
    inner: Arc<Inner>,
    channel: ChannelName,
    mut subscriber: async_nats::Subscriber,
    mut catch_ups: watch::Receiver<CatchUps>,
    mut seen: CatchUps,
    start: StreamPosition,
) {
    let mut cursor = Cursor::new(start);
    let mut slot: Option<SlotWait> = None;
    loop {
        let retry = cursor.retry_at();
        if retry.is_none() {
            slot = None;
        }
        tokio::select! {
            m = subscriber.next() => match m {
                Some(m) => inner.on_message(&channel, m, &mut cursor).await,
                None => return,
            },
            changed = catch_ups.changed() => match changed {
                Ok(()) => {
                    let now = *catch_ups.borrow_and_update();
                    let reconnected = now.reconnects != seen.reconnects;
                    seen = now;
                    cursor.need_catch_up(Instant::now(), reconnected);
                }
                Err(_) => return,
            },
            () = tokio::time::sleep_until(retry.unwrap_or_else(Instant::now)), if retry.is_some() && slot.is_none() => {
                slot = Some(Box::pin(inner.catch_up_slots.clone().acquire_owned()));
            }
            permit = async { slot.as_mut().expect("a slot is waited for").await }, if slot.is_some() => {
                slot = None;
                let _permit = permit;
                #[cfg(test)]
                let _running = inner.resuming.start();
                inner.resume(&channel, &mut cursor).await;
            }
        }
        if cursor.newly_long_behind() {
            if let Some(events) = inner.events.get() {
                events.channel_unavailable(&channel);
            }
        }
    }
}

/// Counts what runs at once (tests): now, the most, and in all.
#[cfg(test)]
#[derive(Debug, Default)]
pub(super) struct Gauge {
    pub(super) now: std::sync::atomic::AtomicUsize,
    pub(super) peak: std::sync::atomic::AtomicUsize,
    pub(super) total: std::sync::atomic::AtomicUsize,
}

#[cfg(test)]
impl Gauge {
    /// One more running until the guard drops.
    pub(super) fn start(&self) -> impl Drop + '_ {
        use std::sync::atomic::Ordering::SeqCst;
        struct Running<'a>(&'a Gauge);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.now.fetch_sub(1, SeqCst);
            }
        }
        let now = self.now.fetch_add(1, SeqCst) + 1;
        self.peak.fetch_max(now, SeqCst);
        self.total.fetch_add(1, SeqCst);
        Running(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved(seq: u64, bytes: usize) -> Saved {
        Saved {
            stream: "s-1".into(),
            seq,
            previous: seq - 1,
            payload: Bytes::from(vec![0; bytes]),
        }
    }

    /// Held messages stay in order within the bounds; past them, all are
    /// let go and the stream is read instead.
    #[test]
    fn held_messages_are_bounded() {
        let mut b = Behind::new(Instant::now());
        for seq in 1..=MAX_HELD as u64 {
            b.hold(saved(seq, 1));
        }
        assert!(!b.catch_up);
        assert_eq!(b.next_held().map(|s| s.seq), Some(1));
        b.hold(saved(MAX_HELD as u64 + 1, 1));
        assert!(!b.catch_up, "{MAX_HELD} held again");
        b.hold(saved(MAX_HELD as u64 + 2, 1));
        assert!(b.catch_up && b.held.is_empty() && b.held_bytes == 0);

        let mut b = Behind::new(Instant::now());
        b.hold(saved(1, MAX_HELD_BYTES));
        assert!(!b.catch_up);
        b.hold(saved(2, 1));
        assert!(b.catch_up && b.held.is_empty(), "over the byte bound");
    }

    /// Epochs moved on from are remembered, the last [`MAX_LEFT`] of them;
    /// staying in one epoch remembers nothing.
    #[test]
    fn the_last_epochs_left_are_remembered() {
        let mut left = Left::default();
        let at = |e: &str| StreamPosition {
            offset: 1,
            epoch: e.into(),
        };
        left.moved("e0".into(), &at("e0"));
        assert!(left.0.is_empty());
        for i in 0..=MAX_LEFT {
            left.moved(format!("e{i}").into(), &at(&format!("e{}", i + 1)));
        }
        assert!(!left.contains("e0"), "the oldest is forgotten");
        assert!((1..=MAX_LEFT).all(|i| left.contains(&format!("e{i}"))));
        assert!(
            !left.contains(&format!("e{}", MAX_LEFT + 1)),
            "the current one"
        );
    }

    /// The hub is told once per stretch behind, once it has lasted.
    #[test]
    fn the_hub_is_told_once_when_a_channel_stays_behind() {
        let channel = ChannelName::new("a").unwrap();
        let start = Instant::now();
        let e = EngineError::Unavailable("down".into());
        let mut cursor = Cursor::new(StreamPosition {
            offset: 0,
            epoch: "e".into(),
        });
        cursor.fall_behind(&channel, saved(1, 1), &e, start);
        assert!(!cursor.newly_long_behind(), "just behind");
        let b = cursor.behind.as_mut().unwrap();
        b.failed(&channel, &e, start + LONG_BEHIND);
        assert!(cursor.newly_long_behind());
        assert!(!cursor.newly_long_behind(), "told once");
    }

    /// Retries wait twice as long each time, up to a bound.
    #[test]
    fn retries_back_off_up_to_a_bound() {
        let channel = ChannelName::new("a").unwrap();
        let now = Instant::now();
        let mut b = Behind::new(now);
        let e = EngineError::Unavailable("down".into());
        let mut waits = Vec::new();
        for _ in 0..8 {
            b.failed(&channel, &e, now);
            waits.push(b.next_try - now);
        }
        assert_eq!(waits[0], FIRST_RETRY);
        assert_eq!(waits[1], FIRST_RETRY * 2);
        assert_eq!(waits[7], LAST_RETRY);
    }
}
