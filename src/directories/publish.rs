//! The catalog as others read it: FHIR R4 `HealthcareService`, `Organization` and `Location` (HL7 Human
//! Services Directory shape), and Open Referral HSDS 3.0 services, built from what the catalog keeps.
//!
//! HSDS ids are UUIDs: each object is published under a UUID v5 of its gateway id (a taxonomy term under one
//! of `taxonomy|code`), the same on every call and every replica.
//!
//! Ids are the gateway ids (already in FHIR's id alphabet); agency service categories travel as codings of the
//! agency's service vocabulary, other taxonomy terms as codings of their taxonomy when it is a URI and as text
//! otherwise (a `Coding.system` must be a URI).

use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{CATEGORY_TAXONOMY, CatalogLocation, CatalogOrganization, CatalogService, Phone, Schedule, TaxonomyTerm};
use crate::mapping::terminology::AGENCY_VOCABULARY;

/// Namespace of the UUIDs the catalog is published under as HSDS.
const HSDS_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x2b0e_51a4_7c3d_4f6e_8a19_5d3c_0f7b_c4e2);

/// The UUID a catalog object is published under as HSDS.
#[must_use]
pub fn public_uuid(gateway_id: &str) -> String {
    uuid::Uuid::new_v5(&HSDS_NAMESPACE, gateway_id.as_bytes()).to_string()
}

/// The UUID a taxonomy term is published under as HSDS (the same for every service carrying it).
#[must_use]
pub fn term_public_uuid(taxonomy: &str, code: &str) -> String {
    public_uuid(&format!("{taxonomy}|{code}"))
}

/// The HSDS `status` of a service: the source's, or `inactive` once it vanished from its source.
fn hsds_status(s: &CatalogService, active: bool) -> &str {
    match s.status.as_str() {
        _ if !active => "inactive",
        "active" | "inactive" | "defunct" | "temporarily closed" => s.status.as_str(),
        _ => "active",
    }
}

/// The one-to-one fields of an HSDS service (`service_list` items), without empty values.
#[must_use]
pub fn hsds_service_summary(s: &CatalogService, active: bool, updated_at: OffsetDateTime) -> Value {
    let mut r = json!({
        "id": service_uuid(s),
        "name": s.name,
        "status": hsds_status(s, active),
        "last_modified": instant(s.source_modified.unwrap_or(updated_at)),
    });
    if let Some(alternate) = &s.alternate_name {
        r["alternate_name"] = json!(alternate);
    }
    if !s.description.trim().is_empty() {
        r["description"] = json!(s.description);
    }
    if let Some(org) = &s.organization {
        r["organization_id"] = json!(organization_uuid(org));
    }
    if let Some(url) = &s.url {
        r["url"] = json!(url);
    }
    if let Some(email) = &s.email {
        r["email"] = json!(email);
    }
    if let Some(e) = &s.eligibility {
        r["eligibility_description"] = json!(e);
    }
    if let Some(a) = s.minimum_age {
        r["minimum_age"] = json!(a);
    }
    if let Some(a) = s.maximum_age {
        r["maximum_age"] = json!(a);
    }
    r
}

