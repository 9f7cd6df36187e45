//! The dashboard in headless Chromium, driven through chromedriver (WebDriver), served by a
//! running cluster with `[http]`: the task list shows the enqueued tasks, `<script>` in
//! arguments renders as text, a failed task's page shows its error, a state change without the
//! token is refused, and after logging in a requeue from the dead-letter page brings a package
//! back (it runs) while a package with a bad signature stays out. Screenshots go to the test's
//! temp dir (and to `TEST_SCREENSHOT_DIR` when set, which is how `docs/` got its picture).
#[macro_use]
mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cluster::broker_core::Message;
use common::{Guard, World, free_port, wait_http};
use fantoccini::{Client, ClientBuilder, Locator};

const TOKEN: &str = "browser-test-token-0123456789";

/// chromedriver and Chromium, or a loud skip (a failure under `QCLUSTER_REQUIRE_SERVICES=1`,
/// where `scripts/test` has installed them).
fn browser_tools() -> bool {
    let have = |bin: &str| {
        Command::new(bin)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if have("chromedriver") && have("chromium") {
        return true;
    }
    let why = "skipped: no chromium/chromedriver (Debian packages chromium, chromium-driver; \
               scripts/test installs them)";
    if std::env::var("QCLUSTER_REQUIRE_SERVICES").as_deref() == Ok("1") {
        panic!("{why}");
    }
    eprintln!("{why}");
    false
}

async fn browser(driver_port: u16) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--window-size=1400,900",
            ],
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let t = Instant::now();
    loop {
        match ClientBuilder::new(connector.clone())
            .capabilities(caps.clone())
            .connect(&format!("http://127.0.0.1:{driver_port}"))
            .await
        {
            Ok(c) => return c,
            Err(e) => {
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "no WebDriver session: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

async fn shot(c: &Client, w: &World, name: &str) {
    let png = c.screenshot().await.expect("screenshot");
    std::fs::write(w.dir.path().join(name), &png).expect("save screenshot");
    if let Ok(dir) = std::env::var("TEST_SCREENSHOT_DIR") {
        std::fs::write(std::path::Path::new(&dir).join(name), &png).expect("save screenshot");
    }
}

async fn wait_for(c: &Client, what: Locator<'_>) -> fantoccini::elements::Element {
    c.wait()
        .at_most(Duration::from_secs(10))
        .for_element(what)
        .await
        .unwrap_or_else(|e| panic!("not on the page: {e}"))
}

/// The page's text, once its `main` element is there.
async fn body_text(c: &Client) -> String {
    wait_for(c, Locator::Css("main"))
        .await
        .text()
        .await
        .expect("text")
}

/// Clicks the button `xpath` finds on a freshly loaded `url` (which shows no message), then
/// waits for the message of the page the click leads to and returns it.
async fn act(c: &Client, url: &str, xpath: &str) -> String {
    c.goto(url).await.expect("goto");
    wait_for(c, Locator::XPath(xpath))
        .await
        .click()
        .await
        .expect("click");
    wait_for(c, Locator::Css("div.msg"))
        .await
        .text()
        .await
        .expect("text")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_chromium() {
    if !browser_tools() {
        return;
    }
    let mut w = World::new("browser", None);
    let port = free_port();
    w.set("QCLUSTER_HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .set("QCLUSTER_HTTP__TOKEN", TOKEN)
        .set("QCLUSTER_MAX_ATTEMPTS", 1)
        .set("QCLUSTER_LABEL", "web-1");

    // Before the cluster runs: a good package parked in the dead letters (as an operator finds
    // one after a store outage), and one whose signature is wrong.
    let config = w.config();
    let broker = cluster::Brokers::builtin()
        .connect(&config)
        .await
        .expect("broker");
    let client = cluster::Client::with_broker(&config, broker.clone())
        .await
        .expect("client");
    let parked = client
        .enqueue_json(
            "echo",
            br#"{"parked":true}"#.to_vec(),
            cluster::EnqueueOptions::default(),
        )
        .await
        .expect("enqueue");
    let got = broker.dequeue().await.expect("dequeue");
    assert_eq!(got.len(), 1);
    broker
        .dead_letter(&got[0].ack, "result store was down")
        .await
        .expect("dead letter");
    broker
        .enqueue(Message::new(b"not a signed package at all".to_vec()))
        .await
        .expect("enqueue raw");

    let _c = Guard(w.start());
    wait_http(port, "/health", 200, Duration::from_secs(30));
    let ids = w.enqueue_lines(&[
        r#"{"func":"echo","args":{"note":"<script>document.title='owned'</script>"}}"#.to_owned(),
        r#"{"func":"fail","args":"disk full on /var"}"#.to_owned(),
    ]);
    w.wait_done(&ids, Duration::from_secs(30)).await;
    // The bad package has been quarantined beside the parked one.
    let t = Instant::now();
    while broker.dead_letter_size().await.expect("size") != Some(2) {
        assert!(t.elapsed() < Duration::from_secs(20), "never quarantined");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let driver_port = free_port();
    let _driver = Guard(
        Command::new("chromedriver")
            .arg(format!("--port={driver_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver"),
    );
    let c = browser(driver_port).await;
    let base = format!("http://127.0.0.1:{port}");

    // The task list shows both tasks; the script in the arguments is text, not a script.
    c.goto(&format!("{base}/tasks")).await.expect("goto");
    let text = body_text(&c).await;
    for id in &ids {
        assert!(text.contains(&id.to_string()), "{id} not listed:\n{text}");
    }
    assert!(
        text.contains("<script>document.title='owned'</script>"),
        "{text}"
    );
    let scripts = c
        .execute("return document.scripts.length", vec![])
        .await
        .expect("execute");
    assert_eq!(
        scripts,
        serde_json::json!(0),
        "a script element made it into the page"
    );
    assert_ne!(c.title().await.expect("title"), "owned");
    shot(&c, &w, "dashboard-tasks.png").await;

    // A failed task's page shows its error.
    c.goto(&format!("{base}/tasks?outcome=failure"))
        .await
        .expect("goto");
    let href = wait_for(&c, Locator::LinkText(&ids[1].to_string()))
        .await
        .attr("href")
        .await
        .expect("href")
        .expect("a link");
    c.goto(&format!("{base}{href}")).await.expect("goto");
    let result = wait_for(&c, Locator::Id("result"))
        .await
        .text()
        .await
        .expect("text");
    assert!(result.contains("disk full on /var"), "{result}");
    assert!(body_text(&c).await.contains("failed"));

    // Without the token, requeue is refused and the dead letter stays.
    let dead = format!("{base}/dead");
    c.goto(&dead).await.expect("goto");
    let text = body_text(&c).await;
    assert!(
        text.contains("result store was down") && text.contains("quarantined"),
        "{text}"
    );
    let requeue_parked = "//tr[td[contains(., 'result store was down')]]//button[text()='Requeue']";
    let msg = act(&c, &dead, requeue_parked).await;
    assert!(msg.contains("needs the token"), "{msg}");
    assert_eq!(broker.dead_letter_size().await.expect("size"), Some(2));

    // Log in, then requeue both: the parked package runs; the bad one is refused and stays.
    c.goto(&format!("{base}/login")).await.expect("goto");
    wait_for(&c, Locator::Css("form[action='/login']")).await;
    c.form(Locator::Css("form[action='/login']"))
        .await
        .expect("login form")
        .set_by_name("token", TOKEN)
        .await
        .expect("fill")
        .submit()
        .await
        .expect("submit");
    // The login lands on the overview, logged in.
    wait_for(&c, Locator::XPath("//button[text()='Log out']")).await;
    c.goto(&dead).await.expect("goto");
    body_text(&c).await;
    shot(&c, &w, "dashboard-dead.png").await;
    let msg = act(&c, &dead, requeue_parked).await;
    assert!(msg.contains("Requeued"), "{msg}");
    let r = w.wait_record(parked, Duration::from_secs(30)).await;
    assert!(r.success, "{r:?}");
    let msg = act(
        &c,
        &dead,
        "//tr[td[contains(., 'quarantined')]]//button[text()='Requeue']",
    )
    .await;
    assert!(msg.contains("Refused"), "{msg}");
    assert_eq!(broker.dead_letter_size().await.expect("size"), Some(1));

    // The overview shows the running cluster.
    c.goto(&format!("{base}/")).await.expect("goto");
    let text = body_text(&c).await;
    assert!(
        text.contains("web-1") && text.contains("Latest failures"),
        "{text}"
    );
    shot(&c, &w, "dashboard.png").await;
    c.close().await.expect("close");
}
