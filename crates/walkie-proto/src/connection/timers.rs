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

/// The instants deadlines are computed from, each kept as a [`Stamp`]:
/// 24 bytes where an `Instant` and two `Option<Instant>` take 48, which
/// every idle connection pays for (see "Idle memory" in
/// docs/performance.md).
#[derive(Debug, Clone, Copy)]
pub(super) struct Timers {
    /// When data last arrived (or the connection opened).
    pub last_recv: Stamp,
    /// When the keepalive ping now awaiting an answer was sent.
    pub ping_sent: MaybeStamp,
    /// When the close handshake must be over.
    pub close_deadline: MaybeStamp,
}

impl Timers {
    pub fn new(now: Instant) -> Self {
        Timers {
            last_recv: Stamp::from(now),
            ping_sent: MaybeStamp::NONE,
            close_deadline: MaybeStamp::NONE,
        }
    }

    /// Records that data arrived: the peer is alive.
    pub fn on_receive(&mut self, now: Instant) {
        self.last_recv = Stamp::from(now);
        self.ping_sent = MaybeStamp::NONE;
    }
}

/// An `Instant` in 8 bytes: nanoseconds from a fixed instant of the
/// process (the first one converted), signed so that earlier instants fit
/// too. The conversion is exact both ways within 292 years of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Stamp(i64);

/// An optional [`Stamp`] in 8 bytes: `i64::MIN`, which no stamp is, for
/// none.
#[derive(Debug, Clone, Copy)]
pub(super) struct MaybeStamp(i64);

impl MaybeStamp {
    pub const NONE: MaybeStamp = MaybeStamp(i64::MIN);

    pub fn get(self) -> Option<Stamp> {
        (self.0 != i64::MIN).then_some(Stamp(self.0))
    }
}

impl From<Option<Stamp>> for MaybeStamp {
    fn from(s: Option<Stamp>) -> MaybeStamp {
        s.map_or(MaybeStamp::NONE, |s| MaybeStamp(s.0))
    }
}

impl Stamp {
    /// The instant stamps count from.
    fn epoch() -> Instant {
        static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *EPOCH.get_or_init(Instant::now)
    }

    /// `self + d`, or `None` past what a stamp holds: a deadline that far
    /// away is never reached.
    pub fn checked_add(self, d: Duration) -> Option<Stamp> {
        let nanos = i64::try_from(d.as_nanos()).ok()?;
        self.0.checked_add(nanos).map(Stamp)
    }
}

impl From<Instant> for Stamp {
    /// Instants beyond 292 years of the epoch are clamped to the furthest
    /// stamp.
    fn from(t: Instant) -> Stamp {
        let epoch = Stamp::epoch();
        let nanos = match t.checked_duration_since(epoch) {
            Some(after) => i64::try_from(after.as_nanos()).unwrap_or(i64::MAX),
            None => i64::try_from(epoch.duration_since(t).as_nanos()).map_or(-i64::MAX, |n| -n),
        };
        Stamp(nanos)
    }
}

impl From<Stamp> for Instant {
    fn from(s: Stamp) -> Instant {
        let epoch = Stamp::epoch();
        let d = Duration::from_nanos(s.0.unsigned_abs());
        let t = if s.0 >= 0 {
            epoch.checked_add(d)
        } else {
            epoch.checked_sub(d)
        };
        // Only a clamped stamp can miss; then the epoch is the best answer.
        t.unwrap_or(epoch)
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
            return t.close_deadline.get().map(Instant::from);
        }
        let keepalive = self
            .config
            .ping_interval
            .and_then(|interval| match t.ping_sent.get() {
                Some(sent) => sent.checked_add(self.config.ping_timeout),
                None => t.last_recv.checked_add(interval),
            });
        let idle = self
            .config
            .idle_timeout
            .and_then(|d| t.last_recv.checked_add(d));
        let next = match (keepalive, idle) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        next.map(Instant::from)
    }

    /// Advances time to `now`: sends a keepalive ping when one is due, and
    /// fails or ends the connection when a deadline passed. Calling it early
    /// is harmless.
    pub fn handle_timeout(&mut self, now: Instant) {
        let now = Stamp::from(now);
        if self.is_closed() {
            return;
        }
        if let Some(deadline) = self.timers.close_deadline.get() {
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
        match t.ping_sent.get() {
            Some(sent) if reached(now, sent, self.config.ping_timeout) => {
                self.fail(
                    Error::KeepaliveTimeout,
                    CloseFrame::new(CloseCode::INTERNAL_ERROR, "keepalive ping timeout"),
                );
            }
            None if reached(now, t.last_recv, interval) => {
                // Sending a ping cannot fail while open.
                let _ = self.send_ping(b"");
                self.timers.ping_sent = Some(now).into();
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
        self.peer_alive(now);
    }

    /// Records that the application held back what the peer sent (read
    /// nothing for a while on purpose: a rate limit, say) and reads on
    /// from `now`. The peer was sending, not idle: this counts for the
    /// keepalive and idle deadlines as received data does. Without it, a
    /// peer whose messages wait unread would be closed as idle, and a pong
    /// queued behind them would come too late.
    pub fn handle_read_resumed(&mut self, now: Instant) {
        self.peer_alive(now);
    }

    /// The peer counts as alive at `now`, as when data arrives.
    fn peer_alive(&mut self, now: Instant) {
        if !self.is_closed() {
            self.timers.on_receive(now);
        }
    }

    /// Starts the close deadline from `now`. A timeout too long to add to
    /// it sets none: the wait never ends.
    pub(super) fn arm_close_deadline(&mut self, now: Stamp) {
        if self.timers.close_deadline.get().is_none() {
            self.timers.close_deadline = now.checked_add(self.config.close_timeout).into();
        }
    }
}

/// Whether `now` is at least `duration` after `since`. A duration too long
/// to add to a stamp (`Duration::MAX`, say) is never reached.
fn reached(now: Stamp, since: Stamp, duration: Duration) -> bool {
    since
        .checked_add(duration)
        .is_some_and(|deadline| now >= deadline)
}

#[cfg(test)]
mod stamp_tests {
    use super::*;

    #[test]
    fn instants_round_trip_exactly_before_and_after_the_epoch() {
        let t = Instant::now();
        for d in [0, 1, 999, 1_000_000_007, 86_400_000_000_000] {
            let d = Duration::from_nanos(d);
            let later = t + d;
            assert_eq!(Instant::from(Stamp::from(later)), later);
            if let Some(earlier) = t.checked_sub(d) {
                assert_eq!(Instant::from(Stamp::from(earlier)), earlier);
            }
        }
        let (a, b) = (Stamp::from(t), Stamp::from(t + Duration::from_nanos(1)));
        assert!(a < b);
        assert_eq!(a.checked_add(Duration::from_nanos(1)), Some(b));
    }

    #[test]
    fn a_deadline_past_what_a_stamp_holds_is_never() {
        let s = Stamp::from(Instant::now());
        assert_eq!(s.checked_add(Duration::MAX), None);
        assert_eq!(s.checked_add(Duration::from_secs(400 * 365 * 86_400)), None);
        assert!(!reached(s, s, Duration::MAX));
        assert!(reached(s, s, Duration::ZERO));
    }

    #[test]
    fn maybe_stamp_keeps_none_apart() {
        let s = Stamp::from(Instant::now());
        assert_eq!(MaybeStamp::NONE.get(), None);
        assert_eq!(MaybeStamp::from(Some(s)).get(), Some(s));
        assert_eq!(MaybeStamp::from(None).get(), None);
        assert_eq!(std::mem::size_of::<Timers>(), 24);
    }
}
