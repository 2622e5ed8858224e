//! The hub over the memory engine: fan-out from one framed copy, joining
//! with history, recovery after a gap exactly once, and slow consumers.

use std::sync::Arc;
use std::time::Duration;

use walkie_hub::{
    Broker, ChannelName, Client, Entry, Format, HistoryOptions, Hub, MemoryBroker, NewPublication,
    PublishOptions, QueueClosed, QueueLimits, Queued, Recover, StreamPosition,
};

fn hub() -> Hub {
    Hub::new(Arc::new(MemoryBroker::new()) as Arc<dyn Broker>)
}

fn kept(size: usize) -> PublishOptions {
    PublishOptions {
        history: Some(HistoryOptions {
            size,
            ttl: Duration::from_secs(3600),
        }),
        ..PublishOptions::default()
    }
}

fn ch(name: &str) -> ChannelName {
    ChannelName::new(name).unwrap()
}

async fn drain(client: &Client) -> Vec<Queued> {
    // Publications are queued by a task of their own (one batch per
    // channel): let it run first.
    tokio::task::yield_now().await;
    let mut out = Vec::new();
    if !client.queue().is_empty() {
        client.queue().pop_all(&mut out).await.unwrap();
    }
    out.iter().flat_map(Entry::messages).cloned().collect()
}

fn texts(items: &[Queued]) -> Vec<String> {
    items
        .iter()
        .map(|q| q.message.message().as_text().unwrap().to_owned())
        .collect()
}

async fn publish(hub: &Hub, channel: &ChannelName, text: &str, size: usize) -> StreamPosition {
    hub.publish(channel.clone(), NewPublication::text(text), kept(size))
        .await
        .unwrap()
        .position
}

#[tokio::test]
async fn one_frame_is_shared_by_every_subscriber() {
    let hub = hub();
    let room = ch("rooms:a");
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut c = hub.client(QueueLimits::default());
        c.subscribe(room.clone(), Format::Raw, Recover::Nothing)
            .await
            .unwrap();
        clients.push(c);
    }
    publish(&hub, &room, "hello", 10).await;
    let mut frames = Vec::new();
    for c in &clients {
        let got = drain(c).await;
        assert_eq!(texts(&got), ["hello"]);
        frames.push(got[0].message.frame().clone());
    }
    assert!(
        frames.iter().all(|f| f.as_ptr() == frames[0].as_ptr()),
        "every subscriber writes the same bytes"
    );
}

#[tokio::test]
async fn binary_stays_binary() {
    let hub = hub();
    let room = ch("rooms:bin");
    let mut c = hub.client(QueueLimits::default());
    c.subscribe(room.clone(), Format::Raw, Recover::Nothing)
        .await
        .unwrap();
    hub.publish(room, NewPublication::binary(vec![1u8, 2, 255]), kept(5))
        .await
        .unwrap();
    let got = drain(&c).await;
    assert!(!got[0].message.message().is_text());
    assert_eq!(got[0].message.message().as_bytes(), [1, 2, 255]);
}

#[tokio::test]
async fn a_late_joiner_gets_the_last_n_then_the_live_stream() {
    let hub = hub();
    let room = ch("rooms:late");
    for i in 1..=5 {
        publish(&hub, &room, &format!("m{i}"), 100).await;
    }
    let mut c = hub.client(QueueLimits::default());
    let s = c
        .subscribe(room.clone(), Format::Raw, Recover::Last(3))
        .await
        .unwrap();
    assert_eq!(s.position.offset, 5);
    assert_eq!(s.from_history, 3);
    publish(&hub, &room, "m6", 100).await;
    assert_eq!(texts(&drain(&c).await), ["m3", "m4", "m5", "m6"]);
}

