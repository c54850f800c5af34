//! Quotas: whether a team's limits admit one more request, and the shared upstream budget.
//!
//! Pipeline step 5 (after the team and operation are known, before the body is read):
//! [`Quotas::admit`] runs every check for one request — the team's rate (GCRA, with burst), the
//! team's concurrency cap, the team's daily quota (all operations together), the operation's
//! rate and the operation's daily quota (daily quotas reset at 00:00 UTC) — and spends in all
//! of them or in none: a refused request costs nothing anywhere.
//! Just before forwarding, [`Quotas::upstream_slot`] waits (up to `upstream.max_wait`) for a slot
//! in the account's Greenhouse budget, shared by every team and every replica.
//!
//! # Algorithms
//!
//! Rates use GCRA (the generic cell rate algorithm, a "theoretical arrival time" per limit):
//! `burst` requests are admitted at once from idle, then one per `per / count`; there are no
//! windows, so there is no double burst at a window edge. The upstream budget is a sliding
//! window over slot start times: up to `count` requests start at once, and a request waits only
//! when `count` have started within the last `per`, so no span of `per` ever holds more than
//! `count` starts. That keeps a fixed-window upstream limit such as Greenhouse's 50 per 10 s from
//! ever answering 429 without making anybody wait while budget is left. A request that would
//! start within `max_wait` reserves its slot and sleeps until it; one that would start later is
//! refused at once with the delay it would have had.
//!
//! # Backends
//!
//! - `memory`: per-process state, one small mutex per team (never one over all teams); exact
//!   under any concurrency. Leases (concurrency) are given back when the [`Admission`] drops.
//! - `redis`: one Lua script per decision (one `EVALSHA`, one round trip), using the Redis
//!   server's clock so replicas with skewed clocks agree; every key has a TTL (see
//!   `redis_store.rs` for the layout); concurrency leases are ids in a sorted set scored by expiry
//!   (60 s by default), given back on drop and reclaimed by the script when a replica died with
//!   them. Every call has a deadline (`timeout`, 250 ms by default): no request waits longer for a
//!   decision. When Redis fails, `on_backend_error` decides: `deny` refuses with
//!   [`Refusal::BackendUnavailable`] (503, never 429), `allow` admits and counts it
//!   ([`Quotas::backend_errors_allowed`]), `local` decides with an in-process limiter that has the
//!   same limits (per replica, so N replicas admit up to N times the limit while Redis is away).
//!   While Redis is down, requests skip it (a circuit breaker) and a background probe, plus one
//!   request every 250 ms, try it again; [`Quotas::not_ready`] reports it.
//!   An admission that missed its deadline is refunded in the background (or voided before
//!   Redis runs it, see `redis_store.rs`), so a stall never leaves refused requests counted.
//!
//! # Rate-limit headers
//!
//! Every admission and every 429 refusal carries the fields of the IETF draft
//! `draft-ietf-httpapi-ratelimit-headers` (checked against revision 11), as Structured Field
//! lists:
//!
//! ```text
//! RateLimit-Policy: "team";q=20;w=1, "team-concurrency";q=16;qu="concurrent-requests", "createPartnerCandidate";q=5;w=1, "createPartnerCandidate-daily";q=5000;w=86400
//! RateLimit: "team";r=19;t=1, "team-concurrency";r=15, "createPartnerCandidate";r=4;t=1, "createPartnerCandidate-daily";r=4988;t=41215
//! ```
//!
//! Policies: `"team"` (the team's rate), `"team-concurrency"` (its cap on requests in flight),
//! `"team-daily"` (its daily quota over all operations), the operation id (the operation's rate) and `"<operationId>-daily"` (its daily quota); only
//! the limits that apply to the request appear. For a rate, `q`/`w` is the configured count per
//! period in whole seconds (`w` is an integer in the draft: a sub-second period is stretched to
//! one second and the count scaled down); when the burst differs from `q` it is given as the
//! vendor parameter `ghgw-burst`. In `RateLimit`, `r` is what can be spent right now and `t`
//! (whole seconds, rounded up) is how long until more becomes available: for a rate, until one
//! more request is regained (0 when the burst is whole), for a daily quota, until 00:00 UTC. So
//! "within `t` seconds, no more than `r`" holds, as the draft defines `t`. `Retry-After` is not
//! among these headers: the caller sets it from [`Refusal::retry_after`].

