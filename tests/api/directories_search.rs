//! What a sync keeps of a full HSDS service and how the catalog finds it: location and service-at-location
//! phones, languages and hours, alternate names, term hierarchies and a source's category map, against the fake
//! HSDS API; and search quality (prefixes on the word as typed, folded diacritics, queries without a word).
//! `search_quality` runs on SQLite here and on PostgreSQL in `store_contract`.

use carebridge::config::SearchEngine;
use serde_json::{Value, json};

use crate::helpers::{TestApp, spawn_app_with};
use crate::hsds_api_fake::FakeHsdsApi;

/// The source id (a UUID) of each service below.
pub const HOUSTON: &str = "0b8f1e2a-3c4d-4e5f-8a6b-7c8d9e0f1a01";
pub const HOUSEHOLDS: &str = "0b8f1e2a-3c4d-4e5f-8a6b-7c8d9e0f1a02";
pub const HOUSING: &str = "0b8f1e2a-3c4d-4e5f-8a6b-7c8d9e0f1a03";
pub const SUC_KHOE: &str = "0b8f1e2a-3c4d-4e5f-8a6b-7c8d9e0f1a04";
pub const WESTSIDE: &str = "0b8f1e2a-3c4d-4e5f-8a6b-7c8d9e0f1a05";
pub const PARENT: &str = "0b8f1e2a-3c4d-4e5f-8a6b-7c8d9e0f1a06";
pub const PANTRY: &str = "0b8f1e2a-3c4d-4e5f-8a6b-7c8d9e0f1a07";

/// Ids of the open-eligibility terms: a parent and its child.
const MENTAL_HEALTH_TERM: &str = "6a1b2c3d-4e5f-4a6b-8c7d-8e9f0a1b2c01";
const COUNSELING_TERM: &str = "6a1b2c3d-4e5f-4a6b-8c7d-8e9f0a1b2c02";
const EMERGENCY_FOOD_TERM: &str = "6a1b2c3d-4e5f-4a6b-8c7d-8e9f0a1b2c03";

fn term(attribute: &str, id: &str, code: &str, name: &str, parent: Option<&str>) -> Value {
    let mut t = json!({"id": id, "code": code, "name": name, "taxonomy": "open-eligibility"});
    if let Some(parent) = parent {
        t["parent_id"] = json!(parent);
    }
    json!({"id": attribute, "link_type": "service", "link_entity": "service", "taxonomy_term": t})
}

fn service(id: &str, name: &str, description: &str) -> Value {
    json!({"id": id, "name": name, "description": description, "status": "active",
           "last_modified": "2026-09-01T10:00:00Z"})
}

/// A location of Westside Clinic; only the fourth has hours, a language and a phone line with one.
fn location(n: u32) -> Value {
    let mut l = json!({
        "id": format!("9d0e1f2a-3b4c-4d5e-8f6a-7b8c9d0e1f{n:02}"), "location_type": "physical",
        "name": format!("Westside site {n}"), "latitude": 45.50 + f64::from(n) / 100.0, "longitude": -122.70,
    });
    if n == 4 {
        l["schedules"] = json!([{"id": "5b6c7d8e-9f0a-4b1c-8d2e-3f4a5b6c7d01", "freq": "WEEKLY", "byday": "MO",
            "opens_at": "09:00", "closes_at": "17:00"}]);
        l["languages"] = json!([{"id": "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c01", "code": "es"}]);
        l["phones"] = json!([{"id": "2b3c4d5e-6f7a-4b8c-9d0e-1f2a3b4c5d01", "number": "503-555-0144",
            "languages": [{"id": "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c02", "code": "vi"}]}]);
    }
    json!({"id": format!("3c4d5e6f-7a8b-4c9d-8e0f-1a2b3c4d5e{n:02}"), "location": l,
           "phones": if n == 2 { json!([{"id": "2b3c4d5e-6f7a-4b8c-9d0e-1f2a3b4c5d02", "number": "503-555-0122"}]) } else { json!([]) }})
}

