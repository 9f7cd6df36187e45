//! `worker_mode = "process"` through the real binary, on the embedded SQLite default: hard
//! timeouts, crashes, recycling, `max_rss`, `cpu_affinity`, and no orphan after `kill -9`.

mod common;

use std::time::{Duration, Instant};

use cluster::broker_core::TaskId;
use common::{Guard, World, signal};

fn process_world(tag: &str) -> World {
    let mut w = World::new(tag, None);
    w.set("QCLUSTER_WORKER_MODE", "process")
        .set("QCLUSTER_WORKERS", 2)
        .set("QCLUSTER_TIMEOUT", 2)
        .set("QCLUSTER_RETRY", 10);
    w
}

fn line(func: &str, args: &str) -> String {
    format!(r#"{{"func": "{func}", "args": {args}}}"#)
}

/// This cluster's published status (`info --json`), once it shows `children` worker processes.
async fn status_with_children(w: &World, children: usize) -> serde_json::Value {
    status_where(w, children, |_| true).await
}

/// The published status (it is refreshed every second), once it shows `children` worker
/// processes and `until` holds.
async fn status_where(
    w: &World,
    children: usize,
    until: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let t = Instant::now();
    loop {
        let info = w.json(&["info", "--json"], 0);
        if let Some(c) = info["clusters"].as_array().and_then(|c| c.first())
            && c["children"].as_array().map_or(0, Vec::len) == children
            && until(c)
        {
            return c.clone();
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no status with {children} worker processes as expected: {info}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn reincarnated(s: &serde_json::Value, reason: &str) -> u64 {
    s["totals"]["reincarnated"][reason].as_u64().unwrap_or(0)
}

fn child_pids(status: &serde_json::Value) -> Vec<u32> {
    status["children"]
        .as_array()
        .map(|c| {
            c.iter()
                .filter_map(|c| c["pid"].as_u64())
                .map(|p| p as u32)
                .collect()
        })
        .unwrap_or_default()
}

/// `Threads:` of `/proc/<pid>/status`.
fn threads(pid: u32) -> u64 {
    proc_field(pid, "Threads:")
        .and_then(|v| v.parse().ok())
        .expect("thread count")
}

fn proc_field(pid: u32, field: &str) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .map(|v| v.trim().to_owned())
}

/// Gone, or a zombie waiting for its new parent to reap it: either way it runs nothing.
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

async fn record(w: &World, id: TaskId) -> cluster::TaskRecord {
    w.store()
        .await
        .get(id)
        .await
        .expect("store")
        .expect("a result")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_past_its_timeout_is_killed_while_others_go_on() {
    let mut w = process_world("pspin");
    w.set("QCLUSTER_MAX_ATTEMPTS", 1);
    // Three spins of 30 s, one after another on one worker; the other runs the echoes.
    let spins = w.enqueue_lines(&vec![line("spin", "30"); 3]);
    let echoes = w.enqueue_lines(
        &(0..20)
            .map(|i| line("echo", &i.to_string()))
            .collect::<Vec<_>>(),
    );
    let mut guard = Guard(w.start());
    let pid = guard.0.id();
    let first = status_with_children(&w, 2).await;
    let threads_before = threads(pid);
    let t = Instant::now();
    let all: Vec<TaskId> = spins.iter().chain(&echoes).copied().collect();
    w.wait_done(&all, Duration::from_secs(40)).await;
    // Three timeouts of 2 s (plus the grace), not three spins of 30 s.
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t.elapsed()
    );
    let mut last_spin_stop = 0;
    for id in &spins {
        let r = record(&w, *id).await;
        assert!(!r.success && r.done);
        let msg = r.result.unwrap_or_default();
        assert!(msg.contains("timed out after 2s (worker killed)"), "{msg}");
        let ran = Duration::from_micros((r.stopped_us - r.started_us) as u64);
        assert!(ran < Duration::from_secs(5), "spin stopped after {ran:?}");
        last_spin_stop = last_spin_stop.max(r.stopped_us);
    }
    for id in &echoes {
        let r = record(&w, *id).await;
        assert!(r.success, "{r:?}");
        assert!(r.stopped_us < last_spin_stop, "echoes waited for the spins");
    }
    let status = status_where(&w, 2, |s| s["totals"]["processed"] == 23).await;
    assert_eq!(reincarnated(&status, "timeout"), 3, "{status}");
    // Every killed process is gone, and the cluster holds no thread for them.
    for p in child_pids(&first) {
        assert!(gone(p) || child_pids(&status).contains(&p));
    }
    let threads_after = threads(pid);
    assert!(
        threads_after < threads_before + 3,
        "threads grew from {threads_before} to {threads_after}"
    );
    signal(&guard.0, "TERM");
    assert_eq!(
        common::wait_exit(&mut guard.0, Duration::from_secs(20)),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_fails_its_task_and_is_retried_to_max_attempts() {
    let mut w = process_world("pcrash");
    w.set("QCLUSTER_MAX_ATTEMPTS", 3);
    let ids = w.enqueue_lines(&[line("crash", "null"), line("echo", "\"after\"")]);
    let _guard = Guard(w.start());
    w.wait_done(&ids, Duration::from_secs(40)).await;
    let crash = record(&w, ids[0]).await;
    assert!(!crash.success && crash.done);
    assert_eq!(crash.attempts, 3);
    let msg = crash.result.unwrap_or_default();
    assert!(msg.contains("worker died: signal 6"), "{msg}");
    assert!(record(&w, ids[1]).await.success);
    let status = status_where(&w, 2, |s| s["totals"]["processed"] == 4).await;
    assert_eq!(reincarnated(&status, "crash"), 3, "{status}");
    // Another task runs in a fresh process afterwards.
    let more = w.enqueue_lines(&[line("echo", "1")]);
    w.wait_done(&more, Duration::from_secs(20)).await;
    assert!(record(&w, more[0]).await.success);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recycle_replaces_children_every_n_tasks() {
    let mut w = process_world("precycle");
    w.set("QCLUSTER_RECYCLE", 5);
    let ids = w.enqueue_lines(&vec![line("noop", "null"); 50]);
    let _guard = Guard(w.start());
    w.wait_done(&ids, Duration::from_secs(60)).await;
    let status = status_where(&w, 2, |s| s["totals"]["processed"] == 50).await;
    let recycled = reincarnated(&status, "recycle");
    // 50 tasks over 2 processes of 5 tasks each: 10 replacements, 8 when the split is uneven.
    assert!((8..=10).contains(&recycled), "{status}");
    for c in status["children"].as_array().expect("children") {
        assert!(c["tasks"].as_u64().expect("tasks") < 5, "{c}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_rss_replaces_a_child_that_grows_past_it() {
    let mut w = process_world("prss");
    w.set("QCLUSTER_MAX_RSS", 96 * 1024);
    let _guard = Guard(w.start());
    let before = status_with_children(&w, 2).await;
    for c in before["children"].as_array().expect("children") {
        assert!(c["rss_kib"].as_u64().expect("rss") < 96 * 1024, "{c}");
    }
    let small = w.enqueue_lines(&vec![line("noop", "null"); 10]);
    w.wait_done(&small, Duration::from_secs(30)).await;
    let ids = w.enqueue_lines(&[line("leak", "128")]);
    w.wait_done(&ids, Duration::from_secs(30)).await;
    assert!(record(&w, ids[0]).await.success);
    let status = status_where(&w, 2, |s| s["totals"]["processed"] == 11).await;
    assert_eq!(reincarnated(&status, "rss"), 1, "{status}");
    assert_eq!(status["totals"]["reincarnations"], 1, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_the_cluster_leaves_no_worker_process() {
    let w = process_world("porphan");
    let mut guard = Guard(w.start());
    w.enqueue_lines(&vec![line("spin", "60"); 2]);
    let status = status_with_children(&w, 2).await;
    let t = Instant::now();
    // Both children busy spinning.
    loop {
        let s = status_with_children(&w, 2).await;
        if s["children"]
            .as_array()
            .is_some_and(|c| c.iter().all(|c| c["busy"] == true))
        {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pids = child_pids(&status_with_children(&w, 2).await);
    assert_eq!(pids.len(), 2, "{status}");
    signal(&guard.0, "KILL");
    let _ = guard.0.wait();
    let t = Instant::now();
    while !pids.iter().all(|&p| gone(p)) {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "worker processes {pids:?} outlived the cluster"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_affinity_pins_each_child_in_rotation() {
    let mut w = process_world("paffinity");
    w.set("QCLUSTER_CPU_AFFINITY", 1);
    let _guard = Guard(w.start());
    let status = status_with_children(&w, 2).await;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut seen = Vec::new();
    for c in status["children"].as_array().expect("children") {
        let pid = c["pid"].as_u64().expect("pid") as u32;
        let want: Vec<u64> = c["cpus"]
            .as_array()
            .expect("cpus")
            .iter()
            .filter_map(|v| v.as_u64())
            .collect();
        assert_eq!(want.len(), 1, "{c}");
        let allowed = proc_field(pid, "Cpus_allowed_list:").expect("cpus allowed");
        assert_eq!(allowed, want[0].to_string(), "{c}");
        seen.push(want[0]);
    }
    if cpus >= 2 {
        seen.dedup();
        assert_eq!(seen.len(), 2, "both children on one CPU: {status}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_and_leak_refuse_to_run_in_the_cluster_process() {
    let mut w = World::new("pasync", None);
    w.set("QCLUSTER_MAX_ATTEMPTS", 1)
        .set("QCLUSTER_WORKER_MODE", "async");
    let ids = w.enqueue_lines(&[line("crash", "null"), line("leak", "1")]);
    let _guard = Guard(w.start());
    w.wait_done(&ids, Duration::from_secs(30)).await;
    for id in ids {
        let r = record(&w, id).await;
        assert!(!r.success);
        let msg = r.result.unwrap_or_default();
        assert!(msg.contains("runs only in a worker process"), "{msg}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_running_tasks_finish_in_their_processes() {
    let mut w = process_world("pterm");
    w.set("QCLUSTER_TIMEOUT", 10).set("QCLUSTER_RETRY", 20);
    let ids = w.enqueue_lines(&[line("sleep", "2"), line("spin", "2")]);
    let mut guard = Guard(w.start());
    let busy = status_where(&w, 2, |s| {
        s["children"]
            .as_array()
            .is_some_and(|c| c.iter().all(|c| c["busy"] == true))
    })
    .await;
    let pids = child_pids(&busy);
    signal(&guard.0, "TERM");
    assert_eq!(
        common::wait_exit(&mut guard.0, Duration::from_secs(20)),
        Some(0)
    );
    for id in ids {
        let r = record(&w, id).await;
        assert!(r.success && r.attempts == 1, "{r:?}");
    }
    let t = Instant::now();
    while !pids.iter().all(|&p| gone(p)) {
        assert!(t.elapsed() < Duration::from_secs(5), "{pids:?} still there");
        std::thread::sleep(Duration::from_millis(50));
    }
}
