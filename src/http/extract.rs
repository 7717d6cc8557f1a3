//! Extractors of the internal API that answer bad input with a problem document: JSON bodies (media type, content
//! coding, size, syntax, schema with the JSON path of the bad field), record ids in the path, query strings,
//! conditional headers, and the caller behind the request.
//!
//! No problem built here repeats what the caller sent: serde's messages quote the offending value or unknown key,
//! so they are rewritten to name the path, the field and the allowed values only (see [`rewrite_message`]).

use std::borrow::Cow;
use std::collections::HashSet;
use std::io::Read;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use serde::de::{self, DeserializeOwned, Deserializer as _, MapAccess, SeqAccess, Visitor};
use serde_json::error::Category;

use super::auth::Caller;
use super::problem::{Problem, ProblemType};
use crate::domain::{FieldError, RecordId};
use crate::store::{Actor, Precondition};

/// The content codings a request body may arrive in.
const SUPPORTED_CODINGS: &str = "gzip, identity";

/// How much decoded body one poll of a gzip body yields: the size limit is checked between chunks, so a gzip bomb
/// costs at most the limit plus one chunk of memory.
const DECODED_CHUNK_BYTES: usize = 64 * 1024;

/// A JSON request body parsed into `T`.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Problem> {
        let JsonBytes(bytes) = JsonBytes::from_request(req, state).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// A JSON request body as bytes, not parsed yet: the media type checked, any `Content-Encoding` decoded, and the
/// size bounded by `server.body_limit_bytes` after decoding. For handlers that choose the record type at run time;
/// parse it with [`parse_json`].
pub struct JsonBytes(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for JsonBytes {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Problem> {
        if !is_json(req.headers()) {
            return Err(Problem::new(ProblemType::UnsupportedMediaType)
                .detail("send the record with Content-Type: application/json"));
        }
        let gzip_layers = gzip_layers(req.headers())?;
        // The body limit travels in the request's extensions; the decoded body is read under the same limit.
        let extensions = req.extensions().clone();
        let mut bytes = read_body(req, state, "the body could not be read").await?;
        for _ in 0..gzip_layers {
            let mut decoded = Request::new(Body::new(GzipBody::new(bytes)));
            *decoded.extensions_mut() = extensions.clone();
            bytes = read_body(decoded, state, "the body is not valid gzip").await?;
        }
        Ok(JsonBytes(bytes))
    }
}

/// Reads a body under the configured limit.
async fn read_body<S: Send + Sync>(req: Request, state: &S, unreadable: &'static str) -> Result<Bytes, Problem> {
    Bytes::from_request(req, state).await.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Problem::new(ProblemType::PayloadTooLarge)
                .detail("the body exceeds server.body_limit_bytes (after decoding, when it is compressed)")
        } else {
            Problem::new(ProblemType::MalformedJson).detail(unreadable)
        }
    })
}

/// How many times the body is gzip-encoded, from `Content-Encoding` (`identity` layers count for nothing).
fn gzip_layers(headers: &HeaderMap) -> Result<usize, Problem> {
    let unsupported = || {
        Problem::new(ProblemType::UnsupportedMediaType)
            .detail(format!("Content-Encoding: the supported codings are {SUPPORTED_CODINGS}"))
    };
    let mut layers = 0;
    for value in headers.get_all(header::CONTENT_ENCODING) {
        let value = value.to_str().map_err(|_| unsupported())?;
        for coding in value.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
                layers += 1;
            } else if !coding.eq_ignore_ascii_case("identity") {
                return Err(unsupported());
            }
        }
    }
    Ok(layers)
}

/// A gzip-encoded body decoded as it is read, one chunk per poll (concatenated gzip members are one body).
struct GzipBody {
    decoder: Option<flate2::read::MultiGzDecoder<std::io::Cursor<Bytes>>>,
}

impl GzipBody {
    fn new(compressed: Bytes) -> Self {
        GzipBody { decoder: Some(flate2::read::MultiGzDecoder::new(std::io::Cursor::new(compressed))) }
    }
}

