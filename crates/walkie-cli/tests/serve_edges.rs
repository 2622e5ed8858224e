//! Edges of `walkie serve`: engine passwords kept out of the log and of
//! errors, a second server on an address in use, shutdown during a TLS
//! handshake, one deadline for the TLS handshake and the request head, an
//! HTTP request in flight at shutdown, `/demo/token`'s `ttl`, and the
//! warning of development mode on an address others can reach.

mod common;

use std::time::{Duration, Instant};

use common::{HttpResponse, Pki, Server, http_exchange, read_all, run_walkie, within};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const SECRET: &str = "s3cret-Pa55";

/// `url` (`scheme://host...`) with `user_info` before its host.
fn with_user_info(url: &str, user_info: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => format!("{scheme}://{user_info}@{rest}"),
        None => panic!("not a URL: {url}"),
    }
}

#[test]
fn engine_passwords_stay_out_of_start_up_errors() {
    // Each fails at start-up (a database that is not a number; nothing
    // listens on port 1), and the engines' errors repeat the URL they were
    // given.
    for url in [
        format!("redis://:{SECRET}@127.0.0.1:1/not-a-db"),
        format!("nats://walkie:{SECRET}@127.0.0.1:1"),
        format!("nats://a:{SECRET}@127.0.0.1:1,nats://b:{SECRET}@127.0.0.1:1"),
        format!("rediss://:{SECRET}@127.0.0.1:1"),
    ] {
        let run = run_walkie(
            ["serve", "--bind", "127.0.0.1:0", "--engine", url.as_str()],
            &[("WALKIE_LOG", "info")],
            None,
            Duration::from_secs(30),
        );
        assert_eq!(run.code(), Some(2), "{url}: {run:?}");
        let output = format!("{}{}", run.stdout, run.stderr);
        assert!(
            !output.contains(SECRET),
            "{url}: the password shows:\n{output}"
        );
        assert!(output.contains("--engine"), "{url}: {output}");
        assert!(output.contains("***@127.0.0.1:1"), "{url}: {output}");
    }
}

/// Starts a server on `url` with a password in it, and checks that the log
/// (which the dashboard's log channel republishes) shows the engine
/// without it.
fn log_hides_the_password(url: &str, prefix: &str, logged: &str) {
    let server = Server::start(&["--engine", url, "--engine-prefix", prefix]);
    let line = server
        .wait_log(&["history kept"])
        .unwrap_or_else(|| panic!("no \"history kept\" line; log:\n{}", server.log_text()));
    assert!(line.contains(logged), "{line}");
    let log = server.log_text();
    assert!(
        !log.contains(SECRET),
        "the password shows in the log:\n{log}"
    );
}

#[test]
fn a_redis_password_stays_out_of_the_log() {
    // Redis without requirepass (as in CI) accepts a connection that gives
    // a password.
    let Ok(url) = std::env::var("WALKIE_TEST_REDIS") else {
        eprintln!("SKIPPED: set WALKIE_TEST_REDIS=redis://127.0.0.1:6379 to run it");
        return;
    };
    let url = with_user_info(&url, &format!(":{SECRET}"));
    let prefix = format!("walkie-test-{}-redact:", std::process::id());
    log_hides_the_password(&url, &prefix, "history kept in Redis at redis://***@");
}

#[tokio::test]
async fn a_nats_password_stays_out_of_the_log() {
    // A NATS server without authorization ignores the user and password.
    let Ok(url) = std::env::var("WALKIE_TEST_NATS") else {
        eprintln!("SKIPPED: set WALKIE_TEST_NATS=nats://127.0.0.1:4222 to run it");
        return;
    };
    let prefix = format!(
        "walkie-test-{}-{:08x}-redact:",
        std::process::id(),
        rand::random::<u32>()
    );
    let secret_url = with_user_info(&url, &format!("walkie:{SECRET}"));
    let (u, p) = (secret_url.clone(), prefix.clone());
    let outcome = tokio::task::spawn_blocking(move || {
        log_hides_the_password(&u, &p, "history kept in NATS JetStream at nats://***@");
    })
    .await;
    // The presence bucket made under the prefix goes, pass or fail.
    let broker = walkie_hub::NatsBroker::connect(&url, &prefix)
        .await
        .unwrap();
    broker.delete_all().await.unwrap();
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

#[tokio::test]
async fn a_second_server_on_a_port_in_use_fails_naming_bind() {
    let mut first = Server::start(&["--workers", "2", "--in-memory"]);
    let addr = format!("127.0.0.1:{}", first.port);
    let second = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || {
            run_walkie(
                [
                    "serve",
                    "--bind",
                    addr.as_str(),
                    "--workers",
                    "2",
                    "--in-memory",
                ],
                &[("WALKIE_LOG", "info")],
                None,
                Duration::from_secs(10),
            )
        }
    })
    .await
    .unwrap();
    assert_eq!(second.code(), Some(1), "{second:?}");
    assert!(second.stderr.contains("--bind"), "{}", second.stderr);
    assert!(second.stderr.contains(&addr), "{}", second.stderr);
    // The first one's workers still share the port.
    within(20, async {
        let mut clients = Vec::new();
        for i in 0..8 {
            let mut ws = walkie::connect(&first.ws_url("/echo")).await.unwrap();
            ws.send(format!("client {i}")).await.unwrap();
            clients.push(ws);
        }
        for (i, ws) in clients.iter_mut().enumerate() {
            let reply = ws.recv().await.unwrap().unwrap();
            assert_eq!(reply.as_text(), Some(format!("client {i}").as_str()));
        }
        first.assert_serves("a second server tried the port").await;
    })
    .await;
}

