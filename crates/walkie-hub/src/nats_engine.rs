//! The NATS engine: history in JetStream, delivery over NATS, presence in
//! a key-value bucket, so that several walkie nodes act as one.
//!
//! # Design
//!
//! - **One stream per channel.** The issue asked for one stream per
//!   namespace with offsets from stream sequences, but the [`Broker`]
//!   contract (and the conformance suite) wants offsets 1, 2, 3... without
//!   gaps *per channel*, and channels sharing a stream share its sequence:
//!   each one's messages would have gaps. So each channel has its
//!   own stream, and the stream sequence *is* the offset: saving and
//!   numbering are one step in JetStream, atomic per channel, with no
//!   script and no counter of our own.
//! - **Names.** A channel's messages are published to
//!   `<prefix>.m.<hex of the channel name>` (hex: channel names may hold
//!   `.`, `*` or `>`, which are special in subjects). Its stream is found by
//!   that subject; the stream's name is `<prefix><hex>-<epoch>` (the hex
//!   cut short for long names; only the epoch has to be unique). `<prefix>`
//!   is `--engine-prefix` with every character other than a letter, a
//!   digit, `-` and `_` replaced by `_`. Buckets: `<prefix>presence`,
//!   `<prefix>idem` (idempotency keys) and `<prefix>meta` (the layout's
//!   version, see [`LAYOUT`]).
//! - **Epochs.** The epoch is a random part of the stream's name, fixed
//!   when the stream is created: the first read or publish creates it,
//!   [`Broker::remove_history`] deletes it and creates another, and a
//!   stream deleted by an operator is created again under a new epoch. A
//!   publish acknowledgement names the stream that saved the message, so a
//!   node whose cached name is stale (another node removed the history)
//!   still returns the right epoch.
//! - **Limits.** `max_msgs` is the history size; `max_age` is the longer of
//!   the history TTL and the idempotency TTL (JetStream wants the duplicate
//!   window within `max_age`). Reads drop messages older than the history
//!   TTL by their publication time, so a TTL shorter than the duplicate
//!   window, or than JetStream's age check interval, still holds. The
//!   limits in effect are kept in the stream's description; a publish that
//!   brings other limits updates the stream first. A stream made by a read
//!   trims nothing by count until then: a node with a stale cached stream
//!   may publish to it before it learns that it must apply its limits.
//! - **Idempotency.** A publish with an idempotency key sets `Nats-Msg-Id`
//!   (the key in hex); the stream's duplicate window is the idempotency
//!   TTL. A duplicate is not saved, and its acknowledgement gives the first
//!   one's sequence. A publish without history has no stream to dedup it,
//!   so its keys go to a key-value bucket (`<prefix>idem`).
//! - **Delivery.** Each stream republishes what it saves (JetStream's
//!   `RePublish`) to `<prefix>.d.<hex>`, with its stream name, sequence and
//!   previous sequence in headers; a publication without history (offset 0:
//!   presence joins and leaves, game positions) is published on that same
//!   subject over core NATS. A node subscribes to that subject only for
//!   channels with local subscribers, and delivers each channel from one
//!   task: in order, and each saved publication once (dedup by offset and
//!   epoch), from the stream's position when the node subscribed. A
//!   sequence that skips ahead of the previous one (a message dropped on
//!   the way, or sent while the connection was down) is read back from the
//!   stream before the newer one is delivered, and after a reconnect, or
//!   when the client dropped messages because a channel's task fell behind
//!   (a slow consumer: the client does not say which channel), each
//!   channel catches up from its stream, as the Redis engine does from its
//!   history. A read-back that fails is tried again until it succeeds, and
//!   nothing saved is delivered past the gap meanwhile; one that finds the
//!   missed messages trimmed cuts the channel's members off (see
//!   `delivery.rs`).
//! - **Presence** is a key-value bucket (`<prefix>presence`) whose entries
//!   expire after [`PRESENCE_TTL`](crate::PRESENCE_TTL) unless put again;
//!   each node's refresh task puts its own entries again
//!   ([`Hub::refresh_presence`](crate::Hub::refresh_presence)), so a dead
//!   node's members go away by themselves. Keys are `<hex channel>.<hex
//!   client>`; a channel's presence is read with a short-lived ordered
//!   consumer over `<hex channel>.*`, last value per key.
//!
//! # Limits
//!
//! - A stream per channel that was ever read or published to: JetStream has
//!   no expiry for whole streams, so a channel's stream stays while it is
//!   used, and [`NatsBroker::delete_idle_streams`] (run every 10 minutes by
//!   `walkie serve`) deletes those that have held nothing for a while
//!   (their history expired: the next publish starts a new epoch, as the
//!   contract says). Fine for many thousands of active channels, not for
//!   millions.
//! - Streams and buckets are made with the replicas the URL asks for
//!   (`nats://host:4222?replicas=3` on a clustered JetStream; default 1).
//!   A stream whose limits change keeps the replicas it has, so an
//!   operator may also raise them with the `nats` CLI.
//! - History is read one message per request (32 in flight): fine for the
//!   hundreds of messages a channel keeps, slow for very long histories.
//! - Limits are cached per node: when nodes publish to one channel with
//!   different history sizes or TTLs, a node that applied its own does not
//!   see that another changed them.
//! - Idempotency keys live in the stream's duplicate window, so they are
//!   forgotten when the history is removed (the memory and Redis engines
//!   keep them). Keys of publications without history are remembered for at
//!   most an hour.
//! - A publication must fit in the server's `max_payload` (1 MB by
//!   default), headers included.
//! - Needs NATS 2.9 or later with JetStream enabled.

mod delivery;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use bytes::Bytes;
use futures_util::StreamExt as _;
use tokio::sync::{OnceCell, watch};
use tokio::task::JoinHandle;

use crate::channel::ChannelName;
use crate::codec::{decode, encode};
use crate::engine::{BoxFuture, Broker, BrokerEvents, EngineError};
use crate::memory::lock;
use crate::presence::{ClientInfo, PresenceManager};
use crate::publication::{
    DEFAULT_IDEMPOTENCY_TTL, History, HistoryFilter, NewPublication, Publication, PublishOptions,
    PublishRequest, PublishResult, StreamPosition, now_ms,
};

/// How long one NATS request may take before the caller gets an error
/// (the connection keeps trying in the background).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// Messages the client buffers per channel subscription before it drops
/// them (async-nats' default); the channel then catches up from its stream.
const SUBSCRIPTION_CAPACITY: usize = 64 * 1024;

/// Publishes of a batch sent before their acknowledgements are awaited.
const BATCH_CHUNK: usize = 64;

/// Chunks of all batches in flight at once. Each publish in flight holds
/// one of the JetStream context's 5,000 permits, and a chunk takes its
/// permits one by one, waiting when none is left: with at most 2,048 held
/// by chunks, single publishes (which hold one and wait for nothing else)
/// always get room, and chunks cannot all wait on each other.
const BATCH_CHUNKS_IN_FLIGHT: usize = 32;

