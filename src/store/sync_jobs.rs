//! Directory sync jobs and the lease that lets one sync per source run at a time, on every backend and across
//! replicas sharing one PostgreSQL database.
//!
//! The lease is a row per source (`holder` = the job id, `expires_at`), taken by one conditional upsert that only
//! succeeds when the row is absent, expired, or already the caller's; the job that holds it renews it while its
//! sync runs, and gives it back in the same transaction that records how the job ended. A holder that crashed
//! stops renewing: its lease lapses, and the next sync to take it marks the abandoned job failed.

use async_trait::async_trait;
use serde_json::Value;
use sqlx::{Postgres, Sqlite};
use time::OffsetDateTime;

use super::sql::SqlStore;
use super::{Actor, StoreError, from_micros, to_micros};

/// A sync job to record as it starts.
#[derive(Debug, Clone)]
pub struct NewSyncJob {
    /// Its id (a UUID).
    pub id: String,
    /// The configured source.
    pub source: String,
    /// `full` or `incremental`.
    pub mode: String,
    /// Whether the deactivation guard is overridden.
    pub force: bool,
    /// `api`, `cli` or `schedule`.
    pub started_by: String,
    /// Counts so far (all zero), as JSON.
    pub progress: Value,
    /// The operator who asked for it (an API key, the command line), audited as `sync_started` when it starts;
    /// `None` for the schedule.
    pub by: Option<Actor>,
}

/// What taking a source's lease for a new job did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begun {
    /// The lease is the job's, and the job is recorded (`queued`).
    Started,
    /// Another job holds the lease: nothing was recorded.
    Busy {
        /// The job holding it.
        running: String,
    },
}

/// A sync job as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncJobRow {
    /// Its id.
    pub id: String,
    /// The configured source.
    pub source: String,
    /// `full` or `incremental`.
    pub mode: String,
    /// Whether the deactivation guard was overridden.
    pub force: bool,
    /// `api`, `cli` or `schedule`.
    pub started_by: String,
    /// `queued`, `running`, `succeeded` or `failed`.
    pub state: String,
    /// When it was asked for.
    pub created_at: OffsetDateTime,
    /// When its sync started.
    pub started_at: Option<OffsetDateTime>,
    /// When it ended.
    pub finished_at: Option<OffsetDateTime>,
    /// When its row last changed (the last heartbeat of a running job).
    pub updated_at: OffsetDateTime,
    /// Counts so far, as JSON.
    pub progress: Value,
    /// What the sync did (its report), once it succeeded.
    pub report: Option<Value>,
    /// What failed, once it failed.
    pub error: Option<Value>,
}

/// How a job ended.
#[derive(Debug, Clone)]
pub struct SyncJobEnd {
    /// `succeeded` or `failed`.
    pub state: &'static str,
    /// Final counts, as JSON.
    pub progress: Value,
    /// The report, when it succeeded.
    pub report: Option<Value>,
    /// What failed, when it failed.
    pub error: Option<Value>,
}

/// What a job's failure says when its holder stopped renewing and another job took the lease.
pub const ABANDONED: &str = "the gateway running this sync stopped before it finished (its lease expired)";

/// Sync jobs and source leases, as whole use cases.
#[async_trait]
pub trait SyncJobs: Send + Sync {
    /// Takes `job.source`'s lease for `job` until `lease_until` when it is free or expired, and records the job
    /// (`queued`), in one transaction; a job whose lease lapsed is recorded as failed ([`ABANDONED`]).
    ///
    /// # Errors
    /// `Database`.
    async fn begin_directory_sync(
        &self,
        job: &NewSyncJob,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
    ) -> Result<Begun, StoreError>;

    /// Renews `job`'s lease of `source` until `lease_until` and records its progress (the job is `running` from its
    /// first heartbeat); `false` when the job no longer holds the lease (it lapsed and another job took it).
    ///
    /// # Errors
    /// `Database`.
    async fn renew_directory_sync(
        &self,
        source: &str,
        job: &str,
        progress: &Value,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
    ) -> Result<bool, StoreError>;

