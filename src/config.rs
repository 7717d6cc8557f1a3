//! One `Settings` tree, layered: embedded `defaults.toml` → the `--config` file → `CAREBRIDGE_<SECTION>__<KEY>`
//! environment variables → command-line flags. Every problem is reported at once, before a port is bound.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Config, Environment, File, FileFormat};
use serde::Deserialize;

/// The built-in defaults, documented line by line.
pub const DEFAULTS: &str = include_str!("defaults.toml");

/// Prefix of every environment variable the gateway reads.
const ENV_PREFIX: &str = "CAREBRIDGE";

/// Everything the gateway can be told.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The HTTP listener.
    pub server: ServerSettings,
    /// The store.
    pub database: DatabaseSettings,
    /// Log output.
    pub log: LogSettings,
    /// Internal API limits.
    pub api: ApiSettings,
    /// Demo records loaded at start.
    pub seed: SeedSettings,
    /// Keys that may call `/api/v1`.
    #[serde(default)]
    pub api_keys: Vec<ApiKeySettings>,
    /// Community service directories to sync.
    #[serde(default)]
    pub directories: Vec<DirectorySettings>,
    /// Mapping files (agency records ⇄ FHIR).
    pub mappings: MappingSettings,
    /// The partners the gateway exchanges FHIR with (`[[partners]]`).
    #[serde(default)]
    pub partners: Vec<crate::partners::PartnerSettings>,
    /// Delivery to partners: the outbox workers.
    pub outbox: OutboxSettings,
    /// Directory search.
    pub search: SearchSettings,
}

/// How `/api/v1/services` searches the catalog.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchSettings {
    /// The engine.
    pub engine: SearchEngine,
}

/// A directory search engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SearchEngine {
    /// An in-memory index per gateway (tantivy), built from the catalog at start and brought up to date before
    /// each search; SQL until it is built.
    Index,
    /// The database's own full-text search (SQLite FTS5, PostgreSQL `tsvector`).
    Sql,
}

/// The outbox workers that deliver records to partners.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxSettings {
    /// Whether `serve` runs the workers (`outbox run` always does).
    pub enabled: bool,
    /// Rows one claim takes per partner.
    pub batch: u32,
    /// Deliveries in flight to one partner at once.
    pub concurrency: u32,
    /// How long a claimed row stays the worker's; a worker that died gives its rows back when it lapses.
    pub lease_secs: u64,
    /// How long an idle worker waits before it looks for due rows again.
    pub poll_ms: u64,
    /// Per request to a partner.
    pub timeout_secs: u64,
    /// Waits before each retry (with ±20 % jitter); when they are spent the delivery is dead.
    pub retry_schedule_secs: Vec<u64>,
    /// Longest `Retry-After` honoured.
    pub retry_after_max_secs: u64,
    /// How often a held delivery's consent is checked again.
    pub hold_recheck_secs: u64,
    /// While a partner does not answer, one delivery is tried this often (a probe) instead of every due one.
    pub probe_secs: u64,
}

/// Where the mapping files live.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingSettings {
    /// The `mappings/` directory, relative to the working directory.
    pub dir: PathBuf,
}

