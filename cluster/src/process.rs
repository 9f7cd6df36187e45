//! Process workers (`worker_mode = "process"`): each worker runs its tasks, one at a time, in a
//! child process of the same binary, so that a task can always be stopped by killing its process.
//!
//! ## The promise
//! - A task past its timeout is stopped for sure: at the deadline its process gets SIGTERM, and
//!   SIGKILL [`KILL_GRACE`] later if it is still there. The run is failed "timed out after …s
//!   (worker killed)" and retried per `max_attempts`; a new child takes the place.
//! - A child that dies on its own (abort, a signal, `exit`, the OOM killer) fails only the task it
//!   ran, "worker died: signal N (…)", retried per `max_attempts`: the package is settled like any
//!   failed run, never lost. A child found dead between tasks is replaced before it gets one.
//! - A child is replaced after `recycle` tasks, and after a task that left it above `max_rss` KiB.
//! - `cpu_affinity = N` pins child `k` to N of the CPUs this process may use, in rotation.
//! - With `daemonize_workers` (the default) a child gets SIGKILL when the cluster process dies
//!   (`PR_SET_PDEATHSIG`), so a `kill -9` of the cluster leaves no task running. Without it a
//!   child finishes its task, finds the channel closed, and exits.
//!
//! Pinning and dying with the parent use Linux system calls; elsewhere the mode works without
//! them. `PR_SET_PDEATHSIG` follows the thread that started the child: children are started by
//! the runtime's worker threads, which live as long as the cluster.
//!
//! ## How
//! A child is `current_exe() __qcluster-worker` with one end of a socket pair as fd 3, in a process
//! group of its own (a Ctrl-C in the terminal reaches only the cluster, which then shuts down
//! gracefully and lets running tasks finish). Frames on the socket are a 4-byte little-endian
//! length and a bincode message: the child says `Ready` once, the parent sends `Run { package,
//! attempt, timeout }`, the child answers `Done(ran)`. The child's stdout and stderr are the
//! cluster's, so task output and logs go where the cluster's go and never mix with the frames.
//!
//! The parent learns a child's resident memory from `/proc/<pid>/status` after every task (the
//! child is never asked). A program started through [`crate::App::main`] or [`crate::cli::main`]
//! serves the worker role by itself; one with its own `main` calls [`serve_if_worker`] first.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use broker_core::{TaskPackage, now_us};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::Config;
use crate::counters::{Counters, Reason};
use crate::job::{Ran, execute};
use crate::task::Registry;

/// The first argument that starts a binary in the worker role.
pub const WORKER_ARG: &str = "__qcluster-worker";
/// The child's end of the channel.
const CHANNEL_FD: RawFd = 3;
/// Between SIGTERM and SIGKILL for a task past its timeout.
pub const KILL_GRACE: Duration = Duration::from_secs(1);
/// Longest a new child may take to say it is ready.
const START_LIMIT: Duration = Duration::from_secs(20);
/// Largest frame either side accepts (a package, or a result).
const MAX_FRAME: usize = 1 << 30;

static IN_WORKER: AtomicBool = AtomicBool::new(false);

/// True inside a worker process (the built-in `crash` and `leak` refuse to run anywhere else).
pub fn in_worker() -> bool {
    IN_WORKER.load(Ordering::Relaxed)
}

/// Parent to child.
#[derive(Debug, Serialize, Deserialize)]
enum ToChild {
    Run {
        package: TaskPackage,
        attempt: u32,
        timeout_us: u64,
    },
}

/// Child to parent.
#[derive(Debug, Serialize, Deserialize)]
enum FromChild {
    Ready,
    Done(Ran),
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME>()
}

fn encode<T: Serialize>(message: &T) -> io::Result<Vec<u8>> {
    let body = bincode::serde::encode_to_vec(message, bincode_config())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    let len = u32::try_from(body.len())
        .ok()
        .filter(|&n| n as usize <= MAX_FRAME)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "frame over 1 GiB"))?;
    let mut frame = Vec::with_capacity(body.len() + 4);
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

fn decode<T: DeserializeOwned>(body: &[u8]) -> io::Result<T> {
    bincode::serde::decode_from_slice(body, bincode_config())
        .map(|(m, _)| m)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
}

fn frame_len(head: [u8; 4]) -> io::Result<usize> {
    let n = u32::from_le_bytes(head) as usize;
    if n > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {n} bytes announced"),
        ));
    }
    Ok(n)
}

