//! The conformance kit on the other ways to reach Redis, each against `redis-server`s this test
//! starts on its own ports under a temporary directory (killed when the test ends):
//! - a Redis Cluster of three masters (queues land on different nodes; the client follows
//!   `MOVED` redirects from whichever node it was given);
//! - TLS (`rediss://`, feature `tls`) with a CA of the test's own (made with the `openssl` tool)
//!   and a server that requires client certificates.
//!
//! Without `redis-server` (or `openssl`) the tests say `skipped:` loudly, and fail under
//! `QCLUSTER_REQUIRE_SERVICES=1`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use broker_core::testkit::{BrokerFuture, Kit};
use broker_core::{Broker, QueueSettings};
use broker_redis::{RedisBroker, RedisConfig};

/// Servers and files of one test; killed and removed on drop.
struct Servers {
    children: Vec<Child>,
    dir: PathBuf,
}

impl Drop for Servers {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn skip(why: &str) {
    if std::env::var("QCLUSTER_REQUIRE_SERVICES").as_deref() == Ok("1") {
        panic!("needed for this test: {why}");
    }
    eprintln!("skipped: {why}");
}

fn found(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A port no one listens on now, from a range apart from the usual services.
fn free_port() -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let p = l.local_addr().expect("local addr").port();
        // Cluster nodes also listen on port + 10000.
        if p < 55000 && std::net::TcpListener::bind(("127.0.0.1", p + 10000)).is_ok() {
            return p;
        }
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "qcluster-{tag}-{}-{}",
        std::process::id(),
        uuid::Uuid::now_v7().simple()
    ));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn redis_server(dir: &Path, args: &[&str]) -> Child {
    Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start redis-server")
}

fn wait_until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < end, "{what} within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn cli(args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn kit(cfg: RedisConfig) -> Kit {
    let run = uuid::Uuid::now_v7().simple().to_string();
    Kit::new(move |s: QueueSettings| -> BrokerFuture {
        let mut cfg = cfg.clone();
        cfg.prefix = Some(format!("kit{}", &run[16..]));
        Box::pin(async move {
            let b = RedisBroker::connect(&cfg, s).await?;
            Ok(Arc::new(b) as Arc<dyn Broker>)
        })
    })
}

/// Three masters, slots spread by `redis-cli --cluster create`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_on_redis_cluster() {
    if !found("redis-server") || !found("redis-cli") {
        return skip("redis-server and redis-cli (Debian package redis-server)");
    }
    let dir = temp_dir("cluster");
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut servers = Servers {
        children: Vec::new(),
        dir: dir.clone(),
    };
    for p in &ports {
        let port = p.to_string();
        let conf = format!("nodes-{p}.conf");
        servers.children.push(redis_server(
            &dir,
            &[
                "--port",
                &port,
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &conf,
            ],
        ));
    }
    for p in &ports {
        let port = p.to_string();
        wait_until("node up", Duration::from_secs(10), || {
            cli(&["-p", &port, "ping"]).trim() == "PONG"
        });
    }
    let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let mut args = vec!["--cluster", "create"];
    args.extend(nodes.iter().map(String::as_str));
    args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
    cli(&args);
    for p in &ports {
        let port = p.to_string();
        wait_until("cluster_state:ok", Duration::from_secs(20), || {
            cli(&["-p", &port, "cluster", "info"]).contains("cluster_state:ok")
        });
    }

    let mut cfg = RedisConfig::new(format!("redis://127.0.0.1:{}", ports[0]));
    cfg.cluster = true;
    kit(cfg.clone()).run().await;

    // Queues whose slots are on other nodes than the one given work too, and the keys of one
    // queue stay together on one node.
    let mut holders = std::collections::BTreeSet::new();
    for q in ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"] {
        let mut c = cfg.clone();
        c.prefix = Some("spread".into());
        let b = RedisBroker::connect(&c, QueueSettings::for_queue(q))
            .await
            .expect("connect");
        b.delete_queue().await.expect("delete_queue");
        b.enqueue(broker_core::Message::new(q.as_bytes().to_vec()))
            .await
            .expect("enqueue");
        let got = b.dequeue().await.expect("dequeue");
        assert_eq!(got.len(), 1, "queue {q}");
        assert_eq!(got[0].payload, q.as_bytes());
        let slot = cli(&[
            "-p",
            &ports[0].to_string(),
            "cluster",
            "keyslot",
            &format!("spread:{{{q}}}:seq"),
        ]);
        for p in &ports {
            let keys = cli(&[
                "-p",
                &p.to_string(),
                "cluster",
                "countkeysinslot",
                slot.trim(),
            ]);
            if keys.trim() != "0" {
                holders.insert(*p);
            }
        }
        assert_eq!(b.lock_size().await.expect("lock_size"), Some(1));
        b.acknowledge(&got[0].ack).await.expect("acknowledge");
        b.delete_queue().await.expect("delete_queue");
    }
    assert!(
        holders.len() >= 2,
        "six queues all landed on one node: {holders:?}"
    );
}

