//! The little of the protocol a load generator needs, written here rather
//! than taken from walkie-proto so that the tool measures every server with
//! code that none of them share.
//!
//! Frames to send are encoded once, masked once, and written as-is again and
//! again (the server cannot tell). Replies are parsed header-only: payloads
//! are skipped, never copied, unmasked or validated.

use std::io;

use base64::Engine as _;
use flate2::{Compress, Compression, FlushCompress};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The upgrade request; `deflate` offers permessage-deflate with
/// `client_no_context_takeover`, so that we may send the same compressed
/// bytes every time; `protocol` is a subprotocol to offer.
pub fn upgrade_request(host: &str, path: &str, deflate: bool, protocol: Option<&str>) -> Vec<u8> {
    let key = base64::engine::general_purpose::STANDARD.encode(rand_bytes());
    let ext = if deflate {
        "Sec-WebSocket-Extensions: permessage-deflate; client_no_context_takeover; client_max_window_bits\r\n"
    } else {
        ""
    };
    let protocol = protocol
        .map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n"))
        .unwrap_or_default();
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{ext}{protocol}\r\n"
    )
    .into_bytes()
}

fn rand_bytes() -> [u8; 16] {
    // Not security sensitive: any 16 bytes make a valid key.
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut out = [0u8; 16];
    out.copy_from_slice(&t.to_le_bytes());
    out
}

/// Performs the handshake; returns whether deflate was accepted and any
/// bytes that followed the response head.
pub async fn handshake(
    stream: &mut TcpStream,
    host: &str,
    path: &str,
    deflate: bool,
    protocol: Option<&str>,
) -> io::Result<(bool, Vec<u8>)> {
    stream
        .write_all(&upgrade_request(host, path, deflate, protocol))
        .await?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed during handshake",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            if !head.starts_with("http/1.1 101") {
                let line = head.lines().next().unwrap_or_default().to_owned();
                return Err(io::Error::other(format!("upgrade refused: {line}")));
            }
            let accepted = head.contains("permessage-deflate");
            return Ok((accepted, buf[end + 4..].to_vec()));
        }
        if buf.len() > 16 * 1024 {
            return Err(io::Error::other("response head too large"));
        }
    }
}

/// One masked client frame, ready to write as many times as needed.
pub fn masked_frame(opcode: u8, rsv1: bool, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 14);
    f.push(0x80 | if rsv1 { 0x40 } else { 0 } | opcode);
    match payload.len() {
        n @ 0..=125 => f.push(0x80 | n as u8),
        n @ 126..=0xffff => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&key);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    f
}

/// Bytes at the start of each of [`varied_payloads`]' payloads that differ.
const VARIED: usize = 8;

/// `count` distinct variants of `payload`: in each, the first 8 bytes (all
/// of them, if it is shorter) are replaced by pseudo-random ASCII letters
/// and digits (valid UTF-8, for text frames), the same sequence every run.
/// With permessage-deflate, a server that keeps its compression context
/// would send a message identical to the one before as a single
/// back-reference: these make every reply carry a few new literals, as
/// real messages (an id, a counter, a timestamp) do.
pub fn varied_payloads(payload: &[u8], count: usize) -> Vec<Vec<u8>> {
    const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    // splitmix64: any fixed sequence will do.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    (0..count)
        .map(|_| {
            let mut p = payload.to_vec();
            for b in p.iter_mut().take(VARIED) {
                *b = ALNUM[(next() % ALNUM.len() as u64) as usize];
            }
            p
        })
        .collect()
}

/// Each payload compressed on its own (no context), as permessage-deflate
/// sends it: sync flush, trailing 00 00 ff ff removed. One compressor,
/// reset between them.
pub fn deflate_each(payloads: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut c = Compress::new(Compression::default(), false);
    payloads
        .iter()
        .map(|p| {
            c.reset();
            deflate_with(&mut c, p)
        })
        .collect()
}

fn deflate_with(c: &mut Compress, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 64);
    loop {
        let before = c.total_in() as usize;
        if c.compress_vec(&payload[before..], &mut out, FlushCompress::Sync)
            .is_err()
        {
            break;
        }
        if c.total_in() as usize == payload.len() && out.len() < out.capacity() {
            break;
        }
        out.reserve(64);
    }
    if out.ends_with(&[0, 0, 0xff, 0xff]) {
        out.truncate(out.len() - 4);
    }
    out
}

/// Counts complete frames in a byte stream without looking at payloads.
#[derive(Debug, Default)]
pub struct FrameCounter {
    /// Payload bytes of the current frame still to skip.
    skip: u64,
    /// A partial header carried over from the previous read.
    head: Vec<u8>,
}

