//! TLS on the listener, tried as a partner and an attacker would: the real binary serving HTTPS with certificates
//! made here (rcgen), HTTP/2 chosen by ALPN, a client without a certificate (or with one from another CA) refused
//! at the handshake when mutual TLS is on, a partner known by its certificate alone on `/fhir`, and a certificate
//! replaced on disk used by the next handshake after SIGHUP.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{ADMIN_KEY, ServerProcess, write_config};

struct Ca {
    params: CertificateParams,
    key: KeyPair,
    der: CertificateDer<'static>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let cert = params.self_signed(&key).expect("CA");
    Ca { der: cert.der().clone(), pem: cert.pem(), params, key }
}

/// A leaf certificate and its key (PEM), issued by `ca`.
fn leaf(
    ca: &Ca,
    sans: Vec<SanType>,
    usage: ExtendedKeyUsagePurpose,
    cn: &str,
) -> (String, String, CertificateDer<'static>) {
    let issuer = Issuer::from_params(&ca.params, &ca.key);
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.subject_alt_names = sans;
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![usage];
    let cert = params.signed_by(&key, &issuer).expect("leaf");
    (cert.pem(), key.serialize_pem(), cert.der().clone())
}

fn server_leaf(ca: &Ca, cn: &str) -> (String, String, CertificateDer<'static>) {
    leaf(ca, vec![SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST))], ExtendedKeyUsagePurpose::ServerAuth, cn)
}

/// A TLS client of the gateway: trusts `ca`, offers `alpn`, presents `identity` (cert PEM, key PEM) when given.
fn client_config(
    ca: &Ca,
    alpn: &[&[u8]],
    identity: Option<&(String, String, CertificateDer<'static>)>,
) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der.clone()).expect("root");
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key, _)) => {
            use rustls::pki_types::pem::PemObject;
            let chain = vec![CertificateDer::from_pem_slice(cert.as_bytes()).expect("cert")];
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key");
            builder.with_client_auth_cert(chain, key).expect("identity")
        }
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

/// Connects, does the handshake, sends one HTTP/1.1 request and reads the answer: (ALPN chosen, server
/// certificate, status line or the error).
async fn exchange(
    addr: SocketAddr,
    config: rustls::ClientConfig,
    request: &str,
) -> (Option<Vec<u8>>, Option<CertificateDer<'static>>, Result<String, String>) {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
    let mut tls = match connector.connect(name, tcp).await {
        Ok(tls) => tls,
        Err(e) => return (None, None, Err(e.to_string())),
    };
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first().cloned());
    if request.is_empty() {
        return (alpn, cert, Err("nothing asked".into()));
    }
    // With TLS 1.3 a refused client certificate arrives as an alert after the client's side of the handshake.
    let answer = async {
        tls.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        tls.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&buf).to_string();
        if text.is_empty() { Err("no answer".to_owned()) } else { Ok(text) }
    }
    .await;
    (alpn, cert, answer)
}

fn get(path: &str, key: Option<&str>) -> String {
    let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n")
}

fn status(answer: &Result<String, String>) -> Option<u16> {
    answer.as_ref().ok()?.split(' ').nth(1)?.parse().ok()
}

