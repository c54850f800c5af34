//! Serde mirrors of the files exactly as written. Unknown keys are refused everywhere. Values are
//! kept as strings here; [`super::validate`] turns them into the model and reports problems.

use std::collections::BTreeMap;

use serde::Deserialize;

/// `policies/gateway.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayFile {
    /// Path of the OpenAPI document; the built-in seed spec when absent.
    pub spec: Option<String>,
    /// Folder of team policies, relative to this file (default `teams`).
    pub teams: Option<String>,
    pub listen: ListenFile,
    #[serde(default)]
    pub admin: AdminFile,
    pub upstream: UpstreamFile,
    #[serde(default)]
    pub credentials: BTreeMap<String, CredentialFile>,
    #[serde(default)]
    pub issuers: Vec<IssuerFile>,
    #[serde(default)]
    pub limits: LimitsFile,
    #[serde(default)]
    pub quota: QuotaFile,
    #[serde(default)]
    pub audit: AuditFile,
    #[serde(default)]
    pub tracing: TracingFile,
}

/// `[tracing]` in gateway.toml. W3C trace context is always propagated; spans are exported over
/// OTLP/HTTP only when `otlp_endpoint` is set. Read at start: a reload does not change it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingFile {
    /// Base URL of an OTLP/HTTP collector, for example `http://127.0.0.1:4318`; spans are posted
    /// to its `/v1/traces` (export is off without it).
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans (default `greenhouse-gateway`).
    pub service_name: Option<String>,
    /// Share of the traces the gateway starts that are recorded, 0.0 to 1.0 (default 1.0); a
    /// caller's sampled flag decides for the traces it continues.
    pub sample_ratio: Option<f64>,
    /// Ended spans waiting for export; beyond it new ones are dropped (default 2048).
    pub queue_size: Option<u64>,
    /// Longest one export request may take (default `10s`).
    pub export_timeout: Option<String>,
}

/// `[quota]` in gateway.toml: where quota state lives.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaFile {
    /// `memory` (default: per replica) or `redis` (shared by every replica).
    pub backend: Option<String>,
    /// `redis://[user:password@]host:port[/db]`, or `rediss://` for TLS; a secret because it may
    /// hold a password.
    pub redis_url: Option<SecretFile>,
    /// For `rediss://` with a private CA: a PEM file of the CA certificates that sign the
    /// server's certificate (default: the public web roots and the system's).
    pub redis_ca_file: Option<String>,
    /// `deny` (default: 503 quota_backend_unavailable), `allow` (admit, counted) or `local`
    /// (fall back to this replica's memory limiter) when Redis cannot answer in time.
    pub on_backend_error: Option<String>,
    /// Longest wait for a Redis decision (default `250ms`).
    pub timeout: Option<String>,
    /// Prefix of every Redis key (default `ghgw`).
    pub key_prefix: Option<String>,
}

/// `[audit]` in gateway.toml.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditFile {
    /// The current audit file (default `audit/audit.jsonl`, relative to gateway.toml).
    pub path: Option<String>,
    /// `always`, `batch` (default) or `never`.
    pub fsync: Option<String>,
    /// `reject` (default: fail closed with 503 audit_unavailable) or `continue`.
    pub on_error: Option<String>,
    /// Rotate when the file would grow past this many bytes (default 104857600; 0 never).
    pub rotate_bytes: Option<u64>,
    /// Keys the hash chain (HMAC-SHA256), so editing the file cannot recompute it.
    pub hmac_key: Option<SecretFile>,
    /// Records waiting for the writer before new writes fail (default 4096).
    pub queue_capacity: Option<u64>,
    /// With `fsync = "batch"`, the longest an acknowledged record may stay unsynced (default `50ms`).
    pub batch_interval: Option<String>,
    /// Disk kept allocated ahead of the audit file, so records of requests in flight can always
    /// be written (default 33554432; at least 65536).
    pub reserve_bytes: Option<u64>,
}

/// `[listen]`: the gateway listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenFile {
    pub addr: String,
    pub tls: Option<TlsFile>,
    /// Time allowed for a client to send the request head (default `10s`).
    pub header_read_timeout: Option<String>,
    /// Time allowed for a client to send the whole request body (default `30s`; then 408).
    pub body_read_timeout: Option<String>,
    /// Time allowed for a client to take a forwarded response, from its head to its last byte
    /// (default `60s`; then the response is cut off and its quota slot released).
    pub response_write_timeout: Option<String>,
    /// Largest request head accepted, in bytes (default 16384; larger gets 431).
    pub max_header_bytes: Option<u64>,
    /// How long in-flight requests may run after SIGTERM/SIGINT (default `30s`).
    pub shutdown_grace: Option<String>,
    /// After SIGTERM, how long `/readyz` answers 503 while requests are still served, before
    /// the listeners close (default `5s`; `0s` closes them at once).
    pub drain: Option<String>,
    /// A connection with no request in flight for this long is closed (default `60s`).
    pub idle_timeout: Option<String>,
    /// Open connections on the gateway listener; at the cap it stops accepting (default 4096).
    pub max_connections: Option<u64>,
    /// Requests in flight gateway-wide; over it, 503 `overloaded` (default 1024).
    pub max_requests_in_flight: Option<u64>,
    /// Peers (CIDRs) whose `X-Forwarded-For` is believed for the audit's `client_addr`.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
}

