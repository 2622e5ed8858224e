//! The hub: this node's clients, their subscriptions (with history and
//! recovery), presence, and the engine behind them. Fan-out itself is in
//! `dispatch.rs`.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::channel::ChannelName;
use crate::dispatch::{CONTROL_CHANNEL, Control, Dispatch, Forwarded, Joining, Member};
use crate::engine::{Broker, EngineError};
use crate::memory::lock;
use crate::metrics::Metrics;
use crate::presence::{ClientInfo, MemoryPresence, PresenceManager};
use crate::publication::{
    History, HistoryFilter, Kind, NewPublication, PublishOptions, PublishRequest, PublishResult,
    StreamPosition,
};
use crate::queue::{Queue, QueueLimits};
use crate::rate::PublishWindow;

mod interest;
mod recovery;
pub use recovery::{CatchUp, CatchUpError};

/// How a subscriber wants publications framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// The payload alone, as a text or binary message: no envelope (rooms
    /// by URL). Joins and leaves are not delivered.
    Raw,
    /// The Walkie protocol's JSON envelope (`docs/protocol.md`): a `pub`,
    /// `join` or `leave` push naming the channel.
    Json,
}

/// What a subscriber asks to receive from history when it joins.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Recover {
    /// Nothing: only what is published from now on.
    #[default]
    Nothing,
    /// The latest `n` messages kept.
    Last(usize),
    /// Everything after this position (a reconnecting client's last seen).
    Since(StreamPosition),
}

/// The result of a subscribe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribed {
    /// The stream's position when the subscriber joined.
    pub position: StreamPosition,
    /// For [`Recover::Since`]: whether every missed message was found;
    /// false if history no longer covers the gap or the epoch changed, in
    /// which case nothing was queued from history. True for the other
    /// modes ([`Recover::Last`] queues the newest that fit the queue).
    pub recovered: bool,
    /// How many messages from history follow: queued now, or, while
    /// [`catching_up`](Subscribed::catching_up), queued now and later.
    pub from_history: usize,
    /// A recovery larger than the client's queue: what fits is queued,
    /// and [`Client::catch_up`] queues the rest as the client reads.
    pub catching_up: bool,
}

/// The hub of one node. Cheap to clone: one pointer, as every connection
/// of a room keeps a copy.
#[derive(Clone)]
pub struct Hub(Arc<Shared>);

/// What every copy of a [`Hub`] shares.
struct Shared {
    broker: Arc<dyn Broker>,
    presence: Arc<dyn PresenceManager>,
    dispatch: Arc<Dispatch>,
    next_client: AtomicU64,
    /// Presence entries of this node's connections, re-added periodically
    /// for engines whose entries expire (see [`Hub::refresh_presence`]).
    local_presence: Mutex<HashMap<(ChannelName, String), ClientInfo>>,
    /// What the engine was told of this node's channels, one call at a
    /// time per channel.
    interest: interest::Interest,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

impl Hub {
    /// A hub over `broker` (which delivers to it from now on), with
    /// presence in memory.
    pub fn new(broker: Arc<dyn Broker>) -> Hub {
        Hub::with_presence(broker, Arc::new(MemoryPresence::new()))
    }

    /// A hub over `broker` and `presence`.
    pub fn with_presence(broker: Arc<dyn Broker>, presence: Arc<dyn PresenceManager>) -> Hub {
        let dispatch = Arc::new(Dispatch {
            channels: Mutex::default(),
            metrics: Arc::default(),
            users: Mutex::default(),
            node: format!("{:08x}", rand::random::<u32>()).into(),
            home: OnceLock::new(),
            control_seen: Mutex::new(("".into(), 0)),
        });
        broker.set_events(dispatch.clone());
        Hub(Arc::new(Shared {
            broker,
            presence,
            dispatch,
            next_client: AtomicU64::new(1),
            local_presence: Mutex::default(),
            interest: interest::Interest::default(),
        }))
    }

