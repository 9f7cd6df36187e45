//! A large backlog drained by one cluster, beside a small one in the same run.
//!
//! `cargo bench -p cluster --features orm-postgres,redis --bench backlog
//! [-- postgres postgres-noautovacuum sqlite redis]`
//!
//! For each backend, N `noop` tasks (`BENCH_N`, default 1,000,000) are enqueued at once
//! (`enqueue_many`, 5,000 a call, timed on its own), then one cluster of 2 workers with default
//! settings (bulk 10, results saved) drains them. The drain prints its rate for every 10 s
//! window and, at the end, its mean rate beside the mean rate of a 20,000-task backlog drained
//! the same way just before (the baseline of the same run) and their ratio. On PostgreSQL it
//! also prints the queue table's dead tuples, its size on disk and whether autovacuum ran.
//!
//! Each PostgreSQL backend runs in a database of its own, `qcluster_bench_backlog`, created
//! for the run and dropped after it, so the table's statistics are the run's own.
//! `postgres` leaves autovacuum as the server has it; `postgres-noautovacuum` turns it off for
//! the queue table (`ALTER TABLE qcluster_queue SET (autovacuum_enabled = off)`), as a server
//! with autovacuum off, or a long transaction holding the xmin horizon, does in effect.
//! `postgres-autovacuum-on` (not in the default list) turns the *server's* autovacuum on for the
//! run with `ALTER SYSTEM` and resets it after, for a server that runs with it off (as this
//! machine's does): the figure with autovacuum working beside the one without.
//! Env: `BENCH_N`, `BENCH_CHECKPOINT` (set: a `CHECKPOINT` after the large enqueue, before
//! the drain starts, to tell the bulk load's write-back apart from the drain's own cost), `QCLUSTER_TEST_POSTGRES_URL` (a database to connect to for creating the
//! bench's own), `QCLUSTER_TEST_REDIS_URL`.

mod harness;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cluster::config::{Secret, Url};
use cluster::{Client, Config, NewTask, Store};

const WORKERS: usize = 2;
const BENCH_SECRET: &str = "bench-secret-0123456789abcdef0123456789";
const SMALL: usize = 20_000;
const WINDOW: Duration = Duration::from_secs(10);
const ENQUEUE_CHUNK: usize = 5_000;
#[cfg(feature = "orm-postgres")]
const BENCH_DB: &str = "qcluster_bench_backlog";

fn main() {
    harness::block_on(bench());
}

async fn bench() {
    let n = harness::count("BENCH_N", 1_000_000);
    let wanted = harness::backends(&["postgres", "postgres-noautovacuum", "sqlite", "redis"]);
    let dir = tempfile::tempdir().expect("temp dir");
    println!(
        "qcluster backlog bench: {n} noop tasks enqueued at once, one cluster of {WORKERS} workers, \
         default settings; baseline: a {SMALL}-task backlog drained the same way in the same run"
    );
    let mut summary = Vec::new();
    for backend in wanted {
        println!();
        println!("== {backend}");
        match one(&backend, dir.path(), n).await {
            Ok(line) => summary.push(line),
            Err(e) => {
                println!("{backend}: skipped: {e}");
                summary.push(format!("{backend:<22} skipped: {e}"));
            }
        }
    }
    println!();
    println!(
        "{:<22} {:>11} {:>12} {:>12} {:>7} {:>12} {:>12}",
        "backend", "enqueue/s", "20k tasks/s", "big tasks/s", "ratio", "worst 10 s", "dead tuples"
    );
    for line in summary {
        println!("{line}");
    }
}

