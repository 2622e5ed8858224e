//! Server side of the opening handshake (RFC 6455 section 4.2).

use std::fmt::Write as _;

use base64::Engine as _;

use super::http::{Single, check_header_line, is_token, reason_phrase};
use super::{HandshakeError, Request, accept_key};
use crate::deflate::{DeflateConfig, DeflateParams};
use crate::extension::{Extension, parse_extensions};

/// A request checked to be a valid WebSocket upgrade, waiting for the
/// application to accept it.
#[derive(Debug, Clone)]
pub struct Upgrade {
    key: String,
    protocols: Vec<String>,
    extensions: Vec<Extension>,
}

/// The outcome of [`Upgrade::accept`]: the response to write and what was
/// negotiated.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The complete `101 Switching Protocols` response head.
    pub response: Vec<u8>,
    /// The subprotocol selected, if any.
    pub protocol: Option<String>,
    /// permessage-deflate parameters, if compression was negotiated.
    pub deflate: Option<DeflateParams>,
}

impl Request {
    /// Checks that this request is a valid WebSocket upgrade (section 4.2.1).
    pub fn upgrade(&self) -> Result<Upgrade, HandshakeError> {
        if self.method != "GET" {
            return Err(HandshakeError::MethodNotGet);
        }
        if self.version < 1 {
            return Err(HandshakeError::HttpVersion);
        }
        if self.headers.single("Host")?.text().is_none() {
            return Err(HandshakeError::MissingHost);
        }
        if !self.headers.has_token("upgrade", "websocket") {
            return Err(HandshakeError::MissingUpgrade);
        }
        if !self.headers.has_token("connection", "upgrade") {
            return Err(HandshakeError::MissingConnectionUpgrade);
        }
        // Section 4.4: a version mismatch is answered with 426 and the
        // versions we support, before anything else about the request; so is
        // a repeated or unreadable version.
        match self.headers.single("Sec-WebSocket-Version") {
            Ok(Single::Text("13")) => {}
            _ => return Err(HandshakeError::UnsupportedVersion),
        }
        let Some(key) = self.headers.single("Sec-WebSocket-Key")?.text() else {
            return Err(HandshakeError::InvalidKey);
        };
        match base64::engine::general_purpose::STANDARD.decode(key) {
            Ok(raw) if raw.len() == 16 => {}
            _ => return Err(HandshakeError::InvalidKey),
        }
        let mut protocols = Vec::new();
        for value in self.headers.get_all("sec-websocket-protocol") {
            for p in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                if !is_token(p) {
                    return Err(HandshakeError::MalformedProtocols);
                }
                protocols.push(p.to_owned());
            }
        }
        let mut extensions = Vec::new();
        for value in self.headers.get_all("sec-websocket-extensions") {
            extensions
                .extend(parse_extensions(value).map_err(|_| HandshakeError::MalformedExtensions)?);
        }
        Ok(Upgrade {
            key: key.to_owned(),
            protocols,
            extensions,
        })
    }
}

impl Upgrade {
    /// The subprotocols the client offered, in its order of preference.
    pub fn protocols(&self) -> &[String] {
        &self.protocols
    }

    /// The extensions the client offered, in order.
    pub fn extensions(&self) -> &[Extension] {
        &self.extensions
    }

