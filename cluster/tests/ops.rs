//! Operators' commands through the real binary: `health` exit codes with the broker down and up,
//! with and without a running cluster; `prune` by age (dry run, failures, the floor); the
//! periodic `prune_older_than`.

mod common;

use std::time::{Duration, Instant};

use cluster::TaskRecord;
use cluster::broker_core::{TaskId, now_us};
use common::{Guard, World};

fn record(w: &World, success: bool, stopped_us: i64) -> TaskRecord {
    TaskRecord {
        id: TaskId::new(),
        name: "echo".into(),
        func: "echo".into(),
        args: "1".into(),
        result: Some(if success {
            "1".into()
        } else {
            "\"boom\"".into()
        }),
        enqueued_us: stopped_us - 2,
        started_us: stopped_us - 1,
        stopped_us,
        success,
        done: true,
        attempts: 1,
        group: None,
        cluster: w.name.clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_says_what_is_wrong_and_exits_one_until_all_is_well() {
    let w = World::new("health", None);
    // No cluster running: unhealthy, though broker and store answer.
    let h = w.json(&["health", "--json"], 1);
    assert_eq!(h["healthy"], false, "{h}");
    assert_eq!(h["broker"]["ok"], true, "{h}");
    assert_eq!(h["store"]["ok"], true, "{h}");
    assert_eq!(h["fresh_clusters"], 0);
    let _c = Guard(w.start());
    let t = Instant::now();
    loop {
        let out = w.run(&["health", "--json"]);
        if out.status.code() == Some(0) {
            let h: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
            assert_eq!(h["healthy"], true, "{h}");
            assert_eq!(h["fresh_clusters"], 1, "{h}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "never healthy");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let text = String::from_utf8_lossy(&w.run(&["health"]).stdout).into_owned();
    assert!(
        text.contains("healthy") && text.contains("heartbeat"),
        "{text}"
    );
    // The broker down (here: a database nobody serves): exit 1, and it says so.
    let mut down = World::new(
        "health_down",
        Some("postgres://postgres@127.0.0.1:1/none".into()),
    );
    down.set(
        "QCLUSTER_STORE__URL",
        format!("sqlite://{}/s.sqlite3", down.dir.path().display()),
    )
    .set("QCLUSTER_ORM__CONNECT_TIMEOUT", 1);
    let out = down.run(&["health"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("broker   FAILED") && text.contains("UNHEALTHY"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_deletes_old_results_by_age() {
    let w = World::new("prune", None);
    // The store's tables exist once any command has opened it.
    let _ = w.run(&["group", "none"]);
    let store = w.store().await;
    let day = 86_400_000_000;
    let now = now_us();
    let old_ok = record(&w, true, now - 10 * day);
    let old_failed = record(&w, false, now - 10 * day);
    let new_ok = record(&w, true, now - 1_000_000);
    store
        .save(&[old_ok.clone(), old_failed.clone(), new_ok.clone()])
        .await
        .expect("save");
    let dry = w.json(
        &["prune", "--results-older-than", "7d", "--dry-run", "--json"],
        0,
    );
    assert_eq!(dry["would_delete"], 1, "{dry}");
    assert_eq!(store.known(&[old_ok.id]).await.expect("known").len(), 1);
    let done = w.json(&["prune", "--results-older-than", "7d", "--json"], 0);
    assert_eq!(done["deleted"], 1, "{done}");
    let left = store
        .known(&[old_ok.id, old_failed.id, new_ok.id])
        .await
        .expect("known");
    assert!(
        !left.contains(&old_ok.id) && left.contains(&old_failed.id) && left.contains(&new_ok.id)
    );
    let done = w.json(
        &[
            "prune",
            "--results-older-than",
            "7d",
            "--failures",
            "--json",
        ],
        0,
    );
    assert_eq!(done["deleted"], 1, "{done}");
    // Younger than twice retry (60 s by default): refused.
    let out = w.run(&["prune", "--results-older-than", "90s"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("twice retry"));
    let out = w.run(&["prune", "--results-older-than", "soon"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`soon`"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_prune_older_than_prunes_by_itself() {
    let mut w = World::new("autoprune", None);
    w.set("QCLUSTER_PRUNE_OLDER_THAN", 3600)
        .set("QCLUSTER_SAVE_LIMIT", 0);
    let _ = w.run(&["group", "none"]);
    let store = w.store().await;
    let now = now_us();
    let old = record(&w, true, now - 7_200_000_000);
    let fresh = record(&w, true, now - 60_000_000);
    store
        .save(&[old.clone(), fresh.clone()])
        .await
        .expect("save");
    let _c = Guard(w.start());
    let t = Instant::now();
    while !store.known(&[old.id]).await.expect("known").is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "the old result is still there"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(store.known(&[fresh.id]).await.expect("known").len(), 1);
    // A value under twice retry is refused at start.
    let mut bad = World::new("autoprune_bad", None);
    bad.set("QCLUSTER_PRUNE_OLDER_THAN", 10);
    let out = bad.run(&["run"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("prune_older_than"));
}
