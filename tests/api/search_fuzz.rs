//! Random query strings on every search and list route: any UTF-8, broken percent-encoding, huge and odd
//! numbers, dates at the edges of the calendar, repeated and unknown parameters. The answer is a 2xx or a 4xx
//! (with a problem document or an OperationOutcome), never a 5xx and never a dropped connection.

use proptest::prelude::*;
use serde_json::Value;

use crate::helpers::{TestApp, spawn_app};

/// Every route that searches or lists, with the parameters it knows.
const ROUTES: &[(&str, &[&str])] = &[
    (
        "/api/v1/services",
        &[
            "q",
            "category",
            "taxonomy_term",
            "near",
            "radius_km",
            "language",
            "include_inactive",
            "open_now",
            "open_at",
            "page",
            "per_page",
        ],
    ),
    ("/api/v1/clients", &["client", "status", "updated_since", "cursor", "limit"]),
    ("/api/v1/assessments", &["client", "status", "updated_since", "cursor", "limit"]),
    ("/api/v1/care-plans", &["client", "status", "updated_since", "cursor", "limit"]),
    ("/api/v1/referrals", &["client", "status", "updated_since", "cursor", "limit"]),
    ("/api/v1/consents", &["client", "status", "updated_since", "cursor", "limit"]),
    ("/api/v1/audit-events", &["after", "limit"]),
    (
        "/fhir/HealthcareService",
        &["name", "service-category", "organization", "location", "active", "_lastUpdated", "_count", "_offset"],
    ),
    ("/fhir/Organization", &["name", "_count", "_offset"]),
    ("/fhir/Location", &["name", "_count", "_offset"]),
    ("/hsds/services", &["search", "page", "per_page", "modified_after", "taxonomy_term_id", "organization_id"]),
];

/// A value as it goes on the wire: already percent-encoded, or raw bytes that the encoder will escape.
#[derive(Debug, Clone)]
enum Wire {
    /// Text to percent-encode (any UTF-8).
    Text(String),
    /// Bytes sent as `%XX` each, valid UTF-8 or not.
    Bytes(Vec<u8>),
    /// Sent as it is: broken escapes such as `%E2%82` or `%zz`.
    Raw(String),
}

fn odd_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("9999-12-31T23:59:59.999999999Z".to_owned()),
        Just("0000-01-01T00:00:00Z".to_owned()),
        Just("-9999-01-01".to_owned()),
        Just("+275760-09-13".to_owned()),
        Just("2026-02-30".to_owned()),
        Just("2026-07-01T25:61:00+14:59".to_owned()),
        Just("NaN".to_owned()),
        Just("inf".to_owned()),
        Just("-0".to_owned()),
        Just("1e309".to_owned()),
        Just("18446744073709551616".to_owned()),
        Just("-9223372036854775809".to_owned()),
        Just("4294967295".to_owned()),
        Just("90,180".to_owned()),
        Just("-90.0000001,180.0000001".to_owned()),
        Just("1e308,1e308".to_owned()),
        Just("*".to_owned()),
        Just("'".to_owned()),
        Just("\"".to_owned()),
        Just("%".to_owned()),
        Just("\u{0}".to_owned()),
        Just("🌈".to_owned()),
        Just("a".repeat(10_000)),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|n| n.to_string()),
        ("(gt|ge|lt|le|eq|ne|sa|eb|ap|€|g)", any::<u16>()).prop_map(|(p, y)| format!("{p}{y:04}-01-01")),
        ("[0-9a-f]{0,40}").prop_map(|s| s),
    ]
}

fn wire_value() -> impl Strategy<Value = Wire> {
    prop_oneof![
        4 => any::<String>().prop_map(Wire::Text),
        4 => odd_value().prop_map(Wire::Text),
        2 => prop::collection::vec(any::<u8>(), 0..12).prop_map(Wire::Bytes),
        1 => prop_oneof![Just("%E2%82"), Just("%E2%82%AC"), Just("%zz"), Just("%"), Just("%C3"), Just("%FF%FE")]
            .prop_map(|s| Wire::Raw(s.to_owned())),
    ]
}

