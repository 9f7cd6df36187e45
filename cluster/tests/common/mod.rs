//! Drives the real `qcluster` binary: a private directory, queue name and secret per test.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use cluster::Store;
use cluster::broker_core::TaskId;

pub const BIN: &str = env!("CARGO_BIN_EXE_qcluster");

pub fn postgres_url() -> String {
    std::env::var("QCLUSTER_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// True if the database answers; otherwise says loudly why the test is skipped, or fails it
/// when `QCLUSTER_REQUIRE_SERVICES=1` (set by `scripts/test`).
pub async fn reachable(url: &str) -> bool {
    match Store::connect(url, Duration::from_secs(3)).await {
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

/// One test's world: a temp directory (cwd of every command), a unique cluster name, a secret.
pub struct World {
    pub dir: tempfile::TempDir,
    pub name: String,
    pub url: String,
    pub secret: String,
    pub env: Vec<(String, String)>,
}

impl World {
    /// `db` is `None` for a SQLite file in the temp directory.
    pub fn new(tag: &str, db: Option<String>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = db.unwrap_or_else(|| format!("sqlite://{}/q.sqlite3", dir.path().display()));
        let uniq = &uuid::Uuid::now_v7().simple().to_string()[16..];
        Self {
            dir,
            name: format!("t_{tag}_{uniq}"),
            url,
            secret: format!("test-secret-{uniq}-with-32-bytes-at-least"),
            env: Vec::new(),
        }
    }

    pub fn set(&mut self, key: &str, value: impl ToString) -> &mut Self {
        self.env.push((key.to_owned(), value.to_string()));
        self
    }

    pub fn write_config(&self, text: &str) {
        std::fs::write(self.dir.path().join("qcluster.toml"), text).expect("write config");
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.current_dir(self.dir.path())
            .args(args)
            .env_remove("QCLUSTER_CONFIG")
            .env("QCLUSTER_LOG", "warn")
            .env("QCLUSTER_SECRET", &self.secret)
            .env("QCLUSTER_NAME", &self.name)
            .env("QCLUSTER_ORM__URL", &self.url)
            .env("QCLUSTER_GUARD_CYCLE", "0.2");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run qcluster")
    }

    /// Runs and parses stdout as JSON, asserting the exit code.
    pub fn json(&self, args: &[&str], code: i32) -> serde_json::Value {
        let out = self.run(args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "qcluster {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "qcluster {args:?} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Enqueues JSON lines through `enqueue --from -`; returns the ids printed.
    pub fn enqueue_lines(&self, lines: &[String]) -> Vec<TaskId> {
        let mut child = self
            .cmd(&["enqueue", "--from", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn enqueue");
        {
            let mut stdin = child.stdin.take().expect("stdin");
            for l in lines {
                writeln!(stdin, "{l}").expect("write line");
            }
        }
        let out = child.wait_with_output().expect("enqueue");
        assert!(
            out.status.success(),
            "enqueue failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ids: Vec<TaskId> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().parse().expect("an id per line"))
            .collect();
        assert_eq!(ids.len(), lines.len());
        ids
    }

    /// Starts `qcluster run` in the background.
    pub fn start(&self) -> Child {
        self.cmd(&["run"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn run")
    }

    pub async fn store(&self) -> Store {
        Store::connect(&self.url, Duration::from_secs(5))
            .await
            .expect("store")
    }

    /// Waits until every id has a final result, or panics after `limit`.
    pub async fn wait_done(&self, ids: &[TaskId], limit: Duration) {
        let store = self.store().await;
        let t = Instant::now();
        loop {
            let done = store.done_count(ids).await.expect("count");
            if done == ids.len() as u64 {
                return;
            }
            assert!(
                t.elapsed() < limit,
                "only {done} of {} tasks finished within {limit:?}",
                ids.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Sends `signal` (e.g. "TERM", "KILL") to the child.
pub fn signal(child: &Child, signal: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(ok.success());
}

/// Waits for the child to exit within `limit`; returns its exit code.
pub fn wait_exit(child: &mut Child, limit: Duration) -> Option<i32> {
    let t = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return s.code();
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            panic!("qcluster did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills the child when dropped, so a failed assertion leaves no cluster running.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `QCLUSTER_TEST_<var>`, else the address `scripts/test` serves it on.
pub fn server(var: &str, default: &str) -> String {
    std::env::var(format!("QCLUSTER_TEST_{var}")).unwrap_or_else(|_| default.to_owned())
}

/// The section keys that point broker `name` at its test server (`sqs`, `mongo`, `amqp`,
/// `ironmq`, `redis`), for a queue or database named after `uniq`.
pub fn broker_keys(name: &str, uniq: &str) -> Vec<(&'static str, serde_json::Value)> {
    use serde_json::json;
    match name {
        "sqs" => vec![
            (
                "endpoint_url",
                json!(server("SQS_ENDPOINT", "http://127.0.0.1:9324")),
            ),
            ("region", json!("us-east-1")),
            ("access_key_id", json!("test")),
            ("secret_access_key", json!("test")),
        ],
        "mongo" => vec![
            (
                "url",
                json!(server("MONGO_URL", "mongodb://127.0.0.1:27018")),
            ),
            ("database", json!(format!("qtest_{uniq}"))),
        ],
        "amqp" => vec![(
            "url",
            json!(server("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")),
        )],
        "ironmq" => {
            let url = server("IRONMQ_URL", "http://127.0.0.1:8787");
            let (protocol, rest) = url
                .split_once("://")
                .expect("QCLUSTER_TEST_IRONMQ_URL has a scheme");
            let (host, port) = rest
                .trim_end_matches('/')
                .rsplit_once(':')
                .expect("QCLUSTER_TEST_IRONMQ_URL has a port");
            vec![
                ("protocol", json!(protocol)),
                ("host", json!(host)),
                ("port", json!(port.parse::<u16>().expect("a port number"))),
                ("project_id", json!("qtest")),
                (
                    "token",
                    json!(server("IRONMQ_TOKEN", "qcluster-test-token")),
                ),
                ("allow_short_timeout", json!(true)),
            ]
        }
        "redis" => vec![
            (
                "url",
                json!(server("REDIS_URL", "redis://127.0.0.1:6379/0")),
            ),
            ("prefix", json!(format!("test:{uniq}"))),
        ],
        _ => Vec::new(),
    }
}

impl World {
    /// A world on broker `name` and its test server, results in the world's SQLite file, every
    /// result kept.
    pub fn on_broker(tag: &str, name: &str) -> Self {
        let mut w = World::new(tag, None);
        let store = w.url.clone();
        w.set("QCLUSTER_BROKER", name)
            .set("QCLUSTER_STORE__URL", store)
            .set("QCLUSTER_SAVE_LIMIT", 0);
        for (key, value) in broker_keys(name, &w.name.clone()) {
            let text = match value {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            w.set(
                &format!("QCLUSTER_{}__{}", name.to_uppercase(), key.to_uppercase()),
                text,
            );
        }
        w
    }
}

impl World {
    /// Runs `qcluster` with `input` on stdin.
    pub fn run_stdin(&self, args: &[&str], input: &str) -> Output {
        let mut child = self
            .cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn qcluster");
        {
            let mut stdin = child.stdin.take().expect("stdin");
            stdin.write_all(input.as_bytes()).expect("write stdin");
        }
        child.wait_with_output().expect("qcluster")
    }

    /// The configuration the world's `qcluster` runs with (ORM broker and store on `url`),
    /// for in-test clients and brokers.
    pub fn config(&self) -> cluster::Config {
        let mut cfg = cluster::Config {
            name: self.name.clone(),
            secret: Some(cluster::config::Secret::new(self.secret.clone())),
            ..cluster::Config::default()
        };
        cfg.set("orm.url", self.url.clone()).expect("orm.url");
        cfg
    }

    /// Waits until `id` has a final result, or panics after `limit`.
    pub async fn wait_record(&self, id: TaskId, limit: Duration) -> cluster::TaskRecord {
        let store = self.store().await;
        let t = Instant::now();
        loop {
            if let Some(r) = store.get(id).await.expect("get")
                && r.done
            {
                return r;
            }
            assert!(
                t.elapsed() < limit,
                "no final result for {id} within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The SQL databases a test runs on as broker and store: an SQLite file, or PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sql {
    Sqlite,
    Postgres,
}

/// A world on `db`; `None` (with a loud skip, or a failure under `QCLUSTER_REQUIRE_SERVICES=1`)
/// when PostgreSQL is down.
pub async fn sql_world(tag: &str, db: Sql) -> Option<World> {
    match db {
        Sql::Sqlite => Some(World::new(tag, None)),
        Sql::Postgres => {
            let url = postgres_url();
            if !reachable(&url).await {
                return None;
            }
            Some(World::new(tag, Some(url)))
        }
    }
}

/// `on_sqlite_and_postgres!(a, b)`: tests `sqlite::a`, `postgres::a` (with the `orm-postgres`
/// feature), … calling `a(Sql::Sqlite)` and `a(Sql::Postgres)` of the file (which names the type
/// `Backend`: `use common::Sql as Backend;`).
#[allow(unused_macros)]
macro_rules! on_sqlite_and_postgres {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Sqlite).await;
                }
            )*
        }
        #[cfg(feature = "orm-postgres")]
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Postgres).await;
                }
            )*
        }
    };
}

/// A free port on 127.0.0.1 (bound and released: good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// An HTTP/1.1 exchange over a plain socket: (status, headers lowercased, body).
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, std::collections::HashMap<String, String>, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).ok();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).expect("send");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

/// Waits until `GET path` answers `want` on `port`.
pub fn wait_http(port: u16, path: &str, want: u16, limit: Duration) {
    let t = Instant::now();
    loop {
        let ok = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            && http(port, "GET", path, &[], "").0 == want;
        if ok {
            return;
        }
        assert!(t.elapsed() < limit, "{path} never answered {want}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Flips a byte in the middle of the queue's oldest package, in the SQL table.
pub async fn tamper_sql(w: &World) {
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&w.url).await.expect("pool");
    let q = |sql: &str| sqlx::AssertSqlSafe(numbered(&w.url, sql));
    let row = sqlx::query(q(
        "SELECT id, payload FROM qcluster_queue WHERE queue = ? ORDER BY id LIMIT 1",
    ))
    .bind(w.name.clone())
    .fetch_one(&pool)
    .await
    .expect("first package");
    let id: i64 = sqlx::Row::get(&row, 0);
    let mut payload: Vec<u8> = sqlx::Row::get(&row, 1);
    let mid = payload.len() / 2;
    payload[mid] ^= 0x01;
    sqlx::query(q("UPDATE qcluster_queue SET payload = ? WHERE id = ?"))
        .bind(payload)
        .bind(id)
        .execute(&pool)
        .await
        .expect("tamper");
}

/// Flips a byte in the middle of the queue's oldest package (its header is short, so the byte
/// is in the signed package), in Redis.
pub async fn tamper_redis(w: &World) {
    let client =
        ::redis::Client::open(server("REDIS_URL", "redis://127.0.0.1:6379/0")).expect("redis url");
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    // The oldest package of priority 0 is the head of its band list.
    let key = format!("test:{}:{{{}}}:ready:0", w.name, w.name);
    let mut blob: Vec<u8> = ::redis::cmd("LINDEX")
        .arg(&key)
        .arg(0)
        .query_async(&mut c)
        .await
        .expect("first package");
    let mid = blob.len() / 2;
    blob[mid] ^= 0x01;
    let _: () = ::redis::cmd("LSET")
        .arg(&key)
        .arg(0)
        .arg(blob)
        .query_async(&mut c)
        .await
        .expect("tamper");
}

/// `?` placeholders as `$n` for PostgreSQL.
pub fn numbered(url: &str, sql: &str) -> String {
    if !url.starts_with("postgres") {
        return sql.to_owned();
    }
    let mut n = 0;
    sql.chars()
        .map(|c| {
            if c == '?' {
                n += 1;
                format!("${n}")
            } else {
                c.to_string()
            }
        })
        .collect()
}
