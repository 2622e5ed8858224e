//! WebSocket server and client on tokio, over the sans-I/O
//! [`walkie_proto`] core.
//!
//! # Layout
//!
//! - [`server`]: read a request head, route it, accept or reject it
//!   ([`Incoming`], [`accept`]).
//! - [`client`]: connect to `ws://` and `wss://` URLs ([`connect`]), or run
//!   the handshake over any transport ([`client::handshake`]).
//! - [`WebSocket`] (`websocket.rs`): an open connection; `recv`, `send`,
//!   `feed` (queue without writing), `close`; [`WebSocket::split`] into a
//!   reader and a writer (`split.rs`).
//! - `driver.rs`: the poll loop that moves bytes between the transport and
//!   the core and corks writes; `timer.rs`: one coarse timer per runtime
//!   for every connection's deadlines.
//! - [`tls`]: rustls configurations for servers and clients.
//! - [`config`]: [`ServerConfig`] and [`ClientConfig`], documented defaults.
//!
//! # Example: an echo server
//!
//! ```no_run
//! # async fn run() -> walkie::Result<()> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:9001").await?;
//! let config = walkie::ServerConfig::default();
//! loop {
//!     let (tcp, _) = listener.accept().await?;
//!     let config = config.clone();
//!     tokio::spawn(async move {
//!         let mut ws = walkie::accept(tcp, &config).await?;
//!         while let Some(msg) = ws.recv().await {
//!             // `feed` queues; the reply leaves with the next read's batch.
//!             ws.feed(msg?).await?;
//!         }
//!         Ok::<_, walkie::Error>(())
//!     });
//! }
//! # }
//! ```

pub mod client;
pub mod config;
mod driver;
mod error;
pub mod server;
mod split;
mod timer;
pub mod tls;
mod websocket;

pub use client::{MaybeTlsStream, WsUrl, connect, connect_with, open_stream};
pub use config::{ClientConfig, ServerConfig};
pub use error::{Error, Refusal, Result};
pub use server::{Incoming, accept};
pub use split::{WsReader, WsWriter};
pub use websocket::WebSocket;

pub use walkie_proto as proto;
pub use walkie_proto::{CloseCode, CloseFrame, DeflateConfig, Message, PreparedMessage, Utf8Bytes};
