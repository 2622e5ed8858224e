//! The WebSocket endpoints.

use std::future::Future;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info};
use walkie::{CloseCode, Incoming, Message, WebSocket};

use crate::outbox::Counted;
use crate::serve::AppState;
use crate::shutdown::TaskSlot;

/// What an endpoint does with each message, and says when a connection
/// ends. Implemented by unit structs: the endpoint costs its connections
/// no bytes.
trait Endpoint: Unpin {
    /// The answer to one message; `None` answers nothing.
    fn reply(message: Message) -> Option<Message>;
    /// Logs the end of a connection that was open.
    fn ended(peer: impl std::fmt::Display);
}

/// `/`: the seed's chat server. Every message is answered with
/// `You said: <message>`; connects and disconnects are logged.
pub async fn chat<S>(incoming: Incoming<S>, peer: SocketAddr, state: &AppState, counted: Counted)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    struct Chat;
    impl Endpoint for Chat {
        fn reply(m: Message) -> Option<Message> {
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

        fn ended(peer: impl std::fmt::Display) {
            info!(%peer, "Client disconnected");
        }
    }
    let Some(ws) = upgrade(incoming, peer, state).await else {
        return;
    };
    info!(%peer, "New client connected");
    let slot = state.shutdown_wakers.enter(peer);
    state
        .tracker
        .spawn(Answering::<S, Chat>::new(ws, slot, counted));
}

/// `/echo`: every message back unchanged, text as text, binary as binary.
pub async fn echo<S>(incoming: Incoming<S>, peer: SocketAddr, state: &AppState, counted: Counted)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    struct Echo;
    impl Endpoint for Echo {
        fn reply(m: Message) -> Option<Message> {
            Some(m)
        }

        fn ended(peer: impl std::fmt::Display) {
            debug!(%peer, "echo client disconnected");
        }
    }
    let Some(ws) = upgrade(incoming, peer, state).await else {
        return;
    };
    debug!(%peer, "echo client connected");
    let slot = state.shutdown_wakers.enter(peer);
    state
        .tracker
        .spawn(Answering::<S, Echo>::new(ws, slot, counted));
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

/// One open connection of `/` or `/echo`: answers messages until the
/// connection ends or the server shuts down.
///
/// Spawned as a task of its own for the connection's life: the task that
/// ran the handshake keeps room for everything it held (the request, the
/// routing), which an open connection no longer needs. Written by hand
/// rather than as an `async fn`: it holds the connection, the server's
/// state, its phase and a 4-byte shutdown slot (which keeps the peer's
/// address in the shutdown list), and nothing else, where an `async fn`
/// doing the same kept copies of its arguments and a 72-byte shutdown
/// future, and every idle connection paid for them (a 768-byte task
/// instead of 512, when the `WebSocket` was 352 bytes; 256 now).
///
/// Replies are queued with `feed_now`: a batch of messages that arrived in
/// one read is answered in one write. Nothing of a message is held while
/// waiting for room to queue the next.
struct Answering<S, E> {
    ws: WebSocket<S>,
    state: Counted,
    shutdown: TaskSlot,
    phase: Phase,
    endpoint: PhantomData<E>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the next message.
    Receiving,
    /// An answer was queued over the high-water mark: a client that does
    /// not read is paused here.
    Draining,
    /// Shutting down: our close frame is queued.
    Closing,
    /// Over.
    Done,
}

impl<S, E> Answering<S, E> {
    fn new(ws: WebSocket<S>, shutdown: TaskSlot, state: Counted) -> Self {
        Answering {
            ws,
            state,
            shutdown,
            phase: Phase::Receiving,
            endpoint: PhantomData,
        }
    }
}

impl<S, E> Future for Answering<S, E>
where
    S: AsyncRead + AsyncWrite + Unpin,
    E: Endpoint,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            // Shutdown first, so that a busy connection cannot starve it;
            // also while paused for a client that does not read.
            if matches!(this.phase, Phase::Receiving | Phase::Draining)
                && this
                    .state
                    .shutdown_wakers
                    .poll_task(&mut this.shutdown, cx)
                    .is_ready()
            {
                this.phase = Phase::Closing;
                if let Err(e) = this
                    .ws
                    .start_close(CloseCode::GOING_AWAY, "server shutting down")
                {
                    debug!(peer = %this.peer(), "close on shutdown: {e}");
                    this.finish();
                }
                continue;
            }
            match this.phase {
                Phase::Receiving => match ready!(this.ws.poll_recv(cx)) {
                    Some(Ok(message)) => {
                        if let Some(answer) = E::reply(message) {
                            match this.ws.feed_now(answer) {
                                Ok(()) => this.phase = Phase::Draining,
                                Err(e) => {
                                    debug!(peer = %this.peer(), "send failed: {e}");
                                    this.finish();
                                }
                            }
                        }
                    }
                    Some(Err(e)) => {
                        info!(peer = %this.peer(), "connection failed: {e}");
                        this.finish();
                    }
                    None => {
                        if let Some(frame) = this.ws.close_frame() {
                            debug!(peer = %this.peer(), "closed by client: {frame}");
                        }
                        this.finish();
                    }
                },
                Phase::Draining => match ready!(this.ws.poll_ready(cx)) {
                    Ok(()) => this.phase = Phase::Receiving,
                    Err(e) => {
                        debug!(peer = %this.peer(), "send failed: {e}");
                        this.finish();
                    }
                },
                Phase::Closing => {
                    if let Err(e) = ready!(this.ws.poll_close(cx)) {
                        debug!(peer = %this.peer(), "close on shutdown: {e}");
                    }
                    this.finish();
                }
                Phase::Done => return Poll::Ready(()),
            }
        }
    }
}

impl<S, E: Endpoint> Answering<S, E> {
    /// The connection is over: its slot leaves the shutdown list, with the
    /// peer for the log line. The task then drops it.
    fn finish(&mut self) {
        self.phase = Phase::Done;
        let peer = self.state.shutdown_wakers.remove_task(&mut self.shutdown);
        E::ended(LogPeer(peer));
    }

    /// The peer, for a log line (kept in the shutdown list, not here).
    fn peer(&self) -> LogPeer {
        LogPeer(self.state.shutdown_wakers.peer(&self.shutdown))
    }
}

impl<S, E> Drop for Answering<S, E> {
    fn drop(&mut self) {
        // Finished, or dropped unfinished (the runtime going away).
        self.state.shutdown_wakers.remove_task(&mut self.shutdown);
    }
}

/// A peer's address for a log line, `?` when the shutdown list lost it.
struct LogPeer(Option<SocketAddr>);

impl std::fmt::Display for LogPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => f.write_str("?"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every idle chat or echo connection is one of these in a tokio task:
    /// up to 144 bytes of future make a 256-byte task (one byte more: 384).
    /// See "Idle memory" in docs/performance.md.
    #[test]
    fn an_idle_connection_fits_a_256_byte_task() {
        struct Quiet;
        impl Endpoint for Quiet {
            fn reply(_: Message) -> Option<Message> {
                None
            }
            fn ended(_: impl std::fmt::Display) {}
        }
        let size = std::mem::size_of::<Answering<tokio::net::TcpStream, Quiet>>();
        assert!(
            crate::outbox::task_size(size) <= 256,
            "Answering is {size} bytes: its task would be {}",
            crate::outbox::task_size(size)
        );
    }
}
