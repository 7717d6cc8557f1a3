//! `/fhir` for the agency's records: the referrals' Tasks (read, vread, search, and their status by update), and
//! `ServiceRequest`, `Patient`, `CarePlan`, `Goal` and `Consent` (read, search); inbound referrals (`POST /fhir`,
//! `POST /fhir/Task`). For agency keys and for partner keys acting as their partner (see
//! [`crate::followup::served`] for what each may see and do).
//!
//! Errors are `OperationOutcome`s: 404 for a Task the caller may not see (it does not exist for it), 412
//! (`conflict`) for a stale `If-Match`, 422 (`business-rule`) for a move the state machine does not give the caller,
//! 400 for a body that is not a Task of this id, 415 for a body that is not FHIR JSON.

use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::AppState;
use super::api::store_problem;
use super::extract::{CallerActor, Conditions};
use super::fhir::{all_params, base, fhir, invalid, last_updated_bounds, not_found, number, params, searchset};
use super::problem::{ApiError, Problem, ProblemType};
use super::public_url::RequestBase;
use crate::domain::RecordId;
use crate::followup::inbound::{Inbound, InboundError, Received};
use crate::followup::served::{Reader, ServeError, Served, ServedResource};
use crate::followup::subscription::HookError;
use crate::intake::IntakeError;
use crate::keys::Caller;
use crate::partners::PartnerSettings;
use crate::store::Precondition;

const DEFAULT_COUNT: u32 = 20;
const MAX_COUNT: u32 = 100;

fn served(state: &AppState) -> Served<'_> {
    Served { store: &*state.store, mappings: &state.mappings, policy: &state.policy, partners: &state.partners }
}

fn reader(caller: &Caller) -> Reader<'_> {
    caller.partner.as_deref().map_or(Reader::Agency, Reader::Partner)
}

/// Keeps the audit entries of what `caller` is about to be shown, one per record version, before the answer goes
/// (an answer whose read could not be audited is not sent).
async fn audit_served(
    state: &AppState,
    caller: &Caller,
    actor: &CallerActor,
    shown: &[&ServedResource],
) -> Result<(), ApiError> {
    let reader = crate::audit::Reader {
        actor: &actor.0.key_name,
        request_id: &actor.0.request_id,
        partner: caller.partner.as_deref(),
        via: "fhir",
    };
    let now = OffsetDateTime::now_utc();
    let mut seen = std::collections::HashSet::new();
    let entries = shown
        .iter()
        .filter(|r| seen.insert((r.kind, r.record_id.as_str(), r.version)))
        .map(|r| crate::audit::read(now, reader, r.kind.as_str(), &r.record_id, r.version, r.client.as_deref(), None))
        .collect();
    state.store.audit(entries).await.map_err(|e| serve_problem(ServeError::Store(e)))
}

fn serve_problem(e: ServeError) -> ApiError {
    serve_problem_in(e, None)
}

/// As [`serve_problem`], a refused move written in Task codes (through the `referral-status-task` ConceptMap).
fn serve_problem_in(e: ServeError, mappings: Option<&crate::mapping::Mappings>) -> ApiError {
    let task_code = |s: crate::domain::ReferralStatus| {
        mappings.and_then(|m| m.task_status_of(s)).unwrap_or_else(|| s.as_str().to_owned())
    };
    match e {
        ServeError::Store(e) => store_problem(e),
        ServeError::Render(_) => ApiError::internal(ProblemType::Internal, e),
        ServeError::Invalid(detail) => Problem::new(ProblemType::InvalidRecord).detail(detail).into(),
        ServeError::Intake(IntakeError::IllegalMove(m)) => Problem::new(ProblemType::BusinessRule)
            .detail(m.explain_in(task_code))
            .allowed_next(m.allowed().iter().map(|s| task_code(*s)).collect())
            .into(),
        ServeError::Intake(IntakeError::PreconditionFailed { current }) => {
            Problem::new(ProblemType::PreconditionFailed)
                .detail(match current {
                    Some(v) => format!("the Task is at version {v} (ETag W/\"{v}\")"),
                    None => "the Task changed while this request was checked".into(),
                })
                .into()
        }
        ServeError::Intake(IntakeError::Invalid(errors)) => Problem::new(ProblemType::BusinessRule)
            .detail(errors.iter().map(|e| e.detail.clone()).collect::<Vec<_>>().join("; "))
            .into(),
        ServeError::Intake(IntakeError::NotFound) => not_found("Task"),
        ServeError::Intake(IntakeError::Store(e)) => store_problem(e),
        ServeError::Intake(e) => ApiError::internal(ProblemType::Internal, e),
    }
}

