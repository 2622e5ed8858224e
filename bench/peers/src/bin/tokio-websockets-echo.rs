//! tokio-websockets echo peer: the crate's `examples/echo_server.rs`
//! (`ServerBuilder::accept`, `send` per message, a current-thread runtime,
//! each connection `unconstrained`). Pings and the closing handshake are
//! answered by tokio-websockets. It does not look at the request path.
//!
//! No `feed`/`flush` batching as in the yawc and tungstenite peers: the
//! stream flushes its queued frames before it reads each frame, so
//! batching would write exactly as often as `send` does.
//!
//! Unlike the example (which sets `frame_size(usize::MAX)` and unlimited
//! limits), the defaults are kept: 4 MiB outgoing frames, 64 MiB messages.
//! tokio-websockets 0.13 has no permessage-deflate: `deflate` exits with
//! status 3.

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_websockets::{Error, ServerBuilder};
use walkie_bench_peers::{args, serve};

const NAME: &str = "tokio-websockets-echo";

async fn handle_client(stream: TcpStream) -> Result<(), Error> {
    let (_request, mut ws) = ServerBuilder::new().accept(stream).await?;
    while let Some(message) = ws.next().await {
        let message = message?;
        if message.is_text() || message.is_binary() {
            ws.send(message).await?;
        }
    }
    Ok(())
}

fn main() {
    serve(NAME, args(NAME, false), |stream| {
        // Per-connection errors are normal under load; not logged.
        tokio::task::unconstrained(async move {
            let _ = handle_client(stream).await;
        })
    })
}
