//! The outbox as a queue, and the crosswalk of what each partner holds.
//!
//! Every new version of a record owes one row per partner that receives it (written with the record, see
//! [`super::RecordWrite::deliver_to`]). Workers take due rows with a lease (`lease_owner`, `lease_until`: a
//! crashed worker's rows come back once the lease lapses), deliver them and settle them in batches. A claim takes,
//! per record and partner, only the newest version waiting and only when no older one is in flight; the older
//! versions it passes over are `superseded` (never v2 before v1, never v1 after v2). A client's rows go in rank
//! order (client → consent → assessment → care plan → referral): a row waits while an earlier rank of the same
//! client and partner is pending, so what a record references is delivered, and in the crosswalk, before it. On
//! PostgreSQL the claim locks with `FOR UPDATE SKIP LOCKED`, so replicas share the queue without taking a row twice.

use std::collections::HashMap;

use async_trait::async_trait;
use sqlx::{Postgres, Sqlite};
use time::OffsetDateTime;

use super::sql::SqlStore;
use super::{Actor, StoreError, from_micros, to_micros};
use crate::domain::{RecordId, RecordKind};

/// The rank of a kind in a client's delivery order: lower ranks go first.
#[must_use]
pub fn rank(kind: RecordKind) -> i64 {
    match kind {
        RecordKind::Client => 0,
        RecordKind::Consent => 1,
        RecordKind::Assessment => 2,
        RecordKind::CarePlan => 3,
        RecordKind::Referral => 4,
    }
}

/// Where a delivery stands.
pub mod state {
    /// Waiting for its first attempt or its next one (`not_before`).
    pub const PENDING: &str = "pending";
    /// Not sent because its consent does not allow it; checked again at `not_before`, never sent meanwhile.
    pub const HELD: &str = "held";
    /// The partner holds it.
    pub const DELIVERED: &str = "delivered";
    /// Refused by the partner, unmappable, or out of retries: waits for an operator (replay or discard).
    pub const DEAD: &str = "dead";
    /// A newer version of the same record went instead.
    pub const SUPERSEDED: &str = "superseded";
    /// An operator gave it up.
    pub const DISCARDED: &str = "discarded";
    /// Every state, for filters.
    pub const ALL: [&str; 6] = [PENDING, HELD, DELIVERED, DEAD, SUPERSEDED, DISCARDED];
}

/// One outbox row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryRow {
    /// Its number (the id operators use).
    pub seq: i64,
    /// The record's kind.
    pub kind: RecordKind,
    /// The record's id.
    pub id: RecordId,
    /// The version owed.
    pub version: i64,
    /// The partner.
    pub partner: String,
    /// The record's client (the client itself for a client's row).
    pub client_id: Option<String>,
    /// See [`state`].
    pub state: String,
    /// Attempts made so far.
    pub attempts: i64,
    /// When it may be tried (or checked) next.
    pub not_before: OffsetDateTime,
    /// When the version was accepted.
    pub created_at: OffsetDateTime,
    /// When the row last changed.
    pub updated_at: OffsetDateTime,
    /// What the last attempt said (the reason it waits, is held, or died).
    pub detail: Option<String>,
}

/// One attempt, as kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRow {
    /// When it started.
    pub at: OffsetDateTime,
    /// How long it took, in milliseconds.
    pub ms: i64,
    /// `delivered`, `retry`, `dead`, `held` or `unchanged`.
    pub outcome: String,
    /// The partner's HTTP status, when it answered.
    pub status: Option<i64>,
    /// What happened, in words (no payload).
    pub detail: String,
    /// The partner's `OperationOutcome`, when it sent one with a refusal.
    pub operation_outcome: Option<String>,
}

/// What the partner holds of one of our resources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrosswalkEntry {
    /// The partner.
    pub partner: String,
    /// The resource as the mapping names it (`Observation/as-2001`).
    pub local_ref: String,
    /// The record that delivered it.
    pub kind: RecordKind,
    /// That record's id.
    pub record_id: RecordId,
    /// The partner's resource type.
    pub remote_type: String,
    /// The id the partner assigned.
    pub remote_id: String,
    /// Its version there, when known (`If-Match`).
    pub version_id: Option<String>,
    /// Hash of the content last sent (empty when unknown: the next delivery sends it again).
    pub content_hash: String,
}

/// How a delivery ended this time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    /// The partner holds this version.
    Delivered,
    /// Try again at `not_before`.
    Retry {
        /// When.
        not_before: OffsetDateTime,
    },
    /// Held (consent): checked again at `recheck_at`, never sent meanwhile.
    Held {
        /// When to check again.
        recheck_at: OffsetDateTime,
    },
    /// Waits for an operator.
    Dead,
}

