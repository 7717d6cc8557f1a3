//! The HSDS 3.0 tabular (CSV) data package as a directory source: `fixtures/directory/hsds-csv` (six fictional
//! services in Spokane WA) synced through the API and searched, then copies changed on disk and synced again.

use std::path::Path;

use serde_json::{Value, json};
use tempfile::TempDir;

use crate::helpers::{TestApp, pluck, spawn_app_with};
use carebridge::config::DirectorySettings;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/directory/hsds-csv");

/// Downtown Spokane, Riverside Avenue and Howard Street.
const DOWNTOWN: &str = "47.6588,-117.4260";

/// The gateway with one `hsds_package` source named `spokane` reading `path`.
async fn app_reading(path: &Path) -> TestApp {
    let source = json!({"type": "hsds_package", "name": "spokane", "path": path});
    let settings: DirectorySettings = serde_json::from_value(source).expect("an hsds_package entry");
    spawn_app_with(|s| s.directories = vec![settings]).await
}

async fn sync(app: &TestApp) -> Value {
    crate::helpers::synced_report(app, "spokane", "mode=full").await
}

/// A copy of the fixture package to change.
fn copy_of_fixture() -> TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for entry in std::fs::read_dir(FIXTURE).expect("the fixture package") {
        let path = entry.expect("entry").path();
        std::fs::copy(&path, dir.path().join(path.file_name().expect("a file"))).expect("copied");
    }
    dir
}

/// Rewrites table `file` of the package in `dir`: `edit` gets the header and each row, and returns the row to
/// write, or `None` to drop it.
fn edit_table(
    dir: &Path,
    file: &str,
    mut edit: impl FnMut(&csv::StringRecord, csv::StringRecord) -> Option<csv::StringRecord>,
) {
    let path = dir.join(file);
    let mut reader = csv::Reader::from_path(&path).expect("a CSV table");
    let header = reader.headers().expect("a header").clone();
    let rows: Vec<csv::StringRecord> = reader.records().map(|r| r.expect("a row")).collect();
    let mut writer = csv::Writer::from_path(&path).expect("writable");
    writer.write_record(&header).expect("written");
    for row in rows {
        if let Some(row) = edit(&header, row) {
            writer.write_record(&row).expect("written");
        }
    }
    writer.flush().expect("flushed");
}

/// The id of the fixture service called `name`.
fn service_id(name: &str) -> String {
    let mut reader = csv::Reader::from_path(Path::new(FIXTURE).join("services.csv")).expect("services.csv");
    reader
        .records()
        .map(|r| r.expect("a row"))
        .find(|r| r.get(3) == Some(name))
        .and_then(|r| r.get(0).map(str::to_owned))
        .unwrap_or_else(|| panic!("no fixture service {name}"))
}

fn names(page: &Value) -> Vec<String> {
    pluck(page, "items", "name")
}

#[tokio::test]
async fn a_csv_package_is_synced_and_its_services_are_found_by_text_place_and_category() {
    let app = app_reading(Path::new(FIXTURE)).await;
    let report = sync(&app).await;
    assert_eq!(report["added"], 6, "{report}");
    assert_eq!(report["rejected"], json!([]), "{report}");

    let pantry: Value = app.get_json("/api/v1/services?q=pantry").await;
    assert_eq!(names(&pantry), ["Hillyard Community Food Pantry"], "{pantry}");
    let crisis: Value = app.get_json("/api/v1/services?category=crisis_care").await;
    assert_eq!(names(&crisis), ["Inland Northwest 24/7 Crisis Line"], "{crisis}");
    let ukrainian: Value = app.get_json("/api/v1/services?language=uk").await;
    assert_eq!(names(&ukrainian), ["Hillyard Community Food Pantry"], "{ukrainian}");

    // Within 5 km of downtown: everything but the pantry in Hillyard, nearest first, each with its distance.
    let near: Value = app.get_json(&format!("/api/v1/services?near={DOWNTOWN}&radius_km=5&per_page=100")).await;
    let mut found = names(&near);
    let distances: Vec<f64> =
        near["items"].as_array().expect("items").iter().map(|i| i["distance_km"].as_f64().expect("distance")).collect();
    assert!(distances.windows(2).all(|w| w[0] <= w[1]) && distances.iter().all(|d| *d <= 5.0), "{distances:?}");
    assert!(distances[0] < 0.5, "the Riverside clinic is a block away: {near}");
    found.sort();
    assert_eq!(
        found,
        [
            "Adult Counseling and Therapy",
            "Housing Navigation and Rapid Re-Housing",
            "IPS Supported Employment",
            "Inland Northwest 24/7 Crisis Line",
            "Outpatient and Medication Treatment for Substance Use",
        ],
        "{near}"
    );
    let food: Value =
        app.get_json(&format!("/api/v1/services?near={DOWNTOWN}&radius_km=10&category=food_assistance")).await;
    assert_eq!(names(&food), ["Hillyard Community Food Pantry"], "{food}");
    let km = food["items"][0]["distance_km"].as_f64().expect("distance");
    assert!((5.0..8.0).contains(&km), "Hillyard is about 6 km north-east of downtown: {km}");

    // The service as the catalog keeps it: the joined rows of organizations, locations, addresses, phones...
    let id = format!("spokane.{}", service_id("IPS Supported Employment"));
    let detail: Value = app.get_json(&format!("/api/v1/services/{id}")).await;
    let service = &detail["service"];
    assert_eq!(service["organization"]["name"], "Riverside Behavioral Health Partners", "{detail}");
    let cities: Vec<&str> =
        service["locations"].as_array().expect("locations").iter().filter_map(|l| l["city"].as_str()).collect();
    assert_eq!(cities, ["Spokane", "Spokane Valley"]);
    assert_eq!(service["phones"][0]["number"], "509-555-0143");
    assert_eq!(service["phones"][0]["description"], "Employment team.");
    assert_eq!(service["schedules"][0]["days"], json!(["MO", "TU", "WE", "TH", "FR"]));
    assert_eq!(service["minimum_age"], json!(18.0));

    let again = sync(&app).await;
    assert_eq!((again["unchanged"].as_u64(), again["deactivated"].as_u64()), (Some(6), Some(0)), "{again}");
    app.stop().await;
}

