//! The suite: every case against every peer, the server pinned to one core
//! and the load generator to another (or to several, one thread each),
//! medians of several runs, one table.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::fanout::FanoutOutcome;
use crate::idle::IdleOutcome;
use crate::load::{Mode, Outcome};
use crate::peers::{self, Paths, Peer};
use crate::procfs;

/// What a case measures.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// A load run; `cpu` marks the fixed-rate cases whose figure of merit is
    /// the server's CPU time per message.
    Load {
        conns: usize,
        size: usize,
        mode: Mode,
        deflate: bool,
        cpu: bool,
    },
    /// Idle connections; the figure of merit is resident memory per
    /// connection. `room`: members of one room of the fan-out servers
    /// (`/rooms/fanout`) instead of echo connections; with `protocol`,
    /// Walkie protocol sessions of the fan-out server (`/ws`), each
    /// subscribed to the fan-out channel.
    Idle {
        conns: usize,
        room: bool,
        protocol: bool,
    },
    /// One publisher, `subscribers` members of one room, `rate` messages
    /// published per second; the figures of merit are deliveries per
    /// second, losses, latency and the server's CPU per delivery.
    /// `protocol`: subscribers and publisher use the Walkie protocol at
    /// `/ws` (walkie only), with one channel instead of a room.
    Fanout {
        subscribers: usize,
        rate: f64,
        protocol: bool,
    },
}

/// One case of the suite.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    pub id: &'static str,
    pub title: &'static str,
    pub kind: Kind,
}

/// Every case, in the order the tables show them.
pub fn cases() -> Vec<Case> {
    let closed = Mode::ClosedLoop { in_flight: 1 };
    let load = |conns, size, mode, deflate, cpu| Kind::Load {
        conns,
        size,
        mode,
        deflate,
        cpu,
    };
    vec![
        Case {
            id: "echo-1x32",
            title: "echo, closed loop, 1 conn x 32 B",
            kind: load(1, 32, closed, false, false),
        },
        Case {
            id: "echo-100x32",
            title: "echo, closed loop, 100 conns x 32 B",
            kind: load(100, 32, closed, false, false),
        },
        Case {
            id: "echo-1000x32",
            title: "echo, closed loop, 1000 conns x 32 B",
            kind: load(1000, 32, closed, false, false),
        },
        Case {
            id: "echo-100x16k",
            title: "echo, closed loop, 100 conns x 16 KiB",
            kind: load(100, 16384, closed, false, false),
        },
        Case {
            id: "pipe-100x32",
            title: "echo, pipelined (16 in flight), 100 conns x 32 B",
            kind: load(100, 32, Mode::ClosedLoop { in_flight: 16 }, false, false),
        },
        Case {
            id: "cpu-100x32",
            title: "server CPU per message at 50k msg/s, 100 conns x 32 B",
            kind: load(
                100,
                32,
                Mode::FixedRate {
                    per_second: 50_000.0,
                },
                false,
                true,
            ),
        },
        Case {
            id: "cpu-100x16k",
            title: "server CPU per message at 5k msg/s, 100 conns x 16 KiB",
            kind: load(
                100,
                16384,
                Mode::FixedRate {
                    per_second: 5_000.0,
                },
                false,
                true,
            ),
        },
        Case {
            id: "deflate-100x32",
            title: "echo, closed loop, 100 conns x 32 B, permessage-deflate",
            kind: load(100, 32, closed, true, false),
        },
        Case {
            id: "fanout-1k",
            title: "fan-out, 1 publisher x 1000 subscribers, 64 B at 1500 msg/s (1.5M deliveries/s offered)",
            kind: Kind::Fanout {
                subscribers: 1000,
                rate: 1500.0,
                protocol: false,
            },
        },
        Case {
            id: "fanout-10k",
            title: "fan-out, 1 publisher x 10000 subscribers, 64 B at 100 msg/s (1M deliveries/s offered)",
            kind: Kind::Fanout {
                subscribers: 10_000,
                rate: 100.0,
                protocol: false,
            },
        },
        Case {
            id: "fanout-1k-low",
            title: "fan-out, 1 publisher x 1000 subscribers, 64 B at 150 msg/s (150k deliveries/s offered, below saturation)",
            kind: Kind::Fanout {
                subscribers: 1000,
                rate: 150.0,
                protocol: false,
            },
        },
        Case {
            id: "fanout-10k-low",
            title: "fan-out, 1 publisher x 10000 subscribers, 64 B at 10 msg/s (100k deliveries/s offered, below saturation)",
            kind: Kind::Fanout {
                subscribers: 10_000,
                rate: 10.0,
                protocol: false,
            },
        },
        Case {
            id: "fanout-ws-1k",
            title: "fan-out over the Walkie protocol (/ws, one channel), 1 publisher x 1000 subscribers, 64 B at 1500 msg/s",
            kind: Kind::Fanout {
                subscribers: 1000,
                rate: 1500.0,
                protocol: true,
            },
        },
        Case {
            id: "idle-10k",
            title: "RSS per idle connection, 10k connections",
            kind: Kind::Idle {
                conns: 10_000,
                room: false,
                protocol: false,
            },
        },
        Case {
            id: "idle-50k",
            title: "RSS per idle connection, 50k connections",
            kind: Kind::Idle {
                conns: 50_000,
                room: false,
                protocol: false,
            },
        },
        Case {
            id: "idle-room-10k",
            title: "RSS per idle room member, 10k members of one room (the fan-out servers)",
            kind: Kind::Idle {
                conns: 10_000,
                room: true,
                protocol: false,
            },
        },
        Case {
            id: "idle-ws-10k",
            title: "RSS per idle Walkie protocol session, 10k sessions subscribed to one channel (walkie only)",
            kind: Kind::Idle {
                conns: 10_000,
                room: true,
                protocol: true,
            },
        },
    ]
}

