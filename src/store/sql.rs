//! The [`Store`] on sqlx, for SQLite and PostgreSQL alike.
//!
//! The schema uses only `TEXT` and `BIGINT` (times as microseconds since the epoch) and the SQL only what both
//! engines share (`$n` parameters, `ON CONFLICT DO NOTHING`), so one body of code, instantiated per backend by
//! `impl_store!`, serves both. SQLite gets one writer connection, driven by the group-commit thread
//! ([`super::group_commit`]; `BEGIN IMMEDIATE`, `synchronous=FULL` in WAL mode: a commit is on disk before we
//! answer) and a pool of read-only connections; PostgreSQL one pool, each write in its own transaction with the
//! record's row locked (`FOR UPDATE`).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Database, Pool, Postgres, Row, Sqlite};
use time::OffsetDateTime;

use super::catalog::Catalog;
use super::group_commit::GroupCommit;
use super::{
    Actor, Change, ListQuery, Page, PoolStats, Precondition, RecordMeta, RecordWrite, SaveOutcome, Store, StoreError,
    StoredRecord, VersionInfo, from_micros, to_micros,
};
use crate::domain::{RecordId, RecordKind};

/// How much of a SQLite database each reader maps into memory (address space; the pages are the OS's cache).
const READER_MMAP_BYTES: u64 = 4 << 30;

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");

/// PostgreSQL: how many times a write is tried when a concurrent insert of the same new record won the race.
const WRITE_ATTEMPTS: usize = 5;

/// A store on one sqlx backend: a pool for writes and one for reads (the same pool on PostgreSQL).
pub struct SqlStore<DB: Database> {
    writer: Pool<DB>,
    reader: Pool<DB>,
    migrator: &'static Migrator,
    /// SQLite only: the writer thread that commits concurrent writes together.
    batcher: Option<GroupCommit>,
}

/// Opens the database named by `url` (`sqlite:PATH` or `postgres://…`), applies migrations, and returns the store.
///
/// # Errors
/// `UnsupportedUrl` for another scheme, `Database` when it cannot be reached or opened, `Migrate` when the
/// schema cannot be brought up to date.
pub async fn connect(url: &str, max_connections: u32, acquire_timeout: Duration) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("sqlite:") {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        // One writer: SQLite takes one write transaction at a time anyway, and a single connection makes
        // waiting for it a queue in our pool instead of SQLITE_BUSY retries.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(acquire_timeout)
            .connect_with(options.clone())
            .await?;
        SQLITE_MIGRATIONS.run(&writer).await?;
        // Readers map the file (one copy in the OS page cache, shared by all of them, instead of a 2 MiB page
        // cache each): a catalog search touches a few thousand rows spread over the file.
        let reader = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(acquire_timeout)
            .connect_with(
                options
                    .read_only(true)
                    .pragma("mmap_size", READER_MMAP_BYTES.to_string())
                    .pragma("cache_size", "-16384"),
            )
            .await?;
        let batcher = Some(GroupCommit::start(writer.clone()));
        let store = Arc::new(SqlStore::<Sqlite> { writer, reader, migrator: &SQLITE_MIGRATIONS, batcher });
        store.fill_public_ids().await?;
        store.reindex_search_words().await?;
        store.seal_audit_chain().await?;
        Ok(store)
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(2))
            .acquire_timeout(acquire_timeout)
            .connect(url)
            .await?;
        // sqlx takes an advisory lock here, so replicas starting together apply each migration once.
        POSTGRES_MIGRATIONS.run(&pool).await?;
        let store = Arc::new(SqlStore::<Postgres> {
            writer: pool.clone(),
            reader: pool,
            migrator: &POSTGRES_MIGRATIONS,
            batcher: None,
        });
        store.fill_public_ids().await?;
        store.reindex_search_words().await?;
        store.seal_audit_chain().await?;
        Ok(store)
    } else {
        Err(StoreError::UnsupportedUrl)
    }
}

impl<DB: Database> SqlStore<DB> {
    /// The pool writes go through.
    pub(super) fn writer(&self) -> &Pool<DB> {
        &self.writer
    }

    /// The pool reads go through.
    pub(super) fn reader(&self) -> &Pool<DB> {
        &self.reader
    }

