//! Shared helpers: server URLs, loud skips, broker factories.
#![allow(dead_code)]

use std::sync::Arc;

use broker_core::testkit::{BrokerFuture, Kit};
use broker_core::{Broker, QueueSettings};
use broker_orm::{OrmBroker, OrmConfig};

/// The password put in URLs so that the kit can check it never leaks (trust auth ignores it).
pub const SECRET: &str = "kit-Secret-pw-8731";

pub fn postgres_url() -> String {
    std::env::var("QCLUSTER_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| format!("postgres://postgres:{SECRET}@127.0.0.1:5432/test"))
}

pub fn mysql_url() -> String {
    std::env::var("QCLUSTER_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
}

/// Opens a broker, or says loudly why the test is skipped. With `QCLUSTER_REQUIRE_SERVICES=1`
/// (set by `scripts/test`) an unreachable server fails the test instead.
pub async fn reachable(url: &str) -> bool {
    match OrmBroker::connect(&OrmConfig::new(url), QueueSettings::for_queue("probe")).await {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("QCLUSTER_REQUIRE_SERVICES").as_deref() == Ok("1") {
                panic!("server required but unreachable: {e}");
            }
            eprintln!("skipped: {e}");
            false
        }
    }
}

pub fn factory(url: String) -> impl Fn(QueueSettings) -> BrokerFuture + Send + Sync + 'static {
    move |s| {
        let url = url.clone();
        Box::pin(async move {
            let b = OrmBroker::connect(&OrmConfig::new(url), s).await?;
            Ok(Arc::new(b) as Arc<dyn Broker>)
        })
    }
}

pub fn kit(url: String, unreachable: String) -> Kit {
    Kit::new(factory(url)).secret(SECRET).unreachable(move || {
        let url = unreachable.clone();
        Box::pin(async move {
            let mut cfg = OrmConfig::new(url);
            cfg.connect_timeout = std::time::Duration::from_secs(3);
            let b = OrmBroker::connect(&cfg, QueueSettings::for_queue("unreachable")).await?;
            Ok(Arc::new(b) as Arc<dyn Broker>)
        })
    })
}

#[cfg(any(feature = "postgres", feature = "mysql"))]
#[allow(unused_imports)]
pub use own_db::OwnDb;

/// Databases of the kit's own on the shared servers (see [`OwnDb`]).
#[cfg(any(feature = "postgres", feature = "mysql"))]
mod own_db {
    use broker_core::testkit::DisconnectFuture;

    /// A database made for one run of the kit on a shared server (other tests use it at the same
    /// time): the kit's brokers are the only clients of that database, so the disconnect hook can
    /// drop exactly their connections. Removed by [`OwnDb::remove`].
    pub struct OwnDb {
        /// The server URL with the database replaced by this one.
        pub url: String,
        name: String,
        admin: Admin,
    }

    #[derive(Clone)]
    enum Admin {
        #[cfg(feature = "postgres")]
        Postgres(sqlx::PgPool),
        #[cfg(feature = "mysql")]
        MySql(sqlx::MySqlPool),
    }

    impl OwnDb {
        /// Creates `qkit_<random>` next to the database of `base` (PostgreSQL or MariaDB/MySQL),
        /// connecting as `base`'s user.
        pub async fn create(base: &str) -> Result<Self, String> {
            let name = format!("qkit_{}", &uuid::Uuid::now_v7().simple().to_string()[16..]);
            let mut url = url::Url::parse(base).map_err(|e| format!("bad URL: {e}"))?;
            let admin = match url.scheme() {
                #[cfg(feature = "postgres")]
                "postgres" | "postgresql" => {
                    let pool = sqlx::postgres::PgPoolOptions::new()
                        .max_connections(1)
                        .connect(base)
                        .await
                        .map_err(|e| format!("admin connection: {e}"))?;
                    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
                        .execute(&pool)
                        .await
                        .map_err(|e| format!("CREATE DATABASE {name}: {e}"))?;
                    Admin::Postgres(pool)
                }
                #[cfg(feature = "mysql")]
                "mysql" | "mariadb" => {
                    let pool = sqlx::mysql::MySqlPoolOptions::new()
                        .max_connections(1)
                        .connect(base)
                        .await
                        .map_err(|e| format!("admin connection: {e}"))?;
                    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE `{name}`")))
                        .execute(&pool)
                        .await
                        .map_err(|e| format!("CREATE DATABASE {name}: {e}"))?;
                    Admin::MySql(pool)
                }
                other => return Err(format!("no database of its own on {other}://")),
            };
            url.set_path(&format!("/{name}"));
            Ok(Self {
                url: url.to_string(),
                name,
                admin,
            })
        }

