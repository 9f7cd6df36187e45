//! `qcluster schedule …`: thin calls of the client's schedule API.

use clap::{ArgGroup, Args, Subcommand};

use super::{Fail, Out, Res, print_json};
use crate::broker::Brokers;
use crate::client::NewSchedule;
use crate::client::read_time;
use crate::config::Config;
use crate::scheduler::ScheduleOptions;
use crate::store::{ScheduleRow, rfc3339};
use crate::{Client, Registry};

#[derive(Debug, Subcommand)]
pub(super) enum ScheduleCmd {
    /// Add a schedule: FUNC with --args, --cron EXPR, --every KIND or --once.
    Add(Box<AddArgs>),
    /// List the schedules of this cluster name.
    List {
        #[command(flatten)]
        out: Out,
    },
    /// Show one schedule.
    Show {
        /// The schedule's name.
        #[arg(id = "schedule", value_name = "NAME")]
        name: String,
        #[command(flatten)]
        out: Out,
    },
    /// Pause a schedule: its slots are skipped until it is resumed.
    Pause {
        /// The schedule's name.
        #[arg(id = "schedule", value_name = "NAME")]
        name: String,
    },
    /// Resume a paused schedule from its next slot after now.
    Resume {
        /// The schedule's name.
        #[arg(id = "schedule", value_name = "NAME")]
        name: String,
    },
    /// Remove a schedule.
    Remove {
        /// The schedule's name.
        #[arg(id = "schedule", value_name = "NAME")]
        name: String,
    },
    /// Enqueue one extra run of a schedule now (its slots are unchanged).
    Run {
        /// The schedule's name.
        #[arg(id = "schedule", value_name = "NAME")]
        name: String,
        #[command(flatten)]
        out: Out,
    },
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("when").required(true).args(["cron", "every", "once"])))]
pub(super) struct AddArgs {
    /// The schedule's name (unique per cluster name).
    #[arg(id = "schedule", value_name = "NAME")]
    name: String,
    /// The task to enqueue.
    func: String,
    /// The task's arguments, JSON.
    #[arg(long, default_value = "null")]
    args: String,
    /// A cron expression: 5 fields, or 6 with seconds first (`*/10 * * * * *`).
    #[arg(long, value_name = "EXPR")]
    cron: Option<String>,
    /// `minutes:N`, `hourly`, `daily`, `weekly`, `biweekly`, `monthly`, `bimonthly`,
    /// `quarterly` or `yearly`.
    #[arg(long, value_name = "KIND")]
    every: Option<String>,
    /// Run once, at --next-run (default now).
    #[arg(long)]
    once: bool,
    /// The first slot: RFC 3339, `YYYY-MM-DD HH:MM[:SS]` in --tz, `now` or `+10m` (default now;
    /// for --cron the next time it matches).
    #[arg(long = "next-run", value_name = "TIME")]
    next_run: Option<String>,
    /// Runs, then the schedule is done (default -1: forever).
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    repeats: i64,
    /// IANA time zone of the calendar kinds and cron (default UTC).
    #[arg(long, value_name = "ZONE")]
    tz: Option<String>,
    /// The task's timeout, seconds.
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    /// The task's attempt limit.
    #[arg(long)]
    max_attempts: Option<u32>,
    /// The results' group.
    #[arg(long)]
    group: Option<String>,
    /// A hook task run with each finished task.
    #[arg(long)]
    hook: Option<String>,
    /// Priority (higher first).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i16,
    #[command(flatten)]
    out: Out,
}

/// `minutes:N` or a calendar kind.
fn every(name: &str, text: &str) -> Result<(String, Option<u32>), Fail> {
    if let Some(n) = text.strip_prefix("minutes:") {
        let n: u32 = n.trim().parse().map_err(|_| {
            Fail::usage(format!(
                "schedule `{name}`: --every minutes:N takes a whole number of minutes, got `{n}`"
            ))
        })?;
        return Ok(("minutes".into(), Some(n)));
    }
    Ok((text.to_owned(), None))
}

/// `cron */5 * * * *`, `minutes:10`, `daily`.
fn timing(s: &ScheduleRow) -> String {
    match (s.kind.as_str(), &s.cron, s.minutes) {
        ("cron", Some(c), _) => format!("cron {c}"),
        ("minutes", _, Some(m)) => format!("minutes:{m}"),
        (k, _, _) => k.to_owned(),
    }
}

