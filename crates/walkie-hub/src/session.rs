//! One connection speaking the Walkie protocol (`docs/protocol.md`): its
//! commands in, replies out; pushes go through its hub queue. No sockets:
//! the I/O layer hands in each text message and the time, sends the reply,
//! writes the queue, and closes when told to.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};
use walkie_proto::{Message, PreparedMessage};

use crate::auth::{AuthError, Identity, Verifier, channel_allowed};
use crate::backend::{self, err, internal};
use crate::channel::ChannelName;
use crate::config::{HubConfig, NamespaceConfig};
use crate::hub::{Client, Format, Hub, Recover};
use crate::metrics::Metrics;
use crate::presence::ClientInfo;
use crate::protocol::{self, Command, ErrorCode, ReplyError};
use crate::publication::{Kind, NewPublication, PublishOptions, StreamPosition};
use crate::queue::{QueueLimits, Queued};

/// Most subscriptions per connection.
pub const MAX_SUBSCRIPTIONS: usize = 256;
/// Most messages a `history` command returns.
pub const MAX_HISTORY_LIMIT: usize = 1000;
/// Seconds a connection has to send `connect`.
pub const CONNECT_TIMEOUT_SECS: u64 = 10;
/// The largest message taken before `connect` (close 1009 past it).
pub const MAX_BEFORE_CONNECT: usize = 64 * 1024;

/// What sessions of one node share.
#[derive(Debug)]
pub struct Node {
    /// The hub.
    pub hub: Hub,
    /// Auth and namespaces.
    pub config: HubConfig,
    /// Checks tokens.
    pub verifier: Verifier,
    /// Each connection's queue limits. Use
    /// [`OverflowPolicy::LatestPerKey`]: only messages published with a key
    /// (allowed only in `latest_per_key` namespaces) are collapsed; any
    /// other overflow disconnects.
    ///
    /// [`OverflowPolicy::LatestPerKey`]: crate::OverflowPolicy::LatestPerKey
    pub queue: QueueLimits,
    /// How often the server pings a quiet connection (`None`: it does not),
    /// told to clients in `connect`'s result.
    pub ping_interval: Option<std::time::Duration>,
    /// The most `publish` commands one connection may make per second of
    /// the clock (`None`: no limit); past it a publish is answered with
    /// error 114 and nothing is published (see [`PublishWindow`]).
    ///
    /// [`PublishWindow`]: crate::PublishWindow
    pub publish_rate: Option<std::num::NonZeroU32>,
}

/// How the server ends a connection: a close code and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReason {
    /// The WebSocket close code.
    pub code: u16,
    /// Why, for people.
    pub reason: String,
}

impl CloseReason {
    fn new(code: u16, reason: impl Into<String>) -> Self {
        CloseReason {
            code,
            reason: reason.into(),
        }
    }
}

/// One subscription's state.
#[derive(Debug)]
struct Sub {
    presence: bool,
    join_leave: bool,
    /// When its subscription token expires.
    expires_at: Option<u64>,
    /// Granted by a subscription token, not the connection's claims.
    by_token: bool,
    /// Its recovery is larger than the queue, and still being sent.
    catching_up: bool,
}

/// One Walkie protocol connection.
#[derive(Debug)]
pub struct Session {
    node: Arc<Node>,
    client: Client,
    /// Set by `connect`.
    identity: Option<Identity>,
    subs: HashMap<ChannelName, Sub>,
    /// When `connect` must have arrived by.
    connect_deadline: u64,
    /// Commands read and not handled yet (see [`Session::handle_next`]);
    /// boxed, as most connections never have any.
    backlog: Option<Box<Backlog>>,
}

/// Commands read together, waiting their turn.
#[derive(Debug, Default)]
struct Backlog {
    texts: std::collections::VecDeque<walkie_proto::Utf8Bytes>,
    /// A command parsed, to end a run of publishes, and not run yet.
    parsed: Option<Command>,
}

type Reply = Result<Value, ReplyError>;

