//! `check --explain`: the decision the gateway would make for a request, step by step, without
//! sending anything anywhere or spending any quota. Each step calls the code the decision path
//! calls (target checks, the verifier, routing, membership, `On-Behalf-Of`, the validators), so an
//! explanation and the gateway cannot disagree; only quota usage is not consulted (it is live
//! state), so the quota step lists what would be charged, and under which limits.

use super::*;

/// Who is calling, for an explanation.
#[derive(Debug, Clone)]
pub enum Identity {
    /// Claims taken as given: no signature is checked (to try a policy before any token exists).
    Claims(serde_json::Map<String, Value>),
    /// A real token: verified against the configured issuers' keys (fetched when needed).
    Token(String),
}

/// A request to explain.
#[derive(Debug, Clone)]
pub struct Explain {
    pub method: http::Method,
    /// Path and query, as a caller would send them (`/v1/partner/candidates?...`).
    pub target: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub identity: Identity,
}

/// What the gateway would do.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Explanation {
    /// `(step, finding)` in the order the gateway decides.
    pub steps: Vec<(String, String)>,
    /// The status the gateway would answer with itself, or 200 when it would forward (then
    /// Greenhouse's answer is the status).
    pub status: u16,
    /// The problem code, or `forwarded`.
    pub code: String,
    /// The problem's detail, when refused.
    pub detail: Option<String>,
}

impl Explanation {
    fn step(&mut self, name: &str, finding: impl Into<String>) {
        self.steps.push((name.to_string(), finding.into()));
    }

    fn refused(mut self, e: GatewayError) -> Explanation {
        self.status = e.status().as_u16();
        self.code = e.code().to_string();
        let detail = e.detail().unwrap_or_else(|| e.title().to_string());
        self.step("result", format!("{} {}: {detail}", self.status, self.code));
        self.detail = Some(detail);
        self
    }

    /// The explanation as text, one step a line.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (step, finding) in &self.steps {
            out.push_str(&format!("{step:<14} {finding}\n"));
        }
        out
    }
}

/// Explains a request under `policy`. Fetches an issuer's keys only when a real token needs
/// them; sends nothing else and spends no quota.
pub async fn explain(policy: &Policy, req: Explain) -> Explanation {
    let mut ex = Explanation {
        steps: Vec::new(),
        status: 200,
        code: crate::error::FORWARDED.into(),
        detail: None,
    };
    match decide(policy, req, &mut ex).await {
        Ok(()) => {
            ex.step(
                "result",
                "200 forwarded: the request would be sent to Greenhouse, whose answer the caller gets",
            );
            ex
        }
        Err(e) => ex.refused(e),
    }
}

