//! Delivery to partners: workers that claim outbox rows, map each record with the partner's overlay, send it
//! idempotently, and settle the row (delivered, retry at a time, held for consent, or dead for an operator).
//!
//! One attempt at one row ([`Worker::deliver`]): the version owed is read; the egress policy ([`crate::policy`])
//! decides from the client's consents and referrals what may go (held: nothing is sent; redacted: what the partner
//! may not receive is left out); what may go is mapped with what its mapping reads (the client, the client's
//! assessments and care plans, filtered by the same decision), labelled and checked; every resource must carry its business identifier; references are
//! resolved for the partner ([`plan`]); the resources go in dependency order, in parts of at most the partner's
//! `max_transaction_entries` (0: one request each). What the partner already holds at the same content is not sent
//! again; a resource it holds is updated by its id with `If-Match`; one it does not hold yet is a conditional create
//! or conditional update on the business identifier, so sending again after any failure (an answer lost after the
//! partner committed too) finds the same resource. A 412 re-reads what the partner holds and decides again, once.
//! Each part's assignments are kept (the crosswalk) before the next part goes, and the last part's with the row's
//! settlement (one transaction per claimed batch), so a retry resumes where the last attempt stopped.
//!
//! Outcomes: 2xx → delivered; a timeout, a dropped connection, 408, 429 (its `Retry-After` honoured, clamped) and
//! 5xx → retry on the configured schedule with jitter; other 4xx → dead at once with the partner's
//! `OperationOutcome` kept; the schedule spent → dead. Time is an argument (`now`): tests step the worker.

pub mod plan;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::future::OptionFuture;
use serde_json::Value;
use time::OffsetDateTime;

use crate::config::OutboxSettings;
use crate::domain::{Party, Referral, Side};
use crate::domain::{RecordId, RecordKind};
use crate::fhir::capabilities::Capabilities;
use crate::fhir::client::{FhirClient, matches};
use crate::mapping::{MapError, Mappings, Related, RequestKind};
use crate::outbound::{Failure, Reply, server_words};
use crate::partners::{PartnerSettings, Partners};
use crate::policy::{self, Decision, Facts, Policy, Profile, Recipient};
use crate::store::{AttemptRow, CrosswalkEntry, DeliveryRow, Settle, Settlement, Store, StoreError};
use plan::{Entry, PARTNER_OWNED};

/// The longest a held row waits before it is decided again (a consent or referral written wakes it sooner).
const HOLD_RECHECK_MOST: Duration = Duration::from_secs(3600);

/// The longest a finished delivery waits for its settlement while others are in flight.
const SETTLE_AFTER: Duration = Duration::from_millis(200);

/// What one run through the queue did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunReport {
    /// Rows claimed.
    pub claimed: usize,
    /// Delivered (or found unchanged).
    pub delivered: usize,
    /// To be tried again.
    pub retried: usize,
    /// Held for their consent.
    pub held: usize,
    /// Dead.
    pub dead: usize,
}

impl RunReport {
    fn add(&mut self, other: &RunReport) {
        self.claimed += other.claimed;
        self.delivered += other.delivered;
        self.retried += other.retried;
        self.held += other.held;
        self.dead += other.dead;
    }
}

/// One partner as the worker reaches it.
struct Link {
    settings: PartnerSettings,
    profile: Profile,
    client: FhirClient,
    circuit: std::sync::Mutex<Circuit>,
    /// What its server says it supports (read at start; everything assumed until then or when unreadable).
    capabilities: std::sync::RwLock<Capabilities>,
}

/// A partner's circuit: closed while it answers; opened by [`OPEN_AFTER`] attempts in a row that got no answer (or
/// 408, 429, 5xx), after
/// which its rows are left waiting and one at a time is tried (a probe) every `probe_secs`, so a partner that is
/// down costs one attempt per probe instead of one per row. Any answer closes it.
#[derive(Debug, Default)]
struct Circuit {
    /// When the next probe may go; `None`: closed.
    probe_at: Option<OffsetDateTime>,
    /// Attempts in a row that got no answer.
    unanswered: u32,
}

/// Attempts in a row without an answer that open a partner's circuit (one lost answer does not).
const OPEN_AFTER: u32 = 3;

/// What a claim may take from a partner now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admit {
    /// As many as a claim takes.
    All,
    /// One row: the probe.
    Probe,
    /// Nothing: the partner is down and the next probe is not due.
    Nothing,
}

impl Link {
    /// Most entries a transaction to it holds: its configured limit, 0 (single requests) when its server declares no
    /// transactions.
    fn transaction_limit(&self) -> u32 {
        let caps = self.capabilities.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        if caps.transaction { self.settings.max_transaction_entries } else { 0 }
    }

    /// Whether its transactions carry a Provenance: configured so (the default), and room for one beside a
    /// resource.
    fn provenance(&self) -> bool {
        self.settings.provenance && self.transaction_limit() >= 2
    }

    /// Most of our resources one transaction to it holds: its limit, less the Provenance's entry.
    fn resources_per_transaction(&self) -> u32 {
        let limit = self.transaction_limit();
        if self.provenance() { limit - 1 } else { limit }
    }

    /// What may be claimed at `now`; a probe admitted moves the next one `probe` later.
    fn admit(&self, now: OffsetDateTime, probe: Duration) -> Admit {
        let mut c = self.circuit.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match c.probe_at {
            None => Admit::All,
            Some(at) if now >= at => {
                c.probe_at = Some(now + probe);
                Admit::Probe
            }
            Some(_) => Admit::Nothing,
        }
    }

    /// Takes what an attempt found: no answer opens the circuit (`true` when it was closed); an answer closes it
    /// (`true` when it was open: the rows waiting for a retry are then due at once).
    fn observe(&self, answered: Option<bool>, now: OffsetDateTime, probe: Duration) -> CircuitChange {
        let mut c = self.circuit.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match (answered, c.probe_at) {
            (Some(false), None) => {
                c.unanswered += 1;
                if c.unanswered < OPEN_AFTER {
                    return CircuitChange::Same;
                }
                c.probe_at = Some(now + probe);
                CircuitChange::Opened
            }
            (Some(true), was) => {
                c.unanswered = 0;
                c.probe_at = None;
                if was.is_some() { CircuitChange::Closed } else { CircuitChange::Same }
            }
            _ => CircuitChange::Same,
        }
    }
}

/// How an attempt changed a partner's circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CircuitChange {
    Opened,
    Closed,
    Same,
}

/// What a verdict says of the partner's availability (see [`Settlement::partner_answered`]).
fn answered(v: &Verdict) -> Option<bool> {
    let unavailable = |status: u16| status == 408 || status == 429 || status >= 500;
    match v {
        Verdict::Delivered { .. } => Some(true),
        Verdict::Held { .. } => None,
        Verdict::Retry { detail, .. } if detail.starts_with(STORE_FAILED) => None,
        Verdict::Retry { status, .. } => Some(status.is_some_and(|s| !unavailable(s))),
        Verdict::Dead { status, .. } => status.map(|s| !unavailable(s)),
    }
}

/// How the details of our own store failures begin (they say nothing of the partner).
const STORE_FAILED: &str = "the gateway's store failed";

/// The delivery worker of one process.
pub struct Worker {
    store: Arc<dyn Store>,
    mappings: Arc<Mappings>,
    links: Vec<Link>,
    settings: OutboxSettings,
    owner: String,
}

