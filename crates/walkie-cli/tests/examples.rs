//! The scripts in examples/ work against the real binary.

mod common;

use std::process::Command;

use common::{Server, WALKIE, http_exchange, within};

#[tokio::test]
async fn the_scores_publisher_fills_the_scores_channel() {
    let server = Server::start(&["--api-key", "dev"]);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let status = Command::new(root.join("examples/scores.sh"))
        .arg("2")
        .env("WALKIE", WALKIE)
        .env("WALKIE_URL", format!("http://127.0.0.1:{}", server.port))
        .env("WALKIE_API_KEY", "dev")
        .status()
        .expect("cannot run examples/scores.sh");
    assert!(status.success(), "scores.sh: {status}");
    within(10, async {
        let body = r#"{"channel":"scores:live"}"#;
        let request = format!(
            "POST /api/history HTTP/1.1\r\nHost: x\r\nAuthorization: apikey dev\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let r = http_exchange(server.port, request.as_bytes()).await;
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        let pubs = v["publications"].as_array().unwrap();
        assert_eq!(pubs.len(), 2, "{v}");
        assert!(pubs[0]["data"]["match"].is_string());
        assert!(pubs[0]["key"].is_string(), "keyed by match");
    })
    .await;
}
