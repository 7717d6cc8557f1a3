//! The HTTP the gateway makes to others (directory sources, partner FHIR servers): one client per server that
//! sends `User-Agent: carebridge/<version>` and gives up on an attempt after its timeout; idempotent GETs tried
//! again on timeouts, connection errors, 429 and 5xx with capped exponential backoff and jitter (a `Retry-After`
//! is honoured, clamped); and every failure named precisely ("timed out after 5 s", "connection refused",
//! "TLS: …", "HTTP 503: <the server's words>"), never with the URL (it may carry a credential or an id).

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use time::OffsetDateTime;

use crate::fhir::auth::ClientTls;

/// Why a request to another server failed, said plainly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// The server answered with an error status.
    #[error("HTTP {status}: {body}")]
    Status {
        /// HTTP status.
        status: u16,
        /// The first characters of its body, control characters dropped.
        body: String,
    },
    /// No answer in time.
    #[error("timed out after {secs} s")]
    TimedOut {
        /// The configured timeout.
        secs: u64,
    },
    /// Nothing listens at the address.
    #[error("connection refused")]
    Refused,
    /// The TLS handshake failed (certificate, protocol).
    #[error("TLS: {0}")]
    Tls(String),
    /// No connection could be made (DNS, network).
    #[error("could not connect")]
    Connect,
    /// The request or its answer broke off otherwise.
    #[error("the answer could not be read: {0}")]
    Transport(String),
    /// The HTTP client could not be built.
    #[error("the HTTP client could not be built: {0}")]
    Build(String),
    /// No credential for the request: the partner's token endpoint could not be reached or refused the gateway.
    #[error("no access token: {0}")]
    Credential(String),
}

/// The `User-Agent` every outbound request carries.
pub const USER_AGENT: &str = concat!("carebridge/", env!("CARGO_PKG_VERSION"));

/// Most characters of a source's error body kept in the failure's text.
const BODY_SUMMARY_CHARS: usize = 200;

/// When and how often a failed read is tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub retries: usize,
    /// First wait (doubled each time, with jitter).
    pub min_delay: Duration,
    /// Longest wait.
    pub max_delay: Duration,
    /// Longest `Retry-After` honoured.
    pub retry_after_max: Duration,
}

impl RetryPolicy {
    /// No retries: the first failure is the answer.
    pub const NONE: RetryPolicy = RetryPolicy {
        retries: 0,
        min_delay: Duration::ZERO,
        max_delay: Duration::ZERO,
        retry_after_max: Duration::ZERO,
    };
}

/// An answer worth reading: 2xx, or a 404/410 that says the resource is gone.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// The body.
    pub body: Vec<u8>,
}

impl Answer {
    /// Whether the server says the resource does not exist (404 or 410).
    #[must_use]
    pub fn is_gone(&self) -> bool {
        matches!(self.status, 404 | 410)
    }
}

/// Whatever a server answered to a write (one attempt, never retried here: the caller decides).
#[derive(Debug)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// `Location`, when sent.
    pub location: Option<String>,
    /// `ETag`, when sent.
    pub etag: Option<String>,
    /// `Retry-After` as a wait, when sent.
    pub retry_after: Option<Duration>,
    /// The body.
    pub body: Vec<u8>,
}

impl Reply {
    /// The first characters of the body, control characters dropped, for an error text.
    #[must_use]
    pub fn summary(&self) -> String {
        summary(&self.body)
    }
}

/// One failed attempt: the failure, whether another may succeed, and how long the source asked us to wait.
struct Failed {
    error: Failure,
    retryable: bool,
    retry_after: Option<Duration>,
}

/// The HTTP client of one server (a directory source, a partner).
pub struct HttpClient {
    client: reqwest::Client,
    timeout: Duration,
    retry: RetryPolicy,
    headers: Vec<(String, String)>,
}

