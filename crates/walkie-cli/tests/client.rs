//! The library's Walkie protocol client (`walkie_hub::client`) and
//! `walkie connect --subscribe`, against the real binary: publications
//! arrive, publish waits for the ack, and a client whose server restarts
//! reconnects by itself and recovers exactly what it missed.

mod common;

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Server, WALKIE, http_exchange, within};
use serde_json::{Value, json};
use walkie_hub::client::{Client, ClientEvent, Options, SubscribeOptions};

const KEY: &str = "client-test-key";

async fn api_publish(port: u16, channel: &str, data: Value) {
    let body = json!({"channel": channel, "data": data}).to_string();
    let request = format!(
        "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: apikey {KEY}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let r = http_exchange(port, request.as_bytes()).await;
    assert_eq!(r.status, 200, "{r:?}");
}

async fn next_publication(events: &mut tokio::sync::mpsc::Receiver<ClientEvent>) -> (u64, Value) {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
            Ok(Some(ClientEvent::Publication { offset, data, .. })) => return (offset, data),
            Ok(Some(_)) => continue,
            other => panic!("no publication: {other:?}"),
        }
    }
}

#[tokio::test]
async fn the_client_recovers_across_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_owned();
    let mut server = Server::start(&["--data-dir", &data, "--api-key", KEY]);
    let port = server.port;
    within(60, async {
        let mut options = Options::new(format!("ws://127.0.0.1:{port}/ws"));
        options.name = Some("bot".into());
        let (client, mut events) = Client::start(options);
        client
            .subscribe("feed", SubscribeOptions::default())
            .await
            .unwrap();
        // Our own publish is acknowledged and delivered to us.
        let ack = client.publish("feed", json!("from the bot")).await.unwrap();
        assert_eq!(ack["offset"], 1);
        assert_eq!(
            next_publication(&mut events).await,
            (1, json!("from the bot"))
        );
        for i in 2..=3 {
            api_publish(port, "feed", json!(i)).await;
            assert_eq!(next_publication(&mut events).await, (i, json!(i)));
        }

        server.signal("TERM");
        assert!(server.wait_exit(Duration::from_secs(15)).is_some());
        let bind = format!("127.0.0.1:{port}");
        server = Server::spawn(
            [
                "serve",
                "--bind",
                &bind,
                "--data-dir",
                &data,
                "--api-key",
                KEY,
            ],
            &[],
        );
        for i in 4..=6 {
            api_publish(port, "feed", json!(i)).await;
        }
        let mut saw = Vec::new();
        let mut recovered = None;
        while saw.len() < 3 {
            match tokio::time::timeout(Duration::from_secs(15), events.recv())
                .await
                .unwrap()
                .unwrap()
            {
                ClientEvent::Publication { offset, data, .. } => saw.push((offset, data)),
                ClientEvent::Subscribed { recovered: r, .. } => recovered = r,
                ClientEvent::RecoveryFailed { channel } => panic!("recovery failed in {channel}"),
                _ => {}
            }
        }
        assert_eq!(recovered, Some(true));
        assert_eq!(saw, [(4, json!(4)), (5, json!(5)), (6, json!(6))]);
        // Presence sees the bot by its name.
        let presence = client.presence("feed").await.unwrap();
        let names: Vec<&str> = presence
            .as_object()
            .unwrap()
            .values()
            .filter_map(|c| c["info"]["name"].as_str())
            .collect();
        assert_eq!(names, ["bot"]);
        client.stop();
    })
    .await;
    drop(server);
}

#[test]
fn walkie_connect_subscribes_and_publishes_through_the_protocol() {
    let server = Server::start(&[]);
    let url = format!("ws://127.0.0.1:{}/ws", server.port);
    let reader = Command::new(WALKIE)
        .args([
            "connect",
            &url,
            "--subscribe",
            "news",
            "--no-stdin",
            "-n",
            "2",
            "-t",
            "15s",
        ])
        .env_remove("WALKIE_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // (It exits by itself within its -t 15s whatever happens below.)
    // The reader subscribes before anything is published.
    std::thread::sleep(Duration::from_millis(800));
    let mut writer = Command::new(WALKIE)
        .args(["connect", &url, "--subscribe", "news", "-t", "10s"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writer
        .stdin
        .take()
        .unwrap()
        .write_all(b"{\"headline\":\"walkie 1.0\"}\nplain text\n")
        .unwrap();
    let out = writer.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "writer: {:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = reader.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "reader: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["data"], json!({"headline": "walkie 1.0"}));
    assert_eq!(lines[1]["data"], "plain text");
    assert_eq!(lines[1]["channel"], "news");
    assert_eq!(lines[1]["offset"], 2);

    // A late joiner replays with --history.
    let late = common::run_walkie(
        [
            "connect",
            url.as_str(),
            "--subscribe",
            "news",
            "--history",
            "2",
            "--no-stdin",
            "-n",
            "2",
            "-t",
            "10s",
        ],
        &[],
        None,
        Duration::from_secs(20),
    );
    assert_eq!(late.code(), Some(0), "{late:?}");
    assert_eq!(late.stdout.lines().count(), 2, "{}", late.stdout);

    // A channel that does not exist is an error with a message.
    let bad = common::run_walkie(
        [
            "connect",
            url.as_str(),
            "--subscribe",
            "nope:x",
            "--no-stdin",
            "-t",
            "5s",
        ],
        &[],
        None,
        Duration::from_secs(20),
    );
    assert_eq!(bad.code(), Some(4), "{bad:?}");
    assert!(bad.stderr.contains("nope:x"), "{}", bad.stderr);
}
