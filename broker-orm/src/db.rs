//! Connection pools for the compiled-in backends, one enum, and the mapping of sqlx errors to
//! [`BrokerError`] with secrets removed.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use broker_core::{BrokerError, redact, url_password};

use crate::dialect::Dialect;

#[cfg(not(any(feature = "sqlite", feature = "postgres", feature = "mysql")))]
compile_error!("broker-orm needs at least one of the features `sqlite`, `postgres`, `mysql`");

/// A pool on one of the compiled-in backends.
#[derive(Clone, Debug)]
pub(crate) enum Db {
    #[cfg(feature = "sqlite")]
    Sqlite(sqlx::SqlitePool),
    #[cfg(feature = "postgres")]
    Postgres(sqlx::PgPool),
    #[cfg(feature = "mysql")]
    MySql(sqlx::MySqlPool),
}

/// Runs `$body` with `$p` bound to the concrete pool: one source, type-checked per backend.
macro_rules! on_db {
    ($db:expr, $p:ident => $body:expr) => {
        match $db {
            #[cfg(feature = "sqlite")]
            $crate::db::Db::Sqlite($p) => $body,
            #[cfg(feature = "postgres")]
            $crate::db::Db::Postgres($p) => $body,
            #[cfg(feature = "mysql")]
            $crate::db::Db::MySql($p) => $body,
        }
    };
}
pub(crate) use on_db;

/// What error messages need: which broker, where (masked), and which secret to scrub.
#[derive(Clone)]
pub(crate) struct Ctx {
    pub dialect: Dialect,
    pub endpoint: String,
    passwords: Vec<String>,
    pub timeout: Duration,
}

impl fmt::Debug for Ctx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ctx")
            .field("dialect", &self.dialect)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl Ctx {
    pub fn new(dialect: Dialect, urls: &[&str], timeout: Duration) -> Self {
        Self {
            dialect,
            endpoint: broker_core::mask_url(urls[0]),
            passwords: urls.iter().filter_map(|u| url_password(u)).collect(),
            timeout,
        }
    }

    pub fn scrub(&self, message: &str) -> String {
        self.passwords
            .iter()
            .fold(message.to_owned(), |m, pw| redact(&m, Some(pw)))
    }

    /// Maps a sqlx error from operation `op`: connection trouble is [`BrokerError::Unreachable`]
    /// (transient), a pool wait [`BrokerError::Timeout`], anything else the server's message.
    pub fn err(&self, op: &'static str) -> impl Fn(sqlx::Error) -> BrokerError + '_ {
        move |e| {
            let broker = self.dialect.broker_name();
            let message = self.scrub(&format!("{op}: {e}"));
            match e {
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed => BrokerError::Unreachable {
                    broker,
                    endpoint: self.endpoint.clone(),
                    message,
                },
                // The server ended the session (restart, `pg_terminate_backend`, `KILL`): the
                // pool reconnects, so this passes like a broken socket does.
                sqlx::Error::Database(ref d) if d.code().is_some_and(|c| session_ended(&c)) => {
                    BrokerError::Unreachable {
                        broker,
                        endpoint: self.endpoint.clone(),
                        message,
                    }
                }
                sqlx::Error::PoolTimedOut => BrokerError::Timeout {
                    broker,
                    operation: op,
                    endpoint: self.endpoint.clone(),
                    after: self.timeout,
                },
                _ => BrokerError::Backend { broker, message },
            }
        }
    }

    fn config_err(&self, key: &str, e: impl fmt::Display) -> BrokerError {
        BrokerError::config(key, self.scrub(&e.to_string()))
    }
}

/// SQLITE_BUSY or SQLITE_LOCKED (and their extended codes): another connection holds the lock.
#[cfg(feature = "sqlite")]
fn sqlite_busy(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => d
            .code()
            .and_then(|c| c.parse::<i32>().ok())
            .is_some_and(|c| matches!(c & 0xff, 5 | 6)),
        _ => false,
    }
}

