//! Whether a cluster of this name is healthy: the broker and the result store answer, and a
//! cluster published its status recently. `qcluster health` and the `/health` endpoint share it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use broker_core::{Broker, now_us};
use serde::Serialize;

use crate::broker::Brokers;
use crate::config::Config;
use crate::sentinel::Status;
use crate::store::Store;

/// Longest each check may take.
pub const CHECK_LIMIT: Duration = Duration::from_secs(5);

/// One check's outcome: its time, or what failed.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// It answered.
    pub ok: bool,
    /// How long it took, in milliseconds, when it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ms: Option<f64>,
    /// What failed, when it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Check {
    fn of(r: Result<f64, String>) -> Self {
        match r {
            Ok(ms) => Self {
                ok: true,
                ms: Some(ms),
                error: None,
            },
            Err(e) => Self {
                ok: false,
                ms: None,
                error: Some(e),
            },
        }
    }
}

/// A cluster's last heartbeat.
#[derive(Debug, Clone, Serialize)]
pub struct Beat {
    /// The cluster's id.
    pub id: String,
    /// Its label.
    #[serde(skip)]
    pub label: String,
    /// Its host.
    pub host: String,
    /// Its process id.
    pub pid: u32,
    /// Its state.
    pub state: String,
    /// Seconds since its last heartbeat.
    #[serde(rename = "heartbeat_age_s")]
    pub age_secs: f64,
    /// Within the allowed age and not stopped.
    pub fresh: bool,
}

/// The health of the clusters of one name.
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    /// Broker, store and at least one fresh heartbeat.
    pub healthy: bool,
    /// The broker answered.
    pub broker: Check,
    /// The result store answered.
    pub store: Check,
    /// Every cluster of this name that published a status.
    pub clusters: Vec<Beat>,
    /// How many of them are fresh.
    pub fresh_clusters: usize,
    /// The allowed heartbeat age, seconds.
    pub max_age_s: f64,
    /// Why heartbeats could not be read, if they could not.
    pub status_error: Option<String>,
    /// How the broker's storage is kept (the SQL broker: the queue table's dead tuples, last
    /// vacuum, autovacuum; InnoDB's history list; SQLite's free pages), as its `info` says.
    pub upkeep: std::collections::BTreeMap<String, String>,
    /// The broker's warnings (`info` notes starting with `WARNING:`): not unhealthy, but worth
    /// an operator's look.
    pub warnings: Vec<String>,
}

/// `f` within `limit`; its error, or "`what`: no answer within …", as text.
pub(crate) async fn bounded<T, E: ToString>(
    what: &str,
    limit: Duration,
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("{what}: no answer within {}s", limit.as_secs())),
    }
}

/// Connects to the broker and the store `config` names, then [`assess`]es.
pub async fn connect_and_assess(config: &Config, brokers: &Brokers, max_age: Duration) -> Health {
    let t = Instant::now();
    let broker = bounded("connect", CHECK_LIMIT, brokers.connect(config)).await;
    let elapsed = t.elapsed();
    let t = Instant::now();
    let store = bounded(
        "store",
        CHECK_LIMIT + config.store.connect_timeout,
        Store::connect(&config.store_url(), config.store.connect_timeout),
    )
    .await;
    assess_with(
        config,
        broker.map(|b| (b, elapsed)),
        store.map(|s| (s, t.elapsed())),
        max_age,
    )
    .await
}

/// Pings a connected broker and store (each within [`CHECK_LIMIT`]) and reads the heartbeats.
pub async fn assess(
    config: &Config,
    broker: &Arc<dyn Broker>,
    store: &Store,
    max_age: Duration,
) -> Health {
    assess_with(
        config,
        Ok((broker.clone(), Duration::ZERO)),
        Ok((store.clone(), Duration::ZERO)),
        max_age,
    )
    .await
}

async fn assess_with(
    config: &Config,
    broker: Result<(Arc<dyn Broker>, Duration), String>,
    store: Result<(Store, Duration), String>,
    max_age: Duration,
) -> Health {
    let t = Instant::now();
    let broker = match broker {
        Ok((b, took)) => bounded("ping", CHECK_LIMIT, b.ping())
            .await
            .map(|()| (b, took + t.elapsed())),
        Err(e) => Err(e),
    };
    let t = Instant::now();
    let store_check = match &store {
        Ok((s, took)) => bounded("store", CHECK_LIMIT, s.ping())
            .await
            .map(|()| (*took + t.elapsed()).as_secs_f64() * 1000.0),
        Err(e) => Err(e.clone()),
    };
    let store = store.ok().map(|(s, _)| s);
    let broker_check = broker
        .as_ref()
        .map(|(_, took)| took.as_secs_f64() * 1000.0)
        .map_err(Clone::clone);
    // Heartbeats: where the status lives (the broker, or the store when the broker cannot).
    let now = now_us();
    let max = max_age.as_secs_f64();
    let mut clusters = Vec::new();
    let mut status_error = None;
    match &broker {
        Ok((b, _)) => match bounded(
            "status",
            CHECK_LIMIT,
            crate::cli::statuses_with(b, store.as_ref(), config),
        )
        .await
        {
            Ok((all, _)) => {
                for s in all {
                    let s: Status = s;
                    let age = (now - s.heartbeat_us) as f64 / 1e6;
                    clusters.push(Beat {
                        fresh: age <= max && s.state != "stopped",
                        id: s.id,
                        label: s.label,
                        host: s.host,
                        pid: s.pid,
                        state: s.state,
                        age_secs: age,
                    });
                }
            }
            Err(e) => status_error = Some(e),
        },
        Err(_) => status_error = Some("the broker does not answer".into()),
    }
    let fresh = clusters.iter().filter(|b| b.fresh).count();
    let mut upkeep = std::collections::BTreeMap::new();
    let mut warnings = Vec::new();
    if let Ok((b, _)) = &broker
        && let Ok(info) = bounded("info", CHECK_LIMIT, b.info()).await
    {
        upkeep = info
            .details
            .into_iter()
            .filter(|(k, _)| k.starts_with("queue_table.") || k.starts_with("server."))
            .collect();
        warnings = info
            .notes
            .into_iter()
            .filter(|n| n.starts_with("WARNING"))
            .collect();
    }
    Health {
        healthy: broker_check.is_ok() && store_check.is_ok() && fresh > 0,
        broker: Check::of(broker_check),
        store: Check::of(store_check),
        clusters,
        fresh_clusters: fresh,
        max_age_s: max,
        status_error,
        upkeep,
        warnings,
    }
}
