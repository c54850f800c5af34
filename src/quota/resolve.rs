//! Quotas resolved once at load, and carried across reloads.
//!
//! A team's quota is resolved into a [`TeamQuota`] (its slot, and per route the index of the
//! operation's limits in the team's plan), so a request admits without looking anything up by
//! name. On reload, [`Quotas::reconfigured`] keeps every team whose limits did not change on its
//! very slot (and counters), hands a changed team's counts over to a slot with the new limits
//! (which apply from the next decision), and drops removed teams.

use std::sync::{Arc, Mutex};

use super::admission::Admission;
use super::memory::{TeamSlot, lock};
use super::plan::TeamPlan;
use super::upstream::{UpState, Upstream};
use super::{Inner, QuotaSettings, Quotas, Refusal};

/// A team's quota, resolved: no slot when the team has no limits.
#[derive(Clone, Default)]
pub struct TeamQuota {
    slot: Option<Arc<TeamSlot>>,
    /// By route index: the operation's position in the team's plan, when it has limits of its
    /// own.
    ops: Vec<Option<usize>>,
}

impl Quotas {
    /// Resolves a team's quota for the operations of a spec, in route order.
    pub fn resolve(&self, team: &str, operations: &[&str]) -> TeamQuota {
        let Some(slot) = self.inner.teams.get(team) else {
            return TeamQuota::default();
        };
        TeamQuota {
            ops: operations
                .iter()
                .map(|op| slot.plan.op(op).map(|(i, _)| i))
                .collect(),
            slot: Some(slot.clone()),
        }
    }

    /// All checks for one request of a resolved team to the operation at `route` (see
    /// [`Quotas::admit`]).
    pub async fn admit_team(&self, quota: &TeamQuota, route: usize) -> Result<Admission, Refusal> {
        match &quota.slot {
            None => Ok(Admission::unlimited()),
            Some(slot) => {
                self.admit_slot(slot, quota.ops.get(route).copied().flatten())
                    .await
            }
        }
    }

    /// The quotas for a reloaded configuration, sharing this one's backend, clock and
    /// counters. The backend itself (memory or Redis, and its address) is fixed for the life of
    /// the process: a reload that changes it is refused before this is called.
    pub fn reconfigured(&self, settings: &QuotaSettings) -> Quotas {
        let old = &self.inner;
        let teams = settings
            .teams
            .iter()
            .map(|(name, limits)| {
                let slot = match old.teams.get(name) {
                    Some(same) if old.limits.get(name) == Some(limits) => same.clone(),
                    Some(changed) => {
                        TeamSlot::succeed(changed, TeamPlan::new(name, limits, &old.prefix))
                    }
                    None => Arc::new(TeamSlot::new(TeamPlan::new(name, limits, &old.prefix))),
                };
                (name.clone(), slot)
            })
            .collect();
        // The upstream budget keeps its window when only its numbers change, so a reload never
        // lets a burst past what Greenhouse already counted.
        let upstream = match (&old.upstream, settings.upstream) {
            (Some(up), Some(budget)) if up.budget == budget => Some(up.clone()),
            (Some(up), Some(budget)) => Some(Arc::new(Upstream {
                budget,
                state: Mutex::new(lock(&up.state).clone()),
            })),
            (None, Some(budget)) => Some(Arc::new(Upstream {
                budget,
                state: Mutex::new(UpState::default()),
            })),
            (_, None) => None,
        };
        Quotas {
            inner: Arc::new(Inner {
                teams,
                limits: settings.teams.clone(),
                prefix: old.prefix.clone(),
                on_backend_error: settings.on_backend_error,
                clock: old.clock.clone(),
                redis: old.redis.clone(),
                upstream,
                allowed: old.allowed.clone(),
                backend_errors: old.backend_errors.clone(),
            }),
        }
    }
}

impl TeamQuota {
    /// What one request to the operation at `route` would be charged, one line per limit with
    /// the key it is counted under (the Redis key; the memory backend counts the same limits in
    /// process). Empty when nothing limits it. Nothing is read or spent.
    pub fn describe(&self, route: usize) -> Vec<String> {
        let Some(slot) = &self.slot else {
            return Vec::new();
        };
        let plan = &slot.plan;
        let mut out = Vec::new();
        if let Some(r) = &plan.rate {
            out.push(format!(
                "team rate {} (burst {}) as {}",
                r.rate, r.burst, plan.rate_key
            ));
        }
        if let Some(c) = plan.concurrency {
            out.push(format!(
                "team concurrency {c} in flight as {}",
                plan.inflight_key
            ));
        }
        if let Some(d) = plan.daily {
            out.push(format!("team daily {d} as {}", plan.daily_key));
        }
        if let Some(op) = self
            .ops
            .get(route)
            .copied()
            .flatten()
            .and_then(|i| plan.ops.get(i))
        {
            if let Some(r) = &op.rate {
                out.push(format!(
                    "operation rate {} (burst {}) as {}",
                    r.rate, r.burst, op.rate_key
                ));
            }
            if let Some(d) = op.daily {
                out.push(format!("operation daily {d} as {}", op.daily_key));
            }
        }
        out
    }
}
