//! The durable engine: pub/sub within one process, like the memory engine,
//! with history kept in an embedded database (redb), so that a restart
//! keeps every channel's messages, offsets and epoch.
//!
//! One writer thread owns all writes. It takes the publishes waiting in its
//! queue, saves them in one transaction (one fsync for the batch: group
//! commit), and only then delivers them, in order. Reads run beside it on
//! the blocking pool: the database gives them a consistent snapshot.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use crate::channel::ChannelName;
use crate::codec::{decode, encode};
use crate::engine::{BoxFuture, Broker, BrokerEvents, EngineError};
use crate::publication::{
    History, HistoryFilter, NewPublication, Publication, PublishOptions, PublishResult,
    StreamPosition, new_epoch, now_ms,
};

/// Channel -> its stream's state (see [`Meta`]).
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// (channel, offset) -> one publication (see [`encode`]).
const PUBS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("publications");
/// (channel, idempotency key) -> offset (u64 LE), expiry in Unix ms (u64
/// LE), epoch: kept on disk, so that a publish retried across a restart is
/// still delivered once.
const KEYS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("idempotency_keys");
/// Expired idempotency keys are swept once per this many batches.
const SWEEP_EVERY: u64 = 256;

/// The most publishes saved in one transaction.
const MAX_BATCH: usize = 512;

/// The file in the data directory.
pub const DATABASE_FILE: &str = "history.redb";

/// Pub/sub in memory with history in an embedded database. See [`Broker`]
/// for the contract.
pub struct DurableBroker {
    db: Arc<Database>,
    requests: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
    events: Arc<OnceLock<Arc<dyn BrokerEvents>>>,
    path: PathBuf,
}

