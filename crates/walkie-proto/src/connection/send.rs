//! Sending: messages, control frames and the close frame.

use std::time::Instant;

use bytes::{BufMut, Bytes};
use rand::RngCore as _;

use super::{Connection, Role};
use crate::close::{CloseCode, CloseFrame, MAX_CLOSE_REASON};
use crate::error::Error;
use crate::error::SendError;
use crate::frame::{FrameHeader, MAX_CONTROL_PAYLOAD, OpCode};
use crate::mask::apply_mask;
use crate::message::Message;
use crate::outgoing::COPY_THRESHOLD;
use crate::prepared::PreparedMessage;

/// A payload to frame: borrowed bytes are always copied, shared bytes are
/// queued by reference when large and unmasked.
enum Payload<'a> {
    Slice(&'a [u8]),
    Shared(Bytes),
}

impl Payload<'_> {
    fn as_slice(&self) -> &[u8] {
        match self {
            Payload::Slice(s) => s,
            Payload::Shared(b) => b,
        }
    }
}

impl Connection {
    /// Queues a message. With permessage-deflate negotiated, the message is
    /// compressed. Large binary or text payloads are not copied on the server
    /// side: the frame references them.
    pub fn send(&mut self, message: Message) -> Result<(), SendError> {
        let (opcode, payload) = match message {
            Message::Text(t) => (OpCode::Text, t.into_bytes()),
            Message::Binary(b) => (OpCode::Binary, b),
        };
        self.send_data(opcode, Payload::Shared(payload))
    }

    /// Queues a message framed once for many connections (see
    /// [`PreparedMessage`]): its frame bytes are used as they are where this
    /// connection's framing allows it (server role, and no compression or
    /// compression without context takeover); otherwise the message is
    /// framed as by [`Connection::send`].
    pub fn send_prepared(&mut self, prepared: &PreparedMessage) -> Result<(), SendError> {
        if !self.can_send() {
            return Err(SendError::Closing);
        }
        if self.role == Role::Client {
            return self.send(prepared.message().clone());
        }
        let frame = match self.compression() {
            None => prepared.frame(),
            Some(c) if c.shares_prepared => match prepared.deflated(c.level) {
                Some(frame) => frame,
                // Compressing the shared frame failed: compress it here.
                None => return self.send(prepared.message().clone()),
            },
            Some(_) => return self.send(prepared.message().clone()),
        };
        let out = &mut self.buffers().out;
        if frame.len() >= COPY_THRESHOLD {
            out.push_chunk(frame.clone());
        } else {
            out.tail().put_slice(frame);
            out.commit_tail(frame.len());
        }
        Ok(())
    }

    /// Queues a text message, copying it.
    pub fn send_text(&mut self, text: &str) -> Result<(), SendError> {
        self.send_data(OpCode::Text, Payload::Slice(text.as_bytes()))
    }

    /// Queues a binary message, copying it.
    pub fn send_binary(&mut self, data: &[u8]) -> Result<(), SendError> {
        self.send_data(OpCode::Binary, Payload::Slice(data))
    }

    /// Queues a ping. Its payload is at most 125 bytes.
    pub fn send_ping(&mut self, payload: &[u8]) -> Result<(), SendError> {
        self.send_control(OpCode::Ping, payload)
    }

    /// Queues an unsolicited pong (a unidirectional heartbeat, section 5.5.3).
    /// Pongs answering pings are sent automatically.
    pub fn send_pong(&mut self, payload: &[u8]) -> Result<(), SendError> {
        self.send_control(OpCode::Pong, payload)
    }