/// What a chunk of received bytes contained.
#[derive(Debug, Default, Clone, Copy)]
pub struct Seen {
    /// Complete data frames (text, binary or continuation with FIN).
    pub messages: u64,
    /// A close frame began.
    pub close: bool,
}

impl FrameCounter {
    /// Feeds received bytes.
    pub fn feed(&mut self, mut data: &[u8]) -> Seen {
        let mut seen = Seen::default();
        loop {
            if self.skip > 0 {
                let n = (data.len() as u64).min(self.skip);
                self.skip -= n;
                data = &data[n as usize..];
            }
            if data.is_empty() {
                return seen;
            }
            let header = if self.head.is_empty() {
                match parse_header(data) {
                    Some(h) => {
                        data = &data[h.3..];
                        h
                    }
                    None => {
                        self.head.extend_from_slice(data);
                        return seen;
                    }
                }
            } else {
                // Complete the header carried over from the last read.
                let old = self.head.len();
                let take = (14 - old).min(data.len());
                self.head.extend_from_slice(&data[..take]);
                match parse_header(&self.head) {
                    Some(h) => {
                        data = &data[h.3 - old..];
                        self.head.clear();
                        h
                    }
                    None => return seen,
                }
            };
            let (fin, opcode, len, _) = header;
            if opcode == 8 {
                seen.close = true;
            } else if fin && opcode < 8 {
                seen.messages += 1;
            }
            self.skip = len;
        }
    }
}

/// What [`TagReader`] found in received bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    /// A complete data message of at least 16 bytes: the sequence number and
    /// send time that the fan-out publisher wrote in its first 16 bytes.
    Tagged { seq: u64, sent_ns: u64 },
    /// A complete data message shorter than 16 bytes (not ours).
    Untagged,
    /// A ping, with its payload (to be answered with a pong).
    Ping(&'a [u8]),
    /// A close frame, with its status code if it had one.
    Close(Option<u16>),
}

/// Like [`FrameCounter`], but keeps the first 16 payload bytes of each data
/// message (and the payload of control frames): what a fan-out subscriber
/// needs, for little more than header-only parsing. Assumes unmasked
/// server frames that are not fragmented (the fan-out messages are small).
#[derive(Debug)]
pub struct TagReader {
    /// A partial header carried over from the previous read.
    head: [u8; 14],
    head_len: usize,
    /// Inside a frame's payload.
    in_frame: bool,
    opcode: u8,
    fin: bool,
    /// Payload bytes of the current frame still to come.
    remaining: u64,
    /// Payload bytes to keep, and those kept so far.
    want: usize,
    got: usize,
    kept: [u8; 125],
    /// Walkie protocol pushes: the tag is in the JSON (see [`json_tag`]).
    json: bool,
}

impl Default for TagReader {
    fn default() -> Self {
        Self {
            json: false,
            head: [0; 14],
            head_len: 0,
            in_frame: false,
            opcode: 0,
            fin: false,
            remaining: 0,
            want: 0,
            got: 0,
            kept: [0; 125],
        }
    }
}

impl TagReader {
    /// A reader of Walkie protocol pushes (`{"pub": {..., "data": "TAG..."}}`):
    /// it keeps the first 125 bytes of every text message and finds there
    /// the tag that [`json_tag`] wrote.
    pub fn json() -> Self {
        TagReader {
            json: true,
            ..TagReader::default()
        }
    }

