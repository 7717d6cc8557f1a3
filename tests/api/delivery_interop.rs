//! Delivery to the real FHIR server of `../shared/interop` (one peer per fixture partner): every fixture record is
//! delivered; then, with faults injected (`before` 503, `drop`, `after` and `drop-after`: committed but the answer
//! lost, `delay` past the timeout, and a 412 from a resource changed behind the gateway's back), records change and
//! go again. Afterwards each server holds exactly one resource per business identifier, at the latest content; every
//! reference on it resolves (each is read back); every resource passes the three validators of `validate.sh`; and
//! sending the same content again sends nothing.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use carebridge::domain::{CarePlan, RecordId, RecordKind, Redacted};
use carebridge::intake::{self, Intake};
use carebridge::mapping::Mappings;
use carebridge::outbox::{RunReport, Worker};
use carebridge::partners::Partners;
use carebridge::store::{self, Actor, Change, DeliveryFilter, Precondition, Store};
use serde_json::Value;
use time::OffsetDateTime;

use crate::fhir_peer::{Peer, interop, summary};
use crate::helpers::test_settings;

/// The FHIR types the mappings emit.
const TYPES: [&str; 9] =
    ["Patient", "Observation", "Condition", "Goal", "CarePlan", "ServiceRequest", "Task", "Consent", "Flag"];

struct World {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    partners: Partners,
    worker: Worker,
    peers: BTreeMap<String, Peer>,
}

async fn world() -> World {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = test_settings(dir.path());
    let mut peers = BTreeMap::new();
    for p in &mut settings.partners {
        let peer = Peer::start(&[]);
        p.base_url = peer.base.clone();
        peers.insert(p.name.clone(), peer);
    }
    settings.outbox.timeout_secs = 2;
    settings.outbox.lease_secs = 30;
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let store = store::connect(&settings.database.url, 4, Duration::from_secs(5)).await.expect("store");
    let partners = Partners::new(&settings.partners);
    let now = OffsetDateTime::now_utc();
    let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/agency");
    intake::seed(&*store, &partners, &seed, now).await.expect("seed");
    let mappings = Arc::new(Mappings::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings")).expect("mappings"));
    let worker = Worker::new(store.clone(), mappings, &partners, &settings.outbox).expect("worker");
    World { _dir: dir, store, partners, worker, peers }
}

impl World {
    /// Passes at `now`, `now + 1 h`, … until one claims nothing but held rows: every retry comes due.
    async fn drain(&self) -> RunReport {
        let mut total = RunReport::default();
        let mut at = OffsetDateTime::now_utc();
        for _ in 0..20 {
            let r = self.worker.run_once(at).await.expect("a pass");
            if r.claimed == r.held {
                return total;
            }
            total.claimed += r.claimed;
            total.delivered += r.delivered;
            total.retried += r.retried;
            total.held += r.held;
            total.dead += r.dead;
            at += Duration::from_secs(3600);
        }
        panic!("the queue did not drain in 20 passes: {total:?}");
    }

    /// Every row not delivered (nor superseded), with its last words, for failure messages.
    async fn not_delivered(&self) -> Vec<String> {
        let rows = self.store.list_deliveries(&DeliveryFilter { limit: 10_000, ..DeliveryFilter::default() }).await;
        let rows = rows.expect("rows");
        let mut out = Vec::new();
        for r in rows.iter().filter(|r| !matches!(r.state.as_str(), "delivered" | "superseded" | "held")) {
            out.push(format!(
                "{} {} {}/{} v{}: {}",
                r.state,
                r.partner,
                r.kind.as_str(),
                r.id,
                r.version,
                r.detail.as_deref().unwrap_or("")
            ));
        }
        out
    }

    async fn assert_all_delivered(&self, step: &str) {
        let left = self.not_delivered().await;
        assert!(left.is_empty(), "{step}: not delivered:\n{}", left.join("\n"));
    }
}

/// `system|value` of a resource's first identifier.
fn business_id(r: &Value) -> Option<String> {
    let id = r.get("identifier")?;
    let id = if id.is_array() { id.get(0)? } else { id };
    Some(format!("{}|{}", id.get("system")?.as_str()?, id.get("value")?.as_str()?))
}

fn references(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("reference", Value::String(r)) => out.push(r.clone()),
                    _ => references(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| references(x, out)),
        _ => {}
    }
}