/// One delivery to settle: the row, how it ended, the attempt to keep, and what the partner now holds.
#[derive(Debug, Clone)]
pub struct Settlement {
    /// The row.
    pub seq: i64,
    /// How it ended.
    pub settle: Settle,
    /// The attempt.
    pub attempt: AttemptRow,
    /// Crosswalk rows to keep with it.
    pub crosswalk: Vec<CrosswalkEntry>,
    /// Our resources it referenced that the partner does not hold yet: when one arrives there, the record is
    /// queued again (kept only when delivered).
    pub waits_for: Vec<String>,
    /// Whether the attempt is kept in the row's history: not when it only repeats the hold the row is already in
    /// (a row held for weeks is checked again and again; its history says so once).
    pub keep_attempt: bool,
    /// What the attempt says of the partner (not kept): `Some(true)` it answered, `Some(false)` it did not (a
    /// timeout, a refused connection, 408, 429, 5xx), `None` nothing was asked of it (held, unmappable, our own
    /// failure).
    pub partner_answered: Option<bool>,
    /// The attempt's audit entry, appended with the settlement (none for a hold that only repeats itself).
    pub audit: Option<crate::audit::Entry>,
}

/// Which rows to list.
#[derive(Debug, Clone, Default)]
pub struct DeliveryFilter {
    /// One state.
    pub state: Option<String>,
    /// One partner.
    pub partner: Option<String>,
    /// One record.
    pub record: Option<(RecordKind, RecordId)>,
    /// Rows after this number (paging).
    pub after: i64,
    /// Most rows.
    pub limit: u32,
}

/// Depth of one partner's queue in one state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDepth {
    /// The partner.
    pub partner: String,
    /// The state.
    pub state: String,
    /// Rows.
    pub rows: i64,
    /// When the oldest of them was accepted.
    pub oldest: OffsetDateTime,
}

/// The delivery queue and the crosswalk, as whole use cases.
#[async_trait]
pub trait Outbox: Send + Sync {
    /// Takes up to `limit` due rows of `partner` for `owner` until `lease_until` (see the module docs for which
    /// rows are due), marking the older versions they pass over `superseded`; oldest first.
    ///
    /// # Errors
    /// `Database`.
    async fn claim_deliveries(
        &self,
        partner: &str,
        owner: &str,
        limit: u32,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
    ) -> Result<Vec<DeliveryRow>, StoreError>;

    /// Settles rows `owner` holds, with their attempts and crosswalk rows, in one transaction; a row whose lease
    /// another worker took is left alone (counted out of the returned number).
    ///
    /// # Errors
    /// `Database`.
    async fn settle_deliveries(
        &self,
        owner: &str,
        settlements: &[Settlement],
        now: OffsetDateTime,
    ) -> Result<usize, StoreError>;

    /// Keeps crosswalk rows now (a delivery sent in several parts keeps each part's as it lands).
    ///
    /// # Errors
    /// `Database`.
    async fn save_crosswalk(&self, entries: &[CrosswalkEntry], now: OffsetDateTime) -> Result<(), StoreError>;

    /// What `partner` holds of `local_refs`.
    ///
    /// # Errors
    /// `Database`.
    async fn crosswalk(
        &self,
        partner: &str,
        local_refs: &[String],
    ) -> Result<HashMap<String, CrosswalkEntry>, StoreError>;

    /// Makes every row of `partner` that waits for a retry due at `now` (the partner answers again); the number of
    /// rows.
    ///
    /// # Errors
    /// `Database`.
    async fn wake_deliveries(&self, partner: &str, now: OffsetDateTime) -> Result<u64, StoreError>;

    /// Forgets what `partner` held under `local_ref` (the partner no longer has it).
    ///
    /// # Errors
    /// `Database`.
    async fn forget_crosswalk(&self, partner: &str, local_ref: &str) -> Result<(), StoreError>;

    /// One row and its attempts, oldest first.
    ///
    /// # Errors
    /// `Database`.
    async fn delivery(&self, seq: i64) -> Result<Option<(DeliveryRow, Vec<AttemptRow>)>, StoreError>;

    /// Rows matching `filter`, in number order.
    ///
    /// # Errors
    /// `Database`.
    async fn list_deliveries(&self, filter: &DeliveryFilter) -> Result<Vec<DeliveryRow>, StoreError>;

    /// Puts a row back in the queue (due now) from any state but `pending`; a row of an older version than one
    /// already delivered cannot come back (it would overwrite the newer one). The row as it is afterwards, and
    /// whether it changed (`None`: no such row); a change is audited (`delivery_replayed`) naming `actor`.
    ///
    /// # Errors
    /// `Database`.
    async fn replay_delivery(
        &self,
        seq: i64,
        actor: &Actor,
        now: OffsetDateTime,
    ) -> Result<Option<(DeliveryRow, bool)>, StoreError>;

    /// Gives a waiting row up (`pending` and not in flight, `held` or `dead` → `discarded`). The row as it is
    /// afterwards, and whether it changed (`None`: no such row); a change is audited (`delivery_discarded`) naming
    /// `actor`.
    ///
    /// # Errors
    /// `Database`.
    async fn discard_delivery(
        &self,
        seq: i64,
        actor: &Actor,
        now: OffsetDateTime,
    ) -> Result<Option<(DeliveryRow, bool)>, StoreError>;

