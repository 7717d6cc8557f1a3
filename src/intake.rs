//! Intake of agency records: validate, then keep durably with history and audit (one transaction per record).
//!
//! Every write path of the internal API, and the demo seed, comes through here, so the rules are the same
//! whoever writes: the body must be valid, its id must match the path, and a referral's status only moves
//! through [`change_referral_status`].

use std::path::{Path, PathBuf};

use time::OffsetDateTime;

use crate::domain::{
    AgencyRecord, Assessment, CarePlan, Client, Consent, FieldError, IllegalMove, Party, RecordId, RecordKind,
    Referral, StatusChange, Timestamp, Validator,
};
use crate::partners::Partners;
use crate::store::{Actor, Change, Precondition, RecordWrite, SaveOutcome, Store, StoreError};

/// How often a read-check-write cycle is repeated when another writer changes the record in between.
const CONFLICT_ATTEMPTS: usize = 3;

/// Why a record was not kept.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    /// The record breaks rules its type cannot express.
    #[error("the record is invalid")]
    Invalid(Vec<FieldError>),
    /// The body names another id than the path.
    #[error("the id in the body differs from the id in the path")]
    IdMismatch,
    /// A `PUT` tried to change a status that has its own endpoint.
    #[error("the status changes only through the status endpoint")]
    StatusChangeNotAllowed {
        /// Status the record has.
        current: String,
        /// Status the request asked for.
        requested: String,
    },
    /// The state machine does not let this caller make this status move.
    #[error("illegal status move")]
    IllegalMove(IllegalMove),
    /// No record with this id.
    #[error("no such record")]
    NotFound,
    /// `If-Match` / `If-None-Match` does not hold.
    #[error("precondition failed")]
    PreconditionFailed {
        /// The version the record is at, if it exists.
        current: Option<i64>,
    },
    /// A stored body no longer parses as its kind: the database was changed behind our back.
    #[error("stored {kind} record does not parse")]
    Corrupt {
        /// Its kind.
        kind: RecordKind,
        /// The parse error (it names fields, never values).
        source: serde_json::Error,
    },
    /// A record could not be written as JSON (our types always can: this is a bug, never bad input).
    #[error("{kind} record does not serialise")]
    Encode {
        /// Its kind.
        kind: RecordKind,
        /// The serialisation error.
        source: serde_json::Error,
    },
    /// The store failed.
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for IntakeError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::PreconditionFailed { current } => IntakeError::PreconditionFailed { current },
            other => IntakeError::Store(other),
        }
    }
}

/// A record as kept: what the write did, and the canonical body now stored.
#[derive(Debug)]
pub struct Saved {
    /// Created, replaced, or unchanged, with version and time.
    pub outcome: SaveOutcome,
    /// The body as stored (canonical JSON).
    pub body: String,
}

/// Refuses a record that names a partner the configuration does not know (a referral to it could never be
/// delivered, a consent to it never applied).
///
/// # Errors
/// `Invalid`, naming the field.
pub fn check_partner<T: AgencyRecord>(record: &T, partners: &Partners) -> Result<(), IntakeError> {
    match record.partner() {
        Some((path, name)) if !partners.contains(name.as_str()) => Err(IntakeError::Invalid(vec![FieldError {
            path: path.into(),
            detail: "no partner of this name is configured ([[partners]] in the gateway's configuration)".into(),
        }])),
        _ => Ok(()),
    }
}

