//! A Rust client of the Walkie protocol (`docs/protocol.md`), for bots,
//! backends and game clients: it keeps itself connected (exponential
//! backoff with jitter), resubscribes with recovery after a reconnect (no
//! message missed or repeated while history covers the gap; an event says
//! when it could not), and publishes with an acknowledgement, retrying
//! across reconnects with the same idempotency key.
//!
//! Tokens: [`Client::set_token`] hands over a new connection token before
//! the old one expires (sent at once in a `refresh`, and used by every later
//! `connect` once the server accepted it; a refused one is dropped and the
//! token the server holds stays). A close for a refused token (4001) or an
//! expired one (4002) ends the client, since reconnecting with the same
//! token cannot work, unless a newer token was given meanwhile: then it
//! reconnects with that.
//!
//! Events arrive on a bounded channel ([`Options::event_capacity`]): while
//! it is full the client waits, reading nothing from the server, so a slow
//! reader slows the connection down (and the server's slow-client policy,
//! close 1013 and a recovering reconnect, takes over) instead of piling
//! events up in memory. So keep reading events, and do not await a call
//! ([`Client::publish`], ...) in the loop that reads them unless its answer
//! cannot be stuck behind a full channel: spawn the call instead.
//!
//! ```no_run
//! # async fn run() -> Result<(), walkie_hub::client::ClientError> {
//! use walkie_hub::client::{Client, ClientEvent, Options};
//!
//! let (client, mut events) = Client::start(Options::new("ws://127.0.0.1:3000/ws"));
//! client.subscribe("chat:lobby", Default::default()).await?;
//! client.publish("chat:lobby", serde_json::json!({"text": "hi"})).await?;
//! while let Some(event) = events.recv().await {
//!     if let ClientEvent::Publication { channel, data, .. } = event {
//!         println!("{channel}: {data}");
//!     }
//! }
//! # Ok(()) }
//! ```

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use walkie::{ClientConfig, CloseCode, Message};

use crate::protocol::SUBPROTOCOL;

/// How long a connection must have lasted for the next reconnect's backoff
/// to start again from `min_delay` (as `walkie.js` does): a server that
/// closes right after `connect` (1011, 1013) sees the delays grow.
const STABLE_AFTER: Duration = Duration::from_secs(5);

/// How to connect.
#[derive(Debug, Clone)]
pub struct Options {
    /// The server's `/ws` URL (`ws://` or `wss://`).
    pub url: String,
    /// A JWT for `connect`; `None` connects anonymously. Replace it with
    /// [`Client::set_token`] before it expires.
    pub token: Option<String>,
    /// Shown to others in presence (`info.name`) when the token has none.
    pub name: Option<String>,
    /// Backoff bounds between reconnects, and between the retries of a
    /// subscribe refused with a temporary error. Default 250 ms and 10 s.
    pub min_delay: Duration,
    /// See `min_delay`.
    pub max_delay: Duration,
    /// How many events wait for the application at most (at least 1).
    /// While that many wait, the client reads nothing more from the server.
    /// Default 1024.
    pub event_capacity: usize,
    /// How many calls ([`Client::publish`], [`Client::history`], ...) may
    /// wait for a connection: while that many wait, a new one fails at once
    /// with [`ClientError::OutboxFull`]. Default 1024.
    pub outbox_capacity: usize,
    /// The WebSocket client's settings (TLS, timeouts); the subprotocol is
    /// added, and `write_buffer_high` is set to `usize::MAX`: the client
    /// writes a reconnect's backlog (resubscribes, waiting calls) at once,
    /// and a write that waited for the socket would stop the reading that
    /// lets the server go on (each call waits for its answer, so the writes
    /// stay bounded by the callers).
    pub websocket: ClientConfig,
}

impl Options {
    /// Defaults for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Options {
            url: url.into(),
            token: None,
            name: None,
            min_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(10),
            event_capacity: 1024,
            outbox_capacity: 1024,
            websocket: ClientConfig::default(),
        }
    }
}

/// What to replay when subscribing the first time.
#[derive(Debug, Clone, Default)]
pub struct SubscribeOptions {
    /// The last N messages from history.
    pub history: Option<usize>,
    /// A subscription token.
    pub token: Option<String>,
}

/// A position in a channel: the last message received (or the channel's
/// position when subscribed, before any message). Give it to `history`'s
/// `since` to read what came after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// The offset.
    pub offset: u64,
    /// The epoch the offset belongs to.
    pub epoch: String,
}

/// What happens, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    /// Connected (again): this connection's id and user.
    Connected {
        /// The connection id.
        client: String,
        /// The user (`""` if anonymous).
        user: String,
        /// When the connection token expires (the server counts whole
        /// seconds: refresh at least a second early); `None` if it does
        /// not.
        expires_in: Option<Duration>,
        /// How often the server pings a quiet connection; `None` if it
        /// does not.
        ping_interval: Option<Duration>,
    },
    /// The connection ended; `reconnecting` says whether it comes back.
    Disconnected {
        /// The close code (1006 if the connection just dropped, 1002 if
        /// the server is not a Walkie protocol endpoint), or the error code
        /// (100-199) of a refused `connect`.
        code: u16,
        /// The close reason, or the error's message.
        reason: String,
        /// Whether the client reconnects by itself.
        reconnecting: bool,
    },
    /// Subscribed (again) to a channel.
    Subscribed {
        /// The channel.
        channel: String,
        /// After a reconnect: whether every missed message follows.
        recovered: Option<bool>,
    },
    /// After a reconnect, history no longer covered what was missed: the
    /// messages published meanwhile are lost to this client.
    RecoveryFailed {
        /// The channel.
        channel: String,
    },
    /// A subscribe was refused. With `retrying`, the error was temporary
    /// (100, "retry later", or a code this client does not know): the
    /// client keeps the channel and subscribes again after a backoff delay
    /// (with recovery from `position`). Otherwise it forgets the channel
    /// (it is not retried after a reconnect; subscribe again, with a token
    /// say).
    SubscribeFailed {
        /// The channel.
        channel: String,
        /// The server's error.
        error: ClientError,
        /// Whether the client subscribes again by itself.
        retrying: bool,
        /// The last position received in the channel, if any: where a
        /// recovery would have started.
        position: Option<Position>,
    },
    /// The server ended a subscription (its subscription token expired,
    /// say): the client forgets the channel.
    Unsubscribed {
        /// The channel.
        channel: String,
        /// The server's error code (109: token expired).
        code: u16,
        /// Why.
        reason: String,
        /// The last position received in the channel, if any.
        position: Option<Position>,
    },
    /// A message on a subscribed channel.
    Publication {
        /// The channel.
        channel: String,
        /// Its offset (0 without history).
        offset: u64,
        /// The payload: the JSON value, or `{"text": ..}` / `{"base64": ..}`
        /// for messages from rooms by URL.
        data: Value,
        /// Who published it, if known.
        info: Option<Value>,
    },
    /// Someone joined a subscribed channel.
    Join {
        /// The channel.
        channel: String,
        /// Their info.
        info: Value,
    },
    /// Someone left a subscribed channel.
    Leave {
        /// The channel.
        channel: String,
        /// Their info.
        info: Value,
    },
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error (codes in docs/protocol.md). Also
    /// the final error of a client whose `connect` was refused.
    #[error("error {code}: {message}")]
    Server {
        /// The code.
        code: u16,
        /// The message.
        message: String,
    },
    /// The connection ended before the answer, and the call is not retried.
    #[error("the connection ended before the answer")]
    Disconnected,
    /// The server refused the connection token (close 4001) or found it
    /// expired (4002), and no newer token was given: the client has ended.
    #[error("the server refused the token (close {code}: {reason})")]
    TokenRefused {
        /// The close code: 4001 or 4002.
        code: u16,
        /// The close reason.
        reason: String,
    },
    /// [`Client::subscribe`] on a channel the client is subscribed to (or
    /// subscribing to) already: unsubscribe first to subscribe with other
    /// options.
    #[error("already subscribed to {channel}")]
    AlreadySubscribed {
        /// The channel.
        channel: String,
    },
    /// [`Options::outbox_capacity`] calls wait for a connection already.
    #[error("{capacity} calls wait for a connection already")]
    OutboxFull {
        /// The capacity.
        capacity: usize,
    },
    /// The client was stopped.
    #[error("the client is stopped")]
    Stopped,
}

