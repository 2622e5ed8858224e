//! `walkie serve`, `/`: every message is answered with `You said: ...`, and
//! connects and disconnects are logged.

mod common;

use common::{Server, within};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message as TMessage;
use walkie::{CloseCode, MaybeTlsStream, Message};

#[tokio::test]
async fn walkie_client_gets_you_said_and_the_log_shows_the_session() {
    let server = Server::start(&[]);
    within(10, async {
        let mut ws = walkie::connect(&server.ws_url("/")).await.unwrap();
        let MaybeTlsStream::Plain(tcp) = ws.get_ref() else {
            panic!("expected a plain TCP stream");
        };
        let peer = format!("peer={}", tcp.local_addr().unwrap());

        ws.send("hello").await.unwrap();
        let reply = ws.recv().await.unwrap().unwrap();
        assert_eq!(reply, Message::text("You said: hello"));

        ws.send(Message::binary(&b"hi"[..])).await.unwrap();
        let reply = ws.recv().await.unwrap().unwrap();
        assert!(reply.is_text(), "binary in, text out: {reply:?}");
        assert_eq!(reply.as_text(), Some("You said: hi"));

        // Non-ASCII text goes through unchanged.
        ws.send("κόσμε").await.unwrap();
        assert_eq!(
            ws.recv().await.unwrap().unwrap().as_text(),
            Some("You said: κόσμε")
        );

        assert!(
            server.wait_log(&["New client connected", &peer]).is_some(),
            "no connect line for {peer}; log:\n{}",
            server.log_text()
        );
        ws.close(CloseCode::NORMAL, "bye").await.unwrap();
        assert_eq!(ws.close_frame().map(|f| f.code), Some(CloseCode::NORMAL));

        assert!(
            server.wait_log(&["Client disconnected", &peer]).is_some(),
            "no disconnect line for {peer}; log:\n{}",
            server.log_text()
        );
        let log = server.log();
        let connected = log
            .iter()
            .position(|l| l.contains("New client connected") && l.contains(&peer))
            .unwrap();
        let disconnected = log
            .iter()
            .position(|l| l.contains("Client disconnected") && l.contains(&peer))
            .unwrap();
        assert!(connected < disconnected, "log out of order:\n{log:#?}");
        assert!(
            log.iter().any(|l| l.contains("Received: hello")),
            "no `Received: hello` line:\n{log:#?}"
        );
    })
    .await;
}

#[tokio::test]
async fn tungstenite_client_gets_you_said() {
    let server = Server::start(&[]);
    within(10, async {
        let (mut ws, response) = tokio_tungstenite::connect_async(server.ws_url("/"))
            .await
            .unwrap();
        assert_eq!(response.status(), 101);

        ws.send(TMessage::text("hello")).await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            TMessage::text("You said: hello")
        );
        ws.send(TMessage::binary(b"hi".to_vec())).await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            TMessage::text("You said: hi")
        );

        ws.close(None).await.unwrap();
        // The server answers the close and ends the connection.
        match ws.next().await {
            Some(Ok(TMessage::Close(_))) | None => {}
            Some(Ok(other)) => panic!("unexpected message after close: {other:?}"),
            Some(Err(e)) => panic!("close failed: {e}"),
        }
        assert!(
            server.wait_log(&["Client disconnected"]).is_some(),
            "no disconnect line; log:\n{}",
            server.log_text()
        );
    })
    .await;
}
