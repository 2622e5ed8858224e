//! The durable engine's own tests: what reads and sweeps leave on disk.

use super::sweep::{Pass, sweep_keys};
use super::*;
use crate::publication::HistoryOptions;

/// Sweeps every 20 ms; channels are forgotten after `forget_after`.
fn quick(forget_after: Duration) -> DurableOptions {
    DurableOptions {
        sweep_interval: Duration::from_millis(20),
        forget_after,
    }
}

fn open(dir: &Path, options: DurableOptions) -> DurableBroker {
    DurableBroker::open_with(dir, options).unwrap()
}

/// History of 100 messages kept for `ttl`.
fn kept_for(ttl: Duration) -> PublishOptions {
    PublishOptions {
        history: Some(HistoryOptions { size: 100, ttl }),
        ..PublishOptions::default()
    }
}

fn keyed(key: &str, ttl: Duration, options: PublishOptions) -> PublishOptions {
    PublishOptions {
        idempotency_key: Some(key.into()),
        idempotency_ttl: ttl,
        ..options
    }
}

fn rows(channels: u64, publications: u64, keys: u64) -> Rows {
    Rows {
        channels,
        publications,
        keys,
    }
}

fn channel(name: &str) -> ChannelName {
    ChannelName::new(name).unwrap()
}

async fn publish(broker: &DurableBroker, ch: &ChannelName, options: PublishOptions) {
    broker
        .publish(ch.clone(), NewPublication::text("m"), options)
        .await
        .unwrap();
}

async fn position(broker: &DurableBroker, ch: &ChannelName) -> StreamPosition {
    broker
        .history(ch.clone(), HistoryFilter::default())
        .await
        .unwrap()
        .position
}

/// Waits up to 5 s for the disk to hold `want`; returns what it holds.
async fn rows_become(broker: &DurableBroker, want: Rows) -> Rows {
    for _ in 0..250 {
        if broker.rows() == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    broker.rows()
}

const SHORT: Duration = Duration::from_millis(300);
const LONG: Duration = Duration::from_secs(3600);

#[tokio::test]
async fn expired_publications_leave_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let broker = open(dir.path(), quick(LONG));
    let ch = channel("quiet");
    for _ in 0..3 {
        publish(&broker, &ch, kept_for(Duration::from_secs(1))).await;
    }
    let before = position(&broker, &ch).await;
    assert_eq!(broker.rows(), rows(1, 3, 0));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        rows_become(&broker, rows(1, 0, 0)).await,
        rows(1, 0, 0),
        "swept once past the TTL, with no publish to trim them"
    );
    assert_eq!(
        position(&broker, &ch).await,
        before,
        "the channel, used within forget_after, keeps its position"
    );
}

#[tokio::test]
async fn a_channel_with_nothing_left_is_forgotten_and_starts_a_new_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let broker = open(dir.path(), quick(Duration::ZERO));
    let ch = channel("gone");
    publish(&broker, &ch, kept_for(SHORT)).await;
    publish(&broker, &ch, kept_for(SHORT)).await;
    let before = position(&broker, &ch).await;
    assert_eq!(before.offset, 2);
    assert_eq!(rows_become(&broker, rows(0, 0, 0)).await, rows(0, 0, 0));
    let after = position(&broker, &ch).await;
    assert_eq!(after.offset, 0);
    assert_ne!(after.epoch, before.epoch, "history lost: a new epoch");
    let r = broker
        .publish(ch.clone(), NewPublication::text("again"), kept_for(LONG))
        .await
        .unwrap();
    assert_eq!(r.position.offset, 1);
    assert_eq!(r.position.epoch, after.epoch, "the epoch read is kept");
}

#[tokio::test]
async fn a_subscribed_channel_is_kept_until_unsubscribed() {
    let dir = tempfile::tempdir().unwrap();
    let broker = open(dir.path(), quick(Duration::ZERO));
    let ch = channel("watched");
    broker.subscribe(ch.clone()).await.unwrap();
    publish(&broker, &ch, kept_for(SHORT)).await;
    let before = position(&broker, &ch).await;
    assert_eq!(rows_become(&broker, rows(1, 0, 0)).await, rows(1, 0, 0));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(broker.rows(), rows(1, 0, 0), "kept while subscribed");
    assert_eq!(position(&broker, &ch).await, before);
    broker.unsubscribe(ch.clone()).await.unwrap();
    assert_eq!(rows_become(&broker, rows(0, 0, 0)).await, rows(0, 0, 0));
}

