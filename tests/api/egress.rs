//! Consent-driven egress through the API: intake refuses records whose links between a client's records cannot be
//! right, and preview says per partner what delivery would send, leave out or hold, and why.

use serde_json::{Value, json};

use crate::helpers::{TestApp, fixture, spawn_app};

async fn refused(app: &TestApp, path: &str, body: &Value) -> Vec<(String, String)> {
    let response = app.put(path, body).await;
    assert_eq!(response.status(), 422, "{path}");
    let problem: Value = response.json().await.expect("problem");
    problem["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .map(|e| {
            (e["path"].as_str().unwrap_or_default().to_owned(), e["detail"].as_str().unwrap_or_default().to_owned())
        })
        .collect()
}

#[tokio::test]
async fn a_record_of_a_client_the_gateway_does_not_hold_is_refused_with_its_path() {
    let app = spawn_app().await;
    for (kind, id) in [("assessment", "as-2005"), ("referral", "ref-4001"), ("consent", "co-5001")] {
        let errors = refused(&app, &format!("/api/v1/{kind}s/{id}"), &fixture(kind, id)).await;
        assert_eq!(errors[0].0, "$.client_id", "{kind}: {errors:?}");
        assert!(errors[0].1.contains("no client"), "{errors:?}");
        assert_eq!(app.get(&format!("/api/v1/{kind}s/{id}")).await.status(), 404, "nothing was kept");
    }
    app.stop().await;
}

#[tokio::test]
async fn a_care_plan_citing_another_clients_assessment_or_none_is_refused_at_the_citation() {
    let app = spawn_app().await;
    app.put_clients().await;
    // as-2005 is cl-1004's DAST-10; cp-3001 is cl-1001's plan.
    assert_eq!(app.put("/api/v1/assessments/as-2005", &fixture("assessment", "as-2005")).await.status(), 201);
    for id in ["as-2001", "as-2007"] {
        assert_eq!(app.put(&format!("/api/v1/assessments/{id}"), &fixture("assessment", id)).await.status(), 201);
    }
    let mut plan = fixture("care-plan", "cp-3001");
    plan["needs"][0]["assessment_id"] = json!("as-2005");
    let errors = refused(&app, "/api/v1/care-plans/cp-3001", &plan).await;
    assert_eq!(errors, [("$.needs[0].assessment_id".to_owned(), "this assessment is another client's".to_owned())]);
    plan["needs"][0]["assessment_id"] = json!("as-9999");
    let errors = refused(&app, "/api/v1/care-plans/cp-3001", &plan).await;
    assert_eq!(errors, [("$.needs[0].assessment_id".to_owned(), "no assessment of this id is held".to_owned())]);
    plan["needs"][0]["assessment_id"] = json!("as-2001");
    plan["goals"][0]["progress"] =
        json!([{"date": "2026-10-01", "achievement": "improving", "assessment_id": "as-2005"}]);
    let errors = refused(&app, "/api/v1/care-plans/cp-3001", &plan).await;
    assert_eq!(errors[0].0, "$.goals[0].progress[0].assessment_id", "{errors:?}");
    // A referral citing another client's care plan.
    let mut other = fixture("care-plan", "cp-3003");
    other["needs"][0]["assessment_id"] = json!("as-2005");
    assert_eq!(app.put("/api/v1/care-plans/cp-3003", &other).await.status(), 201);
    let mut referral = fixture("referral", "ref-4001");
    referral["care_plan_id"] = json!("cp-3003");
    let errors = refused(&app, "/api/v1/referrals/ref-4001", &referral).await;
    assert_eq!(errors[0].0, "$.care_plan_id", "{errors:?}");
    // A referral citing another client's consent.
    assert_eq!(app.put("/api/v1/consents/co-5002", &fixture("consent", "co-5002")).await.status(), 201);
    let mut referral = fixture("referral", "ref-4001");
    referral["consent_id"] = json!("co-5002");
    let errors = refused(&app, "/api/v1/referrals/ref-4001", &referral).await;
    assert_eq!(errors, [("$.consent_id".to_owned(), "this consent is another client's".to_owned())]);
    app.stop().await;
}

