//! A referral: the agency asks a partner or a directory service to serve a client, and follows it to the end.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::values::vocabulary;
use super::{
    AgencyRecord, Citation, ConsentCategory, NeedCode, RecordId, RecordKind, Redacted, ServiceCode, Timestamp,
    Validator,
};

vocabulary! {
    /// How soon the client must be seen: `routine`, `urgent`, or `crisis` (same day; raises a safety alert).
    pub enum Priority {
        Routine = "routine",
        Urgent = "urgent",
        Crisis = "crisis",
    }
}

vocabulary! {
    /// Where a referral stands: `draft`, `sent`, `accepted`, `declined`, `in_progress`, `on_hold`,
    /// `completed`, `cancelled`, `failed`, `entered_in_error`. `declined`, `cancelled`, `on_hold` and `failed`
    /// need a reason.
    pub enum ReferralStatus {
        Draft = "draft",
        Sent = "sent",
        Accepted = "accepted",
        Declined = "declined",
        InProgress = "in_progress",
        OnHold = "on_hold",
        Completed = "completed",
        Cancelled = "cancelled",
        Failed = "failed",
        EnteredInError = "entered_in_error",
    }
}

impl ReferralStatus {
    /// Whether moving to this status must say why (FHIR `Task.statusReason`).
    #[must_use]
    pub fn needs_reason(self) -> bool {
        matches!(self, Self::Declined | Self::Cancelled | Self::OnHold | Self::Failed)
    }

    /// Whether the referral has ended in this status (its crisis alert, if any, is then closed).
    #[must_use]
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Cancelled | Self::Declined | Self::Failed | Self::EnteredInError)
    }
}

/// A referral of a client to a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Referral {
    /// The agency's id for this referral; optional in a request body, always present in answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<RecordId>,
    /// The client referred.
    pub client_id: RecordId,
    /// The care plan this referral carries out, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub care_plan_id: Option<RecordId>,
    /// Ids of the goals (in that care plan) the referral serves, each once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(max_items = 50)]
    pub goal_ids: Vec<RecordId>,
    /// The need the referral addresses.
    pub need: NeedCode,
    /// The service requested.
    pub service: ServiceCode,
    /// How soon the client must be seen.
    pub priority: Priority,
    /// Who asks for the service.
    pub requester: Requester,
    /// Who is asked to provide it.
    pub target: ReferralTarget,
    /// Where the referral stands. Set when the referral is created; changed afterwards only through
    /// `POST /api/v1/referrals/{id}/status`.
    pub status: ReferralStatus,
    /// Why the referral is in its status (required for `declined`, `cancelled`, `on_hold`, `failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, max_length = 1000)]
    pub status_reason: Option<Redacted<String>>,
    /// When the referral was written.
    pub authored_on: Timestamp,
    /// When the referral ended (reached `completed`, `cancelled`, `declined`, `failed` or
    /// `entered_in_error`); set by the gateway on the status change that ends it, and only on an ended
    /// referral. It closes the referral's crisis alert (`Flag.period.end`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_at: Option<Timestamp>,
    /// Clinical reason for the referral, in the case manager's words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, max_length = 2000)]
    pub reason: Option<Redacted<String>>,
    /// The client's consent that allows sharing this referral with the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consent_id: Option<RecordId>,
    /// Notes exchanged about the referral, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(max_items = 200)]
    pub notes: Vec<ReferralNote>,
    /// Categories of sensitive data the case manager marks this record as holding, on top of what its codes say
    /// (a note naming a medication used in substance-use treatment: `substance_use`); each at most once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(max_items = 3)]
    pub sensitivity: Vec<ConsentCategory>,
}

/// The person and organisation asking for the service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Requester {
    /// Staff id of the case manager.
    pub staff_id: RecordId,
    /// Name of the case manager, as the receiving provider should see it.
    #[schema(value_type = String, example = "Jordan Ellis", max_length = 200)]
    pub name: Redacted<String>,
    /// Name of the requesting organisation.
    #[schema(example = "Riverside Community Mental Health", max_length = 200)]
    pub organization: String,
}

/// Who is asked to provide the service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ReferralTarget {
    /// A partner organisation the gateway exchanges FHIR with (its name in the gateway's configuration).
    Partner {
        /// The partner's configured name.
        partner: RecordId,
    },
    /// A service from a community directory the gateway syncs.
    DirectoryService {
        /// The gateway's id of the directory service.
        service_id: RecordId,
    },
}

