//! A care plan: the needs a case manager found, the goals set with the client, and the interventions planned.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::values::vocabulary;
use super::{
    AgencyRecord, Citation, ConsentCategory, Date, NeedCode, Period, RecordId, RecordKind, Redacted, ServiceCode,
    Validator,
};

vocabulary! {
    /// Where the plan stands: `draft`, `active`, `on_hold`, `completed`, `revoked`, `entered_in_error`.
    pub enum CarePlanStatus {
        Draft = "draft",
        Active = "active",
        OnHold = "on_hold",
        Completed = "completed",
        Revoked = "revoked",
        EnteredInError = "entered_in_error",
    }
}

vocabulary! {
    /// Whether a need is still being addressed: `active` or `resolved`.
    pub enum NeedStatus {
        Active = "active",
        Resolved = "resolved",
    }
}

vocabulary! {
    /// Where a goal stands: `proposed`, `active`, `on_hold`, `completed`, `cancelled`.
    pub enum GoalLifecycle {
        Proposed = "proposed",
        Active = "active",
        OnHold = "on_hold",
        Completed = "completed",
        Cancelled = "cancelled",
    }
}

vocabulary! {
    /// Progress towards a goal: `in_progress`, `improving`, `worsening`, `no_change`, `achieved`,
    /// `sustaining`, `not_achieved`, `no_progress`, `not_attainable`.
    pub enum GoalAchievement {
        InProgress = "in_progress",
        Improving = "improving",
        Worsening = "worsening",
        NoChange = "no_change",
        Achieved = "achieved",
        Sustaining = "sustaining",
        NotAchieved = "not_achieved",
        NoProgress = "no_progress",
        NotAttainable = "not_attainable",
    }
}

vocabulary! {
    /// Where an intervention stands: `not_started`, `scheduled`, `in_progress`, `on_hold`, `completed`,
    /// `cancelled`.
    pub enum InterventionStatus {
        NotStarted = "not_started",
        Scheduled = "scheduled",
        InProgress = "in_progress",
        OnHold = "on_hold",
        Completed = "completed",
        Cancelled = "cancelled",
    }
}

/// A client's care plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CarePlan {
    /// The agency's id for this plan; optional in a request body, always present in answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<RecordId>,
    /// The client the plan is for.
    pub client_id: RecordId,
    /// Short title shown to staff.
    #[schema(value_type = String, example = "Recovery and housing plan", max_length = 200)]
    pub title: Redacted<String>,
    /// Where the plan stands.
    pub status: CarePlanStatus,
    /// The span the plan covers.
    pub period: Period,
    /// Staff id of the case manager who wrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<RecordId>,
    /// The needs the plan addresses (at least one; ids unique within the plan).
    #[schema(min_items = 1, max_items = 30)]
    pub needs: Vec<Need>,
    /// Goals set with the client.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(max_items = 50)]
    pub goals: Vec<Goal>,
    /// Planned interventions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(max_items = 100)]
    pub interventions: Vec<Intervention>,
    /// Categories of sensitive data the case manager marks this record as holding, on top of what its codes say
    /// (a note naming a medication used in substance-use treatment: `substance_use`); each at most once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(max_items = 3)]
    pub sensitivity: Vec<ConsentCategory>,
}

/// A need the plan addresses (a health concern or social risk).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Need {
    /// Id of the need within the plan, referenced by goals and interventions.
    pub id: RecordId,
    /// What the need is.
    pub code: NeedCode,
    /// Whether it is still being addressed.
    pub status: NeedStatus,
    /// The case manager's words about it (line breaks allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, max_length = 2000)]
    pub description: Option<Redacted<String>>,
    /// The assessment that identified it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assessment_id: Option<RecordId>,
    /// The day it was identified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noted_on: Option<Date>,
    /// Staff id of the clinician who diagnosed it, when a clinician did. Only then is the need sent as a
    /// confirmed condition (with that clinician as asserter); otherwise it is an unconfirmed health concern.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diagnosed_by: Option<RecordId>,
}

/// A goal set with the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Goal {
    /// Id of the goal within the plan, referenced by interventions and referrals.
    pub id: RecordId,
    /// The goal in the client's words.
    #[schema(value_type = String, example = "Sleep through the night at least 5 nights a week", max_length = 1000)]
    pub description: Redacted<String>,
    /// Ids of the needs (in this plan) the goal addresses, each once.
    #[schema(min_items = 1, max_items = 30)]
    pub need_ids: Vec<RecordId>,
    /// Where the goal stands.
    pub lifecycle_status: GoalLifecycle,
    /// Latest progress, if measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub achievement: Option<GoalAchievement>,
    /// When work towards it starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_date: Option<Date>,
    /// When it should be reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_date: Option<Date>,
    /// Progress notes, oldest first, each optionally backed by an assessment that measured it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(max_items = 200)]
    pub progress: Vec<GoalProgress>,
}

/// One measurement of progress towards a goal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GoalProgress {
    /// The day progress was measured.
    pub date: Date,
    /// Progress at that day.
    pub achievement: GoalAchievement,
    /// The assessment that measured it (e.g. a repeat PHQ-9).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assessment_id: Option<RecordId>,
    /// The case manager's note (line breaks allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, max_length = 2000)]
    pub note: Option<Redacted<String>>,
}

