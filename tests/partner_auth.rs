//! Partner authentication against real servers: a SMART token endpoint that verifies each client assertion with
//! the public JWK the partner registered (RS384 and ES384), and a rustls HTTPS server that requires a client
//! certificate; keys and X.509 v3 certificates are made here with rcgen.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Form, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use carebridge::config::{Overrides, Settings};
use carebridge::domain::{Client, Consent, RecordId, RecordKind};
use carebridge::fhir::auth::{AuthError, ClientTls, Endpoint, TokenSource};
use carebridge::intake::{self, Intake};
use carebridge::mapping::Mappings;
use carebridge::outbound::Failure;
use carebridge::outbox::Worker;
use carebridge::partners::{PartnerSettings, Partners};
use carebridge::store::{self, Actor, Change, DeliveryFilter, Precondition};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Validation};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType};
use serde_json::{Value, json};
use time::OffsetDateTime;

const CLIENT_ID: &str = "carebridge-test-client";
const TIMEOUT: Duration = Duration::from_secs(10);

/// The partner's authorization server: what it has seen, and its clock (stepped by the tests).
struct TokenServer {
    base: String,
    jwks: JwkSet,
    now: Mutex<OffsetDateTime>,
    token_requests: AtomicUsize,
    discoveries: AtomicUsize,
}

type Refusal = (StatusCode, Json<Value>);

fn refuse(error: &str, description: impl Into<String>) -> Refusal {
    (StatusCode::BAD_REQUEST, Json(json!({"error": error, "error_description": description.into()})))
}

/// Verifies a token request as a SMART authorization server does, the assertion's audience being `aud`.
fn verify(server: &TokenServer, form: &HashMap<String, String>, aud: &str) -> Result<(), Refusal> {
    let field = |name: &str| form.get(name).map(String::as_str).unwrap_or_default();
    if field("grant_type") != "client_credentials" {
        return Err(refuse("unsupported_grant_type", "grant_type"));
    }
    if field("client_assertion_type") != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer" {
        return Err(refuse("invalid_request", "client_assertion_type"));
    }
    if field("scope") != "system/*.write" {
        return Err(refuse("invalid_scope", "scope"));
    }
    let assertion = field("client_assertion");
    let header = jsonwebtoken::decode_header(assertion).map_err(|e| refuse("invalid_client", e.to_string()))?;
    if !matches!(header.alg, Algorithm::RS384 | Algorithm::ES384) {
        return Err(refuse("invalid_client", "alg"));
    }
    let jwk =
        header.kid.as_deref().and_then(|kid| server.jwks.find(kid)).ok_or(refuse("invalid_client", "unknown kid"))?;
    let key = DecodingKey::from_jwk(jwk).map_err(|e| refuse("invalid_client", e.to_string()))?;
    let mut validation = Validation::new(header.alg);
    validation.validate_exp = false; // checked below against this server's (stepped) clock
    validation.set_audience(&[aud]);
    validation.set_issuer(&[CLIENT_ID]);
    validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
    let claims = jsonwebtoken::decode::<Value>(assertion, &key, &validation)
        .map_err(|e| refuse("invalid_client", format!("assertion: {e}")))?
        .claims;
    if claims["sub"] != CLIENT_ID || claims["jti"].as_str().is_none_or(|j| j.len() < 16) {
        return Err(refuse("invalid_client", "sub or jti"));
    }
    let now = server.now.lock().expect("clock").unix_timestamp();
    let exp = claims["exp"].as_i64().unwrap_or_default();
    if exp <= now {
        return Err(refuse("invalid_client", "assertion expired"));
    }
    if exp > now + 300 {
        return Err(refuse("invalid_client", "exp more than five minutes ahead"));
    }
    Ok(())
}

async fn token(server: &TokenServer, form: &HashMap<String, String>, aud: &str) -> Result<Json<Value>, Refusal> {
    let n = server.token_requests.fetch_add(1, Ordering::SeqCst) + 1;
    verify(server, form, aud)?;
    // Answer a little later, so that concurrent callers are all waiting when it comes.
    tokio::task::yield_now().await;
    Ok(Json(json!({"access_token": format!("token-{n}"), "token_type": "bearer", "expires_in": 300})))
}

