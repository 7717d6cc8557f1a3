//! What one delivery sends, decided without the network: the resources a record maps to, their references
//! resolved for one partner, the order they must go in, the parts a partner's transaction limit splits them into,
//! the requests of each part, and what the partner's answers say it assigned.
//!
//! References: one to a resource of the same part is its `urn:uuid:`; one to a resource the partner already holds
//! (the crosswalk) is the partner's `Type/id`; one to a resource of this record that a later part sends is left out
//! of this part and the resource is sent again once that part has landed; any other (staff, the agency, a
//! directory service, a record never delivered there) keeps only its `identifier` and `display`: a logical
//! reference, never an agency id posing as the partner's.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::fhir::capabilities::Capabilities;
use crate::mapping::bundle::{first_identifier, full_url};
use crate::mapping::{Emitted, RequestKind};
use crate::store::CrosswalkEntry;

/// What a partner holds that must never be overwritten: its own resource, matched by an identifier it knows.
pub const PARTNER_OWNED: &str = "partner-owned";

/// One resource to deliver.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The resource as the mapping names it (`Observation/as-2001`).
    pub local_ref: String,
    /// Its type.
    pub resource_type: String,
    /// Its business identifier (`system`, `value`): what makes sending it again harmless.
    pub identifier: (String, String),
    /// Conditional create (kept as the partner has it once there) or upsert.
    pub request: RequestKind,
    /// The resource as mapped (agency ids, agency references).
    pub resource: Value,
}

/// Why a record cannot be planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// A resource without a business identifier cannot be sent idempotently.
    #[error("{0} has no business identifier: it cannot be sent without risking a duplicate")]
    NoIdentifier(String),
}

/// The entries of a mapped record, in bundle order.
///
/// # Errors
/// A resource without a business identifier.
pub fn entries(resources: Vec<Emitted>) -> Result<Vec<Entry>, PlanError> {
    resources
        .into_iter()
        .map(|e| {
            let ty = e.resource.get("resourceType").and_then(Value::as_str).unwrap_or_default().to_owned();
            let id = e.resource.get("id").and_then(Value::as_str).unwrap_or_default();
            let local_ref = format!("{ty}/{id}");
            let identifier = first_identifier(&e.resource).ok_or_else(|| PlanError::NoIdentifier(local_ref.clone()))?;
            Ok(Entry { local_ref, resource_type: ty, identifier, request: e.request, resource: e.resource })
        })
        .collect()
}

/// Every `reference` string in a resource.
pub(crate) fn references(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("reference", Value::String(r)) => out.push(r.clone()),
                    _ => references(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| references(x, out)),
        _ => {}
    }
}

/// Every reference of `entries` to something outside them (what the crosswalk may know).
#[must_use]
pub fn outside_references(entries: &[Entry]) -> Vec<String> {
    let own: HashSet<&str> = entries.iter().map(|e| e.local_ref.as_str()).collect();
    let mut all = Vec::new();
    for e in entries {
        references(&e.resource, &mut all);
    }
    let mut out: Vec<String> = all.into_iter().filter(|r| !own.contains(r.as_str())).collect();
    out.sort();
    out.dedup();
    out
}

/// The order entries go in: what is referenced before what references it, resources that reference each other
/// (a goal and its progress observations) side by side; otherwise bundle order. Each group is a strongly connected
/// component, dependencies first.
#[must_use]
pub fn groups(entries: &[Entry]) -> Vec<Vec<usize>> {
    let index: HashMap<&str, usize> = entries.iter().enumerate().map(|(i, e)| (e.local_ref.as_str(), i)).collect();
    let edges: Vec<Vec<usize>> = entries
        .iter()
        .map(|e| {
            let mut refs = Vec::new();
            references(&e.resource, &mut refs);
            let mut to: Vec<usize> = refs.iter().filter_map(|r| index.get(r.as_str()).copied()).collect();
            to.sort_unstable();
            to.dedup();
            to
        })
        .collect();
    // Tarjan: a component is emitted after every component it reaches, so dependencies come out first.
    struct Tarjan<'a> {
        edges: &'a [Vec<usize>],
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on_stack: Vec<bool>,
        stack: Vec<usize>,
        next: usize,
        out: Vec<Vec<usize>>,
    }
    impl Tarjan<'_> {
        fn visit(&mut self, v: usize) {
            self.index[v] = Some(self.next);
            self.low[v] = self.next;
            self.next += 1;
            self.stack.push(v);
            self.on_stack[v] = true;
            for &w in &self.edges[v] {
                match self.index[w] {
                    None => {
                        self.visit(w);
                        self.low[v] = self.low[v].min(self.low[w]);
                    }
                    Some(iw) if self.on_stack[w] => self.low[v] = self.low[v].min(iw),
                    Some(_) => {}
                }
            }
            if Some(self.low[v]) == self.index[v] {
                let mut group = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack[w] = false;
                    group.push(w);
                    if w == v {
                        break;
                    }
                }
                group.sort_unstable();
                self.out.push(group);
            }
        }
    }
    let n = entries.len();
    let mut t = Tarjan {
        edges: &edges,
        index: vec![None; n],
        low: vec![0; n],
        on_stack: vec![false; n],
        stack: Vec::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in 0..n {
        if t.index[v].is_none() {
            t.visit(v);
        }
    }
    t.out
}

