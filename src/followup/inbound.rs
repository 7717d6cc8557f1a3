//! A referral a partner sends the agency (the agency performs): a transaction of the referral's `Task`, its
//! `ServiceRequest` and `Patient` (as in the Gravity IG's examples), or only the Task, whose focus and patient the
//! gateway reads from the partner's own server.
//!
//! What comes in passes the base-R4 gate first. The referral's agency id is derived from the partner and the
//! Task's business identifier (its server id when it has none), so the same Task sent again finds the referral it
//! made and creates nothing. The client is matched on the identifiers the partner's `patient_match` names: one
//! client holding one of them is the client; none, a new client made from the Patient by the inverse mapping;
//! several, the referral is refused until the agency resolves the duplicate. The request is read in agency codes
//! through the ConceptMaps backwards ([`crate::mapping::foreign`]). The partner's resources are never adopted: the
//! crosswalk notes them as the partner's own (its Task, so the agency's answers are merged into it).

use std::time::Duration;

use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::domain::{Client, RecordId, RecordKind, Referral};
use crate::intake::{self, Intake, IntakeError};
use crate::mapping::Mappings;
use crate::mapping::inbound::Ids;
use crate::outbox::plan::PARTNER_OWNED;
use crate::partners::{PartnerSettings, Partners};
use crate::store::{Actor, Change, CrosswalkEntry, Precondition, SaveOutcome, Store, StoreError};

/// What receiving did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The agency's referral.
    pub referral: RecordId,
    /// Whether this call created it (false: the same Task came before).
    pub created: bool,
    /// The client it was linked to, and whether this call created the client.
    pub client: (RecordId, bool),
}

/// Why a referral was not taken in.
#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    /// What was sent is not a referral the gateway can take (each problem by FHIR path).
    #[error("the referral cannot be taken in")]
    Invalid(Vec<String>),
    /// The partner's server could not be read (the focus or the patient it references).
    #[error("the partner's server could not be read: {0}")]
    Partner(String),
    /// Intake refused the records made from it.
    #[error(transparent)]
    Intake(IntakeError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What receiving needs.
#[derive(Clone, Copy)]
pub struct Inbound<'a> {
    /// The store.
    pub store: &'a dyn Store,
    /// The mappings.
    pub mappings: &'a Mappings,
    /// The partners.
    pub partners: &'a Partners,
}

/// The resources of a transaction Bundle with their full URLs, or one resource alone.
#[must_use]
pub fn entries(body: &Value) -> Vec<(Option<String>, Value)> {
    if body.get("resourceType").and_then(Value::as_str) == Some("Bundle") {
        body.get("entry")
            .and_then(Value::as_array)
            .map(|es| {
                es.iter()
                    .filter_map(|e| {
                        let r = e.get("resource")?.clone();
                        Some((e.get("fullUrl").and_then(Value::as_str).map(str::to_owned), r))
                    })
                    .collect()
            })
            .unwrap_or_default()
    } else {
        vec![(None, body.clone())]
    }
}

fn text<'v>(v: &'v Value, pointer: &str) -> Option<&'v str> {
    v.pointer(pointer).and_then(Value::as_str)
}

/// The entry a reference names: by full URL (`urn:uuid:…`), or by `Type/id` (relative or absolute).
fn resolve<'e>(all: &'e [(Option<String>, Value)], reference: &str) -> Option<&'e Value> {
    all.iter()
        .find(|(url, r)| {
            url.as_deref() == Some(reference) || {
                let ty = r.get("resourceType").and_then(Value::as_str).unwrap_or_default();
                let id = r.get("id").and_then(Value::as_str).unwrap_or_default();
                !id.is_empty() && (reference == format!("{ty}/{id}") || reference.ends_with(&format!("/{ty}/{id}")))
            }
        })
        .map(|(_, r)| r)
}

