//! Arbitrary bytes into the server side of the opening handshake:
//! `Request::parse`, then `upgrade()` and `accept(...)` with a default
//! `DeflateConfig`, or the error response.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walkie_proto::DeflateConfig;
use walkie_proto::extension::parse_extensions;
use walkie_proto::handshake::{HandshakeError, MAX_HEAD_SIZE, Request, accept_key};

fn check_error_response(err: &HandshakeError) {
    let response = err.response();
    assert!(
        response.starts_with(b"HTTP/1.1 4"),
        "{err:?}: {:?}",
        String::from_utf8_lossy(&response)
    );
    // The error response is itself a complete, well-formed HTTP head.
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut parsed = httparse::Response::new(&mut headers);
    assert!(matches!(
        parsed.parse(&response),
        Ok(httparse::Status::Complete(_))
    ));
    assert_eq!(parsed.code, Some(err.status()));
}

fuzz_target!(|data: &[u8]| {
    let (request, len) = match Request::parse(data) {
        Ok(Some(parsed)) => parsed,
        Ok(None) => {
            assert!(data.len() < MAX_HEAD_SIZE);
            return;
        }
        Err(err) => return check_error_response(&err),
    };
    assert!(len <= data.len() && len <= MAX_HEAD_SIZE);
    let _ = (request.path(), request.query(), request.origin());
    let _ = request.is_websocket_upgrade();

    let upgrade = match request.upgrade() {
        Ok(upgrade) => upgrade,
        Err(err) => return check_error_response(&err),
    };
    // Pick the client's first subprotocol, if any.
    let offered: Vec<&str> = upgrade.protocols().iter().map(String::as_str).collect();
    let chosen = upgrade.select_protocol(&offered);
    assert_eq!(chosen, offered.first().copied());

    let deflate = DeflateConfig::default();
    // `upgrade()` refused protocols that are not tokens, and there are no
    // extra headers: nothing here can be refused.
    let accepted = upgrade
        .accept(chosen, Some(&deflate), &[])
        .expect("an upgrade's own protocol, no extra headers");
    assert_eq!(accepted.protocol.as_deref(), chosen);
    assert_eq!(
        accepted.deflate.is_some(),
        deflate.accept_offer(upgrade.extensions()).is_some()
    );

    // Our own response, checked without the client side of the crate.
    let response = &accepted.response;
    assert!(response.starts_with(b"HTTP/1.1 101 "));
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut parsed = httparse::Response::new(&mut headers);
    // The head is complete and is all of the response: no header injection.
    assert_eq!(
        parsed.parse(response),
        Ok(httparse::Status::Complete(response.len()))
    );
    assert_eq!(parsed.code, Some(101));
    let header = |name: &str| {
        parsed
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| std::str::from_utf8(h.value).expect("header values are ASCII"))
    };
    let key = request
        .headers
        .get("sec-websocket-key")
        .expect("an accepted request has a key");
    assert_eq!(
        header("sec-websocket-accept"),
        Some(accept_key(key.as_bytes()).as_str())
    );
    assert_eq!(header("sec-websocket-protocol"), chosen);
    match (header("sec-websocket-extensions"), &accepted.deflate) {
        (None, None) => {}
        (Some(value), Some(params)) => {
            assert_eq!(value, params.response_header());
            let exts = parse_extensions(value).expect("our extension header parses");
            assert_eq!(exts.len(), 1);
            assert_eq!(exts[0].name, "permessage-deflate");
        }
        (value, params) => panic!("extension header {value:?} vs params {params:?}"),
    }
});
