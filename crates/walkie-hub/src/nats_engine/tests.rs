//! Tests of the NATS engine that reach into it (its client, subjects and
//! counters) and need a NATS server: `WALKIE_TEST_NATS` (`.ci/run` sets
//! it); without it they say they were skipped. Each deletes what it made.
//! The tests through the public API are in `tests/nats_engine.rs`.

use std::sync::Arc;
use std::time::Duration;

use super::{CONNECTS_CHECK, Inner, LAYOUT, NatsBroker};
use crate::channel::ChannelName;
use crate::conformance::{Recorder, service_url, test_prefix};
use crate::engine::EngineError;
use crate::engine::{Broker as _, BrokerEvents};
use crate::publication::{
    HistoryOptions, NewPublication, Publication, PublishOptions, PublishRequest, StreamPosition,
};

fn nats(test: &str) -> Option<String> {
    service_url("WALKIE_TEST_NATS", test)
}

/// History of at most `size` messages.
fn kept_at_most(size: usize) -> PublishOptions {
    PublishOptions {
        history: Some(HistoryOptions {
            size,
            ttl: Duration::from_secs(300),
        }),
        ..PublishOptions::default()
    }
}

fn kept() -> PublishOptions {
    kept_at_most(1000)
}

/// Runs `test` with two brokers (two nodes) on a fresh prefix, then
/// deletes everything under it, then fails if the test did. Without
/// `WALKIE_TEST_NATS`, says `name` was skipped.
async fn on_two_nodes<F, Fut>(name: &str, test: F)
where
    F: FnOnce(NatsBroker, NatsBroker, String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(url) = nats(name) else {
        return;
    };
    let prefix = test_prefix();
    let one = NatsBroker::connect(&url, &prefix).await.unwrap();
    let two = NatsBroker::connect(&url, &prefix).await.unwrap();
    let outcome = tokio::spawn(test(one.clone(), two, url)).await;
    one.delete_all().await.unwrap();
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// `(offset, text)` of each publication.
fn texts(ps: &[Publication]) -> Vec<(u64, String)> {
    ps.iter()
        .map(|p| (p.offset, String::from_utf8_lossy(&p.data).into_owned()))
        .collect()
}

fn owned<const N: usize>(want: [(u64, &str); N]) -> Vec<(u64, String)> {
    want.map(|(o, t)| (o, t.to_owned())).to_vec()
}

/// The name of the stream that saves `channel` now.
async fn stream_of(broker: &NatsBroker, channel: &ChannelName) -> String {
    let inner = &broker.inner;
    inner
        .js
        .stream_by_subject(inner.saved_subject(channel))
        .await
        .unwrap()
}

/// Sends what `stream` would republish as its message `seq` to the
/// channel's delivery subject, by hand.
async fn inject(inner: &Inner, channel: &ChannelName, stream: &str, seq: u64, text: &str) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(async_nats::header::NATS_STREAM, stream);
    headers.insert(async_nats::header::NATS_SEQUENCE, seq.to_string().as_str());
    headers.insert(
        async_nats::header::NATS_LAST_SEQUENCE,
        (seq - 1).to_string().as_str(),
    );
    let body = crate::codec::encode(&NewPublication::text(text).at(0));
    inner
        .client
        .publish_with_headers(inner.delivery_subject(channel), headers, body.into())
        .await
        .unwrap();
}

/// Holds the delivery task in its first publication until told to go
/// (blocking its thread, as a hub that cannot keep up would), then
/// records like a [`Recorder`].
struct Stalled {
    go: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
    seen: Recorder,
}

impl BrokerEvents for Stalled {
    fn handle_publication(&self, channel: &ChannelName, p: &Publication, epoch: &str) {
        if p.offset == 1 {
            let go = self.go.lock().unwrap();
            let _ = go.recv_timeout(Duration::from_secs(20));
        }
        self.seen.handle_publication(channel, p, epoch);
    }
}

