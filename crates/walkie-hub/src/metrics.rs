//! Counters for `/metrics` (Prometheus text format). Atomics only: the hot
//! paths add to them without locks.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Upper bounds of the publish-to-delivery histogram, in milliseconds.
const BUCKETS_MS: [u64; 12] = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000];

/// A node's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Open WebSocket connections (all endpoints).
    pub connections: AtomicI64,
    /// Subscriptions on this node (rooms and protocol).
    pub subscriptions: AtomicI64,
    /// Messages received from clients.
    pub messages_in: AtomicU64,
    /// Messages queued to clients (one per subscriber), history replayed
    /// on join or recovery included.
    pub messages_out: AtomicU64,
    /// Payload bytes of the messages queued to clients (one count per
    /// subscriber), as they are sent: a room's raw message, a `/ws`
    /// client's `pub` push with its envelope; history replayed on join or
    /// recovery included, like `messages_out`.
    pub bytes_out: AtomicU64,
    /// Payload bytes received from clients.
    pub bytes_in: AtomicU64,
    /// Publications accepted by the engine.
    pub published: AtomicU64,
    /// Connections cut off because their queue overflowed.
    pub queue_overflows: AtomicU64,
    /// Refused tokens and permission checks.
    pub auth_failures: AtomicU64,
    /// `--client-publish-rate` at work: `/ws` publishes refused (error
    /// 114), and the times a room member had to wait for the next second.
    pub publishes_limited: AtomicU64,
    /// WebSocket upgrades refused because the server had as many
    /// connections as it admits (`--max-connections`).
    pub connections_refused: AtomicU64,
    /// Publish-to-delivery histogram: counts per bucket (the last is +Inf).
    latency: [AtomicU64; BUCKETS_MS.len() + 1],
    latency_sum_ms: AtomicU64,
}

impl Metrics {
    /// Adds one to a counter.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a publish-to-delivery time.
    pub fn observe_latency_ms(&self, ms: u64) {
        let i = BUCKETS_MS
            .iter()
            .position(|b| ms <= *b)
            .unwrap_or(BUCKETS_MS.len());
        self.latency[i].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_ms.fetch_add(ms, Ordering::Relaxed);
    }

    /// The histogram's counts per bucket (the last is +Inf), for deltas.
    pub fn latency_counts(&self) -> [u64; BUCKETS_MS.len() + 1] {
        std::array::from_fn(|i| self.latency[i].load(Ordering::Relaxed))
    }

    /// The bucket bound (ms) below which `q` (0..1) of `counts` fall;
    /// `None` without observations. The last bucket reports twice the
    /// largest bound.
    pub fn quantile_ms(counts: &[u64; BUCKETS_MS.len() + 1], q: f64) -> Option<u64> {
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let want = (total as f64 * q).ceil() as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return Some(
                    BUCKETS_MS
                        .get(i)
                        .copied()
                        .unwrap_or(BUCKETS_MS[BUCKETS_MS.len() - 1] * 2),
                );
            }
        }
        None
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.render_with_engine(0)
    }

    /// The exposition, with the engine's reconnection count.
    pub fn render_with_engine(&self, engine_reconnects: u64) -> String {
        let mut out = String::with_capacity(2048);
        let mut one = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP walkie_{name} {help}\n# TYPE walkie_{name} {kind}\nwalkie_{name} {value}"
            );
        };
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        one(
            "connections",
            "gauge",
            "Open WebSocket connections.",
            self.connections.load(Ordering::Relaxed).to_string(),
        );
        one(
            "subscriptions",
            "gauge",
            "Channel subscriptions on this node.",
            self.subscriptions.load(Ordering::Relaxed).to_string(),
        );
        one(
            "messages_in_total",
            "counter",
            "Messages received from clients.",
            get(&self.messages_in),
        );
        one(
            "bytes_in_total",
            "counter",
            "Payload bytes received from clients.",
            get(&self.bytes_in),
        );
        one(
            "messages_out_total",
            "counter",
            "Messages queued to subscribers.",
            get(&self.messages_out),
        );
        one(
            "bytes_out_total",
            "counter",
            "Payload bytes of the messages queued to subscribers.",
            get(&self.bytes_out),
        );
        one(
            "publications_total",
            "counter",
            "Publications accepted.",
            get(&self.published),
        );
        one(
            "queue_overflows_total",
            "counter",
            "Clients cut off because they read too slowly.",
            get(&self.queue_overflows),
        );
        one(
            "auth_failures_total",
            "counter",
            "Refused tokens and permission checks.",
            get(&self.auth_failures),
        );
        one(
            "publishes_limited_total",
            "counter",
            "Publishes refused (/ws) and room members' waits for the next second, past the publish rate.",
            get(&self.publishes_limited),
        );
        one(
            "connections_refused_total",
            "counter",
            "WebSocket upgrades refused (503) at the connection limit.",
            get(&self.connections_refused),
        );
        one(
            "engine_reconnects_total",
            "counter",
            "Times the engine connection (Redis, NATS) was lost and restored.",
            engine_reconnects.to_string(),
        );
        let name = "walkie_publish_to_delivery_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time from publish to queueing for a subscriber.\n# TYPE {name} histogram"
        );
        let mut cumulative = 0;
        for (i, bound) in BUCKETS_MS.iter().enumerate() {
            cumulative += self.latency[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{}\"}} {cumulative}",
                *bound as f64 / 1000.0
            );
        }
        cumulative += self.latency[BUCKETS_MS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = self.latency_sum_ms.load(Ordering::Relaxed) as f64 / 1000.0;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_a_cumulative_histogram() {
        let m = Metrics::default();
        Metrics::inc(&m.published);
        m.observe_latency_ms(0);
        m.observe_latency_ms(3);
        m.observe_latency_ms(99_999);
        let text = m.render();
        assert!(text.contains("walkie_publications_total 1\n"), "{text}");
        assert!(text.contains("walkie_publish_to_delivery_seconds_bucket{le=\"0.001\"} 1\n"));
        assert!(text.contains("walkie_publish_to_delivery_seconds_bucket{le=\"0.005\"} 2\n"));
        assert!(text.contains("walkie_publish_to_delivery_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("walkie_publish_to_delivery_seconds_count 3\n"));
    }
}
