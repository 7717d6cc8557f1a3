//! The egress decision on records and consents made here, one rule at a time.

use std::path::Path;

use serde_json::{Value, json};
use time::macros::date;

use super::*;
use crate::mapping::labels::LabelRules;

fn labels() -> LabelRules {
    let mut errors = Vec::new();
    LabelRules::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings"), &mut errors).expect("label rules")
}

fn policy() -> Policy {
    Policy::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings")).expect("profiles")
}

fn consent(id: &str, partner: &str, categories: &[&str], status: &str, end: Option<&str>) -> Consent {
    let mut v = json!({"id": id, "client_id": "cl-1", "partner": partner, "categories": categories,
        "purpose": "treatment", "period": {"start": "2026-01-01"}, "status": status, "signed_on": "2026-01-01"});
    if let Some(end) = end {
        v["period"]["end"] = json!(end);
    }
    serde_json::from_value(v).expect("consent")
}

fn referral_to(partner: &str, need: &str, service: &str) -> Value {
    json!({"id": "ref-1", "client_id": "cl-1", "need": need, "service": service, "priority": "routine",
        "requester": {"staff_id": "s-1", "name": "N", "organization": "O"},
        "target": {"type": "partner", "partner": partner}, "status": "sent",
        "authored_on": "2026-02-01T09:00:00Z"})
}

fn facts(consents: Vec<Consent>, referrals: &[Value]) -> Facts {
    Facts {
        consents,
        referrals: referrals.iter().map(|r| serde_json::from_value(r.clone()).expect("referral")).collect(),
    }
}

const TODAY: Date = date!(2026 - 06 - 01);

fn decide_for(profile: &str, kind: RecordKind, record: &Value, related: &Related, f: &Facts) -> Decision {
    let p = policy();
    let recipient = Recipient { name: "ehr", profile: p.profile(profile).expect("profile"), holds_record: true };
    decide(&labels(), recipient, kind, record, related, f, TODAY)
}

fn held(d: &Decision) -> &str {
    match d {
        Decision::Hold(why) => why,
        Decision::Send(r) => panic!("sent: {:?}", r.left_out),
    }
}

fn sent(d: Decision) -> Release {
    match d {
        Decision::Send(r) => r,
        Decision::Hold(why) => panic!("held: {why}"),
    }
}

fn client() -> Value {
    json!({"id": "cl-1", "given_name": "A", "family_name": "B", "birth_date": "1990-01-01", "gender": "female"})
}

fn dast() -> Value {
    json!({"id": "as-1", "client_id": "cl-1", "instrument": "dast10", "date": "2026-02-01", "items": [],
        "total_score": 7, "interpretation": "substantial", "identified_needs": ["substance_use"]})
}

fn plan() -> Value {
    json!({"id": "cp-1", "client_id": "cl-1", "title": "Plan", "status": "active", "period": {"start": "2026-02-01"},
        "needs": [{"id": "n-sud", "code": "substance_use", "status": "active", "assessment_id": "as-1"},
                  {"id": "n-food", "code": "food_insecurity", "status": "active"}],
        "goals": [{"id": "g-sud", "description": "x", "need_ids": ["n-sud"], "lifecycle_status": "active"},
                  {"id": "g-both", "description": "y", "need_ids": ["n-sud", "n-food"], "lifecycle_status": "active"}],
        "interventions": [
            {"id": "i-iop", "description": "IOP", "service": "substance_use_treatment", "status": "in_progress",
             "need_ids": ["n-sud"], "goal_ids": ["g-sud"], "ordered": false},
            {"id": "i-peer", "description": "peer", "service": "peer_support", "status": "not_started",
             "need_ids": ["n-sud"], "goal_ids": ["g-sud", "g-both"], "ordered": false},
            {"id": "i-pantry", "description": "pantry", "service": "food_assistance", "status": "not_started",
             "need_ids": ["n-food"], "goal_ids": ["g-both", "g-sud"], "ordered": false}]})
}

