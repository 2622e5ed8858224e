//! Token claims at `/ws`, against the real binary: a subscription token
//! opens no connection (4001) and refreshes none (101); `aud` is accepted;
//! `nbf` is honoured; subscription tokens need `exp`; an empty `sub` is the
//! anonymous user where anonymous connections are allowed.

mod common;

#[path = "common/proto.rs"]
mod proto;

use common::{Server, within};
use proto::{now, token};
use serde_json::{Value, json};

const SECRET: &str = "serve-tokens-secret";

fn server(anonymous: bool) -> (Server, tempfile::TempDir) {
    let toml = format!(
        "[auth]\nhmac_secret = \"{SECRET}\"\nanonymous = {anonymous}\n\n[namespaces.chat]\nanonymous = true\n\n[namespaces.secret]\nprivate = true\n"
    );
    Server::with_config(&toml, &[])
}

/// The close code of a `connect` with a token for `claims`.
async fn connect_closes(server: &Server, claims: Value) -> Option<u16> {
    let mut c = proto::open(server.port).await;
    let command = json!({"id": 1, "connect": {"token": token(SECRET, claims)}});
    c.send_raw(&command.to_string()).await;
    c.closed().await
}

#[tokio::test]
async fn a_subscription_token_is_no_connection_token() {
    let (server, _dir) = server(false);
    within(20, async {
        let grant = json!({"sub": "42", "channel": "secret:a", "exp": now() + 3600});
        assert_eq!(connect_closes(&server, grant.clone()).await, Some(4001));
        let own = token(SECRET, json!({"sub": "42", "exp": now() + 3600}));
        let (mut c, _) = proto::connected(server.port, Some(&own)).await;
        let params = json!({"token": token(SECRET, grant)});
        assert_eq!(c.error_code("refresh", params).await, 101);
    })
    .await;
}

#[tokio::test]
async fn aud_is_accepted_and_nbf_honoured() {
    let (server, _dir) = server(false);
    within(20, async {
        let aud = token(SECRET, json!({"sub": "42", "aud": "https://idp.example"}));
        let (_, result) = proto::connected(server.port, Some(&aud)).await;
        assert_eq!(result["user"], "42");
        let early = json!({"sub": "42", "nbf": now() + 3600});
        assert_eq!(connect_closes(&server, early).await, Some(4001));
    })
    .await;
}

#[tokio::test]
async fn a_subscription_token_needs_exp() {
    let (server, _dir) = server(false);
    within(20, async {
        let own = token(SECRET, json!({"sub": "42"}));
        let (mut c, _) = proto::connected(server.port, Some(&own)).await;
        let forever = token(SECRET, json!({"sub": "42", "channel": "secret:a"}));
        let params = json!({"channel": "secret:a", "token": forever});
        assert_eq!(c.error_code("subscribe", params).await, 101);
        let expiring = token(
            SECRET,
            json!({"sub": "42", "channel": "secret:a", "exp": now() + 3600}),
        );
        c.ok(
            "subscribe",
            json!({"channel": "secret:a", "token": expiring}),
        )
        .await;
    })
    .await;
}

#[tokio::test]
async fn an_empty_sub_is_anonymous_only_where_anonymous_is_allowed() {
    let empty = json!({"sub": "", "exp": now() + 3600});
    let (open, _open_dir) = server(true);
    let (closed, _closed_dir) = server(false);
    within(20, async {
        let (mut c, result) =
            proto::connected(open.port, Some(&token(SECRET, empty.clone()))).await;
        assert_eq!(result["user"], "");
        c.ok("subscribe", json!({"channel": "chat:lobby"})).await;
        assert_eq!(connect_closes(&closed, empty).await, Some(4001));
    })
    .await;
}
