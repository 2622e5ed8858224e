//! `--client-publish-rate`: one connection's publishes per second. On
//! `/ws`, those past it are refused with error 114 and never delivered; a
//! room member's wait for the next second, none lost; the HTTP API is not
//! limited.

mod common;

#[path = "common/proto.rs"]
mod proto;

use std::time::{Duration, Instant};

use common::{HttpResponse, Server, http_exchange, joined, within};
use serde_json::{Value, json};
use walkie::Message;

/// `walkie_publishes_limited_total`.
async fn limited(port: u16) -> u64 {
    let request = "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    let r = http_exchange(port, request.as_bytes()).await;
    let line = r
        .body
        .lines()
        .find(|l| l.starts_with("walkie_publishes_limited_total "))
        .unwrap_or_else(|| panic!("no walkie_publishes_limited_total in {}", r.body));
    line.split(' ').nth(1).unwrap().parse().unwrap()
}

/// Sends `n` publishes to `lobby` without waiting, then reads their
/// replies, in order; returns how many succeeded and the refusals.
async fn publish_together(c: &mut proto::Proto, first_id: u64, n: u64) -> (u64, Vec<Value>) {
    for id in first_id..first_id + n {
        let command = json!({"id": id, "publish": {"channel": "lobby", "data": id}});
        c.send_raw(&command.to_string()).await;
    }
    let (mut ok, mut refused) = (0, Vec::new());
    let mut id = first_id;
    while id < first_id + n {
        let m = c.next().await.expect("connection ended");
        if m.get("id").is_none() {
            c.pushes.push_back(m);
            continue;
        }
        assert_eq!(m["id"], id, "replies in order: {m}");
        match m.get("result") {
            Some(_) => ok += 1,
            None => refused.push(m["error"].clone()),
        }
        id += 1;
    }
    (ok, refused)
}

#[tokio::test]
async fn ws_publishes_past_the_rate_are_refused_with_114_and_not_delivered() {
    let server = Server::start(&["--in-memory", "--client-publish-rate", "3"]);
    within(30, async {
        let (mut reader, _) = proto::connected(server.port, None).await;
        reader.ok("subscribe", json!({"channel": "lobby"})).await;
        let (mut c, _) = proto::connected(server.port, None).await;
        // 8 at once: 3 in one second, or 6 if a second began among them.
        let (ok, refused) = publish_together(&mut c, 100, 8).await;
        assert!((3..=6).contains(&ok), "{ok} of 8 published: {refused:?}");
        assert_eq!(ok + refused.len() as u64, 8);
        assert_eq!(limited(server.port).await, refused.len() as u64);
        for e in &refused {
            assert_eq!(e["code"], 114, "{e}");
            let message = e["message"].as_str().unwrap();
            assert!(message.contains("more than 3 publishes"), "{message}");
        }
        // Exactly the published ones reach the subscriber, numbered without
        // a gap: nothing refused was saved or delivered.
        for offset in 1..=ok {
            let p = reader.publication().await;
            assert_eq!(p["offset"], offset, "{p}");
        }
        let r = reader.ok("history", json!({"channel": "lobby"})).await;
        assert_eq!(r["offset"], ok, "{r}");
        assert_eq!(r["publications"].as_array().unwrap().len() as u64, ok);

        // The limit is per connection: another one publishes meanwhile.
        reader
            .ok("publish", json!({"channel": "lobby", "data": "other"}))
            .await;
        // The next second, the connection may publish again.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        c.ok("publish", json!({"channel": "lobby", "data": "later"}))
            .await;
    })
    .await;
}