#[test]
fn a_partner_no_consent_or_referral_names_receives_nothing_of_the_client() {
    let d = decide_for("treating-provider", RecordKind::Client, &client(), &Related::default(), &Facts::default());
    assert!(held(&d).contains("no consent or referral"), "{d:?}");
    // A consent naming another partner gives this one nothing.
    let f = facts(vec![consent("co-1", "other", &["general"], "active", None)], &[]);
    assert!(matches!(
        decide_for("treating-provider", RecordKind::Client, &client(), &Related::default(), &f),
        Decision::Hold(_)
    ));
}

#[test]
fn a_referral_to_the_partner_is_a_reason_to_hold_the_client() {
    let f = facts(Vec::new(), &[referral_to("ehr", "depression", "therapy")]);
    let r = sent(decide_for("treating-provider", RecordKind::Client, &client(), &Related::default(), &f));
    assert!(r.left_out.is_empty());
    // The referral itself is mental-health data: a treating provider needs a consent covering it.
    let d = decide_for(
        "treating-provider",
        RecordKind::Referral,
        &referral_to("ehr", "depression", "therapy"),
        &Related::default(),
        &f,
    );
    assert!(held(&d).contains("mental_health"), "{d:?}");
    let f = facts(vec![consent("co-1", "ehr", &["general", "mental_health"], "active", None)], &[]);
    sent(decide_for(
        "treating-provider",
        RecordKind::Referral,
        &referral_to("ehr", "depression", "therapy"),
        &Related::default(),
        &f,
    ));
}

#[test]
fn substance_use_data_leaves_only_with_a_consent_covering_it_for_that_partner() {
    let general = facts(vec![consent("co-1", "ehr", &["general", "mental_health"], "active", None)], &[]);
    let d = decide_for("treating-provider", RecordKind::Assessment, &dast(), &Related::default(), &general);
    assert!(held(&d).starts_with("substance_use data"), "{d:?}");
    let other = facts(vec![consent("co-1", "other", &["general", "substance_use"], "active", None)], &[]);
    assert!(matches!(
        decide_for("part2-program", RecordKind::Assessment, &dast(), &Related::default(), &other),
        Decision::Hold(_)
    ));
    let sud = facts(vec![consent("co-1", "ehr", &["general", "substance_use"], "active", None)], &[]);
    let r = sent(decide_for("part2-program", RecordKind::Assessment, &dast(), &Related::default(), &sud));
    assert_eq!(r.consents, ["co-1"]);
}

#[test]
fn a_revoked_or_expired_consent_stops_everything_even_with_a_referral() {
    let referral = referral_to("ehr", "housing_instability", "housing_assistance");
    for (status, end, word) in [("revoked", None, "revoked"), ("active", Some("2026-05-31"), "expired")] {
        let f = facts(vec![consent("co-9", "ehr", &["general"], status, end)], std::slice::from_ref(&referral));
        let d = decide_for("treating-provider", RecordKind::Client, &client(), &Related::default(), &f);
        assert!(held(&d).contains(word), "{d:?}");
        assert!(held(&d).contains("co-9"), "{d:?}");
    }
    // A new active consent beside a revoked one: the active one decides.
    let f = facts(
        vec![
            consent("co-8", "ehr", &["general"], "revoked", None),
            consent("co-9", "ehr", &["general"], "active", None),
        ],
        &[],
    );
    sent(decide_for("treating-provider", RecordKind::Client, &client(), &Related::default(), &f));
}

