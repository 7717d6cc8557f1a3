//! How the gateway proves who it is to a partner's FHIR server: mutual TLS ([`ClientTls`]: a client certificate,
//! and the partner's CA bundle when it has its own PKI) and the `Authorization` header of each request
//! ([`TokenSource`]: none, a static bearer token, or SMART Backend Services).
//!
//! SMART Backend Services (client_credentials with a `private_key_jwt` assertion): the assertion is signed RS384
//! for an RSA key and ES384 for an EC P-384 key, carries the registered `kid`, `iss` = `sub` = the client id,
//! `aud` = the token endpoint it is posted to, a random `jti` and an `exp` four minutes ahead (SMART allows at most
//! five; the minute left covers clock skew). The access token is kept until a minute before it expires (at most
//! half its lifetime), and every caller that finds it stale waits for the one refresh under way. The token endpoint
//! is configured, or read once from `<base>/.well-known/smart-configuration`. Neither the assertion, the access
//! token nor a bearer token is ever logged or put in an error text.
//!
//! Trust: with a `ca_file`, only that bundle's CAs are trusted for the partner (its servers and its token
//! endpoint); the public roots are dropped, because a partner that names its own CA is pinning its PKI, and a
//! public CA should not be able to stand in for it. A partner whose token endpoint has a public certificate while
//! its FHIR server has a private one puts both CAs in the bundle. Without a `ca_file` the platform's roots are used.

use std::fmt;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;
use serde_json::Value;
use time::OffsetDateTime;
use tokio::sync::Mutex;

use crate::outbound::{Failure, USER_AGENT};
use crate::partners::{PartnerAuth, PartnerSettings, PartnerTls};
pub(crate) use crate::tls::{key_matches, read, read_certificates, read_private_key};

/// The OAuth client assertion type of a JWT bearer assertion (RFC 7523).
const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// How far ahead an assertion expires: SMART allows five minutes; the minute left covers clock skew.
const ASSERTION_LIFETIME: time::Duration = time::Duration::minutes(4);

/// How long before its expiry a cached access token is replaced (at most half its lifetime).
const REFRESH_MARGIN: time::Duration = time::Duration::minutes(1);

/// The lifetime assumed for a token whose answer has no `expires_in` (SMART's recommended longest lifetime).
const DEFAULT_TOKEN_LIFETIME: time::Duration = time::Duration::minutes(5);

/// Most characters of a server's error words kept in an error text.
const SERVER_WORDS_CHARS: usize = 200;

/// Why a partner credential could not be built or used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// A credential's configuration is unusable: a variable unset, a file unreadable or of the wrong kind.
    #[error("partner `{partner}`: {key}: {problem}")]
    Config {
        /// The partner's name.
        partner: String,
        /// The configuration key at fault (`auth.private_key_file`, `tls.ca_file`).
        key: &'static str,
        /// What is wrong, without any secret.
        problem: String,
    },
    /// The token endpoint or the SMART configuration could not be reached, or answered with an error status.
    #[error("{endpoint}: {failure}")]
    Unreachable {
        /// Which endpoint.
        endpoint: Endpoint,
        /// The failure, named.
        failure: Failure,
    },
    /// The token endpoint refused the token request (an OAuth error answer).
    #[error("the token endpoint refused the token request: HTTP {status}{}", oauth_words(.error, .description))]
    Refused {
        /// HTTP status.
        status: u16,
        /// The OAuth `error` code (`invalid_client`, `invalid_scope`).
        error: Option<String>,
        /// The OAuth `error_description`, control characters dropped, shortened.
        description: Option<String>,
    },
    /// The token endpoint answered 2xx without a usable bearer token.
    #[error("the token endpoint's answer is not a usable token: {0}")]
    BadToken(String),
    /// The SMART configuration offers no usable token endpoint.
    #[error("the SMART configuration is not usable: {0}")]
    Discovery(String),
    /// The assertion could not be signed.
    #[error("the client assertion could not be signed: {0}")]
    Signing(String),
    /// An HTTP client could not be built with these TLS settings.
    #[error("the HTTP client could not be built: {0}")]
    Build(String),
}

