//! A connection's publish rate limit (`walkie serve --client-publish-rate`):
//! at most N client publishes per second of the clock, counted per whole
//! second. It keeps one connection from flooding a channel, and through it
//! every subscriber's queue (a flood in a busy room would otherwise cut the
//! room's slow readers off as slow consumers), and bounds how fast one
//! connection can fill history with new channels.

use std::num::NonZeroU32;

/// The publishes a connection made in the current second: 8 bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PublishWindow {
    /// The second they were counted in (seconds since the Unix epoch,
    /// modulo 2^32: two seconds 136 years apart count as one).
    second: u32,
    /// How many were allowed in it (never more than the limit).
    used: u32,
}

impl PublishWindow {
    /// How many more publishes `limit` allows at `now` (`usize::MAX`
    /// without a limit).
    pub fn left(&self, now: u64, limit: Option<NonZeroU32>) -> usize {
        match limit {
            None => usize::MAX,
            Some(limit) if now as u32 == self.second => {
                limit.get().saturating_sub(self.used) as usize
            }
            Some(limit) => limit.get() as usize,
        }
    }

    /// Takes up to `wanted` publishes at `now` (seconds since the Unix
    /// epoch) under `limit` per second (`None`: no limit); returns how many
    /// are allowed, the first ones. Those refused are not counted.
    pub fn take(&mut self, now: u64, wanted: usize, limit: Option<NonZeroU32>) -> usize {
        let Some(limit) = limit else {
            return wanted;
        };
        // Truncation intended: only equality with the last second matters.
        let second = now as u32;
        if second != self.second {
            self.second = second;
            self.used = 0;
        }
        let left = limit.get().saturating_sub(self.used);
        let allowed = wanted.min(left as usize);
        // At most `left`, so within u32 and the limit.
        self.used += allowed as u32;
        allowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(n: u32) -> Option<NonZeroU32> {
        NonZeroU32::new(n)
    }

    #[test]
    fn at_most_the_limit_per_second_then_a_new_second_starts_afresh() {
        let mut w = PublishWindow::default();
        assert_eq!(w.take(1_000, 2, limit(3)), 2);
        assert_eq!(w.take(1_000, 5, limit(3)), 1, "one left this second");
        assert_eq!(w.take(1_000, 1, limit(3)), 0, "none left");
        assert_eq!(w.take(1_001, 4, limit(3)), 3, "a new second");
        assert_eq!(w.take(1_001, 1, limit(3)), 0);
        // Going back (the clock stepped back) is another second too.
        assert_eq!(w.take(999, 1, limit(3)), 1);
    }

    #[test]
    fn left_says_what_take_would_allow_without_taking() {
        let mut w = PublishWindow::default();
        assert_eq!(w.left(1_000, limit(3)), 3);
        assert_eq!(w.left(1_000, None), usize::MAX);
        w.take(1_000, 2, limit(3));
        assert_eq!(w.left(1_000, limit(3)), 1);
        assert_eq!(w.left(1_000, limit(3)), 1, "nothing taken");
        assert_eq!(w.left(1_001, limit(3)), 3, "a new second");
        w.take(1_000, 1, limit(3));
        assert_eq!(w.left(1_000, limit(3)), 0);
        assert_eq!(w.left(1_000, limit(2)), 0, "a lower limit");
    }

    #[test]
    fn without_a_limit_everything_is_allowed_and_nothing_counted() {
        let mut w = PublishWindow::default();
        assert_eq!(w.take(5, 1_000_000, None), 1_000_000);
        assert_eq!(w, PublishWindow::default());
        assert_eq!(w.take(5, 0, limit(1)), 0);
        assert_eq!(w.take(5, 1, limit(1)), 1);
    }

    #[test]
    fn a_lower_limit_mid_second_allows_nothing_more() {
        let mut w = PublishWindow::default();
        assert_eq!(w.take(7, 10, limit(10)), 10);
        assert_eq!(w.take(7, 1, limit(4)), 0);
        assert_eq!(w.take(8, 1, limit(4)), 1);
    }
}
