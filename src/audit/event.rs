//! The audit chain as FHIR `AuditEvent`s, in the shape of IHE Basic Audit Log Patterns (BALP): each entry its
//! event type and subtype (a RESTful interaction, an export to a partner, an authentication), its outcome, the
//! agents (the API key or worker that acted, the partner on whose behalf or to whom, the peer address), and the
//! entities (the client as `Patient`, the agency record by identifier, the entry's facts as `entity.detail`).
//!
//! The classification of each action lives here and only here: rendering and search (`type`, `subtype`,
//! `outcome`) both read [`class`].

use serde_json::{Value, json};

use super::Sealed;
use crate::fhir::system;

/// How one action is classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Class {
    /// `AuditEvent.type`: system and code.
    pub type_: (&'static str, &'static str, &'static str),
    /// The standard subtype, when there is one (system, code, display).
    pub subtype: Option<(&'static str, &'static str, &'static str)>,
    /// `AuditEvent.action`: `C`, `R`, `U`, `D` or `E`.
    pub action: &'static str,
    /// `AuditEvent.outcome`: `0` success, `4` minor failure, `8` serious failure.
    pub outcome: &'static str,
}

const REST: (&str, &str, &str) = (system::AUDIT_EVENT_TYPE, "rest", "Restful Operation");
const EXPORT: (&str, &str, &str) = (system::DICOM_DCM, "110106", "Export");
const AUTHENTICATION: (&str, &str, &str) = (system::DICOM_DCM, "110114", "User Authentication");

const fn rest(code: &'static str) -> Option<(&'static str, &'static str, &'static str)> {
    Some((system::RESTFUL_INTERACTION, code, code))
}

/// Every action the gateway audits.
pub const ACTIONS: [&str; 19] = [
    "created",
    "replaced",
    "unchanged",
    "status_changed",
    "linked",
    "seeded",
    "read",
    "delivered",
    "delivery_unchanged",
    "delivery_retry",
    "delivery_dead",
    "delivery_held",
    "delivery_replayed",
    "delivery_discarded",
    "sync_started",
    "inbound_refused",
    "partner_move_refused",
    "authentication_refused",
    "access_refused",
];

/// The classification of `action` (an action kept by an older build reads as a RESTful operation).
#[must_use]
pub fn class(action: &str) -> Class {
    let c = |type_, subtype, action, outcome| Class { type_, subtype, action, outcome };
    match action {
        "created" | "seeded" => c(REST, rest("create"), "C", "0"),
        "replaced" | "unchanged" | "status_changed" | "linked" => c(REST, rest("update"), "U", "0"),
        "read" => c(REST, rest("read"), "R", "0"),
        "delivered" | "delivery_unchanged" | "delivery_held" => c(EXPORT, None, "E", "0"),
        "delivery_retry" => c(EXPORT, None, "E", "4"),
        "delivery_dead" => c(EXPORT, None, "E", "8"),
        "delivery_replayed" | "delivery_discarded" => c(REST, rest("update"), "U", "0"),
        "sync_started" => c(REST, rest("create"), "C", "0"),
        "inbound_refused" => c(REST, rest("create"), "C", "4"),
        "partner_move_refused" => c(REST, rest("update"), "U", "4"),
        "authentication_refused" => c(AUTHENTICATION, Some((system::DICOM_DCM, "110122", "Login")), "E", "4"),
        "access_refused" => c(REST, None, "E", "4"),
        _ => c(REST, None, "E", "0"),
    }
}

/// The actions whose events match a token search value (`code` or `system|code`) on `type`, `subtype` or
/// `outcome` (`which`).
#[must_use]
pub fn actions_matching(which: &str, token: &str) -> Vec<&'static str> {
    let (sys, code) = match token.split_once('|') {
        Some((s, c)) => (Some(s), c),
        None => (None, token),
    };
    let hit = |(s, c, _): (&str, &str, &str)| c == code && sys.is_none_or(|x| x.is_empty() || x == s);
    ACTIONS
        .into_iter()
        .filter(|a| {
            let k = class(a);
            match which {
                "type" => hit(k.type_),
                "subtype" => k.subtype.is_some_and(hit) || hit((system::CAREBRIDGE_AUDIT_ACTION, a, a)),
                "outcome" => k.outcome == code,
                _ => false,
            }
        })
        .collect()
}

fn coding((system, code, display): (&str, &str, &str)) -> Value {
    json!({"system": system, "code": code, "display": display})
}

/// An identifier-only reference.
fn named(system: &str, value: &str) -> Value {
    json!({"identifier": {"system": system, "value": value}, "display": value})
}

