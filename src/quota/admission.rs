//! What [`Quotas::admit`](super::Quotas::admit) hands back: an [`Admission`], which holds the
//! team's concurrency lease and gives it back when dropped. Kept apart from the decision code so
//! the lease's lifetime rules can be read in one place.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::RateLimitHeaders;
use super::memory::TeamSlot;
use super::redis_store::RedisStore;

/// Who decided an admission (see [`Admission::source`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    Unlimited,
    Memory,
    Redis,
    Local,
    Allowed,
}

/// A concurrency lease, held by an [`Admission`] until it is given back.
pub(super) enum Lease {
    Memory(Arc<TeamSlot>),
    Redis {
        store: Arc<RedisStore>,
        slot: Arc<TeamSlot>,
        id: String,
    },
}

impl Lease {
    fn release_in_background(self) {
        match self {
            Lease::Memory(slot) => slot.release(),
            Lease::Redis { store, slot, id } => {
                slot.redis_inflight.fetch_sub(1, Ordering::AcqRel);
                store.release(slot.plan.inflight_key.clone(), id);
            }
        }
    }

    async fn release_now(self) {
        match self {
            Lease::Memory(slot) => slot.release(),
            Lease::Redis { store, slot, id } => {
                slot.redis_inflight.fetch_sub(1, Ordering::AcqRel);
                store.release_now(&slot.plan.inflight_key, &id).await;
            }
        }
    }
}

/// An admitted request. Holds the team's concurrency lease until dropped (whatever the outcome
/// of the request: success and error paths both just drop it). Take the headers with
/// `std::mem::take(&mut admission.headers)` — moving them out is refused by the compiler, which
/// keeps the lease from being dropped early.
pub struct Admission {
    /// `RateLimit-Policy` and `RateLimit` for the response (empty when the team has no limits).
    pub headers: RateLimitHeaders,
    pub(super) source: Source,
    pub(super) lease: Option<Lease>,
}

impl Admission {
    pub(super) fn unlimited() -> Admission {
        Admission {
            headers: Vec::new(),
            source: Source::Unlimited,
            lease: None,
        }
    }

    /// Who decided (for the audit record): `none` (the team has no limits), `memory`, `redis`,
    /// `local` (Redis failed, in-process fallback) or `allowed` (Redis failed,
    /// `on_backend_error = "allow"`).
    pub fn source(&self) -> &'static str {
        match self.source {
            Source::Unlimited => "none",
            Source::Memory => "memory",
            Source::Redis => "redis",
            Source::Local => "local",
            Source::Allowed => "allowed",
        }
    }

    /// Gives the concurrency lease back now, waiting (within the backend deadline) for Redis to
    /// confirm; dropping does the same in the background.
    pub async fn release(mut self) {
        if let Some(lease) = self.lease.take() {
            lease.release_now().await;
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.release_in_background();
        }
    }
}

impl fmt::Debug for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission")
            .field("headers", &self.headers)
            .field("source", &self.source())
            .field("holds_lease", &self.lease.is_some())
            .finish()
    }
}
