//! `/api/v1`: the agency's records by their own ids. `PUT` creates or replaces (idempotently), `GET` reads with an
//! `ETag`, lists page by cursor, history shows every version; a referral's status moves through its own endpoint.
//!
//! The handlers for each kind are stamped out by `record_routes!` so each gets its own typed OpenAPI operation;
//! the work is in the generic functions below, which call one intake or store function each.

use std::sync::LazyLock;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use time::OffsetDateTime;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi, ToSchema};

use super::AppState;
use super::auth::Caller;
use super::extract::{ApiQuery, CallerActor, Conditions, IdPath, JsonBody, etag};
use super::problem::{ApiError, Problem, ProblemType};
use crate::audit;
use crate::config::Scope;
use crate::domain::{self, AgencyRecord, RecordId, RecordKind, StatusChange, Timestamp};
use crate::intake::{self, IntakeError};
use crate::store::{Actor, Change, ListQuery, Precondition, RecordMeta, SaveOutcome, StoreError, StoredRecord};

/// Query of a list request.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Only records of this client.
    client: Option<String>,
    /// Only records with this status code (kinds with a status: care plans, referrals, consents).
    status: Option<String>,
    /// Only records changed at or after this instant (RFC 3339).
    updated_since: Option<String>,
    /// Only referrals going this way: `outbound` (the agency refers out) or `inbound` (a partner referred to the
    /// agency). Referrals only.
    direction: Option<domain::Direction>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Page size (default and maximum set in the configuration).
    limit: Option<u32>,
}

/// One record in a list.
#[derive(Debug, Serialize, ToSchema)]
pub struct ListedRecord {
    /// The record's id.
    id: String,
    /// Its current version (the `ETag` of `GET` without quotes).
    version: i64,
    /// When the current version was written.
    #[schema(value_type = String, format = DateTime)]
    updated_at: String,
    /// The record itself, as `GET` returns it.
    #[schema(value_type = Object)]
    record: Box<RawValue>,
}

/// One page of records, in id order.
#[derive(Debug, Serialize, ToSchema)]
pub struct RecordPage {
    /// The records of this page.
    items: Vec<ListedRecord>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<String>,
}

/// Every version of a record.
#[derive(Debug, Serialize, ToSchema)]
pub struct History {
    /// The record's id.
    id: String,
    /// Its kind.
    kind: RecordKind,
    /// Versions, oldest first.
    versions: Vec<HistoryEntry>,
}

/// One version of a record: who made it, when, how, and where it left the record's status.
#[derive(Debug, Serialize, ToSchema)]
pub struct HistoryEntry {
    /// Version number, from 1.
    version: i64,
    /// `created`, `replaced`, `status_changed`, `linked` or `seeded`.
    action: String,
    /// When.
    #[schema(value_type = String, format = DateTime)]
    changed_at: String,
    /// Name of the API key that made it (`seed` for the demo seed; the follow-up worker's name for a status read
    /// from a partner's server).
    changed_by: String,
    /// The partner on whose word it was made (a hospital that moved a referral's status), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    partner: Option<String>,
    /// The record's status in this version (kinds with a status).
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<String>,
    /// Why the referral was in that status, when it said (`declined`, `cancelled`, `on_hold`, `failed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    status_reason: Option<String>,
    /// Request id of the call that made it.
    request_id: String,
}

/// Query of the audit log.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditParams {
    /// Only entries after this sequence number (`next_after` of the previous page).
    after: Option<i64>,
    /// Page size (default and maximum set in the configuration).
    limit: Option<u32>,
}

/// A page of the audit log.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPage {
    /// Entries, oldest first.
    events: Vec<AuditEntry>,
    /// Pass as `after` for the next page.
    next_after: i64,
}

