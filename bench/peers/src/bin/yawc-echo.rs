//! yawc echo peer: the crate's `examples/echo_server.rs` (hyper 1 upgrade,
//! each connection `unconstrained`) on a current-thread runtime, with the
//! reply batching of yawc's own comparison benchmark: replies to the
//! messages already received are queued with `feed` (up to 32) and written
//! with one `flush`. Pings and the closing handshake are answered by yawc.
//!
//! `deflate`: permessage-deflate is accepted when the client offers it, at
//! zlib level 1 (walkie's default level; yawc's own default is 6) with
//! context takeover and 15-bit windows, and every message is compressed
//! (`compression_threshold` 0, which is also yawc's default). Built with
//! yawc's `zlib` feature: zlib-rs instead of miniz_oxide.

use futures_util::{FutureExt, SinkExt};
use http_body_util::Empty;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use walkie_bench_peers::{BATCH, args, serve};
use yawc::{CompressionLevel, OpCode, Options, UpgradeFut, WebSocket};

const NAME: &str = "yawc-echo";

async fn handle_client(fut: UpgradeFut) -> yawc::Result<()> {
    let mut ws = fut.await?;
    loop {
        // An error here includes `ConnectionClosed`, returned once the
        // client's close has been answered.
        let mut frame = ws.next_frame().await?;
        for queued in 1.. {
            // yawc queues the pong or close reply itself and writes it at
            // the next read, which then ends the loop after a close.
            if matches!(frame.opcode(), OpCode::Text | OpCode::Binary) {
                ws.feed(frame).await?;
            }
            if queued == BATCH {
                break;
            }
            match ws.next_frame().now_or_never() {
                Some(next) => frame = next?,
                None => break,
            }
        }
        ws.flush().await?;
    }
}

fn options(deflate: bool) -> Options {
    // UTF-8 validation of text messages is off by default in yawc; it is
    // turned on because RFC 6455 requires it and every other peer does it.
    let options = Options::default().with_utf8();
    if deflate {
        // Level 1, as walkie compresses by default, so that the deflate
        // case compares like with like (yawc's default is 6).
        // With the `zlib` feature (zlib-rs, the faster backend; without it
        // yawc uses miniz_oxide), yawc answers a bare `client_max_window_bits`
        // offer with 9; 15 keeps zlib's usual window, as without the feature.
        options
            .with_compression_level(CompressionLevel::new(1))
            .with_compression_threshold(0)
            .with_client_max_window_bits(15)
    } else {
        options.without_compression()
    }
}

fn main() {
    let args = args(NAME, true);
    let deflate = args.deflate;
    serve(NAME, args, move |stream| async move {
        let service = service_fn(move |mut req: Request<Incoming>| async move {
            let (response, fut) = WebSocket::upgrade_with_options(&mut req, options(deflate))?;
            tokio::task::spawn(tokio::task::unconstrained(async move {
                // Per-connection errors are normal under load; not logged.
                let _ = handle_client(fut).await;
            }));
            Ok::<Response<Empty<Bytes>>, yawc::WebSocketError>(response)
        });
        let conn = http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        let _ = conn.await;
    })
}
