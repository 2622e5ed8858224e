//! tokio-tungstenite echo peer. The crate's `examples/echo-server.rs`
//! forwards the read half into the write half (`StreamExt::forward`, which
//! queues while messages are ready and flushes when the stream would
//! block); this does the same on the unsplit stream (no `BiLock`), with at
//! most 32 replies per flush as in yawc's comparison benchmark, on a
//! current-thread runtime, each connection in `tokio::task::unconstrained`
//! as in the other Rust peers. Pings and the closing handshake are answered
//! by tungstenite. No handshake callback, so any path is accepted.
//!
//! tokio-tungstenite 0.30 / tungstenite 0.30 have no permessage-deflate
//! (no feature for it): `deflate` exits with status 3.

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Result;
use walkie_bench_peers::{BATCH, args, serve};

const NAME: &str = "tungstenite-echo";

async fn handle_client(stream: TcpStream) -> Result<()> {
    // Default WebSocketConfig (128 KiB read and write buffers, 64 MiB
    // message limit).
    let mut ws = tokio_tungstenite::accept_async(stream).await?;
    while let Some(message) = ws.next().await {
        let mut message = message?;
        for queued in 1.. {
            if message.is_text() || message.is_binary() {
                ws.feed(message).await?;
            }
            if queued == BATCH {
                break;
            }
            match ws.next().now_or_never() {
                Some(Some(next)) => message = next?,
                Some(None) => {
                    ws.flush().await?;
                    return Ok(());
                }
                None => break,
            }
        }
        // Also writes the automatic pong or close reply, if one is queued.
        ws.flush().await?;
    }
    Ok(())
}

fn main() {
    serve(NAME, args(NAME, false), |stream| {
        // Opted out of tokio's cooperative budget, as the other Rust peers'
        // connections are (their crates' examples do it).
        tokio::task::unconstrained(async move {
            // Per-connection errors are normal under load; not logged.
            let _ = handle_client(stream).await;
        })
    })
}