/// The parts a delivery is sent in: groups packed in order into parts of at most `max` entries (`0`: one entry per
/// request, no transactions); a group larger than a part is split in bundle order.
#[must_use]
pub fn parts(groups: &[Vec<usize>], max: u32) -> Vec<Vec<usize>> {
    let max = usize::try_from(max).unwrap_or(usize::MAX).max(1);
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    for g in groups {
        if current.len() + g.len() > max && !current.is_empty() {
            out.push(std::mem::take(&mut current));
        }
        for &i in g {
            if current.len() == max {
                out.push(std::mem::take(&mut current));
            }
            current.push(i);
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// What resolving one resource's references left out.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// References to resources of this record that a later part sends (the resource goes again after it).
    pub deferred: bool,
    /// References made logical (identifier and display only), or dropped when they had neither.
    pub logical: usize,
    /// The targets of those that are resources the gateway sends (`Type/id` of a type it emits): the partner may
    /// hold them later.
    pub waits_for: Vec<String>,
}

/// The resource types the gateway sends to partners: a logical reference to one of them may resolve later.
pub const SENT_TYPES: [&str; 9] =
    ["Patient", "Observation", "Condition", "Goal", "CarePlan", "ServiceRequest", "Task", "Consent", "Flag"];

/// Resolves the references of `resource` for one part (see the module docs); `conditional`: the partner resolves
/// conditional references in a transaction (`Patient?identifier=system|value`), so a reference to a resource it
/// may hold under our identifier is sent as one instead of made logical.
pub fn resolve(
    resource: &mut Value,
    in_part: &HashSet<&str>,
    own: &HashSet<&str>,
    held: &HashMap<String, CrosswalkEntry>,
    transaction: bool,
    conditional: bool,
) -> Resolved {
    let mut r = Resolved::default();
    let scope = Scope { in_part, own, held, transaction, conditional: conditional && transaction };
    resolve_in(resource, &scope, &mut r);
    if r.deferred || r.logical > 0 {
        prune(resource);
    }
    r
}

/// What one part knows of the targets of its references.
struct Scope<'a> {
    in_part: &'a HashSet<&'a str>,
    own: &'a HashSet<&'a str>,
    held: &'a HashMap<String, CrosswalkEntry>,
    transaction: bool,
    conditional: bool,
}

/// Whether an element is left with nothing to say: an empty object or array, or an extension with only its
/// `url` (a value dropped with its reference).
fn is_hollow(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.is_empty() || (m.len() == 1 && m.contains_key("url")),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// Removes what dropping references left hollow, from the leaves up (an activity whose only content was its
/// reference, an extension whose value was one).
fn prune(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for x in m.values_mut() {
                prune(x);
            }
            m.retain(|_, x| !is_hollow(x));
        }
        Value::Array(a) => {
            for x in a.iter_mut() {
                prune(x);
            }
            a.retain(|x| !is_hollow(x));
        }
        _ => {}
    }
}

/// What becomes of one reference.
enum Fate {
    Keep,
    Rewrite(String),
    Logical,
    Defer,
}

