//! Hostile input from outside: error answers never repeat what the caller sent, and protocol edges (duplicate
//! `Authorization`, entity-tag lists, content codings, invalid UTF-8, deep nesting, paging) get clear answers.

use std::io::Write;

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{ADMIN_KEY, fixture, spawn_app, spawn_app_with};

/// What every hostile value carries; it must not come back.
const MARKER: &str = "Kpzzl-secret";

/// Sends `request`, asserts a 4xx and that the marker is in neither the body nor a header; returns status and body.
async fn refused_without_echo(request: reqwest::RequestBuilder, what: &str) -> (u16, Value) {
    let response = request.send().await.expect("sent");
    let status = response.status().as_u16();
    assert!((400..500).contains(&status), "{what}: answered {status}");
    for (name, value) in response.headers() {
        let value = String::from_utf8_lossy(value.as_bytes()).to_ascii_lowercase();
        assert!(!value.contains("kpzzl"), "{what}: header {name} repeats the input: {value}");
    }
    let text = response.text().await.expect("body");
    assert!(!text.to_ascii_lowercase().contains("kpzzl"), "{what}: the body repeats the input: {text}");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn without_id(mut record: Value) -> Value {
    record.as_object_mut().expect("object").remove("id");
    record
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).expect("compress");
    encoder.finish().expect("compress")
}

