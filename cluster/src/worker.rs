//! Workers: take jobs from the pusher, run them under the timeout with panics caught, keep their
//! lease while they run, and hand the outcome to the monitor.
//!
//! One loop for both worker modes: an [`Executor`] runs the task either here, as a tokio task
//! (`async`), or in the worker's child process (`process`, see [`crate::process`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use broker_core::{AckId, TaskPackage, now_us};

use crate::job::{Job, Outcome, Prior, Ran, execute, record};
use crate::process::ProcessWorker;
use crate::shared::Shared;
use crate::task::{Registry, effective_timeout};

/// Where a worker runs its tasks.
#[derive(Debug)]
pub(crate) enum Executor {
    /// As a tokio task in this process.
    Async,
    /// In the worker's own child process.
    Process(Box<ProcessWorker>),
}

impl Executor {
    /// Ready to take a job (a child process is up in process mode).
    async fn ready(&mut self) -> Result<(), String> {
        match self {
            Self::Async => Ok(()),
            Self::Process(p) => p.ready().await,
        }
    }

    /// Stops a run whose future was dropped (its lease was lost): its worker process is killed.
    async fn abandon(&mut self) {
        if let Self::Process(p) = self {
            p.abandon().await;
        }
    }

    /// Runs one package within `timeout`. `Err`: it could not start (give the package back).
    async fn run(
        &mut self,
        registry: &Registry,
        package: &TaskPackage,
        attempt: u32,
        timeout: Duration,
    ) -> Result<Ran, String> {
        match self {
            Self::Async => Ok(execute(registry, package, attempt, timeout).await),
            Self::Process(p) => p.run(package, attempt, timeout).await,
        }
    }
}

/// Deliveries without a recorded run after which a task is failed for good: something (an
/// abort, the OOM killer) ends the process whenever it runs.
/// Given-back deliveries (shutdown, store outage, stale lease) count here too, hence the room.
const MAX_UNRECORDED_DELIVERIES: u32 = 50;

/// Time kept free at the end of a lease for saving and acknowledging: a tenth, at most 1 s.
fn lease_margin(retry: Duration) -> Duration {
    (retry / 10).min(Duration::from_secs(1))
}

/// Lease left when extension starts: a third of `retry`, at most 10 s, at least two margins.
/// A task that finishes before that costs the broker no call; a broker that does not answer
/// has until the last margin, with retries, before the lease is given up.
fn extend_when_left(retry: Duration) -> Duration {
    (retry / 3)
        .min(Duration::from_secs(10))
        .max(lease_margin(retry) * 2)
}

/// Why a lease was given up.
#[derive(Debug)]
enum Lost {
    /// The broker says the receipt no longer holds it: someone else may run the package.
    Moved,
    /// No extension succeeded before the last margin.
    Unanswered(String),
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lost::Moved => f.write_str("the broker gave the package to another consumer"),
            Lost::Unanswered(e) => write!(f, "the lease could not be extended in time ({e})"),
        }
    }
}

/// When the lease ending at `deadline` is to be extended.
fn extend_at(deadline: Instant, retry: Duration) -> Instant {
    deadline
        .checked_sub(extend_when_left(retry))
        .unwrap_or(deadline)
}

/// Waits until [`extend_at`], then extends the lease by `retry`.
async fn extend_once(
    shared: &Shared,
    ack: &AckId,
    retry: Duration,
    deadline: &mut Instant,
) -> Result<(), Lost> {
    tokio::time::sleep_until(extend_at(*deadline, retry).into()).await;
    extend_now(shared, ack, retry, deadline).await
}

