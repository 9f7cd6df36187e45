//! What the database's upkeep of the queue table looks like, for `info` and `health`.
//!
//! The promise: read-only, cheap (catalog and statistics views only, never a scan of the queue),
//! and never an error: a figure the server does not show (a missing grant, a disabled metric) is
//! left out. What is read, per backend:
//! - PostgreSQL: `qcluster_queue`'s live and dead tuples and the age of its last vacuum and
//!   analyze (`pg_stat_user_tables`), whether autovacuum is on for the server and for the table
//!   (`autovacuum_enabled` in its storage parameters). Every claim rewrites a row and every
//!   acknowledgement deletes one, so a queue leaves dead tuples at its own rate; when vacuum does
//!   not keep up (autovacuum off, or a long transaction holding the xmin horizon), claims walk
//!   them and slow down.
//! - MySQL / MariaDB: InnoDB's history list length (`trx_rseg_history_len`): undo the purge
//!   thread has not caught up with, which long transactions make grow.
//! - SQLite: free pages in the file, the journal mode and the size of the write-ahead log
//!   (`<file>-wal`). The log is reset only when a checkpoint reaches its end; a reader that
//!   never lets go (a long read transaction, a stuck process) keeps it growing with every
//!   write, and every read then searches it.
//!
//! A figure past its threshold adds a note starting with `WARNING:`.

use std::collections::BTreeMap;

use crate::db::{Db, on_db};

/// Dead tuples past which a warning is given (and past a fifth of the live ones).
#[cfg(feature = "postgres")]
const DEAD_TUPLES_WARN: i64 = 100_000;
/// SQLite write-ahead log size past which a warning is given (a healthy one stays near
/// `wal_autocheckpoint`'s 1,000 pages, 4 MiB).
#[cfg(feature = "sqlite")]
const WAL_WARN: u64 = 256 << 20;
/// InnoDB history list length past which a warning is given.
#[cfg(feature = "mysql")]
const HISTORY_WARN: i64 = 1_000_000;

/// The figures (`queue_table.*` details) and warnings of the queue table's upkeep.
#[derive(Debug, Default)]
pub(crate) struct Upkeep {
    pub details: BTreeMap<String, String>,
    pub warnings: Vec<String>,
}

/// Reads what the backend of `db` shows; `table` is the queue table.
pub(crate) async fn read(db: &Db, table: &str) -> Upkeep {
    let mut u = Upkeep::default();
    on_db!(db, p => p.read_into(table, &mut u).await);
    u
}

/// One backend's reading.
trait Backend {
    async fn read_into(&self, table: &str, u: &mut Upkeep);
}