fn fate(target: &str, scope: &Scope<'_>) -> Fate {
    if target.starts_with('#') || target.starts_with("urn:") {
        return Fate::Keep;
    }
    if scope.transaction && scope.in_part.contains(target) {
        return Fate::Rewrite(full_url(target));
    }
    if let Some(h) = scope.held.get(target) {
        return Fate::Rewrite(format!("{}/{}", h.remote_type, h.remote_id));
    }
    if scope.own.contains(target) { Fate::Defer } else { Fate::Logical }
}

fn resolve_in(v: &mut Value, scope: &Scope<'_>, r: &mut Resolved) {
    match v {
        Value::Object(m) => {
            let mut drop_keys = Vec::new();
            for (k, x) in m.iter_mut() {
                if let Some(target) = x.get("reference").and_then(Value::as_str).map(str::to_owned)
                    && x.is_object()
                {
                    if !settle_reference(x, &target, scope, r) {
                        drop_keys.push(k.clone());
                    }
                } else {
                    resolve_in(x, scope, r);
                }
            }
            for k in drop_keys {
                m.remove(&k);
            }
        }
        Value::Array(a) => {
            a.retain_mut(|x| {
                if let Some(target) = x.get("reference").and_then(Value::as_str).map(str::to_owned)
                    && x.is_object()
                {
                    settle_reference(x, &target, scope, r)
                } else {
                    resolve_in(x, scope, r);
                    true
                }
            });
        }
        _ => {}
    }
}

/// The conditional reference (`Type?identifier=system|value`) for a Reference to a resource the gateway sends,
/// by the business identifier it carries; `None` without one.
fn conditional_reference(target: &str, reference: &serde_json::Map<String, Value>) -> Option<String> {
    let (ty, _) = target.split_once('/').filter(|(ty, id)| SENT_TYPES.contains(ty) && !id.contains('/'))?;
    let identifier = reference.get("identifier")?;
    let system = identifier.get("system").and_then(Value::as_str).filter(|s| !s.is_empty())?;
    let value = identifier.get("value").and_then(Value::as_str).filter(|v| !v.is_empty())?;
    let encode = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    Some(format!("{ty}?identifier={}%7C{}", encode(system), encode(value)))
}

/// Settles one Reference object in place; `false` when nothing of it is left to keep.
fn settle_reference(x: &mut Value, target: &str, scope: &Scope<'_>, r: &mut Resolved) -> bool {
    let Some(m) = x.as_object_mut() else { return true };
    match fate(target, scope) {
        Fate::Keep => true,
        Fate::Rewrite(to) => {
            m.insert("reference".into(), Value::String(to));
            true
        }
        Fate::Defer => {
            r.deferred = true;
            m.remove("reference");
            m.contains_key("identifier") || m.contains_key("display")
        }
        Fate::Logical => {
            if scope.conditional
                && let Some(to) = conditional_reference(target, m)
            {
                m.insert("reference".into(), Value::String(to));
                return true;
            }
            r.logical += 1;
            if target.split_once('/').is_some_and(|(ty, id)| SENT_TYPES.contains(&ty) && !id.contains('/')) {
                r.waits_for.push(target.to_owned());
            }
            m.remove("reference");
            m.contains_key("identifier") || m.contains_key("display")
        }
    }
}

/// Keeps of a resource's `meta` only its security labels: what it says of the data goes to the partner; the
/// profiles it was checked against and any server bookkeeping do not (a partner validating against a profile it does
/// not hold would refuse the resource).
fn labels_only(m: &mut Map<String, Value>) {
    let security = m.remove("meta").and_then(|mut meta| meta.get_mut("security").map(Value::take));
    if let Some(security) = security.filter(|s| !s.is_null()) {
        m.insert("meta".into(), json!({ "security": security }));
    }
}

/// The hash of what is sent (the resolved resource without its id, with its labels): identical content is not sent
/// again.
#[must_use]
pub fn content_hash(resource: &Value) -> String {
    let mut r = resource.clone();
    if let Some(m) = r.as_object_mut() {
        m.remove("id");
        labels_only(m);
    }
    hex::encode(Sha256::digest(r.to_string().as_bytes()))
}

/// One request of a part.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// `POST` or `PUT`.
    pub method: &'static str,
    /// Relative URL (`Patient`, `Goal?identifier=…`, `Goal/123`).
    pub url: String,
    /// `If-None-Exist` query, for a conditional create.
    pub if_none_exist: Option<String>,
    /// `If-Match` (`W/"vid"`), for an update of what the partner holds.
    pub if_match: Option<String>,
}

