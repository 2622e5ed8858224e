//! Shared helpers: servers on 127.0.0.1:0 and a bound on every test.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use walkie::{Message, ServerConfig, WebSocket};

/// Fails the test instead of hanging.
pub async fn within<T>(secs: u64, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("test timed out")
}

/// Starts a server that runs `handler` on every accepted WebSocket.
pub async fn serve<F, Fut>(config: ServerConfig, handler: F) -> SocketAddr
where
    F: Fn(WebSocket<tokio::net::TcpStream>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handler = std::sync::Arc::new(handler);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (config, handler) = (config.clone(), handler.clone());
            tokio::spawn(async move {
                if let Ok(ws) = walkie::accept(tcp, &config).await {
                    handler(ws).await;
                }
            });
        }
    });
    addr
}

/// An echo server: every message back, unchanged.
pub async fn echo_server(config: ServerConfig) -> SocketAddr {
    serve(config, |mut ws| async move {
        while let Some(Ok(m)) = ws.recv().await {
            if ws.feed(m).await.is_err() {
                return;
            }
        }
    })
    .await
}

pub fn text(s: &str) -> Message {
    Message::text(s)
}
