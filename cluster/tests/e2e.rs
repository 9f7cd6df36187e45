//! End to end through the real `qcluster` binary, on SQLite and on PostgreSQL: tasks run and
//! their results are saved, failures are retried up to `max_attempts`, SIGTERM and `kill -9`
//! lose nothing, a tampered package is quarantined and never run.

mod common;

use std::time::Duration;

use common::{Guard, World, postgres_url, reachable, signal, wait_exit};

/// `None`: SQLite file; `Some`: PostgreSQL (skipped loudly if down).
/// Where the packages go. Results go to SQLite, or to PostgreSQL when that is the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    #[cfg_attr(not(feature = "orm-postgres"), allow(dead_code))]
    Postgres,
    Redis,
}

fn redis_url() -> String {
    std::env::var("QCLUSTER_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// `None` (with a loud skip) when the backend's server is down.
async fn world(tag: &str, b: Backend) -> Option<World> {
    match b {
        Backend::Sqlite => Some(World::new(tag, None)),
        Backend::Postgres => {
            let url = postgres_url();
            if !reachable(&url).await {
                return None;
            }
            Some(World::new(tag, Some(url)))
        }
        Backend::Redis => {
            let mut w = World::new(tag, None);
            let prefix = format!("test:{}", w.name);
            let cfg = redis_config(&w, &prefix);
            if let Err(e) = cluster::Brokers::builtin().connect(&cfg).await {
                if std::env::var("QCLUSTER_REQUIRE_SERVICES").as_deref() == Ok("1") {
                    panic!("server required but unreachable: {e}");
                }
                eprintln!("skipped: {e}");
                return None;
            }
            let store = w.url.clone();
            w.set("QCLUSTER_BROKER", "redis")
                .set("QCLUSTER_REDIS__URL", redis_url())
                .set("QCLUSTER_REDIS__PREFIX", prefix)
                .set("QCLUSTER_STORE__URL", store);
            Some(w)
        }
    }
}

fn redis_config(w: &World, prefix: &str) -> cluster::Config {
    let mut cfg = cluster::Config {
        name: w.name.clone(),
        broker: "redis".into(),
        secret: Some(cluster::config::Secret::new(w.secret.clone())),
        ..cluster::Config::default()
    };
    cfg.set("redis.url", redis_url()).expect("redis.url");
    cfg.set("redis.prefix", Some(prefix.to_owned()))
        .expect("redis.prefix");
    cfg.store.url = Some(cluster::config::Url(w.url.clone()));
    cfg
}

/// The configuration the world's `qcluster` runs with, for in-test clients.
fn config_of(w: &World, b: Backend) -> cluster::Config {
    if b == Backend::Redis {
        return redis_config(w, &format!("test:{}", w.name));
    }
    let mut cfg = cluster::Config {
        name: w.name.clone(),
        secret: Some(cluster::config::Secret::new(w.secret.clone())),
        ..cluster::Config::default()
    };
    cfg.set("orm.url", w.url.clone()).expect("orm.url");
    cfg
}

fn lines(n: usize, f: impl Fn(usize) -> String) -> Vec<String> {
    (0..n).map(f).collect()
}

async fn five_hundred_tasks_all_succeed(b: Backend) {
    let Some(mut w) = world("e2e500", b).await else {
        return;
    };
    w.set("QCLUSTER_SAVE_LIMIT", 0).set("QCLUSTER_WORKERS", 4);
    let group = format!("g500_{}", w.name);
    let ids = w.enqueue_lines(&lines(500, |i| {
        format!(r#"{{"func": "echo", "args": {{"i": {i}}}, "group": "{group}"}}"#)
    }));
    let mut run = Guard(w.start());
    w.wait_done(&ids, Duration::from_secs(60)).await;
    signal(&run.0, "TERM");
    assert_eq!(wait_exit(&mut run.0, Duration::from_secs(20)), Some(0));

    let results = w.store().await.group(&group).await.expect("group");
    assert_eq!(results.len(), 500);
    assert!(results.iter().all(|r| r.success && r.attempts == 1));
    let mut seen: Vec<i64> = results
        .iter()
        .map(|r| {
            let v: serde_json::Value =
                serde_json::from_str(r.result.as_deref().expect("result")).expect("json");
            v["i"].as_i64().expect("echoed i")
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        (0..500).collect::<Vec<_>>(),
        "every task's own result"
    );
    let info = w.json(&["info", "--json"], 0);
    assert_eq!(info["queued"], 0);
    assert_eq!(info["in_flight"], 0);
}

async fn failing_task_gets_three_attempts(b: Backend) {
    let Some(mut w) = world("fail3", b).await else {
        return;
    };
    w.set("QCLUSTER_MAX_ATTEMPTS", 3);
    let ids = w.enqueue_lines(&[r#"{"func": "fail", "args": "always"}"#.to_owned()]);
    let _run = Guard(w.start());
    w.wait_done(&ids, Duration::from_secs(30)).await;
    let r = w.json(&["result", "--json", &ids[0].to_string()], 1);
    assert_eq!(r["success"], false);
    assert_eq!(r["attempts"], 3);
    assert_eq!(r["result"], "always");
    assert_eq!(r["done"], true);
    // The failure is final: nothing left in the queue, nothing in flight.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let info = w.json(&["info", "--json"], 0);
    assert_eq!(info["queued"], 0, "{info}");
    assert_eq!(info["in_flight"], 0, "{info}");
    let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT COUNT(*) FROM qcluster_task WHERE id = '{}'",
        ids[0]
    )))
    .fetch_one(&any_pool(&w.url).await)
    .await
    .expect("count");
    assert_eq!(n, 1, "one saved failure");
}

async fn any_pool(url: &str) -> sqlx::AnyPool {
    sqlx::any::install_default_drivers();
    sqlx::AnyPool::connect(url).await.expect("pool")
}

/// SIGTERM while `sleep` tasks run (shutdown_timeout shorter than a task): the cluster exits 0,
/// gives back what did not finish, and a restart completes every task.
async fn sigterm_then_restart_completes_everything(b: Backend) {
    let Some(mut w) = world("term", b).await else {
        return;
    };
    w.set("QCLUSTER_WORKERS", 4)
        .set("QCLUSTER_SHUTDOWN_TIMEOUT", 0.2)
        .set("QCLUSTER_BULK", 4);
    let ids = w.enqueue_lines(&lines(40, |_| {
        r#"{"func": "sleep", "args": 0.5}"#.to_owned()
    }));
    let mut run = Guard(w.start());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    signal(&run.0, "TERM");
    assert_eq!(wait_exit(&mut run.0, Duration::from_secs(15)), Some(0));
    let store = w.store().await;
    let done_before = store.done_count(&ids).await.expect("count");
    assert!(
        done_before < 40,
        "the run was interrupted ({done_before} done)"
    );
    // Nothing may be left leased: what did not finish went back to the queue.
    let info = w.json(&["info", "--json"], 0);
    assert_eq!(info["in_flight"], 0, "{info}");
    assert_eq!(
        info["queued"].as_u64().expect("queued") + done_before,
        40,
        "every task is either done or queued again: {info}"
    );
    let _run = Guard(w.start());
    w.wait_done(&ids, Duration::from_secs(60)).await;
    let results = store.done_count(&ids).await.expect("count");
    assert_eq!(results, 40);
    let succeeded = store.succeeded(&ids).await.expect("succeeded");
    assert_eq!(succeeded.len(), 40, "every task succeeded");
}

/// `kill -9` mid-run: after a restart every task completes once its lease runs out.
async fn kill9_then_restart_completes_everything(b: Backend) {
    let Some(mut w) = world("kill9", b).await else {
        return;
    };
    w.set("QCLUSTER_WORKERS", 4)
        .set("QCLUSTER_TIMEOUT", 2)
        .set("QCLUSTER_RETRY", 3);
    let ids = w.enqueue_lines(&lines(40, |_| {
        r#"{"func": "sleep", "args": 0.3}"#.to_owned()
    }));
    let mut run = Guard(w.start());
    tokio::time::sleep(Duration::from_millis(1200)).await;
    signal(&run.0, "KILL");
    wait_exit(&mut run.0, Duration::from_secs(5));
    let store = w.store().await;
    let done_before = store.done_count(&ids).await.expect("count");
    assert!(
        done_before < 40,
        "the run was interrupted ({done_before} done)"
    );
    let info = w.json(&["info", "--json"], 0);
    assert!(
        info["in_flight"].as_u64().expect("in flight") > 0,
        "kill -9 left leased packages: {info}"
    );
    let _run = Guard(w.start());
    w.wait_done(&ids, Duration::from_secs(60)).await;
    let succeeded = store.succeeded(&ids).await.expect("succeeded");
    assert_eq!(succeeded.len(), 40, "every task succeeded");
}

/// A package altered in the database fails verification: quarantined, listed, never run.
async fn tampered_package_is_quarantined(b: Backend) {
    let Some(w) = world("tamper", b).await else {
        return;
    };
    let ids = w.enqueue_lines(&[
        r#"{"func": "echo", "args": "tampered"}"#.to_owned(),
        r#"{"func": "echo", "args": "honest"}"#.to_owned(),
    ]);
    if b == Backend::Redis {
        common::tamper_redis(&w).await;
    } else {
        common::tamper_sql(&w).await;
    }

    let _run = Guard(w.start());
    w.wait_done(&ids[1..], Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let store = w.store().await;
    assert!(store.get(ids[0]).await.expect("get").is_none(), "never run");
    let dead = w.json(&["quarantine", "--json"], 0);
    let dead = dead.as_array().expect("list");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(
        dead[0]["reason"]
            .as_str()
            .expect("reason")
            .contains("signature"),
        "{dead:?}"
    );
    // The cluster's published status counts it (published about once a second).
    let t = std::time::Instant::now();
    loop {
        let info = w.json(&["info", "--json"], 0);
        assert_eq!(info["quarantined"], 1);
        assert_eq!(info["queued"], 0);
        if info["clusters"][0]["totals"]["quarantined"] == 1 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "status: {info}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A task that already succeeded but whose package was never acknowledged (the cluster died
/// between saving and acknowledging) comes back after its lease: it is discarded, not run.
async fn redelivery_of_a_success_is_discarded(b: Backend) {
    let Some(mut w) = world("dedup", b).await else {
        return;
    };
    w.set("QCLUSTER_TIMEOUT", 1).set("QCLUSTER_RETRY", 2);
    let ids = w.enqueue_lines(&[r#"{"func": "echo", "args": "from the run"}"#.to_owned()]);
    // Claim it like a cluster that then dies, and record its success by hand.
    let cfg = cluster::Config {
        retry: Duration::from_secs(2),
        timeout: Duration::from_secs(1),
        ..config_of(&w, b)
    };
    let broker = cluster::Brokers::builtin()
        .connect(&cfg)
        .await
        .expect("broker");
    let got = broker.dequeue().await.expect("dequeue");
    assert_eq!(got.len(), 1);
    let store = w.store().await;
    let now = cluster::broker_core::now_us();
    store
        .save(&[cluster::TaskRecord {
            id: ids[0],
            name: "echo".into(),
            func: "echo".into(),
            args: "\"from the run\"".into(),
            result: Some("\"saved before the crash\"".into()),
            enqueued_us: now,
            started_us: now,
            stopped_us: now,
            success: true,
            done: true,
            attempts: 1,
            group: None,
            cluster: w.name.clone(),
        }])
        .await
        .expect("save");
    let _run = Guard(w.start());
    let t = std::time::Instant::now();
    loop {
        let info = w.json(&["info", "--json"], 0);
        if info["queued"] == 0
            && info["in_flight"] == 0
            && info["clusters"][0]["totals"]["duplicates"] == 1
        {
            assert_eq!(info["clusters"][0]["totals"]["processed"], 0, "{info}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(15), "{info}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let r = store.get(ids[0]).await.expect("get").expect("row");
    assert_eq!(
        r.result.as_deref(),
        Some("\"saved before the crash\""),
        "not run again"
    );
}

/// With `ack_failure`, a failure is final at once: one attempt, nothing left queued.
async fn ack_failure_settles_failures_at_once(b: Backend) {
    let Some(mut w) = world("ackfail", b).await else {
        return;
    };
    w.set("QCLUSTER_ACK_FAILURE", "true")
        .set("QCLUSTER_MAX_ATTEMPTS", 5);
    let ids = w.enqueue_lines(&[r#"{"func": "fail", "args": "once"}"#.to_owned()]);
    let _run = Guard(w.start());
    w.wait_done(&ids, Duration::from_secs(20)).await;
    let r = w.json(&["result", "--json", &ids[0].to_string()], 1);
    assert_eq!(r["attempts"], 1);
    assert_eq!(r["done"], true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let info = w.json(&["info", "--json"], 0);
    assert_eq!(info["queued"], 0, "{info}");
    assert_eq!(info["in_flight"], 0, "{info}");
}

/// A producer that does not know the cluster's tasks enqueues one it lacks: the cluster records
/// a final failure "unknown task" (no retries) and goes on.
async fn unknown_task_fails_at_run_time(b: Backend) {
    let Some(w) = world("unknown", b).await else {
        return;
    };
    let cfg = config_of(&w, b);
    let client = cluster::Client::connect(&cfg).await.expect("client");
    let id = client
        .enqueue_json(
            "not_in_this_binary",
            "[1]",
            cluster::EnqueueOptions::default(),
        )
        .await
        .expect("enqueue without a registry");
    let echo = client
        .enqueue_json("echo", "2", cluster::EnqueueOptions::default())
        .await
        .expect("enqueue");
    let _run = Guard(w.start());
    w.wait_done(&[id, echo], Duration::from_secs(20)).await;
    let r = client.result(id).await.expect("result").expect("row");
    assert!(!r.success && r.done);
    assert_eq!(r.attempts, 1);
    assert_eq!(
        r.result.as_deref(),
        Some("\"unknown task `not_in_this_binary`\"")
    );
    assert!(
        client
            .result(echo)
            .await
            .expect("result")
            .expect("row")
            .success
    );
}

macro_rules! on_each_backend {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Sqlite).await;
                }
            )*
        }
        #[cfg(feature = "orm-postgres")]
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Postgres).await;
                }
            )*
        }
        #[cfg(feature = "redis")]
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Redis).await;
                }
            )*
        }
    };
}

on_each_backend!(
    five_hundred_tasks_all_succeed,
    failing_task_gets_three_attempts,
    sigterm_then_restart_completes_everything,
    kill9_then_restart_completes_everything,
    tampered_package_is_quarantined,
    redelivery_of_a_success_is_discarded,
    ack_failure_settles_failures_at_once,
    unknown_task_fails_at_run_time,
);
