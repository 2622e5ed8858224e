//! What a joining subscriber gets from history, and recovery larger than
//! its queue.
//!
//! A recovery is every message after the client's last offset. Queued at
//! once, more than the connection's queue holds would cut the client off
//! as a slow consumer (1013) before it read any of it, and the same again
//! at every reconnect. So the first piece queued is what fits; the member
//! stays out of the live fan-out ([`Joining::CatchingUp`]), and each time
//! the connection has written what it had queued, [`Client::catch_up`]
//! reads the next piece from history, until it reaches the live stream.
//! A piece leaves a quarter of the queue free, for what the client's other
//! channels publish meanwhile. Events without an offset (join, leave) are
//! not kept in history: they are queued as they come.
//!
//! A client that reads slower than the channel's history turns over finds
//! the next message it needs gone: it is cut off as a slow consumer, and
//! its next recovery says `recovered: false`.

use std::sync::atomic::Ordering;

use super::{Client, Format, Recover, Subscribed};
use crate::channel::ChannelName;
use crate::dispatch::{Joining, frame};
use crate::engine::EngineError;
use crate::memory::lock;
use crate::publication::{History, HistoryFilter, Publication};
use crate::queue::{QueueClosed, Queued, queue_key};

/// The most messages a recovery reads from history at first: the read at
/// subscribe and the first piece's (then see [`Joining::CatchingUp`]). A
/// queue's count of large messages would be a large read (1,024 of 64 KiB:
/// 64 MiB) to keep a few.
pub(super) const FIRST_READ: usize = 256;

/// One piece of a recovery, queued by [`Client::catch_up`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatchUp {
    /// Messages queued.
    pub queued: usize,
    /// Whether the subscription is live now (or gone): nothing more to
    /// catch up.
    pub done: bool,
}

/// Why a recovery stopped half way. The client's queue is closed: as a
/// slow consumer's for [`CatchUpError::Lost`], as
/// [`QueueClosed::Unavailable`] for an engine's failure. Either way the
/// client reconnects and recovers from where it got to.
#[derive(Debug, thiserror::Error)]
pub enum CatchUpError {
    /// History no longer holds the next message (it was trimmed or
    /// expired, or the channel's epoch changed): the client read slower
    /// than the channel's history turns over.
    #[error("history no longer holds offset {0}")]
    Lost(u64),
    /// The engine failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Whether `history`, read after `since` in `epoch`, follows on from it
/// with no gap, between its messages too (an engine may skip one that
/// expired while it read).
fn follows(since: u64, epoch: &str, history: &History) -> bool {
    let offsets = history.publications.iter().map(|p| p.offset);
    *history.position.epoch == *epoch
        && since <= history.position.offset
        && offsets
            .zip(since + 1..)
            .all(|(offset, want)| offset == want)
        && (!history.publications.is_empty() || since == history.position.offset)
}

/// Each publication framed for `format`, with its offset.
fn framed(
    channel: &ChannelName,
    publications: &[Publication],
    format: Format,
) -> Vec<(u64, Queued)> {
    publications
        .iter()
        .filter_map(|p| {
            let message = frame(channel, p, format)?;
            let key = queue_key(channel, p);
            Some((p.offset, Queued { message, key }))
        })
        .collect()
}

/// The size of each of `replay`'s messages.
fn sizes(replay: &[(u64, Queued)]) -> impl DoubleEndedIterator<Item = usize> + '_ {
    replay.iter().map(|(_, q)| q.message.message().len())
}

/// How many of `sizes` (in the order given) fit in a queue's `room`
/// (messages, bytes); an `empty` queue takes one message of any size, as
/// a push does.
fn fitting(
    sizes: impl Iterator<Item = usize>,
    (messages, bytes): (usize, usize),
    empty: bool,
) -> usize {
    let mut used = 0;
    sizes
        .take(messages)
        .enumerate()
        .take_while(|&(i, size)| {
            used += size;
            used <= bytes || (i == 0 && empty)
        })
        .count()
}

impl Client {
    /// Queues a message of a join, a recovery or its catch-up, counted in
    /// the metrics as fan-out's are (`messages_out`, `bytes_out`).
    fn push_counted(&self, queued: Queued) {
        let metrics = self.hub.metrics();
        let bytes = queued.message.message().len() as u64;
        metrics.messages_out.fetch_add(1, Ordering::Relaxed);
        metrics.bytes_out.fetch_add(bytes, Ordering::Relaxed);
        self.queue.push(queued);
    }

