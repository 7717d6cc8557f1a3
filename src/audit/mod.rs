//! The audit trail: one append-only, hash-chained sequence of what the gateway did and who made it do it.
//!
//! Every entry is appended by the one appender (`SqlStore::append_audits` in `store/audit.rs`) inside the transaction of the
//! effect it records, so an effect and its entry commit together or not at all. Entries are numbered 1, 2, 3… with
//! no gaps, and each carries the SHA-256 of the one before ([`GENESIS`] for the first) and its own hash over its
//! number, its fields and that previous hash ([`seal`]). Editing an entry breaks its hash; deleting one leaves a
//! gap in the numbers and a `prev_hash` that points nowhere; inserting one breaks the link of the next. [`verify`]
//! names the first entry where the chain breaks.
//!
//! Order: entries are numbered and linked under the chain's lock, in the order they are sealed (SQLite: by the one
//! writer as it appends them; PostgreSQL: by a sealer, after their transactions committed, under an advisory lock
//! every replica takes; see `store/audit.rs`), so numbers are given only to committed entries and a reader paging
//! with `seq > cursor` never skips an entry that commits late.

pub mod event;
pub mod provenance;

use serde_json::Value;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// The `prev_hash` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What one entry says (its number and hashes are the appender's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// When, in microseconds since the epoch (as stored).
    pub at: i64,
    /// Who: the API key's name (or `outbox`, `followup`, `cli` for the gateway's own workers and its command line;
    /// `anonymous` for a caller that presented no valid key).
    pub actor: String,
    /// What was done (`created`, `replaced`, `read`, `delivered`, `delivery_replayed`, `authentication_refused`…).
    pub action: String,
    /// The kind of record it was done to, when it was done to one.
    pub kind: Option<String>,
    /// The agency id of that record.
    pub record_id: Option<String>,
    /// The record's version after it (or the version read, or delivered).
    pub version: Option<i64>,
    /// The client whose data it was, when it was a client's.
    pub client: Option<String>,
    /// The request (or worker run) it was done in.
    pub request_id: String,
    /// Facts particular to the action (a partner, resources, labels, a decision, a peer address), as compact JSON;
    /// ids and codes only, never PHI.
    pub detail: Option<String>,
}

impl Entry {
    /// An entry at `at`, about no record yet, with no detail.
    #[must_use]
    pub fn new(at: OffsetDateTime, actor: &str, action: &str, request_id: &str) -> Entry {
        Entry {
            at: crate::store::to_micros(at),
            actor: actor.to_owned(),
            action: action.to_owned(),
            kind: None,
            record_id: None,
            version: None,
            client: None,
            request_id: request_id.to_owned(),
            detail: None,
        }
    }

    /// The same entry about version `version` of record `kind`/`record_id`.
    #[must_use]
    pub fn on(mut self, kind: &str, record_id: &str, version: i64) -> Entry {
        self.kind = Some(kind.to_owned());
        self.record_id = Some(record_id.to_owned());
        self.version = Some(version);
        self
    }

    /// The same entry about `client`'s data (when known).
    #[must_use]
    pub fn of_client(mut self, client: Option<&str>) -> Entry {
        self.client = client.map(str::to_owned);
        self
    }

    /// The same entry with `detail` (compact JSON).
    #[must_use]
    pub fn with_detail(mut self, detail: &Value) -> Entry {
        self.detail = Some(detail.to_string());
        self
    }
}

/// Who read client data, through which door: the facts every read entry carries.
#[derive(Debug, Clone, Copy)]
pub struct Reader<'a> {
    /// The API key's name.
    pub actor: &'a str,
    /// The request.
    pub request_id: &'a str,
    /// The partner the key acts as, if it is a partner's.
    pub partner: Option<&'a str>,
    /// `api` (`/api/v1`) or `fhir` (`/fhir`).
    pub via: &'static str,
}

/// The entry of `reader` reading version `version` of record `kind`/`record_id` (`client`'s data) at `at`; `what`
/// names a read other than the record itself (`history`).
#[must_use]
pub fn read(
    at: OffsetDateTime,
    reader: Reader<'_>,
    kind: &str,
    record_id: &str,
    version: i64,
    client: Option<&str>,
    what: Option<&str>,
) -> Entry {
    let mut detail = serde_json::json!({"via": reader.via});
    if let Some(partner) = reader.partner {
        detail["partner"] = partner.into();
    }
    if let Some(what) = what {
        detail["what"] = what.into();
    }
    Entry::new(at, reader.actor, "read", reader.request_id)
        .on(kind, record_id, version)
        .of_client(client.or((kind == "client").then_some(record_id)))
        .with_detail(&detail)
}

/// The client a stored agency record belongs to (its `client_id`), read without parsing the rest of it.
#[must_use]
pub fn client_of(body: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Owner {
        client_id: Option<String>,
    }
    serde_json::from_str::<Owner>(body).ok().and_then(|o| o.client_id)
}

/// An entry as kept: its number, what it says, and its links.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// Its number, from 1, without gaps.
    pub seq: i64,
    /// What it says.
    pub entry: Entry,
    /// The hash of the entry before it ([`GENESIS`] for the first).
    pub prev_hash: String,
    /// Its own hash ([`seal`]).
    pub hash: String,
}

