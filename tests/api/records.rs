//! The record API: create, replace, read, conditional writes, lists, history, referral status.

use serde_json::{Value, json};

use crate::helpers::{fixture, pluck, spawn_app};

#[tokio::test]
async fn every_fixture_is_accepted_and_reads_back_identical() {
    let app = spawn_app().await;
    let n = app.load_fixtures().await;
    assert!(n >= 25, "expected the full fixture set, got {n}");
    for (kind, id, body) in crate::helpers::fixtures() {
        let response = app.get(&format!("/api/v1/{kind}s/{id}")).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["etag"], "\"1\"");
        let stored: Value = response.json().await.expect("JSON");
        assert_eq!(stored, body, "{kind}/{id}");
    }
    app.stop().await;
}

#[tokio::test]
async fn a_put_creates_then_replaces_and_an_identical_put_changes_nothing() {
    let app = spawn_app().await;
    app.put_clients().await;
    let mut referral = fixture("referral", "ref-4002");
    let first = app.put("/api/v1/referrals/ref-4002", &referral).await;
    assert_eq!(first.status(), 201);
    assert_eq!(first.headers()["location"], "/api/v1/referrals/ref-4002");
    assert_eq!(first.headers()["etag"], "\"1\"");

    let again = app.put("/api/v1/referrals/ref-4002", &referral).await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["etag"], "\"1\"", "an identical body must not make a new version");

    referral["priority"] = json!("routine");
    let replaced = app.put("/api/v1/referrals/ref-4002", &referral).await;
    assert_eq!(replaced.status(), 200);
    assert_eq!(replaced.headers()["etag"], "\"2\"");
    let read: Value = app.get_json("/api/v1/referrals/ref-4002").await;
    assert_eq!(read["priority"], "routine");

    let history: Value = app.get_json("/api/v1/referrals/ref-4002/history").await;
    let actions = pluck(&history, "versions", "action");
    assert_eq!(actions, ["created", "replaced"]);
    assert_eq!(history["versions"][1]["changed_by"], "admin");
    let v1: Value = app.get_json("/api/v1/referrals/ref-4002/history/1").await;
    assert_eq!(v1["priority"], "urgent", "version 1 is kept as it was");
    assert_eq!(app.get("/api/v1/referrals/ref-4002/history/3").await.status(), 404);
    app.stop().await;
}

#[tokio::test]
async fn an_id_in_the_body_must_match_the_path() {
    let app = spawn_app().await;
    let client = fixture("client", "cl-1001");
    let response = app.put("/api/v1/clients/cl-9999", &client).await;
    assert_eq!(response.status(), 422);
    let problem: Value = response.json().await.expect("JSON");
    assert_eq!(problem["type"], "urn:carebridge:problem:id-mismatch");
    assert_eq!(problem["errors"][0]["path"], "$.id");

    let mut without_id = client.clone();
    without_id.as_object_mut().expect("object").remove("id");
    let created = app.put("/api/v1/clients/cl-9999", &without_id).await;
    assert_eq!(created.status(), 201);
    let stored: Value = created.json().await.expect("JSON");
    assert_eq!(stored["id"], "cl-9999", "the stored record names itself");
    app.stop().await;
}

