//! The engine restarted under load: a node on a Redis of its own (started
//! here with `redis-server`, no persistence) loses it, logs that it is
//! reconnecting, and when Redis is back it reconnects and resubscribes by
//! itself: clients that stayed connected get new messages again, without
//! reconnecting. Skipped without `redis-server` on the PATH or without
//! `WALKIE_TEST_REDIS` (the sign that this machine runs Redis tests).

mod common;

#[path = "common/proto.rs"]
mod proto;

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{ChildGuard, Server, http_exchange, within};
use serde_json::json;

fn redis_server(port: u16) -> Option<ChildGuard> {
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let guard = ChildGuard(child);
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(guard);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn publish(port: u16, data: &str) -> u16 {
    let body = json!({"channel": "live:x", "data": data}).to_string();
    let request = format!(
        "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: apikey k\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    http_exchange(port, request.as_bytes()).await.status
}

#[tokio::test]
async fn a_node_reconnects_to_a_restarted_redis_by_itself() {
    if std::env::var("WALKIE_TEST_REDIS").is_err() {
        let _ = writeln!(
            std::io::stderr().lock(),
            "SKIPPED redis_restart: set WALKIE_TEST_REDIS to run the Redis tests"
        );
        return;
    }
    let redis_port = free_port();
    let Some(redis) = redis_server(redis_port) else {
        let _ = writeln!(
            std::io::stderr().lock(),
            "SKIPPED redis_restart: cannot start redis-server"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        "[auth]\nanonymous = true\napi_key = \"k\"\n[namespaces.live]\nanonymous = true\n",
    )
    .unwrap();
    let url = format!("redis://127.0.0.1:{redis_port}");
    let node = Server::start(&["--engine", &url, "--config", config.to_str().unwrap()]);
    within(60, async {
        let (mut c, _) = proto::connected(node.port, None).await;
        c.ok("subscribe", json!({"channel": "live:x"})).await;
        assert_eq!(publish(node.port, "before").await, 200);
        assert_eq!(c.publication().await["data"], "before");

        drop(redis);
        assert!(
            node.wait_log(&["redis engine: connection lost"]).is_some(),
            "log:\n{}",
            node.log_text()
        );
        // While Redis is down, publishing fails with a clear error (503).
        assert_eq!(publish(node.port, "during").await, 503);

        let _redis = redis_server(redis_port).expect("redis-server restarts");
        // Publishing works again once the node has reconnected.
        let mut status = 0;
        for _ in 0..100 {
            status = publish(node.port, "after").await;
            if status == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            status,
            200,
            "the node did not reconnect; log:\n{}",
            node.log_text()
        );
        assert!(
            node.wait_log(&["redis engine: reconnected"]).is_some(),
            "log:\n{}",
            node.log_text()
        );
        // The client stayed connected and gets new messages again, told
        // first that the channel's history was lost (Redis kept nothing).
        let notice = c.push().await;
        assert!(
            notice.get("epoch").is_some(),
            "expected an epoch push, got {notice}"
        );
        let p = c.publication().await;
        assert_eq!(p["data"], "after", "{p}");
        assert_eq!(p["offset"], 1, "offsets start again in the new epoch");
        assert!(c.close_code().is_none());
    })
    .await;
}

/// A node that only receives (its clients subscribe; another node
/// publishes) makes no request of its own to Redis: after an outage longer
/// than the connection's own retries (about 6 s) it must still come back by
/// itself, catch up, and deliver again.
#[tokio::test]
async fn a_node_that_only_receives_comes_back_after_a_long_outage() {
    if std::env::var("WALKIE_TEST_REDIS").is_err() {
        let _ = writeln!(
            std::io::stderr().lock(),
            "SKIPPED redis_restart: set WALKIE_TEST_REDIS to run the Redis tests"
        );
        return;
    }
    let redis_port = free_port();
    let Some(redis) = redis_server(redis_port) else {
        let _ = writeln!(
            std::io::stderr().lock(),
            "SKIPPED redis_restart: cannot start redis-server"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        "[auth]\nanonymous = true\napi_key = \"k\"\n[namespaces.live]\nanonymous = true\n",
    )
    .unwrap();
    let url = format!("redis://127.0.0.1:{redis_port}");
    let args = ["--engine", &url, "--config", config.to_str().unwrap()];
    let receiver = Server::start(&args);
    let publisher = Server::start(&args);
    within(90, async {
        let (mut c, _) = proto::connected(receiver.port, None).await;
        c.ok("subscribe", json!({"channel": "live:x"})).await;
        assert_eq!(publish(publisher.port, "before").await, 200);
        assert_eq!(c.publication().await["data"], "before");

        drop(redis);
        assert!(
            receiver
                .wait_log(&["redis engine: connection lost"])
                .is_some()
        );
        tokio::time::sleep(Duration::from_secs(10)).await;
        let _redis = redis_server(redis_port).expect("redis-server restarts");
        let mut status = 0;
        for _ in 0..150 {
            status = publish(publisher.port, "after").await;
            if status == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(status, 200, "log:\n{}", publisher.log_text());
        // The epoch notice (Redis kept nothing), then the message, once
        // the receiving node is back: give it 30 s.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let got = loop {
            let next = tokio::time::timeout_at(deadline, c.ws.recv()).await;
            match next {
                Ok(Some(Ok(walkie::Message::Text(text)))) => {
                    let m: serde_json::Value = serde_json::from_str(&text).unwrap();
                    if m.get("pub").is_some() {
                        break m;
                    }
                }
                Ok(other) => panic!("the connection ended: {other:?}"),
                Err(_) => panic!(
                    "the receiving node never came back; log:\n{}",
                    receiver.log_text()
                ),
            }
        };
        assert_eq!(got["pub"]["data"], "after", "{got}");
        assert!(c.close_code().is_none());
    })
    .await;
}