mod admission;
mod gcra;
mod memory;
mod plan;
mod redis_store;
mod releases;
mod resolve;
mod snapshot;
mod upstream;

pub use resolve::TeamQuota;

/// `RateLimit-Policy` and `RateLimit` for a response (empty when the team has no limits).
pub type RateLimitHeaders = Vec<(http::HeaderName, http::HeaderValue)>;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::values::{Rate, parse_rate};
use admission::{Lease, Source};
use gcra::Gcra;
use memory::{DayCount, Status, TeamSlot, Verdict, lock, nanos};
use plan::{DailyObs, MICROS, Observation, OpPlan, RateObs, TeamPlan, render};
use redis_store::{AdmitReply, RedisStore};
use upstream::{UpState, Upstream};

pub use admission::Admission;
pub use upstream::NoSlot;

/// Default deadline for one Redis call.
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(250);
/// Default namespace of the Redis keys.
pub const DEFAULT_KEY_PREFIX: &str = "ghgw";
/// Default `upstream.max_wait`.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(2);
/// Default lifetime of a Redis concurrency lease that is never given back.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Settings: plain validated values

/// Where quota state lives.
#[derive(Clone, PartialEq, Eq)]
pub enum Backend {
    Memory,
    Redis {
        /// `redis://[user:password@]host[:port][/db]` (or `redis+unix://`); may hold a password,
        /// so `Debug` never shows it.
        url: String,
        /// Deadline for one Redis call (default 250 ms).
        timeout: Duration,
        /// Namespace of every key (default `ghgw`).
        key_prefix: String,
        /// For `rediss://`: PEM certificates of the CAs that sign the server's certificate;
        /// `None` trusts the public web roots (webpki-roots) and the system's.
        ca_pem: Option<Vec<u8>>,
    },
}

impl Backend {
    /// Redis at `url` with the default timeout and key prefix.
    pub fn redis(url: impl Into<String>) -> Backend {
        Backend::Redis {
            url: url.into(),
            timeout: DEFAULT_REDIS_TIMEOUT,
            key_prefix: DEFAULT_KEY_PREFIX.to_string(),
            ca_pem: None,
        }
    }
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backend::Memory => f.write_str("Memory"),
            Backend::Redis {
                timeout,
                key_prefix,
                ..
            } => f
                .debug_struct("Redis")
                .field("url", &"<redacted>")
                .field("timeout", timeout)
                .field("key_prefix", key_prefix)
                .finish(),
        }
    }
}

/// What to do when the Redis backend cannot answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnBackendError {
    /// Refuse with [`Refusal::BackendUnavailable`] (503 `quota_backend_unavailable`).
    #[default]
    Deny,
    /// Admit, and count it in [`Quotas::backend_errors_allowed`].
    Allow,
    /// Decide with an in-process limiter that has the same limits.
    Local,
}

impl OnBackendError {
    pub fn as_str(&self) -> &'static str {
        match self {
            OnBackendError::Deny => "deny",
            OnBackendError::Allow => "allow",
            OnBackendError::Local => "local",
        }
    }
}

/// A rate with its burst. No rate: no limit (and then no burst either).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limit {
    pub rate: Option<Rate>,
    /// Requests admitted at once from idle; defaults to the rate's count.
    pub burst: Option<u32>,
}

/// A team's `[quota]`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TeamLimits {
    pub limit: Limit,
    /// Requests in flight at once.
    pub concurrency: Option<u32>,
    /// Admitted requests per UTC day, all operations together.
    pub daily: Option<u64>,
    /// `[quota.operations.<operationId>]`.
    pub operations: BTreeMap<String, OpLimits>,
}

