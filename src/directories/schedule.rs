//! The scheduled directory sync: a worker per source that `app.rs` starts and stops with the gateway, and which
//! syncs only where it gets the source's lease (on one replica at a time; the others skip that turn). When a sync
//! is due and which kind is a pure decision over what the store remembers and the instant the caller passes, so
//! tests step time ([`tick`] at a `now`) instead of waiting.

use time::{Duration, OffsetDateTime};
use tokio::sync::watch;

use super::jobs::{self, JobFailure, StartError, StartedBy, SyncRunner};
use super::{SyncMode, SyncReport};
use crate::store::DirectorySyncState;

/// How often a scheduled directory sync is a full one (which also finds services that vanished).
pub const FULL_SYNC_EVERY: Duration = Duration::hours(24);

/// The mode of a scheduled sync at `now`: full when no complete crawl is known, or the last one is `full_every`
/// old or older (or lies in the future: a clock that jumped back); incremental in between.
///
/// The last complete crawl is the store's, so every replica decides alike and a restart does not force a full
/// sync the day's full sync already did.
#[must_use]
pub fn scheduled_mode(state: Option<&DirectorySyncState>, now: OffsetDateTime, full_every: Duration) -> SyncMode {
    match state.and_then(|s| s.complete_at) {
        Some(at) if at <= now && now - at < full_every => SyncMode::Incremental,
        _ => SyncMode::Full,
    }
}

/// What one scheduled turn did.
#[derive(Debug)]
pub enum Tick {
    /// This replica synced the source.
    Ran(Result<SyncReport, JobFailure>),
    /// Another sync of the source was running (here, on another replica, or from the API or CLI): skipped.
    Skipped {
        /// The job running.
        running: String,
    },
    /// The store could not be asked; tried again next turn.
    Unavailable(crate::store::StoreError),
}

/// One scheduled turn for `source` at `now`: a full sync when one is due ([`scheduled_mode`]), else an
/// incremental one, run to its end where this replica gets the lease.
pub async fn tick(runner: &SyncRunner, source: &str, now: OffsetDateTime) -> Tick {
    let state = match runner.sync_state(source).await {
        Ok(state) => state,
        Err(e) => return Tick::Unavailable(e),
    };
    let mode = scheduled_mode(state.as_ref(), now, FULL_SYNC_EVERY);
    match runner.claim(source, mode, false, StartedBy::Schedule, None, now).await {
        Ok(claimed) => Tick::Ran(runner.run(claimed, &|_| {}).await),
        Err(StartError::Busy { running, .. }) => Tick::Skipped { running },
        Err(StartError::Store(e)) => Tick::Unavailable(e),
        Err(StartError::UnknownSource) => Tick::Ran(Err(JobFailure {
            kind: "source".into(),
            detail: "no directory of that name is configured".into(),
        })),
    }
}

/// Syncs `source` every `interval` (the first turn at once) until `stop` turns `true`; a failed sync is logged
/// and tried again at the next turn, and never stops the gateway. A sync running when `stop` turns is stopped by
/// the runner.
pub async fn run_worker(
    runner: SyncRunner,
    source: String,
    interval: std::time::Duration,
    stop: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = jobs::stopped(stop.clone()) => break,
        }
        match tick(&runner, &source, OffsetDateTime::now_utc()).await {
            Tick::Ran(Ok(r)) => tracing::info!(
                source = %source,
                added = r.added,
                updated = r.updated,
                deactivated = r.deactivated,
                rejected = r.rejected.len(),
                "Scheduled directory sync done."
            ),
            Tick::Ran(Err(f)) => {
                tracing::warn!(source = %source, kind = %f.kind, error = %f.detail, "Scheduled directory sync failed; will retry.");
            }
            Tick::Skipped { running } => {
                tracing::info!(source = %source, job_id = %running, "Directory sync already running; scheduled turn skipped.");
            }
            Tick::Unavailable(e) => {
                tracing::warn!(source = %source, error = %e, "Directory sync state unreadable; scheduled turn skipped.");
            }
        }
    }
    tracing::info!(source = %source, "Scheduled directory sync stopped.");
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn completed_at(at: OffsetDateTime) -> DirectorySyncState {
        DirectorySyncState { complete_at: Some(at), last_success: Some(at), ..DirectorySyncState::default() }
    }

    #[test]
    fn a_source_never_crawled_in_full_gets_a_full_sync() {
        let now = datetime!(2026-07-01 12:00 UTC);
        assert_eq!(scheduled_mode(None, now, FULL_SYNC_EVERY), SyncMode::Full);
        let incremental_only = DirectorySyncState { last_success: Some(now), ..DirectorySyncState::default() };
        assert_eq!(scheduled_mode(Some(&incremental_only), now, FULL_SYNC_EVERY), SyncMode::Full);
    }

    #[test]
    fn syncs_are_incremental_until_the_last_full_crawl_is_a_day_old() {
        let crawled = datetime!(2026-07-01 00:00 UTC);
        let state = completed_at(crawled);
        let mode = |now| scheduled_mode(Some(&state), now, FULL_SYNC_EVERY);
        assert_eq!(mode(crawled + Duration::minutes(1)), SyncMode::Incremental);
        assert_eq!(mode(crawled + Duration::hours(23) + Duration::minutes(59)), SyncMode::Incremental);
        assert_eq!(mode(crawled + Duration::hours(24)), SyncMode::Full);
        assert_eq!(mode(crawled + Duration::days(3)), SyncMode::Full);
    }

    #[test]
    fn a_last_full_crawl_in_the_future_is_not_trusted() {
        let now = datetime!(2026-07-01 00:00 UTC);
        let state = completed_at(now + Duration::hours(2));
        assert_eq!(scheduled_mode(Some(&state), now, FULL_SYNC_EVERY), SyncMode::Full);
    }
}
