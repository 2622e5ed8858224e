//! The process's open-file limit, and the WebSocket connection limit
//! (`--max-connections`) taken from it.
//!
//! Every connection holds a file descriptor. A server that runs out of them
//! cannot accept at all (not even to say why), nor open its history files.
//! So the server raises its soft limit to the hard one at start, as Go's
//! runtime does, and by default admits WebSocket connections up to that
//! limit less what it holds at start and a reserve for everything else:
//! beyond it, an upgrade is answered `503` with a message, and the client
//! may try again later.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing::{info, warn};

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
        "off" => Ok(MaxConnections::Off),
        n => match n.parse::<u64>() {
            Ok(0) => Err("must be at least 1, `auto` or `off`".into()),
            Ok(n) => Ok(MaxConnections::At(n)),
            Err(_) => Err(format!("`{n}`: a number of connections, `auto` or `off`")),
        },
    }
}

/// `--client-publish-rate`: messages per second, or `None` for `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishRate(pub Option<std::num::NonZeroU32>);

/// Parses `--client-publish-rate`: messages per second, or `off`.
pub fn parse_publish_rate(s: &str) -> Result<PublishRate, String> {
    match s.trim() {
        "off" => Ok(PublishRate(None)),
        n => match n.parse::<u32>() {
            Ok(n) => std::num::NonZeroU32::new(n)
                .map(|n| PublishRate(Some(n)))
                .ok_or_else(|| "must be at least 1, or `off`".to_string()),
            Err(_) => Err(format!(
                "`{n}`: a number of messages per second (1 to {}), or `off`",
                u32::MAX
            )),
        },
    }
}

/// Raises the soft open-file limit to the hard one and returns the soft
/// limit now in force (`None` where the platform has none, it is
/// unlimited, or it cannot be read).
pub fn raise_open_files() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        // No limit (or none this platform enforces): nothing to keep to.
        Ok(n) if n >= i64::MAX as u64 => None,
        Ok(n) => Some(n),
        Err(e) => {
            warn!("cannot read or raise the open-file limit: {e}");
            None
        }
    }
}

/// What a refusal at the limit tells clients to wait (`Retry-After`).
pub const RETRY_AFTER: Duration = Duration::from_secs(5);

/// Descriptors each worker thread opens when it starts (its event loop's
/// poller and waker, with room to spare): the limit is worked out before
/// they run.
pub const PER_WORKER: u64 = 4;

/// The descriptors this process holds now, where the platform says
/// (`/proc/self/fd`, less the one reading it takes).
pub fn open_now() -> Option<u64> {
    let dir = std::fs::read_dir("/proc/self/fd").ok()?;
    Some((dir.count() as u64).saturating_sub(1))
}

/// Descriptors kept free for what comes and goes besides WebSocket
/// connections: plain HTTP requests, handshakes refused, engine
/// reconnects. A quarter of a small limit, at most 256.
pub fn reserve(open_files: u64) -> u64 {
    (open_files / 4).min(256)
}

impl MaxConnections {
    /// The limit in force (`None`: none), given the open-file limit and
    /// the descriptors held before any connection (listeners, history,
    /// engine, workers).
    pub fn resolve(self, open_files: Option<u64>, in_use: u64) -> Option<u64> {
        match self {
            MaxConnections::Off => None,
            MaxConnections::At(n) => Some(n),
            MaxConnections::Auto => {
                open_files.map(|f| f.saturating_sub(in_use + reserve(f)).max(1))
            }
        }
    }
}

/// The limit in force, from the descriptors held now and the `workers`
/// about to start; logged.
pub fn settle(flag: MaxConnections, open_files: Option<u64>, workers: usize) -> Option<u64> {
    let in_use = open_now().unwrap_or(32) + PER_WORKER * workers as u64;
    let max = flag.resolve(open_files, in_use);
    match (max, open_files) {
        (Some(n), Some(f)) if n > f => warn!(
            "--max-connections {n} is more than the open-file limit ({f}): connections past it wait unaccepted"
        ),
        (Some(n), Some(f)) => {
            info!("admitting {n} WebSocket connections at most (open-file limit {f})");
        }
        (Some(n), None) => info!("admitting {n} WebSocket connections at most"),
        (None, _) => info!("no limit on WebSocket connections but the open-file one"),
    }
    max
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
        if u64::try_from(open).is_ok_and(|open| open <= max) {
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
    fn publish_rate_flag() {
        assert_eq!(parse_publish_rate("off"), Ok(PublishRate(None)));
        assert_eq!(
            parse_publish_rate("20"),
            Ok(PublishRate(std::num::NonZeroU32::new(20)))
        );
        assert!(parse_publish_rate("0").unwrap_err().contains("at least 1"));
        assert!(parse_publish_rate("-3").unwrap_err().contains("`-3`"));
        assert!(parse_publish_rate("4294967296").is_err());
    }

    #[test]
    fn auto_keeps_what_is_in_use_and_a_reserve() {
        let auto = MaxConnections::Auto;
        assert_eq!(auto.resolve(Some(1024), 24), Some(1024 - 24 - 256));
        assert_eq!(auto.resolve(Some(20_000), 100), Some(19_644));
        assert_eq!(auto.resolve(Some(100), 20), Some(55));
        assert_eq!(auto.resolve(Some(100), 500), Some(1));
        assert_eq!(auto.resolve(None, 24), None);
        assert_eq!(MaxConnections::Off.resolve(Some(1024), 24), None);
        assert_eq!(MaxConnections::At(7).resolve(Some(1024), 24), Some(7));
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
        assert!(Admission::new(Some(u64::MAX)).admits(1, &refused));
    }
}