/// The request that sends `entry` (resolved as `resource`) given what the partner holds of it and what its server
/// supports: a conditional create or update on the business identifier where the server searches that type by
/// identifier and takes conditional requests, else a plain create whose id the crosswalk keeps (later versions
/// then update it by that id).
#[must_use]
pub fn request(entry: &Entry, held: Option<&CrosswalkEntry>, caps: &Capabilities) -> Request {
    let (system, value) = &entry.identifier;
    let query = format!("identifier={system}|{value}");
    let ty = entry.resource_type.as_str();
    let plain = || Request { method: "POST", url: entry.resource_type.clone(), if_none_exist: None, if_match: None };
    match held {
        Some(h) => Request {
            method: "PUT",
            url: format!("{}/{}", h.remote_type, h.remote_id),
            if_none_exist: None,
            if_match: h.version_id.as_ref().map(|v| format!("W/\"{v}\"")),
        },
        None => match entry.request {
            RequestKind::Create if caps.conditional_create(ty) => {
                Request { method: "POST", url: entry.resource_type.clone(), if_none_exist: Some(query), if_match: None }
            }
            RequestKind::Upsert if caps.conditional_update(ty) => Request {
                method: "PUT",
                url: format!("{}?{query}", entry.resource_type),
                if_none_exist: None,
                if_match: None,
            },
            RequestKind::Create | RequestKind::Upsert => plain(),
        },
    }
}

/// The body of one request: the resolved resource with its security labels, with the partner's id when it updates
/// one by id and none otherwise (a create or a conditional update must not carry one).
#[must_use]
pub fn body(mut resource: Value, held: Option<&CrosswalkEntry>) -> Value {
    if let Some(m) = resource.as_object_mut() {
        labels_only(m);
        match held {
            Some(h) => {
                m.insert("id".into(), Value::String(h.remote_id.clone()));
            }
            None => {
                m.remove("id");
            }
        }
    }
    resource
}

/// A transaction Bundle of `items` (local ref, body, request).
#[must_use]
pub fn transaction(items: Vec<(String, Value, Request)>) -> Value {
    let entries: Vec<Value> = items
        .into_iter()
        .map(|(local_ref, resource, req)| {
            let mut request = Map::new();
            request.insert("method".into(), Value::String(req.method.into()));
            request.insert("url".into(), Value::String(req.url));
            if let Some(q) = req.if_none_exist {
                request.insert("ifNoneExist".into(), Value::String(q));
            }
            if let Some(m) = req.if_match {
                request.insert("ifMatch".into(), Value::String(m));
            }
            let mut entry = Map::new();
            entry.insert("fullUrl".into(), Value::String(full_url(&local_ref)));
            entry.insert("resource".into(), resource);
            entry.insert("request".into(), Value::Object(request));
            Value::Object(entry)
        })
        .collect();
    let mut bundle = Map::new();
    bundle.insert("resourceType".into(), Value::String("Bundle".into()));
    // The high-water mark of what it carries: its entries' highest confidentiality, never a sensitivity code.
    if let Some(security) = crate::mapping::labels::high_water(entries.iter().filter_map(|e| e.get("resource"))) {
        bundle.insert("meta".into(), json!({ "security": security }));
    }
    bundle.insert("type".into(), Value::String("transaction".into()));
    bundle.insert("entry".into(), Value::Array(entries));
    Value::Object(bundle)
}

/// What the partner assigned to one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assigned {
    /// Its type there.
    pub resource_type: String,
    /// Its id there.
    pub id: String,
    /// Its version there, when said.
    pub version_id: Option<String>,
}

