//! `/ws`: the Walkie protocol (`docs/protocol.md`). This file only moves
//! messages: `walkie_hub::Session` decides what they mean.

use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info};
use walkie::{CloseCode, Incoming, Message};
use walkie_hub::protocol::SUBPROTOCOL;
use walkie_hub::{CloseReason, QueueClosed, Session};

use crate::outbox::{
    BURST_BYTES, BURST_MESSAGES, Behind, Counted, Sent, Shared, Turns, close_within, read_burst,
    send_batch,
};
use crate::serve::AppState;

/// Seconds since the Unix epoch: the session's clock (token expiries are
/// in these units).
fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Serves one Walkie protocol connection: the checks and the upgrade here,
/// then the session in a task of its own, which the request and the
/// routing do not weigh on for the connection's whole life.
pub async fn endpoint<S>(
    incoming: Incoming<S>,
    peer: SocketAddr,
    state: &AppState,
    counted: Counted,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The request is checked before the upgrade, so that a refusal is an
    // HTTP status with a message.
    if let Ok(upgrade) = incoming.upgrade() {
        if !upgrade.protocols().iter().any(|p| p == SUBPROTOCOL) {
            let message = format!("offer the subprotocol {SUBPROTOCOL} (Sec-WebSocket-Protocol)");
            incoming.reject(400, &message).await;
            return;
        }
    }
    let ws = match Box::pin(incoming.accept(&state.config, Some(SUBPROTOCOL))).await {
        Ok(ws) => Arc::new(Shared::new(ws)),
        Err(e) => {
            debug!(%peer, "upgrade refused: {e}");
            return;
        }
    };
    let session = Session::new(state.node.clone(), now());
    session.queue().set_sink(Some(ws.clone()));
    state.tracker.spawn(connection(ws, session, counted, peer));
}

/// A session's task: the relay, then the session's end. Its future is
/// what an idle session's task holds (a test keeps it within 768 bytes);
/// a block, as an `async fn` would keep a second copy of its arguments.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would hold its arguments twice"
)]
fn connection<S>(
    ws: Arc<Shared<S>>,
    mut session: Session,
    counted: Counted,
    peer: SocketAddr,
) -> impl Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    async move {
        let why = run(&ws, &mut session, &counted).await;
        // The hub's fan-out lets go of the connection, which closes when
        // this task ends.
        session.queue().set_sink(None);
        // Boxed: the engine's calls are large, and made once.
        Box::pin(session.close()).await;
        if why == SLOW_CONSUMER {
            // As a room logs it: an operator wants to see these.
            info!(%peer, client = %session.client_id(), "walkie protocol connection cut off: {why}");
        } else {
            debug!(%peer, client = %session.client_id(), "walkie protocol connection ended: {why}");
        }
    }
}

/// The session's next deadline as a timer, kept across turns of the loop:
/// made when a deadline first appears, reset when it moves, dropped when
/// there is none. Boxed: most of a session's life has either no deadline
/// or the same one, and an unboxed `Sleep` would be part of every
/// session's task (and re-registered with the runtime's timer on every
/// turn, as it was when the loop made one per turn).
/// The longest a session's timer is set for at once.
const MAX_WAIT_SECS: u64 = 365 * 24 * 3600;