/// Seven services in the full HSDS 3.0.1 shape: look-alike words, Vietnamese, a five-location service with hours
/// only on one location, a parent term and its child, and a term only the source's category map makes a category.
pub fn services() -> Vec<Value> {
    let mut westside = service(WESTSIDE, "Westside Clinic", "Walk-in counselling for adults.  \n");
    westside["alternate_name"] = json!("Rosewood Counseling Annex");
    westside["organization"] = json!({"id": "7e8f9a0b-1c2d-4e3f-8a4b-5c6d7e8f9a01", "name": "Westside Health",
        "description": "Community clinic.", "parent_organization_id": "7e8f9a0b-1c2d-4e3f-8a4b-5c6d7e8f9a02"});
    westside["service_at_locations"] = json!((1..=5).map(location).collect::<Vec<_>>());
    westside["attributes"] = json!([term(
        "8f9a0b1c-2d3e-4f4a-8b5c-6d7e8f9a0b01",
        COUNSELING_TERM,
        "counseling",
        "Counseling",
        Some(MENTAL_HEALTH_TERM)
    )]);
    let mut parent = service(PARENT, "Behavioral Health Navigation", "Help finding mental health care.");
    parent["attributes"] = json!([term(
        "8f9a0b1c-2d3e-4f4a-8b5c-6d7e8f9a0b02",
        MENTAL_HEALTH_TERM,
        "mental-health-care",
        "Mental Health Care",
        None
    )]);
    let mut pantry = service(PANTRY, "Northside Pantry", "Groceries every week.");
    pantry["attributes"] = json!([term(
        "8f9a0b1c-2d3e-4f4a-8b5c-6d7e8f9a0b03",
        EMERGENCY_FOOD_TERM,
        "emergency-food",
        "Emergency Food",
        None
    )]);
    vec![
        service(HOUSTON, "Houston Street Clinic", "Primary care on Houston Street."),
        service(HOUSEHOLDS, "Households in Need", "Support for low-income households."),
        service(HOUSING, "Housing Help Desk", "Find housing and apply for rent help."),
        service(SUC_KHOE, "Trung tâm Sức khỏe Cộng đồng", "Chăm sóc sức khỏe tâm thần cho người Việt."),
        westside,
        parent,
        pantry,
    ]
}

/// A gateway syncing [`services`] from the fake API as `metro` (Los Angeles time, the open-eligibility map),
/// on `database` when given.
pub async fn search_app(database: Option<String>) -> (TestApp, FakeHsdsApi) {
    search_app_on(database, SearchEngine::Index).await
}

/// [`search_app`] searching with `engine`.
pub async fn search_app_on(database: Option<String>, engine: SearchEngine) -> (TestApp, FakeHsdsApi) {
    let fake = FakeHsdsApi::with(services());
    let app = gateway_of(&fake, database, engine).await;
    let report = crate::helpers::synced_report(&app, "metro", "mode=full").await;
    assert_eq!(report["added"], 7, "{report}");
    (app, fake)
}

/// A gateway with `fake` as the source `metro`, not synced yet.
pub async fn gateway_of(fake: &FakeHsdsApi, database: Option<String>, engine: SearchEngine) -> TestApp {
    let base = fake.start().await;
    let source: carebridge::config::DirectorySettings = serde_json::from_value(json!({
        "type": "hsds_api", "name": "metro", "base_url": base, "per_page": 3, "timeout_secs": 5, "retries": 0,
        "detail": "per_service", "time_zone": "America/Los_Angeles", "category_map": "directory/open-eligibility-category.json",
    }))
    .expect("a directory source");
    spawn_app_with(|s| {
        if let Some(url) = database {
            s.database.url = url;
        }
        s.directories = vec![source];
        s.search.engine = engine;
    })
    .await
}

fn gateway_id(source_id: &str) -> String {
    carebridge::directories::gateway_id("metro", source_id)
}