fn router(server: Arc<TokenServer>) -> Router {
    Router::new()
        .route(
            "/token",
            post(|State(s): State<Arc<TokenServer>>, Form(f): Form<HashMap<String, String>>| async move {
                let aud = format!("{}/token", s.base);
                token(&s, &f, &aud).await
            }),
        )
        // The same server under another path: an assertion made for this URL is not one for `/token`.
        .route(
            "/alias-token",
            post(|State(s): State<Arc<TokenServer>>, Form(f): Form<HashMap<String, String>>| async move {
                let aud = format!("{}/token", s.base);
                token(&s, &f, &aud).await
            }),
        )
        .route(
            "/r4/.well-known/smart-configuration",
            get(|State(s): State<Arc<TokenServer>>| async move {
                s.discoveries.fetch_add(1, Ordering::SeqCst);
                Json(json!({
                    "token_endpoint": format!("{}/token", s.base),
                    "token_endpoint_auth_methods_supported": ["private_key_jwt"],
                    "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
                    "grant_types_supported": ["client_credentials"]
                }))
            }),
        )
        .route("/hello", get(|| async { "hello" }))
        .with_state(server)
}

/// The signing keys of the tests (PKCS#8 PEM) and the JWK set the partner registered for them.
struct Keys {
    rsa: String,
    ec: String,
    jwks: JwkSet,
}

fn keys() -> Keys {
    let rsa =
        KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).expect("RSA").serialize_pem();
    let ec = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("P-384").serialize_pem();
    let public = |pem: &str, alg, kid: &str, ec: bool| {
        let private =
            if ec { EncodingKey::from_ec_pem(pem.as_bytes()) } else { EncodingKey::from_rsa_pem(pem.as_bytes()) };
        let mut jwk = Jwk::from_encoding_key(&private.expect("key"), alg).expect("public JWK");
        jwk.common.key_id = Some(kid.into());
        // Only the public parameters reach the server, as in a registered JWKS.
        serde_json::from_value::<Jwk>(serde_json::to_value(&jwk).expect("json")).expect("jwk")
    };
    let jwks = JwkSet {
        keys: vec![public(&rsa, Algorithm::RS384, "rsa-1", false), public(&ec, Algorithm::ES384, "ec-1", true)],
    };
    Keys { rsa, ec, jwks }
}

/// A token server on plain HTTP (loopback), with the keys' JWKS registered.
async fn spawn_token_server(keys: &Keys) -> Arc<TokenServer> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let server = Arc::new(TokenServer {
        base: format!("http://{}", listener.local_addr().expect("addr")),
        jwks: keys.jwks.clone(),
        now: Mutex::new(OffsetDateTime::now_utc()),
        token_requests: AtomicUsize::new(0),
        discoveries: AtomicUsize::new(0),
    });
    let app = router(server.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    server
}

fn write(dir: &tempfile::TempDir, name: &str, contents: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, contents).expect("written");
    path.display().to_string()
}

fn partner(base_url: &str, auth: &str, tls: &str) -> PartnerSettings {
    toml::from_str(&format!(
        "name = \"test-ehr\"\nbase_url = \"{base_url}\"\nreceives = [\"referral\"]\nauth = {{ {auth} }}\n{tls}"
    ))
    .expect("partner parses")
}

fn smart_auth(token_url: Option<&str>, key_file: &str, kid: &str) -> String {
    let url = token_url.map(|u| format!(", token_url = \"{u}\"")).unwrap_or_default();
    format!(
        "type = \"smart_backend\", client_id = \"{CLIENT_ID}\", private_key_file = '{key_file}', key_id = \"{kid}\", \
         scope = \"system/*.write\"{url}"
    )
}

fn install_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

