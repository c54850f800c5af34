//! The admin view of the quotas (`GET /admin/teams`): every team's limits and usage, read
//! without waiting for Redis.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{Map, Value, json};

use super::memory::{TeamSlot, lock, nanos};
use super::plan::{RatePlan, TeamPlan};
use super::redis_store::RedisStore;
use super::{OnBackendError, Quotas, micros};

impl Quotas {
    /// For `GET /admin/teams`: per team, its limits and its usage — live for the memory backend;
    /// for Redis, estimated now from the state the last decision saw (`usage_source`), since
    /// this never waits for Redis.
    pub fn snapshot(&self) -> Value {
        let inner = &self.inner;
        let now = inner.clock.now();
        let mut teams = Map::new();
        for (name, slot) in &inner.teams {
            let mut team = json!({ "limits": limits_json(&slot.plan) });
            match &inner.redis {
                None => {
                    team["usage"] = slot.usage(now);
                    team["usage_source"] = json!("memory");
                }
                Some(store) => {
                    team["usage"] = redis_usage(slot, store, now);
                    team["usage_source"] = json!("redis_last_seen");
                    if inner.on_backend_error == OnBackendError::Local {
                        team["local_fallback_usage"] = slot.usage(now);
                    }
                }
            }
            teams.insert(name.clone(), team);
        }
        let upstream = inner.upstream.as_ref().map(|up| {
            let st = lock(&up.state);
            let blocked = st.blocked_until.saturating_sub(nanos(now));
            drop(st);
            json!({
                "rate": up.budget.rate.to_string(),
                "max_wait_ms": u64::try_from(up.budget.max_wait.as_millis()).unwrap_or(u64::MAX),
                "blocked_for_ms": blocked / 1_000_000,
            })
        });
        let problem = inner.redis.as_ref().and_then(|s| s.problem());
        json!({
            "backend": if inner.redis.is_some() { "redis" } else { "memory" },
            "on_backend_error": inner.on_backend_error.as_str(),
            "backend_problem": problem,
            "backend_errors_allowed": self.backend_errors_allowed(),
            "upstream": upstream,
            "teams": teams,
        })
    }
}

fn rate_json(rate: Option<&RatePlan>) -> (Value, Value) {
    match rate {
        Some(r) => (json!(r.rate.to_string()), json!(r.burst)),
        None => (Value::Null, Value::Null),
    }
}

fn limits_json(plan: &TeamPlan) -> Value {
    let (rate, burst) = rate_json(plan.rate.as_ref());
    let mut ops = Map::new();
    for op in &plan.ops {
        let (rate, burst) = rate_json(op.rate.as_ref());
        ops.insert(
            op.name.clone(),
            json!({ "rate": rate, "burst": burst, "daily": op.daily }),
        );
    }
    json!({
        "rate": rate,
        "burst": burst,
        "concurrency": plan.concurrency,
        "daily": plan.daily,
        "operations": ops,
    })
}

fn redis_usage(slot: &TeamSlot, store: &RedisStore, now: Duration) -> Value {
    let offset = store.clock_offset_us.load(Ordering::Relaxed);
    let est = i128::from(micros(now)) + i128::from(offset);
    let est = u64::try_from(est.max(0)).unwrap_or(u64::MAX);
    let day = est / 86_400_000_000;
    let seen = lock(&slot.observed).clone();
    let plan = &slot.plan;
    let mut out = json!({});
    if plan.concurrency.is_some() {
        out["in_flight"] = json!(seen.in_use);
        out["in_flight_here"] = json!(slot.redis_inflight.load(Ordering::Acquire));
    }
    if let Some(r) = &plan.rate {
        out["remaining_burst"] = json!(r.us.observe(seen.team_tat_us.unwrap_or(0), est).0);
    }
    if plan.daily.is_some() {
        out["daily_used"] = json!(seen.team_daily.map_or(0, |c| c.on(day)));
    }
    let mut ops = Map::new();
    for (i, op) in plan.ops.iter().enumerate() {
        let o = seen.ops.get(&i).copied().unwrap_or_default();
        let mut u = json!({});
        if let Some(r) = &op.rate {
            u["remaining_burst"] = json!(r.us.observe(o.tat_us.unwrap_or(0), est).0);
        }
        if op.daily.is_some() {
            u["daily_used"] = json!(o.daily.map_or(0, |c| c.on(day)));
        }
        ops.insert(op.name.clone(), u);
    }
    out["operations"] = Value::Object(ops);
    out
}
