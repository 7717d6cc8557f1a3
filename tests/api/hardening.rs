//! Hardening found by outside testing: scopes on what preview and status changes reveal, panics on caller input,
//! bounds on records, control characters, ids that no URL can reach.

use carebridge::config::{ApiKeySettings, Scope};
use carebridge::keys::KeyHash;
use serde_json::{Value, json};

use crate::helpers::{TestApp, WRITER_KEY, raw_http, spawn_app, spawn_app_with};

/// A fixture record without its `id`, so it can be stored under another.
fn fixture(kind: &str, id: &str) -> Value {
    let mut record = crate::helpers::fixture(kind, id);
    if let Some(o) = record.as_object_mut() {
        o.remove("id");
    }
    record
}

/// A key with only the write scope.
const WRITE_ONLY_KEY: &str = "test-write-only-key";

async fn app_with_write_only_key() -> TestApp {
    spawn_app_with(|s| {
        s.api_keys.push(ApiKeySettings {
            name: "write-only".into(),
            hash: KeyHash::generate(WRITE_ONLY_KEY).expect("randomness").to_string(),
            scopes: vec![Scope::Write],
            partner: None,
        });
    })
    .await
}

async fn post_as(app: &TestApp, key: &str, path: &str, body: &Value) -> reqwest::Response {
    app.client.post(format!("{}{path}", app.base)).bearer_auth(key).json(body).send().await.expect("sent")
}

#[tokio::test]
async fn a_write_only_key_previews_a_referral_without_seeing_the_stored_client() {
    let app = app_with_write_only_key().await;
    assert_eq!(app.put("/api/v1/clients/cl-1001", &fixture("client", "cl-1001")).await.status(), 201);
    let referral = fixture("referral", "ref-4001");
    assert_eq!(referral["client_id"], "cl-1001", "the fixture referral names the stored client");

    let blind = post_as(&app, WRITE_ONLY_KEY, "/api/v1/preview/referral", &referral).await;
    assert_eq!(blind.status(), 200);
    let text = blind.text().await.expect("body");
    for phi in ["Lopez", "Maria", "1987-03-14", "555-0142", "OR8812345", "Division"] {
        assert!(!text.contains(phi), "a write-only preview shows the stored client's {phi}: {text}");
    }
    let blind: Value = serde_json::from_str(&text).expect("JSON");
    let types: Vec<&str> = blind["fhir"]["entry"]
        .as_array()
        .expect("a Bundle")
        .iter()
        .filter_map(|e| e["resource"]["resourceType"].as_str())
        .collect();
    assert!(!types.contains(&"Patient"), "{types:?}");

    // A key that may read sees the Patient made from the stored client.
    let sighted = post_as(&app, WRITER_KEY, "/api/v1/preview/referral", &referral).await;
    assert_eq!(sighted.status(), 200);
    assert!(sighted.text().await.expect("body").contains("Lopez"));
    app.stop().await;
}

#[tokio::test]
async fn a_write_only_key_moves_a_referral_and_gets_no_body_back() {
    let app = app_with_write_only_key().await;
    app.put_clients().await;
    assert_eq!(app.put("/api/v1/referrals/ref-4001", &fixture("referral", "ref-4001")).await.status(), 201);
    let moved = post_as(
        &app,
        WRITE_ONLY_KEY,
        "/api/v1/referrals/ref-4001/status",
        &json!({"status": "cancelled", "reason": "moved"}),
    )
    .await;
    assert_eq!(moved.status(), 204);
    assert_eq!(moved.headers()["etag"], "\"2\"");
    assert!(moved.text().await.expect("body").is_empty());
    let read = app
        .client
        .get(format!("{}/api/v1/referrals/ref-4001", app.base))
        .bearer_auth(WRITE_ONLY_KEY)
        .send()
        .await
        .expect("sent");
    assert_eq!(read.status(), 403);
    assert_eq!(app.get_json("/api/v1/referrals/ref-4001").await["status"], "cancelled");
    app.stop().await;
}

#[tokio::test]
async fn last_updated_values_that_used_to_panic_are_answered_without_a_500() {
    let app = spawn_app().await;
    for (query, expected) in [
        ("_lastUpdated=%E2%82%AC", 400),
        ("_lastUpdated=g%C3%A9", 400),
        ("_lastUpdated=%E2%82%AC2026-01-01", 400),
        ("_lastUpdated=le9999-12-31T23:59:59.999999999Z", 200),
        ("_lastUpdated=ge0000-01-01T00:00:00Z", 200),
        ("_lastUpdated=ge-9999-01-01", 400),
        ("_offset=4294967295&_count=100", 200),
    ] {
        let response = app.get(&format!("/fhir/HealthcareService?{query}")).await;
        assert_eq!(response.status(), expected, "{query}");
        let body: Value = response.json().await.expect("FHIR JSON");
        let expected_type = if expected == 200 { "Bundle" } else { "OperationOutcome" };
        assert_eq!(body["resourceType"], expected_type, "{query}");
    }
    app.stop().await;
}

fn assessment_with_needs(needs: Vec<&str>) -> Value {
    let mut a = fixture("assessment", "as-2001");
    a["identified_needs"] = json!(needs);
    a
}

