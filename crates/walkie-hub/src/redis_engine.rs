//! The Redis engine: pub/sub and history in Redis 7, so that several
//! walkie nodes act as one.
//!
//! - A channel's history is a Redis stream whose entry ids are the offsets
//!   (`N-1`); its epoch and latest offset live in a hash. Saving to history
//!   and publishing happen in one Lua script: atomic per channel, offsets
//!   without gaps, and any node can serve recovery.
//! - Delivery is Redis pub/sub, subscribed only for channels with local
//!   subscribers, over one multiplexed RESP3 connection that reconnects and
//!   resubscribes by itself. After a reconnect, what was published
//!   meanwhile is read back from history and delivered first, so that the
//!   contract's "every publication exactly once, in order" holds across a
//!   Redis restart (as far as history covers it).
//! - Presence is a hash per channel with a per-entry expiry (a sorted set
//!   of deadlines): entries of a node that died disappear once they expire.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{PushInfo, PushKind, Script, Value};
use tokio::sync::mpsc;

use crate::channel::ChannelName;
use crate::codec::{decode, encode};
use crate::engine::{BoxFuture, Broker, BrokerEvents, EngineError};
use crate::memory::lock;
use crate::presence::{ClientInfo, PresenceManager};
use crate::publication::{
    History, HistoryFilter, NewPublication, Publication, PublishOptions, PublishRequest,
    PublishResult, StreamPosition, new_epoch, now_ms,
};

/// How long presence entries live unless refreshed.
pub const PRESENCE_TTL: Duration = Duration::from_secs(60);

const PUBLISH: &str = r"
-- KEYS: meta, stream, idempotency key ('' for none)
-- ARGV: history (0/1), size, ttl ms, meta ttl ms, pub/sub channel, body, idempotency ttl ms, fresh epoch
if KEYS[3] ~= '' then
  local seen = redis.call('GET', KEYS[3])
  if seen then return {seen, 1} end
end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[8]
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'top', 0)
  redis.call('DEL', KEYS[2])
end
local top = 0
if ARGV[1] == '1' then
  top = redis.call('HINCRBY', KEYS[1], 'top', 1)
  redis.call('HSET', KEYS[1], 'ttl', ARGV[3])
  redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], top .. '-1', 'd', ARGV[6])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
elseif redis.call('PTTL', KEYS[1]) < tonumber(ARGV[4]) then
  -- Saving nothing (a join, a leave) must not cut short the TTL that the
  -- channel's history set (PTTL is -1 for a meta just made).
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
local position = top .. ':' .. epoch
redis.call('PUBLISH', ARGV[5], position .. ':' .. ARGV[6])
if KEYS[3] ~= '' then redis.call('SET', KEYS[3], position, 'PX', ARGV[7]) end
return {position, 0}
";

/// Reads history. Messages expire oldest first, so the kept ones are those
/// from the first entry younger than the TTL on: the script starts its
/// range there (trimming the expired entries before it, so that the next
/// read need not pass them again), and a limit then counts only kept
/// messages. Filtering after `COUNT` would fill a page with expired entries
/// and return it empty. A later entry stamped older (nodes' clocks differ)
/// counts as kept, so what is returned has no gaps. An entry's time is
/// bytes 2 to 9 of its body (u64 LE; see `codec::encode`).
const HISTORY: &str = r"
-- KEYS: meta, stream
-- ARGV: first offset, count (-1: all), reverse (0/1), fresh epoch, meta ttl ms, now ms
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[4]
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'top', 0)
  redis.call('DEL', KEYS[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
end
local top = redis.call('HGET', KEYS[1], 'top')
local ttl = tonumber(redis.call('HGET', KEYS[1], 'ttl') or '0')

-- An entry's publication time; nil if its body is not ours.
local function time_of(entry)
  local body = entry[2] and entry[2][2]
  if type(body) ~= 'string' or #body < 9 then return nil end
  local t = 0
  for i = 9, 2, -1 do t = t * 256 + string.byte(body, i) end
  return t
end

-- The id of the first entry not past the TTL ('-' without a TTL, nil if
-- none is left); trims the entries before it.
local function first_kept()
  if ttl <= 0 then return '-' end
  local oldest = tonumber(ARGV[6]) - ttl
  local from, passed = '-', false
  while true do
    local batch = redis.call('XRANGE', KEYS[2], from, '+', 'COUNT', 100)
    if #batch == 0 then break end
    for _, entry in ipairs(batch) do
      local t = time_of(entry)
      if not t or t >= oldest then
        if passed then redis.call('XTRIM', KEYS[2], 'MINID', entry[1]) end
        return entry[1]
      end
      passed = true
    end
    from = '(' .. batch[#batch][1]
  end
  if passed then redis.call('DEL', KEYS[2]) end
  return nil
end

-- The range's lower bound: the first offset asked for (a decimal string,
-- kept as such: Lua's numbers are doubles), or the first kept if later.
local function lower_bound()
  local kept = first_kept()
  if not kept then return nil end
  local first = ARGV[1] .. '-1'
  if kept == '-' then return first end
  if tonumber(string.match(kept, '^%d+')) > tonumber(ARGV[1]) then return kept end
  return first
end

local entries = {}
local count = tonumber(ARGV[2])
local first = nil
if count ~= 0 then first = lower_bound() end
if first then
  local limit = {}
  if count > 0 then limit = {'COUNT', count} end
  if ARGV[3] == '1' then
    entries = redis.call('XREVRANGE', KEYS[2], '+', first, unpack(limit))
  else
    entries = redis.call('XRANGE', KEYS[2], first, '+', unpack(limit))
  end
end
return {top, epoch, entries}
";

const REMOVE: &str = r"
-- KEYS: meta, stream; ARGV: fresh epoch, meta ttl ms
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'top', 0)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
";

const PRESENCE_GET: &str = r"
-- KEYS: hash, deadlines; ARGV: now ms
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
for _, c in ipairs(gone) do
  redis.call('HDEL', KEYS[1], c)
  redis.call('ZREM', KEYS[2], c)
end
return redis.call('HGETALL', KEYS[1])
";

/// What the push listener needs.
struct Shared {
    /// Reconnections so far, for `/metrics`.
    reconnects: std::sync::atomic::AtomicU64,
    /// Told of each lost connection: wakes the task that asks for it back
    /// (see [`RedisBroker::keep_reconnecting`]).
    lost: tokio::sync::Notify,
    prefix: String,
    events: OnceLock<Arc<dyn BrokerEvents>>,
    /// Channels this node subscribed to, by pub/sub name.
    subscribed: Mutex<HashMap<String, ChannelName>>,
    /// The latest offset delivered per channel, and its epoch: what a
    /// reconnect catches up from, and what duplicates are told by.
    delivered: Mutex<HashMap<ChannelName, (Arc<str>, u64)>>,
    /// Each channel's position when this node subscribed: where a
    /// reconnect catches up from while nothing was delivered since. Kept
    /// apart from `delivered`, which it must not move: a message saved
    /// after the subscription may still be on its way to the listener.
    subscribed_at: Mutex<HashMap<ChannelName, (Arc<str>, u64)>>,
}

/// What a channel's catch-up found (see `RedisBroker::catch_up`).
enum Gap {
    /// Every missed message was read back and delivered.
    None,
    /// Some were trimmed; Redis is at this position.
    Trimmed(StreamPosition),
    /// Redis holds less than was delivered, in the same epoch.
    Behind(StreamPosition),
}

/// Pub/sub, history and presence in Redis. See [`Broker`] for the contract.
#[derive(Clone)]
pub struct RedisBroker {
    conn: ConnectionManager,
    shared: Arc<Shared>,
    publish: Arc<Script>,
    history: Arc<Script>,
    remove: Arc<Script>,
    presence_get: Arc<Script>,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field("prefix", &self.shared.prefix)
            .finish_non_exhaustive()
    }
}

fn unavailable(e: redis::RedisError) -> EngineError {
    EngineError::Unavailable(format!("redis: {e}"))
}

/// How long one Redis request may take, reconnecting included, before the
/// caller gets an error instead of waiting (a publish while Redis is down
/// fails fast; the connection keeps trying in the background).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs a Redis request with [`REQUEST_TIMEOUT`].
async fn bounded<T>(
    f: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, EngineError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(r) => r.map_err(unavailable),
        Err(_) => Err(EngineError::Unavailable(
            "redis: no answer within 3 s".into(),
        )),
    }
}

