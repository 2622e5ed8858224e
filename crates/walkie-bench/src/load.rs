//! The load generator: many connections on one thread, pre-encoded frames,
//! header-only parsing of replies, latency in an HDR histogram. With
//! several threads, each runs that on its share of the connections and the
//! results are merged.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::threads::share;
use crate::wire::{FrameCounter, deflate_each, handshake, masked_frame, varied_payloads};

/// How messages are offered.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// Each connection keeps `in_flight` messages outstanding: it sends one
    /// as soon as a reply arrives.
    ClosedLoop {
        /// Messages outstanding per connection (1: request/response).
        in_flight: usize,
    },
    /// Messages at a fixed total rate, spread evenly over the connections,
    /// whatever the replies do (open loop).
    FixedRate {
        /// Messages per second, all connections together.
        per_second: f64,
    },
}

/// One load run.
#[derive(Debug, Clone)]
pub struct Spec {
    pub addr: SocketAddr,
    pub path: String,
    pub conns: usize,
    pub size: usize,
    pub binary: bool,
    pub deflate: bool,
    pub mode: Mode,
    pub warmup: Duration,
    pub duration: Duration,
    /// Local addresses to spread connections over (empty: let the kernel
    /// choose).
    pub sources: Vec<IpAddr>,
    /// Print `start` and `end` lines on stdout when the measured window
    /// opens and closes, so that a supervisor can sample the server then.
    pub announce: bool,
}

fn announce(on: bool, what: &str) {
    if on {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{what}");
        let _ = out.flush();
    }
}

/// What a run measured.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Outcome {
    /// Connections that completed the handshake.
    pub connected: usize,
    /// Connections on which the server accepted permessage-deflate.
    pub deflate_accepted: usize,
    /// Replies received in the measured window.
    pub messages: u64,
    /// Length of the measured window, seconds.
    pub seconds: f64,
    /// Replies per second.
    pub rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// Connections that failed (connect, handshake, reset, close).
    pub errors: u64,
    /// The first error seen, for the report.
    pub first_error: Option<String>,
}

/// State shared by the connection tasks (one thread: no locks).
struct Shared {
    measuring: Cell<bool>,
    stop: Cell<bool>,
    messages: Cell<u64>,
    errors: Cell<u64>,
    first_error: RefCell<Option<String>>,
    latency: RefCell<Histogram<u64>>,
    deflate_accepted: Cell<usize>,
}

impl Shared {
    fn error(&self, e: impl std::fmt::Display) {
        if !self.stop.get() {
            self.errors.set(self.errors.get() + 1);
            self.first_error
                .borrow_mut()
                .get_or_insert_with(|| e.to_string());
        }
    }
}