/// Stream reads in flight at once for one history read.
const READ_AHEAD: usize = 32;

/// How long a presence read waits for the next entry before it asks the
/// server whether any is still pending.
const PRESENCE_IDLE: Duration = Duration::from_millis(250);

/// How long keys of publications without history are remembered at most.
const LIVE_KEYS_TTL: Duration = Duration::from_secs(3600);

/// How many channels' streams a node remembers.
const MAX_KNOWN_STREAMS: usize = 100_000;

/// Longest stream name we make (JetStream keeps each stream in a directory
/// named after it).
const MAX_STREAM_NAME: usize = 200;

/// A channel's history limits, as kept in its stream's description.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Limits {
    size: i64,
    ttl_ms: u64,
    dedup_ms: u64,
}

impl Limits {
    fn of(options: &PublishOptions) -> Option<Limits> {
        let h = options.history?;
        Some(Limits {
            size: i64::try_from(h.size.max(1)).unwrap_or(i64::MAX),
            ttl_ms: millis(h.ttl).max(1),
            dedup_ms: millis(options.idempotency_ttl()).max(1000),
        })
    }

    /// For a stream created by a read, before any publish says more. It
    /// trims nothing by count (`-1`: no limit): a node whose cached stream
    /// is stale may publish to it before its first acknowledgement tells it
    /// to apply its limits, and a limit of one would keep only the last of
    /// those. What such publishes save expires after the default duplicate
    /// window at the latest, as any stream's messages must outlive theirs.
    fn initial() -> Limits {
        Limits {
            size: -1,
            ttl_ms: 0,
            dedup_ms: millis(DEFAULT_IDEMPOTENCY_TTL),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX / 4)
}

/// What the stream's description holds.
#[derive(serde::Serialize, serde::Deserialize)]
struct Description {
    walkie_channel: String,
    #[serde(flatten)]
    limits: Limits,
}

/// The limits a stream was given by a publish (`None`: only read so far,
/// or not ours).
fn limits_of(config: &stream::Config) -> Option<Limits> {
    let d: Description = serde_json::from_str(config.description.as_deref()?).ok()?;
    (d.limits.ttl_ms > 0).then_some(d.limits)
}

fn hex(s: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(s.len() * 2);
    for b in s {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn unhex(s: &str) -> Option<String> {
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// The epoch in a stream's name: what follows its last `-`.
fn epoch_of(stream: &str) -> &str {
    stream.rsplit('-').next().unwrap_or(stream)
}

/// Something went wrong in a request: the stream is gone (read the
/// channel's stream again), or the engine failed.
enum Fail {
    Gone,
    Engine(EngineError),
}

impl From<EngineError> for Fail {
    fn from(e: EngineError) -> Self {
        Fail::Engine(e)
    }
}

fn unavailable(e: impl std::fmt::Display) -> EngineError {
    EngineError::Unavailable(format!("nats: {e}"))
}

fn is_code(e: &jetstream::Error, code: jetstream::ErrorCode) -> bool {
    e.error_code() == code
}

/// Whether creating or updating a stream failed with one of `codes`.
fn refused(e: &jetstream::context::CreateStreamError, codes: &[jetstream::ErrorCode]) -> bool {
    matches!(e.kind(), jetstream::context::CreateStreamErrorKind::JetStream(j)
        if codes.contains(&j.error_code()))
}

fn stream_gone(e: &jetstream::context::GetStreamError) -> bool {
    matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
        if is_code(&j, jetstream::ErrorCode::STREAM_NOT_FOUND))
}

/// Runs a request with [`REQUEST_TIMEOUT`] (for calls that have none of
/// their own).
async fn bounded<T, E: std::fmt::Display>(
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, EngineError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(r) => r.map_err(unavailable),
        Err(_) => Err(EngineError::Unavailable(format!(
            "nats: no answer within {} s",
            REQUEST_TIMEOUT.as_secs()
        ))),
    }
}

/// An idempotency key of a publication without history, claimed for one
/// publish (see [`Inner::claim_live_key`]).
struct Claim<'a> {
    store: &'a kv::Store,
    key: String,
    /// The claim's revision: a release leaves a newer claim alone.
    revision: u64,
}

impl Claim<'_> {
    /// Gives the key up: a publication that was not sent has not used it.
    async fn release(self, channel: &ChannelName) {
        let released = self
            .store
            .delete_expect_revision(&self.key, Some(self.revision))
            .await;
        if let Err(e) = released {
            tracing::warn!(%channel, "nats engine: an idempotency key stays used by a failed publish: {e}");
        }
    }
}

/// What is known of a channel's stream on this node.
#[derive(Debug, Clone)]
struct Known {
    stream: String,
    /// The limits it was given (`None`: created by a read).
    limits: Option<Limits>,
}

/// Why delivery tasks were told to catch up from their streams, counted.
#[derive(Debug, Default, Clone, Copy)]
struct CatchUps {
    /// The connection to NATS came back.
    reconnects: u64,
    /// The client dropped messages of a subscription whose buffer was full
    /// (it does not say which channel's, so every channel catches up: a
    /// dropped message followed by none would otherwise wait for the next
    /// publish on its channel).
    slow_consumer: u64,
}

/// This node's connections to NATS, counted by the client itself: a
/// reconnect is noticed even when the client dropped its event (it sends
/// events through a channel of 128, which a burst of slow-consumer events
/// can fill).
#[derive(Debug)]
struct Connects {
    /// The client's counters, once it connected.
    stats: OnceLock<Arc<async_nats::Statistics>>,
    /// The connections already caught up after (the first: none to).
    counted: std::sync::atomic::AtomicU64,
}

impl Default for Connects {
    fn default() -> Self {
        Connects {
            stats: OnceLock::new(),
            counted: std::sync::atomic::AtomicU64::new(1),
        }
    }
}

impl Connects {
    /// Whether the client connected again since the last call that said
    /// so: each new connection is answered `true` once, to whichever of the
    /// event and the periodic check sees it first.
    fn new_connection(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(stats) = self.stats.get() else {
            return false;
        };
        let now = stats.connects.load(Relaxed);
        self.counted.fetch_max(now, Relaxed) < now
    }
}

/// How often the client's count of connections is checked, for reconnects
/// whose event was dropped.
const CONNECTS_CHECK: Duration = Duration::from_secs(1);

/// Checks the client's count of connections every [`CONNECTS_CHECK`] until
/// the broker is dropped; a reconnect no event reported makes every
/// channel catch up, as the event would have.
async fn watch_connects(inner: std::sync::Weak<Inner>) {
    let mut tick = tokio::time::interval(CONNECTS_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if inner.connects.new_connection() {
            tracing::warn!(
                "nats engine: reconnected (its event was lost); catching up from streams"
            );
            inner.catch_ups.send_modify(|n| n.reconnects += 1);
        }
    }
}