/// How one attempt ended, before it is settled.
#[derive(Debug)]
enum Verdict {
    Delivered {
        detail: String,
        status: Option<u16>,
        unchanged: bool,
        waits_for: Vec<String>,
        /// What the last part's answer assigned, kept with the settlement (earlier parts are kept as they land).
        crosswalk: Vec<CrosswalkEntry>,
    },
    Retry {
        detail: String,
        status: Option<u16>,
        retry_after: Option<Duration>,
        operation_outcome: Option<String>,
    },
    Dead {
        detail: String,
        status: Option<u16>,
        operation_outcome: Option<String>,
    },
    Held {
        reason: String,
    },
}

impl Verdict {
    /// The gateway's own store failed (`after`: what had already happened): tried again on the schedule.
    fn store_failed(after: &str, e: &StoreError) -> Verdict {
        Verdict::Retry {
            detail: format!("{STORE_FAILED}{after}: {e}"),
            status: None,
            retry_after: None,
            operation_outcome: None,
        }
    }

    /// The verdict a partner's error answer calls for.
    fn of_reply(what: &str, reply: &Reply) -> Verdict {
        let operation_outcome = operation_outcome(&reply.body);
        let said = operation_outcome_text(&reply.body).unwrap_or_else(|| reply.summary());
        let detail = format!("{what}: HTTP {}: {said}", reply.status);
        if matches!(reply.status, 408 | 429) || (500..600).contains(&reply.status) {
            Verdict::Retry { detail, status: Some(reply.status), retry_after: reply.retry_after, operation_outcome }
        } else {
            Verdict::Dead { detail, status: Some(reply.status), operation_outcome }
        }
    }

    fn of_failure(what: &str, failure: &Failure) -> Verdict {
        let detail = format!("{what}: {failure}");
        // A write's HTTP answers are replies (`of_reply`); a failure is a request that got none, or could not be built.
        match failure {
            Failure::Build(_) => Verdict::Dead { detail, status: None, operation_outcome: None },
            // The partner's token endpoint down or refusing us says nothing against the record: tried again on the
            // schedule (an operator fixing the registration meanwhile), dead only when the schedule is spent.
            _ => Verdict::Retry { detail, status: None, retry_after: None, operation_outcome: None },
        }
    }
}

/// The longest text kept of one partner diagnostic.
const DIAGNOSTIC_CHARS: usize = 500;
/// The most issues kept of one partner `OperationOutcome`.
const KEPT_ISSUES: usize = 20;

/// The `OperationOutcome` of a body, when it is one, as kept with the attempt: its issues' severity, code,
/// diagnostics, details text and expressions, each text without control characters and capped (a partner that
/// quotes the record, or sends a newline to forge a line, gets neither into what operators read as one line).
fn operation_outcome(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    if v.get("resourceType").and_then(Value::as_str) != Some("OperationOutcome") {
        return None;
    }
    let clean = |x: Option<&Value>| x.and_then(Value::as_str).map(|t| Value::String(server_words(t, DIAGNOSTIC_CHARS)));
    let issues: Vec<Value> = v
        .get("issue")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .take(KEPT_ISSUES)
        .map(|i| {
            let mut out = serde_json::Map::new();
            for key in ["severity", "code", "diagnostics"] {
                if let Some(t) = clean(i.get(key)) {
                    out.insert(key.into(), t);
                }
            }
            if let Some(t) = clean(i.pointer("/details/text")) {
                out.insert("details".into(), serde_json::json!({ "text": t }));
            }
            let at: Vec<Value> = i
                .get("expression")
                .and_then(Value::as_array)
                .map_or(&[][..], Vec::as_slice)
                .iter()
                .take(3)
                .filter_map(|e| clean(Some(e)))
                .collect();
            if !at.is_empty() {
                out.insert("expression".into(), Value::Array(at));
            }
            Value::Object(out)
        })
        .collect();
    Some(serde_json::json!({"resourceType": "OperationOutcome", "issue": issues}).to_string())
}

/// What the log says of a failure without an HTTP answer: the gateway's own words, before the first `: ` (what was
/// being done: "POST Patient got no answer", "searching the partner's patients"); what follows may quote a server.
pub(crate) fn cause(detail: &str) -> &str {
    detail.split(": ").next().unwrap_or_default()
}

/// The code of the first issue of a kept `OperationOutcome`, and how many it has: what the log says of a partner's
/// refusal (its words stay with the attempt).
fn issue_summary(operation_outcome: Option<&str>) -> (Option<String>, usize) {
    let Some(v) = operation_outcome.and_then(|o| serde_json::from_str::<Value>(o).ok()) else { return (None, 0) };
    let issues = v.get("issue").and_then(Value::as_array).map_or(&[][..], Vec::as_slice);
    let code = issues.first().and_then(|i| i.get("code")).and_then(Value::as_str);
    // A code is a FHIR token: anything else a partner puts there is not repeated.
    let code = code.filter(|c| c.len() <= 32 && c.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'));
    (code.map(str::to_owned), issues.len())
}

/// The diagnostics of an `OperationOutcome` body, joined, without control characters and capped (the partner's
/// words about our resource, kept as data with the attempt, never logged).
fn operation_outcome_text(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let issues = v.get("issue")?.as_array()?;
    let words: Vec<String> = issues
        .iter()
        .filter_map(|i| {
            let text = i
                .get("diagnostics")
                .and_then(Value::as_str)
                .or_else(|| i.pointer("/details/text").and_then(Value::as_str))?;
            let at = i.pointer("/expression/0").and_then(Value::as_str);
            Some(match at {
                Some(at) => format!("{text} (at {at})"),
                None => text.to_owned(),
            })
        })
        .take(5)
        .collect();
    (!words.is_empty()).then(|| server_words(&words.join("; "), DIAGNOSTIC_CHARS))
}

/// Why a part could not be sent.
type PartResult = Result<(), Verdict>;

/// The state of one delivery while its parts go.
struct Sending<'a> {
    link: &'a Link,
    row: &'a DeliveryRow,
    entries: &'a [Entry],
    own: HashSet<&'a str>,
    held: HashMap<String, CrosswalkEntry>,
    sent: usize,
    requests: usize,
    logical: usize,
    waits_for: Vec<String>,
    last_status: Option<u16>,
    /// What the last part landed, not kept yet: kept before another part goes, or with the settlement.
    unsaved: Vec<CrosswalkEntry>,
    /// The gateway's side of the referral whose Task this delivery writes (`None`: not a referral): the Task is
    /// shared, so an update merges into the partner's copy ([`crate::followup::task::merge`]).
    task_side: Option<Side>,
    /// The partner's current copies of the shared Tasks it holds, by local reference, read before an update.
    theirs: HashMap<String, Value>,
}

impl Worker {
    /// A worker for the configured partners.
    ///
    /// # Errors
    /// An HTTP client that cannot be built, or a credential that cannot be read.
    pub fn new(
        store: Arc<dyn Store>,
        mappings: Arc<Mappings>,
        partners: &Partners,
        settings: &OutboxSettings,
    ) -> Result<Self, String> {
        let policy = Policy::load(&mappings.dir).map_err(|e| e.to_string())?;
        let mut links = Vec::new();
        for p in partners.iter() {
            let profile = policy
                .profile(p.policy_profile())
                .cloned()
                .ok_or_else(|| format!("partner `{}`: no policy profile `{}`", p.name, p.policy_profile()))?;
            let client = crate::fhir::auth::partner_client(p, Duration::from_secs(settings.timeout_secs))?;
            links.push(Link {
                settings: p.clone(),
                profile,
                client,
                circuit: std::sync::Mutex::default(),
                capabilities: std::sync::RwLock::new(Capabilities::assumed()),
            });
        }
        Ok(Worker { store, mappings, links, settings: settings.clone(), owner: uuid::Uuid::new_v4().to_string() })
    }

