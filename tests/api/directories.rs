//! Directory sync (an HSDS API served here over real HTTP, and a data package on disk) and catalog search.

use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::{Query, State};
use axum::response::IntoResponse;
use serde_json::{Value, json};

use crate::helpers::{TestApp, spawn_app_with};
use carebridge::config::DirectorySettings;

fn fixture_services() -> Vec<Value> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/directory/hsds/services.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture directory")).expect("JSON array")
}

fn slug(service: &Value) -> String {
    service["url"].as_str().and_then(|u| u.rsplit('/').next()).unwrap_or_default().to_owned()
}

/// A real HSDS 3.0 API on 127.0.0.1: paged `/services` with `modified_after`, serving whatever the test puts in.
#[derive(Clone, Default)]
struct FakeHsds {
    services: Arc<Mutex<Vec<Value>>>,
    requests: Arc<Mutex<Vec<String>>>,
    /// Pages from this one on answer 503.
    fail_from_page: Arc<Mutex<Option<usize>>>,
}

#[derive(serde::Deserialize)]
struct PageQuery {
    page: Option<usize>,
    per_page: Option<usize>,
    modified_after: Option<String>,
}

async fn services_page(
    State(fake): State<FakeHsds>,
    uri: axum::http::Uri,
    Query(q): Query<PageQuery>,
) -> axum::response::Response {
    fake.requests.lock().expect("lock").push(uri.to_string());
    if fake.fail_from_page.lock().expect("lock").is_some_and(|from| q.page.unwrap_or(1) >= from) {
        return axum::http::StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let all: Vec<Value> = fake
        .services
        .lock()
        .expect("lock")
        .iter()
        .filter(|s| match (&q.modified_after, s["last_modified"].as_str()) {
            (Some(after), Some(modified)) => modified > after.as_str(),
            _ => true,
        })
        .cloned()
        .collect();
    let per_page = q.per_page.unwrap_or(10).max(1);
    let page = q.page.unwrap_or(1).max(1);
    let total_pages = all.len().div_ceil(per_page).max(1);
    let contents: Vec<Value> = all.iter().skip((page - 1) * per_page).take(per_page).cloned().collect();
    Json(json!({
        "total_items": all.len(), "total_pages": total_pages, "page_number": page, "size": contents.len(),
        "first_page": page == 1, "last_page": page >= total_pages, "empty": contents.is_empty(), "contents": contents,
    }))
    .into_response()
}

impl FakeHsds {
    async fn start(&self) -> String {
        let router = axum::Router::new().route("/services", axum::routing::get(services_page)).with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, router).await });
        format!("http://{addr}")
    }
}

async fn sync(app: &TestApp, source: &str, mode: &str) -> Value {
    crate::helpers::synced_report(app, source, &format!("mode={mode}")).await
}