type Reply = oneshot::Sender<Result<Value, ClientError>>;

enum Cmd {
    Subscribe(
        String,
        SubscribeOptions,
        oneshot::Sender<Result<(), ClientError>>,
    ),
    Unsubscribe(String),
    SetToken(String, Reply),
    Call {
        method: &'static str,
        params: Value,
        retry: bool,
        reply: Reply,
    },
    Stop,
}

/// A handle on the background task that keeps the connection. Cheap to
/// clone; the task stops when every handle is dropped or `stop` is called.
#[derive(Debug, Clone)]
pub struct Client {
    cmds: mpsc::UnboundedSender<Cmd>,
    /// Set by `stop`, and closed when every handle is gone: what a task
    /// waiting for room in the event channel listens to.
    stop: Arc<watch::Sender<bool>>,
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cmd")
    }
}

impl Client {
    /// Starts connecting in a background task; events arrive on the
    /// receiver, which holds at most [`Options::event_capacity`] of them:
    /// keep reading it (see the module's documentation).
    ///
    /// The commands to the task are not bounded: each is a caller waiting
    /// for its answer (but `unsubscribe` and `stop`), and calls waiting for
    /// a connection are bounded by [`Options::outbox_capacity`].
    pub fn start(options: Options) -> (Client, mpsc::Receiver<ClientEvent>) {
        let (cmds, rx) = mpsc::unbounded_channel();
        let (events, events_rx) = mpsc::channel(options.event_capacity.max(1));
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(Task::new(options, events, stop_rx).run(rx));
        let client = Client {
            cmds,
            stop: Arc::new(stop),
        };
        (client, events_rx)
    }

    fn send(&self, cmd: Cmd) -> Result<(), ClientError> {
        self.cmds.send(cmd).map_err(|_| ClientError::Stopped)
    }

    /// Subscribes now and after every reconnect (with recovery). Returns
    /// once the request is registered; `Subscribed` or `SubscribeFailed`
    /// events tell how it went.
    ///
    /// Errors: [`ClientError::AlreadySubscribed`] if the channel is
    /// subscribed already (or being subscribed, or waiting to retry): the
    /// server has no way to change a subscription's options, so unsubscribe
    /// first (a new subscription does not recover the old one's position:
    /// `history` does). The client's final error once it has ended.
    pub async fn subscribe(
        &self,
        channel: &str,
        options: SubscribeOptions,
    ) -> Result<(), ClientError> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::Subscribe(channel.to_owned(), options, tx))?;
        rx.await.map_err(|_| ClientError::Stopped)?
    }

    /// Leaves a channel.
    pub fn unsubscribe(&self, channel: &str) -> Result<(), ClientError> {
        self.send(Cmd::Unsubscribe(channel.to_owned()))
    }

    async fn call(
        &self,
        method: &'static str,
        params: Value,
        retry: bool,
    ) -> Result<Value, ClientError> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::Call {
            method,
            params,
            retry,
            reply,
        })?;
        rx.await.map_err(|_| ClientError::Stopped)?
    }

    /// Publishes and waits for the server's ack (`{offset, epoch,
    /// duplicate}`). Waits for a connection and retries across reconnects
    /// with the same idempotency key: delivered once. Fails at once with
    /// [`ClientError::OutboxFull`] when [`Options::outbox_capacity`] calls
    /// wait for a connection already.
    pub async fn publish(&self, channel: &str, data: Value) -> Result<Value, ClientError> {
        let key = format!("{:016x}", rand::random::<u64>());
        let params = json!({"channel": channel, "data": data, "idempotency_key": key});
        self.call("publish", params, true).await
    }

    /// Who is in a channel: client id to info.
    pub async fn presence(&self, channel: &str) -> Result<Value, ClientError> {
        let r = self
            .call("presence", json!({"channel": channel}), false)
            .await?;
        Ok(r.get("clients").cloned().unwrap_or(Value::Null))
    }

    /// A channel's history (`params` as in the protocol's `history`, the
    /// channel added).
    pub async fn history(&self, channel: &str, mut params: Value) -> Result<Value, ClientError> {
        if !params.is_object() {
            params = json!({});
        }
        params["channel"] = json!(channel);
        self.call("history", params, false).await
    }

    /// Replaces the connection token: while connected it is sent at once in
    /// a `refresh` (do so before the old token expires, and the connection
    /// stays), and every later `connect` uses it unless the server refused
    /// it. Returns when the server accepted the refresh, with the new
    /// token's `expires_in` (`None` if it does not expire), or, when not
    /// connected, once the token is kept for the next connect (`Ok(None)`:
    /// the `Connected` event tells its expiry). `Err(Server)` (101, 109):
    /// the server refused it; the client forgets it (unless a newer token
    /// was given meanwhile) and goes on with the token the server holds,
    /// for this connection and the next ones, until that expires.
    pub async fn set_token(
        &self,
        token: impl Into<String>,
    ) -> Result<Option<Duration>, ClientError> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::SetToken(token.into(), reply))?;
        let r = rx.await.map_err(|_| ClientError::Stopped)??;
        Ok(seconds(&r["expires_in"]))
    }

    /// Closes the connection with 1000 and stops reconnecting.
    pub fn stop(&self) {
        self.stop.send_replace(true);
        let _ = self.send(Cmd::Stop);
    }
}

/// A duration in (possibly fractional) seconds, if `v` is one.
fn seconds(v: &Value) -> Option<Duration> {
    v.as_f64().and_then(|s| Duration::try_from_secs_f64(s).ok())
}

/// Whether a refusal with this error code may go differently later: 100
/// ("retry later"), and codes this client does not know (the protocol may
/// add some). The others (101-113) would be answered the same way again
/// (114, too many publishes, never answers a subscribe).
fn temporary(code: u16) -> bool {
    !(101..=113).contains(&code)
}

