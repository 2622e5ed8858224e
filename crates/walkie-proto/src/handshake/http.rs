//! HTTP/1.1 heads, parsed with `httparse`.

use super::HandshakeError;

/// Largest request or response head accepted, in bytes.
pub const MAX_HEAD_SIZE: usize = 16 * 1024;

/// Most header lines accepted in a head.
pub const MAX_HEADERS: usize = 64;

/// Header lines in the order received; names compare case-insensitively.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderList(Vec<(String, Vec<u8>)>);

impl HeaderList {
    fn from_httparse(headers: &[httparse::Header<'_>]) -> Self {
        HeaderList(
            headers
                .iter()
                .map(|h| (h.name.to_owned(), h.value.to_owned()))
                .collect(),
        )
    }

    /// The first value of `name`, if present and valid UTF-8.
    pub fn get<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        self.get_all(name).next()
    }

    /// Every value of `name` that is valid UTF-8, in order.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .filter_map(|(_, v)| std::str::from_utf8(v).ok())
            .map(str::trim)
    }

    /// Whether any value of `name`, read as a comma-separated list, contains
    /// `token` (case-insensitively).
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.get_all(name)
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// Iterates over `(name, raw value)` pairs.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_slice()))
    }
}

/// A parsed HTTP request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The method, e.g. `GET`.
    pub method: String,
    /// The request target, e.g. `/chat?room=1`.
    pub target: String,
    /// The minor HTTP version: 1 for HTTP/1.1, 0 for HTTP/1.0.
    pub version: u8,
    /// The header lines.
    pub headers: HeaderList,
}

impl Request {
    /// Parses a request head from the front of `buf`.
    ///
    /// Returns `Ok(None)` until the whole head (ending with an empty line) is
    /// in `buf`, then the request and the head's length; bytes after it belong
    /// to the connection that follows. A head larger than [`MAX_HEAD_SIZE`]
    /// fails as soon as that many bytes have arrived without an end.
    pub fn parse(buf: &[u8]) -> Result<Option<(Request, usize)>, HandshakeError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(len)) => {
                if len > MAX_HEAD_SIZE {
                    return Err(HandshakeError::HeadTooLarge);
                }
                Ok(Some((
                    Request {
                        method: req.method.unwrap_or_default().to_owned(),
                        target: req.path.unwrap_or_default().to_owned(),
                        version: req.version.unwrap_or_default(),
                        headers: HeaderList::from_httparse(req.headers),
                    },
                    len,
                )))
            }
            Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_SIZE => {
                Err(HandshakeError::HeadTooLarge)
            }
            Ok(httparse::Status::Partial) => Ok(None),
            Err(httparse::Error::TooManyHeaders) => Err(HandshakeError::HeadTooLarge),
            Err(e) => Err(HandshakeError::Malformed(parse_error(e))),
        }
    }

    /// The path part of the target, without the query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }

    /// The query part of the target, without the `?`.
    pub fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, q)| q)
    }

    /// The `Origin` header sent by browsers; servers decide whether to allow it.
    pub fn origin(&self) -> Option<&str> {
        self.headers.get("origin")
    }

    /// Whether this request asks for a WebSocket upgrade (it may still be an
    /// invalid one: see [`Request::upgrade`]).
    pub fn is_websocket_upgrade(&self) -> bool {
        self.headers.has_token("upgrade", "websocket")
    }
}

/// A parsed HTTP response head (client side).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ResponseHead {
    pub status: u16,
    pub headers: HeaderList,
}

impl ResponseHead {
    pub(super) fn parse(buf: &[u8]) -> Result<Option<(ResponseHead, usize)>, HandshakeError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut headers);
        match res.parse(buf) {
            Ok(httparse::Status::Complete(len)) => Ok(Some((
                ResponseHead {
                    status: res.code.unwrap_or_default(),
                    headers: HeaderList::from_httparse(res.headers),
                },
                len,
            ))),
            Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_SIZE => {
                Err(HandshakeError::HeadTooLarge)
            }
            Ok(httparse::Status::Partial) => Ok(None),
            Err(httparse::Error::TooManyHeaders) => Err(HandshakeError::HeadTooLarge),
            Err(e) => Err(HandshakeError::Malformed(parse_error(e))),
        }
    }
}

fn parse_error(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status",
        httparse::Error::Token => "invalid token",
        httparse::Error::Version => "invalid HTTP version",
        httparse::Error::TooManyHeaders => "too many headers",
    }
}

/// The standard reason phrase of the statuses this crate sends.
pub(crate) fn reason_phrase(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// A complete plain-text error response that closes the connection.
pub(crate) fn error_response(status: u16, extra_headers: &str, message: &str) -> Vec<u8> {
    let body = format!("{message}\n");
    format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n{extra_headers}\r\n{body}",
        reason_phrase(status),
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_in_pieces() {
        let head = b"GET /chat?x=1 HTTP/1.1\r\nHost: a\r\nUpgrade: WebSocket\r\n\r\nrest";
        for cut in 0..head.len() - 4 {
            assert_eq!(Request::parse(&head[..cut]), Ok(None), "cut {cut}");
        }
        let (req, len) = Request::parse(head).unwrap().unwrap();
        assert_eq!(len, head.len() - 4);
        assert_eq!(req.path(), "/chat");
        assert_eq!(req.query(), Some("x=1"));
        assert!(req.is_websocket_upgrade());
    }

    #[test]
    fn oversized_head_fails_early() {
        let mut head = b"GET / HTTP/1.1\r\n".to_vec();
        while head.len() < MAX_HEAD_SIZE {
            head.extend_from_slice(b"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert_eq!(Request::parse(&head), Err(HandshakeError::HeadTooLarge));
    }

    #[test]
    fn garbage_is_malformed() {
        assert!(matches!(
            Request::parse(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
            Err(HandshakeError::Malformed(_))
        ));
    }
}