fn row_json(s: &ScheduleRow) -> serde_json::Value {
    let t = |v: Option<i64>| v.map(rfc3339);
    serde_json::json!({
        "name": s.name,
        "func": s.func,
        "args": serde_json::from_str::<serde_json::Value>(&s.args).unwrap_or(serde_json::Value::String(s.args.clone())),
        "options": serde_json::from_str::<serde_json::Value>(&s.options).unwrap_or(serde_json::Value::Null),
        "kind": s.kind,
        "minutes": s.minutes,
        "cron": s.cron,
        "tz": s.tz.as_deref().unwrap_or("UTC"),
        "repeats": s.repeats,
        "anchor": rfc3339(s.anchor),
        "next_run": t(s.next_run),
        "last_run": t(s.last_run),
        "last_task": s.last_task,
        "pending": t(s.pending),
        "enabled": s.enabled,
        "id": s.id,
    })
}

pub(super) async fn run(
    config: &Config,
    registry: Registry,
    brokers: &Brokers,
    cmd: ScheduleCmd,
) -> Res {
    let client = Client::connect_with(config, brokers)
        .await?
        .with_registry(std::sync::Arc::new(registry));
    match cmd {
        ScheduleCmd::Add(a) => {
            let (kind, minutes) = match (&a.cron, &a.every, a.once) {
                (Some(_), _, _) => ("cron".to_owned(), None),
                (_, Some(e), _) => every(&a.name, e)?,
                _ => ("once".to_owned(), None),
            };
            let next_run = a
                .next_run
                .as_deref()
                .map(|t| read_time(&a.name, t, a.tz.as_deref()))
                .transpose()?;
            let s = NewSchedule {
                name: a.name.clone(),
                func: a.func.clone(),
                args: a.args.clone().into_bytes(),
                options: ScheduleOptions {
                    timeout: a.timeout,
                    max_attempts: a.max_attempts,
                    group: a.group.clone(),
                    hook: a.hook.clone(),
                    priority: a.priority,
                },
                kind,
                minutes,
                cron: a.cron.clone(),
                tz: a.tz.clone(),
                next_run,
                repeats: a.repeats,
            };
            let row = client.add_schedule(s).await?;
            if a.out.json {
                print_json(&row_json(&row));
            } else {
                println!(
                    "schedule `{}` added: {} {}, next run {}",
                    row.name,
                    timing(&row),
                    row.tz.as_deref().unwrap_or("UTC"),
                    row.next_run.map(rfc3339).unwrap_or_else(|| "never".into())
                );
            }
            Ok(())
        }
        ScheduleCmd::List { out } => {
            let rows = client.schedules().await?;
            if out.json {
                let all: Vec<serde_json::Value> = rows
                    .iter()
                    .map(|r| match r {
                        Ok(s) => row_json(s),
                        Err(b) => {
                            serde_json::json!({ "name": b.name, "id": b.id, "error": b.error })
                        }
                    })
                    .collect();
                print_json(&serde_json::Value::Array(all));
                return Ok(());
            }
            if rows.is_empty() {
                println!("no schedules for cluster `{}`", config.name);
            }
            println!(
                "{:<24} {:<22} {:<16} {:<28} {:>7} {:<8}",
                "name", "timing", "func", "next run", "repeats", "state"
            );
            for r in &rows {
                match r {
                    Ok(s) => println!(
                        "{:<24} {:<22} {:<16} {:<28} {:>7} {:<8}",
                        s.name,
                        timing(s),
                        s.func,
                        s.next_run.map(rfc3339).unwrap_or_else(|| "done".into()),
                        s.repeats,
                        if s.enabled { "active" } else { "paused" }
                    ),
                    Err(b) => println!("{:<24} unreadable: {}", b.name, b.error),
                }
            }
            Ok(())
        }
        ScheduleCmd::Show { name, out } => {
            let s = client
                .schedule(&name)
                .await?
                .ok_or_else(|| Fail::runtime(format!("schedule `{name}`: no such schedule")))?;
            let j = row_json(&s);
            if out.json {
                print_json(&j);
            } else if let Some(m) = j.as_object() {
                for (k, v) in m {
                    println!("{k:<10} {v}");
                }
            }
            Ok(())
        }
        ScheduleCmd::Pause { name } => {
            client.pause_schedule(&name).await?;
            println!("schedule `{name}` paused");
            Ok(())
        }
        ScheduleCmd::Resume { name } => {
            client.resume_schedule(&name).await?;
            println!("schedule `{name}` resumed");
            Ok(())
        }
        ScheduleCmd::Remove { name } => {
            client.remove_schedule(&name).await?;
            println!("schedule `{name}` removed");
            Ok(())
        }
        ScheduleCmd::Run { name, out } => {
            let id = client.run_schedule(&name).await?;
            if out.json {
                print_json(&serde_json::json!({ "id": id.to_string() }));
            } else {
                println!("{id}");
            }
            Ok(())
        }
    }
}
