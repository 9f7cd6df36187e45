//! `qcluster_schedule`: the schedules of every cluster name, beside the results.
//!
//! One row per schedule (`(cluster, name)` unique). A slot is claimed by a compare-and-set on
//! `next_run` that also records it as `pending`; the claimant enqueues the slot's task and then
//! clears `pending`. A claimant that died in between leaves `pending` set, and any cluster
//! enqueues that slot again once it is older than the recovery delay: the slot's task id is
//! derived from the schedule and the slot, so a second package of it runs once (the run claim of
//! `Store::claim_run`). No lock is ever held across an enqueue.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Dialect, Store};
use crate::error::Error;

/// A schedule as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ScheduleRow {
    /// Its id (a UUID).
    pub id: String,
    /// The cluster name it belongs to.
    pub cluster: String,
    /// Its name, unique per cluster name.
    pub name: String,
    /// The task it enqueues.
    pub func: String,
    /// The task's arguments, JSON.
    pub args: String,
    /// The task's options, JSON (`timeout`, `max_attempts`, `group`, `hook`, `priority`).
    pub options: String,
    /// `once`, `minutes`, `hourly`, …, `cron`.
    pub kind: String,
    /// The period of the `minutes` kind.
    pub minutes: Option<i64>,
    /// The expression of the `cron` kind.
    pub cron: Option<String>,
    /// IANA time zone; UTC when none.
    pub tz: Option<String>,
    /// Runs left: -1 forever, 0 done.
    pub repeats: i64,
    /// The first slot, µs since the epoch (calendar kinds count their steps from it).
    pub anchor: i64,
    /// The next slot, µs since the epoch; none once done.
    pub next_run: Option<i64>,
    /// The last slot fired.
    pub last_run: Option<i64>,
    /// The task id of the last slot fired.
    pub last_task: Option<String>,
    /// A slot claimed and not yet confirmed enqueued.
    pub pending: Option<i64>,
    /// When `pending` was claimed.
    pub pending_since: Option<i64>,
    /// Paused when false.
    pub enabled: bool,
    /// Created, µs since the epoch.
    pub created: i64,
    /// Last changed, µs since the epoch.
    pub updated: i64,
}

const COLUMNS: &str = "id, cluster, name, func, args, options, kind, minutes, cron, tz, repeats, \
                       anchor, next_run, last_run, last_task, pending, pending_since, enabled, \
                       created, updated";

/// The statements that create the table and its indexes.
pub(super) fn ddl(dialect: Dialect, text: &str, engine: &str) -> Vec<String> {
    let mysql = dialect == Dialect::MySql;
    let inline = if mysql {
        ",\n                UNIQUE KEY qcluster_schedule_name (cluster, name),\n                INDEX qcluster_schedule_due (cluster, next_run),\n                INDEX qcluster_schedule_pending (cluster, pending_since)"
    } else {
        ""
    };
    let mut out = vec![format!(
        "CREATE TABLE IF NOT EXISTS qcluster_schedule (
                id VARCHAR(36) NOT NULL PRIMARY KEY,
                cluster VARCHAR(191) NOT NULL,
                name VARCHAR(191) NOT NULL,
                func VARCHAR(191) NOT NULL,
                args {text} NOT NULL,
                options {text} NOT NULL,
                kind VARCHAR(16) NOT NULL,
                minutes BIGINT,
                cron VARCHAR(191),
                tz VARCHAR(64),
                repeats BIGINT NOT NULL,
                anchor BIGINT NOT NULL,
                next_run BIGINT,
                last_run BIGINT,
                last_task VARCHAR(36),
                pending BIGINT,
                pending_since BIGINT,
                enabled BIGINT NOT NULL,
                created BIGINT NOT NULL,
                updated BIGINT NOT NULL{inline}
            ){engine}"
    )];
    if !mysql {
        out.push(
            "CREATE UNIQUE INDEX IF NOT EXISTS qcluster_schedule_name \
             ON qcluster_schedule (cluster, name)"
                .into(),
        );
        out.push(
            "CREATE INDEX IF NOT EXISTS qcluster_schedule_due \
             ON qcluster_schedule (cluster, next_run)"
                .into(),
        );
        // Partial: only the few rows with a pending slot, so the planner never mistakes it for
        // the index of the due query.
        out.push(
            "CREATE INDEX IF NOT EXISTS qcluster_schedule_pending \
             ON qcluster_schedule (cluster, pending_since) WHERE pending IS NOT NULL"
                .into(),
        );
    }
    out
}

