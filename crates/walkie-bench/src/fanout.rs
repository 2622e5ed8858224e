//! The fan-out load: one publisher and many subscribers in one room, on one
//! thread. The publisher sends small binary messages at a fixed rate, each
//! carrying a sequence number and its send time in its first 16 bytes;
//! every subscriber reads frame headers and those 16 bytes only, and
//! records publish-to-delivery latency.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::load::open;
use crate::procfs;
use crate::wire::{Event, FrameCounter, TagReader, handshake, masked_frame, write_tag};

/// The publisher's masking key (any key is valid; the frame is masked once
/// and only the 16 tag bytes are rewritten per message).
const PUBLISH_KEY: [u8; 4] = [0x5a, 0x17, 0xc3, 0x9e];
/// The subscribers' masking key, for their pongs.
const PONG_KEY: [u8; 4] = [0x3c, 0xa5, 0x0f, 0x96];
/// Most messages the publisher writes at once when it is late.
const MAX_BATCH: usize = 4096;
/// Connections opening at once.
const CONNECTING: usize = 256;
/// Time one connection has to connect and upgrade, permit wait included.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between the last connection and the first message.
const SETTLE: Duration = Duration::from_millis(300);
/// The one read buffer every subscriber shares (one thread; it is borrowed
/// only between awaits).
const READ_BUFFER: usize = 256 * 1024;

/// One fan-out run.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The servers: connections (subscribers, then the publisher) are
    /// spread over them in turn (several nodes of one cluster).
    pub addrs: Vec<SocketAddr>,
    pub path: String,
    pub subscribers: usize,
    /// Messages published per second.
    pub rate: f64,
    /// Message size in bytes (at least 16).
    pub size: usize,
    pub warmup: Duration,
    pub duration: Duration,
    /// Time given to messages still in flight when the window closes.
    pub grace: Duration,
    pub sources: Vec<IpAddr>,
    pub announce: bool,
}

/// What a fan-out run measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FanoutOutcome {
    /// Subscribers that completed the handshake.
    pub connected: usize,
    /// Messages published in the measured window.
    pub published: u64,
    /// Messages published per second in the window (the offered rate, if
    /// the publisher kept up).
    pub publish_rate: f64,
    /// Deliveries (of any message) that arrived in the window.
    pub deliveries: u64,
    /// Length of the measured window, seconds.
    pub seconds: f64,
    /// Deliveries per second: `deliveries / seconds`.
    pub rate: f64,
    /// Deliveries of the window's messages: connected x published.
    pub expected: u64,
    /// Of those, how many arrived by the end of the grace period.
    pub received: u64,
    /// `expected - received`.
    pub lost: u64,
    /// Publish-to-delivery latency of the window's deliveries, lost ones
    /// included as later than the grace period: `None` where a quantile
    /// falls among the lost (it is beyond the grace period).
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub p999_us: Option<f64>,
    pub max_us: Option<f64>,
    /// Share of one core this load generator used in the window (1.0: it
    /// was saturated, and latency includes its own lateness).
    pub load_cpu: Option<f64>,
    /// Connections that failed (connect, handshake, reset, close).
    pub errors: u64,
    pub first_error: Option<String>,
}

struct Shared {
    /// Send times are nanoseconds since this instant.
    epoch: Instant,
    measuring: Cell<bool>,
    /// The publisher stops once this is set.
    stop_publishing: Cell<bool>,
    /// Errors after this are the run's own teardown, not counted.
    stop: Cell<bool>,
    /// The next sequence number the publisher will use.
    next_seq: Cell<u64>,
    /// The measured window's messages: `first_seq..end_seq` (`u64::MAX`
    /// until the window opens, respectively closes).
    first_seq: Cell<u64>,
    end_seq: Cell<u64>,
    /// Deliveries that arrived in the window.
    arrived: Cell<u64>,
    /// Deliveries of the window's messages.
    received: Cell<u64>,
    latency: RefCell<Histogram<u64>>,
    buf: RefCell<Vec<u8>>,
    errors: Cell<u64>,
    first_error: RefCell<Option<String>>,
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

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64
    }
}

fn announce(on: bool, what: &str) {
    if on {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{what}");
        let _ = out.flush();
    }
}

/// Runs the fan-out on the current thread and returns what it measured.
pub async fn run(spec: Spec) -> FanoutOutcome {
    let shared = Rc::new(Shared {
        epoch: Instant::now(),
        measuring: Cell::new(false),
        stop_publishing: Cell::new(false),
        stop: Cell::new(false),
        next_seq: Cell::new(0),
        first_seq: Cell::new(u64::MAX),
        end_seq: Cell::new(u64::MAX),
        arrived: Cell::new(0),
        received: Cell::new(0),
        latency: RefCell::new(
            Histogram::new_with_bounds(1, 120_000_000_000, 3).expect("valid histogram bounds"),
        ),
        buf: RefCell::new(vec![0; READ_BUFFER]),
        errors: Cell::new(0),
        first_error: RefCell::new(None),
    });
    let local = tokio::task::LocalSet::new();
    let outcome = local.run_until(measure(spec, shared)).await;
    // Dropping the tasks closes every connection.
    drop(local);
    outcome
}