/// One entry of the audit chain.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditEntry {
    /// Position in the chain.
    seq: i64,
    /// When.
    #[schema(value_type = String, format = DateTime)]
    at: String,
    /// Name of the API key (or `outbox`, `followup`, `cli:<user>`, `anonymous`).
    actor: String,
    /// What was done: a write (`created`, `replaced`, `unchanged`, `status_changed`, `linked`, `seeded`), a read
    /// (`read`), a delivery attempt (`delivered`, `delivery_unchanged`, `delivery_retry`, `delivery_dead`,
    /// `delivery_held`), an operator's action (`delivery_replayed`, `delivery_discarded`, `sync_started`), a refusal
    /// (`authentication_refused`, `inbound_refused`, `partner_move_refused`).
    action: String,
    /// Kind of record, when it was about one.
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    /// Record id.
    #[serde(skip_serializing_if = "Option::is_none")]
    record_id: Option<String>,
    /// Version after the action (or read, or delivered).
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<i64>,
    /// The client whose data it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    client_id: Option<String>,
    /// Request id of the call.
    request_id: String,
    /// Facts particular to the action (the partner that made it…), ids and codes only.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    detail: Option<serde_json::Value>,
    /// The entry's hash in the audit chain (SHA-256 of its fields and the previous entry's hash).
    hash: String,
}

fn rfc3339(t: OffsetDateTime) -> String {
    Timestamp(t).to_string()
}

/// `Last-Modified` form of an instant.
fn http_date(t: OffsetDateTime) -> Option<HeaderValue> {
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    t.to_offset(time::UtcOffset::UTC).format(format).ok().and_then(|s| HeaderValue::from_str(&s).ok())
}

fn record_response(status: StatusCode, kind: RecordKind, id: &str, meta: RecordMeta, body: String) -> Response {
    let mut response = (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    let headers = response.headers_mut();
    if let Ok(tag) = HeaderValue::from_str(&etag(meta.version)) {
        headers.insert(header::ETAG, tag);
    }
    if let Some(date) = http_date(meta.updated_at) {
        headers.insert(header::LAST_MODIFIED, date);
    }
    if status == StatusCode::CREATED
        && let Ok(location) = HeaderValue::from_str(&format!("/api/v1/{}/{id}", kind.plural()))
    {
        headers.insert(header::LOCATION, location);
    }
    response
}

/// The problem a store failure becomes.
pub(super) fn store_problem(e: StoreError) -> ApiError {
    match e {
        StoreError::PreconditionFailed { current } => intake_problem(IntakeError::PreconditionFailed { current }),
        StoreError::Database(sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_)) => {
            ApiError::internal(ProblemType::Unavailable, e)
        }
        other => ApiError::internal(ProblemType::Internal, other),
    }
}

fn intake_problem(e: IntakeError) -> ApiError {
    let problem = match e {
        IntakeError::Invalid(errors) => Problem::new(ProblemType::InvalidRecord)
            .detail(format!("{} rule(s) broken", errors.len()))
            .errors(errors),
        IntakeError::IdMismatch => Problem::new(ProblemType::IdMismatch).errors(vec![domain::FieldError {
            path: "$.id".into(),
            detail: "must equal the id in the path, or be left out".into(),
        }]),
        IntakeError::StatusChangeNotAllowed { current, requested } => Problem::new(ProblemType::StatusChangeNotAllowed)
            .detail(format!(
                "the referral is {current}; POST {{\"status\":\"{requested}\"}} to /api/v1/referrals/{{id}}/status to change it"
            )),
        IntakeError::IllegalMove(m) => Problem::new(ProblemType::IllegalStatusMove)
            .detail(m.explain())
            .allowed_next(m.allowed().iter().map(|s| s.as_str().to_owned()).collect()),
        IntakeError::NotFound => Problem::new(ProblemType::NotFound).detail("no record with this id"),
        IntakeError::PreconditionFailed { current } => Problem::new(ProblemType::PreconditionFailed).detail(match current {
            Some(v) => format!("the record is at version {v} (ETag {})", etag(v)),
            None => "the record does not exist, or changed while this request was checked".into(),
        }),
        IntakeError::Store(e) => return store_problem(e),
        e @ (IntakeError::Corrupt { .. } | IntakeError::Encode { .. }) => return ApiError::internal(ProblemType::Internal, e),
    };
    problem.into()
}

fn not_found() -> ApiError {
    Problem::new(ProblemType::NotFound).detail("no record with this id").into()
}

fn invalid_query(detail: impl Into<String>) -> ApiError {
    Problem::new(ProblemType::InvalidQuery).detail(detail).into()
}

