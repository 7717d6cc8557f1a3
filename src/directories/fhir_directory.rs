//! A FHIR R4 directory (HL7 Human Services Directory / Plan-Net shape): `HealthcareService` searched page by page
//! (`GET <base>/HealthcareService?_count=&_offset=&_sort=_id[&_lastUpdated=gt…]`), the `Organization` and the
//! `Location`s each service references read one by one, and the mapping of that bundle of resources into the
//! catalog.
//!
//! Servers may ignore `_include` (the interop peer does), so references are read separately, each at most once per
//! page. Search Bundles are walked entry by entry as plain JSON (see DEPENDENCIES.md: a typed Bundle fails whole on
//! one odd entry): every match becomes one raw record, `{"id", "healthcareService", "organization", "locations"}`,
//! so [`normalise_record`] is a pure function of what the sync keeps, and an odd entry is rejected on its own.
//!
//! An incremental sync asks for `_lastUpdated=gt<newest meta.lastUpdated seen>`, which dates the
//! `HealthcareService` only: a change to an `Organization` or `Location` alone is picked up by the next full sync.
//!
//! Partners code services with HL7 `service-category` and `service-type` codes, not agency categories: a
//! [`CategoryMap`] (a FHIR `ConceptMap` at [`CATEGORY_MAP_FILE`] under the mappings directory) says which of their
//! codings also give a service an agency service category, the `category=` search filter.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};
use time::format_description::StaticFormatDescription;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{OffsetDateTime, UtcOffset};

use super::{
    CatalogLocation, CatalogOrganization, CatalogService, DirectorySource, Schedule, SourceError, SourcePage,
    TaxonomyTerm, gateway_id,
};
use crate::domain::ServiceCode;
use crate::fhir::auth::TokenSource;
use crate::fhir::client::{self, FhirClient};
use crate::mapping::terminology::{self, AGENCY_VOCABULARY};
use crate::mapping::{LoadError, LoadErrors};
use crate::outbound::RetryPolicy;

/// The code system of BCP 47 language tags (`HealthcareService.communication`).
const BCP_47: &str = "urn:ietf:bcp:47";

/// FHIR `daysOfWeek` codes and the catalog's day names.
const DAYS: [(&str, &str); 7] =
    [("mon", "MO"), ("tue", "TU"), ("wed", "WE"), ("thu", "TH"), ("fri", "FR"), ("sat", "SA"), ("sun", "SU")];

/// `_lastUpdated` search values at millisecond precision: FHIR compares dates as ranges of their precision, so a
/// trimmed `…:24.32Z` would also skip everything updated in `.321`–`.329`.
const MILLIS: StaticFormatDescription =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");

/// `_lastUpdated` search values for a watermark finer than a millisecond.
const MICROS: StaticFormatDescription =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");

/// `t` as a FHIR search instant in UTC, at the precision it has (at least milliseconds).
fn search_instant(t: OffsetDateTime) -> Result<String, SourceError> {
    let utc = t.to_offset(UtcOffset::UTC);
    let format = if utc.nanosecond().is_multiple_of(1_000_000) { MILLIS } else { MICROS };
    utc.format(format).map_err(|e| SourceError::Malformed(e.to_string()))
}

// ---------------------------------------------------------------------------------------------------------------
// Reading JSON by path: absent or null is `None`, a wrong type is an error naming the path.

/// `path.key`, or `key` at the root of the record (`path` empty).
fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") }
}

/// The string at `parent.key`, trimmed; blank counts as absent.
fn text(parent: &Value, key: &str, path: &str) -> Result<Option<String>, String> {
    match parent.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.trim().to_owned()).filter(|s| !s.is_empty())),
        Some(_) => Err(format!("{}: expected a string", join(path, key))),
    }
}

/// The array at `parent.key` (empty when absent).
fn array<'a>(parent: &'a Value, key: &str, path: &str) -> Result<&'a [Value], String> {
    match parent.get(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(items)) => Ok(items),
        Some(_) => Err(format!("{}: expected an array", join(path, key))),
    }
}

/// The object at `parent.key`.
fn object<'a>(parent: &'a Value, key: &str, path: &str) -> Result<Option<&'a Value>, String> {
    match parent.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v @ Value::Object(_)) => Ok(Some(v)),
        Some(_) => Err(format!("{}: expected an object", join(path, key))),
    }
}

/// The number at `parent.key`.
fn number(parent: &Value, key: &str, path: &str) -> Result<Option<f64>, String> {
    match parent.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            n.as_f64().map(Some).ok_or_else(|| format!("{}: not a finite number", join(path, key)))
        }
        Some(_) => Err(format!("{}: expected a number", join(path, key))),
    }
}

/// The boolean at `parent.key`.
fn boolean(parent: &Value, key: &str, path: &str) -> Result<Option<bool>, String> {
    match parent.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(format!("{}: expected true or false", join(path, key))),
    }
}

