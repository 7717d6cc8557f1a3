//! Operations endpoints: health, readiness, metrics, the OpenAPI document, and the demo seed.

use serde_json::Value;

use crate::helpers::{fixture, spawn_app, spawn_app_with};

#[tokio::test]
async fn health_and_readiness_answer_without_a_key() {
    let app = spawn_app().await;
    let health: Value =
        app.client.get(format!("{}/healthz", app.base)).send().await.expect("sent").json().await.expect("JSON");
    assert_eq!(health["status"], "ok");
    let ready = app.client.get(format!("{}/readyz", app.base)).send().await.expect("sent");
    assert_eq!(ready.status(), 200);
    let ready: Value = ready.json().await.expect("JSON");
    assert_eq!(ready["database"], "sqlite");
    app.stop().await;
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_status_and_show_pool_gauges() {
    let app = spawn_app().await;
    app.put("/api/v1/clients/cl-1001", &fixture("client", "cl-1001")).await;
    app.get("/api/v1/clients/cl-1001").await;
    app.get("/api/v1/clients/cl-9").await;
    let text = app.client.get(format!("{}/metrics", app.base)).send().await.expect("sent").text().await.expect("text");
    for needle in [
        "carebridge_http_requests_total{method=\"PUT\",route=\"/api/v1/clients/{id}\",status=\"201\"}",
        "carebridge_http_requests_total{method=\"GET\",route=\"/api/v1/clients/{id}\",status=\"404\"}",
        "carebridge_http_request_duration_seconds_bucket",
        "carebridge_db_pool_connections{pool=\"writer\"",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    assert!(!text.contains("cl-1001"), "ids never become metric labels");
    app.stop().await;
}

#[tokio::test]
async fn the_openapi_document_describes_every_route_and_field() {
    let app = spawn_app().await;
    let doc: Value = app.get_json("/api/v1/openapi.json").await;
    assert!(doc["openapi"].as_str().expect("version").starts_with("3.1"));
    for path in [
        "/api/v1/clients/{id}",
        "/api/v1/assessments",
        "/api/v1/care-plans/{id}/history",
        "/api/v1/referrals/{id}/status",
        "/api/v1/consents/{id}/history/{version}",
        "/api/v1/audit-events",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} undocumented");
    }
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    for name in ["Client", "Assessment", "CarePlan", "Goal", "Intervention", "Referral", "Consent", "Problem"] {
        let schema = &schemas[name];
        let properties = schema["properties"].as_object().unwrap_or_else(|| panic!("{name} has no properties"));
        for (field, spec) in properties {
            let described = spec.get("description").is_some()
                || spec.get("$ref").is_some()
                || spec["allOf"].as_array().is_some_and(|a| !a.is_empty())
                || spec["oneOf"].as_array().is_some_and(|a| !a.is_empty());
            assert!(described, "{name}.{field} has no description: {spec}");
        }
    }
    assert_eq!(doc["components"]["securitySchemes"]["api_key"]["scheme"], "bearer");
    app.stop().await;
}

#[tokio::test]
async fn the_seed_directory_is_loaded_at_start_and_never_overwrites() {
    let seed = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/agency");
    let app = spawn_app_with(|s| s.seed.dir = Some(seed.into())).await;
    let page: Value = app.get_json("/api/v1/referrals?limit=100").await;
    assert_eq!(page["items"].as_array().expect("items").len(), 7);
    let moved = app.post("/api/v1/referrals/ref-4007/status", &serde_json::json!({"status": "sent"})).await;
    assert_eq!(moved.status(), 200);
    // A second gateway on the same database seeds again: the status it moved stays.
    let db = app.dir.path().join("carebridge.db");
    let second = spawn_app_with(|s| {
        s.seed.dir = Some(seed.into());
        s.database.url = format!("sqlite:{}", db.display());
    })
    .await;
    let read: Value = second.get("/api/v1/referrals/ref-4007").await.json().await.expect("JSON");
    assert_eq!(read["status"], "sent");
    second.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn a_callers_request_id_is_kept_when_it_looks_like_an_id_and_replaced_otherwise() {
    let app = spawn_app().await;
    let url = format!("{}/healthz", app.base);
    let kept = app.client.get(&url).header("x-request-id", "agency-cms.42_a").send().await.expect("sent");
    assert_eq!(kept.headers()["x-request-id"], "agency-cms.42_a");
    let replaced = app.client.get(&url).header("x-request-id", "Maria Lopez 1987-03-14").send().await.expect("sent");
    let id = replaced.headers()["x-request-id"].to_str().expect("ascii");
    assert!(!id.contains("Maria") && uuid::Uuid::parse_str(id).is_ok(), "{id}");
    let minted = app.client.get(&url).send().await.expect("sent");
    assert!(uuid::Uuid::parse_str(minted.headers()["x-request-id"].to_str().expect("ascii")).is_ok());
    app.stop().await;
}
