//! Operators' commands: `health` (for probes: exit 0 or 1) and `prune` (old results).

use std::sync::Arc;
use std::time::{Duration, Instant};

use broker_core::{Broker, now_us};
use clap::Args;

use super::{Fail, Out, Res, print_json};
use crate::broker::Brokers;
use crate::config::Config;
use crate::sentinel::Status;
use crate::store::Store;

/// Longest each check of `health` may take.
const CHECK_LIMIT: Duration = Duration::from_secs(5);

/// One check's outcome: its time, or what failed.
fn check_json(r: &Result<f64, String>) -> serde_json::Value {
    match r {
        Ok(ms) => serde_json::json!({ "ok": true, "ms": ms }),
        Err(e) => serde_json::json!({ "ok": false, "error": e }),
    }
}

/// `qcluster health`: the broker and the store answer, and a cluster of this name published
/// its status within `max_age`.
pub(super) async fn health(
    config: &Config,
    brokers: &Brokers,
    max_age: Duration,
    json: bool,
) -> Res {
    let limited = |what: &str| format!("{what}: no answer within {}s", CHECK_LIMIT.as_secs());
    let t = Instant::now();
    let broker: Result<Arc<dyn Broker>, String> =
        match tokio::time::timeout(CHECK_LIMIT, brokers.connect(config)).await {
            Ok(Ok(b)) => match tokio::time::timeout(CHECK_LIMIT, b.ping()).await {
                Ok(Ok(())) => Ok(b),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(limited("ping")),
            },
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(limited("connect")),
        };
    let broker_check = broker
        .as_ref()
        .map(|_| t.elapsed().as_secs_f64() * 1000.0)
        .map_err(Clone::clone);
    let t = Instant::now();
    let store_check =
        match tokio::time::timeout(CHECK_LIMIT + config.store.connect_timeout, async {
            let s = Store::connect(&config.store_url(), config.store.connect_timeout).await?;
            s.ping().await
        })
        .await
        {
            Ok(Ok(())) => Ok(t.elapsed().as_secs_f64() * 1000.0),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(limited("store")),
        };
    // Heartbeats: where the status lives (the broker, or the store when the broker cannot).
    let now = now_us();
    let mut clusters: Vec<(Status, f64)> = Vec::new();
    let mut status_error = None;
    match &broker {
        Ok(b) => match super::statuses(b, config).await {
            Ok((all, _)) => {
                for s in all {
                    let age = (now - s.heartbeat_us) as f64 / 1e6;
                    clusters.push((s, age));
                }
            }
            Err(e) => status_error = Some(e.to_string()),
        },
        Err(_) => status_error = Some("the broker does not answer".into()),
    }
    let fresh = clusters
        .iter()
        .filter(|(s, age)| *age <= max_age.as_secs_f64() && s.state != "stopped")
        .count();
    let healthy = broker_check.is_ok() && store_check.is_ok() && fresh > 0;
    if json {
        let list: Vec<serde_json::Value> = clusters
            .iter()
            .map(|(s, age)| {
                serde_json::json!({
                    "id": s.id, "host": s.host, "pid": s.pid, "state": s.state,
                    "heartbeat_age_s": age, "fresh": *age <= max_age.as_secs_f64() && s.state != "stopped",
                })
            })
            .collect();
        print_json(&serde_json::json!({
            "healthy": healthy,
            "broker": check_json(&broker_check),
            "store": check_json(&store_check),
            "clusters": list,
            "fresh_clusters": fresh,
            "max_age_s": max_age.as_secs_f64(),
            "status_error": status_error,
        }));
    } else {
        let line = |what: &str, r: &Result<f64, String>| match r {
            Ok(ms) => println!("{what:<8} ok ({ms:.1} ms)"),
            Err(e) => println!("{what:<8} FAILED: {e}"),
        };
        line("broker", &broker_check);
        line("store", &store_check);
        match &status_error {
            Some(e) => println!("clusters unknown: {e}"),
            None if clusters.is_empty() => println!("clusters none running"),
            None => {
                for (s, age) in &clusters {
                    println!(
                        "cluster  {} {}@{} pid {}: heartbeat {age:.1} s ago{}",
                        s.state,
                        s.label,
                        s.host,
                        s.pid,
                        if *age > max_age.as_secs_f64() {
                            " (stale)"
                        } else {
                            ""
                        }
                    );
                }
            }
        }
        println!("{}", if healthy { "healthy" } else { "UNHEALTHY" });
    }
    if healthy {
        Ok(())
    } else {
        Err(Fail::runtime(String::new()))
    }
}

#[derive(Debug, Args)]
pub(super) struct PruneArgs {
    /// Delete results that stopped longer ago than this: `90s`, `12h`, `7d`…
    #[arg(long = "results-older-than", value_name = "DURATION")]
    older_than: String,
    /// Failures too (by default only successes).
    #[arg(long)]
    failures: bool,
    /// Count what would be deleted, delete nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    out: Out,
}

/// `qcluster prune`: results of this cluster name older than a duration, never one younger than
/// twice `retry` (it still guards against a duplicate delivery).
pub(super) async fn prune(config: &Config, a: PruneArgs) -> Res {
    let age = humantime::parse_duration(a.older_than.trim()).map_err(|e| {
        Fail::usage(format!(
            "--results-older-than: `{}` is not a duration like 90s, 12h or 7d: {e}",
            a.older_than
        ))
    })?;
    let floor = config.retry * 2;
    if age < floor {
        return Err(Fail::usage(format!(
            "--results-older-than {}: must be at least twice retry ({}s): younger results still \
             guard against duplicate deliveries",
            a.older_than,
            floor.as_secs_f64()
        )));
    }
    let before = now_us().saturating_sub(i64::try_from(age.as_micros()).unwrap_or(i64::MAX));
    let store = Store::connect(&config.store_url(), config.store.connect_timeout).await?;
    let n = store
        .prune_older(&config.name, before, a.failures, a.dry_run)
        .await?;
    let what = if a.failures {
        "results"
    } else {
        "successful results"
    };
    if a.out.json {
        print_json(&serde_json::json!({
            "cluster": config.name,
            "older_than_s": age.as_secs_f64(),
            "failures": a.failures,
            "dry_run": a.dry_run,
            if a.dry_run { "would_delete" } else { "deleted" }: n,
        }));
    } else if a.dry_run {
        println!(
            "would delete {n} {what} of `{}` older than {}",
            config.name, a.older_than
        );
    } else {
        println!(
            "deleted {n} {what} of `{}` older than {}",
            config.name, a.older_than
        );
    }
    Ok(())
}