impl AuthError {
    /// Whether trying again later may succeed (the endpoint unreachable, 429 or 5xx), rather than the
    /// configuration or the partner's registration needing a fix.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        let status_transient = |s: u16| s == 408 || s == 429 || (500..600).contains(&s);
        match self {
            AuthError::Unreachable { failure: Failure::Status { status, .. }, .. } => status_transient(*status),
            AuthError::Unreachable { failure, .. } => {
                matches!(
                    failure,
                    Failure::TimedOut { .. } | Failure::Refused | Failure::Connect | Failure::Transport(_)
                )
            }
            AuthError::Refused { status, .. } => status_transient(*status),
            _ => false,
        }
    }
}

/// The endpoint a SMART failure is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// The OAuth token endpoint.
    Token,
    /// `<base>/.well-known/smart-configuration`.
    SmartConfiguration,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Endpoint::Token => "the token endpoint",
            Endpoint::SmartConfiguration => "the SMART configuration",
        })
    }
}

fn oauth_words(error: &Option<String>, description: &Option<String>) -> String {
    match (error, description) {
        (Some(e), Some(d)) => format!(" {e}: {d}"),
        (Some(e), None) => format!(" {e}"),
        (None, Some(d)) => format!(": {d}"),
        (None, None) => String::new(),
    }
}

/// A partner's credentials, built from its configuration: the TLS client identity and trust, and the source of
/// each request's `Authorization` header.
#[derive(Debug)]
pub struct PartnerCredentials {
    /// Mutual TLS and trust, when the partner has a `tls` table.
    pub tls: Option<ClientTls>,
    /// The `Authorization` header of each request.
    pub token: TokenSource,
}

impl PartnerCredentials {
    /// Reads the partner's key and certificate files and its bearer variable now, so that a broken credential
    /// stops the start rather than the first delivery; SMART requests give up after `timeout`.
    ///
    /// # Errors
    /// [`AuthError::Config`] naming the configuration key at fault (never the secret), or
    /// [`AuthError::Build`] when the token client cannot be built.
    pub fn from_settings(partner: &PartnerSettings, timeout: Duration) -> Result<Self, AuthError> {
        let tls = partner.tls.as_ref().map(|t| ClientTls::from_settings(&partner.name, t)).transpose()?;
        let token = TokenSource::from_settings(partner, tls.as_ref(), timeout)?;
        Ok(PartnerCredentials { tls, token })
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Mutual TLS

/// A TLS client identity (certificate chain and key) and the CAs trusted for one partner; rustls only.
#[derive(Clone)]
pub struct ClientTls {
    /// The certificate chain, then the key, as PEM (what `reqwest::Identity::from_pem` reads).
    identity: Option<Vec<u8>>,
    /// The only roots trusted, when the partner has its own CA.
    roots: Option<Vec<reqwest::Certificate>>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("identity", &self.identity.as_ref().map(|_| "[redacted]"))
            .field("roots", &self.roots.as_ref().map(Vec::len))
            .finish()
    }
}

impl ClientTls {
    /// Reads a partner's `tls` files: the client certificate chain and its key (both or neither), and the CA
    /// bundle.
    ///
    /// # Errors
    /// [`AuthError::Config`] for the first file that is unreadable, holds no certificate or key, or whose key does
    /// not match the certificate.
    pub fn from_settings(partner: &str, tls: &PartnerTls) -> Result<Self, AuthError> {
        let config =
            |key: &'static str| move |problem: String| AuthError::Config { partner: partner.into(), key, problem };
        let identity = match (&tls.client_cert_file, &tls.client_key_file) {
            (Some(cert), Some(key)) => {
                let chain = read_certificates(cert).map_err(config("tls.client_cert_file"))?;
                let private = read_private_key(key).map_err(config("tls.client_key_file"))?;
                key_matches(chain, private).map_err(config("tls.client_key_file"))?;
                Some(identity_pem(cert, key).map_err(config("tls.client_cert_file"))?)
            }
            (None, None) => None,
            (Some(_), None) => return Err(config("tls.client_key_file")(BOTH_OR_NEITHER.into())),
            (None, Some(_)) => return Err(config("tls.client_cert_file")(BOTH_OR_NEITHER.into())),
        };
        let roots = tls.ca_file.as_deref().map(read_ca_bundle).transpose().map_err(config("tls.ca_file"))?;
        Ok(ClientTls { identity, roots })
    }

