//! The catalog published as FHIR (`/fhir/HealthcareService`, `Organization`, `Location`, `metadata`).

use serde_json::Value;

use crate::directories::catalog_app;

async fn fhir_get(app: &crate::helpers::TestApp, path: &str) -> (u16, String, Value) {
    let response = app.get(path).await;
    let status = response.status().as_u16();
    let ctype = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    (status, ctype, response.json().await.expect("JSON"))
}

fn ids(bundle: &Value) -> Vec<String> {
    bundle["entry"]
        .as_array()
        .map(|es| es.iter().filter_map(|e| e["resource"]["id"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn the_catalog_is_searchable_as_fhir_healthcare_services() {
    let app = catalog_app(None).await;
    listings_filter_and_page_the_catalog(&app).await;
    app.stop().await;
}

/// The publication listing contract, run on SQLite here and on PostgreSQL in `store_contract`.
pub async fn listings_filter_and_page_the_catalog(app: &crate::helpers::TestApp) {
    let (status, ctype, all) = fhir_get(app, "/fhir/HealthcareService?_count=100").await;
    assert_eq!(status, 200);
    assert_eq!(ctype, "application/fhir+json");
    assert_eq!(all["type"], "searchset");
    assert_eq!(all["total"], 24);
    assert_eq!(ids(&all).len(), 24);

    // By agency category (plain code or system|code), by name part.
    let (_, _, crisis) = fhir_get(app, "/fhir/HealthcareService?service-category=crisis_care").await;
    let (_, _, crisis2) =
        fhir_get(app, "/fhir/HealthcareService?service-category=urn:carebridge:vocabulary:service|crisis_care").await;
    assert!(crisis["total"].as_u64().expect("total") >= 1);
    assert_eq!(ids(&crisis), ids(&crisis2));
    for e in crisis["entry"].as_array().expect("entries") {
        let codes: Vec<&str> = e["resource"]["category"]
            .as_array()
            .expect("categories")
            .iter()
            .filter_map(|c| c["coding"][0]["code"].as_str())
            .collect();
        assert!(codes.contains(&"crisis_care"), "{codes:?}");
    }
    let first = &all["entry"][0]["resource"];
    let word = first["name"].as_str().expect("name").split_whitespace().next().expect("a word").to_lowercase();
    let (_, _, named) = fhir_get(app, &format!("/fhir/HealthcareService?name={word}")).await;
    assert!(ids(&named).contains(&first["id"].as_str().expect("id").to_owned()));

    // By organisation and location references, both forms.
    let org_ref = first["providedBy"]["reference"].as_str().expect("providedBy");
    let (_, _, by_org) = fhir_get(app, &format!("/fhir/HealthcareService?organization={org_ref}")).await;
    assert!(ids(&by_org).contains(&first["id"].as_str().expect("id").to_owned()));
    let loc_ref = first["location"][0]["reference"].as_str().expect("location");
    let loc_id = loc_ref.trim_start_matches("Location/");
    let (_, _, by_loc) = fhir_get(app, &format!("/fhir/HealthcareService?location={loc_id}")).await;
    assert!(ids(&by_loc).contains(&first["id"].as_str().expect("id").to_owned()));

    // _lastUpdated: everything is older than tomorrow, nothing is newer.
    let (_, _, newer) = fhir_get(app, "/fhir/HealthcareService?_lastUpdated=gt2099-01-01T00:00:00Z").await;
    assert_eq!(newer["total"], 0);
    let (_, _, older) = fhir_get(app, "/fhir/HealthcareService?_lastUpdated=lt2099-01-01").await;
    assert_eq!(older["total"], 24);
    let (status, ctype, bad) = fhir_get(app, "/fhir/HealthcareService?_lastUpdated=soon").await;
    assert_eq!((status, ctype.as_str()), (400, "application/fhir+json"));
    assert_eq!(bad["resourceType"], "OperationOutcome");
    let (_, _, orgs) = fhir_get(app, "/fhir/Organization?_count=100").await;
    let org_name = orgs["entry"][0]["resource"]["name"].as_str().expect("name").to_uppercase();
    let (_, _, found) = fhir_get(app, &format!("/fhir/Organization?name={}", &org_name[..4])).await;
    assert!(found["total"].as_u64().expect("total") >= 1, "name search ignores case");
    let (_, _, past_end) = fhir_get(app, "/fhir/HealthcareService?_count=10&_offset=100").await;
    assert_eq!((past_end["total"].as_u64(), ids(&past_end).len()), (Some(24), 0));
}

#[tokio::test]
async fn pages_link_to_each_other_and_cover_every_service_once() {
    let app = catalog_app(None).await;
    let mut seen = Vec::new();
    let mut next = Some(format!("{}/fhir/HealthcareService?_count=10", app.base));
    while let Some(url) = next.take() {
        let path = url.strip_prefix(&app.base).expect("links point at this server").to_owned();
        let (_, _, page) = fhir_get(&app, &path).await;
        seen.extend(ids(&page));
        next = page["link"]
            .as_array()
            .expect("links")
            .iter()
            .find(|l| l["relation"] == "next")
            .and_then(|l| l["url"].as_str())
            .map(str::to_owned);
    }
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!((seen.len(), unique.len()), (24, 24));
    app.stop().await;
}

#[tokio::test]
async fn services_organizations_and_locations_read_by_id_and_unknown_ids_get_an_operation_outcome() {
    let app = catalog_app(None).await;
    let (_, _, all) = fhir_get(&app, "/fhir/HealthcareService?_count=1").await;
    let service = &all["entry"][0]["resource"];
    let id = service["id"].as_str().expect("id");
    let (status, _, read) = fhir_get(&app, &format!("/fhir/HealthcareService/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(&read, service);
    // The identifier a referral's logical `performer` reference carries for this service is on it.
    let ids = service["identifier"].as_array().expect("identifiers");
    assert!(
        ids.iter().any(|i| i["system"] == "https://agency.example.org/fhir/sid/directory-service" && i["value"] == id),
        "{ids:?}"
    );

    let org = service["providedBy"]["reference"].as_str().expect("org");
    let (status, _, organization) = fhir_get(&app, &format!("/fhir/{org}")).await;
    assert_eq!(status, 200);
    assert_eq!(organization["resourceType"], "Organization");
    let loc = service["location"][0]["reference"].as_str().expect("loc");
    let (status, _, location) = fhir_get(&app, &format!("/fhir/{loc}")).await;
    assert_eq!(status, 200);
    assert!(location["position"]["latitude"].is_number());

    let (_, _, orgs) = fhir_get(&app, "/fhir/Organization?_count=100").await;
    assert!(orgs["total"].as_u64().expect("total") >= 1);
    let (_, _, locs) = fhir_get(&app, "/fhir/Location?_count=100").await;
    assert!(locs["total"].as_u64().expect("total") >= 1);

    for path in ["/fhir/HealthcareService/nope", "/fhir/Organization/nope", "/fhir/Location/nope"] {
        let (status, ctype, body) = fhir_get(&app, path).await;
        assert_eq!((status, ctype.as_str()), (404, "application/fhir+json"), "{path}");
        assert_eq!(body["issue"][0]["code"], "not-found");
    }
    let (status, _, cap) = fhir_get(&app, "/fhir/metadata").await;
    assert_eq!((status, cap["fhirVersion"].as_str()), (200, Some("4.0.1")));

    // Without a key: an OperationOutcome, not a problem document.
    let anonymous = reqwest::get(format!("{}/fhir/HealthcareService", app.base)).await.expect("sent");
    assert_eq!(anonymous.status(), 401);
    let body: Value = anonymous.json().await.expect("JSON");
    assert_eq!(body["issue"][0]["code"], "login");
    app.stop().await;
}

/// `taxonomy_term_id` and `organization_id` take the HSDS ids the API publishes; run on SQLite here and on
/// PostgreSQL in `store_contract`.
pub async fn hsds_filters_by_taxonomy_term_and_organization(app: &crate::helpers::TestApp) {
    let all: Value = app.get_json("/hsds/services?per_page=100").await;
    let mut by_term: std::collections::BTreeMap<String, Vec<String>> = std::collections::BTreeMap::new();
    let mut by_org: std::collections::BTreeMap<String, Vec<String>> = std::collections::BTreeMap::new();
    for summary in all["contents"].as_array().expect("contents") {
        let id = summary["id"].as_str().expect("id").to_owned();
        let full: Value = app.get_json(&format!("/hsds/services/{id}")).await;
        for a in full["attributes"].as_array().expect("attributes") {
            by_term.entry(a["taxonomy_term_id"].as_str().expect("term id").to_owned()).or_default().push(id.clone());
        }
        by_org.entry(full["organization"]["id"].as_str().expect("organization").to_owned()).or_default().push(id);
    }
    assert!(by_term.len() > 3 && by_org.len() > 3, "the fixture has several terms and organisations");
    for (term, mut expected) in by_term {
        let page: Value = app.get_json(&format!("/hsds/services?taxonomy_term_id={term}&per_page=100")).await;
        let mut found = crate::helpers::pluck(&page, "contents", "id");
        found.sort();
        expected.sort();
        assert_eq!(found, expected, "taxonomy_term_id={term}");
    }
    for (org, mut expected) in by_org {
        let page: Value = app.get_json(&format!("/hsds/services?organization_id={org}&per_page=100")).await;
        let mut found = crate::helpers::pluck(&page, "contents", "id");
        found.sort();
        expected.sort();
        assert_eq!(found, expected, "organization_id={org}");
    }
    let none: Value = app.get_json("/hsds/services?organization_id=00000000-0000-0000-0000-000000000000").await;
    assert_eq!(none["total_items"], 0);
}

#[tokio::test]
async fn the_catalog_is_published_as_an_hsds_api_with_uuid_ids() {
    let app = catalog_app(None).await;
    let root: Value = app.get_json("/hsds/").await;
    assert_eq!(root["version"], "3.0.1");

    let page: Value = app.get_json("/hsds/services?per_page=10&page=2").await;
    assert_eq!(page["total_items"], 24);
    assert_eq!(page["total_pages"], 3);
    assert_eq!((page["page_number"].as_u64(), page["size"].as_u64()), (Some(2), Some(10)));
    assert_eq!((page["first_page"].as_bool(), page["last_page"].as_bool()), (Some(false), Some(false)));
    let id = page["contents"][0]["id"].as_str().expect("id");
    assert!(uuid::Uuid::parse_str(id).is_ok(), "HSDS ids are UUIDs: {id}");

    let service: Value = app.get_json(&format!("/hsds/services/{id}")).await;
    assert_eq!(service["id"], id);
    assert_eq!(service["name"], page["contents"][0]["name"]);
    assert!(service["service_at_locations"][0]["location"]["latitude"].is_number(), "{service}");
    assert_eq!(service["organization"]["id"], page["contents"][0]["organization_id"]);

    let newer: Value = app.get_json("/hsds/services?modified_after=2099-01-01T00:00:00Z").await;
    assert_eq!((newer["total_items"].as_u64(), newer["empty"].as_bool()), (Some(0), Some(true)));
    let older: Value = app.get_json("/hsds/services?modified_after=2000-01-01T00:00:00Z&per_page=100").await;
    assert_eq!(older["total_items"], 24);
    let word = service["name"].as_str().expect("name").split_whitespace().next().expect("word").to_lowercase();
    let found: Value = app.get_json(&format!("/hsds/services?search={word}")).await;
    assert!(found["contents"].as_array().expect("contents").iter().any(|s| s["id"] == id));

    hsds_filters_by_taxonomy_term_and_organization(&app).await;

    assert_eq!(app.get("/hsds/services/00000000-0000-0000-0000-000000000000").await.status(), 404);
    assert_eq!(app.get("/hsds/services?modified_after=yesterday").await.status(), 400);
    assert_eq!(app.get("/hsds/services?taxonomy_term_id=therapy").await.status(), 400);
    assert_eq!(app.get("/hsds/services?organization_id=42").await.status(), 400);
    assert_eq!(app.get("/hsds/services?colour=blue").await.status(), 400);
    app.stop().await;
}
