//! Referrals a hospital sends the agency on `/fhir`, as a Gravity transaction (Task + ServiceRequest + Patient):
//! taken in once however often sent, matched to the client by the identifiers the partner's `patient_match` names
//! (or a new client made from the Patient), read in agency codes, shown as inbound, moved by the agency as the
//! performer, and read back by the hospital on `/fhir/Task`; refusals as `OperationOutcome`s naming each problem.

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{ADMIN_KEY, COUNTY_KEY, ST_MARYS_KEY, TestApp, spawn_app_with};

const FHIR_JSON: &str = "application/fhir+json";
const MEDICAID: &str = "urn:oid:2.16.840.1.113883.4.3.25";

/// A hospital's referral as the Gravity IG shapes it: therapy (SNOMED CT 75516001) for depression (SNOMED CT
/// 366979004), for the patient with this Medicaid number.
pub fn gravity_referral(task_id: &str, medicaid: &str, status: &str) -> Value {
    json!({
        "resourceType": "Bundle", "type": "transaction",
        "entry": [
            {"fullUrl": "urn:uuid:7d0c3a8e-9c5a-4a59-9c51-0d6d0f6f2a01", "resource": {
                "resourceType": "Patient",
                "identifier": [{"system": MEDICAID, "value": medicaid},
                               {"system": "https://stmarys.example/mrn", "value": format!("MRN-{medicaid}")}],
                "name": [{"family": "Okafor", "given": ["Ada"]}], "gender": "female", "birthDate": "1979-05-02"},
             "request": {"method": "POST", "url": "Patient"}},
            {"fullUrl": "urn:uuid:7d0c3a8e-9c5a-4a59-9c51-0d6d0f6f2a02", "resource": {
                "resourceType": "ServiceRequest", "status": "active", "intent": "order", "priority": "urgent",
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": "75516001", "display": "Psychotherapy"}]},
                "reasonCode": [{"coding": [{"system": "http://snomed.info/sct", "code": "366979004"}],
                                "text": "Depressed mood after discharge"}],
                "subject": {"reference": "urn:uuid:7d0c3a8e-9c5a-4a59-9c51-0d6d0f6f2a01"},
                "requester": {"display": "Dr. Imani Reyes"},
                "authoredOn": "2026-12-01T09:30:00Z"},
             "request": {"method": "POST", "url": "ServiceRequest"}},
            {"fullUrl": "urn:uuid:7d0c3a8e-9c5a-4a59-9c51-0d6d0f6f2a03", "resource": {
                "resourceType": "Task", "status": status, "intent": "order",
                "identifier": [{"system": "https://stmarys.example/referral-task", "value": task_id}],
                "code": {"coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill"}]},
                "focus": {"reference": "urn:uuid:7d0c3a8e-9c5a-4a59-9c51-0d6d0f6f2a02"},
                "for": {"reference": "urn:uuid:7d0c3a8e-9c5a-4a59-9c51-0d6d0f6f2a01"},
                "requester": {"display": "St Mary's Hospital"},
                "authoredOn": "2026-12-01T09:31:00Z"},
             "request": {"method": "POST", "url": "Task"}}
        ]
    })
}

async fn app() -> TestApp {
    let app = spawn_app_with(|s| {
        for p in &mut s.partners {
            if p.name == "st-marys-ehr" {
                p.patient_match = vec![MEDICAID.to_owned()];
            }
        }
    })
    .await;
    app.put_clients().await;
    app
}