fn meta_ttl_ms(history_ttl: Duration) -> u64 {
    // The epoch and offset outlive the messages, so that a client coming
    // back after the history expired learns that it cannot recover rather
    // than starting again silently; a day more, at least.
    let ms = u64::try_from(history_ttl.as_millis()).unwrap_or(u64::MAX / 4);
    ms.saturating_mul(2).max(24 * 3600 * 1000)
}

fn bytes_of(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn int_of(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        other => std::str::from_utf8(bytes_of(other)?).ok()?.parse().ok(),
    }
}

/// `"offset:epoch"`.
fn parse_position(s: &[u8]) -> Option<StreamPosition> {
    let s = std::str::from_utf8(s).ok()?;
    let (offset, epoch) = s.split_once(':')?;
    Some(StreamPosition {
        offset: offset.parse().ok()?,
        epoch: epoch.into(),
    })
}

/// All kept publications after offset `since` (all kept ones if `None`).
fn after(since: Option<u64>) -> HistoryFilter {
    HistoryFilter {
        since,
        limit: None,
        reverse: false,
    }
}

/// Stream entries `[[id, [field, value]], ...]` as publications.
fn entries(v: &Value) -> Result<Vec<Publication>, EngineError> {
    let corrupt = || EngineError::Storage("unexpected stream entry from redis".into());
    let Value::Array(list) = v else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(list.len());
    for entry in list {
        let Value::Array(parts) = entry else {
            return Err(corrupt());
        };
        let (Some(id), Some(Value::Array(fields))) = (parts.first(), parts.get(1)) else {
            return Err(corrupt());
        };
        let id = std::str::from_utf8(bytes_of(id).ok_or_else(corrupt)?).map_err(|_| corrupt())?;
        let offset: u64 = id
            .split('-')
            .next()
            .and_then(|o| o.parse().ok())
            .ok_or_else(corrupt)?;
        let body = fields.get(1).and_then(bytes_of).ok_or_else(corrupt)?;
        out.push(decode(offset, body)?);
    }
    Ok(out)
}

/// The layout of the keys this build reads and writes (their names, the
/// scripts' fields, publications as `codec::encode` writes them), kept
/// under `PREFIX layout`: nodes of another layout refuse to start on the
/// same prefix instead of misreading each other. A prefix used before the
/// version was written holds layout 1.
pub const LAYOUT: u64 = 1;

/// Records [`LAYOUT`] under `prefix` if none is, and fails if another is.
async fn check_layout(conn: &mut ConnectionManager, prefix: &str) -> Result<(), EngineError> {
    let key = format!("{prefix}layout");
    let found: Option<String> = redis::cmd("SET")
        .arg(&key)
        .arg(LAYOUT)
        .arg("NX")
        .arg("GET")
        .query_async(conn)
        .await
        .map_err(unavailable)?;
    match found {
        None => Ok(()),
        Some(v) if v == LAYOUT.to_string() => Ok(()),
        Some(v) => Err(EngineError::Storage(format!(
            "the keys under prefix {prefix:?} are of layout {v} (key {key}), and this walkie reads layout {LAYOUT}: run the walkie that wrote them, or give another --engine-prefix"
        ))),
    }
}

