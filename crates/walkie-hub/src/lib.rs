//! The hub: channels, history with recovery, and fan-out, with the
//! engines that carry them behind a small trait.
//!
//! # Layout
//!
//! - [`ChannelName`] (`channel.rs`): validated names and their namespace.
//! - [`HubConfig`] (`config.rs`): auth and namespaces, from TOML.
//! - [`auth`]: connection and subscription tokens (JWT).
//! - `publication.rs`: [`Publication`], [`StreamPosition`] (offset and
//!   epoch), publish and history options.
//! - [`Broker`] (`engine.rs`): the engine trait and its contract.
//! - [`MemoryBroker`] (`memory.rs`): everything in memory.
//! - [`DurableBroker`] (`durable.rs`): history in an embedded database
//!   (redb), kept across restarts.
//! - [`RedisBroker`] and [`RedisPresence`] (`redis_engine.rs`): Redis 7, for
//!   several nodes acting as one.
//! - [`NatsBroker`] and [`NatsPresence`] (`nats_engine.rs`): NATS
//!   JetStream, for several nodes acting as one.
//! - [`Hub`] and [`Client`] (`hub.rs`): this node's subscribers; subscribe
//!   with recovery; fan-out from one framed copy.
//! - [`Queue`] (`queue.rs`): each connection's bounded outgoing queue and
//!   its [`OverflowPolicy`] for slow consumers.
//! - [`PresenceManager`] (`presence.rs`): who is in a channel;
//!   [`MemoryPresence`].
//! - [`protocol`]: the Walkie protocol's wire format.
//! - [`Session`] (`session.rs`): one Walkie protocol connection, no I/O.
//! - [`Metrics`] (`metrics.rs`): counters for `/metrics`.
//! - [`client`]: a Rust client of the Walkie protocol that reconnects and
//!   recovers by itself.
//! - [`backend`]: what the HTTP API does for trusted backends.
//! - [`conformance`]: the tests every engine must pass.
//! - `stream.rs`: in-memory stream bookkeeping the engines share.

pub mod auth;
pub mod backend;
mod channel;
pub mod client;
mod codec;
mod config;
pub mod conformance;
mod dispatch;
mod durable;
mod engine;
mod hub;
mod memory;
mod metrics;
mod nats_engine;
mod presence;
pub mod protocol;
mod publication;
mod queue;
mod rate;
mod redis_engine;
mod session;
mod stream;

pub use auth::{AuthError, Identity, Verifier};
pub use channel::{ChannelName, ChannelNameError, MAX_CHANNEL_LEN};
pub use config::{AuthConfig, ConfigError, HubConfig, NamespaceConfig};
pub use dispatch::CONTROL_CHANNEL;
pub use durable::{
    DATABASE_FILE, DEFAULT_FORGET_AFTER, DEFAULT_SWEEP_INTERVAL, DurableBroker, DurableOptions,
    OpenError,
};
pub use engine::{BoxFuture, Broker, BrokerEvents, EngineError};
pub use hub::{CatchUp, CatchUpError, Client, Format, Hub, Recover, Subscribed};
pub use memory::MemoryBroker;
pub use metrics::Metrics;
pub use nats_engine::{NatsBroker, NatsPresence};
pub use presence::{ClientInfo, MemoryPresence, PresenceManager, PresenceStats, presence_json};
pub use publication::{
    DEFAULT_IDEMPOTENCY_TTL, History, HistoryFilter, HistoryOptions, Kind, NewPublication,
    Publication, PublishOptions, PublishRequest, PublishResult, StreamPosition, now_ms,
};
pub use queue::{Entry, OverflowPolicy, Queue, QueueClosed, QueueLimits, Queued, Sink, Taken};
pub use rate::PublishWindow;
pub use redis_engine::{PRESENCE_TTL, RedisBroker, RedisPresence};
pub use session::{
    CONNECT_TIMEOUT_SECS, CloseReason, MAX_BEFORE_CONNECT, MAX_HISTORY_LIMIT, MAX_SUBSCRIPTIONS,
    Node, Session,
};