impl HttpBody for GzipBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        let Some(decoder) = this.decoder.as_mut() else {
            return Poll::Ready(None);
        };
        let mut chunk = vec![0; DECODED_CHUNK_BYTES];
        let frame = match decoder.read(&mut chunk) {
            Ok(0) => None,
            Ok(n) => {
                chunk.truncate(n);
                Some(Ok(http_body::Frame::data(Bytes::from(chunk))))
            }
            Err(e) => Some(Err(e)),
        };
        if !matches!(frame, Some(Ok(_))) {
            this.decoder = None;
        }
        Poll::Ready(frame)
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
/// Syntax covers what serde would otherwise take silently or report as a schema error: bytes that are not UTF-8,
/// nesting deeper than serde_json's limit of 128, and an object that repeats a key (at any depth, also where the
/// type is a map or a `serde_json::Value`, which would keep the last one).
///
/// # Errors
/// A `malformed-json` or `invalid-record` problem.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Problem> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        Problem::new(ProblemType::MalformedJson)
            .detail(format!("the body is not UTF-8 (from byte {} on)", e.valid_up_to()))
    })?;
    // Syntax first, so broken JSON is always a 400, whatever field it breaks in.
    check_syntax(text)?;
    // The syntax is sound, so whatever the typed pass refuses is a schema error (serde_json files some of them,
    // such as a number where an enum belongs, under its syntax category).
    let mut de = serde_json::Deserializer::from_str(text);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().clone();
        schema_problem(&path, &e.into_inner())
    })?;
    de.end().map_err(|e| syntax_problem(&e))?;
    Ok(value)
}

/// Message of the syntax pass's own error for a repeated key.
const REPEATED_KEY: &str = "repeated key";

/// The syntax pass: walks every value (so strings are unescaped and checked, and serde_json's recursion limit
/// applies) and refuses an object that repeats a key.
fn check_syntax(text: &str) -> Result<(), Problem> {
    let mut de = serde_json::Deserializer::from_str(text);
    de.deserialize_any(SyntaxCheck).and_then(|()| de.end()).map_err(|e| syntax_problem(&e))
}

/// A visitor that builds nothing but checks keys.
struct SyntaxCheck;

impl<'de> de::DeserializeSeed<'de> for SyntaxCheck {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for SyntaxCheck {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(SyntaxCheck)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        while let Some(Key(key)) = map.next_key()? {
            if !seen.insert(key) {
                return Err(de::Error::custom(REPEATED_KEY));
            }
            map.next_value_seed(SyntaxCheck)?;
        }
        Ok(())
    }
}

/// An object key, borrowed from the body when it has no escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object key")
            }

            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }

            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

fn syntax_problem(e: &serde_json::Error) -> Problem {
    Problem::new(ProblemType::MalformedJson).detail(format!(
        "{} at line {} column {}",
        syntax_kind(e),
        e.line(),
        e.column()
    ))
}

/// What is wrong with the syntax, without serde_json's position (given separately).
fn syntax_kind(e: &serde_json::Error) -> &'static str {
    let message = e.to_string();
    match e.classify() {
        Category::Eof => "the body ends too early",
        Category::Data if message.starts_with(REPEATED_KEY) => {
            "an object repeats a key (each key may appear once per object)"
        }
        Category::Syntax if message.starts_with("recursion limit exceeded") => {
            "the body nests arrays and objects deeper than 128 levels"
        }
        _ => "the body is not valid JSON",
    }
}