#[tokio::test]
async fn an_assessment_with_seventy_thousand_needs_is_refused_quickly_with_a_short_answer() {
    let app = spawn_app().await;
    let codes = ["depression", "anxiety", "trauma", "suicide_risk"];
    let needs: Vec<&str> = (0..74_000).map(|i| codes[i % codes.len()]).collect();
    let body = assessment_with_needs(needs);
    for (method, path) in [("PUT", "/api/v1/assessments/as-9001"), ("POST", "/api/v1/preview/assessment")] {
        let started = std::time::Instant::now();
        let response = app.request(method.parse().expect("method"), path).json(&body).send().await.expect("sent");
        assert_eq!(response.status(), 422, "{method} {path}");
        let text = response.text().await.expect("body");
        assert!(text.len() < 20_000, "{method} {path}: a {} byte answer", text.len());
        let problem: Value = serde_json::from_str(&text).expect("problem");
        assert_eq!(problem["errors"][0]["path"], "$.identified_needs[4]");
        assert!(
            problem["errors"]
                .as_array()
                .expect("errors")
                .iter()
                .any(|e| e["detail"].as_str().is_some_and(|d| d.contains("more error(s) not listed")))
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "{method} {path} took {:?}", started.elapsed());
    }
    app.stop().await;
}

#[tokio::test]
async fn a_need_listed_twice_is_refused_where_it_would_make_two_bundle_entries_with_one_full_url() {
    let app = spawn_app().await;
    let twice = assessment_with_needs(vec!["depression", "depression"]);
    for path in ["/api/v1/assessments/as-9002", "/api/v1/preview/assessment"] {
        let method = if path.contains("preview") { reqwest::Method::POST } else { reqwest::Method::PUT };
        let response = app.request(method, path).json(&twice).send().await.expect("sent");
        assert_eq!(response.status(), 422, "{path}");
        let problem: Value = response.json().await.expect("problem");
        assert_eq!(problem["errors"][0]["path"], "$.identified_needs[1]", "{path}");
    }
    let mut referral = fixture("referral", "ref-4001");
    referral["care_plan_id"] = json!("cp-3001");
    referral["goal_ids"] = json!(["g1", "g1"]);
    let response = app.put("/api/v1/referrals/ref-9003", &referral).await;
    assert_eq!(response.status(), 422);
    let problem: Value = response.json().await.expect("problem");
    assert_eq!(problem["errors"][0]["path"], "$.goal_ids[1]");
    app.stop().await;
}

#[tokio::test]
async fn lists_over_their_bounds_are_refused_and_the_bounds_are_in_the_openapi_document() {
    let app = spawn_app().await;
    let mut plan = fixture("care-plan", "cp-3001");
    let need = plan["needs"][0].clone();
    let needs: Vec<Value> = (0..31)
        .map(|i| {
            let mut n = need.clone();
            n["id"] = json!(format!("n{i}"));
            n
        })
        .collect();
    plan["needs"] = json!(needs);
    plan["goals"] = json!([]);
    plan["interventions"] = json!([]);
    let response = app.put("/api/v1/care-plans/cp-9004", &plan).await;
    assert_eq!(response.status(), 422);
    let problem: Value = response.json().await.expect("problem");
    assert_eq!(problem["errors"][0]["path"], "$.needs");
    assert_eq!(problem["errors"][0]["detail"], "has at most 30 elements");

    let doc = app.get_json("/api/v1/openapi.json").await;
    let schemas = &doc["components"]["schemas"];
    assert_eq!(schemas["CarePlan"]["properties"]["needs"]["maxItems"], 30);
    assert_eq!(schemas["CarePlan"]["properties"]["goals"]["maxItems"], 50);
    assert_eq!(schemas["Assessment"]["properties"]["identified_needs"]["maxItems"], 14);
    assert_eq!(schemas["Referral"]["properties"]["notes"]["maxItems"], 200);
    assert_eq!(schemas["Client"]["properties"]["given_name"]["maxLength"], 200);
    app.stop().await;
}

#[tokio::test]
async fn control_characters_and_invisible_names_are_refused_but_notes_keep_their_line_breaks() {
    let app = spawn_app().await;
    app.put_clients().await;
    let client = fixture("client", "cl-1001");
    for (field, value) in [
        ("given_name", "Ma\u{0}ria"),
        ("family_name", "Lopez\u{1b}[2J"),
        ("given_name", "Maria\r\n{\"level\":\"ERROR\"}"),
        ("given_name", "\u{200B}\u{200C}\u{200D}"),
        ("phone", "+1-503-555-0142\n"),
    ] {
        let mut bad = client.clone();
        bad[field] = json!(value);
        let response = app.put("/api/v1/clients/cl-9005", &bad).await;
        assert_eq!(response.status(), 422, "{field} = {value:?}");
        let problem: Value = response.json().await.expect("problem");
        assert_eq!(problem["errors"][0]["path"], format!("$.{field}"), "{value:?}");
    }
    let mut referral = fixture("referral", "ref-4001");
    referral["notes"] = json!([{"at": "2026-11-24T10:00:00Z", "author": "staff-jellis", "text": "Called.\r\nNo answer;\tleft a message."}]);
    assert_eq!(app.put("/api/v1/referrals/ref-9005", &referral).await.status(), 201);
    referral["notes"][0]["text"] = json!("Called.\u{1b}[31m");
    assert_eq!(app.put("/api/v1/referrals/ref-9006", &referral).await.status(), 422);
    app.stop().await;
}

#[tokio::test]
async fn ids_made_only_of_dots_and_dashes_are_refused() {
    let app = spawn_app().await;
    // A valid client without an id, so only the path id can be refused.
    let body = serde_json::to_string(&fixture("client", "cl-1001")).expect("JSON");
    for id in ["..", ".", "-", "%2e%2e", "%2E", "--", ".-."] {
        let request = format!(
            "PUT /api/v1/clients/{id} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            crate::helpers::ADMIN_KEY,
            body.len()
        );
        let answer = raw_http(&app.base, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{id}: {answer}");
        assert!(answer.contains("urn:carebridge:problem:invalid-id"), "{id}: {answer}");
    }
    app.stop().await;
}
