//! The referrals' Tasks on the gateway's own FHIR endpoint, tried as a hospital would with its partner key: what
//! it may see (its own referrals, as the client's consents allow), how it moves them (its side of the state machine,
//! `If-Match`), and every refusal as an `OperationOutcome`; `/fhir/metadata` without a key.

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{COUNTY_KEY, ST_MARYS_KEY, TestApp, fixture, spawn_app};

const FHIR_JSON: &str = "application/fhir+json";

async fn as_key(app: &TestApp, key: &str, method: Method, path: &str, body: Option<&Value>) -> reqwest::Response {
    let mut r = app.client.request(method, format!("{}{path}", app.base)).bearer_auth(key);
    if let Some(b) = body {
        r = r.header("content-type", FHIR_JSON).body(b.to_string());
    }
    r.send().await.expect("sent")
}

async fn json_of(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Clients, consents and two referrals: ref-4001 to St Mary's (consented), ref-4003 to the county crisis team
/// (its consent written only when `county_consent`).
async fn referred(county_consent: bool) -> TestApp {
    let app = spawn_app().await;
    app.put_clients().await;
    assert_eq!(app.put("/api/v1/consents/co-5001", &fixture("consent", "co-5001")).await.status(), 201);
    if county_consent {
        assert_eq!(app.put("/api/v1/consents/co-5003", &fixture("consent", "co-5003")).await.status(), 201);
    }
    for id in ["ref-4001", "ref-4003"] {
        assert_eq!(app.put(&format!("/api/v1/referrals/{id}"), &fixture("referral", id)).await.status(), 201);
    }
    app
}

fn issue_code(outcome: &Value) -> &str {
    assert_eq!(outcome["resourceType"], "OperationOutcome", "{outcome}");
    outcome["issue"][0]["code"].as_str().expect("an issue code")
}

#[tokio::test]
async fn the_capability_statement_is_public_and_states_the_task_interactions() {
    let app = spawn_app().await;
    let r = app.client.get(format!("{}/fhir/metadata", app.base)).send().await.expect("sent");
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().expect("text").starts_with(FHIR_JSON));
    let cs: Value = r.json().await.expect("JSON");
    assert_eq!(cs["resourceType"], "CapabilityStatement");
    assert_ne!(cs["date"], "2026-11-29", "the date is the running gateway's, not a constant");
    let rest = &cs["rest"][0];
    assert!(rest["security"]["description"].as_str().is_some_and(|d| d.contains("partner")));
    let task = rest["resource"].as_array().expect("resources").iter().find(|r| r["type"] == "Task").expect("Task");
    let interactions: Vec<&str> =
        task["interaction"].as_array().expect("list").iter().filter_map(|i| i["code"].as_str()).collect();
    assert_eq!(interactions, ["read", "vread", "update", "search-type"]);
    crate::delivery_interop::validate(&[cs]);
}

#[tokio::test]
async fn a_partner_key_works_on_fhir_only_and_sees_only_its_referrals_as_consent_allows() {
    let app = referred(false).await;
    let (status, outcome) =
        json_of(as_key(&app, ST_MARYS_KEY, Method::GET, "/api/v1/referrals/ref-4001", None).await).await;
    assert_eq!(status, 403, "{outcome}");

    let (status, task) = json_of(as_key(&app, ST_MARYS_KEY, Method::GET, "/fhir/Task/ref-4001", None).await).await;
    assert_eq!(status, 200, "{task}");
    assert_eq!((task["resourceType"].as_str(), task["status"].as_str()), (Some("Task"), Some("requested")));
    assert_eq!(task["meta"]["versionId"], "1");
    assert!(task["meta"]["security"].as_array().is_some_and(|l| !l.is_empty()), "labelled: {task}");
    // Another partner's referral does not exist for St Mary's.
    let (status, outcome) = json_of(as_key(&app, ST_MARYS_KEY, Method::GET, "/fhir/Task/ref-4003", None).await).await;
    assert_eq!((status, issue_code(&outcome)), (404, "not-found"));
    // The county's own referral, mental-health data without the client's consent: held from it, so not there.
    let (status, _) = json_of(as_key(&app, COUNTY_KEY, Method::GET, "/fhir/Task/ref-4003", None).await).await;
    assert_eq!(status, 404);
    assert_eq!(app.put("/api/v1/consents/co-5003", &fixture("consent", "co-5003")).await.status(), 201);
    let (status, task) = json_of(as_key(&app, COUNTY_KEY, Method::GET, "/fhir/Task/ref-4003", None).await).await;
    assert_eq!(status, 200, "consented now: {task}");

    // Searches see the same: the partner its one referral, the agency both.
    let (_, mine) = json_of(as_key(&app, ST_MARYS_KEY, Method::GET, "/fhir/Task", None).await).await;
    assert_eq!(mine["total"], 1, "{mine}");
    let (_, all) = json_of(app.get("/fhir/Task").await).await;
    assert_eq!(all["total"], 2, "{all}");
    crate::delivery_interop::validate(&[task, mine["entry"][0]["resource"].clone()]);
}

