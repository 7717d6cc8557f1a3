//! SQLite group commit: one thread owns the single writer connection and commits the writes that arrive together
//! in one transaction, answering each caller only after that commit.
//!
//! SQLite takes one write transaction at a time, so throughput is set by how long each one holds the lock. Alone,
//! a write costs a `BEGIN`, its statements, a `COMMIT` with its `fsync`, and a round trip through the async
//! scheduler between each of them, queued behind whatever else the server is doing. Here the statements run on a
//! thread of their own, and writes that queued up while one transaction ran share the next one. Every write is
//! still whole (record, history row and audit entry together) and durable before its caller hears back. If a
//! batch fails as a whole, each of its writes is retried in a transaction of its own, so one bad write never fails
//! its neighbours.
//!
//! [`GroupCommit::stop`] ends the thread after it has committed every write already queued; later writes answer
//! `WriterStopped`. The store stops it before it checkpoints and closes the database.

use std::sync::Mutex;

use sqlx::{Sqlite, SqlitePool};
use tokio::sync::{mpsc, oneshot, watch};

use super::sql::SqlStore;
use super::{Actor, Precondition, RecordWrite, SaveOutcome, StoreError};
use crate::audit::Entry;

/// Most writes committed in one transaction; keeps a batch's lock time (and the latency of its first write) short.
const MAX_BATCH: usize = 64;

/// Writes waiting for the writer thread before callers wait to enqueue (backpressure).
const QUEUE: usize = 1024;

/// Handle to the writer thread.
pub(super) struct GroupCommit {
    jobs: mpsc::Sender<Job>,
    /// Set to `true` to make the thread finish the queue and end.
    stop: watch::Sender<bool>,
    /// Closed when the thread has ended (taken by the first `stop`).
    ended: Mutex<Option<oneshot::Receiver<()>>>,
}

/// One write the thread commits.
enum Job {
    /// A record write (with its history row, outbox rows and audit entry).
    Record {
        write: Box<RecordWrite>,
        pre: Precondition,
        actor: Actor,
        now: i64,
        reply: oneshot::Sender<Result<SaveOutcome, StoreError>>,
    },
    /// Audit entries of something that wrote nothing else (a read, a refused key).
    Audit { entries: Vec<Entry>, reply: oneshot::Sender<Result<(), StoreError>> },
}

/// What one job came to, before its caller hears it.
enum Done {
    Saved(Result<SaveOutcome, StoreError>),
    Audited,
}

impl Job {
    fn answer(self, done: Result<Done, StoreError>) {
        match self {
            Job::Record { reply, .. } => {
                let _ = reply.send(match done {
                    Ok(Done::Saved(outcome)) => outcome,
                    Ok(Done::Audited) => Err(StoreError::WriterStopped),
                    Err(e) => Err(e),
                });
            }
            Job::Audit { reply, .. } => {
                let _ = reply.send(done.map(|_| ()));
            }
        }
    }
}

impl GroupCommit {
    /// Starts the writer thread on `pool` (one connection); it stops on [`GroupCommit::stop`] or when the last
    /// handle is dropped.
    pub(super) fn start(pool: SqlitePool) -> Self {
        let (jobs, queue) = mpsc::channel(QUEUE);
        let (stop, stopping) = watch::channel(false);
        let (ended_tx, ended) = oneshot::channel::<()>();
        let spawned = std::thread::Builder::new().name("sqlite-writer".into()).spawn(move || {
            // Dropped when the thread ends, however it ends: that is what `stop` waits for.
            let _ended = ended_tx;
            match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime.block_on(run(pool, queue, stopping)),
                // Dropping the queue makes every write answer WriterStopped: loud, and nothing is half-kept.
                Err(e) => tracing::error!(error = %e, "The SQLite writer could not start; writes will fail."),
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "The SQLite writer thread could not be spawned; writes will fail.");
        }
        GroupCommit { jobs, stop, ended: Mutex::new(Some(ended)) }
    }

    /// Commits the writes already queued, ends the thread and waits for it; later writes answer `WriterStopped`.
    pub(super) async fn stop(&self) {
        let _ = self.stop.send(true);
        let ended = self.ended.lock().map(|mut e| e.take()).unwrap_or_default();
        if let Some(ended) = ended {
            // Err means the thread is gone, which is what we wait for.
            let _ = ended.await;
        }
    }

