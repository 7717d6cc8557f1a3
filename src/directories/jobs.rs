//! Directory syncs as jobs: one sync per source at a time, on every backend and across replicas (the store's
//! lease, see [`crate::store::SyncJobs`]), each recorded with its state and counts so any replica can say how it
//! is doing and how it ended.
//!
//! [`SyncRunner::start`] begins a job and runs it in the background (the API: it answers at once with the job
//! id); [`SyncRunner::run`] runs one to its end in the caller's task (the CLI and the schedule). While a sync
//! runs, a heartbeat renews its lease and records its counts; a sync whose lease was lost (it lapsed and another
//! job took it) is stopped, and so is every sync when the gateway shuts down. Each ended (or refused) sync counts
//! in `carebridge_directory_sync_runs_total{source, outcome}`; [`observe`] sets the catalog gauges `/metrics`
//! shows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use time::OffsetDateTime;
use tokio::sync::watch;
use utoipa::ToSchema;

use super::{DirectorySource, SyncError, SyncMode, SyncOptions, SyncReport};
use crate::store::{Actor, Begun, NewSyncJob, Store, StoreError, SyncJobEnd, SyncJobRow};

/// How long a lease lasts without renewal: a crashed holder blocks its source at most this long.
pub const LEASE: time::Duration = time::Duration::seconds(60);

/// How often a running sync renews its lease and records its counts.
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(15);

/// How often a read that waits for a job to end looks at it again.
pub const WAIT_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Who asked for a sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartedBy {
    /// `POST /api/v1/directories/{source}/sync`.
    Api,
    /// `carebridge directories sync`.
    Cli,
    /// The scheduled worker.
    Schedule,
}

impl StartedBy {
    /// The name recorded on the job.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            StartedBy::Api => "api",
            StartedBy::Cli => "cli",
            StartedBy::Schedule => "schedule",
        }
    }
}

/// Counts of a sync so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize, ToSchema)]
pub struct SyncProgress {
    /// Records the source listed so far.
    pub read: usize,
    /// Services seen for the first time.
    pub added: usize,
    /// Services that changed.
    pub updated: usize,
    /// Services already as the source has them.
    pub unchanged: usize,
    /// Records refused.
    pub rejected: usize,
    /// Services marked inactive (known only once the crawl is complete).
    pub deactivated: usize,
    /// Services a crawl missed that the source still has.
    pub recovered: usize,
}

impl SyncProgress {
    /// The counts of a (running or finished) report, with `read` records listed.
    #[must_use]
    pub fn of(report: &SyncReport, read: usize) -> Self {
        SyncProgress {
            read,
            added: report.added,
            updated: report.updated,
            unchanged: report.unchanged,
            rejected: report.rejected.len(),
            deactivated: report.deactivated,
            recovered: report.recovered,
        }
    }
}

/// What failed in a sync job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, ToSchema)]
pub struct JobFailure {
    /// `source` (the directory could not be read), `incomplete` (the crawl did not add up), `store` (our
    /// database failed), `lease_lost`, `stopped` (the gateway shut down) or `abandoned` (its gateway stopped
    /// before it finished).
    pub kind: String,
    /// What failed, in words (the source's failure as named by the HTTP client: timed out, refused, HTTP status
    /// with the source's body summary…); the job names the source.
    pub detail: String,
}

impl JobFailure {
    fn new(kind: &str, detail: impl Into<String>) -> Self {
        JobFailure { kind: kind.to_owned(), detail: detail.into() }
    }

    /// The failure of a sync, without the source's name (the job carries it once).
    #[must_use]
    pub fn of(error: &SyncError) -> Self {
        match error {
            SyncError::Source { error, .. } => JobFailure::new("source", error.to_string()),
            SyncError::Incomplete { reason, .. } => {
                JobFailure::new("incomplete", format!("{reason}; nothing was deactivated"))
            }
            // The database's own message may hold anything; the log has it.
            SyncError::Store(_) => JobFailure::new("store", "the gateway's database failed; see its log"),
        }
    }

