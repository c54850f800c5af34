//! The response body on its way back to the caller: streamed, observed, and finished in order.
//!
//! Every data chunk is passed on as it arrives, except the most recent one, which is held back
//! until the next arrives. When the upstream body ends, the finishing work (the audit record,
//! spec-drift checks) runs to completion first and only then is the held chunk released: so a
//! caller cannot have received the whole response before its audit record was written; when the
//! finishing work fails (the record could not be written and the gateway fails closed), the body
//! ends with that error instead, so the caller sees a broken response. If the
//! caller goes away mid-stream, the finishing work still runs (spawned from `Drop`), marked
//! incomplete. A bounded copy of the bytes is kept for the finishing work (JSON responses of the
//! Partner API are small; beyond the bound, the copy is dropped and only the count kept).
//!
//! [`ObservedBody::prefetch`] reads ahead before the response head is returned: a body that ends
//! within its limit is finished before the caller gets any of it, and then goes out with its
//! head in one write; a longer one continues as above from where the read-ahead stopped.

use std::any::Any;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Inner = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// What the finishing work learns about the body.
#[derive(Debug)]
pub struct Finished {
    /// Body bytes read from the upstream (all of them go to the caller unless the finishing work
    /// fails or the caller goes away).
    pub bytes: u64,
    /// The whole body, when it fit in the copy bound.
    pub copy: Option<Bytes>,
    /// False when the upstream body broke or the caller went away before the end.
    pub complete: bool,
}

/// Resolves when the finishing work is done; an error (the audit record could not be written
/// while the gateway fails closed) ends the body with it instead of releasing the last bytes.
pub type FinishFuture = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;
pub type OnFinish = Box<dyn FnOnce(Finished) -> FinishFuture + Send>;

pub struct ObservedBody {
    inner: Inner,
    /// Chunks read ahead by [`ObservedBody::prefetch`], released before anything else.
    early: VecDeque<Bytes>,
    held: Option<Bytes>,
    queued: VecDeque<Frame<Bytes>>,
    /// Why the body ends with an error (given to the caller once, instead of the rest).
    failed: Option<BoxError>,
    copy: Option<BytesMut>,
    copy_limit: usize,
    bytes: u64,
    on_finish: Option<OnFinish>,
    finishing: Option<FinishFuture>,
    done: bool,
    /// Kept alive until the body is finished or dropped (for example a concurrency lease).
    _guard: Option<Box<dyn Any + Send>>,
    /// The longest wait for the next piece of the upstream body.
    idle: Option<(std::time::Duration, Pin<Box<tokio::time::Sleep>>)>,
    /// The span of the request the body answers (current when it was made): the body is polled
    /// by the connection, outside it.
    span: tracing::Span,
}

/// The upstream body stalled longer than the idle timeout.
#[derive(Debug)]
pub struct BodyIdleTimeout;

impl std::fmt::Display for BodyIdleTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the upstream response body stalled")
    }
}

impl std::error::Error for BodyIdleTimeout {}

impl ObservedBody {
    pub fn new(
        inner: Inner,
        copy_limit: usize,
        on_finish: OnFinish,
        guard: Option<Box<dyn Any + Send>>,
    ) -> Self {
        ObservedBody {
            inner,
            early: VecDeque::new(),
            held: None,
            queued: VecDeque::new(),
            failed: None,
            copy: Some(BytesMut::new()),
            copy_limit,
            bytes: 0,
            on_finish: Some(on_finish),
            finishing: None,
            done: false,
            _guard: guard,
            idle: None,
            span: tracing::Span::current(),
        }
    }

    /// Ends the body with an error when the upstream sends nothing for `idle`.
    pub fn with_idle_timeout(mut self, idle: std::time::Duration) -> Self {
        self.idle = Some((idle, Box::pin(tokio::time::sleep(idle))));
        self
    }

    fn observe(&mut self, data: &Bytes) {
        self.bytes += data.len() as u64;
        if let Some(c) = &mut self.copy {
            if c.len() + data.len() > self.copy_limit {
                self.copy = None;
            } else {
                c.extend_from_slice(data);
            }
        }
    }

    fn finished(&mut self, complete: bool) -> Option<FinishFuture> {
        let f = self.on_finish.take()?;
        let copy = self.copy.take().map(BytesMut::freeze);
        Some(f(Finished {
            bytes: self.bytes,
            copy,
            complete,
        }))
    }
}

