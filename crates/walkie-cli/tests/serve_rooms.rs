//! `walkie serve`, `/rooms/{name}`: every member's message goes to every
//! member, unchanged; `?history=N` replays the last N; history survives a
//! restart (or not, with `--in-memory`); a member that reads nothing is cut
//! off without slowing the others.

mod common;

use std::time::Duration;

use common::{RawWs, Server, http_exchange, joined, upgrade_request, within};
use tokio::io::AsyncWriteExt;
use walkie::{CloseCode, Message};

type Ws = walkie::WebSocket<walkie::MaybeTlsStream>;

async fn join(server: &Server, path: &str) -> Ws {
    walkie::connect(&server.ws_url(path)).await.unwrap()
}

async fn next(ws: &mut Ws) -> Message {
    tokio::time::timeout(Duration::from_secs(5), ws.recv())
        .await
        .expect("no message within 5 s")
        .expect("connection ended")
        .expect("connection failed")
}

#[tokio::test]
async fn members_see_each_others_messages_and_other_rooms_do_not() {
    let server = Server::start(&[]);
    within(20, async {
        let mut alice = join(&server, "/rooms/lobby").await;
        let mut bob = join(&server, "/rooms/lobby").await;
        let mut carol = join(&server, "/rooms/elsewhere").await;
        // Both members are in once the server logged both joins.
        joined(&server, "lobby", 2).await;

        alice.send("hi from alice").await.unwrap();
        assert_eq!(next(&mut bob).await, Message::text("hi from alice"));
        assert_eq!(
            next(&mut alice).await,
            Message::text("hi from alice"),
            "the sender too"
        );

        bob.send(Message::binary(vec![0u8, 1, 2, 255]))
            .await
            .unwrap();
        for ws in [&mut alice, &mut bob] {
            let m = next(ws).await;
            assert!(!m.is_text(), "binary stays binary");
            assert_eq!(m.as_bytes(), [0, 1, 2, 255]);
        }

        carol.send("only here").await.unwrap();
        assert_eq!(next(&mut carol).await, Message::text("only here"));
        alice.send("after").await.unwrap();
        assert_eq!(
            next(&mut bob).await,
            Message::text("after"),
            "nothing from the other room"
        );
        for ws in [&mut alice, &mut bob, &mut carol] {
            ws.close(CloseCode::NORMAL, "").await.unwrap();
        }
    })
    .await;
}

async fn say(server: &Server, room: &str, lines: &[&str]) {
    let mut ws = join(server, room).await;
    for line in lines {
        ws.send(*line).await.unwrap();
        // Our own copy comes back once the message is stored.
        assert_eq!(next(&mut ws).await, Message::text(*line));
    }
    ws.close(CloseCode::NORMAL, "").await.unwrap();
}

async fn replay(server: &Server, path: &str, n: usize) -> Vec<String> {
    let mut ws = join(server, path).await;
    let mut got = Vec::new();
    for _ in 0..n {
        got.push(next(&mut ws).await.as_text().unwrap().to_owned());
    }
    // Nothing more than asked for.
    let extra = tokio::time::timeout(Duration::from_millis(300), ws.recv()).await;
    assert!(extra.is_err(), "unexpected extra message: {extra:?}");
    got
}

#[tokio::test]
async fn a_late_joiner_gets_the_last_n_messages() {
    let server = Server::start(&[]);
    within(20, async {
        say(&server, "/rooms/news", &["one", "two", "three", "four"]).await;
        assert_eq!(
            replay(&server, "/rooms/news?history=2", 2).await,
            ["three", "four"]
        );
        assert_eq!(
            replay(&server, "/rooms/news?history=10", 4).await,
            ["one", "two", "three", "four"]
        );
        assert!(replay(&server, "/rooms/news", 0).await.is_empty());
    })
    .await;
}

#[tokio::test]
async fn history_survives_a_restart_unless_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    within(40, async {
        {
            let server = Server::start(&["--data-dir", data]);
            say(&server, "/rooms/keep", &["before the restart"]).await;
            server.signal("TERM");
        }
        let server = Server::start(&["--data-dir", data]);
        assert_eq!(
            replay(&server, "/rooms/keep?history=5", 1).await,
            ["before the restart"]
        );
        drop(server);

        let mut volatile = Server::start(&["--in-memory"]);
        say(&volatile, "/rooms/keep", &["gone"]).await;
        volatile.signal("TERM");
        assert!(volatile.wait_exit(Duration::from_secs(10)).is_some());
        let volatile = Server::start(&["--in-memory"]);
        assert!(
            replay(&volatile, "/rooms/keep?history=5", 0)
                .await
                .is_empty()
        );
    })
    .await;
}