/// Opens a pool on `url`, in bounded time.
pub(crate) async fn connect(
    url: &str,
    key: &str,
    ctx: &Ctx,
    pool_size: Option<u32>,
    extra: u32,
) -> Result<Db, BrokerError> {
    let timeout = ctx.timeout;
    let connecting = async {
        match ctx.dialect {
            #[cfg(feature = "sqlite")]
            Dialect::Sqlite => {
                use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
                let opts = SqliteConnectOptions::from_str(url)
                    .map_err(|e| ctx.config_err(key, e))?
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal)
                    .busy_timeout(Duration::from_secs(10));
                let mut pool = sqlx::pool::PoolOptions::new()
                    .max_connections(pool_size.unwrap_or(1) + extra)
                    .acquire_timeout(timeout);
                if opts.get_filename().to_string_lossy().contains(":memory:")
                    || url.contains(":memory:")
                {
                    // An in-memory database lives only while a connection is open: keep one.
                    pool = pool
                        .min_connections(1)
                        .idle_timeout(None)
                        .max_lifetime(None);
                }
                // Switching a new file to WAL while another process does the same can return
                // SQLITE_BUSY without consulting the busy handler: retry within the timeout.
                let deadline = tokio::time::Instant::now() + timeout;
                let mut pause = Duration::from_millis(10);
                loop {
                    match pool.clone().connect_with(opts.clone()).await {
                        Ok(p) => break Ok(Db::Sqlite(p)),
                        Err(e) if sqlite_busy(&e) && tokio::time::Instant::now() < deadline => {
                            tracing::debug!("sqlite busy at connect, retrying in {pause:?}");
                            tokio::time::sleep(pause).await;
                            pause = (pause * 2).min(Duration::from_millis(200));
                        }
                        Err(e) => break Err(ctx.err("connect")(e)),
                    }
                }
            }
            #[cfg(feature = "postgres")]
            Dialect::Postgres => {
                let opts = sqlx::postgres::PgConnectOptions::from_str(url)
                    .map_err(|e| ctx.config_err(key, e))?
                    .application_name("qcluster");
                sqlx::pool::PoolOptions::new()
                    .max_connections(pool_size.unwrap_or(8) + extra)
                    .acquire_timeout(timeout)
                    .connect_with(opts)
                    .await
                    .map(Db::Postgres)
                    .map_err(ctx.err("connect"))
            }
            #[cfg(feature = "mysql")]
            Dialect::MySql => {
                use sqlx::Executor as _;
                let opts = sqlx::mysql::MySqlConnectOptions::from_str(url)
                    .map_err(|e| ctx.config_err(key, e))?;
                sqlx::pool::PoolOptions::new()
                    .max_connections(pool_size.unwrap_or(8) + extra)
                    .acquire_timeout(timeout)
                    // No gap locks: claims must not block enqueues. UTC session: the clock
                    // expression must not jump at daylight-saving changes.
                    .after_connect(|conn: &mut sqlx::MySqlConnection, _| {
                        Box::pin(async move {
                            conn.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                                .await?;
                            conn.execute("SET time_zone = '+00:00'").await?;
                            Ok(())
                        })
                    })
                    .connect_with(opts)
                    .await
                    .map(Db::MySql)
                    .map_err(ctx.err("connect"))
            }
            #[allow(unreachable_patterns)]
            other => Err(BrokerError::config(
                key,
                format!(
                    "{} support is not compiled in; build with the `{}` feature",
                    other.broker_name(),
                    other.feature()
                ),
            )),
        }
    };
    match tokio::time::timeout(timeout + Duration::from_millis(500), connecting).await {
        Ok(r) => r,
        Err(_) => Err(BrokerError::Timeout {
            broker: ctx.dialect.broker_name(),
            operation: "connect",
            endpoint: ctx.endpoint.clone(),
            after: timeout,
        }),
    }
}

/// SQLSTATEs that mean the server ended this session, not that the statement was wrong: class
/// 08 (connection exception), PostgreSQL's `admin_shutdown`, `crash_shutdown` and
/// `cannot_connect_now` (57P01–57P03), and MariaDB's `ER_CONNECTION_KILLED` (70100).
fn session_ended(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "70100")
}

/// True for SQLite's "database is busy / locked": another connection holds the write lock.
pub fn is_busy(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        // SQLITE_BUSY (5) and SQLITE_LOCKED (6), extended codes included (their low byte).
        .is_some_and(|c| c.parse::<i32>().is_ok_and(|n| matches!(n & 0xff, 5 | 6)))
}