    /// What one piece of a recovery may take of the queue: its room, less
    /// a quarter of its limits (messages, bytes).
    fn piece_room(&self) -> (usize, usize) {
        let (messages, bytes) = self.queue.room();
        let (most, most_bytes) = self.queue.limits();
        (
            messages.saturating_sub(most / 4),
            bytes.saturating_sub(most_bytes / 4),
        )
    }

    /// Queues what a subscribe read from history (`history`, for
    /// `recover`) and what was published meanwhile, and makes the member
    /// live, or catching up where a recovery does not fit the queue.
    pub(super) fn queue_joined(
        &mut self,
        channel: &ChannelName,
        format: Format,
        recover: &Recover,
        mut history: History,
    ) -> Result<Subscribed, EngineError> {
        if matches!(recover, Recover::Last(_)) {
            history.publications.reverse();
        }
        let recovered = match recover {
            Recover::Since(p) => follows(p.offset, &p.epoch, &history),
            _ => true,
        };
        if !recovered {
            history.publications.clear();
        }
        let mut replay = framed(channel, &history.publications, format);
        let empty = self.queue.is_empty();
        let position = history.position;
        let reached = history
            .publications
            .last()
            .is_none_or(|p| p.offset >= position.offset);
        let since = match recover {
            Recover::Since(p) if recovered => Some(p.offset),
            _ => None,
        };
        let catching_up = match since {
            // A replay of the last N keeps the newest that fit.
            None => {
                let fit = fitting(sizes(&replay).rev(), self.queue.room(), empty);
                drop(replay.drain(..replay.len() - fit));
                false
            }
            // A recovery that fits whole is queued whole; else it starts
            // with the oldest that fit a piece, and goes on as the client
            // reads.
            Some(_) => {
                let whole = fitting(sizes(&replay), self.queue.room(), empty) == replay.len();
                if !(whole && reached) {
                    replay.truncate(fitting(sizes(&replay), self.piece_room(), empty));
                }
                !(whole && reached)
            }
        };
        let Some(members) = self.hub.0.dispatch.members(channel) else {
            return Err(EngineError::Stopped);
        };
        let mut members = lock(&members);
        let Some(me) = members.list.iter_mut().find(|m| m.client == self.id) else {
            return Err(EngineError::Stopped);
        };
        // A recovery that failed starts from the present, whatever the
        // client claimed: an offset of another epoch (or one ahead of this
        // one) says nothing about what it has of this epoch.
        let mut last = match recover {
            Recover::Since(p) if recovered => p.offset,
            _ => position.offset,
        };
        let mut from_history = replay.len();
        for (offset, queued) in replay {
            last = last.max(offset);
            self.push_counted(queued);
        }
        let arrived = match me.joining.take().map(|j| *j) {
            Some(Joining::Reading(arrived)) => arrived,
            _ => Vec::new(),
        };
        me.epoch = position.epoch.clone();
        // A numbered publication of another epoch than history's: history
        // was lost while it was read (or the engine delivered an older
        // epoch's late). Its offsets cannot be compared with history's,
        // and guessing could skip messages: the client reconnects and
        // recovers, and is told then what was lost.
        if arrived
            .iter()
            .any(|(p, epoch)| p.offset != 0 && **epoch != *position.epoch)
        {
            self.queue.close(QueueClosed::Unavailable);
        }
        if let Some(since) = since.filter(|_| catching_up) {
            let newest = arrived.iter().map(|(p, _)| p.offset).max().unwrap_or(0);
            me.joining = Some(Box::new(Joining::CatchingUp {
                behind: newest.max(position.offset),
                read: FIRST_READ as u32,
            }));
            from_history = (position.offset - since) as usize;
        }
        for (p, _) in arrived {
            // Offset 0: not in history, so not a duplicate of it. While
            // catching up, the numbered ones come from history later.
            let new = p.offset == 0 || (!catching_up && p.offset > last);
            if new {
                last = last.max(p.offset);
                if let Some(message) = frame(channel, &p, format) {
                    let key = queue_key(channel, &p);
                    self.push_counted(Queued { message, key });
                }
            }
        }
        me.last = last;
        Ok(Subscribed {
            position,
            recovered,
            from_history,
            catching_up,
        })
    }

