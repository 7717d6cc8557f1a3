//! Who the resources read back from FHIR are: the agency id of a resource comes from the business identifier
//! the gateway wrote (`identifier.system` of its mapping), never from the resource id a server assigned, and a
//! reference to another resource is followed to that resource's identifier (within what was read, or through the
//! caller's crosswalk) before the mapping reads it. A reference to what the gateway never delivers (staff, an
//! organisation, a directory service) is read as the logical reference the mappings write (`type` + `identifier`),
//! also when it comes in the older literal form (`Practitioner/staff-1`).

use std::collections::HashMap;

use serde_json::Value;

/// Whose ids the references in the resources are.
#[derive(Clone, Copy)]
pub enum Ids<'a> {
    /// The agency's own ids (a Bundle the gateway made, a golden case): a reference names an agency id.
    Agency,
    /// A partner server's ids: a reference is resolved through the resources read along with it, then through
    /// this crosswalk (`"Patient/9f0c…"` → the agency id), and left out (reported) when neither knows it.
    Partner(&'a dyn Fn(&str) -> Option<String>),
}

/// The business identifier systems of the mappings: system → resource type, and resource type → systems; and the
/// systems of the logical references they write (resource type → system).
#[derive(Debug, Default)]
pub struct Systems {
    by_system: HashMap<String, String>,
    by_type: HashMap<String, Vec<String>>,
    logical: HashMap<String, String>,
}

impl Systems {
    /// Records that resources of `resource` carry the agency's id under `system`.
    pub fn add(&mut self, resource: &str, system: &str) {
        self.by_system.entry(system.to_owned()).or_insert_with(|| resource.to_owned());
        let systems = self.by_type.entry(resource.to_owned()).or_default();
        if !systems.iter().any(|s| s == system) {
            systems.push(system.to_owned());
        }
    }

    /// Records that logical references to `resource` name it by an identifier in `system` whose value is an agency
    /// id (a staff id): a literal `resource/<id>` then reads as that identifier. The first system given for a
    /// type wins.
    pub fn add_logical(&mut self, resource: &str, system: &str) {
        self.logical.entry(resource.to_owned()).or_insert_with(|| system.to_owned());
    }

    /// The agency id of a resource: the value of its identifier in one of its type's systems.
    #[must_use]
    pub fn agency_id(&self, resource: &Value) -> Option<String> {
        let ty = resource.get("resourceType")?.as_str()?;
        let systems = self.by_type.get(ty)?;
        resource.get("identifier")?.as_array()?.iter().find_map(|i| {
            let system = i.get("system")?.as_str()?;
            let value = i.get("value")?.as_str()?;
            (systems.iter().any(|s| s == system) && !value.is_empty()).then(|| value.to_owned())
        })
    }

    fn maps_type(&self, ty: &str) -> bool {
        self.by_type.contains_key(ty)
    }
}

/// A resource made ready for its inverse mapping.
#[derive(Debug)]
pub struct Localized {
    /// The resource: without its server id, references rewritten to agency ids.
    pub resource: Value,
    /// The agency id from the business identifier; `None`: a foreign resource (not one the gateway wrote).
    pub agency_id: Option<String>,
    /// The id the resource had (a server's, or ours when it is the same).
    pub resource_id: Option<String>,
    /// References that name no record the gateway knows, by path.
    pub unresolved: Vec<String>,
}

/// `Type/id` of a reference: relative, absolute (`https://…/Patient/1`) or versioned (`…/_history/2`).
fn relative(reference: &str) -> Option<(String, String)> {
    let ty = super::references::target_type(reference)?;
    let r = reference.split("/_history/").next().unwrap_or(reference);
    let id = r.rsplit('/').next()?;
    Some((ty.to_owned(), id.to_owned()))
}

/// Readies resources read from FHIR for their inverse mappings.
#[must_use]
pub fn localize(resources: &[Value], systems: &Systems, ids: Ids<'_>) -> Vec<Localized> {
    // Within what was read, `Type/<resource id>` names the resource whose identifier says who it is.
    let mut known: HashMap<String, String> = HashMap::new();
    for r in resources {
        let (Some(ty), Some(id)) = (r.get("resourceType").and_then(Value::as_str), r.get("id").and_then(Value::as_str))
        else {
            continue;
        };
        if let Some(agency) = systems.agency_id(r) {
            known.insert(format!("{ty}/{id}"), agency);
        }
    }
    resources
        .iter()
        .map(|r| {
            let agency_id = systems.agency_id(r);
            let mut resource = r.clone();
            let resource_id =
                resource.as_object_mut().and_then(|m| m.remove("id")).and_then(|v| v.as_str().map(str::to_owned));
            if let Some(id) = &agency_id
                && let Some(m) = resource.as_object_mut()
            {
                // The mapping reads the id from the identifier too: they agree, whatever the server assigned.
                m.insert("id".into(), Value::String(id.clone()));
            }
            let mut unresolved = Vec::new();
            let ours = agency_id.is_some();
            rewrite(&mut resource, "", systems, &mut |path, reference, named| {
                resolve(reference, path, ours, named, systems, &known, ids, &mut unresolved)
            });
            literal_to_logical(&mut resource, systems);
            logical(&mut resource, systems);
            Localized { resource, agency_id, resource_id, unresolved }
        })
        .collect()
}

