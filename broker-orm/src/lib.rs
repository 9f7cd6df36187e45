//! SQL broker on `sqlx`: SQLite (feature `sqlite`, default), PostgreSQL (`postgres`) and
//! MySQL/MariaDB (`mysql`).
//!
//! One table, `qcluster_queue`, holds every queue's packages. A claim leases up to `bulk` ready
//! rows atomically (`FOR UPDATE SKIP LOCKED` on PostgreSQL and MariaDB/MySQL; SQLite's single
//! writer on SQLite): a leased row is held until `lease_until = now + retry`, and comes back by
//! itself if it is not acknowledged by then. `acknowledge` deletes the row; `fail` makes it ready
//! again (at `due_at = now + delay`) with its delivery count raised. A claim changes no indexed
//! column (the claim index is `(queue, tier, due_at, id)`, `tier` being the negated priority), so
//! PostgreSQL updates the row in place, and PostgreSQL claims resume from the handle's floor
//! rather than walking the dead entries at the head of the index (see `floor`). Receipts carry the delivery count, so the late answer of a consumer
//! whose lease ran out never touches the lease of the consumer that holds the row now.
//! Time is the database's clock, so clusters on machines with skewed clocks agree on leases.
//!
//! Dead letters live in `qcluster_dead` (listed by the id the package had in the queue).
//! `requeue_dead` inserts the package back into `qcluster_queue` as a fresh row (a new id, first
//! delivery again, priority 0: the dead-letter table keeps no priority) and deletes the dead
//! letter in the same transaction; `delete_dead` deletes it. Both look the id up in the queue's
//! dead letters (no index on it: a scan of that queue's dead letters).
//!
//! On PostgreSQL, `LISTEN/NOTIFY` wakes waiting consumers as soon as a package is enqueued;
//! elsewhere (and as a fallback) a waiting `dequeue` looks again every `poll`.
#![warn(missing_docs)]

mod config;
mod db;
mod dialect;
// The floor steers PostgreSQL's claims; the other backends only lower it on enqueue.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
mod floor;
#[doc(hidden)]
pub mod migrate;
#[cfg(feature = "postgres")]
mod notify;
#[doc(hidden)]
pub mod rawloop;
mod upkeep;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use broker_core::{
    AckId, Broker, BrokerError, BrokerInfo, Capabilities, DeadLetter, Delivery, Message, MessageId,
    QueueSettings, Stat, async_trait,
};
use sqlx::{Executor as _, QueryBuilder, Row as _};
use tokio::sync::Notify;

pub use config::OrmConfig;
pub use dialect::Dialect;

use db::{Ctx, Db, on_db};
use dialect::{Statements, like_prefix};

/// Largest `bulk` a claim takes.
pub const MAX_BULK: usize = 1000;
/// Default package size limit (the MySQL server's `max_allowed_packet` may lower it).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;
/// Rows per `INSERT` in `enqueue_many`.
const INSERT_CHUNK: usize = 500;
#[cfg(feature = "postgres")]
const LISTEN_CHANNEL: &str = "qcluster_queue";

/// The SQL broker for one queue. Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct OrmBroker {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    replica: Option<Db>,
    sql: Statements,
    settings: QueueSettings,
    ctx: Ctx,
    replica_endpoint: Option<String>,
    max_message_size: usize,
    server: String,
    pool_size: u32,
    id_step: i64,
    wake: Arc<Notify>,
    /// Where this handle's PostgreSQL claims start (see `floor`).
    floor: Arc<floor::Floor>,
    listening: Arc<AtomicBool>,
    listener: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = self.listener.take() {
            task.abort();
        }
    }
}

impl fmt::Debug for OrmBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OrmBroker")
            .field("broker", &self.inner.ctx.dialect.broker_name())
            .field("endpoint", &self.inner.ctx.endpoint)
            .field("replica", &self.inner.replica_endpoint)
            .field("queue", &self.inner.settings.queue)
            .finish()
    }
}

fn parse_ack(ack: &AckId, broker: &'static str) -> Result<(i64, i32), BrokerError> {
    let bad = || BrokerError::InvalidReceipt {
        broker,
        receipt: ack.as_str().to_owned(),
    };
    let (id, n) = ack.as_str().split_once(':').ok_or_else(bad)?;
    Ok((
        id.parse().map_err(|_| bad())?,
        n.parse().map_err(|_| bad())?,
    ))
}

fn micros(d: Duration) -> i64 {
    // Far from i64::MAX, so `now + micros` cannot overflow in SQL.
    i64::try_from(d.as_micros())
        .unwrap_or(i64::MAX)
        .min(i64::MAX / 4)
}