    /// Queues the next piece of a recovery that did not fit the queue at
    /// subscribe ([`Subscribed::catching_up`]): as many of the next
    /// messages as fit the queue's room, less a quarter of its limits
    /// (nothing while less is free). Call it whenever the connection has
    /// written what was queued, until it says `done`; then the
    /// subscription is live, with no gap and no duplicate. On an error the
    /// queue is closed (see [`CatchUpError`]).
    pub async fn catch_up(&mut self, channel: &ChannelName) -> Result<CatchUp, CatchUpError> {
        let done = CatchUp {
            queued: 0,
            done: true,
        };
        let Some(members) = self.hub.0.dispatch.members(channel) else {
            return Ok(done);
        };
        let (since, epoch, format, read) = {
            let members = lock(&members);
            match members.list.iter().find(|m| m.client == self.id) {
                Some(m) => match m.joining.as_deref() {
                    Some(Joining::CatchingUp { read, .. }) => {
                        (m.last, m.epoch.clone(), m.format, *read as usize)
                    }
                    _ => return Ok(done),
                },
                None => return Ok(done),
            }
        };
        let room = self.piece_room();
        if room.0 == 0 || room.1 == 0 {
            return Ok(CatchUp {
                queued: 0,
                done: false,
            });
        }
        let filter = HistoryFilter {
            since: Some(since),
            limit: Some(room.0.min(read.max(1))),
            reverse: false,
        };
        let result = self.hub.0.broker.history(channel.clone(), filter).await;
        let history = match result {
            Ok(history) if follows(since, &epoch, &history) => history,
            Ok(_) => return Err(self.stop(CatchUpError::Lost(since + 1))),
            Err(e) => return Err(self.stop(e.into())),
        };
        let mut replay = framed(channel, &history.publications, format);
        // Measured again: the client's other channels may have queued
        // messages while history was read.
        let fit = fitting(sizes(&replay), self.piece_room(), self.queue.is_empty());
        // Where a publication has no frame in this format, its offset
        // still counts as sent.
        let whole = fit == replay.len();
        let mut last = match (whole, history.publications.last()) {
            (true, Some(p)) => p.offset,
            _ => since,
        };
        replay.truncate(fit);
        let queued = replay.len();
        for (offset, queued) in replay {
            last = last.max(offset);
            self.push_counted(queued);
        }
        let mut members = lock(&members);
        let Some(me) = members.list.iter_mut().find(|m| m.client == self.id) else {
            return Ok(done);
        };
        me.last = last;
        let live = match me.joining.as_deref_mut() {
            Some(Joining::CatchingUp { behind, read }) => {
                *read = match whole {
                    true => read.saturating_mul(2),
                    false => u32::try_from(queued.max(1)).unwrap_or(u32::MAX),
                };
                whole && last >= *behind
            }
            _ => true,
        };
        if live {
            me.joining = None;
        }
        Ok(CatchUp { queued, done: live })
    }