/// The source ids of the services a search finds, in order.
pub async fn found(app: &TestApp, query: &str) -> Vec<String> {
    let response = app.get(&format!("/api/v1/services?{query}&per_page=100")).await;
    assert_eq!(response.status(), 200, "{query}: {}", response.text().await.unwrap_or_default());
    let page: Value = response.json().await.expect("JSON");
    page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["id"].as_str().expect("id").trim_start_matches("metro.").to_owned())
        .collect()
}

/// Search quality on the synced [`services`]: every assertion below failed before (or had no feature behind it).
pub async fn search_quality(app: &TestApp) {
    // A complete word is matched by its stem, a prefix only on the word as typed.
    assert_eq!(found(app, "q=housing").await, [HOUSING], "housing finds neither Houston nor Households");
    assert_eq!(found(app, "q=houses").await, [HOUSING], "another form of the word");
    let mut typing = found(app, "q=hous").await;
    typing.sort();
    assert_eq!(typing, [HOUSTON, HOUSEHOLDS, HOUSING], "a word being typed is a prefix");
    // Stacked diacritics fold both ways.
    assert_eq!(found(app, "q=suc%20khoe").await, [SUC_KHOE]);
    assert_eq!(found(app, "q=s%E1%BB%A9c%20kh%E1%BB%8Fe").await, [SUC_KHOE], "sức khỏe");
    assert_eq!(found(app, "q=cong%20dong").await, [SUC_KHOE], "cộng đồng: đ is d");
    // The alternate name is searched with the name.
    assert_eq!(found(app, "q=rosewood").await, [WESTSIDE]);
    assert_eq!(found(app, "q=rosewood&near=45.54,-122.70&radius_km=5").await, [WESTSIDE]);
    // A parent term finds the services of its children.
    let mut parent = found(app, "taxonomy_term=mental-health-care").await;
    parent.sort();
    assert_eq!(parent, [WESTSIDE, PARENT]);
    assert_eq!(found(app, "taxonomy_term=counseling").await, [WESTSIDE], "a child does not find its parent");
    let mut by_id = found(app, &format!("taxonomy_term={MENTAL_HEALTH_TERM}")).await;
    by_id.sort();
    assert_eq!(by_id, [WESTSIDE, PARENT], "by the source's id of the term");
    // Agency categories through the source's ConceptMap (these services carry no agency category themselves).
    assert_eq!(found(app, "category=food_assistance").await, [PANTRY]);
    assert_eq!(found(app, "category=therapy").await, [WESTSIDE]);
    // Languages of a location and of a location's phone line.
    assert_eq!(found(app, "language=es").await, [WESTSIDE]);
    assert_eq!(found(app, "language=vi").await, [WESTSIDE]);
    // Open now through the hours of one of five locations: Monday 13 July 2026, 10:30 in Los Angeles.
    assert_eq!(found(app, "open_at=2026-07-13T17:30:00Z").await, [WESTSIDE]);
    assert!(found(app, "open_at=2026-07-14T17:30:00Z").await.is_empty(), "closed on Tuesday");
    // A query with no word to search for is refused, never answered with every service.
    for q in ["*", "'", "%F0%9F%8C%88", "%20%20%20", ""] {
        let response = app.get(&format!("/api/v1/services?q={q}")).await;
        assert_eq!(response.status(), 400, "q={q}");
        assert_eq!(response.headers()["content-type"], "application/problem+json");
        let problem: Value = response.json().await.expect("problem");
        assert!(problem["detail"].as_str().is_some_and(|d| d.starts_with("q:")), "{problem}");
    }
}

#[tokio::test]
async fn the_catalog_finds_what_it_should_and_nothing_else() {
    let (app, _fake) = search_app(None).await;
    search_quality(&app).await;
    app.stop().await;
}

#[tokio::test]
async fn the_sql_engine_finds_the_same() {
    let (app, _fake) = search_app_on(None, SearchEngine::Sql).await;
    search_quality(&app).await;
    app.stop().await;
}

