//! Connection tests, grouped by RFC section. Two cores are driven against
//! each other, or one core against hand-made frames, on a fake clock.

use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::*;
use crate::close::CloseCode;
use crate::deflate::DeflateConfig;
use crate::error::{Error, ProtocolError, SendError};
use crate::frame::OpCode;
use crate::mask::apply_mask;

// ---------------------------------------------------------------- harness

fn server() -> Connection {
    Connection::new(Role::Server, Config::default(), None, t0())
}

fn client() -> Connection {
    Connection::new(Role::Client, Config::default(), None, t0())
}

fn t0() -> Instant {
    // One fixed origin per test run, so "seconds after t0" is comparable.
    static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *T0.get_or_init(Instant::now)
}

fn at(secs: u64) -> Instant {
    t0() + Duration::from_secs(secs)
}

fn deflate_pair(cfg: DeflateConfig) -> (Connection, Connection) {
    let offer = crate::extension::parse_extensions(&cfg.client_offer()).unwrap();
    let params = cfg.accept_offer(&offer).unwrap();
    let c = Connection::new(Role::Client, Config::default(), Some((params, &cfg)), t0());
    let s = Connection::new(Role::Server, Config::default(), Some((params, &cfg)), t0());
    (c, s)
}

/// Everything `conn` wants to send, taken out of it.
fn take_output(conn: &mut Connection) -> Bytes {
    let out = conn.data_to_send();
    out.copy_to_bytes(out.remaining())
}

/// Moves `from`'s output into `to`.
fn transfer(from: &mut Connection, to: &mut Connection) {
    let bytes = take_output(from);
    to.handle_data(t0(), &bytes);
}

/// Every event `conn` can produce now, errors included.
fn events(conn: &mut Connection) -> Vec<Result<Event, Error>> {
    let mut out = Vec::new();
    loop {
        match conn.poll_event() {
            Ok(Some(e)) => out.push(Ok(e)),
            Ok(None) => return out,
            Err(e) => {
                out.push(Err(e));
                return out;
            }
        }
    }
}

/// A raw frame as a client (masked) or server (unmasked) would send it.
fn raw(fin: bool, rsv: u8, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut buf = BytesMut::new();
    buf.put_u8(u8::from(fin) << 7 | rsv << 4 | opcode);
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n @ 0..=125 => buf.put_u8(mask_bit | n as u8),
        n @ 126..=0xffff => {
            buf.put_u8(mask_bit | 126);
            buf.put_u16(n as u16);
        }
        n => {
            buf.put_u8(mask_bit | 127);
            buf.put_u64(n as u64);
        }
    }
    let mut body = payload.to_vec();
    if masked {
        let key = [0xa1, 0xb2, 0xc3, 0xd4];
        buf.put_slice(&key);
        apply_mask(&mut body, key, 0);
    }
    buf.put_slice(&body);
    buf.to_vec()
}

/// A masked frame from a client.
fn cf(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    raw(fin, 0, opcode, payload, true)
}

/// The frames in a server's output, as (opcode, payload).
fn sent_frames(conn: &mut Connection) -> Vec<(OpCode, Vec<u8>)> {
    let bytes = take_output(conn);
    let mut rest = &bytes[..];
    let mut out = Vec::new();
    while let Some((h, n)) = FrameHeader::parse(rest).unwrap() {
        let len = h.payload_len as usize;
        let mut payload = rest[n..n + len].to_vec();
        if let Some(key) = h.mask {
            apply_mask(&mut payload, key, 0);
        }
        out.push((h.opcode, payload));
        rest = &rest[n + len..];
    }
    assert!(rest.is_empty());
    out
}

/// Asserts that the connection failed with `err` and sent a close `code`.
#[track_caller]
fn assert_failed(conn: &mut Connection, err: ProtocolError, code: CloseCode) {
    let evs = events(conn);
    assert_eq!(evs.last(), Some(&Err(Error::Protocol(err))), "{evs:?}");
    let frames = sent_frames(conn);
    let (op, payload) = frames.last().expect("a close frame");
    assert_eq!(*op, OpCode::Close);
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), code.0);
    assert!(conn.is_closed());
    // Nothing more comes out, whatever arrives.
    conn.handle_data(t0(), &cf(true, 1, b"late"));
    assert_eq!(conn.poll_event(), Ok(None));
}

fn text(s: &str) -> Result<Event, Error> {
    Ok(Event::Message(Message::text(s)))
}

// ------------------------------------------------- section 5.1: masking

#[test]
fn s5_1_unmasked_client_frame_fails_1002() {
    let mut s = server();
    s.handle_data(t0(), &raw(true, 0, 1, b"hi", false));
    assert_failed(
        &mut s,
        ProtocolError::UnmaskedFrameFromClient,
        CloseCode::PROTOCOL_ERROR,
    );
}

#[test]
fn s5_1_masked_server_frame_fails_1002() {
    let mut c = client();
    c.handle_data(t0(), &raw(true, 0, 1, b"hi", true));
    assert_failed(
        &mut c,
        ProtocolError::MaskedFrameFromServer,
        CloseCode::PROTOCOL_ERROR,
    );
}

