//! The conformance kit against Redis at 127.0.0.1:6379, reliable and fast mode, each check
//! under its own key prefix.

use std::sync::Arc;
use std::time::Duration;

use broker_core::testkit::{BrokerFuture, Kit};
use broker_core::{Broker, QueueSettings};
use broker_redis::{RedisBroker, RedisConfig};

/// Put in the URL so that the kit can check it never leaks (Redis without auth ignores a
/// password given with no user? No: it refuses it, so the URL carries none and the kit's secret
/// check uses the unreachable URL below).
const SECRET: &str = "kit-Redis-pw-4410";

fn url() -> String {
    std::env::var("QCLUSTER_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

async fn reachable() -> bool {
    match RedisBroker::connect(&RedisConfig::new(url()), QueueSettings::for_queue("probe")).await {
        Ok(b) => match b.ping().await {
            Ok(()) => true,
            Err(e) => skip(e.to_string()),
        },
        Err(e) => skip(e.to_string()),
    }
}

fn skip(e: String) -> bool {
    if std::env::var("QCLUSTER_REQUIRE_SERVICES").as_deref() == Ok("1") {
        panic!("server required but unreachable: {e}");
    }
    eprintln!("skipped: {e}");
    false
}

fn kit(reliable: bool) -> Kit {
    let run = uuid::Uuid::now_v7().simple().to_string();
    let make = move |s: QueueSettings| -> BrokerFuture {
        let mut cfg = RedisConfig::new(url());
        cfg.reliable = reliable;
        cfg.prefix = Some(format!("kit{}", &run[16..]));
        Box::pin(async move {
            let b = RedisBroker::connect(&cfg, s).await?;
            Ok(Arc::new(b) as Arc<dyn Broker>)
        })
    };
    Kit::new(make).secret(SECRET).unreachable(|| {
        Box::pin(async {
            let mut cfg = RedisConfig::new(format!("redis://:{SECRET}@127.0.0.1:1/0"));
            cfg.connect_timeout = Duration::from_secs(2);
            let b = RedisBroker::connect(&cfg, QueueSettings::for_queue("unreachable")).await?;
            Ok(Arc::new(b) as Arc<dyn Broker>)
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_reliable() {
    if reachable().await {
        kit(true).run().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_fast() {
    if reachable().await {
        kit(false).run().await;
    }
}