#[tokio::test]
async fn a_stale_if_match_is_refused_with_412_and_a_current_one_is_applied() {
    let app = spawn_app().await;
    app.put_clients().await;
    let mut consent = fixture("consent", "co-5001");
    assert_eq!(app.put("/api/v1/consents/co-5001", &consent).await.status(), 201);
    consent["status"] = json!("revoked");
    let put_if = |tag: &'static str, body: Value| {
        let request = app.request(reqwest::Method::PUT, "/api/v1/consents/co-5001").header("if-match", tag).json(&body);
        async move { request.send().await.expect("sent") }
    };
    let ok = put_if("\"1\"", consent.clone()).await;
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.headers()["etag"], "\"2\"");
    consent["purpose"] = json!("care_coordination");
    let stale = put_if("W/\"1\"", consent.clone()).await;
    assert_eq!(stale.status(), 412);
    let problem: Value = stale.json().await.expect("JSON");
    assert_eq!(problem["type"], "urn:carebridge:problem:precondition-failed");
    assert!(problem["detail"].as_str().expect("detail").contains("version 2"));
    let read: Value = app.get_json("/api/v1/consents/co-5001").await;
    assert_eq!(read["purpose"], "treatment", "the stale write changed nothing");

    let create_only = app
        .request(reqwest::Method::PUT, "/api/v1/consents/co-5001")
        .header("if-none-match", "*")
        .json(&consent)
        .send()
        .await
        .expect("sent");
    assert_eq!(create_only.status(), 412);
    let mut other = consent.clone();
    other.as_object_mut().expect("object").remove("id");
    let missing = app
        .request(reqwest::Method::PUT, "/api/v1/consents/co-7777")
        .header("if-match", "*")
        .json(&other)
        .send()
        .await
        .expect("sent");
    assert_eq!(missing.status(), 412);
    app.stop().await;
}