/// Extends the lease by `retry` (retrying errors until the last margin) and moves `deadline`.
async fn extend_now(
    shared: &Shared,
    ack: &AckId,
    retry: Duration,
    deadline: &mut Instant,
) -> Result<(), Lost> {
    let last_chance = deadline
        .checked_sub(lease_margin(retry))
        .unwrap_or(*deadline);
    let mut last_error = String::from("no answer");
    loop {
        let asked = Instant::now();
        if asked >= last_chance {
            return Err(Lost::Unanswered(last_error));
        }
        match tokio::time::timeout_at(last_chance.into(), shared.broker.extend(ack, retry)).await {
            Ok(Ok(true)) => {
                shared.counters.extended.fetch_add(1, Ordering::Relaxed);
                *deadline = asked + retry;
                return Ok(());
            }
            Ok(Ok(false)) => return Err(Lost::Moved),
            Ok(Err(e)) => {
                tracing::warn!("lease not extended ({e}); trying again");
                last_error = e.to_string();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(_) => return Err(Lost::Unanswered("no answer".into())),
        }
    }
}

/// Keeps the lease of a running task for as long as the task runs. Returns only when the lease
/// is lost: the caller then stops the run and gives the package back, with no attempt counted.
async fn keep_lease(shared: &Shared, ack: &AckId, retry: Duration, deadline: &mut Instant) -> Lost {
    loop {
        if let Err(lost) = extend_once(shared, ack, retry, deadline).await {
            return lost;
        }
    }
}

/// After the run: keeps the lease until the monitor has settled the delivery (saving a result
/// may take a while), so a finished task is not delivered again meanwhile.
async fn keep_until_settled(
    shared: Arc<Shared>,
    seq: u64,
    ack: AckId,
    retry: Duration,
    mut deadline: Instant,
) {
    loop {
        tokio::time::sleep_until(extend_at(deadline, retry).into()).await;
        if !shared.unsettled(seq) {
            return;
        }
        if let Err(lost) = extend_now(&shared, &ack, retry, &mut deadline).await {
            tracing::warn!("a finished task's lease was lost before it was settled: {lost}");
            return;
        }
    }
}

/// Claims the run of `job` in the store; returns the claim's start, or `None` when the job was
/// given back (another copy runs now: it comes back once that one's timeout has passed, then as
/// a duplicate; or the store did not answer).
async fn claim(shared: &Shared, job: &Job, intended: Duration) -> Option<i64> {
    let mut marker = record(
        &job.package,
        &Ran {
            result: Ok(String::new()),
            permanent: false,
            started_us: now_us(),
            stopped_us: 0,
        },
        0,
        &shared.config.name,
    );
    marker.result = None;
    // A run older than its timeout and a lease is no longer running anywhere.
    let stale = i64::try_from((intended + shared.config.retry).as_micros()).unwrap_or(i64::MAX);
    let wait = match shared
        .store
        .claim_run(&marker, marker.started_us.saturating_sub(stale))
        .await
    {
        Ok(true) => return Some(marker.started_us),
        Ok(false) => {
            tracing::debug!("task {} runs elsewhere now; given back", job.package.id);
            intended + Duration::from_secs(1)
        }
        Err(e) => {
            tracing::warn!(
                "run of task {} not claimed: {e}; given back",
                job.package.id
            );
            Duration::from_secs(5)
        }
    };
    shared.give_back_after(job.seq, &job.ack, wait).await;
    None
}

/// Releases the run claim (made at `claim`) of a follow-up that stopped without a result.
async fn release(shared: &Shared, job: &Job, claim: Option<i64>) {
    if let Some(started) = claim
        && let Err(e) = shared.store.release_run(job.package.id, started).await
    {
        tracing::warn!(
            "claim of task {} not released ({e}); its next delivery waits for it to go stale",
            job.package.id
        );
    }
}

/// A job no executor could start (no worker process): back to the broker, its claim released.
async fn not_started(shared: &Shared, job: &Job, claim: Option<i64>, why: &str) {
    tracing::warn!("task {} not started: {why}; given back", job.package.id);
    release(shared, job, claim).await;
    shared
        .give_back_after(job.seq, &job.ack, Duration::from_secs(1))
        .await;
}

/// Counts a running task for the status; uncounts it however the run ends.
struct Running<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Running<'a> {
    fn new(n: &'a std::sync::atomic::AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Self(n)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One worker: runs jobs until the job channel closes. After stop, jobs not yet started are
/// given back to the broker at once; so is a job whose lease would run out before its timeout
/// (it gets a fresh lease from the next claim instead of running twice).
pub(crate) async fn run(
    shared: Arc<Shared>,
    jobs: async_channel::Receiver<Job>,
    outcomes: tokio::sync::mpsc::Sender<Outcome>,
    mut exec: Executor,
) {
    let cfg = shared.config.clone();
    let mut pause = Duration::from_millis(500);
    loop {
        // A worker that cannot run anything takes no job (another worker, or the broker after
        // the lease, gets it).
        if let Err(e) = exec.ready().await {
            if shared.stop.is_cancelled() {
                return;
            }
            tracing::error!("{e}; trying again in {pause:?}");
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shared.stop.cancelled() => {}
            }
            pause = (pause * 2).min(Duration::from_secs(30));
            continue;
        }
        pause = Duration::from_millis(500);
        let Ok(mut job) = jobs.recv().await else {
            break;
        };
        drop(job.slot.take());
        if shared.stop.is_cancelled() {
            shared.give_back(job.seq, &job.ack).await;
            continue;
        }
        let intended = effective_timeout(job.package.options.timeout, cfg.timeout);
        let margin = lease_margin(cfg.retry);
        let extend = shared.extend;
        let attempt = match shared.prior(&job).await {
            Prior::Settled => {
                let _ = outcomes.send(Outcome::duplicate(job)).await;
                continue;
            }
            Prior::Unknown => {
                // The store is not answering: come back later, later each time.
                let wait = Duration::from_secs(u64::from(job.deliveries.unwrap_or(1)).min(30));
                shared.give_back_after(job.seq, &job.ack, wait).await;
                continue;
            }
            Prior::Attempt(n) => n,
        };
        // Checked after the store was asked: that took time too.
        let late = if extend {
            // The lease can be extended, if enough of it is left to ask.
            job.claimed.elapsed() + margin * 2 >= cfg.retry
        } else {
            intended + margin < cfg.retry && job.claimed.elapsed() + intended + margin >= cfg.retry
        };
        if late {
            tracing::warn!(
                "task {} waited too long for a worker to finish within its lease; given back \
                 (lower `bulk` or `queue_limit` for long tasks)",
                job.package.id
            );
            shared.give_back(job.seq, &job.ack).await;
            continue;
        }
        // A follow-up (hook, chain link, iterator item) or a schedule's slot may have been sent
        // twice; one copy runs.
        let claim = if crate::flow::runs_once(&job.package) {
            match claim(&shared, &job, intended).await {
                Some(started) => Some(started),
                None => continue,
            }
        } else {
            None
        };
        let ran = if job.deliveries.unwrap_or(0) > attempt.saturating_add(MAX_UNRECORDED_DELIVERIES)
        {
            let now = now_us();
            Ran {
                result: Err(format!(
                    "delivered {} times without a recorded result: the process running it \
                     keeps dying",
                    job.deliveries.unwrap_or(0)
                )),
                permanent: true,
                started_us: now,
                stopped_us: now,
            }
        } else if extend {
            // The lease follows the run: extended before it runs out, up to the timeout.
            let mut deadline = job.claimed + cfg.retry;
            let ran = {
                let _running = Running::new(&shared.running);
                let run = exec.run(&shared.registry, &job.package, attempt, intended);
                tokio::select! {
                    biased;
                    ran = run => Ok(ran),
                    lost = keep_lease(&shared, &job.ack, cfg.retry, &mut deadline) => Err(lost),
                }
            };
            match ran {
                Ok(Err(e)) => {
                    not_started(&shared, &job, claim, &e).await;
                    continue;
                }
                Ok(Ok(ran)) => {
                    // Little lease left: keep it until the monitor has settled the delivery.
                    if deadline.saturating_duration_since(Instant::now())
                        < extend_when_left(cfg.retry) * 2
                    {
                        tokio::spawn(keep_until_settled(
                            shared.clone(),
                            job.seq,
                            job.ack.clone(),
                            cfg.retry,
                            deadline,
                        ));
                    }
                    ran
                }
                Err(lost) => {
                    // Not a failure of the task: no attempt is recorded, the package goes back
                    // (a stale give-back is ignored if someone else holds it now).
                    tracing::warn!("task {} stopped: {lost}; given back", job.package.id);
                    // Its process first: the run must be over before anyone else may claim it.
                    exec.abandon().await;
                    release(&shared, &job, claim).await;
                    shared.give_back(job.seq, &job.ack).await;
                    continue;
                }
            }
        } else {
            // Never past the lease: a run still going then would be delivered to someone else.
            let left = cfg.retry.saturating_sub(job.claimed.elapsed() + margin);
            let limit = intended.min(left.max(Duration::from_millis(1)));
            let _running = Running::new(&shared.running);
            match exec
                .run(&shared.registry, &job.package, attempt, limit)
                .await
            {
                Ok(ran) => ran,
                Err(e) => {
                    not_started(&shared, &job, claim, &e).await;
                    continue;
                }
            }
        };
        if outcomes
            .send(Outcome::ran(job, ran, attempt))
            .await
            .is_err()
        {
            // The monitor is gone (shutdown past its deadline): the ledger gives the job back.
            break;
        }
    }
}
