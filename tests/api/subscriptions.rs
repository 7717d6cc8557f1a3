//! Following outbound referrals by topic-based Subscription (R4 backport, rest-hook, `id-only`): the gateway asks
//! a partner that declares the backport for a Subscription, and the test plays that partner: it changes Tasks on
//! its (fake) server and sends the notifications a real server would, to the gateway's real HTTP endpoint. A
//! notified Task is read by id and moves its referral without a sweep; an event number skipped, or a heartbeat
//! counting more events than arrived, makes the gateway sweep and so recover the change it was never told about;
//! a notification without the subscription's token is refused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use carebridge::domain::{RecordId, RecordKind};
use carebridge::store::{self, CrosswalkEntry};
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::helpers::{TestApp, fixture, spawn_app_with};

const PARTNER: &str = "hospital";
const TOPIC: &str = "https://ehr.example/fhir/SubscriptionTopic/task-status";

/// The partner's server: Tasks, the Subscriptions asked of it, and how often it was searched.
#[derive(Default)]
struct Ehr {
    tasks: HashMap<String, Value>,
    subscriptions: Vec<Value>,
    searches: usize,
    reads: Vec<String>,
    /// Whether its CapabilityStatement declares the backport.
    declares: bool,
}

type Shared = Arc<Mutex<Ehr>>;

async fn metadata(State(ehr): State<Shared>) -> Json<Value> {
    if !ehr.lock().expect("lock").declares {
        return Json(json!({
            "resourceType": "CapabilityStatement", "status": "active", "kind": "instance", "fhirVersion": "4.0.1",
            "format": ["json"], "date": "2026-12-01",
            "rest": [{"mode": "server", "resource": [
                {"type": "Task", "interaction": [{"code": "read"}, {"code": "search-type"}, {"code": "update"}]}
            ]}]
        }));
    }
    Json(json!({
        "resourceType": "CapabilityStatement", "status": "active", "kind": "instance", "fhirVersion": "4.0.1",
        "format": ["json"], "date": "2026-12-01",
        "instantiates": ["http://hl7.org/fhir/uv/subscriptions-backport/CapabilityStatement/backport-subscription-server-r4"],
        "rest": [{"mode": "server", "resource": [
            {"type": "Task", "interaction": [{"code": "read"}, {"code": "search-type"}, {"code": "update"}]},
            {"type": "Subscription", "interaction": [{"code": "create"}, {"code": "read"}]}
        ]}]
    }))
}

async fn subscribe(State(ehr): State<Shared>, Json(mut body): Json<Value>) -> Response {
    let mut ehr = ehr.lock().expect("lock");
    body["id"] = json!(format!("sub-{}", ehr.subscriptions.len() + 1));
    ehr.subscriptions.push(body.clone());
    (StatusCode::CREATED, Json(body)).into_response()
}

async fn read_subscription(State(ehr): State<Shared>, Path(id): Path<String>) -> Response {
    let ehr = ehr.lock().expect("lock");
    match ehr.subscriptions.iter().find(|s| s["id"] == id.as_str()) {
        Some(s) => {
            let mut s = s.clone();
            s["status"] = json!("active");
            Json(s).into_response()
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn read_task(State(ehr): State<Shared>, Path(id): Path<String>) -> Response {
    let mut ehr = ehr.lock().expect("lock");
    ehr.reads.push(id.clone());
    match ehr.tasks.get(&id) {
        Some(t) => Json(t.clone()).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn search_tasks(State(ehr): State<Shared>) -> Json<Value> {
    let mut ehr = ehr.lock().expect("lock");
    ehr.searches += 1;
    let entry: Vec<Value> = ehr.tasks.values().map(|t| json!({"resource": t, "search": {"mode": "match"}})).collect();
    Json(json!({"resourceType": "Bundle", "type": "searchset", "total": entry.len(), "entry": entry}))
}

/// Anything else (the outbox's deliveries): refused, so nothing here depends on them.
async fn refuse() -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "not-supported", "diagnostics": "not in this test"}]})),
    )
        .into_response()
}

async fn start_ehr(declares: bool) -> (String, Shared) {
    let ehr: Shared = Arc::new(Mutex::new(Ehr { declares, ..Ehr::default() }));
    let router = axum::Router::new()
        .route("/fhir/metadata", get(metadata))
        .route("/fhir/Subscription", post(subscribe))
        .route("/fhir/Subscription/{id}", get(read_subscription))
        .route("/fhir/Task", get(search_tasks))
        .route("/fhir/Task/{id}", get(read_task))
        .fallback(refuse)
        .with_state(ehr.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, router).await });
    (format!("http://{addr}/fhir"), ehr)
}

struct World {
    app: TestApp,
    ehr: Shared,
}

