//! The in-process backend (also the `on_backend_error = "local"` fallback): one small mutex per
//! team, held for the few comparisons of one decision, so all of a request's checks are decided
//! and spent together and teams never contend with each other.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use serde_json::{Value, json};

use super::plan::{DailyObs, Observation, RateObs, TeamPlan};

pub(crate) const DAY_SECS: u64 = 86_400;
/// What a refusal for concurrency tells the caller to wait: leases have no predictable end.
pub(crate) const CONCURRENCY_RETRY: Duration = Duration::from_secs(1);

/// Locks, ignoring poisoning: the guarded values are plain numbers that are valid after any
/// panic (no invariant spans two of them outside a single assignment block).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Time from `now` (since the UNIX epoch) to the next 00:00 UTC, and the day number.
pub(crate) fn day_and_reset(now: Duration) -> (u64, Duration) {
    let day = now.as_secs() / DAY_SECS;
    let midnight = Duration::from_secs((day + 1) * DAY_SECS);
    (day, midnight.saturating_sub(now))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    Admitted,
    Rate,
    Daily,
    Concurrency,
}

/// One decision: the outcome, how long to wait when refused, and what was seen.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Verdict {
    pub status: Status,
    pub retry_after: Duration,
    pub obs: Observation,
}

/// Which refusal wins when several limits refuse: the daily quota (the longest wait), then the
/// rates (the longest of their waits), then concurrency.
pub(crate) fn decide(
    daily_exhausted: Option<Duration>,
    rate_wait: Option<Duration>,
    concurrency_full: bool,
) -> (Status, Duration) {
    if let Some(until_reset) = daily_exhausted {
        (Status::Daily, until_reset)
    } else if let Some(wait) = rate_wait {
        (Status::Rate, wait)
    } else if concurrency_full {
        (Status::Concurrency, CONCURRENCY_RETRY)
    } else {
        (Status::Admitted, Duration::ZERO)
    }
}

/// A daily count: the UTC day number it belongs to and what was admitted on it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DayCount {
    pub day: u64,
    pub used: u64,
}

impl DayCount {
    /// What was admitted on `day` (a count of another day is spent).
    pub fn on(self, day: u64) -> u64 {
        if self.day == day { self.used } else { 0 }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct OpState {
    tat: u64,
    daily: DayCount,
}

#[derive(Debug)]
struct TeamState {
    tat: u64,
    daily: DayCount,
    ops: Vec<OpState>,
}

/// What the last Redis reply said about a team (for `snapshot`, which cannot wait for Redis).
#[derive(Debug, Default, Clone)]
pub(crate) struct Observed {
    pub team_tat_us: Option<u64>,
    pub in_use: Option<u32>,
    pub team_daily: Option<DayCount>,
    pub ops: HashMap<usize, ObservedOp>,
}

#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ObservedOp {
    pub tat_us: Option<u64>,
    pub daily: Option<DayCount>,
}

/// One team: its compiled limits, its in-process state and what Redis last said about it.
pub(crate) struct TeamSlot {
    pub plan: TeamPlan,
    state: Mutex<TeamState>,
    /// Memory leases alive. Only incremented under `state`'s lock (so the cap is exact);
    /// decremented lock-free when an `Admission` drops. Shared with the slot that replaces this
    /// one on reload, so leases taken under either count against the cap together.
    inflight: Arc<AtomicU32>,
    /// Redis leases held by this replica (the cluster-wide count is in Redis).
    pub redis_inflight: Arc<AtomicU32>,
    pub observed: Mutex<Observed>,
    /// Set (under `state`'s lock) when a reload replaced this team's limits: its counts moved
    /// there, and a request still holding this slot is decided by the successor.
    successor: OnceLock<Arc<TeamSlot>>,
}

impl TeamSlot {
    pub fn new(plan: TeamPlan) -> TeamSlot {
        let ops = vec![OpState::default(); plan.ops.len()];
        TeamSlot {
            plan,
            state: Mutex::new(TeamState {
                tat: 0,
                daily: DayCount::default(),
                ops,
            }),
            inflight: Arc::new(AtomicU32::new(0)),
            redis_inflight: Arc::new(AtomicU32::new(0)),
            observed: Mutex::new(Observed::default()),
            successor: OnceLock::new(),
        }
    }

    /// The slot for `plan` that takes over from `old` (a reload changed the team's limits): the
    /// team's counts and every operation's counts (by name) carry over, so requests already
    /// counted stay counted and the new limits apply from the next decision. `old` is retired in
    /// the same step, under its lock, so no decision is taken by both or by neither.
    pub fn succeed(old: &Arc<TeamSlot>, plan: TeamPlan) -> Arc<TeamSlot> {
        let old = old.current();
        let st = lock(&old.state);
        let ops = plan
            .ops
            .iter()
            .map(|op| {
                old.plan
                    .op(&op.name)
                    .and_then(|(i, _)| st.ops.get(i).copied())
                    .unwrap_or_default()
            })
            .collect();
        let seen = lock(&old.observed).clone();
        let observed = Observed {
            ops: seen
                .ops
                .iter()
                .filter_map(|(i, o)| {
                    let name = &old.plan.ops.get(*i)?.name;
                    Some((plan.op(name)?.0, *o))
                })
                .collect(),
            ..seen
        };
        let new = Arc::new(TeamSlot {
            plan,
            state: Mutex::new(TeamState {
                tat: st.tat,
                daily: st.daily,
                ops,
            }),
            inflight: old.inflight.clone(),
            redis_inflight: old.redis_inflight.clone(),
            observed: Mutex::new(observed),
            successor: OnceLock::new(),
        });
        let _ = old.successor.set(new.clone());
        drop(st);
        new
    }

