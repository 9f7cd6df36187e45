//! The scheduler role: fires the due slots of this cluster name's schedules, each slot exactly
//! once across every cluster that runs it.
//!
//! ## The promise
//! Every slot of a schedule is enqueued, and its task runs, once: not twice when several clusters
//! check the same schedules, not never when the cluster that claimed a slot dies.
//!
//! ## How
//! - **Claim.** A cluster that finds a due schedule claims its slot with one conditional update:
//!   `next_run` moves from the slot it read to the following one, and the slot is recorded as
//!   `pending`, only if `next_run` still is what it read. Of several clusters that read the same
//!   row, one update matches; the others see the slot gone. Nothing is locked across the enqueue.
//! - **Enqueue, then confirm.** The claimant enqueues the slot's task and clears `pending`. The
//!   task's id is derived from the schedule's id and the slot's time, so every package ever made
//!   for a slot has the same id.
//! - **Recovery.** A claimant that dies between its claim and its confirmation leaves the slot
//!   pending; once that is older than [`recover_after`], any cluster enqueues it again (same id)
//!   and confirms it. If the first package did get out, the two are one task: a task with a
//!   derived id claims its run in the result store before it runs and is a duplicate once it has
//!   a result, so it runs once.
//! - **Missed slots.** With `catch_up` every missed slot is claimed and enqueued in turn (at most
//!   [`MAX_SLOTS_PER_CYCLE`] per schedule and cycle); without it the missed slots are claimed in
//!   one step that runs once now and moves `next_run` past the present.
//! - **Bad rows.** A row that cannot be read or whose timing does not parse (edited by hand) is
//!   reported (once a minute at most) and skipped; the others go on.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use broker_core::{TaskId, TaskOptions, TaskPackage, now_us};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::schedule::when::Plan;
use crate::shared::Shared;
use crate::store::ScheduleRow;

/// Slots one schedule fires in one cycle at most (catching up after a long outage goes on in
/// the next cycles).
pub const MAX_SLOTS_PER_CYCLE: usize = 1000;
/// Due schedules read per query.
const DUE_PER_QUERY: i64 = 200;
/// How often the same bad row is reported.
const REPORT_EVERY: Duration = Duration::from_secs(60);

/// How long a claimed slot may stay unconfirmed before another cluster enqueues it again.
pub fn recover_after(guard_cycle: Duration) -> Duration {
    (guard_cycle * 4).max(Duration::from_secs(5))
}

/// The options a schedule gives its tasks (stored as JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ScheduleOptions {
    /// The task's timeout, seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    /// The task's attempt limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// The results' group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// A hook task run with each finished task.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hook: Option<String>,
    /// Priority (higher first where the broker supports it).
    #[serde(skip_serializing_if = "is_zero")]
    pub priority: i16,
}

fn is_zero(p: &i16) -> bool {
    *p == 0
}

/// The id of the task of slot `slot_us` of the schedule with id `schedule`.
pub fn slot_task_id(schedule: TaskId, slot_us: i64) -> TaskId {
    TaskId::derived(schedule, "slot", slot_us as u64)
}

/// The timing of a stored schedule.
pub(crate) fn plan(s: &ScheduleRow) -> Result<Plan, String> {
    let minutes = match s.minutes {
        Some(m) => Some(u32::try_from(m).map_err(|_| format!("minutes {m} is out of range"))?),
        None => None,
    };
    Plan::parse(&s.kind, minutes, s.cron.as_deref(), s.tz.as_deref()).map_err(|e| e.to_string())
}

/// The package of one run of `s`: under `id`, named after the schedule.
pub(crate) fn package(s: &ScheduleRow, id: TaskId) -> Result<TaskPackage, String> {
    let o: ScheduleOptions =
        serde_json::from_str(&s.options).map_err(|e| format!("options are not valid: {e}"))?;
    serde_json::from_str::<serde::de::IgnoredAny>(&s.args)
        .map_err(|e| format!("args are not JSON: {e}"))?;
    let mut p = TaskPackage::new(s.func.clone(), s.args.clone().into_bytes());
    p.id = id;
    p.options = TaskOptions {
        timeout: o.timeout.map(Duration::from_secs),
        max_attempts: o.max_attempts,
        ack_failure: None,
        hook: o.hook,
        group: o.group,
        priority: o.priority,
        name: Some(s.name.clone()),
    };
    Ok(p)
}