/// An operation's limits inside a team.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OpLimits {
    pub limit: Limit,
    /// Admitted requests per UTC day.
    pub daily: Option<u64>,
}

/// `upstream.rate` and `upstream.max_wait`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamBudget {
    pub rate: Rate,
    /// How long a request may wait for a slot (default 2 s).
    pub max_wait: Duration,
}

/// Everything the quota module needs from configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaSettings {
    pub backend: Backend,
    pub on_backend_error: OnBackendError,
    /// Teams by name; a team not listed here has no limits.
    pub teams: BTreeMap<String, TeamLimits>,
    pub upstream: Option<UpstreamBudget>,
}

impl Default for QuotaSettings {
    fn default() -> Self {
        QuotaSettings {
            backend: Backend::Memory,
            on_backend_error: OnBackendError::Deny,
            teams: BTreeMap::new(),
            upstream: None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Validation: the rate-and-burst rule, raw values in, a validated `Limit` or every (key, message)
// problem out. Keys are relative to the table they come from (a team file's `[quota]` or
// `[quota.operations.<id>]`); `config::validate`, which runs it for every team and operation,
// prefixes the path. Every other quota setting is checked there, next to the keys it reads.

/// Problems as (key, message).
pub type Problems = Vec<(String, String)>;

fn problem(key: &str, message: impl Into<String>) -> (String, String) {
    (key.to_string(), message.into())
}

/// `rate` and `burst` of a team or operation.
pub fn validate_limit(rate: Option<&str>, burst: Option<u64>) -> Result<Limit, Problems> {
    let mut problems = Vec::new();
    let parsed = match rate {
        None => None,
        Some(s) => match parse_rate(s) {
            Ok(r) => Some(r),
            Err(e) => {
                problems.push(problem("rate", e));
                None
            }
        },
    };
    let burst_value = match burst {
        None => None,
        Some(0) => {
            problems.push(problem("burst", "must be at least 1"));
            None
        }
        Some(b) => match u32::try_from(b) {
            Ok(b) => Some(b),
            Err(_) => {
                problems.push(problem(
                    "burst",
                    format!("{b} is too large (at most {})", u32::MAX),
                ));
                None
            }
        },
    };
    if burst.is_some() && rate.is_none() {
        problems.push(problem(
            "burst",
            "needs a rate: burst is how many requests are admitted at once on top of the rate",
        ));
    }
    if problems.is_empty() {
        Ok(Limit {
            rate: parsed,
            burst: burst_value,
        })
    } else {
        Err(problems)
    }
}

// ---------------------------------------------------------------------------------------------
// Clocks and options

/// "Now" as a duration since the UNIX epoch. Decides the memory backend (Redis uses its own
/// server time); injectable for tests.
pub trait Clock: Send + Sync {
    fn now(&self) -> Duration;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
    }
}

/// A clock that moves only when told to (tests).
#[derive(Debug, Default)]
pub struct ManualClock {
    nanos: AtomicU64,
}

impl ManualClock {
    pub fn new(start: Duration) -> ManualClock {
        ManualClock {
            nanos: AtomicU64::new(nanos(start)),
        }
    }
    pub fn set(&self, now: Duration) {
        self.nanos.store(nanos(now), Ordering::SeqCst);
    }
    pub fn advance(&self, by: Duration) {
        self.nanos.fetch_add(nanos(by), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Ordering::SeqCst))
    }
}

/// Knobs that are not configuration: for tests and benches.
#[derive(Clone)]
pub struct QuotaOptions {
    pub clock: Arc<dyn Clock>,
    /// Lifetime of a Redis concurrency lease that is never given back (default 60 s). A
    /// request that runs longer loses its place in the count.
    pub lease_ttl: Duration,
    /// How often Redis is pinged in the background (default 1 s).
    pub probe_interval: Duration,
    /// While Redis is down, how often one request is let through to try it (default 250 ms).
    pub recheck_interval: Duration,
}

impl Default for QuotaOptions {
    fn default() -> Self {
        QuotaOptions {
            clock: Arc::new(SystemClock),
            lease_ttl: DEFAULT_LEASE_TTL,
            probe_interval: Duration::from_secs(1),
            recheck_interval: Duration::from_millis(250),
        }
    }
}

impl fmt::Debug for QuotaOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuotaOptions")
            .field("lease_ttl", &self.lease_ttl)
            .field("probe_interval", &self.probe_interval)
            .field("recheck_interval", &self.recheck_interval)
            .finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------------------------
// Decisions

/// Why a request was refused. Every variant but `BackendUnavailable` carries its rate-limit
/// headers (match with `{ retry_after, .. }`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A team or operation rate: 429 `rate_limited`.
    #[error("rate limited; retry after {retry_after:?}")]
    RateLimited {
        retry_after: Duration,
        headers: RateLimitHeaders,
    },
    /// The operation's daily quota: 429 `daily_quota_exhausted`; `retry_after` runs to the next
    /// 00:00 UTC.
    #[error("daily quota exhausted; retry after {retry_after:?}")]
    DailyQuotaExhausted {
        retry_after: Duration,
        headers: RateLimitHeaders,
    },
    /// The team's cap on requests in flight: 429 `concurrency_limited`; `retry_after` is 1 s.
    #[error("too many requests in flight; retry after {retry_after:?}")]
    ConcurrencyLimited {
        retry_after: Duration,
        headers: RateLimitHeaders,
    },
    /// Redis did not answer in time and `on_backend_error = "deny"`: 503
    /// `quota_backend_unavailable` (never 429: it is not the caller's fault).
    #[error("quota backend unavailable")]
    BackendUnavailable,
}

