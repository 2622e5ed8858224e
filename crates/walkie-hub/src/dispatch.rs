//! Fan-out on one node: the subscribers of every channel, and queuing
//! each publication for them from one framed copy. The broker calls
//! [`Dispatch`] (as [`BrokerEvents`]); the [`Hub`](crate::Hub) and its
//! clients add and remove members.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use walkie_proto::{Message, PreparedMessage, Utf8Bytes};

use crate::channel::ChannelName;
use crate::engine::BrokerEvents;
use crate::hub::Format;
use crate::memory::lock;
use crate::metrics::Metrics;
use crate::publication::{Kind, Publication};
use crate::queue::{Queue, Queued};

/// One subscriber of one channel on this node.
#[derive(Debug)]
pub(crate) struct Member {
    pub(crate) client: u64,
    pub(crate) queue: Arc<Queue>,
    pub(crate) format: Format,
    /// While joining: publications that arrived during the history read,
    /// queued after it without duplicates.
    pub(crate) joining: Option<Vec<Publication>>,
    /// The latest offset queued, and its epoch: a publication the history
    /// read already returned (an engine may deliver it after it became
    /// readable) is not queued twice.
    pub(crate) last: u64,
    pub(crate) epoch: Arc<str>,
}

/// The channel on which nodes tell each other what to do (disconnect a
/// user). Every hub subscribes to it ([`Hub::listen_control`](crate::Hub::listen_control)); clients and
/// the API cannot reach it: no namespace can be named `$walkie`.
pub const CONTROL_CHANNEL: &str = "$walkie:control";

/// A message on [`CONTROL_CHANNEL`].
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Control {
    /// The node that sent it (which already acted on it).
    pub(crate) node: String,
    /// Close every connection of this user.
    pub(crate) disconnect: String,
}

/// The subscribers of every channel on this node. Shared with the broker,
/// which calls it for each publication.
#[derive(Debug)]
pub(crate) struct Dispatch {
    pub(crate) channels: Mutex<HashMap<ChannelName, Arc<Mutex<Vec<Member>>>>>,
    pub(crate) metrics: Arc<Metrics>,
    /// Connected users' queues, to disconnect a user from every node's
    /// API call. Weak: a connection that ends takes its entry with it.
    pub(crate) users: Mutex<UserQueues>,
    /// This node's random id, the prefix of its client ids.
    pub(crate) node: Arc<str>,
    /// Where publications go when an engine delivers them from its own
    /// thread (see [`Hub::deliver_here`]).
    pub(crate) home: OnceLock<tokio::sync::mpsc::UnboundedSender<Forwarded>>,
}

impl Dispatch {
    pub(crate) fn members(&self, channel: &ChannelName) -> Option<Arc<Mutex<Vec<Member>>>> {
        lock(&self.channels).get(channel).cloned()
    }

    /// Closes every connection of `user` on this node; returns how many.
    pub(crate) fn disconnect_user(&self, user: &str) -> usize {
        let queues = lock(&self.users).remove(user).unwrap_or_default();
        let mut n = 0;
        for (_, queue) in queues {
            if let Some(q) = queue.upgrade() {
                q.close(crate::queue::QueueClosed::Disconnected);
                n += 1;
            }
        }
        n
    }

    /// Acts on a message from another node.
    fn handle_control(&self, publication: &Publication) {
        match serde_json::from_slice::<Control>(&publication.data) {
            Ok(c) if *c.node == *self.node => {}
            Ok(c) => {
                let n = self.disconnect_user(&c.disconnect);
                tracing::info!(user = %c.disconnect, from = %c.node, connections = n, "user disconnected by another node");
            }
            Err(e) => tracing::warn!("ignored a malformed control message: {e}"),
        }
    }
}

/// Frames a publication for `format`; `None` if that format does not carry
/// it.
pub(crate) fn frame(
    channel: &ChannelName,
    publication: &Publication,
    format: Format,
) -> Option<PreparedMessage> {
    let message = match format {
        Format::Raw => match publication.kind {
            Kind::Binary => Message::Binary(publication.data.clone()),
            Kind::Text | Kind::Json => match Utf8Bytes::try_from(publication.data.clone()) {
                Ok(text) => Message::Text(text),
                // Engines keep text valid; a damaged store still must not
                // produce an invalid text frame.
                Err(_) => Message::Binary(publication.data.clone()),
            },
            Kind::Join | Kind::Leave => return None,
        },
        Format::Json => Message::text(crate::protocol::push(channel, publication)),
    };
    Some(PreparedMessage::new(message))
}

/// A publication handed to the delivery task (see [`Hub::deliver_here`]).
pub(crate) type Forwarded = (ChannelName, Publication, Arc<str>);

impl BrokerEvents for Dispatch {
    fn handle_publication(&self, channel: &ChannelName, publication: &Publication, epoch: &str) {
        if let Some(home) = self.home.get() {
            // Every publication takes this one path once it is set, so the
            // order per channel holds.
            if home
                .send((channel.clone(), publication.clone(), epoch.into()))
                .is_ok()
            {
                return;
            }
        }
        self.deliver(channel, publication, epoch);
    }
}

impl Dispatch {
    /// Queues a publication for every local subscriber of `channel`.
    pub(crate) fn deliver(&self, channel: &ChannelName, publication: &Publication, epoch: &str) {
        let Some(members) = self.members(channel) else {
            if channel.as_str() == CONTROL_CHANNEL {
                self.handle_control(publication);
            }
            return;
        };
        let mut members = lock(&members);
        if publication.time_ms != 0 {
            let ms = crate::publication::now_ms().saturating_sub(publication.time_ms);
            self.metrics.observe_latency_ms(ms);
        }
        // Framed once per format, on first use, and shared by every
        // subscriber of that format.
        let mut raw = None;
        let mut json = None;
        let mut delivered = 0u64;
        for m in members.iter_mut() {
            if let Some(joining) = &mut m.joining {
                joining.push(publication.clone());
                continue;
            }
            if publication.offset != 0 {
                if *m.epoch == *epoch && publication.offset <= m.last {
                    continue;
                }
                if *m.epoch != *epoch {
                    if !m.epoch.is_empty() && m.format == Format::Json {
                        // History was lost (a new epoch): tell the client,
                        // so that it starts counting offsets again.
                        let notice = serde_json::json!({"epoch": {"channel": channel.as_str(), "epoch": epoch}});
                        m.queue.push(Queued {
                            message: PreparedMessage::new(Message::text(notice.to_string())),
                            key: None,
                        });
                    }
                    m.epoch = epoch.into();
                }
                m.last = publication.offset;
            }
            let slot = match m.format {
                Format::Raw => &mut raw,
                Format::Json => &mut json,
            };
            let Some(message) = slot.get_or_insert_with(|| frame(channel, publication, m.format))
            else {
                continue;
            };
            m.queue.push(Queued {
                message: message.clone(),
                key: publication.key.clone(),
            });
            delivered += 1;
        }
        // One shared counter update per publication, not per subscriber.
        self.metrics
            .messages_out
            .fetch_add(delivered, Ordering::Relaxed);
    }
}

/// Each connected user's connections: client number and queue.
pub(crate) type UserQueues = HashMap<String, Vec<(u64, Weak<Queue>)>>;
