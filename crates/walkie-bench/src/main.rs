//! `walkie-bench`: the load generator and the benchmark suite.
//!
//! # Layout
//!
//! - `wire.rs`: the handshake, pre-encoded masked frames, header-only
//!   counting of replies (independent of walkie-proto).
//! - `load.rs`: one load run: many connections on one thread, closed loop or
//!   fixed rate, latency in an HDR histogram.
//! - `fanout.rs`: one publisher and many subscribers in one room, at a fixed
//!   publish rate: deliveries, losses, publish-to-delivery latency.
//! - `idle.rs`: many idle connections, held while the suite reads memory.
//! - `procfs.rs`: a server's CPU time (the kernel's process CPU clock, to
//!   the nanosecond) and resident memory (/proc).
//! - `peers.rs`: the servers compared, how each is built and started.
//! - `suite.rs`: every case against every peer, pinned cores, medians,
//!   the Markdown table.

mod fanout;
mod idle;
mod load;
mod peers;
mod procfs;
mod suite;
mod threads;
mod wire;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Measures WebSocket servers: walkie against the best peers.
#[derive(Debug, Parser)]
#[command(name = "walkie-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every case against every peer and print one table (the default
    /// way to use this tool).
    Suite(SuiteArgs),
    /// Load one server: echo messages and measure throughput and latency.
    Load(LoadArgs),
    /// Fan-out: one publisher and many subscribers in one room; measure
    /// deliveries, losses and publish-to-delivery latency.
    Fanout(FanoutArgs),
    /// Print the CPU time of processes so far (user plus system, all
    /// threads, exited ones included), in seconds to the nanosecond, one
    /// line each: for scripts that sample a server over a window.
    CpuTime(CpuTimeArgs),
}

#[derive(Debug, Args)]
struct CpuTimeArgs {
    /// Process ids.
    #[arg(required = true)]
    pids: Vec<u32>,
}

#[derive(Debug, Args)]
struct SuiteArgs {
    /// Peers to compare (comma-separated), from: walkie, walkie-durable (the
    /// default engine, fan-out and idle-room cases only), uws,
    /// fastwebsockets, yawc, tungstenite, tokio-websockets, ws, python,
    /// reflector.
    #[arg(long, value_delimiter = ',', default_value = "all")]
    peers: Vec<String>,
    /// Cases to run (comma-separated ids, or `all`); `--list` shows them.
    #[arg(long, value_delimiter = ',', default_value = "all")]
    cases: Vec<String>,
    /// Runs per case and peer; the table shows the median and the spread.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Measured seconds per run.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Unmeasured warm-up before each run.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,
    /// One run of 2 s per case: a quick look, not a result.
    #[arg(long)]
    quick: bool,
    /// The core the server is pinned to.
    #[arg(long, default_value_t = 0)]
    server_cpu: usize,
    /// The core the load generator is pinned to.
    #[arg(long, default_value_t = 1)]
    load_cpu: usize,
    /// The cores the load generator is pinned to instead, as `taskset -c`
    /// takes them (e.g. 1-15): it then runs one thread per core, so that
    /// it is not the bottleneck on a many-core machine.
    #[arg(long, conflicts_with = "load_cpu")]
    load_cpus: Option<String>,
    /// Where logs and results go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Do not build or install anything first.
    #[arg(long)]
    no_build: bool,
    /// List the cases and exit.
    #[arg(long)]
    list: bool,
}

