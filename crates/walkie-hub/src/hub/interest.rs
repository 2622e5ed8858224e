//! This node's interest in channels, as told to the engine: subscribed
//! while the channel has members here, in the order members come and go.
//!
//! The engine's `subscribe` and `unsubscribe` take time (a round trip to
//! Redis or NATS) and are not ordered among themselves: an unsubscribe
//! still on its way when the next member joins would land after that
//! member's subscribe and leave the node deaf to the channel, and a member
//! joining while the first one's subscribe is on its way would read
//! history before the engine delivers, and miss what came in between.
//! Each channel therefore has a gate: one engine call at a time, and a
//! flag that says what the engine was last told.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::channel::ChannelName;
use crate::engine::{Broker, EngineError};
use crate::memory::lock;

/// A channel's gate: whether the engine is subscribed, behind an async
/// lock held across the call that changes it.
type Gate = Arc<tokio::sync::Mutex<bool>>;

/// The gates of the channels this node has (or just had) members in.
#[derive(Default)]
pub(super) struct Interest(Mutex<HashMap<ChannelName, Gate>>);

impl Interest {
    fn gate(&self, channel: &ChannelName) -> Gate {
        lock(&self.0).entry(channel.clone()).or_default().clone()
    }

    /// Makes sure the engine delivers `channel` to this node, and returns
    /// once it does: a subscribe still on its way for another member is
    /// waited for.
    pub(super) async fn ensure(
        &self,
        broker: &dyn Broker,
        channel: &ChannelName,
    ) -> Result<(), EngineError> {
        let gate = self.gate(channel);
        let mut subscribed = gate.lock().await;
        if !*subscribed {
            broker.subscribe(channel.clone()).await?;
            *subscribed = true;
        }
        Ok(())
    }

    /// Unsubscribes the engine from `channel`, unless `wanted` says that a
    /// member joined meanwhile; then forgets the gate if nobody holds it.
    pub(super) async fn release(
        &self,
        broker: &dyn Broker,
        channel: &ChannelName,
        wanted: impl Fn() -> bool,
    ) {
        let gate = self.gate(channel);
        {
            let mut subscribed = gate.lock().await;
            if *subscribed && !wanted() {
                if let Err(e) = broker.unsubscribe(channel.clone()).await {
                    tracing::warn!(%channel, "unsubscribe failed: {e}");
                }
                *subscribed = false;
            }
        }
        let mut gates = lock(&self.0);
        // Gates are handed out under this lock: two references (the map's
        // and ours) mean nobody else is between `gate` and the call.
        let idle = gates
            .get(channel)
            .is_some_and(|g| Arc::strong_count(g) == 2 && g.try_lock().is_ok_and(|s| !*s));
        if idle {
            gates.remove(channel);
        }
    }

    /// Channels with a gate: for tests.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        lock(&self.0).len()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::time::Duration;

    use super::*;
    use crate::engine::BoxFuture;
    use crate::hub::{Format, Hub, Recover};
    use crate::memory::MemoryBroker;
    use crate::publication::PublishResult;
    use crate::publication::{History, HistoryFilter, NewPublication, PublishOptions};
    use crate::queue::QueueLimits;

    /// A memory broker whose subscribe and unsubscribe take a while, as
    /// a network engine's do, and which keeps the set of channels it was
    /// left subscribed to; each history read notes whether its channel was
    /// subscribed then.
    #[derive(Default)]
    struct Remote {
        inner: MemoryBroker,
        subscribed: Mutex<HashSet<String>>,
        read_while_subscribed: Mutex<Vec<bool>>,
    }

    impl Remote {
        fn has(&self, channel: &str) -> bool {
            lock(&self.subscribed).contains(channel)
        }
    }

    impl Broker for Remote {
        fn set_events(&self, events: Arc<dyn crate::engine::BrokerEvents>) {
            self.inner.set_events(events)
        }
        fn subscribe(&self, c: ChannelName) -> BoxFuture<'_, Result<(), EngineError>> {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                lock(&self.subscribed).insert(c.as_str().to_owned());
                Ok(())
            })
        }
        fn unsubscribe(&self, c: ChannelName) -> BoxFuture<'_, Result<(), EngineError>> {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                lock(&self.subscribed).remove(c.as_str());
                Ok(())
            })
        }
        fn publish(
            &self,
            c: ChannelName,
            p: NewPublication,
            o: PublishOptions,
        ) -> BoxFuture<'_, Result<PublishResult, EngineError>> {
            self.inner.publish(c, p, o)
        }
        fn history(
            &self,
            c: ChannelName,
            f: HistoryFilter,
        ) -> BoxFuture<'_, Result<History, EngineError>> {
            let subscribed = self.has(c.as_str());
            lock(&self.read_while_subscribed).push(subscribed);
            self.inner.history(c, f)
        }
        fn remove_history(&self, c: ChannelName) -> BoxFuture<'_, Result<(), EngineError>> {
            self.inner.remove_history(c)
        }
    }

    /// The only member leaves and another joins at once (a page reload
    /// on a one-member channel): the unsubscribe still on its way must not
    /// land after the new member's subscribe.
    #[tokio::test]
    async fn a_member_joining_as_the_last_leaves_keeps_the_engine_subscribed() {
        let broker = Arc::new(Remote::default());
        let hub = Hub::new(broker.clone());
        let channel = ChannelName::new("game").unwrap();
        let mut first = hub.client(QueueLimits::default());
        first
            .subscribe(channel.clone(), Format::Raw, Recover::Nothing)
            .await
            .unwrap();
        first.unsubscribe(&channel);
        let mut second = hub.client(QueueLimits::default());
        second
            .subscribe(channel.clone(), Format::Raw, Recover::Nothing)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(broker.has("game"), "a member here, the engine told to stop");

        drop(second);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!broker.has("game"), "no member left, still subscribed");
        assert_eq!(hub.0.interest.len(), 0, "the gate is forgotten");
    }

    /// Two members join at once: the second waits for the engine's
    /// subscribe that the first started before it reads history, or what
    /// is published in between would reach neither history nor it.
    #[tokio::test]
    async fn a_member_joining_during_the_first_subscribe_waits_for_it() {
        let broker = Arc::new(Remote::default());
        let hub = Hub::new(broker.clone());
        let channel = ChannelName::new("game").unwrap();
        let (mut a, mut b) = (
            hub.client(QueueLimits::default()),
            hub.client(QueueLimits::default()),
        );
        let (ra, rb) = tokio::join!(
            a.subscribe(channel.clone(), Format::Raw, Recover::Nothing),
            b.subscribe(channel.clone(), Format::Raw, Recover::Nothing),
        );
        ra.unwrap();
        rb.unwrap();
        assert_eq!(*lock(&broker.read_while_subscribed), [true, true]);
    }
}