#[tokio::test]
async fn a_live_idempotency_key_keeps_its_channel() {
    let dir = tempfile::tempdir().unwrap();
    let broker = open(dir.path(), quick(Duration::ZERO));
    let ch = channel("orders");
    let opts = keyed("order-1", LONG, kept_for(SHORT));
    let first = broker
        .publish(ch.clone(), NewPublication::text("paid"), opts.clone())
        .await
        .unwrap();
    assert_eq!(rows_become(&broker, rows(1, 0, 1)).await, rows(1, 0, 1));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(broker.rows(), rows(1, 0, 1), "the key keeps the channel");
    let retry = broker
        .publish(ch.clone(), NewPublication::text("paid"), opts)
        .await
        .unwrap();
    assert!(retry.suppressed);
    assert_eq!(retry.position, first.position);
    assert_eq!(position(&broker, &ch).await, first.position);
}

#[tokio::test]
async fn expired_keys_go_and_then_their_channel() {
    let dir = tempfile::tempdir().unwrap();
    let broker = open(dir.path(), quick(Duration::ZERO));
    let ch = channel("once");
    let opts = keyed("k", SHORT, PublishOptions::default());
    publish(&broker, &ch, opts).await;
    assert_eq!(broker.rows(), rows(1, 0, 1));
    assert_eq!(rows_become(&broker, rows(0, 0, 0)).await, rows(0, 0, 0));
}

#[tokio::test]
async fn reading_unknown_channels_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = open(dir.path(), DurableOptions::default());
    for i in 0..100 {
        let ch = channel(&format!("random-{i}"));
        let h = broker
            .history(ch.clone(), HistoryFilter::default())
            .await
            .unwrap();
        assert!(h.publications.is_empty());
        assert_eq!(h.position.offset, 0);
        assert_eq!(position(&broker, &ch).await, h.position, "reads agree");
    }
    assert_eq!(broker.rows(), rows(0, 0, 0));
}

#[tokio::test]
async fn sweeps_keep_channels_with_history_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ch = channel("kept");
    let before = {
        let broker = open(dir.path(), quick(Duration::ZERO));
        for _ in 0..3 {
            publish(&broker, &ch, kept_for(LONG)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(broker.rows(), rows(1, 3, 0), "history keeps its row");
        position(&broker, &ch).await
    };
    let broker = open(dir.path(), quick(Duration::ZERO));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(broker.rows(), rows(1, 3, 0));
    assert_eq!(position(&broker, &ch).await, before);
    let next = broker
        .publish(ch.clone(), NewPublication::text("m4"), kept_for(LONG))
        .await
        .unwrap();
    assert_eq!(next.position.offset, 4);
    assert_eq!(next.position.epoch, before.epoch);
}

/// More channels and keys than one step looks at: the pass takes
/// several steps, and finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_sweep_is_done_in_bounded_steps() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Arc::new(open(dir.path(), quick(Duration::ZERO)));
    let n = SWEEP_BUDGET as u64 + 500;
    let publishes = (0..n).map(|i| {
        let broker = broker.clone();
        tokio::spawn(async move {
            let ch = channel(&format!("many-{i}"));
            publish(&broker, &ch, keyed("k", SHORT, kept_for(SHORT))).await;
        })
    });
    for p in futures_util::future::join_all(publishes).await {
        p.unwrap();
    }
    assert_eq!(rows_become(&broker, rows(0, 0, 0)).await, rows(0, 0, 0));
}

/// One step removes at most its budget of keys; the next goes on from
/// there.
#[test]
fn a_key_step_stops_at_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::create(dir.path().join(DATABASE_FILE)).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut keys = txn.open_table(KEYS).unwrap();
        let expired = [0u8; 16];
        for i in 0..SWEEP_BUDGET + 10 {
            keys.insert(("ch", format!("{i:05}").as_str()), &expired[..])
                .unwrap();
        }
        let first = sweep_keys(&mut keys, &Pass::Start, 1).unwrap();
        assert_eq!(
            first,
            Pass::After(("ch".to_owned(), format!("{:05}", SWEEP_BUDGET - 1)))
        );
        assert_eq!(redb::ReadableTableMetadata::len(&keys).unwrap(), 10);
        assert_eq!(sweep_keys(&mut keys, &first, 1).unwrap(), Pass::Done);
        assert_eq!(redb::ReadableTableMetadata::len(&keys).unwrap(), 0);
    }
    txn.commit().unwrap();
}

/// How many rows each table holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rows {
    channels: u64,
    publications: u64,
    keys: u64,
}

impl DurableBroker {
    /// What is on disk now: for tests of what reads and sweeps leave.
    fn rows(&self) -> Rows {
        use redb::ReadableTableMetadata;
        let txn = self.db.begin_read().unwrap();
        Rows {
            channels: txn.open_table(META).unwrap().len().unwrap(),
            publications: txn.open_table(PUBS).unwrap().len().unwrap(),
            keys: txn.open_table(KEYS).unwrap().len().unwrap(),
        }
    }
}

