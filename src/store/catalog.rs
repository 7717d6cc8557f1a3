//! The service catalog's part of the store: directory services normalised into organisations, locations,
//! taxonomy terms and languages, searchable by text (SQLite FTS5 / PostgreSQL full text), place and filters.

use async_trait::async_trait;
use serde_json::Value;
use time::OffsetDateTime;

use super::StoreError;
use crate::directories::{CatalogService, ServiceHit, ServiceQuery, Upserted};

/// A service as the catalog changed it: its change number, id, kept document and whether it is active.
#[derive(Debug, Clone)]
pub struct CatalogChange {
    /// The change that last touched it.
    pub seq: i64,
    /// Gateway id.
    pub id: String,
    /// The kept [`CatalogService`] as JSON.
    pub doc: String,
    /// Whether its source still offers it.
    pub active: bool,
}

/// Filters of a publication listing (the catalog as `/fhir` and `/hsds` serve it), in id order.
#[derive(Debug, Clone, Default)]
pub struct CatalogListing {
    /// One service by its gateway id.
    pub id: Option<String>,
    /// One service by the UUID it is published under as HSDS.
    pub public_id: Option<String>,
    /// Part of the name, any case.
    pub name: Option<String>,
    /// A taxonomy term code (agency categories are terms too).
    pub term: Option<String>,
    /// Gateway id of the organisation.
    pub organization: Option<String>,
    /// The UUID the organisation is published under as HSDS.
    pub organization_public_id: Option<String>,
    /// The UUID a taxonomy term is published under as HSDS.
    pub term_public_id: Option<String>,
    /// Gateway id of a location.
    pub location: Option<String>,
    /// Changed in the catalog after this time.
    pub updated_after: Option<OffsetDateTime>,
    /// Changed in the catalog before this time.
    pub updated_before: Option<OffsetDateTime>,
    /// Also services that are no longer active.
    pub include_inactive: bool,
    /// Rows to skip.
    pub offset: u32,
    /// Rows to return.
    pub limit: u32,
}

/// What a source's syncs remember between runs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DirectorySyncState {
    /// The newest change time the last sync saw (where an incremental sync starts).
    pub watermark: Option<OffsetDateTime>,
    /// When a sync last succeeded.
    pub last_success: Option<OffsetDateTime>,
    /// How many services the last complete full crawl listed (the guard against a short crawl).
    pub complete_count: Option<u64>,
    /// When that crawl ran.
    pub complete_at: Option<OffsetDateTime>,
    /// How the source's full records are read (`list`, `full_param`, `per_service`), as decided by the first sync.
    pub detail: Option<String>,
}

/// One row of a listing.
#[derive(Debug, Clone, PartialEq)]
pub struct Listed<T> {
    /// The item as normalised.
    pub item: T,
    /// Whether it is active (services: still listed by the source and active there).
    pub active: bool,
    /// When the catalog last changed it.
    pub updated_at: OffsetDateTime,
}

/// Directory services, as whole use cases.
#[async_trait]
pub trait Catalog: Send + Sync {
    /// Keeps one service with its organisation, locations, terms and languages, in one transaction; a service
    /// that had vanished and comes back is active again.
    ///
    /// # Errors
    /// `Database` when it could not be kept.
    async fn upsert_directory_service(
        &self,
        service: &CatalogService,
        raw: &Value,
        now: OffsetDateTime,
    ) -> Result<Upserted, StoreError>;

    /// Keeps a batch of services as [`Catalog::upsert_directory_service`] does each, all in one transaction
    /// (one commit for the lot: a sync's batches are what makes it fast), and says what it did to each, in order.
    ///
    /// # Errors
    /// `Database` when the batch could not be kept; then none of it is.
    async fn upsert_directory_services(
        &self,
        batch: &[(CatalogService, &Value)],
        now: OffsetDateTime,
    ) -> Result<Vec<Upserted>, StoreError>;

    /// Gives the HSDS id (a UUID v5, see `directories::publish`) to every service, organisation and taxonomy term
    /// kept before the migration that added it; returns how many rows it filled. Run when the store opens.
    ///
    /// # Errors
    /// `Database`.
    async fn fill_public_ids(&self) -> Result<usize, StoreError>;

    /// Indexes again the words of every service indexed by other rules than this build's
    /// (`directories::search_text::RULES_VERSION`, e.g. kept before the migration that added them); returns how
    /// many. Run when the store opens.
    ///
    /// # Errors
    /// `Database`, or `CorruptCatalog` when a kept document no longer parses.
    async fn reindex_search_words(&self) -> Result<usize, StoreError>;

    /// The active services of `source`: their source ids and when the source last changed each (a full sync's
    /// baseline: what it must see again, and what it need not read again in full).
    ///
    /// # Errors
    /// `Database`.
    async fn active_directory_services(
        &self,
        source: &str,
    ) -> Result<Vec<(String, Option<OffsetDateTime>)>, StoreError>;

