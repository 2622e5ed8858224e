//! The Walkie protocol's wire format (`docs/protocol.md`): commands in,
//! replies and pushes out, each one JSON object in a text message.

use base64::Engine as _;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use crate::channel::ChannelName;
use crate::publication::{Kind, Publication};

/// The subprotocol name a client offers.
pub const SUBPROTOCOL: &str = "walkie.v1";

/// Error codes in replies, stable across versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// The engine failed: retry later.
    Internal = 100,
    /// Not allowed for this connection (bad or missing token).
    Unauthorized = 101,
    /// No such namespace, or an invalid channel name.
    UnknownChannel = 102,
    /// Not allowed in this channel.
    PermissionDenied = 103,
    /// No such method.
    MethodNotFound = 104,
    /// Subscribed already.
    AlreadySubscribed = 105,
    /// Too many subscriptions.
    LimitExceeded = 106,
    /// A malformed or missing field.
    BadRequest = 107,
    /// The namespace has this feature off.
    NotAvailable = 108,
    /// The token expired.
    TokenExpired = 109,
    /// `connect` must come first.
    NotConnected = 110,
    /// `connect` was sent twice.
    AlreadyConnected = 111,
    /// The message is too large for the namespace.
    MessageTooLarge = 112,
    /// Not subscribed to that channel.
    NotSubscribed = 113,
    /// Over the connection's publish rate limit: retry in the next second.
    TooManyRequests = 114,
}

/// An error reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyError {
    /// Its code.
    pub code: ErrorCode,
    /// What went wrong, for people.
    pub message: String,
}

impl ReplyError {
    /// An error with a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ReplyError {
            code,
            message: message.into(),
        }
    }
}

/// A parsed command: its id, method name and parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// The client's id for the reply.
    pub id: u64,
    /// The method key.
    pub method: String,
    /// Its parameters (an object).
    pub params: Value,
}

/// Why a message is not a command at all (the connection is closed with
/// 4000: there is no id to reply to).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NotACommand(pub String);

/// Parses one message into a command.
pub fn parse(text: &str) -> Result<Command, NotACommand> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| NotACommand(format!("not JSON: {e}")))?;
    let Value::Object(mut obj) = value else {
        return Err(NotACommand("a command is a JSON object".into()));
    };
    let id = obj
        .remove("id")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| NotACommand("a command needs an unsigned integer `id`".into()))?;
    let mut methods = obj.into_iter();
    let Some((method, params)) = methods.next() else {
        return Err(NotACommand("a command needs a method key".into()));
    };
    if methods.next().is_some() {
        return Err(NotACommand("a command has exactly one method key".into()));
    }
    Ok(Command { id, method, params })
}

impl Command {
    /// The parameters as `T`, or a 107 error naming what is wrong: they
    /// are an object (`null` counts as an empty one). Read in place: a
    /// publish's data is not copied to be read.
    pub fn params<T: DeserializeOwned>(&self) -> Result<T, ReplyError> {
        let read = match &self.params {
            Value::Null => T::deserialize(&Value::Object(Map::new())),
            Value::Object(_) => T::deserialize(&self.params),
            // serde would read a struct from an array of its fields.
            _ => {
                return Err(ReplyError::new(
                    ErrorCode::BadRequest,
                    format!("{}: the parameters must be a JSON object", self.method),
                ));
            }
        };
        read.map_err(|e| ReplyError::new(ErrorCode::BadRequest, format!("{}: {e}", self.method)))
    }
}

/// A success reply.
pub fn reply(id: u64, result: Value) -> String {
    json!({ "id": id, "result": result }).to_string()
}

/// An error reply.
pub fn reply_error(id: u64, error: &ReplyError) -> String {
    json!({ "id": id, "error": { "code": error.code as u16, "message": error.message } })
        .to_string()
}

/// Appends `,"name":<raw JSON>` to `out`, if `raw` is valid JSON text (it
/// is: engines keep what the hub validated).
fn push_raw(out: &mut String, name: &str, raw: &[u8]) {
    if let Ok(raw) = std::str::from_utf8(raw) {
        out.push_str(",\"");
        out.push_str(name);
        out.push_str("\":");
        out.push_str(raw);
    }
}