    /// Records how `job` ended and gives back its lease of `source` (if it still holds it), in one transaction.
    ///
    /// # Errors
    /// `Database`.
    async fn finish_directory_sync(
        &self,
        source: &str,
        job: &str,
        end: &SyncJobEnd,
        now: OffsetDateTime,
    ) -> Result<(), StoreError>;

    /// One job by its id.
    ///
    /// # Errors
    /// `Database`, or `CorruptCatalog` when its kept JSON no longer parses.
    async fn directory_sync_job(&self, id: &str) -> Result<Option<SyncJobRow>, StoreError>;

    /// How many services of `source` the catalog keeps, by whether they are still listed (`true`) and the
    /// source's status for them.
    ///
    /// # Errors
    /// `Database`.
    async fn directory_service_counts(&self, source: &str) -> Result<Vec<(bool, String, u64)>, StoreError>;
}

type JobRow = (
    String,
    String,
    String,
    i64,
    String,
    String,
    i64,
    Option<i64>,
    Option<i64>,
    i64,
    String,
    Option<String>,
    Option<String>,
);

fn json(text: &str) -> Result<Value, StoreError> {
    serde_json::from_str(text).map_err(StoreError::CorruptCatalog)
}

fn job_row(row: JobRow) -> Result<SyncJobRow, StoreError> {
    let (id, source, mode, force, started_by, state, created, started, finished, updated, progress, report, error) =
        row;
    Ok(SyncJobRow {
        id,
        source,
        mode,
        force: force != 0,
        started_by,
        state,
        created_at: from_micros(created),
        started_at: started.map(from_micros),
        finished_at: finished.map(from_micros),
        updated_at: from_micros(updated),
        progress: json(&progress)?,
        report: report.as_deref().map(json).transpose()?,
        error: error.as_deref().map(json).transpose()?,
    })
}

