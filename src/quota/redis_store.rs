//! The Redis backend: one Lua script per decision (EVALSHA, one round trip), a connection
//! manager that reconnects by itself, a hard deadline on every call, and a small circuit breaker
//! so that while Redis is away requests go straight to the `on_backend_error` fallback instead of
//! each waiting out the deadline.
//!
//! Keys (every one with a TTL; names escaped with [`super::plan::key_part`]):
//! - `{prefix}:team:{team}:rate`: team GCRA arrival time (µs); expires when the team is idle
//! - `{prefix}:team:{team}:inflight`: ZSET of concurrency leases scored by expiry (µs); expired
//!   leases are dropped by the script, the key's TTL is refreshed on every new lease
//! - `{prefix}:team:{team}:daily`: the team's daily count, all operations together (as below)
//! - `{prefix}:team:{team}:op:{operation}:rate`: operation GCRA arrival time
//! - `{prefix}:team:{team}:op:{operation}:daily`: HASH `d` (UTC day number) and `n` (admitted);
//!   expires one hour after the UTC day ends
//! - `{prefix}:team:{team}:adm:{id}`: HASH of what admission `id` charged (arrival-time
//!   intervals, the day, which daily counts, whether a lease), so that a refund can undo exactly
//!   that; expires after [`ADMISSION_RECORD_TTL`]
//! - `{prefix}:team:{team}:void:{id}`: tombstone of an admission the gateway gave up on before
//!   Redis ran it: the admission does nothing when it runs later; expires after [`VOID_TTL`]
//! - `{prefix}:upstream:window` (a list of slot start times), `{prefix}:upstream:blocked`: the shared upstream budget
//!
//! # Leases given back
//!
//! A lease given back is not a call of its own: it waits in [`PendingReleases`] and the next
//! admission's script removes it before deciding (so this replica's own next decision always sees
//! it). When no admission comes within [`RELEASE_LINGER`], a background flush removes what is
//! waiting with one `ZREM` per team in one pipelined round trip. Other replicas see a lease given
//! back at most that much later. Under load this makes one round trip per request.
//!
//! # Admissions the gateway gave up on
//!
//! An admission that misses its deadline (a paused or slow Redis) has already been sent, and
//! Redis runs it when it gets to it, after the gateway has refused the request (or decided it
//! without Redis). So every admission carries a fresh id, and one that fails is followed by a
//! refund (`lua/refund.lua`), in the background and retried a few times: if the admission ran,
//! its record says what it charged and the refund undoes exactly that; if it has not, the
//! refund leaves a tombstone and the admission, when it runs, finds it and does nothing.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, RedisError, Script};

use super::memory::{Status, TeamSlot, lock};
use super::plan::{OpPlan, TeamPlan};
use super::releases::{PendingReleases, RELEASE_LINGER, RELEASES_PER_CALL};

const ADMIT_LUA: &str = include_str!("lua/admit.lua");
const REFUND_LUA: &str = include_str!("lua/refund.lua");
const UPSTREAM_LUA: &str = include_str!("lua/upstream.lua");
const FEEDBACK_LUA: &str = include_str!("lua/feedback.lua");

/// How long Redis keeps the record of what an admission charged: longer than the refund of an
/// abandoned admission keeps trying ([`REFUND_BACKOFF`]), so a refund never misses it.
pub(crate) const ADMISSION_RECORD_TTL: Duration = Duration::from_secs(120);
/// How long the tombstone of an abandoned admission lasts: an admission that Redis runs later
/// than this after its refund (a stall of over an hour) would count.
pub(crate) const VOID_TTL: Duration = Duration::from_secs(3600);
/// Waits between the attempts of a refund (one more attempt after each): about 13 s in all,
/// plus one deadline per attempt.
const REFUND_BACKOFF: [Duration; 7] = [
    Duration::from_millis(100),
    Duration::from_millis(200),
    Duration::from_millis(400),
    Duration::from_millis(800),
    Duration::from_millis(1600),
    Duration::from_millis(3200),
    Duration::from_millis(6400),
];

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The five quota keys of one request, in the order both scripts take them. Keys of limits the
/// request does not have are passed but never touched.
fn quota_keys<'a>(plan: &'a TeamPlan, op: Option<&'a OpPlan>) -> [&'a str; 5] {
    [
        plan.rate_key.as_str(),
        plan.inflight_key.as_str(),
        op.map_or(plan.rate_key.as_str(), |o| o.rate_key.as_str()),
        op.map_or(plan.rate_key.as_str(), |o| o.daily_key.as_str()),
        plan.daily_key.as_str(),
    ]
}

