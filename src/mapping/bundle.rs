//! Transaction Bundles: `urn:uuid:` full URLs, conditional requests on business identifiers.
//!
//! Each entry's full URL is a UUID (v5) derived from `Type/id`, so the same record always gives the
//! same Bundle. References between entries are rewritten to those URLs; resource ids are left out
//! because a partner assigns its own (and a conditional update must not carry one).

use std::collections::HashMap;

use serde_json::{Value, json};

use super::{Emitted, RequestKind};
use crate::fhir::system::BUNDLE_UUID_NAMESPACE;

/// The `urn:uuid:` full URL of `Type/id`.
#[must_use]
pub fn full_url(reference: &str) -> String {
    format!("urn:uuid:{}", uuid::Uuid::new_v5(&BUNDLE_UUID_NAMESPACE, reference.as_bytes()))
}

/// The (`system`, `value`) of a resource's first identifier.
#[must_use]
pub fn first_identifier(resource: &Value) -> Option<(String, String)> {
    let id = resource.get("identifier")?;
    let id = if id.is_array() { id.get(0)? } else { id };
    Some((id.get("system")?.as_str()?.to_owned(), id.get("value")?.as_str()?.to_owned()))
}

fn rewrite_references(v: &mut Value, urls: &HashMap<String, String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if k == "reference"
                    && let Some(url) = x.as_str().and_then(|r| urls.get(r))
                {
                    *x = Value::String(url.clone());
                } else if x.is_object() || x.is_array() {
                    rewrite_references(x, urls);
                }
            }
        }
        Value::Array(a) => {
            a.iter_mut().filter(|x| x.is_object() || x.is_array()).for_each(|x| rewrite_references(x, urls))
        }
        _ => {}
    }
}

/// Builds the transaction Bundle for the resources of one record, taking them (no copy).
#[must_use]
pub fn into_transaction(resources: Vec<Emitted>) -> Value {
    let key = |r: &Value| {
        let ty = r.get("resourceType").and_then(Value::as_str).unwrap_or_default();
        let id = r.get("id").and_then(Value::as_str).unwrap_or_default();
        format!("{ty}/{id}")
    };
    let keys: Vec<String> = resources.iter().map(|e| key(&e.resource)).collect();
    let urls: HashMap<String, String> = keys.iter().map(|k| (k.clone(), full_url(k))).collect();
    let entries: Vec<Value> = resources
        .into_iter()
        .zip(&keys)
        .map(|(e, k)| {
            let ty = e.resource.get("resourceType").and_then(Value::as_str).unwrap_or_default().to_owned();
            let query = first_identifier(&e.resource).map(|(s, v)| format!("identifier={s}|{v}"));
            let mut resource = e.resource;
            if let Some(m) = resource.as_object_mut() {
                m.remove("id");
            }
            rewrite_references(&mut resource, &urls);
            let request = match (e.request, query) {
                (RequestKind::Upsert, Some(q)) => json!({"method": "PUT", "url": format!("{ty}?{q}")}),
                (RequestKind::Create, Some(q)) => json!({"method": "POST", "url": ty, "ifNoneExist": q}),
                (_, None) => json!({"method": "POST", "url": ty}),
            };
            // Built field by field: `json!` would serialise the resource into a second copy.
            let mut entry = serde_json::Map::new();
            entry.insert("fullUrl".into(), Value::String(urls[k].clone()));
            entry.insert("resource".into(), resource);
            entry.insert("request".into(), request);
            Value::Object(entry)
        })
        .collect();
    let mut bundle = serde_json::Map::new();
    bundle.insert("resourceType".into(), Value::String("Bundle".into()));
    if let Some(security) = super::labels::high_water(entries.iter().filter_map(|e| e.get("resource"))) {
        bundle.insert("meta".into(), json!({ "security": security }));
    }
    bundle.insert("type".into(), Value::String("transaction".into()));
    bundle.insert("entry".into(), Value::Array(entries));
    Value::Object(bundle)
}

/// Takes the resources out of any Bundle, turning `urn:uuid:` references back into `Type/id`
/// (the id from the resource, or from the business identifier of a conditional request).
#[must_use]
pub fn unbundle(resources: &[Value]) -> Vec<Value> {
    let mut out = Vec::new();
    for r in resources {
        if r.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
            out.push(r.clone());
            continue;
        }
        let entries = r.get("entry").and_then(Value::as_array).cloned().unwrap_or_default();
        let mut urls = HashMap::new();
        for e in &entries {
            let (Some(full), Some(res)) = (e.get("fullUrl").and_then(Value::as_str), e.get("resource")) else {
                continue;
            };
            let ty = res.get("resourceType").and_then(Value::as_str).unwrap_or_default();
            let id = res.get("id").and_then(Value::as_str).map(str::to_owned).or_else(|| {
                let url = e.pointer("/request/url").and_then(Value::as_str)?;
                let q = e.pointer("/request/ifNoneExist").and_then(Value::as_str).unwrap_or(url);
                q.rsplit_once('|').map(|(_, v)| v.to_owned())
            });
            if let Some(id) = id {
                urls.insert(full.to_owned(), format!("{ty}/{id}"));
            }
        }
        for e in entries {
            let Some(mut res) = e.get("resource").cloned() else { continue };
            if res.get("id").is_none()
                && let Some(local) = e.get("fullUrl").and_then(Value::as_str).and_then(|f| urls.get(f))
                && let Some((_, id)) = local.split_once('/')
                && let Some(m) = res.as_object_mut()
            {
                m.insert("id".into(), Value::String(id.to_owned()));
            }
            rewrite_references(&mut res, &urls);
            out.push(res);
        }
    }
    out
}

/// Deep-merges `extra` into `base`: objects merge, arrays append, scalars are replaced.
pub fn merge(base: &mut Value, extra: Value) {
    match (base, extra) {
        (Value::Object(b), Value::Object(x)) => {
            for (k, v) in x {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (Value::Array(b), Value::Array(x)) => b.extend(x),
        (slot, x) => *slot = x,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_links_entries_by_uuid_and_comes_back_with_ids() {
        let patient = json!({"resourceType": "Patient", "id": "cl-1", "identifier": [{"system": "urn:x:client", "value": "cl-1"}]});
        let sr = json!({"resourceType": "ServiceRequest", "id": "ref-1", "subject": {"reference": "Patient/cl-1"},
            "identifier": [{"system": "urn:x:referral", "value": "ref-1"}]});
        let emitted = [
            Emitted {
                mapping: "client.patient".into(),
                resource: patient.clone(),
                request: RequestKind::Create,
                categories: crate::mapping::labels::Categories::GENERAL,
            },
            Emitted {
                mapping: "referral.service_request".into(),
                resource: sr.clone(),
                request: RequestKind::Upsert,
                categories: crate::mapping::labels::Categories::GENERAL,
            },
        ];
        let b = into_transaction(emitted.to_vec());
        assert_eq!(b["entry"][1]["resource"]["subject"]["reference"], b["entry"][0]["fullUrl"]);
        assert_eq!(b["entry"][0]["request"]["ifNoneExist"], "identifier=urn:x:client|cl-1");
        assert_eq!(b["entry"][1]["request"]["url"], "ServiceRequest?identifier=urn:x:referral|ref-1");
        assert!(b["entry"][1]["resource"].get("id").is_none());
        assert_eq!(unbundle(&[b]), vec![patient, sr]);
    }
}
