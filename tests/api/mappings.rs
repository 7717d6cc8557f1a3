//! The mapping files through the gateway: the preview endpoint, and `check` on broken mapping files.

use std::process::Command;

use serde_json::{Value, json};

use crate::helpers::{fixture, spawn_app, write_config};

#[tokio::test]
async fn a_preview_shows_the_bundle_a_referral_becomes_with_the_stored_client_and_stores_nothing() {
    let app = spawn_app().await;
    let client = fixture("client", "cl-1002");
    assert_eq!(app.put("/api/v1/clients/cl-1002", &client).await.status(), 201);

    let referral = fixture("referral", "ref-4003");
    let response = app.post("/api/v1/preview/referral", &referral).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["sendable"], true);
    assert_eq!(body["violations"], json!([]));
    let types: Vec<&str> = body["fhir"]["entry"]
        .as_array()
        .expect("a Bundle")
        .iter()
        .filter_map(|e| e["resource"]["resourceType"].as_str())
        .collect();
    assert_eq!(types, ["Patient", "Flag", "ServiceRequest", "Task"], "a crisis referral raises a Flag");
    assert_eq!(body["fhir"]["type"], "transaction");

    // Nothing was stored.
    assert_eq!(app.get("/api/v1/referrals/ref-4003").await.status(), 404);
    app.stop().await;
}

#[tokio::test]
async fn a_preview_gathers_the_needs_evidence_from_the_clients_stored_assessments() {
    let app = spawn_app().await;
    app.put_clients().await;
    for id in ["as-2001", "as-2007"] {
        assert_eq!(app.put(&format!("/api/v1/assessments/{id}"), &fixture("assessment", id)).await.status(), 201);
    }
    let body: Value =
        app.post("/api/v1/preview/care-plan", &fixture("care-plan", "cp-3001")).await.json().await.expect("JSON");
    assert_eq!(body["sendable"], true, "{}", body["violations"]);
    let conditions: Vec<&Value> = body["fhir"]["entry"]
        .as_array()
        .expect("a Bundle")
        .iter()
        .map(|e| &e["resource"])
        .filter(|r| r["resourceType"] == "Condition")
        .collect();
    assert_eq!(conditions.len(), 1, "one Condition per client and need");
    assert_eq!(conditions[0]["identifier"][0]["value"], "cl-1001.depression");
    assert_eq!(conditions[0]["evidence"][0]["detail"].as_array().map(Vec::len), Some(2), "both stored assessments");
    app.stop().await;
}

#[tokio::test]
async fn a_preview_for_a_partner_uses_its_overlay() {
    let app = spawn_app().await;
    let plan = fixture("care-plan", "cp-3001");
    let default: Value = app.post("/api/v1/preview/care-plan", &plan).await.json().await.expect("JSON");
    let pinned: Value =
        app.post("/api/v1/preview/care-plan?partner=st-marys-ehr", &plan).await.json().await.expect("JSON");
    let careplan = |b: &Value| {
        b["fhir"]["entry"]
            .as_array()
            .expect("Bundle")
            .iter()
            .find(|e| e["resource"]["resourceType"] == "CarePlan")
            .cloned()
    };
    assert!(careplan(&default).expect("a CarePlan")["resource"]["category"].is_array(), "US Core 7 needs assess-plan");
    assert!(careplan(&pinned).expect("a CarePlan")["resource"].get("category").is_none(), "US Core 8 goes without");
    let unknown = app.post("/api/v1/preview/care-plan?partner=nobody", &plan).await;
    assert_eq!(unknown.status(), 404);
    app.stop().await;
}

#[tokio::test]
async fn an_invalid_record_or_kind_gets_a_problem_not_fhir() {
    let app = spawn_app().await;
    let mut referral = fixture("referral", "ref-4001");
    referral["priority"] = json!("whenever");
    let response = app.post("/api/v1/preview/referral", &referral).await;
    assert_eq!(response.status(), 422);
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    let body: Value = response.json().await.expect("JSON");
    assert!(body["errors"][0]["path"].as_str().expect("path").contains("priority"), "{body}");
    assert_eq!(app.post("/api/v1/preview/invoice", &referral).await.status(), 404);
    app.stop().await;
}

#[test]
fn check_stops_on_a_broken_mapping_file_with_its_line_and_serve_refuses_to_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mappings = dir.path().join("mappings");
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings");
    let status = Command::new("cp").arg("-r").arg(&src).arg(&mappings).status().expect("cp runs");
    assert!(status.success());
    let task = mappings.join("referral.task.toml");
    let text = std::fs::read_to_string(&task).expect("readable");
    let line = text.lines().position(|l| l.starts_with("authoredOn")).expect("authoredOn") + 1;
    std::fs::write(&task, text.replace("authoredOn =", "authoredWhen =")).expect("write");
    let config = write_config(dir.path(), &format!("[mappings]\ndir = \"{}\"\n", mappings.display()));

    let bin = env!("CARGO_BIN_EXE_carebridge");
    let check = Command::new(bin).args(["check", "--config"]).arg(&config).output().expect("runs");
    assert_eq!(check.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&check.stderr);
    let want = format!("referral.task.toml:{line}:");
    assert!(stderr.contains(&want) && stderr.contains("authoredWhen"), "{want} missing from:\n{stderr}");

    let serve = Command::new(bin).args(["serve", "--config"]).arg(&config).output().expect("runs");
    assert_ne!(serve.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&serve.stderr).contains("authoredWhen"));
}