/// Messages the NATS client dropped while the channel's task was stuck
/// (a slow consumer) are read back at once, though nothing is published
/// after them: the slow-consumer event makes every channel catch up.
#[test]
fn messages_dropped_by_a_slow_consumer_are_read_back_on_a_quiet_channel() {
    let Some(url) = nats("messages_dropped_by_a_slow_consumer_are_read_back_on_a_quiet_channel")
    else {
        return;
    };
    let prefix = test_prefix();
    // The NATS clients' connections run here; the stuck delivery task
    // runs on its own thread (below), so that it stalls nothing else.
    let nats = tokio::runtime::Runtime::new().unwrap();
    let capacity = 8;
    let node = nats
        .block_on(NatsBroker::connect_with(&url, &prefix, capacity))
        .unwrap();
    let publisher = nats.block_on(NatsBroker::connect(&url, &prefix)).unwrap();
    let (go, wait) = std::sync::mpsc::channel();
    let events = Arc::new(Stalled {
        go: std::sync::Mutex::new(wait),
        seen: Recorder::default(),
    });
    node.set_events(events.clone());
    let channel = ChannelName::new("slow").unwrap();
    let total = 100u64;
    let delivery = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (publishing, offsets) = delivery.block_on(async {
        node.subscribe(channel.clone()).await.unwrap();
        // Published from the other runtime: this thread is stuck from
        // the first delivery until `go`.
        let publishing = nats.spawn({
            let (publisher, channel) = (publisher.clone(), channel.clone());
            async move {
                for i in 1..=total {
                    let m = NewPublication::text(format!("m{i}"));
                    publisher.publish(channel.clone(), m, kept()).await.unwrap();
                }
                // Time for the republished copies to reach the node and
                // overflow its buffer.
                tokio::time::sleep(Duration::from_millis(500)).await;
                let _ = go.send(());
            }
        });
        let mut offsets = Vec::new();
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            offsets = events.seen.on(&channel).iter().map(|p| p.offset).collect();
            if offsets.len() as u64 >= total {
                break;
            }
        }
        (publishing, offsets)
    });
    nats.block_on(async {
        publishing.await.unwrap();
        publisher.delete_all().await.unwrap();
    });
    assert_eq!(
        offsets,
        (1..=total).collect::<Vec<_>>(),
        "every message, once, in order"
    );
}

/// A message of a removed history that arrives after the new epoch's
/// first (a republish delayed in a cluster, sent here by hand) is
/// dropped: it neither reaches the hub nor makes the next message of the
/// new epoch read its stream back again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_message_of_a_removed_history_is_dropped() {
    let name = "a_late_message_of_a_removed_history_is_dropped";
    on_two_nodes(name, |broker, _, _| async move {
        let events = Arc::new(Recorder::default());
        broker.set_events(events.clone());
        let channel = ChannelName::new("epochs").unwrap();
        let publish = |text: &'static str| {
            broker.publish(channel.clone(), NewPublication::text(text), kept())
        };
        broker.subscribe(channel.clone()).await.unwrap();
        publish("a1").await.unwrap();
        publish("a2").await.unwrap();
        events.wait_for(&channel, 2).await;
        let old = stream_of(&broker, &channel).await;
        broker.remove_history(channel.clone()).await.unwrap();
        publish("b1").await.unwrap();
        events.wait_for(&channel, 3).await;
        // What the old stream would have republished third.
        inject(&broker.inner, &channel, &old, 3, "a3").await;
        publish("b2").await.unwrap();
        events.wait_for(&channel, 4).await;
        // Time for anything else to arrive.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let want = owned([(1, "a1"), (2, "a2"), (1, "b1"), (2, "b2")]);
        assert_eq!(texts(&events.on(&channel)), want);
    })
    .await;
}

/// History removed twice while this node delivered nothing of the middle
/// epoch: a late message of that epoch (its stream gone) is dropped, and
/// delivery stays with the live epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_message_of_a_skipped_epoch_does_not_take_delivery_away() {
    let name = "a_late_message_of_a_skipped_epoch_does_not_take_delivery_away";
    on_two_nodes(name, |broker, other, _| async move {
        let events = Arc::new(Recorder::default());
        broker.set_events(events.clone());
        let channel = ChannelName::new("skipped").unwrap();
        let publish =
            |text: &'static str| other.publish(channel.clone(), NewPublication::text(text), kept());
        broker.subscribe(channel.clone()).await.unwrap();
        publish("a1").await.unwrap();
        events.wait_for(&channel, 1).await;
        // The other node removes the history twice; this one sees nothing
        // of the middle stream.
        other.remove_history(channel.clone()).await.unwrap();
        let middle = stream_of(&other, &channel).await;
        other.remove_history(channel.clone()).await.unwrap();
        publish("c1").await.unwrap();
        events.wait_for(&channel, 2).await;
        inject(&broker.inner, &channel, &middle, 1, "b1").await;
        publish("c2").await.unwrap();
        events.wait_for(&channel, 3).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let want = owned([(1, "a1"), (1, "c1"), (2, "c2")]);
        assert_eq!(texts(&events.on(&channel)), want);
    })
    .await;
}