#[tokio::test]
async fn rs384_and_es384_assertions_verify_and_the_token_is_kept_until_shortly_before_it_expires() {
    install_provider();
    let keys = keys();
    let dir = tempfile::tempdir().expect("dir");
    for (pem, kid) in [(&keys.rsa, "rsa-1"), (&keys.ec, "ec-1")] {
        let server = spawn_token_server(&keys).await;
        let key_file = write(&dir, &format!("{kid}.pem"), pem);
        let token_url = format!("{}/token", server.base);
        let p = partner("https://fhir.test.example/r4", &smart_auth(Some(&token_url), &key_file, kid), "");
        let source = TokenSource::from_settings(&p, None, TIMEOUT).expect("token source");
        let t0 = *server.now.lock().expect("clock");
        assert_eq!(source.authorization(t0).await.expect(kid).as_deref(), Some("Bearer token-1"), "{kid}");
        let later = t0 + time::Duration::minutes(3);
        *server.now.lock().expect("clock") = later;
        assert_eq!(source.authorization(later).await.expect(kid).as_deref(), Some("Bearer token-1"));
        assert_eq!(server.token_requests.load(Ordering::SeqCst), 1, "{kid}: the cached token is used");
        let stale = t0 + time::Duration::seconds(241);
        *server.now.lock().expect("clock") = stale;
        assert_eq!(source.authorization(stale).await.expect(kid).as_deref(), Some("Bearer token-2"), "{kid}");
        assert_eq!(server.token_requests.load(Ordering::SeqCst), 2);
        source.forget_token().await;
        assert_eq!(source.authorization(stale).await.expect(kid).as_deref(), Some("Bearer token-3"));
    }
}

#[tokio::test]
async fn the_token_endpoint_refuses_a_wrong_audience_an_expired_assertion_and_an_unknown_kid() {
    install_provider();
    let keys = keys();
    let dir = tempfile::tempdir().expect("dir");
    let server = spawn_token_server(&keys).await;
    let key_file = write(&dir, "ec.pem", &keys.ec);
    let now = *server.now.lock().expect("clock");
    let cases = [
        (format!("{}/alias-token", server.base), "ec-1", now, "InvalidAudience"),
        (format!("{}/token", server.base), "ec-1", now - time::Duration::minutes(10), "assertion expired"),
        (format!("{}/token", server.base), "nobody", now, "unknown kid"),
        (format!("{}/token", server.base), "rsa-1", now, "assertion: "),
    ];
    for (url, kid, at, words) in cases {
        let p = partner("https://fhir.test.example/r4", &smart_auth(Some(&url), &key_file, kid), "");
        let source = TokenSource::from_settings(&p, None, TIMEOUT).expect("token source");
        let err = source.authorization(at).await.expect_err(words);
        let AuthError::Refused { status: 400, error: Some(error), description: Some(description) } = &err else {
            panic!("{words}: {err:?}");
        };
        assert_eq!(error, "invalid_client");
        assert!(description.contains(words), "{words}: {description}");
        let text = err.to_string();
        assert!(text.contains("invalid_client") && !text.contains("eyJ"), "no assertion in the text: {text}");
        assert!(!err.is_transient());
    }
}