/// Settings of a suite run.
#[derive(Debug, Clone)]
pub struct Settings {
    pub peers: Vec<Peer>,
    pub cases: Vec<Case>,
    pub runs: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub server_cpu: usize,
    /// The cores the load generator is pinned to, as `taskset -c` takes
    /// them (`1`, `1-15`, `1,3,5-7`).
    pub load_cpus: String,
    /// The load generator's threads: one per core of `load_cpus` (the idle
    /// cases keep one).
    pub load_threads: usize,
    pub paths: Paths,
    pub build: bool,
}

/// One run's figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunResult {
    pub rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub cpu_us_per_msg: Option<f64>,
    /// The server's CPU time over the measured window divided by the
    /// window's length: 1.0 is one core busy all the time (cpu and fan-out
    /// cases).
    pub server_util: Option<f64>,
    /// Set where the server's CPU time came from /proc in 10 ms ticks
    /// instead of the kernel's process CPU clock: why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_note: Option<String>,
    pub rss_per_conn: Option<f64>,
    /// Fan-out: deliveries of the window's messages that never arrived,
    /// out of `expected`.
    pub lost: Option<u64>,
    pub expected: Option<u64>,
    /// Fan-out: messages published per second in the window.
    pub publish_rate: Option<f64>,
    /// Fan-out: share of its core the load generator used in the window
    /// (with several threads, the busiest thread's share of its core).
    pub load_cpu: Option<f64>,
    /// Fan-out: cores' worth of CPU that other processes used in the window
    /// (the machine's busy time less the server's and the generator's).
    pub other_cpu: Option<f64>,
    pub connected: usize,
    pub errors: u64,
    pub first_error: Option<String>,
}

/// A case against a peer: its runs, or why it was skipped.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    pub case: &'static str,
    pub peer: &'static str,
    /// The runs that gave a result (the medians are theirs).
    pub runs: Vec<RunResult>,
    /// Why each of the other runs gave none.
    pub failed: Vec<String>,
    /// Why no run gave a result (the first failure), if none did.
    pub skipped: Option<String>,
}

/// A server's CPU time over the load generator's measured window, sampled
/// when the generator prints `start` and `end`.
struct CpuWindow {
    clock: procfs::CpuClock,
    start: Option<(f64, Instant)>,
    /// CPU seconds used, and the wall-clock seconds between the samples.
    used: Option<(f64, f64)>,
}

impl CpuWindow {
    fn new(pid: u32) -> Self {
        CpuWindow {
            clock: procfs::CpuClock::of(pid),
            start: None,
            used: None,
        }
    }

    fn start(&mut self) {
        self.start = self.clock.seconds().ok().map(|c| (c, Instant::now()));
    }

    fn end(&mut self) {
        self.used = match (self.start, self.clock.seconds().ok()) {
            (Some((c0, t0)), Some(c1)) => Some((c1 - c0, t0.elapsed().as_secs_f64())),
            _ => None,
        };
    }

    /// CPU seconds used in the window.
    fn cpu(&self) -> Option<f64> {
        self.used.map(|(c, _)| c)
    }

    /// Share of one core used in the window.
    fn util(&self) -> Option<f64> {
        self.used.filter(|(_, w)| *w > 0.0).map(|(c, w)| c / w)
    }

    fn note(&self) -> Option<String> {
        self.clock.fallback.clone()
    }
}

/// A server process, killed on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn start(peer: &Peer, s: &Settings, deflate: bool) -> Result<Server, String> {
    let port = free_port().map_err(|e| e.to_string())?;
    let cmd = peer.command(&s.paths, port, deflate, s.server_cpu);
    spawn(peer, s, cmd, port, if deflate { "-deflate" } else { "" })
}

