//! The one audit appender (see [`crate::audit`]): every entry goes in through [`SqlStore::append_audit`], on the
//! connection of the transaction whose effect it records, as that transaction's last statement.
//!
//! The head of the chain is read and extended under a lock held until the transaction commits: on SQLite the one
//! write transaction (`BEGIN IMMEDIATE`, a single writer connection) is that lock; on PostgreSQL a
//! transaction-scoped advisory lock ([`CHAIN_LOCK`]) that every replica on the database takes. So the chain is one
//! sequence on any number of replicas, its numbers are given in commit order, and the lock is held only from the
//! append to the commit.

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
}

/// Appends `query`'s conditions (` WHERE …` or nothing) to `sql`.
fn conditions<DB: sqlx::Database>(sql: &mut sqlx::QueryBuilder<DB>, query: &AuditQuery)
where
    for<'t> String: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    for<'t> i64: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
{
    let mut first = true;
    let mut and = |sql: &mut sqlx::QueryBuilder<DB>| {
        sql.push(if first { " WHERE " } else { " AND " });
        first = false;
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

macro_rules! impl_audit {
    ($db:ty, $begin:literal, $lock:literal) => {
        impl SqlStore<$db> {
            /// Appends `entry` to the chain on `conn`, inside the caller's transaction (which commits it with its
            /// effect); its number.
            ///
            /// # Errors
            /// `Database`.
            pub(crate) async fn append_audit(
                conn: &mut <$db as sqlx::Database>::Connection,
                entry: &Entry,
            ) -> Result<i64, StoreError> {
                Self::append_audits(conn, std::slice::from_ref(entry)).await
            }

            /// Appends `entries`, in order, to the chain on `conn` inside the caller's transaction (the head read
            /// once); the number of the last (the head's when there are none).
            ///
            /// # Errors
            /// `Database`.
            pub(crate) async fn append_audits(
                conn: &mut <$db as sqlx::Database>::Connection,
                entries: &[Entry],
            ) -> Result<i64, StoreError> {
                if !$lock.is_empty() {
                    sqlx::query($lock).bind(CHAIN_LOCK).execute(&mut *conn).await?;
                }
                let head: Option<(i64, Option<String>)> =
                    sqlx::query_as("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")
                        .fetch_optional(&mut *conn)
                        .await?;
                let (mut seq, mut prev) = match head {
                    None => (0, GENESIS.to_owned()),
                    Some((seq, Some(hash))) => (seq, hash),
                    // Entries kept before the chain, not sealed yet (the store seals them when it opens).
                    Some((seq, None)) => (seq, Self::seal_unsealed(&mut *conn).await?.unwrap_or_default()),
                };
                let mut sealed = Vec::with_capacity(entries.len());
                for entry in entries {
                    seq += 1;
                    let hash = seal(seq, entry, &prev);
                    sealed.push(Sealed {
                        seq,
                        entry: entry.clone(),
                        prev_hash: std::mem::replace(&mut prev, hash.clone()),
                        hash,
                    });
                }
                Self::insert_sealed(conn, &sealed).await?;
                Ok(seq)
            }

            /// Seals the entries kept before the chain (no hash yet), in order; the hash of the last.
            async fn seal_unsealed(
                conn: &mut <$db as sqlx::Database>::Connection,
            ) -> Result<Option<String>, StoreError> {
                let before: Option<(i64, Option<String>)> = sqlx::query_as(
                    "SELECT seq, hash FROM audit_events WHERE hash IS NOT NULL ORDER BY seq DESC LIMIT 1",
                )
                .fetch_optional(&mut *conn)
                .await?;
                let (_, mut prev) = before.map_or((0, Some(GENESIS.to_owned())), |(s, h)| (s, h));
                let rows: Vec<ChainRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT {CHAIN_COLUMNS} FROM audit_events WHERE hash IS NULL ORDER BY seq"
                )))
                .fetch_all(&mut *conn)
                .await?;
                for row in rows {
                    let e = sealed(row);
                    let p = prev.clone().unwrap_or_default();
                    let hash = seal(e.seq, &e.entry, &p);
                    sqlx::query("UPDATE audit_events SET prev_hash = $2, hash = $3 WHERE seq = $1")
                        .bind(e.seq)
                        .bind(&p)
                        .bind(&hash)
                        .execute(&mut *conn)
                        .await?;
                    prev = Some(hash);
                }
                Ok(prev)
            }

            /// Seals entries kept before the chain existed, once, when the store opens.
            pub(super) async fn seal_audit_chain(&self) -> Result<(), StoreError> {
                let mut tx = self.writer().begin_with($begin).await?;
                if !$lock.is_empty() {
                    sqlx::query($lock).bind(CHAIN_LOCK).execute(&mut *tx).await?;
                }
                Self::seal_unsealed(&mut *tx).await?;
                tx.commit().await?;
                Ok(())
            }
        }

        #[async_trait]
        impl AuditChain for SqlStore<$db> {
            async fn audit_chain(&self, after_seq: i64, limit: u32) -> Result<Vec<Sealed>, StoreError> {
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

const INSERT_ONE: &str = "INSERT INTO audit_events (seq, at, actor, action, kind, record_id, version, client_id, \
     request_id, detail, prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)";

/// SQLite: a statement per entry (in-process).
impl SqlStore<Sqlite> {
    async fn insert_sealed(conn: &mut sqlx::SqliteConnection, sealed: &[Sealed]) -> Result<(), StoreError> {
        for s in sealed {
            let e = &s.entry;
            sqlx::query(INSERT_ONE)
                .bind(s.seq)
                .bind(e.at)
                .bind(&e.actor)
                .bind(&e.action)
                .bind(e.kind.as_deref())
                .bind(e.record_id.as_deref())
                .bind(e.version)
                .bind(e.client.as_deref())
                .bind(&e.request_id)
                .bind(e.detail.as_deref())
                .bind(&s.prev_hash)
                .bind(&s.hash)
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }
}

/// PostgreSQL: one statement for every entry of a transaction (`unnest`): a settlement's entries cost one round
/// trip, not one each.
impl SqlStore<Postgres> {
    async fn insert_sealed(conn: &mut sqlx::PgConnection, sealed: &[Sealed]) -> Result<(), StoreError> {
        if sealed.is_empty() {
            return Ok(());
        }
        let column = |f: &dyn Fn(&Sealed) -> Option<String>| sealed.iter().map(f).collect::<Vec<Option<String>>>();
        let seqs: Vec<i64> = sealed.iter().map(|s| s.seq).collect();
        let at: Vec<i64> = sealed.iter().map(|s| s.entry.at).collect();
        let versions: Vec<Option<i64>> = sealed.iter().map(|s| s.entry.version).collect();
        sqlx::query(
            "INSERT INTO audit_events (seq, at, actor, action, kind, record_id, version, client_id, request_id, \
             detail, prev_hash, hash) SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], \
             $5::text[], $6::text[], $7::bigint[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[])",
        )
        .bind(&seqs)
        .bind(&at)
        .bind(column(&|s| Some(s.entry.actor.clone())))
        .bind(column(&|s| Some(s.entry.action.clone())))
        .bind(column(&|s| s.entry.kind.clone()))
        .bind(column(&|s| s.entry.record_id.clone()))
        .bind(&versions)
        .bind(column(&|s| s.entry.client.clone()))
        .bind(column(&|s| Some(s.entry.request_id.clone())))
        .bind(column(&|s| s.entry.detail.clone()))
        .bind(column(&|s| Some(s.prev_hash.clone())))
        .bind(column(&|s| Some(s.hash.clone())))
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}