/// The full HSDS 3.0 `service` object: one-to-one fields plus organization, locations (with their addresses,
/// phones, languages and schedules), the service's phones, languages and schedules, and its taxonomy terms as
/// attributes, each under the source's own id when that is a UUID.
#[must_use]
pub fn hsds_service(s: &CatalogService, active: bool, updated_at: OffsetDateTime) -> Value {
    let mut r = hsds_service_summary(s, active, updated_at);
    let sid = service_uuid(s);
    if let Some(org) = &s.organization {
        let mut o = json!({
            "id": organization_uuid(org),
            "name": org.name,
            "description": org.description.clone().unwrap_or_default(),
        });
        if let Some(url) = &org.url {
            o["website"] = json!(url);
        }
        if let Some(email) = &org.email {
            o["email"] = json!(email);
        }
        if let Some(parent) = org.parent_organization_id.as_deref().and_then(uuid_form) {
            o["parent_organization_id"] = json!(parent);
        }
        r["organization"] = o;
    }
    let owner = |key: &str, id: &str| {
        let mut m = serde_json::Map::new();
        m.insert(key.to_owned(), json!(id));
        m
    };
    let service_owner = owner("service_id", &sid);
    r["phones"] = hsds_phones(&s.phones, &format!("{}|phone", s.id), &service_owner);
    r["languages"] = hsds_languages(&s.languages, &format!("{}|language", s.id), &service_owner);
    r["schedules"] = hsds_schedules(&s.schedules, &format!("{}|schedule", s.id), &service_owner);
    r["service_at_locations"] = s
        .locations
        .iter()
        .map(|l| {
            let lid = location_uuid(l);
            let mut loc = json!({"id": lid, "location_type": "physical"});
            if let Some(name) = &l.name {
                loc["name"] = json!(name);
            }
            if let (Some(lat), Some(lon)) = (l.latitude, l.longitude) {
                loc["latitude"] = json!(lat);
                loc["longitude"] = json!(lon);
            }
            if let (Some(line), Some(city), Some(state), Some(pc)) = (&l.address, &l.city, &l.state, &l.postal_code) {
                loc["addresses"] = json!([{
                    "id": public_uuid(&format!("{}|address", l.id)),
                    "location_id": lid,
                    "address_1": line,
                    "city": city,
                    "state_province": state,
                    "postal_code": pc,
                    "country": "US",
                    "address_type": "physical",
                }]);
            }
            let location_owner = owner("location_id", &lid);
            loc["phones"] = hsds_phones(&l.phones, &format!("{}|phone", l.id), &location_owner);
            loc["languages"] = hsds_languages(&l.languages, &format!("{}|language", l.id), &location_owner);
            loc["schedules"] = hsds_schedules(&l.schedules, &format!("{}|schedule", l.id), &location_owner);
            let here = l.service_at_location.clone().unwrap_or_default();
            let sal_id =
                here.id.as_deref().and_then(uuid_form).unwrap_or_else(|| public_uuid(&format!("{}|{}", s.id, l.id)));
            let sal_owner = owner("service_at_location_id", &sal_id);
            let key = format!("{}|{}", s.id, l.id);
            json!({
                "id": sal_id, "service_id": sid, "location_id": lid, "location": loc,
                "phones": hsds_phones(&here.phones, &format!("{key}|phone"), &sal_owner),
                "schedules": hsds_schedules(&here.schedules, &format!("{key}|schedule"), &sal_owner),
            })
        })
        .collect();
    r["attributes"] = s
        .terms
        .iter()
        .map(|t| {
            let term_id = term_uuid(t);
            let mut term = json!({"id": term_id, "code": t.code, "name": t.name, "description": t.name,
                "taxonomy": t.taxonomy});
            if let Some(parent) = t.parent_id.as_deref().and_then(uuid_form) {
                term["parent_id"] = json!(parent);
            }
            let id = t
                .attribute_id
                .as_deref()
                .and_then(uuid_form)
                .unwrap_or_else(|| public_uuid(&format!("{}|term|{}|{}", s.id, t.taxonomy, t.code)));
            json!({
                "id": id,
                "link_id": sid,
                "link_type": t.link_type.as_deref().unwrap_or("service"),
                "link_entity": "service",
                "taxonomy_term_id": term_id,
                "taxonomy_term": term,
            })
        })
        .collect();
    r
}

/// `id` in canonical UUID form, when it is a UUID.
fn uuid_form(id: &str) -> Option<String> {
    uuid::Uuid::parse_str(id).ok().map(|u| u.to_string())
}

/// The HSDS id of a service: the one the catalog gave it (the source's UUID), else a UUID v5 of its gateway id.
#[must_use]
pub fn service_uuid(s: &CatalogService) -> String {
    s.public_id.clone().unwrap_or_else(|| public_uuid(&s.id))
}

/// The HSDS id of an organisation, as for services.
#[must_use]
pub fn organization_uuid(o: &CatalogOrganization) -> String {
    o.public_id.clone().unwrap_or_else(|| public_uuid(&o.id))
}