#[tokio::test]
async fn concurrent_callers_share_one_token_request() {
    install_provider();
    let keys = keys();
    let dir = tempfile::tempdir().expect("dir");
    let server = spawn_token_server(&keys).await;
    let key_file = write(&dir, "ec.pem", &keys.ec);
    let p = partner(
        "https://fhir.test.example/r4",
        &smart_auth(Some(&format!("{}/token", server.base)), &key_file, "ec-1"),
        "",
    );
    let source = TokenSource::from_settings(&p, None, TIMEOUT).expect("token source");
    let now = *server.now.lock().expect("clock");
    let answers = futures_util::future::join_all((0..8).map(|_| source.authorization(now))).await;
    for a in answers {
        assert_eq!(a.expect("token").as_deref(), Some("Bearer token-1"));
    }
    assert_eq!(server.token_requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn the_token_endpoint_is_read_from_the_smart_configuration_once() {
    install_provider();
    let keys = keys();
    let dir = tempfile::tempdir().expect("dir");
    let server = spawn_token_server(&keys).await;
    let key_file = write(&dir, "rsa.pem", &keys.rsa);
    let p = partner(&format!("{}/r4/", server.base), &smart_auth(None, &key_file, "rsa-1"), "");
    let source = TokenSource::from_settings(&p, None, TIMEOUT).expect("token source");
    let t0 = *server.now.lock().expect("clock");
    assert_eq!(source.authorization(t0).await.expect("token").as_deref(), Some("Bearer token-1"));
    let t1 = t0 + time::Duration::minutes(5);
    *server.now.lock().expect("clock") = t1;
    assert_eq!(source.authorization(t1).await.expect("token").as_deref(), Some("Bearer token-2"));
    assert_eq!(server.discoveries.load(Ordering::SeqCst), 1);

    // A server without a SMART configuration is named as such.
    let p = partner(&format!("{}/other", server.base), &smart_auth(None, &key_file, "rsa-1"), "");
    let source = TokenSource::from_settings(&p, None, TIMEOUT).expect("token source");
    let err = source.authorization(t1).await.expect_err("no configuration");
    assert!(
        matches!(
            &err,
            AuthError::Unreachable {
                endpoint: Endpoint::SmartConfiguration,
                failure: Failure::Status { status: 404, .. }
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_missing_variable_or_key_file_is_named_by_its_config_key() {
    let dir = tempfile::tempdir().expect("dir");
    let p = partner("https://x.example/r4", "type = \"bearer\", token_env = \"CAREBRIDGE_TEST_NO_SUCH_TOKEN\"", "");
    let err = TokenSource::from_settings(&p, None, TIMEOUT).expect_err("unset");
    assert_eq!(
        err.to_string(),
        "partner `test-ehr`: auth.token_env: the variable CAREBRIDGE_TEST_NO_SUCH_TOKEN is not set"
    );
    let missing = dir.path().join("none.pem").display().to_string();
    let p = partner("https://x.example/r4", &smart_auth(None, &missing, "k"), "");
    let err = TokenSource::from_settings(&p, None, TIMEOUT).expect_err("missing");
    assert!(err.to_string().starts_with("partner `test-ehr`: auth.private_key_file: "), "{err}");
}

/// The test PKI: a CA, a server certificate for 127.0.0.1 and a client certificate, all X.509 v3.
struct Pki {
    ca: String,
    server: rustls::pki_types::CertificateDer<'static>,
    server_key: KeyPair,
    client: String,
    client_key: String,
    ca_der: rustls::pki_types::CertificateDer<'static>,
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "carebridge test partner CA");
    ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let issuer = Issuer::from_params(&ca_params, &ca_key);

    let server_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut server_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    server_params.subject_alt_names = vec![SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST))];
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server = server_params.signed_by(&server_key, &issuer).expect("server cert");

    let client_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("key");
    let mut client_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    client_params.distinguished_name.push(DnType::CommonName, "carebridge");
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client = client_params.signed_by(&client_key, &issuer).expect("client cert");
    Pki {
        ca: ca.pem(),
        ca_der: ca.der().clone(),
        server: server.der().clone(),
        server_key,
        client: client.pem(),
        client_key: client_key.serialize_pem(),
    }
}

/// An HTTPS server that requires a client certificate from the test CA; counts the handshakes that presented one.
async fn bind() -> (tokio::net::TcpListener, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("https://{}", listener.local_addr().expect("addr"));
    (listener, base)
}

async fn spawn_mtls_server(pki: &Pki, listener: tokio::net::TcpListener, app: Router) -> Arc<AtomicUsize> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der.clone()).expect("CA root");
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .expect("verifier");
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(pki.server_key.serialize_der().into());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![pki.server.clone()], key)
        .expect("server config");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let presented = Arc::new(AtomicUsize::new(0));
    let seen = presented.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, app, seen) = (acceptor.clone(), app.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                if tls.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty()) {
                    seen.fetch_add(1, Ordering::SeqCst);
                }
                let service = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    presented
}

