//! What the NATS engine does beyond the shared conformance suite: history
//! removed by another node, channel names that are special in NATS
//! subjects, idempotency without history, catching up after the
//! connection to NATS was cut, and presence read while entries expire. Needs `WALKIE_TEST_NATS` (`.ci/run` sets
//! it); without it the tests say they were skipped. Each test deletes what
//! it made in NATS, even when it fails.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use walkie_hub::conformance::Recorder;
use walkie_hub::{
    Broker, ChannelName, HistoryFilter, HistoryOptions, NatsBroker, NewPublication, PublishOptions,
};

fn nats(test: &str) -> Option<String> {
    let url = std::env::var("WALKIE_TEST_NATS").ok();
    if url.is_none() {
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr().lock(),
            "SKIPPED {test}: no service configured; set WALKIE_TEST_NATS=nats://127.0.0.1:4222 to run it"
        );
    }
    url
}

fn prefix() -> String {
    format!(
        "walkie-test-{}-{:08x}:",
        std::process::id(),
        rand::random::<u32>()
    )
}

fn kept() -> PublishOptions {
    PublishOptions {
        history: Some(HistoryOptions {
            size: 100,
            ttl: Duration::from_secs(300),
        }),
        ..PublishOptions::default()
    }
}

fn all() -> HistoryFilter {
    HistoryFilter::default()
}

