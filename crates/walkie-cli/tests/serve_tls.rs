//! `walkie serve --tls-cert --tls-key`: wss:// and https://, and the usage
//! errors of the TLS flags.

mod common;

use std::time::Duration;

use common::{Pki, run_walkie, s, within};
use walkie::{ClientConfig, CloseCode, Message};

#[tokio::test]
async fn wss_with_the_ca_works_and_default_roots_fail() {
    let pki = Pki::generate();
    let mut server = pki.server();
    assert!(server.https, "the log does not say https://");
    assert!(
        server
            .wait_log(&[&format!("https://127.0.0.1:{}/", server.port)])
            .is_some(),
        "log:\n{}",
        server.log_text()
    );
    let url = format!("wss://localhost:{}/", server.port);
    within(15, async {
        let mut config = ClientConfig::default();
        config.tls = Some(walkie::tls::client_config_with_ca(&pki.ca()).unwrap());
        let (mut ws, _) = walkie::connect_with(&url, &config).await.unwrap();
        ws.send("over TLS").await.unwrap();
        assert_eq!(
            ws.recv().await.unwrap().unwrap(),
            Message::text("You said: over TLS")
        );
        ws.close(CloseCode::NORMAL, "").await.unwrap();

        // /echo over TLS, with a large message.
        let echo = format!("wss://localhost:{}/echo", server.port);
        let (mut ws, _) = walkie::connect_with(&echo, &config).await.unwrap();
        let big = Message::binary(vec![42u8; 300_000]);
        ws.send(big.clone()).await.unwrap();
        assert!(ws.recv().await.unwrap().unwrap() == big, "echo differs");
        ws.close(CloseCode::NORMAL, "").await.unwrap();

        // The public roots do not trust our CA.
        match walkie::connect(&url).await {
            Err(walkie::Error::Tls(_)) => {}
            other => panic!("default roots: expected a TLS error, got {other:?}"),
        }
        // Plain ws:// to the TLS port is not a WebSocket either.
        let plain = format!("ws://127.0.0.1:{}/", server.port);
        let mut config = ClientConfig::default();
        config.handshake_timeout = Duration::from_secs(3);
        assert!(walkie::connect_with(&plain, &config).await.is_err());
    })
    .await;
    assert!(server.is_running(), "the TLS failures stopped the server");
    // Still serving after the failed handshakes.
    within(10, async {
        let mut config = ClientConfig::default();
        config.tls = Some(walkie::tls::client_config_with_ca(&pki.ca()).unwrap());
        let (mut ws, _) = walkie::connect_with(&url, &config).await.unwrap();
        ws.send("again").await.unwrap();
        assert_eq!(
            ws.recv().await.unwrap().unwrap(),
            Message::text("You said: again")
        );
    })
    .await;
}

#[test]
fn tls_cert_without_tls_key_is_a_usage_error() {
    let pki = Pki::generate();
    let run = run_walkie(
        [
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--tls-cert",
            s(&pki.cert()),
        ],
        &[],
        None,
        Duration::from_secs(10),
    );
    assert_eq!(run.code(), Some(2), "{run:?}");
    assert!(run.stderr.contains("--tls-key"), "{}", run.stderr);
}

#[test]
fn tls_key_without_tls_cert_is_a_usage_error() {
    let pki = Pki::generate();
    let run = run_walkie(
        ["serve", "--bind", "127.0.0.1:0", "--tls-key", s(&pki.key())],
        &[],
        None,
        Duration::from_secs(10),
    );
    assert_eq!(run.code(), Some(2), "{run:?}");
    assert!(run.stderr.contains("--tls-cert"), "{}", run.stderr);
}

#[test]
fn missing_cert_file_names_the_flag() {
    let pki = Pki::generate();
    let missing = pki.dir.join("no-such-cert.pem");
    let run = run_walkie(
        [
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--tls-cert",
            s(&missing),
            "--tls-key",
            s(&pki.key()),
        ],
        &[("WALKIE_LOG", "info")],
        None,
        Duration::from_secs(10),
    );
    assert_eq!(run.code(), Some(2), "{run:?}");
    assert!(run.stderr.contains("--tls-cert"), "{}", run.stderr);
    assert!(run.stderr.contains("no-such-cert.pem"), "{}", run.stderr);
    assert!(!run.stderr.contains("listening"), "{}", run.stderr);
}

#[test]
fn key_file_that_is_not_a_key_is_an_error() {
    let pki = Pki::generate();
    // The certificate given as the key.
    let run = run_walkie(
        [
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--tls-cert",
            s(&pki.cert()),
            "--tls-key",
            s(&pki.cert()),
        ],
        &[("WALKIE_LOG", "info")],
        None,
        Duration::from_secs(10),
    );
    assert_eq!(run.code(), Some(2), "{run:?}");
    assert!(run.stderr.contains("--tls-key"), "{}", run.stderr);
}
