//! Writing a connection's hub queue to its socket, shared by the rooms and
//! the Walkie protocol endpoints.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::task::{Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use walkie::{CloseCode, WebSocket};
use walkie_hub::{QueueClosed, Queued, Sink, Taken};

use crate::serve::AppState;
use crate::shutdown::Waiter;

/// A connection shared by its task and the hub's fan-out: a room member,
/// or a Walkie protocol session (the queue's [`Sink`]).
///
/// A publication flushed on the connection's own thread is written to its
/// socket by the fan-out loop itself, from the one framed copy, without
/// waking the connection's task: one loop writes a whole channel, touching
/// little more than each subscriber's socket. That is every subscriber
/// when the server runs one worker thread; with several, the kernel
/// spreads connections over them, and a subscriber on another thread than
/// the flush gets its messages through its queue and its task. So does a
/// connection whose task is busy (see `busy`), or whose connection is over
/// its high-water mark or closing. What the socket does not take at once
/// stays in the connection's buffer, and the task (woken by the queue)
/// writes it when the socket has room.
///
/// Both sides lock for one step and never across an await. On the
/// connection's thread its task and the fan-out never run at once, so the
/// fan-out's `try_lock` always succeeds there.
pub struct Shared<S> {
    ws: Mutex<WebSocket<S>>,
    /// The worker thread the connection's task runs on (see
    /// `thread_number`). With the flag below in 8 bytes: the whole fits a
    /// 256-byte allocation with its `Arc`.
    thread: u32,
    /// The task is in the middle of something whose output goes first: a
    /// batch it took from its queue and waits to feed the rest of (set in
    /// `feed_rest`), or a command whose reply it has not queued yet (set
    /// in `ws.rs`). The fan-out queues instead, so nothing newer goes
    /// ahead of it. (The high-water mark alone does not say so: waiting
    /// for room, the task may be below the mark, having written part and
    /// been told to wait for the rest.)
    busy: AtomicBool,
}

impl<S> Shared<S> {
    pub fn new(ws: WebSocket<S>) -> Self {
        Shared {
            ws: Mutex::new(ws),
            thread: thread_number(),
            busy: AtomicBool::new(false),
        }
    }

    /// Raises or lowers the `busy` flag.
    pub fn set_busy(&self, busy: bool) {
        self.busy.store(busy, Ordering::Relaxed);
    }

    /// The connection, for one step: never held across an await.
    pub fn lock(&self) -> MutexGuard<'_, WebSocket<S>> {
        // A panic while holding it leaves a connection whose next step
        // fails cleanly; carry on.
        self.ws.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<S> std::fmt::Debug for Shared<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("thread", &self.thread)
            .finish_non_exhaustive()
    }
}

impl<S> Sink for Shared<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    fn try_send(&self, messages: &[Queued]) -> Taken {
        if thread_number() != self.thread || self.busy.load(Ordering::Relaxed) {
            return Taken::NONE;
        }
        let Ok(mut ws) = self.ws.try_lock() else {
            return Taken::NONE;
        };
        // Stops at the high-water mark (a member that reads slowly) and at
        // a closing connection; the queue takes the rest, in order.
        let count = messages
            .iter()
            .take_while(|q| matches!(ws.try_feed_prepared(&q.message), Ok(true)))
            .count();
        if count == 0 {
            return Taken::NONE;
        }
        // A failed write is the task's to report: it is woken for it.
        let written = matches!(ws.try_flush(), Ok(true));
        Taken { count, written }
    }
}

/// Lowers a connection's `busy` flag when dropped.
struct Busy<'a, S>(&'a Shared<S>);

impl<S> Drop for Busy<'_, S> {
    fn drop(&mut self) {
        self.0.set_busy(false);
    }
}

/// A number for the current thread, the same for its whole life (they
/// wrap after 4 billion threads; a process runs a few).
fn thread_number() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    thread_local! {
        static NUMBER: u32 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    NUMBER.with(|n| *n)
}

/// Why a batch was not all queued for writing.
pub enum Sent {
    Failed(walkie::Error),
    Closed(QueueClosed),
    /// The server began shutting down while the socket was full.
    Shutdown,
}

/// Queues a batch on the socket. Feeding waits while the socket is over
/// its high-water mark (a slow reader); meanwhile the hub's queue absorbs
/// the room's messages up to its limit, and an overflow ends the wait.
/// What is fed leaves at the next poll of `recv` (writes are corked until
/// then). Shutdown ends the wait too: a client that reads nothing must not
/// hold the server past its shutdown.
pub async fn send_batch<S>(
    ws: &Shared<S>,
    batch: &mut Vec<walkie_hub::Entry>,
    queue: &walkie_hub::Queue,
    shutdown: &mut Waiter<'_>,
) -> Result<(), Sent>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // The common case, with no await: the socket's buffer has room and
    // every message is queued at once, without arming a wait on the
    // queue's closing (a lock and a waiter per message). The rest, for a
    // client that reads slower than its room, is boxed: its futures would
    // otherwise be part of every member's task for its whole life.
    let fed = feed_while_room(&mut ws.lock(), batch);
    let result = match fed {
        Ok(None) => Ok(()),
        Ok(Some(at)) => Box::pin(feed_rest(ws, batch, at, queue, shutdown)).await,
        Err(e) => Err(Sent::Failed(e)),
    };
    batch.clear();
    result
}

