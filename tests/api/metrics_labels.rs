//! Metric labels take only known values: a caller cannot add series at will or put text into `/metrics`.

use crate::helpers::spawn_app;

#[tokio::test]
async fn custom_method_tokens_are_counted_as_other_and_never_shown() {
    let app = spawn_app().await;
    let tokens: Vec<String> =
        (0..20).map(|n| format!("PROBEMETHOD{n:04}")).chain(["ZEBULONQUACKENBUSH19660417".to_owned()]).collect();
    for token in &tokens {
        let method = reqwest::Method::from_bytes(token.as_bytes()).expect("a method token");
        for path in ["/nowhere", "/api/v1/clients"] {
            let response =
                app.client.request(method.clone(), format!("{}{path}", app.base)).send().await.expect("sent");
            assert!(response.status().is_client_error(), "{token} {path}: {}", response.status());
        }
    }
    let text = app.client.get(format!("{}/metrics", app.base)).send().await.expect("sent").text().await.expect("text");
    assert!(text.contains("carebridge_http_requests_total{method=\"other\",route=\"unmatched\""), "{text}");
    for needle in ["PROBEMETHOD", "ZEBULON", "19660417"] {
        assert!(!text.contains(needle), "{needle} is in /metrics");
    }
    app.stop().await;
}
