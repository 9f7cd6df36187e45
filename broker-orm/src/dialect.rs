//! The SQL each backend speaks. Every value goes in as a bound parameter; the only text spliced
//! into statements is fixed table names and the backend's clock expression.

use std::sync::Arc;

/// A SQL backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// SQLite (file or memory).
    Sqlite,
    /// PostgreSQL.
    Postgres,
    /// MySQL or MariaDB.
    MySql,
}

impl Dialect {
    /// Picks the backend from a URL's scheme.
    pub fn from_url(url: &str) -> Option<Self> {
        let scheme = url.split(':').next()?.to_ascii_lowercase();
        match scheme.as_str() {
            "sqlite" => Some(Self::Sqlite),
            "postgres" | "postgresql" => Some(Self::Postgres),
            "mysql" | "mariadb" => Some(Self::MySql),
            _ => None,
        }
    }

    /// Adapter name used in errors and `info`.
    pub fn broker_name(self) -> &'static str {
        match self {
            Self::Sqlite => "orm/sqlite",
            Self::Postgres => "orm/postgres",
            Self::MySql => "orm/mysql",
        }
    }

    /// The Cargo feature that compiles this backend in.
    pub fn feature(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
            Self::MySql => "mysql",
        }
    }

    /// The server's clock in microseconds since the Unix epoch, as an SQL expression. Leases use
    /// the database's clock so that clusters on machines with skewed clocks agree.
    fn now_us(self) -> &'static str {
        match self {
            Self::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)",
            Self::Postgres => "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::BIGINT",
            Self::MySql => "CAST(UNIX_TIMESTAMP(NOW(6)) * 1000000 AS SIGNED)",
        }
    }

    /// Renders a template: `NOW_US` becomes the clock expression, and on PostgreSQL each `?`
    /// becomes `$1`, `$2`, ...
    pub fn render(self, template: &str) -> String {
        let sql = template.replace("NOW_US", self.now_us());
        if self != Self::Postgres {
            return sql;
        }
        let mut out = String::with_capacity(sql.len() + 8);
        let mut n = 0;
        for ch in sql.chars() {
            if ch == '?' {
                n += 1;
                out.push('$');
                out.push_str(&n.to_string());
            } else {
                out.push(ch);
            }
        }
        out
    }
}

/// Statements prepared once per broker, rendered for its dialect.
#[derive(Debug)]
pub struct Statements {
    pub enqueue: Arc<str>,
    pub claim: Arc<str>,
    pub ack: Arc<str>,
    pub fail: Arc<str>,
    pub extend: Arc<str>,
    pub delete: Arc<str>,
    pub dead_copy: Arc<str>,
    pub dead_delete: Arc<str>,
    pub dead_list: Arc<str>,
    pub dead_size: Arc<str>,
    /// Locks the dead letter to requeue (PostgreSQL, MySQL); `None` on SQLite, whose first
    /// write statement takes the database's write lock.
    pub dead_lock: Option<Arc<str>>,
    pub dead_requeue: Arc<str>,
    pub dead_remove: Arc<str>,
    pub purge: Arc<str>,
    pub drop_queue: Arc<str>,
    pub drop_dead: Arc<str>,
    pub queue_size: Arc<str>,
    pub lock_size: Arc<str>,
    pub set_stat: Arc<str>,
    pub prune_stats: Arc<str>,
    pub get_stats: Arc<str>,
    /// Start of a multi-row insert (values appended by a query builder).
    pub insert_head: &'static str,
    /// `NOW_US` rendered, for builders.
    pub now: &'static str,
}

const CLAIM_ORDER: &str = "ORDER BY tier, due_at, id";

/// Ready now: due, and nobody holds the lease.
const READY: &str = "due_at <= NOW_US AND lease_until <= NOW_US";

/// The same on PostgreSQL, against one clock reading for the whole statement: with the clock
/// read row by row, a row could be found not yet due and a later row of the same tier due a
/// microsecond after, and the floor would pass the first.
const READY_PG: &str = "due_at <= (EXTRACT(EPOCH FROM statement_timestamp()) * 1000000)::BIGINT \
    AND lease_until <= (EXTRACT(EPOCH FROM statement_timestamp()) * 1000000)::BIGINT";