/// Where feeding a batch stopped: the entry, and the message in it.
#[derive(Debug, Clone, Copy)]
struct Position(usize, usize);

/// Queues the batch's messages while the socket has room, in order (a
/// shared batch is read in place: no message is cloned); returns where it
/// stopped, if it did.
fn feed_while_room<S>(
    ws: &mut WebSocket<S>,
    batch: &[walkie_hub::Entry],
) -> Result<Option<Position>, walkie::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    for (e, entry) in batch.iter().enumerate() {
        for (m, queued) in entry.messages().iter().enumerate() {
            if !ws.try_feed_prepared(&queued.message)? {
                return Ok(Some(Position(e, m)));
            }
        }
    }
    Ok(None)
}

/// Queues the batch's messages from `at` on, waiting for socket room
/// before each one that does not fit; the queue's closing (an overflow)
/// and shutdown end the wait.
async fn feed_rest<S>(
    ws: &Shared<S>,
    batch: &[walkie_hub::Entry],
    Position(first_entry, first_message): Position,
    queue: &walkie_hub::Queue,
    shutdown: &mut Waiter<'_>,
) -> Result<(), Sent>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Waiting for room with part of the batch fed: the fan-out must not
    // write past the rest (see `Shared::busy`) until this returns, however
    // it returns.
    ws.set_busy(true);
    let _busy = Busy(ws);
    for (e, entry) in batch.iter().enumerate().skip(first_entry) {
        let skip = if e == first_entry { first_message } else { 0 };
        for queued in entry.messages().iter().skip(skip) {
            if ws
                .lock()
                .try_feed_prepared(&queued.message)
                .map_err(Sent::Failed)?
            {
                continue;
            }
            let feed = poll_fn(|cx| {
                let mut ws = ws.lock();
                ready!(ws.poll_ready(cx))?;
                Poll::Ready(ws.try_feed_prepared(&queued.message).map(drop))
            });
            tokio::select! {
                biased;
                r = feed => r.map_err(Sent::Failed)?,
                why = queue.closed() => return Err(Sent::Closed(why)),
                () = poll_fn(|cx| shutdown.poll(cx)) => return Err(Sent::Shutdown),
            }
        }
    }
    Ok(())
}

/// How many pops in a row a connection's loop makes before its socket
/// goes first for a turn (see [`Turns`]).
const POPS_IN_A_ROW: u8 = 16;

/// Keeps a connection's loop (a room member's, a session's) fair to its
/// socket. The loop's select prefers the queue: what the hub fans out is
/// fed first, and leaves in one write when the loop next polls the
/// socket. But a queue that another worker's fan-out fills faster than
/// one turn of the loop would be ready at every turn, and the socket
/// would wait, unread and with what was fed not written out, until the
/// queue ran dry. So after [`POPS_IN_A_ROW`] pops in a row, the queue sits
/// out one turn: the loop's other steps are polled, and if none is ready
/// the loop passes and goes round again.
#[derive(Debug, Default)]
pub struct Turns(u8);

impl Turns {
    /// Whether the socket goes first this turn; counts the turn as given.
    pub fn socket_first(&mut self) -> bool {
        if self.0 < POPS_IN_A_ROW {
            return false;
        }
        self.0 = 0;
        true
    }

    /// Counts the step the loop took: a pop, or another (which polled the
    /// socket).
    pub fn took(&mut self, popped: bool) {
        self.0 = if popped { self.0.saturating_add(1) } else { 0 };
    }
}

/// The most messages one burst takes (see [`read_burst`]).
pub const BURST_MESSAGES: usize = 256;
/// The bytes past which a burst takes no more (a caller may set less).
pub const BURST_BYTES: usize = 1 << 20;

/// What a burst ran into, behind the messages it read.
pub enum Behind {
    /// The client closed the connection.
    Closed,
    /// The connection failed.
    Failed(walkie::Error),
    /// A message `take` refused; the connection is to be closed for it.
    Refused,
}