    /// From now on, publications are queued for subscribers by a task on
    /// the current runtime (call it from within one), whatever thread the
    /// engine delivers them on. For engines that deliver from a thread of
    /// their own ([`Broker::delivers_from_own_thread`], Redis): waking a
    /// thousand subscribers' tasks from their own thread is one cheap local
    /// wake each, where a wake from another thread costs a cross-thread
    /// hand-off each. The first call wins; later calls do nothing.
    pub fn deliver_here(&self) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Forwarded>();
        if self.0.dispatch.home.set(tx).is_err() {
            return;
        }
        let dispatch = Arc::downgrade(&self.0.dispatch);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(64);
            while rx.recv_many(&mut batch, 64).await > 0 {
                let Some(dispatch) = dispatch.upgrade() else {
                    return;
                };
                for forwarded in batch.drain(..) {
                    match forwarded {
                        Forwarded::Publication(channel, publication, epoch) => {
                            dispatch.deliver(&channel, &publication, &epoch);
                        }
                        Forwarded::Fence(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            }
        });
    }

    /// Resolves once every publication of `channels` that this node's
    /// engine handed the hub before the call is in its subscribers' queues
    /// here: a connection about to close waits for it (with the channels
    /// it is in), so that what its last commands caused (the messages it
    /// published to a channel it is in, its own join) is sent before the
    /// close.
    ///
    /// Publications an engine delivers from its own thread are handed over
    /// in order to the delivery task (see [`Hub::deliver_here`]): a fence
    /// sent the same way comes back once those before it are pending in
    /// their channels. Pending publications are then queued at once, on
    /// this thread, instead of when their flush task runs. Not covered: one
    /// a shared engine (Redis, NATS) has not sent back to this node yet.
    pub async fn delivered<'a>(&self, channels: impl IntoIterator<Item = &'a ChannelName>) {
        if let Some(home) = self.0.dispatch.home.get() {
            let (done, answered) = tokio::sync::oneshot::channel();
            if home.send(Forwarded::Fence(done)).is_ok() {
                let _ = answered.await;
            }
        }
        for channel in channels {
            self.0.dispatch.flush_now(channel);
        }
    }

    /// Subscribes this node to [`CONTROL_CHANNEL`], so that
    /// [`Hub::disconnect_user_everywhere`] called on another node reaches
    /// this node's connections. Call once at start, on a shared engine.
    pub async fn listen_control(&self) -> Result<(), EngineError> {
        self.0
            .broker
            .subscribe(ChannelName::new(CONTROL_CHANNEL).expect("a valid name"))
            .await
    }

    /// Adds a connection to a channel's presence (and remembers it for
    /// refreshes).
    pub async fn presence_add(
        &self,
        channel: ChannelName,
        info: ClientInfo,
    ) -> Result<(), EngineError> {
        lock(&self.0.local_presence).insert((channel.clone(), info.client.clone()), info.clone());
        self.0.presence.add(channel, info).await
    }

    /// Removes a connection from a channel's presence.
    pub async fn presence_remove(
        &self,
        channel: ChannelName,
        client: String,
    ) -> Result<(), EngineError> {
        lock(&self.0.local_presence).remove(&(channel.clone(), client.clone()));
        self.0.presence.remove(channel, client).await
    }

    /// Adds every local presence entry again: with an engine whose entries
    /// expire (Redis), call it well within the expiry, so that only a dead
    /// node's entries disappear.
    pub async fn refresh_presence(&self) {
        let keys: Vec<(ChannelName, String)> =
            lock(&self.0.local_presence).keys().cloned().collect();
        for key in keys {
            // Left since the snapshot: adding it again would bring back a
            // member who is gone, with no leave event, until it expired.
            // Present: its info as it is now, which a `refresh` may have
            // changed since (see `Session::update_presence`).
            let Some(info) = lock(&self.0.local_presence).get(&key).cloned() else {
                continue;
            };
            let (channel, _) = key;
            if let Err(e) = self.0.presence.add(channel.clone(), info).await {
                tracing::warn!(%channel, "presence refresh failed: {e}");
            }
        }
    }