    /// The first protocol of `supported` (the server's order of preference)
    /// that the client offered.
    pub fn select_protocol<'a>(&self, supported: &[&'a str]) -> Option<&'a str> {
        supported
            .iter()
            .find(|s| self.protocols.iter().any(|p| p == *s))
            .copied()
    }

    /// Accepts the upgrade: selects `protocol` (ignored unless the client
    /// offered it), negotiates permessage-deflate if `deflate` is given and
    /// the client offered it, and builds the 101 response with
    /// `extra_headers` appended.
    ///
    /// Fails with [`HandshakeError::InvalidHeadField`] when a name in
    /// `extra_headers` is not an HTTP token or a value holds a control
    /// character (CR, LF, NUL...), which could add lines to the response.
    pub fn accept(
        &self,
        protocol: Option<&str>,
        deflate: Option<&DeflateConfig>,
        extra_headers: &[(&str, &str)],
    ) -> Result<Accepted, HandshakeError> {
        for (name, value) in extra_headers {
            check_header_line(name, value)?;
        }
        let protocol = protocol
            .filter(|p| self.protocols.iter().any(|o| o == p))
            .map(str::to_owned);
        let deflate = deflate.and_then(|cfg| cfg.accept_offer(&self.extensions));
        let mut head = String::with_capacity(160);
        // Writing to a String cannot fail.
        let _ = write!(
            head,
            "HTTP/1.1 101 {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
            reason_phrase(101),
            accept_key(self.key.as_bytes())
        );
        if let Some(p) = &protocol {
            let _ = write!(head, "Sec-WebSocket-Protocol: {p}\r\n");
        }
        if let Some(params) = &deflate {
            let _ = write!(
                head,
                "Sec-WebSocket-Extensions: {}\r\n",
                params.response_header()
            );
        }
        for (name, value) in extra_headers {
            let _ = write!(head, "{name}: {value}\r\n");
        }
        head.push_str("\r\n");
        Ok(Accepted {
            response: head.into_bytes(),
            protocol,
            deflate,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(extra: &str) -> Request {
        let head = format!(
            "GET /chat HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: http://example.com\r\n{extra}\r\n"
        );
        Request::parse(head.as_bytes()).unwrap().unwrap().0
    }

    fn with_version(extra: &str) -> Request {
        request(&format!("Sec-WebSocket-Version: 13\r\n{extra}"))
    }

    // Section 1.3 / 4.2.2: the RFC's own example.
    #[test]
    fn accepts_the_rfc_example() {
        let req = with_version("Sec-WebSocket-Protocol: chat, superchat\r\n");
        assert_eq!(req.origin(), Some("http://example.com"));
        let up = req.upgrade().unwrap();
        assert_eq!(up.protocols(), ["chat", "superchat"]);
        let chosen = up.select_protocol(&["superchat", "chat"]);
        let acc = up.accept(chosen, None, &[]).unwrap();
        let text = String::from_utf8(acc.response).unwrap();
        assert!(text.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(text.contains("Sec-WebSocket-Protocol: superchat\r\n"));
        assert!(text.ends_with("\r\n\r\n"));
    }

    // Section 4.4: a wrong version gets 426 and the supported version.
    #[test]
    fn wrong_version_is_426() {
        for v in ["Sec-WebSocket-Version: 8\r\n", ""] {
            let err = request(v).upgrade().unwrap_err();
            assert_eq!(err, HandshakeError::UnsupportedVersion);
            let resp = String::from_utf8(err.response()).unwrap();
            assert!(resp.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
            assert!(resp.contains("Sec-WebSocket-Version: 13\r\n"));
        }
    }

    #[test]
    fn each_missing_piece_is_named() {
        let cases = [
            ("POST", HandshakeError::MethodNotGet),
            ("GET-nokey", HandshakeError::InvalidKey),
        ];
        let post = Request {
            method: "POST".into(),
            ..with_version("")
        };
        assert_eq!(post.upgrade().unwrap_err(), cases[0].1);

        let bad_key = "GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: c2hvcnQ=\r\n\r\n";
        let req = Request::parse(bad_key.as_bytes()).unwrap().unwrap().0;
        assert_eq!(req.upgrade().unwrap_err(), cases[1].1);

        let no_conn =
            "GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n";
        let req = Request::parse(no_conn.as_bytes()).unwrap().unwrap().0;
        let err = req.upgrade().unwrap_err();
        assert_eq!(err, HandshakeError::MissingConnectionUpgrade);
        let resp = String::from_utf8(err.response()).unwrap();
        assert!(resp.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(resp.contains("Connection header"));

        let no_host = "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
        let req = Request::parse(no_host.as_bytes()).unwrap().unwrap().0;
        assert_eq!(req.upgrade().unwrap_err(), HandshakeError::MissingHost);

        let http10 = "GET / HTTP/1.0\r\nHost: a\r\n\r\n";
        let req = Request::parse(http10.as_bytes()).unwrap().unwrap().0;
        assert_eq!(req.upgrade().unwrap_err(), HandshakeError::HttpVersion);
    }

    #[test]
    fn negotiates_deflate_when_offered_and_enabled() {
        let req = with_version(
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
        );
        let up = req.upgrade().unwrap();
        let acc = up
            .accept(None, Some(&DeflateConfig::default()), &[])
            .unwrap();
        assert!(acc.deflate.is_some());
        let text = String::from_utf8(acc.response).unwrap();
        assert!(text.contains("Sec-WebSocket-Extensions: permessage-deflate\r\n"));

        // Not enabled on our side: no extension header at all.
        let acc = up.accept(None, None, &[]).unwrap();
        assert!(acc.deflate.is_none());
        assert!(
            !String::from_utf8(acc.response)
                .unwrap()
                .contains("Extensions")
        );
    }

    #[test]
    fn protocol_not_offered_is_not_selected() {
        let up = with_version("").upgrade().unwrap();
        let acc = up.accept(Some("chat"), None, &[]).unwrap();
        assert_eq!(acc.protocol, None);
    }

    #[test]
    fn refuses_extra_headers_that_would_break_the_response() {
        let up = with_version("").upgrade().unwrap();
        let acc = up.accept(None, None, &[("X-Ok", "fine\tvalue")]).unwrap();
        assert!(
            String::from_utf8(acc.response)
                .unwrap()
                .ends_with("\r\nX-Ok: fine\tvalue\r\n\r\n")
        );
        for (name, value, what) in [
            ("X-A", "1\r\nSet-Cookie: x=1", "header value"),
            ("X-A", "1\n", "header value"),
            ("X-A", "\0", "header value"),
            ("X-A\r\nSet-Cookie", "x=1", "header name"),
            ("X-A:", "1", "header name"),
            ("", "1", "header name"),
        ] {
            let err = up.accept(None, None, &[(name, value)]).unwrap_err();
            assert_eq!(
                err,
                HandshakeError::InvalidHeadField(what),
                "{name:?}: {value:?}"
            );
            assert_eq!(err.status(), 500);
        }
    }

    fn raw_request(extra: &[u8]) -> Request {
        let mut head = b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n".to_vec();
        head.extend_from_slice(extra);
        head.extend_from_slice(b"\r\n");
        Request::parse(&head).unwrap().unwrap().0
    }

    #[test]
    fn rejects_repeated_or_unreadable_single_headers() {
        const HOST: &[u8] = b"Host: a\r\n";
        const VERSION: &[u8] = b"Sec-WebSocket-Version: 13\r\n";
        const KEY: &[u8] = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
        let ok = [HOST, VERSION, KEY].concat();
        assert!(raw_request(&ok).upgrade().is_ok());
        for (extra, err) in [
            (
                [HOST, HOST, VERSION, KEY].concat(),
                HandshakeError::RepeatedHeader("Host"),
            ),
            (
                [HOST, b"Host: \xff\r\n", VERSION, KEY].concat(),
                HandshakeError::RepeatedHeader("Host"),
            ),
            (
                [b"Host: \xff\r\n", VERSION, KEY].concat(),
                HandshakeError::MissingHost,
            ),
            (
                [HOST, VERSION, b"Sec-WebSocket-Version: \xff\r\n", KEY].concat(),
                HandshakeError::UnsupportedVersion,
            ),
            (
                [HOST, b"Sec-WebSocket-Version: \xff\r\n", KEY].concat(),
                HandshakeError::UnsupportedVersion,
            ),
            (
                [HOST, VERSION, KEY, KEY].concat(),
                HandshakeError::RepeatedHeader("Sec-WebSocket-Key"),
            ),
            (
                [HOST, VERSION, KEY, b"Sec-WebSocket-Key: \xff\r\n"].concat(),
                HandshakeError::RepeatedHeader("Sec-WebSocket-Key"),
            ),
            (
                [HOST, VERSION, b"Sec-WebSocket-Key: \xff\r\n"].concat(),
                HandshakeError::InvalidKey,
            ),
        ] {
            assert_eq!(
                raw_request(&extra).upgrade().unwrap_err(),
                err,
                "{}",
                String::from_utf8_lossy(&extra)
            );
        }
    }
}