macro_rules! impl_sync_jobs {
    ($db:ty, $begin:literal) => {
        #[async_trait]
        impl SyncJobs for SqlStore<$db> {
            async fn begin_directory_sync(
                &self,
                job: &NewSyncJob,
                now: OffsetDateTime,
                lease_until: OffsetDateTime,
            ) -> Result<Begun, StoreError> {
                let (now, until) = (to_micros(now), to_micros(lease_until));
                let mut tx = self.writer().begin_with($begin).await?;
                let before: Option<(String,)> =
                    sqlx::query_as("SELECT holder FROM directory_sync_leases WHERE source = $1")
                        .bind(&job.source)
                        .fetch_optional(&mut *tx)
                        .await?;
                // Atomic on both backends: the row is inserted, or updated only where the lease has lapsed; a
                // concurrent taker waits on the row and then sees the winner's expiry.
                let taken = sqlx::query(
                    "INSERT INTO directory_sync_leases (source, holder, expires_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (source) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at \
                     WHERE directory_sync_leases.expires_at <= $4",
                )
                .bind(&job.source)
                .bind(&job.id)
                .bind(until)
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                    == 1;
                if !taken {
                    let (running,): (String,) =
                        sqlx::query_as("SELECT holder FROM directory_sync_leases WHERE source = $1")
                            .bind(&job.source)
                            .fetch_one(&mut *tx)
                            .await?;
                    tx.rollback().await?;
                    return Ok(Begun::Busy { running });
                }
                if let Some((lapsed,)) = before {
                    let error = serde_json::json!({ "kind": "abandoned", "detail": ABANDONED }).to_string();
                    sqlx::query(
                        "UPDATE directory_sync_jobs SET state = 'failed', finished_at = $2, updated_at = $2, \
                         error = $3 WHERE id = $1 AND state IN ('queued', 'running')",
                    )
                    .bind(&lapsed)
                    .bind(now)
                    .bind(error)
                    .execute(&mut *tx)
                    .await?;
                }
                sqlx::query(
                    "INSERT INTO directory_sync_jobs (id, source, mode, force, started_by, state, created_at, \
                     updated_at, progress) VALUES ($1, $2, $3, $4, $5, 'queued', $6, $6, $7)",
                )
                .bind(&job.id)
                .bind(&job.source)
                .bind(&job.mode)
                .bind(i64::from(job.force))
                .bind(&job.started_by)
                .bind(now)
                .bind(job.progress.to_string())
                .execute(&mut *tx)
                .await?;
                if let Some(by) = &job.by {
                    let entry = crate::audit::Entry::new(from_micros(now), &by.key_name, "sync_started", &by.request_id)
                        .with_detail(&serde_json::json!({
                            "source": job.source, "job": job.id, "mode": job.mode, "force": job.force,
                            "started_by": job.started_by,
                        }));
                    Self::append_audit(&mut *tx, &entry).await?;
                }
                tx.commit().await?;
                Ok(Begun::Started)
            }

            async fn renew_directory_sync(
                &self,
                source: &str,
                job: &str,
                progress: &Value,
                now: OffsetDateTime,
                lease_until: OffsetDateTime,
            ) -> Result<bool, StoreError> {
                let now = to_micros(now);
                let mut tx = self.writer().begin_with($begin).await?;
                let held = sqlx::query(
                    "UPDATE directory_sync_leases SET expires_at = $3 WHERE source = $1 AND holder = $2",
                )
                .bind(source)
                .bind(job)
                .bind(to_micros(lease_until))
                .execute(&mut *tx)
                .await?
                .rows_affected()
                    == 1;
                if held {
                    sqlx::query(
                        "UPDATE directory_sync_jobs SET state = 'running', started_at = COALESCE(started_at, $2), \
                         updated_at = $2, progress = $3 WHERE id = $1 AND state IN ('queued', 'running')",
                    )
                    .bind(job)
                    .bind(now)
                    .bind(progress.to_string())
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(held)
            }

            async fn finish_directory_sync(
                &self,
                source: &str,
                job: &str,
                end: &SyncJobEnd,
                now: OffsetDateTime,
            ) -> Result<(), StoreError> {
                let now = to_micros(now);
                let mut tx = self.writer().begin_with($begin).await?;
                sqlx::query(
                    "UPDATE directory_sync_jobs SET state = $2, started_at = COALESCE(started_at, $3), \
                     finished_at = $3, updated_at = $3, progress = $4, report = $5, error = $6 WHERE id = $1",
                )
                .bind(job)
                .bind(end.state)
                .bind(now)
                .bind(end.progress.to_string())
                .bind(end.report.as_ref().map(Value::to_string))
                .bind(end.error.as_ref().map(Value::to_string))
                .execute(&mut *tx)
                .await?;
                sqlx::query("DELETE FROM directory_sync_leases WHERE source = $1 AND holder = $2")
                    .bind(source)
                    .bind(job)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn directory_sync_job(&self, id: &str) -> Result<Option<SyncJobRow>, StoreError> {
                let row: Option<JobRow> = sqlx::query_as(
                    "SELECT id, source, mode, force, started_by, state, created_at, started_at, finished_at, \
                     updated_at, progress, report, error FROM directory_sync_jobs WHERE id = $1",
                )
                .bind(id)
                .fetch_optional(self.reader())
                .await?;
                row.map(job_row).transpose()
            }

            async fn directory_service_counts(&self, source: &str) -> Result<Vec<(bool, String, u64)>, StoreError> {
                let rows: Vec<(i64, String, i64)> = sqlx::query_as(
                    "SELECT active, status, COUNT(*) FROM directory_services WHERE source = $1 GROUP BY active, status",
                )
                .bind(source)
                .fetch_all(self.reader())
                .await?;
                Ok(rows
                    .into_iter()
                    .map(|(active, status, n)| (active != 0, status, u64::try_from(n).unwrap_or(0)))
                    .collect())
            }
        }
    };
}

impl_sync_jobs!(Sqlite, "BEGIN IMMEDIATE");
impl_sync_jobs!(Postgres, "BEGIN");