impl OrmBroker {
    /// Connects (in bounded time), creates or upgrades the schema, and on PostgreSQL starts
    /// listening for new packages.
    pub async fn connect(config: &OrmConfig, settings: QueueSettings) -> Result<Self, BrokerError> {
        settings.validate(MAX_BULK)?;
        let dialect = Dialect::from_url(&config.url).ok_or_else(|| {
            BrokerError::config(
                "orm.url",
                format!(
                    "{:?} is not a sqlite://, postgres:// or mysql:// URL",
                    broker_core::mask_url(&config.url)
                ),
            )
        })?;
        let mut urls = vec![config.url.as_str()];
        if let Some(r) = &config.replica_url {
            if Dialect::from_url(r) != Some(dialect) {
                return Err(BrokerError::config(
                    "orm.replica_url",
                    "must use the same database kind as orm.url",
                ));
            }
            urls.push(r);
        }
        let ctx = Ctx::new(dialect, &urls, config.connect_timeout);
        let listens = dialect == Dialect::Postgres;
        let db = db::connect(
            &config.url,
            "orm.url",
            &ctx,
            config.pool_size,
            listens as u32,
        )
        .await?;
        let replica = match &config.replica_url {
            Some(r) => Some(db::connect(r, "orm.replica_url", &ctx, config.pool_size, 0).await?),
            None => None,
        };
        migrate(&db, dialect, &ctx).await?;
        let (server, packet, id_step) = server_facts(&db, &ctx).await?;
        let mut max_message_size = settings
            .max_message_size
            .unwrap_or(DEFAULT_MAX_MESSAGE_SIZE);
        if let Some(packet) = packet {
            // Leave room for the rest of the statement in the packet.
            let room = packet.saturating_sub(64 * 1024);
            if settings.max_message_size.is_some_and(|m| m > room) {
                return Err(BrokerError::config(
                    "max_message_size",
                    format!(
                        "{} bytes does not fit the server's max_allowed_packet of {packet} bytes",
                        max_message_size
                    ),
                ));
            }
            max_message_size = max_message_size.min(room);
        }
        let wake = shared_wake(&config.url);
        let listening = Arc::new(AtomicBool::new(false));
        let floor = Arc::new(floor::Floor::default());
        #[allow(unused_mut)]
        let mut listener = None;
        #[cfg(feature = "postgres")]
        #[allow(irrefutable_let_patterns)]
        if let Db::Postgres(pool) = &db {
            listener = Some(tokio::spawn(notify::listen(
                pool.clone(),
                LISTEN_CHANNEL,
                settings.queue.clone(),
                wake.clone(),
                floor.clone(),
                listening.clone(),
                ctx.clone(),
            )));
        }
        let pool_size = on_db!(&db, p => p.options().get_max_connections());
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                replica,
                sql: Statements::new(dialect),
                replica_endpoint: config.replica_url.as_deref().map(broker_core::mask_url),
                settings,
                ctx,
                max_message_size,
                server,
                pool_size,
                id_step,
                wake,
                floor,
                listening,
                listener,
            }),
        })
    }

    /// The backend in use.
    pub fn dialect(&self) -> Dialect {
        self.inner.ctx.dialect
    }

    /// The queue settings this handle was opened with.
    pub fn settings(&self) -> &QueueSettings {
        &self.inner.settings
    }

    fn read_db(&self) -> &Db {
        self.inner.replica.as_ref().unwrap_or(&self.inner.db)
    }

    fn broker(&self) -> &'static str {
        self.inner.ctx.dialect.broker_name()
    }

    fn check_size(&self, m: &Message) -> Result<(), BrokerError> {
        if m.payload.len() > self.inner.max_message_size {
            return Err(BrokerError::TooLarge {
                broker: self.broker(),
                size: m.payload.len(),
                limit: self.inner.max_message_size,
            });
        }
        Ok(())
    }

    async fn count(&self, db: &Db, sql: &Arc<str>, op: &'static str) -> Result<u64, BrokerError> {
        let q = &self.inner.settings.queue;
        let n: i64 = on_db!(db, p => sqlx::query_scalar(sqlx::AssertSqlSafe(sql.clone()))
            .bind(q.as_str())
            .fetch_one(p)
            .await
            .map_err(self.inner.ctx.err(op))?);
        Ok(n.max(0) as u64)
    }

    /// Leases up to `bulk` ready rows (chosen by priority, then due time, then id) and returns
    /// them by priority, then id (enqueue order).
    async fn claim(&self) -> Result<Vec<Delivery>, BrokerError> {
        let i = &self.inner;
        let retry = micros(i.settings.retry);
        let bulk = i.settings.bulk;
        let queue = i.settings.queue.as_str();
        let err = i.ctx.err("dequeue");
        let sql = sqlx::AssertSqlSafe(i.sql.claim.clone());
        let mut rows: Vec<Claimed> = match &i.db {
            #[cfg(feature = "postgres")]
            Db::Postgres(p) => {
                // From the floor; when that comes back short, once in a while from the bottom
                // too (see `floor`).
                let start = i.floor.start();
                let mut rows = self.claim_pg(p, start, bulk, retry).await?;
                if rows.len() < bulk
                    && !start.full
                    && let Some(again) = i.floor.full_scan_if_due()
                {
                    let more = self.claim_pg(p, again, bulk - rows.len(), retry).await?;
                    rows.extend(more);
                }
                rows
            }
            #[cfg(feature = "mysql")]
            Db::MySql(p) => {
                let mut tx = p.begin().await.map_err(&err)?;
                let found = sqlx::query(sql)
                    .bind(queue)
                    .bind(bulk as i64)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(&err)?;
                if found.is_empty() {
                    tx.rollback().await.map_err(&err)?;
                    return Ok(Vec::new());
                }
                let mut rows = Vec::with_capacity(found.len());
                for r in &found {
                    let mut c = Claimed::read(r).map_err(&err)?;
                    c.deliveries += 1;
                    rows.push(c);
                }
                let mut qb = QueryBuilder::new("UPDATE qcluster_queue SET lease_until = ");
                qb.push(i.sql.now)
                    .push(" + ")
                    .push_bind(retry)
                    .push(", leased = 1, deliveries = deliveries + 1 WHERE id IN (");
                let mut ids = qb.separated(", ");
                for r in &rows {
                    ids.push_bind(r.id);
                }
                qb.push(")");
                qb.build().execute(&mut *tx).await.map_err(&err)?;
                tx.commit().await.map_err(&err)?;
                rows
            }
            #[allow(unreachable_patterns)]
            other => on_db!(other, p => {
                let found = sqlx::query(sql)
                    .bind(retry)
                    .bind(queue)
                    .bind(bulk as i64)
                    .fetch_all(p)
                    .await
                    .map_err(&err)?;
                found.iter().map(Claimed::read).collect::<Result<Vec<_>, _>>().map_err(&err)?
            }),
        };
        rows.sort_by_key(|r| (r.tier, r.id));
        Ok(rows
            .into_iter()
            .map(|r| Delivery {
                ack: AckId::new(format!("{}:{}", r.id, r.deliveries)),
                message_id: MessageId(r.id.to_string()),
                payload: r.payload,
                deliveries: Some(r.deliveries.max(0) as u32),
            })
            .collect())
    }

    /// One PostgreSQL claim of up to `bulk` rows from `start`; the floor rises past what it
    /// leased.
    #[cfg(feature = "postgres")]
    async fn claim_pg(
        &self,
        p: &sqlx::PgPool,
        start: floor::Start,
        bulk: usize,
        retry: i64,
    ) -> Result<Vec<Claimed>, BrokerError> {
        let i = &self.inner;
        let err = i.ctx.err("dequeue");
        let found = sqlx::query(sqlx::AssertSqlSafe(i.sql.claim.clone()))
            .bind(retry)
            .bind(i.settings.queue.as_str())
            .bind(start.from.0)
            .bind(start.from.1)
            .bind(start.from.2)
            .bind(bulk as i64)
            .fetch_all(p)
            .await
            .map_err(&err)?;
        let rows = found
            .iter()
            .map(Claimed::read)
            .collect::<Result<Vec<_>, _>>()
            .map_err(&err)?;
        if let Some(top) = rows.iter().map(Claimed::key).max() {
            i.floor.advance(start, top);
        }
        Ok(rows)
    }
}

