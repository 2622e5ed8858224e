//! The load generator: many connections on one thread, pre-encoded frames,
//! header-only parsing of replies, latency in an HDR histogram.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::wire::{FrameCounter, deflate_alone, handshake, masked_frame};

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

/// Runs the load on the current thread and returns what it measured.
pub async fn run(spec: Spec) -> Outcome {
    let shared = Rc::new(Shared {
        measuring: Cell::new(false),
        stop: Cell::new(false),
        messages: Cell::new(0),
        errors: Cell::new(0),
        first_error: RefCell::new(None),
        latency: RefCell::new(
            Histogram::new_with_bounds(1, 120_000_000_000, 3).expect("valid histogram bounds"),
        ),
        deflate_accepted: Cell::new(0),
    });
    let payload: Vec<u8> = (0..spec.size).map(|i| b'a' + (i % 26) as u8).collect();
    let local = tokio::task::LocalSet::new();
    let connected = Rc::new(Cell::new(0usize));
    let outcome = local
        .run_until(async {
            // Connect with bounded concurrency, so a slow accept loop is not
            // flooded with SYNs.
            let gate = Rc::new(tokio::sync::Semaphore::new(256));
            let ready = Rc::new(tokio::sync::Barrier::new(spec.conns + 1));
            for i in 0..spec.conns {
                let (shared, spec, payload, gate, ready, connected) = (
                    shared.clone(),
                    spec.clone(),
                    payload.clone(),
                    gate.clone(),
                    ready.clone(),
                    connected.clone(),
                );
                tokio::task::spawn_local(async move {
                    let source =
                        (!spec.sources.is_empty()).then(|| spec.sources[i % spec.sources.len()]);
                    let permit = gate.acquire().await;
                    let conn = connect(&spec, source, &shared).await;
                    drop(permit);
                    if conn.is_some() {
                        connected.set(connected.get() + 1);
                    }
                    // Everyone starts together, once every connection is open.
                    ready.wait().await;
                    if let Some((stream, leftover, deflate)) = conn {
                        if let Err(e) =
                            drive(stream, leftover, deflate, &spec, &payload, i, &shared).await
                        {
                            shared.error(e);
                        }
                    }
                });
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
            let seconds = (t1 - t0).as_secs_f64();
            let h = shared.latency.borrow();
            let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
            Outcome {
                connected: connected.get(),
                deflate_accepted: shared.deflate_accepted.get(),
                messages: m1 - m0,
                seconds,
                rate: (m1 - m0) as f64 / seconds,
                p50_us: us(0.5),
                p99_us: us(0.99),
                p999_us: us(0.999),
                max_us: h.max() as f64 / 1000.0,
                errors: shared.errors.get(),
                first_error: shared.first_error.borrow().clone(),
            }
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
        let (deflate, leftover) = handshake(&mut stream, &host, &spec.path, spec.deflate).await?;
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

/// Sends and receives on one connection until the run stops.
async fn drive(
    mut stream: TcpStream,
    leftover: Vec<u8>,
    deflate: bool,
    spec: &Spec,
    payload: &[u8],
    index: usize,
    shared: &Shared,
) -> std::io::Result<()> {
    let key = (index as u32).wrapping_mul(2_654_435_761).to_be_bytes();
    let opcode = if spec.binary { 2 } else { 1 };
    let frame = if deflate {
        masked_frame(opcode, true, &deflate_alone(payload), key)
    } else {
        masked_frame(opcode, false, payload, key)
    };
    let mut counter = FrameCounter::default();
    let mut sent: VecDeque<Instant> = VecDeque::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::with_capacity(frame.len() * 16);

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
                out.extend_from_slice(&frame);
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
                    out.extend_from_slice(&frame);
                    sent.push_back(now);
                }
                stream.write_all(&out).await?;
            }
        }
        Mode::FixedRate { per_second } => {
            let interval = Duration::from_secs_f64(spec.conns as f64 / per_second);
            // Spread the connections' first sends over one interval.
            let mut next = Instant::now() + interval.mul_f64(index as f64 / spec.conns as f64);
            while !shared.stop.get() {
                tokio::select! {
                    () = tokio::time::sleep_until(next.into()) => {
                        // Catch up on every send that is due. Latency
                        // counts from the actual write: the sends do not
                        // wait for replies (open loop), so only tokio's
                        // 1 ms timer granularity could delay them, and that
                        // is the generator's lateness, not the server's.
                        out.clear();
                        let now = Instant::now();
                        while next <= now {
                            out.extend_from_slice(&frame);
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
