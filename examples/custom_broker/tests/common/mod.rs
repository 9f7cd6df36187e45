//! Shared by the tests: the server's URL, skipping when it is down, a prefix per run, cleanup.
#![allow(dead_code)]

use std::time::Duration;

use broker_core::{Broker, QueueSettings};
use custom_broker::{NatsBroker, NatsConfig};
use futures::StreamExt;

/// `QCLUSTER_TEST_NATS_URL`, else the local server `scripts/test` starts.
pub fn url() -> String {
    std::env::var("QCLUSTER_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A stream/subject prefix no other run uses.
pub fn run_prefix() -> String {
    format!("t{}", &uuid::Uuid::now_v7().simple().to_string()[16..])
}

/// Whether the server answers; prints `skipped: <why>` if not, or panics when
/// `QCLUSTER_REQUIRE_SERVICES=1`.
pub async fn reachable() -> bool {
    let mut cfg = NatsConfig::new(url());
    cfg.connect_timeout = Duration::from_secs(3);
    match NatsBroker::connect(cfg, QueueSettings::for_queue("probe")).await {
        Ok(b) => match b.ping().await {
            Ok(()) => true,
            Err(e) => skip(e.to_string()),
        },
        Err(e) => skip(e.to_string()),
    }
}

fn skip(why: String) -> bool {
    if std::env::var("QCLUSTER_REQUIRE_SERVICES").as_deref() == Ok("1") {
        panic!("NATS required (QCLUSTER_REQUIRE_SERVICES=1) but unreachable: {why}");
    }
    eprintln!("skipped: {why}");
    false
}

/// Deletes every stream whose name starts with `prefix-` (what a run created).
pub async fn cleanup(prefix: &str) {
    let Ok(client) = async_nats::connect(url()).await else {
        return;
    };
    let js = async_nats::jetstream::new(client);
    let names: Vec<String> = js
        .stream_names()
        .filter_map(|n| async move { n.ok() })
        .collect()
        .await;
    for n in names
        .iter()
        .filter(|n| n.starts_with(&format!("{prefix}-")))
    {
        let _ = js.delete_stream(n).await;
    }
}
