//! HSDS 3.0 API sources against the fake API (`hsds_api_fake`): full services from a list-shape API, and every
//! way a real API fails during a sync (maintenance and empty pages, short crawls, deletions under the crawl,
//! future timestamps, 429, 503, hangs), none of which may deactivate a live service.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::{TestApp, finished_sync, spawn_app_with, synced_report};
use crate::hsds_api_fake::{FakeHsdsApi, Fault, On};
use carebridge::directories::source_from_settings;

fn fixture_services() -> Vec<Value> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/directory/hsds/services.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture directory")).expect("JSON array")
}

/// An `hsds_api` source named `metro` at `base`, 5 services a page, small retry waits; `extra` adds settings.
fn api_source(base: &str, extra: Value) -> carebridge::config::DirectorySettings {
    let mut settings = json!({
        "type": "hsds_api", "name": "metro", "base_url": base, "per_page": 5, "timeout_secs": 5,
        "retries": 2, "retry_min_delay_ms": 10, "retry_max_delay_ms": 20, "retry_after_max_secs": 2,
    });
    if let (Some(o), Value::Object(more)) = (settings.as_object_mut(), extra) {
        o.extend(more);
    }
    serde_json::from_value(settings).expect("a directory source")
}

async fn app_for(fake: &FakeHsdsApi, extra: Value) -> TestApp {
    let base = fake.start().await;
    spawn_app_with(|s| s.directories = vec![api_source(&base, extra)]).await
}

/// A sync job of `metro`, as it ended.
async fn sync(app: &TestApp, query: &str) -> Value {
    finished_sync(app, "metro", query).await
}

async fn synced(app: &TestApp, query: &str) -> Value {
    synced_report(app, "metro", query).await
}

/// Services the catalog offers (the fixture's 24 hold one its source marks inactive).
async fn active(app: &TestApp) -> u64 {
    let page: Value = app.get_json("/api/v1/services?per_page=1").await;
    page["total"].as_u64().expect("total")
}

/// What the catalog offers after a sync of all 24 fixture services.
const OFFERED: u64 = 23;

fn id_of(service: &Value) -> String {
    service["id"].as_str().expect("id").to_owned()
}

#[tokio::test]
async fn a_list_shape_api_is_read_in_full_by_id_and_unchanged_services_are_not_read_again() {
    let fake = FakeHsdsApi::with(fixture_services());
    let app = app_for(&fake, json!({})).await;

    let report = synced(&app, "mode=full").await;
    assert_eq!((report["added"].as_u64(), report["detail"].as_str()), (Some(24), Some("per_service")), "{report}");
    assert!(report["notes"][0].as_str().is_some_and(|n| n.contains("/services/{id}")), "{report}");
    assert_eq!(report["without_detail"], 0, "{report}");
    let seen = fake.requests.lock().expect("lock").clone();
    assert!(seen.iter().all(|r| r.user_agent.starts_with("carebridge/")), "{:?}", seen[0].user_agent);
    assert!(seen.iter().filter(|r| r.uri.starts_with("/services/")).count() >= 24);

    // What the list shape leaves out is kept: locations, phones, languages, taxonomy, schedules.
    let id = format!("metro.{}", id_of(&fixture_services()[0]));
    let detail: Value = app.get_json(&format!("/api/v1/services/{id}")).await;
    let service = &detail["service"];
    for field in ["locations", "phones", "languages", "terms", "schedules"] {
        assert!(service[field].as_array().is_some_and(|a| !a.is_empty()), "{field} empty: {service}");
    }
    let near: Value = app.get_json("/api/v1/services?near=45.5152,-122.6784&radius_km=10").await;
    assert!(near["total"].as_u64().unwrap_or(0) > 0, "{near}");
    let spanish: Value = app.get_json("/api/v1/services?language=es").await;
    assert!(spanish["total"].as_u64().unwrap_or(0) > 0, "{spanish}");

    // The decision is kept (no probe), and only the service whose last_modified changed is read again.
    fake.clear();
    fake.services.lock().expect("lock")[3]["last_modified"] = json!("2026-11-30T08:00:00Z");
    let report = synced(&app, "mode=full").await;
    assert_eq!((report["updated"].as_u64(), report["unchanged"].as_u64()), (Some(1), Some(23)), "{report}");
    let reads: Vec<String> = fake.uris().into_iter().filter(|u| u.starts_with("/services/")).collect();
    assert_eq!(reads, [format!("/services/{}", id_of(&fixture_services()[3]))]);
    assert_eq!(fake.uris().len(), 5 + 1, "five list pages and one read: {:?}", fake.uris());
    app.stop().await;
}

