//! The tests every engine must pass: the [`Broker`] contract, checked
//! against a real engine. Each engine's test file calls [`run_all`] with a
//! way to make a fresh broker; channel names are random, so engines backed
//! by a shared server (Redis, NATS) can run the suite side by side.
//!
//! ```no_run
//! # async fn t() {
//! use std::sync::Arc;
//! use walkie_hub::{MemoryBroker, conformance};
//!
//! conformance::run_all(|| Arc::new(MemoryBroker::new())).await;
//! # }
//! ```

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use crate::channel::ChannelName;
use crate::engine::{Broker, BrokerEvents};
use crate::memory::lock;
use crate::publication::{
    HistoryFilter, HistoryOptions, Kind, NewPublication, Publication, PublishOptions,
    PublishRequest,
};

/// The address of a service a test needs, from the environment variable
/// `var` (`WALKIE_TEST_REDIS` or `WALKIE_TEST_NATS`; `.ci/run` sets both).
/// Without it, `None`, after saying on the real stderr (not captured by the
/// test harness, so it shows in every run) that `test` was skipped and how
/// to run it.
pub fn service_url(var: &str, test: &str) -> Option<String> {
    let url = std::env::var(var).ok();
    if url.is_none() {
        use std::io::Write as _;
        let example = match var {
            "WALKIE_TEST_REDIS" => "redis://127.0.0.1:6379",
            "WALKIE_TEST_NATS" => "nats://127.0.0.1:4222",
            _ => "URL",
        };
        let _ = writeln!(
            std::io::stderr().lock(),
            "SKIPPED {test}: no service configured; set {var}={example} to run it"
        );
    }
    url
}

