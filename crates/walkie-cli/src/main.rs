//! The `walkie` binary.
//!
//! # Layout
//!
//! - `main.rs`: the command line (clap) and logging set-up.
//! - `serve.rs`: `walkie serve`: the listener, routing, graceful shutdown.
//! - `handlers.rs`: the WebSocket endpoints (`/` chat, `/echo`).
//! - `rooms.rs`: `/rooms/{name}`, rooms by URL on the hub.
//! - `ws.rs`: `/ws`, the Walkie protocol (`walkie_hub::Session`).
//! - `outbox.rs`: writing a connection's hub queue to its socket.
//! - `http.rs`: plain HTTP routes (the chat page, `/health`) on axum.
//! - `api.rs`: the HTTP API for backends (`/api/publish`, ...).
//! - `connect.rs`: `walkie connect`: a terminal client that works in pipes.
//! - `publish.rs`: `walkie publish`: a message through the HTTP API.
//! - `dashboard.rs`: the server's metrics and log tail, published for the
//!   dashboard demo.
//! - `limits.rs`: the open-file limit and `--max-connections`.
//! - `units.rs`: parsing sizes and durations given on the command line.

mod api;
mod connect;
mod dashboard;
mod handlers;
mod http;
mod limits;
mod outbox;
mod publish;
mod reload;
mod rooms;
mod serve;
mod shutdown;
mod units;
mod ws;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// A real-time WebSocket server and client.
///
/// With no command, `walkie` runs `walkie serve`: the seed's chat server on
/// 127.0.0.1:3000.
#[derive(Debug, Parser)]
#[command(name = "walkie", version, about, long_about = None)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// `walkie [serve options]` is `walkie serve [serve options]`.
    #[command(flatten)]
    serve: serve::ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the chat page and WebSocket endpoints (the default command).
    Serve(serve::ServeArgs),
    /// Connect to a WebSocket server: stdin lines out, messages to stdout.
    Connect(connect::ConnectArgs),
    /// Publish a message to a channel through a server's HTTP API.
    Publish(publish::PublishArgs),
}

fn init_logging(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("WALKIE_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(dashboard::LogTail);
    if json {
        registry.with(fmt.json()).init();
    } else {
        registry.with(fmt).init();
    }
}

/// Runs a client command on a single-threaded runtime.
///
/// The runtime is shut down without waiting for its blocking threads: a
/// read of stdin still pending there (the server closed first, or
/// `--count` was reached) would otherwise keep the process alive until
/// stdin ends.
fn block_on(f: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => {
            let code = rt.block_on(f);
            rt.shutdown_background();
            code
        }
        Err(e) => {
            eprintln!("walkie: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// jemalloc packs small and aligned allocations tighter than glibc: an idle connection
/// costs 1.1 KB of RSS with it, 1.4 KB without (docs/performance.md).
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The command line. `walkie connect` and `walkie publish` are parsed
/// without the `WALKIE_*` variables of the top level's copy of the serve
/// options: clap reads and checks them whatever the subcommand, and a
/// server's setting in the environment (`WALKIE_WORKERS=0`, say) must not
/// make a client command fail.
fn parse() -> Cli {
    let client = std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "connect" || a == "publish");
    if !client {
        return Cli::parse();
    }
    let command = Cli::command().mut_args(|a| a.env(None::<&str>));
    Cli::from_arg_matches(&command.get_matches()).unwrap_or_else(|e| e.exit())
}

fn main() -> ExitCode {
    let cli = parse();
    let command = cli.command.unwrap_or(Command::Serve(cli.serve));
    match command {
        Command::Serve(args) => {
            init_logging(args.log_json);
            serve::run(args)
        }
        Command::Connect(args) => block_on(connect::run(args)),
        Command::Publish(args) => block_on(publish::run(args)),
    }
}
