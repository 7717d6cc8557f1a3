//! The FHIR directory source against the real FHIR R4 server of `../shared/interop` (Medplum's router, in memory):
//! a full sync with references read one by one, search, tombstones after a DELETE, an incremental sync through
//! `_lastUpdated`, odd services refused one by one, a bearer token, agency categories from HL7 codes through the
//! category map, and a missing or broken category map stopping `check` and start-up.

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use carebridge::config::DirectorySettings;
use carebridge::directories::fhir_directory::{CategoryMap, FhirDirectory};
use carebridge::directories::{DirectorySource, SourceError};
use serde_json::{Value, json};

use crate::fhir_peer::{Peer, summary};
use crate::helpers::{TestApp, spawn_app_with, test_settings, write_config};

const FHIR_JSON: &str = "application/fhir+json";

fn fhir_source(name: &str, base: &str, per_page: u32) -> DirectorySettings {
    DirectorySettings::FhirDirectory {
        name: name.into(),
        base_url: base.into(),
        per_page,
        sync_interval_secs: 0,
        bearer_token_env: None,
        timeout_secs: 10,
        time_zone: None,
        // The fixture directory is 4 services and the test deletes one (25 %): above the default guard.
        max_deactivate_fraction: 0.5,
    }
}

async fn sync(app: &TestApp, source: &str, mode: &str) -> Value {
    crate::helpers::synced_report(app, source, &format!("mode={mode}")).await
}

fn counts(report: &Value) -> [u64; 5] {
    let n = |k: &str| report[k].as_u64().unwrap_or(u64::MAX);
    let rejected = report["rejected"].as_array().map_or(u64::MAX, |r| r.len() as u64);
    [n("added"), n("updated"), n("unchanged"), n("deactivated"), rejected]
}

/// Indexes of the fixture Bundle's entries.
const COUNSELING: usize = 5;
const CRISIS_LINE: usize = 6;
const FOOD_PANTRY: usize = 7;
const HOUSING: usize = 8;

