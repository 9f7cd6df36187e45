//! The sentinel: starts the pushers, the workers and the monitor, restarts any that dies,
//! publishes this cluster's status, and shuts down without losing a package.
//!
//! Every delivery is entered in a ledger ([`crate::shared`]) when a pusher receives it and leaves
//! it only when the monitor settles it (acknowledged, retried or quarantined). Whatever is still
//! in the ledger at the end of a shutdown is given back to the broker, so a package is always
//! either settled or back in the queue. The sentinel holds no task logic of its own: the roles
//! talk through the vocabulary of [`crate::job`] and the state of [`crate::shared`].

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use broker_core::{Broker, Codec, now_us};
use serde::Serialize;
use tokio::task::JoinHandle;

use crate::config::{Config, WorkerMode};
use crate::error::Error;
use crate::job::Job;
use crate::process::{Pool, ProcessWorker};
use crate::shared::Shared;
use crate::status::StatusHome;
use crate::store::Store;
use crate::task::Registry;
use crate::worker::Executor;

pub use crate::counters::{Counters, Summary};

/// Prefix of the stat keys under which clusters publish their status.
pub const STATUS_PREFIX: &str = "cluster:";

/// This cluster's status, published for `qcluster info`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Status {
    /// Random id of this cluster process.
    pub id: String,
    /// `name` from the config.
    pub name: String,
    /// `label` from the config.
    pub label: String,
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// Configured workers.
    pub workers: usize,
    /// Tasks running now.
    pub running: usize,
    /// Jobs waiting in memory for a worker.
    pub queued: usize,
    /// `starting`, `working`, `idle`, `stopping` or `stopped`.
    pub state: String,
    /// Seconds since start.
    pub uptime_secs: f64,
    /// Last update, µs since the epoch.
    pub heartbeat_us: i64,
    /// Totals so far.
    pub totals: Summary,
    /// `async` or `process`.
    #[serde(default)]
    pub worker_mode: String,
    /// The worker processes (process mode).
    #[serde(default)]
    pub children: Vec<crate::process::ChildStatus>,
}

/// Pushers to run: two once there is more than one worker.
fn pusher_count(workers: usize) -> usize {
    workers.clamp(1, 2)
}

/// Host name, for the status.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// A cluster ready to run: broker, store, codec and tasks.
pub struct Cluster {
    config: Arc<Config>,
    broker: Arc<dyn Broker>,
    store: Store,
    codec: Arc<Codec>,
    registry: Arc<Registry>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("name", &self.config.name)
            .field("broker", &self.broker)
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// Completes on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() -> Result<(), Error> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    Ok(())
}

impl Cluster {
    /// Connects broker (one of the built-in adapters) and store as `config` says and signs with
    /// its secret.
    pub async fn connect(config: Config, registry: Registry) -> Result<Self, Error> {
        Self::connect_with(config, registry, &crate::broker::Brokers::builtin()).await
    }

    /// Connects the broker `config` names, found in `brokers`, and the store.
    pub async fn connect_with(
        config: Config,
        registry: Registry,
        brokers: &crate::broker::Brokers,
    ) -> Result<Self, Error> {
        // The secret first: no connection is opened for a configuration that cannot sign.
        let codec = crate::client::codec_from(&config)?;
        let broker = brokers.connect(&config).await?;
        Self::with_parts(config, registry, broker, codec).await
    }

    /// A cluster on a ready broker: codec (from the secret) and result store as `config` says.
    ///
    /// The broker must serve `config.queue_settings()`: the queue named `name`, and above all
    /// the same `retry`, since the cluster plans leases and their extensions with it (a broker
    /// with a shorter lease would hand running tasks to others).
    pub async fn with_broker(
        config: Config,
        registry: Registry,
        broker: Arc<dyn Broker>,
    ) -> Result<Self, Error> {
        let codec = crate::client::codec_from(&config)?;
        Self::with_parts(config, registry, broker, codec).await
    }

    async fn with_parts(
        config: Config,
        registry: Registry,
        broker: Arc<dyn Broker>,
        codec: Codec,
    ) -> Result<Self, Error> {
        let store = Store::connect(&config.store_url(), config.store.connect_timeout).await?;
        Ok(Self::new(config, broker, store, codec, registry))
    }

    /// A cluster from parts.
    pub fn new(
        config: Config,
        broker: Arc<dyn Broker>,
        store: Store,
        codec: Codec,
        registry: Registry,
    ) -> Self {
        Self {
            config: Arc::new(config),
            broker,
            store,
            codec: Arc::new(codec),
            registry: Arc::new(registry),
            counters: Arc::default(),
        }
    }

