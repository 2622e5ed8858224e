//! The error type of the tokio layer.

use std::io;

use walkie_proto::handshake::HandshakeError;

/// Why a WebSocket operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The transport failed (reset, broken pipe...).
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The connection failed: the peer broke the protocol, a keepalive or
    /// close deadline passed, or the transport ended without a close frame.
    #[error(transparent)]
    Connection(#[from] walkie_proto::Error),
    /// The opening handshake failed.
    #[error("handshake failed: {0}")]
    Handshake(#[from] HandshakeError),
    /// The server answered the upgrade with another status than 101.
    /// Boxed: an error is returned on every path, and most never refuse.
    #[error("server refused the upgrade: {0}")]
    Refused(Box<Refusal>),
    /// The opening handshake did not finish in time.
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// Connecting to the server did not finish in time.
    #[error("connect timed out")]
    ConnectTimeout,
    /// The connection is closing or closed: nothing more can be sent.
    #[error("the connection is closed")]
    Closed,
    /// A message could not be sent as given (e.g. a control payload over 125
    /// bytes, an invalid close code).
    #[error("cannot send: {0}")]
    Send(walkie_proto::SendError),
    /// The URL is not a usable `ws://` or `wss://` URL.
    #[error("invalid URL: {0}")]
    InvalidUrl(String),
    /// TLS set-up or negotiation failed.
    #[error("TLS error: {0}")]
    Tls(String),
}

impl From<walkie_proto::SendError> for Error {
    fn from(e: walkie_proto::SendError) -> Self {
        match e {
            walkie_proto::SendError::Closing => Error::Closed,
            other => Error::Send(other),
        }
    }
}

impl From<walkie_proto::ProtocolError> for Error {
    fn from(e: walkie_proto::ProtocolError) -> Self {
        Error::Connection(e.into())
    }
}

/// A `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A server's refusal of an upgrade ([`Error::Refused`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The HTTP status.
    pub status: u16,
    /// The start of the server's message: the response body's first line,
    /// at most 200 characters (empty if it sent none).
    pub message: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HTTP {}", self.status)?;
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}