#[tokio::test]
async fn recovery_returns_exactly_what_was_missed_or_says_it_cannot() {
    let hub = hub();
    let room = ch("rooms:recover");
    let mut seen = StreamPosition {
        offset: 0,
        epoch: "".into(),
    };
    for i in 1..=3 {
        seen = publish(&hub, &room, &format!("m{i}"), 3).await;
    }
    for i in 4..=6 {
        publish(&hub, &room, &format!("m{i}"), 3).await;
    }
    let mut c = hub.client(QueueLimits::default());
    let s = c
        .subscribe(room.clone(), Format::Raw, Recover::Since(seen.clone()))
        .await
        .unwrap();
    assert!(s.recovered);
    assert_eq!(texts(&drain(&c).await), ["m4", "m5", "m6"]);

    // History holds 3 messages: a client that saw only m1 missed m2 and
    // m3, which are gone.
    let mut old = seen.clone();
    old.offset = 1;
    let mut c = hub.client(QueueLimits::default());
    let s = c
        .subscribe(room.clone(), Format::Raw, Recover::Since(old))
        .await
        .unwrap();
    assert!(!s.recovered);
    assert_eq!(s.position.offset, 6);
    publish(&hub, &room, "m7", 3).await;
    assert_eq!(texts(&drain(&c).await), ["m7"], "live stream only");

    // Another epoch: nothing can be recovered.
    let mut other = seen;
    other.epoch = "not-this-one".into();
    let mut c = hub.client(QueueLimits::default());
    let s = c
        .subscribe(room.clone(), Format::Raw, Recover::Since(other))
        .await
        .unwrap();
    assert!(!s.recovered);
    assert!(drain(&c).await.is_empty());
}

/// Clients leave and rejoin with recovery while a publisher never stops:
/// each ends with every message exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejoining_under_load_loses_and_repeats_nothing() {
    const TOTAL: usize = 2000;
    let hub = hub();
    let room = ch("rooms:chaos");
    let publisher = {
        let hub = hub.clone();
        let room = room.clone();
        tokio::spawn(async move {
            for i in 1..=TOTAL {
                publish(&hub, &room, &i.to_string(), 10_000).await;
                if i % 50 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    let mut readers = Vec::new();
    for r in 0..4u64 {
        let hub = hub.clone();
        let room = room.clone();
        readers.push(tokio::spawn(async move {
            let mut got: Vec<usize> = Vec::new();
            let mut position: Option<StreamPosition> = None;
            let mut round = 0u64;
            while got.len() < TOTAL {
                round += 1;
                let mut c = hub.client(QueueLimits::default());
                let recover = position
                    .clone()
                    .map_or(Recover::Last(TOTAL), Recover::Since);
                let s = c
                    .subscribe(room.clone(), Format::Raw, recover)
                    .await
                    .unwrap();
                assert!(s.recovered, "history covers every gap here");
                let epoch = s.position.epoch.clone();
                // Read a few batches, then "disconnect".
                for _ in 0..(1 + (r + round) % 3) {
                    let mut items = Vec::new();
                    let popped = tokio::time::timeout(
                        Duration::from_millis(200),
                        c.queue().pop_all(&mut items),
                    )
                    .await;
                    if popped.is_err() {
                        break;
                    }
                    for q in items.iter().flat_map(Entry::messages) {
                        let n: usize = q.message.message().as_text().unwrap().parse().unwrap();
                        got.push(n);
                    }
                }
                // Offsets equal the message numbers on this channel.
                position = Some(StreamPosition {
                    offset: got.last().copied().unwrap_or(0) as u64,
                    epoch,
                });
                drop(c);
            }
            got
        }));
    }
    publisher.await.unwrap();
    for r in readers {
        let got = tokio::time::timeout(Duration::from_secs(30), r)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, (1..=TOTAL).collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn a_slow_consumer_is_cut_off_and_the_others_are_not() {
    let hub = hub();
    let room = ch("rooms:slow");
    let small = QueueLimits {
        messages: 10,
        ..QueueLimits::default()
    };
    let mut slow = hub.client(small);
    let mut fast = hub.client(small);
    slow.subscribe(room.clone(), Format::Raw, Recover::Nothing)
        .await
        .unwrap();
    fast.subscribe(room.clone(), Format::Raw, Recover::Nothing)
        .await
        .unwrap();
    for i in 0..50 {
        publish(&hub, &room, &i.to_string(), 10).await;
        if i % 5 == 4 {
            assert_eq!(drain(&fast).await.len(), 5);
        }
    }
    let mut out = Vec::new();
    assert_eq!(
        slow.queue().pop_all(&mut out).await,
        Err(QueueClosed::SlowConsumer)
    );
    assert!(slow.queue().is_empty(), "nothing held for a dead consumer");
}

#[tokio::test]
async fn leaving_removes_the_subscriber() {
    let hub = hub();
    let room = ch("rooms:leave");
    let mut a = hub.client(QueueLimits::default());
    let mut b = hub.client(QueueLimits::default());
    a.subscribe(room.clone(), Format::Raw, Recover::Nothing)
        .await
        .unwrap();
    b.subscribe(room.clone(), Format::Raw, Recover::Nothing)
        .await
        .unwrap();
    assert_eq!(hub.local_subscribers(&room), 2);
    a.unsubscribe(&room);
    assert_eq!(hub.local_subscribers(&room), 1);
    drop(b);
    assert_eq!(hub.local_subscribers(&room), 0);
}

/// An engine that makes a publication readable in history before it
/// delivers it (as the durable engine may): the subscriber that read it
/// from history must not get it again from the live stream.
#[tokio::test]
async fn a_publication_read_from_history_and_then_delivered_is_queued_once() {
    use std::sync::OnceLock;
    use walkie_hub::{
        BoxFuture, BrokerEvents, EngineError, History, HistoryFilter, Kind, Publication,
        PublishResult,
    };

    #[derive(Default)]
    struct Late {
        events: OnceLock<Arc<dyn BrokerEvents>>,
    }
    fn publication(offset: u64) -> Publication {
        Publication {
            offset,
            data: format!("m{offset}").into(),
            kind: Kind::Text,
            info: None,
            time_ms: 0,
            key: None,
        }
    }
    impl Broker for Late {
        fn set_events(&self, events: Arc<dyn BrokerEvents>) {
            let _ = self.events.set(events);
        }
        fn subscribe(&self, _: ChannelName) -> BoxFuture<'_, Result<(), EngineError>> {
            Box::pin(async { Ok(()) })
        }
        fn unsubscribe(&self, _: ChannelName) -> BoxFuture<'_, Result<(), EngineError>> {
            Box::pin(async { Ok(()) })
        }
        fn publish(
            &self,
            _: ChannelName,
            _: NewPublication,
            _: PublishOptions,
        ) -> BoxFuture<'_, Result<PublishResult, EngineError>> {
            Box::pin(async { Err(EngineError::Stopped) })
        }
        fn history(
            &self,
            _: ChannelName,
            _: HistoryFilter,
        ) -> BoxFuture<'_, Result<History, EngineError>> {
            Box::pin(async {
                Ok(History {
                    publications: vec![publication(1)],
                    position: StreamPosition {
                        offset: 1,
                        epoch: "e".into(),
                    },
                })
            })
        }
        fn remove_history(&self, _: ChannelName) -> BoxFuture<'_, Result<(), EngineError>> {
            Box::pin(async { Ok(()) })
        }
    }

    let broker = Arc::new(Late::default());
    let hub = Hub::new(broker.clone() as Arc<dyn Broker>);
    let room = ch("rooms:late-delivery");
    let mut c = hub.client(QueueLimits::default());
    let since = StreamPosition {
        offset: 0,
        epoch: "e".into(),
    };
    let s = c
        .subscribe(room.clone(), Format::Raw, Recover::Since(since))
        .await
        .unwrap();
    assert!(s.recovered);
    let events = broker.events.get().unwrap();
    events.handle_publication(&room, &publication(1), "e");
    events.handle_publication(&room, &publication(2), "e");
    // A new epoch starts again from offset 1.
    events.handle_publication(&room, &publication(1), "f");
    assert_eq!(texts(&drain(&c).await), ["m1", "m2", "m1"]);
}

