//! Invariant 7 on what the mappings emit: no agency id poses as a partner's resource id.
//!
//! A reference to an agency record (`Patient/cl-7001`, `CarePlan/cp-3002`) also names that record by the business
//! identifier its own mapping writes, so the delivery can swap the literal `reference` for the id the partner
//! assigned (crosswalk), or drop it and keep the identifier when the partner holds nothing of ours under that id.
//! What the gateway never delivers (staff, the agency, partner organisations, directory services) is referred to
//! logically: `type` + `identifier` (+ `display`), never a literal `Type/id` that would dangle on the partner.
//! Loading refuses a template that breaks this, at its line; a resource that breaks it never leaves.

use serde_json::Value;

/// Resource types the gateway never delivers: every reference to one is logical.
pub const NEVER_DELIVERED: [&str; 3] = ["Practitioner", "Organization", "HealthcareService"];

/// One Reference that breaks the rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// The JSON path of the Reference in the resource (`performer[0]`).
    pub path: String,
    /// What is wrong (types and element names only).
    pub message: String,
}

/// The resource type a literal reference names: relative (`Patient/1`), absolute or versioned; `None` for
/// `urn:uuid:`, a contained `#id`, or anything else that names no type.
#[must_use]
pub fn target_type(reference: &str) -> Option<&str> {
    let r = reference.split("/_history/").next().unwrap_or(reference);
    let mut segs = r.rsplit('/');
    let id = segs.next()?;
    let ty = segs.next()?;
    let type_like =
        ty.chars().next().is_some_and(|c| c.is_ascii_uppercase()) && ty.chars().all(|c| c.is_ascii_alphabetic());
    (type_like && !id.is_empty()).then_some(ty)
}

/// Whether a reference stays inside the document it is in (a Bundle entry's `urn:uuid:`, a contained `#id`).
fn internal(reference: &str) -> bool {
    reference.starts_with("urn:uuid:") || reference.starts_with('#')
}

fn has_identifier(reference: &serde_json::Map<String, Value>) -> bool {
    let text = |k: &str| {
        reference.get("identifier").and_then(|i| i.get(k)).and_then(Value::as_str).is_some_and(|s| !s.is_empty())
    };
    text("system") && text("value")
}

/// Every Reference under `resource` that breaks invariant 7: a literal reference to a type never delivered, a
/// logical reference without `identifier.system` and `identifier.value`, or a literal reference that leaves the
/// document without the identifier of what it names.
#[must_use]
pub fn check(resource: &Value) -> Vec<Issue> {
    let mut out = Vec::new();
    // Nearly every resource keeps the rule: a walk that makes no paths first, the paths only when it finds a break.
    if breaks(resource) {
        walk(resource, &mut String::new(), &mut out);
    }
    out
}

/// What the Reference held in `m` (if `m` is one) breaks, as messages.
fn issues_at(m: &serde_json::Map<String, Value>) -> Vec<String> {
    let mut out = Vec::new();
    let literal = m.get("reference").and_then(Value::as_str);
    let logical_type = m.get("type").and_then(Value::as_str).filter(|t| NEVER_DELIVERED.contains(t));
    if literal.is_none() && logical_type.is_none() {
        return out;
    }
    if let Some(r) = literal {
        match target_type(r) {
            Some(ty) if NEVER_DELIVERED.contains(&ty) => out.push(format!(
                "a literal reference to a {ty}, which the gateway never delivers: write a logical reference (type, \
                 identifier, display) instead"
            )),
            Some(ty) if !internal(r) && !has_identifier(m) => out.push(format!(
                "a reference to a {ty} carries no identifier (system and value): the partner may not hold it under \
                 that id"
            )),
            _ => {}
        }
    }
    if let Some(ty) = logical_type {
        if literal.is_some_and(|r| target_type(r).is_none()) {
            out.push(format!("a reference to a {ty}, which the gateway never delivers, is logical only"));
        }
        if !has_identifier(m) {
            out.push(format!("a logical reference to a {ty} carries an identifier (system and value)"));
        }
    }
    out
}

/// Whether any Reference under `v` breaks the rule (no paths made).
fn breaks(v: &Value) -> bool {
    match v {
        Value::Object(m) => {
            !issues_at(m).is_empty() || m.values().any(|x| (x.is_object() || x.is_array()) && breaks(x))
        }
        Value::Array(a) => a.iter().any(|x| (x.is_object() || x.is_array()) && breaks(x)),
        _ => false,
    }
}

fn walk(v: &Value, path: &mut String, out: &mut Vec<Issue>) {
    match v {
        Value::Object(m) => {
            for message in issues_at(m) {
                let path = if path.is_empty() { "(the resource)".to_owned() } else { path.clone() };
                out.push(Issue { path, message });
            }
            for (k, x) in m {
                // A scalar holds no Reference: no path is made for it (most elements are scalars).
                if !(x.is_object() || x.is_array()) {
                    continue;
                }
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                walk(x, path, out);
                path.truncate(len);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                if !(x.is_object() || x.is_array()) {
                    continue;
                }
                let len = path.len();
                {
                    use std::fmt::Write as _;
                    let _ = write!(path, "[{i}]");
                }
                walk(x, path, out);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn paths(v: &Value) -> Vec<String> {
        check(v).into_iter().map(|i| i.path).collect()
    }

    #[test]
    fn a_literal_reference_to_staff_an_organisation_or_a_directory_service_is_refused() {
        let sr = json!({"resourceType": "ServiceRequest",
            "requester": {"reference": "Practitioner/staff-1", "display": "Jordan Ellis"},
            "performer": [{"reference": "https://ehr.example/Organization/st-marys-ehr"},
                          {"reference": "HealthcareService/svc-1/_history/2"}]});
        assert_eq!(paths(&sr), ["performer[0]", "performer[1]", "requester"]);
    }

    #[test]
    fn a_logical_reference_needs_its_identifier_and_no_literal_reference() {
        let task = json!({"resourceType": "Task",
            "requester": {"type": "Organization", "display": "The agency"},
            "owner": {"type": "HealthcareService", "identifier": {"system": "urn:x:svc", "value": "s-1"}},
            "note": [{"authorReference": {"type": "Practitioner", "reference": "urn:uuid:1",
                "identifier": {"system": "urn:x:staff", "value": "staff-1"}}}]});
        assert_eq!(paths(&task), ["note[0].authorReference", "requester"]);
    }

    #[test]
    fn a_reference_leaving_the_document_carries_the_identifier_of_what_it_names() {
        let sr = json!({"resourceType": "ServiceRequest",
            "subject": {"reference": "Patient/cl-1", "identifier": {"system": "urn:x:client", "value": "cl-1"}},
            "basedOn": [{"reference": "CarePlan/cp-1"}, {"reference": "urn:uuid:5c1e"}],
            "supportingInfo": [{"reference": "Consent/co-1", "identifier": {"system": "urn:x:consent"}}]});
        assert_eq!(paths(&sr), ["basedOn[0]", "supportingInfo[0]"]);
    }
}
