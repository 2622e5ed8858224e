//! The frame header (RFC 6455 section 5.2): parsing and encoding.
//!
//! ```text
//!  0               1               2               3
//!  0 1 2 3 4 5 6 7 0 1 2 3 4 5 6 7 0 1 2 3 4 5 6 7 0 1 2 3 4 5 6 7
//! +-+-+-+-+-------+-+-------------+-------------------------------+
//! |F|R|R|R| opcode|M| Payload len |    Extended payload length    |
//! |I|S|S|S|  (4)  |A|     (7)     |             (16/64)           |
//! |N|V|V|V|       |S|             |   (if payload len==126/127)   |
//! | |1|2|3|       |K|             |                               |
//! +-+-+-+-+-------+-+-------------+ - - - - - - - - - - - - - - - +
//! ```
//!
//! Parsing checks only what the header alone can tell (reserved opcodes,
//! control frame rules, the 64-bit length's top bit). Rules that depend on the
//! connection (masking direction, negotiated RSV bits, fragmentation state,
//! size limits) are checked by the connection.

use bytes::BufMut;

use crate::error::ProtocolError;

/// A frame opcode (section 5.2). Reserved opcodes are rejected when parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpCode {
    /// 0x0: continues a fragmented message.
    Continuation,
    /// 0x1: the first frame of a text message.
    Text,
    /// 0x2: the first frame of a binary message.
    Binary,
    /// 0x8: close.
    Close,
    /// 0x9: ping.
    Ping,
    /// 0xA: pong.
    Pong,
}

impl OpCode {
    /// Parses the low nibble of the first header byte.
    pub fn from_u8(value: u8) -> Result<OpCode, ProtocolError> {
        Ok(match value {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            other => return Err(ProtocolError::ReservedOpcode(other)),
        })
    }

    /// The wire value.
    pub fn as_u8(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }

    /// Close, ping and pong are control frames (section 5.5).
    pub fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// Largest payload a control frame may carry (section 5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Largest possible header: 2 fixed bytes, 8 length bytes, 4 mask bytes.
pub const MAX_HEADER_LEN: usize = 14;

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Whether this is the final fragment of a message.
    pub fin: bool,
    /// RSV1: "compressed" when permessage-deflate is negotiated (RFC 7692).
    pub rsv1: bool,
    /// RSV2: no extension we support uses it.
    pub rsv2: bool,
    /// RSV3: no extension we support uses it.
    pub rsv3: bool,
    /// The opcode.
    pub opcode: OpCode,
    /// The masking key, if the frame is masked.
    pub mask: Option<[u8; 4]>,
    /// Payload length in bytes.
    pub payload_len: u64,
}

