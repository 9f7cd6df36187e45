//! The broker factory: `broker = "…"` in the config picks the adapter compiled into this binary.

use std::sync::Arc;

use broker_core::Broker;

use crate::config::Config;
use crate::error::{ConfigError, Error};

/// Broker names the configuration accepts, compiled in or not.
pub const KNOWN: &[&str] = &["orm", "redis", "sqs", "mongo", "disque", "amqp", "ironmq"];

/// The Cargo feature of `cluster` that compiles in broker `name`.
pub fn feature_of(name: &str) -> &'static str {
    match name {
        "orm" => "orm-sqlite, orm-postgres or orm-mysql",
        "redis" => "redis",
        "sqs" => "sqs",
        "mongo" => "mongo",
        "disque" => "disque",
        "amqp" => "amqp",
        "ironmq" => "ironmq",
        _ => "(none)",
    }
}

/// Connects the broker the configuration names, or says which feature is missing.
pub async fn from_config(config: &Config) -> Result<Arc<dyn Broker>, Error> {
    match config.broker.as_str() {
        #[cfg(any(
            feature = "orm-sqlite",
            feature = "orm-postgres",
            feature = "orm-mysql"
        ))]
        "orm" => {
            let orm = broker_orm::OrmConfig {
                url: config.orm.url.0.clone(),
                replica_url: config.orm.replica_url.as_ref().map(|u| u.0.clone()),
                pool_size: config.orm.pool_size,
                connect_timeout: config.orm.connect_timeout,
            };
            let b = broker_orm::OrmBroker::connect(&orm, config.queue_settings())
                .await
                .map_err(|e| rename_key(e, "orm."))?;
            Ok(Arc::new(b))
        }
        #[cfg(feature = "redis")]
        "redis" => {
            let redis = broker_redis::RedisConfig {
                url: config.redis.url.0.clone(),
                prefix: config.redis.prefix.clone(),
                reliable: config.redis.reliable,
                connect_timeout: config.redis.connect_timeout,
                cluster: config.redis.cluster,
                ca_file: config.redis.ca_file.clone(),
                cert_file: config.redis.cert_file.clone(),
                key_file: config.redis.key_file.clone(),
            };
            let b = broker_redis::RedisBroker::connect(&redis, config.queue_settings())
                .await
                .map_err(|e| rename_key(e, "redis."))?;
            Ok(Arc::new(b))
        }
        other => Err(ConfigError::new(
            "broker",
            format!(
                "broker `{other}` is not compiled into this binary; rebuild with \
                 `--features cluster/{}`",
                feature_of(other)
            ),
        )
        .into()),
    }
}

/// Broker config errors name the adapter's own key (`url`); the user wrote `orm.url`.
fn rename_key(e: broker_core::BrokerError, section: &str) -> Error {
    match e {
        broker_core::BrokerError::Config { key, message } => {
            let key = match key.as_str() {
                "url" | "replica_url" | "pool_size" | "connect_timeout" => {
                    format!("{section}{key}")
                }
                "queue" => "name".to_owned(),
                other => other.to_owned(),
            };
            ConfigError::new(&key, message).into()
        }
        other => other.into(),
    }
}