    /// Starts the close handshake: queues a close frame (`None` sends one
    /// without a status) and starts the `close_timeout` deadline from `now`
    /// (or from when data last arrived, if that is later).
    /// Messages still arrive until the peer answers.
    pub fn send_close(&mut self, now: Instant, frame: Option<CloseFrame>) -> Result<(), SendError> {
        if !self.can_send() {
            return Err(SendError::Closing);
        }
        if let Some(f) = &frame {
            if !f.code.is_allowed_on_wire() {
                return Err(SendError::InvalidCloseCode(f.code.0));
            }
            if f.reason.len() > MAX_CLOSE_REASON {
                return Err(SendError::ControlFrameTooLong(f.encoded_len()));
            }
        }
        self.queue_close(frame);
        // From the latest time known: a `now` older than the last data's
        // would cut the peer's time to answer.
        let now = self.timers.last_recv.max(now.into());
        self.arm_close_deadline(now);
        Ok(())
    }

    /// Queues a close frame and records it as sent. The caller checked that
    /// none was sent before.
    pub(super) fn queue_close(&mut self, frame: Option<CloseFrame>) {
        let mut payload = bytes::BytesMut::new();
        if let Some(f) = &frame {
            f.encode(&mut payload);
        }
        self.write_frame(OpCode::Close, false, Payload::Slice(&payload));
        self.ending_mut().close_sent = Some(frame);
    }

    /// Whether a frame may still be sent: no close frame was sent (none may
    /// follow it) and the connection is not over (failed, timed out, or the
    /// transport ended).
    fn can_send(&self) -> bool {
        self.close_sent().is_none() && !self.is_closed()
    }

    fn send_control(&mut self, opcode: OpCode, payload: &[u8]) -> Result<(), SendError> {
        if !self.can_send() {
            return Err(SendError::Closing);
        }
        if payload.len() > MAX_CONTROL_PAYLOAD {
            return Err(SendError::ControlFrameTooLong(payload.len()));
        }
        self.write_frame(opcode, false, Payload::Slice(payload));
        Ok(())
    }

    fn send_data(&mut self, opcode: OpCode, payload: Payload<'_>) -> Result<(), SendError> {
        if !self.can_send() {
            return Err(SendError::Closing);
        }
        let Some(c) = self.compression_mut() else {
            self.write_frame(opcode, false, payload);
            return Ok(());
        };
        let mut scratch = std::mem::take(&mut c.scratch);
        scratch.clear();
        if c.deflater
            .compress(payload.as_slice(), &mut scratch)
            .is_err()
        {
            // The compressor's state no longer matches what the peer's
            // inflater has seen: no later message could be sent. Fail the
            // connection with 1011; `poll_event` reports it.
            self.fail(
                Error::Compression,
                CloseFrame::new(CloseCode::INTERNAL_ERROR, "compression failed"),
            );
            return Err(SendError::Compression);
        }
        self.write_frame(opcode, true, Payload::Slice(&scratch));
        if let Some(c) = self.compression_mut() {
            c.scratch = scratch;
        }
        Ok(())
    }

    /// Frames `payload` as one final frame into the outgoing queue, masking
    /// it when we are the client.
    fn write_frame(&mut self, opcode: OpCode, rsv1: bool, payload: Payload<'_>) {
        let mask = match self.role {
            Role::Client => {
                let mut key = [0u8; 4];
                rand::rng().fill_bytes(&mut key);
                Some(key)
            }
            Role::Server => None,
        };
        let header = FrameHeader {
            fin: true,
            rsv1,
            rsv2: false,
            rsv3: false,
            opcode,
            mask,
            payload_len: payload.as_slice().len() as u64,
        };
        let out = &mut self.buffers().out;
        let tail = out.tail();
        let start = tail.len();
        match payload {
            Payload::Shared(bytes) if mask.is_none() && bytes.len() >= COPY_THRESHOLD => {
                header.encode(tail);
                let n = tail.len() - start;
                out.commit_tail(n);
                out.push_chunk(bytes);
            }
            payload => {
                let data = payload.as_slice();
                tail.reserve(header.encoded_len() + data.len());
                header.encode(tail);
                let body = tail.len();
                tail.put_slice(data);
                if let Some(key) = mask {
                    apply_mask(&mut tail[body..], key, 0);
                }
                let n = tail.len() - start;
                out.commit_tail(n);
            }
        }
    }
}