/// The test PKI's CA bundle, client certificate and client key, written as files: (ca, cert, key).
fn pki_files(dir: &tempfile::TempDir, pki: &Pki) -> (String, String, String) {
    (write(dir, "ca.pem", &pki.ca), write(dir, "client.pem", &pki.client), write(dir, "client.key", &pki.client_key))
}

fn tls_table(cert: Option<&str>, key: Option<&str>, ca: Option<&str>) -> String {
    let entries: Vec<String> = [("client_cert_file", cert), ("client_key_file", key), ("ca_file", ca)]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k} = '{v}'")))
        .collect();
    format!("tls = {{ {} }}", entries.join(", "))
}

#[tokio::test]
async fn a_server_requiring_a_client_certificate_accepts_ours_and_the_partner_ca_is_trusted() {
    install_provider();
    let pki = pki();
    let keys = keys();
    let dir = tempfile::tempdir().expect("dir");
    let (ca, cert, key) = pki_files(&dir, &pki);
    let token_server = Arc::new(TokenServer {
        base: String::new(),
        jwks: keys.jwks.clone(),
        now: Mutex::new(OffsetDateTime::now_utc()),
        token_requests: AtomicUsize::new(0),
        discoveries: AtomicUsize::new(0),
    });
    let (listener, base) = bind().await;
    let presented = spawn_mtls_server(&pki, listener, router(token_server)).await;

    let with = partner(&base, "type = \"none\"", &tls_table(Some(&cert), Some(&key), Some(&ca)));
    let tls = ClientTls::from_settings(&with.name, with.tls.as_ref().expect("tls")).expect("identity");
    assert!(tls.has_identity());
    let client = tls.apply(reqwest::Client::builder().timeout(TIMEOUT)).expect("applied").build().expect("client");
    let answer = client.get(format!("{base}/hello")).send().await.expect("mTLS request");
    assert_eq!((answer.status().as_u16(), answer.text().await.expect("body").as_str()), (200, "hello"));
    assert_eq!(presented.load(Ordering::SeqCst), 1, "the server saw our certificate");

    // Without the identity, the server ends the handshake: a named TLS failure (here through the token client).
    let key_file = write(&dir, "ec.pem", &keys.ec);
    for (tls, what) in [
        (tls_table(None, None, Some(&ca)), "no client certificate"),
        (tls_table(Some(&cert), Some(&key), None), "the partner CA not trusted"),
    ] {
        let p = partner(&base, &smart_auth(Some(&format!("{base}/token")), &key_file, "ec-1"), &tls);
        let tls = ClientTls::from_settings(&p.name, p.tls.as_ref().expect("tls")).expect("tls");
        let source = TokenSource::from_settings(&p, Some(&tls), TIMEOUT).expect("token source");
        let err = source.authorization(OffsetDateTime::now_utc()).await.expect_err(what);
        assert!(
            matches!(&err, AuthError::Unreachable { endpoint: Endpoint::Token, failure: Failure::Tls(_) }),
            "{what}: {err:?}"
        );
        assert!(!err.is_transient(), "{what}");
    }
    assert_eq!(presented.load(Ordering::SeqCst), 1);
}