/// One community service directory.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum DirectorySettings {
    /// An Open Referral HSDS 3.0 API.
    HsdsApi {
        /// Name of the source (`a-z 0-9 -`), the prefix of its services' gateway ids.
        name: String,
        /// API root; services are read from `<base_url>/services`.
        base_url: String,
        /// Services per page.
        #[serde(default = "default_per_page")]
        per_page: u32,
        /// Seconds between scheduled syncs; 0 syncs only on demand.
        #[serde(default)]
        sync_interval_secs: u64,
        /// Header carrying the source's credential, if it needs one.
        auth_header: Option<String>,
        /// Environment variable holding that credential (kept out of the file).
        auth_value_env: Option<String>,
        /// Seconds before a request to the source is abandoned (each attempt).
        #[serde(default = "default_source_timeout")]
        timeout_secs: u64,
        /// IANA time zone of the source's opening hours (e.g. `America/Los_Angeles`); schedules that state a
        /// fixed UTC offset keep theirs. Without either, a service never matches `open_now`.
        time_zone: Option<String>,
        /// How full service records are read (the list often carries one-to-one fields only).
        #[serde(default)]
        detail: HsdsDetail,
        /// Most requests in flight to the source at once (full records read one by one).
        #[serde(default = "default_max_concurrent_requests")]
        max_concurrent_requests: usize,
        /// Most of the services a full sync may deactivate (0–1 of the last complete crawl's count) before it
        /// refuses and deactivates nothing; `--force` (or `force=true`) overrides.
        #[serde(default = "default_deactivate_fraction")]
        max_deactivate_fraction: f64,
        /// Times a failed read (timeout, connection error, 429, 5xx) is tried again.
        #[serde(default = "default_retries")]
        retries: usize,
        /// First wait before a retry, in milliseconds (doubling, with jitter).
        #[serde(default = "default_retry_min_delay_ms")]
        retry_min_delay_ms: u64,
        /// Longest wait between retries, in milliseconds.
        #[serde(default = "default_retry_max_delay_ms")]
        retry_max_delay_ms: u64,
        /// Longest `Retry-After` honoured, in seconds (a longer one is cut to this).
        #[serde(default = "default_retry_after_max_secs")]
        retry_after_max_secs: u64,
        /// A ConceptMap (a path under the mappings directory, e.g. `directory/open-eligibility.json`) from the
        /// source's taxonomy (group `source`: the taxonomy's name or URI) to the agency service vocabulary: each
        /// term it maps also gives the service that agency category (the `category=` search filter).
        #[serde(default)]
        category_map: Option<PathBuf>,
    },
    /// An HSDS data package on disk (a JSON file, or a directory of them).
    HsdsPackage {
        /// Name of the source.
        name: String,
        /// The file or directory, relative to the working directory.
        path: PathBuf,
        /// Seconds between scheduled syncs; 0 syncs only on demand.
        #[serde(default)]
        sync_interval_secs: u64,
        /// IANA time zone of the source's opening hours (e.g. `America/Los_Angeles`); schedules that state a
        /// fixed UTC offset keep theirs. Without either, a service never matches `open_now`.
        time_zone: Option<String>,
        /// Most of the services a full sync may deactivate (0–1 of the last complete crawl's count) before it
        /// refuses and deactivates nothing; `--force` (or `force=true`) overrides.
        #[serde(default = "default_deactivate_fraction")]
        max_deactivate_fraction: f64,
        /// A ConceptMap (a path under the mappings directory, e.g. `directory/open-eligibility.json`) from the
        /// source's taxonomy (group `source`: the taxonomy's name or URI) to the agency service vocabulary: each
        /// term it maps also gives the service that agency category (the `category=` search filter).
        #[serde(default)]
        category_map: Option<PathBuf>,
    },
    /// A FHIR R4 server listing `HealthcareService`s (HL7 Human Services Directory / Plan-Net shape).
    FhirDirectory {
        /// Name of the source (`a-z 0-9 -`), the prefix of its services' gateway ids.
        name: String,
        /// FHIR base URL; services are searched at `<base_url>/HealthcareService`.
        base_url: String,
        /// Services per page (`_count`).
        #[serde(default = "default_per_page")]
        per_page: u32,
        /// Seconds between scheduled syncs; 0 syncs only on demand.
        #[serde(default)]
        sync_interval_secs: u64,
        /// Environment variable holding a bearer token for the server, if it needs one (kept out of the file).
        bearer_token_env: Option<String>,
        /// Seconds before a request to the server is abandoned.
        #[serde(default = "default_source_timeout")]
        timeout_secs: u64,
        /// IANA time zone of the source's opening hours (e.g. `America/Los_Angeles`); schedules that state a
        /// fixed UTC offset keep theirs. Without either, a service never matches `open_now`.
        time_zone: Option<String>,
        /// Most of the services a full sync may deactivate (0–1 of the last complete crawl's count) before it
        /// refuses and deactivates nothing; `--force` (or `force=true`) overrides.
        #[serde(default = "default_deactivate_fraction")]
        max_deactivate_fraction: f64,
    },
}

/// How an HSDS API source reads full service records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HsdsDetail {
    /// Probe at the first sync: the list if its items carry locations, phones, languages, schedules or
    /// attributes, else `full=true` if that gives them, else `/services/{id}`; the decision is kept.
    #[default]
    Auto,
    /// The list items as they come.
    List,
    /// `GET /services?full=true`.
    FullParam,
    /// `GET /services/{id}` for each listed service whose `last_modified` changed.
    PerService,
}

fn default_max_concurrent_requests() -> usize {
    4
}

fn default_deactivate_fraction() -> f64 {
    0.2
}

fn default_retries() -> usize {
    3
}

fn default_retry_min_delay_ms() -> u64 {
    500
}

fn default_retry_max_delay_ms() -> u64 {
    30_000
}

fn default_retry_after_max_secs() -> u64 {
    60
}

fn default_per_page() -> u32 {
    100
}

fn default_source_timeout() -> u64 {
    30
}

impl DirectorySettings {
    /// The source's name.
    #[must_use]
    pub fn name(&self) -> &str {
        match self {
            DirectorySettings::HsdsApi { name, .. }
            | DirectorySettings::HsdsPackage { name, .. }
            | DirectorySettings::FhirDirectory { name, .. } => name,
        }
    }

    /// Seconds between scheduled syncs (0: on demand only).
    #[must_use]
    pub fn sync_interval_secs(&self) -> u64 {
        match self {
            DirectorySettings::HsdsApi { sync_interval_secs, .. }
            | DirectorySettings::HsdsPackage { sync_interval_secs, .. }
            | DirectorySettings::FhirDirectory { sync_interval_secs, .. } => *sync_interval_secs,
        }
    }

    /// IANA time zone of the source's opening hours, when configured.
    #[must_use]
    pub fn time_zone(&self) -> Option<&str> {
        match self {
            DirectorySettings::HsdsApi { time_zone, .. }
            | DirectorySettings::HsdsPackage { time_zone, .. }
            | DirectorySettings::FhirDirectory { time_zone, .. } => time_zone.as_deref(),
        }
    }

