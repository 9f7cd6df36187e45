//! The scheduler through the real `qcluster` binary, on SQLite and PostgreSQL: every slot of an
//! every-second schedule fires exactly once while three clusters are killed (`kill -9`) and
//! started; `repeats`; `catch_up = false` after an outage, and with it (the default) every
//! missed slot run; `scheduler = false`; a malformed row is skipped; bad input
//! is refused naming what is wrong.

#[macro_use]
mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use cluster::broker_core::TaskId;
use cluster::scheduler::slot_task_id;
use common::Sql as Backend;
use common::{Guard, World, signal, sql_world};

/// The world of a test on `b`, 2 workers.
async fn world(tag: &str, b: Backend) -> Option<World> {
    let mut w = sql_world(tag, b).await?;
    w.set("QCLUSTER_WORKERS", 2);
    Some(w)
}

fn ok(w: &World, args: &[&str]) -> String {
    let out = w.run(args);
    assert!(
        out.status.success(),
        "qcluster {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Adds schedule `name`: `echo` with `args`, on the cron `* * * * * *` (every second).
fn every_second(w: &World, name: &str, args: &str) {
    ok(
        w,
        &[
            "schedule",
            "add",
            name,
            "echo",
            "--args",
            args,
            "--cron",
            "* * * * * *",
        ],
    );
}

/// Waits until every slot's task in `expected` has a final result; panics after `limit`.
async fn wait_slots_ran(w: &World, expected: &[TaskId], limit: Duration) {
    let store = w.store().await;
    let t = Instant::now();
    loop {
        let done = store.done_count(expected).await.expect("count");
        if done == expected.len() as u64 {
            return;
        }
        assert!(
            t.elapsed() < limit,
            "{done} of {} slots ran: a slot was lost",
            expected.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn show(w: &World, name: &str) -> serde_json::Value {
    w.json(&["schedule", "show", name, "--json"], 0)
}

/// Rows of the tasks a schedule of this world's cluster made (their `name` is the schedule's).
async fn rows_named(w: &World, name: &str) -> Vec<cluster::TaskRecord> {
    let pool = sqlx::AnyPool::connect(&w.url).await.expect("pool");
    let sql = if w.url.starts_with("postgres") {
        "SELECT id FROM qcluster_task WHERE name = $1 AND cluster = $2"
    } else {
        "SELECT id FROM qcluster_task WHERE name = ? AND cluster = ?"
    };
    let ids: Vec<String> = sqlx::query_scalar(sql)
        .bind(name.to_owned())
        .bind(w.name.clone())
        .fetch_all(&pool)
        .await
        .expect("rows");
    let ids: Vec<TaskId> = ids.iter().map(|i| i.parse().expect("id")).collect();
    w.store().await.get_many(&ids).await.expect("records")
}

fn micros(v: &serde_json::Value) -> i64 {
    let t = humantime::parse_rfc3339(v.as_str().expect("a time")).expect("rfc3339");
    t.duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_micros() as i64
}

async fn every_second_fires_each_slot_once_across_three_clusters(b: Backend) {
    sqlx::any::install_default_drivers();
    let Some(mut w) = world("sched3", b).await else {
        return;
    };
    // Short leases: a slot's task that a killed cluster held comes back within seconds (its
    // package after `retry`, its run claim once older than timeout + retry).
    w.set("QCLUSTER_GUARD_CYCLE", 0.2)
        .set("QCLUSTER_TIMEOUT", 2)
        .set("QCLUSTER_RETRY", 5);
    every_second(&w, "tick", "1");
    let s = show(&w, "tick");
    let id: TaskId = s["id"].as_str().expect("id").parse().expect("uuid");
    let mut clusters: Vec<Guard> = (0..3).map(|_| Guard(w.start())).collect();
    let t = Instant::now();
    let mut round = 0;
    // 20 s: every ~3 s one cluster is killed and a new one started in its place.
    while t.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(2700)).await;
        let victim = round % 3;
        signal(&clusters[victim].0, "KILL");
        let _ = clusters[victim].0.wait();
        if round % 2 == 0 {
            // A moment with one cluster fewer.
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
        clusters[victim] = Guard(w.start());
        round += 1;
    }
    ok(&w, &["schedule", "pause", "tick"]);
    let s = show(&w, "tick");
    let last = micros(&s["last_run"]);
    // Every whole second from the first slot to the last one fired.
    let slots: Vec<i64> = (0..)
        .map(|k| micros(&s["anchor"]) + k * 1_000_000)
        .take_while(|&t| t <= last)
        .collect();
    assert!(slots.len() >= 18, "only {} slots in 20 s", slots.len());
    let expected: Vec<TaskId> = slots.iter().map(|&t| slot_task_id(id, t)).collect();
    // Every slot has run by now or runs within a few seconds (the clusters keep running).
    wait_slots_ran(&w, &expected, Duration::from_secs(30)).await;
    let rows = rows_named(&w, "tick").await;
    let ids: HashSet<TaskId> = rows.iter().map(|r| r.id).collect();
    let want: HashSet<TaskId> = expected.iter().copied().collect();
    assert_eq!(ids, want, "one task per slot, none other");
    for r in &rows {
        assert!(r.success && r.attempts == 1, "{r:?}");
    }
    drop(clusters);
}

async fn repeats_three_fires_three_times(b: Backend) {
    sqlx::any::install_default_drivers();
    let Some(w) = world("schedrep", b).await else {
        return;
    };
    ok(
        &w,
        &[
            "schedule",
            "add",
            "thrice",
            "echo",
            "--args",
            "3",
            "--cron",
            "* * * * * *",
            "--repeats",
            "3",
        ],
    );
    let _c = Guard(w.start());
    tokio::time::sleep(Duration::from_secs(6)).await;
    let rows = rows_named(&w, "thrice").await;
    assert_eq!(rows.len(), 3, "{rows:?}");
    let s = show(&w, "thrice");
    assert_eq!(s["repeats"], 0, "{s}");
    assert!(s["next_run"].is_null(), "{s}");
}

async fn no_catch_up_fires_one_slot_after_an_outage(b: Backend) {
    sqlx::any::install_default_drivers();
    let Some(mut w) = world("schedcatch", b).await else {
        return;
    };
    every_second(&w, "sec", "0");
    {
        let _c = Guard(w.start());
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let before = rows_named(&w, "sec").await.len();
    assert!(before >= 2, "{before}");
    // Ten slots pass with no cluster.
    tokio::time::sleep(Duration::from_secs(10)).await;
    w.set("QCLUSTER_CATCH_UP", "false");
    let t = Instant::now();
    let mut c = Guard(w.start());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    signal(&c.0, "TERM");
    let _ = c.0.wait();
    let ran = t.elapsed().as_secs() as usize;
    let after = rows_named(&w, "sec").await.len();
    // One run for the ten missed slots, plus the slots of the time it ran.
    assert!(
        after - before <= 2 + ran,
        "{} new runs in {ran} s after the outage: the missed slots were all run",
        after - before
    );
    assert!(after > before, "the missed slots were not run at all");
}

/// `scheduler = false` fires nothing; then, with `catch_up` (the default), every slot missed
/// while no cluster scheduled runs once the scheduler is back.
async fn catch_up_runs_every_missed_slot(b: Backend) {
    sqlx::any::install_default_drivers();
    let Some(mut w) = world("schedup", b).await else {
        return;
    };
    every_second(&w, "sec", "0");
    let id: TaskId = show(&w, "sec")["id"]
        .as_str()
        .expect("id")
        .parse()
        .expect("uuid");
    w.set("QCLUSTER_SCHEDULER", "false");
    {
        let _c = Guard(w.start());
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            rows_named(&w, "sec").await.is_empty(),
            "a cluster with scheduler = false fired a slot"
        );
    }
    assert!(show(&w, "sec")["last_run"].is_null());
    // Nobody schedules for 5 s more, then a cluster with the scheduler on runs for 3 s.
    tokio::time::sleep(Duration::from_secs(5)).await;
    w.set("QCLUSTER_SCHEDULER", "true");
    {
        let _c = Guard(w.start());
        tokio::time::sleep(Duration::from_secs(3)).await;
        ok(&w, &["schedule", "pause", "sec"]);
        let s = show(&w, "sec");
        let last = micros(&s["last_run"]);
        let slots: Vec<i64> = (0..)
            .map(|k| micros(&s["anchor"]) + k * 1_000_000)
            .take_while(|&t| t <= last)
            .collect();
        assert!(
            slots.len() >= 9,
            "only {} slots fired after 11 s: the missed ones were not caught up",
            slots.len()
        );
        let expected: Vec<TaskId> = slots.iter().map(|&t| slot_task_id(id, t)).collect();
        wait_slots_ran(&w, &expected, Duration::from_secs(20)).await;
        let rows = rows_named(&w, "sec").await;
        assert_eq!(rows.len(), expected.len(), "one task per slot");
    }
}

async fn a_malformed_row_is_skipped_and_the_rest_fire(b: Backend) {
    sqlx::any::install_default_drivers();
    let Some(w) = world("schedbad", b).await else {
        return;
    };
    every_second(&w, "good", "1");
    every_second(&w, "bad", "1");
    let pool = sqlx::AnyPool::connect(&w.url).await.expect("pool");
    let sql = if w.url.starts_with("postgres") {
        "UPDATE qcluster_schedule SET kind = 'fortnightly' WHERE name = 'bad' AND cluster = $1"
    } else {
        "UPDATE qcluster_schedule SET kind = 'fortnightly' WHERE name = 'bad' AND cluster = ?"
    };
    sqlx::query(sql)
        .bind(w.name.clone())
        .execute(&pool)
        .await
        .expect("edit by hand");
    // A second row with a cron expression that does not parse.
    every_second(&w, "badcron", "1");
    let sql = if w.url.starts_with("postgres") {
        "UPDATE qcluster_schedule SET cron = 'every full moon' WHERE name = 'badcron' AND cluster = $1"
    } else {
        "UPDATE qcluster_schedule SET cron = 'every full moon' WHERE name = 'badcron' AND cluster = ?"
    };
    sqlx::query(sql)
        .bind(w.name.clone())
        .execute(&pool)
        .await
        .expect("edit by hand");
    let log_dir = tempfile::tempdir().expect("dir");
    let log_path = log_dir.path().join("run.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut c = Guard(
        w.cmd(&["run"])
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("run"),
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(c.0.try_wait().expect("wait").is_none(), "the cluster died");
    assert!(rows_named(&w, "good").await.len() >= 2);
    assert!(rows_named(&w, "bad").await.is_empty());
    assert!(rows_named(&w, "badcron").await.is_empty());
    // Each bad row is reported by name, once (not once per guard cycle).
    let text = std::fs::read_to_string(&log_path).expect("log");
    for name in ["bad", "badcron"] {
        let said = format!("schedule `{name}` skipped");
        assert_eq!(text.matches(&said).count(), 1, "{said}:\n{text}");
    }
    // `list` still shows all three.
    let list = w.json(&["schedule", "list", "--json"], 0);
    assert_eq!(list.as_array().map(Vec::len), Some(3), "{list}");
}

/// A cluster that claimed a slot and died before enqueueing it: another cluster enqueues the
/// slot once the claim is stale, and it runs once.
async fn a_slot_claimed_by_a_dead_cluster_is_recovered(b: Backend) {
    sqlx::any::install_default_drivers();
    let Some(w) = world("schedrecover", b).await else {
        return;
    };
    ok(
        &w,
        &[
            "schedule", "add", "daily", "echo", "--args", "7", "--every", "daily",
        ],
    );
    let s = show(&w, "daily");
    let id: TaskId = s["id"].as_str().expect("id").parse().expect("uuid");
    let store = w.store().await;
    let row = store
        .schedule(&w.name, "daily")
        .await
        .expect("get")
        .expect("row");
    let slot = row.next_run.expect("next");
    let task = slot_task_id(id, slot);
    // The dead cluster's claim, 10 s ago, never confirmed.
    let then = cluster::broker_core::now_us() - 10_000_000;
    assert!(
        store
            .claim_slot(
                &row.id,
                slot,
                Some(slot + 86_400_000_000),
                -1,
                slot,
                &task.to_string(),
                then
            )
            .await
            .expect("claim")
    );
    let _c = Guard(w.start());
    let r = w.wait_record(task, Duration::from_secs(30)).await;
    assert!(r.success && r.attempts == 1, "{r:?}");
    let t = Instant::now();
    while store
        .schedule(&w.name, "daily")
        .await
        .expect("get")
        .expect("row")
        .pending
        .is_some()
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the slot stays pending"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(rows_named(&w, "daily").await.len(), 1);
}

#[test]
fn bad_input_is_refused_naming_it() {
    let w = World::new("schedcli", None);
    let refused = |args: &[&str], needle: &str| {
        let out = w.run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: `{needle}` not in: {err}");
    };
    refused(
        &["schedule", "add", "c", "echo", "--cron", "* * 32 * *"],
        "day of month",
    );
    refused(
        &[
            "schedule",
            "add",
            "z",
            "echo",
            "--every",
            "daily",
            "--tz",
            "Mars/Olympus",
        ],
        "Mars/Olympus",
    );
    refused(
        &[
            "schedule",
            "add",
            "t",
            "echo",
            "--once",
            "--next-run",
            "tomorrow-ish",
        ],
        "tomorrow-ish",
    );
    refused(
        &["schedule", "add", "k", "echo", "--every", "fortnightly"],
        "fortnightly",
    );
    refused(
        &["schedule", "add", "u", "nope", "--every", "daily"],
        "nope",
    );
    ok(&w, &["schedule", "add", "d", "echo", "--every", "daily"]);
    refused(
        &["schedule", "add", "d", "echo", "--every", "daily"],
        "exists",
    );
    refused(&["schedule", "pause", "missing"], "no such schedule");
    // What was added is listed, paused, resumed, run and removed.
    let list = w.json(&["schedule", "list", "--json"], 0);
    assert_eq!(list[0]["name"], "d");
    assert_eq!(list[0]["kind"], "daily");
    ok(&w, &["schedule", "pause", "d"]);
    assert_eq!(show(&w, "d")["enabled"], false);
    ok(&w, &["schedule", "resume", "d"]);
    assert_eq!(show(&w, "d")["enabled"], true);
    let run = w.json(&["schedule", "run", "d", "--json"], 0);
    assert!(run["id"].as_str().is_some());
    ok(&w, &["schedule", "remove", "d"]);
    assert_eq!(
        w.json(&["schedule", "list", "--json"], 0),
        serde_json::json!([])
    );
}

on_sqlite_and_postgres!(
    every_second_fires_each_slot_once_across_three_clusters,
    repeats_three_fires_three_times,
    no_catch_up_fires_one_slot_after_an_outage,
    catch_up_runs_every_missed_slot,
    a_malformed_row_is_skipped_and_the_rest_fire,
    a_slot_claimed_by_a_dead_cluster_is_recovered,
);
