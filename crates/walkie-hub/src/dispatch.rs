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
use crate::queue::{Queue, Queued, queue_key};

/// One subscriber of one channel on this node.
#[derive(Debug)]
pub(crate) struct Member {
    pub(crate) client: u64,
    pub(crate) queue: Arc<Queue>,
    pub(crate) format: Format,
    /// While joining: what the fan-out does with this member's
    /// publications until its history is queued. Boxed: a member joins
    /// once and stays, and this keeps every member's entry 16 bytes
    /// smaller.
    pub(crate) joining: Option<Box<Joining>>,
    /// The latest offset queued, and its epoch: a publication the history
    /// read already returned (an engine may deliver it after it became
    /// readable) is not queued twice.
    pub(crate) last: u64,
    pub(crate) epoch: Arc<str>,
}

/// A member that is not live yet.
#[derive(Debug)]
pub(crate) enum Joining {
    /// Its history is being read: publications that arrive meanwhile are
    /// kept here with their epoch, and queued after it without duplicates
    /// (or, where the epoch is not the one history was read in, the
    /// subscriber is told to recover).
    Reading(Vec<(Publication, Arc<str>)>),
    /// Its recovery is larger than its queue, and is queued from history
    /// piece by piece as the client reads (see `recovery.rs`): the fan-out
    /// skips it, noting the newest offset it skipped, which history holds
    /// and a later piece queues.
    CatchingUp {
        /// The newest offset skipped (or known to be in history).
        behind: u64,
        /// How many messages the next piece reads: grows while pieces fit
        /// whole, and shrinks to what fitted when they do not, so that a
        /// channel of large messages is not read a queue's count at a time
        /// only to keep a few.
        read: u32,
    },
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
    pub(crate) channels: Mutex<HashMap<ChannelName, Arc<Mutex<Members>>>>,
    pub(crate) metrics: Arc<Metrics>,
    /// Connected users' queues, to disconnect a user from every node's
    /// API call. Weak: a connection that ends takes its entry with it.
    pub(crate) users: Mutex<UserQueues>,
    /// This node's random id, the prefix of its client ids.
    pub(crate) node: Arc<str>,
    /// Where publications go when an engine delivers them from its own
    /// thread (see [`Hub::deliver_here`]).
    pub(crate) home: OnceLock<tokio::sync::mpsc::UnboundedSender<Forwarded>>,
    /// The epoch and offset of the latest control message acted on: an
    /// engine's catch-up may deliver one again.
    pub(crate) control_seen: Mutex<(Arc<str>, u64)>,
}

/// How old a control message may be and still be acted on: one a node
/// missed (it was cut off from the engine) comes with the engine's
/// catch-up, but a user disconnected long ago may have come back since.
pub(crate) const CONTROL_MAX_AGE_MS: u64 = 60_000;

impl Dispatch {
    pub(crate) fn members(&self, channel: &ChannelName) -> Option<Arc<Mutex<Members>>> {
        lock(&self.channels).get(channel).cloned()
    }

