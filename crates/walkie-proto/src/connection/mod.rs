//! One WebSocket connection after the handshake, as a state machine.
//!
//! [`Connection`] does no I/O and reads no clock. The I/O layer drives it:
//!
//! 1. Bytes read from the transport go in with [`Connection::handle_data`]
//!    (or straight into [`Connection::read_buffer`], then
//!    [`Connection::handle_read`]); the end of the stream with
//!    [`Connection::handle_eof`].
//! 2. [`Connection::poll_event`] is called until it returns `Ok(None)`: it
//!    decodes frames lazily, one event at a time, so a caller that stops
//!    polling applies backpressure to the peer.
//! 3. The application sends with [`Connection::send`] and the other `send_*`
//!    methods.
//! 4. While [`Connection::has_data_to_send`], what [`Connection::data_to_send`]
//!    holds is written to the transport (it is a [`bytes::Buf`]; one vectored
//!    write takes it all).
//! 5. The I/O layer sleeps until [`Connection::poll_timeout`] and then calls
//!    [`Connection::handle_timeout`].
//! 6. Once [`Connection::is_closed`] is true and nothing is left to send, the
//!    transport is closed.
//!
//! A connection going idle (a read would block, nothing to send) can hand
//! its buffers back with [`Connection::release_buffers`], and get some again
//! with [`Connection::provide_buffers`]; without them it makes its own.
//!
//! Errors from the peer never panic: they fail the connection with the close
//! code RFC 6455 assigns and come out of `poll_event` once as an [`Error`].

mod recv;
mod send;
mod timers;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;

use crate::close::CloseFrame;
use crate::config::Config;
use crate::deflate::{DeflateConfig, DeflateParams, Deflater, Inflater};
use crate::error::Error;
use crate::frame::FrameHeader;
use crate::message::Message;
use crate::outgoing::Outgoing;
use crate::utf8::Utf8Validator;

pub use bytes::Bytes;
pub use recv::ReadBuffer;

/// Which end of the connection this is. It decides the masking direction
/// (section 5.1) and who closes the TCP connection (section 7.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The end that sent the upgrade request; masks what it sends.
    Client,
    /// The end that accepted it; closes TCP first after the close handshake.
    Server,
}

/// Something the peer did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A complete message.
    Message(Message),
    /// A ping. The matching pong is already queued, unless we had sent a
    /// close frame (no frame may follow it) or the connection is over.
    Ping(Bytes),
    /// A pong.
    Pong(Bytes),
    /// The peer's close frame (`None` when it carried no status). Our answer
    /// is already queued if we had not sent a close frame ourselves.
    Close(Option<CloseFrame>),
}

/// Where the close handshake stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Messages flow both ways.
    Open,
    /// One side sent a close frame; the handshake is not finished.
    Closing,
    /// The connection is over: flush [`Connection::data_to_send`], then close
    /// the transport.
    Closed,
}

/// A frame whose header was parsed and whose payload is arriving.
#[derive(Debug, Clone, Copy)]
struct PartialFrame {
    header: FrameHeader,
    /// Payload bytes at the front of the read buffer already unmasked (and,
    /// for uncompressed text, already validated).
    processed: usize,
}

impl PartialFrame {
    /// The payload's length; `check_header` made sure it fits a `usize`.
    fn len(&self) -> usize {
        self.header.payload_len as usize
    }
}

/// A fragmented or compressed message being assembled.
#[derive(Debug)]
struct PartialMessage {
    text: bool,
    compressed: bool,
    data: Vec<u8>,
}

/// permessage-deflate state, when negotiated.
#[derive(Debug)]
struct Compression {
    deflater: Deflater,
    inflater: Inflater,
    /// Reused for compressed payloads before they are framed.
    scratch: BytesMut,
    /// The compression level, for prepared messages compressed once.
    level: u32,
    /// Whether our messages are compressed from a fresh state each time
    /// with a full window: then a prepared message's shared compressed
    /// frame fits this connection.
    shares_prepared: bool,
}

/// A WebSocket connection's protocol state. See the [module docs](self) for
/// the order in which to call its methods.
#[derive(Debug)]
pub struct Connection {
    role: Role,
    /// Shared with the server's other connections.
    config: Arc<Config>,
    /// The read and write buffers, while the connection uses them; an
    /// idle connection holds none (see [`Connection::release_buffers`]).
    buffers: Option<Box<Buffers>>,
    /// Validates the text message in progress as its bytes arrive.
    utf8: Utf8Validator,
    /// What few connections have, or have only for a while, in one box
    /// made on first use: an open connection that has none of it is one
    /// null pointer smaller for each.
    extra: Option<Box<Extra>>,
    /// The transport's read side ended.
    eof: bool,
    /// The connection is over for good (failed, timed out, or finished).
    closed: bool,
    timers: timers::Timers,
}