/// A row a claim leased.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
struct Claimed {
    id: i64,
    payload: Vec<u8>,
    deliveries: i32,
    tier: i32,
    due_at: i64,
}

impl Claimed {
    /// Reads `id, payload, deliveries, tier, due_at`.
    fn read<R: sqlx::Row>(r: &R) -> Result<Self, sqlx::Error>
    where
        usize: sqlx::ColumnIndex<R>,
        i64: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
        i32: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
        Vec<u8>: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    {
        Ok(Self {
            id: r.try_get(0)?,
            payload: r.try_get(1)?,
            deliveries: r.try_get(2)?,
            tier: r.try_get(3)?,
            due_at: r.try_get(4)?,
        })
    }

    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    fn key(&self) -> floor::Key {
        (self.tier, self.due_at, self.id)
    }
}

/// Longest a start-up waits for another cluster's schema upgrade (the wait for the lock; the
/// upgrade itself, which grows with the queue on a large backlog, is not cut short: a cut would
/// roll it back, and every start would begin it again).
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between two tries for the schema lock.
const MIGRATE_RETRY: Duration = Duration::from_millis(100);

async fn migrate(db: &Db, d: Dialect, ctx: &Ctx) -> Result<(), BrokerError> {
    let err = ctx.err("migrate");
    let record = d.render(match d {
        Dialect::MySql => "INSERT IGNORE INTO qcluster_migrations (version, description, applied_at) VALUES (?, ?, NOW_US)",
        _ => "INSERT INTO qcluster_migrations (version, description, applied_at) VALUES (?, ?, NOW_US) ON CONFLICT (version) DO NOTHING",
    });
    let waited_too_long = |operation: &'static str| BrokerError::Timeout {
        broker: d.broker_name(),
        operation,
        endpoint: ctx.endpoint.clone(),
        after: MIGRATE_TIMEOUT,
    };
    on_db!(db, p => {
        let mut conn = p.acquire().await.map_err(&err)?;
        // Several clusters may start at once: one upgrades, the others wait and find it done.
        // SQLite has no named lock: its write lock, taken by BEGIN IMMEDIATE, serves.
        let release = match d {
            Dialect::Postgres => "SELECT pg_advisory_unlock(7215113901)",
            Dialect::MySql => "SELECT RELEASE_LOCK('qcluster_migrate')",
            Dialect::Sqlite => "COMMIT",
        };
        let deadline = Instant::now() + MIGRATE_TIMEOUT;
        match d {
            Dialect::MySql => {
                // 1 = taken; 0 = timed out; NULL = error. Only 1 lets us go on.
                let got: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK('qcluster_migrate', 60)")
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(&err)?;
                if got != Some(1) {
                    return Err(waited_too_long("migrate (GET_LOCK qcluster_migrate)"));
                }
            }
            Dialect::Postgres => loop {
                let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(7215113901)")
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(&err)?;
                if got {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(waited_too_long("migrate (waiting for the schema lock)"));
                }
                tokio::time::sleep(MIGRATE_RETRY).await;
            },
            Dialect::Sqlite => loop {
                match conn.execute("BEGIN IMMEDIATE").await {
                    Ok(_) => break,
                    // Another process holds the write lock (perhaps upgrading a large file).
                    Err(e) if db::is_busy(&e) => {
                        if Instant::now() >= deadline {
                            return Err(waited_too_long("migrate (waiting for SQLite's write lock)"));
                        }
                        tokio::time::sleep(MIGRATE_RETRY).await;
                    }
                    Err(e) => return Err(err(e)),
                }
            },
        }
        let result: Result<(), BrokerError> = async {
            conn.execute(migrate::bookkeeping(d)).await.map_err(&err)?;
            let done: Vec<i64> = sqlx::query_scalar("SELECT version FROM qcluster_migrations")
                .fetch_all(&mut *conn)
                .await
                .map_err(&err)?;
            for m in migrate::MIGRATIONS.iter().filter(|m| !done.contains(&m.version)) {
                // PostgreSQL: the version's statements and its record commit together.
                if d == Dialect::Postgres {
                    conn.execute("BEGIN").await.map_err(&err)?;
                }
                let applied: Result<(), BrokerError> = async {
                    for (k, stmt) in m.statements(d).iter().enumerate() {
                        if d == Dialect::MySql
                            && let Some(Some(probe)) = m.mysql_done_if.get(k)
                        {
                            let n: i64 = sqlx::query_scalar(*probe).fetch_one(&mut *conn).await.map_err(&err)?;
                            if n > 0 {
                                continue;
                            }
                        }
                        conn.execute(*stmt).await.map_err(&err)?;
                    }
                    sqlx::query(sqlx::AssertSqlSafe(record.clone()))
                        .bind(m.version)
                        .bind(m.description)
                        .execute(&mut *conn)
                        .await
                        .map_err(&err)?;
                    Ok(())
                }
                .await;
                if d == Dialect::Postgres {
                    let end = if applied.is_ok() { "COMMIT" } else { "ROLLBACK" };
                    let ended = conn.execute(end).await.map(drop).map_err(&err);
                    applied.and(ended)?;
                } else {
                    applied?;
                }
                tracing::info!(version = m.version, broker = d.broker_name(), "schema migrated: {}", m.description);
            }
            Ok(())
        }
        .await;
        // SQLite: a failed upgrade rolls back whole.
        let release = if d == Dialect::Sqlite && result.is_err() { "ROLLBACK" } else { release };
        let released = conn.execute(release).await.map(drop).map_err(&err);
        // The migration's own error matters more than a failed release.
        result.and(released)
    })
}