/// The HSDS id of a location: the source's UUID, else a UUID v5 of its gateway id.
#[must_use]
pub fn location_uuid(l: &CatalogLocation) -> String {
    l.public_id.as_deref().and_then(uuid_form).unwrap_or_else(|| public_uuid(&l.id))
}

/// The HSDS id of a taxonomy term: the source's UUID, else a UUID v5 of `taxonomy|code`.
#[must_use]
pub fn term_uuid(t: &TaxonomyTerm) -> String {
    t.id.as_deref().and_then(uuid_form).unwrap_or_else(|| term_public_uuid(&t.taxonomy, &t.code))
}

/// HSDS phones owned by `owner` (`{"service_id": …}` or the like); ids the source's UUIDs, else stable UUID v5s.
fn hsds_phones(phones: &[Phone], key: &str, owner: &serde_json::Map<String, Value>) -> Value {
    phones
        .iter()
        .map(|p| {
            let id = p.id.as_deref().and_then(uuid_form).unwrap_or_else(|| public_uuid(&format!("{key}|{}", p.number)));
            let mut o = owner.clone();
            o.insert("id".into(), json!(id));
            o.insert("number".into(), json!(p.number));
            if let Some(x) = p.extension.as_deref().and_then(|x| x.parse::<f64>().ok()) {
                o.insert("extension".into(), json!(x));
            }
            if let Some(kind) = &p.kind {
                o.insert("type".into(), json!(kind));
            }
            if let Some(d) = &p.description {
                o.insert("description".into(), json!(d));
            }
            if !p.languages.is_empty() {
                let phone_owner = serde_json::Map::from_iter([("phone_id".to_owned(), json!(id))]);
                o.insert(
                    "languages".into(),
                    hsds_languages(&p.languages, &format!("{key}|{id}|language"), &phone_owner),
                );
            }
            Value::Object(o)
        })
        .collect()
}

/// HSDS languages owned by `owner`.
fn hsds_languages(languages: &[String], key: &str, owner: &serde_json::Map<String, Value>) -> Value {
    languages
        .iter()
        .map(|l| {
            let mut o = owner.clone();
            o.insert("id".into(), json!(public_uuid(&format!("{key}|{l}"))));
            o.insert("code".into(), json!(l));
            Value::Object(o)
        })
        .collect()
}

/// HSDS weekly schedules owned by `owner`: days, opening and closing times, and the UTC offset (in hours) when
/// the source stated one.
fn hsds_schedules(schedules: &[Schedule], key: &str, owner: &serde_json::Map<String, Value>) -> Value {
    schedules
        .iter()
        .enumerate()
        .map(|(i, sch)| {
            let id = sch.id.as_deref().and_then(uuid_form).unwrap_or_else(|| public_uuid(&format!("{key}|{i}")));
            let mut o = owner.clone();
            o.insert("id".into(), json!(id));
            o.insert("freq".into(), json!("WEEKLY"));
            if !sch.days.is_empty() {
                o.insert("byday".into(), json!(sch.days.join(",")));
            }
            if let Some(t) = &sch.opens_at {
                o.insert("opens_at".into(), json!(t));
            }
            if let Some(t) = &sch.closes_at {
                o.insert("closes_at".into(), json!(t));
            }
            if let Some(offset) = sch.utc_offset_minutes {
                o.insert("timezone".into(), json!(f64::from(offset) / 60.0));
            }
            Value::Object(o)
        })
        .collect()
}