    /// Adds the client identity and, with a CA bundle, makes its CAs the only roots trusted.
    ///
    /// # Errors
    /// [`AuthError::Build`] when reqwest refuses the identity.
    pub fn apply(&self, builder: reqwest::ClientBuilder) -> Result<reqwest::ClientBuilder, AuthError> {
        let mut builder = builder.tls_backend_rustls();
        if let Some(roots) = &self.roots {
            builder = builder.tls_certs_only(roots.iter().cloned());
        }
        if let Some(pem) = &self.identity {
            let identity = reqwest::Identity::from_pem(pem)
                .map_err(|e| AuthError::Build(format!("the client certificate: {e}")))?;
            builder = builder.identity(identity);
        }
        Ok(builder)
    }

    /// Whether a client certificate is presented.
    #[must_use]
    pub fn has_identity(&self) -> bool {
        self.identity.is_some()
    }
}

/// What a lone certificate or key file is told.
pub(crate) const BOTH_OR_NEITHER: &str = "client_cert_file and client_key_file go together (set both, or neither)";

/// The CA certificates of a PEM bundle, each checked to be usable as a trust anchor.
///
/// # Errors
/// The file is unreadable, holds no certificate, or a certificate is not a usable CA certificate.
pub(crate) fn read_ca_bundle(path: &str) -> Result<Vec<reqwest::Certificate>, String> {
    let certs = read_certificates(path)?;
    let mut store = rustls::RootCertStore::empty();
    certs
        .iter()
        .enumerate()
        .map(|(i, der)| {
            store.add(der.clone()).map_err(|e| format!("{path}: certificate {} is not a usable CA: {e}", i + 1))?;
            reqwest::Certificate::from_der(der).map_err(|e| format!("{path}: certificate {}: {e}", i + 1))
        })
        .collect()
}

/// The certificate file then the key file, as one PEM (both already checked).
fn identity_pem(cert: &str, key: &str) -> Result<Vec<u8>, String> {
    let mut pem = read(cert)?;
    pem.push(b'\n');
    pem.extend(read(key)?);
    reqwest::Identity::from_pem(&pem).map_err(|e| format!("{cert} with {key}: {e}"))?;
    Ok(pem)
}

// ---------------------------------------------------------------------------------------------------------------
// Authorization header

/// Where each request's `Authorization` header comes from.
pub enum TokenSource {
    /// No header.
    None,
    /// `Bearer <token>`, a static token read at start.
    Bearer(String),
    /// SMART Backend Services: an access token obtained with a signed assertion, cached.
    Smart(Box<SmartClient>),
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::None => f.write_str("None"),
            TokenSource::Bearer(_) => f.write_str("Bearer([redacted])"),
            TokenSource::Smart(c) => f.debug_tuple("Smart").field(c).finish(),
        }
    }
}

impl TokenSource {
    /// The partner's `auth`: a bearer token read from its variable now, or a SMART client whose key is read now
    /// (its token endpoint, and its TLS when the partner has a `tls` table, are the partner's).
    ///
    /// # Errors
    /// [`AuthError::Config`] naming the key at fault (an unset variable, an unreadable or unsuitable key), or
    /// [`AuthError::Build`].
    pub fn from_settings(
        partner: &PartnerSettings,
        tls: Option<&ClientTls>,
        timeout: Duration,
    ) -> Result<Self, AuthError> {
        let config =
            |key: &'static str, problem: String| AuthError::Config { partner: partner.name.clone(), key, problem };
        match &partner.auth {
            PartnerAuth::None => Ok(TokenSource::None),
            PartnerAuth::Bearer { token_env } => match std::env::var(token_env) {
                Ok(token) if !token.trim().is_empty() => Ok(TokenSource::Bearer(token.trim().to_owned())),
                _ => Err(config("auth.token_env", format!("the variable {token_env} is not set"))),
            },
            PartnerAuth::SmartBackend { token_url, client_id, private_key_file, key_id, scope } => {
                let pem = read(private_key_file).map_err(|p| config("auth.private_key_file", p))?;
                let key = AssertionKey::from_pem(&pem)
                    .map_err(|p| config("auth.private_key_file", format!("{private_key_file}: {p}")))?;
                let endpoint = match token_url {
                    Some(url) => TokenEndpoint::Configured(url.clone()),
                    None => TokenEndpoint::Discover { base: partner.base_url.trim_end_matches('/').to_owned() },
                };
                let smart = SmartClient::new(
                    SmartSettings {
                        partner: partner.name.clone(),
                        endpoint,
                        client_id: client_id.clone(),
                        key_id: key_id.clone(),
                        scope: scope.clone(),
                        key,
                    },
                    tls,
                    timeout,
                )?;
                Ok(TokenSource::Smart(Box::new(smart)))
            }
        }
    }