    /// Closes the queue for `why`.
    fn stop(&self, why: CatchUpError) -> CatchUpError {
        let closed = match why {
            CatchUpError::Lost(_) => QueueClosed::SlowConsumer,
            CatchUpError::Engine(_) => QueueClosed::Unavailable,
        };
        self.queue.close(closed);
        why
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::Hub;
    use crate::memory::MemoryBroker;
    use crate::publication::{
        HistoryOptions, Kind, NewPublication, PublishOptions, StreamPosition,
    };
    use crate::queue::QueueLimits;

    fn keeping(size: usize) -> PublishOptions {
        PublishOptions {
            history: Some(HistoryOptions {
                size,
                ttl: Duration::from_secs(60),
            }),
            ..PublishOptions::default()
        }
    }

    /// Publishes messages whose one byte is their number; returns the epoch.
    async fn publish(
        hub: &Hub,
        channel: &ChannelName,
        numbers: std::ops::RangeInclusive<u8>,
        size: usize,
    ) -> Arc<str> {
        let mut epoch = "".into();
        for i in numbers {
            let publication = NewPublication::new(Kind::Binary, vec![i]);
            let r = hub
                .publish(channel.clone(), publication, keeping(size))
                .await
                .unwrap();
            epoch = r.position.epoch;
        }
        // The fan-out queues from a task of its own.
        tokio::task::yield_now().await;
        epoch
    }

    /// A new client with `limits`, subscribed to `channel` with a recovery
    /// of everything after offset 0 of `epoch`.
    async fn recovering(
        hub: &Hub,
        channel: &ChannelName,
        epoch: Arc<str>,
        limits: QueueLimits,
    ) -> (Client, Subscribed) {
        let mut client = hub.client(limits);
        let since = Recover::Since(StreamPosition { offset: 0, epoch });
        let s = client
            .subscribe(channel.clone(), Format::Raw, since)
            .await
            .unwrap();
        (client, s)
    }

    /// The first byte of each message waiting in `client`'s queue, taken
    /// without waiting.
    fn popped(client: &Client) -> Result<Vec<u8>, QueueClosed> {
        use std::future::Future;
        use std::task::{Context, Poll, Waker};
        let mut entries = Vec::new();
        {
            let mut pop = std::pin::pin!(client.queue().pop_all(&mut entries));
            match pop.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
                Poll::Ready(r) => r?,
                Poll::Pending => return Ok(Vec::new()),
            }
        }
        Ok(entries
            .iter()
            .flat_map(|e| e.messages())
            .map(|q| q.message.message().as_bytes()[0])
            .collect())
    }

    /// 10 missed with room for 3: the first 3 come with the subscribe, the
    /// rest piece by piece as the queue is read, and what is published
    /// meanwhile follows them: every message once, in order.
    #[tokio::test]
    async fn a_recovery_larger_than_the_queue_comes_in_pieces() {
        let hub = Hub::new(Arc::new(MemoryBroker::new()));
        let channel = ChannelName::new("feed").unwrap();
        let epoch = publish(&hub, &channel, 1..=10, 100).await;
        let limits = QueueLimits {
            messages: 3,
            ..QueueLimits::default()
        };
        let (mut client, s) = recovering(&hub, &channel, epoch, limits).await;
        assert!(s.recovered && s.catching_up);
        assert_eq!((s.from_history, s.position.offset), (10, 10));
        let mut got = popped(&client).unwrap();
        assert_eq!(got, [1, 2, 3]);
        // Published while catching up: skipped by the fan-out, read from
        // history in turn.
        publish(&hub, &channel, 11..=12, 100).await;
        assert!(client.queue().is_empty());
        let mut pieces = 0;
        loop {
            let piece = client.catch_up(&channel).await.unwrap();
            got.extend(popped(&client).unwrap());
            pieces += 1;
            if piece.done {
                break;
            }
            assert!(pieces < 10, "no end to the recovery");
        }
        assert_eq!(pieces, 3, "3 + 3 + 3 + 3 of 12");
        // Live now.
        publish(&hub, &channel, 13..=13, 100).await;
        got.extend(popped(&client).unwrap());
        assert_eq!(got, (1..=13).collect::<Vec<u8>>());
        let piece = client.catch_up(&channel).await.unwrap();
        assert_eq!((piece.queued, piece.done), (0, true));
    }

    /// A client that reads slower than history turns over: the next piece
    /// it needs is gone, and its queue closes as a slow consumer's.
    #[tokio::test]
    async fn a_recovery_overtaken_by_history_cuts_the_client_off() {
        let hub = Hub::new(Arc::new(MemoryBroker::new()));
        let channel = ChannelName::new("feed").unwrap();
        let epoch = publish(&hub, &channel, 1..=5, 5).await;
        let limits = QueueLimits {
            messages: 2,
            ..QueueLimits::default()
        };
        let (mut client, s) = recovering(&hub, &channel, epoch, limits).await;
        assert!(s.recovered && s.catching_up);
        assert_eq!(popped(&client).unwrap(), [1, 2]);
        publish(&hub, &channel, 6..=15, 5).await;
        let stopped = client.catch_up(&channel).await;
        assert!(matches!(stopped, Err(CatchUpError::Lost(3))), "{stopped:?}");
        assert_eq!(popped(&client), Err(QueueClosed::SlowConsumer));
    }

