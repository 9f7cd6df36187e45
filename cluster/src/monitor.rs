//! The monitor: saves results in batches, then settles each delivery with the broker:
//! acknowledge successes (and final failures), send retryable failures back with a backoff.
//! A result is saved before its package is acknowledged, so a crash in between re-runs the task
//! (and the duplicate is discarded) rather than losing its result.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use std::collections::HashMap;

use broker_core::{AckId, TaskId, now_us};
use tokio::sync::{Mutex, mpsc};

use crate::flow::{Next, complete_iters, follow_ups, has_follow_ups};
use crate::job::{Outcome, record};
use crate::shared::Shared;
use crate::store::TaskRecord;

/// Most outcomes settled in one batch.
const BATCH: usize = 512;
/// Outcomes worth waiting for before a save, and the longest wait.
const GATHER_TARGET: usize = 64;
const GATHER: Duration = Duration::from_millis(2);
/// How often old successes beyond `save_limit` are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(2);

/// Settles outcomes until every worker is gone and the channel is drained.
pub(crate) async fn run(shared: Arc<Shared>, outcomes: Arc<Mutex<mpsc::Receiver<Outcome>>>) {
    let mut rx = outcomes.lock().await;
    let mut batch = Vec::with_capacity(BATCH);
    let mut last_prune = Instant::now();
    loop {
        // Idle, the monitor still prunes on time.
        let got = match tokio::time::timeout(PRUNE_EVERY, rx.recv_many(&mut batch, BATCH)).await {
            Ok(n) => n,
            Err(_) => {
                if prunes(&shared) && last_prune.elapsed() >= PRUNE_EVERY {
                    last_prune = Instant::now();
                    prune(&shared).await;
                }
                continue;
            }
        };
        if got == 0 {
            break;
        }
        // Under load, a moment's wait fills the batch: fewer commits per task. Idle, the
        // first outcome is settled within GATHER.
        if batch.len() < GATHER_TARGET {
            let _ = tokio::time::timeout(GATHER, async {
                while batch.len() < GATHER_TARGET {
                    let room = BATCH - batch.len();
                    if rx.recv_many(&mut batch, room).await == 0 {
                        break;
                    }
                }
            })
            .await;
        }
        settle(&shared, std::mem::take(&mut batch)).await;
        if prunes(&shared) && last_prune.elapsed() >= PRUNE_EVERY {
            last_prune = Instant::now();
            prune(&shared).await;
        }
    }
    if prunes(&shared) {
        prune(&shared).await;
    }
}

/// True when this cluster prunes results at all (`save_limit`, `prune_older_than`).
fn prunes(shared: &Shared) -> bool {
    shared.config.save_limit != 0 || shared.config.prune_older_than.is_some()
}

/// Keeps the newest `save_limit` successes (none with -1), but never prunes one younger than
/// twice the lease: those still let a late duplicate delivery be recognised and discarded.
async fn prune(shared: &Shared) {
    let window = i64::try_from(shared.config.retry.as_micros() * 2).unwrap_or(i64::MAX);
    let spare_after = now_us().saturating_sub(window);
    let keep = shared.config.save_limit.max(0) as u64;
    if shared.config.save_limit != 0
        && let Err(e) = shared
            .store
            .prune(&shared.config.name, keep, spare_after)
            .await
    {
        tracing::warn!("pruning old results failed: {e}");
    }
    if let Some(age) = shared.config.prune_older_than {
        let before = now_us().saturating_sub(i64::try_from(age.as_micros()).unwrap_or(i64::MAX));
        let cfg = &shared.config;
        match shared
            .store
            .prune_older(
                &cfg.name,
                before.min(spare_after),
                cfg.prune_failures,
                false,
            )
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::debug!("pruned {n} results older than {age:?}"),
            Err(e) => tracing::warn!("pruning results older than {age:?} failed: {e}"),
        }
    }
}

/// True when a failed run gets no further attempt.
fn is_final(shared: &Shared, o: &Outcome, permanent: bool) -> bool {
    let opts = &o.job.package.options;
    let max = opts.max_attempts.unwrap_or(shared.config.max_attempts);
    permanent
        || opts.ack_failure.unwrap_or(shared.config.ack_failure)
        || (max > 0 && o.attempt >= max)
}

