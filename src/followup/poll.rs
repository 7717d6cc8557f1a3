//! Following the referrals the agency sent: one `_lastUpdated` search of each partner's Tasks per sweep, every
//! page of it, and each changed Task of ours moved through the same state machine as any other status change.
//!
//! A sweep costs one search (and its pages) whatever the number of open referrals: only Tasks that changed since the
//! last sweep come back. A Task is ours when the crosswalk knows its id at that partner; a version already seen (the
//! crosswalk keeps the `versionId` the gateway last wrote or read) is skipped, so the overlap of `ge` with the last
//! instant seen, a page read twice, or our own write coming back, changes nothing. The partner's status is read as
//! a referral status (the `referral-status-task` ConceptMap backwards) and applied as the partner's move: a move the
//! state machine does not give the performer is recorded in the audit log and not applied.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::domain::{Party, RecordId, Redacted, StatusChange};
use crate::fhir::client::{FhirClient, matches};
use crate::intake::{self, Intake, IntakeError};
use crate::mapping::Mappings;
use crate::partners::{PartnerSettings, Partners};
use crate::store::{Actor, CrosswalkEntry, Precondition, Store, StoreError, SweepClaim};

/// How long a sweep may hold a partner before another replica may take it over.
const SWEEP_LEASE: Duration = Duration::from_secs(300);
/// How far before the first Task the gateway kept at a partner a first sweep starts (the partner's clock may be
/// behind ours).
const CLOCK_SKEW: Duration = Duration::from_secs(300);
/// Tasks asked for per page.
const PAGE: u32 = 100;

/// What one sweep of one partner did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Tasks the search returned (every page).
    pub read: usize,
    /// Of those, the gateway's, at a version not seen before.
    pub changed: usize,
    /// Status moves applied to the agency's referrals.
    pub applied: usize,
    /// Moves the state machine refused (recorded in the audit log).
    pub refused: usize,
    /// Pages read.
    pub pages: usize,
    /// Another replica held the sweep.
    pub busy: bool,
    /// The search failed (the cursor stays; the next sweep reads the same Tasks again).
    pub failed: Option<String>,
}

/// A partner followed: its settings and its FHIR client.
struct Followed {
    settings: PartnerSettings,
    client: FhirClient,
}

/// The follow-up worker: sweeps every partner that receives referrals and has a `poll_secs`.
pub struct Poller {
    store: Arc<dyn Store>,
    mappings: Arc<Mappings>,
    partners: Arc<Partners>,
    followed: Vec<Followed>,
    holder: String,
}

impl Poller {
    /// A poller of the configured partners that receive referrals and are polled (`poll_secs` > 0).
    ///
    /// # Errors
    /// A partner whose HTTP client or credentials cannot be built.
    pub fn new(
        store: Arc<dyn Store>,
        mappings: Arc<Mappings>,
        partners: Arc<Partners>,
        default_timeout: Duration,
    ) -> Result<Self, String> {
        let mut followed = Vec::new();
        for p in partners.receiving(crate::domain::RecordKind::Referral).filter(|p| p.poll_secs > 0) {
            let client = crate::fhir::auth::partner_client(p, default_timeout)?;
            followed.push(Followed { settings: p.clone(), client });
        }
        Ok(Poller { store, mappings, partners, followed, holder: uuid::Uuid::new_v4().to_string() })
    }

    /// The partners this poller follows, by name.
    pub fn followed(&self) -> impl Iterator<Item = &str> {
        self.followed.iter().map(|f| f.settings.name.as_str())
    }

