//! The gateway as a value: what lives for the process ([`Runtime`]) apart from what a reload may
//! change ([`Policy`]), swapped atomically ([`Gateway::reload`]).
//!
//! A request loads the policy once, when it starts, and carries that `Arc<Policy>` to its end
//! (into the closure that runs when its response body finishes, too), so it is judged and
//! recorded under exactly one policy however many reloads happen meanwhile.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use arc_swap::ArcSwap;
use http::HeaderValue;
use serde_json::{Map, Value};

use crate::audit::AuditLog;
use crate::auth::jwt::Verifier;
use crate::auth::upstream::{Credential, UpstreamCredentials};
use crate::config::Config;
use crate::error::GatewayError;
use crate::http_client::HttpClient;
use crate::metrics::{Metrics, OpSeries, TeamOpSeries, TeamSeries};
use crate::policy::Team;
use crate::quota::{Quotas, TeamQuota};
use crate::spec::{Operation, RouteMatch};
use crate::validate::OpValidators;

/// What lives as long as the process: a reload never replaces these.
pub struct Runtime {
    pub client: HttpClient,
    pub metrics: Metrics,
    pub audit: AuditLog,
    /// `listen.max_requests_in_flight`: a permit per request, held until its response body ends.
    pub(crate) in_flight: Arc<tokio::sync::Semaphore>,
    /// `limits.max_buffered_body_bytes`.
    pub(crate) body_budget: crate::pipeline::BodyBudget,
    /// The gateway listener's TLS acceptor, replaced on reload (new connections see new
    /// certificate files; connections already open keep theirs).
    pub tls: Option<Arc<ArcSwap<tokio_rustls::TlsAcceptor>>>,
}

/// What a reload may change, resolved once at load: every lookup a request needs is an index or
/// a handle here, never a search by name.
pub struct Policy {
    /// 1 for the configuration the process started with, one more per successful reload.
    pub generation: u64,
    pub config: Arc<Config>,
    /// One per operation of the spec, in the spec's order ([`Route::index`]).
    pub routes: Vec<Arc<Route>>,
    /// In the order membership is tried (by name).
    pub teams: Vec<TeamPolicy>,
    pub verifier: Verifier,
    pub credentials: UpstreamCredentials,
    pub quotas: Quotas,
    /// `Host` for upstream requests.
    pub upstream_host: HeaderValue,
}

/// One operation of the spec with everything a request to it needs.
pub struct Route {
    /// Position in the spec (and in [`Policy::routes`]).
    pub index: usize,
    pub op: Operation,
    pub validators: Arc<OpValidators>,
    /// Whether its success answers are candidates (ids are taken from them for the audit).
    pub returns_candidates: bool,
    /// Its upstream metric series, found once.
    pub series: OpSeries,
}

/// A team with its credential and quota resolved.
pub struct TeamPolicy {
    pub team: Team,
    pub credential: Credential,
    pub quota: TeamQuota,
    /// By route index: whether the team may call it.
    allowed: Vec<bool>,
    /// By route index: the team's metric series for it, found once.
    series: Vec<Arc<TeamOpSeries>>,
    /// The team's in-flight gauge, found once.
    pub team_series: TeamSeries,
}

impl TeamPolicy {
    pub fn may_call(&self, route: &Route) -> bool {
        self.allowed.get(route.index).copied().unwrap_or(false)
    }

    /// The team's metric series for `route`.
    pub fn series(&self, route: &Route) -> Option<Arc<TeamOpSeries>> {
        self.series.get(route.index).cloned()
    }
}

