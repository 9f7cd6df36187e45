//! The producer side: enqueue tasks and read their results from any program, no cluster needed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use broker_core::{Broker, Codec, Flow, ItemFlow, Message, TaskId, TaskOptions, TaskPackage};

use crate::config::Config;
use crate::error::Error;
use crate::store::{Store, TaskRecord};
use crate::task::{Registry, Task};

mod schedules;
pub use schedules::{NewSchedule, read_time};

/// Per-task settings given at enqueue time.
#[derive(Debug, Clone, Default)]
pub struct EnqueueOptions {
    /// Timeout, attempts, group, hook, priority, name.
    pub options: TaskOptions,
    /// Run no earlier than this long from now.
    pub delay: Option<Duration>,
}

/// One task to enqueue by name.
#[derive(Debug, Clone)]
pub struct NewTask {
    /// Registered task name.
    pub func: String,
    /// Arguments as JSON text.
    pub args: Vec<u8>,
    /// Per-task settings.
    pub options: EnqueueOptions,
}

impl NewTask {
    /// `func` with JSON `args` and default options.
    pub fn new(func: impl Into<String>, args: impl Into<Vec<u8>>) -> Self {
        Self {
            func: func.into(),
            args: args.into(),
            options: EnqueueOptions::default(),
        }
    }
}

/// Enqueues tasks and reads results.
#[derive(Clone)]
pub struct Client {
    broker: Arc<dyn Broker>,
    codec: Arc<Codec>,
    store: Option<Store>,
    registry: Option<Arc<Registry>>,
    sync: Option<Arc<Config>>,
    /// The cluster name whose schedules this client manages.
    name: Option<String>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("broker", &self.broker)
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// The signing codec the configuration describes (needs the secret).
pub fn codec_from(config: &Config) -> Result<Codec, Error> {
    let secret = config.load_secret()?;
    Ok(Codec::new(secret.expose(), &config.name)?
        .with_compression(config.compress)
        .with_max_size(
            config
                .max_message_size
                .unwrap_or(crate::config::DEFAULT_MAX_MESSAGE_SIZE),
        ))
}

impl Client {
    /// A client on the configured broker (one of the built-in adapters) and result store.
    pub async fn connect(config: &Config) -> Result<Self, Error> {
        Self::connect_with(config, &crate::broker::Brokers::builtin()).await
    }

    /// A client on the configured broker, found in `brokers`, and the result store. With
    /// `sync = true` tasks run in the calling process at enqueue time and no broker server is
    /// contacted: the client holds an in-process memory broker instead.
    pub async fn connect_with(
        config: &Config,
        brokers: &crate::broker::Brokers,
    ) -> Result<Self, Error> {
        let broker = if config.sync {
            let b = broker_memory::MemoryBroker::connect(
                broker_memory::MemoryConfig::default(),
                config.queue_settings(),
            )
            .await?;
            Arc::new(b) as Arc<dyn Broker>
        } else {
            brokers.connect(config).await?
        };
        Self::with_broker(config, broker).await
    }

    /// A client on a ready broker, with the codec and the result store `config` describes.
    /// The broker should serve `config.queue_settings()` (the queue named `name`).
    pub async fn with_broker(config: &Config, broker: Arc<dyn Broker>) -> Result<Self, Error> {
        let codec = codec_from(config)?;
        let store = Store::connect(&config.store_url(), config.store.connect_timeout).await?;
        let mut c = Self::new(broker, codec)
            .with_store(store)
            .with_name(&config.name);
        if config.sync {
            c.sync = Some(Arc::new(config.clone()));
        }
        Ok(c)
    }

    /// A client on `broker`, signing with `codec`; add a store to read results.
    pub fn new(broker: Arc<dyn Broker>, codec: Codec) -> Self {
        Self {
            broker,
            codec: Arc::new(codec),
            store: None,
            registry: None,
            sync: None,
            name: None,
        }
    }

    /// Manages the schedules of cluster name `name` (set by [`Client::connect`] from the
    /// configuration).
    pub fn with_name(mut self, name: &str) -> Self {
        self.name = Some(name.to_owned());
        self
    }

    /// Reads results from `store`.
    pub fn with_store(mut self, store: Store) -> Self {
        self.store = Some(store);
        self
    }

