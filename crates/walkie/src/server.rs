//! Accepting connections: read the request, let the application decide,
//! answer with 101 or an HTTP error.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use walkie_proto::handshake::{HandshakeError, MAX_HEAD_SIZE, Request, RequestParser, Upgrade};
use walkie_proto::{Connection, Role};

use crate::config::ServerConfig;
use crate::driver::now;
use crate::error::{Error, Result};
use crate::websocket::WebSocket;

/// A connection whose HTTP request head has been read, waiting for the
/// application to route it: upgrade it to a WebSocket, reject it, or hand
/// it (with the bytes read so far) to an HTTP server.
#[derive(Debug)]
pub struct Incoming<S> {
    stream: S,
    request: Request,
    /// Everything read so far: the head, then possibly the first frames.
    buf: BytesMut,
    head_len: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Incoming<S> {
    /// Reads a request head within `timeout`.
    ///
    /// A malformed or oversized head is answered with 400 or 431 and a
    /// slow one with 408, before the error is returned; a client that goes
    /// away gives an I/O error.
    pub async fn read(mut stream: S, timeout: Duration) -> Result<Incoming<S>> {
        let mut buf = BytesMut::with_capacity(1024);
        let deadline = crate::driver::deadline_after(timeout);
        // Parses the head once it is complete, not after every read.
        let mut parser = RequestParser::new();
        loop {
            match parser.parse(&buf) {
                Ok(Some((request, head_len))) => {
                    return Ok(Incoming {
                        stream,
                        request,
                        buf,
                        head_len,
                    });
                }
                Ok(None) => {}
                Err(e) => {
                    respond_and_close(&mut stream, &e.response()).await;
                    return Err(e.into());
                }
            }
            buf.reserve(
                1024.min((MAX_HEAD_SIZE + 1).saturating_sub(buf.len()))
                    .max(1),
            );
            match tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await {
                Ok(Ok(0)) => {
                    return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => {
                    let rejection = HandshakeError::Rejected {
                        status: 408,
                        message: "request head not received in time".into(),
                    };
                    respond_and_close(&mut stream, &rejection.response()).await;
                    return Err(Error::HandshakeTimeout);
                }
            }
        }
    }

    /// The request head.
    pub fn request(&self) -> &Request {
        &self.request
    }

    /// Checks that the request is a valid WebSocket upgrade, so the
    /// application can see the offered subprotocols before accepting.
    pub fn upgrade(&self) -> Result<Upgrade, HandshakeError> {
        self.request.upgrade()
    }

    /// Accepts the upgrade with `protocol` (if the client offered it) and the
    /// compression `config` allows. An invalid upgrade request is answered
    /// with the HTTP error that says what was wrong (400, or 426 for a wrong
    /// version), and that error is returned.
    pub async fn accept(
        mut self,
        config: &ServerConfig,
        protocol: Option<&str>,
    ) -> Result<WebSocket<S>> {
        let upgrade = match self.request.upgrade() {
            Ok(u) => u,
            Err(e) => {
                respond_and_close(&mut self.stream, &e.response()).await;
                return Err(e.into());
            }
        };
        let accepted = match upgrade.accept(protocol, config.deflate.as_ref(), &[]) {
            Ok(a) => a,
            Err(e) => {
                respond_and_close(&mut self.stream, &e.response()).await;
                return Err(e.into());
            }
        };
        self.stream.write_all(&accepted.response).await?;
        self.stream.flush().await?;
        let deflate = match (accepted.deflate, config.deflate.as_ref()) {
            (Some(params), Some(cfg)) => Some((params, cfg)),
            _ => None,
        };
        let conn = Connection::new(Role::Server, config.shared_connection(), deflate, now());
        Ok(WebSocket::from_parts(
            self.stream,
            conn,
            &self.buf[self.head_len..],
            accepted.protocol,
            config.write_buffer_high,
        ))
    }

    /// Answers with an HTTP error and closes the connection.
    pub async fn reject(mut self, status: u16, message: &str) {
        let rejection = HandshakeError::Rejected {
            status,
            message: message.to_owned(),
        };
        respond_and_close(&mut self.stream, &rejection.response()).await;
    }

    /// [`Incoming::reject`] with `Retry-After`: the client may try again
    /// after `after` (whole seconds, at least 1).
    pub async fn reject_retry_after(mut self, status: u16, message: &str, after: Duration) {
        let rejection = HandshakeError::Rejected {
            status,
            message: message.to_owned(),
        };
        let secs = after.as_secs().max(1);
        respond_and_close(&mut self.stream, &rejection.response_retry_after(secs)).await;
    }

    /// The transport and every byte read from it so far (the request head
    /// first), for handing the connection to an HTTP server.
    pub fn into_parts(self) -> (S, BytesMut) {
        (self.stream, self.buf)
    }
}

/// Writes a complete response and shuts the write side down, ignoring
/// errors: the client may already be gone.
async fn respond_and_close<S: AsyncWrite + Unpin>(stream: &mut S, response: &[u8]) {
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        stream.write_all(response).await?;
        stream.shutdown().await
    })
    .await;
}

/// Reads the request and accepts it as a WebSocket whatever its path, with
/// no subprotocol.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    config: &ServerConfig,
) -> Result<WebSocket<S>> {
    Incoming::read(stream, config.handshake_timeout)
        .await?
        .accept(config, None)
        .await
}
