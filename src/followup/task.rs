//! The shared `Task` of a referral: whose fields are whose, and how the gateway's copy meets the partner's.
//!
//! A referral's Task lives on two systems at once and each side owns part of it (Gravity SDOH Clinical Care): the
//! **requester** what is asked (`identifier`, `intent`, `code`, `focus`, `for`, `requester`, `owner`,
//! `description`, `authoredOn`, `priority`, `basedOn`), the **performer** how it goes (`businessStatus`,
//! `output`, `executionPeriod`); `status` and `statusReason` go with whichever side the state machine lets move
//! it; `note` belongs to whoever wrote each note. The gateway never overwrites the other side's fields: it merges
//! what it writes into the partner's current copy ([`merge`]).

use serde_json::{Map, Value};

use crate::domain::{ReferralStatus, Side};

/// Fields the requester owns.
pub const REQUESTER_FIELDS: &[&str] = &[
    "intent",
    "code",
    "focus",
    "for",
    "requester",
    "owner",
    "description",
    "authoredOn",
    "priority",
    "basedOn",
    "reasonCode",
    "reasonReference",
];

/// Fields the performer owns (besides the status it sets).
pub const PERFORMER_FIELDS: &[&str] = &["businessStatus", "output", "executionPeriod"];

/// The fields `side` owns outright.
#[must_use]
pub fn owned_by(side: Side) -> &'static [&'static str] {
    match side {
        Side::Requester => REQUESTER_FIELDS,
        Side::Performer => PERFORMER_FIELDS,
    }
}

/// Merges the Task the gateway would write (`ours`, as `side`) into the partner's current copy (`theirs`): the
/// fields `side` owns come from ours, the rest stay as the partner has them; identifiers and notes are the union
/// of both (ours added when missing, never one of theirs removed). The status (with its reason) is ours only when
/// it is theirs already or the state machine lets `side` move theirs to ours; otherwise theirs stands (a
/// hospital's `accepted` is never turned back into `requested` by an agency edit). `status_of` reads a Task
/// status code as a referral status (the `referral-status-task` ConceptMap backwards).
#[must_use]
pub fn merge(ours: &Value, theirs: &Value, side: Side, status_of: &dyn Fn(&str) -> Option<ReferralStatus>) -> Value {
    let (Some(o), Some(t)) = (ours.as_object(), theirs.as_object()) else {
        return ours.clone();
    };
    let mut out: Map<String, Value> = t.clone();
    for &field in owned_by(side) {
        match o.get(field) {
            Some(v) => {
                out.insert(field.to_owned(), v.clone());
            }
            None => {
                out.remove(field);
            }
        }
    }
    for list in ["identifier", "note"] {
        union(&mut out, o, list);
    }
    if takes_status(o, t, side, status_of) {
        for field in ["status", "statusReason"] {
            match o.get(field) {
                Some(v) => {
                    out.insert(field.to_owned(), v.clone());
                }
                None => {
                    out.remove(field);
                }
            }
        }
    }
    // Security labels say what the content is: the gateway's labels (what it knows the record holds) join
    // whatever the partner added.
    if let Some(security) = o.get("meta").and_then(|m| m.get("security")).and_then(Value::as_array) {
        let meta = out.entry("meta").or_insert_with(|| Value::Object(Map::new()));
        if let Some(meta) = meta.as_object_mut() {
            let labels = meta.entry("security").or_insert_with(|| Value::Array(Vec::new()));
            if let Some(labels) = labels.as_array_mut() {
                for l in security {
                    let same = |x: &Value| x.get("system") == l.get("system") && x.get("code") == l.get("code");
                    if !labels.iter().any(same) {
                        labels.push(l.clone());
                    }
                }
            }
        }
    }
    Value::Object(out)
}

/// What came of a referral, as its Task says: the first text `output` (`valueString`), trimmed; `None` without one.
#[must_use]
pub fn outcome(task: &Value) -> Option<String> {
    task.get("output")?
        .as_array()?
        .iter()
        .find_map(|o| o.get("valueString").and_then(Value::as_str))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
}

/// Whether the gateway's status replaces the partner's: equal, or a move the state machine gives `side`. A status
/// either copy lacks or that no referral status stands for is never a reason to overwrite the partner's.
fn takes_status(
    ours: &Map<String, Value>,
    theirs: &Map<String, Value>,
    side: Side,
    status_of: &dyn Fn(&str) -> Option<ReferralStatus>,
) -> bool {
    let code = |m: &Map<String, Value>| m.get("status").and_then(Value::as_str).and_then(status_of);
    match (code(ours), code(theirs)) {
        (Some(o), Some(t)) => t.check_move(o, &[side]).is_ok(),
        (Some(_), None) => theirs.get("status").is_none(),
        (None, _) => false,
    }
}

