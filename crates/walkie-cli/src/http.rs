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
const WALKIE_JS: &str = include_str!("../../../web/walkie.js");
const WALKIE_DTS: &str = include_str!("../../../web/walkie.d.ts");

/// The demo pages, by name (`/demos/NAME`).
const DEMOS: &[(&str, &str)] = &[
    ("chat", include_str!("../../../web/demos/chat.html")),
    (
        "notifications",
        include_str!("../../../web/demos/notifications.html"),
    ),
    ("scores", include_str!("../../../web/demos/scores.html")),
    ("game", include_str!("../../../web/demos/game.html")),
    (
        "dashboard",
        include_str!("../../../web/demos/dashboard.html"),
    ),
];

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
            "/walkie.js",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                    WALKIE_JS,
                )
            }),
        )
        .route(
            "/walkie.d.ts",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                    WALKIE_DTS,
                )
            }),
        )
        .route(
            "/demos/{name}",
            get(
                |axum::extract::Path(name): axum::extract::Path<String>| async move {
                    let page = name.strip_suffix(".html").unwrap_or(&name);
                    match DEMOS.iter().find(|(n, _)| *n == page) {
                        Some((_, html)) => Html(*html).into_response(),
                        None => (StatusCode::NOT_FOUND, "no such demo\n").into_response(),
                    }
                },
            ),
        )
        .route("/demo/token", get(demo_token))
        .route(
            "/metrics",
            get(
                |axum::extract::State(state): axum::extract::State<Arc<AppState>>| async move {
                    (
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        state
                            .hub
                            .metrics()
                            .render_with_engine(state.hub.broker().reconnects()),
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

/// The query of `/demo/token`, as text: each parameter is checked on its
/// own, so that a bad `ttl` is reported as such.
#[derive(serde::Deserialize)]
struct TokenQuery {
    user: Option<String>,
    ttl: Option<String>,
}

/// The range of `ttl`, in seconds, and its default.
const TOKEN_TTL: std::ops::RangeInclusive<u64> = 2..=86_400;
const DEFAULT_TOKEN_TTL: u64 = 3600;

/// Why `/demo/token` refused a request (answered with 400).
#[derive(Debug, PartialEq, Eq)]
enum TokenRequestError {
    /// No `user`, or not 1 to 64 letters, digits, - or _.
    User,
    /// `ttl` is not whole seconds within [`TOKEN_TTL`].
    Ttl,
}

impl TokenRequestError {
    fn message(&self) -> String {
        match self {
            TokenRequestError::User => "give ?user= with 1 to 64 letters, digits, - or _\n".into(),
            TokenRequestError::Ttl => format!(
                "ttl: give whole seconds from {} to {}\n",
                TOKEN_TTL.start(),
                TOKEN_TTL.end()
            ),
        }
    }
}

/// The user and the token's lifetime in seconds.
fn token_request(q: &TokenQuery) -> Result<(&str, u64), TokenRequestError> {
    let user = q
        .user
        .as_deref()
        .filter(|u| {
            !u.is_empty()
                && u.len() <= 64
                && u.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        .ok_or(TokenRequestError::User)?;
    let ttl = match q.ttl.as_deref() {
        None => DEFAULT_TOKEN_TTL,
        Some(t) => t
            .parse()
            .ok()
            .filter(|t| TOKEN_TTL.contains(t))
            .ok_or(TokenRequestError::Ttl)?,
    };
    Ok((user, ttl))
}

/// `GET /demo/token?user=ID[&ttl=SECONDS]`: a token for any user, signed
/// with the secret of this run, valid for `ttl` seconds (2 to 86400;
/// default 3600). Only without a configuration file (development); 404
/// otherwise.
async fn demo_token(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
    query: Result<axum::extract::Query<TokenQuery>, axum::extract::rejection::QueryRejection>,
) -> axum::response::Response {
    let Some(secret) = &state.demo_secret else {
        return (
            StatusCode::NOT_FOUND,
            "demo tokens are off when walkie runs with --config\n",
        )
            .into_response();
    };
    let checked = match &query {
        Ok(axum::extract::Query(q)) => token_request(q),
        // Not a query string at all: say what to give.
        Err(_) => Err(TokenRequestError::User),
    };
    let (user, ttl) = match checked {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_REQUEST, e.message()).into_response(),
    };
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        + ttl;
    let claims = serde_json::json!({"sub": user, "exp": exp, "info": {"name": user}});
    match jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    ) {
        Ok(token) => (
            [(header::CONTENT_TYPE, "application/json")],
            format!("{}\n", serde_json::json!({ "token": token })),
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot sign: {e}\n"),
        )
            .into_response(),
    }
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
    let mut conn = std::pin::pin!(conn);
    let done = tokio::select! {
        r = conn.as_mut() => r,
        () = state.shutdown.cancelled() => {
            // A request in flight may have done its work already (a
            // publish committed): let it answer, within the shutdown
            // timeout, instead of cutting it off with no reply.
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(state.shutdown_timeout, conn).await {
                Ok(r) => r,
                Err(_) => {
                    debug!(%peer, "HTTP request still running at the shutdown timeout");
                    return;
                }
            }
        }
    };
    if let Err(e) = done {
        debug!(%peer, "HTTP connection: {e}");
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