    /// Checks task names and arguments against `registry` before enqueueing.
    pub fn with_registry(mut self, registry: Arc<Registry>) -> Self {
        self.registry = Some(registry);
        self
    }

    /// The broker this client sends to.
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    /// The codec packages are signed and verified with.
    pub fn codec(&self) -> &Codec {
        &self.codec
    }

    /// The result store, if one is attached.
    pub fn store(&self) -> Option<&Store> {
        self.store.as_ref()
    }

    /// Enqueues a typed task.
    pub async fn enqueue<T: Task>(&self, args: &T::Args) -> Result<TaskId, Error> {
        let json = serde_json::to_vec(args).map_err(|e| Error::Args {
            func: T::NAME.to_owned(),
            message: e.to_string(),
        })?;
        self.enqueue_json(T::NAME, json, EnqueueOptions::default())
            .await
    }

    /// Enqueues `func` with JSON `args`.
    pub async fn enqueue_json(
        &self,
        func: &str,
        args: impl Into<Vec<u8>>,
        options: EnqueueOptions,
    ) -> Result<TaskId, Error> {
        let ids = self
            .enqueue_many(vec![NewTask {
                func: func.to_owned(),
                args: args.into(),
                options,
            }])
            .await?;
        ids.into_iter()
            .next()
            .ok_or_else(|| Error::NotReady("broker returned no id".into()))
    }

    /// Checks and packs one task.
    fn package(&self, t: NewTask) -> Result<(TaskPackage, Message), Error> {
        self.package_as(t, None, None)
    }

    /// Checks and packs one task, under `id` (else a new one) and with `flow`.
    fn package_as(
        &self,
        t: NewTask,
        id: Option<TaskId>,
        flow: Option<Flow>,
    ) -> Result<(TaskPackage, Message), Error> {
        if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&t.args) {
            return Err(Error::Args {
                func: t.func,
                message: format!("not JSON: {e}"),
            });
        }
        if let Some(r) = &self.registry {
            r.check(&t.func, &t.args)?;
            check_hook(r, &t.func, t.options.options.hook.as_deref())?;
        }
        let long = |what: &str, v: &str| -> Result<(), Error> {
            if v.len() > 191 || v.contains('\0') {
                return Err(Error::Args {
                    func: t.func.chars().take(40).collect(),
                    message: format!("{what} must be at most 191 bytes, without NUL"),
                });
            }
            Ok(())
        };
        long("the task name", &t.func)?;
        if let Some(g) = &t.options.options.group {
            long("group", g)?;
        }
        if let Some(n) = &t.options.options.name {
            long("name", n)?;
        }
        let mut p = TaskPackage::new(t.func, t.args);
        p.options = t.options.options;
        if let Some(id) = id {
            p.id = id;
        }
        p.flow = flow;
        let mut m = Message::new(self.codec.encode(&p)?)
            .with_priority(p.options.priority)
            .with_key(p.id.to_string());
        if let Some(g) = &p.options.group {
            m = m.with_group(g.clone());
        }
        if let Some(d) = t.options.delay {
            m = m.with_delay(d);
        }
        Ok((p, m))
    }

    /// Enqueues many tasks, in batches the broker accepts; returns their ids in order. Every
    /// task is checked before any is sent.
    pub async fn enqueue_many(&self, tasks: Vec<NewTask>) -> Result<Vec<TaskId>, Error> {
        let mut packed = Vec::with_capacity(tasks.len());
        for t in tasks {
            packed.push(self.package(t)?);
        }
        self.send(packed).await
    }

    /// Sends packed tasks in batches the broker accepts (or runs them here with `sync`).
    async fn send(&self, packed: Vec<(TaskPackage, Message)>) -> Result<Vec<TaskId>, Error> {
        if let Some(config) = &self.sync {
            return self.run_inline(config, packed).await;
        }
        let batch = self.broker.capabilities().max_bulk.clamp(1, 1000);
        let mut ids = Vec::with_capacity(packed.len());
        let mut rest = packed.into_iter().peekable();
        while rest.peek().is_some() {
            let (ps, ms): (Vec<_>, Vec<_>) = rest.by_ref().take(batch).unzip();
            self.broker.enqueue_many(ms).await?;
            ids.extend(ps.iter().map(|p| p.id));
        }
        Ok(ids)
    }

