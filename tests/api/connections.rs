//! Connections under hostile clients: silent, half-sent and idle connections are closed, a slow handler is not,
//! many idle connections cost the server nothing lasting, and an announced oversized body is refused at once.

use std::time::{Duration, Instant};

use axum::Json;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{ADMIN_KEY, TestApp, spawn_app_with};
use carebridge::config::DirectorySettings;

/// A gateway with these connection timeouts (seconds); the request timeout stays at its default (30 s).
async fn app_with_timeouts(header_read: u64, idle: u64) -> TestApp {
    spawn_app_with(|s| {
        s.server.header_read_timeout_secs = header_read;
        s.server.idle_timeout_secs = idle;
    })
    .await
}

async fn connect(app: &TestApp) -> TcpStream {
    TcpStream::connect(app.base.trim_start_matches("http://")).await.expect("connect")
}

/// Reads until the server closes the connection: how long that took and everything it sent, or `None` if it is
/// still open after `bound`.
async fn wait_closed(stream: &mut TcpStream, bound: Duration) -> Option<(Duration, String)> {
    let started = Instant::now();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((started + bound).into(), stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some((started.elapsed(), String::from_utf8_lossy(&received).into_owned())),
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
        }
    }
}

/// [`wait_closed`], failing the test if the connection is still open after `bound`.
async fn closed_within(stream: &mut TcpStream, bound: Duration) -> (Duration, String) {
    wait_closed(stream, bound).await.unwrap_or_else(|| panic!("still open after {bound:?}"))
}

/// A bound well past each timeout (1 s here), for a loaded machine.
const BOUND: Duration = Duration::from_secs(6);
/// Closed no sooner than this: the timeout closed it, not something else.
const NOT_BEFORE: Duration = Duration::from_millis(900);

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_after_the_idle_timeout() {
    let app = app_with_timeouts(30, 1).await;
    let mut silent = connect(&app).await;
    let (after, received) = closed_within(&mut silent, BOUND).await;
    assert!(after >= NOT_BEFORE, "closed after {after:?}");
    assert!(received.is_empty(), "{received}");
    app.stop().await;
}

#[tokio::test]
async fn a_connection_that_sends_half_a_request_head_is_closed_after_the_header_timeout() {
    let app = app_with_timeouts(1, 30).await;
    let mut half = connect(&app).await;
    half.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: ").await.expect("write");
    let (after, _) = closed_within(&mut half, BOUND).await;
    assert!(after >= NOT_BEFORE, "closed after {after:?}");
    app.stop().await;
}

#[tokio::test]
async fn a_keep_alive_connection_left_idle_after_its_request_is_closed_after_the_idle_timeout() {
    // The header timeout is long, so it is the idle timeout that closes the connection.
    let app = app_with_timeouts(30, 1).await;
    let mut kept = connect(&app).await;
    kept.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await.expect("write");
    let (after, received) = closed_within(&mut kept, BOUND).await;
    assert!(received.starts_with("HTTP/1.1 200"), "{received}");
    assert!(after >= NOT_BEFORE, "closed after {after:?}");
    app.stop().await;
}

/// A directory that takes `delay` to answer its (empty) first page: a slow handler upstream of which no byte moves.
async fn slow_directory(delay: Duration) -> String {
    let page = move || async move {
        tokio::time::sleep(delay).await;
        Json(json!({
            "total_items": 0, "total_pages": 1, "page_number": 1, "size": 0,
            "first_page": true, "last_page": true, "empty": true, "contents": [],
        }))
    };
    let router = axum::Router::new().route("/services", axum::routing::get(page));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

#[tokio::test]
async fn a_slow_handler_under_the_request_timeout_is_not_cut_by_the_idle_timeout() {
    let directory = slow_directory(Duration::from_millis(2500)).await;
    let app = spawn_app_with(|s| {
        s.server.header_read_timeout_secs = 1;
        s.server.idle_timeout_secs = 1;
        s.directories = vec![
            serde_json::from_value::<DirectorySettings>(json!({
                "type": "hsds_api", "name": "slow211", "base_url": directory, "per_page": 100,
                "timeout_secs": 10, "detail": "list",
            }))
            .expect("a directory source"),
        ];
    })
    .await;
    let started = app.post("/api/v1/directories/slow211/sync?mode=full", &json!({})).await;
    assert_eq!(started.status(), 202, "{}", started.text().await.unwrap_or_default());
    let location = started.headers()["location"].to_str().expect("a Location").to_owned();
    // The slow handler: a job read that waits for the sync, which waits on the slow directory.
    let began = Instant::now();
    let response = app.get(&format!("{location}?wait_secs=15")).await;
    let took = began.elapsed();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap_or_default());
    let job: Value = response.json().await.expect("job");
    assert_eq!((job["state"].as_str(), job["report"]["added"].as_u64()), (Some("succeeded"), Some(0)), "{job}");
    assert!(took >= Duration::from_secs(2), "the handler was not slower than the idle timeout: {took:?}");
    app.stop().await;
}

