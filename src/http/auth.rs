//! API keys for `/api/v1`: the middleware that reads `Authorization: Bearer <key>`, finds its caller in the
//! [`KeyRing`] (see [`crate::keys`] for the hashes) and checks the scope per route (read for GET, write for
//! changes, admin for the audit log).

use std::sync::Arc;

use super::problem::{Problem, ProblemType};
use crate::config::Scope;
pub use crate::keys::{Caller, KeyRing};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, header};
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
}

/// Middleware: authenticates the bearer key and checks the scope, then passes the [`Caller`] on.
pub async fn require_key(State(guard): State<Guard>, mut request: Request, next: Next) -> Response {
    let presented = match bearer_key(request.headers()) {
        Ok(presented) => presented,
        Err(problem) => return problem.into_response(),
    };
    let Some(caller) = presented.and_then(|key| guard.keys.authenticate(key)) else {
        let detail =
            if presented.is_some() { "the API key is not valid" } else { "send Authorization: Bearer <api key>" };
        return Problem::new(ProblemType::Unauthorized).detail(detail).into_response();
    };
    let scope = guard.scope.unwrap_or(match *request.method() {
        Method::GET | Method::HEAD => Scope::Read,
        _ => Scope::Write,
    });
    if caller.partner.is_some() && !guard.partners {
        return Problem::new(ProblemType::Forbidden).detail("a partner's key acts on /fhir only").into_response();
    }
    if !caller.may(scope) {
        return Problem::new(ProblemType::Forbidden)
            .detail(format!("this call needs the {} scope", scope.as_str()))
            .into_response();
    }
    tracing::Span::current().record("caller", &*caller.name);
    request.extensions_mut().insert(caller);
    next.run(request).await
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
