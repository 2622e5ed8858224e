//! The library's client (`walkie_hub::client`) and tokens, against the real
//! binary: an expired token ends the client instead of reconnecting with
//! it forever, `set_token` refreshes the connection (or is used to
//! reconnect), and subscriptions the server ended or refused are forgotten.

mod common;

#[path = "common/proto.rs"]
mod proto;

use std::time::Duration;

use common::{Server, within};
use proto::{now, token};
use serde_json::json;
use tokio::sync::mpsc::Receiver;
use walkie_hub::client::{Client, ClientError, ClientEvent, Options, SubscribeOptions};

const SECRET: &str = "client-token-secret";

fn server() -> (Server, tempfile::TempDir) {
    let toml = format!(
        "[auth]\nhmac_secret = \"{SECRET}\"\n\n[namespaces.chat]\nallow_publish = true\n\n[namespaces.secret]\nprivate = true\n"
    );
    Server::with_config(&toml, &[])
}

/// A connection token for `sub`, expiring in `exp_in` seconds.
fn user(sub: &str, exp_in: u64) -> String {
    token(SECRET, json!({"sub": sub, "exp": now() + exp_in}))
}

/// A subscription token for user 42 and `channel`.
fn grant(channel: &str, exp_in: u64) -> String {
    token(
        SECRET,
        json!({"sub": "42", "channel": channel, "exp": now() + exp_in}),
    )
}

fn start(server: &Server, token: String) -> (Client, Receiver<ClientEvent>) {
    let mut options = Options::new(server.ws_url("/ws"));
    options.token = Some(token);
    options.min_delay = Duration::from_millis(50);
    Client::start(options)
}

/// The first event that `want` picks, within 10 s; panics on a
/// `Disconnected` that `want` does not pick.
async fn wait_for<T>(
    events: &mut Receiver<ClientEvent>,
    want: impl Fn(&ClientEvent) -> Option<T>,
) -> T {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("no such event within 10 s")
            .expect("the client's events ended");
        if let Some(t) = want(&event) {
            return t;
        }
        assert!(
            !matches!(event, ClientEvent::Disconnected { .. }),
            "{event:?}"
        );
    }
}

async fn connected(events: &mut Receiver<ClientEvent>) -> String {
    wait_for(events, |e| match e {
        ClientEvent::Connected { user, .. } => Some(user.clone()),
        _ => None,
    })
    .await
}

/// The next disconnection's close code, and whether the client goes on.
async fn disconnected(events: &mut Receiver<ClientEvent>) -> (u16, bool) {
    wait_for(events, |e| match e {
        ClientEvent::Disconnected {
            code, reconnecting, ..
        } => Some((*code, *reconnecting)),
        _ => None,
    })
    .await
}

async fn subscribed(events: &mut Receiver<ClientEvent>, channel: &str) {
    wait_for(events, |e| match e {
        ClientEvent::Subscribed { channel: c, .. } if c == channel => Some(()),
        _ => None,
    })
    .await;
}

#[tokio::test]
async fn an_expired_token_ends_the_client() {
    let (server, _dir) = server();
    within(30, async {
        let (client, mut events) = start(&server, user("42", 2));
        assert_eq!(connected(&mut events).await, "42");
        let (code, reconnecting) = disconnected(&mut events).await;
        assert_eq!((code, reconnecting), (4002, false));
        let e = client.publish("chat:a", json!(1)).await.unwrap_err();
        assert!(
            matches!(e, ClientError::TokenRefused { code: 4002, .. }),
            "{e:?}"
        );
        assert!(client.set_token(user("42", 3600)).await.is_err());
    })
    .await;
}