/// Reads one frame; `None` at a clean end of the channel.
async fn read_frame<T: DeserializeOwned>(
    s: &mut (impl AsyncRead + Unpin),
) -> io::Result<Option<T>> {
    let mut head = [0u8; 4];
    match s.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let n = frame_len(head)?;
    // Grows with what arrives, not with what the length claims.
    let mut body = Vec::new();
    s.take(n as u64).read_to_end(&mut body).await?;
    if body.len() != n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    decode(&body).map(Some)
}

async fn write_frame<T: Serialize>(s: &mut (impl AsyncWrite + Unpin), m: &T) -> io::Result<()> {
    s.write_all(&encode(m)?).await?;
    s.flush().await
}

fn read_frame_blocking<T: DeserializeOwned>(s: &mut impl Read) -> io::Result<Option<T>> {
    let mut head = [0u8; 4];
    match s.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut body = vec![0u8; frame_len(head)?];
    s.read_exact(&mut body)?;
    decode(&body).map(Some)
}

fn write_frame_blocking<T: Serialize>(s: &mut impl Write, m: &T) -> io::Result<()> {
    s.write_all(&encode(m)?)?;
    s.flush()
}

/// Serves the worker role when this process was started as a cluster's worker process, and
/// returns its exit code; returns `None` (at once) otherwise. A program that runs a [`Cluster`]
/// in `worker_mode = "process"` from its own `main` calls this first, with the same tasks:
///
/// ```no_run
/// fn main() -> std::process::ExitCode {
///     let tasks = cluster::Registry::with_builtins();
///     if let Some(code) = cluster::process::serve_if_worker(&tasks) {
///         return code;
///     }
///     // … build the Config and the Cluster, and run it.
///     std::process::ExitCode::SUCCESS
/// }
/// ```
///
/// [`Cluster`]: crate::Cluster
pub fn serve_if_worker(registry: &Registry) -> Option<ExitCode> {
    if std::env::args_os().nth(1).as_deref() != Some(OsStr::new(WORKER_ARG)) {
        return None;
    }
    Some(serve(registry))
}

fn serve(registry: &Registry) -> ExitCode {
    IN_WORKER.store(true, Ordering::Relaxed);
    let filter = tracing_subscriber::EnvFilter::try_from_env("QCLUSTER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,sqlx=error"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(false)
        .try_init();
    // SAFETY: fstat only writes the zeroed struct it is given.
    let is_socket = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(CHANNEL_FD, &mut st) == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFSOCK
    };
    if !is_socket {
        eprintln!(
            "error: `{WORKER_ARG}` is the role a cluster starts its worker processes in \
             (worker_mode = \"process\"); it is not run by hand"
        );
        return ExitCode::from(crate::cli::EXIT_USAGE);
    }
    // Programs a task starts must not inherit the channel (they would keep it open after this
    // process died). SAFETY: fcntl on our own descriptor.
    unsafe { libc::fcntl(CHANNEL_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: fd 3 is a socket (checked above) that the cluster handed to this process alone.
    let mut channel = unsafe { std::os::unix::net::UnixStream::from_raw_fd(CHANNEL_FD) };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!(
                "error: worker process {}: no runtime: {e}",
                std::process::id()
            );
            return ExitCode::FAILURE;
        }
    };
    if write_frame_blocking(&mut channel, &FromChild::Ready).is_err() {
        return ExitCode::FAILURE;
    }
    let code = loop {
        match read_frame_blocking::<ToChild>(&mut channel) {
            // The cluster closed the channel: it stopped, or retired this process.
            Ok(None) => break ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("worker process {}: channel: {e}", std::process::id());
                break ExitCode::FAILURE;
            }
            Ok(Some(ToChild::Run {
                package,
                attempt,
                timeout_us,
            })) => {
                // The cluster kills this process at the timeout; the soft limit here is a
                // backstop only.
                let limit = Duration::from_micros(timeout_us) + KILL_GRACE * 4;
                let ran = rt.block_on(execute(registry, &package, attempt, limit));
                if let Err(e) = write_frame_blocking(&mut channel, &FromChild::Done(ran)) {
                    tracing::error!("worker process {}: channel: {e}", std::process::id());
                    break ExitCode::FAILURE;
                }
            }
        }
    };
    rt.shutdown_timeout(Duration::from_millis(100));
    code
}

