//! HTTP/1.1 heads, parsed with `httparse`.

use super::HandshakeError;

/// Largest request or response head accepted, in bytes.
pub const MAX_HEAD_SIZE: usize = 16 * 1024;

/// Most header lines accepted in a head.
pub const MAX_HEADERS: usize = 64;

/// Whether `s` is an HTTP token (RFC 9110 section 5.6.2), as header names
/// and subprotocols are.
pub(super) fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Whether `s` may be written as a header value (RFC 9110 section 5.5): no
/// control character but HTAB, so no CR, LF or NUL to end the line early.
pub(super) fn is_field_value(s: &str) -> bool {
    s.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

/// Checks a header line we are about to write.
pub(super) fn check_header_line(name: &str, value: &str) -> Result<(), HandshakeError> {
    if !is_token(name) {
        return Err(HandshakeError::InvalidHeadField("header name"));
    }
    if !is_field_value(value) {
        return Err(HandshakeError::InvalidHeadField("header value"));
    }
    Ok(())
}

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

    /// The value of a header that must not appear more than once, trimmed:
    /// fails with [`HandshakeError::RepeatedHeader`] when it does.
    pub(super) fn single(&self, name: &'static str) -> Result<Single<'_>, HandshakeError> {
        let mut values = self
            .0
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v);
        match (values.next(), values.next()) {
            (None, _) => Ok(Single::Absent),
            (Some(_), Some(_)) => Err(HandshakeError::RepeatedHeader(name)),
            (Some(v), None) => Ok(match std::str::from_utf8(v) {
                Ok(v) => Single::Text(v.trim()),
                Err(_) => Single::NotUtf8,
            }),
        }
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

/// A header that may appear once, as found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Single<'a> {
    /// Not there.
    Absent,
    /// There once, with this value.
    Text(&'a str),
    /// There once, with a value that is not UTF-8.
    NotUtf8,
}

impl<'a> Single<'a> {
    /// The value, if present and UTF-8.
    pub(super) fn text(self) -> Option<&'a str> {
        match self {
            Single::Text(v) => Some(v),
            Single::Absent | Single::NotUtf8 => None,
        }
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

/// Finds where a head arriving in pieces ends, looking at each byte once,
/// so that it is parsed when that may give an answer rather than after
/// every read: on the first bytes, once the head is complete and, for a
/// request ([`HeadScan::per_line`]), after a read that ended a line (a
/// malformed line is refused then, not at the timeout). A head has at most
/// [`MAX_HEADERS`] + 1 lines before it fails, so a request sent a byte at a
/// time is parsed at most that many times more than one sent whole.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct HeadScan {
    /// How far the buffer was searched for the end of the head.
    scanned: usize,
    /// Where the first line starts, once a byte other than CR or LF came.
    first_line: Option<usize>,
    /// Whether the first bytes were parsed (to fail garbage early).
    started: bool,
    /// Whether the end of the head was found.
    ended: bool,
    /// Whether to parse after each read that ends a line.
    per_line: bool,
}

impl HeadScan {
    /// A scan that also answers "worth parsing" after each read that ends
    /// a line: a server refuses a malformed request line or header at once
    /// rather than when its timeout for the head runs out.
    pub(super) fn per_line() -> Self {
        HeadScan {
            per_line: true,
            ..HeadScan::default()
        }
    }

    /// Whether parsing `buf`, the bytes given last time with more appended,
    /// may give an answer: on the first bytes (garbage, a TLS handshake say,
    /// fails at once), once an empty line ends the head, once `buf` is too
    /// long to hold a head and, [`HeadScan::per_line`], when new bytes end a
    /// line (a malformed request line or header fails then).
    pub(super) fn worth_parsing(&mut self, buf: &[u8]) -> bool {
        if buf.len() < self.scanned {
            // Not the same buffer: start over.
            *self = HeadScan {
                per_line: self.per_line,
                ..HeadScan::default()
            };
        }
        if buf.is_empty() {
            return false;
        }
        if !std::mem::replace(&mut self.started, true) || self.ended || buf.len() >= MAX_HEAD_SIZE {
            return true;
        }
        let scanned = std::mem::replace(&mut self.scanned, buf.len());
        // httparse skips empty lines before the first line: the head ends at
        // the first empty line after a byte that is not CR or LF.
        let first = match self.first_line {
            Some(first) => first,
            None => match buf[scanned..]
                .iter()
                .position(|&b| b != b'\r' && b != b'\n')
            {
                Some(i) => *self.first_line.insert(scanned + i),
                None => return false,
            },
        };
        // A line ends with LF or CRLF, so the head ends with LF then LF or
        // CRLF; the last two bytes scanned before may start that pattern.
        let from = scanned.saturating_sub(2).max(first);
        let line_ended = self.per_line && buf[scanned.max(first)..].contains(&b'\n');
        self.ended = (from..buf.len()).any(|i| {
            buf[i] == b'\n'
                && match buf.get(i + 1) {
                    Some(b'\n') => true,
                    Some(b'\r') => buf.get(i + 2) == Some(&b'\n'),
                    _ => false,
                }
        });
        self.ended || line_ended
    }
}

/// Parses a request head that arrives in pieces: give
/// [`RequestParser::parse`] the bytes read so far after every read. The head
/// is parsed only after the first read, after a read that ends a line, and
/// once its end (an empty line) has arrived, each byte being searched once:
/// a malformed line is refused as soon as it ends, and a head sent a byte
/// at a time is parsed once per line.
///
/// ```
/// use walkie_proto::handshake::RequestParser;
///
/// let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
/// let mut parser = RequestParser::new();
/// for end in 1..head.len() {
///     assert_eq!(parser.parse(&head[..end]), Ok(None));
/// }
/// let (request, len) = parser.parse(head).unwrap().unwrap();
/// assert_eq!((request.target.as_str(), len), ("/", head.len()));
/// ```
#[derive(Debug, Clone)]
pub struct RequestParser {
    scan: HeadScan,
}

impl Default for RequestParser {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestParser {
    /// A parser that has seen nothing yet.
    pub fn new() -> Self {
        RequestParser {
            scan: HeadScan::per_line(),
        }
    }

    /// Parses a request head from the front of `buf`, which holds the bytes
    /// given to the previous call with new ones appended.
    ///
    /// Returns what [`Request::parse`] returns, but calls it only when it
    /// may give an answer: `Ok(None)` until the whole head is in `buf`.
    pub fn parse(&mut self, buf: &[u8]) -> Result<Option<(Request, usize)>, HandshakeError> {
        if !self.scan.worth_parsing(buf) {
            return Ok(None);
        }
        Request::parse(buf)
    }
}

impl Request {
    /// Parses a request head from the front of `buf`.
    ///
    /// Returns `Ok(None)` until the whole head (ending with an empty line) is
    /// in `buf`, then the request and the head's length; bytes after it belong
    /// to the connection that follows. A head larger than [`MAX_HEAD_SIZE`]
    /// fails as soon as that many bytes have arrived without an end.
    ///
    /// Each call parses `buf` from its start: to read a head that arrives in
    /// pieces, use a [`RequestParser`].
    pub fn parse(buf: &[u8]) -> Result<Option<(Request, usize)>, HandshakeError> {
        #[cfg(test)]
        tests::PARSES.with(|n| n.set(n.get() + 1));
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
    /// Parses a response head, as [`RequestParser::parse`] does a request's.
    pub(super) fn parse_scanned(
        scan: &mut HeadScan,
        buf: &[u8],
    ) -> Result<Option<(ResponseHead, usize)>, HandshakeError> {
        if !scan.worth_parsing(buf) {
            return Ok(None);
        }
        ResponseHead::parse(buf)
    }

    pub(super) fn parse(buf: &[u8]) -> Result<Option<(ResponseHead, usize)>, HandshakeError> {
        #[cfg(test)]
        tests::PARSES.with(|n| n.set(n.get() + 1));
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
pub(super) mod tests {
    use super::*;

    thread_local! {
        /// How many heads this thread parsed with httparse.
        pub(in crate::handshake) static PARSES: std::cell::Cell<usize> =
            const { std::cell::Cell::new(0) };
    }

    /// How many heads `f` parsed with httparse.
    pub(in crate::handshake) fn parses(f: impl FnOnce()) -> usize {
        let before = PARSES.with(std::cell::Cell::get);
        f();
        PARSES.with(std::cell::Cell::get) - before
    }

    /// A valid request head of about `size` bytes.
    fn big_head(size: usize) -> Vec<u8> {
        let mut head = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
        while head.len() < size - 100 {
            head.extend_from_slice(format!("X-Pad: {}\r\n", "a".repeat(1000)).as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        head
    }

    #[test]
    fn a_head_sent_a_byte_at_a_time_is_parsed_once_per_line() {
        let head = big_head(MAX_HEAD_SIZE - 200);
        let mut parser = RequestParser::new();
        let n = parses(|| {
            for end in 0..head.len() {
                assert_eq!(parser.parse(&head[..end]), Ok(None), "end {end}");
            }
            let (req, len) = parser.parse(&head).unwrap().unwrap();
            assert_eq!((req.target.as_str(), len), ("/", head.len()));
        });
        // The first byte (to fail garbage early), the end of each line (to
        // fail a malformed one early), and the end of the head, which ends
        // a line too.
        let lines = head.iter().filter(|&&b| b == b'\n').count();
        assert_eq!(n, 1 + lines);
    }

    #[test]
    fn a_malformed_line_fails_once_it_ends_not_when_the_head_does() {
        for (head, at) in [
            (
                &b"GET / HTTP/1.1\r\nHost: a\r\nNo colon here\r\n"[..],
                "header",
            ),
            (&b"GET / HTTQ/1.1\r\n"[..], "version"),
        ] {
            let mut parser = RequestParser::new();
            let mut failed = None;
            for end in 1..=head.len() {
                if let Err(e) = parser.parse(&head[..end]) {
                    failed = Some((end, e));
                    break;
                }
            }
            // Refused although the head never ends: once the line has.
            let (end, e) = failed.unwrap_or_else(|| panic!("{at}: no answer"));
            assert!(matches!(e, HandshakeError::Malformed(_)), "{at}: {e:?}");
            assert!(end <= head.len(), "{at}");
        }
        // A whole head in one read is still parsed once.
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        let mut parser = RequestParser::new();
        assert_eq!(parses(|| assert!(parser.parse(head).unwrap().is_some())), 1);
    }

    #[test]
    fn empty_lines_before_the_head_do_not_end_it() {
        // httparse skips them; each would look like the end of a head.
        let mut wire = b"\r\n\n".repeat(2000);
        wire.extend_from_slice(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        let mut parser = RequestParser::new();
        let n = parses(|| {
            for end in 0..wire.len() {
                assert_eq!(parser.parse(&wire[..end]), Ok(None), "end {end}");
            }
            assert_eq!(parser.parse(&wire).unwrap().unwrap().1, wire.len());
        });
        // The first byte, then the end of each of the head's three lines
        // (the last one empty); none of the empty lines before it.
        assert_eq!(n, 4);
    }

    #[test]
    fn the_parser_finds_every_line_ending() {
        for head in [
            &b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"[..],
            b"GET / HTTP/1.1\nHost: a\n\n",
            b"GET / HTTP/1.1\nHost: a\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n\n",
            b"\r\nGET / HTTP/1.1\r\n\r\n",
        ] {
            let mut wire = head.to_vec();
            wire.extend_from_slice(b"\x81\x80");
            // Every split into two reads.
            for cut in 1..wire.len() {
                let mut parser = RequestParser::new();
                let first = parser.parse(&wire[..cut]).unwrap();
                let got = match first {
                    Some(done) => done,
                    None => parser.parse(&wire).unwrap().unwrap(),
                };
                assert_eq!(
                    got,
                    Request::parse(&wire).unwrap().unwrap(),
                    "{head:?} {cut}"
                );
                assert_eq!(got.1, head.len());
            }
            // And a byte at a time.
            let mut parser = RequestParser::new();
            let mut end = 0;
            let got = loop {
                end += 1;
                if let Some(done) = parser.parse(&wire[..end]).unwrap() {
                    break done;
                }
            };
            assert_eq!((end, got.1), (head.len(), head.len()), "{head:?}");
            // Asked again, it answers again.
            assert_eq!(parser.parse(&wire).unwrap(), Some(got));
        }
    }

    #[test]
    fn the_parser_fails_garbage_and_oversized_heads() {
        let mut parser = RequestParser::new();
        assert!(matches!(
            parser.parse(b"\x16\x03\x01\x02\x00"),
            Err(HandshakeError::Malformed(_))
        ));
        let mut head = b"GET / HTTP/1.1\r\n".to_vec();
        while head.len() < MAX_HEAD_SIZE {
            head.extend_from_slice(b"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        let mut parser = RequestParser::new();
        let mut result = Ok(None);
        for end in 1..=head.len() {
            result = parser.parse(&head[..end]);
            if result != Ok(None) {
                break;
            }
        }
        assert_eq!(result, Err(HandshakeError::HeadTooLarge));
    }

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
