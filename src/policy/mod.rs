//! The egress decision: for one record version, one partner and one moment, **send** it, send it **redacted**
//! (what the partner may not receive left out, and every reference to it), or **hold** it (nothing goes; why).
//!
//! One home for the rule: the outbox asks before it maps a delivery, preview asks to say what delivery would do,
//! and the partner-facing FHIR reads will ask before they answer. The store only keeps the outcome.
//!
//! The decision reads three things: the record (agency JSON) and what its mapping reads beside it ([`Related`]);
//! what the gateway holds of the client's consents and referrals ([`Facts`]); and the partner's profile
//! (`mappings/policy/profiles.toml`, [`profiles`]). Which data is sensitive comes from the label rules
//! (`mappings/policy/labels.toml`, [`crate::mapping::labels`]):
//!
//! 1. A consent goes to the partner it names while it is in force, and after (revoked, or as `inactive` once its
//!    period has ended) only to a partner that holds an earlier version of it, so the revocation reaches it.
//! 2. A referral to a directory service goes to no EHR.
//! 3. A partner with a consent of the client naming it that was revoked, has expired or was rejected, and no active
//!    one beside it, receives nothing more for that client.
//! 4. Without a relationship (an active consent of the client naming the partner, or a referral of the client to
//!    it) a partner receives nothing of the client.
//! 5. Each category of data the record carries must pass the profile's rule for it (relationship, or a consent
//!    covering the category for an accepted purpose). A record that is one thing (a client, an assessment, a
//!    referral) is held when any of its categories does not pass; a care plan is redacted: its needs of such a
//!    category go, with the goals and interventions that serve only them, and every reference to what went; a
//!    plan left with none of its needs is held.
//! 6. What the mapping reads beside the record passes the same rules: another record's assessment or care-plan
//!    need of a category the partner may not receive never becomes evidence or a reference.

pub mod profiles;

use std::collections::HashSet;
use std::path::Path;

use serde::Serialize;
use serde_json::Value;
use time::Date;
use utoipa::ToSchema;

use crate::domain::{Consent, ConsentCategory, ConsentStatus, RecordId, RecordKind, Referral, ReferralStatus};
use crate::mapping::labels::{Categories, LabelRules};
use crate::mapping::{LoadErrors, Related};
use crate::store::{Store, StoreError};
pub use profiles::{CategoryRule, Profile, Profiles, Requires};

/// The profile of a partner whose entry names none.
pub const DEFAULT_PROFILE: &str = "treating-provider";

/// The policy profiles, loaded.
#[derive(Debug, Clone)]
pub struct Policy {
    profiles: Profiles,
}

impl Policy {
    /// Loads `<dir>/policy/profiles.toml`.
    ///
    /// # Errors
    /// Every problem, with file:line.
    pub fn load(dir: &Path) -> Result<Policy, LoadErrors> {
        let mut errors = Vec::new();
        match Profiles::load(dir, &mut errors) {
            Some(profiles) if errors.is_empty() => Ok(Policy { profiles }),
            _ => Err(LoadErrors(errors)),
        }
    }

    /// The profile of this name.
    #[must_use]
    pub fn profile(&self, name: &str) -> Option<&Profile> {
        self.profiles.get(name)
    }

    /// `partners[i].policy` entries that name no profile, as messages.
    #[must_use]
    pub fn missing_profiles(&self, partners: &crate::partners::Partners) -> Vec<String> {
        partners
            .iter()
            .filter(|p| self.profile(p.policy_profile()).is_none())
            .map(|p| {
                format!(
                    "partner `{}`: policy `{}` is not a profile in mappings/{} ({})",
                    p.name,
                    p.policy_profile(),
                    profiles::FILE,
                    self.profiles.names().collect::<Vec<_>>().join(", ")
                )
            })
            .collect()
    }
}

