//! The broker: what an engine (memory, embedded database, Redis, NATS)
//! provides to the hub.
//!
//! The trait is small on purpose, and its contract is the same for every
//! engine; `conformance.rs` tests it, and every engine runs those tests.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::channel::ChannelName;
use crate::publication::{
    History, HistoryFilter, NewPublication, Publication, PublishOptions, PublishRequest,
    PublishResult,
};

/// A boxed future, so that engines can be chosen at run time.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why an engine could not do what was asked. The hub reports these to
/// clients as a temporary failure: nothing was published or read.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The engine's storage failed (a disk error, a corrupt database).
    #[error("storage failed: {0}")]
    Storage(String),
    /// The engine cannot be reached (a broker down, a connection lost).
    #[error("engine unavailable: {0}")]
    Unavailable(String),
    /// The engine was shut down.
    #[error("engine stopped")]
    Stopped,
}

impl EngineError {
    /// The same error again (it holds no source to share): for each
    /// request of a batch that failed as a whole.
    pub(crate) fn again(&self) -> EngineError {
        match self {
            EngineError::Storage(m) => EngineError::Storage(m.clone()),
            EngineError::Unavailable(m) => EngineError::Unavailable(m.clone()),
            EngineError::Stopped => EngineError::Stopped,
        }
    }
}

/// Publishes each request with [`Broker::publish`], one after another: the
/// default [`Broker::publish_many`], and what an engine's own falls back
/// to for a batch it cannot send together.
pub(crate) async fn publish_each<B: Broker + ?Sized>(
    broker: &B,
    requests: Vec<PublishRequest>,
) -> Vec<Result<PublishResult, EngineError>> {
    let mut results = Vec::with_capacity(requests.len());
    for r in requests {
        results.push(broker.publish(r.channel, r.publication, r.options).await);
    }
    results
}

/// Where a broker delivers publications: the hub of this node.
pub trait BrokerEvents: Send + Sync + 'static {
    /// A publication on `channel`, in the stream of epoch `epoch`.
    ///
    /// Called once per publication, in offset order per channel, and never
    /// for two publications of one channel at once. It must not block: the
    /// hub only queues the message for each local subscriber.
    fn handle_publication(&self, channel: &ChannelName, publication: &Publication, epoch: &str);

    /// The engine cannot deliver `channel` in order: missed publications
    /// it cannot read back, for now (its store unreachable for long) or for
    /// good (history trimmed past them meanwhile).
    /// Rather than leave subscribers waiting without a word, the hub cuts
    /// them off, to reconnect and recover from history when they can. The
    /// engine goes on delivering what it can, in order.
    fn channel_unavailable(&self, channel: &ChannelName) {
        let _ = channel;
    }
}

/// Pub/sub with history: the engine behind the hub.
///
/// # Contract
///
/// - **Atomic per channel.** Saving a publication to history and delivering
///   it happen as one step: a reader of history and a subscriber see the
///   same order, and a publication is delivered only once it is saved.
/// - **Offsets without gaps.** Within one epoch, the publications kept in
///   history have offsets 1, 2, 3, ... in publish order. A publication
///   without history has offset 0 and does not move the stream; it is not
///   ordered against saved publications still being written (a join event
///   may overtake a message published just before it).
/// - **Epochs.** A stream's epoch is fixed from the first time the channel
///   is read or published to, and changes only when its history is lost:
///   removed, not durable across a restart, or expired entirely and the
///   channel then forgotten (an engine may forget a channel that kept
///   nothing and was not used for a while; while it remembers one, the
///   offsets go on). The offsets then start again: the next publication
///   kept is offset 1.
/// - **Bounded history.** At most [`HistoryOptions::size`] messages are
///   kept, each for at most [`HistoryOptions::ttl`], as given by the latest
///   publish.
/// - **Delivery.** Every publication on a channel this node subscribed to
///   (and has not unsubscribed from) reaches [`BrokerEvents`], exactly
///   once, in offset order. A broker may deliver other channels too; the
///   hub ignores them.
/// - **Idempotency.** A publish with an idempotency key already used on that
///   channel within its TTL delivers nothing and returns the first result,
///   with `suppressed` set.
///
/// [`HistoryOptions::size`]: crate::HistoryOptions::size
/// [`HistoryOptions::ttl`]: crate::HistoryOptions::ttl
pub trait Broker: Send + Sync + 'static {
    /// Sets where publications are delivered. Called once, before anything
    /// else.
    fn set_events(&self, events: Arc<dyn BrokerEvents>);

    /// This node wants the publications of `channel`.
    fn subscribe(&self, channel: ChannelName) -> BoxFuture<'_, Result<(), EngineError>>;

    /// This node no longer wants them.
    fn unsubscribe(&self, channel: ChannelName) -> BoxFuture<'_, Result<(), EngineError>>;

    /// Publishes to `channel` (saving it to history if the options say so).
    fn publish(
        &self,
        channel: ChannelName,
        publication: NewPublication,
        options: PublishOptions,
    ) -> BoxFuture<'_, Result<PublishResult, EngineError>>;

    /// Publishes each request in order, as if by [`Broker::publish`] one
    /// after another (a later request with an idempotency key already used
    /// is suppressed), and answers one result per request, in order. An
    /// engine may save and deliver them together: a burst of messages from
    /// one connection then costs one commit and reaches each subscriber in
    /// one write, instead of a commit and a write per message. The default
    /// publishes them one at a time.
    fn publish_many(
        &self,
        requests: Vec<PublishRequest>,
    ) -> BoxFuture<'_, Vec<Result<PublishResult, EngineError>>> {
        Box::pin(publish_each(self, requests))
    }

    /// Reads history, and the stream's position.
    fn history(
        &self,
        channel: ChannelName,
        filter: HistoryFilter,
    ) -> BoxFuture<'_, Result<History, EngineError>>;

    /// Drops a channel's history; its stream starts over in a new epoch.
    fn remove_history(&self, channel: ChannelName) -> BoxFuture<'_, Result<(), EngineError>>;

    /// How many times the engine's connection was lost and came back (for
    /// `/metrics`); 0 for engines inside the process.
    fn reconnects(&self) -> u64 {
        0
    }

    /// Whether [`BrokerEvents`] is called from a thread of the engine's own
    /// (its client's) rather than from the task that published or
    /// subscribed. Queuing a publication for a thousand subscribers from
    /// another thread costs a cross-thread wake each; such a node should
    /// have its hub deliver from a worker ([`Hub::deliver_here`]).
    ///
    /// [`Hub::deliver_here`]: crate::Hub::deliver_here
    fn delivers_from_own_thread(&self) -> bool {
        false
    }

    /// A random secret that every node on this engine (and prefix) shares,
    /// made by the first to ask for `name` and kept in the engine; `None`
    /// for engines inside the process, which no other node shares.
    fn shared_secret(&self, name: &str) -> BoxFuture<'_, Result<Option<String>, EngineError>> {
        let _ = name;
        Box::pin(async { Ok(None) })
    }
}
