//! `qcluster dead …` (and `qcluster quarantine`, the same as `dead list`): thin calls of
//! [`crate::dead`].

use broker_core::{Codec, DeadLetter, MessageId};
use clap::{ArgGroup, Args, Subcommand};

use super::{Fail, Out, Res, print_json};
use crate::broker::Brokers;
use crate::client::codec_from;
use crate::config::Config;
use crate::dead::{self, Requeue};
use crate::store::rfc3339;

#[derive(Debug, Subcommand)]
pub(super) enum DeadCmd {
    /// List dead letters (quarantined or given-up packages), oldest first.
    List(ListArgs),
    /// Verify a dead letter (or every one) and put it back in the queue as a fresh package;
    /// one that does not verify is refused and stays.
    Requeue(Target),
    /// Delete a dead letter (or every one) for good.
    Delete(Target),
}

#[derive(Debug, Args)]
pub(super) struct ListArgs {
    /// Most entries shown.
    #[arg(long, default_value_t = 100)]
    pub(super) limit: usize,
    #[command(flatten)]
    pub(super) out: Out,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("which").required(true).args(["id", "all"])))]
pub(super) struct Target {
    /// The dead letter's id, as `dead list` shows it.
    id: Option<String>,
    /// Every dead letter of the queue.
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    out: Out,
}

pub(super) async fn run(config: &Config, brokers: &Brokers, cmd: DeadCmd) -> Res {
    match cmd {
        DeadCmd::List(a) => list(config, brokers, a).await,
        DeadCmd::Requeue(t) => requeue(config, brokers, t).await,
        DeadCmd::Delete(t) => delete(config, brokers, t).await,
    }
}

/// `dead list`, and `quarantine`.
pub(super) async fn list(config: &Config, brokers: &Brokers, a: ListArgs) -> Res {
    let broker = brokers.connect(config).await?;
    let dead = dead::list(&*broker, a.limit).await?;
    // The task's name where the package decodes; listing works without a secret too.
    let codec = codec_from(config).ok();
    let func = |d: &DeadLetter| -> Option<String> {
        codec
            .as_ref()
            .and_then(|c: &Codec| c.decode(&d.payload).ok())
            .map(|p| p.func)
    };
    if a.out.json {
        let rows: Vec<serde_json::Value> = dead
            .iter()
            .map(|d| {
                serde_json::json!({
                    "message_id": d.message_id.to_string(),
                    "reason": d.reason,
                    "bytes": d.payload.len(),
                    "deliveries": d.deliveries,
                    "at": rfc3339(d.dead_at_us),
                    "func": func(d),
                })
            })
            .collect();
        print_json(&serde_json::Value::Array(rows));
    } else if dead.is_empty() {
        println!("no dead letters in queue `{}`", config.name);
    } else {
        for d in &dead {
            println!(
                "{}  {}  {}  {}",
                rfc3339(d.dead_at_us),
                d.message_id,
                func(d).unwrap_or_else(|| "-".into()),
                d.reason
            );
        }
    }
    Ok(())
}

async fn requeue(config: &Config, brokers: &Brokers, t: Target) -> Res {
    let codec = codec_from(config)?;
    let broker = brokers.connect(config).await?;
    let Some(id) = t.id.filter(|_| !t.all) else {
        let (n, refused) = dead::requeue_all(&*broker, &codec).await?;
        if t.out.json {
            let refused: Vec<serde_json::Value> = refused
                .iter()
                .map(|(id, why)| serde_json::json!({ "message_id": id.to_string(), "reason": why }))
                .collect();
            print_json(&serde_json::json!({ "requeued": n, "refused": refused }));
        } else {
            println!("requeued {n} dead letters from queue `{}`", config.name);
            for (id, why) in &refused {
                println!("refused {id}: {why}");
            }
        }
        if refused.is_empty() {
            return Ok(());
        }
        return Err(Fail::runtime(format!(
            "{} dead letters refused (they do not verify) and kept",
            refused.len()
        )));
    };
    let id = MessageId(id);
    let outcome = dead::requeue(&*broker, &codec, &id).await?;
    if t.out.json {
        let (status, reason) = match &outcome {
            Requeue::Done => ("requeued", None),
            Requeue::Missing => ("missing", None),
            Requeue::Refused(why) => ("refused", Some(why.as_str())),
        };
        print_json(&serde_json::json!({
            "message_id": id.to_string(),
            "status": status,
            "reason": reason,
        }));
    }
    match outcome {
        Requeue::Done => {
            if !t.out.json {
                println!("requeued {id}");
            }
            Ok(())
        }
        Requeue::Missing => Err(missing(config, &id)),
        Requeue::Refused(why) => Err(Fail::runtime(format!(
            "dead letter {id} refused, kept in the dead letters: {why}"
        ))),
    }
}

async fn delete(config: &Config, brokers: &Brokers, t: Target) -> Res {
    let broker = brokers.connect(config).await?;
    let Some(id) = t.id.filter(|_| !t.all) else {
        let n = dead::delete_all(&*broker).await?;
        if t.out.json {
            print_json(&serde_json::json!({ "deleted": n }));
        } else {
            println!("deleted {n} dead letters from queue `{}`", config.name);
        }
        return Ok(());
    };
    let id = MessageId(id);
    let deleted = dead::delete(&*broker, &id).await?;
    if t.out.json {
        print_json(&serde_json::json!({ "message_id": id.to_string(), "deleted": deleted }));
    } else if deleted {
        println!("deleted {id}");
    }
    if deleted {
        Ok(())
    } else {
        Err(missing(config, &id))
    }
}

fn missing(config: &Config, id: &MessageId) -> Fail {
    Fail::runtime(format!("no dead letter {id} in queue `{}`", config.name))
}