/// A record naming a directory service as its target must name one the catalog has and still offers. A record
/// that already named a service keeps it when the service is later withdrawn; a source that has never been synced
/// cannot be checked yet, so its ids are taken on trust (and logged).
async fn check_directory_target<T: AgencyRecord>(
    state: &AppState,
    id: &RecordId,
    service_id: &RecordId,
) -> Result<(), ApiError> {
    let refuse = |detail: String| -> ApiError {
        Problem::new(ProblemType::InvalidRecord)
            .detail("1 rule(s) broken")
            .errors(vec![domain::FieldError { path: "$.target.service_id".into(), detail }])
            .into()
    };
    match state.store.directory_service(service_id.as_str()).await.map_err(store_problem)? {
        Some((_, true)) => Ok(()),
        Some((_, false)) => {
            let stored = state.store.get_record(T::KIND, id).await.map_err(store_problem)?;
            let kept = stored
                .and_then(|s| serde_json::from_str::<T>(&s.body).ok())
                .is_some_and(|r| r.directory_service() == Some(service_id));
            if kept {
                Ok(())
            } else {
                Err(refuse("the directory no longer offers this service (it is inactive in the catalog)".into()))
            }
        }
        None => {
            let source = service_id.as_str().split_once('.').map(|(s, _)| s).filter(|s| state.sources.contains_key(*s));
            let Some(source) = source else {
                return Err(refuse(
                    "no configured directory has this service: ids are <directory>.<id>, as GET /api/v1/services gives them"
                        .into(),
                ));
            };
            if state.store.directory_last_success(source).await.map_err(store_problem)?.is_some() {
                return Err(refuse(format!("directory {source} has no service with this id")));
            }
            tracing::info!(record = %id, service = %service_id, directory = source,
                "Directory not synced yet: the referral's target service is taken unchecked.");
            Ok(())
        }
    }
}

/// The store's precondition for a write. An `If-Match` list of several versions is compared with the version the
/// record is at now, and the write then demands exactly that version: a write landing in between makes this one
/// fail (412) rather than slip through.
async fn precondition(
    state: &AppState,
    kind: RecordKind,
    id: &RecordId,
    conditions: Conditions,
) -> Result<Precondition, ApiError> {
    let versions = match conditions {
        Conditions::Store(pre) => return Ok(pre),
        Conditions::AnyVersion(versions) => versions,
    };
    let current = state.store.get_record(kind, id).await.map_err(store_problem)?.map(|s| s.meta.version);
    match current {
        Some(version) if versions.contains(&version) => Ok(Precondition::Version(version)),
        _ => Err(intake_problem(IntakeError::PreconditionFailed { current })),
    }
}

/// Intake through this gateway's store, owing new versions to its partners.
fn intake_of(state: &AppState) -> intake::Intake<'_> {
    intake::Intake { store: &*state.store, partners: &state.partners }
}

async fn put_record<T: AgencyRecord>(
    state: &AppState,
    actor: CallerActor,
    path: IdPath,
    pre: Conditions,
    record: T,
) -> Result<Response, ApiError> {
    if let Some(service_id) = record.directory_service() {
        check_directory_target::<T>(state, &path.id, service_id).await?;
    }
    intake::check_partner(&record, &state.partners).map_err(intake_problem)?;
    let pre = precondition(state, T::KIND, &path.id, pre).await?;
    let saved =
        intake::put(intake_of(state), path.id.clone(), record, pre, &actor.0, Change::Put, OffsetDateTime::now_utc())
            .await
            .map_err(intake_problem)?;
    let status = if matches!(saved.outcome, SaveOutcome::Created(_)) { StatusCode::CREATED } else { StatusCode::OK };
    Ok(record_response(status, T::KIND, path.id.as_str(), saved.outcome.meta(), saved.body))
}

/// Who reads through `/api/v1`, for the audit.
fn api_reader(actor: &Actor) -> audit::Reader<'_> {
    audit::Reader { actor: &actor.key_name, request_id: &actor.request_id, partner: None, via: "api" }
}

/// Keeps the audit entries of a read before its answer goes (an answer whose read could not be audited is not
/// sent: 503).
async fn audit_reads(state: &AppState, entries: Vec<audit::Entry>) -> Result<(), ApiError> {
    state.store.audit(entries).await.map_err(store_problem)
}