fn schema_problem(path: &serde_path_to_error::Path, e: &serde_json::Error) -> Problem {
    let (detail, path) = if e.is_data() {
        let message = e.to_string();
        // serde_json appends the position; the message before it is serde's (or our types').
        let message = message.rsplit_once(" at line ").map_or(message.as_str(), |(m, _)| m);
        let rewritten = rewrite_message(message, Noun::Field);
        (rewritten.detail, json_path(path, rewritten.unknown_key))
    } else {
        // A value the syntax pass let through but the typed pass could not read (such as an array longer than the
        // tuple it fills): serde_json's message says nothing more useful.
        (GENERIC_DETAIL.to_owned(), json_path(path, None))
    };
    Problem::new(ProblemType::InvalidRecord)
        .detail("the body does not match the record's schema")
        .errors(vec![FieldError { path, detail }])
}

/// What a problem says when serde's message is not one we know how to rewrite.
const GENERIC_DETAIL: &str = "this value does not have the type or form this field needs";

/// What a message names: a field of a JSON body or a query parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Noun {
    Field,
    Parameter,
}

impl Noun {
    fn as_str(self) -> &'static str {
        match self {
            Noun::Field => "field",
            Noun::Parameter => "parameter",
        }
    }
}

/// A serde message rewritten for the caller.
#[derive(Debug, PartialEq, Eq)]
struct Rewritten<'a> {
    /// What to tell the caller: names and allowed values, never the value sent.
    detail: String,
    /// The caller's unknown key, when the message was about one (so the path can leave it out).
    unknown_key: Option<&'a str>,
}

/// Rewrites a serde (or serde_json, serde_urlencoded) error message so it never repeats the caller's input.
///
/// serde quotes the received value (`invalid type: string "…", expected u32`), the unknown variant or the unknown
/// key; what follows `, expected ` is the type's own text (names and allowed values), so that part is kept. The
/// field names of `missing field` and `duplicate field` are the type's own. Our own types' messages (ids, dates,
/// instants) never quote their input (see `RecordId::parse`). Anything else becomes [`GENERIC_DETAIL`].
fn rewrite_message(message: &str, noun: Noun) -> Rewritten<'_> {
    let noun_text = noun.as_str();
    let plain = |detail: String| Rewritten { detail, unknown_key: None };
    // `unknown variant `X`, expected LIST` / `unknown field `X`, expected LIST`: X may contain anything, LIST is
    // ours, so the last delimiter is serde's.
    for (prefix, is_field) in [("unknown variant `", false), ("unknown field `", true)] {
        let Some(rest) = message.strip_prefix(prefix) else { continue };
        let (key, allowed) = if let Some(key) = rest.strip_suffix("`, there are no variants") {
            (key, None)
        } else if let Some(key) = rest.strip_suffix("`, there are no fields") {
            (key, None)
        } else if let Some((key, expected)) = rest.rsplit_once("`, expected ") {
            (key, Some(allowed_names(expected)))
        } else {
            return plain(GENERIC_DETAIL.to_owned());
        };
        let detail = match (is_field, allowed) {
            (false, Some(Some(names))) => format!("not one of the allowed values: {names}"),
            (false, _) => "no value is allowed here".to_owned(),
            (true, Some(Some(names))) => format!("unknown {noun_text}; allowed here: {names}"),
            (true, _) => format!("unknown {noun_text}; none is allowed here"),
        };
        return Rewritten { detail, unknown_key: is_field.then_some(key) };
    }
    for (prefix, what) in [("missing field `", "missing"), ("duplicate field `", "duplicate")] {
        if let Some(name) = message.strip_prefix(prefix).and_then(|r| r.strip_suffix('`'))
            && is_plain_name(name)
        {
            return plain(format!("{what} {noun_text} `{name}`"));
        }
    }
    for prefix in ["invalid type: ", "invalid value: ", "invalid length "] {
        if message.starts_with(prefix)
            && let Some((_, expected)) = message.rsplit_once(", expected ")
        {
            return plain(format!("expected {expected}"));
        }
    }
    // Our own types' messages (`RecordId::parse`, `Date::parse`, `Timestamp::parse`) never quote their input.
    if message.starts_with("an id ") || message.starts_with("expected ") {
        return plain(message.to_owned());
    }
    // std's parse errors, as serde_urlencoded passes them on for numbers and booleans in a query string.
    let detail = match message {
        "invalid digit found in string"
        | "cannot parse integer from empty string"
        | "number too large to fit in target type"
        | "number too small to fit in target type" => "expected a whole number in range",
        "invalid float literal" => "expected a number",
        "provided string was not `true` or `false`" => "expected true or false",
        _ => GENERIC_DETAIL,
    };
    plain(detail.to_owned())
}

