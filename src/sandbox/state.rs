//! Everything the sandbox remembers: seeded directory data, stored candidates, issued tokens,
//! rate-limit windows and the request log. Every lock is held for a few statements only.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;

use super::faults::Faults;
use super::idp::KeyRing;
use super::respond::unix_now;
use super::{RecordedRequest, SandboxOptions, lock};

/// How many created candidates the sandbox keeps (the oldest are forgotten first).
pub const MAX_STORED_CANDIDATES: usize = 100_000;
/// How many requests of each kind the log keeps (oldest dropped first).
const LOG_CAPACITY: usize = 10_000;

/// A seeded Greenhouse user.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct User {
    pub id: u64,
    pub name: &'static str,
    pub email: &'static str,
    pub enabled: bool,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct Department {
    pub id: u64,
    pub name: &'static str,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct Location {
    pub name: &'static str,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct Office {
    pub id: u64,
    pub name: &'static str,
    pub location: Location,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct Job {
    pub id: u64,
    pub name: &'static str,
    pub requisition_id: Option<&'static str>,
    pub departments: Vec<Department>,
    pub offices: Vec<Office>,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct Stage {
    pub id: u64,
    pub name: &'static str,
    pub priority: u32,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct Pool {
    pub id: u64,
    pub name: &'static str,
    pub stages: Vec<Stage>,
}

/// An access token the token endpoint issued.
struct IssuedToken {
    client_id: String,
    expires_at: Instant,
}

/// One credential's fixed rate-limit window.
struct Window {
    started: Instant,
    count: u32,
}

/// The outcome of counting one request against its credential's window.
#[derive(Clone, Copy, Debug)]
pub(crate) enum RateDecision {
    /// Rate limiting is switched off (`rate_limit == 0`).
    Unlimited,
    Allowed {
        limit: u32,
        remaining: u32,
        reset_epoch: u64,
    },
    Limited {
        limit: u32,
        retry_after: u64,
        reset_epoch: u64,
    },
}

#[derive(Default)]
struct Log {
    partner: VecDeque<RecordedRequest>,
    token: VecDeque<RecordedRequest>,
}

struct Store {
    /// The newest [`MAX_STORED_CANDIDATES`]; older ones are forgotten (bounded memory under load).
    candidates: std::collections::VecDeque<Value>,
    next_candidate_id: u64,
}

/// The state behind one sandbox, shared by the server task and the [`super::Sandbox`] handle.
pub(crate) struct Shared {
    pub clients: Vec<(String, String)>,
    pub partner_keys: Vec<String>,
    pub token_expires_in: u64,
    pub rate_limit: u32,
    pub rate_window: Duration,
    pub compress: bool,
    pub create_status: http::StatusCode,
    pub issuer: String,
    pub public_origin: String,
    pub faults: Faults,
    pub keys: KeyRing,
    pub users: Vec<User>,
    pub jobs: Vec<Job>,
    pub pools: Vec<Pool>,
    pub jwks_hits: AtomicUsize,
    tokens: Mutex<HashMap<String, IssuedToken>>,
    windows: Mutex<HashMap<String, Window>>,
    store: Mutex<Store>,
    log: Mutex<Log>,
}

impl Shared {
    pub(crate) fn new(opts: SandboxOptions, addr: SocketAddr) -> std::io::Result<Self> {
        let public_origin = format!("http://{}", super::reachable(addr));
        Ok(Shared {
            issuer: opts.issuer.unwrap_or_else(|| public_origin.clone()),
            public_origin,
            clients: opts.clients,
            partner_keys: opts.partner_keys,
            token_expires_in: opts.token_expires_in,
            rate_limit: opts.rate_limit,
            rate_window: opts.rate_window,
            compress: opts.compress,
            create_status: opts.create_status,
            faults: Faults::default(),
            keys: KeyRing::new()?,
            users: seed_users(),
            jobs: seed_jobs(),
            pools: seed_pools(),
            jwks_hits: AtomicUsize::new(0),
            tokens: Mutex::new(HashMap::new()),
            windows: Mutex::new(HashMap::new()),
            store: Mutex::new(Store {
                candidates: std::collections::VecDeque::new(),
                next_candidate_id: 50_000_001,
            }),
            log: Mutex::new(Log::default()),
        })
    }

    // ----- OAuth clients and tokens -----

    /// True when `client_id`/`client_secret` is a configured client.
    pub(crate) fn client_is_valid(&self, client_id: &str, client_secret: &str) -> bool {
        self.clients
            .iter()
            .any(|(id, secret)| id == client_id && constant_time_eq(secret, client_secret))
    }

    /// Stores a new access token for `client_id`; drops expired ones while at it.
    pub(crate) fn store_token(&self, token: String, client_id: &str) {
        let now = Instant::now();
        let expires_at = now + Duration::from_secs(self.token_expires_in);
        let mut tokens = lock(&self.tokens);
        tokens.retain(|_, t| t.expires_at > now);
        tokens.insert(
            token,
            IssuedToken {
                client_id: client_id.to_owned(),
                expires_at,
            },
        );
    }

    /// The client a live (issued, unexpired, unrevoked) token belongs to.
    pub(crate) fn token_client(&self, token: &str) -> Option<String> {
        let tokens = lock(&self.tokens);
        let issued = tokens.get(token)?;
        (issued.expires_at > Instant::now()).then(|| issued.client_id.clone())
    }

    pub(crate) fn revoke_all_tokens(&self) {
        lock(&self.tokens).clear();
    }

    // ----- rate limiting -----

    /// Counts one request against `credential`'s fixed window.
    pub(crate) fn count_request(&self, credential: &str) -> RateDecision {
        if self.rate_limit == 0 {
            return RateDecision::Unlimited;
        }
        let now = Instant::now();
        let limit = self.rate_limit;
        let mut windows = lock(&self.windows);
        let window = windows.entry(credential.to_owned()).or_insert(Window {
            started: now,
            count: 0,
        });
        if now.duration_since(window.started) >= self.rate_window {
            *window = Window {
                started: now,
                count: 0,
            };
        }
        let left = self
            .rate_window
            .saturating_sub(now.duration_since(window.started));
        // Whole seconds until the window resets, rounded up, at least 1.
        let left_secs = (left.as_secs() + u64::from(left.subsec_nanos() > 0)).max(1);
        let reset_epoch = unix_now() + left_secs;
        if window.count >= limit {
            return RateDecision::Limited {
                limit,
                retry_after: left_secs,
                reset_epoch,
            };
        }
        window.count += 1;
        RateDecision::Allowed {
            limit,
            remaining: limit - window.count,
            reset_epoch,
        }
    }

    // ----- directory lookups -----

    pub(crate) fn user_by_email(&self, email: &str) -> Option<&User> {
        self.users
            .iter()
            .find(|u| u.email.eq_ignore_ascii_case(email))
    }

    pub(crate) fn job(&self, id: u64) -> Option<&Job> {
        self.jobs.iter().find(|j| j.id == id)
    }

    pub(crate) fn pool(&self, id: u64) -> Option<&Pool> {
        self.pools.iter().find(|p| p.id == id)
    }

    // ----- candidates -----

    /// Stores candidates (already validated objects), assigning ids; returns the stored copies.
    pub(crate) fn create_candidates(
        &self,
        bodies: Vec<serde_json::Map<String, Value>>,
    ) -> Vec<Value> {
        let mut store = lock(&self.store);
        let mut created = Vec::with_capacity(bodies.len());
        for mut body in bodies {
            let id = store.next_candidate_id;
            store.next_candidate_id += 1;
            body.insert("id".to_owned(), Value::from(id));
            let stored = Value::Object(body);
            if store.candidates.len() >= MAX_STORED_CANDIDATES {
                store.candidates.pop_front();
            }
            store.candidates.push_back(stored.clone());
            created.push(stored);
        }
        created
    }

    /// Stored candidates whose id is in `ids` or whose `external_id` is in `external_ids`.
    pub(crate) fn find_candidates(&self, ids: &[u64], external_ids: &[String]) -> Vec<Value> {
        lock(&self.store)
            .candidates
            .iter()
            .filter(|c| {
                let by_id = c
                    .get("id")
                    .and_then(Value::as_u64)
                    .is_some_and(|id| ids.contains(&id));
                let by_external = c
                    .get("external_id")
                    .and_then(Value::as_str)
                    .is_some_and(|e| external_ids.iter().any(|x| x == e));
                by_id || by_external
            })
            .cloned()
            .collect()
    }

    pub(crate) fn all_candidates(&self) -> Vec<Value> {
        lock(&self.store).candidates.iter().cloned().collect()
    }

    // ----- request log -----

    pub(crate) fn record_partner(&self, request: RecordedRequest) {
        push_capped(&mut lock(&self.log).partner, request);
    }

    pub(crate) fn record_token(&self, request: RecordedRequest) {
        push_capped(&mut lock(&self.log).token, request);
    }

    pub(crate) fn partner_requests(&self) -> Vec<RecordedRequest> {
        lock(&self.log).partner.iter().cloned().collect()
    }

    pub(crate) fn token_requests(&self) -> Vec<RecordedRequest> {
        lock(&self.log).token.iter().cloned().collect()
    }

    pub(crate) fn clear_log(&self) {
        let mut log = lock(&self.log);
        log.partner.clear();
        log.token.clear();
        self.jwks_hits.store(0, Ordering::Relaxed);
    }
}

fn push_capped(queue: &mut VecDeque<RecordedRequest>, request: RecordedRequest) {
    if queue.len() >= LOG_CAPACITY {
        queue.pop_front();
    }
    queue.push_back(request);
}

/// Compares secrets without an early exit on the first differing byte.
fn constant_time_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A recorded copy of a request, as [`super::Sandbox::received`] hands it out.
pub(crate) fn recorded(parts: &http::request::Parts, body: &Bytes) -> RecordedRequest {
    RecordedRequest {
        method: parts.method.as_str().to_owned(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts
            .headers
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.clone(),
    }
}

fn seed_users() -> Vec<User> {
    vec![
        User {
            id: 4_080_001,
            name: "Riley Recruiter",
            email: "riley.recruiter@example.com",
            enabled: true,
        },
        User {
            id: 4_080_002,
            name: "Sam Sourcer",
            email: "sam.sourcer@example.com",
            enabled: true,
        },
        User {
            id: 4_080_003,
            name: "Harper Hiring-Manager",
            email: "harper.hiring@example.com",
            enabled: true,
        },
        // The integration users the shipped example teams act as.
        User {
            id: 4_080_005,
            name: "Sourcing Bot",
            email: "sourcing.bot@example.com",
            enabled: true,
        },
        User {
            id: 4_080_006,
            name: "Agency Liaison",
            email: "agency.liaison@example.com",
            enabled: true,
        },
        User {
            id: 4_080_007,
            name: "Recruiter One",
            email: "recruiter.one@example.com",
            enabled: true,
        },
        User {
            id: 4_080_008,
            name: "Recruiter Two",
            email: "recruiter.two@example.com",
            enabled: true,
        },
        User {
            id: 4_080_004,
            name: "Dana Departed",
            email: "dana.departed@example.com",
            enabled: false,
        },
    ]
}

fn seed_jobs() -> Vec<Job> {
    let engineering = Department {
        id: 5001,
        name: "Engineering",
    };
    let sales = Department {
        id: 5002,
        name: "Sales",
    };
    let design = Department {
        id: 5003,
        name: "Design",
    };
    let berlin = Office {
        id: 6001,
        name: "Berlin",
        location: Location {
            name: "Berlin, Germany",
        },
    };
    let new_york = Office {
        id: 6002,
        name: "New York",
        location: Location {
            name: "New York, NY",
        },
    };
    let remote = Office {
        id: 6003,
        name: "Remote",
        location: Location {
            name: "Remote (EMEA)",
        },
    };
    vec![
        Job {
            id: 7001,
            name: "Senior Backend Engineer",
            requisition_id: Some("ENG-101"),
            departments: vec![engineering.clone()],
            offices: vec![berlin.clone(), remote.clone()],
        },
        Job {
            id: 7002,
            name: "Site Reliability Engineer",
            requisition_id: Some("ENG-102"),
            departments: vec![engineering],
            offices: vec![new_york.clone()],
        },
        Job {
            id: 7003,
            name: "Account Executive",
            requisition_id: None,
            departments: vec![sales],
            offices: vec![new_york],
        },
        Job {
            id: 7004,
            name: "Product Designer",
            requisition_id: Some("DES-7"),
            departments: vec![design],
            offices: vec![berlin, remote],
        },
    ]
}

fn seed_pools() -> Vec<Pool> {
    vec![
        Pool {
            id: 8001,
            name: "Engineering Talent",
            stages: vec![
                Stage {
                    id: 8101,
                    name: "Identified",
                    priority: 0,
                },
                Stage {
                    id: 8102,
                    name: "Contacted",
                    priority: 1,
                },
                Stage {
                    id: 8103,
                    name: "Interested",
                    priority: 2,
                },
            ],
        },
        Pool {
            id: 8002,
            name: "Future Sales Leaders",
            stages: vec![
                Stage {
                    id: 8201,
                    name: "Sourced",
                    priority: 0,
                },
                Stage {
                    id: 8202,
                    name: "Engaged",
                    priority: 1,
                },
            ],
        },
    ]
}
