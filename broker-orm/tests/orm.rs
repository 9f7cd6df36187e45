//! Behaviour specific to the SQL broker: errors, replica, wake-ups, migrations.
#![cfg_attr(not(all(feature = "postgres", feature = "mysql")), allow(dead_code))]

mod common;

use std::time::{Duration, Instant};

use broker_core::{AckId, Broker, BrokerError, Message, QueueSettings};
use broker_orm::{OrmBroker, OrmConfig};
use common::*;

fn queue(name: &str) -> QueueSettings {
    QueueSettings::for_queue(format!("orm-{name}-{}", uuid::Uuid::now_v7().simple()))
}

async fn open(url: &str, s: QueueSettings) -> OrmBroker {
    OrmBroker::connect(&OrmConfig::new(url), s)
        .await
        .unwrap_or_else(|e| panic!("connect {}: {e}", broker_core::mask_url(url)))
}

/// The error names the host, masks the password, and comes within the connect timeout.
async fn assert_unreachable(url: &str) {
    let mut cfg = OrmConfig::new(url);
    cfg.connect_timeout = Duration::from_secs(2);
    let t0 = Instant::now();
    let e = OrmBroker::connect(&cfg, QueueSettings::for_queue("q"))
        .await
        .unwrap_err();
    let took = t0.elapsed();
    let text = e.to_string();
    assert!(took < Duration::from_secs(5), "took {took:?}: {text}");
    assert!(text.contains("127.0.0.1:1"), "host not named: {text}");
    assert!(
        !text.contains(SECRET) && !format!("{e:?}").contains(SECRET),
        "password leaked: {text}"
    );
    assert!(text.contains("***"), "password not shown masked: {text}");
    assert!(
        e.is_transient(),
        "connection failure should be transient: {e:?}"
    );
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn unreachable_postgres_names_host_and_masks_password() {
    assert_unreachable(&format!("postgres://postgres:{SECRET}@127.0.0.1:1/test")).await;
}

#[cfg(feature = "mysql")]
#[tokio::test]
async fn unreachable_mariadb_names_host_and_masks_password() {
    assert_unreachable(&format!("mysql://root:{SECRET}@127.0.0.1:1/test")).await;
}

#[tokio::test]
async fn bad_urls_and_settings_name_the_key() {
    let e = OrmBroker::connect(
        &OrmConfig::new(format!("redis://u:{SECRET}@h/0")),
        queue("x"),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&e, BrokerError::Config { key, .. } if key == "orm.url"),
        "{e:?}"
    );
    assert!(!e.to_string().contains(SECRET), "{e}");

    let mut s = queue("bulk");
    s.bulk = 0;
    let e = OrmBroker::connect(&OrmConfig::new("sqlite::memory:"), s)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, BrokerError::Config { key, .. } if key == "bulk"),
        "{e:?}"
    );

    let mut s = queue("bulk");
    s.bulk = broker_orm::MAX_BULK + 1;
    let e = OrmBroker::connect(&OrmConfig::new("sqlite::memory:"), s)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("at most 1000"), "{e}");

    let mut cfg = OrmConfig::new("sqlite::memory:");
    cfg.replica_url = Some("postgres://h/db".into());
    let e = OrmBroker::connect(&cfg, queue("r")).await.unwrap_err();
    assert!(
        matches!(&e, BrokerError::Config { key, .. } if key == "orm.replica_url"),
        "{e:?}"
    );
}

#[tokio::test]
async fn malformed_receipts_are_typed_errors() {
    let b = open("sqlite::memory:", queue("receipt")).await;
    for bad in ["", "12", "x:1", "1:y", "1:2:3"] {
        let e = b.acknowledge(&AckId::new(bad)).await.unwrap_err();
        assert!(
            matches!(e, BrokerError::InvalidReceipt { .. }),
            "{bad:?}: {e:?}"
        );
        let e = b.fail(&AckId::new(bad)).await.unwrap_err();
        assert!(
            matches!(e, BrokerError::InvalidReceipt { .. }),
            "{bad:?}: {e:?}"
        );
    }
}

