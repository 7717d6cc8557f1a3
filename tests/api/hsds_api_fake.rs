//! A fake HSDS 3.0.1 API on 127.0.0.1 for directory tests: `/services` answers the list shape
//! (`compiled/service_list`: one-to-one fields only), `/services?full=true` the full shape when enabled, and
//! `/services/{id}` the full `compiled/service` (or 404); `modified_after` filters; scripted faults play once
//! each, in order, on the requests they match; every request is logged with its `User-Agent` and time.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// Fields of a full service that the list shape leaves out (HSDS 3.0.1 `service_list` versus `service`).
const FULL_ONLY: [&str; 11] = [
    "phones",
    "schedules",
    "service_areas",
    "service_at_locations",
    "languages",
    "funding",
    "cost_options",
    "required_documents",
    "contacts",
    "attributes",
    "metadata",
];

/// Which requests a fault answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum On {
    /// A list page by number.
    Page(usize),
    /// Any `/services/{id}`.
    Detail,
}

/// A scripted misbehaviour.
#[derive(Debug, Clone)]
pub enum Fault {
    /// `200 {"error": "maintenance"}`.
    Maintenance,
    /// `200 {"contents": []}` without totals.
    EmptyContents,
    /// The page as usual, but `total_items` says more than there are.
    WrongTotals,
    /// An error status, with a `Retry-After` in seconds when given, and a body.
    Status(u16, Option<u64>, &'static str),
    /// No answer for this long.
    Hang(Duration),
    /// The usual answer, this much later (a slow source).
    Delay(Duration),
    /// Deletes the service with this id, then answers as usual (a deletion between pages).
    DeleteFirst(String),
}

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Path and query.
    pub uri: String,
    /// The `User-Agent` header.
    pub user_agent: String,
    /// When it arrived.
    pub at: Instant,
}

/// The fake API's state, shared with the test.
#[derive(Clone, Default)]
pub struct FakeHsdsApi {
    /// Full services, in the API's (stable) order.
    pub services: Arc<Mutex<Vec<Value>>>,
    /// Whether `full=true` gives full services.
    pub full_param: Arc<Mutex<bool>>,
    /// Ids the list never shows, though `/services/{id}` does (a listing that skips a live service).
    pub hidden: Arc<Mutex<Vec<String>>>,
    /// Scripted faults, played once each.
    pub faults: Arc<Mutex<VecDeque<(On, Fault)>>>,
    /// Every request.
    pub requests: Arc<Mutex<Vec<Seen>>>,
}

#[derive(serde::Deserialize)]
struct PageQuery {
    page: Option<usize>,
    per_page: Option<usize>,
    modified_after: Option<String>,
    full: Option<bool>,
}

fn list_shape(full: &Value) -> Value {
    let mut item = full.clone();
    if let Some(o) = item.as_object_mut() {
        for field in FULL_ONLY {
            o.remove(field);
        }
    }
    item
}

impl FakeHsdsApi {
    /// A fake serving `services` (full shape).
    pub fn with(services: Vec<Value>) -> Self {
        let fake = FakeHsdsApi::default();
        *fake.services.lock().expect("lock") = services;
        fake
    }

