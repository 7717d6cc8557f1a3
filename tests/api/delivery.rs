//! The outbox worker against a fake partner that plays scripts (503, 429 with `Retry-After`, timeouts, dropped
//! connections, 400 with an OperationOutcome), stepping the worker with `now`: retries on the schedule, dead
//! letters kept with the partner's words, replay, superseded versions coalesced, a client's rows in order, and a
//! referral held while its consent withholds it.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use carebridge::config::OutboxSettings;
use carebridge::domain::{AgencyRecord, Client, Consent, ConsentStatus, RecordId, RecordKind, Redacted, Referral};
use carebridge::intake::{self, Intake};
use carebridge::mapping::Mappings;
use carebridge::outbox::Worker;
use carebridge::partners::{PartnerSettings, Partners};
use carebridge::store::{self, Actor, Change, DeliveryFilter, DeliveryRow, Precondition, Store};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::macros::datetime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::helpers::test_settings;

/// What the fake partner does with one request.
#[derive(Debug, Clone)]
enum Act {
    /// Answers this status, with these headers and this body.
    Answer(u16, Vec<(&'static str, String)>, Value),
    /// Waits this long, then answers as a healthy server would.
    Stall(Duration),
    /// Closes the connection without a word.
    Drop,
}

/// One request the fake received.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Value,
    /// When its head arrived.
    at: std::time::Instant,
}

#[derive(Default)]
struct Script {
    acts: VecDeque<Act>,
    seen: Vec<Seen>,
    next_id: u64,
    /// The CapabilityStatement `GET /fhir/metadata` answers, when set.
    metadata: Option<Value>,
}

/// A partner FHIR server on a real socket: plays its script, then answers like a healthy server (201 with a
/// `Location` for single requests, a transaction-response for transactions).
struct FakePartner {
    base: String,
    script: Arc<Mutex<Script>>,
}

impl FakePartner {
    async fn start() -> FakePartner {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}/fhir", listener.local_addr().expect("addr"));
        let script = Arc::new(Mutex::new(Script::default()));
        let shared = script.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else { return };
                let script = shared.clone();
                tokio::spawn(async move {
                    let Some(seen) = read_request(&mut socket).await else { return };
                    let act = {
                        let mut s = script.lock().expect("script");
                        s.seen.push(seen.clone());
                        s.acts.pop_front()
                    };
                    let (status, headers, body) = match act {
                        Some(Act::Drop) => return,
                        Some(Act::Answer(status, headers, body)) => (status, headers, body),
                        Some(Act::Stall(d)) => {
                            tokio::time::sleep(d).await;
                            healthy(&seen, &script)
                        }
                        None => healthy(&seen, &script),
                    };
                    let text = body.to_string();
                    let mut head = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/fhir+json\r\ncontent-length: {}\r\n\
                         connection: close\r\n",
                        text.len()
                    );
                    for (k, v) in headers {
                        head.push_str(&format!("{k}: {v}\r\n"));
                    }
                    head.push_str("\r\n");
                    let _ = socket.write_all(head.as_bytes()).await;
                    let _ = socket.write_all(text.as_bytes()).await;
                    let _ = socket.shutdown().await;
                });
            }
        });
        FakePartner { base, script }
    }

    fn play(&self, acts: impl IntoIterator<Item = Act>) {
        self.script.lock().expect("script").acts.extend(acts);
    }

    /// What `GET /fhir/metadata` answers from now on.
    fn declare(&self, statement: Value) {
        self.script.lock().expect("script").metadata = Some(statement);
    }

    /// Forgets the acts not played yet: healthy answers from now on.
    fn heal(&self) {
        self.script.lock().expect("script").acts.clear();
    }

    fn seen(&self) -> Vec<Seen> {
        self.script.lock().expect("script").seen.clone()
    }
}

