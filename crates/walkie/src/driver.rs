//! The poll loop shared by [`crate::WebSocket`] and its split halves: it
//! moves bytes between the transport and the protocol core, and registers
//! the core's deadlines with the runtime's shared timers.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::io::{poll_read_buf, poll_write_buf};
use walkie_proto::{Connection, Event};

use crate::error::{Error, Result};
use crate::timer::{self, Timers};

/// Spare room below which the read buffer is grown before a read.
const MIN_READ_SPACE: usize = 1024;
/// How much to grow it by.
const READ_CHUNK: usize = 32 * 1024;
/// The most it is grown by at once for a large frame.
const MAX_READ_CHUNK: usize = 256 * 1024;

/// Buffers of idle connections, kept per thread for the next connection
/// that reads or writes: a busy connection goes idle after every batch, and
/// reusing its buffers spares allocations and frees each time, while an idle
/// connection holds none.
mod pool {
    use std::cell::RefCell;

    use walkie_proto::Buffers;

    /// Buffer sets kept per thread at most.
    const MAX_POOLED: usize = 64;
    /// Buffers smaller than this are not worth keeping; larger ones (after a
    /// big message) are returned to the allocator.
    const KEEP: std::ops::RangeInclusive<usize> = 4096..=64 * 1024;

    thread_local! {
        #[allow(clippy::vec_box, reason = "connections take and give back the boxes themselves")]
        static SPARE: RefCell<Vec<Box<Buffers>>> = const { RefCell::new(Vec::new()) };
    }

    /// A connection's buffers, from the pool if it has some.
    pub(super) fn take() -> Box<Buffers> {
        SPARE.with(|p| p.borrow_mut().pop()).unwrap_or_default()
    }

    /// Keeps `buffers` for later, or frees them.
    pub(super) fn give(mut buffers: Box<Buffers>) {
        buffers.reset(KEEP);
        SPARE.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < MAX_POOLED {
                p.push(buffers);
            }
        });
    }
}

