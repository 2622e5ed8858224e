//! `/ws` with a configuration file: JWT connect and subscription tokens,
//! channel permissions from claims, user channels, token expiry and
//! refresh, anonymous access, and the Origin allow-list.

mod common;

#[path = "common/proto.rs"]
mod proto;

use std::time::Duration;

use common::{Server, http_exchange, upgrade_request, within};
use proto::{now, token};
use serde_json::json;

const SECRET: &str = "test-secret";

fn server() -> (Server, tempfile::TempDir) {
    let toml = format!(
        r#"
            [auth]
            hmac_secret = "{SECRET}"
            anonymous = false
            allowed_origins = ["https://good.example"]

            [namespaces.chat]
            presence = true
            allow_publish = true

            [namespaces.secret]
            private = true
            allow_publish = true

            [namespaces.notifications]
            history_size = 10
            "#
    );
    Server::with_config(&toml, &[])
}

fn user(sub: &str, exp_in: i64, channels: &[&str]) -> String {
    token(
        SECRET,
        json!({"sub": sub, "exp": now() as i64 + exp_in, "channels": channels, "info": {"name": sub}}),
    )
}

#[tokio::test]
async fn tokens_are_checked_at_connect() {
    let (server, _dir) = server();
    within(20, async {
        let mut c = proto::open(server.port).await;
        c.send_raw(r#"{"id":1,"connect":{}}"#).await;
        assert_eq!(c.closed().await, Some(4001), "anonymous is off");

        let mut c = proto::open(server.port).await;
        let forged = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &json!({"sub": "42"}),
            &jsonwebtoken::EncodingKey::from_secret(b"wrong secret"),
        )
        .unwrap();
        c.send_raw(&json!({"id": 1, "connect": {"token": forged}}).to_string())
            .await;
        assert_eq!(c.closed().await, Some(4001), "wrong signature");

        let mut c = proto::open(server.port).await;
        c.send_raw(&json!({"id": 1, "connect": {"token": user("42", -10, &[])}}).to_string())
            .await;
        assert_eq!(c.closed().await, Some(4002), "expired");

        let (_, result) = proto::connected(server.port, Some(&user("42", 3600, &[]))).await;
        assert_eq!(result["user"], "42");
        assert!(result["expires_in"].as_u64().unwrap() > 3500);
    })
    .await;
}

#[tokio::test]
async fn channel_permissions_come_from_claims_or_subscription_tokens() {
    let (server, _dir) = server();
    within(20, async {
        let (mut c, _) =
            proto::connected(server.port, Some(&user("42", 3600, &["secret:team-*"]))).await;
        c.ok("subscribe", json!({"channel": "chat:lobby"})).await;
        c.ok("subscribe", json!({"channel": "secret:team-red"}))
            .await;
        assert_eq!(
            c.error_code("subscribe", json!({"channel": "secret:board"}))
                .await,
            103
        );
        assert_eq!(
            c.error_code("publish", json!({"channel": "secret:board", "data": 1}))
                .await,
            103
        );
        assert_eq!(
            c.error_code("history", json!({"channel": "secret:board"}))
                .await,
            103
        );
        let grant = token(
            SECRET,
            json!({"sub": "42", "channel": "secret:board", "exp": now() + 3600}),
        );
        c.ok(
            "subscribe",
            json!({"channel": "secret:board", "token": grant}),
        )
        .await;
        // Subscription tokens for secret:vault that do not grant it.
        let refused = [
            // Another user's: 103.
            (
                SECRET,
                json!({"sub": "43", "channel": "secret:vault", "exp": now() + 3600}),
                103,
            ),
            // Valid for this user, but for another channel: 103 too.
            (
                SECRET,
                json!({"sub": "42", "channel": "secret:board", "exp": now() + 3600}),
                103,
            ),
            // Not a token of this server (wrong signature): 101, as for
            // connect and refresh.
            (
                "another secret",
                json!({"sub": "42", "channel": "secret:vault", "exp": now() + 3600}),
                101,
            ),
            // Expired: 109.
            (
                SECRET,
                json!({"sub": "42", "channel": "secret:vault", "exp": now() - 5}),
                109,
            ),
        ];
        for (secret, claims, code) in refused {
            let params = json!({"channel": "secret:vault", "token": token(secret, claims.clone())});
            assert_eq!(c.error_code("subscribe", params).await, code, "{claims}");
        }

        // User channels: only the users named after `#`.
        c.ok("subscribe", json!({"channel": "notifications:#42"}))
            .await;
        assert_eq!(
            c.error_code("subscribe", json!({"channel": "notifications:#43"}))
                .await,
            103
        );
        // Namespaces not configured do not exist; client publish is off where not allowed.
        assert_eq!(
            c.error_code("subscribe", json!({"channel": "plain"})).await,
            102
        );
        assert_eq!(
            c.error_code(
                "publish",
                json!({"channel": "notifications:#42", "data": 1})
            )
            .await,
            108
        );
        assert_eq!(
            c.error_code("presence", json!({"channel": "notifications:#42"}))
                .await,
            108
        );

        // Nothing leaks across channels: a publish reaches its channel only.
        let (mut d, _) = proto::connected(server.port, Some(&user("43", 3600, &[]))).await;
        d.ok("subscribe", json!({"channel": "chat:other"})).await;
        c.ok(
            "publish",
            json!({"channel": "chat:lobby", "data": "for the lobby"}),
        )
        .await;
        assert_eq!(c.publication().await["data"], "for the lobby");
        d.ok(
            "publish",
            json!({"channel": "chat:other", "data": "for other"}),
        )
        .await;
        assert_eq!(
            d.publication().await["data"],
            "for other",
            "not the lobby's message"
        );
    })
    .await;
}

