//! End to end through the `qcluster-nats` binary on the NATS server at 127.0.0.1:4222: `broker =
//! "nats"` runs 500 tasks and stops cleanly on SIGTERM; `kill -9` mid-run loses nothing; `info`
//! and `ping` answer; a bad `[nats]` key is refused with exit 2.

mod common;

use std::io::Write;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use cluster::Store;
use cluster::broker_core::TaskId;
use common::{cleanup, reachable, run_prefix, url};

const BIN: &str = env!("CARGO_BIN_EXE_qcluster-nats");

/// One test's world: a temp directory with `qcluster.toml`, its own cluster name, stream
/// prefix and secret, results in SQLite there.
struct World {
    dir: tempfile::TempDir,
    prefix: String,
    secret: String,
    env: Vec<(&'static str, String)>,
}

impl World {
    fn new(extra_nats: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let prefix = run_prefix();
        let config = format!(
            "name = \"e2e_{prefix}\"\nbroker = \"nats\"\n\n[nats]\nurl = \"{}\"\nprefix = \"{prefix}\"\n{extra_nats}\n[store]\nurl = \"sqlite://{}/r.sqlite3\"\n",
            url(),
            dir.path().display()
        );
        std::fs::write(dir.path().join("qcluster.toml"), config).expect("write config");
        Self {
            dir,
            secret: format!("secret-{prefix}-long-enough-for-a-signing-key"),
            prefix,
            env: Vec::new(),
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.current_dir(self.dir.path())
            .args(args)
            .env_remove("QCLUSTER_CONFIG")
            .env("QCLUSTER_LOG", "warn")
            .env("QCLUSTER_SECRET", &self.secret)
            .env("QCLUSTER_GUARD_CYCLE", "0.2");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run qcluster-nats")
    }

    fn enqueue(&self, lines: &[String]) -> Vec<TaskId> {
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

    fn start(&self) -> Guard {
        Guard(
            self.cmd(&["run"])
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn run"),
        )
    }

    async fn store(&self) -> Store {
        let url = format!("sqlite://{}/r.sqlite3", self.dir.path().display());
        Store::connect(&url, Duration::from_secs(5))
            .await
            .expect("store")
    }

    /// Waits until every id has a successful result, or panics after `limit`.
    async fn wait_succeeded(&self, ids: &[TaskId], limit: Duration) {
        let store = self.store().await;
        let t = Instant::now();
        loop {
            let ok = store.succeeded(ids).await.expect("succeeded").len();
            if ok == ids.len() {
                return;
            }
            assert!(
                t.elapsed() < limit,
                "only {ok} of {} tasks succeeded within {limit:?}",
                ids.len()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Kills the child when dropped, so a failed assertion leaves no cluster running.
struct Guard(Child);

impl Guard {
    fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.0.id()).expect("pid");
        // SAFETY: plain kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill");
    }

    fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let t = Instant::now();
        loop {
            if let Some(s) = self.0.try_wait().expect("try_wait") {
                return s.code();
            }
            assert!(
                t.elapsed() < limit,
                "qcluster-nats did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn lines(n: usize, f: impl Fn(usize) -> String) -> Vec<String> {
    (0..n).map(f).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_500_tasks_and_stops_on_sigterm() {
    if !reachable().await {
        return;
    }
    let w = World::new("");
    for cmd in ["ping", "info"] {
        let out = w.run(&[cmd]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let info: serde_json::Value =
        serde_json::from_slice(&w.run(&["info", "--json"]).stdout).expect("info --json");
    assert!(info.to_string().contains("nats"), "{info}");

    let ids = w.enqueue(&lines(500, |i| {
        format!(r#"{{"func": "echo", "args": {{"n": {i}}}}}"#)
    }));
    let mut run = w.start();
    w.wait_succeeded(&ids, Duration::from_secs(120)).await;
    let out = w.run(&["result", &ids[499].to_string(), "--json"]);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("result --json");
    assert_eq!(r["success"], true, "{r}");
    assert_eq!(r["result"]["n"], 499, "{r}");
    run.signal(libc::SIGTERM);
    assert_eq!(run.wait_exit(Duration::from_secs(30)), Some(0));
    cleanup(&w.prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_run_loses_nothing() {
    if !reachable().await {
        return;
    }
    let mut w = World::new("");
    w.env.push(("QCLUSTER_WORKERS", "4".into()));
    w.env.push(("QCLUSTER_TIMEOUT", "2".into()));
    w.env.push(("QCLUSTER_RETRY", "3".into()));
    let ids = w.enqueue(&lines(500, |_| {
        r#"{"func": "sleep", "args": 0.05}"#.to_owned()
    }));
    let mut run = w.start();
    let store = w.store().await;
    let t = Instant::now();
    while store.done_count(&ids).await.expect("count") < 50 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the first run did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    run.signal(libc::SIGKILL);
    run.wait_exit(Duration::from_secs(10));
    let done_before = store.done_count(&ids).await.expect("count");
    assert!(
        done_before < 500,
        "the run was interrupted ({done_before} done)"
    );
    let mut again = w.start();
    w.wait_succeeded(&ids, Duration::from_secs(120)).await;
    again.signal(libc::SIGTERM);
    assert_eq!(again.wait_exit(Duration::from_secs(30)), Some(0));
    cleanup(&w.prefix).await;
}

#[tokio::test]
async fn an_unknown_nats_key_is_refused() {
    // No server needed: the config is refused before anything connects.
    let w = World::new("urll = \"nats://x\"\n");
    let out = w.run(&["ping"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("nats.urll"), "{err}");
}
