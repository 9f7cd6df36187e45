//! The schedules of a cluster name, from any program: add, list, show, pause, resume, remove,
//! run now. The clusters fire them (see [`crate::scheduler`]).

use broker_core::{TaskId, now_us};

use super::Client;
use crate::error::Error;
use crate::schedule::when::{Plan, parse_time};
use crate::scheduler::{ScheduleOptions, package};
use crate::store::{BadRow, ScheduleRow, Store};

/// A schedule to add.
#[derive(Debug, Clone, Default)]
pub struct NewSchedule {
    /// Its name, unique per cluster name.
    pub name: String,
    /// The task to enqueue.
    pub func: String,
    /// The task's arguments, JSON.
    pub args: Vec<u8>,
    /// The task's options.
    pub options: ScheduleOptions,
    /// `once`, `minutes`, `hourly`, `daily`, `weekly`, `biweekly`, `monthly`, `bimonthly`,
    /// `quarterly`, `yearly` or `cron`.
    pub kind: String,
    /// The period of `minutes`.
    pub minutes: Option<u32>,
    /// The expression of `cron` (5 fields, or 6 with seconds first).
    pub cron: Option<String>,
    /// IANA time zone of the calendar kinds and cron; UTC when none.
    pub tz: Option<String>,
    /// The first slot (µs since the epoch); none: now (the next cron time for `cron`).
    pub next_run: Option<i64>,
    /// Runs: -1 forever, N that many.
    pub repeats: i64,
}

impl NewSchedule {
    /// `func` with JSON `args`, `kind` (every other field default; `repeats` -1).
    pub fn new(name: &str, func: &str, args: impl Into<Vec<u8>>, kind: &str) -> Self {
        Self {
            name: name.to_owned(),
            func: func.to_owned(),
            args: args.into(),
            kind: kind.to_owned(),
            repeats: -1,
            ..Self::default()
        }
    }
}

/// Reads a time for `--next-run`: RFC 3339, `YYYY-MM-DD HH:MM[:SS]` in `tz`, `now`, `+10m`.
pub fn read_time(name: &str, text: &str, tz: Option<&str>) -> Result<i64, Error> {
    parse_time(text, tz, now_us()).map_err(|e| Error::Schedule {
        name: name.to_owned(),
        message: e.to_string(),
    })
}

impl Client {
    fn schedule_home(&self) -> Result<(&Store, &str), Error> {
        let store = self.need_store()?;
        let name = self.name.as_deref().ok_or_else(|| Error::Schedule {
            name: String::new(),
            message: "this client has no cluster name (Client::with_name)".into(),
        })?;
        Ok((store, name))
    }

    /// Adds a schedule; refuses a bad timing, time zone, task or name (naming what is wrong)
    /// and a name already taken.
    pub async fn add_schedule(&self, s: NewSchedule) -> Result<ScheduleRow, Error> {
        let (store, cluster) = self.schedule_home()?;
        let bad = |message: String| Error::Schedule {
            name: s.name.clone(),
            message,
        };
        if s.name.trim().is_empty() || s.name.len() > 191 || s.name.contains('\0') {
            return Err(bad("a name is 1 to 191 bytes, without NUL".into()));
        }
        if s.repeats == 0 || s.repeats < -1 {
            return Err(bad("repeats is -1 (forever) or a count of runs".into()));
        }
        let plan = Plan::parse(&s.kind, s.minutes, s.cron.as_deref(), s.tz.as_deref())
            .map_err(|e| bad(e.to_string()))?;
        if let Some(r) = &self.registry {
            r.check(&s.func, &s.args)?;
            if let Some(h) = &s.options.hook
                && !r.contains(h)
            {
                return Err(bad(format!("hook: unknown task `{h}`")));
            }
        }
        let now = now_us();
        let first = match (s.next_run, plan.kind()) {
            (Some(t), _) => t,
            (None, "cron") => plan
                .next_after(now, now)
                .ok_or_else(|| bad("the cron expression never fires".into()))?,
            (None, _) => now,
        };
        let row = ScheduleRow {
            id: TaskId::new().to_string(),
            cluster: cluster.to_owned(),
            name: s.name.clone(),
            func: s.func.clone(),
            args: String::from_utf8(s.args.clone())
                .map_err(|_| bad("args are not UTF-8 JSON".into()))?,
            options: serde_json::to_string(&s.options).map_err(|e| bad(format!("options: {e}")))?,
            kind: plan.kind().to_owned(),
            minutes: plan.minutes().map(i64::from),
            cron: plan.cron().map(str::to_owned),
            tz: s.tz.clone(),
            repeats: if plan.kind() == "once" { 1 } else { s.repeats },
            anchor: first,
            next_run: Some(first),
            last_run: None,
            last_task: None,
            pending: None,
            pending_since: None,
            enabled: true,
            created: now,
            updated: now,
        };
        if !(0..=crate::schedule::when::MAX_US).contains(&first) {
            return Err(bad("the first run is before 1970 or after 9999".into()));
        }
        // The whole package is checked (arguments JSON, options, size) before it is stored: a
        // schedule whose task cannot be sent would only fail at every slot.
        let p = package(&row, TaskId::new()).map_err(bad)?;
        let m = crate::flow::message(&self.codec, &p).map_err(|e| bad(e.to_string()))?;
        let limit = self.broker.capabilities().max_message_size;
        if m.payload.len() > limit {
            return Err(bad(format!(
                "its task's package is {} bytes, over the broker's limit of {limit} bytes",
                m.payload.len()
            )));
        }
        if !store.add_schedule(&row).await? {
            return Err(bad(format!(
                "exists already for cluster `{cluster}` (remove it first)"
            )));
        }
        Ok(row)
    }

