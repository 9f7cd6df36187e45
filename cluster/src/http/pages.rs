//! The dashboard's pages, rendered on the server with `maud` (every value escaped by the
//! template; no JavaScript): clusters and queue, tasks with filters, one task, dead letters with
//! requeue and delete, schedules with pause, resume and run now, and the login.

use std::time::Duration;

use axum::Router;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use broker_core::{MessageId, TaskId, now_us};
use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde::Deserialize;

use super::{COOKIE_NAME, Web};
use crate::store::{Browse, Outcome, TaskRecord, rfc3339};

/// Rows per page of the task list.
const PAGE: usize = 50;

pub(super) fn routes() -> Router<Web> {
    Router::new()
        .route("/", get(overview))
        .route("/tasks", get(tasks))
        .route("/tasks/{id}", get(task))
        .route("/dead", get(dead))
        .route("/dead/requeue", post(dead_requeue))
        .route("/dead/delete", post(dead_delete))
        .route("/schedules", get(schedules))
        .route("/schedules/{name}/{action}", post(schedule_action))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
}

const STYLE: &str = "
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:8px 16px;display:flex;gap:16px;align-items:center}
header a{color:#cfe0ff;text-decoration:none} header b{margin-right:12px}
main{padding:16px} table{border-collapse:collapse;background:#fff;width:100%;margin:8px 0 16px}
th,td{border-bottom:1px solid #e3e6ea;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef0f3} td.n{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#11772d} .bad{color:#b3261e} .muted{color:#6b7280}
pre{background:#fff;border:1px solid #e3e6ea;padding:8px;white-space:pre-wrap;word-break:break-all}
.msg{background:#fff7d6;border:1px solid #e8d48a;padding:6px 10px;margin-bottom:12px}
form.inline{display:inline} .figs{display:flex;gap:24px;margin:8px 0 16px}
.fig{background:#fff;border:1px solid #e3e6ea;padding:8px 14px} .fig b{display:block;font-size:20px}
";

/// The page frame: navigation, login state, the message of the last action.
fn page(web: &Web, headers: &HeaderMap, title: &str, msg: Option<&str>, body: Markup) -> Markup {
    let authed = web.authorized(headers);
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { (title) " · qcluster " (web.config.name) }
                style { (PreEscaped(STYLE)) }
            }
            body {
                header {
                    b { "qcluster " (web.config.name) }
                    a href="/" { "Overview" }
                    a href="/tasks" { "Tasks" }
                    a href="/tasks?outcome=failure" { "Failures" }
                    a href="/dead" { "Dead letters" }
                    a href="/schedules" { "Schedules" }
                    span style="flex:1" {}
                    @if authed {
                        form.inline method="post" action="/logout" {
                            button type="submit" { "Log out" }
                        }
                    } @else if web.has_token() {
                        a href="/login" { "Log in" }
                    } @else {
                        span.muted { "read-only (no http.token set)" }
                    }
                }
                main {
                    h1 { (title) }
                    @if let Some(m) = msg { div.msg { (m) } }
                    (body)
                }
            }
        }
    }
}

fn html_response(status: StatusCode, m: Markup) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        m.into_string(),
    )
        .into_response()
}

/// Pages need the token when the address is beyond loopback.
fn gate(web: &Web, headers: &HeaderMap) -> Option<Response> {
    (!web.may_read(headers)).then(|| Redirect::to("/login").into_response())
}

/// State changes need the token.
fn gate_change(web: &Web, headers: &HeaderMap) -> Option<Response> {
    if web.may_change(headers) {
        return None;
    }
    let why = if web.has_token() {
        "This action changes state and needs the token: log in first."
    } else {
        "This dashboard is read-only: set http.token (QCLUSTER_HTTP__TOKEN) to enable actions."
    };
    Some(html_response(
        StatusCode::FORBIDDEN,
        page(web, headers, "Not allowed", Some(why), html! {}),
    ))
}

fn ago(us: i64) -> String {
    let secs = (now_us() - us) as f64 / 1e6;
    if us <= 0 {
        "never".into()
    } else if secs < 120.0 {
        format!("{secs:.0} s ago")
    } else if secs < 7200.0 {
        format!("{:.0} min ago", secs / 60.0)
    } else {
        format!("{:.1} h ago", secs / 3600.0)
    }
}

fn short(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        s.chars().take(n - 1).chain(['…']).collect()
    }
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "n/a".into(), |v| v.to_string())
}