#[tokio::test]
async fn lists_page_by_cursor_and_filter_by_client_status_and_time() {
    let app = spawn_app().await;
    app.load_fixtures().await;
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/referrals?limit=3&cursor={c}"),
            None => "/api/v1/referrals?limit=3".to_owned(),
        };
        let page: Value = app.get_json(&path).await;
        for item in page["items"].as_array().expect("items") {
            assert_eq!(item["record"]["id"], item["id"]);
            assert_eq!(item["version"], 1);
            ids.push(item["id"].as_str().expect("id").to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let expected: Vec<String> = (4001..=4007).map(|n| format!("ref-{n}")).collect();
    assert_eq!(ids, expected, "every referral once, in id order");

    let of_client: Value = app.get_json("/api/v1/referrals?client=cl-1001").await;
    let ids = pluck(&of_client, "items", "id");
    assert_eq!(ids, ["ref-4001", "ref-4002"]);
    let drafts: Value = app.get_json("/api/v1/referrals?status=draft").await;
    let ids = pluck(&drafts, "items", "id");
    assert_eq!(ids, ["ref-4007"]);
    let outbound: Value = app.get_json("/api/v1/referrals?direction=outbound&limit=100").await;
    assert_eq!(outbound["items"].as_array().expect("items").len(), 7);
    let inbound: Value = app.get_json("/api/v1/referrals?direction=inbound").await;
    assert!(inbound["items"].as_array().expect("items").is_empty());
    let future: Value = app.get_json("/api/v1/referrals?updated_since=2999-01-01T00:00:00Z").await;
    assert!(future["items"].as_array().expect("items").is_empty());
    let past: Value = app.get_json("/api/v1/clients?updated_since=2000-01-01T00:00:00Z").await;
    assert_eq!(past["items"].as_array().expect("items").len(), 5);

    for bad in [
        "/api/v1/referrals?status=happy",
        "/api/v1/clients?status=active",
        "/api/v1/referrals?limit=0",
        "/api/v1/referrals?limit=100000",
        "/api/v1/referrals?cursor=zz",
        "/api/v1/referrals?updated_since=yesterday",
        "/api/v1/referrals?client=has%20space",
        "/api/v1/referrals?stauts=accepted",
        "/api/v1/referrals?direction=sideways",
        "/api/v1/clients?direction=inbound",
    ] {
        let response = app.get(bad).await;
        assert_eq!(response.status(), 400, "{bad}");
        assert_eq!(response.headers()["content-type"], "application/problem+json", "{bad}");
    }
    app.stop().await;
}

#[tokio::test]
async fn a_referral_status_changes_through_its_endpoint_only() {
    let app = spawn_app().await;
    app.put_clients().await;
    // A referral to a community program from the directory: the program has no system of its own, so the case
    // manager records its answers (the agency holds both sides).
    let mut referral = fixture("referral", "ref-4004");
    assert_eq!(referral["target"]["type"], "directory_service");
    assert_eq!(app.put("/api/v1/referrals/ref-4004", &referral).await.status(), 201);

    referral["status"] = json!("accepted");
    let via_put = app.put("/api/v1/referrals/ref-4004", &referral).await;
    assert_eq!(via_put.status(), 409);
    let problem: Value = via_put.json().await.expect("JSON");
    assert_eq!(problem["type"], "urn:carebridge:problem:status-change-not-allowed");

    let accepted = app.post("/api/v1/referrals/ref-4004/status", &json!({"status": "accepted"})).await;
    assert_eq!(accepted.status(), 200);
    assert_eq!(accepted.headers()["etag"], "\"2\"");
    let body: Value = accepted.json().await.expect("JSON");
    assert_eq!(body["status"], "accepted");

    let no_reason = app.post("/api/v1/referrals/ref-4004/status", &json!({"status": "on_hold"})).await;
    assert_eq!(no_reason.status(), 422);
    let problem: Value = no_reason.json().await.expect("JSON");
    assert_eq!(problem["errors"][0]["path"], "$.reason");

    let unknown = app.post("/api/v1/referrals/ref-4004/status", &json!({"status": "teleported"})).await;
    assert_eq!(unknown.status(), 422);
    let problem: Value = unknown.json().await.expect("JSON");
    assert_eq!(problem["errors"][0]["path"], "$.status");

    let held = app
        .post("/api/v1/referrals/ref-4004/status", &json!({"status": "on_hold", "reason": "client in hospital"}))
        .await;
    assert_eq!(held.status(), 200);
    let body: Value = held.json().await.expect("JSON");
    assert_eq!(body["status_reason"], "client in hospital");

    let stale = app
        .request(reqwest::Method::POST, "/api/v1/referrals/ref-4004/status")
        .header("if-match", "\"2\"")
        .json(&json!({"status": "in_progress"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(stale.status(), 412);
    assert_eq!(app.post("/api/v1/referrals/ref-0000/status", &json!({"status": "accepted"})).await.status(), 404);

    // A PUT that keeps the new status is an ordinary replacement.
    let current: Value = app.get_json("/api/v1/referrals/ref-4004").await;
    let mut edited = current.clone();
    edited["reason"] = json!("Evaluate for antidepressant; prefers mornings");
    assert_eq!(app.put("/api/v1/referrals/ref-4004", &edited).await.status(), 200);

    // The history says where each version left the referral, why, and who moved it.
    let history: Value = app.get_json("/api/v1/referrals/ref-4004/history").await;
    assert_eq!(pluck(&history, "versions", "action"), ["created", "status_changed", "status_changed", "replaced"]);
    assert_eq!(pluck(&history, "versions", "status"), ["sent", "accepted", "on_hold", "on_hold"]);
    assert_eq!(history["versions"][2]["status_reason"], "client in hospital");
    assert!(history["versions"][1].get("status_reason").is_none(), "{history}");
    assert_eq!(pluck(&history, "versions", "changed_by"), ["admin"; 4]);
    assert!(history["versions"][1].get("partner").is_none(), "the agency moved it");
    app.stop().await;
}

#[tokio::test]
async fn the_agency_requests_what_it_sends_to_a_partner_and_the_partner_answers() {
    let app = spawn_app().await;
    app.put_clients().await;
    let referral = fixture("referral", "ref-4002");
    assert_eq!(referral["target"]["type"], "partner");
    assert_eq!(app.put("/api/v1/referrals/ref-4002", &referral).await.status(), 201);
    // Accepting is the hospital's word, not the agency's: 409 naming what the agency may do instead.
    for performer_says in ["accepted", "in_progress", "completed"] {
        let refused = app.post("/api/v1/referrals/ref-4002/status", &json!({"status": performer_says})).await;
        assert_eq!(refused.status(), 409, "{performer_says}");
        assert_eq!(refused.headers()["content-type"], "application/problem+json");
        let problem: Value = refused.json().await.expect("JSON");
        assert_eq!(problem["type"], "urn:carebridge:problem:illegal-status-move");
        assert_eq!(problem["allowed_next"], json!(["cancelled", "entered_in_error"]), "{problem}");
        assert!(problem["detail"].as_str().expect("detail").contains("sent"), "{problem}");
    }
    // Back to draft is no move at all.
    let refused = app.post("/api/v1/referrals/ref-4002/status", &json!({"status": "draft"})).await;
    assert_eq!(refused.status(), 409);
    let cancelled = app
        .post("/api/v1/referrals/ref-4002/status", &json!({"status": "cancelled", "reason": "client moved away"}))
        .await;
    assert_eq!(cancelled.status(), 200);
    // Cancelled is an end: only entered_in_error remains, and after it nothing.
    let reopened = app.post("/api/v1/referrals/ref-4002/status", &json!({"status": "sent"})).await;
    assert_eq!(reopened.status(), 409);
    let problem: Value = reopened.json().await.expect("JSON");
    assert_eq!(problem["allowed_next"], json!(["entered_in_error"]));
    assert_eq!(
        app.post("/api/v1/referrals/ref-4002/status", &json!({"status": "entered_in_error"})).await.status(),
        200
    );
    let stuck = app.post("/api/v1/referrals/ref-4002/status", &json!({"status": "cancelled", "reason": "x"})).await;
    assert_eq!(stuck.status(), 409);
    let problem: Value = stuck.json().await.expect("JSON");
    assert_eq!(problem["allowed_next"], json!([]));
    app.stop().await;
}

#[tokio::test]
async fn a_referral_begins_as_a_draft_or_sent_never_further_along() {
    let app = spawn_app().await;
    app.put_clients().await;
    for status in ["accepted", "in_progress", "completed", "cancelled", "entered_in_error"] {
        let mut referral = fixture("referral", "ref-4002");
        referral["status"] = json!(status);
        if status == "cancelled" {
            referral["status_reason"] = json!("never mind");
            referral["closed_at"] = json!("2026-11-20T10:00:00Z");
        }
        let refused = app.put("/api/v1/referrals/ref-4002", &referral).await;
        assert_eq!(refused.status(), 422, "{status}");
        let problem: Value = refused.json().await.expect("JSON");
        assert_eq!(problem["errors"][0]["path"], "$.status", "{status}: {problem}");
    }
    assert_eq!(app.get("/api/v1/referrals/ref-4002").await.status(), 404, "nothing was kept");
    let mut draft = fixture("referral", "ref-4002");
    draft["status"] = json!("draft");
    assert_eq!(app.put("/api/v1/referrals/ref-4002", &draft).await.status(), 201);
    let sent = app.post("/api/v1/referrals/ref-4002/status", &json!({"status": "sent"})).await;
    assert_eq!(sent.status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn rules_a_type_cannot_express_are_reported_with_every_path() {
    let app = spawn_app().await;
    let mut plan = fixture("care-plan", "cp-3001");
    plan["goals"][0]["need_ids"] = json!(["need-404"]);
    plan["period"]["end"] = json!("2020-01-01");
    plan["interventions"][1]["goal_ids"] = json!(["goal-9"]);
    let response = app.put("/api/v1/care-plans/cp-3001", &plan).await;
    assert_eq!(response.status(), 422);
    let problem: Value = response.json().await.expect("JSON");
    let paths: Vec<&str> =
        problem["errors"].as_array().expect("errors").iter().map(|e| e["path"].as_str().expect("path")).collect();
    assert_eq!(paths, ["$.period.end", "$.goals[0].need_ids[0]", "$.interventions[1].goal_ids[0]"]);

    let mut phq9 = fixture("assessment", "as-2001");
    phq9["total_score"] = json!(3);
    let response = app.put("/api/v1/assessments/as-2001", &phq9).await;
    assert_eq!(response.status(), 422);
    let problem: Value = response.json().await.expect("JSON");
    assert_eq!(problem["errors"][0]["path"], "$.total_score");
    app.stop().await;
}

#[tokio::test]
async fn the_audit_log_records_every_write_and_needs_the_admin_scope() {
    let app = spawn_app().await;
    let client = fixture("client", "cl-1002");
    app.put("/api/v1/clients/cl-1002", &client).await;
    app.put("/api/v1/clients/cl-1002", &client).await;
    let page: Value = app.get_json("/api/v1/audit-events").await;
    let actions = pluck(&page, "events", "action");
    assert_eq!(actions, ["created", "unchanged"]);
    assert_eq!(page["events"][0]["actor"], "admin");
    assert_eq!(page["events"][0]["record_id"], "cl-1002");
    let writer = app
        .client
        .get(format!("{}/api/v1/audit-events", app.base))
        .bearer_auth(crate::helpers::WRITER_KEY)
        .send()
        .await
        .expect("sent");
    assert_eq!(writer.status(), 403);
    app.stop().await;
}

#[tokio::test]
async fn concurrent_puts_of_one_record_each_get_their_own_version() {
    let app = spawn_app().await;
    let base = fixture("client", "cl-1003");
    let writes = (0..12).map(|i| {
        let mut body = base.clone();
        body["phone"] = json!(format!("+1-503-555-{:04}", 1000 + i));
        let request = app.request(reqwest::Method::PUT, "/api/v1/clients/cl-1003").json(&body);
        async move { request.send().await.expect("sent").status().as_u16() }
    });
    let statuses = futures_join_all(writes).await;
    assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 11, "{statuses:?}");
    let history: Value = app.get_json("/api/v1/clients/cl-1003/history").await;
    let versions: Vec<i64> =
        history["versions"].as_array().expect("versions").iter().map(|v| v["version"].as_i64().expect("n")).collect();
    assert_eq!(versions, (1..=12).collect::<Vec<_>>());
    app.stop().await;
}

/// Runs futures concurrently on this task and collects their outputs in order.
async fn futures_join_all<F>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

#[tokio::test]
async fn the_status_change_that_ends_a_crisis_referral_closes_its_flag_and_nothing_reopens_it() {
    let app = spawn_app().await;
    app.put_clients().await;
    let referral = fixture("referral", "ref-4003");
    assert_eq!(app.put("/api/v1/referrals/ref-4003", &referral).await.status(), 201);
    let flag_of = |preview: &Value| {
        preview["fhir"]["entry"]
            .as_array()
            .expect("a Bundle")
            .iter()
            .find(|e| e["resource"]["resourceType"] == "Flag")
            .map(|e| e["resource"].clone())
            .expect("a crisis referral raises a Flag")
    };
    let open: Value = app.get_json("/api/v1/referrals/ref-4003").await;
    assert!(open.get("closed_at").is_none(), "{open}");
    let preview: Value = app.post("/api/v1/preview/referral", &open).await.json().await.expect("JSON");
    assert_eq!(flag_of(&preview)["status"], "active");

    let ended = app
        .post("/api/v1/referrals/ref-4003/status", &json!({"status": "cancelled", "reason": "client moved away"}))
        .await;
    assert_eq!(ended.status(), 200);
    let ended: Value = ended.json().await.expect("JSON");
    let closed_at = ended["closed_at"].as_str().expect("the gateway records when it ended").to_owned();
    let preview: Value = app.post("/api/v1/preview/referral", &ended).await.json().await.expect("JSON");
    assert_eq!(preview["sendable"], true, "{preview}");
    let flag = flag_of(&preview);
    assert_eq!(flag["status"], "inactive");
    assert_eq!(flag["period"]["end"], closed_at.as_str());

    // An ended referral is not reopened: its end stands.
    let reopened = app.post("/api/v1/referrals/ref-4003/status", &json!({"status": "sent"})).await;
    assert_eq!(reopened.status(), 409);
    let kept: Value = app.get_json("/api/v1/referrals/ref-4003").await;
    assert_eq!(kept["closed_at"], closed_at.as_str());
    app.stop().await;
}
