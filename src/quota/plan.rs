//! Limits compiled once per team and operation: GCRA parameters in both time units, the Redis
//! key names and the static `RateLimit-Policy` value; plus the rendering of the live `RateLimit`
//! value from what a backend observed.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use http::{HeaderName, HeaderValue};

use super::gcra::Gcra;
use super::{Limit, OpLimits, RateLimitHeaders, TeamLimits};
use crate::values::Rate;

/// Memory backend unit: nanoseconds.
pub(crate) const NANOS: Duration = Duration::from_nanos(1);
/// Redis script unit: microseconds.
pub(crate) const MICROS: Duration = Duration::from_micros(1);

// The team-wide policy names in the rate-limit headers, written as the structured-field strings
// the headers carry (each is its `sf_string`, checked by a test), so no response quotes them.
/// The policy name of the team-wide rate.
const TEAM_POLICY: &str = "\"team\"";
/// The policy name of the team's concurrency cap.
const TEAM_CONCURRENCY_POLICY: &str = "\"team-concurrency\"";
/// The policy name of the team's daily quota (all operations together).
const TEAM_DAILY_POLICY: &str = "\"team-daily\"";
/// Suffix of an operation's daily quota policy name.
const DAILY_SUFFIX: &str = "-daily";
/// The rate-limit headers' names (draft-ietf-httpapi-ratelimit-headers), made once.
const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
const DAY_SECS: u64 = 86_400;

/// A rate limit in both units.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RatePlan {
    pub rate: Rate,
    pub burst: u32,
    pub ns: Gcra,
    pub us: Gcra,
}

impl RatePlan {
    pub fn from_limit(limit: &Limit) -> Option<RatePlan> {
        let rate = limit.rate?;
        let burst = limit.burst.unwrap_or(rate.count).max(1);
        Some(RatePlan {
            rate,
            burst,
            ns: Gcra::new(rate, burst, NANOS),
            us: Gcra::new(rate, burst, MICROS),
        })
    }
}

pub(crate) struct TeamPlan {
    pub rate: Option<RatePlan>,
    pub concurrency: Option<u32>,
    pub daily: Option<u64>,
    pub ops: Vec<OpPlan>,
    pub op_index: HashMap<String, usize>,
    /// `RateLimit-Policy` for a request whose operation has no limits of its own.
    pub policy: Option<HeaderValue>,
    pub rate_key: String,
    pub inflight_key: String,
    pub daily_key: String,
    /// `{prefix}:team:{team}`: the stem of the team's keys.
    pub team_key: String,
}

pub(crate) struct OpPlan {
    pub name: String,
    pub rate: Option<RatePlan>,
    pub daily: Option<u64>,
    /// `RateLimit-Policy` for a request to this operation: the team's policies and its own.
    pub policy: Option<HeaderValue>,
    pub sf_name: String,
    pub sf_daily_name: String,
    pub rate_key: String,
    pub daily_key: String,
}

impl TeamPlan {
    pub fn new(name: &str, limits: &TeamLimits, prefix: &str) -> TeamPlan {
        let rate = RatePlan::from_limit(&limits.limit);
        let concurrency = limits.concurrency.filter(|c| *c > 0);
        let daily = limits.daily;
        let team_key = format!("{prefix}:team:{}", key_part(name));
        let mut team_items = Vec::new();
        if let Some(r) = &rate {
            team_items.push(rate_policy_item(TEAM_POLICY, r));
        }
        if let Some(c) = concurrency {
            team_items.push(format!(
                "{TEAM_CONCURRENCY_POLICY};q={c};qu=\"concurrent-requests\""
            ));
        }
        if let Some(d) = daily {
            team_items.push(format!("{TEAM_DAILY_POLICY};q={d};w={DAY_SECS}"));
        }
        let mut ops = Vec::new();
        let mut op_index = HashMap::new();
        for (op_name, op_limits) in &limits.operations {
            let op = OpPlan::new(op_name, op_limits, &team_key, &team_items);
            op_index.insert(op_name.clone(), ops.len());
            ops.push(op);
        }
        TeamPlan {
            rate,
            concurrency,
            daily,
            ops,
            op_index,
            policy: join(&team_items),
            rate_key: format!("{team_key}:rate"),
            inflight_key: format!("{team_key}:inflight"),
            daily_key: format!("{team_key}:daily"),
            team_key,
        }
    }