fn state_of(r: &TaskRecord) -> (&'static str, &'static str) {
    match (r.success, r.done, r.stopped_us == 0) {
        (_, false, true) => ("running", "muted"),
        (true, _, _) => ("success", "ok"),
        (false, true, _) => ("failed", "bad"),
        (false, false, _) => ("retrying", "bad"),
    }
}

#[derive(Debug, Deserialize, Default)]
struct Msg {
    msg: Option<String>,
}

async fn overview(State(web): State<Web>, headers: HeaderMap, Query(q): Query<Msg>) -> Response {
    if let Some(r) = gate(&web, &headers) {
        return r;
    }
    let o = crate::overview::gather(&web.broker, &web.store, &web.config, 10).await;
    let body = html! {
        p.muted { "Refreshes every 5 seconds. Status " (o.status_at) "." }
        @if let Some(e) = &o.broker_error { div.msg { "Broker: " (e) } }
        div.figs {
            div.fig { "waiting" b { (opt(o.waiting)) } }
            div.fig { "in flight" b { (opt(o.in_flight)) } }
            div.fig { "dead letters" b { (opt(o.dead_letters)) } }
            div.fig { "clusters" b { (o.clusters.len()) } }
        }
        h2 { "Clusters" }
        @if o.clusters.is_empty() {
            p { "No cluster of this name is running." }
        } @else {
            table {
                tr { th{"host"} th{"pid"} th{"label"} th{"state"} th{"mode"} th{"busy / workers"}
                     th{"uptime"} th{"processed"} th{"failed"} th{"reincarnations"} th{"heartbeat"} }
                @for c in &o.clusters {
                    tr {
                        td { (c.host) } td.n { (c.pid) } td { (c.label) } td { (c.state) }
                        td { (c.worker_mode) }
                        td.n { (c.running) " / " (c.workers) }
                        td.n { (format!("{:.0} s", c.uptime_secs)) }
                        td.n { (c.totals.processed) } td.n { (c.totals.failed) }
                        td.n { (c.totals.reincarnations) }
                        td { (ago(c.heartbeat_us)) }
                    }
                }
            }
        }
        h2 { "Latest failures" }
        (task_table(&o.failures))
        @if let Some(e) = &o.store_error { div.msg { "Result store: " (e) } }
    };
    let mut m = page(&web, &headers, "Overview", q.msg.as_deref(), body).into_string();
    // Live without JavaScript: the page reloads itself.
    m = m.replacen(
        "<meta charset=\"utf-8\">",
        "<meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"5\">",
        1,
    );
    html_response(StatusCode::OK, PreEscaped(m))
}

fn task_table(rows: &[TaskRecord]) -> Markup {
    html! {
        @if rows.is_empty() {
            p.muted { "None." }
        } @else {
            table {
                tr { th{"id"} th{"func"} th{"name"} th{"state"} th{"attempts"} th{"group"}
                     th{"stopped"} th{"took"} th{"result"} }
                @for r in rows {
                    @let (state, class) = state_of(r);
                    tr {
                        td { a href={ "/tasks/" (r.id) } { (r.id) } }
                        td { (r.func) } td { (short(&r.name, 40)) }
                        td class=(class) { (state) }
                        td.n { (r.attempts) }
                        td { (r.group.as_deref().unwrap_or("")) }
                        td { @if r.stopped_us > 0 { (rfc3339(r.stopped_us)) } }
                        td.n { @if r.stopped_us >= r.started_us && r.stopped_us > 0 {
                            (format!("{:.1} ms", (r.stopped_us - r.started_us) as f64 / 1000.0))
                        } }
                        td { (short(r.result.as_deref().unwrap_or(""), 80)) }
                    }
                }
            }
        }
    }
}

