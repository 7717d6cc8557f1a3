//! The partner registry: the organisations the gateway exchanges FHIR with, each named once in the configuration
//! (`[[partners]]`). A referral's target partner and a consent's recipient name one of them; the partner says which
//! mapping overlay it reads (`mappings/partners/<overlay>.toml`), what it receives, and how it is reached.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::domain::RecordKind;
use crate::fhir::auth;

/// One partner, as configured.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartnerSettings {
    /// Its name (`a-z 0-9 -`): what records name it by.
    pub name: String,
    /// Its FHIR R4 base URL (`https://fhir.example/r4`).
    pub base_url: String,
    /// The record kinds sent to it (`client`, `assessment`, `care-plan`, `referral`, `consent`).
    pub receives: Vec<String>,
    /// Its mapping overlay (`mappings/partners/<overlay>.toml`); absent: the base mappings.
    #[serde(default)]
    pub overlay: Option<String>,
    /// Most entries one transaction Bundle may hold; 0: no transactions, ordered single requests.
    #[serde(default = "default_max_transaction_entries")]
    pub max_transaction_entries: u32,
    /// How the gateway authenticates to it.
    #[serde(default)]
    pub auth: PartnerAuth,
    /// Identifier systems the partner knows its patients by (an MRN, a Medicaid id): a client whose record carries
    /// one is matched to the partner's own Patient (searched by it), which is then referenced and never
    /// overwritten. Empty: the gateway's own client identifier only.
    #[serde(default)]
    pub patient_match: Vec<String>,
    /// Per request to it; absent: `outbox.timeout_secs`.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Mutual TLS and the CAs trusted for it (beside any `auth`); absent: no client certificate, public roots.
    #[serde(default)]
    pub tls: Option<PartnerTls>,
    /// Whether its server resolves conditional references in a transaction (`Patient?identifier=system|value`):
    /// then a reference to a resource not yet in the crosswalk is sent as one rather than made logical. Off by
    /// default: not every server resolves them (some store them as they are).
    #[serde(default)]
    pub conditional_references: bool,
    /// Its policy profile (`mappings/policy/profiles.toml`): what it may receive, on what grounds; absent:
    /// `treating-provider`.
    #[serde(default)]
    pub policy: Option<String>,
    /// How often, in seconds, the gateway reads the Tasks of the referrals it sent this partner that changed on
    /// its server (one `_lastUpdated` search a sweep); 0: never (the partner reports on `/fhir` instead).
    #[serde(default = "default_poll_secs")]
    pub poll_secs: u64,
    /// A topic-based Subscription (R4 backport, rest-hook, `id-only`) the gateway keeps at the partner, so the
    /// referrals it sent there are followed as their Tasks change instead of at the next sweep. Used only where the
    /// partner's CapabilityStatement declares the backport; sweeps recover what notifications miss.
    #[serde(default)]
    pub subscription: Option<SubscriptionSettings>,
    /// A name (DNS name or IP address) among the subject alternative names of the client certificate the partner
    /// presents to the gateway over mutual TLS (`server.tls.client_ca_file`): a request on `/fhir` with that
    /// certificate and no API key acts as this partner.
    #[serde(default)]
    pub client_cert_name: Option<String>,
    /// Whether every transaction to it carries a `Provenance` (the agency as author, the gateway as transmitter,
    /// the transaction's resources as targets); on by default, for a server that refuses Provenance turn it off.
    #[serde(default = "default_provenance")]
    pub provenance: bool,
}

fn default_provenance() -> bool {
    true
}

/// `[partners.subscription]`: what the gateway subscribes to at a partner.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionSettings {
    /// The canonical URL of the partner's SubscriptionTopic for Task changes (`Subscription.criteria`).
    pub topic: String,
    /// Filter criteria the partner applies to the topic (`Task?requester=Organization/…`), when it needs one.
    #[serde(default)]
    pub filter: Option<String>,
    /// How often the partner is asked to send a heartbeat, in seconds (default 300). Two heartbeat periods
    /// without a word from the partner and the subscription is no longer trusted: sweeps resume at `poll_secs`.
    #[serde(default = "default_heartbeat_secs")]
    pub heartbeat_secs: u64,
}

fn default_heartbeat_secs() -> u64 {
    300
}