/// Runs `test` (given the NATS URL and a fresh prefix) with a time limit,
/// then deletes everything under the prefix in NATS, then fails if the
/// test did. Without `WALKIE_TEST_NATS`, says `name` was skipped.
async fn on_nats<F, Fut>(name: &str, test: F)
where
    F: FnOnce(String, String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(url) = nats(name) else {
        return;
    };
    let prefix = prefix();
    let test = test(url.clone(), prefix.clone());
    let outcome = tokio::spawn(async move {
        tokio::time::timeout(Duration::from_secs(60), test)
            .await
            .expect("test timed out after 60 s");
    })
    .await;
    let broker = NatsBroker::connect(&url, &prefix).await.unwrap();
    broker.delete_all().await.unwrap();
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// A broker with a recorder attached.
async fn node(url: &str, prefix: &str) -> (NatsBroker, Arc<Recorder>) {
    let broker = NatsBroker::connect(url, prefix).await.unwrap();
    let events = Arc::new(Recorder::default());
    broker.set_events(events.clone());
    (broker, events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_removed_by_another_node_starts_a_new_epoch_everywhere() {
    on_nats("history_removed_by_another_node", |u, p| async move {
        let (one, seen) = node(&u, &p).await;
        let (two, _) = node(&u, &p).await;
        let ch = ChannelName::new("chat:removed").unwrap();
        one.subscribe(ch.clone()).await.unwrap();
        for i in 1..=3 {
            one.publish(ch.clone(), NewPublication::text(format!("m{i}")), kept())
                .await
                .unwrap();
        }
        let before = one.history(ch.clone(), all()).await.unwrap().position;
        assert_eq!(before.offset, 3);
        // Node two removes the history; node one still knows the old stream.
        two.remove_history(ch.clone()).await.unwrap();
        let h = one.history(ch.clone(), all()).await.unwrap();
        assert!(h.publications.is_empty());
        assert_eq!(h.position.offset, 0);
        assert_ne!(h.position.epoch, before.epoch);
        let r = one
            .publish(ch.clone(), NewPublication::text("after"), kept())
            .await
            .unwrap();
        assert_eq!(r.position.offset, 1);
        assert_eq!(r.position.epoch, h.position.epoch);
        // Node two publishes too: same stream, next offset.
        let r2 = two
            .publish(ch.clone(), NewPublication::text("and two"), kept())
            .await
            .unwrap();
        assert_eq!(r2.position.offset, 2);
        assert_eq!(r2.position.epoch, h.position.epoch);
        let delivered = seen.wait_for(&ch, 5).await;
        let got: Vec<(u64, &[u8])> = delivered.iter().map(|p| (p.offset, &p.data[..])).collect();
        assert_eq!(
            got,
            [
                (1, &b"m1"[..]),
                (2, b"m2"),
                (3, b"m3"),
                (1, b"after"),
                (2, b"and two")
            ]
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_names_special_in_subjects_are_kept_apart() {
    on_nats("channel_names_special_in_subjects", |u, p| async move {
        let (broker, seen) = node(&u, &p).await;
        let long = format!("long:{}", "é".repeat(125));
        let names = [
            "a.b",
            "a.*",
            "a.>",
            "a",
            "*",
            ">",
            "ünï:cödé",
            long.as_str(),
        ];
        for name in names {
            let ch = ChannelName::new(name).unwrap();
            broker.subscribe(ch.clone()).await.unwrap();
            let r = broker
                .publish(ch.clone(), NewPublication::text(name), kept())
                .await
                .unwrap();
            assert_eq!(r.position.offset, 1, "{name}");
        }
        for name in names {
            let ch = ChannelName::new(name).unwrap();
            let h = broker.history(ch.clone(), all()).await.unwrap();
            assert_eq!(h.publications.len(), 1, "{name}");
            assert_eq!(h.publications[0].data, name.as_bytes(), "{name}");
            let delivered = seen.wait_for(&ch, 1).await;
            assert_eq!(delivered.len(), 1, "{name}");
            assert_eq!(delivered[0].data, name.as_bytes(), "{name}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_hold_without_history_across_nodes() {
    on_nats("idempotency_keys_hold_without_history", |u, p| async move {
        let (one, seen) = node(&u, &p).await;
        let (two, _) = node(&u, &p).await;
        let ch = ChannelName::new("game:live").unwrap();
        one.subscribe(ch.clone()).await.unwrap();
        let live = PublishOptions {
            idempotency_key: Some("move-1".into()),
            ..PublishOptions::default()
        };
        let first = one
            .publish(ch.clone(), NewPublication::text("e4"), live.clone())
            .await
            .unwrap();
        let again = two
            .publish(ch.clone(), NewPublication::text("e4"), live.clone())
            .await
            .unwrap();
        assert!(!first.suppressed);
        assert!(again.suppressed);
        assert_eq!(first.position.offset, 0);
        assert_eq!(first.position, again.position);
        // Without history the key expires with its TTL.
        let short = PublishOptions {
            idempotency_key: Some("move-2".into()),
            idempotency_ttl: Duration::from_millis(200),
            ..PublishOptions::default()
        };
        one.publish(ch.clone(), NewPublication::text("d5"), short.clone())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        let later = two
            .publish(ch.clone(), NewPublication::text("d5"), short)
            .await
            .unwrap();
        assert!(!later.suppressed);
        let delivered = seen.wait_for(&ch, 3).await;
        let data: Vec<&[u8]> = delivered.iter().map(|p| &p.data[..]).collect();
        assert_eq!(data, [&b"e4"[..], b"d5", b"d5"]);
    })
    .await;
}

/// A TCP proxy to NATS whose connections can be cut: while cut, it closes
/// every connection at once.
struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
}

impl Proxy {
    async fn start(upstream: &str) -> Proxy {
        let upstream = upstream
            .trim_start_matches("nats://")
            .split(',')
            .next()
            .unwrap()
            .to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let flag = cut.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                if flag.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let flag = flag.clone();
                tokio::spawn(async move {
                    let copy = tokio::io::copy_bidirectional(&mut client, &mut server);
                    let watch = async {
                        while !flag.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    };
                    tokio::select! {
                        _ = copy => {}
                        () = watch => {}
                    }
                });
            }
        });
        Proxy { port, cut }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_catches_up_on_what_it_missed_while_cut_off() {
    on_nats(
        "a_node_catches_up_on_what_it_missed_while_cut_off",
        |u, p| async move {
            let proxy = Proxy::start(&u).await;
            let (behind, seen) = node(&proxy.url(), &p).await;
            let (publisher, _) = node(&u, &p).await;
            let ch = ChannelName::new("chat:cut").unwrap();
            behind.subscribe(ch.clone()).await.unwrap();
            for i in 1..=3 {
                publisher
                    .publish(ch.clone(), NewPublication::text(format!("m{i}")), kept())
                    .await
                    .unwrap();
            }
            assert_eq!(seen.wait_for(&ch, 3).await.len(), 3);
            proxy.cut.store(true, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(200)).await;
            for i in 4..=8 {
                publisher
                    .publish(ch.clone(), NewPublication::text(format!("m{i}")), kept())
                    .await
                    .unwrap();
            }
            assert_eq!(seen.on(&ch).len(), 3, "cut off: nothing arrives");
            proxy.cut.store(false, Ordering::SeqCst);
            // The reconnect's catch-up delivers what was missed, once each, in
            // order, before what comes next.
            let mut caught_up = Vec::new();
            for _ in 0..4 {
                caught_up = seen.wait_for(&ch, 8).await;
                if caught_up.len() >= 8 {
                    break;
                }
            }
            assert_eq!(caught_up.len(), 8, "caught up within 20 s");
            publisher
                .publish(ch.clone(), NewPublication::text("m9"), kept())
                .await
                .unwrap();
            let delivered = seen.wait_for(&ch, 9).await;
            let offsets: Vec<u64> = delivered.iter().map(|p| p.offset).collect();
            assert_eq!(offsets, (1..=9).collect::<Vec<_>>());
            assert_eq!(delivered[5].data, "m6".as_bytes());
        },
    )
    .await;
}

/// Streams whose history expired entirely (or that never held anything)
/// are deleted; a stream still holding messages is kept, and the deleted
/// channel's next publish starts a new epoch at offset 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_of_idle_channels_are_deleted() {
    on_nats("streams_of_idle_channels_are_deleted", |u, p| async move {
        let (broker, _) = node(&u, &p).await;
        let short = PublishOptions {
            history: Some(HistoryOptions {
                size: 10,
                ttl: Duration::from_secs(1),
            }),
            idempotency_ttl: Duration::from_secs(1),
            ..PublishOptions::default()
        };
        let expiring = ChannelName::new("chat:expiring").unwrap();
        let kept_ch = ChannelName::new("chat:kept").unwrap();
        let read_only = ChannelName::new("chat:read-only").unwrap();
        let first = broker
            .publish(expiring.clone(), NewPublication::text("gone soon"), short)
            .await
            .unwrap();
        broker
            .publish(kept_ch.clone(), NewPublication::text("stays"), kept())
            .await
            .unwrap();
        broker.history(read_only.clone(), all()).await.unwrap();
        // Nothing is idle yet for an hour.
        assert_eq!(
            broker
                .delete_idle_streams(Duration::from_secs(3600))
                .await
                .unwrap(),
            0
        );
        // Wait until JetStream has expired the message.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let h = broker.history(expiring.clone(), all()).await.unwrap();
            if h.publications.is_empty()
                && broker.delete_idle_streams(Duration::ZERO).await.unwrap() >= 1
            {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never expired");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let after = broker
            .publish(expiring.clone(), NewPublication::text("back"), kept())
            .await
            .unwrap();
        assert_eq!(after.position.offset, 1);
        assert_ne!(after.position.epoch, first.position.epoch);
        let h = broker.history(kept_ch.clone(), all()).await.unwrap();
        assert_eq!(h.publications.len(), 1, "a stream with messages is kept");
    })
    .await;
}

/// `?replicas=N` is checked before connecting: a clear error names it.
#[tokio::test]
async fn a_bad_replicas_option_is_refused() {
    for url in [
        "nats://127.0.0.1:1?replicas=0",
        "nats://127.0.0.1:1?replicas=6",
        "nats://127.0.0.1:1?replica=3",
    ] {
        let e = NatsBroker::connect(url, "x").await.unwrap_err().to_string();
        assert!(e.contains("replicas=N"), "{url}: {e}");
    }
}

/// A presence read that starts while entries are expiring (a dead node's,
/// whose TTL is running out) answers at once with what is left; counting
/// on the entries the read started with, it waited for deliveries that
/// never came and failed after 3 s.
#[tokio::test]
async fn presence_reads_answer_while_entries_expire() {
    on_nats(
        "presence_reads_answer_while_entries_expire",
        |url, prefix| async move {
            use walkie_hub::{ClientInfo, PresenceManager};
            let broker = NatsBroker::connect(&url, &prefix).await.unwrap();
            let presence = walkie_hub::NatsPresence::new(&broker, Duration::from_secs(1));
            let channel = ChannelName::new("room").unwrap();
            for i in 0..50 {
                let info = ClientInfo {
                    client: format!("dead-{i}"),
                    user: String::new(),
                    info: None,
                };
                presence.add(channel.clone(), info).await.unwrap();
            }
            let started = std::time::Instant::now();
            let mut reads = 0;
            loop {
                let t = std::time::Instant::now();
                let read = presence.presence(channel.clone()).await;
                let took = t.elapsed();
                let left =
                    read.unwrap_or_else(|e| panic!("read {reads} failed after {took:?}: {e}"));
                assert!(took < Duration::from_secs(2), "read {reads} took {took:?}");
                reads += 1;
                if left.is_empty() {
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "still {} entries",
                    left.len()
                );
            }
        },
    )
    .await;
}