struct Inner {
    client: async_nats::Client,
    js: jetstream::Context,
    /// The prefix, made safe for subjects, stream and bucket names.
    token: String,
    events: OnceLock<Arc<dyn BrokerEvents>>,
    /// Each channel's stream, as last seen.
    streams: Mutex<HashMap<ChannelName, Known>>,
    /// The delivery task of each channel this node subscribed to.
    local: Mutex<HashMap<ChannelName, JoinHandle<()>>>,
    /// Bumped on every reconnect and slow-consumer event: each delivery
    /// task then catches up.
    catch_ups: watch::Sender<CatchUps>,
    /// Connections to NATS so far, to notice every reconnect.
    connects: Arc<Connects>,
    /// Room for the channels that catch up at once (see `delivery.rs`).
    catch_up_slots: Arc<tokio::sync::Semaphore>,
    /// Catch-ups running now, the most at once, and how many ran (tests).
    #[cfg(test)]
    resuming: delivery::Gauge,
    /// Room for the chunks of batches in flight at once (see
    /// [`BATCH_CHUNKS_IN_FLIGHT`]).
    batch_slots: tokio::sync::Semaphore,
    /// Chunks in flight now, the most at once, and how many were sent
    /// (tests).
    #[cfg(test)]
    chunks: delivery::Gauge,
    /// Idempotency keys of publications without history.
    live_keys: OnceCell<kv::Store>,
    /// Replicas of every stream and bucket made (`?replicas=N`).
    replicas: usize,
}

/// Pub/sub, history and idempotency in NATS JetStream. See [`Broker`] for
/// the contract and the module documentation for the design.
#[derive(Clone)]
pub struct NatsBroker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NatsBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBroker")
            .field("prefix", &self.inner.token)
            .finish_non_exhaustive()
    }
}

/// Splits `?replicas=N` (1 to 5, default 1) off the engine's URL.
fn replicas(url: &str) -> Result<(&str, usize), EngineError> {
    let Some((servers, query)) = url.split_once('?') else {
        return Ok((url, 1));
    };
    let bad = || {
        EngineError::Unavailable(format!(
            "{url}: the only option is `?replicas=N`, N from 1 to 5 (JetStream's limit)"
        ))
    };
    let n = query
        .strip_prefix("replicas=")
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| (1..=5).contains(n))
        .ok_or_else(bad)?;
    Ok((servers, n))
}

/// `prefix` with what subjects and stream names cannot hold replaced.
fn token(prefix: &str) -> String {
    let t: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if t.is_empty() { "walkie".into() } else { t }
}

impl NatsBroker {
    /// Connects to `url` (`nats://host:port`, or several separated by
    /// commas, optionally followed by `?replicas=N`); subjects, streams and buckets start with `prefix` (made
    /// safe: see the module documentation). Fails if the server is down or
    /// has no JetStream.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, EngineError> {
        Self::connect_with(url, prefix, SUBSCRIPTION_CAPACITY).await
    }

    /// [`NatsBroker::connect`] with `capacity` messages buffered per
    /// channel subscription before the client drops them (a slow consumer).
    pub(crate) async fn connect_with(
        url: &str,
        prefix: &str,
        capacity: usize,
    ) -> Result<Self, EngineError> {
        let (url, replicas) = replicas(url)?;
        let servers: Vec<async_nats::ServerAddr> = url
            .split(',')
            .map(|s| s.trim().parse())
            .collect::<Result<_, _>>()
            .map_err(|e| EngineError::Unavailable(format!("{url}: {e}")))?;
        let (catch_ups, _) = watch::channel(CatchUps::default());
        let notify = catch_ups.clone();
        let connects = Arc::new(Connects::default());
        let seen = connects.clone();
        let client = async_nats::ConnectOptions::new()
            .name("walkie")
            .subscription_capacity(capacity)
            .connection_timeout(Duration::from_secs(5))
            .event_callback(move |event| {
                let notify = notify.clone();
                let seen = seen.clone();
                async move {
                    match event {
                        async_nats::Event::Disconnected => {
                            tracing::warn!("nats engine: connection lost; reconnecting");
                        }
                        async_nats::Event::Connected if seen.new_connection() => {
                            tracing::info!("nats engine: reconnected; catching up from streams");
                            notify.send_modify(|n| n.reconnects += 1);
                        }
                        async_nats::Event::SlowConsumer(_) => {
                            tracing::warn!("nats engine: slow consumer; messages dropped will be read back from streams");
                            notify.send_modify(|n| n.slow_consumer += 1);
                        }
                        _ => {}
                    }
                }
            })
            .connect(servers)
            .await
            .map_err(|e| EngineError::Unavailable(format!("{url}: {e}")))?;
        let _ = connects.stats.set(client.statistics());
        let js = jetstream::ContextBuilder::new()
            .timeout(REQUEST_TIMEOUT)
            .build(client.clone());
        // The account's JetStream info (parsed loosely: its fields vary
        // across server versions), to fail now if JetStream is off.
        let account: serde_json::Value = js
            .request("INFO", "")
            .await
            .map_err(|e| EngineError::Unavailable(format!("{url}: JetStream: {e}")))?;
        if let Some(e) = account.get("error") {
            return Err(EngineError::Unavailable(format!("{url}: JetStream: {e}")));
        }
        let inner = Arc::new(Inner {
            client,
            js,
            token: token(prefix),
            events: OnceLock::new(),
            streams: Mutex::default(),
            local: Mutex::default(),
            catch_ups,
            connects,
            catch_up_slots: Arc::new(tokio::sync::Semaphore::new(delivery::MAX_CATCH_UPS)),
            #[cfg(test)]
            resuming: delivery::Gauge::default(),
            #[cfg(test)]
            chunks: delivery::Gauge::default(),
            batch_slots: tokio::sync::Semaphore::new(BATCH_CHUNKS_IN_FLIGHT),
            live_keys: OnceCell::new(),
            replicas,
        });
        inner.check_layout().await?;
        tokio::spawn(watch_connects(Arc::downgrade(&inner)));
        Ok(NatsBroker { inner })
    }

    /// Deletes the streams of channels whose history has been empty for at
    /// least `idle` (every message expired, or none ever saved): JetStream
    /// never removes a whole stream by itself. Deleting one is what expiry
    /// means anyway: the channel's next publish starts a new epoch. Safe
    /// to run on several nodes at once. Returns how many it deleted.
    pub async fn delete_idle_streams(&self, idle: Duration) -> Result<usize, EngineError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs() as i64;
        let idle = idle.as_secs() as i64;
        let is_idle = |info: &stream::Info| {
            let last = info
                .state
                .last_timestamp
                .unix_timestamp()
                .max(info.created.unix_timestamp());
            info.state.messages == 0 && now - last >= idle
        };
        let listed = self.inner.our_streams(is_idle).await?;
        // Looked at again just before it goes: listing every stream takes
        // a while, and a publish meanwhile would be deleted with its
        // stream after it was acknowledged. (A publish in the one round
        // trip between this look and the delete still can: JetStream has
        // no conditional delete.)
        let mut names = Vec::with_capacity(listed.len());
        for name in listed {
            if let Ok(stream) = self.inner.js.get_stream(&name).await {
                if is_idle(stream.cached_info()) {
                    names.push(name);
                }
            }
        }
        let deleted = self.inner.delete_streams(&names).await;
        if deleted > 0 {
            tracing::info!(deleted, "nats engine: deleted the streams of idle channels");
        }
        Ok(deleted)
    }

    /// Deletes every stream and bucket under this broker's prefix: all
    /// channels' history, presence and idempotency keys. For tests, and for
    /// retiring a prefix. Returns how many streams it deleted.
    pub async fn delete_all(&self) -> Result<usize, EngineError> {
        let i = &self.inner;
        let names = i.our_streams(|_| true).await?;
        i.delete_streams(&names).await;
        lock(&i.streams).clear();
        for bucket in [i.bucket("presence"), i.bucket("idem"), i.bucket("meta")] {
            let _ = i.js.delete_key_value(bucket).await;
        }
        Ok(names.len())
    }
}

