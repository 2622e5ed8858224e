//! A WebSocket split into a reader and a writer for two tasks.
//!
//! Both halves share the driver behind a mutex held only while polling. Both
//! may write (the reader writes pongs and close answers), but a transport
//! keeps one waker for write readiness; so writes are polled with a waker
//! that wakes both halves, and neither can strand the other.

use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Wake, Waker};

use tokio::io::{AsyncRead, AsyncWrite};
use walkie_proto::{CloseCode, CloseFrame, Event, Message, PreparedMessage};

use crate::driver::{Driver, now};
use crate::error::Result;

/// The wakers of both halves; waking it wakes whichever are waiting.
#[derive(Default)]
struct WriteWakers {
    reader: Mutex<Option<Waker>>,
    writer: Mutex<Option<Waker>>,
}

impl Wake for WriteWakers {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        for slot in [&self.reader, &self.writer] {
            if let Some(w) = lock(slot).take() {
                w.wake();
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves plain data behind;
    // carry on rather than propagate the panic.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn register(slot: &Mutex<Option<Waker>>, waker: &Waker) {
    let mut slot = lock(slot);
    match &*slot {
        Some(w) if w.will_wake(waker) => {}
        _ => *slot = Some(waker.clone()),
    }
}

struct Shared<S> {
    driver: Mutex<Driver<S>>,
    wakers: Arc<WriteWakers>,
    protocol: Option<String>,
}

/// The receiving half of a split [`crate::WebSocket`].
pub struct WsReader<S> {
    shared: Arc<Shared<S>>,
}

/// The sending half of a split [`crate::WebSocket`].
pub struct WsWriter<S> {
    shared: Arc<Shared<S>>,
}

impl<S> std::fmt::Debug for WsReader<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsReader").finish_non_exhaustive()
    }
}

impl<S> std::fmt::Debug for WsWriter<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsWriter").finish_non_exhaustive()
    }
}

pub(crate) fn split<S>(driver: Driver<S>, protocol: Option<String>) -> (WsReader<S>, WsWriter<S>) {
    let shared = Arc::new(Shared {
        driver: Mutex::new(driver),
        wakers: Arc::default(),
        protocol,
    });
    (
        WsReader {
            shared: shared.clone(),
        },
        WsWriter { shared },
    )
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsReader<S> {
    /// The next message; see [`crate::WebSocket::recv`].
    pub async fn recv(&mut self) -> Option<Result<Message>> {
        let shared = &self.shared;
        let write_waker = Waker::from(shared.wakers.clone());
        loop {
            let event = poll_fn(|cx| {
                register(&shared.wakers.reader, cx.waker());
                lock(&shared.driver).poll_event(cx, Some(&write_waker))
            })
            .await;
            match event {
                Ok(Some(Event::Message(m))) => return Some(Ok(m)),
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// The close frame the peer sent, once received.
    pub fn close_frame(&self) -> Option<CloseFrame> {
        lock(&self.shared.driver)
            .conn
            .close_received()
            .cloned()
            .flatten()
    }

    /// The subprotocol negotiated in the handshake.
    pub fn protocol(&self) -> Option<&str> {
        self.shared.protocol.as_deref()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsWriter<S> {
    /// Polls with the shared write waker, after registering this task's.
    async fn with_driver<T>(
        &self,
        mut f: impl FnMut(&mut Driver<S>, &mut std::task::Context<'_>) -> std::task::Poll<T>,
    ) -> T {
        let shared = &self.shared;
        let write_waker = Waker::from(shared.wakers.clone());
        poll_fn(|cx| {
            register(&shared.wakers.writer, cx.waker());
            f(
                &mut lock(&shared.driver),
                &mut std::task::Context::from_waker(&write_waker),
            )
        })
        .await
    }

    /// Queues a message and writes everything queued.
    pub async fn send(&mut self, message: impl Into<Message>) -> Result<()> {
        self.feed(message).await?;
        self.flush().await
    }

    /// Queues a message; see [`crate::WebSocket::feed`].
    pub async fn feed(&mut self, message: impl Into<Message>) -> Result<()> {
        let message = message.into();
        let mut message = Some(message);
        self.with_driver(|d, cx| {
            let ready = std::task::ready!(d.poll_ready(cx));
            std::task::Poll::Ready(ready.and_then(|()| match message.take() {
                Some(m) => d.conn.send(m).map_err(Into::into),
                None => Ok(()),
            }))
        })
        .await
    }

    /// Queues a message framed once; see [`crate::WebSocket::feed_prepared`].
    pub async fn feed_prepared(&mut self, message: &PreparedMessage) -> Result<()> {
        self.with_driver(|d, cx| {
            let ready = std::task::ready!(d.poll_ready(cx));
            std::task::Poll::Ready(
                ready.and_then(|()| d.conn.send_prepared(message).map_err(Into::into)),
            )
        })
        .await
    }

    /// Writes everything queued; see [`crate::WebSocket::flush`].
    pub async fn flush(&mut self) -> Result<()> {
        self.with_driver(|d, cx| d.poll_write_all(cx)).await
    }

    /// Sends a close frame. The reader sees the end of the connection once the
    /// peer answers (or `close_timeout` passes).
    pub async fn close(&mut self, code: CloseCode, reason: &str) -> Result<()> {
        {
            let mut d = lock(&self.shared.driver);
            d.ensure_buffers();
            match d
                .conn
                .send_close(now(), Some(CloseFrame::new(code, reason)))
            {
                Ok(()) | Err(walkie_proto::SendError::Closing) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // Wake the reader so it arms the close deadline's timer.
        self.shared.wakers.wake_by_ref();
        self.flush().await
    }
}