/// `` `a`, `b`, `c` `` from serde's `` `a` ``, `` `a` or `b` `` or `` one of `a`, `b`, `c` ``.
fn allowed_names(expected: &str) -> Option<String> {
    let names: Vec<String> = expected.split('`').skip(1).step_by(2).map(|n| format!("`{n}`")).collect();
    (!names.is_empty()).then(|| names.join(", "))
}

/// A field or parameter name as our types spell them.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `$.goals[0].target_date` from serde_path_to_error's path; `unknown_key`, when the last segment is that key, is
/// left out, so the path is that of the object holding it.
fn json_path(path: &serde_path_to_error::Path, unknown_key: Option<&str>) -> String {
    use serde_path_to_error::Segment;
    let segments: Vec<&Segment> = path.iter().collect();
    let keep = match (segments.last(), unknown_key) {
        (Some(Segment::Map { key }), Some(unknown)) if key == unknown => segments.len() - 1,
        _ => segments.len(),
    };
    let mut out = String::from("$");
    for segment in &segments[..keep] {
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

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Problem> {
        parse_query(parts.uri.query().unwrap_or_default()).map(ApiQuery)
    }
}

/// Parses a query string into `T`; a problem names the parameter and what it takes, never what was sent.
///
/// # Errors
/// An `invalid-query` problem.
pub fn parse_query<T: DeserializeOwned>(query: &str) -> Result<T, Problem> {
    let de = serde_urlencoded::Deserializer::new(url::form_urlencoded::parse(query.as_bytes()));
    serde_path_to_error::deserialize(de).map_err(|e| {
        let message = e.inner().to_string();
        let rewritten = rewrite_message(&message, Noun::Parameter);
        let name = match e.path().iter().next_back() {
            Some(serde_path_to_error::Segment::Map { key })
                if Some(key.as_str()) != rewritten.unknown_key && is_plain_name(key) =>
            {
                Some(key.as_str())
            }
            _ => None,
        };
        let detail = match name {
            Some(name) => format!("{name}: {}", rewritten.detail),
            None => rewritten.detail,
        };
        Problem::new(ProblemType::InvalidQuery).detail(detail)
    })
}

/// Largest `per_page` of a paged catalog listing (`/api/v1/services`, `/hsds/services`).
pub const MAX_PER_PAGE: u32 = 100;

/// `page` (from 1) and `per_page` (1 to [`MAX_PER_PAGE`], `default_per_page` when absent) of a paged listing.
///
/// # Errors
/// An `invalid-query` problem naming the parameter and its range.
pub fn paging(page: Option<u32>, per_page: Option<u32>, default_per_page: u32) -> Result<(u32, u32), Problem> {
    let page = page.unwrap_or(1);
    if page == 0 {
        return Err(Problem::new(ProblemType::InvalidQuery).detail(format!("page: from 1 to {}", u32::MAX)));
    }
    let per_page = per_page.unwrap_or(default_per_page);
    if !(1..=MAX_PER_PAGE).contains(&per_page) {
        return Err(Problem::new(ProblemType::InvalidQuery).detail(format!("per_page: from 1 to {MAX_PER_PAGE}")));
    }
    Ok((page, per_page))
}

/// The one parameter of a route's path (`/services/{id}`) as text; it is not echoed when it cannot be decoded.
pub struct PathText(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathText {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(text)| PathText(text))
            .map_err(|_| Problem::new(ProblemType::NotFound).detail("the path could not be decoded"))
    }
}

