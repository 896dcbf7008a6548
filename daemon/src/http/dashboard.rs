//! The live dashboard at `/`: health, throughput and queue depth over the last hour
//! (server-drawn SVG charts), jobs by state, dead jobs (paged, filtered by kind, with a
//! retry button for the token's holder), channels that need attention, billing's last
//! run and the mail outbox.
//!
//! Everything is rendered here as HTML (maud escapes every value: job errors and
//! channel reasons come from outside). The page's one script re-fetches the `<main>`
//! part every few seconds; without it the page is still whole, only not live.

use std::collections::{BTreeMap, HashMap};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Form, Json};
use maud::{DOCTYPE, Markup, html};
use patchbay_jobs::JobKind;
use patchbay_jobs::model::{Channel, Id, JobRecord, JobState, now_ms};
use patchbay_jobs::store::{JobFilter, OutboxCounts};
use serde::Deserialize;
use serde_json::json;

use super::Http;
use super::auth::{self, Refusal};
use super::history::{SAMPLE_EVERY, Series};
use crate::health::{self, PART_TIMEOUT};
use crate::time_text;

/// Dead jobs on one page.
const PAGE: u32 = 20;
/// Troubled channels shown at most.
const TROUBLED: u32 = 50;
/// Seconds between the script's refreshes.
const REFRESH_SECS: u32 = 5;
/// Dead jobs the pager goes back at most.
const MAX_OFFSET: u32 = 10_000;

/// A job id as the daemon makes them (ULIDs), or as an operator could have typed one.
fn is_job_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

#[derive(Deserialize, Default)]
pub struct PageQuery {
    /// Dead jobs of this kind only.
    kind: Option<String>,
    /// Dead jobs to skip (paging).
    offset: Option<u32>,
    /// `main`: the live part only, for the script.
    part: Option<String>,
    /// The job a retry from this page queued again, or could not (`retry_failed`):
    /// the notice on top is worded here, never taken from the address.
    retried: Option<String>,
    retry_failed: Option<String>,
}

/// What one page shows, each part read within `PART_TIMEOUT`; `Err`: why it is missing.
struct Overview {
    health: health::Health,
    jobs: Result<Vec<(JobKind, JobState, i64)>, String>,
    dead: Result<Vec<JobRecord>, String>,
    troubled: Result<Vec<Channel>, String>,
    /// Each runnable channel's owner node (the name part of its node id).
    owners: HashMap<Id, String>,
    billing: Result<Option<JobRecord>, String>,
    outbox: Result<OutboxCounts, String>,
    throughput: Vec<Series>,
    depth: Vec<Series>,
}

async fn bounded<T>(
    f: impl Future<Output = Result<T, patchbay_jobs::DomainError>>,
) -> Result<T, String> {
    match tokio::time::timeout(PART_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {PART_TIMEOUT:?}")),
    }
}

async fn overview(http: &Http, kind: Option<JobKind>, offset: u32) -> Overview {
    let store = &http.app.store;
    let dead_filter = JobFilter {
        state: Some(JobState::Dead),
        kind,
        limit: PAGE + 1, // one more: is there a next page?
        offset,
    };
    let billing_filter = JobFilter {
        kind: Some(JobKind::BillingRun),
        limit: 1,
        ..Default::default()
    };
    let (health, jobs, dead, troubled, billing, outbox, owners) = tokio::join!(
        health::probe(&http.app),
        bounded(store.journal_open_counts()),
        bounded(store.journal_list(&dead_filter)),
        bounded(store.troubled_channels(TROUBLED)),
        bounded(async { Ok(store.journal_list(&billing_filter).await?.pop()) }),
        bounded(store.outbox_counts(now_ms() - 86_400_000)),
        bounded(crate::cluster::view::owners(&http.app)),
    );
    // The node's name, not its per-start id: what people call it.
    let owners = owners
        .unwrap_or_default()
        .into_iter()
        .map(|(ch, (node, _))| {
            let name = node.rsplit_once('/').map_or(node.as_str(), |(n, _)| n);
            (ch, name.to_owned())
        })
        .collect();
    Overview {
        health,
        jobs,
        dead,
        troubled,
        owners,
        billing,
        outbox,
        throughput: http.history.throughput(),
        depth: http.history.depth(),
    }
}

