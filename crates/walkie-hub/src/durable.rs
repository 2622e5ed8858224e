//! The durable engine: pub/sub within one process, like the memory engine,
//! with history kept in an embedded database (redb), so that a restart
//! keeps every channel's messages, offsets and epoch.
//!
//! One writer thread owns all writes. It takes the publishes waiting in its
//! queue, saves them in one transaction (one fsync for the batch: group
//! commit), and only then delivers them, in order. Reads run beside it on
//! the blocking pool: the database gives them a consistent snapshot.
//!
//! The disk stays bounded by what history promises to keep. Every
//! [`DurableOptions::sweep_interval`] the writer sweeps, between batches:
//! it removes publications past their TTL and expired idempotency keys,
//! and forgets the row of a channel that has nothing left and that nobody
//! used for [`DurableOptions::forget_after`] (its next use starts a new
//! epoch, which the contract allows: its history is gone). A sweep step
//! looks at a bounded number of rows, in its own short transaction, so a
//! publish never waits long behind it. Reading a channel that has no row
//! writes nothing: the epoch it answers is held in memory (see [`Usage`])
//! until a publish stores it.

use std::collections::HashMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use crate::channel::ChannelName;
use crate::codec::{decode, encode};
use crate::engine::{BoxFuture, Broker, BrokerEvents, EngineError};
use crate::memory::lock;
use crate::publication::{
    History, HistoryFilter, NewPublication, Publication, PublishOptions, PublishRequest,
    PublishResult, StreamPosition, new_epoch, now_ms,
};

/// Channel -> its stream's state (see [`Meta`]).
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// (channel, offset) -> one publication (see [`encode`]).
const PUBS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("publications");
/// (channel, idempotency key) -> offset (u64 LE), expiry in Unix ms (u64
/// LE), epoch: kept on disk, so that a publish retried across a restart is
/// still delivered once.
const KEYS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("idempotency_keys");

/// "layout" -> the version of the layout of the tables above (u64), so that
/// a walkie never reads history it would misread: one of another layout
/// refuses to open it. Databases made before the version was written hold
/// layout 1.
const FORMAT: TableDefinition<&str, u64> = TableDefinition::new("format");

/// The layout this build reads and writes: the tables above, publications
/// as `codec::encode` writes them.
pub const LAYOUT: u64 = 1;

/// The most rows (channels, publications, idempotency keys) one sweep step
/// looks at: the step runs between two batches of publishes, which wait
/// for it, so it must stay short. A pass over a larger database takes
/// several steps, each after the batch waiting then.
const SWEEP_BUDGET: usize = 1024;

/// The pause between two steps of one sweep pass (or the sweep interval,
/// if shorter): a pass over a large database takes many steps, and
/// publishes keep most of the writer's time meanwhile.
const SWEEP_STEP_PAUSE: Duration = Duration::from_millis(10);

/// The default for [`DurableOptions::sweep_interval`]: expired history
/// stays on disk at most about this long past its TTL.
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// The default for [`DurableOptions::forget_after`]: as long as the memory
/// engine remembers an idle stream, so that a client coming back within
/// it still recovers, or learns that it cannot.
pub const DEFAULT_FORGET_AFTER: Duration = Duration::from_secs(3600);

/// How the durable engine looks after its disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurableOptions {
    /// How often the writer sweeps away expired publications and
    /// idempotency keys, and channels nobody needs (at least 1 ms). Default
    /// [`DEFAULT_SWEEP_INTERVAL`].
    pub sweep_interval: Duration,
    /// How long a channel with nothing left in history, no live
    /// idempotency key and no subscriber on this node keeps its offset and
    /// epoch after its last use (a read, publish, subscribe or
    /// unsubscribe; a restart counts as a use). After that its row is
    /// deleted and its next use starts a new epoch. Default
    /// [`DEFAULT_FORGET_AFTER`].
    pub forget_after: Duration,
}

impl Default for DurableOptions {
    fn default() -> Self {
        DurableOptions {
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
            forget_after: DEFAULT_FORGET_AFTER,
        }
    }
}

