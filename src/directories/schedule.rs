//! When a directory sync is due, and which kind: pure decisions over what the store remembers and the instant the
//! caller passes, so tests step time instead of waiting.

use time::{Duration, OffsetDateTime};

use super::SyncMode;
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
