//! The HTTP surface: one [`router`] shared by `serve` and the tests, with its layers (request id, problem
//! rendering, `Cache-Control: no-store` on private routes, metrics and request spans, timeout, panic catching,
//! body limit), and [`serve`] (the accept loop, with connection timeouts) and [`public_url`] (the base of the
//! links we hand out).

pub mod api;
pub mod auth;
pub mod deliveries;
pub mod directory;
pub mod extract;
pub mod fhir;
pub mod fhir_audit;
pub mod fhir_records;
pub mod hsds;
pub mod ops;
pub mod preview;
pub mod problem;
pub mod public_url;
pub mod serve;
pub mod throttle;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use metrics_exporter_prometheus::PrometheusHandle;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tracing::Instrument;

use crate::config::{ApiSettings, Scope, Settings};
use crate::store::Store;
use auth::{Guard, KeyRing};
use problem::{Problem, ProblemType};

/// Header carrying the request id, taken from the caller when given, minted otherwise.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// What every handler may use.
#[derive(Clone)]
pub struct AppState {
    /// The store.
    pub store: Arc<dyn Store>,
    /// List limits.
    pub api: ApiSettings,
    /// The Prometheus recorder's handle, rendered by `/metrics`.
    pub metrics: PrometheusHandle,
    /// Configured directory sources, by name.
    pub sources: directory::Sources,
    /// Runs directory syncs as jobs, one per source at a time.
    pub syncs: crate::directories::jobs::SyncRunner,
    /// The mapping files, loaded and checked at start.
    pub mappings: Arc<crate::mapping::Mappings>,
    /// Where the links we hand out point.
    pub public_url: Arc<public_url::PublicUrl>,
    /// Mapping jobs (CPU work on the blocking pool) that may run at once: one core is always left to the async
    /// workers, so previews never delay `/healthz` or a read.
    pub mapping_slots: Arc<tokio::sync::Semaphore>,
    /// The configured partners (`[[partners]]`).
    pub partners: Arc<crate::partners::Partners>,
    /// The egress policy's profiles (what each partner may receive).
    pub policy: Arc<crate::policy::Policy>,
    /// How `/api/v1/services` searches the catalog (the in-memory index, or SQL).
    pub search: crate::directories::index::ServiceSearch,
    /// Where partners' subscription notifications are kept.
    pub hook: Arc<crate::followup::subscription::Hook>,
}

/// How many mapping jobs may run at once on this machine: every core but one, and at least one.
#[must_use]
pub fn mapping_slots() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1))
}

/// Limits the router enforces, from the settings.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body.
    pub body_limit_bytes: usize,
    /// Longest a request may take.
    pub request_timeout: Duration,
    /// Failed authentications from one address before it is slowed (0: never).
    pub auth_failure_limit: u32,
    /// The window they are counted in.
    pub auth_failure_window: Duration,
}

impl Limits {
    /// The limits of `settings`.
    #[must_use]
    pub fn from_settings(settings: &Settings) -> Self {
        Limits {
            body_limit_bytes: settings.server.body_limit_bytes,
            request_timeout: Duration::from_secs(settings.server.request_timeout_secs),
            auth_failure_limit: settings.server.auth_failure_limit,
            auth_failure_window: Duration::from_secs(settings.server.auth_failure_window_secs),
        }
    }
}

