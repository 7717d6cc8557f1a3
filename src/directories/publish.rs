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

use super::{CATEGORY_TAXONOMY, CatalogLocation, CatalogOrganization, CatalogService};
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
        "id": public_uuid(&s.id),
        "name": s.name,
        "status": hsds_status(s, active),
        "last_modified": instant(s.source_modified.unwrap_or(updated_at)),
    });
    if !s.description.trim().is_empty() {
        r["description"] = json!(s.description);
    }
    if let Some(org) = &s.organization {
        r["organization_id"] = json!(public_uuid(&org.id));
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

/// A whole HSDS service with its organisation, locations, phones, languages and taxonomy terms.
#[must_use]
pub fn hsds_service(s: &CatalogService, active: bool, updated_at: OffsetDateTime) -> Value {
    let mut r = hsds_service_summary(s, active, updated_at);
    let sid = public_uuid(&s.id);
    if let Some(org) = &s.organization {
        let mut o = json!({
            "id": public_uuid(&org.id),
            "name": org.name,
            "description": org.description.clone().unwrap_or_default(),
        });
        if let Some(url) = &org.url {
            o["website"] = json!(url);
        }
        if let Some(email) = &org.email {
            o["email"] = json!(email);
        }
        r["organization"] = o;
    }
    r["phones"] = s
        .phones
        .iter()
        .map(|p| json!({"id": public_uuid(&format!("{}|phone|{p}", s.id)), "service_id": sid, "number": p}))
        .collect();
    r["languages"] = s
        .languages
        .iter()
        .map(|l| json!({"id": public_uuid(&format!("{}|language|{l}", s.id)), "service_id": sid, "code": l}))
        .collect();
    r["service_at_locations"] = s
        .locations
        .iter()
        .map(|l| {
            let lid = public_uuid(&l.id);
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
            json!({"id": public_uuid(&format!("{}|{}", s.id, l.id)), "service_id": sid, "location_id": lid, "location": loc})
        })
        .collect();
    r["attributes"] = s
        .terms
        .iter()
        .map(|t| {
            let term_id = term_public_uuid(&t.taxonomy, &t.code);
            json!({
                "id": public_uuid(&format!("{}|term|{}|{}", s.id, t.taxonomy, t.code)),
                "link_id": sid,
                "link_type": "service",
                "link_entity": "service",
                "taxonomy_term_id": term_id,
                "taxonomy_term": {"id": term_id, "code": t.code, "name": t.name, "description": t.name, "taxonomy": t.taxonomy},
            })
        })
        .collect();
    r
}

fn instant(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

fn is_uri(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://") || s.starts_with("urn:")
}

/// FHIR day-of-week codes from the day names HSDS and the catalog use.
fn day_code(day: &str) -> Option<&'static str> {
    let d = day.to_ascii_lowercase();
    Some(match d.get(..3)? {
        "mon" | "mo" => "mon",
        "tue" | "tu" => "tue",
        "wed" | "we" => "wed",
        "thu" | "th" => "thu",
        "fri" | "fr" => "fri",
        "sat" | "sa" => "sat",
        "sun" | "su" => "sun",
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

/// A catalog service as a FHIR `HealthcareService`.
#[must_use]
pub fn healthcare_service(s: &CatalogService, active: bool, updated_at: OffsetDateTime) -> Value {
    let mut r = json!({
        "resourceType": "HealthcareService",
        "id": s.id,
        "meta": {"lastUpdated": instant(updated_at)},
        "identifier": [{"system": format!("urn:carebridge:directory:{}", s.source), "value": s.source_id}],
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
    let mut telecom: Vec<Value> = s.phones.iter().map(|p| json!({"system": "phone", "value": p})).collect();
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
    let times: Vec<Value> = s
        .schedules
        .iter()
        .filter_map(|sch| {
            let days: Vec<&str> = sch.days.iter().filter_map(|d| day_code(d)).collect();
            if days.is_empty() {
                return None;
            }
            let mut t = json!({"daysOfWeek": days});
            match (sch.opens_at.as_deref().and_then(fhir_time), sch.closes_at.as_deref().and_then(fhir_time)) {
                (Some(o), Some(c)) => {
                    t["availableStartTime"] = json!(o);
                    t["availableEndTime"] = json!(c);
                }
                _ => t["allDay"] = json!(true),
            }
            Some(t)
        })
        .collect();
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
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_hours_become_available_times_and_odd_ones_are_left_out() {
        assert_eq!(day_code("Monday"), Some("mon"));
        assert_eq!(day_code("x"), None);
        assert_eq!(fhir_time("09:00").as_deref(), Some("09:00:00"));
        assert_eq!(fhir_time("9am"), None);
    }
}