async fn get_record(state: &AppState, actor: &Actor, kind: RecordKind, path: IdPath) -> Result<Response, ApiError> {
    let found = match path.version {
        None => state.store.get_record(kind, &path.id).await,
        Some(v) => state.store.get_version(kind, &path.id, v).await,
    };
    let stored = found.map_err(store_problem)?.ok_or_else(not_found)?;
    let client = audit::client_of(&stored.body);
    let entry = audit::read(
        OffsetDateTime::now_utc(),
        api_reader(actor),
        kind.as_str(),
        &stored.id,
        stored.meta.version,
        client.as_deref(),
        None,
    );
    audit_reads(state, vec![entry]).await?;
    Ok(record_response(StatusCode::OK, kind, &stored.id, stored.meta, stored.body))
}

/// The page size a caller asked for, or the configured default; refused outside 1..=`api.max_page_size`.
fn page_limit(state: &AppState, asked: Option<u32>) -> Result<u32, ApiError> {
    let limit = asked.unwrap_or(state.api.default_page_size);
    if limit == 0 || limit > state.api.max_page_size {
        return Err(invalid_query(format!("limit: between 1 and {}", state.api.max_page_size)));
    }
    Ok(limit)
}

fn list_query<T: AgencyRecord>(state: &AppState, p: ListParams) -> Result<ListQuery, ApiError> {
    let client_id =
        p.client.map(|c| RecordId::parse(&c)).transpose().map_err(|e| invalid_query(format!("client: {e}")))?;
    if let Some(status) = &p.status
        && !T::is_known_status(status)
    {
        return Err(invalid_query(format!("status: not a status code of {} records", T::KIND)));
    }
    let updated_since = p
        .updated_since
        .map(|s| Timestamp::parse(&s))
        .transpose()
        .map_err(|e| invalid_query(format!("updated_since: {e}")))?
        .map(|t| t.0);
    let after = p
        .cursor
        .map(|c| {
            hex::decode(&c)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .filter(|s| RecordId::parse(s).is_ok())
                .ok_or_else(|| invalid_query("cursor: not a cursor this API issued"))
        })
        .transpose()?;
    if p.direction.is_some() && T::KIND != RecordKind::Referral {
        return Err(invalid_query("direction: only referrals have a direction"));
    }
    let direction = p.direction.map(domain::Direction::as_str);
    let limit = page_limit(state, p.limit)?;
    Ok(ListQuery { kind: T::KIND, client_id, status: p.status, direction, updated_since, after, limit })
}

fn listed(record: StoredRecord) -> Result<ListedRecord, ApiError> {
    let body = RawValue::from_string(record.body).map_err(|e| ApiError::internal(ProblemType::Internal, e))?;
    Ok(ListedRecord {
        id: record.id,
        version: record.meta.version,
        updated_at: rfc3339(record.meta.updated_at),
        record: body,
    })
}

async fn list_records<T: AgencyRecord>(
    state: &AppState,
    actor: &Actor,
    params: ListParams,
) -> Result<Json<RecordPage>, ApiError> {
    let query = list_query::<T>(state, params)?;
    let page = state.store.list_records(&query).await.map_err(store_problem)?;
    let now = OffsetDateTime::now_utc();
    let entries = page
        .items
        .iter()
        .map(|r| {
            let client = audit::client_of(&r.body);
            audit::read(now, api_reader(actor), T::KIND.as_str(), &r.id, r.meta.version, client.as_deref(), None)
        })
        .collect();
    audit_reads(state, entries).await?;
    let items = page.items.into_iter().map(listed).collect::<Result<_, _>>()?;
    Ok(Json(RecordPage { items, next_cursor: page.next_after.map(hex::encode) }))
}

async fn record_history(
    state: &AppState,
    actor: &Actor,
    kind: RecordKind,
    path: IdPath,
) -> Result<Json<History>, ApiError> {
    let versions = state.store.history(kind, &path.id).await.map_err(store_problem)?;
    let Some(last) = versions.last() else {
        return Err(not_found());
    };
    let client = audit::client_of(&last.body);
    let entry = audit::read(
        OffsetDateTime::now_utc(),
        api_reader(actor),
        kind.as_str(),
        path.id.as_str(),
        last.version,
        client.as_deref(),
        Some("history"),
    );
    audit_reads(state, vec![entry]).await?;
    let versions = versions
        .into_iter()
        .map(|v| {
            let body: serde_json::Value = serde_json::from_str(&v.body).unwrap_or_default();
            let text = |k: &str| body.get(k).and_then(serde_json::Value::as_str).map(str::to_owned);
            HistoryEntry {
                version: v.version,
                action: v.change,
                changed_at: rfc3339(v.changed_at),
                changed_by: v.changed_by,
                partner: v.partner,
                status: text("status"),
                status_reason: text("status_reason"),
                request_id: v.request_id,
            }
        })
        .collect();
    Ok(Json(History { id: path.id.to_string(), kind, versions }))
}