/// The precondition of a write, from `If-Match` (`*`, or entity-tags: `"3"`, `W/"3"`, comma-separated lists of
/// them) and `If-None-Match: *`.
///
/// `If-Match` compares our versions only: a well-formed tag we never issued (`"stale-version"`, `"0"`, `"03"`)
/// matches nothing, so a list of those alone fails (412) rather than being malformed (400). A weak tag `W/"3"` is
/// taken as `"3"`, as we have always done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conditions {
    /// A precondition the store checks as it writes.
    Store(Precondition),
    /// `If-Match` naming several versions, or none we issued: holds when the record is at one of them. The store
    /// checks one version, so the caller compares these with the current version and writes under that one.
    AnyVersion(Vec<i64>),
}

impl<S: Send + Sync> FromRequestParts<S> for Conditions {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Problem> {
        conditions(&parts.headers)
    }
}

fn conditions(headers: &HeaderMap) -> Result<Conditions, Problem> {
    let if_match = combined(headers, header::IF_MATCH);
    let if_none_match = combined(headers, header::IF_NONE_MATCH);
    match (if_match, if_none_match) {
        (Some(_), Some(_)) => Err(bad_precondition("send If-Match or If-None-Match, not both")),
        (None, Some(value)) if value.trim_ascii() == b"*" => Ok(Conditions::Store(Precondition::Absent)),
        (None, Some(_)) => Err(bad_precondition("If-None-Match accepts only * on writes")),
        (Some(value), None) => match parse_if_match(&value) {
            Some(IfMatch::Any) => Ok(Conditions::Store(Precondition::Exists)),
            Some(IfMatch::Versions(mut versions)) => {
                versions.sort_unstable();
                versions.dedup();
                Ok(match versions.as_slice() {
                    [one] => Conditions::Store(Precondition::Version(*one)),
                    _ => Conditions::AnyVersion(versions),
                })
            }
            None => {
                Err(bad_precondition("If-Match takes * or entity-tags such as \"3\" or W/\"3\", separated by commas"))
            }
        },
        (None, None) => Ok(Conditions::Store(Precondition::None)),
    }
}

/// Every line of a header, joined with commas as RFC 9110 §5.3 combines them.
fn combined(headers: &HeaderMap, name: header::HeaderName) -> Option<Vec<u8>> {
    let mut lines = headers.get_all(name).iter();
    let mut out = lines.next()?.as_bytes().to_vec();
    for line in lines {
        out.extend_from_slice(b", ");
        out.extend_from_slice(line.as_bytes());
    }
    Some(out)
}

fn bad_precondition(detail: &str) -> Problem {
    Problem::new(ProblemType::InvalidPrecondition).detail(detail.to_owned())
}

/// What an `If-Match` header asks for.
#[derive(Debug, PartialEq, Eq)]
enum IfMatch {
    /// `*`: any current version.
    Any,
    /// The versions of the listed tags we issued (tags we never issued match nothing and are left out).
    Versions(Vec<i64>),
}

/// Parses `If-Match = "*" / #entity-tag` (RFC 9110 §13.1.1); `None` when malformed.
fn parse_if_match(value: &[u8]) -> Option<IfMatch> {
    let value = value.trim_ascii();
    if value == b"*" {
        return Some(IfMatch::Any);
    }
    let mut versions = Vec::new();
    let mut rest = value;
    loop {
        // A list may hold empty elements (RFC 9110 §5.6.1).
        rest = rest.trim_ascii_start();
        if let Some(after) = rest.strip_prefix(b",") {
            rest = after;
            continue;
        }
        if rest.is_empty() {
            return Some(IfMatch::Versions(versions));
        }
        let (opaque, after) = entity_tag(rest)?;
        versions.extend(issued_version(opaque));
        rest = after.trim_ascii_start();
        if !(rest.is_empty() || rest.starts_with(b",")) {
            return None;
        }
    }
}

