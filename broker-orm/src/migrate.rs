//! Embedded schema migrations (public only for this crate's upgrade tests), recorded in `qcluster_migrations` (our own table, so an
//! application's own migration tool in the same database is never confused by ours).
//!
//! Several clusters starting at once upgrade the schema exactly once: PostgreSQL and MySQL run
//! the migrations under a named lock, SQLite inside one `BEGIN IMMEDIATE` transaction (its write
//! lock). On PostgreSQL and SQLite each version's statements and its record commit together, so an
//! interrupted upgrade leaves the previous version whole. MySQL commits every DDL statement on its
//! own: there each statement of a later version carries a guard (a query that says it is already
//! done), so an upgrade interrupted half-way completes on the next start.

use crate::dialect::Dialect;

/// One schema version, with its statements per backend.
pub struct Migration {
    pub version: i64,
    pub description: &'static str,
    pub sqlite: &'static [&'static str],
    pub postgres: &'static [&'static str],
    pub mysql: &'static [&'static str],
    /// Per MySQL statement (same order; missing = none): a query returning a count, non-zero
    /// when the statement's work is already done, so it is skipped.
    pub mysql_done_if: &'static [Option<&'static str>],
}

impl Migration {
    pub fn statements(&self, d: Dialect) -> &'static [&'static str] {
        match d {
            Dialect::Sqlite => self.sqlite,
            Dialect::Postgres => self.postgres,
            Dialect::MySql => self.mysql,
        }
    }
}

pub const BOOKKEEPING: [&str; 3] = [
    // sqlite
    "CREATE TABLE IF NOT EXISTS qcluster_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL, applied_at BIGINT NOT NULL)",
    // postgres
    "CREATE TABLE IF NOT EXISTS qcluster_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL, applied_at BIGINT NOT NULL)",
    // mysql
    "CREATE TABLE IF NOT EXISTS qcluster_migrations (version BIGINT PRIMARY KEY, description VARCHAR(255) NOT NULL, applied_at BIGINT NOT NULL) ENGINE=InnoDB",
];

pub fn bookkeeping(d: Dialect) -> &'static str {
    match d {
        Dialect::Sqlite => BOOKKEEPING[0],
        Dialect::Postgres => BOOKKEEPING[1],
        Dialect::MySql => BOOKKEEPING[2],
    }
}