/// Where a subscription stands.
#[derive(Debug, Clone)]
struct Sub {
    options: SubscribeOptions,
    /// The last offset and epoch seen: a reconnect recovers from there.
    position: Option<Position>,
    /// Tells this subscription from an earlier one of the same channel:
    /// the replies to the earlier one's subscribes are not for it.
    generation: u64,
    /// Whether this connection answered its subscribe: until then, pushes
    /// for the channel belong to an earlier subscription (the server sends
    /// a subscribe's reply before that subscription's pushes).
    live: bool,
    /// Subscribes refused with a temporary error in a row.
    failures: u32,
    /// When to subscribe again after such a refusal.
    retry_at: Option<Instant>,
}

/// What a command's reply is for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Purpose {
    /// `connect`: the session stands or falls with it.
    Connect,
    /// A subscribe for the subscription of this generation, and whether it
    /// was a recovery.
    Subscribe {
        channel: String,
        generation: u64,
        recovering: bool,
    },
    /// A `refresh` sending the token of this version.
    Refresh { version: u64 },
    /// Anything else: the result goes to `reply`, if any.
    Call,
}

struct Pending {
    method: &'static str,
    params: Value,
    retry: bool,
    reply: Option<Reply>,
    purpose: Purpose,
}

impl Pending {
    fn call(method: &'static str, params: Value, retry: bool, reply: Option<Reply>) -> Pending {
        Pending {
            method,
            params,
            retry,
            reply,
            purpose: Purpose::Call,
        }
    }
}

/// The application stopped the client (or dropped every handle) while an
/// event waited for room.
struct Stopped;

struct Task {
    /// `options.token` is the newest token given (and not refused).
    options: Options,
    events: mpsc::Sender<ClientEvent>,
    stop: watch::Receiver<bool>,
    subs: HashMap<String, Sub>,
    /// The last generation given to a subscription.
    generation: u64,
    /// The earliest `retry_at` of the subscriptions (or earlier).
    retry_at: Option<Instant>,
    outbox: VecDeque<Pending>,
    attempts: u32,
    /// Counts the tokens given: 0 for `options.token`, one more for each
    /// `set_token` (back to `server_version` when the newest is refused).
    token_version: u64,
    /// The version of the token the server holds for the current (or last)
    /// connection: the one `connect` sent, or a later accepted `refresh`.
    /// A 4001/4002 close ends the client only if no newer one was given.
    server_version: u64,
    /// The token of `server_version`.
    server_token: Option<String>,
    /// A `connect` succeeded once: a server that is not a Walkie endpoint
    /// later (a proxy misrouting one reconnect) is then not the end.
    connected_once: bool,
}

enum Ended {
    Stop,
    Dropped(u16, String),
    /// The server answered `connect` with this error.
    Refused(u16, String),
    /// The server accepted the WebSocket without the Walkie protocol's
    /// subprotocol: not a Walkie `/ws` endpoint. Before any connection the
    /// URL is wrong, which reconnecting would not change.
    NotWalkie,
}

impl Task {
    fn new(
        options: Options,
        events: mpsc::Sender<ClientEvent>,
        stop: watch::Receiver<bool>,
    ) -> Task {
        Task {
            server_token: options.token.clone(),
            options,
            events,
            stop,
            subs: HashMap::new(),
            generation: 0,
            retry_at: None,
            outbox: VecDeque::new(),
            attempts: 0,
            token_version: 0,
            server_version: 0,
            connected_once: false,
        }
    }

    /// Why a close ends the client for good, if it does: 4001 and 4002
    /// only while no newer token was given than the one the server refused.
    fn final_error(&self, code: u16, reason: &str) -> Option<ClientError> {
        match code {
            1000 | 1009 | 4000 | 4009 => Some(ClientError::Disconnected),
            4001 | 4002 if self.token_version <= self.server_version => {
                Some(ClientError::TokenRefused {
                    code,
                    reason: reason.to_owned(),
                })
            }
            _ => None,
        }
    }

    /// A backoff delay after `attempts` tries, with jitter.
    fn backoff(&self, attempts: u32) -> Duration {
        let base = self
            .options
            .min_delay
            .saturating_mul(1u32 << attempts.min(16))
            .min(self.options.max_delay);
        base.mul_f64(0.5 + rand::random::<f64>() * 0.5)
    }

    /// Keeps a new token for the next connect; returns its version.
    fn keep_token(&mut self, token: &str) -> u64 {
        self.token_version += 1;
        self.options.token = Some(token.to_owned());
        self.token_version
    }

    /// Keeps a new token, and makes the `refresh` that gives it to the
    /// server.
    fn new_token(&mut self, token: String, reply: Reply) -> Pending {
        let version = self.keep_token(&token);
        Pending {
            method: "refresh",
            params: json!({ "token": token }),
            retry: false,
            reply: Some(reply),
            purpose: Purpose::Refresh { version },
        }
    }

    /// The server answered the refresh of token `version`: an accepted one
    /// is the token the server holds; a refused one is forgotten, unless a
    /// newer one was given since, and the token the server holds is the
    /// one to connect with again.
    fn refreshed(&mut self, version: u64, token: &Value, accepted: bool) {
        if accepted {
            if version > self.server_version {
                self.server_version = version;
                self.server_token = token.as_str().map(str::to_owned);
            }
        } else if version == self.token_version {
            self.token_version = self.server_version;
            self.options.token = self.server_token.clone();
        }
    }

    /// Answers the refreshes still waiting for a connection: the next
    /// `connect` sends the newest token anyway, and an older one sent
    /// after it would replace it.
    fn settle_refreshes(&mut self) {
        let (refreshes, rest): (VecDeque<Pending>, VecDeque<Pending>) = self
            .outbox
            .drain(..)
            .partition(|p| matches!(p.purpose, Purpose::Refresh { .. }));
        self.outbox = rest;
        for p in refreshes {
            if let Some(r) = p.reply {
                let _ = r.send(Ok(json!({})));
            }
        }
    }

    /// Keeps a call for the next connection, unless the outbox is full.
    fn enqueue(&mut self, p: Pending) {
        let capacity = self.options.outbox_capacity;
        if self.outbox.len() >= capacity {
            if let Some(r) = p.reply {
                let _ = r.send(Err(ClientError::OutboxFull { capacity }));
            }
        } else {
            self.outbox.push_back(p);
        }
    }

    /// Registers a new subscription; returns whether it is new.
    fn add_sub(
        &mut self,
        channel: String,
        options: SubscribeOptions,
        done: oneshot::Sender<Result<(), ClientError>>,
    ) -> bool {
        if self.subs.contains_key(&channel) {
            let _ = done.send(Err(ClientError::AlreadySubscribed { channel }));
            return false;
        }
        self.generation += 1;
        self.subs.insert(
            channel,
            Sub {
                options,
                position: None,
                generation: self.generation,
                live: false,
                failures: 0,
                retry_at: None,
            },
        );
        let _ = done.send(Ok(()));
        true
    }

    /// Ends the client: every waiting call, and every later one until
    /// `stop`, gets `error`.
    async fn finish(&mut self, error: ClientError, cmds: &mut mpsc::UnboundedReceiver<Cmd>) {
        for p in self.outbox.drain(..) {
            if let Some(r) = p.reply {
                let _ = r.send(Err(error.clone()));
            }
        }
        while let Some(cmd) = cmds.recv().await {
            match cmd {
                Cmd::Stop => return,
                Cmd::Call { reply, .. } | Cmd::SetToken(_, reply) => {
                    let _ = reply.send(Err(error.clone()));
                }
                Cmd::Subscribe(_, _, done) => {
                    let _ = done.send(Err(error.clone()));
                }
                Cmd::Unsubscribe(_) => {}
            }
        }
    }