async fn decide(policy: &Policy, req: Explain, ex: &mut Explanation) -> Result<(), GatewayError> {
    let cfg = &policy.config;
    let mut http_req = Request::builder()
        .method(req.method.clone())
        .uri(req.target.as_str())
        .body(())
        .map_err(|_| GatewayError::BadRequest("the request target is not a valid URI"))?;
    *http_req.headers_mut() = req.headers.clone();
    if !http_req.headers().contains_key(header::HOST) {
        http_req
            .headers_mut()
            .insert(header::HOST, HeaderValue::from_static("gateway"));
    }
    let (method, uri) = (http_req.method().clone(), http_req.uri().clone());
    ex.step("request", format!("{method} {}", uri.path()));

    // 1. Framing and target sanity, body size.
    check_target(&http_req)?;
    if req.body.len() as u64 > cfg.limits.max_body_bytes {
        let route = policy.route(&method, uri.path()).ok();
        return Err(too_large(policy, route.map(|r| &**r)));
    }

    // 2. Who is calling.
    let claims = match req.identity {
        Identity::Claims(claims) => {
            ex.step("token", "claims given as JSON: no signature checked");
            claims
        }
        Identity::Token(token) => {
            policy.verifier.start().await;
            let verified = policy
                .verifier
                .verify_detailed(token.trim())
                .await
                .map_err(|r| auth_error(r.error))?;
            ex.step(
                "token",
                format!("signature and claims verified (issuer {})", verified.issuer),
            );
            verified.claims.clone()
        }
    };

    // 3. Which operation.
    let route = policy.route(&method, uri.path())?;
    ex.step(
        "operation",
        format!("{} ({} {})", route.op.id, route.op.method, route.op.path),
    );

    // 4. Which team, may it call this, on whose behalf.
    let Some(team) = policy.team_for(&claims) else {
        let missing = cfg.teams.missing_required_claim(&claims);
        return Err(GatewayError::UnknownTeam {
            missing_claim: missing.map(str::to_owned),
        });
    };
    let table = team
        .team
        .members
        .iter()
        .position(|m| m.matches(&claims))
        .map_or(0, |i| i + 1);
    ex.step(
        "team",
        format!(
            "{} (the team file's [[members]] table {table} matched)",
            team.team.name
        ),
    );
    if !team.may_call(route) {
        return Err(GatewayError::OperationNotAllowed {
            operation: route.op.id.clone(),
        });
    }
    ex.step(
        "allowed",
        format!("{} may call {}", team.team.name, route.op.id),
    );
    let obo_headers: Vec<&HeaderValue> = req.headers.get_all("on-behalf-of").iter().collect();
    let (obo, source) =
        crate::policy::decide_on_behalf_of_why(&team.team.on_behalf_of, &obo_headers, &claims)
            .map_err(GatewayError::OnBehalfOfNotAllowed)?;
    ex.step(
        "on-behalf-of",
        format!("{obo} (from {})", source.describe()),
    );

    // 6. Quotas (5, reading the body, has nothing to explain beyond its size).
    let charged = team.quota.describe(route.index);
    if charged.is_empty() {
        ex.step("quota", "no limit applies to this team and operation");
    } else {
        ex.step(
            "quota",
            format!(
                "would be charged (live usage not consulted, nothing spent): {}",
                charged.join("; ")
            ),
        );
    }

    // 7. Query and body against the spec, in the team's validation mode.
    let mode = team.team.validation;
    let found = route.validators.inspect_query(uri.query());
    if !found.undeclared.is_empty() || !found.invalid.is_empty() {
        let pointers: Vec<String> = found
            .undeclared
            .iter()
            .map(|n| format!("/query/{n} undeclared"))
            .chain(
                found
                    .invalid
                    .iter()
                    .map(|p| format!("{} {}", p.pointer, p.keyword)),
            )
            .collect();
        if mode == ValidationMode::Enforce {
            ex.step("query", format!("refused: {}", pointers.join(", ")));
            if !found.undeclared.is_empty() {
                return Err(GatewayError::UndeclaredQuery(found.undeclared));
            }
            return Err(GatewayError::ValidationFailed(found.invalid));
        }
        ex.step(
            "query",
            format!(
                "report mode, recorded and forwarded: {}",
                pointers.join(", ")
            ),
        );
    } else {
        ex.step("query", "valid");
    }
    if req.body.is_empty() && route.op.request_body.is_none() {
        ex.step("body", "none, and none expected");
    } else {
        match route
            .validators
            .check_body(req.headers.get(header::CONTENT_TYPE), &req.body)
        {
            Ok(_) => ex.step("body", "valid"),
            Err(BodyError::UnsupportedMediaType) => return Err(GatewayError::UnsupportedMediaType),
            Err(BodyError::InvalidJson(why)) => return Err(GatewayError::InvalidJson(why)),
            Err(BodyError::PayloadTooLarge) => return Err(too_large(policy, Some(route))),
            Err(BodyError::Invalid(problems)) => {
                let pointers: Vec<String> = problems
                    .iter()
                    .map(|p| format!("{} {}", p.pointer, p.keyword))
                    .collect();
                if mode == ValidationMode::Enforce {
                    ex.step("body", format!("refused: {}", pointers.join(", ")));
                    return Err(GatewayError::ValidationFailed(problems));
                }
                ex.step(
                    "body",
                    format!(
                        "report mode, recorded and forwarded: {}",
                        pointers.join(", ")
                    ),
                );
            }
        }
    }

    // 8. The credential it would be sent with.
    let kind = cfg
        .credentials
        .get(team.credential.name())
        .map_or("", |c| c.kind());
    ex.step("credential", format!("{} ({kind})", team.credential.name()));
    Ok(())
}
