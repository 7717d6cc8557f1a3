//! Extractors of the internal API that answer bad input with a problem document: JSON bodies (media type, size,
//! syntax, schema with the JSON path of the bad field), record ids in the path, query strings, conditional
//! headers, and the caller behind the request.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use serde::de::DeserializeOwned;
use serde_json::error::Category;

use super::auth::Caller;
use super::problem::{Problem, ProblemType};
use crate::domain::{FieldError, RecordId};
use crate::store::{Actor, Precondition};

/// A JSON request body parsed into `T`.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Problem> {
        if !is_json(req.headers()) {
            return Err(Problem::new(ProblemType::UnsupportedMediaType)
                .detail("send the record with Content-Type: application/json"));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Problem::new(ProblemType::PayloadTooLarge).detail("the body exceeds server.body_limit_bytes")
            } else {
                Problem::new(ProblemType::MalformedJson).detail("the body could not be read")
            }
        })?;
        parse_json(&bytes).map(JsonBody)
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let mut parts = value.split(';');
    let essence = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
    let charset_ok = parts.all(|p| {
        let p = p.trim().to_ascii_lowercase();
        !p.starts_with("charset=") || p == "charset=utf-8" || p == "charset=\"utf-8\""
    });
    charset_ok && essence == "application/json"
}

/// Parses JSON into `T`, telling syntax errors (400) from schema errors (422, with the JSON path).
///
/// # Errors
/// A `malformed-json` or `invalid-record` problem.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Problem> {
    // Syntax first (a cheap pass that builds nothing), so broken JSON is always a 400, whatever field it breaks in.
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes).map_err(|e| syntax_problem(&e))?;
    // The syntax is sound, so whatever the typed pass refuses is a schema error (serde_json files some of them,
    // such as a number where an enum belongs, under its syntax category).
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = json_path(e.path());
        schema_problem(path, &e.into_inner())
    })?;
    de.end().map_err(|e| syntax_problem(&e))?;
    Ok(value)
}

fn syntax_problem(e: &serde_json::Error) -> Problem {
    Problem::new(ProblemType::MalformedJson).detail(format!(
        "{} at line {} column {}",
        syntax_kind(e),
        e.line(),
        e.column()
    ))
}

/// serde_json's message without the position (given separately) and without any echoed input.
fn syntax_kind(e: &serde_json::Error) -> &'static str {
    match e.classify() {
        Category::Eof => "the body ends too early",
        _ => "the body is not valid JSON",
    }
}

fn schema_problem(path: String, e: &serde_json::Error) -> Problem {
    // serde's messages name types, fields and expected values; for "invalid type/value" they also quote the
    // received value, which is the caller's own input and goes back only to the caller (never into logs).
    let message = e.to_string();
    let detail = message.rsplit_once(" at line ").map_or(message.as_str(), |(m, _)| m).to_owned();
    Problem::new(ProblemType::InvalidRecord)
        .detail("the body does not match the record's schema")
        .errors(vec![FieldError { path, detail }])
}

/// `$.goals[0].target_date` from serde_path_to_error's path.
fn json_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::from("$");
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } => {
                if !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                    out.push('.');
                    out.push_str(key);
                } else {
                    out.push_str(&format!("[{}]", serde_json::Value::from(key.as_str())));
                }
            }
            Segment::Enum { .. } | Segment::Unknown => {}
        }
    }
    out
}

/// The `{id}` (and `{version}`, when the route has one) of the path, checked.
pub struct IdPath {
    /// The record id.
    pub id: RecordId,
    /// The version number, for history routes.
    pub version: Option<i64>,
}

impl<S: Send + Sync> FromRequestParts<S> for IdPath {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        let Path(params) = Path::<Vec<(String, String)>>::from_request_parts(parts, state)
            .await
            .map_err(|_| Problem::new(ProblemType::InvalidId).detail("the path could not be decoded"))?;
        let get = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        let id = RecordId::parse(get("id").unwrap_or_default())
            .map_err(|e| Problem::new(ProblemType::InvalidId).detail(e))?;
        let version = match get("version") {
            None => None,
            Some(v) => Some(
                v.parse::<i64>()
                    .ok()
                    .filter(|v| *v >= 1)
                    .ok_or_else(|| Problem::new(ProblemType::NotFound).detail("versions are numbered from 1"))?,
            ),
        };
        Ok(IdPath { id, version })
    }
}

/// A query string parsed into `T` (whose unknown parameters are refused).
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| ApiQuery(q))
            .map_err(|e| Problem::new(ProblemType::InvalidQuery).detail(e.body_text()))
    }
}

