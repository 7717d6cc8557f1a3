//! The agency's concepts as validated types: what a case-management system sends us, checked at the edge.
//!
//! Every record kind is a serde struct that rejects unknown fields, plus a `validate` pass for the rules a type
//! cannot say (score ranges, references inside a care plan, periods that end before they start). Codes are the
//! agency's own vocabulary; translating them to FHIR terminology is the mapping layer's job.

mod assessment;
mod care_plan;
mod client;
mod consent;
mod referral;
mod referral_status;
mod values;

pub use assessment::{Assessment, AssessmentItem, Instrument, Interpretation};
pub use care_plan::{
    CarePlan, CarePlanStatus, Goal, GoalAchievement, GoalLifecycle, GoalProgress, Intervention, InterventionStatus,
    Need, NeedStatus,
};
pub use client::{Address, Client, Gender, Identifier};
pub use consent::{Consent, ConsentCategory, ConsentPurpose, ConsentStatus};
pub use referral::{Direction, Party, Priority, Referral, ReferralNote, ReferralTarget, Requester, StatusChange};
pub use referral_status::{IllegalMove, ReferralStatus, SetBy, Side};
pub use values::{Date, FieldError, NeedCode, Period, RecordId, Redacted, ServiceCode, Timestamp, Validator};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The five kinds of agency record the gateway accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RecordKind {
    /// A person the agency serves.
    Client,
    /// A screening or assessment instrument administered to a client.
    Assessment,
    /// A client's care plan: needs, goals and interventions.
    CarePlan,
    /// A referral of a client to a service.
    Referral,
    /// A client's consent to share data with a partner.
    Consent,
}

impl RecordKind {
    /// Every kind, in the order the API documents them.
    pub const ALL: [RecordKind; 5] =
        [RecordKind::Client, RecordKind::Assessment, RecordKind::CarePlan, RecordKind::Referral, RecordKind::Consent];

    /// The stable name stored in the database and used in fixtures (`care-plan`).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Client => "client",
            RecordKind::Assessment => "assessment",
            RecordKind::CarePlan => "care-plan",
            RecordKind::Referral => "referral",
            RecordKind::Consent => "consent",
        }
    }

    /// The collection segment of the API path (`care-plans`).
    #[must_use]
    pub fn plural(self) -> &'static str {
        match self {
            RecordKind::Client => "clients",
            RecordKind::Assessment => "assessments",
            RecordKind::CarePlan => "care-plans",
            RecordKind::Referral => "referrals",
            RecordKind::Consent => "consents",
        }
    }

    /// Runs `job` with this kind's record type, so code generic over [`AgencyRecord`] is chosen by a kind known
    /// only at run time (a path segment, a CLI flag) in one place.
    pub fn with_type<J: KindJob>(self, job: J) -> J::Output {
        match self {
            RecordKind::Client => job.run::<Client>(),
            RecordKind::Assessment => job.run::<Assessment>(),
            RecordKind::CarePlan => job.run::<CarePlan>(),
            RecordKind::Referral => job.run::<Referral>(),
            RecordKind::Consent => job.run::<Consent>(),
        }
    }

    /// Parses the stored name back into a kind.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

impl std::fmt::Display for RecordKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Work generic over the record type, for [`RecordKind::with_type`].
pub trait KindJob {
    /// What the job gives back.
    type Output;
    /// Runs the job for record type `T`.
    fn run<T: AgencyRecord>(self) -> Self::Output;
}

/// A typed record checked by its rules, in canonical JSON (the form stored and mapped).
///
/// # Errors
/// Every broken rule, with its JSON path.
pub fn canonical_value<T: AgencyRecord>(record: &T) -> Result<serde_json::Value, Vec<FieldError>> {
    let mut v = Validator::new();
    record.validate(&mut v);
    v.finish()?;
    serde_json::to_value(record).map_err(|e| vec![FieldError { path: "$".into(), detail: e.to_string() }])
}

/// What every agency record offers the intake path: its kind, its id, its indexed fields and its rules.
pub trait AgencyRecord: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The kind of this record.
    const KIND: RecordKind;

    /// The id carried in the body, if the sender put one there.
    fn body_id(&self) -> Option<&RecordId>;

    /// Sets the id from the request path, so the stored body always names itself.
    fn set_id(&mut self, id: RecordId);

    /// The client this record belongs to (a client belongs to itself).
    fn client_id(&self) -> Option<&RecordId>;

    /// The record's status code, for list filters; `None` for kinds without a status.
    fn status_code(&self) -> Option<&'static str>;

    /// The identifiers the record is found by (`system`, `value`): a client's.
    fn lookup_keys(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    /// Which way the record goes (`outbound`, `inbound`), for kinds that have a direction (referrals).
    fn direction_code(&self) -> Option<&'static str> {
        None
    }

    /// Whether `code` is one of this kind's status codes (for list filters).
    fn is_known_status(_code: &str) -> bool {
        false
    }

    /// True when the status may only change through a status endpoint, never through a replacing `PUT`.
    const STATUS_HAS_ITS_OWN_ENDPOINT: bool = false;

    /// Checks the rules a type cannot express, adding every violation to `v`.
    fn validate(&self, v: &mut Validator);

    /// Checks the rules for a record's first version only (a referral begins as a draft or sent), adding every
    /// violation to `v`.
    fn check_new(&self, _v: &mut Validator) {}

    /// Rules a replacement of `current` must keep (the fields the gateway sets and no `PUT` changes).
    fn check_replace(&self, _current: &Self, _v: &mut Validator) {}

    /// The directory service this record names as its target (referrals), checked against the catalog on write.
    fn directory_service(&self) -> Option<&RecordId> {
        None
    }

    /// The partner this record names (a referral's target, a consent's recipient), with its JSON path: it must be
    /// a configured partner.
    fn partner(&self) -> Option<(&'static str, &RecordId)> {
        None
    }

    /// The client's other records this one cites, each with its JSON path: each must be a record of the same
    /// client (checked on write, against the store).
    fn citations(&self) -> Vec<Citation> {
        Vec::new()
    }
}

/// One record cited by another (a need's assessment, a referral's care plan).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Citation {
    /// Where the citing record names it (`$.needs[0].assessment_id`).
    pub path: String,
    /// Its kind.
    pub kind: RecordKind,
    /// Its id.
    pub id: RecordId,
    /// Whether it must exist already (a care plan's assessment); otherwise it may come later, but if it exists it
    /// must be the same client's (an intervention's referral, often written after the plan).
    pub must_exist: bool,
}
