//! Hooks, groups, chains and iterators through the real `qcluster` binary: a hook runs exactly
//! once per task, also when the task is delivered again; groups are read, waited for and
//! deleted from the CLI; a chain survives `kill -9` of the cluster and runs its links in
//! order; a failing link stops its chain; an iterator of 1,000 items gives 1,000 results in
//! order.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use cluster::broker_core::{Message, TaskId, TaskPackage, now_us};
use cluster::flow::{hook_id, item_id};
use cluster::{Finished, TaskRecord};
use common::Sql as Backend;
use common::{Guard, World, signal, sql_world, wait_exit};

async fn world(tag: &str, b: Backend) -> Option<World> {
    sql_world(tag, b).await
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs and returns the single id printed.
fn enqueue_id(w: &World, args: &[&str], input: Option<&str>) -> TaskId {
    let out = match input {
        Some(i) => w.run_stdin(args, i),
        None => w.run(args),
    };
    assert!(out.status.success(), "qcluster {args:?}: {}", stderr(&out));
    stdout(&out).trim().parse().expect("an id")
}

fn json_of(s: Option<&str>) -> serde_json::Value {
    serde_json::from_str(s.expect("a result")).expect("JSON result")
}

/// The totals of the world's one running cluster, from `info --json`.
fn totals(w: &World) -> Option<serde_json::Value> {
    let info = w.json(&["info", "--json"], 0);
    let c = info["clusters"].as_array()?.first()?.clone();
    let idle = info["queued"] == 0 && info["in_flight"] == 0;
    idle.then(|| c["totals"].clone())
}

/// Waits until the cluster is idle and has counted at least `duplicates` duplicate deliveries
/// (status is published about once a second), then returns its totals.
async fn settled_totals(w: &World, duplicates: u64) -> serde_json::Value {
    let t = Instant::now();
    loop {
        if let Some(tot) = totals(w)
            && tot["duplicates"].as_u64().unwrap_or(0) >= duplicates
        {
            // One more publication, so that nothing is still on its way.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            if let Some(again) = totals(w) {
                return again;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the cluster never counted {duplicates} duplicates"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Enqueues `package` as it is (its id kept), signed for the world's cluster.
async fn deliver(w: &World, package: &TaskPackage) {
    let cfg = w.config();
    let codec = cluster::client::codec_from(&cfg).expect("codec");
    let broker = cluster::Brokers::builtin()
        .connect(&cfg)
        .await
        .expect("broker");
    let m = Message::new(codec.encode(package).expect("encode")).with_key(package.id.to_string());
    broker.enqueue(m).await.expect("enqueue");
}

fn echo_with_hook(id: TaskId, args: &str, group: &str) -> TaskPackage {
    let mut p = TaskPackage::new("echo", args.as_bytes().to_vec());
    p.id = id;
    p.options.hook = Some("echo".into());
    p.options.group = Some(group.into());
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hook_runs_exactly_once_per_task_also_after_duplicate_deliveries() {
    hook_runs_exactly_once("async").await;
}

/// The same with process workers: the hook runs in a child like any task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hook_runs_exactly_once_with_process_workers() {
    hook_runs_exactly_once("process").await;
}

async fn hook_runs_exactly_once(mode: &str) {
    let mut w = World::new(&format!("hook1{mode}"), None);
    w.set("QCLUSTER_WORKER_MODE", mode);
    let parent = enqueue_id(
        &w,
        &[
            "enqueue",
            "echo",
            "--args",
            r#"{"x":1}"#,
            "--hook",
            "echo",
            "--group",
            "gh",
        ],
        None,
    );
    let _run = Guard(w.start());
    let p = w.wait_record(parent, Duration::from_secs(30)).await;
    assert!(p.success);
    let h = w
        .wait_record(hook_id(parent), Duration::from_secs(30))
        .await;
    assert!(h.success && h.func == "echo", "{h:?}");
    // The hook got the finished task's record, as a typed argument would.
    let finished: Finished =
        serde_json::from_str(h.result.as_deref().expect("result")).expect("a Finished");
    assert_eq!(finished.id, parent);
    assert_eq!(finished.func, "echo");
    assert_eq!(finished.args, serde_json::json!({"x": 1}));
    assert_eq!(finished.result, serde_json::json!({"x": 1}));
    assert!(finished.success);
    assert_eq!(finished.attempts, 1);
    assert_eq!(finished.group.as_deref(), Some("gh"));
    // The hook is not part of its parent's group.
    assert_eq!(h.group, None);

    // A task whose result was saved but whose hook was lost (a crash between saving and
    // enqueueing it): its next delivery is a duplicate, which enqueues the missing hook.
    let store = w.store().await;
    let lost = TaskId::new();
    let now = now_us();
    store
        .save(&[TaskRecord {
            id: lost,
            name: "echo".into(),
            func: "echo".into(),
            args: "[2]".into(),
            result: Some("[2]".into()),
            enqueued_us: now,
            started_us: now,
            stopped_us: now,
            success: true,
            done: true,
            attempts: 1,
            group: Some("gh".into()),
            cluster: w.name.clone(),
        }])
        .await
        .expect("save");
    deliver(&w, &echo_with_hook(lost, "[2]", "gh")).await;
    let h2 = w.wait_record(hook_id(lost), Duration::from_secs(30)).await;
    let f2: Finished = serde_json::from_str(h2.result.as_deref().expect("result")).expect("json");
    assert_eq!((f2.id, f2.result), (lost, serde_json::json!([2])));
    let before = settled_totals(&w, 1).await;
    assert_eq!(
        before["processed"], 3,
        "parent, its hook, the lost hook: {before}"
    );

    // Both parents delivered again: discarded, and their hooks, which ran, are not sent again.
    deliver(&w, &echo_with_hook(parent, r#"{"x":1}"#, "gh")).await;
    deliver(&w, &echo_with_hook(lost, "[2]", "gh")).await;
    let after = settled_totals(&w, 3).await;
    assert_eq!(
        after["processed"], 3,
        "nothing ran again: before {before}, after {after}"
    );
    assert_eq!(after["duplicates"], 3);
    let again = store.get(hook_id(parent)).await.expect("get").expect("row");
    assert_eq!(again.started_us, h.started_us);
}

/// Two copies of one hook package (a parent delivered again while its hook waited in the queue)
/// taken at the same moment by two workers: one runs, the other waits and is discarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_copies_of_a_follow_up_taken_at_once_run_once() {
    let mut w = World::new("hookrace", None);
    w.set("QCLUSTER_WORKERS", 2)
        .set("QCLUSTER_TIMEOUT", 3)
        .set("QCLUSTER_RETRY", 10);
    let parent = TaskId::new();
    let mut hook = TaskPackage::new("sleep", b"1.5".to_vec());
    hook.id = hook_id(parent);
    hook.flow = Some(cluster::broker_core::Flow::Hook { parent });
    deliver(&w, &hook).await;
    deliver(&w, &hook).await;
    let _run = Guard(w.start());
    let first = w.wait_record(hook.id, Duration::from_secs(30)).await;
    assert!(first.success, "{first:?}");
    let tot = settled_totals(&w, 1).await;
    assert_eq!(tot["processed"], 1, "one run only: {tot}");
    assert_eq!(tot["duplicates"], 1, "{tot}");
    let again = w
        .store()
        .await
        .get(hook.id)
        .await
        .expect("get")
        .expect("row");
    assert_eq!(
        (again.started_us, again.attempts),
        (first.started_us, 1),
        "{again:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_hook_is_its_own_failed_result_and_a_hook_waits_for_the_final_failure() {
    let mut w = World::new("hook2", None);
    w.set("QCLUSTER_RETRY", 5).set("QCLUSTER_TIMEOUT", 2);
    // `fail` cannot take the record as its argument: the hook fails.
    let ok = enqueue_id(
        &w,
        &["enqueue", "echo", "--args", r#""hi""#, "--hook", "fail"],
        None,
    );
    // A failing task with two attempts: its hook runs once, after the second.
    let bad = enqueue_id(
        &w,
        &[
            "enqueue",
            "fail",
            "--args",
            r#""boom""#,
            "--max-attempts",
            "2",
            "--hook",
            "echo",
        ],
        None,
    );
    let _run = Guard(w.start());
    let h = w.wait_record(hook_id(ok), Duration::from_secs(30)).await;
    assert!(!h.success && h.done && h.func == "fail", "{h:?}");
    let r = w.json(&["result", "--json", &ok.to_string()], 0);
    assert_eq!(r["success"], true);
    assert_eq!(r["result"], "hi");

    let hb = w.wait_record(hook_id(bad), Duration::from_secs(30)).await;
    let f: Finished = serde_json::from_str(hb.result.as_deref().expect("result")).expect("json");
    assert!(!f.success);
    assert_eq!(f.attempts, 2, "the hook saw the final failure: {f:?}");
    assert_eq!(f.result, serde_json::json!("boom"));
    let r = w.json(&["result", "--json", &bad.to_string()], 1);
    assert_eq!(
        (r["attempts"].as_u64(), r["done"].as_bool()),
        (Some(2), Some(true))
    );
}

async fn group_cli_reads_waits_for_and_deletes(b: Backend) {
    let Some(w) = world("group", b).await else {
        return;
    };
    let g = format!("g_{}", w.name);
    let mut lines: Vec<String> = (0..3)
        .map(|k| format!(r#"{{"func": "echo", "args": {{"k": {k}}}, "group": "{g}"}}"#))
        .collect();
    lines.extend((0..2).map(|_| {
        format!(r#"{{"func": "fail", "args": "bad", "group": "{g}", "max_attempts": 1}}"#)
    }));
    let ids = w.enqueue_lines(&lines);
    // Waiting starts before any cluster runs: it must really wait.
    let waiting = w
        .cmd(&["group", &g, "--count", "3", "--wait", "60", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn group");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _run = Guard(w.start());
    let out = waiting.wait_with_output().expect("group");
    assert!(out.status.success(), "{}", stderr(&out));
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let got = got.as_array().expect("array");
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(got.iter().all(|r| r["success"] == true));
    w.wait_done(&ids, Duration::from_secs(30)).await;

    let ok = w.json(&["group", &g, "--json"], 0);
    let mut ks: Vec<i64> = ok
        .as_array()
        .expect("array")
        .iter()
        .map(|r| r["result"]["k"].as_i64().expect("k"))
        .collect();
    ks.sort();
    assert_eq!(ks, vec![0, 1, 2]);
    let all = w.json(&["group", &g, "--failures", "--json"], 0);
    let all = all.as_array().expect("array");
    assert_eq!(all.len(), 5);
    assert_eq!(all.iter().filter(|r| r["result"] == "bad").count(), 2);
    // Fewer than --count when the wait runs out: exit 1, saying so.
    let t = Instant::now();
    let short = w.run(&["group", &g, "--count", "4", "--wait", "0.5"]);
    assert_eq!(short.status.code(), Some(1));
    assert!(t.elapsed() >= Duration::from_millis(500));
    assert!(stderr(&short).contains("3 of 4"), "{}", stderr(&short));
    assert!(
        w.run(&["group", &g, "--failures", "--count", "5"])
            .status
            .success()
    );
    // The human table lists every result, failures with --failures.
    let table = stdout(&w.run(&["group", &g, "--failures"]));
    for id in &ids {
        assert!(table.contains(&id.to_string()), "{table}");
    }
    assert_eq!(table.matches("failed").count(), 2, "{table}");

    // The same through the library.
    let client = cluster::Client::with_broker(
        &w.config(),
        cluster::Brokers::builtin()
            .connect(&w.config())
            .await
            .expect("broker"),
    )
    .await
    .expect("client");
    assert_eq!(client.count_group(&g, false).await.expect("count"), 3);
    assert_eq!(client.count_group(&g, true).await.expect("count"), 2);
    let values = client
        .result_group(&g, false, Some(Duration::from_secs(1)), Some(3))
        .await
        .expect("results");
    assert_eq!(values.len(), 3);
    assert!(values.iter().all(|v| v["k"].is_i64()), "{values:?}");
    assert_eq!(
        client
            .fetch_group(&g, true, None, None)
            .await
            .expect("fetch")
            .len(),
        5
    );

    let del = w.run(&["group", &g, "--delete"]);
    assert!(del.status.success());
    assert!(stdout(&del).contains("deleted 5"), "{}", stdout(&del));
    assert_eq!(
        w.json(&["group", &g, "--failures", "--json"], 0),
        serde_json::json!([])
    );
    assert_eq!(
        w.json(&["group", &g, "--delete", "--json"], 0)["deleted"],
        0
    );
}

/// The chain's links in order, from its result row, with their own rows.
async fn chain_links(w: &World, chain: TaskId) -> (serde_json::Value, Vec<Option<TaskRecord>>) {
    let row = w.wait_record(chain, Duration::from_secs(90)).await;
    assert_eq!(row.func, "chain");
    let result = json_of(row.result.as_deref());
    let store = w.store().await;
    let mut links = Vec::new();
    for l in result["links"].as_array().expect("links") {
        let id: TaskId = l["id"].as_str().expect("id").parse().expect("a task id");
        links.push(store.get(id).await.expect("get"));
    }
    (
        serde_json::json!({ "success": row.success, "result": result }),
        links,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_five_survives_kill_9_and_completes_in_order() {
    let mut w = World::new("chain9", None);
    w.set("QCLUSTER_RETRY", 4)
        .set("QCLUSTER_TIMEOUT", 3)
        .set("QCLUSTER_WORKERS", 2);
    let file: String = (0..5)
        .map(|_| "{\"func\": \"sleep\", \"args\": 1}\n")
        .collect();
    let chain = enqueue_id(&w, &["enqueue", "--chain", "-"], Some(&file));
    let store = w.store().await;
    let mut run = Guard(w.start());
    // Kill the cluster while the third link runs.
    let t = Instant::now();
    while store.group(&chain.to_string()).await.expect("group").len() < 2 {
        assert!(t.elapsed() < Duration::from_secs(30), "two links never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(&run.0, "KILL");
    wait_exit(&mut run.0, Duration::from_secs(10));
    let killed_at = now_us();
    let before = store.group(&chain.to_string()).await.expect("group").len();
    assert!(before < 5, "the chain was still running when killed");
    assert!(store.get(chain).await.expect("get").is_none());

    let _again = Guard(w.start());
    let (row, links) = chain_links(&w, chain).await;
    assert_eq!(row["success"], true, "{row}");
    assert!(row["result"]["stopped_by"].is_null());
    let links: Vec<TaskRecord> = links
        .into_iter()
        .map(|l| l.expect("a row per link"))
        .collect();
    assert_eq!(links.len(), 5);
    for (i, l) in links.iter().enumerate() {
        assert!(l.success && l.func == "sleep", "link {i}: {l:?}");
        assert_eq!(l.group.as_deref(), Some(chain.to_string().as_str()));
        assert_eq!(row["result"]["links"][i]["state"], "success");
        if i > 0 {
            assert!(
                l.started_us >= links[i - 1].stopped_us,
                "link {i} started before link {} stopped",
                i - 1
            );
        }
    }
    assert!(
        links.iter().any(|l| l.started_us > killed_at),
        "the new cluster ran the rest"
    );
    let r = w.json(&["result", "--json", &chain.to_string()], 0);
    assert_eq!(r["func"], "chain");
    assert_eq!(r["success"], true);
}

async fn a_failing_link_stops_its_chain(b: Backend) {
    let Some(mut w) = world("chainf", b).await else {
        return;
    };
    w.set("QCLUSTER_RETRY", 5).set("QCLUSTER_TIMEOUT", 2);
    let g = format!("cg_{}", w.name);
    let file = format!(
        "{{\"func\": \"echo\", \"args\": [1], \"group\": \"{g}\"}}\n\
         {{\"func\": \"fail\", \"args\": \"boom\", \"group\": \"{g}\", \"max_attempts\": 2}}\n\
         {{\"func\": \"echo\", \"args\": [3], \"group\": \"{g}\"}}\n"
    );
    let out = w.run_stdin(&["enqueue", "--chain", "-", "--json"], &file);
    assert!(out.status.success(), "{}", stderr(&out));
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let chain: TaskId = printed["id"]
        .as_str()
        .expect("id")
        .parse()
        .expect("a task id");
    let _run = Guard(w.start());
    let (row, links) = chain_links(&w, chain).await;
    assert_eq!(row["success"], false, "{row}");
    let stopped = &row["result"]["stopped_by"];
    assert_eq!(stopped["index"], 1, "{row}");
    assert_eq!(stopped["func"], "fail");
    let states: Vec<&str> = row["result"]["links"]
        .as_array()
        .expect("links")
        .iter()
        .map(|l| l["state"].as_str().expect("state"))
        .collect();
    assert_eq!(states, ["success", "failed", "not run"]);
    assert_eq!(row["result"]["links"][0]["result"], serde_json::json!([1]));
    assert_eq!(row["result"]["links"][1]["result"], "boom");
    let failed = links[1].as_ref().expect("the failed link's row");
    assert_eq!((failed.attempts, failed.done), (2, true));
    assert!(links[2].is_none(), "the link after the failure never ran");
    // Links keep the group they were given.
    assert_eq!(links[0].as_ref().and_then(|l| l.group.clone()), Some(g));
    let r = w.json(&["result", "--json", &chain.to_string()], 1);
    assert_eq!(r["func"], "chain");
    assert_eq!(r["success"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_iterator_of_1000_items_gives_1000_results_in_order() {
    let mut w = World::new("iter", None);
    w.set("QCLUSTER_WORKERS", 4)
        .set("QCLUSTER_SAVE_LIMIT", 0)
        .set("QCLUSTER_BULK", 50);
    let input: String = (0..1000).map(|i| format!("{{\"i\": {i}}}\n")).collect();
    let iter = enqueue_id(&w, &["enqueue", "echo", "--iter", "-"], Some(&input));
    let t = Instant::now();
    let _run = Guard(w.start());
    let r = w.json(&["result", "--wait", "120", "--json", &iter.to_string()], 0);
    eprintln!("1,000 items and the iterator's row in {:?}", t.elapsed());
    assert_eq!(r["func"], "iter");
    assert_eq!(r["success"], true);
    let results = r["result"].as_array().expect("an array");
    assert_eq!(results.len(), 1000);
    for (i, v) in results.iter().enumerate() {
        assert_eq!(v["i"], i, "item {i} in its place");
    }
    // Complete, its successful items leave the iterator's group (kept here: save_limit = 0).
    let store = w.store().await;
    assert_eq!(
        store
            .group_count(&iter.to_string(), Some(true))
            .await
            .expect("count"),
        0
    );
    let items: Vec<TaskId> = (0..1000).map(|i| item_id(iter, i)).collect();
    assert_eq!(store.known(&items).await.expect("known").len(), 1000);
}

/// `save_limit` prunes old successes every 2 s, sparing those younger than 2 × `retry`; an
/// iterator that runs longer than that still completes (its pending items are spared), and its
/// items are pruned once its row is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_iterator_outlasting_the_prune_window_completes_then_its_items_go() {
    let mut w = World::new("iterprune", None);
    w.set("QCLUSTER_WORKERS", 2)
        .set("QCLUSTER_SAVE_LIMIT", 5)
        .set("QCLUSTER_TIMEOUT", 0.5)
        .set("QCLUSTER_RETRY", 1);
    // 200 items of 60 ms on 2 workers: about 6 s, so prunes run (every 2 s) while the first
    // items are out of the 2 s window.
    let input: String = (0..200).map(|_| "0.06\n").collect();
    let iter = enqueue_id(&w, &["enqueue", "sleep", "--iter", "-"], Some(&input));
    let _run = Guard(w.start());
    let r = w.json(&["result", "--wait", "60", "--json", &iter.to_string()], 0);
    assert_eq!(r["success"], true, "{r}");
    assert_eq!(r["result"].as_array().map(Vec::len), Some(200));
    let store = w.store().await;
    let items: Vec<TaskId> = (0..200).map(|i| item_id(iter, i)).collect();
    let t = Instant::now();
    loop {
        let left = store.known(&items).await.expect("known").len();
        if left <= 5 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{left} item rows still there after the iterator completed"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(store.get(iter).await.expect("get").is_some_and(|r| r.done));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_iterator_records_failed_items_in_their_place() {
    let mut w = World::new("iterf", None);
    w.set("QCLUSTER_MAX_ATTEMPTS", 1);
    let input = "\"a\"\n\"b\"\n\"c\"\n";
    let iter = enqueue_id(&w, &["enqueue", "fail", "--iter", "-"], Some(input));
    let _run = Guard(w.start());
    let r = w.json(&["result", "--wait", "30", "--json", &iter.to_string()], 1);
    assert_eq!(r["success"], false);
    assert_eq!(r["result"], serde_json::json!(["a", "b", "c"]));
}

#[test]
fn bad_flow_input_is_refused_naming_it() {
    let w = World::new("flowbad", None);
    let out = w.run(&["enqueue", "echo", "--hook", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("hook `nope`"), "{}", stderr(&out));

    let file = "{\"func\": \"echo\"}\n{\"func\": \"echo\"}\n{\"func\": \n";
    let out = w.run_stdin(&["enqueue", "--chain", "-"], file);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--chain line 3"), "{}", stderr(&out));

    let out = w.run_stdin(&["enqueue", "--chain", "-"], "\n");
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("no tasks"), "{}", stderr(&out));

    let file = "{\"func\": \"echo\"}\n{\"func\": \"echo\", \"hook\": \"missing\"}\n";
    let out = w.run_stdin(&["enqueue", "--chain", "-"], file);
    assert_eq!(out.status.code(), Some(2));
    let e = stderr(&out);
    assert!(
        e.contains("task 2 of --chain") && e.contains("missing"),
        "{e}"
    );

    let out = w.run_stdin(&["enqueue", "echo", "--iter", "-"], "");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("at least one item"),
        "{}",
        stderr(&out)
    );

    let out = w.run_stdin(&["enqueue", "--chain", "-", "--group", "g"], "{}");
    assert_eq!(
        out.status.code(),
        Some(2),
        "--chain takes its options from its lines"
    );

    let out = w.run_stdin(&["enqueue", "echo", "--iter", "-"], "1\n[2\n");
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--iter line 2"), "{}", stderr(&out));
    // Nothing of it was sent.
    assert_eq!(w.json(&["info", "--json"], 0)["queued"], 0);
}

#[test]
fn sync_mode_runs_hooks_chains_and_iterators_at_enqueue() {
    let mut w = World::new("flowsync", None);
    w.set("QCLUSTER_SYNC", "true");
    let file = "{\"func\": \"echo\", \"args\": [1], \"hook\": \"echo\"}\n\
                {\"func\": \"echo\", \"args\": [2]}\n";
    let chain = enqueue_id(&w, &["enqueue", "--chain", "-"], Some(file));
    // No cluster runs: everything happened at enqueue.
    let r = w.json(&["result", "--json", &chain.to_string()], 0);
    assert_eq!(r["result"]["links"][1]["result"], serde_json::json!([2]));
    let first: TaskId = r["result"]["links"][0]["id"]
        .as_str()
        .expect("id")
        .parse()
        .expect("a task id");
    let h = w.json(&["result", "--json", &hook_id(first).to_string()], 0);
    assert_eq!(h["result"]["result"], serde_json::json!([1]));
    let iter = enqueue_id(&w, &["enqueue", "echo", "--iter", "-"], Some("1\n2\n"));
    let r = w.json(&["result", "--json", &iter.to_string()], 0);
    assert_eq!(r["result"], serde_json::json!([1, 2]));
}

on_sqlite_and_postgres!(
    group_cli_reads_waits_for_and_deletes,
    a_failing_link_stops_its_chain
);
