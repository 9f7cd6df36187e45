//! The broker registry: `broker = "<name>"` picks a factory registered under that name.
//!
//! A factory is a function `(Config, QueueSettings) -> Future<Result<B, BrokerError>>` where
//! `Config` is the adapter's own serde type: the registry reads it from the section `[<name>]`
//! (file, then `QCLUSTER_<NAME>__*`, then `--set <name>.key=…`, the same precedence as every
//! key), refuses unknown keys with the closest key suggested, and reports every failure with the
//! key as the user wrote it. The adapters compiled into this binary register themselves
//! ([`Brokers::builtin`]); a program adds its own with [`Brokers::register`] or
//! [`crate::App::broker`], exactly like tasks:
//!
//! ```no_run
//! # use broker_core::{BrokerError, QueueSettings};
//! # use broker_memory::{MemoryBroker as NatsBroker, MemoryConfig as NatsConfig};
//! async fn connect(c: NatsConfig, s: QueueSettings) -> Result<NatsBroker, BrokerError> {
//!     NatsBroker::connect(c, s).await
//! }
//! let mut brokers = cluster::Brokers::builtin();
//! brokers.register("nats", connect); // `broker = "nats"`, section `[nats]`
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use broker_core::{Broker, BrokerError, QueueSettings};
use figment::Figment;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::{Config, known_error};
use crate::error::{ConfigError, Error};

/// The adapters this project ships, compiled in or not, with the Cargo feature of `cluster`
/// that compiles each in.
pub const KNOWN: &[(&str, &str)] = &[
    ("orm", "orm-sqlite, orm-postgres or orm-mysql"),
    ("redis", "redis"),
    ("memory", "(always built in)"),
    ("sqs", "sqs"),
    ("mongo", "mongo"),
    ("disque", "disque"),
    ("amqp", "amqp"),
    ("ironmq", "ironmq"),
];

/// The Cargo feature of `cluster` that compiles in broker `name`, if it is one of ours.
pub fn feature_of(name: &str) -> Option<&'static str> {
    KNOWN.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

/// What a factory returns.
pub type BrokerFuture = Pin<Box<dyn Future<Output = Result<Arc<dyn Broker>, BrokerError>> + Send>>;

/// One broker's raw configuration section, `[<name>]`, with where its values came from.
#[derive(Clone)]
pub struct Section {
    name: String,
    figment: Figment,
}

impl fmt::Debug for Section {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the values: they may hold passwords.
        f.debug_struct("Section")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Section {
    /// The section of broker `name` in `config` (empty when the configuration has none).
    pub fn of(config: &Config, name: &str) -> Result<Self, ConfigError> {
        let origin = config.origin();
        if let Some(v) = config.section_value(name)
            && v.as_dict().is_none()
        {
            return Err(ConfigError::new(
                name,
                format!(
                    "has the wrong type or form (value not shown){}: a section of keys is expected",
                    crate::config::from_source(origin.as_deref(), name)
                ),
            ));
        }
        let figment = match origin {
            Some(f) => f.focus(name),
            None => match config.section_value(name).and_then(|v| v.as_dict()) {
                Some(d) => Figment::from(crate::config::Named {
                    name: crate::config::SOURCE_CODE,
                    dict: d.clone(),
                }),
                None => Figment::new(),
            },
        };
        Ok(Self {
            name: name.to_owned(),
            figment,
        })
    }

    /// The section's name (the broker's registered name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads the section into the adapter's config type. Unknown keys are refused with the
    /// closest known key suggested; every error names `<name>.<key>` and where it came from.
    pub fn parse<C: DeserializeOwned>(&self) -> Result<C, ConfigError> {
        self.figment
            .extract::<C>()
            .map_err(|e| known_error(e, Some(&self.name)))
    }
}

type Connect = Arc<dyn Fn(Section, QueueSettings) -> BrokerFuture + Send + Sync>;
type Describe = Arc<dyn Fn(&Section) -> Result<serde_json::Value, ConfigError> + Send + Sync>;

#[derive(Clone)]
struct Factory {
    connect: Connect,
    describe: Describe,
}

/// Broker factories by name, the way [`crate::Registry`] holds tasks.
#[derive(Clone, Default)]
pub struct Brokers {
    factories: BTreeMap<String, Factory>,
}

impl fmt::Debug for Brokers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.factories.keys()).finish()
    }
}

impl Brokers {
    /// No broker at all.
    pub fn new() -> Self {
        Self::default()
    }