#[test]
fn s5_1_client_masks_and_server_does_not() {
    let mut c = client();
    c.send_text("hello").unwrap();
    let wire = take_output(&mut c);
    assert_eq!(wire[1] & 0x80, 0x80);
    let mut s = server();
    s.send_text("hello").unwrap();
    assert_eq!(&take_output(&mut s)[..], b"\x81\x05hello");
}

// ------------------------------------------ section 5.2: base framing

#[test]
fn s5_2_reserved_bits_fail_1002() {
    for rsv in [1u8, 2, 4] {
        let mut s = server();
        s.handle_data(t0(), &raw(true, rsv, 1, b"x", true));
        assert_failed(
            &mut s,
            ProtocolError::ReservedBitsSet,
            CloseCode::PROTOCOL_ERROR,
        );
    }
}

#[test]
fn s5_2_reserved_opcodes_fail_1002() {
    for op in [3u8, 7, 0xb, 0xf] {
        let mut s = server();
        s.handle_data(t0(), &cf(true, op, b""));
        assert_failed(
            &mut s,
            ProtocolError::ReservedOpcode(op),
            CloseCode::PROTOCOL_ERROR,
        );
    }
}

#[test]
fn s5_2_all_length_encodings() {
    for len in [0, 125, 126, 65535, 65536, 200_000] {
        let payload = vec![b'a'; len];
        let mut s = server();
        s.handle_data(t0(), &cf(true, 2, &payload));
        assert_eq!(
            events(&mut s),
            vec![Ok(Event::Message(Message::binary(payload.clone())))]
        );
    }
}

#[test]
fn s5_2_frame_over_the_limit_fails_1009_on_its_header() {
    let mut s = server();
    // Only the header arrives: the size alone is enough to refuse.
    s.handle_data(t0(), &[0x82, 0xff, 0, 0, 0, 0, 0x10, 0, 0, 0, 1, 2, 3, 4]);
    assert_failed(
        &mut s,
        ProtocolError::FrameTooLarge {
            size: 0x1000_0000,
            max: 16 << 20,
        },
        CloseCode::MESSAGE_TOO_BIG,
    );
}

// --------------------------------------------- section 5.4: fragmentation

#[test]
fn s5_4_fragments_with_control_frames_interleaved() {
    let mut s = server();
    let mut wire = cf(false, 1, b"Hel");
    wire.extend(cf(true, 9, b"p1"));
    wire.extend(cf(false, 0, b"lo, "));
    wire.extend(cf(true, 0xa, b"p2"));
    wire.extend(cf(true, 0, b"world"));
    s.handle_data(t0(), &wire);
    assert_eq!(
        events(&mut s),
        vec![
            Ok(Event::Ping(Bytes::from_static(b"p1"))),
            Ok(Event::Pong(Bytes::from_static(b"p2"))),
            text("Hello, world"),
        ]
    );
    // The ping was answered with the same payload.
    assert_eq!(sent_frames(&mut s), vec![(OpCode::Pong, b"p1".to_vec())]);
}

#[test]
fn s5_4_continuation_without_a_message_fails_1002() {
    let mut s = server();
    s.handle_data(t0(), &cf(true, 0, b"x"));
    assert_failed(
        &mut s,
        ProtocolError::UnexpectedContinuation,
        CloseCode::PROTOCOL_ERROR,
    );
}

#[test]
fn s5_4_new_message_inside_a_fragmented_one_fails_1002() {
    let mut s = server();
    let mut wire = cf(false, 1, b"a");
    wire.extend(cf(true, 2, b"b"));
    s.handle_data(t0(), &wire);
    assert_failed(
        &mut s,
        ProtocolError::ExpectedContinuation,
        CloseCode::PROTOCOL_ERROR,
    );
}

#[test]
fn s5_4_message_over_the_limit_fails_1009_before_it_ends() {
    let config = Config {
        max_message_size: 10,
        ..Config::default()
    };
    let mut s = Connection::new(Role::Server, config, None, t0());
    let mut wire = cf(false, 2, b"123456");
    wire.extend(cf(false, 0, b"789012"));
    s.handle_data(t0(), &wire);
    assert_failed(
        &mut s,
        ProtocolError::MessageTooLarge { max: 10 },
        CloseCode::MESSAGE_TOO_BIG,
    );
}

// ------------------------------------------- section 5.5: control frames

#[test]
fn s5_5_fragmented_or_long_control_frames_fail_1002() {
    let mut s = server();
    s.handle_data(t0(), &cf(false, 9, b""));
    assert_failed(
        &mut s,
        ProtocolError::FragmentedControlFrame,
        CloseCode::PROTOCOL_ERROR,
    );

    let mut s = server();
    s.handle_data(t0(), &cf(true, 9, &[0; 126]));
    assert_failed(
        &mut s,
        ProtocolError::ControlFrameTooLong(126),
        CloseCode::PROTOCOL_ERROR,
    );
}

