//! Hot reload (SIGHUP, `POST /admin/reload`): the whole configuration is read again and
//! validated by the same code as `check`, then resolved into a new [`Policy`] that replaces the
//! running one in one step. A broken change is refused as a whole and the running policy stays.
//!
//! What carries over: quota usage (a team whose limits did not change keeps its very counters;
//! a team whose limits changed keeps its counts under the new limits), an issuer's keys and the
//! tokens it verified where its settings did not change, a credential's token where its settings
//! did not change. Removed teams, issuers and credentials are dropped. What the process holds
//! for its whole life (listeners, connection bounds, the upstream client's trust, the audit
//! writer, the quota backend) cannot change without a restart: such a change is refused, naming
//! the keys.

use std::sync::Arc;

use crate::config::{self, Config};
use crate::gateway::{Gateway, Policy};

/// Why a reload was refused; the running policy stays in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadError {
    /// The new configuration has problems (each with its file and key, as `check` prints them).
    Invalid(Vec<String>),
    /// The new configuration changes settings that only a restart applies.
    RestartRequired(Vec<String>),
}

impl ReloadError {
    /// The `result` label of `gateway_config_reloads_total`.
    pub fn result(&self) -> &'static str {
        match self {
            ReloadError::Invalid(_) => "invalid",
            ReloadError::RestartRequired(_) => "restart_required",
        }
    }

    pub fn problems(&self) -> &[String] {
        match self {
            ReloadError::Invalid(p) | ReloadError::RestartRequired(p) => p,
        }
    }
}

impl std::fmt::Display for ReloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReloadError::Invalid(p) => write!(f, "{} problem(s): {}", p.len(), p.join("; ")),
            ReloadError::RestartRequired(p) => {
                write!(f, "only a restart applies: {}", p.join("; "))
            }
        }
    }
}

/// Settings a running process cannot take over: one message per changed key, naming it.
pub fn restart_only_changes(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let mut differs = |key: &str, changed: bool| {
        if changed {
            out.push(format!("{key} changed: it applies only at a restart"));
        }
    };
    let (o, n) = (&old.listen, &new.listen);
    differs("listen.addr", o.addr != n.addr);
    differs(
        "listen.tls (turning TLS on or off)",
        o.tls.is_some() != n.tls.is_some(),
    );
    differs(
        "listen.tls.client_ca (turning client certificates on or off)",
        o.tls.as_ref().map(|t| t.client_ca.is_some())
            != n.tls.as_ref().map(|t| t.client_ca.is_some()),
    );
    differs(
        "listen.header_read_timeout",
        o.header_read_timeout != n.header_read_timeout,
    );
    differs("listen.idle_timeout", o.idle_timeout != n.idle_timeout);
    differs(
        "listen.max_header_bytes",
        o.max_header_bytes != n.max_header_bytes,
    );
    differs(
        "listen.shutdown_grace",
        o.shutdown_grace != n.shutdown_grace,
    );
    differs(
        "listen.max_connections",
        o.max_connections != n.max_connections,
    );
    differs(
        "listen.max_requests_in_flight",
        o.max_requests_in_flight != n.max_requests_in_flight,
    );
    differs("admin.addr", old.admin.addr != new.admin.addr);
    differs(
        "limits.max_buffered_body_bytes",
        old.limits.max_buffered_body_bytes != new.limits.max_buffered_body_bytes,
    );
    differs(
        "upstream.connect_timeout",
        old.upstream.connect_timeout != new.upstream.connect_timeout,
    );
    differs(
        "upstream.ca_file",
        old.upstream.ca_file != new.upstream.ca_file,
    );
    differs(
        "quota.backend (or quota.redis_url, quota.timeout, quota.key_prefix, quota.redis_ca_file)",
        old.quota.backend != new.quota.backend,
    );
    let (a, b) = (&old.audit, &new.audit);
    differs("audit.path", a.path != b.path);
    differs("audit.fsync", a.fsync != b.fsync);
    differs("audit.on_error", a.on_error != b.on_error);
    differs("audit.rotate_bytes", a.rotate_bytes != b.rotate_bytes);
    differs("audit.hmac_key", a.hmac_key != b.hmac_key);
    differs("audit.queue_capacity", a.queue_capacity != b.queue_capacity);
    differs("audit.batch_interval", a.batch_interval != b.batch_interval);
    differs("audit.reserve_bytes", a.reserve_bytes != b.reserve_bytes);
    out
}

impl Gateway {
    /// Reads the configuration file the running one came from again and, when it is valid and
    /// changes nothing that needs a restart, puts it in force. Returns the new generation.
    /// Counted in `gateway_config_reloads_total{result}` and logged either way.
    pub async fn reload(&self) -> Result<u64, ReloadError> {
        let _one_at_a_time = self.reload_lock().lock().await;
        let result = self.reload_locked().await;
        let metrics = &self.runtime.metrics;
        match &result {
            Ok(generation) => {
                metrics.config_reload("success");
                tracing::info!(generation, "configuration reloaded");
            }
            Err(e) => {
                metrics.config_reload(e.result());
                tracing::error!(
                    result = e.result(),
                    "configuration reload refused; the running configuration stays"
                );
                for p in e.problems() {
                    tracing::error!("  {p}");
                }
            }
        }
        result
    }

    async fn reload_locked(&self) -> Result<u64, ReloadError> {
        let current = self.policy();
        let source = current.config.source.clone();
        // Problems are rendered the way `check` prints them (file and key), then carried as text.
        let loaded = tokio::task::spawn_blocking(move || config::load(&source))
            .await
            .map_err(|_| {
                ReloadError::Invalid(vec!["the configuration could not be read".into()])
            })?;
        let new = loaded.map_err(|problems| {
            ReloadError::Invalid(problems.iter().map(|p| p.to_string()).collect())
        })?;
        let restart = restart_only_changes(&current.config, &new);
        if !restart.is_empty() {
            return Err(ReloadError::RestartRequired(restart));
        }
        // Certificate files are read before anything changes: a bad pair refuses the reload.
        let acceptor = match &new.listen.tls {
            Some(t) => Some(
                crate::server::tls_acceptor(t)
                    .map_err(|why| ReloadError::Invalid(vec![format!("listen.tls: {why}")]))?,
            ),
            None => None,
        };
        for w in &new.warnings {
            tracing::warn!("{w}");
        }
        let new = Arc::new(new);
        let verifier = current
            .verifier
            .reconfigured(new.issuers.clone(), new.limits.verified_token_cache_bytes);
        let credentials = current.credentials.reconfigured(&new.credentials);
        let quotas = current.quotas.reconfigured(&new.quota);
        // New and changed issuers and credentials get their keys and tokens before the policy
        // that needs them is in force (bounded; one that fails shows in /readyz as at start).
        tokio::join!(verifier.start(), credentials.start());
        let generation = self.next_generation();
        let policy = Policy::build(new, generation, verifier, credentials, quotas)
            .map_err(ReloadError::Invalid)?;
        if let (Some(slot), Some(acceptor)) = (&self.runtime.tls, acceptor) {
            slot.store(Arc::new(acceptor));
        }
        self.install(policy);
        Ok(generation)
    }
}
