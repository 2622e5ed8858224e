//! Connecting to `ws://` and `wss://` URLs.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use walkie_proto::handshake::{ClientHandshake, ClientRequest, HandshakeError, ServerResponse};
use walkie_proto::{Connection, Role};

use crate::config::ClientConfig;
use crate::driver::now;
use crate::error::{Error, Refusal, Result};
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
    /// Parses a URL; `http://` and `https://` are accepted as aliases, and
    /// schemes in any case. User info (`user:password@`) is refused rather
    /// than dropped: send credentials in a header.
    pub fn parse(url: &str) -> Result<WsUrl> {
        let bad = |why: &str| Error::InvalidUrl(format!("{url}: {why}"));
        let uri: http::Uri = url.parse().map_err(|e| bad(&format!("{e}")))?;
        let scheme = uri.scheme_str().map(str::to_ascii_lowercase);
        let tls = match scheme.as_deref() {
            Some("ws" | "http") => false,
            Some("wss" | "https") => true,
            Some(_) => {
                let other = uri.scheme_str().unwrap_or_default();
                return Err(bad(&format!(
                    "unsupported scheme {other:?}, use ws:// or wss://"
                )));
            }
            None => return Err(bad("missing scheme, use ws:// or wss://")),
        };
        let authority = uri.authority().ok_or_else(|| bad("missing host"))?;
        if authority.as_str().contains('@') {
            return Err(bad(
                "user info (user:password@) is not supported; send credentials in a header",
            ));
        }
        let host = uri.host().ok_or_else(|| bad("missing host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() {
            return Err(bad("missing host"));
        }
        // The port as written: `http` forgets one that is not a `u16`.
        let port = match authority.as_str().rsplit_once(':') {
            Some((_, port)) if !port.ends_with(']') && !port.is_empty() => {
                match port.parse::<u16>() {
                    Ok(p) if p > 0 => p,
                    _ => return Err(bad(&format!("port {port} is not in 1-65535"))),
                }
            }
            _ => {
                if tls {
                    443
                } else {
                    80
                }
            }
        };
        // `path()` is "/" when the URL has none, as in `ws://host?x=1`.
        let target = match uri.query() {
            Some(query) => format!("{}?{query}", uri.path()),
            None => uri.path().to_owned(),
        };
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
    let stream = tokio::time::timeout(config.connect_timeout, open_stream(&url, config))
        .await
        .map_err(|_| Error::ConnectTimeout)??;
    handshake(stream, &url.host_header(), &url.target, config).await
}

/// Opens the TCP connection to `url`'s host (its addresses tried in turn
/// within `config.connect_timeout`) and, for `wss://` or `https://`, its
/// TLS session (as `config.tls` says, else with the system's roots),
/// without a WebSocket handshake: for another protocol to the same server,
/// such as its HTTP API. The TLS handshake is the caller's to bound.
pub async fn open_stream(url: &WsUrl, config: &ClientConfig) -> Result<MaybeTlsStream> {
    let deadline = crate::driver::deadline_after(config.connect_timeout);
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((url.host.as_str(), url.port))
        .await?
        .collect();
    let tcp = connect_any(&addrs, deadline).await?;
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

/// Connects to the first of `addrs` that answers. Each gets an equal share
/// of the time left until `deadline`: an address that drops packets (a
/// broken IPv6 route, say) does not use up the time of those after it, and
/// one that refuses at once leaves its share to them.
async fn connect_any(addrs: &[SocketAddr], deadline: tokio::time::Instant) -> Result<TcpStream> {
    let mut last = None;
    for (i, addr) in addrs.iter().enumerate() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let share = left / u32::try_from(addrs.len() - i).unwrap_or(u32::MAX);
        match tokio::time::timeout(share, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => return Ok(tcp),
            Ok(Err(e)) => last = Some(Error::Io(e)),
            Err(_) => last = Some(Error::ConnectTimeout),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(io::ErrorKind::NotFound, "the host has no address").into()
    }))
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
    let (mut hs, bytes) = ClientHandshake::new(&request)?;
    let exchange = async {
        stream.write_all(&bytes).await?;
        stream.flush().await?;
        let mut buf = BytesMut::with_capacity(1024);
        loop {
            match hs.parse_response(&buf) {
                Ok(Some((response, len))) => {
                    return Ok::<_, Error>((response, buf.split_off(len)));
                }
                Ok(None) => {}
                Err(HandshakeError::UnexpectedStatus(status)) => {
                    let message = refusal_message(&mut stream, buf).await;
                    return Err(Error::Refused(Box::new(Refusal { status, message })));
                }
                Err(e) => return Err(e.into()),
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

/// The first line of a refusal's body (`buf` holds the response read so
/// far, its head complete): read until the body is in, the server closes
/// or a second passes, at most 1 KiB, cut to 200 characters, control
/// characters dropped. Empty if the server says nothing.
async fn refusal_message<S: AsyncRead + Unpin>(stream: &mut S, mut buf: BytesMut) -> String {
    const MOST: usize = 1024;
    let Some(head) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return String::new();
    };
    let body_start = head + 4;
    let wanted = std::str::from_utf8(&buf[..head])
        .ok()
        .and_then(|h| {
            h.lines().find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
        })
        .unwrap_or(MOST)
        .min(MOST);
    // A second at most: a server that sends no length and keeps the
    // connection open still gets its status reported, not a timeout.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        while buf.len() - body_start < wanted {
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    let end = buf.len().min(body_start + wanted);
    let body = String::from_utf8_lossy(&buf[body_start..end]);
    body.lines()
        .next()
        .unwrap_or("")
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect::<String>()
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// An address that drops connection attempts: a listener whose accept
    /// queue is full (Linux drops the SYNs it has no room for), and the
    /// connections that fill it. `None` where attempts are not dropped.
    async fn blackhole() -> Option<(tokio::net::TcpListener, Vec<TcpStream>)> {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(1).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut queued = Vec::new();
        for _ in 0..8 {
            let attempt = TcpStream::connect(addr);
            match tokio::time::timeout(Duration::from_millis(300), attempt).await {
                Ok(Ok(tcp)) => queued.push(tcp),
                Ok(Err(_)) => return None,
                Err(_) => return Some((listener, queued)),
            }
        }
        None
    }

    #[tokio::test]
    async fn an_address_that_drops_packets_leaves_time_for_the_next() {
        let Some((dead, _queued)) = blackhole().await else {
            eprintln!("connection attempts are not dropped here: nothing to test");
            return;
        };
        let good = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addrs = [dead.local_addr().unwrap(), good.local_addr().unwrap()];
        let start = tokio::time::Instant::now();
        let tcp = connect_any(&addrs, start + Duration::from_secs(2))
            .await
            .expect("the second address got no time");
        assert_eq!(tcp.peer_addr().unwrap(), addrs[1]);
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(900), "{elapsed:?}");
        assert!(elapsed < Duration::from_millis(1900), "{elapsed:?}");
        // All dropped: the deadline holds.
        let err = connect_any(
            &addrs[..1],
            tokio::time::Instant::now() + Duration::from_millis(300),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, Error::ConnectTimeout), "{err}");
    }

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

    #[test]
    fn a_query_without_a_path_gets_one() {
        let u = WsUrl::parse("ws://example.com?token=x").unwrap();
        assert_eq!(u.target, "/?token=x");
        let u = WsUrl::parse("ws://example.com:8080?a=1&b=2").unwrap();
        assert_eq!((u.port, u.target.as_str()), (8080, "/?a=1&b=2"));
        let u = WsUrl::parse("ws://example.com/").unwrap();
        assert_eq!(u.target, "/");
    }

    #[test]
    fn ports_out_of_range_are_refused_by_name() {
        for (url, port) in [
            ("ws://example.com:99999/", "99999"),
            ("wss://[::1]:65536/", "65536"),
            ("ws://example.com:0/", "0"),
        ] {
            let err = WsUrl::parse(url).unwrap_err().to_string();
            assert!(err.contains(&format!("port {port}")), "{url}: {err}");
        }
        assert_eq!(WsUrl::parse("ws://example.com:65535/").unwrap().port, 65535);
        // An empty port is the scheme's default.
        assert_eq!(WsUrl::parse("wss://example.com:/").unwrap().port, 443);
        assert_eq!(WsUrl::parse("ws://[::1]/").unwrap().port, 80);
    }

    #[test]
    fn schemes_in_any_case() {
        let u = WsUrl::parse("WSS://example.com/x").unwrap();
        assert_eq!((u.tls, u.port, u.target.as_str()), (true, 443, "/x"));
        assert!(!WsUrl::parse("Ws://example.com").unwrap().tls);
        assert!(WsUrl::parse("HTTPS://example.com").unwrap().tls);
        let err = WsUrl::parse("FTP://example.com").unwrap_err().to_string();
        assert!(err.contains("unsupported scheme \"FTP\""), "{err}");
    }

    #[test]
    fn user_info_is_refused() {
        for url in [
            "ws://user:pass@example.com/",
            "wss://token@example.com:8443/",
        ] {
            let err = WsUrl::parse(url).unwrap_err().to_string();
            assert!(err.contains("user info"), "{url}: {err}");
        }
    }
}
