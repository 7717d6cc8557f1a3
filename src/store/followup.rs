//! Following referrals on partners' servers: the sweep cursor per partner and the lease that lets one replica sweep
//! a partner at a time, and the crosswalk read backwards (which of our records a partner's Task is).
//!
//! The lease is the `followup_cursors` row of the partner (`holder`, `expires_at`), taken by one conditional upsert
//! that succeeds only when it is free, lapsed or already the caller's; the sweep gives it back with the cursor it
//! reached. A sweeper that crashed stops renewing: its lease lapses and the cursor stays where the last finished
//! sweep left it, so the next sweep reads those Tasks again (and finds their versions seen).

use async_trait::async_trait;
use sqlx::{Postgres, Sqlite};
use time::OffsetDateTime;

use super::outbox::{CrossRow, crosswalk_entry};
use super::sql::SqlStore;
use super::{Actor, CrosswalkEntry, StoreError, to_micros};
use crate::domain::RecordId;

/// Where following one partner stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SweepClaim {
    /// The sweep is the caller's; it starts after `last_seen` (the partner's `meta.lastUpdated` of the newest Task
    /// the last sweep saw; `None` before the first).
    Taken {
        /// Where the last sweep got to.
        last_seen: Option<String>,
    },
    /// Another replica sweeps it now.
    Busy,
}

/// The follow-up worker's cursors and leases, and the crosswalk read by the partner's ids.
#[async_trait]
pub trait Followup: Send + Sync {
    /// Takes `partner`'s sweep lease for `holder` until `lease_until`.
    ///
    /// # Errors
    /// `Database`.
    async fn claim_sweep(
        &self,
        partner: &str,
        holder: &str,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
    ) -> Result<SweepClaim, StoreError>;

    /// Gives the lease back; `last_seen` (when given) is where the next sweep starts.
    ///
    /// # Errors
    /// `Database`.
    async fn finish_sweep(
        &self,
        partner: &str,
        holder: &str,
        last_seen: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<(), StoreError>;

    /// The crosswalk rows of `partner` whose resource there is `remote_type/<one of remote_ids>`.
    ///
    /// # Errors
    /// `Database`.
    async fn crosswalk_by_remote(
        &self,
        partner: &str,
        remote_type: &str,
        remote_ids: &[String],
    ) -> Result<Vec<CrosswalkEntry>, StoreError>;

    /// When the gateway first kept a resource of `remote_type` at `partner` (where a first sweep starts); `None`
    /// when it holds none there.
    ///
    /// # Errors
    /// `Database`.
    async fn first_crosswalk(&self, partner: &str, remote_type: &str) -> Result<Option<OffsetDateTime>, StoreError>;

    /// Records in the audit log that a partner moved a referral where the state machine does not let it go: the
    /// referral is left at `version`, the refusal kept (action `partner_move_refused`).
    ///
    /// # Errors
    /// `Database`.
    async fn record_refused_move(
        &self,
        id: &RecordId,
        version: i64,
        actor: &Actor,
        now: OffsetDateTime,
    ) -> Result<(), StoreError>;
}

macro_rules! impl_followup {
    ($db:ty, $begin:literal) => {
        #[async_trait]
        impl Followup for SqlStore<$db> {
            async fn claim_sweep(
                &self,
                partner: &str,
                holder: &str,
                now: OffsetDateTime,
                lease_until: OffsetDateTime,
            ) -> Result<SweepClaim, StoreError> {
                let mut tx = self.writer().begin_with($begin).await?;
                let taken = sqlx::query(
                    "INSERT INTO followup_cursors (partner, holder, expires_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (partner) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at \
                     WHERE followup_cursors.expires_at <= $4 OR followup_cursors.holder = excluded.holder",
                )
                .bind(partner)
                .bind(holder)
                .bind(to_micros(lease_until))
                .bind(to_micros(now))
                .execute(&mut *tx)
                .await?
                .rows_affected()
                    == 1;
                if !taken {
                    tx.rollback().await?;
                    return Ok(SweepClaim::Busy);
                }
                let (last_seen,): (Option<String>,) =
                    sqlx::query_as("SELECT last_seen FROM followup_cursors WHERE partner = $1")
                        .bind(partner)
                        .fetch_one(&mut *tx)
                        .await?;
                tx.commit().await?;
                Ok(SweepClaim::Taken { last_seen })
            }

            async fn finish_sweep(
                &self,
                partner: &str,
                holder: &str,
                last_seen: Option<&str>,
                now: OffsetDateTime,
            ) -> Result<(), StoreError> {
                sqlx::query(
                    "UPDATE followup_cursors SET last_seen = COALESCE($3, last_seen), swept_at = $4, holder = NULL, \
                     expires_at = 0 WHERE partner = $1 AND holder = $2",
                )
                .bind(partner)
                .bind(holder)
                .bind(last_seen)
                .bind(to_micros(now))
                .execute(self.writer())
                .await?;
                Ok(())
            }

            async fn crosswalk_by_remote(
                &self,
                partner: &str,
                remote_type: &str,
                remote_ids: &[String],
            ) -> Result<Vec<CrosswalkEntry>, StoreError> {
                let mut out = Vec::new();
                for chunk in remote_ids.chunks(200) {
                    let marks: Vec<String> = (0..chunk.len()).map(|i| format!("${}", i + 3)).collect();
                    let sql = format!(
                        "SELECT partner, local_ref, kind, record_id, remote_type, remote_id, version_id, content_hash \
                         FROM crosswalk WHERE partner = $1 AND remote_type = $2 AND remote_id IN ({})",
                        marks.join(", ")
                    );
                    let mut q = sqlx::query_as::<_, CrossRow>(sqlx::AssertSqlSafe(sql)).bind(partner).bind(remote_type);
                    for r in chunk {
                        q = q.bind(r);
                    }
                    for row in q.fetch_all(self.reader()).await? {
                        out.push(crosswalk_entry(row)?);
                    }
                }
                Ok(out)
            }

            async fn first_crosswalk(
                &self,
                partner: &str,
                remote_type: &str,
            ) -> Result<Option<OffsetDateTime>, StoreError> {
                let (first,): (Option<i64>,) =
                    sqlx::query_as("SELECT MIN(updated_at) FROM crosswalk WHERE partner = $1 AND remote_type = $2")
                        .bind(partner)
                        .bind(remote_type)
                        .fetch_one(self.reader())
                        .await?;
                Ok(first.map(super::from_micros))
            }

            async fn record_refused_move(
                &self,
                id: &RecordId,
                version: i64,
                actor: &Actor,
                now: OffsetDateTime,
            ) -> Result<(), StoreError> {
                sqlx::query(
                    "INSERT INTO audit_events (at, actor, action, kind, record_id, version, request_id) \
                     VALUES ($1, $2, 'partner_move_refused', 'referral', $3, $4, $5)",
                )
                .bind(to_micros(now))
                .bind(&actor.key_name)
                .bind(id.as_str())
                .bind(version)
                .bind(&actor.request_id)
                .execute(self.writer())
                .await?;
                Ok(())
            }
        }
    };
}

impl_followup!(Sqlite, "BEGIN IMMEDIATE");
impl_followup!(Postgres, "BEGIN");