#[tokio::test]
async fn an_expiring_token_must_be_refreshed() {
    let (server, _dir) = server();
    within(30, async {
        let (mut lazy, _) = proto::connected(server.port, Some(&user("42", 2, &[]))).await;
        let (mut careful, _) = proto::connected(server.port, Some(&user("43", 2, &[]))).await;
        let r = careful
            .ok("refresh", json!({"token": user("43", 3600, &[])}))
            .await;
        assert!(r["expires_in"].as_u64().unwrap() > 3500);
        assert_eq!(
            careful
                .error_code("refresh", json!({"token": user("44", 3600, &[])}))
                .await,
            101
        );
        assert_eq!(lazy.closed().await, Some(4002));
        tokio::time::sleep(Duration::from_secs(1)).await;
        careful.ok("ping", json!({})).await;
    })
    .await;
}

#[tokio::test]
async fn browsers_from_other_origins_are_refused() {
    let (server, _dir) = server();
    within(10, async {
        let proto_header = "Sec-WebSocket-Protocol: walkie.v1\r\n";
        let bad = format!("{proto_header}Origin: https://evil.example\r\n");
        let r = http_exchange(server.port, upgrade_request("/ws", &bad).as_bytes()).await;
        assert_eq!(r.status, 403, "{r:?}");
        assert!(r.body.contains("evil.example"));
        let good = format!("{proto_header}Origin: https://good.example\r\n");
        let r = http_exchange(server.port, upgrade_request("/ws", &good).as_bytes()).await;
        assert_eq!(r.status, 101, "{r:?}");
    })
    .await;
}

#[test]
fn a_bad_config_file_is_refused_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[namespaces.chat]\nhistory_ttl = \"forever\"\n").unwrap();
    let run = common::run_walkie(
        [
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--config",
            config.to_str().unwrap(),
        ],
        &[],
        None,
        Duration::from_secs(10),
    );
    assert_eq!(run.code(), Some(2), "{run:?}");
    assert!(run.stderr.contains("--config"), "{}", run.stderr);
    assert!(run.stderr.contains("history_ttl"), "{}", run.stderr);
}

/// RS256 and ES256 tokens, checked with a public key from the config file;
/// a token signed with another algorithm's key is refused.
#[tokio::test]
async fn public_key_tokens_rs256_and_es256() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for (setting, public, private, alg) in [
        (
            "rsa_public_key",
            "rsa-public.pem",
            "rsa-private.pem",
            jsonwebtoken::Algorithm::RS256,
        ),
        (
            "ecdsa_public_key",
            "ec-public.pem",
            "ec-private.pem",
            jsonwebtoken::Algorithm::ES256,
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("walkie.toml");
        let key_path = fixtures.join(public);
        std::fs::write(
            &config,
            format!(
                "[auth]\n{setting} = {:?}\n[default]\n",
                key_path.to_str().unwrap()
            ),
        )
        .unwrap();
        let server = Server::start(&["--config", config.to_str().unwrap()]);
        let pem = std::fs::read(fixtures.join(private)).unwrap();
        let key = match alg {
            jsonwebtoken::Algorithm::RS256 => {
                jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap()
            }
            _ => jsonwebtoken::EncodingKey::from_ec_pem(&pem).unwrap(),
        };
        let signed = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(alg),
            &json!({"sub": "7", "exp": now() + 600}),
            &key,
        )
        .unwrap();
        within(10, async {
            let (_, result) = proto::connected(server.port, Some(&signed)).await;
            assert_eq!(result["user"], "7", "{alg:?}");
            // An HS256 token is not accepted by a public-key server.
            let mut c = proto::open(server.port).await;
            let hs = token("anything", json!({"sub": "7"}));
            c.send_raw(&json!({"id": 1, "connect": {"token": hs}}).to_string())
                .await;
            assert_eq!(c.closed().await, Some(4001), "{alg:?}");
        })
        .await;
    }
}

