//! The one audit appender (see [`crate::audit`]): every entry goes in through [`SqlStore::append_audits`], on the
//! connection of the transaction whose effect it records, so the entry commits with its effect or not at all.
//!
//! Numbering and sealing (the chain's `seq`, `prev_hash`, `hash`) need one order over every writer:
//! - SQLite has one writer (`BEGIN IMMEDIATE` on a single connection): the appender reads the head and seals each
//!   entry as it inserts it.
//! - PostgreSQL, with any number of replicas, appends entries unsealed (no lock: writers never wait on one
//!   another for the chain) and a sealer numbers and hashes the committed ones in its own transaction, under a
//!   transaction-scoped advisory lock ([`CHAIN_LOCK`]) that every replica's sealer takes: the sealer of each
//!   replica runs every 200 ms, and every read of the chain seals first, so a reader sees every entry committed
//!   before it asked. An entry whose transaction commits late is sealed in the next round with the next number;
//!   numbers are given only to committed entries and in the order they are sealed, so a reader paging with
//!   `seq > cursor` never skips one. Until it is sealed (a fraction of a second) an entry is durable but not yet
//!   linked.
//!
//! (The first design held the advisory lock from the append to the commit of every write: PostgreSQL ingest fell
//! from about 1,600 to 360 writes/s at 32 connections, every commit waiting for the one before. See BENCHMARKS.md.)

use async_trait::async_trait;
use sqlx::{Postgres, Sqlite};

use super::StoreError;
use super::sql::SqlStore;
use crate::audit::{Entry, GENESIS, Sealed, seal};

/// The PostgreSQL advisory lock key of the audit chain (any constant the gateway uses for nothing else).
pub const CHAIN_LOCK: i64 = 0x6361_7265_6175_6431; // "careaud1"

/// Rows of `audit_events` as read for the chain.
type ChainRow = (
    i64,
    i64,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<String>,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
);

const CHAIN_COLUMNS: &str =
    "seq, at, actor, action, kind, record_id, version, client_id, request_id, detail, prev_hash, hash";

fn sealed(row: ChainRow) -> Sealed {
    let (seq, at, actor, action, kind, record_id, version, client, request_id, detail, prev_hash, hash) = row;
    Sealed {
        seq,
        entry: Entry { at, actor, action, kind, record_id, version, client, request_id, detail },
        prev_hash: prev_hash.unwrap_or_default(),
        hash: hash.unwrap_or_default(),
    }
}

/// Which entries an audit search wants (every field set must hold).
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// The client whose data it was.
    pub client: Option<String>,
    /// Who acted (a key's name, `outbox`…).
    pub actor: Option<String>,
    /// The record (`kind`, `id`).
    pub record: Option<(String, String)>,
    /// One of these actions (`None`: any).
    pub actions: Option<Vec<&'static str>>,
    /// Strictly after this instant (microseconds).
    pub after: Option<i64>,
    /// Strictly before this instant (microseconds).
    pub before: Option<i64>,
    /// Newest first.
    pub newest_first: bool,
    /// Entries skipped (paging).
    pub offset: u32,
    /// Most entries.
    pub limit: u32,
}

/// Reading the chain whole, in order, to verify it.
#[async_trait]
pub trait AuditChain: Send + Sync {
    /// Up to `limit` entries after `after_seq`, in order, with their links.
    ///
    /// # Errors
    /// `Database`.
    async fn audit_chain(&self, after_seq: i64, limit: u32) -> Result<Vec<Sealed>, StoreError>;

    /// Appends entries of an exchange that wrote nothing else (a read of client data, a refused key, a refused
    /// inbound request), durable before it returns. An exchange that writes appends its entries in its own
    /// transaction instead.
    ///
    /// # Errors
    /// `Database`, `WriterStopped`.
    async fn audit(&self, entries: Vec<Entry>) -> Result<(), StoreError>;

    /// The entries `query` wants, a page of them, and how many there are in all.
    ///
    /// # Errors
    /// `Database`.
    async fn search_audit(&self, query: &AuditQuery) -> Result<(Vec<Sealed>, u64), StoreError>;

