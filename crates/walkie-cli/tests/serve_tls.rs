//! `walkie serve --tls-cert --tls-key`: wss:// and https://, and the usage
//! errors of the TLS flags.

mod common;

use std::time::Duration;

use common::{Pki, joined, run_walkie, s, within};
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

/// A room over wss://. With one worker thread every member is on the
/// publisher's thread, so the room's fan-out writes each member's TLS
/// stream from its own loop, and the member's task finishes what TLS did
/// not write at once. Large and small messages arrive whole, in order, to
/// every member (the sender too).
#[tokio::test]
async fn a_room_over_tls_gets_every_message_in_order() {
    let pki = Pki::generate();
    let server = pki.server_with(&["--in-memory"], &[("WALKIE_WORKERS", "1")]);
    within(30, async {
        let mut config = ClientConfig::default();
        config.tls = Some(walkie::tls::client_config_with_ca(&pki.ca()).unwrap());
        let url = format!("wss://localhost:{}/rooms/secure", server.port);
        let (mut writer, _) = walkie::connect_with(&url, &config).await.unwrap();
        let (mut reader, _) = walkie::connect_with(&url, &config).await.unwrap();
        joined(&server, "secure", 2).await;
        let total = 120u32;
        let size = |i: u32| if i % 40 == 0 { 300_000 } else { 100 };
        for i in 0..total {
            let mut m = i.to_be_bytes().to_vec();
            m.resize(size(i), b'z');
            writer.feed(Message::binary(m)).await.unwrap();
        }
        writer.flush().await.unwrap();
        for (who, ws) in [("reader", &mut reader), ("writer", &mut writer)] {
            for i in 0..total {
                let m = tokio::time::timeout(Duration::from_secs(10), ws.recv())
                    .await
                    .unwrap_or_else(|_| panic!("{who}, message {i}: nothing within 10 s"))
                    .expect("connection ended")
                    .expect("connection failed");
                let bytes = m.as_bytes();
                assert_eq!(bytes.len(), size(i), "{who}, message {i}");
                let n = u32::from_be_bytes(bytes[..4].try_into().unwrap());
                assert_eq!(n, i, "{who}: out of order, lost or repeated");
            }
        }
        for ws in [&mut reader, &mut writer] {
            ws.close(CloseCode::NORMAL, "").await.unwrap();
        }
    })
    .await;
}

/// SIGHUP reads the certificate and key again: later handshakes get the
/// new certificate, a connection open before keeps working, and files
/// that do not make a certificate keep the current one in use.
#[cfg(unix)]
#[tokio::test]
async fn sighup_reloads_the_certificate_for_later_handshakes() {
    let served = Pki::generate();
    let first = Pki::generate();
    let second = Pki::generate();
    for (from, to) in [(first.cert(), served.cert()), (first.key(), served.key())] {
        std::fs::copy(from, to).unwrap();
    }
    let mut server = served.server();
    let url = format!("wss://localhost:{}/echo", server.port);
    let trusting = |pki: &Pki| {
        let mut config = ClientConfig::default();
        config.tls = Some(walkie::tls::client_config_with_ca(&pki.ca()).unwrap());
        config
    };
    let mut before = within(10, async {
        let (ws, _) = walkie::connect_with(&url, &trusting(&first)).await.unwrap();
        ws
    })
    .await;

    // A renewed certificate, from another CA here, so that a client can
    // tell which one it got.
    for (from, to) in [(second.cert(), served.cert()), (second.key(), served.key())] {
        std::fs::copy(from, to).unwrap();
    }
    server.signal("HUP");
    assert!(
        server.wait_log(&["TLS certificate reloaded"]).is_some(),
        "log:\n{}",
        server.log_text()
    );
    within(15, async {
        let (mut ws, _) = walkie::connect_with(&url, &trusting(&second))
            .await
            .unwrap();
        ws.send("new").await.unwrap();
        assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text("new"));
        match walkie::connect_with(&url, &trusting(&first)).await {
            Err(walkie::Error::Tls(_)) => {}
            other => panic!("the old certificate is still served: {other:?}"),
        }
        // The connection made before keeps its session.
        before.send("old").await.unwrap();
        assert_eq!(before.recv().await.unwrap().unwrap(), Message::text("old"));
    })
    .await;

    // A key that is not the certificate's: refused, the current one stays.
    std::fs::copy(first.key(), served.key()).unwrap();
    server.signal("HUP");
    assert!(
        server
            .wait_log(&["cannot reload the TLS certificate"])
            .is_some(),
        "log:\n{}",
        server.log_text()
    );
    assert!(server.is_running());
    within(15, async {
        let (mut ws, _) = walkie::connect_with(&url, &trusting(&second))
            .await
            .unwrap();
        ws.send("kept").await.unwrap();
        assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text("kept"));
    })
    .await;
}

/// `walkie publish` over https://: with the CA, or -k; without either, a
/// certificate error (exit 1), nothing published.
#[test]
fn walkie_publish_over_https() {
    let pki = Pki::generate();
    let server = pki.server_with(&["--api-key", "k", "--in-memory"], &[]);
    let url = format!("https://localhost:{}", server.port);
    let publish = |extra: &[&str]| {
        let mut args = vec!["publish", "--url", &url, "--api-key", "k", "news", "\"hi\""];
        args.extend_from_slice(extra);
        run_walkie(args, &[], None, Duration::from_secs(15))
    };
    let run = publish(&["--ca", s(&pki.ca())]);
    assert_eq!(run.code(), Some(0), "--ca: {run:?}");
    assert!(run.stdout.contains("\"offset\":1"), "{run:?}");
    let run = publish(&["-k"]);
    assert_eq!(run.code(), Some(0), "-k: {run:?}");
    assert!(run.stdout.contains("\"offset\":2"), "{run:?}");
    let run = publish(&[]);
    assert_eq!(run.code(), Some(1), "the system's roots: {run:?}");
    assert!(run.stderr.to_lowercase().contains("certificate"), "{run:?}");
    let run = publish(&["-k", "--ca", s(&pki.ca())]);
    assert_eq!(run.code(), Some(2), "{run:?}");
    // Plain http:// to the TLS port is no answer.
    let plain = format!("http://localhost:{}", server.port);
    let run = run_walkie(
        [
            "publish",
            "--url",
            &plain,
            "--api-key",
            "k",
            "-t",
            "3s",
            "news",
            "1",
        ],
        &[],
        None,
        Duration::from_secs(15),
    );
    assert_eq!(run.code(), Some(1), "{run:?}");
}