/// A row that could not be read (a hand edit gone wrong): its id and name if they could be.
#[derive(Debug, Clone)]
pub struct BadRow {
    /// The row's id, or `?`.
    pub id: String,
    /// The row's name, or `?`.
    pub name: String,
    /// What is wrong.
    pub error: String,
}

impl Store {
    fn schedule_row(&self, r: &AnyRow) -> Result<ScheduleRow, BadRow> {
        let text = |i: usize| r.try_get::<String, _>(i);
        let bad = |e: sqlx::Error| BadRow {
            id: text(0).unwrap_or_else(|_| "?".into()),
            name: text(2).unwrap_or_else(|_| "?".into()),
            error: e.to_string(),
        };
        Ok(ScheduleRow {
            id: text(0).map_err(bad)?,
            cluster: text(1).map_err(bad)?,
            name: text(2).map_err(bad)?,
            func: text(3).map_err(bad)?,
            args: text(4).map_err(bad)?,
            options: text(5).map_err(bad)?,
            kind: text(6).map_err(bad)?,
            minutes: r.try_get(7).map_err(bad)?,
            cron: r.try_get(8).map_err(bad)?,
            tz: r.try_get(9).map_err(bad)?,
            repeats: r.try_get(10).map_err(bad)?,
            anchor: r.try_get(11).map_err(bad)?,
            next_run: r.try_get(12).map_err(bad)?,
            last_run: r.try_get(13).map_err(bad)?,
            last_task: r.try_get(14).map_err(bad)?,
            pending: r.try_get(15).map_err(bad)?,
            pending_since: r.try_get(16).map_err(bad)?,
            enabled: r.try_get::<i64, _>(17).map_err(bad)? != 0,
            created: r.try_get(18).map_err(bad)?,
            updated: r.try_get(19).map_err(bad)?,
        })
    }

    async fn schedule_rows(
        &self,
        condition: &str,
        binds: &[i64],
        cluster: &str,
        op: &'static str,
    ) -> Result<Vec<Result<ScheduleRow, BadRow>>, Error> {
        let sql = self.render(&format!(
            "SELECT {COLUMNS} FROM qcluster_schedule WHERE cluster = ?{condition}"
        ));
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(cluster.to_owned());
        for b in binds {
            q = q.bind(*b);
        }
        let rows = q.fetch_all(&self.pool).await.map_err(self.sql_err(op))?;
        Ok(rows.iter().map(|r| self.schedule_row(r)).collect())
    }

    /// Adds a schedule. False when the cluster name has one of that name already.
    pub async fn add_schedule(&self, s: &ScheduleRow) -> Result<bool, Error> {
        if self.schedule(&s.cluster, &s.name).await?.is_some() {
            return Ok(false);
        }
        let sql = self.render(&format!(
            "INSERT INTO qcluster_schedule ({COLUMNS}) VALUES ({})",
            vec!["?"; 20].join(", ")
        ));
        let done = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(s.id.clone())
            .bind(s.cluster.clone())
            .bind(s.name.clone())
            .bind(s.func.clone())
            .bind(s.args.clone())
            .bind(s.options.clone())
            .bind(s.kind.clone())
            .bind(s.minutes)
            .bind(s.cron.clone())
            .bind(s.tz.clone())
            .bind(s.repeats)
            .bind(s.anchor)
            .bind(s.next_run)
            .bind(s.last_run)
            .bind(s.last_task.clone())
            .bind(s.pending)
            .bind(s.pending_since)
            .bind(i64::from(s.enabled))
            .bind(s.created)
            .bind(s.updated)
            .execute(&self.pool)
            .await;
        match done {
            Ok(_) => Ok(true),
            // Added by someone else in between: the unique index says so.
            Err(e) if super::unique_violation(self.dialect, &e) => Ok(false),
            Err(e) => Err(self.sql_err("add schedule")(e)),
        }
    }

