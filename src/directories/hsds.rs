//! Open Referral HSDS 3.0 sources: an HSDS API (`GET /services?page=&per_page=&modified_after=`, its list shape
//! completed by `full=true` or `GET /services/{id}` as a probe decides) or an HSDS data package of JSON files on
//! disk, and the mapping of an HSDS service into the catalog.
//!
//! Only the parts of HSDS the catalog uses are read; the whole record is kept as received.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::fhir_directory::CategoryMap;
use super::{
    CatalogLocation, CatalogOrganization, CatalogService, DirectorySource, Fetched, Phone, ReadPlan, Schedule,
    ServiceAtLocation, SourceError, SourcePage, TaxonomyTerm, gateway_id, hours,
};
use crate::config::HsdsDetail;
use crate::outbound::HttpClient;

/// HSDS service statuses.
const STATUSES: [&str; 4] = ["active", "inactive", "defunct", "temporarily closed"];

#[derive(Debug, Deserialize)]
struct Service {
    id: Option<String>,
    name: Option<String>,
    alternate_name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    url: Option<String>,
    email: Option<String>,
    status: Option<String>,
    eligibility_description: Option<String>,
    minimum_age: Option<f64>,
    maximum_age: Option<f64>,
    last_modified: Option<String>,
    #[serde(default)]
    languages: Vec<Language>,
    #[serde(default)]
    schedules: Vec<HsdsSchedule>,
    #[serde(default)]
    phones: Vec<HsdsPhone>,
    organization: Option<Organization>,
    #[serde(default)]
    service_at_locations: Vec<HsdsServiceAtLocation>,
    #[serde(default)]
    attributes: Vec<Attribute>,
}

#[derive(Debug, Deserialize)]
struct Language {
    code: Option<String>,
}

#[derive(Debug, Deserialize)]
struct HsdsSchedule {
    id: Option<String>,
    byday: Option<String>,
    opens_at: Option<String>,
    closes_at: Option<String>,
    /// UTC offset in hours; a number in HSDS, though a numeric string is read too.
    timezone: Option<Value>,
}

/// One HSDS schedule in the catalog: its times without their UTC offset, and the fixed offset it states, if any
/// (a time's own `Z`/`±HH:MM` suffix, else the schedule's `timezone`; a time with neither shares the other's).
fn schedule(at: &str, i: usize, s: HsdsSchedule) -> Result<Schedule, String> {
    let field = |name: &str, e: String| format!("{at}schedules[{i}].{name}: {e}");
    let clock = |name: &str, t: Option<String>| {
        present(t).map(|t| hours::parse_clock(&t).map_err(|e| field(name, e))).transpose()
    };
    let opens = clock("opens_at", s.opens_at)?;
    let closes = clock("closes_at", s.closes_at)?;
    let stated = match s.timezone {
        None | Some(Value::Null) => None,
        Some(v) => {
            let in_hours = v.as_f64().or_else(|| v.as_str().and_then(|t| t.trim().parse().ok()));
            let in_hours = in_hours.ok_or_else(|| field("timezone", "expected a UTC offset in hours".into()))?;
            Some(hours::offset_from_hours(in_hours).map_err(|e| field("timezone", e))?)
        }
    };
    let opens_offset = opens.as_ref().and_then(|c| c.utc_offset_minutes).or(stated);
    let closes_offset = closes.as_ref().and_then(|c| c.utc_offset_minutes).or(stated);
    let offset = opens_offset.or(closes_offset);
    // One schedule, one offset: a closing time written at another offset is said again at the opening's.
    let closes_at = match (closes, closes_offset, offset) {
        (Some(c), Some(from), Some(to)) if from != to => {
            Some(hours::shift_clock(&c.local, from, to).ok_or_else(|| field("closes_at", "not a time".into()))?)
        }
        (c, _, _) => c.map(|c| c.local),
    };
    Ok(Schedule {
        id: present(s.id),
        days: s.byday.map(|d| d.split(',').map(|x| x.trim().to_ascii_uppercase()).collect()).unwrap_or_default(),
        opens_at: opens.map(|c| c.local),
        closes_at,
        utc_offset_minutes: offset,
    })
}

fn schedules(at: &str, list: Vec<HsdsSchedule>) -> Result<Vec<Schedule>, String> {
    list.into_iter().enumerate().map(|(i, s)| schedule(at, i, s)).collect()
}

#[derive(Debug, Deserialize)]
struct HsdsPhone {
    id: Option<String>,
    number: Option<String>,
    extension: Option<Value>,
    #[serde(rename = "type")]
    kind: Option<String>,
    description: Option<String>,
    #[serde(default)]
    languages: Vec<Language>,
}