pub async fn page(
    State(http): State<Http>,
    headers: HeaderMap,
    Query(q): Query<PageQuery>,
) -> Response {
    if !http.auth.may_read(&headers) {
        return (
            StatusCode::UNAUTHORIZED,
            shell(&http, None, login_form(None)),
        )
            .into_response();
    }
    let kind = match q.kind.as_deref().filter(|k| !k.is_empty()) {
        Some(k) => match k.parse::<JobKind>() {
            Ok(k) => Some(k),
            Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
        },
        None => None,
    };
    let offset = q.offset.unwrap_or(0).min(MAX_OFFSET);
    let o = {
        // One overview at a time: open tabs and their refreshes never hold more than
        // one of the store's connections.
        let _turn = http.dashboard_turn.lock().await;
        overview(&http, kind, offset).await
    };
    let session = http.auth.session(&headers);
    let csrf = session.as_deref().and_then(|s| http.auth.csrf(s));
    let id = |v: &Option<String>| v.as_deref().filter(|id| is_job_id(id)).map(str::to_owned);
    let notice = match (id(&q.retried), id(&q.retry_failed)) {
        (Some(job), _) => Some(format!("Job {job} is queued again.")),
        (_, Some(job)) => Some(format!(
            "Job {job} could not be retried: see `patchbayctl job get {job}` and the log."
        )),
        _ => None,
    };
    let main = live(&http, &o, kind, offset, csrf.as_deref(), notice.as_deref());
    if q.part.as_deref() == Some("main") {
        return main.into_response();
    }
    shell(&http, session.as_deref(), main).into_response()
}

/// The page around the live part: title, stylesheet, script, sign-in state.
fn shell(http: &Http, session: Option<&str>, main: Markup) -> Markup {
    let app = &http.app;
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "patchbay" }
                link rel="stylesheet" href="/assets/dashboard.css";
                script src="/assets/dashboard.js" defer {}
            }
            body {
                header {
                    h1 { "patchbay" }
                    span.meta {
                        "patchbayd " (env!("CARGO_PKG_VERSION"))
                        " · node " (app.settings.node)
                        " · pid " (std::process::id())
                        " · up " (time_text::duration(app.started.elapsed().as_secs()))
                        " · store " (app.settings.store.kind())
                        " · queue " (app.settings.raw.queue.backend)
                    }
                    @if http.auth.enabled() {
                        @if session.is_some() {
                            form.inline method="post" action="/logout" {
                                button type="submit" { "Sign out" }
                            }
                        } @else {
                            (login_form(None))
                        }
                    } @else {
                        span.badge.muted title="set http.token to allow actions" { "read-only" }
                    }
                }
                main id="live" data-refresh=(REFRESH_SECS) { (main) }
            }
        }
    }
}

fn login_form(error: Option<&str>) -> Markup {
    html! {
        form.inline method="post" action="/login" {
            @if let Some(e) = error { span.error { (e) } " " }
            input type="password" name="token" placeholder="http.token" autocomplete="current-password" required;
            button type="submit" { "Sign in" }
        }
    }
}

/// The part the script refreshes.
fn live(
    http: &Http,
    o: &Overview,
    kind: Option<JobKind>,
    offset: u32,
    csrf: Option<&str>,
    notice: Option<&str>,
) -> Markup {
    let down = o.health.down();
    html! {
        @if let Some(n) = notice { p.notice { (n) } }
        section id="health" {
            @if down.is_empty() {
                p.ok { "All parts up: store, queue and " (o.health.workers.len()) " workers." }
            } @else {
                p.down { "Degraded: " (down.join("; ")) }
            }
        }
        div.grid {
            section {
                h2 { "Throughput (jobs done per minute, this daemon)" }
                (chart(&o.throughput, "no jobs done in the last hour"))
            }
            section {
                h2 { "Queue depth (jobs waiting)" }
                (chart(&o.depth, "no job waited in the last hour"))
            }
        }
        div.grid {
            section id="jobs" { h2 { "Jobs by state" } (jobs_table(o)) }
            section id="channels" { h2 { "Channels" } (channels(o)) }
        }
        section id="dead" { h2 { "Dead jobs" } (dead_jobs(http, o, kind, offset, csrf)) }
        div.grid {
            section id="billing" { h2 { "Billing" } (billing(o)) }
            section id="outbox" { h2 { "Mail outbox" } (outbox(o)) }
        }
    }
}