/// `rediss://` with the test's own CA; the server requires a client certificate.
#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_over_tls() {
    if !found("redis-server") || !found("redis-cli") {
        return skip("redis-server and redis-cli (Debian package redis-server)");
    }
    if !Command::new("openssl")
        .arg("version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        return skip("the openssl tool (Debian package openssl), to make the test's certificates");
    }
    let dir = temp_dir("tls");
    let f = |n: &str| dir.join(n).to_string_lossy().into_owned();
    let ssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").expect("ext");
    ssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=qcluster test CA",
        "-keyout",
        &f("ca.key"),
        "-out",
        &f("ca.crt"),
    ]);
    for who in ["server", "client"] {
        ssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN=qcluster {who}"),
            "-keyout",
            &f(&format!("{who}.key")),
            "-out",
            &f(&format!("{who}.csr")),
        ]);
        ssl(&[
            "x509",
            "-req",
            "-in",
            &f(&format!("{who}.csr")),
            "-CA",
            &f("ca.crt"),
            "-CAkey",
            &f("ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &f("ext.cnf"),
            "-out",
            &f(&format!("{who}.crt")),
        ]);
    }
    let port = free_port();
    let mut servers = Servers {
        children: Vec::new(),
        dir: dir.clone(),
    };
    servers.children.push(redis_server(
        &dir,
        &[
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            &f("server.crt"),
            "--tls-key-file",
            &f("server.key"),
            "--tls-ca-cert-file",
            &f("ca.crt"),
            "--tls-auth-clients",
            "yes",
        ],
    ));
    wait_until("TLS port open", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });

    let mut cfg = RedisConfig::new(format!("rediss://127.0.0.1:{port}/0"));
    cfg.ca_file = Some(dir.join("ca.crt"));
    cfg.cert_file = Some(dir.join("client.crt"));
    cfg.key_file = Some(dir.join("client.key"));
    cfg.connect_timeout = Duration::from_secs(3);
    kit(cfg.clone()).run().await;

    let b = RedisBroker::connect(&cfg, QueueSettings::for_queue("tlsinfo"))
        .await
        .expect("connect");
    let info = b.info().await.expect("info");
    assert_eq!(info.details.get("tls").map(String::as_str), Some("yes"));

    // Without our CA the server's certificate is refused; without a client certificate the
    // server refuses us; a CA file that is not there is named.
    let mut no_ca = cfg.clone();
    no_ca.ca_file = None;
    let e = RedisBroker::connect(&no_ca, QueueSettings::for_queue("t"))
        .await
        .expect_err("an unknown CA must be refused");
    assert!(
        e.to_string().to_lowercase().contains("certificate")
            || e.to_string().to_lowercase().contains("issuer"),
        "{e}"
    );
    let mut no_client = cfg.clone();
    no_client.cert_file = None;
    no_client.key_file = None;
    let refused = async {
        let b = RedisBroker::connect(&no_client, QueueSettings::for_queue("t")).await?;
        b.ping().await
    };
    assert!(
        refused.await.is_err(),
        "the server requires a client certificate"
    );
    let mut missing = cfg.clone();
    missing.ca_file = Some(dir.join("nope.crt"));
    let e = RedisBroker::connect(&missing, QueueSettings::for_queue("t"))
        .await
        .expect_err("a missing CA file");
    assert!(
        e.to_string().contains("redis.ca_file") && e.to_string().contains("nope.crt"),
        "{e}"
    );
    drop(servers);
}
