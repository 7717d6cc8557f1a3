//! Consent-driven egress against the real FHIR server of `../shared/interop`: a matrix of clients, each with its own
//! consents (none; general only; mental health; substance use for one partner only; expired; revoked before the
//! send; revoked after a first send) and the same records (a PHQ-9, a DAST-10, a care plan with a depression, a
//! substance-use and a housing need, referrals), delivered through the real outbox to three partners, one per policy
//! profile. Each server is then read back: nothing of a client reaches a partner without grounds, nothing sensitive
//! without a consent covering it, everything consented arrives, no reference dangles, every resource carries a
//! confidentiality label and no sensitivity code reaches a partner that may not see it.
//!
//! Which resource is which is read from the data itself (identifier values and codes the test chose), never from
//! the labels under test.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use carebridge::domain::{AgencyRecord, Assessment, CarePlan, Client, Consent, RecordId, Referral};
use carebridge::intake::{self, Intake};
use carebridge::mapping::Mappings;
use carebridge::outbox::{RunReport, Worker};
use carebridge::partners::{PartnerSettings, Partners};
use carebridge::store::{self, Actor, Change, Precondition, Store};
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::delivery_interop::check_peer;
use crate::fhir_peer::{Peer, interop};
use crate::helpers::test_settings;

const HOSPITAL: &str = "hospital";
const PART2: &str = "recovery";
const SOCIAL: &str = "pantry";

struct World {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    partners: Partners,
    worker: Worker,
    peers: BTreeMap<&'static str, Peer>,
}

