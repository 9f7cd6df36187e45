//! The conformance kit against the memory broker, on a hub of its own.
//!
//! `ping_unreachable` does not apply (there is no server to be away) and is skipped: no
//! `unreachable` factory is given.

use std::sync::Arc;

use broker_core::Broker;
use broker_core::testkit::Kit;
use broker_memory::{MemoryBroker, MemoryHub};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance() {
    let hub = MemoryHub::new();
    Kit::new(move |s| {
        let hub = hub.clone();
        Box::pin(async move { Ok(Arc::new(MemoryBroker::open(&hub, s)?) as Arc<dyn Broker>) })
    })
    .run()
    .await;
}
