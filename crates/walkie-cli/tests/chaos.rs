//! The hub's promise, through the real binary: clients on several channels
//! drop their connections at random and come back with recovery while a
//! backend publishes numbered messages, and the server itself is restarted
//! mid-run (history is durable). Every client ends with every message of
//! every channel, in order, exactly once.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::Server;
use common::chaos::{
    CHANNELS, CLIENTS, KEY, PER_CHANNEL, Rng, Seen, assert_exact, publish, session,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_gets_every_message_once_through_drops_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("chaos.toml");
    std::fs::write(
        &config,
        "[auth]\nanonymous = true\n[namespaces.chaos]\nhistory_size = 5000\nanonymous = true\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let args = |bind: &str| {
        vec![
            "serve".to_owned(),
            "--bind".into(),
            bind.into(),
            "--config".into(),
            config.to_str().unwrap().into(),
            "--data-dir".into(),
            data.to_str().unwrap().into(),
            "--api-key".into(),
            KEY.into(),
        ]
    };
    let mut server = Server::spawn(args("127.0.0.1:0"), &[]);
    let port = server.port;
    let done = Arc::new(AtomicBool::new(false));

    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let done = done.clone();
        clients.push(tokio::spawn(async move {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (c as u64 + 1));
            let mut seen: HashMap<&'static str, Seen> =
                CHANNELS.iter().map(|c| (*c, Seen::default())).collect();
            let deadline = Instant::now() + Duration::from_secs(90);
            loop {
                let complete = seen.values().all(|s| s.data.len() as u64 >= PER_CHANNEL);
                if complete && done.load(Ordering::Relaxed) {
                    return seen;
                }
                assert!(
                    Instant::now() < deadline,
                    "client {c} did not finish: {:?}",
                    seen.values().map(|s| s.data.len()).collect::<Vec<_>>()
                );
                let drop_after = 1 + rng.next(150);
                if !session(port, &mut seen, drop_after).await {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }
    // Let every client subscribe before the first message.
    tokio::time::sleep(Duration::from_millis(500)).await;

    for n in 1..=PER_CHANNEL {
        for ch in CHANNELS {
            publish(&[port], ch, n).await;
        }
        if n == PER_CHANNEL / 2 {
            server.signal("TERM");
            assert!(
                server.wait_exit(Duration::from_secs(15)).is_some(),
                "no exit on SIGTERM"
            );
            let bind = format!("127.0.0.1:{port}");
            server = Server::spawn(args(&bind), &[]);
        }
    }
    done.store(true, Ordering::Relaxed);
    for (c, client) in clients.into_iter().enumerate() {
        let seen = client.await.unwrap_or_else(|e| panic!("client {c}: {e}"));
        assert_exact(c, &seen);
    }
}