#[test]
fn s5_5_control_payload_limit_on_send() {
    let mut s = server();
    assert_eq!(
        s.send_ping(&[0; 126]),
        Err(SendError::ControlFrameTooLong(126))
    );
    assert_eq!(s.send_ping(&[0; 125]), Ok(()));
}

// --------------------------------------- section 5.5.1 / 7: closing

#[test]
fn s7_peer_close_is_echoed_and_server_closes() {
    let mut s = server();
    s.handle_data(t0(), &cf(true, 8, b"\x03\xe9bye"));
    assert_eq!(
        events(&mut s),
        vec![Ok(Event::Close(Some(CloseFrame::new(
            CloseCode::GOING_AWAY,
            "bye"
        ))))]
    );
    assert_eq!(
        sent_frames(&mut s),
        vec![(OpCode::Close, b"\x03\xe9".to_vec())]
    );
    assert!(s.is_closed());
    assert_eq!(s.state(), State::Closed);
}

#[test]
fn s7_empty_close_is_answered_with_empty_close() {
    let mut s = server();
    s.handle_data(t0(), &cf(true, 8, b""));
    assert_eq!(events(&mut s), vec![Ok(Event::Close(None))]);
    assert_eq!(sent_frames(&mut s), vec![(OpCode::Close, vec![])]);
}

#[test]
fn s7_invalid_close_payloads() {
    let cases: [(&[u8], ProtocolError, CloseCode); 4] = [
        (
            b"\x03",
            ProtocolError::TruncatedCloseCode,
            CloseCode::PROTOCOL_ERROR,
        ),
        (
            b"\x03\xed",
            ProtocolError::InvalidCloseCode(1005),
            CloseCode::PROTOCOL_ERROR,
        ),
        (
            b"\x00\x00",
            ProtocolError::InvalidCloseCode(0),
            CloseCode::PROTOCOL_ERROR,
        ),
        (
            b"\x03\xe8\xce\xba\xe1\xbd",
            ProtocolError::InvalidCloseReason,
            CloseCode::INVALID_PAYLOAD,
        ),
    ];
    for (payload, err, code) in cases {
        let mut s = server();
        s.handle_data(t0(), &cf(true, 8, payload));
        assert_failed(&mut s, err, code);
    }
}

#[test]
fn s7_full_handshake_started_by_the_server() {
    let (mut c, mut s) = (client(), server());
    s.send_close(
        at(0),
        Some(CloseFrame::new(CloseCode::GOING_AWAY, "shutdown")),
    )
    .unwrap();
    assert_eq!(s.state(), State::Closing);
    assert_eq!(s.send_text("late"), Err(SendError::Closing));
    transfer(&mut s, &mut c);
    assert_eq!(
        events(&mut c),
        vec![Ok(Event::Close(Some(CloseFrame::new(
            CloseCode::GOING_AWAY,
            "shutdown"
        ))))]
    );
    // The client answered, but waits for the server to close TCP.
    assert!(!c.is_closed());
    transfer(&mut c, &mut s);
    assert_eq!(
        events(&mut s),
        vec![Ok(Event::Close(Some(CloseFrame::new(
            CloseCode::GOING_AWAY,
            ""
        ))))]
    );
    assert!(s.is_closed());
    c.handle_eof();
    assert_eq!(events(&mut c), vec![]);
    assert!(c.is_closed());
}

#[test]
fn s7_client_stops_waiting_for_the_server_after_close_timeout() {
    let (mut c, mut s) = (client(), server());
    c.send_close(at(0), None).unwrap();
    transfer(&mut c, &mut s);
    events(&mut s);
    transfer(&mut s, &mut c);
    assert_eq!(events(&mut c), vec![Ok(Event::Close(None))]);
    let deadline = c.poll_timeout().unwrap();
    assert_eq!(deadline, at(10));
    c.handle_timeout(at(10));
    assert!(c.is_closed());
    // Handshake completed: not an error.
    assert_eq!(events(&mut c), vec![]);
}

#[test]
fn s7_close_timeout_when_the_peer_never_answers() {
    let mut s = server();
    s.send_close(at(0), None).unwrap();
    s.handle_timeout(at(9));
    assert!(!s.is_closed());
    s.handle_timeout(at(10));
    assert!(s.is_closed());
    assert_eq!(events(&mut s), vec![Err(Error::CloseTimeout)]);
}

#[test]
fn s7_data_after_peer_close_is_ignored() {
    let mut s = server();
    let mut wire = cf(true, 8, b"\x03\xe8");
    wire.extend(cf(true, 1, b"after"));
    s.handle_data(t0(), &wire);
    assert_eq!(
        events(&mut s),
        vec![Ok(Event::Close(Some(CloseFrame::new(
            CloseCode::NORMAL,
            ""
        ))))]
    );
}

#[test]
fn s7_eof_in_the_middle_of_a_frame_is_abnormal() {
    let mut s = server();
    let wire = cf(true, 1, b"hello");
    s.handle_data(t0(), &wire[..wire.len() - 2]);
    assert_eq!(events(&mut s), vec![]);
    s.handle_eof();
    assert_eq!(events(&mut s), vec![Err(Error::UnexpectedEof)]);
    assert!(s.is_closed());
}

