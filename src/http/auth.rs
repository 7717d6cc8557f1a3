//! API keys for `/api/v1`: the middleware that reads `Authorization: Bearer <key>`, finds its caller in the
//! [`KeyRing`] (see [`crate::keys`] for the hashes) and checks the scope per route (read for GET, write for
//! changes, admin for the audit log). Every refusal is audited: who knocked (the peer address; never the key they
//! presented), on which route, and why.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, MatchedPath};
use time::OffsetDateTime;

use super::problem::{Problem, ProblemType};
use super::serve::ClientCertificate;
use crate::config::Scope;
pub use crate::keys::{Caller, KeyRing};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// What a group of routes demands of its callers.
#[derive(Clone)]
pub struct Guard {
    /// The keys.
    pub keys: Arc<KeyRing>,
    /// The scope needed; `None` means read for GET/HEAD and write for the rest.
    pub scope: Option<Scope>,
    /// Whether a partner's key may use these routes (`/fhir` only).
    pub partners: bool,
    /// Where refusals are audited.
    pub store: Arc<dyn crate::store::Store>,
    /// Failed authentications per peer address (shared by every route group).
    pub failed: Arc<super::throttle::FailedAuth>,
}

/// The audit entry of a refused request: `actor` (the key's name when it was valid, `anonymous` otherwise), the
/// peer address, the route pattern, why.
fn refusal(request: &Request, actor: &str, action: &str, reason: &'static str) -> Refused {
    let peer = peer_of(request);
    let route = request.extensions().get::<MatchedPath>().map(|m| m.as_str().to_owned());
    let request_id = request.headers().get(super::REQUEST_ID_HEADER).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let detail = serde_json::json!({
        "peer": peer.map(|p| p.to_string()), "route": route, "method": request.method().as_str(), "reason": reason,
    });
    let entry = crate::audit::Entry::new(OffsetDateTime::now_utc(), actor, action, request_id).with_detail(&detail);
    Refused { entry, peer, route: route_of(request), reason }
}

/// Keeps a refusal's entry, counts it (by route and reason; a failed authentication also against the peer) and
/// answers `problem`; a failure to audit is logged, and the refusal stands.
async fn refuse(guard: &Guard, refused: Refused, problem: Problem) -> Response {
    metrics::counter!("carebridge_auth_failures_total", "route" => refused.route, "reason" => refused.reason)
        .increment(1);
    if problem.kind() == Some(ProblemType::Unauthorized)
        && let Some(peer) = refused.peer
    {
        guard.failed.failed(peer, Instant::now());
    }
    if let Err(e) = guard.store.audit(vec![refused.entry]).await {
        tracing::warn!(error = %e, "A refused request could not be audited.");
    }
    problem.into_response()
}

/// A refusal, before it is kept and answered.
struct Refused {
    entry: crate::audit::Entry,
    peer: Option<IpAddr>,
    /// The route pattern (a metric label: never the path with its ids).
    route: String,
    reason: &'static str,
}

/// The route pattern of `request`, for metrics (`unmatched` when there is none).
fn route_of(request: &Request) -> String {
    request.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned())
}

fn peer_of(request: &Request) -> Option<IpAddr> {
    request.extensions().get::<ConnectInfo<SocketAddr>>().map(|ConnectInfo(addr)| addr.ip())
}

/// Who a request without a valid key is audited as.
pub const ANONYMOUS: &str = "anonymous";