    /// The `outcome` label of `carebridge_directory_sync_runs_total`.
    fn outcome(&self) -> &'static str {
        match self.kind.as_str() {
            "source" => "source_failed",
            "incomplete" => "incomplete",
            "store" => "store_failed",
            "lease_lost" => "lease_lost",
            "stopped" => "stopped",
            _ => "failed",
        }
    }
}

/// A sync job as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct SyncJob {
    /// The job's id.
    pub id: String,
    /// The configured source it syncs.
    pub source: String,
    /// `full` or `incremental`.
    pub mode: String,
    /// Whether the deactivation guard is overridden.
    pub force: bool,
    /// `api`, `cli` or `schedule`.
    pub started_by: String,
    /// `queued`, `running`, `succeeded` or `failed`.
    pub state: String,
    /// When it was asked for.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    /// When its sync started.
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub started_at: Option<OffsetDateTime>,
    /// When it ended.
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub finished_at: Option<OffsetDateTime>,
    /// When it last reported (a running job's last heartbeat).
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: OffsetDateTime,
    /// Counts so far (final once it ended).
    pub progress: SyncProgress,
    /// What the sync did, once it succeeded.
    #[schema(value_type = Option<SyncReport>)]
    pub report: Option<serde_json::Value>,
    /// What failed, once it failed.
    pub error: Option<JobFailure>,
}

impl SyncJob {
    fn from_row(row: SyncJobRow) -> Self {
        SyncJob {
            progress: serde_json::from_value(row.progress).unwrap_or_default(),
            error: row.error.and_then(|e| serde_json::from_value(e).ok()),
            id: row.id,
            source: row.source,
            mode: row.mode,
            force: row.force,
            started_by: row.started_by,
            state: row.state,
            created_at: row.created_at,
            started_at: row.started_at,
            finished_at: row.finished_at,
            updated_at: row.updated_at,
            report: row.report,
        }
    }

    /// Whether it has ended.
    #[must_use]
    pub fn finished(&self) -> bool {
        matches!(self.state.as_str(), "succeeded" | "failed")
    }
}

