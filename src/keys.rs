//! API keys: salted SHA-256 hashes as the configuration keeps them, new keys, and the ring of configured keys
//! that turns a presented key into a [`Caller`] with its scopes. The HTTP middleware that reads the
//! `Authorization` header is `http::auth`; configuration checks use this module without depending on HTTP.
//!
//! Keys are long random strings (`carebridge keys generate` makes 32 random bytes), so one salted SHA-256 is
//! enough to keep a leaked configuration from revealing them; a slow password hash would only slow every request.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{ApiKeySettings, Scope};

/// Bytes of salt in a generated hash.
const SALT_LEN: usize = 16;

/// A salted SHA-256 of an API key: `sha256:<salt hex>:<digest hex>`.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyHash {
    salt: Vec<u8>,
    digest: [u8; 32],
}

impl KeyHash {
    /// Parses the configuration form.
    ///
    /// # Errors
    /// A sentence naming what is malformed.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut parts = s.split(':');
        let (Some("sha256"), Some(salt), Some(digest), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("expected sha256:<salt hex>:<digest hex> (make one with `carebridge keys generate`)".into());
        };
        let salt = hex::decode(salt).map_err(|_| "the salt is not hexadecimal".to_owned())?;
        if salt.len() < 8 {
            return Err("the salt must be at least 8 bytes".into());
        }
        let digest = hex::decode(digest)
            .ok()
            .and_then(|d| <[u8; 32]>::try_from(d).ok())
            .ok_or_else(|| "the digest must be 32 bytes of hexadecimal".to_owned())?;
        Ok(KeyHash { salt, digest })
    }

    /// Hashes `key` with a fresh random salt.
    ///
    /// # Errors
    /// When the operating system has no randomness to give.
    pub fn generate(key: &str) -> Result<Self, getrandom::Error> {
        let mut salt = vec![0; SALT_LEN];
        getrandom::fill(&mut salt)?;
        let digest = digest(&salt, key);
        Ok(KeyHash { salt, digest })
    }

    /// Whether `key` is the key this hash was made from (constant time in the digest comparison).
    #[must_use]
    pub fn matches(&self, key: &str) -> bool {
        digest(&self.salt, key).ct_eq(&self.digest).into()
    }
}

fn digest(salt: &[u8], key: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(key.as_bytes());
    h.finalize().into()
}

impl fmt::Display for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}:{}", hex::encode(&self.salt), hex::encode(self.digest))
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyHash([redacted])")
    }
}

/// Makes a new random API key (32 random bytes, hex).
///
/// # Errors
/// When the operating system has no randomness to give.
pub fn new_key() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(format!("cbk_{}", hex::encode(bytes)))
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The key's configured name.
    pub name: Arc<str>,
    /// The partner the key acts as (`/fhir` only), if it is a partner's key.
    pub partner: Option<Arc<str>>,
    scopes: HashSet<Scope>,
}

impl Caller {
    /// Whether the key may use `scope`.
    #[must_use]
    pub fn may(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }
}

/// Every configured key.
#[derive(Debug, Default)]
pub struct KeyRing {
    keys: Vec<(KeyHash, Caller)>,
    /// Partners known by their client certificate: (partner, a name in the certificate).
    certified: Vec<(String, String)>,
}

impl KeyRing {
    /// The keys of the configuration (already checked at load; malformed entries are skipped).
    #[must_use]
    pub fn from_settings(settings: &[ApiKeySettings]) -> Self {
        let keys = settings
            .iter()
            .filter_map(|k| {
                let hash = KeyHash::parse(&k.hash).ok()?;
                Some((
                    hash,
                    Caller {
                        name: Arc::from(k.name.as_str()),
                        partner: k.partner.as_deref().map(Arc::from),
                        scopes: k.scopes.iter().copied().collect(),
                    },
                ))
            })
            .collect();
        KeyRing { keys, certified: Vec::new() }
    }

    /// The caller holding `key`, if any.
    #[must_use]
    pub fn authenticate(&self, key: &str) -> Option<Caller> {
        self.keys.iter().find(|(hash, _)| hash.matches(key)).map(|(_, caller)| caller.clone())
    }

    /// The same ring, knowing the partners that mutual TLS identifies: (partner, name in its certificate).
    #[must_use]
    pub fn with_certified_partners(mut self, partners: Vec<(String, String)>) -> Self {
        self.certified = partners;
        self
    }

    /// The partner whose client certificate `der` is (verified by the handshake; matched on the names
    /// configured), as a caller: `cert:<partner>`, reading and writing on `/fhir` as that partner.
    #[must_use]
    pub fn authenticate_certificate(&self, der: &rustls::pki_types::CertificateDer<'_>) -> Option<Caller> {
        let (partner, _) = self.certified.iter().find(|(_, name)| crate::tls::certificate_names(der, name))?;
        Some(Caller {
            name: Arc::from(format!("cert:{partner}").as_str()),
            partner: Some(Arc::from(partner.as_str())),
            scopes: [Scope::Read, Scope::Write].into_iter().collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_hash_matches_its_key_only_and_survives_its_text_form() {
        let hash = KeyHash::generate("demo-agency-key").expect("randomness");
        let parsed = KeyHash::parse(&hash.to_string()).expect("parses");
        assert!(parsed.matches("demo-agency-key"));
        assert!(!parsed.matches("demo-agency-kez"));
        assert!(!parsed.matches(""));
    }

    #[test]
    fn the_same_key_hashes_differently_with_another_salt() {
        let a = KeyHash::generate("k").expect("randomness");
        let b = KeyHash::generate("k").expect("randomness");
        assert_ne!(a.to_string(), b.to_string());
    }

    #[test]
    fn malformed_hashes_are_refused() {
        for bad in ["", "sha256:00", "md5:0011223344556677:00", "sha256:zz:00", "sha256:0011223344556677:abcd"] {
            assert!(KeyHash::parse(bad).is_err(), "{bad}");
        }
    }
}