/// Starts `peer`'s fan-out server, fresh; `protocol`: its Walkie protocol
/// fan-out (see [`Kind::Fanout`]).
fn start_fanout(peer: &Peer, s: &Settings, protocol: bool) -> Result<Server, String> {
    let port = free_port().map_err(|e| e.to_string())?;
    let cmd = peer
        .fanout_command(&s.paths, port, s.server_cpu, protocol)
        .ok_or("not supported by this peer")?;
    spawn(peer, s, cmd, port, "-fanout")
}

fn spawn(
    peer: &Peer,
    s: &Settings,
    mut cmd: Command,
    port: u16,
    log: &str,
) -> Result<Server, String> {
    let logs = s.paths.out.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| e.to_string())?;
    let log = std::fs::File::create(logs.join(format!("{}{log}.log", peer.name)))
        .map_err(|e| e.to_string())?;
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", peer.name))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(match status.code() {
                Some(3) => "not supported by this peer".to_owned(),
                _ => format!(
                    "{} exited ({status}); see {}/logs",
                    peer.name,
                    s.paths.out.display()
                ),
            });
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            // Let it finish starting up (Node JIT, Python imports).
            std::thread::sleep(Duration::from_millis(300));
            return Ok(Server { child, addr });
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(format!("{} did not listen within 30 s", peer.name));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn load_command(s: &Settings, addr: SocketAddr) -> Command {
    bench_command(s, "load", addr, "/echo")
}

/// `walkie-bench SUBCOMMAND --addr ADDR --path PATH`, pinned to the load
/// generator's cores.
fn bench_command(s: &Settings, subcommand: &str, addr: SocketAddr, path: &str) -> Command {
    let mut cmd = Command::new("taskset");
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("walkie-bench"));
    cmd.arg("-c").arg(&s.load_cpus).arg(exe);
    cmd.arg(subcommand)
        .arg("--addr")
        .arg(addr.to_string())
        .arg("--path")
        .arg(path);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    cmd
}

/// Adds `--threads N` where the load generator has several cores.
fn threads_arg(s: &Settings, cmd: &mut Command) {
    if s.load_threads > 1 {
        cmd.args(["--threads", &s.load_threads.to_string()]);
    }
}

/// Runs one load case against a running server; samples the server's CPU
/// over exactly the measured window.
fn run_load(s: &Settings, server: &Server, kind: Kind) -> Result<RunResult, String> {
    let Kind::Load {
        conns,
        size,
        mode,
        deflate,
        cpu,
    } = kind
    else {
        return Err("not a load case".into());
    };
    let mut cmd = load_command(s, server.addr);
    cmd.args([
        "--conns",
        &conns.to_string(),
        "--size",
        &size.to_string(),
        "--announce",
    ]);
    cmd.args(["--warmup", &format!("{}ms", s.warmup.as_millis())]);
    cmd.args(["--duration", &format!("{}ms", s.duration.as_millis())]);
    match mode {
        Mode::ClosedLoop { in_flight } => cmd.args(["--in-flight", &in_flight.to_string()]),
        Mode::FixedRate { per_second } => cmd.args(["--rate", &per_second.to_string()]),
    };
    if deflate {
        cmd.arg("--deflate");
    }
    threads_arg(s, &mut cmd);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start the load generator: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut window = CpuWindow::new(server.child.id());
    let mut outcome: Option<Outcome> = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| e.to_string())?;
        match line.trim() {
            "start" => window.start(),
            "end" => window.end(),
            json => outcome = serde_json::from_str(json).ok(),
        }
    }
    let _ = child.wait();
    let o = outcome.ok_or("the load generator printed no result")?;
    Ok(RunResult {
        rate: o.rate,
        p50_us: o.p50_us,
        p99_us: o.p99_us,
        p999_us: o.p999_us,
        cpu_us_per_msg: window
            .cpu()
            .filter(|_| cpu && o.messages > 0)
            .map(|c| c * 1e6 / o.messages as f64),
        server_util: window.util().filter(|_| cpu),
        cpu_note: window.note().filter(|_| cpu),
        connected: o.connected,
        errors: o.errors,
        first_error: o.first_error.or_else(|| {
            (deflate && o.deflate_accepted < o.connected)
                .then(|| "server did not accept permessage-deflate".into())
        }),
        ..RunResult::default()
    })
}

/// The channel of the Walkie protocol fan-out, in the namespace that
/// `bench/walkie-fanout.toml` configures.
const FANOUT_CHANNEL: &str = "fanout:bench";

/// Time the fan-out gives messages still in flight when its window closes.
const FANOUT_GRACE: Duration = Duration::from_secs(3);