#[tokio::test]
async fn an_api_that_offers_full_true_is_read_with_it_and_never_service_by_service() {
    let fake = FakeHsdsApi::with(fixture_services());
    *fake.full_param.lock().expect("lock") = true;
    let app = app_for(&fake, json!({})).await;
    let report = synced(&app, "mode=full").await;
    assert_eq!((report["added"].as_u64(), report["detail"].as_str()), (Some(24), Some("full_param")), "{report}");
    let uris = fake.uris();
    assert!(!uris.iter().any(|u| u.starts_with("/services/")), "{uris:?}");
    assert!(uris.iter().skip(2).all(|u| u.contains("full=true")), "{uris:?}");
    let near: Value = app.get_json("/api/v1/services?near=45.5152,-122.6784&radius_km=10").await;
    assert!(near["total"].as_u64().unwrap_or(0) > 0, "{near}");
    app.stop().await;
}

#[tokio::test]
async fn a_maintenance_page_an_empty_page_or_wrong_totals_fail_the_full_sync_and_deactivate_nothing() {
    let fake = FakeHsdsApi::with(fixture_services());
    let app = app_for(&fake, json!({"detail": "list"})).await;
    assert_eq!(synced(&app, "mode=full").await["added"], 24);
    for fault in [Fault::Maintenance, Fault::EmptyContents, Fault::WrongTotals] {
        // Wrong totals on every page: consistent, but not what the pages hold.
        let pages = if matches!(fault, Fault::WrongTotals) { 1..=5 } else { 2..=2 };
        for page in pages {
            fake.fault(On::Page(page), fault.clone());
        }
        let job = sync(&app, "mode=full").await;
        assert_eq!(job["state"], "failed", "{fault:?}: {job}");
        assert_eq!(active(&app).await, OFFERED, "{fault:?}");
    }
    // And the source's answer is named for the operator.
    let base = fake.start().await;
    let source = source_from_settings(&api_source(&base, json!({"detail": "list"})), std::path::Path::new("."))
        .expect("a source");
    fake.fault(On::Page(2), Fault::Maintenance);
    let e = source.page(2, None).await.expect_err("maintenance");
    assert!(e.to_string().contains("no `contents` array"), "{e}");
    app.stop().await;
}

fn inactive_among_first_14() -> u64 {
    fixture_services().iter().take(14).filter(|s| s["status"] != "active").count() as u64
}

#[tokio::test]
async fn a_short_crawl_deactivates_nothing_until_forced() {
    let fake = FakeHsdsApi::with(fixture_services());
    let app = app_for(&fake, json!({"detail": "list"})).await;
    assert_eq!(synced(&app, "mode=full").await["added"], 24);
    // The API now lists 14 of 24 (a partial export): 42 % fewer than the last complete crawl.
    fake.services.lock().expect("lock").truncate(14);
    let job = sync(&app, "mode=full").await;
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(active(&app).await, OFFERED, "nothing deactivated");
    let forced = synced(&app, "mode=full&force=true").await;
    assert_eq!(forced["deactivated"], 10, "{forced}");
    assert_eq!(active(&app).await, 14 - inactive_among_first_14());
    app.stop().await;
}