/// A resource answer with its `ETag` (the version of the record it comes from) and `Last-Modified`.
fn resource_response(status: StatusCode, t: &ServedResource) -> Response {
    let mut response = fhir(status, &t.resource);
    if let Ok(tag) = HeaderValue::from_str(&format!("W/\"{}\"", t.version)) {
        response.headers_mut().insert(header::ETAG, tag);
    }
    if let Some(at) = t.resource.pointer("/meta/lastUpdated").and_then(Value::as_str)
        && let Ok(at) = OffsetDateTime::parse(at, &Rfc3339)
        && let Ok(text) = at.to_offset(time::UtcOffset::UTC).format(&time::format_description::well_known::Rfc2822)
        && let Ok(value) = HeaderValue::from_str(&text.replace("+0000", "GMT"))
    {
        response.headers_mut().insert(header::LAST_MODIFIED, value);
    }
    response
}

/// `GET /fhir/Task/{id}`.
///
/// # Errors
/// 404 when there is no such Task for this caller.
pub async fn read(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    actor: CallerActor,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let t = served(&state).task(reader(&caller), &id, None).await.map_err(serve_problem)?;
    let t = t.ok_or_else(|| not_found("Task"))?;
    audit_served(&state, &caller, &actor, &[&t]).await?;
    Ok(resource_response(StatusCode::OK, &t))
}

