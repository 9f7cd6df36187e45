//! Throughput of the SQL broker beside a raw sqlx loop running the same statements.
//!
//! `cargo bench -p broker-orm --features postgres,mysql --bench throughput [-- sqlite postgres mysql]`
//!
//! For each backend and bulk (1 and 10): N signed `noop` packages go in with `enqueue_many`, then
//! two consumers (each its own broker handle and connection, like two clusters) dequeue, verify
//! and decode every package and acknowledge it (one statement per batch). Beside it, in the same
//! run and on the same table, the raw limit: two connections claiming rows with a lease and
//! deleting them by id, with no trait, no codec and no receipts bookkeeping.
//! Env: `BENCH_N` (default 20000), `QCLUSTER_TEST_POSTGRES_URL`, `QCLUSTER_TEST_MYSQL_URL`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use broker_core::{Broker, Codec, Message, QueueSettings, TaskPackage};
use broker_orm::{OrmBroker, OrmConfig};

const CONSUMERS: usize = 2;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let mut wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if wanted.is_empty() {
        wanted = vec!["sqlite".into(), "postgres".into(), "mysql".into()];
    }
    let dir = std::env::temp_dir().join(format!("qcluster-bench-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    println!(
        "qcluster SQL broker bench: N = {n}, {CONSUMERS} consumers, raw = same claim + delete statements"
    );
    println!(
        "{:<10} {:>4} {:>14} {:>14} {:>14} {:>7}",
        "backend", "bulk", "enqueue/s", "ours/s", "raw/s", "ratio"
    );
    for backend in wanted {
        let url = match backend.as_str() {
            "sqlite" => format!("sqlite://{}/bench.sqlite3", dir.display()),
            "postgres" => std::env::var("QCLUSTER_TEST_POSTGRES_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into()),
            "mysql" => std::env::var("QCLUSTER_TEST_MYSQL_URL")
                .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into()),
            other => {
                eprintln!("unknown backend {other}");
                continue;
            }
        };
        for bulk in [1usize, 10] {
            match run(&url, n, bulk).await {
                Ok((enq, ours, raw)) => println!(
                    "{backend:<10} {bulk:>4} {enq:>14.0} {ours:>14.0} {raw:>14.0} {:>6.0}%",
                    100.0 * ours / raw
                ),
                Err(e) => println!("{backend:<10} {bulk:>4} skipped: {e}"),
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

async fn run(url: &str, n: usize, bulk: usize) -> Result<(f64, f64, f64), String> {
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let settings = QueueSettings {
        queue: format!("bench-{}", &tag[16..]),
        bulk,
        retry: Duration::from_secs(300),
        wait: Duration::from_millis(100),
        poll: Duration::from_millis(20),
        max_message_size: None,
    };
    let mut cfg = OrmConfig::new(url);
    cfg.pool_size = Some(1);
    let producer = OrmBroker::connect(&cfg, settings.clone())
        .await
        .map_err(|e| e.to_string())?;
    let codec = Codec::new(b"bench-secret", "bench").map_err(|e| e.to_string())?;

    // Ours: enqueue.
    let t0 = Instant::now();
    let mut batch = Vec::with_capacity(1000);
    for _ in 0..n {
        let p = TaskPackage::new("noop", b"[1]".to_vec());
        batch.push(Message::new(codec.encode(&p).map_err(|e| e.to_string())?));
        if batch.len() == 1000 {
            producer
                .enqueue_many(std::mem::take(&mut batch))
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    if !batch.is_empty() {
        producer
            .enqueue_many(batch)
            .await
            .map_err(|e| e.to_string())?;
    }
    let enqueue_rate = n as f64 / t0.elapsed().as_secs_f64();

    // Ours: two consumers.
    let done = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(std::sync::OnceLock::<Instant>::new());
    let t0 = Instant::now();
    let mut joins = Vec::new();
    for _ in 0..CONSUMERS {
        let b = OrmBroker::connect(&cfg, settings.clone())
            .await
            .map_err(|e| e.to_string())?;
        let done = done.clone();
        let codec = codec.clone();
        let finished = finished.clone();
        joins.push(tokio::spawn(async move {
            while done.load(Ordering::Relaxed) < n {
                let got = b.dequeue().await.map_err(|e| e.to_string())?;
                for d in &got {
                    codec.decode(&d.payload).map_err(|e| e.to_string())?;
                }
                let acks: Vec<_> = got.iter().map(|d| d.ack.clone()).collect();
                b.acknowledge_many(&acks).await.map_err(|e| e.to_string())?;
                if done.fetch_add(got.len(), Ordering::Relaxed) + got.len() >= n {
                    let _ = finished.set(Instant::now());
                }
            }
            Ok::<_, String>(())
        }));
    }
    for j in joins {
        j.await.map_err(|e| e.to_string())??;
    }
    // Timed to the last acknowledgement: the other consumer's idle wait on the drained queue
    // afterwards is not work.
    let end = finished.get().copied().unwrap_or_else(Instant::now);
    let ours = done.load(Ordering::Relaxed) as f64 / end.duration_since(t0).as_secs_f64();

    // Raw: same rows, same table, plain statements.
    let payload = codec
        .encode(&TaskPackage::new("noop", b"[1]".to_vec()))
        .map_err(|e| e.to_string())?;
    let raw_queue = format!("bench-raw-{}", &tag[16..]);
    let raw = broker_orm::rawloop::claim_delete(url, &raw_queue, &payload, n, bulk, CONSUMERS)
        .await
        .map_err(|e| format!("raw loop: {e}"))?;
    producer.delete_queue().await.map_err(|e| e.to_string())?;
    Ok((enqueue_rate, ours, raw))
}
