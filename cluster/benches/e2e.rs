//! The whole cluster, end to end, beside the raw claim-and-delete SQL loop in the same run.
//!
//! `cargo bench -p cluster --features orm-postgres --bench e2e [-- memory sqlite postgres redis]`
//! (`redis` needs `--features redis`; its results go to a SQLite file, as do `memory`'s)
//!
//! `memory` is the whole cluster with no broker I/O: its tasks/s and CPU per task are the
//! cluster's own ceiling (codec, registry, workers, monitor, result store), beside which the
//! other backends show what their broker costs.
//!
//! For each backend: N `noop` tasks are enqueued (timed on its own), then a cluster with
//! 2 workers and otherwise default settings (bulk 10, results saved, `save_limit` 250) runs
//! them from the backlog: verify, execute, save the result, acknowledge. Timed from start to
//! the last settled task. Then, on the idle cluster, 300 tasks are enqueued one at a time and
//! the enqueue→start latency is read from their saved results. The baseline is
//! `broker_orm::rawloop::claim_delete` with the same bulk and 2 connections: no codec, no
//! tasks, no results. `cpu µs` is this process's CPU time (user + system) per task over the
//! run phase (for SQLite that includes the database, which runs in-process). Finally the idle
//! RSS of a `qcluster run` process.
//!
//! `modes` (in the default list) runs the same cluster on the `memory` broker in
//! `worker_mode = "async"` and `"process"`, on `noop` and on a task that blocks for 1 ms, and
//! prints tasks/s for both and the cost of the process hop per task (per worker: the difference
//! of `workers / rate` between the two modes).
//! `metrics` (in the default list) runs the memory-broker cluster with `[http]` metrics off and
//! on, three times each, alternating, and prints the best rate of each and their ratio: what
//! collecting `/metrics` costs on the cluster's own ceiling, where it weighs most.
//! Env: `BENCH_N` (default 20000), `QCLUSTER_TEST_POSTGRES_URL`.

mod harness;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use broker_core::{Codec, TaskPackage};
use cluster::config::{Secret, Url};
use cluster::{Client, Cluster, Config, NewTask, Registry, Store, TaskContext, WorkerMode};

const WORKERS: usize = 2;
const BENCH_SECRET: &str = "bench-secret-0123456789abcdef0123456789";
const LATENCY_SAMPLES: usize = 300;

/// The bench's tasks: the built-ins and `block1ms` (a blocking task of 1 ms).
fn registry() -> Registry {
    let mut r = Registry::with_builtins();
    r.register_blocking("block1ms", |_: serde_json::Value, _: TaskContext| {
        std::thread::sleep(Duration::from_millis(1));
        Ok::<_, String>(())
    });
    r
}

fn main() {
    // `worker_mode = "process"` runs this very binary as its worker processes.
    if let Some(code) = cluster::process::serve_if_worker(&registry()) {
        std::process::exit(if code == std::process::ExitCode::SUCCESS {
            0
        } else {
            1
        });
    }
    harness::block_on(bench());
}

