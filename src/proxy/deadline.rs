//! A bound on how long a caller may take to take a forwarded response.
//!
//! A caller that stops reading (an HTTP/1 client that never reads its socket, an HTTP/2 reader
//! that never opens its window) makes hyper stop polling the response body, so no timer inside
//! the body's poll can fire. [`ResponseDeadline`] therefore owns the [`ObservedBody`] together
//! with an independent watchdog task: at the deadline the watchdog takes the body away and drops
//! it, which writes its audit record (incomplete, exactly once: see [`ObservedBody`]'s `Drop`),
//! releases its guard (the concurrency lease and the in-flight gauge) and drops the upstream
//! body (freeing the upstream connection). The next poll, if hyper ever makes one, ends the body
//! with an error so hyper closes the connection or resets the stream.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::body::ObservedBody;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The caller did not take the whole response within the deadline.
#[derive(Debug)]
pub struct ResponseWriteTimeout;

impl std::fmt::Display for ResponseWriteTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the caller did not take the response in time")
    }
}

impl std::error::Error for ResponseWriteTimeout {}

struct Shared {
    /// `None` once the body ended, or was taken away at the deadline.
    body: Option<ObservedBody>,
    expired: bool,
    /// The task polling the body when it last waited, woken at the deadline.
    waker: Option<Waker>,
}

/// An [`ObservedBody`] that must be taken completely within a deadline.
pub struct ResponseDeadline {
    shared: Arc<Mutex<Shared>>,
    watchdog: tokio::task::AbortHandle,
}

fn lock(m: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ResponseDeadline {
    /// Starts the clock now. `on_expiry` runs once, at the deadline, before the body is dropped
    /// (so the finishing work it triggers can tell why the body ended).
    pub fn new(
        body: ObservedBody,
        within: Duration,
        on_expiry: impl FnOnce() + Send + 'static,
    ) -> Self {
        let shared = Arc::new(Mutex::new(Shared {
            body: Some(body),
            expired: false,
            waker: None,
        }));
        let weak = Arc::downgrade(&shared);
        // The request's span (current here), so that the warning carries its request id.
        let span = tracing::Span::current();
        let watchdog = tokio::spawn(async move {
            tokio::time::sleep(within).await;
            let Some(shared) = weak.upgrade() else {
                return;
            };
            let (body, waker) = {
                let mut s = lock(&shared);
                if s.body.is_none() {
                    return;
                }
                s.expired = true;
                on_expiry();
                (s.body.take(), s.waker.take())
            };
            span.in_scope(|| {
                tracing::warn!(
                    timeout_ms = within.as_millis() as u64,
                    "the caller did not take the response in time; closing it"
                )
            });
            drop(body);
            if let Some(w) = waker {
                w.wake();
            }
        })
        .abort_handle();
        ResponseDeadline { shared, watchdog }
    }
}

impl Body for ResponseDeadline {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let mut s = lock(&this.shared);
        let Some(body) = s.body.as_mut() else {
            return Poll::Ready(
                s.expired
                    .then(|| Err(Box::new(ResponseWriteTimeout) as BoxError)),
            );
        };
        let polled = Pin::new(&mut *body).poll_frame(cx);
        let ended = match &polled {
            Poll::Pending => {
                s.waker = Some(cx.waker().clone());
                false
            }
            Poll::Ready(None | Some(Err(_))) => true,
            Poll::Ready(Some(Ok(_))) => body.is_end_stream(),
        };
        if ended {
            // Taken completely (or broken on its own): the deadline no longer applies.
            this.watchdog.abort();
            let body = s.body.take();
            drop(s);
            drop(body);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let s = lock(&self.shared);
        match &s.body {
            Some(b) => b.is_end_stream(),
            None => !s.expired,
        }
    }

    fn size_hint(&self) -> SizeHint {
        let s = lock(&self.shared);
        match &s.body {
            Some(b) => b.size_hint(),
            None if s.expired => SizeHint::default(),
            None => SizeHint::with_exact(0),
        }
    }
}

impl Drop for ResponseDeadline {
    fn drop(&mut self) {
        self.watchdog.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::body::{Finished, OnFinish};
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn observed(
        parts: Vec<&'static str>,
        then_stall: bool,
    ) -> (ObservedBody, tokio::sync::oneshot::Receiver<Finished>) {
        let (tx, rx) = tokio::sync::oneshot::channel::<Finished>();
        let on_finish: OnFinish = Box::new(move |f| {
            Box::pin(async move {
                let _ = tx.send(f);
                Ok(())
            })
        });
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
            .into_iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        let data = futures_util::stream::iter(frames);
        let inner = if then_stall {
            let stalled = futures_util::StreamExt::chain(data, futures_util::stream::pending());
            http_body_util::StreamBody::new(stalled).boxed()
        } else {
            http_body_util::StreamBody::new(data).boxed()
        };
        (ObservedBody::new(inner, 1024, on_finish, None), rx)
    }

    #[tokio::test]
    async fn body_taken_in_time_is_passed_through_and_finishes_complete() {
        let (body, rx) = observed(vec!["ab", "cd"], false);
        let expired = Arc::new(AtomicBool::new(false));
        let e2 = expired.clone();
        let body = ResponseDeadline::new(body, Duration::from_millis(200), move || {
            e2.store(true, Ordering::SeqCst)
        });
        let all = body.collect().await.map(|c| c.to_bytes()).ok();
        assert_eq!(all.as_deref(), Some(&b"abcd"[..]));
        let f = rx.await.ok().map(|f| (f.bytes, f.complete));
        assert_eq!(f, Some((4, true)));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!expired.load(Ordering::SeqCst), "the watchdog fired anyway");
    }

    #[tokio::test]
    async fn body_not_taken_in_time_finishes_incomplete_without_being_polled_and_then_errors() {
        let (body, rx) = observed(vec!["ab", "cd"], true);
        let expired = Arc::new(AtomicBool::new(false));
        let e2 = expired.clone();
        let mut body = ResponseDeadline::new(body, Duration::from_millis(100), move || {
            e2.store(true, Ordering::SeqCst)
        });
        // One frame taken, then the caller stops polling.
        assert!(matches!(body.frame().await, Some(Ok(_))));
        let f = tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .ok()
            .and_then(Result::ok)
            .map(|f| (f.bytes, f.complete));
        assert_eq!(f, Some((4, false)));
        assert!(expired.load(Ordering::SeqCst));
        assert!(!body.is_end_stream());
        assert!(matches!(body.frame().await, Some(Err(_))));
    }
}
