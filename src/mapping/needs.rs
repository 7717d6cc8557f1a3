//! A client's needs as the partner sees them: one view per client and need code, gathered from every
//! assessment that identified the need and every care plan that addresses it, so that whichever of those records
//! is sent, the `Condition` it carries is the same (one Condition per client and need on the partner, never one
//! per record).

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use super::Related;
use crate::domain::RecordKind;

/// The need codes a record names, in its order, each once.
fn codes_of(kind: RecordKind, record: &Value) -> Vec<String> {
    let list: Vec<&str> = match kind {
        RecordKind::Assessment => record
            .get("identified_needs")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect(),
        RecordKind::CarePlan => record
            .get("needs")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|n| n.get("code")?.as_str())
            .collect(),
        _ => Vec::new(),
    };
    let mut out: Vec<String> = Vec::new();
    for code in list {
        if !out.iter().any(|c| c == code) {
            out.push(code.to_owned());
        }
    }
    out
}

fn text<'v>(v: &'v Value, key: &str) -> Option<&'v str> {
    v.get(key).and_then(Value::as_str)
}

/// The views of the needs `record` names: each gathered from the record itself and the client's other
/// assessments and care plans in `related` (a stored version of the record itself is replaced by `record`).
///
/// A view holds `client_id`, `code`, `status` (`resolved` once every care plan that addresses the need says it is
/// resolved; `active` otherwise), `noted_on` (the earliest day it was identified or noted), `diagnosed_by` (the
/// first clinician a care plan names), `assessment_ids` (oldest first), `care_plan_ids` and `notes` (the care
/// plans' descriptions of it, each once).
#[must_use]
pub fn views<'r>(kind: RecordKind, record: &'r Value, related: &'r Related) -> Vec<Value> {
    let Some(client_id) = text(record, "client_id") else { return Vec::new() };
    let id = text(record, "id");
    // Borrowed, not copied: a care plan is read here once per need it names.
    let others = |list: &'r [Value], of: RecordKind| -> Vec<&'r Value> {
        let mut out: Vec<&Value> = list
            .iter()
            .filter(|r| text(r, "client_id") == Some(client_id))
            .filter(|r| !(kind == of && id.is_some() && text(r, "id") == id))
            .collect();
        if kind == of {
            out.push(record);
        }
        out.sort_by(|a, b| text(a, "id").cmp(&text(b, "id")));
        out
    };
    let assessments = others(&related.assessments, RecordKind::Assessment);
    let care_plans = others(&related.care_plans, RecordKind::CarePlan);
    let mut views = Vec::new();
    for code in codes_of(kind, record) {
        let mut noted: Vec<&str> = Vec::new();
        let mut by_day: BTreeMap<(&str, &str), ()> = BTreeMap::new();
        for a in &assessments {
            if codes_of(RecordKind::Assessment, a).contains(&code)
                && let (Some(aid), Some(date)) = (text(a, "id"), text(a, "date"))
            {
                by_day.insert((date, aid), ());
                noted.push(date);
            }
        }
        let mut assessment_ids: Vec<&str> = by_day.keys().map(|(_, aid)| *aid).collect();
        // An assessment a care plan names for the need but that is not at hand: after the dated ones, by id.
        let mut named: Vec<&str> = care_plans
            .iter()
            .flat_map(|cp| cp.get("needs").and_then(Value::as_array).into_iter().flatten())
            .filter(|n| text(n, "code") == Some(code.as_str()))
            .filter_map(|n| text(n, "assessment_id"))
            .filter(|aid| !assessment_ids.contains(aid))
            .collect();
        named.sort_unstable();
        named.dedup();
        assessment_ids.extend(named);
        let (mut care_plan_ids, mut notes, mut statuses, mut diagnosed_by) = (Vec::new(), Vec::new(), Vec::new(), None);
        for cp in &care_plans {
            let needs: Vec<&Value> = cp
                .get("needs")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter(|n| text(n, "code") == Some(code.as_str()))
                .collect();
            if needs.is_empty() {
                continue;
            }
            if let Some(cid) = text(cp, "id") {
                care_plan_ids.push(cid);
            }
            for n in needs {
                statuses.push(text(n, "status").unwrap_or("active"));
                if let Some(d) = text(n, "noted_on") {
                    noted.push(d);
                }
                if let Some(note) = text(n, "description")
                    && !notes.contains(&note)
                {
                    notes.push(note);
                }
                if diagnosed_by.is_none() {
                    diagnosed_by = text(n, "diagnosed_by");
                }
            }
        }
        let status =
            if !statuses.is_empty() && statuses.iter().all(|s| *s == "resolved") { "resolved" } else { "active" };
        let mut view = Map::new();
        view.insert("client_id".into(), json!(client_id));
        view.insert("code".into(), json!(code));
        view.insert("status".into(), json!(status));
        if let Some(first) = noted.iter().min() {
            view.insert("noted_on".into(), json!(first));
        }
        if let Some(d) = diagnosed_by {
            view.insert("diagnosed_by".into(), json!(d));
        }
        for (key, list) in [("assessment_ids", assessment_ids), ("care_plan_ids", care_plan_ids), ("notes", notes)] {
            if !list.is_empty() {
                view.insert(key.into(), json!(list));
            }
        }
        views.push(Value::Object(view));
    }
    views
}

