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
//! A client that reads slower than the channel's history turns over finds
//! the next message it needs gone: it is cut off as a slow consumer, and
//! its next recovery says `recovered: false`.

use super::{Client, Format, Recover, Subscribed};
use crate::channel::ChannelName;
use crate::dispatch::{Joining, frame};
use crate::engine::EngineError;
use crate::memory::lock;
use crate::publication::{History, HistoryFilter, Publication};
use crate::queue::{QueueClosed, Queued};

/// One piece of a recovery, queued by [`Client::catch_up`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatchUp {
    /// Messages queued.
    pub queued: usize,
    /// Whether the subscription is live now (or gone): nothing more to
    /// catch up.
    pub done: bool,
}

/// Why a recovery stopped half way. The client's queue is closed as a
/// slow consumer's: it reconnects and recovers from where it got to.
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
/// with no gap.
fn follows(since: u64, epoch: &str, history: &History) -> bool {
    *history.position.epoch == *epoch
        && since <= history.position.offset
        && match history.publications.first() {
            Some(first) => first.offset == since + 1,
            None => since == history.position.offset,
        }
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
            let key = p.key.clone();
            Some((p.offset, Queued { message, key }))
        })
        .collect()
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
        let room = self.queue.room();
        let empty = self.queue.is_empty();
        let sizes = replay.iter().map(|(_, q)| q.message.message().len());
        // A replay of the last N keeps the newest that fit; a recovery
        // queues the oldest that fit, and the rest piece by piece.
        let fit = match recover {
            Recover::Since(_) => fitting(sizes, room, empty),
            _ => fitting(sizes.rev(), room, empty),
        };
        let whole = fit == replay.len();
        match recover {
            Recover::Since(_) => replay.truncate(fit),
            _ => drop(replay.drain(..replay.len() - fit)),
        }
        let Some(members) = self.hub.0.dispatch.members(channel) else {
            return Err(EngineError::Stopped);
        };
        let mut members = lock(&members);
        let Some(me) = members.list.iter_mut().find(|m| m.client == self.id) else {
            return Err(EngineError::Stopped);
        };
        let position = history.position;
        let mut last = match recover {
            Recover::Since(p) if !recovered => position.offset.max(p.offset),
            Recover::Since(p) => p.offset,
            _ => position.offset,
        };
        let from_history = replay.len();
        for (offset, queued) in replay {
            last = last.max(offset);
            self.queue.push(queued);
        }
        let arrived = match me.joining.take().map(|j| *j) {
            Some(Joining::Reading(arrived)) => arrived,
            _ => Vec::new(),
        };
        me.epoch = position.epoch.clone();
        let reached = history
            .publications
            .last()
            .is_none_or(|p| p.offset >= position.offset);
        if let Recover::Since(p) = recover {
            if recovered && !(whole && reached) {
                // The rest comes from history, as the client reads.
                let newest = arrived.iter().map(|p| p.offset).max().unwrap_or(0);
                me.joining = Some(Box::new(Joining::CatchingUp {
                    behind: newest.max(position.offset),
                }));
                me.last = last;
                return Ok(Subscribed {
                    recovered,
                    from_history: (position.offset - p.offset) as usize,
                    catching_up: true,
                    position,
                });
            }
        }
        for p in arrived {
            // Offset 0: not in history, so not a duplicate of it.
            if p.offset == 0 || p.offset > last {
                last = last.max(p.offset);
                if let Some(message) = frame(channel, &p, format) {
                    self.queue.push(Queued {
                        message,
                        key: p.key.clone(),
                    });
                }
            }
        }
        me.last = last;
        Ok(Subscribed {
            position,
            recovered,
            from_history,
            catching_up: false,
        })
    }

    /// Queues the next piece of a recovery that did not fit the queue at
    /// subscribe ([`Subscribed::catching_up`]): as many of the next
    /// messages as the queue has room for. Call it whenever the connection
    /// has written what was queued, until it says `done`; then the
    /// subscription is live, with no gap and no duplicate. On an error the
    /// queue is closed ([`QueueClosed::SlowConsumer`]).
    pub async fn catch_up(&mut self, channel: &ChannelName) -> Result<CatchUp, CatchUpError> {
        let done = CatchUp {
            queued: 0,
            done: true,
        };
        let Some(members) = self.hub.0.dispatch.members(channel) else {
            return Ok(done);
        };
        let (since, epoch, format) = {
            let members = lock(&members);
            match members.list.iter().find(|m| m.client == self.id) {
                Some(m) if matches!(m.joining.as_deref(), Some(Joining::CatchingUp { .. })) => {
                    (m.last, m.epoch.clone(), m.format)
                }
                _ => return Ok(done),
            }
        };
        let room = self.queue.room();
        let filter = HistoryFilter {
            since: Some(since),
            limit: Some(room.0.max(1)),
            reverse: false,
        };
        let read = self.hub.0.broker.history(channel.clone(), filter).await;
        let history = match read {
            Ok(history) if follows(since, &epoch, &history) => history,
            Ok(_) => return Err(self.stop(CatchUpError::Lost(since + 1))),
            Err(e) => return Err(self.stop(e.into())),
        };
        let mut replay = framed(channel, &history.publications, format);
        let sizes = replay.iter().map(|(_, q)| q.message.message().len());
        let fit = fitting(sizes, room, self.queue.is_empty());
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
            self.queue.push(queued);
        }
        let mut members = lock(&members);
        let Some(me) = members.list.iter_mut().find(|m| m.client == self.id) else {
            return Ok(done);
        };
        me.last = last;
        let live = match me.joining.as_deref() {
            Some(Joining::CatchingUp { behind }) => whole && last >= *behind,
            _ => true,
        };
        if live {
            me.joining = None;
        }
        Ok(CatchUp { queued, done: live })
    }

    /// Closes the queue as a slow consumer's, for `why`.
    fn stop(&self, why: CatchUpError) -> CatchUpError {
        self.queue.close(QueueClosed::SlowConsumer);
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
        let mut client = hub.client(limits);
        let since = Recover::Since(StreamPosition { offset: 0, epoch });
        let s = client
            .subscribe(channel.clone(), Format::Raw, since)
            .await
            .unwrap();
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
        let mut client = hub.client(limits);
        let since = Recover::Since(StreamPosition { offset: 0, epoch });
        let s = client
            .subscribe(channel.clone(), Format::Raw, since)
            .await
            .unwrap();
        assert!(s.recovered && s.catching_up);
        assert_eq!(popped(&client).unwrap(), [1, 2]);
        publish(&hub, &channel, 6..=15, 5).await;
        let stopped = client.catch_up(&channel).await;
        assert!(matches!(stopped, Err(CatchUpError::Lost(3))), "{stopped:?}");
        assert_eq!(popped(&client), Err(QueueClosed::SlowConsumer));
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
}