impl std::fmt::Debug for DurableBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableBroker")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Why the database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    Directory {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another process has the database open.
    #[error("{path} is in use by another process (another walkie with the same data directory?)")]
    InUse {
        /// The database file.
        path: PathBuf,
    },
    /// The file could not be opened or is not a valid database.
    #[error("cannot open {path}: {message}")]
    Database {
        /// The database file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

enum Request {
    Publish {
        channel: ChannelName,
        new: NewPublication,
        options: PublishOptions,
        reply: oneshot::Sender<Result<PublishResult, EngineError>>,
    },
    /// Gives a stream an epoch if it has none yet.
    Ensure {
        channel: ChannelName,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    Remove {
        channel: ChannelName,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
}

/// A stream's state as stored: the latest offset, the history TTL given
/// by the latest publish, and the epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Meta {
    top: u64,
    ttl_ms: u64,
    epoch: Arc<str>,
}

impl Meta {
    fn fresh() -> Meta {
        Meta {
            top: 0,
            ttl_ms: u64::MAX,
            epoch: new_epoch(),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16 + self.epoch.len());
        v.extend_from_slice(&self.top.to_le_bytes());
        v.extend_from_slice(&self.ttl_ms.to_le_bytes());
        v.extend_from_slice(self.epoch.as_bytes());
        v
    }

    fn decode(b: &[u8]) -> Result<Meta, EngineError> {
        let corrupt = || EngineError::Storage("corrupt stream metadata".into());
        if b.len() < 16 {
            return Err(corrupt());
        }
        let epoch = std::str::from_utf8(&b[16..]).map_err(|_| corrupt())?;
        Ok(Meta {
            top: u64::from_le_bytes(b[..8].try_into().map_err(|_| corrupt())?),
            ttl_ms: u64::from_le_bytes(b[8..16].try_into().map_err(|_| corrupt())?),
            epoch: epoch.into(),
        })
    }
}

fn storage(e: impl std::fmt::Display) -> EngineError {
    EngineError::Storage(e.to_string())
}

impl DurableBroker {
    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Self, OpenError> {
        std::fs::create_dir_all(dir).map_err(|source| OpenError::Directory {
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join(DATABASE_FILE);
        let db = match Database::create(&path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(OpenError::InUse { path }),
            Err(e) => {
                return Err(OpenError::Database {
                    path,
                    message: e.to_string(),
                });
            }
        };
        let db = Arc::new(db);
        // Create the tables, so that readers never meet a missing one.
        let init = || -> Result<(), redb::Error> {
            let txn = db.begin_write()?;
            txn.open_table(META)?;
            txn.open_table(PUBS)?;
            txn.open_table(KEYS)?;
            txn.commit()?;
            Ok(())
        };
        init().map_err(|e| OpenError::Database {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let (tx, rx) = mpsc::channel();
        let events: Arc<OnceLock<Arc<dyn BrokerEvents>>> = Arc::default();
        let writer = Writer {
            db: db.clone(),
            events: events.clone(),
            batches: 0,
        };
        let writer = std::thread::Builder::new()
            .name("walkie-history".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| OpenError::Database {
                path: path.clone(),
                message: format!("cannot start the writer thread: {e}"),
            })?;
        Ok(DurableBroker {
            db,
            requests: Some(tx),
            writer: Some(writer),
            events,
            path,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn send(&self, request: Request) -> Result<(), EngineError> {
        self.requests
            .as_ref()
            .ok_or(EngineError::Stopped)?
            .send(request)
            .map_err(|_| EngineError::Stopped)
    }

    /// Reads history from a snapshot; `None` if the stream has no epoch yet.
    fn read(
        db: &Database,
        channel: &ChannelName,
        filter: HistoryFilter,
    ) -> Result<Option<History>, EngineError> {
        let txn = db.begin_read().map_err(storage)?;
        let meta = txn.open_table(META).map_err(storage)?;
        let Some(meta) = meta.get(channel.as_str()).map_err(storage)? else {
            return Ok(None);
        };
        let meta = Meta::decode(meta.value())?;
        let pubs = txn.open_table(PUBS).map_err(storage)?;
        let oldest_kept = now_ms().saturating_sub(meta.ttl_ms);
        let from = filter.since.unwrap_or(0).saturating_add(1);
        let limit = filter.limit.unwrap_or(usize::MAX);
        let range = pubs
            .range((channel.as_str(), from)..=(channel.as_str(), u64::MAX))
            .map_err(storage)?;
        let mut publications = Vec::new();
        let mut take = |entry: Result<_, redb::StorageError>| -> Result<bool, EngineError> {
            let (k, v): (redb::AccessGuard<(&str, u64)>, redb::AccessGuard<&[u8]>) =
                entry.map_err(storage)?;
            let p = decode(k.value().1, v.value())?;
            if p.time_ms >= oldest_kept {
                publications.push(p);
            }
            Ok(publications.len() < limit)
        };
        if limit > 0 {
            if filter.reverse {
                for entry in range.rev() {
                    if !take(entry)? {
                        break;
                    }
                }
            } else {
                for entry in range {
                    if !take(entry)? {
                        break;
                    }
                }
            }
        }
        Ok(Some(History {
            publications,
            position: StreamPosition {
                offset: meta.top,
                epoch: meta.epoch,
            },
        }))
    }
}

impl Drop for DurableBroker {
    fn drop(&mut self) {
        // Closing the queue stops the writer once it has saved what is queued.
        self.requests = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl Broker for DurableBroker {
    fn set_events(&self, events: Arc<dyn BrokerEvents>) {
        let _ = self.events.set(events);
    }

    fn subscribe(&self, _channel: ChannelName) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn unsubscribe(&self, _channel: ChannelName) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn publish(
        &self,
        channel: ChannelName,
        new: NewPublication,
        options: PublishOptions,
    ) -> BoxFuture<'_, Result<PublishResult, EngineError>> {
        Box::pin(async move {
            if options.history.is_none() && options.idempotency_key.is_none() {
                // Nothing to save: deliver at once instead of waiting for
                // the next commit (positions, presence events).
                let db = self.db.clone();
                let ch = channel.clone();
                let filter = HistoryFilter {
                    since: None,
                    limit: Some(0),
                    reverse: false,
                };
                let read = tokio::task::spawn_blocking(move || Self::read(&db, &ch, filter))
                    .await
                    .map_err(|e| storage(format!("history read failed: {e}")))??;
                let epoch: Arc<str> = read.map_or_else(|| "".into(), |h| h.position.epoch);
                let publication = new.at(0);
                if let Some(events) = self.events.get() {
                    events.handle_publication(&channel, &publication, &epoch);
                }
                return Ok(PublishResult {
                    position: StreamPosition { offset: 0, epoch },
                    suppressed: false,
                });
            }
            let (reply, rx) = oneshot::channel();
            self.send(Request::Publish {
                channel,
                new,
                options,
                reply,
            })?;
            rx.await.map_err(|_| EngineError::Stopped)?
        })
    }

    fn history(
        &self,
        channel: ChannelName,
        filter: HistoryFilter,
    ) -> BoxFuture<'_, Result<History, EngineError>> {
        Box::pin(async move {
            loop {
                let db = self.db.clone();
                let ch = channel.clone();
                let read = tokio::task::spawn_blocking(move || Self::read(&db, &ch, filter))
                    .await
                    .map_err(|e| storage(format!("history read failed: {e}")))??;
                if let Some(history) = read {
                    return Ok(history);
                }
                let (reply, rx) = oneshot::channel();
                self.send(Request::Ensure {
                    channel: channel.clone(),
                    reply,
                })?;
                rx.await.map_err(|_| EngineError::Stopped)??;
            }
        })
    }

    fn remove_history(&self, channel: ChannelName) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async move {
            let (reply, rx) = oneshot::channel();
            self.send(Request::Remove { channel, reply })?;
            rx.await.map_err(|_| EngineError::Stopped)?
        })
    }
}

/// The writer thread's state.
struct Writer {
    db: Arc<Database>,
    events: Arc<OnceLock<Arc<dyn BrokerEvents>>>,
    /// Batches applied, for sweeping expired idempotency keys.
    batches: u64,
}

/// What one request in a batch did, before the commit.
enum Done {
    Published {
        channel: ChannelName,
        publication: Option<Publication>,
        result: PublishResult,
        reply: oneshot::Sender<Result<PublishResult, EngineError>>,
    },
    Unit(oneshot::Sender<Result<(), EngineError>>),
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Request>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            self.apply(batch);
        }
    }

    fn apply(&mut self, batch: Vec<Request>) {
        let now = now_ms();
        self.batches += 1;
        let sweep = self.batches % SWEEP_EVERY == 0;
        let mut done = Vec::with_capacity(batch.len());
        let outcome = (|| -> Result<(), redb::Error> {
            let txn = self.db.begin_write()?;
            {
                let mut meta = txn.open_table(META)?;
                let mut pubs = txn.open_table(PUBS)?;
                let mut keys = txn.open_table(KEYS)?;
                if sweep {
                    keys.retain(|_, v| expiry(v) > now)?;
                }
                let mut metas: HashMap<ChannelName, Meta> = HashMap::new();
                for request in batch {
                    match request {
                        Request::Publish {
                            channel,
                            new,
                            options,
                            reply,
                        } => {
                            let m = match metas.get_mut(&channel) {
                                Some(m) => m,
                                None => {
                                    let stored = meta
                                        .get(channel.as_str())?
                                        .map(|g| Meta::decode(g.value()));
                                    let m = match stored {
                                        Some(Ok(m)) => m,
                                        Some(Err(e)) => {
                                            let _ = reply.send(Err(e));
                                            continue;
                                        }
                                        None => Meta::fresh(),
                                    };
                                    metas.entry(channel.clone()).or_insert(m)
                                }
                            };
                            if let Some(key) = &options.idempotency_key {
                                // The transaction sees its own writes: a key
                                // used earlier in this batch counts too.
                                let earlier = keys
                                    .get((channel.as_str(), key.as_str()))?
                                    .and_then(|v| seen(v.value(), now));
                                if let Some(position) = earlier {
                                    let _ = reply.send(Ok(PublishResult {
                                        position,
                                        suppressed: true,
                                    }));
                                    continue;
                                }
                            }
                            let (publication, offset) = match options.history {
                                Some(h) => {
                                    m.top += 1;
                                    m.ttl_ms = u64::try_from(h.ttl.as_millis()).unwrap_or(u64::MAX);
                                    let p = new.at(m.top);
                                    pubs.insert((channel.as_str(), m.top), encode(&p).as_slice())?;
                                    trim(&mut pubs, &channel, m, h.size)?;
                                    (p, m.top)
                                }
                                None => (new.at(0), 0),
                            };
                            let result = PublishResult {
                                position: StreamPosition {
                                    offset,
                                    epoch: m.epoch.clone(),
                                },
                                suppressed: false,
                            };
                            if let Some(key) = &options.idempotency_key {
                                let ttl = u64::try_from(options.idempotency_ttl().as_millis())
                                    .unwrap_or(u64::MAX);
                                let mut v = Vec::with_capacity(16 + m.epoch.len());
                                v.extend_from_slice(&offset.to_le_bytes());
                                v.extend_from_slice(&now.saturating_add(ttl).to_le_bytes());
                                v.extend_from_slice(m.epoch.as_bytes());
                                keys.insert((channel.as_str(), key.as_str()), v.as_slice())?;
                            }
                            done.push(Done::Published {
                                channel,
                                publication: Some(publication),
                                result,
                                reply,
                            });
                        }
                        Request::Ensure { channel, reply } => {
                            if !metas.contains_key(&channel)
                                && meta.get(channel.as_str())?.is_none()
                            {
                                metas.insert(channel, Meta::fresh());
                            }
                            done.push(Done::Unit(reply));
                        }
                        Request::Remove { channel, reply } => {
                            pubs.retain_in(
                                (channel.as_str(), 0)..=(channel.as_str(), u64::MAX),
                                |_, _| false,
                            )?;
                            metas.insert(channel, Meta::fresh());
                            done.push(Done::Unit(reply));
                        }
                    }
                }
                for (channel, m) in &metas {
                    meta.insert(channel.as_str(), m.encode().as_slice())?;
                }
            }
            txn.commit()?;
            Ok(())
        })();
        let events = self.events.get();
        for d in done {
            match (d, &outcome) {
                (
                    Done::Published {
                        channel,
                        publication,
                        result,
                        reply,
                    },
                    Ok(()),
                ) => {
                    if let (Some(events), Some(p)) = (events, &publication) {
                        events.handle_publication(&channel, p, &result.position.epoch);
                    }
                    let _ = reply.send(Ok(result));
                }
                (Done::Published { reply, .. }, Err(e)) => {
                    let _ = reply.send(Err(storage(e)));
                }
                (Done::Unit(reply), Ok(())) => {
                    let _ = reply.send(Ok(()));
                }
                (Done::Unit(reply), Err(e)) => {
                    let _ = reply.send(Err(storage(e)));
                }
            }
        }
        if let Err(e) = outcome {
            tracing::error!("history: saving a batch failed: {e}");
        }
    }
}

/// An idempotency entry's expiry (Unix ms).
fn expiry(v: &[u8]) -> u64 {
    v.get(8..16)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// The position an unexpired idempotency entry recorded.
fn seen(v: &[u8], now: u64) -> Option<StreamPosition> {
    if expiry(v) <= now {
        return None;
    }
    let offset = u64::from_le_bytes(v.get(..8)?.try_into().ok()?);
    let epoch = std::str::from_utf8(v.get(16..)?).ok()?;
    Some(StreamPosition {
        offset,
        epoch: epoch.into(),
    })
}

/// Drops what falls out of the history's size and age limits.
fn trim(
    pubs: &mut redb::Table<(&str, u64), &[u8]>,
    channel: &ChannelName,
    meta: &Meta,
    size: usize,
) -> Result<(), redb::Error> {
    let size = size.max(1) as u64;
    let oldest_kept = now_ms().saturating_sub(meta.ttl_ms);
    let first_kept = meta.top.saturating_sub(size) + 1;
    let ch = channel.as_str();
    // Older entries were trimmed by earlier publishes: the range is short.
    pubs.retain_in((ch, 0)..(ch, first_kept), |_, _| false)?;
    let mut expired = Vec::new();
    for entry in pubs.range((ch, 0)..=(ch, meta.top))? {
        let (k, v) = entry?;
        match decode(k.value().1, v.value()) {
            Ok(p) if p.time_ms < oldest_kept => expired.push(k.value().1),
            _ => break,
        }
    }
    for offset in expired {
        pubs.remove((ch, offset))?;
    }
    Ok(())
}
