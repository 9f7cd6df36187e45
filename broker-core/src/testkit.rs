//! The conformance kit: one call proves an adapter against the semantics of [`Broker`].
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use broker_core::{testkit::Kit, Broker, QueueSettings};
//! # async fn make(s: QueueSettings) -> Result<Arc<dyn Broker>, broker_core::BrokerError> { todo!() }
//! # async fn t() {
//! Kit::new(|settings| Box::pin(make(settings)))
//!     .run()
//!     .await; // panics with the list of failed checks
//! # }
//! ```
//!
//! The factory gets [`QueueSettings`] with a queue name no other check uses and must return a
//! broker for exactly that queue (several calls with the same name must share the queue: the
//! concurrency check opens four consumers: 1,000 packages, none may be missing, and none may be
//! delivered twice unless the broker does not declare [`Capabilities::atomic`], in which case up
//! to 1% may be, said aloud). Checks that need an optional capability are skipped,
//! loudly, when [`Broker::capabilities`] does not declare it.
//!
//! # Where receipts are settled
//!
//! By default a receipt may be settled (`acknowledge`, `fail`, `extend`, `dead_letter`,
//! `delete`) on **any** handle of the queue, not only the one that dequeued it: the SQL, Redis
//! and memory adapters keep the lease on the server, so the receipt alone names it (see the
//! [`Broker`] trait docs); `settle_on_another_handle` checks this. An adapter whose server binds
//! a reservation to the connection that took it (AMQP channels, beanstalkd connections) says so
//! in its docs and `info`, settles on the dequeuing handle only, and tells the kit with
//! [`Kit::bound_reservations`]: then `settle_on_another_handle` is skipped and
//! `connection_loss` expects the package whose connection broke to come back. Every other check
//! settles each receipt on the handle that dequeued it, so both kinds run them unchanged.
//!
//! # What the checks demand
//!
//! Every name in [`CHECKS`] is one check; [`Kit::run`] prints `ok`, `skipped: <why>` or
//! `FAILED` for each. Beside the basics (round trip, order, bulk, receipts, sizes, info, ping,
//! priority, delay, dead letters, stats, four concurrent consumers):
//!
//! - **Sizes follow the declared capabilities.** `round_trip` sends `min(70_000, cap)` bytes and
//!   exactly `cap` bytes, where `cap` is [`Capabilities::max_message_size`] of a broker opened
//!   with default settings (the package at the cap is left out above 64 MiB).
//!   `oversize_is_refused` asks for `min(100_000, cap)` through
//!   [`QueueSettings::max_message_size`]: a package of exactly that size is stored and comes back,
//!   one byte more is refused with [`BrokerError::TooLarge`] (right size and limit) before
//!   anything is stored, in `enqueue` and `enqueue_many`; then `cap + 1` bytes on a default
//!   broker are refused too. A broker whose server caps packages at 64 KiB passes honestly.
//! - **`settle_on_another_handle`** (needs receipts; skipped with [`Kit::bound_reservations`]):
//!   packages dequeued on handle A and acknowledged or failed on handle B (another factory
//!   call on the same queue) are gone for good, or back at once.
//! - **`concurrent_dequeue_one_handle`**: two `dequeue` futures of **one** handle (tasks sharing
//!   an `Arc<dyn Broker>`) wait on an empty queue with `wait` = 5 s; meanwhile `acknowledge` and
//!   `fail` of two earlier deliveries on the same handle each finish within 2 s and take effect
//!   (the acknowledged package never comes back; the failed one, where receipts hold, goes to
//!   one of the waiting dequeues well before its lease would have run out). Then packages are
//!   enqueued and each is delivered to exactly one of the two. A cluster does exactly this: two
//!   pushers and a monitor on one handle.
//! - **`dropped_dequeue_loses_nothing`** (needs receipts): many times, a `dequeue` races a
//!   concurrent `enqueue` and is dropped at varying points (timeouts of a few milliseconds,
//!   after a few polls). Every package enqueued must still be delivered: at once, or after its
//!   lease when a dropped future had claimed it; and none is delivered again once acknowledged.
//! - **`requeue_and_delete_dead`** (needs a dead-letter place): two packages are dead-lettered;
//!   [`Broker::requeue_dead`] of one answers `true`, and it is delivered again with the same
//!   bytes (as a first delivery, where the broker counts) and no longer listed;
//!   [`Broker::delete_dead`] of the other answers `true`, and it is gone from
//!   [`Broker::dead_letters`] and [`Broker::dead_letter_size`]; both operations on an unknown,
//!   already requeued or already deleted id answer `false`.
//! - **`extend_keeps_the_lease`**: where [`Capabilities::extend`] holds, a package whose lease
//!   handle A extends (`extend(ack, 2 × retry)`, twice) is not delivered to handle B after the
//!   original lease, nor after the first extension, would have run out; A's `acknowledge` then
//!   removes it for good and a later `extend` of that receipt is ignored. A stale `extend` (A's
//!   lease ran out and B holds the package) is ignored: B's lease stands, so a third dequeue
//!   gets nothing until it runs out, and then gets the package (B's lease was not extended
//!   either). Without the capability, `extend` must return [`BrokerError::Unsupported`] naming
//!   the adapter (not a placeholder); the check then says `skipped`.
//! - **`connection_loss`**, only with a [`Kit::disconnect`] hook that makes the server drop the
//!   broker's connections: enqueue, dequeue, drop the connections, then `acknowledge` on the
//!   dequeuing handle, retrying for a few seconds only errors that
//!   [`BrokerError::is_transient`] calls transient (as a cluster does). The package must be gone
//!   for good (not delivered again after its lease; with [`Kit::bound_reservations`] it comes
//!   back at once instead, since the server gave the reservation back), and `dequeue` must work
//!   again after the loss: the other waiting package comes, and a `dequeue` that was waiting
//!   when the connections dropped ends (empty, or with a transient error) instead of hanging.
//!
//! [`Capabilities::max_message_size`]: crate::Capabilities::max_message_size
//! [`Capabilities::extend`]: crate::Capabilities::extend
//! [`Capabilities::atomic`]: crate::Capabilities::atomic

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::{Broker, BrokerError, Delivery, Message, MessageId, QueueSettings};

/// What a factory returns.
pub type BrokerFuture = Pin<Box<dyn Future<Output = Result<Arc<dyn Broker>, BrokerError>> + Send>>;
type Factory = Arc<dyn Fn(QueueSettings) -> BrokerFuture + Send + Sync>;
type Unreachable = Arc<dyn Fn() -> BrokerFuture + Send + Sync>;
/// What a [`Kit::disconnect`] hook returns: `Ok` once the server has dropped the connections of
/// the kit's brokers, or why it could not.
pub type DisconnectFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
type Disconnect = Arc<dyn Fn() -> DisconnectFuture + Send + Sync>;
type CheckResult = Result<Outcome, String>;

/// How one check ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The check ran and held.
    Passed,
    /// The check does not apply to this broker; the reason is printed.
    Skipped(String),
}

/// The conformance kit for one adapter.
#[derive(Clone)]
pub struct Kit {
    make: Factory,
    unreachable: Option<Unreachable>,
    disconnect: Option<Disconnect>,
    bound_reservations: bool,
    secret: Option<String>,
    prefix: String,
    retry: Duration,
}

/// Largest package the kit sends: a declared `max_message_size` above this is not sent whole.
const LARGEST_SENT: usize = 64 * 1024 * 1024;
/// The `wait` of the kit's queues (longest `dequeue` on an empty queue), unless a check says.
const KIT_WAIT: Duration = Duration::from_millis(300);
/// How long a settle may take while dequeues of the same handle wait.
const SETTLE_PROMPTLY: Duration = Duration::from_secs(2);
/// How long the kit retries transient errors after a connection loss.
const RECONNECT_BUDGET: Duration = Duration::from_secs(10);

/// Every check the kit runs, by name, in order.
pub const CHECKS: &[&str] = &[
    "round_trip",
    "enqueue_many_in_order",
    "bulk_limit",
    "acknowledge_removes",
    "fail_keeps_package",
    "receipts_redeliver_after_retry",
    "stale_receipt_is_ignored",
    "settle_on_another_handle",
    "lock_size_counts_in_flight",
    "queue_size_counts_waiting",
    "purge_queue",
    "delete_queue",
    "queues_are_isolated",
    "hostile_queue_name",
    "oversize_is_refused",
    "info_fields",
    "ping",
    "ping_unreachable",
    "priority",
    "delay",
    "dead_letter",
    "requeue_and_delete_dead",
    "stats",
    "concurrent_dequeue_one_handle",
    "dropped_dequeue_loses_nothing",
    "extend_keeps_the_lease",
    "concurrent_consumers",
    "connection_loss",
];

impl Kit {
    /// A kit that makes brokers with `make`.
    pub fn new<F>(make: F) -> Self
    where
        F: Fn(QueueSettings) -> BrokerFuture + Send + Sync + 'static,
    {
        Self {
            make: Arc::new(make),
            unreachable: None,
            disconnect: None,
            bound_reservations: false,
            secret: None,
            prefix: format!("kit{}", &uuid::Uuid::now_v7().simple().to_string()[20..]),
            retry: Duration::from_secs(3),
        }
    }