#[tokio::test]
async fn set_token_refreshes_the_connection_before_it_expires() {
    let (server, _dir) = server();
    within(30, async {
        let (client, mut events) = start(&server, user("42", 2));
        connected(&mut events).await;
        // Another user's token is refused, and changes nothing yet.
        let refused = client.set_token(user("43", 3600)).await.unwrap_err();
        assert!(
            matches!(refused, ClientError::Server { code: 101, .. }),
            "{refused:?}"
        );
        client.set_token(user("42", 3600)).await.unwrap();
        // Past the first token's expiry: still the same connection.
        tokio::time::sleep(Duration::from_secs(4)).await;
        let ack = client.publish("chat:a", json!("still here")).await.unwrap();
        assert_eq!(ack["duplicate"], false);
        while let Ok(e) = events.try_recv() {
            assert!(!matches!(e, ClientEvent::Disconnected { .. }), "{e:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn a_token_refused_in_refresh_is_not_used_to_reconnect() {
    let (server, _dir) = server();
    within(30, async {
        let (client, mut events) = start(&server, user("42", 2));
        connected(&mut events).await;
        // The server refuses it for this connection (another user): the
        // client forgets it, and the 4002 that follows ends it.
        assert!(client.set_token(user("43", 3600)).await.is_err());
        let (code, reconnecting) = disconnected(&mut events).await;
        assert_eq!((code, reconnecting), (4002, false));
    })
    .await;
}

#[tokio::test]
async fn reconnects_use_the_token_the_server_accepted_or_a_newer_one() {
    let (mut server, dir) = server();
    let port = server.port;
    let config = dir.path().join("walkie.toml");
    let restart = |server: &mut Server| {
        server.signal("TERM");
        assert!(server.wait_exit(Duration::from_secs(15)).is_some());
    };
    let respawn = || {
        let bind = format!("127.0.0.1:{port}");
        Server::spawn(
            [
                "serve",
                "--bind",
                &bind,
                "--config",
                config.to_str().unwrap(),
            ],
            &[],
        )
    };
    within(60, async {
        let (client, mut events) = start(&server, user("42", 3600));
        connected(&mut events).await;
        // A token with a bad signature: refused, and forgotten.
        let bad = token("another-secret", json!({"sub": "42", "exp": now() + 3600}));
        let refused = client.set_token(bad).await.unwrap_err();
        assert!(
            matches!(refused, ClientError::Server { code: 101, .. }),
            "{refused:?}"
        );
        restart(&mut server);
        let (_, reconnecting) = disconnected(&mut events).await;
        assert!(reconnecting);
        server = respawn();
        assert_eq!(connected(&mut events).await, "42");

        // One given while disconnected is kept for the next connect.
        restart(&mut server);
        let (_, reconnecting) = disconnected(&mut events).await;
        assert!(reconnecting);
        assert_eq!(client.set_token(user("43", 3600)).await, Ok(None));
        server = respawn();
        assert_eq!(connected(&mut events).await, "43");
        client.stop();
    })
    .await;
    drop(server);
}

#[tokio::test]
async fn the_servers_unsubscribe_push_ends_the_subscription() {
    let (server, _dir) = server();
    within(30, async {
        let (client, mut events) = start(&server, user("42", 3600));
        connected(&mut events).await;
        let options = |t| SubscribeOptions {
            token: Some(t),
            ..SubscribeOptions::default()
        };
        client
            .subscribe("secret:board", options(grant("secret:board", 2)))
            .await
            .unwrap();
        subscribed(&mut events, "secret:board").await;
        let (channel, code) = wait_for(&mut events, |e| match e {
            ClientEvent::Unsubscribed { channel, code, .. } => Some((channel.clone(), *code)),
            _ => None,
        })
        .await;
        assert_eq!((channel.as_str(), code), ("secret:board", 109));
        // Forgotten: subscribing again sends a subscribe.
        client
            .subscribe("secret:board", options(grant("secret:board", 3600)))
            .await
            .unwrap();
        subscribed(&mut events, "secret:board").await;
    })
    .await;
}

#[tokio::test]
async fn a_refused_subscription_is_forgotten() {
    let (server, _dir) = server();
    within(30, async {
        let (client, mut events) = start(&server, user("42", 3600));
        connected(&mut events).await;
        client
            .subscribe("secret:vault", SubscribeOptions::default())
            .await
            .unwrap();
        let (error, retrying) = wait_for(&mut events, |e| match e {
            ClientEvent::SubscribeFailed {
                channel,
                error,
                retrying,
                ..
            } if channel == "secret:vault" => Some((error.clone(), *retrying)),
            _ => None,
        })
        .await;
        assert!(
            matches!(error, ClientError::Server { code: 103, .. }),
            "{error:?}"
        );
        assert!(!retrying);
        // Not kept for a retry: a subscribe with a token goes out now.
        let with_token = SubscribeOptions {
            token: Some(grant("secret:vault", 3600)),
            ..SubscribeOptions::default()
        };
        client.subscribe("secret:vault", with_token).await.unwrap();
        subscribed(&mut events, "secret:vault").await;
    })
    .await;
}