#[test]
fn s7_nothing_is_sent_once_the_transport_ended() {
    let mut s = server();
    s.handle_eof();
    assert!(s.is_closed());
    assert_eq!(s.send_text("x"), Err(SendError::Closing));
    assert_eq!(s.send(Message::binary(vec![1u8])), Err(SendError::Closing));
    assert_eq!(s.send_ping(b""), Err(SendError::Closing));
    assert_eq!(s.send_pong(b""), Err(SendError::Closing));
    assert_eq!(
        s.send_prepared(&crate::prepared::PreparedMessage::new(Message::text("p"))),
        Err(SendError::Closing)
    );
    assert_eq!(s.send_close(at(0), None), Err(SendError::Closing));
    assert!(!s.has_data_to_send());
}

#[test]
fn s7_messages_before_eof_are_delivered_first() {
    let mut s = server();
    s.handle_data(t0(), &cf(true, 1, b"last words"));
    s.handle_eof();
    assert_eq!(
        events(&mut s),
        vec![text("last words"), Err(Error::UnexpectedEof)]
    );
}

// ------------------------------------------------- section 8.1: UTF-8

#[test]
fn s8_1_invalid_utf8_fails_1007() {
    let mut s = server();
    s.handle_data(
        t0(),
        &cf(
            true,
            1,
            b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited",
        ),
    );
    assert_failed(
        &mut s,
        ProtocolError::InvalidUtf8,
        CloseCode::INVALID_PAYLOAD,
    );
}

#[test]
fn s8_1_fails_fast_on_the_first_bad_fragment() {
    let mut s = server();
    s.handle_data(t0(), &cf(false, 1, "κόσμε".as_bytes()));
    assert_eq!(events(&mut s), vec![]);
    s.handle_data(t0(), &cf(false, 0, b"\xf4\x90\x80\x80"));
    // The message is not over, but it can never be valid.
    assert_failed(
        &mut s,
        ProtocolError::InvalidUtf8,
        CloseCode::INVALID_PAYLOAD,
    );
}

#[test]
fn s8_1_fails_fast_in_the_middle_of_a_frame() {
    let mut s = server();
    let wire = cf(true, 1, b"valid text, then \xc0\xaf and much more to come");
    // Header plus the payload up to just after the invalid byte.
    s.handle_data(t0(), &wire[..6 + 19]);
    assert_failed(
        &mut s,
        ProtocolError::InvalidUtf8,
        CloseCode::INVALID_PAYLOAD,
    );
}

#[test]
fn s8_1_code_point_split_across_fragments_is_valid() {
    let mut s = server();
    let bytes = "€uro".as_bytes();
    let mut wire = cf(false, 1, &bytes[..1]);
    wire.extend(cf(false, 0, &bytes[1..2]));
    wire.extend(cf(true, 0, &bytes[2..]));
    s.handle_data(t0(), &wire);
    assert_eq!(events(&mut s), vec![text("€uro")]);
}

#[test]
fn s8_1_incomplete_code_point_at_message_end_fails() {
    let mut s = server();
    s.handle_data(t0(), &cf(true, 1, &"€".as_bytes()[..2]));
    assert_failed(
        &mut s,
        ProtocolError::InvalidUtf8,
        CloseCode::INVALID_PAYLOAD,
    );
}

// -------------------------------------- RFC 7692: permessage-deflate

#[test]
fn rfc7692_round_trip_both_ways_for_every_parameter_set() {
    for (snct, cnct, sbits, cbits) in [
        (false, false, 15, 15),
        (true, false, 15, 15),
        (false, true, 15, 15),
        (true, true, 9, 9),
        (false, false, 8, 8),
        (false, false, 12, 10),
    ] {
        let cfg = DeflateConfig {
            server_no_context_takeover: snct,
            client_no_context_takeover: cnct,
            server_max_window_bits: sbits,
            client_max_window_bits: cbits,
            ..DeflateConfig::default()
        };
        let (mut c, mut s) = deflate_pair(cfg);
        for msg in [
            "compress me compress me compress me",
            "",
            "again: compress me",
        ] {
            c.send_text(msg).unwrap();
            let wire = take_output(&mut c);
            assert_eq!(wire[0] & 0x40, 0x40, "RSV1 marks a compressed message");
            s.handle_data(t0(), &wire);
            assert_eq!(events(&mut s), vec![text(msg)]);
            s.send(Message::text(msg)).unwrap();
            transfer(&mut s, &mut c);
            assert_eq!(events(&mut c), vec![text(msg)]);
        }
    }
}