    /// The slot in force for this team: itself, or the one a reload put in its place.
    pub fn current(self: &Arc<Self>) -> Arc<TeamSlot> {
        let mut slot = self.clone();
        while let Some(next) = slot.successor.get().cloned() {
            slot = next;
        }
        slot
    }

    /// The index, in `self`'s plan, of the operation `op` indexes in `from`'s plan.
    pub fn op_from(&self, from: &TeamSlot, op: Option<usize>) -> Option<usize> {
        let name = &from.plan.ops.get(op?)?.name;
        self.plan.op(name).map(|(i, _)| i)
    }

    /// All of a request's checks against the in-process state; spends in every counter or in
    /// none. A concurrency lease, when admitted, must be given back with `release`.
    ///
    /// The clock is read under the team's lock, so the order of decisions is the order of their
    /// times: with `now` read before the lock, a request that waited for it would be judged at
    /// an earlier time than the one decided before it, and both would report the same remaining
    /// count.
    ///
    /// `None` when a reload retired this slot: ask [`TeamSlot::current`].
    pub fn admit(&self, op: Option<usize>, now: impl FnOnce() -> Duration) -> Option<Verdict> {
        let op_plan = op.and_then(|i| self.plan.ops.get(i));
        let mut st = lock(&self.state);
        if self.successor.get().is_some() {
            return None;
        }
        let now = now();
        let now_ns = nanos(now);
        let (day, until_reset) = day_and_reset(now);
        let team_tat = st.tat;
        let op_state = op.and_then(|i| st.ops.get(i).copied()).unwrap_or_default();

        let team_check = self.plan.rate.map(|r| r.ns.check(team_tat, now_ns));
        let op_check = op_plan
            .and_then(|p| p.rate)
            .map(|r| r.ns.check(op_state.tat, now_ns));
        let used = op_state.daily.on(day);
        let team_used = st.daily.on(day);
        let op_daily_full = op_plan
            .and_then(|p| p.daily)
            .is_some_and(|limit| used >= limit);
        let team_daily_full = self.plan.daily.is_some_and(|limit| team_used >= limit);
        let daily_exhausted = (op_daily_full || team_daily_full).then_some(until_reset);
        let rate_wait = [team_check, op_check]
            .into_iter()
            .flatten()
            .filter_map(Result::err)
            .max()
            .map(Duration::from_nanos);
        let in_use = self.inflight.load(Ordering::Acquire);
        let concurrency_full = self.plan.concurrency.is_some_and(|c| in_use >= c);
        let (status, retry_after) = decide(daily_exhausted, rate_wait, concurrency_full);

        let admitted = status == Status::Admitted;
        let mut team_after = team_tat;
        let mut op_after = op_state;
        if admitted {
            if let Some(Ok(t)) = team_check {
                team_after = t;
                st.tat = t;
            }
            if self.plan.daily.is_some() {
                st.daily = DayCount {
                    day,
                    used: team_used + 1,
                };
            }
            if let Some(Ok(t)) = op_check {
                op_after.tat = t;
            }
            if op_plan.is_some_and(|p| p.daily.is_some()) {
                op_after.daily = DayCount {
                    day,
                    used: used + 1,
                };
            }
            if let Some(slot) = op.and_then(|i| st.ops.get_mut(i)) {
                *slot = op_after;
            }
            if self.plan.concurrency.is_some() {
                self.inflight.fetch_add(1, Ordering::AcqRel);
            }
        }
        drop(st);

        let observe = |g: &super::gcra::Gcra, tat: u64| {
            let (remaining, next) = g.observe(tat, now_ns);
            RateObs {
                remaining,
                next: Duration::from_nanos(next),
            }
        };
        let obs = Observation {
            team: self.plan.rate.map(|r| observe(&r.ns, team_after)),
            in_use: self.plan.concurrency.map(|_| in_use + u32::from(admitted)),
            op: op_plan
                .and_then(|p| p.rate)
                .map(|r| observe(&r.ns, op_after.tat)),
            daily: op_plan.and_then(|p| p.daily).map(|_| DailyObs {
                used: if admitted { used + 1 } else { used },
                until_reset,
            }),
            team_daily: self.plan.daily.map(|_| DailyObs {
                used: team_used + u64::from(admitted),
                until_reset,
            }),
        };
        Some(Verdict {
            status,
            retry_after,
            obs,
        })
    }

    /// Gives back a memory concurrency lease.
    pub fn release(&self) {
        let _ = self
            .inflight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Live usage of the in-process state, for `snapshot`.
    pub fn usage(&self, now: Duration) -> Value {
        let now_ns = nanos(now);
        let (day, _) = day_and_reset(now);
        let st = lock(&self.state);
        let team_tat = st.tat;
        let team_used = st.daily.on(day);
        let ops = st.ops.clone();
        drop(st);
        let mut out = json!({});
        if self.plan.daily.is_some() {
            out["daily_used"] = json!(team_used);
        }
        if self.plan.concurrency.is_some() {
            out["in_flight"] = json!(self.inflight.load(Ordering::Acquire));
        }
        if let Some(r) = &self.plan.rate {
            out["remaining_burst"] = json!(r.ns.observe(team_tat, now_ns).0);
        }
        let mut op_usage = serde_json::Map::new();
        for (plan, state) in self.plan.ops.iter().zip(ops) {
            let mut u = json!({});
            if let Some(r) = &plan.rate {
                u["remaining_burst"] = json!(r.ns.observe(state.tat, now_ns).0);
            }
            if plan.daily.is_some() {
                u["daily_used"] = json!(state.daily.on(day));
            }
            op_usage.insert(plan.name.clone(), u);
        }
        out["operations"] = Value::Object(op_usage);
        out
    }
}
