//! The "no protocol work" baseline: answers the HTTP upgrade (101 with a
//! valid `Sec-WebSocket-Accept`, any path), then sends every byte it
//! receives back to the sender unchanged, without parsing frames. The
//! client's masked frames come back masked (the suite's load generator
//! accepts that; a conforming WebSocket client would not). A close frame
//! is reflected like any other bytes; the connection ends when the client
//! closes the TCP stream.
//!
//! Reads go into one 64 KiB buffer shared by all connections (the runtime
//! has one thread), so an idle connection holds no buffer; bytes the socket
//! would not take at once wait in a per-connection queue, and the peer stops
//! reading from that client until they are written.
//!
//! Tokio, current-thread runtime. No compression: `deflate` exits with
//! status 3.

use std::cell::RefCell;
use std::io::{self, ErrorKind};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use walkie_bench_peers::{args, serve};

const NAME: &str = "reflector";
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Longest request head accepted.
const MAX_HEAD: usize = 16 * 1024;

thread_local! {
    static BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; 64 * 1024].into_boxed_slice());
}

/// Reads the request head; returns it and any bytes that followed it.
async fn read_head(stream: &mut TcpStream) -> io::Result<(Vec<u8>, Vec<u8>)> {
    let mut head = Vec::with_capacity(1024);
    loop {
        let searched_from = head.len().saturating_sub(3);
        head.reserve(1024);
        if stream.read_buf(&mut head).await? == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        if let Some(i) = head[searched_from..]
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
        {
            let end = searched_from + i + 4;
            let rest = head.split_off(end);
            return Ok((head, rest));
        }
        if head.len() > MAX_HEAD {
            return Err(io::Error::new(
                ErrorKind::InvalidData,
                "request head too long",
            ));
        }
    }
}

/// The `Sec-WebSocket-Key` of a GET upgrade request, if it is one.
fn websocket_key(head: &[u8]) -> Option<&[u8]> {
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let request_line = lines.next()?;
    if !request_line.starts_with(b"GET ") {
        return None;
    }
    let mut key = None;
    let mut upgrade = false;
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"sec-websocket-key") {
            key = Some(value);
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            upgrade = value.eq_ignore_ascii_case(b"websocket");
        }
    }
    key.filter(|k| upgrade && !k.is_empty())
}

fn accept_value(key: &[u8]) -> String {
    let mut sha1 = Sha1::new();
    sha1.update(key);
    sha1.update(GUID.as_bytes());
    BASE64.encode(sha1.finalize())
}

/// Writes `data` to the socket; returns what it would not take now.
fn write_now(stream: &TcpStream, mut data: &[u8]) -> io::Result<Vec<u8>> {
    while !data.is_empty() {
        match stream.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(data.to_vec())
}

async fn reflect(mut stream: TcpStream) -> io::Result<()> {
    let (head, rest) = read_head(&mut stream).await?;
    let Some(key) = websocket_key(&head) else {
        stream
            .write_all(
                b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            )
            .await?;
        return Ok(());
    };
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {}\r\n\r\n",
        accept_value(key)
    );
    stream.write_all(response.as_bytes()).await?;
    drop(head);

    let mut pending = rest;
    loop {
        // Whatever could not be written waits here; nothing more is read
        // until it is gone.
        while !pending.is_empty() {
            stream.writable().await?;
            pending = write_now(&stream, &pending)?;
        }
        stream.readable().await?;
        let read = BUF.with_borrow_mut(|buf| match stream.try_read(buf) {
            Ok(0) => Ok(None),
            Ok(n) => write_now(&stream, &buf[..n]).map(Some),
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(Some(Vec::new())),
            Err(e) => Err(e),
        })?;
        match read {
            None => return Ok(()), // the client closed its side
            Some(left) => pending = left,
        }
    }
}

fn main() {
    serve(NAME, args(NAME, false), |stream| {
        // Per-connection errors are normal under load; not logged.
        tokio::task::unconstrained(async move {
            let _ = reflect(stream).await;
        })
    })
}
