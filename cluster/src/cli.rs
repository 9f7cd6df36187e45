//! The `qcluster` command line, reusable by binaries that add their own tasks and brokers:
//! `cluster::App::new().tasks(registry).broker("nats", connect).main()`, or
//! `cluster::cli::main(registry)` for tasks only.
//!
//! Exit codes: 0 success, 1 task or runtime failure, 2 usage or configuration error.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use broker_core::{TaskId, TaskOptions};
use clap::{Args, Parser, Subcommand};
use figment::value::Value;
use serde::Deserialize;

use crate::broker::Brokers;
use crate::config::{Config, Loaded, parse_flag};
use crate::error::{ConfigError, Error};
use crate::sentinel::{Cluster, STATUS_PREFIX, Status};
use crate::status::StatusHome;
use crate::store::{Store, TaskRecord};
use crate::{Client, EnqueueOptions, NewTask, Registry};

mod dead;
mod monitor;
mod ops;
mod quickstart;
mod schedule;

/// Exit code for task or runtime failures.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code for usage and configuration errors.
pub const EXIT_USAGE: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "qcluster",
    version,
    about = "Distributed background tasks with pluggable brokers"
)]
struct Cli {
    /// Config file (default: $QCLUSTER_CONFIG, else ./qcluster.toml if present).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Override any key: `--set workers=4 --set orm.url=postgres://…` (flags beat env and file).
    #[arg(short = 's', long = "set", global = true, value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Same as --set workers=N.
    #[arg(long, global = true)]
    workers: Option<usize>,
    /// Same as --set broker=NAME.
    #[arg(long, global = true)]
    broker: Option<String>,
    /// Same as --set name=NAME.
    #[arg(long, global = true)]
    name: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a local config and secret if missing, enqueue sample tasks, run them, summarise.
    Quickstart {
        /// How many sample tasks.
        #[arg(long, default_value_t = 1000)]
        tasks: usize,
    },
    /// Run the cluster until SIGTERM or SIGINT.
    Run,
    /// Enqueue a task (or many with --from).
    Enqueue(EnqueueArgs),
    /// Show a task's result.
    Result {
        /// Task id.
        id: String,
        /// Wait up to this many seconds for a final result.
        #[arg(long, value_name = "SECS")]
        wait: Option<f64>,
        #[command(flatten)]
        out: Out,
    },
    /// Show, wait for or delete the results of a group.
    Group(GroupArgs),
    /// Add, list, show, pause, resume, remove or run schedules.
    Schedule {
        #[command(subcommand)]
        cmd: schedule::ScheduleCmd,
    },
    /// Show the broker, the queue and the running clusters.
    Info {
        #[command(flatten)]
        out: Out,
    },
    /// Healthy (exit 0) when the broker and the result store answer and a cluster of this name
    /// has published its status recently; else exit 1.
    Health {
        /// Longest a cluster's last heartbeat may be ago, seconds.
        #[arg(long, value_name = "SECS", default_value_t = 10.0)]
        max_age: f64,
        #[command(flatten)]
        out: Out,
    },
    /// Serve the web dashboard and /health until SIGTERM or SIGINT (state changes need
    /// [http] token).
    Dashboard {
        /// Address to listen on (default: [http] listen, else 127.0.0.1:9180; port 0 picks one).
        #[arg(long, value_name = "HOST:PORT")]
        listen: Option<String>,
    },
    /// A live view of the clusters, the queue and the latest failures (q quits).
    Monitor {
        /// Seconds between refreshes.
        #[arg(long, value_name = "SECS", default_value_t = 1.0)]
        every: f64,
    },
    /// Delete stored results older than a duration (successes; failures too with --failures).
    Prune(ops::PruneArgs),
    /// Check that the broker and the result store answer.
    Ping {
        #[command(flatten)]
        out: Out,
    },
    /// Delete every waiting package of this cluster's queue.
    Purge {
        #[command(flatten)]
        out: Out,
    },
    /// Delete this cluster's queue with everything in it: waiting, in flight and dead letters.
    DeleteQueue {
        /// Confirm: without it nothing is deleted (exit 2).
        #[arg(long)]
        yes: bool,
    },
    /// List dead letters (the same as `dead list`).
    Quarantine(dead::ListArgs),
    /// List, requeue (verified again) or delete dead letters.
    Dead {
        #[command(subcommand)]
        cmd: dead::DeadCmd,
    },
    /// Print the effective configuration and where each value came from.
    Config {
        #[command(flatten)]
        out: Out,
    },
}