    /// One pass: for each partner, claims due rows, delivers them (up to `concurrency` at once) and settles them in
    /// one transaction.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn run_once(&self, now: OffsetDateTime) -> Result<RunReport, StoreError> {
        let mut report = RunReport::default();
        for link in &self.links {
            let lease_until = now + Duration::from_secs(self.settings.lease_secs);
            let take = match link.admit(now, Duration::from_secs(self.settings.probe_secs)) {
                Admit::All => self.settings.batch,
                Admit::Probe => 1,
                Admit::Nothing => continue,
            };
            let rows = self.store.claim_deliveries(&link.settings.name, &self.owner, take, now, lease_until).await?;
            if rows.is_empty() {
                continue;
            }
            let concurrency = usize::try_from(self.settings.concurrency).unwrap_or(1).max(1);
            let claimed = rows.len();
            let settlements: Vec<Settlement> = futures_util::stream::iter(rows)
                .map(|row| async move { self.deliver(link, &row, now).await })
                .buffer_unordered(concurrency)
                .collect()
                .await;
            for s in &settlements {
                self.after_attempt(link, s, now).await?;
            }
            let mut part = self.settle(link, settlements, now).await?;
            part.claimed = claimed;
            report.add(&part);
        }
        Ok(report)
    }

    /// Reads every partner's CapabilityStatement and delivers with what it declares from then on (a partner whose
    /// statement cannot be read keeps everything assumed); the fallbacks each partner gets, by partner.
    pub async fn read_capabilities(&self) -> Vec<(String, Result<Vec<String>, String>)> {
        let read = futures_util::future::join_all(self.links.iter().map(|l| read_capabilities(&l.client))).await;
        let mut out = Vec::new();
        for (link, read) in self.links.iter().zip(read) {
            let name = link.settings.name.clone();
            match read {
                Ok(caps) => {
                    let fallbacks = caps.fallbacks(DELIVERED_TYPES);
                    for f in &fallbacks {
                        tracing::info!(partner = %name, fallback = %f, "Partner capability: falling back.");
                    }
                    *link.capabilities.write().unwrap_or_else(std::sync::PoisonError::into_inner) = caps;
                    out.push((name, Ok(fallbacks)));
                }
                Err(e) => {
                    tracing::warn!(partner = %name, error = %e,
                        "The partner's CapabilityStatement could not be read; conditional requests are assumed.");
                    out.push((name, Err(e)));
                }
            }
        }
        out
    }

    /// Delivers until nothing is due (rows waiting for a later retry stay), every partner at once, each through
    /// `pump` at `clock()`.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn run_until_idle<C>(&self, clock: C) -> Result<RunReport, StoreError>
    where
        C: Fn() -> OffsetDateTime + Sync,
    {
        // Statistics first: a queue written in one burst is otherwise claimed by scanning it once per row.
        self.store.analyze_outbox().await?;
        let clock = &clock;
        let reports = futures_util::future::join_all(self.links.iter().map(|link| self.pump(link, clock, None))).await;
        let mut report = RunReport::default();
        for r in reports {
            report.add(&r?);
        }
        Ok(report)
    }

    /// Runs until `stopping` turns true: for each partner, `pump` until nothing is due, then a wait of
    /// `poll_ms`; beside them, the queue's statistics (every 30 s) and gauges (every 10 s).
    pub async fn run(self, stopping: tokio::sync::watch::Receiver<bool>) {
        self.read_capabilities().await;
        // A queue written in one burst before the planner has statistics of it is claimed by scanning every
        // pending row for each one (minutes per claim at 10,000 rows on PostgreSQL): refresh them every 30 s.
        if let Err(e) = self.store.analyze_outbox().await {
            tracing::warn!(error = %e, "The outbox's statistics could not be refreshed.");
        }
        let poll = Duration::from_millis(self.settings.poll_ms);
        let this = &self;
        let partners = futures_util::future::join_all(self.links.iter().map(|link| {
            let mut stopping = stopping.clone();
            async move {
                while !*stopping.borrow() {
                    let clock = OffsetDateTime::now_utc;
                    if let Err(e) = this.pump(link, &clock, Some(&stopping)).await {
                        tracing::error!(partner = %link.settings.name, error = %e,
                            "The outbox worker could not reach the store; it tries again.");
                    }
                    tokio::select! {
                        () = tokio::time::sleep(poll) => {}
                        _ = stopping.changed() => {}
                    }
                }
            }
        }));
        let mut housekeeping_stop = stopping.clone();
        let housekeeping = async move {
            let mut last_analyze = Instant::now();
            loop {
                this.publish_gauges().await;
                if last_analyze.elapsed() >= Duration::from_secs(30) {
                    last_analyze = Instant::now();
                    if let Err(e) = this.store.analyze_outbox().await {
                        tracing::warn!(error = %e, "The outbox's statistics could not be refreshed.");
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(10)) => {}
                    _ = housekeeping_stop.changed() => {}
                }
                if *housekeeping_stop.borrow() {
                    return;
                }
            }
        };
        futures_util::future::join(partners, housekeeping).await;
    }

    /// Delivers to one partner until nothing is due, or `stopping` turns true: up to `concurrency` deliveries in
    /// flight at all times, the next rows claimed while those go (a claim takes up to `batch` when fewer than
    /// `concurrency` are in hand), and finished ones settled in groups (`batch` of them, whatever has finished
    /// after [`SETTLE_AFTER`], or everything when nothing else is in hand: a settlement can make a client's next row
    /// due). Claims and settlements run beside the deliveries, one of each at a time, so a partner that answers one
    /// request at a time always has the next ones waiting while the gateway writes. On stopping, nothing more is
    /// claimed and what is in hand goes and is settled.
    ///
    /// # Errors
    /// When the store fails (the rows in hand are then given back when their lease lapses).
    async fn pump<C>(
        &self,
        link: &Link,
        clock: &C,
        stopping: Option<&tokio::sync::watch::Receiver<bool>>,
    ) -> Result<RunReport, StoreError>
    where
        C: Fn() -> OffsetDateTime + Sync,
    {
        type Pending<'f, T> = Option<std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'f>>>;
        let concurrency = usize::try_from(self.settings.concurrency).unwrap_or(1).max(1);
        let batch = self.settings.batch.max(1);
        let settle_at = usize::try_from(batch).unwrap_or(usize::MAX);
        let lease = Duration::from_secs(self.settings.lease_secs);
        let probe = Duration::from_secs(self.settings.probe_secs);
        let mut report = RunReport::default();
        let mut ready: VecDeque<DeliveryRow> = VecDeque::new();
        let mut in_flight = futures_util::stream::FuturesUnordered::new();
        let mut done: Vec<Settlement> = Vec::new();
        let mut first_done: Option<tokio::time::Instant> = None;
        let mut claiming: Pending<'_, (u64, Result<Vec<DeliveryRow>, StoreError>)> = None;
        let mut settling: Pending<'_, Result<RunReport, StoreError>> = None;
        // Settlements committed so far: a claim that began before the last of them may have missed rows it made due.
        let mut settled: u64 = 0;
        // The last claim found nothing, and nothing has been settled since it began.
        let mut dry = false;
        loop {
            let stop = stopping.is_some_and(|s| *s.borrow());
            if claiming.is_none() && !stop && !dry && ready.len() < concurrency {
                let now = clock();
                let take = match link.admit(now, probe) {
                    Admit::All => Some(batch),
                    // One row at a time while the partner is down, and only once nothing else is out.
                    Admit::Probe if in_flight.is_empty() && ready.is_empty() => Some(1),
                    Admit::Probe | Admit::Nothing => None,
                };
                match take {
                    Some(take) => {
                        let (partner, owner, began) = (&link.settings.name, &self.owner, settled);
                        claiming = Some(Box::pin(async move {
                            (began, self.store.claim_deliveries(partner, owner, take, now, now + lease).await)
                        }));
                    }
                    None => dry = true,
                }
            }
            while in_flight.len() < concurrency
                && let Some(row) = ready.pop_front()
            {
                in_flight.push(async move {
                    let now = clock();
                    self.deliver(link, &row, now).await
                });
            }
            let idle = ready.is_empty() && in_flight.is_empty() && claiming.is_none();
            if settling.is_none() && !done.is_empty() {
                let late = first_done.is_some_and(|t| t.elapsed() >= SETTLE_AFTER);
                if done.len() >= settle_at || late || idle || (ready.is_empty() && (dry || stop)) {
                    let group = std::mem::take(&mut done);
                    first_done = None;
                    settling = Some(Box::pin(self.settle(link, group, clock())));
                }
            }
            if idle && settling.is_none() && done.is_empty() && (dry || stop) {
                return Ok(report);
            }
            let deadline = first_done.map_or_else(tokio::time::Instant::now, |t| t + SETTLE_AFTER);
            tokio::select! {
                Some(s) = in_flight.next(), if !in_flight.is_empty() => {
                    first_done.get_or_insert_with(tokio::time::Instant::now);
                    self.after_attempt(link, &s, clock()).await?;
                    done.push(s);
                }
                Some((began, rows)) = OptionFuture::from(claiming.as_mut()), if claiming.is_some() => {
                    claiming = None;
                    let rows = rows?;
                    report.claimed += rows.len();
                    dry = rows.is_empty() && began == settled;
                    ready.extend(rows);
                }
                Some(part) = OptionFuture::from(settling.as_mut()), if settling.is_some() => {
                    settling = None;
                    report.add(&part?);
                    settled += 1;
                    dry = false;
                }
                () = tokio::time::sleep_until(deadline), if first_done.is_some() && settling.is_none() => {}
                // Nothing in hand, claimed or settling (returned above): not reached.
                else => return Ok(report),
            }
        }
    }

    /// Lets an attempt's outcome open or close the partner's circuit; a partner answering again has every row that
    /// waited for a retry made due at once.
    async fn after_attempt(&self, link: &Link, s: &Settlement, now: OffsetDateTime) -> Result<(), StoreError> {
        let probe = Duration::from_secs(self.settings.probe_secs);
        match link.observe(s.partner_answered, now, probe) {
            CircuitChange::Opened => {
                tracing::warn!(partner = %link.settings.name, probe_s = probe.as_secs(),
                    "Partner not answering; its deliveries wait and one is tried at a time.");
                metrics::gauge!("carebridge_partner_circuit_open", "partner" => link.settings.name.clone()).set(1.0);
            }
            CircuitChange::Closed => {
                let woken = self.store.wake_deliveries(&link.settings.name, now).await?;
                tracing::info!(partner = %link.settings.name, woken, "Partner answering again; its waiting deliveries are due.");
                metrics::gauge!("carebridge_partner_circuit_open", "partner" => link.settings.name.clone()).set(0.0);
            }
            CircuitChange::Same => {}
        }
        Ok(())
    }

    /// Settles finished deliveries in one transaction and counts them.
    async fn settle(&self, link: &Link, done: Vec<Settlement>, now: OffsetDateTime) -> Result<RunReport, StoreError> {
        let mut part = RunReport::default();
        for s in &done {
            match s.settle {
                Settle::Delivered => part.delivered += 1,
                Settle::Retry { .. } => part.retried += 1,
                Settle::Held { .. } => part.held += 1,
                Settle::Dead => part.dead += 1,
            }
            metrics::counter!("carebridge_deliveries_total", "partner" => link.settings.name.clone(),
                "outcome" => s.attempt.outcome.clone())
            .increment(1);
        }
        self.store.settle_deliveries(&self.owner, &done, now).await?;
        Ok(part)
    }

    /// Queue depth and age of the oldest row, per partner and waiting state.
    pub async fn publish_gauges(&self) {
        let Ok(depths) = self.store.queue_depth().await else { return };
        let now = OffsetDateTime::now_utc();
        for link in &self.links {
            for state in [
                crate::store::outbox::state::PENDING,
                crate::store::outbox::state::HELD,
                crate::store::outbox::state::DEAD,
            ] {
                let d = depths.iter().find(|d| d.partner == link.settings.name && d.state == state);
                let (rows, age) = d.map_or((0.0, 0.0), |d| (d.rows as f64, (now - d.oldest).as_seconds_f64().max(0.0)));
                metrics::gauge!("carebridge_outbox_rows", "partner" => link.settings.name.clone(), "state" => state)
                    .set(rows);
                metrics::gauge!("carebridge_outbox_oldest_age_seconds", "partner" => link.settings.name.clone(),
                    "state" => state)
                .set(age);
            }
        }
    }

    /// One attempt at one row, as a settlement.
    async fn deliver(&self, link: &Link, row: &DeliveryRow, now: OffsetDateTime) -> Settlement {
        let span = tracing::info_span!("delivery", seq = row.seq, kind = row.kind.as_str(), record = %row.id,
            version = row.version, partner = %row.partner);
        let started = Instant::now();
        let (verdict, decided) = tracing::Instrument::instrument(self.attempt(link, row, now), span.clone()).await;
        let elapsed = started.elapsed();
        metrics::histogram!("carebridge_delivery_attempt_seconds", "partner" => row.partner.clone())
            .record(elapsed.as_secs_f64());
        let ms = i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX);
        let attempt =
            |outcome: &str, status: Option<u16>, detail: String, operation_outcome: Option<String>| AttemptRow {
                at: now,
                ms,
                outcome: outcome.into(),
                status: status.map(i64::from),
                detail,
                operation_outcome,
            };
        let _entered = span.enter();
        let mut waits = Vec::new();
        let mut crosswalk = Vec::new();
        let mut repeat = false;
        let partner_answered = answered(&verdict);
        let (settle, attempt) = match verdict {
            Verdict::Delivered { detail, status, unchanged, waits_for, crosswalk: landed } => {
                tracing::info!(unchanged, "Delivered.");
                waits = waits_for;
                crosswalk = landed;
                (Settle::Delivered, attempt(if unchanged { "unchanged" } else { "delivered" }, status, detail, None))
            }
            Verdict::Held { reason } => {
                // Checked again after `hold_recheck_secs`, then less often the longer the row has waited (a quarter
                // of its age, at most an hour): a consent or referral written wakes it at once anyway.
                let age = (now - row.created_at).unsigned_abs();
                let base = Duration::from_secs(self.settings.hold_recheck_secs);
                let recheck_at = now + (age / 4).clamp(base, base.max(HOLD_RECHECK_MOST));
                repeat = row.state == crate::store::outbox::state::HELD && row.detail.as_deref() == Some(&reason);
                if !repeat {
                    tracing::info!(reason = %reason, "Held: not sent.");
                }
                (Settle::Held { recheck_at }, attempt("held", None, reason, None))
            }
            Verdict::Dead { detail, status, operation_outcome } => {
                // The partner's words stay with the attempt; the log says who answered what, and our own words.
                let (issue, issues) = issue_summary(operation_outcome.as_deref());
                if status.is_some() {
                    tracing::warn!(
                        status,
                        issue,
                        issues,
                        "Dead letter: the partner refused; an operator must fix and replay it."
                    );
                } else {
                    tracing::warn!(cause = %cause(&detail), "Dead letter: an operator must fix and replay it.");
                }
                (Settle::Dead, attempt("dead", status, detail, operation_outcome))
            }
            Verdict::Retry { detail, status, retry_after, operation_outcome } => {
                let attempts = usize::try_from(row.attempts).unwrap_or(usize::MAX);
                match self.settings.retry_schedule_secs.get(attempts) {
                    None => {
                        let detail = format!("out of retries after {} attempts; the last: {detail}", attempts + 1);
                        tracing::warn!(status, "Dead letter: out of retries.");
                        (Settle::Dead, attempt("dead", status, detail, operation_outcome))
                    }
                    Some(&wait) => {
                        let wait = match retry_after {
                            Some(asked) => asked.min(Duration::from_secs(self.settings.retry_after_max_secs)),
                            None => jittered(Duration::from_secs(wait)),
                        };
                        let (issue, issues) = issue_summary(operation_outcome.as_deref());
                        if status.is_some() {
                            tracing::info!(status, issue, issues, wait_s = wait.as_secs(), "Will retry.");
                        } else {
                            tracing::info!(wait_s = wait.as_secs(), cause = %cause(&detail), "Will retry.");
                        }
                        (Settle::Retry { not_before: now + wait }, attempt("retry", status, detail, operation_outcome))
                    }
                }
            }
        };
        // The audit keeps what the history keeps: each attempt, and a hold once, not each look at it again.
        let audit = (!repeat).then(|| delivery_audit(row, &attempt, decided, now));
        Settlement {
            seq: row.seq,
            settle,
            attempt,
            crosswalk,
            waits_for: waits,
            keep_attempt: !repeat,
            partner_answered,
            audit,
        }
    }

    /// One attempt's verdict, and what the egress decision said (for the audit entry), once one was made.
    async fn attempt(&self, link: &Link, row: &DeliveryRow, now: OffsetDateTime) -> (Verdict, Option<Value>) {
        let mut decided = None;
        match self.try_attempt(link, row, now, &mut decided).await {
            Ok(v) | Err(v) => (v, decided),
        }
    }

    async fn try_attempt(
        &self,
        link: &Link,
        row: &DeliveryRow,
        now: OffsetDateTime,
        decided: &mut Option<Value>,
    ) -> Result<Verdict, Verdict> {
        let store_failed = |e: StoreError| Verdict::store_failed("", &e);
        // The version owed and what the policy and the mapping read beside it, in one read.
        let client = row.client_id.as_deref().and_then(|c| RecordId::parse(c).ok());
        let (stored, others) = self
            .store
            .version_and_client_records(row.kind, &row.id, row.version, client.as_ref(), kinds_read(row.kind))
            .await
            .map_err(store_failed)?;
        let Some(stored) = stored else {
            return Err(Verdict::Dead {
                detail: format!("version {} of the record is not in the store", row.version),
                status: None,
                operation_outcome: None,
            });
        };
        let record: Value = serde_json::from_str(&stored.body).map_err(|e| Verdict::Dead {
            detail: format!("the stored record does not parse: {e}"),
            status: None,
            operation_outcome: None,
        })?;
        // A newer version that names another partner or a directory service withdraws this one from the partner.
        if let Some((_, current)) = others.iter().find(|(k, r)| *k == row.kind && r.id == row.id.as_str())
            && let Ok(body) = serde_json::from_str::<Value>(&current.body)
            && let Some(reason) = policy::withdrawn(row.kind, row.version, &body, current.meta.version, &row.partner)
        {
            *decided = Some(serde_json::json!({"decision": "hold", "reason": reason}));
            return Ok(Verdict::Held { reason });
        }
        let (related, facts) = context(row.kind, &others);
        // Whether the partner holds a version of this record already (an ended consent goes only to end it there).
        let holds_record =
            policy::partner_holds(&*self.store, &row.partner, row.kind, &row.id).await.map_err(store_failed)?;
        let recipient = Recipient { name: &link.settings.name, profile: &link.profile, holds_record };
        let release =
            match policy::decide(self.mappings.labels(), recipient, row.kind, &record, &related, &facts, now.date()) {
                Decision::Hold(reason) => {
                    *decided = Some(serde_json::json!({"decision": "hold", "reason": reason}));
                    return Ok(Verdict::Held { reason });
                }
                Decision::Send(release) => release,
            };
        let redacted = !release.left_out.is_empty();
        *decided = Some(serde_json::json!({
            "decision": if redacted { "redact" } else { "send" },
            "consents": release.consents,
            "left_out": release.left_out.iter().map(|l| l.what.as_str()).collect::<Vec<_>>(),
        }));
        let overlay = link.settings.overlay.as_deref();
        let dead = |e: MapError| Verdict::Dead { detail: map_error(&e), status: None, operation_outcome: None };
        let mut resources = self.mappings.render(row.kind, &release.record, overlay, &release.related).map_err(dead)?;
        self.mappings.label(&mut resources);
        if let Some(Value::Object(d)) = decided.as_mut() {
            let (sent, labels) = resources_and_labels(&resources);
            d.insert("resources".into(), sent.into());
            d.insert("labels".into(), labels.into());
        }
        let violations = self.mappings.check(overlay, &resources).map_err(dead)?;
        if !violations.is_empty() {
            let first: Vec<String> =
                violations.iter().take(3).map(|v| format!("{} {}: {}", v.profile, v.path, v.message)).collect();
            return Err(Verdict::Dead {
                detail: format!(
                    "the mapped resources break {} rule(s), not sent: {}",
                    violations.len(),
                    first.join("; ")
                ),
                status: None,
                operation_outcome: None,
            });
        }
        let entries = plan::entries(resources).map_err(|e| Verdict::Dead {
            detail: e.to_string(),
            status: None,
            operation_outcome: None,
        })?;
        let mut wanted: Vec<String> = entries.iter().map(|e| e.local_ref.clone()).collect();
        wanted.extend(plan::outside_references(&entries));
        let held = self.store.crosswalk(&row.partner, &wanted).await.map_err(store_failed)?;
        let mut s = Sending {
            link,
            row,
            entries: &entries,
            own: entries.iter().map(|e| e.local_ref.as_str()).collect(),
            held,
            sent: 0,
            requests: 0,
            logical: 0,
            waits_for: Vec::new(),
            last_status: None,
            unsaved: Vec::new(),
            task_side: task_side(row.kind, &release.record),
            theirs: HashMap::new(),
        };
        self.match_patients(&mut s, now).await?;
        let groups = plan::groups(&entries);
        let parts = plan::parts(&groups, link.resources_per_transaction());
        let mut deferred = Vec::new();
        for part in &parts {
            self.send_part(&mut s, part, &mut deferred, now).await?;
        }
        // Resources sent without a reference to one of this record's later parts go again, now that it landed.
        if !deferred.is_empty() {
            let again: Vec<Vec<usize>> = plan::parts(&[deferred.clone()], link.resources_per_transaction());
            let mut still = Vec::new();
            for part in &again {
                self.send_part(&mut s, part, &mut still, now).await?;
            }
        }
        let unchanged = s.requests == 0;
        let mut detail = if unchanged {
            "the partner already holds this content: nothing sent".to_owned()
        } else {
            format!(
                "{} resource(s) sent in {} request(s); {} of {} unchanged; {} reference(s) sent as logical references",
                s.sent,
                s.requests,
                entries.len().saturating_sub(s.sent),
                entries.len(),
                s.logical
            )
        };
        if !release.left_out.is_empty() {
            let said: Vec<String> = release.left_out.iter().map(|l| format!("{} ({})", l.what, l.why)).collect();
            detail = format!("redacted, {} left out: {}; {detail}", said.len(), said.join("; "));
        }
        let mut waits_for = std::mem::take(&mut s.waits_for);
        waits_for.sort();
        waits_for.dedup();
        Ok(Verdict::Delivered { detail, status: s.last_status, unchanged, waits_for, crosswalk: s.unsaved })
    }

    /// Matches the partner's own Patient by the identifiers it knows (`patient_match`): found once, it is
    /// referenced and never overwritten; found more than once, the delivery is dead (an operator decides).
    async fn match_patients(&self, s: &mut Sending<'_>, now: OffsetDateTime) -> PartResult {
        if s.link.settings.patient_match.is_empty() {
            return Ok(());
        }
        let mut found = Vec::new();
        for e in s.entries.iter().filter(|e| e.resource_type == "Patient" && !s.held.contains_key(&e.local_ref)) {
            let ids = e.resource.get("identifier").and_then(Value::as_array).cloned().unwrap_or_default();
            for id in &ids {
                let (Some(system), Some(value)) =
                    (id.get("system").and_then(Value::as_str), id.get("value").and_then(Value::as_str))
                else {
                    continue;
                };
                if !s.link.settings.patient_match.iter().any(|m| m == system) {
                    continue;
                }
                let bundle =
                    s.link.client.search("Patient", &[("identifier", format!("{system}|{value}"))]).await.map_err(
                        |e| Verdict::Retry {
                            detail: format!("searching the partner's patients: {e}"),
                            status: None,
                            retry_after: None,
                            operation_outcome: None,
                        },
                    )?;
                let hits = matches(&bundle).map_err(|e| Verdict::Retry {
                    detail: format!("searching the partner's patients: {e}"),
                    status: None,
                    retry_after: None,
                    operation_outcome: None,
                })?;
                match hits.as_slice() {
                    [] => continue,
                    [one] => {
                        let Some(id) = one.pointer("/resource/id").and_then(Value::as_str) else { continue };
                        let entry = CrosswalkEntry {
                            partner: s.row.partner.clone(),
                            local_ref: e.local_ref.clone(),
                            kind: s.row.kind,
                            record_id: s.row.id.clone(),
                            remote_type: "Patient".into(),
                            remote_id: id.to_owned(),
                            version_id: None,
                            content_hash: PARTNER_OWNED.into(),
                        };
                        found.push(entry);
                        break;
                    }
                    more => {
                        return Err(Verdict::Dead {
                            detail: format!(
                                "the partner holds {} patients with one identifier of system {system}: an operator \
                                 must say which one is the client",
                                more.len()
                            ),
                            status: None,
                            operation_outcome: None,
                        });
                    }
                }
            }
        }
        if !found.is_empty() {
            self.store.save_crosswalk(&found, now).await.map_err(|e| Verdict::store_failed("", &e))?;
            for f in found {
                s.held.insert(f.local_ref.clone(), f);
            }
        }
        Ok(())
    }

    /// Sends one part (the entries at `part` that the partner does not hold at this content), keeps what the
    /// partner assigned, and notes the entries sent without a reference to a later part in `deferred`.
    async fn send_part(
        &self,
        s: &mut Sending<'_>,
        part: &[usize],
        deferred: &mut Vec<usize>,
        now: OffsetDateTime,
    ) -> PartResult {
        let transaction = s.link.transaction_limit() > 0;
        if !s.unsaved.is_empty() {
            let keep = std::mem::take(&mut s.unsaved);
            self.store
                .save_crosswalk(&keep, now)
                .await
                .map_err(|e| Verdict::store_failed(" after the partner accepted", &e))?;
        }
        let mut refreshed = false;
        loop {
            // What goes: not partner-owned, not a create of something it holds, not identical to what it holds.
            let going: Vec<usize> = part
                .iter()
                .copied()
                .filter(|&i| {
                    let e = &s.entries[i];
                    match s.held.get(&e.local_ref) {
                        Some(h) if h.content_hash == PARTNER_OWNED || e.request == RequestKind::Create => false,
                        Some(h) => h.content_hash != fingerprint(&e.resource, &s.held),
                        // On a partner's own referral the agency answers in the partner's Task and creates nothing
                        // there.
                        None => s.task_side != Some(Side::Performer),
                    }
                })
                .collect();
            if going.is_empty() {
                return Ok(());
            }
            if self.read_shared_tasks(s, &going).await? {
                continue;
            }
            let in_part: HashSet<&str> = going.iter().map(|&i| s.entries[i].local_ref.as_str()).collect();
            let mut items = Vec::new();
            let mut part_deferred = Vec::new();
            for &i in &going {
                let e = &s.entries[i];
                let mut resource = e.resource.clone();
                let r = plan::resolve(
                    &mut resource,
                    &in_part,
                    &s.own,
                    &s.held,
                    transaction,
                    s.link.settings.conditional_references,
                );
                if r.deferred {
                    part_deferred.push(i);
                }
                s.logical += r.logical;
                s.waits_for.extend(r.waits_for);
                let held = s.held.get(&e.local_ref);
                if let (Some(side), Some(theirs)) = (s.task_side, s.theirs.get(&e.local_ref)) {
                    resource = crate::followup::task::merge(&resource, theirs, side, &|code| {
                        self.mappings.referral_status_of_task(code)
                    });
                }
                let request = {
                    let caps = s.link.capabilities.read().unwrap_or_else(std::sync::PoisonError::into_inner);
                    plan::request(e, held, &caps)
                };
                items.push((i, plan::body(resource, held), request));
            }
            let answer = if transaction {
                self.send_transaction(s, &items, now).await
            } else {
                let (i, body, request) = &items[0];
                self.send_single(s, *i, body, request).await.map(|a| vec![(*i, a)])
            };
            let assigned = match answer {
                Ok(a) => a,
                Err(Sent::Conflict(reply)) if !refreshed => {
                    refreshed = true;
                    tracing::info!(status = reply.status, "The partner's versions moved on; reading them again.");
                    self.refresh(s, &going).await?;
                    continue;
                }
                Err(Sent::Conflict(reply)) => {
                    return Err(Verdict::Dead {
                        detail: format!(
                            "the partner refused twice with 412 (its resource changed again, or several match one \
                             identifier): {}",
                            operation_outcome_text(&reply.body).unwrap_or_else(|| reply.summary())
                        ),
                        status: Some(412),
                        operation_outcome: operation_outcome(&reply.body),
                    });
                }
                Err(Sent::Failed(v)) => return Err(v),
            };
            s.requests += if transaction { 1 } else { items.len() };
            s.sent += items.len();
            // What landed, with the fingerprint of its content now that every id in this part is known.
            let mut landed = Vec::new();
            for (i, a) in assigned {
                let e = &s.entries[i];
                let entry = CrosswalkEntry {
                    partner: s.row.partner.clone(),
                    local_ref: e.local_ref.clone(),
                    kind: s.row.kind,
                    record_id: s.row.id.clone(),
                    remote_type: a.resource_type,
                    remote_id: a.id,
                    version_id: a.version_id,
                    content_hash: String::new(),
                };
                s.held.insert(entry.local_ref.clone(), entry);
                landed.push(i);
            }
            for &i in &landed {
                let hash = if part_deferred.contains(&i) {
                    String::new()
                } else {
                    fingerprint(&s.entries[i].resource, &s.held)
                };
                if let Some(h) = s.held.get_mut(&s.entries[i].local_ref) {
                    h.content_hash = hash;
                }
            }
            // Kept before the next part goes (so a retry resumes after this one), or, when this was the last,
            // with the settlement: one transaction per claimed batch instead of one per delivery.
            s.unsaved = landed.iter().filter_map(|&i| s.held.get(&s.entries[i].local_ref).cloned()).collect();
            deferred.extend(part_deferred);
            return Ok(());
        }
    }

    /// Reads the partner's current copy of each shared Task among `entries` it holds and has not been read in this
    /// delivery, so the update merges into it instead of overwriting the partner's fields; `true` when one has
    /// vanished there (the part is then planned again: it is created anew).
    async fn read_shared_tasks(&self, s: &mut Sending<'_>, entries: &[usize]) -> Result<bool, Verdict> {
        if s.task_side.is_none() {
            return Ok(false);
        }
        let unread: Vec<usize> = entries
            .iter()
            .copied()
            .filter(|&i| {
                let local = &s.entries[i].local_ref;
                s.entries[i].resource_type == "Task" && s.held.contains_key(local) && !s.theirs.contains_key(local)
            })
            .collect();
        if unread.is_empty() {
            return Ok(false);
        }
        let before = s.held.len();
        self.refresh(s, &unread).await?;
        Ok(s.held.len() != before)
    }

    /// Re-reads what the partner holds of `entries` (after a 412): new versions are kept, vanished ones forgotten.
    async fn refresh(&self, s: &mut Sending<'_>, entries: &[usize]) -> PartResult {
        for &i in entries {
            let local = &s.entries[i].local_ref;
            let Some(h) = s.held.get(local).cloned() else { continue };
            let read = s.link.client.read(&h.remote_type, &h.remote_id).await.map_err(|e| Verdict::Retry {
                detail: format!("reading {} again after a 412: {e}", h.remote_type),
                status: None,
                retry_after: None,
                operation_outcome: None,
            })?;
            match read {
                Some(r) => {
                    if let Some(entry) = s.held.get_mut(local) {
                        entry.version_id = r.pointer("/meta/versionId").and_then(Value::as_str).map(str::to_owned);
                        entry.content_hash = String::new();
                    }
                    if s.task_side.is_some() && h.remote_type == "Task" {
                        s.theirs.insert(local.clone(), r);
                    }
                }
                None => {
                    s.theirs.remove(local);
                    s.held.remove(local);
                    self.store
                        .forget_crosswalk(&s.row.partner, local)
                        .await
                        .map_err(|e| Verdict::store_failed("", &e))?;
                }
            }
        }
        Ok(())
    }

    async fn send_transaction(
        &self,
        s: &mut Sending<'_>,
        items: &[(usize, Value, plan::Request)],
        now: OffsetDateTime,
    ) -> Result<Vec<(usize, plan::Assigned)>, Sent> {
        let mut bundle = plan::transaction(
            items.iter().map(|(i, b, r)| (s.entries[*i].local_ref.clone(), b.clone(), r.clone())).collect(),
        );
        let provenance = s.link.provenance();
        if provenance {
            let targets: Vec<String> = items
                .iter()
                .map(|(i, _, r)| {
                    // Updated by its id there: named by it; created (or matched) here: by its entry's full URL.
                    if r.method == "PUT" && !r.url.contains('?') {
                        r.url.clone()
                    } else {
                        crate::mapping::bundle::full_url(&s.entries[*i].local_ref)
                    }
                })
                .collect();
            if let (Some(entry), Some(entries)) =
                (self.provenance_entry(s, &targets, now), bundle["entry"].as_array_mut())
            {
                entries.push(entry);
            }
        }
        let reply = s
            .link
            .client
            .write(reqwest::Method::POST, "", &[], &bundle)
            .await
            .map_err(|f| Sent::Failed(Verdict::of_failure("the transaction got no answer", &f)))?;
        s.last_status = Some(reply.status);
        if reply.status == 412 {
            return Err(Sent::Conflict(reply));
        }
        if !(200..300).contains(&reply.status) {
            return Err(Sent::Failed(Verdict::of_reply("the partner refused the transaction", &reply)));
        }
        let body: Value = serde_json::from_slice(&reply.body).map_err(|_| {
            Sent::Failed(Verdict::Retry {
                detail: "the transaction answer is not JSON".into(),
                status: Some(reply.status),
                retry_after: None,
                operation_outcome: None,
            })
        })?;
        let sent = bundle["entry"].as_array().map_or(0, Vec::len);
        let answers = plan::transaction_answers(&body, sent).map_err(|detail| {
            Sent::Failed(Verdict::Retry {
                detail,
                status: Some(reply.status),
                retry_after: None,
                operation_outcome: None,
            })
        })?;
        let mut out = Vec::new();
        for ((i, _, _), (status, assigned)) in items.iter().zip(answers) {
            let local = &s.entries[*i].local_ref;
            match assigned {
                Some(a) if (200..300).contains(&status) => out.push((*i, a)),
                _ => {
                    return Err(Sent::Failed(Verdict::Retry {
                        detail: format!("the transaction answer does not say what the partner assigned to {local}"),
                        status: Some(reply.status),
                        retry_after: None,
                        operation_outcome: None,
                    }));
                }
            }
        }
        Ok(out)
    }

    /// The transaction entry of the Provenance of `targets` (see [`crate::audit::provenance`]), as the partner's
    /// mapping layer names the agency; `None` when the layer lacks the names (then nothing is claimed).
    fn provenance_entry(&self, s: &Sending<'_>, targets: &[String], now: OffsetDateTime) -> Option<Value> {
        let vars = &self.mappings.set(s.link.settings.overlay.as_deref()).ok()?.vars;
        let base = vars.get("system_base")?.trim_end_matches('/');
        let organization = format!("{base}/organization");
        let device = format!("{base}/device");
        let parties = crate::audit::provenance::Parties {
            agency: (&organization, vars.get("agency_id")?),
            agency_name: vars.get("agency_name")?,
            device_system: &device,
        };
        let recorded = crate::domain::Timestamp(now).to_string();
        let resource = crate::audit::provenance::render(targets, &recorded, parties);
        // A full URL of its own: the delivery, the version and the first target make it one per transaction.
        let key = format!("Provenance/{}-{}-{}", s.row.seq, s.row.version, targets.first().map_or("", String::as_str));
        Some(serde_json::json!({
            "fullUrl": crate::mapping::bundle::full_url(&key),
            "resource": resource,
            "request": {"method": "POST", "url": "Provenance"},
        }))
    }

    async fn send_single(
        &self,
        s: &mut Sending<'_>,
        i: usize,
        body: &Value,
        request: &plan::Request,
    ) -> Result<plan::Assigned, Sent> {
        let local = &s.entries[i].local_ref;
        let method = if request.method == "POST" { reqwest::Method::POST } else { reqwest::Method::PUT };
        let mut headers = Vec::new();
        if let Some(q) = &request.if_none_exist {
            headers.push(("if-none-exist", q.clone()));
        }
        if let Some(m) = &request.if_match {
            headers.push(("if-match", m.clone()));
        }
        let what = format!("{} {}", request.method, s.entries[i].resource_type);
        let reply = s
            .link
            .client
            .write(method, &request.url, &headers, body)
            .await
            .map_err(|f| Sent::Failed(Verdict::of_failure(&format!("{what} got no answer"), &f)))?;
        s.last_status = Some(reply.status);
        if reply.status == 412 {
            return Err(Sent::Conflict(reply));
        }
        if !(200..300).contains(&reply.status) {
            return Err(Sent::Failed(Verdict::of_reply(&format!("the partner refused {what}"), &reply)));
        }
        let resource: Option<Value> = serde_json::from_slice(&reply.body).ok();
        plan::assigned(reply.location.as_deref(), reply.etag.as_deref(), resource.as_ref()).ok_or_else(|| {
            Sent::Failed(Verdict::Retry {
                detail: format!("the answer to {what} does not say what the partner assigned to {local}"),
                status: Some(reply.status),
                retry_after: None,
                operation_outcome: None,
            })
        })
    }
}

