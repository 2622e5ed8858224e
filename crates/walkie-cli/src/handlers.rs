//! The WebSocket endpoints.

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info};
use walkie::{CloseCode, Incoming, Message, WebSocket};

use crate::outbox::Counted;
use crate::serve::AppState;

/// What an endpoint answers to one message; `None` answers nothing.
type Reply = fn(Message) -> Option<Message>;

/// `/`: the seed's chat server. Every message is answered with
/// `You said: <message>`; connects and disconnects are logged.
pub async fn chat<S>(incoming: Incoming<S>, peer: SocketAddr, state: &AppState, counted: Counted)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(mut ws) = upgrade(incoming, peer, state).await else {
        return;
    };
    info!(%peer, "New client connected");
    fn you_said(m: Message) -> Option<Message> {
        let text = match &m {
            Message::Text(t) => t.to_string(),
            // Node's `${message}` of a Buffer: its bytes as (lossy) UTF-8.
            Message::Binary(b) => String::from_utf8_lossy(b).into_owned(),
        };
        // As the seed logs it, but a huge message gets a short line.
        match text.char_indices().nth(200) {
            Some((cut, _)) => info!("Received: {}… ({} bytes)", &text[..cut], text.len()),
            None => info!("Received: {text}"),
        }
        Some(Message::text(format!("You said: {text}")))
    }
    state.tracker.spawn(async move {
        run(&mut ws, &peer, &counted, you_said).await;
        info!(%peer, "Client disconnected");
        drop(counted);
    });
}

/// `/echo`: every message back unchanged, text as text, binary as binary.
pub async fn echo<S>(incoming: Incoming<S>, peer: SocketAddr, state: &AppState, counted: Counted)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(mut ws) = upgrade(incoming, peer, state).await else {
        return;
    };
    debug!(%peer, "echo client connected");
    // A task of its own for the connection's life: the task that ran the
    // handshake keeps room for everything it held (the request, the
    // routing), which an open connection no longer needs. Its first poll
    // answers what arrived with the handshake.
    state.tracker.spawn(async move {
        run(&mut ws, &peer, &counted, Some).await;
        debug!(%peer, "echo client disconnected");
        drop(counted);
    });
}

async fn upgrade<S>(
    incoming: Incoming<S>,
    peer: SocketAddr,
    state: &AppState,
) -> Option<WebSocket<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Boxed: the handshake's state is short-lived and should not count in
    // the size of every connection's task for its whole life.
    match Box::pin(incoming.accept(&state.config, None)).await {
        Ok(ws) => Some(ws),
        Err(e) => {
            debug!(%peer, "upgrade refused: {e}");
            None
        }
    }
}

/// Answers messages until the connection ends or the server shuts down.
///
/// Replies are queued with `feed_now`: a batch of messages that arrived in one
/// read is answered in one write. The connection is borrowed, not moved:
/// moving it into this future would store it twice in the task.
async fn run<S>(ws: &mut WebSocket<S>, peer: &SocketAddr, state: &AppState, reply: Reply)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Created once: registering a fresh waiter on the token for every
    // message would cost a lock per message.
    let shutdown = state.shutdown.cancelled();
    tokio::pin!(shutdown);
    loop {
        // The message is handled within this block, and the wait for room
        // comes after it: nothing of the message is held across the wait,
        // and the task is smaller for it.
        let queued = {
            let next = tokio::select! {
                // Shutdown first, so that a busy connection cannot starve it.
                biased;
                () = &mut shutdown => None,
                next = ws.recv() => Some(next),
            };
            let Some(next) = next else {
                break;
            };
            match next {
                Some(Ok(message)) => match reply(message) {
                    Some(answer) => {
                        if let Err(e) = ws.feed_now(answer) {
                            debug!(%peer, "send failed: {e}");
                            return;
                        }
                        true
                    }
                    None => false,
                },
                Some(Err(e)) => {
                    info!(%peer, "connection failed: {e}");
                    return;
                }
                None => {
                    if let Some(frame) = ws.close_frame() {
                        debug!(%peer, "closed by client: {frame}");
                    }
                    return;
                }
            }
        };
        // Queued at once; a client that does not read is paused here.
        if queued {
            if let Err(e) = ws.ready().await {
                debug!(%peer, "send failed: {e}");
                return;
            }
        }
    }
    // Only shutdown leaves the loop this way.
    if let Err(e) = ws
        .close(CloseCode::GOING_AWAY, "server shutting down")
        .await
    {
        debug!(%peer, "close on shutdown: {e}");
    }
}