#[tokio::test]
async fn a_fhir_directory_is_synced_with_its_references_and_tracks_deletes_and_updates() {
    let peer = Peer::start(&[]);
    let ids = peer.load_fixture().await;
    let app = spawn_app_with(|s| s.directories = vec![fhir_source("county-fhir", &peer.base, 3)]).await;

    // Full sync: 4 services over two pages of 3, each with its Organization and Location read from the server.
    let report = sync(&app, "county-fhir", "full").await;
    assert_eq!(counts(&report), [4, 0, 0, 0, 0], "{report}");
    let log = peer.requests().await;
    let searches: Vec<&str> =
        log.iter().filter_map(|r| r["url"].as_str()).filter(|u| u.starts_with("/fhir/HealthcareService?")).collect();
    assert_eq!(searches.len(), 2, "{searches:?}");
    for (search, offset) in searches.iter().zip(["_offset=0", "_offset=3"]) {
        assert!(search.contains("_count=3") && search.contains(offset) && search.contains("_sort=_id"), "{search}");
        assert!(!search.contains("_lastUpdated"), "a full sync asks for everything: {search}");
    }
    assert!(log.iter().all(|r| r["headers"]["accept"] == FHIR_JSON), "every request asks for FHIR JSON");
    // `_include` is not relied on: each referenced resource is read on its own, at most once per page.
    let mut reads = Vec::new();
    let mut this_page = HashSet::new();
    for url in log.iter().filter_map(|r| r["url"].as_str()) {
        if url.starts_with("/fhir/HealthcareService?") {
            this_page.clear();
        } else if url.starts_with("/fhir/Organization/") || url.starts_with("/fhir/Location/") {
            assert!(this_page.insert(url), "{url} read twice for one page: {:?}", summary(&log));
            reads.push(url);
        }
    }
    for (i, id) in ids.iter().enumerate().take(5) {
        assert!(reads.iter().any(|u| u.ends_with(id.as_str())), "entry {i} was never read: {reads:?}");
    }

    // Search: text, then distance from a point 300 m from the Lents pantry (the clinics are 7+ km away).
    let pantry: Value = app.get_json("/api/v1/services?q=pantry").await;
    assert_eq!(pantry["total"], 1, "{pantry}");
    let pantry_id = format!("county-fhir.{}", ids[FOOD_PANTRY]);
    assert_eq!(pantry["items"][0]["id"], pantry_id.as_str());
    assert_eq!(pantry["items"][0]["organization"], "Rose City Community Partners");
    let near: Value = app.get_json("/api/v1/services?near=45.4845,-122.5668&radius_km=3").await;
    assert_eq!(crate::helpers::pluck(&near, "items", "id"), std::slice::from_ref(&pantry_id), "{near}");
    let distance = near["items"][0]["distance_km"].as_f64().expect("a distance");
    assert!((0.2..0.5).contains(&distance), "about 300 m: {distance}");
    let hawthorne: Value = app.get_json("/api/v1/services?near=45.5122,-122.6537&radius_km=1&language=es").await;
    assert_eq!(hawthorne["items"][0]["name"], "Outpatient Mental Health Counseling", "{hawthorne}");

    let detail: Value = app.get_json(&format!("/api/v1/services/{pantry_id}")).await;
    let service = &detail["service"];
    assert_eq!(detail["active"], true);
    assert_eq!(service["source_id"], ids[FOOD_PANTRY].as_str());
    assert_eq!(service["organization"]["source_id"], ids[1].as_str());
    assert_eq!(service["locations"][0]["source_id"], ids[4].as_str());
    assert_eq!(service["locations"][0]["address"], "9205 SE Foster Rd");
    assert_eq!(service["locations"][0]["postal_code"], "97266");
    assert_eq!(service["languages"], json!(["en", "vi"]));
    assert_eq!(service["schedules"][0], json!({"days": ["TU", "TH"], "opens_at": "10:00", "closes_at": "16:00"}));
    assert!(
        service["terms"]
            .as_array()
            .expect("terms")
            .iter()
            .any(|t| t["code"] == "548" && t["taxonomy"] == "http://terminology.hl7.org/CodeSystem/service-type"),
        "{service}"
    );
    assert!(service["source_modified"].as_str().is_some(), "meta.lastUpdated is kept: {service}");

    // The crisis line is deleted on the server: the next full sync keeps it as a tombstone.
    let (status, _) =
        peer.send(reqwest::Method::DELETE, &format!("HealthcareService/{}", ids[CRISIS_LINE]), None).await;
    assert_eq!(status, 200);
    let report = sync(&app, "county-fhir", "full").await;
    assert_eq!(counts(&report), [0, 0, 3, 1, 0], "{report}");
    let crisis: Value = app.get_json("/api/v1/services?q=crisis").await;
    assert_eq!(crisis["total"], 0, "a deleted service is not offered: {crisis}");
    let tombstone: Value = app.get_json("/api/v1/services?q=crisis&include_inactive=true").await;
    assert_eq!(tombstone["items"][0]["active"], false, "but it is kept as a tombstone: {tombstone}");
    for i in [COUNSELING, FOOD_PANTRY, HOUSING] {
        let kept: Value = app.get_json(&format!("/api/v1/services/county-fhir.{}", ids[i])).await;
        assert_eq!(kept["active"], true, "entry {i} stays active: {kept}");
    }

    // The pantry is renamed on the server: an incremental sync asks only for what changed since the newest
    // meta.lastUpdated it saw, and gets exactly that.
    let (status, mut pantry_resource) =
        peer.send(reqwest::Method::GET, &format!("HealthcareService/{}", ids[FOOD_PANTRY]), None).await;
    assert_eq!(status, 200);
    pantry_resource["name"] = json!("Lents Community Food Market");
    let (status, updated) = peer
        .send(reqwest::Method::PUT, &format!("HealthcareService/{}", ids[FOOD_PANTRY]), Some(&pantry_resource))
        .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(peer.send(reqwest::Method::DELETE, "/_harness/requests", None).await.0, 200);
    let report = sync(&app, "county-fhir", "incremental").await;
    assert_eq!(counts(&report), [0, 1, 0, 0, 0], "{report}");
    let log = peer.requests().await;
    let search = log.iter().filter_map(|r| r["url"].as_str()).find(|u| u.starts_with("/fhir/HealthcareService?"));
    assert!(search.is_some_and(|s| s.contains("_lastUpdated=gt")), "{:?}", summary(&log));
    let market: Value = app.get_json("/api/v1/services?q=market").await;
    assert_eq!(crate::helpers::pluck(&market, "items", "id"), [pantry_id], "{market}");
    let tombstone: Value = app.get_json("/api/v1/services?q=crisis&include_inactive=true").await;
    assert_eq!(tombstone["items"][0]["active"], false, "an incremental sync brings back nothing deleted");
    app.stop().await;
}