/// A reconnect whose event the client dropped (its event channel was
/// full) is still noticed, from the client's count of connections, and
/// counted once: every channel catches up as after any reconnect.
#[tokio::test]
async fn a_reconnect_without_its_event_is_noticed_once() {
    let name = "a_reconnect_without_its_event_is_noticed_once";
    on_two_nodes(name, |broker, _, _| async move {
        use std::sync::atomic::Ordering::Relaxed;
        let mut caught_up = broker.inner.catch_ups.subscribe();
        assert_eq!(broker.reconnects(), 0);
        // What the client counts when it connects again; no event follows.
        let stats = broker.inner.client.statistics();
        stats.connects.fetch_add(1, Relaxed);
        tokio::time::timeout(CONNECTS_CHECK * 3, caught_up.changed())
            .await
            .expect("no catch-up within three checks")
            .unwrap();
        assert_eq!(broker.reconnects(), 1);
        tokio::time::sleep(CONNECTS_CHECK * 2).await;
        assert_eq!(broker.reconnects(), 1, "counted once");
    })
    .await;
}

/// A channel of a batch whose stream was deleted behind this node's back
/// (its cached name is stale, and nothing of it is saved) is published
/// again one at a time into a new stream; the batch's other channel goes
/// on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_channel_whose_stream_was_deleted_is_published_again() {
    let name = "a_batch_channel_whose_stream_was_deleted_is_published_again";
    on_two_nodes(name, |one, _, _| async move {
        let a = ChannelName::new("chat:kept").unwrap();
        let b = ChannelName::new("chat:deleted").unwrap();
        one.publish(a.clone(), NewPublication::text("m1"), kept())
            .await
            .unwrap();
        let before = one
            .publish(b.clone(), NewPublication::text("b0"), kept())
            .await
            .unwrap()
            .position;
        // b's stream, known to node one with its limits, deleted by an
        // operator (or another node's idle sweep).
        let stream = stream_of(&one, &b).await;
        one.inner.js.delete_stream(&stream).await.unwrap();
        let request = |channel: &ChannelName, text: &str| PublishRequest {
            channel: channel.clone(),
            publication: NewPublication::text(text),
            options: kept(),
        };
        let batch = vec![
            request(&a, "m2"),
            request(&b, "b1"),
            request(&a, "m3"),
            request(&b, "b2"),
        ];
        let results: Vec<_> = one
            .publish_many(batch)
            .await
            .into_iter()
            .map(|r| r.unwrap().position)
            .collect();
        let offsets: Vec<u64> = results.iter().map(|p| p.offset).collect();
        assert_eq!(offsets, [2, 1, 3, 2]);
        assert_ne!(results[1].epoch, before.epoch, "a new stream");
        let h = one.history(b.clone(), Default::default()).await.unwrap();
        assert_eq!(texts(&h.publications), owned([(1, "b1"), (2, "b2")]));
    })
    .await;
}

#[tokio::test]
async fn a_prefix_of_another_layout_is_refused() {
    on_two_nodes(
        "a_prefix_of_another_layout_is_refused",
        |one, _, url| async move {
            let i = &one.inner;
            let meta = i.js.get_key_value(i.bucket("meta")).await.unwrap();
            let found = meta.get("layout").await.unwrap();
            assert_eq!(
                found.as_deref(),
                Some(&b"1"[..]),
                "a new prefix records its layout"
            );
            meta.put("layout", (LAYOUT + 1).to_string().into())
                .await
                .unwrap();
            let prefix = i.token.clone();
            match NatsBroker::connect(&url, &prefix).await {
                Err(EngineError::Storage(m)) => assert!(m.contains("of layout 2"), "{m}"),
                other => panic!("started on streams of another layout: {other:?}"),
            }
        },
    )
    .await;
}