/// The gateway's side of a referral (whose Task it writes): the requester of what it refers out, the performer of
/// what a partner referred to it; `None` for other kinds.
fn task_side(kind: RecordKind, record: &Value) -> Option<Side> {
    if kind != RecordKind::Referral {
        return None;
    }
    let referral: Referral = serde_json::from_value(record.clone()).ok()?;
    let sides = referral.sides_of(Party::Agency);
    // A directory service has no Task of its own anywhere: the agency holds both sides and writes as requester.
    sides.first().copied()
}

/// The resource types deliveries write (what `check --partners` reports on).
pub const DELIVERED_TYPES: &[&str] =
    &["Patient", "Observation", "Condition", "Goal", "CarePlan", "ServiceRequest", "Task", "Consent", "Flag"];

/// A partner's CapabilityStatement (`GET <base>/metadata`).
///
/// # Errors
/// The server could not be read, or its answer is not a CapabilityStatement.
pub async fn read_capabilities(client: &FhirClient) -> Result<Capabilities, String> {
    // Our own words only (`HTTP 400`, `could not connect`): the partner's answer may quote anything.
    let statement = client.get("metadata", &[]).await.map_err(|e| cause(&e.to_string()).to_owned())?;
    Capabilities::parse(&statement.ok_or("no metadata there (404)")?)
}

