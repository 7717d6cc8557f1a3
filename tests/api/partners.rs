//! The partner registry (`[[partners]]`): records name configured partners only, a partner maps with its overlay
//! (or the base mappings), and a partner whose overlay is missing stops `check` and the start.

use std::process::Command;

use serde_json::{Value, json};

use crate::helpers::{fixture, spawn_app, write_config};

#[tokio::test]
async fn a_record_naming_a_partner_nobody_configured_is_refused_with_the_field() {
    let app = spawn_app().await;
    assert_eq!(app.put("/api/v1/clients/cl-1001", &fixture("client", "cl-1001")).await.status(), 201);
    let mut referral = fixture("referral", "ref-4001");
    referral["target"] = json!({"type": "partner", "partner": "st-marys-ehr-typo"});
    let response = app.put("/api/v1/referrals/ref-4001", &referral).await;
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.expect("problem");
    assert_eq!(body["errors"][0]["path"], "$.target.partner", "{body}");
    let mut consent = fixture("consent", "co-5001");
    consent["partner"] = json!("nobody");
    let response = app.put("/api/v1/consents/co-5001", &consent).await;
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.expect("problem");
    assert_eq!(body["errors"][0]["path"], "$.partner", "{body}");
    assert_eq!(app.get("/api/v1/referrals/ref-4001").await.status(), 404, "nothing was kept");
    // The configured partners are taken.
    assert_eq!(app.put("/api/v1/referrals/ref-4001", &fixture("referral", "ref-4001")).await.status(), 201);
    app.stop().await;
}

#[tokio::test]
async fn a_partner_without_an_overlay_maps_with_the_base_mappings() {
    let app = spawn_app().await;
    let referral = fixture("referral", "ref-4006");
    assert_eq!(referral["target"]["partner"], "harbor-recovery-center", "the fixture changed; update this test");
    // Its client and the consent it cites, so that delivery (and so preview) would send it.
    assert_eq!(app.put("/api/v1/clients/cl-1004", &fixture("client", "cl-1004")).await.status(), 201);
    assert_eq!(app.put("/api/v1/consents/co-5002", &fixture("consent", "co-5002")).await.status(), 201);
    let harbor = app.post("/api/v1/preview/referral?partner=harbor-recovery-center", &referral).await;
    assert_eq!(harbor.status(), 200);
    let harbor: Value = harbor.json().await.expect("JSON");
    let base: Value = app.post("/api/v1/preview/referral", &referral).await.json().await.expect("JSON");
    assert_eq!(harbor["fhir"], base["fhir"]);
    assert_eq!(harbor["sendable"], true, "{}", harbor["violations"]);
    app.stop().await;
}

/// `check` exits 2 with what it says on stderr, and `serve` refuses to start naming `serve_says`, for a config with
/// the fixture partners and `extra`.
fn check_and_serve_refuse(extra: &str, serve_says: &str) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), extra);
    let bin = env!("CARGO_BIN_EXE_carebridge");
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new(bin).current_dir(root).args(["check", "--config"]).arg(&config).output().expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let check_says = String::from_utf8_lossy(&out.stderr).into_owned();
    let out = Command::new(bin).current_dir(root).args(["serve", "--config"]).arg(&config).output().expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(serve_says));
    check_says
}

#[test]
fn a_partner_whose_overlay_is_missing_stops_check_and_the_start() {
    let extra = "[[partners]]\nname = \"lakeside\"\nbase_url = \"https://fhir.lakeside.example/r4\"\n\
                 receives = [\"referral\"]\noverlay = \"lakeside-ehr\"\n";
    let stderr = check_and_serve_refuse(extra, "overlay `lakeside-ehr`");
    assert!(stderr.contains("partner `lakeside`: overlay `lakeside-ehr` is not in"), "{stderr}");
}