/// A connection's buffers, in one allocation that a busy connection keeps
/// and an idle one hands back (to a per-thread pool, say): an idle
/// connection then costs one null pointer for them.
#[derive(Debug, Default)]
pub struct Buffers {
    /// Received bytes not yet consumed by the decoder.
    read: BytesMut,
    /// Bytes waiting to be written.
    out: Outgoing,
    /// The frame whose payload is arriving. Here rather than in the
    /// `Connection`: a connection with a frame half-received keeps its
    /// buffers, and an idle one is 32 bytes smaller for it.
    frame: Option<PartialFrame>,
}

impl Buffers {
    /// Forgets whatever the buffers hold, keeping their memory, and drops
    /// buffers whose capacity is not in `keep` (a huge one left by a large
    /// message, say). For a pool, before keeping them for another
    /// connection.
    pub fn reset(&mut self, keep: std::ops::RangeInclusive<usize>) {
        self.frame = None;
        self.read.clear();
        if !keep.contains(&self.read.capacity()) {
            self.read = BytesMut::new();
        }
        self.out.reset(keep);
    }
}

/// What a connection has only when it compresses, assembles a message,
/// negotiated a subprotocol or is ending, in one 64-byte box (a test keeps
/// it there), so that an open connection with none of it holds one null
/// pointer for it all. The larger parts are boxed again: a `/ws` session
/// (whose subprotocol is here) or a fragmented message pays for this box,
/// not for the close state too. Freed again when nothing is left in it.
#[derive(Debug, Default)]
struct Extra {
    /// The message being assembled from several frames, or inflated.
    message: Option<PartialMessage>,
    compression: Option<Box<Compression>>,
    /// The close frames and the error of a connection that is ending.
    ending: Option<Box<Ending>>,
    /// The subprotocol negotiated in the handshake.
    protocol: Option<Box<str>>,
}

impl Extra {
    fn is_empty(&self) -> bool {
        self.message.is_none()
            && self.compression.is_none()
            && self.ending.is_none()
            && self.protocol.is_none()
    }
}

/// What only an ending connection has.
#[derive(Debug, Default)]
struct Ending {
    /// The close frame we sent, if any.
    close_sent: Option<Option<CloseFrame>>,
    /// The close frame the peer sent, if any.
    close_received: Option<Option<CloseFrame>>,
    /// An error to report from the next `poll_event`.
    pending_error: Option<Error>,
}

impl Connection {
    /// A connection in the `Open` state. `deflate` holds the parameters
    /// negotiated in the handshake, if compression was agreed; `now` starts
    /// the keepalive clock.
    ///
    /// `config` may be a [`Config`] or an `Arc<Config>`: a server passes one
    /// shared `Arc` to all its connections, which then hold a pointer to
    /// their settings instead of a copy.
    pub fn new(
        role: Role,
        config: impl Into<Arc<Config>>,
        deflate: Option<(DeflateParams, &DeflateConfig)>,
        now: Instant,
    ) -> Connection {
        let compression = deflate.map(|(params, cfg)| {
            let (bits, reset) = match role {
                Role::Server => (
                    params.server_max_window_bits,
                    params.server_no_context_takeover,
                ),
                Role::Client => (
                    params.client_max_window_bits,
                    params.client_no_context_takeover,
                ),
            };
            Box::new(Compression {
                deflater: Deflater::new(cfg.level, bits, reset),
                inflater: Inflater::new(),
                scratch: BytesMut::new(),
                level: cfg.level,
                shares_prepared: reset && bits == 15,
            })
        });
        Connection {
            role,
            config: config.into(),
            buffers: None,
            utf8: Utf8Validator::new(),
            extra: compression.map(|c| {
                Box::new(Extra {
                    compression: Some(c),
                    ..Extra::default()
                })
            }),
            eof: false,
            closed: false,
            timers: timers::Timers::new(now),
        }
    }

    /// This end's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The settings in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Whether permessage-deflate was negotiated.
    pub fn is_compressed(&self) -> bool {
        self.compression().is_some()
    }

    /// The subprotocol negotiated in the handshake, as recorded with
    /// [`Connection::set_protocol`].
    pub fn protocol(&self) -> Option<&str> {
        self.extra.as_ref()?.protocol.as_deref()
    }

    /// Records the subprotocol the handshake agreed on, for
    /// [`Connection::protocol`].
    pub fn set_protocol(&mut self, protocol: Option<String>) {
        match protocol {
            Some(p) => self.extra_mut().protocol = Some(p.into_boxed_str()),
            None => {
                if let Some(e) = &mut self.extra {
                    e.protocol = None;
                }
                self.tidy_extra();
            }
        }
    }

    /// Where the close handshake stands.
    pub fn state(&self) -> State {
        if self.is_closed() {
            State::Closed
        } else if self.close_sent().is_some() || self.close_received().is_some() {
            State::Closing
        } else {
            State::Open
        }
    }

