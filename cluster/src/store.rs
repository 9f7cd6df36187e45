//! The result store: `qcluster_task` on SQLite, PostgreSQL or MySQL/MariaDB, and
//! `qcluster_status` for the status of clusters whose broker cannot hold it.
//!
//! Results are written in batches (one multi-row upsert per batch). A success is never
//! overwritten by a later failure of a duplicate run. Times are microseconds since the epoch.
//!
//! `qcluster_status` holds one row per running cluster (`name` = its status key, `body` = its
//! status as JSON, `expires`): rows past `expires` are never read, and are deleted by the next
//! write, so a cluster killed without a word disappears from `info` once its row expires.

use std::collections::HashSet;
use std::time::Duration;

use broker_core::{TaskId, mask_url, now_us, redact, url_password};
use serde::Serialize;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use crate::error::{Error, StoreFault};

mod browse;
mod schedules;

pub use browse::{Browse, Outcome};
pub use schedules::{BadRow, ScheduleRow};

/// The SQL backend behind a store URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Sqlite,
    Postgres,
    MySql,
}

impl Dialect {
    fn from_url(url: &str) -> Option<Self> {
        match url.split(':').next()?.to_ascii_lowercase().as_str() {
            "sqlite" => Some(Self::Sqlite),
            "postgres" | "postgresql" => Some(Self::Postgres),
            "mysql" | "mariadb" => Some(Self::MySql),
            _ => None,
        }
    }
}

/// Connection failures and lock conflicts pass; data errors are the row's; the rest is the store's.
fn fault(dialect: Dialect, e: &sqlx::Error) -> StoreFault {
    if transient(dialect, e) {
        return StoreFault::Transient;
    }
    let sqlx::Error::Database(d) = e else {
        return StoreFault::Store;
    };
    let code = d.code().map(|c| c.into_owned()).unwrap_or_default();
    let row = match dialect {
        // SQLITE_TOOBIG, SQLITE_CONSTRAINT, SQLITE_MISMATCH.
        Dialect::Sqlite => code
            .parse::<i32>()
            .is_ok_and(|c| matches!(c & 0xff, 18..=20)),
        // SQLSTATE class 22 (data exception) and 23 (integrity constraint).
        Dialect::Postgres | Dialect::MySql => code.starts_with("22") || code.starts_with("23"),
    };
    if row {
        StoreFault::Row
    } else {
        StoreFault::Store
    }
}

/// A unique-key violation (the row exists), as opposed to other data errors.
fn unique_violation(dialect: Dialect, e: &sqlx::Error) -> bool {
    let sqlx::Error::Database(d) = e else {
        return false;
    };
    let code = d.code().map(|c| c.into_owned()).unwrap_or_default();
    match dialect {
        // SQLITE_CONSTRAINT_PRIMARYKEY, SQLITE_CONSTRAINT_UNIQUE.
        Dialect::Sqlite => matches!(code.as_str(), "1555" | "2067"),
        Dialect::Postgres => code == "23505",
        Dialect::MySql => code == "23000" && d.message().contains("Duplicate"),
    }
}

/// Connection failures and lock conflicts.
fn transient(dialect: Dialect, e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => {
            let code = d.code().map(|c| c.into_owned()).unwrap_or_default();
            match dialect {
                // SQLITE_BUSY, SQLITE_LOCKED and their extended codes.
                Dialect::Sqlite => code.parse::<i32>().is_ok_and(|c| matches!(c & 0xff, 5 | 6)),
                // Serialization failure, deadlock, lock not available, shutdown, connection.
                Dialect::Postgres => {
                    code.starts_with("40")
                        || code.starts_with("08")
                        || code.starts_with("57P")
                        || code == "55P03"
                }
                // Lock wait timeout, deadlock, server gone.
                Dialect::MySql => {
                    code == "40001"
                        || d.message().contains("Deadlock")
                        || d.message().contains("Lock wait timeout")
                }
            }
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        _ => false,
    }
}

/// Rows per upsert statement (well under every backend's bound-parameter limit).
const ROWS_PER_STATEMENT: usize = 200;
const COLUMNS: usize = 13;

