//! A peer that reads nothing: senders wait instead of buffering without
//! bound.

mod common;

use std::time::Duration;

use common::within;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use walkie::{Message, ServerConfig};

#[tokio::test]
async fn send_waits_when_the_peer_does_not_read() {
    within(20, async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut ws = walkie::accept(tcp, &ServerConfig::default()).await.unwrap();
            let chunk = Message::binary(vec![0u8; 64 * 1024]);
            let mut sent = 0usize;
            // Send until a send has been blocked for a while.
            loop {
                match tokio::time::timeout(Duration::from_millis(500), ws.send(chunk.clone())).await
                {
                    Ok(Ok(())) => sent += chunk.len(),
                    Ok(Err(e)) => panic!("send failed: {e}"),
                    Err(_) => return sent,
                }
                assert!(
                    sent < 512 << 20,
                    "sent {sent} bytes to a peer that reads nothing"
                );
            }
        });
        // The client completes the handshake, then never reads.
        let (ws, _) =
            walkie::connect_with(&format!("ws://{addr}/"), &walkie::ClientConfig::default())
                .await
                .unwrap();
        let sent = server.await.unwrap();
        // Kernel socket buffers take some, then the sender waits.
        assert!(sent > 0);
        drop(ws);
    })
    .await;
}

#[tokio::test]
async fn a_reader_that_resumes_gets_everything() {
    within(20, async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut ws = walkie::accept(tcp, &ServerConfig::default()).await.unwrap();
            for i in 0u32..2000 {
                ws.feed(Message::binary(vec![(i % 251) as u8; 8 * 1024]))
                    .await
                    .unwrap();
            }
            ws.flush().await.unwrap();
            let _ = ws.recv().await;
        });
        let mut ws = walkie::connect(&format!("ws://{addr}/")).await.unwrap();
        // Let the server fill every buffer first.
        tokio::time::sleep(Duration::from_millis(300)).await;
        for i in 0u32..2000 {
            let m = ws.recv().await.unwrap().unwrap();
            assert_eq!(m.len(), 8 * 1024);
            assert_eq!(m.as_bytes()[0], (i % 251) as u8);
        }
    })
    .await;
}

/// `feed_now` queues at once and `ready` then waits, as `feed` would have
/// waited before queuing: a peer that reads nothing holds the sender at the
/// high-water mark plus one message, and one that resumes gets everything.
#[tokio::test]
async fn feed_now_then_ready_waits_for_a_slow_reader_and_loses_nothing() {
    within(20, async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (blocked_tx, blocked_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut ws = walkie::accept(tcp, &ServerConfig::default()).await.unwrap();
            let mut blocked_tx = Some(blocked_tx);
            for i in 0u32..2000 {
                ws.feed_now(Message::binary(vec![(i % 251) as u8; 8 * 1024]))
                    .unwrap();
                if tokio::time::timeout(Duration::from_millis(200), ws.ready())
                    .await
                    .is_err()
                {
                    // The reader is not reading: say so, then wait for it.
                    if let Some(tx) = blocked_tx.take() {
                        let _ = tx.send(i);
                    }
                    ws.ready().await.unwrap();
                }
            }
            ws.flush().await.unwrap();
            let _ = ws.recv().await;
        });
        let mut ws = walkie::connect(&format!("ws://{addr}/")).await.unwrap();
        let blocked_at = blocked_rx.await.expect("the sender never had to wait");
        assert!(
            blocked_at < 1999,
            "all but the last message queued before any wait"
        );
        for i in 0u32..2000 {
            let m = ws.recv().await.unwrap().unwrap();
            assert_eq!(m.len(), 8 * 1024);
            assert_eq!(m.as_bytes()[0], (i % 251) as u8, "message {i}");
        }
    })
    .await;
}

#[tokio::test]
async fn raw_peer_that_stops_reading_cannot_grow_pong_backlog() {
    within(20, async {
        use tokio::io::AsyncWriteExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut ws = walkie::accept(tcp, &ServerConfig::default()).await.unwrap();
            // Reads (and answers pings) until the peer gives up.
            let _ = tokio::time::timeout(Duration::from_secs(3), ws.recv()).await;
        });
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .unwrap();
        let mut head = [0u8; 129];
        tcp.read_exact(&mut head).await.unwrap();
        // Floods pings of 125 bytes and never reads the pongs. Writes start
        // blocking once the server stops reading.
        let mut ping = vec![0x89u8, 0x80 | 125, 1, 2, 3, 4];
        ping.extend(std::iter::repeat_n(0u8, 125));
        let flood: Vec<u8> = ping.iter().copied().cycle().take(ping.len() * 1000).collect();
        let mut written = 0usize;
        while let Ok(Ok(())) = tokio::time::timeout(Duration::from_millis(500), tcp.write_all(&flood)).await {
            written += flood.len();
            assert!(written < 1 << 30, "the server kept reading pings it could not answer");
        }
        server.await.unwrap();
    })
    .await;
}
