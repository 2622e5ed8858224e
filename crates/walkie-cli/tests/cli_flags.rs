//! The command line: help texts, usage errors (exit 2 naming the flag), the
//! environment variables, and a port already in use.

mod common;

use std::time::Duration;

use common::{Run, Server, run_walkie, within};

const LIMIT: Duration = Duration::from_secs(10);

fn walkie(args: &[&str]) -> Run {
    run_walkie(args, &[("WALKIE_LOG", "info")], None, LIMIT)
}

fn assert_mentions(run: &Run, words: &[&str]) {
    assert_eq!(run.code(), Some(0), "{run:?}");
    for w in words {
        assert!(
            run.stdout.contains(w),
            "help does not mention {w}:\n{}",
            run.stdout
        );
    }
}

#[test]
fn top_level_help() {
    let run = walkie(&["--help"]);
    assert_mentions(&run, &["serve", "connect", "--bind", "--help", "--version"]);
}

#[test]
fn serve_help() {
    let run = walkie(&["serve", "--help"]);
    assert_mentions(
        &run,
        &[
            "--bind",
            "--tls-cert",
            "--tls-key",
            "--max-message-size",
            "--max-frame-size",
            "--no-deflate",
            "--ping-interval",
            "--idle-timeout",
            "--handshake-timeout",
            "--shutdown-timeout",
            "--log-json",
            "WALKIE_BIND",
        ],
    );
}

#[test]
fn connect_help() {
    let run = walkie(&["connect", "--help"]);
    assert_mentions(
        &run,
        &[
            "--count",
            "--timeout",
            "--no-stdin",
            "--binary",
            "--protocol",
            "--header",
            "--deflate",
            "--ca",
            "--insecure",
        ],
    );
}

#[test]
fn version() {
    let run = walkie(&["--version"]);
    assert_eq!(run.code(), Some(0), "{run:?}");
    assert!(run.stdout.starts_with("walkie "), "{}", run.stdout);
}

#[test]
fn bad_size_names_the_flag() {
    let run = walkie(&[
        "serve",
        "--bind",
        "127.0.0.1:0",
        "--max-message-size",
        "12X",
    ]);
    assert_eq!(run.code(), Some(2), "{run:?}");
    assert!(run.stderr.contains("--max-message-size"), "{}", run.stderr);
    assert!(run.stderr.contains("12X"), "{}", run.stderr);
}

#[test]
fn bad_duration_names_the_flag() {
    let run = walkie(&[
        "serve",
        "--bind",
        "127.0.0.1:0",
        "--handshake-timeout",
        "5 days",
    ]);
    assert_eq!(run.code(), Some(2), "{run:?}");
    assert!(run.stderr.contains("--handshake-timeout"), "{}", run.stderr);
}

#[test]
fn bad_bind_names_the_flag() {
    let run = walkie(&["serve", "--bind", "nonsense"]);
    assert_eq!(run.code(), Some(2), "{run:?}");
    assert!(run.stderr.contains("--bind"), "{}", run.stderr);
    assert!(run.stderr.contains("nonsense"), "{}", run.stderr);
}

#[test]
fn bad_env_value_names_the_flag() {
    let run = run_walkie(
        ["serve", "--bind", "127.0.0.1:0"],
        &[("WALKIE_MAX_MESSAGE_SIZE", "lots")],
        None,
        LIMIT,
    );
    assert_eq!(run.code(), Some(2), "{run:?}");
    assert!(run.stderr.contains("--max-message-size"), "{}", run.stderr);
}

#[tokio::test]
async fn walkie_bind_env_is_honoured_with_no_arguments() {
    let no_args: [&str; 0] = [];
    let mut server = Server::spawn(no_args, &[("WALKIE_BIND", "127.0.0.1:0")]);
    assert_ne!(server.port, 3000, "WALKIE_BIND was ignored");
    assert_ne!(server.port, 0);
    within(10, server.assert_serves("WALKIE_BIND")).await;
}