    /// Live totals (for progress displays).
    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    /// The broker the cluster pulls from.
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    /// Runs until `shutdown` completes, then stops pulling, lets running tasks finish within
    /// `shutdown_timeout`, gives back what did not finish, saves results and returns the totals.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<Summary, Error> {
        let config = self.config.clone();
        let host = host_name();
        // `[http]`: bound before any role starts, so a taken port stops the start.
        let http = match &config.http.listen {
            Some(listen) => Some(crate::http::bind(&config, listen, "http.listen").await?),
            None => None,
        };
        let reporting_done = tokio_util::sync::CancellationToken::new();
        let (reports, reporter) =
            match crate::reporter::start(&config.error_reporter, &host, reporting_done.clone())? {
                Some((r, h)) => (Some(r), Some(h)),
                None => (None, None),
            };
        let metrics = (http.is_some() && config.http.metrics)
            .then(|| Arc::new(crate::metrics::Metrics::new()));
        let broker: Arc<dyn Broker> = match &metrics {
            Some(m) => Arc::new(crate::metrics::Metered::new(self.broker.clone(), m.clone())),
            None => self.broker.clone(),
        };
        let mut shared = Shared::new(
            config.clone(),
            broker,
            self.codec.clone(),
            self.store.clone(),
            self.registry.clone(),
            self.counters.clone(),
            reports,
        );
        shared.metrics = metrics.clone();
        let shared = Arc::new(shared);
        let started = Instant::now();
        let http_done = tokio_util::sync::CancellationToken::new();
        let http_task = http.map(|(listener, addr)| {
            tracing::info!(
                "serving /metrics, /stats.json, /health{} on http://{addr}",
                if config.http.dashboard {
                    " and the dashboard"
                } else {
                    ""
                }
            );
            let client = crate::Client::new(shared.broker.clone(), (*self.codec).clone())
                .with_store(self.store.clone())
                .with_name(&config.name);
            let web = crate::http::Web::new(
                config.clone(),
                client,
                self.store.clone(),
                addr,
                config.http.dashboard,
                Some(crate::http::Live {
                    shared: shared.clone(),
                    metrics,
                    started,
                    host: host.clone(),
                }),
            );
            tokio::spawn(crate::http::serve(listener, web, http_done.clone()))
        });
        let pool = match config.worker_mode {
            WorkerMode::Process => Some(Pool::new(config.clone(), shared.counters.clone())),
            WorkerMode::Async => {
                let defaults = Config::default();
                if config.recycle != defaults.recycle
                    || config.max_rss.is_some()
                    || config.cpu_affinity != 0
                {
                    tracing::warn!(
                        "recycle, max_rss and cpu_affinity apply to worker_mode = \"process\" \
                         only; this cluster runs worker_mode = \"async\""
                    );
                }
                None
            }
        };
        let id = uuid::Uuid::now_v7().simple().to_string();
        let status = |state: &str, jobs: &async_channel::Sender<Job>| Status {
            id: id.clone(),
            name: config.name.clone(),
            label: config.label.clone(),
            host: host.clone(),
            pid: std::process::id(),
            workers: config.workers,
            running: shared.running.load(Ordering::Relaxed),
            queued: jobs.len(),
            state: state.to_owned(),
            uptime_secs: started.elapsed().as_secs_f64(),
            heartbeat_us: now_us(),
            totals: shared.counters.summary(),
            worker_mode: config.worker_mode.to_string(),
            children: pool
                .as_ref()
                .map(|p| p.children.snapshot())
                .unwrap_or_default(),
        };

        let (jobs_tx, jobs_rx) = async_channel::bounded::<Job>(config.queue_limit());
        let (out_tx, out_rx) = tokio::sync::mpsc::channel(config.queue_limit() + 1024);
        let out_rx = Arc::new(tokio::sync::Mutex::new(out_rx));

        let spawn_pusher = || tokio::spawn(crate::pusher::run(shared.clone(), jobs_tx.clone()));
        let spawn_worker = |index: usize| {
            let exec = match &pool {
                Some(p) => Executor::Process(Box::new(ProcessWorker::new(index, p.clone()))),
                None => Executor::Async,
            };
            tokio::spawn(crate::worker::run(
                shared.clone(),
                jobs_rx.clone(),
                out_tx.clone(),
                exec,
            ))
        };
        let spawn_monitor = || tokio::spawn(crate::monitor::run(shared.clone(), out_rx.clone()));

        // Two pushers keep a claim in flight while the other's batch is handed out (a single
        // one leaves the workers idle for a round trip per batch).
        let mut pushers: Vec<JoinHandle<()>> = (0..pusher_count(config.workers))
            .map(|_| spawn_pusher())
            .collect();
        let mut workers: Vec<JoinHandle<()>> = (0..config.workers).map(spawn_worker).collect();
        let mut monitor = spawn_monitor();
        // Schedules: every cluster of a name may fire them (each slot fires once).
        let spawn_scheduler = || tokio::spawn(crate::scheduler::run(shared.clone()));
        let mut scheduler = config.scheduler.then(spawn_scheduler);
        tracing::info!(
            "cluster {} ({}) started: {} {} workers, broker {}, results in {}",
            config.name,
            id,
            config.workers,
            config.worker_mode,
            config.broker,
            self.store.endpoint()
        );

