//! The dashboard on a big result store: 1,000,000 results (SQLite and PostgreSQL), then the
//! task list, a filter by func, failures only, the second page and one task's page, each
//! fetched over HTTP from `qcluster dashboard` 30 times; the median and p95 beside the same
//! query run straight on the store in the same run (the baseline: what the page adds is
//! rendering and HTTP).
//!
//! `cargo bench -p cluster --features orm-postgres --bench dashboard [-- sqlite postgres]`
//! Env: `BENCH_RESULTS` (default 1000000), `QCLUSTER_TEST_POSTGRES_URL` (the bench makes and
//! (re)creates its own database `qcluster_bench_dashboard` on that server, left for inspection).

mod harness;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use broker_core::TaskId;
use cluster::store::{Browse, Outcome};
use cluster::{Store, TaskRecord};

const FUNCS: usize = 20;
const SAMPLES: usize = 30;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(bench());
}

async fn bench() {
    let n = harness::count("BENCH_RESULTS", 1_000_000);
    let wanted = harness::backends(&["sqlite", "postgres"]);
    let dir = tempfile::tempdir().expect("temp dir");
    println!(
        "qcluster dashboard bench: {n} results, {FUNCS} funcs, 10% failures; {SAMPLES} fetches each"
    );
    for backend in wanted {
        let url = match backend.as_str() {
            "sqlite" => format!("sqlite://{}/dash.sqlite3", dir.path().display()),
            "postgres" => match postgres_db().await {
                Ok(u) => u,
                Err(e) => {
                    println!("{backend}: skipped: {e}");
                    continue;
                }
            },
            other => {
                println!("unknown backend {other}");
                continue;
            }
        };
        if let Err(e) = run(&backend, &url, n).await {
            println!("{backend}: failed: {e}");
        }
    }
}

