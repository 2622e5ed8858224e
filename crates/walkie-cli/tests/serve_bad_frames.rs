//! `walkie serve` against hand-made bad frames on a raw TCP stream: the
//! server fails the connection with the right close code, and goes on
//! serving new clients.

mod common;

use common::{RawWs, Server, frame, within};
use walkie::proto::deflate::Deflater;
use walkie::proto::{BytesMut, apply_mask};

const FIN: u8 = 0x80;
const RSV1: u8 = 0x40;
const RSV2: u8 = 0x20;
const CONTINUATION: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;

/// Starts a server with `args`, sends `bytes` after the handshake on `/`
/// (or `/echo` when `path` says so) and expects a close frame with `code`;
/// then checks that the server serves a new client.
async fn expect_close(args: &[&str], path: &str, bytes: &[u8], code: u16, what: &str) {
    let mut server = Server::start(args);
    within(15, async {
        let mut ws = RawWs::connect(server.port, path, "").await;
        ws.send_raw(bytes).await;
        let got = ws.close_code().await;
        assert_eq!(
            got,
            Some(code),
            "{what}: expected close {code}; log:\n{}",
            server.log_text()
        );
        server.assert_serves(what).await;
    })
    .await;
}

#[tokio::test]
async fn unmasked_client_frame_is_1002() {
    let bytes = frame(FIN | TEXT, b"hello", false);
    expect_close(&[], "/", &bytes, 1002, "unmasked frame").await;
}

#[tokio::test]
async fn rsv2_set_is_1002() {
    let bytes = frame(FIN | RSV2 | TEXT, b"hello", true);
    expect_close(&[], "/", &bytes, 1002, "RSV2").await;
}

#[tokio::test]
async fn rsv1_without_deflate_is_1002() {
    let bytes = frame(FIN | RSV1 | TEXT, b"hello", true);
    expect_close(&[], "/", &bytes, 1002, "RSV1 without deflate").await;
}

#[tokio::test]
async fn reserved_opcode_is_1002() {
    let bytes = frame(FIN | 0x3, b"hello", true);
    expect_close(&[], "/", &bytes, 1002, "opcode 0x3").await;
}

#[tokio::test]
async fn fragmented_ping_is_1002() {
    let bytes = frame(PING, b"ping", true);
    expect_close(&[], "/", &bytes, 1002, "fragmented ping").await;
}

#[tokio::test]
async fn ping_over_125_bytes_is_1002() {
    let bytes = frame(FIN | PING, &[b'p'; 126], true);
    expect_close(&[], "/", &bytes, 1002, "126-byte ping").await;
}

#[tokio::test]
async fn continuation_without_a_start_is_1002() {
    let bytes = frame(FIN | CONTINUATION, b"orphan", true);
    expect_close(&[], "/", &bytes, 1002, "orphan continuation").await;
}

#[tokio::test]
async fn invalid_utf8_text_is_1007() {
    // "κόσμε" followed by a lone surrogate (ED A0 80) and more text.
    let payload = b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited";
    let bytes = frame(FIN | TEXT, payload, true);
    expect_close(&[], "/", &bytes, 1007, "invalid UTF-8 text").await;
}

#[tokio::test]
async fn invalid_utf8_across_fragments_is_1007() {
    let mut bytes = frame(TEXT, b"valid start ", true);
    bytes.extend(frame(FIN | CONTINUATION, b"\xff\xfe", true));
    expect_close(&[], "/echo", &bytes, 1007, "invalid UTF-8 in a fragment").await;
}

#[tokio::test]
async fn close_with_invalid_utf8_reason_is_1007() {
    let bytes = frame(FIN | CLOSE, b"\x03\xe8\xff\xfe", true);
    expect_close(&[], "/", &bytes, 1007, "close reason not UTF-8").await;
}

#[tokio::test]
async fn close_code_1005_is_1002() {
    let bytes = frame(FIN | CLOSE, &1005u16.to_be_bytes(), true);
    expect_close(&[], "/", &bytes, 1002, "close code 1005").await;
}

#[tokio::test]
async fn close_with_one_byte_payload_is_1002() {
    let bytes = frame(FIN | CLOSE, b"\x03", true);
    expect_close(&[], "/", &bytes, 1002, "1-byte close payload").await;
}

#[tokio::test]
async fn message_over_the_limit_is_1009() {
    let bytes = frame(FIN | TEXT, &[b'x'; 2000], true);
    expect_close(
        &["--max-message-size", "1K"],
        "/",
        &bytes,
        1009,
        "2000 bytes over --max-message-size 1K",
    )
    .await;
}