#[tokio::test]
async fn no_error_answer_repeats_a_marker_sent_in_bad_input() {
    let app = spawn_app().await;
    app.put_clients().await;
    let mut bad_priority = without_id(fixture("referral", "ref-4001"));
    bad_priority["priority"] = json!(format!("{MARKER} with, expected words"));
    let mut unknown_field = without_id(fixture("referral", "ref-4001"));
    unknown_field[MARKER] = json!(1);
    let mut unknown_nested = without_id(fixture("referral", "ref-4001"));
    unknown_nested["notes"][0][MARKER] = json!(MARKER);
    let mut bad_gender = without_id(fixture("client", "cl-1001"));
    bad_gender["gender"] = json!(MARKER);
    let mut bad_need = without_id(fixture("referral", "ref-4001"));
    bad_need["need"] = json!(MARKER);
    let mut bad_plan_need = without_id(fixture("care-plan", "cp-3001"));
    bad_plan_need["needs"][0]["code"] = json!(MARKER);
    let mut bad_type = without_id(fixture("client", "cl-1001"));
    bad_type["birth_date"] = json!(MARKER);
    let mut bad_number = without_id(fixture("referral", "ref-4001"));
    bad_number["goal_ids"] = json!(MARKER);
    let bodies = [
        ("/api/v1/referrals/r-1", bad_priority, "priority"),
        ("/api/v1/referrals/r-1", unknown_field, "unknown field"),
        ("/api/v1/referrals/r-1", unknown_nested, "unknown nested field"),
        ("/api/v1/clients/c-1", bad_gender, "gender"),
        ("/api/v1/referrals/r-1", bad_need, "need code"),
        ("/api/v1/care-plans/p-1", bad_plan_need, "care plan need code"),
        ("/api/v1/clients/c-1", bad_type, "date"),
        ("/api/v1/referrals/r-1", bad_number, "wrong type"),
    ];
    for (path, body, what) in bodies {
        let (status, problem) = refused_without_echo(app.request(Method::PUT, path).json(&body), what).await;
        assert_eq!(status, 422, "{what}: {problem}");
    }
    let (_, problem) = refused_without_echo(
        app.request(Method::PUT, "/api/v1/referrals/r-1").json(&{
            let mut r = without_id(fixture("referral", "ref-4001"));
            r["priority"] = json!(MARKER);
            r
        }),
        "priority detail",
    )
    .await;
    assert_eq!(problem["errors"][0]["path"], "$.priority");
    assert!(problem["errors"][0]["detail"].as_str().expect("detail").contains("`routine`"), "{problem}");

    assert_eq!(app.put("/api/v1/referrals/ref-4001", &fixture("referral", "ref-4001")).await.status(), 201);
    let (status, _) = refused_without_echo(
        app.request(Method::POST, "/api/v1/referrals/ref-4001/status").json(&json!({"status": MARKER})),
        "status change",
    )
    .await;
    assert_eq!(status, 422);

    let queries = [
        format!("/api/v1/clients?{MARKER}=1"),
        format!("/api/v1/clients?limit={MARKER}"),
        format!("/api/v1/referrals?status={MARKER}"),
        format!("/api/v1/referrals?updated_since={MARKER}"),
        format!("/api/v1/referrals?cursor={MARKER}"),
        format!("/api/v1/referrals?client={MARKER}%20x"),
        format!("/api/v1/audit-events?after={MARKER}"),
        format!("/api/v1/services?{MARKER}=1"),
        format!("/api/v1/services?page={MARKER}"),
        format!("/api/v1/services?near={MARKER}"),
        format!("/api/v1/services?open_now={MARKER}"),
        format!("/api/v1/services?include_inactive={MARKER}"),
        format!("/hsds/services?{MARKER}=1"),
        format!("/hsds/services?per_page={MARKER}"),
        format!("/hsds/services?taxonomy_term_id={MARKER}"),
        format!("/hsds/services?modified_after={MARKER}"),
    ];
    for path in &queries {
        let (status, problem) = refused_without_echo(app.request(Method::GET, path), path).await;
        assert_eq!(status, 400, "{path}: {problem}");
        assert_eq!(problem["type"], "urn:carebridge:problem:invalid-query", "{path}");
    }
    let (_, problem) =
        refused_without_echo(app.request(Method::GET, &format!("/api/v1/clients?{MARKER}=1")), "q").await;
    assert!(problem["detail"].as_str().expect("detail").contains("allowed here: `client`"), "{problem}");
    let (_, problem) = refused_without_echo(app.request(Method::GET, "/hsds/services?page=Kpzzl-secret"), "q").await;
    assert_eq!(problem["detail"], "page: expected a whole number in range");

    let paths = [
        (Method::GET, format!("/api/v1/clients/{MARKER}%20x")),
        (Method::GET, format!("/api/v1/clients/{MARKER}")),
        (Method::GET, format!("/api/v1/clients/{MARKER}/history/{MARKER}")),
        (Method::GET, format!("/api/v1/services/{MARKER}")),
        (Method::GET, format!("/hsds/services/{MARKER}")),
        (Method::GET, "/hsds/services/%FF%FE".to_owned()),
        (Method::POST, format!("/api/v1/directories/{MARKER}/sync")),
        (Method::GET, format!("/api/v1/{MARKER}")),
    ];
    for (method, path) in paths {
        refused_without_echo(app.request(method, &path), &path).await;
    }

    let headers = [
        ("if-match", format!("\"{MARKER}\"")),
        ("if-match", MARKER.to_owned()),
        ("if-none-match", format!("\"{MARKER}\"")),
        ("content-encoding", MARKER.to_owned()),
    ];
    for (name, value) in headers {
        let request = app
            .request(Method::PUT, "/api/v1/referrals/ref-4001")
            .header(name, &value)
            .json(&fixture("referral", "ref-4001"));
        refused_without_echo(request, name).await;
    }
    let wrong_key = app.client.get(format!("{}/api/v1/clients", app.base)).bearer_auth(MARKER);
    refused_without_echo(wrong_key, "API key").await;
    let wrong_type = app.request(Method::PUT, "/api/v1/clients/c-1").header("content-type", MARKER).body("{}");
    refused_without_echo(wrong_type, "content type").await;
    app.stop().await;
}

#[tokio::test]
async fn two_authorization_headers_get_400_and_the_bearer_scheme_is_case_insensitive() {
    let app = spawn_app().await;
    let raw = format!(
        "GET /api/v1/clients HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ADMIN_KEY}\r\n\
         authorization: Bearer not-a-key\r\nconnection: close\r\n\r\n"
    );
    let answer = crate::helpers::raw_http(&app.base, raw.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("urn:carebridge:problem:invalid-header"), "{answer}");
    let same_twice = format!(
        "GET /api/v1/clients HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ADMIN_KEY}\r\n\
         authorization: Bearer {ADMIN_KEY}\r\nconnection: close\r\n\r\n"
    );
    let answer = crate::helpers::raw_http(&app.base, same_twice.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "even the same key twice: {answer}");

    for scheme in ["BEARER", "bEaReR", "bearer", "Bearer"] {
        let response = app
            .client
            .get(format!("{}/api/v1/clients", app.base))
            .header("authorization", format!("{scheme} {ADMIN_KEY}"))
            .send()
            .await
            .expect("sent");
        assert_eq!(response.status(), 200, "{scheme}");
    }
    app.stop().await;
}