/// How a send went wrong.
enum Sent {
    /// 412: what the partner holds moved on.
    Conflict(Reply),
    /// Anything else, decided.
    Failed(Verdict),
}

/// The fingerprint of what a resource says to the partner: its mapped content and the partner's ids of what it
/// references (`-` where the partner holds nothing). Equal fingerprints: nothing to send.
fn fingerprint(resource: &Value, held: &HashMap<String, CrosswalkEntry>) -> String {
    let mut refs = Vec::new();
    plan::references(resource, &mut refs);
    let mut text = plan::content_hash(resource);
    for r in refs {
        text.push('|');
        match held.get(&r) {
            Some(h) => {
                text.push_str(&h.remote_type);
                text.push('/');
                text.push_str(&h.remote_id);
            }
            None => text.push('-'),
        }
    }
    plan::content_hash(&Value::String(text))
}

fn map_error(e: &MapError) -> String {
    match e {
        MapError::Invalid(errors) => format!("the stored record is invalid ({} rule(s) broken)", errors.len()),
        other => format!("the record could not be mapped: {other}"),
    }
}

/// ±20 % of `wait`.
fn jittered(wait: Duration) -> Duration {
    let r = uuid::Uuid::new_v4().as_u128() % 4001;
    let factor = 0.8 + (r as f64) / 10_000.0;
    wait.mul_f64(factor)
}