    /// Every schedule of this cluster name, by name (unreadable rows as [`BadRow`]).
    pub async fn schedules(&self) -> Result<Vec<Result<ScheduleRow, BadRow>>, Error> {
        let (store, cluster) = self.schedule_home()?;
        store.schedules(cluster).await
    }

    /// The schedule `name`.
    pub async fn schedule(&self, name: &str) -> Result<Option<ScheduleRow>, Error> {
        let (store, cluster) = self.schedule_home()?;
        store.schedule(cluster, name).await
    }

    fn missing(name: &str) -> Error {
        Error::Schedule {
            name: name.to_owned(),
            message: "no such schedule".into(),
        }
    }

    /// Pauses `name`: its slots are skipped until it is resumed.
    pub async fn pause_schedule(&self, name: &str) -> Result<(), Error> {
        let (store, cluster) = self.schedule_home()?;
        if !store
            .set_schedule_enabled(cluster, name, false, now_us())
            .await?
        {
            return Err(Self::missing(name));
        }
        Ok(())
    }

    /// Resumes `name`: slots that fell in the pause are skipped, the next one after now fires.
    pub async fn resume_schedule(&self, name: &str) -> Result<(), Error> {
        let (store, cluster) = self.schedule_home()?;
        let s = store
            .schedule(cluster, name)
            .await?
            .ok_or_else(|| Self::missing(name))?;
        let now = now_us();
        if let Some(next) = s.next_run
            && next < now
            && s.kind != "once"
            && let Ok(plan) = crate::scheduler::plan(&s)
        {
            store
                .set_next_run(&s.id, next, plan.next_after(s.anchor, now))
                .await?;
        }
        if !store.set_schedule_enabled(cluster, name, true, now).await? {
            return Err(Self::missing(name));
        }
        Ok(())
    }

    /// Removes `name`.
    pub async fn remove_schedule(&self, name: &str) -> Result<(), Error> {
        let (store, cluster) = self.schedule_home()?;
        if !store.remove_schedule(cluster, name).await? {
            return Err(Self::missing(name));
        }
        Ok(())
    }

    /// Enqueues one extra run of `name` now (its slots are unchanged); returns the task id.
    pub async fn run_schedule(&self, name: &str) -> Result<TaskId, Error> {
        let (store, cluster) = self.schedule_home()?;
        let s = store
            .schedule(cluster, name)
            .await?
            .ok_or_else(|| Self::missing(name))?;
        let p = package(&s, TaskId::new()).map_err(|message| Error::Schedule {
            name: name.to_owned(),
            message,
        })?;
        let m = crate::flow::message(&self.codec, &p)?;
        self.broker.enqueue(m).await?;
        Ok(p.id)
    }
}