/// What a peer holds, checked: one resource per business identifier, every reference resolving. Returns the
/// resources by business identifier.
pub(crate) async fn check_peer(name: &str, peer: &Peer, step: &str) -> HashMap<String, Value> {
    let mut by_id: HashMap<String, Value> = HashMap::new();
    let mut all = Vec::new();
    for ty in TYPES {
        for r in peer.all(ty).await {
            let key = business_id(&r).unwrap_or_else(|| panic!("{step}: {name} holds a {ty} without an identifier"));
            assert!(
                by_id.insert(key.clone(), r.clone()).is_none(),
                "{step}: {name} holds two resources with identifier {key}"
            );
            all.push(r);
        }
    }
    let mut dangling = Vec::new();
    let mut checked = 0;
    for r in &all {
        let mut refs = Vec::new();
        references(r, &mut refs);
        for target in refs {
            let (status, found) = peer.send(reqwest::Method::GET, &target, None).await;
            checked += 1;
            if status != 200 || found.get("resourceType").is_none() {
                dangling.push(format!("{}/{} → {target} ({status})", r["resourceType"], r["id"]));
            }
        }
    }
    assert!(
        dangling.is_empty(),
        "{step}: {name}: {} of {checked} references dangle:\n{}",
        dangling.len(),
        dangling.join("\n")
    );
    by_id
}