    /// Queues now what `channel` has pending for its members here, rather
    /// than when its scheduled flush runs (which then finds nothing).
    pub(crate) fn flush_now(&self, channel: &ChannelName) {
        if let Some(members) = self.members(channel) {
            lock(&members).flush(channel, &self.metrics);
        }
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

    /// Acts on a message from another node, once, and only while it is
    /// recent (see [`CONTROL_MAX_AGE_MS`]).
    fn handle_control(&self, publication: &Publication, epoch: &str) {
        if publication.offset != 0 {
            let mut seen = lock(&self.control_seen);
            if *seen.0 == *epoch && publication.offset <= seen.1 {
                return;
            }
            *seen = (epoch.into(), publication.offset);
        }
        let age = crate::publication::now_ms().saturating_sub(publication.time_ms);
        if age > CONTROL_MAX_AGE_MS {
            tracing::info!(age_ms = age, "ignored a control message from long ago");
            return;
        }
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

/// What the delivery task is handed (see [`Hub::deliver_here`]).
pub(crate) enum Forwarded {
    /// A publication to queue for the channel's subscribers here.
    Publication(ChannelName, Publication, Arc<str>),
    /// Answered once everything handed over before it was given to
    /// `Dispatch::deliver` (see [`Hub::delivered`](crate::Hub::delivered)).
    Fence(tokio::sync::oneshot::Sender<()>),
}

impl BrokerEvents for Dispatch {
    fn handle_publication(&self, channel: &ChannelName, publication: &Publication, epoch: &str) {
        if let Some(home) = self.home.get() {
            // Every publication takes this one path once it is set, so the
            // order per channel holds.
            let forwarded =
                Forwarded::Publication(channel.clone(), publication.clone(), epoch.into());
            if home.send(forwarded).is_ok() {
                return;
            }
        }
        self.deliver(channel, publication, epoch);
    }

    /// Closes the queues of `channel`'s members here with
    /// [`QueueClosed::Unavailable`](crate::QueueClosed::Unavailable): close
    /// 1011, and the clients reconnect and recover.
    fn channel_unavailable(&self, channel: &ChannelName) {
        let Some(members) = self.members(channel) else {
            return;
        };
        let queues: Vec<Arc<Queue>> = lock(&members)
            .list
            .iter()
            .map(|m| m.queue.clone())
            .collect();
        tracing::warn!(%channel, members = queues.len(), "engine cannot deliver the channel in order: its members are cut off to recover");
        for queue in queues {
            queue.close(crate::QueueClosed::Unavailable);
        }
    }
}

impl Dispatch {
    /// Queues a publication for every local subscriber of `channel`.
    ///
    /// On a tokio runtime the queuing is deferred to a task spawned for the
    /// purpose, and every publication of the channel that arrives before it
    /// runs joins the same batch: a publisher that sent ten messages in one
    /// read costs each subscriber one lock and one wake, not ten. The task
    /// runs after the tasks already scheduled, in the same turn of the
    /// runtime, so a quiet channel's publication is not delayed by more
    /// than the current turn. Outside a runtime, the publication is queued
    /// at once.
    pub(crate) fn deliver(&self, channel: &ChannelName, publication: &Publication, epoch: &str) {
        let Some(members) = self.members(channel) else {
            if channel.as_str() == CONTROL_CHANNEL {
                self.handle_control(publication, epoch);
            }
            return;
        };
        let mut group = lock(&members);
        // One shared epoch per channel, so that members compare pointers.
        // A publication without an offset has none worth keeping (engines
        // give it ""): switching to it and back would cost an allocation
        // each way and turn off the shared batch.
        if publication.offset != 0 && *group.epoch != *epoch {
            group.epoch = epoch.into();
        }
        let epoch = group.epoch.clone();
        group.pending.push((publication.clone(), epoch));
        if group.pending.len() > 1 {
            // A flush is already scheduled and will take this one too.
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                drop(group);
                let flush = Flush {
                    members,
                    channel: channel.clone(),
                    metrics: self.metrics.clone(),
                };
                // Unconstrained: tokio's budget would otherwise turn every
                // socket write after the first 128 in one flush into a
                // "not now" (see `Sink`), and the pass is bounded anyway.
                rt.spawn(tokio::task::coop::unconstrained(async move { drop(flush) }));
            }
            Err(_) => group.flush(channel, &self.metrics),
        }
    }
}

/// A scheduled flush of a channel's pending publications. It flushes when
/// dropped: when its task runs, or when a runtime shutting down drops the
/// task unrun, so that no publication is stranded.
struct Flush {
    members: Arc<Mutex<Members>>,
    channel: ChannelName,
    metrics: Arc<Metrics>,
}

impl Drop for Flush {
    fn drop(&mut self) {
        lock(&self.members).flush(&self.channel, &self.metrics);
    }
}

/// The subscribers of one channel on this node, and the publications not
/// yet queued for them.
#[derive(Debug)]
pub(crate) struct Members {
    pub(crate) list: Vec<Member>,
    /// In offset order, with each one's epoch.
    pending: Vec<(Publication, Arc<str>)>,
    /// Reused for each member's share of a batch.
    scratch: Vec<Queued>,
    /// The latest epoch delivered.
    epoch: Arc<str>,
}

impl Default for Members {
    fn default() -> Self {
        Members {
            list: Vec::new(),
            pending: Vec::new(),
            scratch: Vec::new(),
            epoch: "".into(),
        }
    }
}

impl Members {
    /// Queues every pending publication for every member, member by
    /// member: each member's queue is locked and its task woken once per
    /// batch, and its memory is touched while it is hot.
    fn flush(&mut self, channel: &ChannelName, metrics: &Metrics) {
        if self.pending.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.pending);
        let now = crate::publication::now_ms();
        for (p, _) in &pending {
            if p.time_ms != 0 {
                metrics.observe_latency_ms(now.saturating_sub(p.time_ms));
            }
        }
        // Framed once per format, on first use, and shared by every
        // subscriber of that format.
        let mut raw: Vec<Option<Option<PreparedMessage>>> = vec![None; pending.len()];
        let mut json = raw.clone();
        // Queue keys name the channel too (only state-like channels have
        // keys: usually nothing to make).
        let keys: Vec<Option<Arc<str>>> = if pending.iter().any(|(p, _)| p.key.is_some()) {
            pending.iter().map(|(p, _)| queue_key(channel, p)).collect()
        } else {
            Vec::new()
        };
        let key = |i: usize| keys.get(i).cloned().flatten();
        // The whole batch in each format, stored once for every member that
        // gets all of it (the usual case): all of one epoch, none seen yet.
        let epoch = &pending[0].1;
        let unnumbered = pending.iter().all(|(p, _)| p.offset == 0);
        let numbered = pending
            .iter()
            .all(|(p, e)| p.offset != 0 && Arc::ptr_eq(e, epoch));
        let first = pending[0].0.offset;
        let last = pending[pending.len() - 1].0.offset;
        let mut whole: [Option<(Arc<[Queued]>, usize)>; 2] = [None, None];
        let mut out = std::mem::take(&mut self.scratch);
        let mut delivered = 0u64;
        let mut delivered_bytes = 0u64;
        for m in &mut self.list {
            // Catching up: numbered publications come from history in
            // turn; events without an offset (join, leave) are queued now,
            // as history does not keep them.
            let catching_up = match m.joining.as_deref_mut() {
                Some(Joining::Reading(arrived)) => {
                    // Held until the history read ends, within what the
                    // queue could take then: a subscriber whose read is
                    // slow (a network engine) on a busy channel is cut off
                    // (1013: reconnect and recover) rather than held in
                    // memory without bound.
                    if arrived.len() + pending.len() > m.queue.limits().0 {
                        *arrived = Vec::new();
                        m.queue.close(crate::QueueClosed::SlowConsumer);
                    } else if !m.queue.is_closed() {
                        arrived.extend(pending.iter().cloned());
                    }
                    continue;
                }
                Some(Joining::CatchingUp { behind, .. }) => {
                    // Not `last`: a batch may end with an event that has
                    // no offset. Worked out here, as this case is rare.
                    let newest = pending.iter().map(|(p, _)| p.offset).max();
                    *behind = (*behind).max(newest.unwrap_or(0));
                    true
                }
                None => false,
            };
            let takes_all = unnumbered
                || (numbered && !catching_up && Arc::ptr_eq(&m.epoch, epoch) && m.last < first);
            if takes_all {
                let i = match m.format {
                    Format::Raw => 0,
                    Format::Json => 1,
                };
                let frames = if i == 0 { &mut raw } else { &mut json };
                let (batch, bytes) = whole[i].get_or_insert_with(|| {
                    let batch: Arc<[Queued]> = pending
                        .iter()
                        .zip(frames.iter_mut())
                        .enumerate()
                        .filter_map(|(i, ((p, _), slot))| {
                            let message = slot
                                .get_or_insert_with(|| frame(channel, p, m.format))
                                .clone()?;
                            Some(Queued {
                                message,
                                key: key(i),
                            })
                        })
                        .collect();
                    let bytes = batch.iter().map(|q| q.message.message().len()).sum();
                    (batch, bytes)
                });
                if numbered {
                    m.last = last;
                }
                if !batch.is_empty() {
                    m.queue.push_shared(batch, *bytes);
                    delivered += batch.len() as u64;
                    delivered_bytes += *bytes as u64;
                }
                continue;
            }
            for (i, (publication, epoch)) in pending.iter().enumerate() {
                if publication.offset != 0 {
                    if catching_up {
                        continue;
                    }
                    // Members share the batch's epoch: comparing pointers
                    // is the usual case.
                    let same_epoch = Arc::ptr_eq(&m.epoch, epoch) || *m.epoch == **epoch;
                    if same_epoch && publication.offset <= m.last {
                        continue;
                    }
                    if !same_epoch && !m.epoch.is_empty() && m.format == Format::Json {
                        // History was lost (a new epoch): tell the client,
                        // so that it starts counting offsets again.
                        let notice = serde_json::json!({"epoch": {"channel": channel.as_str(), "epoch": &**epoch}});
                        out.push(Queued {
                            message: PreparedMessage::new(Message::text(notice.to_string())),
                            key: None,
                        });
                    }
                    m.epoch = epoch.clone();
                    m.last = publication.offset;
                }
                let slot = match m.format {
                    Format::Raw => &mut raw[i],
                    Format::Json => &mut json[i],
                };
                let Some(message) =
                    slot.get_or_insert_with(|| frame(channel, publication, m.format))
                else {
                    continue;
                };
                delivered_bytes += message.message().len() as u64;
                out.push(Queued {
                    message: message.clone(),
                    key: key(i),
                });
                delivered += 1;
            }
            if !out.is_empty() {
                m.queue.push_all(&mut out);
            }
        }
        self.scratch = out;
        // Keep the allocation for the next batch.
        self.pending = pending;
        self.pending.clear();
        // One shared counter update per batch, not per subscriber.
        metrics.messages_out.fetch_add(delivered, Ordering::Relaxed);
        metrics
            .bytes_out
            .fetch_add(delivered_bytes, Ordering::Relaxed);
    }
}

/// Each connected user's connections: client number and queue.
pub(crate) type UserQueues = HashMap<String, Vec<(u64, Weak<Queue>)>>;