    /// Most of the services a full sync may deactivate without force (a fraction of the last complete crawl).
    #[must_use]
    pub fn max_deactivate_fraction(&self) -> f64 {
        match self {
            DirectorySettings::HsdsApi { max_deactivate_fraction, .. }
            | DirectorySettings::HsdsPackage { max_deactivate_fraction, .. }
            | DirectorySettings::FhirDirectory { max_deactivate_fraction, .. } => *max_deactivate_fraction,
        }
    }

    /// The ConceptMap (under the mappings directory) giving the source's taxonomy terms agency categories, when
    /// configured (HSDS sources; a FHIR directory reads `directory/service-category.json`).
    #[must_use]
    pub fn category_map(&self) -> Option<&std::path::Path> {
        match self {
            DirectorySettings::HsdsApi { category_map, .. } | DirectorySettings::HsdsPackage { category_map, .. } => {
                category_map.as_deref()
            }
            DirectorySettings::FhirDirectory { .. } => None,
        }
    }

    /// The environment variable holding the source's credential, when it has one.
    #[must_use]
    pub fn credential_variable(&self) -> Option<&str> {
        match self {
            DirectorySettings::HsdsApi { auth_value_env, .. } => auth_value_env.as_deref(),
            DirectorySettings::FhirDirectory { bearer_token_env, .. } => bearer_token_env.as_deref(),
            DirectorySettings::HsdsPackage { .. } => None,
        }
    }
}

/// Checks what every directory read over HTTP needs: an http(s) base URL and a page size the servers accept.
fn check_http_source(at: &str, base_url: &str, per_page: u32, errors: &mut Vec<String>) {
    if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
        errors.push(format!("{at}.base_url: expected an http:// or https:// URL"));
    }
    if !(1..=1000).contains(&per_page) {
        errors.push(format!("{at}.per_page: between 1 and 1000"));
    }
}

/// The HTTP listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// `HOST:PORT` to listen on.
    pub listen: String,
    /// Largest request body, in bytes.
    pub body_limit_bytes: usize,
    /// Longest a request may take, in seconds.
    pub request_timeout_secs: u64,
    /// How long requests in flight get to finish on shutdown, in seconds.
    pub shutdown_grace_secs: u64,
    /// How long a client has to send a whole request head, in seconds.
    pub header_read_timeout_secs: u64,
    /// How long a connection may stay open with nothing moving and no request being handled, in seconds.
    pub idle_timeout_secs: u64,
    /// The URL clients reach the gateway at (`https://gw.example/`), the base of the links it hands out.
    #[serde(default)]
    pub public_base_url: Option<String>,
    /// Reverse proxies (IP addresses or CIDR ranges) whose `X-Forwarded-Proto` / `X-Forwarded-Host` are believed.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Failed authentications (no key, a key that is not one) one address may make in a window before it gets 429
    /// until the window ends; 0: never slowed.
    pub auth_failure_limit: u32,
    /// That window, in seconds.
    pub auth_failure_window_secs: u64,
    /// Most connections open at once; one more is closed as soon as it is accepted.
    pub max_connections: usize,
    /// TLS on the listener (unset: plain HTTP, for a gateway behind a TLS-terminating proxy).
    #[serde(default)]
    pub tls: Option<ServerTlsSettings>,
}

/// `[server.tls]`: the listener speaks TLS (HTTP/2 or HTTP/1.1 by ALPN), optionally requiring client certificates.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsSettings {
    /// The server's certificate chain, PEM (its own certificate first).
    pub cert_file: String,
    /// Its private key, PEM (PKCS#8, PKCS#1 or SEC1), unencrypted.
    pub key_file: String,
    /// CA certificates, PEM: set, every client must present a certificate one of them issued, or the handshake
    /// fails (mutual TLS).
    #[serde(default)]
    pub client_ca_file: Option<String>,
}

impl ServerTlsSettings {
    /// The files, as the TLS module reads them.
    #[must_use]
    pub fn files(&self) -> crate::tls::TlsFiles {
        crate::tls::TlsFiles {
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
            client_ca_file: self.client_ca_file.clone(),
        }
    }
}

impl ServerSettings {
    /// `trusted_proxies` as networks (a bare address is a network of one); entries that do not parse are left
    /// out (they are refused at load).
    #[must_use]
    pub fn trusted_networks(&self) -> Vec<ipnet::IpNet> {
        self.trusted_proxies.iter().filter_map(|p| parse_network(p)).collect()
    }
}

/// An IP address or CIDR range.
fn parse_network(text: &str) -> Option<ipnet::IpNet> {
    let text = text.trim();
    text.parse::<ipnet::IpNet>().ok().or_else(|| text.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
}

/// Checks `server.public_base_url`: an absolute http(s) URL with a host and no query, fragment or credentials.
fn check_public_base_url(value: &str) -> Result<(), &'static str> {
    let url = url::Url::parse(value).map_err(|_| "not an absolute URL (e.g. https://gw.example/)")?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("expected an http:// or https:// URL");
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("the URL needs a host");
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("the URL must not have a query or a fragment");
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("the URL must not carry credentials");
    }
    Ok(())
}

