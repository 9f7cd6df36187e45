//! The producer side: enqueue tasks and read their results from any program, no cluster needed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use broker_core::{Broker, Codec, Message, TaskId, TaskOptions, TaskPackage};

use crate::config::Config;
use crate::error::Error;
use crate::store::{Store, TaskRecord};
use crate::task::{Registry, Task};

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
        let mut c = Self::new(broker, codec).with_store(store);
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
        }
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
        if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&t.args) {
            return Err(Error::Args {
                func: t.func,
                message: format!("not JSON: {e}"),
            });
        }
        if let Some(r) = &self.registry {
            r.check(&t.func, &t.args)?;
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

    /// `sync = true`: runs each task here and now and saves its result.
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
        let mut records = Vec::new();
        for (p, _) in packed {
            ids.push(p.id);
            let timeout = crate::task::effective_timeout(p.options.timeout, config.timeout);
            let ran = crate::job::execute(&registry, &p, 1, timeout).await;
            let mut r = crate::job::record(&p, &ran, 1, &config.name);
            r.done = true; // sync mode does not retry
            records.push(r);
        }
        if let Some(s) = &self.store {
            s.save(&records).await?;
        }
        Ok(ids)
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
}