/// The audit entry of one delivery attempt: the partner, the row, how it ended (the partner's status, never its
/// words), and what the egress decision said (send, redact or hold; the consents it rested on; the resources and
/// the security labels they carried).
fn delivery_audit(
    row: &DeliveryRow,
    attempt: &AttemptRow,
    decided: Option<Value>,
    now: OffsetDateTime,
) -> crate::audit::Entry {
    let action = match attempt.outcome.as_str() {
        "delivered" => "delivered".to_owned(),
        other => format!("delivery_{other}"),
    };
    let mut detail = serde_json::json!({"partner": row.partner, "delivery": row.seq, "outcome": attempt.outcome});
    if let Some(status) = attempt.status {
        detail["status"] = status.into();
    }
    if let (Value::Object(d), Some(Value::Object(decided))) = (&mut detail, decided) {
        d.extend(decided);
    }
    crate::audit::Entry::new(now, "outbox", &action, &format!("delivery-{}", row.seq))
        .on(row.kind.as_str(), row.id.as_str(), row.version)
        .of_client(row.client_id.as_deref())
        .with_detail(&detail)
}

/// The resources (`Type/id` as mapped) and the distinct security label codes they carry, for the audit.
fn resources_and_labels(resources: &[crate::mapping::Emitted]) -> (Vec<String>, Vec<String>) {
    let mut sent = Vec::with_capacity(resources.len());
    let mut labels = std::collections::BTreeSet::new();
    for e in resources {
        let r = &e.resource;
        if let (Some(t), Some(id)) = (r["resourceType"].as_str(), r["id"].as_str()) {
            sent.push(format!("{t}/{id}"));
        }
        for label in r["meta"]["security"].as_array().into_iter().flatten() {
            if let Some(code) = label["code"].as_str() {
                labels.insert(code.to_owned());
            }
        }
    }
    (sent, labels.into_iter().collect())
}

