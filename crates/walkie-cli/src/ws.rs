//! `/ws`: the Walkie protocol (`docs/protocol.md`). This file only moves
//! messages: `walkie_hub::Session` decides what they mean.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info};
use walkie::{CloseCode, Incoming, Message, WebSocket};
use walkie_hub::protocol::SUBPROTOCOL;
use walkie_hub::{CloseReason, QueueClosed, Session};

use crate::outbox::{Counted, Sent, close_within, send_batch};
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
    let origins = &state.node.config.auth.allowed_origins;
    if let Some(origin) = incoming.request().origin() {
        if !origins.is_empty() && !origins.iter().any(|o| o == origin) {
            let message = format!("origin {origin} is not allowed");
            info!(%peer, origin, "origin refused");
            incoming.reject(403, &message).await;
            return;
        }
    }
    let mut ws = match Box::pin(incoming.accept(&state.config, Some(SUBPROTOCOL))).await {
        Ok(ws) => ws,
        Err(e) => {
            debug!(%peer, "upgrade refused: {e}");
            return;
        }
    };
    let mut session = Session::new(state.node.clone(), now());
    state.tracker.spawn(async move {
        let why = run(&mut ws, &mut session, &counted).await;
        session.close().await;
        debug!(%peer, client = %session.client_id(), "walkie protocol connection ended: {why}");
    });
}

/// Relays until the connection ends; returns why.
async fn run<S>(ws: &mut WebSocket<S>, session: &mut Session, state: &AppState) -> String
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // 16 bytes where `state.shutdown.cancelled()` holds 72.
    let mut shutdown = state.shutdown_wakers.waiter();
    let mut batch = Vec::new();
    loop {
        let deadline = session.deadline();
        let timer = async {
            match deadline {
                Some(at) => {
                    let wait = at.saturating_sub(now());
                    tokio::time::sleep(Duration::from_secs(wait)).await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            () = poll_fn(|cx| shutdown.poll(cx)) => {
                let _ = ws.close(CloseCode::GOING_AWAY, "server shutting down").await;
                return "server shutting down".into();
            }
            popped = session.queue().pop_all(&mut batch) => {
                let closed = match popped {
                    Ok(()) => match send_batch(ws, &mut batch, session.queue(), &mut shutdown).await {
                        // Shutdown: the first branch closes.
                        Ok(()) | Err(Sent::Shutdown) => continue,
                        Err(Sent::Failed(e)) => return format!("send failed: {e}"),
                        Err(Sent::Closed(why)) => why,
                    },
                    Err(why) => why,
                };
                if closed == QueueClosed::SlowConsumer {
                    crate::outbox::overflowed(state.hub.metrics());
                }
                let (code, reason) = match closed {
                    QueueClosed::SlowConsumer => (CloseCode::TRY_AGAIN_LATER, "slow consumer: reconnect and recover"),
                    QueueClosed::Disconnected => (CloseCode(4009), "disconnected by the server"),
                };
                close_within(ws, code, reason).await;
                return reason.into();
            }
            () = timer => {
                // Boxed, as the command below: rare, and large (auth, the
                // engine's calls); unboxed they would size every session's
                // task for its whole life.
                if let Some(close) = Box::pin(session.handle_timeout(now())).await {
                    return close_with(ws, close).await;
                }
            }
            next = ws.recv() => match next {
                Some(Ok(Message::Text(text))) => match Box::pin(session.handle_text(&text, now())).await {
                    Ok(reply) => {
                        // Before anything the command queued (a subscribe's
                        // recovered messages): the queue is drained after.
                        // Queued at once: a client that reads nothing is
                        // paused by `recv` and `send_batch`, which both
                        // still see shutdown.
                        if let Err(e) = ws.feed_now(Message::text(reply)) {
                            return format!("send failed: {e}");
                        }
                    }
                    Err(close) => return close_with(ws, close).await,
                },
                Some(Ok(Message::Binary(_))) => {
                    let close = CloseReason { code: 4000, reason: "binary messages are not part of the protocol".into() };
                    return close_with(ws, close).await;
                }
                Some(Err(e)) => return format!("connection failed: {e}"),
                None => return "closed by the client".into(),
            },
        }
    }
}

async fn close_with<S>(ws: &mut WebSocket<S>, close: CloseReason) -> String
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    close_within(ws, CloseCode(close.code), &close.reason).await;
    format!("closed with {}: {}", close.code, close.reason)
}