    /// A recovery from another epoch fails, and the client gets what is
    /// published next, whatever offset it claimed: the old epoch's offsets
    /// say nothing about the new one's.
    #[tokio::test]
    async fn a_failed_recovery_from_another_epoch_gets_what_comes_next() {
        let hub = Hub::new(Arc::new(MemoryBroker::new()));
        let channel = ChannelName::new("feed").unwrap();
        publish(&hub, &channel, 1..=3, 100).await;
        for (top, claimed) in [(3, 2), (4, 4), (5, 50)] {
            let mut client = hub.client(QueueLimits::default());
            let since = Recover::Since(StreamPosition {
                offset: claimed,
                epoch: "an older epoch".into(),
            });
            let s = client
                .subscribe(channel.clone(), Format::Raw, since)
                .await
                .unwrap();
            assert!(!s.recovered, "claimed {claimed}");
            assert_eq!(s.position.offset, top);
            let n = 100 + u8::try_from(top).unwrap();
            publish(&hub, &channel, n..=n, 100).await;
            assert_eq!(popped(&client).unwrap(), [n], "claimed {claimed}");
        }
    }

    #[test]
    fn fitting_counts_in_the_order_given() {
        let sizes = [4, 4, 4];
        assert_eq!(fitting(sizes.iter().copied(), (10, 8), false), 2);
        assert_eq!(fitting(sizes.iter().copied(), (1, 100), false), 1);
        // An empty queue takes one message of any size, a full one none.
        assert_eq!(fitting([9, 1].into_iter(), (10, 5), true), 1);
        assert_eq!(fitting([9, 1].into_iter(), (10, 5), false), 0);
    }

    /// A memory broker whose history reads answer 30 ms late, as a
    /// database's or a network engine's may: the fan-out runs meanwhile.
    #[derive(Debug, Default)]
    struct Slow(MemoryBroker, std::sync::Mutex<Vec<Option<usize>>>);

    impl Slow {
        /// The `limit` of each history read so far.
        fn reads(&self) -> Vec<Option<usize>> {
            self.1.lock().unwrap().clone()
        }
    }