/// `sealed` as an `AuditEvent` (its id the entry's number; `observer` names this gateway).
#[must_use]
pub fn render(sealed: &Sealed) -> Value {
    let e = &sealed.entry;
    let k = class(&e.action);
    let detail: serde_json::Map<String, Value> =
        e.detail.as_deref().and_then(|d| serde_json::from_str(d).ok()).unwrap_or_default();
    let text = |key: &str| detail.get(key).and_then(Value::as_str);
    let recorded = crate::domain::Timestamp(crate::store::from_micros(e.at)).to_string();

    let mut subtype = Vec::new();
    if let Some(s) = k.subtype {
        subtype.push(coding(s));
    }
    subtype.push(coding((system::CAREBRIDGE_AUDIT_ACTION, &e.action, &e.action)));

    // Who acted: the key (or worker), the requestor; its peer address when known.
    let mut actor = json!({
        "type": {"coding": [coding(if e.actor == "outbox" || e.actor == "followup" {
            (system::DICOM_DCM, "110153", "Source Role ID")
        } else {
            (system::V3_PARTICIPATION_TYPE, "IRCP", "information recipient")
        })]},
        "who": named(system::CAREBRIDGE_API_KEY, &e.actor),
        "requestor": true,
    });
    if let Some(peer) = text("peer") {
        actor["network"] = json!({"address": peer, "type": "2"});
    }
    let mut agents = vec![actor];
    // The partner: the destination of a delivery, or the organisation a partner's key acts for.
    if let Some(partner) = text("partner") {
        let role = if k.type_ == EXPORT {
            (system::DICOM_DCM, "110152", "Destination Role ID")
        } else {
            (system::V3_PARTICIPATION_TYPE, "IRCP", "information recipient")
        };
        agents.push(json!({
            "type": {"coding": [coding(role)]},
            "who": named(system::CAREBRIDGE_PARTNER, partner),
            "requestor": false,
        }));
    }

    let mut entities = Vec::new();
    if let Some(client) = &e.client {
        entities.push(json!({
            "what": {"reference": format!("Patient/{client}")},
            "type": coding((system::AUDIT_ENTITY_TYPE, "1", "Person")),
            "role": coding((system::OBJECT_ROLE, "1", "Patient")),
        }));
    }
    let facts: Vec<Value> = detail
        .iter()
        .filter(|(key, _)| !matches!(key.as_str(), "peer" | "partner"))
        .map(|(key, value)| {
            let shown = value.as_str().map_or_else(|| value.to_string(), str::to_owned);
            json!({"type": key, "valueString": shown})
        })
        .collect();
    if let (Some(kind), Some(id)) = (&e.kind, &e.record_id) {
        let mut record = json!({
            "what": named(system::CAREBRIDGE_RECORD, &format!("{kind}/{id}")),
            "type": coding((system::AUDIT_ENTITY_TYPE, "2", "System Object")),
            "role": coding((system::OBJECT_ROLE, "4", "Domain Resource")),
        });
        if let Some(v) = e.version {
            record["what"]["identifier"]["value"] = json!(format!("{kind}/{id}/_history/{v}"));
            record["what"]["display"] = json!(format!("{kind}/{id} version {v}"));
        }
        if !facts.is_empty() {
            record["detail"] = Value::Array(facts);
        }
        entities.push(record);
    } else if !facts.is_empty() {
        // Facts of an event about no record (a refused key, a sync started) ride on an entity of their own.
        entities.push(json!({
            "type": coding((system::AUDIT_ENTITY_TYPE, "2", "System Object")),
            "what": named(system::CAREBRIDGE_AUDIT_ACTION, &e.action),
            "detail": facts,
        }));
    }

    let mut event = json!({
        "resourceType": "AuditEvent",
        "id": sealed.seq.to_string(),
        "meta": {"versionId": "1", "lastUpdated": recorded},
        "type": coding(k.type_),
        "subtype": subtype,
        "action": k.action,
        "recorded": recorded,
        "outcome": k.outcome,
        "agent": agents,
        "source": {
            "observer": {"display": "carebridge"},
            "type": [coding((system::SECURITY_SOURCE_TYPE, "4", "Application Server"))],
        },
    });
    if !e.request_id.is_empty() {
        event["source"]["site"] = json!(e.request_id);
    }
    if !entities.is_empty() {
        event["entity"] = Value::Array(entities);
    }
    event
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_action_has_a_class_and_search_finds_it_by_its_codes() {
        assert_eq!(actions_matching("type", "110106").len(), 5, "the five delivery outcomes are exports");
        assert_eq!(actions_matching("subtype", "http://hl7.org/fhir/restful-interaction|read"), ["read"]);
        assert_eq!(actions_matching("subtype", "delivery_dead"), ["delivery_dead"]);
        assert_eq!(actions_matching("outcome", "8"), ["delivery_dead"]);
        assert!(actions_matching("type", "urn:other|rest").is_empty(), "a system that is not its own");
        for a in ACTIONS {
            assert!(actions_matching("subtype", &format!("{}|{a}", system::CAREBRIDGE_AUDIT_ACTION)).contains(&a));
        }
    }
}