/// The layout of what this build keeps in NATS (stream and bucket names,
/// headers, publications as `codec::encode` writes them), kept under
/// `layout` in the prefix's `meta` bucket: nodes of another layout refuse
/// to start on the same prefix instead of misreading each other. A prefix
/// used before the version was written holds layout 1.
pub const LAYOUT: u64 = 1;

impl Inner {
    /// Records [`LAYOUT`] under the prefix if none is, and fails if
    /// another is.
    async fn check_layout(&self) -> Result<(), EngineError> {
        let bucket = self.bucket("meta");
        let meta = self.open_bucket(bucket.clone(), Duration::ZERO).await?;
        let ours = LAYOUT.to_string();
        let refused = match meta.create("layout", ours.clone().into()).await {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        // Another node wrote it first. With replicas, a follower answering
        // the read may not have it yet: look a few times.
        for _ in 0..10 {
            match meta.get("layout").await.map_err(unavailable)? {
                Some(v) if v != ours.as_bytes() => {
                    return Err(EngineError::Storage(format!(
                        "the streams under this prefix are of layout {} (key `layout` of bucket {bucket}), and this walkie reads layout {LAYOUT}: run the walkie that wrote them, or give another --engine-prefix",
                        String::from_utf8_lossy(&v)
                    )));
                }
                Some(_) => return Ok(()),
                None => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        Err(unavailable(refused))
    }

    /// The names of this prefix's channel streams that `keep` selects.
    async fn our_streams(
        &self,
        keep: impl Fn(&stream::Info) -> bool,
    ) -> Result<Vec<String>, EngineError> {
        let ours = format!("{}.m.", self.token);
        let mut names = Vec::new();
        let mut streams = self.js.streams();
        while let Some(info) = streams.next().await {
            let info = info.map_err(unavailable)?;
            let mine = info
                .config
                .subjects
                .first()
                .is_some_and(|s| s.starts_with(&ours));
            if mine && keep(&info) {
                names.push(info.config.name);
            }
        }
        Ok(names)
    }

    /// Deletes streams (one already gone counts as not deleted); if any
    /// went, forgets every cached stream name: the next use finds, or
    /// makes, the stream. Returns how many it deleted.
    async fn delete_streams(&self, names: &[String]) -> usize {
        let mut deleted = 0;
        for name in names {
            if self.js.delete_stream(name).await.is_ok() {
                deleted += 1;
            }
        }
        if deleted > 0 {
            lock(&self.streams).clear();
        }
        deleted
    }
}

impl Inner {
    fn saved_subject(&self, channel: &ChannelName) -> String {
        format!("{}.m.{}", self.token, hex(channel.as_str().as_bytes()))
    }

    fn delivery_subject(&self, channel: &ChannelName) -> String {
        format!("{}.d.{}", self.token, hex(channel.as_str().as_bytes()))
    }

    fn bucket(&self, what: &str) -> String {
        format!("{}{what}", self.token)
    }

    fn new_stream_name(&self, channel: &ChannelName) -> String {
        let mut h = hex(channel.as_str().as_bytes());
        h.truncate(MAX_STREAM_NAME.saturating_sub(self.token.len() + 17));
        format!("{}{h}-{:016x}", self.token, rand::random::<u64>())
    }

    fn stream_config(&self, name: String, channel: &ChannelName, l: Limits) -> stream::Config {
        let description = Description {
            walkie_channel: channel.as_str().to_owned(),
            limits: l,
        };
        stream::Config {
            name,
            description: serde_json::to_string(&description).ok(),
            subjects: vec![self.saved_subject(channel)],
            max_messages: l.size,
            max_age: Duration::from_millis(l.ttl_ms.max(l.dedup_ms)),
            duplicate_window: Duration::from_millis(l.dedup_ms),
            republish: Some(stream::Republish {
                source: self.saved_subject(channel),
                destination: self.delivery_subject(channel),
                headers_only: false,
            }),
            storage: stream::StorageType::File,
            num_replicas: self.replicas,
            discard: stream::DiscardPolicy::Old,
            retention: stream::RetentionPolicy::Limits,
            ..Default::default()
        }
    }

    /// A key-value bucket whose entries expire `max_age` after their
    /// latest put, made (or given that `max_age`) if needed. Its stream is
    /// made here rather than by `create_key_value`, which reads account
    /// fields that NATS 2.9 does not send.
    async fn open_bucket(
        &self,
        bucket: String,
        max_age: Duration,
    ) -> Result<kv::Store, EngineError> {
        let config = stream::Config {
            name: format!("KV_{bucket}"),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: 1,
            max_age,
            storage: stream::StorageType::File,
            num_replicas: self.replicas,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        };
        match self.js.create_stream(&config).await {
            Ok(_) => {}
            Err(e) if refused(&e, &[jetstream::ErrorCode::STREAM_NAME_EXIST]) => {
                // Never shorter than another node made it: nodes started
                // with different TTLs (`--presence-ttl`) would otherwise
                // expire the entries of the node that refreshes less often
                // while its clients are connected. The longest wins.
                let mut config = config;
                let existing = self
                    .js
                    .get_stream(&config.name)
                    .await
                    .map_err(unavailable)?;
                config.max_age = config.max_age.max(existing.cached_info().config.max_age);
                self.js.update_stream(&config).await.map_err(unavailable)?;
            }
            Err(e) => return Err(unavailable(e)),
        }
        self.js.get_key_value(bucket).await.map_err(unavailable)
    }

    /// Caches a channel's stream (forgetting all once there are many: each
    /// is found again with one request).
    fn remember(&self, channel: &ChannelName, stream: String, limits: Option<Limits>) -> Known {
        let known = Known { stream, limits };
        let mut streams = lock(&self.streams);
        if streams.len() >= MAX_KNOWN_STREAMS {
            streams.clear();
        }
        streams.insert(channel.clone(), known.clone());
        known
    }

    fn forget(&self, channel: &ChannelName) {
        lock(&self.streams).remove(channel);
    }

    /// The channel's stream, created if there is none, with `want`'s
    /// limits applied if given.
    async fn ensure(
        &self,
        channel: &ChannelName,
        want: Option<Limits>,
    ) -> Result<Known, EngineError> {
        if let Some(k) = lock(&self.streams).get(channel) {
            if want.is_none() || k.limits == want {
                return Ok(k.clone());
            }
        }
        let subject = self.saved_subject(channel);
        for _ in 0..4 {
            match self.js.stream_by_subject(subject.clone()).await {
                Ok(name) => {
                    let info = match self.js.get_stream(&name).await {
                        Ok(s) => s.cached_info().clone(),
                        Err(e) if stream_gone(&e) => continue,
                        Err(e) => return Err(unavailable(e)),
                    };
                    let mut limits = limits_of(&info.config);
                    if let Some(w) = want {
                        if limits != Some(w) {
                            let mut config = self.stream_config(name.clone(), channel, w);
                            // Keep what we do not set (placement, replicas).
                            config.num_replicas = info.config.num_replicas;
                            config.placement = info.config.placement.clone();
                            config.storage = info.config.storage;
                            match self.js.update_stream(&config).await {
                                Ok(_) => {}
                                Err(e)
                                    if refused(&e, &[jetstream::ErrorCode::STREAM_NOT_FOUND]) =>
                                {
                                    continue;
                                }
                                Err(e) => return Err(unavailable(e)),
                            }
                            limits = Some(w);
                        }
                    }
                    return Ok(self.remember(channel, name, limits));
                }
                Err(e) if e.kind() == jetstream::context::GetStreamByNameErrorKind::NotFound => {
                    let name = self.new_stream_name(channel);
                    let config = self.stream_config(
                        name.clone(),
                        channel,
                        want.unwrap_or(Limits::initial()),
                    );
                    match self.js.create_stream(config).await {
                        // A server older than 2.9 ignores RePublish: nothing
                        // would be delivered.
                        Ok(s) if s.cached_info().config.republish.is_none() => {
                            let _ = self.js.delete_stream(&name).await;
                            return Err(EngineError::Unavailable(
                                "nats: the server does not republish (NATS 2.9 or later needed)"
                                    .into(),
                            ));
                        }
                        Ok(_) => return Ok(self.remember(channel, name, want)),
                        // Another node created it meanwhile: use theirs.
                        Err(e)
                            if refused(
                                &e,
                                &[
                                    jetstream::ErrorCode::STREAM_SUBJECT_OVERLAP,
                                    jetstream::ErrorCode::STREAM_NAME_EXIST,
                                ],
                            ) => {}
                        Err(e) => return Err(unavailable(e)),
                    }
                }
                Err(e) => return Err(unavailable(e)),
            }
        }
        Err(EngineError::Unavailable(format!(
            "nats: the stream of {channel} keeps changing"
        )))
    }

    /// Publications `range` of a stream, skipping those no longer kept.
    async fn fetch(
        &self,
        stream: &str,
        range: RangeInclusive<u64>,
    ) -> Result<Vec<Publication>, Fail> {
        let handle = self
            .js
            .get_stream_no_info(stream)
            .await
            .map_err(|e| Fail::Engine(unavailable(e)))?;
        let handle = &handle;
        let results: Vec<_> = futures_util::stream::iter(range)
            .map(|seq| async move { handle.get_raw_message(seq).await })
            .buffered(READ_AHEAD)
            .collect()
            .await;
        let mut out = Vec::with_capacity(results.len());
        for r in results {
            match r {
                Ok(m) => out.push(decode(m.sequence, &m.payload)?),
                Err(e) => match e.kind() {
                    stream::RawMessageErrorKind::NoMessageFound => {}
                    stream::RawMessageErrorKind::JetStream(j)
                        if is_code(&j, jetstream::ErrorCode::STREAM_NOT_FOUND) =>
                    {
                        return Err(Fail::Gone);
                    }
                    _ => return Err(Fail::Engine(unavailable(e))),
                },
            }
        }
        Ok(out)
    }

    /// Fails unless the client is connected now. A message sent while
    /// disconnected waits in the client's buffer and goes out after the
    /// reconnect, long after its publish was answered with an error: the
    /// publisher would retry and save it twice. Refused before sending
    /// instead.
    fn connected(&self) -> Result<(), EngineError> {
        if self.client.connection_state() == async_nats::connection::State::Connected {
            Ok(())
        } else {
            Err(EngineError::Unavailable("nats: not connected".into()))
        }
    }

    /// Whether the stream named `stream` exists.
    async fn stream_exists(&self, stream: &str) -> Result<bool, EngineError> {
        match self.js.get_stream(stream).await {
            Ok(_) => Ok(true),
            Err(e) if stream_gone(&e) => Ok(false),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Reads a channel's history from its stream.
    async fn read(&self, stream: &str, filter: HistoryFilter) -> Result<History, Fail> {
        let info = match self.js.get_stream(stream).await {
            Ok(s) => s.cached_info().clone(),
            Err(e) if stream_gone(&e) => return Err(Fail::Gone),
            Err(e) => return Err(Fail::Engine(unavailable(e))),
        };
        let last = info.state.last_sequence;
        let position = StreamPosition {
            offset: last,
            epoch: epoch_of(stream).into(),
        };
        let first = if info.state.messages == 0 {
            last + 1
        } else {
            info.state.first_sequence
        };
        let oldest_kept = limits_of(&info.config).map(|l| now_ms().saturating_sub(l.ttl_ms));
        let fresh = |p: &Publication| oldest_kept.is_none_or(|t| p.time_ms >= t);
        // Messages expire oldest first: what is kept starts at the first
        // fresh one, and a later one stamped older (publishers' clocks
        // differ) is kept too, as the Redis engine does, so that what is
        // returned has no gaps (a gap would cut a catching-up channel off).
        let mut found_fresh = false;
        let mut from_first_fresh = |got: &mut Vec<Publication>| {
            if !found_fresh {
                let start = got.iter().position(fresh).unwrap_or(got.len());
                got.drain(..start);
                found_fresh = !got.is_empty();
            }
        };
        let limit = filter
            .limit
            .map_or(u64::MAX, |n| u64::try_from(n).unwrap_or(u64::MAX));
        let lo = first.max(filter.since.unwrap_or(0).saturating_add(1));
        let mut publications = Vec::new();
        if limit > 0 && lo <= last {
            if filter.reverse {
                // Messages expire oldest first: the newest `limit` kept are
                // the newest `limit` sequences, less the expired ones.
                let lo = lo.max(last.saturating_sub(limit - 1));
                publications = self.fetch(stream, lo..=last).await?;
                from_first_fresh(&mut publications);
                publications.reverse();
            } else {
                let mut next = lo;
                while (publications.len() as u64) < limit && next <= last {
                    let want = (limit - publications.len() as u64).min(256);
                    let hi = last.min(next + want - 1);
                    let mut got = self.fetch(stream, next..=hi).await?;
                    from_first_fresh(&mut got);
                    publications.extend(got);
                    next = hi + 1;
                }
            }
        }
        Ok(History {
            publications,
            position,
        })
    }

    async fn history(
        &self,
        channel: &ChannelName,
        filter: HistoryFilter,
    ) -> Result<History, EngineError> {
        for _ in 0..3 {
            let known = self.ensure(channel, None).await?;
            match self.read(&known.stream, filter).await {
                Ok(h) => return Ok(h),
                Err(Fail::Gone) => self.forget(channel),
                Err(Fail::Engine(e)) => return Err(e),
            }
        }
        Err(EngineError::Unavailable(format!(
            "nats: the stream of {channel} keeps changing"
        )))
    }

    /// Claims `key` on `channel` (without history) for `ttl`; `None` if it
    /// was used within its TTL.
    async fn claim_live_key(
        &self,
        channel: &ChannelName,
        key: &str,
        ttl: Duration,
    ) -> Result<Option<Claim<'_>>, EngineError> {
        let store = self
            .live_keys
            .get_or_try_init(|| self.open_bucket(self.bucket("idem"), LIVE_KEYS_TTL))
            .await?;
        let k = format!(
            "{}.{}",
            hex(channel.as_str().as_bytes()),
            hex(key.as_bytes())
        );
        let now = now_ms();
        let until = Bytes::from((now + millis(ttl.min(LIVE_KEYS_TTL))).to_string());
        let claimed = |revision| {
            Some(Claim {
                store,
                key: k.clone(),
                revision,
            })
        };
        match store.create(&k, until.clone()).await {
            Ok(revision) => return Ok(claimed(revision)),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => return Err(unavailable(e)),
        }
        let Some(entry) = store.entry(k.clone()).await.map_err(unavailable)? else {
            return Ok(None);
        };
        let deadline: u64 = std::str::from_utf8(&entry.value)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if entry.operation == kv::Operation::Put && deadline > now {
            return Ok(None);
        }
        match store.update(&k, until, entry.revision).await {
            Ok(revision) => Ok(claimed(revision)),
            // Someone claimed it just now.
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Publishes without history: over core NATS, on the delivery subject.
    /// An idempotency key is claimed first, and given up if the message is
    /// not sent, so that a retry with it is sent rather than suppressed.
    async fn publish_live(
        &self,
        channel: &ChannelName,
        body: Bytes,
        options: &PublishOptions,
    ) -> Result<PublishResult, EngineError> {
        let known = self.ensure(channel, None).await?;
        let position = StreamPosition {
            offset: 0,
            epoch: epoch_of(&known.stream).into(),
        };
        let claim = match &options.idempotency_key {
            None => None,
            Some(key) => {
                let ttl = options.idempotency_ttl();
                let Some(claim) = self.claim_live_key(channel, key, ttl).await? else {
                    return Ok(PublishResult {
                        position,
                        suppressed: true,
                    });
                };
                Some(claim)
            }
        };
        if let Err(e) = bounded(self.client.publish(self.delivery_subject(channel), body)).await {
            if let Some(claim) = claim {
                claim.release(channel).await;
            }
            return Err(e);
        }
        Ok(PublishResult {
            position,
            suppressed: false,
        })
    }

    async fn publish(
        &self,
        channel: &ChannelName,
        new: NewPublication,
        options: &PublishOptions,
    ) -> Result<PublishResult, EngineError> {
        self.connected()?;
        let body = Bytes::from(encode(&new.at(0)));
        let Some(want) = Limits::of(options) else {
            return self.publish_live(channel, body, options).await;
        };
        let subject = self.saved_subject(channel);
        for _ in 0..3 {
            let known = self.ensure(channel, Some(want)).await?;
            let mut message = jetstream::message::PublishMessage::build().payload(body.clone());
            if let Some(key) = &options.idempotency_key {
                message = message.message_id(hex(key.as_bytes()));
            }
            let ack = match self.js.send_publish(subject.clone(), message).await {
                Ok(pending) => pending.await,
                Err(e) => Err(e),
            };
            match ack {
                Ok(ack) => {
                    if ack.stream != known.stream {
                        // The history was removed and the stream made
                        // again (by another node): give it our limits.
                        self.forget(channel);
                        if let Err(e) = self.ensure(channel, Some(want)).await {
                            tracing::warn!(%channel, "nats engine: cannot set history limits: {e}");
                        }
                    }
                    return Ok(PublishResult {
                        position: StreamPosition {
                            offset: ack.sequence,
                            epoch: epoch_of(&ack.stream).into(),
                        },
                        suppressed: ack.duplicate,
                    });
                }
                Err(e) if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound => {
                    self.forget(channel);
                }
                Err(e) => return Err(unavailable(e)),
            }
        }
        Err(EngineError::Unavailable(format!(
            "nats: the stream of {channel} keeps changing"
        )))
    }

    /// Which batches go out together (see [`Inner::publish_many`]): those
    /// of two or more requests, each with history and one set of limits
    /// per channel, which this answers.
    fn batch_limits(requests: &[PublishRequest]) -> Option<HashMap<ChannelName, Limits>> {
        let mut limits = HashMap::new();
        let together = requests.len() > 1
            && requests.iter().all(|r| match Limits::of(&r.options) {
                Some(l) => *limits.entry(r.channel.clone()).or_insert(l) == l,
                None => false,
            });
        together.then_some(limits)
    }

    /// Publishes a batch with its messages sent before their
    /// acknowledgements are awaited, [`BATCH_CHUNK`] at a time: a round
    /// trip per chunk instead of one per message. JetStream saves them in
    /// the order sent, so offsets and idempotency keys are as one at a
    /// time. A batch with a publication without history, or with two
    /// limits for one channel, goes one at a time. Each channel fails
    /// alone: one whose stream cannot be made gets its error; after a
    /// publish that failed otherwise (it may have been saved), the
    /// channel's later ones are not sent; publishes that found the
    /// channel's stream gone (saved nowhere) are published again one at a
    /// time, as `publish` would after making the stream again, unless a
    /// later one of the channel may have been saved.
    async fn publish_many(
        &self,
        requests: Vec<PublishRequest>,
        limits: HashMap<ChannelName, Limits>,
    ) -> Vec<Result<PublishResult, EngineError>> {
        let n = requests.len();
        let mut results: Vec<Option<Result<PublishResult, EngineError>>> =
            (0..n).map(|_| None).collect();
        if let Err(e) = self.connected() {
            return (0..n).map(|_| Err(e.again())).collect();
        }
        let mut known = HashMap::new();
        for (channel, l) in &limits {
            match self.ensure(channel, Some(*l)).await {
                Ok(k) => {
                    known.insert(channel.clone(), k);
                }
                Err(e) => {
                    for (i, r) in requests.iter().enumerate() {
                        if r.channel == *channel {
                            results[i] = Some(Err(e.again()));
                        }
                    }
                }
            }
        }
        let to_send: Vec<usize> = (0..n).filter(|&i| results[i].is_none()).collect();
        // Sent: saved, or failed in a way that may have saved it (its
        // channel's later requests are then not sent, as one at a time
        // would not have got to them); gone: refused, its stream deleted.
        let mut sent = vec![false; n];
        let mut gone = vec![false; n];
        let mut failed: std::collections::HashSet<ChannelName> = Default::default();
        for chunk in to_send.chunks(BATCH_CHUNK) {
            let _slot = self.batch_slots.acquire().await;
            #[cfg(test)]
            let _running = self.chunks.start();
            let mut pending = Vec::with_capacity(chunk.len());
            for &i in chunk {
                let r = &requests[i];
                if failed.contains(&r.channel) {
                    pending.push(Err(EngineError::Unavailable(format!(
                        "nats: an earlier publish of this batch to {} failed",
                        r.channel
                    ))));
                    continue;
                }
                if let Err(e) = self.connected() {
                    pending.push(Err(e));
                    continue;
                }
                let body = Bytes::from(encode(&r.publication.clone().at(0)));
                let mut message = jetstream::message::PublishMessage::build().payload(body);
                if let Some(key) = &r.options.idempotency_key {
                    message = message.message_id(hex(key.as_bytes()));
                }
                pending.push(Ok(self
                    .js
                    .send_publish(self.saved_subject(&r.channel), message)
                    .await));
            }
            // Awaited together: a connection lost mid-chunk costs one
            // timeout, not one per message.
            let acks = futures_util::future::join_all(pending.into_iter().map(|p| async move {
                match p {
                    Ok(Ok(ack)) => Ok(ack.await),
                    Ok(Err(e)) => Ok(Err(e)),
                    Err(skipped) => Err(skipped),
                }
            }))
            .await;
            for (&i, ack) in chunk.iter().zip(acks) {
                let channel = &requests[i].channel;
                let ack = match ack {
                    Err(skipped) => {
                        results[i] = Some(Err(skipped));
                        continue;
                    }
                    Ok(ack) => ack,
                };
                sent[i] = true;
                results[i] = match ack {
                    Err(e) if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound => {
                        gone[i] = true;
                        None
                    }
                    Err(e) => {
                        failed.insert(channel.clone());
                        Some(Err(unavailable(e)))
                    }
                    Ok(ack) => {
                        if known.get(channel).is_some_and(|k| k.stream != ack.stream) {
                            // Made again by another node: give it our limits.
                            known.remove(channel);
                            self.forget(channel);
                            if let Err(e) = self.ensure(channel, limits.get(channel).copied()).await
                            {
                                tracing::warn!(%channel, "nats engine: cannot set history limits: {e}");
                            }
                        }
                        Some(Ok(PublishResult {
                            position: StreamPosition {
                                offset: ack.sequence,
                                epoch: epoch_of(&ack.stream).into(),
                            },
                            suppressed: ack.duplicate,
                        }))
                    }
                };
            }
        }
        // A channel's publishes refused for its stream were saved nowhere:
        // those after the channel's last one that may have been saved are
        // published again one at a time (which makes the stream again),
        // as they would have been; one before it stays an error (saving it
        // now would put it after a later one).
        let mut channels: Vec<&ChannelName> = Vec::new();
        for i in (0..n).filter(|&i| gone[i]) {
            if !channels.contains(&&requests[i].channel) {
                channels.push(&requests[i].channel);
            }
        }
        for channel in channels {
            self.forget(channel);
            let last_saved = (0..n)
                .filter(|&i| requests[i].channel == *channel && sent[i] && !gone[i])
                .max();
            for i in (0..n).filter(|&i| gone[i] && requests[i].channel == *channel) {
                let r = &requests[i];
                results[i] = Some(if last_saved.is_none_or(|j| i > j) {
                    self.publish(&r.channel, r.publication.clone(), &r.options)
                        .await
                } else {
                    Err(EngineError::Unavailable(format!(
                        "nats: the stream of {channel} was deleted during the batch"
                    )))
                });
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(EngineError::Unavailable("nats: not sent".into()))))
            .collect()
    }

    async fn remove_history(&self, channel: &ChannelName) -> Result<(), EngineError> {
        let mut config = self.stream_config(String::new(), channel, Limits::initial());
        let mut limits = None;
        match self.js.stream_by_subject(self.saved_subject(channel)).await {
            Ok(name) => {
                if let Ok(s) = self.js.get_stream(&name).await {
                    let old = &s.cached_info().config;
                    limits = limits_of(old);
                    if let Some(l) = limits {
                        config = self.stream_config(String::new(), channel, l);
                    }
                    // What an operator may have changed.
                    config.num_replicas = old.num_replicas;
                    config.placement = old.placement.clone();
                    config.storage = old.storage;
                }
                match self.js.delete_stream(&name).await {
                    Ok(_) => {}
                    Err(e) if stream_gone(&e) => {}
                    Err(e) => return Err(unavailable(e)),
                }
            }
            Err(e) if e.kind() == jetstream::context::GetStreamByNameErrorKind::NotFound => {}
            Err(e) => return Err(unavailable(e)),
        }
        self.forget(channel);
        // A new stream now, so that the next read sees the new epoch (if a
        // publish made one meanwhile, that one is just as new).
        config.name = self.new_stream_name(channel);
        match self.js.create_stream(&config).await {
            Ok(_) => {
                self.remember(channel, config.name, limits);
                Ok(())
            }
            Err(e) if refused(&e, &[jetstream::ErrorCode::STREAM_SUBJECT_OVERLAP]) => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }
}

impl Broker for NatsBroker {
    fn reconnects(&self) -> u64 {
        self.inner.catch_ups.borrow().reconnects
    }

    /// Kept in the prefix's `meta` bucket.
    fn shared_secret(&self, name: &str) -> BoxFuture<'_, Result<Option<String>, EngineError>> {
        let key = format!("secret-{name}");
        Box::pin(async move {
            let i = &self.inner;
            let meta = i.open_bucket(i.bucket("meta"), Duration::ZERO).await?;
            let fresh = format!("{:032x}", rand::random::<u128>());
            // Refused where another node made it first: that one is read.
            let _ = meta.create(&key, fresh.into()).await;
            let value = meta.get(&key).await.map_err(unavailable)?;
            let value =
                value.ok_or_else(|| EngineError::Storage(format!("nats: {key} is gone")))?;
            Ok(Some(String::from_utf8_lossy(&value).into_owned()))
        })
    }

    fn set_events(&self, events: Arc<dyn BrokerEvents>) {
        let _ = self.inner.events.set(events);
    }

    fn subscribe(&self, channel: ChannelName) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async move {
            let i = &self.inner;
            if lock(&i.local).contains_key(&channel) {
                return Ok(());
            }
            // Taken first: a reconnect (or slow-consumer event) from now on
            // makes the task catch up.
            let catch_ups = i.catch_ups.subscribe();
            let seen = *catch_ups.borrow();
            let subscriber = bounded(i.client.subscribe(i.delivery_subject(&channel))).await?;
            // Read once subscribed (the subscription goes to the server
            // first): what the stream saves after this position arrives, or
            // is read back; what it saved up to here is not delivered again
            // by a catch-up (the hub reads history for its members itself).
            let start = i.position(&channel).await?;
            // Subscribed meanwhile: dropping this subscriber unsubscribes.
            if let std::collections::hash_map::Entry::Vacant(e) = lock(&i.local).entry(channel) {
                let task = tokio::spawn(delivery::deliver(
                    i.clone(),
                    e.key().clone(),
                    subscriber,
                    catch_ups,
                    seen,
                    start,
                ));
                e.insert(task);
            }
            Ok(())
        })
    }

    fn unsubscribe(&self, channel: ChannelName) -> BoxFuture<'_, Result<(), EngineError>> {
        // Ending the task drops its subscriber, which unsubscribes.
        if let Some(task) = lock(&self.inner.local).remove(&channel) {
            task.abort();
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn publish(
        &self,
        channel: ChannelName,
        publication: NewPublication,
        options: PublishOptions,
    ) -> BoxFuture<'_, Result<PublishResult, EngineError>> {
        Box::pin(async move { self.inner.publish(&channel, publication, &options).await })
    }

    fn publish_many(
        &self,
        requests: Vec<PublishRequest>,
    ) -> BoxFuture<'_, Vec<Result<PublishResult, EngineError>>> {
        Box::pin(async move {
            match Inner::batch_limits(&requests) {
                Some(limits) => self.inner.publish_many(requests, limits).await,
                None => crate::engine::publish_each(self, requests).await,
            }
        })
    }

    fn history(
        &self,
        channel: ChannelName,
        filter: HistoryFilter,
    ) -> BoxFuture<'_, Result<History, EngineError>> {
        Box::pin(async move { self.inner.history(&channel, filter).await })
    }

    fn remove_history(&self, channel: ChannelName) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async move { self.inner.remove_history(&channel).await })
    }
}

