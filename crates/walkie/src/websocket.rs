//! [`WebSocket`]: an open connection over any async transport.

use std::future::poll_fn;
use std::task::{Context, Poll, Waker, ready};

use tokio::io::{AsyncRead, AsyncWrite};
use walkie_proto::{CloseCode, CloseFrame, Connection, Event, Message, PreparedMessage, Role};

use crate::driver::{Driver, now};
use crate::error::Result;
use crate::split::{WsReader, WsWriter, split};

/// An open WebSocket connection over a transport `S` (a `TcpStream`, a TLS
/// stream, or anything `AsyncRead + AsyncWrite`).
///
/// Receiving with [`WebSocket::recv`] also answers pings, keeps the
/// connection alive and writes whatever is queued. Sending has two forms:
/// [`WebSocket::send`] writes at once; [`WebSocket::feed`] only queues (up to
/// the configured high-water mark, then it waits for the socket), so that a
/// burst of messages leaves in one write at the next `recv`, `flush` or
/// `send`.
///
/// ```no_run
/// # async fn run() -> walkie::Result<()> {
/// let mut ws = walkie::connect("ws://127.0.0.1:3000/echo").await?;
/// ws.send("hello").await?;
/// while let Some(msg) = ws.recv().await {
///     println!("{:?}", msg?);
/// }
/// # Ok(()) }
/// ```
pub struct WebSocket<S> {
    /// The subprotocol is kept by the connection, with what else most
    /// connections lack (see [`Connection::protocol`]).
    driver: Driver<S>,
}

