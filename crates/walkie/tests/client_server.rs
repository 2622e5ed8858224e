//! Our client against our server, over TCP on 127.0.0.1:0.

mod common;

use common::{echo_server, text, within};
use walkie::{ClientConfig, CloseCode, DeflateConfig, Message, ServerConfig};

#[tokio::test]
async fn every_message_kind_round_trips() {
    within(10, async {
        let addr = echo_server(ServerConfig::default()).await;
        let mut ws = walkie::connect(&format!("ws://{addr}/")).await.unwrap();
        let big = Message::binary(vec![0xab; 3 << 20]);
        for m in [
            text("hello"),
            text(""),
            text("κόσμε 🎉"),
            Message::binary(vec![0u8, 1, 2, 255]),
            big,
        ] {
            ws.send(m.clone()).await.unwrap();
            assert_eq!(ws.recv().await.unwrap().unwrap(), m);
        }
        ws.close(CloseCode::NORMAL, "done").await.unwrap();
        assert_eq!(ws.close_frame().map(|f| f.code), Some(CloseCode::NORMAL));
        assert!(ws.recv().await.is_none());
    })
    .await;
}

#[tokio::test]
async fn fed_messages_leave_together_and_arrive_in_order() {
    within(10, async {
        let addr = echo_server(ServerConfig::default()).await;
        let mut ws = walkie::connect(&format!("ws://{addr}/")).await.unwrap();
        for i in 0..1000 {
            ws.feed(text(&i.to_string())).await.unwrap();
        }
        ws.flush().await.unwrap();
        for i in 0..1000 {
            assert_eq!(ws.recv().await.unwrap().unwrap(), text(&i.to_string()));
        }
    })
    .await;
}

#[tokio::test]
async fn compression_is_negotiated_and_transparent() {
    within(10, async {
        let addr = echo_server(ServerConfig::default()).await;
        let mut config = ClientConfig::default();
        config.deflate = Some(DeflateConfig::default());
        let (mut ws, response) = walkie::connect_with(&format!("ws://{addr}/"), &config)
            .await
            .unwrap();
        assert!(ws.is_compressed());
        assert!(response.deflate.is_some());
        let long = "compressible ".repeat(10_000);
        for m in [
            text(&long),
            text("short"),
            Message::binary(vec![7u8; 100_000]),
        ] {
            ws.send(m.clone()).await.unwrap();
            assert_eq!(ws.recv().await.unwrap().unwrap(), m);
        }
    })
    .await;
}

#[tokio::test]
async fn server_without_deflate_declines_the_offer() {
    within(10, async {
        let mut server = ServerConfig::default();
        server.deflate = None;
        let addr = echo_server(server).await;
        let mut config = ClientConfig::default();
        config.deflate = Some(DeflateConfig::default());
        let (mut ws, _) = walkie::connect_with(&format!("ws://{addr}/"), &config)
            .await
            .unwrap();
        assert!(!ws.is_compressed());
        ws.send("plain").await.unwrap();
        assert_eq!(ws.recv().await.unwrap().unwrap(), text("plain"));
    })
    .await;
}

#[tokio::test]
async fn server_initiated_close_reaches_the_client() {
    within(10, async {
        let addr = common::serve(ServerConfig::default(), |mut ws| async move {
            let _ = ws.close(CloseCode::GOING_AWAY, "bye").await;
        })
        .await;
        let mut ws = walkie::connect(&format!("ws://{addr}/")).await.unwrap();
        assert!(ws.recv().await.is_none());
        let frame = ws.close_frame().unwrap();
        assert_eq!(frame.code, CloseCode::GOING_AWAY);
        assert_eq!(frame.reason.as_str(), "bye");
    })
    .await;
}

#[tokio::test]
async fn subprotocol_is_selected_from_the_offer() {
    within(10, async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let incoming = walkie::Incoming::read(tcp, std::time::Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!(incoming.request().path(), "/chat");
            let upgrade = incoming.upgrade().unwrap();
            let chosen = upgrade
                .select_protocol(&["walkie.v1", "chat"])
                .map(str::to_owned);
            let mut ws = incoming
                .accept(&ServerConfig::default(), chosen.as_deref())
                .await
                .unwrap();
            let reply = ws.protocol().unwrap_or("none").to_owned();
            ws.send(reply).await.unwrap();
            let _ = ws.recv().await;
        });
        let mut config = ClientConfig::default();
        config.protocols = vec!["chat".into(), "other".into()];
        let (mut ws, _) = walkie::connect_with(&format!("ws://{addr}/chat"), &config)
            .await
            .unwrap();
        assert_eq!(ws.protocol(), Some("chat"));
        assert_eq!(ws.recv().await.unwrap().unwrap(), text("chat"));
    })
    .await;
}

#[tokio::test]
async fn rejected_upgrade_is_a_handshake_error() {
    within(10, async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let incoming = walkie::Incoming::read(tcp, std::time::Duration::from_secs(5))
                .await
                .unwrap();
            incoming.reject(403, "origin not allowed").await;
        });
        let err = walkie::connect(&format!("ws://{addr}/")).await.unwrap_err();
        match &err {
            walkie::Error::Refused(refusal) => {
                assert_eq!(refusal.status, 403);
                assert_eq!(refusal.message, "origin not allowed");
            }
            other => panic!("not a refusal: {other:?}"),
        }
        assert_eq!(
            err.to_string(),
            "server refused the upgrade: HTTP 403: origin not allowed"
        );
    })
    .await;
}

#[tokio::test]
async fn connect_errors_are_typed() {
    within(10, async {
        assert!(matches!(
            walkie::connect("http//nope").await,
            Err(walkie::Error::InvalidUrl(_))
        ));
        // A port nothing listens on.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        assert!(matches!(
            walkie::connect(&format!("ws://127.0.0.1:{port}/")).await,
            Err(walkie::Error::Io(_))
        ));
    })
    .await;
}

/// A refusal with no length, on a connection the server keeps open: still
/// a refusal with its message, not a handshake timeout.
#[tokio::test]
async fn a_refusal_without_length_is_reported_as_one() {
    within(10, async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut head = [0u8; 1024];
            let _ = tokio::io::AsyncReadExt::read(&mut tcp, &mut head).await;
            let answer = b"HTTP/1.1 429 Too Many Requests\r\n\r\nslow down\r\n";
            tokio::io::AsyncWriteExt::write_all(&mut tcp, answer)
                .await
                .unwrap();
            tokio::time::sleep(std::time::Duration::from_secs(8)).await;
        });
        let mut config = walkie::ClientConfig::default();
        config.handshake_timeout = std::time::Duration::from_secs(3);
        let err = walkie::connect_with(&format!("ws://{addr}/"), &config)
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "server refused the upgrade: HTTP 429: slow down"
        );
        server.abort();
    })
    .await;
}
