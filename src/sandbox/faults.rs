//! Fault injection: latency, failing partner calls, a failing token endpoint, a JWKS outage.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use super::lock;

#[derive(Clone, Copy, Debug, Default)]
struct Pending {
    count: u32,
    status: u16,
}

impl Pending {
    /// Uses up one pending failure, if any.
    fn take(&mut self) -> Option<u16> {
        if self.count == 0 {
            return None;
        }
        self.count -= 1;
        Some(self.status)
    }
}

/// The sandbox's fault switches. All of them take effect on the next request.
#[derive(Debug)]
pub struct Faults {
    latency_us: AtomicU64,
    fail_next: Mutex<Pending>,
    token_fail_next: Mutex<Pending>,
    jwks_up: AtomicBool,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            latency_us: AtomicU64::new(0),
            fail_next: Mutex::new(Pending::default()),
            token_fail_next: Mutex::new(Pending::default()),
            jwks_up: AtomicBool::new(true),
        }
    }
}

impl Faults {
    /// Delay added before answering each partner API call (zero turns it off).
    pub fn set_latency(&self, d: Duration) {
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.latency_us.store(micros, Ordering::Relaxed);
    }

    /// The current added latency.
    pub fn latency(&self) -> Duration {
        Duration::from_micros(self.latency_us.load(Ordering::Relaxed))
    }

    /// The next `n` partner API calls answer `status` with a Greenhouse error body, before
    /// authentication. Replaces any failures still pending.
    pub fn fail_next(&self, n: u32, status: u16) {
        *lock(&self.fail_next) = Pending { count: n, status };
    }

    /// The next `n` token requests fail with `status` and an OAuth error body; status 0 drops
    /// the connection without an answer. Replaces any failures still pending.
    pub fn token_endpoint_fail(&self, n: u32, status: u16) {
        *lock(&self.token_fail_next) = Pending { count: n, status };
    }

    /// When false, the JWKS endpoint answers 503.
    pub fn set_jwks_available(&self, up: bool) {
        self.jwks_up.store(up, Ordering::Relaxed);
    }

    pub fn jwks_available(&self) -> bool {
        self.jwks_up.load(Ordering::Relaxed)
    }

    /// Switches every fault off.
    pub fn reset(&self) {
        self.set_latency(Duration::ZERO);
        self.fail_next(0, 0);
        self.token_endpoint_fail(0, 0);
        self.set_jwks_available(true);
    }

    pub(crate) fn take_partner_failure(&self) -> Option<u16> {
        lock(&self.fail_next).take()
    }

    pub(crate) fn take_token_failure(&self) -> Option<u16> {
        lock(&self.token_fail_next).take()
    }

    /// The switches as JSON, for `/_sandbox/faults`.
    pub(crate) fn describe(&self) -> Value {
        let fail = *lock(&self.fail_next);
        let token = *lock(&self.token_fail_next);
        json!({
            "latency_ms": self.latency().as_millis() as u64,
            "fail_next": { "count": fail.count, "status": fail.status },
            "token_fail_next": { "count": token.count, "status": token.status },
            "jwks_available": self.jwks_available(),
        })
    }
}
