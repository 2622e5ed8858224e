//! Connecting to `ws://` and `wss://` URLs.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use walkie_proto::handshake::{ClientHandshake, ClientRequest, ServerResponse};
use walkie_proto::{Connection, Role};

use crate::config::ClientConfig;
use crate::driver::now;
use crate::error::{Error, Result};
use crate::websocket::WebSocket;

/// A parsed `ws://` or `wss://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsUrl {
    /// `wss://`.
    pub tls: bool,
    /// The host name or IP address (IPv6 without brackets).
    pub host: String,
    /// The port, explicit or the scheme's default.
    pub port: u16,
    /// Path and query, starting with `/`.
    pub target: String,
}

impl WsUrl {
    /// Parses a URL; `http://` and `https://` are accepted as aliases.
    pub fn parse(url: &str) -> Result<WsUrl> {
        let bad = |why: &str| Error::InvalidUrl(format!("{url}: {why}"));
        let uri: http::Uri = url.parse().map_err(|e| bad(&format!("{e}")))?;
        let tls = match uri.scheme_str() {
            Some("ws" | "http") => false,
            Some("wss" | "https") => true,
            Some(other) => {
                return Err(bad(&format!(
                    "unsupported scheme {other:?}, use ws:// or wss://"
                )));
            }
            None => return Err(bad("missing scheme, use ws:// or wss://")),
        };
        let host = uri.host().ok_or_else(|| bad("missing host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() {
            return Err(bad("missing host"));
        }
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let target = uri
            .path_and_query()
            .map(|p| p.as_str())
            .filter(|p| !p.is_empty())
            .unwrap_or("/")
            .to_owned();
        Ok(WsUrl {
            tls,
            host,
            port,
            target,
        })
    }

    /// The `Host` header value.
    pub fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let default = if self.tls { 443 } else { 80 };
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// A TCP stream, with or without TLS.
#[derive(Debug)]
pub enum MaybeTlsStream {
    /// `ws://`.
    Plain(TcpStream),
    /// `wss://`.
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for MaybeTlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTlsStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTlsStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MaybeTlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTlsStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTlsStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTlsStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MaybeTlsStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTlsStream::Plain(s) => s.is_write_vectored(),
            MaybeTlsStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTlsStream::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTlsStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTlsStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTlsStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Connects to `url` with default settings.
pub async fn connect(url: &str) -> Result<WebSocket<MaybeTlsStream>> {
    connect_with(url, &ClientConfig::default())
        .await
        .map(|(ws, _)| ws)
}

/// Connects to `url`: TCP (and TLS for `wss://`) within `connect_timeout`,
/// then the upgrade within `handshake_timeout`. Returns the connection and
/// the server's response (headers, subprotocol, compression).
pub async fn connect_with(
    url: &str,
    config: &ClientConfig,
) -> Result<(WebSocket<MaybeTlsStream>, ServerResponse)> {
    let url = WsUrl::parse(url)?;
    let stream = tokio::time::timeout(config.connect_timeout, open(&url, config))
        .await
        .map_err(|_| Error::ConnectTimeout)??;
    handshake(stream, &url.host_header(), &url.target, config).await
}

async fn open(url: &WsUrl, config: &ClientConfig) -> Result<MaybeTlsStream> {
    let tcp = TcpStream::connect((url.host.as_str(), url.port)).await?;
    tcp.set_nodelay(true)?;
    if !url.tls {
        return Ok(MaybeTlsStream::Plain(tcp));
    }
    let tls_config: Arc<rustls::ClientConfig> = match &config.tls {
        Some(c) => c.clone(),
        None => crate::tls::default_client_config()?,
    };
    let name = rustls::pki_types::ServerName::try_from(url.host.clone())
        .map_err(|e| Error::InvalidUrl(format!("{}: {e}", url.host)))?;
    let tls = tokio_rustls::TlsConnector::from(tls_config)
        .connect(name, tcp)
        .await
        .map_err(|e| Error::Tls(e.to_string()))?;
    Ok(MaybeTlsStream::Tls(Box::new(tls)))
}

/// Runs the client handshake over an already connected transport.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    host: &str,
    target: &str,
    config: &ClientConfig,
) -> Result<(WebSocket<S>, ServerResponse)> {
    let request = ClientRequest {
        host: host.to_owned(),
        target: target.to_owned(),
        protocols: config.protocols.clone(),
        deflate: config.deflate.clone(),
        headers: config.headers.clone(),
    };
    let (hs, bytes) = ClientHandshake::new(&request);
    let exchange = async {
        stream.write_all(&bytes).await?;
        stream.flush().await?;
        let mut buf = BytesMut::with_capacity(1024);
        loop {
            if let Some((response, len)) = hs.parse_response(&buf)? {
                return Ok::<_, Error>((response, buf.split_off(len)));
            }
            if stream.read_buf(&mut buf).await? == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
        }
    };
    let (response, leftover) = tokio::time::timeout(config.handshake_timeout, exchange)
        .await
        .map_err(|_| Error::HandshakeTimeout)??;
    let deflate = match (response.deflate, config.deflate.as_ref()) {
        (Some(params), Some(cfg)) => Some((params, cfg)),
        _ => None,
    };
    let conn = Connection::new(Role::Client, config.connection.clone(), deflate, now());
    let ws = WebSocket::from_parts(
        stream,
        conn,
        &leftover,
        response.protocol.clone(),
        config.write_buffer_high,
    );
    Ok((ws, response))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let u = WsUrl::parse("ws://127.0.0.1:3000/echo?x=1").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.target.as_str()),
            (false, "127.0.0.1", 3000, "/echo?x=1")
        );
        assert_eq!(u.host_header(), "127.0.0.1:3000");
        let u = WsUrl::parse("wss://example.com").unwrap();
        assert_eq!((u.tls, u.port, u.target.as_str()), (true, 443, "/"));
        assert_eq!(u.host_header(), "example.com");
        let u = WsUrl::parse("ws://[::1]:9000/").unwrap();
        assert_eq!(u.host, "::1");
        assert_eq!(u.host_header(), "[::1]:9000");
        for bad in ["ftp://x/", "127.0.0.1:3000", "ws:///path", "not a url"] {
            assert!(WsUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
