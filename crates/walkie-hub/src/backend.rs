//! What a trusted backend may do (the HTTP API): publish, broadcast, read
//! history and presence, disconnect a user. No per-user permission checks:
//! the caller proved who it is with the API key. Namespaces and their
//! limits still apply. Results and errors use the protocol's shapes.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::channel::ChannelName;
use crate::config::NamespaceConfig;
use crate::presence::PresenceStats;
use crate::protocol::{self, ErrorCode, Position, ReplyError};
use crate::publication::{
    HistoryFilter, Kind, NewPublication, PublishOptions, PublishRequest, PublishResult,
};
use crate::session::{MAX_HISTORY_LIMIT, Node};

/// Most channels in one broadcast.
pub const MAX_BROADCAST: usize = 1000;

pub(crate) fn err(code: ErrorCode, message: impl Into<String>) -> ReplyError {
    ReplyError::new(code, message)
}

/// An engine failure, logged; the client is told only to retry.
pub(crate) fn internal(e: impl std::fmt::Display) -> ReplyError {
    tracing::warn!("engine failed: {e}");
    err(ErrorCode::Internal, "internal error; try again")
}

/// `publish`'s parameters.
#[derive(Debug, Deserialize)]
pub struct Publish {
    /// The channel.
    pub channel: String,
    /// Any JSON value.
    pub data: Value,
    /// See the protocol's `publish`.
    pub idempotency_key: Option<String>,
    /// See the protocol's `publish`.
    pub key: Option<String>,
}

/// `broadcast`'s parameters.
#[derive(Debug, Deserialize)]
pub struct Broadcast {
    /// The channels.
    pub channels: Vec<String>,
    /// Any JSON value.
    pub data: Value,
}

/// `presence`'s and `presence_stats`' parameters.
#[derive(Debug, Deserialize)]
pub struct ChannelOnly {
    /// The channel.
    pub channel: String,
}

/// `history`'s parameters.
#[derive(Debug, Deserialize)]
pub struct History {
    /// The channel.
    pub channel: String,
    /// Only messages after this position (ignored if from another epoch).
    pub since: Option<Position>,
    /// At most this many (default and maximum 1000).
    pub limit: Option<usize>,
    /// Newest first.
    #[serde(default)]
    pub reverse: bool,
}

/// `disconnect`'s parameters.
#[derive(Debug, Deserialize)]
pub struct Disconnect {
    /// The user whose connections to close.
    pub user: String,
}

/// Longest idempotency key and state key, in bytes.
pub(crate) const MAX_KEY_LEN: usize = 64;

/// `name`, checked as a channel name, or 102 naming what is wrong (and at
/// most the name's first 64 characters: it may be megabytes long).
pub(crate) fn channel_name(name: &str) -> Result<ChannelName, ReplyError> {
    ChannelName::new(name).map_err(|e| {
        let shown: String = name.chars().take(64).collect();
        let more = if shown.len() < name.len() { "..." } else { "" };
        err(ErrorCode::UnknownChannel, format!("`{shown}{more}`: {e}"))
    })
}

/// The channel and its namespace, or 102.
pub(crate) fn channel(
    node: &Node,
    name: &str,
) -> Result<(ChannelName, NamespaceConfig), ReplyError> {
    let channel = channel_name(name)?;
    let ns = node.config.namespace(&channel).cloned().ok_or_else(|| {
        let which = channel.namespace().unwrap_or("(default)");
        err(
            ErrorCode::UnknownChannel,
            format!("no namespace `{which}` on this server"),
        )
    })?;
    Ok((channel, ns))
}

/// Publishes to one channel.
pub async fn publish(node: &Node, p: Publish) -> Result<Value, ReplyError> {
    let (channel, ns) = channel(node, &p.channel)?;
    publish_in(node, channel, &ns, p, Publisher::Api).await
}

/// Who publishes: the HTTP API (the backend), or a client as a user, with
/// its `info`. Idempotency keys are each publisher's own: a client cannot
/// make the backend's publish, or another user's, look like a repeat by
/// using its key first. Anonymous clients are one publisher (user `""`):
/// their keys must be unguessable, and a retry after a reconnect (a new
/// client id) still finds its key.
pub(crate) enum Publisher<'a> {
    Api,
    User { user: &'a str, info: Bytes },
}