    /// The engine.
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.0.broker
    }

    /// This node's counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.0.dispatch.metrics
    }

    /// Where presence is kept.
    pub fn presence(&self) -> &Arc<dyn PresenceManager> {
        &self.0.presence
    }

    /// A new client of this node, with an empty outgoing queue.
    pub fn client(&self, limits: QueueLimits) -> Client {
        Client {
            id: self.0.next_client.fetch_add(1, Ordering::Relaxed),
            queue: Arc::new(Queue::new(limits)),
            hub: self.clone(),
            channels: Vec::new(),
            user: None,
            publishes: PublishWindow::default(),
        }
    }

    /// Closes every connection of `user` on this node (their queues end
    /// with [`QueueClosed::Disconnected`]); returns how many.
    ///
    /// [`QueueClosed::Disconnected`]: crate::QueueClosed::Disconnected
    pub fn disconnect_user(&self, user: &str) -> usize {
        self.0.dispatch.disconnect_user(user)
    }

    /// Closes every connection of `user` on this node, and tells every
    /// other node listening on [`CONTROL_CHANNEL`] to close theirs; returns
    /// how many were closed on this node. The others close theirs as soon
    /// as the engine delivers the message (no reply is awaited).
    pub async fn disconnect_user_everywhere(&self, user: &str) -> Result<usize, EngineError> {
        let n = self.disconnect_user(user);
        let control = Control {
            node: self.0.dispatch.node.to_string(),
            disconnect: user.to_owned(),
        };
        let data = serde_json::to_vec(&control).expect("serializable");
        // Kept in a short history, so that a node cut off from the engine
        // when it was sent gets it with the engine's catch-up.
        let kept = PublishOptions {
            history: Some(crate::publication::HistoryOptions {
                size: 1000,
                ttl: std::time::Duration::from_millis(crate::dispatch::CONTROL_MAX_AGE_MS),
            }),
            ..PublishOptions::default()
        };
        self.0
            .broker
            .publish(
                ChannelName::new(CONTROL_CHANNEL).expect("a valid name"),
                NewPublication::new(Kind::Json, data),
                kept,
            )
            .await?;
        Ok(n)
    }

    /// Users with connections on this node.
    pub fn connected_users(&self) -> usize {
        lock(&self.0.dispatch.users).len()
    }

    /// Publishes to a channel. This node's subscribers get it from a task
    /// on the current runtime, which queues every publication of the
    /// channel made meanwhile in one batch (see `dispatch.rs`): a task
    /// that publishes and then reads a subscriber's queue must yield first.
    pub async fn publish(
        &self,
        channel: ChannelName,
        publication: NewPublication,
        options: PublishOptions,
    ) -> Result<PublishResult, EngineError> {
        let r = self.0.broker.publish(channel, publication, options).await?;
        if !r.suppressed {
            Metrics::inc(&self.0.dispatch.metrics.published);
        }
        Ok(r)
    }

    /// Publishes several messages, in order, as [`Broker::publish_many`]
    /// does: one result per message.
    pub async fn publish_many(
        &self,
        requests: Vec<PublishRequest>,
    ) -> Vec<Result<PublishResult, EngineError>> {
        let results = self.0.broker.publish_many(requests).await;
        let published = results
            .iter()
            .filter(|r| matches!(r, Ok(r) if !r.suppressed))
            .count();
        self.0
            .dispatch
            .metrics
            .published
            .fetch_add(published as u64, std::sync::atomic::Ordering::Relaxed);
        results
    }

    /// Reads a channel's history.
    pub async fn history(
        &self,
        channel: ChannelName,
        filter: HistoryFilter,
    ) -> Result<History, EngineError> {
        self.0.broker.history(channel, filter).await
    }

    /// Subscribers of `channel` on this node.
    pub fn local_subscribers(&self, channel: &ChannelName) -> usize {
        self.0
            .dispatch
            .members(channel)
            .map_or(0, |m| lock(&m).list.len())
    }

    /// Removes `client` from `channel`; tells the broker when this node has
    /// no subscriber left there.
    fn leave(&self, channel: &ChannelName, client: u64) {
        let mut channels = lock(&self.0.dispatch.channels);
        let Some(members) = channels.get(channel) else {
            return;
        };
        let empty = {
            let mut m = lock(members);
            let before = m.list.len();
            m.list.retain(|m| m.client != client);
            let gone = (before - m.list.len()) as i64;
            self.0
                .dispatch
                .metrics
                .subscriptions
                .fetch_sub(gone, Ordering::Relaxed);
            m.list.is_empty()
        };
        if empty {
            channels.remove(channel);
            drop(channels);
            // Off the caller's path (it may be a destructor), and after any
            // engine call before it for this channel: a member that joins
            // meanwhile keeps the engine subscribed (see `interest.rs`).
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let hub = self.clone();
                let channel = channel.clone();
                rt.spawn(async move {
                    let wanted = || hub.local_subscribers(&channel) > 0;
                    let shared = &hub.0;
                    shared
                        .interest
                        .release(&*shared.broker, &channel, wanted)
                        .await;
                });
            }
        }
    }
}

