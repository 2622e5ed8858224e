//! `walkie serve`, `/ws`: the Walkie protocol as docs/protocol.md defines
//! it, with the built-in configuration (anonymous clients, open default
//! and `rooms` namespaces).

mod common;

#[path = "common/proto.rs"]
mod proto;

use std::time::Duration;

use common::{Server, http_exchange, upgrade_request, within};
use serde_json::json;
use walkie::{CloseCode, Message};

/// docs/protocol.md: `connect` reports `ping_interval`, the interval of
/// the server's keepalive pings, and leaves it out when there are none.
#[tokio::test]
async fn connect_reports_the_servers_ping_interval() {
    for (flag, expected) in [
        ("20s", Some(json!(20))),
        ("2s", Some(json!(2))),
        ("1500ms", Some(json!(1.5))),
        ("off", None),
    ] {
        let server = Server::start(&["--ping-interval", flag]);
        within(20, async {
            let (_, info) = proto::connected(server.port, None).await;
            assert_eq!(
                info.get("ping_interval"),
                expected.as_ref(),
                "--ping-interval {flag}: {info}"
            );
        })
        .await;
    }
}

#[tokio::test]
async fn two_clients_publish_see_presence_joins_and_leaves() {
    let server = Server::start(&[]);
    within(20, async {
        let (mut a, info_a) = proto::connected(server.port, None).await;
        assert_eq!(info_a["user"], "");
        assert_eq!(info_a["version"], "walkie.v1");
        let sub = a.ok("subscribe", json!({"channel": "lobby"})).await;
        assert_eq!(sub["offset"], 0);
        let epoch = sub["epoch"].as_str().unwrap().to_owned();
        assert!(!epoch.is_empty());
        assert_eq!(
            a.push().await["join"]["info"]["client"],
            info_a["client"],
            "own join"
        );

        let (mut b, info_b) = proto::connected(server.port, None).await;
        b.ok("subscribe", json!({"channel": "lobby"})).await;
        let join = a.push().await;
        assert_eq!(join["join"]["channel"], "lobby");
        assert_eq!(join["join"]["info"]["client"], info_b["client"]);

        let presence = a.ok("presence", json!({"channel": "lobby"})).await;
        let clients = presence["clients"].as_object().unwrap();
        assert_eq!(clients.len(), 2);
        let stats = a.ok("presence_stats", json!({"channel": "lobby"})).await;
        assert_eq!(stats, json!({"clients": 2, "users": 1}));

        let r = b
            .ok(
                "publish",
                json!({"channel": "lobby", "data": {"text": "hi"}}),
            )
            .await;
        assert_eq!(r["offset"], 1);
        assert_eq!(r["epoch"], epoch.as_str());
        assert_eq!(r["duplicate"], false);
        for p in [&mut a, &mut b] {
            let publication = p.publication().await;
            assert_eq!(publication["channel"], "lobby");
            assert_eq!(publication["offset"], 1);
            assert_eq!(publication["data"], json!({"text": "hi"}));
            assert_eq!(publication["info"]["client"], info_b["client"]);
        }

        b.ok("unsubscribe", json!({"channel": "lobby"})).await;
        let leave = a.push().await;
        assert_eq!(leave["leave"]["info"]["client"], info_b["client"]);
        assert_eq!(
            b.error_code("unsubscribe", json!({"channel": "lobby"}))
                .await,
            113
        );

        // A client that goes away leaves too.
        b.ok("subscribe", json!({"channel": "lobby"})).await;
        assert!(a.push().await.get("join").is_some());
        b.ws.close(CloseCode::NORMAL, "").await.unwrap();
        assert!(a.push().await.get("leave").is_some());
        let stats = a.ok("presence_stats", json!({"channel": "lobby"})).await;
        assert_eq!(stats["clients"], 1);
    })
    .await;
}

/// A channel that keeps no history (the default `game` namespace) numbers
/// nothing: a client recovering there missed what it cannot be told about,
/// so `recovered` is false, never a promise that nothing was lost.
#[tokio::test]
async fn recovery_in_a_channel_without_history_is_never_claimed() {
    let server = Server::start(&[]);
    within(20, async {
        let (mut reader, _) = proto::connected(server.port, None).await;
        let sub = reader.ok("subscribe", json!({"channel": "game:x"})).await;
        let epoch = sub["epoch"].clone();
        reader.ws.close(CloseCode::NORMAL, "").await.unwrap();
        let (mut publisher, _) = proto::connected(server.port, None).await;
        for i in 1..=3 {
            let data = json!({"move": i});
            publisher
                .ok("publish", json!({"channel": "game:x", "data": data}))
                .await;
        }
        let (mut back, _) = proto::connected(server.port, None).await;
        let recover = json!({"channel": "game:x", "recover": true, "offset": 0, "epoch": epoch});
        let sub = back.ok("subscribe", recover).await;
        assert_eq!(sub["offset"], 0, "{sub}");
        assert_eq!(sub["recovered"], false, "{sub}");
    })
    .await;
}