/// One worker process as `info` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildStatus {
    /// The worker it serves (0-based).
    pub worker: usize,
    /// Its process id.
    pub pid: u32,
    /// Tasks it has run.
    pub tasks: u64,
    /// Resident memory, KiB (read when the status is published).
    pub rss_kib: u64,
    /// Running a task now.
    pub busy: bool,
    /// CPUs it is pinned to (`cpu_affinity`), empty when not pinned.
    #[serde(default)]
    pub cpus: Vec<usize>,
}

/// The worker processes of a cluster, for its status.
#[derive(Debug, Default)]
pub(crate) struct Children(Mutex<BTreeMap<usize, ChildStatus>>);

impl Children {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<usize, ChildStatus>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, s: ChildStatus) {
        self.lock().insert(s.worker, s);
    }

    fn remove(&self, worker: usize) {
        self.lock().remove(&worker);
    }

    /// Every live worker process, by worker, with its resident memory read now.
    pub fn snapshot(&self) -> Vec<ChildStatus> {
        let mut all: Vec<ChildStatus> = self.lock().values().cloned().collect();
        for c in &mut all {
            if let Some(rss) = rss_kib(c.pid) {
                c.rss_kib = rss;
            }
        }
        all
    }
}

/// The CPUs this process may run on (none known outside Linux: `cpu_affinity` pins nothing).
#[cfg(not(target_os = "linux"))]
fn allowed_cpus() -> Vec<usize> {
    Vec::new()
}

/// The CPUs this process may run on.
#[cfg(target_os = "linux")]
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: sched_getaffinity fills the zeroed set it is given; CPU_ISSET reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// The CPUs of worker `index` with `per_worker` CPUs each: consecutive, in rotation over
/// `allowed`, so that N workers of 1 CPU on N CPUs get one each.
fn cpus_for(index: usize, per_worker: usize, allowed: &[usize]) -> Vec<usize> {
    if per_worker == 0 || allowed.is_empty() {
        return Vec::new();
    }
    let n = per_worker.min(allowed.len());
    (0..n)
        .map(|j| allowed[(index * n + j) % allowed.len()])
        .collect()
}

/// What every process worker of one cluster shares.
#[derive(Debug)]
pub(crate) struct Pool {
    config: Arc<Config>,
    counters: Arc<Counters>,
    pub children: Arc<Children>,
    allowed: Vec<usize>,
}

impl Pool {
    pub fn new(config: Arc<Config>, counters: Arc<Counters>) -> Arc<Self> {
        let allowed = allowed_cpus();
        if config.cpu_affinity > allowed.len() && !allowed.is_empty() {
            tracing::warn!(
                "cpu_affinity = {} but this process may use {} CPUs: each worker process is \
                 pinned to all of them",
                config.cpu_affinity,
                allowed.len()
            );
        }
        Arc::new(Self {
            config,
            counters,
            children: Arc::default(),
            allowed,
        })
    }
}

/// A running child.
#[derive(Debug)]
struct Child {
    proc: tokio::process::Child,
    pid: u32,
    channel: tokio::net::UnixStream,
    tasks: u64,
    /// A run was sent and its answer not read: a child left like this (the run was abandoned)
    /// is killed before the next one.
    busy: bool,
}

/// One worker's child process, started on demand and replaced when it must be.
#[derive(Debug)]
pub(crate) struct ProcessWorker {
    index: usize,
    pool: Arc<Pool>,
    cpus: Vec<usize>,
    child: Option<Child>,
    /// The child is to be replaced (recycle, rss) before its next task: done in [`Self::ready`],
    /// so that a finished run's result is handed on at once.
    retire_for: Option<Reason>,
}

impl Drop for ProcessWorker {
    fn drop(&mut self) {
        // `kill_on_drop` kills the process; the status must not show it any longer.
        self.pool.children.remove(self.index);
    }
}

