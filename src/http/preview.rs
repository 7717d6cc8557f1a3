//! `POST /api/v1/preview/{kind}`: the FHIR a record would become, with any profile violations,
//! without storing or sending anything.
//!
//! What a preview shows depends on the caller's scopes. Preview needs `write` (it is the dry run of a write). A
//! care plan or referral names a client, and its Bundle carries that client's `Patient`: the preview reads the
//! stored client for it only when the key also has `read`; a write-only key sees nothing but the FHIR made from
//! the body it sent (the Bundle then has no `Patient` entry), so preview never reveals a stored record to a key
//! that may not read it.
//!
//! Mapping is CPU work: it runs on the blocking pool, at most [`AppState::mapping_slots`] at a time, so a burst of
//! large previews cannot stall the async workers that answer every other request.

use axum::extract::State;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::auth::Caller;
use super::extract::{ApiQuery, JsonBytes, PathText, parse_json};
use super::problem::{ApiError, Problem, ProblemType};
use crate::config::Scope;
use crate::domain::{AgencyRecord, KindJob, RecordKind, canonical_value};
use crate::mapping::profile::Violation;
use crate::mapping::{MapError, Related};

/// Query of a preview.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PreviewParams {
    /// Map for this configured partner (`[[partners]]`), with its overlay when it has one (its US Core version,
    /// identifier systems, extra elements).
    partner: Option<String>,
}

/// What a record would become.
#[derive(Debug, Serialize, ToSchema)]
pub struct Preview {
    /// The FHIR document: one resource, or a transaction Bundle (care plans, referrals, several resources).
    #[schema(value_type = Object)]
    fhir: Value,
    /// Base R4 (JSON Schema, Codings, bdl-7), typed-model and profile violations; a record with any would not be
    /// sent.
    violations: Vec<Violation>,
    /// Whether it could be sent as it is.
    sendable: bool,
}

/// Maps a record to FHIR without storing or sending it.
#[utoipa::path(
    post,
    path = "/api/v1/preview/{kind}",
    params(("kind" = String, Path, description = "client, assessment, care-plan, referral or consent"), PreviewParams),
    request_body(content = Object, description = "An agency record of that kind, checked exactly as a PUT checks it"),
    responses(
        (status = 200, description = "The FHIR it would become. The Patient of a care plan or referral Bundle comes from the stored client, and only for a key that also has the read scope.", body = Preview),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such kind or partner", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The record is invalid, or a code has no mapping", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["write"])),
    tag = "mappings"
)]
pub async fn preview(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    PathText(kind): PathText,
    ApiQuery(params): ApiQuery<PreviewParams>,
    JsonBytes(body): JsonBytes,
) -> Result<Json<Preview>, ApiError> {
    let kind = RecordKind::from_name(&kind).ok_or_else(|| {
        Problem::new(ProblemType::NotFound)
            .detail("no such record kind: client, assessment, care-plan, referral or consent")
    })?;
    let record = checked(kind, &body)?;
    let overlay = match params.partner.as_deref() {
        None => None,
        Some(name) => state
            .partners
            .overlay_of(name)
            .ok_or_else(|| Problem::new(ProblemType::NotFound).detail("no such partner in the configuration"))?
            .map(str::to_owned),
    };
    // What other writers stored (the client, the needs' other records) is read only for a key that may read it.
    // Only what the mapping of this kind reads: the Patient for care plan and referral Bundles, the client's other
    // assessments and care plans for the needs of an assessment or a care plan.
    let related = if caller.may(Scope::Read) {
        crate::outbox::related(&*state.store, kind, &record).await.map_err(super::api::store_problem)?
    } else {
        Related::default()
    };
    let _slot = state.mapping_slots.acquire().await.map_err(|e| ApiError::internal(ProblemType::Internal, e))?;
    let mappings = state.mappings.clone();
    // The request's span goes along, so anything logged there (a panic too) carries the request id.
    let span = tracing::Span::current();
    let mapped = tokio::task::spawn_blocking(move || {
        let _entered = span.enter();
        mappings.to_fhir(kind, &record, overlay.as_deref(), &related).map(|output| {
            let violations = output.violations.clone();
            (output.into_document(kind), violations)
        })
    })
    .await
    .map_err(|e| ApiError::internal(ProblemType::Internal, e))?;
    let (fhir, violations) = match mapped {
        Ok(o) => o,
        Err(MapError::UnknownPartner(_)) => {
            return Err(Problem::new(ProblemType::NotFound).detail("no such partner in the mappings").into());
        }
        Err(e) => return Err(Problem::new(ProblemType::InvalidRecord).detail(e.to_string()).into()),
    };
    let sendable = violations.is_empty();
    Ok(Json(Preview { fhir, violations, sendable }))
}

/// The body parsed as a record of `kind` by the same parser and rules as `PUT`, in canonical JSON.
fn checked(kind: RecordKind, bytes: &[u8]) -> Result<Value, ApiError> {
    struct Check<'a>(&'a [u8]);
    impl KindJob for Check<'_> {
        type Output = Result<Value, ApiError>;
        fn run<T: AgencyRecord>(self) -> Self::Output {
            let record: T = parse_json(self.0)?;
            canonical_value(&record).map_err(|errors| {
                let detail = format!("{} rule(s) broken", errors.len());
                Problem::new(ProblemType::InvalidRecord).detail(detail).errors(errors).into()
            })
        }
    }
    kind.with_type(Check(bytes))
}