#[tokio::test]
async fn replica_serves_queue_size_and_info() {
    let dir = tempfile::tempdir().expect("temp dir");
    let primary = format!("sqlite://{}/primary.sqlite3", dir.path().display());
    let replica = format!("sqlite://{}/replica.sqlite3", dir.path().display());
    let s = queue("replica");
    // The replica has the schema (a real replica gets it from the primary) but not the rows.
    drop(open(&replica, s.clone()).await);
    let mut cfg = OrmConfig::new(&primary);
    cfg.replica_url = Some(replica.clone());
    let b = OrmBroker::connect(&cfg, s.clone())
        .await
        .expect("connect with replica");
    for i in 0..3u8 {
        b.enqueue(Message::new(vec![i; 40])).await.expect("enqueue");
    }
    assert_eq!(
        b.queue_size().await.expect("size"),
        0,
        "queue_size must read the replica"
    );
    assert_eq!(open(&primary, s).await.queue_size().await.expect("size"), 3);
    let info = b.info().await.expect("info");
    assert!(info.details.contains_key("replica"), "{info:?}");
}

#[tokio::test]
async fn migrations_run_once_and_are_recorded() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}/m.sqlite3", dir.path().display());
    for _ in 0..3 {
        drop(open(&url, queue("mig")).await);
    }
    let pool = sqlx::SqlitePool::connect(&url).await.expect("pool");
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM qcluster_migrations")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(n, broker_orm_migrations());
}

/// SQLite has no named lock: four first starts at once on a new file must all succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_concurrent_first_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}/race.sqlite3", dir.path().display());
    first_start_four_at_once(&url).await;
}

fn broker_orm_migrations() -> i64 {
    broker_orm::migrate::MIGRATIONS.len() as i64
}

fn fresh_db_url(url: &str) -> (String, String) {
    let name = format!(
        "qcluster_mig_{}",
        &uuid::Uuid::now_v7().simple().to_string()[18..]
    );
    let (base, _) = url.rsplit_once('/').expect("url has a database");
    (name.clone(), format!("{base}/{name}"))
}

/// Four clusters starting at once on an empty database: every one starts, the schema is made once.
async fn first_start_four_at_once(url: &str) {
    let mut joins = Vec::new();
    for k in 0..4 {
        let url = url.to_owned();
        joins.push(tokio::spawn(async move {
            OrmBroker::connect(
                &OrmConfig::new(url),
                QueueSettings::for_queue(format!("m{k}")),
            )
            .await
            .map(drop)
        }));
    }
    for j in joins {
        j.await.expect("join").expect("concurrent first start");
    }
    let b = open(url, queue("after")).await;
    b.enqueue(Message::new(vec![1; 40]))
        .await
        .expect("enqueue after migration");
}

/// A test on a database of its own: creates it through `$admin_url`, runs `$body(url)` (an
/// async block given the new database's URL), checks the schema versions recorded there, and
/// drops it.
macro_rules! fresh_db_test {
    ($name:ident, $feature:literal, $pool:ty, $admin_url:expr, $drop_suffix:literal, |$url:ident| $body:expr) => {
        #[cfg(feature = $feature)]
        #[tokio::test]
        async fn $name() {
            use sqlx::AssertSqlSafe;
            let admin_url = $admin_url;
            if !reachable(&admin_url).await {
                return;
            }
            let (name, $url) = fresh_db_url(&admin_url);
            let admin = <$pool>::connect(&admin_url).await.expect("admin");
            sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&admin)
                .await
                .expect("create database");
            $body;
            let pool = <$pool>::connect(&$url).await.expect("pool");
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM qcluster_migrations")
                .fetch_one(&pool)
                .await
                .expect("count");
            pool.close().await;
            sqlx::query(AssertSqlSafe(format!(
                "DROP DATABASE {name}{}",
                $drop_suffix
            )))
            .execute(&admin)
            .await
            .expect("drop database");
            assert_eq!(n, broker_orm_migrations());
        }
    };
}

