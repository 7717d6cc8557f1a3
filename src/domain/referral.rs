//! A referral: the agency asks a partner or a directory service to serve a client, and follows it to the end.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::referral_status::{IllegalMove, ReferralStatus, Side};
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
    /// What came of the referral, in the performer's words (set with `completed`; FHIR `Task.output`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, max_length = 2000)]
    pub outcome: Option<Redacted<String>>,
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
    /// On a partner's referral whose patient identifiers matched several of the agency's clients: those clients.
    /// The referral waits for the agency to link it to one (`POST /api/v1/referrals/{id}/link`); meanwhile
    /// `client_id` is the client made from the partner's Patient, and the agency may only decline it. Set by the
    /// gateway.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(max_items = 20)]
    pub client_candidates: Vec<RecordId>,
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
    /// The partner (its configured name) the requester works for, on a referral a partner sent the agency
    /// (`target` is then `agency`); absent on the agency's own referrals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partner: Option<RecordId>,
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
    /// The agency itself: a referral a partner sent (inbound); `requester.partner` names who sent it.
    Agency,
}

/// Which way a referral goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// The agency refers its client out (to a partner or a directory service).
    Outbound,
    /// A partner refers a client to the agency.
    Inbound,
}

impl Direction {
    /// `outbound` or `inbound`, as stored and filtered on.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// Who moves a referral: the agency (through its API key), or a partner (through its key on `/fhir`, or its
/// server's Task read back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Party<'a> {
    /// The agency's case-management system.
    Agency,
    /// A configured partner, by name.
    Partner(&'a str),
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
    /// What came of it, with `completed` only (the performer's words: "seen twice, discharged to primary care").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, max_length = 2000)]
    pub outcome: Option<Redacted<String>>,
}

impl StatusChange {
    /// Checks the change on its own, before it meets the referral.
    pub fn validate(&self, v: &mut Validator) {
        if let Some(outcome) = &self.outcome {
            v.multiline_text(outcome, "$.outcome", 2000);
            v.check(
                self.status == ReferralStatus::Completed,
                "$.outcome",
                "an outcome is recorded with completed only",
            );
        }
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
    /// Which way this referral goes: inbound when a partner sent it (its target is the agency).
    #[must_use]
    pub fn direction(&self) -> Direction {
        match self.target {
            ReferralTarget::Agency => Direction::Inbound,
            ReferralTarget::Partner { .. } | ReferralTarget::DirectoryService { .. } => Direction::Outbound,
        }
    }

    /// The partner on the other side of this referral: the target of an outbound one, the sender of an inbound
    /// one; `None` for a directory service.
    #[must_use]
    pub fn counterpart(&self) -> Option<&RecordId> {
        match &self.target {
            ReferralTarget::Partner { partner } => Some(partner),
            ReferralTarget::Agency => self.requester.partner.as_ref(),
            ReferralTarget::DirectoryService { .. } => None,
        }
    }

    /// The sides `party` holds on this referral: the agency requests what it sends out and performs what it
    /// receives, and holds both for a directory service (which has no system to answer with, so the case manager
    /// records its answers); a partner holds the other side when it is the counterpart, none otherwise.
    #[must_use]
    pub fn sides_of(&self, party: Party<'_>) -> Vec<Side> {
        match (party, &self.target) {
            (Party::Agency, ReferralTarget::Partner { .. }) => vec![Side::Requester],
            (Party::Agency, ReferralTarget::DirectoryService { .. }) => vec![Side::Requester, Side::Performer],
            (Party::Agency, ReferralTarget::Agency) => vec![Side::Performer],
            (Party::Partner(p), _) if self.counterpart().is_some_and(|c| c.as_str() == p) => match self.direction() {
                Direction::Outbound => vec![Side::Performer],
                Direction::Inbound => vec![Side::Requester],
            },
            (Party::Partner(_), _) => Vec::new(),
        }
    }

    /// Moves the referral as `by` asks at `now`, if the state machine lets `by` make that move; the reason
    /// replaces the previous one (or clears it when none is given). A move that ends the referral records `now`
    /// as `closed_at`.
    ///
    /// # Errors
    /// [`IllegalMove`], naming the statuses `by` may set instead; the referral is then unchanged.
    pub fn move_status(&mut self, change: &StatusChange, by: Party<'_>, now: Timestamp) -> Result<(), IllegalMove> {
        self.status.check_move(change.status, &self.sides_of(by))?;
        // Whom the referral is for is not known yet: the agency cannot take it on, only turn it down.
        if !self.client_candidates.is_empty() && by == Party::Agency && change.status != ReferralStatus::Declined {
            return Err(IllegalMove::Unlinked { to: change.status, allowed: vec![ReferralStatus::Declined] });
        }
        if change.status.is_final() && (self.closed_at.is_none() || !self.status.is_final()) {
            self.closed_at = Some(now);
        }
        self.status = change.status;
        self.status_reason.clone_from(&change.reason);
        if change.outcome.is_some() {
            self.outcome.clone_from(&change.outcome);
        }
        Ok(())
    }
}

impl Referral {
    /// Links a partner's referral that waits for it to `client` (one of `client_candidates`).
    ///
    /// # Errors
    /// The sentence for the caller: the referral waits for no link, or `client` is not a candidate.
    pub fn link(&mut self, client: &RecordId) -> Result<(), String> {
        if self.client_candidates.is_empty() {
            return Err(format!("the referral is linked to client {} already; nothing waits", self.client_id));
        }
        if !self.client_candidates.contains(client) {
            let names: Vec<&str> = self.client_candidates.iter().map(RecordId::as_str).collect();
            return Err(format!("{client} is not one of the clients it matched: {}", names.join(", ")));
        }
        self.client_id = client.clone();
        self.client_candidates.clear();
        Ok(())
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

    fn direction_code(&self) -> Option<&'static str> {
        Some(self.direction().as_str())
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
            ReferralTarget::Partner { .. } | ReferralTarget::Agency => None,
        }
    }