/// The source changes: Westside's alternate name, the pantry gone (deactivated by the full sync), a new service.
pub fn change_the_source(fake: &FakeHsdsApi) {
    let mut services = fake.services.lock().expect("lock");
    services.retain(|s| s["id"] != PANTRY);
    for s in services.iter_mut().filter(|s| s["id"] == WESTSIDE) {
        s["alternate_name"] = json!("Juniper Counseling Annex");
        s["last_modified"] = json!("2026-10-01T10:00:00Z");
    }
    services.push(service(NEW_SERVICE, "Birchwood Respite House", "Short stays for adults in crisis."));
}

/// The source id of the service [`change_the_source`] adds.
pub const NEW_SERVICE: &str = "0b8f1e2a-3c4d-4e5f-8a6b-7c8d9e0f1a08";

/// What a search finds after [`change_the_source`] and a full sync.
pub async fn finds_the_changes(app: &TestApp) {
    assert!(found(app, "q=rosewood").await.is_empty(), "the old alternate name is gone");
    assert_eq!(found(app, "q=juniper").await, [WESTSIDE], "the new alternate name");
    assert_eq!(found(app, "q=juniper&near=45.54,-122.70&radius_km=5").await, [WESTSIDE]);
    assert_eq!(found(app, "q=birchwood").await, [NEW_SERVICE], "a new service");
    assert!(found(app, "category=food_assistance").await.is_empty(), "the pantry is no longer offered");
    assert!(found(app, "q=pantry").await.is_empty());
    assert_eq!(found(app, "q=pantry&include_inactive=true").await, [PANTRY]);
}

async fn the_search_follows_the_catalog(engine: SearchEngine) {
    let (app, fake) = search_app_on(None, engine).await;
    assert_eq!(found(&app, "q=rosewood").await, [WESTSIDE]);
    change_the_source(&fake);
    let report = crate::helpers::synced_report(&app, "metro", "mode=full").await;
    assert_eq!((report["added"].as_u64(), report["deactivated"].as_u64()), (Some(1), Some(1)), "{report}");
    finds_the_changes(&app).await;
    app.stop().await;
}

#[tokio::test]
async fn the_index_follows_every_change_of_the_catalog() {
    the_search_follows_the_catalog(SearchEngine::Index).await;
}

#[tokio::test]
async fn the_sql_engine_follows_every_change_of_the_catalog() {
    the_search_follows_the_catalog(SearchEngine::Sql).await;
}

#[tokio::test]
async fn a_sync_keeps_location_phones_languages_schedules_and_the_source_s_own_fields() {
    let (app, _fake) = search_app(None).await;
    let detail: Value = app.get_json(&format!("/api/v1/services/{}", gateway_id(WESTSIDE))).await;
    let s = &detail["service"];
    assert_eq!(s["alternate_name"], "Rosewood Counseling Annex");
    assert_eq!(s["description"], "Walk-in counselling for adults.  \n", "as the source wrote it");
    assert_eq!(s["organization"]["parent_organization_id"], "7e8f9a0b-1c2d-4e3f-8a4b-5c6d7e8f9a02");
    let locations = s["locations"].as_array().expect("locations");
    assert_eq!(locations.len(), 5);
    let fourth = &locations[3];
    assert_eq!(fourth["phones"][0]["number"], "503-555-0144");
    assert_eq!(fourth["phones"][0]["languages"], json!(["vi"]));
    assert_eq!(fourth["languages"], json!(["es"]));
    assert_eq!(fourth["schedules"][0]["days"], json!(["MO"]));
    assert_eq!(locations[1]["service_at_location"]["phones"][0]["number"], "503-555-0122");
    assert_eq!(s["terms"][1]["parent_id"], MENTAL_HEALTH_TERM);
    app.stop().await;
}