/// Server name and version, MySQL's `max_allowed_packet` and `auto_increment_increment`.
async fn server_facts(db: &Db, ctx: &Ctx) -> Result<(String, Option<usize>, i64), BrokerError> {
    let err = ctx.err("connect");
    match db {
        #[cfg(feature = "sqlite")]
        Db::Sqlite(p) => {
            let v: String = sqlx::query_scalar("SELECT sqlite_version()")
                .fetch_one(p)
                .await
                .map_err(&err)?;
            Ok((format!("SQLite {v}"), None, 1))
        }
        #[cfg(feature = "postgres")]
        Db::Postgres(p) => {
            let v: String = sqlx::query_scalar("SHOW server_version")
                .fetch_one(p)
                .await
                .map_err(&err)?;
            Ok((format!("PostgreSQL {v}"), None, 1))
        }
        #[cfg(feature = "mysql")]
        Db::MySql(p) => {
            let row = sqlx::query(
                "SELECT VERSION(), CAST(@@max_allowed_packet AS SIGNED), \
                 CAST(@@auto_increment_increment AS SIGNED)",
            )
            .fetch_one(p)
            .await
            .map_err(&err)?;
            let v: String = row.try_get(0).map_err(&err)?;
            let packet: i64 = row.try_get(1).map_err(&err)?;
            let step: i64 = row.try_get(2).map_err(&err)?;
            Ok((
                format!("MySQL {v}"),
                Some(packet.max(0) as usize),
                step.max(1),
            ))
        }
    }
}