#[derive(Debug, Args)]
struct Out {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct GroupArgs {
    /// The group.
    group: String,
    /// Failed results too (successes only without it).
    #[arg(long)]
    failures: bool,
    /// Wait up to SECS until there are --count results (at least one without --count).
    #[arg(long, value_name = "SECS")]
    wait: Option<f64>,
    /// Results wanted: exit 1 if fewer are there (once --wait has run out).
    #[arg(long, value_name = "N")]
    count: Option<usize>,
    /// Delete every result of the group and say how many.
    #[arg(long, conflicts_with_all = ["failures", "wait", "count"])]
    delete: bool,
    #[command(flatten)]
    out: Out,
}

#[derive(Debug, Args)]
struct EnqueueArgs {
    /// Task name (required unless --from is given).
    func: Option<String>,
    /// Arguments as JSON; `@FILE` reads them from FILE, `@-` from stdin.
    #[arg(long, default_value = "null")]
    args: String,
    /// Read tasks from FILE (`-` for stdin): one JSON object per line, `{"func": …, "args": …}`.
    #[arg(long, value_name = "FILE", conflicts_with = "func")]
    from: Option<PathBuf>,
    /// Enqueue a chain from FILE (`-` for stdin), lines as for --from: each task runs once the
    /// one before it succeeded. Prints the chain's id.
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with_all = [
            "func", "from", "group", "task_name", "delay", "timeout", "max_attempts", "hook",
        ]
    )]
    chain: Option<PathBuf>,
    /// Enqueue FUNC once per line of FILE (`-` for stdin), each line one JSON arguments value,
    /// as one iterator. Prints the iterator's id.
    #[arg(long, value_name = "FILE", requires = "func", conflicts_with = "from")]
    iter: Option<PathBuf>,
    /// Run the task NAME once this task is done, with its result record as argument.
    #[arg(long, value_name = "NAME")]
    hook: Option<String>,
    /// Wait up to SECS for the result and print it (exit 1 if the task failed).
    #[arg(long, value_name = "SECS")]
    wait: Option<f64>,
    /// Result group.
    #[arg(long)]
    group: Option<String>,
    /// Result name.
    #[arg(long = "task-name")]
    task_name: Option<String>,
    /// Priority (higher first).
    #[arg(long, default_value_t = 0)]
    priority: i16,
    /// Run no earlier than SECS from now.
    #[arg(long, value_name = "SECS")]
    delay: Option<f64>,
    /// This task's timeout in seconds.
    #[arg(long, value_name = "SECS")]
    timeout: Option<f64>,
    /// This task's attempt limit.
    #[arg(long)]
    max_attempts: Option<u32>,
    #[command(flatten)]
    out: Out,
}

/// The JSON of `--args`: as written, or read from a file (`@FILE`) or stdin (`@-`), as curl
/// does; checked to be JSON.
fn read_args(raw: &str) -> Res<String> {
    let (text, from) = match raw.strip_prefix('@') {
        Some("-") => {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                .map_err(|e| Fail::usage(format!("--args @-: cannot read stdin: {e}")))?;
            (s, " (from stdin)".to_owned())
        }
        Some(path) => (
            std::fs::read_to_string(path)
                .map_err(|e| Fail::usage(format!("--args @{path}: cannot read {path}: {e}")))?,
            format!(" (from {path})"),
        ),
        None => (raw.to_owned(), String::new()),
    };
    if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(&text) {
        return Err(Fail::usage(format!("--args is not JSON{from}: {e}")));
    }
    Ok(text.trim().to_owned())
}

/// One line of `enqueue --from`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    func: String,
    #[serde(default)]
    args: serde_json::Value,
    group: Option<String>,
    name: Option<String>,
    #[serde(default)]
    priority: i16,
    delay: Option<f64>,
    timeout: Option<f64>,
    max_attempts: Option<u32>,
    hook: Option<String>,
}