    /// The adapters compiled into this binary: `memory` always, `orm`, `redis`, `sqs`, `mongo`,
    /// `amqp`, `disque` and `ironmq` per feature.
    pub fn builtin() -> Self {
        let mut b = Self::new();
        b.register(
            "memory",
            |c: broker_memory::MemoryConfig, s: QueueSettings| {
                broker_memory::MemoryBroker::connect(c, s)
            },
        );
        #[cfg(any(
            feature = "orm-sqlite",
            feature = "orm-postgres",
            feature = "orm-mysql"
        ))]
        b.register(
            "orm",
            |c: broker_orm::OrmConfig, s: QueueSettings| async move {
                broker_orm::OrmBroker::connect(&c, s).await
            },
        );
        #[cfg(feature = "redis")]
        b.register(
            "redis",
            |c: broker_redis::RedisConfig, s: QueueSettings| async move {
                broker_redis::RedisBroker::connect(&c, s).await
            },
        );
        #[cfg(feature = "sqs")]
        b.register(
            "sqs",
            |c: broker_sqs::SqsConfig, s: QueueSettings| async move {
                broker_sqs::SqsBroker::connect(&c, s).await
            },
        );
        #[cfg(feature = "mongo")]
        b.register(
            "mongo",
            |c: broker_mongo::MongoConfig, s: QueueSettings| async move {
                broker_mongo::MongoBroker::connect(&c, s).await
            },
        );
        #[cfg(feature = "amqp")]
        b.register(
            "amqp",
            |c: broker_amqp::AmqpConfig, s: QueueSettings| async move {
                broker_amqp::AmqpBroker::connect(&c, s).await
            },
        );
        #[cfg(feature = "disque")]
        b.register(
            "disque",
            |c: broker_disque::DisqueConfig, s: QueueSettings| async move {
                broker_disque::DisqueBroker::connect(&c, s).await
            },
        );
        #[cfg(feature = "ironmq")]
        b.register(
            "ironmq",
            |c: broker_ironmq::IronMqConfig, s: QueueSettings| async move {
                broker_ironmq::IronMqBroker::connect(&c, s).await
            },
        );
        b
    }

    /// Registers (or replaces) the broker `name`: `connect` gets the section `[<name>]` read
    /// into `C` (the adapter's own config type: serde, `deny_unknown_fields` and `default`
    /// recommended) and the queue settings of the cluster.
    ///
    /// # Panics
    ///
    /// When `name` cannot name a section: it must be lower-case ASCII letters, digits and `_`
    /// (environment variables are read lower-cased), and not a key of the cluster itself
    /// (`store`, `workers`…). A programming error, caught the first time the program starts.
    pub fn register<C, F, Fut, B>(&mut self, name: &str, connect: F) -> &mut Self
    where
        C: DeserializeOwned + Serialize + Send + 'static,
        F: Fn(C, QueueSettings) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<B, BrokerError>> + Send + 'static,
        B: Broker + 'static,
    {
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
            && !crate::config::is_cluster_key(name);
        assert!(
            valid,
            "broker name `{name}` cannot name a config section: use lower-case letters, digits \
             and `_`, and no key of the cluster itself"
        );
        let connect = Arc::new(connect);
        let factory = Factory {
            connect: Arc::new(move |section: Section, settings: QueueSettings| {
                let connect = connect.clone();
                Box::pin(async move {
                    let config: C = section.parse().map_err(|e| BrokerError::Config {
                        key: e.key,
                        message: e.message,
                    })?;
                    let b = connect(config, settings).await?;
                    Ok(Arc::new(b) as Arc<dyn Broker>)
                }) as BrokerFuture
            }),
            describe: Arc::new(|section: &Section| {
                let c: C = section.parse()?;
                serde_json::to_value(&c)
                    .map_err(|e| ConfigError::new(section.name(), e.to_string()))
            }),
        };
        self.factories.insert(name.to_owned(), factory);
        self
    }

    /// True when `name` is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.factories.contains_key(name)
    }

    /// The registered names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.factories.keys().map(String::as_str)
    }

    /// Checks `broker = "<name>"`: registered, else the error names the registered brokers and,
    /// for one of our adapters not compiled in, its Cargo feature.
    pub fn check_name(&self, name: &str) -> Result<(), ConfigError> {
        if self.contains(name) {
            return Ok(());
        }
        let registered = self.names().collect::<Vec<_>>().join(", ");
        Err(ConfigError::new(
            "broker",
            match feature_of(name) {
                Some(feature) => format!(
                    "broker `{name}` is not compiled into this binary; rebuild with \
                     `--features cluster/{feature}` (registered here: {registered})"
                ),
                None => format!("unknown broker `{name}`; registered here: {registered}"),
            },
        ))
    }

    /// Reads a registered broker's section into its config type and back to JSON: the
    /// effective values, defaults included, for `qcluster config`. Checks it on the way.
    pub fn describe(&self, config: &Config, name: &str) -> Result<serde_json::Value, ConfigError> {
        let section = Section::of(config, name)?;
        match self.factories.get(name) {
            Some(f) => (f.describe)(&section),
            None => Err(self.check_name(name).err().unwrap_or_else(|| {
                ConfigError::new("broker", format!("broker `{name}` is not registered"))
            })),
        }
    }

    /// Connects the broker `config` names, with its section and the cluster's queue settings.
    pub async fn connect(&self, config: &Config) -> Result<Arc<dyn Broker>, Error> {
        let name = config.broker.as_str();
        self.check_name(name)?;
        let section = Section::of(config, name)?;
        let factory = self.factories.get(name).ok_or_else(|| {
            ConfigError::new("broker", format!("broker `{name}` is not registered"))
        })?;
        (factory.connect)(section, config.queue_settings())
            .await
            .map_err(|e| rename_key(e, name))
    }
}

/// Adapter config errors that name a bare key (`url`) get their section (`orm.url`); the
/// queue is the cluster's `name`.
fn rename_key(e: BrokerError, section: &str) -> Error {
    match e {
        BrokerError::Config { key, message } => {
            let key = if key == "queue" {
                "name".to_owned()
            } else if key.contains('.') || crate::config::is_cluster_key(&key) {
                key
            } else {
                format!("{section}.{key}")
            };
            ConfigError::new(&key, message).into()
        }
        other => other.into(),
    }
}
