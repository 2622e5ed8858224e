//! The HTTP API for backends and `walkie publish`: API-key auth, JSON
//! errors with the protocol's codes, publish reaching subscribers,
//! broadcast, history, presence, disconnecting a user.

mod common;

#[path = "common/proto.rs"]
mod proto;

use std::time::Duration;

use common::{HttpResponse, Server, http_exchange, within};
use serde_json::{Value, json};

const KEY: &str = "backend-key";

async fn api(server: &Server, method: &str, key: Option<&str>, body: &str) -> (u16, Value) {
    let auth = key
        .map(|k| format!("Authorization: apikey {k}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "POST /api/{method} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let r: HttpResponse = http_exchange(server.port, request.as_bytes()).await;
    let json = serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("not JSON ({e}): {r:?}"));
    (r.status, json)
}

#[tokio::test]
async fn publish_reaches_subscribers_and_errors_are_json_with_codes() {
    let server = Server::start(&["--api-key", KEY]);
    within(20, async {
        let (mut c, _) = proto::connected(server.port, None).await;
        c.ok("subscribe", json!({"channel": "news"})).await;

        let (status, r) = api(
            &server,
            "publish",
            Some(KEY),
            r#"{"channel":"news","data":{"title":"hi"}}"#,
        )
        .await;
        assert_eq!(status, 200, "{r}");
        assert_eq!(r["offset"], 1);
        let p = c.publication().await;
        assert_eq!(p["data"], json!({"title": "hi"}));
        assert!(p.get("info").is_none(), "no client info from the API");

        for (key, body, status, code) in [
            (None, r#"{"channel":"news","data":1}"#, 401, 101),
            (Some("wrong"), r#"{"channel":"news","data":1}"#, 401, 101),
            (Some(KEY), r#"{"channel":"news"}"#, 400, 107),
            (Some(KEY), "not json", 400, 107),
            (Some(KEY), r#"{"channel":"nope:x","data":1}"#, 404, 102),
        ] {
            let (s, r) = api(&server, "publish", key, body).await;
            assert_eq!(
                (s, r["error"]["code"].as_u64()),
                (status, Some(code)),
                "{body}: {r}"
            );
            assert!(
                r["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty())
            );
        }
        let (s, r) = api(&server, "teleport", Some(KEY), "{}").await;
        assert_eq!((s, r["error"]["code"].as_u64()), (404, Some(104)));
    })
    .await;
}

#[tokio::test]
async fn broadcast_history_presence_and_disconnect() {
    let server = Server::start(&["--api-key", KEY]);
    within(20, async {
        let (mut a, _) = proto::connected(server.port, None).await;
        a.ok("subscribe", json!({"channel": "scores"})).await;
        let (status, r) = api(
            &server,
            "broadcast",
            Some(KEY),
            r#"{"channels":["scores","bad:x","results"],"data":"2-1"}"#,
        )
        .await;
        assert_eq!(status, 200);
        // One result per channel, in the order given, a refusal in its
        // place (the others are published as one batch).
        let channels: Vec<&str> = r["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["channel"].as_str().unwrap())
            .collect();
        assert_eq!(channels, ["scores", "bad:x", "results"]);
        assert_eq!(r["results"][0]["offset"], 1);
        assert_eq!(r["results"][1]["error"]["code"], 102);
        assert_eq!(r["results"][2]["offset"], 1);
        assert_eq!(a.publication().await["data"], "2-1");

        let (_, h) = api(&server, "history", Some(KEY), r#"{"channel":"results"}"#).await;
        assert_eq!(h["publications"][0]["data"], "2-1");
        let (_, p) = api(
            &server,
            "presence_stats",
            Some(KEY),
            r#"{"channel":"scores"}"#,
        )
        .await;
        assert_eq!(p, json!({"clients": 1, "users": 1}));
        let (_, p) = api(&server, "presence", Some(KEY), r#"{"channel":"scores"}"#).await;
        assert_eq!(p["clients"].as_object().unwrap().len(), 1);

        // Anonymous users are all user "": disconnect them.
        let (_, d) = api(&server, "disconnect", Some(KEY), r#"{"user":""}"#).await;
        assert_eq!(d["error"]["code"], 107);
    })
    .await;
}

#[tokio::test]
async fn disconnect_closes_every_connection_of_a_user() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        "[auth]\nhmac_secret = \"s\"\napi_key = \"k\"\n[default]\n",
    )
    .unwrap();
    let server = Server::start(&["--config", config.to_str().unwrap()]);
    within(20, async {
        let t = proto::token("s", json!({"sub": "42"}));
        let (mut tab1, _) = proto::connected(server.port, Some(&t)).await;
        let (mut tab2, _) = proto::connected(server.port, Some(&t)).await;
        let (_, d) = api(&server, "disconnect", Some("k"), r#"{"user":"42"}"#).await;
        assert_eq!(d["disconnected"], 2);
        assert_eq!(tab1.closed().await, Some(4009));
        assert_eq!(tab2.closed().await, Some(4009));
    })
    .await;
}

#[tokio::test]
async fn the_api_is_off_without_a_key() {
    let server = Server::start(&[]);
    within(10, async {
        let (status, r) = api(&server, "publish", Some("x"), r#"{"channel":"a","data":1}"#).await;
        assert_eq!(status, 403);
        assert!(
            r["error"]["message"]
                .as_str()
                .unwrap()
                .contains("--api-key")
        );
    })
    .await;
}

#[tokio::test]
async fn walkie_publish_delivers_and_reports_errors() {
    let server = Server::start(&["--api-key", KEY]);
    let url = format!("http://127.0.0.1:{}", server.port);
    let (mut c, _) = within(10, proto::connected(server.port, None)).await;
    within(10, c.ok("subscribe", json!({"channel": "alerts"}))).await;
    let publish = |args: &[&str]| {
        let mut all = vec!["publish", "--url", url.as_str()];
        all.extend_from_slice(args);
        common::run_walkie(
            all,
            &[("WALKIE_API_KEY", KEY)],
            None,
            Duration::from_secs(15),
        )
    };
    let run = publish(&["alerts", r#"{"level":"high"}"#]);
    assert_eq!(run.code(), Some(0), "{run:?}");
    assert!(run.stdout.contains("\"offset\":1"), "{}", run.stdout);
    assert_eq!(
        within(5, c.publication()).await["data"],
        json!({"level": "high"})
    );
    let run = publish(&["alerts", "plain words", "--text"]);
    assert_eq!(run.code(), Some(0), "{run:?}");
    assert_eq!(within(5, c.publication()).await["data"], "plain words");

    let run = publish(&["alerts", "not json"]);
    assert_eq!(run.code(), Some(2));
    assert!(run.stderr.contains("--text"), "{}", run.stderr);
    let run = publish(&["nope:x", "1"]);
    assert_eq!(run.code(), Some(1));
    assert!(run.stderr.contains("namespace"), "{}", run.stderr);
    let run = common::run_walkie(
        ["publish", "--url", url.as_str(), "alerts", "1"],
        &[],
        None,
        Duration::from_secs(15),
    );
    assert_eq!(run.code(), Some(1), "no key");
    assert!(run.stderr.contains("401"), "{}", run.stderr);
}