// Four brokers start at once on an empty database: every one starts, the schema is made once.
fresh_db_test!(
    postgres_concurrent_first_start_migrates_once,
    "postgres",
    sqlx::PgPool,
    postgres_url(),
    " WITH (FORCE)",
    |url| first_start_four_at_once(&url).await
);
fresh_db_test!(
    mariadb_concurrent_first_start_migrates_once,
    "mysql",
    sqlx::MySqlPool,
    mysql_url(),
    "",
    |url| first_start_four_at_once(&url).await
);

#[cfg(feature = "mysql")]
#[tokio::test]
async fn mariadb_limit_follows_max_allowed_packet() {
    let url = mysql_url();
    if !reachable(&url).await {
        return;
    }
    let mut s = queue("packet");
    s.max_message_size = Some(2 << 30);
    let e = OrmBroker::connect(&OrmConfig::new(&url), s)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, BrokerError::Config { key, message } if key == "max_message_size" && message.contains("max_allowed_packet")),
        "{e:?}"
    );
    let b = open(&url, queue("packet")).await;
    let cap = broker_core::Broker::capabilities(&b).max_message_size;
    assert!(cap > 1024 * 1024 && cap <= 16 * 1024 * 1024, "limit {cap}");
}

/// `info` shows what matters for the upkeep of each backend's queue: InnoDB's history list on
/// MariaDB, the write-ahead log and free pages on SQLite.
#[cfg(feature = "mysql")]
#[tokio::test]
async fn mariadb_info_shows_the_history_list() {
    let url = mysql_url();
    if !reachable(&url).await {
        return;
    }
    let b = open(&url, queue("upkeep")).await;
    let info = b.info().await.expect("info");
    let h = info
        .details
        .get("server.innodb_history_list_length")
        .unwrap_or_else(|| panic!("no history list length: {:?}", info.details));
    assert!(h.parse::<i64>().is_ok_and(|h| h >= 0), "{h}");
}

#[cfg(feature = "sqlite")]
#[tokio::test]
async fn sqlite_info_shows_the_write_ahead_log() {
    let dir = tempfile::tempdir().expect("dir");
    let url = format!("sqlite://{}/upkeep.sqlite3", dir.path().display());
    let b = open(&url, queue("upkeep")).await;
    for _ in 0..200 {
        b.enqueue(Message::new(vec![7u8; 4096]))
            .await
            .expect("enqueue");
    }
    let info = b.info().await.expect("info");
    let d = &info.details;
    assert_eq!(
        d.get("server.journal_mode").map(String::as_str),
        Some("wal"),
        "{d:?}"
    );
    let wal: u64 = d
        .get("server.wal_bytes")
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no WAL size: {d:?}"));
    let on_disk = std::fs::metadata(dir.path().join("upkeep.sqlite3-wal")).map_or(0, |m| m.len());
    assert!(wal > 0 && wal == on_disk, "wal {wal}, file {on_disk}");
    assert!(d.contains_key("server.free_bytes"), "{d:?}");
    assert!(
        info.notes.iter().all(|n| !n.starts_with("WARNING")),
        "{:?}",
        info.notes
    );
}

