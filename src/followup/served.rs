//! The agency's records as the gateway's own FHIR endpoint serves them: each referral's `Task` and `ServiceRequest`
//! (their ids are the referral's), each client's `Patient`, each care plan's `CarePlan`, `Goal`s and intervention
//! `ServiceRequest`s, each `Consent`, rendered by the same mappings as a delivery; for a partner's key, only the
//! referrals that partner is a side of, and only what the egress decision lets it see (what it holds from it does
//! not exist for it); and a status a caller sets on a Task, applied as that caller's move through the state machine.

use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::domain::{Party, RecordId, RecordKind, Redacted, Referral, StatusChange};
use crate::intake::{self, Intake, IntakeError};
use crate::mapping::{MapError, Mappings};
use crate::partners::Partners;
use crate::policy::{self, Decision, Policy, Recipient};
use crate::store::{Actor, ListQuery, Precondition, Store, StoreError, StoredRecord};

/// Who reads: the agency (every referral, whole), or a partner (its own referrals, as the policy decides).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reader<'a> {
    /// An agency key.
    Agency,
    /// A partner's key, by partner name.
    Partner(&'a str),
}

impl<'a> Reader<'a> {
    /// The party this reader moves a referral as.
    #[must_use]
    pub fn party(self) -> Party<'a> {
        match self {
            Reader::Agency => Party::Agency,
            Reader::Partner(p) => Party::Partner(p),
        }
    }
}

/// What serving needs.
#[derive(Clone, Copy)]
pub struct Served<'a> {
    /// The store.
    pub store: &'a dyn Store,
    /// The mappings.
    pub mappings: &'a Mappings,
    /// The egress policy's profiles.
    pub policy: &'a Policy,
    /// The configured partners.
    pub partners: &'a Partners,
}

/// Why a Task could not be served or changed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A kept referral does not parse, or does not map (a mapping file broken since it was kept).
    #[error("the referral cannot be rendered: {0}")]
    Render(String),
    /// The change was refused.
    #[error(transparent)]
    Intake(IntakeError),
    /// The Task sent is not one the gateway can read a status from.
    #[error("{0}")]
    Invalid(String),
}

/// A resource (a referral's Task, a client's Patient…) as one reader may see it.
#[derive(Debug, Clone)]
pub struct ServedResource {
    /// The resource (with `meta.versionId` and `meta.lastUpdated` of the record it comes from).
    pub resource: Value,
    /// The version of the record it comes from.
    pub version: i64,
    /// The kind of that record.
    pub kind: RecordKind,
    /// Its agency id.
    pub record_id: String,
    /// The client whose data it is.
    pub client: Option<String>,
}

/// The record kinds a FHIR resource type on `/fhir` is rendered from.
#[must_use]
pub fn kinds_of(resource_type: &str) -> &'static [RecordKind] {
    match resource_type {
        "Task" => &[RecordKind::Referral],
        "ServiceRequest" => &[RecordKind::Referral, RecordKind::CarePlan],
        "Patient" => &[RecordKind::Client],
        "CarePlan" | "Goal" => &[RecordKind::CarePlan],
        "Consent" => &[RecordKind::Consent],
        _ => &[],
    }
}

/// The agency ids a resource id may come from: the whole id, then each part before a `.` (a goal's
/// `<plan>.<goal>`, an intervention's `<plan>.<intervention>`), longest first.
fn source_ids(id: &str) -> Vec<RecordId> {
    let mut out: Vec<RecordId> = RecordId::parse(id).into_iter().collect();
    let dots: Vec<usize> = id.match_indices('.').map(|(i, _)| i).collect();
    out.extend(dots.iter().rev().filter_map(|&i| RecordId::parse(&id[..i]).ok()));
    out
}

