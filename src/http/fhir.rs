//! `/fhir`: the service catalog as a read-only FHIR R4 server (`HealthcareService`, `Organization`,
//! `Location`, and the `CapabilityStatement` at `/fhir/metadata`), so EHRs can read the directory.
//!
//! Search follows FHIR's lenient default: unknown parameters are ignored (and left out of the `self` link).
//! Errors are `OperationOutcome`s (the problem layer renders them for every `/fhir` path).

use std::collections::HashMap;

use axum::extract::{RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::AppState;
use super::extract::PathText;
use super::problem::{ApiError, Problem, ProblemType};
use super::public_url::RequestBase;
use crate::directories::publish;
use crate::fhir::FHIR_JSON;
use crate::store::CatalogListing;

const DEFAULT_COUNT: u32 = 20;
const MAX_COUNT: u32 = 100;

/// A FHIR JSON answer.
pub(super) fn fhir(status: StatusCode, body: &Value) -> Response {
    (status, [(header::CONTENT_TYPE, FHIR_JSON)], serde_json::to_vec(body).unwrap_or_default()).into_response()
}

pub(super) fn invalid(detail: impl Into<String>) -> ApiError {
    Problem::new(ProblemType::InvalidQuery).detail(detail).into()
}

/// A read of an id the catalog lacks; the id is the caller's text and is not repeated.
pub(super) fn not_found(kind: &str) -> ApiError {
    Problem::new(ProblemType::NotFound).detail(format!("no {kind} with this id")).into()
}

/// The FHIR base URL (`https://gw.example/fhir`) for absolute `fullUrl`s and links: configured or from a trusted
/// proxy, never the caller's `Host` (see [`super::public_url`]).
pub(super) fn base(public: &RequestBase) -> String {
    format!("{}/fhir", public.0)
}

/// Query parameters by name (the last value of a repeated one wins), for searches whose parameters do not repeat.
pub(super) fn params(raw: Option<&str>) -> HashMap<String, String> {
    raw.map(|q| url::form_urlencoded::parse(q.as_bytes()).into_owned().collect()).unwrap_or_default()
}

/// Every query parameter in order, repeated ones each time (`_lastUpdated=gt…&_lastUpdated=lt…`).
pub(super) fn all_params(raw: Option<&str>) -> Vec<(String, String)> {
    raw.map(|q| url::form_urlencoded::parse(q.as_bytes()).into_owned().collect()).unwrap_or_default()
}

/// The bounds of every `_lastUpdated` among `p`, combined: the latest lower bound and the earliest upper one.
///
/// # Errors
/// A malformed value.
pub(super) fn last_updated_bounds(
    p: &[(String, String)],
) -> Result<(Option<OffsetDateTime>, Option<OffsetDateTime>), ApiError> {
    let (mut after, mut before): (Option<OffsetDateTime>, Option<OffsetDateTime>) = (None, None);
    for (_, v) in p.iter().filter(|(k, _)| k == "_lastUpdated") {
        let (a, b) = last_updated(v)?;
        after = after.max(a);
        before = match (before, b) {
            (Some(x), Some(y)) => Some(x.min(y)),
            (x, y) => x.or(y),
        };
    }
    Ok((after, before))
}

pub(super) fn number(p: &HashMap<String, String>, name: &str, default: u32, max: u32) -> Result<u32, ApiError> {
    match p.get(name) {
        None => Ok(default),
        Some(v) => v.parse::<u32>().map(|n| n.min(max)).map_err(|_| invalid(format!("{name} must be a whole number"))),
    }
}

/// `_lastUpdated=gt2026-10-01T00:00:00Z` (or a date): `(after, before)`.
pub(super) fn last_updated(value: &str) -> Result<(Option<OffsetDateTime>, Option<OffsetDateTime>), ApiError> {
    // `get`, not `split_at`: the caller's text may have a multi-byte character where the prefix would end.
    let (prefix, rest) = match value.get(..2) {
        Some(p) if p.bytes().all(|b| b.is_ascii_alphabetic()) => (p, &value[2..]),
        _ => ("", value),
    };
    let at = OffsetDateTime::parse(rest, &Rfc3339)
        .or_else(|_| crate::domain::Date::parse(rest).map(|d| d.0.midnight().assume_utc()))
        .map_err(|_| invalid("_lastUpdated takes gt, ge, lt or le and an instant (2026-10-01T00:00:00Z) or a date"))?;
    // Saturating: an instant at the edge of the calendar (9999-12-31T23:59:59.999999999Z) has no next tick.
    let tick = time::Duration::microseconds(1);
    match prefix {
        "gt" => Ok((Some(at), None)),
        "ge" => Ok((Some(at.saturating_sub(tick)), None)),
        "lt" => Ok((None, Some(at))),
        "le" => Ok((None, Some(at.saturating_add(tick)))),
        _ => Err(invalid("_lastUpdated takes a gt, ge, lt or le prefix")),
    }
}

/// `Type/id` or `id`, for reference search parameters.
fn reference_id<'a>(value: &'a str, ty: &str) -> &'a str {
    value.strip_prefix(ty).and_then(|r| r.strip_prefix('/')).unwrap_or(value)
}