#[tokio::test]
async fn an_hsds_api_is_synced_page_by_page_and_vanished_services_become_inactive() {
    let fake = FakeHsds::default();
    *fake.services.lock().expect("lock") = fixture_services();
    let base = fake.start().await;
    let app = spawn_app_with(|s| {
        s.directories = vec![DirectorySettings::HsdsApi {
            name: "metro211".into(),
            base_url: base.clone(),
            per_page: 5,
            sync_interval_secs: 0,
            auth_header: None,
            auth_value_env: None,
            timeout_secs: 5,
            time_zone: None,
            // Read as listed: this test counts the list requests (a probe would add one).
            detail: carebridge::config::HsdsDetail::List,
            max_concurrent_requests: 4,
            max_deactivate_fraction: 0.2,
            retries: 0,
            retry_min_delay_ms: 10,
            retry_max_delay_ms: 10,
            retry_after_max_secs: 1,
            category_map: None,
        }];
    })
    .await;

    let report = sync(&app, "metro211", "full").await;
    assert_eq!((report["added"].as_u64(), report["rejected"].as_array().map(Vec::len)), (Some(24), Some(0)));
    let pages: Vec<String> = fake.requests.lock().expect("lock").clone();
    assert_eq!(pages.len(), 5, "24 services at 5 a page: {pages:?}");
    assert!(pages.iter().all(|p| p.contains("per_page=5")));

    // One service disappears from the source, one changes, one turns malformed.
    {
        let mut services = fake.services.lock().expect("lock");
        let gone = services.iter().position(|s| slug(s) == "pdx-eastside-pantry").expect("pantry");
        services.remove(gone);
        let changed = services.iter_mut().find(|s| slug(s) == "pdx-crisis-line").expect("crisis line");
        changed["description"] = json!("Round-the-clock crisis counselling by phone and text, now with chat.");
        changed["last_modified"] = json!("2026-11-20T10:00:00Z");
        let broken = services.iter_mut().find(|s| slug(s) == "sea-mobile-crisis-team").expect("sea crisis");
        broken["status"] = json!("sometimes");
    }
    let report = sync(&app, "metro211", "full").await;
    assert_eq!(report["added"], 0);
    assert_eq!(report["updated"], 1, "{report}");
    assert_eq!(report["deactivated"], 1, "{report}");
    assert_eq!(report["unchanged"], 21, "{report}");
    let rejected = report["rejected"].as_array().expect("rejected");
    assert_eq!(rejected.len(), 1);
    assert!(rejected[0]["reason"].as_str().expect("reason").starts_with("status:"));

    let pantry: Value = app.get_json("/api/v1/services?q=eastside%20pantry").await;
    assert_eq!(pantry["total"], 0, "a vanished service is not offered: {pantry}");
    let kept: Value = app.get_json("/api/v1/services?q=eastside%20pantry&include_inactive=true").await;
    assert_eq!(kept["items"][0]["active"], false, "but it is kept as a tombstone: {kept}");
    let broken: Value = app.get_json("/api/v1/services?q=mobile%20crisis&near=47.6,-122.33&radius_km=20").await;
    assert_eq!(broken["total"], 1, "the malformed record's last good version stays: {broken}");
    let chat: Value = app.get_json("/api/v1/services?q=chat").await;
    assert_eq!(chat["items"][0]["name"], "Rose City 24/7 Crisis Line");

    // Incremental: only what changed since the newest last_modified seen is asked for.
    fake.requests.lock().expect("lock").clear();
    let report = sync(&app, "metro211", "incremental").await;
    let asked = fake.requests.lock().expect("lock").clone();
    assert!(asked[0].contains("modified_after=2026-11-20T10%3A00%3A00Z"), "{asked:?}");
    assert_eq!(report["added"].as_u64().unwrap_or(99) + report["updated"].as_u64().unwrap_or(99), 0, "{report}");
    assert_eq!(report["deactivated"], 0, "an incremental sync never deactivates");
    app.stop().await;
}

#[tokio::test]
async fn a_source_that_fails_mid_sync_deactivates_nothing() {
    let fake = FakeHsds::default();
    *fake.services.lock().expect("lock") = fixture_services();
    let base = fake.start().await;
    let app = spawn_app_with(|s| {
        s.directories = vec![DirectorySettings::HsdsApi {
            name: "flaky".into(),
            base_url: base.clone(),
            per_page: 10,
            sync_interval_secs: 0,
            auth_header: None,
            auth_value_env: None,
            timeout_secs: 5,
            time_zone: None,
            detail: carebridge::config::HsdsDetail::Auto,
            max_concurrent_requests: 4,
            max_deactivate_fraction: 0.2,
            retries: 0,
            retry_min_delay_ms: 10,
            retry_max_delay_ms: 10,
            retry_after_max_secs: 1,
            category_map: None,
        }];
    })
    .await;
    assert_eq!(sync(&app, "flaky", "full").await["added"], 24);
    let before: Value = app.get_json("/api/v1/services?per_page=100").await;

    // The next full sync reads page 1, then the source fails: the services of pages 2 and 3 were not seen, but
    // a sync that did not finish must not take them for vanished.
    *fake.fail_from_page.lock().expect("lock") = Some(2);
    let job = crate::helpers::finished_sync(&app, "flaky", "mode=full").await;
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["error"]["kind"], "source", "{job}");
    let after: Value = app.get_json("/api/v1/services?per_page=100").await;
    assert_eq!(after["total"], before["total"], "{after}");
    assert_eq!(app.post("/api/v1/directories/nowhere/sync", &json!({})).await.status(), 404);
    app.stop().await;
}

pub async fn catalog_app(database: Option<String>) -> TestApp {
    let package = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/directory/hsds");
    let app = spawn_app_with(|s| {
        if let Some(url) = database {
            s.database.url = url;
        }
        s.directories = vec![DirectorySettings::HsdsPackage {
            name: "demo".into(),
            path: package.into(),
            sync_interval_secs: 0,
            time_zone: None,
            max_deactivate_fraction: 0.2,
            category_map: Some("directory/open-eligibility-category.json".into()),
        }];
    })
    .await;
    let report = sync(&app, "demo", "full").await;
    assert_eq!(report["added"], 24);
    app
}

fn names(page: &Value) -> Vec<String> {
    crate::helpers::pluck(page, "items", "name")
}