impl RedisBroker {
    /// Connects to `url` (`redis://host:port/db`); keys start with `prefix`.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, EngineError> {
        let info: redis::ConnectionInfo = redis::IntoConnectionInfo::into_connection_info(url)
            .map_err(|e| EngineError::Unavailable(format!("{url}: {e}")))?;
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        let info = info.set_redis_settings(settings);
        let client = redis::Client::open(info).map_err(unavailable)?;
        let (tx, rx) = mpsc::unbounded_channel::<PushInfo>();
        let config = ConnectionManagerConfig::new()
            .set_push_sender(tx)
            .set_automatic_resubscription()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(5)));
        let conn = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(unavailable)?;
        check_layout(&mut conn.clone(), prefix).await?;
        let shared = Arc::new(Shared {
            reconnects: std::sync::atomic::AtomicU64::new(0),
            lost: tokio::sync::Notify::new(),
            prefix: prefix.to_owned(),
            events: OnceLock::new(),
            subscribed: Mutex::default(),
            delivered: Mutex::default(),
            subscribed_at: Mutex::default(),
        });
        let broker = RedisBroker {
            conn,
            shared,
            publish: Arc::new(Script::new(PUBLISH)),
            history: Arc::new(Script::new(HISTORY)),
            remove: Arc::new(Script::new(REMOVE)),
            presence_get: Arc::new(Script::new(PRESENCE_GET)),
        };
        tokio::spawn(broker.clone().listen(rx));
        tokio::spawn(broker.clone().keep_reconnecting());
        Ok(broker)
    }

    fn key(&self, kind: &str, channel: &str) -> String {
        format!("{}{kind}:{channel}", self.shared.prefix)
    }

    /// Where an idempotency key of `channel` is remembered. Both names may
    /// hold `:`, so the channel goes in with its length in front: `a:b` on
    /// `room` (`i:4:room:a:b`) and `b` on `room:a` (`i:6:room:a:b`) are two
    /// keys, not one.
    fn idempotency_key(&self, channel: &ChannelName, key: &str) -> String {
        let channel = channel.as_str();
        self.key("i", &format!("{}:{channel}:{key}", channel.len()))
    }

    /// Handles pushes: messages are delivered; after a disconnection the
    /// next subscription confirmation triggers a catch-up from history.
    async fn listen(self, mut rx: mpsc::UnboundedReceiver<PushInfo>) {
        let mut behind = false;
        while let Some(push) = rx.recv().await {
            match push.kind {
                PushKind::Disconnection => {
                    tracing::warn!("redis engine: connection lost; reconnecting");
                    behind = true;
                    self.shared.lost.notify_one();
                }
                PushKind::Subscribe if behind => {
                    behind = false;
                    tracing::info!("redis engine: reconnected; catching up from history");
                    self.shared
                        .reconnects
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.catch_up().await;
                }
                PushKind::Message => {
                    let (Some(name), Some(payload)) = (
                        push.data.first().and_then(bytes_of),
                        push.data.get(1).and_then(bytes_of),
                    ) else {
                        continue;
                    };
                    let name = String::from_utf8_lossy(name).into_owned();
                    self.deliver_raw(&name, payload);
                }
                _ => {}
            }
        }
    }

    /// Asks for the connection until it is back. The connection manager
    /// retries a lost connection for a few seconds only, and after that
    /// reconnects when a request needs it: a node that only receives makes
    /// none, and would stay cut off after a longer outage. A ping every few
    /// seconds is that request; once one is answered, the connection (and
    /// its subscriptions, which bring the catch-up) is back.
    ///
    /// One task for the broker's life (as the listener's), woken by each
    /// lost connection; a loss told while it pings leaves a wake-up behind
    /// (`Notify` keeps one), so the next round checks again.
    async fn keep_reconnecting(self) {
        let mut conn = self.conn.clone();
        loop {
            self.shared.lost.notified().await;
            let mut wait = Duration::from_millis(250);
            loop {
                tokio::time::sleep(wait).await;
                let ping = redis::cmd("PING");
                if bounded(ping.query_async::<()>(&mut conn)).await.is_ok() {
                    break;
                }
                wait = (wait * 2).min(Duration::from_secs(4));
            }
        }
    }

    /// Delivers one pub/sub message `offset:epoch:body`.
    fn deliver_raw(&self, pubsub: &str, payload: &[u8]) {
        let Some(channel) = lock(&self.shared.subscribed).get(pubsub).cloned() else {
            return;
        };
        let mut parts = payload.splitn(3, |b| *b == b':');
        let (Some(offset), Some(epoch), Some(body)) = (parts.next(), parts.next(), parts.next())
        else {
            return;
        };
        let (Some(offset), Ok(epoch)) = (
            std::str::from_utf8(offset)
                .ok()
                .and_then(|o| o.parse::<u64>().ok()),
            std::str::from_utf8(epoch),
        ) else {
            return;
        };
        let Ok(publication) = decode(offset, body) else {
            return;
        };
        self.deliver(&channel, &publication, epoch);
    }

    /// Hands a publication to the hub once: saved ones in offset order,
    /// skipping any the catch-up delivered already.
    fn deliver(&self, channel: &ChannelName, publication: &Publication, epoch: &str) {
        if publication.offset != 0 {
            let mut delivered = lock(&self.shared.delivered);
            let last = delivered
                .entry(channel.clone())
                .or_insert_with(|| (epoch.into(), 0));
            if *last.0 == *epoch && publication.offset <= last.1 {
                return;
            }
            *last = (epoch.into(), publication.offset);
        }
        if let Some(events) = self.shared.events.get() {
            events.handle_publication(channel, publication, epoch);
        }
    }

    /// After a reconnect: delivers what each subscribed channel saved while
    /// the pub/sub connection was down. A channel whose missed messages
    /// cannot all be read (Redis failed again, or trimmed some meanwhile,
    /// or came back with less than was delivered) is not delivered past
    /// the gap: its members here are cut off to reconnect and recover
    /// (`BrokerEvents::channel_unavailable`), and it goes on from the
    /// position read, or, if the read failed, from where it was.
    async fn catch_up(&self) {
        let channels: Vec<ChannelName> = lock(&self.shared.subscribed).values().cloned().collect();
        for channel in channels {
            let why = match self.catch_up_channel(&channel).await {
                Ok(Gap::None) => continue,
                Ok(Gap::Trimmed(at)) => {
                    lock(&self.shared.delivered).insert(channel.clone(), (at.epoch, at.offset));
                    "some of the missed messages are no longer kept".to_owned()
                }
                Ok(Gap::Behind(at)) => {
                    lock(&self.shared.delivered).insert(channel.clone(), (at.epoch, at.offset));
                    format!(
                        "redis holds offset {} in the same epoch, less than was delivered",
                        at.offset
                    )
                }
                Err(e) => e.to_string(),
            };
            tracing::warn!(%channel, "redis engine: catch-up failed: {why}");
            if let Some(events) = self.shared.events.get() {
                events.channel_unavailable(&channel);
            }
        }
    }

    /// Delivers what `channel` saved after the latest publication delivered,
    /// unless some of it is no longer kept. In a new epoch (the history was
    /// lost meanwhile: removed, expired, or Redis came back without it)
    /// that offset means nothing, and the new stream's messages up to it
    /// would be skipped: everything the new epoch kept is delivered
    /// instead, from its start.
    async fn catch_up_channel(&self, channel: &ChannelName) -> Result<Gap, EngineError> {
        let since = lock(&self.shared.delivered).get(channel).cloned();
        let since = since.or_else(|| lock(&self.shared.subscribed_at).get(channel).cloned());
        let mut h = self
            .read_history(channel, after(since.as_ref().map(|(_, o)| *o)))
            .await?;
        let mut from = since.as_ref().map_or(0, |(_, o)| *o);
        // An empty epoch: the channel had none when this node subscribed,
        // and offset 0 is the start of any.
        if since
            .as_ref()
            .is_some_and(|(e, _)| !e.is_empty() && **e != *h.position.epoch)
        {
            tracing::warn!(%channel, "redis engine: history lost while disconnected (new epoch)");
            h = self.read_history(channel, after(None)).await?;
            from = 0;
        }
        if h.position.offset < from {
            // Redis went back (a restart from an older snapshot): its next
            // offsets are ones already delivered, which would be dropped as
            // duplicates.
            return Ok(Gap::Behind(h.position));
        }
        // Saved after `from` but not read back: trimmed by size or TTL. A
        // channel first seen here (nothing delivered yet) has no gap.
        let first = h.publications.first().map(|p| p.offset);
        let complete = since.is_none() || h.position.offset == from || first == Some(from + 1);
        if !complete {
            return Ok(Gap::Trimmed(h.position));
        }
        for p in &h.publications {
            self.deliver(channel, p, &h.position.epoch);
        }
        Ok(Gap::None)
    }

    async fn read_history(
        &self,
        channel: &ChannelName,
        filter: HistoryFilter,
    ) -> Result<History, EngineError> {
        let first = filter.since.unwrap_or(0).saturating_add(1);
        let count: i64 = match filter.limit {
            None => -1,
            Some(n) => i64::try_from(n).unwrap_or(i64::MAX),
        };
        // XREVRANGE + <end>: `first` is the lower bound here too.
        let reverse = if filter.reverse { "1" } else { "0" };
        let mut conn = self.conn.clone();
        let v: Value = bounded(
            self.history
                .key(self.key("m", channel.as_str()))
                .key(self.key("s", channel.as_str()))
                .arg(first)
                .arg(count)
                .arg(reverse)
                .arg(&*new_epoch())
                .arg(meta_ttl_ms(Duration::from_secs(24 * 3600)))
                .arg(now_ms())
                .invoke_async(&mut conn),
        )
        .await?;
        let Value::Array(parts) = v else {
            return Err(EngineError::Storage(
                "unexpected history reply from redis".into(),
            ));
        };
        let top = parts.first().and_then(int_of).unwrap_or(0);
        let epoch: Arc<str> = parts
            .get(1)
            .and_then(bytes_of)
            .map(|b| String::from_utf8_lossy(b).into())
            .unwrap_or_else(|| "".into());
        // Expired entries were skipped by the script (the stream key itself
        // expires only when nothing was published for a whole TTL).
        let publications = parts.get(2).map(entries).transpose()?.unwrap_or_default();
        Ok(History {
            publications,
            position: StreamPosition { offset: top, epoch },
        })
    }
}