/// Reads `Type/id[/_history/vid]` (relative, or absolute under any base) and an `ETag` (`W/"vid"`).
#[must_use]
pub fn assigned(location: Option<&str>, etag: Option<&str>, resource: Option<&Value>) -> Option<Assigned> {
    let from_body = resource.and_then(|r| {
        Some(Assigned {
            resource_type: r.get("resourceType")?.as_str()?.to_owned(),
            id: r.get("id")?.as_str()?.to_owned(),
            version_id: r.pointer("/meta/versionId").and_then(Value::as_str).map(str::to_owned),
        })
    });
    let from_location = location.and_then(|l| {
        let path = l.split(['?', '#']).next().unwrap_or(l);
        let parts: Vec<&str> = path.trim_end_matches('/').split('/').collect();
        let (ty, id, vid) = match parts.iter().rposition(|p| *p == "_history") {
            Some(h) if h >= 2 && h + 1 < parts.len() => (parts[h - 2], parts[h - 1], Some(parts[h + 1])),
            Some(_) => return None,
            None if parts.len() >= 2 => (parts[parts.len() - 2], parts[parts.len() - 1], None),
            None => return None,
        };
        ty.chars().next().filter(char::is_ascii_uppercase)?;
        Some(Assigned { resource_type: ty.to_owned(), id: id.to_owned(), version_id: vid.map(str::to_owned) })
    });
    let tag = etag.map(|t| t.trim().trim_start_matches("W/").trim_matches('"').to_owned()).filter(|t| !t.is_empty());
    let mut a = from_location.or(from_body)?;
    if let Some(t) = tag {
        a.version_id = Some(t);
    } else if a.version_id.is_none() {
        a.version_id = resource.and_then(|r| r.pointer("/meta/versionId")).and_then(Value::as_str).map(str::to_owned);
    }
    Some(a)
}