#[tokio::test]
async fn env_options_are_honoured() {
    // WALKIE_MAX_MESSAGE_SIZE=64: a longer message fails with 1009.
    let mut server = Server::spawn(
        ["serve"],
        &[
            ("WALKIE_BIND", "127.0.0.1:0"),
            ("WALKIE_MAX_MESSAGE_SIZE", "64"),
        ],
    );
    within(10, async {
        let mut ws = walkie::connect(&server.ws_url("/echo")).await.unwrap();
        ws.send("x".repeat(100)).await.unwrap();
        match ws.recv().await {
            Some(Err(_)) | None => {}
            other => panic!("a 100-byte message over a 64-byte limit got {other:?}"),
        }
        assert_eq!(ws.close_frame().map(|f| f.code.0), Some(1009));
        server.assert_serves("WALKIE_MAX_MESSAGE_SIZE").await;
    })
    .await;
}

#[test]
fn port_in_use_names_bind() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let run = walkie(&["serve", "--bind", &addr]);
    assert_ne!(run.code(), Some(0), "{run:?}");
    assert!(run.code().is_some(), "killed by a signal: {run:?}");
    assert!(run.stderr.contains("--bind"), "{}", run.stderr);
    assert!(run.stderr.contains(&addr), "{}", run.stderr);
    drop(taken);
}

#[test]
fn unknown_flag_is_a_usage_error() {
    let run = walkie(&["serve", "--no-such-flag"]);
    assert_eq!(run.code(), Some(2), "{run:?}");
    assert!(run.stderr.contains("--no-such-flag"), "{}", run.stderr);
}

#[test]
fn startup_errors_show_even_with_logging_off() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let run = run_walkie(
        ["serve", "--bind", addr.as_str()],
        &[("WALKIE_LOG", "off")],
        None,
        LIMIT,
    );
    assert_ne!(run.code(), Some(0), "{run:?}");
    assert!(run.stderr.contains("--bind"), "{run:?}");

    let run = run_walkie(
        [
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--tls-cert",
            "/nonexistent/cert.pem",
            "--tls-key",
            "/nonexistent/key.pem",
        ],
        &[("WALKIE_LOG", "off")],
        None,
        LIMIT,
    );
    assert_eq!(run.code(), Some(2), "{run:?}");
    assert!(run.stderr.contains("--tls-cert"), "{run:?}");
    drop(taken);
}

#[test]
fn zero_timeouts_are_refused_naming_the_flag() {
    // A zero handshake timeout would answer every request with 408.
    for (flag, zero) in [
        ("--handshake-timeout", "0"),
        ("--handshake-timeout", "0s"),
        ("--ping-timeout", "0ms"),
        ("--room-history-ttl", "0"),
    ] {
        let run = walkie(&["serve", "--bind", "127.0.0.1:0", "--in-memory", flag, zero]);
        assert_eq!(run.code(), Some(2), "{flag} {zero}: {run:?}");
        assert!(run.stderr.contains(flag), "{flag} {zero}: {}", run.stderr);
        assert!(run.stderr.contains("more than 0"), "{}", run.stderr);
    }
    for command in [
        &["connect", "ws://127.0.0.1:9/", "-t", "0"][..],
        &["publish", "news", "1", "--timeout", "0s"][..],
    ] {
        let run = walkie(command);
        assert_eq!(run.code(), Some(2), "{command:?}: {run:?}");
        assert!(run.stderr.contains("--timeout"), "{}", run.stderr);
    }
}

#[test]
fn size_errors_say_what_is_wrong() {
    for (value, says) in [
        ("1.5M", "whole numbers"),
        ("99999999999999999999999", "too large"),
        ("99999999999G", "too large"),
    ] {
        let run = walkie(&["serve", "--bind", "127.0.0.1:0", "--max-frame-size", value]);
        assert_eq!(run.code(), Some(2), "{value}: {run:?}");
        assert!(run.stderr.contains("--max-frame-size"), "{}", run.stderr);
        assert!(run.stderr.contains(says), "{value}: {}", run.stderr);
    }
}