/// The slot-firing state of one cluster.
pub(crate) struct Scheduler {
    shared: Arc<Shared>,
    /// Rows found bad, by id: when they were last reported. They are left out of the due
    /// query until their report is a minute old, so that bad rows cannot fill every place.
    bad: HashMap<String, Instant>,
}

/// Whether an enqueue failure is the package's (it will never go) or the moment's.
fn classify(e: Error) -> Fired {
    match e {
        Error::Codec(_) | Error::Broker(broker_core::BrokerError::TooLarge { .. }) => {
            Fired::Bad(e.to_string())
        }
        e => Fired::Failed(e),
    }
}

impl Scheduler {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            bad: HashMap::new(),
        }
    }

    /// Reports a bad row (once a minute at most), by name, or by id when the name is unreadable.
    fn report(&mut self, id: &str, name: &str, what: &str) {
        let due = self.bad.get(id).is_none_or(|t| t.elapsed() >= REPORT_EVERY);
        if due {
            self.bad.insert(id.to_owned(), Instant::now());
            if name == "?" {
                tracing::error!("schedule row `{id}` skipped: {what}");
            } else {
                tracing::error!("schedule `{name}` skipped: {what}");
            }
        }
    }

    /// Ids of rows reported bad within the last minute.
    fn skipped(&mut self) -> Vec<String> {
        self.bad.retain(|_, t| t.elapsed() < REPORT_EVERY);
        self.bad.keys().cloned().collect()
    }

    async fn enqueue(&self, p: &TaskPackage) -> Result<(), Error> {
        let m = crate::flow::message(&self.shared.codec, p)?;
        self.shared.broker.enqueue(m).await?;
        Ok(())
    }

    /// Enqueues again the pending slot of `s`, whose claimant died, and confirms it.
    async fn recover(&self, s: &ScheduleRow, slot: i64) -> Result<(), Fired> {
        let id: TaskId =
            s.id.parse()
                .map_err(|e| Fired::Bad(format!("id `{}` is not a UUID: {e}", s.id)))?;
        let p = package(s, slot_task_id(id, slot)).map_err(Fired::Bad)?;
        tracing::warn!(
            "schedule `{}`: slot {} was claimed but not confirmed; enqueueing it again",
            s.name,
            crate::store::rfc3339(slot)
        );
        self.enqueue(&p).await.map_err(classify)?;
        self.shared
            .store
            .confirm_slot(&s.id, slot)
            .await
            .map_err(Fired::Failed)
    }

    /// One look at the schedules: slots left pending by a dead claimant first, then due ones.
    /// Returns how many slots it enqueued. A schedule that fails is logged and the others go
    /// on; only a failing list query ends the cycle early.
    pub async fn cycle(&mut self) -> Result<usize, Error> {
        let cfg = self.shared.config.clone();
        let store = self.shared.store.clone();
        let now = now_us();
        let mut fired = 0;
        let stale = i64::try_from(recover_after(cfg.guard_cycle).as_micros()).unwrap_or(i64::MAX);
        for row in store.stuck_schedules(&cfg.name, now - stale).await? {
            let s = match row {
                Ok(s) => s,
                Err(bad) => {
                    self.report(&bad.id, &bad.name, &bad.error);
                    continue;
                }
            };
            let Some(slot) = s.pending else { continue };
            match self.recover(&s, slot).await {
                Ok(()) => fired += 1,
                Err(Fired::Bad(e)) => self.report(&s.id, &s.name, &e),
                Err(Fired::Failed(e)) => {
                    tracing::warn!("schedule `{}`: {e}; trying again in the next cycle", s.name)
                }
            }
        }
        let skip = self.skipped();
        for row in store
            .due_schedules(&cfg.name, now, DUE_PER_QUERY, &skip)
            .await?
        {
            let s = match row {
                Ok(s) => s,
                Err(bad) => {
                    self.report(&bad.id, &bad.name, &bad.error);
                    continue;
                }
            };
            match self.fire(&s, now, cfg.catch_up).await {
                Ok(n) => fired += n,
                Err(Fired::Bad(e)) => self.report(&s.id, &s.name, &e),
                Err(Fired::Failed(e)) => {
                    tracing::warn!("schedule `{}`: {e}; trying again in the next cycle", s.name)
                }
            }
        }
        Ok(fired)
    }

    /// Claims and enqueues the due slots of `s`.
    async fn fire(&mut self, s: &ScheduleRow, now: i64, catch_up: bool) -> Result<usize, Fired> {
        let plan = plan(s).map_err(Fired::Bad)?;
        let id: TaskId =
            s.id.parse()
                .map_err(|e| Fired::Bad(format!("id `{}` is not a UUID: {e}", s.id)))?;
        // Made before anything is claimed: a row that cannot make a package fires nothing.
        let template = package(s, id).map_err(Fired::Bad)?;
        let store = &self.shared.store;
        let Some(mut expected) = s.next_run else {
            return Ok(0);
        };
        let mut repeats = s.repeats;
        if repeats == 0 {
            // No run left but a next slot (an edit by hand): done, so it is not due forever.
            store
                .set_next_run(&s.id, expected, None)
                .await
                .map_err(Fired::Failed)?;
            return Ok(0);
        }
        let mut fired = 0;
        while expected <= now && repeats != 0 && fired < MAX_SLOTS_PER_CYCLE {
            // Without catch-up the missed slots run once, as the latest of them.
            let slot = if catch_up {
                expected
            } else {
                latest_due(&plan, s.anchor, expected, now)
            };
            let mut next = plan.next_after(s.anchor, if catch_up { slot } else { now });
            let left = if repeats > 0 { repeats - 1 } else { repeats };
            if left == 0 {
                next = None;
            }
            let task = slot_task_id(id, slot);
            let claimed = store
                .claim_slot(
                    &s.id,
                    expected,
                    next,
                    left,
                    slot,
                    &task.to_string(),
                    now_us(),
                )
                .await
                .map_err(Fired::Failed)?;
            if !claimed {
                // Another cluster has it.
                break;
            }
            let mut p = template.clone();
            p.id = task;
            // A failure here leaves the slot pending: it is enqueued again after the delay.
            self.enqueue(&p).await.map_err(classify)?;
            store
                .confirm_slot(&s.id, slot)
                .await
                .map_err(Fired::Failed)?;
            tracing::debug!(
                "schedule `{}`: slot {} enqueued as task {task}",
                s.name,
                crate::store::rfc3339(slot)
            );
            fired += 1;
            repeats = left;
            match next {
                Some(n) => expected = n,
                None => break,
            }
        }
        Ok(fired)
    }
}

