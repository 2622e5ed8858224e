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

/// The metrics once `walkie_messages_out_total` held still for 100 ms: a
/// batch's deliveries are counted just after they are written, so a
/// reader can see a message a moment before it is counted.
async fn settled(server: &Server) -> String {
    let mut last = metrics(server).await;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = metrics(server).await;
        let name = "walkie_messages_out_total";
        if value(&now, name) == value(&last, name) {
            return now;
        }
        last = now;
    }
}

/// How much each counter of `names` grew since `before`, once they grew by
/// `want` (or 2 s passed).
async fn grown(server: &Server, before: &str, names: &[&str], want: &[f64]) -> Vec<f64> {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let now = metrics(server).await;
        let grown: Vec<f64> = names
            .iter()
            .map(|n| value(&now, n) - value(before, n))
            .collect();
        if grown == want || std::time::Instant::now() > deadline {
            return grown;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
        let before = settled(&server).await;
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
        let names = [
            "walkie_bytes_in_total",
            "walkie_messages_out_total",
            "walkie_bytes_out_total",
        ];
        let want = [10.0, 2.0, 20.0];
        assert_eq!(grown(&server, &before, &names, &want).await, want);
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
        let before = settled(&server).await;
        let mut b = RawWs::connect(server.port, "/rooms/replay?history=2", "").await;
        for text in [&b"first"[..], b"second"] {
            assert_eq!(b.read_frame().await.expect("the replay").payload, text);
        }
        let names = ["walkie_messages_out_total", "walkie_bytes_out_total"];
        let want = [2.0, 11.0];
        assert_eq!(grown(&server, &before, &names, &want).await, want);
    })
    .await;
}
