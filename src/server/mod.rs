//! Listeners: the gateway (HTTP/1.1 and HTTP/2, TLS when configured) and the admin listener;
//! graceful shutdown.

mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin;
use crate::auth::jwt::Verifier;
use crate::auth::upstream::UpstreamCredentials;
use crate::config::Config;
use crate::http_client::build_client;
use crate::metrics::Metrics;
use crate::pipeline::{self, Gateway};

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
        self.gateway.audit.shutdown().await;
    }

    /// Resolves once every issuer has keys and every credential a token (or never, if that never
    /// happens: callers bound it with a timeout).
    pub async fn wait_ready(&self) {
        while !admin::not_ready(&self.gateway).is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Binds both listeners and starts serving. Keys and tokens are fetched in the background; until
/// they are there, requests that need them get 503 with the matching code.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let config = Arc::new(config);
    let client = build_client(
        config.upstream.ca_file.as_deref(),
        config.upstream.connect_timeout,
    )?;
    let metrics = Metrics::new();
    let verifier = Verifier::new(config.issuers.clone(), client.clone());
    let credentials =
        UpstreamCredentials::new(&config.credentials, client.clone(), metrics.clone());
    let audit = crate::audit::AuditLog::open(config.audit.clone())?;
    let quotas = crate::quota::Quotas::new(config.quota.clone()).await;
    let gateway = Arc::new(Gateway::new(
        config.clone(),
        pipeline::Parts {
            verifier: verifier.clone(),
            credentials: credentials.clone(),
            quotas,
            audit,
            client,
            metrics,
        },
    ));

    let tls = match &config.listen.tls {
        Some(t) => Some(tls::acceptor(t).map_err(StartError::Tls)?),
        None => None,
    };
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

    tokio::spawn(async move { verifier.start().await });
    tokio::spawn(async move { credentials.start().await });

    let (stop, stop_rx) = watch::channel(false);
    let gw = gateway.clone();
    let listen = config.listen.clone();
    let main_task = tokio::spawn(serve(
        listener,
        tls,
        listen.clone(),
        stop_rx.clone(),
        move |req, peer| pipeline::handle(gw.clone(), req, peer),
    ));
    let gw = gateway.clone();
    let admin_task = tokio::spawn(serve(
        admin_listener,
        None,
        listen,
        stop_rx,
        move |req, _peer| admin::handle(gw.clone(), req),
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

/// The accept loop shared by both listeners.
async fn serve<F, Fut, B>(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    cfg: crate::config::Listen,
    mut stop: watch::Receiver<bool>,
    handler: F,
) where
    F: Fn(http::Request<hyper::body::Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = http::Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .max_buf_size(cfg.max_header_bytes.max(8192))
        .max_headers(100);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(cfg.max_header_bytes as u32)
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => break,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let service = service_fn(move |req| {
            let h = handler.clone();
            async move { Ok::<_, std::convert::Infallible>(h(req, peer).await) }
        });
        let builder = builder.clone();
        match &tls {
            None => {
                let conn = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let timeout = cfg.header_read_timeout;
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let Ok(Ok(tls_stream)) =
                        tokio::time::timeout(timeout, acceptor.accept(stream)).await
                    else {
                        return;
                    };
                    let conn = builder
                        .serve_connection(TokioIo::new(tls_stream), service)
                        .into_owned();
                    let _ = watcher.watch(conn).await;
                });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(cfg.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace period over; closing remaining connections");
    }
}
