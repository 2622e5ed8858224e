//! Errors: one variant per rule a peer can break, each mapped to the close
//! code the connection is failed with.

use crate::close::CloseCode;

/// A rule of RFC 6455 or RFC 7692 broken by the peer, or a limit it exceeded.
///
/// Receiving any of these fails the connection: the core sends a close frame
/// with [`ProtocolError::close_code`] and expects the transport to be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// Section 5.1: a client must mask every frame it sends.
    #[error("client frame is not masked")]
    UnmaskedFrameFromClient,
    /// Section 5.1: a server must not mask the frames it sends.
    #[error("server frame is masked")]
    MaskedFrameFromServer,
    /// Section 5.2: RSV bits must be 0 unless an extension gives them meaning.
    #[error("reserved bits set without a negotiated extension")]
    ReservedBitsSet,
    /// Section 5.2: opcodes 0x3-0x7 and 0xB-0xF are reserved.
    #[error("reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    /// Section 5.2: the most significant bit of a 64-bit length must be 0.
    #[error("invalid 64-bit payload length")]
    InvalidPayloadLength,
    /// Section 5.5: control frames must not be fragmented.
    #[error("fragmented control frame")]
    FragmentedControlFrame,
    /// Section 5.5: control frame payloads are at most 125 bytes.
    #[error("control frame payload of {0} bytes exceeds 125")]
    ControlFrameTooLong(u64),
    /// Section 5.4: a continuation frame with no message to continue.
    #[error("continuation frame without a message in progress")]
    UnexpectedContinuation,
    /// Section 5.4: a new data frame while a fragmented message is unfinished.
    #[error("new data frame before the fragmented message finished")]
    ExpectedContinuation,
    /// Section 8.1: text messages must be valid UTF-8.
    #[error("invalid UTF-8 in a text message")]
    InvalidUtf8,
    /// Section 5.5.1: a close payload of 1 byte cannot hold a code.
    #[error("close frame payload of 1 byte")]
    TruncatedCloseCode,
    /// Section 7.4: the close code is not one a peer may send.
    #[error("invalid close code {0}")]
    InvalidCloseCode(u16),
    /// Section 5.5.1: the close reason must be valid UTF-8.
    #[error("invalid UTF-8 in the close reason")]
    InvalidCloseReason,
    /// The frame's payload exceeds the configured `max_frame_size`.
    #[error("frame of {size} bytes exceeds the limit of {max}")]
    FrameTooLarge {
        /// Size of the offending frame's payload.
        size: u64,
        /// The configured limit.
        max: usize,
    },
    /// The message exceeds the configured `max_message_size` (after
    /// decompression, for compressed messages).
    #[error("message exceeds the limit of {max} bytes")]
    MessageTooLarge {
        /// The configured limit.
        max: usize,
    },
    /// RFC 7692 section 6: RSV1 marks the first frame of a compressed
    /// message; it is invalid on control and continuation frames.
    #[error("RSV1 set on a control or continuation frame")]
    CompressedBitMisplaced,
    /// RFC 7692 section 6.2: the compressed payload does not inflate.
    #[error("compressed payload is not valid deflate data")]
    InvalidDeflateData,
}

impl ProtocolError {
    /// The close code the connection is failed with.
    pub fn close_code(&self) -> CloseCode {
        match self {
            ProtocolError::InvalidUtf8 | ProtocolError::InvalidCloseReason => {
                CloseCode::INVALID_PAYLOAD
            }
            ProtocolError::FrameTooLarge { .. } | ProtocolError::MessageTooLarge { .. } => {
                CloseCode::MESSAGE_TOO_BIG
            }
            _ => CloseCode::PROTOCOL_ERROR,
        }
    }
}

/// Why the connection ended without a clean close handshake, as the core
/// reports it from [`crate::Connection::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The peer broke the protocol; a close frame with the matching code was
    /// queued.
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    /// No pong (nor any other data) arrived within `ping_timeout` of a ping;
    /// a close frame with 1011 was queued.
    #[error("keepalive timeout: no answer to ping")]
    KeepaliveTimeout,
    /// Nothing arrived for `idle_timeout`; a close frame with 1001 was queued.
    #[error("idle timeout")]
    IdleTimeout,
    /// The close handshake did not finish within `close_timeout`.
    #[error("close handshake timed out")]
    CloseTimeout,
    /// The transport ended without a close frame (close code 1006), possibly in
    /// the middle of a frame.
    #[error("connection closed without a close frame")]
    UnexpectedEof,
    /// Compressing an outgoing message failed: the send returned
    /// [`SendError::Compression`] and a close frame with 1011 was queued.
    #[error("compression failed")]
    Compression,
}

/// Why a `send_*` call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// A close frame was already sent (no frame may follow it), or the
    /// connection is over: it failed, timed out, or its transport ended.
    #[error("the connection is closing or closed: nothing more may be sent")]
    Closing,
    /// Control frame payloads are at most 125 bytes.
    #[error("control frame payload of {0} bytes exceeds 125")]
    ControlFrameTooLong(usize),
    /// Close codes 1005, 1006, 1015 and codes outside the registry cannot be sent.
    #[error("close code {0} cannot be sent")]
    InvalidCloseCode(u16),
    /// Compressing the message failed. The compressor's state is lost, so
    /// the connection is failed: a close frame with 1011 is queued and the
    /// next [`crate::Connection::poll_event`] returns [`Error::Compression`].
    #[error("compression failed")]
    Compression,
}