/// The partners a new version of `record` is owed to (one outbox row each; [`decide`] says at delivery what goes):
/// the partner a referral or a consent names, when it receives the kind; none for a referral to a directory
/// service; every partner receiving the kind for the rest (a partner without grounds is held there, and decided
/// again when a consent or referral gives it some).
pub fn recipients<T: crate::domain::AgencyRecord>(record: &T, partners: &crate::partners::Partners) -> Vec<String> {
    if record.directory_service().is_some() {
        return Vec::new();
    }
    match record.partner() {
        Some((_, named)) => {
            partners.receiving(T::KIND).filter(|p| p.name == named.as_str()).map(|p| p.name.clone()).collect()
        }
        None => partners.receiving(T::KIND).map(|p| p.name.clone()).collect(),
    }
}

/// Whether a new version of a record of `kind` may change the decision on the client's held deliveries: a consent
/// or a referral gives or takes a partner's grounds.
#[must_use]
pub fn reopens_held(kind: RecordKind) -> bool {
    matches!(kind, RecordKind::Consent | RecordKind::Referral)
}

/// What the gateway holds of one client's consents and referrals when it decides.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// The client's consents (current versions).
    pub consents: Vec<Consent>,
    /// The client's referrals (current versions).
    pub referrals: Vec<Referral>,
}

/// Whether `partner` holds a version of record `id` of `kind` (the crosswalk has its Consent or its
/// ServiceRequest): what [`Recipient::holds_record`] says. Only consents and referrals are asked about: their later
/// versions end what the partner holds.
///
/// # Errors
/// When the store fails.
pub async fn partner_holds(
    store: &dyn Store,
    partner: &str,
    kind: RecordKind,
    id: &RecordId,
) -> Result<bool, StoreError> {
    let local = match kind {
        RecordKind::Consent => format!("Consent/{id}"),
        RecordKind::Referral => format!("ServiceRequest/{id}"),
        _ => return Ok(false),
    };
    Ok(!store.crosswalk(partner, std::slice::from_ref(&local)).await?.is_empty())
}

/// Why the version owed to `partner` no longer goes there, when a newer version of the record (`current`) names
/// another partner or a directory service: the agency withdrew it from that partner, and the older version must not
/// reach it later (woken by a consent, or replayed).
#[must_use]
pub fn withdrawn(kind: RecordKind, owed: i64, current: &Value, current_version: i64, partner: &str) -> Option<String> {
    if current_version <= owed {
        return None;
    }
    let named = match kind {
        RecordKind::Referral => match current.pointer("/target/type").and_then(Value::as_str) {
            Some("partner") => current.pointer("/target/partner").and_then(Value::as_str),
            _ => None,
        },
        RecordKind::Consent => text(current, "partner"),
        _ => return None,
    };
    (named != Some(partner)).then(|| {
        format!("version {current_version} of the record no longer names this partner: version {owed} is not sent")
    })
}

/// The referral statuses in which a referral to a partner says that partner cares for the client (a draft was not
/// sent; a declined, cancelled, failed or mistaken one gives no standing grounds).
const CARING: [ReferralStatus; 5] = [
    ReferralStatus::Sent,
    ReferralStatus::Accepted,
    ReferralStatus::InProgress,
    ReferralStatus::OnHold,
    ReferralStatus::Completed,
];

/// Something left out of what is sent, and why (codes and ids, never values).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct LeftOut {
    /// What: `need need-2 (substance_use)`, `goal goal-1`, `assessment as-2005`.
    pub what: String,
    /// Why.
    pub why: String,
}

/// What may leave for one partner.
#[derive(Debug, Clone)]
pub struct Release {
    /// The record to map (redacted when `left_out` is not empty; a consent past its period as `inactive`).
    pub record: Value,
    /// What the mapping may read beside it, filtered by the same rules.
    pub related: Related,
    /// What was left out.
    pub left_out: Vec<LeftOut>,
    /// The consents the release rests on (ids), for the record of what was decided.
    pub consents: Vec<String>,
}

/// The decision for one record version, one partner, one moment.
#[derive(Debug, Clone)]
pub enum Decision {
    /// Send (redacted when the release says what was left out).
    Send(Release),
    /// Send nothing, for this reason (codes and ids only).
    Hold(String),
}

