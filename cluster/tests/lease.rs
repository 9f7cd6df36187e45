//! Lease extension: a task that runs longer than `retry` keeps its lease for as long as it runs
//! (within its own timeout), so a second cluster on the same queue never gets it; a task that
//! finishes within its first lease costs no extension. On SQLite, Redis, the memory broker,
//! RabbitMQ, SQS, MongoDB and IronMQ.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster::broker_core::Broker;
use cluster::config::Secret;
use cluster::{Brokers, Client, Cluster, Config, EnqueueOptions, NewTask, Registry, Summary};

fn config(broker: &str, dir: &std::path::Path) -> Config {
    let uniq = &uuid::Uuid::now_v7().simple().to_string()[16..];
    let mut c = Config {
        name: format!("t_lease_{uniq}"),
        broker: broker.to_owned(),
        workers: 2,
        timeout: Duration::from_secs(1),
        retry: Duration::from_secs(2),
        guard_cycle: Duration::from_millis(200),
        secret: Some(Secret::new(format!(
            "lease-secret-{uniq}-long-enough-for-hmac"
        ))),
        ..Config::default()
    };
    let db = format!("sqlite://{}/q.sqlite3", dir.display());
    c.store.url = Some(cluster::config::Url(db.clone()));
    match broker {
        "orm" => {
            c.set("orm.url", db).expect("orm.url");
        }
        "redis" | "sqs" | "mongo" | "amqp" | "ironmq" => {
            for (key, value) in common::broker_keys(broker, &format!("lease_{uniq}")) {
                c.set(&format!("{broker}.{key}"), value).expect(key);
            }
        }
        _ => {}
    }
    c
}

/// `None` (with a loud skip, or a failure under `QCLUSTER_REQUIRE_SERVICES=1`) when the
/// broker's server is down.
async fn connect(cfg: &Config) -> Option<Arc<dyn Broker>> {
    match Brokers::builtin().connect(cfg).await {
        Ok(b) => Some(b),
        Err(e) => {
            if std::env::var("QCLUSTER_REQUIRE_SERVICES").as_deref() == Ok("1") {
                panic!("server required but unreachable: {e}");
            }
            eprintln!("skipped: {e}");
            None
        }
    }
}