    /// A factory for a broker pointed at an address where nothing answers; `ping` (or building the
    /// broker) must fail within a few seconds, not hang.
    pub fn unreachable<F>(mut self, make: F) -> Self
    where
        F: Fn() -> BrokerFuture + Send + Sync + 'static,
    {
        self.unreachable = Some(Arc::new(make));
        self
    }

    /// A hook that makes the server drop every connection of the brokers this kit's factory made
    /// (`CLIENT KILL`, `pg_terminate_backend`, `KILL CONNECTION`, ...), and no one else's: other
    /// tests may share the server. Without it `connection_loss` is skipped, loudly.
    ///
    /// ```no_run
    /// # use broker_core::testkit::Kit;
    /// # fn k(kit: Kit) -> Kit {
    /// kit.disconnect(|| Box::pin(async {
    ///     // e.g. terminate the backends of the database made for this run
    ///     Ok(())
    /// }))
    /// # }
    /// ```
    pub fn disconnect<F>(mut self, hook: F) -> Self
    where
        F: Fn() -> DisconnectFuture + Send + Sync + 'static,
    {
        self.disconnect = Some(Arc::new(hook));
        self
    }

    /// Says that the adapter's server binds a reservation to the connection that took it
    /// (AMQP channels, beanstalkd connections; see the [`Broker`] docs): receipts are settled
    /// only on the dequeuing handle, `settle_on_another_handle` is skipped, and in
    /// `connection_loss` the package whose connection broke comes back (the server gave it
    /// back; the acknowledge of its old receipt is ignored) instead of being gone for good.
    pub fn bound_reservations(mut self) -> Self {
        self.bound_reservations = true;
        self
    }

    /// A secret (a password in the URL) that must never show in `info`, `Debug` or errors.
    pub fn secret(mut self, secret: impl Into<String>) -> Self {
        self.secret = Some(secret.into());
        self
    }

    /// The lease used by the receipt checks (default 3 s).
    pub fn retry(mut self, retry: Duration) -> Self {
        self.retry = retry;
        self
    }

    /// Runs every check; panics listing the ones that failed.
    pub async fn run(&self) {
        self.run_only(CHECKS).await
    }

    /// Runs the named checks; panics listing the ones that failed.
    pub async fn run_only(&self, names: &[&str]) {
        let mut failed = Vec::new();
        for name in names {
            let started = Instant::now();
            // The lease-bound checks wait several leases.
            let limit = match *name {
                "concurrent_consumers" => Duration::from_secs(300),
                _ => Duration::from_secs(60) + self.retry * 8,
            };
            let result = tokio::time::timeout(limit, self.check(name))
                .await
                .unwrap_or_else(|_| Err(format!("did not finish within {limit:?}")));
            let ms = started.elapsed().as_millis();
            match result {
                Ok(Outcome::Passed) => eprintln!("conformance {name}: ok ({ms} ms)"),
                Ok(Outcome::Skipped(why)) => eprintln!("conformance {name}: skipped: {why}"),
                Err(e) => {
                    eprintln!("conformance {name}: FAILED ({ms} ms): {e}");
                    failed.push(format!("{name}: {e}"));
                }
            }
        }
        assert!(
            failed.is_empty(),
            "{} conformance check(s) failed:\n  {}",
            failed.len(),
            failed.join("\n  ")
        );
    }

    async fn check(&self, name: &str) -> CheckResult {
        match name {
            "round_trip" => self.round_trip().await,
            "enqueue_many_in_order" => self.enqueue_many_in_order().await,
            "bulk_limit" => self.bulk_limit().await,
            "acknowledge_removes" => self.acknowledge_removes().await,
            "fail_keeps_package" => self.fail_keeps_package().await,
            "receipts_redeliver_after_retry" => self.receipts_redeliver().await,
            "stale_receipt_is_ignored" => self.stale_receipt().await,
            "settle_on_another_handle" => self.settle_on_another_handle().await,
            "lock_size_counts_in_flight" => self.lock_size().await,
            "queue_size_counts_waiting" => self.queue_size().await,
            "purge_queue" => self.purge().await,
            "delete_queue" => self.delete_queue().await,
            "queues_are_isolated" => self.isolated().await,
            "hostile_queue_name" => self.hostile_name().await,
            "oversize_is_refused" => self.oversize().await,
            "info_fields" => self.info_fields().await,
            "ping" => self.ping().await,
            "ping_unreachable" => self.ping_unreachable().await,
            "priority" => self.priority().await,
            "delay" => self.delay().await,
            "dead_letter" => self.dead_letter().await,
            "requeue_and_delete_dead" => self.requeue_and_delete_dead().await,
            "stats" => self.stats().await,
            "concurrent_dequeue_one_handle" => self.concurrent_dequeue_one_handle().await,
            "dropped_dequeue_loses_nothing" => self.dropped_dequeue().await,
            "extend_keeps_the_lease" => self.extend_keeps_the_lease().await,
            "concurrent_consumers" => self.concurrent().await,
            "connection_loss" => self.connection_loss().await,
            other => Err(format!("no such check {other:?}")),
        }
    }

    fn settings(&self, check: &str) -> QueueSettings {
        QueueSettings {
            queue: format!("{}-{check}", self.prefix),
            bulk: 1,
            retry: self.retry,
            wait: KIT_WAIT,
            poll: Duration::from_millis(50),
            max_message_size: None,
        }
    }

    async fn open(&self, settings: QueueSettings) -> Result<Arc<dyn Broker>, String> {
        let b = (self.make)(settings.clone())
            .await
            .map_err(|e| format!("factory failed for queue {:?}: {e}", settings.queue))?;
        // Each check starts from an empty queue even if a former run left something behind.
        b.delete_queue().await.map_err(err("delete_queue"))?;
        Ok(b)
    }

    async fn open_bulk(&self, check: &str, bulk: usize) -> Result<Arc<dyn Broker>, String> {
        let probe = self.open(self.settings(check)).await?;
        let bulk = bulk.min(probe.capabilities().max_bulk);
        self.open(QueueSettings {
            bulk,
            ..self.settings(check)
        })
        .await
    }

    async fn round_trip(&self) -> CheckResult {
        let b = self.open(self.settings("round_trip")).await?;
        // Sizes follow what the broker declares: a server that caps packages at 64 KiB passes.
        let cap = b.capabilities().max_message_size;
        let all: Vec<u8> = (0..=255u8).collect();
        let mut payloads = vec![
            vec![0u8],
            all.clone(),
            all.iter()
                .rev()
                .cycle()
                .take(70_000.min(cap))
                .copied()
                .collect::<Vec<u8>>(),
            b"\x00\xff'\";--\\ DROP TABLE x".to_vec(),
        ];
        if cap <= LARGEST_SENT {
            payloads.push((0..cap).map(|i| (i % 251) as u8).collect());
        }
        payloads.retain(|p| p.len() <= cap);
        for p in &payloads {
            b.enqueue(Message::new(p.clone()))
                .await
                .map_err(err("enqueue"))?;
        }
        let got = drain(&*b, payloads.len(), Duration::from_secs(30)).await?;
        for (d, p) in got.iter().zip(&payloads) {
            if &d.payload != p {
                return Err(format!(
                    "payload of {} bytes (max_message_size = {cap}) came back as {} bytes, or \
                     changed, or out of order",
                    p.len(),
                    d.payload.len()
                ));
            }
            if let Some(n) = d.deliveries
                && n != 1
            {
                return Err(format!("first delivery counted as {n}"));
            }
        }
        ack_all(&*b, &got).await?;
        expect_empty(&*b).await
    }

    async fn enqueue_many_in_order(&self) -> CheckResult {
        let b = self.open_bulk("many", 10).await?;
        let msgs: Vec<Message> = (0..25).map(|i| Message::new(payload(i))).collect();
        let ids = b.enqueue_many(msgs).await.map_err(err("enqueue_many"))?;
        if ids.len() != 25 {
            return Err(format!("enqueue_many of 25 returned {} ids", ids.len()));
        }
        let unique: std::collections::HashSet<_> = ids.iter().collect();
        if unique.len() != 25 {
            return Err("enqueue_many returned duplicate ids".into());
        }
        let got = drain(&*b, 25, Duration::from_secs(10)).await?;
        let order: Vec<Vec<u8>> = got.iter().map(|d| d.payload.clone()).collect();
        let want: Vec<Vec<u8>> = (0..25).map(payload).collect();
        if order != want {
            return Err("packages of one enqueue_many did not come back in order".into());
        }
        let delivered: Vec<_> = got.iter().map(|d| d.message_id.clone()).collect();
        if delivered != ids {
            return Err(
                "ids returned by enqueue_many differ from the delivered message ids".into(),
            );
        }
        ack_all(&*b, &got).await?;
        expect_empty(&*b).await
    }

