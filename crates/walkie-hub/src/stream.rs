//! A channel's stream kept in memory, and the idempotency keys seen: the
//! bookkeeping that the memory and durable engines share.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::publication::{
    History, HistoryFilter, NewPublication, Publication, PublishOptions, PublishResult,
    StreamPosition, new_epoch, now_ms,
};

/// One channel's history, newest last.
#[derive(Debug)]
pub(crate) struct Stream {
    pub(crate) epoch: Arc<str>,
    /// The offset of the latest publication kept (0 before the first).
    pub(crate) top: u64,
    items: VecDeque<Publication>,
    /// How long items are kept, as given by the latest publish.
    ttl: Duration,
    /// Idempotency keys seen on this channel.
    pub(crate) seen: Idempotency,
    /// The last publish or read, for evicting streams nobody uses.
    pub(crate) touched: Instant,
}

impl Stream {
    pub(crate) fn new(now: Instant) -> Self {
        Stream {
            epoch: new_epoch(),
            top: 0,
            items: VecDeque::new(),
            ttl: Duration::MAX,
            seen: Idempotency::default(),
            touched: now,
        }
    }

    pub(crate) fn position(&self) -> StreamPosition {
        StreamPosition {
            offset: self.top,
            epoch: self.epoch.clone(),
        }
    }

    /// Whether nothing is kept and nobody used the stream for `idle`: it
    /// can be forgotten (a later use starts a new epoch, as it should: the
    /// history is gone).
    pub(crate) fn is_stale(&mut self, now: Instant, idle: Duration) -> bool {
        self.expire();
        self.items.is_empty() && self.seen.is_empty(now) && now - self.touched >= idle
    }

    /// Appends a publication kept in history, dropping what falls out of
    /// the size and age limits.
    ///
    /// The payload kept is a copy: a message received in one frame shares
    /// its connection's read buffer (32 KiB or more), so keeping the slice
    /// would keep the whole buffer for as long as the history holds it, a
    /// few bytes on the wire pinning kilobytes.
    pub(crate) fn append(
        &mut self,
        mut new: NewPublication,
        options: &PublishOptions,
    ) -> Publication {
        let Some(history) = options.history else {
            return new.at(0);
        };
        new.data = bytes::Bytes::copy_from_slice(&new.data);
        self.top += 1;
        let publication = new.at(self.top);
        self.ttl = history.ttl;
        self.items.push_back(publication.clone());
        while self.items.len() > history.size.max(1) {
            self.items.pop_front();
        }
        self.expire();
        publication
    }

    /// Drops items older than the TTL.
    fn expire(&mut self) {
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        let oldest_kept = now_ms().saturating_sub(ttl_ms);
        while self.items.front().is_some_and(|p| p.time_ms < oldest_kept) {
            self.items.pop_front();
        }
    }

    pub(crate) fn read(&mut self, filter: HistoryFilter) -> History {
        self.expire();
        let since = filter.since.unwrap_or(0);
        let limit = filter.limit.unwrap_or(usize::MAX);
        let after = self.items.iter().filter(|p| p.offset > since);
        let publications = if filter.reverse {
            after.rev().take(limit).cloned().collect()
        } else {
            after.take(limit).cloned().collect()
        };
        History {
            publications,
            position: self.position(),
        }
    }
}

/// Idempotency keys seen on one channel and the results they got.
#[derive(Debug, Default)]
pub(crate) struct Idempotency {
    keys: HashMap<String, (Instant, PublishResult)>,
}

impl Idempotency {
    /// The earlier result for `key`, if it is still remembered.
    pub(crate) fn check(&mut self, key: &str, now: Instant) -> Option<PublishResult> {
        match self.keys.get(key) {
            Some((until, result)) if *until > now => Some(PublishResult {
                position: result.position.clone(),
                suppressed: true,
            }),
            Some(_) => {
                self.keys.remove(key);
                None
            }
            None => None,
        }
    }

    pub(crate) fn remember(
        &mut self,
        key: String,
        result: &PublishResult,
        ttl: Duration,
        now: Instant,
    ) {
        if self.keys.len() >= 1024 && self.keys.len().is_power_of_two() {
            self.keys.retain(|_, (until, _)| *until > now);
        }
        self.keys.insert(key, (now + ttl, result.clone()));
    }

    fn is_empty(&mut self, now: Instant) -> bool {
        self.keys.retain(|_, (until, _)| *until > now);
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publication::{HistoryOptions, Kind};

    #[test]
    fn history_keeps_its_own_copy_of_a_payload() {
        let mut stream = Stream::new(Instant::now());
        // A small message that is a slice of a large read buffer.
        let buffer = bytes::Bytes::from(vec![b'x'; 32 * 1024]);
        let payload = buffer.slice(100..101);
        let options = PublishOptions {
            history: Some(HistoryOptions {
                size: 10,
                ttl: Duration::from_secs(60),
            }),
            ..PublishOptions::default()
        };
        let kept = stream.append(NewPublication::new(Kind::Binary, payload.clone()), &options);
        assert_eq!(kept.data, payload);
        let within = buffer.as_ptr_range();
        assert!(
            !within.contains(&kept.data.as_ptr()),
            "history pins the read buffer"
        );
    }
}