    /// The `Authorization` header value for a request made at `now` (`None`: send none).
    ///
    /// # Errors
    /// SMART only: the token could not be obtained ([`AuthError::Unreachable`], [`AuthError::Refused`],
    /// [`AuthError::BadToken`], [`AuthError::Discovery`], [`AuthError::Signing`]).
    pub async fn authorization(&self, now: OffsetDateTime) -> Result<Option<String>, AuthError> {
        match self {
            TokenSource::None => Ok(None),
            TokenSource::Bearer(token) => Ok(Some(format!("Bearer {token}"))),
            TokenSource::Smart(client) => client.authorization(now).await.map(Some),
        }
    }

    /// Forgets a cached access token (the partner answered 401 with it), so the next request obtains another.
    pub async fn forget_token(&self) {
        if let TokenSource::Smart(client) = self {
            client.forget_token().await;
        }
    }
}

/// A private key that signs client assertions, and the algorithm its type calls for.
#[derive(Clone)]
pub struct AssertionKey {
    key: EncodingKey,
    algorithm: Algorithm,
}

impl fmt::Debug for AssertionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AssertionKey({:?}, [redacted])", self.algorithm)
    }
}

impl AssertionKey {
    /// The key of a PEM file: an RSA key (PKCS#8 or PKCS#1) signs RS384, an EC P-384 key (PKCS#8) ES384.
    ///
    /// # Errors
    /// A text for the operator (no key material) when the PEM holds no private key, an encrypted one, a SEC1 EC
    /// key, or a key of another type or curve.
    pub fn from_pem(pem: &[u8]) -> Result<Self, String> {
        let text = String::from_utf8_lossy(pem);
        let (label, block) = private_key_block(&text).ok_or("no private key in it (expected PEM `PRIVATE KEY`)")?;
        let (key, algorithm) = match label {
            "ENCRYPTED PRIVATE KEY" => {
                return Err("an encrypted key; the gateway reads an unencrypted one (keep the file readable by \
                            the gateway only)"
                    .into());
            }
            "EC PRIVATE KEY" => {
                return Err("an EC key in SEC1 form (`EC PRIVATE KEY`); convert it to PKCS#8: openssl pkcs8 \
                            -topk8 -nocrypt -in <file> -out <new file>"
                    .into());
            }
            _ => {
                if let Ok(key) = EncodingKey::from_rsa_pem(block.as_bytes()) {
                    (key, Algorithm::RS384)
                } else if let Ok(key) = EncodingKey::from_ec_pem(block.as_bytes()) {
                    (key, Algorithm::ES384)
                } else if EncodingKey::from_ed_pem(block.as_bytes()).is_ok() {
                    return Err(WRONG_TYPE.replace("{type}", "an Ed25519 key"));
                } else {
                    return Err(WRONG_TYPE.replace("{type}", "not an RSA or EC private key"));
                }
            }
        };
        // Signing once finds what parsing does not: an EC key on another curve, an RSA key too short.
        if let Err(e) = jsonwebtoken::encode(&Header::new(algorithm), &serde_json::json!({}), &key) {
            return Err(match algorithm {
                Algorithm::ES384 => WRONG_TYPE.replace("{type}", "an EC key not on curve P-384"),
                _ => format!("the RSA key cannot sign RS384 (at least 2048 bits are needed): {e}"),
            });
        }
        Ok(AssertionKey { key, algorithm })
    }

    /// The JWS algorithm it signs with (`RS384` or `ES384`).
    #[must_use]
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
}

const WRONG_TYPE: &str =
    "{type}; SMART Backend Services signs with RS384 (an RSA key) or ES384 (an EC key on curve P-384)";

/// The first private key block of a PEM text: its label and the block itself.
fn private_key_block(text: &str) -> Option<(&'static str, &str)> {
    ["ENCRYPTED PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY", "PRIVATE KEY"]
        .into_iter()
        .filter_map(|label| {
            let begin = text.find(&format!("-----BEGIN {label}-----"))?;
            let end_marker = format!("-----END {label}-----");
            let end = text[begin..].find(&end_marker)? + begin + end_marker.len();
            Some((begin, label, &text[begin..end]))
        })
        .min_by_key(|(begin, ..)| *begin)
        .map(|(_, label, block)| (label, block))
}