/// What one reference becomes: `Some(new)` to keep it (rewritten), `None` to leave it out. `named`: the Reference
/// also carries an identifier in one of the gateway's systems, which says what it names when the id does not.
#[allow(clippy::too_many_arguments)]
fn resolve(
    reference: &str,
    path: &str,
    ours: bool,
    named: bool,
    systems: &Systems,
    known: &HashMap<String, String>,
    ids: Ids<'_>,
    unresolved: &mut Vec<String>,
) -> Option<String> {
    let Some((ty, id)) = relative(reference) else { return Some(reference.to_owned()) };
    let key = format!("{ty}/{id}");
    if let Some(agency) = known.get(&key) {
        return Some(format!("{ty}/{agency}"));
    }
    match ids {
        Ids::Agency => Some(key),
        Ids::Partner(crosswalk) => {
            if let Some(agency) = crosswalk(&key) {
                return Some(format!("{ty}/{agency}"));
            }
            // What the gateway wrote into its own resource and never delivers (staff, the agency) comes back as
            // written; a record of a kind it delivers, or anything a foreign resource names, must be matched.
            if ours && !systems.maps_type(&ty) {
                return Some(key);
            }
            // The partner stored the id as given, or one we never learnt: the identifier beside it names the record.
            if named {
                return None;
            }
            unresolved.push(format!("{path}: {key} is not a record the gateway knows; match it by its identifiers"));
            None
        }
    }
}

/// Whether a Reference carries an identifier in one of the gateway's record systems.
fn names_a_record(m: &serde_json::Map<String, Value>, systems: &Systems) -> bool {
    m.get("identifier")
        .and_then(|i| Some((i.get("system")?.as_str()?, i.get("value")?.as_str()?)))
        .is_some_and(|(system, value)| systems.by_system.contains_key(system) && !value.is_empty())
}

/// Calls `f` on every `reference` string under `v`, with whether its Reference also carries an identifier in one
/// of the gateway's record systems; `None` removes it.
fn rewrite(v: &mut Value, path: &str, systems: &Systems, f: &mut dyn FnMut(&str, &str, bool) -> Option<String>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get("reference").cloned() {
                let at = if path.is_empty() { "reference".to_owned() } else { format!("{path}.reference") };
                match f(&at, &r, names_a_record(m, systems)) {
                    Some(new) => {
                        m.insert("reference".into(), Value::String(new));
                    }
                    None => {
                        m.remove("reference");
                    }
                }
            }
            for (k, x) in m.iter_mut() {
                if k != "reference" {
                    let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                    rewrite(x, &p, systems, f);
                }
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter_mut().enumerate() {
                rewrite(x, &format!("{path}[{i}]"), systems, f);
            }
        }
        _ => {}
    }
}

/// A literal reference to what the gateway never delivers (`Practitioner/staff-1`, as the mappings once wrote and
/// a hospital may still send) becomes the logical reference the mappings now read: `type` + `identifier`.
fn literal_to_logical(v: &mut Value, systems: &Systems) {
    match v {
        Value::Object(m) => {
            let target = m
                .get("reference")
                .and_then(Value::as_str)
                .filter(|_| !m.contains_key("identifier"))
                .and_then(relative)
                .and_then(|(ty, id)| Some((systems.logical.get(&ty)?.clone(), ty, id)));
            if let Some((system, ty, id)) = target {
                m.remove("reference");
                m.entry("type").or_insert(Value::String(ty));
                m.insert("identifier".into(), serde_json::json!({ "system": system, "value": id }));
            }
            m.values_mut().for_each(|x| literal_to_logical(x, systems));
        }
        Value::Array(a) => a.iter_mut().for_each(|x| literal_to_logical(x, systems)),
        _ => {}
    }
}

