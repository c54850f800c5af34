//! Concurrency leases given back to Redis but not yet removed there (see "Leases given back" in
//! [`super::redis_store`]): the next admission carries them, or a flush after
//! [`RELEASE_LINGER`]. Bounded: beyond [`MAX_PENDING`] a lease is not kept, and comes back in
//! Redis when it expires, as when its removal fails.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::memory::lock;

/// How long a lease given back waits for an admission to carry it before it is flushed alone.
pub(crate) const RELEASE_LINGER: Duration = Duration::from_millis(5);
/// Leases one admission carries at most (the rest wait for the next call or the flush).
pub(crate) const RELEASES_PER_CALL: usize = 64;
/// From this many waiting, the flush goes at once instead of waiting for the linger.
const FLUSH_AT: usize = 1024;
/// Leases kept waiting at most (Redis away and the flush failing).
const MAX_PENDING: usize = 8192;

/// A lease given back: its key, its id, and when.
struct Waiting {
    key: String,
    id: String,
    since: Instant,
}

#[derive(Default)]
pub(crate) struct PendingReleases {
    queue: Mutex<VecDeque<Waiting>>,
    /// Wakes the flush: a lease is waiting.
    wake: Notify,
}

impl PendingReleases {
    /// A lease given back at `now`.
    pub fn push(&self, key: String, id: String, now: Instant) {
        let mut q = lock(&self.queue);
        if q.len() >= MAX_PENDING {
            return;
        }
        q.push_back(Waiting {
            key,
            id,
            since: now,
        });
        drop(q);
        // Every time, not only for a first lease: after a failed flush the queue is not empty,
        // and the flush waits for a wake to try again. A wake that finds the flush busy is kept
        // as one permit.
        self.wake.notify_one();
    }

    /// Up to `max` waiting leases, oldest first: an admission carries them.
    pub fn take(&self, max: usize) -> Vec<(String, String)> {
        let mut q = lock(&self.queue);
        let n = q.len().min(max);
        q.drain(..n).map(|w| (w.key, w.id)).collect()
    }

    /// The leases given back before `cutoff` (all of them when there are many): the flush's
    /// share. Younger ones wait for an admission a little longer.
    pub fn take_older(&self, cutoff: Instant) -> Vec<(String, String)> {
        let mut q = lock(&self.queue);
        let n = if q.len() >= FLUSH_AT {
            q.len()
        } else {
            q.iter().take_while(|w| w.since <= cutoff).count()
        };
        q.drain(..n).map(|w| (w.key, w.id)).collect()
    }

    /// When the oldest waiting lease was given back.
    pub fn oldest(&self) -> Option<Instant> {
        lock(&self.queue).front().map(|w| w.since)
    }

    /// Whether so many wait that the flush should not linger.
    pub fn overfull(&self) -> bool {
        lock(&self.queue).len() >= FLUSH_AT
    }

    /// Leases a failed call may not have removed: they wait again (first in line), within the
    /// bound, for the next admission or the flush after the next lease given back.
    pub fn put_back(&self, leases: Vec<(String, String)>) {
        let mut q = lock(&self.queue);
        let room = MAX_PENDING.saturating_sub(q.len());
        let since = q.front().map_or_else(Instant::now, |w| w.since);
        for (key, id) in leases.into_iter().take(room).rev() {
            q.push_front(Waiting { key, id, since });
        }
    }

    /// Resolves when the flush has work (or the store is gone: see [`PendingReleases::wake`]).
    pub async fn woken(&self) {
        self.wake.notified().await;
    }

    /// Wakes the flush.
    pub fn wake(&self) {
        self.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[(String, String)]) -> Vec<&str> {
        v.iter().map(|(_, id)| id.as_str()).collect()
    }

    #[test]
    fn an_admission_takes_the_oldest_leases_up_to_its_share() {
        let p = PendingReleases::default();
        let t = Instant::now();
        for i in 0..5 {
            p.push("k".into(), format!("{i}"), t);
        }
        assert_eq!(ids(&p.take(3)), ["0", "1", "2"]);
        assert_eq!(ids(&p.take(10)), ["3", "4"]);
        assert!(p.oldest().is_none());
    }

    #[test]
    fn the_flush_takes_only_leases_that_have_lingered() {
        let p = PendingReleases::default();
        let t = Instant::now();
        p.push("k".into(), "old".into(), t);
        p.push("k".into(), "young".into(), t + Duration::from_millis(4));
        assert_eq!(ids(&p.take_older(t + Duration::from_millis(1))), ["old"]);
        assert_eq!(p.oldest(), Some(t + Duration::from_millis(4)));
    }

    #[test]
    fn many_waiting_leases_are_flushed_without_lingering() {
        let p = PendingReleases::default();
        let t = Instant::now();
        for i in 0..FLUSH_AT {
            p.push("k".into(), format!("{i}"), t);
        }
        assert!(p.overfull());
        assert_eq!(p.take_older(t - Duration::from_secs(1)).len(), FLUSH_AT);
    }

    #[tokio::test]
    async fn a_lease_given_back_after_a_failed_flush_wakes_the_flush_again() {
        let p = PendingReleases::default();
        let t = Instant::now();
        p.push("k".into(), "a".into(), t);
        p.woken().await;
        // the flush took it and failed: it waits again, and the flush waits for a wake
        let taken = p.take_older(t);
        p.put_back(taken);
        p.push("k".into(), "b".into(), t);
        let woken = tokio::time::timeout(Duration::from_secs(5), p.woken()).await;
        assert!(
            woken.is_ok(),
            "the flush was not woken: the leases would wait for an admission"
        );
        assert_eq!(ids(&p.take_older(Instant::now())), ["a", "b"]);
    }

    #[test]
    fn leases_beyond_the_bound_are_not_kept_and_put_back_ones_go_first() {
        let p = PendingReleases::default();
        let t = Instant::now();
        for i in 0..MAX_PENDING + 10 {
            p.push("k".into(), format!("{i}"), t);
        }
        assert_eq!(lock(&p.queue).len(), MAX_PENDING);
        let taken = p.take(2);
        p.push("k".into(), "new".into(), t);
        // room for one: the first of the two goes back, ahead of the rest
        p.put_back(taken);
        assert_eq!(lock(&p.queue).len(), MAX_PENDING);
        assert_eq!(ids(&p.take(2)), ["0", "2"]);
    }
}
