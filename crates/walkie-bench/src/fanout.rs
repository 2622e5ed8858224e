//! The fan-out load: one publisher and many subscribers in one room, on one
//! thread (or the subscribers spread over several, the publisher on the
//! first). The publisher sends small binary messages at a fixed rate, each
//! carrying a sequence number and the time its batch was written in its
//! first 16 bytes;
//! every subscriber reads frame headers and those 16 bytes only, and
//! records publish-to-delivery latency.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Barrier;

use crate::load::open;
use crate::procfs;
use crate::wire::{Event, FrameCounter, TagReader, handshake, json_tag, masked_frame, write_tag};

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
    /// Over the Walkie protocol: the channel every subscriber subscribes
    /// to and the publisher publishes to (with `publish` commands), at
    /// `path` (`/ws`). `None`: `path` is a room, and every connection a
    /// member.
    pub channel: Option<String>,
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
    /// was saturated, and latency includes its own lateness). With several
    /// threads, the busiest thread's share of its core (usually the first
    /// one's, which also runs the publisher).
    pub load_cpu: Option<f64>,
    /// With several threads: the CPU the whole generator used in the
    /// window, in cores (all its threads together). Absent with one
    /// thread, where it is `load_cpu`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_cores: Option<f64>,
    /// Connections that failed (connect, handshake, reset, close).
    pub errors: u64,
    pub first_error: Option<String>,
}

/// What every thread of a run shares: the time base of the send times,
/// the publisher's sequence numbers and the measured window.
struct Common {
    /// Send times are nanoseconds since this instant.
    epoch: Instant,
    measuring: AtomicBool,
    /// The publisher stops once this is set.
    stop_publishing: AtomicBool,
    /// The next sequence number the publisher will use (the publisher
    /// alone writes it).
    next_seq: AtomicU64,
    /// The measured window's messages: `first_seq..end_seq` (`u64::MAX`
    /// until the window opens, respectively closes).
    first_seq: AtomicU64,
    end_seq: AtomicU64,
}

impl Common {
    fn new() -> Self {
        Common {
            epoch: Instant::now(),
            measuring: AtomicBool::new(false),
            stop_publishing: AtomicBool::new(false),
            next_seq: AtomicU64::new(0),
            first_seq: AtomicU64::new(u64::MAX),
            end_seq: AtomicU64::new(u64::MAX),
        }
    }
}

/// One thread's state (no locks).
struct Shared {
    common: Arc<Common>,
    /// Errors after this are the run's own teardown, not counted.
    stop: Cell<bool>,
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
        self.common
            .epoch
            .elapsed()
            .as_nanos()
            .min(u128::from(u64::MAX)) as u64
    }
}

/// One thread's place in a run with several threads.
struct Part {
    /// The thread's number; thread 0 runs the publisher and the window.
    index: usize,
    /// Index of the thread's first subscriber among all of them.
    first: usize,
    /// Subscribers of all threads together.
    total: usize,
    /// Every thread waits here once its connections are open.
    opened: Arc<Barrier>,
    /// Every thread waits here until thread 0 has closed the window.
    closed: Arc<Barrier>,
    /// The threads, for their CPU clocks: each adds itself before
    /// `opened`.
    threads: Arc<Mutex<Vec<libc::pthread_t>>>,
}

/// What one thread counted.
struct Tally {
    connected: usize,
    /// Deliveries that arrived in the window.
    deliveries: u64,
    /// Deliveries of the window's messages this thread's subscribers
    /// should get, and did get by the end of the grace period.
    expected: u64,
    received: u64,
    latency: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
}

/// The measured window, as thread 0 saw it.
struct Window {
    seconds: f64,
    published: u64,
    /// The process's CPU seconds in the window.
    cpu: Option<f64>,
    /// Each thread's CPU seconds in the window (several threads only).
    thread_cpu: Vec<Option<f64>>,
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
    let (tally, window) = run_part(spec, Arc::new(Common::new()), None).await;
    finish(vec![tally], &window.unwrap_or_default(), 1)
}

