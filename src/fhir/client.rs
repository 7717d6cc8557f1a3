//! The one FHIR REST client: what the FHIR directory source reads and partner delivery will write through.
//! `application/fhir+json` both ways, one [`HttpClient`] per server (timeouts, retries, named failures), the
//! server's credential on every request, and reads by relative reference or search.

use std::time::Duration;

use serde_json::Value;

use super::FHIR_JSON;
use crate::outbound::{Failure, HttpClient, Reply, RetryPolicy};

/// Why a FHIR call gave no usable answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FhirError {
    /// The server could not be reached, or answered with an error status.
    #[error(transparent)]
    Http(#[from] Failure),
    /// The answer is not the FHIR asked for.
    #[error("{0}")]
    Malformed(String),
}

/// How the gateway authenticates to a FHIR server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Credential {
    /// No credential.
    #[default]
    None,
    /// `Authorization: Bearer <token>`.
    Bearer(String),
}

/// A client of one FHIR R4 server.
pub struct FhirClient {
    base: String,
    http: HttpClient,
}

impl FhirClient {
    /// A client of the server at `base_url` (the FHIR base, `https://…/r4`), attempts giving up after `timeout`,
    /// reads retried as `retry` says.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(base_url: &str, timeout: Duration, retry: RetryPolicy, credential: Credential) -> Result<Self, Failure> {
        let headers = match credential {
            Credential::None => Vec::new(),
            Credential::Bearer(token) => vec![("authorization".to_owned(), format!("Bearer {token}"))],
        };
        Ok(FhirClient {
            base: base_url.trim_end_matches('/').to_owned(),
            http: HttpClient::new(timeout, retry, headers)?,
        })
    }

    /// The server's base URL, without a trailing `/`.
    #[must_use]
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET <base>/<path>?query`: the JSON body of a success, `None` for 404 or 410 (gone).
    ///
    /// # Errors
    /// A failed request, or a body that is not JSON.
    pub async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Option<Value>, FhirError> {
        let answer = self.http.get(&format!("{}/{path}", self.base), query, FHIR_JSON).await?;
        if answer.is_gone() {
            return Ok(None);
        }
        serde_json::from_slice(&answer.body).map(Some).map_err(|e| FhirError::Malformed(format!("not JSON: {e}")))
    }

    /// One write to the server, never retried here (the outbox decides): `method <base>/<path>` with `body` as
    /// `application/fhir+json` and `headers` (`If-Match`, `If-None-Exist`); `path` empty for a transaction or batch.
    /// Any HTTP status is a [`Reply`].
    ///
    /// # Errors
    /// A request that got no answer (timed out, refused, TLS, dropped).
    pub async fn write(
        &self,
        method: reqwest::Method,
        path: &str,
        headers: &[(&str, String)],
        body: &Value,
    ) -> Result<Reply, Failure> {
        let url = if path.is_empty() { self.base.clone() } else { format!("{}/{path}", self.base) };
        let mut all = vec![("content-type", FHIR_JSON.to_owned()), ("accept", FHIR_JSON.to_owned())];
        all.extend(headers.iter().map(|(k, v)| (*k, v.clone())));
        let bytes = serde_json::to_vec(body).map_err(|e| Failure::Build(e.to_string()))?;
        self.http.send(method, &url, &all, Some(bytes)).await
    }

    /// Reads `Type/id`; `None` when the server has no such resource, or answers with another resource type.
    ///
    /// # Errors
    /// A failed request or a body that is not JSON.
    pub async fn read(&self, resource_type: &str, id: &str) -> Result<Option<Value>, FhirError> {
        let found = self.get(&format!("{resource_type}/{id}"), &[]).await?;
        Ok(found.filter(|r| r.get("resourceType").and_then(Value::as_str) == Some(resource_type)))
    }

    /// Searches `resource_type` with `query`: the searchset Bundle.
    ///
    /// # Errors
    /// A failed request, no search there (404), or an answer that is not a Bundle.
    pub async fn search(&self, resource_type: &str, query: &[(&str, String)]) -> Result<Value, FhirError> {
        let bundle = self.get(resource_type, query).await?.ok_or_else(|| {
            FhirError::Http(Failure::Status { status: 404, body: format!("no {resource_type} search here") })
        })?;
        if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
            return Err(FhirError::Malformed("the search answered something other than a Bundle".into()));
        }
        Ok(bundle)
    }
}

/// The entries of a searchset Bundle that are matches (not included resources or OperationOutcomes).
///
/// # Errors
/// `Bundle.entry` that is not an array.
pub fn matches(bundle: &Value) -> Result<Vec<&Value>, FhirError> {
    let entries = match bundle.get("entry") {
        None | Some(Value::Null) => &[][..],
        Some(Value::Array(entries)) => entries,
        Some(_) => return Err(FhirError::Malformed("Bundle.entry is not an array".into())),
    };
    Ok(entries
        .iter()
        .filter(|e| !matches!(e.pointer("/search/mode").and_then(Value::as_str), Some("include" | "outcome")))
        .collect())
}

/// Whether a Bundle links to a next page.
#[must_use]
pub fn has_next(bundle: &Value) -> bool {
    bundle
        .get("link")
        .and_then(Value::as_array)
        .is_some_and(|links| links.iter().any(|l| l.get("relation").and_then(Value::as_str) == Some("next")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn matches_skip_included_resources_and_outcomes() {
        let b = json!({"resourceType": "Bundle", "entry": [
            {"resource": {"id": "a"}, "search": {"mode": "match"}},
            {"resource": {"id": "o"}, "search": {"mode": "include"}},
            {"resource": {"id": "x"}, "search": {"mode": "outcome"}},
            {"resource": {"id": "b"}}],
            "link": [{"relation": "self", "url": "x"}, {"relation": "next", "url": "y"}]});
        let ids: Vec<&str> =
            matches(&b).expect("entries").iter().filter_map(|e| e["resource"]["id"].as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert!(has_next(&b));
        assert!(matches(&json!({"entry": {}})).is_err());
        assert!(!has_next(&json!({"link": [{"relation": "self"}]})));
    }
}