/// Presence in a NATS key-value bucket whose entries expire unless put
/// again. See [`PresenceManager`].
#[derive(Clone)]
pub struct NatsPresence {
    broker: NatsBroker,
    ttl: Duration,
    store: Arc<OnceCell<kv::Store>>,
}

impl std::fmt::Debug for NatsPresence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsPresence")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl NatsPresence {
    /// Presence on the broker's connection; entries live `ttl` unless added
    /// again. The bucket is made on first use.
    pub fn new(broker: &NatsBroker, ttl: Duration) -> Self {
        NatsPresence {
            broker: broker.clone(),
            ttl,
            store: Arc::default(),
        }
    }

    /// Makes (or opens) the presence bucket now: a server that cannot make
    /// it (say, `?replicas=3` on a JetStream that is not clustered) fails
    /// here, at start, rather than on the first presence call.
    pub async fn open(&self) -> Result<(), EngineError> {
        self.store().await.map(|_| ())
    }

    async fn store(&self) -> Result<&kv::Store, EngineError> {
        let i = &self.broker.inner;
        self.store
            .get_or_try_init(|| i.open_bucket(i.bucket("presence"), self.ttl))
            .await
    }
}

/// Runs its closure when dropped.
struct DropGuard<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> Drop for DropGuard<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

