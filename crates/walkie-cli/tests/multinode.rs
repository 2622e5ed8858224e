//! Several `walkie serve` nodes on one Redis, or on one NATS, act as one:
//! clients on different nodes share channels, history and presence, and
//! the publish API works on any node. Needs `WALKIE_TEST_REDIS` and
//! `WALKIE_TEST_NATS` (`.ci/run` sets them); without them the tests say
//! they were skipped.

mod common;

#[path = "common/proto.rs"]
mod proto;

use std::io::Write as _;

use common::{Server, http_exchange, within};
use serde_json::json;

fn redis() -> Option<String> {
    let url = std::env::var("WALKIE_TEST_REDIS").ok();
    if url.is_none() {
        let _ = writeln!(
            std::io::stderr().lock(),
            "SKIPPED multinode: no Redis configured; set WALKIE_TEST_REDIS=redis://127.0.0.1:6379 to run it"
        );
    }
    url
}

fn node(url: &str, prefix: &str) -> Server {
    Server::start(&["--engine", url, "--engine-prefix", prefix, "--api-key", "k"])
}

fn nats() -> Option<String> {
    let url = std::env::var("WALKIE_TEST_NATS").ok();
    if url.is_none() {
        let _ = writeln!(
            std::io::stderr().lock(),
            "SKIPPED multinode: no NATS configured; set WALKIE_TEST_NATS=nats://127.0.0.1:4222 to run it"
        );
    }
    url
}

