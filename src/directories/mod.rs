//! Community service directories: pull services from their sources, normalise them into the catalog, and search it.
//!
//! A [`DirectorySource`] yields pages of raw source records; [`sync`] normalises each one ([`CatalogService`]),
//! keeps the valid ones (each in one transaction, never half-stored), reports the invalid ones with their reasons,
//! and on a full sync marks the services that vanished from the source as inactive (tombstones; nothing is
//! deleted). Sources: [`hsds`] (an HSDS 3.0 API, or an HSDS data package on disk) and [`fhir_directory`] (a FHIR
//! R4 server's `HealthcareService`s). [`publish`] turns the catalog back into FHIR and HSDS for others to read.
//! [`hours`] turns opening hours into the intervals an `open_now` search matches, in each source's time zone.

pub mod fhir_directory;
pub mod hours;
pub mod hsds;
pub mod hsds_csv;
pub mod publish;
pub mod synthetic;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;

use crate::store::{Store, StoreError};

/// A service as the catalog keeps it, whatever its source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CatalogService {
    /// The gateway's stable id (`<source>.<source id>`, or a hash when that would not be a valid id).
    pub id: String,
    /// Name of the configured source.
    pub source: String,
    /// The source's own id.
    pub source_id: String,
    /// Service name.
    pub name: String,
    /// Description (searched as full text).
    pub description: String,
    /// `active`, `inactive`, `defunct` or `temporarily closed`, as the source says.
    pub status: String,
    /// Web page.
    pub url: Option<String>,
    /// Contact e-mail.
    pub email: Option<String>,
    /// Who may use it.
    pub eligibility: Option<String>,
    /// Youngest age served.
    pub minimum_age: Option<f64>,
    /// Oldest age served.
    pub maximum_age: Option<f64>,
    /// The organisation running it.
    pub organization: Option<CatalogOrganization>,
    /// Where it is offered.
    pub locations: Vec<CatalogLocation>,
    /// Taxonomy terms describing it.
    pub terms: Vec<TaxonomyTerm>,
    /// Languages it is offered in (BCP 47 codes, lower case).
    pub languages: Vec<String>,
    /// Opening hours.
    pub schedules: Vec<Schedule>,
    /// Phone numbers.
    pub phones: Vec<String>,
    /// When the source last changed it.
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub source_modified: Option<OffsetDateTime>,
    /// IANA time zone of the source's local opening hours (`[[directories]] time_zone`), stamped by the sync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
}

/// An organisation running services.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CatalogOrganization {
    /// The gateway's id.
    pub id: String,
    /// The source's id.
    pub source_id: String,
    /// Name.
    pub name: String,
    /// Description.
    pub description: Option<String>,
    /// Web site.
    pub url: Option<String>,
    /// Contact e-mail.
    pub email: Option<String>,
}

/// A place where services are offered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CatalogLocation {
    /// The gateway's id.
    pub id: String,
    /// The source's id.
    pub source_id: String,
    /// Name.
    pub name: Option<String>,
    /// WGS 84 latitude.
    pub latitude: Option<f64>,
    /// WGS 84 longitude.
    pub longitude: Option<f64>,
    /// Street address.
    pub address: Option<String>,
    /// City.
    pub city: Option<String>,
    /// State or province.
    pub state: Option<String>,
    /// Postal code.
    pub postal_code: Option<String>,
}

/// A taxonomy term: `(taxonomy, code)` with a display name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TaxonomyTerm {
    /// The taxonomy (e.g. `carebridge-service-category`, `open-eligibility`).
    pub taxonomy: String,
    /// The term's code.
    pub code: String,
    /// Display name.
    pub name: String,
}

/// Weekly opening hours.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Schedule {
    /// Days (`MO`…`SU`).
    pub days: Vec<String>,
    /// Opening time, `HH:MM` (or `HH:MM:SS`), local to the schedule's zone, without a UTC offset.
    pub opens_at: Option<String>,
    /// Closing time, `HH:MM` (or `HH:MM:SS`; `24:00` is the end of the day), in the same zone.
    pub closes_at: Option<String>,
    /// The fixed UTC offset the source gave these times, in minutes east of UTC; without it, the times are in
    /// the source's `time_zone` (see [`hours`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utc_offset_minutes: Option<i32>,
}