/// One task's outcome.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskRecord {
    /// Task id.
    pub id: TaskId,
    /// Human name (`name` option, else the function).
    pub name: String,
    /// Registered function.
    pub func: String,
    /// Arguments as JSON text.
    pub args: String,
    /// The result as JSON text, or the failure message as a JSON string.
    pub result: Option<String>,
    /// When the task was enqueued, µs since the epoch.
    pub enqueued_us: i64,
    /// When the run started, µs since the epoch.
    pub started_us: i64,
    /// When the run stopped, µs since the epoch.
    pub stopped_us: i64,
    /// True when it succeeded.
    pub success: bool,
    /// True when no further attempt will run (a success, or a failure that is final).
    pub done: bool,
    /// Attempts made, this one included.
    pub attempts: u32,
    /// The group it belongs to.
    pub group: Option<String>,
    /// The cluster that ran it.
    pub cluster: String,
}

impl TaskRecord {
    /// The JSON view the CLI prints: ids and times as text, `args` and `result` as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let json = |s: &str| {
            serde_json::from_str(s).unwrap_or_else(|_| serde_json::Value::String(s.to_owned()))
        };
        serde_json::json!({
            "id": self.id.to_string(),
            "name": self.name,
            "func": self.func,
            "args": json(&self.args),
            "result": self.result.as_deref().map(json),
            "success": self.success,
            "done": self.done,
            "attempts": self.attempts,
            "group": self.group,
            "cluster": self.cluster,
            "enqueued": rfc3339(self.enqueued_us),
            "started": rfc3339(self.started_us),
            "stopped": rfc3339(self.stopped_us),
            "duration_ms": (self.stopped_us >= self.started_us)
                .then(|| (self.stopped_us - self.started_us) as f64 / 1000.0),
            "running": self.stopped_us == 0 && !self.done,
        })
    }
}

/// Formats µs since the epoch as RFC 3339 UTC.
pub fn rfc3339(us: i64) -> String {
    // humantime formats years up to 9999 only (and panics past them through `to_string`).
    const MAX_US: i64 = 253_402_300_799_999_999;
    if !(0..=MAX_US).contains(&us) {
        return format!("{us} µs since the epoch");
    }
    let t = std::time::UNIX_EPOCH + Duration::from_micros(us as u64);
    humantime::format_rfc3339_micros(t).to_string()
}

/// Counts of stored results.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Successful results held.
    pub success: u64,
    /// Failed results held.
    pub failure: u64,
}