/// A logical reference (`{ identifier: { system, value } }` with no `reference`) in one of the gateway's systems
/// becomes the literal reference the mappings read.
fn logical(v: &mut Value, systems: &Systems) {
    match v {
        Value::Object(m) => {
            let target = m.get("identifier").filter(|_| !m.contains_key("reference")).and_then(|i| {
                let ty = systems.by_system.get(i.get("system")?.as_str()?)?;
                Some(format!("{ty}/{}", i.get("value")?.as_str()?))
            });
            if let Some(target) = target {
                m.remove("identifier");
                m.insert("reference".into(), Value::String(target));
            }
            m.values_mut().for_each(|x| logical(x, systems));
        }
        Value::Array(a) => a.iter_mut().for_each(|x| logical(x, systems)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn systems() -> Systems {
        let mut s = Systems::default();
        s.add("Patient", "urn:x:client");
        s.add("ServiceRequest", "urn:x:referral");
        s.add("CarePlan", "urn:x:care-plan");
        s.add_logical("Practitioner", "urn:x:staff");
        s
    }

    #[test]
    fn references_take_every_form_a_server_writes() {
        assert_eq!(relative("Patient/1"), Some(("Patient".into(), "1".into())));
        assert_eq!(relative("https://ehr.example/r4/Patient/1/_history/3"), Some(("Patient".into(), "1".into())));
        assert_eq!(relative("urn:uuid:5c1e"), None);
        assert_eq!(relative("#contained"), None);
    }

    #[test]
    fn the_identifier_wins_over_the_server_id_and_references_follow_it() {
        let patient = json!({"resourceType": "Patient", "id": "9f0c", "identifier": [{"system": "urn:x:client", "value": "cl-1"}]});
        let sr = json!({"resourceType": "ServiceRequest", "id": "77ab",
            "identifier": [{"system": "urn:x:referral", "value": "ref.1"}],
            "subject": {"reference": "https://ehr.example/r4/Patient/9f0c"},
            "basedOn": [{"reference": "CarePlan/c0ff"}],
            "requester": {"reference": "Practitioner/staff-1"}});
        let crosswalk = |r: &str| (r == "CarePlan/c0ff").then(|| "cp.1".to_owned());
        let out = localize(&[patient, sr], &systems(), Ids::Partner(&crosswalk));
        assert_eq!(out[0].agency_id.as_deref(), Some("cl-1"));
        assert_eq!(out[0].resource["id"], "cl-1");
        assert_eq!(out[1].resource_id.as_deref(), Some("77ab"));
        assert_eq!(out[1].resource["id"], "ref.1");
        assert_eq!(out[1].resource["subject"]["reference"], "Patient/cl-1");
        assert_eq!(out[1].resource["basedOn"][0]["reference"], "CarePlan/cp.1");
        assert_eq!(
            out[1].resource["requester"],
            json!({"type": "Practitioner", "identifier": {"system": "urn:x:staff", "value": "staff-1"}}),
            "ours, never delivered: the old literal form reads as the logical reference"
        );
        assert!(out[1].unresolved.is_empty(), "{:?}", out[1].unresolved);
    }

    #[test]
    fn a_foreign_resource_is_not_adopted_and_names_what_must_be_matched() {
        let sr = json!({"resourceType": "ServiceRequest", "id": "h-1",
            "subject": {"reference": "Patient/p-1"}, "requester": {"reference": "Practitioner/dr-9"}});
        let out = localize(&[sr], &systems(), Ids::Partner(&|_| None));
        assert_eq!(out[0].agency_id, None);
        assert!(out[0].resource.get("id").is_none(), "the server id is never the agency id");
        assert!(out[0].resource["subject"].get("reference").is_none());
        assert_eq!(out[0].unresolved.len(), 2, "{:?}", out[0].unresolved);
        assert!(
            out[0].unresolved.iter().any(|u| u.starts_with("subject.reference: Patient/p-1")),
            "{:?}",
            out[0].unresolved
        );
    }

    #[test]
    fn a_reference_a_partner_cannot_resolve_is_read_by_the_identifier_beside_it() {
        let sr = json!({"resourceType": "ServiceRequest", "identifier": [{"system": "urn:x:referral", "value": "r"}],
            "basedOn": [{"reference": "CarePlan/cp-1", "identifier": {"system": "urn:x:care-plan", "value": "cp-1"}}],
            "requester": {"type": "Practitioner", "identifier": {"system": "urn:x:staff", "value": "staff-1"}}});
        let out = localize(std::slice::from_ref(&sr), &systems(), Ids::Partner(&|_| None));
        assert!(out[0].unresolved.is_empty(), "{:?}", out[0].unresolved);
        assert_eq!(out[0].resource["basedOn"][0], json!({"reference": "CarePlan/cp-1"}));
        assert_eq!(out[0].resource["requester"], sr["requester"], "a logical reference to staff stays as it is");
        let bare = json!({"resourceType": "ServiceRequest", "identifier": [{"system": "urn:x:referral", "value": "r"}],
            "basedOn": [{"reference": "CarePlan/cp-1"}]});
        let out = localize(&[bare], &systems(), Ids::Partner(&|_| None));
        assert_eq!(out[0].unresolved.len(), 1, "without an identifier it must be matched: {:?}", out[0].unresolved);
    }

    #[test]
    fn a_logical_reference_in_our_system_becomes_the_record_it_names() {
        let sr = json!({"resourceType": "ServiceRequest", "identifier": [{"system": "urn:x:referral", "value": "r"}],
            "subject": {"identifier": {"system": "urn:x:client", "value": "cl-1"}, "display": "Client"}});
        let out = localize(&[sr], &systems(), Ids::Partner(&|_| None));
        assert_eq!(out[0].resource["subject"], json!({"reference": "Patient/cl-1", "display": "Client"}));
    }
}
