//! Connection settings, as plain data.

use std::time::Duration;

/// Limits and timers of one connection. Every field documents its unit and
/// default; [`Config::validate`] rejects values that cannot work. A size of
/// `usize::MAX` sets no limit; a duration too long to add to an `Instant`
/// (`Duration::MAX`, say) never runs out.
///
/// ```
/// use std::time::Duration;
/// let mut config = walkie_proto::Config::default();
/// config.max_message_size = 1 << 20;
/// config.ping_interval = Some(Duration::from_secs(30));
/// config.validate().unwrap();
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// Largest frame payload accepted from the peer, in bytes. A larger frame
    /// fails the connection with 1009. Default: 16 MiB.
    pub max_frame_size: usize,
    /// Largest message accepted from the peer, in bytes, after decompression.
    /// A larger message fails the connection with 1009 as soon as the limit is
    /// crossed, before the rest arrives. Default: 64 MiB.
    pub max_message_size: usize,
    /// How long the connection may go without receiving anything before a
    /// ping is sent to check the peer is alive. `None` disables keepalive
    /// pings. Default: 20 s.
    pub ping_interval: Option<Duration>,
    /// How long to wait, after a keepalive ping, for the peer to send anything
    /// (normally the pong) before failing the connection with 1011. Only used
    /// with `ping_interval`. Default: 20 s.
    pub ping_timeout: Duration,
    /// Close the connection with 1001 when nothing has been received for this
    /// long, pings or not. `None` disables it. Default: `None`.
    pub idle_timeout: Option<Duration>,
    /// How long to wait for the peer's close frame after sending ours, and,
    /// for a client, for the server to end the TCP connection after the close
    /// handshake. Default: 10 s.
    pub close_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_frame_size: 16 << 20,
            max_message_size: 64 << 20,
            ping_interval: Some(Duration::from_secs(20)),
            ping_timeout: Duration::from_secs(20),
            idle_timeout: None,
            close_timeout: Duration::from_secs(10),
        }
    }
}

/// A setting that cannot work, named by its field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid setting `{field}`: {reason}")]
pub struct ConfigError {
    /// The field's name.
    pub field: &'static str,
    /// What is wrong with its value.
    pub reason: &'static str,
}

impl Config {
    /// Checks the values; call it once when loading settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_frame_size == 0 {
            return Err(ConfigError {
                field: "max_frame_size",
                reason: "must be at least 1 byte",
            });
        }
        if self.max_message_size == 0 {
            return Err(ConfigError {
                field: "max_message_size",
                reason: "must be at least 1 byte",
            });
        }
        if self.ping_interval == Some(Duration::ZERO) {
            return Err(ConfigError {
                field: "ping_interval",
                reason: "must be positive (use None to disable)",
            });
        }
        if self.ping_interval.is_some() && self.ping_timeout.is_zero() {
            return Err(ConfigError {
                field: "ping_timeout",
                reason: "must be positive",
            });
        }
        if self.idle_timeout == Some(Duration::ZERO) {
            return Err(ConfigError {
                field: "idle_timeout",
                reason: "must be positive (use None to disable)",
            });
        }
        if self.close_timeout.is_zero() {
            return Err(ConfigError {
                field: "close_timeout",
                reason: "must be positive",
            });
        }
        Ok(())
    }
}