#[tokio::test]
async fn a_reconnecting_client_recovers_exactly_what_it_missed() {
    let server = Server::start(&[]);
    within(20, async {
        let (mut publisher, _) = proto::connected(server.port, None).await;
        let (mut reader, _) = proto::connected(server.port, None).await;
        reader.ok("subscribe", json!({"channel": "feed"})).await;
        for i in 1..=3 {
            publisher.ok("publish", json!({"channel": "feed", "data": i})).await;
        }
        let mut last = json!(null);
        for i in 1..=3 {
            let p = reader.publication().await;
            assert_eq!(p["data"], i);
            last = p;
        }
        let epoch = reader.ok("history", json!({"channel": "feed", "limit": 0})).await["epoch"].clone();
        reader.ws.close(CloseCode::NORMAL, "").await.unwrap();

        for i in 4..=8 {
            publisher.ok("publish", json!({"channel": "feed", "data": i})).await;
        }
        let (mut back, _) = proto::connected(server.port, None).await;
        let sub = back
            .ok("subscribe", json!({"channel": "feed", "recover": true, "offset": last["offset"], "epoch": epoch}))
            .await;
        assert_eq!(sub["recovered"], true);
        assert_eq!(sub["history"], 5);
        publisher.ok("publish", json!({"channel": "feed", "data": 9})).await;
        for i in 4..=9 {
            let p = back.publication().await;
            assert_eq!((p["offset"].as_u64(), p["data"].as_u64()), (Some(i), Some(i)));
        }

        // Another epoch: recovery is refused, and said so.
        let (mut lost, _) = proto::connected(server.port, None).await;
        let sub = lost
            .ok("subscribe", json!({"channel": "feed", "recover": true, "offset": 2, "epoch": "other"}))
            .await;
        assert_eq!(sub["recovered"], false);
        assert_eq!(sub["history"], 0);
        assert_eq!(sub["offset"], 9);

        // history: since, limit, reverse.
        let h = back
            .ok("history", json!({"channel": "feed", "since": {"offset": 6, "epoch": epoch}, "limit": 2}))
            .await;
        let offsets: Vec<u64> = h["publications"].as_array().unwrap().iter().map(|p| p["offset"].as_u64().unwrap()).collect();
        assert_eq!(offsets, [7, 8]);
        let h = back.ok("history", json!({"channel": "feed", "limit": 2, "reverse": true})).await;
        assert_eq!(h["publications"][0]["data"], 9);
    })
    .await;
}

#[tokio::test]
async fn idempotent_publish_is_delivered_once_and_history_n_replays() {
    let server = Server::start(&[]);
    within(20, async {
        let (mut c, _) = proto::connected(server.port, None).await;
        let first = c
            .ok(
                "publish",
                json!({"channel": "orders", "data": "paid", "idempotency_key": "o-1"}),
            )
            .await;
        let again = c
            .ok(
                "publish",
                json!({"channel": "orders", "data": "paid", "idempotency_key": "o-1"}),
            )
            .await;
        assert_eq!(again["duplicate"], true);
        assert_eq!(again["offset"], first["offset"]);
        c.ok("publish", json!({"channel": "orders", "data": "shipped"}))
            .await;
        let sub = c
            .ok("subscribe", json!({"channel": "orders", "history": 10}))
            .await;
        assert_eq!(sub["history"], 2);
        assert_eq!(c.publication().await["data"], "paid");
        assert_eq!(c.publication().await["data"], "shipped");
    })
    .await;
}