fn jobs_table(o: &Overview) -> Markup {
    let queued = o.health.queue.as_ref().ok();
    let jobs = match &o.jobs {
        Ok(j) => j,
        Err(e) => return html! { p.down { "store: " (e) } },
    };
    let count = |kind: JobKind, state: JobState| {
        jobs.iter()
            .find(|(k, s, _)| *k == kind && *s == state)
            .map_or(0, |j| j.2)
    };
    html! {
        table {
            thead { tr { th { "kind" } th.n title="waiting in the queue backend" { "queued" } th.n title="recorded, not started" { "pending" } th.n { "running" } th.n { "retrying" } th.n { "dead" } } }
            tbody {
                @for kind in JobKind::ALL {
                    tr data-kind=(kind.as_str()) {
                        td { (kind.as_str()) }
                        td.n { (queued.and_then(|q| q.get(kind.as_str())).map_or("?".to_owned(), u64::to_string)) }
                        td.n { (count(kind, JobState::Pending)) }
                        td.n { (count(kind, JobState::Running)) }
                        td.n { (count(kind, JobState::Failed)) }
                        td.n.dead[count(kind, JobState::Dead) > 0] { (count(kind, JobState::Dead)) }
                    }
                }
            }
        }
    }
}

fn channels(o: &Overview) -> Markup {
    html! {
        @match &o.health.channels {
            Ok(counts) if counts.is_empty() => p { "No channels." },
            Ok(counts) => p.statuses {
                @for (status, n) in counts {
                    span class={"badge status-" (status)} data-status=(status) { (n) " " (status) }
                    " "
                }
            },
            Err(e) => p.down { "store: " (e) },
        }
        @match &o.troubled {
            Ok(list) if list.is_empty() => p.muted { "Every channel is connected." },
            Ok(list) => table {
                thead { tr { th.n { "id" } th { "name" } th { "kind" } th { "status" } th { "reason" } th { "node" } } }
                tbody {
                    @for c in list {
                        tr data-channel=(c.id) {
                            td.n { (c.id) }
                            td { (c.name) }
                            td { (c.kind) }
                            td { span class={"badge status-" (c.status)} { (c.status) } }
                            td.reason { (c.status_reason.as_deref().unwrap_or("")) }
                            td { (o.owners.get(&c.id).map_or("-", String::as_str)) }
                        }
                    }
                }
            },
            Err(e) => p.down { "store: " (e) },
        }
    }
}

