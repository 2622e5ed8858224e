//! Keepalive, idle and close deadlines. Time comes in from the I/O layer;
//! nothing here reads a clock.
//!
//! Deadlines are derived from a few instants rather than stored per timer, so
//! receiving data costs one store (`last_recv`) and no timer re-arming. An I/O
//! layer may sleep until an older, earlier deadline and simply find nothing
//! due when it wakes.

use std::time::{Duration, Instant};

use super::{Connection, Role};
use crate::close::{CloseCode, CloseFrame};
use crate::error::Error;

/// The instants deadlines are computed from.
#[derive(Debug, Clone, Copy)]
pub(super) struct Timers {
    /// The latest time the I/O layer gave us.
    pub now: Instant,
    /// When data last arrived (or the connection opened).
    pub last_recv: Instant,
    /// When the keepalive ping now awaiting an answer was sent.
    pub ping_sent: Option<Instant>,
    /// When the close handshake must be over.
    pub close_deadline: Option<Instant>,
}

impl Timers {
    pub fn new(now: Instant) -> Self {
        Timers {
            now,
            last_recv: now,
            ping_sent: None,
            close_deadline: None,
        }
    }

    /// Records that data arrived: the peer is alive.
    pub fn on_receive(&mut self, now: Instant) {
        self.now = now;
        self.last_recv = now;
        self.ping_sent = None;
    }
}

impl Connection {
    /// When [`Connection::handle_timeout`] should next be called, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.is_closed() {
            return None;
        }
        let t = &self.timers;
        if self.close_sent().is_some() || self.close_received().is_some() {
            // Keepalive stops once closing; only the close deadline remains.
            return t.close_deadline;
        }
        let keepalive = self
            .config
            .ping_interval
            .and_then(|interval| match t.ping_sent {
                Some(sent) => sent.checked_add(self.config.ping_timeout),
                None => t.last_recv.checked_add(interval),
            });
        let idle = self
            .config
            .idle_timeout
            .and_then(|d| t.last_recv.checked_add(d));
        match (keepalive, idle) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Advances time to `now`: sends a keepalive ping when one is due, and
    /// fails or ends the connection when a deadline passed. Calling it early
    /// is harmless.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.timers.now = now;
        if self.is_closed() {
            return;
        }
        if let Some(deadline) = self.timers.close_deadline {
            if now >= deadline {
                self.closed = true;
                // A client whose close handshake finished was only waiting
                // for the server's FIN: that is not an error.
                let handshake_done = self.close_sent().is_some() && self.close_received().is_some();
                if !(handshake_done && self.role == Role::Client) {
                    self.ending_mut()
                        .pending_error
                        .get_or_insert(Error::CloseTimeout);
                }
            }
            return;
        }
        if self.close_sent().is_some() || self.close_received().is_some() {
            return;
        }
        let t = self.timers;
        if let Some(idle) = self.config.idle_timeout {
            if reached(now, t.last_recv, idle) {
                self.fail(
                    Error::IdleTimeout,
                    CloseFrame::new(CloseCode::GOING_AWAY, "idle timeout"),
                );
                return;
            }
        }
        let Some(interval) = self.config.ping_interval else {
            return;
        };
        match t.ping_sent {
            Some(sent) if reached(now, sent, self.config.ping_timeout) => {
                self.fail(
                    Error::KeepaliveTimeout,
                    CloseFrame::new(CloseCode::INTERNAL_ERROR, "keepalive ping timeout"),
                );
            }
            None if reached(now, t.last_recv, interval) => {
                // Sending a ping cannot fail while open.
                let _ = self.send_ping(b"");
                self.timers.ping_sent = Some(now);
            }
            _ => {}
        }
    }

    /// Records that the transport took bytes it had no room for before:
    /// the peer is reading, so it is alive. This counts for the keepalive
    /// and idle deadlines as received data does: an I/O layer that stops
    /// reading while a write waits for room (backpressure) would otherwise
    /// miss the pongs of a peer that reads slowly but steadily, and fail it.
    pub fn handle_write_progress(&mut self, now: Instant) {
        if !self.is_closed() {
            self.timers.on_receive(now);
        }
    }

    /// Starts the close deadline from the latest known time. A timeout too
    /// long to add to it sets none: the wait never ends.
    pub(super) fn arm_close_deadline(&mut self) {
        if self.timers.close_deadline.is_none() {
            self.timers.close_deadline = self.timers.now.checked_add(self.config.close_timeout);
        }
    }
}

/// Whether `now` is at least `duration` after `since`. A duration too long
/// to add to an `Instant` (`Duration::MAX`, say) is never reached.
fn reached(now: Instant, since: Instant, duration: Duration) -> bool {
    since
        .checked_add(duration)
        .is_some_and(|deadline| now >= deadline)
}
