//! Operators' commands: `health` (for probes: exit 0 or 1) and `prune` (old results).

use std::time::Duration;

use broker_core::now_us;
use clap::Args;

use super::{Fail, Out, Res, print_json};
use crate::broker::Brokers;
use crate::config::Config;
use crate::store::Store;

/// `qcluster health`: the broker and the store answer, and a cluster of this name published
/// its status within `max_age`.
pub(super) async fn health(
    config: &Config,
    brokers: &Brokers,
    max_age: Duration,
    json: bool,
) -> Res {
    let h = crate::health::connect_and_assess(config, brokers, max_age).await;
    if json {
        print_json(&serde_json::to_value(&h).unwrap_or_default());
    } else {
        let line = |what: &str, c: &crate::health::Check| match (&c.ms, &c.error) {
            (Some(ms), _) => println!("{what:<8} ok ({ms:.1} ms)"),
            (None, e) => println!("{what:<8} FAILED: {}", e.as_deref().unwrap_or("")),
        };
        line("broker", &h.broker);
        line("store", &h.store);
        match &h.status_error {
            Some(e) => println!("clusters unknown: {e}"),
            None if h.clusters.is_empty() => println!("clusters none running"),
            None => {
                for b in &h.clusters {
                    println!(
                        "cluster  {} {}@{} pid {}: heartbeat {:.1} s ago{}",
                        b.state,
                        b.label,
                        b.host,
                        b.pid,
                        b.age_secs,
                        if b.age_secs > max_age.as_secs_f64() {
                            " (stale)"
                        } else {
                            ""
                        }
                    );
                }
            }
        }
        if !h.upkeep.is_empty() {
            let figures: Vec<String> = h.upkeep.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!("upkeep   {}", figures.join(" "));
        }
        for w in &h.warnings {
            println!("{w}");
        }
        println!("{}", if h.healthy { "healthy" } else { "UNHEALTHY" });
    }
    if h.healthy {
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

/// Where `qcluster dashboard` listens without `--listen` or `[http] listen`.
const DASHBOARD_DEFAULT: &str = "127.0.0.1:9180";

/// `qcluster dashboard`: the dashboard pages and `/health` until SIGTERM or SIGINT.
pub(super) async fn dashboard(config: &Config, brokers: &Brokers, listen: Option<String>) -> Res {
    let (key, listen) = match listen {
        Some(l) => ("--listen", l),
        None => match &config.http.listen {
            Some(l) => ("http.listen", l.clone()),
            None => ("--listen", DASHBOARD_DEFAULT.to_owned()),
        },
    };
    let (listener, addr) = crate::http::bind(config, &listen, key).await?;
    let broker = brokers.connect(config).await?;
    let client = crate::Client::with_broker(config, broker).await?;
    let store = client
        .store()
        .cloned()
        .ok_or_else(|| Fail::runtime("no result store"))?;
    let web = crate::http::Web::new(
        std::sync::Arc::new(config.clone()),
        client,
        store,
        addr,
        true,
        None,
    );
    println!("dashboard of `{}` on http://{addr}/", config.name);
    let _ = std::io::Write::flush(&mut std::io::stdout());
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(crate::http::serve(listener, web, stop.clone()));
    let signal = crate::shutdown_signal().await;
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    signal.map_err(|e| Fail::runtime(e.to_string()))
}