/// With LISTEN/NOTIFY a waiting consumer wakes when another connection enqueues, long before its
/// poll interval: without the notification this dequeue would come back empty after 8 s.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_notify_wakes_a_waiting_consumer() {
    let url = postgres_url();
    if !reachable(&url).await {
        return;
    }
    let mut s = queue("notify");
    s.poll = Duration::from_secs(10);
    s.wait = Duration::from_secs(8);
    let consumer = open(&url, s.clone()).await;
    let producer = open(&url, s).await;
    // Let the LISTEN connection come up.
    for _ in 0..50 {
        let info = consumer.info().await.expect("info");
        if info
            .details
            .get("wake_up")
            .is_some_and(|w| w.starts_with("LISTEN"))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let waiting = tokio::spawn(async move {
        let t0 = Instant::now();
        let got = consumer.dequeue().await.expect("dequeue");
        (got.len(), t0.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    producer
        .enqueue(Message::new(vec![7; 40]))
        .await
        .expect("enqueue");
    let (n, took) = waiting.await.expect("join");
    assert_eq!(n, 1, "the waiting consumer got nothing");
    assert!(
        took < Duration::from_secs(3),
        "woke after {took:?}: notification not used"
    );
}

/// Eight concurrent `requeue_dead` of one dead letter (each on a handle of its own): exactly one
/// answers `true`, the package is in the queue exactly once, and the dead letter is gone.
async fn concurrent_requeue_of_one_dead_letter(url: &str) {
    let s = queue("redead");
    let b = open(url, s.clone()).await;
    b.enqueue(Message::new(b"only once".to_vec()))
        .await
        .expect("enqueue");
    let got = b.dequeue().await.expect("dequeue");
    b.dead_letter(&got[0].ack, "given up")
        .await
        .expect("dead_letter");
    let id = b.dead_letters(10).await.expect("list")[0]
        .message_id
        .clone();
    let mut joins = Vec::new();
    for _ in 0..8 {
        let h = open(url, s.clone()).await;
        let id = id.clone();
        joins.push(tokio::spawn(async move { h.requeue_dead(&id).await }));
    }
    let mut yes = 0;
    for j in joins {
        if j.await.expect("join").expect("requeue_dead") {
            yes += 1;
        }
    }
    assert_eq!(yes, 1, "exactly one requeue succeeds");
    assert_eq!(b.queue_size().await.expect("size"), 1, "stored once");
    assert_eq!(b.dead_letter_size().await.expect("dead"), Some(0));
    let again = b.dequeue().await.expect("dequeue");
    assert_eq!(again[0].payload, b"only once");
    assert_eq!(again[0].deliveries, Some(1), "a fresh first delivery");
    b.delete_queue().await.expect("delete_queue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_concurrent_requeue_dead() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}/redead.sqlite3", dir.path().display());
    concurrent_requeue_of_one_dead_letter(&url).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_concurrent_requeue_dead() {
    let url = postgres_url();
    if reachable(&url).await {
        concurrent_requeue_of_one_dead_letter(&url).await;
    }
}

#[cfg(feature = "mysql")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mariadb_concurrent_requeue_dead() {
    let url = mysql_url();
    if reachable(&url).await {
        concurrent_requeue_of_one_dead_letter(&url).await;
    }
}

/// Microseconds since the Unix epoch, as the broker's SQL clock counts them.
fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_micros() as i64
}

/// A database on the first layout (schema version 1) holding packages in every state: ready
/// at priority 0 and 5, delayed by an hour, leased for an hour, and leased with the lease run
/// out. Inserted with the first layout's own columns.
macro_rules! fill_v1 {
    ($pool:expr, $dialect:expr, $queue:expr) => {{
        use sqlx::AssertSqlSafe;
        let m = &broker_orm::migrate::MIGRATIONS[0];
        sqlx::query(broker_orm::migrate::bookkeeping($dialect))
            .execute($pool)
            .await
            .expect("bookkeeping table");
        for stmt in m.statements($dialect) {
            sqlx::query(AssertSqlSafe(*stmt))
                .execute($pool)
                .await
                .expect("version 1 schema");
        }
        sqlx::query("INSERT INTO qcluster_migrations (version, description, applied_at) VALUES (1, 'v1', 0)")
            .execute($pool)
            .await
            .expect("record version 1");
        let now = now_us();
        let hour = 3_600_000_000i64;
        // (payload, priority, visible_at, leased, deliveries)
        let rows: [(&[u8], i16, i64, i16, i32); 6] = [
            (b"ready-p0", 0, now - 2_000_000, 0, 0),
            // The lowest priority there is: its negation does not fit a SMALLINT.
            (b"ready-min", i16::MIN, now - 3_000_000, 0, 0),
            (b"ready-p5", 5, now - 1_000_000, 0, 0),
            (b"delayed", 0, now + hour, 0, 0),
            (b"held", 0, now + hour, 1, 1),
            (b"lapsed", 0, now - 500_000, 1, 1),
        ];
        let insert = match $dialect {
            broker_orm::Dialect::Postgres => "INSERT INTO qcluster_queue (queue, payload, priority, visible_at, leased, deliveries, enqueued_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            _ => "INSERT INTO qcluster_queue (queue, payload, priority, visible_at, leased, deliveries, enqueued_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        };
        for (payload, priority, visible, leased, deliveries) in rows {
            sqlx::query(insert)
                .bind($queue)
                .bind(payload)
                .bind(priority)
                .bind(visible)
                .bind(leased)
                .bind(deliveries)
                .bind(now - hour)
                .execute($pool)
                .await
                .expect("insert a version 1 row");
        }
        let held: i64 = sqlx::query_scalar(match $dialect {
            broker_orm::Dialect::Postgres => "SELECT id FROM qcluster_queue WHERE queue = $1 AND leased = 1 AND deliveries = 1 ORDER BY id LIMIT 1",
            _ => "SELECT id FROM qcluster_queue WHERE queue = ? AND leased = 1 AND deliveries = 1 ORDER BY id LIMIT 1",
        })
        .bind($queue)
        .fetch_one($pool)
        .await
        .expect("held row");
        held
    }};
}

/// Connects to `$url` as `$pool`, fills it on the first layout (`fill_v1!`) and returns the held
/// package's id.
macro_rules! v1_database {
    ($pool:ty, $dialect:expr, $url:expr) => {{
        let pool = <$pool>::connect($url).await.expect("pool");
        let held = fill_v1!(&pool, $dialect, "up");
        pool.close().await;
        held
    }};
}

/// Opens a broker on a database filled by `fill_v1!` (which upgrades it) and checks that every
/// package kept its state: the held lease still counts as held and its receipt still settles
/// it, the lapsed lease and the ready packages come back in priority order, the delayed one
/// stays back, and the upgrade is recorded.
async fn check_upgraded(url: &str, queue: &str, held: i64) {
    let mut s = QueueSettings::for_queue(queue);
    s.bulk = 10;
    let b = open(url, s).await;
    assert_eq!(
        b.lock_size().await.expect("lock_size"),
        Some(1),
        "the held lease"
    );
    assert_eq!(
        b.queue_size().await.expect("queue_size"),
        5,
        "ready, delayed and lapsed packages wait"
    );
    let got = b.dequeue().await.expect("dequeue");
    let payloads: Vec<&[u8]> = got.iter().map(|d| &d.payload[..]).collect();
    assert_eq!(
        payloads,
        vec![
            &b"ready-p5"[..],
            &b"ready-p0"[..],
            &b"lapsed"[..],
            &b"ready-min"[..]
        ],
        "priority first, then enqueue order; the delayed and the held package stay back"
    );
    assert_eq!(
        got[2].deliveries,
        Some(2),
        "the lapsed lease's redelivery counts"
    );
    b.acknowledge_many(&got.iter().map(|d| d.ack.clone()).collect::<Vec<_>>())
        .await
        .expect("ack");
    // The receipt handed out before the upgrade still settles its package.
    b.acknowledge(&AckId::new(format!("{held}:1")))
        .await
        .expect("ack the held package");
    assert_eq!(b.lock_size().await.expect("lock_size"), Some(0));
    assert_eq!(
        b.queue_size().await.expect("queue_size"),
        1,
        "the delayed one"
    );
    b.purge_queue().await.expect("purge");
    assert_eq!(b.queue_size().await.expect("queue_size"), 0);
}

#[tokio::test]
async fn sqlite_upgrade_from_the_first_layout_keeps_every_package() {
    use std::str::FromStr;
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}/v1.sqlite3", dir.path().display());
    let opts = sqlx::sqlite::SqliteConnectOptions::from_str(&url)
        .expect("url")
        .create_if_missing(true);
    let pool = sqlx::SqlitePool::connect_with(opts).await.expect("pool");
    let held = fill_v1!(&pool, broker_orm::Dialect::Sqlite, "up");
    pool.close().await;
    check_upgraded(&url, "up", held).await;
}

// A database on the first layout, filled, then upgraded by a broker's first start.
fresh_db_test!(
    postgres_upgrade_from_the_first_layout_keeps_every_package,
    "postgres",
    sqlx::PgPool,
    postgres_url(),
    " WITH (FORCE)",
    |url| {
        let held = v1_database!(sqlx::PgPool, broker_orm::Dialect::Postgres, &url);
        check_upgraded(&url, "up", held).await;
    }
);
fresh_db_test!(
    mariadb_upgrade_from_the_first_layout_keeps_every_package,
    "mysql",
    sqlx::MySqlPool,
    mysql_url(),
    "",
    |url| {
        let held = v1_database!(sqlx::MySqlPool, broker_orm::Dialect::MySql, &url);
        check_upgraded(&url, "up", held).await;
    }
);
// MySQL commits each DDL statement on its own: an upgrade that stopped after its first
// statement completes on the next start, and no package is lost.
fresh_db_test!(
    mariadb_interrupted_upgrade_completes,
    "mysql",
    sqlx::MySqlPool,
    mysql_url(),
    "",
    |url| {
        let held = v1_database!(sqlx::MySqlPool, broker_orm::Dialect::MySql, &url);
        // The first statement of version 2 ran; the process died before the rest.
        let pool = sqlx::MySqlPool::connect(&url).await.expect("pool");
        sqlx::query(AssertSqlSafe(broker_orm::migrate::MIGRATIONS[1].mysql[0]))
            .execute(&pool)
            .await
            .expect("first statement of version 2");
        pool.close().await;
        check_upgraded(&url, "up", held).await;
    }
);

/// The claim resumes from where the last one ended (on PostgreSQL, the handle's floor): these
/// check that no package is left behind below that point. Each runs on every backend; the
/// promise is the same everywhere.
mod resume {
    use super::*;
    use broker_core::Delivery;

    async fn drain_some(b: &OrmBroker, rounds: usize) -> Vec<Delivery> {
        let mut got = Vec::new();
        for _ in 0..rounds {
            got.extend(b.dequeue().await.expect("dequeue"));
        }
        got
    }

    async fn ack(b: &OrmBroker, ds: &[Delivery]) {
        b.acknowledge_many(&ds.iter().map(|d| d.ack.clone()).collect::<Vec<_>>())
            .await
            .expect("ack");
    }

    fn settings(name: &str, bulk: usize, retry: Duration) -> QueueSettings {
        let mut s = queue(name);
        s.bulk = bulk;
        s.retry = retry;
        s.wait = Duration::from_millis(200);
        s
    }

    /// After a handle has drained part of a queue, a package of higher priority enqueued
    /// through another handle (another process, as far as the database can tell) comes next.
    async fn higher_priority_from_elsewhere_goes_first(url: &str) {
        let s = settings("prio", 5, Duration::from_secs(30));
        let a = open(url, s.clone()).await;
        let other = open(url, s).await;
        let low: Vec<Message> = (0..50u8).map(|k| Message::new(vec![k; 8])).collect();
        a.enqueue_many(low).await.expect("enqueue");
        let first = drain_some(&a, 3).await;
        assert_eq!(first.len(), 15);
        ack(&a, &first).await;
        other
            .enqueue(Message::new(b"urgent".to_vec()).with_priority(5))
            .await
            .expect("enqueue urgent");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let next = a.dequeue().await.expect("dequeue");
        assert_eq!(
            next.first().map(|d| &d.payload[..]),
            Some(&b"urgent"[..]),
            "the higher-priority package comes first"
        );
        a.delete_queue().await.expect("delete queue");
    }

    /// Leases that run out behind the point the claims have reached (a consumer died holding
    /// them) are all delivered again soon after, while the rest of the queue is still being
    /// worked, not `bulk` at a time per scan from the bottom.
    async fn lapsed_leases_behind_come_back(url: &str) {
        let retry = Duration::from_secs(1);
        let a = open(url, settings("lapse", 5, retry)).await;
        let many: Vec<Message> = (0..4000u16)
            .map(|k| Message::new(k.to_be_bytes().to_vec()))
            .collect();
        a.enqueue_many(many).await.expect("enqueue");
        // A consumer takes 20 and dies: their leases run out in `retry`.
        let mut dropped: std::collections::HashSet<Vec<u8>> = drain_some(&a, 4)
            .await
            .into_iter()
            .map(|d| d.payload)
            .collect();
        assert_eq!(dropped.len(), 20);
        let t0 = Instant::now();
        while !dropped.is_empty() {
            let got = a.dequeue().await.expect("dequeue");
            assert!(
                !got.is_empty(),
                "the queue ran dry before the lapsed packages came back"
            );
            for d in &got {
                if dropped.remove(&d.payload) {
                    assert_eq!(d.deliveries, Some(2));
                }
            }
            ack(&a, &got).await;
            assert!(
                t0.elapsed() < retry + Duration::from_millis(2500),
                "{} lapsed packages not delivered again within retry + 2.5 s",
                dropped.len()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        a.delete_queue().await.expect("delete queue");
    }

    /// A delayed package of higher priority comes due while the claims work through
    /// lower-priority ones: it is delivered within about a second of coming due.
    async fn a_delayed_urgent_package_is_not_passed_over(url: &str) {
        let a = open(url, settings("delayed", 5, Duration::from_secs(30))).await;
        let wait = Duration::from_millis(800);
        let t0 = Instant::now();
        a.enqueue(
            Message::new(b"urgent".to_vec())
                .with_priority(5)
                .with_delay(wait),
        )
        .await
        .expect("enqueue urgent");
        let low: Vec<Message> = (0..3000u16)
            .map(|k| Message::new(k.to_be_bytes().to_vec()))
            .collect();
        a.enqueue_many(low).await.expect("enqueue");
        loop {
            let got = a.dequeue().await.expect("dequeue");
            assert!(
                !got.is_empty(),
                "the queue ran dry before the urgent package came"
            );
            if got.iter().any(|d| d.payload == b"urgent") {
                assert!(t0.elapsed() >= wait, "delivered before its delay");
                break;
            }
            ack(&a, &got).await;
            assert!(
                t0.elapsed() < wait + Duration::from_secs(3),
                "the urgent package was not delivered within 3 s of coming due"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        a.delete_queue().await.expect("delete queue");
    }

    /// A dead letter of priority 5, requeued behind 30 packages of priority 0, comes first.
    async fn a_requeued_dead_letter_keeps_its_priority(url: &str) {
        let a = open(url, settings("deadprio", 5, Duration::from_secs(30))).await;
        a.enqueue(Message::new(b"urgent".to_vec()).with_priority(5))
            .await
            .expect("enqueue urgent");
        let got = a.dequeue().await.expect("dequeue");
        assert_eq!(got.len(), 1);
        a.dead_letter(&got[0].ack, "test")
            .await
            .expect("dead letter");
        let dead = a.dead_letters(10).await.expect("dead letters");
        assert_eq!(dead.len(), 1);
        let low: Vec<Message> = (0..30u8).map(|k| Message::new(vec![k; 8])).collect();
        a.enqueue_many(low).await.expect("enqueue");
        let first = a.dequeue().await.expect("dequeue");
        ack(&a, &first).await;
        assert!(a.requeue_dead(&dead[0].message_id).await.expect("requeue"));
        let next = a.dequeue().await.expect("dequeue");
        assert_eq!(
            next.first().map(|d| &d.payload[..]),
            Some(&b"urgent"[..]),
            "the requeued dead letter kept its priority"
        );
        a.delete_queue().await.expect("delete queue");
    }

    async fn all(url: &str) {
        a_requeued_dead_letter_keeps_its_priority(url).await;
        higher_priority_from_elsewhere_goes_first(url).await;
        lapsed_leases_behind_come_back(url).await;
        a_delayed_urgent_package_is_not_passed_over(url).await;
    }

    #[tokio::test]
    async fn sqlite() {
        let dir = tempfile::tempdir().expect("temp dir");
        all(&format!("sqlite://{}/resume.sqlite3", dir.path().display())).await;
    }

    #[cfg(feature = "postgres")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        let url = postgres_url();
        if reachable(&url).await {
            all(&url).await;
        }
    }

    #[cfg(feature = "mysql")]
    #[tokio::test]
    async fn mariadb() {
        let url = mysql_url();
        if reachable(&url).await {
            all(&url).await;
        }
    }
}
