//! The operators' HTTP listener on `http.listen`: Prometheus metrics (`/metrics`),
//! health (`/healthz`, `/readyz`) and the live dashboard (`/`).
//!
//! It only reads, except the dashboard's actions, which need `http.token` (`auth`).
//! It is bounded like the control socket: connections at once, header read time, body
//! size, requests in flight; a slow or hostile client loses its connection and
//! touches nothing else. The listener is bound before the daemon says it is ready
//! (a taken port stops the start with a message naming `http.listen`), and it
//! serves until the daemon stops.

pub mod auth;
pub mod config;
mod dashboard;
mod health;
pub mod history;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::App;
use crate::metrics::Metrics;
use auth::Auth;
use history::History;

/// Connections at once; the next one is closed at accept.
const MAX_CONNECTIONS: usize = 128;
/// Requests being answered at once over all connections; the next wait their turn.
const MAX_IN_FLIGHT: usize = 32;
/// A client must send its request head within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A request must be read and answered within this, its wait for a turn included: a
/// client trickling its body loses its connection.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Request bodies (the dashboard's forms) are small.
const MAX_BODY: usize = 16 * 1024;

/// What the handlers share.
#[derive(Clone)]
pub struct Http {
    /// Where the listener is bound: the `Host` a loopback listener accepts.
    pub addr: SocketAddr,
    pub app: Arc<App>,
    pub metrics: Metrics,
    pub history: Arc<History>,
    pub auth: Arc<Auth>,
    /// Taken while a dashboard page reads the store.
    pub dashboard_turn: Arc<tokio::sync::Mutex<()>>,
}

/// Binds `http.listen`, if set. Port 0 takes any free port: `status` shows which.
pub async fn bind(listen: Option<SocketAddr>) -> anyhow::Result<Option<TcpListener>> {
    let Some(addr) = listen else { return Ok(None) };
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!(
            "cannot listen on http.listen = {addr} (metrics, health, dashboard); \
             free the port, pick another, or set http.listen = \"\" to turn it off"
        )
    })?;
    Ok(Some(listener))
}

fn router(http: Http) -> Router {
    Router::new()
        .route("/", get(dashboard::page))
        .route("/login", post(dashboard::login))
        .route("/logout", post(dashboard::logout))
        .route("/jobs/{id}/retry", post(dashboard::retry))
        .route("/assets/dashboard.css", get(dashboard::css))
        .route("/assets/dashboard.js", get(dashboard::js))
        .route("/metrics", get(metrics))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(http.clone(), guard))
        .with_state(http)
}

/// Every request: on a loopback listener only a loopback `Host` (a page of another
/// site whose name was re-pointed at 127.0.0.1 — DNS rebinding — reads nothing), and
/// every answer refuses framing and content sniffing.
async fn guard(
    State(http): State<Http>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !http.auth.public() {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        let port = http.addr.port();
        let allowed = [
            format!("127.0.0.1:{port}"),
            format!("[::1]:{port}"),
            format!("localhost:{port}"),
            http.addr.to_string(),
        ];
        if !allowed.iter().any(|a| a == host) {
            return (
                StatusCode::MISDIRECTED_REQUEST,
                format!("this listener answers to {} only\n", allowed[0]),
            )
                .into_response();
        }
    }
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::X_FRAME_OPTIONS,
        header::HeaderValue::from_static("DENY"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(
            "default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
        ),
    );
    response
}

/// Serves until `stop`, then lets open requests finish.
pub async fn serve(listener: TcpListener, http: Http, stop: CancellationToken) {
    // One limit and one deadline over all routes and connections (a layer on the
    // router would give each route its own).
    let router = tower::ServiceBuilder::new()
        .layer(tower::timeout::TimeoutLayer::new(REQUEST_TIMEOUT))
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            MAX_IN_FLIGHT,
        ))
        .service(router(http));
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let conns = TaskTracker::new();
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of descriptors, say: wait instead of spinning.
                    tracing::warn!(error = %e, "http listener cannot accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            drop(stream); // over MAX_CONNECTIONS: closed at once
            continue;
        };
        let service = TowerToHyperService::new(router.clone());
        let stop = stop.clone();
        conns.spawn(async move {
            let _permit = permit;
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
                }
            }
        });
    }
    conns.close();
    conns.wait().await;
}

/// `/metrics`: the Prometheus text exposition. On a listener others can reach it
/// needs the token (`Authorization: Bearer`, as Prometheus' `authorization` sends it).
async fn metrics(State(http): State<Http>, headers: axum::http::HeaderMap) -> Response {
    if http.auth.public() && !http.auth.bearer(&headers) {
        return auth::unauthorized();
    }
    let body = http.metrics.render(&http.app).await;
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}
