//! Client side of the opening handshake (RFC 6455 sections 4.1 and 4.2.2).

use std::fmt::Write as _;

use base64::Engine as _;
use rand::RngCore as _;

use super::http::{HeadScan, HeaderList, ResponseHead, Single, check_header_line, is_token};
use super::{HandshakeError, accept_key};
use crate::deflate::{DeflateConfig, DeflateParams};
use crate::extension::parse_extensions;

/// What the client asks for.
#[derive(Debug, Clone, Default)]
pub struct ClientRequest {
    /// The `Host` header: host, plus `:port` when not the scheme's default.
    pub host: String,
    /// The request target: path and query, starting with `/`.
    pub target: String,
    /// Subprotocols to offer, in order of preference.
    pub protocols: Vec<String>,
    /// permessage-deflate settings to offer; `None` offers no compression.
    pub deflate: Option<DeflateConfig>,
    /// Extra header lines, e.g. `Origin` or `Authorization`.
    pub headers: Vec<(String, String)>,
}

/// A handshake in progress: the request was built, the response is awaited.
#[derive(Debug, Clone)]
pub struct ClientHandshake {
    expected_accept: String,
    protocols: Vec<String>,
    deflate: Option<DeflateConfig>,
    /// How much of the response was searched for its end.
    scan: HeadScan,
}

/// Whether `s` can be the request target or the `Host` value: not empty, no
/// space, no control character.
fn is_visible(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b > b' ' && b != 0x7f)
}

/// The server's accepted response.
#[derive(Debug, Clone)]
pub struct ServerResponse {
    /// The header lines of the 101 response.
    pub headers: HeaderList,
    /// The subprotocol the server selected.
    pub protocol: Option<String>,
    /// permessage-deflate parameters, if the server accepted compression.
    pub deflate: Option<DeflateParams>,
}

impl ClientHandshake {
    /// Builds the request head with a fresh random key.
    ///
    /// Fails with [`HandshakeError::InvalidHeadField`] when a value of `req`
    /// cannot be written into the head: a target or host that is empty or
    /// holds a space or a control character, a subprotocol or header name
    /// that is not an HTTP token, or a header value with a control character
    /// (CR, LF, NUL...), which could add lines to the request.
    pub fn new(req: &ClientRequest) -> Result<(ClientHandshake, Vec<u8>), HandshakeError> {
        if !is_visible(&req.target) {
            return Err(HandshakeError::InvalidHeadField("request target"));
        }
        if !is_visible(&req.host) {
            return Err(HandshakeError::InvalidHeadField("Host value"));
        }
        if !req.protocols.iter().all(|p| is_token(p)) {
            return Err(HandshakeError::InvalidHeadField("subprotocol"));
        }
        for (name, value) in &req.headers {
            check_header_line(name, value)?;
        }
        let mut nonce = [0u8; 16];
        rand::rng().fill_bytes(&mut nonce);
        let key = base64::engine::general_purpose::STANDARD.encode(nonce);
        let mut head = String::with_capacity(256);
        // Writing to a String cannot fail.
        let _ = write!(
            head,
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n",
            req.target, req.host
        );
        if !req.protocols.is_empty() {
            let _ = write!(
                head,
                "Sec-WebSocket-Protocol: {}\r\n",
                req.protocols.join(", ")
            );
        }
        if let Some(deflate) = &req.deflate {
            let _ = write!(
                head,
                "Sec-WebSocket-Extensions: {}\r\n",
                deflate.client_offer()
            );
        }
        for (name, value) in &req.headers {
            let _ = write!(head, "{name}: {value}\r\n");
        }
        head.push_str("\r\n");
        Ok((
            ClientHandshake {
                expected_accept: accept_key(key.as_bytes()),
                protocols: req.protocols.clone(),
                deflate: req.deflate.clone(),
                scan: HeadScan::default(),
            },
            head.into_bytes(),
        ))
    }

