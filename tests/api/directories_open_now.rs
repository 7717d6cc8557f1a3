//! `open_now` / `open_at` in the catalog search: HSDS packages with known hours, one source in Los Angeles time
//! and one with no time zone, synced through the API and searched at chosen instants.

use serde_json::{Value, json};
use tempfile::TempDir;

use crate::helpers::{TestApp, pluck, spawn_app_with};
use carebridge::config::DirectorySettings;

fn service(id: &str, name: &str, category: &str, schedules: Value) -> Value {
    json!({
        "id": id,
        "name": name,
        "status": "active",
        "description": format!("{name}, with known opening hours."),
        "last_modified": "2026-06-01T00:00:00Z",
        "attributes": [{"taxonomy_term": {"code": category, "name": category, "taxonomy": "carebridge-service-category"}}],
        "schedules": schedules,
    })
}

/// Two packages: `pdx` (time zone America/Los_Angeles) and `nozone` (none).
fn write_packages(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let weekdays = "MO,TU,WE,TH,FR";
    let pdx = json!([
        // Local Los Angeles time: 09:00-17:00 is 16:00-00:00 UTC in summer, 17:00-01:00 UTC in winter.
        service(
            "day-clinic",
            "Day Clinic",
            "therapy",
            json!([{"byday": weekdays, "opens_at": "09:00", "closes_at": "17:00"}])
        ),
        // Every night 22:00 to 02:00 the next morning, local time.
        service(
            "night-line",
            "Night Crisis Line",
            "crisis_care",
            json!([{"byday": "MO,TU,WE,TH,FR,SA,SU", "opens_at": "22:00", "closes_at": "02:00"}])
        ),
        // A fixed UTC-7 from the schedule's `timezone`, whatever the source zone: 16:00-00:00 UTC all year.
        service(
            "boise-counselling",
            "Boise Counselling",
            "therapy",
            json!([{"byday": weekdays, "opens_at": "09:00", "closes_at": "17:00", "timezone": -7}])
        ),
        // Times in UTC by their suffix: 16:00-00:00 UTC, Monday to Friday in UTC.
        service(
            "harbor-clinic",
            "Harbor Clinic",
            "therapy",
            json!([{"byday": weekdays, "opens_at": "16:00Z", "closes_at": "00:00Z"}])
        ),
    ]);
    // Open around the clock, but in no known zone: it cannot say it is open, so `open_now` never lists it.
    let nozone = json!([service(
        "unzoned-drop-in",
        "Unzoned Drop-in",
        "therapy",
        json!([{"byday": "MO,TU,WE,TH,FR,SA,SU", "opens_at": "00:00", "closes_at": "24:00"}])
    )]);
    let (a, b) = (dir.join("pdx.json"), dir.join("nozone.json"));
    std::fs::write(&a, pdx.to_string()).expect("write package");
    std::fs::write(&b, nozone.to_string()).expect("write package");
    (a, b)
}

async fn sync(app: &TestApp, source: &str) -> Value {
    crate::helpers::synced_report(app, source, "mode=full").await
}

/// The gateway with both packages synced (on `database` when given); the packages live in the returned directory.
pub async fn open_now_app(database: Option<String>) -> (TestApp, TempDir) {
    open_now_app_on(database, carebridge::config::SearchEngine::Index).await
}

/// [`open_now_app`] searching with `engine`.
pub async fn open_now_app_on(database: Option<String>, engine: carebridge::config::SearchEngine) -> (TestApp, TempDir) {
    let packages = tempfile::tempdir().expect("temp dir");
    let (pdx, nozone) = write_packages(packages.path());
    let app = spawn_app_with(|s| {
        if let Some(url) = database {
            s.database.url = url;
        }
        s.search.engine = engine;
        s.directories = vec![
            DirectorySettings::HsdsPackage {
                name: "pdx".into(),
                path: pdx,
                sync_interval_secs: 0,
                time_zone: Some("America/Los_Angeles".into()),
                max_deactivate_fraction: 0.2,
                category_map: None,
            },
            DirectorySettings::HsdsPackage {
                name: "nozone".into(),
                path: nozone,
                sync_interval_secs: 0,
                time_zone: None,
                max_deactivate_fraction: 0.2,
                category_map: None,
            },
        ];
    })
    .await;
    let report = sync(&app, "pdx").await;
    assert_eq!((report["added"].as_u64(), report["rejected"].as_array().map(Vec::len)), (Some(4), Some(0)), "{report}");
    assert_eq!(sync(&app, "nozone").await["added"], 1);
    (app, packages)
}

/// Names of the services a search finds, sorted.
async fn found(app: &TestApp, query: &str) -> Vec<String> {
    let response = app.get(&format!("/api/v1/services?per_page=100&{query}")).await;
    assert_eq!(response.status(), 200, "{query}: {}", response.text().await.unwrap_or_default());
    let page: Value = response.json().await.expect("JSON");
    let mut names = pluck(&page, "items", "name");
    assert_eq!(page["total"].as_u64(), Some(names.len() as u64), "{query}: {page}");
    names.sort();
    names
}