/// What a healthy server answers to `seen`.
fn healthy(seen: &Seen, script: &Mutex<Script>) -> (u16, Vec<(&'static str, String)>, Value) {
    let mut s = script.lock().expect("script");
    let mut next = || {
        s.next_id += 1;
        s.next_id
    };
    if seen.method == "GET" && seen.path == "/fhir/metadata" {
        return match s.metadata.clone() {
            Some(statement) => (200, vec![], statement),
            None => (404, vec![], json!({"resourceType": "OperationOutcome", "issue": []})),
        };
    }
    if seen.method == "POST" && seen.path == "/fhir" {
        let entries: Vec<Value> = seen.body["entry"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|e| {
                let url = e["request"]["url"].as_str().unwrap_or_default();
                let ty = url.split(['?', '/']).next().unwrap_or_default();
                let id = match url.split_once('/') {
                    Some((_, id)) if !url.contains('?') => id.to_owned(),
                    _ => format!("p{}", next()),
                };
                json!({"response": {"status": "201 Created", "location": format!("{ty}/{id}/_history/1"), "etag": "W/\"1\""}})
            })
            .collect();
        return (200, vec![], json!({"resourceType": "Bundle", "type": "transaction-response", "entry": entries}));
    }
    let path = seen.path.trim_start_matches("/fhir/");
    let ty = path.split(['?', '/']).next().unwrap_or_default().to_owned();
    let id = match path.split_once('/') {
        Some((_, id)) if !path.contains('?') => id.to_owned(),
        _ => format!("p{}", next()),
    };
    let mut resource = seen.body.clone();
    resource["id"] = json!(id);
    (201, vec![("location", format!("{}/{ty}/{id}/_history/1", "http://partner.example/fhir"))], resource)
}

async fn read_request(socket: &mut tokio::net::TcpStream) -> Option<Seen> {
    let at = std::time::Instant::now();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, path) = (first.next()?.to_owned(), first.next()?.to_owned());
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize =
        headers.iter().find(|(k, _)| k == "content-length").and_then(|(_, v)| v.parse().ok()).unwrap_or(0);
    while buf.len() < head_end + length {
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = serde_json::from_slice(&buf[head_end..]).unwrap_or(Value::Null);
    Some(Seen { method, path: percent_decode(&path), headers, body, at })
}

fn percent_decode(s: &str) -> String {
    s.replace("%7C", "|").replace("%7c", "|").replace("%3A", ":").replace("%2F", "/")
}

struct World {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    partners: Partners,
    worker: Worker,
    fake: FakePartner,
}

fn outbox_settings() -> OutboxSettings {
    let mut s = test_settings(Path::new("/nonexistent")).outbox;
    s.timeout_secs = 1;
    s.retry_schedule_secs = vec![10, 60, 300];
    s.retry_after_max_secs = 120;
    s
}

/// A store, one partner `st-marys-ehr` (the base mappings) at a fake server, and a worker.
async fn world(max_transaction_entries: u32, receives: &[&str]) -> World {
    world_with(max_transaction_entries, receives, outbox_settings()).await
}

async fn world_with(max_transaction_entries: u32, receives: &[&str], settings: OutboxSettings) -> World {
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = FakePartner::start().await;
    let partner: PartnerSettings = serde_json::from_value(json!({
        "name": "st-marys-ehr", "base_url": fake.base, "receives": receives,
        "max_transaction_entries": max_transaction_entries}))
    .expect("partner");
    let partners = Partners::new(&[partner]);
    let url = format!("sqlite:{}", dir.path().join("carebridge.db").display());
    let store = store::connect(&url, 4, Duration::from_secs(5)).await.expect("store");
    let mappings = Arc::new(Mappings::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings")).expect("mappings"));
    let worker = Worker::new(store.clone(), mappings, &partners, &settings).expect("worker");
    World { _dir: dir, store, partners, worker, fake }
}

const T0: OffsetDateTime = datetime!(2026-12-01 09:00:00 UTC);

fn fixture<T: serde::de::DeserializeOwned>(path: &str) -> T {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/agency").join(path))
        .expect("fixture");
    serde_json::from_str(&text).expect("fixture parses")
}

impl World {
    async fn put<T: AgencyRecord>(&self, id: &str, record: T) {
        intake::put(
            Intake { store: &*self.store, partners: &self.partners },
            RecordId::parse(id).expect("id"),
            record,
            Precondition::None,
            &Actor { key_name: "test".into(), request_id: "req".into(), partner: None },
            Change::Put,
            T0,
        )
        .await
        .expect("saved");
    }

    /// Records the client's consent to share general and mental-health data with the partner for treatment: the
    /// grounds every delivery of the client's records needs (a partner nothing names receives nothing).
    async fn consent_for(&self, client: &str) {
        let mut consent: Consent = fixture("consent/co-5001.json");
        consent.id = None;
        consent.client_id = RecordId::parse(client).expect("id");
        self.put(&format!("co-{client}"), consent).await;
    }

    async fn rows(&self, kind: RecordKind, id: &str) -> Vec<DeliveryRow> {
        let filter = DeliveryFilter {
            record: Some((kind, RecordId::parse(id).expect("id"))),
            limit: 100,
            ..DeliveryFilter::default()
        };
        self.store.list_deliveries(&filter).await.expect("rows")
    }

    async fn only_row(&self, kind: RecordKind, id: &str) -> DeliveryRow {
        let mut rows = self.rows(kind, id).await;
        assert_eq!(rows.len(), 1, "{rows:?}");
        rows.remove(0)
    }
}

#[tokio::test]
async fn failures_retry_on_the_schedule_honour_retry_after_and_end_delivered() {
    let w = world(0, &["client"]).await;
    w.put("cl-1001", fixture::<Client>("client/cl-1001.json")).await;
    w.consent_for("cl-1001").await;
    w.fake.play([
        Act::Answer(503, vec![], json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "transient", "diagnostics": "down for maintenance"}]})),
        Act::Answer(429, vec![("retry-after", "7".into())], json!({})),
        Act::Stall(Duration::from_millis(1500)),
        Act::Drop,
    ]);
    let r = w.worker.run_once(T0).await.expect("pass");
    assert_eq!((r.claimed, r.retried), (1, 1));
    let row = w.only_row(RecordKind::Client, "cl-1001").await;
    assert_eq!(row.state, "pending");
    let wait = row.not_before - T0;
    assert!(wait >= time::Duration::seconds(8) && wait <= time::Duration::seconds(12), "{wait}");
    assert!(row.detail.as_deref().is_some_and(|d| d.contains("HTTP 503: down for maintenance")), "{row:?}");
    // Not due yet: nothing is claimed, nothing is sent.
    assert_eq!(w.worker.run_once(T0 + Duration::from_secs(5)).await.expect("pass").claimed, 0);
    assert_eq!(w.fake.seen().len(), 1);
    // The 429 says 7 s: believed over the schedule's 60 s.
    let t1 = T0 + Duration::from_secs(13);
    assert_eq!(w.worker.run_once(t1).await.expect("pass").retried, 1);
    let row = w.only_row(RecordKind::Client, "cl-1001").await;
    assert_eq!(row.not_before - t1, time::Duration::seconds(7));
    // A stall past the timeout, then a dropped connection: both retried, named.
    let t2 = t1 + Duration::from_secs(7);
    assert_eq!(w.worker.run_once(t2).await.expect("pass").retried, 1);
    let row = w.only_row(RecordKind::Client, "cl-1001").await;
    assert!(row.detail.as_deref().is_some_and(|d| d.contains("timed out after 1 s")), "{row:?}");
    let t3 = t2 + Duration::from_secs(400);
    let r = w.worker.run_once(t3).await.expect("pass");
    assert_eq!(r.retried + r.dead, 1, "{r:?}");
    // The schedule (10, 60, 300 s) is spent after four attempts: dead, not retried for ever.
    let row = w.only_row(RecordKind::Client, "cl-1001").await;
    assert_eq!(row.state, "dead", "{row:?}");
    assert!(row.detail.as_deref().is_some_and(|d| d.contains("out of retries after 4 attempts")), "{row:?}");
    // Three attempts in a row got no answer: the partner's circuit is open, and the next probe goes 15 s after the
    // last. An operator replays the row meanwhile; it waits for that probe; the partner is back: delivered, with
    // every attempt on record.
    w.store.replay_delivery(row.seq, &operator(), t3).await.expect("replay");
    assert_eq!(w.worker.run_once(t3).await.expect("pass").claimed, 0, "the circuit is open");
    let r = w.worker.run_once(t3 + Duration::from_secs(15)).await.expect("pass");
    assert_eq!(r.delivered, 1, "{r:?}");
    let (row, attempts) = w.store.delivery(row.seq).await.expect("read").expect("row");
    assert_eq!(row.state, "delivered");
    let outcomes: Vec<(&str, Option<i64>)> = attempts.iter().map(|a| (a.outcome.as_str(), a.status)).collect();
    assert_eq!(
        outcomes,
        [("retry", Some(503)), ("retry", Some(429)), ("retry", None), ("dead", None), ("delivered", Some(201))]
    );
    // Every request was a conditional create on the client's business identifier.
    for s in w.fake.seen() {
        assert_eq!((s.method.as_str(), s.path.as_str()), ("POST", "/fhir/Patient"));
        let cond = s.headers.iter().find(|(k, _)| k == "if-none-exist").map(|(_, v)| v.as_str());
        assert_eq!(cond, Some("identifier=https://agency.example.org/fhir/sid/client|cl-1001"));
    }
}

