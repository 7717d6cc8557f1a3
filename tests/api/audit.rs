//! The audit trail seen from outside: reads through `/api/v1` and `/fhir`, refused keys, and an operator's replay
//! and discard through the API and the command line each leave an entry naming who; the chain verifies.

use std::process::Command;

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{READER_KEY, ST_MARYS_KEY, TestApp, WRITER_KEY, spawn_app};

async fn as_key(app: &TestApp, key: &str, method: Method, path: &str) -> reqwest::Response {
    app.client.request(method, format!("{}{path}", app.base)).bearer_auth(key).send().await.expect("sent")
}

/// The whole chain, as the API pages it.
async fn chain(app: &TestApp) -> Vec<Value> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page = app.get_json(&format!("/api/v1/audit-events?after={after}&limit=500")).await;
        let events = page["events"].as_array().expect("events").clone();
        if events.is_empty() {
            return all;
        }
        after = page["next_after"].as_i64().expect("cursor");
        all.extend(events);
    }
}

fn entries<'a>(all: &'a [Value], action: &str) -> Vec<&'a Value> {
    all.iter().filter(|e| e["action"] == action).collect()
}

fn carebridge(app: &TestApp, args: &[&str]) -> std::process::Output {
    let db = format!("sqlite:{}", app.dir.path().join("carebridge.db").display());
    Command::new(env!("CARGO_BIN_EXE_carebridge"))
        .env("USER", "night-operator")
        .args(["--database", &db])
        .args(args)
        .output()
        .expect("runs")
}