    /// The record of what the Redis admission `id` charged (`lua/admit.lua`).
    pub fn admission_key(&self, id: &str) -> String {
        format!("{}:adm:{id}", self.team_key)
    }

    /// The tombstone that makes the Redis admission `id` void (`lua/refund.lua`).
    pub fn void_key(&self, id: &str) -> String {
        format!("{}:void:{id}", self.team_key)
    }

    pub fn op(&self, operation: &str) -> Option<(usize, &OpPlan)> {
        let i = *self.op_index.get(operation)?;
        self.ops.get(i).map(|op| (i, op))
    }

    /// Whether a request to `op` is subject to any limit at all.
    pub fn limits_anything(&self, op: Option<&OpPlan>) -> bool {
        self.rate.is_some()
            || self.concurrency.is_some()
            || self.daily.is_some()
            || op.is_some_and(|o| o.rate.is_some() || o.daily.is_some())
    }

    pub fn policy_for<'a>(&'a self, op: Option<&'a OpPlan>) -> Option<&'a HeaderValue> {
        match op {
            Some(o) => o.policy.as_ref(),
            None => self.policy.as_ref(),
        }
    }
}

impl OpPlan {
    fn new(name: &str, limits: &OpLimits, team_key: &str, team_items: &[String]) -> OpPlan {
        let rate = RatePlan::from_limit(&limits.limit);
        let daily = limits.daily;
        let sf_name = sf_string(name);
        let sf_daily_name = sf_string(&format!("{name}{DAILY_SUFFIX}"));
        let mut items = team_items.to_vec();
        if let Some(r) = &rate {
            items.push(rate_policy_item(&sf_name, r));
        }
        if let Some(d) = daily {
            items.push(format!("{sf_daily_name};q={d};w={DAY_SECS}"));
        }
        let op_key = format!("{team_key}:op:{}", key_part(name));
        OpPlan {
            name: name.to_string(),
            rate,
            daily,
            policy: join(&items),
            sf_name,
            sf_daily_name,
            rate_key: format!("{op_key}:rate"),
            daily_key: format!("{op_key}:daily"),
        }
    }
}

/// The `RateLimit-Policy` value of these items, made once (every item is printable ASCII:
/// structured-field strings and numbers).
fn join(items: &[String]) -> Option<HeaderValue> {
    if items.is_empty() {
        None
    } else {
        HeaderValue::from_str(&items.join(", ")).ok()
    }
}

/// `q` and `w` for a rate: the configured count per whole-second window (a sub-second or
/// fractional period is stretched to whole seconds and the count scaled down, never up), and a
/// vendor parameter `ghgw-burst` when the burst differs from the advertised quota.
fn rate_policy_item(sf_name: &str, r: &RatePlan) -> String {
    let per = r.rate.per;
    let whole = per.subsec_nanos() == 0 && per.as_secs() > 0;
    let (q, w) = if whole {
        (u64::from(r.rate.count), per.as_secs())
    } else {
        let w = per.as_nanos().div_ceil(1_000_000_000).max(1);
        let q = u128::from(r.rate.count) * w * 1_000_000_000 / per.as_nanos().max(1);
        (
            u64::try_from(q).unwrap_or(u64::MAX),
            u64::try_from(w).unwrap_or(u64::MAX),
        )
    };
    let mut s = format!("{sf_name};q={q};w={w}");
    if u64::from(r.burst) != q {
        let _ = write!(s, ";ghgw-burst={}", r.burst);
    }
    s
}

/// A name as a Structured Field String (RFC 8941 section 3.3.3): printable ASCII, with `"` and `\`
/// escaped; anything else becomes `?` (names come from configuration, so this never happens in
/// practice, but a header must never be malformed).
pub(crate) fn sf_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => out.push('?'),
        }
    }
    out.push('"');
    out
}

/// A team or operation name inside a Redis key: `%` and `:` (the separator) are escaped, and the
/// braces of cluster hash tags, so that two names never map to one key.
pub(crate) fn key_part(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '%' => out.push_str("%25"),
            ':' => out.push_str("%3A"),
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            _ => out.push(c),
        }
    }
    out
}