/// Declares the typed, documented handlers of one record kind.
macro_rules! record_routes {
    ($module:ident, $ty:ty, $tag:literal, $item:literal, $collection:literal, $history:literal, $version:literal) => {
        /// Handlers of one record kind.
        pub mod $module {
            use super::*;

            /// Creates (201) or replaces (200) the record with this id; an identical body changes nothing.
            #[utoipa::path(put, path = $item, tag = $tag, request_body = $ty,
                params(("id" = String, Path, description = "The agency's id of the record"),
                       ("If-Match" = Option<String>, Header, description = "Only replace this version (its ETag; a comma-separated list matches any of its versions), or any existing version (*)"),
                       ("If-None-Match" = Option<String>, Header, description = "* to only create")),
                responses(
                    (status = 201, description = "Created", body = $ty, headers(("ETag" = String), ("Location" = String))),
                    (status = 200, description = "Replaced, or already identical", body = $ty, headers(("ETag" = String))),
                    (status = 400, description = "Malformed JSON or id", body = Problem, content_type = "application/problem+json"),
                    (status = 409, description = "A referral's status may only change through its status endpoint", body = Problem, content_type = "application/problem+json"),
                    (status = 412, description = "The record is not at the expected version", body = Problem, content_type = "application/problem+json"),
                    (status = 413, description = "Body over the size limit", body = Problem, content_type = "application/problem+json"),
                    (status = 415, description = "Body not application/json, or in a content coding other than gzip", body = Problem, content_type = "application/problem+json"),
                    (status = 422, description = "Invalid record; errors name each bad field's JSON path", body = Problem, content_type = "application/problem+json")),
                security(("api_key" = ["write"])))]
            pub async fn put(
                State(state): State<AppState>,
                actor: CallerActor,
                path: IdPath,
                pre: Conditions,
                JsonBody(record): JsonBody<$ty>,
            ) -> Result<Response, ApiError> {
                put_record::<$ty>(&state, actor, path, pre, record).await
            }

            /// Reads the current version of the record.
            #[utoipa::path(get, path = $item, tag = $tag,
                params(("id" = String, Path, description = "The agency's id of the record")),
                responses(
                    (status = 200, description = "The record", body = $ty, headers(("ETag" = String), ("Last-Modified" = String))),
                    (status = 404, description = "No such record", body = Problem, content_type = "application/problem+json")),
                security(("api_key" = ["read"])))]
            pub async fn get(
                State(state): State<AppState>,
                actor: CallerActor,
                path: IdPath,
            ) -> Result<Response, ApiError> {
                get_record(&state, &actor.0, <$ty as AgencyRecord>::KIND, path).await
            }

            /// Lists records in id order, a page at a time.
            #[utoipa::path(get, path = $collection, tag = $tag, params(ListParams),
                responses(
                    (status = 200, description = "One page", body = RecordPage),
                    (status = 400, description = "Unknown or malformed query parameter", body = Problem, content_type = "application/problem+json")),
                security(("api_key" = ["read"])))]
            pub async fn list(
                State(state): State<AppState>,
                actor: CallerActor,
                ApiQuery(params): ApiQuery<ListParams>,
            ) -> Result<Json<RecordPage>, ApiError> {
                list_records::<$ty>(&state, &actor.0, params).await
            }

            /// Lists every version of the record: who changed it, when, in which request.
            #[utoipa::path(get, path = $history, tag = $tag,
                params(("id" = String, Path, description = "The agency's id of the record")),
                responses(
                    (status = 200, description = "The versions, oldest first", body = History),
                    (status = 404, description = "No such record", body = Problem, content_type = "application/problem+json")),
                security(("api_key" = ["read"])))]
            pub async fn history(
                State(state): State<AppState>,
                actor: CallerActor,
                path: IdPath,
            ) -> Result<Json<History>, ApiError> {
                record_history(&state, &actor.0, <$ty as AgencyRecord>::KIND, path).await
            }

            /// Reads one past version of the record.
            #[utoipa::path(get, path = $version, tag = $tag,
                params(("id" = String, Path, description = "The agency's id of the record"),
                       ("version" = i64, Path, description = "Version number, from 1")),
                responses(
                    (status = 200, description = "That version", body = $ty, headers(("ETag" = String))),
                    (status = 404, description = "No such record or version", body = Problem, content_type = "application/problem+json")),
                security(("api_key" = ["read"])))]
            pub async fn version(
                State(state): State<AppState>,
                actor: CallerActor,
                path: IdPath,
            ) -> Result<Response, ApiError> {
                get_record(&state, &actor.0, <$ty as AgencyRecord>::KIND, path).await
            }
        }
    };
}

