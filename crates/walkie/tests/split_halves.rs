//! A split connection used from two tasks at once.

mod common;

use common::{echo_server, text, within};
use walkie::{CloseCode, ServerConfig};

#[tokio::test]
async fn reader_and_writer_in_two_tasks() {
    within(20, async {
        let addr = echo_server(ServerConfig::default()).await;
        let ws = walkie::connect(&format!("ws://{addr}/")).await.unwrap();
        let (mut reader, mut writer) = ws.split();
        let writer_task = tokio::spawn(async move {
            for i in 0..5000 {
                writer.feed(text(&format!("message {i}"))).await.unwrap();
                if i % 100 == 0 {
                    writer.flush().await.unwrap();
                }
            }
            writer.flush().await.unwrap();
            writer
        });
        for i in 0..5000 {
            assert_eq!(
                reader.recv().await.unwrap().unwrap(),
                text(&format!("message {i}"))
            );
        }
        let mut writer = writer_task.await.unwrap();
        writer.close(CloseCode::NORMAL, "").await.unwrap();
        assert!(reader.recv().await.is_none());
        assert_eq!(
            reader.close_frame().map(|f| f.code),
            Some(CloseCode::NORMAL)
        );
    })
    .await;
}

#[tokio::test]
async fn reader_answers_pings_while_the_writer_is_idle() {
    within(10, async {
        // The server pings; the client only reads (its writer never runs).
        let addr = common::serve(ServerConfig::default(), |mut ws| async move {
            // Ask for a message after our ping; the pong must arrive first
            // for the connection to stay healthy.
            ws.ping(b"are you there").await.unwrap();
            ws.send("ping sent").await.unwrap();
            while let Some(Ok(m)) = ws.recv().await {
                ws.send(m).await.unwrap();
            }
        })
        .await;
        let ws = walkie::connect(&format!("ws://{addr}/")).await.unwrap();
        let (mut reader, mut writer) = ws.split();
        assert_eq!(reader.recv().await.unwrap().unwrap(), text("ping sent"));
        writer.send("after").await.unwrap();
        assert_eq!(reader.recv().await.unwrap().unwrap(), text("after"));
    })
    .await;
}