#[derive(Debug, Deserialize, Default)]
struct TaskQuery {
    outcome: Option<String>,
    func: Option<String>,
    group: Option<String>,
    since: Option<String>,
    after: Option<String>,
}

fn nonempty(s: &Option<String>) -> Option<String> {
    s.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

async fn tasks(State(web): State<Web>, headers: HeaderMap, Query(q): Query<TaskQuery>) -> Response {
    if let Some(r) = gate(&web, &headers) {
        return r;
    }
    let mut problems = Vec::new();
    let outcome = match q.outcome.as_deref().unwrap_or("") {
        "" | "any" => Outcome::Any,
        "success" => Outcome::Success,
        "failure" => Outcome::Failure,
        "running" => Outcome::Running,
        other => {
            problems.push(format!(
                "outcome `{other}`: expected any, success, failure or running"
            ));
            Outcome::Any
        }
    };
    let since = nonempty(&q.since);
    let since_us = since
        .as_deref()
        .and_then(|s| match humantime::parse_duration(s) {
            Ok(d) => Some(now_us() - d.as_micros().min(i64::MAX as u128) as i64),
            Err(e) => {
                problems.push(format!("since `{s}`: {e} (e.g. 15m, 2h, 7d)"));
                None
            }
        });
    let after = nonempty(&q.after).and_then(|a| {
        let (stopped, id) = a.split_once('_')?;
        Some((stopped.parse().ok()?, id.to_owned()))
    });
    let b = Browse {
        outcome,
        func: nonempty(&q.func),
        group: nonempty(&q.group),
        since_us,
        after,
        limit: PAGE,
    };
    let rows = web.store.browse(&web.config.name, &b).await;
    let chosen = |v: &str| q.outcome.as_deref().unwrap_or("any") == v;
    let body = html! {
        form method="get" action="/tasks" {
            "outcome "
            select name="outcome" {
                @for v in ["any", "success", "failure", "running"] {
                    option value=(v) selected[chosen(v)] { (v) }
                }
            }
            " func " input name="func" value=(b.func.as_deref().unwrap_or("")) size="16";
            " group " input name="group" value=(b.group.as_deref().unwrap_or("")) size="16";
            " stopped within " input name="since" value=(since.as_deref().unwrap_or("")) size="6" placeholder="2h";
            " " button type="submit" { "Filter" }
        }
        @for p in &problems { div.msg { (p) } }
        @match &rows {
            Err(e) => div.msg { "Result store: " (e) },
            Ok(rows) => {
                (task_table(rows))
                @if rows.len() == PAGE {
                    @if let Some(last) = rows.last() {
                        @let next = next_link(&q, last);
                        a href=(next) { "Older →" }
                    }
                }
            }
        }
    };
    html_response(StatusCode::OK, page(&web, &headers, "Tasks", None, body))
}

fn next_link(q: &TaskQuery, last: &TaskRecord) -> String {
    let mut url = url_params(&[
        ("outcome", q.outcome.as_deref()),
        ("func", q.func.as_deref()),
        ("group", q.group.as_deref()),
        ("since", q.since.as_deref()),
    ]);
    url.push_str(&format!("&after={}_{}", last.stopped_us, last.id));
    url
}

fn url_params(params: &[(&str, Option<&str>)]) -> String {
    let mut s = String::from("/tasks?");
    let mut first = true;
    for (k, v) in params {
        if let Some(v) = v.filter(|v| !v.is_empty()) {
            if !first {
                s.push('&');
            }
            first = false;
            s.push_str(k);
            s.push('=');
            s.push_str(&percent(v));
        }
    }
    s
}

/// Everything but RFC 3986's unreserved characters is encoded (in a query value or a path
/// segment alike).
const ENCODED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Percent-encodes a query value or a path segment.
fn percent(v: &str) -> String {
    percent_encoding::utf8_percent_encode(v, ENCODED).to_string()
}

fn pretty(json: &str) -> String {
    serde_json::from_str::<serde_json::Value>(json)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| json.to_owned())
}