#[cfg(feature = "postgres")]
impl Backend for sqlx::PgPool {
    async fn read_into(&self, table: &str, u: &mut Upkeep) {
        let stats: Option<(i64, i64, Option<f64>, Option<f64>)> = sqlx::query_as(
            "SELECT n_live_tup, n_dead_tup, \
             EXTRACT(EPOCH FROM now() - GREATEST(last_vacuum, last_autovacuum))::float8, \
             EXTRACT(EPOCH FROM now() - GREATEST(last_analyze, last_autoanalyze))::float8 \
             FROM pg_stat_user_tables WHERE relname = $1 AND schemaname = current_schema()",
        )
        .bind(table)
        .fetch_optional(self)
        .await
        .ok()
        .flatten();
        let server_on: Option<String> = sqlx::query_scalar("SELECT current_setting('autovacuum')")
            .fetch_one(self)
            .await
            .ok();
        let table_off: Option<bool> = sqlx::query_scalar(
            "SELECT COALESCE('autovacuum_enabled=false' = ANY(reloptions) \
             OR 'autovacuum_enabled=off' = ANY(reloptions), false) \
             FROM pg_class WHERE oid = to_regclass($1)",
        )
        .bind(table)
        .fetch_optional(self)
        .await
        .ok()
        .flatten();
        let autovacuum = match (server_on.as_deref(), table_off) {
            (Some("off"), _) => Some("off (server)"),
            (_, Some(true)) => Some("off (table)"),
            (Some(_), _) => Some("on"),
            (None, _) => None,
        };
        if let Some(a) = autovacuum {
            u.details.insert("queue_table.autovacuum".into(), a.into());
        }
        let Some((live, dead, vacuum_age, analyze_age)) = stats else {
            return;
        };
        let age = |a: Option<f64>| a.map_or_else(|| "never".into(), |s| format!("{s:.0}"));
        u.details
            .insert("queue_table.live_tuples".into(), live.to_string());
        u.details
            .insert("queue_table.dead_tuples".into(), dead.to_string());
        u.details
            .insert("queue_table.last_vacuum_s".into(), age(vacuum_age));
        u.details
            .insert("queue_table.last_analyze_s".into(), age(analyze_age));
        if dead > DEAD_TUPLES_WARN && dead > live / 5 {
            let why = match autovacuum {
                Some(a) if a.starts_with("off") => format!("autovacuum is {a}"),
                _ => {
                    "vacuum is not keeping up (a long transaction may hold the xmin horizon)".into()
                }
            };
            u.warnings.push(format!(
                "WARNING: {table} holds {dead} dead tuples ({live} live), last vacuumed {}: \
                 {why}; claims walk dead tuples and slow down. VACUUM {table}, or turn \
                 autovacuum on",
                vacuum_age.map_or_else(|| "never".into(), |s| format!("{s:.0} s ago"))
            ));
        } else if autovacuum.is_some_and(|a| a.starts_with("off")) {
            u.warnings.push(format!(
                "WARNING: autovacuum is {} for {table}: its dead tuples (one per claim and per \
                 acknowledgement) are removed only by a manual VACUUM",
                autovacuum.unwrap_or("off")
            ));
        }
    }
}

#[cfg(feature = "mysql")]
impl Backend for sqlx::MySqlPool {
    async fn read_into(&self, _table: &str, u: &mut Upkeep) {
        let history: Option<i64> = sqlx::query_scalar(
            "SELECT CAST(`COUNT` AS SIGNED) FROM information_schema.INNODB_METRICS \
             WHERE NAME = 'trx_rseg_history_len'",
        )
        .fetch_optional(self)
        .await
        .ok()
        .flatten();
        if let Some(h) = history {
            u.details
                .insert("server.innodb_history_list_length".into(), h.to_string());
            if h > HISTORY_WARN {
                u.warnings.push(format!(
                    "WARNING: InnoDB's history list length is {h}: purge lags behind (a long \
                     transaction?), and deleted queue rows stay in the indexes meanwhile"
                ));
            }
        }
    }
}

#[cfg(feature = "sqlite")]
impl Backend for sqlx::SqlitePool {
    async fn read_into(&self, _table: &str, u: &mut Upkeep) {
        let pragma = |name: &'static str| async move {
            sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!("PRAGMA {name}")))
                .fetch_one(self)
                .await
                .ok()
        };
        if let (Some(free), Some(size)) =
            (pragma("freelist_count").await, pragma("page_size").await)
        {
            u.details
                .insert("server.free_bytes".into(), (free * size).to_string());
        }
        if let Ok(mode) = sqlx::query_scalar::<_, String>("PRAGMA journal_mode")
            .fetch_one(self)
            .await
        {
            u.details.insert("server.journal_mode".into(), mode);
        }
        // The main database's file; none for an in-memory one.
        let file: Option<String> =
            sqlx::query_scalar("SELECT file FROM pragma_database_list WHERE name = 'main'")
                .fetch_optional(self)
                .await
                .ok()
                .flatten()
                .filter(|f: &String| !f.is_empty());
        if let Some(file) = file {
            let wal = std::fs::metadata(format!("{file}-wal")).map_or(0, |m| m.len());
            u.details.insert("server.wal_bytes".into(), wal.to_string());
            if wal > WAL_WARN {
                u.warnings.push(format!(
                    "WARNING: the write-ahead log {file}-wal holds {} MiB: checkpoints cannot                      reach its end (a long read transaction, or a process that holds one                      open?), and every read searches it",
                    wal >> 20
                ));
            }
        }
    }
}
