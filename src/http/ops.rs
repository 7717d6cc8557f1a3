//! Operations endpoints: `/healthz` (the process answers), `/readyz` (the database answers and is migrated),
//! `/metrics` (Prometheus text). None needs a key, and none shows a record.

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;
use super::problem::{ApiError, ProblemType};

/// The process is up.
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// The database answers and carries every migration: the gateway can take traffic.
pub async fn readyz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    state.store.readiness().await.map_err(|e| ApiError::internal(ProblemType::Unavailable, e))?;
    Ok(Json(json!({ "status": "ready", "database": state.store.backend() })))
}

/// Prometheus text: request counts and latencies by route and status, database pool gauges, directory sync runs
/// and the catalog gauges of each configured directory.
pub async fn metrics(State(state): State<AppState>) -> Response {
    let sources = state.sources.keys().map(String::as_str);
    crate::directories::jobs::observe(&*state.store, sources, time::OffsetDateTime::now_utc()).await;
    for pool in state.store.pool_stats() {
        let busy = pool.size.saturating_sub(pool.idle);
        metrics::gauge!("carebridge_db_pool_connections", "pool" => pool.pool, "state" => "idle")
            .set(f64::from(pool.idle));
        metrics::gauge!("carebridge_db_pool_connections", "pool" => pool.pool, "state" => "busy").set(f64::from(busy));
    }
    let text = state.metrics.render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