/// The search contract, run on SQLite here and on PostgreSQL in `store_contract`.
pub async fn search_finds_by_text_category_term_language_and_distance(app: &TestApp) {
    let crisis: Value = app.get_json("/api/v1/services?q=crisis").await;
    assert_eq!(crisis["total"], 4, "{crisis}");
    assert!(names(&crisis).iter().all(|n| n.to_lowercase().contains("crisis")), "{crisis}");
    let prefix: Value = app.get_json("/api/v1/services?q=counsel").await;
    assert!(prefix["total"].as_u64().unwrap_or(0) >= 1, "prefix and stemmed matches: {prefix}");

    let therapy: Value = app.get_json("/api/v1/services?category=therapy").await;
    assert_eq!(therapy["total"], 3);
    assert!(therapy["items"].as_array().expect("items").iter().all(|i| i["categories"] == json!(["therapy"])));

    let food_term: Value = app.get_json("/api/v1/services?taxonomy_term=emergency-food").await;
    assert!(food_term["total"].as_u64().unwrap_or(0) >= 2, "{food_term}");

    // Downtown Portland, 10 km: only Portland services, nearest first, each with its distance.
    let near: Value = app.get_json("/api/v1/services?near=45.5152,-122.6784&radius_km=10&per_page=100").await;
    let items = near["items"].as_array().expect("items");
    assert!(!items.is_empty() && items.len() < 10, "{near}");
    let distances: Vec<f64> = items.iter().map(|i| i["distance_km"].as_f64().expect("distance")).collect();
    assert!(distances.windows(2).all(|w| w[0] <= w[1]), "{distances:?}");
    assert!(distances.iter().all(|d| *d <= 10.0));
    let seattle: Value =
        app.get_json("/api/v1/services?near=47.6062,-122.3321&radius_km=15&category=crisis_care").await;
    assert_eq!(names(&seattle), ["Downtown Mobile Crisis Team"], "{seattle}");

    // Text within a radius: the services whose name matches come first, each group nearest first.
    let support: Value =
        app.get_json("/api/v1/services?q=support&near=45.5152,-122.6784&radius_km=400&per_page=100").await;
    let items = support["items"].as_array().expect("items");
    let tiers: Vec<(bool, f64)> = items
        .iter()
        .map(|i| {
            let named = i["name"].as_str().is_some_and(|n| n.to_lowercase().contains("support"));
            (!named, i["distance_km"].as_f64().expect("distance"))
        })
        .collect();
    assert!(tiers.first().is_some_and(|t| !t.0) && tiers.iter().any(|t| t.0), "both kinds of match: {support}");
    assert!(tiers.windows(2).all(|w| w[0] <= w[1]), "name matches first, then nearest: {tiers:?}");

    let spanish: Value = app.get_json("/api/v1/services?language=es&category=therapy").await;
    assert!(
        spanish["items"]
            .as_array()
            .expect("items")
            .iter()
            .all(|i| { i["languages"].as_array().is_some_and(|l| l.contains(&json!("es"))) })
    );

    let inactive: Value = app.get_json("/api/v1/services?category=peer_support").await;
    let with_inactive: Value = app.get_json("/api/v1/services?category=peer_support&include_inactive=true").await;
    assert_eq!(inactive["total"], 2, "a service its source marks inactive is not offered: {inactive}");
    assert_eq!(with_inactive["total"], 3, "{with_inactive}");

    let page1: Value = app.get_json("/api/v1/services?per_page=10&page=1&include_inactive=true").await;
    let page3: Value = app.get_json("/api/v1/services?per_page=10&page=3&include_inactive=true").await;
    assert_eq!(page1["total"], 24);
    assert_eq!(page3["items"].as_array().map(Vec::len), Some(4));

    for bad in [
        "/api/v1/services?near=91,0",
        "/api/v1/services?near=45.5",
        "/api/v1/services?radius_km=5",
        "/api/v1/services?near=45,-122&radius_km=0",
        "/api/v1/services?per_page=1000",
        "/api/v1/services?colour=blue",
    ] {
        assert_eq!(app.get(bad).await.status(), 400, "{bad}");
    }
}

#[tokio::test]
async fn the_catalog_is_searched_by_text_category_term_language_and_distance_on_sqlite() {
    let app = catalog_app(None).await;
    search_finds_by_text_category_term_language_and_distance(&app).await;
    app.stop().await;
}