/// More concurrent batches than the JetStream context's 5,000 publishes
/// in flight: each batch awaits the acknowledgements of a chunk
/// (`BATCH_CHUNK`) before it sends more, so all complete, in order. Sent
/// whole before awaiting any acknowledgement, the batches each held part
/// of the permits while waiting for more, and none completed. (The shared
/// bound on chunks in flight, `BATCH_CHUNKS_IN_FLIGHT`, is not needed for
/// that; it keeps one node's bursts from taking every permit, so that a
/// single publish always finds room: the batches here reach it, and never
/// pass it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batches_past_the_in_flight_limit_all_complete_in_order() {
    let name = "concurrent_batches_past_the_in_flight_limit_all_complete_in_order";
    on_two_nodes(name, |one, _, _| async move {
        const BATCHES: usize = 120;
        const EACH: usize = 200;
        let mut tasks = tokio::task::JoinSet::new();
        for b in 0..BATCHES {
            let one = one.clone();
            tasks.spawn(async move {
                let channel = ChannelName::new(&format!("load:{}", b % 40)).unwrap();
                let batch = (0..EACH)
                    .map(|i| PublishRequest {
                        channel: channel.clone(),
                        publication: NewPublication::text(format!("{b}:{i}")),
                        options: kept(),
                    })
                    .collect();
                let offsets: Vec<u64> = one
                    .publish_many(batch)
                    .await
                    .into_iter()
                    .map(|r| r.unwrap().position.offset)
                    .collect();
                (channel, offsets)
            });
        }
        let done = tokio::time::timeout(Duration::from_secs(30), tasks.join_all())
            .await
            .expect("batches still waiting after 30 s");
        use std::sync::atomic::Ordering::SeqCst;
        let chunks = &one.inner.chunks;
        assert_eq!(chunks.total.load(SeqCst), BATCHES * EACH.div_ceil(64));
        let peak = chunks.peak.load(SeqCst);
        assert!(
            (2..=super::BATCH_CHUNKS_IN_FLIGHT).contains(&peak),
            "{peak} chunks in flight at once"
        );
        let mut per_channel: std::collections::HashMap<_, Vec<u64>> = Default::default();
        for (channel, offsets) in done {
            assert!(offsets.windows(2).all(|w| w[1] > w[0]), "{offsets:?}");
            per_channel.entry(channel).or_default().extend(offsets);
        }
        // Three batches per channel: offsets 1 to 600, each once.
        for (channel, mut offsets) in per_channel {
            offsets.sort_unstable();
            let want: Vec<u64> = (1..=(3 * EACH) as u64).collect();
            assert_eq!(offsets, want, "{channel}");
        }
    })
    .await;
}

/// A reconnect makes every channel catch up, at most 16
/// ([`MAX_CATCH_UPS`](super::delivery::MAX_CATCH_UPS)) at once: a node with
/// many channels does not send a request per channel all together.
/// Each channel then still delivers, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_sixteen_channels_catch_up_at_once() {
    use std::sync::atomic::Ordering::SeqCst;
    let name = "at_most_sixteen_channels_catch_up_at_once";
    on_two_nodes(name, |broker, _, _| async move {
        let events = Arc::new(Recorder::default());
        broker.set_events(events.clone());
        let channels: Vec<_> = (0..48)
            .map(|i| ChannelName::new(&format!("many:{i}")).unwrap())
            .collect();
        let publish = |ch: &ChannelName, text: &'static str| {
            broker.publish(ch.clone(), NewPublication::text(text), kept())
        };
        for ch in &channels {
            broker.subscribe(ch.clone()).await.unwrap();
            publish(ch, "m1").await.unwrap();
        }
        for ch in &channels {
            events.wait_for(ch, 1).await;
        }
        let gauge = &broker.inner.resuming;
        let before = gauge.total.load(SeqCst);
        // As after a reconnect.
        broker.inner.catch_ups.send_modify(|n| n.reconnects += 1);
        tokio::time::timeout(Duration::from_secs(20), async {
            while gauge.total.load(SeqCst) < before + channels.len() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("not every channel caught up within 20 s");
        let peak = gauge.peak.load(SeqCst);
        assert!(peak <= 16, "{peak} at once");
        for ch in &channels {
            publish(ch, "m2").await.unwrap();
        }
        for ch in &channels {
            events.wait_for(ch, 2).await;
            assert_eq!(texts(&events.on(ch)), owned([(1, "m1"), (2, "m2")]), "{ch}");
        }
    })
    .await;
}