impl Refusal {
    /// Metric label: `rate`, `daily`, `concurrency` or `backend`.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::RateLimited { .. } => "rate",
            Refusal::DailyQuotaExhausted { .. } => "daily",
            Refusal::ConcurrencyLimited { .. } => "concurrency",
            Refusal::BackendUnavailable => "backend",
        }
    }

    /// The problem `code` of DESIGN 1.4.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::RateLimited { .. } => "rate_limited",
            Refusal::DailyQuotaExhausted { .. } => "daily_quota_exhausted",
            Refusal::ConcurrencyLimited { .. } => "concurrency_limited",
            Refusal::BackendUnavailable => "quota_backend_unavailable",
        }
    }

    /// For `Retry-After` (round up to whole seconds); `None` for `BackendUnavailable`.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Refusal::RateLimited { retry_after, .. }
            | Refusal::DailyQuotaExhausted { retry_after, .. }
            | Refusal::ConcurrencyLimited { retry_after, .. } => Some(*retry_after),
            Refusal::BackendUnavailable => None,
        }
    }

    /// `RateLimit-Policy` and `RateLimit` for the refusal (not `Retry-After`). Empty for
    /// `BackendUnavailable`: no live state is known then.
    pub fn headers(&self) -> RateLimitHeaders {
        match self {
            Refusal::RateLimited { headers, .. }
            | Refusal::DailyQuotaExhausted { headers, .. }
            | Refusal::ConcurrencyLimited { headers, .. } => headers.clone(),
            Refusal::BackendUnavailable => Vec::new(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The limiter

struct Inner {
    teams: HashMap<String, Arc<TeamSlot>>,
    /// The limits the slots were built from, to tell on reload which changed.
    limits: BTreeMap<String, TeamLimits>,
    /// The namespace of Redis keys (also used to name the memory backend's plans).
    prefix: String,
    on_backend_error: OnBackendError,
    clock: Arc<dyn Clock>,
    redis: Option<Arc<RedisStore>>,
    upstream: Option<Arc<Upstream>>,
    allowed: Arc<AtomicU64>,
    /// Decisions Redis could not make (see [`Quotas::backend_errors`]).
    backend_errors: Arc<AtomicU64>,
}

/// The quota decisions of one gateway process. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct Quotas {
    inner: Arc<Inner>,
}

impl fmt::Debug for Quotas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Quotas")
            .field("teams", &self.inner.teams.len())
            .field("redis", &self.inner.redis.is_some())
            .field("on_backend_error", &self.inner.on_backend_error)
            .finish_non_exhaustive()
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn rate_obs(g: &Gcra, tat: u64, now: u64, unit: Duration) -> RateObs {
    let (remaining, next) = g.observe(tat, now);
    RateObs {
        remaining,
        next: Duration::from_nanos(
            u64::try_from(u128::from(next) * unit.as_nanos()).unwrap_or(u64::MAX),
        ),
    }
}

fn refusal(status: Status, retry_after: Duration, headers: RateLimitHeaders) -> Refusal {
    match status {
        Status::Daily => Refusal::DailyQuotaExhausted {
            retry_after,
            headers,
        },
        Status::Concurrency => Refusal::ConcurrencyLimited {
            retry_after,
            headers,
        },
        Status::Rate | Status::Admitted => Refusal::RateLimited {
            retry_after,
            headers,
        },
    }
}

impl Quotas {
    /// Builds the limiter and, with Redis, pings it once (about one Redis deadline at most).
    /// Never fails: a Redis that is down is handled per `on_backend_error` and reported by
    /// [`Quotas::not_ready`]; the connection recovers by itself when Redis comes back.
    pub async fn new(settings: QuotaSettings) -> Quotas {
        Quotas::new_with_options(settings, QuotaOptions::default()).await
    }

    /// [`Quotas::new`] with a clock, lease TTL or probe interval of one's own.
    pub async fn new_with_options(settings: QuotaSettings, options: QuotaOptions) -> Quotas {
        let quotas = Quotas::build(settings, options);
        if let Some(store) = &quotas.inner.redis {
            let _ = store.probe().await;
        }
        quotas
    }

    /// For tests: decisions of the memory backend (and of the `local` fallback) use `clock`.
    /// Redis, if configured, is contacted on first use.
    pub fn with_clock(settings: QuotaSettings, clock: Arc<dyn Clock>) -> Quotas {
        Quotas::build(
            settings,
            QuotaOptions {
                clock,
                ..QuotaOptions::default()
            },
        )
    }

    fn build(settings: QuotaSettings, options: QuotaOptions) -> Quotas {
        let (redis, prefix) = match &settings.backend {
            Backend::Memory => (None, DEFAULT_KEY_PREFIX.to_string()),
            Backend::Redis {
                url,
                timeout,
                key_prefix,
                ca_pem,
            } => (
                Some(Arc::new(RedisStore::new(
                    url,
                    ca_pem.clone(),
                    (*timeout).max(Duration::from_millis(1)),
                    key_prefix,
                    options.lease_ttl.max(Duration::from_millis(1)),
                    options.probe_interval.max(Duration::from_millis(10)),
                    options.recheck_interval,
                ))),
                key_prefix.clone(),
            ),
        };
        let teams = settings
            .teams
            .iter()
            .map(|(name, limits)| {
                let plan = TeamPlan::new(name, limits, &prefix);
                (name.clone(), Arc::new(TeamSlot::new(plan)))
            })
            .collect();
        let upstream = settings.upstream.map(|budget| {
            Arc::new(Upstream {
                budget,
                state: Mutex::new(UpState::default()),
            })
        });
        Quotas {
            inner: Arc::new(Inner {
                teams,
                limits: settings.teams,
                prefix,
                on_backend_error: settings.on_backend_error,
                clock: options.clock,
                redis,
                upstream,
                allowed: Arc::new(AtomicU64::new(0)),
                backend_errors: Arc::new(AtomicU64::new(0)),
            }),
        }
    }

    /// All checks for one request (team rate, concurrency and daily quota, operation rate and
    /// daily quota); spends in all of them or in none. A team without configured limits is admitted
    /// without headers.
    ///
    /// By name, for tools and tests; the gateway resolves its teams once ([`Quotas::resolve`])
    /// and admits with [`Quotas::admit_team`].
    pub async fn admit(&self, team: &str, operation: &str) -> Result<Admission, Refusal> {
        let resolved = self.resolve(team, &[operation]);
        self.admit_team(&resolved, 0).await
    }

    async fn admit_slot(
        &self,
        slot: &Arc<TeamSlot>,
        op: Option<usize>,
    ) -> Result<Admission, Refusal> {
        let inner = &self.inner;
        // A slot a reload replaced hands its decisions to its successor.
        let current = slot.current();
        let op = if Arc::ptr_eq(&current, slot) {
            op
        } else {
            current.op_from(slot, op)
        };
        let slot = &current;
        let op = op.and_then(|i| slot.plan.ops.get(i).map(|p| (i, p)));
        if !slot.plan.limits_anything(op.map(|(_, p)| p)) {
            return Ok(Admission::unlimited());
        }
        let Some(store) = &inner.redis else {
            return self.decide_in_memory(slot, op, Source::Memory);
        };
        if store.should_try() {
            // One id per admission: its record and tombstone in Redis, and its lease.
            let id = format!("{:032x}", rand::random::<u128>());
            match store.admit(&slot.plan, op.map(|(_, p)| p), &id).await {
                Ok(reply) => {
                    let lease_id = slot.plan.concurrency.map(|_| id);
                    return self.decide_from_redis(store, slot, op, reply, lease_id);
                }
                Err(_) => {
                    // The script may still run later (a paused server), after this request has
                    // been refused or decided without Redis: undo what it charges, or void it.
                    store.refund(Arc::clone(slot), op.map(|(i, _)| i), id);
                }
            }
        }
        inner.backend_errors.fetch_add(1, Ordering::Relaxed);
        match inner.on_backend_error {
            OnBackendError::Deny => Err(Refusal::BackendUnavailable),
            OnBackendError::Allow => {
                inner.allowed.fetch_add(1, Ordering::Relaxed);
                Ok(Admission {
                    headers: render(&slot.plan, op.map(|(_, p)| p), None),
                    source: Source::Allowed,
                    lease: None,
                })
            }
            OnBackendError::Local => self.decide_in_memory(slot, op, Source::Local),
        }
    }

    fn decide_in_memory(
        &self,
        slot: &Arc<TeamSlot>,
        op: Option<(usize, &OpPlan)>,
        source: Source,
    ) -> Result<Admission, Refusal> {
        // Retired by a reload between `current` and the decision: decided by its successor.
        let mut slot = slot.clone();
        let mut op_index = op.map(|(i, _)| i);
        let Verdict {
            status,
            retry_after,
            obs,
        } = loop {
            match slot.admit(op_index, || self.inner.clock.now()) {
                Some(v) => break v,
                None => {
                    let next = slot.current();
                    op_index = next.op_from(&slot, op_index);
                    slot = next;
                }
            }
        };
        let slot = &slot;
        let op = op_index.and_then(|i| slot.plan.ops.get(i).map(|p| (i, p)));
        let headers = render(&slot.plan, op.map(|(_, p)| p), Some(&obs));
        if status != Status::Admitted {
            return Err(refusal(status, retry_after, headers));
        }
        let lease = slot
            .plan
            .concurrency
            .map(|_| Lease::Memory(Arc::clone(slot)));
        Ok(Admission {
            headers,
            source,
            lease,
        })
    }

    fn decide_from_redis(
        &self,
        store: &Arc<RedisStore>,
        slot: &Arc<TeamSlot>,
        op: Option<(usize, &OpPlan)>,
        reply: AdmitReply,
        lease_id: Option<String>,
    ) -> Result<Admission, Refusal> {
        store.note_server_time(reply.now_us, micros(self.inner.clock.now()));
        let plan = &slot.plan;
        let op_plan = op.map(|(_, p)| p);
        {
            let mut seen = lock(&slot.observed);
            if plan.rate.is_some() {
                seen.team_tat_us = Some(reply.team_tat);
            }
            if plan.concurrency.is_some() {
                seen.in_use = Some(reply.in_use);
            }
            if plan.daily.is_some() {
                seen.team_daily = Some(DayCount {
                    day: reply.day,
                    used: reply.team_daily_used,
                });
            }
            if let Some((i, p)) = op {
                let entry = seen.ops.entry(i).or_default();
                if p.rate.is_some() {
                    entry.tat_us = Some(reply.op_tat);
                }
                if p.daily.is_some() {
                    entry.daily = Some(DayCount {
                        day: reply.day,
                        used: reply.daily_used,
                    });
                }
            }
        }
        let obs = Observation {
            team: plan
                .rate
                .map(|r| rate_obs(&r.us, reply.team_tat, reply.now_us, MICROS)),
            in_use: plan.concurrency.map(|_| reply.in_use),
            op: op_plan
                .and_then(|p| p.rate)
                .map(|r| rate_obs(&r.us, reply.op_tat, reply.now_us, MICROS)),
            daily: op_plan.and_then(|p| p.daily).map(|_| DailyObs {
                used: reply.daily_used,
                until_reset: Duration::from_micros(reply.until_midnight_us),
            }),
            team_daily: plan.daily.map(|_| DailyObs {
                used: reply.team_daily_used,
                until_reset: Duration::from_micros(reply.until_midnight_us),
            }),
        };
        let headers = render(plan, op_plan, Some(&obs));
        if reply.status != Status::Admitted {
            return Err(refusal(
                reply.status,
                Duration::from_micros(reply.retry_us),
                headers,
            ));
        }
        let lease = lease_id.map(|id| {
            slot.redis_inflight.fetch_add(1, Ordering::AcqRel);
            Lease::Redis {
                store: Arc::clone(store),
                slot: Arc::clone(slot),
                id,
            }
        });
        Ok(Admission {
            headers,
            source: Source::Redis,
            lease,
        })
    }

    /// Pings the backend now (within its deadline); `Ok` for the memory backend. Readiness is
    /// also kept current in the background; this is for a caller that wants to know at once.
    pub async fn check_backend(&self) -> Result<(), String> {
        match &self.inner.redis {
            Some(store) => store.probe().await,
            None => Ok(()),
        }
    }

    /// With Redis, removes the concurrency leases given back and still waiting for an admission
    /// to carry them (see "Leases given back" in `redis_store`), within the backend deadline; for
    /// shutdown, so that no lease of this replica outlives it until its TTL.
    pub async fn flush_releases(&self) {
        if let Some(store) = &self.inner.redis {
            store.flush_all_releases().await;
        }
    }

    /// Reasons the quota backend is not usable, for `/readyz` (empty when it is).
    pub fn not_ready(&self) -> Vec<String> {
        self.inner
            .redis
            .as_ref()
            .and_then(|store| store.problem())
            .map(|p| format!("quota: redis unreachable: {p}"))
            .into_iter()
            .collect()
    }

    /// Requests admitted because Redis failed and `on_backend_error = "allow"` (admissions and
    /// upstream slots).
    pub fn backend_errors_allowed(&self) -> u64 {
        self.inner.allowed.load(Ordering::Relaxed)
    }

    /// Decisions (admissions and upstream budget slots) that Redis could not make, because it
    /// failed or timed out or was known to be down, and that `on_backend_error` made instead,
    /// whatever it decided. Kept across reloads. Zero with the memory backend.
    pub fn backend_errors(&self) -> u64 {
        self.inner.backend_errors.load(Ordering::Relaxed)
    }
}