impl<S> std::fmt::Debug for WebSocket<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebSocket")
            .field("role", &self.driver.conn.role())
            .field("state", &self.driver.conn.state())
            .field("protocol", &self.driver.conn.protocol())
            .finish_non_exhaustive()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WebSocket<S> {
    /// Wraps a transport whose handshake is done. `conn` is the protocol
    /// state, and `leftover` bytes that arrived right after the handshake.
    pub fn from_parts(
        stream: S,
        mut conn: Connection,
        leftover: &[u8],
        protocol: Option<String>,
        write_buffer_high: usize,
    ) -> Self {
        if !leftover.is_empty() {
            conn.handle_data(now(), leftover);
        }
        if protocol.is_some() {
            conn.set_protocol(protocol);
        }
        WebSocket {
            driver: Driver::new(stream, conn, write_buffer_high),
        }
    }

    /// The next message. Returns `None` once the connection closed cleanly
    /// (see [`WebSocket::close_frame`] for the peer's code), and an error if it
    /// failed; after either, it keeps returning `None`.
    pub async fn recv(&mut self) -> Option<Result<Message>> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// The poll form of [`recv`](WebSocket::recv), for a hand-written
    /// future: one that holds the connection and little else is smaller
    /// than an `async fn` doing the same (see `handlers.rs` in walkie-cli).
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Message>>> {
        loop {
            match ready!(self.driver.poll_event(cx, None)) {
                Ok(Some(Event::Message(m))) => return Poll::Ready(Some(Ok(m))),
                Ok(Some(_)) => continue,
                Ok(None) => return Poll::Ready(None),
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
        }
    }

    /// Queues a message and writes everything queued.
    pub async fn send(&mut self, message: impl Into<Message>) -> Result<()> {
        self.feed(message).await?;
        self.flush().await
    }

    /// Queues a message without writing it, unless the queue is over the
    /// high-water mark, in which case it first waits for the socket to drain.
    /// Queued messages leave at the next `recv`, `flush` or `send`.
    pub async fn feed(&mut self, message: impl Into<Message>) -> Result<()> {
        poll_fn(|cx| self.driver.poll_ready(cx)).await?;
        self.driver.conn.send(message.into())?;
        Ok(())
    }

    /// Tells the connection that the application held back what the peer
    /// sent (polled nothing for a while on purpose, such as a rate limit)
    /// and reads on now: the peer counts as active now for the idle
    /// timeout and keepalive pings, as when data arrives. Without it, a
    /// peer whose messages wait unread would be closed as idle, and a pong
    /// queued behind them would come too late.
    pub fn resume_reading(&mut self) {
        let now = self.driver.clock();
        self.driver.conn.handle_read_resumed(now);
    }

    /// Queues a message at once, even over the high-water mark; follow it
    /// with [`ready`] to wait for the socket to drain as [`feed`] would have
    /// before queuing. The pair holds no message across the wait, so a
    /// connection's task stays small (see `handlers.rs` in walkie-cli).
    ///
    /// [`ready`]: WebSocket::ready
    /// [`feed`]: WebSocket::feed
    pub fn feed_now(&mut self, message: impl Into<Message>) -> Result<()> {
        // Errors once the connection is over; gives the queue a pooled
        // buffer when it has none.
        self.driver.has_room()?;
        self.driver.conn.send(message.into())?;
        Ok(())
    }

    /// Waits until fewer bytes than the high-water mark are queued: what
    /// [`feed`] waits for before it queues. Meanwhile the keepalive and
    /// idle deadlines run: a peer that reads nothing fails the connection
    /// when they pass, and this returns an error (`recv` then gives the
    /// reason).
    ///
    /// [`feed`]: WebSocket::feed
    pub async fn ready(&mut self) -> Result<()> {
        poll_fn(|cx| self.poll_ready(cx)).await
    }

    /// The poll form of [`ready`](WebSocket::ready).
    pub fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.driver.poll_ready(cx)
    }

    /// Queues a message framed once for many connections, as [`feed`]
    /// does: a broadcast shares one frame (see [`PreparedMessage`]).
    ///
    /// [`feed`]: WebSocket::feed
    pub async fn feed_prepared(&mut self, message: &PreparedMessage) -> Result<()> {
        poll_fn(|cx| self.driver.poll_ready(cx)).await?;
        self.driver.conn.send_prepared(message)?;
        Ok(())
    }

    /// Queues a prepared message at once if the write queue is under its
    /// high-water mark, without waiting: `Ok(false)` means it was not
    /// queued, and [`feed_prepared`] waits for room. For a connection that
    /// queues many messages at a time (a subscriber's backlog).
    ///
    /// [`feed_prepared`]: WebSocket::feed_prepared
    pub fn try_feed_prepared(&mut self, message: &PreparedMessage) -> Result<bool> {
        if !self.driver.has_room()? {
            return Ok(false);
        }
        self.driver.conn.send_prepared(message)?;
        Ok(true)
    }

    /// Writes what is queued as far as the transport takes it now, without
    /// waiting: `Ok(true)` when everything went out. For a writer other
    /// than the connection's own task (a fan-out loop that writes many
    /// subscribers in turn). It registers no waker of its own: after
    /// `Ok(false)`, wake the task that polls [`recv`](WebSocket::recv),
    /// which writes the rest when the socket has room. A connection left
    /// with nothing to write and nothing half-read gives its buffers back,
    /// as an idle one does.
    pub fn try_flush(&mut self) -> Result<bool> {
        let mut cx = Context::from_waker(Waker::noop());
        match self.driver.poll_write_out(&mut cx) {
            Poll::Ready(Ok(())) => {
                self.driver.release_buffers();
                Ok(true)
            }
            Poll::Ready(Err(e)) => Err(e.into()),
            Poll::Pending => Ok(false),
        }
    }

    /// Writes everything queued. A peer that reads nothing holds it until
    /// a keepalive or idle deadline fails the connection (or, once it is
    /// over, `close_timeout` passes): then it returns an error.
    pub async fn flush(&mut self) -> Result<()> {
        poll_fn(|cx| self.driver.poll_write_all(cx)).await
    }

    /// Sends a ping (payload at most 125 bytes). The pong is handled by
    /// `recv`.
    pub async fn ping(&mut self, payload: &[u8]) -> Result<()> {
        poll_fn(|cx| self.driver.poll_ready(cx)).await?;
        self.driver.conn.send_ping(payload)?;
        self.flush().await
    }

    /// Closes the connection: sends a close frame, discards messages until the
    /// peer answers (or `close_timeout` passes), and shuts the transport down.
    pub async fn close(&mut self, code: CloseCode, reason: &str) -> Result<()> {
        self.start_close(code, reason)?;
        poll_fn(|cx| self.poll_close(cx)).await
    }

    /// Queues a close frame: the first half of [`close`](WebSocket::close),
    /// for a hand-written future, which then polls
    /// [`poll_close`](WebSocket::poll_close). Closing twice is not an error.
    pub fn start_close(&mut self, code: CloseCode, reason: &str) -> Result<()> {
        self.driver.ensure_buffers();
        match self
            .driver
            .conn
            .send_close(now(), Some(CloseFrame::new(code, reason)))
        {
            Ok(()) | Err(walkie_proto::SendError::Closing) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Discards messages until the closing handshake is over and the
    /// transport is shut down: the second half of [`close`](WebSocket::close).
    pub fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        loop {
            match ready!(self.driver.poll_event(cx, None)) {
                Ok(Some(_)) => continue,
                Ok(None) => return Poll::Ready(Ok(())),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// The close frame the peer sent, once received.
    pub fn close_frame(&self) -> Option<&CloseFrame> {
        self.driver.conn.close_received().and_then(Option::as_ref)
    }

    /// The subprotocol negotiated in the handshake.
    pub fn protocol(&self) -> Option<&str> {
        self.driver.conn.protocol()
    }

    /// Whether permessage-deflate was negotiated.
    pub fn is_compressed(&self) -> bool {
        self.driver.conn.is_compressed()
    }

    /// This end's role.
    pub fn role(&self) -> Role {
        self.driver.conn.role()
    }

    /// The transport.
    pub fn get_ref(&self) -> &S {
        &self.driver.stream
    }

    /// Splits into a reader and a writer that can be used from two tasks.
    /// The reader answers pings and runs the keepalive timer, so keep
    /// polling it.
    pub fn split(self) -> (WsReader<S>, WsWriter<S>) {
        let protocol = self.driver.conn.protocol().map(str::to_owned);
        split(self.driver, protocol)
    }
}