/// Runs the fan-out with its subscribers spread over `threads` threads,
/// each with its own single-threaded runtime; the publisher and the
/// measured window are thread 0's. Send times count from one instant that
/// every thread shares. Merges what the threads measured.
pub fn run_threads(spec: Spec, threads: usize) -> io::Result<FanoutOutcome> {
    let threads = threads.clamp(1, spec.subscribers.max(1));
    let common = Arc::new(Common::new());
    let (opened, closed) = (
        Arc::new(Barrier::new(threads)),
        Arc::new(Barrier::new(threads)),
    );
    let pthreads = Arc::new(Mutex::new(Vec::with_capacity(threads)));
    let mut first = 0;
    let mut jobs = Vec::with_capacity(threads);
    for t in 0..threads {
        let subscribers = crate::threads::share(spec.subscribers, threads, t);
        let mut part_spec = spec.clone();
        part_spec.subscribers = subscribers;
        part_spec.announce = spec.announce && t == 0;
        let part = Part {
            index: t,
            first,
            total: spec.subscribers,
            opened: opened.clone(),
            closed: closed.clone(),
            threads: pthreads.clone(),
        };
        first += subscribers;
        let common = common.clone();
        jobs.push(move |rt: &tokio::runtime::Runtime| {
            rt.block_on(run_part(part_spec, common, Some(part)))
        });
    }
    let mut tallies = Vec::with_capacity(threads);
    let mut window = None;
    for (tally, w) in crate::threads::run("fanout", jobs)? {
        tallies.push(tally);
        window = window.or(w);
    }
    Ok(finish(tallies, &window.unwrap_or_default(), threads))
}

impl Default for Window {
    fn default() -> Self {
        Window {
            seconds: f64::NAN,
            published: 0,
            cpu: None,
            thread_cpu: Vec::new(),
        }
    }
}

/// The outcome from the threads' tallies and the window: counts summed,
/// losses counted per thread (each thread's subscribers against the
/// window's messages), latency from the merged histograms.
fn finish(tallies: Vec<Tally>, window: &Window, threads: usize) -> FanoutOutcome {
    let mut h = new_histogram();
    let (mut connected, mut deliveries, mut expected, mut received, mut lost, mut errors) =
        (0, 0, 0, 0, 0, 0);
    let mut first_error = None;
    for t in tallies {
        let _ = h.add(&t.latency);
        connected += t.connected;
        deliveries += t.deliveries;
        expected += t.expected;
        received += t.received;
        lost += t.expected.saturating_sub(t.received);
        errors += t.errors;
        first_error = first_error.or(t.first_error);
    }
    let seconds = window.seconds;
    let us = |q: f64| quantile_us(&h, q, expected, received);
    let busiest = window
        .thread_cpu
        .iter()
        .map(|c| c.map(|c| c / seconds))
        .try_fold(0.0f64, |m, c| c.map(|c| m.max(c)));
    FanoutOutcome {
        connected,
        published: window.published,
        publish_rate: window.published as f64 / seconds,
        deliveries,
        seconds,
        rate: deliveries as f64 / seconds,
        expected,
        received,
        lost,
        p50_us: us(0.5),
        p99_us: us(0.99),
        p999_us: us(0.999),
        max_us: (received > 0 && lost == 0).then(|| h.max() as f64 / 1000.0),
        load_cpu: if threads > 1 {
            busiest
        } else {
            window.cpu.map(|c| c / seconds)
        },
        load_cores: window.cpu.filter(|_| threads > 1).map(|c| c / seconds),
        errors,
        first_error,
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000_000, 3).expect("valid histogram bounds")
}