#[cfg(test)]
mod tests {
    use super::*;

    fn related(assessments: Vec<Value>, care_plans: Vec<Value>) -> Related {
        Related { client: None, assessments, care_plans }
    }

    #[test]
    fn two_assessments_and_a_care_plan_naming_one_need_give_one_view_with_all_of_them() {
        let a1 = json!({"id": "as-2", "client_id": "cl-1", "date": "2026-03-01", "identified_needs": ["depression"]});
        let a2 = json!({"id": "as-1", "client_id": "cl-1", "date": "2026-01-05", "identified_needs": ["depression", "housing_instability"]});
        let other =
            json!({"id": "as-9", "client_id": "cl-2", "date": "2026-01-01", "identified_needs": ["depression"]});
        let cp = json!({"id": "cp-1", "client_id": "cl-1", "needs": [
            {"id": "n1", "code": "depression", "status": "active", "description": "Low mood", "noted_on": "2026-01-02",
             "assessment_id": "as-1"}]});
        let from_plan = views(RecordKind::CarePlan, &cp, &related(vec![a1.clone(), a2.clone(), other], vec![]));
        let from_assessment = views(RecordKind::Assessment, &a1, &related(vec![a2], vec![cp.clone()]));
        assert_eq!(from_plan.len(), 1);
        assert_eq!(from_plan[0]["assessment_ids"], json!(["as-1", "as-2"]), "oldest first, the other client's not");
        assert_eq!(from_plan[0]["noted_on"], "2026-01-02");
        assert_eq!(from_plan, from_assessment, "whichever record is sent, the Condition is the same");
        let alone = views(RecordKind::CarePlan, &cp, &Related::default());
        assert_eq!(alone[0]["assessment_ids"], json!(["as-1"]), "the assessment the plan names, even when not at hand");
    }

    #[test]
    fn a_need_is_resolved_once_every_care_plan_says_so() {
        let cp = |id: &str, status: &str| json!({"id": id, "client_id": "cl-1", "needs": [{"id": "n", "code": "food_insecurity", "status": status}]});
        let both = related(vec![], vec![cp("cp-2", "active")]);
        assert_eq!(views(RecordKind::CarePlan, &cp("cp-1", "resolved"), &both)[0]["status"], "active");
        let done = related(vec![], vec![cp("cp-2", "resolved")]);
        assert_eq!(views(RecordKind::CarePlan, &cp("cp-1", "resolved"), &done)[0]["status"], "resolved");
        let stale = related(vec![], vec![cp("cp-1", "active")]);
        assert_eq!(
            views(RecordKind::CarePlan, &cp("cp-1", "resolved"), &stale)[0]["status"],
            "resolved",
            "the record being sent replaces its stored version"
        );
    }
}