/// TLS for the gateway listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    pub cert: String,
    pub key: String,
    /// When set, clients must present a certificate signed by this CA.
    pub client_ca: Option<String>,
}

/// `admin.addr` when the file does not set it.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:9090";

/// `[admin]`: health, readiness and metrics.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    /// Default [`DEFAULT_ADMIN_ADDR`].
    pub addr: Option<String>,
    /// Bearer token for admin endpoints; required when `addr` is not loopback.
    pub token: Option<SecretFile>,
}

/// `[upstream]`: where Greenhouse is.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFile {
    /// Its path is also the public path prefix.
    pub base_url: String,
    /// Time allowed for the upstream to answer with response headers (default `30s`).
    pub timeout: Option<String>,
    /// Time allowed to open a connection (default `5s`).
    pub connect_timeout: Option<String>,
    /// An extra PEM trust anchor for the upstream, token endpoints and JWKS URLs.
    pub ca_file: Option<String>,
    /// The account's budget at Greenhouse (`"50/10s"`), paced for all teams and replicas.
    pub rate: Option<String>,
    /// How long a request may wait for a slot in that budget before 503 (default `2s`).
    pub max_wait: Option<String>,
}

/// `[credentials.NAME]`: one flat table whose `kind` says which keys it needs, so that every
/// problem is reported at its own key (validation checks the keys per kind).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialFile {
    /// `oauth2_client_credentials` or `basic`.
    pub kind: String,
    // kind = "oauth2_client_credentials"
    pub token_url: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<SecretFile>,
    pub scope: Option<String>,
    /// `basic` (default) or `post`.
    pub client_auth: Option<String>,
    /// Refresh the token this long before it expires (default `60s`).
    pub refresh_before: Option<String>,
    /// Token endpoint request timeout (default `5s`).
    pub timeout: Option<String>,
    /// Extra form parameters sent with the token request.
    pub extra_params: Option<BTreeMap<String, String>>,
    // kind = "basic"
    pub api_key: Option<SecretFile>,
}

/// A secret: `{ env = "NAME" }`, `{ file = "path" }` or, for development only, `{ value = "..." }`.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a secret table: { env = 'NAME' }, { file = 'path' } or, for development only, { value = '...' }"
)]
pub struct SecretFile {
    pub env: Option<String>,
    pub file: Option<String>,
    pub value: Option<String>,
}

/// `[[issuers]]`: an identity provider whose tokens callers present.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerFile {
    pub issuer: String,
    pub audiences: Vec<String>,
    pub jwks_url: Option<String>,
    pub jwks_file: Option<String>,
    pub algorithms: Vec<String>,
    /// Clock skew allowed for `exp`, `nbf` and `iat` (default `30s`, at most `5m`).
    pub leeway: Option<String>,
    /// Background JWKS refresh (default `5m`).
    pub refresh_interval: Option<String>,
    /// After a successful refetch for an unknown key id, no other for this long (default `30s`).
    pub refetch_cooldown: Option<String>,
}

/// `[limits]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    /// Largest request body, in bytes (default 10 MiB); decoded attachments count against it.
    pub max_body_bytes: Option<u64>,
    /// Request body bytes buffered at once by the whole gateway (default 256 MiB, at least
    /// `max_body_bytes`); a body that does not fit gets 503 `overloaded` before it is read.
    pub max_buffered_body_bytes: Option<u64>,
    /// Largest decoded size of one attachment's `content` (default 5 MiB).
    pub max_attachment_bytes: Option<u64>,
    /// Deepest JSON nesting accepted in a body (default 64).
    pub max_json_depth: Option<u64>,
    /// Memory for verified caller tokens, in bytes (default 16 MiB); `0` verifies every token's
    /// signature on every request.
    pub verified_token_cache_bytes: Option<u64>,
}

/// `policies/teams/NAME.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeamFile {
    pub name: String,
    pub description: Option<String>,
    pub operations: Vec<String>,
    pub credential: Option<String>,
    #[serde(default)]
    pub members: Vec<BTreeMap<String, String>>,
    #[serde(default)]
    pub on_behalf_of: OnBehalfOfFile,
    #[serde(default)]
    pub quota: TeamQuotaFile,
    #[serde(default)]
    pub validation: TeamValidationFile,
}

/// `[quota]` in a team file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeamQuotaFile {
    /// Sustained rate for the whole team (GCRA), for example `"20/s"`.
    pub rate: Option<String>,
    /// Requests admitted at once from idle (default: the rate's count).
    pub burst: Option<u64>,
    /// Requests in flight at once.
    pub concurrency: Option<u64>,
    /// Admitted requests per UTC day for the whole team, all operations together (resets at
    /// 00:00 UTC).
    pub daily: Option<u64>,
    /// Per operation id.
    #[serde(default)]
    pub operations: BTreeMap<String, OpQuotaFile>,
}

/// `[quota.operations.ID]` in a team file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpQuotaFile {
    pub rate: Option<String>,
    pub burst: Option<u64>,
    /// Admitted requests per UTC day (resets at 00:00 UTC).
    pub daily: Option<u64>,
}

/// `[validation]` in a team file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeamValidationFile {
    /// `enforce` (default) or `report`.
    pub mode: Option<String>,
}

/// `[on_behalf_of]` in a team file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnBehalfOfFile {
    pub default: Option<String>,
    #[serde(default)]
    pub allowed: Vec<String>,
    pub from_claim: Option<String>,
}