async fn world() -> World {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = test_settings(dir.path());
    let mut peers = BTreeMap::new();
    let mut partners = Vec::new();
    for (name, profile) in [(HOSPITAL, "treating-provider"), (PART2, "part2-program"), (SOCIAL, "social-services")] {
        let peer = Peer::start(&[]);
        let p: PartnerSettings = serde_json::from_value(json!({
            "name": name, "base_url": peer.base, "policy": profile,
            "receives": ["client", "assessment", "care-plan", "referral", "consent"], "max_transaction_entries": 8}))
        .expect("partner");
        partners.push(p);
        peers.insert(name, peer);
    }
    settings.partners = partners;
    settings.outbox.timeout_secs = 5;
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let store = store::connect(&settings.database.url, 4, Duration::from_secs(5)).await.expect("store");
    let partners = Partners::new(&settings.partners);
    let mappings = Arc::new(Mappings::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings")).expect("mappings"));
    let worker = Worker::new(store.clone(), mappings, &partners, &settings.outbox).expect("worker");
    World { _dir: dir, store, partners, worker, peers }
}

impl World {
    async fn put<T: AgencyRecord>(&self, id: &str, record: Value) {
        let record: T = serde_json::from_value(record).expect("a valid record");
        intake::put(
            Intake { store: &*self.store, partners: &self.partners },
            RecordId::parse(id).expect("id"),
            record,
            Precondition::None,
            &Actor { key_name: "egress-test".into(), request_id: "req".into(), partner: None },
            Change::Put,
            OffsetDateTime::now_utc(),
        )
        .await
        .unwrap_or_else(|e| panic!("{id} kept: {e:?}"));
    }

    /// Passes until nothing is claimed (held rows come due again after `hold_recheck_secs`: stepped past).
    async fn drain(&self) -> RunReport {
        let mut total = RunReport::default();
        let mut at = OffsetDateTime::now_utc();
        for _ in 0..6 {
            let r = self.worker.run_once(at).await.expect("a pass");
            total.claimed += r.claimed;
            total.delivered += r.delivered;
            total.held += r.held;
            total.dead += r.dead;
            total.retried += r.retried;
            if r.claimed == r.held {
                break;
            }
            at += Duration::from_secs(3600);
        }
        total
    }
}

fn client(s: &str) -> Value {
    json!({"identifiers": [], "given_name": "Ana", "family_name": format!("Matrix{s}"), "birth_date": "1990-04-01",
        "gender": "female"})
}

fn phq9(s: &str) -> Value {
    let items: Vec<Value> = (1..=9).map(|n| json!({"number": n, "score": 2})).collect();
    json!({"client_id": format!("cl-{s}"), "instrument": "phq9", "date": "2026-11-02", "items": items,
        "total_score": 18, "interpretation": "moderately_severe", "identified_needs": ["depression"]})
}

fn dast10(s: &str) -> Value {
    let items: Vec<Value> = (1..=10).map(|n| json!({"number": n, "score": u8::from(n <= 7)})).collect();
    json!({"client_id": format!("cl-{s}"), "instrument": "dast10", "date": "2026-11-02", "items": items,
        "total_score": 7, "interpretation": "substantial", "identified_needs": ["substance_use"]})
}

/// A plan with three needs: depression (from the PHQ-9), substance use (from the DAST-10), housing; a goal and an
/// intervention for each, and one goal serving both the substance-use and the housing need.
fn plan(s: &str, title: &str) -> Value {
    json!({"client_id": format!("cl-{s}"), "title": title, "status": "active", "period": {"start": "2026-11-02"},
        "author": "staff-1",
        "needs": [
            {"id": "mh", "code": "depression", "status": "active", "assessment_id": format!("as-{s}-phq")},
            {"id": "sud", "code": "substance_use", "status": "active", "assessment_id": format!("as-{s}-dast")},
            {"id": "home", "code": "housing_instability", "status": "active"}],
        "goals": [
            {"id": "g-mh", "description": "Mood improves", "need_ids": ["mh"], "lifecycle_status": "active"},
            {"id": "g-sud", "description": "Completes programme", "need_ids": ["sud"], "lifecycle_status": "active"},
            {"id": "g-home", "description": "Stable housing", "need_ids": ["home", "sud"], "lifecycle_status": "active"}],
        "interventions": [
            {"id": "i-mh", "description": "Weekly sessions", "service": "therapy", "status": "in_progress",
             "need_ids": ["mh"], "goal_ids": ["g-mh"], "ordered": true},
            {"id": "i-sud", "description": "Outpatient programme", "service": "substance_use_treatment",
             "status": "in_progress", "need_ids": ["sud"], "goal_ids": ["g-sud"], "ordered": true},
            {"id": "i-home", "description": "Housing navigation", "service": "housing_assistance",
             "status": "not_started", "need_ids": ["home"], "goal_ids": ["g-home"], "ordered": true}]})
}

fn referral(s: &str, to: &str, need: &str, service: &str, consent: Option<&str>) -> Value {
    let mut r = json!({"client_id": format!("cl-{s}"), "need": need, "service": service, "priority": "routine",
        "requester": {"staff_id": "staff-1", "name": "Case Manager", "organization": "Agency"},
        "target": {"type": "partner", "partner": to}, "status": "sent", "authored_on": "2026-11-03T09:00:00Z"});
    if let Some(c) = consent {
        r["consent_id"] = json!(c);
    }
    r
}

fn consent(s: &str, to: &str, categories: &[&str], purpose: &str, end: Option<&str>, status: &str) -> Value {
    let mut c = json!({"client_id": format!("cl-{s}"), "partner": to, "categories": categories, "purpose": purpose,
        "period": {"start": "2026-01-01"}, "status": status, "signed_on": "2026-01-01"});
    if let Some(end) = end {
        c["period"]["end"] = json!(end);
    }
    c
}

/// What a resource is about, read from the data the test chose: the scenario (`s3`) and whether it speaks of
/// mental health or substance use.
fn about(r: &Value) -> (Option<String>, bool, bool) {
    let text = r.to_string().to_lowercase();
    // Every id the test writes ends its scenario with `-sN` (`cl-s3`, `as-s3-phq`, `cp-s3.g-mh`); N is one digit.
    let scenario = (1..=9).map(|n| format!("s{n}")).find(|s| text.contains(&format!("-{s}")));
    let sud = ["substance", "dast", "\"sud\"", "42cfrpart2", "outpatient programme", "completes programme"]
        .iter()
        .any(|w| text.contains(w));
    let mh = ["depress", "phq", "\"psy\"", "mood improves", "weekly sessions", "\"therapy\""]
        .iter()
        .any(|w| text.contains(w));
    (scenario, mh, sud)
}

/// What each (partner, scenario) may hold: (anything at all, mental health, substance use).
fn allowed(partner: &str, scenario: &str) -> (bool, bool, bool) {
    match (partner, scenario) {
        // s2: general consent to the hospital; s3: mental-health consent to the hospital.
        (HOSPITAL, "s2") => (true, false, false),
        (HOSPITAL, "s3") => (true, true, false),
        // s4: substance-use consent for the Part 2 program only (general + substance use, treatment).
        (PART2, "s4") => (true, false, true),
        // s8: a consent for the social-service partner (general, mental health; care coordination).
        (SOCIAL, "s8") => (true, true, false),
        // s9: a referral to the hospital and no consent: a relationship, general data only.
        (HOSPITAL, "s9") => (true, false, false),
        // s7: consented to the hospital, then revoked: what went before the revocation.
        (HOSPITAL, "s7") => (true, true, false),
        _ => (false, false, false),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_leaves_without_a_consent_that_covers_it_and_everything_consented_arrives() {
    let w = world().await;
    let today = OffsetDateTime::now_utc().date();
    let past = (today - time::Duration::days(30)).to_string();
    // Every scenario's client and records; consents as the scenario says.
    for n in 1..=9 {
        let s = format!("s{n}");
        w.put::<Client>(&format!("cl-{s}"), client(&s)).await;
        w.put::<Assessment>(&format!("as-{s}-phq"), phq9(&s)).await;
        w.put::<Assessment>(&format!("as-{s}-dast"), dast10(&s)).await;
    }
    let consents: [(&str, Value); 7] = [
        ("s2", consent("s2", HOSPITAL, &["general"], "treatment", None, "active")),
        ("s3", consent("s3", HOSPITAL, &["general", "mental_health"], "treatment", None, "active")),
        ("s4", consent("s4", PART2, &["general", "substance_use"], "treatment", None, "active")),
        ("s5", consent("s5", HOSPITAL, &["general", "mental_health"], "treatment", Some(&past), "active")),
        ("s6", consent("s6", HOSPITAL, &["general", "mental_health"], "treatment", None, "active")),
        ("s7", consent("s7", HOSPITAL, &["general", "mental_health"], "treatment", None, "active")),
        ("s8", consent("s8", SOCIAL, &["general", "mental_health"], "care_coordination", None, "active")),
    ];
    for (s, c) in &consents {
        w.put::<Consent>(&format!("co-{s}"), c.clone()).await;
    }
    for n in 1..=9 {
        let s = format!("s{n}");
        w.put::<CarePlan>(&format!("cp-{s}"), plan(&s, "Recovery and housing plan")).await;
    }
    // Referrals: s4's to the Part 2 program under its consent; s9's to the hospital without any consent (a
    // housing referral: general data); s1's to a directory service (a community program, no EHR).
    w.put::<Referral>("ref-s4-sud", referral("s4", PART2, "substance_use", "substance_use_treatment", Some("co-s4")))
        .await;
    w.put::<Referral>("ref-s9-home", referral("s9", HOSPITAL, "housing_instability", "housing_assistance", None)).await;
    w.put::<Referral>("ref-s9-mh", referral("s9", HOSPITAL, "depression", "therapy", None)).await;
    let mut community = referral("s1", HOSPITAL, "food_insecurity", "food_assistance", None);
    community["target"] = json!({"type": "directory_service", "service_id": "demo-directory.pantry-1"});
    w.put::<Referral>("ref-s1-food", community).await;
    // s6 revokes before anything is sent.
    w.put::<Consent>("co-s6", consent("s6", HOSPITAL, &["general", "mental_health"], "treatment", None, "revoked"))
        .await;

    let first = w.drain().await;
    assert_eq!(first.dead + first.retried, 0, "{first:?}");

    // s7 revokes after the first send; then its plan and a new assessment change: nothing further goes.
    let hospital = &w.peers[HOSPITAL];
    let before: Vec<Value> = hospital.requests().await;
    w.put::<Consent>("co-s7", consent("s7", HOSPITAL, &["general", "mental_health"], "treatment", None, "revoked"))
        .await;
    w.put::<CarePlan>("cp-s7", plan("s7", "Revised after revocation")).await;
    let mut again = phq9("s7");
    again["date"] = json!("2026-11-20");
    w.put::<Assessment>("as-s7-phq2", again).await;
    let second = w.drain().await;
    assert_eq!(second.dead + second.retried, 0, "{second:?}");
    let after: Vec<Value> = hospital.requests().await;
    let sent_after: Vec<String> = after[before.len()..]
        .iter()
        .filter(|r| r["method"] != "GET")
        .map(|r| {
            format!("{} {} {}", r["method"], r["url"], r["body"].to_string().chars().take(400).collect::<String>())
        })
        .collect();
    // Only the revocation itself reaches the hospital (it holds the consent: it must learn it ended).
    assert_eq!(sent_after.len(), 1, "after the revocation the hospital received: {sent_after:#?}");
    assert!(sent_after[0].contains("Consent"), "{sent_after:?}");

    // Read every server back.
    let mut checked = 0;
    let mut disclosures = Vec::new();
    let mut everything = Vec::new();
    let mut held_by: BTreeMap<(&str, String), Vec<String>> = BTreeMap::new();
    for (&name, peer) in &w.peers {
        let held = check_peer(name, peer, "after the matrix").await;
        for r in held.values() {
            checked += 1;
            let ty = r["resourceType"].as_str().unwrap_or_default().to_owned();
            let security = r.pointer("/meta/security").and_then(Value::as_array).cloned().unwrap_or_default();
            assert!(
                security.iter().any(|c| c["system"] == "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"),
                "{name}: {ty} without a confidentiality label: {r}"
            );
            let (scenario, mh, sud) = about(r);
            let Some(scenario) = scenario else {
                disclosures.push(format!("{name}: {ty} of no scenario: {r}"));
                continue;
            };
            let (any, may_mh, may_sud) = allowed(name, &scenario);
            if !any || (mh && !may_mh) || (sud && !may_sud) {
                disclosures.push(format!("{name}: {scenario} {ty} (mh {mh}, sud {sud}): {r}"));
            }
            held_by.entry((name, scenario)).or_default().push(ty);
        }
        everything.extend(held.into_values());
    }
    assert!(disclosures.is_empty(), "{} disclosure(s) without consent:\n{}", disclosures.len(), disclosures.join("\n"));

    // Everything consented arrived.
    let has = |partner: &'static str, s: &str, ty: &str| {
        held_by.get(&(partner, s.to_owned())).is_some_and(|tys| tys.iter().any(|t| t == ty))
    };
    for (partner, s, types) in [
        (HOSPITAL, "s2", &["Patient", "CarePlan", "Goal", "Condition", "Consent"][..]),
        (HOSPITAL, "s3", &["Patient", "Observation", "CarePlan", "Goal", "Condition", "Consent"][..]),
        (PART2, "s4", &["Patient", "Observation", "CarePlan", "Condition", "ServiceRequest", "Task", "Consent"][..]),
        (SOCIAL, "s8", &["Patient", "Observation", "CarePlan", "Consent"][..]),
        (HOSPITAL, "s9", &["Patient", "CarePlan", "ServiceRequest", "Task"][..]),
        (HOSPITAL, "s7", &["Patient", "Observation", "CarePlan", "Consent"][..]),
    ] {
        for ty in types {
            assert!(
                has(partner, s, ty),
                "{partner} lacks the {ty} of {s}: it holds {:?}",
                held_by.get(&(partner, s.to_owned()))
            );
        }
    }
    // The revoked consent reached the hospital as no longer active; s7's plan there is the one sent before.
    let s7_consent = everything
        .iter()
        .find(|r| r["resourceType"] == "Consent" && r.to_string().contains("co-s7"))
        .expect("the hospital holds s7's consent");
    assert_ne!(s7_consent["status"], "active", "{s7_consent}");
    assert!(!everything.iter().any(|r| r.to_string().contains("Revised after revocation")));
    // A Bundle's label never carries a sensitivity code: every transaction the servers received says so.
    for (&name, peer) in &w.peers {
        for req in peer.requests().await {
            if req["body"]["resourceType"] == "Bundle" {
                let codes: Vec<&str> = req["body"]
                    .pointer("/meta/security")
                    .and_then(Value::as_array)
                    .map_or(&[][..], Vec::as_slice)
                    .iter()
                    .filter_map(|c| c["code"].as_str())
                    .collect();
                assert!(codes.len() == 1 && ["N", "R", "V"].contains(&codes[0]), "{name}: Bundle labelled {codes:?}");
            }
        }
    }
    // validate.sh accepts all of it.
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("delivered.json");
    std::fs::write(&file, serde_json::to_string(&everything).expect("json")).expect("write");
    let out = std::process::Command::new(interop().join("validate.sh")).arg(&file).output().expect("validate.sh runs");
    assert!(out.status.success(), "validate.sh refused:\n{}", String::from_utf8_lossy(&out.stdout));
    println!(
        "egress matrix: 9 scenarios, 3 profiles, {checked} resources read back, {} disclosures without consent",
        disclosures.len()
    );
}