/// Runs the small and the large backlog on one backend and returns its summary line.
async fn one(backend: &str, dir: &std::path::Path, n: usize) -> Result<String, String> {
    let (url, store) = match backend {
        "sqlite" => {
            let url = format!("sqlite://{}/backlog.sqlite3", dir.display());
            (url.clone(), url)
        }
        "redis" => (
            std::env::var("QCLUSTER_TEST_REDIS_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into()),
            format!("sqlite://{}/backlog-redis-results.sqlite3", dir.display()),
        ),
        #[cfg(feature = "orm-postgres")]
        "postgres" | "postgres-noautovacuum" | "postgres-autovacuum-on" => {
            let url = pg::fresh_db().await?;
            (url.clone(), url)
        }
        other => return Err(format!("unknown or not compiled-in backend {other}")),
    };
    #[cfg(feature = "orm-postgres")]
    let _server_autovacuum = if backend == "postgres-autovacuum-on" {
        Some(pg::ServerAutovacuumOn::set().await?)
    } else {
        None
    };
    #[cfg(feature = "orm-postgres")]
    let pg_state = if backend.starts_with("postgres") {
        Some(pg::prepare(&url, backend == "postgres-noautovacuum").await?)
    } else {
        None
    };
    let small = drain(backend, &url, &store, SMALL, false).await?;
    println!(
        "{SMALL}-task backlog: enqueue {:.0}/s, drained at {:.0} tasks/s",
        small.enqueue, small.rate
    );
    let big = drain(backend, &url, &store, n, true).await?;
    let ratio = big.rate / small.rate;
    println!(
        "{n}-task backlog: enqueue {:.0}/s, drained at {:.0} tasks/s = {:.0}% of the {SMALL}-task \
         rate; slowest 10 s window {:.0} tasks/s ({:.0}%)",
        big.enqueue,
        big.rate,
        100.0 * ratio,
        big.worst,
        100.0 * big.worst / small.rate
    );
    #[allow(unused_mut)]
    let mut dead = "-".to_owned();
    #[cfg(feature = "orm-postgres")]
    if let Some(state) = pg_state {
        let (facts, dead_tuples) = pg::facts(&url, &state).await?;
        println!("{facts}");
        dead = dead_tuples.to_string();
        pg::drop_db().await?;
    }
    if backend == "sqlite" {
        let _ = std::fs::remove_file(dir.join("backlog.sqlite3"));
    }
    Ok(format!(
        "{backend:<22} {:>11.0} {:>12.0} {:>12.0} {:>6.0}% {:>12.0} {:>12}",
        big.enqueue,
        small.rate,
        big.rate,
        100.0 * ratio,
        big.worst,
        dead
    ))
}

struct Drained {
    enqueue: f64,
    rate: f64,
    worst: f64,
}

fn config(backend: &str, url: &str, store: &str, name: &str) -> Result<Config, String> {
    let mut c = Config {
        name: name.to_owned(),
        workers: WORKERS,
        secret: Some(Secret::new(BENCH_SECRET)),
        ..Config::default()
    };
    if backend == "redis" {
        c.broker = "redis".into();
        c.set("redis.url", url.to_owned())
            .map_err(|e| e.to_string())?;
        c.store.url = Some(Url(store.to_owned()));
    } else {
        c.set("orm.url", url.to_owned())
            .map_err(|e| e.to_string())?;
    }
    Ok(c)
}

/// Enqueues `n` noop tasks, then drains them with one cluster; with `windows`, prints the rate
/// of every 10 s window.
async fn drain(
    backend: &str,
    url: &str,
    store_url: &str,
    n: usize,
    windows: bool,
) -> Result<Drained, String> {
    let tag = &uuid::Uuid::now_v7().simple().to_string()[16..];
    let name = format!("backlog_{tag}");
    let cfg = config(backend, url, store_url, &name)?;
    let e = |e: cluster::Error| e.to_string();
    let client = Client::connect(&cfg).await.map_err(e)?;
    let store = Store::connect(&cfg.store_url(), Duration::from_secs(5))
        .await
        .map_err(e)?;

    let t0 = Instant::now();
    let mut sent = 0;
    while sent < n {
        let k = ENQUEUE_CHUNK.min(n - sent);
        let tasks: Vec<NewTask> = (0..k).map(|_| NewTask::new("noop", "null")).collect();
        client.enqueue_many(tasks).await.map_err(e)?;
        sent += k;
    }
    let enqueue = n as f64 / t0.elapsed().as_secs_f64();
    if windows {
        println!(
            "enqueued {n} in {:.1} s ({enqueue:.0}/s)",
            t0.elapsed().as_secs_f64()
        );
    }

    #[cfg(feature = "orm-postgres")]
    if windows && backend.starts_with("postgres") && std::env::var("BENCH_CHECKPOINT").is_ok() {
        let t = Instant::now();
        pg::checkpoint(url).await?;
        println!(
            "CHECKPOINT after the enqueue took {:.1} s (not timed)",
            t.elapsed().as_secs_f64()
        );
    }
    let running = harness::start(&cfg, &store).await?;
    let counters = running.counters.clone();
    let t0 = Instant::now();
    let mut worst = f64::INFINITY;
    let (mut mark, mut at) = (0u64, t0);
    let mut cpu_mark = cpu::sample();
    #[cfg(feature = "orm-postgres")]
    let mut wal_mark = if windows && backend.starts_with("postgres") {
        pg::wal(url).await.ok()
    } else {
        None
    };
    loop {
        let done = counters.processed.load(Ordering::Relaxed);
        if done >= n as u64 {
            break;
        }
        if running.is_finished() {
            return Err("cluster stopped early".into());
        }
        if at.elapsed() >= WINDOW {
            let rate = (done - mark) as f64 / at.elapsed().as_secs_f64();
            worst = worst.min(rate);
            if windows {
                let now = cpu::sample();
                let (ours, rest) = cpu::split(cpu_mark, now, done - mark);
                cpu_mark = now;
                #[allow(unused_mut)]
                let mut extra = String::new();
                #[cfg(feature = "orm-postgres")]
                if let Some(before) = wal_mark
                    && let Ok(after) = pg::wal(url).await
                {
                    let n = (done - mark).max(1) as f64;
                    extra = format!(
                        "  WAL {:>5.0} B/task, {:.3} full-page images/task",
                        (after.1 - before.1) as f64 / n,
                        (after.0 - before.0) as f64 / n
                    );
                    wal_mark = Some(after);
                }
                println!(
                    "  {:>5.0} s  {:>8} done  {:>8.0} tasks/s  cpu µs/task: bench {:>5.1}, rest of the machine {:>5.1}{extra}",
                    t0.elapsed().as_secs_f64(),
                    done,
                    rate,
                    ours,
                    rest
                );
            }
            (mark, at) = (done, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    running.stop().await?;
    let _ = client.broker().delete_queue().await;
    let _ = store.clear(&name).await;
    Ok(Drained {
        enqueue,
        rate,
        worst: if worst.is_finite() { worst } else { rate },
    })
}

/// CPU time of this process and of the whole machine, to tell the cluster's cost per task from
/// the database's (which runs beside it: PostgreSQL's backends, Redis).
mod cpu {
    /// (this process's CPU seconds, the machine's busy CPU seconds)
    #[derive(Clone, Copy)]
    pub struct Sample(f64, f64);

    pub fn sample() -> Sample {
        // SAFETY: getrusage only writes the struct it is given.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        let ours = if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } == 0 {
            let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
            t(u.ru_utime) + t(u.ru_stime)
        } else {
            f64::NAN
        };
        // /proc/stat's first line: user nice system idle iowait irq softirq steal, in ticks.
        let busy = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                let f: Vec<f64> = s
                    .lines()
                    .next()?
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|v| v.parse().ok())
                    .collect();
                let busy = f.iter().sum::<f64>() - f.get(3)? - f.get(4)?;
                // SAFETY: sysconf has no preconditions.
                let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
                Some(busy / hz)
            })
            .unwrap_or(f64::NAN);
        Sample(ours, busy)
    }

    /// µs of CPU per task between two samples: (this process, the rest of the machine).
    pub fn split(a: Sample, b: Sample, tasks: u64) -> (f64, f64) {
        let n = tasks.max(1) as f64;
        let ours = b.0 - a.0;
        let all = b.1 - a.1;
        (ours * 1e6 / n, (all - ours).max(0.0) * 1e6 / n)
    }
}

