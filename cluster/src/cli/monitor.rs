//! `qcluster monitor`: a live terminal view (ratatui on crossterm) of every running cluster of
//! this name, the queue, tasks per second over the last minute and the latest failures.
//!
//! The promise: the terminal is given back as it was, on `q`, on Ctrl-C and on a panic
//! (ratatui's `init` installs a panic hook that restores it first). A broker or store that does
//! not answer is shown as such, with the last figures marked stale, and the view recovers by
//! itself when it answers again: connections are retried at every refresh.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use broker_core::{Broker, now_us};
use ratatui::Frame;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style, Stylize};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Paragraph, Row, Sparkline, Table};

use super::{Fail, Res};
use crate::broker::Brokers;
use crate::config::Config;
use crate::overview::Overview;
use crate::store::Store;

/// Latest failures fetched per refresh.
const FAILURES: usize = 100;
/// Points of the tasks/s sparkline (one per refresh).
const HISTORY: usize = 60;

/// What the view holds between refreshes.
#[derive(Default)]
struct View {
    overview: Overview,
    /// When the figures were last read successfully.
    fresh_at: Option<Instant>,
    /// Why the last refresh failed, if it did.
    problem: Option<String>,
    /// (when, processed by all clusters) at each refresh.
    samples: VecDeque<(Instant, u64)>,
    /// Tasks per second between refreshes, newest last.
    rates: VecDeque<u64>,
    scroll: usize,
    filter: String,
    editing: bool,
    endpoint: String,
}

impl View {
    fn note_processed(&mut self, total: u64) {
        let now = Instant::now();
        if let Some((t, p)) = self.samples.back() {
            let dt = now.duration_since(*t).as_secs_f64();
            if dt > 0.0 {
                // A cluster that stopped takes its total with it: no negative rate.
                let rate = total.saturating_sub(*p) as f64 / dt;
                self.rates.push_back(rate.round() as u64);
                while self.rates.len() > HISTORY {
                    self.rates.pop_front();
                }
            }
        }
        self.samples.push_back((now, total));
        while self.samples.len() > HISTORY + 1 {
            self.samples.pop_front();
        }
    }

    fn per_minute(&self) -> Option<f64> {
        let (t0, p0) = self.samples.front()?;
        let (t1, p1) = self.samples.back()?;
        let dt = t1.duration_since(*t0).as_secs_f64();
        (dt > 0.0).then(|| p1.saturating_sub(*p0) as f64 / dt)
    }
}

/// Connections, opened lazily and again after a failure.
struct Sources {
    broker: Option<Arc<dyn Broker>>,
    store: Option<Store>,
}

/// What one refresh read.
enum Fetched {
    /// The broker did not answer.
    Problem(String),
    /// The figures, and the broker's description when it was (re)connected.
    Figures(Box<Overview>, Option<String>),
}

/// Reads the figures, connecting (again) where needed. Touches no view state, so keys are
/// handled while it waits.
async fn fetch(config: &Config, brokers: &Brokers, src: &mut Sources) -> Fetched {
    let limit = Duration::from_secs(3);
    let mut endpoint = None;
    if src.broker.is_none() {
        match tokio::time::timeout(limit, brokers.connect(config)).await {
            Ok(Ok(b)) => {
                if let Ok(Ok(info)) = tokio::time::timeout(limit, b.info()).await {
                    endpoint = Some(format!("{} at {}", info.broker, info.endpoint));
                }
                src.broker = Some(b);
            }
            Ok(Err(e)) => return Fetched::Problem(format!("broker unreachable: {e}")),
            Err(_) => {
                return Fetched::Problem("broker unreachable: no answer within 3s".into());
            }
        }
    }
    if src.store.is_none()
        && let Ok(Ok(s)) = tokio::time::timeout(
            limit,
            Store::connect(&config.store_url(), config.store.connect_timeout),
        )
        .await
    {
        src.store = Some(s);
    }
    let Some(broker) = &src.broker else {
        return Fetched::Problem("broker unreachable".into());
    };
    let o = match &src.store {
        Some(store) => crate::overview::gather(broker, store, config, FAILURES).await,
        None => {
            let mut o = crate::overview::gather_broker(broker, config).await;
            o.store_error = Some("result store unreachable".into());
            o
        }
    };
    if let Some(e) = &o.broker_error {
        // Connect again next time.
        src.broker = None;
        return Fetched::Problem(format!("broker unreachable: {e}"));
    }
    if o.store_error.is_some() {
        src.store = None;
    }
    Fetched::Figures(Box::new(o), endpoint)
}