#[tokio::test]
async fn a_slow_delivery_holds_up_no_other() {
    // Two in flight, four per claim: the partner stalls the first request for 1.5 s. The worker keeps the other
    // slot busy meanwhile, claiming more as it goes, instead of waiting for its batch's slowest delivery.
    let mut settings = outbox_settings();
    settings.batch = 4;
    settings.concurrency = 2;
    settings.timeout_secs = 5;
    let w = world_with(0, &["client"], settings).await;
    for i in 0..10 {
        let id = format!("cl-{}", 2000 + i);
        let mut client: Value = fixture("client/cl-1001.json");
        client["id"] = json!(id);
        w.put(&id, serde_json::from_value::<Client>(client).expect("client")).await;
        w.consent_for(&id).await;
    }
    w.fake.play([Act::Stall(Duration::from_millis(1500))]);
    let r = w.worker.run_until_idle(OffsetDateTime::now_utc).await.expect("passes");
    assert_eq!((r.claimed, r.delivered), (10, 10), "{r:?}");
    let seen = w.fake.seen();
    let first = seen.iter().map(|s| s.at).min().expect("requests");
    let during_the_stall = seen.iter().filter(|s| s.at < first + Duration::from_millis(1200)).count();
    assert_eq!(during_the_stall, 10, "only {during_the_stall} of 10 requests went while one stalled");
    for i in 0..10 {
        assert_eq!(w.only_row(RecordKind::Client, &format!("cl-{}", 2000 + i)).await.state, "delivered");
    }
}