/// `signal 6 (SIGABRT)`, `exit status 3`.
fn describe(status: Option<ExitStatus>) -> String {
    match status {
        Some(s) => match (s.signal(), s.code()) {
            (Some(n), _) => {
                let name = match n {
                    libc::SIGABRT => " (SIGABRT)",
                    libc::SIGKILL => " (SIGKILL: killed, e.g. by the OOM killer)",
                    libc::SIGSEGV => " (SIGSEGV)",
                    libc::SIGBUS => " (SIGBUS)",
                    libc::SIGTERM => " (SIGTERM)",
                    libc::SIGILL => " (SIGILL)",
                    libc::SIGFPE => " (SIGFPE)",
                    _ => "",
                };
                format!("signal {n}{name}")
            }
            (None, Some(code)) => format!("exit status {code}"),
            (None, None) => "unknown status".to_owned(),
        },
        None => "status unknown".to_owned(),
    }
}

/// Resident memory of `pid` in KiB, from `/proc/<pid>/status`.
fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

impl ProcessWorker {
    pub fn new(index: usize, pool: Arc<Pool>) -> Self {
        let cpus = cpus_for(index, pool.config.cpu_affinity, &pool.allowed);
        Self {
            index,
            pool,
            cpus,
            child: None,
            retire_for: None,
        }
    }

    fn show(&self) {
        if let Some(c) = &self.child {
            self.pool.children.set(ChildStatus {
                worker: self.index,
                pid: c.pid,
                tasks: c.tasks,
                rss_kib: 0,
                busy: c.busy,
                cpus: self.cpus.clone(),
            });
        }
    }

    /// Makes sure a live, idle child is there: kills one whose run was abandoned, replaces one
    /// that died while idle, and starts one if there is none.
    pub async fn ready(&mut self) -> Result<(), String> {
        if let Some(reason) = self.retire_for.take() {
            self.retire(Some(reason)).await;
        }
        if let Some(c) = &mut self.child {
            if c.busy {
                tracing::warn!(
                    "worker process {} left running an abandoned task; replacing it",
                    c.pid
                );
                self.retire(None).await;
            } else if let Ok(Some(status)) = c.proc.try_wait() {
                let why = describe(Some(status));
                tracing::warn!("worker process {} died while idle ({why})", c.pid);
                self.child = None;
                self.pool.counters.reincarnated(Reason::Crash);
            }
        }
        if self.child.is_none() {
            self.child = Some(self.spawn().await?);
            self.show();
        }
        Ok(())
    }

