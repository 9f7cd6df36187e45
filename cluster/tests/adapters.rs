//! The SQS, MongoDB, RabbitMQ, IronMQ and Disque brokers through the real binary, against the
//! servers `scripts/test` starts (moto at `QCLUSTER_TEST_SQS_ENDPOINT`, SecantusDB at
//! `QCLUSTER_TEST_MONGO_URL`, RabbitMQ at 127.0.0.1:5672, the project's IronMQ v3 test server at
//! `QCLUSTER_TEST_IRONMQ_URL`; Disque only where `DISQUE_NODES` names one): a run whose status `info`
//! shows (from the result store where the broker cannot hold it), and a `kill -9` mid-run
//! after which every task still succeeds, run twice only if it was in flight; RabbitMQ's app
//! stopped and started mid-run.
#![cfg(any(
    feature = "sqs",
    feature = "mongo",
    feature = "amqp",
    feature = "ironmq",
    feature = "disque"
))]

mod common;

use std::time::{Duration, Instant};

use common::{Guard, World, signal, wait_exit};

#[cfg(feature = "sqs")]
fn sqs_world(tag: &str) -> World {
    World::on_broker(tag, "sqs")
}

#[cfg(feature = "mongo")]
fn mongo_world(tag: &str) -> World {
    World::on_broker(tag, "mongo")
}

/// True if the broker answers `qcluster ping`; else a loud skip (or a failure under
/// `QCLUSTER_REQUIRE_SERVICES=1`).
fn up(w: &World) -> bool {
    let out = w.run(&["ping"]);
    if out.status.success() {
        return true;
    }
    let why = String::from_utf8_lossy(&out.stdout).into_owned();
    if std::env::var("QCLUSTER_REQUIRE_SERVICES").as_deref() == Ok("1") {
        panic!("server required but unreachable: {why}");
    }
    eprintln!("skipped: {why}");
    false
}

/// Removes the test's queue (and its dead letters) at the end.
struct Cleanup<'a>(&'a World);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let _ = self.0.run(&["delete-queue", "--yes"]);
    }
}

