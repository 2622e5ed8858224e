//! The opening handshake (RFC 6455 section 4), for both roles.
//!
//! The server side parses a request head ([`Request::parse`]), checks that it
//! is a valid upgrade ([`Request::upgrade`]), lets the application look at it
//! (path, `Origin`, offered subprotocols) and then writes the 101 response
//! ([`Upgrade::accept`]) or an HTTP error that says what was wrong
//! ([`HandshakeError::response`]).
//!
//! The client side builds a request ([`ClientHandshake::new`]) and checks the
//! server's answer ([`ClientHandshake::parse_response`]).

mod client;
mod http;
mod server;

pub use client::{ClientHandshake, ClientRequest, ServerResponse};
pub use http::{HeaderList, MAX_HEAD_SIZE, MAX_HEADERS, Request, RequestParser};
pub use server::{Accepted, Upgrade};

use base64::Engine as _;
use sha1::{Digest, Sha1};

/// The GUID of RFC 6455 section 1.3, appended to the key before hashing.
const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Computes `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`.
///
/// ```
/// // RFC 6455 section 1.3.
/// assert_eq!(
///     walkie_proto::handshake::accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
///     "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
/// );
/// ```
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(GUID);
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// Why a handshake failed. On the server side each variant maps to an HTTP
/// status and a message for the client ([`HandshakeError::response`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The head is not valid HTTP/1.x.
    #[error("malformed HTTP request: {0}")]
    Malformed(&'static str),
    /// The head is larger than [`MAX_HEAD_SIZE`] or has more than
    /// [`MAX_HEADERS`] header lines.
    #[error("request head too large")]
    HeadTooLarge,
    /// Section 4.1: the method must be GET.
    #[error("method must be GET for a WebSocket upgrade")]
    MethodNotGet,
    /// Section 4.1: HTTP/1.1 or later is required.
    #[error("HTTP/1.1 is required for a WebSocket upgrade")]
    HttpVersion,
    /// Section 4.1: a Host header is required (once, RFC 9112 section 3.2),
    /// and its value must be text.
    #[error("missing or invalid Host header")]
    MissingHost,
    /// Section 4.2.1: `Upgrade` must include `websocket`.
    #[error("missing or invalid Upgrade header (expected \"websocket\")")]
    MissingUpgrade,
    /// Section 4.2.1: `Connection` must include `Upgrade`.
    #[error("missing or invalid Connection header (expected \"Upgrade\")")]
    MissingConnectionUpgrade,
    /// Section 4.2.1: `Sec-WebSocket-Key` must be 16 bytes, base64-encoded.
    #[error("missing or invalid Sec-WebSocket-Key header")]
    InvalidKey,
    /// Section 4.4: only version 13 is supported.
    #[error("unsupported Sec-WebSocket-Version (only 13 is supported)")]
    UnsupportedVersion,
    /// Section 9.1: the extension header could not be parsed.
    #[error("malformed Sec-WebSocket-Extensions header")]
    MalformedExtensions,
    /// Section 4.1: the subprotocol header could not be parsed.
    #[error("malformed Sec-WebSocket-Protocol header")]
    MalformedProtocols,
    /// The application refused the request (wrong path, origin not allowed...).
    #[error("{status}: {message}")]
    Rejected {
        /// The HTTP status to answer with.
        status: u16,
        /// What to tell the client.
        message: String,
    },
    /// Client side: the server answered with another status than 101.
    #[error("server answered HTTP {0} instead of 101")]
    UnexpectedStatus(u16),
    /// Client side: `Sec-WebSocket-Accept` does not match our key.
    #[error("invalid Sec-WebSocket-Accept header")]
    InvalidAccept,
    /// Client side: the server chose a subprotocol we did not offer.
    #[error("server selected a subprotocol that was not offered")]
    UnexpectedProtocol,
    /// Client side: the server's extension answer is not one we can accept.
    #[error("server answered with extensions that were not offered or are invalid")]
    InvalidExtensionResponse,
    /// A header that may appear only once appears several times: `Host`,
    /// `Sec-WebSocket-Key` in a request (RFC 9112 section 3.2, RFC 6455
    /// section 11.3.1), `Sec-WebSocket-Accept` or `Sec-WebSocket-Protocol`
    /// in a response (RFC 6455 sections 11.3.3 and 11.3.4).
    #[error("repeated {0} header")]
    RepeatedHeader(&'static str),
    /// A value given to build a head cannot be written into it: the request
    /// target or `Host` is empty or holds a space or a control character, a
    /// header value holds a control character (CR, LF and NUL among them,
    /// which would let it add header lines), or a header name or subprotocol
    /// is not an HTTP token. It names the value that is wrong.
    #[error("invalid {0} for an HTTP head")]
    InvalidHeadField(&'static str),
}

impl HandshakeError {
    /// The HTTP status a server answers with.
    pub fn status(&self) -> u16 {
        match self {
            HandshakeError::HeadTooLarge => 431,
            HandshakeError::MethodNotGet => 405,
            HandshakeError::UnsupportedVersion => 426,
            HandshakeError::Rejected { status, .. } => *status,
            // Our own values, not the client's request, are wrong.
            HandshakeError::InvalidHeadField(_) => 500,
            _ => 400,
        }
    }

    /// A complete HTTP response telling the client what was wrong. The
    /// connection should be closed after writing it.
    pub fn response(&self) -> Vec<u8> {
        self.response_with(String::new())
    }

    /// [`HandshakeError::response`] with `Retry-After: secs`: a refusal
    /// (a server full, a client too eager) the client may try again after.
    pub fn response_retry_after(&self, secs: u64) -> Vec<u8> {
        self.response_with(format!("Retry-After: {secs}\r\n"))
    }

    fn response_with(&self, mut extra: String) -> Vec<u8> {
        match self {
            HandshakeError::UnsupportedVersion => {
                extra.push_str("Sec-WebSocket-Version: 13\r\nUpgrade: websocket\r\n")
            }
            HandshakeError::MethodNotGet => extra.push_str("Allow: GET\r\n"),
            _ => {}
        }
        let message = match self {
            HandshakeError::Rejected { message, .. } => message.clone(),
            other => other.to_string(),
        };
        http::error_response(self.status(), &extra, &message)
    }
}
