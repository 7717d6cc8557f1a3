//! Durable storage of agency records: every write is one transaction holding the record, its version-history row
//! and its audit entry, so an answer given is a record kept.
//!
//! [`Store`] offers whole use cases; [`sql::SqlStore`] implements them on SQLite (embedded default, WAL, one
//! writer connection) and PostgreSQL (several replicas), chosen by the database URL in [`connect`].

mod audit;
mod catalog;
pub(crate) mod catalog_sql;
pub(crate) mod followup;
mod group_commit;
pub mod outbox;
mod sql;
mod sync_jobs;

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::domain::{RecordId, RecordKind};

pub use audit::{AuditChain, AuditQuery};
pub use catalog::{Catalog, CatalogChange, CatalogListing, DirectorySyncState, Listed};
pub use followup::{Followup, Notified, NotifiedOutcome, SubscriptionRow, SweepClaim};
pub use outbox::{AttemptRow, CrosswalkEntry, DeliveryFilter, DeliveryRow, Outbox, QueueDepth, Settle, Settlement};
pub use sql::{SqlStore, connect};
pub use sync_jobs::{ABANDONED, Begun, NewSyncJob, SyncJobEnd, SyncJobRow, SyncJobs};

/// Failures of the store itself, or a write refused for its precondition.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The caller's precondition (`If-Match`, `If-None-Match`, or the version it read) no longer holds.
    #[error("precondition failed: the record is at version {current:?}")]
    PreconditionFailed {
        /// The version the record is at now; `None` when it does not exist.
        current: Option<i64>,
    },
    /// The database refused or could not be reached.
    #[error("database error")]
    Database(#[from] sqlx::Error),
    /// Schema migrations could not be applied.
    #[error("database migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database URL names no backend we support.
    #[error("unsupported database URL: expected sqlite:… or postgres://…")]
    UnsupportedUrl,
    /// A kept catalog document no longer parses, or a service could not be encoded.
    #[error("catalog document does not parse")]
    CorruptCatalog(#[source] serde_json::Error),
    /// A kept row holds a value this build cannot read (a kind, an id).
    #[error("a stored row does not parse: {0}")]
    Corrupt(String),
    /// The SQLite writer thread is gone (it stops only when the store is dropped, or failed to start).
    #[error("the database writer has stopped")]
    WriterStopped,
    /// The in-memory directory search index failed (tantivy, or its build task).
    #[error("directory search index: {0}")]
    Index(String),
    /// Migrations this binary expects are not applied.
    #[error("database schema is at migration {applied:?}; this build needs {expected}")]
    NotMigrated {
        /// Newest migration applied.
        applied: Option<i64>,
        /// Newest migration this build knows.
        expected: i64,
    },
}

/// What a write expects of the record before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// Create or replace, whatever is there.
    None,
    /// Only create: the record must not exist (`If-None-Match: *`).
    Absent,
    /// Only replace, whatever the version (`If-Match: *`).
    Exists,
    /// Only replace this version (`If-Match`, or the version a read-modify-write started from).
    Version(i64),
}

/// How a record changed, kept in its version history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Created or replaced by a `PUT`.
    Put,
    /// A referral's status moved through the status endpoint.
    StatusChanged,
    /// A partner's referral linked to the client it is for (`POST /api/v1/referrals/{id}/link`).
    Linked,
    /// Loaded from the demo seed directory at start.
    Seeded,
}

impl Change {
    /// The name stored in the history and audit tables.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Put => "put",
            Change::StatusChanged => "status_changed",
            Change::Linked => "linked",
            Change::Seeded => "seeded",
        }
    }
}