/// Phones with a number (a phone without one says nothing to call).
fn phones(list: Vec<HsdsPhone>) -> Vec<Phone> {
    list.into_iter()
        .filter_map(|p| {
            let number = present(p.number)?;
            let extension = match p.extension {
                Some(Value::String(x)) => present(Some(x)),
                Some(Value::Number(n)) => Some(n.to_string()),
                _ => None,
            };
            Some(Phone {
                id: present(p.id),
                number,
                extension,
                kind: present(p.kind),
                description: present(p.description),
                languages: language_codes(p.languages),
            })
        })
        .collect()
}

/// Language codes, lower case, each once, in order.
fn language_codes(list: Vec<Language>) -> Vec<String> {
    let mut codes: Vec<String> =
        list.into_iter().filter_map(|l| present(l.code)).map(|c| c.to_ascii_lowercase()).collect();
    codes.sort();
    codes.dedup();
    codes
}

#[derive(Debug, Deserialize)]
struct Organization {
    id: Option<String>,
    name: Option<String>,
    description: Option<String>,
    website: Option<String>,
    email: Option<String>,
    parent_organization_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct HsdsServiceAtLocation {
    id: Option<String>,
    location: Option<Location>,
    #[serde(default)]
    phones: Vec<HsdsPhone>,
    #[serde(default)]
    schedules: Vec<HsdsSchedule>,
}

#[derive(Debug, Deserialize)]
struct Location {
    id: Option<String>,
    name: Option<String>,
    latitude: Option<f64>,
    longitude: Option<f64>,
    #[serde(default)]
    addresses: Vec<Address>,
    #[serde(default)]
    phones: Vec<HsdsPhone>,
    #[serde(default)]
    languages: Vec<Language>,
    #[serde(default)]
    schedules: Vec<HsdsSchedule>,
}

#[derive(Debug, Deserialize)]
struct Address {
    address_1: Option<String>,
    city: Option<String>,
    state_province: Option<String>,
    postal_code: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Attribute {
    id: Option<String>,
    link_type: Option<String>,
    taxonomy_term: Option<Term>,
}

#[derive(Debug, Deserialize)]
struct Term {
    id: Option<String>,
    code: Option<String>,
    name: Option<String>,
    taxonomy: Option<String>,
    parent_id: Option<String>,
    taxonomy_detail: Option<TaxonomyDetail>,
}

#[derive(Debug, Deserialize)]
struct TaxonomyDetail {
    name: Option<String>,
    uri: Option<String>,
}

fn present(s: Option<String>) -> Option<String> {
    s.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
}

/// `id` when it is a UUID (HSDS ids are), in its canonical lower-case form.
fn uuid_of(id: &str) -> Option<String> {
    uuid::Uuid::parse_str(id).ok().map(|u| u.to_string())
}

/// Maps one HSDS 3.0 service object into the catalog, without a category map.
///
/// # Errors
/// As [`normalise_with`].
pub fn normalise_service(source: &str, raw: &Value) -> Result<CatalogService, String> {
    normalise_with(source, raw, &CategoryMap::default())
}

/// Maps one HSDS 3.0 service object into the catalog; each taxonomy term `categories` maps (by the term's
/// taxonomy name or URI and its code) also gives the service its agency categories.
///
/// # Errors
/// A sentence naming the field that makes the record unusable (missing id or name, unknown status, coordinates
/// off the globe, a schedule time or UTC offset that is not one, a field of the wrong type).
pub fn normalise_with(source: &str, raw: &Value, categories: &CategoryMap) -> Result<CatalogService, String> {
    let service: Service = serde_path_to_error::deserialize(raw).map_err(|e| {
        let inner = e.inner().to_string();
        let message = inner.rsplit_once(" at line ").map_or(inner.as_str(), |(m, _)| m);
        format!("{}: {message}", e.path())
    })?;
    let source_id = present(service.id).ok_or("id: missing")?;
    let name = present(service.name).ok_or("name: missing")?;
    let status = present(service.status).ok_or("status: missing")?;
    if !STATUSES.contains(&status.as_str()) {
        return Err(format!("status: `{status}` is not one of {}", STATUSES.join(", ")));
    }
    let source_modified = match present(service.last_modified) {
        None => None,
        Some(t) => Some(OffsetDateTime::parse(&t, &Rfc3339).map_err(|_| "last_modified: not an RFC 3339 date-time")?),
    };
    let mut locations = Vec::new();
    for (i, sal) in service.service_at_locations.into_iter().enumerate() {
        let Some(l) = sal.location else { continue };
        let at = format!("service_at_locations[{i}].");
        let location_id = present(l.id).ok_or(format!("{at}location.id: missing"))?;
        if l.latitude.is_some_and(|v| !(-90.0..=90.0).contains(&v))
            || l.longitude.is_some_and(|v| !(-180.0..=180.0).contains(&v))
        {
            return Err(format!("{at}location: latitude/longitude off the globe"));
        }
        let address = l.addresses.into_iter().next();
        let here = ServiceAtLocation {
            id: present(sal.id),
            phones: phones(sal.phones),
            schedules: schedules(&at, sal.schedules)?,
        };
        locations.push(CatalogLocation {
            id: gateway_id(source, &location_id),
            public_id: uuid_of(&location_id),
            source_id: location_id,
            name: present(l.name),
            latitude: l.latitude,
            longitude: l.longitude,
            address: address.as_ref().and_then(|a| present(a.address_1.clone())),
            city: address.as_ref().and_then(|a| present(a.city.clone())),
            state: address.as_ref().and_then(|a| present(a.state_province.clone())),
            postal_code: address.and_then(|a| present(a.postal_code)),
            phones: phones(l.phones),
            languages: language_codes(l.languages),
            schedules: schedules(&format!("{at}location."), l.schedules)?,
            service_at_location: (here != ServiceAtLocation::default()).then_some(here),
        });
    }
    let organization = match service.organization {
        None => None,
        Some(o) => {
            let org_id = present(o.id).ok_or("organization.id: missing")?;
            Some(CatalogOrganization {
                id: gateway_id(source, &org_id),
                public_id: uuid_of(&org_id),
                source_id: org_id,
                name: present(o.name).ok_or("organization.name: missing")?,
                // As the source wrote it: spaces at either end may be part of what it means to show.
                description: o.description.filter(|d| !d.trim().is_empty()),
                url: present(o.website),
                email: present(o.email),
                parent_organization_id: present(o.parent_organization_id),
            })
        }
    };
    let mut terms: Vec<TaxonomyTerm> = Vec::new();
    for a in service.attributes {
        let Some(t) = a.taxonomy_term else { continue };
        let uri = t.taxonomy_detail.as_ref().and_then(|d| present(d.uri.clone()));
        let Some(taxonomy) = present(t.taxonomy).or_else(|| t.taxonomy_detail.and_then(|d| present(d.name))) else {
            continue;
        };
        let Some(code) = present(t.code) else { continue };
        let mut mapped: Vec<TaxonomyTerm> = categories.categories(&taxonomy, &code).to_vec();
        if let Some(uri) = &uri {
            mapped.extend(categories.categories(uri, &code).iter().cloned());
        }
        terms.push(TaxonomyTerm {
            name: present(t.name).unwrap_or_else(|| code.clone()),
            taxonomy,
            code,
            id: present(t.id),
            parent_id: present(t.parent_id),
            attribute_id: present(a.id),
            link_type: present(a.link_type),
        });
        terms.extend(mapped);
    }
    // Stable sort: a term the source gives itself comes before the same category a map adds.
    terms.sort_by(|a, b| (&a.taxonomy, &a.code).cmp(&(&b.taxonomy, &b.code)));
    terms.dedup_by(|a, b| a.taxonomy == b.taxonomy && a.code == b.code);
    let languages = language_codes(service.languages);
    let schedules = schedules("", service.schedules)?;
    Ok(CatalogService {
        id: gateway_id(source, &source_id),
        source: source.to_owned(),
        public_id: uuid_of(&source_id),
        source_id,
        name,
        alternate_name: present(service.alternate_name),
        // As the source wrote it, trailing spaces and line breaks included.
        description: service.description.unwrap_or_default(),
        status,
        url: present(service.url),
        email: present(service.email),
        eligibility: present(service.eligibility_description),
        minimum_age: service.minimum_age,
        maximum_age: service.maximum_age,
        organization,
        locations,
        terms,
        languages,
        schedules,
        phones: phones(service.phones),
        source_modified,
        time_zone: None,
    })
}

/// Records of a JSON document: one service, an array of them, or an API page (`contents`).
fn records_of(doc: Value) -> Result<Vec<Value>, String> {
    match doc {
        Value::Array(items) => Ok(items),
        Value::Object(mut o) if o.contains_key("contents") => match o.remove("contents") {
            Some(Value::Array(items)) => Ok(items),
            _ => Err("`contents` is not an array".into()),
        },
        Value::Object(o) => Ok(vec![Value::Object(o)]),
        _ => Err("expected a service object, an array of them, or a page with `contents`".into()),
    }
}

/// What an [`HsdsApi`] is built from.
pub struct HsdsApiSettings<'a> {
    /// The source's name.
    pub name: &'a str,
    /// The API root, without `/services`.
    pub base_url: &'a str,
    /// Services per page.
    pub per_page: u32,
    /// How full records are read.
    pub detail: HsdsDetail,
    /// Most requests in flight at once.
    pub max_concurrent_requests: usize,
    /// The HTTP client (timeout, retries, credential).
    pub client: HttpClient,
    /// The source's taxonomy → agency categories (empty: none).
    pub categories: CategoryMap,
}

/// An HSDS 3.0 API: `GET /services?page=&per_page=` (the `service_list` shape, often one-to-one fields only),
/// `full=true` where the API offers it, and `GET /services/{id}` (the full `service`).
pub struct HsdsApi {
    name: String,
    base_url: url::Url,
    per_page: u32,
    configured: HsdsDetail,
    /// How this sync reads full records (decided by `prepare`).
    detail: std::sync::Mutex<HsdsDetail>,
    max_concurrent_requests: usize,
    client: HttpClient,
    categories: CategoryMap,
}

/// The JSON media type HSDS APIs answer with.
const JSON: &str = "application/json";

/// Fields of the full service that its list shape leaves out; a record carrying any of them is whole.
const DETAIL_FIELDS: [&str; 6] = ["service_at_locations", "phones", "languages", "schedules", "attributes", "contacts"];

/// List items and full records a probe looks at.
const PROBE_RECORDS: usize = 5;

fn detail_name(detail: HsdsDetail) -> &'static str {
    match detail {
        HsdsDetail::Auto | HsdsDetail::List => "list",
        HsdsDetail::FullParam => "full_param",
        HsdsDetail::PerService => "per_service",
    }
}

