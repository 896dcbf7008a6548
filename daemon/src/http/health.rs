//! `/healthz` (the process answers) and `/readyz` (the store and the queue answer and
//! every worker runs), for load balancers, Kubernetes probes and monitoring. Both
//! answer JSON and stay open without the token; on a listener others can reach, only
//! the token's holder reads the reasons (they name hosts and users).

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use patchbay_jobs::JobKind;
use serde_json::json;

use super::Http;
use crate::health;

pub async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok", "pid": std::process::id() }))
}

/// 200 when all is up, else 503 with each part's reason.
pub async fn readyz(State(http): State<Http>, headers: HeaderMap) -> impl IntoResponse {
    let probe = health::probe(&http.app).await;
    let mut down = probe.down();
    // Workers register once they run: until each kind's has, the daemon is starting.
    for kind in JobKind::ALL {
        if !probe.workers.contains_key(&http.app.queue_name(kind)) {
            down.push(format!("worker {kind} not started yet"));
        }
    }
    if http.auth.public() && !http.auth.bearer(&headers) {
        let code = if down.is_empty() {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        return (code, Json(json!({ "ready": down.is_empty() })));
    }
    let code = if down.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let part = |r: Result<(), &String>| match r {
        Ok(()) => json!({ "ok": true }),
        Err(e) => json!({ "ok": false, "error": e }),
    };
    let workers_down: Vec<&String> = probe
        .workers
        .iter()
        .filter(|(_, w)| !w.running)
        .map(|(q, _)| q)
        .collect();
    let body = json!({
        "ready": down.is_empty(),
        "down": down,
        "store": part(probe.channels.as_ref().map(|_| ())),
        "queue": part(probe.queue.as_ref().map(|_| ())),
        "workers": { "ok": workers_down.is_empty(), "not_running": workers_down },
    });
    (code, Json(body))
}