/// Connects from `source` (if any) to `addr`.
pub async fn open(addr: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One thread's place in a run with several threads.
struct Part {
    /// Index of this thread's first connection among all of them.
    first: usize,
    /// Connections of all threads together.
    total: usize,
    /// Every thread waits here once its connections are open, so that all
    /// start together.
    start: Arc<tokio::sync::Barrier>,
}

/// Runs the load on the current thread and returns what it measured.
pub async fn run(spec: Spec) -> Outcome {
    let (outcome, _) = run_part(spec, None).await;
    outcome
}

/// Runs the load on `threads` threads, each with its own single-threaded
/// runtime and its share of the connections (and of a fixed rate), all
/// starting together once every connection is open; merges what they
/// measured. Only the first thread announces the window.
pub fn run_threads(spec: Spec, threads: usize) -> std::io::Result<Outcome> {
    let threads = threads.clamp(1, spec.conns.max(1));
    let start = Arc::new(tokio::sync::Barrier::new(threads));
    let mut first = 0;
    let mut jobs = Vec::with_capacity(threads);
    for t in 0..threads {
        let conns = share(spec.conns, threads, t);
        let mut part_spec = spec.clone();
        part_spec.conns = conns;
        part_spec.announce = spec.announce && t == 0;
        if let Mode::FixedRate { per_second } = spec.mode {
            part_spec.mode = Mode::FixedRate {
                per_second: per_second * conns as f64 / spec.conns as f64,
            };
        }
        let part = Part {
            first,
            total: spec.conns,
            start: start.clone(),
        };
        first += conns;
        jobs.push(move |rt: &tokio::runtime::Runtime| rt.block_on(run_part(part_spec, Some(part))));
    }
    let parts = crate::threads::run("load", jobs)?;
    Ok(merge(parts))
}

/// One outcome from the threads' outcomes and latency histograms: counts
/// summed, the window's length the mean of the threads' (they start
/// together and last as long), latency from the merged histogram.
fn merge(parts: Vec<(Outcome, Histogram<u64>)>) -> Outcome {
    let mut h = new_histogram();
    let mut total = Outcome::default();
    let threads = parts.len().max(1);
    for (o, part_h) in parts {
        let _ = h.add(&part_h);
        total.connected += o.connected;
        total.deflate_accepted += o.deflate_accepted;
        total.messages += o.messages;
        total.errors += o.errors;
        total.seconds += o.seconds / threads as f64;
        if total.first_error.is_none() {
            total.first_error = o.first_error;
        }
    }
    summarize(total, &h)
}

/// Fills in the rate and the latency quantiles.
fn summarize(mut o: Outcome, h: &Histogram<u64>) -> Outcome {
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    o.rate = o.messages as f64 / o.seconds;
    o.p50_us = us(0.5);
    o.p99_us = us(0.99);
    o.p999_us = us(0.999);
    o.max_us = h.max() as f64 / 1000.0;
    o
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000_000, 3).expect("valid histogram bounds")
}

/// Runs the load, or one thread's part of it, on the current thread;
/// returns what it measured and its latency histogram.
async fn run_part(spec: Spec, part: Option<Part>) -> (Outcome, Histogram<u64>) {
    let shared = Rc::new(Shared {
        measuring: Cell::new(false),
        stop: Cell::new(false),
        messages: Cell::new(0),
        errors: Cell::new(0),
        first_error: RefCell::new(None),
        latency: RefCell::new(new_histogram()),
        deflate_accepted: Cell::new(0),
    });
    let payload: Vec<u8> = (0..spec.size).map(|i| b'a' + (i % 26) as u8).collect();
    let local = tokio::task::LocalSet::new();
    let connected = Rc::new(Cell::new(0usize));
    let (first, total) = part
        .as_ref()
        .map_or((0, spec.conns), |p| (p.first, p.total));
    let opcode = if spec.binary { 2 } else { 1 };
    // With permessage-deflate, every connection of this thread sends the
    // same ring of compressed frames (see `deflate_ring`), built once.
    let ring = Rc::new(if spec.deflate {
        deflate_ring(opcode, &payload, first)
    } else {
        Vec::new()
    });
    // Connections still opening, and the signal that none is left.
    let opening = Rc::new(Cell::new(spec.conns));
    let opened = Rc::new(tokio::sync::Notify::new());
    let outcome = local
        .run_until(async {
            // Connect with bounded concurrency, so a slow accept loop is not
            // flooded with SYNs.
            let gate = Rc::new(tokio::sync::Semaphore::new(256));
            let ready = Rc::new(tokio::sync::Barrier::new(spec.conns + 1));
            for i in (first..).take(spec.conns) {
                let (shared, spec, payload, gate, ready, connected) = (
                    shared.clone(),
                    spec.clone(),
                    payload.clone(),
                    gate.clone(),
                    ready.clone(),
                    connected.clone(),
                );
                let ring = ring.clone();
                let (opening, opened) = (opening.clone(), opened.clone());
                tokio::task::spawn_local(async move {
                    let source =
                        (!spec.sources.is_empty()).then(|| spec.sources[i % spec.sources.len()]);
                    let permit = gate.acquire().await;
                    let conn = connect(&spec, source, &shared).await;
                    drop(permit);
                    if conn.is_some() {
                        connected.set(connected.get() + 1);
                    }
                    opening.set(opening.get() - 1);
                    if opening.get() == 0 {
                        opened.notify_one();
                    }
                    // Everyone starts together, once every connection is open.
                    ready.wait().await;
                    if let Some((stream, leftover, deflate)) = conn {
                        let slot = (i, total);
                        let single;
                        let frames: &[Vec<u8>] = if deflate {
                            &ring
                        } else {
                            // One frame, masked with this connection's key.
                            let key = (i as u32).wrapping_mul(2_654_435_761).to_be_bytes();
                            single = [masked_frame(opcode, false, &payload, key)];
                            &single
                        };
                        if let Err(e) = drive(stream, leftover, frames, &spec, slot, &shared).await
                        {
                            shared.error(e);
                        }
                    }
                });
            }
            if let Some(part) = &part {
                // Every thread's connections open, then all start together.
                // The wait is async: this thread's connections keep
                // connecting meanwhile.
                opened.notified().await;
                part.start.wait().await;
            }
            ready.wait().await;
            tokio::time::sleep(spec.warmup).await;
            announce(spec.announce, "start");
            shared.measuring.set(true);
            let (t0, m0) = (Instant::now(), shared.messages.get());
            tokio::time::sleep(spec.duration).await;
            let (t1, m1) = (Instant::now(), shared.messages.get());
            shared.measuring.set(false);
            announce(spec.announce, "end");
            shared.stop.set(true);
            let h = shared.latency.replace(new_histogram());
            let outcome = Outcome {
                connected: connected.get(),
                deflate_accepted: shared.deflate_accepted.get(),
                messages: m1 - m0,
                seconds: (t1 - t0).as_secs_f64(),
                errors: shared.errors.get(),
                first_error: shared.first_error.borrow().clone(),
                ..Outcome::default()
            };
            (summarize(outcome, &h), h)
        })
        .await;
    drop(local);
    outcome
}