    /// Rows per partner and state, with the oldest of each, for the states that wait (`pending`, `held`, `dead`).
    ///
    /// # Errors
    /// `Database`.
    async fn queue_depth(&self) -> Result<Vec<QueueDepth>, StoreError>;

    /// Refreshes the planner's statistics of the queue (PostgreSQL: `ANALYZE outbox`; a no-op on SQLite), so a
    /// claim is planned on the rows there are even where autovacuum is off or has not caught up with a burst.
    ///
    /// # Errors
    /// `Database`.
    async fn analyze_outbox(&self) -> Result<(), StoreError>;
}

/// The audit entry of an operator's action on a delivery.
fn operator_entry(row: &DeliveryRow, action: &str, actor: &Actor, at: OffsetDateTime) -> crate::audit::Entry {
    crate::audit::Entry::new(at, &actor.key_name, action, &actor.request_id)
        .on(row.kind.as_str(), row.id.as_str(), row.version)
        .of_client(row.client_id.as_deref())
        .with_detail(&serde_json::json!({"partner": row.partner, "delivery": row.seq}))
}

type Row = (i64, String, String, i64, String, Option<String>, String, i64, i64, i64, i64, Option<String>);

const COLUMNS: &str =
    "seq, kind, id, version, partner, client_id, state, attempts, not_before, created_at, updated_at, detail";

fn delivery_row(r: Row) -> Result<DeliveryRow, StoreError> {
    let (seq, kind, id, version, partner, client_id, state, attempts, not_before, created_at, updated_at, detail) = r;
    Ok(DeliveryRow {
        seq,
        kind: RecordKind::from_name(&kind).ok_or_else(|| StoreError::Corrupt(format!("outbox kind `{kind}`")))?,
        id: RecordId::parse(&id).map_err(StoreError::Corrupt)?,
        version,
        partner,
        client_id,
        state,
        attempts,
        not_before: from_micros(not_before),
        created_at: from_micros(created_at),
        updated_at: from_micros(updated_at),
        detail,
    })
}

pub(super) type CrossRow = (String, String, String, String, String, String, Option<String>, String);

pub(super) fn crosswalk_entry(r: CrossRow) -> Result<CrosswalkEntry, StoreError> {
    let (partner, local_ref, kind, record_id, remote_type, remote_id, version_id, content_hash) = r;
    Ok(CrosswalkEntry {
        partner,
        local_ref,
        kind: RecordKind::from_name(&kind).ok_or_else(|| StoreError::Corrupt(format!("crosswalk kind `{kind}`")))?,
        record_id: RecordId::parse(&record_id).map_err(StoreError::Corrupt)?,
        remote_type,
        remote_id,
        version_id,
        content_hash,
    })
}

/// The rows of `partner` in state `$4` a claim may take at `now`: due, not leased, the newest waiting version of
/// their record with no older one in flight, and no earlier rank of their client waiting. One state at a time, so
/// the walk follows the `outbox_due` index in its order and stops after `$3` rows, on any size of queue.
const DUE: &str = "SELECT o.seq FROM outbox o \
    WHERE o.partner = $1 AND o.state = $4 AND o.not_before <= $2 \
    AND (o.lease_until IS NULL OR o.lease_until <= $2) \
    AND NOT EXISTS (SELECT 1 FROM outbox n WHERE n.kind = o.kind AND n.id = o.id AND n.partner = o.partner \
        AND n.version > o.version AND n.state IN ('pending', 'held')) \
    AND NOT EXISTS (SELECT 1 FROM outbox l WHERE l.kind = o.kind AND l.id = o.id AND l.partner = o.partner \
        AND l.version < o.version AND l.state = 'pending' AND l.lease_until > $2) \
    AND NOT EXISTS (SELECT 1 FROM outbox e WHERE e.partner = o.partner AND e.client_id = o.client_id \
        AND e.rank < o.rank AND e.state = 'pending') \
    ORDER BY o.not_before, o.seq LIMIT $3";