#[tokio::test]
async fn odd_healthcare_services_are_rejected_one_by_one_while_the_rest_are_kept() {
    // Validation off, so the server also keeps a service whose name is not a string.
    let peer = Peer::start(&[("EHR_VALIDATE", "0")]);
    let ids = peer.load_fixture().await;
    let nameless = peer
        .create(&json!({"resourceType": "HealthcareService", "active": true,
            "providedBy": {"reference": format!("Organization/{}", ids[1])}, "comment": "Drop-in peer support."}))
        .await;
    let mistyped = peer.create(&json!({"resourceType": "HealthcareService", "name": ["Two", "names"]})).await;
    let dangling = peer
        .create(&json!({"resourceType": "HealthcareService", "name": "Mobile Outreach Van",
            "providedBy": {"reference": "Organization/no-such-organization"},
            "location": [{"reference": "Location/no-such-location"}, {"reference": format!("Location/{}", ids[3])},
                         {"reference": "https://elsewhere.example/fhir/Location/1"}]}))
        .await;
    let app = spawn_app_with(|s| s.directories = vec![fhir_source("county-fhir", &peer.base, 100)]).await;

    let report = sync(&app, "county-fhir", "full").await;
    assert_eq!(counts(&report), [5, 0, 0, 0, 2], "{report}");
    let mut rejected: Vec<(String, String)> = report["rejected"]
        .as_array()
        .expect("rejected")
        .iter()
        .map(|r| (r["source_id"].as_str().unwrap_or("-").to_owned(), r["reason"].as_str().unwrap_or("-").to_owned()))
        .collect();
    rejected.sort();
    let mut expected = vec![
        (nameless, "healthcareService.name: missing".to_owned()),
        (mistyped, "healthcareService.name: expected a string".to_owned()),
    ];
    expected.sort();
    assert_eq!(rejected, expected);

    let all: Value = app.get_json("/api/v1/services?per_page=100").await;
    assert_eq!(all["total"], 5, "the four fixture services and the van: {all}");
    let van: Value = app.get_json(&format!("/api/v1/services/county-fhir.{dangling}")).await;
    assert_eq!(van["service"]["organization"], Value::Null, "a reference to nothing is left out: {van}");
    assert_eq!(
        crate::helpers::pluck(&van["service"], "locations", "source_id"),
        [ids[3].clone()],
        "only the location that exists on the server: {van}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_fhir_directory_behind_a_bearer_token_is_read_with_it_and_refused_without() {
    let peer = Peer::start(&[("EHR_BEARER_TOKEN", "county-directory-token")]);
    peer.load_fixture().await;
    let with = FhirDirectory::new(
        "county-fhir",
        &peer.base,
        10,
        Some("county-directory-token".into()),
        Duration::from_secs(10),
        CategoryMap::default(),
    )
    .expect("client");
    let page = with.page(1, None).await.expect("the page is read");
    assert_eq!(page.records.len(), 4);
    assert!(!page.more, "4 services at 10 a page is one page");
    for record in &page.records {
        let service = with.normalise(record).expect("a valid service");
        assert!(service.organization.is_some() && service.locations.len() == 1, "{record}");
    }
    let log = peer.requests().await;
    let fhir: Vec<&Value> = log.iter().filter(|r| r["url"].as_str().is_some_and(|u| u.starts_with("/fhir/"))).collect();
    assert!(fhir.len() > 4, "the search and the reference reads: {:?}", summary(&log));
    assert!(fhir.iter().all(|r| r["authorization"] == "present" && r["status"] == 200), "{:?}", summary(&log));

    let without =
        FhirDirectory::new("county-fhir", &peer.base, 10, None, Duration::from_secs(10), CategoryMap::default())
            .expect("client");
    match without.page(1, None).await {
        Err(SourceError::Http(carebridge::outbound::Failure::Status { status: 401, .. })) => {}
        other => panic!("expected a 401, got {:?}", other.map(|p| p.records.len())),
    }
}

#[tokio::test]
async fn services_coded_only_with_hl7_codes_are_found_by_their_agency_category() {
    let fixture =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/directory/fhir/directory.json"))
            .expect("fixture");
    assert!(
        !fixture.contains(carebridge::directories::CATEGORY_TAXONOMY) && !fixture.contains("urn:carebridge:vocabulary"),
        "the fixture services carry HL7 codes only"
    );
    let peer = Peer::start(&[]);
    let ids = peer.load_fixture().await;
    let app = spawn_app_with(|s| s.directories = vec![fhir_source("county-fhir", &peer.base, 100)]).await;
    let report = sync(&app, "county-fhir", "full").await;
    assert_eq!(counts(&report), [4, 0, 0, 0, 0], "{report}");

    // Category 8 Counselling, type 74; 36 Crisis Line, type 541; type 548 Food Relief (its category, 16 Financial &
    // Material Aid, is unmatched on purpose); 18 Housing/Homelessness, types 127 and 125.
    for (category, entry) in [
        ("therapy", COUNSELING),
        ("crisis_care", CRISIS_LINE),
        ("food_assistance", FOOD_PANTRY),
        ("housing_assistance", HOUSING),
    ] {
        let found: Value = app.get_json(&format!("/api/v1/services?category={category}")).await;
        let id = format!("county-fhir.{}", ids[entry]);
        assert_eq!(crate::helpers::pluck(&found, "items", "id"), [id], "category={category}: {found}");
        assert_eq!(found["items"][0]["categories"], json!([category]), "{found}");
    }
    let none: Value = app.get_json("/api/v1/services?category=legal_aid").await;
    assert_eq!(none["total"], 0, "no fixture service is legal aid: {none}");

    // The HL7 codings stay terms of their own, mapped or not.
    let pantry: Value = app.get_json(&format!("/api/v1/services/county-fhir.{}", ids[FOOD_PANTRY])).await;
    let terms: Vec<(&str, &str)> = pantry["service"]["terms"]
        .as_array()
        .expect("terms")
        .iter()
        .map(|t| (t["taxonomy"].as_str().unwrap_or("-"), t["code"].as_str().unwrap_or("-")))
        .collect();
    assert_eq!(
        terms,
        [
            (carebridge::directories::CATEGORY_TAXONOMY, "food_assistance"),
            ("http://terminology.hl7.org/CodeSystem/service-category", "16"),
            ("http://terminology.hl7.org/CodeSystem/service-type", "548"),
        ],
        "{pantry}"
    );
    app.stop().await;
}

/// Copies a directory tree (the mapping files) so a test can break one file of it.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let path = entry.expect("entry").path();
        let target = to.join(path.file_name().expect("a name"));
        if path.is_dir() {
            copy_tree(&path, &target);
        } else {
            std::fs::copy(&path, &target).expect("copy");
        }
    }
}

