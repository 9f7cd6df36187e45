//! The raw baseline the benchmarks compare against: the broker's own claim (with a lease) and
//! delete statements in a plain sqlx loop, with no trait, no codec and no receipt bookkeeping.
//! Not part of the API: public only so that the benches of this crate and of `cluster` share it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[allow(unused_imports)]
use sqlx::{AssertSqlSafe, Row as _};

use crate::Dialect;

/// Fills `queue` with `n` copies of `payload` (not timed), then `consumers` connections claim
/// up to `bulk` rows at a time and delete them by id until all are gone; returns rows/s.
pub async fn claim_delete(
    url: &str,
    queue: &str,
    payload: &[u8],
    n: usize,
    bulk: usize,
    consumers: usize,
) -> Result<f64, sqlx::Error> {
    match Dialect::from_url(url) {
        #[cfg(feature = "postgres")]
        Some(Dialect::Postgres) => raw_postgres(url, queue, payload, n, bulk, consumers).await,
        #[cfg(feature = "mysql")]
        Some(Dialect::MySql) => raw_mysql(url, queue, payload, n, bulk, consumers).await,
        #[cfg(feature = "sqlite")]
        Some(Dialect::Sqlite) => raw_sqlite(url, queue, payload, n, bulk, consumers).await,
        _ => Err(sqlx::Error::Configuration(
            format!("no compiled-in backend for {}", broker_core::mask_url(url)).into(),
        )),
    }
}

#[allow(dead_code)]
const INSERT: &str = crate::dialect::INSERT_HEAD;

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
    ($pool:expr, $n:expr, $consumers:expr, [$($c:ident),*], |$p:ident| $step:expr) => {{
        let done = Arc::new(AtomicUsize::new(0));
        let t0 = Instant::now();
        let mut joins = Vec::new();
        for _ in 0..$consumers {
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
#[cfg(any(feature = "postgres", feature = "sqlite"))]
macro_rules! claim_returning_loop {
    ($pool:expr, $claim:expr, $queue:expr, $n:expr, $bulk:expr, $consumers:expr) => {{
        let queue = $queue.to_owned();
        let claim = $claim;
        let bulk = $bulk as i64;
        consume!($pool, $n, $consumers, [queue], |p| {
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

#[allow(dead_code)]
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

#[cfg(feature = "postgres")]
async fn raw_postgres(
    url: &str,
    queue: &str,
    payload: &[u8],
    n: usize,
    bulk: usize,
    consumers: usize,
) -> Result<f64, sqlx::Error> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(consumers as u32)
        .connect(url)
        .await?;
    fill!(&pool, sqlx::Postgres, queue, payload, n);
    let claim = "UPDATE qcluster_queue SET lease_until = (EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::BIGINT + 300000000, \
                 leased = 1, deliveries = deliveries + 1 WHERE id IN (SELECT id FROM qcluster_queue WHERE queue = $1 \
                 AND due_at <= (EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::BIGINT \
                 AND lease_until <= (EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::BIGINT \
                 ORDER BY tier, due_at, id LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING id, payload";
    claim_returning_loop!(pool, claim, queue, n, bulk, consumers)
}

#[cfg(feature = "sqlite")]
async fn raw_sqlite(
    url: &str,
    queue: &str,
    payload: &[u8],
    n: usize,
    bulk: usize,
    consumers: usize,
) -> Result<f64, sqlx::Error> {
    use std::str::FromStr;
    let opts = sqlx::sqlite::SqliteConnectOptions::from_str(url)?
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
        .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(10));
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(consumers as u32)
        .connect_with(opts)
        .await?;
    fill!(&pool, sqlx::Sqlite, queue, payload, n);
    let claim = "UPDATE qcluster_queue SET lease_until = CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER) + 300000000, \
                 leased = 1, deliveries = deliveries + 1 WHERE id IN (SELECT id FROM qcluster_queue WHERE queue = ? \
                 AND due_at <= CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER) \
                 AND lease_until <= CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER) \
                 ORDER BY tier, due_at, id LIMIT ?) RETURNING id, payload";
    claim_returning_loop!(pool, claim, queue, n, bulk, consumers)
}

#[cfg(feature = "mysql")]
async fn raw_mysql(
    url: &str,
    queue: &str,
    payload: &[u8],
    n: usize,
    bulk: usize,
    consumers: usize,
) -> Result<f64, sqlx::Error> {
    use sqlx::Executor as _;
    let pool = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(consumers as u32)
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
        "SELECT id, payload FROM qcluster_queue WHERE queue = ? AND due_at <= {now} \
         AND lease_until <= {now} ORDER BY tier, due_at, id LIMIT ? FOR UPDATE SKIP LOCKED"
    );
    let queue = queue.to_owned();
    consume!(pool, n, consumers, [queue, select], |p| {
        let mut tx = p.begin().await?;
        let rows = sqlx::query(AssertSqlSafe(select.clone()))
            .bind(&queue)
            .bind(bulk as i64)
            .fetch_all(&mut *tx)
            .await?;
        let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        if !ids.is_empty() {
            let mut qb = sqlx::QueryBuilder::<sqlx::MySql>::new(format!(
                "UPDATE qcluster_queue SET lease_until = {now} + 300000000, leased = 1, deliveries = deliveries + 1 WHERE id IN ("
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