#[test]
fn rfc7692_fragmented_compressed_message() {
    let cfg = DeflateConfig::default();
    let (_, mut s) = deflate_pair(cfg.clone());
    let mut d = crate::deflate::Deflater::new(6, 15, false);
    let mut z = BytesMut::new();
    d.compress("Hello, compressed world".repeat(20).as_bytes(), &mut z)
        .unwrap();
    let (a, b) = z.split_at(z.len() / 2);
    let mut wire = raw(false, 4, 1, a, true);
    wire.extend(cf(true, 9, b""));
    wire.extend(raw(true, 0, 0, b, true));
    s.handle_data(t0(), &wire);
    let evs = events(&mut s);
    assert_eq!(evs.len(), 2);
    assert_eq!(evs[1], text(&"Hello, compressed world".repeat(20)));
}

// RFC 7692 section 7.2.3.4: a sender may end each message's deflate
// stream with BFINAL; the next message then starts a new stream.
#[test]
fn rfc7692_bfinal_messages_decode_one_after_another() {
    const HELLO_BFINAL: &[u8] = &[0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00];
    for takeover in [true, false] {
        let cfg = DeflateConfig {
            client_no_context_takeover: !takeover,
            ..DeflateConfig::default()
        };
        let (_, mut s) = deflate_pair(cfg);
        for _ in 0..3 {
            s.handle_data(t0(), &raw(true, 4, 1, HELLO_BFINAL, true));
            assert_eq!(events(&mut s), vec![text("Hello")], "takeover {takeover}");
        }
        // A stream ended in the first fragment: the rest of the message is
        // ignored, and the next message starts afresh.
        let mut wire = raw(false, 4, 1, HELLO_BFINAL, true);
        wire.extend(raw(true, 0, 0, b"\xff\xff\xff", true));
        wire.extend(raw(true, 4, 1, HELLO_BFINAL, true));
        s.handle_data(t0(), &wire);
        assert_eq!(
            events(&mut s),
            vec![text("Hello"), text("Hello")],
            "takeover {takeover}"
        );
        // An ordinary message after them still decodes.
        let mut d = crate::deflate::Deflater::new(6, 15, false);
        let mut z = BytesMut::new();
        d.compress(b"after", &mut z).unwrap();
        s.handle_data(t0(), &raw(true, 4, 1, &z, true));
        assert_eq!(events(&mut s), vec![text("after")], "takeover {takeover}");
    }
}

#[test]
fn rfc7692_rsv1_on_a_continuation_fails_1002() {
    let (_, mut s) = deflate_pair(DeflateConfig::default());
    let mut wire = raw(false, 4, 1, b"\xf2\x48", true);
    wire.extend(raw(true, 4, 0, b"\xcd", true));
    s.handle_data(t0(), &wire);
    assert_failed(
        &mut s,
        ProtocolError::CompressedBitMisplaced,
        CloseCode::PROTOCOL_ERROR,
    );
}

#[test]
fn rfc7692_decompression_bomb_hits_the_message_limit() {
    let cfg = DeflateConfig::default();
    let offer = crate::extension::parse_extensions(&cfg.client_offer()).unwrap();
    let params = cfg.accept_offer(&offer).unwrap();
    let config = Config {
        max_message_size: 1 << 20,
        ..Config::default()
    };
    let mut s = Connection::new(Role::Server, config, Some((params, &cfg)), t0());
    let mut d = crate::deflate::Deflater::new(9, 15, false);
    let mut z = BytesMut::new();
    d.compress(&vec![0u8; 64 << 20], &mut z).unwrap();
    assert!(
        z.len() < 100_000,
        "64 MiB of zeros deflate to {} bytes",
        z.len()
    );
    s.handle_data(t0(), &raw(true, 4, 2, &z, true));
    assert_failed(
        &mut s,
        ProtocolError::MessageTooLarge { max: 1 << 20 },
        CloseCode::MESSAGE_TOO_BIG,
    );
}

#[test]
fn rfc7692_invalid_deflate_data_fails_1002() {
    let (_, mut s) = deflate_pair(DeflateConfig::default());
    s.handle_data(t0(), &raw(true, 4, 2, b"\xff\xff\xff\xff\xff", true));
    assert_failed(
        &mut s,
        ProtocolError::InvalidDeflateData,
        CloseCode::PROTOCOL_ERROR,
    );
}

#[test]
fn rfc7692_compressed_invalid_utf8_fails_1007() {
    let (_, mut s) = deflate_pair(DeflateConfig::default());
    let mut d = crate::deflate::Deflater::new(6, 15, false);
    let mut z = BytesMut::new();
    d.compress(b"ok \xff not ok", &mut z).unwrap();
    s.handle_data(t0(), &raw(true, 4, 1, &z, true));
    assert_failed(
        &mut s,
        ProtocolError::InvalidUtf8,
        CloseCode::INVALID_PAYLOAD,
    );
}

#[test]
fn rfc7692_a_failed_compression_fails_the_connection_with_1011() {
    let (mut c, mut s) = deflate_pair(DeflateConfig::default());
    c.send_text("before").unwrap();
    transfer(&mut c, &mut s);
    assert_eq!(events(&mut s), vec![text("before")]);
    c.compression_mut().unwrap().deflater.fail_next = true;
    assert_eq!(c.send_text("lost"), Err(SendError::Compression));
    assert!(c.is_closed());
    assert_eq!(events(&mut c), vec![Err(Error::Compression)]);
    let frames = sent_frames(&mut c);
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(frames[0].0, OpCode::Close);
    assert_eq!(&frames[0].1[..2], &1011u16.to_be_bytes());
    assert_eq!(c.send_text("after"), Err(SendError::Closing));
}

