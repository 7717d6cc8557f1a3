//! Answers of the authenticated routes carry `Cache-Control: no-store`, errors included: no browser or proxy
//! cache keeps a copy of a record.

use crate::helpers::{fixture, spawn_app};

fn assert_no_store(response: &reqwest::Response, what: &str) {
    let value = response.headers().get("cache-control").and_then(|v| v.to_str().ok());
    assert_eq!(value, Some("no-store"), "{what} ({})", response.status());
}

#[tokio::test]
async fn records_lists_errors_and_previews_are_marked_no_store() {
    let app = spawn_app().await;
    let put = app.put("/api/v1/clients/cl-1001", &fixture("client", "cl-1001")).await;
    assert_eq!(put.status(), 201);
    assert_no_store(&put, "a write");
    let record = app.get("/api/v1/clients/cl-1001").await;
    assert_eq!(record.status(), 200);
    assert_no_store(&record, "a record");
    let list = app.get("/api/v1/clients").await;
    assert_eq!(list.status(), 200);
    assert_no_store(&list, "a list");
    let missing = app.get("/api/v1/clients/cl-9999").await;
    assert_eq!(missing.status(), 404);
    assert_no_store(&missing, "a 404");
    let no_route = app.get("/api/v1/nowhere").await;
    assert_eq!(no_route.status(), 404);
    assert_no_store(&no_route, "an unknown route");
    let unauthenticated = app.client.get(format!("{}/api/v1/clients/cl-1001", app.base)).send().await.expect("sent");
    assert_eq!(unauthenticated.status(), 401);
    assert_no_store(&unauthenticated, "a 401");
    let preview = app.post("/api/v1/preview/client", &fixture("client", "cl-1001")).await;
    assert_eq!(preview.status(), 200);
    assert_no_store(&preview, "a preview");
    let fhir = app.get("/fhir/HealthcareService/nope").await;
    assert_eq!(fhir.status(), 404);
    assert_no_store(&fhir, "a FHIR 404");
    let hsds = app.get("/hsds/services").await;
    assert_no_store(&hsds, "an HSDS list");
    app.stop().await;
}