async fn bench() {
    let n = harness::count("BENCH_N", 20_000);
    let mut wanted = harness::backends(&["memory", "sqlite", "postgres", "modes", "metrics"]);
    let modes = wanted.iter().any(|w| w == "modes");
    let metrics = wanted.iter().any(|w| w == "metrics");
    wanted.retain(|w| w != "modes" && w != "metrics");
    let dir = tempfile::tempdir().expect("temp dir");
    println!("qcluster end-to-end bench: N = {n} noop tasks, {WORKERS} workers, default settings");
    println!(
        "{:<10} {:>11} {:>10} {:>8} {:>10} {:>7} {:>9} {:>9}",
        "backend", "enqueue/s", "tasks/s", "cpu µs", "raw/s", "ratio", "p50 ms", "p99 ms"
    );
    for backend in wanted {
        let url = match backend.as_str() {
            "redis" => std::env::var("QCLUSTER_TEST_REDIS_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into()),
            "sqlite" => format!("sqlite://{}/bench.sqlite3", dir.path().display()),
            "memory" => "memory".to_owned(),
            "postgres" => std::env::var("QCLUSTER_TEST_POSTGRES_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into()),
            other => {
                eprintln!("unknown backend {other}");
                continue;
            }
        };
        let store = format!(
            "sqlite://{}/results-{backend}.sqlite3",
            dir.path().display()
        );
        match run(&url, &store, n).await {
            Ok(r) if r.raw.is_nan() => println!(
                "{backend:<10} {:>11.0} {:>10.0} {:>8.1} {:>10} {:>7} {:>9.2} {:>9.2}",
                r.enqueue, r.tasks, r.cpu_us, "-", "-", r.p50_ms, r.p99_ms
            ),
            Ok(r) => println!(
                "{backend:<10} {:>11.0} {:>10.0} {:>8.1} {:>10.0} {:>6.0}% {:>9.2} {:>9.2}",
                r.enqueue,
                r.tasks,
                r.cpu_us,
                r.raw,
                100.0 * r.tasks / r.raw,
                r.p50_ms,
                r.p99_ms
            ),
            Err(e) => println!("{backend:<10} skipped: {e}"),
        }
    }
    if modes {
        worker_modes(dir.path(), n).await;
    }
    if metrics {
        metrics_cost(dir.path(), n).await;
    }
    match idle_rss(dir.path()) {
        Ok(kib) => println!(
            "idle `qcluster run` (SQLite, 2 workers): RSS {:.1} MB",
            kib as f64 / 1024.0
        ),
        Err(e) => println!("idle RSS: skipped: {e}"),
    }
}

struct Figures {
    enqueue: f64,
    tasks: f64,
    cpu_us: f64,
    raw: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn config(url: &str, name: &str) -> Config {
    let mut c = Config {
        name: name.to_owned(),
        workers: WORKERS,
        secret: Some(Secret::new(BENCH_SECRET)),
        ..Config::default()
    };
    c.set("orm.url", url.to_owned()).expect("orm.url");
    c
}

async fn run(url: &str, store_url: &str, n: usize) -> Result<Figures, String> {
    let tag = &uuid::Uuid::now_v7().simple().to_string()[16..];
    let name = format!("bench_{tag}");
    let mut cfg = config(url, &name);
    let on_redis = url.starts_with("redis");
    let in_memory = url == "memory";
    if in_memory {
        cfg = Config {
            broker: "memory".into(),
            ..cfg
        };
        cfg.store.url = Some(Url(store_url.to_owned()));
    }
    if on_redis {
        cfg.broker = "redis".into();
        cfg.set("redis.url", url.to_owned()).expect("redis.url");
        cfg.store.url = Some(Url(store_url.to_owned()));
    }
    let e = |e: cluster::Error| e.to_string();
    let client = Client::connect(&cfg).await.map_err(e)?;
    let store = Store::connect(&cfg.store_url(), Duration::from_secs(5))
        .await
        .map_err(e)?;

    let t0 = Instant::now();
    let tasks: Vec<NewTask> = (0..n).map(|_| NewTask::new("noop", "null")).collect();
    for chunk in tasks.chunks(1000) {
        client.enqueue_many(chunk.to_vec()).await.map_err(e)?;
    }
    let enqueue = n as f64 / t0.elapsed().as_secs_f64();

    let running = harness::start(&cfg, &store).await?;
    let counters = running.counters.clone();
    let t0 = Instant::now();
    let cpu0 = cpu_secs();
    while counters.processed.load(Ordering::Relaxed) < n as u64 {
        if running.is_finished() {
            return Err("cluster stopped early".into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let tasks_per_s = n as f64 / t0.elapsed().as_secs_f64();
    let cpu_us = (cpu_secs() - cpu0) * 1e6 / n as f64;

    // Latency on the idle cluster: one task at a time.
    let group = format!("lat_{tag}");
    let mut ids = Vec::new();
    for _ in 0..LATENCY_SAMPLES {
        let mut t = NewTask::new("noop", "null");
        t.options.options.group = Some(group.clone());
        ids.push(client.enqueue_many(vec![t]).await.map_err(e)?[0]);
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.done_count(&ids).await.map_err(e)? < ids.len() as u64 {
        if Instant::now() > deadline {
            return Err("latency tasks did not finish".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut lat: Vec<f64> = store
        .group(&group)
        .await
        .map_err(e)?
        .iter()
        .map(|r| (r.started_us - r.enqueued_us) as f64 / 1000.0)
        .collect();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];
    let (p50_ms, p99_ms) = (pct(0.50), pct(0.99));
    running.stop().await?;
    let _ = client.broker().delete_queue().await;
    let _ = store.clear(&name).await;

    if on_redis || in_memory {
        // The raw limit for Redis is the broker bench's (pipelined LPUSH/RPOP); memory has
        // no broker to compare with: it is the baseline of the others.
        return Ok(Figures {
            enqueue,
            tasks: tasks_per_s,
            cpu_us,
            raw: f64::NAN,
            p50_ms,
            p99_ms,
        });
    }
    let payload = Codec::new(BENCH_SECRET.as_bytes(), &name)
        .and_then(|c| c.encode(&TaskPackage::new("noop", b"null".to_vec())))
        .map_err(|e| e.to_string())?;
    let raw = broker_orm::rawloop::claim_delete(
        url,
        &format!("raw_{tag}"),
        &payload,
        n,
        cfg.bulk,
        WORKERS,
    )
    .await
    .map_err(|e| format!("raw loop: {e}"))?;
    Ok(Figures {
        enqueue,
        tasks: tasks_per_s,
        cpu_us,
        raw,
        p50_ms,
        p99_ms,
    })
}

/// `async` beside `process` on the memory broker, for `noop` and `block1ms`.
async fn worker_modes(dir: &std::path::Path, n: usize) {
    println!();
    println!("worker modes (memory broker, {WORKERS} workers, results saved to SQLite)");
    println!(
        "{:<10} {:>8} {:>12} {:>12} {:>8} {:>14}",
        "task", "N", "async/s", "process/s", "ratio", "hop µs/task"
    );
    for (func, count) in [("noop", n), ("block1ms", (n / 10).max(200))] {
        let mut rates = [0.0f64; 2];
        for (i, mode) in [WorkerMode::Async, WorkerMode::Process]
            .into_iter()
            .enumerate()
        {
            match run_mode(dir, mode, func, count, false).await {
                Ok(r) => rates[i] = r,
                Err(e) => {
                    println!("{func:<10} {mode} skipped: {e}");
                    rates[i] = f64::NAN;
                }
            }
        }
        let [a, p] = rates;
        let hop_us = (WORKERS as f64 / p - WORKERS as f64 / a) * 1e6;
        println!(
            "{func:<10} {count:>8} {a:>12.0} {p:>12.0} {:>7.0}% {hop_us:>14.1}",
            100.0 * p / a
        );
    }
}

/// The cost of `[http]` metrics: the memory-broker cluster with them off and on.
async fn metrics_cost(dir: &std::path::Path, n: usize) {
    println!();
    println!(
        "metrics (memory broker, {WORKERS} workers, noop, N = {n}; best of 3 each, alternating)"
    );
    let mut best = [0.0f64; 2];
    for _ in 0..3 {
        for (i, on) in [false, true].into_iter().enumerate() {
            match run_mode(dir, WorkerMode::Async, "noop", n, on).await {
                Ok(r) => best[i] = best[i].max(r),
                Err(e) => {
                    println!("metrics {}: skipped: {e}", if on { "on" } else { "off" });
                    return;
                }
            }
        }
    }
    let [off, on] = best;
    println!(
        "{:>12} {:>12} {:>8} {:>10}",
        "off tasks/s", "on tasks/s", "ratio", "cost"
    );
    println!(
        "{off:>12.0} {on:>12.0} {:>7.1}% {:>9.1}%",
        100.0 * on / off,
        100.0 * (1.0 - on / off)
    );
}

/// Tasks/s of `count` `func` tasks from a backlog on the memory broker in `mode` (with `[http]`
/// metrics collected when `metrics`).
async fn run_mode(
    dir: &std::path::Path,
    mode: WorkerMode,
    func: &str,
    count: usize,
    metrics: bool,
) -> Result<f64, String> {
    let tag = &uuid::Uuid::now_v7().simple().to_string()[16..];
    let name = format!("modes_{tag}");
    let mut cfg = config("memory", &name);
    cfg.broker = "memory".into();
    cfg.worker_mode = mode;
    if metrics {
        cfg.http.listen = Some("127.0.0.1:0".into());
        cfg.http.metrics = true;
        cfg.http.dashboard = false;
    }
    cfg.store.url = Some(Url(format!(
        "sqlite://{}/modes-{tag}.sqlite3",
        dir.display()
    )));
    let e = |e: cluster::Error| e.to_string();
    let client = Client::connect(&cfg).await.map_err(e)?;
    let tasks: Vec<NewTask> = (0..count).map(|_| NewTask::new(func, "null")).collect();
    for chunk in tasks.chunks(1000) {
        client.enqueue_many(chunk.to_vec()).await.map_err(e)?;
    }
    let store = Store::connect(&cfg.store_url(), Duration::from_secs(5))
        .await
        .map_err(e)?;
    let broker = cluster::Brokers::builtin().connect(&cfg).await.map_err(e)?;
    let codec = cluster::client::codec_from(&cfg).map_err(e)?;
    let cluster = Cluster::new(cfg.clone(), broker, store, codec, registry());
    let counters = cluster.counters();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(cluster.run(async {
        let _ = stop_rx.await;
    }));
    // The clock starts at the first settled task: process mode starts its children first.
    while counters.processed.load(Ordering::Relaxed) == 0 {
        if running.is_finished() {
            return Err("cluster stopped early".into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (t0, done0) = (Instant::now(), counters.processed.load(Ordering::Relaxed));
    while counters.processed.load(Ordering::Relaxed) < count as u64 {
        if running.is_finished() {
            return Err("cluster stopped early".into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let rate = (count as u64 - done0) as f64 / t0.elapsed().as_secs_f64();
    let failed = counters.failed.load(Ordering::Relaxed);
    let _ = stop_tx.send(());
    running.await.map_err(|e| e.to_string())?.map_err(e)?;
    if failed > 0 {
        return Err(format!("{failed} tasks failed"));
    }
    Ok(rate)
}

/// Starts `qcluster run` on an empty SQLite queue and reads its resident memory after 3 s.
fn idle_rss(dir: &std::path::Path) -> Result<u64, String> {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_qcluster"))
        .arg("run")
        .current_dir(dir)
        .env("QCLUSTER_SECRET", BENCH_SECRET)
        .env("QCLUSTER_WORKERS", WORKERS.to_string())
        .env("QCLUSTER_NAME", "idle")
        .env(
            "QCLUSTER_ORM__URL",
            format!("sqlite://{}/idle.sqlite3", dir.display()),
        )
        .env("QCLUSTER_LOG", "error")
        .spawn()
        .map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_secs(3));
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id()));
    let _ = child.kill();
    let _ = child.wait();
    let status = status.map_err(|e| e.to_string())?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| "no VmRSS".to_owned())
}

/// CPU time of this process so far (user + system), in seconds.
fn cpu_secs() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return f64::NAN;
    }
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}