/// A validated record ready to be kept.
#[derive(Debug, Clone)]
pub struct RecordWrite {
    /// Its kind.
    pub kind: RecordKind,
    /// Its agency id.
    pub id: RecordId,
    /// Canonical JSON of the record.
    pub body: String,
    /// The client it belongs to, for filtering.
    pub client_id: Option<RecordId>,
    /// Its status code, for filtering.
    pub status: Option<&'static str>,
    /// Its direction (`outbound`, `inbound`) for kinds that have one (referrals), for filtering.
    pub direction: Option<&'static str>,
    /// The identifiers it is found by (`system`, `value`: a client's), replacing those of its earlier version.
    pub keys: Vec<(String, String)>,
    /// What kind of change this is.
    pub change: Change,
    /// The partners this version goes to: one outbox row each, in the write's transaction (none when the write
    /// changes nothing).
    pub deliver_to: Vec<String>,
    /// What a partner holds of this record, kept in the same transaction (an inbound referral: the partner's own
    /// Task, ServiceRequest and Patient).
    pub crosswalk: Vec<CrosswalkEntry>,
    /// Whether the client's held deliveries are decided again at once (a new consent or referral may give a
    /// partner the grounds it lacked): the egress policy says which writes do.
    pub reopens_held: bool,
}

impl RecordWrite {
    /// The client whose record this is: the client itself for a client record.
    #[must_use]
    pub fn client(&self) -> Option<&RecordId> {
        match self.kind {
            RecordKind::Client => Some(&self.id),
            _ => self.client_id.as_ref(),
        }
    }
}

/// Who made a change, and in which request.
#[derive(Debug, Clone)]
pub struct Actor {
    /// Name of the API key used.
    pub key_name: String,
    /// Request id of the call that made it.
    pub request_id: String,
    /// The partner on whose word the change was made (a hospital moving a referral's status), if any; the key
    /// or worker that carried it is `key_name`.
    pub partner: Option<String>,
}

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveOutcome {
    /// A new record, at version 1.
    Created(RecordMeta),
    /// A new version of an existing record.
    Replaced(RecordMeta),
    /// The body was identical to the current version: nothing changed (the write is idempotent).
    Unchanged(RecordMeta),
}

impl SaveOutcome {
    /// The record's version and time after the write.
    #[must_use]
    pub fn meta(self) -> RecordMeta {
        match self {
            SaveOutcome::Created(m) | SaveOutcome::Replaced(m) | SaveOutcome::Unchanged(m) => m,
        }
    }
}

/// Version and last change time of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordMeta {
    /// Version number, from 1.
    pub version: i64,
    /// When the current version was written.
    pub updated_at: OffsetDateTime,
}

/// A record as stored.
#[derive(Debug, Clone)]
pub struct StoredRecord {
    /// Its agency id.
    pub id: String,
    /// Version and time.
    pub meta: RecordMeta,
    /// Canonical JSON body.
    pub body: String,
}

/// Filters and position of a list request.
#[derive(Debug, Clone)]
pub struct ListQuery {
    /// The kind listed.
    pub kind: RecordKind,
    /// Only records of this client.
    pub client_id: Option<RecordId>,
    /// Only records with this status code.
    pub status: Option<String>,
    /// Only referrals going this way (`outbound`, `inbound`).
    pub direction: Option<&'static str>,
    /// Only records changed at or after this instant.
    pub updated_since: Option<OffsetDateTime>,
    /// Only records whose id sorts after this one (the cursor).
    pub after: Option<String>,
    /// At most this many records.
    pub limit: u32,
}

/// Every current record of `kind` of one client, every page.
///
/// # Errors
/// When the store fails.
pub async fn all_of_client(
    store: &dyn Store,
    kind: RecordKind,
    client: &RecordId,
) -> Result<Vec<StoredRecord>, StoreError> {
    let mut query = ListQuery {
        kind,
        client_id: Some(client.clone()),
        status: None,
        direction: None,
        updated_since: None,
        after: None,
        limit: 200,
    };
    let mut out = Vec::new();
    loop {
        let page = store.list_records(&query).await?;
        out.extend(page.items);
        match page.next_after {
            Some(after) => query.after = Some(after),
            None => return Ok(out),
        }
    }
}

/// One page of a list, in id order.
#[derive(Debug, Clone)]
pub struct Page {
    /// The records.
    pub items: Vec<StoredRecord>,
    /// Id to continue after, when more records may follow.
    pub next_after: Option<String>,
}