    /// SQLite: the writer thread, which commits writes queued together.
    pub(super) fn batcher(&self) -> Option<&GroupCommit> {
        self.batcher.as_ref()
    }
}

fn audit_action(change: Change, outcome: &SaveOutcome) -> &'static str {
    match (outcome, change) {
        (SaveOutcome::Unchanged(_), _) => "unchanged",
        (SaveOutcome::Created(_), Change::Seeded) => "seeded",
        (SaveOutcome::Created(_), _) => "created",
        (SaveOutcome::Replaced(_), Change::StatusChanged) => "status_changed",
        (SaveOutcome::Replaced(_), Change::Linked) => "linked",
        (SaveOutcome::Replaced(_), _) => "replaced",
    }
}

/// What the precondition check decided about the row we read.
enum Plan {
    Insert,
    Update { version: i64 },
    Unchanged(RecordMeta),
}

fn plan(current: Option<(i64, String, i64)>, pre: Precondition, body: &str) -> Result<Plan, StoreError> {
    match (current, pre) {
        (None, Precondition::Version(_) | Precondition::Exists) => {
            Err(StoreError::PreconditionFailed { current: None })
        }
        (None, _) => Ok(Plan::Insert),
        (Some((version, _, _)), Precondition::Absent) => Err(StoreError::PreconditionFailed { current: Some(version) }),
        (Some((version, _, _)), Precondition::Version(expected)) if version != expected => {
            Err(StoreError::PreconditionFailed { current: Some(version) })
        }
        (Some((version, stored, updated_at)), _) if stored == body => {
            Ok(Plan::Unchanged(RecordMeta { version, updated_at: from_micros(updated_at) }))
        }
        (Some((version, _, _)), _) => Ok(Plan::Update { version }),
    }
}