/// A searchset Bundle with `self`, `next` and `previous` links.
pub(super) fn searchset(
    base: &str,
    ty: &str,
    used: &[(String, String)],
    entries: Vec<Value>,
    total: usize,
    offset: u32,
    count: u32,
) -> Value {
    let link = |offset: u32| {
        let mut q: Vec<String> = used
            .iter()
            .map(|(k, v)| format!("{k}={}", url::form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>()))
            .collect();
        q.push(format!("_count={count}"));
        q.push(format!("_offset={offset}"));
        format!("{base}/{ty}?{}", q.join("&"))
    };
    let mut links = vec![json!({"relation": "self", "url": link(offset)})];
    if (offset as usize) + entries.len() < total {
        links.push(json!({"relation": "next", "url": link(offset.saturating_add(count))}));
    }
    if offset > 0 {
        links.push(json!({"relation": "previous", "url": link(offset.saturating_sub(count))}));
    }
    // Maps built field by field: `json!` would serialise each resource into a second copy.
    let entry: Vec<Value> = entries
        .into_iter()
        .map(|r| {
            let id = r["id"].as_str().unwrap_or_default().to_owned();
            let mut e = serde_json::Map::new();
            e.insert("fullUrl".into(), Value::String(format!("{base}/{ty}/{id}")));
            e.insert("resource".into(), r);
            e.insert("search".into(), json!({"mode": "match"}));
            Value::Object(e)
        })
        .collect();
    let mut bundle = serde_json::Map::new();
    bundle.insert("resourceType".into(), json!("Bundle"));
    bundle.insert("type".into(), json!("searchset"));
    bundle.insert("total".into(), json!(total));
    bundle.insert("link".into(), Value::Array(links));
    bundle.insert("entry".into(), Value::Array(entry));
    Value::Object(bundle)
}

/// `GET /fhir/HealthcareService?name=&service-category=&organization=&location=&active=&_lastUpdated=&_count=&_offset=`
///
/// # Errors
/// An `OperationOutcome` for a malformed parameter or an unreadable catalog.
pub async fn search_healthcare_services(
    State(state): State<AppState>,
    public: RequestBase,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let p = params(raw.as_deref());
    let count = number(&p, "_count", DEFAULT_COUNT, MAX_COUNT)?;
    let offset = number(&p, "_offset", 0, u32::MAX)?;
    let mut listing = CatalogListing { include_inactive: true, offset, limit: count, ..CatalogListing::default() };
    let mut used = Vec::new();
    for (k, v) in &p {
        match k.as_str() {
            "name" => listing.name = Some(v.clone()),
            "service-category" => listing.term = Some(v.rsplit('|').next().unwrap_or(v).to_owned()),
            "organization" => listing.organization = Some(reference_id(v, "Organization").to_owned()),
            "location" => listing.location = Some(reference_id(v, "Location").to_owned()),
            "active" => match v.as_str() {
                "true" => listing.include_inactive = false,
                "false" => return Err(invalid("active=false is not supported; search without it and read `active`")),
                _ => return Err(invalid("active is true or false")),
            },
            "_lastUpdated" => {
                // Repeated (`gt…&lt…`): every value counts, not the last one.
                let every = all_params(raw.as_deref());
                let (after, before) = last_updated_bounds(&every)?;
                listing.updated_after = after;
                listing.updated_before = before;
                used.extend(every.into_iter().filter(|(k, _)| k == "_lastUpdated"));
                continue;
            }
            _ => continue,
        }
        used.push((k.clone(), v.clone()));
    }
    used.sort();
    let (rows, total) = state.store.list_services(&listing).await.map_err(super::api::store_problem)?;
    let system = state.mappings.identifier_system("directory-service");
    let entries =
        rows.iter().map(|l| publish::healthcare_service(&l.item, l.active, l.updated_at, system.as_deref())).collect();
    Ok(fhir(StatusCode::OK, &searchset(&base(&public), "HealthcareService", &used, entries, total, offset, count)))
}