fn dead_jobs(
    http: &Http,
    o: &Overview,
    kind: Option<JobKind>,
    offset: u32,
    csrf: Option<&str>,
) -> Markup {
    let page_link = |offset: u32| {
        let mut q = format!("/?offset={offset}");
        if let Some(k) = kind {
            q.push_str("&kind=");
            q.push_str(k.as_str());
        }
        q
    };
    html! {
        form.inline method="get" action="/" {
            label { "kind " select name="kind" {
                option value="" { "all" }
                @for k in JobKind::ALL {
                    option value=(k.as_str()) selected[kind == Some(k)] { (k.as_str()) }
                }
            } }
            " " button type="submit" { "Filter" }
        }
        @match &o.dead {
            Err(e) => p.down { "store: " (e) },
            Ok(list) if list.is_empty() && offset == 0 => p.muted { "No dead jobs." },
            Ok(list) => {
                table.dead {
                    thead { tr { th { "id" } th { "kind" } th.n { "attempts" } th { "last error" } th { "died" } th {} } }
                    tbody {
                        @for j in list.iter().take(PAGE as usize) {
                            tr data-job=(j.id) {
                                td.mono { (j.id) }
                                td { (j.kind.as_str()) }
                                td.n { (j.attempts) "/" (j.max_attempts) }
                                td.reason { (j.last_error.as_deref().unwrap_or("")) }
                                td title=(time_text::absolute(j.updated_at)) { (ago_ms(j.updated_at)) }
                                td {
                                    @if let Some(csrf) = csrf {
                                        form.inline method="post" action={"/jobs/" (j.id) "/retry"} {
                                            input type="hidden" name="csrf" value=(csrf);
                                            button type="submit" { "Retry" }
                                        }
                                    } @else if http.auth.enabled() {
                                        span.muted { "sign in to retry" }
                                    }
                                }
                            }
                        }
                    }
                }
                p.pager {
                    @if offset > 0 {
                        a href=(page_link(offset.saturating_sub(PAGE))) { "← newer" } " "
                    }
                    "jobs " (offset + 1) "–" (offset as usize + list.len().min(PAGE as usize))
                    @if list.len() > PAGE as usize && offset + PAGE <= MAX_OFFSET {
                        " " a href=(page_link(offset + PAGE)) { "older →" }
                    }
                }
            }
        }
    }
}

fn billing(o: &Overview) -> Markup {
    html! {
        @match &o.billing {
            Ok(None) => p.muted { "No billing run yet." },
            Ok(Some(run)) => p {
                "Last run: "
                (run.payload.get("date").and_then(|d| d.as_str()).unwrap_or("?"))
                ", " span class={"badge state-" (run.state)} { (run.state) }
                ", " span title=(time_text::absolute(run.updated_at)) { (ago_ms(run.updated_at)) }
                @if let Some(e) = &run.last_error { " — " span.reason { (e) } }
            },
            Err(e) => p.down { "store: " (e) },
        }
    }
}

fn outbox(o: &Overview) -> Markup {
    html! {
        @match &o.outbox {
            Ok(c) => p {
                span.badge.warn[c.unsent > 0] { (c.unsent) " waiting" } " "
                span.badge { (c.sent_since) " sent in 24 h" }
            },
            Err(e) => p.down { "store: " (e) },
        }
    }
}

/// A line chart of the last hour, one line per kind, drawn as inline SVG.
fn chart(series: &[Series], empty: &str) -> Markup {
    const W: f64 = 560.0;
    const H: f64 = 160.0;
    const PAD: f64 = 28.0;
    if series.is_empty() {
        return html! { p.muted.chart-empty { (empty) } };
    }
    let now = now_ms();
    let start = now - 3_600_000;
    let max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(1.0_f64, f64::max);
    let x = |t: i64| PAD + (t - start).max(0) as f64 / 3_600_000.0 * (W - PAD);
    let y = |v: f64| H - PAD / 2.0 - v / max * (H - PAD);
    let legend: BTreeMap<&str, &str> = series
        .iter()
        .map(|s| (s.kind.as_str(), colour(s.kind)))
        .collect();
    html! {
        svg.chart viewBox={"0 0 " (W) " " (H)} role="img" {
            line.axis x1=(PAD) y1=(y(0.0)) x2=(W) y2=(y(0.0)) {}
            text.axis x="0" y=(y(max) + 4.0) { (format_value(max)) }
            text.axis x="0" y=(y(0.0) + 4.0) { "0" }
            text.axis x=(PAD) y=(H - 1.0) { "60 min ago" }
            text.axis x=(W - 24.0) y=(H - 1.0) { "now" }
            @for s in series {
                polyline fill="none" stroke=(colour(s.kind)) stroke-width="2" data-kind=(s.kind.as_str())
                    points=(s.points.iter().map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v))).collect::<Vec<_>>().join(" ")) {}
            }
        }
        p.legend {
            @for (kind, colour) in &legend {
                span { span.swatch style={"background:" (colour)} {} (kind) } " "
            }
            span.muted { "sampled every " (SAMPLE_EVERY.as_secs()) " s" }
        }
    }
}