/// The partner as the decision sees it.
#[derive(Debug, Clone, Copy)]
pub struct Recipient<'a> {
    /// Its configured name.
    pub name: &'a str,
    /// Its profile.
    pub profile: &'a Profile,
    /// Whether it already holds a version of the record decided on (the crosswalk says so): a consent no longer in
    /// force, or a referral that was withdrawn, cancelled or entered in error, goes to a partner that holds it, to end
    /// it there.
    pub holds_record: bool,
}

/// Whether a consent allows sharing on `today`: active and inside its period.
#[must_use]
pub fn in_force(consent: &Consent, today: Date) -> bool {
    consent.status == ConsentStatus::Active
        && today >= consent.period.start.0
        && consent.period.end.is_none_or(|end| today <= end.0)
}

/// What [`ended`] says of an active consent past its period.
const EXPIRED: &str = "has expired";

/// Why a consent no longer allows anything, when it has ended (revoked, expired, rejected, inactive, entered in
/// error); `None` for one in force or not yet in force (draft, proposed, starting later).
fn ended(consent: &Consent, today: Date) -> Option<&'static str> {
    match consent.status {
        ConsentStatus::Revoked => Some("was revoked"),
        ConsentStatus::Rejected => Some("was rejected"),
        ConsentStatus::Inactive => Some("is inactive"),
        ConsentStatus::EnteredInError => Some("was entered in error"),
        ConsentStatus::Active if consent.period.end.is_some_and(|end| today > end.0) => Some(EXPIRED),
        _ => None,
    }
}

/// Why the consent a referral cites does not allow `partner` today, if it does not.
fn cited_consent(facts: &Facts, cited: &str, client: Option<&str>, partner: &str, today: Date) -> Option<String> {
    let Some(c) = facts.consents.iter().find(|c| c.id.as_ref().is_some_and(|i| i.as_str() == cited)) else {
        return Some(format!("the consent it cites ({cited}) is not held for this client"));
    };
    if Some(c.client_id.as_str()) != client {
        return Some(format!("the consent it cites ({cited}) is another client's"));
    }
    if c.partner.as_str() != partner {
        return Some(format!("the consent it cites ({cited}) is made out to another partner"));
    }
    if !in_force(c, today) {
        let why = ended(c, today).unwrap_or("is not in force yet");
        return Some(format!("the consent it cites ({cited}) {why}"));
    }
    None
}

/// What the partner's consents and referrals allow.
struct Grounds<'a> {
    recipient: Recipient<'a>,
    in_force: Vec<&'a Consent>,
    relationship: bool,
}

impl Grounds<'_> {
    /// Why data of `category` may not go, if it may not.
    fn refuses(&self, category: ConsentCategory) -> Option<String> {
        let rule = self.recipient.profile.rule(category);
        let covered = |c: &&Consent| c.categories.contains(&category) && rule.purposes.contains(&c.purpose);
        match rule.requires {
            Requires::Relationship if self.relationship => None,
            Requires::Consent if self.in_force.iter().any(covered) => None,
            Requires::Relationship => Some("no consent or referral of the client names this partner".to_owned()),
            Requires::Consent => Some(format!(
                "{} data needs an active consent naming this partner that covers {} for {} (profile {})",
                category.as_str(),
                category.as_str(),
                rule.purposes.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(" or "),
                self.recipient.profile.name
            )),
        }
    }

    /// The first category of `categories` that may not go, with why.
    fn refuses_any(&self, categories: Categories) -> Option<(ConsentCategory, String)> {
        categories.iter().find_map(|c| self.refuses(c).map(|why| (c, why)))
    }

    fn allows(&self, categories: Categories) -> bool {
        self.refuses_any(categories).is_none()
    }
}

fn text<'v>(v: &'v Value, key: &str) -> Option<&'v str> {
    v.get(key).and_then(Value::as_str)
}