#[tokio::test]
async fn mistakes_get_the_documented_codes() {
    let server = Server::start(&[]);
    within(20, async {
        let mut c = proto::open(server.port).await;
        assert_eq!(
            c.error_code("subscribe", json!({"channel": "x"})).await,
            110
        );
        c.ok("connect", json!({})).await;
        assert_eq!(c.error_code("connect", json!({})).await, 111);
        assert_eq!(c.error_code("fly", json!({})).await, 104);
        assert_eq!(
            c.error_code("subscribe", json!({"channel": "nowhere:x"}))
                .await,
            102
        );
        assert_eq!(
            c.error_code("subscribe", json!({"channel": "has space"}))
                .await,
            102
        );
        assert_eq!(c.error_code("subscribe", json!({})).await, 107);
        assert_eq!(
            c.error_code("subscribe", json!({"channel": "a", "recover": true}))
                .await,
            107
        );
        assert_eq!(
            c.error_code("subscribe", json!({"channel": "a", "history": 1000}))
                .await,
            107
        );
        c.ok("subscribe", json!({"channel": "a"})).await;
        assert_eq!(
            c.error_code("subscribe", json!({"channel": "a"})).await,
            105
        );
        assert_eq!(
            c.error_code("subscribe", json!({"channel": "#42"})).await,
            103,
            "user channel, anonymous"
        );
        let big = "x".repeat(70_000);
        assert_eq!(
            c.error_code("publish", json!({"channel": "a", "data": big}))
                .await,
            112
        );
        assert_eq!(
            c.error_code("publish", json!({"channel": "a", "data": 1, "key": "k"}))
                .await,
            107
        );
        c.ok("ping", json!({})).await;
        c.send_raw("this is not JSON").await;
        assert_eq!(c.closed().await, Some(4000));

        let mut c = proto::open(server.port).await;
        c.ws.send(Message::binary(vec![1u8])).await.unwrap();
        assert_eq!(c.closed().await, Some(4000));

        let r = http_exchange(server.port, upgrade_request("/ws", "").as_bytes()).await;
        assert_eq!(r.status, 400);
        assert!(r.body.contains("walkie.v1"), "{}", r.body);
    })
    .await;
}