    /// Hands an event to the application, waiting for room in the channel
    /// (and so reading nothing from the server meanwhile). An application
    /// that dropped the receiver gets nothing.
    async fn emit(&mut self, e: ClientEvent) -> Result<(), Stopped> {
        tokio::select! {
            biased;
            _ = self.events.send(e) => Ok(()),
            // `stop`, or every handle dropped.
            _ = self.stop.wait_for(|stop| *stop) => Err(Stopped),
        }
    }

    async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<Cmd>) {
        let mut config = self.options.websocket.clone();
        config.protocols = vec![SUBPROTOCOL.to_owned()];
        // See `Options::websocket`.
        config.write_buffer_high = usize::MAX;
        loop {
            let ended = match walkie::connect_with(&self.options.url, &config).await {
                Ok((mut ws, _)) if ws.protocol() != Some(SUBPROTOCOL) => {
                    let close = ws.close(CloseCode::PROTOCOL_ERROR, "walkie.v1 expected");
                    let _ = tokio::time::timeout(Duration::from_secs(1), close).await;
                    Ended::NotWalkie
                }
                Ok((ws, _)) => self.session(ws, &mut cmds).await,
                Err(e) => Ended::Dropped(1006, e.to_string()),
            };
            let (code, reason, end) = match ended {
                Ended::Stop => return,
                Ended::Dropped(code, reason) => {
                    let end = self.final_error(code, &reason);
                    (code, reason, end)
                }
                Ended::NotWalkie => (
                    1002,
                    format!(
                        "the server did not accept the {SUBPROTOCOL} subprotocol: {} is not a Walkie protocol endpoint (its /ws)",
                        self.options.url
                    ),
                    (!self.connected_once).then_some(ClientError::Disconnected),
                ),
                Ended::Refused(code, message) => {
                    let end = (!temporary(code)).then(|| ClientError::Server {
                        code,
                        message: message.clone(),
                    });
                    (code, format!("connect refused: {message}"), end)
                }
            };
            let disconnected = ClientEvent::Disconnected {
                code,
                reason,
                reconnecting: end.is_none(),
            };
            if self.emit(disconnected).await.is_err() {
                return;
            }
            if let Some(error) = end {
                self.finish(error, &mut cmds).await;
                return;
            }
            // Backoff with jitter, still taking commands meanwhile.
            let sleep = tokio::time::sleep(self.backoff(self.attempts));
            self.attempts = self.attempts.saturating_add(1);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    () = &mut sleep => break,
                    cmd = cmds.recv() => match cmd {
                        None | Some(Cmd::Stop) => return,
                        Some(cmd) => self.queue(cmd),
                    },
                }
            }
        }
    }

    /// Takes a command while disconnected.
    fn queue(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Subscribe(channel, options, done) => {
                self.add_sub(channel, options, done);
            }
            Cmd::Unsubscribe(channel) => {
                self.subs.remove(&channel);
            }
            Cmd::SetToken(token, reply) => {
                // No connection to refresh: the next connect sends it.
                self.keep_token(&token);
                let _ = reply.send(Ok(json!({})));
            }
            Cmd::Call {
                method,
                params,
                retry,
                reply,
            } => self.enqueue(Pending::call(method, params, retry, Some(reply))),
            Cmd::Stop => {}
        }
    }

    fn subscribe_pending(&self, channel: &str) -> Pending {
        let sub = &self.subs[channel];
        let mut params = json!({"channel": channel});
        let recovering = sub.position.is_some();
        if let Some(Position { offset, epoch }) = &sub.position {
            params["recover"] = json!(true);
            params["offset"] = json!(offset);
            params["epoch"] = json!(epoch);
        } else if let Some(n) = sub.options.history {
            params["history"] = json!(n);
        }
        if let Some(t) = &sub.options.token {
            params["token"] = json!(t);
        }
        Pending {
            method: "subscribe",
            params,
            retry: false,
            reply: None,
            purpose: Purpose::Subscribe {
                channel: channel.to_owned(),
                generation: sub.generation,
                recovering,
            },
        }
    }

    /// Subscribes again where a temporary refusal's delay has passed.
    fn retry_due(&mut self, queue: &mut VecDeque<Pending>) {
        let now = Instant::now();
        let mut due: Vec<String> = Vec::new();
        for (channel, sub) in &mut self.subs {
            if sub.retry_at.is_some_and(|t| t <= now) {
                sub.retry_at = None;
                due.push(channel.clone());
            }
        }
        for channel in due {
            queue.push_back(self.subscribe_pending(&channel));
        }
        self.retry_at = self.subs.values().filter_map(|s| s.retry_at).min();
    }

    /// One connection's life.
    async fn session(
        &mut self,
        mut ws: walkie::WebSocket<walkie::MaybeTlsStream>,
        cmds: &mut mpsc::UnboundedReceiver<Cmd>,
    ) -> Ended {
        let mut next_id = 1u64;
        let mut pending: HashMap<u64, Pending> = HashMap::new();
        // This connect sends the newest token.
        self.settle_refreshes();
        self.server_version = self.token_version;
        self.server_token = self.options.token.clone();
        // Every subscription is subscribed again once connected.
        for sub in self.subs.values_mut() {
            sub.live = false;
            sub.retry_at = None;
        }
        self.retry_at = None;
        let mut connect = json!({});
        if let Some(t) = &self.options.token {
            connect["token"] = json!(t);
        }
        if let Some(n) = &self.options.name {
            connect["name"] = json!(n);
        }
        let mut queue: VecDeque<Pending> = VecDeque::new();
        queue.push_back(Pending {
            method: "connect",
            params: connect,
            retry: false,
            reply: None,
            purpose: Purpose::Connect,
        });
        let mut connected_at: Option<Instant> = None;
        let ended = loop {
            // Send what can go now: connect first, the rest once connected.
            // (`write_buffer_high` is `usize::MAX`: this never waits.)
            while let Some(p) = queue.pop_front() {
                let id = next_id;
                next_id += 1;
                let text = json!({ "id": id, p.method: p.params }).to_string();
                if ws.feed(Message::text(text)).await.is_err() {
                    // The connection failed: `recv` below says how.
                    queue.push_front(p);
                    break;
                }
                pending.insert(id, p);
            }
            let connected = connected_at.is_some();
            let retry_at = self.retry_at.filter(|_| connected);
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    None | Some(Cmd::Stop) => break Ended::Stop,
                    Some(Cmd::Subscribe(channel, options, done)) => {
                        if self.add_sub(channel.clone(), options, done) && connected {
                            queue.push_back(self.subscribe_pending(&channel));
                        }
                    }
                    Some(Cmd::Unsubscribe(channel)) => {
                        if self.subs.remove(&channel).is_some() && connected {
                            queue.push_back(Pending::call("unsubscribe", json!({"channel": channel}), false, None));
                        }
                    }
                    Some(Cmd::SetToken(token, reply)) => {
                        // Before the connect's answer, the refresh waits
                        // for it like any call.
                        let p = self.new_token(token, reply);
                        if connected { queue.push_back(p) } else { self.outbox.push_back(p) }
                    }
                    Some(Cmd::Call { method, params, retry, reply }) => {
                        let p = Pending::call(method, params, retry, Some(reply));
                        if connected { queue.push_back(p) } else { self.enqueue(p) }
                    }
                },
                () = sleep_until(retry_at) => self.retry_due(&mut queue),
                msg = ws.recv() => match msg {
                    Some(Ok(Message::Text(text))) => {
                        let Ok(v) = serde_json::from_str::<Value>(&text) else { continue };
                        let Some(id) = v.get("id").and_then(Value::as_u64) else {
                            if self.push(&v).await.is_err() {
                                break Ended::Stop;
                            }
                            continue;
                        };
                        let Some(p) = pending.remove(&id) else { continue };
                        let result = match (v.get("result"), v.get("error")) {
                            (Some(r), _) => Ok(r.clone()),
                            (_, Some(e)) => Err(ClientError::Server {
                                code: e["code"].as_u64().and_then(|c| u16::try_from(c).ok()).unwrap_or(0),
                                message: e["message"].as_str().unwrap_or("").to_owned(),
                            }),
                            _ => continue,
                        };
                        match p.purpose {
                            Purpose::Connect => {
                                let r = match result {
                                    Ok(r) => r,
                                    Err(ClientError::Server { code, message }) => break Ended::Refused(code, message),
                                    Err(e) => break Ended::Refused(0, e.to_string()),
                                };
                                connected_at = Some(Instant::now());
                                self.connected_once = true;
                                let event = ClientEvent::Connected {
                                    client: r["client"].as_str().unwrap_or("").to_owned(),
                                    user: r["user"].as_str().unwrap_or("").to_owned(),
                                    expires_in: seconds(&r["expires_in"]),
                                    ping_interval: seconds(&r["ping_interval"]),
                                };
                                if self.emit(event).await.is_err() {
                                    break Ended::Stop;
                                }
                                let channels: Vec<String> = self.subs.keys().cloned().collect();
                                for ch in channels {
                                    queue.push_back(self.subscribe_pending(&ch));
                                }
                                queue.extend(self.outbox.drain(..));
                            }
                            Purpose::Subscribe { channel, generation, recovering } => {
                                if self.subscribed(channel, generation, recovering, result).await.is_err() {
                                    break Ended::Stop;
                                }
                            }
                            Purpose::Refresh { version } => {
                                self.refreshed(version, &p.params["token"], result.is_ok());
                                if let Some(reply) = p.reply {
                                    let _ = reply.send(result);
                                }
                            }
                            Purpose::Call => {
                                if let Some(reply) = p.reply {
                                    let _ = reply.send(result);
                                }
                            }
                        }
                    }
                    Some(Ok(Message::Binary(_))) => {}
                    Some(Err(e)) => break Ended::Dropped(1006, e.to_string()),
                    None => {
                        let (code, reason) = ws
                            .close_frame()
                            .map(|f| (f.code.0, f.reason.to_string()))
                            .unwrap_or((1005, String::new()));
                        break Ended::Dropped(code, reason);
                    }
                },
            }
        };
        if matches!(ended, Ended::Stop) {
            let _ = ws.close(CloseCode::NORMAL, "bye").await;
        }
        // Only a connection that lasted starts the backoff again.
        if connected_at.is_some_and(|t| t.elapsed() >= STABLE_AFTER) {
            self.attempts = 0;
        }
        // Calls in flight: retried ones wait for the next connection.
        for (_, p) in pending.into_iter().chain(queue.into_iter().map(|p| (0, p))) {
            match p.purpose {
                Purpose::Connect | Purpose::Subscribe { .. } => continue,
                // The token is kept: the next connect sends it.
                Purpose::Refresh { .. } => {
                    if let Some(r) = p.reply {
                        let _ = r.send(Ok(json!({})));
                    }
                    continue;
                }
                Purpose::Call => {}
            }
            // (Over `outbox_capacity` maybe: these were taken already.)
            if p.retry {
                self.outbox.push_back(p);
            } else if let Some(r) = p.reply {
                let _ = r.send(Err(ClientError::Disconnected));
            }
        }
        ended
    }

    /// The reply to a subscribe for the subscription of `generation`.
    async fn subscribed(
        &mut self,
        channel: String,
        generation: u64,
        recovering: bool,
        result: Result<Value, ClientError>,
    ) -> Result<(), Stopped> {
        // For an earlier subscription of the channel, or one unsubscribed
        // since: not this one's business.
        let Some(sub) = self
            .subs
            .get_mut(&channel)
            .filter(|s| s.generation == generation)
        else {
            return Ok(());
        };
        let r = match result {
            Ok(r) => r,
            Err(error) => {
                let code = match &error {
                    ClientError::Server { code, .. } => *code,
                    _ => 0,
                };
                let position = sub.position.clone();
                let retrying = temporary(code);
                if retrying {
                    // Kept, with its position, and tried again later.
                    let failures = sub.failures;
                    sub.failures = sub.failures.saturating_add(1);
                    let at = Instant::now() + self.backoff(failures);
                    if let Some(sub) = self.subs.get_mut(&channel) {
                        sub.retry_at = Some(at);
                    }
                    self.retry_at = Some(self.retry_at.map_or(at, |t| t.min(at)));
                } else {
                    // Refused: retrying it after every reconnect would be
                    // refused again.
                    self.subs.remove(&channel);
                }
                return self
                    .emit(ClientEvent::SubscribeFailed {
                        channel,
                        error,
                        retrying,
                        position,
                    })
                    .await;
            }
        };
        sub.live = true;
        sub.failures = 0;
        let recovered = r.get("recovered").and_then(Value::as_bool);
        let epoch = r["epoch"].as_str().unwrap_or("").to_owned();
        let top = r["offset"].as_u64().unwrap_or(0);
        let from_history = r["history"].as_u64().unwrap_or(0);
        let keep = recovering && recovered == Some(true);
        if !keep {
            sub.position = Some(Position {
                offset: top.saturating_sub(from_history),
                epoch,
            });
        }
        if recovering && recovered == Some(false) {
            self.emit(ClientEvent::RecoveryFailed {
                channel: channel.clone(),
            })
            .await?;
        }
        self.emit(ClientEvent::Subscribed {
            channel,
            recovered: recovered.filter(|_| recovering),
        })
        .await
    }

    /// A push, for a subscription whose subscribe this connection answered
    /// (before that, it is for an earlier subscription of the channel).
    async fn push(&mut self, v: &Value) -> Result<(), Stopped> {
        let Some((kind, body)) = ["pub", "epoch", "unsubscribe", "join", "leave"]
            .into_iter()
            .find_map(|kind| Some((kind, v.get(kind)?)))
        else {
            return Ok(());
        };
        let channel = body["channel"].as_str().unwrap_or("");
        let Some(sub) = self.subs.get_mut(channel).filter(|s| s.live) else {
            return Ok(());
        };
        let channel = channel.to_owned();
        let event = match kind {
            "pub" => {
                let offset = body["offset"].as_u64().unwrap_or(0);
                if offset > 0 {
                    // Never hand the application a message twice.
                    if let Some(position) = &mut sub.position {
                        if offset <= position.offset {
                            return Ok(());
                        }
                        position.offset = offset;
                    }
                }
                let data = match (body.get("data"), body.get("text"), body.get("base64")) {
                    (Some(d), _, _) => d.clone(),
                    (_, Some(t), _) => json!({ "text": t }),
                    (_, _, Some(b)) => json!({ "base64": b }),
                    _ => Value::Null,
                };
                ClientEvent::Publication {
                    channel,
                    offset,
                    data,
                    info: body.get("info").cloned(),
                }
            }
            "epoch" => {
                // History was lost: offsets start again in a new epoch.
                sub.position = Some(Position {
                    offset: 0,
                    epoch: body["epoch"].as_str().unwrap_or("").to_owned(),
                });
                ClientEvent::RecoveryFailed { channel }
            }
            "unsubscribe" => {
                // The subscription is gone (until the application subscribes
                // again), so it is not recovered after a reconnect either.
                let position = sub.position.clone();
                self.subs.remove(&channel);
                ClientEvent::Unsubscribed {
                    channel,
                    code: body["code"]
                        .as_u64()
                        .and_then(|c| u16::try_from(c).ok())
                        .unwrap_or(0),
                    reason: body["reason"].as_str().unwrap_or("").to_owned(),
                    position,
                }
            }
            "join" => ClientEvent::Join {
                channel,
                info: body["info"].clone(),
            },
            "leave" => ClientEvent::Leave {
                channel,
                info: body["info"].clone(),
            },
            _ => return Ok(()),
        };
        self.emit(event).await
    }
}

