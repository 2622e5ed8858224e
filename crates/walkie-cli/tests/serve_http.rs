//! `walkie serve` over plain HTTP on a raw TCP stream: the chat page,
//! `/health`, 404s, and the HTTP errors of bad upgrades and bad heads. The
//! same server goes on serving WebSocket clients afterwards.

mod common;

use std::time::{Duration, Instant};

use common::{HttpResponse, KEY, Server, http_exchange, read_all, within};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

async fn get(port: u16, path: &str) -> HttpResponse {
    http_exchange(
        port,
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes(),
    )
    .await
}

async fn chat_page(port: u16) {
    let r = get(port, "/").await;
    assert_eq!(r.status, 200, "GET /: {r:?}");
    let ct = r.header("content-type").unwrap_or_default();
    assert!(ct.starts_with("text/html"), "GET /: content-type {ct:?}");
    assert!(
        r.body.contains("<title>Walkie chat</title>"),
        "GET /: no title in {:?}",
        &r.body[..r.body.len().min(300)]
    );
}

async fn health(port: u16) {
    let r = get(port, "/health").await;
    assert_eq!(r.status, 200, "GET /health: {r:?}");
    let ct = r.header("content-type").unwrap_or_default();
    assert!(ct.starts_with("application/json"), "GET /health: {ct:?}");
    assert_eq!(r.body.trim(), r#"{"status":"ok"}"#, "GET /health");
}

async fn not_found(port: u16) {
    let r = get(port, "/nope").await;
    assert_eq!(r.status, 404, "GET /nope: {r:?}");
}

async fn upgrade_to_unknown_path(port: u16) {
    let r = http_exchange(port, common::upgrade_request("/nope", "").as_bytes()).await;
    assert_eq!(r.status, 404, "upgrade to /nope: {r:?}");
    assert!(
        r.body.contains("/nope"),
        "404 body does not name the path: {:?}",
        r.body
    );
}

async fn wrong_version(port: u16) {
    let request = format!(
        "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 8\r\n\r\n"
    );
    let r = http_exchange(port, request.as_bytes()).await;
    assert_eq!(r.status, 426, "version 8: {r:?}");
    assert_eq!(
        r.header("sec-websocket-version"),
        Some("13"),
        "version 8: {r:?}"
    );
}

async fn missing_key(port: u16) {
    let request = "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\
                   Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n";
    let r = http_exchange(port, request.as_bytes()).await;
    assert_eq!(r.status, 400, "missing key: {r:?}");
    assert!(
        r.body.contains("Sec-WebSocket-Key"),
        "400 body does not say what was wrong: {:?}",
        r.body
    );
}

async fn tls_client_hello_on_plain_port(port: u16) {
    // The start of a TLS 1.2 ClientHello record.
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03,
    ];
    hello.extend((0u8..32).map(|i| i.wrapping_mul(37)));
    hello.extend_from_slice(&[0x00, 0x00, 0x20, 0xc0, 0x2b, 0xc0, 0x2f, 0x00, 0x9e]);
    let r = http_exchange(port, &hello).await;
    assert_eq!(r.status, 400, "TLS ClientHello: {r:?}");
}

async fn head_too_large(port: u16) {
    let mut request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: ".to_vec();
    request.resize(request.len() + 20 * 1024, b'a');
    request.extend_from_slice(b"\r\n\r\n");
    let r = http_exchange(port, &request).await;
    assert_eq!(r.status, 431, "20 KiB head: {r:?}");
}

async fn slow_head(port: u16) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    let start = Instant::now();
    let bytes = read_all(&mut stream, Duration::from_secs(5)).await;
    let elapsed = start.elapsed();
    let r = HttpResponse::parse(&bytes)
        .unwrap_or_else(|| panic!("half a head: no response in {elapsed:?}: {bytes:?}"));
    assert_eq!(r.status, 408, "half a head: {r:?}");
    assert!(
        elapsed >= Duration::from_millis(800) && elapsed < Duration::from_secs(4),
        "408 after {elapsed:?}, expected about 1 s (--handshake-timeout 1s)"
    );
}

async fn malformed_line_of_an_unfinished_head(port: u16) {
    // The head never ends; its second line, sent after the first was
    // read (the first bytes of a head are checked at once anyway), is not
    // a header.
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    stream.write_all(b"Host 127.0.0.1\r\n").await.unwrap();
    let bytes = read_all(&mut stream, Duration::from_secs(5)).await;
    let r = HttpResponse::parse(&bytes)
        .unwrap_or_else(|| panic!("malformed line: no response: {bytes:?}"));
    // Not 408: the line is refused when it ends, not when the head's
    // timeout runs out.
    assert_eq!(r.status, 400, "malformed line: {r:?}");
}

#[tokio::test]
async fn http_routes_and_errors_then_still_serving() {
    let mut server = Server::start(&["--handshake-timeout", "1s"]);
    let port = server.port;
    within(30, async {
        chat_page(port).await;
        health(port).await;
        not_found(port).await;
        upgrade_to_unknown_path(port).await;
        wrong_version(port).await;
        missing_key(port).await;
        tls_client_hello_on_plain_port(port).await;
        head_too_large(port).await;
        slow_head(port).await;
        malformed_line_of_an_unfinished_head(port).await;
        // And once more after the errors.
        health(port).await;
        server.assert_serves("the HTTP errors").await;
    })
    .await;
}

#[tokio::test]
async fn chat_page_and_health_in_parallel() {
    let server = Server::start(&[]);
    let port = server.port;
    within(20, async {
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                tokio::spawn(async move {
                    if i % 2 == 0 {
                        chat_page(port).await
                    } else {
                        health(port).await
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    })
    .await;
}