impl DurableOptions {
    /// The pause between two sweeps: never zero, which would keep the
    /// writer spinning.
    fn interval(&self) -> Duration {
        self.sweep_interval.max(Duration::from_millis(1))
    }
}

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
    usage: Arc<Mutex<Usage>>,
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
    /// The database holds history of another layout than this build's
    /// ([`LAYOUT`]), written by another version of walkie.
    #[error(
        "{path} holds history of layout {found}, and this walkie reads layout {LAYOUT} (the walkie that wrote it reads it)"
    )]
    Layout {
        /// The database file.
        path: PathBuf,
        /// The layout it holds.
        found: u64,
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

/// Where the writer's answer to a publish comes.
type Reply = oneshot::Receiver<Result<PublishResult, EngineError>>;

enum Request {
    Publish {
        channel: ChannelName,
        new: NewPublication,
        options: PublishOptions,
        reply: oneshot::Sender<Result<PublishResult, EngineError>>,
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
    /// A new stream in a new epoch.
    fn fresh() -> Meta {
        Meta::starting(new_epoch())
    }

    /// A new stream in `epoch`: the one readers were already told.
    fn starting(epoch: Arc<str>) -> Meta {
        Meta {
            top: 0,
            ttl_ms: u64::MAX,
            epoch,
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

/// What the engine knows of its channels' use beyond what is on disk,
/// shared by the readers and the writer. In memory only: a restart
/// forgets it, and counts as a use of every channel.
#[derive(Debug, Default)]
struct Usage(HashMap<ChannelName, Use>);

/// One channel's entry in [`Usage`].
#[derive(Debug)]
struct Use {
    /// The last read, publish, subscribe or unsubscribe.
    touched: Instant,
    /// Whether this node subscribes to the channel: its row is kept, so
    /// that its subscribers' epoch does not change under them.
    subscribed: bool,
    /// The epoch answered while the channel has no row on disk: reads
    /// agree on it, and the first publish keeps it, without a read ever
    /// writing to disk.
    unstored_epoch: Option<Arc<str>>,
}

impl Usage {
    /// Records a use of `channel` now.
    fn touch(&mut self, channel: &ChannelName, now: Instant) -> &mut Use {
        let entry = self.0.entry(channel.clone()).or_insert_with(|| Use {
            touched: now,
            subscribed: false,
            unstored_epoch: None,
        });
        entry.touched = now;
        entry
    }

    /// The epoch of `channel`, which has no row on disk.
    fn unstored_epoch(&mut self, channel: &ChannelName, now: Instant) -> Arc<str> {
        self.touch(channel, now)
            .unstored_epoch
            .get_or_insert_with(new_epoch)
            .clone()
    }

    /// `channel` has a row on disk now: the row holds its epoch.
    fn stored(&mut self, channel: &ChannelName, now: Instant) {
        self.touch(channel, now).unstored_epoch = None;
    }

    fn set_subscribed(&mut self, channel: &ChannelName, subscribed: bool, now: Instant) {
        self.touch(channel, now).subscribed = subscribed;
    }

    /// Whether nobody needs the channel named `name`: no subscriber here,
    /// and no use for `idle` (a channel not seen since `opened` was last
    /// used then).
    fn unneeded(&self, name: &str, now: Instant, opened: Instant, idle: Duration) -> bool {
        let entry = ChannelName::new(name).ok().and_then(|ch| self.0.get(&ch));
        match entry {
            Some(u) => !u.subscribed && now.saturating_duration_since(u.touched) >= idle,
            None => now.saturating_duration_since(opened) >= idle,
        }
    }

    /// Drops the entries of channels nobody used for `idle`, as the memory
    /// engine drops idle streams: a later read of a channel without a row
    /// gets a new epoch, as after lost history.
    fn forget_idle(&mut self, now: Instant, idle: Duration) {
        self.0
            .retain(|_, u| u.subscribed || now.saturating_duration_since(u.touched) < idle);
    }
}

impl DurableBroker {
    /// Opens (or creates) the database in `dir`, with the default options
    /// (`DurableOptions::default()`).
    pub fn open(dir: &Path) -> Result<Self, OpenError> {
        Self::open_with(dir, DurableOptions::default())
    }

    /// Opens (or creates) the database in `dir`.
    pub fn open_with(dir: &Path, options: DurableOptions) -> Result<Self, OpenError> {
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
        // The layout first, before any table is opened with this build's
        // types; then the tables, so that readers never meet a missing one.
        let found = || -> Result<Option<u64>, redb::Error> {
            let txn = db.begin_read()?;
            match txn.open_table(FORMAT) {
                Ok(format) => Ok(format.get("layout")?.map(|v| v.value())),
                Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
                Err(e) => Err(e.into()),
            }
        };
        let init = || -> Result<(), redb::Error> {
            let txn = db.begin_write()?;
            txn.open_table(META)?;
            txn.open_table(PUBS)?;
            txn.open_table(KEYS)?;
            txn.open_table(FORMAT)?.insert("layout", LAYOUT)?;
            txn.commit()?;
            Ok(())
        };
        let database = |e: redb::Error| OpenError::Database {
            path: path.clone(),
            message: e.to_string(),
        };
        match found().map_err(database)? {
            Some(found) if found != LAYOUT => return Err(OpenError::Layout { path, found }),
            _ => init().map_err(database)?,
        }
        let (tx, rx) = mpsc::channel();
        let events: Arc<OnceLock<Arc<dyn BrokerEvents>>> = Arc::default();
        let usage: Arc<Mutex<Usage>> = Arc::default();
        let writer = Writer {
            db: db.clone(),
            events: events.clone(),
            usage: usage.clone(),
            options,
            opened: Instant::now(),
            sweep: Sweep::default(),
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
            usage,
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

    /// Whether a publish saves something (history or an idempotency key),
    /// and so goes through the writer.
    fn saves(options: &PublishOptions) -> bool {
        options.history.is_some() || options.idempotency_key.is_some()
    }

    /// Hands a publish that saves something to the writer, which replies
    /// once it is committed and delivered.
    fn send_publish(&self, request: PublishRequest) -> Result<Reply, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::Publish {
            channel: request.channel,
            new: request.publication,
            options: request.options,
            reply,
        })?;
        Ok(rx)
    }

    /// Waits for the writer's replies to requests sent, in order.
    async fn await_replies(
        replies: &mut Vec<Result<Reply, EngineError>>,
        results: &mut Vec<Result<PublishResult, EngineError>>,
    ) {
        for reply in replies.drain(..) {
            results.push(match reply {
                Ok(rx) => rx.await.unwrap_or(Err(EngineError::Stopped)),
                Err(e) => Err(e),
            });
        }
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

    /// Reads history; for a channel without a row on disk, answers offset
    /// 0 in the epoch held for it in memory, writing nothing.
    fn read_or_fresh(
        db: &Database,
        usage: &Mutex<Usage>,
        channel: &ChannelName,
        filter: HistoryFilter,
    ) -> Result<History, EngineError> {
        if let Some(history) = Self::read(db, channel, filter)? {
            lock(usage).touch(channel, Instant::now());
            return Ok(history);
        }
        // Read again under the lock: the writer marks a channel stored
        // only after its commit and under this lock, so either this read
        // sees the row, or the epoch below is the one the row got.
        let mut usage = lock(usage);
        let now = Instant::now();
        if let Some(history) = Self::read(db, channel, filter)? {
            usage.touch(channel, now);
            return Ok(history);
        }
        Ok(History {
            publications: Vec::new(),
            position: StreamPosition {
                offset: 0,
                epoch: usage.unstored_epoch(channel, now),
            },
        })
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

    /// Publications are delivered from the writer thread, after each
    /// batch's commit: handed to a worker ([`crate::Hub::deliver_here`]),
    /// the fan-out neither delays the next commit nor wakes every
    /// subscriber's task from outside the runtime.
    fn delivers_from_own_thread(&self) -> bool {
        true
    }

    fn subscribe(&self, channel: ChannelName) -> BoxFuture<'_, Result<(), EngineError>> {
        // One process: every publication is delivered anyway; the sweep
        // keeps the channel while this node wants it.
        lock(&self.usage).set_subscribed(&channel, true, Instant::now());
        Box::pin(std::future::ready(Ok(())))
    }

    fn unsubscribe(&self, channel: ChannelName) -> BoxFuture<'_, Result<(), EngineError>> {
        lock(&self.usage).set_subscribed(&channel, false, Instant::now());
        Box::pin(std::future::ready(Ok(())))
    }

    fn publish(
        &self,
        channel: ChannelName,
        new: NewPublication,
        options: PublishOptions,
    ) -> BoxFuture<'_, Result<PublishResult, EngineError>> {
        Box::pin(async move {
            if !Self::saves(&options) {
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
            let rx = self.send_publish(PublishRequest {
                channel,
                publication: new,
                options,
            })?;
            rx.await.map_err(|_| EngineError::Stopped)?
        })
    }

    /// Every request that saves something goes to the writer at once, in
    /// order, so that they are saved in one transaction (or a few, past
    /// [`MAX_BATCH`]) and delivered together after it. One that saves
    /// nothing is published as by `publish`, after those before it.
    fn publish_many(
        &self,
        requests: Vec<PublishRequest>,
    ) -> BoxFuture<'_, Vec<Result<PublishResult, EngineError>>> {
        Box::pin(async move {
            let mut results = Vec::with_capacity(requests.len());
            let mut replies = Vec::new();
            for r in requests {
                if Self::saves(&r.options) {
                    replies.push(self.send_publish(r));
                    continue;
                }
                Self::await_replies(&mut replies, &mut results).await;
                results.push(self.publish(r.channel, r.publication, r.options).await);
            }
            Self::await_replies(&mut replies, &mut results).await;
            results
        })
    }

    fn history(
        &self,
        channel: ChannelName,
        filter: HistoryFilter,
    ) -> BoxFuture<'_, Result<History, EngineError>> {
        Box::pin(async move {
            let db = self.db.clone();
            let usage = self.usage.clone();
            tokio::task::spawn_blocking(move || Self::read_or_fresh(&db, &usage, &channel, filter))
                .await
                .map_err(|e| storage(format!("history read failed: {e}")))?
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
    usage: Arc<Mutex<Usage>>,
    options: DurableOptions,
    /// When the database was opened: the last use of a channel this
    /// process has not seen.
    opened: Instant,
    /// Where the sweep pass under way stands.
    sweep: Sweep,
}

mod sweep;
use sweep::Sweep;
#[cfg(test)]
mod tests;
mod writer;