#[tokio::test]
async fn a_service_deleted_during_the_crawl_is_deactivated_and_the_live_one_it_shifted_is_kept() {
    let fake = FakeHsdsApi::with(fixture_services());
    let app = app_for(&fake, json!({"detail": "list"})).await;
    assert_eq!(synced(&app, "mode=full").await["added"], 24);
    let services = fixture_services();
    let (deleted, shifted) = (id_of(&services[0]), id_of(&services[5]));
    // Page 1 is read, then the first service is deleted: page 2 starts one later and the sixth service (first
    // of page 2) is never on a page the crawl reads.
    fake.fault(On::Page(2), Fault::DeleteFirst(deleted.clone()));
    let report = synced(&app, "mode=full").await;
    assert_eq!((report["crawls"].as_u64(), report["deactivated"].as_u64()), (Some(2), Some(1)), "{report}");
    let gone: Value = app.get_json(&format!("/api/v1/services/metro.{deleted}")).await;
    assert_eq!(gone["active"], false, "{gone}");
    let kept: Value = app.get_json(&format!("/api/v1/services/metro.{shifted}")).await;
    assert_eq!(kept["active"], true, "{kept}");
    app.stop().await;
}

#[tokio::test]
async fn a_live_service_missing_from_the_listing_is_confirmed_by_id_and_kept() {
    let fake = FakeHsdsApi::with(fixture_services());
    let app = app_for(&fake, json!({"detail": "list"})).await;
    assert_eq!(synced(&app, "mode=full").await["added"], 24);
    let (hidden, deleted) = (id_of(&fixture_services()[7]), id_of(&fixture_services()[8]));
    fake.hidden.lock().expect("lock").push(hidden.clone());
    fake.services.lock().expect("lock").retain(|s| s["id"] != deleted.as_str());
    let report = synced(&app, "mode=full").await;
    assert_eq!((report["recovered"].as_u64(), report["deactivated"].as_u64()), (Some(1), Some(1)), "{report}");
    assert!(fake.uris().contains(&format!("/services/{hidden}")), "{:?}", fake.uris());
    let kept: Value = app.get_json(&format!("/api/v1/services/metro.{hidden}")).await;
    assert_eq!(kept["active"], true, "{kept}");
    app.stop().await;
}

#[tokio::test]
async fn a_last_modified_in_the_future_is_reported_and_does_not_move_the_watermark() {
    let mut services = fixture_services();
    services[2]["last_modified"] = json!("2030-01-01T00:00:00Z");
    let poisoned = id_of(&services[2]);
    let newest = services
        .iter()
        .filter_map(|s| s["last_modified"].as_str())
        .filter(|t| !t.starts_with("2030"))
        .max()
        .expect("dates")
        .to_owned();
    let fake = FakeHsdsApi::with(services);
    let app = app_for(&fake, json!({"detail": "list"})).await;
    let report = synced(&app, "mode=full").await;
    assert_eq!(report["future_modified"], json!([poisoned]), "{report}");
    fake.clear();
    synced(&app, "mode=incremental").await;
    let asked = fake.uris();
    let expected = format!("modified_after={}", newest.replace(':', "%3A"));
    assert!(asked[0].contains(&expected), "{asked:?} should ask after {newest}");
    app.stop().await;
}