fn detail_of(name: &str) -> Option<HsdsDetail> {
    match name {
        "list" => Some(HsdsDetail::List),
        "full_param" => Some(HsdsDetail::FullParam),
        "per_service" => Some(HsdsDetail::PerService),
        _ => None,
    }
}

/// Whether a service record carries anything its list shape leaves out.
fn has_detail(raw: &Value) -> bool {
    DETAIL_FIELDS.iter().any(|f| raw.get(*f).and_then(Value::as_array).is_some_and(|a| !a.is_empty()))
}

/// One HSDS page object, checked: `contents` an array, `page_number` the page asked for, totals numbers, and no
/// empty page before the last.
fn parse_page(body: &[u8], page: u32) -> Result<SourcePage, SourceError> {
    let bad = |what: String| SourceError::Malformed(format!("page {page}: {what}"));
    let doc: Value = serde_json::from_slice(body).map_err(|_| bad("not JSON".into()))?;
    let Value::Object(mut o) = doc else { return Err(bad("not a page object".into())) };
    let number = |o: &serde_json::Map<String, Value>, key: &str| match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| bad(format!("`{key}` is not a count"))),
    };
    let total_items = number(&o, "total_items")?;
    let total_pages = number(&o, "total_pages")?;
    let page_number = number(&o, "page_number")?;
    let last_page = o.get("last_page").and_then(Value::as_bool);
    let Some(Value::Array(contents)) = o.remove("contents") else {
        return Err(bad("no `contents` array (not a page of services)".into()));
    };
    if page_number.is_some_and(|n| n != u64::from(page)) {
        return Err(bad(format!("the source says it is page {}", show(page_number))));
    }
    if contents.is_empty() && total_pages.is_some_and(|t| u64::from(page) < t) {
        return Err(bad(format!("empty, though the source says it has {} pages", show(total_pages))));
    }
    let more = match (total_pages, last_page) {
        (Some(total), _) => u64::from(page) < total,
        (None, Some(last)) => !last,
        (None, None) => !contents.is_empty(),
    };
    Ok(SourcePage { records: contents, more, rejected: Vec::new(), total_items, total_pages })
}

