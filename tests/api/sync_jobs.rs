//! Directory syncs as jobs: `POST …/sync` answers 202 with a job to follow, one sync per source runs at a time
//! (a second is told which job runs, on one gateway or two sharing a PostgreSQL database), a failure says what
//! failed, the gateway's shutdown stops a running sync, the scheduled turn skips where another sync runs, and the
//! CLI refuses to start beside a running sync.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{TestApp, spawn_app_with, wait_for_job};
use crate::hsds_api_fake::{FakeHsdsApi, Fault, On};
use carebridge::directories::jobs::SyncRunner;
use carebridge::directories::schedule::{self, Tick};
use carebridge::directories::{DirectorySource, source_from_settings};

fn fixture_services() -> Vec<Value> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/directory/hsds/services.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture directory")).expect("JSON array")
}

/// What the catalog offers after a sync of all 24 fixture services (one is inactive at its source).
const OFFERED: u64 = 23;

fn metro(base: &str) -> carebridge::config::DirectorySettings {
    named(base, "metro")
}

/// An `hsds_api` source at `base` read as listed, 5 services a page, small retry waits.
fn named(base: &str, name: &str) -> carebridge::config::DirectorySettings {
    serde_json::from_value(json!({
        "type": "hsds_api", "name": name, "base_url": base, "per_page": 5, "timeout_secs": 5, "detail": "list",
        "retries": 1, "retry_min_delay_ms": 10, "retry_max_delay_ms": 20, "retry_after_max_secs": 1,
    }))
    .expect("a directory source")
}

async fn gateway(base: &str, database: Option<String>) -> TestApp {
    let source = metro(base);
    spawn_app_with(move |s| {
        s.directories = vec![source];
        if let Some(url) = database {
            s.database.url = url;
        }
    })
    .await
}

async fn start(app: &TestApp, query: &str) -> reqwest::Response {
    app.post(&format!("/api/v1/directories/metro/sync?{query}"), &json!({})).await
}

async fn active(app: &TestApp) -> u64 {
    app.get_json("/api/v1/services?per_page=1").await["total"].as_u64().expect("total")
}

/// Plays the answers of a slow source: each of the five list pages takes `each` longer.
fn slow_pages(fake: &FakeHsdsApi, each: Duration) {
    for page in 1..=5 {
        fake.fault(On::Page(page), Fault::Delay(each));
    }
}

/// Starts two syncs of `metro` together, one on each gateway (the same one twice is fine), while the source is
/// slow: exactly one is accepted and the other is refused naming it. Returns the accepted job's location and the
/// refusal.
async fn race(one: &TestApp, other: &TestApp, fake: &FakeHsdsApi) -> (String, Value) {
    slow_pages(fake, Duration::from_millis(300));
    let (a, b) = tokio::join!(start(one, "mode=full"), start(other, "mode=full"));
    let (accepted, refused) = match (a.status().as_u16(), b.status().as_u16()) {
        (202, 409) => (a, b),
        (409, 202) => (b, a),
        other => panic!("expected one 202 and one 409, got {other:?}"),
    };
    let location = accepted.headers()["location"].to_str().expect("a Location").to_owned();
    assert_eq!(refused.headers()["content-type"], "application/problem+json");
    let job: Value = accepted.json().await.expect("the job");
    assert_eq!(job["state"], "queued", "{job}");
    let problem: Value = refused.json().await.expect("a problem");
    assert_eq!(problem["type"], "urn:carebridge:problem:sync-running", "{problem}");
    let running = job["id"].as_str().expect("a job id");
    assert!(problem["detail"].as_str().is_some_and(|d| d.contains(running)), "names the running job: {problem}");
    (location, problem)
}