/// One step of reading the upstream body (see [`ObservedBody::step`]).
enum Step {
    /// A data chunk that may go to the caller now (the one before the latest).
    Release(Bytes),
    /// State moved on (a chunk held back, trailers queued, the end reached or finished).
    Progress,
    /// The body is over (complete and finished) or broke; nothing more to read.
    Over,
}

impl ObservedBody {
    /// Reads the upstream body ahead, before the response head goes out, until it ended and its
    /// finishing work ran (then the caller gets the head and the whole body in one write) or
    /// more than `limit` bytes were read (then the rest streams as usual). Nothing is lost
    /// either way: what was read ahead is released first, the last chunk still only after the
    /// finishing work.
    pub async fn prefetch(&mut self, limit: u64) {
        std::future::poll_fn(|cx| {
            loop {
                if self.failed.is_some() || self.bytes > limit {
                    return Poll::Ready(());
                }
                match self.step(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Step::Release(d)) => self.early.push_back(d),
                    Poll::Ready(Step::Progress) => {}
                    Poll::Ready(Step::Over) => return Poll::Ready(()),
                }
            }
        })
        .await
    }

    /// Polls the finishing work, or else the upstream body once: a chunk is held back until the
    /// next arrives (the previous one is released); at the end, the finishing work starts; a
    /// broken or stalled body finishes incomplete and records its error in `failed`.
    fn step(&mut self, cx: &mut Context<'_>) -> Poll<Step> {
        if let Some(fut) = &mut self.finishing {
            let result = std::task::ready!(fut.as_mut().poll(cx));
            self.finishing = None;
            self.done = true;
            if let Err(e) = result {
                self.fail(e);
            }
            return Poll::Ready(Step::Over);
        }
        if self.done {
            return Poll::Ready(Step::Over);
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Some((limit, sleep)) = &mut self.idle {
            if polled.is_pending() {
                if sleep.as_mut().poll(cx).is_ready() {
                    self.span.in_scope(|| {
                        tracing::warn!("upstream response body stalled; closing it");
                    });
                    self.broken(Box::new(BodyIdleTimeout));
                    return Poll::Ready(Step::Over);
                }
            } else {
                sleep.as_mut().reset(tokio::time::Instant::now() + *limit);
            }
        }
        match std::task::ready!(polled) {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    self.observe(&data);
                    if let Some(prev) = self.held.replace(data) {
                        return Poll::Ready(Step::Release(prev));
                    }
                }
                // Trailers come after all data: hold them until the end as well.
                Err(other) => self.queued.push_back(other),
            },
            Some(Err(e)) => {
                self.broken(e);
                return Poll::Ready(Step::Over);
            }
            None => match self.finished(true) {
                Some(fut) => self.finishing = Some(fut),
                None => self.done = true,
            },
        }
        Poll::Ready(Step::Progress)
    }

    /// The upstream body broke: its finishing work runs on its own, marked incomplete, and the
    /// caller gets the error instead of the rest.
    fn broken(&mut self, e: BoxError) {
        if let Some(fut) = self.finished(false) {
            tokio::spawn(fut);
        }
        self.done = true;
        self.fail(e);
    }

    /// The caller must not see a complete response: nothing held is released, the error is.
    fn fail(&mut self, e: BoxError) {
        self.early.clear();
        self.held = None;
        self.queued.clear();
        self.failed = Some(e);
    }
}

