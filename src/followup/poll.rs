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

use super::subscription::{Token, Wakes};

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
    /// Tasks named by notifications, read one by one.
    pub notified: usize,
    /// The round swept (a search by `_lastUpdated`), not only read what notifications named.
    pub swept: bool,
}

/// How often the store is looked at for notifications (which another replica may have received) and owed sweeps,
/// for a partner that takes subscriptions.
const CHECK_EVERY: Duration = Duration::from_secs(15);

/// What the worker knows of a partner's subscription between rounds.
#[derive(Default)]
struct Upkeep {
    /// Whether the partner declares the backport (`None`: its CapabilityStatement not read yet).
    takes_subscriptions: Option<bool>,
    /// Not before this is the partner asked again (its capabilities, its subscription).
    next_check: Option<OffsetDateTime>,
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
    subscribing: Option<Subscribing>,
}

/// What subscribing at partners needs: where they send notifications, and the wakes the hook rings.
struct Subscribing {
    wakes: Arc<Wakes>,
    public_base_url: String,
}

impl Poller {
    /// A poller of the configured partners that receive referrals and are polled (`poll_secs` > 0) or subscribed
    /// to (`[partners.subscription]`).
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
        for p in partners
            .receiving(crate::domain::RecordKind::Referral)
            .filter(|p| p.poll_secs > 0 || p.subscription.is_some())
        {
            let client = crate::fhir::auth::partner_client(p, default_timeout)?;
            followed.push(Followed { settings: p.clone(), client });
        }
        Ok(Poller { store, mappings, partners, followed, holder: uuid::Uuid::new_v4().to_string(), subscribing: None })
    }

    /// Subscribes at the followed partners that have a `[partners.subscription]` and declare the backport, with
    /// notifications sent to `public_base_url` (no subscriptions without one) and rung on `wakes`.
    #[must_use]
    pub fn with_subscriptions(mut self, wakes: Arc<Wakes>, public_base_url: Option<String>) -> Self {
        self.subscribing = public_base_url.map(|public_base_url| Subscribing { wakes, public_base_url });
        self
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
            out.push((f.settings.name.clone(), self.round(f, true, now).await?));
        }
        Ok(out)
    }

    /// Follows each partner until `stopping` turns true: a sweep every `poll_secs`, or, while a subscription there
    /// is healthy, the Tasks its notifications name as they come, and a sweep only when some were missed.
    pub async fn run(self, stopping: tokio::sync::watch::Receiver<bool>) {
        let this = &self;
        futures_util::future::join_all(self.followed.iter().map(|f| this.follow(f, stopping.clone()))).await;
    }

    async fn follow(&self, f: &Followed, mut stopping: tokio::sync::watch::Receiver<bool>) {
        let name = f.settings.name.as_str();
        let every = Duration::from_secs(f.settings.poll_secs);
        let wake = self.subscribing.as_ref().and_then(|s| s.wakes.of(name));
        let mut upkeep = Upkeep::default();
        let mut next_sweep = OffsetDateTime::now_utc();
        while !*stopping.borrow() {
            let now = OffsetDateTime::now_utc();
            let healthy = match self.keep_subscription(f, &mut upkeep, now).await {
                Ok(h) => h,
                Err(e) => {
                    tracing::error!(partner = %name, error = %e, "The subscription's state could not be read.");
                    false
                }
            };
            let sweep_due = !healthy && f.settings.poll_secs > 0 && now >= next_sweep;
            match self.round(f, sweep_due, now).await {
                Ok(r) => {
                    if r.swept {
                        next_sweep = now + every;
                    }
                    self.observe(name, &r);
                }
                Err(e) => tracing::error!(partner = %name, error = %e,
                    "The follow-up round could not reach the store; it tries again."),
            }
            // A subscribed partner's notifications may reach another replica: the store is looked at often.
            let wait = if upkeep.takes_subscriptions == Some(true) {
                CHECK_EVERY.min(if every.is_zero() { CHECK_EVERY } else { every })
            } else if every.is_zero() {
                CHECK_EVERY
            } else {
                every
            };
            let woken = async {
                match &wake {
                    Some(w) => w.notified().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = woken => {}
                _ = stopping.changed() => {}
            }
        }
    }

    /// Keeps the partner's subscription: asks for one where the partner takes them and none is kept, checks it at
    /// the partner when it has gone quiet or failed (and asks again when it is gone), and says whether it is
    /// healthy (active, and heard from within two heartbeat periods). A sweep is owed whenever it is not.
    async fn keep_subscription(
        &self,
        f: &Followed,
        upkeep: &mut Upkeep,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let (Some(settings), Some(subscribing)) = (&f.settings.subscription, &self.subscribing) else {
            return Ok(false);
        };
        let name = f.settings.name.as_str();
        if upkeep.next_check.is_some_and(|at| now < at) && upkeep.takes_subscriptions != Some(true) {
            return Ok(false);
        }
        let period = Duration::from_secs(settings.heartbeat_secs);
        if upkeep.takes_subscriptions.is_none() {
            match crate::outbox::read_capabilities(&f.client).await {
                Ok(c) if c.subscriptions => upkeep.takes_subscriptions = Some(true),
                Ok(_) => {
                    tracing::warn!(
                        partner = name,
                        "The partner declares no topic-based Subscriptions; it is followed by sweeps."
                    );
                    upkeep.takes_subscriptions = Some(false);
                    return Ok(false);
                }
                Err(why) => {
                    tracing::warn!(partner = name, error = %why,
                        "The partner's CapabilityStatement could not be read; sweeps until it can.");
                    upkeep.next_check = Some(now + period);
                    return Ok(false);
                }
            }
        }
        if upkeep.takes_subscriptions != Some(true) {
            return Ok(false);
        }
        let Some(row) = self.store.subscription(name).await? else {
            self.subscribe(f, settings, subscribing, upkeep, now).await?;
            return Ok(false);
        };
        let quiet_for = now - row.heard_at.unwrap_or(row.created_at);
        let late = quiet_for > period * super::subscription::LATE_AFTER_HEARTBEATS;
        if row.status == "active" && !late {
            return Ok(true);
        }
        if row.status == "requested" && !late {
            // Waiting for the partner's handshake.
            return Ok(false);
        }
        if !row.owed_sweep {
            tracing::warn!(partner = name, status = %row.status, quiet_secs = quiet_for.whole_seconds(),
                "The partner's subscription is not healthy; notifications may have been missed, the partner is swept.");
            self.store.owe_sweep(name, true).await?;
        }
        if upkeep.next_check.is_some_and(|at| now < at) {
            return Ok(false);
        }
        upkeep.next_check = Some(now + period);
        let there = match &row.remote_id {
            None => None,
            Some(id) => match f.client.read("Subscription", id).await {
                Ok(found) => found,
                Err(e) => {
                    tracing::warn!(partner = name, error = %crate::outbox::cause(&e.to_string()),
                        "The partner's subscription could not be read; checked again later.");
                    return Ok(false);
                }
            },
        };
        match there.as_ref().and_then(|s| s.get("status")).and_then(Value::as_str) {
            Some("active" | "requested") => {
                tracing::warn!(
                    partner = name,
                    "The partner keeps the subscription active but sends nothing: check that it reaches the gateway's \
                     public_base_url."
                );
            }
            _ => self.subscribe(f, settings, subscribing, upkeep, now).await?,
        }
        Ok(false)
    }

    /// Asks the partner for a new Subscription with a new token (the one it replaces stops being accepted).
    async fn subscribe(
        &self,
        f: &Followed,
        settings: &crate::partners::SubscriptionSettings,
        subscribing: &Subscribing,
        upkeep: &mut Upkeep,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let name = f.settings.name.as_str();
        upkeep.next_check = Some(now + Duration::from_secs(settings.heartbeat_secs));
        let token = match Token::new() {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(partner = name, error = %e, "No subscription token could be made.");
                return Ok(());
            }
        };
        self.store.begin_subscription(name, &token.hash, now).await?;
        let body = super::subscription::resource(
            settings,
            &super::subscription::endpoint(&subscribing.public_base_url, name),
            &token.secret,
        );
        match f.client.write(reqwest::Method::POST, "Subscription", &[], &body).await {
            Ok(reply) if (200..300).contains(&reply.status) => {
                let made: Value = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
                let id = made
                    .get("id")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .or_else(|| reply.location.as_deref().and_then(id_in_location));
                let status = made.get("status").and_then(Value::as_str).unwrap_or("requested");
                match id {
                    Some(id) => {
                        self.store.subscription_created(name, &token.hash, &id, status).await?;
                        tracing::info!(partner = name, subscription = %id, status, "Subscribed at the partner.");
                    }
                    None => tracing::warn!(
                        partner = name,
                        "The partner took the subscription but gave no id; it is checked again later."
                    ),
                }
            }
            Ok(reply) => tracing::warn!(
                partner = name,
                status = reply.status,
                "The partner refused the subscription; it is followed by sweeps and asked again later."
            ),
            Err(e) => tracing::warn!(partner = name, error = %crate::outbox::cause(&e.to_string()),
                "The subscription could not be asked for; it is followed by sweeps and asked again later."),
        }
        Ok(())
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
            None if r.changed > 0 || r.notified > 0 => tracing::info!(
                partner,
                read = r.read,
                notified = r.notified,
                changed = r.changed,
                applied = r.applied,
                refused = r.refused,
                "Partner Tasks followed."
            ),
            None => {}
        }
    }

    /// One round at one partner: the Tasks its notifications named, each read and applied, then, when `sweep` is
    /// asked or a sweep is owed, its Tasks changed since the last sweep, each of ours applied. Nothing to do: no
    /// lease taken.
    async fn round(&self, f: &Followed, sweep: bool, now: OffsetDateTime) -> Result<SweepReport, StoreError> {
        let name = f.settings.name.as_str();
        let mut report = SweepReport::default();
        let subscribed = self.subscribing.is_some() && f.settings.subscription.is_some();
        let owed = subscribed && self.store.subscription(name).await?.is_some_and(|s| s.owed_sweep);
        let notified = subscribed && !self.store.pending_events(name, 1).await?.is_empty();
        if !(sweep || owed || notified) {
            return Ok(report);
        }
        let last_seen = match self.store.claim_sweep(name, &self.holder, now, now + SWEEP_LEASE).await? {
            SweepClaim::Busy => {
                report.busy = true;
                return Ok(report);
            }
            SweepClaim::Taken { last_seen } => last_seen,
        };
        let request_id = format!("followup-{}", uuid::Uuid::new_v4());
        if notified && let Err(failed) = self.read_notified(f, &mut report, &request_id, now).await {
            match failed {
                Failed::Partner(why) => report.failed = Some(why),
                Failed::Store(e) => {
                    self.store.finish_sweep(name, &self.holder, None, now).await?;
                    return Err(e);
                }
            }
        }
        if !(sweep || owed) {
            self.store.finish_sweep(name, &self.holder, None, now).await?;
            return Ok(report);
        }
        if owed {
            // Paid now: a gap found while this sweep runs owes another.
            self.store.owe_sweep(name, false).await?;
        }
        report.swept = true;
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
        let result = self.read_changes(f, &since, &mut newest, &mut report, &request_id, now).await;
        let reached = match result {
            Ok(()) => Some(newest.as_str()),
            Err(Failed::Partner(why)) => {
                report.failed = Some(why);
                if owed {
                    self.store.owe_sweep(name, true).await?;
                }
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

    /// Reads each Task a notification named (oldest event first) and applies it as a sweep would; a Task read is
    /// forgotten, one the partner could not give stays for the next round.
    async fn read_notified(
        &self,
        f: &Followed,
        report: &mut SweepReport,
        request_id: &str,
        now: OffsetDateTime,
    ) -> Result<(), Failed> {
        let name = f.settings.name.as_str();
        loop {
            let batch = self.store.pending_events(name, PAGE).await.map_err(Failed::Store)?;
            if batch.is_empty() {
                return Ok(());
            }
            for (focus, number) in batch {
                report.notified += 1;
                let task = f
                    .client
                    .read("Task", &focus)
                    .await
                    .map_err(|e| Failed::Partner(crate::outbox::cause(&e.to_string()).to_owned()))?;
                if let Some(task) = task {
                    report.read += 1;
                    self.take(f, &[task], report, request_id, now).await?;
                }
                self.store.forget_event(name, &focus, number).await.map_err(Failed::Store)?;
            }
        }
    }

    async fn read_changes(
        &self,
        f: &Followed,
        since: &str,
        newest: &mut String,
        report: &mut SweepReport,
        request_id: &str,
        now: OffsetDateTime,
    ) -> Result<(), Failed> {
        let query = [("_lastUpdated", format!("ge{since}")), ("_count", PAGE.to_string())];
        let mut page = f
            .client
            .search("Task", &query)
            .await
            .map_err(|e| Failed::Partner(crate::outbox::cause(&e.to_string()).to_owned()))?;
        loop {
            report.pages += 1;
            let tasks: Vec<Value> = matches(&page)
                .map_err(|e| Failed::Partner(crate::outbox::cause(&e.to_string()).to_owned()))?
                .into_iter()
                .filter_map(|e| e.get("resource").cloned())
                .filter(|r| r.get("resourceType").and_then(Value::as_str) == Some("Task"))
                .collect();
            report.read += tasks.len();
            for task in &tasks {
                if let Some(at) = task.pointer("/meta/lastUpdated").and_then(Value::as_str)
                    && later(at, newest)
                {
                    at.clone_into(newest);
                }
            }
            self.take(f, &tasks, report, request_id, now).await?;
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

    /// Takes Tasks read at the partner: each of ours (the crosswalk knows its id) at a version not seen before is
    /// applied to its referral, and its version kept as seen.
    async fn take(
        &self,
        f: &Followed,
        tasks: &[Value],
        report: &mut SweepReport,
        request_id: &str,
        now: OffsetDateTime,
    ) -> Result<(), Failed> {
        let ids: Vec<String> =
            tasks.iter().filter_map(|t| t.get("id").and_then(Value::as_str)).map(str::to_owned).collect();
        let ours = self.store.crosswalk_by_remote(&f.settings.name, "Task", &ids).await.map_err(Failed::Store)?;
        for task in tasks {
            let id = task.get("id").and_then(Value::as_str).unwrap_or_default();
            let Some(entry) = ours.iter().find(|e| e.remote_id == id) else { continue };
            let version = task.pointer("/meta/versionId").and_then(Value::as_str);
            if version.is_some() && version == entry.version_id.as_deref() {
                continue;
            }
            report.changed += 1;
            match self.apply(&f.settings.name, entry, task, request_id, now).await.map_err(Failed::Store)? {
                Applied::Moved => report.applied += 1,
                Applied::Refused => report.refused += 1,
                Applied::Same => {}
            }
            let mut seen = entry.clone();
            seen.version_id = version.map(str::to_owned);
            self.store.save_crosswalk(&[seen], now).await.map_err(Failed::Store)?;
        }
        Ok(())
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

/// The id in a `Location` (`…/Subscription/<id>/_history/<v>` or `…/Subscription/<id>`).
fn id_in_location(location: &str) -> Option<String> {
    let parts: Vec<&str> = location.split('/').collect();
    let at = parts.iter().rposition(|p| *p == "Subscription")?;
    parts.get(at + 1).filter(|id| !id.is_empty()).map(|id| (*id).to_owned())
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