/// One connection's membership in the hub: its queue and its channels.
/// Dropping it leaves every channel.
#[derive(Debug)]
pub struct Client {
    id: u64,
    queue: Arc<Queue>,
    hub: Hub,
    channels: Vec<ChannelName>,
    /// The user it was registered as, for [`Hub::disconnect_user`] (a
    /// `Box<str>`: 8 bytes less than a `String`, which pays for the window
    /// below in a room member's task).
    user: Option<Box<str>>,
    /// The publishes it made this second (`--client-publish-rate`).
    publishes: PublishWindow,
}

impl Client {
    /// Its id, unique across nodes: the node's id and a counter.
    pub fn id(&self) -> String {
        format!("{}-{}", self.hub.0.dispatch.node, self.id)
    }

    /// The hub it belongs to.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// Registers the connection as `user`'s, so that
    /// [`Hub::disconnect_user`] reaches it.
    pub fn set_user(&mut self, user: &str) {
        self.unset_user();
        let mut users = lock(&self.hub.0.dispatch.users);
        users
            .entry(user.to_owned())
            .or_default()
            .push((self.id, Arc::downgrade(&self.queue)));
        self.user = Some(user.into());
    }

    /// Takes up to `wanted` publishes from this connection at `now`
    /// (seconds since the Unix epoch) under `limit` per second (`None`: no
    /// limit); returns how many are allowed, the first ones (see
    /// [`PublishWindow`]).
    pub fn take_publishes(&mut self, now: u64, wanted: usize, limit: Option<NonZeroU32>) -> usize {
        self.publishes.take(now, wanted, limit)
    }

    /// How many more publishes `limit` allows this connection at `now`
    /// (`usize::MAX` without a limit).
    pub fn publishes_left(&self, now: u64, limit: Option<NonZeroU32>) -> usize {
        self.publishes.left(now, limit)
    }

    fn unset_user(&mut self) {
        let Some(user) = self.user.take() else {
            return;
        };
        let mut users = lock(&self.hub.0.dispatch.users);
        if let Some(list) = users.get_mut(&*user) {
            list.retain(|(id, _)| *id != self.id);
            if list.is_empty() {
                users.remove(&*user);
            }
        }
    }

    /// The queue this client's connection writes from.
    pub fn queue(&self) -> &Arc<Queue> {
        &self.queue
    }

