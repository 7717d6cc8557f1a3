//! The delivery queue for operators (admin scope): list it, read one delivery with its attempts, replay or discard
//! one. Attempts carry status codes, the partner's `OperationOutcome` and timings, never payloads.

use axum::Json;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::extract::{ApiQuery, CallerActor};
use super::problem::{ApiError, Problem, ProblemType};
use crate::domain::{RecordId, RecordKind};
use crate::store::outbox::state;
use crate::store::{AttemptRow, DeliveryFilter, DeliveryRow};

/// One delivery: a version of a record owed to a partner.
#[derive(Debug, Serialize, ToSchema)]
pub struct Delivery {
    /// Its number.
    pub id: i64,
    /// The record's kind.
    pub kind: String,
    /// The record's id.
    pub record_id: String,
    /// The version owed.
    pub version: i64,
    /// The partner.
    pub partner: String,
    /// `pending`, `held`, `delivered`, `dead`, `superseded` or `discarded`.
    pub state: String,
    /// Attempts so far.
    pub attempts: i64,
    /// When it may be tried (or, held, checked) next.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub not_before: OffsetDateTime,
    /// When the version was accepted.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    /// When the delivery last changed.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: OffsetDateTime,
    /// What the last attempt said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Every attempt, oldest first (on a single delivery only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<Vec<Attempt>>,
}

/// One attempt at a delivery.
#[derive(Debug, Serialize, ToSchema)]
pub struct Attempt {
    /// When it started.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub at: OffsetDateTime,
    /// How long it took.
    pub ms: i64,
    /// `delivered`, `unchanged`, `retry`, `held` or `dead`.
    pub outcome: String,
    /// The partner's HTTP status, when it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<i64>,
    /// What happened.
    pub detail: String,
    /// The partner's `OperationOutcome`, when it refused with one.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub operation_outcome: Option<serde_json::Value>,
}

fn delivery(r: DeliveryRow, history: Option<Vec<AttemptRow>>) -> Delivery {
    Delivery {
        id: r.seq,
        kind: r.kind.as_str().to_owned(),
        record_id: r.id.as_str().to_owned(),
        version: r.version,
        partner: r.partner,
        state: r.state,
        attempts: r.attempts,
        not_before: r.not_before,
        created_at: r.created_at,
        updated_at: r.updated_at,
        detail: r.detail,
        history: history.map(|h| {
            h.into_iter()
                .map(|a| Attempt {
                    at: a.at,
                    ms: a.ms,
                    outcome: a.outcome,
                    status: a.status,
                    detail: a.detail,
                    operation_outcome: a.operation_outcome.and_then(|o| serde_json::from_str(&o).ok()),
                })
                .collect()
        }),
    }
}

/// Filters of the delivery list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Only this state.
    state: Option<String>,
    /// Only this partner.
    partner: Option<String>,
    /// Only this record, as `kind/id` (`referral/ref-4001`).
    record: Option<String>,
    /// Deliveries numbered after this one (the next page: the last `id` seen).
    after: Option<i64>,
    /// At most this many (1 to 500, default 50).
    limit: Option<u32>,
}

/// A page of deliveries, in number order.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryPage {
    /// The deliveries.
    pub items: Vec<Delivery>,
    /// The `after` of the next page, when there may be one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_after: Option<i64>,
}

fn bad_query(detail: impl Into<String>) -> ApiError {
    Problem::new(ProblemType::InvalidQuery).detail(detail).into()
}

fn not_found() -> ApiError {
    Problem::new(ProblemType::NotFound).detail("no such delivery").into()
}

/// The deliveries matching the filters.
#[utoipa::path(get, path = "/api/v1/deliveries", tag = "deliveries", params(ListParams),
    responses((status = 200, description = "A page of deliveries", body = DeliveryPage),
              (status = 400, description = "A bad filter", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = ["admin"])))]