/// A resource of the record: absent or null is `None`; anything but a `resource_type` resource is an error.
fn resource<'a>(record: &'a Value, key: &str, resource_type: &str) -> Result<Option<&'a Value>, String> {
    let Some(r) = object(record, key, "")? else { return Ok(None) };
    match r.get("resourceType").and_then(Value::as_str) {
        Some(t) if t == resource_type => Ok(Some(r)),
        _ => Err(format!("{key}.resourceType: expected {resource_type}")),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The category map.

/// Where a FHIR directory's category map is read from, under the mappings directory.
pub const CATEGORY_MAP_FILE: &str = "directory/service-category.json";

/// Equivalences that put a service in the target category; `unmatched` (no code) says a code has none on purpose.
const MAPPING_EQUIVALENCES: [&str; 6] = ["equivalent", "equal", "wider", "narrower", "inexact", "unmatched"];

/// Codings of a partner's code systems → the agency service categories they give, from a FHIR `ConceptMap`
/// whose groups map a source system to the agency service vocabulary (`urn:carebridge:vocabulary:service`),
/// read by the one ConceptMap loader ([`crate::mapping::terminology::load_groups`]).
///
/// The original coding is always kept as a term; a mapped coding adds its categories beside it.
#[derive(Debug, Clone, Default)]
pub struct CategoryMap {
    by_coding: HashMap<(String, String), Vec<TaxonomyTerm>>,
}

/// The agency category one element gives (`None`: unmatched on purpose), or what is wrong with it.
fn category_of(element: &terminology::Element) -> Result<Option<TaxonomyTerm>, String> {
    let equivalence = element.equivalence.as_str();
    if !MAPPING_EQUIVALENCES.contains(&equivalence) {
        return Err(format!("`{}` maps `{equivalence}`: use one of {}", element.code, MAPPING_EQUIVALENCES.join(", ")));
    }
    let Some(target) = &element.target else { return Ok(None) };
    let Some(category) = ServiceCode::from_code(&target.code) else {
        let known: Vec<&str> = ServiceCode::ALL.iter().map(|c| c.as_str()).collect();
        return Err(format!("`{}` is not an agency service category (one of {})", target.code, known.join(", ")));
    };
    Ok(Some(TaxonomyTerm::new(
        super::CATEGORY_TAXONOMY,
        category.as_str(),
        target.display.clone().unwrap_or_else(|| target.code.clone()),
    )))
}

impl CategoryMap {
    /// Reads and checks the map at `path`.
    ///
    /// # Errors
    /// Every problem, at file:line:column: the file unreadable or not JSON, not a ConceptMap, a group whose target is
    /// not the agency service vocabulary, a target code that is not an agency service category, a coding mapped
    /// twice, an equivalence that does not say "is in", a `narrower` or `inexact` target without a comment.
    pub fn load(path: &Path) -> Result<Self, LoadErrors> {
        let file = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&file, &text),
            Err(e) => Err(LoadErrors(vec![LoadError { file, line: 1, column: 1, message: e.to_string() }])),
        }
    }

    /// The map of a FHIR directory source: [`CATEGORY_MAP_FILE`] under `mappings_dir`.
    ///
    /// # Errors
    /// `SourceError::File` naming the file, with each problem at line:column, when it cannot be loaded.
    pub fn for_source(mappings_dir: &Path) -> Result<Self, SourceError> {
        Self::for_file(&mappings_dir.join(CATEGORY_MAP_FILE))
    }

    /// The map at `path` (an HSDS source's `category_map`).
    ///
    /// # Errors
    /// `SourceError::File` naming the file, with each problem at line:column, when it cannot be loaded.
    pub fn for_file(path: &Path) -> Result<Self, SourceError> {
        Self::load(path).map_err(|errors| {
            let problems: Vec<String> =
                errors.0.iter().map(|e| format!("{}:{}: {}", e.line, e.column, e.message)).collect();
            SourceError::File { path: path.display().to_string(), detail: problems.join("; ") }
        })
    }

    /// Parses and checks the text of the map, read from `file`.
    ///
    /// # Errors
    /// As [`CategoryMap::load`].
    pub fn parse(file: &str, text: &str) -> Result<Self, LoadErrors> {
        let mut errors = Vec::new();
        let loaded = terminology::load_groups(Path::new(file), text, &mut errors);
        let vocabulary = format!("{AGENCY_VOCABULARY}service");
        let mut map = CategoryMap::default();
        let err = |(line, column): (usize, usize), message: String| LoadError {
            file: file.to_owned(),
            line,
            column,
            message,
        };
        for group in loaded.iter().flat_map(|m| &m.groups) {
            if group.target != vocabulary {
                errors
                    .push(err(group.target_at, format!("a category map targets {vocabulary}, not `{}`", group.target)));
            }
            for element in &group.elements {
                match category_of(element) {
                    Ok(category) => {
                        map.by_coding
                            .insert((group.source.clone(), element.code.clone()), category.into_iter().collect());
                    }
                    Err(message) => errors.push(err(element.target_at, message)),
                }
            }
        }
        errors.sort_by_key(|e| (e.line, e.column));
        if errors.is_empty() { Ok(map) } else { Err(LoadErrors(errors)) }
    }

    /// How many codings give at least one category.
    #[must_use]
    pub fn mapped_codings(&self) -> usize {
        self.by_coding.values().filter(|c| !c.is_empty()).count()
    }

    /// The agency categories a coding gives (none when the map does not list it, or says it is unmatched).
    #[must_use]
    pub fn categories(&self, system: &str, code: &str) -> &[TaxonomyTerm] {
        self.by_coding.get(&(system.to_owned(), code.to_owned())).map_or(&[], Vec::as_slice)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The mapping.

/// Taxonomy terms of the codings of the CodeableConcepts at `resource.key` (scheme = the coding system).
fn codings_as_terms(resource: &Value, key: &str, path: &str, terms: &mut Vec<TaxonomyTerm>) -> Result<(), String> {
    for (i, concept) in array(resource, key, path)?.iter().enumerate() {
        let at = format!("{path}.{key}[{i}]");
        for (j, coding) in array(concept, "coding", &at)?.iter().enumerate() {
            let at = format!("{at}.coding[{j}]");
            // A code without its system names nothing the catalog could search by.
            let (Some(taxonomy), Some(code)) = (text(coding, "system", &at)?, text(coding, "code", &at)?) else {
                continue;
            };
            let name = text(coding, "display", &at)?.unwrap_or_else(|| code.clone());
            terms.push(TaxonomyTerm::new(taxonomy, code, name));
        }
    }
    Ok(())
}

/// Telecom values of one system (`phone`, `email`, `url`), in their order, leaving out those marked `old`.
fn telecoms(resource: &Value, wanted: &str, path: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for (i, point) in array(resource, "telecom", path)?.iter().enumerate() {
        let at = format!("{path}.telecom[{i}]");
        if text(point, "system", &at)?.as_deref() == Some(wanted)
            && text(point, "use", &at)?.as_deref() != Some("old")
            && let Some(value) = text(point, "value", &at)?
        {
            out.push(value);
        }
    }
    Ok(out)
}

/// `HH:MM` of a FHIR `time` (`HH:MM:SS[.fff]`).
fn hours_minutes(value: Option<String>, path: &str) -> Result<Option<String>, String> {
    let Some(value) = value else { return Ok(None) };
    let b = value.as_bytes();
    let two_digits = |i: usize| b.get(i..i + 2).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    if two_digits(0) && b.get(2) == Some(&b':') && two_digits(3) && &value[..2] <= "23" && &value[3..5] <= "59" {
        Ok(Some(value[..5].to_owned()))
    } else {
        Err(format!("{path}: expected a time HH:MM:SS"))
    }
}

/// Opening hours from `availableTime`; an all-day entry opens at 00:00 and closes at 24:00. (`notAvailable` and
/// `availabilityExceptions` have no place in the catalog's weekly schedule.)
fn schedules(service: &Value) -> Result<Vec<Schedule>, String> {
    let mut out = Vec::new();
    for (i, time) in array(service, "availableTime", "healthcareService")?.iter().enumerate() {
        let at = format!("healthcareService.availableTime[{i}]");
        let mut days = Vec::new();
        for (j, day) in array(time, "daysOfWeek", &at)?.iter().enumerate() {
            let code = day.as_str().map(str::trim);
            let (_, name) = DAYS
                .iter()
                .find(|(fhir, _)| Some(*fhir) == code)
                .ok_or_else(|| format!("{at}.daysOfWeek[{j}]: expected one of mon, tue, wed, thu, fri, sat, sun"))?;
            days.push((*name).to_owned());
        }
        let (opens_at, closes_at) = if boolean(time, "allDay", &at)? == Some(true) {
            (Some("00:00".to_owned()), Some("24:00".to_owned()))
        } else {
            (
                hours_minutes(text(time, "availableStartTime", &at)?, &format!("{at}.availableStartTime"))?,
                hours_minutes(text(time, "availableEndTime", &at)?, &format!("{at}.availableEndTime"))?,
            )
        };
        out.push(Schedule { id: None, days, opens_at, closes_at, utc_offset_minutes: None });
    }
    Ok(out)
}

/// Who may use the service: each `eligibility` entry's comment, else its code's text or display, joined by `; `.
fn eligibility(service: &Value) -> Result<Option<String>, String> {
    let mut parts = Vec::new();
    for (i, entry) in array(service, "eligibility", "healthcareService")?.iter().enumerate() {
        let at = format!("healthcareService.eligibility[{i}]");
        let mut said = text(entry, "comment", &at)?;
        if said.is_none()
            && let Some(code) = object(entry, "code", &at)?
        {
            said = text(code, "text", &format!("{at}.code"))?;
            for (j, coding) in array(code, "coding", &format!("{at}.code"))?.iter().enumerate() {
                if said.is_some() {
                    break;
                }
                said = text(coding, "display", &format!("{at}.code.coding[{j}]"))?;
            }
        }
        parts.extend(said);
    }
    Ok(if parts.is_empty() { None } else { Some(parts.join("; ")) })
}

/// Languages of `communication` (BCP 47 codes, lower case; codings of other systems are left out).
fn languages(service: &Value) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for (i, concept) in array(service, "communication", "healthcareService")?.iter().enumerate() {
        let at = format!("healthcareService.communication[{i}]");
        for (j, coding) in array(concept, "coding", &at)?.iter().enumerate() {
            let at = format!("{at}.coding[{j}]");
            let system = text(coding, "system", &at)?;
            if (system.is_none() || system.as_deref() == Some(BCP_47))
                && let Some(code) = text(coding, "code", &at)?
            {
                out.push(code.to_ascii_lowercase());
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The organisation of the record, when the service's `providedBy` could be read.
fn organization(source: &str, record: &Value) -> Result<Option<CatalogOrganization>, String> {
    let Some(org) = resource(record, "organization", "Organization")? else { return Ok(None) };
    let org_id = text(org, "id", "organization")?.ok_or("organization.id: missing")?;
    Ok(Some(CatalogOrganization {
        id: gateway_id(source, &org_id),
        source_id: org_id,
        name: text(org, "name", "organization")?.ok_or("organization.name: missing")?,
        // R4 Organization has no description element.
        description: None,
        url: telecoms(org, "url", "organization")?.into_iter().next(),
        email: telecoms(org, "email", "organization")?.into_iter().next(),
        ..CatalogOrganization::default()
    }))
}

/// The locations of the record that could be read.
fn locations(source: &str, record: &Value) -> Result<Vec<CatalogLocation>, String> {
    let mut out = Vec::new();
    for (i, location) in array(record, "locations", "")?.iter().enumerate() {
        let at = format!("locations[{i}]");
        if location.get("resourceType").and_then(Value::as_str) != Some("Location") {
            return Err(format!("{at}.resourceType: expected Location"));
        }
        let location_id = text(location, "id", &at)?.ok_or(format!("{at}.id: missing"))?;
        let (mut latitude, mut longitude) = (None, None);
        if let Some(position) = object(location, "position", &at)? {
            let pos = format!("{at}.position");
            latitude = number(position, "latitude", &pos)?;
            longitude = number(position, "longitude", &pos)?;
            if latitude.is_some_and(|v| !(-90.0..=90.0).contains(&v))
                || longitude.is_some_and(|v| !(-180.0..=180.0).contains(&v))
            {
                return Err(format!("{pos}: latitude/longitude off the globe"));
            }
        }
        let (mut address, mut city, mut state, mut postal_code) = (None, None, None, None);
        if let Some(a) = object(location, "address", &at)? {
            let adr = format!("{at}.address");
            let mut lines = Vec::new();
            for (j, line) in array(a, "line", &adr)?.iter().enumerate() {
                match line {
                    Value::String(s) if !s.trim().is_empty() => lines.push(s.trim().to_owned()),
                    Value::String(_) | Value::Null => {}
                    _ => return Err(format!("{adr}.line[{j}]: expected a string")),
                }
            }
            address = if lines.is_empty() { text(a, "text", &adr)? } else { Some(lines.join(", ")) };
            city = text(a, "city", &adr)?;
            state = text(a, "state", &adr)?;
            postal_code = text(a, "postalCode", &adr)?;
        }
        out.push(CatalogLocation {
            id: gateway_id(source, &location_id),
            source_id: location_id,
            name: text(location, "name", &at)?,
            latitude,
            longitude,
            address,
            city,
            state,
            postal_code,
            ..CatalogLocation::default()
        });
    }
    Ok(out)
}

/// Maps one raw record of a FHIR directory (`{"healthcareService", "organization", "locations"}`) into the catalog.
///
/// Category, type and specialty codings become taxonomy terms whose taxonomy is the coding system (so a coding of
/// the [`super::CATEGORY_TAXONOMY`] system is an agency service category, as in HSDS), and each coding `categories`
/// maps also gives its agency categories; `active: false` is `inactive`; `comment` and `extraDetails` make the
/// description.
///
/// # Errors
/// A sentence naming the field (as a path into the record) that makes the record unusable: a missing id or name,
/// coordinates off the globe, an unknown day, a field of the wrong type.
pub fn normalise_record(source: &str, record: &Value, categories: &CategoryMap) -> Result<CatalogService, String> {
    let service = resource(record, "healthcareService", "HealthcareService")?.ok_or("healthcareService: missing")?;
    let at = "healthcareService";
    let source_id = text(service, "id", at)?.ok_or("healthcareService.id: missing")?;
    let name = text(service, "name", at)?.ok_or("healthcareService.name: missing")?;
    let status = if boolean(service, "active", at)? == Some(false) { "inactive" } else { "active" };
    let description: Vec<String> =
        [text(service, "comment", at)?, text(service, "extraDetails", at)?].into_iter().flatten().collect();
    let source_modified = match object(service, "meta", at)? {
        None => None,
        Some(meta) => match text(meta, "lastUpdated", "healthcareService.meta")? {
            None => None,
            Some(t) => Some(
                OffsetDateTime::parse(&t, &Rfc3339)
                    .map_err(|_| "healthcareService.meta.lastUpdated: not an instant (RFC 3339)")?,
            ),
        },
    };
    let mut terms = Vec::new();
    for key in ["category", "type", "specialty"] {
        codings_as_terms(service, key, at, &mut terms)?;
    }
    let mapped: Vec<TaxonomyTerm> =
        terms.iter().flat_map(|t| categories.categories(&t.taxonomy, &t.code)).cloned().collect();
    terms.extend(mapped);
    // Stable sort: when a service also carries an agency category itself, its own display name is kept.
    terms.sort_by(|a, b| (&a.taxonomy, &a.code).cmp(&(&b.taxonomy, &b.code)));
    terms.dedup_by(|a, b| a.taxonomy == b.taxonomy && a.code == b.code);
    Ok(CatalogService {
        id: gateway_id(source, &source_id),
        source: source.to_owned(),
        source_id,
        name,
        description: description.join("\n\n"),
        status: status.to_owned(),
        url: telecoms(service, "url", at)?.into_iter().next(),
        email: telecoms(service, "email", at)?.into_iter().next(),
        eligibility: eligibility(service)?,
        // FHIR has no age range on HealthcareService (eligibility says it in words).
        minimum_age: None,
        maximum_age: None,
        organization: organization(source, record)?,
        locations: locations(source, record)?,
        terms,
        languages: languages(service)?,
        schedules: schedules(service)?,
        phones: telecoms(service, "phone", at)?.into_iter().map(super::Phone::number).collect(),
        source_modified,
        ..CatalogService::default()
    })
}

// ---------------------------------------------------------------------------------------------------------------
// The source.

/// A FHIR R4 server listing `HealthcareService`s.
pub struct FhirDirectory {
    name: String,
    per_page: u32,
    categories: CategoryMap,
    client: FhirClient,
}

/// Resources read during one page, by relative reference (`None`: the server has no such resource).
type ReferenceCache = HashMap<String, Option<Value>>;

impl FhirDirectory {
    /// A source reading `base_url` (the FHIR base, without `/HealthcareService`), `per_page` services a page,
    /// giving services the agency categories `categories` maps their codings to.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(
        name: &str,
        base_url: &str,
        per_page: u32,
        bearer_token: Option<String>,
        timeout: Duration,
        categories: CategoryMap,
    ) -> Result<Self, SourceError> {
        let token = bearer_token.map_or(TokenSource::None, TokenSource::Bearer);
        // Not retried yet: its sync reads follow references page by page, and its faults are tested as they are.
        let client = FhirClient::new(base_url, timeout, RetryPolicy::NONE, token, None)?;
        Ok(FhirDirectory { name: name.to_owned(), per_page: per_page.max(1), categories, client })
    }

    /// The `expected` resource a reference names, read once per page; `None` when it cannot be followed (not a
    /// relative `Type/id` reference, another type, or not readable from the server: 404, 410, another resource).
    ///
    /// # Errors
    /// When the server fails otherwise (an error status, no answer): the page is not read, the sync stops.
    async fn follow(
        &self,
        reference: &Value,
        expected: &str,
        service_id: &str,
        cache: &mut ReferenceCache,
    ) -> Result<Option<Value>, SourceError> {
        let Some(key) = relative_reference(reference, expected) else {
            // Absolute, contained, logical (identifier only) or another type: nothing this source reads.
            tracing::warn!(source = %self.name, source_id = service_id, target = expected,
                "Directory reference is not a relative reference; the service is kept without it.");
            return Ok(None);
        };
        if let Some(known) = cache.get(&key) {
            return Ok(known.clone());
        }
        let (ty, id) = key.split_once('/').unwrap_or((expected, ""));
        let found = match self.client.read(ty, id).await? {
            Some(r) => Some(r),
            // A read answered with another resource type is the server's fault, but one odd reference must not
            // lose the page: the service is kept without it.
            _ => {
                tracing::warn!(source = %self.name, source_id = service_id, target = expected,
                    "Directory reference points to nothing readable on the server; the service is kept without it.");
                None
            }
        };
        cache.insert(key, found.clone());
        Ok(found)
    }

    /// The raw record of one search entry: the service with the resources it references.
    async fn record(&self, entry: &Value, cache: &mut ReferenceCache) -> Result<Value, SourceError> {
        let service = entry.get("resource").cloned().unwrap_or(Value::Null);
        let id = service.get("id").and_then(Value::as_str).map(str::to_owned);
        let service_id = id.as_deref().unwrap_or("-");
        let organization = match service.get("providedBy") {
            Some(reference @ Value::Object(_)) => self.follow(reference, "Organization", service_id, cache).await?,
            _ => None,
        };
        let mut locations = Vec::new();
        if let Some(Value::Array(references)) = service.get("location") {
            for reference in references {
                locations.extend(self.follow(reference, "Location", service_id, cache).await?);
            }
        }
        // `id` beside the resources: the sync names a refused record by it, and keeps its last good version.
        Ok(json!({"id": id, "healthcareService": service, "organization": organization, "locations": locations}))
    }
}

/// `Type/id` of a relative reference to an `expected` resource (a version suffix is dropped: the current version
/// is read); `None` for anything else.
fn relative_reference(reference: &Value, expected: &str) -> Option<String> {
    let text = reference.get("reference")?.as_str()?.trim();
    let mut parts = text.split('/');
    let (kind, id) = (parts.next()?, parts.next()?);
    let rest: Vec<&str> = parts.collect();
    // FHIR's id alphabet, and never `.` or `..`, which would climb out of the resource type's path.
    let id_ok = (1..=64).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && id.bytes().any(|b| b.is_ascii_alphanumeric());
    let version_ok = rest.is_empty() || (rest.len() == 2 && rest[0] == "_history");
    (kind == expected && id_ok && version_ok).then(|| format!("{kind}/{id}"))
}

#[async_trait]
impl DirectorySource for FhirDirectory {
    fn name(&self) -> &str {
        &self.name
    }

    async fn page(&self, page: u32, modified_after: Option<OffsetDateTime>) -> Result<SourcePage, SourceError> {
        let offset = u64::from(page.saturating_sub(1)) * u64::from(self.per_page);
        let mut query =
            vec![("_count", self.per_page.to_string()), ("_offset", offset.to_string()), ("_sort", "_id".to_owned())];
        if let Some(t) = modified_after {
            query.push(("_lastUpdated", format!("gt{}", search_instant(t)?)));
        }
        let bundle = self.client.search("HealthcareService", &query).await?;
        let mut cache = ReferenceCache::new();
        let entries = client::matches(&bundle)?;
        let mut records = Vec::with_capacity(entries.len());
        // Every match is a service, odd or not, and is handed on (an odd one is refused on its own by
        // `normalise`, never the whole page).
        for entry in entries {
            records.push(self.record(entry, &mut cache).await?);
        }
        let more = client::has_next(&bundle) && records.len() >= self.per_page as usize;
        tracing::debug!(source = %self.name, page, services = records.len(), references = cache.len(),
            "Directory page read.");
        Ok(SourcePage { records, more, ..SourcePage::default() })
    }

    fn normalise(&self, raw: &Value) -> Result<CatalogService, String> {
        normalise_record(&self.name, raw, &self.categories)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Normalises with an empty category map: only the record's own codings become terms.
    fn without_map(source: &str, raw: &Value) -> Result<CatalogService, String> {
        normalise_record(source, raw, &CategoryMap::default())
    }

    fn record() -> Value {
        json!({
            "id": "hs-1",
            "healthcareService": {
                "resourceType": "HealthcareService",
                "id": "hs-1",
                "meta": {"versionId": "3", "lastUpdated": "2026-03-02T09:15:00.250Z"},
                "active": true,
                "providedBy": {"reference": "Organization/org-1"},
                "category": [{"coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/service-category", "code": "8",
                     "display": "Counselling"},
                    {"system": super::super::CATEGORY_TAXONOMY, "code": "therapy", "display": "Therapy"}]}],
                "type": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/service-type", "code": "74",
                    "display": "Generalist Counselling"}]}, {"text": "no coding"}],
                "specialty": [{"coding": [{"system": "http://snomed.info/sct", "code": "394587001"}, {"code": "x"}]}],
                "location": [{"reference": "Location/loc-1"}],
                "name": " Outpatient Counseling ",
                "comment": "Individual and group counseling.",
                "extraDetails": "Sliding-scale fees.",
                "telecom": [
                    {"system": "phone", "value": "(503) 555-0143"},
                    {"system": "phone", "value": "(503) 555-0000", "use": "old"},
                    {"system": "email", "value": "intake@wvbh.example.org"},
                    {"system": "url", "value": "https://wvbh.example.org/counseling"}],
                "eligibility": [{"code": {"text": "Adults"}, "comment": "Adults 18 and over."},
                                {"code": {"coding": [{"display": "County residents"}]}}],
                "communication": [{"coding": [{"system": "urn:ietf:bcp:47", "code": "ES"}]},
                                  {"coding": [{"system": "urn:ietf:bcp:47", "code": "en"}]},
                                  {"coding": [{"system": "urn:iso:std:iso:639-2", "code": "vie"}]}],
                "availableTime": [
                    {"daysOfWeek": ["mon", "tue"], "availableStartTime": "08:30:00", "availableEndTime": "18:00:00"},
                    {"daysOfWeek": ["sun"], "allDay": true}]
            },
            "organization": {
                "resourceType": "Organization", "id": "org-1", "name": "Willamette Valley Behavioral Health",
                "telecom": [{"system": "url", "value": "https://wvbh.example.org"}]
            },
            "locations": [{
                "resourceType": "Location", "id": "loc-1", "name": "Hawthorne Clinic",
                "address": {"line": ["1220 SE Hawthorne Blvd", "Suite 200"], "city": "Portland", "state": "OR",
                            "postalCode": "97214"},
                "position": {"latitude": 45.5122, "longitude": -122.6537}
            }]
        })
    }

    /// The category map the repository ships.
    fn shipped_map() -> CategoryMap {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings");
        CategoryMap::for_source(&dir).expect("the shipped category map loads")
    }

    /// The `(taxonomy, code)` of each term.
    fn term_codes(s: &CatalogService) -> Vec<(&str, &str)> {
        s.terms.iter().map(|t| (t.taxonomy.as_str(), t.code.as_str())).collect()
    }

    const HL7_CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/service-category";
    const HL7_TYPE: &str = "http://terminology.hl7.org/CodeSystem/service-type";

    #[test]
    fn an_hl7_counselling_category_gives_the_agency_therapy_category_beside_its_own_term() {
        let mut raw = record();
        raw["healthcareService"]["category"] = json!([{"coding": [{"system": HL7_CATEGORY, "code": "8"}]}]);
        raw["healthcareService"]["type"] = json!([]);
        raw["healthcareService"]["specialty"] = json!([]);
        let s = normalise_record("c", &raw, &shipped_map()).expect("valid");
        assert_eq!(term_codes(&s), [(super::super::CATEGORY_TAXONOMY, "therapy"), (HL7_CATEGORY, "8")]);
        assert_eq!(s.terms[0].name, "Therapy", "named by the map's display");
    }

    #[test]
    fn an_unmapped_or_unmatched_code_gives_no_category_but_keeps_its_term() {
        let mut raw = record();
        // 22 Mental Health is listed as unmatched on purpose; 13 Acupuncture is not listed at all.
        raw["healthcareService"]["category"] = json!([{"coding": [{"system": HL7_CATEGORY, "code": "22"}]}]);
        raw["healthcareService"]["type"] = json!([{"coding": [{"system": HL7_TYPE, "code": "13"}]}]);
        raw["healthcareService"]["specialty"] = json!([]);
        let s = normalise_record("c", &raw, &shipped_map()).expect("valid");
        assert_eq!(term_codes(&s), [(HL7_CATEGORY, "22"), (HL7_TYPE, "13")]);
    }

    #[test]
    fn codings_mapping_to_the_same_category_give_it_once() {
        // Category 8, type 74 and the service's own `therapy` coding all say therapy; type 541 says crisis care.
        let mut raw = record();
        raw["healthcareService"]["type"]
            .as_array_mut()
            .expect("types")
            .push(json!({"coding": [{"system": HL7_TYPE, "code": "541"}, {"system": HL7_TYPE, "code": "74"}]}));
        let s = normalise_record("county-fhir", &raw, &shipped_map()).expect("valid");
        let category = super::super::CATEGORY_TAXONOMY;
        assert_eq!(
            term_codes(&s),
            [
                (category, "crisis_care"),
                (category, "therapy"),
                ("http://snomed.info/sct", "394587001"),
                (HL7_CATEGORY, "8"),
                (HL7_TYPE, "541"),
                (HL7_TYPE, "74"),
            ]
        );
    }

    /// A small valid map, to break in the tests below.
    const MAP: &str = r#"{
  "resourceType": "ConceptMap", "id": "m", "url": "urn:test:m",
  "group": [{
    "source": "http://terminology.hl7.org/CodeSystem/service-category",
    "target": "urn:carebridge:vocabulary:service",
    "element": [
      {"code": "8", "target": [{"code": "therapy", "equivalence": "narrower", "comment": "Not all counselling."}]},
      {"code": "22", "target": [{"equivalence": "unmatched"}]},
      {"code": "18", "target": [{"code": "housing_assistance", "equivalence": "equivalent"}]}
    ]
  }]
}"#;

    #[test]
    fn a_broken_category_map_is_reported_at_file_line_and_column() {
        let map = CategoryMap::parse("m.json", MAP).expect("valid");
        assert_eq!(map.mapped_codings(), 2);
        assert_eq!(map.categories(HL7_CATEGORY, "18")[0].code, "housing_assistance");
        assert!(map.categories(HL7_CATEGORY, "22").is_empty());

        let broken = MAP
            .replace(r#""code": "housing_assistance""#, r#""code": "shelter""#)
            .replace(r#", "comment": "Not all counselling.""#, "");
        let errors = CategoryMap::parse("m.json", &broken).expect_err("broken").0;
        let found: Vec<(usize, &str)> = errors.iter().map(|e| (e.line, e.message.as_str())).collect();
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].0, 7);
        assert!(found[0].1.contains("say why in a comment"), "{found:?}");
        assert_eq!(found[1].0, 9);
        assert!(found[1].1.starts_with("`shelter` is not an agency service category"), "{found:?}");
        assert!(errors.iter().all(|e| e.file == "m.json"));

        let other_target = MAP.replace("urn:carebridge:vocabulary:service", "http://snomed.info/sct");
        let errors = CategoryMap::parse("m.json", &other_target).expect_err("wrong target").0;
        assert_eq!((errors.len(), errors[0].line), (1, 5), "{errors:?}");

        let errors = CategoryMap::parse("m.json", "{\n  \"resourceType\": \"ConceptMap\",\n}").expect_err("not JSON").0;
        assert_eq!((errors[0].file.as_str(), errors[0].line), ("m.json", 3), "{errors:?}");
    }

    #[test]
    fn a_missing_category_map_is_reported_with_the_file_it_looked_for() {
        let dir = tempfile::tempdir().expect("temp dir");
        let errors = CategoryMap::load(&dir.path().join(CATEGORY_MAP_FILE)).expect_err("missing").0;
        assert!(errors[0].file.ends_with("directory/service-category.json"), "{errors:?}");
        match CategoryMap::for_source(dir.path()) {
            Err(SourceError::File { path, .. }) => assert!(path.ends_with(CATEGORY_MAP_FILE), "{path}"),
            other => panic!("expected a file error, got {other:?}"),
        }
        let settings: crate::config::DirectorySettings = serde_json::from_value(
            json!({"type": "fhir_directory", "name": "county-fhir", "base_url": "http://127.0.0.1:9/fhir"}),
        )
        .expect("settings");
        let error = super::super::source_from_settings(&settings, dir.path()).err().expect("no source without its map");
        assert!(error.to_string().contains(CATEGORY_MAP_FILE), "{error}");
    }

    #[test]
    fn a_full_record_maps_every_element_the_catalog_keeps() {
        let s = without_map("county-fhir", &record()).expect("valid");
        assert_eq!((s.id.as_str(), s.source_id.as_str()), ("county-fhir.hs-1", "hs-1"));
        assert_eq!(s.name, "Outpatient Counseling");
        assert_eq!(s.description, "Individual and group counseling.\n\nSliding-scale fees.");
        assert_eq!(s.status, "active");
        assert_eq!(s.url.as_deref(), Some("https://wvbh.example.org/counseling"));
        assert_eq!(s.email.as_deref(), Some("intake@wvbh.example.org"));
        assert_eq!(s.phones, [super::super::Phone::number("(503) 555-0143")], "an `old` number is left out");
        assert_eq!(s.eligibility.as_deref(), Some("Adults 18 and over.; County residents"));
        assert_eq!(s.languages, ["en", "es"], "BCP 47 codes only, lower case");
        let terms: Vec<(&str, &str)> = s.terms.iter().map(|t| (t.taxonomy.as_str(), t.code.as_str())).collect();
        assert_eq!(
            terms,
            [
                (super::super::CATEGORY_TAXONOMY, "therapy"),
                ("http://snomed.info/sct", "394587001"),
                ("http://terminology.hl7.org/CodeSystem/service-category", "8"),
                ("http://terminology.hl7.org/CodeSystem/service-type", "74"),
            ]
        );
        assert_eq!(s.terms[1].name, "394587001", "a coding without display is named by its code");
        assert_eq!(
            s.schedules,
            [
                Schedule {
                    id: None,
                    days: vec!["MO".into(), "TU".into()],
                    opens_at: Some("08:30".into()),
                    closes_at: Some("18:00".into()),
                    utc_offset_minutes: None,
                },
                Schedule {
                    id: None,
                    days: vec!["SU".into()],
                    opens_at: Some("00:00".into()),
                    closes_at: Some("24:00".into()),
                    utc_offset_minutes: None,
                },
            ]
        );
        let org = s.organization.as_ref().expect("organization");
        assert_eq!((org.id.as_str(), org.name.as_str()), ("county-fhir.org-1", "Willamette Valley Behavioral Health"));
        assert_eq!(org.url.as_deref(), Some("https://wvbh.example.org"));
        let loc = &s.locations[0];
        assert_eq!(loc.id, "county-fhir.loc-1");
        assert_eq!(loc.address.as_deref(), Some("1220 SE Hawthorne Blvd, Suite 200"));
        assert_eq!(
            (loc.city.as_deref(), loc.state.as_deref(), loc.postal_code.as_deref()),
            (Some("Portland"), Some("OR"), Some("97214"))
        );
        assert_eq!((loc.latitude, loc.longitude), (Some(45.5122), Some(-122.6537)));
        let modified = s.source_modified.expect("lastUpdated");
        assert_eq!(modified.format(&Rfc3339).expect("formats"), "2026-03-02T09:15:00.25Z");
    }

    #[test]
    fn an_inactive_service_without_its_references_is_kept_as_inactive() {
        let mut raw = record();
        raw["healthcareService"]["active"] = json!(false);
        raw["organization"] = Value::Null;
        raw["locations"] = json!([]);
        let s = without_map("c", &raw).expect("valid");
        assert_eq!(s.status, "inactive");
        assert!(s.organization.is_none() && s.locations.is_empty());
    }

    #[test]
    fn a_record_without_a_name_or_an_id_is_rejected_with_the_field_named() {
        let mut raw = record();
        raw["healthcareService"]["name"] = json!("  ");
        assert_eq!(without_map("c", &raw).expect_err("no name"), "healthcareService.name: missing");
        raw["healthcareService"]["name"] = json!(["a list"]);
        assert_eq!(without_map("c", &raw).expect_err("wrong type"), "healthcareService.name: expected a string");
        let mut raw = record();
        raw["healthcareService"].as_object_mut().expect("object").remove("id");
        assert_eq!(without_map("c", &raw).expect_err("no id"), "healthcareService.id: missing");
        assert_eq!(
            without_map("c", &json!({"healthcareService": null})).expect_err("no resource"),
            "healthcareService: missing"
        );
        let not_a_service = json!({"healthcareService": {"resourceType": "OperationOutcome"}});
        assert!(
            without_map("c", &not_a_service).expect_err("wrong type").starts_with("healthcareService.resourceType")
        );
    }

    #[test]
    fn odd_coordinates_days_times_and_organizations_are_rejected_with_their_path() {
        let cases: [(&str, Value, &str); 5] = [
            ("/locations/0/position/latitude", json!(100.0), "locations[0].position: latitude/longitude off the globe"),
            (
                "/healthcareService/availableTime/0/daysOfWeek/1",
                json!("tues"),
                "healthcareService.availableTime[0].daysOfWeek[1]:",
            ),
            (
                "/healthcareService/availableTime/0/availableStartTime",
                json!("8.30"),
                "healthcareService.availableTime[0].availableStartTime:",
            ),
            ("/organization/name", Value::Null, "organization.name: missing"),
            ("/healthcareService/meta/lastUpdated", json!("yesterday"), "healthcareService.meta.lastUpdated:"),
        ];
        for (pointer, value, expected) in cases {
            let mut raw = record();
            *raw.pointer_mut(pointer).expect("path exists") = value;
            let reason = without_map("c", &raw).expect_err(pointer);
            assert!(reason.starts_with(expected), "{pointer}: {reason}");
        }
    }

    #[test]
    fn only_relative_references_of_the_expected_type_are_followed() {
        let r = |s: &str| json!({"reference": s});
        assert_eq!(relative_reference(&r("Organization/org-1"), "Organization").as_deref(), Some("Organization/org-1"));
        assert_eq!(relative_reference(&r("Location/l1/_history/2"), "Location").as_deref(), Some("Location/l1"));
        for odd in [
            "Location/l1",
            "#contained",
            "https://elsewhere.example/fhir/Organization/1",
            "Organization/../x",
            "Organization/..",
            "Organization/",
            "Organization/a/b",
        ] {
            assert_eq!(relative_reference(&r(odd), "Organization"), None, "{odd}");
        }
        assert_eq!(relative_reference(&json!({"identifier": {"value": "x"}}), "Organization"), None);
    }

    #[test]
    fn search_instants_keep_their_milliseconds_even_when_they_end_in_zero() {
        let t = OffsetDateTime::parse("2026-03-02T10:15:00.320+01:00", &Rfc3339).expect("parses");
        assert_eq!(search_instant(t).expect("formats"), "2026-03-02T09:15:00.320Z");
        let t = OffsetDateTime::parse("2026-03-02T09:15:00.320500Z", &Rfc3339).expect("parses");
        assert_eq!(search_instant(t).expect("formats"), "2026-03-02T09:15:00.320500Z");
    }
}