/// Where the token endpoint is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenEndpoint {
    /// Configured (`auth.token_url`).
    Configured(String),
    /// Read from `<base>/.well-known/smart-configuration` on first use.
    Discover {
        /// The partner's FHIR base URL, without a trailing `/`.
        base: String,
    },
}

/// What a SMART client is configured with.
#[derive(Debug, Clone)]
pub struct SmartSettings {
    /// The partner's name (logs and error texts).
    pub partner: String,
    /// The token endpoint, or where to discover it.
    pub endpoint: TokenEndpoint,
    /// The client id the partner registered (`iss` and `sub` of the assertion).
    pub client_id: String,
    /// The key's id as registered (`kid`).
    pub key_id: String,
    /// The scopes asked for.
    pub scope: String,
    /// The signing key.
    pub key: AssertionKey,
}

/// A SMART Backend Services client of one partner, holding its access token until shortly before it expires.
pub struct SmartClient {
    settings: SmartSettings,
    http: reqwest::Client,
    timeout: Duration,
    /// Held across a refresh, so concurrent callers share one.
    state: Mutex<SmartState>,
}

#[derive(Default)]
struct SmartState {
    token_url: Option<String>,
    token: Option<CachedToken>,
}

struct CachedToken {
    header: String,
    refresh_at: OffsetDateTime,
}

impl fmt::Debug for SmartClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmartClient")
            .field("partner", &self.settings.partner)
            .field("endpoint", &self.settings.endpoint)
            .field("client_id", &self.settings.client_id)
            .field("key_id", &self.settings.key_id)
            .field("algorithm", &self.settings.key.algorithm)
            .finish_non_exhaustive()
    }
}

/// The claims of a client assertion.
#[derive(Serialize)]
struct AssertionClaims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    exp: i64,
    jti: String,
}

impl SmartClient {
    /// A client whose requests present `tls` (when given) and give up after `timeout`.
    ///
    /// # Errors
    /// [`AuthError::Build`] when the HTTP client cannot be built.
    pub fn new(settings: SmartSettings, tls: Option<&ClientTls>, timeout: Duration) -> Result<Self, AuthError> {
        // A token endpoint that redirects is not followed: the assertion is for the endpoint it names (`aud`).
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .user_agent(USER_AGENT)
            .redirect(reqwest::redirect::Policy::none());
        if let Some(tls) = tls {
            builder = tls.apply(builder)?;
        }
        let http = builder.build().map_err(|e| AuthError::Build(e.to_string()))?;
        let token_url = match &settings.endpoint {
            TokenEndpoint::Configured(url) => Some(url.clone()),
            TokenEndpoint::Discover { .. } => None,
        };
        Ok(SmartClient { settings, http, timeout, state: Mutex::new(SmartState { token_url, token: None }) })
    }

    /// `Bearer <access token>` for a request at `now`: the cached token while it is fresh, else a new one.
    ///
    /// # Errors
    /// The token endpoint unreachable, refusing, or answering without a bearer token; the SMART configuration
    /// unusable; the assertion unsignable.
    pub async fn authorization(&self, now: OffsetDateTime) -> Result<String, AuthError> {
        let mut state = self.state.lock().await;
        if let Some(token) = &state.token
            && now < token.refresh_at
        {
            return Ok(token.header.clone());
        }
        let token_url = match &state.token_url {
            Some(url) => url.clone(),
            None => {
                let url = self.discover().await?;
                state.token_url = Some(url.clone());
                url
            }
        };
        let token = self.request_token(&token_url, now).await?;
        let header = token.header.clone();
        state.token = Some(token);
        Ok(header)
    }

    /// Forgets the cached access token.
    pub async fn forget_token(&self) {
        self.state.lock().await.token = None;
    }

    /// The signed assertion for the token endpoint at `aud`, made at `now`.
    fn assertion(&self, aud: &str, now: OffsetDateTime) -> Result<String, AuthError> {
        let s = &self.settings;
        let mut header = Header::new(s.key.algorithm);
        header.kid = Some(s.key_id.clone());
        let claims = AssertionClaims {
            iss: &s.client_id,
            sub: &s.client_id,
            aud,
            exp: (now + ASSERTION_LIFETIME).unix_timestamp(),
            jti: uuid::Uuid::new_v4().to_string(),
        };
        jsonwebtoken::encode(&header, &claims, &s.key.key).map_err(|e| AuthError::Signing(e.to_string()))
    }