async fn measure(spec: Spec, shared: Rc<Shared>) -> FanoutOutcome {
    // Subscribers first, then the publisher; bounded concurrency, so a
    // slow accept loop is not flooded with SYNs.
    let gate = Rc::new(tokio::sync::Semaphore::new(CONNECTING));
    let mut pending = Vec::with_capacity(spec.subscribers + 1);
    for i in 0..=spec.subscribers {
        let source = (!spec.sources.is_empty()).then(|| spec.sources[i % spec.sources.len()]);
        let addr = spec.addrs[i % spec.addrs.len()];
        let (gate, path) = (gate.clone(), spec.path.clone());
        pending.push(tokio::task::spawn_local(async move {
            let attempt = async {
                let _permit = gate.acquire().await;
                let mut stream = open(addr, source).await?;
                let (_, leftover) = handshake(&mut stream, &addr.to_string(), &path, false).await?;
                Ok::<_, io::Error>((stream, leftover))
            };
            match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
                Ok(r) => r,
                Err(_) => Err(io::Error::other("connect or handshake timed out")),
            }
        }));
    }
    let publisher = pending.pop();
    let mut connected = 0;
    for task in pending {
        match task.await {
            Ok(Ok((stream, leftover))) => {
                connected += 1;
                let shared = shared.clone();
                tokio::task::spawn_local(async move {
                    if let Err(e) = subscribe(stream, &leftover, &shared).await {
                        shared.error(e);
                    }
                });
            }
            Ok(Err(e)) => shared.error(e),
            Err(e) => shared.error(e),
        }
    }
    let publisher = match publisher {
        Some(task) => match task.await {
            Ok(Ok(conn)) => Some(conn),
            Ok(Err(e)) => {
                shared.error(format!("publisher: {e}"));
                None
            }
            Err(e) => {
                shared.error(format!("publisher: {e}"));
                None
            }
        },
        None => None,
    };
    tokio::time::sleep(SETTLE).await;
    if let Some((stream, leftover)) = publisher {
        let (reader, writer) = stream.into_split();
        let s = shared.clone();
        tokio::task::spawn_local(async move {
            if let Err(e) = drain(reader, &leftover).await {
                s.error(format!("publisher: {e}"));
            }
        });
        let (s, rate, size) = (shared.clone(), spec.rate, spec.size);
        tokio::task::spawn_local(async move {
            if let Err(e) = publish(writer, rate, size, &s).await {
                s.error(format!("publisher: {e}"));
            }
        });
    }

    tokio::time::sleep(spec.warmup).await;
    announce(spec.announce, "start");
    let cpu0 = procfs::cpu_seconds(std::process::id()).ok();
    shared.first_seq.set(shared.next_seq.get());
    shared.measuring.set(true);
    let t0 = Instant::now();
    tokio::time::sleep(spec.duration).await;
    let t1 = Instant::now();
    shared.measuring.set(false);
    shared.end_seq.set(shared.next_seq.get());
    shared.stop_publishing.set(true);
    let cpu1 = procfs::cpu_seconds(std::process::id()).ok();
    announce(spec.announce, "end");

    let seconds = (t1 - t0).as_secs_f64();
    let published = shared.end_seq.get() - shared.first_seq.get();
    let expected = connected as u64 * published;
    // Grace: wait for what is still in flight, or until all has arrived.
    let deadline = Instant::now() + spec.grace;
    while shared.received.get() < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shared.stop.set(true);

    let received = shared.received.get();
    let deliveries = shared.arrived.get();
    let h = shared.latency.borrow();
    let us = |q: f64| quantile_us(&h, q, expected, received);
    FanoutOutcome {
        connected,
        published,
        publish_rate: published as f64 / seconds,
        deliveries,
        seconds,
        rate: deliveries as f64 / seconds,
        expected,
        received,
        lost: expected.saturating_sub(received),
        p50_us: us(0.5),
        p99_us: us(0.99),
        p999_us: us(0.999),
        max_us: (received > 0 && received >= expected).then(|| h.max() as f64 / 1000.0),
        load_cpu: cpu0.zip(cpu1).map(|(a, b)| (b - a) / seconds),
        errors: shared.errors.get(),
        first_error: shared.first_error.borrow().clone(),
    }
}

/// The `q` quantile of the latency of `expected` deliveries, of which the
/// `received` ones are in `h` and the others are later than the grace
/// period: `None` if the quantile falls among those.
fn quantile_us(h: &Histogram<u64>, q: f64, expected: u64, received: u64) -> Option<f64> {
    if received == 0 {
        return None;
    }
    let rank = (q * expected as f64).ceil().max(1.0);
    if rank > received as f64 {
        return None;
    }
    Some(h.value_at_quantile(rank / received as f64) as f64 / 1000.0)
}