pub async fn list(
    State(state): State<AppState>,
    ApiQuery(p): ApiQuery<ListParams>,
) -> Result<Json<DeliveryPage>, ApiError> {
    if let Some(s) = &p.state
        && !state::ALL.contains(&s.as_str())
    {
        return Err(bad_query(format!("state: one of {}", state::ALL.join(", "))));
    }
    let record = match p.record.as_deref() {
        None => None,
        Some(r) => {
            let (kind, id) = r.split_once('/').ok_or_else(|| bad_query("record: kind/id, e.g. referral/ref-4001"))?;
            let kind = RecordKind::from_name(kind)
                .ok_or_else(|| bad_query("record: the kind is client, assessment, care-plan, referral or consent"))?;
            Some((kind, RecordId::parse(id).map_err(|e| bad_query(format!("record: {e}")))?))
        }
    };
    let limit = p.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(bad_query("limit: from 1 to 500"));
    }
    let filter = DeliveryFilter { state: p.state, partner: p.partner, record, after: p.after.unwrap_or(0), limit };
    let rows = state.store.list_deliveries(&filter).await.map_err(super::api::store_problem)?;
    let next_after = (rows.len() == limit as usize).then(|| rows.last().map(|r| r.seq)).flatten();
    Ok(Json(DeliveryPage { items: rows.into_iter().map(|r| delivery(r, None)).collect(), next_after }))
}

/// One delivery and every attempt at it.
#[utoipa::path(get, path = "/api/v1/deliveries/{id}", tag = "deliveries",
    params(("id" = i64, Path, description = "The delivery's number")),
    responses((status = 200, description = "The delivery", body = Delivery),
              (status = 404, description = "No such delivery", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = ["admin"])))]
pub async fn get(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Delivery>, ApiError> {
    let seq: i64 = id.parse().map_err(|_| not_found())?;
    let (row, attempts) = state.store.delivery(seq).await.map_err(super::api::store_problem)?.ok_or_else(not_found)?;
    Ok(Json(delivery(row, Some(attempts))))
}

/// Queues a dead, held, discarded or delivered delivery again, due now (409 when it is pending already, or is a
/// version older than one delivered).
#[utoipa::path(post, path = "/api/v1/deliveries/{id}/replay", tag = "deliveries",
    params(("id" = i64, Path, description = "The delivery's number")),
    responses((status = 200, description = "The delivery, pending", body = Delivery),
              (status = 404, description = "No such delivery", body = Problem, content_type = "application/problem+json"),
              (status = 409, description = "It cannot go again", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = ["admin"])))]
pub async fn replay(
    State(state): State<AppState>,
    Path(id): Path<String>,
    CallerActor(actor): CallerActor,
) -> Result<Json<Delivery>, ApiError> {
    let seq: i64 = id.parse().map_err(|_| not_found())?;
    let (row, changed) = state
        .store
        .replay_delivery(seq, &actor, OffsetDateTime::now_utc())
        .await
        .map_err(super::api::store_problem)?
        .ok_or_else(not_found)?;
    if !changed {
        return Err(refused(
            &row,
            "a pending delivery is queued already, and a version older than one delivered cannot go again",
        ));
    }
    Ok(Json(delivery(row, None)))
}

/// Gives up a pending (not in flight), held or dead delivery (409 otherwise).
#[utoipa::path(post, path = "/api/v1/deliveries/{id}/discard", tag = "deliveries",
    params(("id" = i64, Path, description = "The delivery's number")),
    responses((status = 200, description = "The delivery, discarded", body = Delivery),
              (status = 404, description = "No such delivery", body = Problem, content_type = "application/problem+json"),
              (status = 409, description = "It cannot be discarded", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = ["admin"])))]
pub async fn discard(
    State(state): State<AppState>,
    Path(id): Path<String>,
    CallerActor(actor): CallerActor,
) -> Result<Json<Delivery>, ApiError> {
    let seq: i64 = id.parse().map_err(|_| not_found())?;
    let (row, changed) = state
        .store
        .discard_delivery(seq, &actor, OffsetDateTime::now_utc())
        .await
        .map_err(super::api::store_problem)?
        .ok_or_else(not_found)?;
    if !changed {
        return Err(refused(&row, "only a pending (not in flight), held or dead delivery can be discarded"));
    }
    Ok(Json(delivery(row, None)))
}

/// 409: the delivery's state does not allow what was asked.
fn refused(row: &DeliveryRow, why: &str) -> ApiError {
    Problem::new(ProblemType::DeliveryState).detail(format!("the delivery is {}: {why}", row.state)).into()
}
