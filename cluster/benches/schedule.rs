//! The scheduler with 10,000 schedules in the store, 3 of them due every second.
//!
//! `cargo bench -p cluster --features orm-postgres --bench schedule [-- sqlite postgres]`
//!
//! For each store: 9,997 daily schedules whose next slot is a day away and 3 every-second cron
//! schedules are added. Then:
//! - **cycle**: the three queries a cycle makes when nothing is due (slots left pending by a
//!   dead cluster, due schedules, the earliest next slot), timed 200 times; beside it, in the same run, a bare
//!   `SELECT 1` round trip on the same pool (the baseline), and the ratio. A due slot adds three
//!   statements (claim, enqueue, confirm).
//! - **delay**: 1 cluster, then 3 clusters (memory broker, default `guard_cycle` 0.5 s) run for
//!   8 s; each task's delay is its start minus its slot (the whole second it was made for).
//!   Goal: p99 under `guard_cycle` + 50 ms.
//!
//! Env: `QCLUSTER_TEST_POSTGRES_URL`.

use std::time::{Duration, Instant};

use broker_core::{TaskId, now_us};
use cluster::config::{Secret, Url};
use cluster::store::ScheduleRow;
use cluster::{Cluster, Config, Registry, Store};

const SCHEDULES: usize = 10_000;
const EVERY_SECOND: usize = 3;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if wanted.is_empty() {
        wanted = vec!["sqlite".into(), "postgres".into()];
    }
    let dir = tempfile::tempdir().expect("temp dir");
    println!(
        "scheduler bench: {SCHEDULES} schedules, {EVERY_SECOND} due every second, guard_cycle 0.5 s"
    );
    for store in wanted {
        let url = match store.as_str() {
            "sqlite" => format!("sqlite://{}/sched.sqlite3", dir.path().display()),
            "postgres" => std::env::var("QCLUSTER_TEST_POSTGRES_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into()),
            other => {
                eprintln!("unknown store {other}");
                continue;
            }
        };
        if let Err(e) = run(&store, &url).await {
            println!("{store:<9} skipped: {e}");
        }
    }
}

fn row(cluster: &str, name: String, kind: &str, cron: Option<&str>, next: i64) -> ScheduleRow {
    let now = now_us();
    ScheduleRow {
        id: TaskId::new().to_string(),
        cluster: cluster.to_owned(),
        name,
        func: "noop".into(),
        args: "null".into(),
        options: "{}".into(),
        kind: kind.into(),
        minutes: None,
        cron: cron.map(str::to_owned),
        tz: None,
        repeats: -1,
        anchor: next,
        next_run: Some(next),
        last_run: None,
        last_task: None,
        pending: None,
        pending_since: None,
        enabled: true,
        created: now,
        updated: now,
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn run(label: &str, url: &str) -> Result<(), String> {
    let e = |e: cluster::Error| e.to_string();
    let store = Store::connect(url, Duration::from_secs(5))
        .await
        .map_err(e)?;
    let tag = &uuid::Uuid::now_v7().simple().to_string()[16..];
    let name = format!("schedbench_{tag}");
    let day = 86_400_000_000;
    let now = now_us();
    let t = Instant::now();
    for i in 0..SCHEDULES - EVERY_SECOND {
        store
            .add_schedule(&row(&name, format!("daily-{i}"), "daily", None, now + day))
            .await
            .map_err(e)?;
    }
    let next_second = (now / 1_000_000 + 2) * 1_000_000;
    for i in 0..EVERY_SECOND {
        store
            .add_schedule(&row(
                &name,
                format!("tick-{i}"),
                "cron",
                Some("* * * * * *"),
                next_second,
            ))
            .await
            .map_err(e)?;
    }
    let added = t.elapsed();

    // The idle cycle: its two queries, beside a bare round trip.
    let mut cycle = Vec::new();
    let mut bare = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        store
            .stuck_schedules(&name, now_us() - 5_000_000)
            .await
            .map_err(e)?;
        store.due_schedules(&name, now, 200, &[]).await.map_err(e)?;
        store.next_slot_after(&name, now).await.map_err(e)?;
        cycle.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        store.ping().await.map_err(e)?;
        bare.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    cycle.sort_by(f64::total_cmp);
    bare.sort_by(f64::total_cmp);
    println!(
        "{label:<9} {SCHEDULES} schedules added in {:.1} s; idle cycle (3 queries) p50 {:.2} ms \
         p99 {:.2} ms; bare SELECT 1 p50 {:.2} ms ({:.1}× a round trip)",
        added.as_secs_f64(),
        pct(&cycle, 0.5),
        pct(&cycle, 0.99),
        pct(&bare, 0.5),
        pct(&cycle, 0.5) / pct(&bare, 0.5)
    );

    for clusters in [1usize, 3] {
        let mut cfg = Config {
            name: name.clone(),
            broker: "memory".into(),
            workers: 2,
            secret: Some(Secret::new("bench-secret-0123456789abcdef01234")),
            ..Config::default()
        };
        cfg.store.url = Some(Url(url.to_owned()));
        let mut stops = Vec::new();
        let mut runs = Vec::new();
        let started = now_us();
        for _ in 0..clusters {
            let broker = cluster::Brokers::builtin().connect(&cfg).await.map_err(e)?;
            let codec = cluster::client::codec_from(&cfg).map_err(e)?;
            let c = Cluster::new(
                cfg.clone(),
                broker,
                store.clone(),
                codec,
                Registry::with_builtins(),
            );
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            stops.push(tx);
            runs.push(tokio::spawn(c.run(async {
                let _ = rx.await;
            })));
        }
        tokio::time::sleep(Duration::from_secs(8)).await;
        for s in stops {
            let _ = s.send(());
        }
        for r in runs {
            let _ = r.await;
        }
        // Tasks made for the every-second schedules during this run.
        let mut delays = Vec::new();
        let mut ids = Vec::new();
        for i in 0..EVERY_SECOND {
            if let Some(s) = store
                .schedule(&name, &format!("tick-{i}"))
                .await
                .map_err(e)?
            {
                let id: TaskId = s.id.parse().map_err(|e| format!("{e}"))?;
                let mut slot = (started / 1_000_000 + 1) * 1_000_000;
                while slot <= s.last_run.unwrap_or(0) {
                    ids.push((cluster::scheduler::slot_task_id(id, slot), slot));
                    slot += 1_000_000;
                }
            }
        }
        let only: Vec<TaskId> = ids.iter().map(|(i, _)| *i).collect();
        let rows = store.get_many(&only).await.map_err(e)?;
        let slot_of: std::collections::HashMap<TaskId, i64> = ids.into_iter().collect();
        for r in &rows {
            if let Some(slot) = slot_of.get(&r.id) {
                delays.push((r.started_us - slot) as f64 / 1000.0);
            }
        }
        delays.sort_by(f64::total_cmp);
        println!(
            "{label:<9} {clusters} cluster{}: {} slots ran, slot→start p50 {:.1} ms, p99 {:.1} ms \
             (goal: p99 < 550 ms)",
            if clusters == 1 { " " } else { "s" },
            delays.len(),
            pct(&delays, 0.5),
            pct(&delays, 0.99)
        );
    }
    for s in store
        .schedules(&name)
        .await
        .map_err(e)?
        .into_iter()
        .flatten()
    {
        let _ = store.remove_schedule(&name, &s.name).await;
    }
    let _ = store.clear(&name).await;
    Ok(())
}
