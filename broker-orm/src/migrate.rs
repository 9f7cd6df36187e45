//! Embedded schema migrations, recorded in `qcluster_migrations` (our own table, so an
//! application's own migration tool in the same database is never confused by ours).
//!
//! Every statement is idempotent (`IF NOT EXISTS`), and PostgreSQL and MySQL run them under a
//! named lock, so several clusters starting at once upgrade the schema exactly once.

use crate::dialect::Dialect;

/// One schema version, with its statements per backend.
pub struct Migration {
    pub version: i64,
    pub description: &'static str,
    pub sqlite: &'static [&'static str],
    pub postgres: &'static [&'static str],
    pub mysql: &'static [&'static str],
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
pub const MIGRATIONS: &[Migration] = &[Migration {
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
}];