/// The admit script's answer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdmitReply {
    pub status: Status,
    pub retry_us: u64,
    pub team_tat: u64,
    pub op_tat: u64,
    pub daily_used: u64,
    pub in_use: u32,
    pub until_midnight_us: u64,
    pub now_us: u64,
    pub day: u64,
    pub team_daily_used: u64,
}

/// Up or down, with the reason; while down, one caller per `recheck` interval is let through to
/// try Redis again (the background probe also does).
struct Health {
    base: Instant,
    down: AtomicBool,
    retry_at_ms: AtomicU64,
    recheck: Duration,
    last_error: Mutex<Option<String>>,
}

impl Health {
    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn should_try(&self) -> bool {
        if !self.down.load(Ordering::Acquire) {
            return true;
        }
        let now = self.elapsed_ms();
        let at = self.retry_at_ms.load(Ordering::Acquire);
        let next = now.saturating_add(u64::try_from(self.recheck.as_millis()).unwrap_or(0));
        now >= at
            && self
                .retry_at_ms
                .compare_exchange(at, next, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    fn ok(&self) {
        if self.down.swap(false, Ordering::AcqRel) {
            *lock(&self.last_error) = None;
            tracing::info!("quota: redis reachable again");
        }
    }

    fn failed(&self, message: &str) {
        *lock(&self.last_error) = Some(message.to_string());
        let next = self
            .elapsed_ms()
            .saturating_add(u64::try_from(self.recheck.as_millis()).unwrap_or(0));
        self.retry_at_ms.store(next, Ordering::Release);
        if !self.down.swap(true, Ordering::AcqRel) {
            tracing::warn!(error = %message, "quota: redis unreachable");
        }
    }

    fn problem(&self) -> Option<String> {
        if self.down.load(Ordering::Acquire) {
            Some(
                lock(&self.last_error)
                    .clone()
                    .unwrap_or_else(|| "unknown error".to_string()),
            )
        } else {
            None
        }
    }
}

pub(crate) struct RedisStore {
    url: String,
    ca_pem: Option<Vec<u8>>,
    timeout: Duration,
    lease_ttl: Duration,
    probe_interval: Duration,
    conn: OnceLock<Result<ConnectionManager, String>>,
    admit_script: Script,
    refund_script: Script,
    upstream_script: Script,
    feedback_script: Script,
    health: Health,
    pub upstream_window_key: String,
    pub upstream_block_key: String,
    /// Redis server time minus local clock time (µs), from the last reply; lets `snapshot`
    /// estimate what is left now from the arrival times it last saw.
    pub clock_offset_us: AtomicI64,
    releases: Arc<PendingReleases>,
}

impl RedisStore {
    pub fn new(
        url: &str,
        ca_pem: Option<Vec<u8>>,
        timeout: Duration,
        prefix: &str,
        lease_ttl: Duration,
        probe_interval: Duration,
        recheck: Duration,
    ) -> RedisStore {
        RedisStore {
            url: url.to_string(),
            ca_pem,
            timeout,
            lease_ttl,
            probe_interval,
            conn: OnceLock::new(),
            admit_script: Script::new(ADMIT_LUA),
            refund_script: Script::new(REFUND_LUA),
            upstream_script: Script::new(UPSTREAM_LUA),
            feedback_script: Script::new(FEEDBACK_LUA),
            health: Health {
                base: Instant::now(),
                down: AtomicBool::new(false),
                retry_at_ms: AtomicU64::new(0),
                recheck,
                last_error: Mutex::new(None),
            },
            upstream_window_key: format!("{prefix}:upstream:window"),
            upstream_block_key: format!("{prefix}:upstream:blocked"),
            clock_offset_us: AtomicI64::new(0),
            releases: Arc::new(PendingReleases::default()),
        }
    }

    pub fn should_try(&self) -> bool {
        self.health.should_try()
    }

    pub fn problem(&self) -> Option<String> {
        self.health.problem()
    }

    /// The connection manager, created on first use (it needs a Tokio runtime) together with the
    /// background probe. Lazy: it never waits for Redis, and reconnects by itself after errors.
    fn connection(self: &Arc<Self>) -> Result<ConnectionManager, String> {
        self.conn
            .get_or_init(|| {
                // rediss:// is TLS by rustls (with the process's crypto provider), trusting
                // `ca_pem` when given, else the public web roots and the system's.
                let client = match &self.ca_pem {
                    Some(pem) => Client::build_with_tls(
                        self.url.as_str(),
                        redis::TlsCertificates {
                            client_tls: None,
                            root_cert: Some(pem.clone()),
                        },
                    ),
                    None => Client::open(self.url.as_str()),
                }
                .map_err(|e| format!("invalid redis url: {e}"))?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout))
                    // one attempt per (re)connection: a request must not wait out a retry
                    // schedule; the next request or the probe triggers the next attempt
                    .set_number_of_retries(0)
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_millis(500));
                let manager = ConnectionManager::new_lazy_with_config(client, config)
                    .map_err(|e| e.to_string())?;
                spawn_probe(Arc::downgrade(self), self.probe_interval);
                spawn_release_flush(Arc::downgrade(self), Arc::clone(&self.releases));
                Ok(manager)
            })
            .clone()
    }

    /// Runs one Redis call under the backend deadline, recording the outcome in the health.
    async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<T, RedisError>>,
    ) -> Result<T, String> {
        // The connection's own timeouts are the same deadline: one wording for both ("timed out"
        // from the client would not say how long it waited).
        let result = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if !e.is_timeout() => Err(e.to_string()),
            Ok(Err(_)) | Err(_) => Err(format!("no answer within {} ms", self.timeout.as_millis())),
        };
        match &result {
            Ok(_) => self.health.ok(),
            Err(e) => self.health.failed(e),
        }
        result
    }

    fn connection_or_fail(self: &Arc<Self>) -> Result<ConnectionManager, String> {
        self.connection().inspect_err(|e| self.health.failed(e))
    }

    /// Runs the admission `id` (also its lease id). On `Err` the script may still run later:
    /// the caller must [`RedisStore::refund`] it.
    pub async fn admit(
        self: &Arc<Self>,
        plan: &TeamPlan,
        op: Option<&OpPlan>,
        id: &str,
    ) -> Result<AdmitReply, String> {
        let mut conn = self.connection_or_fail()?;
        let (team_t, team_b) = plan.rate.map_or((0, 0), |r| (r.us.interval, r.us.burst));
        let (op_t, op_b) = op
            .and_then(|o| o.rate)
            .map_or((0, 0), |r| (r.us.interval, r.us.burst));
        let daily = op
            .and_then(|o| o.daily)
            .map_or(-1, |d| i64::try_from(d).unwrap_or(i64::MAX));
        let team_daily = plan
            .daily
            .map_or(-1, |d| i64::try_from(d).unwrap_or(i64::MAX));
        let mut inv = self.admit_script.prepare_invoke();
        for key in quota_keys(plan, op) {
            inv.key(key);
        }
        inv.key(plan.admission_key(id))
            .key(plan.void_key(id))
            .arg(team_t)
            .arg(team_b)
            .arg(plan.concurrency.unwrap_or(0))
            .arg(id)
            .arg(ms(self.lease_ttl))
            .arg(op_t)
            .arg(op_b)
            .arg(daily)
            .arg(team_daily)
            .arg(ms(ADMISSION_RECORD_TTL));
        // Leases given back meanwhile ride along, removed before the decision. When the call
        // fails they wait again (removing one twice is harmless).
        let carried = self.releases.take(RELEASES_PER_CALL);
        for (key, lease) in &carried {
            inv.key(key).arg(lease);
        }
        let v: Vec<i64> = match self.bounded(inv.invoke_async(&mut conn)).await {
            Ok(v) => v,
            Err(e) => {
                self.releases.put_back(carried);
                return Err(e);
            }
        };
        let at = |i: usize| v.get(i).copied().unwrap_or(0);
        let u = |i: usize| u64::try_from(at(i)).unwrap_or(0);
        if v.len() < 10 {
            let e = format!("unexpected script reply of {} values", v.len());
            self.health.failed(&e);
            return Err(e);
        }
        let status = match at(0) {
            0 => Status::Admitted,
            1 => Status::Rate,
            2 => Status::Daily,
            3 => Status::Concurrency,
            // only when a refund came first, that is after this caller gave up
            4 => return Err("admission void".to_string()),
            other => {
                let e = format!("unexpected script status {other}");
                self.health.failed(&e);
                return Err(e);
            }
        };
        Ok(AdmitReply {
            status,
            retry_us: u(1),
            team_tat: u(2),
            op_tat: u(3),
            daily_used: u(4),
            in_use: u32::try_from(at(5)).unwrap_or(u32::MAX),
            until_midnight_us: u(6),
            now_us: u(7),
            day: u(8),
            team_daily_used: u(9),
        })
    }

    /// Undoes the admission `id` of the team in `slot` (to the operation `op`, an index into its
    /// plan), in the background: what it charged if it ran, else a tombstone that makes it void
    /// when it runs. Tried up to eight times (see [`REFUND_BACKOFF`]); never waited for.
    pub fn refund(self: &Arc<Self>, slot: Arc<TeamSlot>, op: Option<usize>, id: String) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let store = Arc::clone(self);
        handle.spawn(async move {
            let plan = &slot.plan;
            let op = op.and_then(|i| plan.ops.get(i));
            let mut waits = REFUND_BACKOFF.iter();
            loop {
                match store.refund_once(plan, op, &id).await {
                    Ok(()) => return,
                    Err(e) => match waits.next() {
                        Some(wait) => tokio::time::sleep(*wait).await,
                        None => {
                            tracing::warn!(error = %e, "quota: an abandoned admission could not be refunded; what it charged stays until its keys expire");
                            return;
                        }
                    },
                }
            }
        });
    }

    async fn refund_once(
        self: &Arc<Self>,
        plan: &TeamPlan,
        op: Option<&OpPlan>,
        id: &str,
    ) -> Result<(), String> {
        let mut conn = self.connection_or_fail()?;
        let mut inv = self.refund_script.prepare_invoke();
        for key in quota_keys(plan, op) {
            inv.key(key);
        }
        inv.key(plan.admission_key(id))
            .key(plan.void_key(id))
            .arg(id)
            .arg(ms(VOID_TTL));
        let _: i64 = self.bounded(inv.invoke_async(&mut conn)).await?;
        Ok(())
    }

    /// Reserves an upstream slot: `Ok(Ok(delay))` reserved to start after `delay`,
    /// `Ok(Err(delay))` no slot within `max_wait`.
    pub async fn upstream(
        self: &Arc<Self>,
        budget: super::UpstreamBudget,
    ) -> Result<Result<Duration, Duration>, String> {
        let mut conn = self.connection_or_fail()?;
        let mut inv = self.upstream_script.prepare_invoke();
        let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        inv.key(&self.upstream_window_key)
            .key(&self.upstream_block_key)
            .arg(budget.rate.count.max(1))
            .arg(us(budget.rate.per))
            .arg(us(budget.max_wait));
        let v: Vec<i64> = self.bounded(inv.invoke_async(&mut conn)).await?;
        let delay =
            Duration::from_micros(u64::try_from(v.get(1).copied().unwrap_or(0)).unwrap_or(0));
        Ok(match v.first() {
            Some(0) => Ok(delay),
            _ => Err(delay),
        })
    }

    pub async fn feedback(self: &Arc<Self>, block: Duration) -> Result<(), String> {
        let mut conn = self.connection_or_fail()?;
        let mut inv = self.feedback_script.prepare_invoke();
        inv.key(&self.upstream_block_key)
            .arg(u64::try_from(block.as_micros()).unwrap_or(u64::MAX));
        let _: i64 = self.bounded(inv.invoke_async(&mut conn)).await?;
        Ok(())
    }

    /// Gives a lease back and waits (within the deadline) for Redis to confirm.
    pub async fn release_now(self: &Arc<Self>, key: &str, id: &str) {
        let Ok(mut conn) = self.connection() else {
            return;
        };
        let mut cmd = redis::cmd("ZREM");
        cmd.arg(key).arg(id);
        let call = async move { cmd.query_async::<i64>(&mut conn).await };
        if tokio::time::timeout(self.timeout, call).await.is_err() {
            tracing::debug!("quota: lease release timed out; the lease expires on its own");
        }
    }

    /// Gives a lease back without waiting (from `Drop`): the next admission carries it, or the
    /// flush after [`RELEASE_LINGER`]. When that fails, the lease expires after its TTL.
    pub fn release(&self, key: String, id: String) {
        self.releases.push(key, id, Instant::now());
    }

    /// Removes the leases that have waited their linger, one `ZREM` per lease key, all in one
    /// round trip. False when that failed (they wait again for an admission to carry them).
    async fn flush_releases(self: &Arc<Self>) -> bool {
        let batch = self.releases.take_older(Instant::now() - RELEASE_LINGER);
        self.remove_leases(batch).await
    }

    /// Removes every lease given back and still waiting, now (at shutdown: nothing may be left
    /// for Redis to hold until the leases expire).
    pub async fn flush_all_releases(self: &Arc<Self>) {
        let batch = self.releases.take(usize::MAX);
        self.remove_leases(batch).await;
    }

    async fn remove_leases(self: &Arc<Self>, mut batch: Vec<(String, String)>) -> bool {
        if batch.is_empty() {
            return true;
        }
        let Ok(mut conn) = self.connection() else {
            self.releases.put_back(batch);
            return false;
        };
        batch.sort_unstable();
        let mut pipe = redis::pipe();
        for group in batch.chunk_by(|a, b| a.0 == b.0) {
            let cmd = pipe.cmd("ZREM").arg(&group[0].0);
            for (_, id) in group {
                cmd.arg(id);
            }
            cmd.ignore();
        }
        let call = async move { pipe.query_async::<()>(&mut conn).await };
        if !matches!(tokio::time::timeout(self.timeout, call).await, Ok(Ok(()))) {
            tracing::debug!(
                leases = batch.len(),
                "quota: lease release failed; retried with the next admission or release (else it expires)"
            );
            self.releases.put_back(batch);
            return false;
        }
        true
    }

    /// PING under the deadline. A quick failure is usually a dropped connection, which the
    /// failure itself makes the manager replace, so one more PING is tried then; a slow one (a
    /// server that does not answer) is not retried, so a probe takes about one deadline at most.
    pub async fn probe(self: &Arc<Self>) -> Result<(), String> {
        let conn = self.connection_or_fail()?;
        let started = Instant::now();
        let mut last = String::new();
        for attempt in 0..2 {
            if attempt > 0 && started.elapsed() >= self.timeout / 2 {
                break;
            }
            let mut c = conn.clone();
            let ping = async move { redis::cmd("PING").query_async::<String>(&mut c).await };
            match self.bounded(ping).await {
                Ok(_) => return Ok(()),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    pub fn note_server_time(&self, server_now_us: u64, local_now_us: u64) {
        let offset = i128::from(server_now_us) - i128::from(local_now_us);
        let offset = i64::try_from(offset).unwrap_or(0);
        self.clock_offset_us.store(offset, Ordering::Relaxed);
    }
}

impl Drop for RedisStore {
    /// Lets the flush task see that the store is gone (what is still waiting expires in Redis).
    fn drop(&mut self) {
        self.releases.wake();
    }
}

/// Removes leases given back that no admission carried within [`RELEASE_LINGER`], while the
/// store is alive.
fn spawn_release_flush(store: Weak<RedisStore>, releases: Arc<PendingReleases>) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    handle.spawn(async move {
        loop {
            releases.woken().await;
            // Until nothing waits: each lease gets its linger, then goes (unless an admission
            // took it meanwhile).
            while let Some(oldest) = releases.oldest() {
                if !releases.overfull() {
                    tokio::time::sleep_until((oldest + RELEASE_LINGER).into()).await;
                }
                let Some(store) = store.upgrade() else {
                    return;
                };
                if !store.flush_releases().await {
                    break;
                }
            }
        }
    });
}

/// Pings Redis every `interval` while the store is alive, so readiness and the circuit breaker
/// follow Redis even without traffic.
fn spawn_probe(store: Weak<RedisStore>, interval: Duration) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    handle.spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            let Some(store) = store.upgrade() else {
                return;
            };
            let _ = store.probe().await;
        }
    });
}
