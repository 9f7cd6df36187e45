//! What the benches of this crate share: reading their environment and command line, and a
//! cluster running in-process.
// Each bench uses part of this module.
#![allow(dead_code)]

/// Runs `bench` on a runtime of 2 worker threads (the machine's cores).
pub fn block_on<F: std::future::Future>(bench: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(bench)
}

/// A count from the environment variable `var`, else `default`.
pub fn count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The backends named on the command line (flags such as cargo's `--bench` skipped), else
/// `defaults`.
pub fn backends(defaults: &[&str]) -> Vec<String> {
    let named: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if named.is_empty() {
        defaults.iter().map(|d| (*d).to_owned()).collect()
    } else {
        named
    }
}

/// A cluster running in this process, as a `qcluster run` process would: its own broker
/// handle, the built-in tasks.
pub struct Running {
    /// Its counters (processed, failed, ...).
    pub counters: std::sync::Arc<cluster::sentinel::Counters>,
    stop: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<Result<cluster::sentinel::Summary, cluster::Error>>,
}

/// Starts a cluster on `cfg`, saving results to `store`.
pub async fn start(cfg: &cluster::Config, store: &cluster::Store) -> Result<Running, String> {
    let e = |e: cluster::Error| e.to_string();
    // A handle of its own, as a cluster process has (`memory` handles share the process's queue).
    let broker = cluster::Brokers::builtin().connect(cfg).await.map_err(e)?;
    let codec = cluster::client::codec_from(cfg).map_err(e)?;
    let c = cluster::Cluster::new(
        cfg.clone(),
        broker,
        store.clone(),
        codec,
        cluster::Registry::with_builtins(),
    );
    let counters = c.counters();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(c.run(async {
        let _ = stopped.await;
    }));
    Ok(Running {
        counters,
        stop,
        handle,
    })
}

impl Running {
    /// True when the cluster stopped by itself.
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Stops the cluster and waits for it.
    pub async fn stop(self) -> Result<(), String> {
        let _ = self.stop.send(());
        self.handle
            .await
            .map_err(|e| e.to_string())?
            .map(drop)
            .map_err(|e| e.to_string())
    }
}