    /// The channels it is subscribed to.
    pub fn channels(&self) -> &[ChannelName] {
        &self.channels
    }

    /// Subscribes to `channel`, first queueing what `recover` asks for from
    /// history. Every publication after the join is queued exactly once, in
    /// offset order, after the history: none is lost or repeated between
    /// the history read and the live stream.
    pub async fn subscribe(
        &mut self,
        channel: ChannelName,
        format: Format,
        recover: Recover,
    ) -> Result<Subscribed, EngineError> {
        if self.channels.contains(&channel) {
            self.unsubscribe(&channel);
        }
        {
            let mut channels = lock(&self.hub.0.dispatch.channels);
            let members = channels.entry(channel.clone()).or_default();
            let mut members = lock(members);
            members.list.push(Member {
                client: self.id,
                queue: self.queue.clone(),
                format,
                joining: Some(Box::new(Joining::Reading(Vec::new()))),
                last: 0,
                epoch: "".into(),
            });
        }
        self.hub
            .0
            .dispatch
            .metrics
            .subscriptions
            .fetch_add(1, Ordering::Relaxed);
        // Room for one at first, not four: most clients (every room
        // member) are in one channel, for their whole life.
        if self.channels.capacity() == 0 {
            self.channels.reserve_exact(1);
        }
        self.channels.push(channel.clone());
        let joined = async {
            let shared = &self.hub.0;
            shared.interest.ensure(&*shared.broker, &channel).await?;
            let filter = match &recover {
                Recover::Nothing => HistoryFilter {
                    since: None,
                    limit: Some(0),
                    reverse: false,
                },
                Recover::Last(n) => HistoryFilter {
                    since: None,
                    limit: Some(*n),
                    reverse: true,
                },
                // What fits the queue, within reason: more is queued
                // piece by piece.
                Recover::Since(p) => HistoryFilter {
                    since: Some(p.offset),
                    limit: Some(self.queue.room().0.clamp(1, recovery::FIRST_READ)),
                    reverse: false,
                },
            };
            self.hub.0.broker.history(channel.clone(), filter).await
        }
        .await;
        let history = match joined {
            Ok(h) => h,
            Err(e) => {
                self.unsubscribe(&channel);
                return Err(e);
            }
        };
        self.queue_joined(&channel, format, &recover, history)
    }

