//! Errors of the internal API as RFC 9457 `application/problem+json`.
//!
//! Policy: a handler returns a [`Problem`] (or something that converts into one); `IntoResponse` renders it
//! purely and attaches it, with the source error of a 5xx, as response extensions. One middleware,
//! [`finish_problems`], adds the request id to the body and logs the problem once: 4xx at INFO with its type,
//! 5xx at ERROR with the source. Bodies of 5xx say "internal error" and nothing else. No problem text ever
//! contains a value from a record: details name fields and rules, never names, dates or notes.

use std::sync::Arc;

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::domain::FieldError;

/// Media type of problem documents.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// The stable kinds of error the API answers with; `type` is `urn:carebridge:problem:<slug>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemType {
    /// The body is not JSON.
    MalformedJson,
    /// The body is JSON but not a valid record (wrong type, missing or unknown field, broken rule).
    InvalidRecord,
    /// An id in the path is not a valid record id.
    InvalidId,
    /// The id in the body differs from the id in the path.
    IdMismatch,
    /// A query parameter is unknown or malformed.
    InvalidQuery,
    /// The body is not `application/json`.
    UnsupportedMediaType,
    /// The body is larger than the configured limit.
    PayloadTooLarge,
    /// No valid API key.
    Unauthorized,
    /// The key lacks the scope.
    Forbidden,
    /// No such record or route.
    NotFound,
    /// The route exists but not for this method.
    MethodNotAllowed,
    /// `If-Match` / `If-None-Match` does not hold.
    PreconditionFailed,
    /// A malformed `If-Match` / `If-None-Match` header.
    InvalidPrecondition,
    /// Another request header is malformed or ambiguous (such as two `Authorization` headers).
    InvalidHeader,
    /// A referral `PUT` tried to move the status.
    StatusChangeNotAllowed,
    /// A referral status move the state machine does not allow this caller.
    IllegalStatusMove,
    /// A FHIR write that breaks a business rule (a status move the state machine refuses, on `/fhir`).
    BusinessRule,
    /// A sync of the directory is already running (here or on another replica).
    SyncRunning,
    /// The delivery is not in a state that allows this (replay of a pending one, discard of a delivered one).
    DeliveryState,
    /// The request took longer than the configured timeout.
    Timeout,
    /// The database is unreachable or overloaded.
    Unavailable,
    /// Too many failed authentications from this address lately: slowed down (429, `Retry-After`).
    TooManyFailures,
    /// A fault of ours.
    Internal,
}

impl ProblemType {
    /// The slug, stable across releases.
    #[must_use]
    pub fn slug(self) -> &'static str {
        match self {
            Self::MalformedJson => "malformed-json",
            Self::InvalidRecord => "invalid-record",
            Self::InvalidId => "invalid-id",
            Self::IdMismatch => "id-mismatch",
            Self::InvalidQuery => "invalid-query",
            Self::UnsupportedMediaType => "unsupported-media-type",
            Self::PayloadTooLarge => "payload-too-large",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not-found",
            Self::MethodNotAllowed => "method-not-allowed",
            Self::PreconditionFailed => "precondition-failed",
            Self::InvalidPrecondition => "invalid-precondition",
            Self::InvalidHeader => "invalid-header",
            Self::StatusChangeNotAllowed => "status-change-not-allowed",
            Self::IllegalStatusMove => "illegal-status-move",
            Self::BusinessRule => "business-rule",
            Self::SyncRunning => "sync-running",
            Self::DeliveryState => "delivery-state",
            Self::Timeout => "timeout",
            Self::Unavailable => "unavailable",
            Self::TooManyFailures => "too-many-failures",
            Self::Internal => "internal",
        }
    }

    /// HTTP status of this kind of problem.
    #[must_use]
    pub fn status(self) -> StatusCode {
        match self {
            Self::MalformedJson
            | Self::InvalidId
            | Self::InvalidQuery
            | Self::InvalidPrecondition
            | Self::InvalidHeader => StatusCode::BAD_REQUEST,
            Self::InvalidRecord | Self::IdMismatch | Self::BusinessRule => StatusCode::UNPROCESSABLE_ENTITY,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
            Self::StatusChangeNotAllowed | Self::IllegalStatusMove | Self::SyncRunning | Self::DeliveryState => {
                StatusCode::CONFLICT
            }
            Self::Timeout | Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::TooManyFailures => StatusCode::TOO_MANY_REQUESTS,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Short, fixed summary of the kind.
    #[must_use]
    pub fn title(self) -> &'static str {
        match self {
            Self::MalformedJson => "The request body is not well-formed JSON",
            Self::InvalidRecord => "The record is not valid",
            Self::InvalidId => "The id in the path is not a valid record id",
            Self::IdMismatch => "The id in the body differs from the id in the path",
            Self::InvalidQuery => "A query parameter is not valid",
            Self::UnsupportedMediaType => "The request body must be application/json, in a supported content coding",
            Self::PayloadTooLarge => "The request body is too large",
            Self::Unauthorized => "A valid API key is required",
            Self::Forbidden => "The API key lacks the scope this call needs",
            Self::NotFound => "Not found",
            Self::MethodNotAllowed => "Method not allowed",
            Self::PreconditionFailed => "The record is not at the version the request expects",
            Self::InvalidPrecondition => "A conditional request header is not valid",
            Self::InvalidHeader => "A request header is not valid",
            Self::StatusChangeNotAllowed => "A referral's status changes only through its status endpoint",
            Self::IllegalStatusMove => "The referral cannot move to this status, or not by this caller",
            Self::BusinessRule => "The change breaks a business rule",
            Self::SyncRunning => "A sync of this directory is already running",
            Self::DeliveryState => "The delivery's state does not allow this",
            Self::Timeout => "The request took too long",
            Self::Unavailable => "The service is temporarily unavailable",
            Self::TooManyFailures => "Too many failed authentications from this address; wait and try again",
            Self::Internal => "Internal error",
        }
    }
}

