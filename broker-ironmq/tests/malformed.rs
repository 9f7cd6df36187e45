//! The adapter against a fake IronMQ that answers badly (malformed JSON, missing fields, a
//! post that fails half way): clear errors, nothing lost, nothing panics. Runs without the
//! test server: the fake listens on a port of its own.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use broker_core::{AckId, Broker, BrokerError, Message, QueueSettings};
use broker_ironmq::{IronMqBroker, IronMqConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// `(method, path, body)` → `Some((status, body))`, or `None` to drop the connection unanswered.
type Route = dyn Fn(&str, &str, &str) -> Option<(u16, String)> + Send + Sync;

struct Fake {
    url: String,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Fake {
    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

async fn fake(
    route: impl Fn(&str, &str, &str) -> Option<(u16, String)> + Send + Sync + 'static,
) -> Fake {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let route: Arc<Route> = Arc::new(route);
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let route = route.clone();
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let head_end = loop {
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break p + 4;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                let len = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                while buf.len() < head_end + len {
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let body = String::from_utf8_lossy(&buf[head_end..head_end + len]).to_string();
                let mut first = head.lines().next().unwrap_or("").split(' ');
                let method = first.next().unwrap_or("").to_owned();
                let path = first.next().unwrap_or("").to_owned();
                log.lock().unwrap().push(format!("{method} {path}"));
                let Some((status, text)) = route(&method, &path, &body) else {
                    return;
                };
                let answer = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                    text.len()
                );
                let _ = s.write_all(answer.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Fake { url, seen }
}

/// Answers the queue info every `connect` asks for; everything else goes to `rest`.
fn with_queue(
    rest: impl Fn(&str, &str, &str) -> Option<(u16, String)> + Send + Sync + 'static,
) -> impl Fn(&str, &str, &str) -> Option<(u16, String)> + Send + Sync + 'static {
    move |m, p, b| {
        if m == "GET" && p.ends_with("/queues/q") {
            return Some((200, r#"{"queue": {"name": "q", "size": 0}}"#.into()));
        }
        rest(m, p, b)
    }
}

async fn open(f: &Fake) -> IronMqBroker {
    let cfg = IronMqConfig {
        allow_short_timeout: true,
        connect_timeout: Duration::from_secs(2),
        timeout: Duration::from_secs(2),
        ..IronMqConfig::for_url(&f.url, "p", "fake-token-77")
    };
    let s = QueueSettings {
        retry: Duration::from_secs(5),
        wait: Duration::ZERO,
        ..QueueSettings::for_queue("q")
    };
    IronMqBroker::connect(&cfg, s).await.unwrap()
}

fn backend(e: BrokerError) -> String {
    match e {
        BrokerError::Backend { message, .. } => message,
        other => panic!("expected a Backend error, got {other:?}"),
    }
}

#[tokio::test]
async fn malformed_reserve_is_an_error_not_an_empty_queue() {
    let f = fake(with_queue(|_, p, _| {
        p.ends_with("/reservations")
            .then(|| (200, "<html>oops</html>".into()))
    }))
    .await;
    let b = open(&f).await;
    let m = backend(b.dequeue().await.unwrap_err());
    assert!(m.contains("messages") && m.contains("oops"), "{m}");
}

#[tokio::test]
async fn a_reservation_without_a_body_is_skipped() {
    let f = fake(with_queue(|_, p, _| {
        p.ends_with("/reservations").then(|| {
            (
                200,
                r#"{"messages": [{"id": "1", "reservation_id": "r"},
                    {"id": "2", "reservation_id": "s", "body": "AAE", "reserved_count": 3}]}"#
                    .into(),
            )
        })
    }))
    .await;
    let b = open(&f).await;
    let got = b.dequeue().await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].payload.clone(), got[0].deliveries),
        (vec![0, 1], Some(3))
    );
    assert_eq!(got[0].ack, AckId::new("2:s"));
}

#[tokio::test]
async fn malformed_queue_info_is_an_error_not_zero() {
    let f = fake(|m, p, _| {
        Some(if m == "GET" && p.ends_with("/queues/q") {
            (200, r#"{"queue": "x"}"#.into())
        } else {
            (404, r#"{"msg": "Queue not found"}"#.into())
        })
    })
    .await;
    let b = open(&f).await;
    assert!(backend(b.queue_size().await.unwrap_err()).contains("queue"));
    assert!(
        b.dead_letter_size().await.is_ok(),
        "the dead queue answers 404: none"
    );
}

#[tokio::test]
async fn dead_letter_without_a_body_changes_nothing() {
    let f = fake(with_queue(|m, p, _| match m {
        "GET" if p.contains("/messages/") => Some((200, r#"{"message": {"id": "1"}}"#.into())),
        _ => Some((500, r#"{"msg": "unexpected"}"#.into())),
    }))
    .await;
    let b = open(&f).await;
    let m = backend(b.dead_letter(&AckId::new("1:r"), "why").await.unwrap_err());
    assert!(m.contains("body"), "{m}");
    let seen = f.seen();
    assert!(
        !seen
            .iter()
            .any(|r| r.starts_with("POST") || r.starts_with("DELETE")),
        "nothing copied, nothing deleted: {seen:?}"
    );
}

#[tokio::test]
async fn a_batch_failing_half_way_says_what_was_stored() {
    let posts = Arc::new(Mutex::new(0));
    let p2 = posts.clone();
    let f = fake(with_queue(move |m, p, b| {
        if m != "POST" || !p.ends_with("/messages") {
            return Some((404, "{}".into()));
        }
        let mut n = p2.lock().unwrap();
        *n += 1;
        let count = serde_json::from_str::<serde_json::Value>(b).unwrap()["messages"]
            .as_array()
            .unwrap()
            .len();
        match *n {
            1 => Some((
                201,
                serde_json::json!({ "ids": (0..count).map(|i| i.to_string()).collect::<Vec<_>>() })
                    .to_string(),
            )),
            2 => None, // no answer: unknown
            _ => Some((500, r#"{"msg": "down"}"#.into())),
        }
    }))
    .await;
    let b = open(&f).await;
    let many = |n: usize| {
        (0..n)
            .map(|i| Message::new(vec![i as u8]))
            .collect::<Vec<_>>()
    };
    let e = b.enqueue_many(many(250)).await.unwrap_err();
    assert!(
        !e.is_transient(),
        "a blind retry would store the first 100 twice: {e:?}"
    );
    let m = backend(e);
    assert!(
        m.contains("first 100 were stored")
            && m.contains("next 100 may or may not")
            && m.contains("last 50 not sent"),
        "{m}"
    );
    // Nothing stored yet when the first post fails: the error as it is.
    let e = b.enqueue_many(many(3)).await.unwrap_err();
    assert!(backend(e).contains("down"));
}

#[tokio::test]
async fn the_token_goes_in_the_header_never_the_url() {
    let f = fake(|_, p, _| {
        Some(if p.contains("oauth") {
            (500, "{}".into())
        } else {
            (200, r#"{"queue": {"name": "q", "size": 0}}"#.into())
        })
    })
    .await;
    let b = open(&f).await;
    b.queue_size().await.unwrap();
    assert!(f.seen().iter().all(|r| !r.contains("fake-token-77")));
}