    /// Seals the entries committed but not sealed yet (PostgreSQL; SQLite seals as it appends); how many.
    ///
    /// # Errors
    /// `Database`.
    async fn seal_pending(&self) -> Result<u64, StoreError>;
}

/// Appends `query`'s conditions (` WHERE …` or nothing) to `sql`.
fn conditions<DB: sqlx::Database>(sql: &mut sqlx::QueryBuilder<DB>, query: &AuditQuery)
where
    for<'t> String: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    for<'t> i64: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
{
    // Only sealed entries are in the chain.
    sql.push(" WHERE seq IS NOT NULL");
    let and = |sql: &mut sqlx::QueryBuilder<DB>| {
        sql.push(" AND ");
    };
    if let Some(client) = &query.client {
        and(sql);
        sql.push("client_id = ").push_bind(client.clone());
    }
    if let Some(actor) = &query.actor {
        and(sql);
        sql.push("actor = ").push_bind(actor.clone());
    }
    if let Some((kind, id)) = &query.record {
        and(sql);
        sql.push("kind = ").push_bind(kind.clone()).push(" AND record_id = ").push_bind(id.clone());
    }
    if let Some(actions) = &query.actions {
        and(sql);
        if actions.is_empty() {
            sql.push("1 = 0");
        } else {
            sql.push("action IN (");
            let mut list = sql.separated(", ");
            for a in actions {
                list.push_bind((*a).to_owned());
            }
            sql.push(")");
        }
    }
    if let Some(after) = query.after {
        and(sql);
        sql.push("at > ").push_bind(after);
    }
    if let Some(before) = query.before {
        and(sql);
        sql.push("at < ").push_bind(before);
    }
}

/// Most entries one sealing round numbers (the next round takes the rest).
const SEAL_BATCH: i64 = 5_000;

/// Unsealed entries as read by the sealer: their id, then what they say.
type UnsealedRow =
    (i64, i64, String, String, Option<String>, Option<String>, Option<i64>, Option<String>, String, Option<String>);

const UNSEALED_COLUMNS: &str = "id, at, actor, action, kind, record_id, version, client_id, request_id, detail";