/// A room member (`/rooms/lobby`, no envelope) and a Walkie protocol client
/// subscribed to `rooms:lobby` talk to each other.
#[tokio::test]
async fn rooms_and_the_protocol_share_channels() {
    let server = Server::start(&[]);
    within(20, async {
        let mut member = walkie::connect(&server.ws_url("/rooms/lobby"))
            .await
            .unwrap();
        let (mut c, _) = proto::connected(server.port, None).await;
        c.ok("subscribe", json!({"channel": "rooms:lobby"})).await;
        member.send("hello from the room").await.unwrap();
        assert_eq!(c.publication().await["text"], "hello from the room");
        c.ok(
            "publish",
            json!({"channel": "rooms:lobby", "data": {"from": "app"}}),
        )
        .await;
        // The member's own message comes back first, then the app's.
        let mut got = Vec::new();
        while got.len() < 2 {
            let m = tokio::time::timeout(std::time::Duration::from_secs(5), member.recv())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            got.push(m.as_text().unwrap().to_owned());
        }
        assert_eq!(got[1], r#"{"from":"app"}"#);
    })
    .await;
}

/// A room keeps one history, whoever publishes to it: `--room-history 3`
/// trims what `/ws` publishes to `rooms:*` too, and without the flag the
/// `rooms` namespace's `history_size` bounds `?history=N`.
#[tokio::test]
async fn a_room_keeps_one_history_whoever_publishes() {
    let server = Server::start(&["--room-history", "3"]);
    within(20, async {
        let (mut c, _) = proto::connected(server.port, None).await;
        for i in 1..=5 {
            c.ok("publish", json!({"channel": "rooms:same", "data": i}))
                .await;
        }
        let h = c.ok("history", json!({"channel": "rooms:same"})).await;
        let kept: Vec<_> = h["publications"]
            .as_array()
            .unwrap_or_else(|| panic!("no publications: {h}"))
            .iter()
            .map(|p| p["data"].clone())
            .collect();
        assert_eq!(kept, [json!(3), json!(4), json!(5)]);
        let r = http_exchange(
            server.port,
            upgrade_request("/rooms/same?history=4", "").as_bytes(),
        )
        .await;
        assert_eq!(r.status, 400, "{}", r.body);
    })
    .await;
    let toml = "[auth]\nanonymous = true\n[namespaces.rooms]\nanonymous = true\nhistory_size = 2\n";
    let (server, _dir) = Server::with_config(toml, &[]);
    within(20, async {
        let r = http_exchange(
            server.port,
            upgrade_request("/rooms/small?history=3", "").as_bytes(),
        )
        .await;
        assert_eq!(r.status, 400, "{}", r.body);
        assert!(r.body.contains("from 0 to 2"), "{}", r.body);
    })
    .await;
}

/// docs/protocol.md: "The first command must be `connect`, within 10
/// seconds of the upgrade (else close 4003)". Commands other than
/// `connect` do not count, and a client that connects in time stays.
#[tokio::test]
async fn a_client_that_does_not_connect_in_time_is_closed_with_4003() {
    let server = Server::start(&[]);
    within(30, async {
        let started = std::time::Instant::now();
        let mut silent = proto::open(server.port).await;
        let mut chatty = proto::open(server.port).await;
        let mut prompt = proto::open(server.port).await;
        // Every turn of the session's loop; the deadline must hold anyway.
        for _ in 0..5 {
            assert_eq!(chatty.error_code("ping", json!({})).await, 110);
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        prompt.ok("connect", json!({})).await;
        assert_eq!(end(&mut silent).await, Some(4003));
        assert_eq!(end(&mut chatty).await, Some(4003));
        let waited = started.elapsed();
        assert!(
            (9..=13).contains(&waited.as_secs()),
            "closed after {waited:?}, not about 10 s"
        );
        prompt.ok("ping", json!({})).await;
    })
    .await;
}

/// Reads until the server ends the connection, however long that takes
/// (`Proto::closed` gives up after 5 s of silence); returns its close code.
async fn end(c: &mut proto::Proto) -> Option<u16> {
    while let Some(Ok(_)) = c.ws.recv().await {}
    c.close_code()
}

/// docs/protocol.md: "A reply for a command always comes before any push
/// caused by that command", a subscribe's live publications included. The
/// hub writes publications straight to a subscriber's
/// socket when it can (one worker thread here, so it can for every
/// client), and must not do so while the session is still answering the
/// subscribe: fresh clients subscribe to a channel that a room member keeps
/// publishing to, and none may see a publication before its reply.
#[tokio::test]
async fn a_subscribe_reply_comes_before_the_channels_publications() {
    let server = Server::spawn(
        ["serve", "--bind", "127.0.0.1:0"],
        &[("WALKIE_WORKERS", "1")],
    );
    within(60, async {
        let (mut echoes, mut writer) = walkie::connect(&server.ws_url("/rooms/busy"))
            .await
            .unwrap()
            .split();
        let drain = tokio::spawn(async move { while let Some(Ok(_)) = echoes.recv().await {} });
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let flood = tokio::spawn(async move {
            for i in 0..200_000u32 {
                if flag.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                writer.send(format!("message {i}")).await.unwrap();
                if i % 20 == 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            }
            writer
        });
        for round in 0..60 {
            let (mut c, _) = proto::connected(server.port, None).await;
            c.ok("subscribe", json!({"channel": "rooms:busy"})).await;
            assert!(
                c.pushes.iter().all(|p| p.get("pub").is_none()),
                "round {round}: a publication before the subscribe's reply: {:?}",
                c.pushes
            );
            // And they do come after it.
            c.publication().await;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut writer = flood.await.unwrap();
        let _ = writer.close(walkie::CloseCode::NORMAL, "").await;
        drain.abort();
    })
    .await;
}

/// A server whose anonymous clients may publish to `feed:*`, which keeps
/// `history` messages, with a client queue of 64 messages and
/// `queue_bytes`. Keep the directory until the server is done.
fn feed_server(history: usize, queue_bytes: &str) -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("feed.toml");
    let toml = format!(
        "[auth]\nanonymous = true\n\n[namespaces.feed]\nhistory_size = {history}\nallow_publish = true\nanonymous = true\n"
    );
    std::fs::write(&config, toml).unwrap();
    let config = config.to_str().unwrap();
    let server = Server::start(&[
        "--in-memory",
        "--config",
        config,
        "--client-queue",
        "64",
        "--client-queue-bytes",
        queue_bytes,
    ]);
    (dir, server)
}

/// docs/protocol.md: close 1013, "the client read too slowly and its queue
/// overflowed". A subscriber that reads nothing while thousands of
/// messages are published is cut off with 1013; what it read before is a
/// gapless run from offset 1. It missed more than its queue holds: its
/// recovery is sent piece by piece as it reads (all at once would
/// overflow the queue again, at every reconnect), and what is published
/// meanwhile follows with no gap and no duplicate.
#[tokio::test]
async fn a_subscriber_cut_off_for_reading_too_slowly_recovers_the_rest() {
    let (_dir, server) = feed_server(10_000, "256K");
    within(90, async {
        let (mut slow, _) = proto::connected(server.port, None).await;
        let sub = slow.ok("subscribe", json!({"channel": "feed:x"})).await;
        let epoch = sub["epoch"].clone();
        // 24 MB: more than the loopback socket buffers and the queue hold.
        let total = 6000u64;
        let pad = "x".repeat(4000);
        let (mut publisher, _) = proto::connected(server.port, None).await;
        for i in 1..=total {
            let r = publisher
                .ok(
                    "publish",
                    json!({"channel": "feed:x", "data": {"i": i, "pad": pad}}),
                )
                .await;
            assert_eq!(r["offset"], i);
        }
        // The slow one now reads what reached it, then the end.
        let mut last = 0;
        while let Some(m) = slow.next().await {
            let Some(p) = m.get("pub") else { continue };
            assert_eq!(p["offset"], last + 1, "a gap before the cut-off");
            assert_eq!(p["data"]["i"], last + 1);
            last += 1;
        }
        assert!(last < total, "never cut off: it read all {total}");
        let code = slow.close_code();
        assert!(
            matches!(code, Some(1013) | None),
            "closed with {code:?}, expected 1013"
        );
        assert!(
            server.wait_log(&["slow consumer"]).is_some(),
            "no overflow in the log:\n{}",
            server.log_text()
        );

        let (mut back, _) = proto::connected(server.port, None).await;
        let sub = back
            .ok(
                "subscribe",
                json!({"channel": "feed:x", "recover": true, "offset": last, "epoch": epoch}),
            )
            .await;
        assert_eq!(sub["recovered"], true, "{sub}");
        assert_eq!(
            (sub["history"].as_u64(), sub["offset"].as_u64()),
            (Some(total - last), Some(total))
        );
        assert_eq!(sub["epoch"], epoch);
        // Published while the recovery is under way.
        let more = 200;
        let live = tokio::spawn(async move {
            for i in total + 1..=total + more {
                let data = json!({"channel": "feed:x", "data": {"i": i}});
                publisher.ok("publish", data).await;
            }
        });
        let mut seen = last;
        while seen < total + more {
            let p = back.publication().await;
            assert_eq!(p["offset"], seen + 1, "a gap or a duplicate");
            assert_eq!(p["data"]["i"], seen + 1);
            seen += 1;
        }
        live.await.unwrap();
    })
    .await;
}

/// docs/protocol.md, recovery: a client that reads its recovery slower
/// than the channel's history turns over finds the next message it needs
/// gone: it is cut off with 1013 after a gapless run, and recovering from
/// there says `recovered: false`.
#[tokio::test]
async fn a_recovery_overtaken_by_history_is_cut_off() {
    let (_dir, server) = feed_server(400, "1M");
    within(90, async {
        let (mut first, _) = proto::connected(server.port, None).await;
        let sub = first.ok("subscribe", json!({"channel": "feed:y"})).await;
        let epoch = sub["epoch"].clone();
        drop(first);
        let (mut publisher, _) = proto::connected(server.port, None).await;
        // 400 x 50 KB: 20 MB, more than the loopback socket buffers hold.
        let pad = "x".repeat(50_000);
        let mut publish = async |from: u64, to: u64| {
            for i in from..=to {
                let data = json!({"channel": "feed:y", "data": {"i": i, "pad": pad}});
                publisher.ok("publish", data).await;
            }
        };
        publish(1, 400).await;
        let (mut back, _) = proto::connected(server.port, None).await;
        let recover = json!({"channel": "feed:y", "recover": true, "offset": 0, "epoch": epoch});
        let sub = back.ok("subscribe", recover).await;
        assert_eq!(
            (sub["recovered"].as_bool(), sub["history"].as_u64()),
            (Some(true), Some(400))
        );
        // It reads nothing while history moves past it.
        publish(401, 800).await;
        let mut last = 0;
        while let Some(m) = back.next().await {
            let Some(p) = m.get("pub") else { continue };
            assert_eq!(p["offset"], last + 1, "a gap before the cut-off");
            last += 1;
        }
        assert!(last < 400, "the recovery was never overtaken: {last} read");
        assert_eq!(back.close_code(), Some(1013));
        assert!(
            server
                .wait_log(&["recovery stopped", "history no longer holds"])
                .is_some(),
            "no log line:\n{}",
            server.log_text()
        );
        let (mut again, _) = proto::connected(server.port, None).await;
        let recover = json!({"channel": "feed:y", "recover": true, "offset": last, "epoch": epoch});
        let sub = again.ok("subscribe", recover).await;
        assert_eq!(sub["recovered"], false, "{sub}");
    })
    .await;
}

/// docs/protocol.md, `history`: a reply holds at most the client queue's
/// bytes of messages (at least one); the client pages on with `since`.
#[tokio::test]
async fn a_history_reply_is_capped_at_the_queue_bytes_and_pages_on() {
    let server = Server::start(&["--in-memory", "--client-queue-bytes", "16K"]);
    within(30, async {
        let (mut c, _) = proto::connected(server.port, None).await;
        let pad = "y".repeat(4000);
        let mut epoch = json!(null);
        for i in 1..=40u64 {
            let r = c
                .ok(
                    "publish",
                    json!({"channel": "big", "data": {"i": i, "pad": pad}}),
                )
                .await;
            epoch = r["epoch"].clone();
        }
        let mut seen = 0u64;
        let mut pages = 0;
        while seen < 40 {
            let since = json!({"offset": seen, "epoch": epoch});
            let page = c
                .ok("history", json!({"channel": "big", "since": since}))
                .await;
            assert_eq!(page["offset"], 40);
            let publications = page["publications"].as_array().unwrap();
            assert!(!publications.is_empty(), "an empty page before the end");
            assert!(
                publications.len() <= 4,
                "{} messages of 4 KB in 16 KiB",
                publications.len()
            );
            for p in publications {
                seen += 1;
                assert_eq!(p["offset"], seen);
                assert_eq!(p["data"]["i"], seen);
            }
            pages += 1;
        }
        assert!(
            pages >= 10,
            "40 messages of 4 KB in {pages} pages of 16 KiB"
        );
        // At least one message, however big.
        let (mut tight, _) = proto::connected(server.port, None).await;
        let huge = "z".repeat(20_000);
        tight
            .ok("publish", json!({"channel": "huge", "data": huge}))
            .await;
        let page = tight.ok("history", json!({"channel": "huge"})).await;
        assert_eq!(page["publications"].as_array().unwrap().len(), 1);
    })
    .await;
}

/// A burst of commands sent without waiting, on the default (durable)
/// engine: consecutive publishes go to the engine as one batch, yet every
/// command is answered, in order, as if handled one at a time. A
/// `history` in the middle sees every publish before it; a refused
/// publish is answered in its place; a binary message behind the burst
/// closes with 4000 only after the replies.
#[tokio::test]
async fn a_burst_of_commands_is_answered_in_order_with_publishes_batched() {
    let server = Server::start(&[]);
    within(30, async {
        let (mut a, _) = proto::connected(server.port, None).await;
        let (mut b, _) = proto::connected(server.port, None).await;
        b.ok("subscribe", json!({"channel": "burst"})).await;
        let count = 300u64;
        for i in 1..=count {
            let command = match i {
                150 => json!({"id": 1000 + i, "history": {"channel": "burst", "limit": 0}}),
                200 => json!({"id": 1000 + i, "publish": {"channel": "burst", "data": i, "idempotency_key": ""}}),
                _ => json!({"id": 1000 + i, "publish": {"channel": "burst", "data": i}}),
            };
            a.ws.feed_now(command.to_string()).unwrap();
        }
        a.ws.feed_now(Message::binary(vec![1u8])).unwrap();
        a.ws.flush().await.unwrap();
        let mut offset = 0;
        for i in 1..=count {
            let reply = a.next().await.expect("a reply for every command");
            assert_eq!(reply["id"], 1000 + i, "replies in order: {reply}");
            match i {
                150 => assert_eq!(
                    reply["result"]["offset"], offset,
                    "history sees every publish sent before it"
                ),
                200 => assert_eq!(reply["error"]["code"], 107, "refused in its place: {reply}"),
                _ => {
                    offset += 1;
                    assert_eq!(reply["result"]["offset"], offset, "{reply}");
                }
            }
        }
        assert_eq!(a.closed().await, Some(4000), "then the binary message closes");
        for expected in 1..=offset {
            let p = b.publication().await;
            assert_eq!(p["offset"], expected);
        }
    })
    .await;
}

/// The server's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// A burst of commands with large replies from a client that reads
/// nothing: each command waits for the socket to have room for its
/// replies, so the server holds about one reply, not the whole burst's
/// (100 MB here). Once the client reads, every reply comes, in order.
#[tokio::test]
async fn a_burst_with_large_replies_waits_for_a_client_that_reads_nothing() {
    let server = Server::start(&[]);
    within(60, async {
        let (mut publisher, _) = proto::connected(server.port, None).await;
        let data = "h".repeat(25_000);
        for _ in 0..20 {
            publisher
                .ok("publish", json!({"channel": "big", "data": data}))
                .await;
        }
        let (mut a, _) = proto::connected(server.port, None).await;
        let before = rss_kib(server.pid());
        let count = 200u64;
        for i in 1..=count {
            let command = json!({"id": 5000 + i, "history": {"channel": "big"}});
            a.ws.feed_now(command.to_string()).unwrap();
        }
        a.ws.flush().await.unwrap();
        // Reading nothing; the server answers what the socket takes.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let grown = rss_kib(server.pid()).saturating_sub(before);
        assert!(
            grown < 16 * 1024,
            "the server grew by {grown} KiB for a client that reads nothing \
             (the whole burst's replies are 100 MB)"
        );
        for i in 1..=count {
            let reply = a.next().await.expect("a reply for every command");
            assert_eq!(reply["id"], 5000 + i, "replies in order");
            assert_eq!(
                reply["result"]["publications"].as_array().unwrap().len(),
                20
            );
        }
    })
    .await;
}

/// A binary message behind a burst closes the connection with 4000, but
/// only once the commands before it are handled as usual, what each one
/// queued sent in its turn: a subscribe's replayed messages, then the
/// reply to the ping behind it.
#[tokio::test]
async fn a_binary_message_behind_a_burst_closes_after_what_the_burst_queued() {
    let server = Server::start(&[]);
    within(30, async {
        let (mut publisher, _) = proto::connected(server.port, None).await;
        for i in 1..=5 {
            publisher
                .ok("publish", json!({"channel": "replay", "data": i}))
                .await;
        }
        let (mut a, _) = proto::connected(server.port, None).await;
        for command in [
            json!({"id": 10, "subscribe": {"channel": "replay", "history": 5}}),
            json!({"id": 11, "ping": {}}),
        ] {
            a.ws.feed_now(command.to_string()).unwrap();
        }
        a.ws.feed_now(Message::binary(vec![1u8])).unwrap();
        a.ws.flush().await.unwrap();
        let mut seen = Vec::new();
        while let Some(m) = a.next().await {
            seen.push(m);
        }
        let ids: Vec<_> = seen.iter().filter_map(|m| m.get("id")).cloned().collect();
        assert_eq!(ids, [json!(10), json!(11)], "{seen:?}");
        let replayed: Vec<_> = seen
            .iter()
            .filter_map(|m| m.get("pub"))
            .map(|p| p["data"].clone())
            .collect();
        assert_eq!(replayed, [1, 2, 3, 4, 5].map(|i| json!(i)), "{seen:?}");
        let ping = seen.iter().position(|m| m["id"] == 11).unwrap();
        let last_pub = seen.iter().rposition(|m| m.get("pub").is_some()).unwrap();
        assert!(
            last_pub < ping,
            "a replayed message after the ping's reply: {seen:?}"
        );
        assert_eq!(a.closed().await, Some(4000));
    })
    .await;
}

/// What a burst's own commands made the hub send this connection (the
/// join, the publications to a channel it just joined) reaches it before
/// the 4000 close for a binary message behind the burst, on either engine.
#[tokio::test]
async fn a_binary_message_behind_a_burst_closes_after_the_pushes_it_caused() {
    for args in [&[][..], &["--in-memory"][..]] {
        let server = Server::start(args);
        within(30, async {
            let (mut a, _) = proto::connected(server.port, None).await;
            let mut ids = vec![json!(10)];
            a.ws.feed_now(json!({"id": 10, "subscribe": {"channel": "burst"}}).to_string())
                .unwrap();
            for i in 1..=5 {
                ids.push(json!(10 + i));
                let publish = json!({"id": 10 + i, "publish": {"channel": "burst", "data": i}});
                a.ws.feed_now(publish.to_string()).unwrap();
            }
            a.ws.feed_now(Message::binary(vec![1u8])).unwrap();
            a.ws.flush().await.unwrap();
            let mut seen = Vec::new();
            while let Some(m) = a.next().await {
                seen.push(m);
            }
            let replied: Vec<_> = seen.iter().filter_map(|m| m.get("id")).cloned().collect();
            assert_eq!(replied, ids, "{args:?}: {seen:?}");
            let pushed: Vec<_> = seen
                .iter()
                .filter_map(|m| m.get("pub"))
                .map(|p| p["data"].clone())
                .collect();
            assert_eq!(
                pushed,
                [1, 2, 3, 4, 5].map(|i| json!(i)),
                "{args:?}: {seen:?}"
            );
            assert_eq!(a.closed().await, Some(4000), "{args:?}");
        })
        .await;
    }
}

/// The same with a recovery sent in many pieces (a queue of 4 KiB, 100
/// messages of 1 KB to replay: about 50 pieces): the loop's turns to the
/// socket while the pieces go out handle no command before they are all
/// sent.
#[tokio::test]
async fn a_command_behind_a_recovery_in_pieces_waits_for_all_of_it() {
    let server = Server::start(&["--client-queue-bytes", "4K"]);
    within(30, async {
        let (mut publisher, _) = proto::connected(server.port, None).await;
        let mut epoch = json!(null);
        for i in 1..=100 {
            let data = format!("{i:04}{}", "x".repeat(1000));
            let r = publisher
                .ok("publish", json!({"channel": "replay", "data": data}))
                .await;
            epoch = r["epoch"].clone();
        }
        let (mut a, _) = proto::connected(server.port, None).await;
        let recover = json!({"channel": "replay", "recover": true, "offset": 0, "epoch": epoch});
        for command in [
            json!({"id": 10, "subscribe": recover}),
            json!({"id": 11, "unsubscribe": {"channel": "replay"}}),
            json!({"id": 12, "ping": {}}),
        ] {
            a.ws.feed_now(command.to_string()).unwrap();
        }
        a.ws.flush().await.unwrap();
        let mut seen = Vec::new();
        loop {
            let m = a.next().await.expect("the connection stays open");
            let done = m["id"] == 12;
            seen.push(m);
            if done {
                break;
            }
        }
        let unsubscribed = seen.iter().position(|m| m["id"] == 11).unwrap();
        let recovered: Vec<usize> = seen
            .iter()
            .enumerate()
            .filter(|(_, m)| m.get("pub").is_some())
            .map(|(i, _)| i)
            .collect();
        assert_eq!(recovered.len(), 100, "{seen:?}");
        assert!(
            recovered.iter().all(|&i| i < unsubscribed),
            "recovered messages after the unsubscribe reply (at {unsubscribed}): {recovered:?}"
        );
    })
    .await;
}

/// Commands sent together that are not publishes take their turns one at
/// a time, what each queued being sent before the next is handled: the
/// messages a `subscribe` replays come before the reply to an
/// `unsubscribe` sent right behind it, never after it.
#[tokio::test]
async fn commands_sent_together_send_what_each_queued_in_turn() {
    let server = Server::start(&[]);
    within(30, async {
        let (mut publisher, _) = proto::connected(server.port, None).await;
        for i in 1..=5 {
            publisher
                .ok("publish", json!({"channel": "replay", "data": i}))
                .await;
        }
        let (mut a, _) = proto::connected(server.port, None).await;
        for command in [
            json!({"id": 10, "subscribe": {"channel": "replay", "history": 5}}),
            json!({"id": 11, "unsubscribe": {"channel": "replay"}}),
            json!({"id": 12, "ping": {}}),
        ] {
            a.ws.feed_now(command.to_string()).unwrap();
        }
        a.ws.flush().await.unwrap();
        let mut seen = Vec::new();
        loop {
            let m = a.next().await.expect("the connection stays open");
            let done = m["id"] == 12;
            seen.push(m);
            if done {
                break;
            }
        }
        let unsubscribed = seen
            .iter()
            .position(|m| m["id"] == 11)
            .expect("the unsubscribe reply");
        let last_pub = seen
            .iter()
            .rposition(|m| m.get("pub").is_some())
            .expect("the replayed messages");
        assert!(
            last_pub < unsubscribed,
            "a replayed message came after the unsubscribe reply: {seen:?}"
        );
        let replayed: Vec<_> = seen
            .iter()
            .filter_map(|m| m.get("pub"))
            .map(|p| p["data"].clone())
            .collect();
        assert_eq!(replayed, [1, 2, 3, 4, 5].map(|i| json!(i)));
    })
    .await;
}

/// docs/protocol.md: a method's value is an object of parameters (`null`
/// counts as an empty one). Any other value is error 107, never read as
/// the fields in order, and nothing is published.
#[tokio::test]
async fn parameters_that_are_not_an_object_are_refused_with_107() {
    let server = Server::start(&["--in-memory"]);
    within(20, async {
        let (mut c, _) = proto::connected(server.port, None).await;
        c.ok("subscribe", json!({"channel": "lobby"})).await;
        for params in [
            json!(["lobby", {"x": 1}, null, null]),
            json!("lobby"),
            json!(1),
        ] {
            let r = c.call("publish", params.clone()).await;
            assert_eq!(r["error"]["code"], 107, "{params}: {r}");
            let message = r["error"]["message"].as_str().unwrap();
            assert!(message.contains("must be a JSON object"), "{message}");
        }
        assert_eq!(c.error_code("ping", json!([])).await, 107);
        assert_eq!(c.error_code("presence", json!(["lobby"])).await, 107);
        c.ok("ping", json!(null)).await;
        c.ok("ping", json!({})).await;
        let history = c.ok("history", json!({"channel": "lobby"})).await;
        assert_eq!(history["offset"], 0, "nothing was published: {history}");
    })
    .await;
}