#[tokio::test]
async fn fragmented_message_over_the_limit_is_1009() {
    // A binary start, two continuations and a final one: 2000 bytes.
    let mut bytes = frame(BINARY, &[b'x'; 500], true);
    bytes.extend(frame(CONTINUATION, &[b'x'; 500], true));
    bytes.extend(frame(CONTINUATION, &[b'x'; 500], true));
    bytes.extend(frame(FIN | CONTINUATION, &[b'x'; 500], true));
    expect_close(
        &["--max-message-size", "1K"],
        "/echo",
        &bytes,
        1009,
        "4 x 500 bytes over --max-message-size 1K",
    )
    .await;
}

#[tokio::test]
async fn message_at_the_limit_is_accepted() {
    let mut server = Server::start(&["--max-message-size", "1K"]);
    within(10, async {
        let mut ws = RawWs::connect(server.port, "/echo", "").await;
        ws.send_raw(&frame(FIN | BINARY, &[7u8; 1024], true)).await;
        let back = ws.read_frame().await.expect("no echo");
        assert_eq!((back.opcode, back.payload.len()), (BINARY, 1024));
        server.assert_serves("a message of exactly 1K").await;
    })
    .await;
}

#[tokio::test]
async fn decompression_bomb_is_1009() {
    let mut server = Server::start(&["--max-message-size", "1M"]);
    within(15, async {
        let mut ws = RawWs::connect(
            server.port,
            "/echo",
            "Sec-WebSocket-Extensions: permessage-deflate\r\n",
        )
        .await;
        let ext = ws
            .response
            .header("sec-websocket-extensions")
            .unwrap_or_default();
        assert!(
            ext.contains("permessage-deflate"),
            "deflate not negotiated: {:?}",
            ws.response
        );

        // First a small compressed message, to check the compression works.
        let mut deflater = Deflater::new(6, 15, false);
        let mut small = BytesMut::new();
        deflater.compress(b"squeeze me", &mut small).unwrap();
        ws.send_raw(&frame(FIN | RSV1 | TEXT, &small, true)).await;
        let back = ws.read_frame().await.expect("no echo of the small message");
        assert_eq!(back.opcode, TEXT);

        // 10 MiB of zeros, a few KiB on the wire.
        let mut bomb = BytesMut::new();
        deflater.compress(&vec![0u8; 10 << 20], &mut bomb).unwrap();
        assert!(bomb.len() < 64 * 1024, "bomb is {} bytes", bomb.len());
        ws.send_raw(&frame(FIN | RSV1 | BINARY, &bomb, true)).await;
        let got = ws.close_code().await;
        assert_eq!(
            got,
            Some(1009),
            "decompression bomb; log:\n{}",
            server.log_text()
        );
        server.assert_serves("a decompression bomb").await;
    })
    .await;
}

#[tokio::test]
async fn reset_in_the_middle_of_a_frame() {
    let mut server = Server::start(&[]);
    within(15, async {
        // A client that is in the middle of a message when its connection is
        // reset.
        let mut ws = RawWs::connect(server.port, "/", "").await;
        let peer = format!("peer={}", ws.stream.local_addr().unwrap());
        ws.send_raw(&frame(FIN | TEXT, b"first", true)).await;
        let reply = ws.read_frame().await.expect("no reply");
        assert_eq!(reply.payload, b"You said: first");
        let mut partial = frame(FIN | TEXT, &[b'y'; 1000], true);
        partial.truncate(100);
        ws.send_raw(&partial).await;
        ws.stream.set_zero_linger().unwrap();
        drop(ws);

        // A second client, while the first is gone.
        server.assert_serves("a reset mid-frame").await;
        assert!(
            server.wait_log(&["Client disconnected", &peer]).is_some(),
            "the reset client ({peer}) was not logged as gone; log:\n{}",
            server.log_text()
        );
    })
    .await;
}

#[tokio::test]
async fn masking_is_applied_by_the_helper() {
    // The hand-made frames are masked the way the RFC says: unmasking the
    // payload with the key gives the data back.
    let bytes = frame(FIN | TEXT, b"hello", true);
    assert_eq!(bytes[1], 0x80 | 5);
    let key: [u8; 4] = bytes[2..6].try_into().unwrap();
    let mut payload = bytes[6..].to_vec();
    apply_mask(&mut payload, key, 0);
    assert_eq!(payload, b"hello");
}
