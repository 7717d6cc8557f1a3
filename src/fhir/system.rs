//! FHIR URIs carebridge writes in more than one place (STYLE 17: never the same literal twice).

/// Task codes (`fulfill`).
pub const TASK_CODE: &str = "http://hl7.org/fhir/CodeSystem/task-code";
/// The R4 core extension that links a request to the goals it serves.
pub const PERTAINS_TO_GOAL: &str = "http://hl7.org/fhir/StructureDefinition/resource-pertainsToGoal";
/// Namespace of the deterministic `urn:uuid:` full URLs in transaction Bundles.
pub const BUNDLE_UUID_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6c1f_0f4e_5b1d_4e0a_9d7a_2f4c_0b9e_11a1);
/// HL7 v3 confidentiality codes (`N`, `R`, `V`): the first security label of every resource sent.
pub const V3_CONFIDENTIALITY: &str = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality";
/// HL7 v3 ActCode: DS4P sensitivity (`PSY`, `SUD`), privacy law (`42CFRPart2`) and refrain (`NODSCLCD`) codes.
pub const V3_ACT_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
