//! `kill -9` of the real gateway while deliveries to the real FHIR server of `../shared/interop` are in flight, then
//! a restart on the same database: every record reaches the partner exactly once in effect (one resource per
//! business identifier, every reference resolving), none is dead, none is left pending.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::delivery_interop::check_peer;
use crate::fhir_peer::{Peer, summary};
use crate::helpers::{ADMIN_KEY, ServerProcess, fixture, write_config_with_partners};

/// Clients (each with a consent and a referral) written before the crash.
const CLIENTS: usize = 8;

/// The one partner, on the peer; the outbox runs in `serve`, with a lease and retries short enough for a test.
fn config(dir: &std::path::Path, peer: &Peer) -> std::path::PathBuf {
    let partners = format!(
        "[[partners]]\nname = \"st-marys-ehr\"\nbase_url = \"{}\"\n\
         receives = [\"client\", \"assessment\", \"care-plan\", \"referral\", \"consent\"]\n\
         overlay = \"st-marys-ehr\"\nmax_transaction_entries = 8\n",
        peer.base
    );
    let outbox = "[outbox]\nenabled = true\nbatch = 16\nconcurrency = 8\nlease_secs = 12\npoll_ms = 100\n\
                  timeout_secs = 10\nretry_schedule_secs = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\nhold_recheck_secs = 1\n";
    write_config_with_partners(dir, &partners, outbox)
}

/// Client `i` with its consent and referral (no care plan), as the agency would write them.
fn records(i: usize) -> [(&'static str, String, Value); 3] {
    let (client, consent, referral) = (format!("cl-crash-{i}"), format!("co-crash-{i}"), format!("ref-crash-{i}"));
    let mut c = fixture("client", "cl-1001");
    c["id"] = json!(client);
    c["identifiers"][0]["value"] = json!(format!("OR7700{i:03}"));
    let mut co = fixture("consent", "co-5001");
    co["id"] = json!(consent);
    co["client_id"] = json!(client);
    let mut r = fixture("referral", "ref-4001");
    r["id"] = json!(referral);
    r["client_id"] = json!(client);
    r["consent_id"] = json!(consent);
    r["goal_ids"] = json!([]);
    r.as_object_mut().expect("object").remove("care_plan_id");
    [("client", client, c), ("consent", consent, co), ("referral", referral, r)]
}

/// Every delivery row of the gateway.
async fn deliveries(http: &reqwest::Client, base: &str) -> Vec<Value> {
    let page: Value = http
        .get(format!("{base}/api/v1/deliveries?limit=500"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .expect("the gateway answers")
        .json()
        .await
        .expect("JSON");
    page["items"].as_array().expect("items").clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_with_deliveries_in_flight_delivers_each_record_exactly_once_after_a_restart() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let peer = Peer::start(&[]);
    // Every write waits 0.8 s at the partner (one request at a time there), so some are always unanswered.
    peer.fault(json!({"method": "POST", "mode": "delay", "delayMs": 800, "count": 10_000})).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = config(dir.path(), &peer);
    let http = reqwest::Client::new();
    let server = ServerProcess::start(&config);
    for i in 0..CLIENTS {
        for (kind, id, body) in records(i) {
            let response = http
                .put(format!("{}/api/v1/{kind}s/{id}", server.base()))
                .bearer_auth(ADMIN_KEY)
                .json(&body)
                .send()
                .await
                .expect("sent");
            assert_eq!(response.status(), 201, "{kind}/{id}: {}", response.text().await.unwrap_or_default());
        }
    }
    // Kill once the partner has answered some writes and holds another one unanswered.
    let deadline = Instant::now() + Duration::from_secs(60);
    let sent_before_the_kill = loop {
        let log = peer.requests().await;
        let answered = log.iter().filter(|r| r["method"] == "POST" && r["status"].is_number()).count();
        let open = log.iter().any(|r| r["method"] == "POST" && r["status"].is_null());
        if answered >= 2 && open {
            break log.len();
        }
        assert!(Instant::now() < deadline, "no delivery in flight after 60 s: {:?}", summary(&log));
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut server = server;
    server.child.kill().expect("kill -9");
    server.child.wait().expect("reaped");
    // The partner is well again; writes it held when the gateway died still commit, answering no one.
    let (status, _) = peer.send(reqwest::Method::DELETE, "/_harness/faults", None).await;
    assert!((200..300).contains(&status));

    let server = ServerProcess::start(&config);
    let deadline = Instant::now() + Duration::from_secs(120);
    let rows = loop {
        let rows = deliveries(&http, &server.base()).await;
        let dead: Vec<&Value> = rows.iter().filter(|d| d["state"] == "dead").collect();
        assert!(dead.is_empty(), "dead deliveries after the restart: {dead:?}");
        if rows.iter().all(|d| d["state"] == "delivered" || d["state"] == "superseded") {
            break rows;
        }
        assert!(Instant::now() < deadline, "not delivered 120 s after the restart: {rows:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(rows.len(), 3 * CLIENTS, "one delivery per record: {rows:?}");
    let log = peer.requests().await;
    assert!(log.len() > sent_before_the_kill, "the restarted gateway sent nothing: {:?}", summary(&log));

    // Exactly once in effect: one resource per business identifier, every reference resolving, all of them there.
    let held = check_peer("st-marys-ehr", &peer, "after the crash").await;
    for (ty, want) in [("Patient", CLIENTS), ("Consent", CLIENTS), ("ServiceRequest", CLIENTS)] {
        let n = held.values().filter(|r| r["resourceType"] == ty).count();
        assert_eq!(n, want, "{ty} on the partner after the crash");
    }
}