#[derive(Debug, Args)]
struct LoadArgs {
    /// The server's address.
    #[arg(long)]
    addr: SocketAddr,
    /// The WebSocket path.
    #[arg(long, default_value = "/echo")]
    path: String,
    /// Connections.
    #[arg(long, default_value_t = 100)]
    conns: usize,
    /// Message size in bytes.
    #[arg(long, default_value_t = 32)]
    size: usize,
    /// Send binary messages (default: text).
    #[arg(long)]
    binary: bool,
    /// Offer permessage-deflate and send compressed messages.
    #[arg(long)]
    deflate: bool,
    /// Messages outstanding per connection (closed loop).
    #[arg(long, default_value_t = 1, conflicts_with = "rate")]
    in_flight: usize,
    /// Total messages per second, at a fixed rate (open loop).
    #[arg(long)]
    rate: Option<f64>,
    /// Unmeasured warm-up.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,
    /// Measured time.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Local source addresses, e.g. 127.0.0.2-127.0.0.41.
    #[arg(long, value_parser = parse_sources)]
    sources: Option<Sources>,
    /// Print `start` / `end` lines around the measured window.
    #[arg(long)]
    announce: bool,
    /// Open the connections and hold them idle until stdin closes.
    #[arg(long)]
    idle: bool,
    /// With `--idle` on a `/ws` path: each connection speaks the Walkie
    /// protocol, connects anonymously and subscribes to this channel
    /// before it idles.
    #[arg(long, requires = "idle")]
    channel: Option<String>,
    /// Threads, each with its share of the connections (and of `--rate`),
    /// all starting together; their results are merged.
    #[arg(long, default_value_t = 1, conflicts_with = "idle", value_parser = clap::value_parser!(u16).range(1..))]
    threads: u16,
}

#[derive(Debug, Args)]
struct FanoutArgs {
    /// The server's address; several (comma-separated) for nodes of one
    /// cluster: the connections are spread over them in turn.
    #[arg(long, value_delimiter = ',', required = true)]
    addr: Vec<SocketAddr>,
    /// The WebSocket path of the room (every connection to it is a member);
    /// with --channel, of the Walkie protocol. Default: /rooms/fanout, or
    /// /ws with --channel.
    #[arg(long)]
    path: Option<String>,
    /// Use the Walkie protocol (docs/protocol.md) instead of a room: every
    /// subscriber subscribes to this channel, and the publisher sends
    /// `publish` commands whose `data` is a string of --size characters.
    #[arg(long)]
    channel: Option<String>,
    /// Subscriber connections (the publisher is one more).
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Messages published per second, at a fixed rate.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Message size in bytes (16 to 65535: the first 16 carry a sequence
    /// number and the send time).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Unmeasured warm-up, after every connection is open.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,
    /// Measured time.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// After the window, time given to the window's messages still in
    /// flight before the missing ones count as lost.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    grace: Duration,
    /// Local source addresses, e.g. 127.0.0.2-127.0.0.41.
    #[arg(long, value_parser = parse_sources)]
    sources: Option<Sources>,
    /// Print `start` / `end` lines around the measured window.
    #[arg(long)]
    announce: bool,
    /// Threads to spread the subscribers over (the publisher runs on the
    /// first); their results are merged.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    threads: u16,
}

#[derive(Debug, Clone)]
struct Sources(Vec<IpAddr>);

fn parse_sources(s: &str) -> Result<Sources, String> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let a: Ipv4Addr = a.trim().parse().map_err(|e| format!("{a}: {e}"))?;
    let b: Ipv4Addr = b.trim().parse().map_err(|e| format!("{b}: {e}"))?;
    let (a, b) = (u32::from(a), u32::from(b));
    if b < a || b - a > 1000 {
        return Err("expected a range of at most 1000 addresses, low-high".into());
    }
    Ok(Sources(
        (a..=b).map(|x| IpAddr::V4(Ipv4Addr::from(x))).collect(),
    ))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, mult) = if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 10s, 500ms)"))?;
    if !(0.0..=3600.0).contains(&(v * mult)) {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(Duration::from_secs_f64(v * mult))
}

