//! Scale-out's promise: three `walkie serve` nodes on one Redis; clients
//! spread over them drop their connections at random and come back (to
//! any node) with recovery, while a backend publishes numbered messages
//! through the API of whichever node answers; one node is killed with
//! SIGKILL mid-run and its clients move to the others. Every client ends
//! with every message of every channel, in order, exactly once. Needs
//! `WALKIE_TEST_REDIS` (`.ci/run` sets it); skipped without it.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::Server;
use common::chaos::{
    CHANNELS, CLIENTS, KEY, PER_CHANNEL, Rng, Seen, assert_exact, publish, session,
};

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
        node_dies(url, "walkie-chaos-").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_nats_every_client_gets_every_message_once_when_a_node_dies() {
    if let Some(url) = engine(
        "WALKIE_TEST_NATS",
        "nats://127.0.0.1:4222",
        "chaos_multinode (nats)",
    ) {
        let prefix = node_dies(url.clone(), "walkiechaos").await;
        // Leave nothing behind in the shared NATS.
        if let Ok(broker) = walkie_hub::NatsBroker::connect(&url, &prefix).await {
            let _ = broker.delete_all().await;
        }
    }
}

/// Runs the scenario; returns the engine prefix it used.
async fn node_dies(engine_url: String, prefix_base: &str) -> String {
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
    let mut nodes: Vec<Server> = (0..3).map(|_| Server::spawn(args.clone(), &[])).collect();
    let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
    let done = Arc::new(AtomicBool::new(false));

    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let done = done.clone();
        let ports = ports.clone();
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
                // Each session on some node; a dead node's port refuses.
                let port = ports[rng.next(ports.len() as u64) as usize];
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
    for (c, client) in clients.into_iter().enumerate() {
        let seen = client.await.unwrap_or_else(|e| panic!("client {c}: {e}"));
        assert_exact(c, &seen);
    }
    prefix
}