/// Delay before attempt `attempt + 1`: 1 s, 2 s, 4 s, … capped at `retry`.
fn backoff(attempt: u32, cap: Duration) -> Duration {
    Duration::from_secs(1u64 << attempt.saturating_sub(1).min(16)).min(cap)
}

async fn settle(shared: &Shared, batch: Vec<Outcome>) {
    let cfg = &shared.config;
    let mut records: Vec<TaskRecord> = Vec::with_capacity(batch.len());
    let mut acks: Vec<(u64, AckId)> = Vec::with_capacity(batch.len());
    let mut retries: Vec<(u64, AckId, Duration)> = Vec::new();
    let c = &shared.counters;
    // Two runs of one task in a batch (a redelivery racing the first run): one row per id,
    // a success preferred, so the upsert never touches a row twice.
    let mut latest: HashMap<TaskId, usize> = HashMap::new();
    for (i, o) in batch.iter().enumerate() {
        if o.ran.is_some() {
            let id = o.job.package.id;
            let better = match latest.get(&id) {
                Some(&j) => batch[j].ran.as_ref().is_some_and(|r| r.result.is_err()),
                None => true,
            };
            if better {
                latest.insert(id, i);
            }
        }
    }
    for (i, o) in batch.iter().enumerate() {
        let Some(ran) = &o.ran else {
            c.duplicates.fetch_add(1, Ordering::Relaxed);
            acks.push((o.job.seq, o.job.ack.clone()));
            continue;
        };
        let success = ran.result.is_ok();
        let fin = success || is_final(shared, o, ran.permanent);
        if latest.get(&o.job.package.id) == Some(&i) {
            // Successes are saved even with save_limit = -1: pruning removes them once they
            // can no longer be delivered again.
            let mut r = record(&o.job.package, ran, o.attempt, &cfg.name);
            r.done = fin;
            records.push(r);
        }
        if success {
            c.succeeded.fetch_add(1, Ordering::Relaxed);
        } else {
            c.failed.fetch_add(1, Ordering::Relaxed);
            if let Err(msg) = &ran.result {
                tracing::warn!(
                    "task {} ({}) failed on attempt {}{}: {msg}",
                    o.job.package.id,
                    o.job.package.func,
                    o.attempt,
                    if fin { ", final" } else { "" }
                );
            }
        }
        if fin {
            acks.push((o.job.seq, o.job.ack.clone()));
        } else {
            retries.push((o.job.seq, o.job.ack.clone(), backoff(o.attempt, cfg.retry)));
        }
    }

    // Results first: an acknowledged package whose result was not saved would be lost.
    let poisoned = match save(shared, &records).await {
        Some(p) => p,
        None => return, // shutdown deadline passed: the ledger gives the packages back
    };
    if !poisoned.is_empty() {
        // A row the store refuses for its data: park the package (every delivery of that task
        // in the batch) in the dead letters with the reason instead of blocking every other
        // result behind it.
        let bad: std::collections::HashSet<u64> = batch
            .iter()
            .filter(|o| poisoned.contains_key(&o.job.package.id))
            .map(|o| o.job.seq)
            .collect();
        acks.retain(|(seq, _)| !bad.contains(seq));
        retries.retain(|(seq, _, _)| !bad.contains(seq));
        for o in &batch {
            if let Some(reason) = poisoned.get(&o.job.package.id) {
                match shared.broker.dead_letter(&o.job.ack, reason).await {
                    Ok(()) => shared.settle(o.job.seq),
                    Err(e) => tracing::error!("could not park task {}: {e}", o.job.package.id),
                }
            }
        }
    }
    c.processed.fetch_add(
        batch.iter().filter(|o| o.ran.is_some()).count() as u64,
        Ordering::Relaxed,
    );
    if let Some(m) = &shared.metrics {
        let retried: std::collections::HashSet<u64> =
            retries.iter().map(|(seq, _, _)| *seq).collect();
        m.record(batch.iter().filter_map(|o| {
            let ran = o.ran.as_ref()?;
            Some(crate::metrics::Finished {
                func: &o.job.package.func,
                success: ran.result.is_ok(),
                retried: retried.contains(&o.job.seq),
                run: Duration::from_micros(
                    u64::try_from(ran.stopped_us - ran.started_us).unwrap_or(0),
                ),
            })
        }));
    }
    // Final failures, saved: reported without waiting (`[error_reporter]`).
    if let Some(reports) = &shared.reports {
        for r in records
            .iter()
            .filter(|r| !r.success && r.done && !poisoned.contains_key(&r.id))
        {
            reports.send(r);
        }
    }

    // What follows done tasks (hooks, next links, chain and iterator ends) is sent and saved
    // before they are acknowledged; if that fails they come back and it is done again.
    let unsent = follow(shared, &batch, &records, &poisoned).await;
    if !unsent.is_empty() {
        acks.retain(|(seq, _)| !unsent.contains(seq));
        for o in &batch {
            if unsent.contains(&o.job.seq) && shared.unsettled(o.job.seq) {
                shared
                    .give_back_after(o.job.seq, &o.job.ack, FOLLOW_UP_RETRY)
                    .await;
            }
        }
    }

    if !acks.is_empty() {
        let ids: Vec<AckId> = acks.iter().map(|(_, a)| a.clone()).collect();
        if let Err(e) = shared.broker.acknowledge_many(&ids).await {
            tracing::debug!("bulk acknowledge failed ({e}); acknowledging one by one");
            for a in &ids {
                if let Err(e) = shared.broker.acknowledge(a).await {
                    tracing::warn!(
                        "acknowledge failed: {e}; the package comes back after its lease and \
                         is discarded as a duplicate"
                    );
                }
            }
        }
    }
    for (_, ack, delay) in &retries {
        match shared.broker.fail_after(ack, *delay).await {
            Ok(()) => {
                c.retried.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!("retry could not be scheduled ({e}); the lease brings it back")
            }
        }
    }
    for (seq, _) in &acks {
        shared.settle(*seq);
    }
    for (seq, _, _) in &retries {
        shared.settle(*seq);
    }
}

