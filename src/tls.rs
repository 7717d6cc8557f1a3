//! TLS material and the server's TLS: PEM certificates and keys read once here (for the listener and for the
//! client certificates the gateway presents to partners), and [`ServerTls`], the listener's rustls configuration
//! (HTTP/2 and HTTP/1.1 by ALPN; mutual TLS when a client CA is configured), swapped whole on reload so the next
//! handshake uses the new certificate while connections already open keep theirs.

use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;

/// What the listener's TLS is made from (`[server.tls]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, PEM.
    pub cert_file: String,
    /// The private key, PEM.
    pub key_file: String,
    /// The CAs whose client certificates are required (mutual TLS), PEM.
    pub client_ca_file: Option<String>,
}

/// The listener's TLS configuration, reloadable.
pub struct ServerTls {
    files: TlsFiles,
    current: RwLock<Arc<rustls::ServerConfig>>,
}

impl ServerTls {
    /// Reads `files` and builds the configuration.
    ///
    /// # Errors
    /// A file that cannot be read or used, named with what is wrong.
    pub fn load(files: TlsFiles) -> Result<ServerTls, String> {
        let config = server_config(&files)?;
        Ok(ServerTls { files, current: RwLock::new(Arc::new(config)) })
    }

    /// Reads the files again; the next handshake uses what they now hold. On an error the configuration in use
    /// stays.
    ///
    /// # Errors
    /// As [`ServerTls::load`].
    pub fn reload(&self) -> Result<(), String> {
        let config = Arc::new(server_config(&self.files)?);
        if let Ok(mut current) = self.current.write() {
            *current = config;
        }
        Ok(())
    }

    /// The configuration for the next handshake.
    #[must_use]
    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// The rustls server configuration of `files`.
///
/// # Errors
/// A file that cannot be read or used.
pub fn server_config(files: &TlsFiles) -> Result<rustls::ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let chain = read_certificates(&files.cert_file)?;
    let key = read_private_key(&files.key_file)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match &files.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for (i, der) in read_certificates(ca)?.into_iter().enumerate() {
                roots.add(der).map_err(|e| format!("{ca}: certificate {} is not a usable CA: {e}", i + 1))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("{ca}: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => format!("{}: the key does not match the certificate", files.key_file),
        e => format!("{}: the key cannot be used for TLS: {e}", files.key_file),
    })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Whether the client certificate `der` (already verified by the handshake) names `name` among its subject
/// alternative names (a DNS name, or an IP address).
#[must_use]
pub fn certificate_names(der: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(cert) = webpki::EndEntityCert::try_from(der) else { return false };
    let Ok(name) = ServerName::try_from(name) else { return false };
    cert.verify_is_valid_for_subject_name(&name).is_ok()
}

/// The bytes of a file, or what kept them from being read.
///
/// # Errors
/// The file cannot be read.
pub(crate) fn read(path: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{path} could not be read: {e}"))
}

/// The certificates of a PEM file (a chain: the client's first).
///
/// # Errors
/// The file is unreadable, not PEM, or holds no certificate.
pub(crate) fn read_certificates(path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(path)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{path} is not PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{path} holds no certificate (expected PEM `BEGIN CERTIFICATE` blocks)"));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 RSA or SEC1 EC).
///
/// # Errors
/// The file is unreadable or holds no unencrypted private key.
pub(crate) fn read_private_key(path: &str) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read(path)?;
    if String::from_utf8_lossy(&pem).contains("BEGIN ENCRYPTED PRIVATE KEY") {
        return Err(format!(
            "{path} holds an encrypted key; the gateway reads an unencrypted one (keep the file \
                            readable by the gateway only)"
        ));
    }
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| format!("{path} holds no private key (expected PEM)"))
}

/// Whether the key is the one the first certificate certifies, and of a type rustls can sign with.
///
/// # Errors
/// The key is not usable, or belongs to another certificate.
pub(crate) fn key_matches(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<(), String> {
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    match rustls::sign::CertifiedKey::from_der(chain, key, &provider) {
        Ok(_) => Ok(()),
        Err(rustls::Error::InconsistentKeys(_)) => Err("the key does not match the client certificate".into()),
        Err(e) => Err(format!("the key cannot be used for TLS: {e}")),
    }
}