/// Adds ours to theirs for a list field, skipping entries theirs already has (equal as JSON, or, for identifiers,
/// the same system and value).
fn union(out: &mut Map<String, Value>, ours: &Map<String, Value>, field: &str) {
    let Some(add) = ours.get(field).and_then(Value::as_array) else { return };
    let list = out.entry(field).or_insert_with(|| Value::Array(Vec::new()));
    let Some(list) = list.as_array_mut() else { return };
    for item in add {
        let same = |x: &Value| {
            x == item
                || (field == "identifier"
                    && x.get("system") == item.get("system")
                    && x.get("value") == item.get("value"))
        };
        if !list.iter().any(same) {
            list.push(item.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn status_of(code: &str) -> Option<ReferralStatus> {
        match code {
            "requested" => Some(ReferralStatus::Sent),
            "in-progress" => Some(ReferralStatus::InProgress),
            "on-hold" => Some(ReferralStatus::OnHold),
            "entered-in-error" => Some(ReferralStatus::EnteredInError),
            other => ReferralStatus::from_code(other),
        }
    }

    fn ours(status: &str) -> Value {
        json!({
            "resourceType": "Task", "id": "t1", "status": status, "intent": "order",
            "identifier": [{"system": "urn:agency/referral-task", "value": "ref-1"}],
            "description": "Therapy, agency's words v2",
            "owner": {"identifier": {"system": "urn:agency/partner", "value": "st-marys"}},
            "note": [{"text": "agency note"}],
            "meta": {"security": [{"system": "urn:v3", "code": "R"}]}
        })
    }

    fn theirs(status: &str) -> Value {
        json!({
            "resourceType": "Task", "id": "t1", "status": status, "intent": "order",
            "identifier": [{"system": "urn:hospital/task", "value": "H-77"}],
            "description": "Therapy, agency's words v1",
            "businessStatus": {"text": "Scheduled for Tuesday"},
            "owner": {"reference": "Organization/st-marys-own"},
            "note": [{"text": "hospital note"}],
            "meta": {"versionId": "4", "security": [{"system": "urn:v3", "code": "N"}]}
        })
    }

    #[test]
    fn an_agency_edit_keeps_the_hospitals_status_and_its_own_fields() {
        let merged = merge(&ours("requested"), &theirs("accepted"), Side::Requester, &status_of);
        assert_eq!(merged["status"], "accepted", "the performer's status stands");
        assert_eq!(merged["businessStatus"]["text"], "Scheduled for Tuesday");
        assert_eq!(merged["description"], "Therapy, agency's words v2", "the requester's field is ours");
        assert_eq!(merged["owner"]["identifier"]["value"], "st-marys");
        assert_eq!(merged["identifier"].as_array().map(Vec::len), Some(2), "both identifiers kept");
        assert_eq!(merged["note"].as_array().map(Vec::len), Some(2), "both notes kept");
        assert_eq!(merged["meta"]["versionId"], "4");
        assert_eq!(merged["meta"]["security"].as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn the_requester_may_still_cancel_or_void_what_the_performer_accepted() {
        let mut cancel = ours("cancelled");
        cancel["statusReason"] = json!({"text": "client moved away"});
        let merged = merge(&cancel, &theirs("accepted"), Side::Requester, &status_of);
        assert_eq!(merged["status"], "cancelled");
        assert_eq!(merged["statusReason"]["text"], "client moved away");
        let merged = merge(&ours("entered-in-error"), &theirs("completed"), Side::Requester, &status_of);
        assert_eq!(merged["status"], "entered-in-error");
    }

    #[test]
    fn the_performer_writes_status_and_output_and_leaves_the_request_alone() {
        let mut mine = ours("completed");
        mine["output"] = json!([{"type": {"text": "outcome"}, "valueString": "seen twice"}]);
        mine["description"] = json!("something else");
        let merged = merge(&mine, &theirs("in-progress"), Side::Performer, &status_of);
        assert_eq!(merged["status"], "completed");
        assert_eq!(merged["output"][0]["valueString"], "seen twice");
        assert_eq!(merged["description"], "Therapy, agency's words v1", "the request is the hospital's");
        assert_eq!(merged["owner"]["reference"], "Organization/st-marys-own");
        // The performer cannot take back a requester's entered-in-error.
        let merged = merge(&ours("completed"), &theirs("entered-in-error"), Side::Performer, &status_of);
        assert_eq!(merged["status"], "entered-in-error");
    }
}
