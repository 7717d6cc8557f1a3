//! The one FHIR REST client: what the FHIR directory source reads and partner delivery writes through.
//! `application/fhir+json` both ways, one [`HttpClient`] per server (timeouts, retries, named failures, the
//! partner's client certificate and CAs), the server's `Authorization` on every request (a SMART access token
//! renewed once when the server answers 401), and reads by relative reference or search.

use std::time::Duration;

use serde_json::Value;

use time::OffsetDateTime;

use super::FHIR_JSON;
use super::auth::{ClientTls, TokenSource};
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

/// A client of one FHIR R4 server.
pub struct FhirClient {
    base: String,
    http: HttpClient,
    token: TokenSource,
}

impl FhirClient {
    /// A client of the server at `base_url` (the FHIR base, `https://…/r4`), attempts giving up after `timeout`,
    /// reads retried as `retry` says, each request carrying `token`'s `Authorization` and presenting `tls`'s
    /// client certificate.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(
        base_url: &str,
        timeout: Duration,
        retry: RetryPolicy,
        token: TokenSource,
        tls: Option<&ClientTls>,
    ) -> Result<Self, Failure> {
        Ok(FhirClient {
            base: base_url.trim_end_matches('/').to_owned(),
            http: HttpClient::with_tls(timeout, retry, Vec::new(), tls)?,
            token,
        })
    }

    /// The `Authorization` header of a request made now (none without a credential).
    async fn authorization(&self) -> Result<Vec<(&'static str, String)>, Failure> {
        match self.token.authorization(OffsetDateTime::now_utc()).await {
            Ok(Some(value)) => Ok(vec![("authorization", value)]),
            Ok(None) => Ok(Vec::new()),
            Err(e) => Err(Failure::Credential(e.to_string())),
        }
    }

    /// Whether a 401 may be cured by another access token: the cached one is forgotten (SMART only; a static
    /// bearer token or none would be refused again).
    async fn renew_after_401(&self) -> bool {
        if !matches!(self.token, TokenSource::Smart(_)) {
            return false;
        }
        tracing::info!(server = %self.base, "The server refused the access token (401); obtaining another.");
        self.token.forget_token().await;
        true
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
        let url = format!("{}/{path}", self.base);
        let mut answer = self.http.get_with(&url, query, FHIR_JSON, &self.authorization().await?).await;
        if matches!(answer, Err(Failure::Status { status: 401, .. })) && self.renew_after_401().await {
            answer = self.http.get_with(&url, query, FHIR_JSON, &self.authorization().await?).await;
        }
        let answer = answer?;
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
        let bytes = serde_json::to_vec(body).map_err(|e| Failure::Build(e.to_string()))?;
        let send = || async {
            let mut all = vec![("content-type", FHIR_JSON.to_owned()), ("accept", FHIR_JSON.to_owned())];
            all.extend(headers.iter().map(|(k, v)| (*k, v.clone())));
            all.extend(self.authorization().await?);
            self.http.send(method.clone(), &url, &all, Some(bytes.clone())).await
        };
        let reply = send().await?;
        // A refused token has changed nothing on the server: the same write, once more with a new token.
        if reply.status == 401 && self.renew_after_401().await {
            return send().await;
        }
        Ok(reply)
    }

    /// Reads `Type/id`; `None` when the server has no such resource, or answers with another resource type.
    ///
    /// # Errors
    /// A failed request or a body that is not JSON.
    pub async fn read(&self, resource_type: &str, id: &str) -> Result<Option<Value>, FhirError> {
        let found = self.get(&format!("{resource_type}/{id}"), &[]).await?;
        Ok(found.filter(|r| r.get("resourceType").and_then(Value::as_str) == Some(resource_type)))
    }

    /// The next page of a searchset (its `next` link), when there is one on this server: a link elsewhere is not
    /// followed (the credentials of this server must not go to another host).
    ///
    /// # Errors
    /// A failed request, a link to another server, or an answer that is not a Bundle.
    pub async fn next_page(&self, bundle: &Value) -> Result<Option<Value>, FhirError> {
        let Some(url) = next_link(bundle) else { return Ok(None) };
        let Some(rest) = url.strip_prefix(&self.base).filter(|r| r.starts_with('/') || r.starts_with('?')) else {
            return Err(FhirError::Malformed("the next page link points away from the server's base".into()));
        };
        let page = self
            .get(rest.trim_start_matches('/'), &[])
            .await?
            .ok_or_else(|| FhirError::Http(Failure::Status { status: 404, body: "the next page is gone".into() }))?;
        if page.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
            return Err(FhirError::Malformed("the next page is not a Bundle".into()));
        }
        Ok(Some(page))
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

/// The URL of a Bundle's `next` link.
#[must_use]
pub fn next_link(bundle: &Value) -> Option<&str> {
    bundle
        .get("link")?
        .as_array()?
        .iter()
        .find(|l| l.get("relation").and_then(Value::as_str) == Some("next"))?
        .get("url")?
        .as_str()
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