async fn task(State(web): State<Web>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Some(r) = gate(&web, &headers) {
        return r;
    }
    let Ok(tid) = id.parse::<TaskId>() else {
        return html_response(
            StatusCode::BAD_REQUEST,
            page(
                &web,
                &headers,
                "Task",
                Some(&format!("`{id}` is not a task id")),
                html! {},
            ),
        );
    };
    let r = match web.store.get(tid).await {
        Ok(Some(r)) => r,
        Ok(None) => {
            return html_response(
                StatusCode::NOT_FOUND,
                page(
                    &web,
                    &headers,
                    "Task",
                    Some(&format!("No result for task {tid} (yet).")),
                    html! {},
                ),
            );
        }
        Err(e) => {
            return html_response(
                StatusCode::SERVICE_UNAVAILABLE,
                page(
                    &web,
                    &headers,
                    "Task",
                    Some(&format!("Result store: {e}")),
                    html! {},
                ),
            );
        }
    };
    let (state, class) = state_of(&r);
    let body = html! {
        table {
            tr { th { "id" } td { (r.id) } }
            tr { th { "func" } td { (r.func) } }
            tr { th { "name" } td { (r.name) } }
            tr { th { "state" } td class=(class) { (state) } }
            tr { th { "attempts" } td { (r.attempts) } }
            tr { th { "group" } td { (r.group.as_deref().unwrap_or("")) } }
            tr { th { "cluster" } td { (r.cluster) } }
            tr { th { "enqueued" } td { (rfc3339(r.enqueued_us)) } }
            tr { th { "started" } td { (rfc3339(r.started_us)) } }
            tr { th { "stopped" } td { @if r.stopped_us > 0 { (rfc3339(r.stopped_us)) } } }
            tr { th { "took" } td { @if r.stopped_us >= r.started_us && r.stopped_us > 0 {
                (format!("{:.3} ms", (r.stopped_us - r.started_us) as f64 / 1000.0))
            } } }
            tr { th { "waited" } td { @if r.started_us >= r.enqueued_us && r.enqueued_us > 0 {
                (format!("{:.3} ms", (r.started_us - r.enqueued_us) as f64 / 1000.0))
            } } }
        }
        h2 { "Arguments" }
        pre id="args" { (pretty(&r.args)) }
        h2 { @if r.success { "Result" } @else { "Error" } }
        pre id="result" class=(if r.success { "" } else { "bad" }) {
            (r.result.as_deref().map(pretty).unwrap_or_default())
        }
    };
    html_response(StatusCode::OK, page(&web, &headers, "Task", None, body))
}