    /// Whether the connection is over: once [`Connection::data_to_send`] is
    /// flushed, the transport should be closed.
    ///
    /// A server is done as soon as both close frames were exchanged; a
    /// client waits for the server to end the TCP connection first (section
    /// 7.1.1), up to `close_timeout`.
    pub fn is_closed(&self) -> bool {
        self.closed
            || self.eof
            || (self.role == Role::Server
                && self.close_sent().is_some()
                && self.close_received().is_some())
    }

    /// The close frame the peer sent, once received (`Some(None)` if it had
    /// no status code).
    pub fn close_received(&self) -> Option<&Option<CloseFrame>> {
        self.extra
            .as_ref()?
            .ending
            .as_ref()?
            .close_received
            .as_ref()
    }

    /// The close frame we sent, if any.
    pub fn close_sent(&self) -> Option<&Option<CloseFrame>> {
        self.extra.as_ref()?.ending.as_ref()?.close_sent.as_ref()
    }

    /// The ending state, created on first use.
    fn ending_mut(&mut self) -> &mut Ending {
        self.extra_mut().ending.get_or_insert_with(Box::default)
    }

    /// Frees the rarely used state's box once nothing is left in it.
    fn tidy_extra(&mut self) {
        if self.extra.as_ref().is_some_and(|e| e.is_empty()) {
            self.extra = None;
        }
    }

    /// The rarely used state, created on first use.
    fn extra_mut(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Box::default)
    }

    fn compression(&self) -> Option<&Compression> {
        self.extra.as_ref()?.compression.as_deref()
    }

    fn compression_mut(&mut self) -> Option<&mut Compression> {
        self.extra.as_mut()?.compression.as_deref_mut()
    }

    /// The message being assembled, if any.
    fn message(&self) -> Option<&PartialMessage> {
        self.extra.as_ref()?.message.as_ref()
    }

    /// The buffers, created (empty) if the connection has none.
    fn buffers(&mut self) -> &mut Buffers {
        self.buffers.get_or_insert_with(Box::default)
    }

    /// Bytes to write to the transport, as a [`bytes::Buf`]. Advance it by
    /// what was written. An idle connection holds no buffers and this makes
    /// empty ones: use [`Connection::has_data_to_send`] or
    /// [`Connection::queued_len`] to check whether anything waits.
    pub fn data_to_send(&mut self) -> &mut Outgoing {
        &mut self.buffers().out
    }

    /// How many bytes wait to be written.
    pub fn queued_len(&self) -> usize {
        self.buffers.as_ref().map_or(0, |b| b.out.len())
    }

    /// Whether anything waits to be written.
    pub fn has_data_to_send(&self) -> bool {
        self.queued_len() > 0
    }

    /// Whether the connection holds buffers.
    pub fn has_buffers(&self) -> bool {
        self.buffers.is_some()
    }

    /// Gives a connection that holds no buffers some to use (from a pool,
    /// say), so that its next reads and writes need no allocation. Ignored
    /// when it already has some. Whatever `buffers` still hold is dropped:
    /// only their memory is used (a pool's buffers were already emptied by
    /// [`Buffers::reset`], and are not cleared again).
    pub fn provide_buffers(&mut self, mut buffers: Box<Buffers>) {
        if self.buffers.is_none() {
            if !buffers.read.is_empty() || !buffers.out.is_empty() || buffers.frame.is_some() {
                buffers.reset(0..=usize::MAX);
            }
            self.buffers = Some(buffers);
        }
    }

    /// Drops buffers an idle connection does not need, to keep its memory
    /// small. Call it when the connection goes idle.
    pub fn shrink_buffers(&mut self) {
        self.release_buffers(drop);
    }

    /// Hands the connection's buffers to `keep` (a per-thread pool, say) if
    /// it is idle: no frame half-received, nothing waiting to be sent. The
    /// connection then holds none until it reads or writes again. Otherwise
    /// the memory of whichever buffer is empty is freed: the write buffer's
    /// while half a frame sits in the read buffer (a slow sender), the read
    /// buffer's while output waits (a slow reader).
    pub fn release_buffers(&mut self, keep: impl FnOnce(Box<Buffers>)) {
        let Some(b) = &mut self.buffers else { return };
        let reading = !b.read.is_empty() || b.frame.is_some();
        match (reading, b.out.is_empty()) {
            (false, true) => {
                if let Some(b) = self.buffers.take() {
                    keep(b);
                }
            }
            // Half a frame received (a slow sender) or bytes waiting to be
            // written (a slow reader): only the unused buffer's memory goes.
            (true, true) => drop(b.out.take_buffer()),
            (false, false) => b.read = BytesMut::new(),
            (true, false) => {}
        }
        if let Some(c) = self.compression_mut() {
            c.scratch = BytesMut::new();
        }
    }
}