/// All migrations, oldest first. Never edit a released one: add a new version.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "queue, dead letters and stats",
        sqlite: &[
            "CREATE TABLE IF NOT EXISTS qcluster_queue (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            queue TEXT NOT NULL,
            payload BLOB NOT NULL,
            priority SMALLINT NOT NULL DEFAULT 0,
            visible_at BIGINT NOT NULL,
            leased SMALLINT NOT NULL DEFAULT 0,
            deliveries INTEGER NOT NULL DEFAULT 0,
            enqueued_at BIGINT NOT NULL)",
            "CREATE INDEX IF NOT EXISTS qcluster_queue_claim ON qcluster_queue (queue, priority DESC, visible_at, id)",
            "CREATE TABLE IF NOT EXISTS qcluster_dead (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            queue TEXT NOT NULL,
            message_id BIGINT NOT NULL,
            payload BLOB NOT NULL,
            reason TEXT NOT NULL,
            deliveries INTEGER NOT NULL,
            dead_at BIGINT NOT NULL)",
            "CREATE INDEX IF NOT EXISTS qcluster_dead_queue ON qcluster_dead (queue, id)",
            "CREATE TABLE IF NOT EXISTS qcluster_stat (
            stat_key TEXT PRIMARY KEY,
            stat_value BLOB NOT NULL,
            expires_at BIGINT NOT NULL)",
        ],
        postgres: &[
            "CREATE TABLE IF NOT EXISTS qcluster_queue (
            id BIGSERIAL PRIMARY KEY,
            queue TEXT NOT NULL,
            payload BYTEA NOT NULL,
            priority SMALLINT NOT NULL DEFAULT 0,
            visible_at BIGINT NOT NULL,
            leased SMALLINT NOT NULL DEFAULT 0,
            deliveries INTEGER NOT NULL DEFAULT 0,
            enqueued_at BIGINT NOT NULL)",
            "CREATE INDEX IF NOT EXISTS qcluster_queue_claim ON qcluster_queue (queue, priority DESC, visible_at, id)",
            "CREATE TABLE IF NOT EXISTS qcluster_dead (
            id BIGSERIAL PRIMARY KEY,
            queue TEXT NOT NULL,
            message_id BIGINT NOT NULL,
            payload BYTEA NOT NULL,
            reason TEXT NOT NULL,
            deliveries INTEGER NOT NULL,
            dead_at BIGINT NOT NULL)",
            "CREATE INDEX IF NOT EXISTS qcluster_dead_queue ON qcluster_dead (queue, id)",
            "CREATE TABLE IF NOT EXISTS qcluster_stat (
            stat_key TEXT PRIMARY KEY,
            stat_value BYTEA NOT NULL,
            expires_at BIGINT NOT NULL)",
        ],
        // Queue names and stat keys are VARBINARY: exact byte comparison, no collation padding.
        mysql: &[
            "CREATE TABLE IF NOT EXISTS qcluster_queue (
            id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
            queue VARBINARY(191) NOT NULL,
            payload LONGBLOB NOT NULL,
            priority SMALLINT NOT NULL DEFAULT 0,
            visible_at BIGINT NOT NULL,
            leased SMALLINT NOT NULL DEFAULT 0,
            deliveries INT NOT NULL DEFAULT 0,
            enqueued_at BIGINT NOT NULL,
            INDEX qcluster_queue_claim (queue, priority DESC, visible_at, id)) ENGINE=InnoDB",
            "CREATE TABLE IF NOT EXISTS qcluster_dead (
            id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
            queue VARBINARY(191) NOT NULL,
            message_id BIGINT NOT NULL,
            payload LONGBLOB NOT NULL,
            reason TEXT NOT NULL,
            deliveries INT NOT NULL,
            dead_at BIGINT NOT NULL,
            INDEX qcluster_dead_queue (queue, id)) ENGINE=InnoDB",
            "CREATE TABLE IF NOT EXISTS qcluster_stat (
            stat_key VARBINARY(191) NOT NULL PRIMARY KEY,
            stat_value LONGBLOB NOT NULL,
            expires_at BIGINT NOT NULL) ENGINE=InnoDB",
        ],
        mysql_done_if: &[],
    },
    Migration {
        version: 2,
        description: "claims keep the index key: tier and due_at indexed, the lease in lease_until",
        // `tier` is the negated priority, so that "most urgent first" is one ascending order and a
        // claim can resume from a key with a row comparison. `due_at` is when the package may run
        // (it no longer moves when a package is leased); `lease_until` is the lease deadline (0 when
        // nobody holds it). A claim changes no indexed column, so PostgreSQL updates the row in
        // place (a HOT update) when its page has room: hence fillfactor 60 there. Renaming
        // `visible_at` makes a binary of the previous layout fail at once instead of misreading
        // leases. Leases held at the upgrade keep their deadline.
        sqlite: &[
            "ALTER TABLE qcluster_queue RENAME COLUMN visible_at TO due_at",
            "ALTER TABLE qcluster_queue ADD COLUMN tier INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE qcluster_queue ADD COLUMN lease_until BIGINT NOT NULL DEFAULT 0",
            "UPDATE qcluster_queue SET tier = -priority, lease_until = CASE WHEN leased = 1 THEN due_at ELSE 0 END",
            "DROP INDEX IF EXISTS qcluster_queue_claim",
            "ALTER TABLE qcluster_queue DROP COLUMN priority",
            "CREATE INDEX IF NOT EXISTS qcluster_queue_ready ON qcluster_queue (queue, tier, due_at, id)",
        ],
        postgres: &[
            "ALTER TABLE qcluster_queue RENAME COLUMN visible_at TO due_at",
            "ALTER TABLE qcluster_queue ADD COLUMN tier INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE qcluster_queue ADD COLUMN lease_until BIGINT NOT NULL DEFAULT 0",
            "UPDATE qcluster_queue SET tier = -(priority::INTEGER), lease_until = CASE WHEN leased = 1 THEN due_at ELSE 0 END",
            "DROP INDEX IF EXISTS qcluster_queue_claim",
            "ALTER TABLE qcluster_queue DROP COLUMN priority",
            "CREATE INDEX IF NOT EXISTS qcluster_queue_ready ON qcluster_queue (queue, tier, due_at, id)",
            // Room on every page for the claim's in-place update; vacuum and analyze by row counts
            // rather than by a fraction of a table whose size swings from empty to millions.
            "ALTER TABLE qcluster_queue SET (fillfactor = 60, \
            autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 1000, \
            autovacuum_analyze_scale_factor = 0.05, autovacuum_analyze_threshold = 1000)",
        ],
        mysql: &[
            "ALTER TABLE qcluster_queue CHANGE COLUMN visible_at due_at BIGINT NOT NULL, \
            ADD COLUMN tier INT NOT NULL DEFAULT 0, ADD COLUMN lease_until BIGINT NOT NULL DEFAULT 0",
            "UPDATE qcluster_queue SET tier = -priority, lease_until = CASE WHEN leased = 1 THEN due_at ELSE 0 END",
            "ALTER TABLE qcluster_queue DROP INDEX qcluster_queue_claim, DROP COLUMN priority, \
            ADD INDEX qcluster_queue_ready (queue, tier, due_at, id)",
        ],
        mysql_done_if: &[
            Some(MYSQL_HAS_DUE_AT),
            Some(MYSQL_PRIORITY_GONE),
            Some(MYSQL_PRIORITY_GONE),
        ],
    },
    Migration {
        version: 3,
        description: "dead letters keep their tier, so a requeued one keeps its priority",
        // Adding a column with a constant default rewrites nothing on any of the three.
        sqlite: &["ALTER TABLE qcluster_dead ADD COLUMN tier INTEGER NOT NULL DEFAULT 0"],
        postgres: &["ALTER TABLE qcluster_dead ADD COLUMN tier INTEGER NOT NULL DEFAULT 0"],
        mysql: &["ALTER TABLE qcluster_dead ADD COLUMN tier INT NOT NULL DEFAULT 0"],
        mysql_done_if: &[Some(MYSQL_DEAD_HAS_TIER)],
    },
];

const MYSQL_DEAD_HAS_TIER: &str = "SELECT COUNT(*) FROM information_schema.columns \
    WHERE table_schema = DATABASE() AND table_name = 'qcluster_dead' AND column_name = 'tier'";

const MYSQL_HAS_DUE_AT: &str = "SELECT COUNT(*) FROM information_schema.columns \
    WHERE table_schema = DATABASE() AND table_name = 'qcluster_queue' AND column_name = 'due_at'";
const MYSQL_PRIORITY_GONE: &str = "SELECT 1 - COUNT(*) FROM information_schema.columns \
    WHERE table_schema = DATABASE() AND table_name = 'qcluster_queue' AND column_name = 'priority'";
