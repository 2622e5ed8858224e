//! Receiving: frame decoding, message assembly, control frames.

use std::time::Instant;

use bytes::buf::UninitSlice;
use bytes::{BufMut, Bytes, BytesMut};

use super::{Connection, Event, Extra, PartialFrame, PartialMessage, Role};
use crate::close::CloseFrame;
use crate::deflate::InflateError;
use crate::error::{Error, ProtocolError};
use crate::frame::{FrameHeader, OpCode};
use crate::mask::apply_mask;
use crate::message::{Message, Utf8Bytes};

/// A connection's read buffer, open for appending only (see
/// [`Connection::read_buffer`]).
///
/// The bytes it holds were received but not yet consumed, and the decoder
/// may already have unmasked them and checked that they are valid UTF-8:
/// changing them would break the promise a text message makes. So this
/// gives no access to them, only room after them: it is a
/// [`bytes::BufMut`], which the I/O layer reads into directly (with
/// `tokio::io::AsyncReadExt::read_buf` or `tokio_util::io::poll_read_buf`,
/// say).
///
/// ```
/// use std::time::Instant;
/// use walkie_proto::{BufMut, Config, Connection, Event, Message, Role};
///
/// let now = Instant::now();
/// let mut server = Connection::new(Role::Server, Config::default(), None, now);
/// let mut buf = server.read_buffer();
/// buf.reserve(64);
/// // A masked text frame, "Hi", with an all-zero mask key.
/// buf.put_slice(b"\x81\x82\0\0\0\0Hi");
/// assert_eq!(buf.len(), 8);
/// server.handle_read(now);
/// assert_eq!(
///     server.poll_event().unwrap(),
///     Some(Event::Message(Message::text("Hi")))
/// );
/// ```
///
/// Bytes already received cannot be changed or dropped through it:
///
/// ```compile_fail
/// # use std::time::Instant;
/// # use walkie_proto::{Config, Connection, Role};
/// # let mut server = Connection::new(Role::Server, Config::default(), None, Instant::now());
/// server.read_buffer().clear();
/// ```
///
/// ```compile_fail
/// # use std::time::Instant;
/// # use walkie_proto::{Config, Connection, Role};
/// # let mut server = Connection::new(Role::Server, Config::default(), None, Instant::now());
/// server.read_buffer()[0] = b'x';
/// ```
#[derive(Debug)]
pub struct ReadBuffer<'a> {
    buf: &'a mut BytesMut,
}

impl ReadBuffer<'_> {
    /// How many received bytes wait to be decoded.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether no received bytes wait to be decoded.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The bytes the buffer holds without reallocating.
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Room for at least `additional` more bytes without reallocating.
    pub fn reserve(&mut self, additional: usize) {
        self.buf.reserve(additional);
    }

    /// Appends `data` (as [`Connection::handle_data`] does).
    pub fn extend_from_slice(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }
}

// SAFETY: every method forwards to `BytesMut`'s implementation, which upholds
// the trait's contract; `chunk_mut` only exposes the spare capacity after the
// bytes held, never the bytes themselves.
unsafe impl BufMut for ReadBuffer<'_> {
    fn remaining_mut(&self) -> usize {
        self.buf.remaining_mut()
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        // SAFETY: the caller initialised the first `cnt` bytes of
        // `chunk_mut`, which is `BytesMut`'s own chunk.
        unsafe { self.buf.advance_mut(cnt) }
    }

    fn chunk_mut(&mut self) -> &mut UninitSlice {
        self.buf.chunk_mut()
    }

    fn put_slice(&mut self, src: &[u8]) {
        self.buf.extend_from_slice(src);
    }
}

impl Connection {
    /// Feeds bytes read from the transport at time `now`.
    pub fn handle_data(&mut self, now: Instant, data: &[u8]) {
        self.buffers().read.extend_from_slice(data);
        self.handle_read(now);
    }

