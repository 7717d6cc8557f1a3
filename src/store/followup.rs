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

/// A partner's topic-based Subscription as the gateway keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionRow {
    /// Its id at the partner (`None` between asking for it and the partner's answer).
    pub remote_id: Option<String>,
    /// `requested`, `active`, `error` or `off` (as the partner last said).
    pub status: String,
    /// The highest event number received.
    pub events_seen: i64,
    /// When the partner last sent anything on it (a handshake, a heartbeat, an event).
    pub heard_at: Option<OffsetDateTime>,
    /// Notifications were missed (a gap, a late heartbeat, an error): the next round sweeps.
    pub owed_sweep: bool,
    /// When the gateway asked for it.
    pub created_at: OffsetDateTime,
}

/// What a notification says, as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notified {
    /// `handshake`, `heartbeat`, `event-notification`, `query-status` or `query-event`.
    pub kind: String,
    /// The subscription's status as the partner gives it.
    pub status: String,
    /// `events-since-subscription-start`, when given.
    pub events_since: Option<i64>,
    /// Each event's number and the id of the Task it names at the partner (empty when it names no Task: the
    /// number still counts).
    pub events: Vec<(i64, String)>,
}

/// What became of a notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotifiedOutcome {
    /// No subscription of that partner holds this token.
    Unknown,
    /// Kept; `gap` when it showed that earlier notifications were missed.
    Recorded {
        /// Events were missed: a sweep is owed.
        gap: bool,
    },
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

    /// Starts (or starts again) `partner`'s subscription: a new token, no id yet, nothing seen, a sweep owed, and
    /// the events of the one it replaces forgotten.
    ///
    /// # Errors
    /// `Database`.
    async fn begin_subscription(&self, partner: &str, token_hash: &str, now: OffsetDateTime) -> Result<(), StoreError>;

    /// Keeps the id and status the partner gave the subscription asked for with `token_hash` (nothing when it has
    /// been replaced meanwhile).
    ///
    /// # Errors
    /// `Database`.
    async fn subscription_created(
        &self,
        partner: &str,
        token_hash: &str,
        remote_id: &str,
        status: &str,
    ) -> Result<(), StoreError>;

    /// `partner`'s subscription, if it has one.
    ///
    /// # Errors
    /// `Database`, `Corrupt`.
    async fn subscription(&self, partner: &str) -> Result<Option<SubscriptionRow>, StoreError>;

    /// Keeps a notification sent with the token whose hash is `token_hash`: the Tasks it names (to be read), the
    /// event count, the status, and a sweep owed when its numbers show a gap or its status an error.
    ///
    /// # Errors
    /// `Database`.
    async fn record_notification(
        &self,
        partner: &str,
        token_hash: &str,
        notified: &Notified,
        now: OffsetDateTime,
    ) -> Result<NotifiedOutcome, StoreError>;

    /// Up to `limit` Tasks notifications named at `partner` and not read yet, with their event numbers.
    ///
    /// # Errors
    /// `Database`.
    async fn pending_events(&self, partner: &str, limit: u32) -> Result<Vec<(String, i64)>, StoreError>;

    /// Forgets a Task read: its row goes unless a newer event named it meanwhile.
    ///
    /// # Errors
    /// `Database`.
    async fn forget_event(&self, partner: &str, focus: &str, event_number: i64) -> Result<(), StoreError>;

    /// Marks a sweep owed (`true`: notifications cannot be trusted) or paid (`false`).
    ///
    /// # Errors
    /// `Database`.
    async fn owe_sweep(&self, partner: &str, owed: bool) -> Result<(), StoreError>;
}

