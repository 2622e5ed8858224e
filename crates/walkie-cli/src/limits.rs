//! The process's open-file limit, and the WebSocket connection limit
//! (`--max-connections`) taken from it.
//!
//! Every connection holds a file descriptor. A server that runs out of them
//! cannot accept at all (not even to say why), nor open its history files.
//! So the server raises its soft limit to the hard one at start, as Go's
//! runtime does, and by default admits WebSocket connections up to that
//! limit less a reserve for everything else: beyond it, an upgrade is
//! answered `503` with a message, and the client may try again later.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicU64, Ordering};

use tracing::warn;

/// `--max-connections`: a number, `auto` (from the open-file limit) or
/// `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxConnections {
    Auto,
    Off,
    At(u64),
}

/// Parses `--max-connections`.
pub fn parse_max_connections(s: &str) -> Result<MaxConnections, String> {
    match s.trim() {
        "auto" => Ok(MaxConnections::Auto),
        "off" | "none" => Ok(MaxConnections::Off),
        n => match n.parse::<u64>() {
            Ok(0) => Err("must be at least 1, `auto` or `off`".into()),
            Ok(n) => Ok(MaxConnections::At(n)),
            Err(_) => Err(format!("`{n}`: a number of connections, `auto` or `off`")),
        },
    }
}

/// Raises the soft open-file limit to the hard one and returns the soft
/// limit now in force (`None` where the platform has none or it cannot be
/// read).
pub fn raise_open_files() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => Some(n),
        Err(e) => {
            warn!("cannot read or raise the open-file limit: {e}");
            None
        }
    }
}

/// Descriptors kept for what is not a WebSocket connection: listeners,
/// history files, engine connections, plain HTTP requests, the runtime's
/// own. A quarter of a small limit, at most 256.
pub fn reserve(open_files: u64) -> u64 {
    (open_files / 4).min(256)
}

impl MaxConnections {
    /// The limit in force: `None` is none.
    pub fn resolve(self, open_files: Option<u64>) -> Option<u64> {
        match self {
            MaxConnections::Off => None,
            MaxConnections::At(n) => Some(n),
            MaxConnections::Auto => open_files.map(|f| (f - reserve(f)).max(1)),
        }
    }
}

/// Admits WebSocket connections up to the limit.
#[derive(Debug)]
pub struct Admission {
    /// `None`: no limit.
    pub max: Option<u64>,
    /// When a refusal was last logged: one warning per 10 s, not one per
    /// client, however many are refused.
    last_warned: Mutex<Option<Instant>>,
}

impl Admission {
    pub fn new(max: Option<u64>) -> Self {
        Admission {
            max,
            last_warned: Mutex::new(None),
        }
    }

    /// Whether a connection fits, `open` counting it. A refusal is
    /// counted in `refused`, and logged now and then.
    pub fn admits(&self, open: i64, refused: &AtomicU64) -> bool {
        let Some(max) = self.max else { return true };
        if open <= max as i64 {
            return true;
        }
        refused.fetch_add(1, Ordering::Relaxed);
        let mut last = self.last_warned.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            *last = Some(Instant::now());
            warn!(
                "{max} WebSocket connections open (--max-connections): refusing new ones with 503"
            );
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_takes_a_number_auto_or_off() {
        assert_eq!(parse_max_connections("auto"), Ok(MaxConnections::Auto));
        assert_eq!(parse_max_connections("off"), Ok(MaxConnections::Off));
        assert_eq!(parse_max_connections("5000"), Ok(MaxConnections::At(5000)));
        assert!(parse_max_connections("0").is_err());
        assert!(parse_max_connections("-1").is_err());
        assert!(parse_max_connections("many").is_err());
    }

    #[test]
    fn auto_keeps_a_reserve_of_the_open_files() {
        assert_eq!(MaxConnections::Auto.resolve(Some(1024)), Some(1024 - 256));
        assert_eq!(MaxConnections::Auto.resolve(Some(20_000)), Some(19_744));
        assert_eq!(MaxConnections::Auto.resolve(Some(100)), Some(75));
        assert_eq!(MaxConnections::Auto.resolve(None), None);
        assert_eq!(MaxConnections::Off.resolve(Some(1024)), None);
        assert_eq!(MaxConnections::At(7).resolve(Some(1024)), Some(7));
    }

    #[test]
    fn admission_refuses_past_the_limit_and_counts() {
        let refused = AtomicU64::new(0);
        let a = Admission::new(Some(2));
        assert!(a.admits(1, &refused));
        assert!(a.admits(2, &refused));
        assert!(!a.admits(3, &refused));
        assert!(!a.admits(4, &refused));
        assert_eq!(refused.load(Ordering::Relaxed), 2);
        assert!(Admission::new(None).admits(1_000_000, &refused));
    }
}