macro_rules! impl_outbox {
    ($db:ty, $begin:literal, $skip_locked:literal, $lock_partner:literal, $analyze:literal) => {
        #[async_trait]
        impl Outbox for SqlStore<$db> {
            async fn claim_deliveries(
                &self,
                partner: &str,
                owner: &str,
                limit: u32,
                now: OffsetDateTime,
                lease_until: OffsetDateTime,
            ) -> Result<Vec<DeliveryRow>, StoreError> {
                let (now, until) = (to_micros(now), to_micros(lease_until));
                // Looked for first on a reader: a queue with nothing due (every row waiting for its retry, or behind
                // its client's first row while the partner is down) costs the writers nothing. On SQLite the claim
                // below holds the one write lock while it walks the queue; taken once a second for nothing, it
                // stalled the agency's writes.
                let mut anything = false;
                for waiting in [state::HELD, state::PENDING] {
                    let one: Vec<(i64,)> = sqlx::query_as(DUE)
                        .bind(partner)
                        .bind(now)
                        .bind(1_i64)
                        .bind(waiting)
                        .fetch_all(self.reader())
                        .await?;
                    if !one.is_empty() {
                        anything = true;
                        break;
                    }
                }
                if !anything {
                    return Ok(Vec::new());
                }
                let mut tx = self.writer().begin_with($begin).await?;
                let mut seqs: Vec<(i64,)> = Vec::new();
                // Held rows first: few are due at a time (each comes back once per recheck), and a backlog of
                // pending rows must not keep a referral whose consent became valid from being checked again.
                for waiting in [state::HELD, state::PENDING] {
                    let left = i64::from(limit) - i64::try_from(seqs.len()).unwrap_or(i64::MAX);
                    if left <= 0 {
                        break;
                    }
                    let more: Vec<(i64,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!("{DUE}{}", $skip_locked)))
                        .bind(partner)
                        .bind(now)
                        .bind(left)
                        .bind(waiting)
                        .fetch_all(&mut *tx)
                        .await?;
                    seqs.extend(more);
                }
                let seqs: Vec<i64> = seqs.into_iter().map(|(seq,)| seq).collect();
                let rows = Self::lease_rows(&mut tx, &seqs, owner, until).await?;
                // Versions start at 1: a version 1 has nothing older to supersede.
                let newer: Vec<&DeliveryRow> = rows.iter().filter(|r| r.version > 1).collect();
                Self::supersede_older(&mut tx, &newer, now).await?;
                tx.commit().await?;
                Ok(rows)
            }

            async fn settle_deliveries(
                &self,
                owner: &str,
                settlements: &[Settlement],
                now: OffsetDateTime,
            ) -> Result<usize, StoreError> {
                let now_us = to_micros(now);
                let mut tx = self.writer().begin_with($begin).await?;
                let done = Self::mark_settled(&mut tx, owner, settlements, now_us).await?;
                let settled_now: Vec<&Settlement> = settlements.iter().filter(|s| done.contains(&s.seq)).collect();
                let settled = settled_now.len();
                let kept: Vec<&Settlement> = settled_now.iter().copied().filter(|s| s.keep_attempt).collect();
                Self::insert_attempts(&mut tx, &kept).await?;
                let audit: Vec<crate::audit::Entry> = settled_now.iter().filter_map(|s| s.audit.clone()).collect();
                for s in settled_now {
                    Self::put_crosswalk(&mut tx, &s.crosswalk, now_us).await?;
                    if s.settle == Settle::Delivered && !s.waits_for.is_empty() {
                        let row: Option<(String, String, String)> =
                            sqlx::query_as("SELECT kind, id, partner FROM outbox WHERE seq = $1")
                                .bind(s.seq)
                                .fetch_optional(&mut *tx)
                                .await?;
                        if let Some((kind, id, partner)) = row {
                            Self::lock_partner_crosswalk(&mut tx, &partner).await?;
                            for target in &s.waits_for {
                                sqlx::query(
                                    "INSERT INTO crosswalk_waits (partner, local_ref, kind, record_id) \
                                     VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                                )
                                .bind(&partner)
                                .bind(target)
                                .bind(&kind)
                                .bind(&id)
                                .execute(&mut *tx)
                                .await?;
                                // The target may have reached the partner after this delivery looked for it (another
                                // worker settled it in between, and found no wait to wake): this row goes again now.
                                let requeued = sqlx::query(
                                    "UPDATE outbox SET state = 'pending', not_before = $3, updated_at = $3, \
                                     detail = 'queued again: a resource it references has reached the partner' \
                                     WHERE seq = $4 AND state = 'delivered' AND EXISTS \
                                     (SELECT 1 FROM crosswalk WHERE partner = $1 AND local_ref = $2)",
                                )
                                .bind(&partner)
                                .bind(target)
                                .bind(now_us)
                                .bind(s.seq)
                                .execute(&mut *tx)
                                .await?
                                .rows_affected();
                                if requeued > 0 {
                                    sqlx::query(
                                        "DELETE FROM crosswalk_waits WHERE partner = $1 AND kind = $2 AND record_id = $3",
                                    )
                                    .bind(&partner)
                                    .bind(&kind)
                                    .bind(&id)
                                    .execute(&mut *tx)
                                    .await?;
                                    break;
                                }
                            }
                        }
                    }
                }
                if !audit.is_empty() {
                    Self::append_audits(&mut *tx, &audit).await?;
                }
                tx.commit().await?;
                Ok(settled)
            }

            async fn save_crosswalk(&self, entries: &[CrosswalkEntry], now: OffsetDateTime) -> Result<(), StoreError> {
                if entries.is_empty() {
                    return Ok(());
                }
                let mut tx = self.writer().begin_with($begin).await?;
                Self::put_crosswalk(&mut tx, entries, to_micros(now)).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn crosswalk(
                &self,
                partner: &str,
                local_refs: &[String],
            ) -> Result<HashMap<String, CrosswalkEntry>, StoreError> {
                let mut out = HashMap::new();
                for chunk in local_refs.chunks(200) {
                    let marks: Vec<String> = (0..chunk.len()).map(|i| format!("${}", i + 2)).collect();
                    let sql = format!(
                        "SELECT partner, local_ref, kind, record_id, remote_type, remote_id, version_id, content_hash \
                         FROM crosswalk WHERE partner = $1 AND local_ref IN ({})",
                        marks.join(", ")
                    );
                    let mut q = sqlx::query_as::<_, CrossRow>(sqlx::AssertSqlSafe(sql)).bind(partner);
                    for r in chunk {
                        q = q.bind(r);
                    }
                    for row in q.fetch_all(self.reader()).await? {
                        let e = crosswalk_entry(row)?;
                        out.insert(e.local_ref.clone(), e);
                    }
                }
                Ok(out)
            }

            async fn wake_deliveries(&self, partner: &str, now: OffsetDateTime) -> Result<u64, StoreError> {
                let now = to_micros(now);
                let woken = sqlx::query(
                    "UPDATE outbox SET not_before = $2 WHERE partner = $1 AND state = 'pending' AND not_before > $2",
                )
                .bind(partner)
                .bind(now)
                .execute(self.writer())
                .await?
                .rows_affected();
                Ok(woken)
            }

            async fn forget_crosswalk(&self, partner: &str, local_ref: &str) -> Result<(), StoreError> {
                sqlx::query("DELETE FROM crosswalk WHERE partner = $1 AND local_ref = $2")
                    .bind(partner)
                    .bind(local_ref)
                    .execute(self.writer())
                    .await?;
                Ok(())
            }

            async fn delivery(&self, seq: i64) -> Result<Option<(DeliveryRow, Vec<AttemptRow>)>, StoreError> {
                let mut conn = self.reader().acquire().await?;
                let Some(row) = Self::row_in(&mut conn, seq).await? else { return Ok(None) };
                let attempts: Vec<(i64, i64, String, Option<i64>, String, Option<String>)> = sqlx::query_as(
                    "SELECT at, ms, outcome, status, detail, operation_outcome FROM outbox_attempts \
                     WHERE delivery = $1 ORDER BY seq",
                )
                .bind(seq)
                .fetch_all(self.reader())
                .await?;
                let attempts = attempts
                    .into_iter()
                    .map(|(at, ms, outcome, status, detail, operation_outcome)| AttemptRow {
                        at: from_micros(at),
                        ms,
                        outcome,
                        status,
                        detail,
                        operation_outcome,
                    })
                    .collect();
                Ok(Some((row, attempts)))
            }

            async fn list_deliveries(&self, filter: &DeliveryFilter) -> Result<Vec<DeliveryRow>, StoreError> {
                let mut sql = format!("SELECT {COLUMNS} FROM outbox WHERE seq > $1");
                let mut n = 1;
                let mut mark = |sql: &mut String, clause: &str| {
                    n += 1;
                    sql.push_str(&clause.replace('?', &format!("${n}")));
                };
                if filter.state.is_some() {
                    mark(&mut sql, " AND state = ?");
                }
                if filter.partner.is_some() {
                    mark(&mut sql, " AND partner = ?");
                }
                if filter.record.is_some() {
                    mark(&mut sql, " AND kind = ?");
                    mark(&mut sql, " AND id = ?");
                }
                mark(&mut sql, " ORDER BY seq LIMIT ?");
                let mut q = sqlx::query_as::<_, Row>(sqlx::AssertSqlSafe(sql)).bind(filter.after);
                if let Some(s) = &filter.state {
                    q = q.bind(s);
                }
                if let Some(p) = &filter.partner {
                    q = q.bind(p);
                }
                if let Some((kind, id)) = &filter.record {
                    q = q.bind(kind.as_str()).bind(id.as_str());
                }
                let rows = q.bind(i64::from(filter.limit)).fetch_all(self.reader()).await?;
                rows.into_iter().map(delivery_row).collect()
            }

            async fn replay_delivery(
                &self,
                seq: i64,
                actor: &Actor,
                at: OffsetDateTime,
            ) -> Result<Option<(DeliveryRow, bool)>, StoreError> {
                let now = to_micros(at);
                let mut tx = self.writer().begin_with($begin).await?;
                let changed = sqlx::query(
                    "UPDATE outbox SET state = 'pending', not_before = $2, updated_at = $2, lease_owner = NULL, \
                     lease_until = NULL, detail = 'replayed by an operator' WHERE seq = $1 AND state <> 'pending' \
                     AND NOT EXISTS (SELECT 1 FROM outbox n WHERE n.kind = outbox.kind AND n.id = outbox.id \
                     AND n.partner = outbox.partner AND n.version > outbox.version AND n.state = 'delivered')",
                )
                .bind(seq)
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                    == 1;
                let row = Self::row_in(&mut tx, seq).await?;
                if changed && let Some(r) = &row {
                    Self::append_audit(&mut *tx, &operator_entry(r, "delivery_replayed", actor, at)).await?;
                }
                tx.commit().await?;
                Ok(row.map(|r| (r, changed)))
            }

            async fn discard_delivery(
                &self,
                seq: i64,
                actor: &Actor,
                at: OffsetDateTime,
            ) -> Result<Option<(DeliveryRow, bool)>, StoreError> {
                let now = to_micros(at);
                let mut tx = self.writer().begin_with($begin).await?;
                let changed = sqlx::query(
                    "UPDATE outbox SET state = 'discarded', updated_at = $2, lease_owner = NULL, lease_until = NULL, \
                     detail = 'discarded by an operator' WHERE seq = $1 AND state IN ('pending', 'held', 'dead') \
                     AND (lease_until IS NULL OR lease_until <= $2)",
                )
                .bind(seq)
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                    == 1;
                let row = Self::row_in(&mut tx, seq).await?;
                if changed && let Some(r) = &row {
                    Self::append_audit(&mut *tx, &operator_entry(r, "delivery_discarded", actor, at)).await?;
                }
                tx.commit().await?;
                Ok(row.map(|r| (r, changed)))
            }

            async fn analyze_outbox(&self) -> Result<(), StoreError> {
                if !$analyze.is_empty() {
                    sqlx::query($analyze).execute(self.writer()).await?;
                }
                Ok(())
            }

            async fn queue_depth(&self) -> Result<Vec<QueueDepth>, StoreError> {
                let rows: Vec<(String, String, i64, i64)> = sqlx::query_as(
                    "SELECT partner, state, COUNT(*), MIN(created_at) FROM outbox \
                     WHERE state IN ('pending', 'held', 'dead') GROUP BY partner, state ORDER BY partner, state",
                )
                .fetch_all(self.reader())
                .await?;
                Ok(rows
                    .into_iter()
                    .map(|(partner, state, rows, oldest)| QueueDepth { partner, state, rows, oldest: from_micros(oldest) })
                    .collect())
            }
        }

        impl SqlStore<$db> {
            /// Serialises, until the transaction ends, the writes of `partner`'s crosswalk and of what waits on it,
            /// so that a wait recorded as its target arrives is either seen by the target's wake or sees the
            /// target (PostgreSQL: a transaction advisory lock per partner; SQLite's writes are serial already).
            async fn lock_partner_crosswalk(
                tx: &mut <$db as sqlx::Database>::Connection,
                partner: &str,
            ) -> Result<(), StoreError> {
                if !$lock_partner.is_empty() {
                    sqlx::query($lock_partner).bind(format!("carebridge-crosswalk:{partner}")).execute(&mut *tx).await?;
                }
                Ok(())
            }

            /// One row by its number.
            async fn row_in(
                conn: &mut <$db as sqlx::Database>::Connection,
                seq: i64,
            ) -> Result<Option<DeliveryRow>, StoreError> {
                let row: Option<Row> =
                    sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM outbox WHERE seq = $1")))
                        .bind(seq)
                        .fetch_optional(&mut *conn)
                        .await?;
                row.map(delivery_row).transpose()
            }

            pub(super) async fn put_crosswalk(
                tx: &mut <$db as sqlx::Database>::Connection,
                entries: &[CrosswalkEntry],
                now: i64,
            ) -> Result<(), StoreError> {
                for e in entries {
                    Self::lock_partner_crosswalk(tx, &e.partner).await?;
                    sqlx::query(
                        "INSERT INTO crosswalk (partner, local_ref, kind, record_id, remote_type, remote_id, \
                         version_id, content_hash, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                         ON CONFLICT (partner, local_ref) DO UPDATE SET kind = excluded.kind, \
                         record_id = excluded.record_id, remote_type = excluded.remote_type, \
                         remote_id = excluded.remote_id, version_id = excluded.version_id, \
                         content_hash = excluded.content_hash, updated_at = excluded.updated_at",
                    )
                    .bind(&e.partner)
                    .bind(&e.local_ref)
                    .bind(e.kind.as_str())
                    .bind(e.record_id.as_str())
                    .bind(&e.remote_type)
                    .bind(&e.remote_id)
                    .bind(&e.version_id)
                    .bind(&e.content_hash)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                    // What waited for this resource goes again: its newest delivered version, due now. The waits are
                    // read first (usually none) and each waiting record's row found by its own key, so no plan can
                    // walk every delivered row of the partner (one did, without statistics, once per resource).
                    let waiting: Vec<(String, String)> = sqlx::query_as(
                        "SELECT kind, record_id FROM crosswalk_waits WHERE partner = $1 AND local_ref = $2",
                    )
                    .bind(&e.partner)
                    .bind(&e.local_ref)
                    .fetch_all(&mut *tx)
                    .await?;
                    let mut woken = 0;
                    for (kind, record_id) in &waiting {
                        woken += sqlx::query(
                            "UPDATE outbox SET state = 'pending', not_before = $4, updated_at = $4, \
                             detail = 'queued again: a resource it references has reached the partner' \
                             WHERE seq = (SELECT seq FROM outbox WHERE kind = $1 AND id = $2 AND partner = $3 \
                             AND state = 'delivered' ORDER BY version DESC LIMIT 1)",
                        )
                        .bind(kind)
                        .bind(record_id)
                        .bind(&e.partner)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                    }
                    if woken > 0 {
                        sqlx::query("DELETE FROM crosswalk_waits WHERE partner = $1 AND local_ref = $2")
                            .bind(&e.partner)
                            .bind(&e.local_ref)
                            .execute(&mut *tx)
                            .await?;
                    }
                }
                Ok(())
            }
        }
    };
}

impl_outbox!(Sqlite, "BEGIN IMMEDIATE", "", "", "");
impl_outbox!(
    Postgres,
    "BEGIN",
    " FOR UPDATE OF o SKIP LOCKED",
    "SELECT pg_advisory_xact_lock(hashtext($1))",
    "ANALYZE outbox"
);

/// How a settlement leaves its row: state, when it is next due, whether the attempt counts against the schedule.
fn settled_state(s: &Settlement, now_us: i64) -> (&'static str, i64, i64) {
    let (state, not_before) = match &s.settle {
        Settle::Delivered => (state::DELIVERED, now_us),
        Settle::Retry { not_before } => (state::PENDING, to_micros(*not_before)),
        Settle::Held { recheck_at } => (state::HELD, to_micros(*recheck_at)),
        Settle::Dead => (state::DEAD, now_us),
    };
    (state, not_before, i64::from(!matches!(s.settle, Settle::Held { .. })))
}

const SUPERSEDED: &str = "UPDATE outbox SET state = 'superseded', updated_at = $5, lease_owner = NULL, \
     lease_until = NULL, detail = 'a newer version went instead' \
     WHERE kind = $1 AND id = $2 AND partner = $3 AND version < $4 AND state IN ('pending', 'held')";

const ATTEMPT: &str = "INSERT INTO outbox_attempts (delivery, at, ms, outcome, status, detail, operation_outcome) \
     VALUES ($1, $2, $3, $4, $5, $6, $7)";

/// SQLite: one statement per row (in-process, each costs microseconds; the one writer holds the lock anyway).
impl SqlStore<Sqlite> {
    async fn lease_rows(
        tx: &mut sqlx::SqliteConnection,
        seqs: &[i64],
        owner: &str,
        until: i64,
    ) -> Result<Vec<DeliveryRow>, StoreError> {
        let mut rows = Vec::with_capacity(seqs.len());
        for seq in seqs {
            let row: Row = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "UPDATE outbox SET lease_owner = $2, lease_until = $3 WHERE seq = $1 RETURNING {COLUMNS}"
            )))
            .bind(seq)
            .bind(owner)
            .bind(until)
            .fetch_one(&mut *tx)
            .await?;
            rows.push(delivery_row(row)?);
        }
        Ok(rows)
    }

    async fn supersede_older(
        tx: &mut sqlx::SqliteConnection,
        rows: &[&DeliveryRow],
        now: i64,
    ) -> Result<(), StoreError> {
        for row in rows {
            sqlx::query(SUPERSEDED)
                .bind(row.kind.as_str())
                .bind(row.id.as_str())
                .bind(&row.partner)
                .bind(row.version)
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        Ok(())
    }

    async fn mark_settled(
        tx: &mut sqlx::SqliteConnection,
        owner: &str,
        settlements: &[Settlement],
        now_us: i64,
    ) -> Result<std::collections::HashSet<i64>, StoreError> {
        let mut done = std::collections::HashSet::new();
        for s in settlements {
            let (state, not_before, counted) = settled_state(s, now_us);
            let changed = sqlx::query(
                "UPDATE outbox SET state = $3, not_before = $4, attempts = attempts + $5, updated_at = $6, \
                 detail = $7, lease_owner = NULL, lease_until = NULL WHERE seq = $1 AND lease_owner = $2",
            )
            .bind(s.seq)
            .bind(owner)
            .bind(state)
            .bind(not_before)
            .bind(counted)
            .bind(now_us)
            .bind(&s.attempt.detail)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if changed > 0 {
                done.insert(s.seq);
            }
        }
        Ok(done)
    }

    async fn insert_attempts(tx: &mut sqlx::SqliteConnection, kept: &[&Settlement]) -> Result<(), StoreError> {
        for s in kept {
            sqlx::query(ATTEMPT)
                .bind(s.seq)
                .bind(to_micros(s.attempt.at))
                .bind(s.attempt.ms)
                .bind(&s.attempt.outcome)
                .bind(s.attempt.status)
                .bind(&s.attempt.detail)
                .bind(&s.attempt.operation_outcome)
                .execute(&mut *tx)
                .await?;
        }
        Ok(())
    }
}