/// Publishes at `rate` until told to stop: every time the timer fires
/// (tokio's timer has 1 ms granularity), the messages due are tagged and
/// written in one write.
async fn publish(
    mut writer: OwnedWriteHalf,
    rate: f64,
    size: usize,
    shared: &Shared,
) -> io::Result<()> {
    let payload: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
    let template = masked_frame(2, false, &payload, PUBLISH_KEY);
    let at = template.len() - size;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut out = Vec::with_capacity(template.len() * 64);
    let mut next = Instant::now();
    while !shared.stop_publishing.get() {
        tokio::time::sleep_until(next.into()).await;
        out.clear();
        let now = Instant::now();
        let sent_ns = shared.now_ns();
        let mut n = 0;
        while next <= now && n < MAX_BATCH {
            let seq = shared.next_seq.get();
            shared.next_seq.set(seq + 1);
            let start = out.len();
            out.extend_from_slice(&template);
            write_tag(&mut out[start..], at, PUBLISH_KEY, seq, sent_ns);
            next += interval;
            n += 1;
        }
        writer.write_all(&out).await?;
    }
    // Dropping the write half would shut the connection down while the
    // grace period still runs: hold it until the run drops this task.
    std::future::pending::<()>().await;
    drop(writer);
    Ok(())
}

/// Reads (and drops) what the publisher receives: it is a member too.
async fn drain(mut reader: OwnedReadHalf, leftover: &[u8]) -> io::Result<()> {
    let mut counter = FrameCounter::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut data = leftover;
    loop {
        if counter.feed(data).close {
            return Err(io::Error::other("server sent a close frame"));
        }
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        data = &buf[..n];
    }
}

/// One subscriber: reads into the shared buffer until the run ends.
async fn subscribe(mut stream: TcpStream, leftover: &[u8], shared: &Shared) -> io::Result<()> {
    let mut reader = TagReader::default();
    on_bytes(shared, &mut reader, leftover, &stream)?;
    poll_fn(|cx| {
        // A few reads per wake-up, then let the others run.
        for _ in 0..8 {
            let mut buf = shared.buf.borrow_mut();
            let n = {
                let mut rb = ReadBuf::new(&mut buf[..]);
                match Pin::new(&mut stream).poll_read(cx, &mut rb) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(())) => rb.filled().len(),
                }
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
            if let Err(e) = on_bytes(shared, &mut reader, &buf[..n], &stream) {
                return Poll::Ready(Err(e));
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

/// Accounts for the deliveries in `data`, answers pings.
fn on_bytes(
    shared: &Shared,
    reader: &mut TagReader,
    data: &[u8],
    stream: &TcpStream,
) -> io::Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    let now = shared.now_ns();
    let (first, end) = (shared.first_seq.get(), shared.end_seq.get());
    let mut latency = shared.latency.borrow_mut();
    let (mut arrived, mut received) = (0u64, 0u64);
    // Messages published together have the same send time: record each
    // run of equal latencies at once.
    let (mut last, mut run) = (0u64, 0u64);
    let mut failure = None;
    reader.feed(data, |event| match event {
        Event::Tagged { seq, sent_ns } => {
            arrived += 1;
            if (first..end).contains(&seq) {
                received += 1;
                let ns = now.saturating_sub(sent_ns).max(1);
                if ns != last && run > 0 {
                    latency.saturating_record_n(last, run);
                    run = 0;
                }
                last = ns;
                run += 1;
            }
        }
        Event::Untagged => {}
        Event::Ping(payload) => {
            let pong = masked_frame(10, false, payload, PONG_KEY);
            // A subscriber writes nothing else: its send buffer has room.
            match stream.try_write(&pong) {
                Ok(n) if n == pong.len() => {}
                Ok(_) => failure = Some(io::Error::other("pong written in part")),
                Err(e) => failure = Some(e),
            }
        }
        Event::Close(code) => {
            failure = Some(io::Error::other(match code {
                Some(c) => format!("server sent a close frame ({c})"),
                None => "server sent a close frame".to_owned(),
            }));
        }
    });
    if run > 0 {
        latency.saturating_record_n(last, run);
    }
    if shared.measuring.get() {
        shared.arrived.set(shared.arrived.get() + arrived);
    }
    shared.received.set(shared.received.get() + received);
    failure.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_count_lost_deliveries_as_beyond_the_grace_period() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 120_000_000_000, 3).unwrap();
        for ms in 1..=100u64 {
            h.record(ms * 1_000_000).unwrap();
        }
        // Nothing lost: the plain quantiles.
        let p50 = quantile_us(&h, 0.5, 100, 100).unwrap();
        assert!((49_900.0..=50_100.0).contains(&p50), "{p50}");
        // 100 of 200 lost: the median is the slowest received, p99 is lost.
        let p50 = quantile_us(&h, 0.5, 200, 100).unwrap();
        assert!((99_900.0..=100_100.0).contains(&p50), "{p50}");
        assert_eq!(quantile_us(&h, 0.99, 200, 100), None);
        assert_eq!(quantile_us(&h, 0.5, 100, 0), None);
    }
}