/// The kinds of the client's records a delivery of `kind` reads: its consents and referrals (the policy's facts),
/// and what its mapping reads: the client (care plan and referral Bundles carry its Patient), and the client's
/// assessments and care plans (the needs of an assessment or a care plan).
fn kinds_read(kind: RecordKind) -> &'static [RecordKind] {
    use RecordKind::{Assessment, CarePlan, Client, Consent, Referral};
    match kind {
        Client | Consent => &[Consent, Referral],
        Assessment => &[Consent, Referral, Assessment, CarePlan],
        CarePlan => &[Client, Consent, Referral, Assessment, CarePlan],
        Referral => &[Client, Consent, Referral],
    }
}

/// What a delivery of `kind` reads beside its record, from the client's current records (of [`kinds_read`]): the
/// mapping's related records and the policy's facts.
fn context(kind: RecordKind, records: &[(RecordKind, crate::store::StoredRecord)]) -> (Related, Facts) {
    let of = |k: RecordKind| records.iter().filter(move |(x, _)| *x == k).map(|(_, r)| r.body.as_str());
    let values = |k: RecordKind| of(k).filter_map(|b| serde_json::from_str::<Value>(b).ok()).collect::<Vec<_>>();
    let mut related = Related::default();
    if matches!(kind, RecordKind::CarePlan | RecordKind::Referral) {
        related.client = of(RecordKind::Client).find_map(|b| serde_json::from_str(b).ok());
    }
    if matches!(kind, RecordKind::Assessment | RecordKind::CarePlan) {
        related.assessments = values(RecordKind::Assessment);
        related.care_plans = values(RecordKind::CarePlan);
    }
    let facts = Facts {
        consents: of(RecordKind::Consent).filter_map(|b| serde_json::from_str(b).ok()).collect(),
        referrals: of(RecordKind::Referral).filter_map(|b| serde_json::from_str(b).ok()).collect(),
    };
    (related, facts)
}