#[test]
fn map_prints_fhir_for_a_fixture_and_fails_loudly_on_a_bad_record() {
    let root = env!("CARGO_MANIFEST_DIR");
    let bin = env!("CARGO_BIN_EXE_carebridge");
    let out = Command::new(bin)
        .current_dir(root)
        .args(["map", "--kind", "consent", "fixtures/agency/consent/co-5002.json"])
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let consent: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(consent["resourceType"], "Consent");
    assert_eq!(consent["provision"]["securityLabel"][0]["code"], "SUD", "42 CFR Part 2 data is labelled");

    let dir = tempfile::tempdir().expect("temp dir");
    let bad = dir.path().join("bad.json");
    let mut referral = fixture("referral", "ref-4001");
    referral["status"] = json!("declined");
    std::fs::write(&bad, referral.to_string()).expect("write");
    let out = Command::new(bin).current_dir(root).args(["map", "--kind", "referral"]).arg(&bad).output().expect("runs");
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs a status_reason"));
}

/// A copy of the shipped mappings whose consent mapping lost its `is url` guard: an agency text then lands in
/// `sourceAttachment.url`, which the base-R4 gate must catch (the built-in consent's document is a URL, so the
/// copy still loads).
fn mappings_without_the_url_guard(dir: &std::path::Path) -> std::path::PathBuf {
    fn copy(from: &std::path::Path, to: &std::path::Path) {
        std::fs::create_dir_all(to).expect("mkdir");
        for e in std::fs::read_dir(from).expect("readable") {
            let e = e.expect("entry");
            if e.path().is_dir() {
                copy(&e.path(), &to.join(e.file_name()));
            } else {
                std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
            }
        }
    }
    let to = dir.join("mappings");
    copy(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings"), &to);
    let file = to.join("consent.consent.toml");
    let text = std::fs::read_to_string(&file).expect("readable");
    let broken = text.replacen("\"$when\" = \"source_document is url\"", "\"$when\" = \"source_document\"", 1);
    assert_ne!(broken, text, "the consent mapping changed shape; update this test");
    std::fs::write(&file, broken).expect("write");
    to
}

#[tokio::test]
async fn a_preview_of_fhir_that_breaks_base_r4_is_not_sendable_and_names_the_element() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mappings = mappings_without_the_url_guard(dir.path());
    let app = crate::helpers::spawn_app_with(move |s| s.mappings.dir = mappings).await;
    let mut consent = fixture("consent", "co-5002");
    consent["source_document"] = json!("paper form in chart, box 14");
    let response = app.post("/api/v1/preview/consent", &consent).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["sendable"], false, "{body}");
    let violations = body["violations"].as_array().expect("violations");
    assert!(
        violations
            .iter()
            .any(|v| v["path"] == "Consent.sourceAttachment.url" && v["message"] == "not a valid FHIR `url`"),
        "{violations:?}"
    );
    assert!(!body.to_string().contains("box 14\"}]"), "violations name the element, never the value");
    app.stop().await;
}

#[tokio::test]
async fn an_agency_id_whose_composed_fhir_id_is_too_long_still_maps_to_a_sendable_flag() {
    let app = spawn_app().await;
    // A legal agency id (64 characters at most) whose Flag id (`<id>.crisis`) is longer than FHIR's 64.
    let mut referral = fixture("referral", "ref-4003");
    referral["id"] = json!(format!("ref-{}", "7".repeat(56)));
    let body: Value = app.post("/api/v1/preview/referral", &referral).await.json().await.expect("JSON");
    assert_eq!(body["sendable"], true, "{}", body["violations"]);
    let flag = body["fhir"]["entry"]
        .as_array()
        .expect("a Bundle")
        .iter()
        .find(|e| e["resource"]["resourceType"] == "Flag")
        .expect("a crisis Flag");
    assert_eq!(flag["resource"]["identifier"][0]["value"], referral["id"], "the identifier keeps the whole id");
    app.stop().await;
}

#[tokio::test]
async fn a_preview_of_a_consent_on_paper_names_the_place_in_the_title_and_sends_no_url() {
    let app = spawn_app().await;
    let mut consent = fixture("consent", "co-5002");
    consent["source_document"] = json!("paper form in chart, box 14");
    let body: Value = app.post("/api/v1/preview/consent", &consent).await.json().await.expect("JSON");
    assert_eq!(body["sendable"], true, "{body}");
    let attachment = &body["fhir"]["sourceAttachment"];
    assert!(attachment.get("url").is_none(), "{attachment}");
    assert!(attachment["title"].as_str().expect("title").ends_with(": paper form in chart, box 14"), "{attachment}");

    consent["source_document"] = json!("https://dms.example.org/consents/co-5002.pdf");
    let body: Value = app.post("/api/v1/preview/consent", &consent).await.json().await.expect("JSON");
    assert_eq!(body["fhir"]["sourceAttachment"]["url"], "https://dms.example.org/consents/co-5002.pdf");
    app.stop().await;
}

#[test]
fn map_exits_non_zero_when_the_fhir_breaks_base_r4_and_names_the_element() {
    let root = env!("CARGO_MANIFEST_DIR");
    let bin = env!("CARGO_BIN_EXE_carebridge");
    let dir = tempfile::tempdir().expect("temp dir");
    let mappings = mappings_without_the_url_guard(dir.path());
    let config = write_config(dir.path(), &format!("[mappings]\ndir = \"{}\"\n", mappings.display()));
    let paper = dir.path().join("paper.json");
    let mut consent = fixture("consent", "co-5002");
    consent["source_document"] = json!("paper form in chart, box 14");
    std::fs::write(&paper, consent.to_string()).expect("write");
    let out = Command::new(bin)
        .current_dir(root)
        .args(["map", "--kind", "consent", "--config"])
        .arg(&config)
        .arg(&paper)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Consent.sourceAttachment.url: not a valid FHIR `url`"), "{stderr}");
    assert!(!stderr.contains("box 14"), "{stderr}");
}