/// The capacity kept alive by a received message's bytes.
fn kept_capacity(m: Message) -> usize {
    Vec::from(m.into_bytes()).capacity()
}

#[test]
fn assembled_messages_hold_little_more_than_their_size() {
    // Fragmented: the buffer doubled from 1000 to 2000 bytes for 1001.
    let mut s = server();
    let mut wire = cf(false, 2, &[1; 1000]);
    wire.extend(cf(true, 0, &[2; 1]));
    s.handle_data(t0(), &wire);
    let Some(Ok(Event::Message(m))) = events(&mut s).pop() else {
        panic!("no message")
    };
    assert_eq!(m.len(), 1001);
    let cap = kept_capacity(m);
    assert!(cap <= 1501, "1001 bytes hold {cap}");

    // Inflated: the output grew in 4 KiB steps, then doubled.
    let (mut c, mut s) = deflate_pair(DeflateConfig::default());
    let data: Vec<u8> = (0..5000u32).map(|i| (i * 7919 % 251) as u8).collect();
    c.send_binary(&data).unwrap();
    transfer(&mut c, &mut s);
    let Some(Ok(Event::Message(m))) = events(&mut s).pop() else {
        panic!("no message")
    };
    assert_eq!(m.as_bytes(), &data[..]);
    let cap = kept_capacity(m);
    assert!(cap <= 7500, "5000 bytes hold {cap}");
}

#[test]
fn no_size_limit_with_usize_max() {
    let config = Config {
        max_frame_size: usize::MAX,
        max_message_size: usize::MAX,
        ..Config::default()
    };
    config.validate().unwrap();
    let cfg = DeflateConfig::default();
    let offer = crate::extension::parse_extensions(&cfg.client_offer()).unwrap();
    let params = cfg.accept_offer(&offer).unwrap();
    for deflate in [None, Some((params, &cfg))] {
        let mut c = Connection::new(Role::Client, config.clone(), deflate, t0());
        let mut s = Connection::new(Role::Server, config.clone(), deflate, t0());
        c.send_text("whole").unwrap();
        transfer(&mut c, &mut s);
        let mut wire = cf(false, 1, b"frag");
        wire.extend(cf(true, 0, b"ments"));
        s.handle_data(t0(), &wire);
        // Compressed or not, whole or in fragments.
        assert_eq!(events(&mut s), vec![text("whole"), text("fragments")]);
    }
}

// --------------------------------------------------- timers

#[test]
fn keepalive_pings_when_quiet_and_fails_without_answer() {
    let mut s = server();
    assert_eq!(s.poll_timeout(), Some(at(20)));
    s.handle_timeout(at(20));
    assert_eq!(sent_frames(&mut s), vec![(OpCode::Ping, vec![])]);
    assert_eq!(s.poll_timeout(), Some(at(40)));
    s.handle_timeout(at(40));
    assert_eq!(events(&mut s), vec![Err(Error::KeepaliveTimeout)]);
    let frames = sent_frames(&mut s);
    assert_eq!(frames[0].0, OpCode::Close);
    assert_eq!(&frames[0].1[..2], &1011u16.to_be_bytes());
}

#[test]
fn keepalive_is_satisfied_by_any_data() {
    let mut s = server();
    s.handle_timeout(at(20));
    sent_frames(&mut s);
    s.handle_data(at(25), &cf(true, 0xa, b""));
    assert_eq!(events(&mut s), vec![Ok(Event::Pong(Bytes::new()))]);
    assert_eq!(s.poll_timeout(), Some(at(45)));
    s.handle_timeout(at(40));
    assert!(!s.is_closed());
    assert_eq!(sent_frames(&mut s), vec![]);
}

#[test]
fn idle_timeout_closes_with_1001() {
    let config = Config {
        ping_interval: None,
        idle_timeout: Some(Duration::from_secs(60)),
        ..Config::default()
    };
    let mut s = Connection::new(Role::Server, config, None, t0());
    assert_eq!(s.poll_timeout(), Some(at(60)));
    s.handle_timeout(at(60));
    assert_eq!(events(&mut s), vec![Err(Error::IdleTimeout)]);
    let frames = sent_frames(&mut s);
    assert_eq!(&frames[0].1[..2], &1001u16.to_be_bytes());
}

