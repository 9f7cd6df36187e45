//! `qcluster monitor` in a real terminal (tmux): the running cluster and its figures appear, the
//! failure filter works, `q` quits and gives the terminal back (no alternate screen left), and a
//! broker that stops answering is shown as such and recovers. The last screen is saved as text
//! in the test's temp dir (and in `TEST_SCREENSHOT_DIR` when set, which is how `docs/` got
//! its picture).
#[macro_use]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Guard, free_port, sql_world};

fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux").args(args).output().expect("tmux");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// tmux, or a loud skip (a failure under `QCLUSTER_REQUIRE_SERVICES=1`).
fn have_tmux() -> bool {
    if Command::new("tmux")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return true;
    }
    let why = "skipped: no tmux (Debian package tmux; scripts/test installs it)";
    if std::env::var("QCLUSTER_REQUIRE_SERVICES").as_deref() == Ok("1") {
        panic!("{why}");
    }
    eprintln!("{why}");
    false
}

struct Session(String);

impl Drop for Session {
    fn drop(&mut self) {
        tmux(&["kill-session", "-t", &self.0]);
    }
}

fn screen(s: &Session) -> String {
    tmux(&["capture-pane", "-p", "-t", &s.0])
}

fn wait_screen(s: &Session, what: &str, limit: Duration, pred: impl Fn(&str) -> bool) -> String {
    let t = Instant::now();
    loop {
        let text = screen(s);
        if pred(&text) {
            return text;
        }
        assert!(t.elapsed() < limit, "{what} never appeared:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monitor_in_tmux() {
    if !have_tmux() {
        return;
    }
    // PostgreSQL as broker and store, reached by the monitor through a proxy the test can cut.
    let Some(mut w) = sql_world("monitor", common::Sql::Postgres).await else {
        return;
    };
    let mut proxy = Proxy::start(free_port(), 5432).await;
    w.set("QCLUSTER_MAX_ATTEMPTS", 1)
        .set("QCLUSTER_LABEL", "mon-1");
    let cluster = Guard(w.start());
    let ids = w.enqueue_lines(
        &(0..20)
            .map(|i| format!(r#"{{"func":"echo","args":{i}}}"#))
            .chain([
                r#"{"func":"fail","args":"printer on fire"}"#.to_owned(),
                r#"{"func":"fail","args":"disk quota exceeded"}"#.to_owned(),
            ])
            .collect::<Vec<_>>(),
    );
    w.wait_done(&ids, Duration::from_secs(30)).await;

    // The monitor runs in a tmux pane with the world's environment.
    let proxied = w.url.replace(":5432/", &format!(":{}/", proxy.port));
    assert_ne!(proxied, w.url, "the PostgreSQL URL names port 5432");
    let env: String = w
        .cmd(&[])
        .env("QCLUSTER_ORM__URL", &proxied)
        .get_envs()
        .filter_map(|(k, v)| Some(format!("{}={} ", k.to_str()?, shell_quote(v?.to_str()?))))
        .collect();
    let session = Session(format!("qm{}", &w.name[w.name.len() - 8..]));
    let command = format!(
        "cd {} && env {env} {} monitor; echo monitor-exited-$?; sleep 60",
        shell_quote(&w.dir.path().display().to_string()),
        common::BIN
    );
    tmux(&[
        "new-session",
        "-d",
        "-s",
        &session.0,
        "-x",
        "150",
        "-y",
        "40",
        &command,
    ]);
    let text = wait_screen(
        &session,
        "the cluster and its figures",
        Duration::from_secs(20),
        |t| {
            t.lines()
                .any(|l| l.contains("mon-1") && l.split_whitespace().any(|c| c == "22"))
                && t.contains("latest failures: 2")
        },
    );
    assert!(text.contains(&w.name), "{text}");
    assert!(
        text.contains("printer on fire") && text.contains("disk quota exceeded"),
        "{text}"
    );
    assert!(text.contains("waiting 0"), "{text}");
    // The cluster's row: 22 processed, 2 failed.
    let row = text
        .lines()
        .find(|l| l.contains("mon-1"))
        .expect("cluster row")
        .to_owned();
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert!(cells.contains(&"22") && cells.contains(&"2"), "{row}");
    assert_eq!(
        tmux(&["display", "-p", "-t", &session.0, "#{alternate_on}"]).trim(),
        "1"
    );

    // `f` filters the failures.
    tmux(&["send-keys", "-t", &session.0, "f"]);
    tmux(&["send-keys", "-t", &session.0, "-l", "quota"]);
    tmux(&["send-keys", "-t", &session.0, "Enter"]);
    let text = wait_screen(
        &session,
        "the filtered failures",
        Duration::from_secs(10),
        |t| t.contains("latest failures: 1 (filter: quota)"),
    );
    assert!(
        text.contains("disk quota exceeded") && !text.contains("printer on fire"),
        "{text}"
    );
    let saved = text.clone();
    std::fs::write(w.dir.path().join("monitor.txt"), &saved).expect("save screen");

    // The broker goes away: the view says so, keeps the last figures, and recovers.
    proxy.stop();
    let text = wait_screen(
        &session,
        "the unreachable broker",
        Duration::from_secs(30),
        |t| t.contains("unreachable"),
    );
    assert!(
        text.contains("retrying") && text.contains("mon-1"),
        "{text}"
    );
    let _proxy = Proxy::start(proxy.port, 5432).await;
    wait_screen(
        &session,
        "the recovered view",
        Duration::from_secs(30),
        |t| !t.contains("unreachable") && t.contains("mon-1"),
    );
    drop(cluster);

    // `q` quits and gives the terminal back.
    tmux(&["send-keys", "-t", &session.0, "q"]);
    let text = wait_screen(&session, "the shell again", Duration::from_secs(10), |t| {
        t.contains("monitor-exited-0")
    });
    assert!(
        !text.contains("latest failures"),
        "the view was left on screen:\n{text}"
    );
    assert_eq!(
        tmux(&["display", "-p", "-t", &session.0, "#{alternate_on}"]).trim(),
        "0"
    );
    if let Ok(dir) = std::env::var("TEST_SCREENSHOT_DIR") {
        std::fs::write(std::path::Path::new(&dir).join("monitor.txt"), &saved)
            .expect("save screen");
    }
}

/// A TCP proxy to 127.0.0.1:`to` on `port` that [`Proxy::stop`] cuts: listener and every
/// connection.
struct Proxy {
    port: u16,
    tasks: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(port: u16, to: u16) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("proxy port");
        let tasks = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let inner = tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut a, _)) = listener.accept().await {
                let conn = tokio::spawn(async move {
                    if let Ok(mut b) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await {
                        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                    }
                });
                inner.lock().expect("tasks").push(conn);
            }
        });
        tasks.lock().expect("tasks").push(accept);
        Self { port, tasks }
    }

    fn stop(&mut self) {
        for t in self.tasks.lock().expect("tasks").drain(..) {
            t.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}
