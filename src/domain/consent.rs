//! A consent: what a client allows the agency to share with one partner, for what purpose, for how long.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::values::vocabulary;
use super::{AgencyRecord, Date, Period, RecordId, RecordKind, Validator};

vocabulary! {
    /// A category of data the consent covers: `general` (demographics, social needs), `mental_health`,
    /// `substance_use` (42 CFR Part 2 records: shared only with a consent that names this category).
    pub enum ConsentCategory {
        General = "general",
        MentalHealth = "mental_health",
        SubstanceUse = "substance_use",
    }
}

vocabulary! {
    /// Why the data may be shared: `treatment`, `care_coordination`, `payment`, `operations`, `research`.
    pub enum ConsentPurpose {
        Treatment = "treatment",
        CareCoordination = "care_coordination",
        Payment = "payment",
        Operations = "operations",
        Research = "research",
    }
}

vocabulary! {
    /// Where the consent stands: `draft`, `proposed`, `active`, `rejected`, `inactive`, `revoked`,
    /// `entered_in_error`. Only an `active` consent inside its period allows sharing.
    pub enum ConsentStatus {
        Draft = "draft",
        Proposed = "proposed",
        Active = "active",
        Rejected = "rejected",
        Inactive = "inactive",
        Revoked = "revoked",
        EnteredInError = "entered_in_error",
    }
}

/// A client's consent to share data with one partner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Consent {
    /// The agency's id for this consent; optional in a request body, always present in answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<RecordId>,
    /// The client who consents.
    pub client_id: RecordId,
    /// The partner the data may go to (its name in the gateway's configuration).
    pub partner: RecordId,
    /// The categories of data covered, each once.
    #[schema(min_items = 1, max_items = 3)]
    pub categories: Vec<ConsentCategory>,
    /// Why the data may be shared.
    pub purpose: ConsentPurpose,
    /// When sharing is allowed.
    pub period: Period,
    /// Where the consent stands.
    pub status: ConsentStatus,
    /// The day the client signed.
    pub signed_on: Date,
    /// Reference to the signed form in the agency's document store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 500)]
    pub source_document: Option<String>,
}

impl AgencyRecord for Consent {
    const KIND: RecordKind = RecordKind::Consent;

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
        ConsentStatus::from_code(code).is_some()
    }

    fn partner(&self) -> Option<(&'static str, &RecordId)> {
        Some(("$.partner", &self.partner))
    }

    fn validate(&self, v: &mut Validator) {
        v.check(!self.categories.is_empty(), "$.categories", "a consent covers at least one category");
        for (i, c) in self.categories.iter().enumerate() {
            v.check(!self.categories[..i].contains(c), format!("$.categories[{i}]"), "this category is listed twice");
        }
        self.period.validate("$.period", v);
        let today = time::OffsetDateTime::now_utc().date();
        v.check(
            self.signed_on.0 <= today + time::Duration::days(1),
            "$.signed_on",
            "the signature date is in the future",
        );
        if let Some(end) = self.period.end {
            v.check(self.signed_on.0 <= end.0, "$.signed_on", "the consent is signed after its period ended");
        }
        if let Some(doc) = &self.source_document {
            v.text(doc, "$.source_document", 500);
        }
    }
}
