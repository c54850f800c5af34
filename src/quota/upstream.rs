//! The shared upstream budget: a sliding window over slot start times, decided in process
//! ([`Upstream`]) or by Redis for every replica, plus the upstream's own feedback that holds the
//! budget until its window ends. See the module docs of [`super`] for the algorithm.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::memory::{lock, nanos};
use super::{OnBackendError, Quotas, UpstreamBudget};

/// The longest block taken from upstream feedback.
const MAX_FEEDBACK_BLOCK: Duration = Duration::from_secs(3600);

/// Why [`Quotas::upstream_slot`] found no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoSlot {
    /// The budget is spent; the next slot comes after this.
    Later(Duration),
    /// Redis could not decide and `on_backend_error = "deny"`.
    BackendUnavailable,
}

/// The memory backend's (and the `local` fallback's) view of the budget.
#[derive(Debug, Default, Clone)]
pub(super) struct UpState {
    /// The start times (ns) of the last `count` slots, oldest first; never decreasing.
    starts: VecDeque<u64>,
    pub(super) blocked_until: u64,
}

/// The configured budget and its in-process state.
pub(super) struct Upstream {
    pub(super) budget: UpstreamBudget,
    pub(super) state: Mutex<UpState>,
}

/// The sliding-window rule, written once for both backends (`lua/upstream.lua` is its Redis
/// twin): a slot starts at `now`, or when the `count`-th most recent start leaves the window,
/// or when a block ends, whichever is latest. So `count` slots start at once from idle, and no
/// span of `per` ever holds more than `count` starts (any `count + 1` consecutive starts are
/// `per` apart).
fn window_start(now: u64, blocked_until: u64, count_th_latest: Option<u64>, per: u64) -> u64 {
    let mut start = now.max(blocked_until);
    if let Some(oldest) = count_th_latest {
        start = start.max(oldest.saturating_add(per));
    }
    start
}

impl Upstream {
    fn reserve_local(&self, now: Duration) -> Result<Duration, Duration> {
        let now_ns = nanos(now);
        let count = usize::try_from(self.budget.rate.count.max(1)).unwrap_or(usize::MAX);
        let mut st = lock(&self.state);
        let oldest = (st.starts.len() >= count).then(|| st.starts[st.starts.len() - count]);
        let start = window_start(
            now_ns,
            st.blocked_until,
            oldest,
            nanos(self.budget.rate.per),
        );
        let delay = Duration::from_nanos(start - now_ns);
        if delay > self.budget.max_wait {
            return Err(delay);
        }
        st.starts.push_back(start);
        while st.starts.len() > count {
            st.starts.pop_front();
        }
        Ok(delay)
    }

    fn block_local(&self, now: Duration, len: Duration) {
        let until = nanos(now.saturating_add(len));
        let mut st = lock(&self.state);
        st.blocked_until = st.blocked_until.max(until);
    }
}

impl Quotas {
    /// A slot in the shared upstream budget: waits up to `max_wait` for it, or answers at once
    /// with [`NoSlot::Later`] when none comes in time. `Ok` at once when no budget is configured.
    /// With Redis, the budget is shared by all replicas; when Redis cannot decide and
    /// `on_backend_error = "deny"`, [`NoSlot::BackendUnavailable`].
    pub async fn upstream_slot(&self) -> Result<(), NoSlot> {
        let inner = &self.inner;
        let Some(up) = &inner.upstream else {
            return Ok(());
        };
        let mut decision = None;
        if let Some(store) = &inner.redis {
            if store.should_try() {
                decision = store.upstream(up.budget).await.ok();
            }
            if decision.is_none() {
                inner.backend_errors.fetch_add(1, Ordering::Relaxed);
                decision = Some(match inner.on_backend_error {
                    OnBackendError::Deny => return Err(NoSlot::BackendUnavailable),
                    OnBackendError::Allow => {
                        inner.allowed.fetch_add(1, Ordering::Relaxed);
                        Ok(Duration::ZERO)
                    }
                    OnBackendError::Local => up.reserve_local(inner.clock.now()),
                });
            }
        }
        let decision = decision.unwrap_or_else(|| up.reserve_local(inner.clock.now()));
        match decision {
            Ok(delay) => {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                Ok(())
            }
            Err(retry_after) => Err(NoSlot::Later(retry_after)),
        }
    }

    /// What the upstream said about its own limit (`X-RateLimit-Remaining` and the time to the
    /// end of its window). When nothing remains, the budget is held until the window ends (the
    /// budget's period when the upstream did not say), so this and every replica pace ahead of
    /// the upstream's 429. Ignored when no budget is configured.
    pub fn upstream_feedback(&self, remaining: Option<u64>, reset_after: Option<Duration>) {
        let inner = &self.inner;
        let Some(up) = &inner.upstream else {
            return;
        };
        if remaining != Some(0) {
            return;
        }
        let block = reset_after
            .unwrap_or(up.budget.rate.per)
            .min(MAX_FEEDBACK_BLOCK);
        if block.is_zero() {
            return;
        }
        up.block_local(inner.clock.now(), block);
        if let Some(store) = &inner.redis
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            let store = Arc::clone(store);
            handle.spawn(async move {
                let _ = store.feedback(block).await;
            });
        }
    }
}