impl Publisher<'_> {
    /// `key` as stored: prefixed with the publisher (a user's name with
    /// its length, so that no two users' keys can be confused).
    fn scoped(&self, key: &str) -> String {
        match self {
            Publisher::Api => format!("api:{key}"),
            Publisher::User { user, .. } => format!("user{}:{user}:{key}", user.len()),
        }
    }
}

/// Publishes to a channel already resolved (and, for clients, checked),
/// with the publisher's `info` if known: the namespace's limits apply.
pub(crate) async fn publish_in(
    node: &Node,
    channel: ChannelName,
    ns: &NamespaceConfig,
    p: Publish,
    publisher: Publisher<'_>,
) -> Result<Value, ReplyError> {
    let data = Bytes::from(p.data.to_string());
    let r = prepare_publish(channel, ns, p, data, publisher)?;
    let r = node
        .hub
        .publish(r.channel, r.publication, r.options)
        .await
        .map_err(internal)?;
    Ok(published_reply(&r))
}

/// `publish`'s reply.
pub(crate) fn published_reply(r: &PublishResult) -> Value {
    json!({"offset": r.position.offset, "epoch": &*r.position.epoch, "duplicate": r.suppressed})
}

/// Checks a publish against the namespace's limits and makes the request
/// for the engine; `data` is `p`'s data as JSON text (`p.data` is not
/// read: a broadcast serialises its data once for every channel).
pub(crate) fn prepare_publish(
    channel: ChannelName,
    ns: &NamespaceConfig,
    p: Publish,
    data: Bytes,
    publisher: Publisher<'_>,
) -> Result<PublishRequest, ReplyError> {
    for (name, key) in [("idempotency_key", &p.idempotency_key), ("key", &p.key)] {
        if key
            .as_ref()
            .is_some_and(|k| k.is_empty() || k.len() > MAX_KEY_LEN)
        {
            return Err(err(
                ErrorCode::BadRequest,
                format!("publish: {name} has 1 to {MAX_KEY_LEN} bytes"),
            ));
        }
    }
    if p.key.is_some() && ns.overflow != crate::OverflowPolicy::LatestPerKey {
        return Err(err(
            ErrorCode::BadRequest,
            format!(
                "publish: `key` is for namespaces with overflow = \"latest_per_key\", not {channel}"
            ),
        ));
    }
    if data.len() > ns.max_message_size {
        return Err(err(
            ErrorCode::MessageTooLarge,
            format!(
                "{} bytes; {channel} takes at most {}",
                data.len(),
                ns.max_message_size
            ),
        ));
    }
    let publication = NewPublication {
        data,
        kind: Kind::Json,
        key: p.key.map(Into::into),
        info: match &publisher {
            Publisher::Api => None,
            Publisher::User { info, .. } => Some(info.clone()),
        },
    };
    let options = PublishOptions {
        history: ns.history(),
        idempotency_key: p.idempotency_key.map(|k| publisher.scoped(&k)),
        ..PublishOptions::default()
    };
    Ok(PublishRequest {
        channel,
        publication,
        options,
    })
}

/// Publishes one message to many channels; each gets its own result.
pub async fn broadcast(node: &Node, b: Broadcast) -> Result<Value, ReplyError> {
    if b.channels.is_empty() || b.channels.len() > MAX_BROADCAST {
        return Err(err(
            ErrorCode::BadRequest,
            format!("give 1 to {MAX_BROADCAST} channels"),
        ));
    }
    // Every channel's publish goes to the engine in one batch: on the
    // durable engine, one commit for all of them instead of one each.
    let mut results: Vec<Option<Value>> = Vec::with_capacity(b.channels.len());
    let mut places = Vec::new();
    let mut requests = Vec::new();
    // One copy of the data, shared by every channel's publication.
    let data = Bytes::from(b.data.to_string());
    for name in &b.channels {
        let one = Publish {
            channel: name.clone(),
            data: Value::Null,
            idempotency_key: None,
            key: None,
        };
        let prepared = channel(node, name).and_then(|(channel, ns)| {
            prepare_publish(channel, &ns, one, data.clone(), Publisher::Api)
        });
        match prepared {
            Ok(request) => {
                places.push(results.len());
                requests.push(request);
                results.push(None);
            }
            Err(e) => results.push(Some(failed(name, &e))),
        }
    }
    let published = node.hub.publish_many(requests).await;
    debug_assert_eq!(published.len(), places.len(), "one result per publish");
    for (at, result) in places.into_iter().zip(published) {
        let name = &b.channels[at];
        results[at] = Some(match result {
            Ok(r) => {
                let mut r = published_reply(&r);
                r["channel"] = json!(name);
                r
            }
            Err(e) => failed(name, &internal(e)),
        });
    }
    let results: Vec<Value> = results.into_iter().flatten().collect();
    Ok(json!({ "results": results }))
}