fn presence_key(channel: &ChannelName, client: &str) -> String {
    format!(
        "{}.{}",
        hex(channel.as_str().as_bytes()),
        hex(client.as_bytes())
    )
}

impl PresenceManager for NatsPresence {
    fn add(
        &self,
        channel: ChannelName,
        info: ClientInfo,
    ) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async move {
            let store = self.store().await?;
            let value = serde_json::json!({
                "user": info.user,
                "info": info.info.as_ref().and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok()),
            });
            store
                .put(
                    presence_key(&channel, &info.client),
                    value.to_string().into(),
                )
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }

    fn remove(
        &self,
        channel: ChannelName,
        client: String,
    ) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async move {
            let store = self.store().await?;
            store
                .delete(presence_key(&channel, &client))
                .await
                .map_err(unavailable)
        })
    }

    fn presence(
        &self,
        channel: ChannelName,
    ) -> BoxFuture<'_, Result<HashMap<String, ClientInfo>, EngineError>> {
        Box::pin(async move {
            let store = self.store().await?;
            let prefix = format!("{}{}.", store.prefix, hex(channel.as_str().as_bytes()));
            let consumer = store
                .stream
                .create_consumer(consumer::push::OrderedConfig {
                    deliver_subject: self.broker.inner.client.new_inbox(),
                    filter_subject: format!("{prefix}*"),
                    deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                    replay_policy: consumer::ReplayPolicy::Instant,
                    ..Default::default()
                })
                .await
                .map_err(unavailable)?;
            // Deleted once read, rather than left to expire.
            let (name, stream) = (consumer.cached_info().name.clone(), store.stream.clone());
            let (info_name, info_stream) = (name.clone(), stream.clone());
            let _cleanup = DropGuard(Some(move || {
                tokio::spawn(async move { stream.delete_consumer(&name).await });
            }));
            let mut out = HashMap::new();
            if consumer.cached_info().num_pending == 0 {
                return Ok(out);
            }
            let mut messages = consumer.messages().await.map_err(unavailable)?;
            let read = async {
                loop {
                    // The count the consumer started with may include
                    // entries that expire before they are delivered (a
                    // dead node's, say): when nothing comes for a while,
                    // ask the server whether anything is still pending.
                    let m = match tokio::time::timeout(PRESENCE_IDLE, messages.next()).await {
                        Ok(Some(m)) => m,
                        Ok(None) => break,
                        Err(_) => match info_stream.consumer_info(&info_name).await {
                            Ok(info) if info.num_pending == 0 => break,
                            _ => continue,
                        },
                    };
                    let m = m.map_err(unavailable)?;
                    let pending = m.info().map_or(0, |i| i.pending);
                    let op = m
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("KV-Operation"))
                        .map(|v| v.as_str().to_owned());
                    let client = m.subject.strip_prefix(prefix.as_str()).and_then(unhex);
                    if let (None, Some(client)) = (op, client) {
                        let v: serde_json::Value =
                            serde_json::from_slice(&m.payload).unwrap_or_default();
                        let info = ClientInfo {
                            client: client.clone(),
                            user: v["user"].as_str().unwrap_or("").to_owned(),
                            info: v
                                .get("info")
                                .filter(|i| !i.is_null())
                                .map(|i| Bytes::from(i.to_string())),
                        };
                        out.insert(client, info);
                    }
                    if pending == 0 {
                        break;
                    }
                }
                Ok::<_, EngineError>(())
            };
            match tokio::time::timeout(REQUEST_TIMEOUT, read).await {
                Ok(r) => r.map(|()| out),
                Err(_) => Err(EngineError::Unavailable(
                    "nats: presence not read within 3 s".into(),
                )),
            }
        })
    }
}
