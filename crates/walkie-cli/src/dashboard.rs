//! The dashboard demo's data: once a second the server publishes its own
//! metrics to `dashboard:metrics`, and its log lines go to
//! `dashboard:logs`, both through the hub like any publisher would.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::Context;
use walkie_hub::{ChannelName, Hub, Kind, Metrics, NewPublication, PublishOptions};

/// Log lines waiting for the dashboard task; lines beyond it are dropped
/// (the dashboard shows a tail, never the whole log).
const LOG_BACKLOG: usize = 1000;

/// The log layer's end, and the end the dashboard task takes once.
type LogChannel = (SyncSender<String>, Mutex<Option<Receiver<String>>>);

static LOG_LINES: OnceLock<LogChannel> = OnceLock::new();

fn log_channel() -> &'static LogChannel {
    LOG_LINES.get_or_init(|| {
        let (tx, rx) = sync_channel(LOG_BACKLOG);
        (tx, Mutex::new(Some(rx)))
    })
}

/// A tracing layer that copies INFO, WARN and ERROR lines for the dashboard.
pub struct LogTail;

struct Line(String);

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0.insert_str(0, &format!("{value:?} "));
        } else {
            self.0.push_str(&format!("{}={value:?} ", field.name()));
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for LogTail {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        if *meta.level() > tracing::Level::INFO {
            return;
        }
        let mut line = Line(String::new());
        event.record(&mut line);
        let text = format!("{} {}", meta.level(), line.0.trim_end());
        if let Err(TrySendError::Full(_)) = log_channel().0.try_send(text) {
            // Dropped: the dashboard is behind.
        }
    }
}

/// Publishes metrics every second and log lines as they come, until
/// shutdown. Does nothing if the `dashboard` namespace is not configured.
pub async fn run(hub: Hub, configured: bool, shutdown: CancellationToken) {
    let (Ok(metrics_ch), Ok(logs_ch)) = (
        ChannelName::new("dashboard:metrics"),
        ChannelName::new("dashboard:logs"),
    ) else {
        return;
    };
    if !configured {
        return;
    }
    let logs = log_channel().1.lock().ok().and_then(|mut rx| rx.take());
    let options = PublishOptions {
        history: Some(walkie_hub::HistoryOptions {
            size: 120,
            ttl: Duration::from_secs(3600),
        }),
        ..PublishOptions::default()
    };
    let m = hub.metrics().clone();
    let mut last = (
        m.messages_in.load(Ordering::Relaxed),
        m.messages_out.load(Ordering::Relaxed),
        m.published.load(Ordering::Relaxed),
        m.latency_counts(),
    );
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = (
            m.messages_in.load(Ordering::Relaxed),
            m.messages_out.load(Ordering::Relaxed),
            m.published.load(Ordering::Relaxed),
            m.latency_counts(),
        );
        let delta: [u64; 13] = std::array::from_fn(|i| now.3[i].saturating_sub(last.3[i]));
        let snapshot = json!({
            "t": walkie_hub::now_ms(),
            "connections": m.connections.load(Ordering::Relaxed),
            "subscriptions": m.subscriptions.load(Ordering::Relaxed),
            "in_per_s": now.0.saturating_sub(last.0),
            "out_per_s": now.1.saturating_sub(last.1),
            "published_per_s": now.2.saturating_sub(last.2),
            "latency_p50_ms": Metrics::quantile_ms(&delta, 0.5),
            "latency_p99_ms": Metrics::quantile_ms(&delta, 0.99),
        });
        last = now;
        let snapshot = NewPublication::new(Kind::Json, snapshot.to_string());
        // The dashboard's own publications are counted like any other:
        // it shows one publication per second of its own.
        let _ = hub
            .publish(metrics_ch.clone(), snapshot, options.clone())
            .await;
        let lines: Vec<String> = match &logs {
            Some(rx) => rx.try_iter().take(200).collect(),
            None => Vec::new(),
        };
        {
            for line in lines {
                let p =
                    NewPublication::new(Kind::Json, serde_json::Value::String(line).to_string());
                let _ = hub.publish(logs_ch.clone(), p, options.clone()).await;
            }
        }
    }
}
