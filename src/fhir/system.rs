//! FHIR URIs carebridge writes in more than one place (STYLE 17: never the same literal twice).

/// Task codes (`fulfill`).
pub const TASK_CODE: &str = "http://hl7.org/fhir/CodeSystem/task-code";
/// The R4 core extension that links a request to the goals it serves.
pub const PERTAINS_TO_GOAL: &str = "http://hl7.org/fhir/StructureDefinition/resource-pertainsToGoal";
/// Namespace of the deterministic `urn:uuid:` full URLs in transaction Bundles.
pub const BUNDLE_UUID_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6c1f_0f4e_5b1d_4e0a_9d7a_2f4c_0b9e_11a1);