/// An application that held the peer's messages back (a rate limit) and
/// reads on moves the idle and keepalive deadlines, and a ping awaiting
/// its answer (queued behind the held messages) counts as answered.
#[test]
fn reading_resumed_after_holding_back_counts_as_received() {
    let config = Config {
        ping_interval: Some(Duration::from_secs(20)),
        ping_timeout: Duration::from_secs(10),
        idle_timeout: Some(Duration::from_secs(60)),
        ..Config::default()
    };
    let mut s = Connection::new(Role::Server, config, None, t0());
    s.handle_timeout(at(20));
    assert_eq!(sent_frames(&mut s).len(), 1, "a keepalive ping");
    assert_eq!(s.poll_timeout(), Some(at(30)));
    s.handle_read_resumed(at(25));
    // No ping awaits an answer: the next one is due 20 s on.
    assert_eq!(s.poll_timeout(), Some(at(45)));
    s.handle_timeout(at(30));
    assert!(!s.is_closed());
    let mut idle = Connection::new(
        Role::Server,
        Config {
            ping_interval: None,
            idle_timeout: Some(Duration::from_secs(60)),
            ..Config::default()
        },
        None,
        t0(),
    );
    idle.handle_read_resumed(at(50));
    assert_eq!(idle.poll_timeout(), Some(at(110)));
    idle.handle_timeout(at(60));
    assert!(!idle.is_closed());
    idle.handle_timeout(at(110));
    assert_eq!(events(&mut idle), vec![Err(Error::IdleTimeout)]);
}

#[test]
fn no_timers_once_closed() {
    let mut s = server();
    s.handle_data(t0(), &cf(true, 8, b""));
    events(&mut s);
    assert_eq!(s.poll_timeout(), None);
}

#[test]
fn durations_too_long_for_an_instant_never_run_out() {
    let forever = Config {
        ping_interval: Some(Duration::MAX),
        ping_timeout: Duration::MAX,
        idle_timeout: Some(Duration::MAX),
        close_timeout: Duration::MAX,
        ..Config::default()
    };
    forever.validate().unwrap();
    let mut s = Connection::new(Role::Server, forever.clone(), None, t0());
    assert_eq!(s.poll_timeout(), None);
    s.handle_timeout(at(1_000_000));
    assert!(!s.is_closed());
    assert_eq!(sent_frames(&mut s), vec![]);
    s.send_close(at(1_000_001), None).unwrap();
    assert_eq!(s.poll_timeout(), None);
    s.handle_timeout(at(2_000_000));
    assert!(!s.is_closed());

    // The peer's close started the deadline.
    let mut c = Connection::new(Role::Client, forever, None, t0());
    c.handle_data(at(5), &raw(true, 0, 8, b"", false));
    assert_eq!(events(&mut c), vec![Ok(Event::Close(None))]);
    assert_eq!(c.poll_timeout(), None);
    c.handle_timeout(at(2_000_000));
    assert!(!c.is_closed());

    // A ping sent, then an answer awaited forever.
    let patient = Config {
        ping_timeout: Duration::MAX,
        ..Config::default()
    };
    let mut s = Connection::new(Role::Server, patient, None, t0());
    s.handle_timeout(at(20));
    assert_eq!(sent_frames(&mut s), vec![(OpCode::Ping, vec![])]);
    assert_eq!(s.poll_timeout(), None);
    s.handle_timeout(at(2_000_000));
    assert!(!s.is_closed());
}

// ------------------------------------------- two cores, both directions

#[test]
fn two_cores_exchange_every_message_kind() {
    let (mut c, mut s) = (client(), server());
    c.send(Message::text("txt")).unwrap();
    c.send(Message::binary(vec![0u8, 1, 2])).unwrap();
    c.send(Message::binary(vec![7u8; 100_000])).unwrap();
    c.send_ping(b"are you there").unwrap();
    transfer(&mut c, &mut s);
    assert_eq!(
        events(&mut s),
        vec![
            text("txt"),
            Ok(Event::Message(Message::binary(vec![0u8, 1, 2]))),
            Ok(Event::Message(Message::binary(vec![7u8; 100_000]))),
            Ok(Event::Ping(Bytes::from_static(b"are you there"))),
        ]
    );
    s.send(Message::binary(vec![9u8; 50_000])).unwrap();
    transfer(&mut s, &mut c);
    assert_eq!(
        events(&mut c),
        vec![
            Ok(Event::Pong(Bytes::from_static(b"are you there"))),
            Ok(Event::Message(Message::binary(vec![9u8; 50_000]))),
        ]
    );
}

// ------------------------------------------------------- idle buffers

#[test]
fn an_idle_connection_hands_back_its_buffers_and_works_with_new_ones() {
    let (mut c, mut s) = (client(), server());
    assert!(!s.has_buffers(), "a new connection holds no buffers");
    c.send_text("one").unwrap();
    transfer(&mut c, &mut s);
    assert_eq!(
        events(&mut s),
        vec![Ok(Event::Message(Message::Text("one".into())))]
    );
    s.send_text("answer").unwrap();
    let mut kept = Vec::new();
    // Something waits to be sent: the buffers stay.
    s.release_buffers(|b| kept.push(b));
    assert!(kept.is_empty() && s.has_buffers());
    transfer(&mut s, &mut c);
    s.release_buffers(|b| kept.push(b));
    assert_eq!(kept.len(), 1);
    assert!(!s.has_buffers() && !s.has_data_to_send());
    assert_eq!(events(&mut s), vec![], "nothing to decode without buffers");

    // Given back, the same buffers serve the next message.
    s.provide_buffers(kept.pop().unwrap());
    c.send_binary(&[7; 3000]).unwrap();
    transfer(&mut c, &mut s);
    assert_eq!(
        events(&mut s),
        vec![Ok(Event::Message(Message::Binary(Bytes::from(vec![
            7;
            3000
        ]))))]
    );
}