/// `GET /fhir/Task/{id}/_history/{version}`.
///
/// # Errors
/// 404 when there is no such Task or version for this caller.
pub async fn vread(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    actor: CallerActor,
    Path((id, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let version = version.parse::<i64>().map_err(|_| not_found("Task version"))?;
    let t = served(&state).task(reader(&caller), &id, Some(version)).await.map_err(serve_problem)?;
    let t = t.ok_or_else(|| not_found("Task version"))?;
    audit_served(&state, &caller, &actor, &[&t]).await?;
    Ok(resource_response(StatusCode::OK, &t))
}

/// `PUT /fhir/Task/{id}` (with `If-Match: W/"<version>"` to update only that version): sets the referral's status
/// as the caller's move; the answer is the Task as the caller now sees it.
///
/// # Errors
/// 400, 404, 412, 415 or 422 `OperationOutcome`s (see the module docs).
pub async fn update(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    actor: CallerActor,
    Path(id): Path<String>,
    conditions: Conditions,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let write = InboundWrite::of(&caller, &actor, "PUT /fhir/Task/{id}");
    let result = update_task(&state, &caller, actor, &id, conditions, &headers, &body).await;
    write.audited(&state, result).await
}

async fn update_task(
    state: &AppState,
    caller: &Caller,
    actor: CallerActor,
    id: &str,
    conditions: Conditions,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    let sent = fhir_body(headers, body)?;
    if sent.get("resourceType").and_then(Value::as_str) != Some("Task") {
        return Err(invalid("the body must be a Task"));
    }
    if sent.get("id").and_then(Value::as_str).is_some_and(|b| b != id) {
        return Err(invalid("the Task's id must be the id in the URL"));
    }
    let served = served(state);
    let reader = reader(caller);
    // A Task the caller may not see does not exist for it, whatever it sends.
    let current = served.task(reader, id, None).await.map_err(serve_problem)?.ok_or_else(|| not_found("Task"))?;
    let pre = match conditions {
        Conditions::Store(Precondition::Absent) => {
            return Err(invalid("If-None-Match does not apply to a Task update"));
        }
        Conditions::Store(p) => p,
        Conditions::AnyVersion(versions) if versions.contains(&current.version) => {
            Precondition::Version(current.version)
        }
        Conditions::AnyVersion(_) => Precondition::Version(-1),
    };
    let id = RecordId::parse(id).map_err(|_| not_found("Task"))?;
    let mut actor = actor.0;
    actor.partner = caller.partner.as_deref().map(str::to_owned);
    served
        .set_status(reader, &id, &sent, pre, &actor, OffsetDateTime::now_utc())
        .await
        .map_err(|e| serve_problem_in(e, Some(&state.mappings)))?;
    let after =
        served.task(reader, id.as_str(), None).await.map_err(serve_problem)?.ok_or_else(|| not_found("Task"))?;
    Ok(resource_response(StatusCode::OK, &after))
}

/// A write on `/fhir` (a referral sent in, a Task moved), audited when it is refused: who sent it (key, partner),
/// where, the status and the kind of problem, never the body. An accepted one is audited by the writes it makes.
struct InboundWrite {
    actor: String,
    request_id: String,
    partner: Option<String>,
    route: &'static str,
}

impl InboundWrite {
    fn of(caller: &Caller, actor: &CallerActor, route: &'static str) -> Self {
        InboundWrite {
            actor: actor.0.key_name.clone(),
            request_id: actor.0.request_id.clone(),
            partner: caller.partner.as_deref().map(str::to_owned),
            route,
        }
    }

    /// `result`, after auditing it when it is a refusal.
    async fn audited(self, state: &AppState, result: Result<Response, ApiError>) -> Result<Response, ApiError> {
        if let Err(e) = &result {
            let entry =
                crate::audit::Entry::new(OffsetDateTime::now_utc(), &self.actor, "inbound_refused", &self.request_id)
                    .with_detail(&serde_json::json!({
                        "via": "fhir",
                        "partner": self.partner,
                        "route": self.route,
                        "status": e.status(),
                        "problem": e.kind().map(super::problem::ProblemType::slug),
                    }));
            if let Err(e) = state.store.audit(vec![entry]).await {
                tracing::warn!(error = %e, "A refused inbound write could not be audited.");
            }
        }
        result
    }
}

fn inbound_problem(e: InboundError) -> ApiError {
    match e {
        InboundError::Invalid(problems) => Problem::new(ProblemType::BusinessRule)
            .detail(format!("{} problem(s)", problems.len()))
            .errors(
                problems
                    .into_iter()
                    .map(|p| match p.split_once(": ") {
                        Some((path, detail)) if !path.contains(' ') => {
                            crate::domain::FieldError { path: path.to_owned(), detail: detail.to_owned() }
                        }
                        _ => crate::domain::FieldError { path: "Bundle".into(), detail: p },
                    })
                    .collect(),
            )
            .into(),
        InboundError::Partner(why) => {
            Problem::new(ProblemType::Unavailable).detail(format!("reading the partner's server: {why}")).into()
        }
        InboundError::Intake(IntakeError::Invalid(errors)) => Problem::new(ProblemType::BusinessRule)
            .detail(format!("{} rule(s) broken by the referral read from it", errors.len()))
            .errors(errors)
            .into(),
        InboundError::Intake(IntakeError::Store(e)) | InboundError::Store(e) => store_problem(e),
        InboundError::Intake(e) => ApiError::internal(ProblemType::Internal, e),
    }
}

/// The partner a write on `/fhir` comes from: only a partner sends the agency referrals.
fn sending_partner<'s>(state: &'s AppState, caller: &Caller) -> Result<&'s PartnerSettings, ApiError> {
    caller
        .partner
        .as_deref()
        .and_then(|p| state.partners.get(p))
        .ok_or_else(|| Problem::new(ProblemType::Forbidden).detail("only a partner's key sends referrals in").into())
}