/// Middleware: authenticates the bearer key and checks the scope, then passes the [`Caller`] on.
pub async fn require_key(State(guard): State<Guard>, mut request: Request, next: Next) -> Response {
    // An address that failed too often lately waits, whatever it sends now (its keys are not looked at).
    if let Some(peer) = peer_of(&request)
        && let Some(wait) = guard.failed.wait(peer, Instant::now())
    {
        metrics::counter!("carebridge_auth_failures_total", "route" => route_of(&request), "reason" => "throttled")
            .increment(1);
        let retry = wait.as_secs() + 1;
        let mut response = Problem::new(ProblemType::TooManyFailures)
            .detail(format!("too many failed authentications from this address; try again in {retry} s"))
            .into_response();
        if let Ok(after) = HeaderValue::from_str(&retry.to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, after);
        }
        return response;
    }
    // Decided without holding the request across an await (it is not shared between threads).
    let decided = match bearer_key(request.headers()) {
        Err(problem) => Err(Box::new((
            refusal(&request, ANONYMOUS, "authentication_refused", "several_authorization_headers"),
            problem,
        ))),
        // No key on /fhir over mutual TLS: the client certificate may name a partner.
        Ok(None) if guard.partners && request.extensions().get::<ClientCertificate>().is_some() => {
            match request
                .extensions()
                .get::<ClientCertificate>()
                .and_then(|c| guard.keys.authenticate_certificate(&c.0))
            {
                Some(caller) => allowed(&guard, &request, caller),
                None => Err(Box::new((
                    refusal(&request, ANONYMOUS, "authentication_refused", "certificate_names_no_partner"),
                    Problem::new(ProblemType::Unauthorized)
                        .detail("the client certificate names no partner; send Authorization: Bearer <api key>"),
                ))),
            }
        }
        Ok(presented) => match presented.and_then(|key| guard.keys.authenticate(key)) {
            None => {
                let (detail, reason) = if presented.is_some() {
                    ("the API key is not valid", "invalid_key")
                } else {
                    ("send Authorization: Bearer <api key>", "no_key")
                };
                Err(Box::new((
                    refusal(&request, ANONYMOUS, "authentication_refused", reason),
                    Problem::new(ProblemType::Unauthorized).detail(detail),
                )))
            }
            Some(caller) => allowed(&guard, &request, caller),
        },
    };
    let caller = match decided {
        Ok(caller) => caller,
        Err(refused) => {
            let (entry, problem) = *refused;
            return refuse(&guard, entry, problem).await;
        }
    };
    tracing::Span::current().record("caller", &*caller.name);
    request.extensions_mut().insert(caller);
    next.run(request).await
}

/// Whether `caller` may use the route `request` asks for (its scope; a partner's key on `/fhir` only).
fn allowed(guard: &Guard, request: &Request, caller: Caller) -> Result<Caller, Box<(Refused, Problem)>> {
    let scope = guard.scope.unwrap_or(match *request.method() {
        Method::GET | Method::HEAD => Scope::Read,
        _ => Scope::Write,
    });
    if caller.partner.is_some() && !guard.partners {
        return Err(Box::new((
            refusal(request, &caller.name, "access_refused", "partner_key_outside_fhir"),
            Problem::new(ProblemType::Forbidden).detail("a partner's key acts on /fhir only"),
        )));
    }
    if !caller.may(scope) {
        return Err(Box::new((
            refusal(request, &caller.name, "access_refused", scope_reason(scope)),
            Problem::new(ProblemType::Forbidden).detail(format!("this call needs the {} scope", scope.as_str())),
        )));
    }
    Ok(caller)
}

/// Why a key without `scope` is refused (a fixed set: a metric label).
fn scope_reason(scope: Scope) -> &'static str {
    match scope {
        Scope::Read => "needs_read_scope",
        Scope::Write => "needs_write_scope",
        Scope::Admin => "needs_admin_scope",
    }
}

/// The key of `Authorization: Bearer <key>` (the scheme in any case, RFC 9110 §11.1); `None` without one, or with
/// another scheme.
///
/// # Errors
/// An `invalid-header` problem for two or more `Authorization` headers: which one counts would be a guess.
fn bearer_key(headers: &HeaderMap) -> Result<Option<&str>, Problem> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(Problem::new(ProblemType::InvalidHeader).detail("send one Authorization header, not several"));
    }
    let Ok(value) = value.to_str() else {
        return Ok(None);
    };
    let key = value
        .trim_start_matches(' ')
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim_matches(' '));
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_recognised_in_any_case() {
        for value in ["Bearer k1", "bearer k1", "BEARER k1", "bEaReR   k1 "] {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, value.parse().expect("header"));
            assert_eq!(bearer_key(&headers).expect("one header"), Some("k1"), "{value}");
        }
        for value in ["Basic k1", "Bearerk1", "k1"] {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, value.parse().expect("header"));
            assert_eq!(bearer_key(&headers).expect("one header"), None, "{value}");
        }
    }

    #[test]
    fn two_authorization_headers_are_refused() {
        let mut headers = HeaderMap::new();
        headers.append(header::AUTHORIZATION, "Bearer k1".parse().expect("header"));
        headers.append(header::AUTHORIZATION, "Bearer k2".parse().expect("header"));
        let problem = bearer_key(&headers).expect_err("ambiguous");
        assert_eq!(problem.kind(), Some(ProblemType::InvalidHeader));
    }
}