    /// Sweeps every followed partner once, at `now`.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn sweep_all(&self, now: OffsetDateTime) -> Result<Vec<(String, SweepReport)>, StoreError> {
        let mut out = Vec::new();
        for f in &self.followed {
            out.push((f.settings.name.clone(), self.sweep(f, now).await?));
        }
        Ok(out)
    }

    /// Sweeps each followed partner every `poll_secs` until `stopping` turns true.
    pub async fn run(self, stopping: tokio::sync::watch::Receiver<bool>) {
        let this = &self;
        futures_util::future::join_all(self.followed.iter().map(|f| {
            let mut stopping = stopping.clone();
            async move {
                let every = Duration::from_secs(f.settings.poll_secs);
                while !*stopping.borrow() {
                    match this.sweep(f, OffsetDateTime::now_utc()).await {
                        Ok(r) => this.observe(&f.settings.name, &r),
                        Err(e) => tracing::error!(partner = %f.settings.name, error = %e,
                            "The follow-up sweep could not reach the store; it tries again."),
                    }
                    tokio::select! {
                        () = tokio::time::sleep(every) => {}
                        _ = stopping.changed() => {}
                    }
                }
            }
        }))
        .await;
    }

    fn observe(&self, partner: &str, r: &SweepReport) {
        let p = partner.to_owned();
        metrics::counter!("carebridge_followup_tasks_total", "partner" => p.clone(), "outcome" => "read")
            .increment(r.read as u64);
        metrics::counter!("carebridge_followup_tasks_total", "partner" => p.clone(), "outcome" => "applied")
            .increment(r.applied as u64);
        metrics::counter!("carebridge_followup_tasks_total", "partner" => p.clone(), "outcome" => "refused")
            .increment(r.refused as u64);
        match &r.failed {
            Some(why) => {
                tracing::warn!(partner, error = %why, "Following the partner's Tasks failed; the next sweep reads them again.")
            }
            None if r.changed > 0 => tracing::info!(
                partner,
                read = r.read,
                changed = r.changed,
                applied = r.applied,
                refused = r.refused,
                "Partner Tasks followed."
            ),
            None => {}
        }
    }

    /// One sweep of one partner: its Tasks changed since the last sweep, each of ours applied.
    async fn sweep(&self, f: &Followed, now: OffsetDateTime) -> Result<SweepReport, StoreError> {
        let name = f.settings.name.as_str();
        let mut report = SweepReport::default();
        let last_seen = match self.store.claim_sweep(name, &self.holder, now, now + SWEEP_LEASE).await? {
            SweepClaim::Busy => {
                report.busy = true;
                return Ok(report);
            }
            SweepClaim::Taken { last_seen } => last_seen,
        };
        let since = match last_seen {
            Some(s) => s,
            None => match self.store.first_crosswalk(name, "Task").await? {
                Some(first) => rfc3339(first - CLOCK_SKEW),
                None => {
                    // Nothing sent there yet: nothing to follow.
                    self.store.finish_sweep(name, &self.holder, None, now).await?;
                    return Ok(report);
                }
            },
        };
        let mut newest = since.clone();
        let result = self.read_changes(f, &since, &mut newest, &mut report, now).await;
        let reached = match result {
            Ok(()) => Some(newest.as_str()),
            Err(Failed::Partner(why)) => {
                report.failed = Some(why);
                // What was applied stays applied; the cursor moves only over a whole sweep.
                None
            }
            Err(Failed::Store(e)) => {
                self.store.finish_sweep(name, &self.holder, None, now).await?;
                return Err(e);
            }
        };
        self.store.finish_sweep(name, &self.holder, reached, now).await?;
        Ok(report)
    }

    async fn read_changes(
        &self,
        f: &Followed,
        since: &str,
        newest: &mut String,
        report: &mut SweepReport,
        now: OffsetDateTime,
    ) -> Result<(), Failed> {
        let query = [("_lastUpdated", format!("ge{since}")), ("_count", PAGE.to_string())];
        let mut page = f
            .client
            .search("Task", &query)
            .await
            .map_err(|e| Failed::Partner(crate::outbox::cause(&e.to_string()).to_owned()))?;
        let request_id = format!("followup-{}", uuid::Uuid::new_v4());
        loop {
            report.pages += 1;
            let tasks: Vec<Value> = matches(&page)
                .map_err(|e| Failed::Partner(crate::outbox::cause(&e.to_string()).to_owned()))?
                .into_iter()
                .filter_map(|e| e.get("resource").cloned())
                .filter(|r| r.get("resourceType").and_then(Value::as_str) == Some("Task"))
                .collect();
            report.read += tasks.len();
            let ids: Vec<String> =
                tasks.iter().filter_map(|t| t.get("id").and_then(Value::as_str)).map(str::to_owned).collect();
            let ours = self.store.crosswalk_by_remote(&f.settings.name, "Task", &ids).await.map_err(Failed::Store)?;
            for task in &tasks {
                if let Some(at) = task.pointer("/meta/lastUpdated").and_then(Value::as_str)
                    && later(at, newest)
                {
                    at.clone_into(newest);
                }
                let id = task.get("id").and_then(Value::as_str).unwrap_or_default();
                let Some(entry) = ours.iter().find(|e| e.remote_id == id) else { continue };
                let version = task.pointer("/meta/versionId").and_then(Value::as_str);
                if version.is_some() && version == entry.version_id.as_deref() {
                    continue;
                }
                report.changed += 1;
                match self.apply(&f.settings.name, entry, task, &request_id, now).await.map_err(Failed::Store)? {
                    Applied::Moved => report.applied += 1,
                    Applied::Refused => report.refused += 1,
                    Applied::Same => {}
                }
                let mut seen = entry.clone();
                seen.version_id = version.map(str::to_owned);
                self.store.save_crosswalk(&[seen], now).await.map_err(Failed::Store)?;
            }
            match f
                .client
                .next_page(&page)
                .await
                .map_err(|e| Failed::Partner(crate::outbox::cause(&e.to_string()).to_owned()))?
            {
                Some(next) => page = next,
                None => return Ok(()),
            }
        }
    }

    /// Applies one changed Task of ours to its referral as the partner's move.
    async fn apply(
        &self,
        partner: &str,
        entry: &CrosswalkEntry,
        task: &Value,
        request_id: &str,
        now: OffsetDateTime,
    ) -> Result<Applied, StoreError> {
        let code = task.get("status").and_then(Value::as_str).unwrap_or_default();
        let Some(status) = self.mappings.referral_status_of_task(code) else {
            tracing::info!(partner, referral = %entry.record_id, task_status = code,
                "A partner's Task is in a status no referral status stands for; left as it is.");
            return Ok(Applied::Same);
        };
        let reason = task
            .pointer("/statusReason/text")
            .and_then(Value::as_str)
            .filter(|t| !t.trim().is_empty())
            .map(str::to_owned)
            .or_else(|| status.needs_reason().then(|| format!("{partner} gave no reason")));
        let outcome = (status == crate::domain::ReferralStatus::Completed)
            .then(|| super::task::outcome(task))
            .flatten()
            .map(Redacted);
        let change = StatusChange { status, reason: reason.map(Redacted), outcome };
        let actor =
            Actor { key_name: "followup".into(), request_id: request_id.to_owned(), partner: Some(partner.to_owned()) };
        let intake = Intake { store: &*self.store, partners: &self.partners };
        let moved = intake::change_referral_status(
            intake,
            &entry.record_id,
            &change,
            Party::Partner(partner),
            Precondition::None,
            &actor,
            now,
        )
        .await;
        match moved {
            Ok(saved) if matches!(saved.outcome, crate::store::SaveOutcome::Unchanged(_)) => Ok(Applied::Same),
            Ok(_) => Ok(Applied::Moved),
            Err(IntakeError::IllegalMove(m)) => {
                let version = self.current_version(&entry.record_id).await?;
                self.store.record_refused_move(&entry.record_id, version, &actor, now).await?;
                tracing::warn!(partner, referral = %entry.record_id, task_status = code, refused = %m,
                    "A partner moved a referral where the state machine does not let it go; recorded, not applied.");
                Ok(Applied::Refused)
            }
            Err(IntakeError::NotFound) => Ok(Applied::Same),
            Err(IntakeError::Store(e)) => Err(e),
            Err(e) => {
                tracing::warn!(partner, referral = %entry.record_id, task_status = code, error = %e,
                    "A partner's Task status could not be applied.");
                Ok(Applied::Refused)
            }
        }
    }

    async fn current_version(&self, id: &RecordId) -> Result<i64, StoreError> {
        Ok(self.store.get_record(crate::domain::RecordKind::Referral, id).await?.map_or(0, |r| r.meta.version))
    }
}

/// How a sweep stopped short.
enum Failed {
    /// The partner's answer (the next sweep tries again from the same cursor).
    Partner(String),
    /// Ours.
    Store(StoreError),
}

/// What one changed Task did to its referral.
enum Applied {
    Moved,
    Refused,
    Same,
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

/// Whether instant `a` is after instant `b` (both as a server wrote them; unparsable ones never are).
fn later(a: &str, b: &str) -> bool {
    match (OffsetDateTime::parse(a, &Rfc3339), OffsetDateTime::parse(b, &Rfc3339)) {
        (Ok(a), Ok(b)) => a > b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_compare_as_instants_not_as_text() {
        assert!(later("2026-12-07T10:00:00.5+01:00", "2026-12-07T08:59:59Z"));
        assert!(!later("2026-12-07T10:00:00+01:00", "2026-12-07T09:00:00Z"));
        assert!(!later("not a time", "2026-12-07T09:00:00Z"));
    }
}