fn colour(kind: JobKind) -> &'static str {
    const PALETTE: [&str; 8] = [
        "#2563eb", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#dc2626", "#65a30d", "#c026d3",
    ];
    let i = JobKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
    PALETTE[i % PALETTE.len()]
}

fn format_value(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else {
        format!("{v:.0}")
    }
}

fn ago_ms(at: i64) -> String {
    time_text::relative(at, now_ms())
}

#[derive(Deserialize)]
pub struct LoginForm {
    token: String,
}

pub async fn login(State(http): State<Http>, Form(f): Form<LoginForm>) -> Response {
    match http.auth.login(&f.token) {
        Some(id) => (
            [(header::SET_COOKIE, auth::session_cookie(&id))],
            Redirect::to("/"),
        )
            .into_response(),
        None => {
            // Slows guessing down; the listener's in-flight bound caps what it holds.
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            let form = login_form(Some(if http.auth.enabled() {
                "wrong token"
            } else {
                "no http.token is configured: the dashboard is read-only"
            }));
            (StatusCode::UNAUTHORIZED, shell(&http, None, form)).into_response()
        }
    }
}

pub async fn logout(State(http): State<Http>, headers: HeaderMap) -> Response {
    http.auth.logout(&headers);
    (
        [(header::SET_COOKIE, auth::cleared_cookie())],
        Redirect::to("/"),
    )
        .into_response()
}

#[derive(Deserialize)]
pub struct ActionForm {
    csrf: Option<String>,
}

/// Retries a dead job (`job.retry`), for the token's holder: a browser is sent back
/// to the page, a script (`Authorization: Bearer`, no form needed) gets JSON.
pub async fn retry(
    State(http): State<Http>,
    headers: HeaderMap,
    Path(id): Path<String>,
    form: Result<Form<ActionForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let csrf = form.as_ref().ok().and_then(|Form(f)| f.csrf.as_deref());
    if let Err(why) = http.auth.may_act(&headers, csrf) {
        let (code, text) = match why {
            Refusal::ReadOnly => (
                StatusCode::FORBIDDEN,
                "the dashboard is read-only: set http.token to allow actions",
            ),
            Refusal::NotSignedIn => (
                StatusCode::UNAUTHORIZED,
                "sign in with http.token (or send Authorization: Bearer) to retry jobs",
            ),
            Refusal::Forged => (
                StatusCode::FORBIDDEN,
                "refused: the request did not come from this dashboard (CSRF check)",
            ),
        };
        return (code, format!("{text}\n")).into_response();
    }
    let outcome = http.app.retry(&id).await;
    match &outcome {
        Ok(job) => {
            tracing::info!(job = %job.id, kind = %job.kind, "dead job queued again from the dashboard")
        }
        Err(e) => tracing::warn!(job = %id, error = %e, "the dashboard cannot retry a job"),
    }
    if http.auth.bearer(&headers) {
        return match outcome {
            Ok(job) => Json(json!({ "id": job.id, "state": job.state })).into_response(),
            Err(e) => (
                StatusCode::CONFLICT,
                Json(json!({ "error": e.to_string() })),
            )
                .into_response(),
        };
    }
    let key = if outcome.is_ok() {
        "retried"
    } else {
        "retry_failed"
    };
    let mut target = url::form_urlencoded::Serializer::for_suffix(String::from("/?"), 2);
    target.append_pair(key, &id);
    Redirect::to(&target.finish()).into_response()
}

pub async fn css() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        include_str!("assets/dashboard.css"),
    )
}

pub async fn js() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        include_str!("assets/dashboard.js"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_escapes_nothing_it_does_not_own_and_says_when_empty() {
        let empty = chart(&[], "nothing <here>").into_string();
        assert!(empty.contains("nothing &lt;here&gt;"), "{empty}");
        let now = now_ms();
        let s = Series {
            kind: JobKind::InboundMessage,
            points: vec![(now - 60_000, 10.0), (now, 20.0)],
        };
        let svg = chart(&[s], "").into_string();
        assert!(
            svg.contains("<polyline") && svg.contains("inbound_message"),
            "{svg}"
        );
    }
}