/// PostgreSQL: one statement for a whole claim or settlement (`UPDATE … FROM unnest(…)`): each statement is a round
/// trip to the server, and a claim of 64 rows made 128 of them.
impl SqlStore<Postgres> {
    async fn lease_rows(
        tx: &mut sqlx::PgConnection,
        seqs: &[i64],
        owner: &str,
        until: i64,
    ) -> Result<Vec<DeliveryRow>, StoreError> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "UPDATE outbox SET lease_owner = $2, lease_until = $3 WHERE seq = ANY($1) RETURNING {COLUMNS}"
        )))
        .bind(seqs)
        .bind(owner)
        .bind(until)
        .fetch_all(&mut *tx)
        .await?;
        let mut rows = rows.into_iter().map(delivery_row).collect::<Result<Vec<_>, _>>()?;
        // In the order claimed (oldest first), which RETURNING does not keep.
        let place: HashMap<i64, usize> = seqs.iter().enumerate().map(|(i, s)| (*s, i)).collect();
        rows.sort_by_key(|r| place.get(&r.seq).copied().unwrap_or(usize::MAX));
        Ok(rows)
    }

    async fn supersede_older(tx: &mut sqlx::PgConnection, rows: &[&DeliveryRow], now: i64) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let kinds: Vec<&str> = rows.iter().map(|r| r.kind.as_str()).collect();
        let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        let partners: Vec<&str> = rows.iter().map(|r| r.partner.as_str()).collect();
        let versions: Vec<i64> = rows.iter().map(|r| r.version).collect();
        sqlx::query(
            "UPDATE outbox o SET state = 'superseded', updated_at = $5, lease_owner = NULL, lease_until = NULL, \
             detail = 'a newer version went instead' \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[]) AS u(kind, id, partner, version) \
             WHERE o.kind = u.kind AND o.id = u.id AND o.partner = u.partner AND o.version < u.version \
             AND o.state IN ('pending', 'held')",
        )
        .bind(&kinds)
        .bind(&ids)
        .bind(&partners)
        .bind(&versions)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }

    async fn mark_settled(
        tx: &mut sqlx::PgConnection,
        owner: &str,
        settlements: &[Settlement],
        now_us: i64,
    ) -> Result<std::collections::HashSet<i64>, StoreError> {
        if settlements.is_empty() {
            return Ok(std::collections::HashSet::new());
        }
        let mut seqs = Vec::with_capacity(settlements.len());
        let mut states = Vec::with_capacity(settlements.len());
        let mut due = Vec::with_capacity(settlements.len());
        let mut counted = Vec::with_capacity(settlements.len());
        let mut details = Vec::with_capacity(settlements.len());
        for s in settlements {
            let (state, not_before, count) = settled_state(s, now_us);
            seqs.push(s.seq);
            states.push(state);
            due.push(not_before);
            counted.push(count);
            details.push(s.attempt.detail.as_str());
        }
        let done: Vec<(i64,)> = sqlx::query_as(
            "UPDATE outbox o SET state = u.state, not_before = u.not_before, attempts = o.attempts + u.counted, \
             updated_at = $2, detail = u.detail, lease_owner = NULL, lease_until = NULL \
             FROM unnest($3::bigint[], $4::text[], $5::bigint[], $6::bigint[], $7::text[]) \
                 AS u(seq, state, not_before, counted, detail) \
             WHERE o.seq = u.seq AND o.lease_owner = $1 RETURNING o.seq",
        )
        .bind(owner)
        .bind(now_us)
        .bind(&seqs)
        .bind(&states)
        .bind(&due)
        .bind(&counted)
        .bind(&details)
        .fetch_all(&mut *tx)
        .await?;
        Ok(done.into_iter().map(|(seq,)| seq).collect())
    }

    async fn insert_attempts(tx: &mut sqlx::PgConnection, kept: &[&Settlement]) -> Result<(), StoreError> {
        if kept.is_empty() {
            return Ok(());
        }
        let seqs: Vec<i64> = kept.iter().map(|s| s.seq).collect();
        let at: Vec<i64> = kept.iter().map(|s| to_micros(s.attempt.at)).collect();
        let ms: Vec<i64> = kept.iter().map(|s| s.attempt.ms).collect();
        let outcome: Vec<&str> = kept.iter().map(|s| s.attempt.outcome.as_str()).collect();
        let status: Vec<Option<i64>> = kept.iter().map(|s| s.attempt.status).collect();
        let detail: Vec<&str> = kept.iter().map(|s| s.attempt.detail.as_str()).collect();
        let oo: Vec<Option<&str>> = kept.iter().map(|s| s.attempt.operation_outcome.as_deref()).collect();
        sqlx::query(
            "INSERT INTO outbox_attempts (delivery, at, ms, outcome, status, detail, operation_outcome) \
             SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], $5::bigint[], $6::text[], \
             $7::text[])",
        )
        .bind(&seqs)
        .bind(&at)
        .bind(&ms)
        .bind(&outcome)
        .bind(&status)
        .bind(&detail)
        .bind(&oo)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }
}