#[test]
fn an_unreadable_public_key_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("walkie.toml");
    std::fs::write(
        &config,
        "[auth]\nrsa_public_key = \"/nonexistent/key.pem\"\n",
    )
    .unwrap();
    let run = common::run_walkie(
        [
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--config",
            config.to_str().unwrap(),
        ],
        &[],
        None,
        Duration::from_secs(10),
    );
    assert_eq!(run.code(), Some(2), "{run:?}");
    assert!(run.stderr.contains("rsa_public_key"), "{}", run.stderr);
}

/// A subscription token that expires ends that subscription (an
/// `unsubscribe` push) and nothing else: the connection's
/// own token has no expiry, so the session is left with no deadline, and
/// it must go on answering (it once spun on its fired timer instead).
#[tokio::test]
async fn an_expired_subscription_token_ends_only_its_subscription() {
    let (server, _dir) = server();
    within(20, async {
        let forever = token(SECRET, json!({"sub": "42"}));
        let (mut c, _) = proto::connected(server.port, Some(&forever)).await;
        let grant = token(
            SECRET,
            json!({"sub": "42", "channel": "secret:board", "exp": now() + 2}),
        );
        c.ok(
            "subscribe",
            json!({"channel": "secret:board", "token": grant}),
        )
        .await;
        let push = c.push().await;
        assert_eq!(push["unsubscribe"]["channel"], "secret:board", "{push}");
        assert_eq!(push["unsubscribe"]["reason"], "subscription token expired");
        for _ in 0..3 {
            c.ok("ping", json!({})).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
    .await;
}

/// A token that never really expires (`exp` past anything an `Instant`
/// holds) is served like any other: its session once panicked setting
/// its timer, and left its presence entry behind.
#[tokio::test]
async fn a_token_with_an_exp_far_in_the_future_is_served() {
    let (server, _dir) = server();
    within(20, async {
        let forever = token(SECRET, json!({"sub": "42", "exp": u64::MAX}));
        let (mut c, _) = proto::connected(server.port, Some(&forever)).await;
        c.ok("subscribe", json!({"channel": "chat:lobby"})).await;
        let (mut other, _) = proto::connected(server.port, Some(&user("43", 3600, &[]))).await;
        let r = other.ok("presence", json!({"channel": "chat:lobby"})).await;
        assert_eq!(r["clients"].as_object().unwrap().len(), 1, "{r}");
        c.ok("ping", json!({})).await;
    })
    .await;
}

/// A token is not served once its `exp` has passed, even in the moment
/// before the session's timer closes the connection.
#[tokio::test]
async fn an_expired_token_is_not_served_before_its_timer_fires() {
    let (server, _dir) = server();
    within(20, async {
        let exp = now() + 2;
        let short = token(SECRET, json!({"sub": "42", "exp": exp}));
        let (mut c, _) = proto::connected(server.port, Some(&short)).await;
        while now() < exp {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        c.send_raw(r#"{"id":9,"subscribe":{"channel":"chat:lobby"}}"#)
            .await;
        let answer = c.next().await;
        assert!(answer.is_none(), "served after exp: {answer:?}");
        assert_eq!(c.close_code(), Some(4002));
    })
    .await;
}

/// Before `connect`, a large message is refused unread (a large JSON
/// document parses into many times its size).
#[tokio::test]
async fn a_large_message_before_connect_is_refused() {
    let (server, _dir) = server();
    within(20, async {
        let mut c = proto::open(server.port).await;
        let big = format!(r#"{{"id":1,"connect":[{}0]}}"#, "0,".repeat(40_000));
        c.send_raw(&big).await;
        assert_eq!(c.closed().await, Some(1009));
        let small = format!(
            r#"{{"id":1,"connect":{{"name":"{}"}}}}"#,
            "x".repeat(60_000)
        );
        let mut c = proto::open(server.port).await;
        c.send_raw(&small).await;
        assert_eq!(c.closed().await, Some(4001), "a name is not a token");
    })
    .await;
}

/// A refresh keeps the connection's info when the new token has none, and
/// ends the subscriptions to private channels the new token no longer
/// grants (those granted by a subscription token stay).
#[tokio::test]
async fn a_refresh_with_fewer_channels_ends_their_subscriptions() {
    let (server, _dir) = server();
    within(20, async {
        let (mut c, _) =
            proto::connected(server.port, Some(&user("42", 3600, &["secret:*"]))).await;
        c.ok("subscribe", json!({"channel": "secret:red"})).await;
        let grant = token(
            SECRET,
            json!({"sub": "42", "channel": "secret:blue", "exp": now() + 3600}),
        );
        c.ok(
            "subscribe",
            json!({"channel": "secret:blue", "token": grant}),
        )
        .await;
        c.ok("subscribe", json!({"channel": "chat:lobby"})).await;
        let fewer = token(SECRET, json!({"sub": "42", "exp": now() + 3600}));
        c.ok("refresh", json!({ "token": fewer })).await;
        let push = c.push().await;
        assert_eq!(push["unsubscribe"]["channel"], "secret:red", "{push}");
        assert_eq!(push["unsubscribe"]["code"], 103);
        assert_eq!(
            c.error_code("history", json!({"channel": "secret:red"}))
                .await,
            103
        );
        c.ok("history", json!({"channel": "secret:blue"})).await;
        c.ok("unsubscribe", json!({"channel": "chat:lobby"})).await;
        c.ok("subscribe", json!({"channel": "chat:lobby"})).await;
        let r = c.ok("presence", json!({"channel": "chat:lobby"})).await;
        let mine = r["clients"].as_object().unwrap().values().next().cloned();
        assert_eq!(mine.unwrap()["info"]["name"], "42", "{r}");
    })
    .await;
}

/// A refresh whose token brings other `info` updates the connection's
/// presence entries: presence and the leave event say the same thing.
#[tokio::test]
async fn a_refresh_with_new_info_updates_presence() {
    let (server, _dir) = server();
    within(20, async {
        let named = |name: &str| {
            token(
                SECRET,
                json!({"sub": "42", "info": {"name": name}, "exp": now() + 3600}),
            )
        };
        let (mut c, _) = proto::connected(server.port, Some(&named("before"))).await;
        c.ok("subscribe", json!({"channel": "chat:lobby"})).await;
        c.ok("refresh", json!({ "token": named("after") })).await;
        let r = c.ok("presence", json!({"channel": "chat:lobby"})).await;
        let clients = r["clients"].as_object().unwrap();
        assert_eq!(clients.len(), 1, "{r}");
        let mine = clients.values().next().unwrap();
        assert_eq!(mine["info"]["name"], "after", "{r}");
    })
    .await;
}

/// The Origin allow-list covers every WebSocket route, not only `/ws`.
#[tokio::test]
async fn other_origins_are_refused_on_every_websocket_route() {
    let (server, _dir) = server();
    // An accepted upgrade's exchange reads until its 5 s timeout.
    within(40, async {
        let bad = "Origin: https://evil.example\r\n";
        for path in ["/", "/echo", "/rooms/lobby"] {
            let r = http_exchange(server.port, upgrade_request(path, bad).as_bytes()).await;
            assert_eq!(r.status, 403, "{path}: {r:?}");
            let good = "Origin: https://good.example\r\n";
            let r = http_exchange(server.port, upgrade_request(path, good).as_bytes()).await;
            assert_eq!(r.status, 101, "{path}: {r:?}");
        }
    })
    .await;
}

/// Rooms by URL take no token: a `rooms` namespace that wants one refuses
/// them, rather than letting anyone read and write its channels.
#[tokio::test]
async fn a_private_rooms_namespace_refuses_rooms_by_url() {
    let toml =
        format!("[auth]\nhmac_secret = \"{SECRET}\"\n\n[namespaces.rooms]\nprivate = true\n");
    let (server, _dir) = Server::with_config(&toml, &[]);
    within(10, async {
        let r = http_exchange(server.port, upgrade_request("/rooms/x", "").as_bytes()).await;
        assert_eq!(r.status, 403, "{r:?}");
        assert!(r.body.contains("/ws"), "{}", r.body);
    })
    .await;
}

/// With `auth.audience` and `auth.issuer` set, a token signed with the right
/// key but meant for another service (or from another issuer) is refused.
#[tokio::test]
async fn a_configured_audience_and_issuer_are_checked() {
    let toml = format!(
        "[auth]\nhmac_secret = \"{SECRET}\"\naudience = \"walkie\"\nissuer = \"https://id.example\"\n\n[namespaces.chat]\n"
    );
    let (server, _dir) = Server::with_config(&toml, &[]);
    within(20, async {
        let iss = "https://id.example";
        for claims in [
            json!({"sub": "42"}),
            json!({"sub": "42", "aud": "billing", "iss": iss}),
            json!({"sub": "42", "aud": "walkie", "iss": "https://other.example"}),
        ] {
            let mut c = proto::open(server.port).await;
            let t = token(SECRET, claims.clone());
            c.send_raw(&json!({"id": 1, "connect": {"token": t}}).to_string())
                .await;
            assert_eq!(c.closed().await, Some(4001), "{claims}");
        }
        let t = token(
            SECRET,
            json!({"sub": "42", "aud": ["api", "walkie"], "iss": iss}),
        );
        let (_, result) = proto::connected(server.port, Some(&t)).await;
        assert_eq!(result["user"], "42");
    })
    .await;
}