/// One channel's error in `broadcast`'s results.
fn failed(name: &str, e: &ReplyError) -> Value {
    json!({"channel": name, "error": {"code": e.code as u16, "message": e.message}})
}

/// A channel's history.
pub async fn history(node: &Node, h: History) -> Result<Value, ReplyError> {
    let (channel, ns) = channel(node, &h.channel)?;
    history_in(node, channel, &ns, h).await
}

/// A resolved channel's history. An offset from another epoch means
/// nothing in this one: it is ignored.
pub(crate) async fn history_in(
    node: &Node,
    channel: ChannelName,
    ns: &NamespaceConfig,
    h: History,
) -> Result<Value, ReplyError> {
    if ns.history().is_none() {
        return Err(err(
            ErrorCode::NotAvailable,
            format!("{channel} keeps no history"),
        ));
    }
    let current = node
        .hub
        .history(
            channel.clone(),
            HistoryFilter {
                since: None,
                limit: Some(0),
                reverse: false,
            },
        )
        .await
        .map_err(internal)?;
    let since = h
        .since
        .filter(|s| *s.epoch == *current.position.epoch)
        .map(|s| s.offset);
    let limit = h.limit.unwrap_or(MAX_HISTORY_LIMIT).min(MAX_HISTORY_LIMIT);
    let read = node
        .hub
        .history(
            channel,
            HistoryFilter {
                since,
                limit: Some(limit),
                reverse: h.reverse,
            },
        )
        .await
        .map_err(internal)?;
    // One reply holds them all: at most a client queue's bytes of payload
    // (at least one message), so that a page of big messages cannot make
    // a reply of hundreds of megabytes. The client asks again from the
    // last offset it got.
    let mut bytes = 0;
    let publications: Vec<Value> = read
        .publications
        .iter()
        .enumerate()
        .take_while(|(i, p)| {
            bytes += p.data.len() + p.info.as_ref().map_or(0, |i| i.len());
            *i == 0 || bytes <= node.queue.bytes
        })
        .map(|(_, p)| protocol::history_entry(p))
        .collect();
    Ok(json!({
        "offset": read.position.offset,
        "epoch": &*read.position.epoch,
        "publications": publications,
    }))
}

/// Who is in a channel (`stats`: only the counts).
pub async fn presence(node: &Node, c: ChannelOnly, stats: bool) -> Result<Value, ReplyError> {
    let (channel, ns) = channel(node, &c.channel)?;
    presence_in(node, channel, &ns, stats).await
}

/// A resolved channel's presence.
pub(crate) async fn presence_in(
    node: &Node,
    channel: ChannelName,
    ns: &NamespaceConfig,
    stats: bool,
) -> Result<Value, ReplyError> {
    if !ns.presence {
        return Err(err(
            ErrorCode::NotAvailable,
            format!("{channel} keeps no presence"),
        ));
    }
    let clients = node
        .hub
        .presence()
        .presence(channel)
        .await
        .map_err(internal)?;
    if stats {
        let s = PresenceStats::of(&clients);
        return Ok(json!({"clients": s.clients, "users": s.users}));
    }
    Ok(crate::presence::presence_json(clients))
}

/// Closes every connection of a user (close code 4009): on this node at
/// once, on the other nodes of a shared engine through its control
/// channel. Returns how many were closed on this node.
pub async fn disconnect(node: &Node, d: Disconnect) -> Result<Value, ReplyError> {
    if d.user.is_empty() {
        return Err(err(ErrorCode::BadRequest, "give a user"));
    }
    let n = node
        .hub
        .disconnect_user_everywhere(&d.user)
        .await
        .map_err(internal)?;
    Ok(json!({ "disconnected": n }))
}
