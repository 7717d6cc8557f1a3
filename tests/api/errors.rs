//! Bad input of every kind gets a 4xx problem document, never a 5xx, a panic or a silent drop.

use proptest::prelude::*;
use serde_json::{Value, json};

use crate::helpers::{ADMIN_KEY, READER_KEY, TestApp, fixture, spawn_app, spawn_app_with};

/// Every write route with a valid body for it.
fn write_routes() -> Vec<(&'static str, Value)> {
    vec![
        ("/api/v1/clients/p-1", fixture("client", "cl-1001")),
        ("/api/v1/assessments/p-1", fixture("assessment", "as-2001")),
        ("/api/v1/care-plans/p-1", fixture("care-plan", "cp-3001")),
        ("/api/v1/referrals/p-1", fixture("referral", "ref-4001")),
        ("/api/v1/consents/p-1", fixture("consent", "co-5001")),
        ("/api/v1/referrals/ref-4001/status", json!({"status": "completed"})),
    ]
}

fn strip_id(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("id");
    }
    v
}

async fn send_raw(app: &TestApp, path: &str, content_type: &str, body: Vec<u8>) -> reqwest::Response {
    let method = if path.ends_with("/status") { reqwest::Method::POST } else { reqwest::Method::PUT };
    app.request(method, path).header("content-type", content_type).body(body).send().await.expect("sent")
}

/// Asserts a 4xx problem document and returns it.
async fn assert_problem(response: reqwest::Response, status: u16, what: &str) -> Value {
    assert_eq!(response.status().as_u16(), status, "{what}");
    assert_eq!(response.headers()["content-type"], "application/problem+json", "{what}");
    assert!(response.headers().contains_key("x-request-id"), "{what}");
    let problem: Value = response.json().await.expect("problem JSON");
    assert_eq!(problem["status"], status, "{what}");
    assert!(problem["type"].as_str().expect("type").starts_with("urn:carebridge:problem:"), "{what}");
    assert!(problem["request_id"].is_string(), "{what}");
    problem
}

#[tokio::test]
async fn malformed_json_wrong_types_and_unknown_fields_are_4xx_on_every_write_route() {
    let app = spawn_app().await;
    app.put_clients().await;
    assert_eq!(app.put("/api/v1/referrals/ref-4001", &fixture("referral", "ref-4001")).await.status(), 201);
    for (path, valid) in write_routes() {
        let valid = strip_id(valid);
        let p = assert_problem(send_raw(&app, path, "application/json", b"{\"client_id\": ".to_vec()).await, 400, path)
            .await;
        assert_eq!(p["type"], "urn:carebridge:problem:malformed-json");
        assert_problem(send_raw(&app, path, "application/json", b"".to_vec()).await, 400, path).await;
        assert_problem(send_raw(&app, path, "application/json", b"[1,2]".to_vec()).await, 422, path).await;
        assert_problem(send_raw(&app, path, "application/json", vec![0xff, 0xfe, 0x00]).await, 400, path).await;

        let mut unknown = valid.clone();
        unknown["favourite_colour"] = json!("blue");
        let p = assert_problem(app.put_or_post(path, &unknown).await, 422, path).await;
        assert_eq!(p["errors"][0]["path"], "$", "the path of the object holding it, not the caller's key: {path}");

        let (field, _) = valid.as_object().expect("object").iter().next().expect("a field");
        let mut wrong_type = valid.clone();
        wrong_type[field] = json!(true);
        let p = assert_problem(app.put_or_post(path, &wrong_type).await, 422, path).await;
        assert_eq!(p["errors"][0]["path"], format!("$.{field}"), "{path}");

        let p =
            assert_problem(send_raw(&app, path, "text/plain", valid.to_string().into_bytes()).await, 415, path).await;
        assert_eq!(p["type"], "urn:carebridge:problem:unsupported-media-type");
    }
    app.stop().await;
}

impl TestApp {
    async fn put_or_post(&self, path: &str, body: &Value) -> reqwest::Response {
        if path.ends_with("/status") { self.post(path, body).await } else { self.put(path, body).await }
    }
}