impl Statements {
    pub fn new(d: Dialect) -> Self {
        let r = |t: &str| -> Arc<str> { d.render(t).into() };
        let claim = match d {
            // One statement: the subquery locks up to `bulk` ready rows from the handle's floor
            // on (see `floor`), skipping rows another consumer holds, and the update leases them
            // without touching an indexed column.
            Dialect::Postgres => format!(
                "UPDATE qcluster_queue SET leased = 1, lease_until = NOW_US + ?, deliveries = deliveries + 1 \
                 WHERE id IN (SELECT id FROM qcluster_queue WHERE queue = ? AND (tier, due_at, id) >= (?, ?, ?) \
                 AND {READY_PG} {CLAIM_ORDER} LIMIT ? FOR UPDATE SKIP LOCKED) \
                 RETURNING id, payload, deliveries, tier, due_at"
            ),
            // A write statement takes SQLite's write lock when it starts: claims are serialised.
            Dialect::Sqlite => format!(
                "UPDATE qcluster_queue SET leased = 1, lease_until = NOW_US + ?, deliveries = deliveries + 1 \
                 WHERE id IN (SELECT id FROM qcluster_queue WHERE queue = ? AND {READY} \
                 {CLAIM_ORDER} LIMIT ?) \
                 RETURNING id, payload, deliveries, tier, due_at"
            ),
            // MariaDB has no UPDATE ... RETURNING: lock with SKIP LOCKED, then lease, in one
            // transaction (see `claim`).
            Dialect::MySql => format!(
                "SELECT id, payload, deliveries, tier, due_at FROM qcluster_queue \
                 WHERE queue = ? AND {READY} {CLAIM_ORDER} LIMIT ? FOR UPDATE SKIP LOCKED"
            ),
        };
        let upsert = match d {
            Dialect::MySql => {
                "INSERT INTO qcluster_stat (stat_key, stat_value, expires_at) VALUES (?, ?, NOW_US + ?) \
                 ON DUPLICATE KEY UPDATE stat_value = VALUES(stat_value), expires_at = VALUES(expires_at)"
            }
            _ => {
                "INSERT INTO qcluster_stat (stat_key, stat_value, expires_at) VALUES (?, ?, NOW_US + ?) \
                 ON CONFLICT (stat_key) DO UPDATE SET stat_value = excluded.stat_value, expires_at = excluded.expires_at"
            }
        };
        let stat_key = match d {
            Dialect::MySql => "CONVERT(stat_key USING utf8mb4)",
            _ => "stat_key",
        };
        let enqueue = match d {
            Dialect::MySql => {
                "INSERT INTO qcluster_queue (queue, payload, tier, due_at, lease_until, leased, deliveries, enqueued_at) \
                 VALUES (?, ?, ?, NOW_US + ?, 0, 0, 0, NOW_US)"
            }
            // The notification rides in the same statement (delivered at its commit) and
            // carries the new row's claim key (`floor`).
            Dialect::Postgres => {
                "WITH ins AS (INSERT INTO qcluster_queue \
                 (queue, payload, tier, due_at, lease_until, leased, deliveries, enqueued_at) \
                 VALUES (?, ?, ?, NOW_US + ?, 0, 0, 0, NOW_US) RETURNING id, tier, due_at), \
                 n AS (SELECT pg_notify(?, concat_ws(' ', ins.tier, ins.due_at, ins.id, ?::text)) AS sent FROM ins) \
                 SELECT ins.id, ins.tier, ins.due_at FROM ins, n"
            }
            _ => {
                "INSERT INTO qcluster_queue (queue, payload, tier, due_at, lease_until, leased, deliveries, enqueued_at) \
                 VALUES (?, ?, ?, NOW_US + ?, 0, 0, 0, NOW_US) RETURNING id"
            }
        };
        let fail = match d {
            Dialect::MySql => {
                "UPDATE qcluster_queue SET leased = 0, lease_until = 0, due_at = NOW_US + ? \
                 WHERE id = ? AND queue = ? AND deliveries = ? AND leased = 1"
            }
            // The row's new claim key comes back for the handle's floor.
            _ => {
                "UPDATE qcluster_queue SET leased = 0, lease_until = 0, due_at = NOW_US + ? \
                 WHERE id = ? AND queue = ? AND deliveries = ? AND leased = 1 RETURNING tier, due_at"
            }
        };
        let now: &'static str = d.now_us();
        Self {
            enqueue: r(enqueue),
            claim: r(&claim),
            ack: r(
                "DELETE FROM qcluster_queue WHERE id = ? AND queue = ? AND deliveries = ? AND leased = 1",
            ),
            fail: r(fail),
            extend: r("UPDATE qcluster_queue SET lease_until = NOW_US + ? \
                 WHERE id = ? AND queue = ? AND deliveries = ? AND leased = 1"),
            delete: r("DELETE FROM qcluster_queue WHERE id = ? AND queue = ?"),
            dead_copy: r(
                "INSERT INTO qcluster_dead (queue, message_id, payload, reason, deliveries, dead_at, tier) \
                 SELECT queue, id, payload, ?, deliveries, NOW_US, tier FROM qcluster_queue \
                 WHERE id = ? AND queue = ? AND deliveries = ? AND leased = 1",
            ),
            dead_delete: r(
                "DELETE FROM qcluster_queue WHERE id = ? AND queue = ? AND deliveries = ? AND leased = 1",
            ),
            dead_list: r(
                "SELECT message_id, payload, reason, deliveries, dead_at FROM qcluster_dead \
                 WHERE queue = ? ORDER BY id LIMIT ?",
            ),
            dead_size: r("SELECT COUNT(*) FROM qcluster_dead WHERE queue = ?"),
            dead_lock: match d {
                Dialect::Sqlite => None,
                _ => Some(r(
                    "SELECT tier FROM qcluster_dead WHERE queue = ? AND message_id = ? FOR UPDATE",
                )),
            },
            // A fresh package: never delivered, due now, at the priority it had.
            dead_requeue: r(
                "INSERT INTO qcluster_queue (queue, payload, tier, due_at, lease_until, leased, deliveries, enqueued_at) \
                 SELECT queue, payload, tier, NOW_US, 0, 0, 0, NOW_US FROM qcluster_dead \
                 WHERE queue = ? AND message_id = ?",
            ),
            dead_remove: r("DELETE FROM qcluster_dead WHERE queue = ? AND message_id = ?"),
            purge: r(
                "DELETE FROM qcluster_queue WHERE queue = ? AND NOT (leased = 1 AND lease_until > NOW_US)",
            ),
            drop_queue: r("DELETE FROM qcluster_queue WHERE queue = ?"),
            drop_dead: r("DELETE FROM qcluster_dead WHERE queue = ?"),
            queue_size: r(
                "SELECT COUNT(*) FROM qcluster_queue WHERE queue = ? AND NOT (leased = 1 AND lease_until > NOW_US)",
            ),
            lock_size: r(
                "SELECT COUNT(*) FROM qcluster_queue WHERE queue = ? AND leased = 1 AND lease_until > NOW_US",
            ),
            set_stat: r(upsert),
            prune_stats: r("DELETE FROM qcluster_stat WHERE expires_at <= NOW_US"),
            get_stats: r(&format!(
                "SELECT {stat_key} AS stat_key, stat_value FROM qcluster_stat \
                 WHERE stat_key LIKE ? ESCAPE '!' AND expires_at > NOW_US"
            )),
            insert_head: INSERT_HEAD,
            now,
        }
    }
}