    async fn spawn(&self) -> Result<Child, String> {
        let (mine, theirs) = std::os::unix::net::UnixStream::pair()
            .map_err(|e| format!("cannot make a channel for a worker process: {e}"))?;
        // `/proc/self/exe` is this very program even after its file was replaced (an upgrade in
        // place): children always speak the parent's protocol.
        let self_exe = std::path::Path::new("/proc/self/exe");
        let exe = if self_exe.exists() {
            self_exe.to_path_buf()
        } else {
            std::env::current_exe()
                .map_err(|e| format!("cannot find this program to start a worker process: {e}"))?
        };
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.arg(WORKER_ARG).stdin(Stdio::null()).kill_on_drop(true);
        // `ps` shows the program's name, not /proc/self/exe.
        if let Ok(name) = std::env::current_exe() {
            cmd.arg0(name);
        }
        let fd = theirs.as_raw_fd();
        let parent = std::process::id() as libc::pid_t;
        let die_with_parent = self.pool.config.daemonize_workers;
        #[cfg(not(target_os = "linux"))]
        let cpuset: Option<()> = None;
        #[cfg(target_os = "linux")]
        let cpuset = if self.cpus.is_empty() {
            None
        } else {
            // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes within it (every
            // index comes from sched_getaffinity, below CPU_SETSIZE).
            let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            for &c in &self.cpus {
                unsafe { libc::CPU_SET(c, &mut set) };
            }
            Some(set)
        };
        // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
        // system calls on values prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(fd, CHANNEL_FD) < 0 || libc::fcntl(CHANNEL_FD, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::setpgid(0, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                #[cfg(target_os = "linux")]
                if die_with_parent {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    // The parent died before the line above: nobody would kill this child.
                    if libc::getppid() != parent {
                        libc::_exit(1);
                    }
                }
                #[cfg(target_os = "linux")]
                if let Some(set) = &cpuset
                    && libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) < 0
                {
                    return Err(io::Error::last_os_error());
                }
                #[cfg(not(target_os = "linux"))]
                let _ = (die_with_parent, parent, &cpuset);
                Ok(())
            });
        }
        let mut proc = cmd.spawn().map_err(|e| {
            format!(
                "cannot start a worker process ({} {WORKER_ARG}): {e}",
                exe.display()
            )
        })?;
        drop(theirs);
        let pid = proc.id().unwrap_or(0);
        let channel = mine
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixStream::from_std(mine));
        let mut channel = match channel {
            Ok(c) => c,
            Err(e) => {
                let _ = proc.start_kill();
                return Err(format!("worker process channel: {e}"));
            }
        };
        let hello = tokio::time::timeout(START_LIMIT, read_frame::<FromChild>(&mut channel)).await;
        match hello {
            Ok(Ok(Some(FromChild::Ready))) => {
                tracing::debug!(
                    "worker process {pid} started for worker {}{}",
                    self.index,
                    if self.cpus.is_empty() {
                        String::new()
                    } else {
                        format!(" on CPUs {:?}", self.cpus)
                    }
                );
                Ok(Child {
                    proc,
                    pid,
                    channel,
                    tasks: 0,
                    busy: false,
                })
            }
            other => {
                let _ = proc.start_kill();
                let status = tokio::time::timeout(Duration::from_secs(2), proc.wait())
                    .await
                    .ok()
                    .and_then(Result::ok);
                let what = match other {
                    Err(_) => format!("no answer within {START_LIMIT:?}"),
                    Ok(Err(e)) => format!("channel: {e}"),
                    Ok(Ok(_)) => format!("it ended ({})", describe(status)),
                };
                Err(format!(
                    "worker process {pid} ({}) did not start as a worker: {what}. A program \
                     with its own main must call cluster::process::serve_if_worker first",
                    exe.display()
                ))
            }
        }
    }

    /// Kills the child at once if it still runs a task whose run was given up.
    pub async fn abandon(&mut self) {
        if self.child.as_ref().is_some_and(|c| c.busy) {
            if let Some(c) = &self.child {
                tracing::warn!("worker process {} killed: its task's lease was lost", c.pid);
            }
            self.retire(None).await;
        }
    }

    /// Stops the child (SIGTERM, then SIGKILL after the grace when `term` says so; else SIGKILL
    /// at once), reaps it, counts the replacement, and returns how it ended.
    async fn retire(&mut self, reason: Option<Reason>) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        self.pool.children.remove(self.index);
        let mut status = None;
        if matches!(
            reason,
            Some(Reason::Timeout | Reason::Recycle | Reason::Rss)
        ) {
            // The whole group: processes the task started go too. SAFETY: kill(2) on the group
            // our child leads; the child is not reaped yet (we hold it), so its id is not reused.
            unsafe { libc::kill(-(c.pid as libc::pid_t), libc::SIGTERM) };
            status = tokio::time::timeout(KILL_GRACE, c.proc.wait())
                .await
                .ok()
                .and_then(Result::ok);
        }
        if status.is_none() {
            // SAFETY: as above; the child itself gets SIGKILL from `start_kill` too.
            unsafe { libc::kill(-(c.pid as libc::pid_t), libc::SIGKILL) };
            let _ = c.proc.start_kill();
            status = tokio::time::timeout(Duration::from_secs(5), c.proc.wait())
                .await
                .ok()
                .and_then(Result::ok);
        }
        if let Some(r) = reason {
            self.pool.counters.reincarnated(r);
            tracing::info!(
                "worker process {} replaced ({}) after {} tasks",
                c.pid,
                r.as_str(),
                c.tasks
            );
        }
        status
    }

    /// Runs `package` in the child within `timeout`. `Err` means no child could take it (the
    /// task did not start: give the package back).
    pub async fn run(
        &mut self,
        package: &TaskPackage,
        attempt: u32,
        timeout: Duration,
    ) -> Result<Ran, String> {
        let request = ToChild::Run {
            package: package.clone(),
            attempt,
            timeout_us: u64::try_from(timeout.as_micros()).unwrap_or(u64::MAX),
        };
        // A child that died since its last task fails to take the request: replace it once.
        let mut sent = false;
        for _ in 0..2 {
            self.ready().await?;
            let Some(c) = self.child.as_mut() else {
                continue;
            };
            c.busy = true;
            match write_frame(&mut c.channel, &request).await {
                Ok(()) => {
                    sent = true;
                    break;
                }
                Err(e) => {
                    tracing::warn!("worker process {} did not take a task ({e})", c.pid);
                    c.busy = false;
                    self.retire(Some(Reason::Crash)).await;
                }
            }
        }
        if !sent {
            return Err("no worker process could take the task".into());
        }
        self.show();
        let started_us = now_us();
        let deadline = Instant::now() + timeout;
        let Some(c) = self.child.as_mut() else {
            return Err("worker process lost".into());
        };
        let answer = tokio::select! {
            r = read_frame::<FromChild>(&mut c.channel) => Some(r),
            _ = tokio::time::sleep_until(deadline.into()) => None,
        };
        let failed = |message: String| Ran {
            result: Err(message),
            permanent: false,
            started_us,
            stopped_us: now_us(),
        };
        match answer {
            Some(Ok(Some(FromChild::Done(ran)))) => {
                c.busy = false;
                c.tasks += 1;
                let (pid, tasks) = (c.pid, c.tasks);
                let cfg = &self.pool.config;
                // Read only when it matters: /proc costs more than a `noop` task.
                let rss = cfg.max_rss.and_then(|_| rss_kib(pid));
                if cfg.recycle > 0 && tasks >= cfg.recycle {
                    self.retire_for = Some(Reason::Recycle);
                } else if let (Some(max), Some(rss)) = (cfg.max_rss, rss)
                    && rss > max
                {
                    tracing::info!("worker process {pid} uses {rss} KiB, over max_rss {max} KiB");
                    self.retire_for = Some(Reason::Rss);
                }
                self.show();
                Ok(ran)
            }
            None => {
                let pid = c.pid;
                tracing::warn!(
                    "task {} ({}) overran its timeout of {}s: killing worker process {pid}",
                    package.id,
                    package.func,
                    timeout.as_secs_f64()
                );
                self.retire(Some(Reason::Timeout)).await;
                Ok(failed(format!(
                    "timed out after {}s (worker killed)",
                    timeout.as_secs_f64()
                )))
            }
            Some(other) => {
                // The channel ended or broke: the child died (or talks nonsense: kill it).
                if let Err(e) = &other {
                    tracing::debug!("worker process {} channel: {e}", c.pid);
                }
                let pid = c.pid;
                let status = self.retire(Some(Reason::Crash)).await;
                let why = describe(status);
                tracing::warn!(
                    "worker process {pid} died running task {} ({}): {why}",
                    package.id,
                    package.func
                );
                Ok(failed(format!("worker died: {why}")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpus_rotate_over_the_allowed_set() {
        let all = [0, 1, 2, 3];
        assert_eq!(cpus_for(0, 1, &all), [0]);
        assert_eq!(cpus_for(1, 1, &all), [1]);
        assert_eq!(cpus_for(4, 1, &all), [0]);
        assert_eq!(cpus_for(1, 2, &all), [2, 3]);
        assert_eq!(cpus_for(2, 2, &all), [0, 1]);
        assert_eq!(cpus_for(0, 9, &all), [0, 1, 2, 3]);
        assert!(cpus_for(0, 0, &all).is_empty());
        assert_eq!(cpus_for(1, 1, &[5, 7]), [7]);
    }

    #[tokio::test]
    async fn frames_round_trip_and_refuse_oversize() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let mut p = TaskPackage::new("echo", b"[1]".to_vec());
        p.options.group = Some("g".into());
        write_frame(
            &mut a,
            &ToChild::Run {
                package: p.clone(),
                attempt: 2,
                timeout_us: 5,
            },
        )
        .await
        .expect("write");
        let Some(ToChild::Run {
            package, attempt, ..
        }) = read_frame::<ToChild>(&mut b).await.expect("read")
        else {
            panic!("no frame");
        };
        assert_eq!((package, attempt), (p, 2));
        a.write_all(&(u32::MAX).to_le_bytes()).await.expect("write");
        assert!(read_frame::<ToChild>(&mut b).await.is_err());
        drop(a);
        let (a, mut b) = tokio::io::duplex(64);
        drop(a);
        assert!(read_frame::<ToChild>(&mut b).await.expect("eof").is_none());
    }

    #[test]
    fn exits_are_described() {
        assert_eq!(
            describe(Some(ExitStatus::from_raw(libc::SIGABRT))),
            "signal 6 (SIGABRT)"
        );
        assert_eq!(
            describe(Some(ExitStatus::from_raw(3 << 8))),
            "exit status 3"
        );
    }
}