#[tokio::test]
async fn a_consent_signed_after_its_period_ended_is_refused() {
    let app = spawn_app().await;
    app.put_clients().await;
    let mut consent = fixture("consent", "co-5001");
    consent["period"] = json!({"start": "2026-01-01", "end": "2026-03-31"});
    consent["signed_on"] = json!("2026-04-02");
    let errors = refused(&app, "/api/v1/consents/co-5001", &consent).await;
    assert_eq!(errors[0].0, "$.signed_on", "{errors:?}");
    app.stop().await;
}

fn decision<'a>(body: &'a Value, partner: &str) -> &'a Value {
    body["partners"]
        .as_array()
        .expect("partners")
        .iter()
        .find(|p| p["partner"] == partner)
        .unwrap_or_else(|| panic!("no {partner} in {body}"))
}

#[tokio::test]
async fn preview_says_per_partner_what_would_be_sent_left_out_and_held() {
    let app = spawn_app().await;
    app.put_clients().await;
    for (kind, id) in [("assessment", "as-2001"), ("assessment", "as-2007"), ("consent", "co-5001")] {
        assert_eq!(app.put(&format!("/api/v1/{kind}s/{id}"), &fixture(kind, id)).await.status(), 201);
    }
    // cl-1001's plan with a substance-use need beside its depression: co-5001 covers general and mental health only.
    let mut plan = fixture("care-plan", "cp-3001");
    plan["needs"]
        .as_array_mut()
        .expect("needs")
        .push(json!({"id": "need-sud", "code": "substance_use", "status": "active"}));
    plan["goals"].as_array_mut().expect("goals").push(json!({"id": "goal-sud", "description": "Abstinent 90 days",
        "need_ids": ["need-sud"], "lifecycle_status": "active"}));
    let body: Value = app.post("/api/v1/preview/care-plan", &plan).await.json().await.expect("JSON");
    let st_marys = decision(&body, "st-marys-ehr");
    assert_eq!(st_marys["decision"], "redact", "{st_marys}");
    assert_eq!(st_marys["consents"], json!(["co-5001"]));
    let left: Vec<&str> =
        st_marys["left_out"].as_array().expect("left out").iter().filter_map(|l| l["what"].as_str()).collect();
    assert_eq!(left, ["need need-sud (substance_use)", "goal goal-sud"], "{st_marys}");
    // What it would send carries labels, and no Part 2 label.
    let resources = st_marys["resources"].as_array().expect("resources");
    assert!(resources.iter().all(|r| r["labels"][0] == "N" || r["labels"][0] == "R"), "{st_marys}");
    assert!(!st_marys.to_string().contains("\"SUD\""), "{st_marys}");
    // With ?partner=, the FHIR shown is the redacted one.
    let focused: Value =
        app.post("/api/v1/preview/care-plan?partner=st-marys-ehr", &plan).await.json().await.expect("JSON");
    assert_eq!(focused["sendable"], true, "{}", focused["violations"]);
    assert!(!focused["fhir"].to_string().contains("substance_use"), "{}", focused["fhir"]);
    assert!(focused["fhir"]["meta"]["security"].is_array(), "the Bundle carries its high-water mark");

    // cl-1004's DAST-10: no partner receiving assessments has grounds; held, with the reason, never the values.
    assert_eq!(app.put("/api/v1/assessments/as-2005", &fixture("assessment", "as-2005")).await.status(), 201);
    let body: Value =
        app.post("/api/v1/preview/assessment", &fixture("assessment", "as-2005")).await.json().await.expect("JSON");
    let held = decision(&body, "st-marys-ehr");
    assert_eq!(held["decision"], "hold");
    assert!(held["reason"].as_str().is_some_and(|r| r.contains("no consent or referral")), "{held}");
    assert_eq!(held["resources"], json!([]));
    let focused: Value = app
        .post("/api/v1/preview/assessment?partner=st-marys-ehr", &fixture("assessment", "as-2005"))
        .await
        .json()
        .await
        .expect("JSON");
    assert_eq!(focused["sendable"], false, "held for the partner: not sendable");
    app.stop().await;
}