#[test]
fn a_partner_whose_policy_profile_is_unknown_stops_check_and_the_start() {
    let extra = "[[partners]]\nname = \"lakeside\"\nbase_url = \"https://fhir.lakeside.example/r4\"\n\
                 receives = [\"referral\"]\npolicy = \"anyone-may-read\"\n";
    let stderr = check_and_serve_refuse(extra, "policy `anyone-may-read`");
    assert!(stderr.contains("partner `lakeside`: policy `anyone-may-read` is not a profile"), "{stderr}");
    assert!(stderr.contains("treating-provider"), "the known profiles are named: {stderr}");
}

#[test]
fn a_bad_partner_entry_is_named_by_check() {
    let dir = tempfile::tempdir().expect("temp dir");
    let extra =
        "[[partners]]\nname = \"Lakeside EHR\"\nbase_url = \"fhir.lakeside.example\"\nreceives = [\"letters\"]\n";
    let config = write_config(dir.path(), extra);
    let out = Command::new(env!("CARGO_BIN_EXE_carebridge"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for needle in ["partners[3].name", "partners[3].base_url", "`letters` is not a record kind"] {
        assert!(stderr.contains(needle), "{needle}: {stderr}");
    }
}

/// The outbox rows of one record, as (version, partner), read from the gateway's own database.
async fn owed(app: &crate::helpers::TestApp, kind: carebridge::domain::RecordKind, id: &str) -> Vec<(i64, String)> {
    let url = format!("sqlite:{}", app.dir.path().join("carebridge.db").display());
    let store = carebridge::store::connect(&url, 1, std::time::Duration::from_secs(5)).await.expect("the database");
    let id = carebridge::domain::RecordId::parse(id).expect("an id");
    let filter = carebridge::store::DeliveryFilter { record: Some((kind, id)), limit: 1000, ..Default::default() };
    let rows = store.list_deliveries(&filter).await.expect("deliveries");
    store.close().await;
    let mut owed: Vec<(i64, String)> = rows.into_iter().map(|d| (d.version, d.partner)).collect();
    owed.sort();
    owed
}

#[tokio::test]
async fn every_new_version_is_owed_to_the_partners_that_receive_it_in_the_same_write() {
    use carebridge::domain::RecordKind;
    let app = spawn_app().await;
    assert_eq!(app.put("/api/v1/clients/cl-1001", &fixture("client", "cl-1001")).await.status(), 201);
    let all: Vec<(i64, String)> =
        ["county-crisis-team", "harbor-recovery-center", "st-marys-ehr"].map(|p| (1, p.to_owned())).to_vec();
    assert_eq!(owed(&app, RecordKind::Client, "cl-1001").await, all, "every partner that receives clients");

    let referral = fixture("referral", "ref-4001");
    assert_eq!(referral["target"]["partner"], "st-marys-ehr");
    assert_eq!(app.put("/api/v1/referrals/ref-4001", &referral).await.status(), 201);
    assert_eq!(app.put("/api/v1/referrals/ref-4001", &referral).await.status(), 200, "identical: nothing new");
    let moved =
        app.post("/api/v1/referrals/ref-4001/status", &json!({"status": "cancelled", "reason": "moved away"})).await;
    assert!(moved.status().is_success(), "{}", moved.status());
    assert_eq!(
        owed(&app, RecordKind::Referral, "ref-4001").await,
        [(1, "st-marys-ehr".to_owned()), (2, "st-marys-ehr".to_owned())],
        "a referral is owed to the partner it names, each version once"
    );
    // The assessments the plan's need cites are held first (intake refuses a citation of nothing).
    for id in ["as-2001", "as-2007"] {
        assert_eq!(app.put(&format!("/api/v1/assessments/{id}"), &fixture("assessment", id)).await.status(), 201);
    }
    let mut plan = fixture("care-plan", "cp-3001");
    assert_eq!(app.put("/api/v1/care-plans/cp-3001", &plan).await.status(), 201);
    plan["title"] = json!("Revised plan");
    assert_eq!(app.put("/api/v1/care-plans/cp-3001", &plan).await.status(), 200);
    assert_eq!(
        owed(&app, RecordKind::CarePlan, "cp-3001").await,
        [(1, "st-marys-ehr".to_owned()), (2, "st-marys-ehr".to_owned())],
        "only st-marys-ehr receives care plans"
    );
    app.stop().await;
}