/// A failure with the exit code it maps to.
pub(crate) struct Fail {
    code: u8,
    message: String,
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Self {
            code: if e.is_usage() {
                EXIT_USAGE
            } else {
                EXIT_FAILURE
            },
            message: e.to_string(),
        }
    }
}

impl From<ConfigError> for Fail {
    fn from(e: ConfigError) -> Self {
        Error::from(e).into()
    }
}

impl Fail {
    pub(crate) fn usage(message: impl Into<String>) -> Self {
        Self {
            code: EXIT_USAGE,
            message: message.into(),
        }
    }
    pub(crate) fn runtime(message: impl Into<String>) -> Self {
        Self {
            code: EXIT_FAILURE,
            message: message.into(),
        }
    }
}

type Res<T = ()> = Result<T, Fail>;

/// Runs the `qcluster` command line with `registry`'s tasks and the built-in brokers, and
/// returns the exit code. Same as `App::new().tasks(registry).main()`.
pub fn main(registry: Registry) -> ExitCode {
    run(registry, Brokers::builtin())
}

/// Runs the command line with these tasks and brokers.
pub(crate) fn run(registry: Registry, brokers: Brokers) -> ExitCode {
    // Started by a cluster as one of its worker processes (`worker_mode = "process"`).
    if let Some(code) = crate::process::serve_if_worker(&registry) {
        return code;
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let verbose = matches!(cli.command, Command::Run | Command::Quickstart { .. });
    let filter = tracing_subscriber::EnvFilter::try_from_env("QCLUSTER_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if verbose {
            "info,sqlx=warn"
        } else {
            "warn,sqlx=error"
        })
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let result = rt.block_on(dispatch(cli, registry, brokers));
    // Blocking tasks that overran their timeout cannot be killed; do not wait for them.
    rt.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if !f.message.is_empty() {
                eprintln!("error: {}", f.message);
            }
            ExitCode::from(f.code)
        }
    }
}

fn load(cli: &Cli, brokers: &Brokers) -> Res<Loaded> {
    let mut flags: Vec<(String, Value)> = Vec::new();
    for raw in &cli.set {
        flags.push(parse_flag(raw)?);
    }
    if let Some(w) = cli.workers {
        flags.push(("workers".into(), Value::from(w as u64)));
    }
    if let Some(b) = &cli.broker {
        flags.push(("broker".into(), Value::from(b.clone())));
    }
    if let Some(n) = &cli.name {
        flags.push(("name".into(), Value::from(n.clone())));
    }
    Ok(Config::load_with(cli.config.as_deref(), &flags, brokers)?)
}