impl World {
    async fn start(declares: bool, poll_secs: u64) -> World {
        let (base, ehr) = start_ehr(declares).await;
        let app = spawn_app_with(|s| {
            s.partners = vec![
                serde_json::from_value(json!({
                    "name": PARTNER, "base_url": base, "receives": ["client", "referral"],
                    "poll_secs": poll_secs,
                    "subscription": {"topic": TOPIC, "heartbeat_secs": 60}
                }))
                .expect("partner"),
            ];
            s.server.public_base_url = Some("https://gw.example/".into());
            s.outbox.enabled = true;
        })
        .await;
        World { app, ehr }
    }

    /// Referrals sent to the partner, each with its Task there (`requested`, version 1) known to the crosswalk as
    /// a delivery would have left it.
    async fn referrals_sent(&self, ids: &[&str]) {
        let client = fixture("client", "cl-1001");
        assert!(self.app.put("/api/v1/clients/cl-1001", &client).await.status().is_success());
        let url = format!("sqlite:{}", self.app.dir.path().join("carebridge.db").display());
        let store = store::connect(&url, 2, Duration::from_secs(5)).await.expect("store");
        let mut entries = Vec::new();
        for id in ids {
            let mut referral = fixture("referral", "ref-4001");
            let body = referral.as_object_mut().expect("object");
            for field in ["care_plan_id", "goal_ids", "consent_id"] {
                body.remove(field);
            }
            body.insert("id".into(), json!(id));
            body.insert("target".into(), json!({"type": "partner", "partner": PARTNER}));
            let put = self.app.put(&format!("/api/v1/referrals/{id}"), &referral).await;
            assert!(put.status().is_success(), "{id}: {}", put.text().await.unwrap_or_default());
            let task = format!("t-{id}");
            self.ehr.lock().expect("lock").tasks.insert(task.clone(), task_at(&task, "requested", 1));
            entries.push(CrosswalkEntry {
                partner: PARTNER.into(),
                local_ref: format!("Task/{id}"),
                kind: RecordKind::Referral,
                record_id: RecordId::parse(id).expect("id"),
                remote_type: "Task".into(),
                remote_id: task,
                version_id: Some("1".into()),
                content_hash: String::new(),
            });
        }
        store.save_crosswalk(&entries, OffsetDateTime::now_utc()).await.expect("crosswalk");
    }

    /// The hospital moves a Task on its own server (a new version), telling no one.
    fn hospital_moves(&self, task: &str, status: &str) {
        let mut ehr = self.ehr.lock().expect("lock");
        let version = ehr.tasks[task]["meta"]["versionId"].as_str().expect("version").parse::<u32>().expect("n");
        ehr.tasks.insert(task.to_owned(), task_at(task, status, version + 1));
    }

    /// The Subscription the gateway asked for (waiting for it), and the token it carries.
    async fn subscription(&self) -> (Value, String) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.ehr.lock().expect("lock").subscriptions.last().cloned() {
                let header = s["channel"]["header"][0].as_str().expect("a header").to_owned();
                let token = header.strip_prefix("Authorization: Bearer ").expect("a bearer token").to_owned();
                return (s, token);
            }
            assert!(Instant::now() < deadline, "the gateway never subscribed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn notify(&self, token: Option<&str>, body: &Value) -> reqwest::Response {
        let mut request = self
            .app
            .client
            .post(format!("{}/fhir/subscription-notifications/{PARTNER}", self.app.base))
            .header("content-type", "application/fhir+json")
            .body(body.to_string());
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("sent")
    }

    async fn status_of(&self, id: &str) -> String {
        let body: Value = self.app.get(&format!("/api/v1/referrals/{id}")).await.json().await.expect("JSON");
        body["status"].as_str().expect("a status").to_owned()
    }