/// Why a sync job could not begin.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// No configured source of that name.
    #[error("no directory of that name is configured")]
    UnknownSource,
    /// Another sync of the source is running.
    #[error("a sync of {source_name} is already running as job {running}")]
    Busy {
        /// The source.
        source_name: String,
        /// The job running.
        running: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A job that holds its source's lease, ready to run.
pub struct Claimed {
    /// The job's id.
    pub id: String,
    source: Arc<dyn DirectorySource>,
    options: SyncOptions,
}

/// Runs directory syncs as jobs; shared by the API, the CLI and the scheduled worker.
#[derive(Clone)]
pub struct SyncRunner {
    store: Arc<dyn Store>,
    sources: Arc<HashMap<String, Arc<dyn DirectorySource>>>,
    stop: watch::Receiver<bool>,
    background: Arc<Mutex<tokio::task::JoinSet<()>>>,
    heartbeat: std::time::Duration,
}

impl SyncRunner {
    /// A runner over `sources`; its syncs stop when `stop` turns `true`.
    #[must_use]
    pub fn new(
        store: Arc<dyn Store>,
        sources: Arc<HashMap<String, Arc<dyn DirectorySource>>>,
        stop: watch::Receiver<bool>,
    ) -> Self {
        SyncRunner { store, sources, stop, background: Arc::default(), heartbeat: HEARTBEAT }
    }

    /// The same runner, renewing leases every `heartbeat` instead of [`HEARTBEAT`] (tests, which cannot wait).
    #[must_use]
    pub fn with_heartbeat(mut self, heartbeat: std::time::Duration) -> Self {
        self.heartbeat = heartbeat;
        self
    }

    /// The configured sources, by name.
    #[must_use]
    pub fn sources(&self) -> &HashMap<String, Arc<dyn DirectorySource>> {
        &self.sources
    }

    /// Takes `source`'s lease for a new job and records it (`queued`).
    ///
    /// # Errors
    /// `UnknownSource`; `Busy` naming the job that holds the lease; `Store`.
    pub async fn claim(
        &self,
        source: &str,
        mode: SyncMode,
        force: bool,
        started_by: StartedBy,
        by: Option<&Actor>,
        now: OffsetDateTime,
    ) -> Result<Claimed, StartError> {
        let found = self.sources.get(source).ok_or(StartError::UnknownSource)?.clone();
        let id = uuid::Uuid::new_v4().to_string();
        let job = NewSyncJob {
            id: id.clone(),
            source: source.to_owned(),
            mode: mode_name(mode).to_owned(),
            force,
            started_by: started_by.as_str().to_owned(),
            progress: progress_json(&SyncProgress::default()),
            by: by.cloned(),
        };
        match self.store.begin_directory_sync(&job, now, now + LEASE).await? {
            Begun::Started => {
                tracing::info!(source, job_id = %id, mode = mode_name(mode), started_by = started_by.as_str(), "Directory sync job started.");
                Ok(Claimed { id, source: found, options: SyncOptions { mode, force, now } })
            }
            Begun::Busy { running } => {
                metrics::counter!("carebridge_directory_sync_runs_total", "source" => source.to_owned(), "outcome" => "busy")
                    .increment(1);
                Err(StartError::Busy { source_name: source.to_owned(), running })
            }
        }
    }

    /// Begins a job and runs it in the background; returns it as recorded (`queued`).
    ///
    /// # Errors
    /// As [`SyncRunner::claim`].
    pub async fn start(
        &self,
        source: &str,
        mode: SyncMode,
        force: bool,
        started_by: StartedBy,
        by: Option<&Actor>,
        now: OffsetDateTime,
    ) -> Result<SyncJob, StartError> {
        let claimed = self.claim(source, mode, force, started_by, by, now).await?;
        // Read before the job runs, so the answer shows it as it was accepted (`queued`).
        let queued = match self.store.directory_sync_job(&claimed.id).await {
            Ok(Some(row)) => SyncJob::from_row(row),
            Ok(None) => {
                self.abandon(claimed).await;
                return Err(StartError::Store(StoreError::WriterStopped));
            }
            Err(e) => {
                self.abandon(claimed).await;
                return Err(e.into());
            }
        };
        let runner = self.clone();
        if let Ok(mut tasks) = self.background.lock() {
            // Forget the jobs that ended (a JoinSet keeps their results until joined).
            while tasks.try_join_next().is_some() {}
            tasks.spawn(async move {
                let _ = runner.run(claimed, &|_| {}).await;
            });
        }
        Ok(queued)
    }

    /// Ends a claimed job that will not run, giving its lease back.
    async fn abandon(&self, claimed: Claimed) {
        let end = SyncJobEnd {
            state: "failed",
            progress: progress_json(&SyncProgress::default()),
            report: None,
            error: serde_json::to_value(JobFailure::of(&SyncError::Store(StoreError::WriterStopped))).ok(),
        };
        let name = claimed.source.name().to_owned();
        if let Err(e) = self.store.finish_directory_sync(&name, &claimed.id, &end, OffsetDateTime::now_utc()).await {
            tracing::warn!(source = %name, job_id = %claimed.id, error = %e, "Directory sync job end not recorded; its lease will lapse.");
        }
    }

    /// Runs a claimed job to its end (renewing its lease, recording its counts), records how it ended and gives
    /// the lease back; `progress` is told the counts after each page.
    ///
    /// # Errors
    /// What failed, as the job records it.
    pub async fn run(
        &self,
        claimed: Claimed,
        progress: &(dyn Fn(&SyncProgress) + Sync),
    ) -> Result<SyncReport, JobFailure> {
        let Claimed { id, source, options } = claimed;
        let name = source.name().to_owned();
        let latest = Mutex::new(SyncProgress::default());
        let note = |p: &SyncProgress| {
            if let Ok(mut l) = latest.lock() {
                *l = p.clone();
            }
            progress(p);
        };
        let current = || latest.lock().map(|l| l.clone()).unwrap_or_default();
        let store = &*self.store;
        let renew = || renew_lease(store, &name, &id, current());
        let outcome = match renew().await {
            Ok(true) => {
                let sync = super::sync(store, &*source, options, &note);
                let heartbeat = async {
                    loop {
                        tokio::time::sleep(self.heartbeat).await;
                        match renew().await {
                            Ok(true) => {}
                            Ok(false) => return,
                            // A lease not renewed for a while lapses; until then the sync goes on.
                            Err(e) => {
                                tracing::warn!(source = %name, job_id = %id, error = %e, "Directory sync lease not renewed; will retry.")
                            }
                        }
                    }
                };
                tokio::select! {
                    result = sync => result.map_err(|e| {
                        tracing::warn!(source = %name, job_id = %id, error = %e, "Directory sync failed.");
                        JobFailure::of(&e)
                    }),
                    () = heartbeat => Err(JobFailure::new("lease_lost", "another sync took over this source's lease; this one stopped")),
                    () = stopped(self.stop.clone()) => Err(JobFailure::new("stopped", "the gateway shut down during the sync; nothing was deactivated by it after that")),
                }
            }
            Ok(false) => {
                Err(JobFailure::new("lease_lost", "another sync took over this source's lease before it started"))
            }
            Err(e) => {
                tracing::warn!(source = %name, job_id = %id, error = %e, "Directory sync job could not start.");
                Err(JobFailure::of(&SyncError::Store(e)))
            }
        };
        let end = match &outcome {
            Ok(report) => SyncJobEnd {
                state: "succeeded",
                progress: progress_json(&SyncProgress { read: current().read, ..SyncProgress::of(report, 0) }),
                report: serde_json::to_value(report).ok(),
                error: None,
            },
            Err(failure) => SyncJobEnd {
                state: "failed",
                progress: progress_json(&current()),
                report: None,
                error: serde_json::to_value(failure).ok(),
            },
        };
        let outcome_label = match &outcome {
            Ok(_) => "succeeded",
            Err(f) => f.outcome(),
        };
        metrics::counter!("carebridge_directory_sync_runs_total", "source" => name.clone(), "outcome" => outcome_label)
            .increment(1);
        if let Err(e) = store.finish_directory_sync(&name, &id, &end, OffsetDateTime::now_utc()).await {
            // The lease lapses on its own; the job stays `running` until a later sync takes the lease.
            tracing::error!(source = %name, job_id = %id, error = %e, "Directory sync job end not recorded.");
        } else {
            tracing::info!(source = %name, job_id = %id, state = end.state, "Directory sync job ended.");
        }
        outcome
    }

    /// What the last syncs of `source` left for the next one.
    ///
    /// # Errors
    /// `Database`.
    pub async fn sync_state(&self, source: &str) -> Result<Option<crate::store::DirectorySyncState>, StoreError> {
        self.store.directory_sync_state(source).await
    }

    /// One job of `source` by its id.
    ///
    /// # Errors
    /// `Database` (or a corrupt row).
    pub async fn job(&self, source: &str, id: &str) -> Result<Option<SyncJob>, StoreError> {
        Ok(self.store.directory_sync_job(id).await?.filter(|row| row.source == source).map(SyncJob::from_row))
    }

    /// One job of `source` by its id, once it has ended or `wait` has passed (whichever is first); the job may
    /// run on another replica, so the store is read again every [`WAIT_POLL`].
    ///
    /// # Errors
    /// `Database` (or a corrupt row).
    pub async fn wait_for_job(
        &self,
        source: &str,
        id: &str,
        wait: std::time::Duration,
    ) -> Result<Option<SyncJob>, StoreError> {
        let until = tokio::time::Instant::now() + wait;
        loop {
            let job = self.job(source, id).await?;
            match &job {
                Some(j) if !j.finished() && tokio::time::Instant::now() + WAIT_POLL <= until => {
                    tokio::time::sleep(WAIT_POLL).await;
                }
                _ => return Ok(job),
            }
        }
    }

    /// Waits for the background jobs, which stop once the stop signal has turned `true`.
    pub async fn wait_for_background(&self) {
        let mut tasks = match self.background.lock() {
            Ok(mut tasks) => std::mem::take(&mut *tasks),
            Err(_) => return,
        };
        while tasks.join_next().await.is_some() {}
    }
}

/// The states `carebridge_directory_services{source, state}` reports, each set (to 0 when none) at every scrape.
const SERVICE_STATES: [&str; 6] = ["active", "inactive", "defunct", "temporarily_closed", "vanished", "other"];

/// The `state` label of a kept service: `vanished` when its source no longer lists it, else its status there.
fn service_state(listed: bool, status: &str) -> &'static str {
    match (listed, status) {
        (false, _) => "vanished",
        (true, "active") => "active",
        (true, "inactive") => "inactive",
        (true, "defunct") => "defunct",
        (true, "temporarily closed") => "temporarily_closed",
        (true, _) => "other",
    }
}

