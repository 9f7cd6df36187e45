//! Operators' commands through the real binary: `health` exit codes with the broker down and up,
//! with and without a running cluster; `prune` by age (dry run, failures, the floor); the
//! periodic `prune_older_than`.

mod common;

use std::time::{Duration, Instant};

use cluster::TaskRecord;
use cluster::broker_core::{TaskId, now_us};
use common::{Guard, World};

fn record(w: &World, success: bool, stopped_us: i64) -> TaskRecord {
    TaskRecord {
        id: TaskId::new(),
        name: "echo".into(),
        func: "echo".into(),
        args: "1".into(),
        result: Some(if success {
            "1".into()
        } else {
            "\"boom\"".into()
        }),
        enqueued_us: stopped_us - 2,
        started_us: stopped_us - 1,
        stopped_us,
        success,
        done: true,
        attempts: 1,
        group: None,
        cluster: w.name.clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_says_what_is_wrong_and_exits_one_until_all_is_well() {
    let w = World::new("health", None);
    // No cluster running: unhealthy, though broker and store answer.
    let h = w.json(&["health", "--json"], 1);
    assert_eq!(h["healthy"], false, "{h}");
    assert_eq!(h["broker"]["ok"], true, "{h}");
    assert_eq!(h["store"]["ok"], true, "{h}");
    assert_eq!(h["fresh_clusters"], 0);
    let _c = Guard(w.start());
    let t = Instant::now();
    loop {
        let out = w.run(&["health", "--json"]);
        if out.status.code() == Some(0) {
            let h: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
            assert_eq!(h["healthy"], true, "{h}");
            assert_eq!(h["fresh_clusters"], 1, "{h}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "never healthy");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let text = String::from_utf8_lossy(&w.run(&["health"]).stdout).into_owned();
    assert!(
        text.contains("healthy") && text.contains("heartbeat"),
        "{text}"
    );
    // The broker down (here: a database nobody serves): exit 1, and it says so.
    let mut down = World::new(
        "health_down",
        Some("postgres://postgres@127.0.0.1:1/none".into()),
    );
    down.set(
        "QCLUSTER_STORE__URL",
        format!("sqlite://{}/s.sqlite3", down.dir.path().display()),
    )
    .set("QCLUSTER_ORM__CONNECT_TIMEOUT", 1);
    let out = down.run(&["health"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("broker   FAILED") && text.contains("UNHEALTHY"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_deletes_old_results_by_age() {
    let w = World::new("prune", None);
    // The store's tables exist once any command has opened it.
    let _ = w.run(&["group", "none"]);
    let store = w.store().await;
    let day = 86_400_000_000;
    let now = now_us();
    let old_ok = record(&w, true, now - 10 * day);
    let old_failed = record(&w, false, now - 10 * day);
    let new_ok = record(&w, true, now - 1_000_000);
    store
        .save(&[old_ok.clone(), old_failed.clone(), new_ok.clone()])
        .await
        .expect("save");
    let dry = w.json(
        &["prune", "--results-older-than", "7d", "--dry-run", "--json"],
        0,
    );
    assert_eq!(dry["would_delete"], 1, "{dry}");
    assert_eq!(store.known(&[old_ok.id]).await.expect("known").len(), 1);
    let done = w.json(&["prune", "--results-older-than", "7d", "--json"], 0);
    assert_eq!(done["deleted"], 1, "{done}");
    let left = store
        .known(&[old_ok.id, old_failed.id, new_ok.id])
        .await
        .expect("known");
    assert!(
        !left.contains(&old_ok.id) && left.contains(&old_failed.id) && left.contains(&new_ok.id)
    );
    let done = w.json(
        &[
            "prune",
            "--results-older-than",
            "7d",
            "--failures",
            "--json",
        ],
        0,
    );
    assert_eq!(done["deleted"], 1, "{done}");
    // Younger than twice retry (60 s by default): refused.
    let out = w.run(&["prune", "--results-older-than", "90s"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("twice retry"));
    let out = w.run(&["prune", "--results-older-than", "soon"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`soon`"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_prune_older_than_prunes_by_itself() {
    let mut w = World::new("autoprune", None);
    w.set("QCLUSTER_PRUNE_OLDER_THAN", 3600)
        .set("QCLUSTER_SAVE_LIMIT", 0);
    let _ = w.run(&["group", "none"]);
    let store = w.store().await;
    let now = now_us();
    let old = record(&w, true, now - 7_200_000_000);
    let fresh = record(&w, true, now - 60_000_000);
    store
        .save(&[old.clone(), fresh.clone()])
        .await
        .expect("save");
    let _c = Guard(w.start());
    let t = Instant::now();
    while !store.known(&[old.id]).await.expect("known").is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "the old result is still there"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(store.known(&[fresh.id]).await.expect("known").len(), 1);
    // A value under twice retry is refused at start.
    let mut bad = World::new("autoprune_bad", None);
    bad.set("QCLUSTER_PRUNE_OLDER_THAN", 10);
    let out = bad.run(&["run"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("prune_older_than"));
}

/// `qcluster run` of `w` with its log in `run.log` of the world's directory.
fn run_logged(w: &World) -> (Guard, std::path::PathBuf) {
    let log = w.dir.path().join("run.log");
    let run = Guard(
        w.cmd(&["run"])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("run"),
    );
    (run, log)
}

/// A webhook for the test: records every request body, answers 500 to the first one, 200 after.
async fn webhook() -> (
    String,
    std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>,
) {
    recorder(true).await
}

/// An HTTP server recording (request line, body) of every request; answers 500 to the first
/// when `fail_first`, else 200.
async fn recorder(
    fail_first: bool,
) -> (
    String,
    std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Head, then as much body as Content-Length says.
                let (head, body_start) = loop {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break (String::from_utf8_lossy(&buf[..i]).into_owned(), i + 4);
                    }
                };
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                while buf.len() < body_start + len {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let body = String::from_utf8_lossy(&buf[body_start..]).into_owned();
                let first = {
                    let mut l = log.lock().expect("log");
                    l.push((head.lines().next().unwrap_or("").to_owned(), body));
                    l.len() == 1
                };
                let status = if first && fail_first {
                    "500 Internal Server Error"
                } else {
                    "200 OK"
                };
                let _ = sock
                    .write_all(
                        format!(
                            "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    (format!("http://{addr}/hooks/secret-path-token"), seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn final_failures_are_posted_to_the_webhook_with_retries() {
    let (url, seen) = webhook().await;
    let mut w = World::new("reporter", None);
    w.set("QCLUSTER_ERROR_REPORTER__WEBHOOK", &url)
        .set("QCLUSTER_MAX_ATTEMPTS", 2)
        .set("QCLUSTER_LOG", "info");
    let ids = w.enqueue_lines(&[
        r#"{"func": "fail", "args": "it broke"}"#.to_owned(),
        r#"{"func": "echo", "args": 1}"#.to_owned(),
    ]);
    let (mut run, log) = run_logged(&w);
    w.wait_done(&ids, Duration::from_secs(30)).await;
    // The first POST is answered 500, the second (its retry, 1 s later) 200.
    let t = Instant::now();
    while seen.lock().expect("log").len() < 2 {
        assert!(t.elapsed() < Duration::from_secs(15), "{:?}", seen.lock());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let got = seen.lock().expect("log").clone();
    assert_eq!(
        got.len(),
        2,
        "one failure, one retry, no report of the success: {got:?}"
    );
    assert_eq!(got[0].1, got[1].1, "the retry posts the same report");
    assert!(
        got[0].0.starts_with("POST /hooks/secret-path-token"),
        "{got:?}"
    );
    let report: serde_json::Value = serde_json::from_str(&got[0].1).expect("json");
    assert_eq!(report["event"], "task_failed");
    assert_eq!(report["id"], ids[0].to_string());
    assert_eq!(report["func"], "fail");
    assert_eq!(report["error"], "it broke");
    assert_eq!(report["attempts"], 2);
    assert_eq!(report["cluster"], w.name);
    common::signal(&run.0, "TERM");
    assert_eq!(
        common::wait_exit(&mut run.0, Duration::from_secs(20)),
        Some(0)
    );
    let logs = std::fs::read_to_string(&log).expect("logs");
    assert!(logs.contains("stopped"), "{logs}");
    assert!(
        !logs.contains("secret-path-token"),
        "the webhook's path in the logs"
    );
    // `config` hides the webhook too.
    let shown = String::from_utf8_lossy(&w.run(&["config"]).stdout).into_owned();
    assert!(!shown.contains("secret-path-token"), "{shown}");
}

/// A webhook that accepts connections and never answers: each POST gives up after
/// `error_reporter.timeout`, and the workers never wait for it (100 tasks, 20 of them failing,
/// finish long before 20 reports could have timed out one after another).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_webhook_never_holds_the_workers() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            // Read nothing, answer nothing, keep the connection open.
            held.push(sock);
        }
    });
    let mut w = World::new("reporter_hang", None);
    w.set(
        "QCLUSTER_ERROR_REPORTER__WEBHOOK",
        format!("http://{addr}/hook"),
    )
    .set("QCLUSTER_ERROR_REPORTER__TIMEOUT", 2)
    .set("QCLUSTER_ERROR_REPORTER__RETRIES", 0)
    .set("QCLUSTER_MAX_ATTEMPTS", 1)
    .set("QCLUSTER_WORKERS", 2);
    let lines: Vec<String> = (0..100)
        .map(|i| {
            if i % 5 == 0 {
                format!(r#"{{"func": "fail", "args": "no {i}"}}"#)
            } else {
                format!(r#"{{"func": "echo", "args": {i}}}"#)
            }
        })
        .collect();
    let ids = w.enqueue_lines(&lines);
    let (mut run, _log) = run_logged(&w);
    let t = Instant::now();
    w.wait_done(&ids, Duration::from_secs(30)).await;
    let took = t.elapsed();
    // Twenty reports one after another would take 40 s at 2 s each.
    assert!(
        took < Duration::from_secs(15),
        "100 tasks took {took:?} with a hanging webhook"
    );
    // The reporter did try: a POST is waiting on the silent server, and a second one comes
    // once the first timed out.
    let t = Instant::now();
    while accepted.load(std::sync::atomic::Ordering::SeqCst) < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the reporter did not go on after a timeout"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And the cluster stops promptly, the webhook still silent.
    common::signal(&run.0, "TERM");
    assert_eq!(
        common::wait_exit(&mut run.0, Duration::from_secs(20)),
        Some(0)
    );
}

/// On a terminal `result --wait` says what it waits for; piped, it prints nothing extra.
/// (`script` from util-linux gives the command a terminal.)
#[test]
fn waiting_is_shown_on_a_terminal_only() {
    let w = World::new("spinner", None);
    let ids = w.enqueue_lines(&[r#"{"func": "noop"}"#.to_owned()]);
    let id = ids[0].to_string();
    let piped = w.run(&["result", &id, "--wait", "0.5"]);
    assert_eq!(piped.status.code(), Some(1));
    assert!(!String::from_utf8_lossy(&piped.stderr).contains("waiting"));
    let line = format!("{} result {id} --wait 0.5", common::BIN);
    let Ok(shown) = std::process::Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .current_dir(w.dir.path())
        .env("QCLUSTER_SECRET", &w.secret)
        .env("QCLUSTER_NAME", &w.name)
        .env("QCLUSTER_ORM__URL", &w.url)
        .env("TERM", "xterm")
        .output()
    else {
        panic!("`script` (util-linux) is missing");
    };
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.contains(&format!("waiting up to 500ms for task {id}")),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn final_failures_go_to_sentry_with_the_dsn_kept_secret() {
    let (url, seen) = recorder(false).await;
    // http://KEY@HOST/PROJECT: the recorder plays Sentry's ingest endpoint.
    let addr = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .expect("addr")
        .to_owned();
    let dsn = format!("http://sentrykeysecret0123@{addr}/42");
    let mut w = World::new("sentry", None);
    w.set("QCLUSTER_ERROR_REPORTER__SENTRY_DSN", &dsn)
        .set("QCLUSTER_MAX_ATTEMPTS", 1)
        .set("QCLUSTER_LOG", "debug");
    let ids = w.enqueue_lines(&[
        r#"{"func": "fail", "args": "sensor offline"}"#.to_owned(),
        r#"{"func": "echo", "args": 1}"#.to_owned(),
    ]);
    let (mut run, log) = run_logged(&w);
    w.wait_done(&ids, Duration::from_secs(30)).await;
    let t = Instant::now();
    while seen.lock().expect("log").is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "nothing reached Sentry"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    common::signal(&run.0, "TERM");
    assert_eq!(
        common::wait_exit(&mut run.0, Duration::from_secs(20)),
        Some(0)
    );
    let got = seen.lock().expect("log").clone();
    assert_eq!(got.len(), 1, "one final failure, one event: {got:?}");
    assert!(got[0].0.starts_with("POST /api/42/envelope/"), "{got:?}");
    let body = &got[0].1;
    let event: serde_json::Value = body
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v.get("message").is_some() || v.get("logentry").is_some())
        .unwrap_or_else(|| panic!("no event in the envelope: {body}"));
    let text = event.to_string();
    assert!(text.contains("task fail failed: sensor offline"), "{text}");
    assert_eq!(event["tags"]["func"], "fail", "{text}");
    assert_eq!(event["tags"]["cluster"], w.name.as_str(), "{text}");
    assert_eq!(event["extra"]["task_id"], ids[0].to_string(), "{text}");
    // Sentry leaves out the level when it is the default, error.
    assert!(
        matches!(
            event.get("level"),
            None | Some(serde_json::Value::String(_))
        ),
        "{text}"
    );
    assert_ne!(event["level"], "warning", "{text}");
    // The DSN's key appears in no log line and not in `config`.
    let logs = std::fs::read_to_string(&log).expect("logs");
    assert!(!logs.contains("sentrykeysecret0123"), "{logs}");
    let shown = String::from_utf8_lossy(&w.run(&["config"]).stdout).into_owned();
    assert!(shown.contains("sentry_dsn"), "{shown}");
    assert!(!shown.contains("sentrykeysecret0123"), "{shown}");
    // A DSN that is not one is refused at start, without echoing it.
    let out = w
        .cmd(&["run"])
        .env(
            "QCLUSTER_ERROR_REPORTER__SENTRY_DSN",
            "not-a-dsn-secretvalue",
        )
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("error_reporter.sentry_dsn") && !err.contains("secretvalue"),
        "{err}"
    );
}

/// On PostgreSQL, `health` and `info` report the queue table's upkeep: live and dead tuples,
/// the age of the last vacuum, whether autovacuum is on; with autovacuum off for the table, a
/// warning says what that costs (and health stays a matter of answering, not of upkeep).
#[cfg(feature = "orm-postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_the_queue_tables_upkeep_on_postgres() {
    let Some(w) = common::sql_world("upkeep", common::Sql::Postgres).await else {
        return;
    };
    let ids = w.enqueue_lines(&[r#"{"func": "noop"}"#.to_owned()]);
    assert_eq!(ids.len(), 1);
    let h = w.json(&["health", "--json"], 1);
    let upkeep = &h["upkeep"];
    for key in [
        "queue_table.live_tuples",
        "queue_table.dead_tuples",
        "queue_table.last_vacuum_s",
        "queue_table.autovacuum",
    ] {
        assert!(upkeep[key].is_string(), "{key} missing: {h}");
    }
    let info = w.json(&["info", "--json"], 0);
    assert!(
        info["broker"]["details"]["queue_table.dead_tuples"].is_string(),
        "{info}"
    );
    // Autovacuum off for the table (as `ALTER TABLE … SET (autovacuum_enabled = off)` does):
    // said, with a warning. The server-wide setting of this machine may already be off.
    let url = common::postgres_url();
    let psql = |sql: &str| {
        let ok = std::process::Command::new("psql")
            .args([url.as_str(), "-qc", sql])
            .status()
            .expect("psql");
        assert!(ok.success(), "{sql}");
    };
    /// Puts the shared test database's setting back even when an assertion below fails.
    struct Reset(String);
    impl Drop for Reset {
        fn drop(&mut self) {
            let _ = std::process::Command::new("psql")
                .args([
                    self.0.as_str(),
                    "-qc",
                    "ALTER TABLE qcluster_queue RESET (autovacuum_enabled)",
                ])
                .status();
        }
    }
    let reset = Reset(url.clone());
    psql("ALTER TABLE qcluster_queue SET (autovacuum_enabled = off)");
    let h = w.json(&["health", "--json"], 1);
    drop(reset);
    let autovacuum = h["upkeep"]["queue_table.autovacuum"].as_str().unwrap_or("");
    assert!(autovacuum.starts_with("off"), "{h}");
    let warnings = h["warnings"].as_array().expect("warnings");
    assert!(
        warnings
            .iter()
            .any(|w| w.as_str().is_some_and(|w| w.contains("autovacuum is off"))),
        "{h}"
    );
    let text = String::from_utf8_lossy(&w.run(&["health"]).stdout).into_owned();
    assert!(
        text.contains("upkeep") && text.contains("queue_table.dead_tuples"),
        "{text}"
    );
}
