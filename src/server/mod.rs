//! Listeners: the gateway (HTTP/1.1 and HTTP/2, TLS when configured) and the admin listener;
//! graceful shutdown.

mod conn;
mod protocol;
mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};

use arc_swap::ArcSwap;

use crate::admin;
use crate::auth::jwt::Verifier;
use crate::auth::upstream::UpstreamCredentials;
use crate::config::Config;
use crate::gateway::{Gateway, Policy, Runtime};
use crate::http_client::build_client;
use crate::metrics::Metrics;
use crate::pipeline::{BodyBudget, PeerAddr};

pub use tls::{Tls, acceptor as tls_acceptor};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("upstream client: {0}")]
    Client(#[from] crate::http_client::ClientBuildError),
    #[error("audit log: {0}")]
    Audit(#[from] crate::audit::AuditError),
    #[error("policy: {}", .0.join("; "))]
    Policy(Vec<String>),
}

/// A running gateway. Dropping it does not stop it; call [`Running::shutdown`].
pub struct Running {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub gateway: Arc<Gateway>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops accepting, lets in-flight requests finish up to the configured grace, flushes the
    /// audit trail, then returns.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        // Records of responses that just finished may still be on their way to the writer.
        tokio::task::yield_now().await;
        self.gateway.policy().quotas.flush_releases().await;
        self.gateway.runtime.audit.shutdown().await;
    }

    /// Resolves once every issuer has keys and every credential a token (or never, if that never
    /// happens: callers bound it with a timeout).
    pub async fn wait_ready(&self) {
        while !self.gateway.not_ready().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The gateway for a configuration, without listeners (drive it with [`crate::service`], or
/// [`start`] it). Keys and tokens are fetched in the background; until they are there, requests
/// that need them get 503 with the matching code.
pub async fn build(config: Config) -> Result<Arc<Gateway>, StartError> {
    let config = Arc::new(config);
    let client = build_client(
        config.upstream.ca_file.as_deref(),
        config.upstream.connect_timeout,
    )?;
    let metrics = Metrics::new();
    let verifier = Verifier::with_metrics(
        config.issuers.clone(),
        client.clone(),
        config.limits.verified_token_cache_bytes,
        metrics.clone(),
    );
    let credentials =
        UpstreamCredentials::new(&config.credentials, client.clone(), metrics.clone());
    let audit = crate::audit::AuditLog::open(config.audit.clone())?;
    let quotas = crate::quota::Quotas::new(config.quota.clone()).await;
    let tls = match &config.listen.tls {
        Some(t) => Some(Arc::new(ArcSwap::from_pointee(
            tls::acceptor(t).map_err(StartError::Tls)?,
        ))),
        None => None,
    };
    let runtime = Runtime {
        client,
        metrics,
        audit,
        in_flight: Arc::new(Semaphore::new(config.listen.max_requests_in_flight)),
        body_budget: BodyBudget::new(config.limits.max_buffered_body_bytes),
        tls: tls.clone(),
    };
    let policy = Policy::build(
        config.clone(),
        1,
        verifier.clone(),
        credentials.clone(),
        quotas,
    )
    .map_err(StartError::Policy)?;
    let gateway = Arc::new(Gateway::new(runtime, policy));
    tokio::spawn(async move { verifier.start().await });
    tokio::spawn(async move { credentials.start().await });
    Ok(gateway)
}

/// Binds both listeners and starts serving (see [`build`]).
pub async fn start(config: Config) -> Result<Running, StartError> {
    let gateway = build(config).await?;
    let config = gateway.policy().config.clone();
    let tls = gateway.runtime.tls.clone();

    let listener = TcpListener::bind(config.listen.addr)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.listen.addr,
            source,
        })?;
    let admin_listener = TcpListener::bind(config.admin.addr)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.admin.addr,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: config.listen.addr,
        source,
    })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: config.admin.addr,
            source,
        })?;

    check_file_limit(&config.listen);
    let (stop, stop_rx) = watch::channel(false);
    let service = crate::service::gateway_service(gateway.clone());
    let main_task = tokio::spawn(serve(
        listener,
        tls,
        Bounds::gateway(&config.listen),
        stop_rx.clone(),
        move |mut req: http::Request<hyper::body::Incoming>, peer| {
            req.extensions_mut().insert(PeerAddr(peer));
            // Called without `poll_ready`: the guarded pipeline is always ready, and its boxed
            // future is all each connection keeps for a request in flight (no `Oneshot` holding
            // the request beside it).
            tower::Service::call(&mut service.clone(), req)
        },
    ));
    let gw = gateway.clone();
    let admin_task = tokio::spawn(serve(
        admin_listener,
        None,
        Bounds::admin(&config.listen),
        stop_rx,
        move |req, _peer| {
            let gw = gw.clone();
            async move { Ok(admin::handle(gw, req).await) }
        },
    ));
    tracing::info!(%addr, %admin_addr, tls = config.listen.tls.is_some(), "gateway listening");
    Ok(Running {
        addr,
        admin_addr,
        gateway,
        stop,
        tasks: vec![main_task, admin_task],
    })
}

/// Connections the admin listener keeps open at once: its own cap, apart from the gateway's, so
/// health checks and metrics stay reachable however busy the gateway listener is.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;

/// File descriptors kept for everything but client connections (upstream and Redis connections,
/// audit files, the listeners).
const RESERVED_FDS: u64 = 256;