/// Builds the whole HTTP application.
pub fn router(state: AppState, keys: Arc<KeyRing>, limits: Limits) -> Router {
    fhir::note_start();
    let failed = Arc::new(throttle::FailedAuth::new(limits.auth_failure_limit, limits.auth_failure_window));
    let guard = |keys: Arc<KeyRing>, scope, partners| Guard {
        keys,
        scope,
        partners,
        store: state.store.clone(),
        failed: failed.clone(),
    };
    let by_method = guard(keys.clone(), None, false);
    let fhir_callers = guard(keys.clone(), None, true);
    let admin = guard(keys, Some(Scope::Admin), false);
    // The audit trail as AuditEvents: admin keys only, never a partner's.
    let audit_events = Router::new()
        .route("/fhir/AuditEvent", get(fhir_audit::search))
        .route("/fhir/AuditEvent/{id}", get(fhir_audit::read))
        .route_layer(middleware::from_fn_with_state(admin.clone(), auth::require_key));
    let records = Router::new()
        .route("/api/v1/clients", get(api::clients::list))
        .route("/api/v1/clients/{id}", put(api::clients::put).get(api::clients::get))
        .route("/api/v1/clients/{id}/history", get(api::clients::history))
        .route("/api/v1/clients/{id}/history/{version}", get(api::clients::version))
        .route("/api/v1/assessments", get(api::assessments::list))
        .route("/api/v1/assessments/{id}", put(api::assessments::put).get(api::assessments::get))
        .route("/api/v1/assessments/{id}/history", get(api::assessments::history))
        .route("/api/v1/assessments/{id}/history/{version}", get(api::assessments::version))
        .route("/api/v1/care-plans", get(api::care_plans::list))
        .route("/api/v1/care-plans/{id}", put(api::care_plans::put).get(api::care_plans::get))
        .route("/api/v1/care-plans/{id}/history", get(api::care_plans::history))
        .route("/api/v1/care-plans/{id}/history/{version}", get(api::care_plans::version))
        .route("/api/v1/referrals", get(api::referrals::list))
        .route("/api/v1/referrals/{id}", put(api::referrals::put).get(api::referrals::get))
        .route("/api/v1/referrals/{id}/status", post(api::change_referral_status))
        .route("/api/v1/referrals/{id}/link", post(api::link_referral))
        .route("/api/v1/referrals/{id}/history", get(api::referrals::history))
        .route("/api/v1/referrals/{id}/history/{version}", get(api::referrals::version))
        .route("/api/v1/consents", get(api::consents::list))
        .route("/api/v1/consents/{id}", put(api::consents::put).get(api::consents::get))
        .route("/api/v1/consents/{id}/history", get(api::consents::history))
        .route("/api/v1/consents/{id}/history/{version}", get(api::consents::version))
        .route("/api/v1/openapi.json", get(api::openapi_json))
        .route("/api/v1/services", get(directory::search))
        .route("/api/v1/services/{id}", get(directory::service))
        .route("/api/v1/preview/{kind}", post(preview::preview))
        .route("/hsds/", get(hsds::root))
        .route("/hsds/services", get(hsds::services))
        .route("/hsds/services/{id}", get(hsds::service))
        .route_layer(middleware::from_fn_with_state(by_method, auth::require_key));
    // The FHIR endpoint: agency keys, and partner keys acting as their partner.
    let fhir_routes = Router::new()
        .route("/fhir/HealthcareService", get(fhir::search_healthcare_services))
        .route("/fhir/HealthcareService/{id}", get(fhir::read_healthcare_service))
        .route("/fhir/Organization", get(fhir::search_organizations))
        .route("/fhir/Organization/{id}", get(fhir::read_organization))
        .route("/fhir/Location", get(fhir::search_locations))
        .route("/fhir/Location/{id}", get(fhir::read_location))
        .route("/fhir", post(fhir_records::transaction))
        .route("/fhir/Task", get(fhir_records::search).post(fhir_records::create))
        .route("/fhir/Task/{id}", get(fhir_records::read).put(fhir_records::update))
        .route("/fhir/Task/{id}/_history/{version}", get(fhir_records::vread))
        .route("/fhir/ServiceRequest", get(fhir_records::search_service_requests))
        .route("/fhir/ServiceRequest/{id}", get(fhir_records::read_service_request))
        .route("/fhir/Patient", get(fhir_records::search_patients))
        .route("/fhir/Patient/{id}", get(fhir_records::read_patient))
        .route("/fhir/CarePlan", get(fhir_records::search_care_plans))
        .route("/fhir/CarePlan/{id}", get(fhir_records::read_care_plan))
        .route("/fhir/Goal", get(fhir_records::search_goals))
        .route("/fhir/Goal/{id}", get(fhir_records::read_goal))
        .route("/fhir/Consent", get(fhir_records::search_consents))
        .route("/fhir/Consent/{id}", get(fhir_records::read_consent))
        .route_layer(middleware::from_fn_with_state(fhir_callers, auth::require_key));
    // What the endpoint offers is public (FHIR clients read it before they authenticate).
    // Partners' notifications carry the token of their subscription instead of an API key.
    let public = Router::new()
        .route("/fhir/metadata", get(fhir::capability_statement))
        .route("/fhir/subscription-notifications/{partner}", post(fhir_records::subscription_notification));
    let audit = Router::new()
        .route("/api/v1/audit-events", get(api::audit_events))
        .route("/api/v1/directories/{source}/sync", post(directory::sync_now))
        .route("/api/v1/directories/{source}/sync/{job}", get(directory::sync_job))
        .route("/api/v1/deliveries", get(deliveries::list))
        .route("/api/v1/deliveries/{id}", get(deliveries::get))
        .route("/api/v1/deliveries/{id}/replay", post(deliveries::replay))
        .route("/api/v1/deliveries/{id}/discard", post(deliveries::discard))
        .route_layer(middleware::from_fn_with_state(admin, auth::require_key));
    let ops = Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics));

    let request_id = HeaderName::from_static(REQUEST_ID_HEADER);
    records
        .merge(fhir_routes)
        .merge(audit_events)
        .merge(public)
        .merge(audit)
        .merge(ops)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(DefaultBodyLimit::max(limits.body_limit_bytes))
        .layer(middleware::from_fn_with_state(limits, refuse_declared_oversized_bodies))
        .layer(CatchPanicLayer::custom(|_| Problem::new(ProblemType::Internal).into_response()))
        .layer(middleware::from_fn_with_state(limits, observe))
        .layer(middleware::from_fn(problem::finish_problems))
        .layer(SetSensitiveRequestHeadersLayer::new([axum::http::header::AUTHORIZATION]))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
        .layer(middleware::from_fn(drop_unsafe_request_id))
        .layer(middleware::from_fn(no_store_on_private_routes))
}