#[tokio::test]
async fn hsds_republishes_schedules_phones_and_the_source_s_uuids() {
    let (app, _fake) = search_app(None).await;
    let page: Value = app.get_json("/hsds/services?search=westside").await;
    assert_eq!(page["contents"][0]["id"], WESTSIDE, "the source's UUID, not one of ours: {page}");
    let full: Value = app.get_json(&format!("/hsds/services/{WESTSIDE}")).await;
    assert_eq!(full["id"], WESTSIDE);
    assert_eq!(full["alternate_name"], "Rosewood Counseling Annex");
    assert_eq!(full["organization"]["id"], "7e8f9a0b-1c2d-4e3f-8a4b-5c6d7e8f9a01");
    assert_eq!(full["organization"]["parent_organization_id"], "7e8f9a0b-1c2d-4e3f-8a4b-5c6d7e8f9a02");
    let at = &full["service_at_locations"][3];
    assert_eq!(at["id"], "3c4d5e6f-7a8b-4c9d-8e0f-1a2b3c4d5e04");
    let location = &at["location"];
    assert_eq!(location["id"], "9d0e1f2a-3b4c-4d5e-8f6a-7b8c9d0e1f04");
    assert_eq!(
        location["schedules"],
        json!([{"id": "5b6c7d8e-9f0a-4b1c-8d2e-3f4a5b6c7d01", "location_id": "9d0e1f2a-3b4c-4d5e-8f6a-7b8c9d0e1f04",
                "freq": "WEEKLY", "byday": "MO", "opens_at": "09:00", "closes_at": "17:00"}])
    );
    assert_eq!(location["phones"][0]["id"], "2b3c4d5e-6f7a-4b8c-9d0e-1f2a3b4c5d01");
    assert_eq!(location["phones"][0]["languages"][0]["code"], "vi");
    assert_eq!(location["languages"][0]["code"], "es");
    assert_eq!(full["service_at_locations"][1]["phones"][0]["number"], "503-555-0122");
    let attribute = full["attributes"]
        .as_array()
        .expect("attributes")
        .iter()
        .find(|a| a["taxonomy_term"]["code"] == "counseling")
        .cloned()
        .expect("the source's term");
    assert_eq!(attribute["id"], "8f9a0b1c-2d3e-4f4a-8b5c-6d7e8f9a0b01");
    assert_eq!(attribute["link_type"], "service");
    assert_eq!(attribute["taxonomy_term"]["id"], COUNSELING_TERM);
    assert_eq!(attribute["taxonomy_term"]["parent_id"], MENTAL_HEALTH_TERM);
    // FHIR: the location's phone and hours, not what the service says of itself there.
    let fhir: Value =
        app.get_json(&format!("/fhir/Location/{}", gateway_id("9d0e1f2a-3b4c-4d5e-8f6a-7b8c9d0e1f04"))).await;
    assert_eq!(fhir["telecom"], json!([{"system": "phone", "value": "503-555-0144"}]));
    assert_eq!(
        fhir["hoursOfOperation"],
        json!([{"daysOfWeek": ["mon"], "openingTime": "09:00:00", "closingTime": "17:00:00"}])
    );
    let second: Value =
        app.get_json(&format!("/fhir/Location/{}", gateway_id("9d0e1f2a-3b4c-4d5e-8f6a-7b8c9d0e1f02"))).await;
    assert!(second.get("telecom").is_none(), "the service-at-location phone stays with the service: {second}");
    // The id filter takes the source's term UUID too.
    let by_term: Value = app.get_json(&format!("/hsds/services?taxonomy_term_id={COUNSELING_TERM}")).await;
    assert_eq!(by_term["total_items"], 1, "{by_term}");
    app.stop().await;
}

#[tokio::test]
async fn hsds_two_letter_days_are_published_as_fhir_available_times() {
    let app = crate::directories::catalog_app(None).await;
    let id = carebridge::directories::gateway_id("demo", "908174cd-f5bd-5f50-ac8c-c9a80a34e9e1");
    let fhir: Value = app.get_json(&format!("/fhir/HealthcareService/{id}")).await;
    assert_eq!(
        fhir["availableTime"],
        json!([
            {"daysOfWeek": ["mon", "tue", "wed", "thu"], "availableStartTime": "08:00:00", "availableEndTime": "19:00:00"},
            {"daysOfWeek": ["fri"], "availableStartTime": "08:00:00", "availableEndTime": "17:00:00"},
        ]),
        "{fhir}"
    );
    app.stop().await;
}