    /// `sync = true`: runs each task here and now and saves its result; hooks, chain links and
    /// iterators follow at once, in this process.
    async fn run_inline(
        &self,
        config: &Config,
        packed: Vec<(TaskPackage, Message)>,
    ) -> Result<Vec<TaskId>, Error> {
        let registry = self
            .registry
            .clone()
            .unwrap_or_else(|| Arc::new(Registry::with_builtins()));
        let mut ids = Vec::new();
        let mut queue = std::collections::VecDeque::new();
        for (p, _) in packed {
            ids.push(p.id);
            queue.push_back(p);
        }
        let mut next = crate::flow::Next::default();
        while let Some(p) = queue.pop_front() {
            let timeout = crate::task::effective_timeout(p.options.timeout, config.timeout);
            let ran = crate::job::execute(&registry, &p, 1, timeout).await;
            let mut r = crate::job::record(&p, &ran, 1, &config.name);
            r.done = true; // sync mode does not retry
            if let Some(s) = &self.store {
                s.save(std::slice::from_ref(&r)).await?;
            }
            crate::flow::follow_ups(&p, &r, &config.name, &mut next);
            queue.extend(next.packages.drain(..));
        }
        if let Some(s) = &self.store {
            s.save(&next.rows).await?;
            crate::flow::complete_iters(s, &next.iters, &config.name).await?;
        }
        Ok(ids)
    }

    /// Enqueues a chain: the tasks run one after another, each once the one before it
    /// succeeded (a failing link is retried per its `max_attempts` first); a final failure stops
    /// the chain. Returns the chain's id: once the chain ends, its result row (func `chain`)
    /// lists every link's id, func, state and result, and which link stopped it. Links without
    /// a group get the chain's id as their group. A link's `delay` is not used (only the
    /// chain's first link could wait, and it does not either).
    pub async fn chain(&self, tasks: Vec<NewTask>) -> Result<TaskId, Error> {
        if tasks.is_empty() {
            return Err(Error::Args {
                func: crate::flow::CHAIN_FUNC.into(),
                message: "a chain needs at least one task".into(),
            });
        }
        if tasks.len() > u32::MAX as usize {
            return Err(Error::Args {
                func: crate::flow::CHAIN_FUNC.into(),
                message: "too many links".into(),
            });
        }
        let mut checked = Vec::with_capacity(tasks.len());
        for t in tasks {
            // Every link is checked now; only the first is sent.
            let (p, _) = self.package(t)?;
            checked.push((p.func, p.args, p.options));
        }
        let (chain, flow) = crate::flow::chain_packages(checked);
        let first = &flow.links[0];
        let task = NewTask {
            func: first.func.clone(),
            args: first.args.clone(),
            options: EnqueueOptions {
                options: first.options.clone(),
                delay: None,
            },
        };
        let id = first.id;
        let packed = self.package_as(task, Some(id), Some(Flow::Chain(flow)))?;
        self.send(vec![packed]).await?;
        Ok(chain)
    }

    /// Enqueues an iterator: `func` once per arguments in `args` (each JSON), as items with ids
    /// derived from the iterator's id and their place ([`crate::flow::item_id`]), in the group
    /// `options.options.group`, else the iterator's id. Once every item is done, one result row
    /// under the returned id (func `iter`) holds their results in input order (a failed item's
    /// entry is its failure message), a success when every item succeeded.
    pub async fn iter(
        &self,
        func: &str,
        args: Vec<Vec<u8>>,
        options: EnqueueOptions,
    ) -> Result<TaskId, Error> {
        if args.is_empty() {
            return Err(Error::Args {
                func: func.to_owned(),
                message: "an iterator needs at least one item".into(),
            });
        }
        let total = u32::try_from(args.len()).map_err(|_| Error::Args {
            func: func.to_owned(),
            message: "too many items".into(),
        })?;
        let iter = TaskId::new();
        // The items' rows are in the iterator's group (see `job::record`); a group given here
        // is the group of the iterator's own row.
        let mut packed = Vec::with_capacity(args.len());
        for (index, a) in (0u32..).zip(args) {
            let t = NewTask {
                func: func.to_owned(),
                args: a,
                options: options.clone(),
            };
            let item = ItemFlow { iter, index, total };
            packed.push(self.package_as(
                t,
                Some(crate::flow::item_id(iter, index)),
                Some(Flow::Item(item)),
            )?);
        }
        self.send(packed).await?;
        Ok(iter)
    }

