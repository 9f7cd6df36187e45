//! A connection that the server ends while a statement is in flight must give a transient
//! error (`BrokerError::Unreachable` or `Timeout`, see `BrokerError::is_transient`), so that a
//! cluster retries its settle instead of giving up: the server ends the broker's connection
//! while its `acknowledge` waits on a row lock that a connection of the test holds. (The kit's
//! `connection_loss` drops idle connections, which the pool replaces before use.)
//!
//! Each test runs in a database of its own (`common::OwnDb`), so only its connections are ended.

mod common;

#[cfg(any(feature = "postgres", feature = "mysql"))]
mod in_flight {
    use std::time::Duration;

    use broker_core::{Broker, BrokerError, Delivery, Message, QueueSettings};
    use broker_orm::{OrmBroker, OrmConfig};

    use super::common::*;

    const LOCK: &str = "SELECT id FROM qcluster_queue FOR UPDATE";

    /// A broker with one leased package in a database of its own.
    async fn leased(db: &OwnDb) -> (OrmBroker, Delivery) {
        let settings = QueueSettings {
            retry: Duration::from_secs(60),
            ..QueueSettings::for_queue("drop-in-flight")
        };
        let mut cfg = OrmConfig::new(db.url.clone());
        cfg.pool_size = Some(1);
        let b = OrmBroker::connect(&cfg, settings).await.expect("connect");
        b.enqueue(Message::new(b"x".to_vec()))
            .await
            .expect("enqueue");
        let d = b
            .dequeue()
            .await
            .expect("dequeue")
            .pop()
            .expect("a package");
        (b, d)
    }

    /// Acknowledges `d` while the row is locked elsewhere, ends the broker's connections (all
    /// but `locker`'s) once the statement waits, and returns what `acknowledge` gave.
    async fn ack_killed(
        db: &OwnDb,
        b: &OrmBroker,
        d: Delivery,
        locker: i64,
    ) -> Result<(), BrokerError> {
        let pending = tokio::spawn({
            let b = b.clone();
            async move { b.acknowledge(&d.ack).await }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            !pending.is_finished(),
            "acknowledge did not wait on the row lock"
        );
        db.drop_connections_but(&[locker])
            .await
            .expect("end the broker's connections");
        let got = tokio::time::timeout(Duration::from_secs(10), pending)
            .await
            .expect("acknowledge ended")
            .expect("no panic");
        eprintln!("acknowledge on a connection ended mid-statement gave {got:?}");
        got
    }

    fn transient(got: Result<(), BrokerError>) {
        if let Err(e) = got {
            assert!(
                e.is_transient(),
                "a connection ended mid-statement gave a non-transient error, so a cluster \
                 gives up the settle: {e} [{e:?}]"
            );
        }
    }

    /// PostgreSQL ends the session with FATAL 57P01 (`terminating connection due to
    /// administrator command`), which sqlx reports as a database error.
    #[cfg(feature = "postgres")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_ack_in_flight() {
        use sqlx::Connection as _;
        let base = postgres_url();
        if !reachable(&base).await {
            return;
        }
        let db = OwnDb::create(&base)
            .await
            .expect("database of the test's own");
        let (b, d) = leased(&db).await;
        let mut locker = sqlx::PgConnection::connect(&db.url).await.expect("locker");
        let mut tx = locker.begin().await.expect("begin");
        sqlx::query(LOCK).execute(&mut *tx).await.expect("lock");
        let me: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *tx)
            .await
            .expect("pid");
        let got = ack_killed(&db, &b, d, me.into()).await;
        let _ = tx.rollback().await;
        drop((b, locker));
        db.remove().await;
        transient(got);
    }

    #[cfg(feature = "mysql")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mariadb_ack_in_flight() {
        use sqlx::Connection as _;
        let base = mysql_url();
        if !reachable(&base).await {
            return;
        }
        let db = OwnDb::create(&base)
            .await
            .expect("database of the test's own");
        let (b, d) = leased(&db).await;
        let mut locker = sqlx::MySqlConnection::connect(&db.url)
            .await
            .expect("locker");
        let mut tx = locker.begin().await.expect("begin");
        sqlx::query(LOCK).execute(&mut *tx).await.expect("lock");
        let me: i64 = sqlx::query_scalar("SELECT CAST(CONNECTION_ID() AS SIGNED)")
            .fetch_one(&mut *tx)
            .await
            .expect("id");
        let got = ack_killed(&db, &b, d, me).await;
        let _ = tx.rollback().await;
        drop((b, locker));
        db.remove().await;
        transient(got);
    }
}