#[tokio::test]
async fn a_data_dir_in_use_is_refused_with_a_message_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let _first = Server::start(&["--data-dir", data]);
    let run = common::run_walkie(
        ["serve", "--bind", "127.0.0.1:0", "--data-dir", data],
        &[],
        None,
        Duration::from_secs(10),
    );
    assert_eq!(run.code(), Some(2), "{run:?}");
    assert!(run.stderr.contains("--data-dir"), "{}", run.stderr);
    assert!(run.stderr.contains("in use"), "{}", run.stderr);
}

#[tokio::test]
async fn bad_room_paths_get_a_400_that_says_why() {
    let server = Server::start(&[]);
    within(10, async {
        for (path, needle) in [
            ("/rooms/", "1 to 64"),
            ("/rooms/a%20b", "letters, digits"),
            ("/rooms/a/b", "letters, digits"),
            ("/rooms/ok?history=lots", "history="),
            ("/rooms/ok?history=101", "0 to 100"),
        ] {
            let r = http_exchange(server.port, upgrade_request(path, "").as_bytes()).await;
            assert_eq!(r.status, 400, "{path}: {r:?}");
            assert!(r.body.contains(needle), "{path}: {}", r.body);
        }
    })
    .await;
}

/// A member that never reads fills its socket and then its queue; it is
/// disconnected, the server's memory stays bounded, and the others keep
/// getting every message.
#[tokio::test]
async fn a_member_that_reads_nothing_is_cut_off_and_the_others_are_not() {
    // Limits small enough that the member reading nothing overflows within
    // the run (32 MB sent), large enough (128 messages of 16 KiB) that the
    // member that does read is not cut off when the machine is busy.
    let server = Server::start(&["--client-queue", "256", "--client-queue-bytes", "2M"]);
    within(60, async {
        let mut slow = RawWs::connect(server.port, "/rooms/busy", "").await;
        let mut reader = join(&server, "/rooms/busy").await;
        // The writer is a member too: its own copies are drained aside.
        let (mut echoes, mut writer) = join(&server, "/rooms/busy").await.split();
        let drain = tokio::spawn(async move { while let Some(Ok(_)) = echoes.recv().await {} });
        // All three are members before the first message (under load a
        // subscription can trail its handshake, and the reader would then
        // rightly miss the first messages).
        joined(&server, "busy", 3).await;
        let _ = slow.stream.flush().await;
        let payload = "x".repeat(16 * 1024);
        let total = 2000;
        let send = async {
            for _ in 0..total {
                writer.send(payload.as_str()).await.unwrap();
            }
        };
        let receive = async {
            for i in 0..total {
                // History is durable: on a busy disk one group commit's
                // fsync can hold delivery up for seconds.
                let m = tokio::time::timeout(Duration::from_secs(30), reader.recv())
                    .await
                    .unwrap_or_else(|_| panic!("message {i}: nothing within 30 s"))
                    .expect("connection ended")
                    .expect("connection failed");
                assert_eq!(m.len(), payload.len(), "message {i}");
            }
        };
        tokio::join!(send, receive);
        assert!(
            server.wait_log(&["left room", "too slow"]).is_some(),
            "the slow member was not cut off; log:\n{}",
            server.log_text()
        );
        // What the slow member can still read ends: with 1013 if the close
        // frame fit in its socket, or with the connection closed.
        let mut frames = 0usize;
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(f) = slow.read_frame().await {
                if f.opcode == 0x8 {
                    assert_eq!(&f.payload[..2], &1013u16.to_be_bytes());
                    return;
                }
                frames += 1;
            }
        })
        .await;
        assert!(
            ended.is_ok(),
            "the slow member's connection did not end (read {frames} frames)"
        );
        assert!(frames < total, "it got {frames} of {total}: not cut off");
        let _ = writer.close(CloseCode::NORMAL, "").await;
        let _ = drain.await;
    })
    .await;
}

/// A member that stops reading for a while makes the server wait for
/// socket room in the middle of a batch; once it reads again it gets every
/// message, in order, once.
#[tokio::test]
async fn a_member_that_pauses_reading_catches_up_in_order() {
    let server = Server::start(&[
        "--in-memory",
        "--client-queue",
        "100000",
        "--client-queue-bytes",
        "64M",
    ]);
    within(60, async {
        let mut paused = RawWs::connect(server.port, "/rooms/pause", "").await;
        let (mut echoes, mut writer) = join(&server, "/rooms/pause").await.split();
        let drain = tokio::spawn(async move { while let Some(Ok(_)) = echoes.recv().await {} });
        joined(&server, "pause", 2).await;
        // 12 MB: far more than the socket buffers and the server's write
        // high-water mark, so the server has to wait for room many times.
        let total = 1500u32;
        let filler = vec![b'y'; 8 * 1024];
        for i in 0..total {
            let mut m = i.to_be_bytes().to_vec();
            m.extend_from_slice(&filler);
            writer.send(m).await.unwrap();
        }
        // Still not reading: the server is stuck mid-batch by now.
        tokio::time::sleep(Duration::from_millis(300)).await;
        for i in 0..total {
            let f = tokio::time::timeout(Duration::from_secs(20), paused.read_frame())
                .await
                .unwrap_or_else(|_| panic!("message {i}: nothing within 20 s"))
                .unwrap_or_else(|| panic!("message {i}: the connection ended"));
            assert_eq!(f.opcode, 0x2, "message {i}");
            assert_eq!(f.payload.len(), 4 + filler.len(), "message {i}");
            let n = u32::from_be_bytes(f.payload[..4].try_into().unwrap());
            assert_eq!(n, i, "out of order, lost or repeated");
        }
        let _ = writer.close(CloseCode::NORMAL, "").await;
        drain.abort();
    })
    .await;
}

