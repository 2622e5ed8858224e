//! Regenerates the seed corpora under `fuzz/corpus/<target>/`:
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml --example gen_corpus
//! ```
//!
//! Each target's folder is emptied (dotfiles aside) and rewritten, so the
//! committed seeds are exactly what this file describes. Output is
//! deterministic: frames built here use fixed masking keys, and frames the
//! core produced with random keys are re-masked with fixed ones.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use walkie_fuzz::{
    CLIENT_NO_CONTEXT_TAKEOVER, DEFLATE, ECHO, SERVER_NO_CONTEXT_TAKEOVER, SMALL_LIMITS,
    WINDOW_SHIFT, config_for, deflate_for, encode_input,
};
use walkie_proto::deflate::Deflater;
use walkie_proto::handshake::{ClientHandshake, ClientRequest};
use walkie_proto::{
    Buf, BytesMut, CloseCode, CloseFrame, Connection, DeflateConfig, FrameHeader, OpCode, Role,
    apply_mask,
};

const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
const KEY2: [u8; 4] = [0x01, 0x02, 0x03, 0x04];

/// Flags for a window of `bits` (8 to 15).
fn window(bits: u8) -> u8 {
    (bits - 8) << WINDOW_SHIFT
}

/// One frame with `payload`, masked with `mask` if given.
fn frame(fin: bool, rsv1: bool, opcode: OpCode, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
    let header = FrameHeader {
        fin,
        rsv1,
        rsv2: false,
        rsv3: false,
        opcode,
        mask,
        payload_len: payload.len() as u64,
    };
    let mut v = Vec::new();
    header.encode(&mut v);
    let body = v.len();
    v.extend_from_slice(payload);
    if let Some(key) = mask {
        apply_mask(&mut v[body..], key, 0);
    }
    v
}

fn close_payload(code: CloseCode, reason: &str) -> Vec<u8> {
    let mut b = BytesMut::new();
    CloseFrame::new(code, reason).encode(&mut b);
    b.to_vec()
}

/// Re-frames every frame of `wire` with the masking key `mask` (or none).
fn remask(mut wire: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = Vec::new();
    while !wire.is_empty() {
        let (header, len) = FrameHeader::parse(wire).unwrap().unwrap();
        let n = header.payload_len as usize;
        let mut payload = wire[len..len + n].to_vec();
        if let Some(key) = header.mask {
            apply_mask(&mut payload, key, 0);
        }
        out.extend(frame(
            header.fin,
            header.rsv1,
            header.opcode,
            mask,
            &payload,
        ));
        wire = &wire[len + n..];
    }
    out
}

/// What a core of `role` sends for `texts` with the deflate settings of
/// `flags`, then a normal close; re-masked with a fixed key from a client.
fn core_output(role: Role, flags: u8, texts: &[&str]) -> Vec<u8> {
    let deflate = deflate_for(flags);
    let mut conn = Connection::new(
        role,
        config_for(flags),
        deflate.as_ref().map(|(p, c)| (*p, c)),
        Instant::now(),
    );
    for text in texts {
        conn.send_text(text).unwrap();
    }
    conn.send_close(
        Instant::now(),
        Some(CloseFrame::new(CloseCode::NORMAL, "done")),
    )
    .unwrap();
    let out = conn.data_to_send();
    let wire = out.copy_to_bytes(out.remaining());
    let mask = (role == Role::Client).then_some(KEY2);
    remask(&wire, mask)
}

/// One message compressed by the core's deflater, split into `parts` frames.
fn compressed_fragments(text: &str, parts: usize, mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut d = Deflater::new(6, 15, false);
    let mut payload = BytesMut::new();
    d.compress(text.as_bytes(), &mut payload).unwrap();
    let step = payload.len().div_ceil(parts);
    let chunks: Vec<&[u8]> = payload.chunks(step).collect();
    let mut out = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        let first = i == 0;
        let last = i + 1 == chunks.len();
        let opcode = if first {
            OpCode::Text
        } else {
            OpCode::Continuation
        };
        out.extend(frame(last, first, opcode, mask, chunk));
    }
    out
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn frame_decode() -> Vec<(&'static str, Vec<u8>)> {
    let mut len64 = vec![0x82, 0xff, 0, 0, 0, 0, 0, 1, 0, 0];
    len64.extend(KEY);
    vec![
        // RFC 6455 section 5.7: a masked "Hello".
        (
            "rfc_masked_hello",
            vec![
                0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
            ],
        ),
        (
            "unmasked_hello",
            vec![0x81, 0x05, b'H', b'e', b'l', b'l', b'o'],
        ),
        (
            "binary_len16_masked",
            frame(true, false, OpCode::Binary, Some(KEY), &[7; 300])[..8].to_vec(),
        ),
        ("binary_len64_masked", len64),
        (
            "ping_masked",
            frame(true, false, OpCode::Ping, Some(KEY), b""),
        ),
        (
            "close_1000_masked",
            frame(
                true,
                false,
                OpCode::Close,
                Some(KEY),
                &close_payload(CloseCode::NORMAL, ""),
            ),
        ),
        (
            "continuation_not_fin",
            frame(false, false, OpCode::Continuation, None, b"abc"),
        ),
        (
            "compressed_text_rsv1",
            vec![0xc1, 0x07, 0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00],
        ),
        // A 5-byte length written in the 16-bit form: valid, not minimal.
        (
            "non_minimal_len16",
            vec![0x82, 0xfe, 0x00, 0x05, 1, 2, 3, 4],
        ),
        ("reserved_opcode", vec![0x83, 0x00]),
        ("len64_top_bit", vec![0x82, 0x7f, 0x80, 0, 0, 0, 0, 0, 0, 1]),
    ]
}

