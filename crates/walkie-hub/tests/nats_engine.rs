//! What the NATS engine does beyond the shared conformance suite: history
//! removed by another node, channel names that are special in NATS
//! subjects, idempotency without history (and its retry after a failed
//! publish), catching up after the connection to NATS was cut, read-backs
//! retried while the JetStream API does not answer, streams made by a read
//! that trim nothing, and presence read while entries expire. Needs
//! `WALKIE_TEST_NATS` (`.ci/run` sets it); without it the tests say they
//! were skipped. Each test deletes what
//! it made in NATS, even when it fails.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use walkie_hub::conformance::{self, Recorder};
use walkie_hub::{
    Broker, ChannelName, HistoryFilter, HistoryOptions, NatsBroker, NewPublication, Publication,
    PublishOptions, PublishRequest,
};

fn nats(test: &str) -> Option<String> {
    conformance::service_url("WALKIE_TEST_NATS", test)
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
    let prefix = conformance::test_prefix();
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

/// A batch with history on two channels goes out before any
/// acknowledgement is awaited, and still comes back as one at a time would:
/// offsets in order per channel, a key used earlier in the batch
/// suppressed, each saved one delivered once, in order. Also after another
/// node removed one channel's history (this node's stream name is stale).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_published_in_order_with_its_keys() {
    on_nats(
        "a_batch_is_published_in_order_with_its_keys",
        |u, p| async move {
            let (one, seen) = node(&u, &p).await;
            let (two, _) = node(&u, &p).await;
            let a = ChannelName::new("chat:batch-a").unwrap();
            let b = ChannelName::new("chat:batch-b").unwrap();
            one.subscribe(a.clone()).await.unwrap();
            let request = |channel: &ChannelName, text: &str, key: Option<&str>| PublishRequest {
                channel: channel.clone(),
                publication: NewPublication::text(text),
                options: PublishOptions {
                    idempotency_key: key.map(Into::into),
                    ..kept()
                },
            };
            let batch = |round: &str| {
                vec![
                    request(&a, &format!("{round}1"), None),
                    request(&b, "elsewhere", None),
                    request(&a, &format!("{round}2"), Some(round)),
                    request(&a, &format!("{round}3"), None),
                    request(&a, "again", Some(round)),
                ]
            };
            let outcome = |results: Vec<Result<walkie_hub::PublishResult, _>>| {
                results
                    .into_iter()
                    .map(|r| {
                        let r = r.unwrap();
                        (r.position.offset, r.suppressed)
                    })
                    .collect::<Vec<_>>()
            };
            let first = outcome(one.publish_many(batch("x")).await);
            assert_eq!(
                first,
                [(1, false), (1, false), (2, false), (3, false), (2, true)]
            );
            let want = |round: &str| (1..=3).map(|i| format!("{round}{i}")).collect::<Vec<_>>();
            let texts = |ps: &[Publication]| {
                ps.iter()
                    .map(|p| String::from_utf8_lossy(&p.data).into_owned())
                    .collect::<Vec<_>>()
            };
            assert_eq!(texts(&seen.wait_for(&a, 3).await), want("x"));

            two.remove_history(a.clone()).await.unwrap();
            let second = outcome(one.publish_many(batch("y")).await);
            assert_eq!(
                second,
                [(1, false), (2, false), (2, false), (3, false), (2, true)]
            );
            let h = one.history(a.clone(), all()).await.unwrap();
            assert_eq!(texts(&h.publications), want("y"));
            let delivered = seen.wait_for(&a, 6).await;
            assert_eq!(
                texts(&delivered[3..]),
                want("y"),
                "the new epoch's, once each"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert_eq!(seen.on(&a).len(), 6, "nothing twice");
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_removed_by_another_node_starts_a_new_epoch_everywhere() {
    on_nats("history_removed_by_another_node", |u, p| async move {
        let (one, seen) = node(&u, &p).await;
        let (two, _) = node(&u, &p).await;
        let ch = ChannelName::new("chat:removed").unwrap();
        one.subscribe(ch.clone()).await.unwrap();
        publish_numbered(&one, &ch, 1..=3).await;
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

/// A TCP proxy to NATS that misbehaves on demand, each for as long as its
/// flag is set: `cut` closes every connection at once (and refuses new
/// ones); `drop_js` drops the client's requests to the JetStream API (they
/// time out, as while JetStream has no leader); `drop_deliveries` drops the
/// messages the server sends to the client's subscriptions (lost on the
/// way), but not the replies to its requests.
struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
    drop_js: Arc<AtomicBool>,
    drop_deliveries: Arc<AtomicBool>,
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
        let proxy = Proxy {
            port,
            cut: Arc::default(),
            drop_js: Arc::default(),
            drop_deliveries: Arc::default(),
        };
        let (cut, drop_js, drop_deliveries) = (
            proxy.cut.clone(),
            proxy.drop_js.clone(),
            proxy.drop_deliveries.clone(),
        );
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if cut.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (client_in, client_out) = client.into_split();
                let (server_in, server_out) = server.into_split();
                let drop_js = drop_js.clone();
                let drop_deliveries = drop_deliveries.clone();
                let up = relay(client_in, server_out, move |line| {
                    drop_js.load(Ordering::SeqCst)
                        && (line.starts_with(b"PUB $JS.API.") || line.starts_with(b"HPUB $JS.API."))
                });
                let down = relay(server_in, client_out, move |line| {
                    drop_deliveries.load(Ordering::SeqCst)
                        && (line.starts_with(b"MSG ") || line.starts_with(b"HMSG "))
                        && !line
                            .split(|b| *b == b' ')
                            .nth(1)
                            .unwrap_or_default()
                            .starts_with(b"_INBOX.")
                });
                let cut = cut.clone();
                tokio::spawn(async move {
                    let watch = async {
                        while !cut.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    };
                    tokio::select! {
                        () = up => {}
                        () = down => {}
                        () = watch => {}
                    }
                });
            }
        });
        proxy
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

/// Copies NATS protocol frames from `from` to `to`, leaving out those whose
/// control line `drop` selects; ends when either side closes.
async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    drop: impl Fn(&[u8]) -> bool,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut pending = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        pending.extend_from_slice(&chunk[..n]);
        let mut out = Vec::with_capacity(pending.len());
        let mut at = 0;
        while let Some((line, len)) = frame(&pending[at..]) {
            let whole = &pending[at..at + len];
            if !drop(&whole[..line]) {
                out.extend_from_slice(whole);
            }
            at += len;
        }
        pending.drain(..at);
        if to.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// The first whole frame in `buf`, if all of it is there: the length of its
/// control line, and its length with its payload (`PUB`, `HPUB`, `MSG` and
/// `HMSG` carry one, whose size is the line's last field).
fn frame(buf: &[u8]) -> Option<(usize, usize)> {
    let line = buf.windows(2).position(|w| w == b"\r\n")?;
    let fields: Vec<&[u8]> = buf[..line]
        .split(|b| *b == b' ' || *b == b'\t')
        .filter(|f| !f.is_empty())
        .collect();
    let op = fields.first().copied().unwrap_or_default();
    let mut len = line + 2;
    if [&b"PUB"[..], b"HPUB", b"MSG", b"HMSG"]
        .iter()
        .any(|o| op.eq_ignore_ascii_case(o))
    {
        let size: usize = std::str::from_utf8(fields.last()?).ok()?.parse().ok()?;
        len += size + 2;
    }
    (buf.len() >= len).then_some((line, len))
}

/// Waits up to 20 s for `n` publications on `channel`.
async fn wait_long(seen: &Recorder, channel: &ChannelName, n: usize) -> Vec<Publication> {
    let mut got = Vec::new();
    for _ in 0..4 {
        got = seen.wait_for(channel, n).await;
        if got.len() >= n {
            break;
        }
    }
    got
}

/// Waits up to 20 s until `broker` has reconnected `n` times.
async fn wait_reconnects(broker: &NatsBroker, n: u64) {
    for _ in 0..200 {
        if broker.reconnects() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no reconnect within 20 s");
}

/// Publishes `m{i}` for each `i` in `numbers` to `ch`, kept in history.
async fn publish_numbered(
    broker: &NatsBroker,
    ch: &ChannelName,
    numbers: std::ops::RangeInclusive<u32>,
) {
    for i in numbers {
        broker
            .publish(ch.clone(), NewPublication::text(format!("m{i}")), kept())
            .await
            .unwrap();
    }
}

fn offsets(delivered: &[Publication]) -> Vec<u64> {
    delivered.iter().map(|p| p.offset).collect()
}

/// Longer than a JetStream request may take (3 s) before it fails.
const REQUEST_FAILED: Duration = Duration::from_millis(3500);

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
            publish_numbered(&publisher, &ch, 1..=3).await;
            assert_eq!(seen.wait_for(&ch, 3).await.len(), 3);
            proxy.cut.store(true, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(200)).await;
            publish_numbered(&publisher, &ch, 4..=8).await;
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

/// A message that arrives after a gap which cannot be read back yet (the
/// JetStream API does not answer) waits for the gap: nothing is delivered
/// past it until the read-back, retried, succeeds; then everything comes
/// once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_delivered_past_a_gap_until_it_is_read_back() {
    on_nats("nothing_is_delivered_past_a_gap", |u, p| async move {
        let proxy = Proxy::start(&u).await;
        let (behind, seen) = node(&proxy.url(), &p).await;
        let (publisher, _) = node(&u, &p).await;
        let ch = ChannelName::new("chat:gap").unwrap();
        behind.subscribe(ch.clone()).await.unwrap();
        let publish = |i: u32| {
            let (publisher, ch) = (publisher.clone(), ch.clone());
            async move {
                publisher
                    .publish(ch, NewPublication::text(format!("m{i}")), kept())
                    .await
                    .unwrap();
            }
        };
        for i in 1..=3 {
            publish(i).await;
        }
        assert_eq!(seen.wait_for(&ch, 3).await.len(), 3);
        // 4 to 6 are lost on the way; then, with the JetStream API silent,
        // 7 arrives: the gap before it cannot be read back.
        proxy.drop_deliveries.store(true, Ordering::SeqCst);
        for i in 4..=6 {
            publish(i).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        proxy.drop_js.store(true, Ordering::SeqCst);
        proxy.drop_deliveries.store(false, Ordering::SeqCst);
        publish(7).await;
        tokio::time::sleep(REQUEST_FAILED).await;
        assert_eq!(offsets(&seen.on(&ch)), [1, 2, 3], "nothing past the gap");
        proxy.drop_js.store(false, Ordering::SeqCst);
        let delivered = wait_long(&seen, &ch, 7).await;
        assert_eq!(offsets(&delivered), (1..=7).collect::<Vec<_>>());
        assert_eq!(delivered[4].data, "m5".as_bytes());
    })
    .await;
}

/// A reconnect's catch-up that fails (the JetStream API does not answer
/// yet) is tried again: what was missed arrives although nothing more is
/// published on the channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_catch_up_is_retried_on_a_quiet_channel() {
    on_nats("a_failed_catch_up_is_retried", |u, p| async move {
        let proxy = Proxy::start(&u).await;
        let (behind, seen) = node(&proxy.url(), &p).await;
        let (publisher, _) = node(&u, &p).await;
        let ch = ChannelName::new("chat:quiet").unwrap();
        behind.subscribe(ch.clone()).await.unwrap();
        publish_numbered(&publisher, &ch, 1..=3).await;
        assert_eq!(seen.wait_for(&ch, 3).await.len(), 3);
        proxy.cut.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(200)).await;
        publish_numbered(&publisher, &ch, 4..=6).await;
        proxy.drop_js.store(true, Ordering::SeqCst);
        proxy.cut.store(false, Ordering::SeqCst);
        wait_reconnects(&behind, 1).await;
        tokio::time::sleep(REQUEST_FAILED).await;
        assert_eq!(seen.on(&ch).len(), 3, "the first catch-up failed");
        proxy.drop_js.store(false, Ordering::SeqCst);
        let delivered = wait_long(&seen, &ch, 6).await;
        assert_eq!(offsets(&delivered), (1..=6).collect::<Vec<_>>());
    })
    .await;
}

/// A reconnect before anything was delivered catches up from where the
/// stream was at subscribe: what history held before is not delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_delivers_nothing_from_before_the_subscribe() {
    on_nats(
        "a_catch_up_delivers_nothing_from_before",
        |u, p| async move {
            let proxy = Proxy::start(&u).await;
            let (behind, seen) = node(&proxy.url(), &p).await;
            let (publisher, _) = node(&u, &p).await;
            let ch = ChannelName::new("chat:old").unwrap();
            publish_numbered(&publisher, &ch, 1..=3).await;
            behind.subscribe(ch.clone()).await.unwrap();
            proxy.cut.store(true, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(200)).await;
            publisher
                .publish(ch.clone(), NewPublication::text("m4"), kept())
                .await
                .unwrap();
            proxy.cut.store(false, Ordering::SeqCst);
            wait_reconnects(&behind, 1).await;
            assert!(!wait_long(&seen, &ch, 1).await.is_empty(), "caught up");
            publisher
                .publish(ch.clone(), NewPublication::text("m5"), kept())
                .await
                .unwrap();
            seen.wait_for(&ch, 2).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert_eq!(offsets(&seen.on(&ch)), [4, 5]);
        },
    )
    .await;
}

/// A node whose cached stream is stale (the stream was deleted, and a read
/// on another node made a new one) publishes many messages at once: the
/// new stream keeps them all, not only the last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_made_by_a_read_keeps_what_a_stale_node_publishes() {
    on_nats("a_stream_made_by_a_read_keeps", |u, p| async move {
        let (stale, _) = node(&u, &p).await;
        let (reader, _) = node(&u, &p).await;
        let ch = ChannelName::new("chat:stale").unwrap();
        stale
            .publish(ch.clone(), NewPublication::text("m0"), kept())
            .await
            .unwrap();
        reader.delete_all().await.unwrap();
        let fresh = reader.history(ch.clone(), all()).await.unwrap();
        assert_eq!(fresh.position.offset, 0);
        let results = futures_util::future::join_all(
            (1..=20)
                .map(|i| stale.publish(ch.clone(), NewPublication::text(format!("m{i}")), kept())),
        )
        .await;
        for r in results {
            assert_eq!(r.unwrap().position.epoch, fresh.position.epoch);
        }
        let h = reader.history(ch.clone(), all()).await.unwrap();
        assert_eq!(h.position.offset, 20);
        assert_eq!(h.publications.len(), 20, "none trimmed");
    })
    .await;
}

/// A publish without history whose sending fails does not use up its
/// idempotency key: the retry with that key is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_publish_without_history_can_be_retried() {
    on_nats("a_failed_publish_without_history", |u, p| async move {
        let (broker, seen) = node(&u, &p).await;
        let ch = ChannelName::new("game:retry").unwrap();
        broker.subscribe(ch.clone()).await.unwrap();
        let live = PublishOptions {
            idempotency_key: Some("move-1".into()),
            ..PublishOptions::default()
        };
        // Over the server's max_payload (1 MiB by default): not sent.
        let too_big = NewPublication::text("x".repeat(2 << 20));
        broker
            .publish(ch.clone(), too_big, live.clone())
            .await
            .unwrap_err();
        let retry = broker
            .publish(ch.clone(), NewPublication::text("e4"), live.clone())
            .await
            .unwrap();
        assert!(!retry.suppressed, "the failed publish kept its key");
        let delivered = seen.wait_for(&ch, 1).await;
        assert_eq!(delivered.len(), 1);
        assert_eq!(delivered[0].data, "e4".as_bytes());
        let again = broker
            .publish(ch.clone(), NewPublication::text("e4"), live)
            .await
            .unwrap();
        assert!(again.suppressed, "a sent publish keeps its key");
    })
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

/// Nodes started with different presence TTLs share one bucket: the one
/// with the shorter TTL must not expire the entries of the other, whose
/// clients are still connected (it refreshes them less often).
#[tokio::test]
async fn a_node_with_a_shorter_presence_ttl_does_not_expire_the_others_entries() {
    on_nats("a_shorter_presence_ttl", |url, prefix| async move {
        use walkie_hub::{ClientInfo, PresenceManager};
        let long = NatsBroker::connect(&url, &prefix).await.unwrap();
        let long = walkie_hub::NatsPresence::new(&long, Duration::from_secs(60));
        let short = NatsBroker::connect(&url, &prefix).await.unwrap();
        let short = walkie_hub::NatsPresence::new(&short, Duration::from_secs(1));
        let channel = ChannelName::new("room").unwrap();
        let info = ClientInfo {
            client: "connected".into(),
            user: String::new(),
            info: None,
        };
        long.add(channel.clone(), info).await.unwrap();
        assert_eq!(short.presence(channel.clone()).await.unwrap().len(), 1);
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let left = long.presence(channel).await.unwrap();
        assert_eq!(left.len(), 1, "expired by the other node's TTL");
    })
    .await;
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
