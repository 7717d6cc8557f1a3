//! The service catalog's part of the store: directory services normalised into organisations, locations,
//! taxonomy terms and languages, searchable by text (SQLite FTS5 / PostgreSQL full text), place and filters.

use async_trait::async_trait;
use serde_json::Value;
use time::OffsetDateTime;

use super::StoreError;
use crate::directories::{CatalogService, ServiceHit, ServiceQuery, Upserted};

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

    /// Marks inactive every active service of `source` not seen since `sync_started` (the start of a full sync);
    /// returns how many.
    ///
    /// # Errors
    /// `Database`.
    async fn deactivate_vanished_services(
        &self,
        source: &str,
        sync_started: OffsetDateTime,
    ) -> Result<usize, StoreError>;

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

    /// The newest `last_modified` seen by the last successful sync of `source`.
    ///
    /// # Errors
    /// `Database`.
    async fn directory_watermark(&self, source: &str) -> Result<Option<OffsetDateTime>, StoreError>;

    /// Records a successful sync of `source`.
    ///
    /// # Errors
    /// `Database`.
    async fn set_directory_watermark(
        &self,
        source: &str,
        newest: Option<OffsetDateTime>,
        now: OffsetDateTime,
    ) -> Result<(), StoreError>;

    /// One page of services matching `query`, best first, and how many matched in all.
    ///
    /// # Errors
    /// `Database`.
    async fn search_services(&self, query: &ServiceQuery) -> Result<(Vec<ServiceHit>, usize), StoreError>;

    /// One service as kept, with whether it is still active at its source.
    ///
    /// # Errors
    /// `Database`, or `Corrupt` when the kept document no longer parses.
    async fn directory_service(&self, id: &str) -> Result<Option<(CatalogService, bool)>, StoreError>;
}