impl Served<'_> {
    /// The Task of referral `id` (at `version`, or the current one) as `reader` may see it; `None` when there is
    /// none for it.
    ///
    /// # Errors
    /// The store failed, or the referral does not render.
    pub async fn task(
        &self,
        reader: Reader<'_>,
        id: &str,
        version: Option<i64>,
    ) -> Result<Option<ServedResource>, ServeError> {
        self.resource(reader, "Task", id, version).await
    }

    /// The resource `resource_type/id` (at the `version` of the record it comes from, or the current one) as
    /// `reader` may see it; `None` when there is none for it.
    ///
    /// # Errors
    /// The store failed, or the record does not render.
    pub async fn resource(
        &self,
        reader: Reader<'_>,
        resource_type: &str,
        id: &str,
        version: Option<i64>,
    ) -> Result<Option<ServedResource>, ServeError> {
        for &kind in kinds_of(resource_type) {
            for source in source_ids(id) {
                let stored = match version {
                    None => self.store.get_record(kind, &source).await?,
                    Some(v) => self.store.get_version(kind, &source, v).await?,
                };
                let Some(stored) = stored else { continue };
                let found = self.render(reader, kind, &stored, resource_type).await?;
                if let Some(t) = found.into_iter().find(|t| t.resource.get("id").and_then(Value::as_str) == Some(id)) {
                    return Ok(Some(t));
                }
            }
        }
        Ok(None)
    }

    /// Every Task `reader` may see whose referral was changed after `after` (all when `None`), by referral id.
    ///
    /// # Errors
    /// The store failed, or a referral does not render.
    pub async fn tasks(
        &self,
        reader: Reader<'_>,
        client: Option<RecordId>,
        after: Option<OffsetDateTime>,
    ) -> Result<Vec<ServedResource>, ServeError> {
        self.resources(reader, "Task", client, after, &[]).await
    }

    /// Every resource of `resource_type` `reader` may see, from the records (of `client`, when given) changed after
    /// `after`, referrals only in `referral_statuses` (all when empty): the candidates a search filters.
    ///
    /// # Errors
    /// The store failed, or a record does not render.
    pub async fn resources(
        &self,
        reader: Reader<'_>,
        resource_type: &str,
        client: Option<RecordId>,
        after: Option<OffsetDateTime>,
        referral_statuses: &[&str],
    ) -> Result<Vec<ServedResource>, ServeError> {
        let mut out = Vec::new();
        let any: [Option<&str>; 1] = [None];
        let statuses: Vec<Option<&str>> = referral_statuses.iter().map(|s| Some(*s)).collect();
        for &kind in kinds_of(resource_type) {
            // Referrals in the statuses asked for only (each a query on the indexed status); other kinds: all.
            let wanted = if kind == RecordKind::Referral && !statuses.is_empty() { &statuses[..] } else { &any[..] };
            for status in wanted {
                let mut cursor = None;
                loop {
                    let q = ListQuery {
                        kind,
                        // A client's own record is found by its id, not by `client_id`.
                        client_id: if kind == RecordKind::Client { None } else { client.clone() },
                        status: status.map(str::to_owned),
                        direction: None,
                        updated_since: after,
                        after: cursor.take(),
                        limit: 500,
                    };
                    let page = self.store.list_records(&q).await?;
                    for stored in &page.items {
                        if kind == RecordKind::Client && client.as_ref().is_some_and(|c| c.as_str() != stored.id) {
                            continue;
                        }
                        out.extend(self.render(reader, kind, stored, resource_type).await?);
                    }
                    match page.next_after {
                        Some(next) => cursor = Some(next),
                        None => break,
                    }
                }
            }
        }
        Ok(out)
    }

    /// The resources of `resource_type` one record renders to, as `reader` may see them (none when the policy
    /// holds the record from a partner, or the referral is not that partner's).
    async fn render(
        &self,
        reader: Reader<'_>,
        kind: RecordKind,
        stored: &StoredRecord,
        resource_type: &str,
    ) -> Result<Vec<ServedResource>, ServeError> {
        let corrupt = |e: serde_json::Error| ServeError::Render(format!("stored {kind}: {e}"));
        // Another partner's referral is left before anything is read or rendered for it.
        if let Reader::Partner(name) = reader
            && kind == RecordKind::Referral
        {
            let referral: Referral = serde_json::from_str(&stored.body).map_err(corrupt)?;
            if referral.counterpart().is_none_or(|c| c.as_str() != name) {
                return Ok(Vec::new());
            }
        }
        let record: Value = serde_json::from_str(&stored.body).map_err(corrupt)?;
        let (related, facts) = crate::outbox::context_now(self.store, kind, &record).await?;
        let (record, related, overlay) = match reader {
            Reader::Agency => (record, related, None),
            Reader::Partner(name) => {
                let Some(settings) = self.partners.get(name) else { return Ok(Vec::new()) };
                let Some(profile) = self.policy.profile(settings.policy_profile()) else { return Ok(Vec::new()) };
                let Ok(id) = RecordId::parse(&stored.id) else { return Ok(Vec::new()) };
                let holds_record = policy::partner_holds(self.store, name, kind, &id).await?;
                let recipient = Recipient { name, profile, holds_record };
                let today = OffsetDateTime::now_utc().date();
                match policy::decide(self.mappings.labels(), recipient, kind, &record, &related, &facts, today) {
                    Decision::Hold(_) => return Ok(Vec::new()),
                    Decision::Send(release) => (release.record, release.related, settings.overlay.clone()),
                }
            }
        };
        let render = |e: MapError| ServeError::Render(e.to_string());
        let mut resources = self.mappings.render(kind, &record, overlay.as_deref(), &related).map_err(render)?;
        self.mappings.label(&mut resources);
        let at = stored.meta.updated_at.format(&Rfc3339).unwrap_or_default();
        let client = match kind {
            RecordKind::Client => Some(stored.id.clone()),
            _ => crate::audit::client_of(&stored.body),
        };
        Ok(resources
            .into_iter()
            .map(|e| e.resource)
            .filter(|r| r.get("resourceType").and_then(Value::as_str) == Some(resource_type))
            .map(|mut r| {
                if let Some(obj) = r.as_object_mut() {
                    let meta = obj.entry("meta").or_insert_with(|| Value::Object(serde_json::Map::new()));
                    if let Some(meta) = meta.as_object_mut() {
                        meta.insert("versionId".into(), Value::String(stored.meta.version.to_string()));
                        meta.insert("lastUpdated".into(), Value::String(at.clone()));
                    }
                }
                ServedResource {
                    resource: r,
                    version: stored.meta.version,
                    kind,
                    record_id: stored.id.clone(),
                    client: client.clone(),
                }
            })
            .collect())
    }

    /// Applies the status of `sent` (a Task a caller PUT on `/fhir/Task/<id>`) to referral `id` as `reader`'s
    /// move: its `status` read through the `referral-status-task` ConceptMap, its `statusReason.text` as the
    /// reason. The other fields are not the caller's to change here and are ignored.
    ///
    /// # Errors
    /// `Invalid` for a Task without a status a referral status stands for; `Intake` for a refused move (an
    /// illegal one, a missing reason, a stale version, no such referral); `Store`.
    pub async fn set_status(
        &self,
        reader: Reader<'_>,
        id: &RecordId,
        sent: &Value,
        pre: Precondition,
        actor: &Actor,
        now: OffsetDateTime,
    ) -> Result<(), ServeError> {
        let code = sent.get("status").and_then(Value::as_str).unwrap_or_default();
        let status = self.mappings.referral_status_of_task(code).ok_or_else(|| {
            ServeError::Invalid(format!(
                "Task.status `{}` is not one this endpoint takes (draft, requested, accepted, rejected, in-progress, \
                 on-hold, completed, cancelled, failed, entered-in-error)",
                code.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(32).collect::<String>()
            ))
        })?;
        let reason = sent
            .pointer("/statusReason/text")
            .and_then(Value::as_str)
            .filter(|t| !t.trim().is_empty())
            .map(|t| Redacted(t.to_owned()));
        let outcome = (status == crate::domain::ReferralStatus::Completed)
            .then(|| super::task::outcome(sent))
            .flatten()
            .map(Redacted);
        let change = StatusChange { status, reason, outcome };
        let intake = Intake { store: self.store, partners: self.partners };
        intake::change_referral_status(intake, id, &change, reader.party(), pre, actor, now)
            .await
            .map(|_| ())
            .map_err(ServeError::Intake)
    }
}