#[tokio::test]
async fn ids_with_spaces_or_10_kb_long_are_refused() {
    let app = spawn_app().await;
    let client = strip_id(fixture("client", "cl-1001"));
    let long = "a".repeat(10_000);
    for id in ["has%20space", "tab%09id", "under_score", "%C3%A9t%C3%A9", long.as_str(), "a%2Fb"] {
        let p = assert_problem(app.put(&format!("/api/v1/clients/{id}"), &client).await, 400, id).await;
        assert_eq!(p["type"], "urn:carebridge:problem:invalid-id");
        assert_problem(app.get(&format!("/api/v1/clients/{id}")).await, 400, id).await;
    }
    let mut body_id = fixture("client", "cl-1001");
    body_id["id"] = json!("bad id");
    let p = assert_problem(app.put("/api/v1/clients/cl-1001", &body_id).await, 422, "body id").await;
    assert_eq!(p["errors"][0]["path"], "$.id");
    app.stop().await;
}

#[tokio::test]
async fn a_body_over_the_configured_limit_gets_413() {
    let app = spawn_app_with(|s| s.server.body_limit_bytes = 4096).await;
    let mut referral = fixture("referral", "ref-4001");
    referral["reason"] = json!("x".repeat(8000));
    let p = assert_problem(app.put("/api/v1/referrals/ref-4001", &referral).await, 413, "oversized").await;
    assert_eq!(p["type"], "urn:carebridge:problem:payload-too-large");
    // Without a Content-Length (chunked), the limit holds as the body streams in.
    let head = format!(
        "PUT /api/v1/referrals/ref-4001 HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ADMIN_KEY}\r\n\
         content-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    );
    let mut raw = head.into_bytes();
    for _ in 0..8 {
        raw.extend_from_slice(b"400\r\n");
        raw.extend_from_slice(&[b' '; 0x400]);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    let answer = crate::helpers::raw_http(&app.base, &raw).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");
    app.stop().await;
}

#[tokio::test]
async fn missing_wrong_or_underscoped_keys_are_refused() {
    let app = spawn_app().await;
    let url = format!("{}/api/v1/clients/cl-1001", app.base);
    let none = app.client.get(&url).send().await.expect("sent");
    assert_eq!(none.headers()["www-authenticate"], "Bearer realm=\"carebridge\"");
    assert_problem(none, 401, "no key").await;
    let wrong = app.client.get(&url).bearer_auth("not-a-key").send().await.expect("sent");
    assert_problem(wrong, 401, "wrong key").await;
    let basic = app.client.get(&url).basic_auth("admin", Some(ADMIN_KEY)).send().await.expect("sent");
    assert_problem(basic, 401, "basic auth").await;
    let reader_put =
        app.client.put(&url).bearer_auth(READER_KEY).json(&fixture("client", "cl-1001")).send().await.expect("sent");
    let p = assert_problem(reader_put, 403, "reader writes").await;
    assert!(p["detail"].as_str().expect("detail").contains("write"));
    let reader_get = app.client.get(&url).bearer_auth(READER_KEY).send().await.expect("sent");
    assert_problem(reader_get, 404, "reader reads a missing record").await;
    let openapi = app.client.get(format!("{}/api/v1/openapi.json", app.base)).send().await.expect("sent");
    assert_eq!(openapi.status(), 401);
    app.stop().await;
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_with_problems() {
    let app = spawn_app().await;
    assert_problem(app.get("/api/v1/nothing-here").await, 404, "route").await;
    assert_problem(
        app.request(reqwest::Method::DELETE, "/api/v1/clients/cl-1").send().await.expect("sent"),
        405,
        "DELETE",
    )
    .await;
    assert_problem(app.get("/api/v1/clients/cl-1/history").await, 404, "history of nothing").await;
    assert_problem(app.get("/api/v1/clients/cl-1/history/0").await, 404, "version 0").await;
    let bad_if_match = app
        .request(reqwest::Method::PUT, "/api/v1/clients/cl-1001")
        .header("if-match", "seven")
        .json(&fixture("client", "cl-1001"))
        .send()
        .await
        .expect("sent");
    assert_problem(bad_if_match, 400, "malformed If-Match").await;
    app.stop().await;
}

/// JSON of any shape, with keys that are often the records' own field names so the parser goes deep.
fn arb_json() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("id".to_owned()),
        Just("client_id".to_owned()),
        Just("status".to_owned()),
        Just("given_name".to_owned()),
        Just("items".to_owned()),
        Just("period".to_owned()),
        Just("needs".to_owned()),
        Just("target".to_owned()),
        Just("type".to_owned()),
        "[a-z_]{1,12}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        "\\PC{0,40}".prop_map(Value::String),
        Just(json!("2026-10-01")),
        Just(json!("active")),
    ];
    leaf.prop_recursive(4, 48, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..8).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A valid body with one field, at any depth, replaced by random JSON (or removed).
fn mutate(valid: &Value, pick: usize, replacement: Option<Value>) -> Value {
    fn paths(v: &Value, at: Vec<String>, out: &mut Vec<Vec<String>>) {
        if let Value::Object(o) = v {
            for (k, child) in o {
                let mut p = at.clone();
                p.push(k.clone());
                out.push(p.clone());
                paths(child, p, out);
            }
        } else if let Value::Array(a) = v {
            for (i, child) in a.iter().enumerate() {
                let mut p = at.clone();
                p.push(i.to_string());
                paths(child, p, out);
            }
        }
    }
    let mut all = Vec::new();
    paths(valid, Vec::new(), &mut all);
    let mut body = valid.clone();
    let Some(path) = all.get(pick % all.len().max(1)) else {
        return body;
    };
    let pointer = format!("/{}", path.join("/"));
    let (parent, last) = pointer.rsplit_once('/').expect("a slash");
    match (body.pointer_mut(if parent.is_empty() { "" } else { parent }), replacement) {
        (Some(Value::Object(o)), None) => {
            o.remove(last);
        }
        (Some(Value::Object(o)), Some(r)) => {
            o.insert(last.to_owned(), r);
        }
        _ => {}
    }
    body
}

fn run_cases<S: Strategy>(app: &TestApp, strategy: S, check: impl Fn(&TestApp, S::Value) -> Result<(), TestCaseError>) {
    let config = ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    tokio::task::block_in_place(|| {
        if let Err(e) = runner.run(&strategy, |value| check(app, value)) {
            panic!("{e}");
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_json_on_every_write_route_is_a_4xx_problem_never_a_5xx() {
    let app = spawn_app().await;
    app.put_clients().await;
    assert_eq!(app.put("/api/v1/referrals/ref-4001", &fixture("referral", "ref-4001")).await.status(), 201);
    let handle = tokio::runtime::Handle::current();
    run_cases(&app, prop::collection::vec(arb_json(), 6), |app, bodies| {
        handle.block_on(async {
            for ((path, _), body) in write_routes().into_iter().zip(bodies) {
                let response = app.put_or_post(path, &body).await;
                let status = response.status().as_u16();
                prop_assert!((400..500).contains(&status), "{} answered {} to {}", path, status, body);
                prop_assert_eq!(
                    response.headers()["content-type"].to_str().unwrap_or_default(),
                    "application/problem+json"
                );
                let problem: Value = response.json().await.expect("problem JSON");
                prop_assert_eq!(&problem["status"], &json!(status));
            }
            Ok(())
        })
    });
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_records_are_kept_whole_or_refused_whole() {
    let app = spawn_app().await;
    app.put_clients().await;
    assert_eq!(app.put("/api/v1/referrals/ref-4001", &fixture("referral", "ref-4001")).await.status(), 201);
    let handle = tokio::runtime::Handle::current();
    let picks = prop::collection::vec((any::<usize>(), prop::option::of(arb_json())), 6);
    run_cases(&app, picks, |app, picks| {
        handle.block_on(async {
            for ((path, valid), (pick, replacement)) in write_routes().into_iter().zip(picks) {
                let body = mutate(&strip_id(valid), pick, replacement);
                let response = app.put_or_post(path, &body).await;
                let status = response.status().as_u16();
                prop_assert!(status < 500, "{} answered {} to {}", path, status, body);
                if status >= 400 {
                    prop_assert_eq!(
                        response.headers()["content-type"].to_str().unwrap_or_default(),
                        "application/problem+json"
                    );
                } else {
                    // Accepted: what is stored is what a GET returns.
                    let stored: Value = response.json().await.expect("record JSON");
                    let read: Value = app.get(path.trim_end_matches("/status")).await.json().await.expect("JSON");
                    prop_assert_eq!(stored, read);
                }
            }
            Ok(())
        })
    });
    app.stop().await;
}