    /// Leaves `channel`.
    pub fn unsubscribe(&mut self, channel: &ChannelName) {
        self.channels.retain(|c| c != channel);
        self.hub.leave(channel, self.id);
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.unset_user();
        for channel in std::mem::take(&mut self.channels) {
            self.hub.leave(&channel, self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryBroker;

    /// Most clients (every room member) join one channel for their whole
    /// life: their channel list holds room for one, not the four a `Vec`
    /// grows to at first, and still grows past it.
    #[tokio::test]
    async fn a_client_in_one_channel_keeps_room_for_one() {
        let hub = Hub::new(Arc::new(MemoryBroker::new()));
        let mut client = hub.client(crate::QueueLimits::default());
        let (a, b) = (
            ChannelName::new("a").unwrap(),
            ChannelName::new("b").unwrap(),
        );
        client
            .subscribe(a.clone(), Format::Raw, Recover::Nothing)
            .await
            .unwrap();
        assert_eq!(client.channels.capacity(), 1);
        client
            .subscribe(b.clone(), Format::Raw, Recover::Nothing)
            .await
            .unwrap();
        assert_eq!(client.channels(), [a, b]);
    }

    /// A control message from another node is acted on once (an engine's
    /// catch-up may deliver it again), and only while recent (a user
    /// disconnected long ago may be back); the sender keeps it in history,
    /// so that a node cut off meanwhile still gets it.
    #[tokio::test]
    async fn control_messages_are_acted_on_once_and_only_while_recent() {
        use crate::publication::{HistoryFilter, Publication, now_ms};
        let hub = Hub::new(Arc::new(MemoryBroker::new()));
        let control = ChannelName::new(CONTROL_CHANNEL).unwrap();
        let message = |offset, age_ms: u64| {
            let c = Control {
                node: "another".into(),
                disconnect: "u".into(),
            };
            Publication {
                offset,
                data: serde_json::to_vec(&c).unwrap().into(),
                kind: Kind::Json,
                info: None,
                time_ms: now_ms() - age_ms,
                key: None,
            }
        };
        let closed_by = |p: Publication| {
            let mut client = hub.client(crate::QueueLimits::default());
            client.set_user("u");
            hub.0.dispatch.deliver(&control, &p, "e1");
            client.queue().is_closed()
        };
        assert!(closed_by(message(5, 0)));
        assert!(!closed_by(message(5, 0)), "delivered again");
        assert!(!closed_by(message(6, 120_000)), "two minutes old");
        assert!(closed_by(message(7, 0)));

        hub.disconnect_user_everywhere("v").await.unwrap();
        let filter = HistoryFilter {
            since: None,
            limit: None,
            reverse: false,
        };
        let kept = hub.0.broker.history(control, filter).await.unwrap();
        assert_eq!(kept.publications.len(), 1, "kept for nodes cut off");
    }

    /// An engine that cannot deliver a channel in order says so, and the
    /// channel's members here are cut off (1011), to recover when they can;
    /// other channels' members stay.
    #[tokio::test]
    async fn members_of_a_channel_the_engine_cannot_deliver_are_cut_off() {
        use crate::engine::BrokerEvents;
        let hub = Hub::new(Arc::new(MemoryBroker::new()));
        let (a, b) = (
            ChannelName::new("a").unwrap(),
            ChannelName::new("b").unwrap(),
        );
        let mut in_a = hub.client(crate::QueueLimits::default());
        let mut in_b = hub.client(crate::QueueLimits::default());
        in_a.subscribe(a.clone(), Format::Raw, Recover::Nothing)
            .await
            .unwrap();
        in_b.subscribe(b, Format::Raw, Recover::Nothing)
            .await
            .unwrap();
        hub.0.dispatch.channel_unavailable(&a);
        assert_eq!(in_a.queue().closed().await, crate::QueueClosed::Unavailable);
        assert!(!in_b.queue().is_closed());
    }

    /// A presence manager whose first `add` while held waits to be let go,
    /// noting its channel: a refresh is then under way.
    #[derive(Default)]
    struct Held {
        inner: MemoryPresence,
        held: std::sync::atomic::AtomicBool,
        first: Mutex<Option<ChannelName>>,
        entered: tokio::sync::Notify,
        release: tokio::sync::Notify,
    }

    impl PresenceManager for Held {
        fn add(
            &self,
            c: ChannelName,
            info: ClientInfo,
        ) -> crate::BoxFuture<'_, Result<(), EngineError>> {
            Box::pin(async move {
                if self.held.swap(false, Ordering::SeqCst) {
                    *lock(&self.first) = Some(c.clone());
                    self.entered.notify_one();
                    self.release.notified().await;
                }
                self.inner.add(c, info).await
            })
        }
        fn remove(
            &self,
            c: ChannelName,
            client: String,
        ) -> crate::BoxFuture<'_, Result<(), EngineError>> {
            self.inner.remove(c, client)
        }
        fn presence(
            &self,
            c: ChannelName,
        ) -> crate::BoxFuture<'_, Result<HashMap<String, ClientInfo>, EngineError>> {
            self.inner.presence(c)
        }
    }

