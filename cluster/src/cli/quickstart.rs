//! `qcluster quickstart`: a local config and secret if missing, sample tasks, the cluster, a
//! summary. Embedded SQLite by default: no server needed.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use broker_core::TaskOptions;
use indicatif::{ProgressBar, ProgressStyle};

use super::{Cli, Fail, Res, load};
use crate::broker::Brokers;
use crate::sentinel::Cluster;
use crate::{Client, EnqueueOptions, NewTask, Registry};

const CONFIG_FILE: &str = "qcluster.toml";

const CONFIG_TEXT: &str = r#"# Written by `qcluster quickstart`. Every key is listed by `qcluster config`.
name = "quickstart"
broker = "orm"
workers = 4
# Keep every successful result (default 250 newest).
save_limit = 0
# The signing secret: the same file on every producer and cluster. Or set QCLUSTER_SECRET.
secret_file = ".qcluster-secret"

[orm]
url = "sqlite://qcluster.sqlite3"
"#;

/// Writes `path` readable by its owner only; fails if it exists.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

fn random_hex(bytes: usize) -> std::io::Result<String> {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Creates `qcluster.toml` and its secret file when no configuration exists.
fn prepare(cli: &Cli) -> Res {
    let have_config = cli.config.is_some() || std::env::var_os("QCLUSTER_CONFIG").is_some();
    if !have_config && !Path::new(CONFIG_FILE).exists() {
        std::fs::write(CONFIG_FILE, CONFIG_TEXT)
            .map_err(|e| Fail::runtime(format!("cannot write {CONFIG_FILE}: {e}")))?;
        println!("created {CONFIG_FILE} (embedded SQLite broker and result store)");
    }
    Ok(())
}

fn ensure_secret(config: &crate::Config) -> Res {
    if config.secret.is_some() {
        return Ok(());
    }
    let Some(path) = &config.secret_file else {
        return Ok(());
    };
    if path.exists() {
        return Ok(());
    }
    let secret = random_hex(32).map_err(|e| Fail::runtime(format!("no randomness: {e}")))?;
    write_private(path, &secret)
        .map_err(|e| Fail::runtime(format!("cannot write {}: {e}", path.display())))?;
    println!(
        "created a random signing secret in {} (mode 0600); producers and clusters of this \
         project must share it (elsewhere, make one with `head -c 32 /dev/urandom | base64` \
         and set QCLUSTER_SECRET or secret_file)",
        path.display()
    );
    Ok(())
}

/// The sample work: mostly `echo` and short `sleep`s, and a few `fail`s (one attempt each) to
/// show how failures are recorded.
fn samples(n: usize) -> Vec<NewTask> {
    (0..n)
        .map(|i| {
            let (func, args) = match i % 200 {
                0 if i > 0 => ("fail", format!("\"sample failure {i}\"")),
                k if k % 10 == 0 => ("sleep", "0.01".to_owned()),
                _ => ("echo", format!("{{\"n\": {i}, \"square\": {}}}", i * i)),
            };
            let mut options = EnqueueOptions {
                options: TaskOptions {
                    group: Some("quickstart".into()),
                    ..TaskOptions::default()
                },
                delay: None,
            };
            if func == "fail" {
                options.options.max_attempts = Some(1);
            }
            NewTask {
                func: func.to_owned(),
                args: args.into_bytes(),
                options,
            }
        })
        .collect()
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(&format!(
        "{what:>9} [{{bar:40}}] {{pos}}/{{len}} {{per_sec}} {{msg}}"
    )) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb
}

pub(super) async fn run(cli: &Cli, n: usize, registry: Registry, brokers: &Brokers) -> Res {
    prepare(cli)?;
    let loaded = load(cli, brokers)?;
    let config = loaded.config;
    ensure_secret(&config)?;
    if n == 0 {
        return Err(Fail::usage("--tasks must be at least 1"));
    }
    let registry = Arc::new(registry);
    let client = Client::connect_with(&config, brokers)
        .await?
        .with_registry(registry.clone());
    let store = client
        .store()
        .cloned()
        .ok_or_else(|| Fail::runtime("no result store"))?;

    let tasks = samples(n);
    let pb = bar(n as u64, "enqueue");
    let mut ids = Vec::with_capacity(n);
    for chunk in tasks.chunks(100) {
        ids.extend(client.enqueue_many(chunk.to_vec()).await?);
        pb.inc(chunk.len() as u64);
    }
    pb.finish();

    let cluster = Cluster::connect_with(config.clone(), (*registry).clone(), brokers).await?;
    let counters = cluster.counters();
    let started = Instant::now();
    let pb = bar(n as u64, "run");
    let watch_ids = ids.clone();
    let watch_store = store.clone();
    let watch_pb = pb.clone();
    let all_done = async move {
        let signal = crate::shutdown_signal();
        tokio::pin!(signal);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = &mut signal => return None,
            }
            match watch_store.done_count(&watch_ids).await {
                Ok(done) => {
                    watch_pb.set_position(done);
                    if done >= watch_ids.len() as u64 {
                        return Some(Instant::now());
                    }
                }
                Err(e) => tracing::warn!("progress: {e}"),
            }
        }
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let stop = async move {
        let finished = all_done.await;
        let _ = tx.send(finished);
    };
    let summary = cluster.run(stop).await?;
    let finished = rx.await.ok().flatten();
    let elapsed = finished.unwrap_or_else(Instant::now) - started;
    pb.finish();

    let failed = store
        .group("quickstart")
        .await?
        .into_iter()
        .filter(|r| !r.success && watch_contains(&ids, r.id))
        .count();
    let counters = counters.summary();
    println!();
    println!(
        "processed     {}",
        counters.processed.max(summary.processed)
    );
    println!("failed        {failed} (the sample includes `fail` tasks on purpose)");
    println!(
        "tasks/s       {:.0} ({} tasks in {:.2} s, {} workers)",
        n as f64 / elapsed.as_secs_f64(),
        n,
        elapsed.as_secs_f64(),
        config.workers
    );
    println!("results       {} (table qcluster_task)", store.endpoint());
    let bin = this_binary();
    if let Some(first) = ids.first() {
        println!("look at one   {bin} result {first}");
    }
    println!("watch them    {bin} dashboard   (then open http://127.0.0.1:9180/)");
    if finished.is_some() {
        Ok(())
    } else {
        Err(Fail::runtime("interrupted before every task finished"))
    }
}

/// How to call this binary from here, as a shell would run it: `qcluster` when that is what
/// PATH finds, else its path (relative to the current directory when under it; after
/// `cargo run` it is `target/release/qcluster`).
fn this_binary() -> String {
    let Ok(exe) = std::env::current_exe() else {
        return "qcluster".into();
    };
    let on_path = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| {
            std::fs::canonicalize(dir.join("qcluster"))
                .is_ok_and(|p| std::fs::canonicalize(&exe).is_ok_and(|e| e == p))
        })
    });
    if on_path {
        return "qcluster".into();
    }
    let shown = std::env::current_dir()
        .ok()
        .and_then(|cwd| exe.strip_prefix(&cwd).ok().map(|p| p.to_path_buf()))
        .unwrap_or_else(|| exe.clone());
    let text = shown.display().to_string();
    if text
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+".contains(c))
    {
        text
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}

fn watch_contains(ids: &[broker_core::TaskId], id: broker_core::TaskId) -> bool {
    ids.contains(&id)
}