/// The push that carries `publication` on `channel`: built once per
/// publication and shared by every subscriber.
pub fn push(channel: &ChannelName, publication: &Publication) -> String {
    let name = Value::String(channel.as_str().to_owned()).to_string();
    let mut out = String::with_capacity(64 + publication.data.len());
    match publication.kind {
        Kind::Join | Kind::Leave => {
            out.push_str(if publication.kind == Kind::Join {
                "{\"join\":{\"channel\":"
            } else {
                "{\"leave\":{\"channel\":"
            });
            out.push_str(&name);
            push_raw(&mut out, "info", &publication.data);
        }
        kind => {
            out.push_str("{\"pub\":{\"channel\":");
            out.push_str(&name);
            out.push_str(",\"offset\":");
            out.push_str(&publication.offset.to_string());
            match kind {
                Kind::Json => push_raw(&mut out, "data", &publication.data),
                Kind::Text => {
                    let text = String::from_utf8_lossy(&publication.data);
                    out.push_str(",\"text\":");
                    out.push_str(&Value::String(text.into_owned()).to_string());
                }
                _ => {
                    out.push_str(",\"base64\":\"");
                    out.push_str(
                        &base64::engine::general_purpose::STANDARD.encode(&publication.data),
                    );
                    out.push('"');
                }
            }
            if let Some(info) = &publication.info {
                push_raw(&mut out, "info", info);
            }
            if let Some(key) = &publication.key {
                out.push_str(",\"key\":");
                out.push_str(&Value::String(key.to_string()).to_string());
            }
        }
    }
    out.push_str("}}");
    out
}

/// A publication as listed in a `history` reply: the `pub` push's fields
/// without the channel.
pub fn history_entry(publication: &Publication) -> Value {
    let mut entry = Map::new();
    entry.insert("offset".into(), publication.offset.into());
    let parse = |raw: &[u8]| serde_json::from_slice::<Value>(raw).unwrap_or(Value::Null);
    match publication.kind {
        Kind::Json => {
            entry.insert("data".into(), parse(&publication.data));
        }
        Kind::Binary => {
            let b64 = base64::engine::general_purpose::STANDARD.encode(&publication.data);
            entry.insert("base64".into(), b64.into());
        }
        _ => {
            let text = String::from_utf8_lossy(&publication.data).into_owned();
            entry.insert("text".into(), text.into());
        }
    }
    if let Some(info) = &publication.info {
        entry.insert("info".into(), parse(info));
    }
    if let Some(key) = &publication.key {
        entry.insert("key".into(), key.to_string().into());
    }
    Value::Object(entry)
}

/// A stream position as in replies.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Position {
    /// The offset.
    pub offset: u64,
    /// The epoch.
    pub epoch: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn publication(kind: Kind, data: &'static [u8]) -> Publication {
        Publication {
            offset: 7,
            data: Bytes::from_static(data),
            kind,
            info: Some(Bytes::from_static(br#"{"user":"42","client":"c1"}"#)),
            time_ms: 0,
            key: None,
        }
    }

    #[test]
    fn commands_parse_and_malformed_ones_are_not_commands() {
        let c = parse(r#"{"id":3,"subscribe":{"channel":"chat:a"}}"#).unwrap();
        assert_eq!((c.id, c.method.as_str()), (3, "subscribe"));
        for bad in [
            "nope",
            "[]",
            r#"{"subscribe":{}}"#,
            r#"{"id":-1,"ping":{}}"#,
            r#"{"id":1}"#,
            r#"{"id":1,"ping":{},"pong":{}}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pushes_carry_each_kind_of_payload() {
        let ch = ChannelName::new("chat:\"q\"").unwrap();
        let v: Value =
            serde_json::from_str(&push(&ch, &publication(Kind::Json, br#"{"a":1}"#))).unwrap();
        assert_eq!(
            v,
            json!({"pub":{"channel":"chat:\"q\"","offset":7,"data":{"a":1},"info":{"user":"42","client":"c1"}}})
        );
        let v: Value =
            serde_json::from_str(&push(&ch, &publication(Kind::Text, b"hi \"x\""))).unwrap();
        assert_eq!(v["pub"]["text"], "hi \"x\"");
        let v: Value =
            serde_json::from_str(&push(&ch, &publication(Kind::Binary, &[0, 255]))).unwrap();
        assert_eq!(v["pub"]["base64"], "AP8=");
        let v: Value =
            serde_json::from_str(&push(&ch, &publication(Kind::Join, br#"{"user":"9"}"#))).unwrap();
        assert_eq!(
            v,
            json!({"join":{"channel":"chat:\"q\"","info":{"user":"9"}}})
        );
    }
}