/// Takes in a referral and answers with its Task: what receiving did, and the Task as the partner sees it.
async fn take_in(
    state: &AppState,
    caller: &Caller,
    actor: CallerActor,
    sent: &Value,
) -> Result<(Received, ServedResource), ApiError> {
    let partner = sending_partner(state, caller)?;
    let inbound = Inbound { store: &*state.store, mappings: &state.mappings, partners: &state.partners };
    let mut actor = actor.0;
    actor.partner = Some(partner.name.clone());
    let received = inbound.receive(partner, sent, &actor, OffsetDateTime::now_utc()).await.map_err(inbound_problem)?;
    let task = served(state)
        .task(Reader::Partner(&partner.name), received.referral.as_str(), None)
        .await
        .map_err(serve_problem)?
        .ok_or_else(|| not_found("Task"))?;
    Ok((received, task))
}

/// `POST /fhir` with a transaction Bundle of a referral (Task, ServiceRequest, Patient and what they reference):
/// a partner's key only. The answer is a `transaction-response`: the Task entry `201 Created` (or `200 OK` when
/// the same Task came before) with the gateway's Task location; the partner's own resources `200 OK` (kept as
/// theirs, not stored as ours).
///
/// # Errors
/// 400 for a body that is not a transaction, 403 for an agency key, 422 `business-rule` for a referral the
/// gateway cannot take (each problem named), 415.
pub async fn transaction(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    actor: CallerActor,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let write = InboundWrite::of(&caller, &actor, "POST /fhir");
    let result = take_in_transaction(&state, &caller, actor, &headers, &body).await;
    write.audited(&state, result).await
}

async fn take_in_transaction(
    state: &AppState,
    caller: &Caller,
    actor: CallerActor,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    let sent = fhir_body(headers, body)?;
    if sent.get("resourceType").and_then(Value::as_str) != Some("Bundle")
        || sent.get("type").and_then(Value::as_str) != Some("transaction")
    {
        return Err(invalid("POST /fhir takes a transaction Bundle"));
    }
    let (received, task) = take_in(state, caller, actor, &sent).await?;
    let location = format!("Task/{}/_history/{}", received.referral, task.version);
    let entries: Vec<Value> = sent["entry"]
        .as_array()
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .map(|e| {
            if e.pointer("/resource/resourceType").and_then(Value::as_str) == Some("Task") {
                let status = if received.created { "201 Created" } else { "200 OK" };
                serde_json::json!({"response": {"status": status, "location": location, "etag": format!("W/\"{}\"", task.version)}})
            } else {
                serde_json::json!({"response": {"status": "200 OK"}})
            }
        })
        .collect();
    let bundle = serde_json::json!({"resourceType": "Bundle", "type": "transaction-response", "entry": entries});
    Ok(fhir(StatusCode::OK, &bundle))
}

/// `POST /fhir/Task`: a referral's Task alone (a partner's key), its focus and patient read from the partner's
/// server. `201 Created` with the gateway's Task, or `200 OK` with it when the same Task came before (so an
/// `If-None-Exist` on its identifier is always honoured).
///
/// # Errors
/// As [`transaction`].
pub async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    actor: CallerActor,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let write = InboundWrite::of(&caller, &actor, "POST /fhir/Task");
    let result = take_in_task(&state, &caller, actor, &headers, &body).await;
    write.audited(&state, result).await
}

