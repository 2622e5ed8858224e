//! What is published, and where a channel's stream stands.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

/// A message published to a channel, as delivered and as kept in history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    /// Its place in the channel's stream: 1 for the first message kept in
    /// history, then +1 per message, with no gaps. 0 for a message
    /// published without history (it cannot be recovered).
    pub offset: u64,
    /// The payload, exactly as published.
    pub data: Bytes,
    /// Whether the payload is binary; text otherwise (valid UTF-8).
    pub binary: bool,
    /// When it was published, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// A key for state-like channels: a slow subscriber may skip to the
    /// latest message per key instead of receiving every one.
    pub key: Option<Arc<str>>,
}

/// A message to publish: the parts the publisher chooses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPublication {
    /// The payload.
    pub data: Bytes,
    /// Whether the payload is binary. Text must be valid UTF-8.
    pub binary: bool,
    /// See [`Publication::key`].
    pub key: Option<Arc<str>>,
}

impl NewPublication {
    /// A text message.
    pub fn text(text: impl Into<String>) -> Self {
        NewPublication {
            data: Bytes::from(text.into()),
            binary: false,
            key: None,
        }
    }

    /// A binary message.
    pub fn binary(data: impl Into<Bytes>) -> Self {
        NewPublication {
            data: data.into(),
            binary: true,
            key: None,
        }
    }

    /// The publication with its offset and the time now.
    pub(crate) fn at(self, offset: u64) -> Publication {
        Publication {
            offset,
            data: self.data,
            binary: self.binary,
            time_ms: now_ms(),
            key: self.key,
        }
    }
}

/// Where a channel's stream stands: the offset of its latest message and
/// its epoch. The epoch changes whenever the stream's history is lost
/// (removed, expired, or kept only in memory across a restart), so an
/// offset is only meaningful together with the epoch it was read in.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamPosition {
    /// The latest offset (0 before the first message).
    pub offset: u64,
    /// The stream's epoch: a short random string.
    pub epoch: Arc<str>,
}

/// How a channel keeps history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryOptions {
    /// The most messages kept; older ones are dropped. At least 1.
    pub size: usize,
    /// How long a message is kept.
    pub ttl: Duration,
}

/// Options of one publish.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishOptions {
    /// Keep the message in the channel's history (and give it an offset).
    /// `None` delivers it to current subscribers only, with offset 0.
    pub history: Option<HistoryOptions>,
    /// A publisher's key for this message: a publish repeated with the same
    /// key within `idempotency_ttl` is not delivered again, and returns the
    /// first one's result.
    pub idempotency_key: Option<String>,
    /// How long an idempotency key is remembered (zero: a default of 5
    /// minutes).
    pub idempotency_ttl: Duration,
}

/// The default for [`PublishOptions::idempotency_ttl`].
pub const DEFAULT_IDEMPOTENCY_TTL: Duration = Duration::from_secs(300);

impl PublishOptions {
    /// How long idempotency keys are remembered.
    pub fn idempotency_ttl(&self) -> Duration {
        if self.idempotency_ttl.is_zero() {
            DEFAULT_IDEMPOTENCY_TTL
        } else {
            self.idempotency_ttl
        }
    }
}

/// What a publish did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishResult {
    /// The message's offset (0 without history) and the stream's epoch.
    pub position: StreamPosition,
    /// The idempotency key was seen before: this publish delivered nothing.
    pub suppressed: bool,
}

/// Which part of a channel's history to read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HistoryFilter {
    /// Only messages after this offset (all kept messages if `None`).
    pub since: Option<u64>,
    /// At most this many messages (no limit if `None`; `Some(0)` reads only
    /// the position).
    pub limit: Option<usize>,
    /// Newest first: with a limit, the latest messages.
    pub reverse: bool,
}

/// Messages read from history, and the stream's position at that moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    /// In offset order (descending when the filter said `reverse`).
    pub publications: Vec<Publication>,
    /// The stream's latest offset and epoch.
    pub position: StreamPosition,
}

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A fresh random epoch.
pub(crate) fn new_epoch() -> Arc<str> {
    format!("{:08x}", rand::random::<u32>()).into()
}