fn run_load(args: LoadArgs) -> ExitCode {
    procfs::raise_fd_limit();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("walkie-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let sources = args.sources.map(|s| s.0).unwrap_or_default();
    if args.idle {
        let spec = idle::Spec {
            addr: args.addr,
            path: args.path,
            conns: args.conns,
            sources,
            channel: args.channel,
        };
        runtime.block_on(idle::run(spec));
        return ExitCode::SUCCESS;
    }
    let mode = match args.rate {
        Some(per_second) if per_second > 0.0 => load::Mode::FixedRate { per_second },
        Some(_) => {
            eprintln!("walkie-bench: --rate must be positive");
            return ExitCode::from(2);
        }
        None => load::Mode::ClosedLoop {
            in_flight: args.in_flight.max(1),
        },
    };
    let spec = load::Spec {
        addr: args.addr,
        path: args.path,
        conns: args.conns.max(1),
        size: args.size,
        binary: args.binary,
        deflate: args.deflate,
        mode,
        warmup: args.warmup,
        duration: args.duration,
        sources,
        announce: args.announce,
    };
    let outcome = if args.threads > 1 {
        drop(runtime);
        match load::run_threads(spec, usize::from(args.threads)) {
            Ok(o) => o,
            Err(e) => {
                eprintln!("walkie-bench: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        runtime.block_on(load::run(spec))
    };
    println!("{}", serde_json::to_string(&outcome).unwrap_or_default());
    ExitCode::SUCCESS
}

/// Checks the fan-out flags; the error names the flag.
fn fanout_spec(args: FanoutArgs) -> Result<fanout::Spec, String> {
    if !(1..=100_000).contains(&args.subscribers) {
        return Err(format!(
            "--subscribers {}: give 1 to 100000",
            args.subscribers
        ));
    }
    if !(args.rate.is_finite() && args.rate > 0.0 && args.rate <= 1_000_000.0) {
        return Err(format!(
            "--rate {}: give a rate above 0 and at most 1000000 messages/s",
            args.rate
        ));
    }
    if !(16..=65_535).contains(&args.size) {
        return Err(format!(
            "--size {}: give 16 to 65535 bytes (the first 16 carry the sequence number and send time)",
            args.size
        ));
    }
    if args.duration.is_zero() {
        return Err("--duration must be more than 0".into());
    }
    if args.channel.is_some() && args.size < 32 {
        return Err(format!(
            "--size {}: with --channel give at least 32 (the data string starts with 32 hexadecimal digits)",
            args.size
        ));
    }
    let path = args.path.unwrap_or_else(|| {
        let default = if args.channel.is_some() {
            "/ws"
        } else {
            "/rooms/fanout"
        };
        default.to_owned()
    });
    if !path.starts_with('/') {
        return Err(format!("--path `{path}`: a path starts with /"));
    }
    Ok(fanout::Spec {
        addrs: args.addr,
        path,
        channel: args.channel,
        subscribers: args.subscribers,
        rate: args.rate,
        size: args.size,
        warmup: args.warmup,
        duration: args.duration,
        grace: args.grace,
        sources: args.sources.map(|s| s.0).unwrap_or_default(),
        announce: args.announce,
    })
}

fn run_fanout(args: FanoutArgs) -> ExitCode {
    let threads = usize::from(args.threads);
    let spec = match fanout_spec(args) {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("walkie-bench fanout: {e}");
            return ExitCode::from(2);
        }
    };
    let fd_limit = procfs::raise_fd_limit();
    if fd_limit < spec.subscribers as u64 + 64 {
        eprintln!(
            "walkie-bench fanout: --subscribers {}: the open-file limit is {fd_limit}",
            spec.subscribers
        );
        return ExitCode::from(2);
    }
    if threads > 1 {
        return match fanout::run_threads(spec, threads) {
            Ok(outcome) => {
                println!("{}", serde_json::to_string(&outcome).unwrap_or_default());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("walkie-bench: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("walkie-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(fanout::run(spec));
    println!("{}", serde_json::to_string(&outcome).unwrap_or_default());
    ExitCode::SUCCESS
}

fn run_suite(args: SuiteArgs) -> ExitCode {
    let all_cases = suite::cases();
    if args.list {
        for c in &all_cases {
            println!("{:16} {}", c.id, c.title);
        }
        return ExitCode::SUCCESS;
    }
    let root = std::env::current_dir().unwrap_or_default();
    if !peers::is_root(&root) {
        eprintln!("walkie-bench: run the suite from the repository root");
        return ExitCode::from(2);
    }
    let all_peers = peers::all();
    let want = |list: &[String], name: &str| list.iter().any(|x| x == "all" || x == name);
    let chosen_peers: Vec<_> = all_peers
        .iter()
        .filter(|p| want(&args.peers, p.name))
        .cloned()
        .collect();
    let chosen_cases: Vec<_> = all_cases
        .iter()
        .filter(|c| want(&args.cases, c.id))
        .copied()
        .collect();
    for name in &args.peers {
        if name != "all" && !all_peers.iter().any(|p| p.name == name) {
            eprintln!("walkie-bench: --peers: unknown peer `{name}`");
            return ExitCode::from(2);
        }
    }
    for id in &args.cases {
        if id != "all" && !all_cases.iter().any(|c| c.id == id) {
            eprintln!("walkie-bench: --cases: unknown case `{id}` (see --list)");
            return ExitCode::from(2);
        }
    }
    let load_cpus = args
        .load_cpus
        .clone()
        .unwrap_or_else(|| args.load_cpu.to_string());
    let load_threads = match suite::cpu_list(&load_cpus) {
        Ok(cpus) => {
            if cpus.contains(&args.server_cpu) {
                eprintln!(
                    "walkie-bench: warning: the load generator's cpus ({load_cpus}) include the server's ({})",
                    args.server_cpu
                );
            }
            cpus.len()
        }
        Err(e) => {
            eprintln!("walkie-bench: --load-cpus {e}");
            return ExitCode::from(2);
        }
    };
    let out = root.join(&args.out);
    let _ = std::fs::create_dir_all(&out);
    let settings = suite::Settings {
        peers: chosen_peers,
        cases: chosen_cases,
        runs: if args.quick { 1 } else { args.runs.max(1) },
        warmup: if args.quick {
            Duration::from_secs(1)
        } else {
            args.warmup
        },
        duration: if args.quick {
            Duration::from_secs(2)
        } else {
            args.duration
        },
        server_cpu: args.server_cpu,
        load_cpus,
        load_threads,
        paths: peers::Paths {
            root,
            out: out.clone(),
        },
        build: !args.no_build,
    };
    let results = match suite::run(&settings) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("walkie-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = suite::report(&settings, &results);
    let load = if settings.load_threads > 1 {
        format!(
            "cpus {} ({} threads)",
            settings.load_cpus, settings.load_threads
        )
    } else {
        format!("cpu {}", settings.load_cpus)
    };
    let header = format!(
        "walkie-bench suite: server on cpu {}, load on {load}, {} run(s) of {:?} after {:?} warm-up; median, spread = ±half the range\n",
        settings.server_cpu, settings.runs, settings.duration, settings.warmup
    );
    println!("{header}{report}");
    let _ = std::fs::write(out.join("report.md"), format!("{header}{report}"));
    let _ = std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&results).unwrap_or_default(),
    );
    eprintln!(
        "walkie-bench: results in {}/report.md and results.json",
        out.display()
    );
    ExitCode::SUCCESS
}

/// Prints each process's CPU seconds; from /proc ticks, with a note on
/// stderr, where the kernel's CPU clock cannot be had.
fn run_cpu_time(args: CpuTimeArgs) -> ExitCode {
    for pid in args.pids {
        let clock = procfs::CpuClock::of(pid);
        if let Some(why) = &clock.fallback {
            eprintln!("walkie-bench cpu-time: {why}");
        }
        match clock.seconds() {
            Ok(s) => println!("{s:.9}"),
            Err(e) => {
                eprintln!("walkie-bench cpu-time: {pid}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Load(args) => run_load(args),
        Command::Suite(args) => run_suite(args),
        Command::Fanout(args) => run_fanout(args),
        Command::CpuTime(args) => run_cpu_time(args),
    }
}