        let ttl = (config.guard_cycle * 4).max(Duration::from_secs(10));
        let publish_every = config.guard_cycle.max(Duration::from_secs(1));
        let mut last_publish: Option<Instant> = None;
        let stat_key = format!("{STATUS_PREFIX}{id}");
        let home = StatusHome::pick(&self.broker, &self.store);
        let mut guard = tokio::time::interval(config.guard_cycle);
        guard.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = guard.tick() => {}
            }
            // Guard: restart any role that died.
            let restart = |what: &str| {
                shared
                    .counters
                    .reincarnations
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!("{what} died; starting a new one");
            };
            for p in pushers.iter_mut() {
                if p.is_finished() {
                    restart("pusher");
                    *p = spawn_pusher();
                }
            }
            for (index, w) in workers.iter_mut().enumerate() {
                if w.is_finished() {
                    restart("worker");
                    *w = spawn_worker(index);
                }
            }
            if monitor.is_finished() {
                restart("monitor");
                monitor = spawn_monitor();
            }
            if let Some(sch) = &mut scheduler
                && sch.is_finished()
                && !shared.stop.is_cancelled()
            {
                restart("scheduler");
                *sch = spawn_scheduler();
            }
            if last_publish.is_none_or(|t| t.elapsed() >= publish_every) {
                last_publish = Some(Instant::now());
                let state = if shared.running.load(Ordering::Relaxed) > 0 || !jobs_tx.is_empty() {
                    "working"
                } else {
                    "idle"
                };
                publish(&home, &stat_key, &status(state, &jobs_tx), ttl).await;
            }
        }

        // Shutdown: stop pulling; queued jobs are given back by the workers.
        shared.stop.cancel();
        // A cycle under way finishes (a slot it claimed is enqueued and confirmed).
        if let Some(sch) = scheduler.take()
            && tokio::time::timeout(Duration::from_secs(5), sch)
                .await
                .is_err()
        {
            tracing::warn!("the scheduler did not stop in time; other clusters recover its slot");
        }
        publish(&home, &stat_key, &status("stopping", &jobs_tx), ttl).await;
        let deadline = Instant::now() + config.shutdown_timeout;
        let hard = shared.hard_stop.clone();
        let hard_after = config
            .shutdown_timeout
            .max(config.queue_settings().wait * 2)
            + Duration::from_secs(4);
        tokio::spawn(async move {
            tokio::time::sleep(hard_after).await;
            hard.cancel();
        });
        // A pusher inside `dequeue` is never aborted (a cancelled claim would strand its
        // packages until their leases run out): it gets the broker's wait and a margin.
        let pusher_deadline = deadline.max(Instant::now() + config.queue_settings().wait * 2);
        for p in pushers.iter_mut() {
            if tokio::time::timeout_at(pusher_deadline.into(), &mut *p)
                .await
                .is_err()
            {
                tracing::error!(
                    "a pusher did not stop; its claimed packages return after their lease"
                );
                p.abort();
            }
        }
        drop(jobs_tx);
        for w in workers.iter_mut() {
            if tokio::time::timeout_at(deadline.into(), &mut *w)
                .await
                .is_err()
            {
                tracing::warn!("a task did not finish within shutdown_timeout; giving it back");
                w.abort();
            }
        }
        drop(out_tx);
        // The monitor saves and settles what the workers finished, then sees the channel close.
        let monitor_deadline = deadline.max(pusher_deadline) + Duration::from_secs(5);
        if tokio::time::timeout_at(monitor_deadline.into(), &mut monitor)
            .await
            .is_err()
        {
            tracing::error!("results could not be saved in time; their tasks are given back");
            monitor.abort();
        }
        // Reports of the last failures get their chance.
        reporting_done.cancel();
        if let Some(r) = reporter {
            let _ = tokio::time::timeout(crate::reporter::DRAIN + Duration::from_secs(1), r).await;
        }
        // Anything still unsettled goes back to the broker.
        // At once and within a bound: if the broker is down, leases bring them back anyway.
        let left = shared.drain();
        let n = left.len();
        let giving =
            futures::future::join_all(left.iter().map(|(seq, ack)| shared.give_back(*seq, ack)));
        if tokio::time::timeout(Duration::from_secs(10), giving)
            .await
            .is_err()
        {
            tracing::error!(
                "{n} deliveries could not all be given back; their leases bring them back"
            );
        }
        http_done.cancel();
        if let Some(mut h) = http_task
            && tokio::time::timeout(Duration::from_secs(2), &mut h)
                .await
                .is_err()
        {
            h.abort();
        }
        let summary = shared.counters.summary();
        let (tx, _) = async_channel::bounded::<Job>(1);
        publish(
            &home,
            &stat_key,
            &status("stopped", &tx),
            Duration::from_secs(30),
        )
        .await;
        tracing::info!(
            "cluster {} stopped: {} processed, {} failed, {} given back",
            config.name,
            summary.processed,
            summary.failed,
            summary.given_back
        );
        Ok(summary)
    }
}

/// Publishes `status` under `key` for `ttl`; a failure is logged, never fatal.
async fn publish(home: &StatusHome, key: &str, status: &Status, ttl: Duration) {
    let Ok(value) = serde_json::to_vec(status) else {
        return;
    };
    if let Err(e) = home.publish(key, &value, ttl).await {
        tracing::debug!("status not published {}: {e}", home.describe());
    }
}