/// A fresh database of our own on the PostgreSQL server.
async fn postgres_db() -> Result<String, String> {
    let admin = std::env::var("QCLUSTER_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let store = Store::connect(&admin, Duration::from_secs(5))
        .await
        .map_err(|e| e.to_string())?;
    drop(store);
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
    let db = "qcluster_bench_dashboard";
    for sql in [
        format!("DROP DATABASE IF EXISTS {db}"),
        format!("CREATE DATABASE {db}"),
    ] {
        let out = Command::new("psql")
            .args([&admin, "-q", "-c", &sql])
            .output()
            .map_err(|e| format!("psql: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
    }
    Ok(format!("{base}/{db}"))
}

async fn run(backend: &str, url: &str, n: usize) -> Result<(), String> {
    let e = |e: cluster::Error| e.to_string();
    let store = Store::connect(url, Duration::from_secs(5))
        .await
        .map_err(e)?;
    let name = "dash_bench";
    let t = Instant::now();
    let now = broker_core::now_us();
    let month_us = 30 * 24 * 3600 * 1_000_000i64;
    let mut some_id = None;
    let batch = 5000;
    for start in (0..n).step_by(batch) {
        let rows: Vec<TaskRecord> = (start..(start + batch).min(n))
            .map(|i| {
                let stopped = now - month_us + (i as i64 * month_us / n as i64);
                let success = i % 10 != 0;
                let id = TaskId::new();
                some_id = Some(id);
                TaskRecord {
                    id,
                    name: format!("job-{}", i % FUNCS),
                    func: format!("func{}", i % FUNCS),
                    args: format!("{{\"n\":{i},\"note\":\"<b>{i}</b>\"}}"),
                    result: Some(if success {
                        format!("{}", i * 2)
                    } else {
                        "\"failed: out of cheese\"".into()
                    }),
                    enqueued_us: stopped - 2000,
                    started_us: stopped - 1000,
                    stopped_us: stopped,
                    success,
                    done: true,
                    attempts: 1,
                    group: (i % 100 == 0).then(|| format!("g{}", i % 1000)),
                    cluster: name.into(),
                }
            })
            .collect();
        store.save(&rows).await.map_err(e)?;
    }
    let fill = t.elapsed();
    if backend == "postgres" {
        // As autovacuum would after a load this size: fresh statistics for the planner.
        let _ = Command::new("psql")
            .args([url, "-q", "-c", "VACUUM ANALYZE qcluster_task"])
            .status();
    }
    println!();
    println!(
        "{backend}: {n} results saved in {:.1} s ({:.0} rows/s)",
        fill.as_secs_f64(),
        n as f64 / fill.as_secs_f64()
    );
    let id = some_id.ok_or("no rows")?;

    // `qcluster dashboard` on this store.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| e.to_string())?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_qcluster"))
        .current_dir(dir.path())
        .args(["dashboard", "--listen", &format!("127.0.0.1:{port}")])
        .env_remove("QCLUSTER_CONFIG")
        .env("QCLUSTER_LOG", "warn")
        .env("QCLUSTER_SECRET", "dashboard-bench-secret-0123456789abcdef")
        .env("QCLUSTER_NAME", name)
        .env("QCLUSTER_BROKER", "memory")
        .env("QCLUSTER_STORE__URL", url)
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if t.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            return Err("dashboard did not start".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // The second page starts after the last row of the first.
    let first = store
        .browse(
            name,
            &Browse {
                limit: 50,
                ..Browse::default()
            },
        )
        .await
        .map_err(e)?;
    let last = first.last().ok_or("empty first page")?;
    let after = format!("{}_{}", last.stopped_us, last.id);

    println!(
        "{:<28} {:>9} {:>9} {:>11} {:>7}",
        "page", "p50 ms", "p95 ms", "raw p50 ms", "ratio"
    );
    let cases: Vec<(&str, String, Browse)> = vec![
        (
            "task list",
            "/tasks".into(),
            Browse {
                limit: 50,
                ..Browse::default()
            },
        ),
        (
            "filter by func",
            "/tasks?func=func7".into(),
            Browse {
                func: Some("func7".into()),
                limit: 50,
                ..Browse::default()
            },
        ),
        (
            "failures only",
            "/tasks?outcome=failure".into(),
            Browse {
                outcome: Outcome::Failure,
                limit: 50,
                ..Browse::default()
            },
        ),
        (
            "func + failures",
            "/tasks?outcome=failure&func=func10".into(),
            Browse {
                outcome: Outcome::Failure,
                func: Some("func10".into()),
                limit: 50,
                ..Browse::default()
            },
        ),
        (
            "second page",
            format!("/tasks?after={after}"),
            Browse {
                after: Some((last.stopped_us, last.id.to_string())),
                limit: 50,
                ..Browse::default()
            },
        ),
    ];
    for (label, path, browse) in cases {
        let page = sample(|| {
            let (status, body) = get(port, &path);
            let rows = body.matches("href=\"/tasks/").count();
            assert!(status == 200 && rows == 50, "{path}: {status}, {rows} rows");
        });
        let mut raw = Vec::with_capacity(SAMPLES);
        for _ in 0..SAMPLES {
            let t = Instant::now();
            let rows = store.browse(name, &browse).await.map_err(e)?;
            raw.push(t.elapsed());
            assert_eq!(rows.len(), 50, "{label}");
        }
        print_row(label, &page, &raw);
    }
    let path = format!("/tasks/{id}");
    let page = sample(|| {
        let (status, _) = get(port, &path);
        assert_eq!(status, 200, "{path}");
    });
    let mut raw = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let t = Instant::now();
        store.get(id).await.map_err(e)?.ok_or("task missing")?;
        raw.push(t.elapsed());
    }
    print_row("one task", &page, &raw);
    let _ = child.kill();
    let _ = child.wait();
    Ok(())
}

fn sample(mut f: impl FnMut()) -> Vec<Duration> {
    f(); // warm-up
    (0..SAMPLES)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect()
}

fn pct(v: &[Duration], p: f64) -> f64 {
    let mut ms: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    ms[((ms.len() - 1) as f64 * p).round() as usize]
}

fn print_row(label: &str, page: &[Duration], raw: &[Duration]) {
    let (p50, p95, r50) = (pct(page, 0.5), pct(page, 0.95), pct(raw, 0.5));
    println!(
        "{label:<28} {p50:>9.2} {p95:>9.2} {r50:>11.2} {:>6.1}x{}",
        p50 / r50,
        if p95 > 200.0 { "  OVER 200 ms" } else { "" }
    );
}

/// GET over a plain socket: (status, the whole answer).
fn get(port: u16, path: &str) -> (u16, String) {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text.into_owned())
}