#[tokio::test]
async fn reads_refusals_and_operator_actions_are_audited_naming_who_and_the_chain_verifies() {
    let app = spawn_app().await;
    app.load_fixtures().await;

    // A read through /api/v1: who, which record and version, whose data.
    assert_eq!(as_key(&app, READER_KEY, Method::GET, "/api/v1/care-plans/cp-3001").await.status(), 200);
    let listed = as_key(&app, READER_KEY, Method::GET, "/api/v1/clients?limit=2").await;
    assert_eq!(listed.status(), 200);
    // A read through /fhir by a partner.
    assert_eq!(as_key(&app, ST_MARYS_KEY, Method::GET, "/fhir/Task/ref-4001").await.status(), 200);
    // A preview reads the client's stored records for a key that may read them.
    let plan = crate::helpers::fixture("care-plan", "cp-3001");
    let previewed = app
        .client
        .post(format!("{}/api/v1/preview/care-plan", app.base))
        .bearer_auth(WRITER_KEY)
        .json(&plan)
        .send()
        .await
        .expect("sent");
    assert_eq!(previewed.status(), 200);
    // A partner's referral the gateway cannot take.
    let refused = app
        .client
        .post(format!("{}/fhir/Task", app.base))
        .bearer_auth(ST_MARYS_KEY)
        .header("content-type", "application/fhir+json")
        .body(json!({"resourceType": "Task", "status": "requested"}).to_string())
        .send()
        .await
        .expect("sent");
    assert!(refused.status().is_client_error(), "{}", refused.status());
    let refused_status = refused.status().as_u16();
    // A key that is not one, and a key without the scope.
    let planted = "sk-planted-secret-0123456789";
    assert_eq!(as_key(&app, planted, Method::GET, "/api/v1/clients/cl-1001").await.status(), 401);
    assert_eq!(as_key(&app, WRITER_KEY, Method::GET, "/api/v1/deliveries").await.status(), 403);

    // An operator discards a delivery through the API, and replays it from the command line.
    let one = app.get_json("/api/v1/deliveries?record=referral/ref-4001").await;
    let id = one["items"][0]["id"].as_i64().expect("a delivery");
    assert_eq!(app.post(&format!("/api/v1/deliveries/{id}/discard"), &json!({})).await.status(), 200);
    let replayed = carebridge(&app, &["outbox", "replay", &id.to_string()]);
    assert!(replayed.status.success(), "{}", String::from_utf8_lossy(&replayed.stderr));

    let all = chain(&app).await;
    let reads = entries(&all, "read");
    let plan = reads.iter().find(|e| e["kind"] == "care-plan").expect("the care plan read");
    assert_eq!((plan["actor"].as_str(), plan["record_id"].as_str()), (Some("reader"), Some("cp-3001")));
    assert_eq!(plan["client_id"], "cl-1001");
    assert_eq!(plan["detail"]["via"], "api");
    assert_eq!(reads.iter().filter(|e| e["kind"] == "client" && e["actor"] == "reader").count(), 2, "one per listed");
    let task = reads.iter().find(|e| e["detail"]["via"] == "fhir").expect("the /fhir read");
    assert_eq!(
        (task["actor"].as_str(), task["detail"]["partner"].as_str()),
        (Some("st-marys-key"), Some("st-marys-ehr"))
    );
    assert_eq!((task["kind"].as_str(), task["record_id"].as_str()), (Some("referral"), Some("ref-4001")));

    let preview = reads.iter().find(|e| e["detail"]["what"] == "preview").expect("the preview's read");
    assert_eq!((preview["actor"].as_str(), preview["client_id"].as_str()), (Some("writer"), Some("cl-1001")));

    let refused = entries(&all, "authentication_refused");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["actor"], "anonymous");
    assert_eq!(refused[0]["detail"]["peer"], "127.0.0.1");
    assert_eq!(refused[0]["detail"]["reason"], "invalid_key");
    assert_eq!(refused[0]["detail"]["route"], "/api/v1/clients/{id}");
    assert!(!all.iter().any(|e| e.to_string().contains(planted)), "the key presented is never kept");
    let scope = entries(&all, "access_refused");
    assert_eq!(
        (scope[0]["actor"].as_str(), scope[0]["detail"]["reason"].as_str()),
        (Some("writer"), Some("needs_admin_scope"))
    );

    let inbound = entries(&all, "inbound_refused");
    assert_eq!(inbound.len(), 1, "{inbound:?}");
    assert_eq!(
        (inbound[0]["actor"].as_str(), inbound[0]["detail"]["partner"].as_str()),
        (Some("st-marys-key"), Some("st-marys-ehr"))
    );
    assert_eq!(inbound[0]["detail"]["status"], refused_status);
    assert_eq!(inbound[0]["detail"]["route"], "POST /fhir/Task");

    let discarded = entries(&all, "delivery_discarded");
    assert_eq!(discarded.len(), 1);
    assert_eq!(discarded[0]["actor"], "admin");
    assert_eq!(discarded[0]["detail"]["delivery"], id);
    assert_eq!(discarded[0]["detail"]["partner"], "st-marys-ehr");
    let replayed = entries(&all, "delivery_replayed");
    assert_eq!(replayed.len(), 1);
    assert_eq!(replayed[0]["actor"], "cli:night-operator");
    assert_eq!(replayed[0]["record_id"], "ref-4001");

    // Numbered without gaps, each linked to the one before; the command line agrees.
    assert!(all.windows(2).all(|w| w[1]["seq"].as_i64() == w[0]["seq"].as_i64().map(|s| s + 1)));
    let verify = carebridge(&app, &["audit", "verify"]);
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
    assert!(String::from_utf8_lossy(&verify.stdout).contains(&format!("{} entries", all.len())));
    // The audit log itself is for admins only.
    assert_eq!(as_key(&app, READER_KEY, Method::GET, "/api/v1/audit-events").await.status(), 403);
}