/// Where the event numbers of a notification leave the count: the new highest number and whether some were
/// skipped (a gap: notifications the partner sent that never arrived, or will arrive late; either way a sweep
/// finds what they were about).
fn count_events(seen: i64, n: &Notified) -> (i64, bool) {
    let mut numbers: Vec<i64> = n.events.iter().map(|(e, _)| *e).collect();
    numbers.sort_unstable();
    let mut highest = seen;
    let mut gap = n.status == "error";
    for e in numbers {
        if e > highest + 1 {
            gap = true;
        }
        highest = highest.max(e);
    }
    match n.kind.as_str() {
        // A handshake starts the count where the partner says it stands.
        "handshake" => (n.events_since.unwrap_or(highest), gap),
        // A heartbeat says how many events there were: more than received is a gap.
        "heartbeat" => match n.events_since {
            Some(since) if since > highest => (since, true),
            _ => (highest, gap),
        },
        _ => (highest, gap),
    }
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
                let mut entry = crate::audit::Entry::new(now, &actor.key_name, "partner_move_refused", &actor.request_id)
                    .on("referral", id.as_str(), version);
                if let Some(partner) = &actor.partner {
                    entry = entry.with_detail(&serde_json::json!({"partner": partner}));
                }
                crate::store::AuditChain::audit(self, vec![entry]).await
            }

            async fn begin_subscription(
                &self,
                partner: &str,
                token_hash: &str,
                now: OffsetDateTime,
            ) -> Result<(), StoreError> {
                let mut tx = self.writer().begin_with($begin).await?;
                sqlx::query(
                    "INSERT INTO partner_subscriptions (partner, remote_id, token_hash, status, events_seen, heard_at, \
                     owed_sweep, created_at) VALUES ($1, NULL, $2, 'requested', 0, NULL, TRUE, $3) \
                     ON CONFLICT (partner) DO UPDATE SET remote_id = NULL, token_hash = excluded.token_hash, \
                     status = 'requested', events_seen = 0, heard_at = NULL, owed_sweep = TRUE, \
                     created_at = excluded.created_at",
                )
                .bind(partner)
                .bind(token_hash)
                .bind(to_micros(now))
                .execute(&mut *tx)
                .await?;
                sqlx::query("DELETE FROM subscription_events WHERE partner = $1").bind(partner).execute(&mut *tx).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn subscription_created(
                &self,
                partner: &str,
                token_hash: &str,
                remote_id: &str,
                status: &str,
            ) -> Result<(), StoreError> {
                // A handshake may have come first: it already made the subscription active.
                sqlx::query(
                    "UPDATE partner_subscriptions SET remote_id = $3, \
                     status = CASE WHEN status = 'requested' THEN $4 ELSE status END \
                     WHERE partner = $1 AND token_hash = $2",
                )
                .bind(partner)
                .bind(token_hash)
                .bind(remote_id)
                .bind(status)
                .execute(self.writer())
                .await?;
                Ok(())
            }

            async fn subscription(&self, partner: &str) -> Result<Option<SubscriptionRow>, StoreError> {
                let row: Option<(Option<String>, String, i64, Option<i64>, bool, i64)> = sqlx::query_as(
                    "SELECT remote_id, status, events_seen, heard_at, owed_sweep, created_at \
                     FROM partner_subscriptions WHERE partner = $1",
                )
                .bind(partner)
                .fetch_optional(self.reader())
                .await?;
                Ok(row.map(|(remote_id, status, events_seen, heard_at, owed_sweep, created_at)| SubscriptionRow {
                    remote_id,
                    status,
                    events_seen,
                    heard_at: heard_at.map(super::from_micros),
                    owed_sweep,
                    created_at: super::from_micros(created_at),
                }))
            }

            async fn record_notification(
                &self,
                partner: &str,
                token_hash: &str,
                notified: &Notified,
                now: OffsetDateTime,
            ) -> Result<NotifiedOutcome, StoreError> {
                // A wrong token costs a read, never the writer: anyone may call the endpoint.
                let kept: Option<(String,)> =
                    sqlx::query_as("SELECT token_hash FROM partner_subscriptions WHERE partner = $1")
                        .bind(partner)
                        .fetch_optional(self.reader())
                        .await?;
                if !kept.is_some_and(|(k,)| bool::from(subtle::ConstantTimeEq::ct_eq(k.as_bytes(), token_hash.as_bytes())))
                {
                    return Ok(NotifiedOutcome::Unknown);
                }
                let mut tx = self.writer().begin_with($begin).await?;
                let row: Option<(String, i64)> = sqlx::query_as(
                    "SELECT token_hash, events_seen FROM partner_subscriptions WHERE partner = $1",
                )
                .bind(partner)
                .fetch_optional(&mut *tx)
                .await?;
                let Some((kept, seen)) = row else {
                    tx.rollback().await?;
                    return Ok(NotifiedOutcome::Unknown);
                };
                if !bool::from(subtle::ConstantTimeEq::ct_eq(kept.as_bytes(), token_hash.as_bytes())) {
                    tx.rollback().await?;
                    return Ok(NotifiedOutcome::Unknown);
                }
                let (highest, gap) = count_events(seen, notified);
                let status = match notified.status.as_str() {
                    s @ ("requested" | "active" | "error" | "off") => s,
                    _ => "active",
                };
                sqlx::query(
                    "UPDATE partner_subscriptions SET status = $2, events_seen = $3, heard_at = $4, \
                     owed_sweep = (owed_sweep OR $5) WHERE partner = $1",
                )
                .bind(partner)
                .bind(status)
                .bind(highest)
                .bind(to_micros(now))
                .bind(gap)
                .execute(&mut *tx)
                .await?;
                for (number, focus) in notified.events.iter().filter(|(_, focus)| !focus.is_empty()) {
                    sqlx::query(
                        "INSERT INTO subscription_events (partner, focus, event_number, received_at) \
                         VALUES ($1, $2, $3, $4) ON CONFLICT (partner, focus) DO UPDATE SET \
                         event_number = CASE WHEN excluded.event_number > subscription_events.event_number \
                         THEN excluded.event_number ELSE subscription_events.event_number END, \
                         received_at = excluded.received_at",
                    )
                    .bind(partner)
                    .bind(focus)
                    .bind(number)
                    .bind(to_micros(now))
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(NotifiedOutcome::Recorded { gap })
            }

            async fn pending_events(&self, partner: &str, limit: u32) -> Result<Vec<(String, i64)>, StoreError> {
                Ok(sqlx::query_as(
                    "SELECT focus, event_number FROM subscription_events WHERE partner = $1 \
                     ORDER BY event_number LIMIT $2",
                )
                .bind(partner)
                .bind(i64::from(limit))
                .fetch_all(self.reader())
                .await?)
            }

            async fn forget_event(&self, partner: &str, focus: &str, event_number: i64) -> Result<(), StoreError> {
                sqlx::query(
                    "DELETE FROM subscription_events WHERE partner = $1 AND focus = $2 AND event_number <= $3",
                )
                .bind(partner)
                .bind(focus)
                .bind(event_number)
                .execute(self.writer())
                .await?;
                Ok(())
            }

            async fn owe_sweep(&self, partner: &str, owed: bool) -> Result<(), StoreError> {
                sqlx::query("UPDATE partner_subscriptions SET owed_sweep = $2 WHERE partner = $1")
                    .bind(partner)
                    .bind(owed)
                    .execute(self.writer())
                    .await?;
                Ok(())
            }
        }
    };
}