async fn dead(State(web): State<Web>, headers: HeaderMap, Query(q): Query<Msg>) -> Response {
    if let Some(r) = gate(&web, &headers) {
        return r;
    }
    let listed = crate::dead::list(&*web.broker, 200).await;
    let codec = web.client.codec();
    let body = html! {
        @match &listed {
            Err(e) => div.msg { "Broker: " (e) },
            Ok(list) if list.is_empty() => p { "No dead letters." },
            Ok(list) => {
                p.muted { "Oldest first, up to 200. A requeued package is verified again: one that fails stays here." }
                form.inline method="post" action="/dead/requeue" {
                    input type="hidden" name="all" value="1";
                    button type="submit" { "Requeue all" }
                }
                " "
                form.inline method="post" action="/dead/delete" {
                    input type="hidden" name="all" value="1";
                    button type="submit" { "Delete all" }
                }
                table {
                    tr { th{"set aside"} th{"message id"} th{"func"} th{"args"} th{"reason"} th{"deliveries"} th{""} }
                    @for d in list {
                        @let pkg = codec.decode(&d.payload).ok();
                        tr {
                            td { (rfc3339(d.dead_at_us)) }
                            td { (d.message_id) }
                            td { @if let Some(p) = &pkg { (p.func) } @else { span.bad { "(does not verify)" } } }
                            td { @if let Some(p) = &pkg { (short(&String::from_utf8_lossy(&p.args), 80)) } }
                            td { (d.reason) }
                            td.n { (opt(d.deliveries.map(u64::from))) }
                            td {
                                form.inline method="post" action="/dead/requeue" {
                                    input type="hidden" name="id" value=(d.message_id);
                                    button type="submit" { "Requeue" }
                                }
                                " "
                                form.inline method="post" action="/dead/delete" {
                                    input type="hidden" name="id" value=(d.message_id);
                                    button type="submit" { "Delete" }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    html_response(
        StatusCode::OK,
        page(&web, &headers, "Dead letters", q.msg.as_deref(), body),
    )
}

#[derive(Debug, Deserialize)]
struct Target {
    id: Option<String>,
    all: Option<String>,
}

fn back(to: &str, msg: &str) -> Response {
    Redirect::to(&format!("{to}?msg={}", percent(msg))).into_response()
}

async fn dead_requeue(
    State(web): State<Web>,
    headers: HeaderMap,
    Form(t): Form<Target>,
) -> Response {
    if let Some(r) = gate_change(&web, &headers) {
        return r;
    }
    let codec = web.client.codec();
    let msg = if t.all.is_some() {
        match crate::dead::requeue_all(&*web.broker, codec).await {
            Ok((n, refused)) if refused.is_empty() => format!("Requeued {n} packages."),
            Ok((n, refused)) => {
                // The message travels in the redirect's URL: the first few only.
                let shown: Vec<String> = refused
                    .iter()
                    .take(5)
                    .map(|(id, why)| format!("{id} ({})", short(why, 80)))
                    .collect();
                let more = refused.len().saturating_sub(shown.len());
                format!(
                    "Requeued {n} packages; {} refused and kept: {}{}",
                    refused.len(),
                    shown.join(", "),
                    if more > 0 {
                        format!(" and {more} more (qcluster dead list)")
                    } else {
                        String::new()
                    }
                )
            }
            Err(e) => format!("Requeue failed: {e}"),
        }
    } else if let Some(id) = t.id.filter(|i| !i.is_empty()) {
        let mid = MessageId(id.clone());
        match crate::dead::requeue(&*web.broker, codec, &mid).await {
            Ok(crate::dead::Requeue::Done) => format!("Requeued {id}."),
            Ok(crate::dead::Requeue::Missing) => format!("No dead letter {id}."),
            Ok(crate::dead::Requeue::Refused(why)) => {
                format!("Refused {id}: {why}. It stays here.")
            }
            Err(e) => format!("Requeue of {id} failed: {e}"),
        }
    } else {
        "Nothing to requeue: no id given.".into()
    };
    back("/dead", &msg)
}

async fn dead_delete(
    State(web): State<Web>,
    headers: HeaderMap,
    Form(t): Form<Target>,
) -> Response {
    if let Some(r) = gate_change(&web, &headers) {
        return r;
    }
    let msg = if t.all.is_some() {
        match crate::dead::delete_all(&*web.broker).await {
            Ok(n) => format!("Deleted {n} dead letters."),
            Err(e) => format!("Delete failed: {e}"),
        }
    } else if let Some(id) = t.id.filter(|i| !i.is_empty()) {
        match crate::dead::delete(&*web.broker, &MessageId(id.clone())).await {
            Ok(true) => format!("Deleted {id}."),
            Ok(false) => format!("No dead letter {id}."),
            Err(e) => format!("Delete of {id} failed: {e}"),
        }
    } else {
        "Nothing to delete: no id given.".into()
    };
    back("/dead", &msg)
}

async fn schedules(State(web): State<Web>, headers: HeaderMap, Query(q): Query<Msg>) -> Response {
    if let Some(r) = gate(&web, &headers) {
        return r;
    }
    let listed = web.client.schedules().await;
    let body = html! {
        @match &listed {
            Err(e) => div.msg { "Result store: " (e) },
            Ok(list) if list.is_empty() => p { "No schedules. Add one with " code { "qcluster schedule add" } "." },
            Ok(list) => table {
                tr { th{"name"} th{"func"} th{"kind"} th{"next run"} th{"last run"} th{"repeats"} th{"state"} th{""} }
                @for row in list {
                    @match row {
                        Err(bad) => tr { td colspan="8" class="bad" { (format!("{bad:?}")) } },
                        Ok(s) => tr {
                            td { (s.name) } td { (s.func) }
                            td { (s.kind) @if let Some(c) = &s.cron { " " code { (c) } }
                                 @if let Some(m) = s.minutes { " every " (m) " min" } }
                            td { (s.next_run.map(rfc3339).unwrap_or_else(|| "done".into())) }
                            td { (s.last_run.map(rfc3339).unwrap_or_default()) }
                            td.n { @if s.repeats < 0 { "forever" } @else { (s.repeats) } }
                            td { @if s.enabled { "active" } @else { span.muted { "paused" } } }
                            td {
                                @for action in ["pause", "resume", "run"] {
                                    form.inline method="post" action={ "/schedules/" (percent(&s.name)) "/" (action) } {
                                        button type="submit" { (action) }
                                    }
                                    " "
                                }
                            }
                        },
                    }
                }
            },
        }
    };
    html_response(
        StatusCode::OK,
        page(&web, &headers, "Schedules", q.msg.as_deref(), body),
    )
}

async fn schedule_action(
    State(web): State<Web>,
    headers: HeaderMap,
    Path((name, action)): Path<(String, String)>,
) -> Response {
    if let Some(r) = gate_change(&web, &headers) {
        return r;
    }
    let msg = match action.as_str() {
        "pause" => web
            .client
            .pause_schedule(&name)
            .await
            .map(|()| format!("Paused {name}.")),
        "resume" => web
            .client
            .resume_schedule(&name)
            .await
            .map(|()| format!("Resumed {name}.")),
        "run" => web
            .client
            .run_schedule(&name)
            .await
            .map(|id| format!("Enqueued {name} now as task {id}.")),
        other => Ok(format!("Unknown action `{other}`.")),
    }
    .unwrap_or_else(|e| e.to_string());
    back("/schedules", &msg)
}

#[derive(Debug, Deserialize)]
struct Login {
    token: String,
}

async fn login_form(State(web): State<Web>, headers: HeaderMap) -> Response {
    let body = html! {
        @if web.has_token() {
            form method="post" action="/login" {
                "Token " input type="password" name="token" autocomplete="current-password";
                " " button type="submit" { "Log in" }
            }
        } @else {
            p { "No token is set (http.token): the dashboard is read-only and needs no login." }
        }
    };
    html_response(StatusCode::OK, page(&web, &headers, "Log in", None, body))
}

async fn login(State(web): State<Web>, headers: HeaderMap, Form(l): Form<Login>) -> Response {
    match web.login_cookie(&l.token) {
        Some(cookie) => (
            StatusCode::SEE_OTHER,
            [
                (header::SET_COOKIE, cookie),
                (header::LOCATION, axum::http::HeaderValue::from_static("/")),
            ],
        )
            .into_response(),
        None => {
            // A wrong guess costs time.
            tokio::time::sleep(Duration::from_millis(500)).await;
            html_response(
                StatusCode::UNAUTHORIZED,
                page(
                    &web,
                    &headers,
                    "Log in",
                    Some("Wrong token."),
                    html! {
                        form method="post" action="/login" {
                            "Token " input type="password" name="token";
                            " " button type="submit" { "Log in" }
                        }
                    },
                ),
            )
        }
    }
}

async fn logout() -> Response {
    (
        StatusCode::SEE_OTHER,
        [
            (
                header::SET_COOKIE,
                format!("{COOKIE_NAME}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
            ),
            (header::LOCATION, "/".to_owned()),
        ],
    )
        .into_response()
}
