//! `walkie connect`: stdin lines out, messages to stdout, and the exit codes
//! scripts rely on (0 ok, 1 connect, 2 usage, 3 timeout).

mod common;

use std::time::Duration;

use common::{Pki, Run, Server, run_walkie, s};

const LIMIT: Duration = Duration::from_secs(15);

fn connect(args: &[&str], stdin: &str) -> Run {
    let mut all = vec!["connect"];
    all.extend_from_slice(args);
    run_walkie(all, &[], Some(stdin.as_bytes()), LIMIT)
}

#[test]
fn one_line_to_chat() {
    let server = Server::start(&[]);
    let run = connect(&[&server.ws_url("/")], "hello\n");
    assert_eq!(run.code(), Some(0), "{run:?}");
    assert_eq!(run.stdout, "You said: hello\n", "{run:?}");
}

#[test]
fn three_lines_to_echo_in_order() {
    let server = Server::start(&[]);
    let run = connect(&[&server.ws_url("/echo")], "one\ntwo\nthree\n");
    assert_eq!(run.code(), Some(0), "{run:?}");
    assert_eq!(run.stdout, "one\ntwo\nthree\n", "{run:?}");
}

#[test]
fn binary_and_deflate_flags() {
    let server = Server::start(&[]);
    let run = connect(
        &[&server.ws_url("/echo"), "--binary", "--deflate"],
        "compressed binary\n",
    );
    assert_eq!(run.code(), Some(0), "{run:?}");
    assert_eq!(run.stdout, "compressed binary\n", "{run:?}");
}

#[test]
fn waiting_for_more_than_arrives_times_out_with_3() {
    let server = Server::start(&[]);
    let run = connect(
        &[&server.ws_url("/echo"), "-n", "2", "-t", "1s"],
        "only one\n",
    );
    assert_eq!(run.code(), Some(3), "{run:?}");
    assert_eq!(run.stdout, "only one\n", "{run:?}");
    assert!(
        run.elapsed >= Duration::from_millis(900) && run.elapsed < Duration::from_secs(5),
        "timed out after {:?}, expected about 1 s",
        run.elapsed
    );
    assert!(run.stderr.contains("timed out"), "{}", run.stderr);
}

#[test]
fn unreachable_port_exits_1() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let run = connect(&[&format!("ws://127.0.0.1:{port}/"), "-t", "3s"], "hi\n");
    assert_eq!(run.code(), Some(1), "{run:?}");
    assert!(!run.stderr.is_empty(), "no error message");
}

#[test]
fn not_a_url_exits_2() {
    let run = connect(&["not-a-url"], "");
    assert_eq!(run.code(), Some(2), "{run:?}");
    assert!(run.stderr.contains("not-a-url"), "{}", run.stderr);
}

#[test]
fn headers() {
    let server = Server::start(&[]);
    let url = server.ws_url("/echo");
    let run = connect(&[&url, "--header", "X-Test: 1"], "with a header\n");
    assert_eq!(run.code(), Some(0), "{run:?}");
    assert_eq!(run.stdout, "with a header\n");

    let run = connect(
        &[&url, "--header", "X-Test: 1", "--header", "no colon"],
        "x\n",
    );
    assert_eq!(run.code(), Some(2), "{run:?}");
    assert!(run.stderr.contains("--header"), "{}", run.stderr);
    assert!(run.stdout.is_empty(), "{run:?}");
}

#[test]
fn wss_with_ca_or_insecure_and_not_without() {
    let pki = Pki::generate();
    let server = pki.server();
    let url = format!("wss://localhost:{}/", server.port);

    let run = connect(&[&url, "--ca", s(&pki.ca())], "secure\n");
    assert_eq!(run.code(), Some(0), "--ca: {run:?}");
    assert_eq!(run.stdout, "You said: secure\n");

    let run = connect(&[&url, "-k"], "insecure\n");
    assert_eq!(run.code(), Some(0), "-k: {run:?}");
    assert_eq!(run.stdout, "You said: insecure\n");

    let run = connect(&[&url, "-t", "5s"], "untrusted\n");
    assert_eq!(run.code(), Some(1), "no --ca, no -k: {run:?}");
    assert!(run.stdout.is_empty(), "{run:?}");

    // --ca and -k together make no sense.
    let run = connect(&[&url, "-k", "--ca", s(&pki.ca())], "x\n");
    assert_eq!(run.code(), Some(2), "{run:?}");
}