#[tokio::test]
async fn shutdown_does_not_wait_for_a_stalled_tls_handshake() {
    let pki = Pki::generate();
    let mut server = pki.server_with(
        &["--handshake-timeout", "30s", "--shutdown-timeout", "30s"],
        &[],
    );
    // A client that connects and never starts its TLS handshake.
    let _stalled = TcpStream::connect(("127.0.0.1", server.port))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.signal("TERM");
    let status = server
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| {
            panic!(
                "still running 10 s after SIGTERM: the TLS handshake held it; log:\n{}",
                server.log_text()
            )
        });
    assert!(status.success(), "exit status {status}");
    let log = server.log_text();
    assert!(!log.contains("still open after"), "{log}");
}

#[tokio::test]
async fn the_tls_handshake_and_the_request_head_share_one_deadline() {
    let pki = Pki::generate();
    let server = pki.server_with(&["--handshake-timeout", "4s"], &[]);
    let start = Instant::now();
    let tcp = TcpStream::connect(("127.0.0.1", server.port))
        .await
        .unwrap();
    // 3 s of the 4 go by before the TLS handshake; no request follows it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let config = walkie::tls::client_config_with_ca(&pki.ca()).unwrap();
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = within(
        5,
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .expect("TLS handshake");
    let answer = within(10, async {
        let mut buf = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut tls, &mut buf).await;
        buf
    })
    .await;
    let elapsed = start.elapsed();
    let response = HttpResponse::parse(&answer);
    assert_eq!(response.map(|r| r.status), Some(408), "{answer:?}");
    // The head's wait ends 4 s after connecting, not 4 s after the TLS
    // handshake (7 s).
    assert!(
        elapsed < Duration::from_millis(5500),
        "408 after {elapsed:?}: the request head got a deadline of its own"
    );
}

#[tokio::test]
async fn an_http_request_in_flight_at_shutdown_is_answered() {
    let mut server = Server::start(&["--api-key", "k", "--in-memory"]);
    let body = r#"{"channel":"news","data":"late"}"#;
    let (early, late) = body.split_at(10);
    let head = format!(
        "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: apikey k\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{early}",
        body.len()
    );
    let mut stream = TcpStream::connect(("127.0.0.1", server.port))
        .await
        .unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    // The server is now reading the body; shutdown begins meanwhile.
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.signal("TERM");
    assert!(
        server.wait_log(&["SIGTERM received"]).is_some(),
        "{}",
        server.log_text()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stream.write_all(late.as_bytes()).await.unwrap();
    let bytes = read_all(&mut stream, Duration::from_secs(5)).await;
    let response = HttpResponse::parse(&bytes)
        .unwrap_or_else(|| panic!("no answer: {:?}", String::from_utf8_lossy(&bytes)));
    assert_eq!(response.status, 200, "{response:?}");
    assert!(response.body.contains("\"offset\":1"), "{response:?}");
    let status = server
        .wait_exit(Duration::from_secs(10))
        .expect("still running 10 s after SIGTERM");
    assert!(status.success(), "exit status {status}");
}

#[tokio::test]
async fn demo_token_reports_a_bad_ttl_as_such() {
    let server = Server::start(&["--in-memory"]);
    let get = |query: &str| {
        let request = format!("GET /demo/token?{query} HTTP/1.1\r\nHost: x\r\n\r\n");
        async move { http_exchange(server.port, request.as_bytes()).await }
    };
    within(20, async {
        for bad in ["abc", "1", "86401", "-5", "1.5"] {
            let r = get(&format!("user=ann&ttl={bad}")).await;
            assert_eq!(r.status, 400, "ttl={bad}: {r:?}");
            assert!(
                r.body.contains("ttl") && r.body.contains("2 to 86400"),
                "ttl={bad}: {}",
                r.body
            );
        }
        for good in ["2", "60", "86400"] {
            let r = get(&format!("user=ann&ttl={good}")).await;
            assert_eq!(r.status, 200, "ttl={good}: {r:?}");
            assert!(r.body.contains("\"token\""), "{}", r.body);
        }
        let r = get("ttl=60").await;
        assert_eq!(r.status, 400, "{r:?}");
        assert!(r.body.contains("?user="), "{}", r.body);
    })
    .await;
}

/// Development mode (no `--config`) on an address others can reach says
/// so at start; on loopback, or with a configuration file, it does not.
#[test]
fn development_mode_off_loopback_warns_at_start() {
    let warning = "development mode on";
    let server = Server::spawn(["serve", "--bind", "0.0.0.0:0", "--in-memory"], &[]);
    assert!(
        server.wait_log(&[warning]).is_some(),
        "{}",
        server.log_text()
    );

    let server = Server::start(&["--in-memory"]);
    let (_dir, config) = common::config_file("[default]\n");
    let configured = Server::spawn(
        [
            "serve",
            "--bind",
            "0.0.0.0:0",
            "--in-memory",
            "--config",
            &config,
        ],
        &[],
    );
    // Both have logged their address, after which the warning would come.
    std::thread::sleep(Duration::from_millis(300));
    for s in [&server, &configured] {
        assert!(!s.log_text().contains(warning), "{}", s.log_text());
    }
}