#[test]
fn a_care_plan_goes_without_its_substance_use_need_and_what_serves_only_it() {
    let f = facts(vec![consent("co-1", "ehr", &["general", "mental_health"], "active", None)], &[]);
    let related = Related { client: Some(client()), assessments: vec![dast()], care_plans: vec![plan()] };
    let r = sent(decide_for("treating-provider", RecordKind::CarePlan, &plan(), &related, &f));
    let ids = |key: &str| -> Vec<String> {
        r.record[key].as_array().expect(key).iter().map(|x| x["id"].as_str().unwrap_or_default().to_owned()).collect()
    };
    assert_eq!(ids("needs"), ["n-food"]);
    assert_eq!(ids("goals"), ["g-both"]);
    assert_eq!(ids("interventions"), ["i-pantry"]);
    assert_eq!(r.record["goals"][0]["need_ids"], json!(["n-food"]));
    assert_eq!(r.record["interventions"][0]["goal_ids"], json!(["g-both"]));
    // The DAST-10 is not evidence for anything this partner receives, and the other plan copy is redacted too.
    assert!(r.related.assessments.is_empty());
    assert_eq!(r.related.care_plans[0]["needs"].as_array().map(Vec::len), Some(1));
    let what: Vec<&str> = r.left_out.iter().map(|l| l.what.as_str()).collect();
    assert!(what.contains(&"need n-sud (substance_use)"), "{what:?}");
    assert!(what.contains(&"goal g-sud"), "{what:?}");
    assert!(what.contains(&"intervention i-iop (substance_use)"), "{what:?}");
    assert!(what.contains(&"intervention i-peer"), "{what:?}");
    // A plan about substance use alone is held, not sent empty.
    let mut only = plan();
    only["needs"].as_array_mut().expect("needs").retain(|n| n["code"] == "substance_use");
    let d = decide_for("treating-provider", RecordKind::CarePlan, &only, &related, &f);
    assert!(held(&d).contains("every need"), "{d:?}");
}

#[test]
fn another_clients_records_never_ride_along() {
    let f = facts(vec![consent("co-1", "ehr", &["general", "mental_health", "substance_use"], "active", None)], &[]);
    let mut theirs = dast();
    theirs["client_id"] = json!("cl-2");
    let related = Related { client: None, assessments: vec![theirs], care_plans: Vec::new() };
    let r = sent(decide_for("treating-provider", RecordKind::CarePlan, &plan(), &related, &f));
    assert!(r.related.assessments.is_empty());
    // The need citing it loses the citation: nothing points at an assessment the partner does not get.
    assert!(r.record["needs"][0].get("assessment_id").is_none(), "{}", r.record);
}

#[test]
fn a_social_services_partner_needs_a_consent_even_for_general_data() {
    let f = facts(Vec::new(), &[referral_to("ehr", "food_insecurity", "food_assistance")]);
    let d = decide_for("social-services", RecordKind::Client, &client(), &Related::default(), &f);
    assert!(held(&d).contains("general data needs an active consent"), "{d:?}");
    let mut c = consent("co-1", "ehr", &["general"], "active", None);
    c.purpose = crate::domain::ConsentPurpose::CareCoordination;
    sent(decide_for("social-services", RecordKind::Client, &client(), &Related::default(), &facts(vec![c], &[])));
}

#[test]
fn a_consent_goes_to_its_partner_in_every_state_and_as_inactive_once_its_period_ended() {
    let c = serde_json::to_value(consent("co-1", "ehr", &["general"], "active", Some("2026-03-01"))).expect("json");
    let r = sent(decide_for("treating-provider", RecordKind::Consent, &c, &Related::default(), &Facts::default()));
    assert_eq!(r.record["status"], "inactive");
    let c = serde_json::to_value(consent("co-1", "ehr", &["general"], "revoked", None)).expect("json");
    let r = sent(decide_for("treating-provider", RecordKind::Consent, &c, &Related::default(), &Facts::default()));
    assert_eq!(r.record["status"], "revoked");
}