/// One fan-out run against a fresh server: samples the server's CPU over
/// exactly the measured window.
fn run_fanout(
    s: &Settings,
    peer: &Peer,
    subscribers: usize,
    rate: f64,
    protocol: bool,
    fd_limit: u64,
) -> Result<RunResult, String> {
    if !peer.has_fanout() || (protocol && !peer.has_protocol()) {
        return Err("not supported by this peer".into());
    }
    if fd_limit < subscribers as u64 + 1000 {
        return Err(format!(
            "skipped: this machine's open-file limit ({fd_limit}) is below {subscribers} connections"
        ));
    }
    let server = start_fanout(peer, s, protocol)?;
    let path = if protocol { "/ws" } else { "/rooms/fanout" };
    let mut cmd = bench_command(s, "fanout", server.addr, path);
    if protocol {
        cmd.args(["--channel", FANOUT_CHANNEL]);
    }
    // Spread over source addresses so ephemeral ports never run out
    // (10,000 connections per run, each leaving a TIME_WAIT).
    cmd.args([
        "--subscribers",
        &subscribers.to_string(),
        "--rate",
        &rate.to_string(),
        "--size",
        "64",
        "--sources",
        "127.0.0.2-127.0.0.41",
        "--announce",
    ]);
    cmd.args(["--warmup", &format!("{}ms", s.warmup.as_millis())]);
    cmd.args(["--duration", &format!("{}ms", s.duration.as_millis())]);
    cmd.args(["--grace", &format!("{}ms", FANOUT_GRACE.as_millis())]);
    threads_arg(s, &mut cmd);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start the load generator: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut window = CpuWindow::new(server.child.id());
    let (mut busy_start, mut busy) = (None, None);
    let mut outcome: Option<FanoutOutcome> = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| e.to_string())?;
        match line.trim() {
            "start" => {
                window.start();
                // The machine's busy time is only in /proc/stat, in ticks:
                // enough to flag a noisy run.
                busy_start = procfs::machine_busy_seconds().ok();
            }
            "end" => {
                window.end();
                busy = match (busy_start, procfs::machine_busy_seconds().ok()) {
                    (Some(a), Some(b)) => Some(b - a),
                    _ => None,
                };
            }
            json => outcome = serde_json::from_str(json).ok(),
        }
    }
    let _ = child.wait();
    drop(server);
    let o = outcome.ok_or("the load generator printed no result")?;
    let cpu_used = window.cpu();
    // A quantile among the lost deliveries is beyond the grace period:
    // infinite here (null in results.json, "> 3 s" in the table).
    let beyond = |q: Option<f64>| q.unwrap_or(f64::INFINITY);
    Ok(RunResult {
        rate: o.rate,
        p50_us: beyond(o.p50_us),
        p99_us: beyond(o.p99_us),
        p999_us: beyond(o.p999_us),
        cpu_us_per_msg: cpu_used
            .filter(|_| o.deliveries > 0)
            .map(|c| c * 1e6 / o.deliveries as f64),
        server_util: window.util(),
        cpu_note: window.note(),
        lost: Some(o.lost),
        expected: Some(o.expected),
        publish_rate: Some(o.publish_rate),
        load_cpu: o.load_cpu,
        // The generator's whole CPU: with several threads, all of them.
        other_cpu: match (busy, cpu_used, o.load_cores.or(o.load_cpu)) {
            (Some(b), Some(c), Some(l)) if o.seconds > 0.0 => {
                Some((b / o.seconds - c / o.seconds - l).max(0.0))
            }
            _ => None,
        },
        connected: o.connected,
        errors: o.errors,
        first_error: o.first_error,
        ..RunResult::default()
    })
}

/// Opens `conns` idle connections to a fresh server and reports its
/// resident memory per connection.
fn run_idle(
    s: &Settings,
    peer: &Peer,
    conns: usize,
    (room, protocol): (bool, bool),
    fd_limit: u64,
) -> Result<RunResult, String> {
    if (room && !peer.has_fanout()) || (protocol && !peer.has_protocol()) {
        return Err("not supported by this peer".into());
    }
    if fd_limit < conns as u64 + 1000 {
        return Err(format!(
            "skipped: this machine's open-file limit ({fd_limit}) is below {conns} connections"
        ));
    }
    let server = if room {
        start_fanout(peer, s, protocol)?
    } else {
        start(peer, s, false)?
    };
    std::thread::sleep(Duration::from_secs(1));
    let pid = server.child.id();
    let before = procfs::rss_bytes(pid).map_err(|e| e.to_string())?;
    let mut cmd = match (room, protocol) {
        (_, true) => {
            let mut cmd = bench_command(s, "load", server.addr, "/ws");
            cmd.args(["--channel", FANOUT_CHANNEL]);
            cmd
        }
        (true, false) => bench_command(s, "load", server.addr, "/rooms/fanout"),
        (false, false) => load_command(s, server.addr),
    };
    // Spread over source addresses so ephemeral ports never run out.
    cmd.args([
        "--conns",
        &conns.to_string(),
        "--sources",
        "127.0.0.2-127.0.0.41",
        "--idle",
    ]);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start the load generator: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let outcome: IdleOutcome =
        serde_json::from_str(line.trim()).map_err(|e| format!("idle result: {e}"))?;
    std::thread::sleep(Duration::from_secs(2));
    let after = procfs::rss_bytes(pid).map_err(|e| e.to_string())?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(b"done\n");
    }
    let _ = child.wait();
    let per_conn = (after.saturating_sub(before)) as f64 / outcome.connected.max(1) as f64;
    Ok(RunResult {
        rss_per_conn: Some(per_conn),
        connected: outcome.connected,
        errors: outcome.errors as u64,
        first_error: outcome.first_error,
        ..RunResult::default()
    })
}

