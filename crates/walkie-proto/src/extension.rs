//! The `Sec-WebSocket-Extensions` header grammar (RFC 6455 section 9.1).
//!
//! ```text
//! extension-list = 1#extension
//! extension      = name *( ";" param )
//! param          = token [ "=" (token | quoted-string) ]
//! ```

/// One extension with its parameters, as offered or accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    /// The extension token, e.g. `permessage-deflate`.
    pub name: String,
    /// Parameters in order; a parameter without `=` has no value.
    pub params: Vec<(String, Option<String>)>,
}

/// The header value is not a valid extension list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed Sec-WebSocket-Extensions header")]
pub struct MalformedExtensions;

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Parses one header value into its extensions. Several header lines are
/// parsed one by one and concatenated by the caller.
pub fn parse_extensions(value: &str) -> Result<Vec<Extension>, MalformedExtensions> {
    let mut out = Vec::new();
    for item in value.split(',') {
        let item = item.trim();
        if item.is_empty() {
            // "1#" lists tolerate empty elements (RFC 9110 section 5.6.1).
            continue;
        }
        let mut parts = item.split(';');
        let name = parts.next().unwrap_or_default().trim();
        if !is_token(name) {
            return Err(MalformedExtensions);
        }
        let mut params = Vec::new();
        for param in parts {
            let (key, value) = match param.split_once('=') {
                Some((k, v)) => (k.trim(), Some(v.trim())),
                None => (param.trim(), None),
            };
            if !is_token(key) {
                return Err(MalformedExtensions);
            }
            let value = match value {
                None => None,
                Some(v) => {
                    let v = match v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
                        Some(inner) => inner,
                        None => v,
                    };
                    if !is_token(v) {
                        return Err(MalformedExtensions);
                    }
                    Some(v.to_owned())
                }
            };
            params.push((key.to_ascii_lowercase(), value));
        }
        out.push(Extension {
            name: name.to_ascii_lowercase(),
            params,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_offers_with_params() {
        let exts = parse_extensions(
            "permessage-deflate; client_max_window_bits; server_max_window_bits=\"10\", foo",
        )
        .unwrap();
        assert_eq!(exts.len(), 2);
        assert_eq!(exts[0].name, "permessage-deflate");
        assert_eq!(
            exts[0].params,
            vec![
                ("client_max_window_bits".into(), None),
                ("server_max_window_bits".into(), Some("10".into()))
            ]
        );
        assert_eq!(exts[1].name, "foo");
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(parse_extensions("a b"), Err(MalformedExtensions));
        assert_eq!(parse_extensions("x; =3"), Err(MalformedExtensions));
        assert_eq!(parse_extensions("x; y=\"a b\""), Err(MalformedExtensions));
    }
}