#[derive(Deserialize)]
struct ConnectParams {
    token: Option<String>,
    name: Option<String>,
}

#[derive(Deserialize)]
struct SubscribeParams {
    channel: String,
    #[serde(default)]
    recover: bool,
    offset: Option<u64>,
    epoch: Option<String>,
    history: Option<usize>,
    token: Option<String>,
}

#[derive(Deserialize)]
struct RefreshParams {
    token: String,
}

fn position(p: &StreamPosition) -> Value {
    json!({ "offset": p.offset, "epoch": &*p.epoch })
}

/// Publishes `who`'s join or leave event on `channel`.
async fn announce(node: &Node, channel: &ChannelName, kind: Kind, who: &ClientInfo) {
    let data = Bytes::from(who.to_json().to_string());
    let event = NewPublication::new(kind, data);
    if let Err(e) = node
        .hub
        .publish(channel.clone(), event, PublishOptions::default())
        .await
    {
        tracing::warn!(%channel, "join/leave event lost: {e}");
    }
}

/// What leaving `channel` tells the others: `who`'s presence entry goes,
/// and its leave event is published, as `sub` asks.
async fn left(node: &Node, channel: &ChannelName, sub: &Sub, who: &ClientInfo) {
    if sub.presence {
        let removed = node
            .hub
            .presence_remove(channel.clone(), who.client.clone())
            .await;
        if let Err(e) = removed {
            tracing::warn!(%channel, "presence not updated: {e}");
        }
    }
    if sub.join_leave {
        announce(node, channel, Kind::Leave, who).await;
    }
}

/// A session dropped before [`Session::close`] (its task panicked, or the
/// runtime dropped it at shutdown) would leave its presence entries
/// behind, ghosts that engines with expiring entries keep re-adding, and
/// never announce its leaves: they are done in a task of their own.
impl Drop for Session {
    fn drop(&mut self) {
        let wanted = |sub: &Sub| sub.presence || sub.join_leave;
        if self.identity.is_none() || !self.subs.values().any(wanted) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (node, who) = (self.node.clone(), self.info());
        let subs: Vec<(ChannelName, Sub)> = self.subs.drain().collect();
        rt.spawn(async move {
            for (channel, sub) in subs.iter().filter(|(_, s)| wanted(s)) {
                left(&node, channel, sub, &who).await;
            }
        });
    }
}

impl Session {
    /// A session that has not sent `connect` yet; `now` is the time in
    /// seconds since the Unix epoch.
    pub fn new(node: Arc<Node>, now: u64) -> Session {
        let client = node.hub.client(node.queue);
        Session {
            node,
            client,
            identity: None,
            subs: HashMap::new(),
            connect_deadline: now + CONNECT_TIMEOUT_SECS,
            backlog: None,
        }
    }

    /// The queue of pushes to write.
    pub fn queue(&self) -> &Arc<crate::Queue> {
        self.client.queue()
    }

    /// This connection's id.
    pub fn client_id(&self) -> String {
        self.client.id()
    }

    /// The user, once connected.
    pub fn user(&self) -> Option<&str> {
        self.identity.as_ref().map(|i| i.user.as_str())
    }

    /// Whether a recovery larger than the queue is still being sent: call
    /// [`Session::catch_up`] whenever the queue has been written.
    pub fn catching_up(&self) -> bool {
        self.subs.values().any(|s| s.catching_up)
    }

