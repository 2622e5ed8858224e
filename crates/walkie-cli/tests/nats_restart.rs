//! The engine restarted: a node on a NATS server of its own (started here
//! with `nats-server -js`, its JetStream store in a temporary directory
//! kept across the restart) loses it. A publish made while it is down
//! fails with 503 and stays failed: it is not held back and saved once
//! NATS is back, where the publisher, told it failed, would send it again.
//! Skipped without `nats-server` on the PATH or without `WALKIE_TEST_NATS`
//! (the sign that this machine runs NATS tests).

mod common;

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{ChildGuard, Server, http_exchange, within};
use serde_json::json;

fn nats_server(port: u16, store: &std::path::Path) -> Option<ChildGuard> {
    let child = Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(store)
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

async fn api(port: u16, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let body = body.to_string();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: apikey k\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let r = http_exchange(port, request.as_bytes()).await;
    (r.status, serde_json::from_str(&r.body).unwrap_or_default())
}

#[tokio::test]
async fn a_publish_refused_while_nats_is_down_is_not_saved_later() {
    if std::env::var("WALKIE_TEST_NATS").is_err() {
        let _ = writeln!(
            std::io::stderr().lock(),
            "SKIPPED nats_restart: set WALKIE_TEST_NATS to run the NATS tests"
        );
        return;
    }
    let store = tempfile::tempdir().unwrap();
    let nats_port = free_port();
    let Some(nats) = nats_server(nats_port, store.path()) else {
        let _ = writeln!(
            std::io::stderr().lock(),
            "SKIPPED nats_restart: cannot start nats-server"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        "[auth]\nanonymous = true\napi_key = \"k\"\n[namespaces.live]\nhistory_size = 10\n",
    )
    .unwrap();
    let url = format!("nats://127.0.0.1:{nats_port}");
    let node = Server::start(&["--engine", &url, "--config", config.to_str().unwrap()]);
    within(90, async {
        let publish = |data: &str| json!({"channel": "live:kept", "data": data});
        assert_eq!(
            api(node.port, "/api/publish", publish("before")).await.0,
            200
        );

        drop(nats);
        let mut status = 200;
        for _ in 0..100 {
            status = api(node.port, "/api/publish", publish("during")).await.0;
            if status != 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(status, 503, "log:\n{}", node.log_text());

        let _nats = nats_server(nats_port, store.path()).expect("nats-server restarts");
        for _ in 0..150 {
            status = api(node.port, "/api/publish", publish("after")).await.0;
            if status == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(status, 200, "log:\n{}", node.log_text());
        let (status, history) =
            api(node.port, "/api/history", json!({"channel": "live:kept"})).await;
        assert_eq!(status, 200, "{history}");
        let saved: Vec<_> = history["publications"]
            .as_array()
            .expect("publications")
            .iter()
            .map(|p| p["data"].clone())
            .collect();
        assert_eq!(saved, [json!("before"), json!("after")], "{history}");
    })
    .await;
}