impl RedisBroker {
    /// The publish script's call for one publication.
    fn publish_invocation(
        &self,
        channel: &ChannelName,
        new: NewPublication,
        options: &PublishOptions,
    ) -> redis::ScriptInvocation<'_> {
        let publication = new.at(0);
        let body = encode(&publication);
        let (history, size, ttl) = match options.history {
            Some(h) => (1, h.size.max(1), h.ttl),
            None => (0, 1, Duration::from_secs(1)),
        };
        let idem = match &options.idempotency_key {
            Some(k) => self.idempotency_key(channel, k),
            None => String::new(),
        };
        let mut invocation = self.publish.prepare_invoke();
        invocation
            .key(self.key("m", channel.as_str()))
            .key(self.key("s", channel.as_str()))
            .key(idem)
            .arg(history)
            .arg(size)
            .arg(
                u64::try_from(ttl.as_millis())
                    .unwrap_or(u64::MAX / 4)
                    .max(1),
            )
            .arg(meta_ttl_ms(ttl))
            .arg(self.key("p", channel.as_str()))
            .arg(body)
            .arg(u64::try_from(options.idempotency_ttl().as_millis()).unwrap_or(u64::MAX / 4))
            .arg(&*new_epoch());
        invocation
    }
}

/// `n` results, each the failure `e`.
fn every(n: usize, e: &EngineError) -> Vec<Result<PublishResult, EngineError>> {
    (0..n).map(|_| Err(e.again())).collect()
}

/// The publish script's reply: the position, and whether the publication
/// was suppressed by its idempotency key.
fn publish_result(v: Value) -> Result<PublishResult, EngineError> {
    let bad = || EngineError::Storage("unexpected publish reply from redis".into());
    let Value::Array(parts) = v else {
        return Err(bad());
    };
    let position = parts
        .first()
        .and_then(bytes_of)
        .and_then(parse_position)
        .ok_or_else(bad)?;
    let suppressed = parts.get(1).and_then(int_of) == Some(1);
    Ok(PublishResult {
        position,
        suppressed,
    })
}

impl Broker for RedisBroker {
    /// Pub/sub messages arrive on the connection's own task, wherever the
    /// broker was connected (the main thread of `walkie serve`).
    fn delivers_from_own_thread(&self) -> bool {
        true
    }