impl HttpClient {
    /// A client whose attempts give up after `timeout`, retried by `retry`, sending `headers` (a credential) on
    /// every request.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(timeout: Duration, retry: RetryPolicy, headers: Vec<(String, String)>) -> Result<Self, Failure> {
        Self::with_tls(timeout, retry, headers, None)
    }

    /// [`HttpClient::new`], presenting `tls`'s client certificate and trusting only its CAs when it has a bundle.
    ///
    /// # Errors
    /// When the HTTP client cannot be built (reqwest refuses the identity).
    pub fn with_tls(
        timeout: Duration,
        retry: RetryPolicy,
        headers: Vec<(String, String)>,
        tls: Option<&ClientTls>,
    ) -> Result<Self, Failure> {
        let mut builder = reqwest::Client::builder().timeout(timeout).user_agent(USER_AGENT);
        if let Some(tls) = tls {
            builder = tls.apply(builder).map_err(|e| Failure::Build(e.to_string()))?;
        }
        let client = builder.build().map_err(|e| Failure::Build(e.to_string()))?;
        Ok(HttpClient { client, timeout, retry, headers })
    }

    /// `GET url?query` with `accept`, retried as the policy says; a 2xx, 404 or 410 is an answer.
    ///
    /// # Errors
    /// The last attempt's failure, named (`TimedOut`, `Refused`, `Tls`, `Connect`, `Status` with the body's
    /// summary).
    pub async fn get(&self, url: &str, query: &[(&str, String)], accept: &str) -> Result<Answer, Failure> {
        self.get_with(url, query, accept, &[]).await
    }

    /// [`HttpClient::get`] with `extra` headers on every attempt (a per-request credential).
    ///
    /// # Errors
    /// As [`HttpClient::get`].
    pub async fn get_with(
        &self,
        url: &str,
        query: &[(&str, String)],
        accept: &str,
        extra: &[(&str, String)],
    ) -> Result<Answer, Failure> {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.retry.min_delay)
            .with_max_delay(self.retry.max_delay)
            .with_max_times(self.retry.retries)
            .with_jitter();
        let max_wait = self.retry.retry_after_max;
        (|| self.attempt(url, query, accept, extra))
            .retry(backoff)
            .when(|f: &Failed| f.retryable)
            // A source that says when to come back is believed, up to the clamp; `None` means no retries left.
            .adjust(move |f: &Failed, next| next.map(|d| f.retry_after.map_or(d, |asked| asked.min(max_wait))))
            .notify(|f: &Failed, wait| {
                tracing::info!(error = %f.error, wait_ms = wait.as_millis() as u64, "Outbound read failed; retrying.");
            })
            .await
            .map_err(|f| f.error)
    }

    /// One `method url` with `headers` and a JSON `body`: any HTTP status is a [`Reply`]; only a request that got
    /// no answer is a `Failure` (timed out, refused, TLS, dropped).
    ///
    /// # Errors
    /// The transport failure, named.
    pub async fn send(
        &self,
        method: reqwest::Method,
        url: &str,
        headers: &[(&str, String)],
        body: Option<Vec<u8>>,
    ) -> Result<Reply, Failure> {
        let mut request = self.client.request(method, url);
        for (name, value) in &self.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        for (name, value) in headers {
            request = request.header(*name, value.as_str());
        }
        if let Some(body) = body {
            request = request.body(body);
        }
        let response = request.send().await.map_err(|e| name_failure(&e, self.timeout))?;
        let status = response.status().as_u16();
        let header = |name: reqwest::header::HeaderName| {
            response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
        };
        let location = header(reqwest::header::LOCATION).or_else(|| header(reqwest::header::CONTENT_LOCATION));
        let etag = header(reqwest::header::ETAG);
        let retry_after = header(reqwest::header::RETRY_AFTER).and_then(|v| retry_after(&v, OffsetDateTime::now_utc()));
        let body = response.bytes().await.map_err(|e| name_failure(&e, self.timeout))?.to_vec();
        Ok(Reply { status, location, etag, retry_after, body })
    }

    async fn attempt(
        &self,
        url: &str,
        query: &[(&str, String)],
        accept: &str,
        extra: &[(&str, String)],
    ) -> Result<Answer, Failed> {
        let mut request = self.client.get(url).query(query).header(reqwest::header::ACCEPT, accept);
        for (name, value) in &self.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        for (name, value) in extra {
            request = request.header(*name, value.as_str());
        }
        let response = request.send().await.map_err(|e| self.failed(&e))?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry_after(v, OffsetDateTime::now_utc()));
        let body = response.bytes().await.map_err(|e| self.failed(&e))?.to_vec();
        if (200..300).contains(&status) || matches!(status, 404 | 410) {
            return Ok(Answer { status, body });
        }
        Err(Failed {
            error: Failure::Status { status, body: summary(&body) },
            retryable: status == 429 || (500..600).contains(&status),
            retry_after,
        })
    }

    fn failed(&self, e: &reqwest::Error) -> Failed {
        Failed { error: name_failure(e, self.timeout), retryable: e.is_timeout() || e.is_connect(), retry_after: None }
    }
}

/// The failure a transport error stands for, said plainly.
pub fn name_failure(e: &reqwest::Error, timeout: Duration) -> Failure {
    if e.is_timeout() {
        return Failure::TimedOut { secs: timeout.as_secs() };
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(tls) = c.downcast_ref::<rustls::Error>() {
            return Failure::Tls(tls.to_string());
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return Failure::Refused;
            }
            // A refused handshake is an io error wrapping the rustls one, and `source()` skips what it wraps.
            if let Some(inner) = io.get_ref() {
                cause = Some(inner);
                continue;
            }
        }
        cause = c.source();
    }
    if e.is_connect() {
        return Failure::Connect;
    }
    Failure::Transport(e.to_string().replace(e.url().map_or("", |u| u.as_str()), "(the server)"))
}

/// A `Retry-After` value (seconds, or an HTTP date) as a wait from `now`.
fn retry_after(value: &str, now: OffsetDateTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = OffsetDateTime::parse(value, &time::format_description::well_known::Rfc2822).ok()?;
    Some(Duration::try_from(at - now).unwrap_or(Duration::ZERO))
}

/// The first characters of a server's body, control characters dropped, for an error text.
fn summary(body: &[u8]) -> String {
    server_words(&String::from_utf8_lossy(body), BODY_SUMMARY_CHARS)
}

/// Another server's words as the gateway keeps them: control characters (newlines, escapes) dropped, whitespace
/// collapsed, at most `max` characters. Never logged: kept as data with the attempt that received them.
#[must_use]
pub fn server_words(text: &str, max: usize) -> String {
    let clean: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    clean.split_whitespace().collect::<Vec<_>>().join(" ").chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn retry_after_is_read_as_seconds_or_as_an_http_date() {
        let now = datetime!(2026-12-01 10:00:00 UTC);
        assert_eq!(retry_after("2", now), Some(Duration::from_secs(2)));
        assert_eq!(retry_after("Tue, 01 Dec 2026 10:00:30 GMT", now), Some(Duration::from_secs(30)));
        assert_eq!(retry_after("Tue, 01 Dec 2026 09:00:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(retry_after("soon", now), None);
    }

    #[test]
    fn a_body_summary_drops_control_characters_and_stops_at_200_characters() {
        assert_eq!(summary(b"<h1>Down\r\n\tfor\x1b[31m maintenance</h1>"), "<h1>Down for [31m maintenance</h1>");
        assert_eq!(summary("x".repeat(500).as_bytes()).len(), 200);
    }
}