    /// Feeds received bytes; calls `on` for every frame completed by them.
    pub fn feed(&mut self, mut data: &[u8], mut on: impl FnMut(Event<'_>)) {
        loop {
            if !self.in_frame {
                if data.is_empty() {
                    return;
                }
                let (fin, opcode, len) = if self.head_len == 0 {
                    match parse_header(data) {
                        Some((fin, opcode, len, hlen)) => {
                            data = &data[hlen..];
                            (fin, opcode, len)
                        }
                        None => {
                            // Shorter than the longest header: it fits.
                            self.head[..data.len()].copy_from_slice(data);
                            self.head_len = data.len();
                            return;
                        }
                    }
                } else {
                    let old = self.head_len;
                    let take = (14 - old).min(data.len());
                    self.head[old..old + take].copy_from_slice(&data[..take]);
                    match parse_header(&self.head[..old + take]) {
                        Some((fin, opcode, len, hlen)) => {
                            data = &data[hlen - old..];
                            self.head_len = 0;
                            (fin, opcode, len)
                        }
                        None => {
                            self.head_len = old + take;
                            return;
                        }
                    }
                };
                self.in_frame = true;
                self.fin = fin;
                self.opcode = opcode;
                self.remaining = len;
                self.got = 0;
                self.want = match opcode {
                    0..=2 if fin && self.json => len.min(125) as usize,
                    0..=2 if fin && len >= 16 => 16,
                    8..=10 => len.min(125) as usize,
                    _ => 0,
                };
            }
            if self.got < self.want {
                let take = (self.want - self.got).min(data.len());
                self.kept[self.got..self.got + take].copy_from_slice(&data[..take]);
                self.got += take;
                self.remaining -= take as u64;
                data = &data[take..];
            }
            let skip = (data.len() as u64).min(self.remaining);
            self.remaining -= skip;
            data = &data[skip as usize..];
            if self.remaining > 0 {
                return;
            }
            self.in_frame = false;
            match self.opcode {
                0..=2 if self.fin && self.json => on(match find_json_tag(&self.kept[..self.got]) {
                    Some((seq, sent_ns)) => Event::Tagged { seq, sent_ns },
                    None => Event::Untagged,
                }),
                0..=2 if self.fin => on(if self.want == 16 {
                    let k = &self.kept;
                    let word = |i: usize| {
                        let mut w = [0u8; 8];
                        w.copy_from_slice(&k[i..i + 8]);
                        u64::from_le_bytes(w)
                    };
                    Event::Tagged {
                        seq: word(0),
                        sent_ns: word(8),
                    }
                } else {
                    Event::Untagged
                }),
                8 => on(Event::Close(
                    (self.got >= 2).then(|| u16::from_be_bytes([self.kept[0], self.kept[1]])),
                )),
                9 => on(Event::Ping(&self.kept[..self.got])),
                _ => {}
            }
        }
    }
}

/// Writes `seq` and `sent_ns` into the first 16 payload bytes of `frame`,
/// a frame built by [`masked_frame`] with `key`, whose payload starts at
/// `at`: the tag [`TagReader`] reads back.
pub fn write_tag(frame: &mut [u8], at: usize, key: [u8; 4], seq: u64, sent_ns: u64) {
    let mut tag = [0u8; 16];
    tag[..8].copy_from_slice(&seq.to_le_bytes());
    tag[8..].copy_from_slice(&sent_ns.to_le_bytes());
    for (i, (dst, b)) in frame[at..at + 16].iter_mut().zip(tag).enumerate() {
        *dst = b ^ key[i % 4];
    }
}

/// The tag as the start of a JSON string's contents: `seq` and `sent_ns`
/// as 16 hexadecimal digits each.
pub fn json_tag(seq: u64, sent_ns: u64) -> String {
    format!("{seq:016x}{sent_ns:016x}")
}

/// The tag of [`json_tag`] in the first string value of a `"data"` field.
fn find_json_tag(payload: &[u8]) -> Option<(u64, u64)> {
    const KEY: &[u8] = b"\"data\":\"";
    let at = payload.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let hex = std::str::from_utf8(payload.get(at..at + 32)?).ok()?;
    let seq = u64::from_str_radix(&hex[..16], 16).ok()?;
    let sent_ns = u64::from_str_radix(&hex[16..], 16).ok()?;
    Some((seq, sent_ns))
}

/// (fin, opcode, payload length, header length), or `None` if incomplete.
fn parse_header(b: &[u8]) -> Option<(bool, u8, u64, usize)> {
    if b.len() < 2 {
        return None;
    }
    let fin = b[0] & 0x80 != 0;
    let opcode = b[0] & 0x0f;
    let masked = b[1] & 0x80 != 0;
    let (len, mut hlen) = match b[1] & 0x7f {
        126 => {
            if b.len() < 4 {
                return None;
            }
            (u64::from(u16::from_be_bytes([b[2], b[3]])), 4)
        }
        127 => {
            if b.len() < 10 {
                return None;
            }
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[2..10]);
            (u64::from_be_bytes(x), 10)
        }
        n => (u64::from(n), 2),
    };
    if masked {
        hlen += 4;
    }
    if b.len() < hlen {
        return None;
    }
    Some((fin, opcode, len, hlen))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_frame(payload: &[u8]) -> Vec<u8> {
        let mut f = masked_frame(2, false, payload, [0; 4]);
        // Unmask: clear the mask bit and drop the key.
        f[1] &= 0x7f;
        let hl = f.len() - payload.len() - 4;
        f.drain(hl..hl + 4);
        f
    }

