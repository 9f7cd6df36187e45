//! Connections: one Redis server through a reconnecting [`ConnectionManager`], or a Redis Cluster
//! through the `redis` crate's cluster client (which follows slot moves and reconnects). TLS
//! (`rediss://`) with an optional CA file and client certificate, in builds with the `tls`
//! feature.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use crate::RedisConfig;

/// A connection to a single server or to a cluster; cheap to clone (both multiplex).
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Why a connection could not be set up: a bad setting (named key) or the server.
pub(crate) enum ConnectError {
    Config(&'static str, String),
    Redis(redis::RedisError),
}

impl From<redis::RedisError> for ConnectError {
    fn from(e: redis::RedisError) -> Self {
        Self::Redis(e)
    }
}

/// Opens a connection whose every reply must come within `response`.
pub(crate) async fn open(config: &RedisConfig, response: Duration) -> Result<Conn, ConnectError> {
    let tls = config.url.starts_with("rediss://");
    if !tls && (config.ca_file.is_some() || config.cert_file.is_some()) {
        return Err(ConnectError::Config(
            "redis.ca_file",
            "CA and client certificates need a `rediss://` URL".into(),
        ));
    }
    if config.cert_file.is_some() != config.key_file.is_some() {
        return Err(ConnectError::Config(
            "redis.key_file",
            "a client certificate needs both `cert_file` and `key_file`".into(),
        ));
    }
    #[cfg(not(feature = "tls"))]
    if tls {
        return Err(ConnectError::Config(
            "redis.url",
            "`rediss://` (TLS) needs a build with the Cargo feature `tls` of broker-redis \
             (`redis-tls` of cluster)"
                .into(),
        ));
    }
    if config.cluster {
        let builder = ClusterClient::builder([config.url.as_str()])
            .connection_timeout(config.connect_timeout)
            .response_timeout(response)
            .retries(3);
        #[cfg(feature = "tls")]
        let builder = if tls {
            builder.certs(certificates(config)?)
        } else {
            builder
        };
        let client = builder.build().map_err(|e| {
            ConnectError::Config("redis.url", format!("not a cluster node URL: {e}"))
        })?;
        Ok(Conn::Cluster(client.get_async_connection().await?))
    } else {
        #[cfg(feature = "tls")]
        let client = if tls {
            redis::Client::build_with_tls(config.url.as_str(), certificates(config)?)
        } else {
            redis::Client::open(config.url.as_str())
        };
        #[cfg(not(feature = "tls"))]
        let client = redis::Client::open(config.url.as_str());
        let client = client.map_err(|e| ConnectError::Config("redis.url", e.to_string()))?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(response))
            .set_number_of_retries(2);
        Ok(Conn::Single(
            client.get_connection_manager_with_config(manager).await?,
        ))
    }
}

/// The CA and client certificate files, read now so that a wrong path is named at start.
#[cfg(feature = "tls")]
fn certificates(config: &RedisConfig) -> Result<redis::TlsCertificates, ConnectError> {
    let read = |key: &'static str, path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|e| ConnectError::Config(key, format!("cannot read {}: {e}", path.display())))
    };
    let root_cert = match &config.ca_file {
        Some(p) => Some(read("redis.ca_file", p)?),
        None => None,
    };
    let client_tls = match (&config.cert_file, &config.key_file) {
        (Some(c), Some(k)) => Some(redis::ClientTlsConfig {
            client_cert: read("redis.cert_file", c)?,
            client_key: read("redis.key_file", k)?,
        }),
        _ => None,
    };
    Ok(redis::TlsCertificates {
        client_tls,
        root_cert,
    })
}