#[tokio::test]
async fn a_429_with_retry_after_is_waited_out_and_a_503_then_200_is_retried() {
    let fake = FakeHsdsApi::with(fixture_services());
    let app = app_for(&fake, json!({"detail": "list"})).await;
    fake.fault(On::Page(1), Fault::Status(429, Some(1), "slow down"));
    fake.fault(On::Page(3), Fault::Status(503, None, "busy"));
    let report = synced(&app, "mode=full").await;
    assert_eq!(report["added"], 24, "{report}");
    let seen = fake.requests.lock().expect("lock").clone();
    let firsts: Vec<&crate::hsds_api_fake::Seen> = seen.iter().filter(|r| r.uri.contains("page=1&")).collect();
    assert_eq!(firsts.len(), 2, "{seen:?}");
    let waited = firsts[1].at - firsts[0].at;
    // The backoff is 10–20 ms here: only the Retry-After explains a wait of a second.
    assert!(waited >= Duration::from_millis(950), "waited {waited:?}");
    assert_eq!(seen.iter().filter(|r| r.uri.contains("page=3&")).count(), 2, "{seen:?}");

    // A source that keeps failing is named with its status and words, and nothing is deactivated.
    for _ in 0..3 {
        fake.fault(On::Page(2), Fault::Status(503, None, "Down for\r\nmaintenance"));
    }
    let base = fake.start().await;
    let source = source_from_settings(&api_source(&base, json!({})), std::path::Path::new(".")).expect("a source");
    let e = source.page(2, None).await.expect_err("503 three times");
    assert_eq!(e.to_string(), "the source answered HTTP 503: Down for maintenance");
    assert_eq!(active(&app).await, OFFERED);
    app.stop().await;
}

#[tokio::test]
async fn a_hang_times_out_after_the_configured_timeout_and_deactivates_nothing() {
    let fake = FakeHsdsApi::with(fixture_services());
    let app = app_for(&fake, json!({"detail": "list", "timeout_secs": 1, "retries": 1})).await;
    assert_eq!(synced(&app, "mode=full").await["added"], 24);
    fake.fault(On::Page(2), Fault::Hang(Duration::from_secs(30)));
    fake.fault(On::Page(2), Fault::Hang(Duration::from_secs(30)));
    let started = Instant::now();
    let job = sync(&app, "mode=full").await;
    assert_eq!(job["state"], "failed", "{job}");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    assert_eq!(active(&app).await, OFFERED);

    let base = fake.start().await;
    let one_try = json!({"detail": "list", "timeout_secs": 1, "retries": 0});
    let source = source_from_settings(&api_source(&base, one_try.clone()), std::path::Path::new(".")).expect("source");
    fake.fault(On::Page(1), Fault::Hang(Duration::from_secs(30)));
    let e = source.page(1, None).await.expect_err("a hang");
    assert_eq!(e.to_string(), "timed out after 1 s");

    // Nothing listening: said so.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let nowhere = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    let source = source_from_settings(&api_source(&nowhere, one_try), std::path::Path::new(".")).expect("source");
    let e = source.page(1, None).await.expect_err("refused");
    assert_eq!(e.to_string(), "connection refused");
    app.stop().await;
}

#[tokio::test]
async fn a_listed_service_whose_full_read_answers_404_is_asked_again_before_anything_is_decided() {
    let fake = FakeHsdsApi::with(fixture_services());
    let app = app_for(&fake, json!({"detail": "per_service", "max_concurrent_requests": 1})).await;
    assert_eq!(synced(&app, "mode=full").await["added"], 24);
    let changed = id_of(&fixture_services()[2]);
    fake.services.lock().expect("lock")[2]["last_modified"] = json!("2026-11-30T08:00:00Z");
    // Its one read answers 404 (a deletion racing the crawl, or a flaky proxy): not kept as seen, so the
    // confirmation asks again, finds it live, and keeps it.
    fake.fault(On::Detail, Fault::Status(404, None, "not found"));
    let report = synced(&app, "mode=full").await;
    assert_eq!((report["recovered"].as_u64(), report["deactivated"].as_u64()), (Some(1), Some(0)), "{report}");
    let reads = fake.uris().iter().filter(|u| **u == format!("/services/{changed}")).count();
    assert_eq!(reads, 2 + 1, "read at the first sync, then twice: {:?}", fake.uris());
    let kept: Value = app.get_json(&format!("/api/v1/services/metro.{changed}")).await;
    assert_eq!(kept["active"], true, "{kept}");
    app.stop().await;
}