    /// Marks inactive the listed active services of `source` (confirmed gone by a complete full sync started at
    /// `now`), in one transaction; returns how many. A service seen after `now` (by a sync that started later)
    /// is spared.
    ///
    /// # Errors
    /// `Database`.
    async fn deactivate_directory_services(
        &self,
        source: &str,
        source_ids: &[String],
        now: OffsetDateTime,
    ) -> Result<usize, StoreError>;

    /// Records that the source still lists these services unchanged (their full records were not read again), in
    /// one transaction.
    ///
    /// # Errors
    /// `Database`.
    async fn mark_directory_services_seen(
        &self,
        source: &str,
        source_ids: &[String],
        now: OffsetDateTime,
    ) -> Result<(), StoreError>;

    /// Records that the source still lists this service, though this time its record was refused: its last good
    /// version stays, and a full sync does not take it for vanished.
    ///
    /// # Errors
    /// `Database`.
    async fn mark_directory_service_seen(
        &self,
        source: &str,
        source_id: &str,
        now: OffsetDateTime,
    ) -> Result<(), StoreError>;

    /// When a sync of `source` last succeeded (`None`: never).
    ///
    /// # Errors
    /// `Database`.
    async fn directory_last_success(&self, source: &str) -> Result<Option<OffsetDateTime>, StoreError>;

    /// The newest change time the last sync of `source` saw (where an incremental sync starts).
    ///
    /// # Errors
    /// `Database`.
    async fn directory_watermark(&self, source: &str) -> Result<Option<OffsetDateTime>, StoreError>;

    /// What the last syncs of `source` left for the next one (`None`: never synced).
    ///
    /// # Errors
    /// `Database`.
    async fn directory_sync_state(&self, source: &str) -> Result<Option<DirectorySyncState>, StoreError>;

    /// Records a successful sync of `source` at `now`: its watermark, and for a complete full crawl the count it
    /// listed and when; `complete_*` and `detail` (how full records are read) are kept when `None`
    /// (`last_success` is `now`, whatever `sync` says).
    ///
    /// # Errors
    /// `Database`.
    async fn record_directory_sync(
        &self,
        source: &str,
        sync: &DirectorySyncState,
        now: OffsetDateTime,
    ) -> Result<(), StoreError>;

    /// One page of services matching `query`, best first, and how many matched in all.
    ///
    /// # Errors
    /// `Database`.
    async fn search_services(&self, query: &ServiceQuery) -> Result<(Vec<ServiceHit>, usize), StoreError>;

    /// The catalog's change counter: the number of the last committed change that a search may see.
    ///
    /// # Errors
    /// `Database`.
    async fn catalog_version(&self) -> Result<i64, StoreError>;

    /// The services changed after `after` (a `(change_seq, id)` position; `(-1, "")` from the start) up to
    /// change `upto`, at most `limit`, in change order: `(change_seq, id, doc, active)`.
    ///
    /// # Errors
    /// `Database`.
    async fn catalog_changes(
        &self,
        after: (i64, &str),
        upto: i64,
        limit: u32,
    ) -> Result<Vec<CatalogChange>, StoreError>;

    /// The kept documents of these services and whether each is active, in no particular order.
    ///
    /// # Errors
    /// `Database`.
    async fn service_docs(&self, ids: &[String]) -> Result<Vec<(String, String, bool)>, StoreError>;

    /// The `(taxonomy, code)` of a taxonomy term (by code, or by a source's id of it) and of every term under it,
    /// as each source gave the hierarchy.
    ///
    /// # Errors
    /// `Database`.
    async fn taxonomy_subtree(&self, term: &str) -> Result<Vec<(String, String)>, StoreError>;

    /// One service as kept, with whether it is still active at its source.
    ///
    /// # Errors
    /// `Database`, or `Corrupt` when the kept document no longer parses.
    async fn directory_service(&self, id: &str) -> Result<Option<(CatalogService, bool)>, StoreError>;

    /// A page of services in id order, and how many match.
    ///
    /// # Errors
    /// `Database` when the catalog cannot be read.
    async fn list_services(&self, listing: &CatalogListing)
    -> Result<(Vec<Listed<CatalogService>>, usize), StoreError>;

    /// A page of organisations (by name part when given) in id order, and how many match.
    ///
    /// # Errors
    /// `Database` when the catalog cannot be read.
    async fn list_organizations(
        &self,
        id: Option<&str>,
        name: Option<&str>,
        offset: u32,
        limit: u32,
    ) -> Result<(Vec<Listed<crate::directories::CatalogOrganization>>, usize), StoreError>;

    /// A page of locations (by name part when given) in id order, and how many match.
    ///
    /// # Errors
    /// `Database` when the catalog cannot be read.
    async fn list_locations(
        &self,
        id: Option<&str>,
        name: Option<&str>,
        offset: u32,
        limit: u32,
    ) -> Result<(Vec<Listed<crate::directories::CatalogLocation>>, usize), StoreError>;
}