fn encode(w: &Wire) -> String {
    match w {
        Wire::Text(t) => url::form_urlencoded::byte_serialize(t.as_bytes()).collect(),
        Wire::Bytes(b) => b.iter().map(|x| format!("%{x:02X}")).collect(),
        Wire::Raw(r) => r.clone(),
    }
}

/// A query of 0 to 5 parameters: known names mostly, random names sometimes, repeats allowed.
fn query(names: &'static [&'static str]) -> impl Strategy<Value = String> {
    let name = prop_oneof![
        4 => prop::sample::select(names).prop_map(|n| Wire::Raw(n.to_owned())),
        1 => wire_value(),
    ];
    prop::collection::vec((name, wire_value()), 0..5).prop_map(|pairs| {
        pairs.iter().map(|(k, v)| format!("{}={}", encode(k), encode(v))).collect::<Vec<_>>().join("&")
    })
}

fn every_route() -> impl Strategy<Value = Vec<String>> {
    ROUTES.iter().map(|(_, names)| query(names)).collect::<Vec<_>>()
}

async fn check(app: &TestApp, route: &str, query: &str) -> Result<(), TestCaseError> {
    let url = format!("{}{route}?{query}", app.base);
    let response = app.client.get(&url).bearer_auth(crate::helpers::ADMIN_KEY).send().await;
    let response = match response {
        Ok(r) => r,
        // The client itself refuses some URLs (it cannot send them): nothing reached the gateway.
        Err(e) if e.is_builder() => return Ok(()),
        Err(e) => return Err(TestCaseError::fail(format!("{route}?{query}: no answer ({e})"))),
    };
    let status = response.status().as_u16();
    prop_assert!((200..500).contains(&status), "{}?{} answered {}", route, query, status);
    let body: Value = response
        .json()
        .await
        .map_err(|e| TestCaseError::fail(format!("{route}?{query}: the {status} body is not JSON ({e})")))?;
    if status >= 400 {
        let fhir = route.starts_with("/fhir");
        if fhir {
            prop_assert_eq!(&body["resourceType"], "OperationOutcome", "{}?{}", route, query);
        } else {
            prop_assert_eq!(&body["status"], &serde_json::json!(status), "{}?{}", route, query);
        }
    }
    Ok(())
}

/// Values that broke a search before (a prefix split inside a character, date arithmetic past the calendar,
/// offsets past `u32`), sent to every parameter of every route.
const KNOWN_BAD: &[&str] = &[
    "%E2%82%AC",
    "%E2%82%AC2026-01-01",
    "g%C3%A9",
    "le9999-12-31T23:59:59.999999999Z",
    "ge-9999-01-01",
    "ge0000-01-01T00:00:00Z",
    "4294967295",
    "18446744073709551616",
    "-1",
    "0",
    "%FF",
    "1e309",
    "NaN,NaN",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_that_once_broke_a_search_are_answered_2xx_or_4xx_on_every_parameter() {
    let app = spawn_app().await;
    app.load_fixtures().await;
    for (route, names) in ROUTES {
        for name in *names {
            for value in KNOWN_BAD {
                if let Err(e) = check(&app, route, &format!("{name}={value}")).await {
                    panic!("{e}");
                }
            }
            // Twice, and next to the paging parameters at their limits.
            let doubled =
                format!("{name}=%E2%82%AC&{name}=le9999-12-31T23:59:59.999999999Z&_offset=4294967295&page=4294967295");
            if let Err(e) = check(&app, route, &doubled).await {
                panic!("{e}");
            }
        }
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_query_strings_on_every_search_route_are_answered_2xx_or_4xx_never_5xx() {
    let app = spawn_app().await;
    app.load_fixtures().await;
    crate::helpers::synced_report(&app, "demo-directory", "").await;
    let handle = tokio::runtime::Handle::current();
    let config = ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let outcome = tokio::task::block_in_place(|| {
        runner.run(&every_route(), |queries| {
            handle.block_on(async {
                for ((route, _), query) in ROUTES.iter().zip(&queries) {
                    check(&app, route, query).await?;
                }
                Ok(())
            })
        })
    });
    if let Err(e) = outcome {
        panic!("{e}");
    }
    app.stop().await;
}
