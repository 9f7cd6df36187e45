//! The command line through the real binary (SQLite, no server): configuration precedence and
//! refusals (exit 2, key named), enqueue input errors, and that every `--json` output parses.

mod common;

use std::time::Duration;

use common::{Guard, World};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Flags beat the environment, which beats the file, which beats the defaults; `config` says
/// where each value came from and masks the secret and URL passwords.
#[test]
fn config_precedence_and_sources() {
    let w = World::new("prec", None);
    let workers = |w: &World, extra: &[(&str, &str)], args: &[&str]| {
        let mut c = w.cmd(&[&["config", "--json"], args].concat());
        for (k, v) in extra {
            c.env(k, v);
        }
        let out = c.output().expect("config");
        assert!(out.status.success(), "{}", stderr(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        (
            v["workers"]["value"].clone(),
            v["workers"]["source"].clone(),
            v,
        )
    };
    let (v, src, all) = workers(&w, &[], &[]);
    assert_eq!(src, "default");
    assert!(v.as_u64().expect("number") >= 1);
    assert_eq!(all["secret"]["value"], "********", "secret masked: {all}");
    assert!(
        !all.to_string().contains(&w.secret),
        "the secret never appears: {all}"
    );
    assert_eq!(all["name"]["source"], "environment QCLUSTER_NAME");

    w.write_config("workers = 3\n[orm]\nconnect_timeout = 2\n");
    let (v, src, all) = workers(&w, &[], &[]);
    assert_eq!(
        (v, src.as_str().unwrap_or_default()),
        (3.into(), "file qcluster.toml")
    );
    assert_eq!(all["orm.connect_timeout"]["value"], 2.0);

    let (v, src, _) = workers(&w, &[("QCLUSTER_WORKERS", "5")], &[]);
    assert_eq!((v, src), (5.into(), "environment QCLUSTER_WORKERS".into()));

    let (v, src, _) = workers(&w, &[("QCLUSTER_WORKERS", "5")], &["--workers", "7"]);
    assert_eq!((v, src), (7.into(), "command-line flag".into()));
    let (v, _, _) = workers(&w, &[("QCLUSTER_WORKERS", "5")], &["--set", "workers=9"]);
    assert_eq!(v, 9);

    let (_, _, all) = workers(
        &w,
        &[(
            "QCLUSTER_ORM__URL",
            "postgres://u:pw-Secret-77@127.0.0.1:1/db",
        )],
        &[],
    );
    assert_eq!(all["orm.url"]["source"], "environment QCLUSTER_ORM__URL");
    assert!(!all.to_string().contains("pw-Secret-77"), "{all}");

    // Text form too.
    let out = w.run(&["config"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("workers") && text.contains("file qcluster.toml"),
        "{text}"
    );
    assert!(!text.contains(&w.secret));
}

/// Each refusal: exit code 2 and a message naming the key.
#[test]
fn bad_configuration_is_refused_with_the_key_named() {
    // (file, environment, arguments, expected message)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [&'a str], &'a str);
    let cases: &[Case] = &[
        (
            "workres = 4\n",
            &[],
            &["config"],
            "`workres`: unknown key (from file qcluster.toml); did you mean `workers`?",
        ),
        (
            "[orm]\nulr = \"x\"\n",
            &[],
            &["config"],
            "`orm.ulr`: unknown key",
        ),
        (
            "workers = \"many\"\n",
            &[],
            &["config"],
            "`workers`: invalid type",
        ),
        (
            "workers = 0\n",
            &[],
            &["config"],
            "`workers`: must be at least 1",
        ),
        (
            "timeout = 60\nretry = 60\n",
            &[],
            &["config"],
            "`retry`: must be greater than timeout",
        ),
        (
            "timeout = 90\n",
            &[],
            &["config"],
            "`retry`: must be greater than timeout",
        ),
        (
            "",
            &[("QCLUSTER_WORKRS", "2")],
            &["config"],
            "`workrs`: unknown key (from QCLUSTER_WORKRS); did you mean `workers`?",
        ),
        ("", &[("QCLUSTER_SECRET", "")], &["run"], "`secret`"),
        (
            "secret = \"in-the-file\"\n",
            &[],
            &["config"],
            "`secret`: the secret must not be written in the config file",
        ),
        (
            "broker = \"carrier-pigeon\"\n",
            &[],
            &["config"],
            "`broker`: unknown broker",
        ),
        (
            "",
            &[],
            &["--set", "bulk=0", "config"],
            "`bulk`: must be at least 1",
        ),
        (
            "",
            &[],
            &["--config", "nope.toml", "config"],
            "nope.toml does not exist",
        ),
        (
            "[orm]\nurl = postgres://u:pw-leak@h/db\n",
            &[],
            &["config"],
            "`config`: TOML parse error at line 2",
        ),
        (
            "",
            &[("QCLUSTER_ORM", "postgres://u:pw-leak@h")],
            &["config"],
            "`orm`: has the wrong type or form (value not shown)",
        ),
        (
            "",
            &[("QCLUSTER_ORM__URL", "42")],
            &["config"],
            "`orm.url`: has the wrong type or form",
        ),
        (
            "queue_limit = 1000000000\n",
            &[],
            &["config"],
            "`queue_limit`: must be at most",
        ),
        (
            "bulk = 5000\n",
            &[],
            &["config"],
            "`bulk`: must be at most 1000",
        ),
    ];
    for (file, env, args, expect) in cases {
        let w = World::new("refuse", None);
        w.write_config(file);
        let mut c = w.cmd(args);
        for (k, v) in *env {
            if *k == "QCLUSTER_ORM" {
                // The whole section from one variable: the nested one would win the merge.
                c.env_remove("QCLUSTER_ORM__URL");
            }
            c.env(k, v);
        }
        let out = c.output().expect("qcluster");
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{file:?} {env:?}: {err}");
        assert!(
            err.contains(expect),
            "{file:?} {env:?}: expected {expect:?} in {err}"
        );
        assert!(!err.contains("in-the-file"), "secret echoed: {err}");
        assert!(!err.contains("pw-leak"), "password echoed: {err}");
    }
    // No secret at all: `run` and `enqueue` refuse; read commands do not need one.
    let w = World::new("nosecret", None);
    for args in [&["run"][..], &["enqueue", "noop"]] {
        let out = w
            .cmd(args)
            .env_remove("QCLUSTER_SECRET")
            .output()
            .expect("qcluster");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            stderr(&out).contains("no signing secret"),
            "{}",
            stderr(&out)
        );
    }
    let out = w
        .cmd(&["ping"])
        .env_remove("QCLUSTER_SECRET")
        .output()
        .expect("ping");
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Bad enqueue input is refused before anything is sent.
#[test]
fn enqueue_input_errors_send_nothing() {
    let w = World::new("badin", None);
    let out = w.run(&["enqueue", "echo", "--args", "{\"a\": [1, 2"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--args is not JSON") && stderr(&out).contains("line 1 column"),
        "{}",
        stderr(&out)
    );

    let out = w.run(&["enqueue", "no_such_task"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("unknown task `no_such_task`"),
        "{}",
        stderr(&out)
    );

    let out = w.run(&["enqueue", "sleep", "--args", "\"long\""]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("arguments for task `sleep`"),
        "{}",
        stderr(&out)
    );

    let path = w.dir.path().join("tasks.jsonl");
    std::fs::write(
        &path,
        "{\"func\": \"noop\"}\n{\"func\": \"echo\", \"args\": [1]}\n{\"fnuc\": \"noop\"}\n",
    )
    .expect("write");
    let out = w.run(&["enqueue", "--from", path.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--from line 3: unknown field `fnuc`"),
        "{}",
        stderr(&out)
    );
    std::fs::write(&path, "{\"func\": \"noop\"}\n\n{\"func\": \"nope\"}\n").expect("write");
    let out = w.run(&["enqueue", "--from", path.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("unknown task `nope`"),
        "{}",
        stderr(&out)
    );

    let info = w.json(&["info", "--json"], 0);
    assert_eq!(info["queued"], 0, "nothing was sent: {info}");
}

/// Every read command's `--json` parses, with the fields scripts rely on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_json_output_parses() {
    let w = World::new("json", None);
    let ok = w.json(&["enqueue", "echo", "--args", "{\"x\": 1}", "--json"], 0);
    let id = ok["id"].as_str().expect("id").to_owned();
    let bad = w.json(
        &[
            "enqueue",
            "fail",
            "--args",
            "\"no\"",
            "--max-attempts",
            "1",
            "--json",
        ],
        0,
    );
    let bad_id = bad["id"].as_str().expect("id").to_owned();

    let pending = w.json(&["result", &id, "--json"], 1);
    assert_eq!(pending["done"], false);

    let info = w.json(&["info", "--json"], 0);
    assert_eq!(info["queued"], 2);
    assert_eq!(info["broker"]["broker"], "orm/sqlite");

    let _run = Guard(w.start());
    let r = w.json(&["result", &id, "--wait", "20", "--json"], 0);
    for key in [
        "id", "func", "success", "result", "attempts", "started", "stopped",
    ] {
        assert!(r.get(key).is_some(), "result --json lacks {key}: {r}");
    }
    assert_eq!(r["id"], id.as_str());
    assert_eq!(r["func"], "echo");
    assert_eq!(r["success"], true);
    assert_eq!(r["result"], serde_json::json!({"x": 1}));
    assert_eq!(r["attempts"], 1);
    assert!(r["started"].as_str().expect("started").ends_with('Z'));

    let f = w.json(&["result", &bad_id, "--wait", "20", "--json"], 1);
    assert_eq!(f["success"], false);
    assert_eq!(f["result"], "no");

    let waited = w.json(
        &["enqueue", "echo", "--args", "[7]", "--wait", "20", "--json"],
        0,
    );
    assert_eq!(waited["result"], serde_json::json!([7]));

    tokio::time::sleep(Duration::from_millis(1200)).await;
    let info = w.json(&["info", "--json"], 0);
    let clusters = info["clusters"].as_array().expect("clusters");
    assert_eq!(clusters.len(), 1, "{info}");
    assert!(clusters[0]["pid"].as_u64().is_some() && clusters[0]["host"].is_string());

    let ping = w.json(&["ping", "--json"], 0);
    assert_eq!(ping["broker"]["ok"], true);
    assert_eq!(ping["store"]["ok"], true);
    let cfg = w.json(&["config", "--json"], 0);
    assert!(cfg["workers"]["value"].is_u64());
    let q = w.json(&["quarantine", "--json"], 0);
    assert!(q.as_array().expect("array").is_empty());
    let purge = w.json(&["purge", "--json"], 0);
    assert!(purge["purged"].is_u64());
}

/// `delete-queue` asks for confirmation, then removes what waits.
#[test]
fn delete_queue_wants_confirmation() {
    let w = World::new("delq", None);
    w.enqueue_lines(&[r#"{"func": "noop"}"#.to_owned()]);
    let out = w.run(&["delete-queue"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--yes"), "{}", stderr(&out));
    assert_eq!(w.json(&["info", "--json"], 0)["queued"], 1);
    let out = w.run(&["delete-queue", "--yes"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(w.json(&["info", "--json"], 0)["queued"], 0);
}

/// An unreachable broker: ping fails with exit 1 in bounded time, naming the host, password masked.
#[cfg(feature = "orm-postgres")]
#[test]
fn ping_unreachable_fails_fast_and_masks_the_password() {
    let mut w = World::new("down", None);
    w.url = "postgres://u:pw-Hidden-5@127.0.0.1:1/db".into();
    let store = format!("sqlite://{}/s.sqlite3", w.dir.path().display());
    w.set("QCLUSTER_ORM__CONNECT_TIMEOUT", 2)
        .set("QCLUSTER_STORE__URL", store);
    let t = std::time::Instant::now();
    let out = w.run(&["ping"]);
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(text.contains("127.0.0.1"), "{text}");
    assert!(!text.contains("pw-Hidden-5"), "{text}");
}

/// The README's first command: no config, no secret, no server. It writes both (the secret
/// with mode 0600), runs every sample task and exits 0.
#[test]
fn quickstart_runs_from_nothing() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let out = std::process::Command::new(common::BIN)
        .args(["quickstart", "--tasks", "120"])
        .current_dir(dir.path())
        .env_remove("QCLUSTER_CONFIG")
        .env_remove("QCLUSTER_SECRET")
        .env_remove("QCLUSTER_ORM__URL")
        .env_remove("QCLUSTER_NAME")
        .env("QCLUSTER_LOG", "error")
        .output()
        .expect("quickstart");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", stderr(&out));
    assert!(stdout.contains("created qcluster.toml"), "{stdout}");
    assert!(stdout.contains("mode 0600"), "{stdout}");
    assert!(stdout.contains("processed     120"), "{stdout}");
    assert!(stdout.contains("tasks/s"), "{stdout}");
    let mode = std::fs::metadata(dir.path().join(".qcluster-secret"))
        .expect("secret file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // A second run reuses both files and works again.
    let again = std::process::Command::new(common::BIN)
        .args(["quickstart", "--tasks", "10"])
        .current_dir(dir.path())
        .env_remove("QCLUSTER_SECRET")
        .env("QCLUSTER_LOG", "error")
        .output()
        .expect("quickstart");
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(again.status.success(), "{stdout}");
    assert!(!stdout.contains("created"), "{stdout}");
    // Its last lines name commands that run as printed, from a shell in that directory (the
    // binary is not on PATH after `cargo run`).
    let line = stdout
        .lines()
        .find(|l| l.starts_with("look at one"))
        .expect("a command to look at one result");
    let command = line.trim_start_matches("look at one").trim();
    assert!(command.contains(" result "), "{command}");
    let ran = std::process::Command::new("sh")
        .args(["-c", command])
        .current_dir(dir.path())
        .env("PATH", "/usr/bin:/bin")
        .env_remove("QCLUSTER_SECRET")
        .env("QCLUSTER_LOG", "error")
        .output()
        .expect("sh");
    assert!(
        ran.status.success(),
        "`{command}` as printed: {}",
        stderr(&ran)
    );
    assert!(String::from_utf8_lossy(&ran.stdout).contains("success"));
}

/// A secret under 32 bytes is refused at start (exit 2, the key and the length it needs),
/// from the environment and from a file, unless `allow_short_secret`; a secret file others can
/// read gets a warning naming it and its mode.
#[test]
fn short_secrets_are_refused_and_open_secret_files_warned() {
    use std::os::unix::fs::PermissionsExt;
    let mut w = World::new("shortsecret", None);
    w.secret = "abc".into();
    let out = w.run(&["enqueue", "noop"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("`secret`") && err.contains("3 bytes") && err.contains("at least 32"),
        "{err}"
    );
    assert!(err.contains("head -c 32 /dev/urandom | base64"), "{err}");
    assert!(
        !err.contains("abc "),
        "the secret itself is not echoed: {err}"
    );
    let out = w.run(&["run"]);
    assert_eq!(out.status.code(), Some(2));
    // Allowed on purpose (tests): accepted.
    let out = w.run(&["--set", "allow_short_secret=true", "enqueue", "noop"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // From a file: the key is secret_file; a file others can read is named with its mode.
    let file = w.dir.path().join("short.secret");
    let from_file = || {
        w.cmd(&["enqueue", "noop"])
            .env_remove("QCLUSTER_SECRET")
            .env("QCLUSTER_SECRET_FILE", &file)
            .output()
            .expect("enqueue")
    };
    std::fs::write(&file, "too-short\n").expect("write");
    let out = from_file();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("`secret_file`") && stderr(&out).contains("9 bytes"));
    std::fs::write(&file, "a-secret-of-forty-bytes-0123456789abcdef\n").expect("write");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = from_file();
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("short.secret") && err.contains("0644") && err.contains("chmod 600"),
        "{err}"
    );
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let out = from_file();
    assert!(out.status.success());
    assert!(!stderr(&out).contains("chmod"), "{}", stderr(&out));
}

/// `--args @FILE` reads the arguments from a file and `@-` from stdin, as curl users expect;
/// what is not JSON is refused naming where it came from.
#[test]
fn args_from_a_file_or_stdin() {
    let w = World::new("argsfile", None);
    let file = w.dir.path().join("args.json");
    std::fs::write(&file, "{\"from\": \"file\"}\n").expect("write");
    let r = w.json(
        &[
            "--set",
            "sync=true",
            "enqueue",
            "echo",
            "--args",
            &format!("@{}", file.display()),
            "--wait",
            "5",
            "--json",
        ],
        0,
    );
    assert_eq!(r["result"]["from"], "file", "{r}");
    let out = w.run_stdin(
        &[
            "--set",
            "sync=true",
            "enqueue",
            "echo",
            "--args",
            "@-",
            "--wait",
            "5",
            "--json",
        ],
        "[1, 2, 3]",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(r["result"], serde_json::json!([1, 2, 3]), "{r}");
    std::fs::write(&file, "not json").expect("write");
    let out = w.run(&["enqueue", "echo", "--args", &format!("@{}", file.display())]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("args.json"), "{}", stderr(&out));
    let out = w.run(&["enqueue", "echo", "--args", "@/nonexistent/args.json"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("cannot read"), "{}", stderr(&out));
}

/// `sync = true` runs the task at enqueue time, no cluster needed.
#[test]
fn sync_mode_runs_inline() {
    let mut w = World::new("sync", None);
    w.set("QCLUSTER_SYNC", "true");
    let r = w.json(
        &[
            "enqueue",
            "echo",
            "--args",
            "{\"now\": true}",
            "--wait",
            "1",
            "--json",
        ],
        0,
    );
    assert_eq!(r["success"], true);
    assert_eq!(r["result"], serde_json::json!({"now": true}));
    let info = w.json(&["info", "--json"], 0);
    assert_eq!(info["queued"], 0, "nothing went through the broker");
    // No broker server is contacted at all: a configured one that is down does not matter.
    let store = w.url.clone();
    w.set("QCLUSTER_ORM__URL", "postgres://nobody@127.0.0.1:1/none")
        .set("QCLUSTER_ORM__CONNECT_TIMEOUT", 1)
        .set("QCLUSTER_STORE__URL", store);
    let r = w.json(
        &["enqueue", "echo", "--args", "2", "--wait", "1", "--json"],
        0,
    );
    assert_eq!(r["result"], 2, "{r}");
}

/// `qcluster enqueue` on the in-process broker would lose the package when it exits: refused.
#[test]
fn enqueue_on_the_memory_broker_is_refused() {
    let w = World::new("memenq", None);
    let out = w.run(&["--broker", "memory", "enqueue", "noop"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("keeps packages inside one process"),
        "{}",
        stderr(&out)
    );
}

/// A secret that looks like a number is used as written, from the environment or a flag.
#[test]
fn numeric_secret_is_taken_as_text() {
    let mut w = World::new("numsecret", None);
    w.secret = "0123456".into();
    w.set("QCLUSTER_ALLOW_SHORT_SECRET", true);
    let ok = w.json(&["enqueue", "noop", "--json"], 0);
    assert!(ok["id"].is_string());
    let out = w.run(&["--set", "secret=1.50", "enqueue", "noop"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let cfg = w.json(&["config", "--json"], 0);
    assert_eq!(cfg["secret"]["source"], "environment QCLUSTER_SECRET");
    assert_eq!(cfg["secret"]["value"], "********");
}

/// A broker the binary was built without: exit 2, naming the Cargo feature to build with.
/// (With every feature on, `registry.rs` checks the message through an empty registry.)
#[cfg(not(feature = "disque"))]
#[test]
fn broker_not_compiled_in_names_the_feature() {
    let w = World::new("nofeature", None);
    let out = w.run(&["--broker", "disque", "purge"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("`broker`: broker `disque` is not compiled into this binary")
            && stderr(&out).contains("--features cluster/disque"),
        "{}",
        stderr(&out)
    );
}

fn mysql_url() -> String {
    std::env::var("QCLUSTER_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
}

/// A default MariaDB (`max_allowed_packet` = 16 MiB) with no `max_message_size` set: the
/// broker takes the server's limit and the cluster runs; only a value the user sets explicitly
/// and the server cannot take is refused, naming the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_with_default_settings_runs() {
    let url = mysql_url();
    if !common::reachable(&url).await {
        return;
    }
    let w = World::new("mariadefault", Some(url));
    let out = w.run(&["ping"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ids = w.enqueue_lines(&[r#"{"func": "echo", "args": "on mariadb"}"#.to_owned()]);
    let mut run = Guard(w.start());
    w.wait_done(&ids, Duration::from_secs(30)).await;
    common::signal(&run.0, "TERM");
    assert_eq!(
        common::wait_exit(&mut run.0, Duration::from_secs(20)),
        Some(0)
    );
    let r = w
        .store()
        .await
        .get(ids[0])
        .await
        .expect("get")
        .expect("row");
    assert!(r.success, "{:?}", r.result);

    let out = w.run(&["--set", "max_message_size=16777216", "ping"]);
    assert!(!out.status.success());
    let out = w.run(&["--set", "max_message_size=16777216", "info"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("`max_message_size`") && stderr(&out).contains("max_allowed_packet"),
        "{}",
        stderr(&out)
    );
}

/// `broker = "memory"`: one process only, said plainly by `info`; sections of other registered
/// brokers are still checked; an unknown broker lists the registered ones.
#[test]
fn memory_broker_and_registered_names() {
    let w = World::new("memory", None);
    let v = w.json(&["--broker", "memory", "info", "--json"], 0);
    assert_eq!(v["broker"]["broker"], "memory", "{v}");
    let notes = v["broker"]["notes"].to_string();
    assert!(notes.contains("process"), "{notes}");

    w.write_config("broker = \"memory\"\n[redis]\nreliabel = false\n");
    let out = w.run(&["config"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("`redis.reliabel`: unknown key (from file qcluster.toml); did you mean `redis.reliable`?"),
        "{}",
        stderr(&out)
    );

    w.write_config("broker = \"beanstalk\"\n");
    let out = w.run(&["config"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("unknown broker `beanstalk`; registered here: ")
            && stderr(&out).contains("memory")
            && stderr(&out).contains("orm"),
        "{}",
        stderr(&out)
    );
}

/// A section of one of our adapters not compiled in is kept, never echoed: URLs under any key,
/// in lists too, lose their passwords and tokens in `config` and in errors. (With every feature
/// on, `registry.rs` checks the same through a registry without the adapter.)
#[cfg(not(feature = "amqp"))]
#[test]
fn sections_not_compiled_in_are_masked() {
    let w = World::new("maskamqp", None);
    w.write_config(
        "[amqp]\nuri = \"amqp://u:pw-Amqp-3@h/v\"\nservers = [\"nats://tok-Arr-4@h:4222\"]\napi_key = \"k-Key-5\"\n",
    );
    let out = w.run(&["config", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    for leak in ["pw-Amqp-3", "tok-Arr-4", "k-Key-5"] {
        assert!(!text.contains(leak), "{leak} shown: {text}");
    }
    assert!(text.contains("amqp.uri"), "{text}");
    let out = w.run(&["--set", "amqp=amqp://u:pw-Amqp-3@h", "config"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("pw-Amqp-3"));
    assert!(!stderr(&out).contains("pw-Amqp-3"));
    let out = w.run(&["--broker", "amqp", "ping"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--features cluster/amqp"),
        "{}",
        stderr(&out)
    );
}