/// A note about the referral.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReferralNote {
    /// When it was written.
    pub at: Timestamp,
    /// Staff id of whoever wrote it.
    pub author: RecordId,
    /// The note (line breaks allowed).
    #[schema(value_type = String, max_length = 4000)]
    pub text: Redacted<String>,
}

/// A request to move a referral to a new status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StatusChange {
    /// The new status.
    pub status: ReferralStatus,
    /// Why; required for `declined`, `cancelled`, `on_hold` and `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, max_length = 1000)]
    pub reason: Option<Redacted<String>>,
}

impl StatusChange {
    /// Checks the change on its own, before it meets the referral.
    pub fn validate(&self, v: &mut Validator) {
        match &self.reason {
            Some(reason) => v.multiline_text(reason, "$.reason", 1000),
            None => v.check(
                !self.status.needs_reason(),
                "$.reason",
                format!("a referral that is {} needs a reason", self.status),
            ),
        }
    }
}

/// Most goals a referral names.
pub const MAX_GOAL_IDS: usize = 50;
/// Most notes a referral holds.
pub const MAX_NOTES: usize = 200;

impl Referral {
    /// Applies a status change at `now`; the reason replaces the previous one (or clears it when none is
    /// given). A change that ends the referral records `now` as `closed_at`; one that reopens it clears it.
    pub fn apply(&mut self, change: &StatusChange, now: Timestamp) {
        if !change.status.is_final() {
            self.closed_at = None;
        } else if !self.status.is_final() || self.closed_at.is_none() {
            self.closed_at = Some(now);
        }
        self.status = change.status;
        self.status_reason.clone_from(&change.reason);
    }
}

impl AgencyRecord for Referral {
    const KIND: RecordKind = RecordKind::Referral;

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
        ReferralStatus::from_code(code).is_some()
    }

    const STATUS_HAS_ITS_OWN_ENDPOINT: bool = true;

    fn citations(&self) -> Vec<Citation> {
        // Both may be written after the referral (the seed writes consents last); once held, each must be this
        // client's.
        let care_plan = self.care_plan_id.iter().map(|id| Citation {
            path: "$.care_plan_id".into(),
            kind: RecordKind::CarePlan,
            id: id.clone(),
            must_exist: false,
        });
        let consent = self.consent_id.iter().map(|id| Citation {
            path: "$.consent_id".into(),
            kind: RecordKind::Consent,
            id: id.clone(),
            must_exist: false,
        });
        care_plan.chain(consent).collect()
    }

    fn directory_service(&self) -> Option<&RecordId> {
        match &self.target {
            ReferralTarget::DirectoryService { service_id } => Some(service_id),
            ReferralTarget::Partner { .. } => None,
        }
    }

    fn partner(&self) -> Option<(&'static str, &RecordId)> {
        match &self.target {
            ReferralTarget::Partner { partner } => Some(("$.target.partner", partner)),
            ReferralTarget::DirectoryService { .. } => None,
        }
    }

    fn validate(&self, v: &mut Validator) {
        v.no_repeats(&self.sensitivity, "$.sensitivity");
        v.check(
            self.goal_ids.is_empty() || self.care_plan_id.is_some(),
            "$.goal_ids",
            "goal ids name goals of a care plan: care_plan_id is required with them",
        );
        v.at_most(self.goal_ids.len(), "$.goal_ids", MAX_GOAL_IDS);
        v.no_repeats(&self.goal_ids, "$.goal_ids");
        v.at_most(self.notes.len(), "$.notes", MAX_NOTES);
        v.text(&self.requester.name, "$.requester.name", 200);
        v.text(&self.requester.organization, "$.requester.organization", 200);
        v.check(
            self.closed_at.is_none() || self.status.is_final(),
            "$.closed_at",
            format!("a referral that is {} has not ended, so it has no closed_at", self.status),
        );
        match &self.status_reason {
            Some(reason) => v.multiline_text(reason, "$.status_reason", 1000),
            None => v.check(
                !self.status.needs_reason(),
                "$.status_reason",
                format!("a referral that is {} needs a status_reason", self.status),
            ),
        }
        if let Some(reason) = &self.reason {
            v.multiline_text(reason, "$.reason", 2000);
        }
        for (i, note) in self.notes.iter().enumerate() {
            v.multiline_text(&note.text, format!("$.notes[{i}].text"), 4000);
        }
        v.check(self.notes.windows(2).all(|w| w[0].at <= w[1].at), "$.notes", "notes are listed oldest first");
    }
}