impl FrameHeader {
    /// Parses a header from the front of `buf`.
    ///
    /// Returns `Ok(None)` when `buf` does not hold the whole header yet, and
    /// otherwise the header with the number of bytes it took.
    pub fn parse(buf: &[u8]) -> Result<Option<(FrameHeader, usize)>, ProtocolError> {
        let [b0, b1, ..] = *buf else {
            return Ok(None);
        };
        let opcode = OpCode::from_u8(b0 & 0x0f)?;
        let fin = b0 & 0x80 != 0;
        let masked = b1 & 0x80 != 0;
        let len7 = b1 & 0x7f;

        if opcode.is_control() {
            if !fin {
                return Err(ProtocolError::FragmentedControlFrame);
            }
            if len7 as usize > MAX_CONTROL_PAYLOAD {
                // 126 and 127 announce an extended length: too long either way.
                return Err(ProtocolError::ControlFrameTooLong(u64::from(len7)));
            }
        }

        let ext = match len7 {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let header_len = 2 + ext + if masked { 4 } else { 0 };
        if buf.len() < header_len {
            return Ok(None);
        }
        let payload_len = match ext {
            2 => u64::from(u16::from_be_bytes([buf[2], buf[3]])),
            8 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&buf[2..10]);
                let len = u64::from_be_bytes(b);
                if len >> 63 != 0 {
                    return Err(ProtocolError::InvalidPayloadLength);
                }
                len
            }
            _ => u64::from(len7),
        };
        let mask = masked.then(|| {
            let at = 2 + ext;
            [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]
        });
        Ok(Some((
            FrameHeader {
                fin,
                rsv1: b0 & 0x40 != 0,
                rsv2: b0 & 0x20 != 0,
                rsv3: b0 & 0x10 != 0,
                opcode,
                mask,
                payload_len,
            },
            header_len,
        )))
    }

    /// Number of bytes [`FrameHeader::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        let ext = match self.payload_len {
            0..=125 => 0,
            126..=0xffff => 2,
            _ => 8,
        };
        2 + ext + if self.mask.is_some() { 4 } else { 0 }
    }

    /// Appends the header, with the shortest length encoding.
    pub fn encode(&self, dst: &mut impl BufMut) {
        let b0 = (u8::from(self.fin) << 7)
            | (u8::from(self.rsv1) << 6)
            | (u8::from(self.rsv2) << 5)
            | (u8::from(self.rsv3) << 4)
            | self.opcode.as_u8();
        let mask_bit = if self.mask.is_some() { 0x80 } else { 0 };
        dst.put_u8(b0);
        match self.payload_len {
            len @ 0..=125 => dst.put_u8(mask_bit | len as u8),
            len @ 126..=0xffff => {
                dst.put_u8(mask_bit | 126);
                dst.put_u16(len as u16);
            }
            len => {
                dst.put_u8(mask_bit | 127);
                dst.put_u64(len);
            }
        }
        if let Some(key) = self.mask {
            dst.put_slice(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(opcode: OpCode, len: u64, mask: Option<[u8; 4]>) -> FrameHeader {
        FrameHeader {
            fin: true,
            rsv1: false,
            rsv2: false,
            rsv3: false,
            opcode,
            mask,
            payload_len: len,
        }
    }

    // Section 5.2: the three length encodings, at their boundaries.
    #[test]
    fn length_encodings_round_trip() {
        for len in [0, 1, 125, 126, 127, 0xffff, 0x10000, 1 << 40] {
            for mask in [None, Some([1, 2, 3, 4])] {
                let h = header(OpCode::Binary, len, mask);
                let mut buf = Vec::new();
                h.encode(&mut buf);
                assert_eq!(buf.len(), h.encoded_len());
                assert_eq!(FrameHeader::parse(&buf), Ok(Some((h, buf.len()))));
                // Every strict prefix is incomplete, never an error.
                for cut in 0..buf.len() {
                    assert_eq!(FrameHeader::parse(&buf[..cut]), Ok(None));
                }
            }
        }
    }

    // Section 5.7: a single-frame masked text message "Hello".
    #[test]
    fn rfc_example_masked_hello() {
        let wire = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let (h, n) = FrameHeader::parse(&wire).unwrap().unwrap();
        assert_eq!(n, 6);
        assert_eq!(h.opcode, OpCode::Text);
        assert!(h.fin);
        assert_eq!(h.mask, Some([0x37, 0xfa, 0x21, 0x3d]));
        assert_eq!(h.payload_len, 5);
    }

    // Section 5.2: opcodes 3-7 and B-F are reserved.
    #[test]
    fn reserved_opcodes_are_rejected() {
        for op in [3u8, 4, 5, 6, 7, 0xb, 0xc, 0xd, 0xe, 0xf] {
            assert_eq!(
                FrameHeader::parse(&[0x80 | op, 0]),
                Err(ProtocolError::ReservedOpcode(op))
            );
        }
    }

    // Section 5.5: control frames are never fragmented and carry <= 125 bytes.
    #[test]
    fn control_frame_rules() {
        assert_eq!(
            FrameHeader::parse(&[0x09, 0x00]),
            Err(ProtocolError::FragmentedControlFrame)
        );
        assert_eq!(
            FrameHeader::parse(&[0x89, 126]),
            Err(ProtocolError::ControlFrameTooLong(126))
        );
        assert!(FrameHeader::parse(&[0x89, 125]).unwrap().is_some());
    }

    // Section 5.2: the most significant bit of the 64-bit length must be 0.
    #[test]
    fn top_bit_of_64_bit_length() {
        let wire = [0x82, 127, 0x80, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(
            FrameHeader::parse(&wire),
            Err(ProtocolError::InvalidPayloadLength)
        );
    }
}
