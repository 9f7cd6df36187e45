//! Fault tests on the Redis broker through the real binary: `kill -9` of the cluster mid-run,
//! and Redis itself restarted mid-run (a `redis-server` of the test's own, with an append-only
//! file). Nothing may be lost; duplicates only for what was in flight.
#![cfg(feature = "redis")]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Guard, World, free_port, signal, wait_exit};

fn redis_url() -> String {
    std::env::var("QCLUSTER_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

fn redis_world(tag: &str, url: &str) -> World {
    let mut w = World::new(tag, None);
    let store = w.url.clone();
    let prefix = format!("test:{}", w.name);
    w.set("QCLUSTER_BROKER", "redis")
        .set("QCLUSTER_REDIS__URL", url)
        .set("QCLUSTER_REDIS__PREFIX", prefix)
        .set("QCLUSTER_STORE__URL", store)
        .set("QCLUSTER_SAVE_LIMIT", 0);
    w
}

/// True if a Redis answers at `url`; else a loud skip (or a failure under
/// `QCLUSTER_REQUIRE_SERVICES=1`).
async fn redis_up(w: &World) -> bool {
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

fn totals(w: &World) -> serde_json::Value {
    w.json(&["info", "--json"], 0)
}

/// 1,000 `sleep` tasks, `kill -9` mid-run, restart: every task has a successful result, and
/// the tasks run twice are at most those that were in flight at the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_mid_run_loses_nothing() {
    let mut w = redis_world("rkill9", &redis_url());
    if !redis_up(&w).await {
        return;
    }
    w.set("QCLUSTER_WORKERS", 8)
        .set("QCLUSTER_TIMEOUT", 2)
        .set("QCLUSTER_RETRY", 3);
    let lines: Vec<String> = (0..1000)
        .map(|_| r#"{"func": "sleep", "args": 0.02}"#.to_owned())
        .collect();
    let ids = w.enqueue_lines(&lines);
    let mut run = Guard(w.start());
    let store = w.store().await;
    let t = Instant::now();
    while store.done_count(&ids).await.expect("count") < 300 {
        assert!(t.elapsed() < Duration::from_secs(60), "no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(&run.0, "KILL");
    wait_exit(&mut run.0, Duration::from_secs(5));
    let info = totals(&w);
    let in_flight = info["in_flight"].as_u64().expect("in flight");
    let done_at_kill = store.done_count(&ids).await.expect("count");
    assert!(done_at_kill < 1000, "the kill came mid-run");
    assert!(in_flight > 0, "kill -9 left leased packages: {info}");

    let _run = Guard(w.start());
    w.wait_done(&ids, Duration::from_secs(90)).await;
    let ok = store.succeeded(&ids).await.expect("succeeded");
    assert_eq!(ok.len(), 1000, "every task succeeded");
    // Runs of the second cluster beyond what was left are duplicates: only in-flight ones.
    let t = Instant::now();
    let processed = loop {
        let info = totals(&w);
        let p = info["clusters"][0]["totals"]["processed"].as_u64();
        if let Some(p) = p
            && p >= 1000 - done_at_kill
        {
            break p;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "status: {info}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let duplicates = processed - (1000 - done_at_kill);
    assert!(
        duplicates <= in_flight,
        "{duplicates} tasks ran twice, but only {in_flight} were in flight"
    );
}

/// A `redis-server` of the test's own (append-only file), shut down and started again while the
/// cluster works: the cluster reconnects and every task completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_mid_run_loses_nothing() {
    let Ok(bin) = which("redis-server") else {
        if std::env::var("QCLUSTER_REQUIRE_SERVICES").as_deref() == Ok("1") {
            panic!("redis-server is required for this test and is not installed");
        }
        eprintln!("skipped: redis-server not installed");
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    // A port the system just found free (a port derived from the pid could be taken).
    let port = free_port();
    let start = || {
        Command::new(&bin)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--appendonly",
                "yes",
            ])
            .args(["--appendfsync", "always", "--save", ""])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server")
    };
    let mut server = Guard(start());
    let url = format!("redis://127.0.0.1:{port}/0");
    let mut w = redis_world("rrestart", &url);
    let t = Instant::now();
    while !w.run(&["ping"]).status.success() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "own redis-server did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    w.set("QCLUSTER_WORKERS", 4)
        .set("QCLUSTER_TIMEOUT", 2)
        .set("QCLUSTER_RETRY", 3);
    let lines: Vec<String> = (0..300)
        .map(|_| r#"{"func": "sleep", "args": 0.02}"#.to_owned())
        .collect();
    let ids = w.enqueue_lines(&lines);
    let _run = Guard(w.start());
    let store = w.store().await;
    while store.done_count(&ids).await.expect("count") < 50 {
        assert!(t.elapsed() < Duration::from_secs(60), "no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Down for a second, then back with its append-only file.
    let _ = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "shutdown"])
        .status();
    wait_exit(&mut server.0, Duration::from_secs(10));
    let done_while_down = store.done_count(&ids).await.expect("count");
    assert!(done_while_down < 300, "the restart came mid-run");
    std::thread::sleep(Duration::from_secs(1));
    let _server2 = Guard(start());
    w.wait_done(&ids, Duration::from_secs(90)).await;
    assert_eq!(store.succeeded(&ids).await.expect("ok").len(), 300);
}

fn which(name: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|f| f.is_file())
        })
        .ok_or(())
}