macro_rules! impl_store {
    ($db:ty, $backend:literal, $begin:literal, $lock:literal) => {
        impl SqlStore<$db> {
            /// One attempt at a write in its own transaction; `Ok(None)` when another writer got in between and
            /// we should read again.
            async fn try_save(
                &self,
                write: &RecordWrite,
                pre: Precondition,
                actor: &Actor,
                now: i64,
            ) -> Result<Option<SaveOutcome>, StoreError> {
                let mut tx = self.writer.begin_with($begin).await?;
                let outcome = Self::apply(&mut tx, write, pre, actor, now).await?;
                if outcome.is_some() {
                    tx.commit().await?;
                }
                Ok(outcome)
            }

            /// The statements of one write (record, history row, audit entry) on a connection inside a
            /// transaction the caller opened and will commit. Refused preconditions write nothing.
            pub(super) async fn apply(
                tx: &mut <$db as Database>::Connection,
                write: &RecordWrite,
                pre: Precondition,
                actor: &Actor,
                now: i64,
            ) -> Result<Option<SaveOutcome>, StoreError> {
                let current: Option<(i64, String, i64)> = sqlx::query_as(concat!(
                    "SELECT version, body, updated_at FROM records WHERE kind = $1 AND id = $2",
                    $lock
                ))
                        .bind(write.kind.as_str())
                        .bind(write.id.as_str())
                        .fetch_optional(&mut *tx)
                        .await?;
                let outcome = match plan(current, pre, &write.body)? {
                    Plan::Unchanged(meta) => SaveOutcome::Unchanged(meta),
                    Plan::Insert => {
                        let done = sqlx::query(
                            "INSERT INTO records (kind, id, version, body, client_id, status, created_at, updated_at, updated_by, \
                             direction) VALUES ($1, $2, 1, $3, $4, $5, $6, $6, $7, $8) ON CONFLICT (kind, id) DO NOTHING",
                        )
                        .bind(write.kind.as_str())
                        .bind(write.id.as_str())
                        .bind(&write.body)
                        .bind(write.client_id.as_ref().map(RecordId::as_str))
                        .bind(write.status)
                        .bind(now)
                        .bind(&actor.key_name)
                        .bind(write.direction)
                        .execute(&mut *tx)
                        .await?;
                        if done.rows_affected() == 0 {
                            return Ok(None);
                        }
                        SaveOutcome::Created(RecordMeta { version: 1, updated_at: from_micros(now) })
                    }
                    Plan::Update { version } => {
                        let done = sqlx::query(
                            "UPDATE records SET version = $3, body = $4, client_id = $5, status = $6, updated_at = $7, \
                             updated_by = $8, direction = $10 WHERE kind = $1 AND id = $2 AND version = $9",
                        )
                        .bind(write.kind.as_str())
                        .bind(write.id.as_str())
                        .bind(version + 1)
                        .bind(&write.body)
                        .bind(write.client_id.as_ref().map(RecordId::as_str))
                        .bind(write.status)
                        .bind(now)
                        .bind(&actor.key_name)
                        .bind(version)
                        .bind(write.direction)
                        .execute(&mut *tx)
                        .await?;
                        if done.rows_affected() == 0 {
                            return Ok(None);
                        }
                        SaveOutcome::Replaced(RecordMeta { version: version + 1, updated_at: from_micros(now) })
                    }
                };
                let action = audit_action(write.change, &outcome);
                let version = outcome.meta().version;
                if !matches!(outcome, SaveOutcome::Unchanged(_)) {
                    sqlx::query(
                        "INSERT INTO record_versions (kind, id, version, body, action, changed_at, changed_by, request_id, \
                         partner) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    )
                    .bind(write.kind.as_str())
                    .bind(write.id.as_str())
                    .bind(version)
                    .bind(&write.body)
                    .bind(action)
                    .bind(now)
                    .bind(&actor.key_name)
                    .bind(&actor.request_id)
                    .bind(actor.partner.as_deref())
                    .execute(&mut *tx)
                    .await?;
                }
                if !matches!(outcome, SaveOutcome::Unchanged(_)) {
                    sqlx::query("DELETE FROM record_keys WHERE kind = $1 AND id = $2")
                        .bind(write.kind.as_str())
                        .bind(write.id.as_str())
                        .execute(&mut *tx)
                        .await?;
                    for (system, value) in &write.keys {
                        sqlx::query(
                            "INSERT INTO record_keys (kind, system, value, id) VALUES ($1, $2, $3, $4) \
                             ON CONFLICT DO NOTHING",
                        )
                        .bind(write.kind.as_str())
                        .bind(system)
                        .bind(value)
                        .bind(write.id.as_str())
                        .execute(&mut *tx)
                        .await?;
                    }
                }
                if !matches!(outcome, SaveOutcome::Unchanged(_)) {
                    // A client's own rows carry its id: the client's other kinds wait for them.
                    let client = write.client();
                    for partner in &write.deliver_to {
                        sqlx::query(
                            "INSERT INTO outbox (kind, id, version, partner, client_id, rank, state, not_before, \
                             created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $7, $7)",
                        )
                        .bind(write.kind.as_str())
                        .bind(write.id.as_str())
                        .bind(version)
                        .bind(partner)
                        .bind(client.map(RecordId::as_str))
                        .bind(super::outbox::rank(write.kind))
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                    }
                    if !write.crosswalk.is_empty() {
                        Self::put_crosswalk(&mut *tx, &write.crosswalk, now).await?;
                    }
                    // The client's held rows are looked at again at once when the policy says this write may
                    // change their decision (the worker decides anew; one still withheld is held again).
                    if write.reopens_held
                        && let Some(client) = client
                    {
                        sqlx::query(
                            "UPDATE outbox SET not_before = $1 WHERE state = 'held' AND client_id = $2 AND not_before > $1",
                        )
                        .bind(now)
                        .bind(client.as_str())
                        .execute(&mut *tx)
                        .await?;
                    }
                }
                let mut entry = crate::audit::Entry::new(from_micros(now), &actor.key_name, action, &actor.request_id)
                    .on(write.kind.as_str(), write.id.as_str(), version)
                    .of_client(write.client().map(RecordId::as_str));
                if let Some(partner) = &actor.partner {
                    entry = entry.with_detail(&serde_json::json!({"partner": partner}));
                }
                Self::append_audit(&mut *tx, &entry).await?;
                Ok(Some(outcome))
            }
        }

        #[async_trait]
        impl Store for SqlStore<$db> {
            fn backend(&self) -> &'static str {
                $backend
            }

            async fn save_record(
                &self,
                write: &RecordWrite,
                pre: Precondition,
                actor: &Actor,
                now: OffsetDateTime,
            ) -> Result<SaveOutcome, StoreError> {
                let now = to_micros(now);
                if let Some(batcher) = &self.batcher {
                    return batcher.save(write.clone(), pre, actor.clone(), now).await;
                }
                for _ in 1..WRITE_ATTEMPTS {
                    if let Some(outcome) = self.try_save(write, pre, actor, now).await? {
                        return Ok(outcome);
                    }
                }
                match self.try_save(write, pre, actor, now).await? {
                    Some(outcome) => Ok(outcome),
                    None => Err(StoreError::PreconditionFailed { current: None }),
                }
            }

            async fn get_record(&self, kind: RecordKind, id: &RecordId) -> Result<Option<StoredRecord>, StoreError> {
                let row = sqlx::query("SELECT id, version, updated_at, body FROM records WHERE kind = $1 AND id = $2")
                    .bind(kind.as_str())
                    .bind(id.as_str())
                    .fetch_optional(&self.reader)
                    .await?;
                row.map(|r| stored_record(&r)).transpose()
            }

            async fn get_version(
                &self,
                kind: RecordKind,
                id: &RecordId,
                version: i64,
            ) -> Result<Option<StoredRecord>, StoreError> {
                let row = sqlx::query(
                    "SELECT id, version, changed_at, body FROM record_versions WHERE kind = $1 AND id = $2 AND version = $3",
                )
                .bind(kind.as_str())
                .bind(id.as_str())
                .bind(version)
                .fetch_optional(&self.reader)
                .await?;
                row.map(|r| stored_record(&r)).transpose()
            }

            async fn version_and_client_records(
                &self,
                kind: RecordKind,
                id: &RecordId,
                version: i64,
                client: Option<&RecordId>,
                kinds: &[RecordKind],
            ) -> Result<(Option<StoredRecord>, Vec<(RecordKind, StoredRecord)>), StoreError> {
                // Five kind slots; an unused one names no kind.
                let mut slots = ["", "", "", "", ""];
                for (slot, k) in slots.iter_mut().zip(kinds) {
                    *slot = k.as_str();
                }
                let rows = sqlx::query(
                    "SELECT '' AS kind, id, version, changed_at, body FROM record_versions \
                     WHERE kind = $1 AND id = $2 AND version = $3 \
                     UNION ALL SELECT kind, id, version, updated_at, body FROM records \
                     WHERE kind IN ($5, $6, $7, $8, $9) AND client_id = $4",
                )
                .bind(kind.as_str())
                .bind(id.as_str())
                .bind(version)
                .bind(client.map(RecordId::as_str))
                .bind(slots[0])
                .bind(slots[1])
                .bind(slots[2])
                .bind(slots[3])
                .bind(slots[4])
                .fetch_all(&self.reader)
                .await?;
                let mut owed = None;
                let mut others = Vec::new();
                for r in &rows {
                    let k: String = r.try_get(0)?;
                    let stored = StoredRecord {
                        id: r.try_get(1)?,
                        meta: RecordMeta { version: r.try_get(2)?, updated_at: from_micros(r.try_get(3)?) },
                        body: r.try_get(4)?,
                    };
                    match RecordKind::from_name(&k) {
                        Some(k) => others.push((k, stored)),
                        None => owed = Some(stored),
                    }
                }
                Ok((owed, others))
            }

            async fn list_records(&self, q: &ListQuery) -> Result<Page, StoreError> {
                // A client's records are read on every delivery (its consents and referrals, what a mapping reads):
                // with the client named the statement says so plainly, so the planner walks `records_by_client`
                // instead of every record of the kind (`$2 IS NULL OR …` hides the index from it).
                let sql = if q.client_id.is_some() {
                    "SELECT id, version, updated_at, body FROM records WHERE kind = $1 \
                     AND client_id = $2 AND ($3 IS NULL OR status = $3) \
                     AND ($4 IS NULL OR updated_at >= $4) AND ($5 IS NULL OR id > $5) \
                     AND ($7 IS NULL OR direction = $7) ORDER BY id LIMIT $6"
                } else {
                    "SELECT id, version, updated_at, body FROM records WHERE kind = $1 \
                     AND ($2 IS NULL OR client_id = $2) AND ($3 IS NULL OR status = $3) \
                     AND ($4 IS NULL OR updated_at >= $4) AND ($5 IS NULL OR id > $5) \
                     AND ($7 IS NULL OR direction = $7) ORDER BY id LIMIT $6"
                };
                let rows = sqlx::query(sql)
                .bind(q.kind.as_str())
                .bind(q.client_id.as_ref().map(RecordId::as_str))
                .bind(q.status.as_deref())
                .bind(q.updated_since.map(to_micros))
                .bind(q.after.as_deref())
                .bind(i64::from(q.limit) + 1)
                .bind(q.direction)
                .fetch_all(&self.reader)
                .await?;
                let mut items = rows.iter().map(stored_record).collect::<Result<Vec<_>, _>>()?;
                let more = items.len() > q.limit as usize;
                items.truncate(q.limit as usize);
                let next_after = if more { items.last().map(|r| r.id.clone()) } else { None };
                Ok(Page { items, next_after })
            }

            async fn history(&self, kind: RecordKind, id: &RecordId) -> Result<Vec<VersionInfo>, StoreError> {
                let rows = sqlx::query(
                    "SELECT version, action, changed_at, changed_by, request_id, partner, body FROM record_versions \
                     WHERE kind = $1 AND id = $2 ORDER BY version",
                )
                .bind(kind.as_str())
                .bind(id.as_str())
                .fetch_all(&self.reader)
                .await?;
                rows.iter()
                    .map(|r| {
                        Ok(VersionInfo {
                            version: r.try_get(0)?,
                            change: r.try_get(1)?,
                            changed_at: from_micros(r.try_get(2)?),
                            changed_by: r.try_get(3)?,
                            request_id: r.try_get(4)?,
                            partner: r.try_get(5)?,
                            body: r.try_get(6)?,
                        })
                    })
                    .collect()
            }

            async fn find_by_key(
                &self,
                kind: RecordKind,
                system: &str,
                value: &str,
            ) -> Result<Vec<String>, StoreError> {
                let rows: Vec<(String,)> =
                    sqlx::query_as("SELECT id FROM record_keys WHERE kind = $1 AND system = $2 AND value = $3 ORDER BY id")
                        .bind(kind.as_str())
                        .bind(system)
                        .bind(value)
                        .fetch_all(&self.reader)
                        .await?;
                Ok(rows.into_iter().map(|(id,)| id).collect())
            }

            async fn readiness(&self) -> Result<(), StoreError> {
                let applied: Option<i64> =
                    sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
                        .fetch_one(&self.reader)
                        .await?;
                let expected = self.migrator.iter().map(|m| m.version).max().unwrap_or(0);
                if applied.unwrap_or(0) < expected {
                    return Err(StoreError::NotMigrated { applied, expected });
                }
                Ok(())
            }

            fn pool_stats(&self) -> Vec<PoolStats> {
                let stats = |pool: &'static str, p: &Pool<$db>| PoolStats {
                    pool,
                    size: p.size(),
                    idle: u32::try_from(p.num_idle()).unwrap_or(u32::MAX),
                };
                if $backend == "sqlite" {
                    vec![stats("writer", &self.writer), stats("reader", &self.reader)]
                } else {
                    vec![stats("shared", &self.writer)]
                }
            }

            async fn close(&self) {
                // SQLite removes the -wal and -shm files only when the last connection to close can write: so the
                // writer thread finishes its queue, the read-only readers go first, the WAL is folded into the
                // database, and the writer closes last. (On PostgreSQL both are the same pool.)
                if let Some(batcher) = &self.batcher {
                    batcher.stop().await;
                }
                self.reader.close().await;
                if $backend == "sqlite" {
                    if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(&self.writer).await {
                        tracing::warn!(error = %e, "The WAL could not be checkpointed at close; it is replayed at the next start.");
                    }
                }
                self.writer.close().await;
            }
        }
    };
}

fn stored_record<R: Row>(r: &R) -> Result<StoredRecord, StoreError>
where
    usize: sqlx::ColumnIndex<R>,
    String: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(StoredRecord {
        id: r.try_get(0)?,
        meta: RecordMeta { version: r.try_get(1)?, updated_at: from_micros(r.try_get(2)?) },
        body: r.try_get(3)?,
    })
}

// SQLite: the write transaction itself is the lock (one writer connection, BEGIN IMMEDIATE).
impl_store!(Sqlite, "sqlite", "BEGIN IMMEDIATE", "");
// PostgreSQL: writers of the same record queue on its row lock instead of racing and retrying.
impl_store!(Postgres, "postgres", "BEGIN", " FOR UPDATE");