/// `GET /fhir/HealthcareService/{id}`.
///
/// # Errors
/// 404 `OperationOutcome` when there is no such service.
pub async fn read_healthcare_service(
    State(state): State<AppState>,
    PathText(id): PathText,
) -> Result<Response, ApiError> {
    let listing =
        CatalogListing { id: Some(id.clone()), include_inactive: true, limit: 1, ..CatalogListing::default() };
    let (rows, _) = state.store.list_services(&listing).await.map_err(super::api::store_problem)?;
    let l = rows.first().ok_or_else(|| not_found("HealthcareService"))?;
    let system = state.mappings.identifier_system("directory-service");
    Ok(fhir(StatusCode::OK, &publish::healthcare_service(&l.item, l.active, l.updated_at, system.as_deref())))
}

/// The parameters Organization and Location searches take: `name`, `_count`, `_offset`.
struct NamedSearch {
    name: Option<String>,
    count: u32,
    offset: u32,
}

impl NamedSearch {
    fn parse(raw: Option<&str>) -> Result<Self, ApiError> {
        let p = params(raw);
        Ok(NamedSearch {
            count: number(&p, "_count", DEFAULT_COUNT, MAX_COUNT)?,
            offset: number(&p, "_offset", 0, u32::MAX)?,
            name: p.get("name").cloned(),
        })
    }

    fn used(&self) -> Vec<(String, String)> {
        self.name.iter().map(|n| ("name".to_owned(), n.clone())).collect()
    }
}

/// `GET /fhir/Organization?name=&_count=&_offset=`.
///
/// # Errors
/// An `OperationOutcome` for a malformed parameter or an unreadable catalog.
pub async fn search_organizations(
    State(state): State<AppState>,
    public: RequestBase,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = NamedSearch::parse(raw.as_deref())?;
    let (rows, total) = state
        .store
        .list_organizations(None, q.name.as_deref(), q.offset, q.count)
        .await
        .map_err(super::api::store_problem)?;
    let entries = rows.iter().map(|l| publish::organization(&l.item, l.updated_at)).collect();
    Ok(fhir(StatusCode::OK, &searchset(&base(&public), "Organization", &q.used(), entries, total, q.offset, q.count)))
}

/// `GET /fhir/Organization/{id}`.
///
/// # Errors
/// 404 `OperationOutcome` when there is no such organisation.
pub async fn read_organization(State(state): State<AppState>, PathText(id): PathText) -> Result<Response, ApiError> {
    let (rows, _) = state.store.list_organizations(Some(&id), None, 0, 1).await.map_err(super::api::store_problem)?;
    let l = rows.first().ok_or_else(|| not_found("Organization"))?;
    Ok(fhir(StatusCode::OK, &publish::organization(&l.item, l.updated_at)))
}

/// `GET /fhir/Location?name=&_count=&_offset=`.
///
/// # Errors
/// An `OperationOutcome` for a malformed parameter or an unreadable catalog.
pub async fn search_locations(
    State(state): State<AppState>,
    public: RequestBase,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = NamedSearch::parse(raw.as_deref())?;
    let (rows, total) = state
        .store
        .list_locations(None, q.name.as_deref(), q.offset, q.count)
        .await
        .map_err(super::api::store_problem)?;
    let entries = rows.iter().map(|l| publish::location(&l.item, l.updated_at)).collect();
    Ok(fhir(StatusCode::OK, &searchset(&base(&public), "Location", &q.used(), entries, total, q.offset, q.count)))
}