    /// A member who leaves while a presence refresh is under way stays
    /// gone: the refresh does not add it again from its snapshot.
    #[tokio::test]
    async fn a_presence_refresh_does_not_bring_back_a_member_who_left() {
        let presence = Arc::new(Held::default());
        let hub = Hub::with_presence(Arc::new(MemoryBroker::new()), presence.clone());
        let info = ClientInfo {
            client: "c1".into(),
            user: "u".into(),
            info: None,
        };
        let (a, b) = (
            ChannelName::new("a").unwrap(),
            ChannelName::new("b").unwrap(),
        );
        hub.presence_add(a.clone(), info.clone()).await.unwrap();
        hub.presence_add(b.clone(), info).await.unwrap();
        presence.held.store(true, Ordering::SeqCst);
        let refreshing = tokio::spawn({
            let hub = hub.clone();
            async move { hub.refresh_presence().await }
        });
        presence.entered.notified().await;
        let first = lock(&presence.first).clone().unwrap();
        let other = if first == a { b } else { a };
        hub.presence_remove(other.clone(), "c1".into())
            .await
            .unwrap();
        presence.release.notify_one();
        refreshing.await.unwrap();
        let left = presence.presence(other).await.unwrap();
        assert!(left.is_empty(), "came back: {left:?}");
    }

    /// A recovery or replay larger than the client's queue would cut the
    /// client off (1013) before it read any of it, at every reconnect: a
    /// replay keeps the newest that fit, and a recovery queues the oldest
    /// that fit and the rest as the client reads (`recovery.rs`).
    #[tokio::test]
    async fn history_larger_than_the_queue_is_not_queued_to_overflow_it() {
        use crate::publication::{HistoryOptions, Kind, NewPublication, PublishOptions};
        let hub = Hub::new(Arc::new(MemoryBroker::new()));
        let channel = ChannelName::new("feed").unwrap();
        let options = PublishOptions {
            history: Some(HistoryOptions {
                size: 100,
                ttl: std::time::Duration::from_secs(60),
            }),
            ..PublishOptions::default()
        };
        let mut epoch = None;
        for i in 1..=5 {
            let publication = NewPublication::new(Kind::Binary, vec![i as u8; 10]);
            let r = hub
                .publish(channel.clone(), publication, options.clone())
                .await
                .unwrap();
            epoch = Some(r.position.epoch);
        }
        let limits = crate::QueueLimits {
            messages: 3,
            ..crate::QueueLimits::default()
        };
        let mut replayer = hub.client(limits);
        let s = replayer
            .subscribe(channel.clone(), Format::Raw, Recover::Last(5))
            .await
            .unwrap();
        assert_eq!(s.from_history, 3);
        let mut popped = Vec::new();
        replayer.queue().pop_all(&mut popped).await.unwrap();
        let firsts: Vec<u8> = popped
            .iter()
            .flat_map(|e| e.messages())
            .map(|q| q.message.message().as_bytes()[0])
            .collect();
        assert_eq!(firsts, [3, 4, 5], "the newest three");

        let since = |offset| {
            Recover::Since(crate::publication::StreamPosition {
                offset,
                epoch: epoch.clone().unwrap(),
            })
        };
        let mut behind = hub.client(limits);
        let s = behind
            .subscribe(channel.clone(), Format::Raw, since(1))
            .await
            .unwrap();
        assert!(s.recovered && s.catching_up, "4 missed, room for 3");
        assert_eq!((s.from_history, behind.queue().len()), (4, 3));
        let mut close = hub.client(limits);
        let s = close
            .subscribe(channel.clone(), Format::Raw, since(2))
            .await
            .unwrap();
        assert!(s.recovered && !s.catching_up, "3 missed, room for 3");
        assert_eq!(close.queue().len(), 3);

        // One message over the byte limit still replays into an empty
        // queue (a push takes it), but not two.
        let small = crate::QueueLimits {
            bytes: 5,
            ..crate::QueueLimits::default()
        };
        let mut one = hub.client(small);
        let s = one
            .subscribe(channel, Format::Raw, Recover::Last(2))
            .await
            .unwrap();
        assert_eq!((s.from_history, one.queue().len()), (1, 1));
    }
}