/// Seconds from a flag: finite, not negative, at most ten years.
fn secs(key: &str, v: f64) -> Res<Duration> {
    const MAX: f64 = 10.0 * 365.0 * 24.0 * 3600.0;
    Duration::try_from_secs_f64(v)
        .ok()
        .filter(|_| v <= MAX)
        .ok_or_else(|| Fail::usage(format!("{key}: `{v}` is not 0 to {MAX} seconds")))
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

async fn dispatch(cli: Cli, registry: Registry, brokers: Brokers) -> Res {
    if let Command::Quickstart { tasks } = &cli.command {
        return quickstart::run(&cli, *tasks, registry, &brokers).await;
    }
    let loaded = load(&cli, &brokers)?;
    let config = loaded.config.clone();
    match cli.command {
        Command::Quickstart { .. } => Ok(()),
        Command::Config { out } => show_config(&loaded, &brokers, out.json),
        Command::Run => {
            if config.broker == IN_PROCESS {
                tracing::warn!(
                    "broker `memory`: this cluster sees only packages enqueued in this process; \
                     `qcluster enqueue` from another process cannot reach it"
                );
            }
            let cluster = Cluster::connect_with(config, registry, &brokers).await?;
            let stop = async {
                if let Err(e) = crate::shutdown_signal().await {
                    tracing::error!("cannot listen for signals: {e}");
                    std::future::pending::<()>().await;
                }
            };
            cluster.run(stop).await?;
            Ok(())
        }
        Command::Enqueue(args) => enqueue(&config, registry, &brokers, args).await,
        Command::Result { id, wait, out } => {
            let id: TaskId = id
                .parse()
                .map_err(|e| Fail::usage(format!("`{id}` is not a task id: {e}")))?;
            let store = Store::connect(&config.store_url(), config.store.connect_timeout).await?;
            let r = match wait {
                Some(w) => wait_for(&store, id, secs("--wait", w)?).await?,
                None => store.get(id).await?,
            };
            show_result(id, r, out.json)
        }
        Command::Group(args) => group(&config, args).await,
        Command::Schedule { cmd } => schedule::run(&config, registry, &brokers, cmd).await,
        Command::Info { out } => info(&config, &brokers, out.json).await,
        Command::Health { max_age, out } => {
            ops::health(&config, &brokers, secs("--max-age", max_age)?, out.json).await
        }
        Command::Prune(a) => ops::prune(&config, a).await,
        Command::Dashboard { listen } => ops::dashboard(&config, &brokers, listen).await,
        Command::Monitor { every } => {
            monitor::run(&config, &brokers, secs("--every", every)?).await
        }
        Command::Ping { out } => ping(&config, &brokers, out.json).await,
        Command::Purge { out } => {
            let broker = brokers.connect(&config).await?;
            let n = broker.purge_queue().await.map_err(Error::from)?;
            if out.json {
                print_json(&serde_json::json!({ "queue": config.name, "purged": n }));
            } else {
                println!("purged {n} packages from queue `{}`", config.name);
            }
            Ok(())
        }
        Command::DeleteQueue { yes } => {
            if !yes {
                return Err(Fail::usage(format!(
                    "delete-queue removes queue `{}` with every package in it, in flight and \
                     dead letters included; add --yes to confirm",
                    config.name
                )));
            }
            let broker = brokers.connect(&config).await?;
            broker.delete_queue().await.map_err(Error::from)?;
            println!("deleted queue `{}`", config.name);
            Ok(())
        }
        Command::Quarantine(a) => dead::list(&config, &brokers, a).await,
        Command::Dead { cmd } => dead::run(&config, &brokers, cmd).await,
    }
}

fn show_config(loaded: &Loaded, brokers: &Brokers, json: bool) -> Res {
    let entries = loaded.entries_with(brokers);
    if json {
        let map: serde_json::Map<String, serde_json::Value> = entries
            .into_iter()
            .map(|e| {
                (
                    e.key,
                    serde_json::json!({ "value": e.value, "source": e.source }),
                )
            })
            .collect();
        print_json(&serde_json::Value::Object(map));
    } else {
        let width = entries.iter().map(|e| e.key.len()).max().unwrap_or(0);
        for e in entries {
            println!(
                "{:width$} = {:<32} # {}",
                e.key,
                e.value.to_string(),
                e.source
            );
        }
    }
    Ok(())
}

/// A spinner on stderr saying what is waited for, when stderr is a terminal (nothing when piped).
pub(crate) fn spinner(what: String) -> Option<indicatif::ProgressBar> {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return None;
    }
    let s = indicatif::ProgressBar::new_spinner();
    s.enable_steady_tick(Duration::from_millis(120));
    s.set_message(what);
    Some(s)
}