macro_rules! impl_audit {
    ($db:ty, $begin:literal, $lock:literal) => {
        impl SqlStore<$db> {
            /// Appends `entry` on `conn`, inside the caller's transaction (which commits it with its effect).
            ///
            /// # Errors
            /// `Database`.
            pub(crate) async fn append_audit(
                conn: &mut <$db as sqlx::Database>::Connection,
                entry: &Entry,
            ) -> Result<(), StoreError> {
                Self::append_audits(conn, std::slice::from_ref(entry)).await
            }

            /// Appends `entries`, in order, on `conn` inside the caller's transaction (see the module docs for
            /// when each backend seals them).
            ///
            /// # Errors
            /// `Database`.
            pub(crate) async fn append_audits(
                conn: &mut <$db as sqlx::Database>::Connection,
                entries: &[Entry],
            ) -> Result<(), StoreError> {
                Self::insert_appended(conn, entries).await
            }

            /// Seals up to `most` unsealed entries in the order they were appended, after the chain's head; how
            /// many. The caller holds the chain's lock (SQLite: the write transaction; PostgreSQL: [`CHAIN_LOCK`]).
            async fn seal_unsealed(
                conn: &mut <$db as sqlx::Database>::Connection,
                most: i64,
            ) -> Result<u64, StoreError> {
                let head: Option<(i64, Option<String>)> = sqlx::query_as(
                    "SELECT seq, hash FROM audit_events WHERE seq IS NOT NULL ORDER BY seq DESC LIMIT 1",
                )
                .fetch_optional(&mut *conn)
                .await?;
                let (mut seq, mut prev) = head.map_or((0, GENESIS.to_owned()), |(s, h)| (s, h.unwrap_or_default()));
                let rows: Vec<UnsealedRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT {UNSEALED_COLUMNS} FROM audit_events WHERE seq IS NULL ORDER BY id LIMIT $1"
                )))
                .bind(most)
                .fetch_all(&mut *conn)
                .await?;
                let count = rows.len() as u64;
                let mut sealed_rows = Vec::with_capacity(rows.len());
                for (id, at, actor, action, kind, record_id, version, client, request_id, detail) in rows {
                    let entry = Entry { at, actor, action, kind, record_id, version, client, request_id, detail };
                    seq += 1;
                    let hash = seal(seq, &entry, &prev);
                    sealed_rows.push((id, seq, std::mem::replace(&mut prev, hash.clone()), hash));
                }
                Self::mark_sealed(conn, &sealed_rows).await?;
                Ok(count)
            }

            /// Seals every entry appended and committed but not sealed, under the chain's lock; how many.
            async fn seal_all(&self) -> Result<u64, StoreError> {
                let mut total = 0;
                loop {
                    let mut tx = self.writer().begin_with($begin).await?;
                    if !$lock.is_empty() {
                        sqlx::query($lock).bind(CHAIN_LOCK).execute(&mut *tx).await?;
                    }
                    let n = Self::seal_unsealed(&mut *tx, SEAL_BATCH).await?;
                    tx.commit().await?;
                    total += n;
                    if n < SEAL_BATCH as u64 {
                        return Ok(total);
                    }
                }
            }

            /// Seals entries kept before the chain existed (and, on PostgreSQL, any left unsealed), when the store
            /// opens.
            pub(super) async fn seal_audit_chain(&self) -> Result<(), StoreError> {
                self.seal_all().await.map(|_| ())
            }
        }

        #[async_trait]
        impl AuditChain for SqlStore<$db> {
            async fn audit_chain(&self, after_seq: i64, limit: u32) -> Result<Vec<Sealed>, StoreError> {
                self.seal_pending().await?;
                let rows: Vec<ChainRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT {CHAIN_COLUMNS} FROM audit_events WHERE seq > $1 ORDER BY seq LIMIT $2"
                )))
                .bind(after_seq)
                .bind(i64::from(limit))
                .fetch_all(self.reader())
                .await?;
                Ok(rows.into_iter().map(sealed).collect())
            }

            async fn search_audit(&self, query: &AuditQuery) -> Result<(Vec<Sealed>, u64), StoreError> {
                self.seal_pending().await?;
                let mut count = sqlx::QueryBuilder::<$db>::new("SELECT COUNT(*) FROM audit_events");
                conditions(&mut count, query);
                let (total,): (i64,) = count.build_query_as().fetch_one(self.reader()).await?;
                let mut page = sqlx::QueryBuilder::<$db>::new(format!("SELECT {CHAIN_COLUMNS} FROM audit_events"));
                conditions(&mut page, query);
                page.push(if query.newest_first { " ORDER BY seq DESC" } else { " ORDER BY seq" });
                page.push(" LIMIT ").push_bind(i64::from(query.limit));
                page.push(" OFFSET ").push_bind(i64::from(query.offset));
                let rows: Vec<ChainRow> = page.build_query_as().fetch_all(self.reader()).await?;
                Ok((rows.into_iter().map(sealed).collect(), u64::try_from(total).unwrap_or(0)))
            }

            async fn seal_pending(&self) -> Result<u64, StoreError> {
                // SQLite seals as it appends: nothing waits (entries kept before the chain were sealed at open).
                if $lock.is_empty() {
                    return Ok(0);
                }
                self.seal_all().await
            }

            async fn audit(&self, entries: Vec<Entry>) -> Result<(), StoreError> {
                if entries.is_empty() {
                    return Ok(());
                }
                if let Some(batcher) = self.batcher() {
                    return batcher.audit(entries).await;
                }
                let mut tx = self.writer().begin_with($begin).await?;
                Self::append_audits(&mut *tx, &entries).await?;
                tx.commit().await?;
                Ok(())
            }
        }
    };
}