#[test]
fn an_ended_consent_goes_only_to_a_partner_that_holds_it() {
    let p = policy();
    let c = serde_json::to_value(consent("co-1", "ehr", &["general"], "revoked", None)).expect("json");
    let recipient = Recipient { name: "ehr", profile: p.profile("treating-provider").expect("p"), holds_record: false };
    let d = decide(&labels(), recipient, RecordKind::Consent, &c, &Related::default(), &Facts::default(), TODAY);
    assert!(held(&d).contains("not in force"), "{d:?}");
}

#[test]
fn a_consent_naming_another_partner_goes_to_no_one_else() {
    let c = serde_json::to_value(consent("co-1", "county", &["general"], "active", None)).expect("json");
    let d = decide_for("treating-provider", RecordKind::Consent, &c, &Related::default(), &Facts::default());
    assert!(held(&d).contains("only to the partner it names"), "{d:?}");
}

#[test]
fn a_referral_a_partner_sent_goes_back_to_it_whatever_the_consents_and_to_no_other() {
    let mut r = referral_to("ehr", "depression", "therapy");
    r["target"] = json!({"type": "agency"});
    r["requester"]["partner"] = json!("ehr");
    let sent_back =
        sent(decide_for("treating-provider", RecordKind::Referral, &r, &Related::default(), &Facts::default()));
    assert_eq!(sent_back.record["target"]["type"], "agency");
    r["requester"]["partner"] = json!("county");
    let d = decide_for("treating-provider", RecordKind::Referral, &r, &Related::default(), &Facts::default());
    assert!(matches!(d, Decision::Hold(_)), "{d:?}");
}

#[test]
fn a_referral_to_a_directory_service_goes_to_no_partner() {
    let mut r = referral_to("ehr", "food_insecurity", "food_assistance");
    r["target"] = json!({"type": "directory_service", "service_id": "dir.svc-1"});
    let f = facts(vec![consent("co-1", "ehr", &["general"], "active", None)], &[]);
    let d = decide_for("treating-provider", RecordKind::Referral, &r, &Related::default(), &f);
    assert!(held(&d).contains("directory service"), "{d:?}");
}

#[test]
fn a_record_the_case_manager_marks_as_substance_use_is_decided_as_such() {
    let f = facts(vec![consent("co-1", "ehr", &["general", "mental_health"], "active", None)], &[]);
    let mut r = referral_to("ehr", "anxiety", "psychiatry");
    sent(decide_for("treating-provider", RecordKind::Referral, &r, &Related::default(), &f));
    // A note names a benzodiazepine taken outside its prescription: the case manager marks the referral.
    r["sensitivity"] = json!(["substance_use"]);
    let d = decide_for("treating-provider", RecordKind::Referral, &r, &Related::default(), &f);
    assert!(held(&d).starts_with("substance_use data"), "{d:?}");
    let mut p = plan();
    p["sensitivity"] = json!(["substance_use"]);
    let d = decide_for("treating-provider", RecordKind::CarePlan, &p, &Related::default(), &f);
    assert!(held(&d).contains("marked"), "{d:?}");
    assert!(labels().record(RecordKind::Referral, &r).contains(ConsentCategory::SubstanceUse));
}

#[test]
fn a_referral_goes_only_while_the_consent_it_cites_allows_this_partner() {
    let mut r = referral_to("ehr", "housing_instability", "housing_assistance");
    r["consent_id"] = json!("co-other");
    // It cites a consent made out to another partner: held, although a referral alone gives general grounds.
    let f = facts(vec![consent("co-other", "elsewhere", &["general"], "active", None)], &[]);
    let d = decide_for("treating-provider", RecordKind::Referral, &r, &Related::default(), &f);
    assert!(held(&d).contains("another partner"), "{d:?}");
    let f = facts(vec![consent("co-other", "ehr", &["general"], "draft", None)], &[]);
    let d = decide_for("treating-provider", RecordKind::Referral, &r, &Related::default(), &f);
    assert!(held(&d).contains("not in force"), "{d:?}");
    let f = facts(vec![consent("co-other", "ehr", &["general"], "active", None)], &[]);
    sent(decide_for("treating-provider", RecordKind::Referral, &r, &Related::default(), &f));
}

