//! `walkie serve` shuts down gracefully on SIGTERM and on SIGINT (Ctrl-C):
//! every client gets a close frame with 1001, and the process exits 0.

mod common;

use std::time::{Duration, Instant};

use common::{Server, joined, within};
use walkie::{CloseCode, MaybeTlsStream, Message, WebSocket};

async fn chat_client(server: &Server, name: &str) -> WebSocket<MaybeTlsStream> {
    let mut ws = walkie::connect(&server.ws_url("/")).await.unwrap();
    // A round trip, so the server has surely accepted it.
    ws.send(name).await.unwrap();
    assert_eq!(
        ws.recv().await.unwrap().unwrap(),
        Message::text(format!("You said: {name}"))
    );
    ws
}

async fn expect_going_away(ws: &mut WebSocket<MaybeTlsStream>, name: &str) {
    match ws.recv().await {
        None => {}
        other => panic!("{name}: expected the close, got {other:?}"),
    }
    let frame = ws
        .close_frame()
        .unwrap_or_else(|| panic!("{name}: no close frame"));
    assert_eq!(frame.code, CloseCode::GOING_AWAY, "{name}: {frame}");
}

async fn graceful_on(signal: &str, logged: &str) {
    let mut server = Server::start(&[]);
    let mut a = within(10, chat_client(&server, "a")).await;
    let mut b = within(10, chat_client(&server, "b")).await;

    let start = Instant::now();
    server.signal(signal);
    within(10, async {
        expect_going_away(&mut a, "client a").await;
        expect_going_away(&mut b, "client b").await;
    })
    .await;
    let status = server.wait_exit(Duration::from_secs(5)).unwrap_or_else(|| {
        panic!(
            "still running 5 s after SIG{signal}; log:\n{}",
            server.log_text()
        )
    });
    assert!(
        status.success(),
        "SIG{signal}: exit status {status}; log:\n{}",
        server.log_text()
    );
    assert!(start.elapsed() < Duration::from_secs(5));
    let log = server.log_text();
    assert!(log.contains(logged), "no {logged:?} in the log:\n{log}");
    assert!(
        log.contains("closing 2 connection(s) with 1001"),
        "the log does not count the 2 clients:\n{log}"
    );
}

#[tokio::test]
async fn sigterm_closes_clients_with_1001_and_exits_0() {
    graceful_on("TERM", "SIGTERM received").await;
}

#[tokio::test]
async fn sigint_closes_clients_with_1001_and_exits_0() {
    graceful_on("INT", "Ctrl-C received").await;
}

#[tokio::test]
async fn sigterm_with_no_clients_exits_0_at_once() {
    // With nothing to close, it must not sit out its (long) shutdown
    // deadline; the margin is wide so that a loaded machine cannot fail it.
    let mut server = Server::start(&["--shutdown-timeout", "60s"]);
    let start = Instant::now();
    server.signal("TERM");
    let status = server
        .wait_exit(Duration::from_secs(30))
        .expect("still running 30 s after SIGTERM: it waited for the shutdown deadline");
    assert!(status.success(), "exit status {status}");
    eprintln!("exited {:?} after SIGTERM", start.elapsed());
}

/// Sends SIGTERM to a server started with `--shutdown-timeout 60s` whose
/// client reads nothing, and checks that it exits 0 within 30 s (after the
/// 10 s close timeout), without logging that it gave up on a connection.
fn ends_before_its_deadline(server: &mut Server) {
    let start = Instant::now();
    server.signal("TERM");
    let status = server
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| {
            panic!(
                "still running 30 s after SIGTERM: the paused connection held it; log:\n{}",
                server.log_text()
            )
        });
    assert!(status.success(), "exit status {status}");
    let log = server.log_text();
    assert!(
        !log.contains("still open after"),
        "the paused connection outlived the shutdown deadline:\n{log}"
    );
    eprintln!("exited {:?} after SIGTERM", start.elapsed());
}

#[tokio::test]
async fn sigterm_ends_a_connection_paused_for_a_client_that_reads_nothing() {
    // An echo client that sends and never reads: the server's answers fill
    // the socket and its queue, and the connection pauses (it stops reading,
    // or waits for room to queue an answer). Shutdown must still end it (our
    // close frame cannot get through: after the close timeout, 10 s), not
    // sit out the 60 s shutdown deadline.
    let mut server = Server::start(&["--shutdown-timeout", "60s"]);
    let mut ws = walkie::connect(&server.ws_url("/echo")).await.unwrap();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = sent.clone();
    let flood = tokio::spawn(async move {
        let payload = vec![7u8; 64 * 1024];
        // Bounded: loopback buffers fill long before 64 MiB.
        for _ in 0..1024 {
            if ws.send(Message::binary(payload.clone())).await.is_err() {
                return;
            }
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        panic!("1024 messages of 64 KiB went through: the server never stopped reading");
    });
    // Paused: the count stops moving.
    within(30, async {
        let mut last = usize::MAX;
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = sent.load(std::sync::atomic::Ordering::Relaxed);
            if now == last && now > 0 {
                break;
            }
            last = now;
        }
    })
    .await;

    ends_before_its_deadline(&mut server);
    flood.abort();
}

#[tokio::test]
async fn sigterm_ends_a_room_member_that_reads_nothing_in_a_quiet_room() {
    // The member's socket is full and messages are still queued for it;
    // the room then goes quiet, so nothing but shutdown will wake the wait
    // for room. Shutdown must end it (after the close timeout, 10 s: our
    // close frame cannot get through), not sit out the 60 s deadline.
    let mut server = Server::start(&[
        "--in-memory",
        "--shutdown-timeout",
        "60s",
        "--client-queue",
        "100000",
        "--client-queue-bytes",
        "256M",
    ]);
    let _slow = common::RawWs::connect(server.port, "/rooms/quiet", "").await;
    let ws = walkie::connect(&server.ws_url("/rooms/quiet"))
        .await
        .unwrap();
    let (mut echoes, mut writer) = ws.split();
    let drain = tokio::spawn(async move { while let Some(Ok(_)) = echoes.recv().await {} });
    joined(&server, "", 2).await;
    // 25 MB: more than loopback buffers hold, less than the member's queue.
    let payload = vec![1u8; 64 * 1024];
    within(30, async {
        for _ in 0..400 {
            writer.send(Message::binary(payload.clone())).await.unwrap();
        }
    })
    .await;
    // The member is paused, waiting for room.
    tokio::time::sleep(Duration::from_secs(1)).await;

    ends_before_its_deadline(&mut server);
    drain.abort();
}