    /// Kept in Redis with no expiry.
    fn shared_secret(&self, name: &str) -> BoxFuture<'_, Result<Option<String>, EngineError>> {
        let key = self.key("secret", name);
        Box::pin(async move {
            let fresh = format!("{:032x}", rand::random::<u128>());
            let mut conn = self.conn.clone();
            let set = redis::cmd("SET").arg(&key).arg(&fresh).arg("NX").clone();
            bounded(set.query_async::<Option<String>>(&mut conn)).await?;
            let get = redis::cmd("GET").arg(&key).clone();
            bounded(get.query_async::<Option<String>>(&mut conn))
                .await?
                .map(Some)
                .ok_or_else(|| EngineError::Storage(format!("redis: {key} is gone")))
        })
    }

    fn reconnects(&self) -> u64 {
        self.shared
            .reconnects
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn set_events(&self, events: Arc<dyn BrokerEvents>) {
        let _ = self.shared.events.set(events);
    }

    fn subscribe(&self, channel: ChannelName) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async move {
            let name = self.key("p", channel.as_str());
            lock(&self.shared.subscribed).insert(name.clone(), channel.clone());
            let mut conn = self.conn.clone();
            if let Err(e) = bounded(conn.subscribe(&name)).await {
                // The hub counts the channel as not subscribed: neither do
                // the listener and the catch-up.
                lock(&self.shared.subscribed).remove(&name);
                return Err(e);
            }
            // Without it, a reconnect before the channel's next message
            // would deliver its whole history again (to be dropped by the
            // hub as duplicates, at a cost), and could not tell that what
            // it missed was trimmed meanwhile. A channel with no epoch yet
            // is at offset 0 of whichever epoch it gets (the empty one).
            let meta = self.key("m", channel.as_str());
            let read = redis::cmd("HMGET")
                .arg(&meta)
                .arg("epoch")
                .arg("top")
                .clone();
            match bounded(read.query_async::<(Option<String>, Option<u64>)>(&mut conn)).await {
                Ok((Some(epoch), Some(top))) => {
                    lock(&self.shared.subscribed_at).insert(channel, (epoch.into(), top));
                }
                Ok(_) => {
                    lock(&self.shared.subscribed_at).insert(channel, ("".into(), 0));
                }
                Err(e) => tracing::debug!(%channel, "redis engine: position not read: {e}"),
            }
            Ok(())
        })
    }

    fn unsubscribe(&self, channel: ChannelName) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async move {
            let name = self.key("p", channel.as_str());
            lock(&self.shared.subscribed).remove(&name);
            lock(&self.shared.delivered).remove(&channel);
            lock(&self.shared.subscribed_at).remove(&channel);
            let mut conn = self.conn.clone();
            bounded(conn.unsubscribe(&name)).await
        })
    }

    fn publish(
        &self,
        channel: ChannelName,
        new: NewPublication,
        options: PublishOptions,
    ) -> BoxFuture<'_, Result<PublishResult, EngineError>> {
        Box::pin(async move {
            let invocation = self.publish_invocation(&channel, new, &options);
            let mut conn = self.conn.clone();
            publish_result(bounded(invocation.invoke_async(&mut conn)).await?)
        })
    }

    /// All the requests in one pipeline: one round trip instead of one per
    /// request. Redis runs the scripts one after another in order, each
    /// atomic, so the results are those of publishing them one at a time.
    /// The pipeline loads the script first: a Redis that restarted (or
    /// flushed its scripts) would otherwise refuse every one.
    fn publish_many(
        &self,
        requests: Vec<PublishRequest>,
    ) -> BoxFuture<'_, Vec<Result<PublishResult, EngineError>>> {
        Box::pin(async move {
            if requests.len() < 2 {
                return crate::engine::publish_each(self, requests).await;
            }
            let n = requests.len();
            let invocations: Vec<_> = requests
                .into_iter()
                .map(|r| self.publish_invocation(&r.channel, r.publication, &r.options))
                .collect();
            let mut pipe = redis::pipe();
            pipe.ignore_errors().load_script(&self.publish);
            for invocation in &invocations {
                pipe.invoke_script(invocation);
            }
            let mut conn = self.conn.clone();
            let replies: Result<Vec<redis::RedisResult<Value>>, _> =
                bounded(pipe.query_async(&mut conn)).await;
            match replies {
                Ok(replies) if replies.len() == n + 1 => replies
                    .into_iter()
                    .skip(1)
                    .map(|r| publish_result(r.map_err(unavailable)?))
                    .collect(),
                Ok(replies) => {
                    let e = EngineError::Storage(format!(
                        "redis answered {} replies to a pipeline of {}",
                        replies.len(),
                        n + 1
                    ));
                    every(n, &e)
                }
                Err(e) => every(n, &e),
            }
        })
    }

    fn history(
        &self,
        channel: ChannelName,
        filter: HistoryFilter,
    ) -> BoxFuture<'_, Result<History, EngineError>> {
        Box::pin(async move { self.read_history(&channel, filter).await })
    }

    fn remove_history(&self, channel: ChannelName) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let _: Value = bounded(
                self.remove
                    .key(self.key("m", channel.as_str()))
                    .key(self.key("s", channel.as_str()))
                    .arg(&*new_epoch())
                    .arg(meta_ttl_ms(Duration::from_secs(24 * 3600)))
                    .invoke_async(&mut conn),
            )
            .await?;
            Ok(())
        })
    }
}

/// Presence in Redis, with per-entry expiry. See [`PresenceManager`].
#[derive(Clone)]
pub struct RedisPresence {
    broker: RedisBroker,
    ttl: Duration,
}

impl std::fmt::Debug for RedisPresence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisPresence")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl RedisPresence {
    /// Presence on the broker's connection; entries live `ttl` unless added
    /// again.
    pub fn new(broker: &RedisBroker, ttl: Duration) -> Self {
        RedisPresence {
            broker: broker.clone(),
            ttl,
        }
    }
}

fn info_json(info: &ClientInfo) -> String {
    serde_json::json!({
        "user": info.user,
        "info": info.info.as_ref().and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok()),
    })
    .to_string()
}

