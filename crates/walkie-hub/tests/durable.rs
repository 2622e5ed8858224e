//! The durable engine keeps history, offsets and epochs across a restart,
//! refuses a database another process holds, and writes nothing for a
//! read. (The sweep's tests are unit tests in `src/durable.rs`: they set
//! its interval and count rows on disk.)

use std::time::Duration;

use walkie_hub::{
    Broker, ChannelName, DurableBroker, HistoryFilter, HistoryOptions, NewPublication, OpenError,
    PublishOptions,
};

fn kept() -> PublishOptions {
    PublishOptions {
        history: Some(HistoryOptions {
            size: 100,
            ttl: Duration::from_secs(3600),
        }),
        ..PublishOptions::default()
    }
}

#[tokio::test]
async fn history_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ch = ChannelName::new("rooms:lobby").unwrap();
    let before = {
        let broker = DurableBroker::open(dir.path()).unwrap();
        for i in 1..=5 {
            broker
                .publish(ch.clone(), NewPublication::text(format!("m{i}")), kept())
                .await
                .unwrap();
        }
        broker
            .history(ch.clone(), HistoryFilter::default())
            .await
            .unwrap()
    };
    let broker = DurableBroker::open(dir.path()).unwrap();
    let after = broker
        .history(ch.clone(), HistoryFilter::default())
        .await
        .unwrap();
    assert_eq!(after, before);
    assert_eq!(after.position.offset, 5);
    let next = broker
        .publish(ch.clone(), NewPublication::text("m6"), kept())
        .await
        .unwrap();
    assert_eq!(next.position.offset, 6, "offsets go on after a restart");
    assert_eq!(next.position.epoch, before.position.epoch, "same epoch");
}

#[tokio::test]
async fn a_database_in_use_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let _held = DurableBroker::open(dir.path()).unwrap();
    match DurableBroker::open(dir.path()) {
        Err(e @ OpenError::InUse { .. }) => {
            assert!(e.to_string().contains("in use"), "{e}");
        }
        other => panic!("expected InUse, got {other:?}"),
    }
}

#[tokio::test]
async fn a_file_that_is_not_a_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(walkie_hub::DATABASE_FILE),
        b"not a database at all",
    )
    .unwrap();
    let err = DurableBroker::open(dir.path()).unwrap_err();
    assert!(matches!(err, OpenError::Database { .. }), "{err:?}");
}

#[tokio::test]
async fn an_idempotency_key_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ch = ChannelName::new("orders").unwrap();
    let opts = PublishOptions {
        idempotency_key: Some("order-9".into()),
        ..kept()
    };
    let first = {
        let broker = DurableBroker::open(dir.path()).unwrap();
        broker
            .publish(ch.clone(), NewPublication::text("paid"), opts.clone())
            .await
            .unwrap()
    };
    let broker = DurableBroker::open(dir.path()).unwrap();
    let retry = broker
        .publish(ch.clone(), NewPublication::text("paid"), opts)
        .await
        .unwrap();
    assert!(
        retry.suppressed,
        "the retry after a restart is not saved again"
    );
    assert_eq!(retry.position, first.position);
    let h = broker.history(ch, HistoryFilter::default()).await.unwrap();
    assert_eq!(h.publications.len(), 1);
}

#[tokio::test]
async fn reading_an_unknown_channel_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ch = ChannelName::new("never:published").unwrap();
    let before = {
        let broker = DurableBroker::open(dir.path()).unwrap();
        let first = broker
            .history(ch.clone(), HistoryFilter::default())
            .await
            .unwrap();
        assert!(first.publications.is_empty());
        assert_eq!(first.position.offset, 0);
        let again = broker
            .history(ch.clone(), HistoryFilter::default())
            .await
            .unwrap();
        assert_eq!(again.position, first.position, "reads agree meanwhile");
        first.position
    };
    let broker = DurableBroker::open(dir.path()).unwrap();
    let after = broker
        .history(ch.clone(), HistoryFilter::default())
        .await
        .unwrap()
        .position;
    assert_eq!(after.offset, 0);
    assert_ne!(
        after.epoch, before.epoch,
        "the read stored no epoch: after a restart the channel is new"
    );
}