/// One entry of a record's version history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    /// Version number.
    pub version: i64,
    /// What kind of change made it.
    pub change: String,
    /// When.
    pub changed_at: OffsetDateTime,
    /// Name of the API key used.
    pub changed_by: String,
    /// Request id of the call.
    pub request_id: String,
    /// The partner that made the change (through its key on `/fhir`, or on its own server), if one did.
    pub partner: Option<String>,
    /// The record as this version left it (canonical JSON).
    pub body: String,
}

/// Connection-pool gauges for `/metrics`.
#[derive(Debug, Clone, Copy)]
pub struct PoolStats {
    /// `writer` or `reader`.
    pub pool: &'static str,
    /// Open connections.
    pub size: u32,
    /// Idle connections.
    pub idle: u32,
}

/// The gateway's durable state, as whole use cases (agency records here, the service catalog in [`Catalog`],
/// directory sync jobs and their leases in [`SyncJobs`]).
#[async_trait]
pub trait Store: Catalog + SyncJobs + Outbox + Followup + AuditChain + Send + Sync + 'static {
    /// `sqlite` or `postgres`.
    fn backend(&self) -> &'static str;

    /// Keeps a record: the record, its history row and its audit entry in one transaction, committed before it
    /// returns. An identical body is a no-op (`Unchanged`) and still audited.
    ///
    /// # Errors
    /// `PreconditionFailed` when `pre` does not hold; `Database` when the write could not be made durable.
    async fn save_record(
        &self,
        write: &RecordWrite,
        pre: Precondition,
        actor: &Actor,
        now: OffsetDateTime,
    ) -> Result<SaveOutcome, StoreError>;

    /// The current version of a record.
    ///
    /// # Errors
    /// `Database` when it could not be read.
    async fn get_record(&self, kind: RecordKind, id: &RecordId) -> Result<Option<StoredRecord>, StoreError>;

    /// One past version of a record.
    ///
    /// # Errors
    /// `Database` when it could not be read.
    async fn get_version(
        &self,
        kind: RecordKind,
        id: &RecordId,
        version: i64,
    ) -> Result<Option<StoredRecord>, StoreError>;

    /// A page of records matching the query, in id order.
    ///
    /// # Errors
    /// `Database` when they could not be read.
    async fn list_records(&self, query: &ListQuery) -> Result<Page, StoreError>;

    /// Version `version` of a record and, in the same read, the current records of `kinds` (at most five) of
    /// `client`: what a delivery's policy and mapping read beside the version owed, in one round trip.
    ///
    /// # Errors
    /// `Database` when they could not be read.
    async fn version_and_client_records(
        &self,
        kind: RecordKind,
        id: &RecordId,
        version: i64,
        client: Option<&RecordId>,
        kinds: &[RecordKind],
    ) -> Result<(Option<StoredRecord>, Vec<(RecordKind, StoredRecord)>), StoreError>;

    /// Every version of a record, oldest first (empty when it does not exist).
    ///
    /// # Errors
    /// `Database` when it could not be read.
    async fn history(&self, kind: RecordKind, id: &RecordId) -> Result<Vec<VersionInfo>, StoreError>;

    /// The ids of the current records of `kind` found by identifier `system|value`.
    ///
    /// # Errors
    /// `Database`.
    async fn find_by_key(&self, kind: RecordKind, system: &str, value: &str) -> Result<Vec<String>, StoreError>;

    /// Whether the database answers and carries every migration this build needs.
    ///
    /// # Errors
    /// `Database` or `NotMigrated`.
    async fn readiness(&self) -> Result<(), StoreError>;

    /// Pool gauges.
    fn pool_stats(&self) -> Vec<PoolStats>;

    /// Closes the pools, waiting for connections in use to come back.
    async fn close(&self);
}

/// Microseconds since the Unix epoch, as stored.
#[must_use]
pub fn to_micros(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000).unwrap_or(i64::MAX)
}

/// The instant of a stored microsecond count.
#[must_use]
pub fn from_micros(us: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1_000).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}