fn server_handshake() -> Vec<(&'static str, Vec<u8>)> {
    const BASE: &str = "GET /chat HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let with = |extra: &str| format!("{BASE}{extra}\r\n").into_bytes();

    let (_, generated) = ClientHandshake::new(&ClientRequest {
        host: "localhost:9001".into(),
        target: "/ws?room=1".into(),
        protocols: vec!["chat".into(), "superchat".into()],
        deflate: Some(DeflateConfig::default()),
        headers: vec![("Origin".into(), "http://localhost".into())],
    })
    .unwrap();
    // The client's key is random: replace it with a fixed one.
    let generated = String::from_utf8(generated).unwrap();
    let generated = generated
        .split("\r\n")
        .map(|l| {
            if l.starts_with("Sec-WebSocket-Key:") {
                "Sec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw=="
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\r\n");
    let mut pipelined = generated.into_bytes();
    // A first frame right behind the head.
    pipelined.extend(frame(true, false, OpCode::Text, Some(KEY), b"hi"));

    vec![
        // RFC 6455 section 1.3 and 4.2.
        (
            "rfc_request",
            with("Origin: http://example.com\r\nSec-WebSocket-Protocol: chat, superchat\r\nSec-WebSocket-Version: 13\r\n"),
        ),
        (
            "deflate_offer",
            with("Sec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"),
        ),
        (
            "several_offers",
            with("Sec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: permessage-deflate; foo, x-webkit-deflate-frame\r\nSec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=\"10\"; client_max_window_bits=9; server_no_context_takeover; client_no_context_takeover\r\n"),
        ),
        ("client_request_pipelined", pipelined),
        ("version_8", with("Sec-WebSocket-Version: 8\r\n")),
        (
            "post",
            b"POST /chat HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n".to_vec(),
        ),
        (
            "malformed_extensions",
            with("Sec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: permessage-deflate; =3, a b\r\n"),
        ),
        (
            "short_key",
            b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: c2hvcnQ=\r\n\r\n".to_vec(),
        ),
        ("http10", b"GET / HTTP/1.0\r\nHost: a\r\n\r\n".to_vec()),
    ]
}

fn server_connection() -> Vec<(&'static str, Vec<u8>)> {
    let m = Some(KEY);
    let close = frame(
        true,
        false,
        OpCode::Close,
        m,
        &close_payload(CloseCode::NORMAL, ""),
    );
    let deflate15 = DEFLATE | window(15) | ECHO;
    let deflate8 =
        DEFLATE | window(8) | ECHO | SERVER_NO_CONTEXT_TAKEOVER | CLIENT_NO_CONTEXT_TAKEOVER;
    vec![
        (
            "rfc_hello_then_close",
            encode_input(
                0,
                0,
                &cat(&[
                    &[
                        0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
                    ],
                    &close,
                ]),
            ),
        ),
        (
            "fragmented_text_with_ping",
            encode_input(
                ECHO,
                3,
                &cat(&[
                    &frame(false, false, OpCode::Text, m, b"Hel"),
                    &frame(true, false, OpCode::Ping, m, b"ping"),
                    &frame(false, false, OpCode::Continuation, m, "l\u{e9}".as_bytes()),
                    &frame(true, false, OpCode::Continuation, m, b"o"),
                    &close,
                ]),
            ),
        ),
        (
            "binary_len16",
            encode_input(
                0,
                7,
                &cat(&[&frame(true, false, OpCode::Binary, m, &[0xab; 300]), &close]),
            ),
        ),
        (
            "ping_pong_close_reason",
            encode_input(
                0,
                0,
                &cat(&[
                    &frame(true, false, OpCode::Ping, m, b"abc"),
                    &frame(true, false, OpCode::Pong, m, b""),
                    &frame(
                        true,
                        false,
                        OpCode::Close,
                        m,
                        &close_payload(CloseCode::GOING_AWAY, "bye"),
                    ),
                ]),
            ),
        ),
        (
            "compressed_context_takeover",
            encode_input(
                deflate15,
                0,
                &core_output(
                    Role::Client,
                    deflate15,
                    &["hello hello hello", "hello hello hello", ""],
                ),
            ),
        ),
        (
            "compressed_window8_no_takeover",
            encode_input(
                deflate8,
                5,
                &core_output(
                    Role::Client,
                    deflate8,
                    &["stored blocks, stored blocks", "again"],
                ),
            ),
        ),
        (
            "compressed_fragmented",
            encode_input(
                DEFLATE | window(15),
                5,
                &cat(&[
                    &compressed_fragments(
                        "a fragmented compressed message, fragmented in three",
                        3,
                        m,
                    ),
                    &close,
                ]),
            ),
        ),
        (
            "small_limits_bomb",
            encode_input(
                DEFLATE | window(15) | SMALL_LIMITS,
                0,
                &compressed_fragments(&"0".repeat(4000), 1, m),
            ),
        ),
        (
            "invalid_utf8",
            encode_input(
                0,
                0,
                &frame(true, false, OpCode::Text, m, &[b'o', b'k', 0xff, 0xfe]),
            ),
        ),
        (
            "unmasked_from_client",
            encode_input(0, 0, &frame(true, false, OpCode::Text, None, b"Hello")),
        ),
        (
            "close_then_garbage",
            encode_input(0, 1, &cat(&[&close, b"garbage after close"])),
        ),
        (
            "binary_byte_by_byte",
            encode_input(
                0,
                1,
                &cat(&[
                    &frame(false, false, OpCode::Binary, m, b"\x00\x01\x02"),
                    &frame(true, false, OpCode::Continuation, Some(KEY2), b"\x03\x04"),
                ]),
            ),
        ),
    ]
}

fn client_connection() -> Vec<(&'static str, Vec<u8>)> {
    let close = frame(
        true,
        false,
        OpCode::Close,
        None,
        &close_payload(CloseCode::NORMAL, ""),
    );
    let deflate15 = DEFLATE | window(15) | ECHO;
    let deflate10 = DEFLATE | window(10) | ECHO | SERVER_NO_CONTEXT_TAKEOVER;
    vec![
        (
            "hello_then_close",
            encode_input(
                0,
                0,
                &cat(&[&[0x81, 0x05, b'H', b'e', b'l', b'l', b'o'], &close]),
            ),
        ),
        (
            "fragmented_text_with_ping",
            encode_input(
                ECHO,
                2,
                &cat(&[
                    &frame(false, false, OpCode::Text, None, b"Hel"),
                    &frame(true, false, OpCode::Ping, None, b"ping"),
                    &frame(true, false, OpCode::Continuation, None, b"lo"),
                    &close,
                ]),
            ),
        ),
        (
            "binary_len16",
            encode_input(
                0,
                9,
                &cat(&[
                    &frame(true, false, OpCode::Binary, None, &[0x5a; 200]),
                    &close,
                ]),
            ),
        ),
        (
            "close_with_reason",
            encode_input(
                0,
                0,
                &frame(
                    true,
                    false,
                    OpCode::Close,
                    None,
                    &close_payload(CloseCode(4000), "application says bye"),
                ),
            ),
        ),
        // RFC 7692 section 7.2.3.2: "Hello" twice, the second using the window.
        (
            "rfc7692_shared_window",
            encode_input(
                DEFLATE | window(15),
                0,
                &[
                    0xc1, 0x07, 0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0xc1, 0x05, 0xf2, 0x00,
                    0x11, 0x00, 0x00,
                ],
            ),
        ),
        (
            "compressed_from_server_core",
            encode_input(
                deflate15,
                0,
                &core_output(
                    Role::Server,
                    deflate15,
                    &["hello hello hello", "hello hello hello", ""],
                ),
            ),
        ),
        (
            "compressed_window10_no_takeover",
            encode_input(
                deflate10,
                4,
                &core_output(Role::Server, deflate10, &["window ten window ten", "x"]),
            ),
        ),
        (
            "compressed_fragmented_small_limits",
            encode_input(
                DEFLATE | window(15) | SMALL_LIMITS,
                3,
                &compressed_fragments(&"ab".repeat(300), 3, None),
            ),
        ),
        (
            "masked_from_server",
            encode_input(0, 0, &frame(true, false, OpCode::Text, Some(KEY), b"Hello")),
        ),
        // The close handshake, then silence until the close deadline.
        (
            "close_then_wait",
            encode_input(0, 1, &cat(&[&close, &[0u8; 16]])),
        ),
    ]
}

fn write(dir: &Path, seeds: Vec<(&'static str, Vec<u8>)>) {
    fs::create_dir_all(dir).unwrap();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let hidden = path.file_name().unwrap().to_string_lossy().starts_with('.');
        if path.is_file() && !hidden {
            fs::remove_file(path).unwrap();
        }
    }
    for (name, data) in seeds {
        assert!(data.len() < 4096, "{name} is {} bytes", data.len());
        fs::write(dir.join(name), data).unwrap();
    }
}

fn main() {
    let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    write(&corpus.join("frame_decode"), frame_decode());
    write(&corpus.join("server_handshake"), server_handshake());
    write(&corpus.join("server_connection"), server_connection());
    write(&corpus.join("client_connection"), client_connection());
    println!("wrote seed corpora under {}", corpus.display());
}
