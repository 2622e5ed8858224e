//! Writing a connection's hub queue to its socket, shared by the rooms and
//! the Walkie protocol endpoints.

use std::future::poll_fn;
use std::task::{Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use walkie::{CloseCode, WebSocket};
use walkie_hub::QueueClosed;

use crate::serve::AppState;
use crate::shutdown::Waiter;

/// How the outbox reaches a connection's `WebSocket`: owned by the
/// connection's task (`/ws`), or shared with a room's fan-out and locked
/// for each step (`rooms::Shared`). No step holds it across an await.
pub trait Access<S> {
    fn with<R>(&mut self, f: impl FnOnce(&mut WebSocket<S>) -> R) -> R;
}

impl<S> Access<S> for WebSocket<S> {
    fn with<R>(&mut self, f: impl FnOnce(&mut WebSocket<S>) -> R) -> R {
        f(self)
    }
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
pub async fn send_batch<S, W: Access<S>>(
    ws: &mut W,
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
    let result = match ws.with(|ws| feed_while_room(ws, batch)) {
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
async fn feed_rest<S, W: Access<S>>(
    ws: &mut W,
    batch: &[walkie_hub::Entry],
    Position(first_entry, first_message): Position,
    queue: &walkie_hub::Queue,
    shutdown: &mut Waiter<'_>,
) -> Result<(), Sent>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    for (e, entry) in batch.iter().enumerate().skip(first_entry) {
        let skip = if e == first_entry { first_message } else { 0 };
        for queued in entry.messages().iter().skip(skip) {
            if ws
                .with(|ws| ws.try_feed_prepared(&queued.message))
                .map_err(Sent::Failed)?
            {
                continue;
            }
            let feed = poll_fn(|cx| {
                ws.with(|ws| {
                    ready!(ws.poll_ready(cx))?;
                    Poll::Ready(ws.try_feed_prepared(&queued.message).map(drop))
                })
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

/// Closes, giving up after the close timeout even if the peer reads
/// nothing (a slow consumer's socket may be full). Boxed: the timeout's
/// state would otherwise be part of every connection's task, for a path
/// taken once at the end.
pub async fn close_within<S, W>(ws: &mut W, code: CloseCode, reason: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
    W: Access<S>,
{
    let close = async {
        ws.with(|ws| ws.start_close(code, reason))?;
        poll_fn(|cx| ws.with(|ws| ws.poll_close(cx))).await
    };
    let _ = Box::pin(tokio::time::timeout(Duration::from_secs(5), close)).await;
}

/// Counts an open WebSocket connection in the node's metrics while alive,
/// and gives it the server's state: one pointer for both, as every byte
/// of an idle connection's task counts.
pub struct Counted(std::sync::Arc<AppState>);

impl Counted {
    pub fn new(state: &std::sync::Arc<AppState>) -> Self {
        state
            .hub
            .metrics()
            .connections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Counted(state.clone())
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
