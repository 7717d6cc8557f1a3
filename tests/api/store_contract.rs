//! The `Store` contract, run against SQLite and PostgreSQL alike.
//!
//! PostgreSQL runs when `CAREBRIDGE_TEST_POSTGRES_URL` is set (CI sets it): each test creates its own database
//! there and drops it afterwards. Set but unreachable is a failure, never a skip.

use std::sync::Arc;

use carebridge::domain::{RecordId, RecordKind};
use carebridge::store::{
    Actor, AttemptRow, Begun, Change, CrosswalkEntry, DeliveryFilter, ListQuery, NewSyncJob, Notified, NotifiedOutcome,
    Precondition, RecordWrite, SaveOutcome, Settle, Settlement, Store, StoreError, SyncJobEnd, connect,
};
use time::{Duration, OffsetDateTime};

fn id(s: &str) -> RecordId {
    RecordId::parse(s).expect("valid id")
}

fn actor() -> Actor {
    Actor { key_name: "contract".into(), request_id: "req-1".into(), partner: None }
}

fn t0() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_790_000_000).expect("time")
}

#[allow(clippy::too_many_arguments, reason = "a test helper naming every column a write sets")]
async fn save(
    store: &dyn Store,
    kind: RecordKind,
    rid: &RecordId,
    body: &str,
    client: Option<&RecordId>,
    status: Option<&'static str>,
    pre: Precondition,
    now: OffsetDateTime,
) -> Result<SaveOutcome, StoreError> {
    let write = RecordWrite {
        kind,
        id: rid.clone(),
        body: body.to_owned(),
        client_id: client.cloned(),
        status,
        direction: None,
        keys: Vec::new(),
        crosswalk: Vec::new(),
        change: Change::Put,
        deliver_to: Vec::new(),
        reopens_held: false,
    };
    store.save_record(&write, pre, &actor(), now).await
}