#[tokio::test]
async fn a_data_package_resync_changes_nothing_and_search_needs_a_key() {
    let app = catalog_app(None).await;
    let first: Value = app.get_json("/api/v1/services?q=rapid%20re-housing").await;
    let id = first["items"][0]["id"].as_str().expect("an id").to_owned();
    assert_eq!(id, "demo.90c222ee-1bb6-5031-8619-e8106d347960", "gateway ids are stable: <source>.<source id>");
    let detail: Value = app.get_json(&format!("/api/v1/services/{id}")).await;
    assert_eq!(detail["active"], true);
    assert_eq!(detail["service"]["locations"][0]["city"], "Portland");
    assert!(detail["service"]["source_modified"].as_str().is_some_and(|t| t.starts_with("2026-")));
    assert_eq!(app.get("/api/v1/services/demo.nope").await.status(), 404);
    let report = sync(&app, "demo", "full").await;
    assert_eq!((report["unchanged"].as_u64(), report["deactivated"].as_u64()), (Some(24), Some(0)));
    let anonymous = app.client.get(format!("{}/api/v1/services", app.base)).send().await.expect("sent");
    assert_eq!(anonymous.status(), 401);
    let writer_sync = app
        .client
        .post(format!("{}/api/v1/directories/demo/sync", app.base))
        .bearer_auth(crate::helpers::WRITER_KEY)
        .send()
        .await
        .expect("sent");
    assert_eq!(writer_sync.status(), 403, "syncing is an admin task");
    app.stop().await;
}

/// A referral naming a directory service must name one the catalog has and still offers; one that already named
/// a service keeps it when the directory withdraws it.
#[tokio::test]
async fn a_referral_names_a_directory_service_the_catalog_offers() {
    let dir = tempfile::tempdir().expect("temp dir");
    let package = dir.path().join("services.json");
    std::fs::write(&package, serde_json::to_vec(&fixture_services()).expect("JSON")).expect("package written");
    let path = package.clone();
    let app = spawn_app_with(move |s| {
        s.directories = vec![
            serde_json::from_value(json!({"type": "hsds_package", "name": "demo-directory", "path": path}))
                .expect("a directory source"),
        ];
    })
    .await;
    app.put_clients().await;
    let referral = crate::helpers::fixture("referral", "ref-4004");
    let service_id = referral["target"]["service_id"].as_str().expect("a directory target").to_owned();
    let with_target = |id: &str, target: &str| {
        let mut r = referral.clone();
        r["id"] = json!(id);
        r["target"]["service_id"] = json!(target);
        r
    };

    // Before the directory's first sync nothing can be checked: the target is taken as it is.
    let early =
        app.put("/api/v1/referrals/ref-early", &with_target("ref-early", "demo-directory.not-synced-yet")).await;
    assert_eq!(early.status(), 201);

    sync(&app, "demo-directory", "full").await;
    assert_eq!(app.put("/api/v1/referrals/ref-4004", &referral).await.status(), 201);
    for (target, why) in [
        ("demo-directory.no-such-service", "directory demo-directory has no service with this id"),
        ("elsewhere.90c222ee-1bb6-5031-8619-e8106d347960", "no configured directory has this service"),
    ] {
        let refused = app.put("/api/v1/referrals/ref-9001", &with_target("ref-9001", target)).await;
        assert_eq!(refused.status(), 422, "{target}");
        let problem: Value = refused.json().await.expect("problem");
        assert_eq!(problem["errors"][0]["path"], "$.target.service_id", "{problem}");
        assert!(problem["errors"][0]["detail"].as_str().is_some_and(|d| d.contains(why)), "{problem}");
    }

    // The directory withdraws the service: the referral made to it stays editable, a new one is refused.
    let remaining: Vec<Value> = fixture_services()
        .into_iter()
        .filter(|s| service_id != format!("demo-directory.{}", s["id"].as_str().unwrap_or_default()))
        .collect();
    assert_eq!(remaining.len(), 23);
    std::fs::write(&package, serde_json::to_vec(&remaining).expect("JSON")).expect("package rewritten");
    assert_eq!(sync(&app, "demo-directory", "full").await["deactivated"], 1);
    let mut edited = referral.clone();
    edited["priority"] = json!("routine");
    assert_eq!(app.put("/api/v1/referrals/ref-4004", &edited).await.status(), 200);
    let refused = app.put("/api/v1/referrals/ref-9002", &with_target("ref-9002", &service_id)).await;
    assert_eq!(refused.status(), 422);
    let problem: Value = refused.json().await.expect("problem");
    assert!(problem["errors"][0]["detail"].as_str().is_some_and(|d| d.contains("no longer offers")), "{problem}");
    app.stop().await;
}
