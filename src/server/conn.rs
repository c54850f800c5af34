//! One connection's bounds: the deadline from accept to the first request head (TLS handshake
//! included), the idle timeout between requests, and the bookkeeping of requests in flight that
//! both need. Also the accept loop's error backoff and the file-descriptor limit.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::watch;
use tokio::time::Instant;

use super::protocol::Served;

/// What one connection has done so far.
#[derive(Debug)]
struct Activity {
    /// Whether a complete request head has arrived.
    started: bool,
    in_flight: usize,
    /// When the last request in flight finished (or the connection was accepted).
    idle_since: Instant,
}

/// Shared by a connection's driver and its service: requests start in the service, end when
/// their response body is dropped.
#[derive(Debug)]
pub(super) struct ConnState {
    activity: Mutex<Activity>,
    /// The driver, woken when a request starts or the last one in flight ends (its deadline
    /// moves). HTTP/2 responses end in tasks of their own, so the wake crosses tasks.
    changed: AtomicWaker,
}

impl ConnState {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(ConnState {
            activity: Mutex::new(Activity {
                started: false,
                in_flight: 0,
                idle_since: Instant::now(),
            }),
            changed: AtomicWaker::new(),
        })
    }

    /// A request head arrived; the guard ends it.
    pub(super) fn request_started(self: &Arc<Self>) -> RequestGuard {
        let mut a = self.lock();
        a.started = true;
        a.in_flight += 1;
        drop(a);
        self.changed.wake();
        RequestGuard(self.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Activity> {
        self.activity.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What the driver should do next.
    fn next(&self, first_request_by: Instant, idle_timeout: Duration) -> Next {
        let a = self.lock();
        if !a.started {
            Next::At(first_request_by, Expiry::NoRequest)
        } else if a.in_flight > 0 {
            Next::WaitIdle
        } else {
            Next::At(a.idle_since + idle_timeout, Expiry::Idle)
        }
    }
}

enum Next {
    At(Instant, Expiry),
    WaitIdle,
}

#[derive(Clone, Copy)]
enum Expiry {
    NoRequest,
    Idle,
}

/// One request in flight on a connection, held by its response body.
pub(super) struct RequestGuard(Arc<ConnState>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let mut a = self.0.lock();
        a.in_flight = a.in_flight.saturating_sub(1);
        if a.in_flight == 0 {
            a.idle_since = Instant::now();
            drop(a);
            self.0.changed.wake();
        }
    }
}

/// A response body that keeps its request counted as in flight until hyper drops it (after its
/// last frame, or when the connection goes away).
pub(super) struct GuardedBody<B> {
    inner: Pin<Box<B>>,
    _guard: RequestGuard,
}

impl<B> GuardedBody<B> {
    pub(super) fn new(inner: B, guard: RequestGuard) -> Self {
        GuardedBody {
            inner: Box::pin(inner),
            _guard: guard,
        }
    }
}

impl<B: Body> Body for GuardedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.inner.as_mut().poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The timeouts a connection is held to.
#[derive(Clone, Copy, Debug)]
pub(super) struct Timeouts {
    /// From accept to the first complete request head (TLS handshake included).
    pub first_request: Duration,
    /// No request in flight for this long closes the connection.
    pub idle: Duration,
}

/// Runs a connection until it ends, its first request is late (dropped: nothing was asked, so
/// nothing is owed), it has been idle too long, or the listener stops (both: graceful shutdown,
/// so HTTP/1 closes between requests and HTTP/2 gets a GOAWAY).
///
/// Memory per idle connection (README, "Performance"): this future lives in every open
/// connection's task, so it is one poll function over one timer, not a `select!` loop (whose
/// futures, two timers, a notification and the stop signal made anew each turn, took about
/// 2 KiB), and it takes the connection boxed ([`super::protocol::serve`]; an `async fn` keeps an
/// argument passed by value twice: where it was passed and where it is pinned).
pub(super) async fn drive(
    mut conn: Pin<Box<dyn Served>>,
    state: Arc<ConnState>,
    first_request_by: Instant,
    timeouts: Timeouts,
    mut stop: watch::Receiver<bool>,
) {
    let mut stopped = std::pin::pin!(stop.wait_for(|&s| s));
    let mut timer = std::pin::pin!(tokio::time::sleep_until(first_request_by));
    let mut armed = first_request_by;
    let mut phase = Phase::Serving;
    std::future::poll_fn(|cx| {
        loop {
            if conn.as_mut().poll_served(cx).is_ready() {
                return Poll::Ready(());
            }
            match phase {
                // The timer is set to the longest the peer may take to let go.
                Phase::ClosingIdle => return timer.as_mut().poll(cx),
                // The listener's shutdown grace bounds it.
                Phase::Stopping => return Poll::Pending,
                Phase::Serving => {}
            }
            if stopped.as_mut().poll(cx).is_ready() {
                conn.as_mut().graceful_shutdown();
                phase = Phase::Stopping;
                continue;
            }
            // Registered before the state is read, so a change after the read wakes this task.
            state.changed.register(cx.waker());
            let Next::At(at, expiry) = state.next(first_request_by, timeouts.idle) else {
                return Poll::Pending;
            };
            if at != armed {
                timer.as_mut().reset(at);
                armed = at;
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            match expiry {
                Expiry::NoRequest => return Poll::Ready(()),
                Expiry::Idle => {
                    conn.as_mut().graceful_shutdown();
                    timer
                        .as_mut()
                        .reset(Instant::now() + timeouts.first_request);
                    phase = Phase::ClosingIdle;
                }
            }
        }
    })
    .await
}

/// Where [`drive`] is in a connection's life.
#[derive(Clone, Copy)]
enum Phase {
    Serving,
    /// Graceful shutdown sent after the idle timeout; dropped if still open when the timer
    /// (reset to the first-request timeout) fires.
    ClosingIdle,
    /// Graceful shutdown sent because the listener stops.
    Stopping,
}

/// Accept errors (out of file descriptors and the like): an exponential pause before the next
/// accept, and at most one log line a second, with how many were not logged.
pub(super) struct AcceptErrors {
    delay: Duration,
    last_log: Option<Instant>,
    suppressed: u64,
}

const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(1);

impl AcceptErrors {
    pub(super) fn new() -> Self {
        AcceptErrors {
            delay: Duration::ZERO,
            last_log: None,
            suppressed: 0,
        }
    }

    /// An accept succeeded: the next error starts the backoff over.
    pub(super) fn succeeded(&mut self) {
        self.delay = Duration::ZERO;
    }

    /// An accept failed: logs (or counts) it and returns how long to pause.
    pub(super) fn failed(&mut self, listener: &'static str, e: &std::io::Error) -> Duration {
        self.delay = (self.delay * 2).clamp(ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX);
        let now = Instant::now();
        if self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= ACCEPT_LOG_EVERY)
        {
            tracing::warn!(
                listener,
                error = %e,
                suppressed = self.suppressed,
                backoff_ms = self.delay.as_millis() as u64,
                "accept failed"
            );
            self.last_log = Some(now);
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
        self.delay
    }
}

/// Logs at most once a second that a listener is at its connection cap.
pub(super) struct CapLog {
    last: Option<Instant>,
}

impl CapLog {
    pub(super) fn new() -> Self {
        CapLog { last: None }
    }

    pub(super) fn at_cap(&mut self, listener: &'static str, cap: usize) {
        let now = Instant::now();
        if self
            .last
            .is_none_or(|t| now.duration_since(t) >= ACCEPT_LOG_EVERY)
        {
            tracing::warn!(
                listener,
                max_connections = cap,
                "connection cap reached; new connections wait in the listen backlog"
            );
            self.last = Some(now);
        }
    }
}

/// Raises the soft limit on open files to the hard limit where the system allows it, logs the
/// outcome once, and returns the soft limit in force (`None`: unlimited or unknown).
pub(super) fn raise_file_limit() -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let before = getrlimit(Resource::Nofile);
    match (before.current, before.maximum) {
        (Some(cur), max) if max.is_none_or(|m| m > cur) => {
            // An unlimited hard limit cannot be the soft limit for files on Linux: try a large
            // finite value instead.
            let target = max.unwrap_or(1 << 20);
            match setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: Some(target),
                    maximum: max,
                },
            ) {
                Ok(()) => {
                    tracing::info!(from = cur, to = target, "raised the open file limit");
                    Some(target)
                }
                Err(e) => {
                    tracing::info!(limit = cur, hard = ?max, error = %e, "open file limit could not be raised");
                    Some(cur)
                }
            }
        }
        (cur, _) => {
            tracing::info!(limit = ?cur, "open file limit already at its hard limit");
            cur
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_backoff_doubles_from_5ms_to_at_most_1s_and_resets_on_success() {
        let mut a = AcceptErrors::new();
        let e = std::io::Error::other("x");
        assert_eq!(a.failed("t", &e), Duration::from_millis(5));
        assert_eq!(a.failed("t", &e), Duration::from_millis(10));
        for _ in 0..20 {
            a.failed("t", &e);
        }
        assert_eq!(a.failed("t", &e), Duration::from_secs(1));
        assert!(
            a.suppressed > 0,
            "errors within a second are counted, not logged"
        );
        a.succeeded();
        assert_eq!(a.failed("t", &e), Duration::from_millis(5));
    }

    #[tokio::test]
    async fn a_request_guard_counts_in_flight_until_dropped() {
        let s = ConnState::new();
        let by = Instant::now() + Duration::from_secs(1);
        let idle = Duration::from_secs(5);
        assert!(matches!(s.next(by, idle), Next::At(_, Expiry::NoRequest)));
        let g1 = s.request_started();
        let g2 = s.request_started();
        assert!(matches!(s.next(by, idle), Next::WaitIdle));
        drop(g1);
        assert!(matches!(s.next(by, idle), Next::WaitIdle));
        drop(g2);
        assert!(matches!(s.next(by, idle), Next::At(_, Expiry::Idle)));
    }
}