/// The status entry of the cluster with process id `pid`, once `info` shows it.
fn status_of(w: &World, pid: u32, what: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let t = Instant::now();
    loop {
        let info = w.json(&["info", "--json"], 0);
        let found = info["clusters"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["pid"].as_u64() == Some(u64::from(pid)) && what(c))
            .cloned();
        if let Some(c) = found {
            return serde_json::json!({ "info": info, "cluster": c });
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "cluster {pid} not in info: {info}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// 60 tasks (noop, echo, one that fails and is retried) run to the end; while the cluster
/// runs, `info` shows it and says where its status lives; TERM stops it cleanly.
async fn runs_and_shows_status(w: World, status_in: &str) {
    if !up(&w) {
        return;
    }
    let _clean = Cleanup(&w);
    let mut lines: Vec<String> = (0..50)
        .map(|i| format!(r#"{{"func": "echo", "args": {i}}}"#))
        .collect();
    lines.extend((0..10).map(|_| r#"{"func": "noop"}"#.to_owned()));
    let ids = w.enqueue_lines(&lines);
    let mut run = Guard(w.start());
    w.wait_done(&ids, Duration::from_secs(120)).await;
    let store = w.store().await;
    assert_eq!(store.succeeded(&ids).await.expect("ok").len(), 60);
    let echoed = store.get(ids[7]).await.expect("get").expect("row");
    assert_eq!(echoed.result.as_deref(), Some("7"));
    let seen = status_of(&w, run.0.id(), |c| {
        c["totals"]["processed"].as_u64() >= Some(60)
    });
    let at = seen["info"]["status_at"].as_str().unwrap_or_default();
    assert!(at.contains(status_in), "status lives {status_in}: {seen}");
    signal(&run.0, "TERM");
    assert_eq!(wait_exit(&mut run.0, Duration::from_secs(30)), Some(0));
    let info = w.json(&["info", "--json"], 0);
    assert_eq!(info["queued"].as_u64(), Some(0), "{info}");
}

/// 300 `sleep` tasks, `kill -9` mid-run, restart: every task has a successful result, and the
/// tasks run twice are at most those in flight at the kill. `retry` (the lease) is what the
/// killed cluster's packages wait for before they come back; on a slow stand-in (moto answers
/// in seconds while other tests load it) a short lease is lost before results are settled,
/// which duplicates runs and defeats the count.
async fn kill9_loses_nothing(mut w: World, retry: u64) {
    if !up(&w) {
        return;
    }
    const N: usize = 300;
    w.set("QCLUSTER_WORKERS", 4)
        .set("QCLUSTER_TIMEOUT", 2)
        .set("QCLUSTER_RETRY", retry);
    let _clean = Cleanup(&w);
    let lines: Vec<String> = (0..N)
        .map(|_| r#"{"func": "sleep", "args": 0.01}"#.to_owned())
        .collect();
    let ids = w.enqueue_lines(&lines);
    let mut run = Guard(w.start());
    let store = w.store().await;
    let t = Instant::now();
    while store.done_count(&ids).await.expect("count") < 60 {
        assert!(t.elapsed() < Duration::from_secs(90), "no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(&run.0, "KILL");
    wait_exit(&mut run.0, Duration::from_secs(5));
    let info = w.json(&["info", "--json"], 0);
    let done_at_kill = store.done_count(&ids).await.expect("count");
    assert!(done_at_kill < N as u64, "the kill came mid-run");
    // What was in flight at the kill: the broker's count where it keeps one; else (AMQP gives
    // a dead consumer's deliveries back at once, IronMQ does not count reservations) the most
    // a cluster can hold: its in-memory queue (2 × bulk 10), 4 workers, and a bulk per pusher
    // (2) claimed but not yet queued.
    let in_flight = match info["in_flight"].as_u64() {
        Some(n) => {
            assert!(n > 0, "kill -9 left leased packages: {info}");
            n
        }
        None => 20 + 4 + 2 * 10,
    };

    let again = Guard(w.start());
    w.wait_done(&ids, Duration::from_secs(180)).await;
    let ok = store.succeeded(&ids).await.expect("succeeded");
    assert_eq!(ok.len(), N, "every task succeeded");
    let left = N as u64 - done_at_kill;
    let seen = status_of(&w, again.0.id(), |c| {
        c["totals"]["processed"].as_u64() >= Some(left)
    });
    let processed = seen["cluster"]["totals"]["processed"]
        .as_u64()
        .expect("processed");
    let duplicates = processed - left;
    assert!(
        duplicates <= in_flight,
        "{duplicates} tasks ran twice, but only {in_flight} were in flight"
    );
}

#[cfg(feature = "sqs")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_runs_and_keeps_status_in_the_store() {
    runs_and_shows_status(sqs_world("sqsrun"), "result store").await;
}

#[cfg(feature = "sqs")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_kill9_mid_run_loses_nothing() {
    kill9_loses_nothing(sqs_world("sqskill"), 10).await;
}

#[cfg(feature = "mongo")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_runs_and_keeps_status_in_the_broker() {
    runs_and_shows_status(mongo_world("mgrun"), "broker (mongo)").await;
}

#[cfg(feature = "mongo")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_kill9_mid_run_loses_nothing() {
    kill9_loses_nothing(mongo_world("mgkill"), 10).await;
}

#[cfg(feature = "amqp")]
fn amqp_world(tag: &str) -> World {
    World::on_broker(tag, "amqp")
}

#[cfg(feature = "ironmq")]
fn ironmq_world(tag: &str) -> World {
    World::on_broker(tag, "ironmq")
}

/// The Disque nodes of `DISQUE_NODES`, or a loud skip (the test script does not start Disque:
/// no registry has it).
#[cfg(feature = "disque")]
fn disque_world(tag: &str) -> Option<World> {
    let Ok(nodes) = std::env::var("DISQUE_NODES") else {
        eprintln!("skipped: no Disque server (set DISQUE_NODES)");
        return None;
    };
    let list: Vec<String> = nodes
        .split(',')
        .map(|n| format!("\"{}\"", n.trim()))
        .collect();
    let mut w = World::new(tag, None);
    let store = w.url.clone();
    w.set("QCLUSTER_BROKER", "disque")
        .set("QCLUSTER_DISQUE__NODES", format!("[{}]", list.join(",")))
        .set("QCLUSTER_STORE__URL", store)
        .set("QCLUSTER_SAVE_LIMIT", 0);
    Some(w)
}

#[cfg(feature = "amqp")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_runs_and_keeps_status_in_the_store() {
    runs_and_shows_status(amqp_world("amqprun"), "result store").await;
}

#[cfg(feature = "amqp")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_kill9_mid_run_loses_nothing() {
    kill9_loses_nothing(amqp_world("amqpkill"), 3).await;
}

#[cfg(feature = "ironmq")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ironmq_runs_and_keeps_status_in_the_store() {
    runs_and_shows_status(ironmq_world("ironrun"), "result store").await;
}

#[cfg(feature = "ironmq")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ironmq_kill9_mid_run_loses_nothing() {
    kill9_loses_nothing(ironmq_world("ironkill"), 3).await;
}

#[cfg(feature = "disque")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disque_runs_and_keeps_status_in_the_store() {
    if let Some(w) = disque_world("dqrun") {
        runs_and_shows_status(w, "result store").await;
    }
}

#[cfg(feature = "disque")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disque_kill9_mid_run_loses_nothing() {
    if let Some(w) = disque_world("dqkill") {
        kill9_loses_nothing(w, 3).await;
    }
}

