//! Property tests: whatever messages one core sends, the other receives
//! exactly, however the bytes are split into reads; masked (client to server)
//! and unmasked (server to client), with and without permessage-deflate.

use std::time::Instant;

use bytes::Buf;
use proptest::prelude::*;
use walkie_proto::extension::parse_extensions;
use walkie_proto::{Config, Connection, DeflateConfig, Event, Message, PreparedMessage, Role};

fn pair(deflate: Option<DeflateConfig>, now: Instant) -> (Connection, Connection) {
    match deflate {
        None => (
            Connection::new(Role::Client, Config::default(), None, now),
            Connection::new(Role::Server, Config::default(), None, now),
        ),
        Some(cfg) => {
            let offer = parse_extensions(&cfg.client_offer()).unwrap();
            let params = cfg.accept_offer(&offer).unwrap();
            (
                Connection::new(Role::Client, Config::default(), Some((params, &cfg)), now),
                Connection::new(Role::Server, Config::default(), Some((params, &cfg)), now),
            )
        }
    }
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        ".{0,300}".prop_map(Message::text),
        prop::collection::vec(any::<u8>(), 0..3000).prop_map(Message::binary),
        // Compressible payloads exercise the context window.
        (0usize..5000).prop_map(|n| Message::text("abc".repeat(n / 3))),
    ]
}

fn deflate() -> impl Strategy<Value = Option<DeflateConfig>> {
    prop_oneof![
        Just(None),
        (any::<bool>(), any::<bool>(), 8u8..=15, 8u8..=15).prop_map(|(s, c, sb, cb)| {
            let mut cfg = DeflateConfig::default();
            cfg.server_no_context_takeover = s;
            cfg.client_no_context_takeover = c;
            cfg.server_max_window_bits = sb;
            cfg.client_max_window_bits = cb;
            Some(cfg)
        }),
    ]
}

/// Sends `msgs` from `from` and feeds them to `to` in pieces of the given
/// sizes (cycled); returns what `to` received.
fn deliver(
    from: &mut Connection,
    to: &mut Connection,
    msgs: &[Message],
    splits: &[usize],
    now: Instant,
) -> Vec<Message> {
    for m in msgs {
        from.send(m.clone()).unwrap();
    }
    let out = from.data_to_send();
    let wire = out.copy_to_bytes(out.remaining());
    let mut received = Vec::new();
    let mut rest = &wire[..];
    let mut i = 0;
    while !rest.is_empty() {
        let n = splits[i % splits.len()].clamp(1, rest.len());
        i += 1;
        to.handle_data(now, &rest[..n]);
        rest = &rest[n..];
        while let Some(ev) = to.poll_event().unwrap() {
            match ev {
                Event::Message(m) => received.push(m),
                other => panic!("unexpected event {other:?}"),
            }
        }
    }
    received
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn messages_survive_any_read_split(
        msgs in prop::collection::vec(message(), 1..8),
        splits in prop::collection::vec(1usize..700, 1..10),
        deflate in deflate(),
    ) {
        let now = Instant::now();
        let (mut client, mut server) = pair(deflate, now);
        prop_assert_eq!(&deliver(&mut client, &mut server, &msgs, &splits, now), &msgs);
        prop_assert_eq!(&deliver(&mut server, &mut client, &msgs, &splits, now), &msgs);
    }

    /// A message framed once reaches two servers' clients intact, mixed with
    /// messages each server frames itself, whatever the compression
    /// parameters (shared compressed frames where there is no context
    /// takeover, each connection's own compression otherwise).
    #[test]
    fn prepared_messages_reach_every_client(
        msgs in prop::collection::vec((message(), any::<bool>()), 1..8),
        deflate_a in deflate(),
        deflate_b in deflate(),
    ) {
        let now = Instant::now();
        let mut pairs = [pair(deflate_a, now), pair(deflate_b, now)];
        let prepared: Vec<_> = msgs.iter().map(|(m, _)| PreparedMessage::new(m.clone())).collect();
        for (client, server) in &mut pairs {
            for ((m, shared), p) in msgs.iter().zip(&prepared) {
                if *shared {
                    server.send_prepared(p).unwrap();
                } else {
                    server.send(m.clone()).unwrap();
                }
            }
            let got = deliver(server, client, &[], &[4096], now);
            let want: Vec<Message> = msgs.iter().map(|(m, _)| m.clone()).collect();
            prop_assert_eq!(got, want);
        }
    }

    /// Arbitrary bytes never panic a server core, whatever the split.
    #[test]
    fn arbitrary_bytes_never_panic(
        data in prop::collection::vec(any::<u8>(), 0..2000),
        splits in prop::collection::vec(1usize..100, 1..5),
        compressed in any::<bool>(),
    ) {
        let now = Instant::now();
        let cfg = compressed.then(DeflateConfig::default);
        let (_, mut server) = pair(cfg, now);
        let mut rest = &data[..];
        let mut i = 0;
        while !rest.is_empty() {
            let n = splits[i % splits.len()].clamp(1, rest.len());
            i += 1;
            server.handle_data(now, &rest[..n]);
            rest = &rest[n..];
            while let Ok(Some(_)) = server.poll_event() {}
        }
        server.handle_eof();
        while let Ok(Some(_)) = server.poll_event() {}
        prop_assert!(server.is_closed());
    }
}

/// Without context takeover every connection gets the same compressed frame,
/// built once; with it, each compresses on its own (and still decodes).
#[test]
fn prepared_compressed_frame_is_shared_without_context_takeover() {
    let now = Instant::now();
    let mut cfg = DeflateConfig::default();
    cfg.server_no_context_takeover = true;
    let prepared = PreparedMessage::new(Message::text("hello hello hello hello"));
    let mut wires = Vec::new();
    for _ in 0..2 {
        let (mut client, mut server) = pair(Some(cfg.clone()), now);
        server.send_prepared(&prepared).unwrap();
        let out = server.data_to_send();
        let wire = out.copy_to_bytes(out.remaining());
        assert_eq!(wire[0], 0xC1, "a final, compressed text frame");
        client.handle_data(now, &wire);
        assert_eq!(
            client.poll_event().unwrap(),
            Some(Event::Message(prepared.message().clone()))
        );
        wires.push(wire);
    }
    assert_eq!(wires[0], wires[1]);

    let (_, mut plain) = pair(None, now);
    plain.send_prepared(&prepared).unwrap();
    let out = plain.data_to_send();
    assert_eq!(out.copy_to_bytes(out.remaining()), prepared.frame());
}