/// A catch-up (after a reconnect) that finds some of the missed messages
/// trimmed delivers nothing past the gap, tells the hub (which cuts the
/// channel's members off to recover) and goes on from the stream's
/// position; with every missed message kept, it delivers them all. The
/// gap was silent before: what was kept was delivered after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_past_a_trimmed_gap_cuts_the_channel_off() {
    let name = "a_catch_up_past_a_trimmed_gap_cuts_the_channel_off";
    on_two_nodes(name, |one, two, _| async move {
        let events = Arc::new(Recorder::default());
        one.set_events(events.clone());
        let ch = ChannelName::new("trimmed-catch-up").unwrap();
        let start = one.inner.position(&ch).await.unwrap();
        assert_eq!(start.offset, 0);
        let ten = kept_at_most(10);
        for i in 1..=13 {
            let m = NewPublication::text(format!("m{i}"));
            two.publish(ch.clone(), m, ten.clone()).await.unwrap();
        }
        let mut at = start.clone();
        one.inner.catch_up_at(&ch, &mut at, false).await.unwrap();
        assert!(events.on(&ch).is_empty(), "nothing past the gap");
        assert_eq!(events.times_unavailable(&ch), 1);
        assert_eq!(at.offset, 13, "on from the stream's position");
        // From the last one before what is kept: no gap.
        let mut at = StreamPosition {
            offset: 3,
            epoch: start.epoch.clone(),
        };
        one.inner.catch_up_at(&ch, &mut at, false).await.unwrap();
        let offsets: Vec<u64> = events.on(&ch).iter().map(|p| p.offset).collect();
        assert_eq!(offsets, (4..=13).collect::<Vec<_>>());
        assert_eq!(events.times_unavailable(&ch), 1);
    })
    .await;
}

/// A saved message whose predecessors cannot be read back any more
/// (trimmed before this node read them: here they never were) is not
/// delivered after the gap: the hub is told, and what comes next is
/// delivered. It was delivered silently before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_message_after_a_trimmed_gap_cuts_the_channel_off() {
    let name = "a_saved_message_after_a_trimmed_gap_cuts_the_channel_off";
    on_two_nodes(name, |one, _, _| async move {
        let events = Arc::new(Recorder::default());
        one.set_events(events.clone());
        let ch = ChannelName::new("trimmed-live").unwrap();
        one.subscribe(ch.clone()).await.unwrap();
        let stream = stream_of(&one, &ch).await;
        // As the stream would republish its 5th message: 1 to 4 are not
        // in it.
        inject(&one.inner, &ch, &stream, 5, "m5").await;
        tokio::time::timeout(Duration::from_secs(10), async {
            while events.times_unavailable(&ch) == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the hub was not told of the gap");
        assert!(events.on(&ch).is_empty(), "nothing past the gap");
        inject(&one.inner, &ch, &stream, 6, "m6").await;
        let got = events.wait_for(&ch, 1).await;
        assert_eq!(texts(&got), owned([(6, "m6")]));
    })
    .await;
}

/// Messages held while a channel waited to catch up (after a reconnect or
/// a slow-consumer event) are delivered first, though history was trimmed
/// past them meanwhile: what this node holds is no gap, and the channel is
/// not cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_messages_fill_what_history_trimmed_meanwhile() {
    let name = "held_messages_fill_what_history_trimmed_meanwhile";
    on_two_nodes(name, |one, two, _| async move {
        let events = Arc::new(Recorder::default());
        one.set_events(events.clone());
        let ch = ChannelName::new("held-trimmed").unwrap();
        one.subscribe(ch.clone()).await.unwrap();
        // Every catch-up slot taken: the channel, told to catch up, waits
        // and holds what arrives.
        let slots = one.inner.catch_up_slots.clone();
        let all = slots
            .acquire_many_owned(super::delivery::MAX_CATCH_UPS as u32)
            .await
            .unwrap();
        one.inner.catch_ups.send_modify(|n| n.reconnects += 1);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let ten = kept_at_most(10);
        for i in 1..=13 {
            let m = NewPublication::text(format!("m{i}"));
            two.publish(ch.clone(), m, ten.clone()).await.unwrap();
        }
        // Held, not delivered, while history keeps 4 to 13 only.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(events.on(&ch).is_empty(), "delivered while waiting");
        drop(all);
        let offsets: Vec<u64> = events
            .wait_for(&ch, 13)
            .await
            .iter()
            .map(|p| p.offset)
            .collect();
        assert_eq!(offsets, (1..=13).collect::<Vec<_>>());
        assert_eq!(events.times_unavailable(&ch), 0, "cut off for nothing");
    })
    .await;
}