/// Puts what a refresh read on the view: a problem keeps the last good figures, marked stale.
fn apply(view: &mut View, fetched: Fetched) {
    let (o, endpoint) = match fetched {
        Fetched::Problem(p) => {
            view.problem = Some(p);
            return;
        }
        Fetched::Figures(o, endpoint) => (*o, endpoint),
    };
    if let Some(e) = endpoint {
        view.endpoint = e;
    }
    view.problem = None;
    view.fresh_at = Some(Instant::now());
    view.note_processed(o.clusters.iter().map(|c| c.totals.processed).sum());
    let failures = if o.store_error.is_some() {
        std::mem::take(&mut view.overview.failures)
    } else {
        o.failures.clone()
    };
    view.overview = o;
    view.overview.failures = failures;
}

fn age(us: i64) -> String {
    let s = (now_us() - us) as f64 / 1e6;
    if s < 100.0 {
        format!("{s:.1}s")
    } else {
        format!("{:.0}m", s / 60.0)
    }
}

fn uptime(secs: f64) -> String {
    let s = secs as u64;
    if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "n/a".into(), |v| v.to_string())
}

fn draw(f: &mut Frame, config: &Config, view: &View) {
    let o = &view.overview;
    let clusters_h = (o.clusters.len().max(1) + 3) as u16;
    let [top, clusters, queue, spark, failures, help] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(clusters_h.min(12)),
        Constraint::Length(1),
        Constraint::Length(5),
        Constraint::Min(4),
        Constraint::Length(1),
    ])
    .areas(f.area());

    let mut title = vec![Span::styled(
        format!(" qcluster monitor: {} ", config.name),
        Style::new().bold().reversed(),
    )];
    // A problem comes first: it must not be cut off by a long endpoint.
    match &view.problem {
        Some(p) => {
            let stale = view
                .fresh_at
                .map(|t| format!(", figures {:.0}s old", t.elapsed().as_secs_f64()))
                .unwrap_or_default();
            title.push(Span::styled(
                format!("  {p}; retrying{stale}"),
                Style::new().fg(Color::Red).bold(),
            ));
        }
        None => title.push(Span::raw(format!("  {}", view.endpoint))),
    }
    f.render_widget(Paragraph::new(Line::from(title)), top);

    let header = Row::new([
        "host",
        "pid",
        "label",
        "state",
        "busy/workers",
        "uptime",
        "processed",
        "failed",
        "reincarn.",
        "heartbeat",
    ])
    .style(Style::new().add_modifier(Modifier::BOLD));
    let rows: Vec<Row> = o
        .clusters
        .iter()
        .map(|c| {
            Row::new([
                Cell::from(c.host.clone()),
                Cell::from(c.pid.to_string()),
                Cell::from(c.label.clone()),
                Cell::from(c.state.clone()),
                Cell::from(format!("{}/{}", c.running, c.workers)),
                Cell::from(uptime(c.uptime_secs)),
                Cell::from(c.totals.processed.to_string()),
                Cell::from(c.totals.failed.to_string()),
                Cell::from(c.totals.reincarnations.to_string()),
                Cell::from(age(c.heartbeat_us)),
            ])
        })
        .collect();
    let empty = rows.is_empty();
    let table = Table::new(
        rows,
        [
            Constraint::Min(12),
            Constraint::Length(8),
            Constraint::Min(8),
            Constraint::Length(9),
            Constraint::Length(12),
            Constraint::Length(8),
            Constraint::Length(10),
            Constraint::Length(8),
            Constraint::Length(9),
            Constraint::Length(9),
        ],
    )
    .header(header)
    .block(Block::bordered().title(if empty {
        " clusters: none running ".to_owned()
    } else {
        format!(" clusters: {} ", o.clusters.len())
    }));
    f.render_widget(table, clusters);

    let rate_now = view.rates.back().copied().unwrap_or(0);
    let q = Line::from(vec![
        Span::raw(" queue: waiting "),
        Span::styled(opt(o.waiting), Style::new().bold()),
        Span::raw("  in flight "),
        Span::styled(opt(o.in_flight), Style::new().bold()),
        Span::raw("  dead letters "),
        Span::styled(opt(o.dead_letters), Style::new().bold()),
        Span::raw(format!(
            "   tasks/s: {rate_now} now, {:.1} over the last minute",
            view.per_minute().unwrap_or(0.0)
        )),
    ]);
    f.render_widget(Paragraph::new(q), queue);

    let data: Vec<u64> = view.rates.iter().copied().collect();
    f.render_widget(
        Sparkline::default()
            .block(Block::bordered().title(" tasks/s, last minute "))
            .data(&data)
            .style(Style::new().fg(Color::Green)),
        spark,
    );

    let shown: Vec<_> = o
        .failures
        .iter()
        .filter(|r| {
            view.filter.is_empty()
                || r.func.contains(&view.filter)
                || r.result.as_deref().unwrap_or("").contains(&view.filter)
        })
        .collect();
    let rows: Vec<Row> = shown
        .iter()
        .skip(view.scroll)
        .map(|r| {
            Row::new([
                Cell::from(
                    crate::store::rfc3339(r.stopped_us)
                        .chars()
                        .take(19)
                        .collect::<String>(),
                ),
                Cell::from(r.func.clone()),
                Cell::from(r.id.to_string()),
                Cell::from(r.attempts.to_string()),
                Cell::from(
                    r.result
                        .as_deref()
                        .unwrap_or("")
                        .trim_matches('"')
                        .replace('\n', " "),
                ),
            ])
        })
        .collect();
    let mut ftitle = format!(" latest failures: {}", shown.len());
    if !view.filter.is_empty() || view.editing {
        ftitle.push_str(&format!(
            " (filter: {}{}) ",
            view.filter,
            if view.editing { "▏" } else { "" }
        ));
    }
    if let Some(e) = &o.store_error {
        ftitle.push_str(&format!(" [{e}]"));
    }
    let ftable = Table::new(
        rows,
        [
            Constraint::Length(19),
            Constraint::Length(16),
            Constraint::Length(36),
            Constraint::Length(3),
            Constraint::Min(20),
        ],
    )
    .header(Row::new(["stopped", "func", "id", "try", "error"]).bold())
    .block(Block::bordered().title(ftitle));
    f.render_widget(ftable, failures);

    let keys = if view.editing {
        " type to filter failures by func or error · Enter keeps · Esc clears "
    } else {
        " q quit · ↑/↓ PgUp/PgDn scroll failures · f filter failures "
    };
    f.render_widget(Paragraph::new(keys).dim(), help);
}

