//! A Rust client of the Walkie protocol (`docs/protocol.md`), for bots,
//! backends and game clients: it keeps itself connected (exponential
//! backoff with jitter), resubscribes with recovery after a reconnect (no
//! message missed or repeated while history covers the gap; an event says
//! when it could not), and publishes with an acknowledgement, retrying
//! across reconnects with the same idempotency key.
//!
//! Tokens: [`Client::set_token`] hands over a new connection token before
//! the old one expires (sent at once in a `refresh`, and used by every later
//! `connect`). A close for a refused token (4001) or an expired one (4002)
//! ends the client, since reconnecting with the same token cannot work,
//! unless a newer token was given meanwhile: then it reconnects with that.
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
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use walkie::{ClientConfig, CloseCode, Message};

use crate::protocol::SUBPROTOCOL;

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
    /// Backoff bounds between reconnects. Default 250 ms and 10 s.
    pub min_delay: Duration,
    /// See `min_delay`.
    pub max_delay: Duration,
    /// The WebSocket client's settings (TLS, timeouts); the subprotocol is
    /// added.
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

/// What happens, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    /// Connected (again): this connection's id and user.
    Connected {
        /// The connection id.
        client: String,
        /// The user (`""` if anonymous).
        user: String,
    },
    /// The connection ended; `reconnecting` says whether it comes back.
    Disconnected {
        /// The close code (1006 if the connection just dropped).
        code: u16,
        /// The close reason.
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
    /// A subscribe was refused: the client forgets the channel (it is not
    /// retried after a reconnect; subscribe again, with a token say).
    SubscribeFailed {
        /// The channel.
        channel: String,
        /// The server's error.
        error: ClientError,
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
    /// Someone joined a channel.
    Join {
        /// The channel.
        channel: String,
        /// Their info.
        info: Value,
    },
    /// Someone left a channel.
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
    /// The server answered with an error (codes in docs/protocol.md).
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
    /// The client was stopped.
    #[error("the client is stopped")]
    Stopped,
}

type Reply = oneshot::Sender<Result<Value, ClientError>>;

enum Cmd {
    Subscribe(String, SubscribeOptions, oneshot::Sender<()>),
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
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cmd")
    }
}

impl Client {
    /// Starts connecting in a background task; events arrive on the
    /// receiver (keep reading it: it is unbounded).
    pub fn start(options: Options) -> (Client, mpsc::UnboundedReceiver<ClientEvent>) {
        let (cmds, rx) = mpsc::unbounded_channel();
        let (events, events_rx) = mpsc::unbounded_channel();
        tokio::spawn(Task::new(options, events).run(rx));
        (Client { cmds }, events_rx)
    }

    fn send(&self, cmd: Cmd) -> Result<(), ClientError> {
        self.cmds.send(cmd).map_err(|_| ClientError::Stopped)
    }

    /// Subscribes now and after every reconnect (with recovery). Returns
    /// once the request is registered; `Subscribed` or `SubscribeFailed`
    /// events tell how it went.
    pub async fn subscribe(
        &self,
        channel: &str,
        options: SubscribeOptions,
    ) -> Result<(), ClientError> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::Subscribe(channel.to_owned(), options, tx))?;
        rx.await.map_err(|_| ClientError::Stopped)
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
    /// with the same idempotency key: delivered once.
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

    /// Replaces the connection token: every later `connect` uses it, and
    /// while connected it is sent at once in a `refresh` (do so before the
    /// old token expires, and the connection stays). Returns when the server
    /// accepted the refresh, or, when not connected, once the token is kept
    /// for the next connect. `Err(Server)` (101, 109): the server refused it,
    /// and the connection goes on with the old token until that expires.
    pub async fn set_token(&self, token: impl Into<String>) -> Result<(), ClientError> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::SetToken(token.into(), reply))?;
        rx.await.map_err(|_| ClientError::Stopped)?.map(|_| ())
    }

    /// Closes the connection with 1000 and stops reconnecting.
    pub fn stop(&self) {
        let _ = self.send(Cmd::Stop);
    }
}

/// Where a subscription stands.
#[derive(Debug, Clone)]
struct Sub {
    options: SubscribeOptions,
    /// The last offset and epoch seen: a reconnect recovers from there.
    position: Option<(u64, String)>,
}

/// What a command's reply is for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Purpose {
    /// `connect`: the session stands or falls with it.
    Connect,
    /// A subscribe, and whether it was a recovery.
    Subscribe { channel: String, recovering: bool },
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