/// Runs two clusters on one queue until `done` holds or `within` passes; returns both totals.
async fn two_clusters(
    cfg: &Config,
    within: Duration,
    done: impl AsyncFn() -> bool,
) -> (Summary, Summary) {
    let mut stops = Vec::new();
    let mut runs = Vec::new();
    for _ in 0..2 {
        let broker = connect(cfg).await.expect("broker");
        let c = Cluster::with_broker(cfg.clone(), Registry::with_builtins(), broker)
            .await
            .expect("cluster");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        stops.push(tx);
        runs.push(tokio::spawn(c.run(async {
            let _ = rx.await;
        })));
    }
    let t = Instant::now();
    while !done().await {
        assert!(t.elapsed() < within, "not done within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for s in stops {
        let _ = s.send(());
    }
    let mut out = Vec::new();
    for r in runs {
        out.push(r.await.expect("join").expect("run"));
    }
    (out[0], out[1])
}

async fn slow_task_keeps_its_lease(broker: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = config(broker, dir.path());
    let Some(b) = connect(&cfg).await else {
        return;
    };
    assert!(b.capabilities().extend, "{broker} declares extend");
    let client = Client::with_broker(&cfg, b).await.expect("client");
    // Runs 3.5 s: well past the 2 s lease, within its own 6 s timeout.
    let slow = client
        .enqueue_json(
            "sleep",
            b"3.5".to_vec(),
            EnqueueOptions {
                options: cluster::broker_core::TaskOptions {
                    timeout: Some(Duration::from_secs(6)),
                    ..Default::default()
                },
                delay: None,
            },
        )
        .await
        .expect("enqueue slow");
    let fast: Vec<_> = client
        .enqueue_many((0..20).map(|_| NewTask::new("noop", "null")).collect())
        .await
        .expect("enqueue fast");
    let (a, b) = two_clusters(&cfg, Duration::from_secs(30), async || {
        let mut all = fast.clone();
        all.push(slow);
        for id in all {
            match client.result(id).await.expect("result") {
                Some(r) if r.done => {}
                _ => return false,
            }
        }
        true
    })
    .await;
    let r = client.result(slow).await.expect("result").expect("row");
    assert!(r.success, "slow task succeeded: {:?}", r.result);
    assert_eq!(r.attempts, 1, "ran once");
    // Exactly one run of each task across both clusters: the slow one never went to the other.
    assert_eq!(a.processed + b.processed, 21, "{a:?} {b:?}");
    assert_eq!(a.duplicates + b.duplicates, 0, "{a:?} {b:?}");
    // 3.5 s on a 2 s lease extended just before it runs out (at 1.6 s, then ~3.2 s): 1 to 3
    // calls, and none for the 20 tasks that finished within their first lease.
    let ext = a.extended + b.extended;
    assert!((1..=3).contains(&ext), "{ext} extensions: {a:?} {b:?}");
    if let Some(b) = connect(&cfg).await {
        let _ = b.delete_queue().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_task_keeps_its_lease_sqlite() {
    slow_task_keeps_its_lease("orm").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_task_keeps_its_lease_redis() {
    slow_task_keeps_its_lease("redis").await;
}

#[cfg(feature = "sqs")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_task_keeps_its_lease_sqs() {
    slow_task_keeps_its_lease("sqs").await;
}

#[cfg(feature = "mongo")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_task_keeps_its_lease_mongo() {
    slow_task_keeps_its_lease("mongo").await;
}

#[cfg(feature = "amqp")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_task_keeps_its_lease_amqp() {
    slow_task_keeps_its_lease("amqp").await;
}

#[cfg(feature = "ironmq")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_task_keeps_its_lease_ironmq() {
    slow_task_keeps_its_lease("ironmq").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_task_keeps_its_lease_memory() {
    slow_task_keeps_its_lease("memory").await;
}

/// The memory broker, with `extend` failing (transient errors) for its first `fail` calls and
/// then answering "not held" for the next `moved` ones: what a broker outage or a lost lease
/// looks like to the cluster.
#[derive(Debug)]
struct Flaky {
    inner: cluster::broker_memory::MemoryBroker,
    fail: std::sync::atomic::AtomicUsize,
    moved: std::sync::atomic::AtomicUsize,
    calls: std::sync::atomic::AtomicUsize,
}

mod flaky {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use cluster::broker_core::{
        AckId, Broker, BrokerError, BrokerInfo, Capabilities, Delivery, Message, MessageId, Stat,
        async_trait,
    };

    #[async_trait]
    impl Broker for super::Flaky {
        async fn enqueue(&self, m: Message) -> Result<MessageId, BrokerError> {
            self.inner.enqueue(m).await
        }
        async fn enqueue_many(&self, m: Vec<Message>) -> Result<Vec<MessageId>, BrokerError> {
            self.inner.enqueue_many(m).await
        }
        async fn dequeue(&self) -> Result<Vec<Delivery>, BrokerError> {
            self.inner.dequeue().await
        }
        async fn acknowledge(&self, a: &AckId) -> Result<(), BrokerError> {
            self.inner.acknowledge(a).await
        }
        async fn acknowledge_many(&self, a: &[AckId]) -> Result<(), BrokerError> {
            self.inner.acknowledge_many(a).await
        }
        async fn fail(&self, a: &AckId) -> Result<(), BrokerError> {
            self.inner.fail(a).await
        }
        async fn fail_after(&self, a: &AckId, d: Duration) -> Result<(), BrokerError> {
            self.inner.fail_after(a, d).await
        }
        async fn delete(&self, a: &AckId) -> Result<(), BrokerError> {
            self.inner.delete(a).await
        }
        async fn extend(&self, a: &AckId, by: Duration) -> Result<bool, BrokerError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let take = |n: &std::sync::atomic::AtomicUsize| {
                n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
                    .is_ok()
            };
            if take(&self.fail) {
                return Err(BrokerError::Unreachable {
                    broker: "flaky",
                    endpoint: "test".into(),
                    message: "down for a moment".into(),
                });
            }
            if take(&self.moved) {
                return Ok(false);
            }
            self.inner.extend(a, by).await
        }
        async fn dead_letter(&self, a: &AckId, r: &str) -> Result<(), BrokerError> {
            self.inner.dead_letter(a, r).await
        }
        async fn purge_queue(&self) -> Result<u64, BrokerError> {
            self.inner.purge_queue().await
        }
        async fn delete_queue(&self) -> Result<(), BrokerError> {
            self.inner.delete_queue().await
        }
        async fn queue_size(&self) -> Result<u64, BrokerError> {
            self.inner.queue_size().await
        }
        async fn lock_size(&self) -> Result<Option<u64>, BrokerError> {
            self.inner.lock_size().await
        }
        async fn ping(&self) -> Result<(), BrokerError> {
            self.inner.ping().await
        }
        async fn info(&self) -> Result<BrokerInfo, BrokerError> {
            self.inner.info().await
        }
        fn capabilities(&self) -> Capabilities {
            self.inner.capabilities()
        }
        async fn set_stat(&self, k: &str, v: &[u8], ttl: Duration) -> Result<(), BrokerError> {
            self.inner.set_stat(k, v, ttl).await
        }
        async fn get_stats(&self, p: &str) -> Result<Vec<Stat>, BrokerError> {
            self.inner.get_stats(p).await
        }
    }
}