impl Policy {
    /// Resolves a validated configuration against the handles that carry state across reloads.
    /// Configuration validation guarantees every name resolves; a miss here is a bug and fails
    /// the load (never a request).
    pub fn build(
        config: Arc<Config>,
        generation: u64,
        verifier: Verifier,
        credentials: UpstreamCredentials,
        quotas: Quotas,
    ) -> Result<Policy, Vec<String>> {
        let mut problems = Vec::new();
        let mut validators = config.validators.per_operation();
        let routes: Vec<Arc<Route>> = config
            .spec
            .operations()
            .iter()
            .enumerate()
            .map(|(index, op)| {
                let v = validators.remove(&op.id).unwrap_or_else(|| {
                    problems.push(format!("operation {} has no compiled validators", op.id));
                    Arc::default()
                });
                Arc::new(Route {
                    index,
                    returns_candidates: returns_candidates(op),
                    op: op.clone(),
                    validators: v,
                    series: OpSeries::new(&op.id),
                })
            })
            .collect();
        let op_ids: Vec<&str> = routes.iter().map(|r| r.op.id.as_str()).collect();
        let mut teams = Vec::new();
        for team in config.teams.iter() {
            let Some(credential) = credentials.get(&team.credential) else {
                problems.push(format!(
                    "team {}: credential {} is not configured",
                    team.name, team.credential
                ));
                continue;
            };
            let allowed = allowed_by_route(&team.operations, &op_ids);
            teams.push(TeamPolicy {
                quota: quotas.resolve(&team.name, &op_ids),
                team: team.clone(),
                credential,
                allowed,
                series: op_ids
                    .iter()
                    .map(|op| Arc::new(TeamOpSeries::new(&team.name, op)))
                    .collect(),
                team_series: TeamSeries::new(&team.name),
            });
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let host = config
            .upstream
            .base_url
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_default();
        let upstream_host =
            HeaderValue::from_str(&host).unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        Ok(Policy {
            generation,
            config,
            routes,
            teams,
            verifier,
            credentials,
            quotas,
            upstream_host,
        })
    }

    /// The policy of a configuration, resolved without starting anything (for `check --explain`
    /// and benches): no key or token is fetched (a real token's issuer keys are fetched when it
    /// is verified), no quota backend is contacted.
    pub fn offline(config: Config) -> Result<Policy, String> {
        let config = Arc::new(config);
        let client = crate::http_client::build_client(
            config.upstream.ca_file.as_deref(),
            config.upstream.connect_timeout,
        )
        .map_err(|e| e.to_string())?;
        let verifier = Verifier::with_cache_bytes(
            config.issuers.clone(),
            client.clone(),
            config.limits.verified_token_cache_bytes,
        );
        let credentials = UpstreamCredentials::new(&config.credentials, client, Metrics::new());
        let quotas = Quotas::with_clock(config.quota.clone(), Arc::new(crate::quota::SystemClock));
        Policy::build(config, 1, verifier, credentials, quotas).map_err(|p| p.join("; "))
    }

    /// The route for a request's method and path (the public prefix included).
    pub fn route(&self, method: &http::Method, path: &str) -> Result<&Arc<Route>, GatewayError> {
        let not_found = || GatewayError::RouteNotFound {
            prefix: self.config.upstream.prefix.clone(),
        };
        let rest = path
            .strip_prefix(self.config.upstream.prefix.as_str())
            .filter(|r| r.starts_with('/'))
            .ok_or_else(not_found)?;
        match self.config.spec.route(method, rest) {
            RouteMatch::Found { index, .. } => self.routes.get(index).ok_or_else(not_found),
            RouteMatch::MethodNotAllowed(allow) => Err(GatewayError::MethodNotAllowed { allow }),
            RouteMatch::NotFound => Err(not_found()),
        }
    }

    /// The first team, by name, whose membership the verified claims satisfy.
    pub fn team_for(&self, claims: &Map<String, Value>) -> Option<&TeamPolicy> {
        self.teams.iter().find(|t| t.team.is_member(claims))
    }
}

fn allowed_by_route(operations: &BTreeSet<String>, op_ids: &[&str]) -> Vec<bool> {
    op_ids.iter().map(|id| operations.contains(*id)).collect()
}

/// Whether a documented success response is a candidate (or a list of them): its objects
/// declare an `external_id`, which in the Partner API only candidates have. Read from the spec,
/// so no path is named here.
fn returns_candidates(op: &Operation) -> bool {
    op.responses
        .iter()
        .filter(|(status, _)| status.starts_with('2'))
        .filter_map(|(_, schema)| schema.as_ref())
        .any(|schema| {
            let object = schema.get("items").unwrap_or(schema);
            object.pointer("/properties/external_id").is_some()
        })
}

/// The running gateway: its runtime and the policy in force.
pub struct Gateway {
    pub runtime: Runtime,
    policy: ArcSwap<Policy>,
    /// One reload at a time (a second waits for the first, then reads the files again).
    reloading: tokio::sync::Mutex<()>,
    generations: AtomicU64,
    /// Set on SIGTERM for the drain window: `/readyz` answers 503 while requests are still
    /// served, so load balancers stop sending before the listeners close.
    draining: AtomicBool,
}

impl Gateway {
    pub fn new(runtime: Runtime, policy: Policy) -> Gateway {
        Gateway {
            generations: AtomicU64::new(policy.generation),
            runtime,
            policy: ArcSwap::from_pointee(policy),
            reloading: tokio::sync::Mutex::new(()),
            draining: AtomicBool::new(false),
        }
    }

    /// The policy in force now. A request takes it once and keeps it to its end.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    pub(crate) fn reload_lock(&self) -> &tokio::sync::Mutex<()> {
        &self.reloading
    }

    pub(crate) fn next_generation(&self) -> u64 {
        self.generations.fetch_add(1, Ordering::SeqCst) + 1
    }

    pub(crate) fn install(&self, policy: Policy) {
        self.policy.store(Arc::new(policy));
    }

    /// From now on `/readyz` answers 503 (`listen.drain` after SIGTERM); nothing else changes.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Reasons the gateway is not ready; empty when it is.
    pub fn not_ready(&self) -> Vec<String> {
        let policy = self.policy();
        let mut out = Vec::new();
        if self.is_draining() {
            out.push(
                "shutting down: draining (requests are still served until the listeners close)"
                    .to_string(),
            );
        }
        out.extend(policy.verifier.not_ready());
        out.extend(policy.credentials.not_ready());
        out.extend(policy.quotas.not_ready());
        if !self.runtime.audit.healthy() {
            out.push("audit: the audit trail cannot be written".to_string());
        }
        out
    }
}
