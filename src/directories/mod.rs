//! Community service directories: pull services from their sources, normalise them into the catalog, and search it.
//!
//! A [`DirectorySource`] yields pages of raw source records; [`sync`] normalises each one ([`CatalogService`]),
//! keeps the valid ones (each in one transaction, never half-stored), reports the invalid ones with their reasons,
//! and on a full sync marks the services that vanished from the source as inactive (tombstones; nothing is
//! deleted) — only after a crawl that provably read the whole source, each vanished service confirmed gone where
//! the source can be asked by id. Sources read over HTTP do it through [`crate::outbound`] (retries, named failures).
//! Sources: [`hsds`] (an HSDS 3.0 API, or an HSDS data package on disk) and [`fhir_directory`] (a FHIR
//! R4 server's `HealthcareService`s). [`publish`] turns the catalog back into FHIR and HSDS for others to read.
//! [`hours`] turns opening hours into the intervals an `open_now` search matches, in each source's time zone;
//! [`search_text`] turns names and descriptions into the folded, stemmed words a text search looks up.

pub mod fhir_directory;
pub mod hours;
pub mod hsds;
pub mod hsds_csv;
pub mod index;
pub mod jobs;
pub mod publish;
pub mod schedule;
pub mod search_text;
pub mod synthetic;

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use futures_util::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;

use crate::store::{DirectorySyncState, Store, StoreError};

/// A service as the catalog keeps it, whatever its source.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CatalogService {
    /// The gateway's stable id (`<source>.<source id>`, or a hash when that would not be a valid id).
    pub id: String,
    /// Name of the configured source.
    pub source: String,
    /// The source's own id.
    pub source_id: String,
    /// Service name.
    pub name: String,
    /// Another name the service is known by (searched with the name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alternate_name: Option<String>,
    /// The UUID the service is published under as HSDS: the source's own id when it is a UUID (unless another
    /// service of the catalog already has it), else a UUID v5 of the gateway id (see [`publish`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_id: Option<String>,
    /// Description (searched as full text), as the source wrote it.
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
    pub phones: Vec<Phone>,
    /// When the source last changed it.
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub source_modified: Option<OffsetDateTime>,
    /// IANA time zone of the source's local opening hours (`[[directories]] time_zone`), stamped by the sync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
}

/// An organisation running services.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
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
    /// The source's id of the organisation this one is part of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_organization_id: Option<String>,
    /// The UUID the organisation is published under as HSDS (as for services).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_id: Option<String>,
}

/// A phone number, with what the source says of it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(from = "PhoneRepr")]
pub struct Phone {
    /// The source's id of the phone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The number.
    pub number: String,
    /// Extension.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extension: Option<String>,
    /// `voice`, `fax`, `text`, … as the source says.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "type")]
    pub kind: Option<String>,
    /// What the number is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Languages spoken on the line (lower case).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub languages: Vec<String>,
}

impl Phone {
    /// A number and nothing else.
    #[must_use]
    pub fn number(number: impl Into<String>) -> Self {
        Phone { number: number.into(), ..Phone::default() }
    }
}

/// A phone as kept: a bare number (catalogs kept before phones had details), or the whole object.
#[derive(Deserialize)]
#[serde(untagged)]
enum PhoneRepr {
    Number(String),
    Whole {
        #[serde(default)]
        id: Option<String>,
        number: String,
        #[serde(default)]
        extension: Option<String>,
        #[serde(default, rename = "type")]
        kind: Option<String>,
        #[serde(default)]
        description: Option<String>,
        #[serde(default)]
        languages: Vec<String>,
    },
}

impl From<PhoneRepr> for Phone {
    fn from(r: PhoneRepr) -> Self {
        match r {
            PhoneRepr::Number(number) => Phone::number(number),
            PhoneRepr::Whole { id, number, extension, kind, description, languages } => {
                Phone { id, number, extension, kind, description, languages }
            }
        }
    }
}