#[tokio::test]
async fn the_listener_speaks_tls_and_h2_refuses_clients_without_a_certificate_and_reloads_on_sighup() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().expect("dir");
    let path = |name: &str| dir.path().join(name).display().to_string();
    let server_ca = ca("carebridge test server CA");
    let partners_ca = ca("carebridge test partners CA");
    let stranger_ca = ca("somebody else's CA");
    let server = server_leaf(&server_ca, "gateway one");
    std::fs::write(path("server.pem"), &server.0).expect("write");
    std::fs::write(path("server.key"), &server.1).expect("write");
    std::fs::write(path("partners-ca.pem"), &partners_ca.pem).expect("write");
    let st_marys = leaf(
        &partners_ca,
        vec![SanType::DnsName("ehr.stmarys.example".try_into().expect("dns"))],
        ExtendedKeyUsagePurpose::ClientAuth,
        "St Mary's EHR",
    );
    let nobody = leaf(
        &partners_ca,
        vec![SanType::DnsName("someone.example".try_into().expect("dns"))],
        ExtendedKeyUsagePurpose::ClientAuth,
        "someone",
    );
    let forged = leaf(
        &stranger_ca,
        vec![SanType::DnsName("ehr.stmarys.example".try_into().expect("dns"))],
        ExtendedKeyUsagePurpose::ClientAuth,
        "St Mary's EHR",
    );
    let mut config = std::fs::read_to_string(write_config(
        dir.path(),
        &format!(
            "[server.tls]\ncert_file = '{}'\nkey_file = '{}'\nclient_ca_file = '{}'\n",
            path("server.pem"),
            path("server.key"),
            path("partners-ca.pem")
        ),
    ))
    .expect("config");
    // St Mary's is known by its certificate.
    config = config.replacen(
        "name = \"st-marys-ehr\"\n",
        "name = \"st-marys-ehr\"\nclient_cert_name = \"ehr.stmarys.example\"\n",
        1,
    );
    let config_path = dir.path().join("tls.toml");
    std::fs::write(&config_path, config).expect("write");
    let mut gateway = ServerProcess::start(&config_path);
    let addr = gateway.addr;

    // HTTP/2 by ALPN, the server's certificate, and an answer.
    let (alpn, cert, _) = exchange(addr, client_config(&server_ca, &[b"h2", b"http/1.1"], Some(&st_marys)), "").await;
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(cert.as_ref(), Some(&server.2));
    let (alpn, _, answer) =
        exchange(addr, client_config(&server_ca, &[b"http/1.1"], Some(&st_marys)), &get("/healthz", None)).await;
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(status(&answer), Some(200), "{answer:?}");

    // No certificate, one from another CA: no HTTP at all.
    for (who, identity) in [("no certificate", None), ("another CA's", Some(&forged))] {
        let (_, _, answer) =
            exchange(addr, client_config(&server_ca, &[b"http/1.1"], identity), &get("/healthz", None)).await;
        assert!(answer.is_err(), "{who}: {answer:?}");
    }
    // Plain HTTP on the TLS port gets nothing either.
    let mut plain = tokio::net::TcpStream::connect(addr).await.expect("connect");
    plain.write_all(get("/healthz", None).as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let _ = plain.read_to_end(&mut buf).await;
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));

    // St Mary's certificate alone is St Mary's on /fhir; another partner-CA certificate names no partner; the
    // certificate is no key for /api/v1.
    let as_st_marys = |path: &str| {
        let config = client_config(&server_ca, &[b"http/1.1"], Some(&st_marys));
        let request = get(path, None);
        async move { exchange(addr, config, &request).await.2 }
    };
    assert_eq!(status(&as_st_marys("/fhir/Task?_count=1").await), Some(200));
    assert_eq!(status(&as_st_marys("/api/v1/clients").await), Some(401));
    let (_, _, answer) =
        exchange(addr, client_config(&server_ca, &[b"http/1.1"], Some(&nobody)), &get("/fhir/Task", None)).await;
    assert_eq!(status(&answer), Some(401), "{answer:?}");
    // A key still works over the same connection kind, and wins.
    let (_, _, answer) = exchange(
        addr,
        client_config(&server_ca, &[b"http/1.1"], Some(&nobody)),
        &get("/api/v1/clients", Some(ADMIN_KEY)),
    )
    .await;
    assert_eq!(status(&answer), Some(200), "{answer:?}");

    // A new certificate on disk, SIGHUP: the next handshake gets it.
    let renewed = server_leaf(&server_ca, "gateway two");
    std::fs::write(path("server.pem"), &renewed.0).expect("write");
    std::fs::write(path("server.key"), &renewed.1).expect("write");
    let pid = gateway.child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().expect("kill").success());
    gateway.wait_for_line("TLS certificates reloaded");
    let (_, cert, answer) =
        exchange(addr, client_config(&server_ca, &[b"http/1.1"], Some(&st_marys)), &get("/healthz", None)).await;
    assert_eq!(cert.as_ref(), Some(&renewed.2));
    assert_eq!(status(&answer), Some(200));
    // A broken file on SIGHUP: the certificate in use stays, and the gateway says so.
    std::fs::write(path("server.key"), "not a key").expect("write");
    assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().expect("kill").success());
    gateway.wait_for_line("TLS certificates not reloaded");
    let (_, cert, _) =
        exchange(addr, client_config(&server_ca, &[b"http/1.1"], Some(&st_marys)), &get("/healthz", None)).await;
    assert_eq!(cert.as_ref(), Some(&renewed.2));
}