/// The taxonomy whose codes are the agency's service categories (the `category` search filter).
pub const CATEGORY_TAXONOMY: &str = "carebridge-service-category";

/// The gateway's id for a source object: `<source>.<source id>` when that is a valid id, else a stable hash.
#[must_use]
pub fn gateway_id(source: &str, source_id: &str) -> String {
    // The same rules as agency record ids (FHIR's id alphabet and length), so a referral can name it as a target.
    let plain = format!("{source}.{source_id}");
    if crate::domain::RecordId::parse(&plain).is_ok() {
        return plain;
    }
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{source}\n{source_id}").as_bytes());
    format!("{source}.{}", &hex::encode(digest)[..24])
}

/// One page of raw records from a source.
#[derive(Debug, Default)]
pub struct SourcePage {
    /// The records, as JSON values.
    pub records: Vec<serde_json::Value>,
    /// Whether another page follows.
    pub more: bool,
    /// Records the source itself found wrong before any could be normalised (a CSV row that breaks its
    /// table), each reported and kept at its last good version like a record `normalise` refuses.
    pub rejected: Vec<Rejection>,
}

/// Why a source could not be read (a value: the sync reports it and stops).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The source answered with an error status.
    #[error("the source answered HTTP {status}")]
    Status {
        /// HTTP status.
        status: u16,
    },
    /// The source could not be reached or its answer not read.
    #[error("the source could not be reached: {0}")]
    Http(#[from] reqwest::Error),
    /// A file of a data package could not be read.
    #[error("cannot read {path}: {detail}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        detail: String,
    },
    /// The answer is not what the standard describes.
    #[error("the source's answer is malformed: {0}")]
    Malformed(String),
}

/// A directory to pull services from.
#[async_trait]
pub trait DirectorySource: Send + Sync {
    /// The configured name of the source.
    fn name(&self) -> &str;

    /// Page `page` (from 1) of the services changed since `modified_after` (all of them when `None`).
    ///
    /// # Errors
    /// When the source cannot be read.
    async fn page(&self, page: u32, modified_after: Option<OffsetDateTime>) -> Result<SourcePage, SourceError>;

    /// Turns one raw record into a catalog service, or says why it cannot be kept.
    ///
    /// # Errors
    /// A sentence naming the offending field.
    fn normalise(&self, raw: &serde_json::Value) -> Result<CatalogService, String>;

    /// IANA time zone of the source's local opening hours, when configured.
    fn time_zone(&self) -> Option<&str> {
        None
    }
}

/// A source with the time zone its configuration gives it (so the sources themselves need not know it).
struct InTimeZone {
    source: std::sync::Arc<dyn DirectorySource>,
    time_zone: String,
}

#[async_trait]
impl DirectorySource for InTimeZone {
    fn name(&self) -> &str {
        self.source.name()
    }

    async fn page(&self, page: u32, modified_after: Option<OffsetDateTime>) -> Result<SourcePage, SourceError> {
        self.source.page(page, modified_after).await
    }

    fn normalise(&self, raw: &serde_json::Value) -> Result<CatalogService, String> {
        self.source.normalise(raw)
    }

    fn time_zone(&self) -> Option<&str> {
        Some(self.time_zone.as_str())
    }
}

/// A full sync reads everything and marks what vanished; an incremental one reads what changed since the last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Read every service; services not seen are marked inactive.
    Full,
    /// Read what changed since the last successful sync (a full sync when there was none).
    Incremental,
}

/// What a sync did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, ToSchema)]
pub struct SyncReport {
    /// Source name.
    pub source: String,
    /// Services seen for the first time.
    pub added: usize,
    /// Services that changed.
    pub updated: usize,
    /// Services already as the source has them.
    pub unchanged: usize,
    /// Services marked inactive because they vanished from the source.
    pub deactivated: usize,
    /// Records refused, each with its reason.
    pub rejected: Vec<Rejection>,
}

/// A source record that was not kept, and why.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Rejection {
    /// The source's id of the record, when it has one.
    pub source_id: Option<String>,
    /// Why it was refused.
    pub reason: String,
}

