//! Work that follows a task: hooks, chains and iterators.
//!
//! Everything a flow needs travels in the signed packages ([`broker_core::Flow`]) and in the
//! result store, never only in a cluster's memory: the monitor, once a task is done (a success,
//! or a failure with no attempt left), works out what follows it ([`follow_ups`]), enqueues the
//! follow-up packages under ids fixed in advance and writes the rows that end a chain or an
//! iterator, all before it acknowledges the task. A crash in between means a second delivery of
//! the task, which does the same again: packages whose id already has a result are not sent
//! twice, and the final rows are upserts of the same content.

use std::collections::HashMap;

use broker_core::{ChainFlow, Flow, ItemFlow, TaskId, TaskOptions, TaskPackage, now_us};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::store::{Store, TaskRecord};

/// The finished task a hook receives as its argument: register the hook as a task taking
/// `Finished` (or any type with these fields, or `serde_json::Value`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finished {
    /// The finished task's id.
    pub id: TaskId,
    /// Its registered function.
    pub func: String,
    /// Its arguments.
    pub args: serde_json::Value,
    /// Its result, or the failure message (a string) when it failed.
    pub result: serde_json::Value,
    /// True when it succeeded.
    pub success: bool,
    /// Attempts it took.
    pub attempts: u32,
    /// Its group.
    pub group: Option<String>,
}

/// The id of the hook run of task `parent`: the same in every cluster, never a v7 id.
pub fn hook_id(parent: TaskId) -> TaskId {
    TaskId::derived(parent, "hook", 0)
}

/// The id of item `index` of iterator `iter`.
pub fn item_id(iter: TaskId, index: u32) -> TaskId {
    TaskId::derived(iter, "item", u64::from(index))
}

/// The function name of a chain's result row.
pub const CHAIN_FUNC: &str = "chain";
/// The function name of an iterator's result row.
pub const ITER_FUNC: &str = "iter";

/// Parses stored JSON text, keeping text that is not JSON as a string.
fn json(s: Option<&str>) -> serde_json::Value {
    match s {
        None => serde_json::Value::Null,
        Some(s) => {
            serde_json::from_str(s).unwrap_or_else(|_| serde_json::Value::String(s.to_owned()))
        }
    }
}

/// When an id made by [`TaskId::new`] was made, µs since the epoch (now for any other id).
fn made_at(id: TaskId) -> i64 {
    id.0.get_timestamp()
        .map(|t| {
            let (s, n) = t.to_unix();
            (s as i64).saturating_mul(1_000_000) + i64::from(n / 1000)
        })
        .unwrap_or_else(now_us)
}

/// An iterator whose completion is to be checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IterCheck {
    pub item: ItemFlow,
    pub func: String,
    pub name: Option<String>,
    /// The group of the iterator's row.
    pub group: Option<String>,
}

/// What follows tasks that are done.
#[derive(Debug, Default)]
pub(crate) struct Next {
    /// Packages to enqueue before the tasks are acknowledged.
    pub packages: Vec<TaskPackage>,
    /// Rows that end a chain.
    pub rows: Vec<TaskRecord>,
    /// Iterators one of whose items is done, one entry per iterator.
    pub iters: Vec<IterCheck>,
}

impl Next {
    fn iter(&mut self, check: IterCheck) {
        if !self.iters.iter().any(|c| c.item.iter == check.item.iter) {
            self.iters.push(check);
        }
    }
}

/// The broker message for a follow-up package.
pub(crate) fn message(
    codec: &broker_core::Codec,
    p: &TaskPackage,
) -> Result<broker_core::Message, broker_core::CodecError> {
    let mut m = broker_core::Message::new(codec.encode(p)?)
        .with_priority(p.options.priority)
        .with_key(p.id.to_string());
    if let Some(g) = &p.options.group {
        m = m.with_group(g.clone());
    }
    Ok(m)
}

/// True when the package's task has something to do once it is done.
pub(crate) fn has_follow_ups(p: &TaskPackage) -> bool {
    p.flow.is_some() || p.options.hook.is_some()
}

/// True when the package may exist twice and must run once: a follow-up (hook run, chain link,
/// iterator item) or a task with a derived id (a schedule's slot). Its run is claimed in the
/// store first (`Store::claim_run`).
pub(crate) fn runs_once(p: &TaskPackage) -> bool {
    p.flow.is_some() || p.id.0.get_version_num() == 8
}

/// Adds to `next` what follows `p`, whose final result is `r`.
pub(crate) fn follow_ups(p: &TaskPackage, r: &TaskRecord, cluster: &str, next: &mut Next) {
    let is_hook = matches!(p.flow, Some(Flow::Hook { .. }));
    if let (Some(hook), false) = (&p.options.hook, is_hook) {
        let finished = Finished {
            id: p.id,
            func: p.func.clone(),
            args: json(Some(&r.args)),
            result: json(r.result.as_deref()),
            success: r.success,
            attempts: r.attempts,
            group: p.options.group.clone(),
        };
        let args = serde_json::to_vec(&finished).unwrap_or_else(|_| b"null".to_vec());
        let mut h = TaskPackage::new(hook.clone(), args);
        h.id = hook_id(p.id);
        h.options.priority = p.options.priority;
        h.flow = Some(Flow::Hook { parent: p.id });
        next.packages.push(h);
    }
    match &p.flow {
        Some(Flow::Chain(c)) => {
            let index = c.index as usize;
            let following = c.links.get(index + 1);
            match following {
                Some(link) if r.success => {
                    let mut results = c.results.clone();
                    results.push(r.result.clone().unwrap_or_else(|| "null".into()));
                    let mut n = TaskPackage::new(link.func.clone(), link.args.clone());
                    n.id = link.id;
                    n.options = link.options.clone();
                    n.flow = Some(Flow::Chain(ChainFlow {
                        chain: c.chain,
                        index: c.index + 1,
                        links: c.links.clone(),
                        results,
                    }));
                    next.packages.push(n);
                }
                _ => next.rows.push(chain_row(c, r, cluster)),
            }
        }
        Some(Flow::Item(item)) => next.iter(IterCheck {
            item: *item,
            func: p.func.clone(),
            name: p.options.name.clone(),
            group: p.options.group.clone(),
        }),
        Some(Flow::Hook { .. }) | None => {}
    }
}