/// `POST /api/METHOD` with the tests' API key.
fn api_request(method: &str, body: &serde_json::Value) -> String {
    let body = body.to_string();
    format!(
        "POST /api/{method} HTTP/1.1\r\nHost: x\r\nAuthorization: apikey k\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Runs `test` on the NATS at `url` under a fresh prefix, then deletes
/// every stream and bucket under it, even when the test failed; returns
/// how many streams it deleted.
async fn on_nats<F, Fut>(url: &str, tag: &str, test: F) -> usize
where
    F: FnOnce(String, String) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let prefix = format!(
        "walkie-test-{}-{:08x}-{tag}:",
        std::process::id(),
        rand::random::<u32>()
    );
    let outcome = tokio::spawn(test(url.to_owned(), prefix.clone())).await;
    let broker = walkie_hub::NatsBroker::connect(url, &prefix).await.unwrap();
    let deleted = broker.delete_all().await.unwrap();
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
    deleted
}

#[tokio::test]
async fn clients_on_different_nodes_share_channels_history_and_presence() {
    let Some(url) = redis() else { return };
    let prefix = format!("walkie-test-{}:", std::process::id());
    share_channels_history_and_presence(&url, &prefix).await;
}

/// The same on NATS JetStream; then an idempotency key used on one node
/// is a duplicate on the other. Deletes its streams and buckets at the end,
/// even when it fails.
#[tokio::test]
async fn nats_nodes_share_channels_history_and_presence() {
    let Some(url) = nats() else { return };
    let deleted = on_nats(&url, "share", |url, prefix| async move {
        let (one, two) = share_channels_history_and_presence(&url, &prefix).await;
        within(30, async {
            let body = json!({"channel": "chat:idem", "data": "once", "idempotency_key": "k1"});
            let first = http_exchange(one.port, api_request("publish", &body).as_bytes()).await;
            let again = http_exchange(two.port, api_request("publish", &body).as_bytes()).await;
            assert_eq!((first.status, again.status), (200, 200));
            let first: serde_json::Value = serde_json::from_str(&first.body).unwrap();
            let again: serde_json::Value = serde_json::from_str(&again.body).unwrap();
            assert_eq!(first["duplicate"], false);
            assert_eq!(again["duplicate"], true, "{again}");
            assert_eq!(
                (&first["offset"], &first["epoch"]),
                (&again["offset"], &again["epoch"])
            );
        })
        .await;
    })
    .await;
    assert!(deleted >= 2, "a stream per channel: {deleted}");
}

/// Two nodes on the engine at `url`; returns them, still running.
async fn share_channels_history_and_presence(url: &str, prefix: &str) -> (Server, Server) {
    let one = node(url, prefix);
    let two = node(url, prefix);
    within(30, async {
        let (mut a, _) = proto::connected(one.port, None).await;
        let (mut b, _) = proto::connected(two.port, None).await;
        a.ok("subscribe", json!({"channel": "chat:multi"})).await;
        b.ok("subscribe", json!({"channel": "chat:multi"})).await;
        let r = b
            .ok(
                "publish",
                json!({"channel": "chat:multi", "data": "from node two"}),
            )
            .await;
        assert_eq!(r["offset"], 1);
        assert_eq!(a.publication().await["data"], "from node two");
        assert_eq!(b.publication().await["data"], "from node two");
        // The API of node one reaches node two's client.
        let request = api_request(
            "publish",
            &json!({"channel": "chat:multi", "data": "from the API"}),
        );
        assert_eq!(
            http_exchange(one.port, request.as_bytes()).await.status,
            200
        );
        assert_eq!(b.publication().await["data"], "from the API");
        assert_eq!(a.publication().await["data"], "from the API");
        // Presence is the union of both nodes.
        let stats = a
            .ok("presence_stats", json!({"channel": "chat:multi"}))
            .await;
        assert_eq!(stats["clients"], 2);
        // One entry per user, however many connections on however many
        // nodes (both clients are the anonymous user here).
        let presence = a.ok("presence", json!({"channel": "chat:multi"})).await;
        assert_eq!(presence["clients"].as_object().unwrap().len(), 2);
        let users = presence["users"].as_object().unwrap();
        assert_eq!(users.len(), 1, "{presence}");
        assert_eq!(users[""]["clients"], 2, "{presence}");
        // History from either node.
        let h = a.ok("history", json!({"channel": "chat:multi"})).await;
        assert_eq!(h["publications"].as_array().unwrap().len(), 2);
        // A client of node two leaves: node one's client sees it go.
        b.ws.close(walkie::CloseCode::NORMAL, "").await.unwrap();
        loop {
            let p = a.push().await;
            if p.get("leave").is_some() {
                break;
            }
        }
        let stats = a
            .ok("presence_stats", json!({"channel": "chat:multi"}))
            .await;
        assert_eq!(stats["clients"], 1);
    })
    .await;
    (one, two)
}

/// Two nodes sharing an HS256 secret, so that one token works on both.
fn nodes_with_users(url: &str, prefix: &str) -> (Server, Server, tempfile::TempDir) {
    let (dir, config) = common::config_file(
        "[auth]\nhmac_secret = \"multinode\"\napi_key = \"k\"\n\n[namespaces.chat]\npresence = true\nallow_publish = true\n",
    );
    let args = [
        "--engine",
        url,
        "--engine-prefix",
        prefix,
        "--config",
        &config,
    ];
    (Server::start(&args), Server::start(&args), dir)
}

/// The API's `disconnect`, called on node one, closes the user's
/// connections on both nodes (4009), and no one else's.
async fn disconnect_reaches_every_node(url: &str, prefix: &str) {
    let (one, two, _dir) = nodes_with_users(url, prefix);
    let alice = proto::token(
        "multinode",
        json!({"sub": "alice", "exp": proto::now() + 600}),
    );
    let bob = proto::token(
        "multinode",
        json!({"sub": "bob", "exp": proto::now() + 600}),
    );
    within(30, async {
        let (mut on_one, _) = proto::connected(one.port, Some(&alice)).await;
        let (mut on_two, _) = proto::connected(two.port, Some(&alice)).await;
        let (mut other, _) = proto::connected(two.port, Some(&bob)).await;
        for c in [&mut on_one, &mut on_two, &mut other] {
            c.ok("subscribe", json!({"channel": "chat:kick"})).await;
        }
        let request = api_request("disconnect", &json!({"user": "alice"}));
        let r = http_exchange(one.port, request.as_bytes()).await;
        assert_eq!(r.status, 200, "{r:?}");
        let r: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(r["disconnected"], 1, "counted on the node called: {r}");
        assert_eq!(on_one.closed().await, Some(4009));
        assert_eq!(on_two.closed().await, Some(4009));
        // Bob, on the node that got the control message, is still served.
        other
            .ok(
                "publish",
                json!({"channel": "chat:kick", "data": "still here"}),
            )
            .await;
        assert_eq!(other.publication().await["data"], "still here");
    })
    .await;
}

#[tokio::test]
async fn api_disconnect_reaches_every_redis_node() {
    let Some(url) = redis() else { return };
    let prefix = format!("walkie-test-{}-kick:", std::process::id());
    disconnect_reaches_every_node(&url, &prefix).await;
}

#[tokio::test]
async fn api_disconnect_reaches_every_nats_node() {
    let Some(url) = nats() else { return };
    on_nats(&url, "kick", |url, prefix| async move {
        disconnect_reaches_every_node(&url, &prefix).await
    })
    .await;
}

/// A node killed with SIGKILL cannot say its members left: its presence
/// entries expire (`--presence-ttl`), while the surviving node's entries,
/// refreshed, stay. Two tabs of one user on two nodes count as one user.
async fn presence_forgets_a_killed_node(url: &str, prefix: &str) {
    let args = [
        "--engine",
        url,
        "--engine-prefix",
        prefix,
        "--presence-ttl",
        "2s",
    ];
    let one = Server::start(&args);
    let mut two = Server::start(&args);
    within(40, async {
        let (mut a, _) = proto::connected(one.port, None).await;
        let (mut b, _) = proto::connected(two.port, None).await;
        a.ok("subscribe", json!({"channel": "chat:alive"})).await;
        b.ok("subscribe", json!({"channel": "chat:alive"})).await;
        let stats = a
            .ok("presence_stats", json!({"channel": "chat:alive"}))
            .await;
        assert_eq!(
            (stats["clients"].as_u64(), stats["users"].as_u64()),
            (Some(2), Some(1))
        );
        two.signal("KILL");
        assert!(two.wait_exit(std::time::Duration::from_secs(5)).is_some());
        let started = std::time::Instant::now();
        loop {
            let stats = a
                .ok("presence_stats", json!({"channel": "chat:alive"}))
                .await;
            if stats["clients"] == 1 {
                break;
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "the killed node's member is still present: {stats}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        // Well past the TTL, the living node's member is still there.
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        let presence = a.ok("presence", json!({"channel": "chat:alive"})).await;
        assert_eq!(
            presence["clients"].as_object().unwrap().len(),
            1,
            "{presence}"
        );
    })
    .await;
}

#[tokio::test]
async fn redis_presence_forgets_a_killed_node() {
    let Some(url) = redis() else { return };
    let prefix = format!("walkie-test-{}-ttl:", std::process::id());
    presence_forgets_a_killed_node(&url, &prefix).await;
}

#[tokio::test]
async fn nats_presence_forgets_a_killed_node() {
    let Some(url) = nats() else { return };
    on_nats(&url, "ttl", |url, prefix| async move {
        presence_forgets_a_killed_node(&url, &prefix).await
    })
    .await;
}

/// `?replicas=3` on a single NATS server (as `WALKIE_TEST_NATS` is in CI)
/// cannot be honoured: `walkie serve` says so at start, exit code 2,
/// instead of failing every publish later.
#[test]
fn nats_replicas_a_single_server_cannot_give_fail_at_start() {
    let Some(url) = nats() else { return };
    let prefix = format!("walkie-test-{}-replicas:", std::process::id());
    let run = common::run_walkie(
        [
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--engine",
            &format!("{url}?replicas=3"),
            "--engine-prefix",
            &prefix,
        ],
        &[],
        None,
        std::time::Duration::from_secs(20),
    );
    assert_eq!(run.code(), Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("replicas"), "{}", run.stderr);
}

/// Without a configuration file, a token from one node's `/demo/token`
/// works on every node sharing the engine (each made up its own secret,
/// and a client reconnecting to another node was refused with 4001).
async fn demo_tokens_work_on_every_node(url: &str, prefix: &str) {
    let nodes = [node(url, prefix), node(url, prefix)];
    within(20, async {
        let request = "GET /demo/token?user=42 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        let r = http_exchange(nodes[0].port, request.as_bytes()).await;
        assert_eq!(r.status, 200, "{r:?}");
        let token: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        let token = token["token"].as_str().unwrap().to_owned();
        for n in &nodes {
            let (_, info) = proto::connected(n.port, Some(&token)).await;
            assert_eq!(info["user"], "42", "node {}", n.port);
        }
    })
    .await;
    // Another cluster (another prefix) does not take them.
    let other = node(url, &format!("{prefix}other:"));
    within(20, async {
        let request = "GET /demo/token?user=42 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        let r = http_exchange(nodes[0].port, request.as_bytes()).await;
        let token: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        let mut p = proto::open(other.port).await;
        let connect = json!({"id": 1, "connect": {"token": token["token"]}});
        p.send_raw(&connect.to_string()).await;
        assert_eq!(p.closed().await, Some(4001));
    })
    .await;
}

#[tokio::test]
async fn demo_tokens_work_on_every_redis_node() {
    let Some(url) = redis() else { return };
    let prefix = format!("walkie-test-{}-demo:", std::process::id());
    demo_tokens_work_on_every_node(&url, &prefix).await;
}

#[tokio::test]
async fn demo_tokens_work_on_every_nats_node() {
    let Some(url) = nats() else { return };
    on_nats(&url, "demo", |url, prefix| async move {
        demo_tokens_work_on_every_node(&url, &prefix).await;
        let other = format!("{prefix}other:");
        let broker = walkie_hub::NatsBroker::connect(&url, &other).await.unwrap();
        broker.delete_all().await.unwrap();
    })
    .await;
}
