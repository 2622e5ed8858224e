//! A slow reader on a state-like channel (`overflow = "latest_per_key"`)
//! is not disconnected: its queue keeps the latest message per key, and
//! when it reads again it ends with the latest state of every key.

mod common;

#[path = "common/proto.rs"]
mod proto;

use std::time::Duration;

use common::{Server, http_exchange, within};
use serde_json::json;

#[tokio::test]
async fn a_slow_reader_skips_to_the_latest_state_per_key() {
    let toml = "[auth]\nanonymous = true\napi_key = \"k\"\n[namespaces.scores]\nanonymous = true\noverflow = \"latest_per_key\"\nhistory_size = 0\nmax_message_size = \"64K\"\n";
    let (server, _dir) = Server::with_config(toml, &["--client-queue", "8"]);
    within(60, async {
        let (mut slow, _) = proto::connected(server.port, None).await;
        slow.ok("subscribe", json!({"channel": "scores:final"})).await;
        // Large updates, so that the socket buffers fill and the queue has
        // to absorb the rest.
        let pad = "x".repeat(32 * 1024);
        let updates = 700u64;
        for i in 1..=updates {
            let key = if i % 2 == 0 { "home" } else { "away" };
            let body = json!({"channel": "scores:final", "data": {"n": i, "pad": pad}, "key": key}).to_string();
            let request = format!(
                "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: apikey k\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let r = http_exchange(server.port, request.as_bytes()).await;
            assert_eq!(r.status, 200, "{r:?}");
        }
        // Now read everything that is there.
        let mut last = std::collections::HashMap::new();
        let mut received = 0u64;
        loop {
            let m = tokio::time::timeout(Duration::from_secs(2), slow.ws.recv()).await;
            let Ok(Some(Ok(m))) = m else { break };
            let v: serde_json::Value = serde_json::from_str(m.as_text().unwrap()).unwrap();
            let p = &v["pub"];
            last.insert(p["key"].as_str().unwrap().to_owned(), p["data"]["n"].as_u64().unwrap());
            received += 1;
        }
        assert!(slow.close_code().is_none(), "disconnected: {:?}", slow.close_code());
        assert!(received < updates, "nothing was skipped ({received}): the test did not overflow the queue");
        assert_eq!(last.get("home"), Some(&updates), "latest home");
        assert_eq!(last.get("away"), Some(&(updates - 1)), "latest away");
        slow.ok("ping", json!({})).await;
    })
    .await;
}