#[test]
fn connection_closed_by_the_server_exits_4() {
    // `/` answers one message per message; waiting for 2 with a tiny
    // message limit gets the connection failed with 1009 instead.
    let server = Server::start(&["--max-message-size", "16"]);
    let run = connect(
        &[&server.ws_url("/"), "-n", "2", "-t", "5s"],
        "this line is longer than sixteen bytes\n",
    );
    assert_eq!(run.code(), Some(4), "{run:?}");
    assert!(run.stderr.contains("1009"), "{}", run.stderr);
}

#[test]
fn crlf_line_endings_are_stripped() {
    let server = Server::start(&[]);
    let run = connect(&[&server.ws_url("/echo")], "one\r\ntwo\r\n");
    assert_eq!(run.code(), Some(0), "{run:?}");
    assert_eq!(run.stdout, "one\ntwo\n", "{run:?}");
}

#[test]
fn invalid_utf8_on_stdin_is_refused_unless_binary() {
    let server = Server::start(&[]);
    let url = server.ws_url("/echo");
    let run = run_walkie(
        ["connect", url.as_str()],
        &[],
        Some(b"ok\n\xff\xfe\n"),
        LIMIT,
    );
    assert_eq!(run.code(), Some(2), "{run:?}");
    assert!(
        run.stderr.contains("line 2 is not valid UTF-8"),
        "{}",
        run.stderr
    );
    let run = run_walkie(
        ["connect", url.as_str(), "--binary"],
        &[],
        Some(b"\xff\xfe\n"),
        LIMIT,
    );
    assert_eq!(run.code(), Some(0), "{run:?}");
}

#[test]
fn server_closing_while_stdin_is_open_exits_4() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};

    // Every reply arrived, but stdin is still open: more lines could have
    // come, so the server closing first (1001 at its shutdown) is not a
    // finished exchange.
    let server = Server::start(&[]);
    let mut child = common::ChildGuard(
        Command::new(common::WALKIE)
            .args(["connect", server.ws_url("/echo").as_str()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start walkie connect"),
    );
    let mut stdin = child.0.stdin.take().unwrap();
    stdin.write_all(b"first\n").unwrap();
    stdin.flush().unwrap();
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let echoed = rx.recv_timeout(LIMIT).expect("no echo");
    assert_eq!(echoed, "first\n");

    server.signal("TERM");
    let deadline = std::time::Instant::now() + LIMIT;
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "walkie connect still running after the server closed"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(4), "{status}");
    drop(stdin);
}

#[test]
fn many_long_lines_to_echo_all_come_back() {
    // 64 lines of 1 MiB: more than the socket buffers of both directions
    // hold, so a client that stopped reading while a send waited for room
    // (and an echo server that stops reading while its answer waits) would
    // deadlock.
    const LINES: usize = 64;
    const LEN: usize = 1 << 20;
    let server = Server::start(&[]);
    let mut input = Vec::with_capacity(LINES * (LEN + 1));
    for i in 0..LINES {
        input.extend(std::iter::repeat_n(b'a' + (i % 26) as u8, LEN));
        input.push(b'\n');
    }
    let run = run_walkie(
        ["connect", server.ws_url("/echo").as_str(), "-t", "30s"],
        &[],
        Some(&input),
        Duration::from_secs(60),
    );
    assert_eq!(run.code(), Some(0), "stderr: {}", run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), LINES, "stderr: {}", run.stderr);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line.len(), LEN, "line {i}");
        assert!(
            line.bytes().all(|b| b == b'a' + (i % 26) as u8),
            "line {i} out of order or garbled"
        );
    }
}