fn instant(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

fn is_uri(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://") || s.starts_with("urn:")
}

/// Weekly hours as FHIR gives them (`HealthcareService.availableTime`, `Location.hoursOfOperation`): days, and the
/// opening and closing times under the element's own names, or `allDay` when a schedule gives no times.
fn weekly(schedules: &[Schedule], opens: &str, closes: &str) -> Vec<Value> {
    schedules
        .iter()
        .filter_map(|sch| {
            let days: Vec<&str> = sch.days.iter().filter_map(|d| day_code(d)).collect();
            if days.is_empty() {
                return None;
            }
            let mut t = json!({"daysOfWeek": days});
            match (sch.opens_at.as_deref().and_then(fhir_time), sch.closes_at.as_deref().and_then(fhir_time)) {
                (Some(o), Some(c)) => {
                    t[opens] = json!(o);
                    t[closes] = json!(c);
                }
                _ => t["allDay"] = json!(true),
            }
            Some(t)
        })
        .collect()
}

/// FHIR day-of-week codes from the day names HSDS and the catalog use.
fn day_code(day: &str) -> Option<&'static str> {
    // HSDS writes two letters (`MO`), FHIR three (`mon`), people the whole name.
    Some(match day.trim().to_ascii_lowercase().as_str() {
        "mo" | "mon" | "monday" => "mon",
        "tu" | "tue" | "tuesday" => "tue",
        "we" | "wed" | "wednesday" => "wed",
        "th" | "thu" | "thursday" => "thu",
        "fr" | "fri" | "friday" => "fri",
        "sa" | "sat" | "saturday" => "sat",
        "su" | "sun" | "sunday" => "sun",
        _ => return None,
    })
}

/// `HH:MM` or `HH:MM:SS` as a FHIR `time`.
fn fhir_time(t: &str) -> Option<String> {
    let parts: Vec<&str> = t.split(':').collect();
    let ok = |p: &str| p.len() == 2 && p.bytes().all(|b| b.is_ascii_digit());
    match parts.as_slice() {
        [h, m] if ok(h) && ok(m) => Some(format!("{h}:{m}:00")),
        [h, m, s] if ok(h) && ok(m) && ok(s) => Some(format!("{h}:{m}:{s}")),
        _ => None,
    }
}

/// A catalog service as a FHIR `HealthcareService`: identified by the source's own id and, when `service_system`
/// is given (the mappings' `{system_base}/directory-service`), by the gateway's catalog id under it — the identifier
/// a referral's logical `performer` reference carries, so a partner holding both can match them.
#[must_use]
pub fn healthcare_service(
    s: &CatalogService,
    active: bool,
    updated_at: OffsetDateTime,
    service_system: Option<&str>,
) -> Value {
    let mut identifiers =
        vec![json!({"system": format!("urn:carebridge:directory:{}", s.source), "value": s.source_id})];
    if let Some(system) = service_system {
        identifiers.push(json!({"system": system, "value": s.id}));
    }
    let mut r = json!({
        "resourceType": "HealthcareService",
        "id": s.id,
        "meta": {"lastUpdated": instant(updated_at)},
        "identifier": identifiers,
        "active": active,
        "name": s.name,
    });
    if !s.description.trim().is_empty() {
        r["comment"] = json!(s.description);
    }
    if let Some(org) = &s.organization {
        r["providedBy"] = json!({"reference": format!("Organization/{}", org.id), "display": org.name});
    }
    let categories: Vec<Value> = s
        .terms
        .iter()
        .filter(|t| t.taxonomy == CATEGORY_TAXONOMY)
        .map(|t| json!({"coding": [{"system": format!("{AGENCY_VOCABULARY}service"), "code": t.code, "display": t.name}]}))
        .collect();
    if !categories.is_empty() {
        r["category"] = Value::Array(categories);
    }
    let types: Vec<Value> = s
        .terms
        .iter()
        .filter(|t| t.taxonomy != CATEGORY_TAXONOMY)
        .map(|t| {
            if is_uri(&t.taxonomy) {
                json!({"coding": [{"system": t.taxonomy, "code": t.code, "display": t.name}]})
            } else {
                json!({"text": format!("{} ({} {})", t.name, t.taxonomy, t.code)})
            }
        })
        .collect();
    if !types.is_empty() {
        r["type"] = Value::Array(types);
    }
    if !s.locations.is_empty() {
        r["location"] = s.locations.iter().map(|l| json!({"reference": format!("Location/{}", l.id)})).collect();
    }
    let mut telecom: Vec<Value> = s.phones.iter().map(|p| json!({"system": "phone", "value": p.number})).collect();
    if let Some(email) = &s.email {
        telecom.push(json!({"system": "email", "value": email}));
    }
    if let Some(url) = &s.url {
        telecom.push(json!({"system": "url", "value": url}));
    }
    if !telecom.is_empty() {
        r["telecom"] = Value::Array(telecom);
    }
    if !s.languages.is_empty() {
        r["communication"] =
            s.languages.iter().map(|l| json!({"coding": [{"system": "urn:ietf:bcp:47", "code": l}]})).collect();
    }
    if let Some(e) = &s.eligibility {
        r["eligibility"] = json!([{"comment": e}]);
    }
    let times = weekly(&s.schedules, "availableStartTime", "availableEndTime");
    if !times.is_empty() {
        r["availableTime"] = Value::Array(times);
    }
    r
}

