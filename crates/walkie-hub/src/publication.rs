//! What is published, and where a channel's stream stands.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

/// What a payload is. Rooms by URL carry text and binary as they came;
/// the Walkie protocol publishes JSON; joins and leaves are presence events
/// whose payload is the client's info (never kept in history).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// UTF-8 text.
    Text,
    /// Bytes.
    Binary,
    /// One JSON value (valid UTF-8).
    Json,
    /// A client joined the channel; the payload is its info (JSON).
    Join,
    /// A client left the channel; the payload is its info (JSON).
    Leave,
}

impl Kind {
    /// Whether the payload is text (anything but binary).
    pub fn is_text(self) -> bool {
        self != Kind::Binary
    }

    pub(crate) fn to_u8(self) -> u8 {
        match self {
            Kind::Text => 0,
            Kind::Binary => 1,
            Kind::Json => 2,
            Kind::Join => 3,
            Kind::Leave => 4,
        }
    }

    pub(crate) fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            0 => Kind::Text,
            1 => Kind::Binary,
            2 => Kind::Json,
            3 => Kind::Join,
            4 => Kind::Leave,
            _ => return None,
        })
    }
}

/// A message published to a channel, as delivered and as kept in history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    /// Its place in the channel's stream: 1 for the first message kept in
    /// history, then +1 per message, with no gaps. 0 for a message
    /// published without history (it cannot be recovered).
    pub offset: u64,
    /// The payload, exactly as published.
    pub data: Bytes,
    /// What the payload is.
    pub kind: Kind,
    /// Who published it, as a JSON object (`{"user":..,"client":..}`), if
    /// known.
    pub info: Option<Bytes>,
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
    /// What it is. Text, JSON and presence payloads must be valid UTF-8.
    pub kind: Kind,
    /// See [`Publication::info`].
    pub info: Option<Bytes>,
    /// See [`Publication::key`].
    pub key: Option<Arc<str>>,
}

impl NewPublication {
    /// A payload of some kind, with no info and no key.
    pub fn new(kind: Kind, data: impl Into<Bytes>) -> Self {
        NewPublication {
            data: data.into(),
            kind,
            info: None,
            key: None,
        }
    }

    /// A text message.
    pub fn text(text: impl Into<String>) -> Self {
        Self::new(Kind::Text, text.into())
    }

    /// A binary message.
    pub fn binary(data: impl Into<Bytes>) -> Self {
        Self::new(Kind::Binary, data)
    }

    /// The publication with its offset and the time now.
    pub(crate) fn at(self, offset: u64) -> Publication {
        Publication {
            offset,
            data: self.data,
            kind: self.kind,
            info: self.info,
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

/// One publish of a batch ([`crate::Broker::publish_many`]).
#[derive(Debug, Clone)]
pub struct PublishRequest {
    /// Where to.
    pub channel: crate::ChannelName,
    /// What.
    pub publication: NewPublication,
    /// How.
    pub options: PublishOptions,
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
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A fresh random epoch.
pub(crate) fn new_epoch() -> Arc<str> {
    format!("{:08x}", rand::random::<u32>()).into()
}