impl_followup!(Sqlite, "BEGIN IMMEDIATE");
impl_followup!(Postgres, "BEGIN");

#[cfg(test)]
mod tests {
    use super::*;

    fn n(kind: &str, status: &str, since: Option<i64>, numbers: &[i64]) -> Notified {
        Notified {
            kind: kind.into(),
            status: status.into(),
            events_since: since,
            events: numbers.iter().map(|e| (*e, "t".to_owned())).collect(),
        }
    }

    #[test]
    fn gaps_are_numbers_skipped_heartbeats_counting_more_or_an_error() {
        assert_eq!(count_events(0, &n("event-notification", "active", Some(2), &[1, 2])), (2, false));
        assert_eq!(count_events(2, &n("event-notification", "active", Some(3), &[4])), (4, true));
        // Late arrivals are no gap; out of order within one notification neither.
        assert_eq!(count_events(4, &n("event-notification", "active", None, &[3])), (4, false));
        assert_eq!(count_events(4, &n("event-notification", "active", None, &[6, 5])), (6, false));
        assert_eq!(count_events(6, &n("heartbeat", "active", Some(6), &[])), (6, false));
        assert_eq!(count_events(6, &n("heartbeat", "active", Some(9), &[])), (9, true));
        assert_eq!(count_events(9, &n("heartbeat", "error", Some(9), &[])), (9, true));
        assert_eq!(count_events(9, &n("handshake", "active", Some(0), &[])), (0, false));
    }
}
