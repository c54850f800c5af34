//! The validated configuration the gateway runs with.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::auth::jwks::IssuerConfig;
pub use crate::auth::upstream::{ClientAuth, CredentialSettings, OAuth2Credential};
use crate::policy::Teams;
pub use crate::server::Tls;
use crate::spec::Spec;
use crate::values::Secret;

#[derive(Debug)]
pub struct Config {
    /// The gateway.toml this was loaded from.
    pub source: PathBuf,
    pub spec: Arc<Spec>,
    pub listen: Listen,
    pub admin: Admin,
    pub upstream: Upstream,
    pub credentials: BTreeMap<String, CredentialSettings>,
    pub issuers: Vec<IssuerConfig>,
    pub limits: Limits,
    pub teams: Teams,
    pub quota: crate::quota::QuotaSettings,
    pub audit: crate::audit::AuditSettings,
    /// `[tracing]`: span export, when an `otlp_endpoint` is set.
    pub tracing: Option<crate::telemetry::OtlpSettings>,
    pub validation: crate::validate::ValidationOptions,
    /// Compiled from the spec at load: a schema that cannot compile is a `check` problem.
    pub validators: Arc<crate::validate::Validators>,
    /// Findings that do not stop the gateway (for example overlapping teams).
    pub warnings: Vec<super::Problem>,
}

#[derive(Debug, Clone)]
pub struct Listen {
    pub addr: SocketAddr,
    pub tls: Option<Tls>,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub response_write_timeout: Duration,
    pub max_header_bytes: usize,
    pub shutdown_grace: Duration,
    /// After SIGTERM, `/readyz` answers 503 this long before the listeners close.
    pub drain: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// Open connections on the gateway listener before it stops accepting.
    pub max_connections: usize,
    /// Requests in flight gateway-wide before new ones get 503 `overloaded`.
    pub max_requests_in_flight: usize,
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

#[derive(Debug, Clone)]
pub struct Admin {
    pub addr: SocketAddr,
    pub token: Option<Secret>,
}

#[derive(Debug, Clone)]
pub struct Upstream {
    /// Scheme, authority and path prefix, without a trailing slash.
    pub base_url: http::Uri,
    /// The path part of `base_url` (for example `/v1/partner`): the public path prefix too.
    pub prefix: String,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: u64,
    /// Request body bytes buffered at once, all requests together.
    pub max_buffered_body_bytes: u64,
    /// Memory for verified caller tokens; 0: no cache.
    pub verified_token_cache_bytes: u64,
}