/// A place where services are offered.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
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
    /// The UUID the location is published under as HSDS (the source's own id when it is a UUID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_id: Option<String>,
    /// The location's phones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phones: Vec<Phone>,
    /// Languages spoken at the location (lower case).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub languages: Vec<String>,
    /// The location's opening hours.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedules: Vec<Schedule>,
    /// What the source says of this service at this location (HSDS `service_at_location`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_at_location: Option<ServiceAtLocation>,
}

/// A service at one of its locations: the source's id of the link, and the phones and hours of the service
/// there.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ServiceAtLocation {
    /// The source's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Phones of the service at this location.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phones: Vec<Phone>,
    /// Hours of the service at this location.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedules: Vec<Schedule>,
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
    /// The source's id of the term.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The source's id of the broader term this one is part of (HSDS `parent_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    /// The source's id of the attribute linking the term to the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attribute_id: Option<String>,
    /// The attribute's `link_type` as the source gave it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_type: Option<String>,
}

impl TaxonomyTerm {
    /// A term known by taxonomy, code and name only.
    #[must_use]
    pub fn new(taxonomy: impl Into<String>, code: impl Into<String>, name: impl Into<String>) -> Self {
        TaxonomyTerm {
            taxonomy: taxonomy.into(),
            code: code.into(),
            name: name.into(),
            id: None,
            parent_id: None,
            attribute_id: None,
            link_type: None,
        }
    }
}

/// Weekly opening hours.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Schedule {
    /// The source's id of the schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
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
    /// How many records the whole listing holds, when the source says (HSDS `total_items`).
    pub total_items: Option<u64>,
    /// How many pages the whole listing has, when the source says (HSDS `total_pages`).
    pub total_pages: Option<u64>,
}

/// One service read by its id.
#[derive(Debug)]
pub enum Fetched {
    /// The source's full record.
    Found(serde_json::Value),
    /// The source says it has no such service (404 or 410).
    Gone,
    /// The source cannot be read one service at a time (it is read whole, so what it lists is all it has).
    NotSupported,
}

/// How a source's full records are read this sync, as its `prepare` decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadPlan {
    /// The decision (`list`, `full_param`, `per_service`), kept for the next syncs when `keep`.
    pub detail: String,
    /// Why, when it was probed.
    pub note: Option<String>,
    /// Whether the decision is worth keeping (a probe of an empty source decides nothing).
    pub keep: bool,
}

/// Why a source could not be read (a value: the sync reports it and stops).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The request to the source failed: no answer, or an error status (said as the source's).
    #[error("{}", as_the_source(.0))]
    Http(crate::outbound::Failure),
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

impl From<crate::fhir::client::FhirError> for SourceError {
    fn from(e: crate::fhir::client::FhirError) -> Self {
        match e {
            crate::fhir::client::FhirError::Http(f) => f.into(),
            crate::fhir::client::FhirError::Malformed(m) => SourceError::Malformed(m),
        }
    }
}

impl From<crate::outbound::Failure> for SourceError {
    fn from(f: crate::outbound::Failure) -> Self {
        SourceError::Http(f)
    }
}

/// A failed request as an operator reads it of a directory: "the source answered HTTP 503: …".
fn as_the_source(f: &crate::outbound::Failure) -> String {
    use crate::outbound::Failure as F;
    match f {
        F::Status { .. } => format!("the source answered {f}"),
        F::Connect => "could not connect to the source".to_owned(),
        F::Transport(t) => format!("the source's answer could not be read: {}", t.replace("(the server)", "(source)")),
        _ => f.to_string(),
    }
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

    /// Decides, at the start of a sync, how full records are read (`recorded`: the decision a past sync kept);
    /// `None` for a source whose listing is always whole.
    ///
    /// # Errors
    /// When a probe of the source fails.
    async fn prepare(&self, recorded: Option<&str>) -> Result<Option<ReadPlan>, SourceError> {
        let _ = recorded;
        Ok(None)
    }

    /// Whether the records of [`DirectorySource::page`] are whole; when not, each is read by
    /// [`DirectorySource::fetch`] (unless its `last_modified` is what the catalog has).
    fn lists_in_full(&self) -> bool {
        true
    }

    /// One service by its source id: a changed service's full record, or a missing one's confirmation.
    ///
    /// # Errors
    /// When the source cannot be read.
    async fn fetch(&self, source_id: &str) -> Result<Fetched, SourceError> {
        let _ = source_id;
        Ok(Fetched::NotSupported)
    }

    /// Most requests in flight to the source at once.
    fn max_concurrent_requests(&self) -> usize {
        1
    }

    /// Most of the last complete crawl's services a full sync may find missing before it refuses to deactivate.
    fn max_deactivate_fraction(&self) -> f64 {
        DEFAULT_MAX_DEACTIVATE_FRACTION
    }
}