/// How long a task whose follow-ups could not be sent waits before it is delivered again.
const FOLLOW_UP_RETRY: Duration = Duration::from_secs(1);

/// Sends and saves what follows the done tasks of `batch` (whose rows, `records`, are saved):
/// hook runs and next chain links are enqueued under their fixed ids unless a result under that
/// id exists already, chain end rows are upserted, finished iterators get their row. A
/// duplicate delivery of a done task does it all again, from the task's stored result, so a
/// crash between enqueueing and acknowledging loses nothing. Returns the deliveries (by
/// sequence) whose follow-ups could not be sent: they are not to be acknowledged.
async fn follow(
    shared: &Shared,
    batch: &[Outcome],
    records: &[TaskRecord],
    poisoned: &HashMap<TaskId, String>,
) -> std::collections::HashSet<u64> {
    let cfg = &shared.config;
    let saved: HashMap<TaskId, &TaskRecord> = records.iter().map(|r| (r.id, r)).collect();
    let mut done: Vec<(&Outcome, TaskRecord)> = Vec::new();
    let mut duplicates: Vec<&Outcome> = Vec::new();
    let mut stripped: Vec<TaskRecord> = Vec::new();
    for o in batch {
        let p = &o.job.package;
        if !has_follow_ups(p) {
            continue;
        }
        if let Some(reason) = poisoned.get(&p.id) {
            // Its row was refused for its data (the package is in the dead letters): a bare
            // failed row takes its place, so that its chain ends and its iterator completes.
            if p.flow.is_some() && o.ran.is_some() {
                let now = now_us();
                let ran = crate::job::Ran {
                    result: Err(reason.clone()),
                    permanent: true,
                    started_us: now,
                    stopped_us: now,
                };
                let mut r = record(p, &ran, o.attempt, &cfg.name);
                r.args = "null".into();
                stripped.push(r.clone());
                done.push((o, r));
            }
            continue;
        }
        match (&o.ran, saved.get(&p.id)) {
            (Some(_), Some(r)) if r.done => done.push((o, (*r).clone())),
            (Some(_), _) => {}
            (None, _) => duplicates.push(o),
        }
    }
    if done.is_empty() && duplicates.is_empty() {
        return Default::default();
    }
    let owners: std::collections::HashSet<u64> = done
        .iter()
        .map(|(o, _)| o.job.seq)
        .chain(duplicates.iter().map(|o| o.job.seq))
        .collect();
    let attempt = async {
        if !duplicates.is_empty() {
            let ids: Vec<TaskId> = duplicates.iter().map(|o| o.job.package.id).collect();
            let stored: HashMap<TaskId, TaskRecord> = shared
                .store
                .get_many(&ids)
                .await?
                .into_iter()
                .map(|r| (r.id, r))
                .collect();
            for o in &duplicates {
                if let Some(r) = stored.get(&o.job.package.id).filter(|r| r.done) {
                    done.push((o, r.clone()));
                }
            }
        }
        let mut next = Next::default();
        for (o, r) in &done {
            follow_ups(&o.job.package, r, &cfg.name, &mut next);
        }
        let mut seen = std::collections::HashSet::new();
        next.packages.retain(|p| seen.insert(p.id));
        let ids: Vec<TaskId> = next.packages.iter().map(|p| p.id).collect();
        let known = shared.store.known(&ids).await?;
        let mut messages = Vec::new();
        for p in next.packages.iter().filter(|p| !known.contains(&p.id)) {
            match crate::flow::message(&shared.codec, p) {
                Ok(m) => messages.push(m),
                // Cannot change by trying again (over the size limit): the follow-up gets a
                // final failed result of its own, and a chain it belongs to ends with it.
                Err(e) => {
                    tracing::error!("follow-up task {} ({}) cannot be packed: {e}", p.id, p.func);
                    let now = now_us();
                    let ran = crate::job::Ran {
                        result: Err(format!("could not be enqueued: {e}")),
                        permanent: true,
                        started_us: now,
                        stopped_us: now,
                    };
                    let r = record(p, &ran, 0, &cfg.name);
                    let mut after = Next::default();
                    follow_ups(p, &r, &cfg.name, &mut after);
                    next.rows.push(r);
                    next.rows.extend(after.rows);
                }
            }
        }
        if !messages.is_empty() {
            shared.broker.enqueue_many(messages).await?;
        }
        next.rows.extend(stripped);
        let mut seen = std::collections::HashSet::new();
        next.rows.retain(|r| seen.insert(r.id));
        shared.store.save(&next.rows).await?;
        complete_iters(&shared.store, &next.iters, &cfg.name).await?;
        Ok::<(), crate::Error>(())
    };
    match attempt.await {
        Ok(()) => Default::default(),
        Err(e) => {
            tracing::warn!(
                "follow-ups of {} tasks (hooks, chains, iterators) could not be sent: {e}; \
                 their packages come back and are settled again",
                owners.len()
            );
            owners
        }
    }
}