/// The per-entry answers of a transaction-response, in request order: status code and what was assigned.
///
/// # Errors
/// An answer that is not a transaction-response of `n` entries.
pub fn transaction_answers(body: &Value, n: usize) -> Result<Vec<(u16, Option<Assigned>)>, String> {
    if body.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err("the transaction answer is not a Bundle".into());
    }
    let entries = body.get("entry").and_then(Value::as_array).map_or(&[][..], Vec::as_slice);
    if entries.len() != n {
        return Err(format!("the transaction answer has {} entries for {n} requests", entries.len()));
    }
    Ok(entries
        .iter()
        .map(|e| {
            let status = e
                .pointer("/response/status")
                .and_then(Value::as_str)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let location = e.pointer("/response/location").and_then(Value::as_str);
            let etag = e.pointer("/response/etag").and_then(Value::as_str);
            (status, assigned(location, etag, e.get("resource")))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{RecordId, RecordKind};

    fn entry(r: &str, resource: Value) -> Entry {
        let (ty, id) = r.split_once('/').expect("Type/id");
        let mut resource = resource;
        resource["resourceType"] = json!(ty);
        resource["id"] = json!(id);
        resource["identifier"] = json!([{"system": format!("urn:x:{ty}"), "value": id}]);
        entries(vec![Emitted {
            mapping: "m".into(),
            resource,
            request: RequestKind::Upsert,
            categories: crate::mapping::labels::Categories::GENERAL,
        }])
        .expect("entry")
        .remove(0)
    }

    fn held(r: &str, id: &str) -> CrosswalkEntry {
        let (ty, _) = r.split_once('/').expect("Type/id");
        CrosswalkEntry {
            partner: "p".into(),
            local_ref: r.into(),
            kind: RecordKind::Client,
            record_id: RecordId::parse("cl-1").expect("id"),
            remote_type: ty.into(),
            remote_id: id.into(),
            version_id: Some("v1".into()),
            content_hash: String::new(),
        }
    }

    #[test]
    fn what_is_referenced_goes_first_and_a_cycle_stays_together() {
        let e = vec![
            entry(
                "Goal/g1",
                json!({"outcomeReference": [{"reference": "Observation/o1"}], "subject": {"reference": "Patient/p"}}),
            ),
            entry(
                "Observation/o1",
                json!({"focus": [{"reference": "Goal/g1"}], "subject": {"reference": "Patient/p"}}),
            ),
            entry("CarePlan/c", json!({"goal": [{"reference": "Goal/g1"}], "subject": {"reference": "Patient/p"}})),
            entry("Patient/p", json!({})),
        ];
        assert_eq!(groups(&e), vec![vec![3], vec![0, 1], vec![2]]);
        assert_eq!(parts(&groups(&e), 8), vec![vec![3, 0, 1, 2]]);
        assert_eq!(parts(&groups(&e), 2), vec![vec![3], vec![0, 1], vec![2]]);
        assert_eq!(parts(&groups(&e), 0), vec![vec![3], vec![0], vec![1], vec![2]]);
        assert_eq!(parts(&groups(&e), 3), vec![vec![3, 0, 1], vec![2]]);
    }

    #[test]
    fn references_resolve_to_the_part_the_crosswalk_or_a_logical_reference() {
        let mut r = json!({"subject": {"reference": "Patient/p"},
            "basedOn": [{"reference": "CarePlan/other", "identifier": {"system": "s", "value": "other"}},
                        {"reference": "ServiceRequest/gone"}],
            "requester": {"reference": "Practitioner/staff-1", "display": "J. Ellis"},
            "focus": [{"reference": "Goal/later"}],
            "x": {"reference": "Observation/held"}});
        let in_part: HashSet<&str> = ["Patient/p"].into();
        let own: HashSet<&str> = ["Patient/p", "Goal/later"].into();
        let mut crosswalk = HashMap::new();
        crosswalk.insert("Observation/held".to_owned(), held("Observation/held", "981"));
        let done = resolve(&mut r, &in_part, &own, &crosswalk, true, false);
        assert_eq!(r["subject"]["reference"], full_url("Patient/p"));
        assert_eq!(r["basedOn"], json!([{"identifier": {"system": "s", "value": "other"}}]));
        assert_eq!(r["requester"], json!({"display": "J. Ellis"}));
        assert!(r.get("focus").is_none());
        assert_eq!(r["x"]["reference"], "Observation/981");
        assert_eq!(
            done,
            Resolved {
                deferred: true,
                logical: 3,
                waits_for: vec!["CarePlan/other".into(), "ServiceRequest/gone".into()]
            }
        );
        // Sent alone (no transaction), a reference to the same part is not a urn:uuid either.
        let mut alone = json!({"subject": {"reference": "Patient/p"}});
        let none = HashMap::new();
        resolve(&mut alone, &in_part, &own, &none, false, false);
        assert!(alone.get("subject").is_none());
    }

    #[test]
    fn what_a_dropped_reference_leaves_hollow_goes_with_it() {
        let mut r = json!({"activity": [{"reference": {"reference": "ServiceRequest/x"}}, {"detail": {"kind": "Task"}}],
            "extension": [{"url": "u", "valueReference": {"reference": "Goal/x"}}, {"url": "v", "valueString": "s"}]});
        let none = HashMap::new();
        let done = resolve(&mut r, &HashSet::new(), &HashSet::new(), &none, true, false);
        assert_eq!(done.logical, 2);
        assert_eq!(done.waits_for, ["ServiceRequest/x", "Goal/x"]);
        assert_eq!(
            r,
            json!({"activity": [{"detail": {"kind": "Task"}}], "extension": [{"url": "v", "valueString": "s"}]})
        );
    }

    #[test]
    fn requests_are_conditional_until_the_partner_id_is_known() {
        let e = entry("Goal/g1", json!({}));
        let all = Capabilities::assumed();
        assert_eq!(request(&e, None, &all).url, "Goal?identifier=urn:x:Goal|g1");
        let h = held("Goal/g1", "77");
        let r = request(&e, Some(&h), &all);
        assert_eq!((r.method, r.url.as_str(), r.if_match.as_deref()), ("PUT", "Goal/77", Some("W/\"v1\"")));
        assert_eq!(body(e.resource.clone(), Some(&h))["id"], "77");
        assert!(body(e.resource.clone(), None).get("id").is_none());
        let mut create = e.clone();
        create.request = RequestKind::Create;
        assert_eq!(request(&create, None, &all).if_none_exist.as_deref(), Some("identifier=urn:x:Goal|g1"));
        // A server that cannot find a Goal by identifier gets a plain create (its id is kept), then updates by id.
        let no_goal_search = Capabilities::parse(&serde_json::json!({"resourceType": "CapabilityStatement",
            "rest": [{"mode": "server", "resource": [{"type": "Goal", "conditionalCreate": true,
                "conditionalUpdate": true, "searchParam": [{"name": "patient", "type": "reference"}]}]}]}))
        .expect("parses");
        for entry in [&e, &create] {
            let r = request(entry, None, &no_goal_search);
            assert_eq!((r.method, r.url.as_str(), r.if_none_exist.as_deref()), ("POST", "Goal", None));
        }
        assert_eq!(request(&e, Some(&h), &no_goal_search).method, "PUT");
    }

    #[test]
    fn assigned_ids_come_from_locations_etags_or_bodies() {
        let a = assigned(Some("http://h/fhir/Patient/abc/_history/9"), None, None).expect("location");
        assert_eq!((a.resource_type.as_str(), a.id.as_str(), a.version_id.as_deref()), ("Patient", "abc", Some("9")));
        let b = assigned(Some("Goal/1"), Some("W/\"4\""), None).expect("etag");
        assert_eq!(b.version_id.as_deref(), Some("4"));
        let c = assigned(None, None, Some(&json!({"resourceType": "Task", "id": "t", "meta": {"versionId": "2"}})));
        assert_eq!(c.expect("body").version_id.as_deref(), Some("2"));
        assert_eq!(assigned(Some("nonsense"), None, None), None);
        let answer = json!({"resourceType": "Bundle", "type": "transaction-response", "entry": [
            {"response": {"status": "201 Created", "location": "Patient/1/_history/a", "etag": "W/\"a\""}},
            {"response": {"status": "200", "location": "Goal/2/_history/b"}}]});
        let got = transaction_answers(&answer, 2).expect("answers");
        assert_eq!(got[0].0, 201);
        assert_eq!(got[1].1.as_ref().map(|a| a.id.as_str()), Some("2"));
        assert!(transaction_answers(&answer, 3).is_err());
    }

    #[test]
    fn a_resource_without_a_business_identifier_is_refused() {
        let e = Emitted {
            mapping: "m".into(),
            resource: json!({"resourceType": "Task", "id": "t"}),
            request: RequestKind::Upsert,
            categories: crate::mapping::labels::Categories::GENERAL,
        };
        assert_eq!(entries(vec![e]).unwrap_err(), PlanError::NoIdentifier("Task/t".into()));
    }

    #[test]
    fn the_hash_ignores_ids_and_meta() {
        assert_eq!(
            content_hash(&json!({"a": 1, "id": "x"})),
            content_hash(&json!({"a": 1, "meta": {"versionId": "2"}}))
        );
        assert_ne!(content_hash(&json!({"a": 1})), content_hash(&json!({"a": 2})));
    }

    #[test]
    fn labels_go_with_the_body_and_count_in_its_hash_while_profiles_do_not() {
        let labelled = json!({"a": 1, "meta": {"profile": ["p"], "security": [{"code": "R"}]}});
        assert_eq!(body(labelled.clone(), None), json!({"a": 1, "meta": {"security": [{"code": "R"}]}}));
        assert_eq!(body(json!({"a": 1, "meta": {"profile": ["p"]}}), None), json!({"a": 1}));
        assert_ne!(content_hash(&labelled), content_hash(&json!({"a": 1, "meta": {"security": [{"code": "N"}]}})));
        assert_eq!(content_hash(&labelled), content_hash(&json!({"a": 1, "meta": {"security": [{"code": "R"}]}})));
    }

    #[test]
    fn a_partner_that_resolves_conditional_references_gets_one_in_a_transaction_and_no_wait() {
        let sr = || {
            json!({"resourceType": "ServiceRequest", "subject": {"reference": "Patient/cl-1",
                "identifier": {"system": "https://a.example/sid/client", "value": "cl 1"}},
                "performer": [{"reference": "Practitioner/staff-1",
                "identifier": {"system": "https://a.example/sid/staff", "value": "s1"}}]})
        };
        let none = HashMap::new();
        let mut r = sr();
        let done = resolve(&mut r, &HashSet::new(), &HashSet::new(), &none, true, true);
        assert_eq!(
            r["subject"]["reference"], "Patient?identifier=https%3A%2F%2Fa.example%2Fsid%2Fclient%7Ccl+1",
            "{r}"
        );
        // What the gateway never sends stays logical; nothing waits for the Patient.
        assert!(r["performer"][0].get("reference").is_none(), "{r}");
        assert_eq!((done.logical, done.waits_for.len()), (1, 0));
        // Outside a transaction, or for a partner that does not say so: logical, and waiting for the Patient.
        for (transaction, conditional) in [(false, true), (true, false)] {
            let mut r = sr();
            let done = resolve(&mut r, &HashSet::new(), &HashSet::new(), &none, transaction, conditional);
            assert!(r["subject"].get("reference").is_none(), "{r}");
            assert_eq!(done.waits_for, ["Patient/cl-1"]);
        }
    }
}
