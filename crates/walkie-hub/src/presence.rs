//! Presence: who is subscribed to a channel, across every node.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;

use crate::channel::ChannelName;
use crate::engine::{BoxFuture, EngineError};
use crate::memory::lock;

/// One connection as others see it in presence and join/leave events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    /// The connection's id, unique across nodes.
    pub client: String,
    /// The user id (`""` for anonymous).
    pub user: String,
    /// The token's `info` claim (a JSON object), if any.
    pub info: Option<Bytes>,
}

impl ClientInfo {
    /// The JSON object for pushes and replies:
    /// `{"user":..,"client":..,"info":..}`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut o = serde_json::Map::new();
        o.insert("user".into(), self.user.clone().into());
        o.insert("client".into(), self.client.clone().into());
        if let Some(info) = &self.info {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(info) {
                o.insert("info".into(), v);
            }
        }
        serde_json::Value::Object(o)
    }
}

/// A presence reply: `clients` (by connection id) and `users`: one entry
/// per user however many connections (tabs, nodes) it has, with its info
/// and its number of connections. Anonymous connections are under `""`.
pub fn presence_json(clients: HashMap<String, ClientInfo>) -> serde_json::Value {
    let mut users = serde_json::Map::new();
    for info in clients.values() {
        let entry = users.entry(info.user.clone()).or_insert_with(|| {
            let mut e = info.to_json();
            if let Some(o) = e.as_object_mut() {
                o.remove("client");
                o.insert("clients".into(), 0.into());
            }
            e
        });
        if let Some(n) = entry.get("clients").and_then(serde_json::Value::as_u64) {
            entry["clients"] = (n + 1).into();
        }
    }
    let clients: serde_json::Map<String, serde_json::Value> = clients
        .into_iter()
        .map(|(id, info)| (id, info.to_json()))
        .collect();
    serde_json::json!({ "clients": clients, "users": users })
}

/// Presence counts: connections and distinct users.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceStats {
    /// Connections present.
    pub clients: usize,
    /// Distinct users among them (anonymous connections count as one).
    pub users: usize,
}

impl PresenceStats {
    /// Counts from a presence map.
    pub fn of(clients: &HashMap<String, ClientInfo>) -> Self {
        let users: std::collections::HashSet<&str> =
            clients.values().map(|c| c.user.as_str()).collect();
        PresenceStats {
            clients: clients.len(),
            users: users.len(),
        }
    }
}

/// Where presence is kept.
///
/// # Contract
///
/// - `add` is idempotent: adding the same client again replaces its info
///   (and, in engines that expire entries, refreshes it).
/// - `remove` of an absent client is not an error.
/// - `presence` returns every client added and not removed, on every node
///   (for shared engines: not expired; a dead node's clients disappear
///   within the engine's expiry).
/// - Channels are isolated.
pub trait PresenceManager: Send + Sync + 'static {
    /// Adds (or refreshes) a client in a channel.
    fn add(&self, channel: ChannelName, info: ClientInfo)
    -> BoxFuture<'_, Result<(), EngineError>>;

    /// Removes a client from a channel.
    fn remove(
        &self,
        channel: ChannelName,
        client: String,
    ) -> BoxFuture<'_, Result<(), EngineError>>;

    /// The clients in a channel, by client id.
    fn presence(
        &self,
        channel: ChannelName,
    ) -> BoxFuture<'_, Result<HashMap<String, ClientInfo>, EngineError>>;
}

/// Presence in memory, for one node.
#[derive(Debug, Default)]
pub struct MemoryPresence {
    channels: Mutex<HashMap<ChannelName, HashMap<String, ClientInfo>>>,
}

impl MemoryPresence {
    /// Empty.
    pub fn new() -> Self {
        Self::default()
    }
}

impl PresenceManager for MemoryPresence {
    fn add(
        &self,
        channel: ChannelName,
        info: ClientInfo,
    ) -> BoxFuture<'_, Result<(), EngineError>> {
        lock(&self.channels)
            .entry(channel)
            .or_default()
            .insert(info.client.clone(), info);
        Box::pin(std::future::ready(Ok(())))
    }

    fn remove(
        &self,
        channel: ChannelName,
        client: String,
    ) -> BoxFuture<'_, Result<(), EngineError>> {
        let mut channels = lock(&self.channels);
        if let Some(clients) = channels.get_mut(&channel) {
            clients.remove(&client);
            if clients.is_empty() {
                channels.remove(&channel);
            }
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn presence(
        &self,
        channel: ChannelName,
    ) -> BoxFuture<'_, Result<HashMap<String, ClientInfo>, EngineError>> {
        let clients = lock(&self.channels)
            .get(&channel)
            .cloned()
            .unwrap_or_default();
        Box::pin(std::future::ready(Ok(clients)))
    }
}