fn default_poll_secs() -> u64 {
    60
}

impl PartnerSettings {
    /// The name of its policy profile.
    #[must_use]
    pub fn policy_profile(&self) -> &str {
        self.policy.as_deref().unwrap_or(crate::policy::DEFAULT_PROFILE)
    }
}

/// A partner's TLS: the client certificate the gateway presents, and the CA bundle its servers are checked with.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartnerTls {
    /// PEM file of the client certificate (its chain after it); set with `client_key_file`.
    #[serde(default)]
    pub client_cert_file: Option<String>,
    /// PEM file of the client certificate's private key (unencrypted).
    #[serde(default)]
    pub client_key_file: Option<String>,
    /// PEM bundle of the CAs trusted for this partner: when set, the only ones (the public roots are not).
    #[serde(default)]
    pub ca_file: Option<String>,
}

fn default_max_transaction_entries() -> u32 {
    100
}

/// How the gateway authenticates to a partner's FHIR server (mutual TLS may come beside any of them).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum PartnerAuth {
    /// No credentials (a server on a private network, a test server).
    #[default]
    None,
    /// A static bearer token read from an environment variable (never written in the file).
    Bearer {
        /// The variable holding the token.
        token_env: String,
    },
    /// SMART Backend Services: a signed JWT assertion exchanged for an access token.
    SmartBackend {
        /// The partner's token endpoint; absent: read from `<base_url>/.well-known/smart-configuration`.
        #[serde(default)]
        token_url: Option<String>,
        /// The client id the partner registered for the gateway.
        client_id: String,
        /// PEM file of the private key that signs the assertion: RSA (RS384) or EC P-384 (ES384), PKCS#8.
        private_key_file: String,
        /// The key's id (`kid`) as registered with the partner.
        key_id: String,
        /// Scopes asked for (`system/*.write`).
        scope: String,
    },
}

/// Most entries a transaction may be configured to hold.
const MOST_TRANSACTION_ENTRIES: u32 = 1000;