/// Reads the messages a client sent right after one already read (of
/// `bytes` bytes) that are readable now, handing each to `take`, until
/// [`BURST_MESSAGES`] (or `max_messages`, if fewer) are read in all,
/// `max_bytes` are read or nothing more is readable. A burst handled as one (one publish, one commit, one
/// write per subscriber) is what lets a busy sender be kept up with (see
/// `docs/performance.md`). `take` answers `false` for a message it
/// refuses, which ends the burst. Answers what ended it, if the connection is ending
/// behind it.
pub async fn read_burst<S>(
    ws: &Shared<S>,
    mut bytes: usize,
    (max_messages, max_bytes): (usize, usize),
    mut take: impl FnMut(walkie::Message) -> bool,
) -> Option<Behind>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut count = 1;
    let max_messages = max_messages.min(BURST_MESSAGES);
    poll_fn(|cx| {
        while count < max_messages && bytes < max_bytes {
            let behind = match ws.lock().poll_recv(cx) {
                Poll::Ready(Some(Ok(message))) => {
                    bytes += message.len();
                    count += 1;
                    if take(message) {
                        continue;
                    }
                    Behind::Refused
                }
                Poll::Ready(Some(Err(e))) => Behind::Failed(e),
                Poll::Ready(None) => Behind::Closed,
                Poll::Pending => break,
            };
            return Poll::Ready(Some(behind));
        }
        Poll::Ready(None)
    })
    .await
}

/// Closes, giving up after the close timeout even if the peer reads
/// nothing (a slow consumer's socket may be full). Boxed: the timeout's
/// state would otherwise be part of every connection's task, for a path
/// taken once at the end.
pub async fn close_within<S>(ws: &Shared<S>, code: CloseCode, reason: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let close = async {
        ws.lock().start_close(code, reason)?;
        poll_fn(|cx| ws.lock().poll_close(cx)).await
    };
    let _ = Box::pin(tokio::time::timeout(Duration::from_secs(5), close)).await;
}

/// Counts an open WebSocket connection in the node's metrics while alive,
/// and gives it the server's state: one pointer for both, as every byte
/// of an idle connection's task counts.
pub struct Counted(std::sync::Arc<AppState>);

impl Counted {
    /// Counts a connection, or `None` if the server already has as many
    /// as it admits (`--max-connections`).
    pub fn admit(state: &std::sync::Arc<AppState>) -> Option<Self> {
        let metrics = state.hub.metrics();
        let open = 1 + metrics
            .connections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Refused, it is dropped: the count goes back down.
        let counted = Counted(state.clone());
        state
            .admission
            .admits(open, &metrics.connections_refused)
            .then_some(counted)
    }
}

impl std::ops::Deref for Counted {
    type Target = AppState;

    fn deref(&self) -> &AppState {
        &self.0
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0
            .hub
            .metrics()
            .connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Counts a cut-off slow consumer.
pub fn overflowed(metrics: &walkie_hub::Metrics) {
    walkie_hub::Metrics::inc(&metrics.queue_overflows);
}

/// The size of the future `make` returns, without making one: the
/// connection tasks' size tests (`rooms.rs`, `ws.rs`) name their futures'
/// types only through the functions that make them.
#[cfg(test)]
pub fn future_size<A, F: std::future::Future>(_make: impl FnOnce(A) -> F) -> usize {
    std::mem::size_of::<F>()
}

/// The bytes of a tokio task around a future of `future` bytes: its
/// header and trailer (112 bytes), rounded up to 128 (the task is
/// 128-aligned). Checked against `-Zprint-type-sizes`: a 400-byte room
/// member's future makes a 512-byte task.
#[cfg(test)]
pub fn task_size(future: usize) -> usize {
    (future + 112).next_multiple_of(128)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The socket goes first once after 16 pops in a row, then the queue
    /// again; any other step starts the count again.
    #[test]
    fn the_socket_gets_a_turn_after_sixteen_pops_in_a_row() {
        let mut turns = Turns::default();
        let mut firsts = Vec::new();
        for _ in 0..40 {
            // A queue always ready: every turn it takes is a pop.
            let first = turns.socket_first();
            firsts.push(first);
            turns.took(!first);
        }
        let at: Vec<usize> = (0..40).filter(|&i| firsts[i]).collect();
        assert_eq!(at, [16, 33], "every 17th turn, the socket's");
        for _ in 0..10 {
            turns.took(true);
        }
        turns.took(false);
        assert!((0..16).all(|_| {
            let first = turns.socket_first();
            turns.took(true);
            !first
        }));
        assert!(turns.socket_first());
    }

    /// A `Shared` connection and its `Arc` counts (16 bytes) fit a
    /// 160-byte allocation (jemalloc's size class; 256 while the
    /// `WebSocket` was 216 bytes).
    #[test]
    fn a_shared_connection_fits_160_bytes() {
        let size = std::mem::size_of::<Shared<tokio::net::TcpStream>>();
        assert!(size <= 144, "Shared is {size} bytes: over 160 with its Arc");
    }
}