async fn take_in_task(
    state: &AppState,
    caller: &Caller,
    actor: CallerActor,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    let sent = fhir_body(headers, body)?;
    if sent.get("resourceType").and_then(Value::as_str) != Some("Task") {
        return Err(invalid("POST /fhir/Task takes a Task"));
    }
    let (received, task) = take_in(state, caller, actor, &sent).await?;
    let status = if received.created { StatusCode::CREATED } else { StatusCode::OK };
    let mut response = resource_response(status, &task);
    if let Ok(location) = HeaderValue::from_str(&format!("Task/{}/_history/{}", received.referral, task.version)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// The body of a FHIR write: `application/fhir+json` (or `application/json`), a JSON object.
fn fhir_body(headers: &HeaderMap, body: &[u8]) -> Result<Value, ApiError> {
    let essence = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase());
    if !matches!(essence.as_deref(), Some("application/fhir+json" | "application/json")) {
        return Err(Problem::new(ProblemType::UnsupportedMediaType)
            .detail("send the resource as application/fhir+json")
            .into());
    }
    let value: Value = serde_json::from_slice(body).map_err(|_| invalid("the body is not JSON"))?;
    if !value.is_object() {
        return Err(invalid("the body must be a FHIR resource (a JSON object)"));
    }
    Ok(value)
}

/// Whether a reference element matches a reference search value: `Type/id` or `id` against `reference`, or
/// `system|value` (or `value`) against its logical `identifier`.
fn reference_matches(r: Option<&Value>, wanted: &str) -> bool {
    let Some(r) = r else { return false };
    if let Some(reference) = r.get("reference").and_then(Value::as_str)
        && (reference == wanted || reference.rsplit('/').next() == Some(wanted))
    {
        return true;
    }
    identifier_matches(r.get("identifier"), wanted)
}

/// Whether an identifier (or a list of them) matches a token: `system|value`, `|value`, `system|` or `value`.
fn identifier_matches(ids: Option<&Value>, wanted: &str) -> bool {
    let list: Vec<&Value> = match ids {
        Some(Value::Array(a)) => a.iter().collect(),
        Some(one @ Value::Object(_)) => vec![one],
        _ => return false,
    };
    list.iter().any(|i| {
        let system = i.get("system").and_then(Value::as_str).unwrap_or_default();
        let value = i.get("value").and_then(Value::as_str).unwrap_or_default();
        match wanted.split_once('|') {
            Some(("", v)) => value == v,
            Some((s, "")) => system == s,
            Some((s, v)) => system == s && value == v,
            None => value == wanted,
        }
    })
}

/// The search parameters of each resource type served (beyond `_count` and `_offset`).
fn known_parameters(resource_type: &str) -> &'static [&'static str] {
    match resource_type {
        "Task" => &["_id", "identifier", "_lastUpdated", "status", "owner", "requester", "focus", "patient", "subject"],
        "Patient" => &["_id", "identifier", "_lastUpdated"],
        _ => &["_id", "identifier", "_lastUpdated", "patient", "subject"],
    }
}

/// Whether `resource` passes search parameter `name` = `value` (a comma-separated OR).
fn passes(resource: &Value, name: &str, value: &str) -> bool {
    let any = |f: &dyn Fn(&str) -> bool| value.split(',').any(f);
    match name {
        "_id" => any(&|w| resource.get("id").and_then(Value::as_str) == Some(w)),
        "identifier" => any(&|w| identifier_matches(resource.get("identifier"), w)),
        "status" => any(&|w| resource.get("status").and_then(Value::as_str) == Some(w)),
        "owner" | "requester" | "focus" => any(&|w| reference_matches(resource.get(name), w)),
        // Whom it is about: a Task's `for`, a request's or a plan's `subject`, a consent's `patient`.
        "patient" | "subject" => {
            any(&|w| ["for", "subject", "patient"].iter().any(|f| reference_matches(resource.get(*f), w)))
        }
        _ => true,
    }
}

