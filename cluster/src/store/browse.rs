//! Browsing stored results, newest first, for the dashboard and the monitor.
//!
//! The promise: a page of results costs one index range scan whatever the table holds (a
//! million rows answer as fast as a thousand): the outcome and func filters are served by an
//! index that leads with `cluster` and ends with `stopped` (a group by the group index), and pages
//! continue from the last row seen (keyset pagination, bounded by `stopped` so that a deep page
//! starts its scan where the last one ended), never with `OFFSET`. Runs still going (`stopped = 0`) are not results yet and
//! are listed only when asked for.

use super::{Dialect, Store, TaskRecord};
use crate::error::Error;

/// Which results a page holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Outcome {
    /// Every finished run.
    #[default]
    Any,
    /// Successes.
    Success,
    /// Failures (final or to be retried).
    Failure,
    /// Runs claimed and not finished.
    Running,
}

/// A filter and a page position for [`Store::browse`].
#[derive(Debug, Clone, Default)]
pub struct Browse {
    /// Successes, failures, running or any.
    pub outcome: Outcome,
    /// Only this task function.
    pub func: Option<String>,
    /// Only this group.
    pub group: Option<String>,
    /// Only runs that stopped at or after this time, µs since the epoch.
    pub since_us: Option<i64>,
    /// Continue after this row: its `stopped` and its id (the last row of the previous page).
    pub after: Option<(i64, String)>,
    /// Rows wanted (at most 500).
    pub limit: usize,
}

/// Indexes the browsing queries use (see the module doc), as `(name, columns)`.
const INDEXES: &[(&str, &str)] = &[
    ("qcluster_task_recent", "cluster, stopped"),
    ("qcluster_task_func", "cluster, func, stopped"),
];

impl Store {
    /// Creates the browsing indexes if missing (also on tables made before they existed).
    pub(super) async fn create_browse_indexes(&self) -> Result<(), Error> {
        // Two processes starting at once on PostgreSQL may collide on the catalog: try again.
        let mut last = None;
        for _ in 0..5 {
            match self.try_browse_indexes().await {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        Err(last.unwrap_or_else(|| self.err("create indexes".into())))
    }

    async fn try_browse_indexes(&self) -> Result<(), Error> {
        for (name, cols) in INDEXES {
            let sql = match self.dialect {
                // MySQL has no CREATE INDEX IF NOT EXISTS: a duplicate name (1061) is fine.
                Dialect::MySql => format!("CREATE INDEX {name} ON qcluster_task ({cols})"),
                _ => format!("CREATE INDEX IF NOT EXISTS {name} ON qcluster_task ({cols})"),
            };
            if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&self.pool)
                .await
            {
                let duplicate = e
                    .as_database_error()
                    .and_then(|d| d.code())
                    .is_some_and(|c| c == "42000" || c == "1061")
                    && e.to_string().contains("Duplicate key name");
                if !(self.dialect == Dialect::MySql && duplicate) {
                    return Err(self.err(format!("create index {name}: {e}")));
                }
            }
        }
        Ok(())
    }

    /// A page of `cluster`'s results, newest first (by the time the run stopped, then id).
    pub async fn browse(&self, cluster: &str, b: &Browse) -> Result<Vec<TaskRecord>, Error> {
        let mut sql = format!("{} WHERE cluster = ?", Self::SELECT);
        match b.outcome {
            Outcome::Any => sql.push_str(" AND stopped > 0"),
            Outcome::Success => sql.push_str(" AND success = 1 AND stopped > 0"),
            Outcome::Failure => sql.push_str(" AND success = 0 AND stopped > 0"),
            Outcome::Running => sql.push_str(" AND stopped = 0 AND done = 0"),
        }
        if b.func.is_some() {
            sql.push_str(" AND func = ?");
        }
        if b.group.is_some() {
            sql.push_str(" AND grp = ?");
        }
        if b.since_us.is_some() {
            sql.push_str(" AND stopped >= ?");
        }
        if b.after.is_some() {
            // The first bound is implied by the second, but only it bounds the index range
            // scan on PostgreSQL and SQLite (an OR is no range for them).
            sql.push_str(" AND stopped <= ? AND (stopped < ? OR (stopped = ? AND id < ?))");
        }
        sql.push_str(&format!(
            " ORDER BY stopped DESC, id DESC LIMIT {}",
            b.limit.clamp(1, 500)
        ));
        let sql = self.render(&sql);
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(cluster.to_owned());
        if let Some(f) = &b.func {
            q = q.bind(f.clone());
        }
        if let Some(g) = &b.group {
            q = q.bind(g.clone());
        }
        if let Some(s) = b.since_us {
            q = q.bind(s);
        }
        if let Some((stopped, id)) = &b.after {
            q = q
                .bind(*stopped)
                .bind(*stopped)
                .bind(*stopped)
                .bind(id.clone());
        }
        let rows = q
            .fetch_all(&self.pool)
            .await
            .map_err(self.sql_err("browse results"))?;
        rows.iter().map(|r| self.record(r)).collect()
    }
}