        /// The kit's disconnect hook: the server drops every connection to this database (and
        /// only those), and the hook returns once they are gone.
        pub fn hook(&self) -> impl Fn() -> DisconnectFuture + Send + Sync + 'static {
            let (admin, name) = (self.admin.clone(), self.name.clone());
            move || {
                let (admin, name) = (admin.clone(), name.clone());
                Box::pin(async move { drop_connections(&admin, &name, &[]).await })
            }
        }

        /// Like the hook, but spares the connections with these server ids
        /// (`pg_backend_pid()`, `CONNECTION_ID()`).
        pub async fn drop_connections_but(&self, spare: &[i64]) -> Result<(), String> {
            drop_connections(&self.admin, &self.name, spare).await
        }

        /// Drops the database (its connections first).
        pub async fn remove(self) {
            let _ = drop_connections(&self.admin, &self.name, &[]).await;
            let result = match &self.admin {
                #[cfg(feature = "postgres")]
                Admin::Postgres(p) => sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                    self.name
                )))
                .execute(p)
                .await
                .map(drop),
                #[cfg(feature = "mysql")]
                Admin::MySql(p) => sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS `{}`",
                    self.name
                )))
                .execute(p)
                .await
                .map(drop),
            };
            if let Err(e) = result {
                eprintln!("could not drop the kit's database {}: {e}", self.name);
            }
        }
    }

    #[cfg(feature = "postgres")]
    const PG_CONNECTIONS: &str =
        "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()";
    #[cfg(feature = "mysql")]
    const MYSQL_CONNECTIONS: &str = "SELECT CAST(ID AS SIGNED) FROM information_schema.PROCESSLIST \
         WHERE DB = ? AND ID <> CONNECTION_ID()";

    /// Makes the server close every connection to database `name` but the caller's and
    /// `spare`; waits (at most 10 s) until they are gone. An error if there was none: the kit's
    /// brokers hold some.
    async fn drop_connections(admin: &Admin, name: &str, spare: &[i64]) -> Result<(), String> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut killed: Option<Vec<i64>> = None;
        loop {
            let now: Vec<i64> = match admin {
                #[cfg(feature = "postgres")]
                Admin::Postgres(p) => sqlx::query_scalar::<_, i32>(PG_CONNECTIONS)
                    .bind(name)
                    .fetch_all(p)
                    .await
                    .map_err(|e| format!("pg_stat_activity: {e}"))?
                    .into_iter()
                    .map(i64::from)
                    .collect(),
                #[cfg(feature = "mysql")]
                Admin::MySql(p) => sqlx::query_scalar::<_, i64>(MYSQL_CONNECTIONS)
                    .bind(name)
                    .fetch_all(p)
                    .await
                    .map_err(|e| format!("PROCESSLIST: {e}"))?,
            };
            let now: Vec<i64> = now.into_iter().filter(|id| !spare.contains(id)).collect();
            let Some(killed) = &killed else {
                if now.is_empty() {
                    return Err(format!("no connection to database {name} to drop"));
                }
                for id in &now {
                    match admin {
                        #[cfg(feature = "postgres")]
                        Admin::Postgres(p) => {
                            sqlx::query("SELECT pg_terminate_backend($1)")
                                .bind(*id as i32)
                                .execute(p)
                                .await
                                .map_err(|e| format!("pg_terminate_backend: {e}"))?;
                        }
                        #[cfg(feature = "mysql")]
                        Admin::MySql(p) => {
                            // Gone meanwhile (error 1094, unknown thread) is fine.
                            let _ =
                                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("KILL CONNECTION {id}")))
                                    .execute(p)
                                    .await;
                        }
                    }
                }
                killed = Some(now);
                continue;
            };
            // The brokers may reconnect meanwhile: only the killed connections must be gone.
            let left = now.iter().filter(|id| killed.contains(id)).count();
            if left == 0 {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(format!(
                    "{left} of the {} connections to {name} still there after 10 s",
                    killed.len()
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}