/// Whether `path` is one of the authenticated routes (`/api/…`, `/fhir/…`, `/hsds/…`), whose answers may hold
/// records (PHI) or depend on who asks.
fn is_private(path: &str) -> bool {
    ["/api", "/fhir", "/hsds"]
        .iter()
        .any(|root| path.strip_prefix(root).is_some_and(|rest| rest.is_empty() || rest.starts_with('/')))
}

/// `Cache-Control: no-store` on every answer of the private routes, errors included, so no browser or proxy keeps
/// a copy of a record.
async fn no_store_on_private_routes(request: Request, next: Next) -> Response {
    let private = is_private(request.uri().path());
    let mut response = next.run(request).await;
    if private {
        response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// Refuses a request whose `Content-Length` is over the body limit at once, before anything waits for the body:
/// otherwise a client announcing a large body and sending none holds a handler until the request timeout.
/// (A body without a length, or a lying one, is still cut at the limit as it streams in.)
async fn refuse_declared_oversized_bodies(
    axum::extract::State(limits): axum::extract::State<Limits>,
    request: Request,
    next: Next,
) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > u64::try_from(limits.body_limit_bytes).unwrap_or(u64::MAX)) {
        return Problem::new(ProblemType::PayloadTooLarge)
            .detail("the body exceeds server.body_limit_bytes")
            .into_response();
    }
    next.run(request).await
}

/// The method as a label: the standard methods by name, any other token `other`, so a caller can neither add
/// series at will nor put text (a name, a birth date) into `/metrics` or the logs.
fn method_label(method: &axum::http::Method) -> &'static str {
    match method.as_str() {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "OPTIONS" => "OPTIONS",
        "TRACE" => "TRACE",
        "CONNECT" => "CONNECT",
        _ => "other",
    }
}

/// A caller's `x-request-id` is kept when it looks like an id (up to 64 of `A-Z a-z 0-9 . _ -`), so callers can
/// trace a call end to end; anything else is dropped and a fresh one minted, so a caller cannot put text (or PHI)
/// into our logs and audit trail through it.
async fn drop_unsafe_request_id(mut request: Request, next: Next) -> Response {
    let safe = request.headers().get(REQUEST_ID_HEADER).is_none_or(|v| {
        let b = v.as_bytes();
        !b.is_empty() && b.len() <= 64 && b.iter().all(|c| c.is_ascii_alphanumeric() || b".-_".contains(c))
    });
    if !safe {
        request.headers_mut().remove(REQUEST_ID_HEADER);
    }
    next.run(request).await
}

async fn not_found() -> Problem {
    Problem::new(ProblemType::NotFound).detail("no such route")
}

async fn method_not_allowed() -> Problem {
    Problem::new(ProblemType::MethodNotAllowed)
}

/// Runs a request inside a span carrying its request id, route and caller; enforces the timeout; counts it and
/// times it in `/metrics`; logs one line when it ends. Routes are matched paths (`/api/v1/referrals/{id}`), never
/// ids, so neither logs nor metric labels carry them.
async fn observe(axum::extract::State(limits): axum::extract::State<Limits>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(request.method());
    let route =
        request.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let request_id =
        request.headers().get(REQUEST_ID_HEADER).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let span = tracing::info_span!("request", %request_id, %method, %route, caller = tracing::field::Empty);
    let response = match tokio::time::timeout(limits.request_timeout, next.run(request).instrument(span.clone())).await
    {
        Ok(response) => response,
        Err(_) => Problem::new(ProblemType::Timeout)
            .detail(format!("no answer within {} s", limits.request_timeout.as_secs()))
            .into_response(),
    };
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    let labels = [("method", method.to_owned()), ("route", route), ("status", status.to_string())];
    metrics::counter!("carebridge_http_requests_total", &labels).increment(1);
    metrics::histogram!("carebridge_http_request_duration_seconds", &labels).record(elapsed.as_secs_f64());
    // Whole microseconds, so the log shows 6.206 rather than 6.206297999999999.
    let latency_ms = u32::try_from(elapsed.as_micros()).map_or(f64::MAX, f64::from) / 1000.0;
    span.in_scope(|| tracing::info!(status, latency_ms, "Request served."));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_authenticated_roots_are_private() {
        for path in ["/api/v1/clients/cl-1", "/fhir", "/fhir/metadata", "/hsds/", "/hsds", "/api"] {
            assert!(is_private(path), "{path}");
        }
        for path in ["/healthz", "/readyz", "/metrics", "/apiary", "/fhirx/Patient", "/"] {
            assert!(!is_private(path), "{path}");
        }
    }

    #[test]
    fn unknown_method_tokens_are_labelled_other() {
        let custom = axum::http::Method::from_bytes(b"ZEBULON-1966-04-17").expect("a token");
        assert_eq!(method_label(&custom), "other");
        assert_eq!(method_label(&axum::http::Method::PATCH), "PATCH");
    }
}