    async fn request_token(&self, token_url: &str, now: OffsetDateTime) -> Result<CachedToken, AuthError> {
        let assertion = self.assertion(token_url, now)?;
        let form = serde_urlencoded::to_string([
            ("grant_type", "client_credentials"),
            ("scope", self.settings.scope.as_str()),
            ("client_assertion_type", CLIENT_ASSERTION_TYPE),
            ("client_assertion", assertion.as_str()),
        ])
        .map_err(|e| AuthError::Signing(e.to_string()))?;
        let unreachable = |failure| AuthError::Unreachable { endpoint: Endpoint::Token, failure };
        let response = self
            .http
            .post(token_url)
            .header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(reqwest::header::ACCEPT, "application/json")
            .body(form)
            .send()
            .await
            .map_err(|e| unreachable(crate::outbound::name_failure(&e, self.timeout)))?;
        let status = response.status().as_u16();
        let body = response.bytes().await.map_err(|e| unreachable(crate::outbound::name_failure(&e, self.timeout)))?;
        let json: Option<Value> = serde_json::from_slice(&body).ok();
        if !(200..300).contains(&status) {
            let field = |name: &str| json.as_ref().and_then(|j| j.get(name)).and_then(Value::as_str).map(words);
            let (error, description) = (field("error"), field("error_description"));
            if error.is_none() && description.is_none() && (status >= 500 || status == 429) {
                return Err(unreachable(Failure::Status { status, body: words(&String::from_utf8_lossy(&body)) }));
            }
            return Err(AuthError::Refused { status, error, description });
        }
        let json = json.ok_or_else(|| AuthError::BadToken("not JSON".into()))?;
        let access_token = json
            .get("access_token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| AuthError::BadToken("no access_token".into()))?;
        if !json.get("token_type").and_then(Value::as_str).is_some_and(|t| t.eq_ignore_ascii_case("bearer")) {
            return Err(AuthError::BadToken("token_type is not `bearer`".into()));
        }
        let lifetime = match json.get("expires_in") {
            None | Some(Value::Null) => DEFAULT_TOKEN_LIFETIME,
            Some(v) => v
                .as_u64()
                .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
                .and_then(|secs| i64::try_from(secs).ok())
                .map(time::Duration::seconds)
                .ok_or_else(|| AuthError::BadToken("expires_in is not a number of seconds".into()))?,
        };
        tracing::debug!(
            partner = %self.settings.partner,
            expires_in = lifetime.whole_seconds(),
            "Partner access token obtained."
        );
        Ok(CachedToken { header: format!("Bearer {access_token}"), refresh_at: refresh_at(now, lifetime) })
    }

    /// The token endpoint the partner's SMART configuration names, checked to take our assertions.
    async fn discover(&self) -> Result<String, AuthError> {
        let TokenEndpoint::Discover { base } = &self.settings.endpoint else {
            return Err(AuthError::Discovery("no token endpoint configured".into()));
        };
        let unreachable = |failure| AuthError::Unreachable { endpoint: Endpoint::SmartConfiguration, failure };
        let response = self
            .http
            .get(format!("{base}/.well-known/smart-configuration"))
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| unreachable(crate::outbound::name_failure(&e, self.timeout)))?;
        let status = response.status().as_u16();
        let body = response.bytes().await.map_err(|e| unreachable(crate::outbound::name_failure(&e, self.timeout)))?;
        if !(200..300).contains(&status) {
            return Err(unreachable(Failure::Status { status, body: words(&String::from_utf8_lossy(&body)) }));
        }
        let config: Value =
            serde_json::from_slice(&body).map_err(|_| AuthError::Discovery("the answer is not JSON".into()))?;
        let token_url = config
            .get("token_endpoint")
            .and_then(Value::as_str)
            .ok_or_else(|| AuthError::Discovery("it names no token_endpoint".into()))?;
        if !reqwest::Url::parse(token_url).is_ok_and(|u| is_secure_endpoint(&u)) {
            return Err(AuthError::Discovery(
                "its token_endpoint is not an https:// URL (http:// only on a loopback address)".into(),
            ));
        }
        let offers = |name: &str, wanted: &str| {
            config.get(name).and_then(Value::as_array).is_none_or(|v| v.iter().any(|m| m.as_str() == Some(wanted)))
        };
        if !offers("token_endpoint_auth_methods_supported", "private_key_jwt") {
            return Err(AuthError::Discovery("its token endpoint does not take private_key_jwt assertions".into()));
        }
        let alg = format!("{:?}", self.settings.key.algorithm);
        if !offers("token_endpoint_auth_signing_alg_values_supported", &alg) {
            return Err(AuthError::Discovery(format!("its token endpoint does not take {alg} assertions")));
        }
        Ok(token_url.to_owned())
    }
}