#[tokio::test]
async fn a_missing_or_broken_category_map_stops_check_and_start_up_with_the_file_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mappings = dir.path().join("mappings");
    copy_tree(&Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings"), &mappings);
    let map = mappings.join(carebridge::directories::fhir_directory::CATEGORY_MAP_FILE);
    let config = write_config(
        dir.path(),
        &format!(
            "[mappings]\ndir = {:?}\n[[directories]]\ntype = \"fhir_directory\"\nname = \"county-fhir\"\n\
             base_url = \"http://127.0.0.1:9/fhir\"\n",
            mappings.display().to_string()
        ),
    );
    let check = || Command::new(env!("CARGO_BIN_EXE_carebridge")).args(["check", "--config"]).arg(&config).output();

    let fine = check().expect("runs");
    assert_eq!(fine.status.code(), Some(0), "{}", String::from_utf8_lossy(&fine.stderr));
    assert!(String::from_utf8_lossy(&fine.stdout).contains("directory category map OK"));

    // A target that is not an agency category: reported at its line, and the gateway does not start.
    let text = std::fs::read_to_string(&map).expect("the shipped map");
    let line = 1 + text[..text.find("\"housing_assistance\"").expect("a housing target")].matches('\n').count();
    std::fs::write(&map, text.replacen("\"housing_assistance\"", "\"shelter\"", 1)).expect("write");
    let broken = check().expect("runs");
    assert_eq!(broken.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&broken.stderr);
    assert!(stderr.contains(&format!("{}:{line}:", map.display())), "{stderr}");
    assert!(stderr.contains("`shelter` is not an agency service category"), "{stderr}");
    let mut settings = test_settings(dir.path());
    settings.mappings.dir = mappings.clone();
    settings.directories = vec![fhir_source("county-fhir", "http://127.0.0.1:9/fhir", 10)];
    let refused = carebridge::app::Application::build(&settings).await.err().expect("the gateway does not start");
    let said = refused.to_string();
    assert!(said.contains(&map.display().to_string()) && said.contains("shelter"), "{said}");

    // No map at all: the same, naming the file it looked for.
    std::fs::remove_file(&map).expect("remove");
    let missing = check().expect("runs");
    assert_eq!(missing.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains(&map.display().to_string()), "{stderr}");
    let refused = carebridge::app::Application::build(&settings).await.err().expect("the gateway does not start");
    assert!(refused.to_string().contains(&map.display().to_string()), "{refused}");
}