#[derive(Default)]
struct Deadline {
    /// Seconds since the Unix epoch the timer is set for; 0 for none.
    at: u64,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Deadline {
    /// Sets the timer for `at`, if it is not already; `None` drops it.
    fn set(&mut self, at: Option<u64>) {
        let Some(at) = at.filter(|&at| at != 0) else {
            self.at = 0;
            self.sleep = None;
            return;
        };
        if at == self.at {
            return;
        }
        self.at = at;
        // Whole seconds, as the session counts them: a timer that fires
        // within the deadline's second finds nothing due and is set again
        // (see `fired`).
        // At most a year ahead: a token may say it expires in a billion
        // years (or at `u64::MAX`), which no `Instant` can hold; a timer
        // that fires early finds nothing due and is set again.
        let wait = at.saturating_sub(now()).min(MAX_WAIT_SECS);
        let when = tokio::time::Instant::now() + Duration::from_secs(wait);
        match &mut self.sleep {
            Some(sleep) => sleep.as_mut().reset(when),
            None => self.sleep = Some(Box::pin(tokio::time::sleep_until(when))),
        }
    }

    /// The timer fired. A fired `Sleep` stays ready, so it is disarmed
    /// until the next `set` sets it again, even for the same deadline, or
    /// drops it if the session has none left.
    fn fired(&mut self) {
        self.at = 0;
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match &mut self.sleep {
            Some(sleep) if self.at != 0 => sleep.as_mut().poll(cx),
            _ => Poll::Pending,
        }
    }
}

/// What woke a session's loop.
enum Step {
    Shutdown,
    Popped(Result<(), QueueClosed>),
    Deadline,
    Backlog(walkie::Result<()>),
    Refused,
    Received(Option<walkie::Result<Message>>),
    /// The queue sat out a turn and nothing else was ready.
    Passed,
}

/// The close reason (and log line) of a client cut off because its queue
/// overflowed.
const SLOW_CONSUMER: &str = "slow consumer: reconnect and recover";

/// The close reason of a client whose recovery could not be read.
const HISTORY_UNAVAILABLE: &str = "history unavailable: reconnect and recover";

/// Relays until the connection ends; returns why.
///
/// As for a room member (`rooms.rs`), the select only picks a step and
/// the awaits come after it, every rare one boxed: this future is part of
/// every session's task for its whole life.
async fn run<S>(ws: &Shared<S>, session: &mut Session, state: &AppState) -> String
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // 16 bytes where `state.shutdown.cancelled()` holds 72.
    let mut shutdown = state.shutdown_wakers.waiter();
    let mut batch = Vec::new();
    let mut deadline = Deadline::default();
    let mut catch_up = false;
    // A binary message ended a burst: the commands before it are handled,
    // in their turns, then the connection is closed with 4000.
    let mut refused = false;
    // The close waited for the hub's deliveries (see `Hub::delivered`).
    let mut fenced = false;
    let mut turns = Turns::default();
    loop {
        if catch_up {
            // Written: the next piece of a recovery larger than the queue
            // (boxed: rare).
            catch_up = false;
            Box::pin(session.catch_up()).await;
        }
        deadline.set(session.deadline());
        // Every so often the queue sits out a turn (see `Turns`).
        let queue_turn = !turns.socket_first();
        let step = tokio::select! {
            biased;
            () = poll_fn(|cx| shutdown.poll(cx)) => Step::Shutdown,
            popped = session.queue().pop_all(&mut batch), if queue_turn => Step::Popped(popped),
            () = poll_fn(|cx| deadline.poll(cx)) => Step::Deadline,
            // Commands read together take their turns here, after what
            // the one before queued was sent, and once the socket has room
            // for their replies: a burst of commands with large replies
            // (history, say) to a client that reads nothing must not pile
            // them all up.
            // Never on a turn the queue sits out: a command is handled once
            // what was queued before it is sent.
            ready = poll_fn(|cx| ws.lock().poll_ready(cx)), if queue_turn && session.has_backlog() => {
                Step::Backlog(ready)
            }
            () = std::future::ready(()), if refused && !session.has_backlog() => Step::Refused,
            // The next burst is read once this one is handled.
            next = poll_fn(|cx| ws.lock().poll_recv(cx)), if !refused && !session.has_backlog() => {
                Step::Received(next)
            }
            () = std::future::ready(()), if !queue_turn => Step::Passed,
        };
        turns.took(matches!(step, Step::Popped(_)));
        let closed = match step {
            Step::Shutdown => {
                close_within(ws, CloseCode::GOING_AWAY, "server shutting down").await;
                return "server shutting down".into();
            }
            Step::Popped(Ok(())) => {
                match send_batch(ws, &mut batch, session.queue(), &mut shutdown).await {
                    Ok(()) => {
                        catch_up = session.catching_up();
                        continue;
                    }
                    // Shutdown: the next turn closes.
                    Err(Sent::Shutdown) => continue,
                    Err(Sent::Failed(e)) => return format!("send failed: {e}"),
                    Err(Sent::Closed(why)) => why,
                }
            }
            Step::Popped(Err(why)) => why,
            Step::Deadline => {
                deadline.fired();
                // Boxed, as the command below: rare, and large (auth, the
                // engine's calls).
                match Box::pin(session.handle_timeout(now())).await {
                    Some(close) => return Box::pin(close_with(ws, close)).await,
                    None => continue,
                }
            }
            Step::Backlog(Err(e)) => return format!("connection failed: {e}"),
            Step::Refused if !fenced => {
                // What the burst's commands caused (the publications to a
                // channel this client is in) goes out before the close.
                fenced = true;
                Box::pin(session.delivered()).await;
                continue;
            }
            Step::Refused => return Box::pin(close_with(ws, binary_refused())).await,
            Step::Backlog(Ok(())) => {
                ws.set_busy(true);
                if let Err(why) = Box::pin(handle_next(ws, session)).await {
                    return why;
                }
                ws.set_busy(false);
                continue;
            }
            Step::Received(Some(Ok(Message::Text(text)))) if !queue_turn => {
                // Read on a turn the queue sat out, with pushes maybe still
                // in it: the command waits its turn behind them.
                session.queue_text(text);
                continue;
            }
            Step::Received(Some(Ok(Message::Text(text)))) => {
                // Busy until the replies are queued: what the hub publishes
                // meanwhile (to a channel just joined, say) goes to the
                // queue, after the replies, and not straight to the socket.
                ws.set_busy(true);
                match Box::pin(handle_burst(ws, session, text)).await {
                    Ok(binary_behind) => refused = binary_behind,
                    Err(why) => return why,
                }
                ws.set_busy(false);
                continue;
            }
            Step::Received(Some(Ok(Message::Binary(_)))) => {
                // Closed in turn, after what earlier commands caused.
                refused = true;
                continue;
            }
            Step::Received(Some(Err(e))) => return format!("connection failed: {e}"),
            Step::Received(None) => return "closed by the client".into(),
            Step::Passed => continue,
        };
        if closed == QueueClosed::SlowConsumer {
            crate::outbox::overflowed(state.hub.metrics());
        }
        let (code, reason) = match closed {
            QueueClosed::SlowConsumer => (CloseCode::TRY_AGAIN_LATER, SLOW_CONSUMER),
            QueueClosed::Disconnected => (CloseCode(4009), "disconnected by the server"),
            QueueClosed::Unavailable => (CloseCode::INTERNAL_ERROR, HISTORY_UNAVAILABLE),
        };
        close_within(ws, code, reason).await;
        return reason.into();
    }
}