#[test]
fn reads_while_a_send_waits_for_room() {
    // An echo server over small socket buffers that pauses before each
    // answer and writes it in full before reading on: meanwhile the
    // client's next line fills the buffers towards the server, and its send
    // waits for room, while the answer waits for the client to read. A
    // client that stopped reading while a send waited would never see its
    // first echo.
    const LINES: usize = 8;
    const LEN: usize = 1 << 20;
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_recv_buffer_size(64 * 1024).unwrap();
            socket.set_send_buffer_size(64 * 1024).unwrap();
            socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let listener = socket.listen(16).unwrap();
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            let (tcp, _) = listener.accept().await.unwrap();
            let mut ws = walkie::accept(tcp, &walkie::ServerConfig::default())
                .await
                .unwrap();
            while let Some(Ok(m)) = ws.recv().await {
                tokio::time::sleep(Duration::from_millis(300)).await;
                if ws.send(m).await.is_err() {
                    break;
                }
            }
        });
    });
    let addr = addr_rx.recv().unwrap();
    let mut input = Vec::with_capacity(LINES * (LEN + 1));
    for i in 0..LINES {
        input.extend(std::iter::repeat_n(b'a' + (i % 26) as u8, LEN));
        input.push(b'\n');
    }
    let run = run_walkie(
        ["connect", &format!("ws://{addr}/"), "-t", "20s"],
        &[],
        Some(&input),
        Duration::from_secs(30),
    );
    assert_eq!(run.code(), Some(0), "stderr: {}", run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), LINES, "stderr: {}", run.stderr);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line.len(), LEN, "line {i}");
        assert!(line.bytes().all(|b| b == b'a' + (i % 26) as u8), "line {i}");
    }
}

/// `--subscribe` with `--no-stdin` and `--count`: `-t` bounds the wait,
/// as without `--subscribe` (it waited for ever).
#[test]
fn subscribe_with_no_stdin_and_a_count_times_out_with_3() {
    let server = Server::start(&["--in-memory"]);
    let url = server.ws_url("/ws");
    let args = [
        "connect",
        "-s",
        "lobby",
        "--no-stdin",
        "-n",
        "1",
        "-t",
        "1s",
        &url,
    ];
    let run = run_walkie(args, &[], None, LIMIT);
    assert_eq!(run.code(), Some(3), "{run:?}");
    assert!(run.stderr.contains("timed out"), "{run:?}");
}

/// A refused subscription is an error even with nothing to send (it
/// exited 0 when stdin was empty).
#[test]
fn a_refused_subscription_with_empty_stdin_exits_4() {
    let server = Server::start(&["--in-memory"]);
    let run = connect(&["-s", "nons:x", &server.ws_url("/ws")], "");
    assert_eq!(run.code(), Some(4), "{run:?}");
    assert!(run.stderr.contains("cannot subscribe to nons:x"), "{run:?}");
    // And a subscription that is answered, with nothing to send, is done.
    let run = connect(&["-s", "lobby", &server.ws_url("/ws")], "");
    assert_eq!(run.code(), Some(0), "{run:?}");
}

/// A token the server refuses: exit 1 (could not connect) whether or not
/// a line was waiting to be published.
#[test]
fn a_refused_token_exits_1_with_or_without_lines() {
    let server = Server::start(&["--in-memory"]);
    let url = server.ws_url("/ws");
    let no_stdin = [
        "connect",
        "-s",
        "lobby",
        "--token",
        "abc",
        "--no-stdin",
        &url,
    ];
    let run = run_walkie(no_stdin, &[], None, LIMIT);
    assert_eq!(run.code(), Some(1), "{run:?}");
    let run = connect(&["-s", "lobby", "--token", "abc", &url], "1\n");
    assert_eq!(run.code(), Some(1), "{run:?}");
    assert!(run.stderr.contains("4001"), "{run:?}");
}

/// `--subscribe` to a URL that does not speak the Walkie protocol (no
/// `walkie.v1` subprotocol): exit 1 with why, not a timeout.
#[test]
fn subscribe_to_a_path_that_is_not_ws_exits_1_with_why() {
    let server = Server::start(&["--in-memory"]);
    let run = connect(&["-s", "lobby", "-t", "5s", &server.ws_url("/echo")], "1\n");
    assert_eq!(run.code(), Some(1), "{run:?}");
    assert!(run.stderr.contains("walkie.v1"), "{run:?}");
}
