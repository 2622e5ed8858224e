//! The memory engine: pub/sub and history within one process. The default
//! when history need not survive a restart, and the model the other
//! engines are tested against.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::channel::ChannelName;
use crate::engine::{BoxFuture, Broker, BrokerEvents, EngineError};
use crate::publication::{
    History, HistoryFilter, NewPublication, PublishOptions, PublishResult, StreamPosition,
};
use crate::stream::Stream;

/// How long a stream with nothing in history is remembered after its last
/// use (its epoch and offset), so that a client reconnecting soon after
/// still recovers, or learns it cannot.
const STALE_AFTER: Duration = Duration::from_secs(3600);
/// Streams are swept for staleness once per this many operations.
const SWEEP_EVERY: u64 = 4096;

/// Pub/sub and history in memory. See [`Broker`] for the contract.
#[derive(Default)]
pub struct MemoryBroker {
    streams: Mutex<HashMap<ChannelName, Arc<Mutex<Stream>>>>,
    events: OnceLock<Arc<dyn BrokerEvents>>,
    ops: AtomicU64,
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker").finish_non_exhaustive()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data behind these locks stays consistent between statements; a
    // panic elsewhere must not take every channel down with it.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl MemoryBroker {
    /// An empty broker.
    pub fn new() -> Self {
        Self::default()
    }

    fn stream(&self, channel: &ChannelName) -> Arc<Mutex<Stream>> {
        let now = Instant::now();
        let mut streams = lock(&self.streams);
        if self.ops.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            streams.retain(|_, s| !lock(s).is_stale(now, STALE_AFTER));
        }
        streams
            .entry(channel.clone())
            .or_insert_with(|| Arc::new(Mutex::new(Stream::new(now))))
            .clone()
    }

    fn publish_now(
        &self,
        channel: &ChannelName,
        new: NewPublication,
        options: &PublishOptions,
    ) -> PublishResult {
        let now = Instant::now();
        let stream = self.stream(channel);
        let mut stream = lock(&stream);
        stream.touched = now;
        if let Some(key) = &options.idempotency_key {
            if let Some(earlier) = stream.seen.check(key, now) {
                return earlier;
            }
        }
        let publication = stream.append(new, options);
        if let Some(events) = self.events.get() {
            events.handle_publication(channel, &publication, &stream.epoch);
        }
        let result = PublishResult {
            position: StreamPosition {
                offset: publication.offset,
                epoch: stream.epoch.clone(),
            },
            suppressed: false,
        };
        if let Some(key) = &options.idempotency_key {
            stream
                .seen
                .remember(key.clone(), &result, options.idempotency_ttl(), now);
        }
        result
    }
}

impl Broker for MemoryBroker {
    fn set_events(&self, events: Arc<dyn BrokerEvents>) {
        let _ = self.events.set(events);
    }

    fn subscribe(&self, _channel: ChannelName) -> BoxFuture<'_, Result<(), EngineError>> {
        // One process: every publication is delivered anyway.
        Box::pin(std::future::ready(Ok(())))
    }

    fn unsubscribe(&self, _channel: ChannelName) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn publish(
        &self,
        channel: ChannelName,
        publication: NewPublication,
        options: PublishOptions,
    ) -> BoxFuture<'_, Result<PublishResult, EngineError>> {
        let result = self.publish_now(&channel, publication, &options);
        Box::pin(std::future::ready(Ok(result)))
    }

    fn history(
        &self,
        channel: ChannelName,
        filter: HistoryFilter,
    ) -> BoxFuture<'_, Result<History, EngineError>> {
        let stream = self.stream(&channel);
        let mut stream = lock(&stream);
        stream.touched = Instant::now();
        let history = stream.read(filter);
        Box::pin(std::future::ready(Ok(history)))
    }

    fn remove_history(&self, channel: ChannelName) -> BoxFuture<'_, Result<(), EngineError>> {
        let stream = self.stream(&channel);
        let mut stream = lock(&stream);
        let seen = std::mem::take(&mut stream.seen);
        *stream = Stream::new(Instant::now());
        stream.seen = seen;
        Box::pin(std::future::ready(Ok(())))
    }
}