/// Decides what of `record` (a version of `kind`, agency JSON) may leave for `recipient` on `today`.
#[must_use]
pub fn decide(
    labels: &LabelRules,
    recipient: Recipient<'_>,
    kind: RecordKind,
    record: &Value,
    related: &Related,
    facts: &Facts,
    today: Date,
) -> Decision {
    let client = match kind {
        RecordKind::Client => text(record, "id"),
        _ => text(record, "client_id"),
    };
    let mine = |c: &&Consent| c.partner.as_str() == recipient.name && Some(c.client_id.as_str()) == client;
    let consents: Vec<&Consent> = facts.consents.iter().filter(mine).collect();
    if kind == RecordKind::Consent {
        // A consent is the authorisation of the partner it names, and of no one else.
        if text(record, "partner") != Some(recipient.name) {
            return Decision::Hold("a consent goes only to the partner it names".into());
        }
        // The partner's own authorisation: in force, it goes; ended (revoked, past its period), it goes only to end
        // what the partner holds, never to tell a partner that was never told. Past its period it is no longer in
        // force, whatever the agency's status says.
        let parsed: Option<Consent> = serde_json::from_value(record.clone()).ok();
        if !recipient.holds_record && !parsed.as_ref().is_some_and(|c| in_force(c, today)) {
            return Decision::Hold(
                "a consent not in force goes only to a partner that holds an earlier version of it".into(),
            );
        }
        let mut record = record.clone();
        if parsed.as_ref().and_then(|c| ended(c, today)) == Some(EXPIRED) {
            record["status"] = Value::String("inactive".into());
        }
        let id = text(&record, "id").map(str::to_owned).into_iter().collect();
        return Decision::Send(Release { record, related: related.clone(), left_out: Vec::new(), consents: id });
    }
    // A referral a partner sent the agency goes back to that partner (the agency's answers on the partner's own
    // referral): what it says came from the partner; the agency adds only where the referral stands. Nothing
    // else of the client rides along (the mapping reads no other record for a referral's Task).
    if kind == RecordKind::Referral
        && record.pointer("/target/type").and_then(Value::as_str) == Some("agency")
        && record.pointer("/requester/partner").and_then(Value::as_str) == Some(recipient.name)
    {
        return Decision::Send(Release {
            record: record.clone(),
            related: Related::default(),
            left_out: Vec::new(),
            consents: Vec::new(),
        });
    }
    if kind == RecordKind::Referral
        && record.pointer("/target/type").and_then(Value::as_str) == Some("directory_service")
    {
        return Decision::Hold("a referral to a directory service goes to no partner EHR".into());
    }
    let in_force: Vec<&Consent> = consents.iter().copied().filter(|c| in_force(c, today)).collect();
    if in_force.is_empty()
        && let Some((c, why)) = consents.iter().find_map(|c| ended(c, today).map(|why| (c, why)))
    {
        let id = c.id.as_ref().map_or("", RecordId::as_str);
        return Decision::Hold(format!(
            "the client's consent {id} naming this partner {why}: nothing more goes to it for this client"
        ));
    }
    let referred = |r: &Referral| {
        Some(r.client_id.as_str()) == client
            && CARING.contains(&r.status)
            && r.counterpart().is_some_and(|p| p.as_str() == recipient.name)
    };
    // The referral decided on names this partner: its own grounds while it is live, and, once the partner holds it,
    // every later version (a cancellation or a correction must reach it).
    let named_here = kind == RecordKind::Referral
        && record.pointer("/target/partner").or_else(|| record.pointer("/requester/partner")).and_then(Value::as_str)
            == Some(recipient.name)
        && (recipient.holds_record
            || text(record, "status").and_then(ReferralStatus::from_code).is_some_and(|s| CARING.contains(&s)));
    let grounds = Grounds {
        recipient,
        relationship: !in_force.is_empty() || named_here || facts.referrals.iter().any(referred),
        in_force,
    };
    let consent_ids: Vec<String> =
        grounds.in_force.iter().filter_map(|c| c.id.as_ref().map(|i| i.as_str().to_owned())).collect();
    // General data goes with everything (the Patient rides along in every Bundle).
    if let Some(why) = grounds.refuses(ConsentCategory::General) {
        return Decision::Hold(why);
    }
    // A referral that cites a consent goes only while that consent allows this partner: the agency said on what
    // grounds it refers, and the ServiceRequest carries that consent as its support.
    if kind == RecordKind::Referral
        && let Some(cited) = text(record, "consent_id")
        && let Some(why) = cited_consent(facts, cited, client, recipient.name, today)
    {
        return Decision::Hold(why);
    }
    let mut left_out = Vec::new();
    let related = filter_related(labels, &grounds, related, client, &mut left_out);
    let record = match kind {
        RecordKind::CarePlan => {
            // A category the case manager marked the whole plan with is not redacted away: the plan waits.
            if let Some((category, why)) = grounds.refuses_any(labels.flags(record)) {
                return Decision::Hold(format!("{} data (the plan is marked so): {why}", category.as_str()));
            }
            let mut plan = record.clone();
            let had_needs = plan.get("needs").and_then(Value::as_array).is_some_and(|n| !n.is_empty());
            let kept = redact_care_plan(labels, &grounds, &mut plan, &related, facts, &mut left_out);
            if had_needs && kept == 0 {
                let why = left_out.first().map_or_else(String::new, |l| format!(": {}", l.why));
                return Decision::Hold(format!(
                    "every need of this care plan is of a category the partner may not receive{why}"
                ));
            }
            plan
        }
        _ => {
            if let Some((category, why)) = grounds.refuses_any(labels.record(kind, record)) {
                return Decision::Hold(format!("{} data: {why}", category.as_str()));
            }
            record.clone()
        }
    };
    Decision::Send(Release { record, related, left_out, consents: consent_ids })
}