/// The bounds one listener enforces.
#[derive(Clone, Debug)]
struct Bounds {
    /// Names the listener in logs.
    name: &'static str,
    max_connections: usize,
    timeouts: conn::Timeouts,
    max_header_bytes: usize,
    shutdown_grace: Duration,
}

impl Bounds {
    fn gateway(l: &crate::config::Listen) -> Self {
        Bounds {
            name: "gateway",
            max_connections: l.max_connections,
            timeouts: conn::Timeouts {
                first_request: l.header_read_timeout,
                idle: l.idle_timeout,
            },
            max_header_bytes: l.max_header_bytes,
            shutdown_grace: l.shutdown_grace,
        }
    }

    fn admin(l: &crate::config::Listen) -> Self {
        Bounds {
            name: "admin",
            max_connections: ADMIN_MAX_CONNECTIONS,
            ..Bounds::gateway(l)
        }
    }
}

/// Raises the open file limit where allowed and warns when `max_connections` cannot fit in it.
fn check_file_limit(listen: &crate::config::Listen) {
    let Some(limit) = conn::raise_file_limit() else {
        return;
    };
    let wanted = (listen.max_connections + ADMIN_MAX_CONNECTIONS) as u64 + RESERVED_FDS;
    if wanted > limit {
        tracing::warn!(
            max_connections = listen.max_connections,
            open_file_limit = limit,
            "listen.max_connections does not fit in the open file limit; accepts may fail before the cap is reached"
        );
    }
}

/// The accept loop shared by both listeners. At `max_connections` open connections it stops
/// accepting: new connections wait in the kernel's listen backlog, holding no file descriptor,
/// until one closes.
async fn serve<F, Fut, B>(
    listener: TcpListener,
    tls: Option<Arc<ArcSwap<tokio_rustls::TlsAcceptor>>>,
    bounds: Bounds,
    mut stop: watch::Receiver<bool>,
    handler: F,
) where
    F: Fn(http::Request<hyper::body::Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<http::Response<B>, std::convert::Infallible>> + Send + 'static,
    B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let builders = Arc::new(protocol::Builders::new(
        bounds.timeouts.first_request,
        bounds.max_header_bytes,
    ));
    let slots = Arc::new(Semaphore::new(bounds.max_connections));
    let mut connections = JoinSet::new();
    let mut errors = conn::AcceptErrors::new();
    let mut cap_log = conn::CapLog::new();
    loop {
        while connections.try_join_next().is_some() {}
        let slot = match slots.clone().try_acquire_owned() {
            Ok(s) => s,
            Err(_) => {
                cap_log.at_cap(bounds.name, bounds.max_connections);
                tokio::select! {
                    s = slots.clone().acquire_owned() => match s {
                        Ok(s) => s,
                        Err(_) => break,
                    },
                    _ = stop.wait_for(|&s| s) => break,
                }
            }
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|&s| s) => break,
        };
        let (stream, peer) = match accepted {
            Ok(x) => {
                errors.succeeded();
                x
            }
            Err(e) => {
                let pause = errors.failed(bounds.name, &e);
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.wait_for(|&s| s) => break,
                }
                continue;
            }
        };
        let first_request_by = tokio::time::Instant::now() + bounds.timeouts.first_request;
        let _ = stream.set_nodelay(true);
        let state = conn::ConnState::new();
        let handler = handler.clone();
        let service_state = state.clone();
        let service = service_fn(move |req| {
            let guard = service_state.request_started();
            let responding = handler(req, peer);
            async move {
                let Ok(resp) = responding.await;
                Ok::<_, std::convert::Infallible>(resp.map(|b| conn::GuardedBody::new(b, guard)))
            }
        });
        let builders = builders.clone();
        let stop = stop.clone();
        let timeouts = bounds.timeouts;
        // Two spawns, not one task with a `match` inside: a task is as large as its largest
        // state, and the TLS handshake's (the whole rustls connection) would then be held by
        // every plain connection too.
        match &tls {
            None => {
                connections.spawn(async move {
                    let _slot = slot;
                    // Nothing was asked before the deadline, or the peer left: nothing is owed.
                    let Some(version) = protocol::sniff(&stream, first_request_by).await else {
                        return;
                    };
                    let conn = protocol::serve(&builders, version, TokioIo::new(stream), service);
                    conn::drive(conn, state, first_request_by, timeouts, stop).await;
                });
            }
            Some(acceptor) => {
                // The certificate in force when the connection is accepted (a reload replaces it
                // for the connections after).
                let acceptor = acceptor.load_full();
                connections.spawn(async move {
                    let _slot = slot;
                    // The handshake counts against the deadline for the first request head.
                    // The stream goes into the boxed connection in an inner scope, so this task
                    // keeps no place for it while the connection runs.
                    let conn = {
                        let Ok(Ok(tls_stream)) =
                            tokio::time::timeout_at(first_request_by, acceptor.accept(stream))
                                .await
                        else {
                            return;
                        };
                        let version = protocol::from_alpn(tls_stream.get_ref().1.alpn_protocol());
                        protocol::serve(&builders, version, TokioIo::new(tls_stream), service)
                    };
                    conn::drive(conn, state, first_request_by, timeouts, stop).await;
                });
            }
        }
    }
    drop(listener);
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(bounds.shutdown_grace, drained)
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace period over; closing remaining connections");
        connections.shutdown().await;
    }
}
