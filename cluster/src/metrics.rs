//! What a running cluster measures for `/metrics` (Prometheus text) and `/stats.json`.
//!
//! The promise: every figure is this process's own since it started (Prometheus counters reset
//! with the process, as scrapers expect), by task function where the function is known; the
//! queue figures are read from the broker at each scrape. Nothing here blocks a worker: the
//! monitor records a whole batch of outcomes under one short lock, and broker calls are timed by
//! the [`Metered`] layer around the broker.
//!
//! Built on `prometheus-client` (the Prometheus project's own Rust client): an explicit
//! registry per cluster rather than a process-global recorder, so two clusters in one process
//! (tests, embedded use) never mix their figures, and typed label sets.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use broker_core::{
    AckId, Broker, BrokerError, BrokerInfo, Capabilities, DeadLetter, Delivery, Message, MessageId,
    Stat,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::counters::Summary;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FuncLabel {
    func: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// One task function's totals, as `/stats.json` shows them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FuncTotals {
    /// Runs finished.
    pub processed: u64,
    /// Runs that succeeded.
    pub succeeded: u64,
    /// Runs that failed (retried or final).
    pub failed: u64,
    /// Failed runs sent back for another attempt.
    pub retried: u64,
    /// Seconds spent running, all runs together.
    pub run_seconds: f64,
}

/// The queue and worker figures read at scrape time.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Gauges {
    /// Packages waiting in the broker.
    pub waiting: Option<u64>,
    /// Packages delivered and not yet settled, where the broker tracks them.
    pub in_flight: Option<u64>,
    /// Dead letters, where the broker keeps them.
    pub dead_letters: Option<u64>,
    /// Workers running a task now.
    pub workers_busy: u64,
    /// Workers of this cluster.
    pub workers: u64,
}

/// One run's outcome, for [`Metrics::record`].
pub(crate) struct Finished<'a> {
    pub func: &'a str,
    pub success: bool,
    pub retried: bool,
    pub run: Duration,
}