async fn connect(
    spec: &Spec,
    source: Option<IpAddr>,
    shared: &Shared,
) -> Option<(TcpStream, Vec<u8>, bool)> {
    let attempt = async {
        let mut stream = open(spec.addr, source).await?;
        let host = spec.addr.to_string();
        let (deflate, leftover) =
            handshake(&mut stream, &host, &spec.path, spec.deflate, None).await?;
        Ok::<_, std::io::Error>((stream, leftover, deflate))
    };
    match tokio::time::timeout(Duration::from_secs(30), attempt).await {
        Ok(Ok(c)) => {
            if c.2 {
                shared
                    .deflate_accepted
                    .set(shared.deflate_accepted.get() + 1);
            }
            Some(c)
        }
        Ok(Err(e)) => {
            shared.error(e);
            None
        }
        Err(_) => {
            shared.error("connect or handshake timed out");
            None
        }
    }
}

/// Bytes of distinct payloads in a deflate ring: twice the largest window
/// (32 KiB), so that no message repeats within the window of a server that
/// keeps its compression context.
const RING_BYTES: usize = 64 * 1024;

/// The frames a thread's connections send when the server accepted
/// permessage-deflate: distinct payloads ([`varied_payloads`]), each
/// compressed on its own (the client offers `client_no_context_takeover`)
/// and masked once, enough of them that the ring's payloads span twice a
/// 32 KiB window (2,048 of 32 bytes; at least 16). Each connection starts
/// at its own place in the ring and sends the frames in turn: as cheap per
/// message as one frame sent again and again, and a server compressing
/// with context takeover cannot answer a message with a single
/// back-reference to the one before. `first`: the thread's first
/// connection, for the masking key.
fn deflate_ring(opcode: u8, payload: &[u8], first: usize) -> Vec<Vec<u8>> {
    let key = (first as u32).wrapping_mul(2_654_435_761).to_be_bytes();
    let count = RING_BYTES.div_ceil(payload.len().max(1)).clamp(16, 4096);
    deflate_each(&varied_payloads(payload, count))
        .iter()
        .map(|c| masked_frame(opcode, true, c, key))
        .collect()
}