impl Body for ObservedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if let Some(e) = this.failed.take() {
                return Poll::Ready(Some(Err(e)));
            }
            if let Some(d) = this.early.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(d))));
            }
            if this.done && this.finishing.is_none() {
                if let Some(d) = this.held.take() {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                return Poll::Ready(this.queued.pop_front().map(Ok));
            }
            match std::task::ready!(this.step(cx)) {
                Step::Release(d) => return Poll::Ready(Some(Ok(Frame::data(d)))),
                Step::Progress | Step::Over => {}
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
            && self.finishing.is_none()
            && self.failed.is_none()
            && self.early.is_empty()
            && self.held.is_none()
            && self.queued.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        if self.failed.is_some() {
            return SizeHint::default();
        }
        // What was read from the upstream but not yet passed on, plus what is still to read.
        let kept: u64 = self
            .early
            .iter()
            .chain(&self.held)
            .map(|d| d.len() as u64)
            .sum();
        let inner = if self.done {
            SizeHint::with_exact(0)
        } else {
            self.inner.size_hint()
        };
        // An exact 0 lets a server finish the response without ever polling the body, so before
        // the finishing work ran. (The pipeline finishes empty responses before their head is
        // sent; this keeps any other empty body honest.)
        if kept == 0 && inner.exact() == Some(0) && !(self.done && self.finishing.is_none()) {
            return SizeHint::default();
        }
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + kept);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + kept);
        }
        hint
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        // The caller went away (or the response was never polled): the record is still written;
        // finishing work already under way is completed rather than cut short.
        if let Some(fut) = self.finishing.take().or_else(|| self.finished(false))
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            handle.spawn(fut);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::{Arc, Mutex};

    fn chunks(parts: &[&'static str]) -> Inner {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed()
    }

    type Events = Arc<Mutex<Vec<String>>>;
    type Slot = Arc<Mutex<Option<Finished>>>;

    fn recorder() -> (Events, Slot) {
        (Arc::default(), Arc::default())
    }

    #[tokio::test]
    async fn last_chunk_is_released_only_after_finishing_work_completed() {
        let (events, fin) = recorder();
        let (e2, f2) = (events.clone(), fin.clone());
        let on_finish: OnFinish = Box::new(move |f| {
            Box::pin(async move {
                tokio::task::yield_now().await;
                e2.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push("finished".into());
                *f2.lock().unwrap_or_else(|p| p.into_inner()) = Some(f);
                Ok(())
            })
        });
        let mut body = ObservedBody::new(chunks(&["ab", "cd", "ef"]), 1024, on_finish, None);
        while let Some(frame) = body.frame().await {
            let data = frame
                .ok()
                .and_then(|f| f.into_data().ok())
                .unwrap_or_default();
            events
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(String::from_utf8_lossy(&data).into_owned());
        }
        let got = events.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert_eq!(got, ["ab", "cd", "finished", "ef"]);
        let f = fin.lock().unwrap_or_else(|p| p.into_inner()).take();
        let f = f.unwrap_or(Finished {
            bytes: 0,
            copy: None,
            complete: false,
        });
        assert_eq!((f.bytes, f.complete), (6, true));
        assert_eq!(f.copy.as_deref(), Some(&b"abcdef"[..]));
    }

    /// Finishing work that logs "finished" into `events` and keeps what it learnt in `fin`.
    fn finish_into(events: &Events, fin: &Slot, result: Result<(), &'static str>) -> OnFinish {
        let (e2, f2) = (events.clone(), fin.clone());
        Box::new(move |f| {
            Box::pin(async move {
                tokio::task::yield_now().await;
                e2.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push("finished".into());
                *f2.lock().unwrap_or_else(|p| p.into_inner()) = Some(f);
                result.map_err(|e| e.into())
            })
        })
    }

    /// Every frame of `body` as text, an error as "error".
    async fn drain(body: &mut ObservedBody, events: &Events) {
        while let Some(frame) = body.frame().await {
            let text = match frame {
                Ok(f) => String::from_utf8_lossy(&f.into_data().unwrap_or_default()).into_owned(),
                Err(_) => "error".into(),
            };
            events.lock().unwrap_or_else(|p| p.into_inner()).push(text);
        }
    }

    #[tokio::test]
    async fn prefetched_small_body_is_finished_before_the_first_byte_and_then_released_whole() {
        let (events, fin) = recorder();
        let on_finish = finish_into(&events, &fin, Ok(()));
        let mut body = ObservedBody::new(chunks(&["ab", "cd", "ef"]), 1024, on_finish, None);
        body.prefetch(64).await;
        // Finished before anything was handed out; what is left is known exactly.
        assert_eq!(
            *events.lock().unwrap_or_else(|p| p.into_inner()),
            ["finished"]
        );
        assert_eq!(body.size_hint().exact(), Some(6));
        assert!(!body.is_end_stream());
        drain(&mut body, &events).await;
        let got = events.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert_eq!(got, ["finished", "ab", "cd", "ef"]);
        assert!(body.is_end_stream());
        let f = fin.lock().unwrap_or_else(|p| p.into_inner()).take();
        assert!(
            matches!(
                f,
                Some(Finished {
                    bytes: 6,
                    complete: true,
                    ..
                })
            ),
            "{f:?}"
        );
    }

    #[tokio::test]
    async fn body_beyond_the_read_ahead_streams_the_rest_and_still_holds_its_last_chunk() {
        let (events, fin) = recorder();
        let on_finish = finish_into(&events, &fin, Ok(()));
        let mut body = ObservedBody::new(chunks(&["ab", "cd", "ef", "gh"]), 1024, on_finish, None);
        // Stops once more than 3 bytes were read: "ab" released early, "cd" held.
        body.prefetch(3).await;
        assert!(events.lock().unwrap_or_else(|p| p.into_inner()).is_empty());
        drain(&mut body, &events).await;
        let got = events.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert_eq!(got, ["ab", "cd", "ef", "finished", "gh"]);
    }

    #[tokio::test]
    async fn prefetched_body_whose_finishing_work_fails_gives_the_caller_only_the_error() {
        let (events, fin) = recorder();
        let on_finish = finish_into(&events, &fin, Err("audit record not written"));
        let mut body = ObservedBody::new(chunks(&["ab", "cd"]), 1024, on_finish, None);
        body.prefetch(64).await;
        drain(&mut body, &events).await;
        let got = events.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert_eq!(got, ["finished", "error"]);
    }

    #[tokio::test]
    async fn copy_beyond_its_bound_is_dropped_but_bytes_are_counted() {
        let fin: Arc<Mutex<Option<Finished>>> = Arc::default();
        let f2 = fin.clone();
        let on_finish: OnFinish = Box::new(move |f| {
            Box::pin(async move {
                *f2.lock().unwrap_or_else(|p| p.into_inner()) = Some(f);
                Ok(())
            })
        });
        let body = ObservedBody::new(chunks(&["0123456789", "0123456789"]), 15, on_finish, None);
        let all = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        assert_eq!(all.len(), 20);
        let f = fin.lock().unwrap_or_else(|p| p.into_inner()).take();
        assert!(
            matches!(
                f,
                Some(Finished {
                    bytes: 20,
                    copy: None,
                    complete: true
                })
            ),
            "{f:?}"
        );
    }

    #[tokio::test]
    async fn stalled_body_ends_with_an_error_after_the_idle_timeout_and_finishes_incomplete() {
        let (tx, rx) = tokio::sync::oneshot::channel::<Finished>();
        let on_finish: OnFinish = Box::new(move |f| {
            Box::pin(async move {
                let _ = tx.send(f);
                Ok(())
            })
        });
        let stalled = chunks(&["ab"]).map_frame(|f| f);
        let never = http_body_util::StreamBody::new(futures_util::stream::pending::<
            Result<Frame<Bytes>, BoxError>,
        >());
        let inner = http_body_util::BodyExt::boxed(StreamChain {
            first: Some(stalled),
            then: never,
        });
        let mut body = ObservedBody::new(inner, 1024, on_finish, None)
            .with_idle_timeout(std::time::Duration::from_millis(50));
        let mut saw_error = false;
        while let Some(frame) = body.frame().await {
            if frame.is_err() {
                saw_error = true;
                break;
            }
        }
        assert!(saw_error);
        let f = rx.await.unwrap_or(Finished {
            bytes: 0,
            copy: None,
            complete: true,
        });
        assert!(!f.complete);
        assert_eq!(f.bytes, 2);
    }

    /// One body, then another (used to stall after some data).
    struct StreamChain<A, B> {
        first: Option<A>,
        then: B,
    }

    impl<A, B> Body for StreamChain<A, B>
    where
        A: Body<Data = Bytes, Error = BoxError> + Unpin,
        B: Body<Data = Bytes, Error = BoxError> + Unpin,
    {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            if let Some(a) = &mut self.first {
                match Pin::new(a).poll_frame(cx) {
                    Poll::Ready(None) => self.first = None,
                    other => return other,
                }
            }
            Pin::new(&mut self.then).poll_frame(cx)
        }
    }

    #[tokio::test]
    async fn dropped_mid_stream_still_runs_finishing_work_marked_incomplete() {
        let (tx, rx) = tokio::sync::oneshot::channel::<Finished>();
        let on_finish: OnFinish = Box::new(move |f| {
            Box::pin(async move {
                let _ = tx.send(f);
                Ok(())
            })
        });
        let mut body = ObservedBody::new(chunks(&["ab", "cd", "ef"]), 1024, on_finish, None);
        let _ = body.frame().await;
        drop(body);
        let f = rx.await.unwrap_or(Finished {
            bytes: 99,
            copy: None,
            complete: true,
        });
        assert!(!f.complete);
        assert_eq!(f.bytes, 4);
    }
}