    impl crate::engine::Broker for Slow {
        fn set_events(&self, events: Arc<dyn crate::engine::BrokerEvents>) {
            self.0.set_events(events)
        }
        fn subscribe(&self, c: ChannelName) -> crate::BoxFuture<'_, Result<(), EngineError>> {
            self.0.subscribe(c)
        }
        fn unsubscribe(&self, c: ChannelName) -> crate::BoxFuture<'_, Result<(), EngineError>> {
            self.0.unsubscribe(c)
        }
        fn publish(
            &self,
            c: ChannelName,
            p: NewPublication,
            o: PublishOptions,
        ) -> crate::BoxFuture<'_, Result<crate::publication::PublishResult, EngineError>> {
            self.0.publish(c, p, o)
        }
        fn history(
            &self,
            c: ChannelName,
            f: HistoryFilter,
        ) -> crate::BoxFuture<'_, Result<History, EngineError>> {
            self.1.lock().unwrap().push(f.limit);
            let read = self.0.history(c, f);
            Box::pin(async move {
                let history = read.await;
                tokio::time::sleep(Duration::from_millis(30)).await;
                history
            })
        }
        fn remove_history(&self, c: ChannelName) -> crate::BoxFuture<'_, Result<(), EngineError>> {
            self.0.remove_history(c)
        }
    }

    /// Reads pieces until the recovery is live, collecting what they queue.
    async fn catch_up_all(client: &mut Client, channel: &ChannelName, got: &mut Vec<u8>) {
        for _ in 0..20 {
            let piece = client.catch_up(channel).await.unwrap();
            got.extend(popped(client).unwrap());
            if piece.done {
                return;
            }
        }
        panic!("no end to the recovery");
    }

    /// A publication and then an event without an offset (a join), in one
    /// batch, while a piece is being read: the skipped publication is
    /// still read from history before the member turns live.
    #[tokio::test]
    async fn a_batch_ending_with_an_event_leaves_no_gap() {
        let hub = Hub::new(Arc::new(Slow::default()));
        let channel = ChannelName::new("feed").unwrap();
        let epoch = publish(&hub, &channel, 1..=6, 100).await;
        let limits = QueueLimits {
            messages: 5,
            ..QueueLimits::default()
        };
        let (mut client, s) = recovering(&hub, &channel, epoch, limits).await;
        assert!(s.catching_up);
        let mut got = popped(&client).unwrap();
        let publisher = hub.clone();
        let ch = channel.clone();
        let (piece, ()) = tokio::join!(client.catch_up(&channel), async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let seven = NewPublication::new(Kind::Binary, vec![7]);
            publisher
                .publish(ch.clone(), seven, keeping(100))
                .await
                .unwrap();
            let join = NewPublication::new(Kind::Join, b"{}".to_vec());
            publisher
                .publish(ch, join, PublishOptions::default())
                .await
                .unwrap();
        });
        got.extend(popped(&client).unwrap());
        if !piece.unwrap().done {
            catch_up_all(&mut client, &channel, &mut got).await;
        }
        publish(&hub, &channel, 8..=8, 100).await;
        got.extend(popped(&client).unwrap());
        assert_eq!(got, (1..=8).collect::<Vec<u8>>());
    }

    /// What another channel queues while a piece is read does not make
    /// the piece overflow the queue: a piece leaves a quarter free.
    #[tokio::test]
    async fn a_piece_leaves_room_for_other_channels() {
        let hub = Hub::new(Arc::new(Slow::default()));
        let (a, b) = (
            ChannelName::new("a").unwrap(),
            ChannelName::new("b").unwrap(),
        );
        let epoch = publish(&hub, &a, 1..=10, 100).await;
        let limits = QueueLimits {
            messages: 4,
            ..QueueLimits::default()
        };
        let mut client = hub.client(limits);
        client
            .subscribe(b.clone(), Format::Raw, Recover::Nothing)
            .await
            .unwrap();
        let since = Recover::Since(StreamPosition { offset: 0, epoch });
        let s = client
            .subscribe(a.clone(), Format::Raw, since)
            .await
            .unwrap();
        assert!(s.catching_up);
        assert_eq!(
            popped(&client).unwrap(),
            [1, 2, 3],
            "3 of 4: a quarter free"
        );
        let publisher = hub.clone();
        let (piece, ()) = tokio::join!(client.catch_up(&a), async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            publish(&publisher, &b, 100..=100, 100).await;
        });
        assert_eq!(
            piece.unwrap().queued,
            2,
            "4 less the other channel's 1, less 1"
        );
        assert_eq!(popped(&client).unwrap(), [100, 4, 5]);
    }

    /// What is published while a subscriber's history read is slow is
    /// held for it, up to what its queue takes: past that, it is cut off
    /// (to reconnect and recover) rather than held without bound.
    #[tokio::test]
    async fn a_slow_join_on_a_busy_channel_holds_at_most_a_queue() {
        let hub = Hub::new(Arc::new(Slow::default()));
        let channel = ChannelName::new("busy").unwrap();
        for (room, open) in [(10, true), (3, false)] {
            let limits = QueueLimits {
                messages: room,
                ..QueueLimits::default()
            };
            let mut client = hub.client(limits);
            let queue = client.queue().clone();
            let publisher = hub.clone();
            let busy = channel.clone();
            let (joined, cut_off_while_reading) = tokio::join!(
                client.subscribe(channel.clone(), Format::Raw, Recover::Nothing),
                async move {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    publish(&publisher, &busy, 1..=5, 100).await;
                    queue.is_closed()
                }
            );
            joined.unwrap();
            assert_eq!(cut_off_while_reading, !open, "room for {room}");
            let got = popped(&client);
            if open {
                assert_eq!(got.unwrap().len(), 5, "room for all");
            } else {
                assert_eq!(got, Err(QueueClosed::SlowConsumer));
            }
        }
    }

    /// History lost while a subscriber's history is read: what is
    /// published next counts offsets from 1 again, in a new epoch, which
    /// cannot be compared with the old epoch's. The subscriber is told to
    /// recover (its queue closes as unavailable) rather than lose those
    /// messages as "already seen".
    #[tokio::test]
    async fn an_epoch_change_during_a_join_asks_the_client_to_recover() {
        let broker = Arc::new(Slow::default());
        let hub = Hub::new(broker.clone());
        let channel = ChannelName::new("feed").unwrap();
        publish(&hub, &channel, 1..=5, 100).await;
        let mut client = hub.client(QueueLimits::default());
        let publisher = hub.clone();
        let ch = channel.clone();
        let (joined, ()) = tokio::join!(
            client.subscribe(channel.clone(), Format::Raw, Recover::Nothing),
            async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                use crate::engine::Broker;
                broker.remove_history(ch.clone()).await.unwrap();
                publish(&publisher, &ch, 1..=1, 100).await;
            }
        );
        assert_eq!(joined.unwrap().position.offset, 5, "read before the loss");
        assert_eq!(popped(&client), Err(QueueClosed::Unavailable));
    }

    /// A state-like message published while a subscriber joins is queued
    /// under the same key as the live ones, so that the next one with
    /// that key replaces it in a full queue.
    #[tokio::test]
    async fn what_arrives_during_a_join_keeps_its_queue_key() {
        let hub = Hub::new(Arc::new(Slow::default()));
        let channel = ChannelName::new("scores").unwrap();
        let keyed = |n: u8| {
            let mut p = NewPublication::new(Kind::Binary, vec![n]);
            p.key = Some("home".into());
            p
        };
        let limits = QueueLimits {
            messages: 1,
            policy: crate::queue::OverflowPolicy::LatestPerKey,
            ..QueueLimits::default()
        };
        let mut client = hub.client(limits);
        let publisher = hub.clone();
        let ch = channel.clone();
        let (joined, ()) = tokio::join!(
            client.subscribe(channel.clone(), Format::Raw, Recover::Nothing),
            async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                publisher.publish(ch, keyed(1), keeping(10)).await.unwrap();
            }
        );
        joined.unwrap();
        hub.publish(channel, keyed(2), keeping(10)).await.unwrap();
        tokio::task::yield_now().await;
        assert_eq!(popped(&client), Ok(vec![2]), "2 replaced 1");
    }

    /// An engine may skip a message that expired while it read: a piece
    /// with a hole does not follow on.
    #[test]
    fn a_piece_with_a_hole_does_not_follow() {
        let publication = |offset| Publication {
            offset,
            data: bytes::Bytes::from_static(b"x"),
            kind: Kind::Binary,
            info: None,
            time_ms: 0,
            key: None,
        };
        let history = |offsets: &[u64], top| History {
            publications: offsets.iter().map(|&o| publication(o)).collect(),
            position: StreamPosition {
                offset: top,
                epoch: "e".into(),
            },
        };
        assert!(follows(2, "e", &history(&[3, 4, 5], 9)));
        assert!(!follows(2, "e", &history(&[3, 5, 6], 9)), "a hole");
        assert!(!follows(2, "e", &history(&[4, 5], 9)), "a gap before");
        assert!(follows(9, "e", &history(&[], 9)), "nothing missed");
        assert!(!follows(2, "e", &history(&[], 9)), "all gone");
        assert!(!follows(2, "f", &history(&[3], 9)), "another epoch");
    }

    /// Where only a few large messages fit, a piece reads a few: not a
    /// queue's count of them, to keep three.
    #[tokio::test]
    async fn pieces_of_large_messages_read_what_fits() {
        let broker = Arc::new(Slow::default());
        let hub = Hub::new(broker.clone());
        let channel = ChannelName::new("feed").unwrap();
        let mut epoch = "".into();
        for i in 1..=20u8 {
            let publication = NewPublication::new(Kind::Binary, vec![i; 10]);
            let r = hub
                .publish(channel.clone(), publication, keeping(100))
                .await
                .unwrap();
            epoch = r.position.epoch;
        }
        // 40 bytes: a piece takes 30, three messages.
        let limits = QueueLimits {
            bytes: 40,
            ..QueueLimits::default()
        };
        let (mut client, s) = recovering(&hub, &channel, epoch, limits).await;
        assert!(s.catching_up);
        let mut got = popped(&client).unwrap();
        catch_up_all(&mut client, &channel, &mut got).await;
        assert_eq!(got, (1..=20).collect::<Vec<u8>>());
        let reads = broker.reads();
        assert_eq!(reads[..3], [Some(256), Some(256), Some(3)], "{reads:?}");
        assert!(reads[3..].iter().all(|r| *r <= Some(6)), "{reads:?}");
    }
}
