//! Keepalive and close deadlines, on tokio's paused clock over an in-memory
//! transport: the runtime jumps to each deadline instead of sleeping.

use std::sync::Arc;
use std::task::{Context, Waker};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use walkie::proto::{Config, Connection, Role};
use walkie::{CloseCode, Message, WebSocket};

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

/// A peer that reads nothing: a sender waiting for room still runs the
/// keepalive deadlines, and gives up when the unanswered ping times out.
#[tokio::test(start_paused = true)]
async fn waiting_for_room_fails_when_keepalive_times_out() {
    let (mut ws, _peer) = server_over_duplex(Config::default());
    let start = tokio::time::Instant::now();
    ws.feed(Message::binary(vec![0u8; 1 << 20])).await.unwrap();
    let ready = tokio::time::timeout(Duration::from_secs(120), ws.ready())
        .await
        .expect("still waiting for room after 120 s");
    assert!(ready.is_err(), "{ready:?}");
    assert_eq!(start.elapsed().as_secs(), 40);
    let result = ws.recv().await.map(|r| r.map_err(|e| e.to_string()));
    assert!(
        matches!(&result, Some(Err(e)) if e.contains("keepalive")),
        "{result:?}"
    );
}

/// The same for `send`, which waits for everything to be written.
#[tokio::test(start_paused = true)]
async fn a_send_to_a_peer_that_reads_nothing_fails_in_time() {
    let (mut ws, _peer) = server_over_duplex(Config::default());
    let send = tokio::time::timeout(
        Duration::from_secs(120),
        ws.send(Message::binary(vec![0u8; 1 << 20])),
    )
    .await
    .expect("still sending after 120 s");
    assert!(send.is_err(), "{send:?}");
    // The split writer too.
    let (ws, _peer) = server_over_duplex(Config::default());
    let (mut reader, mut writer) = ws.split();
    let send = tokio::time::timeout(
        Duration::from_secs(120),
        writer.send(Message::binary(vec![0u8; 1 << 20])),
    )
    .await
    .expect("the writer is still sending after 120 s");
    assert!(send.is_err(), "{send:?}");
    let result = reader.recv().await.map(|r| r.map_err(|e| e.to_string()));
    assert!(
        matches!(&result, Some(Err(e)) if e.contains("keepalive")),
        "{result:?}"
    );
}

/// A peer that sends its close frame but reads nothing: once the close
/// handshake is over, our last bytes get `close_timeout`, then the
/// connection ends.
#[tokio::test(start_paused = true)]
async fn last_writes_to_a_peer_that_reads_nothing_give_up_after_close_timeout() {
    let (a, mut peer) = tokio::io::duplex(4096);
    let conn = Connection::new(
        Role::Server,
        Config::default(),
        None,
        tokio::time::Instant::now().into_std(),
    );
    let mut ws = WebSocket::from_parts(a, conn, &[], None, 64 * 1024);
    // More than the pipe holds, less than the high-water mark: the
    // connection keeps reading.
    ws.feed(Message::binary(vec![0u8; 32 * 1024]))
        .await
        .unwrap();
    // A masked close frame, 1000.
    peer.write_all(&[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8])
        .await
        .unwrap();
    let start = tokio::time::Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(120), ws.recv())
        .await
        .expect("still finishing after 120 s")
        .map(|r| r.map_err(|e| e.to_string()));
    assert!(
        matches!(&result, Some(Err(e)) if e.contains("close handshake timed out")),
        "{result:?}"
    );
    assert_eq!(start.elapsed().as_secs(), 10);
    assert!(ws.recv().await.is_none());
}

/// Dropped connections cancel their keepalive deadlines: the wakers they
/// registered (their tasks, in a runtime) are let go once the cancelled
/// entries are swept (64 of them here, the fewest the timers sweep), not at
/// the deadline, 20 s later.
#[tokio::test]
async fn dropped_connections_let_go_of_their_timer_wakers() {
    struct Task;
    impl std::task::Wake for Task {
        fn wake(self: Arc<Self>) {}
    }
    let task = Arc::new(Task);
    let waker = Waker::from(task.clone());
    let mut cx = Context::from_waker(&waker);
    let mut connections = Vec::new();
    for _ in 0..64 {
        let (mut ws, peer) = server_over_duplex(Config::default());
        assert!(ws.poll_recv(&mut cx).is_pending());
        connections.push((ws, peer));
    }
    assert!(Arc::strong_count(&task) >= 2 + 64, "no deadline registered");
    drop(connections);
    assert_eq!(Arc::strong_count(&task), 2);
}

/// A peer that reads slowly but steadily is alive: a send that waits for
/// room much longer than the keepalive's interval and timeout completes,
/// though the peer's pongs are not read meanwhile.
#[tokio::test(start_paused = true)]
async fn a_send_to_a_peer_that_reads_slowly_completes() {
    let (a, mut peer) = tokio::io::duplex(4096);
    let conn = Connection::new(
        Role::Server,
        Config::default(),
        None,
        tokio::time::Instant::now().into_std(),
    );
    let mut ws = WebSocket::from_parts(a, conn, &[], None, 64 * 1024);
    // 1 KiB a second: a 200 KiB message takes 200 s, five times the 40 s
    // of the default keepalive (20 s interval, 20 s timeout).
    let reading = tokio::spawn(async move {
        let mut total = 0usize;
        let mut buf = [0u8; 1024];
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            match peer.read(&mut buf).await {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n,
            }
        }
    });
    let started = tokio::time::Instant::now();
    let send = ws.send(Message::binary(vec![7u8; 200 * 1024])).await;
    assert!(send.is_ok(), "{send:?} after {:?}", started.elapsed());
    assert!(started.elapsed() > Duration::from_secs(150));
    drop(ws);
    assert!(reading.await.unwrap() >= 200 * 1024);
}

/// `Duration::MAX` as the close timeout means "never": the last writes to
/// a peer that reads nothing wait (no panic adding it to the clock).
#[tokio::test(start_paused = true)]
async fn a_close_timeout_of_duration_max_never_runs_out() {
    let (a, mut peer) = tokio::io::duplex(4096);
    let mut config = Config::default();
    config.close_timeout = Duration::MAX;
    let conn = Connection::new(
        Role::Server,
        config,
        None,
        tokio::time::Instant::now().into_std(),
    );
    let mut ws = WebSocket::from_parts(a, conn, &[], None, 64 * 1024);
    ws.feed(Message::binary(vec![0u8; 16 * 1024]))
        .await
        .unwrap();
    // The peer's close frame (masked, empty), then it reads nothing.
    peer.write_all(&[0x88, 0x80, 1, 2, 3, 4]).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(3600), ws.recv()).await;
    assert!(ended.is_err(), "ended: {ended:?}");
}