/// The close for a binary message.
fn binary_refused() -> CloseReason {
    CloseReason {
        code: 4000,
        reason: "binary messages are not part of the protocol".into(),
    }
}

/// Reads `first` and the commands the client sent right after it that are
/// already readable into the session's backlog, then handles the first
/// of them (a run of publishes is one batch: `Session::handle_next`); the
/// loop handles the rest, sending what they queue in between, as it would
/// had they come one at a time. `Ok(true)` when a binary message ended the
/// burst: the loop closes the connection once the rest is handled. `Err`
/// once the connection is over, with why: if the client closed it or it
/// failed behind the burst, the burst is handled first (its publishes are
/// made; its replies go nowhere).
async fn handle_burst<S>(
    ws: &Shared<S>,
    session: &mut Session,
    first: walkie::Utf8Bytes,
) -> Result<bool, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Before `connect`, nothing large is needed (see the session's limit).
    let max_bytes = if session.is_connected() {
        BURST_BYTES
    } else {
        walkie_hub::MAX_BEFORE_CONNECT
    };
    let bytes = first.len();
    session.queue_text(first);
    let behind = read_burst(
        ws,
        bytes,
        (BURST_MESSAGES, max_bytes),
        |message| match message {
            Message::Text(text) => {
                session.queue_text(text);
                true
            }
            Message::Binary(_) => false,
        },
    )
    .await;
    let over = match behind {
        None => return handle_next(ws, session).await.map(|()| false),
        Some(Behind::Refused) => return handle_next(ws, session).await.map(|()| true),
        Some(Behind::Failed(e)) => format!("connection failed: {e}"),
        Some(Behind::Closed) => "closed by the client".into(),
    };
    // The connection is over: what came before the end is handled, its
    // replies dropped (there is no one to send them to), until the session
    // itself would close.
    while session.has_backlog() {
        let (_, close) = session.handle_next(now()).await;
        if close.is_some() {
            break;
        }
    }
    Err(over)
}

/// Handles the session's next waiting command (or run of publishes) and
/// queues the replies. `Err` once the connection is over, with why.
async fn handle_next<S>(ws: &Shared<S>, session: &mut Session) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (replies, close) = session.handle_next(now()).await;
    for reply in replies {
        // Queued at once: a client that reads nothing is paused by `recv`
        // and `send_batch`, which both still see shutdown.
        if let Err(e) = ws.lock().feed_now(Message::text(reply)) {
            return Err(format!("send failed: {e}"));
        }
    }
    match close {
        Some(close) => Err(Box::pin(close_with(ws, close)).await),
        None => Ok(()),
    }
}

/// Closes with the session's reason. Callers box it: it is rare, and its
/// state would otherwise be part of every session's task.
async fn close_with<S>(ws: &Shared<S>, close: CloseReason) -> String
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    close_within(ws, CloseCode(close.code), &close.reason).await;
    format!("closed with {}: {}", close.code, close.reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::{future_size, task_size};

    /// A session's task: 1024 bytes while it held the `WebSocket`, which is
    /// now in `Shared` (see `outbox.rs`), and 1152 before the loop and its
    /// deadline were restructured.
    #[test]
    fn an_idle_session_fits_a_768_byte_task() {
        type Args = (
            Arc<Shared<tokio::net::TcpStream>>,
            Session,
            Counted,
            SocketAddr,
        );
        let size = future_size(|(ws, session, counted, peer): Args| {
            connection(ws, session, counted, peer)
        });
        assert!(
            task_size(size) <= 768,
            "a session's future is {size} bytes: its task would be {}",
            task_size(size)
        );
    }
}