#[async_trait]
impl Broker for OrmBroker {
    fn name(&self) -> &'static str {
        self.broker()
    }

    async fn enqueue(&self, message: Message) -> Result<MessageId, BrokerError> {
        self.check_size(&message)?;
        let i = &self.inner;
        let err = i.ctx.err("enqueue");
        let queue = i.settings.queue.as_str();
        let delay = message.delay.map(micros).unwrap_or(0);
        let sql = sqlx::AssertSqlSafe(i.sql.enqueue.clone());
        let tier = dialect::tier(message.priority);
        let id: i64 = match &i.db {
            #[cfg(feature = "mysql")]
            Db::MySql(p) => sqlx::query(sql)
                .bind(queue)
                .bind(&message.payload[..])
                .bind(tier)
                .bind(delay)
                .execute(p)
                .await
                .map_err(&err)?
                .last_insert_id() as i64,
            #[cfg(feature = "postgres")]
            // One statement, one round trip: the insert and its notification (sent at commit).
            Db::Postgres(p) => {
                let (id, tier, due): (i64, i32, i64) = sqlx::query_as(sql)
                    .bind(queue)
                    .bind(&message.payload[..])
                    .bind(tier)
                    .bind(delay)
                    .bind(LISTEN_CHANNEL)
                    .bind(queue)
                    .fetch_one(p)
                    .await
                    .map_err(&err)?;
                i.floor.lower((tier, due, id));
                id
            }
            #[allow(unreachable_patterns)]
            other => on_db!(other, p => sqlx::query_scalar(sql)
                .bind(queue)
                .bind(&message.payload[..])
                .bind(tier)
                .bind(delay)
                .fetch_one(p)
                .await
                .map_err(&err)?),
        };
        i.wake.notify_waiters();
        Ok(MessageId(id.to_string()))
    }

    /// All or nothing: the batch goes in one transaction, and every size is checked first.
    async fn enqueue_many(&self, messages: Vec<Message>) -> Result<Vec<MessageId>, BrokerError> {
        for m in &messages {
            self.check_size(m)?;
        }
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let i = &self.inner;
        let err = i.ctx.err("enqueue_many");
        let queue = i.settings.queue.as_str();
        // Keep each statement well inside MySQL's packet and every backend's bind limits.
        // Half the package limit per statement leaves room for the other bound values (a row
        // bigger than that goes alone, and fits: the limit itself is under the packet size).
        let byte_budget = i.max_message_size / 2;
        let mut chunks: Vec<&[Message]> = Vec::new();
        let (mut start, mut bytes) = (0, 0);
        for (n, m) in messages.iter().enumerate() {
            if n > start && (n - start >= INSERT_CHUNK || bytes + m.payload.len() > byte_budget) {
                chunks.push(&messages[start..n]);
                start = n;
                bytes = 0;
            }
            bytes += m.payload.len();
        }
        chunks.push(&messages[start..]);
        let mut ids: Vec<i64> = Vec::with_capacity(messages.len());
        let mut lowest = (i32::MAX, i64::MAX, i64::MAX);
        on_db!(&i.db, p => {
            let mut tx = p.begin().await.map_err(&err)?;
            for chunk in chunks {
                let mut qb = QueryBuilder::new(i.sql.insert_head);
                qb.push_values(chunk, |mut b, m| {
                    b.push_bind(queue)
                        .push_bind(&m.payload[..])
                        .push_bind(dialect::tier(m.priority))
                        .push(format!("{} + ", i.sql.now))
                        .push_bind_unseparated(m.delay.map(micros).unwrap_or(0))
                        .push("0")
                        .push("0")
                        .push("0")
                        .push(i.sql.now);
                });
                if i.ctx.dialect == Dialect::MySql {
                    let done = qb.build().execute(&mut *tx).await.map_err(&err)?;
                    let first = done.last_id();
                    // A multi-row INSERT of known size takes evenly spaced auto-increment values
                    // (`auto_increment_increment` apart: more than 1 on Galera/multi-primary).
                    let step = i.id_step;
                    ids.extend((0..chunk.len() as i64).map(|k| first + k * step));
                } else {
                    qb.push(" RETURNING id, tier, due_at");
                    let got: Vec<(i64, i32, i64)> = qb
                        .build_query_as()
                        .fetch_all(&mut *tx)
                        .await
                        .map_err(&err)?;
                    for (id, tier, due) in got {
                        ids.push(id);
                        lowest = lowest.min((tier, due, id));
                    }
                }
            }
            // The notification carries the lowest claim key of the batch (`floor`).
            #[cfg(feature = "postgres")]
            if i.ctx.dialect == Dialect::Postgres {
                sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(LISTEN_CHANNEL)
                    .bind(floor::notice(lowest, queue))
                    .execute(&mut *tx)
                    .await
                    .map_err(&err)?;
            }
            tx.commit().await.map_err(&err)?;
        });
        ids.sort_unstable();
        i.floor.lower(lowest);
        i.wake.notify_waiters();
        Ok(ids
            .into_iter()
            .map(|id| MessageId(id.to_string()))
            .collect())
    }

    async fn dequeue(&self) -> Result<Vec<Delivery>, BrokerError> {
        let s = &self.inner.settings;
        let deadline = Instant::now() + s.wait;
        loop {
            // Register for a wake-up before looking, so an enqueue between the look and the
            // wait is not missed.
            let woken = self.inner.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let got = self.claim().await?;
            let now = Instant::now();
            if !got.is_empty() || now >= deadline {
                return Ok(got);
            }
            let nap = s.poll.min(deadline - now);
            let _ = tokio::time::timeout(nap, woken).await;
        }
    }

    async fn acknowledge(&self, ack: &AckId) -> Result<(), BrokerError> {
        let (id, n) = parse_ack(ack, self.broker())?;
        let i = &self.inner;
        let sql = sqlx::AssertSqlSafe(i.sql.ack.clone());
        on_db!(&i.db, p => sqlx::query(sql)
            .bind(id)
            .bind(i.settings.queue.as_str())
            .bind(n)
            .execute(p)
            .await
            .map_err(i.ctx.err("acknowledge"))?.rows_affected());
        Ok(())
    }

    /// One statement for the whole batch.
    async fn acknowledge_many(&self, acks: &[AckId]) -> Result<(), BrokerError> {
        if acks.is_empty() {
            return Ok(());
        }
        let parsed = acks
            .iter()
            .map(|a| parse_ack(a, self.broker()))
            .collect::<Result<Vec<_>, _>>()?;
        let i = &self.inner;
        let err = i.ctx.err("acknowledge");
        for chunk in parsed.chunks(MAX_BULK) {
            on_db!(&i.db, p => {
                // Keep the planner on the primary key: with a long id list it would otherwise
                // also read the claim index for `queue = ...` (on PostgreSQL a BitmapAnd whose
                // bitmap walks every entry of the queue, live and dead: with a large backlog the
                // acknowledgement then costs more than the task). `+queue` (SQLite) and
                // `queue || ''` (PostgreSQL) are not index conditions; MySQL picks the primary
                // key by itself.
                let head = match i.ctx.dialect {
                    Dialect::Sqlite => "DELETE FROM qcluster_queue WHERE +queue = ",
                    Dialect::Postgres => "DELETE FROM qcluster_queue WHERE queue || '' = ",
                    Dialect::MySql => "DELETE FROM qcluster_queue WHERE queue = ",
                };
                let mut qb = QueryBuilder::new(head);
                qb.push_bind(i.settings.queue.as_str()).push(" AND leased = 1 AND id IN (");
                let mut ids = qb.separated(", ");
                for (id, _) in chunk {
                    ids.push_bind(*id);
                }
                qb.push(") AND (");
                for (k, (id, n)) in chunk.iter().enumerate() {
                    if k > 0 {
                        qb.push(" OR ");
                    }
                    qb.push("(id = ").push_bind(*id).push(" AND deliveries = ").push_bind(*n).push(")");
                }
                qb.push(")");
                qb.build().execute(p).await.map_err(&err)?;
            });
        }
        Ok(())
    }

    async fn fail(&self, ack: &AckId) -> Result<(), BrokerError> {
        self.fail_after(ack, Duration::ZERO).await
    }

    async fn fail_after(&self, ack: &AckId, delay: Duration) -> Result<(), BrokerError> {
        let (id, n) = parse_ack(ack, self.broker())?;
        let i = &self.inner;
        let sql = sqlx::AssertSqlSafe(i.sql.fail.clone());
        let err = i.ctx.err("fail");
        let back: Option<(i32, i64)> = match &i.db {
            #[cfg(feature = "mysql")]
            Db::MySql(p) => {
                sqlx::query(sql)
                    .bind(micros(delay))
                    .bind(id)
                    .bind(i.settings.queue.as_str())
                    .bind(n)
                    .execute(p)
                    .await
                    .map_err(&err)?;
                None
            }
            // The row's new claim key lowers this handle's floor (see `floor`).
            #[allow(unreachable_patterns)]
            other => on_db!(other, p => sqlx::query_as(sql)
                .bind(micros(delay))
                .bind(id)
                .bind(i.settings.queue.as_str())
                .bind(n)
                .fetch_optional(p)
                .await
                .map_err(&err)?),
        };
        if let Some((tier, due)) = back {
            i.floor.lower((tier, due, id));
        }
        if delay.is_zero() {
            i.wake.notify_waiters();
        }
        Ok(())
    }

    /// Moves the row's visibility to `now + by` (the database's clock) if this receipt still
    /// holds the lease; a stale receipt matches no row.
    async fn extend(&self, ack: &AckId, by: Duration) -> Result<bool, BrokerError> {
        let (id, n) = parse_ack(ack, self.broker())?;
        let i = &self.inner;
        let sql = sqlx::AssertSqlSafe(i.sql.extend.clone());
        let rows = on_db!(&i.db, p => sqlx::query(sql)
            .bind(micros(by.min(broker_core::MAX_RETRY)))
            .bind(id)
            .bind(i.settings.queue.as_str())
            .bind(n)
            .execute(p)
            .await
            .map_err(i.ctx.err("extend"))?.rows_affected());
        // sqlx asks MySQL for matched rows (CLIENT_FOUND_ROWS), so 1 means the lease is held
        // even when the new deadline equals the old one.
        Ok(rows == 1)
    }

    async fn delete(&self, ack: &AckId) -> Result<(), BrokerError> {
        let (id, _) = parse_ack(ack, self.broker())?;
        let i = &self.inner;
        let sql = sqlx::AssertSqlSafe(i.sql.delete.clone());
        on_db!(&i.db, p => sqlx::query(sql)
            .bind(id)
            .bind(i.settings.queue.as_str())
            .execute(p)
            .await
            .map_err(i.ctx.err("delete"))?.rows_affected());
        Ok(())
    }

    /// Copies the row to `qcluster_dead` and deletes it, in one transaction, if this receipt still
    /// holds the lease (a stale receipt must not pull a package from under its new holder).
    async fn dead_letter(&self, ack: &AckId, reason: &str) -> Result<(), BrokerError> {
        let (id, n) = parse_ack(ack, self.broker())?;
        let i = &self.inner;
        let err = i.ctx.err("dead_letter");
        let queue = i.settings.queue.as_str();
        let moved = on_db!(&i.db, p => {
            let mut tx = p.begin().await.map_err(&err)?;
            let copied = sqlx::query(sqlx::AssertSqlSafe(i.sql.dead_copy.clone()))
                .bind(reason)
                .bind(id)
                .bind(queue)
                .bind(n)
                .execute(&mut *tx)
                .await
                .map_err(&err)?
                .rows_affected();
            if copied == 1 {
                sqlx::query(sqlx::AssertSqlSafe(i.sql.dead_delete.clone()))
                    .bind(id)
                    .bind(queue)
                    .bind(n)
                    .execute(&mut *tx)
                    .await
                    .map_err(&err)?;
                tx.commit().await.map_err(&err)?;
            } else {
                tx.rollback().await.map_err(&err)?;
            }
            copied == 1
        });
        if moved {
            tracing::warn!(
                queue,
                message_id = id,
                reason,
                "package moved to dead letters"
            );
        } else {
            tracing::debug!(
                queue,
                message_id = id,
                "dead_letter with a stale receipt ignored"
            );
        }
        Ok(())
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, BrokerError> {
        let i = &self.inner;
        let err = i.ctx.err("dead_letters");
        let sql = sqlx::AssertSqlSafe(i.sql.dead_list.clone());
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        on_db!(self.read_db(), p => {
            let rows = sqlx::query(sql)
                .bind(i.settings.queue.as_str())
                .bind(limit)
                .fetch_all(p)
                .await
                .map_err(&err)?;
            let mut out = Vec::with_capacity(rows.len());
            for r in &rows {
                let id: i64 = r.try_get(0).map_err(&err)?;
                let n: i32 = r.try_get(3).map_err(&err)?;
                out.push(DeadLetter {
                    message_id: MessageId(id.to_string()),
                    payload: r.try_get(1).map_err(&err)?,
                    reason: r.try_get(2).map_err(&err)?,
                    deliveries: Some(n.max(0) as u32),
                    dead_at_us: r.try_get(4).map_err(&err)?,
                });
            }
            Ok(out)
        })
    }

    /// One transaction: lock the dead letter (PostgreSQL, MySQL), insert it into the queue as a
    /// fresh package, delete the dead letter; commit only if both touched the same rows. A
    /// concurrent requeue of the same id waits for the lock and then finds nothing (`false`).
    async fn requeue_dead(&self, id: &MessageId) -> Result<bool, BrokerError> {
        let Ok(mid) = id.0.parse::<i64>() else {
            return Ok(false);
        };
        let i = &self.inner;
        let err = i.ctx.err("requeue_dead");
        let queue = i.settings.queue.as_str();
        let (moved, tier) = on_db!(&i.db, p => {
            let mut tx = p.begin().await.map_err(&err)?;
            // The dead letter's tier, locked (SQLite: the write lock of the transaction serves,
            // and the floor the tier is for is PostgreSQL's alone).
            let tier: Option<i32> = match &i.sql.dead_lock {
                Some(sql) => sqlx::query_scalar(sqlx::AssertSqlSafe(sql.clone()))
                    .bind(queue)
                    .bind(mid)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(&err)?,
                None => Some(0),
            };
            let present = tier.is_some();
            let mut moved = false;
            if present {
                let inserted = sqlx::query(sqlx::AssertSqlSafe(i.sql.dead_requeue.clone()))
                    .bind(queue)
                    .bind(mid)
                    .execute(&mut *tx)
                    .await
                    .map_err(&err)?
                    .rows_affected();
                let removed = sqlx::query(sqlx::AssertSqlSafe(i.sql.dead_remove.clone()))
                    .bind(queue)
                    .bind(mid)
                    .execute(&mut *tx)
                    .await
                    .map_err(&err)?
                    .rows_affected();
                moved = inserted > 0 && inserted == removed;
            }
            #[cfg(feature = "postgres")]
            if moved && i.ctx.dialect == Dialect::Postgres {
                // A fresh package due now: the start of its tier covers it.
                sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(LISTEN_CHANNEL)
                    .bind(floor::notice((tier.unwrap_or(0), i64::MIN, i64::MIN), queue))
                    .execute(&mut *tx)
                    .await
                    .map_err(&err)?;
            }
            if moved {
                tx.commit().await.map_err(&err)?;
            } else {
                tx.rollback().await.map_err(&err)?;
            }
            (moved, tier.unwrap_or(0))
        });
        if moved {
            i.floor.lower((tier, i64::MIN, i64::MIN));
            i.wake.notify_waiters();
            tracing::info!(queue, message_id = mid, "dead letter requeued");
        }
        Ok(moved)
    }

    async fn delete_dead(&self, id: &MessageId) -> Result<bool, BrokerError> {
        let Ok(mid) = id.0.parse::<i64>() else {
            return Ok(false);
        };
        let i = &self.inner;
        let sql = sqlx::AssertSqlSafe(i.sql.dead_remove.clone());
        let n = on_db!(&i.db, p => sqlx::query(sql)
            .bind(i.settings.queue.as_str())
            .bind(mid)
            .execute(p)
            .await
            .map_err(i.ctx.err("delete_dead"))?
            .rows_affected());
        if n > 0 {
            tracing::info!(
                queue = i.settings.queue.as_str(),
                message_id = mid,
                "dead letter deleted"
            );
        }
        Ok(n > 0)
    }

    async fn dead_letter_size(&self) -> Result<Option<u64>, BrokerError> {
        let n = self
            .count(
                self.read_db(),
                &self.inner.sql.dead_size,
                "dead_letter_size",
            )
            .await?;
        Ok(Some(n))
    }

    async fn purge_queue(&self) -> Result<u64, BrokerError> {
        let i = &self.inner;
        let sql = sqlx::AssertSqlSafe(i.sql.purge.clone());
        let n = on_db!(&i.db, p => sqlx::query(sql)
            .bind(i.settings.queue.as_str())
            .execute(p)
            .await
            .map_err(i.ctx.err("purge_queue"))?
            .rows_affected());
        Ok(n)
    }

    async fn delete_queue(&self) -> Result<(), BrokerError> {
        let i = &self.inner;
        let err = i.ctx.err("delete_queue");
        let queue = i.settings.queue.as_str();
        on_db!(&i.db, p => {
            let mut tx = p.begin().await.map_err(&err)?;
            for sql in [&i.sql.drop_queue, &i.sql.drop_dead] {
                sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                    .bind(queue)
                    .execute(&mut *tx)
                    .await
                    .map_err(&err)?;
            }
            tx.commit().await.map_err(&err)?;
        });
        Ok(())
    }

    async fn queue_size(&self) -> Result<u64, BrokerError> {
        self.count(self.read_db(), &self.inner.sql.queue_size, "queue_size")
            .await
    }

    async fn lock_size(&self) -> Result<Option<u64>, BrokerError> {
        let n = self
            .count(self.read_db(), &self.inner.sql.lock_size, "lock_size")
            .await?;
        Ok(Some(n))
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        let i = &self.inner;
        let pinging = async {
            on_db!(&i.db, p => p.execute("SELECT 1").await.map(|_| ()).map_err(i.ctx.err("ping")))
        };
        match tokio::time::timeout(i.ctx.timeout + Duration::from_millis(500), pinging).await {
            Ok(r) => r,
            Err(_) => Err(BrokerError::Timeout {
                broker: self.broker(),
                operation: "ping",
                endpoint: i.ctx.endpoint.clone(),
                after: i.ctx.timeout,
            }),
        }
    }

    async fn info(&self) -> Result<BrokerInfo, BrokerError> {
        let i = &self.inner;
        let mut details = BTreeMap::new();
        details.insert("table".into(), "qcluster_queue".into());
        details.insert("dead_letter_table".into(), "qcluster_dead".into());
        details.insert("pool_size".into(), i.pool_size.to_string());
        details.insert("bulk".into(), i.settings.bulk.to_string());
        details.insert("poll_ms".into(), i.settings.poll.as_millis().to_string());
        details.insert("max_message_size".into(), i.max_message_size.to_string());
        if let Some(r) = &i.replica_endpoint {
            details.insert("replica".into(), r.clone());
        }
        let wake_up = match i.ctx.dialect {
            Dialect::Postgres if i.listening.load(Ordering::Relaxed) => {
                "LISTEN/NOTIFY (poll as fallback)"
            }
            Dialect::Postgres => "poll (LISTEN connection down, reconnecting)",
            _ => "poll (and in-process wake-up)",
        };
        details.insert("wake_up".into(), wake_up.into());
        let upkeep = upkeep::read(&i.db, "qcluster_queue").await;
        details.extend(upkeep.details);
        Ok(BrokerInfo {
            broker: self.broker().into(),
            server: Some(i.server.clone()),
            endpoint: i.ctx.endpoint.clone(),
            queue: i.settings.queue.clone(),
            receipts: true,
            retry_secs: Some(i.settings.retry.as_secs_f64()),
            notes: vec![
                "at least once: a package not acknowledged within `retry` is delivered again".into(),
                "acknowledge deletes the row; fail makes it ready again with its delivery count raised".into(),
                "claims are atomic: a package is leased to one consumer at a time".into(),
                "a requeued dead letter comes back as a first delivery, due now, at its priority".into(),
            ]
            .into_iter()
            .chain((i.ctx.dialect == Dialect::Postgres).then(|| {
                "claims resume where the last one ended: a package that becomes ready behind that \
                 point (a lease run out, a delayed package of higher priority coming due) is \
                 found within a second"
                    .into()
            }))
            .chain(upkeep.warnings)
            .collect(),
            details,
        })
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            receipts: true,
            atomic: true,
            max_bulk: MAX_BULK,
            max_message_size: self.inner.max_message_size,
            text_only: false,
            dead_letter: true,
            priority: true,
            delay: true,
            stats: true,
            extend: true,
        }
    }

    async fn set_stat(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), BrokerError> {
        let i = &self.inner;
        let err = i.ctx.err("set_stat");
        on_db!(&i.db, p => {
            sqlx::query(sqlx::AssertSqlSafe(i.sql.prune_stats.clone()))
                .execute(p)
                .await
                .map_err(&err)?;
            sqlx::query(sqlx::AssertSqlSafe(i.sql.set_stat.clone()))
                .bind(key)
                .bind(value)
                .bind(micros(ttl))
                .execute(p)
                .await
                .map_err(&err)?;
        });
        Ok(())
    }

    async fn get_stats(&self, prefix: &str) -> Result<Vec<Stat>, BrokerError> {
        let i = &self.inner;
        let err = i.ctx.err("get_stats");
        let sql = sqlx::AssertSqlSafe(i.sql.get_stats.clone());
        let rows: Vec<(String, Vec<u8>)> = on_db!(self.read_db(), p => sqlx::query_as(sql)
            .bind(like_prefix(prefix))
            .fetch_all(p)
            .await
            .map_err(&err)?);
        // SQLite's LIKE ignores ASCII case: the exact prefix test is made here.
        Ok(rows
            .into_iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(key, value)| Stat { key, value })
            .collect())
    }
}

