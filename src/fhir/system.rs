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
/// FHIR audit event types (`rest`).
pub const AUDIT_EVENT_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-event-type";
/// DICOM controlled terminology (audit event types and agent roles: `110106` Export, `110114` User Authentication,
/// `110153` Source Role ID…).
pub const DICOM_DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";
/// RESTful interactions (`read`, `create`, `update`), the subtype of a `rest` audit event.
pub const RESTFUL_INTERACTION: &str = "http://hl7.org/fhir/restful-interaction";
/// The role an audited entity played (`1` Patient, `4` Domain Resource).
pub const OBJECT_ROLE: &str = "http://terminology.hl7.org/CodeSystem/object-role";
/// The type of an audited entity (`1` Person, `2` System Object).
pub const AUDIT_ENTITY_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-entity-type";
/// Participation types of an audit agent (`IRCP` information recipient, `AUT` author).
pub const V3_PARTICIPATION_TYPE: &str = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType";
/// Types of audit sources (`4` Application Server).
pub const SECURITY_SOURCE_TYPE: &str = "http://terminology.hl7.org/CodeSystem/security-source-type";
/// carebridge's own audit actions (`delivered`, `delivery_held`…), the subtype every AuditEvent carries.
pub const CAREBRIDGE_AUDIT_ACTION: &str = "urn:carebridge:audit-action";
/// The identifier system of an API key's name, as an audit agent.
pub const CAREBRIDGE_API_KEY: &str = "urn:carebridge:api-key";
/// The identifier system of a configured partner's name.
pub const CAREBRIDGE_PARTNER: &str = "urn:carebridge:partner";
/// The identifier system of an agency record (`care-plan/cp-3001`), as an audited entity.
pub const CAREBRIDGE_RECORD: &str = "urn:carebridge:record";
/// Provenance participant types (`author`).
pub const PROVENANCE_PARTICIPANT_TYPE: &str = "http://terminology.hl7.org/CodeSystem/provenance-participant-type";
/// US Core's provenance participant types (`transmitter`).
pub const US_CORE_PROVENANCE_PARTICIPANT_TYPE: &str =
    "http://hl7.org/fhir/us/core/CodeSystem/us-core-provenance-participant-type";
/// HL7 v3 DataOperation (`CREATE`, `UPDATE`): what a Provenance's activity did.
pub const V3_DATA_OPERATION: &str = "http://terminology.hl7.org/CodeSystem/v3-DataOperation";