#[test]
fn only_a_live_referral_gives_a_partner_standing_grounds_and_a_held_one_still_reaches_it_to_end() {
    for status in ["draft", "declined", "cancelled", "failed", "entered_in_error"] {
        let mut r = referral_to("ehr", "housing_instability", "housing_assistance");
        r["status"] = json!(status);
        if matches!(status, "declined" | "cancelled" | "failed") {
            r["status_reason"] = json!("x");
        }
        let f = facts(Vec::new(), std::slice::from_ref(&r));
        let d = decide_for("treating-provider", RecordKind::Client, &client(), &Related::default(), &f);
        assert!(matches!(d, Decision::Hold(_)), "{status}: {d:?}");
        // The referral's own version: held when the partner never had it, sent to end it when it does.
        let p = policy();
        let profile = p.profile("treating-provider").expect("p");
        let fresh = Recipient { name: "ehr", profile, holds_record: false };
        let d = decide(&labels(), fresh, RecordKind::Referral, &r, &Related::default(), &f, TODAY);
        assert!(matches!(d, Decision::Hold(_)), "{status}: {d:?}");
        let holder = Recipient { name: "ehr", profile, holds_record: true };
        sent(decide(&labels(), holder, RecordKind::Referral, &r, &Related::default(), &f, TODAY));
    }
}

#[test]
fn an_intervention_serving_only_a_goal_left_out_is_left_out_too() {
    let f = facts(vec![consent("co-1", "ehr", &["general", "mental_health"], "active", None)], &[]);
    let mut p = plan();
    p["interventions"]
        .as_array_mut()
        .expect("interventions")
        .push(json!({"id": "i-aa", "description": "AA meetings", "status": "not_started", "goal_ids": ["g-sud"],
            "ordered": false}));
    let r = sent(decide_for("treating-provider", RecordKind::CarePlan, &p, &Related::default(), &f));
    let ids: Vec<&str> =
        r.record["interventions"].as_array().expect("i").iter().filter_map(|i| i["id"].as_str()).collect();
    assert_eq!(ids, ["i-pantry"], "{}", r.record);
    // Labelled by the goal's need where it may go.
    let aa = &p["interventions"][3];
    assert!(labels().care_plan_part(&p, aa, Some(&p)).contains(ConsentCategory::SubstanceUse));
}

#[test]
fn an_intervention_cites_only_its_own_clients_referrals_the_partner_may_receive() {
    let f = facts(vec![consent("co-1", "ehr", &["general", "mental_health"], "active", None)], &[]);
    let mut p = plan();
    p["interventions"][2]["referral_id"] = json!("ref-elsewhere");
    let r = sent(decide_for("treating-provider", RecordKind::CarePlan, &p, &Related::default(), &f));
    assert!(r.record["interventions"][0].get("referral_id").is_none(), "{}", r.record);
}

#[test]
fn a_version_that_names_another_target_withdraws_the_older_one_from_its_partner() {
    let mut v2 = referral_to("other", "depression", "therapy");
    assert!(withdrawn(RecordKind::Referral, 1, &v2, 2, "ehr").is_some());
    assert!(withdrawn(RecordKind::Referral, 1, &v2, 2, "other").is_none());
    assert!(withdrawn(RecordKind::Referral, 2, &v2, 2, "ehr").is_none(), "the current version is decided as it is");
    v2["target"] = json!({"type": "directory_service", "service_id": "d.s"});
    assert!(withdrawn(RecordKind::Referral, 1, &v2, 2, "other").is_some());
    let c = serde_json::to_value(consent("co-1", "b", &["general"], "active", None)).expect("json");
    assert!(withdrawn(RecordKind::Consent, 1, &c, 3, "a").is_some());
}