/// Refuses a record of a client the gateway does not hold, or one citing a record of another client (or, where the
/// citation must already exist, one that does not): a need's or a progress note's assessment, a referral's care
/// plan, an intervention's referral.
///
/// # Errors
/// `Invalid`, naming each field; `Store` when the store fails.
pub async fn check_links<T: AgencyRecord>(record: &T, store: &dyn Store) -> Result<(), IntakeError> {
    let mut errors = Vec::new();
    if T::KIND != RecordKind::Client
        && let Some(client) = record.client_id()
        && store.get_record(RecordKind::Client, client).await?.is_none()
    {
        errors.push(FieldError {
            path: "$.client_id".into(),
            detail: "no client of this id is held: write the client first".into(),
        });
    }
    // Each cited record is read once, however often it is cited (a plan's progress notes cite few assessments).
    let mut owners: std::collections::HashMap<(RecordKind, RecordId), Option<Option<String>>> =
        std::collections::HashMap::new();
    for c in record.citations() {
        let key = (c.kind, c.id.clone());
        let owner = match owners.get(&key) {
            Some(o) => o.clone(),
            None => {
                let o = store.get_record(c.kind, &c.id).await?.map(|stored| {
                    serde_json::from_str::<serde_json::Value>(&stored.body)
                        .ok()
                        .and_then(|v| v.get("client_id").and_then(serde_json::Value::as_str).map(str::to_owned))
                });
                owners.insert(key, o.clone());
                o
            }
        };
        match owner {
            None if c.must_exist => {
                errors.push(FieldError { path: c.path, detail: format!("no {} of this id is held", c.kind) });
            }
            None => {}
            Some(theirs) if theirs.as_deref() != record.client_id().map(RecordId::as_str) => {
                errors.push(FieldError { path: c.path, detail: format!("this {} is another client's", c.kind) });
            }
            Some(_) => {}
        }
    }
    if errors.is_empty() { Ok(()) } else { Err(IntakeError::Invalid(errors)) }
}

/// Where intake keeps records, and the partners their new versions are owed to.
#[derive(Clone, Copy)]
pub struct Intake<'a> {
    /// The store.
    pub store: &'a dyn Store,
    /// The configured partners.
    pub partners: &'a Partners,
}

/// Validates `record` and keeps it under `id`.
///
/// # Errors
/// `Invalid` or `IdMismatch` for a bad record, `StatusChangeNotAllowed` for a referral `PUT` that moves the
/// status, `PreconditionFailed` when `pre` does not hold, `Store` when the database fails.
pub async fn put<T: AgencyRecord>(
    intake: Intake<'_>,
    id: RecordId,
    record: T,
    pre: Precondition,
    actor: &Actor,
    change: Change,
    now: OffsetDateTime,
) -> Result<Saved, IntakeError> {
    put_holding(intake, id, record, pre, actor, change, now, Vec::new()).await
}

/// [`put`], keeping `crosswalk` (what a partner holds of the record: an inbound referral's own resources there) in
/// the same transaction.
///
/// # Errors
/// As [`put`].
#[allow(clippy::too_many_arguments)]
pub async fn put_holding<T: AgencyRecord>(
    intake: Intake<'_>,
    id: RecordId,
    mut record: T,
    pre: Precondition,
    actor: &Actor,
    change: Change,
    now: OffsetDateTime,
    crosswalk: Vec<crate::store::CrosswalkEntry>,
) -> Result<Saved, IntakeError> {
    if record.body_id().is_some_and(|b| *b != id) {
        return Err(IntakeError::IdMismatch);
    }
    let mut v = Validator::new();
    record.validate(&mut v);
    v.finish().map_err(IntakeError::Invalid)?;
    record.set_id(id.clone());
    check_links(&record, intake.store).await?;
    let body = canonical(&record)?;
    let store = intake.store;
    let mut deliver_to = crate::policy::recipients(&record, intake.partners);
    // What a partner wrote itself (a referral it sent in) is not sent back to it.
    if let Some(mover) = &actor.partner {
        deliver_to.retain(|p| p != mover);
    }

    if !T::STATUS_HAS_ITS_OWN_ENDPOINT {
        let mut write = record_write(&record, &id, body, change, deliver_to);
        write.crosswalk = crosswalk;
        let outcome = store.save_record(&write, pre, actor, now).await?;
        return Ok(Saved { outcome, body: write.body });
    }
    // The status may not move here: read the current one, and write only over exactly the version we checked, so a
    // status change that lands in between makes this write fail instead of undoing it.
    for attempt in 1..=CONFLICT_ATTEMPTS {
        let checked = match (load::<T>(store, &id).await?, pre) {
            (None, Precondition::None | Precondition::Absent) => {
                let mut v = Validator::new();
                record.check_new(&mut v);
                v.finish().map_err(IntakeError::Invalid)?;
                Precondition::Absent
            }
            (None, Precondition::Exists | Precondition::Version(_)) => {
                return Err(IntakeError::PreconditionFailed { current: None });
            }
            (Some((_, version)), Precondition::Absent) => {
                return Err(IntakeError::PreconditionFailed { current: Some(version) });
            }
            (Some((_, version)), Precondition::Version(expected)) if expected != version => {
                return Err(IntakeError::PreconditionFailed { current: Some(version) });
            }
            (Some((current, version)), _) => {
                let mut v = Validator::new();
                record.check_replace(&current, &mut v);
                v.finish().map_err(IntakeError::Invalid)?;
                if current.status_code() != record.status_code() {
                    return Err(IntakeError::StatusChangeNotAllowed {
                        current: current.status_code().unwrap_or("none").to_owned(),
                        requested: record.status_code().unwrap_or("none").to_owned(),
                    });
                }
                Precondition::Version(version)
            }
        };
        let mut write = record_write(&record, &id, body.clone(), change, deliver_to.clone());
        write.crosswalk.clone_from(&crosswalk);
        match store.save_record(&write, checked, actor, now).await {
            Err(StoreError::PreconditionFailed { .. }) if retryable(pre) && attempt < CONFLICT_ATTEMPTS => {}
            result => return Ok(Saved { outcome: result?, body }),
        }
    }
    Err(IntakeError::PreconditionFailed { current: None })
}