/// Sends and receives on one connection until the run stops, sending
/// `frames` in turn (one frame, or a deflate ring); `(index, total)`: the
/// connection's place among all the run's connections.
async fn drive(
    mut stream: TcpStream,
    leftover: Vec<u8>,
    frames: &[Vec<u8>],
    spec: &Spec,
    (index, total): (usize, usize),
    shared: &Shared,
) -> std::io::Result<()> {
    // The next frame to send: each connection starts at its own place.
    let mut turn = index % frames.len();
    let mut next_frame = || {
        let f = &frames[turn];
        turn += 1;
        if turn == frames.len() {
            turn = 0;
        }
        f
    };
    let mut counter = FrameCounter::default();
    let mut sent: VecDeque<Instant> = VecDeque::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::with_capacity(frames[0].len() * 16);

    let mut on_bytes = |data: &[u8], sent: &mut VecDeque<Instant>| -> std::io::Result<u64> {
        let seen = counter.feed(data);
        if seen.close {
            return Err(std::io::Error::other("server sent a close frame"));
        }
        let now = Instant::now();
        let measuring = shared.measuring.get();
        for _ in 0..seen.messages {
            let Some(t) = sent.pop_front() else { break };
            if measuring {
                let ns = (now - t).as_nanos().min(u128::from(u64::MAX)) as u64;
                let _ = shared.latency.borrow_mut().record(ns.max(1));
                shared.messages.set(shared.messages.get() + 1);
            }
        }
        Ok(seen.messages)
    };
    if !leftover.is_empty() {
        on_bytes(&leftover, &mut sent)?;
    }

    match spec.mode {
        Mode::ClosedLoop { in_flight } => {
            for _ in 0..in_flight {
                out.extend_from_slice(next_frame());
                sent.push_back(Instant::now());
            }
            stream.write_all(&out).await?;
            while !shared.stop.get() {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                let replies = on_bytes(&buf[..n], &mut sent)?;
                if replies == 0 || shared.stop.get() {
                    continue;
                }
                out.clear();
                let now = Instant::now();
                for _ in 0..replies {
                    out.extend_from_slice(next_frame());
                    sent.push_back(now);
                }
                stream.write_all(&out).await?;
            }
        }
        Mode::FixedRate { per_second } => {
            let interval = Duration::from_secs_f64(spec.conns as f64 / per_second);
            // Spread the connections' first sends over one interval.
            let mut next = Instant::now() + interval.mul_f64(index as f64 / total as f64);
            while !shared.stop.get() {
                tokio::select! {
                    () = tokio::time::sleep_until(next.into()) => {
                        // Catch up on every send that is due, in one write.
                        // Latency counts from the actual send (the instant
                        // just before this write, the same for every message
                        // in it), not from each message's scheduled time
                        // `next`: the lateness of the timer (1 ms granularity)
                        // or of a busy generator is left out, so these cases'
                        // p50/p99 are the server's response time to what was
                        // sent, not what a client on that schedule would see.
                        // (The fan-out publisher stamps scheduled times.)
                        // The cpu cases are judged on CPU per message; the
                        // latency columns are secondary.
                        out.clear();
                        let now = Instant::now();
                        while next <= now {
                            out.extend_from_slice(next_frame());
                            sent.push_back(now);
                            next += interval;
                        }
                        stream.write_all(&out).await?;
                    }
                    n = stream.read(&mut buf) => {
                        let n = n?;
                        if n == 0 {
                            return Err(std::io::ErrorKind::UnexpectedEof.into());
                        }
                        on_bytes(&buf[..n], &mut sent)?;
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_sums_counts_and_histograms() {
        let part = |messages: u64, ms: u64, error: Option<&str>| {
            let mut h = new_histogram();
            h.record_n(ms * 1_000_000, messages).unwrap();
            let o = Outcome {
                connected: 50,
                messages,
                seconds: 2.0,
                errors: u64::from(error.is_some()),
                first_error: error.map(str::to_owned),
                ..Outcome::default()
            };
            (o, h)
        };
        let o = merge(vec![part(300, 1, None), part(100, 9, Some("reset"))]);
        assert_eq!((o.connected, o.messages, o.errors), (100, 400, 1));
        assert_eq!(o.first_error.as_deref(), Some("reset"));
        assert!((o.rate - 200.0).abs() < 1e-9);
        assert!((0.99..=1.01).contains(&(o.p50_us / 1000.0)), "{}", o.p50_us);
        assert!((8.9..=9.1).contains(&(o.p99_us / 1000.0)), "{}", o.p99_us);
    }
}
