//! Keepalive and close deadlines, on tokio's paused clock over an in-memory
//! transport: the runtime jumps to each deadline instead of sleeping.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use walkie::proto::{Config, Connection, Role};
use walkie::{CloseCode, WebSocket};

fn server_over_duplex(config: Config) -> (WebSocket<DuplexStream>, DuplexStream) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let conn = Connection::new(
        Role::Server,
        config,
        None,
        tokio::time::Instant::now().into_std(),
    );
    (WebSocket::from_parts(a, conn, &[], None, 64 * 1024), b)
}

/// Reads one unmasked frame (server to client): (opcode, payload).
async fn read_frame(peer: &mut DuplexStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 2];
    peer.read_exact(&mut head).await.unwrap();
    assert!(head[1] < 126, "small frames only in this test");
    let mut payload = vec![0u8; head[1] as usize];
    peer.read_exact(&mut payload).await.unwrap();
    (head[0] & 0x0f, payload)
}

#[tokio::test(start_paused = true)]
async fn silent_peer_is_pinged_then_closed_with_1011() {
    let (mut ws, mut peer) = server_over_duplex(Config::default());
    let start = tokio::time::Instant::now();
    let recv = tokio::spawn(async move { ws.recv().await.map(|r| r.map_err(|e| e.to_string())) });
    // Nothing arrives for 20 s: a ping.
    assert_eq!(read_frame(&mut peer).await, (0x9, vec![]));
    assert_eq!(start.elapsed().as_secs(), 20);
    // No answer for 20 s more: close 1011, and recv reports the timeout.
    let (op, payload) = read_frame(&mut peer).await;
    assert_eq!(op, 0x8);
    assert_eq!(&payload[..2], &1011u16.to_be_bytes());
    assert_eq!(start.elapsed().as_secs(), 40);
    let result = recv.await.unwrap();
    assert!(
        matches!(&result, Some(Err(e)) if e.contains("keepalive")),
        "{result:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn answered_pings_keep_the_connection_open() {
    let (mut ws, mut peer) = server_over_duplex(Config::default());
    let recv = tokio::spawn(async move {
        ws.recv()
            .await
            .map(|r| r.map(|m| m.len()).map_err(|e| e.to_string()))
    });
    for _ in 0..5 {
        assert_eq!(read_frame(&mut peer).await, (0x9, vec![]));
        // A masked, empty pong.
        peer.write_all(&[0x8a, 0x80, 1, 2, 3, 4]).await.unwrap();
    }
    // Still open after 100 s; now a message.
    peer.write_all(&[0x81, 0x82, 0, 0, 0, 0, b'h', b'i'])
        .await
        .unwrap();
    assert_eq!(recv.await.unwrap(), Some(Ok(2)));
}

#[tokio::test(start_paused = true)]
async fn idle_timeout_closes_with_1001() {
    let mut config = Config::default();
    config.ping_interval = None;
    config.idle_timeout = Some(Duration::from_secs(30));
    let (mut ws, mut peer) = server_over_duplex(config);
    let recv = tokio::spawn(async move { ws.recv().await.map(|r| r.map_err(|e| e.to_string())) });
    let (op, payload) = read_frame(&mut peer).await;
    assert_eq!(op, 0x8);
    assert_eq!(&payload[..2], &1001u16.to_be_bytes());
    assert!(matches!(recv.await.unwrap(), Some(Err(e)) if e.contains("idle")));
}

#[tokio::test(start_paused = true)]
async fn close_gives_up_after_the_close_timeout() {
    let (mut ws, mut peer) = server_over_duplex(Config::default());
    let start = tokio::time::Instant::now();
    let close = tokio::spawn(async move {
        ws.close(CloseCode::NORMAL, "bye")
            .await
            .map_err(|e| e.to_string())
    });
    let (op, _) = read_frame(&mut peer).await;
    assert_eq!(op, 0x8);
    // The peer never answers: close() returns after close_timeout (10 s).
    let result = close.await.unwrap();
    assert!(
        matches!(&result, Err(e) if e.contains("close handshake timed out")),
        "{result:?}"
    );
    assert_eq!(start.elapsed().as_secs(), 10);
}