/// Moves a referral to a new status, as `by` asks, through the state machine ([`Referral::move_status`]).
///
/// # Errors
/// `Invalid` for a change without a required reason, `IllegalMove` for a move the state machine does not give
/// `by`, `NotFound`, `PreconditionFailed`, `Store`.
pub async fn change_referral_status(
    intake: Intake<'_>,
    id: &RecordId,
    change: &StatusChange,
    by: Party<'_>,
    pre: Precondition,
    actor: &Actor,
    now: OffsetDateTime,
) -> Result<Saved, IntakeError> {
    let mut v = Validator::new();
    change.validate(&mut v);
    v.finish().map_err(IntakeError::Invalid)?;
    let store = intake.store;
    for attempt in 1..=CONFLICT_ATTEMPTS {
        let (mut referral, version) = load::<Referral>(store, id).await?.ok_or(IntakeError::NotFound)?;
        if let Precondition::Version(expected) = pre
            && expected != version
        {
            return Err(IntakeError::PreconditionFailed { current: Some(version) });
        }
        referral.move_status(change, by, Timestamp(now)).map_err(IntakeError::IllegalMove)?;
        let body = canonical(&referral)?;
        // A partner's own move is already on its server: it is owed to the others only (no echo back to it).
        let mut deliver_to = crate::policy::recipients(&referral, intake.partners);
        if let Party::Partner(mover) = by {
            deliver_to.retain(|p| p != mover);
        }
        let write = record_write(&referral, id, body.clone(), Change::StatusChanged, deliver_to);
        match store.save_record(&write, Precondition::Version(version), actor, now).await {
            Err(StoreError::PreconditionFailed { .. }) if retryable(pre) && attempt < CONFLICT_ATTEMPTS => {}
            result => {
                return Ok(Saved { outcome: result?, body });
            }
        }
    }
    Err(IntakeError::PreconditionFailed { current: None })
}

/// Links a partner's referral that waits for it to `client`, one of its `client_candidates` (see
/// [`Referral::link`]); the referral is then the agency's to take on.
///
/// # Errors
/// `NotFound`; `Invalid` at `$.client_id` when nothing waits or `client` is not a candidate;
/// `PreconditionFailed`; `Store`.
pub async fn link_referral(
    intake: Intake<'_>,
    id: &RecordId,
    client: &RecordId,
    pre: Precondition,
    actor: &Actor,
    now: OffsetDateTime,
) -> Result<Saved, IntakeError> {
    let store = intake.store;
    for attempt in 1..=CONFLICT_ATTEMPTS {
        let (mut referral, version) = load::<Referral>(store, id).await?.ok_or(IntakeError::NotFound)?;
        if let Precondition::Version(expected) = pre
            && expected != version
        {
            return Err(IntakeError::PreconditionFailed { current: Some(version) });
        }
        referral
            .link(client)
            .map_err(|why| IntakeError::Invalid(vec![FieldError { path: "$.client_id".into(), detail: why }]))?;
        let body = canonical(&referral)?;
        let deliver_to = crate::policy::recipients(&referral, intake.partners);
        let write = record_write(&referral, id, body.clone(), Change::Linked, deliver_to);
        match store.save_record(&write, Precondition::Version(version), actor, now).await {
            Err(StoreError::PreconditionFailed { .. }) if retryable(pre) && attempt < CONFLICT_ATTEMPTS => {}
            result => return Ok(Saved { outcome: result?, body }),
        }
    }
    Err(IntakeError::PreconditionFailed { current: None })
}

