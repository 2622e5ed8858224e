//! A node whose engine connection is cut while its channel's history is
//! trimmed past what it missed: when the engine is back, the node cannot
//! deliver the channel in order, so its subscribers are closed with 1011
//! and their recovery says `recovered: false`, never a silent gap. The
//! connection is cut by a TCP proxy between the node and Redis or NATS.
//! Needs `WALKIE_TEST_REDIS` and `WALKIE_TEST_NATS`; without them the tests
//! say they were skipped.

mod common;

#[path = "common/proto.rs"]
mod proto;

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Server, within};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

fn service(var: &str) -> Option<String> {
    let url = std::env::var(var).ok();
    if url.is_none() {
        let _ = writeln!(
            std::io::stderr().lock(),
            "SKIPPED engine_gap: set {var} to run it"
        );
    }
    url
}

/// A TCP proxy to `target` that can cut every connection and refuse new
/// ones for a while.
struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
    links: Arc<std::sync::Mutex<JoinSet<()>>>,
}

impl Proxy {
    /// Runs on a thread and runtime of its own: the tests' runtime blocks
    /// while a server starts, and the server's engine connects through it.
    fn start(target: std::net::SocketAddr) -> Proxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let links = Arc::new(std::sync::Mutex::new(JoinSet::new()));
        let (up2, links2) = (up.clone(), links.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async move {
                let listener = TcpListener::from_std(listener).unwrap();
                while let Ok((mut client, _)) = listener.accept().await {
                    if !up2.load(Ordering::SeqCst) {
                        continue; // dropped: refused
                    }
                    links2.lock().unwrap().spawn(async move {
                        if let Ok(mut server) = TcpStream::connect(target).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                }
            });
        });
        Proxy { port, up, links }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.links.lock().unwrap().abort_all();
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// The address in a `redis://` or `nats://` URL (a name resolved, user
/// info left out).
fn address(url: &str) -> std::net::SocketAddr {
    use std::net::ToSocketAddrs as _;
    let rest = url.split("://").nth(1).unwrap();
    let authority = rest.split(['/', '?']).next().unwrap();
    let host = authority.rsplit('@').next().unwrap();
    host.to_socket_addrs().unwrap().next().unwrap()
}

const CONFIG: &str = r#"
[auth]
anonymous = true

[namespaces.chat]
history_size = 10
anonymous = true
allow_publish = true
"#;

async fn trimmed_while_cut_off(url: &str, scheme: &str, prefix: &str, lost_log: &str) {
    let proxy = Proxy::start(address(url));
    let behind = format!("{scheme}://127.0.0.1:{}", proxy.port);
    let (a, _dir_a) = Server::with_config(CONFIG, &["--engine", url, "--engine-prefix", prefix]);
    let (b, _dir_b) =
        Server::with_config(CONFIG, &["--engine", &behind, "--engine-prefix", prefix]);
    within(60, async {
        let (mut reader, _) = proto::connected(b.port, None).await;
        let sub = reader.ok("subscribe", json!({"channel": "chat:gap"})).await;
        assert_eq!(sub["offset"], 0);
        let epoch = sub["epoch"].as_str().unwrap().to_owned();

        proxy.cut();
        assert!(b.wait_log(&[lost_log]).is_some(), "log:\n{}", b.log_text());
        // 13 saved while node b is cut off: history keeps 4 to 13.
        let (mut writer, _) = proto::connected(a.port, None).await;
        for i in 1..=13 {
            writer
                .ok("publish", json!({"channel": "chat:gap", "data": i}))
                .await;
        }
        proxy.restore();

        // Nothing after the gap: the reader is closed with 1011.
        loop {
            let Some(m) = reader.next_within(Duration::from_secs(45)).await else {
                break;
            };
            assert!(m.get("pub").is_none(), "delivered past the gap: {m}");
        }
        assert_eq!(reader.close_code(), Some(1011), "log:\n{}", b.log_text());

        // Its recovery says what it missed cannot be recovered.
        let (mut again, _) = proto::connected(b.port, None).await;
        let r = again
            .ok(
                "subscribe",
                json!({"channel": "chat:gap", "recover": true, "offset": 0, "epoch": epoch}),
            )
            .await;
        assert_eq!(r["recovered"], false, "{r}");
        assert_eq!(r["offset"], 13, "{r}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_gap_trimmed_while_cut_off_closes_with_1011() {
    let Some(url) = service("WALKIE_TEST_REDIS") else {
        return;
    };
    let prefix = format!(
        "walkie-test-gap-{}-{:08x}:",
        std::process::id(),
        rand::random::<u32>()
    );
    trimmed_while_cut_off(&url, "redis", &prefix, "connection lost").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_a_gap_trimmed_while_cut_off_closes_with_1011() {
    let Some(url) = service("WALKIE_TEST_NATS") else {
        return;
    };
    let prefix = format!(
        "walkie-test-gap-{}-{:08x}:",
        std::process::id(),
        rand::random::<u32>()
    );
    let outcome = tokio::spawn({
        let (url, prefix) = (url.clone(), prefix.clone());
        async move { trimmed_while_cut_off(&url, "nats", &prefix, "connection lost").await }
    })
    .await;
    let broker = walkie_hub::NatsBroker::connect(&url, &prefix)
        .await
        .unwrap();
    broker.delete_all().await.unwrap();
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}