impl_audit!(Sqlite, "BEGIN IMMEDIATE", "");
impl_audit!(Postgres, "BEGIN", "SELECT pg_advisory_xact_lock($1)");

/// SQLite: the one writer appends sealed (the head read once a transaction's entries, each linked as inserted).
impl SqlStore<Sqlite> {
    async fn insert_appended(conn: &mut sqlx::SqliteConnection, entries: &[Entry]) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let head: Option<(i64, Option<String>)> =
            sqlx::query_as("SELECT seq, hash FROM audit_events WHERE seq IS NOT NULL ORDER BY seq DESC LIMIT 1")
                .fetch_optional(&mut *conn)
                .await?;
        let (mut seq, mut prev) = head.map_or((0, GENESIS.to_owned()), |(s, h)| (s, h.unwrap_or_default()));
        for e in entries {
            seq += 1;
            let hash = seal(seq, e, &prev);
            sqlx::query(
                "INSERT INTO audit_events (seq, at, actor, action, kind, record_id, version, client_id, request_id, \
                 detail, prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            )
            .bind(seq)
            .bind(e.at)
            .bind(&e.actor)
            .bind(&e.action)
            .bind(e.kind.as_deref())
            .bind(e.record_id.as_deref())
            .bind(e.version)
            .bind(e.client.as_deref())
            .bind(&e.request_id)
            .bind(e.detail.as_deref())
            .bind(&prev)
            .bind(&hash)
            .execute(&mut *conn)
            .await?;
            prev = hash;
        }
        Ok(())
    }

    async fn mark_sealed(
        conn: &mut sqlx::SqliteConnection,
        rows: &[(i64, i64, String, String)],
    ) -> Result<(), StoreError> {
        for (id, seq, prev, hash) in rows {
            sqlx::query("UPDATE audit_events SET seq = $2, prev_hash = $3, hash = $4 WHERE id = $1")
                .bind(id)
                .bind(seq)
                .bind(prev)
                .bind(hash)
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }
}

/// PostgreSQL: entries go in unsealed, all of a transaction's in one statement (`unnest`); the sealer numbers a
/// round's entries in one statement too.
impl SqlStore<Postgres> {
    async fn insert_appended(conn: &mut sqlx::PgConnection, entries: &[Entry]) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let text = |f: &dyn Fn(&Entry) -> Option<String>| entries.iter().map(f).collect::<Vec<Option<String>>>();
        let at: Vec<i64> = entries.iter().map(|e| e.at).collect();
        let versions: Vec<Option<i64>> = entries.iter().map(|e| e.version).collect();
        sqlx::query(
            "INSERT INTO audit_events (at, actor, action, kind, record_id, version, client_id, request_id, detail) \
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], \
             $7::text[], $8::text[], $9::text[])",
        )
        .bind(&at)
        .bind(text(&|e| Some(e.actor.clone())))
        .bind(text(&|e| Some(e.action.clone())))
        .bind(text(&|e| e.kind.clone()))
        .bind(text(&|e| e.record_id.clone()))
        .bind(&versions)
        .bind(text(&|e| e.client.clone()))
        .bind(text(&|e| Some(e.request_id.clone())))
        .bind(text(&|e| e.detail.clone()))
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    async fn mark_sealed(conn: &mut sqlx::PgConnection, rows: &[(i64, i64, String, String)]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
        let seqs: Vec<i64> = rows.iter().map(|r| r.1).collect();
        let prevs: Vec<&str> = rows.iter().map(|r| r.2.as_str()).collect();
        let hashes: Vec<&str> = rows.iter().map(|r| r.3.as_str()).collect();
        sqlx::query(
            "UPDATE audit_events a SET seq = u.seq, prev_hash = u.prev_hash, hash = u.hash \
             FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[]) AS u(id, seq, prev_hash, hash) \
             WHERE a.id = u.id",
        )
        .bind(&ids)
        .bind(&seqs)
        .bind(&prevs)
        .bind(&hashes)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}