/// A problem document (RFC 9457) as the API renders it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Problem {
    /// Stable URI of the kind of problem, `urn:carebridge:problem:<slug>`.
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    pub type_uri: Box<str>,
    /// Short summary of the kind of problem.
    pub title: &'static str,
    /// HTTP status code.
    pub status: u16,
    /// What went wrong in this request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Every offending field, with its JSON path.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    /// For an illegal referral status move: the statuses the caller may set instead (possibly none).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<String>>)]
    pub allowed_next: Option<Box<Vec<String>>>,
    /// The request id (also in the `x-request-id` header): quote it when reporting a problem.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(skip)]
    #[schema(ignore)]
    kind: Option<ProblemType>,
}

/// The source error of a 5xx, kept on the response for the logging middleware only.
#[derive(Clone)]
pub struct ProblemSource(pub Arc<dyn std::error::Error + Send + Sync>);

/// A [`Problem`] with the error behind it.
#[derive(Debug)]
pub struct ApiError {
    problem: Box<Problem>,
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl Problem {
    /// A problem of this kind.
    #[must_use]
    pub fn new(kind: ProblemType) -> Self {
        Problem {
            type_uri: format!("urn:carebridge:problem:{}", kind.slug()).into_boxed_str(),
            title: kind.title(),
            status: kind.status().as_u16(),
            detail: None,
            errors: Vec::new(),
            allowed_next: None,
            request_id: None,
            kind: Some(kind),
        }
    }

    /// With a sentence about this request.
    #[must_use]
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// With the offending fields.
    #[must_use]
    pub fn errors(mut self, errors: Vec<FieldError>) -> Self {
        self.errors = errors;
        self
    }

    /// With the statuses a referral may move to instead.
    #[must_use]
    pub fn allowed_next(mut self, allowed: Vec<String>) -> Self {
        self.allowed_next = Some(Box::new(allowed));
        self
    }

    /// The kind of problem.
    #[must_use]
    pub fn kind(&self) -> Option<ProblemType> {
        self.kind
    }

    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn render(&self) -> Response {
        let body = serde_json::to_vec(self).unwrap_or_else(|_| br#"{"title":"Internal error","status":500}"#.to_vec());
        let mut response = (self.status_code(), [(header::CONTENT_TYPE, PROBLEM_JSON)], body).into_response();
        if self.kind == Some(ProblemType::Unauthorized) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"carebridge\""));
        }
        response
    }
}