#[tokio::test]
async fn a_second_sync_of_a_running_source_is_refused_with_409_naming_the_job_and_the_next_runs_after_it() {
    let fake = FakeHsdsApi::with(fixture_services());
    let app = gateway(&fake.start().await, None).await;
    assert_eq!(crate::helpers::synced_report(&app, "metro", "mode=full").await["added"], 24);

    let (location, _) = race(&app, &app, &fake).await;
    let first = app.get_json(&location).await;
    assert!(matches!(first["state"].as_str(), Some("queued" | "running")), "the source is slow: {first}");
    let first = wait_for_job(&app, &location).await;
    assert_eq!(first["state"], "succeeded", "{first}");
    assert_eq!(first["report"]["unchanged"], 24, "{first}");
    assert_eq!(first["progress"]["read"], 24, "{first}");
    assert!(first["started_at"].is_string() && first["finished_at"].is_string(), "{first}");
    // Once it ended, the next sync runs, and neither took a live service for vanished.
    let next = crate::helpers::finished_sync(&app, "metro", "mode=full").await;
    assert_eq!((next["state"].as_str(), next["report"]["deactivated"].as_u64()), (Some("succeeded"), Some(0)));
    assert_eq!(active(&app).await, OFFERED);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_on_one_postgres_database_sync_a_source_one_after_the_other() {
    let Some(db) = crate::store_contract::postgres_store().await else { return };
    let fake = FakeHsdsApi::with(fixture_services());
    let base = fake.start().await;
    let one = gateway(&base, Some(db.url.clone())).await;
    let other = gateway(&base, Some(db.url.clone())).await;
    assert_eq!(crate::helpers::synced_report(&one, "metro", "mode=full").await["added"], 24);

    let (location, _) = race(&one, &other, &fake).await;
    // Either gateway answers for the job, wherever it runs.
    let seen_by_one = wait_for_job(&one, &location).await;
    let seen_by_other = other.get_json(&location).await;
    assert_eq!(seen_by_one, seen_by_other);
    assert_eq!(seen_by_one["state"], "succeeded", "{seen_by_one}");
    for app in [&one, &other] {
        let next = crate::helpers::finished_sync(app, "metro", "mode=full").await;
        assert_eq!((next["state"].as_str(), next["report"]["deactivated"].as_u64()), (Some("succeeded"), Some(0)));
    }
    assert_eq!((active(&one).await, active(&other).await), (OFFERED, OFFERED));
    one.stop().await;
    other.stop().await;
}

#[tokio::test]
async fn a_failed_sync_job_says_what_failed_and_names_the_source_once() {
    let fake = FakeHsdsApi::with(fixture_services());
    let app = gateway(&fake.start().await, None).await;
    for _ in 0..2 {
        fake.fault(On::Page(1), Fault::Status(503, None, "down for maintenance"));
    }
    let job = crate::helpers::finished_sync(&app, "metro", "mode=full").await;
    assert_eq!((job["state"].as_str(), job["source"].as_str()), (Some("failed"), Some("metro")), "{job}");
    assert_eq!(job["error"]["kind"], "source", "{job}");
    let detail = job["error"]["detail"].as_str().expect("a detail");
    assert!(detail.contains("HTTP 503") && detail.contains("down for maintenance"), "{detail}");
    assert!(!detail.contains("metro"), "the job names the source; its error does not again: {detail}");
    assert!(job["report"].is_null(), "{job}");
    app.stop().await;
}

#[tokio::test]
async fn a_sync_job_is_found_only_under_its_own_directory_and_id() {
    let fake = FakeHsdsApi::with(fixture_services());
    let app = gateway(&fake.start().await, None).await;
    let job = crate::helpers::finished_sync(&app, "metro", "mode=full").await;
    let id = job["id"].as_str().expect("an id");
    assert_eq!(app.get(&format!("/api/v1/directories/metro/sync/{id}")).await.status(), 200);
    assert_eq!(app.get(&format!("/api/v1/directories/demo-directory/sync/{id}")).await.status(), 404);
    let unknown = uuid::Uuid::new_v4();
    assert_eq!(app.get(&format!("/api/v1/directories/metro/sync/{unknown}")).await.status(), 404);
    assert_eq!(app.get("/api/v1/directories/metro/sync/not-a-job").await.status(), 404);
    assert_eq!(app.get(&format!("/api/v1/directories/metro/sync/{id}?wait_secs=99")).await.status(), 400);
    let reader = app
        .client
        .get(format!("{}/api/v1/directories/metro/sync/{id}", app.base))
        .bearer_auth(crate::helpers::READER_KEY)
        .send()
        .await
        .expect("sent");
    assert_eq!(reader.status(), 403, "sync jobs are an admin matter");
    app.stop().await;
}

#[tokio::test]
async fn stopping_the_gateway_stops_its_running_sync_and_gives_the_lease_back() {
    let fake = FakeHsdsApi::with(fixture_services());
    let dir = tempfile::tempdir().expect("temp dir");
    let database = format!("sqlite:{}", dir.path().join("kept.db").display());
    let app = gateway(&fake.start().await, Some(database.clone())).await;
    fake.fault(On::Page(1), Fault::Delay(Duration::from_secs(30)));
    let response = start(&app, "mode=full").await;
    assert_eq!(response.status(), 202);
    let id = response.json::<Value>().await.expect("the job")["id"].as_str().expect("an id").to_owned();
    let location = format!("/api/v1/directories/metro/sync/{id}");
    while app.get_json(&location).await["state"] == "queued" {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let began = std::time::Instant::now();
    app.stop().await;
    assert!(began.elapsed() < Duration::from_secs(10), "the sync held up the shutdown: {:?}", began.elapsed());

    let store = carebridge::store::connect(&database, 2, Duration::from_secs(5)).await.expect("the store opens");
    let job = store.directory_sync_job(&id).await.expect("read").expect("kept");
    assert_eq!(job.state, "failed");
    assert_eq!(job.error.expect("an error")["kind"], "stopped");
    let now = time::OffsetDateTime::now_utc();
    let next = carebridge::store::NewSyncJob {
        id: uuid::Uuid::new_v4().to_string(),
        source: "metro".into(),
        mode: "full".into(),
        force: false,
        started_by: "cli".into(),
        progress: json!({}),
        by: None,
    };
    let begun = store.begin_directory_sync(&next, now, now + time::Duration::seconds(60)).await.expect("begin");
    assert_eq!(begun, carebridge::store::Begun::Started, "the stopped sync gave its lease back");
    store.close().await;
}

/// A runner over one source on `store`, as a replica has it.
fn runner(store: &Arc<dyn carebridge::store::Store>, source: Arc<dyn DirectorySource>) -> SyncRunner {
    // Never stopped: without its sender, the stop signal never comes.
    let (_, stopping) = tokio::sync::watch::channel(false);
    let sources = std::collections::HashMap::from([(source.name().to_owned(), source)]);
    SyncRunner::new(store.clone(), Arc::new(sources), stopping)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_turn_skips_while_another_replica_syncs_and_is_incremental_until_a_full_sync_is_due() {
    let fake = FakeHsdsApi::with(fixture_services());
    let base = fake.start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite:{}", dir.path().join("replicas.db").display());
    let store = carebridge::store::connect(&url, 4, Duration::from_secs(5)).await.expect("the store opens");
    let source = source_from_settings(&metro(&base), std::path::Path::new(".")).expect("a source");
    let (here, there) = (runner(&store, source.clone()), runner(&store, source));
    let t0 = time::OffsetDateTime::now_utc();

    let first = schedule::tick(&here, "metro", t0).await;
    assert!(matches!(&first, Tick::Ran(Ok(r)) if r.added == 24), "{first:?} {:?}", fake.uris());
    // Another replica holds the lease (its sync is running): this replica's turn is skipped.
    let claimed = there
        .claim(
            "metro",
            carebridge::directories::SyncMode::Incremental,
            false,
            carebridge::directories::jobs::StartedBy::Schedule,
            None,
            t0,
        )
        .await
        .expect("claimed");
    let skipped = schedule::tick(&here, "metro", t0 + time::Duration::seconds(30)).await;
    assert!(matches!(&skipped, Tick::Skipped { running } if *running == claimed.id), "{skipped:?}");
    there.run(claimed, &|_| {}).await.expect("the other replica's sync");

    // An hour after the full sync: incremental (asks for what changed); a day after: full again.
    fake.clear();
    let incremental = schedule::tick(&here, "metro", t0 + time::Duration::hours(2)).await;
    assert!(matches!(&incremental, Tick::Ran(Ok(_))), "{incremental:?}");
    assert!(fake.uris().iter().all(|u| u.contains("modified_after=")), "{:?}", fake.uris());
    fake.clear();
    let full = schedule::tick(&here, "metro", t0 + time::Duration::hours(25)).await;
    assert!(matches!(&full, Tick::Ran(Ok(r)) if r.unchanged == 24 && r.deactivated == 0), "{full:?}");
    assert!(fake.uris().iter().all(|u| !u.contains("modified_after=")), "{:?}", fake.uris());
    store.close().await;
}

#[tokio::test]
async fn the_cli_refuses_to_sync_a_directory_a_gateway_is_syncing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let package = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/directory/hsds");
    let config = crate::helpers::write_config(
        dir.path(),
        &format!("[[directories]]\ntype = \"hsds_package\"\nname = \"demo\"\npath = \"{package}\"\n"),
    );
    let url = format!("sqlite:{}", dir.path().join("carebridge.db").display());
    let store = carebridge::store::connect(&url, 2, Duration::from_secs(5)).await.expect("the store opens");
    let now = time::OffsetDateTime::now_utc();
    let running = carebridge::store::NewSyncJob {
        id: "0b9e5a52-4c61-4f0e-9d0c-3a7f0e0d7c11".into(),
        source: "demo".into(),
        mode: "full".into(),
        force: false,
        started_by: "api".into(),
        progress: json!({}),
        by: None,
    };
    store.begin_directory_sync(&running, now, now + time::Duration::seconds(60)).await.expect("begin");
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_carebridge"))
            .args(args)
            .arg("--config")
            .arg(&config)
            .env_remove("RUST_LOG")
            .output()
            .expect("the binary runs")
    };
    let refused = cli(&["directory", "sync", "demo"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("already running (job 0b9e5a52-4c61-4f0e-9d0c-3a7f0e0d7c11)"), "{stderr}");

    let end = carebridge::store::SyncJobEnd { state: "succeeded", progress: json!({}), report: None, error: None };
    store.finish_directory_sync("demo", &running.id, &end, now).await.expect("finish");
    store.close().await;
    let synced = cli(&["directory", "sync", "demo"]);
    assert!(synced.status.success(), "{}", String::from_utf8_lossy(&synced.stderr));
    assert!(String::from_utf8_lossy(&synced.stdout).contains("demo: 24 added"), "{:?}", synced);
}

/// The value of the series `name{labels}` in Prometheus text, when shown.
fn series(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
}

#[tokio::test]
async fn the_metrics_show_sync_runs_services_by_state_and_ages_after_a_sync() {
    let fake = FakeHsdsApi::with(fixture_services());
    let base = fake.start().await;
    // A source name of its own: the recorder is shared by every test in this process.
    let source = named(&base, "gauge211");
    let app = spawn_app_with(move |s| s.directories = vec![source]).await;
    let metrics = || async {
        app.client.get(format!("{}/metrics", app.base)).send().await.expect("sent").text().await.expect("text")
    };

    let before = metrics().await;
    assert_eq!(series(&before, r#"carebridge_directory_services{source="gauge211",state="active"}"#), Some(0.0));
    assert_eq!(series(&before, r#"carebridge_directory_last_complete_sync_age_seconds{source="gauge211"}"#), None);

    assert_eq!(crate::helpers::synced_report(&app, "gauge211", "mode=full").await["added"], 24);
    for _ in 0..2 {
        fake.fault(On::Page(1), Fault::Status(503, None, "down"));
    }
    let failed = crate::helpers::finished_sync(&app, "gauge211", "mode=full").await;
    assert_eq!(failed["state"], "failed", "{failed}");
    let text = metrics().await;
    let runs = |outcome: &str| {
        series(&text, &format!(r#"carebridge_directory_sync_runs_total{{source="gauge211",outcome="{outcome}"}}"#))
    };
    assert_eq!((runs("succeeded"), runs("source_failed")), (Some(1.0), Some(1.0)), "{text}");
    let services =
        |state: &str| series(&text, &format!(r#"carebridge_directory_services{{source="gauge211",state="{state}"}}"#));
    let inactive = fixture_services().iter().filter(|s| s["status"] == "inactive").count() as f64;
    assert_eq!(services("active"), Some(24.0 - inactive), "{text}");
    assert_eq!((services("inactive"), services("vanished")), (Some(inactive), Some(0.0)), "{text}");
    let age = series(&text, r#"carebridge_directory_last_complete_sync_age_seconds{source="gauge211"}"#);
    assert!(age.is_some_and(|a| (0.0..60.0).contains(&a)), "{age:?}");
    let newest = fixture_services().iter().filter_map(|s| s["last_modified"].as_str().map(str::to_owned)).max();
    let newest = time::OffsetDateTime::parse(&newest.expect("a date"), &time::format_description::well_known::Rfc3339)
        .expect("RFC 3339");
    let expected = (time::OffsetDateTime::now_utc() - newest).as_seconds_f64();
    let watermark = series(&text, r#"carebridge_directory_watermark_age_seconds{source="gauge211"}"#);
    assert!(watermark.is_some_and(|w| (w - expected).abs() < 60.0), "{watermark:?} vs {expected}");
    app.stop().await;
}

#[tokio::test]
async fn the_openapi_document_describes_the_sync_job_routes() {
    let app = crate::helpers::spawn_app().await;
    let doc = app.get_json("/api/v1/openapi.json").await;
    let start = &doc["paths"]["/api/v1/directories/{source}/sync"]["post"]["responses"];
    assert!(start["202"].is_object() && start["409"].is_object() && start["200"].is_null(), "{start}");
    let job = &doc["paths"]["/api/v1/directories/{source}/sync/{job}"]["get"];
    assert!(job["responses"]["200"].is_object(), "{job}");
    let schema = &doc["components"]["schemas"]["SyncJob"]["properties"];
    for field in ["state", "progress", "started_at", "finished_at", "report", "error"] {
        assert!(schema[field].is_object(), "SyncJob.{field}: {schema}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_whose_lease_another_job_took_over_stops_and_says_so() {
    let fake = FakeHsdsApi::with(fixture_services());
    let base = fake.start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite:{}", dir.path().join("lease.db").display());
    let store = carebridge::store::connect(&url, 4, Duration::from_secs(5)).await.expect("the store opens");
    let source = source_from_settings(&metro(&base), std::path::Path::new(".")).expect("a source");
    let here = runner(&store, source).with_heartbeat(Duration::from_millis(50));
    slow_pages(&fake, Duration::from_millis(400));
    let now = time::OffsetDateTime::now_utc();
    let claimed = here
        .claim(
            "metro",
            carebridge::directories::SyncMode::Full,
            false,
            carebridge::directories::jobs::StartedBy::Api,
            None,
            now,
        )
        .await
        .expect("claimed");
    let id = claimed.id.clone();
    let running = tokio::spawn(async move { here.run(claimed, &|_| {}).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    // Two minutes on, as another replica sees it, the lease has lapsed: it takes it over.
    let later = now + time::Duration::minutes(2);
    let other = carebridge::store::NewSyncJob {
        id: uuid::Uuid::new_v4().to_string(),
        source: "metro".into(),
        mode: "full".into(),
        force: false,
        started_by: "schedule".into(),
        progress: json!({}),
        by: None,
    };
    let taken = store.begin_directory_sync(&other, later, later + time::Duration::seconds(60)).await.expect("begin");
    assert_eq!(taken, carebridge::store::Begun::Started);
    let outcome = tokio::time::timeout(Duration::from_secs(5), running).await.expect("stopped in time").expect("task");
    let failure = outcome.expect_err("the sync stopped");
    assert_eq!(failure.kind, "lease_lost", "{failure:?}");
    let job = store.directory_sync_job(&id).await.expect("read").expect("kept");
    assert_eq!((job.state.as_str(), job.error.expect("an error")["kind"].as_str()), ("failed", Some("lease_lost")));
    assert!(fake.uris().len() < 5, "the sync stopped before reading every page: {:?}", fake.uris());
    store.close().await;
}

#[tokio::test]
async fn the_scheduled_worker_stops_when_the_gateway_says_so() {
    let fake = FakeHsdsApi::with(fixture_services());
    let base = fake.start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite:{}", dir.path().join("worker.db").display());
    let store = carebridge::store::connect(&url, 4, Duration::from_secs(5)).await.expect("the store opens");
    let source = source_from_settings(&metro(&base), std::path::Path::new(".")).expect("a source");
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let sources = std::collections::HashMap::from([("metro".to_owned(), source)]);
    let runner = SyncRunner::new(store.clone(), Arc::new(sources), stopping.clone());
    let worker = tokio::spawn(schedule::run_worker(runner, "metro".into(), Duration::from_secs(3600), stopping));
    // The first turn runs at once.
    while active_in(&store).await < 23 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.send(true).expect("the worker listens");
    tokio::time::timeout(Duration::from_secs(5), worker).await.expect("the worker stopped").expect("task");
    store.close().await;
}

async fn active_in(store: &Arc<dyn carebridge::store::Store>) -> usize {
    store.active_directory_services("metro").await.expect("read").len()
}