#[tokio::test]
async fn a_well_formed_if_match_that_matches_nothing_is_412_and_only_a_malformed_one_is_400() {
    let app = spawn_app().await;
    let mut client = fixture("client", "cl-1001");
    assert_eq!(app.put("/api/v1/clients/cl-1001", &client).await.status(), 201);
    let put_if = |tag: &str, body: &Value| {
        app.request(Method::PUT, "/api/v1/clients/cl-1001").header("if-match", tag).json(body).send()
    };
    client["preferred_language"] = json!("en");
    for tag in ["\"stale-version\"", "W/\"stale\"", "\"0\"", "\"01\"", "\"2\"", "\"7\", \"stale\"", "", "\"a,b\""] {
        let response = put_if(tag, &client).await.expect("sent");
        assert_eq!(response.status(), 412, "If-Match: {tag}");
        let problem: Value = response.json().await.expect("problem");
        assert_eq!(problem["type"], "urn:carebridge:problem:precondition-failed", "{tag}");
        assert!(problem["detail"].as_str().expect("detail").contains("version 1"), "{tag}: {problem}");
    }
    for tag in ["seven", "\"1", "\"1\" \"2\"", "*, \"1\"", "\"a b\""] {
        let response = put_if(tag, &client).await.expect("sent");
        assert_eq!(response.status(), 400, "If-Match: {tag}");
        let problem: Value = response.json().await.expect("problem");
        assert_eq!(problem["type"], "urn:carebridge:problem:invalid-precondition", "{tag}");
    }
    let read: Value = app.get_json("/api/v1/clients/cl-1001").await;
    assert_eq!(read["preferred_language"], "es", "no refused write changed anything");

    // A list matches when any member does.
    let listed = put_if("\"5\", W/\"x\", \"1\"", &client).await.expect("sent");
    assert_eq!(listed.status(), 200);
    assert_eq!(listed.headers()["etag"], "\"2\"");
    client["preferred_language"] = json!("fr");
    let two_lines = app
        .request(Method::PUT, "/api/v1/clients/cl-1001")
        .header("if-match", "\"1\"")
        .header("if-match", "\"2\"")
        .json(&client)
        .send()
        .await
        .expect("sent");
    assert_eq!(two_lines.status(), 200, "header lines combine into one list");
    let stale_list = put_if("\"1\", \"2\"", &client).await.expect("sent");
    assert_eq!(stale_list.status(), 412);

    let missing = app
        .request(Method::PUT, "/api/v1/clients/cl-7777")
        .header("if-match", "\"1\", \"2\"")
        .json(&without_id(client.clone()))
        .send()
        .await
        .expect("sent");
    assert_eq!(missing.status(), 412, "a list matches nothing that does not exist");

    assert_eq!(app.put("/api/v1/referrals/ref-4001", &fixture("referral", "ref-4001")).await.status(), 201);
    let status_change = |tag: &'static str| {
        app.request(Method::POST, "/api/v1/referrals/ref-4001/status")
            .header("if-match", tag)
            .json(&json!({"status": "cancelled", "reason": "the client moved away"}))
            .send()
    };
    assert_eq!(status_change("\"stale-version\"").await.expect("sent").status(), 412);
    assert_eq!(status_change("\"9\", \"1\"").await.expect("sent").status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn a_gzip_body_is_decoded_and_bounded_after_decoding() {
    let app = spawn_app_with(|s| s.server.body_limit_bytes = 16 * 1024).await;
    let client = serde_json::to_vec(&fixture("client", "cl-1001")).expect("JSON");
    let send = |path: &str, encoding: &str, body: Vec<u8>| {
        app.request(Method::PUT, path)
            .header("content-type", "application/json")
            .header("content-encoding", encoding)
            .body(body)
            .send()
    };
    let created = send("/api/v1/clients/cl-1001", "gzip", gzip(&client)).await.expect("sent");
    assert_eq!(created.status(), 201, "{}", created.text().await.unwrap_or_default());
    let stored: Value = app.get_json("/api/v1/clients/cl-1001").await;
    assert_eq!(stored["given_name"], "Maria");
    let identity = send("/api/v1/clients/cl-1001", "identity", client.clone()).await.expect("sent");
    assert_eq!(identity.status(), 200);

    // 8 MiB of spaces inside a valid record compress to a few KiB, under the limit; decoded they are far over it.
    let mut bomb = client.clone();
    bomb.splice(1..1, std::iter::repeat_n(b' ', 8 << 20));
    let bomb = gzip(&bomb);
    assert!(bomb.len() < 16 * 1024, "the bomb itself fits the limit");
    let response = send("/api/v1/clients/cl-1001", "gzip", bomb).await.expect("sent");
    assert_eq!(response.status(), 413);
    let problem: Value = response.json().await.expect("problem");
    assert_eq!(problem["type"], "urn:carebridge:problem:payload-too-large");

    let corrupt = send("/api/v1/clients/cl-1001", "gzip", b"not gzip at all".to_vec()).await.expect("sent");
    assert_eq!(corrupt.status(), 400);
    let problem: Value = corrupt.json().await.expect("problem");
    assert_eq!(problem["type"], "urn:carebridge:problem:malformed-json");

    let brotli = send("/api/v1/clients/cl-1001", "br", client.clone()).await.expect("sent");
    assert_eq!(brotli.status(), 415);
    let problem: Value = brotli.json().await.expect("problem");
    assert_eq!(problem["type"], "urn:carebridge:problem:unsupported-media-type");
    assert!(problem["detail"].as_str().expect("detail").contains("gzip, identity"), "{problem}");
    app.stop().await;
}

#[tokio::test]
async fn invalid_utf8_in_a_string_deep_nesting_and_repeated_keys_are_400_malformed_json() {
    let app = spawn_app().await;
    let mut invalid_utf8 = br#"{"given_name":""#.to_vec();
    invalid_utf8.extend_from_slice(b"\xff\xfe");
    invalid_utf8.extend_from_slice(br#"","family_name":"Lopez"}"#);
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes();
    let deep_field = format!(r#"{{"given_name":{}"x"{}}}"#, "[".repeat(500), "]".repeat(500)).into_bytes();
    let lone_surrogate = br#"{"given_name":"\ud800","family_name":"Lopez"}"#.to_vec();
    let repeated = br#"{"given_name":"Maria","family_name":"Lopez","given_name":"Ana"}"#.to_vec();
    let repeated_deep =
        br#"{"given_name":"Maria","family_name":"Lopez","address":{"city":"Portland","city":"Salem"}}"#.to_vec();
    for (body, what) in [
        (invalid_utf8, "invalid UTF-8 in a string"),
        (deep, "100,000-deep arrays"),
        (deep_field, "500-deep arrays in a field"),
        (lone_surrogate, "lone surrogate"),
        (repeated, "repeated key"),
        (repeated_deep, "repeated key in a nested object"),
    ] {
        let response = app
            .request(Method::PUT, "/api/v1/clients/c-1")
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("sent");
        assert_eq!(response.status(), 400, "{what}");
        let problem: Value = response.json().await.expect("problem");
        assert_eq!(problem["type"], "urn:carebridge:problem:malformed-json", "{what}");
    }
    let schema = app.put("/api/v1/clients/c-1", &json!([1, 2])).await;
    assert_eq!(schema.status(), 422, "sound JSON of the wrong shape stays a schema error");
    app.stop().await;
}

#[tokio::test]
async fn page_0_and_per_page_outside_1_to_100_are_400_on_both_catalog_listings() {
    let app = spawn_app().await;
    for listing in ["/api/v1/services", "/hsds/services"] {
        for (query, named) in [("page=0", "page"), ("per_page=0", "per_page"), ("per_page=101", "per_page")] {
            let path = format!("{listing}?{query}");
            let response = app.get(&path).await;
            assert_eq!(response.status(), 400, "{path}");
            let problem: Value = response.json().await.expect("problem");
            assert_eq!(problem["type"], "urn:carebridge:problem:invalid-query", "{path}");
            let detail = problem["detail"].as_str().expect("detail");
            assert!(detail.starts_with(&format!("{named}: from 1 to ")), "{path}: {detail}");
        }
        let fine = app.get(&format!("{listing}?page=1&per_page=100")).await;
        assert_eq!(fine.status(), 200, "{listing}");
    }
    app.stop().await;
}