/// A key prefix of one test's own, so that tests sharing a server never
/// see each other's channels.
pub fn test_prefix() -> String {
    format!(
        "walkie-test-{}-{:08x}:",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// Publications delivered to a broker's events, in arrival order.
#[derive(Debug, Default)]
pub struct Recorder {
    seen: Mutex<Vec<(ChannelName, Publication, String)>>,
    unavailable: Mutex<Vec<ChannelName>>,
}

impl BrokerEvents for Recorder {
    fn handle_publication(&self, channel: &ChannelName, publication: &Publication, epoch: &str) {
        lock(&self.seen).push((channel.clone(), publication.clone(), epoch.to_owned()));
    }

    fn channel_unavailable(&self, channel: &ChannelName) {
        lock(&self.unavailable).push(channel.clone());
    }
}

impl Recorder {
    /// What was delivered on `channel`.
    pub fn on(&self, channel: &ChannelName) -> Vec<Publication> {
        lock(&self.seen)
            .iter()
            .filter(|(c, _, _)| c == channel)
            .map(|(_, p, _)| p.clone())
            .collect()
    }

    /// How many times the engine said that `channel` cannot be delivered
    /// in order (see [`BrokerEvents::channel_unavailable`]).
    pub fn times_unavailable(&self, channel: &ChannelName) -> usize {
        lock(&self.unavailable)
            .iter()
            .filter(|c| *c == channel)
            .count()
    }

    /// Waits up to 5 s until `n` publications arrived on `channel` (engines
    /// with a network hop deliver after the publish returns).
    pub async fn wait_for(&self, channel: &ChannelName, n: usize) -> Vec<Publication> {
        for _ in 0..500 {
            let got = self.on(channel);
            if got.len() >= n {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.on(channel)
    }
}

/// A broker with a recorder attached and a random channel prefix.
struct Setup {
    broker: Arc<dyn Broker>,
    events: Arc<Recorder>,
    prefix: String,
}

impl Setup {
    async fn new(broker: Arc<dyn Broker>) -> Setup {
        let events = Arc::new(Recorder::default());
        broker.set_events(events.clone());
        Setup {
            broker,
            events,
            prefix: format!("conformance-{:08x}", rand::random::<u32>()),
        }
    }

    async fn channel(&self, name: &str) -> ChannelName {
        let ch = ChannelName::new(&format!("{}:{name}", self.prefix)).unwrap();
        self.broker.subscribe(ch.clone()).await.unwrap();
        ch
    }
}

fn kept(size: usize) -> PublishOptions {
    PublishOptions {
        history: Some(HistoryOptions {
            size,
            ttl: Duration::from_secs(300),
        }),
        ..PublishOptions::default()
    }
}

fn all() -> HistoryFilter {
    HistoryFilter::default()
}

/// How many checks [`run_all`] runs, so many brokers it asks `make` for:
/// engines that open their connections up front open this many.
pub const CHECKS: usize = 13;

/// Runs every check, each on a fresh broker from `make`.
pub async fn run_all<F: Fn() -> Arc<dyn Broker>>(make: F) {
    offsets_have_no_gaps(make()).await;
    history_filters(make()).await;
    history_size_is_bounded(make()).await;
    history_expires(make()).await;
    history_limit_skips_expired(make()).await;
    without_history_offset_is_zero(make()).await;
    epoch_is_stable_until_history_is_removed(make()).await;
    idempotent_publish_is_delivered_once(make()).await;
    idempotency_keys_do_not_cross_nested_channels(make()).await;
    concurrent_publishes_keep_one_order(make()).await;
    channels_are_isolated(make()).await;
    payload_kind_and_key_survive(make()).await;
    publish_many_keeps_order(make()).await;
}

/// Offsets 1, 2, 3... in one epoch, delivered in that order.
pub async fn offsets_have_no_gaps(broker: Arc<dyn Broker>) {
    let s = Setup::new(broker).await;
    let ch = s.channel("gaps").await;
    let mut epoch = None;
    for i in 1..=50u64 {
        let r = s
            .broker
            .publish(ch.clone(), NewPublication::text(format!("m{i}")), kept(100))
            .await
            .unwrap();
        assert_eq!(r.position.offset, i, "offsets follow publish order");
        assert!(!r.suppressed);
        let e = epoch.get_or_insert_with(|| r.position.epoch.clone());
        assert_eq!(*e, r.position.epoch, "one epoch");
    }
    let delivered = s.events.wait_for(&ch, 50).await;
    let offsets: Vec<u64> = delivered.iter().map(|p| p.offset).collect();
    assert_eq!(
        offsets,
        (1..=50).collect::<Vec<_>>(),
        "delivered once each, in order"
    );
    assert_eq!(delivered[9].data, Bytes::from("m10"));
}

/// `since`, `limit`, `reverse`, and a position-only read.
pub async fn history_filters(broker: Arc<dyn Broker>) {
    let s = Setup::new(broker).await;
    let ch = s.channel("filters").await;
    for i in 1..=10 {
        s.broker
            .publish(ch.clone(), NewPublication::text(format!("m{i}")), kept(100))
            .await
            .unwrap();
    }
    let offsets = |h: &crate::History| h.publications.iter().map(|p| p.offset).collect::<Vec<_>>();
    let h = s.broker.history(ch.clone(), all()).await.unwrap();
    assert_eq!(offsets(&h), (1..=10).collect::<Vec<_>>());
    assert_eq!(h.position.offset, 10);
    let f = HistoryFilter {
        since: Some(7),
        ..all()
    };
    assert_eq!(
        offsets(&s.broker.history(ch.clone(), f).await.unwrap()),
        [8, 9, 10]
    );
    let f = HistoryFilter {
        since: Some(2),
        limit: Some(3),
        reverse: false,
    };
    assert_eq!(
        offsets(&s.broker.history(ch.clone(), f).await.unwrap()),
        [3, 4, 5]
    );
    let f = HistoryFilter {
        since: None,
        limit: Some(3),
        reverse: true,
    };
    assert_eq!(
        offsets(&s.broker.history(ch.clone(), f).await.unwrap()),
        [10, 9, 8]
    );
    let f = HistoryFilter {
        since: None,
        limit: Some(0),
        reverse: false,
    };
    let h = s.broker.history(ch.clone(), f).await.unwrap();
    assert!(h.publications.is_empty());
    assert_eq!(h.position.offset, 10);
    let f = HistoryFilter {
        since: Some(10),
        ..all()
    };
    assert!(
        s.broker
            .history(ch.clone(), f)
            .await
            .unwrap()
            .publications
            .is_empty()
    );
}

/// Only the latest `size` messages are kept; offsets go on.
pub async fn history_size_is_bounded(broker: Arc<dyn Broker>) {
    let s = Setup::new(broker).await;
    let ch = s.channel("size").await;
    for i in 1..=25 {
        s.broker
            .publish(ch.clone(), NewPublication::text(format!("m{i}")), kept(10))
            .await
            .unwrap();
    }
    let h = s.broker.history(ch.clone(), all()).await.unwrap();
    let offsets: Vec<u64> = h.publications.iter().map(|p| p.offset).collect();
    assert_eq!(offsets, (16..=25).collect::<Vec<_>>());
    assert_eq!(h.position.offset, 25);
}

/// Messages older than the TTL are gone; the position and epoch are not.
pub async fn history_expires(broker: Arc<dyn Broker>) {
    let s = Setup::new(broker).await;
    let ch = s.channel("ttl").await;
    let short = PublishOptions {
        history: Some(HistoryOptions {
            size: 10,
            ttl: Duration::from_millis(300),
        }),
        ..PublishOptions::default()
    };
    let r = s
        .broker
        .publish(ch.clone(), NewPublication::text("old"), short.clone())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    s.broker
        .publish(ch.clone(), NewPublication::text("new"), short)
        .await
        .unwrap();
    let h = s.broker.history(ch.clone(), all()).await.unwrap();
    let data: Vec<&[u8]> = h.publications.iter().map(|p| &p.data[..]).collect();
    assert_eq!(data, [&b"new"[..]]);
    assert_eq!(h.position.offset, 2);
    assert_eq!(h.position.epoch, r.position.epoch);
}

/// A read with a limit counts only messages still kept: expired ones
/// neither fill the page nor leave a gap in it, so a client paging forward
/// with `since` from an expired offset gets the fresh messages.
pub async fn history_limit_skips_expired(broker: Arc<dyn Broker>) {
    let s = Setup::new(broker).await;
    let ch = s.channel("ttl-limit").await;
    let with_ttl = |ttl: Duration| PublishOptions {
        history: Some(HistoryOptions { size: 10, ttl }),
        ..PublishOptions::default()
    };
    // 1 to 3 are kept a minute, until 4 to 6 say a second: then 1 to 3 are
    // past it while the stream lives on (expiry goes by the latest
    // publish's TTL, and the newest messages have a second to be read).
    for i in 1..=6 {
        let ttl = if i <= 3 {
            Duration::from_secs(60)
        } else {
            Duration::from_secs(1)
        };
        if i == 4 {
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        s.broker
            .publish(
                ch.clone(),
                NewPublication::text(format!("m{i}")),
                with_ttl(ttl),
            )
            .await
            .unwrap();
    }
    let read = |since: Option<u64>, limit: usize, reverse: bool| {
        let (broker, ch) = (s.broker.clone(), ch.clone());
        async move {
            let filter = HistoryFilter {
                since,
                limit: Some(limit),
                reverse,
            };
            let h = broker.history(ch, filter).await.unwrap();
            assert_eq!(h.position.offset, 6);
            h.publications.iter().map(|p| p.offset).collect::<Vec<_>>()
        }
    };
    assert_eq!(read(None, 2, false).await, [4, 5], "the oldest kept first");
    assert_eq!(read(Some(1), 2, false).await, [4, 5], "paging from expired");
    assert_eq!(read(Some(4), 2, false).await, [5, 6], "the next page");
    assert_eq!(read(None, 5, true).await, [6, 5, 4], "newest first");
}

/// A publication without history is delivered with offset 0 and leaves
/// the stream where it was.
pub async fn without_history_offset_is_zero(broker: Arc<dyn Broker>) {
    let s = Setup::new(broker).await;
    let ch = s.channel("nohistory").await;
    s.broker
        .publish(ch.clone(), NewPublication::text("kept"), kept(10))
        .await
        .unwrap();
    let r = s
        .broker
        .publish(
            ch.clone(),
            NewPublication::text("live"),
            PublishOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(r.position.offset, 0);
    let delivered = s.events.wait_for(&ch, 2).await;
    assert_eq!(delivered.len(), 2);
    assert_eq!(delivered[1].offset, 0);
    assert_eq!(delivered[1].data, Bytes::from("live"));
    let h = s.broker.history(ch.clone(), all()).await.unwrap();
    assert_eq!(h.publications.len(), 1);
    assert_eq!(h.position.offset, 1);
}

/// A channel read before any publish has an epoch the first publish keeps;
/// removing history starts a new epoch from offset 0.
pub async fn epoch_is_stable_until_history_is_removed(broker: Arc<dyn Broker>) {
    let s = Setup::new(broker).await;
    let ch = s.channel("epoch").await;
    let before = s.broker.history(ch.clone(), all()).await.unwrap().position;
    assert_eq!(before.offset, 0);
    let again = s.broker.history(ch.clone(), all()).await.unwrap().position;
    assert_eq!(before, again, "reading does not change the epoch");
    let r = s
        .broker
        .publish(ch.clone(), NewPublication::text("x"), kept(10))
        .await
        .unwrap();
    assert_eq!(r.position.epoch, before.epoch);
    s.broker.remove_history(ch.clone()).await.unwrap();
    let after = s.broker.history(ch.clone(), all()).await.unwrap();
    assert!(after.publications.is_empty());
    assert_eq!(after.position.offset, 0);
    assert_ne!(after.position.epoch, before.epoch);
}

/// The same idempotency key on one channel delivers once.
pub async fn idempotent_publish_is_delivered_once(broker: Arc<dyn Broker>) {
    let s = Setup::new(broker).await;
    let ch = s.channel("idem").await;
    let other = s.channel("idem-other").await;
    let opts = PublishOptions {
        idempotency_key: Some("order-17".into()),
        ..kept(10)
    };
    let first = s
        .broker
        .publish(ch.clone(), NewPublication::text("paid"), opts.clone())
        .await
        .unwrap();
    let again = s
        .broker
        .publish(ch.clone(), NewPublication::text("paid"), opts.clone())
        .await
        .unwrap();
    assert!(!first.suppressed);
    assert!(again.suppressed);
    assert_eq!(first.position, again.position);
    let elsewhere = s
        .broker
        .publish(other.clone(), NewPublication::text("paid"), opts)
        .await
        .unwrap();
    assert!(!elsewhere.suppressed, "keys are per channel");
    s.broker
        .publish(ch.clone(), NewPublication::text("next"), kept(10))
        .await
        .unwrap();
    let delivered = s.events.wait_for(&ch, 2).await;
    let data: Vec<&[u8]> = delivered.iter().map(|p| &p.data[..]).collect();
    assert_eq!(data, [&b"paid"[..], b"next"]);
    let h = s.broker.history(ch.clone(), all()).await.unwrap();
    assert_eq!(h.publications.len(), 2);
}

/// Idempotency keys belong to their channel however the names nest: key
/// `a:b` on `room` and key `b` on `room:a` are two keys, so the second
/// publish is delivered and kept like any other.
pub async fn idempotency_keys_do_not_cross_nested_channels(broker: Arc<dyn Broker>) {
    let s = Setup::new(broker).await;
    let room = s.channel("room").await;
    let nested = s.channel("room:a").await;
    let with_key = |key: &str| PublishOptions {
        idempotency_key: Some(key.into()),
        ..kept(10)
    };
    let first = s
        .broker
        .publish(
            room.clone(),
            NewPublication::text("to room"),
            with_key("a:b"),
        )
        .await
        .unwrap();
    let second = s
        .broker
        .publish(
            nested.clone(),
            NewPublication::text("to room:a"),
            with_key("b"),
        )
        .await
        .unwrap();
    assert!(!first.suppressed);
    assert!(!second.suppressed, "another channel's key");
    assert_eq!(second.position.offset, 1, "saved in its own stream");
    let delivered = s.events.wait_for(&nested, 1).await;
    let data: Vec<&[u8]> = delivered.iter().map(|p| &p.data[..]).collect();
    assert_eq!(data, [&b"to room:a"[..]]);
    let h = s.broker.history(nested.clone(), all()).await.unwrap();
    assert_eq!(h.publications.len(), 1);
}

/// Many publishers on one channel: unique offsets, delivered in order.
pub async fn concurrent_publishes_keep_one_order(broker: Arc<dyn Broker>) {
    let s = Setup::new(broker).await;
    let ch = s.channel("concurrent").await;
    let mut tasks = Vec::new();
    for t in 0..8 {
        let broker = s.broker.clone();
        let ch = ch.clone();
        tasks.push(tokio::spawn(async move {
            let mut offsets = Vec::new();
            for i in 0..25 {
                let r = broker
                    .publish(
                        ch.clone(),
                        NewPublication::text(format!("{t}-{i}")),
                        kept(1000),
                    )
                    .await
                    .unwrap();
                offsets.push(r.position.offset);
            }
            offsets
        }));
    }
    let mut all_offsets = Vec::new();
    for t in tasks {
        let offsets = t.await.unwrap();
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "one publisher's order kept"
        );
        all_offsets.extend(offsets);
    }
    all_offsets.sort_unstable();
    assert_eq!(all_offsets, (1..=200).collect::<Vec<_>>());
    let delivered = s.events.wait_for(&ch, 200).await;
    let offsets: Vec<u64> = delivered.iter().map(|p| p.offset).collect();
    assert_eq!(offsets, (1..=200).collect::<Vec<_>>());
}

/// One channel's messages never show up in another's.
pub async fn channels_are_isolated(broker: Arc<dyn Broker>) {
    let s = Setup::new(broker).await;
    let a = s.channel("a").await;
    let b = s.channel("b").await;
    s.broker
        .publish(a.clone(), NewPublication::text("for a"), kept(10))
        .await
        .unwrap();
    let hb = s.broker.history(b.clone(), all()).await.unwrap();
    assert!(hb.publications.is_empty());
    assert_eq!(hb.position.offset, 0);
    s.events.wait_for(&a, 1).await;
    assert!(s.events.on(&b).is_empty());
}

/// The payload's kind, its key and the publisher's info are kept, in delivery and in
/// history.
pub async fn payload_kind_and_key_survive(broker: Arc<dyn Broker>) {
    let s = Setup::new(broker).await;
    let ch = s.channel("kinds").await;
    let mut keyed = NewPublication::binary(vec![0u8, 159, 146, 150, 255]);
    keyed.key = Some("home".into());
    keyed.info = Some(Bytes::from_static(br#"{"user":"42"}"#));
    s.broker
        .publish(ch.clone(), keyed.clone(), kept(10))
        .await
        .unwrap();
    s.broker
        .publish(
            ch.clone(),
            NewPublication::new(Kind::Json, r#"{"score":"héllo"}"#),
            kept(10),
        )
        .await
        .unwrap();
    let h = s.broker.history(ch.clone(), all()).await.unwrap();
    let delivered = s.events.wait_for(&ch, 2).await;
    for list in [&h.publications, &delivered] {
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].kind, Kind::Binary);
        assert_eq!(list[0].data, keyed.data);
        assert_eq!(list[0].key.as_deref(), Some("home"));
        assert_eq!(list[0].info, keyed.info);
        assert_eq!(list[1].kind, Kind::Json);
        assert_eq!(list[1].data, Bytes::from(r#"{"score":"héllo"}"#));
        assert_eq!(list[1].key, None);
        assert_eq!(list[1].info, None);
        assert!(list[1].time_ms >= list[0].time_ms);
    }
}

/// Runs every presence check, each on a fresh manager from `make`.
pub async fn run_presence<F: Fn() -> Arc<dyn crate::PresenceManager>>(make: F) {
    presence_add_remove_and_isolation(make()).await;
}

/// Adding is idempotent, removing works, channels are isolated, and stats
/// count users once however many connections they have.
pub async fn presence_add_remove_and_isolation(p: Arc<dyn crate::PresenceManager>) {
    use crate::{ClientInfo, PresenceStats};
    let prefix = format!("conformance-{:08x}", rand::random::<u32>());
    let a = ChannelName::new(&format!("{prefix}:a")).unwrap();
    let b = ChannelName::new(&format!("{prefix}:b")).unwrap();
    let info = |client: &str, user: &str| ClientInfo {
        client: client.into(),
        user: user.into(),
        info: Some(Bytes::from_static(br#"{"name":"x"}"#)),
    };
    p.add(a.clone(), info("c1", "42")).await.unwrap();
    p.add(a.clone(), info("c1", "42")).await.unwrap();
    p.add(a.clone(), info("c2", "42")).await.unwrap();
    p.add(a.clone(), info("c3", "43")).await.unwrap();
    let now = p.presence(a.clone()).await.unwrap();
    assert_eq!(now.len(), 3);
    assert_eq!(now["c1"], info("c1", "42"));
    assert_eq!(
        PresenceStats::of(&now),
        PresenceStats {
            clients: 3,
            users: 2
        }
    );
    assert!(p.presence(b.clone()).await.unwrap().is_empty());
    p.remove(a.clone(), "c2".into()).await.unwrap();
    p.remove(a.clone(), "absent".into()).await.unwrap();
    let now = p.presence(a.clone()).await.unwrap();
    let mut ids: Vec<_> = now.keys().cloned().collect();
    ids.sort();
    assert_eq!(ids, ["c1", "c3"]);
    p.remove(a.clone(), "c1".into()).await.unwrap();
    p.remove(a.clone(), "c3".into()).await.unwrap();
    assert!(p.presence(a).await.unwrap().is_empty());
}

/// A batch is published in order, as single publishes would be: one
/// result each, offsets without gaps, a key used earlier in the batch
/// suppresses the later message, and channels may be mixed.
pub async fn publish_many_keeps_order(broker: Arc<dyn Broker>) {
    let s = Setup::new(broker).await;
    let ch = s.channel("many").await;
    let other = s.channel("many-other").await;
    s.broker
        .publish(ch.clone(), NewPublication::text("m1"), kept(100))
        .await
        .unwrap();
    let request = |channel: &ChannelName, text: String, options: PublishOptions| PublishRequest {
        channel: channel.clone(),
        publication: NewPublication::text(text),
        options,
    };
    let keyed = PublishOptions {
        idempotency_key: Some("batch-key".into()),
        ..kept(100)
    };
    let mut batch: Vec<PublishRequest> = (2..=30)
        .map(|i| request(&ch, format!("m{i}"), kept(100)))
        .collect();
    batch.insert(10, request(&other, "elsewhere".into(), kept(100)));
    // Between saved ones, one that saves nothing.
    let unsaved = PublishOptions::default();
    batch.insert(20, request(&other, "unsaved".into(), unsaved));
    batch.push(request(&ch, "keyed".into(), keyed.clone()));
    batch.push(request(&ch, "again".into(), keyed));
    let results: Vec<_> = s
        .broker
        .publish_many(batch)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let offsets: Vec<u64> = results.iter().map(|r| r.position.offset).collect();
    let mut expected: Vec<u64> = (2..=30).collect();
    expected.insert(10, 1);
    expected.insert(20, 0);
    expected.extend([31, 31]);
    assert_eq!(offsets, expected, "one result each, in order");
    assert!(
        !results[31].suppressed,
        "the first use of a key is published"
    );
    assert!(results[32].suppressed, "a key used earlier in the batch");
    assert_eq!(results[31].position, results[32].position);
    assert!(s.broker.publish_many(Vec::new()).await.is_empty());
    let delivered = s.events.wait_for(&ch, 31).await;
    let data: Vec<String> = delivered
        .iter()
        .map(|p| String::from_utf8_lossy(&p.data).into_owned())
        .collect();
    let mut expected: Vec<String> = (1..=30).map(|i| format!("m{i}")).collect();
    expected.push("keyed".into());
    assert_eq!(data, expected, "delivered once each, in order");
    let offsets: Vec<u64> = delivered.iter().map(|p| p.offset).collect();
    assert_eq!(offsets, (1..=31).collect::<Vec<_>>());
    let elsewhere = s.events.wait_for(&other, 2).await;
    let data: Vec<&[u8]> = elsewhere.iter().map(|p| &p.data[..]).collect();
    assert_eq!(data, [&b"elsewhere"[..], b"unsaved"]);
    // Nothing delivered twice, however late.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(s.events.on(&ch).len(), 31);
    assert_eq!(s.events.on(&other).len(), 2);
    let h = s.broker.history(ch.clone(), all()).await.unwrap();
    assert_eq!(h.publications.len(), 31);
}