/// The CPUs of a `taskset -c` list (`1`, `1-15`, `1,3,5-7`), sorted and
/// each once, or why it is not one.
pub fn cpu_list(list: &str) -> Result<Vec<usize>, String> {
    let mut cpus = Vec::new();
    for item in list.split(',') {
        let item = item.trim();
        let (a, b) = item.split_once('-').unwrap_or((item, item));
        let parse = |x: &str| {
            x.trim()
                .parse::<usize>()
                .map_err(|_| format!("`{list}`: expected CPUs like 1-15 or 1,3,5-7"))
        };
        let (a, b) = (parse(a)?, parse(b)?);
        if b < a || b - a > 4096 {
            return Err(format!("`{list}`: `{item}` is not a range low-high"));
        }
        cpus.extend(a..=b);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// Runs the whole suite; returns every result.
pub fn run(s: &Settings) -> Result<Vec<CaseResult>, String> {
    let fd_limit = procfs::raise_fd_limit();
    if s.build {
        let mut needs: Vec<peers::Need> = s.peers.iter().map(Peer::needs).collect();
        needs.dedup();
        for need in needs {
            peers::prepare(need, &s.paths)?;
        }
    }
    let runs_peer = |case: &Case, peer: &Peer| {
        peer.echo
            || matches!(
                case.kind,
                Kind::Fanout { .. } | Kind::Idle { room: true, .. }
            )
    };
    let steps = s
        .cases
        .iter()
        .map(|c| s.peers.iter().filter(|p| runs_peer(c, p)).count() * s.runs)
        .sum::<usize>() as u64;
    let bar = ProgressBar::new(steps);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    // Runs are interleaved: run 1 of every peer, then run 2 of every
    // peer... so that the machine's drift (other tenants, thermal state)
    // spreads over all peers instead of favouring whoever ran first. Every
    // peer of a group stays up meanwhile; an idle server costs no CPU.
    let mut results: Vec<CaseResult> = Vec::new();
    let mut slot = |case: &Case, peer: &Peer| -> usize {
        match results
            .iter()
            .position(|r| r.case == case.id && r.peer == peer.name)
        {
            Some(i) => i,
            None => {
                results.push(CaseResult {
                    case: case.id,
                    peer: peer.name,
                    runs: Vec::new(),
                    failed: Vec::new(),
                    skipped: None,
                });
                results.len() - 1
            }
        }
    };
    let mut outcomes: Vec<(usize, Result<RunResult, String>)> = Vec::new();
    for deflate in [false, true] {
        let group: Vec<&Case> = s
            .cases
            .iter()
            .filter(|c| matches!(c.kind, Kind::Load { deflate: d, .. } if d == deflate))
            .collect();
        if group.is_empty() {
            continue;
        }
        let echo: Vec<&Peer> = s.peers.iter().filter(|p| p.echo).collect();
        let servers: Vec<Result<Server, String>> =
            echo.iter().map(|p| start(p, s, deflate)).collect();
        for case in group {
            for i in 0..s.runs {
                for (peer, server) in echo.iter().zip(&servers) {
                    bar.set_message(format!("{} {} run {}", peer.name, case.id, i + 1));
                    let outcome = match server {
                        Err(e) => Err(e.clone()),
                        Ok(server) => run_load(s, server, case.kind),
                    };
                    outcomes.push((slot(case, peer), outcome));
                    bar.inc(1);
                }
            }
        }
    }
    // Fan-out: a fresh server per run (its rooms and queues start empty),
    // interleaved across peers like the rest.
    for case in &s.cases {
        let Kind::Fanout {
            subscribers,
            rate,
            protocol,
        } = case.kind
        else {
            continue;
        };
        for i in 0..s.runs {
            for peer in &s.peers {
                bar.set_message(format!("{} {} run {}", peer.name, case.id, i + 1));
                let outcome = run_fanout(s, peer, subscribers, rate, protocol, fd_limit);
                outcomes.push((slot(case, peer), outcome));
                bar.inc(1);
            }
        }
    }
    for case in s
        .cases
        .iter()
        .filter(|c| matches!(c.kind, Kind::Idle { .. }))
    {
        let Kind::Idle {
            conns,
            room,
            protocol,
        } = case.kind
        else {
            continue;
        };
        for i in 0..s.runs {
            for peer in s.peers.iter().filter(|p| room || p.echo) {
                bar.set_message(format!("{} {} run {}", peer.name, case.id, i + 1));
                outcomes.push((
                    slot(case, peer),
                    run_idle(s, peer, conns, (room, protocol), fd_limit),
                ));
                bar.inc(1);
            }
        }
    }
    for (i, outcome) in outcomes {
        match outcome {
            Ok(run) => results[i].runs.push(run),
            Err(e) => results[i].failed.push(e),
        }
    }
    for r in &mut results {
        if r.runs.is_empty() {
            r.skipped = r.failed.first().cloned();
        }
    }
    bar.finish_and_clear();
    Ok(results)
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Median and spread ((max - min) / median) of one figure over the runs.
fn stat(runs: &[RunResult], f: impl Fn(&RunResult) -> Option<f64>) -> Option<(f64, f64)> {
    let v: Vec<f64> = runs.iter().filter_map(f).collect();
    let m = median(v.clone())?;
    let (lo, hi) = v
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    Some((m, if m > 0.0 { (hi - lo) / m } else { 0.0 }))
}

fn fmt_num(x: f64) -> String {
    if x >= 100_000.0 {
        format!("{:.0}k", x / 1000.0)
    } else if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn fmt_us(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else {
        format!("{us:.0} us")
    }
}

/// Server utilisation (a share of one core) at or above which a server
/// counts as saturated: its CPU per message is then marked `>=`.
const SATURATED: f64 = 0.9;

/// The legend under the tables that show the server's CPU.
const CPU_LEGEND: &str = "*server util*: the server's CPU time over the measured window (the kernel's process CPU clock, all threads) divided by the window's length; 100 % is one core. `>=`: the server's median utilisation was 90 % or more: it was saturated, so its core set the figure (about 1 core / the achieved rate), it batches more and falls behind the offered rate; the figure is a lower bound of its CPU per message (per delivery) at the offered rate, and its ratio is not like-for-like.";

/// A CPU figure, marked `>=` where the server was saturated.
fn fmt_cpu(m: f64, util: Option<f64>) -> String {
    if util.is_some_and(|u| u >= SATURATED) {
        format!(">={}", fmt_num(m))
    } else {
        fmt_num(m)
    }
}

fn fmt_util(util: Option<f64>) -> String {
    util.map_or("-".into(), |u| format!("{:.0}%", u * 100.0))
}

/// The report as a Markdown document: one table per case, peers as rows,
/// ratios against walkie.
pub fn report(s: &Settings, results: &[CaseResult]) -> String {
    let mut out = String::new();
    let by: BTreeMap<(&str, &str), &CaseResult> =
        results.iter().map(|r| ((r.case, r.peer), r)).collect();
    for case in &s.cases {
        out.push_str(&format!("\n### {} (`{}`)\n\n", case.title, case.id));
        if let Kind::Fanout { .. } = case.kind {
            fanout_table(&mut out, s, case, &by);
            continue;
        }
        let (figure, unit): (&str, fn(&RunResult) -> Option<f64>) = match case.kind {
            Kind::Fanout { .. } => continue,
            Kind::Idle { .. } => ("KB per connection", |r| r.rss_per_conn.map(|b| b / 1024.0)),
            Kind::Load { cpu: true, .. } => ("server CPU us/msg", |r| r.cpu_us_per_msg),
            Kind::Load { .. } => ("msgs/s", |r| Some(r.rate)),
        };
        let ours = by
            .get(&(case.id, "walkie"))
            .and_then(|r| stat(&r.runs, unit))
            .map(|(m, _)| m);
        let latency = matches!(case.kind, Kind::Load { .. });
        let cpu = matches!(case.kind, Kind::Load { cpu: true, .. });
        out.push_str(&format!(
            "| peer | {figure} (median) | spread | vs walkie |"
        ));
        let mut columns = 4;
        if cpu {
            out.push_str(" server util |");
            columns += 1;
        }
        if latency {
            out.push_str(" achieved msgs/s | p50 | p99 | p99.9 |");
            columns += 4;
        }
        out.push_str(&format!("\n|{}\n", "---|".repeat(columns)));
        for peer in &s.peers {
            let Some(r) = by.get(&(case.id, peer.name)) else {
                continue;
            };
            if r.runs.is_empty() {
                let why = r.skipped.clone().unwrap_or_else(|| "no result".into());
                out.push_str(&format!(
                    "| {} | - | - | - |{} {why}\n",
                    peer.label,
                    " |".repeat(columns - 4)
                ));
                continue;
            }
            let (m, spread) = stat(&r.runs, unit).unwrap_or((f64::NAN, 0.0));
            let util = stat(&r.runs, |x| x.server_util).map(|(u, _)| u);
            let ratio = ours
                .map(|o| format!("{:.2}x", m / o))
                .unwrap_or_else(|| "-".into());
            out.push_str(&format!(
                "| {} | {} | ±{:.0}% | {ratio} |",
                peer.label,
                if cpu { fmt_cpu(m, util) } else { fmt_num(m) },
                spread * 50.0
            ));
            if cpu {
                out.push_str(&format!(" {} |", fmt_util(util)));
            }
            if latency {
                let med = |f: fn(&RunResult) -> f64| {
                    stat(&r.runs, |x| Some(f(x)))
                        .map(|(m, _)| m)
                        .unwrap_or(f64::NAN)
                };
                out.push_str(&format!(
                    " {} | {} | {} | {} |",
                    fmt_num(med(|x| x.rate)),
                    fmt_us(med(|x| x.p50_us)),
                    fmt_us(med(|x| x.p99_us)),
                    fmt_us(med(|x| x.p999_us))
                ));
            }
            out.push_str(&row_notes(r));
            out.push('\n');
        }
        if cpu {
            out.push_str(&format!("\n{CPU_LEGEND}\n"));
        }
    }
    out
}

/// The end of a peer's row: connection errors, runs that gave no result
/// (`n/N runs`: the medians are of the n), CPU time read in ticks.
fn row_notes(r: &CaseResult) -> String {
    let mut note = errors_note(&r.runs);
    if let Some(first) = r.failed.first() {
        note.push_str(&format!(
            " ({}/{} runs; {} failed: {first})",
            r.runs.len(),
            r.runs.len() + r.failed.len(),
            r.failed.len()
        ));
    }
    if let Some(why) = r.runs.iter().find_map(|x| x.cpu_note.clone()) {
        note.push_str(&format!(" ({why})"));
    }
    note
}

/// Errors of a peer's runs, for the end of its row.
fn errors_note(runs: &[RunResult]) -> String {
    let errors: u64 = runs.iter().map(|x| x.errors).sum();
    if errors > 0 || runs.iter().any(|x| x.first_error.is_some()) {
        let first = runs
            .iter()
            .find_map(|x| x.first_error.clone())
            .unwrap_or_default();
        format!(" {errors} error(s): {first}")
    } else {
        String::new()
    }
}

/// A fan-out case's table: deliveries per second, losses, latency, the
/// server's CPU per delivery (both with ratios to walkie) and utilisation,
/// and how busy the load generator was.
fn fanout_table(
    out: &mut String,
    s: &Settings,
    case: &Case,
    by: &BTreeMap<(&str, &str), &CaseResult>,
) {
    let rate = |r: &RunResult| Some(r.rate);
    let cpu = |r: &RunResult| r.cpu_us_per_msg;
    let ours = |f: fn(&RunResult) -> Option<f64>| {
        by.get(&(case.id, "walkie"))
            .and_then(|r| stat(&r.runs, f))
            .map(|(m, _)| m)
    };
    let (our_rate, our_cpu) = (ours(rate), ours(cpu));
    let ratio = |m: f64, o: Option<f64>| {
        o.filter(|o| *o > 0.0)
            .map(|o| format!("{:.2}x", m / o))
            .unwrap_or_else(|| "-".into())
    };
    out.push_str(
        "| peer | deliveries/s (median) | spread | vs walkie | lost | p50 | p99 | p99.9 | server CPU us/delivery | vs walkie | server util | published/s | load gen CPU |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for peer in &s.peers {
        let Some(r) = by.get(&(case.id, peer.name)) else {
            continue;
        };
        if r.runs.is_empty() {
            let why = r.skipped.clone().unwrap_or_else(|| "no result".into());
            out.push_str(&format!(
                "| {} | - | - | - | | | | | | | | | | {why}\n",
                peer.label
            ));
            continue;
        }
        let med = |f: &dyn Fn(&RunResult) -> Option<f64>| stat(&r.runs, f).map(|(m, _)| m);
        let (m, spread) = stat(&r.runs, rate).unwrap_or((f64::NAN, 0.0));
        let lost = match (
            med(&|x| x.lost.map(|l| l as f64)),
            med(&|x| x.expected.map(|e| e as f64)),
        ) {
            (Some(l), Some(e)) if e > 0.0 => format!("{l:.0} ({:.1}%)", l * 100.0 / e),
            (Some(l), _) => format!("{l:.0}"),
            _ => "-".into(),
        };
        let us = |f: fn(&RunResult) -> f64| {
            med(&|x| Some(f(x))).map_or("-".into(), |v| {
                if v.is_finite() {
                    fmt_us(v)
                } else {
                    format!("> {} s", FANOUT_GRACE.as_secs())
                }
            })
        };
        let c = med(&cpu);
        let util = med(&|x| x.server_util);
        out.push_str(&format!(
            "| {} | {} | ±{:.0}% | {} | {lost} | {} | {} | {} | {} | {} | {} | {} | {} |",
            peer.label,
            fmt_num(m),
            spread * 50.0,
            ratio(m, our_rate),
            us(|x| x.p50_us),
            us(|x| x.p99_us),
            us(|x| x.p999_us),
            c.map_or("-".into(), |c| fmt_cpu(c, util)),
            c.map_or("-".into(), |c| ratio(c, our_cpu)),
            fmt_util(util),
            med(&|x| x.publish_rate).map_or("-".into(), fmt_num),
            med(&|x| x.load_cpu).map_or("-".into(), |l| format!("{:.0}%", l * 100.0)),
        ));
        out.push_str(&row_notes(r));
        if let Some(other) = r
            .runs
            .iter()
            .filter_map(|x| x.other_cpu)
            .max_by(f64::total_cmp)
            .filter(|o| *o > NOISY)
        {
            out.push_str(&format!(
                " (noisy: other processes used up to {:.0}% of a core during a run)",
                other * 100.0
            ));
        }
        out.push('\n');
    }
    out.push_str(&format!("\n{CPU_LEGEND}\n"));
}

/// Other processes' CPU (cores) during a fan-out window above which the
/// table flags the run as noisy.
const NOISY: f64 = 0.15;

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(cases: &[&str]) -> Settings {
        Settings {
            peers: peers::all()
                .into_iter()
                .filter(|p| ["walkie", "uws"].contains(&p.name))
                .collect(),
            cases: super::cases()
                .into_iter()
                .filter(|c| cases.contains(&c.id))
                .collect(),
            runs: 3,
            warmup: Duration::from_secs(1),
            duration: Duration::from_secs(2),
            server_cpu: 0,
            load_cpus: "1".into(),
            load_threads: 1,
            paths: Paths {
                root: PathBuf::new(),
                out: PathBuf::new(),
            },
            build: false,
        }
    }

    fn run(cpu: f64, util: f64) -> RunResult {
        RunResult {
            rate: 50_000.0,
            cpu_us_per_msg: Some(cpu),
            server_util: Some(util),
            ..RunResult::default()
        }
    }

    fn row<'a>(report: &'a str, label: &str) -> &'a str {
        report
            .lines()
            .find(|l| l.starts_with(&format!("| {label}")))
            .unwrap_or_else(|| panic!("no row {label} in\n{report}"))
    }

    #[test]
    fn cpu_rows_show_utilisation_saturation_and_failed_runs() {
        let s = settings(&["cpu-100x32"]);
        let results = vec![
            CaseResult {
                case: "cpu-100x32",
                peer: "walkie",
                runs: vec![run(4.0, 0.2), run(4.2, 0.21), run(4.4, 0.22)],
                failed: Vec::new(),
                skipped: None,
            },
            CaseResult {
                case: "cpu-100x32",
                peer: "uws",
                runs: vec![run(19.0, 0.95), run(20.0, 0.97)],
                failed: vec!["uws exited (signal 9)".into()],
                skipped: None,
            },
        ];
        let report = report(&s, &results);
        assert!(report.contains("| server util |"), "{report}");
        let ours = row(&report, "walkie");
        assert!(
            ours.contains("| 4.20 |") && ours.contains("| 21% |"),
            "{ours}"
        );
        assert!(!ours.contains("runs"), "{ours}");
        let theirs = row(&report, "uWebSockets");
        assert!(theirs.contains("| >=19.5 |"), "{theirs}");
        assert!(theirs.contains("| 96% |"), "{theirs}");
        assert!(
            theirs.ends_with("(2/3 runs; 1 failed: uws exited (signal 9))"),
            "{theirs}"
        );
        assert!(report.contains("`>=`"), "the legend: {report}");
    }

    #[test]
    fn fanout_rows_show_utilisation() {
        let s = settings(&["fanout-1k"]);
        let fanout = |util: f64| RunResult {
            rate: 1.5e6,
            cpu_us_per_msg: Some(0.6),
            server_util: Some(util),
            lost: Some(0),
            expected: Some(1000),
            ..RunResult::default()
        };
        let results = vec![CaseResult {
            case: "fanout-1k",
            peer: "walkie",
            runs: vec![fanout(0.92)],
            failed: Vec::new(),
            skipped: None,
        }];
        let report = report(&s, &results);
        let ours = row(&report, "walkie");
        assert!(ours.contains("| >=0.60 | 1.00x | 92% |"), "{ours}");
    }

    #[test]
    fn cpu_lists_count_every_cpu_once() {
        assert_eq!(cpu_list("1").unwrap(), vec![1]);
        assert_eq!(cpu_list("1-15").unwrap().len(), 15);
        assert_eq!(cpu_list("1,3,5-7").unwrap(), vec![1, 3, 5, 6, 7]);
        assert_eq!(cpu_list("2-3,3").unwrap(), vec![2, 3]);
        assert!(cpu_list("").is_err());
        assert!(cpu_list("5-1").is_err());
        assert!(cpu_list("a").is_err());
    }
}