/// Start of a multi-row insert into the queue; each row's values are queue, payload, tier,
/// due_at, lease_until, leased, deliveries, enqueued_at.
pub const INSERT_HEAD: &str = "INSERT INTO qcluster_queue \
    (queue, payload, tier, due_at, lease_until, leased, deliveries, enqueued_at) ";

/// The claim order's key of a package's priority: lower runs first.
pub fn tier(priority: i16) -> i32 {
    -i32::from(priority)
}

/// Escapes `prefix` for `LIKE ... ESCAPE '!'` and appends the wildcard.
pub fn like_prefix(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 1);
    for ch in prefix.chars() {
        if matches!(ch, '!' | '%' | '_') {
            out.push('!');
        }
        out.push(ch);
    }
    out.push('%');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_placeholders_are_numbered() {
        assert_eq!(
            Dialect::Postgres.render("a = ? AND b = ?"),
            "a = $1 AND b = $2"
        );
        assert_eq!(Dialect::MySql.render("a = ?"), "a = ?");
    }

    #[test]
    fn like_prefix_escapes_wildcards() {
        assert_eq!(like_prefix("a_b%c!"), "a!_b!%c!!%");
    }

    #[test]
    fn schemes() {
        assert_eq!(Dialect::from_url("postgresql://x"), Some(Dialect::Postgres));
        assert_eq!(Dialect::from_url("mariadb://x"), Some(Dialect::MySql));
        assert_eq!(Dialect::from_url("sqlite::memory:"), Some(Dialect::Sqlite));
        assert_eq!(Dialect::from_url("redis://x"), None);
    }
}