/// The state of one rate limit as a backend saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RateObs {
    pub remaining: u32,
    pub next: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DailyObs {
    pub used: u64,
    pub until_reset: Duration,
}

/// Everything one decision saw, for the `RateLimit` header: after the request when it was
/// admitted, before it (nothing spent) when it was refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Observation {
    pub team: Option<RateObs>,
    pub in_use: Option<u32>,
    pub op: Option<RateObs>,
    /// The operation's daily quota.
    pub daily: Option<DailyObs>,
    /// The team's daily quota.
    pub team_daily: Option<DailyObs>,
}

fn secs_ceil(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// `RateLimit-Policy` and `RateLimit` for one decision; `obs` is `None` when no live state is
/// known (a request admitted because the backend failed and `on_backend_error = "allow"`).
pub(crate) fn render(
    plan: &TeamPlan,
    op: Option<&OpPlan>,
    obs: Option<&Observation>,
) -> RateLimitHeaders {
    let Some(policy) = plan.policy_for(op) else {
        return Vec::new();
    };
    let mut headers = vec![(RATELIMIT_POLICY, policy.clone())];
    let Some(obs) = obs else {
        return headers;
    };
    // One header value written in place: `"name";r=N;t=S` items, comma-separated.
    let mut value = String::with_capacity(96);
    let mut item = |name: &str, remaining: u64, reset: Option<u64>| {
        use std::fmt::Write as _;
        if !value.is_empty() {
            value.push_str(", ");
        }
        let _ = match reset {
            Some(t) => write!(value, "{name};r={remaining};t={t}"),
            None => write!(value, "{name};r={remaining}"),
        };
    };
    if let (Some(_), Some(t)) = (&plan.rate, obs.team) {
        item(TEAM_POLICY, u64::from(t.remaining), Some(secs_ceil(t.next)));
    }
    if let (Some(c), Some(in_use)) = (plan.concurrency, obs.in_use) {
        item(
            TEAM_CONCURRENCY_POLICY,
            u64::from(c.saturating_sub(in_use)),
            None,
        );
    }
    if let (Some(limit), Some(d)) = (plan.daily, obs.team_daily) {
        item(
            TEAM_DAILY_POLICY,
            limit.saturating_sub(d.used),
            Some(secs_ceil(d.until_reset)),
        );
    }
    if let Some(op) = op {
        if let (Some(_), Some(o)) = (&op.rate, obs.op) {
            item(&op.sf_name, u64::from(o.remaining), Some(secs_ceil(o.next)));
        }
        if let (Some(limit), Some(d)) = (op.daily, obs.daily) {
            item(
                &op.sf_daily_name,
                limit.saturating_sub(d.used),
                Some(secs_ceil(d.until_reset)),
            );
        }
    }
    if !value.is_empty()
        && let Ok(value) = HeaderValue::from_maybe_shared(bytes::Bytes::from(value))
    {
        headers.push((RATELIMIT, value));
    }
    headers
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sf_strings_escape_quotes_and_backslashes() {
        assert_eq!(sf_string("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(sf_string("é"), "\"?\"");
    }

    #[test]
    fn pre_quoted_team_policy_names_are_their_sf_strings() {
        for (quoted, name) in [
            (TEAM_POLICY, "team"),
            (TEAM_CONCURRENCY_POLICY, "team-concurrency"),
            (TEAM_DAILY_POLICY, "team-daily"),
        ] {
            assert_eq!(quoted, sf_string(name));
        }
    }

    #[test]
    fn key_parts_cannot_collide_through_the_separator() {
        assert_ne!(
            format!("{}:{}", key_part("a:b"), key_part("c")),
            format!("{}:{}", key_part("a"), key_part("b:c"))
        );
    }

    #[test]
    fn sub_second_periods_are_stretched_to_whole_seconds() {
        let r = RatePlan::from_limit(&Limit {
            rate: Some(Rate {
                count: 5,
                per: Duration::from_millis(500),
            }),
            burst: None,
        })
        .unwrap();
        assert_eq!(rate_policy_item("\"x\"", &r), "\"x\";q=10;w=1;ghgw-burst=5");
    }
}
