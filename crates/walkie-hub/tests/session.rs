//! A `Session` without sockets: what it leaves behind when it ends.

use std::sync::Arc;

use walkie_hub::{ChannelName, Hub, HubConfig, MemoryBroker, Node, QueueLimits, Session, Verifier};

fn node() -> Arc<Node> {
    let config = HubConfig::default();
    Arc::new(Node {
        hub: Hub::new(Arc::new(MemoryBroker::new())),
        verifier: Verifier::new(&config.auth).unwrap(),
        config,
        queue: QueueLimits::default(),
        ping_interval: None,
        publish_rate: None,
    })
}

async fn presence(node: &Node, channel: &str) -> usize {
    let channel = ChannelName::new(channel).unwrap();
    node.hub.presence().presence(channel).await.unwrap().len()
}

/// A session dropped without `close` (its task panicked, or the runtime
/// dropped it at shutdown) still leaves its channels' presence: no ghost
/// stays behind.
#[tokio::test]
async fn a_session_dropped_without_close_leaves_no_presence_behind() {
    let node = node();
    let mut session = Session::new(node.clone(), walkie_hub::now_ms() / 1000);
    let now = walkie_hub::now_ms() / 1000;
    let connected = session
        .handle_text(r#"{"id":1,"connect":{"name":"ann"}}"#, now)
        .await;
    assert!(connected.is_ok(), "{connected:?}");
    let subscribed = session
        .handle_text(r#"{"id":2,"subscribe":{"channel":"chat:lobby"}}"#, now)
        .await
        .unwrap();
    assert!(subscribed.contains("result"), "{subscribed}");
    assert_eq!(presence(&node, "chat:lobby").await, 1);

    drop(session);
    for _ in 0..100 {
        if presence(&node, "chat:lobby").await == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("the dropped session is still present");
}