struct Task {
    /// `options.token` is the newest token given.
    options: Options,
    events: mpsc::UnboundedSender<ClientEvent>,
    subs: HashMap<String, Sub>,
    outbox: VecDeque<Pending>,
    attempts: u32,
    /// Counts the tokens given: 0 for `options.token`, one more for each
    /// `set_token`.
    token_version: u64,
    /// The version of the token the server holds for the current (or last)
    /// connection: the one `connect` sent, or a later accepted `refresh`.
    /// A 4001/4002 close ends the client only if no newer one was given.
    server_version: u64,
}

enum Ended {
    Stop,
    Dropped(u16, String),
}

impl Task {
    fn new(options: Options, events: mpsc::UnboundedSender<ClientEvent>) -> Task {
        Task {
            options,
            events,
            subs: HashMap::new(),
            outbox: VecDeque::new(),
            attempts: 0,
            token_version: 0,
            server_version: 0,
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
                    let _ = done.send(());
                }
                Cmd::Unsubscribe(_) => {}
            }
        }
    }

    fn emit(&self, e: ClientEvent) {
        let _ = self.events.send(e);
    }

    async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<Cmd>) {
        let mut config = self.options.websocket.clone();
        config.protocols = vec![SUBPROTOCOL.to_owned()];
        loop {
            let ended = match walkie::connect_with(&self.options.url, &config).await {
                Ok((ws, _)) => self.session(ws, &mut cmds).await,
                Err(e) => Ended::Dropped(1006, e.to_string()),
            };
            let (code, reason) = match ended {
                Ended::Stop => return,
                Ended::Dropped(code, reason) => (code, reason),
            };
            let end = self.final_error(code, &reason);
            self.emit(ClientEvent::Disconnected {
                code,
                reason,
                reconnecting: end.is_none(),
            });
            if let Some(error) = end {
                self.finish(error, &mut cmds).await;
                return;
            }
            // Backoff with jitter, still taking commands meanwhile.
            let base = self
                .options
                .min_delay
                .saturating_mul(1u32 << self.attempts.min(16))
                .min(self.options.max_delay);
            self.attempts += 1;
            let jitter = base.mul_f64(0.5 + rand::random::<f64>() * 0.5);
            let sleep = tokio::time::sleep(jitter);
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
                self.subs.entry(channel).or_insert(Sub {
                    options,
                    position: None,
                });
                let _ = done.send(());
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
            } => self
                .outbox
                .push_back(Pending::call(method, params, retry, Some(reply))),
            Cmd::Stop => {}
        }
    }

    fn subscribe_pending(&self, channel: &str) -> Pending {
        let sub = &self.subs[channel];
        let mut params = json!({"channel": channel});
        let recovering = sub.position.is_some();
        if let Some((offset, epoch)) = &sub.position {
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
                recovering,
            },
        }
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
        let mut connected = false;
        let ended = loop {
            // Send what can go now: connect first, the rest once connected.
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
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    None | Some(Cmd::Stop) => {
                        let _ = ws.close(CloseCode::NORMAL, "bye").await;
                        break Ended::Stop;
                    }
                    Some(Cmd::Subscribe(channel, options, done)) => {
                        let new = !self.subs.contains_key(&channel);
                        self.subs.entry(channel.clone()).or_insert(Sub { options, position: None });
                        if new && connected {
                            queue.push_back(self.subscribe_pending(&channel));
                        }
                        let _ = done.send(());
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
                        if connected { queue.push_back(p) } else { self.outbox.push_back(p) }
                    }
                },
                msg = ws.recv() => match msg {
                    Some(Ok(Message::Text(text))) => {
                        let Ok(v) = serde_json::from_str::<Value>(&text) else { continue };
                        if let Some(id) = v.get("id").and_then(Value::as_u64) {
                            let Some(p) = pending.remove(&id) else { continue };
                            let result = match (v.get("result"), v.get("error")) {
                                (Some(r), _) => Ok(r.clone()),
                                (_, Some(e)) => Err(ClientError::Server {
                                    code: e["code"].as_u64().unwrap_or(0) as u16,
                                    message: e["message"].as_str().unwrap_or("").to_owned(),
                                }),
                                _ => continue,
                            };
                            if p.purpose == Purpose::Connect {
                                let Ok(r) = result else {
                                    break Ended::Dropped(4001, "connect refused".into());
                                };
                                connected = true;
                                self.attempts = 0;
                                self.emit(ClientEvent::Connected {
                                    client: r["client"].as_str().unwrap_or("").to_owned(),
                                    user: r["user"].as_str().unwrap_or("").to_owned(),
                                });
                                let channels: Vec<String> = self.subs.keys().cloned().collect();
                                for ch in channels {
                                    queue.push_back(self.subscribe_pending(&ch));
                                }
                                queue.extend(self.outbox.drain(..));
                                continue;
                            }
                            if let Purpose::Subscribe { channel, recovering } = p.purpose {
                                self.subscribed(channel, recovering, result);
                                continue;
                            }
                            if let (Purpose::Refresh { version }, Ok(_)) = (&p.purpose, &result) {
                                self.server_version = self.server_version.max(*version);
                            }
                            if let Some(reply) = p.reply {
                                let _ = reply.send(result);
                            }
                        } else {
                            self.push(&v);
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
            if p.retry {
                self.outbox.push_back(p);
            } else if let Some(r) = p.reply {
                let _ = r.send(Err(ClientError::Disconnected));
            }
        }
        ended
    }

    fn subscribed(
        &mut self,
        channel: String,
        recovering: bool,
        result: Result<Value, ClientError>,
    ) {
        let r = match result {
            Ok(r) => r,
            Err(error) => {
                // Refused: retrying it after every reconnect would be
                // refused again.
                self.subs.remove(&channel);
                self.emit(ClientEvent::SubscribeFailed { channel, error });
                return;
            }
        };
        let recovered = r.get("recovered").and_then(Value::as_bool);
        if let Some(sub) = self.subs.get_mut(&channel) {
            let epoch = r["epoch"].as_str().unwrap_or("").to_owned();
            let top = r["offset"].as_u64().unwrap_or(0);
            let from_history = r["history"].as_u64().unwrap_or(0);
            let keep = recovering && recovered == Some(true);
            if !keep {
                sub.position = Some((top.saturating_sub(from_history), epoch));
            }
        }
        if recovering && recovered == Some(false) {
            self.emit(ClientEvent::RecoveryFailed {
                channel: channel.clone(),
            });
        }
        self.emit(ClientEvent::Subscribed {
            channel,
            recovered: recovered.filter(|_| recovering),
        });
    }

    /// The server's `unsubscribe` push: the subscription is gone (until
    /// the application subscribes again), so it is not recovered after a
    /// reconnect either.
    fn unsubscribed(&mut self, u: &Value) {
        let channel = u["channel"].as_str().unwrap_or("").to_owned();
        if self.subs.remove(&channel).is_none() {
            return;
        }
        self.emit(ClientEvent::Unsubscribed {
            channel,
            code: u["code"]
                .as_u64()
                .and_then(|c| u16::try_from(c).ok())
                .unwrap_or(0),
            reason: u["reason"].as_str().unwrap_or("").to_owned(),
        });
    }

    fn push(&mut self, v: &Value) {
        if let Some(p) = v.get("pub") {
            let channel = p["channel"].as_str().unwrap_or("").to_owned();
            let offset = p["offset"].as_u64().unwrap_or(0);
            let Some(sub) = self.subs.get_mut(&channel) else {
                return;
            };
            if offset > 0 {
                // Never hand the application a message twice.
                if let Some((last, _epoch)) = &mut sub.position {
                    if offset <= *last {
                        return;
                    }
                    *last = offset;
                }
            }
            let data = match (p.get("data"), p.get("text"), p.get("base64")) {
                (Some(d), _, _) => d.clone(),
                (_, Some(t), _) => json!({ "text": t }),
                (_, _, Some(b)) => json!({ "base64": b }),
                _ => Value::Null,
            };
            self.emit(ClientEvent::Publication {
                channel,
                offset,
                data,
                info: p.get("info").cloned(),
            });
        } else if let Some(e) = v.get("epoch") {
            // History was lost: offsets start again in a new epoch.
            let channel = e["channel"].as_str().unwrap_or("").to_owned();
            if let Some(sub) = self.subs.get_mut(&channel) {
                sub.position = Some((0, e["epoch"].as_str().unwrap_or("").to_owned()));
                self.emit(ClientEvent::RecoveryFailed { channel });
            }
        } else if let Some(u) = v.get("unsubscribe") {
            self.unsubscribed(u);
        } else if let Some(j) = v.get("join") {
            self.emit(ClientEvent::Join {
                channel: j["channel"].as_str().unwrap_or("").to_owned(),
                info: j["info"].clone(),
            });
        } else if let Some(l) = v.get("leave") {
            self.emit(ClientEvent::Leave {
                channel: l["channel"].as_str().unwrap_or("").to_owned(),
                info: l["info"].clone(),
            });
        }
    }
}