async fn send(app: &TestApp, key: &str, method: Method, path: &str, body: Option<&Value>) -> (u16, Value) {
    let mut r = app.client.request(method, format!("{}{path}", app.base)).bearer_auth(key);
    if let Some(b) = body {
        r = r.header("content-type", FHIR_JSON).body(b.to_string());
    }
    let r = r.send().await.expect("sent");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn inbound(app: &TestApp) -> Vec<Value> {
    let page: Value = app.get_json("/api/v1/referrals?direction=inbound").await;
    page["items"].as_array().expect("items").iter().map(|i| i["record"].clone()).collect()
}

#[tokio::test]
async fn a_hospitals_referral_comes_in_once_is_answered_by_the_agency_and_read_back_completed() {
    let app = app().await;
    // cl-1001 holds Medicaid number OR8812345: the hospital's patient is her.
    let bundle = gravity_referral("H-REF-1", "OR8812345", "requested");
    let (status, answer) = send(&app, ST_MARYS_KEY, Method::POST, "/fhir", Some(&bundle)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["type"], "transaction-response");
    assert_eq!(answer["entry"][2]["response"]["status"], "201 Created", "{answer}");
    let location = answer["entry"][2]["response"]["location"].as_str().expect("location").to_owned();
    let task_id = location.split('/').nth(1).expect("Task/id/_history/v").to_owned();

    let referrals = inbound(&app).await;
    assert_eq!(referrals.len(), 1, "{referrals:?}");
    let r = &referrals[0];
    assert_eq!(r["id"], task_id.as_str());
    assert_eq!(
        (r["client_id"].as_str(), r["service"].as_str(), r["need"].as_str(), r["priority"].as_str()),
        (Some("cl-1001"), Some("therapy"), Some("depression"), Some("urgent"))
    );
    assert_eq!((r["status"].as_str(), r["target"]["type"].as_str()), (Some("sent"), Some("agency")));
    assert_eq!(r["requester"]["partner"], "st-marys-ehr");
    assert_eq!(r["reason"], "Depressed mood after discharge");

    // The same Task again: nothing new.
    let (status, again) = send(&app, ST_MARYS_KEY, Method::POST, "/fhir", Some(&bundle)).await;
    assert_eq!((status, again["entry"][2]["response"]["status"].as_str()), (200, Some("200 OK")), "{again}");
    assert_eq!(inbound(&app).await.len(), 1);

    // The hospital requested it: accepting is the agency's move, not the hospital's.
    let path = format!("/fhir/Task/{task_id}");
    let (_, mut task) = send(&app, ST_MARYS_KEY, Method::GET, &path, None).await;
    assert_eq!(task["status"], "requested");
    task["status"] = json!("accepted");
    let (status, outcome) = send(&app, ST_MARYS_KEY, Method::PUT, &path, Some(&task)).await;
    assert_eq!((status, outcome["issue"][0]["code"].as_str()), (422, Some("business-rule")), "{outcome}");

    // The agency performs: accepted, in progress, completed.
    let steps =
        [("accepted", None), ("in_progress", None), ("completed", Some("Seen twice; discharged to primary care"))];
    for (to, outcome) in steps {
        let mut change = json!({"status": to});
        if let Some(o) = outcome {
            change["outcome"] = json!(o);
        }
        let moved = app.post(&format!("/api/v1/referrals/{task_id}/status"), &change).await;
        assert_eq!(moved.status(), 200, "{to}");
    }
    let (status, done) = send(&app, ST_MARYS_KEY, Method::GET, &path, None).await;
    assert_eq!((status, done["status"].as_str()), (200, Some("completed")), "{done}");
    assert_eq!(done["output"][0]["valueString"], "Seen twice; discharged to primary care", "{done}");
    assert_eq!(done["requester"]["identifier"]["value"], "st-marys-ehr", "the hospital requested it: {done}");
    assert!(done["owner"]["identifier"]["value"].is_string(), "the agency owns it: {done}");
    crate::delivery_interop::validate(&[done]);
    // Another partner sees nothing of it; an agency key cannot send referrals in.
    assert_eq!(send(&app, COUNTY_KEY, Method::GET, &path, None).await.0, 404);
    assert_eq!(send(&app, ADMIN_KEY, Method::POST, "/fhir", Some(&bundle)).await.0, 403);
}

#[tokio::test]
async fn a_patient_the_agency_does_not_know_becomes_a_new_client_and_bad_referrals_are_refused_by_name() {
    let app = app().await;
    let (status, answer) =
        send(&app, ST_MARYS_KEY, Method::POST, "/fhir", Some(&gravity_referral("H-REF-2", "OR0000001", "requested")))
            .await;
    assert_eq!(status, 200, "{answer}");
    let r = &inbound(&app).await[0];
    let client_id = r["client_id"].as_str().expect("client").to_owned();
    assert!(client_id.starts_with("cl-in-"), "{client_id}");
    let client: Value = app.get_json(&format!("/api/v1/clients/{client_id}")).await;
    assert_eq!((client["family_name"].as_str(), client["birth_date"].as_str()), (Some("Okafor"), Some("1979-05-02")));

    // A referral comes in requested, not completed.
    let (status, outcome) =
        send(&app, ST_MARYS_KEY, Method::POST, "/fhir", Some(&gravity_referral("H-REF-3", "OR0000001", "completed")))
            .await;
    assert_eq!((status, outcome["issue"][0]["code"].as_str()), (422, Some("business-rule")), "{outcome}");
    // A service no ConceptMap reads back is named, not guessed.
    let mut unknown = gravity_referral("H-REF-4", "OR0000001", "requested");
    unknown["entry"][1]["resource"]["code"]["coding"][0]["code"] = json!("410606002");
    let (status, outcome) = send(&app, ST_MARYS_KEY, Method::POST, "/fhir", Some(&unknown)).await;
    assert_eq!(status, 422, "{outcome}");
    assert_eq!(outcome["issue"][0]["expression"][0], "ServiceRequest.code", "{outcome}");
    // Not valid R4: refused at the gate, each problem by path.
    let mut broken = gravity_referral("H-REF-5", "OR0000001", "requested");
    broken["entry"][0]["resource"]["birthDate"] = json!("the fifth of May");
    let (status, outcome) = send(&app, ST_MARYS_KEY, Method::POST, "/fhir", Some(&broken)).await;
    assert_eq!(status, 422, "{outcome}");
    assert!(outcome.to_string().contains("birthDate"), "{outcome}");
    // Not a transaction.
    let mut batch = gravity_referral("H-REF-6", "OR0000001", "requested");
    batch["type"] = json!("batch");
    assert_eq!(send(&app, ST_MARYS_KEY, Method::POST, "/fhir", Some(&batch)).await.0, 400);
    assert_eq!(inbound(&app).await.len(), 1, "nothing refused was kept");
}

/// The hospital keeps the referral on its own FHIR server and sends the gateway only the Task; the gateway reads
/// the rest there, the agency answers, and the hospital reads each answer on its own server (its own fields kept).
#[tokio::test]
async fn a_task_alone_is_read_from_the_hospitals_server_and_the_agencys_answers_reach_that_server() {
    use std::sync::Arc;
    use std::time::Duration;

    let peer = crate::fhir_peer::Peer::start(&[]);
    let adjust = |s: &mut carebridge::config::Settings| {
        for p in &mut s.partners {
            if p.name == "st-marys-ehr" {
                p.base_url = peer.base.clone();
                p.patient_match = vec![MEDICAID.to_owned()];
                p.max_transaction_entries = 0;
            }
        }
    };
    let app = spawn_app_with(adjust).await;
    app.put_clients().await;
    // The hospital's own records, on its own server.
    let bundle = gravity_referral("H-REF-9", "OR8812345", "requested");
    let patient_id = peer.create(&bundle["entry"][0]["resource"]).await;
    let mut sr = bundle["entry"][1]["resource"].clone();
    sr["subject"] = json!({"reference": format!("Patient/{patient_id}")});
    let sr_id = peer.create(&sr).await;
    let mut task = bundle["entry"][2]["resource"].clone();
    task["focus"] = json!({"reference": format!("ServiceRequest/{sr_id}")});
    task["for"] = json!({"reference": format!("Patient/{patient_id}")});
    task["businessStatus"] = json!({"text": "sent to Riverside"});
    let task_id = peer.create(&task).await;
    let (_, on_peer) = peer.send(Method::GET, &format!("Task/{task_id}"), None).await;

    let (status, ours) = send(&app, ST_MARYS_KEY, Method::POST, "/fhir/Task", Some(&on_peer)).await;
    assert_eq!(status, 201, "{ours}");
    let referral_id = ours["id"].as_str().expect("id").to_owned();
    let r: Value = app.get_json(&format!("/api/v1/referrals/{referral_id}")).await;
    assert_eq!((r["client_id"].as_str(), r["service"].as_str()), (Some("cl-1001"), Some("therapy")));
    assert_eq!(send(&app, ST_MARYS_KEY, Method::POST, "/fhir/Task", Some(&on_peer)).await.0, 200, "once only");

    // A worker beside the app, on its database, delivers what the agency answers.
    let mut settings = crate::helpers::test_settings(app.dir.path());
    adjust(&mut settings);
    settings.outbox.timeout_secs = 5;
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let store = carebridge::store::connect(&settings.database.url, 2, Duration::from_secs(5)).await.expect("store");
    let partners = carebridge::partners::Partners::new(&settings.partners);
    let mappings = Arc::new(
        carebridge::mapping::Mappings::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings"))
            .expect("mappings"),
    );
    let worker = carebridge::outbox::Worker::new(store.clone(), mappings, &partners, &settings.outbox).expect("worker");
    for (to, on_peer_status) in [("accepted", "accepted"), ("in_progress", "in-progress"), ("completed", "completed")] {
        let change =
            if to == "completed" { json!({"status": to, "outcome": "Seen twice"}) } else { json!({"status": to}) };
        assert_eq!(app.post(&format!("/api/v1/referrals/{referral_id}/status"), &change).await.status(), 200);
        let report = worker.run_until_idle(time::OffsetDateTime::now_utc).await.expect("a pass");
        assert_eq!(report.dead, 0, "{report:?}");
        let (_, theirs) = peer.send(Method::GET, &format!("Task/{task_id}"), None).await;
        assert_eq!(theirs["status"], on_peer_status, "{theirs}");
        assert_eq!(theirs["focus"]["reference"], format!("ServiceRequest/{sr_id}"), "the request is the hospital's");
        assert_eq!(theirs["identifier"][0]["value"], "H-REF-9");
    }
    let (_, theirs) = peer.send(Method::GET, &format!("Task/{task_id}"), None).await;
    assert_eq!(theirs["output"][0]["valueString"], "Seen twice", "the outcome reaches the hospital: {theirs}");
    // Nothing of ours was created there: the hospital's records only, its Task updated in place.
    assert_eq!(peer.all("Task").await.len(), 1);
    assert_eq!(peer.all("ServiceRequest").await.len(), 1);
    assert_eq!(peer.all("Patient").await.len(), 1);
    let (_, done) = send(&app, ST_MARYS_KEY, Method::GET, &format!("/fhir/Task/{referral_id}"), None).await;
    assert_eq!(done["status"], "completed");
}

#[tokio::test]
async fn a_referral_a_partner_sent_is_not_owed_back_to_it_until_the_agency_answers() {
    use carebridge::domain::RecordKind;
    use carebridge::store::DeliveryFilter;
    let app = app().await;
    let (status, answer) =
        send(&app, ST_MARYS_KEY, Method::POST, "/fhir", Some(&gravity_referral("H-REF-7", "OR8812345", "requested")))
            .await;
    assert_eq!(status, 200, "{answer}");
    let id = inbound(&app).await[0]["id"].as_str().expect("id").to_owned();
    let settings = crate::helpers::test_settings(app.dir.path());
    let store =
        carebridge::store::connect(&settings.database.url, 1, std::time::Duration::from_secs(5)).await.expect("store");
    let rows = |store: std::sync::Arc<dyn carebridge::store::Store>, id: String| async move {
        let filter = DeliveryFilter {
            record: Some((RecordKind::Referral, carebridge::domain::RecordId::parse(&id).expect("id"))),
            limit: 10,
            ..DeliveryFilter::default()
        };
        store.list_deliveries(&filter).await.expect("rows").len()
    };
    assert_eq!(rows(store.clone(), id.clone()).await, 0, "what the hospital sent is not owed back to it");
    assert_eq!(app.post(&format!("/api/v1/referrals/{id}/status"), &json!({"status": "accepted"})).await.status(), 200);
    assert_eq!(rows(store, id).await, 1, "the agency's answer is owed to it");
}

#[tokio::test]
async fn a_patient_matching_several_clients_waits_unlinked_until_the_agency_links_it() {
    let app = app().await;
    // A second client holding cl-1001's Medicaid number: the hospital's patient matches both.
    let mut twin = crate::helpers::fixture("client", "cl-1001");
    twin["id"] = json!("cl-1099");
    let put = app.put("/api/v1/clients/cl-1099", &twin).await;
    assert!(put.status().is_success(), "{}", put.text().await.unwrap_or_default());

    let bundle = gravity_referral("H-REF-TWIN", "OR8812345", "requested");
    let (status, answer) = send(&app, ST_MARYS_KEY, Method::POST, "/fhir", Some(&bundle)).await;
    assert_eq!((status, answer["entry"][2]["response"]["status"].as_str()), (200, Some("201 Created")), "{answer}");
    let referrals = inbound(&app).await;
    let r = &referrals[0];
    let id = r["id"].as_str().expect("id").to_owned();
    let mut candidates: Vec<&str> =
        r["client_candidates"].as_array().expect("candidates").iter().filter_map(Value::as_str).collect();
    candidates.sort_unstable();
    assert_eq!(candidates, ["cl-1001", "cl-1099"], "{r}");
    // Meanwhile it is for the client made from the hospital's Patient, never a guess between the two.
    let stand_in = r["client_id"].as_str().expect("client").to_owned();
    assert!(stand_in.starts_with("cl-in-"), "{r}");

    // The same patient again: still those two candidates, the stand-in is not a third.
    let again = gravity_referral("H-REF-TWIN-2", "OR8812345", "requested");
    assert_eq!(send(&app, ST_MARYS_KEY, Method::POST, "/fhir", Some(&again)).await.0, 200);
    let second = inbound(&app).await.into_iter().find(|x| x["id"] != id.as_str()).expect("second");
    assert_eq!(second["client_candidates"].as_array().map(Vec::len), Some(2), "{second}");
    assert_eq!(second["client_id"], stand_in.as_str());

    // The agency cannot take it on before it is linked: only decline.
    let accept = app.post(&format!("/api/v1/referrals/{id}/status"), &json!({"status": "accepted"})).await;
    assert_eq!(accept.status(), 409);
    let problem: Value = accept.json().await.expect("JSON");
    assert_eq!(problem["allowed_next"], json!(["declined"]), "{problem}");
    assert!(problem["detail"].as_str().expect("detail").contains("/link"), "{problem}");
    // A PUT does not link it either.
    let mut replaced: Value = r.clone();
    replaced["client_id"] = json!("cl-1001");
    let put = app.put(&format!("/api/v1/referrals/{id}"), &replaced).await;
    assert_eq!(put.status(), 422);
    assert!(put.text().await.expect("body").contains("$.client_id"));
    // Only one of the candidates.
    let wrong = app.post(&format!("/api/v1/referrals/{id}/link"), &json!({"client_id": "cl-1002"})).await;
    assert_eq!(wrong.status(), 422);
    assert!(wrong.text().await.expect("body").contains("cl-1099"));

    let linked = app.post(&format!("/api/v1/referrals/{id}/link"), &json!({"client_id": "cl-1099"})).await;
    assert_eq!(linked.status(), 200);
    let linked: Value = linked.json().await.expect("JSON");
    assert_eq!(linked["client_id"], "cl-1099");
    assert!(linked.get("client_candidates").is_none(), "{linked}");
    let done = app.post(&format!("/api/v1/referrals/{id}/link"), &json!({"client_id": "cl-1099"})).await;
    assert_eq!(done.status(), 422, "nothing waits any more");
    let accept = app.post(&format!("/api/v1/referrals/{id}/status"), &json!({"status": "accepted"})).await;
    assert_eq!(accept.status(), 200);
    let history: Value = app.get_json(&format!("/api/v1/referrals/{id}/history")).await;
    let actions: Vec<&str> =
        history["versions"].as_array().expect("versions").iter().filter_map(|v| v["action"].as_str()).collect();
    assert_eq!(actions, ["created", "linked", "status_changed"], "{history}");
    // The hospital reads its referral answered, for the client the agency linked.
    let (_, task) = send(&app, ST_MARYS_KEY, Method::GET, &format!("/fhir/Task/{id}"), None).await;
    assert_eq!(task["status"], "accepted", "{task}");
    app.stop().await;
}