/// Checks the `[[partners]]` entries, pushing one message per problem.
pub fn check(partners: &[PartnerSettings], errors: &mut Vec<String>) {
    let mut seen = std::collections::HashSet::new();
    for (i, p) in partners.iter().enumerate() {
        let at = format!("partners[{i}]");
        let plain =
            |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !plain(&p.name) || p.name.len() > 64 {
            errors.push(format!("{at}.name: use a-z, 0-9 and '-' (at most 64): records name the partner by it"));
        } else if !seen.insert(p.name.as_str()) {
            errors.push(format!("{at}.name: `{}` names another partner too", p.name));
        }
        match reqwest::Url::parse(&p.base_url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() && u.query().is_none() => {}
            _ => errors.push(format!("{at}.base_url: expected the partner's FHIR base, an http:// or https:// URL")),
        }
        if p.receives.is_empty() {
            errors.push(format!("{at}.receives: name the record kinds sent to it (e.g. [\"referral\"])"));
        }
        let mut kinds = std::collections::HashSet::new();
        for k in &p.receives {
            if RecordKind::from_name(k).is_none() {
                errors.push(format!(
                    "{at}.receives: `{k}` is not a record kind (client, assessment, care-plan, referral, consent)"
                ));
            } else if !kinds.insert(k.as_str()) {
                errors.push(format!("{at}.receives: `{k}` is named twice"));
            }
        }
        if let Some(o) = &p.overlay
            && !plain(o)
        {
            errors.push(format!("{at}.overlay: the name of a file in mappings/partners/ (a-z, 0-9, '-')"));
        }
        if p.timeout_secs == Some(0) {
            errors.push(format!("{at}.timeout_secs: must be at least 1"));
        }
        for (j, system) in p.patient_match.iter().enumerate() {
            if reqwest::Url::parse(system).is_err() {
                errors.push(format!(
                    "{at}.patient_match[{j}]: expected an identifier system URI (urn:oid:… or https://…)"
                ));
            }
        }
        if p.max_transaction_entries > MOST_TRANSACTION_ENTRIES {
            errors
                .push(format!("{at}.max_transaction_entries: at most {MOST_TRANSACTION_ENTRIES} (0: no transactions)"));
        }
        // A credential sent in clear text can be read and replayed by anyone on the path.
        if !matches!(p.auth, PartnerAuth::None)
            && reqwest::Url::parse(&p.base_url).is_ok_and(|u| !auth::is_secure_endpoint(&u))
        {
            errors.push(format!(
                "{at}.base_url: a bearer token or SMART credentials go only over https:// (http:// only on a loopback \
                 address)"
            ));
        }
        match &p.auth {
            PartnerAuth::None => {}
            PartnerAuth::Bearer { token_env } => {
                if token_env.trim().is_empty() {
                    errors.push(format!("{at}.auth.token_env: name the variable that holds the token"));
                } else if std::env::var_os(token_env).is_none_or(|v| v.is_empty()) {
                    errors.push(format!("{at}.auth.token_env: the variable {token_env} is not set"));
                }
            }
            PartnerAuth::SmartBackend { token_url, client_id, private_key_file, key_id, scope } => {
                if let Some(url) = token_url
                    && !reqwest::Url::parse(url).is_ok_and(|u| auth::is_secure_endpoint(&u))
                {
                    errors.push(format!(
                        "{at}.auth.token_url: expected an https:// URL (http:// only on a loopback address)"
                    ));
                }
                for (key, value) in [("client_id", client_id), ("key_id", key_id), ("scope", scope)] {
                    if value.trim().is_empty() {
                        errors.push(format!("{at}.auth.{key}: must not be empty"));
                    }
                }
                match std::fs::read(private_key_file) {
                    Err(e) => {
                        errors.push(format!("{at}.auth.private_key_file: {private_key_file} could not be read: {e}"))
                    }
                    Ok(pem) => {
                        if let Err(problem) = auth::AssertionKey::from_pem(&pem) {
                            errors.push(format!("{at}.auth.private_key_file: {private_key_file}: {problem}"));
                        }
                    }
                }
            }
        }
        if let Some(tls) = &p.tls {
            check_tls(tls, &at, errors);
        }
        if let Some(sub) = &p.subscription {
            if reqwest::Url::parse(&sub.topic).is_err() {
                errors.push(format!("{at}.subscription.topic: expected the canonical URL of the partner's topic"));
            }
            if sub.filter.as_deref().is_some_and(|f| !f.starts_with("Task?")) {
                errors.push(format!("{at}.subscription.filter: expected criteria on Task (Task?name=value)"));
            }
            if !(10..=86_400).contains(&sub.heartbeat_secs) {
                errors.push(format!("{at}.subscription.heartbeat_secs: between 10 and 86400"));
            }
        }
    }
}

/// Checks a partner's `tls` files, pushing one message per problem (a file whose certificate or key cannot be
/// read is not also said to mismatch).
fn check_tls(tls: &PartnerTls, at: &str, errors: &mut Vec<String>) {
    match (&tls.client_cert_file, &tls.client_key_file) {
        (Some(cert), Some(key)) => {
            let chain = auth::read_certificates(cert)
                .map_err(|problem| errors.push(format!("{at}.tls.client_cert_file: {problem}")));
            let private = auth::read_private_key(key)
                .map_err(|problem| errors.push(format!("{at}.tls.client_key_file: {problem}")));
            if let (Ok(chain), Ok(private)) = (chain, private)
                && let Err(problem) = auth::key_matches(chain, private)
            {
                errors.push(format!("{at}.tls.client_key_file: {key}: {problem} ({cert})"));
            }
        }
        (None, None) => {}
        (Some(_), None) => errors.push(format!("{at}.tls.client_key_file: {}", auth::BOTH_OR_NEITHER)),
        (None, Some(_)) => errors.push(format!("{at}.tls.client_cert_file: {}", auth::BOTH_OR_NEITHER)),
    }
    if let Some(ca) = &tls.ca_file
        && let Err(problem) = auth::read_ca_bundle(ca)
    {
        errors.push(format!("{at}.tls.ca_file: {problem}"));
    }
}

/// The configured partners, by name.
#[derive(Debug, Clone, Default)]
pub struct Partners(BTreeMap<String, PartnerSettings>);

impl Partners {
    /// The registry of the configured partners (names checked unique by [`check`]).
    #[must_use]
    pub fn new(partners: &[PartnerSettings]) -> Self {
        Partners(partners.iter().map(|p| (p.name.clone(), p.clone())).collect())
    }

