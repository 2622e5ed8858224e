//! Micro-benchmarks of the protocol core's hot paths:
//! `cargo bench -p walkie-proto`.

use std::hint::black_box;
use std::time::Instant;

use bytes::Buf;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use walkie_proto::deflate::{Deflater, Inflater};
use walkie_proto::handshake::Request;
use walkie_proto::utf8::{Utf8Validator, validate};
use walkie_proto::{Config, Connection, DeflateConfig, Event, Message, Role, apply_mask};

/// `count` masked client frames of `size` bytes, as the wire carries them.
fn client_frames(size: usize, count: usize) -> Vec<u8> {
    let now = Instant::now();
    let mut c = Connection::new(Role::Client, Config::default(), None, now);
    let text = "a".repeat(size);
    for _ in 0..count {
        c.send_text(&text).unwrap();
    }
    let out = c.data_to_send();
    out.copy_to_bytes(out.remaining()).to_vec()
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    for (size, count) in [(32usize, 1000usize), (16 * 1024, 16)] {
        let wire = client_frames(size, count);
        g.throughput(Throughput::Elements(count as u64));
        g.bench_function(format!("server {count} x {size} B text"), |b| {
            let now = Instant::now();
            let mut server = Connection::new(Role::Server, Config::default(), None, now);
            b.iter(|| {
                server.handle_data(now, &wire);
                let mut n = 0;
                while let Ok(Some(Event::Message(m))) = server.poll_event() {
                    n += m.len();
                }
                black_box(n)
            });
        });
    }
    g.finish();
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode");
    for size in [32usize, 16 * 1024] {
        let msg = Message::text("a".repeat(size));
        for role in [Role::Server, Role::Client] {
            g.throughput(Throughput::Elements(1000));
            g.bench_function(format!("{role:?} 1000 x {size} B"), |b| {
                let now = Instant::now();
                let mut conn = Connection::new(role, Config::default(), None, now);
                b.iter(|| {
                    for _ in 0..1000 {
                        conn.send(msg.clone()).unwrap();
                    }
                    let out = conn.data_to_send();
                    let n = out.remaining();
                    out.advance(n);
                    black_box(n)
                });
            });
        }
    }
    g.finish();
}

fn masking(c: &mut Criterion) {
    let mut g = c.benchmark_group("mask");
    for size in [32usize, 16 * 1024] {
        let mut buf = vec![7u8; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(format!("{size} B"), |b| {
            b.iter(|| apply_mask(black_box(&mut buf), [1, 2, 3, 4], 1))
        });
    }
    g.finish();
}

fn utf8(c: &mut Criterion) {
    let mut g = c.benchmark_group("utf8");
    let ascii = "a".repeat(16 * 1024);
    let mixed = "héllo wörld κόσμε 中文 🎉 ".repeat(16 * 1024 / 40);
    for (name, text) in [("ascii", &ascii), ("mixed", &mixed)] {
        g.throughput(Throughput::Bytes(text.len() as u64));
        g.bench_function(format!("whole {name} 16 KiB"), |b| {
            b.iter(|| validate(black_box(text.as_bytes())))
        });
        g.bench_function(format!("incremental {name} 16 KiB in 1 KiB pieces"), |b| {
            b.iter(|| {
                let mut v = Utf8Validator::new();
                for piece in text.as_bytes().chunks(1024) {
                    v.feed(piece).unwrap();
                }
                v.finish()
            })
        });
    }
    g.finish();
}

fn deflate(c: &mut Criterion) {
    let mut g = c.benchmark_group("deflate");
    let json = r#"{"type":"score","match":1234,"home":{"name":"Walkie FC","goals":2},"away":{"name":"Sockets United","goals":1},"minute":78}"#;
    for (name, payload) in [
        ("32 B", &json.as_bytes()[..32]),
        ("120 B JSON", json.as_bytes()),
    ] {
        g.throughput(Throughput::Bytes(payload.len() as u64));
        g.bench_function(format!("compress {name}, context takeover"), |b| {
            let mut d = Deflater::new(6, 15, false);
            let mut out = bytes::BytesMut::new();
            b.iter(|| {
                out.clear();
                d.compress(black_box(payload), &mut out).unwrap();
            })
        });
        g.bench_function(format!("compress {name}, no context takeover"), |b| {
            let mut d = Deflater::new(6, 15, true);
            let mut out = bytes::BytesMut::new();
            b.iter(|| {
                out.clear();
                d.compress(black_box(payload), &mut out).unwrap();
            })
        });
        let mut d = Deflater::new(6, 15, true);
        let mut z = bytes::BytesMut::new();
        d.compress(payload, &mut z).unwrap();
        g.bench_function(format!("inflate {name}"), |b| {
            let mut i = Inflater::new();
            let mut out = Vec::new();
            b.iter(|| {
                out.clear();
                i.inflate(black_box(&z), true, &mut out, 1 << 20).unwrap();
            })
        });
    }
    g.finish();
}

fn handshake(c: &mut Criterion) {
    let head = b"GET /chat HTTP/1.1\r\nHost: 127.0.0.1:3000\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: http://127.0.0.1:3000\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64) Chrome/156.0\r\n\r\n";
    let cfg = DeflateConfig::default();
    c.bench_function("handshake: parse, validate, accept", |b| {
        b.iter(|| {
            let (req, _) = Request::parse(black_box(head)).unwrap().unwrap();
            let up = req.upgrade().unwrap();
            black_box(up.accept(None, Some(&cfg), &[]).unwrap().response.len())
        })
    });
}

criterion_group!(benches, decode, encode, masking, utf8, deflate, handshake);
criterion_main!(benches);