#[tokio::test]
async fn a_service_removed_from_a_csv_package_becomes_a_tombstone() {
    let copy = copy_of_fixture();
    let app = app_reading(copy.path()).await;
    assert_eq!(sync(&app).await["added"], 6);

    // The pantry leaves the export: its row, and every row that points at it.
    let pantry = service_id("Hillyard Community Food Pantry");
    for file in
        ["services.csv", "service_at_location.csv", "phones.csv", "schedules.csv", "languages.csv", "attributes.csv"]
    {
        edit_table(copy.path(), file, |_, row| (!row.iter().any(|cell| cell == pantry)).then_some(row));
    }
    let report = sync(&app).await;
    assert_eq!(report["deactivated"], 1, "{report}");
    assert_eq!(report["unchanged"], 5, "{report}");
    assert_eq!(report["rejected"], json!([]), "{report}");

    let offered: Value = app.get_json("/api/v1/services?q=pantry").await;
    assert_eq!(offered["total"], 0, "a vanished service is not offered: {offered}");
    let kept: Value = app.get_json("/api/v1/services?q=pantry&include_inactive=true").await;
    assert_eq!(kept["items"][0]["active"], false, "but it is kept as a tombstone: {kept}");
    app.stop().await;
}

#[tokio::test]
async fn a_bad_latitude_in_a_csv_package_rejects_its_service_with_file_and_line_and_keeps_the_others() {
    let copy = copy_of_fixture();
    let app = app_reading(copy.path()).await;
    assert_eq!(sync(&app).await["added"], 6);

    // The clinic of the substance use program only: its latitude becomes text.
    let clinic = "Spokane Falls Recovery Clinic";
    edit_table(copy.path(), "locations.csv", |header, row| {
        let name = header.iter().position(|h| h == "name").expect("a name column");
        if row.get(name) != Some(clinic) {
            return Some(row);
        }
        Some(header.iter().zip(&row).map(|(h, cell)| if h == "latitude" { "abc" } else { cell }).collect())
    });
    let text = std::fs::read_to_string(copy.path().join("locations.csv")).expect("locations.csv");
    let line = 1 + text.lines().position(|l| l.contains(clinic)).expect("the clinic's row");
    let recovery = service_id("Outpatient and Medication Treatment for Substance Use");

    let report = sync(&app).await;
    let reason = format!("locations.csv line {line}, latitude: \"abc\" is not a number");
    assert_eq!(report["rejected"], json!([{"source_id": recovery, "reason": reason}]), "{report}");
    assert_eq!((report["unchanged"].as_u64(), report["deactivated"].as_u64()), (Some(5), Some(0)), "{report}");
    let kept: Value = app.get_json("/api/v1/services?q=substance").await;
    assert_eq!(kept["items"][0]["active"], true, "the rejected service's last good version stays: {kept}");

    // A table without a header cannot be read at all: the sync stops and deactivates nothing.
    std::fs::write(copy.path().join("services.csv"), "").expect("emptied");
    let job = crate::helpers::finished_sync(&app, "spokane", "mode=full").await;
    assert_eq!(job["state"], "failed", "{job}");
    let all: Value = app.get_json("/api/v1/services?per_page=100").await;
    assert_eq!(all["total"], 6, "{all}");
    app.stop().await;
}