/// With `deliver_here`, publications made on other threads are queued for
/// subscribers by the task on this runtime: all of them, in order.
#[tokio::test]
async fn deliver_here_keeps_every_publication_in_order() {
    let hub = hub();
    hub.deliver_here();
    let room = ch("rooms:home");
    let mut c = hub.client(QueueLimits::default());
    c.subscribe(room.clone(), Format::Raw, Recover::Nothing)
        .await
        .unwrap();
    let (h, r) = (hub.clone(), room.clone());
    // Another OS thread with its own runtime publishes (the memory engine
    // calls the hub on the publisher's thread).
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            for i in 0..200 {
                publish(&h, &r, &format!("m{i}"), 1000).await;
            }
        });
    })
    .join()
    .unwrap();
    // Nothing was queued on the publisher's thread: the delivery task on
    // this (single-threaded) runtime has not run yet.
    assert!(c.queue().is_empty(), "delivered on the publisher's thread");
    let mut got = Vec::new();
    while got.len() < 200 {
        let mut batch = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), c.queue().pop_all(&mut batch))
            .await
            .expect("nothing delivered within 5 s")
            .unwrap();
        let batch: Vec<Queued> = batch.iter().flat_map(Entry::messages).cloned().collect();
        got.extend(texts(&batch));
    }
    let want: Vec<String> = (0..200).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want);
}