/// An agency id derived from what identifies a partner's resource (stable: the same input, the same id).
fn derived_id(prefix: &str, partner: &str, key: &str) -> Result<RecordId, InboundError> {
    let id =
        uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, format!("urn:carebridge:inbound:{partner}:{key}").as_bytes());
    // A short prefix and a UUID always make a valid id.
    RecordId::parse(&format!("{prefix}-{id}")).map_err(|e| InboundError::Invalid(vec![e]))
}

/// What identifies a resource at its partner: its first business identifier, else its server id.
fn key_of(r: &Value) -> Option<String> {
    let ty = r.get("resourceType").and_then(Value::as_str).unwrap_or_default();
    if let Some(i) = r.get("identifier").and_then(Value::as_array).and_then(|a| a.first())
        && let (Some(s), Some(v)) = (text(i, "/system"), text(i, "/value"))
    {
        return Some(format!("{ty}|{s}|{v}"));
    }
    r.get("id").and_then(Value::as_str).map(|id| format!("{ty}/{id}"))
}

/// A staff id for the partner's requester: its identifier value in the id alphabet, else `partner-staff`.
fn staff_id(requester: Option<&Value>) -> String {
    let raw = requester.and_then(|r| text(r, "/identifier/value")).unwrap_or("partner-staff");
    let clean: String =
        raw.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '-' }).take(64).collect();
    match RecordId::parse(clean.trim_matches(['-', '.'])) {
        Ok(id) => id.as_str().to_owned(),
        Err(_) => "partner-staff".to_owned(),
    }
}