#[tokio::test]
async fn audit_events_are_valid_fhir_searchable_and_for_admin_keys_only() {
    let app = spawn_app().await;
    app.load_fixtures().await;
    assert_eq!(as_key(&app, READER_KEY, Method::GET, "/api/v1/care-plans/cp-3001").await.status(), 200);
    assert_eq!(as_key(&app, "not-a-key", Method::GET, "/fhir/Patient/cl-1001").await.status(), 401);
    let one = app.get_json("/api/v1/deliveries?record=referral/ref-4001").await;
    let id = one["items"][0]["id"].as_i64().expect("a delivery");
    assert_eq!(app.post(&format!("/api/v1/deliveries/{id}/discard"), &json!({})).await.status(), 200);

    // Not for a reader, not for a partner: an OperationOutcome.
    for key in [READER_KEY, ST_MARYS_KEY] {
        let refused = as_key(&app, key, Method::GET, "/fhir/AuditEvent").await;
        assert_eq!(refused.status(), 403);
        assert_eq!(refused.json::<Value>().await.expect("json")["resourceType"], "OperationOutcome");
    }

    let search = |q: String| {
        let app = &app;
        async move {
            let r = app.get(&format!("/fhir/AuditEvent?{q}")).await;
            assert_eq!(r.status(), 200, "{q}");
            r.json::<Value>().await.expect("json")
        }
    };
    let events = |b: &Value| -> Vec<Value> {
        b["entry"].as_array().map(|e| e.iter().map(|e| e["resource"].clone()).collect()).unwrap_or_default()
    };
    let all = search("_count=500".into()).await;
    let total = all["total"].as_u64().expect("total");
    assert!(total > 10, "{total}");
    // One of each kind of event, as an independent validator reads it.
    let mut seen = std::collections::HashSet::new();
    let samples: Vec<Value> = events(&all)
        .into_iter()
        .filter(|e| seen.insert(e["subtype"].as_array().and_then(|s| s.last()).map(|c| c["code"].clone())))
        .collect();
    assert!(samples.len() >= 4, "{samples:?}");
    crate::delivery_interop::validate(&samples);

    let mine = events(&search("patient=Patient/cl-1001&_count=500".into()).await);
    assert!(!mine.is_empty());
    assert!(mine.iter().all(|e| e["entity"][0]["what"]["reference"] == "Patient/cl-1001"), "{mine:?}");
    let by_reader = events(&search("agent=reader".into()).await);
    assert!(!by_reader.is_empty() && by_reader.iter().all(|e| e["agent"][0]["who"]["identifier"]["value"] == "reader"));
    let logins = events(&search("type=http://dicom.nema.org/resources/ontology/DCM|110114&outcome=4".into()).await);
    assert_eq!(logins.len(), 1, "{logins:?}");
    assert_eq!(logins[0]["agent"][0]["network"]["address"], "127.0.0.1");
    let read_plan = events(&search("subtype=read&entity=care-plan/cp-3001".into()).await);
    assert_eq!(read_plan.len(), 1, "{read_plan:?}");
    assert_eq!(read_plan[0]["action"], "R");
    let discarded = events(&search("subtype=urn:carebridge:audit-action|delivery_discarded".into()).await);
    assert_eq!(discarded[0]["agent"][0]["who"]["identifier"]["value"], "admin");
    assert_eq!(discarded[0]["agent"][1]["who"]["identifier"]["value"], "st-marys-ehr");
    let today = time::OffsetDateTime::now_utc().date();
    assert_eq!(search(format!("date={today}&_count=1")).await["total"].as_u64(), Some(total));
    assert_eq!(search("date=lt2000-01-01".into()).await["total"], 0);
    assert_eq!(search(format!("date=ge{today}&date=lt2000-01-01")).await["total"], 0, "both bounds hold");

    // Paging: next links, newest first on asking.
    let first = search("_count=3".into()).await;
    let next = first["link"].as_array().expect("links").iter().find(|l| l["relation"] == "next").expect("a next link");
    let path = next["url"].as_str().expect("url").split_once("/fhir/").expect("a /fhir link").1.to_owned();
    let second: Value = app.get_json(&format!("/fhir/{path}")).await;
    let ids = |b: &Value| events(b).iter().map(|e| e["id"].as_str().expect("id").to_owned()).collect::<Vec<_>>();
    assert_eq!(ids(&first), ["1", "2", "3"]);
    assert_eq!(ids(&second), ["4", "5", "6"]);
    let newest = search("_sort=-date&_count=1".into()).await;
    assert_eq!(ids(&newest), [total.to_string()]);

    let read = app.get_json("/fhir/AuditEvent/2").await;
    assert_eq!((read["resourceType"].as_str(), read["id"].as_str()), (Some("AuditEvent"), Some("2")));
    assert_eq!(app.get("/fhir/AuditEvent/999999").await.status(), 404);
    assert_eq!(app.get("/fhir/AuditEvent?date=someday").await.status(), 400);
}