/// CPU time `thread` has used, in seconds.
fn thread_cpu_seconds(thread: libc::pthread_t) -> Option<f64> {
    let mut clock: libc::clockid_t = 0;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `thread` is alive (it waits at a barrier for the caller
    // until the window closes) and both pointers are valid for writes.
    unsafe {
        if libc::pthread_getcpuclockid(thread, &mut clock) != 0
            || libc::clock_gettime(clock, &mut ts) != 0
        {
            return None;
        }
    }
    Some(ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9)
}

/// Every thread's CPU seconds so far.
fn threads_cpu(part: Option<&Part>) -> Vec<Option<f64>> {
    part.map(|p| {
        p.threads
            .lock()
            .map(|t| t.iter().map(|&t| thread_cpu_seconds(t)).collect())
            .unwrap_or_default()
    })
    .unwrap_or_default()
}

/// Runs the fan-out, or one thread's part of it, on the current thread;
/// returns what it counted, and the window if it ran it.
async fn run_part(spec: Spec, common: Arc<Common>, part: Option<Part>) -> (Tally, Option<Window>) {
    let shared = Rc::new(Shared {
        common,
        stop: Cell::new(false),
        arrived: Cell::new(0),
        received: Cell::new(0),
        latency: RefCell::new(new_histogram()),
        buf: RefCell::new(vec![0; READ_BUFFER]),
        errors: Cell::new(0),
        first_error: RefCell::new(None),
    });
    let local = tokio::task::LocalSet::new();
    let outcome = local.run_until(measure(spec, shared, part)).await;
    // Dropping the tasks closes every connection.
    drop(local);
    outcome
}

async fn measure(spec: Spec, shared: Rc<Shared>, part: Option<Part>) -> (Tally, Option<Window>) {
    let common = shared.common.clone();
    let (first, total) = part
        .as_ref()
        .map_or((0, spec.subscribers), |p| (p.first, p.total));
    let runs_window = part.as_ref().is_none_or(|p| p.index == 0);
    // Subscribers first, then the publisher; bounded concurrency, so a
    // slow accept loop is not flooded with SYNs. Indices are the run's,
    // so that every thread spreads over the addresses and sources alike;
    // the publisher comes after every subscriber.
    let gate = Rc::new(tokio::sync::Semaphore::new(CONNECTING));
    let mut pending = Vec::with_capacity(spec.subscribers + 1);
    let publisher_index = runs_window.then_some(total);
    for i in (first..first + spec.subscribers).chain(publisher_index) {
        let source = (!spec.sources.is_empty()).then(|| spec.sources[i % spec.sources.len()]);
        let addr = spec.addrs[i % spec.addrs.len()];
        let (gate, path) = (gate.clone(), spec.path.clone());
        let protocol = spec.channel.is_some().then_some(WALKIE_PROTOCOL);
        pending.push(tokio::task::spawn_local(async move {
            let attempt = async {
                let _permit = gate.acquire().await;
                let mut stream = open(addr, source).await?;
                let host = addr.to_string();
                let (_, leftover) = handshake(&mut stream, &host, &path, false, protocol).await?;
                Ok::<_, io::Error>((stream, leftover))
            };
            match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
                Ok(r) => r,
                Err(_) => Err(io::Error::other("connect or handshake timed out")),
            }
        }));
    }
    let publisher = if runs_window { pending.pop() } else { None };
    let mut connected = 0;
    for task in pending {
        match task.await {
            Ok(Ok((stream, leftover))) => {
                connected += 1;
                let (shared, channel) = (shared.clone(), spec.channel.clone());
                tokio::task::spawn_local(async move {
                    let subscribed = subscribe(stream, &leftover, channel.as_deref(), &shared);
                    if let Err(e) = subscribed.await {
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
    if let Some(part) = &part {
        if let Ok(mut threads) = part.threads.lock() {
            // SAFETY: pthread_self has no preconditions.
            threads.push(unsafe { libc::pthread_self() });
        }
        part.opened.wait().await;
    }
    let window = if runs_window {
        Some(run_window(&spec, &shared, part.as_ref(), publisher).await)
    } else {
        None
    };
    if let Some(part) = &part {
        part.closed.wait().await;
    }

    let published =
        common.end_seq.load(Ordering::Acquire) - common.first_seq.load(Ordering::Acquire);
    let expected = connected as u64 * published;
    // Grace: wait for what is still in flight, or until all has arrived.
    let deadline = Instant::now() + spec.grace;
    while shared.received.get() < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shared.stop.set(true);

    let tally = Tally {
        connected,
        deliveries: shared.arrived.get(),
        expected,
        received: shared.received.get(),
        latency: shared.latency.replace(new_histogram()),
        errors: shared.errors.get(),
        first_error: shared.first_error.borrow().clone(),
    };
    (tally, window)
}

/// Thread 0's part: starts the publisher, lets the warm-up pass, runs the
/// measured window and stops the publisher.
async fn run_window(
    spec: &Spec,
    shared: &Rc<Shared>,
    part: Option<&Part>,
    publisher: Option<(TcpStream, Vec<u8>)>,
) -> Window {
    let common = &shared.common;
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
        let channel = spec.channel.clone();
        tokio::task::spawn_local(async move {
            if let Err(e) = publish(writer, rate, size, channel.as_deref(), &s).await {
                s.error(format!("publisher: {e}"));
            }
        });
    }

    tokio::time::sleep(spec.warmup).await;
    let clock = procfs::CpuClock::of(std::process::id());
    announce(spec.announce, "start");
    let cpu0 = clock.seconds().ok();
    let threads0 = threads_cpu(part);
    common
        .first_seq
        .store(common.next_seq.load(Ordering::Relaxed), Ordering::Release);
    common.measuring.store(true, Ordering::Release);
    let t0 = Instant::now();
    tokio::time::sleep(spec.duration).await;
    let t1 = Instant::now();
    common.measuring.store(false, Ordering::Release);
    common
        .end_seq
        .store(common.next_seq.load(Ordering::Relaxed), Ordering::Release);
    common.stop_publishing.store(true, Ordering::Release);
    let cpu1 = clock.seconds().ok();
    let threads1 = threads_cpu(part);
    announce(spec.announce, "end");

    Window {
        seconds: (t1 - t0).as_secs_f64(),
        published: common.end_seq.load(Ordering::Relaxed)
            - common.first_seq.load(Ordering::Relaxed),
        cpu: cpu0.zip(cpu1).map(|(a, b)| b - a),
        thread_cpu: threads0
            .iter()
            .zip(&threads1)
            .map(|(a, b)| a.zip(*b).map(|(a, b)| b - a))
            .collect(),
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
/// written in one write. Each message's tag carries the time the batch is
/// written, not its scheduled time: latency runs from the publisher's
/// write to the subscriber's read, so the generator's own timer (1 ms
/// granularity, which would add 0 to about 2 ms to every figure and hide
/// the servers' differences) does not count, and neither does a batch
/// delayed by a server that stopped reading the publisher (that shows as
/// a lower publish rate and in the later messages' latency instead).
/// To a room, each message is a binary message of
/// `size` bytes; to a Walkie protocol `channel`, a `publish` command whose
/// `data` is a string of `size` characters.
async fn publish(
    mut writer: OwnedWriteHalf,
    rate: f64,
    size: usize,
    channel: Option<&str>,
    shared: &Shared,
) -> io::Result<()> {
    let payload: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
    let template = masked_frame(2, false, &payload, PUBLISH_KEY);
    let at = template.len() - size;
    // A `publish` command's data: the tag, then padding to `size`.
    let padding = "a".repeat(size.saturating_sub(32));
    if channel.is_some() {
        writer.write_all(&command(CONNECT)).await?;
    }
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut out = Vec::with_capacity(template.len() * 64);
    let mut next = Instant::now();
    let common = &shared.common;
    while !common.stop_publishing.load(Ordering::Acquire) {
        tokio::time::sleep_until(next.into()).await;
        out.clear();
        let now = Instant::now();
        let sent_ns = shared.now_ns();
        let mut n = 0;
        while next <= now && n < MAX_BATCH {
            let seq = common.next_seq.load(Ordering::Relaxed);
            common.next_seq.store(seq + 1, Ordering::Relaxed);
            match channel {
                Some(channel) => {
                    let data = json_tag(seq, sent_ns) + &padding;
                    let publish = serde_json::json!(
                        {"id": seq + 1, "publish": {"channel": channel, "data": data}}
                    );
                    out.extend(command(&publish.to_string()));
                }
                None => {
                    let start = out.len();
                    out.extend_from_slice(&template);
                    write_tag(&mut out[start..], at, PUBLISH_KEY, seq, sent_ns);
                }
            }
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

/// The subprotocol of the Walkie protocol.
pub(crate) const WALKIE_PROTOCOL: &str = "walkie.v1";
/// The Walkie protocol's first command: an anonymous connect.
pub(crate) const CONNECT: &str = r#"{"id":0,"connect":{}}"#;

/// A Walkie protocol command as a masked text frame (with the publisher's
/// key: any key will do).
pub(crate) fn command(json: &str) -> Vec<u8> {
    masked_frame(1, false, json.as_bytes(), PUBLISH_KEY)
}

/// One subscriber: reads into the shared buffer until the run ends. With
/// a Walkie protocol `channel`, connects and subscribes first.
async fn subscribe(
    mut stream: TcpStream,
    leftover: &[u8],
    channel: Option<&str>,
    shared: &Shared,
) -> io::Result<()> {
    let mut reader = match channel {
        Some(channel) => {
            let subscribe = serde_json::json!({"id": 1, "subscribe": {"channel": channel}});
            let mut out = command(CONNECT);
            out.extend(command(&subscribe.to_string()));
            stream.write_all(&out).await?;
            TagReader::json()
        }
        None => TagReader::default(),
    };
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
    let common = &shared.common;
    let (first, end) = (
        common.first_seq.load(Ordering::Acquire),
        common.end_seq.load(Ordering::Acquire),
    );
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
    if common.measuring.load(Ordering::Acquire) {
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

    #[test]
    fn threads_merge_with_losses_counted_per_thread() {
        let tally = |connected: usize, received: u64, ms: u64| {
            let mut latency = new_histogram();
            latency.record_n(ms * 1_000_000, received).unwrap();
            Tally {
                connected,
                deliveries: received,
                expected: connected as u64 * 10,
                received,
                latency,
                errors: 0,
                first_error: None,
            }
        };
        let window = Window {
            seconds: 2.0,
            published: 10,
            cpu: Some(1.2),
            thread_cpu: vec![Some(0.8), Some(0.4)],
        };
        // 10 messages to 3 + 2 subscribers; the second thread lost 5.
        let o = finish(vec![tally(3, 30, 1), tally(2, 15, 2)], &window, 2);
        assert_eq!(
            (o.connected, o.expected, o.received, o.lost),
            (5, 50, 45, 5)
        );
        assert_eq!(o.deliveries, 45);
        assert_eq!(o.max_us, None);
        assert_eq!(o.p99_us, None);
        let p50 = o.p50_us.unwrap();
        assert!((990.0..=1010.0).contains(&p50), "{p50}");
        assert_eq!(o.load_cpu, Some(0.4));
        assert_eq!(o.load_cores, Some(0.6));
        // One thread: load_cpu is the process's, and no load_cores.
        let o = finish(vec![tally(3, 30, 1)], &window, 1);
        assert_eq!((o.lost, o.load_cpu, o.load_cores), (0, Some(0.6), None));
        assert!(o.max_us.is_some());
    }
}