/// Runs one `sleep 2.5` task (its own timeout 6 s, past the 2 s lease) on the memory broker
/// behind [`Flaky`] until it has a final result; returns it, the totals and the extend calls.
async fn slow_task_on_flaky(
    fail: usize,
    moved: usize,
    ack_failure: bool,
) -> (cluster::TaskRecord, Summary, usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cfg = config("memory", dir.path());
    if ack_failure {
        cfg.ack_failure = true;
        cfg.max_attempts = 1;
    }
    let inner = cluster::broker_memory::MemoryBroker::open(
        &cluster::broker_memory::MemoryHub::new(),
        cfg.queue_settings(),
    )
    .expect("memory");
    let flaky = Arc::new(Flaky {
        inner,
        fail: fail.into(),
        moved: moved.into(),
        calls: 0.into(),
    });
    let client = Client::with_broker(&cfg, flaky.clone())
        .await
        .expect("client");
    let options = cluster::broker_core::TaskOptions {
        timeout: Some(Duration::from_secs(6)),
        ..Default::default()
    };
    let id = client
        .enqueue_json(
            "sleep",
            b"2.5".to_vec(),
            EnqueueOptions {
                options,
                delay: None,
            },
        )
        .await
        .expect("enqueue");
    let c = Cluster::with_broker(cfg.clone(), Registry::with_builtins(), flaky.clone())
        .await
        .expect("cluster");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(c.run(async {
        let _ = rx.await;
    }));
    let t = Instant::now();
    let record = loop {
        if let Some(r) = client.result(id).await.expect("result")
            && r.done
        {
            break r;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no final result");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = tx.send(());
    let totals = run.await.expect("join").expect("run");
    let calls = flaky.calls.load(std::sync::atomic::Ordering::SeqCst);
    (record, totals, calls)
}

/// A lease that cannot be kept (the broker errs until the last margin, or says the package
/// moved) stops the run and gives the package back without using up an attempt, even with
/// `ack_failure`: the task then runs to success on a later delivery.
async fn lost_lease_is_given_back(fail: usize, moved: usize) {
    let (r, totals, calls) = slow_task_on_flaky(fail, moved, true).await;
    assert!(
        r.success,
        "ran to success after the lost lease: {:?}",
        r.result
    );
    assert_eq!(r.attempts, 1, "the lost run used no attempt");
    assert!(totals.given_back >= 1, "{totals:?}");
    assert_eq!(totals.processed, 1, "{totals:?}");
    assert!(calls > fail + moved, "extended after the loss");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_unanswered_until_the_last_margin_gives_the_task_back() {
    // 2 s lease: extension starts 0.67 s before the end and is retried every 0.2 s until 0.2 s
    // before it: at most three attempts, all refused.
    lost_lease_is_given_back(3, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_moved_to_another_consumer_gives_the_task_back() {
    lost_lease_is_given_back(0, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_extend_error_is_retried_within_the_lease() {
    // One refusal, then the next attempt (0.2 s later, still before the last margin) holds.
    let (r, totals, _) = slow_task_on_flaky(1, 0, false).await;
    assert!(r.success && r.attempts == 1, "{r:?}");
    assert_eq!(totals.given_back, 0, "kept on the second try: {totals:?}");
    assert!(totals.extended >= 1, "{totals:?}");
}
