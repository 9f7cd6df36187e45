//! Lease extension: a task that runs longer than `retry` keeps its lease for as long as it runs
//! (within its own timeout), so a second cluster on the same queue never gets it; a task that
//! finishes within its first lease costs no extension. On SQLite, Redis and the memory broker.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster::broker_core::Broker;
use cluster::config::Secret;
use cluster::{Brokers, Client, Cluster, Config, EnqueueOptions, NewTask, Registry, Summary};

fn redis_url() -> String {
    std::env::var("QCLUSTER_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

fn config(broker: &str, dir: &std::path::Path) -> Config {
    let uniq = &uuid::Uuid::now_v7().simple().to_string()[16..];
    let mut c = Config {
        name: format!("t_lease_{uniq}"),
        broker: broker.to_owned(),
        workers: 2,
        timeout: Duration::from_secs(1),
        retry: Duration::from_secs(2),
        guard_cycle: Duration::from_millis(200),
        secret: Some(Secret::new(format!("lease-secret-{uniq}"))),
        ..Config::default()
    };
    let db = format!("sqlite://{}/q.sqlite3", dir.display());
    c.store.url = Some(cluster::config::Url(db.clone()));
    match broker {
        "orm" => {
            c.set("orm.url", db).expect("orm.url");
        }
        "redis" => {
            c.set("redis.url", redis_url()).expect("redis.url");
            c.set("redis.prefix", format!("test:{uniq}"))
                .expect("prefix");
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_task_keeps_its_lease_sqlite() {
    slow_task_keeps_its_lease("orm").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_task_keeps_its_lease_redis() {
    slow_task_keeps_its_lease("redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_task_keeps_its_lease_memory() {
    slow_task_keeps_its_lease("memory").await;
}