/// The time the protocol core is given: tokio's clock, so that paused time
/// in tests drives keepalive and close deadlines too.
pub(crate) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// A transport and the protocol state that runs over it.
pub(crate) struct Driver<S> {
    pub(crate) stream: S,
    pub(crate) conn: Connection,
    /// The runtime's shared timers (see `timer.rs`), found on first use.
    timers: Option<Arc<Timers>>,
    /// The earliest deadline registered with them (as their nanoseconds,
    /// 0 for none: 8 bytes where an `Option<Instant>` takes 16), and the
    /// data pointer of the waker it wakes (a pointer, not the waker: 8 bytes
    /// less for every connection; a task's waker keeps its data pointer).
    /// Once `finishing`, `timer_at` is the deadline of the last writes
    /// instead, registered or not (`timer_task` 0 when not). Dropping the
    /// driver cancels the registration.
    timer_at: u64,
    timer_task: usize,
    /// Bytes queued above which senders wait and reading pauses; a `u32`
    /// (4 GiB at most) to keep the connection small.
    write_high: u32,
    /// The transport was shut down (or failed): nothing more to do.
    finished: bool,
    /// The end of the connection was reported to the reader.
    reported_end: bool,
    /// Everything queued was written, but the transport's flush waits (a
    /// TLS stream holding records the socket had no room for): flush again
    /// when it has room, though nothing is queued.
    flush_pending: bool,
    /// The connection is over and its last bytes are being written, within
    /// `close_timeout` (see `poll_finish_timer`).
    finishing: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Driver<S> {
    pub(crate) fn new(stream: S, conn: Connection, write_high: usize) -> Self {
        Driver {
            stream,
            conn,
            timers: timer::current(),
            timer_at: 0,
            timer_task: 0,
            write_high: u32::try_from(write_high).unwrap_or(u32::MAX),
            finished: false,
            reported_end: false,
            flush_pending: false,
            finishing: false,
        }
    }

    /// Writes everything queued, then flushes the transport.
    pub(crate) fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.conn.has_data_to_send() {
            let out = self.conn.data_to_send();
            // One contiguous chunk (the usual case: small frames are copied
            // together) goes out with a plain send, which costs the kernel
            // less than a one-element writev; several go out with writev.
            let n = if out.chunk().len() == out.remaining() {
                let n = ready!(Pin::new(&mut self.stream).poll_write(cx, out.chunk()))?;
                out.advance(n);
                n
            } else {
                ready!(poll_write_buf(Pin::new(&mut self.stream), cx, out))?
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
        }
        let flushed = Pin::new(&mut self.stream).poll_flush(cx);
        self.flush_pending = flushed.is_pending();
        flushed
    }

    /// Writes everything queued and flushes, as `poll_write_out`, while
    /// running the connection's deadlines: a peer that reads nothing
    /// cannot hold a writer forever.
    pub(crate) fn poll_write_all(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let queued = self.conn.queued_len();
        match self.poll_write_out(cx) {
            Poll::Ready(result) => Poll::Ready(result.map_err(Error::from)),
            Poll::Pending => self.poll_stalled(cx, queued).map(Err),
        }
    }

    /// While a write waits for the transport: runs the deadlines that
    /// `poll_event` would (keepalive, idle, close), as the task may poll
    /// nothing else meanwhile. Pending while the connection may still get
    /// room; an error once it is over: a keepalive or idle timeout failed
    /// it (the reader gets the reason), or its last writes are past
    /// `close_timeout`. `queued` is what was queued before the write that
    /// returned Pending: if it took some bytes, the peer is reading (the
    /// pongs it sends are not read meanwhile).
    fn poll_stalled(&mut self, cx: &mut Context<'_>, queued: usize) -> Poll<Error> {
        if self.conn.queued_len() < queued {
            let now = self.clock();
            self.conn.handle_write_progress(now);
        }
        loop {
            if self.finished {
                return Poll::Ready(Error::Closed);
            }
            let Some(deadline) = self.conn.poll_timeout() else {
                if self.conn.is_closed() {
                    ready!(self.poll_finish_timer(cx));
                    return Poll::Ready(Error::Closed);
                }
                return Poll::Pending;
            };
            ready!(self.poll_timer(deadline, cx));
            let now = self.clock();
            // A keepalive ping may be queued: into pooled buffers.
            self.ensure_buffers();
            self.conn.handle_timeout(now);
            if self.conn.is_closed() {
                return Poll::Ready(Error::Closed);
            }
        }
    }

    /// Waits until fewer than `write_high` bytes are queued, and makes sure
    /// the queue has a buffer to encode into.
    pub(crate) fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        if self.finished {
            return Poll::Ready(Err(Error::Closed));
        }
        while !self.has_room()? {
            let queued = self.conn.queued_len();
            match self.poll_write_out(cx) {
                Poll::Ready(result) => result?,
                Poll::Pending => return self.poll_stalled(cx, queued).map(Err),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Whether fewer than `write_high` bytes are queued; if so, makes sure
    /// the queue has a buffer to encode into. The check of `poll_ready`,
    /// without writing.
    pub(crate) fn has_room(&mut self) -> Result<bool> {
        if self.finished {
            return Err(Error::Closed);
        }
        if self.conn.queued_len() >= self.write_high as usize {
            return Ok(false);
        }
        self.ensure_buffers();
        let out = self.conn.data_to_send();
        if !out.has_buffer() {
            out.provide_buffer(BytesMut::with_capacity(READ_CHUNK));
        }
        Ok(true)
    }

    /// Gives the connection buffers from the pool if it has none, before
    /// anything is read or written: otherwise the core would make empty
    /// ones, and the first read or write would allocate.
    pub(crate) fn ensure_buffers(&mut self) {
        if !self.conn.has_buffers() {
            self.conn.provide_buffers(pool::take());
        }
    }

    /// Gives the buffers back to the pool, if nothing in them is needed.
    pub(crate) fn release_buffers(&mut self) {
        self.conn.release_buffers(pool::give);
    }

    /// Flushes what is queued and shuts the transport down.
    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.finished {
            ready!(self.poll_write_out(cx))?;
            // A peer that already left makes shutdown fail: that is fine.
            let _ = ready!(Pin::new(&mut self.stream).poll_shutdown(cx));
            self.finished = true;
            self.conn.release_buffers(pool::give);
        }
        Poll::Ready(Ok(()))
    }

    /// Drives the connection until the core has an event for the reader.
    ///
    /// `write_waker` is the waker used for write readiness; split halves pass
    /// one that wakes both of them.
    pub(crate) fn poll_event(
        &mut self,
        cx: &mut Context<'_>,
        write_waker: Option<&Waker>,
    ) -> Poll<Result<Option<Event>>> {
        loop {
            if self.reported_end {
                return Poll::Ready(Ok(None));
            }
            match self.conn.poll_event() {
                Ok(Some(event)) => return Poll::Ready(Ok(Some(event))),
                Ok(None) => {}
                Err(e) => {
                    // Best effort: send our close frame if the socket takes it
                    // now; a peer that broke the protocol gets no more time.
                    let ww = write_waker.unwrap_or(cx.waker());
                    let _ = self.poll_finish(&mut Context::from_waker(ww));
                    self.reported_end = true;
                    self.finished = true;
                    // A split writer waiting for room: it is over.
                    if let Some(ww) = write_waker {
                        ww.wake_by_ref();
                    }
                    return Poll::Ready(Err(e.into()));
                }
            }
            if self.conn.is_closed() {
                let ww = write_waker.unwrap_or(cx.waker());
                let result = match self.poll_finish(&mut Context::from_waker(ww)) {
                    Poll::Ready(result) => result.map_err(Error::from),
                    Poll::Pending => {
                        // A peer that reads nothing gets `close_timeout`
                        // for our last bytes, then the transport is
                        // dropped without them. The timer wakes both
                        // halves of a split connection, as every other
                        // deadline does.
                        ready!(self.poll_finish_timer(&mut Context::from_waker(ww)));
                        self.finished = true;
                        // A split writer waiting for room: it is over.
                        if let Some(ww) = write_waker {
                            ww.wake_by_ref();
                        }
                        Err(walkie_proto::Error::CloseTimeout.into())
                    }
                };
                self.reported_end = true;
                return Poll::Ready(result.map(|()| None));
            }

            let mut write_pending = false;
            // Nothing queued may still wait in the transport (a TLS stream's
            // records): flushed as soon as the socket has room.
            if self.conn.has_data_to_send() || self.flush_pending {
                let ww = write_waker.unwrap_or(cx.waker());
                match self.poll_write_out(&mut Context::from_waker(ww)) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => {
                        self.reported_end = true;
                        self.finished = true;
                        return Poll::Ready(Err(e.into()));
                    }
                    Poll::Pending => write_pending = true,
                }
            }

            if let Some(deadline) = self.conn.poll_timeout() {
                // Split halves register the shared waker (it wakes both),
                // as the writer does while it waits for room: one entry
                // that each replaces, not one per half in turn.
                let tw = write_waker.unwrap_or(cx.waker());
                if self
                    .poll_timer(deadline, &mut Context::from_waker(tw))
                    .is_ready()
                {
                    let now = self.clock();
                    // A keepalive ping may be written: into pooled buffers.
                    self.ensure_buffers();
                    self.conn.handle_timeout(now);
                    continue;
                }
            }

            // A peer that sends (pings, say) but never reads would make our
            // answers pile up: stop reading until they drain.
            if write_pending && self.conn.queued_len() >= self.write_high as usize {
                return Poll::Pending;
            }

            // Room for the rest of a large frame in one read, within reason:
            // a peer announcing a huge frame gets memory as it sends, not
            // before.
            let want = self.conn.read_hint().clamp(READ_CHUNK, MAX_READ_CHUNK);
            self.ensure_buffers();
            let mut buf = self.conn.read_buffer();
            if buf.capacity() - buf.len() < MIN_READ_SPACE.max(want) {
                buf.reserve(want);
            }
            match poll_read_buf(Pin::new(&mut self.stream), cx, &mut buf) {
                Poll::Ready(Ok(0)) => self.conn.handle_eof(),
                Poll::Ready(Ok(_)) => {
                    let now = self.clock();
                    self.conn.handle_read(now);
                }
                Poll::Ready(Err(e)) => {
                    self.reported_end = true;
                    self.finished = true;
                    return Poll::Ready(Err(e.into()));
                }
                Poll::Pending => {
                    // Going idle: an idle connection holds no buffers. The
                    // per-thread pool gives them back, with their memory, on
                    // the next read or write.
                    if !self.conn.has_data_to_send() {
                        self.conn.release_buffers(pool::give);
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// The time given to the protocol core: the runtime's coarse clock (see
    /// `timer.rs`), or tokio's clock outside a runtime.
    pub(crate) fn clock(&self) -> Instant {
        self.timers.as_ref().map_or_else(now, |t| t.now())
    }

    /// Whether `deadline` has passed; if not, makes sure the runtime's
    /// timers will wake this task by then.
    ///
    /// Deadlines usually move later (each read pushes keepalive back): the
    /// earlier registration then wakes the task early, it finds nothing due,
    /// and registers the new deadline. A registration happens only when no
    /// pending one would wake this task in time.
    fn poll_timer(&mut self, deadline: Instant, cx: &mut Context<'_>) -> Poll<()> {
        let now = self.clock();
        if deadline <= now {
            self.timer_at = 0;
            return Poll::Ready(());
        }
        if self.timers.is_none() {
            self.timers = timer::current();
        }
        let Some(timers) = &self.timers else {
            return Poll::Pending;
        };
        let task = cx.waker().data() as usize;
        let at = timers.nanos(deadline);
        let covered = self.timer_at > timers.nanos(now) && self.timer_at <= at;
        if !(covered && self.timer_task == task) {
            // This task's earlier registration is no longer needed; another
            // task's (the other half of a split) is left to fire.
            let replace = if self.timer_task == task {
                self.timer_at
            } else {
                0
            };
            self.timer_at = timers.register(deadline, cx.waker(), replace);
            self.timer_task = task;
        }
        Poll::Pending
    }

    /// Whether the last writes of a connection that is over (which the core
    /// gives no deadline) are past `close_timeout`, counted from the first
    /// call; if not, makes sure the runtime's timers wake this task by then.
    fn poll_finish_timer(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.timers.is_none() {
            self.timers = timer::current();
        }
        let Some(timers) = &self.timers else {
            return Poll::Pending;
        };
        let now = timers.now();
        let task = cx.waker().data() as usize;
        if !self.finishing {
            self.finishing = true;
            // The core's deadlines are over: this task's registration for
            // them is not needed (another task's is left to fire).
            if self.timer_at != 0 && self.timer_task == task {
                timers.cancel(self.timer_at, task);
            }
            // A timeout too long for an `Instant` never runs out.
            self.timer_at = now
                .checked_add(self.conn.config().close_timeout)
                .map_or(u64::MAX, |at| timers.nanos(at));
            self.timer_task = 0;
        }
        let deadline = timers.instant(self.timer_at);
        if deadline <= now {
            return Poll::Ready(());
        }
        if self.timer_task != task {
            self.timer_at = timers.register(deadline, cx.waker(), 0);
            self.timer_task = task;
        }
        Poll::Pending
    }
}

/// `timeout` from now, as tokio's timers take it; a timeout too long for an
/// `Instant` (`Duration::MAX`: never) ends in about thirty years.
pub(crate) fn deadline_after(timeout: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(30 * 365 * 24 * 3600))
}

impl<S> Drop for Driver<S> {
    /// Cancels the pending timer registration, which would otherwise keep
    /// the task that registered it (its memory) until the deadline.
    fn drop(&mut self) {
        if let Some(timers) = &self.timers {
            if self.timer_at != 0 && self.timer_task != 0 {
                timers.cancel(self.timer_at, self.timer_task);
            }
        }
    }
}