    /// The partner of this name.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&PartnerSettings> {
        self.0.get(name)
    }

    /// Whether a partner of this name is configured.
    #[must_use]
    pub fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    /// Every partner, by name.
    pub fn iter(&self) -> impl Iterator<Item = &PartnerSettings> {
        self.0.values()
    }

    /// A message per partner whose overlay file the mappings do not have.
    #[must_use]
    pub fn missing_overlays(&self, mappings: &crate::mapping::Mappings) -> Vec<String> {
        let have: std::collections::HashSet<&str> = mappings.partners().collect();
        self.0
            .values()
            .filter_map(|p| {
                let overlay = p.overlay.as_deref()?;
                (!have.contains(overlay)).then(|| {
                    format!(
                        "partner `{}`: overlay `{overlay}` is not in {}/partners/ (add {overlay}.toml, or leave \
                         `overlay` out for the base mappings)",
                        p.name,
                        mappings.dir.display()
                    )
                })
            })
            .collect()
    }

    /// The overlay a partner's records are mapped with (`Some(None)`: the base mappings); `None` when no such
    /// partner is configured.
    #[must_use]
    pub fn overlay_of(&self, name: &str) -> Option<Option<&str>> {
        self.0.get(name).map(|p| p.overlay.as_deref())
    }

    /// The partners that receive records of `kind`.
    pub fn receiving(&self, kind: RecordKind) -> impl Iterator<Item = &PartnerSettings> {
        self.0.values().filter(move |p| p.receives.iter().any(|k| k == kind.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partner(toml: &str) -> PartnerSettings {
        toml::from_str(toml).expect("parses")
    }

    #[test]
    fn the_documented_entry_parses_and_passes() {
        let p = partner(
            r#"name = "st-marys-ehr"
               base_url = "https://fhir.stmarys.example/r4"
               receives = ["client", "assessment", "care-plan", "referral", "consent"]
               overlay = "st-marys-ehr"
               max_transaction_entries = 8
               auth = { type = "none" }"#,
        );
        let mut errors = Vec::new();
        check(std::slice::from_ref(&p), &mut errors);
        assert_eq!(errors, Vec::<String>::new());
        let registry = Partners::new(&[p]);
        assert_eq!(registry.receiving(RecordKind::Referral).count(), 1);
        assert!(registry.contains("st-marys-ehr") && !registry.contains("nobody"));
    }

    #[test]
    fn every_bad_key_is_named() {
        let good = "base_url = \"https://x.example/r4\"\nreceives = [\"referral\"]";
        let bad = [
            partner(&format!("name = \"St Mary's\"\n{good}")),
            partner("name = \"a\"\nbase_url = \"ftp://x\"\nreceives = [\"referral\"]"),
            partner(
                "name = \"b\"\nbase_url = \"https://x.example\"\nreceives = [\"referral\", \"letters\", \"referral\"]",
            ),
            partner(&format!("name = \"c\"\n{good}\nmax_transaction_entries = 5000")),
            partner(&format!(
                "name = \"d\"\n{good}\nauth = {{ type = \"bearer\", token_env = \"CAREBRIDGE_TEST_UNSET_TOKEN\" }}"
            )),
            partner(&format!("name = \"d\"\n{good}")),
        ];
        let mut errors = Vec::new();
        check(&bad, &mut errors);
        for needle in [
            "partners[0].name",
            "partners[1].base_url",
            "`letters` is not a record kind",
            "`referral` is named twice",
            "partners[3].max_transaction_entries",
            "CAREBRIDGE_TEST_UNSET_TOKEN is not set",
            "`d` names another partner too",
        ] {
            assert!(errors.iter().any(|e| e.contains(needle)), "{needle}: {errors:?}");
        }
    }

    #[test]
    fn an_unknown_key_or_auth_type_does_not_parse() {
        assert!(
            toml::from_str::<PartnerSettings>("name = \"a\"\nbase_url = \"https://x\"\nreceives = []\nurl = 1")
                .is_err()
        );
        assert!(
            toml::from_str::<PartnerSettings>(
                "name = \"a\"\nbase_url = \"https://x\"\nreceives = []\nauth = { type = \"magic\" }"
            )
            .is_err()
        );
    }
    /// Writes `contents` to `name` in `dir`, giving the path as configured.
    fn file(dir: &tempfile::TempDir, name: &str, contents: &str) -> String {
        let path = dir.path().join(name);
        std::fs::write(&path, contents).expect("written");
        path.display().to_string()
    }

    #[test]
    fn smart_backend_without_a_token_url_discovers_it_and_a_key_of_the_wrong_type_is_named() {
        let dir = tempfile::tempdir().expect("dir");
        let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("key").serialize_pem();
        let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key").serialize_pem();
        let entry = |name: &str, key: &str, extra: &str| {
            partner(&format!(
                "name = \"{name}\"\nbase_url = \"https://x.example/r4\"\nreceives = [\"referral\"]\n\
                 auth = {{ type = \"smart_backend\", client_id = \"cb\", private_key_file = '{key}', \
                 key_id = \"k1\", scope = \"system/*.write\"{extra} }}"
            ))
        };
        let good = entry("a", &file(&dir, "p384.pem", &p384), "");
        assert!(matches!(&good.auth, PartnerAuth::SmartBackend { token_url: None, .. }));
        let mut errors = Vec::new();
        check(&[good], &mut errors);
        assert_eq!(errors, Vec::<String>::new());
        let bad = [
            entry("b", &file(&dir, "p256.pem", &p256), ""),
            entry("c", &dir.path().join("missing.pem").display().to_string(), ""),
            entry("d", &file(&dir, "p384b.pem", &p384), ", token_url = \"http://auth.example/token\""),
        ];
        check(&bad, &mut errors);
        for needle in [
            "partners[0].auth.private_key_file: ",
            "not on curve P-384",
            "partners[1].auth.private_key_file: ",
            "could not be read",
            "partners[2].auth.token_url: expected an https:// URL",
        ] {
            assert!(errors.iter().any(|e| e.contains(needle)), "{needle}: {errors:?}");
        }
        assert_eq!(errors.len(), 3, "one message per problem: {errors:?}");
    }

    #[test]
    fn every_unusable_tls_file_is_named_once() {
        let dir = tempfile::tempdir().expect("dir");
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let cert = rcgen::CertificateParams::new(vec!["carebridge.example".into()])
            .expect("params")
            .self_signed(&key)
            .expect("cert")
            .pem();
        let cert_file = file(&dir, "cert.pem", &cert);
        let key_file = file(&dir, "key.pem", &key.serialize_pem());
        let other_file = file(&dir, "other.pem", &other.serialize_pem());
        let missing = dir.path().join("missing.pem").display().to_string();
        let entry = |name: &str, tls: &str| {
            partner(&format!(
                "name = \"{name}\"\nbase_url = \"https://x.example/r4\"\nreceives = [\"referral\"]\ntls = {{ {tls} }}"
            ))
        };
        let good = entry(
            "a",
            &format!("client_cert_file = '{cert_file}', client_key_file = '{key_file}', ca_file = '{cert_file}'"),
        );
        let mut errors = Vec::new();
        check(&[good], &mut errors);
        assert_eq!(errors, Vec::<String>::new());
        let bad = [
            entry("b", &format!("client_cert_file = '{cert_file}', client_key_file = '{other_file}'")),
            entry("c", &format!("client_cert_file = '{missing}', client_key_file = '{cert_file}'")),
            entry("d", &format!("client_cert_file = '{cert_file}'")),
            entry("e", &format!("ca_file = '{key_file}'")),
        ];
        check(&bad, &mut errors);
        for needle in [
            "partners[0].tls.client_key_file: ",
            "does not match the client certificate",
            "partners[1].tls.client_cert_file: ",
            "could not be read",
            "partners[1].tls.client_key_file: ",
            "holds no private key",
            "partners[2].tls.client_key_file: client_cert_file and client_key_file go together",
            "partners[3].tls.ca_file: ",
            "holds no certificate",
        ] {
            assert!(errors.iter().any(|e| e.contains(needle)), "{needle}: {errors:?}");
        }
        assert_eq!(errors.len(), 5, "one message per problem: {errors:?}");
        assert!(toml::from_str::<PartnerTls>("client_cert = 'x'").is_err(), "a typo is an error");
    }
}
