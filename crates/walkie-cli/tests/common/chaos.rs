//! What the chaos tests share (`chaos.rs`, one node restarted;
//! `chaos_multinode.rs`, nodes on an engine, one killed): the channels and
//! counts, a backend that publishes numbered messages until they are
//! accepted, and a client session that recovers and records what it got.

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use walkie::{ClientConfig, CloseCode, Message};

pub const CHANNELS: [&str; 3] = ["chaos:a", "chaos:b", "chaos:c"];
pub const PER_CHANNEL: u64 = 400;
pub const CLIENTS: usize = 6;
pub const KEY: &str = "chaos-key";

/// A tiny deterministic generator, so that a failure can be replayed.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Publishes through the HTTP API of the first node that accepts it,
/// retrying with the same idempotency key (kept by the engine: shared by
/// every node) while nodes fail or restart.
pub async fn publish(ports: &[u16], channel: &str, n: u64) {
    let body = json!({"channel": channel, "data": n, "idempotency_key": format!("{channel}-{n}")})
        .to_string();
    let request = format!(
        "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: apikey {KEY}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    for attempt_no in 0.. {
        let port = ports[(n as usize + attempt_no) % ports.len()];
        let attempt = tokio::time::timeout(Duration::from_secs(5), async {
            let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()?;
            tokio::io::AsyncWriteExt::write_all(&mut tcp, request.as_bytes())
                .await
                .ok()?;
            let raw = super::read_all(&mut tcp, Duration::from_secs(5)).await;
            super::HttpResponse::parse(&raw)
        })
        .await;
        if let Ok(Some(r)) = attempt {
            if r.status == 200 {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "could not publish {channel} {n} for 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Where a client stands in one channel.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub offset: u64,
    pub epoch: String,
    /// The message numbers received, in order.
    pub data: Vec<u64>,
    /// (offset, data, session) of each message, for the failure message.
    pub log: Vec<(u64, u64, u64)>,
    pub sessions: u64,
    /// The most missed messages one recovery brought (its reply's
    /// `history`).
    pub largest_recovery: u64,
}

/// Asserts that client `c` got every message of every channel once, in
/// order; names what went wrong if not.
pub fn assert_exact(c: usize, seen: &HashMap<&'static str, Seen>) {
    for ch in CHANNELS {
        let got = &seen[ch].data;
        if got.len() as u64 != PER_CHANNEL {
            let mut dups = Vec::new();
            for w in seen[ch].log.windows(2) {
                if w[1].1 <= w[0].1 {
                    dups.push(w.to_vec());
                }
            }
            panic!(
                "client {c}, {ch}: {} messages; out of order: {dups:?}",
                got.len()
            );
        }
        assert!(
            got.iter().copied().eq(1..=PER_CHANNEL),
            "client {c}, {ch}: not 1..={PER_CHANNEL} in order: {got:?}"
        );
    }
}

/// One client of a run: sessions on nodes of `ports` picked at random (a
/// dead node's port refuses), each dropped after a random number of
/// messages, staying away up to `away_ms` between them, until it has every
/// message and `done` is set. Returns what it got, per channel.
pub async fn client(
    c: usize,
    ports: Vec<u16>,
    done: Arc<AtomicBool>,
    away_ms: u64,
) -> HashMap<&'static str, Seen> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (c as u64 + 1));
    let mut seen: HashMap<&'static str, Seen> =
        CHANNELS.iter().map(|c| (*c, Seen::default())).collect();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let complete = seen.values().all(|s| s.data.len() as u64 >= PER_CHANNEL);
        if complete && done.load(Ordering::Relaxed) {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "client {c} did not finish: {:?}",
            seen.values().map(|s| s.data.len()).collect::<Vec<_>>()
        );
        let drop_after = 1 + rng.next(150);
        let port = ports[rng.next(ports.len() as u64) as usize];
        if !session(port, &mut seen, drop_after).await {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if away_ms > 0 {
            tokio::time::sleep(Duration::from_millis(rng.next(away_ms))).await;
        }
    }
}

/// One client session: connects, subscribes (recovering where it can),
/// reads until told to drop. Returns false if it could not connect.
pub async fn session(port: u16, seen: &mut HashMap<&'static str, Seen>, drop_after: u64) -> bool {
    let mut config = ClientConfig::default();
    config.protocols = vec!["walkie.v1".into()];
    let Ok((mut ws, _)) = walkie::connect_with(&format!("ws://127.0.0.1:{port}/ws"), &config).await
    else {
        return false;
    };
    let mut id = 0u64;
    let mut send = |ws_text: Value| {
        id += 1;
        let mut v = ws_text;
        v["id"] = json!(id);
        v.to_string()
    };
    if ws.send(send(json!({"connect": {}}))).await.is_err() {
        return false;
    }
    for ch in CHANNELS {
        seen.get_mut(ch).unwrap().sessions += 1;
        let s = &seen[ch];
        let params = if s.epoch.is_empty() {
            json!({"channel": ch})
        } else {
            json!({"channel": ch, "recover": true, "offset": s.offset, "epoch": s.epoch})
        };
        if ws.send(send(json!({"subscribe": params}))).await.is_err() {
            return false;
        }
    }
    let mut received = 0u64;
    while received < drop_after {
        let Ok(Some(Ok(Message::Text(text)))) =
            tokio::time::timeout(Duration::from_secs(2), ws.recv()).await
        else {
            // Quiet (the publisher is done or restarting) or closed: end
            // this session; the caller reconnects.
            return true;
        };
        let v: Value = serde_json::from_str(&text).unwrap();
        if let Some(err) = v.get("error") {
            panic!("command failed: {err}");
        }
        if let Some(result) = v.get("result") {
            // A subscribe reply: learn the epoch (and, without recovery, the start).
            if result.get("history").is_some() {
                let idx = v["id"].as_u64().unwrap() as usize - 2;
                let s = seen.get_mut(CHANNELS[idx]).unwrap();
                if s.epoch.is_empty() {
                    s.epoch = result["epoch"].as_str().unwrap().to_owned();
                    s.offset = result["offset"].as_u64().unwrap();
                } else {
                    assert_eq!(
                        result["recovered"], true,
                        "recovery failed in {}: {v}",
                        CHANNELS[idx]
                    );
                    let missed = result["history"].as_u64().unwrap();
                    s.largest_recovery = s.largest_recovery.max(missed);
                }
            }
            continue;
        }
        if let Some(p) = v.get("pub") {
            let ch = CHANNELS
                .iter()
                .find(|c| **c == p["channel"].as_str().unwrap())
                .unwrap();
            let s = seen.get_mut(ch).unwrap();
            s.offset = p["offset"].as_u64().unwrap();
            s.data.push(p["data"].as_u64().unwrap());
            let session_no = s.sessions;
            s.log.push((s.offset, *s.data.last().unwrap(), session_no));
            received += 1;
        }
    }
    // Dropped abruptly half the time, closed politely otherwise.
    if drop_after % 2 == 0 {
        let _ = ws.close(CloseCode::NORMAL, "").await;
    }
    true
}
