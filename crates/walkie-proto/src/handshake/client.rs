//! Client side of the opening handshake (RFC 6455 sections 4.1 and 4.2.2).

use std::fmt::Write as _;

use base64::Engine as _;
use rand::RngCore as _;

use super::http::{HeaderList, ResponseHead};
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
    pub fn new(req: &ClientRequest) -> (ClientHandshake, Vec<u8>) {
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
        (
            ClientHandshake {
                expected_accept: accept_key(key.as_bytes()),
                protocols: req.protocols.clone(),
                deflate: req.deflate.clone(),
            },
            head.into_bytes(),
        )
    }

    /// Checks the server's response at the front of `buf`.
    ///
    /// Returns `Ok(None)` until the whole head is in `buf`, then the accepted
    /// response and the head's length; bytes after the head are the first
    /// WebSocket frames.
    pub fn parse_response(
        &self,
        buf: &[u8],
    ) -> Result<Option<(ServerResponse, usize)>, HandshakeError> {
        let Some((head, len)) = ResponseHead::parse(buf)? else {
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
        if h.get("sec-websocket-accept") != Some(self.expected_accept.as_str()) {
            return Err(HandshakeError::InvalidAccept);
        }
        let protocol = match h.get("sec-websocket-protocol") {
            None => None,
            Some(p) if self.protocols.iter().any(|o| o == p) => Some(p.to_owned()),
            Some(_) => return Err(HandshakeError::UnexpectedProtocol),
        };
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
        let (hs, bytes) = ClientHandshake::new(&req);
        let parsed = Request::parse(&bytes).unwrap().unwrap().0;
        (hs, parsed)
    }

    #[test]
    fn our_request_is_accepted_by_our_server() {
        let (hs, req) = pair(ClientRequest {
            host: "localhost:3000".into(),
            target: "/chat".into(),
            protocols: vec!["walkie.v1".into()],
            deflate: Some(DeflateConfig::default()),
            headers: vec![("Origin".into(), "http://localhost".into())],
        });
        assert_eq!(req.origin(), Some("http://localhost"));
        let up = req.upgrade().unwrap();
        let acc = up.accept(Some("walkie.v1"), Some(&DeflateConfig::default()), &[]);
        let mut wire = acc.response.clone();
        wire.extend_from_slice(b"\x81\x00");
        let (res, len) = hs.parse_response(&wire).unwrap().unwrap();
        assert_eq!(len, acc.response.len());
        assert_eq!(res.protocol.as_deref(), Some("walkie.v1"));
        assert_eq!(res.deflate, acc.deflate);
    }

    #[test]
    fn rejects_a_wrong_accept_key() {
        let (hs, _) = pair(ClientRequest {
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
        let (hs, req) = pair(ClientRequest {
            host: "a".into(),
            target: "/".into(),
            ..Default::default()
        });
        let up = req.upgrade().unwrap();
        let base = String::from_utf8(up.accept(None, None, &[]).response).unwrap();
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
}
