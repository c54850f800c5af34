//! The gateway as a `tower::Service`: what the listener calls for each request, and what tests
//! drive with `oneshot`, no socket needed.
//!
//! Around the decision path ([`crate::pipeline::handle`]) sits what every request needs whatever
//! happens inside: its request id, chosen first; one tracing span carrying it, in the caller's
//! W3C trace or a new one ([`crate::telemetry`]); and a panic anywhere in handling becomes 500
//! `internal_error` with its audit record instead of a dropped connection.

use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Request, Response};
use tracing::Instrument;

use crate::gateway::Gateway;
use crate::pipeline::{self, BoxError, PeerAddr, RequestId, RespBody};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The decision path as a service.
#[derive(Clone)]
pub struct Pipeline {
    gw: Arc<Gateway>,
}

impl Pipeline {
    pub fn new(gw: Arc<Gateway>) -> Self {
        Pipeline { gw }
    }
}

impl<B> tower::Service<Request<B>> for Pipeline
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<RespBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<RespBody>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let gw = self.gw.clone();
        Box::pin(async move { Ok(pipeline::handle(gw, req).await) })
    }
}

/// Request id, span and panic guard around an inner service (the [`Pipeline`], or in tests any
/// service that must be shown to be guarded).
#[derive(Clone)]
pub struct Guarded<S> {
    inner: S,
    gw: Arc<Gateway>,
}

impl<S> Guarded<S> {
    pub fn new(inner: S, gw: Arc<Gateway>) -> Self {
        Guarded { inner, gw }
    }
}

/// The service the gateway listener runs: the decision path, guarded.
pub fn gateway_service(gw: Arc<Gateway>) -> Guarded<Pipeline> {
    Guarded::new(Pipeline::new(gw.clone()), gw)
}

impl<S, B> tower::Service<Request<B>> for Guarded<S>
where
    S: tower::Service<Request<B>, Response = Response<RespBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<RespBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<RespBody>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let started = Instant::now();
        let request_id = pipeline::request_id(req.headers());
        req.extensions_mut().insert(RequestId(request_id.clone()));
        let (method, uri) = (req.method().clone(), req.uri().clone());
        let peer = req.extensions().get::<PeerAddr>().map(|p| p.0);
        let span = crate::telemetry::request_span(&request_id, &method);
        // The caller's trace continued (or a new one), kept with the request until it ends.
        let trace = crate::telemetry::RequestTrace::start(span.clone(), req.headers());
        req.extensions_mut().insert(trace);
        // The inner service was made ready by `poll_ready`; the clone left in its place is the
        // one the next call readies.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let gw = self.gw.clone();
        Box::pin(
            async move {
                let handled = AssertUnwindSafe(async move { inner.call(req).await })
                    .catch_unwind()
                    .await;
                match handled {
                    Ok(Ok(resp)) => Ok(resp),
                    Ok(Err(never)) => match never {},
                    Err(_panic) => {
                        // The payload is not logged: it could hold whatever the panicking code
                        // formatted into it (the panic hook has already reported where).
                        tracing::error!("request handling panicked; answered 500");
                        Ok(pipeline::respond_panicked(
                            &gw, request_id, &method, &uri, peer, started,
                        )
                        .await)
                    }
                }
            }
            .instrument(span),
        )
    }
}
