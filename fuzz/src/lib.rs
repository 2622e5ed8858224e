//! Shared code of the walkie-proto fuzz targets: the input format of the
//! `server_connection` and `client_connection` targets and the driver that
//! feeds one input to a [`Connection`].
//!
//! # Connection input format
//!
//! ```text
//! byte 0      flags (see the constants below)
//! byte 1      chunking: 0 feeds the wire bytes in one call; n > 0 feeds
//!             chunks of 1..=n bytes, sizes drawn from a PRNG seeded by n
//! bytes 2..   the bytes the peer sent (for a server: masked client frames;
//!             for a client: unmasked server frames)
//! ```
//!
//! Inputs shorter than 2 bytes are fed as wire bytes with no flags.

use std::time::{Duration, Instant};

use walkie_proto::{
    Buf, Config, Connection, DeflateConfig, DeflateParams, Error, Event, Message, Role, SendError,
    State,
};

/// Flag: permessage-deflate was negotiated.
pub const DEFLATE: u8 = 0x01;
/// Flag: `server_no_context_takeover` was negotiated.
pub const SERVER_NO_CONTEXT_TAKEOVER: u8 = 0x02;
/// Flag: `client_no_context_takeover` was negotiated.
pub const CLIENT_NO_CONTEXT_TAKEOVER: u8 = 0x04;
/// Bits 3-5: both window sizes are `8 + ((flags >> 3) & 7)` bits, so 0
/// means 8 (stored blocks) and 7 means 15.
pub const WINDOW_SHIFT: u8 = 3;
/// Flag: small limits (`max_frame_size` 256, `max_message_size` 1024)
/// instead of the default [`Config`], to reach the size checks and the
/// decompression bomb limit with small inputs.
pub const SMALL_LIMITS: u8 = 0x40;
/// Flag: echo every message received back with [`Connection::send`], to
/// exercise the compressor with the negotiated window.
pub const ECHO: u8 = 0x80;

/// Builds a connection input from its parts (used by the corpus generator).
pub fn encode_input(flags: u8, chunking: u8, wire: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(wire.len() + 2);
    v.push(flags);
    v.push(chunking);
    v.extend_from_slice(wire);
    v
}

/// The deflate parameters and config selected by `flags`.
pub fn deflate_for(flags: u8) -> Option<(DeflateParams, DeflateConfig)> {
    if flags & DEFLATE == 0 {
        return None;
    }
    let bits = 8 + ((flags >> WINDOW_SHIFT) & 7);
    let params = DeflateParams {
        server_no_context_takeover: flags & SERVER_NO_CONTEXT_TAKEOVER != 0,
        client_no_context_takeover: flags & CLIENT_NO_CONTEXT_TAKEOVER != 0,
        server_max_window_bits: bits,
        client_max_window_bits: bits,
    };
    Some((params, DeflateConfig::default()))
}

/// The connection settings selected by `flags`.
pub fn config_for(flags: u8) -> Config {
    let mut config = Config::default();
    if flags & SMALL_LIMITS != 0 {
        config.max_frame_size = 256;
        config.max_message_size = 1024;
    }
    config
}

/// A tiny deterministic PRNG (xorshift32) for chunk sizes.
struct Chunker {
    state: u32,
    max: u32,
}

impl Chunker {
    fn next_len(&mut self, remaining: usize) -> usize {
        if self.max == 0 {
            return remaining;
        }
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.state = x;
        (1 + (x % self.max) as usize).min(remaining)
    }
}

/// Checks what one event says, and echoes messages when asked to.
fn check_event(conn: &mut Connection, event: Event, echo: bool) {
    match event {
        Event::Message(message) => {
            if let Message::Text(text) = &message {
                assert!(std::str::from_utf8(text.as_bytes()).is_ok());
            }
            assert!(message.len() <= conn.config().max_message_size);
            if echo {
                match conn.send(message) {
                    Ok(()) | Err(SendError::Closing) => {}
                    Err(e) => panic!("echoing a received message failed: {e:?}"),
                }
            }
        }
        Event::Ping(payload) | Event::Pong(payload) => assert!(payload.len() <= 125),
        Event::Close(_) => {
            assert!(conn.close_received().is_some());
            assert_ne!(conn.state(), State::Open);
        }
    }
}

/// Polls every event available now. Returns once `poll_event` says it needs
/// more bytes (or the connection is over).
fn drain(conn: &mut Connection, echo: bool, budget: &mut usize) {
    loop {
        // Every event consumes at least one frame header (2 bytes) or ends the
        // connection, so more events than input bytes means a loop.
        assert!(*budget > 0, "poll_event keeps returning events");
        *budget -= 1;
        match conn.poll_event() {
            Ok(Some(event)) => check_event(conn, event, echo),
            Ok(None) => return,
            Err(err) => {
                // An error is reported once and ends the connection.
                assert!(conn.is_closed(), "error without closing: {err:?}");
                if let Error::Protocol(p) = &err {
                    // The close code sent for it must be one allowed on the wire.
                    assert!(p.close_code().is_allowed_on_wire(), "{p:?}");
                }
            }
        }
        // Write out everything queued, as the I/O layer would.
        let out = conn.data_to_send();
        let n = out.remaining();
        out.advance(n);
    }
}

/// Runs one fuzz input through a connection of `role`.
pub fn run_connection(role: Role, data: &[u8]) {
    let (flags, chunking, wire) = match data {
        [flags, chunking, wire @ ..] => (*flags, *chunking, wire),
        _ => (0, 0, data),
    };
    let echo = flags & ECHO != 0;
    let deflate = deflate_for(flags);
    let start = Instant::now();
    let mut now = start;
    let mut conn = Connection::new(
        role,
        config_for(flags),
        deflate.as_ref().map(|(p, c)| (*p, c)),
        now,
    );
    assert_eq!(conn.is_compressed(), deflate.is_some());
    let mut chunker = Chunker {
        state: 0x9e37_79b9 ^ u32::from(chunking),
        max: u32::from(chunking),
    };
    // Events are at most one per 2 wire bytes, plus a final Ok(None) per
    // drain (at most two drains per chunk, and one after EOF).
    let mut budget = 4 * wire.len() + 8;
    let mut rest = wire;
    while !rest.is_empty() {
        let n = chunker.next_len(rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        conn.handle_data(now, chunk);
        drain(&mut conn, echo, &mut budget);
        // One second passes per chunk, so the close deadline can expire.
        now += Duration::from_secs(1);
        if let Some(deadline) = conn.poll_timeout() {
            assert!(!conn.is_closed());
            if deadline <= now {
                conn.handle_timeout(now);
                drain(&mut conn, echo, &mut budget);
            }
        }
    }
    conn.handle_eof();
    drain(&mut conn, echo, &mut budget);
    assert!(conn.is_closed());
    assert_eq!(conn.state(), State::Closed);
    assert_eq!(conn.poll_timeout(), None);
    // Once closed, polling again yields nothing.
    assert!(matches!(conn.poll_event(), Ok(None)));
    conn.shrink_buffers();
}