/// The precondition of a write, from `If-Match` (`"3"`, `W/"3"` or `*`) and `If-None-Match: *`.
pub struct Conditions(pub Precondition);

impl<S: Send + Sync> FromRequestParts<S> for Conditions {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Problem> {
        let header_text = |name| {
            parts
                .headers
                .get(name)
                .map(|v| v.to_str().map(str::trim).map_err(|_| bad_precondition("is not ASCII")))
                .transpose()
        };
        let if_match = header_text(header::IF_MATCH)?;
        let if_none_match = header_text(header::IF_NONE_MATCH)?;
        let pre = match (if_match, if_none_match) {
            (Some(_), Some(_)) => {
                return Err(bad_precondition("send If-Match or If-None-Match, not both"));
            }
            (None, Some("*")) => Precondition::Absent,
            (None, Some(_)) => {
                return Err(bad_precondition("If-None-Match accepts only * on writes"));
            }
            (Some("*"), None) => Precondition::Exists,
            (Some(tag), None) => Precondition::Version(
                parse_etag(tag).ok_or_else(|| bad_precondition("If-Match takes the ETag of a version, e.g. \"3\""))?,
            ),
            (None, None) => Precondition::None,
        };
        Ok(Conditions(pre))
    }
}

fn bad_precondition(detail: &str) -> Problem {
    Problem::new(ProblemType::InvalidPrecondition).detail(detail.to_owned())
}

/// The version in an ETag we issued (`"3"` or `W/"3"`).
fn parse_etag(tag: &str) -> Option<i64> {
    let tag = tag.strip_prefix("W/").unwrap_or(tag);
    tag.strip_prefix('"')?.strip_suffix('"')?.parse().ok()
}

/// The ETag of a version.
#[must_use]
pub fn etag(version: i64) -> String {
    format!("\"{version}\"")
}

/// Who is calling, and in which request: the authenticated key and the request id.
pub struct CallerActor(pub Actor);

impl<S: Send + Sync> FromRequestParts<S> for CallerActor {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Problem> {
        let caller = parts
            .extensions
            .get::<Caller>()
            .ok_or_else(|| Problem::new(ProblemType::Unauthorized).detail("send Authorization: Bearer <api key>"))?;
        let request_id =
            parts.headers.get(super::REQUEST_ID_HEADER).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        Ok(CallerActor(Actor { key_name: caller.name.to_string(), request_id }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Referral;

    #[test]
    fn a_wrong_type_deep_in_the_body_names_its_json_path() {
        let body = br#"{"client_id":"c1","notes":[{"at":5}]}"#;
        let problem = parse_json::<Referral>(body).expect_err("invalid");
        assert_eq!(problem.kind(), Some(ProblemType::InvalidRecord));
        assert_eq!(problem.errors[0].path, "$.notes[0].at");
    }

    #[test]
    fn an_unknown_field_is_refused_with_its_name() {
        let problem =
            parse_json::<crate::domain::StatusChange>(br#"{"status":"sent","colour":1}"#).expect_err("invalid");
        assert_eq!(problem.kind(), Some(ProblemType::InvalidRecord));
        assert!(problem.errors[0].detail.contains("colour"), "{:?}", problem.errors);
    }

    #[test]
    fn broken_json_is_a_syntax_problem_with_a_position() {
        let problem = parse_json::<Referral>(b"{\"client_id\": ").expect_err("invalid");
        assert_eq!(problem.kind(), Some(ProblemType::MalformedJson));
        let trailing = parse_json::<crate::domain::StatusChange>(br#"{"status":"sent"} x"#).expect_err("invalid");
        assert_eq!(trailing.kind(), Some(ProblemType::MalformedJson));
    }

    #[test]
    fn etags_parse_strong_and_weak() {
        assert_eq!(parse_etag("\"3\""), Some(3));
        assert_eq!(parse_etag("W/\"12\""), Some(12));
        assert_eq!(parse_etag("3"), None);
    }

    #[test]
    fn json_media_types_are_recognised() {
        let mut h = HeaderMap::new();
        for (value, ok) in [
            ("application/json", true),
            ("application/json; charset=utf-8", true),
            ("Application/JSON", true),
            ("application/merge-patch+json", false),
            ("text/plain", false),
            ("application/json; charset=latin1", false),
        ] {
            h.insert(header::CONTENT_TYPE, value.parse().expect("header"));
            assert_eq!(is_json(&h), ok, "{value}");
        }
    }
}