    /// The schedule `name` of `cluster`.
    pub async fn schedule(&self, cluster: &str, name: &str) -> Result<Option<ScheduleRow>, Error> {
        let sql = self.render(&format!(
            "SELECT {COLUMNS} FROM qcluster_schedule WHERE cluster = ? AND name = ?"
        ));
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(cluster.to_owned())
            .bind(name.to_owned())
            .fetch_optional(&self.pool)
            .await
            .map_err(self.sql_err("read schedule"))?;
        row.map(|r| {
            self.schedule_row(&r)
                .map_err(|b| self.err(format!("schedule `{name}` cannot be read: {}", b.error)))
        })
        .transpose()
    }

    /// Every schedule of `cluster` by name; rows that cannot be read come as [`BadRow`].
    pub async fn schedules(
        &self,
        cluster: &str,
    ) -> Result<Vec<Result<ScheduleRow, BadRow>>, Error> {
        self.schedule_rows(" ORDER BY name", &[], cluster, "list schedules")
            .await
    }

    /// Enabled schedules of `cluster` with a slot due at `now_us` and none pending, oldest
    /// first, at most `limit`, leaving out the ids in `skip` (rows found bad a moment ago, so
    /// that they cannot fill every place).
    pub async fn due_schedules(
        &self,
        cluster: &str,
        now_us: i64,
        limit: i64,
        skip: &[String],
    ) -> Result<Vec<Result<ScheduleRow, BadRow>>, Error> {
        let skip = &skip[..skip.len().min(100)];
        let not_in = if skip.is_empty() {
            String::new()
        } else {
            format!(" AND id NOT IN ({})", vec!["?"; skip.len()].join(", "))
        };
        let sql = self.render(&format!(
            "SELECT {COLUMNS} FROM qcluster_schedule WHERE cluster = ? AND enabled = 1 \
             AND next_run <= ? AND pending IS NULL{not_in} ORDER BY next_run LIMIT ?"
        ));
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(cluster.to_owned())
            .bind(now_us);
        for id in skip {
            q = q.bind(id.clone());
        }
        let rows = q
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(self.sql_err("due schedules"))?;
        Ok(rows.iter().map(|r| self.schedule_row(r)).collect())
    }

    /// The earliest slot after `after_us` of the enabled schedules of `cluster`, if any.
    pub async fn next_slot_after(
        &self,
        cluster: &str,
        after_us: i64,
    ) -> Result<Option<i64>, Error> {
        let row = sqlx::query(sqlx::AssertSqlSafe(self.render(
            "SELECT MIN(next_run) FROM qcluster_schedule \
             WHERE cluster = ? AND next_run > ? AND enabled = 1",
        )))
        .bind(cluster.to_owned())
        .bind(after_us)
        .fetch_one(&self.pool)
        .await
        .map_err(self.sql_err("next schedule slot"))?;
        row.try_get::<Option<i64>, _>(0)
            .map_err(self.sql_err("next schedule slot"))
    }

    /// Schedules of `cluster` with a slot claimed before `before_us` and never confirmed (their
    /// claimant died before or while enqueueing it).
    pub async fn stuck_schedules(
        &self,
        cluster: &str,
        before_us: i64,
    ) -> Result<Vec<Result<ScheduleRow, BadRow>>, Error> {
        self.schedule_rows(
            " AND pending IS NOT NULL AND pending_since < ? ORDER BY pending_since LIMIT 100",
            &[before_us],
            cluster,
            "stuck schedules",
        )
        .await
    }