/// What upserting one service did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upserted {
    /// A new service.
    Added,
    /// A changed service.
    Updated,
    /// Identical to what was kept.
    Unchanged,
}

/// Why a sync stopped.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The source failed; nothing after the failing page was read, and nothing was deactivated.
    #[error("{source_name}: {error}")]
    Source {
        /// The source.
        source_name: String,
        /// The failure.
        error: SourceError,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Services kept per transaction: one commit (one `fsync` on SQLite) for the lot instead of one each, while other
/// writers (referrals) wait at most one batch for the database.
const UPSERT_BATCH: usize = 200;

/// Most pages a sync reads, so a source that never says "last page" cannot keep it going forever.
const MAX_PAGES: u32 = 100_000;

/// Reports a record that is not kept, and marks its service seen so a full sync does not take it for vanished: its
/// last good version stays.
async fn reject(
    store: &dyn Store,
    report: &mut SyncReport,
    rejection: Rejection,
    now: OffsetDateTime,
) -> Result<(), SyncError> {
    if let Some(id) = &rejection.source_id {
        store.mark_directory_service_seen(&report.source, id, now).await?;
    }
    let source_id = rejection.source_id.as_deref().unwrap_or("-");
    tracing::warn!(source = %report.source, source_id, reason = %rejection.reason, "Directory record rejected.");
    report.rejected.push(rejection);
    Ok(())
}

/// Pulls `source` into the catalog. `progress` is told the running count of records read.
///
/// # Errors
/// When the source or the store fails; services kept before the failure stay kept, and nothing is deactivated.
pub async fn sync(
    store: &dyn Store,
    source: &dyn DirectorySource,
    mode: SyncMode,
    now: OffsetDateTime,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<SyncReport, SyncError> {
    let name = source.name().to_owned();
    let since = match mode {
        SyncMode::Full => None,
        SyncMode::Incremental => store.directory_watermark(&name).await?,
    };
    let mut report = SyncReport { source: name.clone(), ..SyncReport::default() };
    let mut read = 0;
    let mut newest = since;
    for page in 1..=MAX_PAGES {
        let batch =
            source.page(page, since).await.map_err(|error| SyncError::Source { source_name: name.clone(), error })?;
        for rejection in batch.rejected {
            reject(store, &mut report, rejection, now).await?;
        }
        for chunk in batch.records.chunks(UPSERT_BATCH) {
            let mut kept = Vec::with_capacity(chunk.len());
            for raw in chunk {
                match source.normalise(raw) {
                    Ok(mut service) => {
                        if service.time_zone.is_none() {
                            service.time_zone = source.time_zone().map(str::to_owned);
                        }
                        newest = newest.max(service.source_modified);
                        kept.push((service, raw));
                    }
                    Err(reason) => {
                        let source_id = raw.get("id").and_then(|v| v.as_str()).map(str::to_owned);
                        reject(store, &mut report, Rejection { source_id, reason }, now).await?;
                    }
                }
            }
            for done in store.upsert_directory_services(&kept, now).await? {
                match done {
                    Upserted::Added => report.added += 1,
                    Upserted::Updated => report.updated += 1,
                    Upserted::Unchanged => report.unchanged += 1,
                }
            }
            read += chunk.len();
            progress(read);
        }
        if !batch.more {
            break;
        }
    }
    if mode == SyncMode::Full || since.is_none() {
        report.deactivated = store.deactivate_vanished_services(&name, now).await?;
    }
    store.set_directory_watermark(&name, newest, now).await?;
    metrics::counter!("carebridge_directory_records_total", "source" => name.clone(), "outcome" => "kept")
        .increment((report.added + report.updated + report.unchanged) as u64);
    metrics::counter!("carebridge_directory_records_total", "source" => name, "outcome" => "rejected")
        .increment(report.rejected.len() as u64);
    Ok(report)
}

/// A catalog search.
#[derive(Debug, Clone, Default)]
pub struct ServiceQuery {
    /// Full-text query over name and description.
    pub text: Option<String>,
    /// Agency service category (a code of [`CATEGORY_TAXONOMY`]).
    pub category: Option<String>,
    /// Any taxonomy term code.
    pub taxonomy_term: Option<String>,
    /// Centre of a radius search, `(latitude, longitude)`.
    pub near: Option<(f64, f64)>,
    /// Radius around `near`, in km.
    pub radius_km: f64,
    /// Language the service is offered in.
    pub language: Option<String>,
    /// Also list services gone from their source or not `active` there.
    pub include_inactive: bool,
    /// Only services open at this instant (`open_now`), by their hours in their zone; services whose hours or
    /// time zone are unknown never match (see [`hours`]).
    pub open_at: Option<OffsetDateTime>,
    /// Page, from 1.
    pub page: u32,
    /// Services per page.
    pub per_page: u32,
}

/// One search result.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ServiceHit {
    /// Gateway id (usable as a referral's `target.service_id`).
    pub id: String,
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Source status.
    pub status: String,
    /// Whether the gateway still sees it at its source.
    pub active: bool,
    /// Organisation name.
    pub organization: Option<String>,
    /// Agency categories.
    pub categories: Vec<String>,
    /// Languages.
    pub languages: Vec<String>,
    /// Distance from `near` to its nearest location, in km.
    pub distance_km: Option<f64>,
    /// The source it came from.
    pub source: String,
}

/// The source a configuration entry describes, in its configured time zone; a FHIR directory reads its category
/// map under `mappings_dir`.
///
/// # Errors
/// When its credential variable is unset, its HTTP client cannot be built, or (a FHIR directory) its category map
/// is missing or broken (`SourceError::File` naming the file).
pub fn source_from_settings(
    settings: &crate::config::DirectorySettings,
    mappings_dir: &std::path::Path,
) -> Result<std::sync::Arc<dyn DirectorySource>, SourceError> {
    let source = source_of(settings, mappings_dir)?;
    Ok(match settings.time_zone() {
        Some(zone) => std::sync::Arc::new(InTimeZone { source, time_zone: zone.to_owned() }),
        None => source,
    })
}

/// The source a configuration entry describes, as read from it.
fn source_of(
    settings: &crate::config::DirectorySettings,
    mappings_dir: &std::path::Path,
) -> Result<std::sync::Arc<dyn DirectorySource>, SourceError> {
    use crate::config::DirectorySettings;
    Ok(match settings {
        DirectorySettings::HsdsApi { name, base_url, per_page, auth_header, auth_value_env, timeout_secs, .. } => {
            let auth = match (auth_header, auth_value_env) {
                (Some(header), Some(var)) => {
                    let value = std::env::var(var).map_err(|_| {
                        SourceError::Malformed(format!("the credential variable {var} of directory {name} is not set"))
                    })?;
                    Some((header.clone(), value))
                }
                _ => None,
            };
            let timeout = std::time::Duration::from_secs(*timeout_secs);
            std::sync::Arc::new(hsds::HsdsApi::new(name, base_url, *per_page, auth, timeout)?)
        }
        DirectorySettings::HsdsPackage { name, path, .. } => {
            std::sync::Arc::new(hsds::HsdsPackage::new(name, path.clone()))
        }
        DirectorySettings::FhirDirectory { name, base_url, per_page, bearer_token_env, timeout_secs, .. } => {
            let token = match bearer_token_env {
                Some(var) => Some(std::env::var(var).map_err(|_| {
                    SourceError::Malformed(format!("the credential variable {var} of directory {name} is not set"))
                })?),
                None => None,
            };
            let timeout = std::time::Duration::from_secs(*timeout_secs);
            let categories = fhir_directory::CategoryMap::for_source(mappings_dir)?;
            std::sync::Arc::new(fhir_directory::FhirDirectory::new(
                name, base_url, *per_page, token, timeout, categories,
            )?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_ids_are_readable_when_they_can_be_and_stable_hashes_otherwise() {
        assert_eq!(gateway_id("pdx211", "pdx-eastside-pantry"), "pdx211.pdx-eastside-pantry");
        let hashed = gateway_id("pdx211", "ac148810 d857/441c");
        assert!(hashed.starts_with("pdx211.") && hashed.len() == 7 + 24, "{hashed}");
        assert_eq!(hashed, gateway_id("pdx211", "ac148810 d857/441c"));
        assert_ne!(hashed, gateway_id("sea211", "ac148810 d857/441c"));
    }
}