#[tokio::test]
async fn task_search_combines_repeated_last_updated_bounds_and_token_parameters() {
    let app = referred(true).await;
    let search = |q: &'static str| {
        let app = &app;
        async move {
            let (status, b) = json_of(app.get(&format!("/fhir/Task?{q}")).await).await;
            assert_eq!(status, 200, "{q}: {b}");
            let mut ids: Vec<String> = b["entry"]
                .as_array()
                .map(|e| e.iter().filter_map(|x| x["resource"]["id"].as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
            ids.sort();
            ids
        }
    };
    assert_eq!(search("_lastUpdated=gt2020-01-01&_lastUpdated=lt2999-01-01").await, ["ref-4001", "ref-4003"]);
    assert!(search("_lastUpdated=gt2020-01-01&_lastUpdated=lt2021-01-01").await.is_empty(), "both bounds count");
    assert!(search("_lastUpdated=ge2999-01-01").await.is_empty());
    assert_eq!(search("_id=ref-4003,ref-9999").await, ["ref-4003"]);
    assert_eq!(search("_id=ref-4003,ref-4003&_id=ref-4003,ref-4001").await, ["ref-4003"], "repeated _id: AND");
    assert_eq!(search("_id=ref-4001&status=accepted").await, Vec::<String>::new());
    assert_eq!(search("status=requested").await.len(), 2);
    assert_eq!(search("status=accepted,requested").await.len(), 2);
    assert!(search("status=accepted").await.is_empty());
    assert!(search("status=received").await.is_empty(), "no referral status stands for it");
    assert!(search("status=requested&status=accepted").await.is_empty(), "repeated status: AND");
    assert_eq!(search("patient=Patient/cl-1001").await, ["ref-4001"]);
    assert_eq!(search("owner=county-crisis-team").await, ["ref-4003"]);
    assert_eq!(search("focus=ServiceRequest/ref-4001").await, ["ref-4001"]);
    assert_eq!(search("identifier=ref-4003").await, ["ref-4003"]);
    let (status, page) = json_of(app.get("/fhir/Task?_count=1").await).await;
    assert_eq!(status, 200);
    assert_eq!(page["entry"].as_array().map(Vec::len), Some(1));
    assert!(page["link"].as_array().expect("links").iter().any(|l| l["relation"] == "next"), "{page}");
    let (status, outcome) = json_of(app.get("/fhir/Task?_lastUpdated=yesterday").await).await;
    assert_eq!((status, issue_code(&outcome)), (400, "invalid"));
}

#[tokio::test]
async fn the_hospital_moves_its_referral_through_its_side_of_the_state_machine_with_if_match() {
    let app = referred(false).await;
    let put = |key: &'static str, tag: Option<&'static str>, body: Value| {
        let app = &app;
        async move {
            let mut r = app
                .client
                .put(format!("{}/fhir/Task/ref-4001", app.base))
                .bearer_auth(key)
                .header("content-type", FHIR_JSON)
                .body(body.to_string());
            if let Some(tag) = tag {
                r = r.header("if-match", tag);
            }
            json_of(r.send().await.expect("sent")).await
        }
    };
    let (_, task) = json_of(as_key(&app, ST_MARYS_KEY, Method::GET, "/fhir/Task/ref-4001", None).await).await;
    let with = |status: &str, reason: Option<&str>| {
        let mut t = task.clone();
        t["status"] = json!(status);
        if let Some(r) = reason {
            t["statusReason"] = json!({"text": r});
        }
        t
    };
    // The agency requested it: accepting is not its move, on /fhir either.
    let (status, outcome) = put(crate::helpers::ADMIN_KEY, None, with("accepted", None)).await;
    assert_eq!((status, issue_code(&outcome)), (422, "business-rule"), "{outcome}");
    // The hospital accepts version 1.
    let (status, accepted) = put(ST_MARYS_KEY, Some("W/\"1\""), with("accepted", None)).await;
    assert_eq!(status, 200, "{accepted}");
    assert_eq!((accepted["status"].as_str(), accepted["meta"]["versionId"].as_str()), (Some("accepted"), Some("2")));
    let referral: Value = app.get_json("/api/v1/referrals/ref-4001").await;
    assert_eq!(referral["status"], "accepted");
    let history: Value = app.get_json("/api/v1/referrals/ref-4001/history").await;
    assert_eq!(history["versions"][1]["partner"], "st-marys-ehr");
    assert_eq!(history["versions"][1]["changed_by"], "st-marys-key");
    // Stale: 412 conflict.
    let (status, outcome) = put(ST_MARYS_KEY, Some("W/\"1\""), with("in-progress", None)).await;
    assert_eq!((status, issue_code(&outcome)), (412, "conflict"));
    // Back to requested is no move from accepted; entered-in-error is the requester's, not the hospital's.
    let (status, outcome) = put(ST_MARYS_KEY, None, with("requested", None)).await;
    assert_eq!((status, issue_code(&outcome)), (422, "business-rule"));
    // In the caller's words: Task codes, not the agency's.
    let said = outcome["issue"][0]["diagnostics"].as_str().expect("diagnostics");
    assert!(said.contains("a referral that is accepted cannot become requested"), "{outcome}");
    assert!(said.contains("in-progress") && !said.contains("in_progress"), "{outcome}");
    let (status, outcome) = put(ST_MARYS_KEY, None, with("entered-in-error", None)).await;
    assert_eq!((status, issue_code(&outcome)), (422, "business-rule"));
    assert!(outcome["issue"][0]["diagnostics"].as_str().is_some_and(|d| d.contains("requester")), "{outcome}");
    // On hold needs a reason.
    let (status, outcome) = put(ST_MARYS_KEY, None, with("on-hold", None)).await;
    assert_eq!((status, issue_code(&outcome)), (422, "business-rule"), "{outcome}");
    // Two updates of version 2 at once: one wins, the other is stale.
    let (a, b) = tokio::join!(
        put(ST_MARYS_KEY, Some("W/\"2\""), with("in-progress", None)),
        put(ST_MARYS_KEY, Some("W/\"2\""), with("on-hold", Some("waiting for a bed")))
    );
    let mut codes = [a.0, b.0];
    codes.sort_unstable();
    assert_eq!(codes, [200, 412], "{a:?} {b:?}");
    // Not a Task, not FHIR JSON, another partner's Task: refused, each as an OperationOutcome.
    let (status, outcome) = put(ST_MARYS_KEY, None, json!({"resourceType": "Patient"})).await;
    assert_eq!((status, issue_code(&outcome)), (400, "invalid"));
    let r = app
        .client
        .put(format!("{}/fhir/Task/ref-4001", app.base))
        .bearer_auth(ST_MARYS_KEY)
        .header("content-type", "text/plain")
        .body("accepted")
        .send()
        .await
        .expect("sent");
    let (status, outcome) = json_of(r).await;
    assert_eq!((status, issue_code(&outcome)), (415, "not-supported"));
    let (status, _) =
        json_of(as_key(&app, COUNTY_KEY, Method::PUT, "/fhir/Task/ref-4001", Some(&with("completed", None))).await)
            .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_partner_reads_the_clients_records_the_policy_releases_to_it_and_nothing_else() {
    let app = referred(true).await;
    for id in ["as-2001", "as-2007"] {
        assert_eq!(app.put(&format!("/api/v1/assessments/{id}"), &fixture("assessment", id)).await.status(), 201);
    }
    assert_eq!(app.put("/api/v1/care-plans/cp-3001", &fixture("care-plan", "cp-3001")).await.status(), 201);
    let get = |key: &'static str, path: String| {
        let app = &app;
        async move { json_of(as_key(app, key, Method::GET, &path, None).await).await }
    };
    let mut served = Vec::new();
    for path in ["Patient/cl-1001", "ServiceRequest/ref-4001", "CarePlan/cp-3001", "Consent/co-5001"] {
        let (status, r) = get(ST_MARYS_KEY, format!("/fhir/{path}")).await;
        assert_eq!(status, 200, "{path}: {r}");
        assert_eq!(format!("{}/{}", r["resourceType"].as_str().unwrap_or(""), r["id"].as_str().unwrap_or("")), path);
        assert!(r["meta"]["versionId"].is_string(), "{r}");
        served.push(r);
    }
    let goal = served[2]["goal"][0]["reference"].as_str().expect("a goal of the plan").to_owned();
    let (status, g) = get(ST_MARYS_KEY, format!("/fhir/{goal}")).await;
    assert_eq!((status, g["resourceType"].as_str()), (200, Some("Goal")), "{goal}: {g}");
    served.push(g);
    // Another client (the county's referral), another partner's consent: not there for St Mary's.
    for path in ["Patient/cl-1002", "Consent/co-5003", "ServiceRequest/ref-4003", "Patient/nobody"] {
        assert_eq!(get(ST_MARYS_KEY, format!("/fhir/{path}")).await.0, 404, "{path}");
    }
    // Searches by identifier and by patient see the same.
    let (_, found) =
        get(ST_MARYS_KEY, "/fhir/Patient?identifier=urn:oid:2.16.840.1.113883.4.3.25|OR8812345".into()).await;
    assert_eq!(found["total"], 1, "{found}");
    let (_, none) = get(ST_MARYS_KEY, "/fhir/Patient?_id=cl-1002".into()).await;
    assert_eq!(none["total"], 0, "{none}");
    let (_, consents) = get(ST_MARYS_KEY, "/fhir/Consent?patient=Patient/cl-1001".into()).await;
    assert_eq!(consents["total"], 1, "{consents}");
    let (_, all) = json_of(app.get("/fhir/Consent").await).await;
    assert_eq!(all["total"], 2, "the agency sees both: {all}");
    crate::delivery_interop::validate(&served);
}
