//! The shared engine conformance suite, against every engine that runs
//! without an external service.

use std::sync::Arc;

use walkie_hub::{Broker, DurableBroker, MemoryBroker, conformance};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_engine_conforms() {
    conformance::run_all(|| Arc::new(MemoryBroker::new()) as Arc<dyn Broker>).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_engine_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let n = std::sync::atomic::AtomicUsize::new(0);
    conformance::run_all(|| {
        // A database per check: each check sets its own event handler.
        let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Arc::new(DurableBroker::open(&dir.path().join(i.to_string())).unwrap()) as Arc<dyn Broker>
    })
    .await;
}

#[tokio::test]
async fn memory_presence_conforms() {
    conformance::run_presence(|| {
        Arc::new(walkie_hub::MemoryPresence::new()) as Arc<dyn walkie_hub::PresenceManager>
    })
    .await;
}

/// The Redis engine against a real Redis: `WALKIE_TEST_REDIS` is its URL
/// (`.ci/run` sets it); without it the test says it was skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_engine_conforms() {
    let Some(url) = conformance::service_url("WALKIE_TEST_REDIS", "redis_engine_conforms") else {
        return;
    };
    let prefix = conformance::test_prefix();
    let mut brokers = Vec::new();
    // A connection per check: each check sets its own event handler.
    for _ in 0..conformance::CHECKS {
        brokers.push(
            walkie_hub::RedisBroker::connect(&url, &prefix)
                .await
                .unwrap(),
        );
    }
    conform(brokers, |b| {
        Arc::new(walkie_hub::RedisPresence::new(b, walkie_hub::PRESENCE_TTL))
    })
    .await;
}

/// The NATS engine against a real NATS server with JetStream:
/// `WALKIE_TEST_NATS` is its URL (`.ci/run` sets it); without it the test
/// says it was skipped. Everything it makes is deleted at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_engine_conforms() {
    let Some(url) = conformance::service_url("WALKIE_TEST_NATS", "nats_engine_conforms") else {
        return;
    };
    let prefix = conformance::test_prefix();
    let mut brokers = Vec::new();
    // A connection per check: each check sets its own event handler.
    for _ in 0..conformance::CHECKS {
        brokers.push(
            walkie_hub::NatsBroker::connect(&url, &prefix)
                .await
                .unwrap(),
        );
    }
    let first = brokers[0].clone();
    conform(brokers, |b| {
        Arc::new(walkie_hub::NatsPresence::new(b, walkie_hub::PRESENCE_TTL))
    })
    .await;
    let deleted = first.delete_all().await.unwrap();
    assert!(deleted >= 10, "one stream per channel used: {deleted}");
}

/// Runs the broker checks, one connection each, then the presence checks
/// on the first connection.
async fn conform<B: Broker + Clone>(
    brokers: Vec<B>,
    presence: impl Fn(&B) -> Arc<dyn walkie_hub::PresenceManager>,
) {
    let first = brokers[0].clone();
    let brokers = std::sync::Mutex::new(brokers);
    conformance::run_all(|| Arc::new(brokers.lock().unwrap().pop().unwrap()) as Arc<dyn Broker>)
        .await;
    conformance::run_presence(|| presence(&first)).await;
}