/// The store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `sqlite:PATH` or `postgres://…`.
    pub url: String,
    /// Connections per pool.
    pub max_connections: u32,
    /// Longest wait for a free connection, in seconds.
    pub acquire_timeout_secs: u64,
}

/// Log output.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// Line format.
    pub format: LogFormat,
    /// tracing filter directives (`RUST_LOG` overrides them).
    pub filter: String,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Pretty,
}

/// Internal API limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSettings {
    /// Page size when the caller names none.
    pub default_page_size: u32,
    /// Largest page size a caller may ask for.
    pub max_page_size: u32,
}

/// Demo records loaded at start.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedSettings {
    /// Directory of `<kind>/<id>.json` files, relative to the working directory.
    pub dir: Option<PathBuf>,
}

/// One API key, as kept in the configuration: a name, a salted hash, and its scopes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeySettings {
    /// Who holds it; recorded in the audit log and version history.
    pub name: String,
    /// `sha256:<salt hex>:<digest hex>` of salt ‖ key.
    pub hash: String,
    /// What it may do.
    pub scopes: Vec<Scope>,
    /// The partner (`[[partners]]` name) this key belongs to: it then acts as that partner on `/fhir` only (never
    /// on `/api/v1`), and sees only that partner's referrals and what the egress policy lets it see.
    #[serde(default)]
    pub partner: Option<String>,
}

/// What an API key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Read records, lists and history.
    Read,
    /// Create and replace records, change referral status.
    Write,
    /// Read the audit log.
    Admin,
}

impl Scope {
    /// The scope's name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }
}

/// Values given on the command line (or their `CAREBRIDGE_LISTEN` / `CAREBRIDGE_DATABASE` variables).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--listen`.
    pub listen: Option<String>,
    /// `--database`.
    pub database: Option<String>,
}

/// Every problem found in the configuration.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct ConfigErrors(pub Vec<String>);

