//! A message framed once and sent to many connections.
//!
//! A server frame is never masked, so the bytes of one message are the same
//! for every connection that does not compress: a broadcast to N subscribers
//! can frame the message once and let every connection copy (or reference)
//! the same bytes. Where permessage-deflate was negotiated with
//! `server_no_context_takeover` and a full window, each message is
//! compressed from a fresh state, so the compressed frame is shared too; it
//! is built on first use. Connections with context takeover compress for
//! themselves.

use std::sync::{Arc, OnceLock};

use bytes::{BufMut, Bytes, BytesMut};

use crate::deflate::Deflater;
use crate::frame::{FrameHeader, OpCode};
use crate::message::{Message, Utf8Bytes};

/// A message framed for the server role, cheap to clone (a reference count).
///
/// ```
/// use walkie_proto::{Message, PreparedMessage};
///
/// let prepared = PreparedMessage::new(Message::text("hi"));
/// assert_eq!(prepared.frame(), &b"\x81\x02hi"[..]);
/// ```
#[derive(Clone)]
pub struct PreparedMessage {
    inner: Arc<Inner>,
}

struct Inner {
    message: Message,
    /// The whole uncompressed frame: header and payload.
    frame: Bytes,
    /// The whole frame compressed without context, at a 15-bit window; `None`
    /// inside if compression failed (then connections compress themselves).
    deflated: OnceLock<Option<Bytes>>,
}

impl std::fmt::Debug for PreparedMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedMessage")
            .field("message", &self.inner.message)
            .finish_non_exhaustive()
    }
}

impl PreparedMessage {
    /// Frames `message` once (unmasked, uncompressed).
    ///
    /// The message kept is a view of the frame's payload, not `message`
    /// itself: a message received in one frame is a slice of its
    /// connection's read buffer, which a broadcast held in slow
    /// subscribers' queues would otherwise keep alive.
    pub fn new(message: Message) -> Self {
        let payload = message.as_bytes();
        let frame = frame(opcode(&message), false, payload);
        let payload = frame.slice(frame.len() - payload.len()..);
        let message = match message {
            // The same bytes, already valid UTF-8.
            Message::Text(_) => Message::Text(Utf8Bytes::from_validated(payload)),
            Message::Binary(_) => Message::Binary(payload),
        };
        PreparedMessage {
            inner: Arc::new(Inner {
                message,
                frame,
                deflated: OnceLock::new(),
            }),
        }
    }

    /// The message.
    pub fn message(&self) -> &Message {
        &self.inner.message
    }

    /// The uncompressed frame, header included.
    pub fn frame(&self) -> &Bytes {
        &self.inner.frame
    }

    /// The frame compressed without context (built on first call, at
    /// `level`), or `None` if compression failed.
    pub(crate) fn deflated(&self, level: u32) -> Option<&Bytes> {
        self.inner
            .deflated
            .get_or_init(|| {
                let mut deflater = Deflater::new(level, 15, true);
                let mut payload = BytesMut::new();
                deflater
                    .compress(self.inner.message.as_bytes(), &mut payload)
                    .ok()?;
                Some(frame(opcode(&self.inner.message), true, &payload))
            })
            .as_ref()
    }
}

fn opcode(message: &Message) -> OpCode {
    match message {
        Message::Text(_) => OpCode::Text,
        Message::Binary(_) => OpCode::Binary,
    }
}

fn frame(opcode: OpCode, rsv1: bool, payload: &[u8]) -> Bytes {
    let header = FrameHeader {
        fin: true,
        rsv1,
        rsv2: false,
        rsv3: false,
        opcode,
        mask: None,
        payload_len: payload.len() as u64,
    };
    let mut buf = BytesMut::with_capacity(header.encoded_len() + payload.len());
    header.encode(&mut buf);
    buf.put_slice(payload);
    buf.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_no_reference_to_the_message_it_was_given() {
        let buffer = Bytes::from(vec![b'a'; 32 * 1024]);
        for message in [
            Message::Binary(buffer.slice(10..20)),
            Message::Text(Utf8Bytes::from_validated(buffer.slice(10..20))),
        ] {
            let prepared = PreparedMessage::new(message.clone());
            assert_eq!(prepared.message(), &message);
            assert_eq!(&prepared.frame()[2..], message.as_bytes());
            let within = buffer.as_ptr_range();
            assert!(!within.contains(&prepared.message().as_bytes().as_ptr()));
        }
    }
}