#[tokio::test]
async fn a_refusal_is_dead_at_once_with_the_partners_operation_outcome() {
    let w = world(0, &["client"]).await;
    w.put("cl-1001", fixture::<Client>("client/cl-1001.json")).await;
    w.consent_for("cl-1001").await;
    let outcome = json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid",
        "diagnostics": "Missing required property", "expression": ["Patient.name"]}]});
    w.fake.play([Act::Answer(400, vec![], outcome.clone())]);
    let r = w.worker.run_once(T0).await.expect("pass");
    assert_eq!(r.dead, 1, "{r:?}");
    let row = w.only_row(RecordKind::Client, "cl-1001").await;
    assert_eq!(row.state, "dead");
    assert!(row.detail.as_deref().is_some_and(|d| d.contains("Missing required property (at Patient.name)")));
    let (_, attempts) = w.store.delivery(row.seq).await.expect("read").expect("row");
    let kept: Value = serde_json::from_str(attempts[0].operation_outcome.as_deref().expect("kept")).expect("json");
    assert_eq!(kept, outcome);
    // Never tried again on its own, however late it gets.
    assert_eq!(w.worker.run_once(T0 + Duration::from_secs(86_400)).await.expect("pass").claimed, 0);
    assert_eq!(w.fake.seen().len(), 1);
}

#[tokio::test]
async fn versions_written_before_a_delivery_go_as_one_the_newest() {
    let w = world(0, &["client"]).await;
    let mut client: Client = fixture("client/cl-1001.json");
    for phone in ["+1-503-555-0101", "+1-503-555-0102", "+1-503-555-0103"] {
        client.phone = Some(Redacted(phone.into()));
        w.put("cl-1001", client.clone()).await;
    }
    w.consent_for("cl-1001").await;
    let r = w.worker.run_once(T0).await.expect("pass");
    assert_eq!((r.claimed, r.delivered), (1, 1), "{r:?}");
    let states: Vec<(i64, String)> =
        w.rows(RecordKind::Client, "cl-1001").await.into_iter().map(|r| (r.version, r.state)).collect();
    let expected: Vec<(i64, String)> =
        vec![(1, "superseded".into()), (2, "superseded".into()), (3, "delivered".into())];
    assert_eq!(states, expected);
    let seen = w.fake.seen();
    assert_eq!(seen.len(), 1);
    let phone = seen[0].body["telecom"].as_array().expect("telecom").iter().find(|t| t["system"] == "phone").cloned();
    assert_eq!(phone.expect("phone")["value"], "+1-503-555-0103");
    // A superseded version cannot be replayed over the newer one.
    let v1 = w.rows(RecordKind::Client, "cl-1001").await.remove(0);
    let (after, changed) = w.store.replay_delivery(v1.seq, &operator(), T0).await.expect("replay").expect("row");
    assert_eq!(after.state, "superseded");
    assert!(!changed);
}