/// The latest slot at or before `now`, from the due slot `first` (at most 100,000 steps: an
/// outage of a day of an every-second cron; past that, the last one reached).
fn latest_due(plan: &Plan, anchor: i64, first: i64, now: i64) -> i64 {
    let mut latest = first;
    for _ in 0..100_000 {
        match plan.next_after(anchor, latest) {
            Some(n) if n <= now => latest = n,
            _ => break,
        }
    }
    latest
}

/// Why a schedule fired nothing.
enum Fired {
    /// The row is bad: report it, go on with the others.
    Bad(String),
    /// The store or the broker failed: try again next cycle.
    Failed(Error),
}

/// Runs the scheduler until stop: a cycle every `guard_cycle`, and one at the earliest next slot
/// when that comes sooner (a slot fires within milliseconds of its time, not up to a cycle late).
pub(crate) async fn run(shared: Arc<Shared>) {
    let mut s = Scheduler::new(shared.clone());
    let cycle = shared.config.guard_cycle;
    loop {
        if let Err(e) = s.cycle().await {
            tracing::warn!("scheduler: {e}; trying again in the next cycle");
        }
        let now = now_us();
        let mut wait = cycle;
        match shared.store.next_slot_after(&shared.config.name, now).await {
            Ok(Some(next)) => {
                let until = Duration::from_micros(u64::try_from(next - now).unwrap_or(0));
                wait = wait.min(until);
            }
            Ok(None) => {}
            Err(e) => tracing::debug!("scheduler: next slot unknown ({e})"),
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shared.stop.cancelled() => return,
        }
    }
}