    /// Keeps one write; answers after the transaction holding it has committed.
    pub(super) async fn save(
        &self,
        write: RecordWrite,
        pre: Precondition,
        actor: Actor,
        now: i64,
    ) -> Result<SaveOutcome, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job::Record { write: Box::new(write), pre, actor, now, reply })
            .await
            .map_err(|_| StoreError::WriterStopped)?;
        answer.await.map_err(|_| StoreError::WriterStopped)?
    }

    /// Appends audit entries; answers after the transaction holding them has committed.
    pub(super) async fn audit(&self, entries: Vec<Entry>) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.jobs.send(Job::Audit { entries, reply }).await.map_err(|_| StoreError::WriterStopped)?;
        answer.await.map_err(|_| StoreError::WriterStopped)?
    }
}

async fn run(pool: SqlitePool, mut queue: mpsc::Receiver<Job>, mut stopping: watch::Receiver<bool>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut closed = false;
    loop {
        let received = tokio::select! {
            received = queue.recv_many(&mut batch, MAX_BATCH) => received,
            // Closing the queue refuses new writes; those already in it are still received, then 0 ends the loop.
            _ = stopping.wait_for(|stop| *stop), if !closed => {
                queue.close();
                closed = true;
                continue;
            }
        };
        if received == 0 {
            break;
        }
        metrics::histogram!("carebridge_db_commit_batch_writes").record(batch.len() as f64);
        match together(&pool, &batch).await {
            Ok(outcomes) => {
                for (job, outcome) in batch.drain(..).zip(outcomes) {
                    job.answer(Ok(outcome));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, writes = batch.len(), "A group commit failed; retrying its writes one by one.");
                for job in batch.drain(..) {
                    let outcome = alone(&pool, &job).await;
                    job.answer(outcome);
                }
            }
        }
    }
}

/// Every write of the batch in one transaction. A refused precondition writes nothing and is that write's answer;
/// any other error rolls the whole batch back.
async fn together(pool: &SqlitePool, batch: &[Job]) -> Result<Vec<Done>, StoreError> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let mut outcomes = Vec::with_capacity(batch.len());
    for job in batch {
        let (write, pre, actor, now) = match job {
            Job::Record { write, pre, actor, now, .. } => (write, *pre, actor, *now),
            Job::Audit { entries, .. } => {
                SqlStore::<Sqlite>::append_audits(&mut tx, entries).await?;
                outcomes.push(Done::Audited);
                continue;
            }
        };
        let mut applied = SqlStore::<Sqlite>::apply(&mut tx, write, pre, actor, now).await;
        if matches!(applied, Ok(None)) {
            // With one writer an insert cannot lose a race; should it ever, reading again settles it.
            applied = SqlStore::<Sqlite>::apply(&mut tx, write, pre, actor, now).await;
        }
        match applied {
            Ok(Some(outcome)) => outcomes.push(Done::Saved(Ok(outcome))),
            Ok(None) => outcomes.push(Done::Saved(Err(StoreError::PreconditionFailed { current: None }))),
            Err(refused @ StoreError::PreconditionFailed { .. }) => outcomes.push(Done::Saved(Err(refused))),
            Err(e) => return Err(e),
        }
    }
    tx.commit().await?;
    Ok(outcomes)
}

/// One write in a transaction of its own.
async fn alone(pool: &SqlitePool, job: &Job) -> Result<Done, StoreError> {
    let (write, pre, actor, now) = match job {
        Job::Record { write, pre, actor, now, .. } => (write, *pre, actor, *now),
        Job::Audit { entries, .. } => {
            let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
            SqlStore::<Sqlite>::append_audits(&mut tx, entries).await?;
            tx.commit().await?;
            return Ok(Done::Audited);
        }
    };
    for _ in 0..2 {
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
        if let Some(outcome) = SqlStore::<Sqlite>::apply(&mut tx, write, pre, actor, now).await? {
            tx.commit().await?;
            return Ok(Done::Saved(Ok(outcome)));
        }
    }
    Ok(Done::Saved(Err(StoreError::PreconditionFailed { current: None })))
}