    #[test]
    fn counts_frames_across_any_split() {
        let mut stream = Vec::new();
        for len in [0usize, 5, 125, 126, 300, 70_000] {
            stream.extend(server_frame(&vec![7u8; len]));
        }
        for split in 1..40 {
            let mut c = FrameCounter::default();
            let total: u64 = stream.chunks(split).map(|ch| c.feed(ch).messages).sum();
            assert_eq!(total, 6, "split {split}");
        }
    }
    fn unmask(frame: &[u8], key: [u8; 4]) -> Vec<u8> {
        // A client frame as the server would relay it: unmasked, no key.
        let mut f = frame.to_vec();
        f[1] &= 0x7f;
        let hl = match f[1] {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        let payload: Vec<u8> = f[hl + 4..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ key[i % 4])
            .collect();
        f.truncate(hl);
        f.extend(payload);
        f
    }

    #[test]
    fn reads_tags_and_control_frames_across_any_split() {
        let key = [0x12, 0x34, 0x56, 0x78];
        let mut stream = Vec::new();
        let mut expect = Vec::new();
        for (i, len) in [64usize, 16, 300, 70_000, 64].into_iter().enumerate() {
            let mut f = masked_frame(2, false, &vec![9u8; len], key);
            let at = f.len() - len;
            write_tag(&mut f, at, key, i as u64 + 7, 1_000_000 + i as u64);
            stream.extend(unmask(&f, key));
            expect.push(format!("tag {} {}", i + 7, 1_000_000 + i));
            if i == 1 {
                stream.extend(server_frame(b"short"));
                expect.push("untagged".into());
                let mut ping = server_frame(b"hi");
                ping[0] = 0x89;
                stream.extend(ping);
                expect.push("ping hi".into());
            }
        }
        let mut close = server_frame(&[0x03, 0xf5, b'x']);
        close[0] = 0x88;
        stream.extend(close);
        expect.push("close Some(1013)".into());
        for split in 1..40 {
            let mut r = TagReader::default();
            let mut seen = Vec::new();
            for chunk in stream.chunks(split) {
                r.feed(chunk, |e| {
                    seen.push(match e {
                        Event::Tagged { seq, sent_ns } => format!("tag {seq} {sent_ns}"),
                        Event::Untagged => "untagged".into(),
                        Event::Ping(p) => format!("ping {}", String::from_utf8_lossy(p)),
                        Event::Close(c) => format!("close {c:?}"),
                    });
                });
            }
            assert_eq!(seen, expect, "split {split}");
        }
    }

    #[test]
    fn varied_payloads_differ_and_compress_alone() {
        let payload: Vec<u8> = (0..32).map(|i| b'a' + (i % 26) as u8).collect();
        let payloads = varied_payloads(&payload, 2048);
        let distinct: std::collections::HashSet<&Vec<u8>> = payloads.iter().collect();
        assert_eq!(distinct.len(), 2048);
        assert_eq!(
            varied_payloads(&payload, 3),
            payloads[..3],
            "same every run"
        );
        for p in &payloads {
            assert!(std::str::from_utf8(p).is_ok());
            assert_eq!(p[8..], payload[8..]);
        }
        assert_eq!(varied_payloads(b"abc", 1)[0].len(), 3);
        let compressed = deflate_each(&payloads[..20]);
        for (p, c) in payloads.iter().zip(&compressed) {
            assert_eq!(*c, deflate_each(std::slice::from_ref(p))[0], "no context");
            let mut d = flate2::Decompress::new(false);
            let mut input = c.clone();
            input.extend_from_slice(&[0, 0, 0xff, 0xff]);
            let mut out = Vec::with_capacity(64);
            d.decompress_vec(&input, &mut out, flate2::FlushDecompress::Sync)
                .unwrap();
            assert_eq!(out, *p);
        }
    }

    #[test]
    fn a_json_reader_finds_the_tag_in_walkie_protocol_pushes() {
        let text = |json: String| {
            let mut f = server_frame(json.as_bytes());
            f[0] = 0x81;
            f
        };
        let mut stream = Vec::new();
        let mut expect = Vec::new();
        stream.extend(text(r#"{"id":2,"result":{"epoch":"e","offset":0}}"#.into()));
        expect.push("untagged".to_owned());
        for (seq, sent) in [(0u64, 5u64), (41, 1_000_000_007), (u64::MAX, 9)] {
            let data = format!("{}{}", json_tag(seq, sent), "a".repeat(32));
            stream.extend(text(format!(
                r#"{{"pub":{{"channel":"fanout:bench","offset":{seq},"data":"{data}","info":{{"client":"c-1","user":""}}}}}}"#
            )));
            expect.push(format!("tag {seq} {sent}"));
        }
        for split in 1..60 {
            let mut r = TagReader::json();
            let mut seen = Vec::new();
            for chunk in stream.chunks(split) {
                r.feed(chunk, |e| {
                    seen.push(match e {
                        Event::Tagged { seq, sent_ns } => format!("tag {seq} {sent_ns}"),
                        other => format!("{other:?}").to_lowercase(),
                    });
                });
            }
            assert_eq!(seen, expect, "split {split}");
        }
    }
}