/// The row that ends a chain: `r` is the result of its last link, or of the link that failed.
fn chain_row(c: &ChainFlow, r: &TaskRecord, cluster: &str) -> TaskRecord {
    let index = c.index as usize;
    let links: Vec<serde_json::Value> = c
        .links
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let (state, success, result) = if i < index {
                (
                    "success",
                    Some(true),
                    json(c.results.get(i).map(String::as_str)),
                )
            } else if i == index {
                (
                    if r.success { "success" } else { "failed" },
                    Some(r.success),
                    json(r.result.as_deref()),
                )
            } else {
                ("not run", None, serde_json::Value::Null)
            };
            serde_json::json!({
                "id": l.id.to_string(),
                "func": l.func,
                "state": state,
                "success": success,
                "result": result,
            })
        })
        .collect();
    let success = r.success && index + 1 >= c.links.len();
    let stopped_by = (!success).then(|| {
        serde_json::json!({
            "index": index,
            "id": r.id.to_string(),
            "func": r.func,
        })
    });
    let result = serde_json::json!({ "links": links, "stopped_by": stopped_by });
    let args: Vec<serde_json::Value> = c
        .links
        .iter()
        .map(|l| serde_json::json!({ "func": l.func, "args": json(std::str::from_utf8(&l.args).ok()) }))
        .collect();
    let made = made_at(c.chain);
    TaskRecord {
        id: c.chain,
        name: CHAIN_FUNC.into(),
        func: CHAIN_FUNC.into(),
        args: serde_json::Value::Array(args).to_string(),
        result: Some(result.to_string()),
        enqueued_us: made,
        started_us: made,
        stopped_us: r.stopped_us,
        success,
        done: true,
        attempts: (index + 1) as u32,
        group: None,
        cluster: cluster.to_owned(),
    }
}

/// Writes the row of every iterator in `checks` whose items are all done, unless it is there
/// already. The same row whoever writes it, so two clusters finishing the last items at once
/// both write the same thing.
pub(crate) async fn complete_iters(
    store: &Store,
    checks: &[IterCheck],
    cluster: &str,
) -> Result<(), Error> {
    for c in checks {
        let iter = c.item.iter;
        if store.get(iter).await?.is_some_and(|r| r.done) {
            // Complete already (a duplicate delivery, or a crash before the items were let go).
            store.release_items(iter).await?;
            continue;
        }
        let ids: Vec<TaskId> = (0..c.item.total).map(|i| item_id(iter, i)).collect();
        if store.done_count(&ids).await? < ids.len() as u64 {
            continue;
        }
        let records = store.get_many(&ids).await?;
        let by_id: HashMap<TaskId, &TaskRecord> = records.iter().map(|r| (r.id, r)).collect();
        let mut results = Vec::with_capacity(ids.len());
        let mut success = true;
        let mut stopped_us = 0;
        for id in &ids {
            let r = by_id.get(id);
            success &= r.is_some_and(|r| r.success);
            stopped_us = stopped_us.max(r.map_or(0, |r| r.stopped_us));
            results.push(json(r.and_then(|r| r.result.as_deref())));
        }
        let made = made_at(iter);
        let row = TaskRecord {
            id: iter,
            name: c.name.clone().unwrap_or_else(|| ITER_FUNC.into()),
            func: ITER_FUNC.into(),
            args: serde_json::json!({ "func": c.func, "items": c.item.total }).to_string(),
            result: Some(serde_json::Value::Array(results).to_string()),
            enqueued_us: made,
            started_us: made,
            stopped_us,
            success,
            done: true,
            attempts: 1,
            group: c.group.clone(),
            cluster: cluster.to_owned(),
        };
        store.save(std::slice::from_ref(&row)).await?;
        store.release_items(iter).await?;
        tracing::debug!("iterator {iter} complete: {} items", c.item.total);
    }
    Ok(())
}

/// The packages of a chain: the chain's id and its first link's package. Links without a group
/// get the chain's id as their group.
pub(crate) fn chain_packages(links: Vec<(String, Vec<u8>, TaskOptions)>) -> (TaskId, ChainFlow) {
    let chain = TaskId::new();
    let links = links
        .into_iter()
        .map(|(func, args, mut options)| {
            if options.group.is_none() {
                options.group = Some(chain.to_string());
            }
            broker_core::ChainLink {
                id: TaskId::new(),
                func,
                args,
                options,
            }
        })
        .collect();
    (
        chain,
        ChainFlow {
            chain,
            index: 0,
            links,
            results: Vec::new(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_are_stable_distinct_and_never_v7() {
        let parent = TaskId::new();
        assert_eq!(hook_id(parent), hook_id(parent));
        assert_ne!(hook_id(parent), item_id(parent, 0));
        assert_ne!(item_id(parent, 0), item_id(parent, 1));
        assert_eq!(hook_id(parent).0.get_version_num(), 8);
        assert_eq!(parent.0.get_version_num(), 7);
    }
}