/// The share of a source's services a full sync may deactivate without `force`, unless configured.
pub const DEFAULT_MAX_DEACTIVATE_FRACTION: f64 = 0.2;

/// How far in the future a source's `last_modified` may be (clock skew) and still move the watermark.
pub const FUTURE_SKEW: time::Duration = time::Duration::minutes(5);

/// A source with what its configuration adds: its time zone and its deactivation guard.
struct Configured {
    source: std::sync::Arc<dyn DirectorySource>,
    time_zone: Option<String>,
    max_deactivate_fraction: f64,
}

#[async_trait]
impl DirectorySource for Configured {
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
        self.time_zone.as_deref()
    }

    async fn prepare(&self, recorded: Option<&str>) -> Result<Option<ReadPlan>, SourceError> {
        self.source.prepare(recorded).await
    }

    fn lists_in_full(&self) -> bool {
        self.source.lists_in_full()
    }

    async fn fetch(&self, source_id: &str) -> Result<Fetched, SourceError> {
        self.source.fetch(source_id).await
    }

    fn max_concurrent_requests(&self) -> usize {
        self.source.max_concurrent_requests()
    }

    fn max_deactivate_fraction(&self) -> f64 {
        self.max_deactivate_fraction
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
    /// Services marked inactive because they vanished from the source (each confirmed gone).
    pub deactivated: usize,
    /// Services a full crawl missed that the source, asked by id, still has (kept, not deactivated).
    pub recovered: usize,
    /// Records refused, each with its reason.
    pub rejected: Vec<Rejection>,
    /// How full records were read (`list`, `full_param`, `per_service`), for an HSDS API.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Times the source was read through (a listing that changed under the first crawl is read again).
    pub crawls: u32,
    /// Services kept without any location, phone, language, taxonomy term or schedule.
    pub without_detail: usize,
    /// Source ids whose `last_modified` lies in the future (beyond the skew): kept, but not moving the watermark.
    pub future_modified: Vec<String>,
    /// What an operator should know (how records were read and why, thin records, an ignored watermark).
    pub notes: Vec<String>,
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
    /// The crawl cannot be shown to be complete (or is implausibly short): services read were kept, nothing
    /// was deactivated and the watermark did not move.
    #[error("{source_name}: {reason}; nothing was deactivated")]
    Incomplete {
        /// The source.
        source_name: String,
        /// What does not add up.
        reason: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How a sync runs.
#[derive(Debug, Clone, Copy)]
pub struct SyncOptions {
    /// Full or incremental.
    pub mode: SyncMode,
    /// Deactivate even when the crawl lists far fewer services than the last complete one.
    pub force: bool,
    /// The sync's instant (`seen_at`, the future-timestamp horizon).
    pub now: OffsetDateTime,
}

impl SyncOptions {
    /// A sync in `mode` at `now`, without force.
    #[must_use]
    pub fn new(mode: SyncMode, now: OffsetDateTime) -> Self {
        SyncOptions { mode, force: false, now }
    }
}

/// Services kept per transaction: one commit (one `fsync` on SQLite) for the lot instead of one each, while other
/// writers (referrals) wait at most one batch for the database.
const UPSERT_BATCH: usize = 200;

/// Most pages a sync reads, so a source that never says "last page" cannot keep it going forever.
const MAX_PAGES: u32 = 100_000;

/// Most crawls of one sync: a listing that changes under the first is read once more, then the sync gives up.
const MAX_CRAWLS: u32 = 2;

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

/// The source id of a raw record (`id`), when it has one.
fn raw_id(raw: &serde_json::Value) -> Option<String> {
    raw.get("id").and_then(serde_json::Value::as_str).map(str::to_owned)
}

/// The `last_modified` of a raw record, when it has a valid one.
fn raw_modified(raw: &serde_json::Value) -> Option<OffsetDateTime> {
    let text = raw.get("last_modified")?.as_str()?;
    OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()
}

/// The state one sync carries through its crawls.
struct Run<'a> {
    store: &'a dyn Store,
    source: &'a dyn DirectorySource,
    options: SyncOptions,
    progress: &'a (dyn Fn(&jobs::SyncProgress) + Sync),
    /// Active services at the start, with their kept `last_modified`.
    known: HashMap<String, Option<OffsetDateTime>>,
    /// Whether a listed record whose `last_modified` is unchanged may keep its stored full record.
    reuse: bool,
    newest: Option<OffsetDateTime>,
    report: SyncReport,
    read: usize,
}

/// What one crawl saw, and whether it adds up.
#[derive(Default)]
struct Crawl {
    seen: HashSet<String>,
    /// The listing changed while it was read (totals moved, a record came twice): read it again.
    shifted: Option<String>,
    /// The listing ended early or did not hold what it said.
    incomplete: Option<String>,
}

impl Run<'_> {
    fn failed(&self, error: SourceError) -> SyncError {
        SyncError::Source { source_name: self.report.source.clone(), error }
    }

    /// Reads the listing once, page by page, keeping what it holds.
    async fn crawl(&mut self, since: Option<OffsetDateTime>) -> Result<Crawl, SyncError> {
        let mut crawl = Crawl::default();
        let mut stated: Option<(Option<u64>, Option<u64>)> = None;
        let mut listed: u64 = 0;
        for page in 1..=MAX_PAGES {
            let batch = self.source.page(page, since).await.map_err(|e| self.failed(e))?;
            let totals = (batch.total_items, batch.total_pages);
            match stated {
                None => stated = Some(totals),
                // Totals that move between pages mean the listing changed under the crawl (a page that leaves
                // them out is judged by where it ends instead).
                Some(first) if crawl.shifted.is_none() && (moved(first.0, totals.0) || moved(first.1, totals.1)) => {
                    crawl.shifted = Some(format!(
                        "the listing changed while it was read (page 1 said {} services in {} pages, page {page} {} in {})",
                        show(first.0),
                        show(first.1),
                        show(totals.0),
                        show(totals.1)
                    ));
                }
                Some(_) => {}
            }
            listed += (batch.records.len() + batch.rejected.len()) as u64;
            let ids: HashSet<String> = batch
                .records
                .iter()
                .filter_map(raw_id)
                .chain(batch.rejected.iter().filter_map(|r| r.source_id.clone()))
                .collect();
            // A service on two pages means the listing moved under the crawl (one page may repeat itself: a
            // package's own duplicates are its business).
            if crawl.shifted.is_none()
                && let Some(id) = ids.iter().find(|id| crawl.seen.contains(*id))
            {
                crawl.shifted = Some(format!("service {id} was listed on two pages"));
            }
            crawl.seen.extend(ids);
            let more = batch.more;
            for gone in self.keep(batch).await? {
                crawl.seen.remove(&gone);
            }
            if !more {
                if let Some((_, Some(pages))) = stated
                    && u64::from(page) < pages
                {
                    crawl.incomplete =
                        Some(format!("the listing ended at page {page}, though the source said it has {pages} pages"));
                }
                break;
            }
        }
        if crawl.incomplete.is_none()
            && let Some((Some(items), _)) = stated
            && items != listed
        {
            crawl.incomplete = Some(format!("read {listed} services, though the source said it lists {items}"));
        }
        Ok(crawl)
    }

    /// Keeps one page: the records whose full versions are needed are read (concurrently), the unchanged ones
    /// only marked seen, and all normalised and upserted in batches. Returns the ids the source listed but then
    /// said are gone (deleted between the list and the read: not seen, so a full sync confirms and deactivates
    /// them).
    async fn keep(&mut self, batch: SourcePage) -> Result<Vec<String>, SyncError> {
        let now = self.options.now;
        for rejection in batch.rejected {
            reject(self.store, &mut self.report, rejection, now).await?;
        }
        let listed = batch.records.len();
        let mut gone = Vec::new();
        let whole = if self.source.lists_in_full() {
            batch.records
        } else {
            let mut unchanged = Vec::new();
            let mut wanted = Vec::new();
            for raw in batch.records {
                let modified = raw_modified(&raw);
                match raw_id(&raw) {
                    Some(id) if self.reuse && modified.is_some() && self.known.get(&id) == Some(&modified) => {
                        self.note_modified(&id, modified);
                        unchanged.push(id);
                    }
                    _ => wanted.push(raw),
                }
            }
            self.store.mark_directory_services_seen(&self.report.source, &unchanged, now).await?;
            self.report.unchanged += unchanged.len();
            let source = self.source;
            let fetched: Vec<(serde_json::Value, Fetched)> = futures_util::stream::iter(wanted)
                .map(|raw| async move {
                    match raw_id(&raw) {
                        Some(id) => source.fetch(&id).await.map(|f| (raw, f)),
                        None => Ok((raw, Fetched::NotSupported)),
                    }
                })
                .buffered(source.max_concurrent_requests().max(1))
                .try_collect()
                .await
                .map_err(|e| self.failed(e))?;
            let mut whole = Vec::with_capacity(fetched.len());
            for (listed, answer) in fetched {
                match answer {
                    Fetched::Found(full) => whole.push(full),
                    Fetched::Gone => gone.extend(raw_id(&listed)),
                    Fetched::NotSupported => whole.push(listed),
                }
            }
            whole
        };
        self.upsert(&whole).await?;
        self.read += listed;
        (self.progress)(&jobs::SyncProgress::of(&self.report, self.read));
        Ok(gone)
    }

    /// Normalises and keeps full records, in transactions of [`UPSERT_BATCH`].
    async fn upsert(&mut self, records: &[serde_json::Value]) -> Result<(), SyncError> {
        let now = self.options.now;
        for chunk in records.chunks(UPSERT_BATCH) {
            let mut kept = Vec::with_capacity(chunk.len());
            for raw in chunk {
                match self.source.normalise(raw) {
                    Ok(mut service) => {
                        if service.time_zone.is_none() {
                            service.time_zone = self.source.time_zone().map(str::to_owned);
                        }
                        self.note_modified(&service.source_id, service.source_modified);
                        if service.locations.is_empty()
                            && service.phones.is_empty()
                            && service.languages.is_empty()
                            && service.terms.is_empty()
                            && service.schedules.is_empty()
                        {
                            self.report.without_detail += 1;
                        }
                        kept.push((service, raw));
                    }
                    Err(reason) => {
                        let rejection = Rejection { source_id: raw_id(raw), reason };
                        reject(self.store, &mut self.report, rejection, now).await?;
                    }
                }
            }
            for done in self.store.upsert_directory_services(&kept, now).await? {
                match done {
                    Upserted::Added => self.report.added += 1,
                    Upserted::Updated => self.report.updated += 1,
                    Upserted::Unchanged => self.report.unchanged += 1,
                }
            }
        }
        Ok(())
    }

    /// Moves the watermark to a record's change time, unless that lies in the future beyond the skew.
    fn note_modified(&mut self, source_id: &str, modified: Option<OffsetDateTime>) {
        let Some(at) = modified else { return };
        if at > self.options.now + FUTURE_SKEW {
            if !self.report.future_modified.iter().any(|id| id == source_id) {
                tracing::warn!(source = %self.report.source, source_id, "Directory record modified in the future; the watermark ignores it.");
                self.report.future_modified.push(source_id.to_owned());
            }
            return;
        }
        self.newest = self.newest.max(Some(at));
    }

    /// Deactivates the services a complete crawl did not list, each confirmed gone by the source when it can be
    /// asked by id; one it still has is kept (a paging shift, not a deletion).
    async fn deactivate_missing(&mut self, seen: &HashSet<String>, baseline: u64) -> Result<(), SyncError> {
        let missing: Vec<String> = self.known.keys().filter(|id| !seen.contains(*id)).cloned().collect();
        if missing.is_empty() {
            return Ok(());
        }
        let fraction = self.source.max_deactivate_fraction();
        let floor = (1.0 - fraction) * baseline as f64;
        if !self.options.force && (seen.len() as f64) < floor {
            return Err(SyncError::Incomplete {
                source_name: self.report.source.clone(),
                reason: format!(
                    "the source lists {} services, more than {:.0} % fewer than the {baseline} of the last complete \
                     crawl ({} would be deactivated); sync with force to accept it",
                    seen.len(),
                    fraction * 100.0,
                    missing.len()
                ),
            });
        }
        let source = self.source;
        let answers: Vec<(String, Fetched)> = futures_util::stream::iter(missing)
            .map(|id| async move { source.fetch(&id).await.map(|f| (id, f)) })
            .buffered(source.max_concurrent_requests().max(1))
            .try_collect()
            .await
            .map_err(|e| self.failed(e))?;
        let mut gone = Vec::new();
        let mut live = Vec::new();
        for (id, answer) in answers {
            match answer {
                Fetched::Gone | Fetched::NotSupported => gone.push(id),
                Fetched::Found(raw) => {
                    let status = raw.get("status").and_then(serde_json::Value::as_str).unwrap_or_default();
                    if matches!(status, "defunct" | "inactive") {
                        gone.push(id);
                    } else {
                        tracing::info!(source = %self.report.source, source_id = %id, "Directory service missing from the crawl is still listed by id; kept.");
                        live.push(raw);
                    }
                }
            }
        }
        self.report.recovered = live.len();
        self.upsert(&live).await?;
        self.report.deactivated =
            self.store.deactivate_directory_services(&self.report.source, &gone, self.options.now).await?;
        Ok(())
    }
}

