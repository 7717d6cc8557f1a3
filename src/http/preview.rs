//! `POST /api/v1/preview/{kind}`: the FHIR a record would become, with any profile violations,
//! without storing or sending anything.

use axum::Json;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::extract::{ApiQuery, JsonBody};
use super::problem::{ApiError, Problem, ProblemType};
use crate::domain::{RecordId, RecordKind};
use crate::mapping::profile::Violation;
use crate::mapping::{self, MapError, Related};

/// Query of a preview.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PreviewParams {
    /// Map as this partner's overlay does (its US Core version, identifier systems, extra elements).
    partner: Option<String>,
}

/// What a record would become.
#[derive(Debug, Serialize, ToSchema)]
pub struct Preview {
    /// The FHIR document: one resource, or a transaction Bundle (care plans, referrals, several resources).
    #[schema(value_type = Object)]
    fhir: Value,
    /// Profile and typed-model violations; a record with any would not be sent.
    violations: Vec<Violation>,
    /// Whether it could be sent as it is.
    sendable: bool,
}

/// Maps a record to FHIR without storing or sending it.
#[utoipa::path(
    post,
    path = "/api/v1/preview/{kind}",
    params(("kind" = String, Path, description = "client, assessment, care-plan, referral or consent"), PreviewParams),
    request_body(content = Object, description = "An agency record of that kind"),
    responses(
        (status = 200, description = "The FHIR it would become", body = Preview),
        (status = 404, description = "No such kind or partner", body = Problem),
        (status = 422, description = "The record is invalid, or a code has no mapping", body = Problem),
    ),
    security(("bearer" = ["write"])),
    tag = "mappings"
)]
pub async fn preview(
    State(state): State<AppState>,
    Path(kind): Path<String>,
    ApiQuery(params): ApiQuery<PreviewParams>,
    JsonBody(record): JsonBody<Value>,
) -> Result<Json<Preview>, ApiError> {
    let kind = RecordKind::from_name(&kind)
        .ok_or_else(|| Problem::new(ProblemType::NotFound).detail(format!("no record kind `{kind}`")))?;
    let record =
        mapping::canonical(kind, &record).map_err(|errors| Problem::new(ProblemType::InvalidRecord).errors(errors))?;
    let related = Related { client: client_of(&state, &record).await? };
    let output = match state.mappings.to_fhir(kind, &record, params.partner.as_deref(), &related) {
        Ok(o) => o,
        Err(MapError::UnknownPartner(p)) => {
            return Err(Problem::new(ProblemType::NotFound).detail(format!("no partner `{p}` in the mappings")).into());
        }
        Err(e) => return Err(Problem::new(ProblemType::InvalidRecord).detail(e.to_string()).into()),
    };
    let violations = output.violations.clone();
    let sendable = violations.is_empty();
    Ok(Json(Preview { fhir: output.into_document(kind), violations, sendable }))
}

/// The stored client a care plan or referral names, for the `Patient` entry of its Bundle.
async fn client_of(state: &AppState, record: &Value) -> Result<Option<Value>, ApiError> {
    let Some(id) = record.get("client_id").and_then(Value::as_str).and_then(|s| RecordId::parse(s).ok()) else {
        return Ok(None);
    };
    let stored = state.store.get_record(RecordKind::Client, &id).await.map_err(super::api::store_problem)?;
    Ok(stored.and_then(|s| serde_json::from_str(&s.body).ok()))
}