/// When a token obtained at `now` for `lifetime` is replaced: a minute before it expires, or halfway through a
/// shorter lifetime.
fn refresh_at(now: OffsetDateTime, lifetime: time::Duration) -> OffsetDateTime {
    let lifetime = lifetime.max(time::Duration::ZERO);
    now + lifetime - REFRESH_MARGIN.min(lifetime / 2)
}

/// Whether a URL may receive credentials: https, or http on a loopback address (tests, a local proxy).
#[must_use]
pub fn is_secure_endpoint(url: &reqwest::Url) -> bool {
    match (url.scheme(), url.host()) {
        ("https", Some(_)) => true,
        ("http", Some(url::Host::Ipv4(ip))) => ip.is_loopback(),
        ("http", Some(url::Host::Ipv6(ip))) => ip.is_loopback(),
        ("http", Some(url::Host::Domain(d))) => d.eq_ignore_ascii_case("localhost"),
        _ => false,
    }
}

/// A server's words for an error text: control characters dropped, whitespace collapsed, shortened.
fn words(text: &str) -> String {
    crate::outbound::server_words(text, SERVER_WORDS_CHARS)
}

/// The one FHIR client of a partner's server, as configured: its base URL, its credentials and TLS, a request
/// timeout of `timeout_secs` (else `default_timeout`), reads not retried (the caller decides).
///
/// # Errors
/// A credential that cannot be read (named by its configuration key, never the secret) or a client that cannot be
/// built; the message names the partner.
pub fn partner_client(
    partner: &PartnerSettings,
    default_timeout: Duration,
) -> Result<crate::fhir::client::FhirClient, String> {
    let timeout = partner.timeout_secs.map_or(default_timeout, Duration::from_secs);
    let credentials = PartnerCredentials::from_settings(partner, timeout).map_err(|e| e.to_string())?;
    crate::fhir::client::FhirClient::new(
        &partner.base_url,
        timeout,
        crate::outbound::RetryPolicy::NONE,
        credentials.token,
        credentials.tls.as_ref(),
    )
    .map_err(|e| format!("partner `{}`: {e}", partner.name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation, jwk::Jwk};
    use time::macros::datetime;

    fn ec_p384() -> String {
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("P-384 key").serialize_pem()
    }

    #[test]
    fn an_rsa_key_signs_rs384_and_a_p384_key_es384() {
        let rsa = rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
            .expect("RSA key")
            .serialize_pem();
        assert_eq!(AssertionKey::from_pem(rsa.as_bytes()).expect("RSA").algorithm(), Algorithm::RS384);
        assert_eq!(AssertionKey::from_pem(ec_p384().as_bytes()).expect("P-384").algorithm(), Algorithm::ES384);
        // A key after a certificate in the same file is found.
        let with_cert = format!("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n{}", ec_p384());
        assert_eq!(AssertionKey::from_pem(with_cert.as_bytes()).expect("found").algorithm(), Algorithm::ES384);
    }

    #[test]
    fn a_key_of_the_wrong_type_or_form_is_named() {
        let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256").serialize_pem();
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("Ed25519").serialize_pem();
        let sec1 = "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n";
        let encrypted = "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n";
        for (pem, needle) in [
            (p256.as_str(), "not on curve P-384"),
            (ed.as_str(), "an Ed25519 key"),
            (sec1, "SEC1"),
            (encrypted, "encrypted"),
            ("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "not an RSA or EC private key"),
            ("hello", "no private key"),
        ] {
            let problem = AssertionKey::from_pem(pem.as_bytes()).expect_err(needle);
            assert!(problem.contains(needle), "{needle}: {problem}");
            assert!(!problem.contains("AAAA") && !problem.contains("MI"), "no key material: {problem}");
        }
    }

    fn smart(key: AssertionKey) -> SmartClient {
        SmartClient::new(
            SmartSettings {
                partner: "p".into(),
                endpoint: TokenEndpoint::Configured("https://auth.example/token".into()),
                client_id: "carebridge-client".into(),
                key_id: "key-1".into(),
                scope: "system/*.write".into(),
                key,
            },
            None,
            Duration::from_secs(5),
        )
        .expect("client")
    }

    #[test]
    fn the_assertion_carries_kid_iss_sub_aud_jti_and_an_exp_within_five_minutes() {
        let pem = ec_p384();
        let client = smart(AssertionKey::from_pem(pem.as_bytes()).expect("key"));
        let now = OffsetDateTime::now_utc();
        let jwt = client.assertion("https://auth.example/token", now).expect("signed");
        let header = jsonwebtoken::decode_header(&jwt).expect("header");
        assert_eq!((header.alg, header.kid.as_deref()), (Algorithm::ES384, Some("key-1")));
        let jwk = Jwk::from_encoding_key(&EncodingKey::from_ec_pem(pem.as_bytes()).expect("key"), Algorithm::ES384)
            .expect("public JWK");
        let mut validation = Validation::new(Algorithm::ES384);
        validation.set_audience(&["https://auth.example/token"]);
        validation.set_issuer(&["carebridge-client"]);
        validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        let public = DecodingKey::from_jwk(&jwk).expect("key");
        let verify = |t: &str| {
            jsonwebtoken::decode::<Value>(t, &public, &validation).expect("verifies with the public JWK").claims
        };
        let claims = verify(&jwt);
        assert_eq!(claims["sub"], "carebridge-client");
        let exp = claims["exp"].as_i64().expect("exp");
        assert!(exp > now.unix_timestamp() && exp <= now.unix_timestamp() + 300, "{exp}");
        let other = client.assertion("https://auth.example/token", now).expect("signed");
        let jti = |t: &str| verify(t)["jti"].as_str().map(str::to_owned).expect("jti");
        assert_ne!(jti(&jwt), jti(&other), "a fresh jti for every assertion");
    }

    #[test]
    fn a_token_is_replaced_a_minute_before_it_expires_or_halfway_through_a_short_life() {
        let now = datetime!(2026-12-01 10:00:00 UTC);
        assert_eq!(refresh_at(now, time::Duration::seconds(300)), datetime!(2026-12-01 10:04:00 UTC));
        assert_eq!(refresh_at(now, time::Duration::seconds(20)), datetime!(2026-12-01 10:00:10 UTC));
        assert_eq!(refresh_at(now, time::Duration::ZERO), now);
    }

    #[test]
    fn credentials_go_to_https_or_to_a_loopback_address_only() {
        let secure = |u: &str| is_secure_endpoint(&reqwest::Url::parse(u).expect("url"));
        assert!(secure("https://auth.example/token"));
        assert!(secure("http://127.0.0.1:8080/token") && secure("http://[::1]/t") && secure("http://localhost/t"));
        assert!(!secure("http://auth.example/token") && !secure("ftp://auth.example/t"));
    }

    #[test]
    fn debug_output_never_shows_a_token_or_a_key() {
        let bearer = format!("{:?}", TokenSource::Bearer("s3cr3t-token".into()));
        assert!(!bearer.contains("s3cr3t"), "{bearer}");
        let pem = ec_p384();
        let client =
            format!("{:?}", TokenSource::Smart(Box::new(smart(AssertionKey::from_pem(pem.as_bytes()).expect("k")))));
        assert!(client.contains("key-1") && !client.contains("MI"), "{client}");
    }

    #[test]
    fn oauth_error_words_are_in_the_refusal_text() {
        let e = AuthError::Refused {
            status: 400,
            error: Some("invalid_client".into()),
            description: Some("unknown kid".into()),
        };
        assert_eq!(e.to_string(), "the token endpoint refused the token request: HTTP 400 invalid_client: unknown kid");
        assert!(!e.is_transient());
        let down = AuthError::Unreachable {
            endpoint: Endpoint::Token,
            failure: Failure::Status { status: 503, body: String::new() },
        };
        assert!(down.is_transient());
        assert_eq!(words("a\r\n\tb \u{1b}c"), "a b c");
    }
}