/// A connection pool on the result store.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    dialect: Dialect,
    endpoint: String,
    password: Option<String>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Connects to `url` within `timeout` and creates the table if it is missing.
    pub async fn connect(url: &str, timeout: Duration) -> Result<Self, Error> {
        sqlx::any::install_default_drivers();
        let endpoint = mask_url(url);
        let dialect = Dialect::from_url(url).ok_or_else(|| {
            crate::ConfigError::new(
                "store.url",
                format!("`{endpoint}` is not a sqlite://, postgres:// or mysql:// URL"),
            )
        })?;
        let mut url = url.to_owned();
        let mut max = 8;
        if dialect == Dialect::Sqlite {
            // One writer anyway; more connections only contend for the lock.
            max = 1;
            if !url.contains("mode=") && !url.contains(":memory:") {
                url.push_str(if url.contains('?') {
                    "&mode=rwc"
                } else {
                    "?mode=rwc"
                });
            }
        }
        let password = url_password(&url);
        let fail = |message: String| Error::Store {
            endpoint: endpoint.clone(),
            message: redact(&message, password.as_deref()),
            fault: StoreFault::Transient,
        };
        let sqlite = dialect == Dialect::Sqlite;
        let pool = tokio::time::timeout(
            timeout + Duration::from_millis(500),
            AnyPoolOptions::new()
                .max_connections(max)
                .acquire_timeout(timeout)
                // SQLite: the write-ahead log (as the SQL broker sets on its file), and with it
                // `synchronous = NORMAL`, which syncs at checkpoints rather than at every
                // commit: as safe against a crash of the process, only a power cut may lose
                // the last commits. With a rollback journal and `FULL`, every saved batch and
                // run claim waits for several fsyncs while the single connection is held, and
                // on a busy disk the workers' reads queue behind it past the acquire timeout.
                // Switching to WAL cannot wait for a lock: if another process is switching the
                // file at the same moment, this connection keeps what the file has.
                .after_connect(move |conn, _meta| {
                    Box::pin(async move {
                        if sqlite {
                            let _ = sqlx::query("PRAGMA journal_mode = WAL")
                                .execute(&mut *conn)
                                .await;
                            let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
                                .fetch_one(&mut *conn)
                                .await?;
                            if mode.eq_ignore_ascii_case("wal") {
                                sqlx::query("PRAGMA synchronous = NORMAL")
                                    .execute(&mut *conn)
                                    .await?;
                            }
                        }
                        Ok(())
                    })
                })
                .connect(&url),
        )
        .await
        .map_err(|_| fail(format!("connect: no answer within {timeout:?}")))?
        .map_err(|e| fail(format!("connect: {e}")))?;
        let store = Self {
            pool,
            dialect,
            endpoint,
            password,
        };
        store.create_schema().await?;
        Ok(store)
    }

    /// The store URL with the password masked.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn err(&self, message: String) -> Error {
        Error::Store {
            endpoint: self.endpoint.clone(),
            message: redact(&message, self.password.as_deref()),
            fault: StoreFault::Store,
        }
    }

    fn sql_err(&self, op: &'static str) -> impl Fn(sqlx::Error) -> Error + '_ {
        move |e| {
            let fault = fault(self.dialect, &e);
            match self.err(format!("{op}: {e}")) {
                Error::Store {
                    endpoint, message, ..
                } => Error::Store {
                    endpoint,
                    message,
                    fault,
                },
                other => other,
            }
        }
    }

    /// `?` placeholders, renumbered as `$n` for PostgreSQL.
    fn render(&self, sql: &str) -> String {
        if self.dialect != Dialect::Postgres {
            return sql.to_owned();
        }
        let mut out = String::with_capacity(sql.len() + 16);
        let mut n = 0;
        for c in sql.chars() {
            if c == '?' {
                n += 1;
                out.push('$');
                out.push_str(&n.to_string());
            } else {
                out.push(c);
            }
        }
        out
    }

    async fn create_schema(&self) -> Result<(), Error> {
        let mysql = self.dialect == Dialect::MySql;
        let text = if mysql { "LONGTEXT" } else { "TEXT" };
        let mysql_indexes = if mysql {
            ",\n                INDEX qcluster_task_grp (grp),\n                INDEX qcluster_task_kept (cluster, success, stopped)"
        } else {
            ""
        };
        let engine = if mysql {
            " ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
        } else {
            ""
        };
        let table = format!(
            "CREATE TABLE IF NOT EXISTS qcluster_task (
                id VARCHAR(36) NOT NULL PRIMARY KEY,
                name VARCHAR(191) NOT NULL,
                func VARCHAR(191) NOT NULL,
                args {text} NOT NULL,
                result {text},
                enqueued BIGINT NOT NULL,
                started BIGINT NOT NULL,
                stopped BIGINT NOT NULL,
                success BIGINT NOT NULL,
                done BIGINT NOT NULL,
                attempts BIGINT NOT NULL,
                grp VARCHAR(191),
                cluster VARCHAR(191) NOT NULL{mysql_indexes}
            ){engine}"
        );
        // MySQL has no CREATE INDEX IF NOT EXISTS: its indexes are declared in the table.
        let indexes: &[&str] = if self.dialect == Dialect::MySql {
            &[]
        } else {
            &[
                "CREATE INDEX IF NOT EXISTS qcluster_task_grp ON qcluster_task (grp)",
                "CREATE INDEX IF NOT EXISTS qcluster_task_kept ON qcluster_task (cluster, success, stopped)",
            ]
        };
        let status = format!(
            "CREATE TABLE IF NOT EXISTS qcluster_status (
                name VARCHAR(191) NOT NULL PRIMARY KEY,
                body {text} NOT NULL,
                expires BIGINT NOT NULL
            ){engine}"
        );
        // Two clusters starting at once on PostgreSQL can collide on the catalog: try again.
        let stmts: Vec<String> = [table, status]
            .into_iter()
            .chain(indexes.iter().map(|s| (*s).to_owned()))
            .chain(schedules::ddl(self.dialect, text, engine))
            .collect();
        let mut last = None;
        for _ in 0..5 {
            let mut ok = true;
            for stmt in &stmts {
                if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(stmt.clone()))
                    .execute(&self.pool)
                    .await
                {
                    last = Some(e);
                    ok = false;
                    break;
                }
            }
            if ok {
                return self.create_browse_indexes().await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(self.err(format!(
            "create tables qcluster_task, qcluster_status, qcluster_schedule: {}",
            last.map(|e| e.to_string()).unwrap_or_default()
        )))
    }

    /// Saves records in one transaction. A stored success is never replaced by a failure.
    pub async fn save(&self, records: &[TaskRecord]) -> Result<(), Error> {
        if records.is_empty() {
            return Ok(());
        }
        // No transaction: each statement is atomic and rows are independent; one statement per
        // batch of up to 200 rows is one commit.
        for chunk in records.chunks(ROWS_PER_STATEMENT) {
            let row = format!("({})", vec!["?"; COLUMNS].join(", "));
            let values = vec![row.as_str(); chunk.len()].join(", ");
            let head = "INSERT INTO qcluster_task (id, name, func, args, result, enqueued, \
                        started, stopped, attempts, grp, cluster, done, success) VALUES ";
            let tail = match self.dialect {
                Dialect::MySql => {
                    " ON DUPLICATE KEY UPDATE \
                     name = IF(success = 1, name, VALUES(name)), \
                     result = IF(success = 1, result, VALUES(result)), \
                     started = IF(success = 1, started, VALUES(started)), \
                     stopped = IF(success = 1, stopped, VALUES(stopped)), \
                     attempts = IF(success = 1, attempts, VALUES(attempts)), \
                     cluster = IF(success = 1, cluster, VALUES(cluster)), \
                     done = IF(success = 1, done, VALUES(done)), \
                     success = IF(success = 1, success, VALUES(success))"
                }
                _ => {
                    " ON CONFLICT (id) DO UPDATE SET name = excluded.name, \
                     result = excluded.result, started = excluded.started, \
                     stopped = excluded.stopped, attempts = excluded.attempts, \
                     cluster = excluded.cluster, done = excluded.done, \
                     success = excluded.success \
                     WHERE qcluster_task.success = 0"
                }
            };
            let sql = self.render(&format!("{head}{values}{tail}"));
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for r in chunk {
                q = q
                    .bind(r.id.to_string())
                    .bind(r.name.clone())
                    .bind(r.func.clone())
                    .bind(r.args.clone())
                    .bind(r.result.clone())
                    .bind(r.enqueued_us)
                    .bind(r.started_us)
                    .bind(r.stopped_us)
                    .bind(i64::from(r.attempts))
                    .bind(r.group.clone())
                    .bind(r.cluster.clone())
                    .bind(i64::from(r.done))
                    .bind(i64::from(r.success));
            }
            q.execute(&self.pool).await.map_err(self.sql_err("save"))?;
        }
        Ok(())
    }

    /// Deletes the oldest successes of `cluster` beyond the newest `keep`, sparing those that
    /// stopped after `spare_after_us` (they still guard against duplicate deliveries).
    pub async fn prune(&self, cluster: &str, keep: u64, spare_after_us: i64) -> Result<u64, Error> {
        let cutoff: Option<i64> = sqlx::query(sqlx::AssertSqlSafe(self.render(
            "SELECT stopped FROM qcluster_task WHERE cluster = ? AND success = 1 \
             ORDER BY stopped DESC LIMIT 1 OFFSET ?",
        )))
        .bind(cluster.to_owned())
        .bind(keep as i64)
        .fetch_optional(&self.pool)
        .await
        .map_err(self.sql_err("prune"))?
        .map(|r| r.get::<i64, _>(0));
        let Some(cutoff) = cutoff else {
            return Ok(0);
        };
        // Items of an iterator not yet complete (a derived, version-8 id with a group) are
        // spared: the iterator's row is made from them. Its completion clears their group. So
        // is the task of a schedule slot still pending: the slot may be enqueued again, and
        // its result is what makes that copy a duplicate.
        let done = sqlx::query(sqlx::AssertSqlSafe(self.render(
            "DELETE FROM qcluster_task WHERE cluster = ? AND success = 1 AND stopped <= ? \
             AND stopped < ? AND NOT (grp IS NOT NULL AND SUBSTR(id, 15, 1) = '8') \
             AND id NOT IN (SELECT last_task FROM qcluster_schedule \
                            WHERE pending IS NOT NULL AND last_task IS NOT NULL)",
        )))
        .bind(cluster.to_owned())
        .bind(cutoff)
        .bind(spare_after_us)
        .execute(&self.pool)
        .await
        .map_err(self.sql_err("prune"))?;
        Ok(done.rows_affected())
    }

    /// Deletes (or with `dry_run` counts) the final results of `cluster` that stopped before
    /// `before_us`: successes, and failures too with `failures`. The items of an iterator not
    /// yet complete and the task of a schedule slot still pending are kept, as by [`Store::prune`].
    pub async fn prune_older(
        &self,
        cluster: &str,
        before_us: i64,
        failures: bool,
        dry_run: bool,
    ) -> Result<u64, Error> {
        let which = if failures { "" } else { " AND success = 1" };
        let condition = format!(
            "cluster = ? AND done = 1 AND stopped > 0 AND stopped < ?{which} \
             AND NOT (grp IS NOT NULL AND SUBSTR(id, 15, 1) = '8') \
             AND id NOT IN (SELECT last_task FROM qcluster_schedule \
                            WHERE pending IS NOT NULL AND last_task IS NOT NULL)"
        );
        if dry_run {
            let row = sqlx::query(sqlx::AssertSqlSafe(self.render(&format!(
                "SELECT COUNT(*) FROM qcluster_task WHERE {condition}"
            ))))
            .bind(cluster.to_owned())
            .bind(before_us)
            .fetch_one(&self.pool)
            .await
            .map_err(self.sql_err("count old results"))?;
            let n: i64 = row.try_get(0).map_err(self.sql_err("count old results"))?;
            return Ok(n.max(0) as u64);
        }
        let done = sqlx::query(sqlx::AssertSqlSafe(
            self.render(&format!("DELETE FROM qcluster_task WHERE {condition}")),
        ))
        .bind(cluster.to_owned())
        .bind(before_us)
        .execute(&self.pool)
        .await
        .map_err(self.sql_err("prune old results"))?;
        Ok(done.rows_affected())
    }

    const SELECT: &str = "SELECT id, name, func, args, result, enqueued, started, stopped, \
                          success, attempts, grp, cluster, done FROM qcluster_task";

    fn record(&self, row: &AnyRow) -> Result<TaskRecord, Error> {
        let e = self.sql_err("read result");
        let id: String = row.try_get(0).map_err(&e)?;
        Ok(TaskRecord {
            id: id
                .parse()
                .map_err(|x| self.err(format!("stored id `{id}` is not a UUID: {x}")))?,
            name: row.try_get(1).map_err(&e)?,
            func: row.try_get(2).map_err(&e)?,
            args: row.try_get(3).map_err(&e)?,
            result: row.try_get(4).map_err(&e)?,
            enqueued_us: row.try_get(5).map_err(&e)?,
            started_us: row.try_get(6).map_err(&e)?,
            stopped_us: row.try_get(7).map_err(&e)?,
            success: row.try_get::<i64, _>(8).map_err(&e)? != 0,
            attempts: row
                .try_get::<i64, _>(9)
                .map_err(&e)?
                .clamp(0, u32::MAX as i64) as u32,
            group: row.try_get(10).map_err(&e)?,
            cluster: row.try_get(11).map_err(&e)?,
            done: row.try_get::<i64, _>(12).map_err(&e)? != 0,
        })
    }

    /// The stored result of `id`, if any.
    pub async fn get(&self, id: TaskId) -> Result<Option<TaskRecord>, Error> {
        let sql = self.render(&format!("{} WHERE id = ?", Self::SELECT));
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(self.sql_err("get result"))?;
        row.map(|r| self.record(&r)).transpose()
    }

    /// Every stored result of `group`, oldest first.
    pub async fn group(&self, group: &str) -> Result<Vec<TaskRecord>, Error> {
        let sql = self.render(&format!("{} WHERE grp = ? ORDER BY stopped", Self::SELECT));
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(group.to_owned())
            .fetch_all(&self.pool)
            .await
            .map_err(self.sql_err("group results"))?;
        rows.iter().map(|r| self.record(r)).collect()
    }

    /// The stored results of `group`, oldest first: successes only, or every row with
    /// `failures`.
    pub async fn group_filtered(
        &self,
        group: &str,
        failures: bool,
    ) -> Result<Vec<TaskRecord>, Error> {
        // A run claimed and not finished (`stopped = 0`) is no result yet.
        let only = if failures {
            " AND stopped > 0"
        } else {
            " AND success = 1"
        };
        let sql = self.render(&format!(
            "{} WHERE grp = ?{only} ORDER BY stopped, id",
            Self::SELECT
        ));
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(group.to_owned())
            .fetch_all(&self.pool)
            .await
            .map_err(self.sql_err("group results"))?;
        rows.iter().map(|r| self.record(r)).collect()
    }

    /// How many results `group` holds: successes (`Some(true)`), failures (`Some(false)`) or
    /// all of them (`None`).
    pub async fn group_count(&self, group: &str, success: Option<bool>) -> Result<u64, Error> {
        let only = match success {
            None => " AND stopped > 0",
            Some(true) => " AND success = 1",
            Some(false) => " AND success = 0 AND stopped > 0",
        };
        let sql = self.render(&format!(
            "SELECT COUNT(*) FROM qcluster_task WHERE grp = ?{only}"
        ));
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(group.to_owned())
            .fetch_one(&self.pool)
            .await
            .map_err(self.sql_err("count group"))?;
        let n: i64 = row.try_get(0).map_err(self.sql_err("count group"))?;
        Ok(n.max(0) as u64)
    }

    /// Deletes every stored result of `group`; returns how many.
    pub async fn delete_group(&self, group: &str) -> Result<u64, Error> {
        let done = sqlx::query(sqlx::AssertSqlSafe(
            self.render("DELETE FROM qcluster_task WHERE grp = ?"),
        ))
        .bind(group.to_owned())
        .execute(&self.pool)
        .await
        .map_err(self.sql_err("delete group"))?;
        Ok(done.rows_affected())
    }

    /// The stored results of those of `ids` that have one (in no particular order).
    pub async fn get_many(&self, ids: &[TaskId]) -> Result<Vec<TaskRecord>, Error> {
        let mut out = Vec::with_capacity(ids.len());
        for row in self
            .select_in(Self::SELECT, "1 = 1", ids, "get results")
            .await?
        {
            out.push(self.record(&row)?);
        }
        Ok(out)
    }

    /// The rows of `select` (fixed SQL over `qcluster_task`) matching `condition` (fixed SQL, no
    /// values) whose id is one of `ids`, in statements of at most [`ROWS_PER_STATEMENT`] ids.
    async fn select_in(
        &self,
        select: &str,
        condition: &str,
        ids: &[TaskId],
        op: &'static str,
    ) -> Result<Vec<AnyRow>, Error> {
        let mut out = Vec::new();
        for chunk in ids.chunks(ROWS_PER_STATEMENT) {
            let sql = self.render(&format!(
                "{select} WHERE {condition} AND id IN ({})",
                vec!["?"; chunk.len()].join(", ")
            ));
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for id in chunk {
                q = q.bind(id.to_string());
            }
            out.extend(q.fetch_all(&self.pool).await.map_err(self.sql_err(op))?);
        }
        Ok(out)
    }

    /// Lets the successful items of a complete iterator be pruned like any success: they leave
    /// the iterator's group (their results are in the iterator's row).
    pub async fn release_items(&self, iter: TaskId) -> Result<u64, Error> {
        let done = sqlx::query(sqlx::AssertSqlSafe(
            self.render("UPDATE qcluster_task SET grp = NULL WHERE grp = ? AND success = 1"),
        ))
        .bind(iter.to_string())
        .execute(&self.pool)
        .await
        .map_err(self.sql_err("release iterator items"))?;
        Ok(done.rows_affected())
    }

    /// Which of `ids` have a row matching `condition` (fixed SQL, no values).
    async fn ids_where(&self, condition: &str, ids: &[TaskId]) -> Result<Vec<TaskId>, Error> {
        let mut out = Vec::new();
        let rows = self
            .select_in(
                "SELECT id FROM qcluster_task",
                condition,
                ids,
                "look up results",
            )
            .await?;
        for r in rows {
            let id: String = r.try_get(0).map_err(self.sql_err("look up results"))?;
            if let Ok(id) = id.parse() {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Which of `ids` have a stored result of any kind.
    pub async fn known(&self, ids: &[TaskId]) -> Result<HashSet<TaskId>, Error> {
        Ok(self.ids_where("1 = 1", ids).await?.into_iter().collect())
    }

    /// Claims the run of a task that must not run twice at once (hooks, chain links, iterator
    /// items, whose packages may be sent twice): writes `marker` (its row with `stopped = 0`)
    /// unless a row exists, or takes over an existing row that is not final and either belongs
    /// to a finished attempt (`stopped > 0`: this is the retry) or to a run that started before
    /// `stale_before_us` (its process died). False: another copy runs now.
    pub async fn claim_run(
        &self,
        marker: &TaskRecord,
        stale_before_us: i64,
    ) -> Result<bool, Error> {
        let insert = match self.dialect {
            // Not `ON DUPLICATE KEY UPDATE`: sqlx connects with CLIENT_FOUND_ROWS, under which
            // an existing row counts as affected.
            Dialect::MySql => {
                "INSERT IGNORE INTO qcluster_task (id, name, func, args, result, enqueued, \
                 started, stopped, attempts, grp, cluster, done, success) \
                 VALUES (?, ?, ?, ?, NULL, ?, ?, 0, 0, ?, ?, 0, 0)"
            }
            _ => {
                "INSERT INTO qcluster_task (id, name, func, args, result, enqueued, started, \
                 stopped, attempts, grp, cluster, done, success) \
                 VALUES (?, ?, ?, ?, NULL, ?, ?, 0, 0, ?, ?, 0, 0) ON CONFLICT (id) DO NOTHING"
            }
        };
        let inserted = sqlx::query(sqlx::AssertSqlSafe(self.render(insert)))
            .bind(marker.id.to_string())
            .bind(marker.name.clone())
            .bind(marker.func.clone())
            .bind(marker.args.clone())
            .bind(marker.enqueued_us)
            .bind(marker.started_us)
            .bind(marker.group.clone())
            .bind(marker.cluster.clone())
            .execute(&self.pool)
            .await
            .map_err(self.sql_err("claim run"))?;
        if inserted.rows_affected() == 1 {
            return Ok(true);
        }
        let taken = sqlx::query(sqlx::AssertSqlSafe(self.render(
            "UPDATE qcluster_task SET started = ?, stopped = 0, cluster = ? \
             WHERE id = ? AND done = 0 AND success = 0 AND (stopped > 0 OR started < ?)",
        )))
        .bind(marker.started_us)
        .bind(marker.cluster.clone())
        .bind(marker.id.to_string())
        .bind(stale_before_us)
        .execute(&self.pool)
        .await
        .map_err(self.sql_err("claim run"))?;
        Ok(taken.rows_affected() == 1)
    }

    /// Gives up the claim made at `started_us` of a run that stopped without a result (its
    /// lease was lost, it could not start): the next delivery may claim it at once. A claim
    /// taken over by someone else since is left alone.
    pub async fn release_run(&self, id: TaskId, started_us: i64) -> Result<(), Error> {
        sqlx::query(sqlx::AssertSqlSafe(self.render(
            "UPDATE qcluster_task SET stopped = started \
             WHERE id = ? AND started = ? AND stopped = 0 AND done = 0 AND success = 0",
        )))
        .bind(id.to_string())
        .bind(started_us)
        .execute(&self.pool)
        .await
        .map(drop)
        .map_err(self.sql_err("release run"))
    }

    /// Which of `ids` already have a successful result.
    pub async fn succeeded(&self, ids: &[TaskId]) -> Result<HashSet<TaskId>, Error> {
        Ok(self
            .ids_where("success = 1", ids)
            .await?
            .into_iter()
            .collect())
    }

    /// How many of `ids` have a final result (success or final failure).
    pub async fn done_count(&self, ids: &[TaskId]) -> Result<u64, Error> {
        Ok(self.ids_where("done = 1", ids).await?.len() as u64)
    }

    /// Successes and failures held for `cluster`.
    pub async fn counts(&self, cluster: &str) -> Result<Counts, Error> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(self.render(
            "SELECT success, COUNT(*) FROM qcluster_task WHERE cluster = ? GROUP BY success",
        )))
        .bind(cluster.to_owned())
        .fetch_all(&self.pool)
        .await
        .map_err(self.sql_err("count results"))?;
        let mut c = Counts::default();
        for r in rows {
            let success: i64 = r.try_get(0).map_err(self.sql_err("count results"))?;
            let n: i64 = r.try_get(1).map_err(self.sql_err("count results"))?;
            if success != 0 {
                c.success = n as u64;
            } else {
                c.failure = n as u64;
            }
        }
        Ok(c)
    }

    /// Deletes every stored result of `cluster`.
    pub async fn clear(&self, cluster: &str) -> Result<u64, Error> {
        let done = sqlx::query(sqlx::AssertSqlSafe(
            self.render("DELETE FROM qcluster_task WHERE cluster = ?"),
        ))
        .bind(cluster.to_owned())
        .execute(&self.pool)
        .await
        .map_err(self.sql_err("clear results"))?;
        Ok(done.rows_affected())
    }

    /// Stores (or replaces) the status `body` under `name`, readable until `ttl` from now, and
    /// deletes expired ones.
    pub async fn set_status(&self, name: &str, body: &str, ttl: Duration) -> Result<(), Error> {
        let now = now_us();
        let expires = now.saturating_add(i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX));
        let upsert = match self.dialect {
            Dialect::MySql => {
                "INSERT INTO qcluster_status (name, body, expires) VALUES (?, ?, ?) \
                 ON DUPLICATE KEY UPDATE body = VALUES(body), expires = VALUES(expires)"
            }
            _ => {
                "INSERT INTO qcluster_status (name, body, expires) VALUES (?, ?, ?) \
                 ON CONFLICT (name) DO UPDATE SET body = excluded.body, expires = excluded.expires"
            }
        };
        sqlx::query(sqlx::AssertSqlSafe(self.render(upsert)))
            .bind(name.to_owned())
            .bind(body.to_owned())
            .bind(expires)
            .execute(&self.pool)
            .await
            .map_err(self.sql_err("save status"))?;
        sqlx::query(sqlx::AssertSqlSafe(
            self.render("DELETE FROM qcluster_status WHERE expires <= ?"),
        ))
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(self.sql_err("prune status"))?;
        Ok(())
    }

    /// The unexpired statuses whose name starts with `prefix`, as `(name, body)`, by name.
    pub async fn statuses(&self, prefix: &str) -> Result<Vec<(String, String)>, Error> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(self.render(
            "SELECT name, body FROM qcluster_status WHERE expires > ? ORDER BY name",
        )))
        .bind(now_us())
        .fetch_all(&self.pool)
        .await
        .map_err(self.sql_err("read status"))?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                Some((
                    r.try_get::<String, _>(0).ok()?,
                    r.try_get::<String, _>(1).ok()?,
                ))
            })
            .filter(|(name, _)| name.starts_with(prefix))
            .collect())
    }

    /// True when the store answers a trivial query.
    pub async fn ping(&self) -> Result<(), Error> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(drop)
            .map_err(self.sql_err("ping"))
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}