/// Sleeps until `at`, or for ever.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    //! Against a scripted server: each test plays the server's side of the
    //! protocol message by message.

    use super::*;
    use tokio::net::{TcpSocket, TcpStream};

    /// A listener whose connections the test takes one by one.
    struct Fake {
        url: String,
        conns: mpsc::UnboundedReceiver<Peer>,
    }

    /// The server's end of one connection.
    struct Peer {
        ws: walkie::WebSocket<TcpStream>,
    }

    /// Small socket buffers on the server's side (no autotuning), for the
    /// test where both ends write more than the buffers hold.
    async fn fake() -> Fake {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(64 * 1024).unwrap();
        socket.set_send_buffer_size(64 * 1024).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(64).unwrap();
        let url = format!("ws://{}/ws", listener.local_addr().unwrap());
        let (tx, conns) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let config = walkie::ServerConfig::default();
            while let Ok((stream, _)) = listener.accept().await {
                let Ok(incoming) = walkie::Incoming::read(stream, Duration::from_secs(5)).await
                else {
                    continue;
                };
                let Ok(ws) = incoming.accept(&config, Some(SUBPROTOCOL)).await else {
                    continue;
                };
                if tx.send(Peer { ws }).is_err() {
                    return;
                }
            }
        });
        Fake { url, conns }
    }

    impl Fake {
        async fn accept(&mut self) -> Peer {
            tokio::time::timeout(Duration::from_secs(10), self.conns.recv())
                .await
                .expect("no connection within 10 s")
                .unwrap()
        }

        /// A client with short delays.
        fn client(&self) -> (Client, mpsc::Receiver<ClientEvent>) {
            Client::start(self.options())
        }

        fn options(&self) -> Options {
            let mut options = Options::new(self.url.clone());
            options.min_delay = Duration::from_millis(10);
            options.max_delay = Duration::from_millis(200);
            options
        }
    }

    impl Peer {
        /// The next command, within 10 s.
        async fn recv(&mut self) -> Value {
            self.try_recv(Duration::from_secs(10))
                .await
                .expect("no command within 10 s")
        }

        /// The next command within `wait`, if any.
        async fn try_recv(&mut self, wait: Duration) -> Option<Value> {
            loop {
                match tokio::time::timeout(wait, self.ws.recv()).await {
                    Err(_) => return None,
                    Ok(Some(Ok(Message::Text(t)))) => {
                        return Some(serde_json::from_str(&t).unwrap());
                    }
                    Ok(Some(Ok(_))) => continue,
                    Ok(other) => panic!("the client went: {other:?}"),
                }
            }
        }

        /// The next command, which must be `method`: its id and params.
        async fn expect(&mut self, method: &str) -> (u64, Value) {
            let v = self.recv().await;
            let params = v.get(method).unwrap_or_else(|| panic!("not {method}: {v}"));
            (v["id"].as_u64().unwrap(), params.clone())
        }

        async fn send(&mut self, v: Value) {
            self.ws.send(Message::text(v.to_string())).await.unwrap();
        }

        async fn reply(&mut self, id: u64, result: Value) {
            self.send(json!({"id": id, "result": result})).await;
        }

        async fn refuse(&mut self, id: u64, code: u16) {
            let error = json!({"code": code, "message": format!("error {code}")});
            self.send(json!({"id": id, "error": error})).await;
        }

        /// Answers `connect`; returns its params.
        async fn connect(&mut self) -> Value {
            let (id, params) = self.expect("connect").await;
            self.reply(id, json!({"client": "c1", "user": ""})).await;
            params
        }

        /// Answers a subscribe to `channel` at `offset` of epoch "e" with
        /// `history` messages to follow.
        async fn subscribed(&mut self, channel: &str, offset: u64, history: u64) -> Value {
            let (id, params) = self.expect("subscribe").await;
            assert_eq!(params["channel"], channel);
            self.reply(
                id,
                json!({"offset": offset, "epoch": "e", "history": history}),
            )
            .await;
            params
        }

        async fn publication(&mut self, channel: &str, offset: u64) {
            let data = format!("m{offset}");
            self.send(json!({"pub": {"channel": channel, "offset": offset, "data": data}}))
                .await;
        }

        async fn close(&mut self, code: u16) {
            let _ = self.ws.close(CloseCode(code), "").await;
        }
    }

    async fn next(events: &mut mpsc::Receiver<ClientEvent>) -> ClientEvent {
        tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("no event within 10 s")
            .expect("the events ended")
    }

    /// The next event, skipping `Connected` and `Disconnected`.
    async fn next_but_connection(events: &mut mpsc::Receiver<ClientEvent>) -> ClientEvent {
        loop {
            match next(events).await {
                ClientEvent::Connected { .. } | ClientEvent::Disconnected { .. } => {}
                e => return e,
            }
        }
    }

    fn publication(channel: &str, offset: u64) -> ClientEvent {
        ClientEvent::Publication {
            channel: channel.into(),
            offset,
            data: json!(format!("m{offset}")),
            info: None,
        }
    }

    fn subscribed(channel: &str) -> ClientEvent {
        ClientEvent::Subscribed {
            channel: channel.into(),
            recovered: None,
        }
    }

    async fn subscribe(client: &Client, channel: &str) {
        client
            .subscribe(channel, SubscribeOptions::default())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn pushes_of_an_earlier_subscription_are_not_delivered() {
        let mut fake = fake().await;
        let (client, mut events) = fake.client();
        let mut peer = fake.accept().await;
        peer.connect().await;
        subscribe(&client, "ch").await;
        peer.subscribed("ch", 4, 0).await;
        peer.publication("ch", 5).await;
        assert_eq!(next_but_connection(&mut events).await, subscribed("ch"));
        assert_eq!(next_but_connection(&mut events).await, publication("ch", 5));

        // Again, with the last two from history.
        client.unsubscribe("ch").unwrap();
        let again = SubscribeOptions {
            history: Some(2),
            ..SubscribeOptions::default()
        };
        client.subscribe("ch", again).await.unwrap();
        let (unsubscribe, _) = peer.expect("unsubscribe").await;
        // Published before the server took the unsubscribe: for the old
        // subscription, and in the new one's history below.
        peer.publication("ch", 6).await;
        peer.send(json!({"join": {"channel": "ch", "info": {}}}))
            .await;
        peer.reply(unsubscribe, json!({})).await;
        let params = peer.subscribed("ch", 6, 2).await;
        assert_eq!(params["history"], 2);
        for offset in [5, 6, 7] {
            peer.publication("ch", offset).await;
        }
        assert_eq!(next_but_connection(&mut events).await, subscribed("ch"));
        for offset in [5, 6, 7] {
            assert_eq!(
                next_but_connection(&mut events).await,
                publication("ch", offset)
            );
        }
    }

    #[tokio::test]
    async fn the_reply_to_an_earlier_subscribe_is_not_for_the_new_one() {
        let mut fake = fake().await;
        let (client, mut events) = fake.client();
        let mut peer = fake.accept().await;
        peer.connect().await;
        subscribe(&client, "ch").await;
        let (first, _) = peer.expect("subscribe").await;
        client.unsubscribe("ch").unwrap();
        subscribe(&client, "ch").await;
        let (unsubscribe, _) = peer.expect("unsubscribe").await;
        // The first subscribe is refused, the second accepted.
        peer.refuse(first, 103).await;
        peer.reply(unsubscribe, json!({})).await;
        peer.subscribed("ch", 0, 0).await;
        peer.publication("ch", 1).await;
        assert_eq!(next_but_connection(&mut events).await, subscribed("ch"));
        assert_eq!(next_but_connection(&mut events).await, publication("ch", 1));
    }

    #[tokio::test]
    async fn the_servers_unsubscribe_of_an_earlier_subscription_is_not_for_the_new_one() {
        let mut fake = fake().await;
        let (client, mut events) = fake.client();
        let mut peer = fake.accept().await;
        peer.connect().await;
        subscribe(&client, "ch").await;
        peer.subscribed("ch", 0, 0).await;
        assert_eq!(next_but_connection(&mut events).await, subscribed("ch"));
        client.unsubscribe("ch").unwrap();
        subscribe(&client, "ch").await;
        let (unsubscribe, _) = peer.expect("unsubscribe").await;
        // The old subscription's token expired before the server took the
        // unsubscribe.
        peer.send(json!({"unsubscribe": {"channel": "ch", "code": 109, "reason": "expired"}}))
            .await;
        peer.refuse(unsubscribe, 113).await;
        peer.subscribed("ch", 0, 0).await;
        peer.publication("ch", 1).await;
        assert_eq!(next_but_connection(&mut events).await, subscribed("ch"));
        assert_eq!(next_but_connection(&mut events).await, publication("ch", 1));
    }

    #[tokio::test]
    async fn join_and_leave_come_only_for_subscribed_channels() {
        let mut fake = fake().await;
        let (client, mut events) = fake.client();
        let mut peer = fake.accept().await;
        peer.connect().await;
        subscribe(&client, "ch").await;
        peer.subscribed("ch", 0, 0).await;
        let info = json!({"user": "u", "client": "c2"});
        for kind in ["join", "leave"] {
            peer.send(json!({kind: {"channel": "other", "info": info}}))
                .await;
        }
        peer.send(json!({"leave": {"channel": "ch", "info": info}}))
            .await;
        assert_eq!(next_but_connection(&mut events).await, subscribed("ch"));
        assert_eq!(
            next_but_connection(&mut events).await,
            ClientEvent::Leave {
                channel: "ch".into(),
                info
            }
        );
    }

    #[tokio::test]
    async fn a_temporary_refusal_is_retried_and_a_permanent_one_forgets() {
        let mut fake = fake().await;
        let (client, mut events) = fake.client();
        let mut peer = fake.accept().await;
        peer.connect().await;
        subscribe(&client, "ch").await;
        // Subscribed twice: an error, and the options stay.
        let twice = client.subscribe("ch", SubscribeOptions::default()).await;
        assert_eq!(
            twice,
            Err(ClientError::AlreadySubscribed {
                channel: "ch".into()
            })
        );
        let (id, _) = peer.expect("subscribe").await;
        peer.refuse(id, 100).await;
        let failed = |retrying, position| ClientEvent::SubscribeFailed {
            channel: "ch".into(),
            error: ClientError::Server {
                code: if retrying { 100 } else { 103 },
                message: format!("error {}", if retrying { 100 } else { 103 }),
            },
            retrying,
            position,
        };
        assert_eq!(next_but_connection(&mut events).await, failed(true, None));
        peer.subscribed("ch", 2, 0).await;
        assert_eq!(next_but_connection(&mut events).await, subscribed("ch"));
        peer.publication("ch", 3).await;
        assert_eq!(next_but_connection(&mut events).await, publication("ch", 3));

        // After a reconnect, the recovery is refused for now, then for good.
        peer.close(1001).await;
        let mut peer = fake.accept().await;
        peer.connect().await;
        let position = Position {
            offset: 3,
            epoch: "e".into(),
        };
        for (code, retrying) in [(100, true), (103, false)] {
            let (id, params) = peer.expect("subscribe").await;
            assert_eq!(params["recover"], true);
            assert_eq!(params["offset"], 3);
            peer.refuse(id, code).await;
            assert_eq!(
                next_but_connection(&mut events).await,
                failed(retrying, Some(position.clone()))
            );
        }
        // Forgotten: nothing is retried, and subscribing again starts anew.
        assert_eq!(peer.try_recv(Duration::from_millis(300)).await, None);
        subscribe(&client, "ch").await;
        let params = peer.subscribed("ch", 9, 0).await;
        assert_eq!(params, json!({"channel": "ch"}));
        assert_eq!(next_but_connection(&mut events).await, subscribed("ch"));
    }

    #[tokio::test]
    async fn a_refused_refresh_keeps_the_token_the_server_accepted() {
        let mut fake = fake().await;
        let mut options = fake.options();
        options.token = Some("A".into());
        let (client, mut events) = Client::start(options);
        let mut peer = fake.accept().await;
        assert_eq!(peer.connect().await["token"], "A");
        let refused = {
            let client = client.clone();
            tokio::spawn(async move { client.set_token("B").await })
        };
        let (id, params) = peer.expect("refresh").await;
        assert_eq!(params["token"], "B");
        peer.refuse(id, 101).await;
        assert!(matches!(
            refused.await.unwrap(),
            Err(ClientError::Server { code: 101, .. })
        ));
        peer.close(1001).await;
        let mut peer = fake.accept().await;
        assert_eq!(peer.connect().await["token"], "A");

        // One refused while a newer one is on its way: the newer one stays,
        // and once accepted it is the one to reconnect with, and its expiry
        // is returned.
        let (c, d) = (client.clone(), client.clone());
        let refused = tokio::spawn(async move { c.set_token("C").await });
        let (c_id, _) = peer.expect("refresh").await;
        let accepted = tokio::spawn(async move { d.set_token("D").await });
        let (d_id, params) = peer.expect("refresh").await;
        assert_eq!(params["token"], "D");
        peer.refuse(c_id, 109).await;
        peer.reply(d_id, json!({"expires_in": 60})).await;
        assert!(refused.await.unwrap().is_err());
        assert_eq!(accepted.await.unwrap(), Ok(Some(Duration::from_secs(60))));
        peer.close(1001).await;
        let mut peer = fake.accept().await;
        assert_eq!(peer.connect().await["token"], "D");
        while let Ok(e) = events.try_recv() {
            assert!(
                matches!(
                    e,
                    ClientEvent::Connected { .. }
                        | ClientEvent::Disconnected {
                            reconnecting: true,
                            ..
                        }
                ),
                "{e:?}"
            );
        }
    }

    #[tokio::test]
    async fn connected_tells_the_expiry_and_the_ping_interval() {
        let mut fake = fake().await;
        let (_client, mut events) = fake.client();
        let mut peer = fake.accept().await;
        let (id, _) = peer.expect("connect").await;
        let result = json!({"client": "c1", "user": "42", "expires_in": 60, "ping_interval": 0.5});
        peer.reply(id, result).await;
        assert_eq!(
            next(&mut events).await,
            ClientEvent::Connected {
                client: "c1".into(),
                user: "42".into(),
                expires_in: Some(Duration::from_secs(60)),
                ping_interval: Some(Duration::from_millis(500)),
            }
        );
    }

    #[tokio::test]
    async fn a_refused_connect_tells_its_code_and_ends_the_client_unless_temporary() {
        let mut fake = fake().await;
        let (client, mut events) = fake.client();
        for (code, reconnecting) in [(100, true), (107, false)] {
            let mut peer = fake.accept().await;
            let (id, _) = peer.expect("connect").await;
            peer.refuse(id, code).await;
            assert_eq!(
                next(&mut events).await,
                ClientEvent::Disconnected {
                    code,
                    reason: format!("connect refused: error {code}"),
                    reconnecting
                }
            );
        }
        let error = ClientError::Server {
            code: 107,
            message: "error 107".into(),
        };
        assert_eq!(client.publish("ch", json!(1)).await, Err(error.clone()));
        assert_eq!(
            client.subscribe("ch", SubscribeOptions::default()).await,
            Err(error)
        );
    }

    #[tokio::test]
    async fn the_backoff_grows_while_connections_end_at_once() {
        let mut fake = fake().await;
        let mut options = fake.options();
        options.min_delay = Duration::from_millis(20);
        options.max_delay = Duration::from_secs(2);
        let (_client, mut events) = Client::start(options);
        // Read the events meanwhile.
        tokio::spawn(async move { while events.recv().await.is_some() {} });
        let mut connections = 0;
        let deadline = Instant::now() + Duration::from_millis(1500);
        while let Ok(mut peer) = tokio::time::timeout_at(deadline, fake.accept()).await {
            connections += 1;
            peer.connect().await;
            peer.close(1013).await;
        }
        // 10-20, 20-40, 40-80, ... ms: 7 or 8 connections; with the
        // backoff reset by each connect, one every 10-20 ms.
        assert!((4..=10).contains(&connections), "{connections}");
    }

    #[tokio::test]
    async fn a_slow_event_reader_slows_the_connection_down() {
        let mut fake = fake().await;
        let mut options = fake.options();
        options.event_capacity = 4;
        let (client, mut events) = Client::start(options);
        let mut peer = fake.accept().await;
        peer.connect().await;
        subscribe(&client, "ch").await;
        peer.subscribed("ch", 0, 0).await;
        for offset in 1..=20 {
            peer.publication("ch", offset).await;
        }
        // Once the channel is full, the client reads nothing more, takes
        // no command, until events are read.
        while events.len() < 4 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let publish = {
            let client = client.clone();
            tokio::spawn(async move { client.publish("ch", json!("x")).await })
        };
        assert_eq!(peer.try_recv(Duration::from_millis(300)).await, None);
        assert!(events.len() <= 4, "{}", events.len());
        assert_eq!(
            next(&mut events).await,
            ClientEvent::Connected {
                client: "c1".into(),
                user: "".into(),
                expires_in: None,
                ping_interval: None,
            }
        );
        assert_eq!(next(&mut events).await, subscribed("ch"));
        for offset in 1..=20 {
            assert_eq!(next(&mut events).await, publication("ch", offset));
        }
        let (id, _) = peer.expect("publish").await;
        peer.reply(id, json!({"offset": 21})).await;
        assert_eq!(publish.await.unwrap().unwrap()["offset"], 21);

        // Stopped while waiting for room: it stops all the same.
        for offset in 21..=40 {
            peer.publication("ch", offset).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        client.stop();
        let end = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(Ok(_)) = peer.ws.recv().await {}
        });
        assert!(end.await.is_ok(), "the client did not close");
    }

    #[tokio::test]
    async fn calls_waiting_for_a_connection_are_bounded() {
        // Nothing listens there.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut options = Options::new(format!("ws://127.0.0.1:{port}/ws"));
        options.outbox_capacity = 2;
        let (client, _events) = Client::start(options);
        let mut first = std::pin::pin!(client.publish("ch", json!(1)));
        let mut second = std::pin::pin!(client.history("ch", json!({})));
        assert!(futures_util::poll!(&mut first).is_pending());
        assert!(futures_util::poll!(&mut second).is_pending());
        let third = tokio::time::timeout(Duration::from_secs(5), client.publish("ch", json!(3)));
        assert_eq!(
            third.await.expect("not refused at once"),
            Err(ClientError::OutboxFull { capacity: 2 })
        );
        client.stop();
        assert_eq!(first.await, Err(ClientError::Stopped));
    }

    #[tokio::test]
    async fn a_reconnects_backlog_does_not_wait_on_the_server_while_it_writes() {
        const MIB: usize = 1 << 20;
        const N: usize = 8;
        let mut fake = fake().await;
        let (client, mut events) = fake.client();
        tokio::spawn(async move { while events.recv().await.is_some() {} });
        let mut peer = fake.accept().await;
        let (connect, _) = peer.expect("connect").await;
        // N publishes of a MiB wait for the connect's answer...
        let publishes: Vec<_> = (0..N)
            .map(|i| {
                let client = client.clone();
                tokio::spawn(async move { client.publish("ch", json!("x".repeat(MIB + i))).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        peer.reply(connect, json!({"client": "c1", "user": ""}))
            .await;
        let all = async {
            // ...while the server writes N MiB before it reads on: more
            // than the sockets hold both ways.
            for _ in 0..N {
                peer.send(json!({"noise": "y".repeat(MIB)})).await;
            }
            for _ in 0..N {
                let (id, _) = peer.expect("publish").await;
                peer.reply(id, json!({"offset": id})).await;
            }
            for p in publishes {
                p.await.unwrap().unwrap();
            }
        };
        tokio::time::timeout(Duration::from_secs(30), all)
            .await
            .expect("the publishes were not answered");
    }
}