record_routes!(
    clients,
    domain::Client,
    "clients",
    "/api/v1/clients/{id}",
    "/api/v1/clients",
    "/api/v1/clients/{id}/history",
    "/api/v1/clients/{id}/history/{version}"
);
record_routes!(
    assessments,
    domain::Assessment,
    "assessments",
    "/api/v1/assessments/{id}",
    "/api/v1/assessments",
    "/api/v1/assessments/{id}/history",
    "/api/v1/assessments/{id}/history/{version}"
);
record_routes!(
    care_plans,
    domain::CarePlan,
    "care-plans",
    "/api/v1/care-plans/{id}",
    "/api/v1/care-plans",
    "/api/v1/care-plans/{id}/history",
    "/api/v1/care-plans/{id}/history/{version}"
);
record_routes!(
    referrals,
    domain::Referral,
    "referrals",
    "/api/v1/referrals/{id}",
    "/api/v1/referrals",
    "/api/v1/referrals/{id}/history",
    "/api/v1/referrals/{id}/history/{version}"
);
record_routes!(
    consents,
    domain::Consent,
    "consents",
    "/api/v1/consents/{id}",
    "/api/v1/consents",
    "/api/v1/consents/{id}/history",
    "/api/v1/consents/{id}/history/{version}"
);

/// Moves a referral to a new status. The answer carries the referral as stored (other writers' notes and fields
/// included) only to a key that may also read; a write-only key gets 204 with the new `ETag`.
#[utoipa::path(post, path = "/api/v1/referrals/{id}/status", tag = "referrals", request_body = StatusChange,
    params(("id" = String, Path, description = "The agency's id of the referral"),
           ("If-Match" = Option<String>, Header, description = "Only change this version (its ETag; a comma-separated list matches any of its versions)")),
    responses(
        (status = 200, description = "The referral after the change (keys with the read scope)", body = domain::Referral, headers(("ETag" = String))),
        (status = 204, description = "Changed (keys without the read scope)", headers(("ETag" = String))),
        (status = 404, description = "No such referral", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The state machine does not let the agency make this move (`allowed_next` says what it may set)", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "The referral is not at the expected version", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Unknown status, or a reason missing", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = ["write"])))]
pub async fn change_referral_status(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    actor: CallerActor,
    path: IdPath,
    pre: Conditions,
    JsonBody(change): JsonBody<StatusChange>,
) -> Result<Response, ApiError> {
    let pre = precondition(&state, RecordKind::Referral, &path.id, pre).await?;
    let saved = intake::change_referral_status(
        intake_of(&state),
        &path.id,
        &change,
        domain::Party::Agency,
        pre,
        &actor.0,
        OffsetDateTime::now_utc(),
    )
    .await
    .map_err(intake_problem)?;
    if !caller.may(Scope::Read) {
        let mut response = StatusCode::NO_CONTENT.into_response();
        if let Ok(tag) = HeaderValue::from_str(&etag(saved.outcome.meta().version)) {
            response.headers_mut().insert(header::ETAG, tag);
        }
        return Ok(response);
    }
    Ok(record_response(StatusCode::OK, RecordKind::Referral, path.id.as_str(), saved.outcome.meta(), saved.body))
}

/// Which client a partner's referral is for.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientLink {
    /// One of the referral's `client_candidates`.
    #[schema(value_type = String)]
    pub client_id: domain::RecordId,
}