#[test]
fn publish_url_without_a_port_means_port_80() {
    // Whatever answers on port 80 (usually nobody), `localhost` with no
    // port is a place to connect to, not "an invalid socket address".
    let run = walkie(&[
        "publish",
        "--url",
        "http://localhost",
        "-t",
        "3s",
        "news",
        "1",
    ]);
    assert_eq!(run.code(), Some(1), "{run:?}");
    assert!(
        !run.stderr.contains("invalid socket address"),
        "{}",
        run.stderr
    );
    let run = walkie(&["publish", "--url", "http://localhost:", "news", "1"]);
    assert_eq!(run.code(), Some(2), "{run:?}");
    assert!(
        run.stderr.contains("--url") && run.stderr.contains("port"),
        "{}",
        run.stderr
    );
}

/// A server's settings in the environment are not checked for the client
/// commands (clap checked the top level's copy of the serve options
/// whatever the subcommand).
#[test]
fn serve_settings_in_the_environment_do_not_break_client_commands() {
    let envs = [("WALKIE_WORKERS", "0"), ("WALKIE_IN_MEMORY", "1")];
    let run = run_walkie(
        ["connect", "ws://127.0.0.1:1/echo", "--no-stdin"],
        &envs,
        None,
        Duration::from_secs(10),
    );
    assert!(!run.stderr.contains("--workers"), "{}", run.stderr);
    assert!(run.stderr.contains("127.0.0.1:1"), "{}", run.stderr);
    let run = run_walkie(["serve"], &envs, None, Duration::from_secs(10));
    assert_eq!(run.code(), Some(2), "{run:?}");
    assert!(run.stderr.contains("--workers"), "{}", run.stderr);
}

/// Boolean environment variables take the usual spellings (`1`, `yes`,
/// `on`, `0`, `no`, `off`...), and one that says false does not count as
/// the flag: `WALKIE_IN_MEMORY=0` with `--data-dir` is no conflict.
#[tokio::test]
async fn boolean_env_values_take_the_usual_spellings() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    for value in ["1", "yes", "on"] {
        let run = run_walkie(
            ["serve", "--bind", "127.0.0.1:0", "--data-dir", data],
            &[("WALKIE_IN_MEMORY", value)],
            None,
            LIMIT,
        );
        assert_eq!(run.code(), Some(2), "{value}: {run:?}");
        assert!(
            run.stderr
                .contains("--in-memory cannot be used with --data-dir"),
            "{value}: {run:?}"
        );
    }
    for value in ["0", "off", "no"] {
        let envs = [("WALKIE_IN_MEMORY", value), ("WALKIE_NO_DEFLATE", value)];
        let mut server = Server::spawn(
            ["serve", "--bind", "127.0.0.1:0", "--data-dir", data],
            &envs,
        );
        within(10, server.assert_serves(value)).await;
    }
    let run = run_walkie(
        ["serve", "--bind", "127.0.0.1:0"],
        &[("WALKIE_LOG_JSON", "maybe")],
        None,
        LIMIT,
    );
    assert_eq!(run.code(), Some(2), "{run:?}");
    assert!(run.stderr.contains("--log-json"), "{run:?}");
}

/// An engine error is one line naming the flag, even where the client's
/// error spans several (Redis's parser, answered by a NATS server).
#[test]
fn an_engine_that_speaks_another_protocol_is_one_line_naming_the_flag() {
    let Ok(nats) = std::env::var("WALKIE_TEST_NATS") else {
        eprintln!("SKIPPED: set WALKIE_TEST_NATS to run it");
        return;
    };
    let address = nats.trim_start_matches("nats://");
    let engine = format!("redis://{address}");
    let run = walkie(&["serve", "--bind", "127.0.0.1:0", "--engine", &engine]);
    assert_eq!(run.code(), Some(2), "{run:?}");
    assert!(run.stderr.starts_with("walkie: --engine"), "{run:?}");
    assert_eq!(run.stderr.trim_end().lines().count(), 1, "{run:?}");
}