fn show(n: Option<u64>) -> String {
    n.map_or_else(|| "?".to_owned(), |n| n.to_string())
}

impl HsdsApi {
    /// A source reading `settings.base_url` (the API root, without `/services`).
    ///
    /// # Errors
    /// When the base URL is not one.
    pub fn new(settings: HsdsApiSettings<'_>) -> Result<Self, SourceError> {
        let base = format!("{}/", settings.base_url.trim_end_matches('/'));
        let base_url = url::Url::parse(&base).map_err(|e| SourceError::Malformed(format!("base_url: {e}")))?;
        Ok(HsdsApi {
            name: settings.name.to_owned(),
            base_url,
            per_page: settings.per_page,
            configured: settings.detail,
            detail: std::sync::Mutex::new(settings.detail),
            max_concurrent_requests: settings.max_concurrent_requests.max(1),
            client: settings.client,
            categories: settings.categories,
        })
    }

    fn current(&self) -> HsdsDetail {
        *self.detail.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `<base>/services` or `<base>/services/<id>`, the id as one path segment.
    fn services_url(&self, id: Option<&str>) -> Result<url::Url, SourceError> {
        let mut url = self.base_url.clone();
        url.path_segments_mut()
            .map_err(|()| SourceError::Malformed("base_url cannot take a path".into()))?
            .pop_if_empty()
            .push("services")
            .extend(id);
        Ok(url)
    }

    async fn list(
        &self,
        page: u32,
        modified_after: Option<OffsetDateTime>,
        full: bool,
    ) -> Result<SourcePage, SourceError> {
        let mut query = vec![("page", page.to_string()), ("per_page", self.per_page.to_string())];
        if full {
            query.push(("full", "true".to_owned()));
        }
        if let Some(t) = modified_after {
            query.push(("modified_after", t.format(&Rfc3339).map_err(|e| SourceError::Malformed(e.to_string()))?));
        }
        let answer = self.client.get(self.services_url(None)?.as_str(), &query, JSON).await?;
        if answer.is_gone() {
            return Err(
                crate::outbound::Failure::Status { status: answer.status, body: "no /services here".into() }.into()
            );
        }
        parse_page(&answer.body, page)
    }

    /// Decides how full records are read by looking at what the API gives: the list, `full=true`, or
    /// `/services/{id}`.
    async fn probe(&self) -> Result<ReadPlan, SourceError> {
        let listed = self.list(1, None, false).await?;
        let sample: Vec<&Value> = listed.records.iter().take(PROBE_RECORDS).collect();
        if sample.is_empty() {
            return Ok(ReadPlan {
                detail: "list".into(),
                note: Some("nothing listed to probe yet".into()),
                keep: false,
            });
        }
        if sample.iter().any(|r| has_detail(r)) {
            return Ok(ReadPlan {
                detail: "list".into(),
                note: Some("the list items carry locations, phones or other detail".into()),
                keep: true,
            });
        }
        // An API without `full=true` may refuse it (400) or ignore it: either way, not the way.
        if let Ok(full) = self.list(1, None, true).await
            && full.records.iter().take(PROBE_RECORDS).any(has_detail)
        {
            return Ok(ReadPlan {
                detail: "full_param".into(),
                note: Some("the list carries one-to-one fields only; full=true gives the full services".into()),
                keep: true,
            });
        }
        for raw in sample {
            let Some(id) = raw.get("id").and_then(Value::as_str) else { continue };
            if let Fetched::Found(full) = self.read_one(id).await?
                && has_detail(&full)
            {
                return Ok(ReadPlan {
                    detail: "per_service".into(),
                    note: Some(
                        "the list carries one-to-one fields only; /services/{id} gives the full services".into(),
                    ),
                    keep: true,
                });
            }
        }
        Ok(ReadPlan {
            detail: "list".into(),
            note: Some(
                "neither the list, full=true nor /services/{id} gives locations, phones, languages, schedules or \
                 taxonomy; services are kept as listed"
                    .into(),
            ),
            keep: true,
        })
    }

    async fn read_one(&self, source_id: &str) -> Result<Fetched, SourceError> {
        let answer = self.client.get(self.services_url(Some(source_id))?.as_str(), &[], JSON).await?;
        if answer.is_gone() {
            return Ok(Fetched::Gone);
        }
        let raw: Value = serde_json::from_slice(&answer.body)
            .map_err(|_| SourceError::Malformed(format!("/services/{source_id}: not JSON")))?;
        if !raw.is_object() || raw.get("id").and_then(Value::as_str) != Some(source_id) {
            return Err(SourceError::Malformed(format!("/services/{source_id}: not that service")));
        }
        Ok(Fetched::Found(raw))
    }
}

#[async_trait]
impl DirectorySource for HsdsApi {
    fn name(&self) -> &str {
        &self.name
    }