    /// Claims slot `slot` of schedule `id` whose `next_run` is `expected`: moves `next_run` to
    /// `next` (none: done), sets `repeats`, records the slot and its task as the last run and
    /// as pending. False when someone else moved `next_run` first.
    #[allow(clippy::too_many_arguments)]
    pub async fn claim_slot(
        &self,
        id: &str,
        expected: i64,
        next: Option<i64>,
        repeats: i64,
        slot: i64,
        task: &str,
        now_us: i64,
    ) -> Result<bool, Error> {
        let done = sqlx::query(sqlx::AssertSqlSafe(self.render(
            "UPDATE qcluster_schedule SET next_run = ?, repeats = ?, last_run = ?, \
             last_task = ?, pending = ?, pending_since = ?, updated = ? \
             WHERE id = ? AND next_run = ? AND pending IS NULL AND enabled = 1",
        )))
        .bind(next)
        .bind(repeats)
        .bind(slot)
        .bind(task.to_owned())
        .bind(slot)
        .bind(now_us)
        .bind(now_us)
        .bind(id.to_owned())
        .bind(expected)
        .execute(&self.pool)
        .await
        .map_err(self.sql_err("claim schedule slot"))?;
        Ok(done.rows_affected() == 1)
    }

    /// Confirms that the pending slot `slot` of schedule `id` is enqueued.
    pub async fn confirm_slot(&self, id: &str, slot: i64) -> Result<(), Error> {
        sqlx::query(sqlx::AssertSqlSafe(self.render(
            "UPDATE qcluster_schedule SET pending = NULL, pending_since = NULL \
             WHERE id = ? AND pending = ?",
        )))
        .bind(id.to_owned())
        .bind(slot)
        .execute(&self.pool)
        .await
        .map(drop)
        .map_err(self.sql_err("confirm schedule slot"))
    }

    /// Pauses (`false`) or resumes a schedule. False when there is none of that name.
    pub async fn set_schedule_enabled(
        &self,
        cluster: &str,
        name: &str,
        enabled: bool,
        now_us: i64,
    ) -> Result<bool, Error> {
        let done = sqlx::query(sqlx::AssertSqlSafe(self.render(
            "UPDATE qcluster_schedule SET enabled = ?, updated = ? WHERE cluster = ? AND name = ?",
        )))
        .bind(i64::from(enabled))
        .bind(now_us)
        .bind(cluster.to_owned())
        .bind(name.to_owned())
        .execute(&self.pool)
        .await
        .map_err(self.sql_err("pause or resume schedule"))?;
        Ok(done.rows_affected() > 0)
    }

    /// Moves a schedule's next slot (resuming a paused schedule without catch-up).
    pub async fn set_next_run(
        &self,
        id: &str,
        expected: i64,
        next: Option<i64>,
    ) -> Result<bool, Error> {
        let done = sqlx::query(sqlx::AssertSqlSafe(self.render(
            "UPDATE qcluster_schedule SET next_run = ? WHERE id = ? AND next_run = ?",
        )))
        .bind(next)
        .bind(id.to_owned())
        .bind(expected)
        .execute(&self.pool)
        .await
        .map_err(self.sql_err("move schedule"))?;
        Ok(done.rows_affected() == 1)
    }

    /// Removes a schedule. False when there is none of that name.
    pub async fn remove_schedule(&self, cluster: &str, name: &str) -> Result<bool, Error> {
        let done = sqlx::query(sqlx::AssertSqlSafe(
            self.render("DELETE FROM qcluster_schedule WHERE cluster = ? AND name = ?"),
        ))
        .bind(cluster.to_owned())
        .bind(name.to_owned())
        .execute(&self.pool)
        .await
        .map_err(self.sql_err("remove schedule"))?;
        Ok(done.rows_affected() > 0)
    }
}