/// What the policy and the mapping read beside a record of `kind` (agency JSON), as the store holds it now: the
/// same as a delivery reads with its version ([`kinds_read`], [`context`]), one kind at a time (preview).
///
/// # Errors
/// When the store fails.
pub async fn context_now(store: &dyn Store, kind: RecordKind, record: &Value) -> Result<(Related, Facts), StoreError> {
    let key = if kind == RecordKind::Client { "id" } else { "client_id" };
    let Some(client) = record.get(key).and_then(Value::as_str).and_then(|s| RecordId::parse(s).ok()) else {
        return Ok((Related::default(), Facts::default()));
    };
    let mut records = Vec::new();
    for &k in kinds_read(kind) {
        records.extend(crate::store::all_of_client(store, k, &client).await?.into_iter().map(|r| (k, r)));
    }
    Ok(context(kind, &records))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_a_fifth() {
        for _ in 0..200 {
            let w = jittered(Duration::from_secs(100));
            assert!(w >= Duration::from_secs(80) && w <= Duration::from_secs(120), "{w:?}");
        }
    }

    #[test]
    fn the_partners_words_are_read_from_its_operation_outcome() {
        let body = br#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"invalid",
            "diagnostics":"Missing required property","expression":["Task.status"]}]}"#;
        assert_eq!(operation_outcome_text(body).as_deref(), Some("Missing required property (at Task.status)"));
        assert!(operation_outcome(body).is_some());
        assert_eq!(operation_outcome(b"<html>"), None);
    }
}