/// A partner EHR behind mutual TLS whose FHIR endpoint wants a SMART access token from its own token endpoint, and
/// takes the first token as revoked (401): the delivery presents our certificate, obtains a token with a signed
/// assertion, is refused once, obtains another and is delivered, with one Patient created.
#[tokio::test]
async fn a_delivery_goes_through_mutual_tls_with_a_smart_token_renewed_after_a_401() {
    install_provider();
    let pki = pki();
    let keys = keys();
    let dir = tempfile::tempdir().expect("dir");
    let (ca, cert, key) = pki_files(&dir, &pki);
    let key_file = write(&dir, "rsa.pem", &keys.rsa);
    let (listener, base) = bind().await;
    let token_server = Arc::new(TokenServer {
        base: base.clone(),
        jwks: keys.jwks.clone(),
        now: Mutex::new(OffsetDateTime::now_utc()),
        token_requests: AtomicUsize::new(0),
        discoveries: AtomicUsize::new(0),
    });
    let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let log = seen.clone();
    let ehr = Router::new().route(
        "/r4/Patient",
        post(move |headers: axum::http::HeaderMap, Json(patient): Json<Value>| {
            let log = log.clone();
            async move {
                let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                let cond = headers.get("if-none-exist").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                log.lock().expect("log").push((auth.clone(), cond));
                if auth != "Bearer token-2" {
                    let outcome = json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error",
                        "code": "security", "diagnostics": "token revoked"}]});
                    return (StatusCode::UNAUTHORIZED, axum::http::HeaderMap::new(), Json(outcome));
                }
                let mut answer = axum::http::HeaderMap::new();
                answer.insert("location", "Patient/p-1/_history/1".parse().expect("header"));
                (StatusCode::CREATED, answer, Json(patient))
            }
        }),
    );
    let presented = spawn_mtls_server(&pki, listener, router(token_server.clone()).merge(ehr)).await;

    let partner = partner(
        &format!("{base}/r4"),
        &smart_auth(Some(&format!("{base}/token")), &key_file, "rsa-1"),
        &tls_table(Some(&cert), Some(&key), Some(&ca)),
    );
    // Single requests (no transactions): each is seen on its own.
    let partner = PartnerSettings { receives: vec!["client".into()], max_transaction_entries: 0, ..partner };
    let partners = Partners::new(&[partner]);
    let url = format!("sqlite:{}", dir.path().join("carebridge.db").display());
    let store = store::connect(&url, 4, Duration::from_secs(5)).await.expect("store");
    let mappings =
        Arc::new(Mappings::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings")).expect("mappings"));
    let mut settings = Settings::load_with_env(None, &Overrides::default(), []).expect("settings").outbox;
    settings.timeout_secs = 10;
    let worker = Worker::new(store.clone(), mappings, &partners, &settings).expect("worker");

    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/agency/client/cl-1001.json"))
        .expect("fixture");
    let client: Client = serde_json::from_str(&text).expect("client");
    let now = OffsetDateTime::now_utc();
    let actor = Actor { key_name: "test".into(), request_id: "req".into(), partner: None };
    let id = RecordId::parse("cl-1001").expect("id");
    intake::put(
        Intake { store: &*store, partners: &partners },
        id.clone(),
        client,
        Precondition::None,
        &actor,
        Change::Put,
        now,
    )
    .await
    .expect("saved");
    // The client's consent to share with the partner: the grounds its delivery needs.
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/agency/consent/co-5001.json"))
        .expect("fixture");
    let mut consent: Consent = serde_json::from_str(&text).expect("consent");
    consent.partner = RecordId::parse("test-ehr").expect("id");
    consent.period.end = None;
    intake::put(
        Intake { store: &*store, partners: &partners },
        RecordId::parse("co-5001").expect("id"),
        consent,
        Precondition::None,
        &actor,
        Change::Put,
        now,
    )
    .await
    .expect("saved");
    let report = worker.run_once(now).await.expect("pass");
    let filter = DeliveryFilter { record: Some((RecordKind::Client, id)), limit: 10, ..DeliveryFilter::default() };
    let rows = store.list_deliveries(&filter).await.expect("rows");
    assert_eq!((report.claimed, report.delivered), (1, 1), "{rows:?}");
    assert_eq!(rows.iter().map(|r| r.state.as_str()).collect::<Vec<_>>(), ["delivered"]);

    let seen = seen.lock().expect("log").clone();
    let auths: Vec<&str> = seen.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(auths, ["Bearer token-1", "Bearer token-2"], "refused once, then a new token");
    assert!(seen.iter().all(|(_, c)| c == "identifier=https://agency.example.org/fhir/sid/client|cl-1001"));
    assert_eq!(token_server.token_requests.load(Ordering::SeqCst), 2);
    assert!(presented.load(Ordering::SeqCst) >= 1, "our client certificate was presented");
}
