//! The HTTP API answers every error as JSON with a protocol error code,
//! axum's own refusals included: another HTTP method (405), a path under
//! `/api` that names no method (404, code 104), a body over the limit (413,
//! code 112). The body limit follows the largest namespace's
//! `max_message_size`, so a namespace above axum's default 2 MB works.

mod common;

use std::time::Duration;

use common::{HttpResponse, Server, within};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = "api-errors-key";

/// The largest message of the built-in namespaces (64 KiB) plus the
/// envelope room (1 MiB): the body limit without a configuration file.
const DEFAULT_LIMIT: usize = 64 * 1024 + 1024 * 1024;

/// Sends `head` and then `body` from another task while reading the
/// answer: the server may answer (and close) before reading the whole body.
async fn exchange(port: u16, head: String, body: Vec<u8>) -> HttpResponse {
    let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        let _ = write.write_all(head.as_bytes()).await;
        let _ = write.write_all(&body).await;
        write
    });
    let mut bytes = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let mut chunk = [0u8; 8192];
        while let Ok(n @ 1..) = read.read(&mut chunk).await {
            bytes.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    writer.abort();
    HttpResponse::parse(&bytes).unwrap_or_else(|| {
        panic!(
            "no HTTP response; got {:?}",
            String::from_utf8_lossy(&bytes)
        )
    })
}

/// A request with `method` on `path` and the API key, its body sent with a
/// Content-Length.
async fn request(port: u16, method: &str, path: &str, body: &str) -> HttpResponse {
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: apikey {KEY}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    exchange(port, head, body.as_bytes().to_vec()).await
}

/// Asserts a JSON error with `status` and `code`; returns the body.
fn json_error(r: &HttpResponse, status: u16, code: u64) -> Value {
    assert_eq!(r.status, status, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/json"), "{r:?}");
    let body: Value =
        serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("not JSON ({e}): {r:?}"));
    assert_eq!(body["error"]["code"], code, "{r:?}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{r:?}"
    );
    body
}

#[tokio::test]
async fn other_http_methods_and_unknown_paths_get_json_errors() {
    let server = Server::start(&["--api-key", KEY]);
    within(30, async {
        for method in ["GET", "PUT", "DELETE"] {
            let r = request(server.port, method, "/api/publish", "").await;
            json_error(&r, 405, 107);
            assert_eq!(r.header("allow"), Some("POST"), "{r:?}");
        }
        for path in ["/api", "/api/", "/api/publish/extra", "/api/a/b/c"] {
            let r = request(server.port, "POST", path, "{}").await;
            json_error(&r, 404, 104);
        }
        let r = request(server.port, "GET", "/api/nope/x", "").await;
        json_error(&r, 404, 104);
        // An unknown method name is still 104 (as before).
        let r = request(server.port, "POST", "/api/nope", "{}").await;
        json_error(&r, 404, 104);
        // Outside /api the server's own answers are unchanged.
        let r = request(server.port, "GET", "/no-such-page", "").await;
        assert_eq!(r.status, 404, "{r:?}");
    })
    .await;
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_with_code_112() {
    let server = Server::start(&["--api-key", KEY]);
    within(60, async {
        // Announced by Content-Length: refused before it is read.
        let head = format!(
            "POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: apikey {KEY}\r\nContent-Length: {}\r\n\r\n",
            DEFAULT_LIMIT + 1
        );
        let r = exchange(server.port, head, Vec::new()).await;
        json_error(&r, 413, 112);

        // Chunked, so found out while reading.
        let data = "x".repeat(DEFAULT_LIMIT);
        let body = json!({"channel": "news", "data": data}).to_string();
        let head = format!(
            "POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: apikey {KEY}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
            body.len()
        );
        let mut chunked = body.into_bytes();
        chunked.extend_from_slice(b"\r\n0\r\n\r\n");
        let r = exchange(server.port, head, chunked).await;
        json_error(&r, 413, 112);

        // Over the namespace's size, within the body limit: the
        // namespace's 112, as before.
        let body = json!({"channel": "news", "data": "x".repeat(70 * 1024)}).to_string();
        let r = request(server.port, "POST", "/api/publish", &body).await;
        json_error(&r, 413, 112);
    })
    .await;
}

#[tokio::test]
async fn a_namespace_above_2_mb_takes_its_largest_messages() {
    let toml = format!(
        "[auth]\napi_key = \"{KEY}\"\n\n[namespaces.big]\nhistory_size = 1\nmax_message_size = {}\n",
        4 << 20
    );
    let (server, _dir) = Server::with_config(&toml, &[]);
    within(60, async {
        let body = json!({"channel": "big:a", "data": "x".repeat(3 << 20)}).to_string();
        let r = request(server.port, "POST", "/api/publish", &body).await;
        assert_eq!(r.status, 200, "{r:?}");
        let result: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(result["offset"], 1, "{result}");
    })
    .await;
}

/// A body that is JSON but not an object (an array of a method's fields,
/// which serde would otherwise read as the struct) is refused with 107,
/// and nothing is published.
#[tokio::test]
async fn a_body_that_is_not_a_json_object_is_400_with_code_107() {
    let server = Server::start(&["--api-key", KEY, "--in-memory"]);
    within(30, async {
        for body in [r#"["news", {"x": 1}]"#, "1", r#""news""#, "null", "  [] "] {
            let r = request(server.port, "POST", "/api/publish", body).await;
            let e = json_error(&r, 400, 107);
            let message = e["error"]["message"].as_str().unwrap();
            assert!(
                message.contains("must be a JSON object"),
                "{body}: {message}"
            );
        }
        let r = request(
            server.port,
            "POST",
            "/api/history",
            r#" {"channel": "news"}"#,
        )
        .await;
        assert_eq!(r.status, 200, "{r:?}");
        let history: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(history["offset"], 0, "nothing was published: {history}");
    })
    .await;
}