async fn api_publish(server: &Server, key: &str, data: u64) -> u16 {
    let body = json!({"channel": "lobby", "data": data}).to_string();
    let request = format!(
        "POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nAuthorization: apikey {key}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let r: HttpResponse = http_exchange(server.port, request.as_bytes()).await;
    r.status
}

#[tokio::test]
async fn the_http_api_is_not_limited() {
    let server = Server::start(&[
        "--in-memory",
        "--client-publish-rate",
        "1",
        "--api-key",
        "k",
    ]);
    within(30, async {
        for i in 0..10 {
            assert_eq!(api_publish(&server, "k", i).await, 200, "publish {i}");
        }
        assert_eq!(limited(server.port).await, 0);
    })
    .await;
}

#[tokio::test]
async fn a_room_members_burst_past_the_rate_is_slowed_down_not_lost() {
    let server = Server::start(&["--in-memory", "--client-publish-rate", "5"]);
    within(30, async {
        let url = server.ws_url("/rooms/paced");
        let mut reader = walkie::connect(&url).await.unwrap();
        let mut sender = walkie::connect(&url).await.unwrap();
        joined(&server, "", 2).await;
        // 15 at 5 per second span at least three seconds of the clock:
        // the last arrives over a second after the first.
        for i in 0..15 {
            sender.send(format!("m{i}")).await.unwrap();
        }
        let mut first = None;
        for i in 0..15 {
            let m = tokio::time::timeout(Duration::from_secs(5), reader.recv())
                .await
                .expect("nothing within 5 s")
                .expect("connection ended")
                .expect("connection failed");
            assert_eq!(m, Message::text(format!("m{i}")), "in order, none lost");
            first.get_or_insert_with(Instant::now);
        }
        let spread = first.unwrap().elapsed();
        assert!(limited(server.port).await > 0, "the wait is counted");
        assert!(
            spread > Duration::from_secs(1),
            "15 messages at 5 per second arrived within {spread:?}"
        );
    })
    .await;
}

/// A member waiting for the next second still closes at once on shutdown,
/// with 1001, as every other connection does, and the message that waited
/// is not published after shutdown began.
#[tokio::test]
async fn shutdown_ends_a_members_wait_for_the_next_second() {
    let mut server = Server::start(&["--in-memory", "--client-publish-rate", "1"]);
    let url = server.ws_url("/rooms/paced");
    let mut sender = within(10, async { walkie::connect(&url).await.unwrap() }).await;
    within(10, async {
        // 30 at 1 per second: the member waits for half a minute.
        for i in 0..30 {
            sender.send(format!("m{i}")).await.unwrap();
        }
        // Its own first message comes back: it is in the room, and waiting.
        let m = sender.recv().await.unwrap().unwrap();
        assert_eq!(m, Message::text("m0"));
    })
    .await;
    // Signalled early in a second, with over half of it left to wait: the
    // echo of what was published at its start has arrived by then.
    let mut echoes = 1;
    within(10, async {
        loop {
            let into = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_millis();
            if (150..450).contains(&into) {
                break;
            }
            if let Ok(Some(Ok(_))) =
                tokio::time::timeout(Duration::from_millis(20), sender.recv()).await
            {
                echoes += 1;
            }
        }
    })
    .await;
    let start = Instant::now();
    server.signal("TERM");
    let mut after = Vec::new();
    within(10, async {
        loop {
            match sender.recv().await {
                Some(Ok(Message::Text(t))) => after.push(t.to_string()),
                Some(Ok(other)) => panic!("unexpected {other:?}"),
                Some(Err(_)) | None => break,
            }
        }
    })
    .await;
    let frame = sender.close_frame().expect("no close frame");
    assert_eq!(frame.code, walkie::CloseCode::GOING_AWAY, "{frame}");
    assert!(
        after.is_empty(),
        "published after shutdown began (had {echoes}): {after:?}"
    );
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "closed {:?} after SIGTERM",
        start.elapsed()
    );
    let status = server
        .wait_exit(Duration::from_secs(10))
        .expect("still running");
    assert!(status.success(), "{status}; log:\n{}", server.log_text());
}

async fn recv(ws: &mut walkie::WebSocket<walkie::MaybeTlsStream>) -> Message {
    tokio::time::timeout(Duration::from_secs(5), ws.recv())
        .await
        .expect("nothing within 5 s")
        .expect("connection ended")
        .expect("connection failed")
}

/// A member held to its rate still gets the room's messages: it waits a
/// second at most, and takes a turn at its queue between waits.
#[tokio::test]
async fn a_paced_member_keeps_receiving() {
    let server = Server::start(&["--in-memory", "--client-publish-rate", "1"]);
    within(30, async {
        let url = server.ws_url("/rooms/paced");
        let mut sender = walkie::connect(&url).await.unwrap();
        let mut other = walkie::connect(&url).await.unwrap();
        joined(&server, "", 2).await;
        for i in 0..6 {
            sender.send(format!("m{i}")).await.unwrap();
        }
        assert_eq!(recv(&mut sender).await, Message::text("m0"));
        other.send("hello").await.unwrap();
        // m3 cannot come before the third second after m0: "hello", sent
        // now, comes first.
        let mut seen = Vec::new();
        loop {
            let Message::Text(t) = recv(&mut sender).await else {
                panic!("not text");
            };
            seen.push(t.to_string());
            if t.as_str() == "hello" {
                break;
            }
        }
        let before: Vec<String> = (1..seen.len()).map(|i| format!("m{i}")).collect();
        assert_eq!(
            seen[..seen.len() - 1],
            before[..],
            "m3 or later before hello"
        );
        assert!(seen.len() <= 3, "{seen:?}");
        // And the rest of the burst follows, in order.
        for i in seen.len()..=5 {
            assert_eq!(recv(&mut sender).await, Message::text(format!("m{i}")));
        }
    })
    .await;
}

/// A member held back by its rate is not idle: `--idle-timeout` counts
/// from when the server last took its messages, not from when they
/// arrived, so a member paced for longer than the timeout is not closed
/// as idle while its messages wait, and none is lost.
#[tokio::test]
async fn a_paced_member_is_not_closed_as_idle() {
    let server = Server::start(&[
        "--in-memory",
        "--client-publish-rate",
        "2",
        "--idle-timeout",
        "1500ms",
        "--ping-interval",
        "off",
    ]);
    within(30, async {
        let url = server.ws_url("/rooms/paced");
        let mut sender = walkie::connect(&url).await.unwrap();
        joined(&server, "", 1).await;
        // 12 at 2 per second: six seconds, four times the idle timeout.
        for i in 0..12 {
            sender.send(format!("x{i}")).await.unwrap();
        }
        for i in 0..12 {
            assert_eq!(recv(&mut sender).await, Message::text(format!("x{i}")));
        }
    })
    .await;
}
