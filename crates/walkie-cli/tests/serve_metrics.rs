//! `GET /metrics`: Prometheus counters that move with what happens.

mod common;

#[path = "common/proto.rs"]
mod proto;

use std::time::Duration;

use common::{RawWs, Server, frame, http_exchange, within};
use serde_json::json;

fn value(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
        .parse()
        .unwrap()
}

async fn metrics(server: &Server) -> String {
    let r = http_exchange(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    r.body
}

#[tokio::test]
async fn counters_follow_connections_publications_and_deliveries() {
    let server = Server::start(&[]);
    within(20, async {
        let before = metrics(&server).await;
        assert_eq!(value(&before, "walkie_connections"), 0.0);
        let (mut a, _) = proto::connected(server.port, None).await;
        let (mut b, _) = proto::connected(server.port, None).await;
        a.ok("subscribe", json!({"channel": "m"})).await;
        b.ok("subscribe", json!({"channel": "m"})).await;
        a.ok("publish", json!({"channel": "m", "data": 1})).await;
        a.publication().await;
        b.publication().await;
        let text = metrics(&server).await;
        assert_eq!(value(&text, "walkie_connections"), 2.0);
        assert_eq!(value(&text, "walkie_subscriptions"), 2.0);
        assert!(value(&text, "walkie_publications_total") >= 1.0);
        assert!(value(&text, "walkie_messages_out_total") >= 2.0);
        assert!(value(&text, "walkie_messages_in_total") >= 5.0);
        assert!(value(&text, "walkie_publish_to_delivery_seconds_count") >= 1.0);
        drop(b);
        a.ok("unsubscribe", json!({"channel": "m"})).await;
        for _ in 0..50 {
            let text = metrics(&server).await;
            if value(&text, "walkie_connections") == 1.0
                && value(&text, "walkie_subscriptions") == 0.0
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("gauges did not come down:\n{}", metrics(&server).await);
    })
    .await;
}

#[tokio::test]
async fn room_payload_bytes_are_counted_in_and_out() {
    let server = Server::start(&["--in-memory"]);
    within(20, async {
        let mut a = RawWs::connect(server.port, "/rooms/bytes", "").await;
        let mut b = RawWs::connect(server.port, "/rooms/bytes", "").await;
        // Until a probe from b reaches a, a may not have joined; once it
        // has, both have (b sent it as a member).
        loop {
            b.send_raw(&frame(0x81, b"probe", true)).await;
            let got = tokio::time::timeout(Duration::from_millis(200), a.read_frame()).await;
            if got.is_ok_and(|f| f.is_some_and(|f| f.payload == b"probe")) {
                break;
            }
        }
        // Every probe was fanned out before a read the last one.
        let before = metrics(&server).await;
        let counter = |text: &str, name| value(text, name) - value(&before, name);
        a.send_raw(&frame(0x81, b"ten bytes!", true)).await;
        for member in [&mut a, &mut b] {
            // Past the probes still unread.
            loop {
                let got = member.read_frame().await.expect("the message");
                if got.payload == b"ten bytes!" {
                    break;
                }
            }
        }
        let text = metrics(&server).await;
        assert_eq!(counter(&text, "walkie_bytes_in_total"), 10.0);
        assert_eq!(counter(&text, "walkie_messages_out_total"), 2.0);
        assert_eq!(counter(&text, "walkie_bytes_out_total"), 20.0);
    })
    .await;
}

#[tokio::test]
async fn history_replayed_on_join_is_counted_out() {
    let server = Server::start(&["--in-memory"]);
    within(20, async {
        let mut a = RawWs::connect(server.port, "/rooms/replay", "").await;
        for text in [&b"first"[..], b"second"] {
            a.send_raw(&frame(0x82, text, true)).await;
            assert_eq!(a.read_frame().await.expect("its echo").payload, text);
        }
        let before = metrics(&server).await;
        let mut b = RawWs::connect(server.port, "/rooms/replay?history=2", "").await;
        for text in [&b"first"[..], b"second"] {
            assert_eq!(b.read_frame().await.expect("the replay").payload, text);
        }
        let text = metrics(&server).await;
        let delta = |name| value(&text, name) - value(&before, name);
        assert_eq!(delta("walkie_messages_out_total"), 2.0);
        assert_eq!(delta("walkie_bytes_out_total"), 11.0);
    })
    .await;
}
