//! The live web dashboard on the HTTP listener: server-rendered HTML with its CSS and a few lines of plain
//! JavaScript embedded in the binary (no build step).
//!
//! - `/`: throughput and failures over the last ten minutes (a graph), queues by state, workers and what each
//!   runs now; refreshed every 2 s.
//! - `/task/{id}` (and `/task?id=` from the search box): a task's state, arguments, context, result or error with
//!   its traceback, attempts and timeline.
//! - `/dead`: the dead set, each task with Requeue and Delete.
//! - `/login`: with tokens configured, the pages need an admin token, by `Authorization: Bearer` or a cookie the
//!   login form sets (HttpOnly, SameSite=Strict, so other sites cannot post the forms with it).
//!
//! Every page and form goes through the [`TaskStore`] seam, so the dashboard is the same over either store. Over
//! PostgreSQL, queues, tasks and the dead set are the database's (every daemon's); the graph's counts and the
//! workers are this daemon's (what went through it, the connections it serves). It never touches a store
//! directly, and reports a change (requeue, pause, delete) done only once it is durable.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Form, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use broker_client::proto::{DeadRequeue, LimitInfo, ScheduleInfo, Stats, TaskInfo, TaskState};

use crate::cmd::{self, Shared};
use crate::config::Role;
use crate::engine::{Op, TaskStore};
use crate::json::value_to_json;
use crate::store::{ConnId, Running, StoreError};

/// How often the graph takes a sample, and how many it keeps (ten minutes).
const SAMPLE_EVERY: Duration = Duration::from_secs(2);
const SAMPLES: usize = 300;

/// The dashboard's state: the daemon, and the recent samples of its counters for the graph.
pub struct Dash {
    shared: Arc<Shared>,
    /// The listener's address: on a daemon without tokens, requests must name it (or localhost) as their Host.
    addr: std::net::SocketAddr,
    samples: Mutex<VecDeque<Sample>>,
}

#[derive(Clone, Copy)]
struct Sample {
    at_ms: u64,
    succeeded: u64,
    failed: u64,
}

/// The dashboard's routes, and the task that samples the counters until the daemon stops.
pub fn routes(shared: Arc<Shared>, addr: std::net::SocketAddr) -> Router {
    let dash = Arc::new(Dash { shared, addr, samples: Mutex::new(VecDeque::new()) });
    tokio::spawn(sample(dash.clone()));
    Router::new()
        .route("/", get(overview))
        .route("/task", get(search))
        .route("/task/{id}", get(task))
        .route("/task/delete", post(delete))
        .route("/dead", get(dead))
        .route("/dead/requeue", post(requeue))
        .route("/queue/pause", post(pause))
        .route("/login", get(login_form).post(login))
        .route("/metrics", get(metrics))
        .with_state(dash)
}

async fn sample(dash: Arc<Dash>) {
    let shutdown = dash.shared.shutdown.clone();
    let mut every = tokio::time::interval(SAMPLE_EVERY);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let tasks = dash.shared.tasks();
        let totals = tasks.totals();
        let sample = Sample { at_ms: tasks.now_ms(), succeeded: totals.succeeded, failed: totals.failed };
        let mut samples = dash.samples.lock().unwrap_or_else(|p| p.into_inner());
        samples.push_back(sample);
        while samples.len() > SAMPLES {
            samples.pop_front();
        }
    }
}

// --- access ------------------------------------------------------------------------------------------------

const COOKIE: &str = "broker_token";

/// Whether the request is an admin's: always on a daemon without tokens; else a bearer token or the cookie.
pub fn is_admin(shared: &Shared, headers: &HeaderMap) -> bool {
    if shared.config.tokens.is_empty() {
        return true;
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string());
    let cookie = headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(|cookies| {
        cookies.split(';').find_map(|c| c.trim().strip_prefix(COOKIE).and_then(|v| v.strip_prefix('=')).and_then(unhex))
    });
    bearer.or(cookie).and_then(|t| shared.config.role_of(&t)) == Some(Role::Admin)
}

