//! Scale-out's promise: three `walkie serve` nodes on one Redis; clients
//! spread over them drop their connections at random and come back (to
//! any node) with recovery, while a backend publishes numbered messages
//! through the API of whichever node answers; one node is killed with
//! SIGKILL mid-run and its clients move to the others. Every client ends
//! with every message of every channel, in order, exactly once. Needs
//! `WALKIE_TEST_REDIS` (`.ci/run` sets it); skipped without it.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::Server;
use common::chaos::{CHANNELS, CLIENTS, KEY, PER_CHANNEL, assert_exact, client, publish};

/// The engine's URL from `var`, or `None` after saying the test is skipped.
fn engine(var: &str, example: &str, test: &str) -> Option<String> {
    let url = std::env::var(var).ok();
    if url.is_none() {
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr().lock(),
            "SKIPPED {test}: no engine configured; set {var}={example} to run it"
        );
    }
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_every_client_gets_every_message_once_when_a_node_dies() {
    if let Some(url) = engine(
        "WALKIE_TEST_REDIS",
        "redis://127.0.0.1:6379",
        "chaos_multinode (redis)",
    ) {
        node_dies(url, "walkie-chaos-", &[], 0).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_nats_every_client_gets_every_message_once_when_a_node_dies() {
    if let Some(url) = engine(
        "WALKIE_TEST_NATS",
        "nats://127.0.0.1:4222",
        "chaos_multinode (nats)",
    ) {
        // With a client queue of 8 and clients away up to 400 ms: most
        // recoveries are larger than the queue, and are read from the
        // engine's history piece by piece.
        let (prefix, largest) =
            node_dies(url.clone(), "walkiechaos", &["--client-queue", "8"], 400).await;
        assert!(
            largest > 8,
            "no recovery was larger than the queue: {largest}"
        );
        // Leave nothing behind in the shared NATS.
        if let Ok(broker) = walkie_hub::NatsBroker::connect(&url, &prefix).await {
            let _ = broker.delete_all().await;
        }
    }
}

/// Runs the scenario with `extra` flags for every node and clients that
/// stay away up to `away_ms` between connections; returns the engine
/// prefix it used and the most messages one recovery brought.
async fn node_dies(
    engine_url: String,
    prefix_base: &str,
    extra: &[&str],
    away_ms: u64,
) -> (String, u64) {
    let redis = engine_url;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("chaos.toml");
    std::fs::write(
        &config,
        "[auth]\nanonymous = true\n[namespaces.chaos]\nhistory_size = 5000\nanonymous = true\n",
    )
    .unwrap();
    let unique = format!(
        "{}{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    );
    let prefix = if prefix_base.ends_with('-') {
        format!("{prefix_base}{unique}:")
    } else {
        format!("{prefix_base}{unique}")
    };
    let args = vec![
        "serve".to_owned(),
        "--bind".into(),
        "127.0.0.1:0".into(),
        "--config".into(),
        config.to_str().unwrap().into(),
        "--engine".into(),
        redis.clone(),
        "--engine-prefix".into(),
        prefix.clone(),
        "--api-key".into(),
        KEY.into(),
    ];
    let args: Vec<String> = args
        .into_iter()
        .chain(extra.iter().map(|a| a.to_string()))
        .collect();
    let mut nodes: Vec<Server> = (0..3).map(|_| Server::spawn(args.clone(), &[])).collect();
    let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
    let done = Arc::new(AtomicBool::new(false));

    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| tokio::spawn(client(c, ports.clone(), done.clone(), away_ms)))
        .collect();
    // Let every client subscribe before the first message.
    tokio::time::sleep(Duration::from_millis(500)).await;

    for n in 1..=PER_CHANNEL {
        for ch in CHANNELS {
            publish(&ports, ch, n).await;
        }
        if n == PER_CHANNEL / 2 {
            // No goodbye: the node and its connections just vanish.
            nodes[1].signal("KILL");
            assert!(
                nodes[1].wait_exit(Duration::from_secs(10)).is_some(),
                "no exit on SIGKILL"
            );
        }
    }
    done.store(true, Ordering::Relaxed);
    let mut largest = 0;
    for (c, client) in clients.into_iter().enumerate() {
        let seen = client.await.unwrap_or_else(|e| panic!("client {c}: {e}"));
        assert_exact(c, &seen);
        largest = seen
            .values()
            .map(|s| s.largest_recovery)
            .fold(largest, u64::max);
    }
    (prefix, largest)
}
