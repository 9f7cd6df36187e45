//! `qcluster dead` through the real binary, on SQLite, PostgreSQL and Redis: a tampered package
//! quarantined by a running cluster is listed and refused on requeue (it stays); a validly signed
//! dead letter is requeued and then run to a successful result; delete by id and `--all` empty
//! the list; unknown ids and a missing target fail with the right exit codes.

#[macro_use]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster::broker_core::{Broker, TaskId};
use common::{Guard, World, signal, wait_exit};

/// Where the packages go. Results go to SQLite, or to PostgreSQL when that is the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    #[cfg_attr(not(feature = "orm-postgres"), allow(dead_code))]
    Postgres,
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    Redis,
}

fn redis_url() -> String {
    std::env::var("QCLUSTER_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// A world on `b`, and the configuration its `qcluster` runs with (for an in-test broker);
/// `None` (with a loud skip) when the server is down.
async fn world(tag: &str, b: Backend) -> Option<(World, cluster::Config)> {
    if b == Backend::Redis {
        let mut w = World::new(tag, None);
        let prefix = format!("test:{}", w.name);
        let mut cfg = cluster::Config {
            name: w.name.clone(),
            broker: "redis".into(),
            secret: Some(cluster::config::Secret::new(w.secret.clone())),
            ..cluster::Config::default()
        };
        cfg.set("redis.url", redis_url()).expect("redis.url");
        cfg.set("redis.prefix", Some(prefix.clone()))
            .expect("redis.prefix");
        if let Err(e) = cluster::Brokers::builtin().connect(&cfg).await {
            if std::env::var("QCLUSTER_REQUIRE_SERVICES").as_deref() == Ok("1") {
                panic!("server required but unreachable: {e}");
            }
            eprintln!("skipped: {e}");
            return None;
        }
        let store = w.url.clone();
        w.set("QCLUSTER_BROKER", "redis")
            .set("QCLUSTER_REDIS__URL", redis_url())
            .set("QCLUSTER_REDIS__PREFIX", prefix)
            .set("QCLUSTER_STORE__URL", store);
        return Some((w, cfg));
    }
    let db = if b == Backend::Postgres {
        common::Sql::Postgres
    } else {
        common::Sql::Sqlite
    };
    let w = common::sql_world(tag, db).await?;
    let cfg = w.config();
    Some((w, cfg))
}

/// Enqueues one `echo` task through the CLI (no cluster running) and moves its package to the
/// dead letters with the broker's own `dead_letter`: a validly signed dead letter. Other
/// packages the broker hands out meanwhile are given back.
async fn dead_letter_a_good_one(
    w: &World,
    cfg: &cluster::Config,
    broker: &Arc<dyn Broker>,
    arg: &str,
) -> TaskId {
    let codec = cluster::client::codec_from(cfg).expect("codec");
    let id = w.enqueue_lines(&[format!(r#"{{"func": "echo", "args": "{arg}"}}"#)])[0];
    let t = Instant::now();
    loop {
        for d in broker.dequeue().await.expect("dequeue") {
            if codec.decode(&d.payload).map(|p| p.id).ok() == Some(id) {
                broker
                    .dead_letter(&d.ack, "given up: test")
                    .await
                    .expect("dead_letter");
                return id;
            }
            broker.fail(&d.ack).await.expect("fail");
        }
        assert!(t.elapsed() < Duration::from_secs(10), "package never came");
    }
}

fn dead_list(w: &World) -> Vec<serde_json::Value> {
    w.json(&["dead", "list", "--json"], 0)
        .as_array()
        .expect("a JSON array")
        .clone()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stop(mut run: Guard) {
    signal(&run.0, "TERM");
    assert_eq!(wait_exit(&mut run.0, Duration::from_secs(15)), Some(0));
}

/// The whole operator story on one backend.
async fn quarantine_refuse_requeue_delete(b: Backend) {
    let Some((w, cfg)) = world("dead", b).await else {
        return;
    };
    let broker = cluster::Brokers::builtin()
        .connect(&cfg)
        .await
        .expect("broker");

    // A tampered package: a running cluster quarantines it and runs the honest one.
    let ids = w.enqueue_lines(&[
        r#"{"func": "echo", "args": "tampered"}"#.to_owned(),
        r#"{"func": "echo", "args": "honest"}"#.to_owned(),
    ]);
    if b == Backend::Redis {
        common::tamper_redis(&w).await;
    } else {
        common::tamper_sql(&w).await;
    }
    let run = Guard(w.start());
    w.wait_done(&ids[1..], Duration::from_secs(30)).await;
    let t = Instant::now();
    let dead = loop {
        let dead = dead_list(&w);
        if !dead.is_empty() {
            break dead;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "nothing quarantined");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    stop(run);
    assert_eq!(dead.len(), 1, "{dead:?}");
    let bad = dead[0]["message_id"]
        .as_str()
        .expect("message_id")
        .to_owned();
    let reason = dead[0]["reason"].as_str().expect("reason");
    assert!(reason.contains("signature"), "{dead:?}");
    assert!(
        dead[0]["func"].is_null(),
        "a tampered package does not decode: {dead:?}"
    );
    assert!(dead[0]["bytes"].as_u64().expect("bytes") > 0, "{dead:?}");
    assert!(
        dead[0]["at"].as_str().expect("at").contains('T'),
        "{dead:?}"
    );
    assert!(dead[0].get("deliveries").is_some(), "{dead:?}");
    // `quarantine` is the same listing; the human form names id and reason on one line.
    assert_eq!(
        w.json(&["quarantine", "--json"], 0),
        serde_json::Value::Array(dead.clone())
    );
    let text = stdout(&w.run(&["dead", "list"]));
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains(&bad) && text.contains("signature"), "{text}");
    assert_eq!(text, stdout(&w.run(&["quarantine"])));

    // Requeueing it is refused (it does not verify) and it stays listed.
    let out = w.run(&["dead", "requeue", &bad]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("signature"), "{}", stderr(&out));
    let refused = w.json(&["dead", "requeue", &bad, "--json"], 1);
    assert_eq!(refused["status"], "refused", "{refused}");
    assert_eq!(dead_list(&w).len(), 1);
    assert_eq!(broker.queue_size().await.expect("queue_size"), 0);

    // A validly signed dead letter is requeued, and a running cluster runs it.
    let good = dead_letter_a_good_one(&w, &cfg, &broker, "again").await;
    let dead = dead_list(&w);
    assert_eq!(dead.len(), 2, "{dead:?}");
    let listed = dead
        .iter()
        .find(|d| d["func"] == "echo")
        .expect("the good one decodes: func shown");
    let good_mid = listed["message_id"].as_str().expect("id").to_owned();
    assert_eq!(listed["reason"], "given up: test");
    let text = stdout(&w.run(&["dead", "list"]));
    assert!(
        text.lines()
            .any(|l| l.contains(&good_mid) && l.contains("echo")),
        "{text}"
    );
    let out = w.run(&["dead", "requeue", &good_mid]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let dead = dead_list(&w);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["message_id"], bad.as_str());
    let run = Guard(w.start());
    let r = w.wait_record(good, Duration::from_secs(30)).await;
    assert!(r.success, "the requeued task ran and succeeded: {r:?}");
    assert_eq!(r.result.as_deref(), Some("\"again\""), "{r:?}");
    stop(run);
    // It is gone from the dead letters for good: a second requeue finds nothing.
    let out = w.run(&["dead", "requeue", &good_mid]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));

    // Unknown ids: exit 1, nothing changes; neither an id nor --all is a usage error.
    for cmd in ["requeue", "delete"] {
        let out = w.run(&["dead", cmd, "no-such-dead-letter"]);
        assert_eq!(out.status.code(), Some(1), "{cmd}: {}", stderr(&out));
        assert!(stderr(&out).contains("no dead letter"), "{}", stderr(&out));
        let out = w.run(&["dead", cmd]);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {}", stderr(&out));
    }
    assert_eq!(dead_list(&w).len(), 1);

    // `requeue --all` requeues what verifies, refuses the rest (still listed) and ends.
    let second = dead_letter_a_good_one(&w, &cfg, &broker, "second").await;
    let all = w.json(&["dead", "requeue", "--all", "--json"], 1);
    assert_eq!(all["requeued"], 1, "{all}");
    let refused = all["refused"].as_array().expect("refused");
    assert_eq!(refused.len(), 1, "{all}");
    assert_eq!(refused[0]["message_id"], bad.as_str(), "{all}");
    assert!(
        refused[0]["reason"]
            .as_str()
            .expect("reason")
            .contains("signature")
    );
    assert_eq!(dead_list(&w).len(), 1);
    assert_eq!(broker.queue_size().await.expect("queue_size"), 1);

    // Delete by id, then --all, empty the list; the requeued one still runs.
    let third = dead_letter_a_good_one(&w, &cfg, &broker, "third").await;
    let _ = third;
    assert_eq!(dead_list(&w).len(), 2);
    let out = w.run(&["dead", "delete", &bad]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let left = dead_list(&w);
    assert_eq!(left.len(), 1, "{left:?}");
    assert_ne!(left[0]["message_id"], bad.as_str());
    let out = w.run(&["dead", "delete", &bad]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "deleted twice: {}",
        stderr(&out)
    );
    let all = w.json(&["dead", "delete", "--all", "--json"], 0);
    assert_eq!(all["deleted"], 1, "{all}");
    assert!(dead_list(&w).is_empty());
    assert_eq!(broker.dead_letter_size().await.expect("size"), Some(0));
    let text = stdout(&w.run(&["dead", "list"]));
    assert!(text.contains("no dead letters"), "{text}");
    let run = Guard(w.start());
    let r = w.wait_record(second, Duration::from_secs(30)).await;
    assert!(r.success, "{r:?}");
    stop(run);
}

on_sqlite_and_postgres!(quarantine_refuse_requeue_delete);

#[cfg(feature = "redis")]
mod redis {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn quarantine_refuse_requeue_delete() {
        super::quarantine_refuse_requeue_delete(super::Backend::Redis).await;
    }
}