#[tokio::test]
async fn a_thousand_idle_connections_are_all_closed_and_the_server_answers_throughout() {
    let app = app_with_timeouts(30, 1).await;
    let mut idle = Vec::with_capacity(1000);
    for _ in 0..1000 {
        idle.push(connect(&app).await);
    }
    let health = app.client.get(format!("{}/healthz", app.base)).send().await.expect("answered while crowded");
    assert_eq!(health.status(), 200);
    let closing: Vec<_> =
        idle.into_iter().map(|mut s| tokio::spawn(async move { wait_closed(&mut s, BOUND * 2).await })).collect();
    let mut still_open = 0;
    for c in closing {
        if c.await.expect("reader task").is_none() {
            still_open += 1;
        }
    }
    assert_eq!(still_open, 0, "idle connections still open after {:?}", BOUND * 2);
    // A fresh client (no pooled connection) still gets in.
    let health = reqwest::Client::new().get(format!("{}/healthz", app.base)).send().await.expect("answered after");
    assert_eq!(health.status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn a_declared_body_over_the_limit_is_refused_with_413_before_it_is_sent() {
    let app = spawn_app_with(|s| s.server.body_limit_bytes = 4096).await;
    for (head, media_type, kind) in [
        ("PUT /api/v1/clients/cl-1001", "application/problem+json", "urn:carebridge:problem:payload-too-large"),
        ("POST /fhir/HealthcareService", "application/fhir+json", "\"too-costly\""),
    ] {
        let mut stream = connect(&app).await;
        stream
            .write_all(
                format!(
                    "{head} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ADMIN_KEY}\r\n\
                     content-type: application/json\r\ncontent-length: 10000000\r\n\r\n"
                )
                .as_bytes(),
            )
            .await
            .expect("write the head, and no body");
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while !String::from_utf8_lossy(&answer).contains(kind) {
            match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => answer.extend_from_slice(&buf[..n]),
                other => panic!("{head}: no 413 within 1 s ({other:?}): {}", String::from_utf8_lossy(&answer)),
            }
        }
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 413"), "{head}: {answer}");
        assert!(answer.to_ascii_lowercase().contains(&format!("content-type: {media_type}")), "{head}: {answer}");
    }
    app.stop().await;
}

/// An HTTP/2 frame: length, type, flags, stream 0, payload.
fn h2_frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("small").to_be_bytes();
    let mut frame = vec![len[1], len[2], len[3], kind, flags, 0, 0, 0, 0];
    frame.extend_from_slice(payload);
    frame
}

#[tokio::test]
async fn an_http2_connection_that_only_pings_is_closed_after_the_idle_timeout() {
    let app = app_with_timeouts(30, 1).await;
    let mut h2 = connect(&app).await;
    // The client preface and empty SETTINGS (h2c with prior knowledge), then a PING every 300 ms and never a request.
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.expect("preface");
    h2.write_all(&h2_frame(0x4, 0, &[])).await.expect("settings");
    let started = Instant::now();
    let (mut reader, mut writer) = h2.into_split();
    let pinger = tokio::spawn(async move {
        for n in 0u64..40 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if writer.write_all(&h2_frame(0x6, 0, &n.to_be_bytes())).await.is_err() {
                return;
            }
        }
    });
    let mut buf = [0u8; 4096];
    let closed = loop {
        match tokio::time::timeout(BOUND, reader.read(&mut buf)).await {
            Err(_) => break None,
            Ok(Ok(0) | Err(_)) => break Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    };
    pinger.abort();
    let after = closed.expect("closed despite its PINGs");
    assert!(after >= NOT_BEFORE && after < BOUND, "closed after {after:?}");
    app.stop().await;
}

#[tokio::test]
async fn connections_past_the_cap_are_closed_at_once_and_a_freed_place_is_taken_again() {
    let app = spawn_app_with(|s| s.server.max_connections = 3).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect(&app).await);
    }
    // Accepted and closed: the fourth hears nothing and is closed well before any timeout.
    let mut extra = connect(&app).await;
    let (after, received) = closed_within(&mut extra, BOUND).await;
    assert!(after < Duration::from_secs(2) && received.is_empty(), "{after:?} {received}");
    // One place freed: a request goes through again.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = connect(&app).await;
    again.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.expect("write");
    let (_, answer) = closed_within(&mut again, BOUND).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(held);
    app.stop().await;
}

#[tokio::test]
async fn repeated_failed_keys_from_one_address_are_slowed_with_429_and_counted() {
    let app = spawn_app_with(|s| {
        s.server.auth_failure_limit = 5;
        s.server.auth_failure_window_secs = 60;
    })
    .await;
    let with_key =
        |key: &str| app.client.get(format!("{}/api/v1/clients/cl-1001", app.base)).bearer_auth(key.to_owned()).send();
    // /metrics: by route and reason, never the key. The recorder is the process's: counted as differences.
    let counted = |reason: &'static str| {
        let url = format!("{}/metrics", app.base);
        async move {
            let metrics = reqwest::get(url).await.expect("sent").text().await.expect("text");
            let n = metrics
                .lines()
                .find(|l| {
                    l.starts_with("carebridge_auth_failures_total")
                        && l.contains(&format!("reason=\"{reason}\""))
                        && l.contains("route=\"/api/v1/clients/{id}\"")
                })
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|n| n.parse::<f64>().ok())
                .unwrap_or(0.0);
            (n, metrics)
        }
    };
    let (invalid_before, _) = counted("invalid_key").await;
    let (throttled_before, _) = counted("throttled").await;
    for n in 0..5 {
        assert_eq!(with_key(&format!("guess-{n}")).await.expect("sent").status(), 401, "guess {n}");
    }
    let slowed = with_key("guess-5").await.expect("sent");
    assert_eq!(slowed.status(), 429);
    let wait: u64 = slowed.headers()["retry-after"].to_str().expect("ascii").parse().expect("seconds");
    assert!((1..=60).contains(&wait), "{wait}");
    // Even a good key waits: the address is slowed, not the key.
    assert_eq!(with_key(ADMIN_KEY).await.expect("sent").status(), 429);
    let (invalid, _) = counted("invalid_key").await;
    let (throttled, metrics) = counted("throttled").await;
    assert!(invalid - invalid_before >= 5.0, "{metrics}");
    assert!(throttled - throttled_before >= 2.0, "{metrics}");
    assert!(!metrics.contains("guess-"));
    app.stop().await;
}
