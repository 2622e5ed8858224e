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