/// A catalog organisation as a FHIR `Organization`.
#[must_use]
pub fn organization(o: &CatalogOrganization, updated_at: OffsetDateTime) -> Value {
    let mut r = json!({
        "resourceType": "Organization",
        "id": o.id,
        "meta": {"lastUpdated": instant(updated_at)},
        "active": true,
        "name": o.name,
    });
    let mut telecom = Vec::new();
    if let Some(email) = &o.email {
        telecom.push(json!({"system": "email", "value": email}));
    }
    if let Some(url) = &o.url {
        telecom.push(json!({"system": "url", "value": url}));
    }
    if !telecom.is_empty() {
        r["telecom"] = Value::Array(telecom);
    }
    r
}

/// A catalog location as a FHIR `Location`.
#[must_use]
pub fn location(l: &CatalogLocation, updated_at: OffsetDateTime) -> Value {
    let mut r = json!({
        "resourceType": "Location",
        "id": l.id,
        "meta": {"lastUpdated": instant(updated_at)},
        "status": "active",
        "mode": "instance",
    });
    if let Some(name) = &l.name {
        r["name"] = json!(name);
    }
    let mut address = serde_json::Map::new();
    if let Some(line) = &l.address {
        address.insert("line".into(), json!([line]));
    }
    if let Some(city) = &l.city {
        address.insert("city".into(), json!(city));
    }
    if let Some(state) = &l.state {
        address.insert("state".into(), json!(state));
    }
    if let Some(pc) = &l.postal_code {
        address.insert("postalCode".into(), json!(pc));
    }
    if !address.is_empty() {
        r["address"] = Value::Object(address);
    }
    if let (Some(lat), Some(lon)) = (l.latitude, l.longitude) {
        r["position"] = json!({"latitude": lat, "longitude": lon});
    }
    if !l.phones.is_empty() {
        r["telecom"] = l.phones.iter().map(|p| json!({"system": "phone", "value": p.number})).collect();
    }
    let hours = weekly(&l.schedules, "openingTime", "closingTime");
    if !hours.is_empty() {
        r["hoursOfOperation"] = Value::Array(hours);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_hours_become_available_times_and_odd_ones_are_left_out() {
        assert_eq!(day_code("Monday"), Some("mon"));
        assert_eq!(day_code("x"), None);
        assert_eq!(day_code("moon"), None);
        // HSDS `byday` codes are two letters: each is a day of FHIR's `daysOfWeek`.
        let hsds: Vec<Option<&str>> = ["MO", "TU", "WE", "TH", "FR", "SA", "SU"].into_iter().map(day_code).collect();
        assert_eq!(hsds, ["mon", "tue", "wed", "thu", "fri", "sat", "sun"].map(Some));
        let service = CatalogService {
            id: "s.1".into(),
            name: "Clinic".into(),
            schedules: vec![Schedule {
                days: vec!["MO".into(), "WE".into()],
                opens_at: Some("09:00".into()),
                closes_at: Some("17:00".into()),
                ..Schedule::default()
            }],
            ..CatalogService::default()
        };
        let published = healthcare_service(
            &service,
            true,
            OffsetDateTime::UNIX_EPOCH,
            Some("https://a.example/sid/directory-service"),
        );
        assert_eq!(
            published["availableTime"],
            json!([{"daysOfWeek": ["mon", "wed"], "availableStartTime": "09:00:00", "availableEndTime": "17:00:00"}])
        );
        assert_eq!(fhir_time("09:00").as_deref(), Some("09:00:00"));
        assert_eq!(fhir_time("9am"), None);
    }
}
