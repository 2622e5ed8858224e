//! The connection limit: `--max-connections`, and by default the
//! open-file limit less a reserve, past which an upgrade is answered 503
//! while plain HTTP is still served.

mod common;

use std::time::{Duration, Instant};

use common::{HttpResponse, RawWs, Server, http_exchange, upgrade_request, within};

async fn get(port: u16, path: &str) -> HttpResponse {
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    http_exchange(port, request.as_bytes()).await
}

/// An upgrade the server must refuse as full.
async fn assert_full(port: u16, path: &str) {
    let r = http_exchange(port, upgrade_request(path, "").as_bytes()).await;
    assert_eq!(r.status, 503, "{path}: {r:?}");
    assert!(r.body.contains("--max-connections"), "{r:?}");
    assert_eq!(r.header("retry-after"), Some("5"), "{r:?}");
}

/// `walkie_connections_refused_total`.
async fn refused(port: u16) -> u64 {
    let r = get(port, "/metrics").await;
    let line = r
        .body
        .lines()
        .find(|l| l.starts_with("walkie_connections_refused_total "))
        .unwrap_or_else(|| panic!("no refusal counter in {}", r.body));
    line.split(' ').nth(1).unwrap().parse().unwrap()
}

/// Upgrades to `path` until one is accepted (a closed connection is
/// counted out a moment after its client goes); returns it and how many
/// were refused before.
async fn connect_when_room(port: u16, path: &str) -> (RawWs, u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut refusals = 0;
    loop {
        match RawWs::try_connect(port, path, "").await {
            Ok(ws) => return (ws, refusals),
            Err(r) => assert_eq!(r.status, 503, "{r:?}"),
        }
        refusals += 1;
        assert!(Instant::now() < deadline, "still full 5 s after a close");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn past_max_connections_an_upgrade_is_answered_503_until_one_closes() {
    let server = Server::start(&["--in-memory", "--max-connections", "2"]);
    let port = server.port;
    within(30, async {
        let echo = RawWs::connect(port, "/echo", "").await;
        let _room = RawWs::connect(port, "/rooms/lobby", "").await;
        for path in ["/ws", "/", "/rooms/lobby"] {
            assert_full(port, path).await;
        }
        // A path with no endpoint is still a 404, and no refusal.
        let r = http_exchange(port, upgrade_request("/nowhere", "").as_bytes()).await;
        assert_eq!(r.status, 404, "{r:?}");
        assert_eq!(get(port, "/health").await.status, 200);
        assert_eq!(refused(port).await, 3);

        drop(echo);
        let (_again, refusals) = connect_when_room(port, "/rooms/lobby").await;
        assert_eq!(refused(port).await, 3 + refusals);
        assert_full(port, "/echo").await;

        // A client is told why.
        let url = server.ws_url("/echo");
        let run = tokio::task::spawn_blocking(move || {
            let stdin = Some(&b"hi\n"[..]);
            common::run_walkie(
                ["connect", url.as_str()],
                &[],
                stdin,
                Duration::from_secs(10),
            )
        });
        let run = run.await.unwrap();
        assert_eq!(run.code(), Some(1), "{run:?}");
        let told =
            "server refused the upgrade: HTTP 503: server full: 2 WebSocket connections open";
        assert!(run.stderr.contains(told), "{run:?}");
    })
    .await;
}

/// The limit `auto` made, from the server's log.
fn admitted(server: &Server, open_files: u64) -> u64 {
    let tail = format!(" WebSocket connections at most (open-file limit {open_files})");
    let line = server
        .wait_log(&["admitting ", &tail])
        .unwrap_or_else(|| panic!("no limit logged:\n{}", server.log_text()));
    let (head, _) = line.split_once(&tail).unwrap();
    head.rsplit(' ').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn by_default_connections_stop_short_of_the_open_file_limit() {
    // 200 files: those in use at start and 50 more kept for the rest.
    let args = ["--in-memory", "--workers", "2"];
    let server = Server::start_with_open_files(200, &args);
    let port = server.port;
    let max = admitted(&server, 200);
    assert!((100..150).contains(&max), "{max}");
    within(60, async {
        let mut open = Vec::new();
        for _ in 0..max {
            open.push(RawWs::connect(port, "/echo", "").await);
        }
        // The next is told, where without the limit it would wait in the
        // listen queue for a file descriptor.
        assert_full(port, "/echo").await;
        assert_eq!(get(port, "/health").await.status, 200);
        open.truncate(50);
        while open.len() < max as usize {
            open.push(connect_when_room(port, "/echo").await.0);
        }
        assert_full(port, "/echo").await;
    })
    .await;
}

#[tokio::test]
async fn the_soft_open_file_limit_is_raised_to_the_hard_one() {
    let mut all = vec!["--nofile=100:400", "--", common::WALKIE, "serve"];
    all.extend(["--bind", "127.0.0.1:0", "--in-memory", "--workers", "2"]);
    let server = Server::spawn_program("prlimit", all, &[]);
    assert!(admitted(&server, 400) > 200);
}

#[test]
fn a_bad_max_connections_is_refused_naming_the_flag() {
    for bad in ["0", "1.5", "lots"] {
        let args = ["serve", "--max-connections", bad];
        let out = common::run_walkie(args, &[], None, Duration::from_secs(10));
        assert_eq!(out.code(), Some(2), "{bad}: {out:?}");
        assert!(out.stderr.contains("--max-connections"), "{bad}: {out:?}");
    }
}