    /// Checks the server's response at the front of `buf`: the bytes read
    /// so far, given again with more appended after each read.
    ///
    /// Returns `Ok(None)` until the whole head is in `buf`, then the accepted
    /// response and the head's length; bytes after the head are the first
    /// WebSocket frames. The head is parsed once its end has arrived, each
    /// byte being searched for it once.
    pub fn parse_response(
        &mut self,
        buf: &[u8],
    ) -> Result<Option<(ServerResponse, usize)>, HandshakeError> {
        let Some((head, len)) = ResponseHead::parse_scanned(&mut self.scan, buf)? else {
            return Ok(None);
        };
        if head.status != 101 {
            return Err(HandshakeError::UnexpectedStatus(head.status));
        }
        let h = &head.headers;
        if !h.has_token("upgrade", "websocket") {
            return Err(HandshakeError::MissingUpgrade);
        }
        if !h.has_token("connection", "upgrade") {
            return Err(HandshakeError::MissingConnectionUpgrade);
        }
        if h.single("Sec-WebSocket-Accept")?.text() != Some(self.expected_accept.as_str()) {
            return Err(HandshakeError::InvalidAccept);
        }
        let protocol = match h.single("Sec-WebSocket-Protocol")? {
            Single::Absent => None,
            Single::Text(p) if self.protocols.iter().any(|o| o == p) => Some(p.to_owned()),
            Single::Text(_) | Single::NotUtf8 => return Err(HandshakeError::UnexpectedProtocol),
        };
        // An extension answer we could not read would leave us unsure of
        // what the server compresses.
        if h.iter().any(|(n, v)| {
            n.eq_ignore_ascii_case("sec-websocket-extensions") && std::str::from_utf8(v).is_err()
        }) {
            return Err(HandshakeError::InvalidExtensionResponse);
        }
        let mut deflate = None;
        for value in h.get_all("sec-websocket-extensions") {
            let exts =
                parse_extensions(value).map_err(|_| HandshakeError::InvalidExtensionResponse)?;
            for ext in exts {
                // Only one accepted deflate, and only if we offered it.
                let cfg = match (&self.deflate, &deflate) {
                    (Some(cfg), None) if ext.name == crate::deflate::EXTENSION_NAME => cfg,
                    _ => return Err(HandshakeError::InvalidExtensionResponse),
                };
                deflate = Some(cfg.accept_response(&ext)?);
            }
        }
        Ok(Some((
            ServerResponse {
                headers: head.headers,
                protocol,
                deflate,
            },
            len,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::super::Request;
    use super::*;

    fn pair(req: ClientRequest) -> (ClientHandshake, Request) {
        let (hs, bytes) = ClientHandshake::new(&req).unwrap();
        let parsed = Request::parse(&bytes).unwrap().unwrap().0;
        (hs, parsed)
    }

    #[test]
    fn our_request_is_accepted_by_our_server() {
        let (mut hs, req) = pair(ClientRequest {
            host: "localhost:3000".into(),
            target: "/chat".into(),
            protocols: vec!["walkie.v1".into()],
            deflate: Some(DeflateConfig::default()),
            headers: vec![("Origin".into(), "http://localhost".into())],
        });
        assert_eq!(req.origin(), Some("http://localhost"));
        let up = req.upgrade().unwrap();
        let acc = up
            .accept(Some("walkie.v1"), Some(&DeflateConfig::default()), &[])
            .unwrap();
        let mut wire = acc.response.clone();
        wire.extend_from_slice(b"\x81\x00");
        let (res, len) = hs.parse_response(&wire).unwrap().unwrap();
        assert_eq!(len, acc.response.len());
        assert_eq!(res.protocol.as_deref(), Some("walkie.v1"));
        assert_eq!(res.deflate, acc.deflate);
    }

    #[test]
    fn rejects_a_wrong_accept_key() {
        let (mut hs, _) = pair(ClientRequest {
            host: "a".into(),
            target: "/".into(),
            ..Default::default()
        });
        let resp = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        assert_eq!(
            hs.parse_response(resp).unwrap_err(),
            HandshakeError::InvalidAccept
        );
        assert_eq!(
            hs.parse_response(b"HTTP/1.1 404 Not Found\r\n\r\n")
                .unwrap_err(),
            HandshakeError::UnexpectedStatus(404)
        );
    }

    #[test]
    fn rejects_unoffered_protocol_and_extension() {
        let (mut hs, req) = pair(ClientRequest {
            host: "a".into(),
            target: "/".into(),
            ..Default::default()
        });
        let up = req.upgrade().unwrap();
        let base = String::from_utf8(up.accept(None, None, &[]).unwrap().response).unwrap();
        let with = |line: &str| base.replacen("\r\n\r\n", &format!("\r\n{line}\r\n\r\n"), 1);
        assert_eq!(
            hs.parse_response(with("Sec-WebSocket-Protocol: chat").as_bytes())
                .unwrap_err(),
            HandshakeError::UnexpectedProtocol
        );
        assert_eq!(
            hs.parse_response(with("Sec-WebSocket-Extensions: permessage-deflate").as_bytes())
                .unwrap_err(),
            HandshakeError::InvalidExtensionResponse
        );
    }

    fn request() -> ClientRequest {
        ClientRequest {
            host: "example.com:8080".into(),
            target: "/chat?room=1".into(),
            protocols: vec!["chat".into()],
            headers: vec![("Authorization".into(), "Bearer x\ty".into())],
            ..Default::default()
        }
    }

    #[test]
    fn refuses_values_that_would_break_the_head() {
        assert!(ClientHandshake::new(&request()).is_ok());
        let field = |e: Result<_, HandshakeError>| match e {
            Err(HandshakeError::InvalidHeadField(f)) => f,
            other => panic!("{:?}", other.map(|_| ())),
        };
        for target in ["", "/a b", "/\r\nX-Injected: 1", "/\0", "/\n"] {
            let req = ClientRequest {
                target: target.into(),
                ..request()
            };
            assert_eq!(
                field(ClientHandshake::new(&req)),
                "request target",
                "{target:?}"
            );
        }
        for host in ["", "a\r\nX-Injected: 1", "a b", "a\0"] {
            let req = ClientRequest {
                host: host.into(),
                ..request()
            };
            assert_eq!(field(ClientHandshake::new(&req)), "Host value", "{host:?}");
        }
        for protocol in ["", "a b", "chat\r\nX-Injected: 1", "a,b"] {
            let req = ClientRequest {
                protocols: vec!["ok".into(), protocol.into()],
                ..request()
            };
            assert_eq!(
                field(ClientHandshake::new(&req)),
                "subprotocol",
                "{protocol:?}"
            );
        }
        for (name, value, what) in [
            ("X-A\r\nX-Injected", "1", "header name"),
            ("", "1", "header name"),
            ("X A", "1", "header name"),
            ("X-A:", "1", "header name"),
            ("X-A", "1\r\nX-Injected: 1", "header value"),
            ("X-A", "1\nX-Injected: 1", "header value"),
            ("X-A", "1\r", "header value"),
            ("X-A", "a\0b", "header value"),
        ] {
            let req = ClientRequest {
                headers: vec![(name.into(), value.into())],
                ..request()
            };
            assert_eq!(
                field(ClientHandshake::new(&req)),
                what,
                "{name:?}: {value:?}"
            );
        }
    }

    /// The server's answer to `req`, with `extra` header lines.
    fn response_with(req: &Request, extra: &[u8]) -> Vec<u8> {
        let up = req.upgrade().unwrap();
        let base = up.accept(None, None, &[]).unwrap().response;
        let mut wire = base[..base.len() - 2].to_vec();
        wire.extend_from_slice(extra);
        wire.extend_from_slice(b"\r\n");
        wire
    }

    #[test]
    fn rejects_repeated_or_unreadable_single_headers() {
        let (mut hs, req) = pair(ClientRequest {
            protocols: vec!["chat".into()],
            ..request()
        });
        let accept = accept_key(req.headers.get("sec-websocket-key").unwrap().as_bytes());
        let accept_line = format!("Sec-WebSocket-Accept: {accept}\r\n");
        for (extra, err) in [
            (
                accept_line.clone().into_bytes(),
                HandshakeError::RepeatedHeader("Sec-WebSocket-Accept"),
            ),
            (
                b"Sec-WebSocket-Accept: \xff\r\n".to_vec(),
                HandshakeError::RepeatedHeader("Sec-WebSocket-Accept"),
            ),
            (
                b"Sec-WebSocket-Protocol: chat\r\nSec-WebSocket-Protocol: chat\r\n".to_vec(),
                HandshakeError::RepeatedHeader("Sec-WebSocket-Protocol"),
            ),
            (
                b"Sec-WebSocket-Protocol: chat\r\nSec-WebSocket-Protocol: \xff\r\n".to_vec(),
                HandshakeError::RepeatedHeader("Sec-WebSocket-Protocol"),
            ),
            (
                b"Sec-WebSocket-Protocol: \xff\r\n".to_vec(),
                HandshakeError::UnexpectedProtocol,
            ),
            (
                b"Sec-WebSocket-Extensions: \xff\r\n".to_vec(),
                HandshakeError::InvalidExtensionResponse,
            ),
        ] {
            let wire = response_with(&req, &extra);
            assert_eq!(
                ClientHandshake::parse_response(&mut hs.clone(), &wire).unwrap_err(),
                err,
                "{}",
                String::from_utf8_lossy(&extra)
            );
        }
        // The same response with the protocol once is accepted.
        let wire = response_with(&req, b"Sec-WebSocket-Protocol: chat\r\n");
        let (res, _) = hs.parse_response(&wire).unwrap().unwrap();
        assert_eq!(res.protocol.as_deref(), Some("chat"));
    }

    #[test]
    fn a_response_sent_a_byte_at_a_time_is_parsed_once_complete() {
        let (mut hs, req) = pair(request());
        let pad = format!("X-Pad: {}\r\n", "p".repeat(1000)).repeat(10);
        let wire = response_with(&req, pad.as_bytes());
        let n = super::super::http::tests::parses(|| {
            for end in 0..wire.len() {
                assert!(hs.parse_response(&wire[..end]).unwrap().is_none());
            }
            assert_eq!(hs.parse_response(&wire).unwrap().unwrap().1, wire.len());
        });
        assert_eq!(n, 2);
    }
}