#[test]
fn provided_buffers_that_still_hold_bytes_are_emptied_first() {
    let (mut c, mut s) = (client(), server());
    // A box holding half a frame and some output, as a careless pool
    // might hand over.
    let (mut stale_c, mut stale_s) = (client(), server());
    stale_c.send_binary(&[9; 2000]).unwrap();
    let wire = take_output(&mut stale_c);
    stale_s.handle_data(t0(), &wire[..1000]);
    stale_s.send_text("stale").unwrap();
    let stale = stale_s.buffers.take().unwrap();
    s.provide_buffers(stale);
    assert!(!s.has_data_to_send(), "stale output was not dropped");
    c.send_text("fresh").unwrap();
    transfer(&mut c, &mut s);
    assert_eq!(
        events(&mut s),
        vec![Ok(Event::Message(Message::Text("fresh".into())))]
    );
}

#[test]
fn reading_into_the_read_buffer_in_pieces() {
    let mut c = client();
    c.send_text(&"é".repeat(3000)).unwrap();
    let wire = take_output(&mut c);
    let mut s = server();
    for piece in wire.chunks(1000) {
        let mut buf = s.read_buffer();
        let held = buf.len();
        buf.reserve(piece.len());
        assert!(buf.capacity() >= held + piece.len());
        // As an I/O layer reads: into the spare capacity, then advance.
        let chunk = buf.chunk_mut();
        let n = piece.len().min(chunk.len());
        chunk[..n].copy_from_slice(&piece[..n]);
        // SAFETY: the first `n` bytes of the chunk were written.
        unsafe { buf.advance_mut(n) };
        buf.put_slice(&piece[n..]);
        assert_eq!(buf.len(), held + piece.len());
        s.handle_read(t0());
        let evs = events(&mut s);
        if evs.is_empty() {
            // Part of the frame was unmasked and validated in place.
            assert!(
                s.buffers
                    .as_ref()
                    .and_then(|b| b.frame)
                    .is_some_and(|f| f.processed > 0)
            );
        } else {
            assert_eq!(evs, vec![text(&"é".repeat(3000))]);
        }
    }
    assert!(s.read_buffer().is_empty());
}

#[test]
fn a_half_received_frame_keeps_the_read_buffer_only() {
    let (mut c, mut s) = (client(), server());
    c.send_binary(&[1; 2000]).unwrap();
    let wire = take_output(&mut c);
    s.handle_data(t0(), &wire[..1000]);
    assert_eq!(events(&mut s), vec![]);
    s.send_text("meanwhile").unwrap();
    transfer(&mut s, &mut c);
    let mut kept = 0;
    s.release_buffers(|_| kept += 1);
    assert_eq!(kept, 0, "half a frame is still in the read buffer");
    assert!(s.has_buffers());
    assert!(
        !s.data_to_send().has_buffer(),
        "the empty write buffer's memory went"
    );
    s.handle_data(t0(), &wire[1000..]);
    assert_eq!(
        events(&mut s),
        vec![Ok(Event::Message(Message::Binary(Bytes::from(vec![
            1;
            2000
        ]))))]
    );
}

/// What every open connection holds for its whole life: whatever it uses
/// only for a while or rarely is behind the `buffers` and `extra` pointers.
/// The server's idle connection task is sized with it (see "Idle memory"
/// in docs/performance.md).
#[test]
fn an_idle_connection_is_56_bytes() {
    assert_eq!(std::mem::size_of::<Connection>(), 56);
    // A `/ws` session (its subprotocol) or a fragmented message pays for
    // this box: 64 bytes, a size class of its own.
    assert_eq!(std::mem::size_of::<Extra>(), 64);
}

#[test]
fn the_extra_box_goes_once_a_fragmented_message_is_done() {
    let mut s = server();
    s.handle_data(t0(), &cf(false, 1, b"Hel"));
    assert_eq!(events(&mut s), vec![]);
    assert!(s.extra.is_some(), "the message in pieces is in it");
    s.handle_data(t0(), &cf(true, 0, b"lo"));
    assert_eq!(events(&mut s), vec![text("Hello")]);
    assert!(s.extra.is_none(), "nothing left in it: freed");

    // A subprotocol keeps it, and a message in pieces comes and goes in it.
    s.set_protocol(Some("walkie.v1".into()));
    s.handle_data(t0(), &cf(false, 2, b"a"));
    s.handle_data(t0(), &cf(true, 0, b"b"));
    assert_eq!(events(&mut s).len(), 1);
    assert_eq!(s.protocol(), Some("walkie.v1"));
    assert!(s.extra.as_ref().is_some_and(|e| e.message.is_none()));
}