    /// Queues the next pieces of recoveries larger than the queue (see
    /// [`Client::catch_up`]), while the queue has at least half its room:
    /// call it after writing what was queued. It returns once something
    /// waits in the queue (whose writing calls it again) or every
    /// recovery is live. A piece that finds nothing new to read (an engine
    /// that delivers a message before history shows it) waits 10 ms and
    /// reads again, for at most 2 s (the connection's loop waits
    /// meanwhile); after that, or if history lost what the client needs,
    /// the queue closes as a slow consumer's; if the engine failed, as
    /// [`QueueClosed::Unavailable`](crate::QueueClosed::Unavailable) (see
    /// [`CatchUpError`](crate::CatchUpError)).
    pub async fn catch_up(&mut self) {
        const RETRY: std::time::Duration = std::time::Duration::from_millis(10);
        let mut idle = 0;
        loop {
            let behind: Vec<ChannelName> = self
                .subs
                .iter()
                .filter(|(_, s)| s.catching_up)
                .map(|(c, _)| c.clone())
                .collect();
            let queue = self.client.queue();
            let ((messages, bytes), (most, most_bytes)) = (queue.room(), queue.limits());
            if behind.is_empty()
                || queue.is_closed()
                || messages < most / 2
                || bytes < most_bytes / 2
            {
                return;
            }
            let mut queued = 0;
            for channel in behind {
                match self.client.catch_up(&channel).await {
                    Ok(piece) => {
                        queued += piece.queued;
                        if let Some(sub) = self.subs.get_mut(&channel).filter(|_| piece.done) {
                            sub.catching_up = false;
                        }
                    }
                    Err(e) => {
                        tracing::info!(%channel, client = %self.client.id(), "recovery stopped: {e}");
                        return;
                    }
                }
            }
            if !self.client.queue().is_empty() {
                return;
            }
            if queued > 0 {
                // The connection took it all at once: on to the next,
                // letting the thread's other tasks run in between.
                idle = 0;
                tokio::task::yield_now().await;
                continue;
            }
            idle += 1;
            if idle > 200 {
                tracing::warn!(client = %self.client.id(), "recovery made no progress for 2 s");
                self.client.queue().close(crate::QueueClosed::SlowConsumer);
                return;
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    /// When [`Session::handle_timeout`] must next be called (seconds since
    /// the Unix epoch): the connect deadline, the token's expiry, or a
    /// subscription token's.
    pub fn deadline(&self) -> Option<u64> {
        match &self.identity {
            None => Some(self.connect_deadline),
            Some(id) => id
                .expires_at
                .into_iter()
                .chain(self.subs.values().filter_map(|s| s.expires_at))
                .min(),
        }
    }

    /// Applies deadlines that passed: a missing `connect` (4003), an
    /// expired token (4002), expired subscription tokens (the subscription
    /// ends with an `unsubscribe` push).
    pub async fn handle_timeout(&mut self, now: u64) -> Option<CloseReason> {
        let Some(identity) = &self.identity else {
            return (now >= self.connect_deadline)
                .then(|| CloseReason::new(4003, "no connect command in time"));
        };
        if identity.expires_at.is_some_and(|exp| exp <= now) {
            return Some(CloseReason::new(4002, "token expired"));
        }
        let expired: Vec<ChannelName> = self
            .subs
            .iter()
            .filter(|(_, s)| s.expires_at.is_some_and(|exp| exp <= now))
            .map(|(c, _)| c.clone())
            .collect();
        for channel in expired {
            self.end(
                &channel,
                ErrorCode::TokenExpired,
                "subscription token expired",
            )
            .await;
        }
        None
    }

    /// Ends a subscription from the server's side: leaves `channel` and
    /// tells the client why with an `unsubscribe` push.
    async fn end(&mut self, channel: &ChannelName, code: ErrorCode, reason: &str) {
        self.leave(channel).await;
        let push = json!({"unsubscribe": {"channel": channel.as_str(), "code": code as u16, "reason": reason}});
        self.client.queue().push(Queued {
            message: PreparedMessage::new(Message::text(push.to_string())),
            key: None,
        });
    }

    /// Handles one text message: the reply to send, or why to close.
    pub async fn handle_text(&mut self, text: &str, now: u64) -> Result<String, CloseReason> {
        let command = self.parse(text, now).await?;
        self.dispatch(command, now).await
    }

    /// Whether `connect` succeeded.
    pub fn is_connected(&self) -> bool {
        self.identity.is_some()
    }

    /// Resolves once what was published to this connection's channels
    /// before the call is in its queue (see [`Hub::delivered`]): before a
    /// close, so that what its last commands caused is sent first.
    ///
    /// [`Hub::delivered`]: crate::Hub::delivered
    pub async fn delivered(&self) {
        self.node.hub.delivered(self.subs.keys()).await;
    }

    /// Adds a text message read from the connection to the commands
    /// waiting their turn ([`Session::handle_next`]).
    pub fn queue_text(&mut self, text: walkie_proto::Utf8Bytes) {
        self.backlog.get_or_insert_default().texts.push_back(text);
    }

    /// Whether commands wait their turn.
    pub fn has_backlog(&self) -> bool {
        self.backlog
            .as_ref()
            .is_some_and(|b| b.parsed.is_some() || !b.texts.is_empty())
    }

    /// Handles the next waiting command, as [`handle_text`] would, or, if
    /// it is a `publish`, it and the `publish` commands right behind it as
    /// one batch for the engine ([`Hub::publish_many`]): a client that
    /// publishes without waiting for each reply has its burst saved in one
    /// commit and delivered in one write per subscriber. Answers the
    /// replies, in order, and why to close if a command closes the
    /// connection (the commands waiting are then dropped). Between two
    /// calls the caller sends what the commands queued, as it would between
    /// two commands handled one at a time.
    ///
    /// [`handle_text`]: Session::handle_text
    pub async fn handle_next(&mut self, now: u64) -> (Vec<String>, Option<CloseReason>) {
        let mut replies = Vec::new();
        let mut publishes = Vec::new();
        while let Some(backlog) = self.backlog.as_mut() {
            let command = match backlog.parsed.take() {
                Some(command) => command,
                None => {
                    let Some(text) = backlog.texts.pop_front() else {
                        break;
                    };
                    match self.parse(&text, now).await {
                        Ok(command) => command,
                        Err(close) => {
                            self.backlog = None;
                            self.publish_batch(&mut publishes, &mut replies).await;
                            return (replies.into_iter().flatten().collect(), Some(close));
                        }
                    }
                }
            };
            let batched = command.method == "publish" && self.identity.is_some();
            if !batched && !replies.is_empty() {
                // The end of a run of publishes: this command's turn is
                // the next call's.
                if let Some(backlog) = self.backlog.as_mut() {
                    backlog.parsed = Some(command);
                }
                break;
            }
            if !batched {
                let handled = self.dispatch(command, now).await;
                match handled {
                    Ok(reply) => replies.push(Some(reply)),
                    Err(close) => {
                        self.backlog = None;
                        return (replies.into_iter().flatten().collect(), Some(close));
                    }
                }
                break;
            }
            let id = command.id;
            match self.prepare_publish(&command, now) {
                Ok(request) => {
                    publishes.push((replies.len(), id, request));
                    replies.push(None);
                }
                Err(e) => replies.push(Some(self.reply(id, Err(e)))),
            }
        }
        if !self.has_backlog() {
            self.backlog = None;
        }
        self.publish_batch(&mut publishes, &mut replies).await;
        (replies.into_iter().flatten().collect(), None)
    }

    /// Publishes the batch of `handle_next` and puts each reply in its
    /// place.
    async fn publish_batch(
        &mut self,
        publishes: &mut Vec<(usize, u64, crate::PublishRequest)>,
        replies: &mut [Option<String>],
    ) {
        if publishes.is_empty() {
            return;
        }
        let (places, requests): (Vec<(usize, u64)>, Vec<_>) =
            publishes.drain(..).map(|(at, id, r)| ((at, id), r)).unzip();
        let results = self.node.hub.publish_many(requests).await;
        debug_assert_eq!(results.len(), places.len(), "one result per publish");
        for ((at, id), result) in places.into_iter().zip(results) {
            let result = result
                .map(|r| backend::published_reply(&r))
                .map_err(internal);
            replies[at] = Some(self.reply(id, result));
        }
    }

    /// Checks a text message and parses it into a command, counting it.
    async fn parse(&mut self, text: &str, now: u64) -> Result<Command, CloseReason> {
        // Before `connect`, nothing large is needed (a token is a few KiB),
        // and a large JSON document parses into many times its size.
        if self.identity.is_none() && text.len() > MAX_BEFORE_CONNECT {
            return Err(CloseReason::new(1009, "connect first, in at most 64 KiB"));
        }
        // Deadlines that passed count even if their timer has not fired
        // yet: an expired token is not served.
        if let Some(close) = self.handle_timeout(now).await {
            return Err(close);
        }
        let command = protocol::parse(text).map_err(|e| CloseReason::new(4000, e.0))?;
        let metrics = self.node.hub.metrics();
        Metrics::inc(&metrics.messages_in);
        metrics
            .bytes_in
            .fetch_add(text.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(command)
    }

    /// Runs one command: the reply to send, or why to close.
    async fn dispatch(&mut self, command: Command, now: u64) -> Result<String, CloseReason> {
        let id = command.id;
        let result = match command.method.as_str() {
            "connect" => {
                let connected = self.connect(&command, now).await;
                if connected.is_err() {
                    Metrics::inc(&self.node.hub.metrics().auth_failures);
                }
                return connected;
            }
            _ if self.identity.is_none() => Err(err(ErrorCode::NotConnected, "send connect first")),
            "subscribe" => self.subscribe(&command, now).await,
            "unsubscribe" => self.unsubscribe(&command).await,
            "publish" => self.publish(&command, now).await,
            "history" => self.history(&command).await,
            "presence" => self.presence(&command, false).await,
            "presence_stats" => self.presence(&command, true).await,
            "refresh" => self.refresh(&command, now).await,
            "ping" => command
                .params::<serde_json::Map<String, Value>>()
                .map(|_| json!({})),
            other => Err(err(
                ErrorCode::MethodNotFound,
                format!("unknown method `{other}`"),
            )),
        };
        Ok(self.reply(id, result))
    }

    /// A command's reply, counting refusals for lack of rights.
    fn reply(&self, id: u64, result: Reply) -> String {
        match result {
            Ok(v) => protocol::reply(id, v),
            Err(e) => {
                if matches!(
                    e.code,
                    ErrorCode::Unauthorized | ErrorCode::PermissionDenied | ErrorCode::TokenExpired
                ) {
                    Metrics::inc(&self.node.hub.metrics().auth_failures);
                }
                protocol::reply_error(id, &e)
            }
        }
    }

    /// Leaves every channel (presence and leave events) before the
    /// connection goes away.
    pub async fn close(&mut self) {
        let channels: Vec<ChannelName> = self.subs.keys().cloned().collect();
        for channel in channels {
            self.leave(&channel).await;
        }
    }

    async fn connect(&mut self, command: &Command, now: u64) -> Result<String, CloseReason> {
        if self.identity.is_some() {
            let e = err(ErrorCode::AlreadyConnected, "connected already");
            return Ok(protocol::reply_error(command.id, &e));
        }
        let params: ConnectParams = match command.params() {
            Ok(p) => p,
            Err(e) => return Ok(protocol::reply_error(command.id, &e)),
        };
        let identity = match &params.token {
            Some(token) => match self.node.verifier.connect(token) {
                Ok(id) => id,
                Err(AuthError::Expired) => return Err(CloseReason::new(4002, "token expired")),
                Err(e) => return Err(CloseReason::new(4001, e.to_string())),
            },
            None if self.node.config.auth.anonymous => Identity::default(),
            None => return Err(CloseReason::new(4001, "a token is required")),
        };
        if identity.expires_at.is_some_and(|exp| exp <= now) {
            return Err(CloseReason::new(4002, "token expired"));
        }
        let mut identity = identity;
        if identity.info.is_none() {
            // Shown to others in presence and join/leave, for clients whose
            // token carries no `info` (anonymous ones, say).
            if let Some(name) = params.name.as_deref().filter(|n| !n.is_empty()) {
                let name: String = name.chars().take(64).collect();
                identity.info = Some(Bytes::from(json!({ "name": name }).to_string()));
            }
        }
        self.client.set_user(&identity.user);
        let mut result = json!({
            "client": self.client.id(),
            "user": identity.user,
            "version": protocol::SUBPROTOCOL,
        });
        if let Some(interval) = self.node.ping_interval {
            result["ping_interval"] = match interval.subsec_nanos() {
                0 => json!(interval.as_secs()),
                _ => json!(interval.as_secs_f64()),
            };
        }
        if let Some(exp) = identity.expires_at {
            result["expires_in"] = json!(exp.saturating_sub(now));
        }
        tracing::debug!(client = %self.client.id(), user = %identity.user, name = ?params.name, "connected");
        self.identity = Some(identity);
        Ok(protocol::reply(command.id, result))
    }

    fn identity(&self) -> &Identity {
        // Only called for commands after `connect`; see `handle_text`.
        static ANONYMOUS: std::sync::OnceLock<Identity> = std::sync::OnceLock::new();
        self.identity
            .as_ref()
            .unwrap_or_else(|| ANONYMOUS.get_or_init(Identity::default))
    }

    fn info(&self) -> ClientInfo {
        let id = self.identity();
        ClientInfo {
            client: self.client.id(),
            user: id.user.clone(),
            info: id.info.clone(),
        }
    }

    /// The channel and its namespace, or 102.
    fn channel(&self, name: &str) -> Result<(ChannelName, NamespaceConfig), ReplyError> {
        backend::channel(&self.node, name)
    }

    /// Checks what every channel operation needs: anonymous access and the
    /// user list of user channels.
    fn check_user(&self, channel: &ChannelName, ns: &NamespaceConfig) -> Result<(), ReplyError> {
        let user = &self.identity().user;
        if user.is_empty() && !ns.anonymous {
            return Err(err(
                ErrorCode::PermissionDenied,
                format!("anonymous clients are not allowed in {channel}"),
            ));
        }
        if let Some((_, users)) = channel.as_str().split_once('#') {
            if user.is_empty() || !users.split(',').any(|u| u == user) {
                return Err(err(
                    ErrorCode::PermissionDenied,
                    format!("{channel} is limited to its users"),
                ));
            }
        }
        Ok(())
    }

    /// Whether reading `channel` is allowed without a subscription token.
    fn may_read(&self, channel: &ChannelName, ns: &NamespaceConfig) -> Result<(), ReplyError> {
        self.check_user(channel, ns)?;
        if self.subs.contains_key(channel)
            || !ns.private
            || channel_allowed(&self.identity().channels, channel.as_str())
        {
            Ok(())
        } else {
            Err(err(
                ErrorCode::PermissionDenied,
                format!("permission denied: {channel}"),
            ))
        }
    }

    async fn subscribe(&mut self, command: &Command, now: u64) -> Reply {
        let p: SubscribeParams = command.params()?;
        let (channel, ns) = self.channel(&p.channel)?;
        if self.subs.contains_key(&channel) {
            return Err(err(
                ErrorCode::AlreadySubscribed,
                format!("subscribed to {channel} already"),
            ));
        }
        if self.subs.len() >= MAX_SUBSCRIPTIONS {
            return Err(err(
                ErrorCode::LimitExceeded,
                format!("at most {MAX_SUBSCRIPTIONS} subscriptions"),
            ));
        }
        let mut expires_at = None;
        match &p.token {
            Some(token) => {
                self.check_user(&channel, &ns)?;
                expires_at = self
                    .node
                    .verifier
                    .subscribe(token, &self.identity().user, channel.as_str())
                    .map_err(|e| match e {
                        AuthError::Expired => {
                            err(ErrorCode::TokenExpired, "subscription token expired")
                        }
                        // Valid, but it does not grant this channel.
                        e @ AuthError::NotFor(_) => err(ErrorCode::PermissionDenied, e.to_string()),
                        // Not a token this server accepts.
                        e => err(ErrorCode::Unauthorized, e.to_string()),
                    })?;
                if expires_at.is_some_and(|exp| exp <= now) {
                    return Err(err(ErrorCode::TokenExpired, "subscription token expired"));
                }
            }
            None => self.may_read(&channel, &ns)?,
        }
        let recover = if p.recover {
            let (Some(offset), Some(epoch)) = (p.offset, p.epoch) else {
                return Err(err(
                    ErrorCode::BadRequest,
                    "subscribe: recover needs offset and epoch",
                ));
            };
            Recover::Since(StreamPosition {
                offset,
                epoch: epoch.into(),
            })
        } else {
            match p.history {
                Some(n) if n > ns.history_size => {
                    return Err(err(
                        ErrorCode::BadRequest,
                        format!(
                            "subscribe: history is at most {} in {channel}",
                            ns.history_size
                        ),
                    ));
                }
                Some(n) if n > 0 => Recover::Last(n),
                _ => Recover::Nothing,
            }
        };
        let subscribed = self
            .client
            .subscribe(channel.clone(), Format::Json, recover)
            .await
            .map_err(internal)?;
        self.subs.insert(
            channel.clone(),
            Sub {
                presence: ns.presence,
                join_leave: ns.join_leave,
                expires_at,
                by_token: p.token.is_some(),
                catching_up: subscribed.catching_up,
            },
        );
        if ns.presence {
            let added = self
                .node
                .hub
                .presence_add(channel.clone(), self.info())
                .await;
            if let Err(e) = added {
                // Undone whole, so that the client may try again.
                self.subs.remove(&channel);
                self.client.unsubscribe(&channel);
                let id = self.client.id();
                let _ = self.node.hub.presence_remove(channel, id).await;
                return Err(internal(e));
            }
        }
        if ns.join_leave {
            self.announce(&channel, Kind::Join).await;
        }
        let mut result = position(&subscribed.position);
        if p.recover {
            // A channel that keeps no history numbers nothing (offset 0
            // throughout): whatever was missed cannot be known, let alone
            // replayed, so the answer is no.
            result["recovered"] = json!(subscribed.recovered && ns.history_size > 0);
        }
        result["history"] = json!(subscribed.from_history);
        Ok(result)
    }

    /// Puts this connection's presence entries again, with its info as it
    /// is now (a refresh brought a token with other `info`): presence and
    /// the leave event to come then say the same.
    async fn update_presence(&self) {
        let info = self.info();
        for (channel, sub) in &self.subs {
            if !sub.presence {
                continue;
            }
            let added = self
                .node
                .hub
                .presence_add(channel.clone(), info.clone())
                .await;
            if let Err(e) = added {
                tracing::warn!(%channel, "presence not updated after a refresh: {e}");
            }
        }
    }

    /// Publishes a join or leave event to `channel`.
    async fn announce(&self, channel: &ChannelName, kind: Kind) {
        announce(&self.node, channel, kind, &self.info()).await;
    }

    /// Leaves a channel: presence, leave event, subscription.
    async fn leave(&mut self, channel: &ChannelName) {
        let Some(sub) = self.subs.remove(channel) else {
            return;
        };
        self.client.unsubscribe(channel);
        if sub.presence || sub.join_leave {
            left(&self.node, channel, &sub, &self.info()).await;
        }
    }

    /// Ends the subscriptions to private channels that the connection's
    /// claims granted and no longer do (after a `refresh`).
    async fn drop_withdrawn(&mut self) {
        let withdrawn: Vec<ChannelName> = self
            .subs
            .iter()
            .filter(|(channel, sub)| {
                let private = self
                    .channel(channel.as_str())
                    .is_ok_and(|(_, ns)| ns.private);
                private
                    && !sub.by_token
                    && !channel_allowed(&self.identity().channels, channel.as_str())
            })
            .map(|(c, _)| c.clone())
            .collect();
        for channel in withdrawn {
            let reason = "the refreshed token does not grant this channel";
            self.end(&channel, ErrorCode::PermissionDenied, reason)
                .await;
        }
    }

    async fn unsubscribe(&mut self, command: &Command) -> Reply {
        let p: backend::ChannelOnly = command.params()?;
        let channel = backend::channel_name(&p.channel)?;
        if !self.subs.contains_key(&channel) {
            return Err(err(
                ErrorCode::NotSubscribed,
                format!("not subscribed to {channel}"),
            ));
        }
        self.leave(&channel).await;
        Ok(json!({}))
    }

    async fn publish(&mut self, command: &Command, now: u64) -> Reply {
        let r = self.prepare_publish(command, now)?;
        let r = self
            .node
            .hub
            .publish(r.channel, r.publication, r.options)
            .await
            .map_err(internal)?;
        Ok(backend::published_reply(&r))
    }

    /// Checks a `publish` (rights, the namespace's limits, then the
    /// connection's rate, which only a publish that passes the rest counts
    /// against) and makes the request for the engine.
    fn prepare_publish(
        &mut self,
        command: &Command,
        now: u64,
    ) -> Result<crate::PublishRequest, ReplyError> {
        let p: backend::Publish = command.params()?;
        let (channel, ns) = self.channel(&p.channel)?;
        if !ns.allow_publish {
            return Err(err(
                ErrorCode::NotAvailable,
                format!("clients may not publish to {channel}"),
            ));
        }
        self.may_read(&channel, &ns)?;
        let user = &self.identity().user;
        let info = json!({"user": user, "client": self.client.id()});
        let info = Bytes::from(info.to_string());
        let publisher = backend::Publisher::User { user, info };
        let data = Bytes::from(p.data.to_string());
        let request = backend::prepare_publish(channel, &ns, p, data, publisher)?;
        let rate = self.node.publish_rate;
        if self.client.take_publishes(now, 1, rate) == 0 {
            Metrics::inc(&self.node.hub.metrics().publishes_limited);
            let n = rate.map_or(0, std::num::NonZeroU32::get);
            return Err(err(
                ErrorCode::TooManyRequests,
                format!(
                    "too many requests: more than {n} publishes in one second on this connection; retry in the next second"
                ),
            ));
        }
        Ok(request)
    }

    async fn history(&mut self, command: &Command) -> Reply {
        let p: backend::History = command.params()?;
        let (channel, ns) = self.channel(&p.channel)?;
        self.may_read(&channel, &ns)?;
        backend::history_in(&self.node, channel, &ns, p).await
    }

    async fn presence(&mut self, command: &Command, stats: bool) -> Reply {
        let p: backend::ChannelOnly = command.params()?;
        let (channel, ns) = self.channel(&p.channel)?;
        self.may_read(&channel, &ns)?;
        backend::presence_in(&self.node, channel, &ns, stats).await
    }

    async fn refresh(&mut self, command: &Command, now: u64) -> Reply {
        let p: RefreshParams = command.params()?;
        let fresh = self.node.verifier.connect(&p.token).map_err(|e| match e {
            AuthError::Expired => err(ErrorCode::TokenExpired, "token expired"),
            e => err(ErrorCode::Unauthorized, e.to_string()),
        })?;
        if fresh.user != self.identity().user {
            return Err(err(
                ErrorCode::Unauthorized,
                "the token is for another user",
            ));
        }
        if fresh.expires_at.is_some_and(|exp| exp <= now) {
            return Err(err(ErrorCode::TokenExpired, "token expired"));
        }
        let expires_in = fresh.expires_at.map(|exp| exp.saturating_sub(now));
        let mut fresh = fresh;
        if fresh.info.is_none() {
            // Keeps the connection's info: the last token's, or the name
            // given at connect.
            fresh.info = self.identity().info.clone();
        }
        let new_info = fresh.info != self.identity().info;
        self.identity = Some(fresh);
        self.drop_withdrawn().await;
        if new_info {
            self.update_presence().await;
        }
        Ok(match expires_in {
            Some(s) => json!({ "expires_in": s }),
            None => json!({}),
        })
    }
}
