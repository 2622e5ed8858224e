//! Close codes and close frames (RFC 6455 sections 5.5.1 and 7.4).

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::ProtocolError;
use crate::message::Utf8Bytes;

/// A close status code.
///
/// Only codes that may appear on the wire are accepted from a peer
/// ([`CloseCode::is_allowed_on_wire`]); 1005, 1006 and 1015 are reserved for
/// reporting and are never sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CloseCode(pub u16);

impl CloseCode {
    /// 1000: the purpose of the connection has been fulfilled.
    pub const NORMAL: CloseCode = CloseCode(1000);
    /// 1001: the endpoint is going away (server shutdown, page navigation).
    pub const GOING_AWAY: CloseCode = CloseCode(1001);
    /// 1002: the peer broke the protocol.
    pub const PROTOCOL_ERROR: CloseCode = CloseCode(1002);
    /// 1003: a data type the endpoint cannot accept.
    pub const UNSUPPORTED_DATA: CloseCode = CloseCode(1003);
    /// 1005: reported when a close frame carried no code. Never sent.
    pub const NO_STATUS: CloseCode = CloseCode(1005);
    /// 1006: reported when the connection dropped without a close frame. Never sent.
    pub const ABNORMAL: CloseCode = CloseCode(1006);
    /// 1007: message data inconsistent with its type (invalid UTF-8 in text).
    pub const INVALID_PAYLOAD: CloseCode = CloseCode(1007);
    /// 1008: a policy was violated.
    pub const POLICY_VIOLATION: CloseCode = CloseCode(1008);
    /// 1009: a frame or message is too big to process.
    pub const MESSAGE_TOO_BIG: CloseCode = CloseCode(1009);
    /// 1010: the client expected an extension the server did not negotiate.
    pub const MANDATORY_EXTENSION: CloseCode = CloseCode(1010);
    /// 1011: the server hit an unexpected condition.
    pub const INTERNAL_ERROR: CloseCode = CloseCode(1011);
    /// 1012: the service is restarting.
    pub const SERVICE_RESTART: CloseCode = CloseCode(1012);
    /// 1013: try again later.
    pub const TRY_AGAIN_LATER: CloseCode = CloseCode(1013);

    /// Whether a peer may send this code in a close frame: 1000-1003,
    /// 1007-1014 and the 3000-4999 ranges for libraries and applications.
    pub fn is_allowed_on_wire(self) -> bool {
        matches!(self.0, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

impl From<u16> for CloseCode {
    fn from(code: u16) -> Self {
        CloseCode(code)
    }
}

impl From<CloseCode> for u16 {
    fn from(code: CloseCode) -> Self {
        code.0
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The code and reason of a close frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseFrame {
    /// The status code.
    pub code: CloseCode,
    /// A human-readable reason, at most 123 bytes of UTF-8 on the wire.
    pub reason: Utf8Bytes,
}

/// The largest close reason that fits a control frame beside its code.
pub const MAX_CLOSE_REASON: usize = 123;

impl CloseFrame {
    /// A close frame with `code` and `reason`. A reason longer than 123 bytes
    /// is cut at the last character boundary that fits.
    pub fn new(code: CloseCode, reason: &str) -> Self {
        let mut end = reason.len().min(MAX_CLOSE_REASON);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        CloseFrame {
            code,
            reason: Utf8Bytes::from(reason[..end].to_owned()),
        }
    }

    /// Parses a close frame's payload. An empty payload means "no status"
    /// and yields `None`.
    pub fn parse(payload: &[u8]) -> Result<Option<CloseFrame>, ProtocolError> {
        match payload.len() {
            0 => Ok(None),
            1 => Err(ProtocolError::TruncatedCloseCode),
            _ => {
                let code = CloseCode(u16::from_be_bytes([payload[0], payload[1]]));
                if !code.is_allowed_on_wire() {
                    return Err(ProtocolError::InvalidCloseCode(code.0));
                }
                let reason = Utf8Bytes::try_from(Bytes::copy_from_slice(&payload[2..]))
                    .map_err(|_| ProtocolError::InvalidCloseReason)?;
                Ok(Some(CloseFrame { code, reason }))
            }
        }
    }

    /// Appends the frame's payload: the code in network order, then the reason.
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u16(self.code.0);
        dst.extend_from_slice(self.reason.as_bytes());
    }

    /// Length of the encoded payload.
    pub fn encoded_len(&self) -> usize {
        2 + self.reason.len()
    }
}

impl fmt::Display for CloseFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.reason.is_empty() {
            write!(f, "{}", self.code)
        } else {
            write!(f, "{} ({})", self.code, self.reason.as_str())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 6455 section 7.4.1 and the IANA registry.
    #[test]
    fn wire_codes() {
        for ok in [
            1000, 1001, 1002, 1003, 1007, 1011, 1014, 3000, 3999, 4000, 4999,
        ] {
            assert!(CloseCode(ok).is_allowed_on_wire(), "{ok}");
        }
        for bad in [
            0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            assert!(!CloseCode(bad).is_allowed_on_wire(), "{bad}");
        }
    }

    #[test]
    fn parse_payloads() {
        assert_eq!(CloseFrame::parse(b""), Ok(None));
        assert_eq!(
            CloseFrame::parse(b"\x03"),
            Err(ProtocolError::TruncatedCloseCode)
        );
        assert_eq!(
            CloseFrame::parse(b"\x03\xe8bye"),
            Ok(Some(CloseFrame::new(CloseCode::NORMAL, "bye")))
        );
        assert_eq!(
            CloseFrame::parse(b"\x03\xed"),
            Err(ProtocolError::InvalidCloseCode(1005))
        );
        assert_eq!(
            CloseFrame::parse(b"\x03\xe8\xff"),
            Err(ProtocolError::InvalidCloseReason)
        );
    }

    #[test]
    fn long_reason_is_cut_on_a_char_boundary() {
        let reason = "é".repeat(100);
        let frame = CloseFrame::new(CloseCode::NORMAL, &reason);
        assert!(frame.encoded_len() <= 125);
        assert_eq!(frame.reason.len(), 122);
    }
}