/// What the mapping reads beside the record, less what the partner may not receive: another client's records
/// never; an assessment of a category that does not pass; a care plan redacted as the record would be.
fn filter_related(
    labels: &LabelRules,
    grounds: &Grounds<'_>,
    related: &Related,
    client: Option<&str>,
    left_out: &mut Vec<LeftOut>,
) -> Related {
    let same_client = |v: &Value| text(v, "client_id") == client;
    let client_record = related.client.clone().filter(|c| text(c, "id") == client);
    let mut assessments = Vec::new();
    for a in related.assessments.iter().filter(|a| same_client(a)) {
        match grounds.refuses_any(labels.record(RecordKind::Assessment, a)) {
            None => assessments.push(a.clone()),
            Some((category, why)) => left_out.push(LeftOut {
                what: format!("assessment {} ({})", text(a, "id").unwrap_or("?"), category.as_str()),
                why,
            }),
        }
    }
    let partial = Related { client: client_record.clone(), assessments: assessments.clone(), care_plans: Vec::new() };
    let mut care_plans = Vec::new();
    for p in related.care_plans.iter().filter(|p| same_client(p)) {
        if let Some((category, why)) = grounds.refuses_any(labels.flags(p)) {
            left_out.push(LeftOut {
                what: format!("care plan {} ({}, marked)", text(p, "id").unwrap_or("?"), category.as_str()),
                why,
            });
            continue;
        }
        let mut plan = p.clone();
        // What another plan leaves out is not this record's business: only that it is left out.
        let mut ignored = Vec::new();
        redact_care_plan(labels, grounds, &mut plan, &partial, &Facts::default(), &mut ignored);
        care_plans.push(plan);
    }
    Related { client: client_record, assessments, care_plans }
}