impl PresenceManager for RedisPresence {
    fn add(
        &self,
        channel: ChannelName,
        info: ClientInfo,
    ) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async move {
            let b = &self.broker;
            let (hash, zset) = (b.key("ph", channel.as_str()), b.key("pz", channel.as_str()));
            let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(60_000);
            let mut conn = b.conn.clone();
            bounded(
                redis::pipe()
                    .atomic()
                    .hset(&hash, &info.client, info_json(&info))
                    .ignore()
                    .zadd(&zset, &info.client, now_ms() + ttl_ms)
                    .ignore()
                    .pexpire(&hash, (ttl_ms * 2) as i64)
                    .ignore()
                    .pexpire(&zset, (ttl_ms * 2) as i64)
                    .ignore()
                    .query_async::<()>(&mut conn),
            )
            .await
        })
    }

    fn remove(
        &self,
        channel: ChannelName,
        client: String,
    ) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async move {
            let b = &self.broker;
            let mut conn = b.conn.clone();
            bounded(
                redis::pipe()
                    .atomic()
                    .hdel(b.key("ph", channel.as_str()), &client)
                    .ignore()
                    .zrem(b.key("pz", channel.as_str()), &client)
                    .ignore()
                    .query_async::<()>(&mut conn),
            )
            .await
        })
    }

    fn presence(
        &self,
        channel: ChannelName,
    ) -> BoxFuture<'_, Result<HashMap<String, ClientInfo>, EngineError>> {
        Box::pin(async move {
            let b = &self.broker;
            let mut conn = b.conn.clone();
            let v: Value = bounded(
                b.presence_get
                    .key(b.key("ph", channel.as_str()))
                    .key(b.key("pz", channel.as_str()))
                    .arg(now_ms())
                    .invoke_async(&mut conn),
            )
            .await?;
            let pairs: Vec<(&[u8], &[u8])> = match &v {
                Value::Map(m) => m
                    .iter()
                    .filter_map(|(k, v)| Some((bytes_of(k)?, bytes_of(v)?)))
                    .collect(),
                Value::Array(a) => a
                    .chunks(2)
                    .filter_map(|kv| Some((bytes_of(kv.first()?)?, bytes_of(kv.get(1)?)?)))
                    .collect(),
                _ => Vec::new(),
            };
            let mut out = HashMap::new();
            for (client, json) in pairs {
                let client = String::from_utf8_lossy(client).into_owned();
                let v: serde_json::Value = serde_json::from_slice(json).unwrap_or_default();
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
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::Recorder;

    /// A broker on a prefix of its own, and the Redis URL; `None` (after
    /// saying the test was skipped) without `WALKIE_TEST_REDIS`.
    async fn test_broker() -> Option<(RedisBroker, String)> {
        let url = crate::conformance::service_url("WALKIE_TEST_REDIS", "a redis engine test")?;
        let prefix = crate::conformance::test_prefix();
        let broker = RedisBroker::connect(&url, &prefix).await.unwrap();
        Some((broker, url))
    }

    #[tokio::test]
    async fn a_prefix_of_another_layout_is_refused() {
        use redis::AsyncCommands;
        let Some((broker, url)) = test_broker().await else {
            return;
        };
        let prefix = broker.shared.prefix.clone();
        let key = format!("{prefix}layout");
        let mut conn = broker.conn.clone();
        let found: Option<String> = conn.get(&key).await.unwrap();
        assert_eq!(
            found.as_deref(),
            Some("1"),
            "a new prefix records its layout"
        );
        // Another node of the same layout starts on it.
        RedisBroker::connect(&url, &prefix).await.unwrap();
        let _: () = conn.set(&key, LAYOUT + 1).await.unwrap();
        match RedisBroker::connect(&url, &prefix).await {
            Err(EngineError::Storage(m)) => assert!(m.contains("of layout 2"), "{m}"),
            other => panic!("started on keys of another layout: {other:?}"),
        }
        let _: () = conn.del(&key).await.unwrap();
    }

    /// Kept in a history of `size` messages for `ttl`.
    fn kept(size: usize, ttl: Duration) -> PublishOptions {
        PublishOptions {
            history: Some(crate::HistoryOptions { size, ttl }),
            ..PublishOptions::default()
        }
    }

    /// The history script reads a publication's time from bytes 1 to 8 of
    /// its encoding (u64 LE): a change of layout must change the script.
    #[test]
    fn encoded_time_is_where_the_history_script_reads_it() {
        let mut p = NewPublication::text("x").at(0);
        p.key = Some("k".into());
        p.time_ms = 0x0102_0304_0506_0708;
        assert_eq!(encode(&p)[1..9], p.time_ms.to_le_bytes());
    }

    /// Redis after losing a channel's history (a restart without it, an
    /// eviction) while this node was cut off, and two messages published
    /// meanwhile in a new epoch: its stream and meta as the scripts write
    /// them, with no pub/sub message.
    async fn lose_history_and_save_two(url: &str, b: &RedisBroker, ch: &ChannelName) {
        let (meta, stream) = (b.key("m", ch.as_str()), b.key("s", ch.as_str()));
        let mut pipe = redis::pipe();
        pipe.atomic().del(&[&meta, &stream]).ignore();
        pipe.hset_multiple(
            &meta,
            &[("epoch", "newepoch"), ("top", "2"), ("ttl", "60000")],
        )
        .ignore();
        for (offset, text) in [(1, "new1"), (2, "new2")] {
            let body = encode(&NewPublication::text(text).at(0));
            pipe.cmd("XADD")
                .arg(&stream)
                .arg(format!("{offset}-1"))
                .arg("d")
                .arg(body)
                .ignore();
        }
        pipe.pexpire(&meta, 60_000)
            .ignore()
            .pexpire(&stream, 60_000)
            .ignore();
        let mut other = redis::Client::open(url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        pipe.query_async::<()>(&mut other).await.unwrap();
    }

    /// Closes the broker's connection from another one, as a Redis restart
    /// would: the broker reconnects, resubscribes and catches up.
    async fn kill_connection(url: &str, b: &RedisBroker) {
        let id: i64 = redis::cmd("CLIENT")
            .arg("ID")
            .query_async(&mut b.conn.clone())
            .await
            .unwrap();
        let mut other = redis::Client::open(url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let killed: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(id)
            .query_async(&mut other)
            .await
            .unwrap();
        assert_eq!(killed, 1);
    }

    /// Publishes right after [`kill_connection`]: the first try may go out
    /// on the dead connection (broken pipe) before the broker notices.
    async fn publish_after_a_kill(
        b: &RedisBroker,
        ch: &ChannelName,
        p: NewPublication,
        options: PublishOptions,
    ) {
        for _ in 0..50 {
            if b.publish(ch.clone(), p.clone(), options.clone())
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no publish within 5 s of the kill");
    }

    /// A reconnect into a new epoch delivers that epoch's messages from its
    /// start, not from the old epoch's offset. Needs `WALKIE_TEST_REDIS`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn catch_up_into_a_new_epoch_starts_at_its_beginning() {
        let Some((broker, url)) = test_broker().await else {
            return;
        };
        let events = Arc::new(Recorder::default());
        broker.set_events(events.clone());
        let ch = ChannelName::new("catch-up").unwrap();
        broker.subscribe(ch.clone()).await.unwrap();
        let kept = kept(10, Duration::from_secs(60));
        for i in 1..=3 {
            let p = NewPublication::text(format!("old{i}"));
            broker.publish(ch.clone(), p, kept.clone()).await.unwrap();
        }
        assert_eq!(events.wait_for(&ch, 3).await.len(), 3);
        lose_history_and_save_two(&url, &broker, &ch).await;
        kill_connection(&url, &broker).await;
        let delivered = events.wait_for(&ch, 5).await;
        let got: Vec<(u64, String)> = delivered
            .iter()
            .map(|p| (p.offset, String::from_utf8_lossy(&p.data).into_owned()))
            .collect();
        let want = [
            (1, "old1"),
            (2, "old2"),
            (3, "old3"),
            (1, "new1"),
            (2, "new2"),
        ]
        .map(|(o, t)| (o, t.to_owned()));
        assert_eq!(got, want);
        assert_eq!(broker.reconnects(), 1);
        broker.remove_history(ch).await.unwrap();
    }

    /// A burst goes out as one pipeline that loads the publish script
    /// first, so it is published even right after Redis forgot its scripts
    /// (a restart, a `SCRIPT FLUSH`), in order, one result each. Needs
    /// `WALKIE_TEST_REDIS`.
    #[tokio::test]
    async fn a_burst_is_published_after_redis_forgot_its_scripts() {
        let Some((broker, _)) = test_broker().await else {
            return;
        };
        let ch = ChannelName::new("burst").unwrap();
        let kept = kept(10, Duration::from_secs(60));
        let burst = |from: u64| {
            (from..from + 5)
                .map(|i| PublishRequest {
                    channel: ch.clone(),
                    publication: NewPublication::text(format!("m{i}")),
                    options: kept.clone(),
                })
                .collect::<Vec<_>>()
        };
        let offsets = |results: Vec<Result<PublishResult, EngineError>>| {
            results
                .into_iter()
                .map(|r| r.unwrap().position.offset)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            offsets(broker.publish_many(burst(1)).await),
            [1, 2, 3, 4, 5]
        );
        let () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut broker.conn.clone())
            .await
            .unwrap();
        assert_eq!(
            offsets(broker.publish_many(burst(6)).await),
            [6, 7, 8, 9, 10]
        );
        let h = broker
            .history(ch.clone(), HistoryFilter::default())
            .await
            .unwrap();
        let texts: Vec<_> = h.publications.iter().map(|p| p.data.clone()).collect();
        let want: Vec<_> = (1..=10)
            .map(|i| bytes::Bytes::from(format!("m{i}")))
            .collect();
        assert_eq!(texts, want);
        broker.remove_history(ch).await.unwrap();
    }

    /// A publication saved to no history (a join, a leave) leaves the
    /// epoch's TTL as the channel's history set it: a history kept for
    /// three days keeps its epoch six, not one. Needs `WALKIE_TEST_REDIS`.
    #[tokio::test]
    async fn saving_nothing_keeps_the_epoch_as_long_as_the_history_wants() {
        let Some((broker, _)) = test_broker().await else {
            return;
        };
        let ch = ChannelName::new("long").unwrap();
        let three_days = Duration::from_secs(3 * 24 * 3600);
        let kept = kept(10, three_days);
        let meta = broker.key("m", ch.as_str());
        let ttl = || async {
            let ms: i64 = redis::cmd("PTTL")
                .arg(&meta)
                .query_async(&mut broker.conn.clone())
                .await
                .unwrap();
            Duration::from_millis(u64::try_from(ms).expect("a meta with a TTL"))
        };
        let joined = NewPublication::text("join");
        let unkept = PublishOptions::default();
        // A channel first seen through an event gets the day at least.
        broker
            .publish(ch.clone(), joined.clone(), unkept.clone())
            .await
            .unwrap();
        assert!(ttl().await > Duration::from_secs(23 * 3600));
        broker
            .publish(ch.clone(), NewPublication::text("m"), kept)
            .await
            .unwrap();
        broker.publish(ch.clone(), joined, unkept).await.unwrap();
        assert!(ttl().await > 2 * three_days - Duration::from_secs(60));
        broker.remove_history(ch).await.unwrap();
    }

    /// A reconnect that finds some of the missed messages trimmed (the
    /// history kept fewer than were missed) delivers nothing past the gap:
    /// the channel's members are cut off to recover. Needs
    /// `WALKIE_TEST_REDIS`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn catch_up_past_a_trimmed_gap_cuts_the_channel_off() {
        let Some((broker, url)) = test_broker().await else {
            return;
        };
        let events = Arc::new(Recorder::default());
        broker.set_events(events.clone());
        let ch = ChannelName::new("trimmed").unwrap();
        broker.subscribe(ch.clone()).await.unwrap();
        let kept = kept(10, Duration::from_secs(60));
        for i in 1..=3 {
            let p = NewPublication::text(format!("m{i}"));
            broker.publish(ch.clone(), p, kept.clone()).await.unwrap();
        }
        assert_eq!(events.wait_for(&ch, 3).await.len(), 3);
        // While this node is cut off, 4 to 6 are saved in the same epoch
        // and only 6 is still kept.
        let (meta, stream) = (broker.key("m", ch.as_str()), broker.key("s", ch.as_str()));
        let body = encode(&NewPublication::text("m6").at(0));
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hset(&meta, "top", 6)
            .ignore()
            .cmd("XTRIM")
            .arg(&stream)
            .arg("MAXLEN")
            .arg(0)
            .ignore()
            .cmd("XADD")
            .arg(&stream)
            .arg("6-1")
            .arg("d")
            .arg(body)
            .ignore();
        pipe.query_async::<()>(&mut broker.conn.clone())
            .await
            .unwrap();
        kill_connection(&url, &broker).await;
        wait_unavailable(&events, &ch, 1).await;
        let offsets: Vec<u64> = events.on(&ch).iter().map(|p| p.offset).collect();
        assert_eq!(offsets, [1, 2, 3], "nothing is delivered past the gap");
        // It goes on from Redis's position: the next message is delivered,
        // and the next reconnect finds no gap.
        kill_connection(&url, &broker).await;
        let p = NewPublication::text("m7");
        publish_after_a_kill(&broker, &ch, p, kept).await;
        let offsets: Vec<u64> = events
            .wait_for(&ch, 4)
            .await
            .iter()
            .map(|p| p.offset)
            .collect();
        assert_eq!(offsets, [1, 2, 3, 7]);
        assert_eq!(events.times_unavailable(&ch), 1, "one gap, one cut-off");
        broker.remove_history(ch).await.unwrap();
    }

    /// A channel that had no history at all when this node subscribed
    /// (offset 0, no epoch yet) is caught up from its start: if what it
    /// missed was trimmed meanwhile, nothing past the gap is delivered and
    /// its members are cut off to recover, as for a channel that had
    /// history. (It was taken for a channel with nothing delivered, and
    /// what was kept was delivered after a silent gap.) Needs
    /// `WALKIE_TEST_REDIS`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn catch_up_of_a_channel_empty_at_subscribe_detects_a_trimmed_gap() {
        let Some((broker, url)) = test_broker().await else {
            return;
        };
        let events = Arc::new(Recorder::default());
        broker.set_events(events.clone());
        let ch = ChannelName::new("empty-then-trimmed").unwrap();
        broker.subscribe(ch.clone()).await.unwrap();
        // While this node is cut off, 1 to 13 are saved in a new epoch and
        // only 4 to 13 are still kept.
        let (meta, stream) = (broker.key("m", ch.as_str()), broker.key("s", ch.as_str()));
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hset(&meta, "epoch", "e-trimmed")
            .ignore()
            .hset(&meta, "top", 13)
            .ignore();
        for offset in 4..=13 {
            let body = encode(&NewPublication::text(format!("m{offset}")).at(0));
            pipe.cmd("XADD")
                .arg(&stream)
                .arg(format!("{offset}-1"))
                .arg("d")
                .arg(body)
                .ignore();
        }
        pipe.query_async::<()>(&mut broker.conn.clone())
            .await
            .unwrap();
        kill_connection(&url, &broker).await;
        wait_unavailable(&events, &ch, 1).await;
        assert!(
            events.on(&ch).is_empty(),
            "nothing is delivered past the gap"
        );
        broker.remove_history(ch).await.unwrap();
    }

    /// A channel that had no history when this node subscribed, and whose
    /// missed messages are all kept, gets them all after a reconnect.
    /// Needs `WALKIE_TEST_REDIS`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn catch_up_of_a_channel_empty_at_subscribe_delivers_all_it_missed() {
        let Some((broker, url)) = test_broker().await else {
            return;
        };
        let events = Arc::new(Recorder::default());
        broker.set_events(events.clone());
        let ch = ChannelName::new("empty-then-kept").unwrap();
        broker.subscribe(ch.clone()).await.unwrap();
        kill_connection(&url, &broker).await;
        let p = NewPublication::text("first");
        publish_after_a_kill(&broker, &ch, p, kept(10, Duration::from_secs(60))).await;
        let offsets: Vec<u64> = events
            .wait_for(&ch, 1)
            .await
            .iter()
            .map(|p| p.offset)
            .collect();
        assert_eq!(offsets, [1]);
        assert_eq!(events.times_unavailable(&ch), 0);
        broker.remove_history(ch).await.unwrap();
    }

    /// A channel that got nothing since this node subscribed is caught up
    /// after a reconnect from where it was at the subscription, not from
    /// the start of its history. Needs `WALKIE_TEST_REDIS`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_quiet_channel_is_not_delivered_again_after_a_reconnect() {
        let Some((broker, url)) = test_broker().await else {
            return;
        };
        let events = Arc::new(Recorder::default());
        broker.set_events(events.clone());
        let ch = ChannelName::new("quiet").unwrap();
        let kept = kept(100, Duration::from_secs(60));
        for i in 1..=20 {
            let p = NewPublication::text(format!("old{i}"));
            broker.publish(ch.clone(), p, kept.clone()).await.unwrap();
        }
        broker.subscribe(ch.clone()).await.unwrap();
        kill_connection(&url, &broker).await;
        let p = NewPublication::text("new");
        publish_after_a_kill(&broker, &ch, p, kept).await;
        let got: Vec<u64> = events
            .wait_for(&ch, 1)
            .await
            .iter()
            .map(|p| p.offset)
            .collect();
        assert_eq!(got, [21], "only what came after the subscription");
        assert_eq!(broker.reconnects(), 1);
        broker.remove_history(ch).await.unwrap();
    }

    /// Waits up to 5 s until the engine said `n` times that `ch` cannot be
    /// delivered in order.
    async fn wait_unavailable(events: &Recorder, ch: &ChannelName, n: usize) {
        for _ in 0..500 {
            if events.times_unavailable(ch) >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the gap went unnoticed");
    }

    /// Redis back with less than this node delivered, in the same epoch (a
    /// restart from an older snapshot): the channel is cut off, and the
    /// offsets Redis gives next, already seen here, are still delivered.
    /// Needs `WALKIE_TEST_REDIS`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_going_back_cuts_the_channel_off_and_delivers_what_comes_next() {
        let Some((broker, url)) = test_broker().await else {
            return;
        };
        let events = Arc::new(Recorder::default());
        broker.set_events(events.clone());
        let ch = ChannelName::new("back").unwrap();
        broker.subscribe(ch.clone()).await.unwrap();
        let kept = kept(10, Duration::from_secs(60));
        for i in 1..=5 {
            let p = NewPublication::text(format!("m{i}"));
            broker.publish(ch.clone(), p, kept.clone()).await.unwrap();
        }
        assert_eq!(events.wait_for(&ch, 5).await.len(), 5);
        // The snapshot Redis comes back from holds 1 and 2 only.
        let (meta, stream) = (broker.key("m", ch.as_str()), broker.key("s", ch.as_str()));
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hset(&meta, "top", 2)
            .ignore()
            .del(&stream)
            .ignore();
        for offset in [1, 2] {
            let body = encode(&NewPublication::text(format!("m{offset}")).at(0));
            pipe.cmd("XADD")
                .arg(&stream)
                .arg(format!("{offset}-1"))
                .arg("d")
                .arg(body)
                .ignore();
        }
        pipe.pexpire(&stream, 60_000).ignore();
        pipe.query_async::<()>(&mut broker.conn.clone())
            .await
            .unwrap();
        kill_connection(&url, &broker).await;
        wait_unavailable(&events, &ch, 1).await;
        let p = NewPublication::text("again3");
        publish_after_a_kill(&broker, &ch, p, kept).await;
        let got: Vec<(u64, String)> = events
            .wait_for(&ch, 6)
            .await
            .iter()
            .map(|p| (p.offset, String::from_utf8_lossy(&p.data).into_owned()))
            .collect();
        assert_eq!(got.last(), Some(&(3, "again3".to_owned())), "{got:?}");
        broker.remove_history(ch).await.unwrap();
    }
}
