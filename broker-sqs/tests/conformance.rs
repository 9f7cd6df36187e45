//! The conformance kit against the SQS emulator (moto) at `QCLUSTER_TEST_SQS_ENDPOINT`
//! (default `http://127.0.0.1:9324`): a standard queue, then a FIFO queue.
//!
//! Every run uses queues of its own (`kit<random>-<check>`); the factory records each queue it
//! opens, and every one of them (with its `-dead` queue) is deleted when the run ends, whether
//! it passed or not. The credentials are explicit; the secret key is [`SECRET`], which the kit checks never
//! shows in `info`, `Debug` or errors (the unreachable factory carries it too).
//!
//! Not run, loudly:
//! - `bulk_limit`: the kit wants `bulk` above `max_bulk` refused, but this adapter clamps it to
//!   10 with a warning (so that one cluster config fits every broker); `semantics.rs` checks the
//!   clamp and the rest of `bulk_limit` (full batches of 10, never more).
//! - `connection_loss`: SQS is plain HTTPS requests; there is no session for a server to drop.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use broker_core::testkit::{BrokerFuture, CHECKS, Kit};
use broker_core::{Broker, QueueSettings};
use broker_sqs::{SqsBroker, SqsConfig};

/// The secret access key of the kit's runs: it must never show anywhere.
const SECRET: &str = "kit-Sqs-secret-7731/QzX";

fn endpoint() -> String {
    std::env::var("QCLUSTER_TEST_SQS_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:9324".into())
}

fn config() -> SqsConfig {
    config_fifo(false)
}

fn config_fifo(fifo: bool) -> SqsConfig {
    SqsConfig {
        region: Some("us-east-1".into()),
        endpoint_url: Some(endpoint()),
        access_key_id: Some("test".into()),
        secret_access_key: Some(SECRET.into()),
        fifo,
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

/// The cluster queue names a kit run opened.
type Opened = Arc<Mutex<BTreeSet<String>>>;

fn kit(fifo: bool, opened: Opened, retry: Duration) -> Kit {
    let make = move |s: QueueSettings| -> BrokerFuture {
        if let Ok(mut o) = opened.lock() {
            o.insert(s.queue.clone());
        }
        Box::pin(async move {
            let b = SqsBroker::connect(&config_fifo(fifo), s).await?;
            Ok(Arc::new(b) as Arc<dyn Broker>)
        })
    };
    Kit::new(make).secret(SECRET).retry(retry).unreachable(|| {
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

/// Runs the kit on `checks` with a 3 s lease, then deletes every queue it opened (also when a
/// check failed).
async fn run(fifo: bool, checks: Vec<&'static str>) {
    run_with(fifo, checks, Duration::from_secs(3)).await
}

/// [`run`] with a lease of `retry`.
async fn run_with(fifo: bool, checks: Vec<&'static str>, retry: Duration) {
    let opened = Opened::default();
    let k = kit(fifo, opened.clone(), retry);
    let outcome = tokio::spawn(async move { k.run_only(&checks).await }).await;
    let names: Vec<String> = opened
        .lock()
        .map(|o| o.iter().cloned().collect())
        .unwrap_or_default();
    let keep = SqsConfig {
        create: false,
        ..config_fifo(fifo)
    };
    for q in names {
        // Already gone (the kit deleted it last) is fine: create = false refuses to connect.
        if let Ok(b) = SqsBroker::connect(&keep, QueueSettings::for_queue(q.clone())).await
            && let Err(e) = b.delete_queue().await
        {
            eprintln!("could not delete kit queue {q:?}: {e}");
        }
    }
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
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
        .filter(|c| *c != "bulk_limit" && *c != "concurrent_consumers")
        .collect();
    run(false, checks).await;
    // `concurrent_consumers` (4 consumers × 1,000 packages, long polls at once) last, after
    // the others (it loads moto; run beside them it slowed their leases past their bounds),
    // with a 10 s lease. On a loaded machine moto answers a receive or a delete in seconds: with
    // 3 s leases an acknowledgement came after the adapter's lease margin and was rightly not
    // sent (a late delete might remove another consumer's delivery), the package came back,
    // the drain at the end took it again and, as slow, could not settle it before the check
    // gave up: `lock_size is 20 at the end` (2026-11-30, twice in one CI run, never on an idle
    // machine). A longer lease tests the same promise with room for a slow emulator.
    run_with(false, vec!["concurrent_consumers"], Duration::from_secs(10)).await;
}

/// Checks that hold several deliveries of one message group at once, or drain a queue while a
/// delivery is held: on FIFO every package without a task group shares one group (the queue
/// name), and SQS delivers one batch of a group at a time, so these cannot pass by design.
/// `semantics.rs` tests what FIFO promises instead (order per group, deduplication).
const NOT_ON_FIFO: &[&str] = &[
    "round_trip",
    "enqueue_many_in_order",
    "acknowledge_removes",
    "fail_keeps_package",
    "settle_on_another_handle",
    "lock_size_counts_in_flight",
    "queue_size_counts_waiting",
    "purge_queue",
    "dead_letter",
    "requeue_and_delete_dead",
    "concurrent_dequeue_one_handle",
    "concurrent_consumers",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_fifo() {
    if !reachable().await {
        return;
    }
    skip(
        "bulk_limit",
        "the adapter clamps bulk > 10 to 10 with a warning instead of refusing it",
    );
    for c in NOT_ON_FIFO {
        skip(
            c,
            "FIFO: one message group (the queue name, for packages without a group) delivers \
             one batch at a time; this check holds several deliveries of it at once",
        );
    }
    let checks: Vec<&str> = CHECKS
        .iter()
        .copied()
        .filter(|c| *c != "bulk_limit" && !NOT_ON_FIFO.contains(c))
        .collect();
    run(true, checks).await;
}
