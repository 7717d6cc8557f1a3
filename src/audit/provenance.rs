//! The `Provenance` that goes with every transaction pushed to a partner: the agency as author (its data), the
//! gateway as transmitter, the resources of the transaction as targets (by their entries' full URLs, which the
//! partner resolves to the ids it assigns), and when. Identifiers and names only, never PHI.

use serde_json::{Value, json};

use crate::fhir::system;

/// Who is named in a Provenance.
#[derive(Debug, Clone, Copy)]
pub struct Parties<'a> {
    /// The agency's identifier system and value (`{system_base}/organization`, `agency_id`).
    pub agency: (&'a str, &'a str),
    /// The agency's name, as shown.
    pub agency_name: &'a str,
    /// The identifier system of devices the gateway names (`{system_base}/device`).
    pub device_system: &'a str,
}

/// The Provenance of a transaction whose entries have `targets` as full URLs, recorded at `recorded` (an
/// RFC 3339 instant).
#[must_use]
pub fn render(targets: &[String], recorded: &str, parties: Parties<'_>) -> Value {
    let agency = json!({
        "type": "Organization",
        "identifier": {"system": parties.agency.0, "value": parties.agency.1},
        "display": parties.agency_name,
    });
    json!({
        "resourceType": "Provenance",
        "target": targets.iter().map(|t| json!({"reference": t})).collect::<Vec<_>>(),
        "recorded": recorded,
        "activity": {"coding": [{"system": system::V3_DATA_OPERATION, "code": "UPDATE", "display": "revise"}]},
        "agent": [
            {
                "type": {"coding": [{"system": system::PROVENANCE_PARTICIPANT_TYPE, "code": "author", "display": "Author"}]},
                "who": agency,
            },
            {
                "type": {"coding": [{"system": system::US_CORE_PROVENANCE_PARTICIPANT_TYPE, "code": "transmitter", "display": "Transmitter"}]},
                "who": {
                    "type": "Device",
                    "identifier": {"system": parties.device_system, "value": "carebridge"},
                    "display": "carebridge integration gateway",
                },
                "onBehalfOf": agency,
            },
        ],
    })
}