    async fn bulk_limit(&self) -> CheckResult {
        let probe = self.open(self.settings("bulk")).await?;
        let max = probe.capabilities().max_bulk;
        let over = QueueSettings {
            bulk: max.saturating_add(1),
            ..self.settings("bulk")
        };
        if max < usize::MAX && (self.make)(over).await.is_ok() {
            return Err(format!("bulk = max_bulk + 1 = {} was accepted", max + 1));
        }
        let bulk = max.min(10);
        let b = self
            .open(QueueSettings {
                bulk,
                ..self.settings("bulk")
            })
            .await?;
        let n = bulk * 2 + 3;
        let msgs = (0..n).map(|i| Message::new(payload(i))).collect();
        b.enqueue_many(msgs).await.map_err(err("enqueue_many"))?;
        let mut seen = 0;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut full_batch = false;
        while seen < n && Instant::now() < deadline {
            let batch = b.dequeue().await.map_err(err("dequeue"))?;
            if batch.len() > bulk {
                return Err(format!("dequeue returned {} with bulk {bulk}", batch.len()));
            }
            full_batch |= batch.len() == bulk;
            seen += batch.len();
            ack_all(&*b, &batch).await?;
        }
        if seen != n {
            return Err(format!("{seen} of {n} packages delivered"));
        }
        if !full_batch {
            return Err(format!("never returned a full batch of {bulk}"));
        }
        expect_empty(&*b).await
    }

    async fn acknowledge_removes(&self) -> CheckResult {
        let b = self.open(self.settings("ack")).await?;
        for i in 0..2 {
            b.enqueue(Message::new(payload(i)))
                .await
                .map_err(err("enqueue"))?;
        }
        let got = drain(&*b, 2, Duration::from_secs(10)).await?;
        b.acknowledge(&got[0].ack)
            .await
            .map_err(err("acknowledge"))?;
        // `delete` removes a delivered package for good too.
        b.delete(&got[1].ack).await.map_err(err("delete"))?;
        // Past the lease, neither may come back.
        tokio::time::sleep(self.retry + Duration::from_millis(300)).await;
        let again = b.dequeue().await.map_err(err("dequeue"))?;
        if !again.is_empty() {
            return Err("an acknowledged or deleted package was delivered again".into());
        }
        // Acknowledging twice is harmless.
        b.acknowledge(&got[0].ack)
            .await
            .map_err(err("second acknowledge"))?;
        expect_empty(&*b).await
    }

    async fn fail_keeps_package(&self) -> CheckResult {
        let b = self.open(self.settings("fail")).await?;
        if !b.capabilities().receipts {
            return Ok(Outcome::Skipped(
                "broker declares no receipts: a dequeued package is gone, fail cannot keep it"
                    .into(),
            ));
        }
        for i in 0..3 {
            b.enqueue(Message::new(payload(i)))
                .await
                .map_err(err("enqueue"))?;
        }
        let got = drain(&*b, 3, Duration::from_secs(10)).await?;
        let before = total(&*b, 3).await?;
        b.fail(&got[0].ack).await.map_err(err("fail"))?;
        let after = total(&*b, 2).await?;
        if after != before || before != 3 {
            return Err(format!(
                "waiting + in flight + dead letters went from {before} to {after} (3 enqueued)"
            ));
        }
        ack_all(&*b, &got[1..]).await?;
        let caps = b.capabilities();
        // Back well before the lease would have run out: a `fail` that did nothing would only
        // bring it back after `retry`.
        let back = drain(&*b, 1, self.retry / 2).await;
        match back {
            Ok(back) => {
                if back[0].payload != got[0].payload {
                    return Err("a different package came back after fail".into());
                }
                if let Some(n) = back[0].deliveries
                    && n != 2
                {
                    return Err(format!(
                        "failed package came back with delivery count {n}, not 2"
                    ));
                }
                ack_all(&*b, &back).await?;
            }
            Err(e) if caps.dead_letter => {
                let dead = b.dead_letters(10).await.map_err(err("dead_letters"))?;
                if !dead.iter().any(|d| d.payload == got[0].payload) {
                    return Err(format!(
                        "failed package neither came back nor is a dead letter: {e}"
                    ));
                }
            }
            Err(e) => return Err(format!("failed package did not come back: {e}")),
        }
        expect_empty(&*b).await
    }

    async fn receipts_redeliver(&self) -> CheckResult {
        let b = self.open(self.settings("receipts")).await?;
        if !b.capabilities().receipts {
            return Ok(Outcome::Skipped("broker declares no receipts".into()));
        }
        b.enqueue(Message::new(payload(7)))
            .await
            .map_err(err("enqueue"))?;
        // Taken before the lease starts: time since t0 is never shorter than time since the lease.
        let t0 = Instant::now();
        let first = drain(&*b, 1, Duration::from_secs(10)).await?;
        tokio::time::sleep(self.retry / 2).await;
        let early = b.dequeue().await.map_err(err("dequeue"))?;
        if !early.is_empty() && t0.elapsed() < self.retry {
            return Err(format!(
                "unacknowledged package came back after {:?}, before retry = {:?}",
                t0.elapsed(),
                self.retry
            ));
        }
        let again = drain(&*b, 1, self.retry + Duration::from_secs(10)).await?;
        let after = t0.elapsed();
        if after + Duration::from_millis(100) < self.retry {
            return Err(format!(
                "came back after {after:?}, before retry = {:?}",
                self.retry
            ));
        }
        if again[0].payload != first[0].payload {
            return Err("a different package came back".into());
        }
        if let Some(n) = again[0].deliveries
            && n != 2
        {
            return Err(format!("redelivery counted as {n}, not 2"));
        }
        ack_all(&*b, &again).await?;
        expect_empty(&*b).await
    }

    async fn stale_receipt(&self) -> CheckResult {
        let b = self.open(self.settings("stale")).await?;
        if !b.capabilities().receipts {
            return Ok(Outcome::Skipped("broker declares no receipts".into()));
        }
        b.enqueue(Message::new(payload(8)))
            .await
            .map_err(err("enqueue"))?;
        let first = drain(&*b, 1, Duration::from_secs(10)).await?;
        let second = drain(&*b, 1, self.retry + Duration::from_secs(10)).await?;
        // The first holder's late answers must not undo the second holder's lease.
        b.fail(&first[0].ack)
            .await
            .map_err(err("fail with a stale receipt"))?;
        b.acknowledge(&first[0].ack)
            .await
            .map_err(err("acknowledge with a stale receipt"))?;
        if b.capabilities().dead_letter {
            b.dead_letter(&first[0].ack, "stale")
                .await
                .map_err(err("dead_letter with a stale receipt"))?;
            let dead = b
                .dead_letter_size()
                .await
                .map_err(err("dead_letter_size"))?;
            if dead != Some(0) {
                return Err(format!(
                    "dead_letter with a stale receipt moved the package ({dead:?} dead letters)"
                ));
            }
        }
        let in_flight = b.lock_size().await.map_err(err("lock_size"))?;
        let waiting = b.queue_size().await.map_err(err("queue_size"))?;
        if waiting + in_flight.unwrap_or(1) != 1 {
            return Err(format!(
                "after stale fail + acknowledge: {waiting} waiting, {in_flight:?} in flight; want 0 and 1"
            ));
        }
        let early = b.dequeue().await.map_err(err("dequeue"))?;
        if !early.is_empty() {
            return Err("a stale fail made a leased package deliverable again".into());
        }
        ack_all(&*b, &second).await?;
        expect_empty(&*b).await
    }

    async fn settle_on_another_handle(&self) -> CheckResult {
        if self.bound_reservations {
            return Ok(Outcome::Skipped(
                "the server binds reservations to connections (Kit::bound_reservations): \
                 receipts are settled on the dequeuing handle only"
                    .into(),
            ));
        }
        let s = self.settings("other-handle");
        let a = self.open(s.clone()).await?;
        if !a.capabilities().receipts {
            return Ok(Outcome::Skipped("broker declares no receipts".into()));
        }
        let b = self.open_no_reset(s).await?;
        for i in 1..=2 {
            a.enqueue(Message::new(payload(i)))
                .await
                .map_err(err("enqueue"))?;
        }
        let t0 = Instant::now();
        let held = drain(&*a, 2, Duration::from_secs(10)).await?;
        // Settled on a handle that did not dequeue them: the receipt alone names the lease.
        b.acknowledge(&held[0].ack)
            .await
            .map_err(err("acknowledge on another handle"))?;
        b.fail(&held[1].ack)
            .await
            .map_err(err("fail on another handle"))?;
        let back = drain(&*a, 1, self.retry / 2)
            .await
            .map_err(|e| format!("{e}: a fail on another handle did not give the package back"))?;
        if back[0].payload != held[1].payload {
            return Err("a different package came back after a fail on another handle".into());
        }
        b.acknowledge(&back[0].ack)
            .await
            .map_err(err("acknowledge on another handle"))?;
        expect_empty(&*a).await?;
        if a.lock_size().await.map_err(err("lock_size"))?.is_none() {
            sleep_until(t0 + self.retry + Duration::from_millis(300)).await;
        }
        if !a.dequeue().await.map_err(err("dequeue"))?.is_empty() {
            return Err("a package acknowledged on another handle was delivered again".into());
        }
        Ok(Outcome::Passed)
    }

