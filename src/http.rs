//! The daemon's HTTP listener (`http_listen`, default `127.0.0.1:7421`), for what operators and their tools
//! reach without a client library:
//!
//! - `GET /healthz`: 200 while the process serves (a liveness probe);
//! - `GET /readyz`: 200 when it accepts work (not shutting down, the log writable), else 503 and why;
//! - `GET /metrics`: the Prometheus text format ([`crate::metrics`]);
//! - the dashboard ([`crate::dashboard`]).
//!
//! All of them whichever store the daemon runs: the dashboard and `/metrics` read through the [`TaskStore`] seam
//! (over PostgreSQL, `/metrics` counts what went through this daemon; the queue gauges are the database's).
//!
//! [`TaskStore`]: crate::engine::TaskStore
//!
//! With tokens configured, `/metrics` needs an admin token (`Authorization: Bearer TOKEN`, as Prometheus's
//! `authorization` setting sends it); the probes stay open (they say nothing about tasks).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use crate::cmd::{self, Shared};
use crate::metrics::Snapshot;

/// Serves the routes until the daemon shuts down.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let shutdown = shared.shutdown.clone();
    let addr = match listener.local_addr() {
        Ok(addr) => addr,
        Err(e) => return tracing::error!(error = %e, "the HTTP listener has no address"),
    };
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(shared.clone())
        .merge(crate::dashboard::routes(shared, addr));
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await {
        tracing::error!(error = %e, "the HTTP listener failed");
    }
}

/// Binds the HTTP listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    if shared.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    if shared.engine.as_local().is_some_and(|store| store.log_failed()) {
        return (StatusCode::SERVICE_UNAVAILABLE, "the write-ahead log failed: nothing is acknowledged as durable\n")
            .into_response();
    }
    "ready\n".into_response()
}

fn unauthorized() -> Response {
    let mut response =
        (StatusCode::UNAUTHORIZED, "an admin token is required: Authorization: Bearer TOKEN\n").into_response();
    response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    response
}

/// `/metrics` (routed with the dashboard, whose Host check it shares): an admin's only, when tokens exist.
pub async fn metrics(shared: &Shared, headers: &HeaderMap) -> Response {
    if !crate::dashboard::is_admin(shared, headers) {
        return unauthorized();
    }
    let stats = match shared.tasks().stats().resolve().await {
        Ok(stats) => cmd::stats_of(shared, stats),
        Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    };
    let snapshot = Snapshot {
        queues: stats.queues.iter().map(|q| (q.name.clone(), [q.ready, q.scheduled, q.leased, q.dead])).collect(),
        connections: stats.connections,
        workers: stats.workers.len() as u64,
        uptime_secs: stats.uptime_ms / 1000,
    };
    let body = shared.tasks().metrics().encode(&snapshot);
    // prometheus-client writes OpenMetrics text, which Prometheus reads.
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body).into_response()
}