impl Settings {
    /// Loads and checks the settings from every layer.
    ///
    /// # Errors
    /// Every problem found: unreadable or malformed file, unknown keys, wrong types, and values that make no sense.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Settings, ConfigErrors> {
        Self::load_with_env(file, overrides, std::env::vars())
    }

    /// [`Settings::load`] with the environment given, for tests.
    ///
    /// # Errors
    /// As [`Settings::load`].
    pub fn load_with_env(
        file: Option<&Path>,
        overrides: &Overrides,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigErrors> {
        let built = layered(file, overrides, env)?;
        let settings: Settings = built.try_deserialize().map_err(|e| ConfigErrors(vec![e.to_string()]))?;
        settings.check()?;
        Ok(settings)
    }

    /// The effective configuration after every layer, as TOML, every secret shown as `[redacted]`: API key
    /// hashes, passwords in URLs (the database's, any other), and any value under a key named like a secret
    /// (`*secret*`, `*password*`, `token`, `hash`). A partner's bearer token is never in the file (only the name of
    /// its variable, shown with whether it is set); key files are shown by path, never their contents. Refused when
    /// the configuration is not valid (the errors, as `check` gives them).
    ///
    /// # Errors
    /// As [`Settings::load`].
    pub fn effective_with_env(
        file: Option<&Path>,
        overrides: &Overrides,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<String, ConfigErrors> {
        let env: Vec<(String, String)> = env.into_iter().collect();
        let set: HashSet<String> = env.iter().map(|(k, _)| k.clone()).collect();
        Settings::load_with_env(file, overrides, env.clone())?;
        let built = layered(file, overrides, env)?;
        let mut tree: toml::Table = built.try_deserialize().map_err(|e| ConfigErrors(vec![e.to_string()]))?;
        redact_table(&mut tree, &|var| set.contains(var));
        toml::to_string_pretty(&tree).map_err(|e| ConfigErrors(vec![e.to_string()]))
    }
}

impl Settings {
    /// Checks the values serde cannot, collecting every problem.
    fn check(&self) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        crate::partners::check(&self.partners, &mut errors);
        if self.server.listen.parse::<SocketAddr>().is_err() {
            errors.push(format!("server.listen: `{}` is not HOST:PORT (e.g. 127.0.0.1:8080)", self.server.listen));
        }
        if !(1..=64 * 1024 * 1024).contains(&self.server.body_limit_bytes) {
            errors.push("server.body_limit_bytes: must be between 1 and 67108864".into());
        }
        for (key, secs) in [
            ("request_timeout_secs", self.server.request_timeout_secs),
            ("header_read_timeout_secs", self.server.header_read_timeout_secs),
            ("idle_timeout_secs", self.server.idle_timeout_secs),
        ] {
            if secs == 0 {
                errors.push(format!("server.{key}: must be at least 1"));
            }
        }
        if let Some(tls) = &self.server.tls
            && let Err(e) = crate::tls::server_config(&tls.files())
        {
            errors.push(format!("server.tls: {e}"));
        }
        if let Some(Err(e)) = self.server.public_base_url.as_deref().map(check_public_base_url) {
            errors.push(format!("server.public_base_url: {e}"));
        }
        // A partner known by its client certificate needs the listener to ask for one.
        let mutual = self.server.tls.as_ref().is_some_and(|t| t.client_ca_file.is_some());
        let mut cert_names = std::collections::HashSet::new();
        for (i, p) in self.partners.iter().enumerate() {
            let Some(name) = &p.client_cert_name else { continue };
            if !mutual {
                errors.push(format!(
                    "partners[{i}].client_cert_name: set server.tls.client_ca_file (mutual TLS), or the gateway \
                     never sees a client certificate"
                ));
            }
            if rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
                errors.push(format!("partners[{i}].client_cert_name: not a DNS name or an IP address"));
            }
            if !cert_names.insert(name.to_ascii_lowercase()) {
                errors.push(format!("partners[{i}].client_cert_name: another partner has the same name"));
            }
        }
        // A partner calls the gateway back at its public address; without one there is nowhere to send to.
        for (i, p) in self.partners.iter().enumerate() {
            if p.subscription.is_some() && self.server.public_base_url.is_none() {
                errors.push(format!(
                    "partners[{i}].subscription: set server.public_base_url, the address the partner sends \
                     notifications to"
                ));
            }
        }
        for (i, proxy) in self.server.trusted_proxies.iter().enumerate() {
            if parse_network(proxy).is_none() {
                errors.push(format!("server.trusted_proxies[{i}]: not an IP address or CIDR range (e.g. 10.0.0.0/8)"));
            }
        }
        let url = &self.database.url;
        if url.starts_with("sqlite:") {
            if url.contains(":memory:") || url.contains("mode=memory") {
                errors
                    .push("database.url: an in-memory SQLite database loses every record on exit; name a file".into());
            }
        } else if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            errors.push("database.url: expected sqlite:PATH or postgres://USER@HOST/DB".into());
        }
        if self.database.max_connections == 0 {
            errors.push("database.max_connections: must be at least 1".into());
        }
        if self.api.default_page_size == 0 || self.api.default_page_size > self.api.max_page_size {
            errors.push("api.default_page_size: must be between 1 and api.max_page_size".into());
        }
        let o = &self.outbox;
        for (key, value) in [
            ("batch", u64::from(o.batch)),
            ("concurrency", u64::from(o.concurrency)),
            ("lease_secs", o.lease_secs),
            ("poll_ms", o.poll_ms),
            ("timeout_secs", o.timeout_secs),
            ("hold_recheck_secs", o.hold_recheck_secs),
            ("probe_secs", o.probe_secs),
        ] {
            if value == 0 {
                errors.push(format!("outbox.{key}: must be at least 1"));
            }
        }
        if o.lease_secs <= o.timeout_secs {
            errors.push("outbox.lease_secs: must be longer than outbox.timeout_secs (a delivery must end before its lease does)".into());
        }
        if o.retry_schedule_secs.contains(&0) {
            errors.push("outbox.retry_schedule_secs: every wait must be at least 1 second".into());
        }
        if let Some(dir) = &self.seed.dir
            && !dir.is_dir()
        {
            errors.push(format!("seed.dir: {} is not a directory", dir.display()));
        }
        let mut names = HashSet::new();
        for (i, key) in self.api_keys.iter().enumerate() {
            let at = format!("api_keys[{i}]");
            if key.name.trim().is_empty() {
                errors.push(format!("{at}.name: must not be empty"));
            } else if !names.insert(key.name.as_str()) {
                errors.push(format!("{at}.name: `{}` is used by another key", key.name));
            }
            if let Err(e) = crate::keys::KeyHash::parse(&key.hash) {
                errors.push(format!("{at}.hash: {e}"));
            }
            if key.scopes.is_empty() {
                errors.push(format!("{at}.scopes: a key needs at least one scope"));
            }
            if let Some(partner) = &key.partner
                && !self.partners.iter().any(|p| &p.name == partner)
            {
                errors.push(format!("{at}.partner: no [[partners]] entry is named `{partner}`"));
            }
        }
        let mut sources = HashSet::new();
        for (i, d) in self.directories.iter().enumerate() {
            let at = format!("directories[{i}]");
            let name = d.name();
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
                errors.push(format!("{at}.name: use a-z, 0-9 and '-' (it prefixes the ids of its services)"));
            } else if !sources.insert(name) {
                errors.push(format!("{at}.name: `{name}` names another directory too"));
            }
            if let Some(Err(e)) = d.time_zone().map(crate::directories::hours::check_time_zone) {
                errors.push(format!("{at}.time_zone: {e} (directory `{name}`)"));
            }
            if !(0.0..=1.0).contains(&d.max_deactivate_fraction()) {
                errors.push(format!("{at}.max_deactivate_fraction: between 0 and 1"));
            }
            match d {
                DirectorySettings::HsdsApi {
                    base_url,
                    per_page,
                    auth_header,
                    auth_value_env,
                    timeout_secs,
                    max_concurrent_requests,
                    retries,
                    retry_min_delay_ms,
                    retry_max_delay_ms,
                    ..
                } => {
                    check_http_source(&at, base_url, *per_page, &mut errors);
                    if auth_header.is_some() != auth_value_env.is_some() {
                        errors.push(format!("{at}: auth_header and auth_value_env go together"));
                    }
                    if *timeout_secs == 0 {
                        errors.push(format!("{at}.timeout_secs: must be at least 1"));
                    }
                    if !(1..=64).contains(max_concurrent_requests) {
                        errors.push(format!("{at}.max_concurrent_requests: between 1 and 64"));
                    }
                    if *retries > 10 {
                        errors.push(format!("{at}.retries: at most 10"));
                    }
                    if retry_min_delay_ms > retry_max_delay_ms {
                        errors.push(format!("{at}.retry_min_delay_ms: must not exceed retry_max_delay_ms"));
                    }
                }
                DirectorySettings::FhirDirectory { base_url, per_page, bearer_token_env, timeout_secs, .. } => {
                    check_http_source(&at, base_url, *per_page, &mut errors);
                    if bearer_token_env.as_deref().is_some_and(|v| v.trim().is_empty()) {
                        errors.push(format!("{at}.bearer_token_env: name a variable, or leave it out"));
                    }
                    if *timeout_secs == 0 {
                        errors.push(format!("{at}.timeout_secs: must be at least 1"));
                    }
                }
                DirectorySettings::HsdsPackage { path, .. } => {
                    if !path.exists() {
                        errors.push(format!("{at}.path: {} does not exist", path.display()));
                    }
                }
            }
        }
        if errors.is_empty() { Ok(()) } else { Err(ConfigErrors(errors)) }
    }

    /// `server.listen` as an address (checked at load).
    #[must_use]
    pub fn listen_addr(&self) -> SocketAddr {
        self.server.listen.parse().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 8080)))
    }

    /// The credential variables of configured directories that `is_set` says are not set, each as a sentence
    /// naming the directory (the gateway would refuse to start without them).
    #[must_use]
    pub fn unset_credentials(&self, is_set: impl Fn(&str) -> bool) -> Vec<String> {
        self.directories
            .iter()
            .enumerate()
            .filter_map(|(i, d)| {
                let var = d.credential_variable()?;
                (!is_set(var)).then(|| {
                    format!("directories[{i}]: the credential variable {var} of directory `{}` is not set", d.name())
                })
            })
            .collect()
    }

    /// `database.acquire_timeout_secs` as a duration.
    #[must_use]
    pub fn acquire_timeout(&self) -> Duration {
        Duration::from_secs(self.database.acquire_timeout_secs)
    }
}