/// The hash of entry `seq` saying `entry` after `prev_hash`: SHA-256 over every field, each length-prefixed so no
/// two different entries write the same bytes, hex.
#[must_use]
pub fn seal(seq: i64, entry: &Entry, prev_hash: &str) -> String {
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    };
    field(b"carebridge-audit-v1");
    field(&seq.to_be_bytes());
    field(&entry.at.to_be_bytes());
    field(entry.actor.as_bytes());
    field(entry.action.as_bytes());
    let mut optional = |value: Option<&[u8]>| match value {
        Some(v) => {
            field(b"1");
            field(v);
        }
        None => field(b"0"),
    };
    optional(entry.kind.as_deref().map(str::as_bytes));
    optional(entry.record_id.as_deref().map(str::as_bytes));
    optional(entry.version.map(i64::to_be_bytes).as_ref().map(<[u8; 8]>::as_slice));
    optional(entry.client.as_deref().map(str::as_bytes));
    optional(Some(entry.request_id.as_bytes()));
    optional(entry.detail.as_deref().map(str::as_bytes));
    field(prev_hash.as_bytes());
    hex::encode(h.finalize())
}

/// Where the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the audit chain breaks at entry {seq}: {why}")]
pub struct Broken {
    /// The first entry that does not hold (the one after a deleted entry, an inserted one, an edited one).
    pub seq: i64,
    /// What does not hold, in words.
    pub why: String,
}

/// Checks entries read in order, continuing from `(last seq, last hash)` (`(0, GENESIS)` from the start); the
/// position reached.
///
/// # Errors
/// The first entry that breaks the chain.
pub fn verify<'a>(from: (i64, String), entries: impl IntoIterator<Item = &'a Sealed>) -> Result<(i64, String), Broken> {
    let (mut seq, mut hash) = from;
    for e in entries {
        if e.seq != seq + 1 {
            return Err(Broken {
                seq: e.seq,
                why: format!("entry {} follows entry {seq}: {} missing", e.seq, missing(seq, e.seq)),
            });
        }
        if e.prev_hash != hash {
            return Err(Broken { seq: e.seq, why: "it does not name the hash of the entry before it".into() });
        }
        if seal(e.seq, &e.entry, &e.prev_hash) != e.hash {
            return Err(Broken { seq: e.seq, why: "its content does not match its hash (edited)".into() });
        }
        seq = e.seq;
        hash.clone_from(&e.hash);
    }
    Ok((seq, hash))
}

fn missing(last: i64, next: i64) -> String {
    if next <= last {
        format!("numbers go back (entry {next} again or out of order)")
    } else if next == last + 2 {
        format!("entry {} is", last + 1)
    } else {
        format!("entries {} to {} are", last + 1, next - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: i64) -> Vec<Sealed> {
        let mut out = Vec::new();
        let mut prev = GENESIS.to_owned();
        for seq in 1..=n {
            let entry = Entry::new(OffsetDateTime::UNIX_EPOCH, "agency", "created", &format!("req-{seq}"))
                .on("client", &format!("cl-{seq}"), 1)
                .of_client(Some(&format!("cl-{seq}")));
            let hash = seal(seq, &entry, &prev);
            out.push(Sealed { seq, entry, prev_hash: prev, hash: hash.clone() });
            prev = hash;
        }
        out
    }

    #[test]
    fn an_honest_chain_verifies_and_each_tampering_is_named_where_it_is() {
        let honest = chain(5);
        assert_eq!(verify((0, GENESIS.into()), &honest).map(|(s, _)| s), Ok(5));

        let mut edited = honest.clone();
        edited[2].entry.actor = "someone-else".into();
        assert_eq!(verify((0, GENESIS.into()), &edited).unwrap_err().seq, 3);

        let mut deleted = honest.clone();
        deleted.remove(1);
        let broken = verify((0, GENESIS.into()), &deleted).unwrap_err();
        assert_eq!(broken.seq, 3);
        assert!(broken.why.contains("entry 2 is"), "{broken}");

        // An entry slipped in with the right number and link, the ones after renumbered: the next link breaks.
        let mut inserted = honest.clone();
        let mut forged = inserted[1].clone();
        forged.entry.record_id = Some("cl-forged".into());
        forged.hash = seal(forged.seq, &forged.entry, &forged.prev_hash);
        inserted[1] = forged;
        assert_eq!(verify((0, GENESIS.into()), &inserted).unwrap_err().seq, 3);

        // A detail is part of what is sealed.
        let mut detailed = honest;
        detailed[0].entry.detail = Some("{}".into());
        assert_eq!(verify((0, GENESIS.into()), &detailed).unwrap_err().seq, 1);
    }

    #[test]
    fn fields_cannot_run_into_each_other() {
        let a = Entry::new(OffsetDateTime::UNIX_EPOCH, "ab", "c", "q").on("k", "r", 1);
        let b = Entry::new(OffsetDateTime::UNIX_EPOCH, "a", "bc", "q").on("k", "r", 1);
        assert_ne!(seal(1, &a, GENESIS), seal(1, &b, GENESIS));
        // A field left out is not the same as an empty one.
        let none = Entry::new(OffsetDateTime::UNIX_EPOCH, "a", "b", "q");
        let mut empty = none.clone();
        empty.client = Some(String::new());
        assert_ne!(seal(1, &none, GENESIS), seal(1, &empty, GENESIS));
    }
}
