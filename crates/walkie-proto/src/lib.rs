//! The WebSocket protocol (RFC 6455) with permessage-deflate (RFC 7692),
//! sans-I/O: bytes in, events out, bytes to send. No sockets, no async
//! runtime, no clock: time is an argument.
//!
//! # Layout
//!
//! - [`handshake`]: the opening handshake for both roles (HTTP heads parsed
//!   with `httparse`, key and accept, subprotocols, extension negotiation).
//! - [`Connection`] (`connection/`): one connection after the handshake;
//!   `handle_*` for input, `send_*` for commands, `poll_*` for output.
//! - [`PreparedMessage`]: a message framed once for many connections.
//! - [`frame`]: the frame header; [`mask`](apply_mask): payload masking.
//! - [`utf8`]: incremental UTF-8 validation for text messages.
//! - [`deflate`]: permessage-deflate negotiation and the per-message codec.
//! - [`close`]: close codes and frames; [`error`]: one variant per rule.
//! - [`config`]: limits and timers, documented with their defaults.
//!
//! # Example: a server and a client core talking, with no sockets
//!
//! ```
//! use std::time::Instant;
//! use walkie_proto::{Config, Connection, Event, Message, Role};
//! use bytes::Buf;
//!
//! let now = Instant::now();
//! let mut client = Connection::new(Role::Client, Config::default(), None, now);
//! let mut server = Connection::new(Role::Server, Config::default(), None, now);
//!
//! client.send(Message::text("hello")).unwrap();
//! let out = client.data_to_send();
//! let wire = out.copy_to_bytes(out.remaining());
//! server.handle_data(now, &wire);
//! assert_eq!(
//!     server.poll_event().unwrap(),
//!     Some(Event::Message(Message::text("hello")))
//! );
//! ```

pub mod close;
pub mod config;
mod connection;
pub mod deflate;
pub mod error;
pub mod extension;
pub mod frame;
pub mod handshake;
mod mask;
mod message;
mod outgoing;
mod prepared;
pub mod utf8;

pub use close::{CloseCode, CloseFrame};
pub use config::{Config, ConfigError};
pub use connection::{Buffers, Connection, Event, ReadBuffer, Role, State};
pub use deflate::{DeflateConfig, DeflateParams};
pub use error::{Error, ProtocolError, SendError};
pub use frame::{FrameHeader, OpCode};
pub use mask::apply_mask;
pub use message::{Message, Utf8Bytes};
pub use outgoing::Outgoing;
pub use prepared::PreparedMessage;

pub use bytes::{Buf, BufMut, Bytes, BytesMut};
