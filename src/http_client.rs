//! The one outbound HTTP client type: pooled, rustls with the webpki roots plus an optional
//! extra trust anchor, HTTP/2 when the peer offers it through ALPN. Used for the upstream, the
//! token endpoint and JWKS fetches.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_pki_types::pem::PemObject;

/// The request body type used for every outbound request.
pub type OutBody =
    http_body_util::combinators::BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// The shared pooled client.
pub type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, OutBody>;

/// Why an outbound client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientBuildError {
    #[error("cannot read CA file {path}: {source}")]
    CaRead {
        path: String,
        source: std::io::Error,
    },
    #[error("CA file {path} holds no usable certificate")]
    CaEmpty { path: String },
}

/// Builds the pooled client. `extra_ca` is a PEM file of additional trust anchors.
pub fn build_client(
    extra_ca: Option<&Path>,
    connect_timeout: Duration,
) -> Result<HttpClient, ClientBuildError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_ca {
        let shown = path.display().to_string();
        let pem = std::fs::read(path).map_err(|source| ClientBuildError::CaRead {
            path: shown.clone(),
            source,
        })?;
        let mut added = 0;
        for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&pem).flatten() {
            if roots.add(cert).is_ok() {
                added += 1;
            }
        }
        if added == 0 {
            return Err(ClientBuildError::CaEmpty { path: shown });
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map(|b| b.with_root_certificates(roots).with_no_client_auth())
    .unwrap_or_else(|_| unreachable_protocols());
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(64)
        .build(connector))
}

fn unreachable_protocols() -> rustls::ClientConfig {
    // The ring provider always supports the safe default versions; this path exists only so the
    // builder's Result needs no unwrap.
    rustls::ClientConfig::builder()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth()
}

/// Wraps bytes as an outbound body.
pub fn full_body(bytes: impl Into<Bytes>) -> OutBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Why a small fetch (JWKS, token endpoint) failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("request failed: {0}")]
    Connect(String),
    #[error("timed out")]
    Timeout,
    #[error("response body over {0} bytes")]
    TooLarge(usize),
    #[error("reading response body failed: {0}")]
    Body(String),
}

/// Sends a request and reads the whole response body, bounded in size and time.
pub async fn fetch(
    client: &HttpClient,
    req: Request<OutBody>,
    max_bytes: usize,
    timeout: Duration,
) -> Result<(StatusCode, HeaderMap, Bytes), FetchError> {
    let work = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| FetchError::Connect(error_chain(&e)))?;
        let (parts, body) = resp.into_parts();
        let bytes = Limited::new(body, max_bytes).collect().await.map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                FetchError::TooLarge(max_bytes)
            } else {
                FetchError::Body(e.to_string())
            }
        })?;
        Ok((parts.status, parts.headers, bytes.to_bytes()))
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| FetchError::Timeout)?
}

/// Renders an error with its sources, for logs (never contains request data).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}
