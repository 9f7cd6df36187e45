//! The result store on SQLite, PostgreSQL and MariaDB: upserts never replace a success,
//! groups, final-result counts, pruning.

mod common;

use std::time::Duration;

use cluster::broker_core::{TaskId, now_us};
use cluster::{Store, TaskRecord};

fn rec(
    id: TaskId,
    success: bool,
    done: bool,
    attempts: u32,
    cluster: &str,
    stopped: i64,
) -> TaskRecord {
    TaskRecord {
        id,
        name: "n".into(),
        func: "f".into(),
        args: "[1]".into(),
        result: Some(if success {
            "42".into()
        } else {
            "\"boom\"".into()
        }),
        enqueued_us: stopped - 10,
        started_us: stopped - 5,
        stopped_us: stopped,
        success,
        done,
        attempts,
        group: Some(format!("g_{cluster}")),
        cluster: cluster.into(),
    }
}

async fn store_semantics(url: &str) {
    let store = Store::connect(url, Duration::from_secs(5))
        .await
        .expect("connect");
    // Twice: creating the table again is harmless.
    let store2 = Store::connect(url, Duration::from_secs(5))
        .await
        .expect("reconnect");
    let cluster = format!("c_{}", &uuid::Uuid::now_v7().simple().to_string()[16..]);
    let now = now_us();
    let a = TaskId::new();
    let b = TaskId::new();
    store
        .save(&[rec(a, false, false, 1, &cluster, now)])
        .await
        .expect("save");
    let got = store.get(a).await.expect("get").expect("row");
    assert!(!got.success && !got.done && got.attempts == 1);
    // A retry succeeds: the row is updated.
    store2
        .save(&[rec(a, true, true, 2, &cluster, now + 1)])
        .await
        .expect("save");
    let got = store.get(a).await.expect("get").expect("row");
    assert!(got.success && got.done);
    assert_eq!(got.attempts, 2);
    assert_eq!(got.result.as_deref(), Some("42"));
    // A late failure of a duplicate run never replaces the success.
    store
        .save(&[rec(a, false, true, 3, &cluster, now + 2)])
        .await
        .expect("save");
    let got = store.get(a).await.expect("get").expect("row");
    assert!(got.success, "success kept");
    assert_eq!(got.attempts, 2);

    store
        .save(&[rec(b, false, true, 3, &cluster, now + 3)])
        .await
        .expect("save");
    assert_eq!(
        store
            .done_count(&[a, b, TaskId::new()])
            .await
            .expect("done"),
        2
    );
    assert_eq!(store.succeeded(&[a, b]).await.expect("ok").len(), 1);
    assert_eq!(
        store
            .group(&format!("g_{cluster}"))
            .await
            .expect("group")
            .len(),
        2
    );
    let counts = store.counts(&cluster).await.expect("counts");
    assert_eq!((counts.success, counts.failure), (1, 1));

    // Pruning keeps the newest `keep` successes and spares young ones.
    let old: Vec<TaskId> = (0..5).map(|_| TaskId::new()).collect();
    let rows: Vec<TaskRecord> = old
        .iter()
        .enumerate()
        .map(|(i, id)| rec(*id, true, true, 1, &cluster, now - 1_000_000_000 + i as i64))
        .collect();
    store.save(&rows).await.expect("save many");
    let pruned = store.prune(&cluster, 2, now - 1_000).await.expect("prune");
    assert_eq!(pruned, 4, "6 successes, keep 2: the 4 oldest go");
    assert!(
        store.get(a).await.expect("get").is_some(),
        "the newest stays"
    );
    assert!(
        store.get(b).await.expect("get").is_some(),
        "failures are never pruned"
    );
    assert!(store.get(old[4]).await.expect("get").is_some());
    assert!(store.get(old[0]).await.expect("get").is_none());
    // Nothing younger than the spare line is pruned, whatever `keep` says.
    assert_eq!(
        store
            .prune(&cluster, 0, now - 2_000_000_000)
            .await
            .expect("prune"),
        0
    );
    store.ping().await.expect("ping");
    assert_eq!(store.clear(&cluster).await.expect("clear"), 3);

    // Cluster status (for brokers that cannot hold it): replaced in place, read by prefix,
    // gone once expired.
    let key = |n: &str| format!("{cluster}:{n}");
    store
        .set_status(
            &key("a"),
            r#"{"state":"starting"}"#,
            Duration::from_secs(60),
        )
        .await
        .expect("status");
    store2
        .set_status(&key("a"), r#"{"state":"working"}"#, Duration::from_secs(60))
        .await
        .expect("status again");
    store
        .set_status(&key("b"), "{}", Duration::from_millis(300))
        .await
        .expect("status b");
    store
        .set_status("other:a", "{}", Duration::from_secs(60))
        .await
        .expect("other prefix");
    let got = store.statuses(&cluster).await.expect("statuses");
    assert_eq!(
        got,
        vec![
            (key("a"), r#"{"state":"working"}"#.to_owned()),
            (key("b"), "{}".to_owned())
        ]
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let got = store.statuses(&cluster).await.expect("statuses");
    assert_eq!(got.len(), 1, "the expired status is not read: {got:?}");
    run_claims_and_iterator_pruning(&store, &cluster).await;
    schedule_slots(&store, &cluster).await;
}

#[tokio::test]
async fn sqlite() {
    let dir = tempfile::tempdir().expect("dir");
    let url = format!("sqlite://{}/s.sqlite3", dir.path().display());
    store_semantics(&url).await;
    // A store on a file of its own writes ahead (commits need no fsync each).
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&url).await.expect("pool");
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&pool)
        .await
        .expect("journal_mode");
    assert_eq!(mode, "wal");
}

#[cfg(feature = "orm-postgres")]
#[tokio::test]
async fn postgres() {
    let url = common::postgres_url();
    if common::reachable(&url).await {
        store_semantics(&url).await;
    }
}

#[cfg(feature = "orm-mysql")]
#[tokio::test]
async fn mariadb() {
    let url = std::env::var("QCLUSTER_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into());
    if common::reachable(&url).await {
        store_semantics(&url).await;
    }
}

/// Run claims (one copy of a follow-up at a time) and the pruning rule for iterator items.
async fn run_claims_and_iterator_pruning(store: &Store, cluster: &str) {
    let now = now_us();
    let marker = |id: TaskId, started: i64| TaskRecord {
        stopped_us: 0,
        started_us: started,
        result: None,
        ..rec(id, false, false, 0, cluster, started)
    };
    let id = TaskId::derived(TaskId::new(), "hook", 0);
    assert!(
        store
            .claim_run(&marker(id, now), now - 1_000_000)
            .await
            .expect("claim")
    );
    assert!(
        !store
            .claim_run(&marker(id, now + 1), now - 1_000_000)
            .await
            .expect("claim"),
        "a second copy while the first runs"
    );
    let running = store.get(id).await.expect("get").expect("marker row");
    assert!(!running.done && running.stopped_us == 0);
    // Only its owner releases a claim.
    store.release_run(id, now + 7).await.expect("release");
    assert!(
        !store
            .claim_run(&marker(id, now + 2), now - 1_000_000)
            .await
            .expect("claim")
    );
    store.release_run(id, now).await.expect("release");
    assert!(
        store
            .claim_run(&marker(id, now + 3), now - 1_000_000)
            .await
            .expect("claim"),
        "released: the next copy claims it"
    );
    // A claim older than the stale bound is taken over (its process died).
    assert!(
        store
            .claim_run(&marker(id, now + 4), now + 10)
            .await
            .expect("claim")
    );
    // Final: never claimed again.
    store
        .save(&[rec(id, true, true, 1, cluster, now + 5)])
        .await
        .expect("save");
    assert!(
        !store
            .claim_run(&marker(id, now + 6), i64::MAX)
            .await
            .expect("claim")
    );

    // Pruning spares the items of an iterator that is not complete, then lets them go.
    let iter = TaskId::new();
    let item = TaskId::derived(iter, "item", 0);
    let plain = TaskId::new();
    let mut item_row = rec(item, true, true, 1, cluster, now - 10_000_000);
    item_row.group = Some(iter.to_string());
    store
        .save(&[
            item_row,
            rec(plain, true, true, 1, cluster, now - 10_000_000),
        ])
        .await
        .expect("save");
    store.prune(cluster, 0, now).await.expect("prune");
    let known = store.known(&[item, plain]).await.expect("known");
    assert!(
        known.contains(&item) && !known.contains(&plain),
        "{known:?}"
    );
    assert_eq!(store.release_items(iter).await.expect("release items"), 1);
    store.prune(cluster, 0, now).await.expect("prune");
    assert!(store.known(&[item]).await.expect("known").is_empty());
}

/// A `minutes` schedule of `cluster` named `name`, every minute from `now`, due now.
fn every_minute(cluster: &str, name: &str, now: i64) -> cluster::store::ScheduleRow {
    cluster::store::ScheduleRow {
        id: TaskId::new().to_string(),
        cluster: cluster.to_owned(),
        name: name.into(),
        func: "echo".into(),
        args: "1".into(),
        options: "{}".into(),
        kind: "minutes".into(),
        minutes: Some(1),
        cron: None,
        tz: None,
        repeats: -1,
        anchor: now,
        next_run: Some(now),
        last_run: None,
        last_task: None,
        pending: None,
        pending_since: None,
        enabled: true,
        created: now,
        updated: now,
    }
}

/// Schedule rows: one per name, slots claimed by one caller only, pending slots recovered.
async fn schedule_slots(store: &Store, cluster: &str) {
    let now = now_us();
    let row = every_minute(cluster, "every", now);
    assert!(store.add_schedule(&row).await.expect("add"));
    assert!(
        !store.add_schedule(&row).await.expect("add again"),
        "a name once"
    );
    let due = store
        .due_schedules(cluster, now, 10, &[])
        .await
        .expect("due");
    assert_eq!(due.len(), 1);
    let next = now + 60_000_000;
    assert!(
        store
            .claim_slot(&row.id, now, Some(next), -1, now, "t1", now)
            .await
            .expect("claim")
    );
    assert!(
        !store
            .claim_slot(&row.id, now, Some(next), -1, now, "t2", now)
            .await
            .expect("claim"),
        "a slot is claimed once"
    );
    // Pending: not due again, and stuck once old enough.
    assert!(
        store
            .due_schedules(cluster, next, 10, &[])
            .await
            .expect("due")
            .is_empty()
    );
    assert_eq!(
        store
            .stuck_schedules(cluster, now + 1)
            .await
            .expect("stuck")
            .len(),
        1
    );
    assert!(
        store
            .stuck_schedules(cluster, now)
            .await
            .expect("stuck")
            .is_empty()
    );
    store.confirm_slot(&row.id, now).await.expect("confirm");
    assert!(
        !store
            .claim_slot(&row.id, now, Some(next), -1, now, "t3", now)
            .await
            .expect("claim"),
        "a slot whose next_run moved on is not claimed again"
    );
    assert!(
        store
            .stuck_schedules(cluster, now + 1)
            .await
            .expect("stuck")
            .is_empty()
    );
    assert_eq!(
        store
            .due_schedules(cluster, next, 10, &[])
            .await
            .expect("due")
            .len(),
        1
    );
    assert!(
        store
            .set_schedule_enabled(cluster, "every", false, now)
            .await
            .expect("pause")
    );
    assert!(
        store
            .due_schedules(cluster, next, 10, &[])
            .await
            .expect("due")
            .is_empty()
    );
    let got = store
        .schedule(cluster, "every")
        .await
        .expect("get")
        .expect("row");
    assert_eq!(
        (got.next_run, got.last_task.as_deref()),
        (Some(next), Some("t1"))
    );
    assert!(
        store
            .remove_schedule(cluster, "every")
            .await
            .expect("remove")
    );
    assert!(store.schedules(cluster).await.expect("list").is_empty());
    claims_race(store, cluster, now).await;
}

/// Six claimers race for each of 20 slots at once (as clusters whose guard cycles meet do):
/// exactly one wins each slot, and the winner's `next_run` is what the others see.
async fn claims_race(store: &Store, cluster: &str, now: i64) {
    let row = every_minute(cluster, "race", now);
    assert!(store.add_schedule(&row).await.expect("add"));
    let mut slot = now;
    for round in 0..20 {
        let next = slot + 60_000_000;
        let tries = (0..6).map(|k| {
            let store = store.clone();
            let id = row.id.clone();
            tokio::spawn(async move {
                store
                    .claim_slot(
                        &id,
                        slot,
                        Some(next),
                        -1,
                        slot,
                        &format!("t{round}-{k}"),
                        slot,
                    )
                    .await
                    .expect("claim")
            })
        });
        let won = futures::future::join_all(tries)
            .await
            .into_iter()
            .map(|r| r.expect("join"))
            .filter(|&w| w)
            .count();
        assert_eq!(won, 1, "round {round}: {won} claimers won one slot");
        let got = store
            .schedule(cluster, "race")
            .await
            .expect("get")
            .expect("row");
        assert_eq!((got.next_run, got.pending), (Some(next), Some(slot)));
        store.confirm_slot(&row.id, slot).await.expect("confirm");
        slot = next;
    }
    assert!(
        store
            .remove_schedule(cluster, "race")
            .await
            .expect("remove")
    );
}