#[tokio::test]
async fn a_referral_waits_for_its_client_and_is_held_while_its_consent_withholds_it() {
    let w = world(8, &["client", "referral", "consent"]).await;
    w.put("cl-1001", fixture::<Client>("client/cl-1001.json")).await;
    let mut consent: Consent = fixture("consent/co-5001.json");
    w.put("co-5001", consent.clone()).await;
    let mut referral: Referral = fixture("referral/ref-4001.json");
    w.put("ref-4001", referral.clone()).await;
    // The client's delivery fails: its consent and referral wait behind it.
    w.fake.play([Act::Answer(503, vec![], json!({}))]);
    let r = w.worker.run_once(T0).await.expect("pass");
    assert_eq!((r.claimed, r.retried), (1, 1), "{r:?}");
    assert_eq!(w.only_row(RecordKind::Referral, "ref-4001").await.attempts, 0);
    let t1 = T0 + Duration::from_secs(20);
    let r = w.worker.run_once(t1).await.expect("pass");
    assert_eq!((r.claimed, r.delivered), (1, 1), "the client alone: {r:?}");
    let r = w.worker.run_until_idle(|| t1).await.expect("passes");
    assert_eq!((r.delivered, r.held), (2, 0), "then its consent and the referral: {r:?}");
    // The client revokes: the revocation reaches the partner (it holds the consent), and the referral's next
    // version is held, never sent.
    consent.status = ConsentStatus::Revoked;
    w.put("co-5001", consent.clone()).await;
    referral.reason = Some(Redacted("Prefers evening sessions".into()));
    w.put("ref-4001", referral.clone()).await;
    let r = w.worker.run_until_idle(|| t1).await.expect("passes");
    assert_eq!((r.delivered, r.held), (1, 1), "the revocation goes, the referral waits: {r:?}");
    let sent = w.fake.seen().len();
    let row = w.rows(RecordKind::Referral, "ref-4001").await.pop().expect("row");
    assert_eq!(row.state, "held");
    assert!(row.detail.as_deref().is_some_and(|d| d.contains("co-5001") && d.contains("was revoked")), "{row:?}");
    // Not due again before the recheck interval (300 s) while nothing changes.
    assert_eq!(w.worker.run_once(t1 + Duration::from_secs(10)).await.expect("pass").claimed, 0);
    assert_eq!(w.fake.seen().len(), sent, "a held referral is never sent");
    // The consent becomes active again: its write releases the referral at once, not after the recheck interval.
    consent.status = ConsentStatus::Active;
    w.put("co-5001", consent).await;
    let t2 = t1 + Duration::from_secs(10);
    let r = w.worker.run_until_idle(|| t2).await.expect("passes");
    assert_eq!(r.held, 0, "{r:?}");
    assert_eq!(w.rows(RecordKind::Referral, "ref-4001").await.pop().expect("row").state, "delivered");
    let last = w.fake.seen().pop().expect("a transaction");
    let types: Vec<&str> = last.body["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["resource"]["resourceType"].as_str())
        .collect();
    // Only what changed goes: the ServiceRequest with its new reason (the Task and the Patient the partner holds at
    // this content are not sent again; the Patient is referenced by the partner's id), and the transaction's
    // Provenance, whose target is that ServiceRequest as the partner knows it.
    assert_eq!(types, ["ServiceRequest", "Provenance"], "{types:?}");
    let entries = last.body["entry"].as_array().expect("entries");
    let provenance = &entries[1]["resource"];
    assert_eq!(entries[1]["request"]["method"], "POST");
    let target = provenance["target"][0]["reference"].as_str().expect("a target");
    let updated = entries[0]["request"]["url"].as_str().expect("url");
    assert_eq!(target, updated, "{provenance}");
    assert_eq!(provenance["agent"][0]["type"]["coding"][0]["code"], "author");
    assert_eq!(provenance["agent"][0]["who"]["identifier"]["value"], "riverside-cmh");
    assert_eq!(provenance["agent"][1]["type"]["coding"][0]["code"], "transmitter");
    let sr = last.body["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .find(|e| e["resource"]["resourceType"] == "ServiceRequest")
        .expect("sr");
    assert!(sr["resource"]["subject"]["reference"].as_str().is_some_and(|r| r.starts_with("Patient/p")), "{sr}");
    assert_eq!(sr["resource"]["reasonCode"][0]["text"], "Prefers evening sessions");
}

#[tokio::test]
async fn operators_list_read_replay_and_discard_deliveries_through_the_api() {
    let app = crate::helpers::spawn_app().await;
    app.load_fixtures().await;
    let page = app.get_json("/api/v1/deliveries?state=pending&partner=st-marys-ehr&limit=500").await;
    let items = page["items"].as_array().expect("items");
    assert!(!items.is_empty(), "{page}");
    assert!(items.iter().all(|d| d["state"] == "pending" && d["partner"] == "st-marys-ehr"), "{page}");
    let one = app.get_json("/api/v1/deliveries?record=referral/ref-4001").await;
    assert_eq!(one["items"].as_array().expect("items").len(), 1, "{one}");
    let id = one["items"][0]["id"].as_i64().expect("id");
    let read = app.get_json(&format!("/api/v1/deliveries/{id}")).await;
    assert_eq!((read["kind"].as_str(), read["record_id"].as_str()), (Some("referral"), Some("ref-4001")));
    assert_eq!(read["history"], json!([]));
    let discard = app.post(&format!("/api/v1/deliveries/{id}/discard"), &json!({})).await;
    assert_eq!(discard.status(), 200);
    assert_eq!(discard.json::<Value>().await.expect("json")["state"], "discarded");
    let again = app.post(&format!("/api/v1/deliveries/{id}/discard"), &json!({})).await;
    assert_eq!(again.status(), 409);
    let replay = app.post(&format!("/api/v1/deliveries/{id}/replay"), &json!({})).await;
    assert_eq!(replay.status(), 200);
    assert_eq!(replay.json::<Value>().await.expect("json")["state"], "pending");
    let replay_again = app.post(&format!("/api/v1/deliveries/{id}/replay"), &json!({})).await;
    assert_eq!(replay_again.status(), 409);
    for bad in ["state=lost", "record=letters/x", "limit=0"] {
        let r = app.get(&format!("/api/v1/deliveries?{bad}")).await;
        assert_eq!(r.status(), 400, "{bad}");
    }
    assert_eq!(app.get("/api/v1/deliveries/999999").await.status(), 404);
    // Operators only: a writer key may not read the queue.
    let writer = app
        .client
        .get(format!("{}/api/v1/deliveries", app.base))
        .bearer_auth(crate::helpers::WRITER_KEY)
        .send()
        .await
        .expect("sent");
    assert_eq!(writer.status(), 403);
}

#[tokio::test]
async fn a_partner_that_does_not_answer_costs_one_probe_at_a_time_and_its_return_makes_every_row_due() {
    let w = world(0, &["client"]).await;
    let mut clients = Vec::new();
    for n in 0..8 {
        let id = format!("cl-down-{n}");
        let mut client: Client = fixture("client/cl-1001.json");
        client.id = None;
        w.put(&id, client).await;
        w.consent_for(&id).await;
        clients.push(id);
    }
    // Down: every request dropped. The first pass opens the circuit after three attempts in a row got no answer;
    // concurrency takes a few more out at once, no more than that.
    w.fake.play(std::iter::repeat_n(Act::Drop, 40).collect::<Vec<_>>());
    let first = w.worker.run_once(T0).await.expect("pass");
    assert_eq!(first.retried, first.claimed, "{first:?}");
    let tried = w.fake.seen().len();
    // Until the probe is due nothing is claimed, however many rows are due (their retry step, 10 s, has passed).
    assert_eq!(w.worker.run_once(T0 + Duration::from_secs(12)).await.expect("pass").claimed, 0);
    assert_eq!(w.fake.seen().len(), tried);
    // Each probe is one row.
    for k in 1..=3u64 {
        let r = w.worker.run_once(T0 + Duration::from_secs(15 * k + 60)).await.expect("pass");
        assert_eq!((r.claimed, r.retried), (1, 1), "probe {k}: {r:?}");
    }
    assert_eq!(w.fake.seen().len(), tried + 3);
    // Back: the next probe is answered, the circuit closes and every row waiting for its retry (some of them for
    // five minutes) is due at once: the next pass delivers them all.
    w.fake.heal();
    let back = T0 + Duration::from_secs(15 * 4 + 60);
    let probe = w.worker.run_once(back).await.expect("pass");
    assert_eq!((probe.claimed, probe.delivered), (1, 1), "{probe:?}");
    let rest = w.worker.run_once(back).await.expect("pass");
    assert_eq!(rest.delivered, 8 - 1, "every other client row: {rest:?}");
    for id in &clients {
        assert_eq!(w.only_row(RecordKind::Client, id).await.state, "delivered");
    }
}

#[tokio::test]
async fn a_server_that_cannot_find_goals_by_identifier_gets_them_created_once_and_updated_by_id() {
    use carebridge::domain::{Assessment, CarePlan};
    let w = world(0, &["client", "care-plan"]).await;
    // Like a real server seen from outside: Goal lists its search parameters, and identifier is not one of them.
    w.fake.declare(json!({"resourceType": "CapabilityStatement", "status": "active", "kind": "instance",
    "fhirVersion": "4.0.1", "rest": [{"mode": "server", "interaction": [{"code": "transaction"}], "resource": [
        {"type": "Patient", "conditionalCreate": true, "conditionalUpdate": true},
        {"type": "Condition", "conditionalCreate": true, "conditionalUpdate": true},
        {"type": "Observation", "conditionalCreate": true, "conditionalUpdate": true},
        {"type": "CarePlan", "conditionalCreate": true, "conditionalUpdate": true},
        {"type": "ServiceRequest", "conditionalCreate": true, "conditionalUpdate": true},
        {"type": "Goal", "conditionalCreate": true, "conditionalUpdate": true,
         "searchParam": [{"name": "patient", "type": "reference"}, {"name": "lifecycle-status", "type": "token"}]}
    ]}]}));
    let read = w.worker.read_capabilities().await;
    assert!(matches!(&read[0].1, Ok(f) if f.iter().any(|l| l.starts_with("Goal: no identifier search"))), "{read:?}");
    w.put("cl-1001", fixture::<Client>("client/cl-1001.json")).await;
    w.consent_for("cl-1001").await;
    for a in ["as-2001", "as-2007"] {
        w.put(a, fixture::<Assessment>(&format!("assessment/{a}.json"))).await;
    }
    let mut plan: CarePlan = fixture("care-plan/cp-3001.json");
    w.put("cp-3001", plan.clone()).await;
    let r = w.worker.run_until_idle(|| T0).await.expect("pass");
    assert_eq!(r.dead, 0, "nothing dead: {r:?}");
    let goals: Vec<Seen> = w.fake.seen().into_iter().filter(|s| s.path.starts_with("/fhir/Goal")).collect();
    assert!(!goals.is_empty());
    // Each Goal is created once by a plain POST (its id kept), then only ever updated by that id: no request on a
    // Goal is conditional.
    let creates = goals.iter().filter(|g| g.method == "POST" && g.path == "/fhir/Goal").count();
    assert_eq!(
        creates,
        plan.goals.len(),
        "{:?}",
        goals.iter().map(|g| format!("{} {}", g.method, g.path)).collect::<Vec<_>>()
    );
    for g in &goals {
        assert!(!g.path.contains('?'), "no conditional update: {}", g.path);
        assert!(!g.headers.iter().any(|(k, _)| k == "if-none-exist"), "no conditional create: {:?}", g.headers);
    }
    // Every other resource still goes conditionally on its business identifier.
    assert!(w.fake.seen().iter().any(|s| s.path.starts_with("/fhir/CarePlan?identifier=")), "conditional update");
    // The next version updates each Goal by the id it was given, and creates none.
    let before = w.fake.seen().len();
    plan.goals[0].description = carebridge::domain::Redacted("Fewer depressive symptoms, revised".into());
    w.put("cp-3001", plan).await;
    let r = w.worker.run_until_idle(|| T0 + Duration::from_secs(1)).await.expect("pass");
    assert_eq!(r.dead, 0, "{r:?}");
    let again: Vec<Seen> =
        w.fake.seen()[before..].iter().filter(|s| s.path.starts_with("/fhir/Goal")).cloned().collect();
    assert!(
        !again.is_empty() && again.iter().all(|g| g.method == "PUT" && g.path.starts_with("/fhir/Goal/p")),
        "{:?}",
        again.iter().map(|g| format!("{} {}", g.method, g.path)).collect::<Vec<_>>()
    );
}

/// An operator acting on a delivery in a test.
fn operator() -> Actor {
    Actor { key_name: "test-operator".into(), request_id: "req-operator".into(), partner: None }
}

#[tokio::test]
async fn every_attempt_is_audited_with_the_partner_the_decision_its_consent_and_what_was_sent() {
    let w = world(0, &["client"]).await;
    // No consent yet: held, audited once however often it is looked at again.
    w.put("cl-1001", fixture::<Client>("client/cl-1001.json")).await;
    assert_eq!(w.worker.run_once(T0).await.expect("pass").held, 1);
    assert_eq!(w.worker.run_once(T0 + Duration::from_secs(3600)).await.expect("pass").held, 1);
    // Consented, the partner refuses once (the data reached it: audited with the status), then takes it.
    w.consent_for("cl-1001").await;
    let outcome = json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid",
        "diagnostics": "Missing required property"}]});
    w.fake.play([Act::Answer(400, vec![], outcome)]);
    assert_eq!(w.worker.run_once(T0 + Duration::from_secs(7200)).await.expect("pass").dead, 1);
    let row = w.only_row(RecordKind::Client, "cl-1001").await;
    w.store.replay_delivery(row.seq, &operator(), T0 + Duration::from_secs(7201)).await.expect("replay");
    assert_eq!(w.worker.run_once(T0 + Duration::from_secs(7202)).await.expect("pass").delivered, 1);

    let chain = w.store.audit_chain(0, 1000).await.expect("chain");
    let of = |action: &str| chain.iter().filter(|e| e.entry.action == action).collect::<Vec<_>>();
    let detail = |e: &carebridge::audit::Sealed| -> Value {
        serde_json::from_str(e.entry.detail.as_deref().expect("detail")).expect("json")
    };
    let held = of("delivery_held");
    assert_eq!(held.len(), 1, "a hold that only repeats itself is not audited again");
    assert_eq!(held[0].entry.actor, "outbox");
    assert_eq!(held[0].entry.client.as_deref(), Some("cl-1001"));
    let d = detail(held[0]);
    assert_eq!((d["partner"].as_str(), d["decision"].as_str()), (Some("st-marys-ehr"), Some("hold")));
    assert!(d["reason"].as_str().is_some_and(|r| !r.is_empty()), "{d}");

    let dead = of("delivery_dead");
    assert_eq!(dead.len(), 1);
    let d = detail(dead[0]);
    assert_eq!((d["status"].as_i64(), d["decision"].as_str()), (Some(400), Some("send")), "{d}");
    assert_eq!(d["consents"], json!(["co-cl-1001"]));
    assert_eq!(d["resources"], json!(["Patient/cl-1001"]));
    assert!(d["labels"].as_array().is_some_and(|l| !l.is_empty()), "what was sent carried its labels: {d}");
    assert!(
        !dead[0].entry.detail.as_deref().unwrap_or_default().contains("Missing required"),
        "never the partner's words"
    );

    assert_eq!(of("delivery_replayed")[0].entry.actor, "test-operator");
    let delivered = of("delivered");
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].entry.record_id.as_deref(), Some("cl-1001"));
    assert_eq!(detail(delivered[0])["delivery"], row.seq);
    // In the order it happened: the hold, the refusal, the replay, the delivery.
    let order: Vec<&str> = chain.iter().map(|e| e.entry.action.as_str()).filter(|a| a.starts_with("deliver")).collect();
    assert_eq!(order, ["delivery_held", "delivery_dead", "delivery_replayed", "delivered"]);
    assert!(carebridge::cli::verify_audit(&*w.store).await.expect("read").is_ok());
}