/// Handles one key; true to quit.
fn key(view: &mut View, code: KeyCode, mods: KeyModifiers) -> bool {
    if mods.contains(KeyModifiers::CONTROL) && code == KeyCode::Char('c') {
        return true;
    }
    if view.editing {
        match code {
            KeyCode::Enter => view.editing = false,
            KeyCode::Esc => {
                view.filter.clear();
                view.editing = false;
            }
            KeyCode::Backspace => {
                view.filter.pop();
            }
            KeyCode::Char(c) => view.filter.push(c),
            _ => {}
        }
        view.scroll = 0;
        return false;
    }
    match code {
        KeyCode::Char('q') | KeyCode::Esc => return true,
        KeyCode::Char('f') => view.editing = true,
        KeyCode::Down => view.scroll = view.scroll.saturating_add(1),
        KeyCode::Up => view.scroll = view.scroll.saturating_sub(1),
        KeyCode::PageDown => view.scroll = view.scroll.saturating_add(10),
        KeyCode::PageUp => view.scroll = view.scroll.saturating_sub(10),
        KeyCode::Home => view.scroll = 0,
        _ => {}
    }
    let max = view.overview.failures.len().saturating_sub(1);
    view.scroll = view.scroll.min(max);
    false
}

/// How waiting on the view ended.
enum Step<T> {
    /// What was waited for.
    Done(T),
    /// The user quit (`Ok`), or the terminal failed.
    Quit(Res),
}