    async fn page(&self, page: u32, modified_after: Option<OffsetDateTime>) -> Result<SourcePage, SourceError> {
        self.list(page, modified_after, self.current() == HsdsDetail::FullParam).await
    }

    fn normalise(&self, raw: &Value) -> Result<CatalogService, String> {
        normalise_with(&self.name, raw, &self.categories)
    }

    async fn prepare(&self, recorded: Option<&str>) -> Result<Option<ReadPlan>, SourceError> {
        let plan = match (self.configured, recorded.and_then(detail_of)) {
            (HsdsDetail::Auto, Some(kept)) => ReadPlan { detail: detail_name(kept).into(), note: None, keep: true },
            (HsdsDetail::Auto, None) => self.probe().await?,
            (chosen, _) => ReadPlan { detail: detail_name(chosen).into(), note: None, keep: true },
        };
        let decided = detail_of(&plan.detail).unwrap_or(HsdsDetail::List);
        *self.detail.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = decided;
        Ok(Some(plan))
    }

    fn lists_in_full(&self) -> bool {
        self.current() != HsdsDetail::PerService
    }

    async fn fetch(&self, source_id: &str) -> Result<Fetched, SourceError> {
        self.read_one(source_id).await
    }

    fn max_concurrent_requests(&self) -> usize {
        self.max_concurrent_requests
    }
}

/// An HSDS data package on disk: a JSON file, a directory of them (each a service, an array, or an API page), or
/// a directory holding `services.csv`, the tabular (CSV) package ([`super::hsds_csv`]).
pub struct HsdsPackage {
    name: String,
    path: PathBuf,
    categories: CategoryMap,
}

impl HsdsPackage {
    /// A source reading `path`.
    #[must_use]
    pub fn new(name: &str, path: PathBuf) -> Self {
        HsdsPackage { name: name.to_owned(), path, categories: CategoryMap::default() }
    }