    /// The buffer the I/O layer may read into directly, to avoid a copy.
    /// Call [`Connection::handle_read`] after adding bytes to it.
    ///
    /// It can only be appended to: the bytes it already holds may have been
    /// unmasked and validated by the decoder (see [`ReadBuffer`]).
    pub fn read_buffer(&mut self) -> ReadBuffer<'_> {
        ReadBuffer {
            buf: &mut self.buffers().read,
        }
    }

    /// How many more bytes would complete the frame now arriving (0 when no
    /// frame is in progress): a hint for sizing the next read, so a large
    /// frame needs few reads.
    pub fn read_hint(&self) -> usize {
        let Some(b) = &self.buffers else { return 0 };
        b.frame.map_or(0, |f| f.len().saturating_sub(b.read.len()))
    }

    /// Records that bytes were added to [`Connection::read_buffer`] at `now`.
    pub fn handle_read(&mut self, now: Instant) {
        self.timers.on_receive(now);
        if self.close_received().is_some() || self.closed {
            // Nothing may follow the peer's close frame; after failing we
            // read nothing more.
            self.clear_input();
        }
    }

    /// Records that the transport's read side ended. Frames already
    /// received are still decoded; then `poll_event` reports
    /// [`Error::UnexpectedEof`] unless the close handshake happened.
    pub fn handle_eof(&mut self) {
        self.eof = true;
    }

    /// Decodes the next event from the bytes received so far.
    ///
    /// Returns `Ok(None)` when more bytes are needed (or the connection is
    /// over). An error is returned once; a close frame for it is already
    /// queued when the peer is still there to read it.
    pub fn poll_event(&mut self) -> Result<Option<Event>, Error> {
        if let Some(err) = self
            .extra
            .as_mut()
            .and_then(|e| e.ending.as_mut()?.pending_error.take())
        {
            self.closed = true;
            return Err(err);
        }
        if self.closed || self.close_received().is_some() {
            return Ok(None);
        }
        match self.decode() {
            Ok(Some(event)) => Ok(Some(event)),
            Ok(None) if self.eof => {
                self.closed = true;
                Err(Error::UnexpectedEof)
            }
            Ok(None) => Ok(None),
            Err(e) => {
                let frame = CloseFrame::new(e.close_code(), &e.to_string());
                self.fail(Error::Protocol(e.clone()), frame);
                if let Some(e) = self.extra.as_mut().and_then(|e| e.ending.as_mut()) {
                    e.pending_error = None;
                }
                Err(Error::Protocol(e))
            }
        }
    }

    /// Fails the connection: queues `frame` unless a close was already
    /// sent, drops unread input, and records `err` for `poll_event`.
    pub(super) fn fail(&mut self, err: Error, frame: CloseFrame) {
        if self.close_sent().is_none() && !self.eof {
            self.queue_close(Some(frame));
        }
        self.closed = true;
        self.ending_mut().pending_error.get_or_insert(err);
        self.clear_input();
        if let Some(e) = &mut self.extra {
            e.message = None;
        }
    }

    /// Drops every received byte not yet decoded.
    fn clear_input(&mut self) {
        if let Some(b) = &mut self.buffers {
            b.read.clear();
            b.frame = None;
        }
    }

    fn decode(&mut self) -> Result<Option<Event>, ProtocolError> {
        if self.buffers.is_none() {
            // Idle: nothing received, no frame half-received.
            return Ok(None);
        }
        loop {
            let frame = match self.buffers().frame {
                Some(f) => f,
                None => match FrameHeader::parse(&self.buffers().read)? {
                    None => return Ok(None),
                    Some((header, header_len)) => {
                        self.check_header(&header)?;
                        let _ = self.buffers().read.split_to(header_len);
                        let f = PartialFrame {
                            header,
                            processed: 0,
                        };
                        self.buffers().frame = Some(f);
                        f
                    }
                },
            };
            let len = frame.len();
            let available = self.buffers().read.len().min(len);
            if available > frame.processed {
                self.unmask_and_check(frame, available)?;
            }
            if available < len {
                return Ok(None);
            }
            let b = self.buffers();
            b.frame = None;
            let payload = b.read.split_to(len);
            if let Some(event) = self.complete_frame(frame.header, payload)? {
                return Ok(Some(event));
            }
        }
    }

    /// Checks the rules that depend on the connection, the payload length
    /// among them: it fits a `usize` once checked.
    fn check_header(&mut self, h: &FrameHeader) -> Result<(), ProtocolError> {
        match (self.role, h.mask.is_some()) {
            (Role::Server, false) => return Err(ProtocolError::UnmaskedFrameFromClient),
            (Role::Client, true) => return Err(ProtocolError::MaskedFrameFromServer),
            _ => {}
        }
        if h.rsv2 || h.rsv3 || (h.rsv1 && self.compression().is_none()) {
            return Err(ProtocolError::ReservedBitsSet);
        }
        if h.rsv1 && (h.opcode.is_control() || h.opcode == OpCode::Continuation) {
            return Err(ProtocolError::CompressedBitMisplaced);
        }
        let max_frame = self.config.max_frame_size;
        if h.payload_len > max_frame as u64 {
            return Err(ProtocolError::FrameTooLarge {
                size: h.payload_len,
                max: max_frame,
            });
        }
        let len = h.payload_len as usize;
        match (h.opcode, self.message()) {
            (OpCode::Continuation, None) => return Err(ProtocolError::UnexpectedContinuation),
            (OpCode::Text | OpCode::Binary, Some(_)) => {
                return Err(ProtocolError::ExpectedContinuation);
            }
            _ => {}
        }
        if !h.opcode.is_control() {
            let so_far = self.message().map_or(0, |m| m.data.len());
            let compressed = h.rsv1 || self.message().is_some_and(|m| m.compressed);
            // Compressed sizes are checked while inflating.
            let too_large = so_far
                .checked_add(len)
                .is_none_or(|total| total > self.config.max_message_size);
            if !compressed && too_large {
                return Err(ProtocolError::MessageTooLarge {
                    max: self.config.max_message_size,
                });
            }
            if h.opcode == OpCode::Text {
                self.utf8.reset();
            }
        }
        Ok(())
    }

    /// Whether the data frame in progress carries uncompressed text, which is
    /// validated as it arrives.
    fn streams_text(&self, h: &FrameHeader) -> bool {
        match h.opcode {
            OpCode::Text => !h.rsv1,
            OpCode::Continuation => self.message().is_some_and(|m| m.text && !m.compressed),
            _ => false,
        }
    }

    /// Unmasks payload bytes `processed..available` in place and validates
    /// them if they are uncompressed text.
    fn unmask_and_check(
        &mut self,
        frame: PartialFrame,
        available: usize,
    ) -> Result<(), ProtocolError> {
        let text = self.streams_text(&frame.header);
        let b = self.buffers.get_or_insert_with(Box::default);
        if let Some(f) = &mut b.frame {
            f.processed = available;
        }
        let new = &mut b.read[frame.processed..available];
        if let Some(key) = frame.header.mask {
            apply_mask(new, key, frame.processed);
        }
        if text {
            self.utf8
                .feed(new)
                .map_err(|_| ProtocolError::InvalidUtf8)?;
        }
        Ok(())
    }

    /// Handles a frame whose payload is complete and unmasked.
    fn complete_frame(
        &mut self,
        h: FrameHeader,
        payload: BytesMut,
    ) -> Result<Option<Event>, ProtocolError> {
        match h.opcode {
            OpCode::Ping => {
                if self.close_sent().is_none() {
                    self.write_pong(&payload);
                }
                Ok(Some(Event::Ping(Bytes::copy_from_slice(&payload))))
            }
            OpCode::Pong => Ok(Some(Event::Pong(Bytes::copy_from_slice(&payload)))),
            OpCode::Close => self.receive_close(&payload).map(Some),
            OpCode::Text | OpCode::Binary if h.fin && !h.rsv1 => {
                // The common case: a whole message in one frame, no copy.
                let data = payload.freeze();
                Ok(Some(Event::Message(if h.opcode == OpCode::Text {
                    self.utf8.finish().map_err(|_| ProtocolError::InvalidUtf8)?;
                    Message::Text(Utf8Bytes::from_validated(data))
                } else {
                    Message::Binary(data)
                })))
            }
            OpCode::Text | OpCode::Binary => {
                self.extra_mut().message = Some(PartialMessage {
                    text: h.opcode == OpCode::Text,
                    compressed: h.rsv1,
                    data: Vec::new(),
                });
                self.append_fragment(&payload, h.fin)
            }
            OpCode::Continuation => self.append_fragment(&payload, h.fin),
        }
    }

    /// Adds a fragment to the message in progress; returns the message when
    /// `fin` completes it.
    fn append_fragment(
        &mut self,
        payload: &[u8],
        fin: bool,
    ) -> Result<Option<Event>, ProtocolError> {
        let limit = self.config.max_message_size;
        let Some(Extra {
            message: Some(msg),
            compression,
            ..
        }) = self.extra.as_deref_mut()
        else {
            return Err(ProtocolError::UnexpectedContinuation);
        };
        if msg.compressed {
            let Some(c) = compression else {
                return Err(ProtocolError::ReservedBitsSet);
            };
            let before = msg.data.len();
            c.inflater
                .inflate(payload, fin, &mut msg.data, limit)
                .map_err(|e| match e {
                    InflateError::TooLarge => ProtocolError::MessageTooLarge { max: limit },
                    InflateError::Invalid => ProtocolError::InvalidDeflateData,
                })?;
            if msg.text {
                self.utf8
                    .feed(&msg.data[before..])
                    .map_err(|_| ProtocolError::InvalidUtf8)?;
            }
        } else {
            // Text was validated while it arrived.
            msg.data.extend_from_slice(payload);
        }
        if !fin {
            return Ok(None);
        }
        let Some(mut msg) = self.extra.as_mut().and_then(|e| e.message.take()) else {
            return Ok(None);
        };
        self.tidy_extra();
        // The buffer grew by doubling: it may be nearly twice the message,
        // and the message keeps all of it alive.
        if msg.data.capacity() > msg.data.len() + msg.data.len() / 2 {
            msg.data.shrink_to_fit();
        }
        let data = Bytes::from(msg.data);
        Ok(Some(Event::Message(if msg.text {
            self.utf8.finish().map_err(|_| ProtocolError::InvalidUtf8)?;
            Message::Text(Utf8Bytes::from_validated(data))
        } else {
            Message::Binary(data)
        })))
    }

    fn write_pong(&mut self, payload: &[u8]) {
        // A ping payload is at most 125 bytes, so this cannot fail.
        let _ = self.send_pong(payload);
    }

    /// Section 5.5.1: records the peer's close and answers it.
    fn receive_close(&mut self, payload: &[u8]) -> Result<Event, ProtocolError> {
        let frame = CloseFrame::parse(payload)?;
        if self.close_sent().is_none() {
            // Echo the status code, as section 5.5.1 suggests.
            let echo = frame.as_ref().map(|f| CloseFrame::new(f.code, ""));
            self.queue_close(echo);
        }
        self.ending_mut().close_received = Some(frame.clone());
        if self.role == Role::Client {
            // Wait for the server to close TCP, but not forever: from when
            // the close frame's bytes arrived. A close frame decoded late
            // may find the deadline passed; the handshake is done by then,
            // so ending at once is no error.
            self.arm_close_deadline(self.timers.last_recv);
        }
        self.clear_input();
        Ok(Event::Close(frame))
    }
}