/// `GET /fhir/<type>?…` for the agency's records: `_id`, `identifier`, `_lastUpdated` (repeated to bound both
/// sides), `patient`/`subject` (and, for Task, `status`, `owner`, `requester`, `focus`), each a comma-separated OR;
/// `_count`, `_offset`. Parameters a type does not know are ignored (and left out of the `self` link).
async fn search_of(
    state: &AppState,
    caller: &Caller,
    actor: &CallerActor,
    public: &RequestBase,
    raw: Option<&str>,
    resource_type: &str,
) -> Result<Response, ApiError> {
    let every = all_params(raw);
    let one = params(raw);
    let count = number(&one, "_count", DEFAULT_COUNT, MAX_COUNT)?;
    let offset = number(&one, "_offset", 0, u32::MAX)?;
    let (after, before) = last_updated_bounds(&every)?;
    let known = known_parameters(resource_type);
    let used: Vec<(String, String)> = every.iter().filter(|(k, _)| known.contains(&k.as_str())).cloned().collect();
    // A patient named by our id narrows the read to that client's records.
    let client = used
        .iter()
        .find(|(k, _)| k == "patient" || k == "subject")
        .and_then(|(_, v)| RecordId::parse(v.strip_prefix("Patient/").unwrap_or(v)).ok());
    let served = served(state);
    // `_id` names the candidates; Task `status` narrows the referrals read (each Task code back to the referral
    // statuses it stands for); everything else is filtered on what renders.
    let ids: Option<Vec<&str>> = used
        .iter()
        .filter(|(k, _)| k == "_id")
        .map(|(_, v)| v.split(',').map(str::trim).filter(|id| !id.is_empty()).collect::<Vec<_>>())
        .reduce(|a, b| a.into_iter().filter(|id| b.contains(id)).collect());
    let all = match ids {
        Some(mut ids) => {
            let mut seen = std::collections::HashSet::new();
            ids.retain(|id| seen.insert(*id));
            let mut found = Vec::new();
            for id in ids.iter().take(MAX_COUNT as usize) {
                found.extend(served.resource(reader(caller), resource_type, id, None).await.map_err(serve_problem)?);
            }
            found
        }
        None => {
            let statuses = match used.iter().rfind(|(k, _)| k == "status") {
                Some((_, codes)) if resource_type == "Task" => codes
                    .split(',')
                    .filter_map(|c| state.mappings.referral_status_of_task(c.trim()))
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>(),
                _ => Vec::new(),
            };
            let asked_status = resource_type == "Task" && used.iter().any(|(k, _)| k == "status");
            if asked_status && statuses.is_empty() {
                // No referral status stands for the codes asked: nothing matches.
                Vec::new()
            } else {
                served
                    .resources(reader(caller), resource_type, client, after, &statuses)
                    .await
                    .map_err(serve_problem)?
            }
        }
    };
    let hits: Vec<ServedResource> = all
        .into_iter()
        .filter(|t| {
            let r = &t.resource;
            let at = r
                .pointer("/meta/lastUpdated")
                .and_then(Value::as_str)
                .and_then(|a| OffsetDateTime::parse(a, &Rfc3339).ok());
            at.is_some_and(|at| after.is_none_or(|a| at > a) && before.is_none_or(|b| at < b))
                && used.iter().all(|(k, v)| passes(r, k, v))
        })
        .collect();
    let total = hits.len();
    let page: Vec<ServedResource> = hits.into_iter().skip(offset as usize).take(count as usize).collect();
    audit_served(state, caller, actor, &page.iter().collect::<Vec<_>>()).await?;
    let page: Vec<Value> = page.into_iter().map(|t| t.resource).collect();
    Ok(fhir(StatusCode::OK, &searchset(&base(public), resource_type, &used, page, total, offset, count)))
}

/// `GET /fhir/<type>/{id}` for the agency's records.
async fn read_of(
    state: &AppState,
    caller: &Caller,
    actor: &CallerActor,
    resource_type: &str,
    id: &str,
) -> Result<Response, ApiError> {
    let t = served(state).resource(reader(caller), resource_type, id, None).await.map_err(serve_problem)?;
    let t = t.ok_or_else(|| not_found(resource_type))?;
    audit_served(state, caller, actor, &[&t]).await?;
    Ok(resource_response(StatusCode::OK, &t))
}

