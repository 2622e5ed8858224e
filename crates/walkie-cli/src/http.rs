//! Plain HTTP routes, served by hyper through axum.
//!
//! The request head was already read by [`walkie::Incoming`]; the bytes read
//! so far are replayed to hyper in front of the stream. Keep-alive is off so
//! that every request, a WebSocket upgrade included, starts on a fresh
//! connection and goes through our own handshake.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use bytes::{Buf, BytesMut};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::debug;
use walkie::Incoming;

use crate::serve::AppState;

const CHAT_PAGE: &str = include_str!("../../../web/index.html");

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(|| async { Html(CHAT_PAGE) }))
        .route(
            "/health",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "application/json")],
                    "{\"status\":\"ok\"}\n",
                )
            }),
        )
        .route(
            "/metrics",
            get(
                |axum::extract::State(state): axum::extract::State<Arc<AppState>>| async move {
                    (
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        state.hub.metrics().render(),
                    )
                },
            ),
        )
        // Browsers ask for it on every page; no icon is better than a 404.
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .merge(crate::api::routes())
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n").into_response() })
        .with_state(state)
}

/// Serves one HTTP request on a connection whose head was already read.
pub async fn serve<S>(incoming: Incoming<S>, peer: SocketAddr, state: Arc<AppState>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (stream, read) = incoming.into_parts();
    let io = TokioIo::new(Prefixed { read, stream });
    let service = TowerToHyperService::new(router(state.clone()));
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .serve_connection(io, service);
    tokio::select! {
        r = conn => if let Err(e) = r {
            debug!(%peer, "HTTP connection: {e}");
        },
        () = state.shutdown.cancelled() => {}
    }
}

/// A stream that yields `read` before reading from `stream`.
struct Prefixed<S> {
    read: BytesMut,
    stream: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.read.has_remaining() {
            let n = this.read.len().min(buf.remaining());
            buf.put_slice(&this.read[..n]);
            this.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