async fn wait_for(store: &Store, id: TaskId, timeout: Duration) -> Res<Option<TaskRecord>> {
    let deadline = Instant::now() + timeout;
    let spin = spinner(format!(
        "waiting up to {timeout:?} for task {id}: no result yet"
    ));
    loop {
        let r = store.get(id).await?;
        if r.as_ref().is_some_and(|r| r.done) || Instant::now() >= deadline {
            if let Some(s) = spin {
                s.finish_and_clear();
            }
            return Ok(r);
        }
        if let (Some(s), Some(r)) = (&spin, &r) {
            let state = if r.stopped_us == 0 {
                "running".to_owned()
            } else {
                format!("attempt {} failed, will retry", r.attempts)
            };
            let left = deadline.saturating_duration_since(Instant::now()).as_secs();
            s.set_message(format!("waiting for task {id}: {state} ({left} s left)"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn show_result(id: TaskId, r: Option<TaskRecord>, json: bool) -> Res {
    let Some(r) = r else {
        if json {
            print_json(
                &serde_json::json!({ "id": id.to_string(), "success": null, "done": false }),
            );
        }
        return Err(Fail::runtime(format!("no result for task {id} yet")));
    };
    if json {
        print_json(&r.to_json());
    } else {
        println!("id        {}", r.id);
        if r.name != r.func {
            // A schedule's tasks carry its name.
            println!("name      {}", r.name);
        }
        println!("func      {}", r.func);
        println!("args      {}", r.args);
        println!(
            "state     {}",
            match (r.success, r.done, r.stopped_us) {
                (true, _, _) => "success",
                (false, true, _) => "failed",
                (false, false, 0) => "running",
                (false, false, _) => "failed, will retry",
            }
        );
        println!("result    {}", r.result.as_deref().unwrap_or("null"));
        println!("attempts  {}", r.attempts);
        println!("started   {}", crate::store::rfc3339(r.started_us));
        println!("stopped   {}", crate::store::rfc3339(r.stopped_us));
        if let Some(g) = &r.group {
            println!("group     {g}");
        }
    }
    if r.success {
        Ok(())
    } else {
        Err(Fail::runtime(String::new()))
    }
}

fn options(
    group: Option<String>,
    name: Option<String>,
    priority: i16,
    delay: Option<f64>,
    timeout: Option<f64>,
    max_attempts: Option<u32>,
    hook: Option<String>,
) -> Res<EnqueueOptions> {
    Ok(EnqueueOptions {
        options: TaskOptions {
            timeout: timeout.map(|t| secs("timeout", t)).transpose()?,
            max_attempts,
            hook,
            group,
            name,
            priority,
            ..TaskOptions::default()
        },
        delay: delay.map(|d| secs("delay", d)).transpose()?,
    })
}

/// Opens FILE, or stdin for `-`.
fn open_input(flag: &str, path: &PathBuf) -> Res<Box<dyn BufRead>> {
    if path.as_os_str() == "-" {
        return Ok(Box::new(std::io::stdin().lock()));
    }
    let f = std::fs::File::open(path)
        .map_err(|e| Fail::usage(format!("{flag} {}: {e}", path.display())))?;
    Ok(Box::new(std::io::BufReader::new(f)))
}

/// Reads `enqueue --from` (or `--chain`) input; every line is checked before anything is sent.
fn read_lines(flag: &str, path: &PathBuf) -> Res<Vec<NewTask>> {
    let reader = open_input(flag, path)?;
    let mut tasks = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line.map_err(|e| Fail::usage(format!("{flag} line {}: {e}", n + 1)))?;
        if line.trim().is_empty() {
            continue;
        }
        let l: Line = serde_json::from_str(&line)
            .map_err(|e| Fail::usage(format!("{flag} line {}: {e}", n + 1)))?;
        let opts = options(
            l.group,
            l.name,
            l.priority,
            l.delay,
            l.timeout,
            l.max_attempts,
            l.hook,
        )
        .map_err(|f| Fail::usage(format!("{flag} line {}: {}", n + 1, f.message)))?;
        let args = serde_json::to_vec(&l.args)
            .map_err(|e| Fail::usage(format!("{flag} line {}: {e}", n + 1)))?;
        tasks.push(NewTask {
            func: l.func,
            args,
            options: opts,
        });
    }
    Ok(tasks)
}

/// The in-process broker: a package enqueued by a command that then exits is gone with it.
const IN_PROCESS: &str = "memory";

async fn enqueue(config: &Config, registry: Registry, brokers: &Brokers, a: EnqueueArgs) -> Res {
    if config.broker == IN_PROCESS && !config.sync {
        return Err(Fail::usage(
            "broker `memory` keeps packages inside one process: `qcluster enqueue` would lose \
             them when it exits. Use it with `quickstart`, with `sync = true`, or in a program \
             that enqueues and runs the cluster itself",
        ));
    }
    let registry = Arc::new(registry);
    if let Some(path) = &a.chain {
        let links = read_lines("--chain", path)?;
        if links.is_empty() {
            return Err(Fail::usage(format!(
                "--chain {}: no tasks (a chain needs at least one)",
                path.display()
            )));
        }
        check_all(&registry, "--chain", &links)?;
        let client = Client::connect_with(config, brokers)
            .await?
            .with_registry(registry);
        let id = client.chain(links).await?;
        return print_one(&client, id, &a).await;
    }
    if let (Some(path), Some(func)) = (&a.iter, &a.func) {
        let reader = open_input("--iter", path)?;
        let mut items = Vec::new();
        for (n, line) in reader.lines().enumerate() {
            let line = line.map_err(|e| Fail::usage(format!("--iter line {}: {e}", n + 1)))?;
            if line.trim().is_empty() {
                continue;
            }
            if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(&line) {
                return Err(Fail::usage(format!("--iter line {}: {e}", n + 1)));
            }
            registry
                .check(func, line.as_bytes())
                .map_err(|e| Fail::usage(format!("--iter line {}: {e}", n + 1)))?;
            items.push(line.into_bytes());
        }
        if items.is_empty() {
            return Err(Fail::usage(format!(
                "--iter {}: no arguments (an iterator needs at least one item)",
                path.display()
            )));
        }
        crate::client::check_hook(&registry, func, a.hook.as_deref())?;
        let opts = options(
            a.group.clone(),
            a.task_name.clone(),
            a.priority,
            a.delay,
            a.timeout,
            a.max_attempts,
            a.hook.clone(),
        )?;
        let client = Client::connect_with(config, brokers)
            .await?
            .with_registry(registry);
        let id = client.iter(func, items, opts).await?;
        return print_one(&client, id, &a).await;
    }
    let tasks = match (&a.from, &a.func) {
        (Some(path), _) => read_lines("--from", path)?,
        (None, Some(func)) => {
            let args = read_args(&a.args)?;
            vec![NewTask {
                func: func.clone(),
                args: args.into_bytes(),
                options: options(
                    a.group.clone(),
                    a.task_name.clone(),
                    a.priority,
                    a.delay,
                    a.timeout,
                    a.max_attempts,
                    a.hook.clone(),
                )?,
            }]
        }
        (None, None) => {
            return Err(Fail::usage(
                "enqueue needs FUNC, --from FILE or --chain FILE",
            ));
        }
    };
    // Check every task against the registry before connecting to anything.
    if a.from.is_some() {
        check_all(&registry, "--from", &tasks)?;
    } else {
        for t in &tasks {
            registry.check(&t.func, &t.args)?;
            crate::client::check_hook(&registry, &t.func, t.options.options.hook.as_deref())?;
        }
    }
    let client = Client::connect_with(config, brokers)
        .await?
        .with_registry(registry);
    let mut stdout = std::io::stdout().lock();
    let mut ids = Vec::with_capacity(tasks.len());
    // A bar on a terminal for a long input; nothing extra when stderr is piped.
    let bar = (a.from.is_some()
        && tasks.len() > 1000
        && std::io::IsTerminal::is_terminal(&std::io::stderr()))
    .then(|| {
        let b = indicatif::ProgressBar::new(tasks.len() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "enqueue {bar:40} {pos}/{len} tasks, {per_sec}, {eta} left",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    for chunk in tasks.chunks(1000) {
        let got = client.enqueue_many(chunk.to_vec()).await?;
        for id in &got {
            if a.out.json && a.wait.is_some() && a.from.is_none() {
                // The result printed below carries the id.
            } else if a.out.json {
                let _ = writeln!(stdout, "{}", serde_json::json!({ "id": id.to_string() }));
            } else {
                let _ = writeln!(stdout, "{id}");
            }
        }
        if let Some(b) = &bar {
            b.inc(got.len() as u64);
        }
        ids.extend(got);
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    drop(stdout);
    if let (Some(w), [id]) = (a.wait, ids.as_slice()) {
        let store = client
            .store()
            .ok_or_else(|| Fail::runtime("no result store"))?;
        let r = wait_for(store, *id, secs("--wait", w)?).await?;
        return show_result(*id, r, a.out.json);
    }
    Ok(())
}

/// Checks every task of a `--from` or `--chain` input, hooks included.
fn check_all(registry: &Registry, flag: &str, tasks: &[NewTask]) -> Res {
    for (i, t) in tasks.iter().enumerate() {
        registry
            .check(&t.func, &t.args)
            .and_then(|()| {
                crate::client::check_hook(registry, &t.func, t.options.options.hook.as_deref())
            })
            .map_err(|e| Fail::usage(format!("task {} of {flag}: {e}", i + 1)))?;
    }
    Ok(())
}

/// Prints the id of a chain or an iterator; with `--wait`, waits for its result row.
async fn print_one(client: &Client, id: TaskId, a: &EnqueueArgs) -> Res {
    match a.wait {
        Some(w) => {
            if !a.out.json {
                println!("{id}");
            }
            let store = client
                .store()
                .ok_or_else(|| Fail::runtime("no result store"))?;
            let r = wait_for(store, id, secs("--wait", w)?).await?;
            show_result(id, r, a.out.json)
        }
        None => {
            if a.out.json {
                println!("{}", serde_json::json!({ "id": id.to_string() }));
            } else {
                println!("{id}");
            }
            Ok(())
        }
    }
}

async fn group(config: &Config, a: GroupArgs) -> Res {
    let store = Store::connect(&config.store_url(), config.store.connect_timeout).await?;
    if a.delete {
        let n = store.delete_group(&a.group).await?;
        if a.out.json {
            print_json(&serde_json::json!({ "group": a.group, "deleted": n }));
        } else {
            println!("deleted {n} results of group `{}`", a.group);
        }
        return Ok(());
    }
    let wait = a.wait.map(|w| secs("--wait", w)).transpose()?;
    let spin = wait.and_then(|w| {
        spinner(format!(
            "waiting up to {w:?} for {} of group `{}`",
            match a.count {
                Some(n) => format!("{n} results"),
                None => "a result".to_owned(),
            },
            a.group
        ))
    });
    let records = crate::client::fetch_group(&store, &a.group, a.failures, wait, a.count).await;
    if let Some(s) = spin {
        s.finish_and_clear();
    }
    let records = records?;
    if a.out.json {
        print_json(&serde_json::Value::Array(
            records.iter().map(TaskRecord::to_json).collect(),
        ));
    } else if records.is_empty() {
        println!("no results in group `{}`", a.group);
    } else {
        println!(
            "{:<36}  {:<16}  {:<8}  {:>8}  {:<27}  result",
            "id", "func", "state", "attempts", "stopped"
        );
        for r in &records {
            let state = match (r.success, r.done) {
                (true, _) => "success",
                (false, true) => "failed",
                (false, false) => "retrying",
            };
            let mut result = r.result.clone().unwrap_or_else(|| "null".into());
            if result.chars().count() > 60 {
                result = result.chars().take(59).chain(['…']).collect();
            }
            println!(
                "{:<36}  {:<16}  {:<8}  {:>8}  {:<27}  {result}",
                r.id.to_string(),
                r.func,
                state,
                r.attempts,
                crate::store::rfc3339(r.stopped_us),
            );
        }
    }
    let want = crate::client::wanted(wait, a.count);
    if records.len() < want {
        return Err(Fail::runtime(format!(
            "group `{}`: {} of {want} results{}",
            a.group,
            records.len(),
            if wait.is_some() {
                " when the wait ran out"
            } else {
                ""
            }
        )));
    }
    Ok(())
}

/// The published status of every cluster of this name, and where status lives (the broker when
/// it can hold it, else the result store).
pub(crate) async fn statuses(
    broker: &Arc<dyn broker_core::Broker>,
    config: &Config,
) -> Result<(Vec<Status>, String), Error> {
    statuses_with(broker, None, config).await
}

/// [`statuses`], reading from `store` (when given) instead of connecting one where the broker
/// cannot hold status: long-running readers (the dashboard, the monitor) keep one pool.
pub(crate) async fn statuses_with(
    broker: &Arc<dyn broker_core::Broker>,
    store: Option<&Store>,
    config: &Config,
) -> Result<(Vec<Status>, String), Error> {
    let home = match store {
        Some(s) => StatusHome::pick(broker, s),
        None => StatusHome::open(broker, config).await?,
    };
    let clusters = home
        .read(STATUS_PREFIX)
        .await?
        .iter()
        .filter_map(|v| serde_json::from_slice(v).ok())
        .filter(|s: &Status| s.name == config.name)
        .collect();
    Ok((clusters, home.describe()))
}

async fn info(config: &Config, brokers: &Brokers, json: bool) -> Res {
    let broker = brokers.connect(config).await?;
    let info = broker.info().await.map_err(Error::from)?;
    let queued = broker.queue_size().await.map_err(Error::from)?;
    let in_flight = broker.lock_size().await.map_err(Error::from)?;
    let quarantined = broker.dead_letter_size().await.map_err(Error::from)?;
    let (mut clusters, status_at) = statuses(&broker, config).await?;
    clusters.sort_by(|a, b| a.host.cmp(&b.host).then(a.pid.cmp(&b.pid)));
    if json {
        print_json(&serde_json::json!({
            "broker": info,
            "queue": config.name,
            "queued": queued,
            "in_flight": in_flight,
            "quarantined": quarantined,
            "status_at": status_at,
            "clusters": clusters,
        }));
        return Ok(());
    }
    println!("broker       {} at {}", info.broker, info.endpoint);
    if let Some(s) = &info.server {
        println!("server       {s}");
    }
    println!("queue        {}", config.name);
    println!("queued       {queued}");
    match in_flight {
        Some(n) => println!("in flight    {n}"),
        None => println!("in flight    (not tracked by this broker)"),
    }
    if let Some(q) = quarantined {
        println!("quarantined  {q}");
    }
    for n in &info.notes {
        println!("note         {n}");
    }
    let upkeep: Vec<String> = info
        .details
        .iter()
        .filter(|(k, _)| k.starts_with("queue_table.") || k.starts_with("server."))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if !upkeep.is_empty() {
        println!("upkeep       {}", upkeep.join(" "));
    }
    println!("status       {status_at}");
    if clusters.is_empty() {
        println!("clusters     none running");
    }
    for c in clusters {
        let mode = if c.worker_mode.is_empty() {
            String::new()
        } else {
            format!(" {}", c.worker_mode)
        };
        println!(
            "cluster      {} {}@{} pid {}: {}{mode} workers, {} running, {} processed, {} failed, up {:.0}s",
            c.state,
            c.label,
            c.host,
            c.pid,
            c.workers,
            c.running,
            c.totals.processed,
            c.totals.failed,
            c.uptime_secs
        );
        let r = &c.totals.reincarnated;
        if c.worker_mode == "process" || c.totals.reincarnations > 0 {
            println!(
                "             reincarnations {}: timeout {}, recycle {}, rss {}, crash {}",
                c.totals.reincarnations, r.timeout, r.recycle, r.rss, r.crash
            );
        }
        for w in &c.children {
            let cpus = if w.cpus.is_empty() {
                String::new()
            } else {
                format!(", cpus {:?}", w.cpus)
            };
            println!(
                "             worker {} pid {}: {} tasks, {} KiB{}{cpus}",
                w.worker,
                w.pid,
                w.tasks,
                w.rss_kib,
                if w.busy { ", busy" } else { "" }
            );
        }
    }
    Ok(())
}

async fn ping(config: &Config, brokers: &Brokers, json: bool) -> Res {
    let t = Instant::now();
    let broker = brokers.connect(config).await;
    let broker_ok = match &broker {
        Ok(b) => b.ping().await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let broker_ms = t.elapsed().as_secs_f64() * 1000.0;
    let t = Instant::now();
    let store_ok = Store::connect(&config.store_url(), config.store.connect_timeout)
        .await
        .map(drop)
        .map_err(|e| e.to_string());
    let store_ms = t.elapsed().as_secs_f64() * 1000.0;
    if json {
        print_json(&serde_json::json!({
            "broker": { "ok": broker_ok.is_ok(), "error": broker_ok.as_ref().err(), "ms": broker_ms },
            "store": { "ok": store_ok.is_ok(), "error": store_ok.as_ref().err(), "ms": store_ms },
        }));
    } else {
        match &broker_ok {
            Ok(()) => println!("broker {}: ok ({broker_ms:.1} ms)", config.broker),
            Err(e) => println!("broker {}: FAILED: {e}", config.broker),
        }
        match &store_ok {
            Ok(()) => println!("store: ok ({store_ms:.1} ms)"),
            Err(e) => println!("store: FAILED: {e}"),
        }
    }
    if broker_ok.is_ok() && store_ok.is_ok() {
        Ok(())
    } else {
        Err(Fail::runtime(String::new()))
    }
}
