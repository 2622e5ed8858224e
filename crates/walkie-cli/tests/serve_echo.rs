//! `walkie serve`, `/echo`: every message back unchanged, text as text and
//! binary as binary, with and without permessage-deflate.

mod common;

use common::{Server, within};
use walkie::{ClientConfig, CloseCode, DeflateConfig, Message};

/// 1 MiB of pseudo-random (incompressible) bytes.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn cases() -> Vec<Message> {
    vec![
        Message::text("hello"),
        Message::text("κόσμε 🎉"),
        Message::binary(vec![0u8, 1, 2, 255]),
        Message::text(""),
        Message::binary(Vec::new()),
        Message::binary(noise(1 << 20)),
        Message::text("ab".repeat(1 << 19)),
        Message::text("after the big ones"),
    ]
}

async fn echo_roundtrips(server: &Server, deflate: bool) {
    let mut config = ClientConfig::default();
    if deflate {
        config.deflate = Some(DeflateConfig::default());
    }
    let (mut ws, response) = walkie::connect_with(&server.ws_url("/echo"), &config)
        .await
        .unwrap();
    assert_eq!(ws.is_compressed(), deflate, "response: {response:?}");
    for m in cases() {
        ws.send(m.clone()).await.unwrap();
        let back = ws.recv().await.unwrap().unwrap();
        assert_eq!(back.is_text(), m.is_text(), "type changed");
        assert!(
            back == m,
            "echo differs (len {} -> {}, deflate {deflate})",
            m.len(),
            back.len()
        );
    }
    // A burst, answered in order.
    for i in 0..50 {
        ws.feed(format!("burst {i}")).await.unwrap();
    }
    ws.flush().await.unwrap();
    for i in 0..50 {
        let back = ws.recv().await.unwrap().unwrap();
        assert_eq!(back.as_text(), Some(format!("burst {i}").as_str()));
    }
    ws.close(CloseCode::NORMAL, "").await.unwrap();
    assert_eq!(ws.close_frame().map(|f| f.code), Some(CloseCode::NORMAL));
}

#[tokio::test]
async fn echo_without_deflate() {
    let mut server = Server::start(&[]);
    within(20, echo_roundtrips(&server, false)).await;
    within(10, server.assert_serves("echo without deflate")).await;
}

#[tokio::test]
async fn echo_with_deflate() {
    let mut server = Server::start(&[]);
    within(20, echo_roundtrips(&server, true)).await;
    within(10, server.assert_serves("echo with deflate")).await;
}

#[tokio::test]
async fn no_deflate_flag_declines_compression() {
    let mut server = Server::start(&["--no-deflate"]);
    within(10, async {
        let mut config = ClientConfig::default();
        config.deflate = Some(DeflateConfig::default());
        let (mut ws, _) = walkie::connect_with(&server.ws_url("/echo"), &config)
            .await
            .unwrap();
        assert!(!ws.is_compressed(), "--no-deflate still compressed");
        ws.send("plain").await.unwrap();
        assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text("plain"));
        ws.close(CloseCode::NORMAL, "").await.unwrap();
    })
    .await;
    within(10, server.assert_serves("--no-deflate")).await;
}