    async fn until_status(&self, id: &str, status: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.status_of(id).await != status {
            assert!(Instant::now() < deadline, "{id} never became {status}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn searches(&self) -> usize {
        self.ehr.lock().expect("lock").searches
    }
}

fn task_at(id: &str, status: &str, version: u32) -> Value {
    json!({
        "resourceType": "Task", "id": id,
        "meta": {"versionId": version.to_string(), "lastUpdated": "2026-12-07T09:00:00Z"},
        "status": status, "intent": "order"
    })
}

fn notification(kind: &str, since: u32, events: &[(u32, &str)]) -> Value {
    let mut parameter = vec![
        json!({"name": "subscription", "valueReference": {"reference": "https://ehr.example/fhir/Subscription/sub-1"}}),
        json!({"name": "topic", "valueCanonical": TOPIC}),
        json!({"name": "status", "valueCode": "active"}),
        json!({"name": "type", "valueCode": kind}),
        json!({"name": "events-since-subscription-start", "valueString": since.to_string()}),
    ];
    for (n, task) in events {
        parameter.push(json!({"name": "notification-event", "part": [
            {"name": "event-number", "valueString": n.to_string()},
            {"name": "timestamp", "valueInstant": "2026-12-07T09:00:00Z"},
            {"name": "focus", "valueReference": {"reference": format!("https://ehr.example/fhir/Task/{task}")}}
        ]}));
    }
    json!({
        "resourceType": "Bundle", "type": "history", "timestamp": "2026-12-07T09:00:00Z",
        "entry": [{
            "fullUrl": "urn:uuid:6a1c3f0e-2b7d-4c59-9f1e-0d3c2b1a4e5f",
            "resource": {"resourceType": "Parameters", "parameter": parameter},
            "request": {"method": "GET", "url": "https://ehr.example/fhir/Subscription/sub-1/$status"},
            "response": {"status": "200"}
        }]
    })
}

async fn until<F: FnMut() -> bool>(what: &str, mut ready: F) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn notifications_move_referrals_and_missed_ones_are_recovered_by_a_sweep() {
    let w = World::start(true, 3600).await;
    w.referrals_sent(&["ref-a", "ref-b", "ref-c", "ref-d"]).await;
    let (subscription, token) = w.subscription().await;
    // What was asked: the topic, rest-hook to the gateway's public address, id-only, a heartbeat.
    assert_eq!(subscription["criteria"], TOPIC);
    assert_eq!(subscription["channel"]["type"], "rest-hook");
    assert_eq!(subscription["channel"]["endpoint"], "https://gw.example/fhir/subscription-notifications/hospital");
    assert_eq!(subscription["channel"]["_payload"]["extension"][0]["valueCode"], "id-only");
    assert_eq!(token.len(), 64);
    crate::delivery_interop::validate(std::slice::from_ref(&subscription));

    // Without the subscription's token, nothing is kept.
    let refused = w.notify(None, &notification("handshake", 0, &[])).await;
    assert_eq!(refused.status(), 401);
    let outcome: Value = refused.json().await.expect("JSON");
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert_eq!(w.notify(Some("not-the-token"), &notification("handshake", 0, &[])).await.status(), 401);
    // What is no notification is named.
    let bad = w.notify(Some(&token), &json!({"resourceType": "Bundle", "type": "batch"})).await;
    assert_eq!(bad.status(), 400);
    assert!(bad.text().await.expect("body").contains("history"));

    assert_eq!(w.notify(Some(&token), &notification("handshake", 0, &[])).await.status(), 200);
    let searched = w.searches();

    // Event 1 names t-ref-a: read by id, applied; t-ref-b moved too but was not named, and nothing swept.
    w.hospital_moves("t-ref-a", "accepted");
    w.hospital_moves("t-ref-b", "accepted");
    assert_eq!(w.notify(Some(&token), &notification("event-notification", 1, &[(1, "t-ref-a")])).await.status(), 200);
    w.until_status("ref-a", "accepted").await;
    assert_eq!(w.status_of("ref-b").await, "sent", "only the notified Task is read");
    assert_eq!(w.searches(), searched, "a notification costs a read, not a sweep");
    assert!(w.ehr.lock().expect("lock").reads.contains(&"t-ref-a".to_owned()));

    // Event 2 (about t-ref-b) never arrives; event 3 does: the gap makes the gateway sweep, which finds t-ref-b.
    w.hospital_moves("t-ref-c", "accepted");
    assert_eq!(w.notify(Some(&token), &notification("event-notification", 3, &[(3, "t-ref-c")])).await.status(), 200);
    w.until_status("ref-c", "accepted").await;
    w.until_status("ref-b", "accepted").await;
    assert!(w.searches() > searched, "the gap was recovered by a sweep");

    // A heartbeat counting an event that never arrived: swept again, t-ref-d found.
    let searched = w.searches();
    w.hospital_moves("t-ref-d", "accepted");
    assert_eq!(w.notify(Some(&token), &notification("heartbeat", 4, &[])).await.status(), 200);
    w.until_status("ref-d", "accepted").await;
    until("the heartbeat's gap was swept", || w.searches() > searched).await;

    // Each move is the partner's, in the referral's history.
    let history: Value = w.app.get("/api/v1/referrals/ref-b/history").await.json().await.expect("JSON");
    let entries = history["versions"].as_array().expect("versions");
    assert!(entries.iter().any(|e| e["status"] == "accepted" && e["partner"] == PARTNER), "{history}");
    w.app.stop().await;
}

#[tokio::test]
async fn a_partner_that_declares_no_subscriptions_is_asked_for_none_and_swept() {
    let w = World::start(false, 1).await;
    w.referrals_sent(&["ref-a"]).await;
    w.hospital_moves("t-ref-a", "accepted");
    w.until_status("ref-a", "accepted").await;
    assert!(w.searches() > 0, "followed by sweeps");
    assert!(w.ehr.lock().expect("lock").subscriptions.is_empty(), "no Subscription asked of it");
    // No subscription holds a token: no notification is taken.
    let refused = w.notify(Some("any-token"), &notification("handshake", 0, &[])).await;
    assert_eq!(refused.status(), 401);
    w.app.stop().await;
}