/// The first id of the last insert, where the driver reports it (MySQL).
trait LastId {
    fn last_id(&self) -> i64;
}

#[cfg(feature = "mysql")]
impl LastId for sqlx::mysql::MySqlQueryResult {
    fn last_id(&self) -> i64 {
        self.last_insert_id() as i64
    }
}

#[cfg(feature = "sqlite")]
impl LastId for sqlx::sqlite::SqliteQueryResult {
    fn last_id(&self) -> i64 {
        self.last_insert_rowid()
    }
}

#[cfg(feature = "postgres")]
impl LastId for sqlx::postgres::PgQueryResult {
    fn last_id(&self) -> i64 {
        0
    }
}

/// One wake-up per database URL in this process: an enqueue through any handle (a producer's
/// client, another cluster in the same process) wakes every consumer waiting on that database.
fn shared_wake(url: &str) -> Arc<Notify> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock, Weak};
    static WAKES: OnceLock<Mutex<HashMap<String, Weak<Notify>>>> = OnceLock::new();
    let mut map = WAKES
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    map.retain(|_, w| w.strong_count() > 0);
    if let Some(w) = map.get(url).and_then(Weak::upgrade) {
        return w;
    }
    let w = Arc::new(Notify::new());
    map.insert(url.to_owned(), Arc::downgrade(&w));
    w
}