/// The layers merged: defaults → file → `CAREBRIDGE_<SECTION>__<KEY>` → flags.
fn layered(
    file: Option<&Path>,
    overrides: &Overrides,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigErrors> {
    let mut builder = Config::builder().add_source(File::from_str(DEFAULTS, FileFormat::Toml));
    if let Some(path) = file {
        if !path.is_file() {
            return Err(ConfigErrors(vec![format!("{}: no such configuration file", path.display())]));
        }
        builder = builder.add_source(File::from(path).format(FileFormat::Toml));
    }
    // Only CAREBRIDGE_<SECTION>__<KEY> belongs to the settings tree; CAREBRIDGE_LISTEN and friends are flags.
    let section_vars: HashMap<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.strip_prefix(ENV_PREFIX).and_then(|r| r.strip_prefix('_')).is_some_and(|r| r.contains("__")))
        .collect();
    builder = builder.add_source(
        Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .source(Some(section_vars)),
    );
    let set = |b: config::ConfigBuilder<_>, key: &str, v: &Option<String>| match v {
        Some(v) => b.set_override(key, v.as_str()),
        None => Ok(b),
    };
    set(builder, "server.listen", &overrides.listen)
        .and_then(|b| set(b, "database.url", &overrides.database))
        .and_then(|b| b.build())
        .map_err(|e| ConfigErrors(vec![e.to_string()]))
}

const REDACTED: &str = "[redacted]";

/// Whether a key names a secret.
fn secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k == "hash" || k == "token" || k.contains("secret") || k.contains("password") || k.ends_with("_token")
}

/// Redacts the secrets of `table` in place (see [`Settings::effective_with_env`]); `is_set` says whether an
/// environment variable is set.
fn redact_table(table: &mut toml::Table, is_set: &dyn Fn(&str) -> bool) {
    let names: Vec<String> = table.keys().cloned().collect();
    for key in names {
        let Some(value) = table.get_mut(&key) else { continue };
        if secret_key(&key) {
            *value = toml::Value::String(REDACTED.into());
            continue;
        }
        if key == "token_env"
            && let toml::Value::String(var) = value
        {
            let shown = format!("{var} ({})", if is_set(var) { "set" } else { "not set" });
            *value = toml::Value::String(shown);
            continue;
        }
        redact_value(value, is_set);
    }
}