    /// Binds 127.0.0.1:0 and serves; returns the base URL.
    pub async fn start(&self) -> String {
        let router = axum::Router::new()
            .route("/services", axum::routing::get(list))
            .route("/services/{id}", axum::routing::get(detail))
            .with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, router).await });
        format!("http://{addr}")
    }

    /// Adds a fault, played once on the next request it matches.
    pub fn fault(&self, on: On, fault: Fault) {
        self.faults.lock().expect("lock").push_back((on, fault));
    }

    /// The paths and queries asked so far.
    pub fn uris(&self) -> Vec<String> {
        self.requests.lock().expect("lock").iter().map(|r| r.uri.clone()).collect()
    }

    /// Forgets the requests so far.
    pub fn clear(&self) {
        self.requests.lock().expect("lock").clear();
    }

    fn log(&self, uri: &axum::http::Uri, headers: &axum::http::HeaderMap) {
        let user_agent = headers.get("user-agent").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        self.requests.lock().expect("lock").push(Seen { uri: uri.to_string(), user_agent, at: Instant::now() });
    }

    fn take_fault(&self, on: On) -> Option<Fault> {
        let mut faults = self.faults.lock().expect("lock");
        let at = faults.iter().position(|(o, _)| *o == on)?;
        faults.remove(at).map(|(_, f)| f)
    }

    /// Plays a fault; `None` when the request should then be answered as usual.
    async fn play(&self, fault: Fault) -> Option<Response> {
        match fault {
            Fault::Maintenance => Some(Json(json!({"error": "maintenance"})).into_response()),
            Fault::EmptyContents => Some(Json(json!({"contents": []})).into_response()),
            Fault::Status(status, retry_after, body) => {
                let status = StatusCode::from_u16(status).expect("a status");
                let mut response = (status, body).into_response();
                if let Some(secs) = retry_after {
                    response.headers_mut().insert("retry-after", secs.to_string().parse().expect("header"));
                }
                Some(response)
            }
            Fault::Hang(d) => {
                tokio::time::sleep(d).await;
                Some(StatusCode::GATEWAY_TIMEOUT.into_response())
            }
            Fault::DeleteFirst(id) => {
                self.services.lock().expect("lock").retain(|s| s["id"] != id.as_str());
                None
            }
            Fault::Delay(d) => {
                tokio::time::sleep(d).await;
                None
            }
            Fault::WrongTotals => None,
        }
    }
}

async fn list(
    State(fake): State<FakeHsdsApi>,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
    Query(q): Query<PageQuery>,
) -> Response {
    fake.log(&uri, &headers);
    let page = q.page.unwrap_or(1).max(1);
    let fault = fake.take_fault(On::Page(page));
    let wrong_totals = matches!(fault, Some(Fault::WrongTotals));
    if let Some(fault) = fault
        && let Some(response) = fake.play(fault).await
    {
        return response;
    }
    let full = q.full.unwrap_or(false) && *fake.full_param.lock().expect("lock");
    let hidden = fake.hidden.lock().expect("lock").clone();
    let all: Vec<Value> = fake
        .services
        .lock()
        .expect("lock")
        .iter()
        .filter(|s| !hidden.iter().any(|h| s["id"] == h.as_str()))
        .filter(|s| match (&q.modified_after, s["last_modified"].as_str()) {
            (Some(after), Some(modified)) => modified > after.as_str(),
            _ => true,
        })
        .map(|s| if full { s.clone() } else { list_shape(s) })
        .collect();
    let per_page = q.per_page.unwrap_or(10).max(1);
    let total_pages = all.len().div_ceil(per_page).max(1);
    let contents: Vec<Value> = all.iter().skip((page - 1) * per_page).take(per_page).cloned().collect();
    let total_items = all.len() + if wrong_totals { 5 } else { 0 };
    Json(json!({
        "total_items": total_items, "total_pages": total_pages, "page_number": page, "size": contents.len(),
        "first_page": page == 1, "last_page": page >= total_pages, "empty": contents.is_empty(), "contents": contents,
    }))
    .into_response()
}

async fn detail(
    State(fake): State<FakeHsdsApi>,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
    Path(id): Path<String>,
) -> Response {
    fake.log(&uri, &headers);
    if let Some(fault) = fake.take_fault(On::Detail)
        && let Some(response) = fake.play(fault).await
    {
        return response;
    }
    let found = fake.services.lock().expect("lock").iter().find(|s| s["id"] == id.as_str()).cloned();
    match found {
        Some(service) => Json(service).into_response(),
        None => (StatusCode::NOT_FOUND, Json(json!({"error": "not found"}))).into_response(),
    }
}