/// Whether a total stated on a later page differs from page 1's.
fn moved(first: Option<u64>, later: Option<u64>) -> bool {
    matches!((first, later), (Some(a), Some(b)) if a != b)
}

fn show(n: Option<u64>) -> String {
    n.map_or_else(|| "?".to_owned(), |n| n.to_string())
}

/// Pulls `source` into the catalog. `progress` is told the counts so far after each page.
///
/// A full sync (or an incremental one with no usable watermark) deactivates only after a crawl that adds up: every
/// page well formed, the totals the source states matching what was read, and not implausibly fewer services than
/// the last complete crawl (`max_deactivate_fraction`, unless `force`); each missing service is confirmed gone
/// by the source where it can be asked by id. A listing that changes under the crawl is read once more.
///
/// # Errors
/// When the source or the store fails, or the crawl does not add up (`Incomplete`); services kept before stay
/// kept, nothing is deactivated and the watermark does not move.
pub async fn sync(
    store: &dyn Store,
    source: &dyn DirectorySource,
    options: SyncOptions,
    progress: &(dyn Fn(&jobs::SyncProgress) + Sync),
) -> Result<SyncReport, SyncError> {
    let name = source.name().to_owned();
    let now = options.now;
    let state = store.directory_sync_state(&name).await?.unwrap_or_default();
    let mut report = SyncReport { source: name.clone(), ..SyncReport::default() };
    // A watermark in the future (poisoned by an earlier sync) would hide every later edit: read everything.
    let watermark = match state.watermark {
        Some(w) if w > now + FUTURE_SKEW => {
            report.notes.push("the kept watermark lies in the future; everything was read".into());
            None
        }
        w => w,
    };
    let since = match options.mode {
        SyncMode::Full => None,
        SyncMode::Incremental => watermark,
    };
    let full = since.is_none();
    let plan = source
        .prepare(state.detail.as_deref())
        .await
        .map_err(|error| SyncError::Source { source_name: name.clone(), error })?;
    if let Some(plan) = &plan {
        if let Some(note) = &plan.note {
            tracing::info!(source = %name, detail = %plan.detail, note = %note, "Directory read plan decided.");
            report.notes.push(format!("detail {}: {note}", plan.detail));
        }
        report.detail = Some(plan.detail.clone());
    }
    // Stored records are reused only when they were read the same way.
    let reuse = plan.as_ref().is_some_and(|p| state.detail.as_deref() == Some(p.detail.as_str()));
    let known: HashMap<String, Option<OffsetDateTime>> =
        store.active_directory_services(&name).await?.into_iter().collect();
    let baseline = state.complete_count.unwrap_or(known.len() as u64);
    let mut run = Run { store, source, options, progress, known, reuse, newest: since, report, read: 0 };
    let seen = loop {
        run.report.crawls += 1;
        let crawl = run.crawl(since).await?;
        if let Some(reason) = crawl.shifted {
            if run.report.crawls < MAX_CRAWLS {
                tracing::info!(source = %name, reason = %reason, "Directory listing moved during the crawl; reading it again.");
                continue;
            }
            return Err(SyncError::Incomplete { source_name: name, reason: format!("{reason}, twice") });
        }
        if let Some(reason) = crawl.incomplete {
            return Err(SyncError::Incomplete { source_name: name, reason });
        }
        break crawl.seen;
    };
    if full {
        run.deactivate_missing(&seen, baseline).await?;
    }
    let mut report = run.report;
    if report.detail.as_deref() == Some("list") && report.without_detail > 0 {
        report.notes.push(format!(
            "{} services came without locations, phones, languages, taxonomy or schedules",
            report.without_detail
        ));
    }
    let record = DirectorySyncState {
        watermark: run.newest,
        last_success: Some(now),
        complete_count: full.then_some(seen.len() as u64),
        complete_at: full.then_some(now),
        detail: plan.filter(|p| p.keep).map(|p| p.detail),
    };
    store.record_directory_sync(&name, &record, now).await?;
    metrics::counter!("carebridge_directory_records_total", "source" => name.clone(), "outcome" => "kept")
        .increment((report.added + report.updated + report.unchanged) as u64);
    metrics::counter!("carebridge_directory_records_total", "source" => name, "outcome" => "rejected")
        .increment(report.rejected.len() as u64);
    Ok(report)
}