#[cfg(feature = "orm-postgres")]
mod pg {
    use sqlx::{Connection, Executor, PgConnection};

    use super::BENCH_DB;

    /// What the table's autovacuum counters said before the run.
    pub struct State {
        autovacuum: String,
    }

    /// `postgres-autovacuum-on`: the server's `autovacuum` turned on for the run with
    /// `ALTER SYSTEM` (a superuser's setting, written to `postgresql.auto.conf`) and reset when
    /// dropped, for servers that run with it off, as this machine's does.
    pub struct ServerAutovacuumOn;

    impl ServerAutovacuumOn {
        pub async fn set() -> Result<Self, String> {
            let mut c = conn(&admin_url()).await?;
            c.execute("ALTER SYSTEM SET autovacuum = on")
                .await
                .map_err(|e| format!("ALTER SYSTEM (needs a superuser): {e}"))?;
            c.execute("SELECT pg_reload_conf()")
                .await
                .map_err(|e| e.to_string())?;
            // The postmaster reloads asynchronously.
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            println!("server autovacuum turned on for this run (ALTER SYSTEM; reset after it)");
            Ok(Self)
        }
    }

    impl Drop for ServerAutovacuumOn {
        fn drop(&mut self) {
            let reset = async {
                let mut c = conn(&admin_url()).await?;
                c.execute("ALTER SYSTEM RESET autovacuum")
                    .await
                    .map_err(|e| e.to_string())?;
                c.execute("SELECT pg_reload_conf()")
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(())
            };
            let done =
                tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(reset));
            match done {
                Ok(()) => println!("server autovacuum reset (ALTER SYSTEM RESET autovacuum)"),
                Err(e) => println!(
                    "WARNING: could not reset the server's autovacuum ({e}); \
                     run ALTER SYSTEM RESET autovacuum; SELECT pg_reload_conf();"
                ),
            }
        }
    }

    fn admin_url() -> String {
        std::env::var("QCLUSTER_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
    }

    fn bench_url() -> String {
        let admin = admin_url();
        let (base, _) = admin.rsplit_once('/').unwrap_or((&admin, ""));
        format!("{base}/{BENCH_DB}")
    }

    async fn conn(url: &str) -> Result<PgConnection, String> {
        PgConnection::connect(url)
            .await
            .map_err(|e| format!("PostgreSQL: {e}"))
    }

    /// Creates the bench's database afresh and returns its URL.
    pub async fn fresh_db() -> Result<String, String> {
        drop_db().await?;
        let mut c = conn(&admin_url()).await?;
        c.execute("CREATE DATABASE qcluster_bench_backlog")
            .await
            .map_err(|e| e.to_string())?;
        Ok(bench_url())
    }

    pub async fn drop_db() -> Result<(), String> {
        let mut c = conn(&admin_url()).await?;
        c.execute("DROP DATABASE IF EXISTS qcluster_bench_backlog WITH (FORCE)")
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Creates the schema (a broker connection migrates it) and sets autovacuum for the run.
    pub async fn prepare(url: &str, autovacuum_off: bool) -> Result<State, String> {
        let mut cfg = super::config("postgres", url, url, "backlog_schema")?;
        cfg.workers = 1;
        cluster::Client::connect(&cfg)
            .await
            .map_err(|e| e.to_string())?;
        let mut c = conn(url).await?;
        if autovacuum_off {
            c.execute("ALTER TABLE qcluster_queue SET (autovacuum_enabled = off)")
                .await
                .map_err(|e| e.to_string())?;
        }
        let server: String = sqlx::query_scalar("SHOW autovacuum")
            .fetch_one(&mut c)
            .await
            .map_err(|e| e.to_string())?;
        let table = if autovacuum_off { "off" } else { "default" };
        println!("autovacuum: server {server}, qcluster_queue {table}");
        Ok(State {
            autovacuum: format!("server {server}, table {table}"),
        })
    }

    /// Writes every dirty buffer now (BENCH_CHECKPOINT: tells the bulk load's write-back
    /// apart from the drain's own cost).
    pub async fn checkpoint(url: &str) -> Result<(), String> {
        let mut c = conn(url).await?;
        c.execute("CHECKPOINT").await.map_err(|e| e.to_string())?;
        Ok(())
    }

    /// The server's WAL counters: (full-page images, bytes).
    pub async fn wal(url: &str) -> Result<(i64, i64), String> {
        let mut c = conn(url).await?;
        sqlx::query_as("SELECT wal_fpi, wal_bytes::BIGINT FROM pg_stat_wal")
            .fetch_one(&mut c)
            .await
            .map_err(|e| e.to_string())
    }

    pub async fn dead_tuples(url: &str) -> Result<i64, String> {
        let mut c = conn(url).await?;
        // The statistics collector reports with a delay of up to a second.
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        sqlx::query_scalar(
            "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'qcluster_queue'",
        )
        .fetch_one(&mut c)
        .await
        .map_err(|e| e.to_string())
    }

    /// The queue table after the run, in words, and its dead tuples.
    pub async fn facts(url: &str, state: &State) -> Result<(String, i64), String> {
        let dead = dead_tuples(url).await?;
        let mut c = conn(url).await?;
        let row: (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT pg_total_relation_size('qcluster_queue'), \
             COALESCE(autovacuum_count, 0), COALESCE(autoanalyze_count, 0), \
             COALESCE(n_tup_hot_upd, 0) \
             FROM pg_stat_user_tables WHERE relname = 'qcluster_queue'",
        )
        .fetch_one(&mut c)
        .await
        .map_err(|e| e.to_string())?;
        let words = format!(
            "qcluster_queue after the run: {dead} dead tuples, {:.1} MB with indexes, \
             {} autovacuums and {} autoanalyzes during the run ({}), {} HOT updates",
            row.0 as f64 / 1e6,
            row.1,
            row.2,
            state.autovacuum,
            row.3
        );
        Ok((words, dead))
    }
}