/// Sets the directory gauges for `sources` at `now`: services by source and state
/// (`carebridge_directory_services`), seconds since the last complete (full) sync
/// (`carebridge_directory_last_complete_sync_age_seconds`) and the age of the incremental watermark
/// (`carebridge_directory_watermark_age_seconds`), the last two only once known. A source the store cannot
/// answer for keeps its last values (logged).
pub async fn observe<'a>(store: &dyn Store, sources: impl IntoIterator<Item = &'a str>, now: OffsetDateTime) {
    for source in sources {
        let (counts, state) =
            match (store.directory_service_counts(source).await, store.directory_sync_state(source).await) {
                (Ok(counts), Ok(state)) => (counts, state),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(source, error = %e, "Directory gauges not read.");
                    continue;
                }
            };
        let mut by_state: HashMap<&'static str, u64> = SERVICE_STATES.iter().map(|s| (*s, 0)).collect();
        for (listed, status, n) in counts {
            *by_state.entry(service_state(listed, &status)).or_default() += n;
        }
        for (label, n) in by_state {
            metrics::gauge!("carebridge_directory_services", "source" => source.to_owned(), "state" => label)
                .set(n as f64);
        }
        let state = state.unwrap_or_default();
        let age = |at: OffsetDateTime| (now - at).as_seconds_f64().max(0.0);
        if let Some(at) = state.complete_at {
            metrics::gauge!("carebridge_directory_last_complete_sync_age_seconds", "source" => source.to_owned())
                .set(age(at));
        }
        if let Some(at) = state.watermark {
            metrics::gauge!("carebridge_directory_watermark_age_seconds", "source" => source.to_owned()).set(age(at));
        }
    }
}

/// Renews a job's lease and records its counts.
async fn renew_lease(store: &dyn Store, source: &str, job: &str, progress: SyncProgress) -> Result<bool, StoreError> {
    let now = OffsetDateTime::now_utc();
    store.renew_directory_sync(source, job, &progress_json(&progress), now, now + LEASE).await
}

/// Completes when `stop` turns `true` (never, once its sender is gone without having said so).
pub async fn stopped(mut stop: watch::Receiver<bool>) {
    if stop.wait_for(|stopped| *stopped).await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn mode_name(mode: SyncMode) -> &'static str {
    match mode {
        SyncMode::Full => "full",
        SyncMode::Incremental => "incremental",
    }
}

fn progress_json(p: &SyncProgress) -> serde_json::Value {
    serde_json::to_value(p).unwrap_or_default()
}
