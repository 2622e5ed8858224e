//! Interop with tokio-tungstenite, a well-kept third-party implementation,
//! both ways.

mod common;

use common::{echo_server, text, within};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message as TMessage;
use tokio_tungstenite::tungstenite::protocol::CloseFrame as TCloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as TCloseCode;
use walkie::{CloseCode, Message, ServerConfig};

#[tokio::test]
async fn tungstenite_client_against_our_server() {
    within(10, async {
        let addr = echo_server(ServerConfig::default()).await;
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/"))
            .await
            .unwrap();
        let cases = [
            TMessage::text("hello"),
            TMessage::text("κόσμε"),
            TMessage::binary(vec![1u8, 2, 3]),
            TMessage::binary(vec![9u8; 1 << 20]),
            TMessage::text(""),
        ];
        for m in cases {
            ws.send(m.clone()).await.unwrap();
            assert_eq!(ws.next().await.unwrap().unwrap(), m);
        }
        ws.send(TMessage::Ping(b"p".to_vec().into())).await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            TMessage::Pong(b"p".to_vec().into())
        );
        ws.close(Some(TCloseFrame {
            code: TCloseCode::Away,
            reason: "bye".into(),
        }))
        .await
        .unwrap();
        // Our server echoes the code, then closes TCP.
        match ws.next().await {
            Some(Ok(TMessage::Close(Some(f)))) => assert_eq!(u16::from(f.code), 1001),
            other => panic!("expected the close echo, got {other:?}"),
        }
        assert!(ws.next().await.is_none());
    })
    .await;
}

#[tokio::test]
async fn our_client_against_a_tungstenite_server() {
    within(10, async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
            while let Some(Ok(m)) = ws.next().await {
                if m.is_text() || m.is_binary() {
                    ws.send(m).await.unwrap();
                }
            }
        });
        let mut ws = walkie::connect(&format!("ws://{addr}/")).await.unwrap();
        for m in [text("hello"), Message::binary(vec![5u8; 300_000]), text("")] {
            ws.send(m.clone()).await.unwrap();
            assert_eq!(ws.recv().await.unwrap().unwrap(), m);
        }
        ws.close(CloseCode::NORMAL, "").await.unwrap();
        assert_eq!(ws.close_frame().map(|f| f.code), Some(CloseCode::NORMAL));
    })
    .await;
}

#[tokio::test]
async fn tungstenite_server_closing_first() {
    within(10, async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
            ws.send(TMessage::text("last")).await.unwrap();
            ws.close(Some(TCloseFrame {
                code: TCloseCode::Policy,
                reason: "policy".into(),
            }))
            .await
            .unwrap();
            while ws.next().await.is_some() {}
        });
        let mut ws = walkie::connect(&format!("ws://{addr}/")).await.unwrap();
        assert_eq!(ws.recv().await.unwrap().unwrap(), text("last"));
        assert!(ws.recv().await.is_none());
        let frame = ws.close_frame().unwrap();
        assert_eq!(frame.code, CloseCode::POLICY_VIOLATION);
        assert_eq!(frame.reason.as_str(), "policy");
    })
    .await;
}