async fn a_write_and_its_deliveries_are_one(store: Arc<dyn Store>) {
    let r = id("ref-9");
    let write = |body: &str| RecordWrite {
        kind: RecordKind::Referral,
        id: r.clone(),
        body: body.to_owned(),
        client_id: None,
        status: Some("sent"),
        direction: None,
        keys: Vec::new(),
        crosswalk: Vec::new(),
        change: Change::Put,
        deliver_to: vec!["st-marys-ehr".to_owned(), "county-crisis-team".to_owned()],
        reopens_held: false,
    };
    let s = &*store;
    s.save_record(&write(r#"{"v":1}"#), Precondition::None, &actor(), t0()).await.expect("v1");
    s.save_record(&write(r#"{"v":1}"#), Precondition::None, &actor(), t0()).await.expect("the same again");
    let refused = s.save_record(&write(r#"{"v":2}"#), Precondition::Version(7), &actor(), t0()).await;
    assert!(matches!(refused, Err(StoreError::PreconditionFailed { .. })), "{refused:?}");
    s.save_record(&write(r#"{"v":2}"#), Precondition::None, &actor(), t0()).await.expect("v2");
    let mut rows: Vec<(i64, String, String)> = s
        .list_deliveries(&DeliveryFilter {
            record: Some((RecordKind::Referral, r.clone())),
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("deliveries")
        .into_iter()
        .map(|d| (d.version, d.partner, d.state))
        .collect();
    rows.sort();
    let pending = |v: i64, p: &str| (v, p.to_owned(), "pending".to_owned());
    assert_eq!(
        rows,
        [
            pending(1, "county-crisis-team"),
            pending(1, "st-marys-ehr"),
            pending(2, "county-crisis-team"),
            pending(2, "st-marys-ehr")
        ],
        "one row per new version and partner: none for an identical resend or a refused write"
    );
}

async fn writes_create_replace_and_leave_identical_bodies_unchanged(store: Arc<dyn Store>) {
    let r = id("ref-1");
    let s = &*store;
    let created = save(s, RecordKind::Referral, &r, r#"{"v":1}"#, None, Some("sent"), Precondition::None, t0()).await;
    assert!(matches!(created, Ok(SaveOutcome::Created(m)) if m.version == 1), "{created:?}");
    let same = save(s, RecordKind::Referral, &r, r#"{"v":1}"#, None, Some("sent"), Precondition::None, t0()).await;
    assert!(matches!(same, Ok(SaveOutcome::Unchanged(m)) if m.version == 1), "{same:?}");
    let later = t0() + Duration::minutes(5);
    let replaced = save(s, RecordKind::Referral, &r, r#"{"v":2}"#, None, Some("sent"), Precondition::None, later).await;
    assert!(
        matches!(replaced, Ok(SaveOutcome::Replaced(m)) if m.version == 2 && m.updated_at == later),
        "{replaced:?}"
    );

    let current = s.get_record(RecordKind::Referral, &r).await.expect("read").expect("exists");
    assert_eq!((current.meta.version, current.body.as_str()), (2, r#"{"v":2}"#));
    let v1 = s.get_version(RecordKind::Referral, &r, 1).await.expect("read").expect("kept");
    assert_eq!(v1.body, r#"{"v":1}"#);
    assert!(s.get_version(RecordKind::Referral, &r, 3).await.expect("read").is_none());
    // Kinds are separate namespaces.
    assert!(s.get_record(RecordKind::Client, &r).await.expect("read").is_none());

    let history = s.history(RecordKind::Referral, &r).await.expect("history");
    let actions: Vec<_> = history.iter().map(|h| (h.version, h.change.as_str(), h.changed_by.as_str())).collect();
    assert_eq!(actions, [(1, "created", "contract"), (2, "replaced", "contract")]);
    let audit = s.audit_chain(0, 100).await.expect("audit");
    let actions: Vec<_> = audit.iter().map(|a| (a.entry.action.as_str(), a.entry.version)).collect();
    assert_eq!(actions, [("created", Some(1)), ("unchanged", Some(1)), ("replaced", Some(2))]);
    assert!(audit.windows(2).all(|w| w[0].seq < w[1].seq));
    let after_first = s.audit_chain(audit[0].seq, 100).await.expect("audit");
    assert_eq!(after_first.len(), 2);
}

async fn preconditions_are_enforced(store: Arc<dyn Store>) {
    let s = &*store;
    let c = id("co-1");
    let pf = |r: Result<SaveOutcome, StoreError>| match r {
        Err(StoreError::PreconditionFailed { current }) => current,
        other => panic!("expected a precondition failure, got {other:?}"),
    };
    assert_eq!(pf(save(s, RecordKind::Consent, &c, "{}", None, None, Precondition::Version(1), t0()).await), None);
    assert_eq!(pf(save(s, RecordKind::Consent, &c, "{}", None, None, Precondition::Exists, t0()).await), None);
    save(s, RecordKind::Consent, &c, "{}", None, None, Precondition::Absent, t0()).await.expect("absent: created");
    assert_eq!(
        pf(save(s, RecordKind::Consent, &c, "{\"a\":1}", None, None, Precondition::Absent, t0()).await),
        Some(1)
    );
    assert_eq!(
        pf(save(s, RecordKind::Consent, &c, "{\"a\":1}", None, None, Precondition::Version(7), t0()).await),
        Some(1)
    );
    let ok = save(s, RecordKind::Consent, &c, "{\"a\":1}", None, None, Precondition::Version(1), t0()).await;
    assert!(matches!(ok, Ok(SaveOutcome::Replaced(m)) if m.version == 2));
    let ok = save(s, RecordKind::Consent, &c, "{\"a\":2}", None, None, Precondition::Exists, t0()).await;
    assert!(matches!(ok, Ok(SaveOutcome::Replaced(m)) if m.version == 3));
    let history = s.history(RecordKind::Consent, &c).await.expect("history");
    assert_eq!(history.len(), 3, "refused writes leave no version");
}

async fn lists_filter_and_page_in_id_order(store: Arc<dyn Store>) {
    let s = &*store;
    let (alice, bob) = (id("cl-a"), id("cl-b"));
    for n in 0..25 {
        let rid = id(&format!("ref-{n:03}"));
        let client = if n % 2 == 0 { &alice } else { &bob };
        let status = if n % 5 == 0 { "completed" } else { "sent" };
        let now = t0() + Duration::hours(n);
        save(
            s,
            RecordKind::Referral,
            &rid,
            &format!("{{\"n\":{n}}}"),
            Some(client),
            Some(status),
            Precondition::None,
            now,
        )
        .await
        .expect("saved");
    }
    save(s, RecordKind::Client, &alice, "{}", Some(&alice), None, Precondition::None, t0()).await.expect("saved");
    let query = |client: Option<&RecordId>,
                 status: Option<&str>,
                 since: Option<OffsetDateTime>,
                 after: Option<String>,
                 limit| ListQuery {
        kind: RecordKind::Referral,
        client_id: client.cloned(),
        status: status.map(str::to_owned),
        direction: None,
        updated_since: since,
        after,
        limit,
    };
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = s.list_records(&query(None, None, None, after.clone(), 10)).await.expect("page");
        assert!(page.items.len() <= 10);
        seen.extend(page.items.iter().map(|r| r.id.clone()));
        match page.next_after {
            Some(a) => after = Some(a),
            None => break,
        }
    }
    let expected: Vec<String> = (0..25).map(|n| format!("ref-{n:03}")).collect();
    assert_eq!(seen, expected);
    let exact = s.list_records(&query(None, None, None, None, 25)).await.expect("page");
    assert_eq!((exact.items.len(), exact.next_after), (25, None), "a full last page says there is no more");

    let of_bob = s.list_records(&query(Some(&bob), None, None, None, 100)).await.expect("page");
    assert_eq!(of_bob.items.len(), 12);
    let completed = s.list_records(&query(None, Some("completed"), None, None, 100)).await.expect("page");
    let ids: Vec<_> = completed.items.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["ref-000", "ref-005", "ref-010", "ref-015", "ref-020"]);
    let alice_completed = s.list_records(&query(Some(&alice), Some("completed"), None, None, 100)).await.expect("page");
    assert_eq!(alice_completed.items.len(), 3);
    let recent = s.list_records(&query(None, None, Some(t0() + Duration::hours(20)), None, 100)).await.expect("page");
    assert_eq!(recent.items.len(), 5);
    assert_eq!(recent.items[0].meta.updated_at, t0() + Duration::hours(20));
}

async fn concurrent_writers_never_lose_a_version(store: Arc<dyn Store>) {
    let rid = id("cl-busy");
    let tasks: Vec<_> = (0..16)
        .map(|n| {
            let store = store.clone();
            let rid = rid.clone();
            tokio::spawn(async move {
                save(&*store, RecordKind::Client, &rid, &format!("{{\"n\":{n}}}"), None, None, Precondition::None, t0())
                    .await
            })
        })
        .collect();
    let mut versions = Vec::new();
    for t in tasks {
        versions.push(t.await.expect("task").expect("every write lands").meta().version);
    }
    versions.sort_unstable();
    assert_eq!(versions, (1..=16).collect::<Vec<i64>>());
    let history = store.history(RecordKind::Client, &rid).await.expect("history");
    assert_eq!(history.len(), 16);

    // Sixteen writers that all start from version 16: exactly one wins.
    let tasks: Vec<_> = (0..16)
        .map(|n| {
            let store = store.clone();
            let rid = rid.clone();
            tokio::spawn(async move {
                save(
                    &*store,
                    RecordKind::Client,
                    &rid,
                    &format!("{{\"m\":{n}}}"),
                    None,
                    None,
                    Precondition::Version(16),
                    t0(),
                )
                .await
            })
        })
        .collect();
    let mut wins = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(SaveOutcome::Replaced(m)) => {
                assert_eq!(m.version, 17);
                wins += 1;
            }
            Err(StoreError::PreconditionFailed { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(wins, 1);
}

async fn the_schema_is_ready_and_pools_are_reported(store: Arc<dyn Store>) {
    store.readiness().await.expect("ready");
    assert!(!store.pool_stats().is_empty());
}

fn job(id: &str, source: &str) -> NewSyncJob {
    NewSyncJob {
        id: id.into(),
        source: source.into(),
        mode: "full".into(),
        force: false,
        started_by: "api".into(),
        progress: serde_json::json!({"read": 0}),
        by: None,
    }
}

fn ended() -> SyncJobEnd {
    SyncJobEnd { state: "succeeded", progress: serde_json::json!({"read": 3}), report: None, error: None }
}

async fn a_source_lease_is_taken_by_one_job_and_lapses_when_its_holder_stops_renewing(store: Arc<dyn Store>) {
    let s = &*store;
    let lease = Duration::seconds(60);
    let at = |secs: i64| t0() + Duration::seconds(secs);
    assert_eq!(s.begin_directory_sync(&job("a", "metro"), at(0), at(0) + lease).await.expect("begin"), Begun::Started);
    let busy = s.begin_directory_sync(&job("b", "metro"), at(1), at(1) + lease).await.expect("begin");
    assert_eq!(busy, Begun::Busy { running: "a".into() });
    assert!(s.directory_sync_job("b").await.expect("read").is_none(), "a refused job is not recorded");
    // Another source has its own lease.
    assert_eq!(s.begin_directory_sync(&job("x", "other"), at(1), at(1) + lease).await.expect("begin"), Begun::Started);

    // Renewed, the lease outlives its first expiry; the job is running with its counts.
    let progress = serde_json::json!({"read": 7});
    assert!(s.renew_directory_sync("metro", "a", &progress, at(50), at(50) + lease).await.expect("renew"));
    let busy = s.begin_directory_sync(&job("c", "metro"), at(70), at(70) + lease).await.expect("begin");
    assert_eq!(busy, Begun::Busy { running: "a".into() });
    let running = s.directory_sync_job("a").await.expect("read").expect("kept");
    assert_eq!((running.state.as_str(), running.started_at, &running.progress), ("running", Some(at(50)), &progress));

    // Ended, the lease is free at once, and the job keeps how it ended.
    s.finish_directory_sync("metro", "a", &ended(), at(80)).await.expect("finish");
    let done = s.directory_sync_job("a").await.expect("read").expect("kept");
    assert_eq!((done.state.as_str(), done.finished_at), ("succeeded", Some(at(80))));
    assert_eq!(
        s.begin_directory_sync(&job("d", "metro"), at(81), at(81) + lease).await.expect("begin"),
        Begun::Started
    );

    // A holder that stops renewing (crashed) loses the lease once it lapses; its job is marked abandoned, and its
    // late renewal is refused.
    let early = s.begin_directory_sync(&job("e", "metro"), at(140), at(140) + lease).await.expect("begin");
    assert_eq!(early, Begun::Busy { running: "d".into() });
    assert_eq!(
        s.begin_directory_sync(&job("e", "metro"), at(141), at(141) + lease).await.expect("begin"),
        Begun::Started
    );
    let abandoned = s.directory_sync_job("d").await.expect("read").expect("kept");
    assert_eq!(abandoned.state, "failed");
    assert_eq!(abandoned.error.expect("an error")["kind"], "abandoned");
    assert!(!s.renew_directory_sync("metro", "d", &progress, at(142), at(142) + lease).await.expect("renew"));
    // Its late end does not free the lease the new job holds.
    s.finish_directory_sync("metro", "d", &ended(), at(143)).await.expect("finish");
    let busy = s.begin_directory_sync(&job("f", "metro"), at(144), at(144) + lease).await.expect("begin");
    assert_eq!(busy, Begun::Busy { running: "e".into() });
}

async fn two_jobs_racing_for_one_lease_get_it_once(store: Arc<dyn Store>) {
    let lease = Duration::seconds(60);
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store.begin_directory_sync(&job(&format!("j{i}"), "metro"), t0(), t0() + lease).await.expect("begin")
            })
        })
        .collect();
    let mut started = 0;
    for t in tasks {
        if t.await.expect("task") == Begun::Started {
            started += 1;
        }
    }
    assert_eq!(started, 1, "exactly one of the racing jobs holds the lease");
}

async fn a_service_a_later_sync_saw_is_never_deactivated_by_an_earlier_one(store: Arc<dyn Store>) {
    let s = &*store;
    let raw = serde_json::json!({"id": "svc-1", "name": "Pantry"});
    let service: carebridge::directories::CatalogService = serde_json::from_value(serde_json::json!({
        "id": "metro.svc-1", "source": "metro", "source_id": "svc-1", "name": "Pantry", "description": "Food",
        "status": "active", "url": null, "email": null, "eligibility": null, "minimum_age": null,
        "maximum_age": null, "organization": null, "locations": [], "terms": [], "languages": [], "schedules": [],
        "phones": [], "source_modified": null,
    }))
    .expect("a service");
    let (earlier, later) = (t0(), t0() + Duration::minutes(1));
    s.upsert_directory_services(&[(service.clone(), &raw)], later).await.expect("kept by the later sync");
    // The earlier sync sees it unchanged, or marks it seen: that must not move its sighting back.
    s.upsert_directory_services(&[(service, &raw)], earlier).await.expect("seen by the earlier sync");
    s.mark_directory_services_seen("metro", &["svc-1".to_owned()], earlier).await.expect("seen");
    let ids = ["svc-1".to_owned()];
    assert_eq!(s.deactivate_directory_services("metro", &ids, earlier).await.expect("deactivate"), 0);
    assert!(s.directory_service("metro.svc-1").await.expect("read").expect("kept").1, "still active");
    // A sync that started after the last sighting, and did not see it, deactivates it.
    let latest = later + Duration::minutes(1);
    assert_eq!(s.deactivate_directory_services("metro", &ids, latest).await.expect("deactivate"), 1);
}

async fn sqlite_store() -> (Arc<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite:{}", dir.path().join("contract.db").display());
    (connect(&url, 4, std::time::Duration::from_secs(5)).await.expect("sqlite opens"), dir)
}

/// A PostgreSQL database of its own, dropped when the test ends.
pub struct PgDatabase {
    admin_url: String,
    name: String,
    /// URL of the test's own database.
    pub url: String,
    /// A store on it.
    pub store: Arc<dyn Store>,
}

pub async fn postgres_store() -> Option<PgDatabase> {
    let Ok(admin_url) = std::env::var("CAREBRIDGE_TEST_POSTGRES_URL") else {
        eprintln!("CAREBRIDGE_TEST_POSTGRES_URL is not set: PostgreSQL contract test skipped");
        return None;
    };
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let name = format!("carebridge_test_{}", uuid::Uuid::new_v4().simple());
    let admin = sqlx::PgPool::connect(&admin_url)
        .await
        .unwrap_or_else(|e| panic!("CAREBRIDGE_TEST_POSTGRES_URL is set but PostgreSQL is unreachable: {e}"));
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&admin).await.expect("create database");
    admin.close().await;
    let (base, query) = admin_url.split_once('?').map_or((admin_url.as_str(), None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let root = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    let url = match query {
        Some(q) => format!("{root}/{name}?{q}"),
        None => format!("{root}/{name}"),
    };
    let store = connect(&url, 8, std::time::Duration::from_secs(10)).await.expect("postgres store opens");
    Some(PgDatabase { admin_url, name, url, store })
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let (url, name, store) = (self.admin_url.clone(), self.name.clone(), self.store.clone());
        // Async cleanup from Drop: a thread with its own runtime, joined so the database is gone when we return.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                store.close().await;
                if let Ok(admin) = sqlx::PgPool::connect(&url).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
                        .execute(&admin)
                        .await;
                }
            });
        })
        .join();
    }
}

/// Claims: the newest waiting version of a record only, older ones superseded; a leased row is nobody else's until
/// its lease lapses; a client's later kinds wait for its earlier ones; racing claimers never take one row twice.
async fn outbox_claims_take_each_row_once_in_order(store: Arc<dyn Store>) {
    let partner = format!("p-{}", uuid::Uuid::new_v4().simple());
    let s = &*store;
    let write = |kind: RecordKind, rid: &str, client: &str, body: &str| RecordWrite {
        kind,
        id: id(rid),
        body: body.to_owned(),
        client_id: (kind != RecordKind::Client).then(|| id(client)),
        status: None,
        direction: None,
        keys: Vec::new(),
        crosswalk: Vec::new(),
        change: Change::Put,
        deliver_to: vec![partner.clone()],
        reopens_held: false,
    };
    for v in 1..=3 {
        let w = write(RecordKind::Client, "cl-claim", "cl-claim", &format!(r#"{{"v":{v}}}"#));
        s.save_record(&w, Precondition::None, &actor(), t0()).await.expect("client");
    }
    let w = write(RecordKind::Referral, "ref-claim", "cl-claim", "{}");
    s.save_record(&w, Precondition::None, &actor(), t0()).await.expect("referral");
    let until = t0() + Duration::seconds(60);
    let a = s.claim_deliveries(&partner, "worker-a", 10, t0(), until).await.expect("claim");
    let got: Vec<(RecordKind, i64)> = a.iter().map(|r| (r.kind, r.version)).collect();
    assert_eq!(got, [(RecordKind::Client, 3)], "the newest client version only; the referral waits for it");
    let states: Vec<String> = s
        .list_deliveries(&DeliveryFilter {
            record: Some((RecordKind::Client, id("cl-claim"))),
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("rows")
        .into_iter()
        .map(|d| d.state)
        .collect();
    assert_eq!(states, ["superseded", "superseded", "pending"]);
    assert!(s.claim_deliveries(&partner, "worker-b", 10, t0(), until).await.expect("claim").is_empty());
    // The lease lapses: another worker takes the row over.
    let later = until + Duration::seconds(1);
    let b = s.claim_deliveries(&partner, "worker-b", 10, later, later + Duration::seconds(60)).await.expect("claim");
    assert_eq!(b.len(), 1);
    // The first worker's settlement no longer counts; the second's does, and the referral is due after it.
    let settle = |seq| Settlement {
        seq,
        settle: Settle::Delivered,
        attempt: AttemptRow {
            at: later,
            ms: 1,
            outcome: "delivered".into(),
            status: Some(201),
            detail: "ok".into(),
            operation_outcome: None,
        },
        crosswalk: Vec::new(),
        waits_for: Vec::new(),
        keep_attempt: true,
        partner_answered: None,
        audit: None,
    };
    assert_eq!(s.settle_deliveries("worker-a", &[settle(b[0].seq)], later).await.expect("settle"), 0);
    assert_eq!(s.settle_deliveries("worker-b", &[settle(b[0].seq)], later).await.expect("settle"), 1);
    let r = s.claim_deliveries(&partner, "worker-a", 10, later, later + Duration::seconds(60)).await.expect("claim");
    assert_eq!(r.iter().map(|r| r.kind).collect::<Vec<_>>(), [RecordKind::Referral]);
    // Forty clients, four claimers at once: every row taken exactly once.
    for i in 0..40 {
        let c = format!("cl-race-{i}");
        s.save_record(&write(RecordKind::Client, &c, &c, "{}"), Precondition::None, &actor(), t0()).await.expect("w");
    }
    let claims = (0..4).map(|k| {
        let store = store.clone();
        let partner = partner.clone();
        tokio::spawn(async move {
            let owner = format!("racer-{k}");
            let mut mine = Vec::new();
            loop {
                let got = store.claim_deliveries(&partner, &owner, 3, later, later + Duration::seconds(60)).await;
                let got = got.expect("claim");
                if got.is_empty() {
                    return mine;
                }
                mine.extend(got.into_iter().map(|r| r.seq));
            }
        })
    });
    let mut all = Vec::new();
    for c in claims {
        all.extend(c.await.expect("claimer"));
    }
    let n = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!((n, all.len()), (40, 40), "a row was claimed twice, or one was missed");
}

/// A delivery that went with a logical reference to a resource not yet at the partner, settled after that resource
/// arrived (another worker delivered it meanwhile and found nothing waiting): it goes again now, never waits for a
/// wake that already happened; one settled before the arrival is woken by it.
async fn a_wait_recorded_after_its_target_arrived_goes_again_at_once(store: Arc<dyn Store>) {
    let partner = format!("p-{}", uuid::Uuid::new_v4().simple());
    let s = &*store;
    let referral = |rid: &str| RecordWrite {
        kind: RecordKind::Referral,
        id: id(rid),
        body: "{}".into(),
        client_id: Some(id("cl-wait")),
        status: None,
        direction: None,
        keys: Vec::new(),
        crosswalk: Vec::new(),
        change: Change::Put,
        deliver_to: vec![partner.clone()],
        reopens_held: false,
    };
    for r in ["ref-late", "ref-early"] {
        s.save_record(&referral(r), Precondition::None, &actor(), t0()).await.expect("referral");
    }
    let until = t0() + Duration::seconds(60);
    let rows = s.claim_deliveries(&partner, "worker-a", 10, t0(), until).await.expect("claim");
    assert_eq!(rows.len(), 2);
    let seq = |rid: &str| rows.iter().find(|r| r.id.as_str() == rid).expect("row").seq;
    let delivered = |seq, waits: &[&str]| Settlement {
        seq,
        settle: Settle::Delivered,
        attempt: AttemptRow {
            at: t0(),
            ms: 1,
            outcome: "delivered".into(),
            status: Some(200),
            detail: "ok".into(),
            operation_outcome: None,
        },
        crosswalk: Vec::new(),
        waits_for: waits.iter().map(|w| (*w).to_owned()).collect(),
        keep_attempt: true,
        partner_answered: None,
        audit: None,
    };
    // `ref-early` settles while its target is still missing: it waits.
    s.settle_deliveries("worker-a", &[delivered(seq("ref-early"), &["ServiceRequest/ref-target"])], t0())
        .await
        .expect("settle");
    // The target arrives (a part saved by another worker); nothing waits on `Goal/g-target` yet.
    let entry = |local_ref: &str| CrosswalkEntry {
        partner: partner.clone(),
        local_ref: local_ref.into(),
        kind: RecordKind::Referral,
        record_id: id("ref-target"),
        remote_type: "ServiceRequest".into(),
        remote_id: "srv-1".into(),
        version_id: Some("1".into()),
        content_hash: "h".into(),
    };
    s.save_crosswalk(&[entry("ServiceRequest/ref-target"), entry("Goal/g-target")], t0()).await.expect("crosswalk");
    // `ref-late` looked for `Goal/g-target` before it arrived, and settles after.
    s.settle_deliveries("worker-a", &[delivered(seq("ref-late"), &["Goal/g-target"])], t0()).await.expect("settle");
    for rid in ["ref-early", "ref-late"] {
        let filter = DeliveryFilter { record: Some((RecordKind::Referral, id(rid))), limit: 10, ..Default::default() };
        let row = s.list_deliveries(&filter).await.expect("rows").remove(0);
        assert_eq!(row.state, "pending", "{rid} goes again: {row:?}");
    }
}

/// A delivery's one read: the version owed, and the client's current records of the kinds asked for (no other
/// client's, no other kind), whatever the version owed is.
async fn a_delivery_reads_its_version_and_its_clients_records_at_once(store: Arc<dyn Store>) {
    let s = &*store;
    let (mine, theirs) = (id("cl-ctx-1"), id("cl-ctx-2"));
    let ok = |r: Result<SaveOutcome, StoreError>| r.expect("saved");
    ok(save(s, RecordKind::Client, &mine, r#"{"n":1}"#, Some(&mine), None, Precondition::None, t0()).await);
    ok(save(s, RecordKind::Consent, &id("co-ctx-1"), r#"{"c":1}"#, Some(&mine), None, Precondition::None, t0()).await);
    ok(save(s, RecordKind::Consent, &id("co-ctx-2"), r#"{"c":2}"#, Some(&theirs), None, Precondition::None, t0())
        .await);
    ok(save(s, RecordKind::Referral, &id("ref-ctx-1"), r#"{"r":1}"#, Some(&mine), None, Precondition::None, t0())
        .await);
    ok(save(s, RecordKind::Client, &mine, r#"{"n":2}"#, Some(&mine), None, Precondition::None, t0()).await);
    let kinds = [RecordKind::Consent, RecordKind::Referral];
    let (owed, others) =
        s.version_and_client_records(RecordKind::Client, &mine, 1, Some(&mine), &kinds).await.expect("read");
    assert_eq!(owed.expect("version 1").body, r#"{"n":1}"#);
    let mut got: Vec<(RecordKind, String)> = others.into_iter().map(|(k, r)| (k, r.id)).collect();
    got.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(got, [(RecordKind::Consent, "co-ctx-1".to_owned()), (RecordKind::Referral, "ref-ctx-1".to_owned())]);
    let (owed, others) =
        s.version_and_client_records(RecordKind::Client, &mine, 9, None, &[RecordKind::Client]).await.expect("read");
    assert!(owed.is_none() && others.is_empty());
    let (_, others) = s
        .version_and_client_records(RecordKind::Client, &mine, 2, Some(&mine), &[RecordKind::Client])
        .await
        .expect("read");
    assert_eq!(others.len(), 1);
    assert_eq!((others[0].1.meta.version, others[0].1.body.as_str()), (2, r#"{"n":2}"#));
}

fn notified(kind: &str, since: Option<i64>, events: &[(i64, &str)]) -> Notified {
    Notified {
        kind: kind.into(),
        status: "active".into(),
        events_since: since,
        events: events.iter().map(|(n, f)| (*n, (*f).to_owned())).collect(),
    }
}

/// A partner's subscription: only its token is accepted; a handshake makes it active; events are kept once per
/// Task (the newest number), a skipped number or a heartbeat counting more is a gap that owes a sweep; a Task read
/// is forgotten unless a newer event named it; a new subscription forgets the old one's token and events.
async fn subscription_notifications_are_kept_counted_and_forgotten(store: Arc<dyn Store>) {
    let p = "hospital";
    assert_eq!(store.subscription(p).await.expect("read"), None);
    assert_eq!(
        store.record_notification(p, "h1", &notified("handshake", Some(0), &[]), t0()).await.expect("kept"),
        NotifiedOutcome::Unknown,
        "no subscription, nothing accepted"
    );
    store.begin_subscription(p, "h1", t0()).await.expect("begun");
    let row = store.subscription(p).await.expect("read").expect("row");
    assert_eq!((row.status.as_str(), row.remote_id, row.owed_sweep), ("requested", None, true));
    store.owe_sweep(p, false).await.expect("paid");
    assert_eq!(
        store.record_notification(p, "h2", &notified("handshake", Some(0), &[]), t0()).await.expect("kept"),
        NotifiedOutcome::Unknown,
        "another token"
    );
    let handshake = store.record_notification(p, "h1", &notified("handshake", Some(0), &[]), t0()).await;
    assert_eq!(handshake.expect("kept"), NotifiedOutcome::Recorded { gap: false });
    // The partner's answer comes after its handshake: the handshake's `active` stays.
    store.subscription_created(p, "h1", "sub-1", "requested").await.expect("created");
    let row = store.subscription(p).await.expect("read").expect("row");
    assert_eq!((row.status.as_str(), row.remote_id.as_deref(), row.heard_at), ("active", Some("sub-1"), Some(t0())));

    let one = notified("event-notification", Some(2), &[(1, "t-1"), (2, "t-2")]);
    assert_eq!(
        store.record_notification(p, "h1", &one, t0()).await.expect("kept"),
        NotifiedOutcome::Recorded { gap: false }
    );
    let again = notified("event-notification", Some(4), &[(4, "t-1"), (5, "")]);
    assert_eq!(
        store.record_notification(p, "h1", &again, t0()).await.expect("kept"),
        NotifiedOutcome::Recorded { gap: true }
    );
    assert!(store.subscription(p).await.expect("read").expect("row").owed_sweep);
    let pending = store.pending_events(p, 10).await.expect("pending");
    assert_eq!(pending, vec![("t-2".to_owned(), 2), ("t-1".to_owned(), 4)]);
    // t-1 was read after event 1 only: event 4 keeps it.
    store.forget_event(p, "t-1", 1).await.expect("forgot");
    store.forget_event(p, "t-2", 2).await.expect("forgot");
    assert_eq!(store.pending_events(p, 10).await.expect("pending"), vec![("t-1".to_owned(), 4)]);

    store.owe_sweep(p, false).await.expect("paid");
    let beat = store.record_notification(p, "h1", &notified("heartbeat", Some(5), &[]), t0()).await;
    assert_eq!(beat.expect("kept"), NotifiedOutcome::Recorded { gap: false }, "5 were seen");
    let beat = store.record_notification(p, "h1", &notified("heartbeat", Some(7), &[]), t0()).await;
    assert_eq!(beat.expect("kept"), NotifiedOutcome::Recorded { gap: true });
    assert_eq!(store.subscription(p).await.expect("read").expect("row").events_seen, 7);

    store.begin_subscription(p, "h3", t0() + Duration::minutes(1)).await.expect("again");
    assert_eq!(store.pending_events(p, 10).await.expect("pending"), vec![]);
    let old = store.record_notification(p, "h1", &notified("heartbeat", Some(8), &[]), t0()).await;
    assert_eq!(old.expect("kept"), NotifiedOutcome::Unknown, "the replaced token is refused");
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let (store, _dir) = super::sqlite_store().await;
                    super::$name(store).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(db) = super::postgres_store().await else { return };
                    super::$name(db.store.clone()).await;
                }
            )*
        }
    };
}

contract!(
    a_write_and_its_deliveries_are_one,
    writes_create_replace_and_leave_identical_bodies_unchanged,
    preconditions_are_enforced,
    lists_filter_and_page_in_id_order,
    concurrent_writers_never_lose_a_version,
    the_schema_is_ready_and_pools_are_reported,
    a_source_lease_is_taken_by_one_job_and_lapses_when_its_holder_stops_renewing,
    two_jobs_racing_for_one_lease_get_it_once,
    a_service_a_later_sync_saw_is_never_deactivated_by_an_earlier_one,
    outbox_claims_take_each_row_once_in_order,
    a_wait_recorded_after_its_target_arrived_goes_again_at_once,
    a_delivery_reads_its_version_and_its_clients_records_at_once,
    subscription_notifications_are_kept_counted_and_forgotten,
);

/// The whole API on PostgreSQL: the fixtures go in and come back, and readiness follows the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_the_fixtures_from_postgres_and_readiness_follows_the_database() {
    let Some(db) = postgres_store().await else { return };
    let url = db.url.clone();
    let app = crate::helpers::spawn_app_with(|s| s.database.url = url).await;
    app.load_fixtures().await;
    for (kind, id, body) in crate::helpers::fixtures() {
        assert_eq!(app.get_json(&format!("/api/v1/{kind}s/{id}")).await, body, "{kind}/{id}");
    }
    let ready = app.client.get(format!("{}/readyz", app.base)).send().await.expect("sent");
    assert_eq!(ready.status(), 200);
    assert_eq!(ready.json::<serde_json::Value>().await.expect("JSON")["database"], "postgres");

    // The database goes away under the running gateway: readiness says so, and writes fail with a problem document.
    let admin = sqlx::PgPool::connect(&db.admin_url).await.expect("admin connection");
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {} WITH (FORCE)", db.name)))
        .execute(&admin)
        .await
        .expect("drop database");
    let ready = app.client.get(format!("{}/readyz", app.base)).send().await.expect("sent");
    assert_eq!(ready.status(), 503);
    assert_eq!(ready.headers()["content-type"], "application/problem+json");
    let write = app.put("/api/v1/clients/cl-1001", &crate::helpers::fixture("client", "cl-1001")).await;
    assert!(write.status().is_server_error(), "{}", write.status());
    assert_eq!(write.headers()["content-type"], "application/problem+json");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalog_is_searched_the_same_way_on_postgres() {
    let Some(db) = postgres_store().await else { return };
    let app = crate::directories::catalog_app(Some(db.url.clone())).await;
    crate::directories::search_finds_by_text_category_term_language_and_distance(&app).await;
    crate::publication::listings_filter_and_page_the_catalog(&app).await;
    crate::publication::hsds_filters_by_taxonomy_term_and_organization(&app).await;
    app.stop().await;
}

/// Services kept before the gateway indexed its own words (or by older rules) are indexed again when the store
/// next opens, so a text search finds them without waiting for a sync.
async fn search_words_are_indexed_again_when_the_store_opens(url: &str) {
    use carebridge::directories::ServiceQuery;
    let raw: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/directory/hsds/services.json"))
            .expect("fixture"),
    )
    .expect("JSON");
    let service = carebridge::directories::hsds::normalise_service("demo", &raw[0]).expect("a valid service");
    let store = connect(url, 2, std::time::Duration::from_secs(10)).await.expect("opens");
    store.upsert_directory_service(&service, &raw[0], OffsetDateTime::now_utc()).await.expect("kept");
    store.close().await;
    clear_public_ids(url, "UPDATE directory_services SET search_name = '', search_body = '', search_version = 0").await;

    let store = connect(url, 2, std::time::Duration::from_secs(10)).await.expect("opens again");
    let query = ServiceQuery { text: Some("psychotherapy adults".into()), page: 1, per_page: 10, ..Default::default() };
    let (hits, total) = store.search_services(&query).await.expect("searched");
    assert_eq!((total, hits.first().map(|h| h.id.as_str())), (1, Some(service.id.as_str())));
    assert_eq!(store.reindex_search_words().await.expect("nothing left"), 0);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_words_are_indexed_again_when_a_sqlite_store_opens() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite:{}", dir.path().join("words.db").display());
    search_words_are_indexed_again_when_the_store_opens(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_words_are_indexed_again_when_a_postgres_store_opens() {
    let Some(db) = postgres_store().await else { return };
    db.store.close().await;
    search_words_are_indexed_again_when_the_store_opens(&db.url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_quality_is_the_same_on_postgres() {
    let Some(db) = postgres_store().await else { return };
    let (app, _fake) = crate::directories_search::search_app(Some(db.url.clone())).await;
    crate::directories_search::search_quality(&app).await;
    app.stop().await;
}

/// Two gateways on one PostgreSQL database, each with its own search index: what one syncs, the other finds at
/// its next search.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_on_one_postgres_database_each_find_what_the_other_synced() {
    use crate::directories_search::{WESTSIDE, change_the_source, finds_the_changes, found, gateway_of, search_app};
    let Some(db) = postgres_store().await else { return };
    let (syncing, fake) = search_app(Some(db.url.clone())).await;
    let other = gateway_of(&fake, Some(db.url.clone()), carebridge::config::SearchEngine::Index).await;
    assert_eq!(found(&other, "q=rosewood").await, [WESTSIDE], "built from what the first one synced");
    change_the_source(&fake);
    let report = crate::helpers::synced_report(&syncing, "metro", "mode=full").await;
    assert_eq!(report["deactivated"], 1, "{report}");
    finds_the_changes(&other).await;
    finds_the_changes(&syncing).await;
    other.stop().await;
    syncing.stop().await;
}

/// Rows kept before a migration added their HSDS ids get them when the store next opens, so the `/hsds` id
/// filters find them without waiting for a sync.
async fn public_ids_are_filled_when_the_store_opens(url: &str, clear: &str) {
    use carebridge::store::CatalogListing;
    let raw: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/directory/hsds/services.json"))
            .expect("fixture"),
    )
    .expect("JSON");
    let service = carebridge::directories::hsds::normalise_service("demo", &raw[0]).expect("a valid service");
    let org = service.organization.clone().expect("an organisation");
    let term = service.terms.first().cloned().expect("a term");
    let store = connect(url, 2, std::time::Duration::from_secs(10)).await.expect("opens");
    store.upsert_directory_service(&service, &raw[0], OffsetDateTime::now_utc()).await.expect("kept");
    store.close().await;
    clear_public_ids(url, clear).await;

    let store = connect(url, 2, std::time::Duration::from_secs(10)).await.expect("opens again");
    let by = |listing: CatalogListing| {
        let store = store.clone();
        async move { store.list_services(&CatalogListing { limit: 10, ..listing }).await.expect("listed").1 }
    };
    // The source's own UUIDs (the fixture's ids are UUIDs), as `/hsds` publishes them.
    use carebridge::directories::publish::{organization_uuid, service_uuid, term_uuid};
    assert_eq!(service_uuid(&service), service.source_id);
    assert_eq!(by(CatalogListing { public_id: Some(service_uuid(&service)), ..Default::default() }).await, 1);
    assert_eq!(
        by(CatalogListing { organization_public_id: Some(organization_uuid(&org)), ..Default::default() }).await,
        1
    );
    let term_id = term_uuid(&term);
    assert_eq!(Some(term_id.as_str()), term.id.as_deref());
    assert_eq!(by(CatalogListing { term_public_id: Some(term_id), ..Default::default() }).await, 1);
    assert_eq!(store.fill_public_ids().await.expect("nothing left"), 0);
    store.close().await;
}

/// Runs `sql` on the database behind `url`, as an older gateway would have left it.
async fn clear_public_ids(url: &str, sql: &str) {
    if url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(url).await.expect("sqlite");
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned())).execute(&pool).await.expect("cleared");
        pool.close().await;
    } else {
        let pool = sqlx::PgPool::connect(url).await.expect("postgres");
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned())).execute(&pool).await.expect("cleared");
        pool.close().await;
    }
}

const CLEAR_PUBLIC_IDS: &str = "UPDATE directory_services SET public_id = NULL; \
    UPDATE directory_organizations SET public_id = NULL; UPDATE directory_service_terms SET public_id = NULL;";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_ids_are_filled_when_a_sqlite_store_opens() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite:{}", dir.path().join("ids.db").display());
    public_ids_are_filled_when_the_store_opens(&url, CLEAR_PUBLIC_IDS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_ids_are_filled_when_a_postgres_store_opens() {
    let Some(db) = postgres_store().await else { return };
    db.store.close().await;
    public_ids_are_filled_when_the_store_opens(&db.url, CLEAR_PUBLIC_IDS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_now_is_answered_the_same_way_on_postgres() {
    let Some(db) = postgres_store().await else { return };
    let (app, _packages) = crate::directories_open_now::open_now_app(Some(db.url.clone())).await;
    crate::directories_open_now::open_now_follows_hours_zones_and_the_instant(&app).await;
    app.stop().await;
}

/// Writes `n` clients through `store` (each one audit entry).
async fn audited_writes(store: &dyn Store, prefix: &str, n: usize) {
    for i in 0..n {
        let rid = id(&format!("{prefix}-{i}"));
        save(store, RecordKind::Client, &rid, r#"{"n":1}"#, None, None, Precondition::None, t0()).await.expect("saved");
    }
}

/// Runs one statement on the database behind `url` (as someone with the database file or a SQL console would).
async fn tamper(url: &str, sql: &str) {
    if url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(url).await.expect("sqlite");
        sqlx::query(sqlx::AssertSqlSafe(sql.to_owned())).execute(&pool).await.expect("tampered");
        pool.close().await;
    } else {
        let pool = sqlx::PgPool::connect(url).await.expect("postgres");
        sqlx::query(sqlx::AssertSqlSafe(sql.to_owned())).execute(&pool).await.expect("tampered");
        pool.close().await;
    }
}

async fn broken_at(store: &dyn Store) -> Option<i64> {
    carebridge::cli::verify_audit(store).await.expect("read").err().map(|b| b.seq)
}

/// The audit chain verifies on an honest store and names the entry where an edit, a deletion or an insertion
/// breaks it.
async fn the_audit_chain_names_the_first_tampered_entry(url: &str) {
    let store = connect(url, 4, std::time::Duration::from_secs(5)).await.expect("store");
    audited_writes(&*store, "cl-chain", 6).await;
    let (entries, _) = carebridge::cli::verify_audit(&*store).await.expect("read").expect("an honest chain holds");
    assert_eq!(entries, 6);

    tamper(url, "UPDATE audit_events SET actor = 'someone-else' WHERE seq = 3").await;
    assert_eq!(broken_at(&*store).await, Some(3), "an edited entry");
    tamper(url, "UPDATE audit_events SET actor = 'contract' WHERE seq = 3").await;
    assert_eq!(broken_at(&*store).await, None, "put back, it holds again");

    tamper(
        url,
        "INSERT INTO audit_events (seq, at, actor, action, kind, record_id, version, request_id, prev_hash, hash) \
         SELECT 100, at, actor, action, kind, 'cl-forged', version, request_id, hash, hash FROM audit_events WHERE seq = 6",
    )
    .await;
    assert_eq!(broken_at(&*store).await, Some(100), "an entry slipped in after the head");
    tamper(url, "DELETE FROM audit_events WHERE seq = 100").await;

    tamper(url, "DELETE FROM audit_events WHERE seq = 4").await;
    assert_eq!(broken_at(&*store).await, Some(5), "the entry after a deleted one");
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_chain_names_the_first_tampered_entry_on_sqlite() {
    let (store, dir) = sqlite_store().await;
    store.close().await;
    the_audit_chain_names_the_first_tampered_entry(&format!("sqlite:{}", dir.path().join("contract.db").display()))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_chain_names_the_first_tampered_entry_on_postgres() {
    let Some(db) = postgres_store().await else { return };
    the_audit_chain_names_the_first_tampered_entry(&db.url).await;
}

/// Two gateways on one PostgreSQL database, writing at once, keep one chain: numbered without gaps, each entry
/// linked to the one before, whichever gateway wrote it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_writing_at_once_keep_one_verifiable_chain_on_postgres() {
    let Some(db) = postgres_store().await else { return };
    let other = connect(&db.url, 8, std::time::Duration::from_secs(10)).await.expect("a second gateway");
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let store = if w % 2 == 0 { db.store.clone() } else { other.clone() };
            tokio::spawn(async move { audited_writes(&*store, &format!("cl-w{w}"), 25).await })
        })
        .collect();
    for w in writers {
        w.await.expect("writer");
    }
    let (entries, _) = carebridge::cli::verify_audit(&*db.store).await.expect("read").expect("one chain holds");
    assert_eq!(entries, 200);
    other.close().await;
}

/// Entries kept before the chain existed (copied unsealed by the migration) are sealed, in order, when the store
/// opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_kept_before_the_chain_are_sealed_when_the_store_opens() {
    let (store, dir) = sqlite_store().await;
    audited_writes(&*store, "cl-old", 2).await;
    store.close().await;
    let url = format!("sqlite:{}", dir.path().join("contract.db").display());
    tamper(
        &url,
        "INSERT INTO audit_events (at, actor, action, kind, record_id, version, request_id) VALUES \
         (1, 'legacy', 'created', 'client', 'cl-a', 1, 'r-a'), (2, 'legacy', 'created', 'client', 'cl-b', 1, 'r-b')",
    )
    .await;
    let store = connect(&url, 2, std::time::Duration::from_secs(5)).await.expect("reopened");
    audited_writes(&*store, "cl-new", 1).await;
    let (entries, _) = carebridge::cli::verify_audit(&*store).await.expect("read").expect("sealed in order");
    assert_eq!(entries, 5);
    store.close().await;
}

/// On PostgreSQL an entry whose transaction commits after later ones were sealed is sealed in the next round, with
/// the next number: a reader paging with a cursor sees it after the cursor, never skips it, and the chain holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_committed_late_is_sealed_after_the_cursor_and_never_skipped() {
    let Some(db) = postgres_store().await else { return };
    let pool = sqlx::PgPool::connect(&db.url).await.expect("postgres");
    // A writer appends its entry (as the appender does, unsealed) and has not committed yet.
    let mut late = pool.begin().await.expect("begin");
    sqlx::query(
        "INSERT INTO audit_events (at, actor, action, request_id) VALUES (1, 'slow-writer', 'created', 'r-late')",
    )
    .execute(&mut *late)
    .await
    .expect("appended");
    // Meanwhile others commit theirs, and a reader pages up to the head.
    audited_writes(&*db.store, "cl-early", 3).await;
    let first = db.store.audit_chain(0, 100).await.expect("read");
    assert_eq!(first.len(), 3, "only committed entries are sealed");
    let cursor = first.last().expect("entries").seq;
    late.commit().await.expect("commit");
    let next = db.store.audit_chain(cursor, 100).await.expect("read");
    assert_eq!(next.len(), 1);
    assert_eq!((next[0].seq, next[0].entry.actor.as_str()), (cursor + 1, "slow-writer"));
    let (entries, _) = carebridge::cli::verify_audit(&*db.store).await.expect("read").expect("the chain holds");
    assert_eq!(entries, 4);
    pool.close().await;
}