/// The cookie holds the token hex-encoded: a token may hold characters a cookie may not.
fn hex(text: &str) -> String {
    text.bytes().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

fn unhex(text: &str) -> Option<String> {
    let bytes: Option<Vec<u8>> =
        (0..text.len()).step_by(2).map(|i| text.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect();
    String::from_utf8(bytes?).ok()
}

/// Refuses what a web page elsewhere could make the operator's browser send (`Some`: the refusal).
///
/// - On a daemon without tokens, every request is an admin's, so the Host must be this listener's own address
///   (or `localhost` with its port): a DNS-rebound name pointing here is refused.
/// - A form post from another origin (its `Origin` header names another host) is refused, tokens or not.
pub fn refuse(dash: &Dash, headers: &HeaderMap, post: bool) -> Option<Response> {
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    if dash.shared.config.tokens.is_empty() {
        let port = dash.addr.port();
        let own =
            [dash.addr.to_string(), format!("localhost:{port}"), format!("127.0.0.1:{port}"), format!("[::1]:{port}")];
        if !own.iter().any(|h| h.eq_ignore_ascii_case(host)) {
            return Some((StatusCode::FORBIDDEN, "the Host header does not name this listener\n").into_response());
        }
    }
    if post {
        if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
            let authority = origin.split_once("://").map_or(origin, |(_, rest)| rest);
            if !authority.eq_ignore_ascii_case(host) {
                return Some((StatusCode::FORBIDDEN, "a form from another site\n").into_response());
            }
        }
    }
    None
}

/// What a page or form answers instead of itself, if anything: a refusal ([`refuse`]), or the login page for a
/// request that is not an admin's.
fn gate(dash: &Dash, headers: &HeaderMap, post: bool) -> Option<Response> {
    if let Some(refused) = refuse(dash, headers, post) {
        return Some(refused);
    }
    (!is_admin(&dash.shared, headers)).then(to_login)
}

/// The response for a request that is not an admin's: the login page.
fn to_login() -> Response {
    Redirect::to("/login").into_response()
}

async fn login_form() -> Response {
    page("Sign in", "", &login_body(None), false)
}

fn login_body(error: Option<&str>) -> String {
    let error = error.map(|e| format!(r#"<p class="error">{}</p>"#, esc(e))).unwrap_or_default();
    format!(
        r#"<section class="card narrow"><h2>Sign in</h2>{error}<form method="post" action="/login">
<label for="token">Admin token</label><input id="token" name="token" type="password" autocomplete="current-password" autofocus>
<button type="submit">Sign in</button></form></section>"#
    )
}

#[derive(serde::Deserialize)]
struct Login {
    token: String,
}

async fn login(State(dash): State<Arc<Dash>>, headers: HeaderMap, Form(form): Form<Login>) -> Response {
    if let Some(refused) = refuse(&dash, &headers, true) {
        return refused;
    }
    if dash.shared.config.role_of(&form.token) != Some(Role::Admin) {
        let body = page("Sign in", "", &login_body(Some("That is not an admin token.")), false);
        return (StatusCode::UNAUTHORIZED, body).into_response();
    }
    let cookie = format!("{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/", hex(&form.token));
    ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
}

// --- pages -------------------------------------------------------------------------------------------------

async fn metrics(State(dash): State<Arc<Dash>>, headers: HeaderMap) -> Response {
    if let Some(refused) = refuse(&dash, &headers, false) {
        return refused;
    }
    crate::http::metrics(&dash.shared, &headers).await
}

async fn overview(State(dash): State<Arc<Dash>>, headers: HeaderMap) -> Response {
    if let Some(turned_away) = gate(&dash, &headers, false) {
        return turned_away;
    }
    // Asked for together: over PostgreSQL they may share one round trip.
    let tasks = dash.shared.tasks();
    let (stats, schedules, limits, running) =
        (tasks.stats(), tasks.schedules(), tasks.limits(), tasks.running_by_conn(5));
    let read = tokio::try_join!(stats.resolve(), schedules.resolve(), limits.resolve(), running.resolve());
    let (stats, schedules, limits, running) = match read {
        Ok(read) => read,
        Err(e) => return failed(e),
    };
    let stats = cmd::stats_of(&dash.shared, stats);
    let body = overview_body(&dash, &stats, &schedules, &limits, &running);
    if headers.contains_key("x-partial") {
        return Html(body).into_response();
    }
    page("Overview", "overview", &body, true).into_response()
}

fn overview_body(
    dash: &Dash,
    stats: &Stats,
    schedules: &[ScheduleInfo],
    limits: &[LimitInfo],
    running: &[(ConnId, Vec<Running>)],
) -> String {
    let now = dash.shared.tasks().now_ms();
    let samples: Vec<Sample> = dash.samples.lock().unwrap_or_else(|p| p.into_inner()).iter().copied().collect();
    // Counted over the last minute of samples (or what there is of it), not extrapolated.
    let last_minute = |field: fn(&Sample) -> u64| -> String {
        let last = samples.last();
        let minute_ago = samples.iter().find(|s| last.is_some_and(|l| l.at_ms - s.at_ms <= 60_000));
        match (minute_ago, last) {
            (Some(a), Some(b)) => (field(b) - field(a)).to_string(),
            _ => "–".into(),
        }
    };
    let sum = |f: fn(&broker_client::proto::QueueStats) -> u64| stats.queues.iter().map(f).sum::<u64>();
    let mut out = String::new();
    let cards = [
        ("Succeeded, last minute", last_minute(|s| s.succeeded), "ok"),
        ("Failed, last minute", last_minute(|s| s.failed), "bad"),
        ("Waiting", (sum(|q| q.ready) + sum(|q| q.scheduled)).to_string(), ""),
        ("Running", sum(|q| q.leased).to_string(), "run"),
        ("Dead", sum(|q| q.dead).to_string(), "bad"),
        ("Workers", stats.workers.len().to_string(), ""),
        ("Connections", stats.connections.to_string(), ""),
        ("Uptime", duration(stats.uptime_ms), ""),
    ];
    out.push_str(r#"<section class="cards">"#);
    for (label, value, class) in cards {
        let _ = write!(
            out,
            r#"<div class="card stat {class}"><div class="value">{}</div><div class="label">{label}</div></div>"#,
            esc(&value)
        );
    }
    out.push_str("</section>");
    let _ = write!(out, r#"<section class="card"><h2>Throughput, last 10 minutes</h2>{}</section>"#, chart(&samples));

    out.push_str(r#"<section class="card"><h2>Queues</h2><table id="queues"><thead><tr><th>Queue</th><th class="n">Ready</th><th class="n">Scheduled</th><th class="n">Running</th><th class="n">Succeeded</th><th class="n">Failed</th><th class="n">Dead</th><th>Leasing</th></tr></thead><tbody>"#);
    if stats.queues.is_empty() {
        out.push_str(r#"<tr><td colspan="8" class="empty">No queues yet: enqueue a task.</td></tr>"#);
    }
    for q in &stats.queues {
        let dead = if q.dead > 0 {
            format!(r#"<a class="badge FAILURE" href="/dead?queue={}">{}</a>"#, url_escape(&q.name), q.dead)
        } else {
            "0".into()
        };
        // Pause and resume for every worker at once (proto.md, `pause`).
        let (state, action, flag) = if q.paused {
            (r#"<span class="badge REVOKED">paused</span>"#, "Resume", "0")
        } else {
            ("on", "Pause", "1")
        };
        let _ = write!(
            out,
            r#"<tr class="queue" data-queue="{name}" data-paused="{paused}"><td class="name">{name}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{dead}</td><td><div class="actions row">{state}<form method="post" action="/queue/pause"><input type="hidden" name="queue" value="{name}"><input type="hidden" name="paused" value="{flag}"><button class="pause">{action}</button></form></div></td></tr>"#,
            q.ready,
            q.scheduled,
            q.leased,
            q.succeeded,
            q.failed,
            name = esc(&q.name),
            paused = q.paused,
        );
    }
    out.push_str("</tbody></table></section>");

    if !schedules.is_empty() {
        out.push_str(r#"<section class="card"><h2>Schedules</h2><table id="schedules"><thead><tr><th>Schedule</th><th>Task</th><th>When</th><th>Next</th><th>Last</th></tr></thead><tbody>"#);
        for s in schedules {
            let timing = match (&s.cron, s.every_ms) {
                (Some(cron), _) => format!("{cron} {}", s.timezone.as_deref().unwrap_or("UTC")),
                (None, Some(ms)) => format!("every {}", duration(ms)),
                _ => String::new(),
            };
            let next = match s.next_ms {
                _ if s.paused => r#"<span class="badge REVOKED">paused</span>"#.to_string(),
                Some(at) => when(now, at),
                None => "–".into(),
            };
            let last = s.last_ms.map_or_else(|| "–".into(), |at| when(now, at));
            let _ = write!(
                out,
                r#"<tr class="schedule"><td class="name">{}</td><td>{}</td><td>{}</td><td>{next}</td><td>{last}</td></tr>"#,
                esc(&s.name),
                esc(&s.task.task),
                esc(&timing)
            );
        }
        out.push_str("</tbody></table></section>");
    }
    if !limits.is_empty() {
        out.push_str(r#"<section class="card"><h2>Limits</h2><table id="limits"><thead><tr><th>On</th><th>Name</th><th>Rate</th><th class="n">Concurrency</th><th class="n">Running</th></tr></thead><tbody>"#);
        for l in limits {
            let _ = write!(
                out,
                r#"<tr class="limit"><td>{}</td><td class="name">{}</td><td>{}</td><td class="n">{}</td><td class="n">{}</td></tr>"#,
                esc(&l.scope),
                esc(&l.name),
                esc(l.rate.as_deref().unwrap_or("–")),
                l.concurrency.map_or_else(|| "–".into(), |c| c.to_string()),
                l.running
            );
        }
        out.push_str("</tbody></table></section>");
    }

    let connections = dash.shared.connections.lock().unwrap_or_else(|p| p.into_inner()).clone();
    out.push_str(r#"<section class="card"><h2>Workers</h2><table id="workers"><thead><tr><th>Worker</th><th>Queues</th><th>Address</th><th>Connected</th><th class="n">Leased</th><th>Running now</th></tr></thead><tbody>"#);
    if stats.workers.is_empty() {
        out.push_str(r#"<tr><td colspan="6" class="empty">No worker has connected.</td></tr>"#);
    }
    let mut workers: Vec<_> = connections.iter().filter(|(_, info)| info.leases).collect();
    workers.sort_by_key(|(conn, info)| (info.connected_at_ms, **conn));
    for (conn, info) in workers {
        let tasks = running.iter().find(|(c, _)| c == conn).map(|(_, t)| t.as_slice()).unwrap_or(&[]);
        let mut now_running = String::new();
        for (id, task, started) in tasks {
            let _ = write!(
                now_running,
                r#"<a class="chip" href="/task/{path}" title="{id}">{task} <span class="muted">{}</span></a> "#,
                ago(now, *started),
                path = url_escape(id),
                id = esc(id),
                task = esc(task)
            );
        }
        if now_running.is_empty() {
            now_running = r#"<span class="muted">idle</span>"#.into();
        }
        let _ = write!(
            out,
            r#"<tr class="worker"><td class="name">{}</td><td>{}</td><td>{}</td><td>{}</td><td class="n">{}</td><td>{now_running}</td></tr>"#,
            esc(if info.client.is_empty() { "(unnamed)" } else { &info.client }),
            esc(&info.queues.join(", ")),
            esc(&info.addr),
            ago(now, info.connected_at_ms),
            tasks.len().max(stats.workers.iter().find(|w| w.addr == info.addr).map_or(0, |w| w.leased as usize)),
        );
    }
    out.push_str("</tbody></table></section>");
    out
}

/// An SVG graph of succeeded and failed tasks per second, one point per sample.
fn chart(samples: &[Sample]) -> String {
    if samples.len() < 2 {
        return r#"<p class="muted">Collecting: the graph appears after a few seconds.</p>"#.into();
    }
    let rates: Vec<(f64, f64)> = samples
        .windows(2)
        .map(|w| {
            let secs = (w[1].at_ms.saturating_sub(w[0].at_ms)).max(1) as f64 / 1000.0;
            ((w[1].succeeded - w[0].succeeded) as f64 / secs, (w[1].failed - w[0].failed) as f64 / secs)
        })
        .collect();
    let top = rates.iter().map(|(s, f)| s.max(*f)).fold(1.0, f64::max);
    let (width, height) = (600.0, 120.0);
    let step = width / (SAMPLES - 1) as f64;
    let start = width - step * (rates.len() - 1) as f64;
    let line = |pick: fn(&(f64, f64)) -> f64| -> String {
        rates
            .iter()
            .enumerate()
            .map(|(i, r)| format!("{:.1},{:.1}", start + step * i as f64, height - pick(r) / top * (height - 4.0)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!(
        r#"<svg class="chart" viewBox="0 0 {width} {height}" preserveAspectRatio="none" role="img" aria-label="tasks per second">
<line x1="0" y1="{height}" x2="{width}" y2="{height}" class="axis"/>
<polyline points="{}" class="ok"/><polyline points="{}" class="bad"/></svg>
<div class="legend"><span class="ok">■ succeeded/s</span> <span class="bad">■ failed/s</span> <span class="muted">peak {top:.0}/s</span></div>"#,
        line(|r| r.0),
        line(|r| r.1)
    )
}

#[derive(serde::Deserialize)]
struct Search {
    id: Option<String>,
}

async fn search(Query(search): Query<Search>) -> Response {
    match search.id.map(|id| id.trim().to_string()).filter(|id| !id.is_empty()) {
        Some(id) => Redirect::to(&format!("/task/{}", url_escape(&id))).into_response(),
        None => Redirect::to("/").into_response(),
    }
}

async fn task(State(dash): State<Arc<Dash>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if let Some(turned_away) = gate(&dash, &headers, false) {
        return turned_away;
    }
    let tasks = dash.shared.tasks();
    let read = async {
        let info = tasks.get_info(&id).resolve().await?;
        // Only a failed task may be in the dead set.
        let dead = info.state == TaskState::Failure && tasks.in_dead_set(&id).resolve().await?;
        Ok::<_, StoreError>((info, dead))
    };
    match read.await {
        Ok((info, dead)) => {
            page(&format!("Task {id}"), "", &task_body(&info, dead, tasks.now_ms()), false).into_response()
        }
        Err(StoreError::NotFound(_)) => {
            let body = format!(
                r#"<section class="card"><h2>No task {}</h2><p class="muted">Never enqueued, purged, or its result expired.</p></section>"#,
                esc(&id)
            );
            (StatusCode::NOT_FOUND, page("Not found", "", &body, false)).into_response()
        }
        Err(e) => failed(e),
    }
}

fn task_body(info: &TaskInfo, dead: bool, now: u64) -> String {
    let json = |v: serde_json::Value| esc(&serde_json::to_string_pretty(&v).unwrap_or_default());
    let mut out = format!(
        r#"<section class="card"><div class="title"><h2 id="task-id">{id}</h2><span class="badge {state}" id="task-state">{state}</span></div>
<table class="fields"><tr><th>Task</th><td id="task-name">{task}</td></tr><tr><th>Queue</th><td>{queue}</td></tr>
<tr><th>Attempts</th><td>{attempts} of {total}</td></tr><tr><th>Priority</th><td>{priority}</td></tr></table>"#,
        id = esc(&info.id),
        state = info.state.as_str(),
        task = esc(&info.task),
        queue = esc(&info.queue),
        attempts = info.attempts,
        total = u64::from(info.max_retries) + 1,
        priority = info.priority,
    );
    let finished = matches!(info.state, TaskState::Success | TaskState::Failure | TaskState::Revoked);
    if finished {
        let _ = write!(out, r#"<div class="actions">"#);
        if dead {
            let _ = write!(
                out,
                r#"<form method="post" action="/dead/requeue"><input type="hidden" name="id" value="{id}"><button class="requeue">Requeue</button></form>"#,
                id = esc(&info.id)
            );
        }
        let _ = write!(
            out,
            r#"<form method="post" action="/task/delete"><input type="hidden" name="id" value="{id}"><button class="delete danger">Delete</button></form></div>"#,
            id = esc(&info.id)
        );
    }
    out.push_str("</section>");

    out.push_str(r#"<section class="card"><h2>Timeline</h2><ol class="timeline">"#);
    let mut events = vec![("Enqueued", Some(info.created_at_ms))];
    if info.eta_ms.is_some() {
        events.push(("Due", info.eta_ms));
    }
    events.push(("Started", info.started_at_ms));
    events.push(("Finished", info.finished_at_ms));
    if info.result_expires_at_ms.is_some() {
        events.push(("Kept until", info.result_expires_at_ms));
    }
    for (label, at) in events.into_iter().filter_map(|(l, at)| at.map(|at| (l, at))) {
        let _ = write!(
            out,
            r#"<li><span class="label">{label}</span> <span title="{at} ms since the epoch">{}</span></li>"#,
            when(now, at)
        );
    }
    out.push_str("</ol></section>");

    let args = serde_json::Value::Array(info.args.iter().map(value_to_json).collect());
    let map = |m: &std::collections::BTreeMap<String, broker_client::proto::Value>| {
        serde_json::Value::Object(m.iter().map(|(k, v)| (k.clone(), value_to_json(v))).collect())
    };
    let _ = write!(
        out,
        r#"<section class="card grid"><div><h3>Arguments</h3><pre id="task-args">{}</pre></div><div><h3>Keyword arguments</h3><pre>{}</pre></div><div class="wide"><h3>Context</h3><pre>{}</pre></div></section>"#,
        json(args),
        json(map(&info.kwargs)),
        json(map(&info.context))
    );
    if let Some(progress) = &info.progress {
        let _ = write!(
            out,
            r#"<section class="card"><h3>Progress</h3><p><span class="badge STARTED" id="task-progress-state">{}</span> <span class="muted">{}</span></p><pre id="task-progress">{}</pre></section>"#,
            esc(&progress.state),
            when(now, progress.at_ms),
            json(value_to_json(&progress.meta))
        );
    }
    // The workflow it belongs to: links still to come, its chord.
    let mut links = String::new();
    for (label, ids) in [("Then", &info.chain), ("Members", &info.members)] {
        if ids.is_empty() {
            continue;
        }
        let chips: Vec<String> = ids
            .iter()
            .map(|id| format!(r#"<a class="chip" href="/task/{}">{}</a>"#, url_escape(id), esc(id)))
            .collect();
        let _ = write!(links, r#"<tr><th>{label}</th><td>{}</td></tr>"#, chips.join(" "));
    }
    if let Some(callback) = &info.chord {
        let _ = write!(
            links,
            r#"<tr><th>Chord callback</th><td><a class="chip" href="/task/{}">{}</a></td></tr>"#,
            url_escape(callback),
            esc(callback)
        );
    }
    if !links.is_empty() {
        let _ = write!(
            out,
            r#"<section class="card"><h3>Workflow</h3><table class="fields" id="task-workflow">{links}</table></section>"#
        );
    }
    if let Some(result) = &info.result {
        let _ = write!(
            out,
            r#"<section class="card"><h3>Result</h3><pre id="task-result">{}</pre></section>"#,
            json(value_to_json(result))
        );
    }
    if let Some(error) = &info.error {
        let _ = write!(
            out,
            r#"<section class="card error-box"><h3>Error</h3><p id="task-error"><strong>{}</strong>: {}</p>{}</section>"#,
            esc(&error.kind),
            esc(&error.message),
            error
                .traceback
                .as_ref()
                .map(|tb| format!("<pre class=\"traceback\">{}</pre>", esc(tb)))
                .unwrap_or_default()
        );
    }
    out
}

#[derive(serde::Deserialize)]
struct DeadQuery {
    queue: Option<String>,
}

async fn dead(State(dash): State<Arc<Dash>>, Query(query): Query<DeadQuery>, headers: HeaderMap) -> Response {
    if let Some(turned_away) = gate(&dash, &headers, false) {
        return turned_away;
    }
    let tasks = match dash.shared.tasks().dead_list(query.queue.as_deref(), 200).resolve().await {
        Ok(tasks) => tasks,
        Err(e) => return failed(e),
    };
    let now = dash.shared.tasks().now_ms();
    let mut out = String::from(r#"<section class="card"><h2>Dead tasks"#);
    if let Some(queue) = &query.queue {
        let _ = write!(
            out,
            r#" in <span class="name">{}</span> <a class="muted" href="/dead">(all queues)</a>"#,
            esc(queue)
        );
    }
    out.push_str(r#"</h2><table id="dead"><thead><tr><th>Task</th><th>Queue</th><th>Error</th><th>Failed</th><th></th></tr></thead><tbody>"#);
    if tasks.is_empty() {
        out.push_str(r#"<tr><td colspan="5" class="empty">Nothing has failed for good.</td></tr>"#);
    }
    for t in &tasks {
        let error = t
            .error
            .as_ref()
            .map(|e| format!("<strong>{}</strong>: {}", esc(&e.kind), esc(&e.message)))
            .unwrap_or_default();
        let _ = write!(
            out,
            r#"<tr class="dead-row" data-id="{id}"><td><a href="/task/{path}">{task}</a><div class="muted mono">{id}</div></td><td>{queue}</td><td class="error">{error}</td><td>{}</td>
<td><div class="actions row"><form method="post" action="/dead/requeue"><input type="hidden" name="id" value="{id}"><button class="requeue">Requeue</button></form><form method="post" action="/task/delete"><input type="hidden" name="id" value="{id}"><button class="delete danger">Delete</button></form></div></td></tr>"#,
            t.finished_at_ms.map(|at| ago(now, at)).unwrap_or_default(),
            path = url_escape(&t.id),
            id = esc(&t.id),
            task = esc(&t.task),
            queue = esc(&t.queue),
        );
    }
    out.push_str("</tbody></table></section>");
    if headers.contains_key("x-partial") {
        return Html(out).into_response();
    }
    page("Dead tasks", "dead", &out, true).into_response()
}

#[derive(serde::Deserialize)]
struct Target {
    id: String,
}

async fn requeue(State(dash): State<Arc<Dash>>, headers: HeaderMap, Form(target): Form<Target>) -> Response {
    if let Some(turned_away) = gate(&dash, &headers, true) {
        return turned_away;
    }
    let request = DeadRequeue { ids: vec![target.id.clone()], queue: None };
    if let Err(e) = durable(&dash, dash.shared.tasks().dead_requeue(&request)).await {
        return failed(e);
    }
    tracing::info!(task = %target.id, "requeued from the dashboard");
    Redirect::to("/dead").into_response()
}

#[derive(serde::Deserialize)]
struct PauseForm {
    queue: String,
    /// "1" to pause, "0" to resume.
    paused: String,
}

async fn pause(State(dash): State<Arc<Dash>>, headers: HeaderMap, Form(form): Form<PauseForm>) -> Response {
    if let Some(turned_away) = gate(&dash, &headers, true) {
        return turned_away;
    }
    let paused = form.paused == "1";
    let queue = form.queue.clone();
    match flow_change(&dash, move |tasks| tasks.set_paused(&queue, paused)).await {
        Ok(_) => {}
        Err(e @ StoreError::Invalid(_)) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
        Err(e) => return failed(e),
    }
    tracing::info!(queue = %form.queue, paused, "queue paused or resumed from the dashboard");
    Redirect::to("/").into_response()
}

async fn delete(State(dash): State<Arc<Dash>>, headers: HeaderMap, Form(Target { id }): Form<Target>) -> Response {
    if let Some(turned_away) = gate(&dash, &headers, true) {
        return turned_away;
    }
    match durable(&dash, dash.shared.tasks().delete_finished(&id)).await {
        Ok(()) => {}
        Err(StoreError::NotFound(_)) => return Redirect::to("/dead").into_response(),
        Err(e @ StoreError::Invalid(_)) => return (StatusCode::CONFLICT, e.to_string()).into_response(),
        Err(e) => return failed(e),
    }
    tracing::info!(task = %id, "deleted from the dashboard");
    Redirect::to("/dead").into_response()
}

/// A change made from the dashboard, once it is durable: a shared store's call resolves when its transaction
/// committed; the single node's is made in memory at once, then waits for the log round that makes it durable
/// (as `cmd` holds a protocol reply until its flush).
async fn durable<T: Send + 'static>(dash: &Dash, change: Op<T>) -> Result<T, StoreError> {
    let value = change.resolve().await?;
    if let Some(store) = dash.shared.engine.as_local() {
        store.durable().wait().await.map_err(StoreError::Flush)?;
    }
    Ok(value)
}

/// A pause or resume: the single node's store rewrites and syncs its control file, so the call runs on a
/// blocking thread, never the runtime's (as `cmd` runs the protocol's); a shared store's is a statement, done
/// when it committed.
async fn flow_change<T: Send + 'static>(
    dash: &Dash,
    change: impl FnOnce(&dyn TaskStore) -> Op<T> + Send + 'static,
) -> Result<T, StoreError> {
    if dash.shared.engine.as_local().is_none() {
        return change(dash.shared.tasks()).resolve().await;
    }
    let shared = dash.shared.clone();
    match tokio::task::spawn_blocking(move || change(shared.tasks())).await {
        Ok(changed) => changed.resolve().await,
        Err(e) => Err(StoreError::Flush(format!("the control file write failed: {e}"))),
    }
}

/// The response when the store failed a read or a change: 503 while it cannot be reached, else 500.
fn failed(e: StoreError) -> Response {
    let status = match e {
        StoreError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (status, e.to_string()).into_response()
}

// --- rendering ---------------------------------------------------------------------------------------------

/// Text for HTML (element content and quoted attribute values).
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A task id for a URL path.
fn url_escape(text: &str) -> String {
    text.bytes().fold(String::new(), |mut out, b| {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
        out
    })
}

fn duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h {}m", s / 3600, s / 60 % 60),
        _ => format!("{}d {}h", s / 86_400, s / 3600 % 24),
    }
}

fn ago(now: u64, at: u64) -> String {
    if at == 0 {
        return String::new();
    }
    format!("{} ago", duration(now.saturating_sub(at)))
}

fn when(now: u64, at: u64) -> String {
    if at > now {
        format!("in {}", duration(at - now))
    } else {
        ago(now, at)
    }
}

const STYLE: &str = r#"
:root{--bg:#f4f5f7;--card:#fff;--ink:#1d2330;--muted:#6b7280;--line:#e5e7eb;--ok:#16a34a;--bad:#dc2626;--run:#2563eb;--wait:#d97706;--rev:#7c3aed}
*{box-sizing:border-box}body{margin:0;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;background:var(--bg);color:var(--ink)}
header{background:#111827;color:#fff;padding:.7rem 1.5rem;display:flex;gap:1.5rem;align-items:center;flex-wrap:wrap}
header .brand{font-weight:700;font-size:1.1rem;letter-spacing:.02em}header nav a{color:#cbd5e1;text-decoration:none;margin-right:1rem}
header nav a.on{color:#fff;border-bottom:2px solid #60a5fa}header form{margin-left:auto}header input{padding:.35rem .6rem;border-radius:6px;border:0;width:18rem}
main{max-width:1200px;margin:1.2rem auto;padding:0 1rem}h2{font-size:1.1rem;margin:0 0 .8rem}h3{font-size:.95rem;margin:0 0 .4rem;color:var(--muted)}
.card{background:var(--card);border-radius:10px;box-shadow:0 1px 2px rgba(0,0,0,.06);padding:1rem 1.2rem;margin-bottom:1rem}.narrow{max-width:26rem;margin:3rem auto}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(9.5rem,1fr));gap:.8rem;margin-bottom:1rem}.stat{margin:0}
.stat .value{font-size:1.6rem;font-weight:650}.stat .label{color:var(--muted);font-size:.85rem}.stat.ok .value{color:var(--ok)}.stat.bad .value{color:var(--bad)}.stat.run .value{color:var(--run)}
table{width:100%;border-collapse:collapse}th{text-align:left;color:var(--muted);font-weight:600;font-size:.8rem;text-transform:uppercase;letter-spacing:.04em}
th,td{padding:.45rem .5rem;border-bottom:1px solid var(--line);vertical-align:top}tbody tr:nth-child(even){background:#fafafa}.n{text-align:right;font-variant-numeric:tabular-nums}
.name{font-weight:600}.muted{color:var(--muted)}.mono,pre{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:.82rem}.empty{color:var(--muted);text-align:center;padding:1rem}
pre{background:#0f172a;color:#e2e8f0;padding:.7rem;border-radius:8px;overflow:auto;max-height:24rem;margin:0}
.badge{display:inline-block;padding:.1rem .55rem;border-radius:999px;font-size:.78rem;font-weight:700;color:#fff;background:var(--muted);text-decoration:none}
.badge.SUCCESS{background:var(--ok)}.badge.FAILURE{background:var(--bad)}.badge.STARTED{background:var(--run)}.badge.RETRY,.badge.SCHEDULED{background:var(--wait)}.badge.REVOKED{background:var(--rev)}
.title{display:flex;gap:.8rem;align-items:center}.title h2{margin:0;font-family:ui-monospace,monospace}.fields th{width:9rem}
.chip{display:inline-block;background:#eef2ff;color:#3730a3;border-radius:6px;padding:.05rem .45rem;margin:.1rem;text-decoration:none;font-size:.85rem}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:1rem}.grid .wide{grid-column:1/3}.timeline{margin:0;padding-left:1.2rem}.timeline .label{display:inline-block;width:6.5rem;color:var(--muted)}
.error-box{border-left:4px solid var(--bad)}td.error{color:#7f1d1d;max-width:28rem}.error{color:var(--bad)}
.actions{display:flex;gap:.4rem;margin-top:.8rem}.actions.row{margin:0}button{border:0;border-radius:6px;padding:.35rem .8rem;font-weight:600;cursor:pointer;background:var(--run);color:#fff}
button.danger{background:#fff;color:var(--bad);border:1px solid var(--bad)}label{display:block;margin-bottom:.3rem}input[type=password]{width:100%;padding:.5rem;margin-bottom:.8rem;border:1px solid var(--line);border-radius:6px}
.chart{width:100%;height:140px;display:block}.chart polyline{fill:none;stroke-width:2;vector-effect:non-scaling-stroke}.chart .ok{stroke:var(--ok)}.chart .bad{stroke:var(--bad)}.chart .axis{stroke:var(--line)}
.legend{font-size:.85rem}.legend .ok{color:var(--ok)}.legend .bad{color:var(--bad)}
@media (max-width:700px){.grid{grid-template-columns:1fr}.grid .wide{grid-column:1}header input{width:100%}}
"#;

/// Refreshes `<main>` every 2 s from the same URL (the server sends only the content for `X-Partial`).
const LIVE: &str = r#"<script>
setInterval(function(){fetch(location.href,{headers:{"X-Partial":"1"}}).then(function(r){return r.ok?r.text():null}).then(function(h){if(h!==null){document.querySelector("main").innerHTML=h}}).catch(function(){})},2000);
</script>"#;

fn page(title: &str, active: &str, body: &str, live: bool) -> Response {
    let nav = |path: &str, name: &str, key: &str| {
        format!(r#"<a href="{path}"{}>{name}</a>"#, if key == active { r#" class="on""# } else { "" })
    };
    let html = Html(format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{title} · broker</title><style>{STYLE}</style></head><body>
<header><span class="brand">broker</span><nav>{}{}</nav><form action="/task" method="get"><input name="id" placeholder="Find a task by id" aria-label="task id"></form></header>
<main>{body}</main>{}</body></html>"#,
        nav("/", "Overview", "overview"),
        nav("/dead", "Dead", "dead"),
        if live { LIVE } else { "" },
        title = esc(title),
    ));
    // Never framed by another site; no URL (task ids) leaks to a linked site.
    let headers = [
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::CONTENT_SECURITY_POLICY, "frame-ancestors 'none'"),
        (header::REFERRER_POLICY, "same-origin"),
    ];
    (headers, html).into_response()
}