/// Fan-out writes a member's socket from the room's own loop when the
/// member is on the publisher's thread, and through the member's queue
/// otherwise (see `rooms::Shared`). With four worker threads, members and
/// writers land on different threads, so both paths run side by side and a
/// member switches between them as its queue fills and drains: every member
/// still gets every writer's messages, each writer's in order, once.
#[tokio::test]
async fn members_on_every_thread_get_every_message_in_order() {
    // Queues long enough that a member's reader, one of 24 in the test's
    // one thread, is never cut off as a slow consumer.
    let server = Server::start(&[
        "--in-memory",
        "--workers",
        "4",
        "--client-queue",
        "100000",
        "--client-queue-bytes",
        "64M",
    ]);
    within(60, async {
        let members = 24;
        let writers = 3;
        let per_writer = 400u32;
        let mut readers = Vec::new();
        for _ in 0..members {
            readers.push(join(&server, "/rooms/mixed").await);
        }
        let mut outs = Vec::new();
        let mut drains = Vec::new();
        for _ in 0..writers {
            // A writer is a member too: its copies are drained aside.
            let (mut echoes, writer) = join(&server, "/rooms/mixed").await.split();
            drains.push(tokio::spawn(async move {
                while let Some(Ok(_)) = echoes.recv().await {}
            }));
            outs.push(writer);
        }
        joined(&server, "mixed", members + writers).await;
        let sends = outs.into_iter().enumerate().map(|(w, mut writer)| {
            tokio::spawn(async move {
                for i in 0..per_writer {
                    // Bursts of 50, so that batches of many messages form.
                    if i % 50 == 0 {
                        writer.send(format!("{w}:{i}")).await.unwrap();
                    } else {
                        writer.feed(format!("{w}:{i}")).await.unwrap();
                    }
                }
                writer.flush().await.unwrap();
                writer
            })
        });
        let sends: Vec<_> = sends.collect();
        let checks = readers.into_iter().enumerate().map(|(r, mut ws)| {
            tokio::spawn(async move {
                let mut next_of = vec![0u32; writers];
                for _ in 0..writers as u32 * per_writer {
                    let m = next(&mut ws).await;
                    let text = m.as_text().expect("text stays text");
                    let (w, i) = text.split_once(':').expect("a numbered message");
                    let (w, i): (usize, u32) = (w.parse().unwrap(), i.parse().unwrap());
                    assert_eq!(
                        i, next_of[w],
                        "member {r}: writer {w}'s messages lost, repeated or out of order"
                    );
                    next_of[w] += 1;
                }
                let extra = tokio::time::timeout(Duration::from_millis(200), ws.recv()).await;
                assert!(extra.is_err(), "member {r}: an extra message: {extra:?}");
            })
        });
        let checks: Vec<_> = checks.collect();
        for check in checks {
            if let Err(e) = check.await {
                panic!("{e}; server log:\n{}", server.log_text());
            }
        }
        for send in sends {
            let mut writer = send.await.unwrap();
            let _ = writer.close(CloseCode::NORMAL, "").await;
        }
        for drain in drains {
            drain.abort();
        }
    })
    .await;
}

/// On the default (durable) engine a member's burst is published as one
/// batch: every message of a burst that ends with the sender's close
/// reaches the others, in order, and is kept in history.
#[tokio::test]
async fn a_burst_ended_by_a_close_is_published_whole_and_in_order() {
    let server = Server::start(&["--room-history", "1000"]);
    within(30, async {
        let mut reader = join(&server, "/rooms/burst").await;
        let mut writer = join(&server, "/rooms/burst").await;
        joined(&server, "burst", 2).await;
        let count = 600;
        for i in 0..count {
            writer.feed_now(format!("b{i}")).unwrap();
        }
        // The close goes out behind the burst, in the same writes.
        writer.start_close(CloseCode::NORMAL, "done").unwrap();
        writer.flush().await.unwrap();
        for i in 0..count {
            assert_eq!(next(&mut reader).await, Message::text(format!("b{i}")));
        }
        drop(writer);
        let mut late = join(&server, "/rooms/burst?history=1000").await;
        for i in 0..count {
            assert_eq!(
                next(&mut late).await,
                Message::text(format!("b{i}")),
                "kept in history, in order"
            );
        }
    })
    .await;
}