    /// The same source, giving agency categories to the taxonomy terms `categories` maps.
    #[must_use]
    pub fn with_categories(mut self, categories: CategoryMap) -> Self {
        self.categories = categories;
        self
    }
}

/// The JSON files of a package: the file itself, or the `*.json` files of the directory, in name order.
fn package_files(path: &Path) -> Result<Vec<PathBuf>, SourceError> {
    let err = |detail: String| SourceError::File { path: path.display().to_string(), detail };
    if path.is_file() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| err(e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    Ok(files)
}

/// Reads a whole package (JSON files or the CSV tables): blocking file IO and parsing, for the blocking pool.
fn read_package(path: &Path) -> Result<(Vec<Value>, Vec<super::Rejection>), SourceError> {
    // A CSV package is recognised first: its `datapackage.json` describes tables, it is no service.
    if super::hsds_csv::is_package(path) {
        return super::hsds_csv::read_records(path);
    }
    let mut records = Vec::new();
    for file in package_files(path)? {
        let err = |detail: String| SourceError::File { path: file.display().to_string(), detail };
        let text = std::fs::read_to_string(&file).map_err(|e| err(e.to_string()))?;
        let doc: Value = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        records.extend(records_of(doc).map_err(err)?);
    }
    Ok((records, Vec::new()))
}

#[async_trait]
impl DirectorySource for HsdsPackage {
    fn name(&self) -> &str {
        &self.name
    }

    /// A package is read whole, as one page; `modified_after` filters on `last_modified`.
    async fn page(&self, page: u32, modified_after: Option<OffsetDateTime>) -> Result<SourcePage, SourceError> {
        if page > 1 {
            return Ok(SourcePage::default());
        }
        // Reading and parsing a large package takes seconds of CPU: never on the async workers that answer requests.
        let path = self.path.clone();
        let (mut records, rejected) =
            tokio::task::spawn_blocking(move || read_package(&path)).await.map_err(|e| SourceError::File {
                path: self.path.display().to_string(),
                detail: format!("the reader stopped: {e}"),
            })??;
        if let Some(since) = modified_after {
            records.retain(|r| {
                r.get("last_modified")
                    .and_then(Value::as_str)
                    .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
                    .is_none_or(|t| t > since)
            });
        }
        Ok(SourcePage { records, more: false, rejected, ..SourcePage::default() })
    }

    fn normalise(&self, raw: &Value) -> Result<CatalogService, String> {
        normalise_with(&self.name, raw, &self.categories)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> Value {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/interop/data/hsds-3.0/examples/service_full.json"
        ));
        // The reference example lives beside the repository; without it, a minimal service stands in.
        text.ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_else(|| {
            serde_json::json!({"id": "ac148810", "name": "Community Counselling", "status": "active",
                "description": "Counselling", "languages": [{"code": "UR"}],
                "organization": {"id": "d9d5e0f5", "name": "Example Organization Inc."}})
        })
    }

    #[test]
    fn the_reference_service_maps_into_the_catalog_once_its_coordinates_are_on_the_globe() {
        let mut raw = example();
        if raw.pointer("/service_at_locations/0/location").is_some() {
            // The published example places its location at latitude 100, which no real place has.
            assert!(normalise_service("ref", &raw).expect_err("off the globe").contains("latitude"));
            raw["service_at_locations"][0]["location"]["latitude"] = Value::from(45.52);
            raw["service_at_locations"][0]["location"]["longitude"] = Value::from(-122.68);
        }
        let service = normalise_service("ref", &raw).expect("valid");
        assert_eq!(service.name, "Community Counselling");
        assert_eq!(service.status, "active");
        assert_eq!(service.organization.as_ref().map(|o| o.name.as_str()), Some("Example Organization Inc."));
        assert!(service.languages.iter().all(|l| l == &l.to_ascii_lowercase()));
    }

    #[test]
    fn records_without_id_name_or_a_known_status_are_refused_with_the_field() {
        let mut raw = example();
        raw["status"] = Value::from("open");
        assert!(normalise_service("s", &raw).expect_err("bad status").starts_with("status:"));
        raw["status"] = Value::from("active");
        raw["name"] = Value::from(" ");
        assert!(normalise_service("s", &raw).expect_err("no name").starts_with("name:"));
        raw["name"] = Value::from(42);
        assert!(normalise_service("s", &raw).expect_err("wrong type").starts_with("name:"));
    }

    #[test]
    fn a_page_is_refused_unless_it_is_a_well_formed_page_of_services() {
        let page = |v: Value, n: u32| parse_page(v.to_string().as_bytes(), n);
        let e = page(serde_json::json!({"error": "maintenance"}), 2).expect_err("no contents");
        assert!(e.to_string().contains("page 2: no `contents` array"), "{e}");
        let e = page(serde_json::json!({"contents": [], "total_pages": 3, "page_number": 2}), 2).expect_err("empty");
        assert!(e.to_string().contains("empty, though the source says it has 3 pages"), "{e}");
        let e = page(serde_json::json!({"contents": [{"id": "a"}], "page_number": 1}), 2).expect_err("wrong page");
        assert!(e.to_string().contains("says it is page 1"), "{e}");
        assert!(page(serde_json::json!({"contents": {}}), 1).is_err());
        assert!(page(serde_json::json!({"contents": [], "total_items": "many"}), 1).is_err());
        let last = page(serde_json::json!({"contents": [{"id": "a"}], "total_items": 1, "total_pages": 1}), 1)
            .expect("a page");
        assert_eq!((last.records.len(), last.more, last.total_items), (1, false, Some(1)));
        // Without totals, a page says whether more follow by `last_page`, else by not being empty.
        assert!(page(serde_json::json!({"contents": [{"id": "a"}], "last_page": false}), 1).expect("page").more);
        assert!(!page(serde_json::json!({"contents": []}), 4).expect("the end").more);
    }

    #[test]
    fn a_record_carrying_any_full_service_field_is_whole() {
        assert!(!has_detail(&serde_json::json!({"id": "a", "name": "A", "phones": []})));
        assert!(has_detail(&serde_json::json!({"id": "a", "phones": [{"number": "1"}]})));
    }

    fn with_schedule(schedule: Value) -> Value {
        serde_json::json!({"id": "clinic", "name": "Clinic", "status": "active", "schedules": [schedule]})
    }

    #[test]
    fn a_schedule_offset_from_a_time_suffix_or_timezone_wins_over_the_source_zone() {
        use time::macros::datetime;
        let suffixed = serde_json::json!({"byday": "MO", "opens_at": "09:00-07:00", "closes_at": "17:00-07:00"});
        let numeric =
            serde_json::json!({"byday": "MO", "opens_at": "09:00:00", "closes_at": "17:00:00", "timezone": -7});
        let text = serde_json::json!({"byday": "MO", "opens_at": "09:00", "closes_at": "17:00", "timezone": "-7"});
        for raw in [suffixed, numeric, text] {
            let mut service = normalise_service("s", &with_schedule(raw.clone())).expect("valid");
            assert_eq!(service.schedules[0].utc_offset_minutes, Some(-420), "{raw}");
            assert!(service.schedules[0].opens_at.as_deref().is_some_and(|t| t.starts_with("09:00")), "{raw}");
            // The source says Los Angeles, the schedule says UTC-7: in January that is 09:30 at UTC-7 (08:30 in
            // Los Angeles), open by the schedule's own offset.
            service.time_zone = Some("America/Los_Angeles".into());
            let intervals = hours::weekly_intervals(&service);
            assert!(hours::is_open(&intervals, datetime!(2026-01-12 16:30 UTC)), "{raw}");
            assert!(!hours::is_open(&intervals, datetime!(2026-01-12 15:30 UTC)), "{raw}");
        }
        // `Z` is UTC; a closing time at another offset is said again at the opening's.
        let utc = normalise_service(
            "s",
            &with_schedule(serde_json::json!({"byday": "TU", "opens_at": "16:00Z",
            "closes_at": "17:00-07:00"})),
        )
        .expect("valid");
        assert_eq!(
            (utc.schedules[0].opens_at.as_deref(), utc.schedules[0].closes_at.as_deref()),
            (Some("16:00"), Some("00:00"))
        );
        assert_eq!(utc.schedules[0].utc_offset_minutes, Some(0));
        // Without any offset, the times stay the source's local time.
        let local = normalise_service(
            "s",
            &with_schedule(serde_json::json!({"byday": "MO,WE", "opens_at": "08:00",
            "closes_at": "18:00"})),
        )
        .expect("valid");
        assert_eq!(local.schedules[0].utc_offset_minutes, None);
        assert_eq!(local.schedules[0].days, ["MO", "WE"]);
    }

    /// A service whose phones, languages and hours are on its locations, as many HSDS APIs give them.
    fn located() -> Value {
        serde_json::json!({
            "id": "7c4f5c9e-1b8a-4d1e-9c6e-2f1f0b5d7a10", "name": "Westside Clinic",
            "alternate_name": "Sức khỏe Tâm thần Westside", "status": "active",
            "description": "Walk-in counselling.  \n",
            "organization": {"id": "0d0b7a34-5a43-4f6d-8f0e-9c2b9d1e4a21", "name": "Westside Health",
                "description": "A clinic. ", "parent_organization_id": "4a9e1c2b-6d3f-4e5a-8b7c-1d2e3f4a5b6c"},
            "service_at_locations": [{
                "id": "5e6f7a8b-9c0d-4e1f-8a2b-3c4d5e6f7a8b",
                "phones": [{"id": "sal-phone", "number": "503-555-0199"}],
                "schedules": [{"id": "sal-hours", "byday": "SA", "opens_at": "10:00", "closes_at": "14:00"}],
                "location": {
                    "id": "9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a", "name": "Westside", "latitude": 45.5,
                    "longitude": -122.7,
                    "phones": [{"id": "loc-phone", "number": "503-555-0100", "languages": [{"code": "VI"}]}],
                    "languages": [{"code": "es"}],
                    "schedules": [{"id": "loc-hours", "byday": "MO,TU", "opens_at": "09:00", "closes_at": "17:00"}]
                }
            }],
            "attributes": [{"id": "attr-1", "link_type": "eligibility", "taxonomy_term": {
                "id": "term-child", "code": "counseling", "name": "Counseling", "taxonomy": "open-eligibility",
                "parent_id": "term-parent"}}]
        })
    }

    #[test]
    fn location_and_service_at_location_phones_languages_and_hours_are_kept_with_the_source_ids() {
        let s = normalise_service("west", &located()).expect("valid");
        assert_eq!(s.alternate_name.as_deref(), Some("Sức khỏe Tâm thần Westside"));
        assert_eq!(s.description, "Walk-in counselling.  \n", "as the source wrote it");
        assert_eq!(s.public_id.as_deref(), Some("7c4f5c9e-1b8a-4d1e-9c6e-2f1f0b5d7a10"));
        let org = s.organization.as_ref().expect("organization");
        assert_eq!(org.parent_organization_id.as_deref(), Some("4a9e1c2b-6d3f-4e5a-8b7c-1d2e3f4a5b6c"));
        assert_eq!(org.description.as_deref(), Some("A clinic. "));
        let l = &s.locations[0];
        assert_eq!(l.public_id.as_deref(), Some("9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a"));
        assert_eq!(
            (l.phones[0].number.as_str(), l.phones[0].languages.as_slice()),
            ("503-555-0100", &["vi".to_owned()][..])
        );
        assert_eq!(l.languages, ["es"]);
        assert_eq!(
            (l.schedules[0].id.as_deref(), l.schedules[0].days.as_slice()),
            (Some("loc-hours"), &["MO".to_owned(), "TU".to_owned()][..])
        );
        let here = l.service_at_location.as_ref().expect("service at location");
        assert_eq!(here.id.as_deref(), Some("5e6f7a8b-9c0d-4e1f-8a2b-3c4d5e6f7a8b"));
        assert_eq!(here.phones[0].number, "503-555-0199");
        assert_eq!(here.schedules[0].days, ["SA"]);
        let t = &s.terms[0];
        assert_eq!((t.id.as_deref(), t.parent_id.as_deref()), (Some("term-child"), Some("term-parent")));
        assert_eq!((t.attribute_id.as_deref(), t.link_type.as_deref()), (Some("attr-1"), Some("eligibility")));
    }

    #[test]
    fn a_term_the_source_category_map_lists_also_gives_the_agency_category() {
        let map = CategoryMap::load(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings/directory/open-eligibility-category.json"),
        )
        .expect("the shipped map loads");
        let s = normalise_with("west", &located(), &map).expect("valid");
        let codes: Vec<(&str, &str)> = s.terms.iter().map(|t| (t.taxonomy.as_str(), t.code.as_str())).collect();
        assert_eq!(codes, [(super::super::CATEGORY_TAXONOMY, "therapy"), ("open-eligibility", "counseling")]);
        let without = normalise_service("west", &located()).expect("valid");
        assert_eq!(without.terms.len(), 1, "no map, no category");
    }

    #[test]
    fn a_schedule_time_or_offset_that_is_not_one_refuses_the_record_with_the_field() {
        for (schedule, field) in [
            (serde_json::json!({"opens_at": "9am", "closes_at": "17:00"}), "schedules[0].opens_at:"),
            (serde_json::json!({"opens_at": "09:00", "closes_at": "25:00"}), "schedules[0].closes_at:"),
            (serde_json::json!({"opens_at": "09:00+15:00"}), "schedules[0].opens_at:"),
            (serde_json::json!({"opens_at": "09:00", "timezone": "PST"}), "schedules[0].timezone:"),
            (serde_json::json!({"opens_at": "09:00", "timezone": 20}), "schedules[0].timezone:"),
        ] {
            let e = normalise_service("s", &with_schedule(schedule.clone())).expect_err("refused");
            assert!(e.starts_with(field), "{schedule}: {e}");
        }
    }
}