fn redact_value(value: &mut toml::Value, is_set: &dyn Fn(&str) -> bool) {
    match value {
        toml::Value::Table(t) => redact_table(t, is_set),
        toml::Value::Array(items) => items.iter_mut().for_each(|v| redact_value(v, is_set)),
        toml::Value::String(text) => {
            // A placeholder URLs take as it is, then the mark shown (brackets would be percent-encoded).
            const PLACEHOLDER: &str = "carebridge-redacted-password";
            if let Ok(mut url) = url::Url::parse(text)
                && url.password().is_some()
                && url.set_password(Some(PLACEHOLDER)).is_ok()
            {
                *text = url.to_string().replace(PLACEHOLDER, REDACTED);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(toml: &str, env: &[(&str, &str)]) -> Result<Settings, ConfigErrors> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, toml).expect("write config");
        let env = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned()));
        Settings::load_with_env(Some(&path), &Overrides::default(), env)
    }

    #[test]
    fn the_embedded_defaults_load_on_their_own() {
        let s = Settings::load_with_env(None, &Overrides::default(), []).expect("defaults load");
        assert_eq!(s.server.listen, "127.0.0.1:8080");
        assert!(s.api_keys.is_empty());
    }

    #[test]
    fn a_file_overrides_defaults_and_the_environment_overrides_the_file() {
        let s = load(
            "[server]\nlisten = \"127.0.0.1:9000\"\nbody_limit_bytes = 10\n",
            &[("CAREBRIDGE_SERVER__BODY_LIMIT_BYTES", "20"), ("CAREBRIDGE_TEST_POSTGRES_URL", "x")],
        )
        .expect("loads");
        assert_eq!(s.server.listen, "127.0.0.1:9000");
        assert_eq!(s.server.body_limit_bytes, 20);
    }

    #[test]
    fn flags_override_everything() {
        let overrides = Overrides { listen: Some("127.0.0.1:1".into()), database: Some("sqlite:x.db".into()) };
        let env = [("CAREBRIDGE_DATABASE__URL".to_owned(), "sqlite:y.db".to_owned())];
        let s = Settings::load_with_env(None, &overrides, env).expect("loads");
        assert_eq!(s.server.listen, "127.0.0.1:1");
        assert_eq!(s.database.url, "sqlite:x.db");
    }

    #[test]
    fn a_typo_in_a_key_is_an_error() {
        let e = load("[server]\nlisen = \"127.0.0.1:9000\"\n", &[]).expect_err("unknown key");
        assert!(e.to_string().contains("lisen"), "{e}");
    }

    #[test]
    fn every_bad_value_is_reported_at_once() {
        let e = load(
            "[server]\nlisten = \"nowhere\"\n[database]\nurl = \"mysql://x\"\n\
             [[api_keys]]\nname = \"a\"\nhash = \"md5:00\"\nscopes = []\n",
            &[],
        )
        .expect_err("bad values");
        let text = e.to_string();
        for needle in ["server.listen", "database.url", "api_keys[0].hash", "api_keys[0].scopes"] {
            assert!(text.contains(needle), "missing {needle} in:\n{text}");
        }
        assert_eq!(e.0.len(), 4);
    }

    #[test]
    fn a_fhir_directory_takes_its_defaults_and_its_bad_values_are_reported() {
        let s = load(
            "[[directories]]\ntype = \"fhir_directory\"\nname = \"county-fhir\"\n\
             base_url = \"https://fhir.county.example/r4\"\nbearer_token_env = \"COUNTY_FHIR_TOKEN\"\n",
            &[],
        )
        .expect("loads");
        let Some(DirectorySettings::FhirDirectory {
            per_page, sync_interval_secs, timeout_secs, bearer_token_env, ..
        }) = s.directories.first()
        else {
            panic!("not a FHIR directory: {:?}", s.directories);
        };
        assert_eq!((*per_page, *sync_interval_secs, *timeout_secs), (100, 0, 30));
        assert_eq!(bearer_token_env.as_deref(), Some("COUNTY_FHIR_TOKEN"));
        assert_eq!(s.directories[0].name(), "county-fhir");

        let e = load(
            "[[directories]]\ntype = \"fhir_directory\"\nname = \"county-fhir\"\nbase_url = \"fhir.example\"\n\
             per_page = 0\ntimeout_secs = 0\nbearer_token_env = \" \"\n",
            &[],
        )
        .expect_err("bad values");
        let text = e.to_string();
        for needle in [
            "directories[0].base_url",
            "directories[0].per_page",
            "directories[0].timeout_secs",
            "directories[0].bearer_token_env",
        ] {
            assert!(text.contains(needle), "missing {needle} in:\n{text}");
        }
        let typo = load(
            "[[directories]]\ntype = \"fhir_directory\"\nname = \"c\"\nbase_url = \"https://x\"\nbearer_token = \"t\"\n",
            &[],
        )
        .expect_err("unknown key");
        assert!(typo.to_string().contains("bearer_token"), "{typo}");
    }

    #[test]
    fn a_directory_time_zone_must_be_an_iana_zone_and_the_error_names_the_source() {
        let s = load(
            "[[directories]]\ntype = \"hsds_api\"\nname = \"pdx211\"\nbase_url = \"https://211.example\"\n\
             time_zone = \"America/Los_Angeles\"\n",
            &[],
        )
        .expect("loads");
        assert_eq!(s.directories[0].time_zone(), Some("America/Los_Angeles"));
        let e = load(
            "[[directories]]\ntype = \"fhir_directory\"\nname = \"county-fhir\"\nbase_url = \"https://x.example\"\n\
             time_zone = \"America/Portland\"\n",
            &[],
        )
        .expect_err("unknown zone");
        assert_eq!(e.0.len(), 1, "{e}");
        assert!(e.0[0].starts_with("directories[0].time_zone:") && e.0[0].contains("`county-fhir`"), "{e}");
        assert!(e.0[0].contains("America/Portland"), "{e}");
    }

    #[test]
    fn connection_timeouts_public_url_and_proxies_are_checked_together() {
        let s = load(
            "[server]\npublic_base_url = \"https://gw.example/carebridge/\"\n\
             trusted_proxies = [\"10.0.0.0/8\", \"127.0.0.1\", \"::1\"]\n",
            &[],
        )
        .expect("loads");
        assert_eq!((s.server.header_read_timeout_secs, s.server.idle_timeout_secs), (10, 60));
        assert_eq!(s.server.trusted_networks().len(), 3);
        let e = load(
            "[server]\nheader_read_timeout_secs = 0\nidle_timeout_secs = 0\n\
             public_base_url = \"https://gw.example/?a=b\"\ntrusted_proxies = [\"10.0.0.0/33\"]\n",
            &[],
        )
        .expect_err("bad values");
        let text = e.to_string();
        for needle in [
            "server.header_read_timeout_secs",
            "server.idle_timeout_secs",
            "server.public_base_url",
            "server.trusted_proxies[0]",
        ] {
            assert!(text.contains(needle), "missing {needle} in:\n{text}");
        }
        assert_eq!(e.0.len(), 4, "{text}");
        for bad in ["gw.example", "ftp://gw.example/", "https://user:pw@gw.example/", "https://gw.example/#top"] {
            let e = load(&format!("[server]\npublic_base_url = \"{bad}\"\n"), &[]).expect_err(bad);
            assert!(e.to_string().starts_with("server.public_base_url:"), "{bad}: {e}");
        }
    }

    #[test]
    fn an_hsds_api_with_no_timeout_or_an_unset_credential_variable_is_refused() {
        let e = load(
            "[[directories]]\ntype = \"hsds_api\"\nname = \"metro\"\nbase_url = \"https://211.example\"\n\
             timeout_secs = 0\nmax_concurrent_requests = 0\nmax_deactivate_fraction = 1.5\n",
            &[],
        )
        .expect_err("bad values");
        let text = e.to_string();
        for needle in [
            "directories[0].timeout_secs",
            "directories[0].max_concurrent_requests",
            "directories[0].max_deactivate_fraction",
        ] {
            assert!(text.contains(needle), "missing {needle} in:\n{text}");
        }
        let s = load(
            "[[directories]]\ntype = \"hsds_api\"\nname = \"metro\"\nbase_url = \"https://211.example\"\n\
             auth_header = \"X-Api-Key\"\nauth_value_env = \"METRO_KEY\"\n",
            &[],
        )
        .expect("loads");
        let Some(DirectorySettings::HsdsApi { detail, max_concurrent_requests, retries, .. }) = s.directories.first()
        else {
            panic!("not an HSDS API: {:?}", s.directories);
        };
        assert_eq!((*detail, *max_concurrent_requests, *retries), (HsdsDetail::Auto, 4, 3));
        let unset = s.unset_credentials(|_| false);
        assert_eq!(unset.len(), 1);
        assert!(unset[0].contains("METRO_KEY") && unset[0].contains("`metro`"), "{unset:?}");
        assert!(s.unset_credentials(|v| v == "METRO_KEY").is_empty());
    }

    #[test]
    fn a_malformed_file_names_its_line() {
        let e = load("[server]\nlisten = \n", &[]).expect_err("bad toml");
        assert!(e.to_string().contains("line 2"), "{e}");
    }

    #[test]
    fn tls_files_that_cannot_be_used_and_a_certificate_name_without_mutual_tls_are_named() {
        let errors = load(
            "[server.tls]\ncert_file = \"/nonexistent/server.pem\"\nkey_file = \"/nonexistent/server.key\"\n\
             [[partners]]\nname = \"a\"\nbase_url = \"https://a.example/fhir\"\nreceives = [\"client\"]\n\
             client_cert_name = \"ehr.a.example\"\n\
             [[partners]]\nname = \"b\"\nbase_url = \"https://b.example/fhir\"\nreceives = [\"client\"]\n\
             client_cert_name = \"not a name\"\n",
            &[],
        )
        .expect_err("refused")
        .0;
        let all = errors.join("\n");
        assert!(all.contains("server.tls: /nonexistent/server.pem could not be read"), "{all}");
        assert!(all.contains("partners[0].client_cert_name: set server.tls.client_ca_file"), "{all}");
        assert!(all.contains("partners[1].client_cert_name: not a DNS name"), "{all}");
    }
}
