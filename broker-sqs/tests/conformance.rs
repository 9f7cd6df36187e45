//! The conformance kit against the SQS emulator (moto) at `QCLUSTER_SQS_ENDPOINT`
//! (default `http://127.0.0.1:9324`): a standard queue, then a FIFO queue.
//!
//! Every run uses queues of its own (`kit<random>-<check>`) and the kit deletes them as it
//! goes. The credentials are explicit; the secret key is [`SECRET`], which the kit checks never
//! shows in `info`, `Debug` or errors (the unreachable factory carries it too).
//!
//! Not run, loudly:
//! - `bulk_limit`: the kit wants `bulk` above `max_bulk` refused, but this adapter clamps it to
//!   10 with a warning (so that one cluster config fits every broker); `semantics.rs` checks the
//!   clamp and the rest of `bulk_limit` (full batches of 10, never more).
//! - `connection_loss`: SQS is plain HTTPS requests; there is no session for a server to drop.

use std::sync::Arc;
use std::time::Duration;

use broker_core::testkit::{BrokerFuture, CHECKS, Kit};
use broker_core::{Broker, QueueSettings};
use broker_sqs::{SqsBroker, SqsConfig};

/// The secret access key of the kit's runs: it must never show anywhere.
const SECRET: &str = "kit-Sqs-secret-7731/QzX";

fn endpoint() -> String {
    std::env::var("QCLUSTER_SQS_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:9324".into())
}

fn config() -> SqsConfig {
    SqsConfig {
        region: Some("us-east-1".into()),
        endpoint_url: Some(endpoint()),
        access_key_id: Some("test".into()),
        secret_access_key: Some(SECRET.into()),
        ..SqsConfig::default()
    }
}

async fn reachable() -> bool {
    let probe = QueueSettings::for_queue(format!(
        "qprobe-{}",
        &uuid::Uuid::now_v7().simple().to_string()[16..]
    ));
    let outcome = match SqsBroker::connect(&config(), probe).await {
        Ok(b) => {
            let pinged = b.ping().await;
            let _ = b.delete_queue().await;
            pinged
        }
        Err(e) => Err(e),
    };
    match outcome {
        Ok(()) => true,
        Err(e) => {
            if std::env::var("QCLUSTER_REQUIRE_SERVICES").as_deref() == Ok("1") {
                panic!("SQS endpoint {} required but unreachable: {e}", endpoint());
            }
            eprintln!("skipped: SQS endpoint {} unreachable: {e}", endpoint());
            false
        }
    }
}

fn kit(fifo: bool) -> Kit {
    let make = move |mut s: QueueSettings| -> BrokerFuture {
        if fifo {
            s.queue.push_str(".fifo");
        }
        Box::pin(async move {
            let b = SqsBroker::connect(&config(), s).await?;
            Ok(Arc::new(b) as Arc<dyn Broker>)
        })
    };
    Kit::new(make)
        .secret(SECRET)
        .retry(Duration::from_secs(3))
        .unreachable(|| {
            Box::pin(async {
                let cfg = SqsConfig {
                    endpoint_url: Some("http://127.0.0.1:9".into()),
                    connect_timeout: Duration::from_secs(1),
                    timeout: Duration::from_secs(4),
                    ..config()
                };
                let b = SqsBroker::connect(&cfg, QueueSettings::for_queue("unreachable")).await?;
                Ok(Arc::new(b) as Arc<dyn Broker>)
            })
        })
}

fn skip(check: &str, why: &str) {
    eprintln!("conformance {check}: skipped: {why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_standard() {
    if !reachable().await {
        return;
    }
    skip(
        "bulk_limit",
        "the adapter clamps bulk > 10 to 10 with a warning instead of refusing it (tested in \
         semantics.rs)",
    );
    let checks: Vec<&str> = CHECKS
        .iter()
        .copied()
        .filter(|c| *c != "bulk_limit")
        .collect();
    kit(false).run_only(&checks).await;
}
