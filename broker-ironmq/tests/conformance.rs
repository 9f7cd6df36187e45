//! The conformance kit against the IronMQ v3 test server (`testserver/ironmq_v3.py`) at
//! `QCLUSTER_TEST_IRONMQ_URL` (default `http://127.0.0.1:8787`), token `QCLUSTER_TEST_IRONMQ_TOKEN`
//! (default `qcluster-test-token`), in a project of the run's own; every queue the kit makes
//! is deleted by the kit's checks or at the end.
//!
//! Leases: the kit's `retry` is 3 s, under IronMQ's minimum reservation of 30 s, so the
//! brokers are opened with `allow_short_timeout` (the test server accepts short timeouts; the
//! hosted IronMQ would refuse them). Skips loudly when the server is down; panics instead
//! under `QCLUSTER_REQUIRE_SERVICES=1`.

use std::sync::Arc;
use std::time::Duration;

use broker_core::testkit::{BrokerFuture, Kit};
use broker_core::{Broker, QueueSettings};
use broker_ironmq::{IronMqBroker, IronMqConfig};

fn url() -> String {
    std::env::var("QCLUSTER_TEST_IRONMQ_URL").unwrap_or_else(|_| "http://127.0.0.1:8787".into())
}

fn token() -> String {
    std::env::var("QCLUSTER_TEST_IRONMQ_TOKEN").unwrap_or_else(|_| "qcluster-test-token".into())
}

fn config(project: &str) -> IronMqConfig {
    IronMqConfig {
        allow_short_timeout: true,
        connect_timeout: Duration::from_secs(2),
        timeout: Duration::from_secs(10),
        ..IronMqConfig::for_url(&url(), project, &token())
    }
}

async fn reachable() -> bool {
    match IronMqBroker::connect(&config("probe"), QueueSettings::for_queue("probe")).await {
        Ok(b) => {
            let _ = b.delete_queue().await;
            true
        }
        Err(e) => {
            if std::env::var("QCLUSTER_REQUIRE_SERVICES").as_deref() == Ok("1") {
                panic!(
                    "IronMQ test server required but unreachable at {}: {e}",
                    url()
                );
            }
            eprintln!(
                "skipped: IronMQ test server unreachable at {} ({e}); start it with \
                 python3 broker-ironmq/testserver/ironmq_v3.py --port 8787 --token {}",
                url(),
                token()
            );
            false
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance() {
    if !reachable().await {
        return;
    }
    let project = format!("kit-{}", &uuid::Uuid::now_v7().simple().to_string()[20..]);
    let cfg = config(&project);
    let make = move |s: QueueSettings| -> BrokerFuture {
        let cfg = cfg.clone();
        Box::pin(async move {
            let b = IronMqBroker::connect(&cfg, s).await?;
            Ok(Arc::new(b) as Arc<dyn Broker>)
        })
    };
    Kit::new(make)
        // The token: the kit checks it never shows in `info`, `Debug` or errors.
        .secret(token())
        .retry(Duration::from_secs(3))
        .unreachable(|| {
            Box::pin(async {
                let mut cfg = IronMqConfig::for_url("http://127.0.0.1:9", "unreachable", &token());
                cfg.allow_short_timeout = true;
                cfg.connect_timeout = Duration::from_secs(2);
                cfg.timeout = Duration::from_secs(3);
                let b =
                    IronMqBroker::connect(&cfg, QueueSettings::for_queue("unreachable")).await?;
                Ok(Arc::new(b) as Arc<dyn Broker>)
            })
        })
        .run()
        .await;
}