/// Links a partner's referral whose patient matched several clients to the one it is for (one of its
/// `client_candidates`). Until then the agency may only decline it.
#[utoipa::path(post, path = "/api/v1/referrals/{id}/link", tag = "referrals", request_body = ClientLink,
    params(("id" = String, Path, description = "The agency's id of the referral"),
           ("If-Match" = Option<String>, Header, description = "Only change this version (its ETag)")),
    responses(
        (status = 200, description = "The referral, linked", body = domain::Referral, headers(("ETag" = String))),
        (status = 404, description = "No such referral", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "The referral is not at the expected version", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The referral waits for no link, or the client is not one of its candidates", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = ["write"])))]
pub async fn link_referral(
    State(state): State<AppState>,
    actor: CallerActor,
    path: IdPath,
    pre: Conditions,
    JsonBody(link): JsonBody<ClientLink>,
) -> Result<Response, ApiError> {
    let pre = precondition(&state, RecordKind::Referral, &path.id, pre).await?;
    let saved =
        intake::link_referral(intake_of(&state), &path.id, &link.client_id, pre, &actor.0, OffsetDateTime::now_utc())
            .await
            .map_err(intake_problem)?;
    Ok(record_response(StatusCode::OK, RecordKind::Referral, path.id.as_str(), saved.outcome.meta(), saved.body))
}

/// Reads the audit log: every write, by which key, in which request.
#[utoipa::path(get, path = "/api/v1/audit-events", tag = "audit", params(AuditParams),
    responses((status = 200, description = "Entries, oldest first", body = AuditPage),
              (status = 403, description = "The key lacks the admin scope", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = ["admin"])))]
pub async fn audit_events(
    State(state): State<AppState>,
    ApiQuery(params): ApiQuery<AuditParams>,
) -> Result<Json<AuditPage>, ApiError> {
    let limit = page_limit(&state, params.limit)?;
    let after = params.after.unwrap_or(0);
    let events = state.store.audit_chain(after, limit).await.map_err(store_problem)?;
    let next_after = events.last().map_or(after, |e| e.seq);
    let events = events
        .into_iter()
        .map(|e| AuditEntry {
            seq: e.seq,
            at: rfc3339(crate::store::from_micros(e.entry.at)),
            actor: e.entry.actor,
            action: e.entry.action,
            kind: e.entry.kind,
            record_id: e.entry.record_id,
            version: e.entry.version,
            client_id: e.entry.client,
            request_id: e.entry.request_id,
            detail: e.entry.detail.and_then(|d| serde_json::from_str(&d).ok()),
            hash: e.hash,
        })
        .collect();
    Ok(Json(AuditPage { events, next_after }))
}

/// The OpenAPI 3.1 document of this API.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "meta",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json")),
    security(("api_key" = ["read"])))]
pub async fn openapi_json() -> Response {
    static DOC: LazyLock<String> =
        LazyLock::new(|| ApiDoc::openapi().to_pretty_json().unwrap_or_else(|_| "{}".to_owned()));
    ([(header::CONTENT_TYPE, "application/json")], DOC.as_str()).into_response()
}

struct BearerKey;

impl Modify for BearerKey {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API key from the gateway's configuration; scopes: read, write, admin"))
                    .build(),
            ),
        );
    }
}

/// The OpenAPI document, generated from the handlers and types above.
#[derive(OpenApi)]
#[openapi(
    info(title = "carebridge internal API", description = "The agency's records (clients, assessments, care plans, referrals, consents) by the agency's own ids. Every call needs `Authorization: Bearer <api key>`. Errors are application/problem+json with a stable `type` and the JSON path of each bad field."),
    paths(
        clients::put, clients::get, clients::list, clients::history, clients::version,
        assessments::put, assessments::get, assessments::list, assessments::history, assessments::version,
        care_plans::put, care_plans::get, care_plans::list, care_plans::history, care_plans::version,
        referrals::put, referrals::get, referrals::list, referrals::history, referrals::version,
        change_referral_status,
        link_referral,
        consents::put, consents::get, consents::list, consents::history, consents::version,
        audit_events, openapi_json,
        super::directory::search, super::directory::service, super::directory::sync_now, super::directory::sync_job,
        super::preview::preview,
        super::deliveries::list, super::deliveries::get, super::deliveries::replay, super::deliveries::discard,
    ),
    components(schemas(Problem, domain::FieldError)),
    modifiers(&BearerKey),
)]
pub struct ApiDoc;