/// Drops from a care plan what the partner may not receive: needs of a category that does not pass, the goals
/// and interventions that serve only those needs (or whose service does not pass), every id naming what went, and
/// citations of assessments or referrals it may not receive. Gives the number of needs kept.
fn redact_care_plan(
    labels: &LabelRules,
    grounds: &Grounds<'_>,
    plan: &mut Value,
    related: &Related,
    facts: &Facts,
    left_out: &mut Vec<LeftOut>,
) -> usize {
    let allowed_assessments: HashSet<&str> = related.assessments.iter().filter_map(|a| text(a, "id")).collect();
    // The client's referrals this partner may receive: an intervention cites no other (another client's, written
    // after the plan, or one of a category the partner may not receive).
    let cited_referrals: HashSet<&str> = facts
        .referrals
        .iter()
        .filter(|r| {
            let v = serde_json::to_value(r).unwrap_or(Value::Null);
            text(&v, "client_id") == text(plan, "client_id") && grounds.allows(labels.record(RecordKind::Referral, &v))
        })
        .filter_map(|r| r.id.as_ref().map(RecordId::as_str))
        .collect();
    let id_of = |v: &Value| text(v, "id").unwrap_or("?").to_owned();
    let mut dropped_needs: HashSet<String> = HashSet::new();
    let mut dropped_goals: HashSet<String> = HashSet::new();
    let cite_ok = |v: &Value| text(v, "assessment_id").is_none_or(|a| allowed_assessments.contains(a));
    let Some(obj) = plan.as_object_mut() else { return 0 };
    let mut kept = 0;
    if let Some(Value::Array(needs)) = obj.get_mut("needs") {
        needs.retain_mut(|n| {
            let categories = labels.need(text(n, "code"));
            match grounds.refuses_any(categories) {
                Some((category, why)) => {
                    left_out.push(LeftOut { what: format!("need {} ({})", id_of(n), category.as_str()), why });
                    dropped_needs.insert(id_of(n));
                    false
                }
                None => {
                    if !cite_ok(n)
                        && let Some(m) = n.as_object_mut()
                    {
                        m.remove("assessment_id");
                    }
                    kept += 1;
                    true
                }
            }
        });
    }
    let strip = |v: &mut Value, key: &str, gone: &HashSet<String>| -> bool {
        let Some(Value::Array(ids)) = v.get_mut(key) else { return false };
        let before = ids.len();
        ids.retain(|i| i.as_str().is_none_or(|s| !gone.contains(s)));
        before > 0 && ids.is_empty()
    };
    if let Some(Value::Array(goals)) = obj.get_mut("goals") {
        goals.retain_mut(|g| {
            if strip(g, "need_ids", &dropped_needs) {
                left_out
                    .push(LeftOut { what: format!("goal {}", id_of(g)), why: "it serves only needs left out".into() });
                dropped_goals.insert(id_of(g));
                return false;
            }
            if let Some(Value::Array(progress)) = g.get_mut("progress") {
                for p in progress.iter_mut() {
                    if !cite_ok(p)
                        && let Some(m) = p.as_object_mut()
                    {
                        m.remove("assessment_id");
                    }
                }
            }
            true
        });
    }
    if let Some(Value::Array(interventions)) = obj.get_mut("interventions") {
        interventions.retain_mut(|i| {
            if let Some((category, why)) = grounds.refuses_any(labels.service(text(i, "service"))) {
                left_out.push(LeftOut { what: format!("intervention {} ({})", id_of(i), category.as_str()), why });
                return false;
            }
            if strip(i, "need_ids", &dropped_needs) {
                left_out.push(LeftOut {
                    what: format!("intervention {}", id_of(i)),
                    why: "it serves only needs left out".into(),
                });
                return false;
            }
            let no_needs = i.get("need_ids").and_then(Value::as_array).is_none_or(Vec::is_empty);
            if strip(i, "goal_ids", &dropped_goals) && no_needs {
                left_out.push(LeftOut {
                    what: format!("intervention {}", id_of(i)),
                    why: "it serves only goals left out".into(),
                });
                return false;
            }
            if text(i, "referral_id").is_some_and(|r| !cited_referrals.contains(r))
                && let Some(m) = i.as_object_mut()
            {
                m.remove("referral_id");
            }
            true
        });
    }
    kept
}

#[cfg(test)]
mod tests;