/// Runs `validate.sh` on every resource the peers hold.
pub fn validate(resources: &[Value]) {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("delivered.json");
    std::fs::write(&file, serde_json::to_string(resources).expect("json")).expect("write");
    let out = std::process::Command::new(interop().join("validate.sh")).arg(&file).output().expect("validate.sh runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "validate.sh refused what the partners hold:\n{}\n{}",
        text.lines().filter(|l| !l.starts_with("OK")).collect::<Vec<_>>().join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn actor() -> Actor {
    Actor { key_name: "interop-test".into(), request_id: "req-interop".into(), partner: None }
}

async fn retitle_care_plan(w: &World, id: &str, title: &str) {
    let stored = w.store.get_record(RecordKind::CarePlan, &RecordId::parse(id).expect("id")).await.expect("read");
    let mut plan: CarePlan = serde_json::from_str(&stored.expect("care plan").body).expect("care plan");
    plan.title = Redacted(title.to_owned());
    intake::put(
        Intake { store: &*w.store, partners: &w.partners },
        RecordId::parse(id).expect("id"),
        plan,
        Precondition::None,
        &actor(),
        Change::Put,
        OffsetDateTime::now_utc(),
    )
    .await
    .expect("saved");
}

/// The CarePlan of `id` among what a peer holds.
fn care_plan<'a>(held: &'a HashMap<String, Value>, id: &str) -> &'a Value {
    held.values()
        .find(|r| r["resourceType"] == "CarePlan" && business_id(r).is_some_and(|b| b.ends_with(&format!("|{id}"))))
        .unwrap_or_else(|| panic!("no CarePlan {id}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fixture_reaches_a_real_fhir_server_once_with_references_that_resolve_through_faults() {
    let w = world().await;
    let first = w.drain().await;
    w.assert_all_delivered("first delivery").await;
    // cl-1001's seven records to St. Mary's, three each of cl-1002 to the crisis team and cl-1004 to Harbor.
    assert!(first.delivered >= 13, "{first:?}");
    let mut everything = Vec::new();
    for (name, peer) in &w.peers {
        let held = check_peer(name, peer, "first delivery").await;
        assert!(!held.is_empty(), "{name} got nothing");
        // Each partner holds only the client a consent or a referral names it for.
        let clients: Vec<String> = held
            .iter()
            .filter(|(_, r)| r["resourceType"] == "Patient")
            .map(|(id, _)| id.rsplit('|').next().unwrap_or_default().to_owned())
            .collect();
        let expected = match name.as_str() {
            "st-marys-ehr" => "cl-1001",
            "county-crisis-team" => "cl-1002",
            _ => "cl-1004",
        };
        assert_eq!(clients, [expected], "{name} holds these clients");
        for (id, r) in &held {
            let text = r.to_string();
            // No referral to a directory service reaches an EHR; the DAST-10 and the substance-use need go nowhere
            // but to the Part 2 program, which does not receive assessments or care plans.
            for never in ["ref-4004", "ref-4005", "ref-4007", "as-2005", "cl-1004.substance_use"] {
                assert!(!id.ends_with(&format!("|{never}")), "{name} holds {id}");
            }
            let security = r.pointer("/meta/security").and_then(Value::as_array).cloned().unwrap_or_default();
            assert!(
                security.iter().any(|c| c["system"] == "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"),
                "{name}: {id} carries no confidentiality label"
            );
            if name != "harbor-recovery-center" {
                assert!(
                    !text.contains("\"SUD\"") && !text.contains("42CFRPart2"),
                    "{name}: {id} carries a Part 2 label"
                );
            }
        }
        everything.extend(held.into_values());
        // Every transaction came with its Provenance: the agency as author, the gateway as transmitter, and targets
        // the partner resolved to what it holds.
        let provenances = peer.all("Provenance").await;
        assert!(!provenances.is_empty(), "{name} holds no Provenance");
        for p in &provenances {
            let targets = p["target"].as_array().expect("targets");
            assert!(!targets.is_empty(), "{p}");
            for t in targets {
                let reference = t["reference"].as_str().expect("a reference");
                assert!(!reference.starts_with("urn:"), "{name}: a target left unresolved: {p}");
                let (status, _) = peer.send(reqwest::Method::GET, reference, None).await;
                assert_eq!(status, 200, "{name}: Provenance target {reference} does not resolve");
            }
            assert_eq!(p["agent"][0]["who"]["identifier"]["value"], "riverside-cmh", "{p}");
        }
        everything.extend(provenances);
    }
    validate(&everything);

    // The same content again: nothing is sent.
    let stmarys = &w.peers["st-marys-ehr"];
    let before = stmarys.requests().await.len();
    let rows = w.store.list_deliveries(&DeliveryFilter { limit: 10_000, ..DeliveryFilter::default() }).await;
    for r in rows.expect("rows").iter().filter(|r| r.partner == "st-marys-ehr" && r.state == "delivered") {
        w.store.replay_delivery(r.seq, &actor(), OffsetDateTime::now_utc()).await.expect("replay");
    }
    let again = w.drain().await;
    assert_eq!(again.dead + again.retried, 0, "{again:?}");
    let after = stmarys.requests().await;
    let resent: Vec<String> = after[before..]
        .iter()
        .flat_map(|r| r["body"]["entry"].as_array().cloned().unwrap_or_default())
        .map(|e| format!("{} {}", e["request"]["method"], e["request"]["url"]))
        .collect();
    assert_eq!(after.len(), before, "identical content was sent again: {resent:?}");

    // Faults, one per change of a care plan's title: each change must land exactly once, at the latest content.
    let faults = [
        serde_json::json!({"mode": "before", "status": 503, "retryAfter": 1}),
        serde_json::json!({"mode": "drop"}),
        serde_json::json!({"mode": "after", "status": 504}),
        serde_json::json!({"mode": "drop-after"}),
        serde_json::json!({"mode": "delay", "delayMs": 2500}),
        serde_json::json!({"mode": "before", "status": 429, "retryAfter": 1}),
    ];
    for (i, fault) in faults.iter().enumerate() {
        let title = format!("Depression recovery plan, revision {i}");
        stmarys.fault(fault.clone()).await;
        retitle_care_plan(&w, "cp-3001", &title).await;
        let r = w.drain().await;
        assert!(r.retried >= 1, "fault {fault} did not make the delivery retry: {r:?}");
        w.assert_all_delivered(&format!("after fault {fault}")).await;
        let held = check_peer("st-marys-ehr", stmarys, &format!("after fault {fault}")).await;
        assert_eq!(care_plan(&held, "cp-3001")["title"], title.as_str(), "after fault {fault}");
    }

    // Changed behind the gateway's back: the next update meets a 412, reads again, and still lands once.
    let held = check_peer("st-marys-ehr", stmarys, "before the 412").await;
    let mut edited = care_plan(&held, "cp-3001").clone();
    edited["description"] = serde_json::json!("edited at the partner");
    let path = format!("CarePlan/{}", edited["id"].as_str().expect("id"));
    let (status, answer) = stmarys.send(reqwest::Method::PUT, &path, Some(&edited)).await;
    assert_eq!(status, 200, "{answer}");
    retitle_care_plan(&w, "cp-3001", "Depression recovery plan, final").await;
    let r = w.drain().await;
    assert_eq!(r.dead, 0, "{r:?}");
    w.assert_all_delivered("after the 412").await;
    let log = stmarys.requests().await;
    assert!(log.iter().any(|l| l["status"] == 412), "no 412 was met: {:?}", summary(&log));
    let mut everything = Vec::new();
    for (name, peer) in &w.peers {
        let held = check_peer(name, peer, "at the end").await;
        if name == "st-marys-ehr" {
            assert_eq!(care_plan(&held, "cp-3001")["title"], "Depression recovery plan, final");
        }
        everything.extend(held.into_values());
    }
    validate(&everything);
}