/// The `open_now` contract, run on SQLite here and on PostgreSQL in `store_contract`.
pub async fn open_now_follows_hours_zones_and_the_instant(app: &TestApp) {
    let all = found(app, "").await;
    assert_eq!(all, ["Boise Counselling", "Day Clinic", "Harbor Clinic", "Night Crisis Line", "Unzoned Drop-in"]);

    // Wednesday 1 July 2026, 16:30 UTC: 09:30 in Los Angeles (PDT) and at UTC-7.
    let july = found(app, "open_at=2026-07-01T16:30:00Z").await;
    assert_eq!(july, ["Boise Counselling", "Day Clinic", "Harbor Clinic"]);
    // The same instant written at another offset is the same search.
    assert_eq!(found(app, "open_at=2026-07-01T09:30:00-07:00").await, july);
    // Wednesday 14 January 2026, 16:30 UTC: 08:30 in Los Angeles (PST), so the Day Clinic is not open yet; the
    // fixed offsets do not move.
    assert_eq!(found(app, "open_at=2026-01-14T16:30:00Z").await, ["Boise Counselling", "Harbor Clinic"]);
    assert_eq!(found(app, "open_at=2026-01-14T17:00:00Z").await, ["Boise Counselling", "Day Clinic", "Harbor Clinic"]);

    // Past midnight: Saturday 01:30 in Los Angeles is still Friday night's shift, 02:00 is closed.
    assert_eq!(found(app, "open_at=2026-07-04T08:30:00Z").await, ["Night Crisis Line"]);
    assert!(found(app, "open_at=2026-07-04T09:00:00Z").await.is_empty());
    // Wednesday 22:30 local is 05:30 UTC in summer and 06:30 UTC in winter; 05:30 UTC in winter is only 21:30.
    assert_eq!(found(app, "open_at=2026-07-02T05:30:00Z").await, ["Night Crisis Line"]);
    assert_eq!(found(app, "open_at=2026-01-15T06:30:00Z").await, ["Night Crisis Line"]);
    assert!(found(app, "open_at=2026-01-15T05:30:00Z").await.is_empty());

    // With text and category.
    assert_eq!(found(app, "q=clinic&open_at=2026-01-14T16:30:00Z").await, ["Harbor Clinic"]);
    assert_eq!(found(app, "q=clinic&open_at=2026-07-01T16:30:00Z").await, ["Day Clinic", "Harbor Clinic"]);
    assert_eq!(found(app, "category=therapy&open_at=2026-07-01T16:30:00Z").await.len(), 3);
    assert!(found(app, "category=therapy&open_at=2026-07-04T08:30:00Z").await.is_empty());
    assert_eq!(found(app, "category=crisis_care&open_at=2026-07-02T05:30:00Z").await, ["Night Crisis Line"]);
    assert!(found(app, "category=crisis_care&q=clinic&open_at=2026-07-02T05:30:00Z").await.is_empty());

    // Now, by the server's clock: whatever the hour, a service in no known zone is never listed.
    let now = found(app, "open_now=true").await;
    assert!(!now.contains(&"Unzoned Drop-in".to_owned()), "{now:?}");
    assert_eq!(found(app, "open_now=false").await, all, "false does not filter");
    assert_eq!(found(app, "open_now=true&open_at=2026-07-04T08:30:00Z").await, ["Night Crisis Line"]);
}

#[tokio::test]
async fn open_now_follows_hours_zones_and_the_instant_on_sqlite() {
    let (app, _packages) = open_now_app(None).await;
    open_now_follows_hours_zones_and_the_instant(&app).await;
    app.stop().await;
}

#[tokio::test]
async fn a_bad_open_now_or_open_at_is_a_400_naming_the_parameter() {
    let (app, _packages) = open_now_app(None).await;
    for (query, parameter) in [
        ("open_now=maybe", "open_now"),
        ("open_now=1", "open_now"),
        ("open_at=yesterday", "open_at"),
        ("open_at=2026-07-01T16:30:00", "open_at"),
        ("open_at=2026-13-01T16:30:00Z", "open_at"),
        ("open_now=false&open_at=2026-07-01T16:30:00Z", "open_now"),
    ] {
        let response = app.get(&format!("/api/v1/services?{query}")).await;
        assert_eq!(response.status(), 400, "{query}");
        assert_eq!(response.headers()["content-type"], "application/problem+json", "{query}");
        let problem: Value = response.json().await.expect("problem JSON");
        let detail = problem["detail"].as_str().unwrap_or_default();
        assert!(detail.starts_with(&format!("{parameter}:")), "{query}: {problem}");
    }
    app.stop().await;
}

#[tokio::test]
async fn a_service_kept_before_hours_were_indexed_gets_them_at_its_next_sync() {
    // The SQL engine's hours table, emptied behind the gateway's back (the in-memory index reads hours from each
    // kept service, not from that table).
    let (app, _packages) = open_now_app_on(None, carebridge::config::SearchEngine::Sql).await;
    let july = "open_at=2026-07-01T16:30:00Z";
    assert_eq!(found(&app, july).await.len(), 3);
    // As a catalog synced before migration 0004 left it: services without hours, and no zones.
    let pool = sqlx::SqlitePool::connect(&format!("sqlite:{}", app.dir.path().join("carebridge.db").display()))
        .await
        .expect("open the database");
    for statement in [
        "UPDATE directory_services SET hours_version = 0",
        "DELETE FROM directory_service_hours",
        "DELETE FROM directory_time_zones",
    ] {
        sqlx::query(statement).execute(&pool).await.expect(statement);
    }
    pool.close().await;
    assert!(found(&app, july).await.is_empty(), "no hours, nothing known to be open");

    // The records did not change at the source: the sync calls them unchanged, and indexes their hours anyway.
    let report = sync(&app, "pdx").await;
    assert_eq!((report["unchanged"].as_u64(), report["updated"].as_u64()), (Some(4), Some(0)), "{report}");
    assert_eq!(found(&app, july).await, ["Boise Counselling", "Day Clinic", "Harbor Clinic"]);
    app.stop().await;
}