    fn need_store(&self) -> Result<&Store, Error> {
        self.store.as_ref().ok_or_else(|| Error::Store {
            endpoint: "(none)".into(),
            message: "this client has no result store".into(),
            fault: crate::error::StoreFault::Store,
        })
    }

    /// The stored result of `id`, if there is one yet.
    pub async fn result(&self, id: TaskId) -> Result<Option<TaskRecord>, Error> {
        self.need_store()?.get(id).await
    }

    /// Waits up to `timeout` for the result of `id`. A failure that will be retried is not
    /// final: waiting goes on until the task succeeds, fails for good or time runs out (then the
    /// latest stored result, if any, is returned).
    pub async fn wait(&self, id: TaskId, timeout: Duration) -> Result<Option<TaskRecord>, Error> {
        let store = self.need_store()?;
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(5);
        loop {
            let r = store.get(id).await?;
            let done = r.as_ref().is_some_and(|r| r.done);
            if done || Instant::now() >= deadline {
                return Ok(r);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(pause.min(left)).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    /// Every stored result of `group`.
    pub async fn group_results(&self, group: &str) -> Result<Vec<TaskRecord>, Error> {
        self.need_store()?.group(group).await
    }

    /// The results (JSON) of `group`, oldest first: successes only, failures too (their
    /// message) with `failures`. With `count`, waits up to `wait` (not at all without it) until
    /// there are at least `count` of them; `wait` alone waits for one. Fewer are returned when
    /// time runs out.
    pub async fn result_group(
        &self,
        group: &str,
        failures: bool,
        wait: Option<Duration>,
        count: Option<usize>,
    ) -> Result<Vec<serde_json::Value>, Error> {
        let records = self.fetch_group(group, failures, wait, count).await?;
        Ok(records
            .iter()
            .map(|r| {
                r.result
                    .as_deref()
                    .and_then(|s| serde_json::from_str(s).ok())
                    .unwrap_or(serde_json::Value::Null)
            })
            .collect())
    }

    /// The stored results of `group` as records; `failures`, `wait` and `count` as for
    /// [`Client::result_group`].
    pub async fn fetch_group(
        &self,
        group: &str,
        failures: bool,
        wait: Option<Duration>,
        count: Option<usize>,
    ) -> Result<Vec<TaskRecord>, Error> {
        fetch_group(self.need_store()?, group, failures, wait, count).await
    }

    /// How many results `group` holds: successes, or (with `failures`) failures only.
    pub async fn count_group(&self, group: &str, failures: bool) -> Result<u64, Error> {
        self.need_store()?.group_count(group, Some(!failures)).await
    }

    /// Deletes every stored result of `group`; returns how many were deleted.
    pub async fn delete_group(&self, group: &str) -> Result<u64, Error> {
        self.need_store()?.delete_group(group).await
    }
}

/// [`Client::fetch_group`] on a store.
pub(crate) async fn fetch_group(
    store: &Store,
    group: &str,
    failures: bool,
    wait: Option<Duration>,
    count: Option<usize>,
) -> Result<Vec<TaskRecord>, Error> {
    let want = wanted(wait, count);
    let deadline = Instant::now() + wait.unwrap_or(Duration::ZERO);
    let mut pause = Duration::from_millis(10);
    let filter = (!failures).then_some(true);
    loop {
        // Counting is cheaper than reading every row while waiting.
        let have = store.group_count(group, filter).await?;
        if have >= want as u64 || Instant::now() >= deadline {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(pause.min(left)).await;
        pause = (pause * 2).min(Duration::from_millis(250));
    }
    store.group_filtered(group, failures).await
}

/// How many results a group read with `wait` and `count` waits for.
pub(crate) fn wanted(wait: Option<Duration>, count: Option<usize>) -> usize {
    match (wait, count) {
        (_, Some(n)) => n,
        (Some(_), None) => 1,
        (None, None) => 0,
    }
}

/// Refuses a hook that `registry` does not know.
pub(crate) fn check_hook(registry: &Registry, func: &str, hook: Option<&str>) -> Result<(), Error> {
    match hook {
        Some(h) if !registry.contains(h) => Err(Error::Args {
            func: func.to_owned(),
            message: format!("hook `{h}` is not a registered task"),
        }),
        _ => Ok(()),
    }
}
