//! `[http]` on a running cluster and `qcluster dashboard`: `/metrics` parsed as Prometheus
//! text with the counters matching what ran, `/stats.json`, `/health` 200 and 503, the token
//! rules, and escaping of user data in the pages (plain HTTP here; the browser test drives the
//! same pages in Chromium).
#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::Sql as Backend;
use common::{Guard, World, free_port, http, sql_world, wait_http};

const TOKEN: &str = "a-test-token-of-enough-length";

/// `qcluster dashboard` of `w` on `port`, with `token` if given.
fn dashboard(w: &World, port: u16, token: Option<&str>) -> Guard {
    let mut cmd = w.cmd(&["dashboard", "--listen", &format!("127.0.0.1:{port}")]);
    if let Some(t) = token {
        cmd.env("QCLUSTER_HTTP__TOKEN", t);
    }
    Guard(
        cmd.stdout(std::process::Stdio::null())
            .spawn()
            .expect("dashboard"),
    )
}

const BEARER: &str = "Bearer a-test-token-of-enough-length";

async fn metrics_count_what_ran(db: Backend) {
    let Some(mut w) = sql_world("metrics", db).await else {
        return;
    };
    let port = free_port();
    w.set("QCLUSTER_HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .set("QCLUSTER_HTTP__TOKEN", TOKEN)
        .set("QCLUSTER_MAX_ATTEMPTS", 1)
        .set("QCLUSTER_WORKERS", 2);
    let _c = Guard(w.start());
    wait_http(port, "/health", 200, Duration::from_secs(30));
    let mut lines: Vec<String> = (0..7)
        .map(|i| format!(r#"{{"func":"echo","args":{i}}}"#))
        .collect();
    lines.extend((0..3).map(|i| format!(r#"{{"func":"fail","args":"no {i}"}}"#)));
    let ids = w.enqueue_lines(&lines);
    w.wait_done(&ids, Duration::from_secs(30)).await;

    // Without the token: refused, and nothing leaks.
    let (status, _, body) = http(port, "GET", "/metrics", &[], "");
    assert_eq!(status, 401, "{body}");
    assert!(!body.contains("qcluster_tasks"), "{body}");
    assert_eq!(http(port, "GET", "/stats.json", &[], "").0, 401);

    // The monitor records a batch right after saving it: poll briefly for the last one.
    let t = Instant::now();
    let metrics = loop {
        let (status, headers, body) =
            http(port, "GET", "/metrics", &[("Authorization", BEARER)], "");
        assert_eq!(status, 200, "{body}");
        assert!(
            headers["content-type"].contains("openmetrics-text"),
            "{headers:?}"
        );
        let lines = body.lines().map(|l| Ok(l.to_owned()));
        let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text parses");
        let value = |name: &str, label: Option<(&str, &str)>| -> Option<f64> {
            scrape
                .samples
                .iter()
                .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
                .map(|s| match s.value {
                    prometheus_parse::Value::Counter(v)
                    | prometheus_parse::Value::Gauge(v)
                    | prometheus_parse::Value::Untyped(v) => v,
                    prometheus_parse::Value::Histogram(ref h) => {
                        h.iter().map(|b| b.count).fold(0.0, f64::max)
                    }
                    _ => f64::NAN,
                })
        };
        let echo = value("qcluster_tasks_succeeded_total", Some(("func", "echo")));
        let fail = value("qcluster_tasks_failed_total", Some(("func", "fail")));
        if echo == Some(7.0) && fail == Some(3.0) {
            assert_eq!(
                value("qcluster_tasks_processed_total", Some(("func", "echo"))),
                Some(7.0)
            );
            assert_eq!(
                value("qcluster_tasks_processed_total", Some(("func", "fail"))),
                Some(3.0)
            );
            assert_eq!(
                value("qcluster_tasks_failed_total", Some(("func", "echo"))),
                None,
                "echo never failed"
            );
            assert_eq!(value("qcluster_tasks_quarantined_total", None), Some(0.0));
            assert_eq!(value("qcluster_queue_waiting", None), Some(0.0));
            assert_eq!(value("qcluster_workers", None), Some(2.0));
            // Histograms: every echo run observed once; broker calls timed by operation.
            assert!(
                body.contains("qcluster_task_run_seconds_count{func=\"echo\"} 7"),
                "{body}"
            );
            assert!(
                body.contains("qcluster_broker_call_seconds_count{op=\"dequeue\"}"),
                "{body}"
            );
            assert!(
                body.contains("qcluster_reincarnations_total{reason=\"crash\"} 0"),
                "{body}"
            );
            break body;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "counters never matched what ran (echo {echo:?}, fail {fail:?}):\n{body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    drop(metrics);

    let (status, _, body) = http(port, "GET", "/stats.json", &[("Authorization", BEARER)], "");
    assert_eq!(status, 200, "{body}");
    let stats: serde_json::Value = serde_json::from_str(&body).expect("stats JSON");
    assert_eq!(stats["cluster"], w.name.as_str());
    assert_eq!(stats["by_func"]["echo"]["succeeded"], 7, "{stats}");
    assert_eq!(stats["by_func"]["fail"]["failed"], 3, "{stats}");
    assert_eq!(stats["totals"]["processed"], 10, "{stats}");
    assert_eq!(stats["queue"]["waiting"], 0, "{stats}");
    assert_eq!(stats["workers"]["total"], 2, "{stats}");
    // The token never appears in what the server says.
    assert!(!body.contains(TOKEN));
}

async fn dashboard_pages_escape_and_guard_state_changes(db: Backend) {
    let Some(mut w) = sql_world("dash", db).await else {
        return;
    };
    w.set("QCLUSTER_MAX_ATTEMPTS", 1);
    let _c = Guard(w.start());
    let ids = w.enqueue_lines(&[
        r#"{"func":"echo","args":{"x":"<script>alert('x')</script>"}}"#.to_owned(),
        r#"{"func":"fail","args":"<img src=x onerror=alert(1)>"}"#.to_owned(),
    ]);
    w.wait_done(&ids, Duration::from_secs(30)).await;

    // Read-only without a token: pages answer, actions are refused.
    let port = free_port();
    let _d = dashboard(&w, port, None);
    wait_http(port, "/health", 200, Duration::from_secs(30));
    let (status, _, page) = http(port, "GET", "/tasks", &[], "");
    assert_eq!(status, 200);
    assert!(page.contains(&ids[0].to_string()) && page.contains(&ids[1].to_string()));
    assert!(
        !page.contains("<script>alert"),
        "args rendered as markup:\n{page}"
    );
    assert!(page.contains("&lt;script&gt;"), "{page}");
    let (_, _, page) = http(port, "GET", &format!("/tasks/{}", ids[1]), &[], "");
    assert!(!page.contains("<img src=x"), "{page}");
    assert!(
        page.contains("&lt;img src=x onerror=alert(1)&gt;"),
        "{page}"
    );
    let (_, _, page) = http(port, "GET", "/tasks?outcome=failure", &[], "");
    assert!(page.contains(&ids[1].to_string()) && !page.contains(&ids[0].to_string()));
    let (_, _, page) = http(port, "GET", "/tasks?func=echo", &[], "");
    assert!(page.contains(&ids[0].to_string()) && !page.contains(&ids[1].to_string()));
    let (status, _, _) = http(
        port,
        "POST",
        "/dead/delete",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        "all=1",
    );
    assert_eq!(
        status, 403,
        "a state change without a token set must be refused"
    );

    // Beyond loopback without a token: refused at start, exit 2, naming the key.
    let out = w.run(&["dashboard", "--listen", "0.0.0.0:0"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--listen") && err.contains("http.token"),
        "{err}"
    );
    // A short token is refused too.
    let out = w
        .cmd(&["dashboard", "--listen", "127.0.0.1:0"])
        .env("QCLUSTER_HTTP__TOKEN", "short")
        .output()
        .expect("dashboard");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("http.token"));
    // So is one with a character that cannot travel in a header or a cookie.
    let out = w
        .cmd(&["dashboard", "--listen", "127.0.0.1:0"])
        .env("QCLUSTER_HTTP__TOKEN", "long-enough-token but-with-a-space")
        .output()
        .expect("dashboard");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("http.token") && !err.contains("with-a-space"),
        "{err}"
    );

    // With a token: the wrong one is refused, the right one (bearer) may act.
    let port2 = free_port();
    let _d2 = dashboard(&w, port2, Some(TOKEN));
    wait_http(port2, "/health", 200, Duration::from_secs(30));
    let form = ("Content-Type", "application/x-www-form-urlencoded");
    let (status, _, _) = http(port2, "POST", "/schedules/nope/pause", &[form], "");
    assert_eq!(status, 403);
    let (status, _, _) = http(
        port2,
        "POST",
        "/schedules/nope/pause",
        &[form, ("Authorization", "Bearer wrong-token-wrong-token")],
        "",
    );
    assert_eq!(status, 403);
    let (status, headers, _) = http(
        port2,
        "POST",
        "/schedules/nope/pause",
        &[form, ("Authorization", BEARER)],
        "",
    );
    assert_eq!(status, 303, "{headers:?}");
    assert!(
        headers["location"].starts_with("/schedules?msg="),
        "{headers:?}"
    );
    // A page of another origin (another port of this host, which SameSite counts as the same
    // site) cannot post with the user's credentials.
    let host = format!("127.0.0.1:{port2}");
    for extra in [
        ("Origin", "http://127.0.0.1:8888"),
        ("Sec-Fetch-Site", "cross-site"),
        ("Sec-Fetch-Site", "same-site"),
    ] {
        let (status, _, _) = http(
            port2,
            "POST",
            "/schedules/nope/pause",
            &[form, ("Authorization", BEARER), extra],
            "",
        );
        assert_eq!(status, 403, "{extra:?}");
    }
    let origin = format!("http://{host}");
    let (status, _, _) = http(
        port2,
        "POST",
        "/schedules/nope/pause",
        &[
            form,
            ("Authorization", BEARER),
            ("Origin", &origin),
            ("Sec-Fetch-Site", "same-origin"),
        ],
        "",
    );
    assert_eq!(status, 303, "our own page may post");
    // DNS rebinding: another name resolved to 127.0.0.1 is not answered.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port2)).expect("connect");
    std::io::Write::write_all(
        &mut s,
        b"GET /tasks HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    )
    .expect("send");
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut s, &mut answer).expect("read");
    assert!(answer.starts_with("HTTP/1.1 421"), "{answer}");
    assert!(!answer.contains(&ids[0].to_string()), "{answer}");

    // Login: a wrong token gets 401; the right one a strict, HttpOnly cookie.
    let (status, _, _) = http(port2, "POST", "/login", &[form], "token=nope");
    assert_eq!(status, 401);
    let (status, headers, _) = http(port2, "POST", "/login", &[form], &format!("token={TOKEN}"));
    assert_eq!(status, 303);
    let cookie = &headers["set-cookie"];
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    // The cookie is not the token, and it is what authorizes a browser's state change.
    assert!(!cookie.contains(TOKEN), "{cookie}");
    let session = cookie
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    let (status, _, _) = http(
        port2,
        "POST",
        "/schedules/nope/pause",
        &[form, ("Cookie", &session)],
        "",
    );
    assert_eq!(status, 303, "the login cookie may act");
    let raw = format!("qcluster_token={TOKEN}");
    let (status, _, _) = http(
        port2,
        "POST",
        "/schedules/nope/pause",
        &[form, ("Cookie", &raw)],
        "",
    );
    assert_eq!(
        status, 403,
        "a cookie holding the token itself is not a login"
    );
    // The token is never printed on a page.
    let (_, _, page) = http(port2, "GET", "/", &[("Authorization", BEARER)], "");
    assert!(!page.contains(TOKEN));
}

/// Beyond loopback every page needs the token, and `/health` tells a stranger its status only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_loopback_reads_need_the_token() {
    let w = World::new("http_wide", None);
    let _c = Guard(w.start());
    let port = free_port();
    let _d = Guard(
        w.cmd(&["dashboard", "--listen", &format!("0.0.0.0:{port}")])
            .env("QCLUSTER_HTTP__TOKEN", TOKEN)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("dashboard"),
    );
    wait_http(port, "/health", 200, Duration::from_secs(30));
    let (_, _, body) = http(port, "GET", "/health", &[], "");
    let h: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(h, serde_json::json!({ "healthy": true }), "{body}");
    let (_, _, body) = http(port, "GET", "/health", &[("Authorization", BEARER)], "");
    let h: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(h["healthy"], true, "{body}");
    assert!(
        h["clusters"].as_array().is_some_and(|c| !c.is_empty()),
        "{body}"
    );
    for page in ["/", "/tasks", "/dead", "/schedules"] {
        let (status, _, body) = http(port, "GET", page, &[], "");
        assert!(
            status == 401 || status == 303,
            "{page} without the token: {status} {body}"
        );
        assert!(!body.contains("<table"), "{page}: {body}");
        let (status, _, _) = http(port, "GET", page, &[("Authorization", BEARER)], "");
        assert_eq!(status, 200, "{page} with the token");
    }
    // The login page itself answers, and its cookie opens the pages.
    assert_eq!(http(port, "GET", "/login", &[], "").0, 200);
    let (status, headers, _) = http(
        port,
        "POST",
        "/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        &format!("token={TOKEN}"),
    );
    assert_eq!(status, 303);
    let session = headers["set-cookie"]
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    assert_eq!(
        http(port, "GET", "/tasks", &[("Cookie", &session)], "").0,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_endpoint_is_503_without_a_cluster() {
    let w = World::new("health_http", None);
    let port = free_port();
    let _d = dashboard(&w, port, None);
    wait_http(port, "/health", 503, Duration::from_secs(30));
    let (_, _, body) = http(port, "GET", "/health", &[], "");
    let h: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(h["healthy"], false);
    assert_eq!(h["broker"]["ok"], true);
    assert_eq!(h["fresh_clusters"], 0);
    let _c = Guard(w.start());
    wait_http(port, "/health", 200, Duration::from_secs(30));
    // The dashboard runs no cluster: it has no metrics of its own, and says so.
    let (status, _, body) = http(port, "GET", "/metrics", &[], "");
    assert_eq!(status, 404);
    assert!(body.contains("qcluster run"), "{body}");
}

on_sqlite_and_postgres!(
    metrics_count_what_ran,
    dashboard_pages_escape_and_guard_state_changes
);