    async fn lock_size(&self) -> CheckResult {
        let b = self.open(self.settings("locks")).await?;
        for i in 0..5 {
            b.enqueue(Message::new(payload(i)))
                .await
                .map_err(err("enqueue"))?;
        }
        let got = drain(&*b, 3, Duration::from_secs(10)).await?;
        let locked = b.lock_size().await.map_err(err("lock_size"))?;
        let Some(locked) = locked else {
            return Ok(Outcome::Skipped(
                "lock_size is None (broker cannot tell)".into(),
            ));
        };
        let waiting = b.queue_size().await.map_err(err("queue_size"))?;
        if (locked, waiting) != (3, 2) {
            return Err(format!(
                "3 of 5 delivered: lock_size {locked}, queue_size {waiting}"
            ));
        }
        b.acknowledge(&got[0].ack)
            .await
            .map_err(err("acknowledge"))?;
        let locked = b.lock_size().await.map_err(err("lock_size"))?;
        if locked != Some(2) {
            return Err(format!(
                "after one acknowledge lock_size is {locked:?}, not 2"
            ));
        }
        ack_all(&*b, &got[1..]).await?;
        let rest = drain(&*b, 2, Duration::from_secs(10)).await?;
        ack_all(&*b, &rest).await?;
        expect_empty(&*b).await
    }

    async fn queue_size(&self) -> CheckResult {
        let b = self.open(self.settings("size")).await?;
        expect_size(&*b, 0).await?;
        let msgs = (0..7).map(|i| Message::new(payload(i))).collect();
        b.enqueue_many(msgs).await.map_err(err("enqueue_many"))?;
        expect_size(&*b, 7).await?;
        let got = drain(&*b, 2, Duration::from_secs(10)).await?;
        expect_size(&*b, 5).await?;
        ack_all(&*b, &got).await?;
        expect_size(&*b, 5).await?;
        Ok(Outcome::Passed)
    }

    async fn purge(&self) -> CheckResult {
        let b = self.open(self.settings("purge")).await?;
        let other = self.open(self.settings("purge-other")).await?;
        let msgs = (0..11).map(|i| Message::new(payload(i))).collect();
        b.enqueue_many(msgs).await.map_err(err("enqueue_many"))?;
        other
            .enqueue(Message::new(payload(99)))
            .await
            .map_err(err("enqueue"))?;
        // One package in flight: purge leaves it to its holder.
        let held = drain(&*b, 1, Duration::from_secs(10)).await?;
        let n = b.purge_queue().await.map_err(err("purge_queue"))?;
        if n != 10 {
            return Err(format!("purge_queue reported {n}, not the 10 waiting"));
        }
        expect_size(&*b, 0).await?;
        if let Some(l) = b.lock_size().await.map_err(err("lock_size"))?
            && l != 1
        {
            return Err(format!(
                "purge_queue touched packages in flight: lock_size {l}, not 1"
            ));
        }
        ack_all(&*b, &held).await?;
        if !b.dequeue().await.map_err(err("dequeue"))?.is_empty() {
            return Err("dequeue after purge returned a package".into());
        }
        expect_size(&*other, 1)
            .await
            .map_err(|e| format!("purge touched another queue: {e}"))?;
        other.delete_queue().await.map_err(err("delete_queue"))?;
        Ok(Outcome::Passed)
    }

    async fn delete_queue(&self) -> CheckResult {
        let b = self.open(self.settings("delete")).await?;
        for i in 0..4 {
            b.enqueue(Message::new(payload(i)))
                .await
                .map_err(err("enqueue"))?;
        }
        let _in_flight = drain(&*b, 1, Duration::from_secs(10)).await?;
        b.delete_queue().await.map_err(err("delete_queue"))?;
        // A fresh handle on the same name sees an empty queue.
        let fresh = self.open_no_reset(self.settings("delete")).await?;
        expect_size(&*fresh, 0).await?;
        if let Some(n) = fresh.lock_size().await.map_err(err("lock_size"))?
            && n != 0
        {
            return Err(format!("lock_size {n} after delete_queue"));
        }
        Ok(Outcome::Passed)
    }

    async fn open_no_reset(&self, settings: QueueSettings) -> Result<Arc<dyn Broker>, String> {
        (self.make)(settings).await.map_err(err("factory"))
    }

    async fn isolated(&self) -> CheckResult {
        let a = self.open(self.settings("iso-a")).await?;
        let b = self.open(self.settings("iso-b")).await?;
        a.enqueue(Message::new(payload(1)))
            .await
            .map_err(err("enqueue"))?;
        if !b.dequeue().await.map_err(err("dequeue"))?.is_empty() {
            return Err("a package enqueued on one queue was delivered from another".into());
        }
        expect_size(&*b, 0).await?;
        // On an empty queue dequeue waits at most about `wait` (300 ms here), then returns empty.
        let t0 = Instant::now();
        let none = b.dequeue().await.map_err(err("dequeue"))?;
        if !none.is_empty() || t0.elapsed() > Duration::from_secs(3) {
            return Err(format!(
                "empty dequeue returned {} packages after {:?} (wait = 300 ms)",
                none.len(),
                t0.elapsed()
            ));
        }
        let got = drain(&*a, 1, Duration::from_secs(10)).await?;
        ack_all(&*a, &got).await?;
        Ok(Outcome::Passed)
    }

    async fn hostile_name(&self) -> CheckResult {
        let mut s = self.settings("x");
        s.queue = format!("{}-x'; DROP TABLE qcluster_queue; --\"`\\", self.prefix);
        let b = self.open(s).await?;
        b.enqueue(Message::new(payload(5)))
            .await
            .map_err(err("enqueue"))?;
        expect_size(&*b, 1).await?;
        let got = drain(&*b, 1, Duration::from_secs(10)).await?;
        ack_all(&*b, &got).await?;
        // Other queues still work: nothing was dropped.
        let other = self.open(self.settings("x-after")).await?;
        other
            .enqueue(Message::new(payload(6)))
            .await
            .map_err(err("enqueue after hostile name"))?;
        expect_size(&*other, 1).await?;
        other.delete_queue().await.map_err(err("delete_queue"))?;
        expect_empty(&*b).await
    }

    async fn oversize(&self) -> CheckResult {
        // The broker's own limit, as a broker opened with default settings declares it.
        let own = self.open(self.settings("oversize-own")).await?;
        let cap = own.capabilities().max_message_size;
        let limit = cap.min(100_000);
        let b = self
            .open(QueueSettings {
                max_message_size: Some(limit),
                ..self.settings("oversize")
            })
            .await?;
        let declared = b.capabilities().max_message_size;
        if declared != limit {
            return Err(format!(
                "asked for max_message_size = {limit}, the broker declares {declared}"
            ));
        }
        let exact: Vec<u8> = (0..limit).map(|i| (i % 251) as u8).collect();
        b.enqueue(Message::new(exact.clone()))
            .await
            .map_err(err("enqueue at the limit"))?;
        let mut over = exact.clone();
        over.push(1);
        match b.enqueue(Message::new(over.clone())).await {
            Err(BrokerError::TooLarge { size, limit: l, .. })
                if size == limit + 1 && l == limit => {}
            Err(e) => {
                return Err(format!(
                    "oversize gave {e:?}, not TooLarge {{ size: {}, limit: {limit} }}",
                    limit + 1
                ));
            }
            Ok(_) => return Err("a package over max_message_size was accepted".into()),
        }
        // Refused before anything was stored: only the package at the limit waits.
        expect_size(&*b, 1)
            .await
            .map_err(|e| format!("after refusing a package of {} bytes: {e}", limit + 1))?;
        match b
            .enqueue_many(vec![Message::new(payload(1)), Message::new(over)])
            .await
        {
            Err(BrokerError::TooLarge { .. }) => {}
            other => return Err(format!("oversize in enqueue_many gave {other:?}")),
        }
        let got = drain(&*b, 1, Duration::from_secs(10)).await?;
        if got[0].payload != exact {
            return Err(format!(
                "package at the limit came back as {} bytes",
                got[0].payload.len()
            ));
        }
        ack_all(&*b, &got).await?;
        // What enqueue_many may have stored before refusing is the adapter's documented business;
        // the refused package itself must not be there.
        while let Some(d) = b.dequeue().await.map_err(err("dequeue"))?.pop() {
            if d.payload.len() > limit {
                return Err("the refused package was stored".into());
            }
            b.acknowledge(&d.ack).await.map_err(err("acknowledge"))?;
        }
        // The adapter's own limit holds too.
        if cap < LARGEST_SENT {
            match own.enqueue(Message::new(vec![0u8; cap + 1])).await {
                Err(BrokerError::TooLarge { .. }) => {}
                other => {
                    return Err(format!(
                        "package of max_message_size + 1 = {} bytes gave {other:?}",
                        cap + 1
                    ));
                }
            }
            expect_size(&*own, 0)
                .await
                .map_err(|e| format!("after refusing max_message_size + 1 bytes: {e}"))?;
        }
        Ok(Outcome::Passed)
    }

    async fn info_fields(&self) -> CheckResult {
        let s = self.settings("info");
        let b = self.open(s.clone()).await?;
        let info = b.info().await.map_err(err("info"))?;
        if info.broker.is_empty() || info.endpoint.is_empty() {
            return Err(format!("info has an empty broker or endpoint: {info:?}"));
        }
        if info.queue != s.queue {
            return Err(format!("info.queue is {:?}, not {:?}", info.queue, s.queue));
        }
        let caps = b.capabilities();
        if info.receipts != caps.receipts {
            return Err("info.receipts disagrees with capabilities".into());
        }
        if !caps.receipts && info.notes.is_empty() {
            return Err(
                "a broker without receipts must say in info.notes that dequeued packages are gone"
                    .into(),
            );
        }
        if let Some(secret) = &self.secret {
            let views = [
                format!("{info:?}"),
                format!("{b:?}"),
                info.endpoint.clone(),
                format!("{:?}", info.details),
            ];
            if views.iter().any(|v| v.contains(secret.as_str())) {
                return Err("the secret shows in info or Debug output".into());
            }
        }
        Ok(Outcome::Passed)
    }

