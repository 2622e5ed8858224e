//! The hub's promise, through the real binary: clients on several channels
//! drop their connections at random and come back with recovery while a
//! backend publishes numbered messages, and the server itself is restarted
//! mid-run (history is durable). Every client ends with every message of
//! every channel, in order, exactly once.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::Server;
use common::chaos::{CHANNELS, CLIENTS, KEY, PER_CHANNEL, Seen, assert_exact, client, publish};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_gets_every_message_once_through_drops_and_a_restart() {
    chaos(&[], 0).await;
}

/// The same with a client queue of 8 messages, and clients that stay away
/// up to 400 ms: many recoveries are larger than the queue, and come piece
/// by piece as the client reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recoveries_larger_than_the_queue_come_whole_through_drops_and_a_restart() {
    let seen = chaos(&["--client-queue", "8"], 400).await;
    let largest = seen
        .iter()
        .flat_map(|s| s.values())
        .map(|s| s.largest_recovery)
        .max();
    eprintln!("the largest recovery: {largest:?} messages");
    assert!(
        largest > Some(8),
        "no recovery was larger than the queue: {largest:?}"
    );
}

/// Runs the clients, the publisher and the restart against `walkie serve`
/// with `extra` flags, each client staying away up to `away_ms` between
/// connections; asserts every client's sequence and returns them.
async fn chaos(extra: &[&str], away_ms: u64) -> Vec<HashMap<&'static str, Seen>> {
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
        .into_iter()
        .chain(extra.iter().map(|a| a.to_string()))
        .collect::<Vec<_>>()
    };
    let mut server = Server::spawn(args("127.0.0.1:0"), &[]);
    let port = server.port;
    let done = Arc::new(AtomicBool::new(false));

    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| tokio::spawn(client(c, vec![port], done.clone(), away_ms)))
        .collect();
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
    let mut all = Vec::new();
    for (c, client) in clients.into_iter().enumerate() {
        let seen = client.await.unwrap_or_else(|e| panic!("client {c}: {e}"));
        assert_exact(c, &seen);
        all.push(seen);
    }
    all
}