impl Inbound<'_> {
    /// Takes in the referral of `body` (a transaction Bundle, or a Task alone) from `partner`.
    ///
    /// # Errors
    /// `Invalid`, `Partner`, `Intake` or `Store` (see [`InboundError`]).
    pub async fn receive(
        &self,
        partner: &PartnerSettings,
        body: &Value,
        actor: &Actor,
        now: OffsetDateTime,
    ) -> Result<Received, InboundError> {
        let mut all = entries(body);
        gate(&all)?;
        let tasks: Vec<&Value> =
            all.iter().map(|(_, r)| r).filter(|r| text(r, "/resourceType") == Some("Task")).collect();
        let [task] = tasks.as_slice() else {
            return Err(InboundError::Invalid(vec![format!("one Task is expected, {} came", tasks.len())]));
        };
        let task = (*task).clone();
        let status = match text(&task, "/status") {
            Some("requested") => "sent",
            Some("draft") => "draft",
            other => {
                return Err(InboundError::Invalid(vec![format!(
                    "Task.status: a referral comes in requested (or draft), not {}",
                    other.unwrap_or("absent")
                )]));
            }
        };
        if text(&task, "/intent") != Some("order") {
            return Err(InboundError::Invalid(vec!["Task.intent: a referral's Task is an order".into()]));
        }
        let key = key_of(&task).ok_or_else(|| {
            InboundError::Invalid(vec!["Task: no identifier and no id: it cannot be told from another".into()])
        })?;
        let referral_id = derived_id("in", &partner.name, &key)?;
        // The same Task again: nothing new.
        if let Some(stored) = self.store.get_record(RecordKind::Referral, &referral_id).await? {
            let r: Referral = serde_json::from_str(&stored.body)
                .map_err(|e| InboundError::Invalid(vec![format!("kept referral: {e}")]))?;
            return Ok(Received { referral: referral_id, created: false, client: (r.client_id, false) });
        }
        // The focus and the patient: in the Bundle, or read from the partner's server.
        let focus_ref = text(&task, "/focus/reference")
            .ok_or_else(|| InboundError::Invalid(vec!["Task.focus: names no ServiceRequest".into()]))?
            .to_owned();
        let sr = self.find(partner, &mut all, &focus_ref, "ServiceRequest").await?;
        let patient_ref = text(&task, "/for/reference")
            .or_else(|| text(&sr, "/subject/reference"))
            .ok_or_else(|| InboundError::Invalid(vec!["Task.for: names no Patient".into()]))?
            .to_owned();
        let patient = self.find(partner, &mut all, &patient_ref, "Patient").await?;
        let request = self.mappings.read_foreign_request(&sr).map_err(InboundError::Invalid)?;
        let (client_id, client_created, candidates) = self.client(partner, &patient, actor, now).await?;
        let requester = sr.get("requester").or_else(|| task.get("requester"));
        let referral = json!({
            "client_id": client_id,
            "need": request.need,
            "service": request.service,
            "priority": request.priority,
            "requester": {
                "staff_id": staff_id(requester),
                "name": requester.and_then(|r| text(r, "/display")).unwrap_or("(not named)"),
                "organization": text(&task, "/requester/display").unwrap_or(&partner.name),
                "partner": partner.name,
            },
            "target": {"type": "agency"},
            "status": status,
            "authored_on": text(&task, "/authoredOn").or_else(|| text(&sr, "/authoredOn"))
                .map_or_else(|| now.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(), str::to_owned),
            "reason": request.reason,
            "client_candidates": candidates,
        });
        let mut referral: Value = referral;
        if referral["reason"].is_null()
            && let Some(obj) = referral.as_object_mut()
        {
            obj.remove("reason");
        }
        let referral: Referral = serde_json::from_value(referral)
            .map_err(|e| InboundError::Invalid(vec![format!("the referral read from it: {e}")]))?;
        // The partner's own resources: its Task (the agency's answers merge into it), its request and its patient
        // (never overwritten), kept in the referral's own transaction.
        let mut mine = Vec::new();
        for (local, r, owned) in [
            (format!("Task/{referral_id}"), &task, false),
            (format!("ServiceRequest/{referral_id}"), &sr, true),
            (format!("Patient/{client_id}"), &patient, true),
        ] {
            let (Some(ty), Some(id)) = (text(r, "/resourceType"), text(r, "/id")) else { continue };
            mine.push(CrosswalkEntry {
                partner: partner.name.clone(),
                local_ref: local,
                kind: if ty == "Patient" { RecordKind::Client } else { RecordKind::Referral },
                record_id: if ty == "Patient" { client_id.clone() } else { referral_id.clone() },
                remote_type: ty.to_owned(),
                remote_id: id.to_owned(),
                version_id: text(r, "/meta/versionId").map(str::to_owned),
                content_hash: if owned { PARTNER_OWNED.to_owned() } else { String::new() },
            });
        }
        let intake = Intake { store: self.store, partners: self.partners };
        let saved = intake::put_holding(
            intake,
            referral_id.clone(),
            referral,
            Precondition::Absent,
            actor,
            Change::Put,
            now,
            mine,
        )
        .await;
        let created = match saved {
            Ok(s) => matches!(s.outcome, SaveOutcome::Created(_)),
            // Another copy of the same Task got in first.
            Err(IntakeError::PreconditionFailed { .. }) => false,
            Err(e) => return Err(InboundError::Intake(e)),
        };
        Ok(Received { referral: referral_id, created, client: (client_id, client_created) })
    }

    /// The resource `reference` names: in what came, else read from the partner's server (and kept with what
    /// came, so its id is known).
    async fn find(
        &self,
        partner: &PartnerSettings,
        all: &mut Vec<(Option<String>, Value)>,
        reference: &str,
        ty: &str,
    ) -> Result<Value, InboundError> {
        if let Some(r) = resolve(all, reference) {
            return if text(r, "/resourceType") == Some(ty) {
                Ok(r.clone())
            } else {
                Err(InboundError::Invalid(vec![format!("{reference} is not a {ty}")]))
            };
        }
        let id = reference
            .strip_prefix(&format!("{ty}/"))
            .filter(|id| !id.is_empty() && !id.contains('/'))
            .ok_or_else(|| {
                InboundError::Invalid(vec![format!(
                    "{ty} {reference}: neither in the Bundle nor a {ty}/id on the partner's server"
                )])
            })?;
        let client = crate::fhir::auth::partner_client(partner, Duration::from_secs(30))
            .map_err(|e| InboundError::Partner(crate::outbox::cause(&e).to_owned()))?;
        let read = client
            .read(ty, id)
            .await
            .map_err(|e| InboundError::Partner(crate::outbox::cause(&e.to_string()).to_owned()))?;
        let r = read.ok_or_else(|| InboundError::Invalid(vec![format!("{ty}/{id}: the partner's server has none")]))?;
        gate(&[(None, r.clone())])?;
        all.push((None, r.clone()));
        Ok(r)
    }

    /// The client the Patient is: matched on the partner's `patient_match` identifiers, or made from it (and
    /// whether it was made now). Several matches are not guessed between: the client made from the Patient stands in,
    /// with the clients matched as the candidates the agency links the referral to.
    async fn client(
        &self,
        partner: &PartnerSettings,
        patient: &Value,
        actor: &Actor,
        now: OffsetDateTime,
    ) -> Result<(RecordId, bool, Vec<RecordId>), InboundError> {
        let wanted: Vec<(String, String)> = patient
            .get("identifier")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|i| Some((text(i, "/system")?.to_owned(), text(i, "/value")?.to_owned())))
                    .filter(|(s, _)| partner.patient_match.iter().any(|m| m == s))
                    .collect()
            })
            .unwrap_or_default();
        let key =
            key_of(patient).ok_or_else(|| InboundError::Invalid(vec!["Patient: no identifier and no id".into()]))?;
        let id = derived_id("cl-in", &partner.name, &key)?;
        let mut candidates = Vec::new();
        if !wanted.is_empty() {
            // The client made from this very Patient before is no other candidate.
            let mut matched = self.clients_with(&wanted).await?;
            matched.retain(|m| *m != id);
            match matched.as_slice() {
                [one] => return Ok((one.clone(), false, candidates)),
                [] => {}
                more => candidates = more.to_vec(),
            }
        }
        if self.store.get_record(RecordKind::Client, &id).await?.is_some() {
            return Ok((id, false, candidates));
        }
        let read = self
            .mappings
            .referral_from_fhir_with(std::slice::from_ref(patient), partner.overlay.as_deref(), Ids::Partner(&|_| None))
            .map_err(|e| InboundError::Invalid(vec![e.to_string()]))?;
        let mut client = read.client.ok_or_else(|| InboundError::Invalid(vec!["Patient: not read".into()]))?;
        if let Some(obj) = client.as_object_mut() {
            obj.remove("id");
        }
        let client: Client = serde_json::from_value(client)
            .map_err(|e| InboundError::Invalid(vec![format!("the client read from the Patient: {e}")]))?;
        let intake = Intake { store: self.store, partners: self.partners };
        match intake::put(intake, id.clone(), client, Precondition::Absent, actor, Change::Put, now).await {
            Ok(_) => Ok((id, true, candidates)),
            Err(IntakeError::PreconditionFailed { .. }) => Ok((id, false, candidates)),
            Err(e) => Err(InboundError::Intake(e)),
        }
    }

    /// The clients holding one of `wanted` (system, value), each once.
    async fn clients_with(&self, wanted: &[(String, String)]) -> Result<Vec<RecordId>, StoreError> {
        let mut out: Vec<RecordId> = Vec::new();
        for (system, value) in wanted {
            for id in self.store.find_by_key(RecordKind::Client, system, value).await? {
                if let Ok(id) = RecordId::parse(&id)
                    && !out.contains(&id)
                {
                    out.push(id);
                }
            }
        }
        Ok(out)
    }
}

/// The base-R4 gate: every resource parses in the typed R4 model and passes the R4 schema.
fn gate(all: &[(Option<String>, Value)]) -> Result<(), InboundError> {
    let mut problems = Vec::new();
    for (_, r) in all {
        let ty = text(r, "/resourceType").unwrap_or("(no resourceType)");
        if let Err(e) = crate::fhir::typed_parse(r) {
            problems.push(format!("{ty}: {e}"));
        }
        problems.extend(crate::fhir::schema::check(r).into_iter().map(|i| format!("{ty}.{}: {}", i.path, i.message)));
    }
    if problems.is_empty() { Ok(()) } else { Err(InboundError::Invalid(problems)) }
}