    async fn ping(&self) -> CheckResult {
        let b = self.open(self.settings("ping")).await?;
        b.ping().await.map_err(err("ping"))?;
        Ok(Outcome::Passed)
    }

    async fn ping_unreachable(&self) -> CheckResult {
        let Some(make) = &self.unreachable else {
            return Ok(Outcome::Skipped("no unreachable factory given".into()));
        };
        let started = Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(15), async {
            match make().await {
                Err(e) => Err(e),
                Ok(b) => b.ping().await,
            }
        })
        .await;
        let took = started.elapsed();
        let e = match result {
            Err(_) => return Err("ping against an unreachable address hung for 15 s".into()),
            Ok(Ok(())) => return Err("ping against an unreachable address succeeded".into()),
            Ok(Err(e)) => e,
        };
        if took > Duration::from_secs(10) {
            return Err(format!("ping against an unreachable address took {took:?}"));
        }
        if let Some(secret) = &self.secret
            && (e.to_string().contains(secret.as_str())
                || format!("{e:?}").contains(secret.as_str()))
        {
            return Err(format!("the secret shows in the error: {e}"));
        }
        Ok(Outcome::Passed)
    }

    async fn priority(&self) -> CheckResult {
        let b = self.open_bulk("prio", 3).await?;
        if !b.capabilities().priority {
            return Ok(Outcome::Skipped("broker declares no priority".into()));
        }
        for (i, p) in [(0usize, 0i16), (1, 5), (2, 1)] {
            b.enqueue(Message::new(payload(i)).with_priority(p))
                .await
                .map_err(err("enqueue"))?;
        }
        let got = drain(&*b, 3, Duration::from_secs(10)).await?;
        let order: Vec<Vec<u8>> = got.iter().map(|d| d.payload.clone()).collect();
        if order != vec![payload(1), payload(2), payload(0)] {
            return Err("priorities 0, 5, 1 were not delivered as 5, 1, 0".into());
        }
        ack_all(&*b, &got).await?;
        expect_empty(&*b).await
    }

    async fn delay(&self) -> CheckResult {
        let b = self.open(self.settings("delay")).await?;
        if !b.capabilities().delay {
            return Ok(Outcome::Skipped("broker declares no delay".into()));
        }
        let wait = Duration::from_millis(1500);
        let t0 = Instant::now();
        b.enqueue(Message::new(payload(1)).with_delay(wait))
            .await
            .map_err(err("enqueue"))?;
        expect_size(&*b, 1).await?;
        if !b.dequeue().await.map_err(err("dequeue"))?.is_empty() && t0.elapsed() < wait {
            return Err("a delayed package was delivered early".into());
        }
        let got = drain(&*b, 1, Duration::from_secs(10)).await?;
        if t0.elapsed() + Duration::from_millis(100) < wait {
            return Err(format!(
                "delayed {wait:?}, delivered after {:?}",
                t0.elapsed()
            ));
        }
        if !b.capabilities().receipts {
            // Without receipts there is nothing for fail_after to hold back.
            ack_all(&*b, &got).await?;
            return expect_empty(&*b).await;
        }
        // fail_after holds the package back too.
        let t1 = Instant::now();
        b.fail_after(&got[0].ack, wait)
            .await
            .map_err(err("fail_after"))?;
        if !b.dequeue().await.map_err(err("dequeue"))?.is_empty() && t1.elapsed() < wait {
            return Err("fail_after's package came back early".into());
        }
        let again = drain(&*b, 1, Duration::from_secs(10)).await?;
        if t1.elapsed() + Duration::from_millis(100) < wait {
            return Err(format!(
                "fail_after({wait:?}) came back after {:?}",
                t1.elapsed()
            ));
        }
        ack_all(&*b, &again).await?;
        expect_empty(&*b).await
    }

    async fn dead_letter(&self) -> CheckResult {
        let b = self.open(self.settings("dead")).await?;
        if !b.capabilities().dead_letter {
            return Ok(Outcome::Skipped(
                "broker declares no dead-letter place".into(),
            ));
        }
        b.enqueue(Message::new(payload(1)))
            .await
            .map_err(err("enqueue"))?;
        b.enqueue(Message::new(payload(2)))
            .await
            .map_err(err("enqueue"))?;
        let got = drain(&*b, 2, Duration::from_secs(10)).await?;
        b.dead_letter(&got[0].ack, "bad signature")
            .await
            .map_err(err("dead_letter"))?;
        if total(&*b, 1).await? != 2 {
            return Err("waiting + in flight + dead letters is not 2 after dead_letter".into());
        }
        let dead = b.dead_letters(10).await.map_err(err("dead_letters"))?;
        if dead.len() != 1 || dead[0].payload != got[0].payload || dead[0].reason != "bad signature"
        {
            return Err(format!("dead_letters lists {dead:?}"));
        }
        ack_all(&*b, &got[1..]).await?;
        tokio::time::sleep(self.retry + Duration::from_millis(300)).await;
        if !b.dequeue().await.map_err(err("dequeue"))?.is_empty() {
            return Err("a dead letter was delivered again".into());
        }
        b.delete_queue().await.map_err(err("delete_queue"))?;
        if b.dead_letter_size()
            .await
            .map_err(err("dead_letter_size"))?
            != Some(0)
        {
            return Err("delete_queue left dead letters behind".into());
        }
        Ok(Outcome::Passed)
    }

    /// Two dead letters: one requeued (delivered again, same bytes, no longer listed), one
    /// deleted (gone from the list and the size); unknown and already-handled ids answer `false`.
    async fn requeue_and_delete_dead(&self) -> CheckResult {
        let b = self.open(self.settings("redead")).await?;
        if !b.capabilities().dead_letter {
            return Ok(Outcome::Skipped(
                "broker declares no dead-letter place".into(),
            ));
        }
        b.enqueue(Message::new(payload(1)))
            .await
            .map_err(err("enqueue"))?;
        b.enqueue(Message::new(payload(2)))
            .await
            .map_err(err("enqueue"))?;
        let got = drain(&*b, 2, Duration::from_secs(10)).await?;
        for d in &got {
            b.dead_letter(&d.ack, "given up")
                .await
                .map_err(err("dead_letter"))?;
        }
        let dead = b.dead_letters(10).await.map_err(err("dead_letters"))?;
        if dead.len() != 2 {
            return Err(format!(
                "dead_letters lists {} packages, expected 2",
                dead.len()
            ));
        }
        let find = |p: &[u8]| dead.iter().find(|d| d.payload == p).cloned();
        let (Some(back), Some(gone)) = (find(&got[0].payload), find(&got[1].payload)) else {
            return Err("dead_letters does not list both packages byte for byte".into());
        };

        if !b
            .requeue_dead(&back.message_id)
            .await
            .map_err(err("requeue_dead"))?
        {
            return Err(format!("requeue_dead({}) answered false", back.message_id));
        }
        let again = drain(&*b, 1, Duration::from_secs(10)).await?;
        if again[0].payload != back.payload {
            return Err("the requeued package came back with other bytes".into());
        }
        if let Some(n) = again[0].deliveries
            && n != 1
        {
            return Err(format!(
                "the requeued package counts {n} deliveries, expected a fresh first delivery"
            ));
        }
        ack_all(&*b, &again).await?;
        let dead = b.dead_letters(10).await.map_err(err("dead_letters"))?;
        if dead.len() != 1 || dead[0].message_id != gone.message_id {
            return Err(format!(
                "after requeue dead_letters lists {:?}, expected only {}",
                dead.iter().map(|d| &d.message_id).collect::<Vec<_>>(),
                gone.message_id
            ));
        }

        if !b
            .delete_dead(&gone.message_id)
            .await
            .map_err(err("delete_dead"))?
        {
            return Err(format!("delete_dead({}) answered false", gone.message_id));
        }
        let dead = b.dead_letters(10).await.map_err(err("dead_letters"))?;
        if !dead.is_empty() {
            return Err(format!("after delete dead_letters lists {dead:?}"));
        }
        let size = b
            .dead_letter_size()
            .await
            .map_err(err("dead_letter_size"))?;
        if size != Some(0) {
            return Err(format!(
                "after delete dead_letter_size is {size:?}, expected 0"
            ));
        }

        let unknown = MessageId(format!("{}-no-such-dead-letter", self.prefix));
        for (what, id) in [
            ("an already requeued", &back.message_id),
            ("an already deleted", &gone.message_id),
            ("an unknown", &unknown),
        ] {
            if b.requeue_dead(id).await.map_err(err("requeue_dead"))? {
                return Err(format!("requeue_dead of {what} id ({id}) answered true"));
            }
            if b.delete_dead(id).await.map_err(err("delete_dead"))? {
                return Err(format!("delete_dead of {what} id ({id}) answered true"));
            }
        }
        if !b.dequeue().await.map_err(err("dequeue"))?.is_empty() {
            return Err("a package came back after requeue/delete of handled ids".into());
        }
        expect_empty(&*b).await
    }

    async fn stats(&self) -> CheckResult {
        let b = self.open(self.settings("stats")).await?;
        if !b.capabilities().stats {
            return Ok(Outcome::Skipped("broker declares no stats store".into()));
        }
        // `_` and `%` in the prefix are plain characters, not wildcards.
        let p = format!("{}:st_t%:", self.prefix);
        // Written in this order: `a` is overwritten; the last two must not match the prefix.
        let writes: [(String, &[u8], u64); 5] = [
            (format!("{p}a"), b"one", 60),
            (format!("{p}a"), b"uno", 60),
            (format!("{p}b"), b"two", 4),
            (format!("{}:other", self.prefix), b"x", 60),
            (format!("{}:stXtY:a", self.prefix), b"wildcard", 60),
        ];
        for (key, value, ttl) in &writes {
            b.set_stat(key, value, Duration::from_secs(*ttl))
                .await
                .map_err(err("set_stat"))?;
        }
        let mut got = b.get_stats(&p).await.map_err(err("get_stats"))?;
        got.sort_by(|x, y| x.key.cmp(&y.key));
        let pairs: Vec<(String, Vec<u8>)> = got.into_iter().map(|s| (s.key, s.value)).collect();
        let want = vec![
            (format!("{p}a"), b"uno".to_vec()),
            (format!("{p}b"), b"two".to_vec()),
        ];
        if pairs != want {
            return Err(format!("get_stats gave {pairs:?}"));
        }
        tokio::time::sleep(Duration::from_millis(4300)).await;
        let got = b.get_stats(&p).await.map_err(err("get_stats"))?;
        if got.len() != 1 || got[0].key != format!("{p}a") {
            return Err(format!("after the ttl get_stats gave {got:?}"));
        }
        Ok(Outcome::Passed)
    }

    async fn concurrent_dequeue_one_handle(&self) -> CheckResult {
        let wait = Duration::from_secs(5);
        let s = QueueSettings {
            wait,
            ..self.settings("one-handle")
        };
        let b = self.open(s.clone()).await?;
        let receipts = b.capabilities().receipts;
        for i in 1..=2 {
            b.enqueue(Message::new(payload(i)))
                .await
                .map_err(err("enqueue"))?;
        }
        // Taken before the leases start.
        let t0 = Instant::now();
        let held = drain(&*b, 2, Duration::from_secs(10)).await?;
        // Two dequeues of the same handle wait on the now empty queue.
        let mut tasks = Vec::new();
        for c in 0..2 {
            let b = b.clone();
            tasks.push(tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(20);
                let mut empty = 0u32;
                loop {
                    let got = b.dequeue().await.map_err(|e| format!("dequeue {c}: {e}"))?;
                    if !got.is_empty() || Instant::now() > deadline {
                        return Ok::<_, String>((got, Instant::now(), empty));
                    }
                    empty += 1;
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        if let Some(c) = tasks.iter().position(|t| t.is_finished()) {
            let got = (&mut tasks[c]).await;
            return Err(format!(
                "dequeue {c} on an empty queue returned before anything was enqueued: {got:?}"
            ));
        }
        // The settles of this handle must not wait behind its dequeues.
        let (acked, ack_took) = timed(b.acknowledge(&held[0].ack)).await;
        acked.map_err(err("acknowledge while two dequeues of the handle wait"))?;
        let (failed, fail_took) = timed(b.fail(&held[1].ack)).await;
        let failed_at = Instant::now();
        failed.map_err(err("fail while two dequeues of the handle wait"))?;
        if ack_took > SETTLE_PROMPTLY || fail_took > SETTLE_PROMPTLY {
            return Err(format!(
                "while two dequeues of the same handle waited (wait = {wait:?}), acknowledge \
                 took {ack_took:?} and fail {fail_took:?}; each must finish within \
                 {SETTLE_PROMPTLY:?}"
            ));
        }
        // Where receipts hold, the failed package goes to one of the waiting dequeues.
        let mut want = Vec::new();
        if receipts {
            want.push(held[1].payload.clone());
        }
        let fresh = if receipts { 3..4 } else { 3..5 };
        for i in fresh {
            b.enqueue(Message::new(payload(i)))
                .await
                .map_err(err("enqueue"))?;
            want.push(payload(i));
        }
        let mut got: Vec<(usize, Delivery, Instant)> = Vec::new();
        for (c, t) in tasks.into_iter().enumerate() {
            let (batch, at, _) = tokio::time::timeout(wait + Duration::from_secs(20), t)
                .await
                .map_err(|_| format!("dequeue {c} did not return"))?
                .map_err(|e| format!("dequeue {c} panicked: {e}"))??;
            got.extend(batch.into_iter().map(|d| (c, d, at)));
        }
        let mut delivered: Vec<Vec<u8>> = got.iter().map(|(_, d, _)| d.payload.clone()).collect();
        delivered.sort();
        want.sort();
        if delivered != want {
            let who: Vec<(usize, String)> = got
                .iter()
                .map(|(c, d, _)| (*c, String::from_utf8_lossy(&d.payload).into_owned()))
                .collect();
            return Err(format!(
                "two dequeues of one handle got {who:?}; want each of {} packages exactly once",
                want.len()
            ));
        }
        if receipts {
            let (_, _, at) = got
                .iter()
                .find(|(_, d, _)| d.payload == held[1].payload)
                .ok_or("the failed package did not come back")?;
            if at.saturating_duration_since(failed_at) > self.retry / 2 {
                return Err(format!(
                    "the failed package came back {:?} after fail (retry = {:?}): fail did not \
                     take effect while the handle's dequeues waited",
                    at.saturating_duration_since(failed_at),
                    self.retry
                ));
            }
        }
        for (_, d, _) in &got {
            b.acknowledge(&d.ack).await.map_err(err("acknowledge"))?;
        }
        // The acknowledged package never comes back: look past its lease on a handle that waits
        // little.
        let probe = self.open_no_reset(self.settings("one-handle")).await?;
        if receipts {
            sleep_until(t0 + self.retry + Duration::from_millis(300)).await;
        }
        let again = probe.dequeue().await.map_err(err("dequeue"))?;
        if !again.is_empty() {
            return Err(format!(
                "{:?} was delivered again after acknowledge/fail while dequeues waited",
                String::from_utf8_lossy(&again[0].payload)
            ));
        }
        expect_empty(&*probe).await
    }

    async fn dropped_dequeue(&self) -> CheckResult {
        const ROUNDS: usize = 60;
        let s = QueueSettings {
            wait: Duration::from_millis(200),
            ..self.settings("dropped")
        };
        let b = self.open(s).await?;
        if !b.capabilities().receipts {
            return Ok(Outcome::Skipped(
                "broker declares no receipts: a dequeue pops and forgets, so a dequeue future \
                 dropped after its pop loses those packages by design"
                    .into(),
            ));
        }
        let mut seen: HashMap<Vec<u8>, usize> = HashMap::new();
        let mut dropped = 0usize;
        let mut last_drop: Option<Instant> = None;
        // Packages that came with a raised delivery count: a dropped future had claimed them.
        let mut reclaimed = 0usize;
        let mut settle = async |batch: Vec<Delivery>, seen: &mut HashMap<Vec<u8>, usize>| {
            for d in batch {
                b.acknowledge(&d.ack).await.map_err(err("acknowledge"))?;
                reclaimed += usize::from(d.deliveries.is_some_and(|n| n > 1));
                *seen.entry(d.payload).or_default() += 1;
            }
            Ok::<_, String>(())
        };
        for i in 0..ROUNDS {
            let p = payload(1000 + i);
            // Varying points: the enqueue comes first, with the dequeue, or a little after it;
            // the dequeue is dropped after tens of microseconds (about a claim's round trip) to a
            // few milliseconds, or after its first few polls.
            let lead = Duration::from_micros(((i * 389) % 3000) as u64);
            let cut = Duration::from_micros(if i % 2 == 0 {
                ((i * 53) % 700) as u64
            } else {
                ((i * 1733) % 9000) as u64
            });
            let enq = if i % 4 == 0 {
                b.enqueue(Message::new(p)).await.map_err(err("enqueue"))?;
                None
            } else {
                let producer = b.clone();
                Some(tokio::spawn(async move {
                    if i % 4 == 2 {
                        tokio::time::sleep(lead).await;
                    }
                    producer.enqueue(Message::new(p)).await
                }))
            };
            let outcome = if i % 4 == 3 {
                poll_at_most(b.dequeue(), 1 + i % 5, cut + Duration::from_millis(5)).await
            } else {
                tokio::time::timeout(cut, b.dequeue()).await.ok()
            };
            match outcome {
                Some(batch) => settle(batch.map_err(err("dequeue"))?, &mut seen).await?,
                None => {
                    dropped += 1;
                    last_drop = Some(Instant::now());
                }
            }
            if let Some(enq) = enq {
                enq.await
                    .map_err(|e| format!("enqueue task panicked: {e}"))?
                    .map_err(err("enqueue"))?;
            }
        }
        // Drain: packages a dropped future claimed come back after their lease; keep looking
        // until then, so a package delivered twice shows.
        let all = |seen: &HashMap<Vec<u8>, usize>| {
            (0..ROUNDS).all(|i| seen.contains_key(&payload(1000 + i)))
        };
        let in_rounds = seen.len();
        let quiet_from = last_drop.map(|t| t + self.retry + Duration::from_millis(500));
        let hard = Instant::now() + self.retry + Duration::from_secs(10);
        while Instant::now() < hard
            && !(all(&seen) && quiet_from.is_none_or(|t| Instant::now() >= t))
        {
            let batch = b.dequeue().await.map_err(err("dequeue"))?;
            settle(batch, &mut seen).await?;
        }
        let missing = (0..ROUNDS)
            .filter(|i| !seen.contains_key(&payload(1000 + i)))
            .count();
        let twice = seen.values().filter(|&&n| n > 1).count();
        if missing > 0 || twice > 0 {
            return Err(format!(
                "{ROUNDS} packages, {dropped} dequeue futures dropped: {missing} never delivered \
                 (looked until retry + 10 s), {twice} delivered again after being acknowledged"
            ));
        }
        eprintln!(
            "conformance dropped_dequeue_loses_nothing: {dropped} of {ROUNDS} dequeue futures \
             dropped; {in_rounds} packages delivered at once, {} afterwards ({reclaimed} of \
             them claimed by a dropped future first)",
            ROUNDS - in_rounds
        );
        expect_empty(&*b).await
    }

    async fn extend_keeps_the_lease(&self) -> CheckResult {
        let s = self.settings("extend");
        let a = self.open(s.clone()).await?;
        let r = self.retry;
        if !a.capabilities().extend {
            a.enqueue(Message::new(payload(1)))
                .await
                .map_err(err("enqueue"))?;
            let held = drain(&*a, 1, Duration::from_secs(10)).await?;
            let answer = a.extend(&held[0].ack, r * 2).await;
            ack_all(&*a, &held).await?;
            return match answer {
                Err(BrokerError::Unsupported { broker, operation })
                    if operation == "extend" && !broker.is_empty() && broker != "this broker" =>
                {
                    Ok(Outcome::Skipped(format!(
                        "broker declares no extend (and extend says: {})",
                        BrokerError::Unsupported { broker, operation }
                    )))
                }
                other => Err(format!(
                    "broker declares no extend, yet extend gave {other:?}, not \
                     Err(Unsupported {{ broker: <the adapter's name>, operation: \"extend\" }})"
                )),
            };
        }
        let b = self.open_no_reset(s.clone()).await?;
        a.enqueue(Message::new(payload(1)))
            .await
            .map_err(err("enqueue"))?;
        // Taken before the lease starts.
        let t0 = Instant::now();
        let held = drain(&*a, 1, Duration::from_secs(10)).await?;
        let ack = &held[0].ack;
        sleep_until(t0 + r / 2).await;
        if !a.extend(ack, r * 2).await.map_err(err("extend"))? {
            return Err("extend of a held lease answered false (lease not held)".into());
        }
        // Past the original lease (t0 + retry): B must see nothing.
        nothing_until(&*b, t0 + r * 3 / 2, "after the first extend").await?;
        if !a.extend(ack, r * 2).await.map_err(err("second extend"))? {
            return Err("second extend of a held lease answered false".into());
        }
        // Past the first extension too: the second one holds it.
        nothing_until(
            &*b,
            t0 + r * 5 / 2 + Duration::from_millis(600),
            "after the second extend",
        )
        .await?;
        a.acknowledge(ack).await.map_err(err("acknowledge"))?;
        // An extend of an acknowledged receipt is ignored (adapters that cannot tell answer true).
        a.extend(ack, r * 2)
            .await
            .map_err(err("extend after acknowledge"))?;
        expect_empty(&*a).await?;
        if a.lock_size().await.map_err(err("lock_size"))?.is_none() {
            nothing_until(
                &*b,
                t0 + r * 7 / 2 + Duration::from_millis(600),
                "after acknowledge",
            )
            .await?;
        }

        // A stale extend: A's lease ran out and B holds the package now.
        a.enqueue(Message::new(payload(2)))
            .await
            .map_err(err("enqueue"))?;
        let first = drain(&*a, 1, Duration::from_secs(10)).await?;
        let second = drain(&*b, 1, r + Duration::from_secs(10)).await?;
        let tb = Instant::now();
        if a.extend(&first[0].ack, r * 10)
            .await
            .map_err(err("extend with a stale receipt"))?
        {
            return Err(
                "extend with a stale receipt (the package was delivered again) answered true: \
                 the caller would go on running a task someone else holds"
                    .into(),
            );
        }
        // B's lease stands: nothing for a third dequeue until it runs out (the last look starts
        // early enough to end, after up to `wait`, before B's lease does)...
        nothing_until(
            &*a,
            tb + r.saturating_sub(KIT_WAIT + Duration::from_millis(400)),
            "while B holds the package after A's stale extend",
        )
        .await?;
        // ... and then the package comes back: the stale extend did not push B's lease back.
        let back = drain(
            &*a,
            1,
            (tb + r * 2).saturating_duration_since(Instant::now()),
        )
        .await
        .map_err(|e| {
            format!("{e}: a stale extend (by 10 × retry) pushed back the new holder's lease")
        })?;
        if back[0].payload != second[0].payload {
            return Err("a different package came back after B's lease".into());
        }
        if let Some(n) = back[0].deliveries
            && n != 3
        {
            return Err(format!("third delivery counted as {n}"));
        }
        ack_all(&*a, &back).await?;
        expect_empty(&*a).await
    }

    async fn connection_loss(&self) -> CheckResult {
        let Some(disconnect) = &self.disconnect else {
            return Ok(Outcome::Skipped(
                "no disconnect hook given (Kit::disconnect): connection loss not tested".into(),
            ));
        };
        let cut = async || {
            disconnect()
                .await
                .map_err(|e| format!("disconnect hook: {e}"))
        };
        // A longer wait, so that a dequeue is surely waiting when the connections drop.
        let wait = Duration::from_secs(2);
        let b = self
            .open(QueueSettings {
                wait,
                ..self.settings("connloss")
            })
            .await?;
        let mut retried = Vec::new();
        for i in 1..=2 {
            b.enqueue(Message::new(payload(i)))
                .await
                .map_err(err("enqueue"))?;
        }
        let t0 = Instant::now();
        let held = drain(&*b, 1, Duration::from_secs(10)).await?;
        cut().await?;
        // Settle on the dequeuing handle, retrying transient errors as a cluster would.
        let ack = &held[0].ack;
        let ((), n) = transient_retry("acknowledge after the connection was lost", || {
            b.acknowledge(ack)
        })
        .await?;
        retried.push(("acknowledge", n));
        // Dequeue works again: the other package comes; and, where the server binds
        // reservations to connections, the first one too (given back when its connection
        // broke; the acknowledge of its old receipt was ignored).
        let bound = self.bound_reservations;
        let mut want = vec![payload(2)];
        if bound {
            want.push(held[0].payload.clone());
        }
        want.sort();
        let deadline = Instant::now() + RECONNECT_BUDGET + self.retry;
        let mut got = Vec::new();
        while got.len() < want.len() && Instant::now() < deadline {
            let (batch, n) =
                transient_retry("dequeue after the connection was lost", || b.dequeue()).await?;
            retried.push(("dequeue", n));
            for d in batch {
                transient_retry("acknowledge", || b.acknowledge(&d.ack)).await?;
                got.push(d.payload);
            }
        }
        got.sort();
        if got != want {
            let names = |v: &[Vec<u8>]| {
                v.iter()
                    .map(|p| String::from_utf8_lossy(p).into_owned())
                    .collect::<Vec<_>>()
            };
            let hint = if !bound && got.contains(&held[0].payload) {
                " (the acknowledged package came back; if the server binds reservations to \
                 connections, say so with Kit::bound_reservations)"
            } else {
                ""
            };
            return Err(format!(
                "after the connection was lost, dequeue gave {:?}, want {:?}{hint}",
                names(&got),
                names(&want)
            ));
        }
        // The connections drop while a dequeue waits on the empty queue: it ends (empty, or with
        // a transient error) instead of hanging, and the next one answers empty.
        let waiting = {
            let b = b.clone();
            tokio::spawn(async move { b.dequeue().await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        cut().await?;
        let ended = tokio::time::timeout(wait + RECONNECT_BUDGET, waiting)
            .await
            .map_err(|_| {
                format!(
                    "a dequeue waiting when the connections dropped did not end within \
                     {:?}",
                    wait + RECONNECT_BUDGET
                )
            })?
            .map_err(|e| format!("dequeue panicked: {e}"))?;
        let waiting_ended = match ended {
            Ok(got) if got.is_empty() => "empty".to_owned(),
            Ok(_) => {
                return Err(
                    "a settled package was delivered again after the connection loss".into(),
                );
            }
            Err(e) if e.is_transient() => format!("transient error: {e}"),
            Err(e) => {
                return Err(format!(
                    "a dequeue waiting when the connections dropped gave {e} (not transient, \
                     so a cluster would give up) [{e:?}]"
                ));
            }
        };
        let (empty, n) = transient_retry(
            "dequeue on an empty queue after the connection was lost",
            || b.dequeue(),
        )
        .await?;
        retried.push(("dequeue", n));
        if !empty.is_empty() {
            return Err("a settled package was delivered again after the connection loss".into());
        }
        // Past the first lease: the acknowledged package is gone for good.
        sleep_until(t0 + self.retry + Duration::from_millis(300)).await;
        let (again, _) = transient_retry("dequeue", || b.dequeue()).await?;
        if !again.is_empty() {
            return Err(format!(
                "{:?} came back after its lease: the acknowledge after the connection loss did \
                 not take effect",
                String::from_utf8_lossy(&again[0].payload)
            ));
        }
        eprintln!(
            "conformance connection_loss: transient errors retried {retried:?}; the waiting \
             dequeue ended with {waiting_ended}"
        );
        expect_empty(&*b).await
    }

    async fn concurrent(&self) -> CheckResult {
        const N: usize = 1000;
        const CONSUMERS: usize = 4;
        let s = QueueSettings {
            retry: Duration::from_secs(120),
            ..self.settings("conc")
        };
        let producer = self.open(s.clone()).await?;
        let bulk = producer.capabilities().max_bulk.min(10);
        let msgs = (0..N).map(|i| Message::new(payload(i))).collect();
        producer
            .enqueue_many(msgs)
            .await
            .map_err(err("enqueue_many"))?;
        let done = Arc::new(AtomicUsize::new(0));
        let mut handles = Vec::new();
        for c in 0..CONSUMERS {
            let b = (self.make)(QueueSettings { bulk, ..s.clone() })
                .await
                .map_err(err("factory"))?;
            let done = done.clone();
            handles.push(tokio::spawn(async move {
                let mut seen: Vec<Vec<u8>> = Vec::new();
                let deadline = Instant::now() + Duration::from_secs(240);
                while done.load(Ordering::SeqCst) < N && Instant::now() < deadline {
                    let batch = b
                        .dequeue()
                        .await
                        .map_err(|e| format!("consumer {c}: dequeue: {e}"))?;
                    let acks: Vec<_> = batch.iter().map(|d| d.ack.clone()).collect();
                    if !acks.is_empty() {
                        b.acknowledge_many(&acks)
                            .await
                            .map_err(|e| format!("consumer {c}: ack: {e}"))?;
                    }
                    done.fetch_add(batch.len(), Ordering::SeqCst);
                    seen.extend(batch.into_iter().map(|d| d.payload));
                }
                Ok::<_, String>(seen)
            }));
        }
        let mut count: HashMap<Vec<u8>, usize> = HashMap::new();
        let mut per_consumer = Vec::new();
        for h in handles {
            let seen = h.await.map_err(|e| format!("consumer panicked: {e}"))??;
            per_consumer.push(seen.len());
            for p in seen {
                *count.entry(p).or_default() += 1;
            }
        }
        let mut twice = count.values().filter(|&&n| n > 1).count();
        let missing = (0..N).filter(|i| !count.contains_key(&payload(*i))).count();
        let atomic = producer.capabilities().atomic;
        if !atomic && missing == 0 {
            // At least once (SQS: deleting with the receipt of an earlier delivery "might not
            // delete" the message): a package acknowledged with a stale receipt comes back
            // after its lease. Wait for those, drain them, and count them as delivered twice;
            // each must be one already delivered.
            let deadline = Instant::now() + self.retry * 2 + Duration::from_secs(5);
            loop {
                let waiting = producer.queue_size().await.map_err(err("queue_size"))?;
                let held = producer
                    .lock_size()
                    .await
                    .map_err(err("lock_size"))?
                    .unwrap_or(0);
                if waiting == 0 && held == 0 {
                    break;
                }
                if Instant::now() > deadline {
                    break; // expect_empty below says what is left
                }
                let batch = producer.dequeue().await.map_err(err("dequeue"))?;
                for d in &batch {
                    if !count.contains_key(&d.payload) {
                        return Err("a package came back that was never delivered".into());
                    }
                    twice += 1;
                }
                let acks: Vec<_> = batch.iter().map(|d| d.ack.clone()).collect();
                if !acks.is_empty() {
                    producer
                        .acknowledge_many(&acks)
                        .await
                        .map_err(err("acknowledge_many"))?;
                }
            }
        }
        // A broker that does not promise atomic claims (SQS standard queues: at least once)
        // may hand a package to two consumers now and then; a few in a thousand pass, said
        // aloud. Missing packages never pass.
        let tolerated = if atomic { 0 } else { N / 100 };
        if twice > 0 && twice <= tolerated && missing == 0 {
            eprintln!(
                "conformance concurrent_consumers: {twice} of {N} packages delivered twice \
                 (tolerated: the broker does not declare atomic claims)"
            );
        }
        if twice > tolerated || missing > 0 {
            return Err(format!(
                "{N} packages, {CONSUMERS} consumers: {missing} never delivered, {twice} delivered twice (per consumer {per_consumer:?})"
            ));
        }
        expect_empty(&*producer).await
    }
}

fn payload(i: usize) -> Vec<u8> {
    let mut p = format!("package-{i:06}-").into_bytes();
    p.extend_from_slice(&[0, 0xff, b'\'', b'"', (i % 256) as u8]);
    p
}

fn err(op: &'static str) -> impl Fn(BrokerError) -> String {
    move |e| format!("{op}: {e}")
}

/// Runs `f` and says how long it took (at most 30 s: a hang is an error too).
async fn timed<T>(
    f: impl Future<Output = Result<T, BrokerError>>,
) -> (Result<T, BrokerError>, Duration) {
    let t = Instant::now();
    let r = match tokio::time::timeout(Duration::from_secs(30), f).await {
        Ok(r) => r,
        Err(_) => Err(BrokerError::Backend {
            broker: "testkit",
            message: "did not finish within 30 s".into(),
        }),
    };
    (r, t.elapsed())
}

async fn sleep_until(t: Instant) {
    tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await;
}

/// Dequeues on `b` until `until` (the last dequeue starts before it and may end up to `wait`
/// after it); any package delivered meanwhile is an error.
async fn nothing_until(b: &dyn Broker, until: Instant, when: &str) -> Result<(), String> {
    while Instant::now() < until {
        let got = b.dequeue().await.map_err(err("dequeue"))?;
        if !got.is_empty() {
            return Err(format!(
                "another handle got the package {when}, before that lease ran out"
            ));
        }
    }
    Ok(())
}

/// Polls `f` at most `polls` times (and for at most `within`), then drops it.
async fn poll_at_most<F: Future>(f: F, polls: usize, within: Duration) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut n = 0;
    let limited = std::future::poll_fn(|cx| {
        n += 1;
        match f.as_mut().poll(cx) {
            std::task::Poll::Ready(r) => std::task::Poll::Ready(Some(r)),
            std::task::Poll::Pending if n >= polls => std::task::Poll::Ready(None),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    });
    tokio::time::timeout(within, limited).await.ok().flatten()
}

/// Runs `f` again while it fails with a transient error, for at most [`RECONNECT_BUDGET`];
/// returns its value and how many errors were retried.
async fn transient_retry<T, F, Fut>(what: &str, mut f: F) -> Result<(T, u32), String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, BrokerError>>,
{
    let deadline = Instant::now() + RECONNECT_BUDGET;
    let mut pause = Duration::from_millis(50);
    let mut retried = 0;
    loop {
        match f().await {
            Ok(v) => return Ok((v, retried)),
            Err(e) if e.is_transient() && Instant::now() < deadline => {
                retried += 1;
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            Err(e) if e.is_transient() => {
                return Err(format!(
                    "{what}: still failing after {RECONNECT_BUDGET:?}: {e}"
                ));
            }
            Err(e) => {
                return Err(format!(
                    "{what}: {e} (not transient, so a cluster would give up; a lost connection \
                     must give Unreachable or Timeout) [{e:?}]"
                ));
            }
        }
    }
}

/// Dequeues until `n` packages came, in delivery order; fails after `within`.
async fn drain(b: &dyn Broker, n: usize, within: Duration) -> Result<Vec<Delivery>, String> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < n {
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {n} packages delivered within {within:?}",
                got.len()
            ));
        }
        got.extend(b.dequeue().await.map_err(err("dequeue"))?);
    }
    if got.len() > n {
        return Err(format!("{} packages delivered, {n} expected", got.len()));
    }
    Ok(got)
}

async fn ack_all(b: &dyn Broker, ds: &[Delivery]) -> Result<(), String> {
    for d in ds {
        b.acknowledge(&d.ack).await.map_err(err("acknowledge"))?;
    }
    Ok(())
}

/// Waiting + in flight + dead letters. `held` is what the check holds unsettled: the in-flight
/// count of a broker that cannot tell (`lock_size` is `None`).
async fn total(b: &dyn Broker, held: u64) -> Result<u64, String> {
    let q = b.queue_size().await.map_err(err("queue_size"))?;
    let l = b
        .lock_size()
        .await
        .map_err(err("lock_size"))?
        .unwrap_or(held);
    let d = b
        .dead_letter_size()
        .await
        .map_err(err("dead_letter_size"))?
        .unwrap_or(0);
    Ok(q + l + d)
}

async fn expect_size(b: &dyn Broker, n: u64) -> Result<(), String> {
    let got = b.queue_size().await.map_err(err("queue_size"))?;
    if got != n {
        return Err(format!("queue_size is {got}, expected {n}"));
    }
    Ok(())
}

async fn expect_empty(b: &dyn Broker) -> CheckResult {
    expect_size(b, 0).await?;
    if let Some(n) = b.lock_size().await.map_err(err("lock_size"))?
        && n != 0
    {
        return Err(format!("lock_size is {n} at the end, expected 0"));
    }
    Ok(Outcome::Passed)
}