/// Saves `records`, retrying while the store fails as a whole. Returns the tasks whose row the
/// store refuses for its data (with the reason), or `None` if the shutdown deadline passed first.
async fn save(shared: &Shared, records: &[TaskRecord]) -> Option<HashMap<TaskId, String>> {
    let mut pause = Duration::from_millis(50);
    loop {
        let Err(e) = shared.store.save(records).await else {
            return Some(HashMap::new());
        };
        if e.is_row_fault() {
            // Find the rows the store refuses; save the others.
            let mut poisoned = HashMap::new();
            let mut again = false;
            for r in records {
                match shared.store.save(std::slice::from_ref(r)).await {
                    Ok(()) => {}
                    Err(e) if e.is_row_fault() => {
                        let reason = format!("result could not be saved: {e}");
                        tracing::error!("task {}: {reason}", r.id);
                        poisoned.insert(r.id, reason);
                    }
                    Err(_) => {
                        again = true;
                        break;
                    }
                }
            }
            if !again {
                return Some(poisoned);
            }
        }
        if shared.hard_stop.is_cancelled() {
            tracing::error!(
                "{} results could not be saved: {e}; their packages are given back",
                records.len()
            );
            return None;
        }
        tracing::warn!(
            "saving {} results failed: {e}; retrying in {pause:?}",
            records.len()
        );
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shared.hard_stop.cancelled() => {}
        }
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_lease() {
        let cap = Duration::from_secs(60);
        assert_eq!(backoff(1, cap), Duration::from_secs(1));
        assert_eq!(backoff(2, cap), Duration::from_secs(2));
        assert_eq!(backoff(3, cap), Duration::from_secs(4));
        assert_eq!(backoff(30, cap), cap);
    }
}