/// Runs `rabbitmqctl start_app` when dropped, so a failed assertion never leaves RabbitMQ down.
#[cfg(feature = "amqp")]
struct StartApp;

#[cfg(feature = "amqp")]
impl Drop for StartApp {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .arg("start_app")
            .output();
    }
}

/// RabbitMQ's application stopped (`rabbitmqctl stop_app`) for a few seconds and started again
/// while a cluster runs 1,000 tasks: the cluster reconnects, and every task ends with a
/// successful result.
#[cfg(feature = "amqp")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_restart_mid_run_loses_nothing() {
    let mut w = amqp_world("amqprestart");
    if !up(&w) {
        return;
    }
    let ctl = std::process::Command::new("rabbitmqctl")
        .arg("status")
        .output();
    if !ctl.is_ok_and(|o| o.status.success()) {
        let why = "rabbitmqctl is missing or cannot reach the node";
        if std::env::var("QCLUSTER_REQUIRE_SERVICES").as_deref() == Ok("1") {
            panic!("server required but unreachable: {why}");
        }
        eprintln!("skipped: {why}");
        return;
    }
    const N: usize = 1000;
    w.set("QCLUSTER_WORKERS", 4)
        .set("QCLUSTER_TIMEOUT", 5)
        .set("QCLUSTER_RETRY", 10);
    let _clean = Cleanup(&w);
    // 50 ms a task on 4 workers: the run lasts about 12 s, well beyond the seconds
    // `rabbitmqctl stop_app` takes to start its VM and close the connections, so the
    // outage lands mid-run even on a slow machine.
    let lines: Vec<String> = (0..N)
        .map(|_| r#"{"func": "sleep", "args": 0.05}"#.to_owned())
        .collect();
    let ids = w.enqueue_lines(&lines);
    let _run = Guard(w.start());
    let store = w.store().await;
    let t = Instant::now();
    while store.done_count(&ids).await.expect("count") < 100 {
        assert!(t.elapsed() < Duration::from_secs(90), "no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let restart = StartApp;
    let stop = std::process::Command::new("rabbitmqctl")
        .arg("stop_app")
        .output()
        .expect("rabbitmqctl stop_app");
    assert!(stop.status.success(), "stop_app: {stop:?}");
    let done_while_down = store.done_count(&ids).await.expect("count");
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(restart);
    assert!(done_while_down < N as u64, "the restart came mid-run");
    w.wait_done(&ids, Duration::from_secs(180)).await;
    let ok = store.succeeded(&ids).await.expect("succeeded");
    assert_eq!(ok.len(), N, "every task succeeded after the restart");
}