/// Draws the view and handles keys (and SIGINT) until `wait` completes.
async fn until<T>(
    terminal: &mut ratatui::DefaultTerminal,
    config: &Config,
    view: &mut View,
    keys: &mut tokio::sync::mpsc::UnboundedReceiver<(KeyCode, KeyModifiers)>,
    wait: impl Future<Output = T>,
) -> Step<T> {
    tokio::pin!(wait);
    loop {
        if let Err(e) = terminal.draw(|f| draw(f, config, view)) {
            return Step::Quit(Err(Fail::runtime(format!("cannot draw: {e}"))));
        }
        tokio::select! {
            v = &mut wait => return Step::Done(v),
            k = keys.recv() => match k {
                Some((code, mods)) => {
                    if key(view, code, mods) {
                        return Step::Quit(Ok(()));
                    }
                }
                None => return Step::Quit(Ok(())),
            },
            // SIGINT from outside the terminal: leave the same way as `q`.
            _ = tokio::signal::ctrl_c() => return Step::Quit(Ok(())),
        }
    }
}

/// Runs the view until `q`.
pub(super) async fn run(config: &Config, brokers: &Brokers, every: Duration) -> Res {
    if !std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        return Err(Fail::usage(
            "monitor needs a terminal; use `qcluster info --json` or /stats.json from scripts",
        ));
    }
    let every = every.max(Duration::from_millis(200));
    // Keys are read on a thread of their own (crossterm's reads block).
    let (keys_tx, mut keys) = tokio::sync::mpsc::unbounded_channel();
    let quit = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader_quit = quit.clone();
    std::thread::spawn(move || {
        while !reader_quit.load(std::sync::atomic::Ordering::Relaxed) {
            match event::poll(Duration::from_millis(100)) {
                Ok(true) => match event::read() {
                    Ok(Event::Key(k)) if k.kind != KeyEventKind::Release => {
                        if keys_tx.send((k.code, k.modifiers)).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                },
                Ok(false) => {}
                Err(_) => return,
            }
        }
    });
    let mut terminal = match ratatui::try_init() {
        Ok(t) => t,
        Err(e) => {
            quit.store(true, std::sync::atomic::Ordering::Relaxed);
            return Err(Fail::runtime(format!("cannot set up the terminal: {e}")));
        }
    };
    let mut view = View::default();
    let mut src = Sources {
        broker: None,
        store: None,
    };
    let result = loop {
        // A refresh runs while keys are handled and the view redrawn: `q` quits at once even
        // when the broker hangs.
        let fetched = match until(
            &mut terminal,
            config,
            &mut view,
            &mut keys,
            fetch(config, brokers, &mut src),
        )
        .await
        {
            Step::Done(f) => f,
            Step::Quit(r) => break r,
        };
        apply(&mut view, fetched);
        let pause = tokio::time::sleep(every);
        if let Step::Quit(r) = until(&mut terminal, config, &mut view, &mut keys, pause).await {
            break r;
        }
    };
    quit.store(true, std::sync::atomic::Ordering::Relaxed);
    ratatui::restore();
    result
}