    fn partner(&self) -> Option<(&'static str, &RecordId)> {
        match &self.target {
            ReferralTarget::Partner { partner } => Some(("$.target.partner", partner)),
            ReferralTarget::Agency => self.requester.partner.as_ref().map(|p| ("$.requester.partner", p)),
            ReferralTarget::DirectoryService { .. } => None,
        }
    }

    fn check_replace(&self, current: &Self, v: &mut Validator) {
        v.check(
            self.client_candidates == current.client_candidates,
            "$.client_candidates",
            "set by the gateway: a referral that waits is linked with POST /api/v1/referrals/{id}/link",
        );
        v.check(
            current.client_candidates.is_empty() || self.client_id == current.client_id,
            "$.client_id",
            "the referral waits to be linked: POST /api/v1/referrals/{id}/link names its client",
        );
    }

    fn check_new(&self, v: &mut Validator) {
        v.check(
            self.status.may_begin(),
            "$.status",
            format!(
                "a referral begins as draft or sent, not {}: later statuses are the performer's answers, set through \
                 POST /api/v1/referrals/{{id}}/status",
                self.status
            ),
        );
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
            matches!(self.target, ReferralTarget::Agency) == self.requester.partner.is_some(),
            "$.requester.partner",
            "a referral to the agency (target agency) names the partner that sent it, and only such a referral does",
        );
        v.check(
            self.client_candidates.is_empty() || matches!(self.target, ReferralTarget::Agency),
            "$.client_candidates",
            "only a partner's referral to the agency waits to be linked to a client",
        );
        v.at_most(self.client_candidates.len(), "$.client_candidates", 20);
        v.no_repeats(&self.client_candidates, "$.client_candidates");
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
        if let Some(outcome) = &self.outcome {
            v.multiline_text(outcome, "$.outcome", 2000);
            v.check(
                matches!(self.status, ReferralStatus::Completed | ReferralStatus::EnteredInError),
                "$.outcome",
                format!("a referral that is {} has no outcome", self.status),
            );
        }
        for (i, note) in self.notes.iter().enumerate() {
            v.multiline_text(&note.text, format!("$.notes[{i}].text"), 4000);
        }
        v.check(self.notes.windows(2).all(|w| w[0].at <= w[1].at), "$.notes", "notes are listed oldest first");
    }
}