/// `GET /fhir/Location/{id}`.
///
/// # Errors
/// 404 `OperationOutcome` when there is no such location.
pub async fn read_location(State(state): State<AppState>, PathText(id): PathText) -> Result<Response, ApiError> {
    let (rows, _) = state.store.list_locations(Some(&id), None, 0, 1).await.map_err(super::api::store_problem)?;
    let l = rows.first().ok_or_else(|| not_found("Location"))?;
    Ok(fhir(StatusCode::OK, &publish::location(&l.item, l.updated_at)))
}

/// When this process started: the date its CapabilityStatement gives (what it offers was read from its
/// configuration and mappings then).
static STARTED: std::sync::OnceLock<OffsetDateTime> = std::sync::OnceLock::new();

/// Notes the start, for the CapabilityStatement's date (called once, as the router is built).
pub fn note_start() {
    STARTED.get_or_init(OffsetDateTime::now_utc);
}

/// `GET /fhir/metadata`: what this FHIR endpoint offers; public (FHIR clients read it before they authenticate).
pub async fn capability_statement() -> Response {
    let search =
        |names: &[(&str, &str)]| -> Vec<Value> { names.iter().map(|(n, t)| json!({"name": n, "type": t})).collect() };
    let read_only = |ty: &str, params: Vec<Value>| json!({"type": ty, "interaction": [{"code": "read"}, {"code": "search-type"}], "searchParam": params});
    let date = STARTED.get_or_init(OffsetDateTime::now_utc).format(&Rfc3339).unwrap_or_default();
    let task = json!({
        "type": "Task",
        "profile": "http://hl7.org/fhir/us/sdoh-clinicalcare/StructureDefinition/SDOHCC-TaskForReferralManagement",
        "interaction": [{"code": "read"}, {"code": "vread"}, {"code": "update"}, {"code": "search-type"}],
        "versioning": "versioned-update",
        "readHistory": false,
        "updateCreate": false,
        "conditionalUpdate": false,
        "searchParam": search(&[("_id", "token"), ("identifier", "token"), ("_lastUpdated", "date"), ("status", "token"),
            ("owner", "reference"), ("requester", "reference"), ("focus", "reference"), ("patient", "reference")]),
    });
    // The agency's other records: read and search, each by who it is about.
    let record = |ty: &str| {
        let mut params = vec![("_id", "token"), ("identifier", "token"), ("_lastUpdated", "date")];
        if ty != "Patient" {
            params.push(("patient", "reference"));
        }
        read_only(ty, search(&params))
    };
    let body = json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": date,
        "kind": "instance",
        "software": {"name": "carebridge", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": "carebridge: referrals (Task) and the service directory"},
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "rest": [{
            "mode": "server",
            "security": {
                "cors": false,
                "description": "Every call but this one needs Authorization: Bearer <API key>. An agency key reads \
                    every referral's Task; a partner's key acts as that partner: it sees the Tasks of the referrals \
                    it sent or received, as the client's consents allow, and moves their status as its side of \
                    the referral may (Gravity SDOH Clinical Care state machine). AuditEvent is for admin keys only."
            },
            "resource": [
                task,
                record("ServiceRequest"),
                record("Patient"),
                record("CarePlan"),
                record("Goal"),
                record("Consent"),
                read_only("HealthcareService", search(&[("name", "string"), ("service-category", "token"), ("organization", "reference"), ("location", "reference"), ("active", "token"), ("_lastUpdated", "date")])),
                read_only("Organization", search(&[("name", "string")])),
                read_only("Location", search(&[("name", "string")])),
                read_only("AuditEvent", search(&[("patient", "reference"), ("date", "date"), ("agent", "reference"),
                    ("entity", "reference"), ("outcome", "token"), ("type", "token"), ("subtype", "token")])),
            ]
        }]
    });
    fhir(StatusCode::OK, &body)
}