/// A catalog search.
#[derive(Debug, Clone, Default)]
pub struct ServiceQuery {
    /// Full-text query over name, alternate name and description (see [`search_text`]); one without a word
    /// finds nothing.
    pub text: Option<String>,
    /// Agency service category (a code of [`CATEGORY_TAXONOMY`]).
    pub category: Option<String>,
    /// Any taxonomy term, by code or by the source's id of it, with the terms under it.
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

/// The source a configuration entry describes, in its configured time zone and with its deactivation guard; a
/// FHIR directory reads its category map under `mappings_dir`.
///
/// # Errors
/// When its credential variable is unset, its HTTP client cannot be built, or (a FHIR directory) its category map
/// is missing or broken (`SourceError::File` naming the file).
pub fn source_from_settings(
    settings: &crate::config::DirectorySettings,
    mappings_dir: &std::path::Path,
) -> Result<std::sync::Arc<dyn DirectorySource>, SourceError> {
    let source = source_of(settings, mappings_dir)?;
    Ok(std::sync::Arc::new(Configured {
        source,
        time_zone: settings.time_zone().map(str::to_owned),
        max_deactivate_fraction: settings.max_deactivate_fraction(),
    }))
}

/// The value of a source's credential variable.
fn credential(var: &str, name: &str) -> Result<String, SourceError> {
    std::env::var(var)
        .map_err(|_| SourceError::Malformed(format!("the credential variable {var} of directory {name} is not set")))
}

/// An HSDS source's category map: the configured file under `mappings_dir`, or none.
fn hsds_categories(
    file: Option<&std::path::Path>,
    mappings_dir: &std::path::Path,
) -> Result<fhir_directory::CategoryMap, SourceError> {
    match file {
        None => Ok(fhir_directory::CategoryMap::default()),
        Some(file) => fhir_directory::CategoryMap::for_file(&mappings_dir.join(file)),
    }
}

/// The source a configuration entry describes, as read from it.
fn source_of(
    settings: &crate::config::DirectorySettings,
    mappings_dir: &std::path::Path,
) -> Result<std::sync::Arc<dyn DirectorySource>, SourceError> {
    use crate::config::DirectorySettings;
    use std::time::Duration;
    Ok(match settings {
        DirectorySettings::HsdsApi {
            name,
            base_url,
            per_page,
            auth_header,
            auth_value_env,
            timeout_secs,
            detail,
            max_concurrent_requests,
            retries,
            retry_min_delay_ms,
            retry_max_delay_ms,
            retry_after_max_secs,
            category_map,
            ..
        } => {
            let headers = match (auth_header, auth_value_env) {
                (Some(header), Some(var)) => vec![(header.clone(), credential(var, name)?)],
                _ => Vec::new(),
            };
            let retry = crate::outbound::RetryPolicy {
                retries: *retries,
                min_delay: Duration::from_millis(*retry_min_delay_ms),
                max_delay: Duration::from_millis(*retry_max_delay_ms),
                retry_after_max: Duration::from_secs(*retry_after_max_secs),
            };
            let client = crate::outbound::HttpClient::new(Duration::from_secs(*timeout_secs), retry, headers)?;
            std::sync::Arc::new(hsds::HsdsApi::new(hsds::HsdsApiSettings {
                name,
                base_url,
                per_page: *per_page,
                detail: *detail,
                max_concurrent_requests: *max_concurrent_requests,
                client,
                categories: hsds_categories(category_map.as_deref(), mappings_dir)?,
            })?)
        }
        DirectorySettings::HsdsPackage { name, path, category_map, .. } => std::sync::Arc::new(
            hsds::HsdsPackage::new(name, path.clone())
                .with_categories(hsds_categories(category_map.as_deref(), mappings_dir)?),
        ),
        DirectorySettings::FhirDirectory { name, base_url, per_page, bearer_token_env, timeout_secs, .. } => {
            let token = bearer_token_env.as_deref().map(|var| credential(var, name)).transpose()?;
            let timeout = Duration::from_secs(*timeout_secs);
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
    fn phones_kept_as_bare_numbers_by_an_older_version_still_read() {
        let old: Vec<Phone> = serde_json::from_value(serde_json::json!(["503-555-0100",
            {"number": "503-555-0101", "type": "fax", "languages": ["es"]}]))
        .expect("both shapes");
        assert_eq!(old[0], Phone::number("503-555-0100"));
        assert_eq!((old[1].kind.as_deref(), old[1].languages.as_slice()), (Some("fax"), &["es".to_owned()][..]));
        let kept = serde_json::to_value(&old[1]).expect("serialises");
        assert_eq!(kept, serde_json::json!({"number": "503-555-0101", "type": "fax", "languages": ["es"]}));
    }

    #[test]
    fn an_hsds_source_without_its_category_map_is_refused_with_the_file_named() {
        let settings: crate::config::DirectorySettings = serde_json::from_value(serde_json::json!({
            "type": "hsds_package", "name": "demo", "path": "fixtures/directory/hsds",
            "category_map": "directory/missing-map.json"}))
        .expect("settings");
        let mappings = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings");
        let error = source_from_settings(&settings, &mappings).err().expect("no source without its map");
        assert!(error.to_string().contains("directory/missing-map.json"), "{error}");
        let shipped: crate::config::DirectorySettings = serde_json::from_value(serde_json::json!({
            "type": "hsds_package", "name": "demo", "path": "fixtures/directory/hsds",
            "category_map": "directory/open-eligibility-category.json"}))
        .expect("settings");
        assert!(source_from_settings(&shipped, &mappings).is_ok());
    }

    #[test]
    fn gateway_ids_are_readable_when_they_can_be_and_stable_hashes_otherwise() {
        assert_eq!(gateway_id("pdx211", "pdx-eastside-pantry"), "pdx211.pdx-eastside-pantry");
        let hashed = gateway_id("pdx211", "ac148810 d857/441c");
        assert!(hashed.starts_with("pdx211.") && hashed.len() == 7 + 24, "{hashed}");
        assert_eq!(hashed, gateway_id("pdx211", "ac148810 d857/441c"));
        assert_ne!(hashed, gateway_id("sea211", "ac148810 d857/441c"));
    }
}
