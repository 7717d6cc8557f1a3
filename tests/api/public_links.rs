//! FHIR `fullUrl`s and paging links start at the configured public base URL, or at a trusted proxy's forwarded
//! host, never at whatever `Host` a caller sends.

use serde_json::Value;

use crate::helpers::{TestApp, spawn_app_with};
use carebridge::config::Settings;

/// A gateway with the demo catalog synced, its settings changed by `adjust`.
async fn catalog(adjust: impl FnOnce(&mut Settings)) -> TestApp {
    let app = spawn_app_with(adjust).await;
    crate::helpers::synced_report(&app, "demo-directory", "mode=full").await;
    app
}

/// A page of two services (so it has `next`), asked for with forged forwarding headers.
async fn forged_page(app: &TestApp) -> (String, Value) {
    let text = app
        .request(reqwest::Method::GET, "/fhir/HealthcareService?_count=2")
        .header("host", "attacker.example")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "gw.proxy.example:8443")
        .send()
        .await
        .expect("sent")
        .text()
        .await
        .expect("body");
    let bundle: Value = serde_json::from_str(&text).expect("a Bundle");
    (text, bundle)
}

/// Every `link[].url` and `entry[].fullUrl` of a Bundle.
fn urls(bundle: &Value) -> Vec<String> {
    let links = bundle["link"].as_array().expect("links").iter().map(|l| &l["url"]);
    let entries = bundle["entry"].as_array().expect("entries").iter().map(|e| &e["fullUrl"]);
    let all: Vec<String> = links.chain(entries).map(|u| u.as_str().expect("a URL").to_owned()).collect();
    assert!(all.len() >= 4, "self, next and two entries: {all:?}");
    all
}

fn all_start_with(bundle: &Value, prefix: &str) {
    for url in urls(bundle) {
        assert!(url.starts_with(prefix), "{url} does not start with {prefix}");
    }
}

#[tokio::test]
async fn a_callers_host_and_forwarded_headers_never_appear_in_links() {
    let app = catalog(|_| {}).await;
    let (text, bundle) = forged_page(&app).await;
    assert!(!text.contains("attacker.example") && !text.contains("gw.proxy.example"), "{text}");
    all_start_with(&bundle, &format!("{}/fhir/HealthcareService", app.base));
    app.stop().await;
}

#[tokio::test]
async fn links_use_the_configured_public_base_url() {
    let app = catalog(|s| {
        s.server.public_base_url = Some("https://gw.example/".into());
        s.server.trusted_proxies = vec!["127.0.0.1".into()];
    })
    .await;
    let (_, bundle) = forged_page(&app).await;
    all_start_with(&bundle, "https://gw.example/fhir/HealthcareService");
    assert!(
        bundle["entry"][0]["fullUrl"]
            .as_str()
            .expect("fullUrl")
            .starts_with("https://gw.example/fhir/HealthcareService/")
    );
    app.stop().await;
}

#[tokio::test]
async fn a_trusted_proxy_forwards_its_host_and_an_untrusted_peer_does_not() {
    let trusted = catalog(|s| s.server.trusted_proxies = vec!["127.0.0.0/8".into()]).await;
    let (_, bundle) = forged_page(&trusted).await;
    all_start_with(&bundle, "https://gw.proxy.example:8443/fhir/HealthcareService");
    trusted.stop().await;

    let untrusted = catalog(|s| s.server.trusted_proxies = vec!["10.0.0.0/8".into()]).await;
    let (text, bundle) = forged_page(&untrusted).await;
    assert!(!text.contains("gw.proxy.example"), "{text}");
    all_start_with(&bundle, &format!("{}/fhir/HealthcareService", untrusted.base));
    untrusted.stop().await;
}
