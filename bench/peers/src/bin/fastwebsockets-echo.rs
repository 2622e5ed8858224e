//! fastwebsockets echo peer: the crate's own `examples/echo_server.rs`
//! (hyper 1 upgrade, `FragmentCollector`, a current-thread runtime, each
//! connection `unconstrained`), on any path. fastwebsockets has no
//! permessage-deflate: `deflate` exits with status 3.

use fastwebsockets::{FragmentCollector, OpCode, WebSocketError, upgrade};
use http_body_util::Empty;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use walkie_bench_peers::{args, serve};

const NAME: &str = "fastwebsockets-echo";

async fn handle_client(fut: upgrade::UpgradeFut) -> Result<(), WebSocketError> {
    // Auto-pong and auto-close (replying to the client's close) are on by
    // default; the collector reassembles fragmented messages.
    let mut ws = FragmentCollector::new(fut.await?);
    loop {
        let frame = ws.read_frame().await?;
        match frame.opcode {
            OpCode::Close => break,
            OpCode::Text | OpCode::Binary => ws.write_frame(frame).await?,
            _ => {}
        }
    }
    Ok(())
}

async fn server_upgrade(
    mut req: Request<Incoming>,
) -> Result<Response<Empty<Bytes>>, WebSocketError> {
    let (response, fut) = upgrade::upgrade(&mut req)?;
    tokio::task::spawn(tokio::task::unconstrained(async move {
        // Per-connection errors (a client that drops the socket) are normal
        // under load; nothing is logged.
        let _ = handle_client(fut).await;
    }));
    Ok(response)
}

fn main() {
    serve(NAME, args(NAME, false), |stream| async move {
        let conn = http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service_fn(server_upgrade))
            .with_upgrades();
        let _ = conn.await;
    })
}
