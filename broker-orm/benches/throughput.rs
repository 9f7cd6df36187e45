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
use broker_orm::{Dialect, OrmBroker, OrmConfig};
use sqlx::{AssertSqlSafe, Row as _};

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
    let raw = match Dialect::from_url(url) {
        Some(Dialect::Postgres) => raw_postgres(url, &raw_queue, &payload, n, bulk).await,
        Some(Dialect::MySql) => raw_mysql(url, &raw_queue, &payload, n, bulk).await,
        _ => raw_sqlite(url, &raw_queue, &payload, n, bulk).await,
    }
    .map_err(|e| format!("raw loop: {e}"))?;
    producer.delete_queue().await.map_err(|e| e.to_string())?;
    Ok((enqueue_rate, ours, raw))
}

const INSERT: &str = "INSERT INTO qcluster_queue (queue, payload, priority, visible_at, leased, deliveries, enqueued_at) ";

/// Inserts `n` rows with multi-row INSERTs (not timed).
macro_rules! fill {
    ($pool:expr, $db:ty, $queue:expr, $payload:expr, $n:expr) => {{
        let mut left = $n;
        while left > 0 {
            let k = left.min(500);
            let mut qb = sqlx::QueryBuilder::<$db>::new(INSERT);
            qb.push_values(0..k, |mut b, _| {
                b.push_bind($queue)
                    .push_bind($payload)
                    .push("0")
                    .push("0")
                    .push("0")
                    .push("0")
                    .push("0");
            });
            qb.build().execute($pool).await?;
            left -= k;
        }
    }};
}

/// Runs `CONSUMERS` loops of `$claim_and_delete` until the table is empty; returns rows/s.
macro_rules! consume {
    ($pool:expr, $n:expr, [$($c:ident),*], |$p:ident| $step:expr) => {{
        let done = Arc::new(AtomicUsize::new(0));
        let t0 = Instant::now();
        let mut joins = Vec::new();
        for _ in 0..CONSUMERS {
            let $p = $pool.clone();
            $(let $c = $c.clone();)*
            let done = done.clone();
            joins.push(tokio::spawn(async move {
                // Like ours: a consumer stops when every row is done, not at its first empty
                // claim (the other one may still hold rows under SKIP LOCKED).
                while done.load(Ordering::Relaxed) < $n {
                    let k: usize = $step;
                    if k == 0 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        continue;
                    }
                    done.fetch_add(k, Ordering::Relaxed);
                }
                Ok::<_, sqlx::Error>(())
            }));
        }
        for j in joins {
            j.await.map_err(|e| sqlx::Error::Protocol(e.to_string()))??;
        }
        let got = done.load(Ordering::Relaxed);
        if got != $n {
            return Err(sqlx::Error::Protocol(format!("raw loop moved {got} of {} rows", $n)));
        }
        Ok(got as f64 / t0.elapsed().as_secs_f64())
    }};
}

/// Two connections: one `UPDATE ... RETURNING` claim, then delete the ids, until empty.
macro_rules! claim_returning_loop {
    ($pool:expr, $claim:expr, $queue:expr, $n:expr, $bulk:expr) => {{
        let queue = $queue.to_owned();
        let claim = $claim;
        let bulk = $bulk as i64;
        consume!($pool, $n, [queue], |p| {
            let rows = sqlx::query(claim)
                .bind(&queue)
                .bind(bulk)
                .fetch_all(&p)
                .await?;
            let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
            if !ids.is_empty() {
                delete_ids(&p, &ids).await?;
            }
            ids.len()
        })
    }};
}

async fn delete_ids<'c, DB: sqlx::Database, E>(exec: E, ids: &[i64]) -> Result<(), sqlx::Error>
where
    E: sqlx::Executor<'c, Database = DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'a> <DB as sqlx::Database>::Arguments: sqlx::IntoArguments<DB>,
{
    let mut qb = sqlx::QueryBuilder::<DB>::new("DELETE FROM qcluster_queue WHERE id IN (");
    let mut sep = qb.separated(", ");
    for id in ids {
        sep.push_bind(*id);
    }
    qb.push(")");
    qb.build().execute(exec).await.map(|_| ())
}

async fn raw_postgres(
    url: &str,
    queue: &str,
    payload: &[u8],
    n: usize,
    bulk: usize,
) -> Result<f64, sqlx::Error> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(CONSUMERS as u32)
        .connect(url)
        .await?;
    fill!(&pool, sqlx::Postgres, queue, payload, n);
    let claim = "UPDATE qcluster_queue SET visible_at = (EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::BIGINT + 300000000, \
                 leased = 1, deliveries = deliveries + 1 WHERE id IN (SELECT id FROM qcluster_queue WHERE queue = $1 \
                 AND visible_at <= (EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::BIGINT \
                 ORDER BY priority DESC, visible_at, id LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING id, payload";
    claim_returning_loop!(pool, claim, queue, n, bulk)
}

async fn raw_sqlite(
    url: &str,
    queue: &str,
    payload: &[u8],
    n: usize,
    bulk: usize,
) -> Result<f64, sqlx::Error> {
    use std::str::FromStr;
    let opts = sqlx::sqlite::SqliteConnectOptions::from_str(url)?
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
        .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(10));
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(CONSUMERS as u32)
        .connect_with(opts)
        .await?;
    fill!(&pool, sqlx::Sqlite, queue, payload, n);
    let claim = "UPDATE qcluster_queue SET visible_at = CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER) + 300000000, \
                 leased = 1, deliveries = deliveries + 1 WHERE id IN (SELECT id FROM qcluster_queue WHERE queue = ? \
                 AND visible_at <= CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER) \
                 ORDER BY priority DESC, visible_at, id LIMIT ?) RETURNING id, payload";
    claim_returning_loop!(pool, claim, queue, n, bulk)
}

async fn raw_mysql(
    url: &str,
    queue: &str,
    payload: &[u8],
    n: usize,
    bulk: usize,
) -> Result<f64, sqlx::Error> {
    use sqlx::Executor as _;
    let pool = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(CONSUMERS as u32)
        .after_connect(|c: &mut sqlx::MySqlConnection, _| {
            Box::pin(async move {
                c.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                    .await?;
                c.execute("SET time_zone = '+00:00'").await?;
                Ok(())
            })
        })
        .connect(url)
        .await?;
    fill!(&pool, sqlx::MySql, queue, payload, n);
    let now = "CAST(UNIX_TIMESTAMP(NOW(6)) * 1000000 AS SIGNED)";
    let select = format!(
        "SELECT id, payload FROM qcluster_queue WHERE queue = ? AND visible_at <= {now} \
         ORDER BY priority DESC, visible_at, id LIMIT ? FOR UPDATE SKIP LOCKED"
    );
    let queue = queue.to_owned();
    consume!(pool, n, [queue, select], |p| {
        let mut tx = p.begin().await?;
        let rows = sqlx::query(AssertSqlSafe(select.clone()))
            .bind(&queue)
            .bind(bulk as i64)
            .fetch_all(&mut *tx)
            .await?;
        let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        if !ids.is_empty() {
            let mut qb = sqlx::QueryBuilder::<sqlx::MySql>::new(format!(
                "UPDATE qcluster_queue SET visible_at = {now} + 300000000, leased = 1, deliveries = deliveries + 1 WHERE id IN ("
            ));
            let mut sep = qb.separated(", ");
            for id in &ids {
                sep.push_bind(*id);
            }
            qb.push(")");
            qb.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        if !ids.is_empty() {
            delete_ids(&p, &ids).await?;
        }
        ids.len()
    })
}
