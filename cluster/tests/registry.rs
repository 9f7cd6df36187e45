//! The broker registry through the library, as a user's own binary uses it: a broker registered
//! under its own name gets its own section (file < environment < flags), typed and checked,
//! with the key named as the user wrote it and secrets masked in `config`.

use std::time::Duration;

use cluster::broker_core::{BrokerError, QueueSettings};
use cluster::broker_memory::{MemoryBroker, MemoryConfig};
use cluster::{Brokers, Config};
use figment::value::Value;

/// A user's broker config: `[beanstalk] url = …, tube = …, token = …`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct BeanstalkConfig {
    url: String,
    tube: Option<String>,
    token: Option<String>,
    #[serde(with = "cluster::broker_core::secs")]
    connect_timeout: Duration,
}

impl Default for BeanstalkConfig {
    fn default() -> Self {
        Self {
            url: "beanstalk://127.0.0.1:11300".into(),
            tube: None,
            token: None,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// Records what the factory got, then serves the queue from memory.
async fn connect(c: BeanstalkConfig, s: QueueSettings) -> Result<MemoryBroker, BrokerError> {
    if c.url.is_empty() {
        return Err(BrokerError::config("url", "must not be empty"));
    }
    *GOT.lock().unwrap_or_else(|p| p.into_inner()) = Some((c, s.queue.clone()));
    MemoryBroker::connect(MemoryConfig::default(), s).await
}

static GOT: std::sync::Mutex<Option<(BeanstalkConfig, String)>> = std::sync::Mutex::new(None);

fn brokers() -> Brokers {
    let mut b = Brokers::builtin();
    b.register("beanstalk", connect);
    b
}

fn load(file: &str, flags: &[(&str, &str)]) -> Result<cluster::Loaded, cluster::ConfigError> {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("qcluster.toml");
    std::fs::write(&path, file).expect("write");
    let flags: Vec<(String, Value)> = flags
        .iter()
        .map(|(k, v)| cluster::config::parse_flag(&format!("{k}={v}")).expect("flag"))
        .collect();
    Config::load_with(Some(&path), &flags, &brokers())
}

#[tokio::test]
async fn a_registered_broker_gets_its_own_section() {
    let loaded = load(
        "name = \"reg\"\nbroker = \"beanstalk\"\n[beanstalk]\nurl = \"beanstalk://u:pw-Bean-1@10.0.0.9:11300\"\ntube = \"from-file\"\ntoken = \"tok-Bean-2\"\n",
        &[("beanstalk.tube", "from-flag")],
    )
    .expect("load");
    let broker = brokers().connect(&loaded.config).await.expect("connect");
    assert_eq!(broker.name(), "memory");
    let (got, queue) = GOT
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .expect("factory called");
    assert_eq!(got.url, "beanstalk://u:pw-Bean-1@10.0.0.9:11300");
    assert_eq!(
        got.tube.as_deref(),
        Some("from-flag"),
        "flags beat the file"
    );
    assert_eq!(got.connect_timeout, Duration::from_secs(5), "default kept");
    assert_eq!(queue, "reg", "the queue is the cluster name");

    // `config` shows every key of the section, with sources, secrets masked.
    let entries = loaded.entries_with(&brokers());
    let find = |k: &str| entries.iter().find(|e| e.key == k).expect(k).clone();
    assert_eq!(find("beanstalk.tube").source, "command-line flag");
    assert_eq!(find("beanstalk.connect_timeout").source, "default");
    assert!(find("beanstalk.url").source.starts_with("file "));
    let all = serde_json::to_string(&entries).expect("json");
    assert!(
        !all.contains("pw-Bean-1") && !all.contains("tok-Bean-2"),
        "{all}"
    );
    assert!(!format!("{:?}", loaded.config).contains("pw-Bean-1"));
}

#[test]
fn refusals_name_the_key_as_written() {
    let e = load("broker = \"beanstalk\"\n[beanstalk]\ntueb = \"x\"\n", &[]).unwrap_err();
    assert_eq!(e.key, "beanstalk.tueb");
    assert!(
        e.message.contains("unknown key (from file")
            && e.message.contains("did you mean `beanstalk.tube`?"),
        "{e}"
    );
    let e = load(
        "broker = \"beanstalk\"\n",
        &[("beanstalk.connect_timeout", "-1")],
    )
    .unwrap_err();
    assert_eq!(e.key, "beanstalk.connect_timeout", "{e}");
    // Checked even when another broker is selected.
    let e = load("broker = \"memory\"\n[beanstalk]\nurl = 7\n", &[]).unwrap_err();
    assert_eq!(e.key, "beanstalk.url");
    assert!(e.message.contains("value not shown"), "{e}");
    // A section that is not a table.
    let e = load(
        "broker = \"beanstalk\"\nbeanstalk = \"beanstalk://u:pw@h\"\n",
        &[],
    )
    .unwrap_err();
    assert_eq!(e.key, "beanstalk");
    assert!(!e.message.contains("pw"), "{e}");
    // Not registered: the registered names.
    let mut only = Brokers::new();
    only.register("beanstalk", connect);
    let e =
        Config::load_with(None, &[("broker".into(), Value::from("memory"))], &only).unwrap_err();
    assert!(e.message.contains("registered here: beanstalk"), "{e}");
}

#[tokio::test]
async fn factory_errors_name_the_section_key() {
    let loaded = load("broker = \"beanstalk\"\n[beanstalk]\nurl = \"\"\n", &[]).expect("load");
    let e = brokers().connect(&loaded.config).await.unwrap_err();
    assert!(e.is_usage(), "{e}");
    assert!(
        e.to_string().contains("`beanstalk.url`: must not be empty"),
        "{e}"
    );
}

/// `Config::set` works like `--set`: cluster keys are checked at once, the secret is taken,
/// section keys wait for their factory; values set in code say so in `config`.
#[tokio::test]
async fn set_in_code() {
    let mut c = Config::default();
    c.set("secret", "s3cret-in-code").expect("secret");
    let e = c.load_secret().unwrap_err();
    assert_eq!(e.key, "secret");
    assert!(
        e.message.contains("14 bytes") && e.message.contains("32"),
        "{e}"
    );
    c.set("allow_short_secret", true)
        .expect("allow_short_secret");
    assert_eq!(c.load_secret().expect("secret").expose(), b"s3cret-in-code");
    c.set("workers", 3).expect("workers");
    assert_eq!(c.workers, 3);
    assert_eq!(
        c.load_secret().expect("kept").expose(),
        b"s3cret-in-code",
        "setting another key keeps the secret"
    );
    let e = c.set("workers", 0).unwrap_err();
    assert_eq!(e.key, "workers");
    let e = c.set("workers", "many").unwrap_err();
    assert_eq!(e.key, "workers");
    assert_eq!(c.workers, 3, "a refused value changes nothing");
    c.broker = "beanstalk".into();
    c.set("beanstalk.tube", "t").expect("section key");
    c.set("beanstalk.tueb", "t").expect("kept for the factory");
    let e = brokers().connect(&c).await.unwrap_err();
    assert!(e.is_usage(), "{e}");
    assert!(
        e.to_string().contains(
            "`beanstalk.tueb`: unknown key (from set in code); did you mean `beanstalk.tube`?"
        ),
        "{e}"
    );
}

/// The environment layer of a user's section: `QCLUSTER_BEANSTALK__TUBE` beats the file and
/// loses to a flag. (Its own process under nextest, so setting the variable is safe.)
#[test]
fn environment_layer_of_a_users_section() {
    // SAFETY: nextest runs each test in its own process; nothing else reads the environment.
    unsafe { std::env::set_var("QCLUSTER_BEANSTALK__TUBE", "from-env") };
    let file = "broker = \"beanstalk\"\n[beanstalk]\ntube = \"from-file\"\n";
    let loaded = load(file, &[]).expect("load");
    let entries = loaded.entries_with(&brokers());
    let tube = entries
        .iter()
        .find(|e| e.key == "beanstalk.tube")
        .expect("tube");
    assert_eq!(tube.value, "from-env");
    assert_eq!(tube.source, "environment QCLUSTER_BEANSTALK__TUBE");
    let loaded = load(file, &[("beanstalk.tube", "from-flag")]).expect("load");
    let entries = loaded.entries_with(&brokers());
    let tube = entries
        .iter()
        .find(|e| e.key == "beanstalk.tube")
        .expect("tube");
    assert_eq!(tube.value, "from-flag");
    unsafe { std::env::set_var("QCLUSTER_BEANSTALK__TUEB", "x") };
    let e = load(file, &[]).unwrap_err();
    assert_eq!(e.key, "beanstalk.tueb");
    assert!(e.message.contains("(from QCLUSTER_BEANSTALK__TUEB)"), "{e}");
}

#[test]
#[should_panic(expected = "cannot name a config section")]
fn a_broker_named_like_a_cluster_key_is_refused() {
    Brokers::new().register("store", connect);
}

/// A registry without one of the adapters this project ships names the Cargo feature that
/// compiles it in (what `qcluster` says, exit 2, when built without it).
#[test]
fn an_adapter_not_compiled_in_names_its_feature() {
    let empty = Brokers::new();
    for (name, feature) in [
        ("sqs", "sqs"),
        ("mongo", "mongo"),
        ("amqp", "amqp"),
        ("disque", "disque"),
        ("ironmq", "ironmq"),
        ("redis", "redis"),
    ] {
        let e = empty.check_name(name).expect_err(name).to_string();
        assert!(
            e.contains(&format!("broker `{name}` is not compiled into this binary"))
                && e.contains(&format!("--features cluster/{feature}")),
            "{e}"
        );
    }
    let e = empty
        .check_name("beanstalkd")
        .expect_err("unknown")
        .to_string();
    assert!(e.contains("unknown broker `beanstalkd`"), "{e}");
}

/// The section of one of our adapters that this registry lacks is kept, unchecked, and never
/// echoed: URLs under any key, in lists too, lose their passwords and tokens; secret-named
/// keys are masked.
#[test]
fn sections_not_registered_are_masked() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("qcluster.toml");
    std::fs::write(
        &path,
        "broker = \"memory\"\n[amqp]\nuri = \"amqp://u:pw-Amqp-3@h/v\"\nservers = [\"nats://tok-Arr-4@h:4222\"]\napi_key = \"k-Key-5\"\n",
    )
    .expect("write");
    let mut empty = Brokers::new();
    empty.register("memory", |c: MemoryConfig, s: QueueSettings| {
        MemoryBroker::connect(c, s)
    });
    let loaded = Config::load_with(Some(&path), &[], &empty).expect("kept, unchecked");
    let shown = format!(
        "{:?} {:?}",
        loaded
            .entries_with(&empty)
            .iter()
            .map(|e| (e.key.clone(), e.value.to_string()))
            .collect::<Vec<_>>(),
        loaded.config
    );
    for leak in ["pw-Amqp-3", "tok-Arr-4", "k-Key-5"] {
        assert!(!shown.contains(leak), "{leak} shown: {shown}");
    }
    assert!(shown.contains("amqp.uri"), "{shown}");
}
