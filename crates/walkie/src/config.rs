//! Settings for accepting and connecting.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use walkie_proto::{Config, DeflateConfig};

/// How a server accepts WebSocket connections.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Protocol limits and timers for each connection.
    pub connection: Config,
    /// permessage-deflate to accept when a client offers it; `None` never
    /// compresses. Default: enabled with [`DeflateConfig::default`].
    pub deflate: Option<DeflateConfig>,
    /// How long a client has to send its whole request head. A slow client
    /// gets 408 and is disconnected. Default: 10 s.
    pub handshake_timeout: Duration,
    /// Bytes queued for sending above which `send` and `feed` wait for the
    /// socket to drain (backpressure), and the connection stops reading
    /// while a write waits: a peer that sends without reading what it is
    /// sent is not read either. Default: 64 KiB.
    pub write_buffer_high: usize,
    /// `connection` as the connections share it: each holds a pointer, not
    /// a copy. Made on the first accept; remade if `connection` changed.
    shared: OnceLock<Arc<Config>>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            connection: Config::default(),
            deflate: Some(DeflateConfig::default()),
            handshake_timeout: Duration::from_secs(10),
            write_buffer_high: 64 * 1024,
            shared: OnceLock::new(),
        }
    }
}

impl ServerConfig {
    /// The connection settings to give a new connection: one `Arc` shared
    /// by every connection accepted with this configuration.
    pub(crate) fn shared_connection(&self) -> Arc<Config> {
        match self.shared.get() {
            Some(c) if **c == self.connection => c.clone(),
            Some(_) => Arc::new(self.connection.clone()),
            None => self
                .shared
                .get_or_init(|| Arc::new(self.connection.clone()))
                .clone(),
        }
    }
}

/// How a client connects.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// Protocol limits and timers for the connection.
    pub connection: Config,
    /// permessage-deflate to offer; `None` offers no compression.
    /// Default: `None`.
    pub deflate: Option<DeflateConfig>,
    /// Subprotocols to offer, in order of preference. Default: none.
    pub protocols: Vec<String>,
    /// Extra request headers (e.g. `Origin`, `Authorization`).
    pub headers: Vec<(String, String)>,
    /// TLS settings for `wss://`; `None` uses the Mozilla root certificates
    /// (see [`crate::tls`] for a custom CA or, for local tests only, no
    /// verification).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// How long the TCP (and TLS) connection may take. A host with several
    /// addresses gives each an equal share of the time left, so that one
    /// that drops packets leaves time for the next. Default: 10 s.
    pub connect_timeout: Duration,
    /// How long the server may take to answer the upgrade. Default: 10 s.
    pub handshake_timeout: Duration,
    /// Bytes queued for sending above which `send` and `feed` wait, and
    /// reading pauses while a write waits (see
    /// [`ServerConfig::write_buffer_high`]). A client that sends messages
    /// larger than this to a server that answers each one before it reads
    /// the next (an echo) must read concurrently *and* raise this above
    /// its largest message, or both ends can wait on each other; `walkie
    /// connect` sets `usize::MAX`. Default: 64 KiB.
    pub write_buffer_high: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connection: Config::default(),
            deflate: None,
            protocols: Vec::new(),
            headers: Vec::new(),
            tls: None,
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            write_buffer_high: 64 * 1024,
        }
    }
}
