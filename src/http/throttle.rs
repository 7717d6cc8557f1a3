//! Failed authentication slowed per peer address: after `limit` refusals (no key, a key that is not one) from one
//! address within `window`, that address gets 429 with `Retry-After` until the window ends, without its keys being
//! looked at. A guessing attacker gets `limit` tries a window instead of as many as the socket carries; a partner
//! whose key was rotated under it is told to wait, not shut out for good.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most addresses remembered; past it, addresses whose window has ended are forgotten first.
const MOST_PEERS: usize = 65_536;

/// Failures counted per address, in fixed windows.
#[derive(Debug)]
pub struct FailedAuth {
    limit: u32,
    window: Duration,
    peers: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl FailedAuth {
    /// `limit` failures per `window` (0: never slowed).
    #[must_use]
    pub fn new(limit: u32, window: Duration) -> Self {
        FailedAuth { limit, window, peers: Mutex::new(HashMap::new()) }
    }

    /// How long `peer` must wait at `now`, when it is slowed.
    #[must_use]
    pub fn wait(&self, peer: IpAddr, now: Instant) -> Option<Duration> {
        if self.limit == 0 {
            return None;
        }
        let peers = self.peers.lock().ok()?;
        let (start, failures) = *peers.get(&peer)?;
        let ends = start + self.window;
        (failures >= self.limit && ends > now).then(|| ends - now)
    }

    /// Counts a failure of `peer` at `now`.
    pub fn failed(&self, peer: IpAddr, now: Instant) {
        if self.limit == 0 {
            return;
        }
        let Ok(mut peers) = self.peers.lock() else { return };
        if peers.len() >= MOST_PEERS && !peers.contains_key(&peer) {
            let window = self.window;
            peers.retain(|_, (start, _)| *start + window > now);
            if peers.len() >= MOST_PEERS {
                // Every address is in a live window (a wide attack): the oldest window goes.
                if let Some(oldest) = peers.iter().min_by_key(|(_, (start, _))| *start).map(|(ip, _)| *ip) {
                    peers.remove(&oldest);
                }
            }
        }
        let entry = peers.entry(peer).or_insert((now, 0));
        if entry.0 + self.window <= now {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_slowed_after_the_limit_until_its_window_ends_and_others_are_not() {
        let t = FailedAuth::new(3, Duration::from_secs(60));
        let (a, b): (IpAddr, IpAddr) = ([10, 0, 0, 1].into(), [10, 0, 0, 2].into());
        let t0 = Instant::now();
        for k in 0..3 {
            assert_eq!(t.wait(a, t0), None, "failure {k}");
            t.failed(a, t0 + Duration::from_secs(k));
        }
        assert_eq!(t.wait(a, t0 + Duration::from_secs(10)), Some(Duration::from_secs(50)));
        assert_eq!(t.wait(b, t0 + Duration::from_secs(10)), None);
        assert_eq!(t.wait(a, t0 + Duration::from_secs(60)), None, "the window ended");
        t.failed(a, t0 + Duration::from_secs(61));
        assert_eq!(t.wait(a, t0 + Duration::from_secs(62)), None, "a new window counts from one");
        assert_eq!(FailedAuth::new(0, Duration::from_secs(60)).wait(a, t0), None);
    }
}