/// The figures of one running cluster.
pub struct Metrics {
    registry: Registry,
    processed: Family<FuncLabel, Counter>,
    succeeded: Family<FuncLabel, Counter>,
    failed: Family<FuncLabel, Counter>,
    retried: Family<FuncLabel, Counter>,
    quarantined: Counter,
    run_time: Family<FuncLabel, Histogram>,
    broker_calls: Family<OpLabel, Histogram>,
    broker_errors: Family<OpLabel, Counter>,
    reincarnations: Family<ReasonLabel, Counter>,
    waiting: Gauge,
    in_flight: Gauge,
    dead_letters: Gauge,
    workers_busy: Gauge,
    workers: Gauge,
    funcs: Mutex<BTreeMap<String, FuncTotals>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Empty figures, registered under the `qcluster_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("qcluster");
        let processed = Family::<FuncLabel, Counter>::default();
        let succeeded = Family::<FuncLabel, Counter>::default();
        let failed = Family::<FuncLabel, Counter>::default();
        let retried = Family::<FuncLabel, Counter>::default();
        let quarantined = Counter::default();
        // 1 ms to ~9 h in factors of 4: task run times span that much.
        let run_time = Family::<FuncLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 4.0, 13))
        });
        // 50 µs to ~13 s in factors of 4.
        let broker_calls = Family::<OpLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_05, 4.0, 10))
        });
        let broker_errors = Family::<OpLabel, Counter>::default();
        let reincarnations = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "tasks_processed",
            "Task runs finished, by function",
            processed.clone(),
        );
        registry.register(
            "tasks_succeeded",
            "Task runs that succeeded, by function",
            succeeded.clone(),
        );
        registry.register(
            "tasks_failed",
            "Task runs that failed (retried or final), by function",
            failed.clone(),
        );
        registry.register(
            "tasks_retried",
            "Failed task runs sent back for another attempt, by function",
            retried.clone(),
        );
        registry.register(
            "tasks_quarantined",
            "Packages that failed verification and were set aside (their function is unknown)",
            quarantined.clone(),
        );
        registry.register(
            "task_run_seconds",
            "Run time of tasks, by function",
            run_time.clone(),
        );
        registry.register(
            "broker_call_seconds",
            "Latency of broker calls, by operation",
            broker_calls.clone(),
        );
        registry.register(
            "broker_call_errors",
            "Broker calls that failed, by operation",
            broker_errors.clone(),
        );
        registry.register(
            "reincarnations",
            "Worker processes replaced, by reason",
            reincarnations.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let waiting = gauge(
            &mut registry,
            "queue_waiting",
            "Packages waiting in the broker",
        );
        let in_flight = gauge(
            &mut registry,
            "queue_in_flight",
            "Packages delivered and not yet settled (where the broker tracks them)",
        );
        let dead_letters = gauge(
            &mut registry,
            "queue_dead_letters",
            "Dead letters of the queue (where the broker keeps them)",
        );
        let workers_busy = gauge(&mut registry, "workers_busy", "Workers running a task");
        let workers = gauge(&mut registry, "workers", "Workers of this cluster");
        Self {
            registry,
            processed,
            succeeded,
            failed,
            retried,
            quarantined,
            run_time,
            broker_calls,
            broker_errors,
            reincarnations,
            waiting,
            in_flight,
            dead_letters,
            workers_busy,
            workers,
            funcs: Mutex::default(),
        }
    }

    /// Records a batch of finished runs.
    pub(crate) fn record<'a>(&self, runs: impl IntoIterator<Item = Finished<'a>>) {
        let mut funcs = self.funcs.lock().unwrap_or_else(|p| p.into_inner());
        for r in runs {
            let label = FuncLabel {
                func: r.func.to_owned(),
            };
            self.processed.get_or_create(&label).inc();
            if r.success {
                self.succeeded.get_or_create(&label).inc();
            } else {
                self.failed.get_or_create(&label).inc();
            }
            if r.retried {
                self.retried.get_or_create(&label).inc();
            }
            let secs = r.run.as_secs_f64();
            self.run_time.get_or_create(&label).observe(secs);
            let t = match funcs.get_mut(r.func) {
                Some(t) => t,
                None => funcs.entry(r.func.to_owned()).or_default(),
            };
            t.processed += 1;
            t.succeeded += u64::from(r.success);
            t.failed += u64::from(!r.success);
            t.retried += u64::from(r.retried);
            t.run_seconds += secs;
        }
    }

    /// Counts a package that failed verification.
    pub(crate) fn quarantined(&self) {
        self.quarantined.inc();
    }

    fn broker_call(&self, op: &'static str, took: Duration, ok: bool) {
        let label = OpLabel { op };
        self.broker_calls
            .get_or_create(&label)
            .observe(took.as_secs_f64());
        if !ok {
            self.broker_errors.get_or_create(&label).inc();
        }
    }

    /// Sets the figures read at scrape time.
    pub fn set_gauges(&self, g: &Gauges, totals: &Summary) {
        let set = |gauge: &Gauge, v: Option<u64>| {
            gauge.set(v.map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX)));
        };
        set(&self.waiting, g.waiting);
        set(&self.in_flight, g.in_flight);
        set(&self.dead_letters, g.dead_letters);
        set(&self.workers_busy, Some(g.workers_busy));
        set(&self.workers, Some(g.workers));
        let r = totals.reincarnated;
        for (reason, now) in [
            ("timeout", r.timeout),
            ("recycle", r.recycle),
            ("rss", r.rss),
            ("crash", r.crash),
        ] {
            let c = self.reincarnations.get_or_create(&ReasonLabel { reason });
            let had = c.get();
            if now > had {
                c.inc_by(now - had);
            }
        }
    }

    /// The Prometheus text exposition of every figure (gauges as last set).
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!("cannot encode metrics: {e}");
        }
        out
    }

    /// Totals by task function.
    pub fn by_func(&self) -> BTreeMap<String, FuncTotals> {
        self.funcs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Packages quarantined since start.
    pub fn quarantined_total(&self) -> u64 {
        self.quarantined.get()
    }
}

/// A layer around a broker that times every call into [`Metrics`] (`broker_call_seconds` by
/// operation, `broker_call_errors`), and otherwise changes nothing.
#[derive(Debug)]
pub struct Metered {
    inner: std::sync::Arc<dyn Broker>,
    metrics: std::sync::Arc<Metrics>,
}

impl Metered {
    /// Wraps `inner`.
    pub fn new(inner: std::sync::Arc<dyn Broker>, metrics: std::sync::Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<T, BrokerError>>,
    ) -> Result<T, BrokerError> {
        let t = Instant::now();
        let r = call.await;
        self.metrics.broker_call(op, t.elapsed(), r.is_ok());
        r
    }
}

#[async_trait]
impl Broker for Metered {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    async fn enqueue(&self, message: Message) -> Result<MessageId, BrokerError> {
        self.timed("enqueue", self.inner.enqueue(message)).await
    }
    async fn enqueue_many(&self, messages: Vec<Message>) -> Result<Vec<MessageId>, BrokerError> {
        self.timed("enqueue_many", self.inner.enqueue_many(messages))
            .await
    }
    async fn dequeue(&self) -> Result<Vec<Delivery>, BrokerError> {
        self.timed("dequeue", self.inner.dequeue()).await
    }
    async fn acknowledge(&self, ack: &AckId) -> Result<(), BrokerError> {
        self.timed("acknowledge", self.inner.acknowledge(ack)).await
    }
    async fn acknowledge_many(&self, acks: &[AckId]) -> Result<(), BrokerError> {
        self.timed("acknowledge_many", self.inner.acknowledge_many(acks))
            .await
    }
    async fn fail(&self, ack: &AckId) -> Result<(), BrokerError> {
        self.timed("fail", self.inner.fail(ack)).await
    }
    async fn fail_after(&self, ack: &AckId, delay: Duration) -> Result<(), BrokerError> {
        self.timed("fail_after", self.inner.fail_after(ack, delay))
            .await
    }
    async fn delete(&self, ack: &AckId) -> Result<(), BrokerError> {
        self.timed("delete", self.inner.delete(ack)).await
    }
    async fn extend(&self, ack: &AckId, by: Duration) -> Result<bool, BrokerError> {
        self.timed("extend", self.inner.extend(ack, by)).await
    }
    async fn dead_letter(&self, ack: &AckId, reason: &str) -> Result<(), BrokerError> {
        self.timed("dead_letter", self.inner.dead_letter(ack, reason))
            .await
    }
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, BrokerError> {
        self.timed("dead_letters", self.inner.dead_letters(limit))
            .await
    }
    async fn requeue_dead(&self, id: &MessageId) -> Result<bool, BrokerError> {
        self.timed("requeue_dead", self.inner.requeue_dead(id))
            .await
    }
    async fn delete_dead(&self, id: &MessageId) -> Result<bool, BrokerError> {
        self.timed("delete_dead", self.inner.delete_dead(id)).await
    }
    async fn dead_letter_size(&self) -> Result<Option<u64>, BrokerError> {
        self.timed("dead_letter_size", self.inner.dead_letter_size())
            .await
    }
    async fn purge_queue(&self) -> Result<u64, BrokerError> {
        self.timed("purge_queue", self.inner.purge_queue()).await
    }
    async fn delete_queue(&self) -> Result<(), BrokerError> {
        self.timed("delete_queue", self.inner.delete_queue()).await
    }
    async fn queue_size(&self) -> Result<u64, BrokerError> {
        self.timed("queue_size", self.inner.queue_size()).await
    }
    async fn lock_size(&self) -> Result<Option<u64>, BrokerError> {
        self.timed("lock_size", self.inner.lock_size()).await
    }
    async fn ping(&self) -> Result<(), BrokerError> {
        self.timed("ping", self.inner.ping()).await
    }
    async fn info(&self) -> Result<BrokerInfo, BrokerError> {
        self.timed("info", self.inner.info()).await
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn set_stat(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), BrokerError> {
        self.timed("set_stat", self.inner.set_stat(key, value, ttl))
            .await
    }
    async fn get_stats(&self, prefix: &str) -> Result<Vec<Stat>, BrokerError> {
        self.timed("get_stats", self.inner.get_stats(prefix)).await
    }
}

/// Reads the gauges from the broker (each call bounded by `within`; a figure that cannot be
/// read is left out) and the cluster's workers.
pub(crate) async fn read_gauges(
    broker: &dyn Broker,
    running: &std::sync::atomic::AtomicUsize,
    workers: usize,
    within: Duration,
) -> Gauges {
    use crate::health::bounded;
    let waiting = bounded("queue_size", within, broker.queue_size())
        .await
        .ok();
    let in_flight = bounded("lock_size", within, broker.lock_size())
        .await
        .ok()
        .flatten();
    let dead_letters = bounded("dead_letter_size", within, broker.dead_letter_size())
        .await
        .ok()
        .flatten();
    Gauges {
        waiting,
        in_flight,
        dead_letters,
        workers_busy: running.load(Ordering::Relaxed) as u64,
        workers: workers as u64,
    }
}