/// Records, at each delivery, whether the duplicate had its answer yet.
#[derive(Default)]
struct AnsweredAtDelivery {
    duplicate: Mutex<Option<Reply>>,
    seen: Mutex<Vec<bool>>,
}

impl BrokerEvents for AnsweredAtDelivery {
    fn handle_publication(&self, _: &ChannelName, _: &Publication, _: &str) {
        let mut duplicate = lock(&self.duplicate);
        let rx = duplicate.as_mut().expect("the duplicate's reply");
        let answered = !matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty));
        lock(&self.seen).push(answered);
    }
}

/// A publish suppressed by a key used earlier in its own batch is
/// answered once that batch is committed, with its outcome: not before,
/// when the commit could still fail and lose the message the key names.
#[tokio::test]
async fn a_duplicate_in_one_batch_is_answered_after_the_commit() {
    let dir = tempfile::tempdir().unwrap();
    let broker = open(dir.path(), DurableOptions::default());
    let check = Arc::new(AnsweredAtDelivery::default());
    let events: Arc<OnceLock<Arc<dyn BrokerEvents>>> = Arc::default();
    let _ = events.set(check.clone());
    let mut writer = Writer {
        db: broker.db.clone(),
        events,
        usage: Arc::default(),
        options: DurableOptions::default(),
        opened: Instant::now(),
        sweep: Sweep::default(),
    };
    let ch = channel("orders");
    let request = || {
        let (reply, rx) = oneshot::channel();
        let options = keyed("order-1", LONG, kept_for(LONG));
        let new = NewPublication::text("m");
        (
            Request::Publish {
                channel: ch.clone(),
                new,
                options,
                reply,
            },
            rx,
        )
    };
    let (first, mut first_rx) = request();
    let (duplicate, duplicate_rx) = request();
    *lock(&check.duplicate) = Some(duplicate_rx);
    writer.apply(vec![first, duplicate]);
    assert_eq!(*lock(&check.seen), [false], "not answered before delivery");
    let original = first_rx.try_recv().unwrap().unwrap();
    let rx = lock(&check.duplicate).take().unwrap();
    let suppressed = rx.await.unwrap().unwrap();
    assert!(!original.suppressed && suppressed.suppressed);
    assert_eq!(suppressed.position, original.position);
}

/// Sets the layout recorded in the database in `dir` (no broker open).
fn write_layout(dir: &Path, layout: Option<u64>) {
    let db = Database::create(dir.join(DATABASE_FILE)).unwrap();
    let txn = db.begin_write().unwrap();
    match layout {
        Some(n) => {
            txn.open_table(FORMAT).unwrap().insert("layout", n).unwrap();
        }
        None => {
            txn.delete_table(FORMAT).unwrap();
        }
    }
    txn.commit().unwrap();
}

#[tokio::test]
async fn history_of_another_layout_is_refused_and_left_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let ch = channel("kept");
    {
        let broker = open(dir.path(), DurableOptions::default());
        publish(&broker, &ch, kept_for(LONG)).await;
    }
    write_layout(dir.path(), Some(LAYOUT + 1));
    match DurableBroker::open(dir.path()) {
        Err(e @ OpenError::Layout { found, .. }) => {
            assert_eq!(found, LAYOUT + 1);
            assert!(e.to_string().contains("of layout 2"), "{e}");
        }
        other => panic!("opened history of another layout: {other:?}"),
    }
    // Refusing wrote nothing: the walkie that wrote it still reads it.
    write_layout(dir.path(), Some(LAYOUT));
    let broker = open(dir.path(), DurableOptions::default());
    assert_eq!(position(&broker, &ch).await.offset, 1);
}

#[tokio::test]
async fn history_from_before_the_layout_was_recorded_is_layout_1() {
    let dir = tempfile::tempdir().unwrap();
    let ch = channel("kept");
    {
        let broker = open(dir.path(), DurableOptions::default());
        publish(&broker, &ch, kept_for(LONG)).await;
    }
    write_layout(dir.path(), None);
    let broker = open(dir.path(), DurableOptions::default());
    assert_eq!(position(&broker, &ch).await.offset, 1);
    drop(broker);
    let db = Database::create(dir.path().join(DATABASE_FILE)).unwrap();
    let txn = db.begin_read().unwrap();
    let format = txn.open_table(FORMAT).unwrap();
    assert_eq!(format.get("layout").unwrap().map(|v| v.value()), Some(1));
}