impl Problem {
    /// The same problem as a FHIR `OperationOutcome` (for `/fhir`).
    fn render_operation_outcome(&self) -> Response {
        let code = match self.kind {
            Some(ProblemType::Unauthorized) => "login",
            Some(ProblemType::Forbidden) => "forbidden",
            Some(ProblemType::NotFound) => "not-found",
            Some(ProblemType::MethodNotAllowed | ProblemType::UnsupportedMediaType) => "not-supported",
            Some(ProblemType::Timeout) => "timeout",
            Some(ProblemType::TooManyFailures) => "throttled",
            Some(ProblemType::Unavailable) => "transient",
            Some(ProblemType::Internal) | None => "exception",
            Some(ProblemType::PayloadTooLarge) => "too-costly",
            Some(ProblemType::PreconditionFailed) => "conflict",
            Some(ProblemType::BusinessRule | ProblemType::IllegalStatusMove) => "business-rule",
            Some(_) => "invalid",
        };
        let mut diagnostics = self.detail.clone().unwrap_or_else(|| self.title.to_owned());
        if let Some(id) = &self.request_id {
            diagnostics.push_str(&format!(" (request id {id})"));
        }
        let mut issues: Vec<serde_json::Value> = self
            .errors
            .iter()
            .map(|e| serde_json::json!({"severity": "error", "code": code, "diagnostics": e.detail, "expression": [e.path]}))
            .collect();
        if issues.is_empty() {
            issues.push(serde_json::json!({"severity": "error", "code": code, "diagnostics": diagnostics}));
        }
        let body = serde_json::json!({"resourceType": "OperationOutcome", "issue": issues});
        let mut response = (
            self.status_code(),
            [(header::CONTENT_TYPE, crate::fhir::FHIR_JSON)],
            serde_json::to_vec(&body).unwrap_or_default(),
        )
            .into_response();
        if self.kind == Some(ProblemType::Unauthorized) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"carebridge\""));
        }
        response
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut response = self.render();
        response.extensions_mut().insert(self);
        response
    }
}

impl ApiError {
    /// The kind of problem.
    #[must_use]
    pub fn kind(&self) -> Option<ProblemType> {
        self.problem.kind()
    }

    /// The HTTP status it answers with.
    #[must_use]
    pub fn status(&self) -> u16 {
        self.problem.status
    }

    /// A 5xx for a fault of ours (or of the database), keeping the source for the log.
    pub fn internal(kind: ProblemType, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        ApiError { problem: Box::new(Problem::new(kind)), source: Some(Arc::new(source)) }
    }
}

impl From<Problem> for ApiError {
    fn from(problem: Problem) -> Self {
        ApiError { problem: Box::new(problem), source: None }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = self.problem.into_response();
        if let Some(source) = self.source {
            response.extensions_mut().insert(ProblemSource(source));
        }
        response
    }
}

/// Adds the request id to every problem body and logs each problem once.
pub async fn finish_problems(request: Request, next: Next) -> Response {
    // FHIR endpoints answer errors with an OperationOutcome, everything else with problem+json.
    let fhir = request.uri().path() == "/fhir" || request.uri().path().starts_with("/fhir/");
    let request_id = request.headers().get(super::REQUEST_ID_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let mut response = next.run(request).await;
    let Some(mut problem) = response.extensions_mut().remove::<Problem>() else {
        return response;
    };
    let source = response.extensions_mut().remove::<ProblemSource>();
    let slug = problem.kind.map_or("unknown", ProblemType::slug);
    let id = request_id.as_deref().unwrap_or_default();
    let status = problem.status;
    if status >= 500 {
        match &source {
            Some(ProblemSource(e)) => {
                tracing::error!(request_id = id, problem = slug, status, error = %e, "Request failed on our side.");
            }
            None => tracing::error!(request_id = id, problem = slug, status, "Request failed on our side."),
        }
    } else {
        tracing::info!(request_id = id, problem = slug, status, "Request refused.");
    }
    problem.request_id = request_id;
    let mut rendered = if fhir { problem.render_operation_outcome() } else { problem.render() };
    for (name, value) in response.headers() {
        if name != header::CONTENT_LENGTH && name != header::CONTENT_TYPE {
            rendered.headers_mut().insert(name.clone(), value.clone());
        }
    }
    rendered
}