/// Something the agency or a partner will do for the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Intervention {
    /// Id of the intervention within the plan.
    pub id: RecordId,
    /// What will be done.
    #[schema(value_type = String, example = "Weekly CBT sessions", max_length = 1000)]
    pub description: Redacted<String>,
    /// The kind of service it is, when it is one the agency refers to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceCode>,
    /// Where it stands.
    pub status: InterventionStatus,
    /// Ids of the needs it addresses, each once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(max_items = 30)]
    pub need_ids: Vec<RecordId>,
    /// Ids of the goals it serves, each once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(max_items = 50)]
    pub goal_ids: Vec<RecordId>,
    /// True when it was ordered from a provider (it then becomes a service request of its own).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ordered: bool,
    /// The referral that carries it out, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub referral_id: Option<RecordId>,
}

/// Most needs a care plan holds.
pub const MAX_NEEDS: usize = 30;
/// Most goals a care plan holds.
pub const MAX_GOALS: usize = 50;
/// Most interventions a care plan holds.
pub const MAX_INTERVENTIONS: usize = 100;
/// Most progress entries a goal holds.
pub const MAX_PROGRESS: usize = 200;

fn check_refs(v: &mut Validator, refs: &[RecordId], known: &HashSet<&RecordId>, path: &str, what: &str) {
    v.at_most(refs.len(), path, known.len().max(1));
    v.no_repeats(refs, path);
    for (i, id) in refs.iter().enumerate() {
        v.check(known.contains(id), format!("{path}[{i}]"), format!("no {what} with this id in the plan"));
    }
}

impl AgencyRecord for CarePlan {
    const KIND: RecordKind = RecordKind::CarePlan;

    fn body_id(&self) -> Option<&RecordId> {
        self.id.as_ref()
    }

    fn set_id(&mut self, id: RecordId) {
        self.id = Some(id);
    }

    fn client_id(&self) -> Option<&RecordId> {
        Some(&self.client_id)
    }

    fn status_code(&self) -> Option<&'static str> {
        Some(self.status.as_str())
    }

    fn is_known_status(code: &str) -> bool {
        CarePlanStatus::from_code(code).is_some()
    }

    fn citations(&self) -> Vec<Citation> {
        let mut out = Vec::new();
        let mut cite = |path: String, kind: RecordKind, id: &RecordId, must_exist: bool| {
            out.push(Citation { path, kind, id: id.clone(), must_exist });
        };
        for (i, n) in self.needs.iter().enumerate() {
            if let Some(a) = &n.assessment_id {
                cite(format!("$.needs[{i}].assessment_id"), RecordKind::Assessment, a, true);
            }
        }
        for (i, g) in self.goals.iter().enumerate() {
            for (j, p) in g.progress.iter().enumerate() {
                if let Some(a) = &p.assessment_id {
                    cite(format!("$.goals[{i}].progress[{j}].assessment_id"), RecordKind::Assessment, a, true);
                }
            }
        }
        for (i, x) in self.interventions.iter().enumerate() {
            if let Some(r) = &x.referral_id {
                cite(format!("$.interventions[{i}].referral_id"), RecordKind::Referral, r, false);
            }
        }
        out
    }

    fn validate(&self, v: &mut Validator) {
        v.no_repeats(&self.sensitivity, "$.sensitivity");
        v.text(&self.title, "$.title", 200);
        self.period.validate("$.period", v);
        v.check(!self.needs.is_empty(), "$.needs", "a care plan addresses at least one need");
        v.at_most(self.needs.len(), "$.needs", MAX_NEEDS);
        v.at_most(self.goals.len(), "$.goals", MAX_GOALS);
        v.at_most(self.interventions.len(), "$.interventions", MAX_INTERVENTIONS);
        v.unique_ids(self.needs.iter().map(|n| &n.id), "$.needs");
        v.unique_ids(self.goals.iter().map(|g| &g.id), "$.goals");
        v.unique_ids(self.interventions.iter().map(|x| &x.id), "$.interventions");
        let need_ids: HashSet<_> = self.needs.iter().map(|n| &n.id).collect();
        let goal_ids: HashSet<_> = self.goals.iter().map(|g| &g.id).collect();
        for (i, need) in self.needs.iter().enumerate() {
            if let Some(d) = &need.description {
                v.multiline_text(d, format!("$.needs[{i}].description"), 2000);
            }
        }
        for (i, goal) in self.goals.iter().enumerate() {
            let at = format!("$.goals[{i}]");
            v.multiline_text(&goal.description, format!("{at}.description"), 1000);
            v.at_most(goal.progress.len(), format!("{at}.progress"), MAX_PROGRESS);
            v.check(!goal.need_ids.is_empty(), format!("{at}.need_ids"), "a goal addresses at least one need");
            check_refs(v, &goal.need_ids, &need_ids, &format!("{at}.need_ids"), "need");
            if let (Some(start), Some(target)) = (goal.start_date, goal.target_date) {
                v.check(target >= start, format!("{at}.target_date"), "the target date is before the start date");
            }
            v.check(
                goal.progress.windows(2).all(|w| w[0].date <= w[1].date),
                format!("{at}.progress"),
                "progress notes are listed oldest first",
            );
            for (j, p) in goal.progress.iter().enumerate() {
                if let Some(note) = &p.note {
                    v.multiline_text(note, format!("{at}.progress[{j}].note"), 2000);
                }
            }
        }
        for (i, x) in self.interventions.iter().enumerate() {
            let at = format!("$.interventions[{i}]");
            v.multiline_text(&x.description, format!("{at}.description"), 1000);
            check_refs(v, &x.need_ids, &need_ids, &format!("{at}.need_ids"), "need");
            check_refs(v, &x.goal_ids, &goal_ids, &format!("{at}.goal_ids"), "goal");
        }
    }
}