/// The entity-tag at the start of `s` (`"…"` or `W/"…"`, RFC 9110 §8.8.3): its opaque text and what follows.
fn entity_tag(s: &[u8]) -> Option<(&[u8], &[u8])> {
    let s = s.strip_prefix(b"W/").unwrap_or(s);
    let s = s.strip_prefix(b"\"")?;
    let end = s.iter().position(|&b| b == b'"')?;
    let (opaque, after) = s.split_at(end);
    // etagc = %x21 / %x23-7E / obs-text
    opaque.iter().all(|&b| b == 0x21 || (0x23..=0x7e).contains(&b) || b >= 0x80).then_some((opaque, &after[1..]))
}

/// The version of an opaque tag, if it is one we issue ([`etag`]: the version number, from 1).
fn issued_version(opaque: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(opaque).ok()?;
    let version: i64 = text.parse().ok()?;
    (version >= 1 && version.to_string() == text).then_some(version)
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
        Ok(CallerActor(Actor { key_name: caller.name.to_string(), request_id, partner: None }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Referral;

    const MARKER: &str = "Kpzzl-secret";

    fn field_error(body: &str) -> FieldError {
        let problem = parse_json::<Referral>(body.as_bytes()).expect_err("invalid");
        assert_eq!(problem.kind(), Some(ProblemType::InvalidRecord), "{body}");
        let error = problem.errors[0].clone();
        assert!(!error.detail.contains("Kpzzl") && !error.path.contains("Kpzzl"), "{body}: {error:?}");
        error
    }

    #[test]
    fn a_wrong_type_deep_in_the_body_names_its_json_path() {
        let body = br#"{"client_id":"c1","notes":[{"at":5}]}"#;
        let problem = parse_json::<Referral>(body).expect_err("invalid");
        assert_eq!(problem.kind(), Some(ProblemType::InvalidRecord));
        assert_eq!(problem.errors[0].path, "$.notes[0].at");
    }

    #[test]
    fn an_unknown_field_is_refused_with_the_path_of_its_object_and_the_allowed_names() {
        let problem =
            parse_json::<crate::domain::StatusChange>(br#"{"status":"sent","Kpzzl-secret":1}"#).expect_err("invalid");
        assert_eq!(problem.kind(), Some(ProblemType::InvalidRecord));
        assert_eq!(problem.errors[0].path, "$");
        assert!(problem.errors[0].detail.starts_with("unknown field; allowed here: `status`"), "{:?}", problem.errors);
        assert!(!format!("{problem:?}").contains(MARKER));
        let nested = field_error(r#"{"client_id":"c1","notes":[{"Kpzzl-secret":1}]}"#);
        assert_eq!(nested.path, "$.notes[0]");
    }

    #[test]
    fn an_unknown_code_names_the_allowed_codes_and_not_the_one_sent() {
        let error = field_error(r#"{"client_id":"c1","priority":"Kpzzl secret"}"#);
        assert_eq!(error.path, "$.priority");
        assert!(error.detail.starts_with("not one of the allowed values: `routine`"), "{error:?}");
    }

    #[test]
    fn a_wrong_type_says_what_was_expected_and_not_what_was_sent() {
        let error = field_error(r#"{"client_id":"c1","notes":[{"at":"Kpzzl, expected hack"}]}"#);
        assert!(error.detail.starts_with("expected "), "{error:?}");
        assert!(!error.detail.contains("hack"), "{error:?}");
    }

    #[test]
    fn serde_messages_are_rewritten_without_the_callers_text() {
        let cases = [
            ("unknown variant `Kpzzl`, expected one of `a`, `b`", "not one of the allowed values: `a`, `b`"),
            ("unknown variant `Kpzzl`, expected `a` or `b`", "not one of the allowed values: `a`, `b`"),
            ("unknown variant `Kpzzl`, there are no variants", "no value is allowed here"),
            ("unknown variant `x`, expected `y`, expected `a`", "not one of the allowed values: `a`"),
            ("unknown field `Kpzzl`, expected `a`", "unknown field; allowed here: `a`"),
            ("unknown field `Kpzzl`, there are no fields", "unknown field; none is allowed here"),
            ("missing field `client_id`", "missing field `client_id`"),
            ("duplicate field `status`", "duplicate field `status`"),
            ("missing field `Kpzzl secret`", GENERIC_DETAIL),
            ("invalid type: string \"Kpzzl\", expected u32", "expected u32"),
            ("invalid value: integer `-5`, expected u32", "expected u32"),
            ("invalid length 1, expected a tuple of size 2", "expected a tuple of size 2"),
            (
                "an id may only contain letters A-Z, a-z, digits, '-' and '.'",
                "an id may only contain letters A-Z, a-z, digits, '-' and '.'",
            ),
            ("expected a date as YYYY-MM-DD", "expected a date as YYYY-MM-DD"),
            ("something new about Kpzzl", GENERIC_DETAIL),
            ("invalid digit found in string", "expected a whole number in range"),
        ];
        for (message, detail) in cases {
            assert_eq!(rewrite_message(message, Noun::Field).detail, detail, "{message}");
        }
        let unknown = rewrite_message("unknown field `Kpzzl`, expected one of `page`, `per_page`", Noun::Parameter);
        assert_eq!(unknown.detail, "unknown parameter; allowed here: `page`, `per_page`");
        assert_eq!(unknown.unknown_key, Some("Kpzzl"));
    }

    #[test]
    fn broken_json_is_a_syntax_problem_with_a_position() {
        let problem = parse_json::<Referral>(b"{\"client_id\": ").expect_err("invalid");
        assert_eq!(problem.kind(), Some(ProblemType::MalformedJson));
        let trailing = parse_json::<crate::domain::StatusChange>(br#"{"status":"sent"} x"#).expect_err("invalid");
        assert_eq!(trailing.kind(), Some(ProblemType::MalformedJson));
    }

    #[test]
    fn invalid_utf8_lone_surrogates_and_deep_nesting_are_syntax_problems() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let deep_in_a_field = format!(r#"{{"client_id":"c1","notes":{}1{}}}"#, "[".repeat(200), "]".repeat(200));
        for body in [
            b"{\"client_id\":\"\xff\"}".to_vec(),
            br#"{"client_id":"\ud800"}"#.to_vec(),
            deep.into_bytes(),
            deep_in_a_field.into_bytes(),
        ] {
            let problem = parse_json::<Referral>(&body).expect_err("invalid");
            assert_eq!(problem.kind(), Some(ProblemType::MalformedJson), "{:?}", problem.detail);
        }
        let shallow = format!("{}1{}", "[".repeat(100), "]".repeat(100));
        assert!(parse_json::<serde_json::Value>(shallow.as_bytes()).is_ok());
    }

    #[test]
    fn a_repeated_key_is_refused_at_any_depth_also_in_untyped_values() {
        for body in [
            r#"{"status":"sent","status":"completed"}"#,
            r#"{"status":"sent","reason":{"a":1,"b":{"c":[{"d":1,"d":2}]}}}"#,
            r#"{"status":"sent","st\u0061tus":"completed"}"#,
        ] {
            let problem = parse_json::<serde_json::Value>(body.as_bytes()).expect_err("repeated key");
            assert_eq!(problem.kind(), Some(ProblemType::MalformedJson), "{body}");
            assert!(problem.detail.as_deref().is_some_and(|d| d.contains("repeats a key")), "{body}");
            let typed = parse_json::<crate::domain::StatusChange>(body.as_bytes()).expect_err("repeated key");
            assert_eq!(typed.kind(), Some(ProblemType::MalformedJson), "{body}");
        }
        assert!(parse_json::<serde_json::Value>(br#"{"a":{"k":1},"b":{"k":1}}"#).is_ok());
    }

    #[test]
    fn query_problems_name_the_parameter_and_never_the_value_or_unknown_name() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Params {
            page: Option<u32>,
            open: Option<bool>,
        }
        for (query, detail) in [
            ("page=Kpzzl-secret", "page: expected a whole number in range"),
            ("open=Kpzzl-secret", "open: expected true or false"),
            ("Kpzzl-secret=1", "unknown parameter; allowed here: `page`, `open`"),
            ("page=1&page=2", "duplicate parameter `page`"),
        ] {
            let problem = parse_query::<Params>(query).expect_err("invalid");
            assert_eq!(problem.kind(), Some(ProblemType::InvalidQuery));
            assert_eq!(problem.detail.as_deref(), Some(detail), "{query}");
        }
    }

    #[test]
    fn if_match_takes_lists_of_entity_tags_and_refuses_only_malformed_ones() {
        assert_eq!(parse_if_match(b"*"), Some(IfMatch::Any));
        assert_eq!(parse_if_match(b"\"3\""), Some(IfMatch::Versions(vec![3])));
        assert_eq!(parse_if_match(b"W/\"12\""), Some(IfMatch::Versions(vec![12])));
        assert_eq!(parse_if_match(b"\"stale-version\""), Some(IfMatch::Versions(vec![])));
        assert_eq!(parse_if_match(b"\"0\", \"03\", \"+3\", \"\""), Some(IfMatch::Versions(vec![])));
        assert_eq!(parse_if_match(b" \"1\" ,, W/\"2\",\"a,b\" "), Some(IfMatch::Versions(vec![1, 2])));
        assert_eq!(parse_if_match(b"\"caf\xc3\xa9\""), Some(IfMatch::Versions(vec![])));
        assert_eq!(parse_if_match(b""), Some(IfMatch::Versions(vec![])));
        for bad in [&b"3"[..], b"seven", b"\"3", b"\"3\" \"4\"", b"*, \"3\"", b"w/\"3\"", b"\"a b\"", b"\"3\"x"] {
            assert_eq!(parse_if_match(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn several_if_match_versions_are_left_to_the_current_version() {
        let mut headers = HeaderMap::new();
        headers.append(header::IF_MATCH, "\"2\"".parse().expect("header"));
        headers.append(header::IF_MATCH, "\"5\", \"2\"".parse().expect("header"));
        assert_eq!(conditions(&headers).expect("valid"), Conditions::AnyVersion(vec![2, 5]));
        let mut one = HeaderMap::new();
        one.insert(header::IF_MATCH, "\"2\", W/\"2\"".parse().expect("header"));
        assert_eq!(conditions(&one).expect("valid"), Conditions::Store(Precondition::Version(2)));
    }

    #[test]
    fn content_codings_are_gzip_or_identity() {
        let mut h = HeaderMap::new();
        assert_eq!(gzip_layers(&h).expect("none"), 0);
        h.insert(header::CONTENT_ENCODING, "identity".parse().expect("header"));
        assert_eq!(gzip_layers(&h).expect("identity"), 0);
        h.insert(header::CONTENT_ENCODING, "GZIP, identity".parse().expect("header"));
        assert_eq!(gzip_layers(&h).expect("gzip"), 1);
        h.insert(header::CONTENT_ENCODING, "br".parse().expect("header"));
        let problem = gzip_layers(&h).expect_err("br");
        assert_eq!(problem.kind(), Some(ProblemType::UnsupportedMediaType));
        assert!(problem.detail.as_deref().is_some_and(|d| d.contains("gzip, identity")));
    }

    #[test]
    fn paging_takes_page_from_1_and_per_page_from_1_to_100() {
        assert_eq!(paging(None, None, 20).expect("defaults"), (1, 20));
        assert_eq!(paging(Some(3), Some(100), 20).expect("in range"), (3, 100));
        for (page, per_page, named) in
            [(Some(0), None, "page"), (None, Some(0), "per_page"), (None, Some(101), "per_page")]
        {
            let problem = paging(page, per_page, 20).expect_err("out of range");
            assert!(problem.detail.as_deref().is_some_and(|d| d.starts_with(&format!("{named}: from 1 to "))));
        }
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
