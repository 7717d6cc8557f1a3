//! The closed loop against the real FHIR server of `../shared/interop`, playing the hospital that performs: the
//! gateway delivers an outbound referral there; the test moves the Task on that server as the hospital would
//! (accepted → in-progress → completed) and one sweep of the follow-up worker moves the agency referral each time;
//! agency edits in between leave the hospital's status as the hospital set it; a move the state machine does not
//! give the hospital is recorded, not applied; a sweep reads only what changed.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use carebridge::domain::{AgencyRecord, Client, Party, RecordId, Referral, StatusChange};
use carebridge::followup::poll::{Poller, SweepReport};
use carebridge::intake::{self, Intake};
use carebridge::mapping::Mappings;
use carebridge::outbox::Worker;
use carebridge::partners::{PartnerSettings, Partners};
use carebridge::store::{self, Actor, Change, Precondition, Store};
use reqwest::Method;
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::fhir_peer::{Peer, summary};
use crate::helpers::{fixture, test_settings};

const HOSPITAL: &str = "hospital";

struct World {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    partners: Arc<Partners>,
    worker: Worker,
    poller: Poller,
    peer: Peer,
}

async fn world() -> World {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = test_settings(dir.path());
    let peer = Peer::start(&[]);
    let p: PartnerSettings = serde_json::from_value(json!({
        "name": HOSPITAL, "base_url": peer.base, "receives": ["client", "referral"], "max_transaction_entries": 8}))
    .expect("partner");
    settings.partners = vec![p];
    settings.outbox.timeout_secs = 5;
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let store = store::connect(&settings.database.url, 4, Duration::from_secs(5)).await.expect("store");
    let partners = Arc::new(Partners::new(&settings.partners));
    let mappings = Arc::new(Mappings::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings")).expect("mappings"));
    let worker = Worker::new(store.clone(), mappings.clone(), &partners, &settings.outbox).expect("worker");
    let poller = Poller::new(store.clone(), mappings, partners.clone(), Duration::from_secs(5)).expect("poller");
    World { _dir: dir, store, partners, worker, poller, peer }
}

fn agency() -> Actor {
    Actor { key_name: "loop-test".into(), request_id: "req-loop".into(), partner: None }
}

impl World {
    async fn put<T: AgencyRecord>(&self, id: &str, record: Value) {
        let record: T = serde_json::from_value(record).expect("a valid record");
        intake::put(
            Intake { store: &*self.store, partners: &self.partners },
            RecordId::parse(id).expect("id"),
            record,
            Precondition::None,
            &agency(),
            Change::Put,
            OffsetDateTime::now_utc(),
        )
        .await
        .unwrap_or_else(|e| panic!("{id} kept: {e:?}"));
    }

    async fn deliver(&self) {
        let report = self.worker.run_until_idle(OffsetDateTime::now_utc).await.expect("a pass");
        let rows = self
            .store
            .list_deliveries(&carebridge::store::DeliveryFilter { limit: 100, ..Default::default() })
            .await
            .expect("rows");
        let states: Vec<String> =
            rows.iter().map(|r| format!("{} {} v{} {:?} {:?}", r.kind, r.id, r.version, r.state, r.detail)).collect();
        assert_eq!(report.dead, 0, "{report:?} {states:?}");
        assert!(report.delivered > 0, "{report:?} {states:?}");
    }

    async fn sweep(&self) -> SweepReport {
        let mut all = self.poller.sweep_all(OffsetDateTime::now_utc()).await.expect("a sweep");
        assert_eq!(all.len(), 1);
        let (partner, report) = all.remove(0);
        assert_eq!(partner, HOSPITAL);
        assert!(report.failed.is_none(), "{report:?}");
        report
    }

    async fn referral(&self) -> Value {
        let stored = self
            .store
            .get_record(carebridge::domain::RecordKind::Referral, &RecordId::parse("ref-4001").expect("id"))
            .await
            .expect("read")
            .expect("kept");
        serde_json::from_str(&stored.body).expect("JSON")
    }

    /// The one Task on the hospital's server.
    async fn task(&self) -> Value {
        let tasks = self.peer.all("Task").await;
        let rows = self
            .store
            .list_deliveries(&carebridge::store::DeliveryFilter { limit: 100, ..Default::default() })
            .await
            .expect("rows");
        let states: Vec<String> =
            rows.iter().map(|r| format!("{} {} v{} {:?} {:?}", r.kind, r.id, r.version, r.state, r.detail)).collect();
        assert_eq!(tasks.len(), 1, "{tasks:?} {states:?} {:?}", summary(&self.peer.requests().await));
        tasks[0].clone()
    }

    /// The hospital moves its Task on its own server.
    async fn hospital_sets(&self, status: &str, reason: Option<&str>) {
        let mut task = self.task().await;
        task["status"] = json!(status);
        task["businessStatus"] = json!({"text": format!("hospital says {status}")});
        match reason {
            Some(r) => task["statusReason"] = json!({"text": r}),
            None => {
                task.as_object_mut().expect("object").remove("statusReason");
            }
        }
        let id = task["id"].as_str().expect("id").to_owned();
        let (code, answer) = self.peer.send(Method::PUT, &format!("Task/{id}"), Some(&task)).await;
        assert_eq!(code, 200, "{answer}");
    }

    /// The client, her consent to share mental-health data with the hospital, and the referral there, delivered.
    async fn refer(&self) {
        self.put::<Client>("cl-1001", fixture("client", "cl-1001")).await;
        let mut consent = fixture("consent", "co-5001");
        consent["partner"] = json!(HOSPITAL);
        self.put::<carebridge::domain::Consent>("co-5001", consent).await;
        let mut referral = fixture("referral", "ref-4001");
        referral["target"]["partner"] = json!(HOSPITAL);
        self.put::<Referral>("ref-4001", referral).await;
        self.deliver().await;
    }

    async fn agency_edits(&self, reason: &str) {
        let mut referral = self.referral().await;
        referral["reason"] = json!(reason);
        self.put::<Referral>("ref-4001", referral).await;
        self.deliver().await;
    }
}

#[tokio::test]
async fn the_hospital_performs_on_its_own_server_and_the_agency_referral_follows_within_one_sweep() {
    let w = world().await;
    w.refer().await;
    assert_eq!(w.task().await["status"], "requested", "the agency requests; it never says accepted for the hospital");

    // Nothing changed there yet: a sweep reads the gateway's own Task and applies nothing.
    let quiet = w.sweep().await;
    assert_eq!((quiet.changed, quiet.applied), (0, 0), "{quiet:?}");

    // The hospital accepts; before the gateway has swept, the case manager edits the referral: the edit reaches
    // the hospital's Task without undoing its acceptance.
    w.hospital_sets("accepted", None).await;
    w.agency_edits("Prefers morning appointments").await;
    let task = w.task().await;
    assert_eq!(task["status"], "accepted", "the hospital's status stands: {task}");
    assert_eq!(task["businessStatus"]["text"], "hospital says accepted", "its own field stands");
    let sweep = w.sweep().await;
    assert_eq!(sweep.applied, 1, "{sweep:?}");
    assert_eq!(w.referral().await["status"], "accepted");

    w.hospital_sets("in-progress", None).await;
    assert_eq!(w.sweep().await.applied, 1);
    assert_eq!(w.referral().await["status"], "in_progress");
    w.agency_edits("Prefers afternoon appointments now").await;
    assert_eq!(w.task().await["status"], "in-progress", "an agency edit leaves the hospital's status");
    assert_eq!(w.sweep().await.applied, 0, "the agency's own write is not the hospital's move");

    let mut task = w.task().await;
    task["status"] = json!("completed");
    task["output"] = json!([{"type": {"text": "outcome"}, "valueString": "Eight sessions; goals met"}]);
    let id = task["id"].as_str().expect("id").to_owned();
    assert_eq!(w.peer.send(Method::PUT, &format!("Task/{id}"), Some(&task)).await.0, 200);
    assert_eq!(w.sweep().await.applied, 1);
    let done = w.referral().await;
    assert_eq!(done["status"], "completed");
    assert_eq!(done["outcome"], "Eight sessions; goals met", "the hospital's outcome is kept: {done}");
    assert!(done["closed_at"].is_string(), "the end is recorded: {done}");

    // A sweep with nothing new reads nothing new.
    let again = w.sweep().await;
    assert_eq!((again.changed, again.applied), (0, 0), "{again:?}");

    // The hospital cannot take a completed referral back: recorded in the audit log, not applied.
    w.hospital_sets("requested", None).await;
    let refused = w.sweep().await;
    assert_eq!((refused.changed, refused.refused, refused.applied), (1, 1, 0), "{refused:?}");
    assert_eq!(w.referral().await["status"], "completed");
    let audit = w.store.audit_chain(0, 1000).await.expect("audit");
    assert!(
        audit
            .iter()
            .any(|e| e.entry.action == "partner_move_refused" && e.entry.record_id.as_deref() == Some("ref-4001")),
        "{audit:?}"
    );

    // The history says who moved the referral: the agency created it, the hospital moved it three times.
    let history = w
        .store
        .history(carebridge::domain::RecordKind::Referral, &RecordId::parse("ref-4001").expect("id"))
        .await
        .expect("history");
    let by_hospital: Vec<&str> =
        history.iter().filter(|v| v.partner.as_deref() == Some(HOSPITAL)).map(|v| v.change.as_str()).collect();
    assert_eq!(by_hospital, ["status_changed"; 3]);

    // Each sweep was one search of Tasks by _lastUpdated, never a read per referral.
    let log = w.peer.requests().await;
    let searches: Vec<&Value> = log
        .iter()
        .filter(|r| r["method"] == "GET" && r["url"].as_str().is_some_and(|u| u.contains("/Task?_lastUpdated=ge")))
        .collect();
    assert_eq!(searches.len(), 7, "one search a sweep: {:?}", summary(&log));
    let reads_by_id =
        log.iter().filter(|r| r["method"] == "GET" && r["url"].as_str().is_some_and(|u| u.contains("/Task/"))).count();
    assert!(reads_by_id <= 2, "only an update of the shared Task reads it first: {:?}", summary(&log));
}

#[tokio::test]
async fn the_agency_may_still_cancel_what_the_hospital_accepted_and_the_cancel_reaches_it() {
    let w = world().await;
    w.refer().await;
    w.hospital_sets("accepted", None).await;
    assert_eq!(w.sweep().await.applied, 1);
    let intake = Intake { store: &*w.store, partners: &w.partners };
    let change: StatusChange =
        serde_json::from_value(json!({"status": "cancelled", "reason": "the client moved away"})).expect("change");
    intake::change_referral_status(
        intake,
        &RecordId::parse("ref-4001").expect("id"),
        &change,
        Party::Agency,
        Precondition::None,
        &agency(),
        OffsetDateTime::now_utc(),
    )
    .await
    .expect("the requester may cancel");
    w.deliver().await;
    let task = w.task().await;
    assert_eq!(task["status"], "cancelled", "{task}");
    assert_eq!(task["statusReason"]["text"], "the client moved away");
    assert_eq!(task["businessStatus"]["text"], "hospital says accepted", "the hospital's field stands");
    assert_eq!(w.sweep().await.applied, 0, "the gateway's own cancel is not news");
}