/// `GET /fhir/Task?_id=&identifier=&_lastUpdated=&status=&owner=&requester=&focus=&patient=&_count=&_offset=`.
///
/// # Errors
/// A malformed parameter.
pub async fn search(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    actor: CallerActor,
    public: RequestBase,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    search_of(&state, &caller, &actor, &public, raw.as_deref(), "Task").await
}

/// Read and search handlers of one resource type of the agency's records.
macro_rules! read_only_routes {
    ($read:ident, $search:ident, $ty:literal) => {
        #[doc = concat!("`GET /fhir/", $ty, "/{id}`.")]
        ///
        /// # Errors
        /// 404 when there is none for this caller.
        pub async fn $read(
            State(state): State<AppState>,
            Extension(caller): Extension<Caller>,
            actor: CallerActor,
            Path(id): Path<String>,
        ) -> Result<Response, ApiError> {
            read_of(&state, &caller, &actor, $ty, &id).await
        }

        #[doc = concat!("`GET /fhir/", $ty, "?_id=&identifier=&_lastUpdated=&patient=&_count=&_offset=`.")]
        ///
        /// # Errors
        /// A malformed parameter.
        pub async fn $search(
            State(state): State<AppState>,
            Extension(caller): Extension<Caller>,
            actor: CallerActor,
            public: RequestBase,
            RawQuery(raw): RawQuery,
        ) -> Result<Response, ApiError> {
            search_of(&state, &caller, &actor, &public, raw.as_deref(), $ty).await
        }
    };
}

read_only_routes!(read_service_request, search_service_requests, "ServiceRequest");
read_only_routes!(read_patient, search_patients, "Patient");
read_only_routes!(read_care_plan, search_care_plans, "CarePlan");
read_only_routes!(read_goal, search_goals, "Goal");
read_only_routes!(read_consent, search_consents, "Consent");

/// `POST /fhir/subscription-notifications/{partner}`: a notification from a partner's topic-based Subscription
/// (handshake, heartbeat, events), authenticated by the bearer token the gateway put in that Subscription. Kept
/// before the answer; the Tasks it names are read by the follow-up worker.
pub async fn subscription_notification(
    State(state): State<AppState>,
    Path(partner): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if authorization.is_none() {
        return Err(Problem::new(ProblemType::Unauthorized)
            .detail("send the token of the subscription (Authorization: Bearer …)")
            .into());
    }
    let sent = fhir_body(&headers, &body)?;
    match state.hook.receive(&partner, authorization, &sent, OffsetDateTime::now_utc()).await {
        Ok(_) => Ok(fhir(
            StatusCode::OK,
            &serde_json::json!({"resourceType": "OperationOutcome", "issue": [
                {"severity": "information", "code": "informational", "diagnostics": "notification kept"}]}),
        )),
        Err(HookError::Unauthorized) => Err(Problem::new(ProblemType::Unauthorized)
            .detail("no subscription of this partner sends with this token")
            .into()),
        Err(HookError::Invalid(why)) => Err(invalid(&why)),
        Err(HookError::Store(e)) => Err(store_problem(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn references_match_by_literal_id_or_logical_identifier() {
        let r = json!({"reference": "Patient/cl-1", "identifier": {"system": "urn:a/client", "value": "cl-1"}});
        for yes in ["Patient/cl-1", "cl-1", "urn:a/client|cl-1", "|cl-1", "urn:a/client|"] {
            assert!(reference_matches(Some(&r), yes), "{yes}");
        }
        for no in ["Patient/cl-2", "urn:b/client|cl-1", "cl"] {
            assert!(!reference_matches(Some(&r), no), "{no}");
        }
        assert!(!reference_matches(None, "cl-1"));
    }
}