/// Whether a conflict with another writer may be resolved by reading again: only when the caller did not pin a
/// version or demand absence.
fn retryable(pre: Precondition) -> bool {
    matches!(pre, Precondition::None | Precondition::Exists)
}

async fn load<T: AgencyRecord>(store: &dyn Store, id: &RecordId) -> Result<Option<(T, i64)>, IntakeError> {
    let Some(stored) = store.get_record(T::KIND, id).await? else {
        return Ok(None);
    };
    let record = serde_json::from_str(&stored.body).map_err(|source| IntakeError::Corrupt { kind: T::KIND, source })?;
    Ok(Some((record, stored.meta.version)))
}

fn record_write<T: AgencyRecord>(
    record: &T,
    id: &RecordId,
    body: String,
    change: Change,
    deliver_to: Vec<String>,
) -> RecordWrite {
    RecordWrite {
        kind: T::KIND,
        id: id.clone(),
        body,
        client_id: record.client_id().cloned(),
        status: record.status_code(),
        direction: record.direction_code(),
        keys: record.lookup_keys(),
        change,
        deliver_to,
        crosswalk: Vec::new(),
        reopens_held: crate::policy::reopens_held(T::KIND),
    }
}

/// The stored form of a record: serde's field order, absent options left out.
fn canonical<T: AgencyRecord>(record: &T) -> Result<String, IntakeError> {
    serde_json::to_string(record).map_err(|source| IntakeError::Encode { kind: T::KIND, source })
}

/// What loading a seed directory did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SeedReport {
    /// Records created.
    pub created: usize,
    /// Records that already existed and were left as they are (they may have changed since the seed).
    pub kept: usize,
}

/// Why a seed directory could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file is not a valid record of its kind.
    #[error("{path}: {detail}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Keeping a record failed.
    #[error("{path}: {source}")]
    Intake {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: IntakeError,
    },
}

/// Loads `dir/<kind>/<id>.json` for every kind through the same intake as the API (so fixtures obey the same
/// rules). Only missing records are created: what the API changed since an earlier start is left alone.
///
/// # Errors
/// The first file that cannot be read, parsed or kept.
pub async fn seed(
    store: &dyn Store,
    partners: &Partners,
    dir: &Path,
    now: OffsetDateTime,
) -> Result<SeedReport, SeedError> {
    let mut report = SeedReport::default();
    for kind in RecordKind::ALL {
        let kind_dir = dir.join(kind.as_str());
        if !kind_dir.is_dir() {
            continue;
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(&kind_dir)
            .map_err(|source| SeedError::Io { path: kind_dir.clone(), source })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        for path in files {
            if seed_file(store, partners, kind, &path, now).await? {
                report.created += 1;
            } else {
                report.kept += 1;
            }
        }
    }
    Ok(report)
}

/// Creates the record of one seed file; `false` when it already existed.
async fn seed_file(
    store: &dyn Store,
    partners: &Partners,
    kind: RecordKind,
    path: &Path,
    now: OffsetDateTime,
) -> Result<bool, SeedError> {
    let invalid = |detail: String| SeedError::Invalid { path: path.to_owned(), detail };
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
    let id = RecordId::parse(stem).map_err(|e| invalid(format!("file name is not a record id: {e}")))?;
    let text = std::fs::read_to_string(path).map_err(|source| SeedError::Io { path: path.to_owned(), source })?;
    let actor = Actor { key_name: "seed".into(), request_id: format!("seed-{}", kind.as_str()), partner: None };
    macro_rules! seed_as {
        ($t:ty) => {{
            let record: $t = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
            match check_partner(&record, partners) {
                Ok(()) => {
                    let intake = Intake { store, partners };
                    put(intake, id, record, Precondition::Absent, &actor, Change::Seeded, now).await
                }
                Err(e) => Err(e),
            }
        }};
    }
    let saved = match kind {
        RecordKind::Client => seed_as!(Client),
        RecordKind::Assessment => seed_as!(Assessment),
        RecordKind::CarePlan => seed_as!(CarePlan),
        RecordKind::Referral => seed_as!(Referral),
        RecordKind::Consent => seed_as!(Consent),
    };
    match saved {
        Ok(_) => Ok(true),
        Err(IntakeError::PreconditionFailed { .. }) => Ok(false),
        Err(source) => Err(SeedError::Intake { path: path.to_owned(), source }),
    }
}
