//! The one error type a client can see, and the one place it becomes a response.
//!
//! Every variant maps to a stable `code` (documented in the README) and a status. Bodies are
//! `application/problem+json` (RFC 9457) and never contain a submitted value, a token, a key id or
//! a secret: variants carry only what the gateway itself decided (names from the config or the
//! spec, counts, seconds).

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde::Serialize;

/// Who is at fault, for logs and metrics (after pingora's `ErrorSource`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The caller sent something we refuse.
    Client,
    /// Greenhouse (or the network to it) failed.
    Upstream,
    /// The gateway itself could not do its job.
    Gateway,
}

/// One problem inside a `validation_failed` or `bad_request` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldProblem {
    pub pointer: String,
    pub keyword: String,
    pub message: String,
}

/// The code of a request the gateway forwarded (in its record, log line, metrics and `check
/// --explain`); every other code is a [`GatewayError::code`].
pub const FORWARDED: &str = "forwarded";

/// Every outcome, other than success, that a client can see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayError {
    BadRequest(&'static str),
    /// The body did not arrive within `listen.body_read_timeout`.
    BodyTimeout,
    /// Undeclared query parameters; the names come from the request but are reduced to a safe
    /// alphabet and length before they are ever shown.
    UndeclaredQuery(Vec<String>),
    InvalidJson(&'static str),
    MissingToken,
    InvalidToken(&'static str),
    /// No team's `[[members]]` matched the verified token. `missing_claim`: a claim every table
    /// of every team names and the token lacks (its name only: never a team, a pattern or a value).
    UnknownTeam {
        missing_claim: Option<String>,
    },
    /// The caller's team does not list the operation (its id, from the spec).
    OperationNotAllowed {
        operation: String,
    },
    OnBehalfOfNotAllowed(&'static str),
    /// `prefix`: the public path prefix (the path of `upstream.base_url`).
    RouteNotFound {
        prefix: String,
    },
    MethodNotAllowed {
        allow: Vec<http::Method>,
    },
    PayloadTooLarge {
        limit: u64,
        /// The operation's body carries base64 attachments: the answer says how large a file
        /// fits.
        attachments: bool,
    },
    UnsupportedMediaType,
    ValidationFailed(Vec<FieldProblem>),
    RateLimited {
        retry_after_secs: u64,
    },
    DailyQuotaExhausted {
        retry_after_secs: u64,
    },
    ConcurrencyLimited {
        retry_after_secs: u64,
    },
    QuotaBackendUnavailable,
    AuditUnavailable,
    /// A gateway-wide bound was reached (requests in flight, buffered body bytes, ...); `what`
    /// names the bound, from the gateway's own vocabulary, never from the request.
    Overloaded {
        what: &'static str,
        retry_after_secs: u64,
    },
    UpstreamError,
    UpstreamTimeout,
    UpstreamCredentialsUnavailable,
    UpstreamRejectedCredentials,
    UpstreamRateLimited {
        retry_after_secs: u64,
    },
    JwksUnavailable,
    Internal,
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        use GatewayError::*;
        match self {
            BadRequest(_) | UndeclaredQuery(_) | InvalidJson(_) => StatusCode::BAD_REQUEST,
            BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            MissingToken | InvalidToken(_) => StatusCode::UNAUTHORIZED,
            UnknownTeam { .. } | OperationNotAllowed { .. } | OnBehalfOfNotAllowed(_) => {
                StatusCode::FORBIDDEN
            }
            RouteNotFound { .. } => StatusCode::NOT_FOUND,
            MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ValidationFailed(_) => StatusCode::UNPROCESSABLE_ENTITY,
            RateLimited { .. } | DailyQuotaExhausted { .. } | ConcurrencyLimited { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            QuotaBackendUnavailable | AuditUnavailable | Overloaded { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            UpstreamError | UpstreamRejectedCredentials => StatusCode::BAD_GATEWAY,
            UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            UpstreamCredentialsUnavailable | UpstreamRateLimited { .. } | JwksUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        use GatewayError::*;
        match self {
            BadRequest(_) | UndeclaredQuery(_) | BodyTimeout => "bad_request",
            InvalidJson(_) => "invalid_json",
            MissingToken => "missing_token",
            InvalidToken(_) => "invalid_token",
            UnknownTeam { .. } => "unknown_team",
            OperationNotAllowed { .. } => "operation_not_allowed",
            OnBehalfOfNotAllowed(_) => "on_behalf_of_not_allowed",
            RouteNotFound { .. } => "route_not_found",
            MethodNotAllowed { .. } => "method_not_allowed",
            PayloadTooLarge { .. } => "payload_too_large",
            UnsupportedMediaType => "unsupported_media_type",
            ValidationFailed(_) => "validation_failed",
            RateLimited { .. } => "rate_limited",
            DailyQuotaExhausted { .. } => "daily_quota_exhausted",
            ConcurrencyLimited { .. } => "concurrency_limited",
            QuotaBackendUnavailable => "quota_backend_unavailable",
            AuditUnavailable => "audit_unavailable",
            Overloaded { .. } => "overloaded",
            UpstreamError => "upstream_error",
            UpstreamTimeout => "upstream_timeout",
            UpstreamCredentialsUnavailable => "upstream_credentials_unavailable",
            UpstreamRejectedCredentials => "upstream_rejected_credentials",
            UpstreamRateLimited { .. } => "upstream_rate_limited",
            JwksUnavailable => "jwks_unavailable",
            Internal => "internal_error",
        }
    }

    pub fn fault(&self) -> Fault {
        use GatewayError::*;
        match self {
            UpstreamError
            | UpstreamTimeout
            | UpstreamRejectedCredentials
            | UpstreamRateLimited { .. } => Fault::Upstream,
            UpstreamCredentialsUnavailable
            | JwksUnavailable
            | QuotaBackendUnavailable
            | AuditUnavailable
            | Overloaded { .. }
            | Internal => Fault::Gateway,
            BadRequest(_)
            | BodyTimeout
            | UndeclaredQuery(_)
            | InvalidJson(_)
            | MissingToken
            | InvalidToken(_)
            | UnknownTeam { .. }
            | OperationNotAllowed { .. }
            | OnBehalfOfNotAllowed(_)
            | RouteNotFound { .. }
            | MethodNotAllowed { .. }
            | PayloadTooLarge { .. }
            | UnsupportedMediaType
            | ValidationFailed(_)
            | RateLimited { .. }
            | DailyQuotaExhausted { .. }
            | ConcurrencyLimited { .. } => Fault::Client,
        }
    }

    pub fn title(&self) -> &'static str {
        use GatewayError::*;
        match self {
            BadRequest(_) | UndeclaredQuery(_) => "Bad request",
            BodyTimeout => "The request body did not arrive in time",
            InvalidJson(_) => "Request body is not valid JSON",
            MissingToken => "A bearer token is required",
            InvalidToken(_) => "The bearer token is not valid",
            UnknownTeam { .. } => "The caller belongs to no team",
            OperationNotAllowed { .. } => "The team may not call this operation",
            OnBehalfOfNotAllowed(_) => "The team may not act on behalf of this user",
            RouteNotFound { .. } => "No such route",
            MethodNotAllowed { .. } => "Method not allowed on this route",
            PayloadTooLarge { .. } => "Request body too large",
            UnsupportedMediaType => "Unsupported media type",
            ValidationFailed(_) => "Request does not match the schema",
            RateLimited { .. } => "The team's rate limit is exhausted",
            DailyQuotaExhausted { .. } => "The team's daily quota for this operation is exhausted",
            ConcurrencyLimited { .. } => "The team has too many requests in flight",
            QuotaBackendUnavailable => "The quota backend is unavailable",
            AuditUnavailable => "The audit trail cannot be written",
            Overloaded { .. } => "The gateway is at capacity",
            UpstreamError => "Greenhouse could not be reached",
            UpstreamTimeout => "Greenhouse did not answer in time",
            UpstreamCredentialsUnavailable => "No Greenhouse credential is available",
            UpstreamRejectedCredentials => "Greenhouse rejected the gateway's credential",
            UpstreamRateLimited { .. } => "Greenhouse's shared rate limit is exhausted",
            JwksUnavailable => "The identity provider's keys are unavailable",
            Internal => "Internal error",
        }
    }

    pub fn detail(&self) -> Option<String> {
        use GatewayError::*;
        match self {
            BadRequest(d) | InvalidJson(d) | InvalidToken(d) | OnBehalfOfNotAllowed(d) => {
                Some((*d).to_string())
            }
            UnknownTeam {
                missing_claim: None,
            } => Some(
                "no team's [[members]] matched the token's claims; a platform team adds the caller to a team's policy".into(),
            ),
            UnknownTeam {
                missing_claim: Some(claim),
            } => Some(format!(
                "no team's [[members]] matched the token's claims: the token has no \"{claim}\" claim, which every team's membership requires"
            )),
            OperationNotAllowed { operation } => Some(format!(
                "the caller's team may not call {operation} (it is not in the team's operations)"
            )),
            RouteNotFound { prefix } if prefix.is_empty() => {
                Some("no operation of the API has this path".into())
            }
            RouteNotFound { prefix } => Some(format!(
                "no operation of the API has this path; paths start with {prefix}"
            )),
            UndeclaredQuery(names) => {
                Some(format!("undeclared query parameters: {}", names.join(", ")))
            }
            PayloadTooLarge {
                limit,
                attachments: false,
            } => Some(format!("the limit is {limit} bytes")),
            PayloadTooLarge {
                limit,
                attachments: true,
            } => Some(format!(
                "the limit is {limit} bytes; attachments count in base64 (4/3 of the file), so a file of at most {} bytes fits",
                crate::validate::largest_attachment_fitting(*limit)
            )),
            ValidationFailed(p) => Some(format!(
                "{} problem{}",
                p.len(),
                if p.len() == 1 { "" } else { "s" }
            )),
            MethodNotAllowed { allow } => Some(format!(
                "allowed: {}",
                allow
                    .iter()
                    .map(|m| m.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            RateLimited { retry_after_secs }
            | DailyQuotaExhausted { retry_after_secs }
            | ConcurrencyLimited { retry_after_secs }
            | UpstreamRateLimited { retry_after_secs } => {
                Some(format!("retry after {retry_after_secs} s"))
            }
            Overloaded {
                what,
                retry_after_secs,
            } => Some(format!("{what}; retry after {retry_after_secs} s")),
            UnsupportedMediaType => Some("the body must be application/json in UTF-8".into()),
            UpstreamRejectedCredentials => Some(
                "Greenhouse answered 401 to a freshly obtained credential; it also does so when it does not know the On-Behalf-Of user"
                    .into(),
            ),
            _ => None,
        }
    }

    /// Renders the problem+json response. This is the only place gateway errors become responses.
    pub fn to_response(&self, request_id: &str) -> Response<Bytes> {
        #[derive(Serialize)]
        struct Problem<'a> {
            #[serde(rename = "type")]
            kind: String,
            title: &'a str,
            status: u16,
            code: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            detail: Option<String>,
            request_id: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            errors: Option<&'a [FieldProblem]>,
        }
        let status = self.status();
        let code = self.code();
        let body = Problem {
            kind: format!("urn:greenhouse-gateway:problem:{code}"),
            title: self.title(),
            status: status.as_u16(),
            code,
            detail: self.detail(),
            request_id,
            errors: match self {
                GatewayError::ValidationFailed(p) => Some(p),
                _ => None,
            },
        };
        let bytes = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
        let mut resp = Response::new(Bytes::from(bytes));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        match self {
            GatewayError::MissingToken => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"greenhouse-gateway\""),
                );
            }
            GatewayError::InvalidToken(_) => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(
                        "Bearer realm=\"greenhouse-gateway\", error=\"invalid_token\"",
                    ),
                );
            }
            GatewayError::MethodNotAllowed { allow } => {
                let joined = allow
                    .iter()
                    .map(|m| m.as_str())
                    .collect::<Vec<_>>()
                    .join(", ");
                if let Ok(v) = HeaderValue::from_str(&joined) {
                    h.insert(header::ALLOW, v);
                }
            }
            GatewayError::RateLimited { retry_after_secs }
            | GatewayError::DailyQuotaExhausted { retry_after_secs }
            | GatewayError::ConcurrencyLimited { retry_after_secs }
            | GatewayError::UpstreamRateLimited { retry_after_secs }
            | GatewayError::Overloaded {
                retry_after_secs, ..
            } => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            _ => {}
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_too_large_maps_to_413_with_stable_code() {
        let e = GatewayError::PayloadTooLarge {
            limit: 10,
            attachments: false,
        };
        assert_eq!(e.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(e.code(), "payload_too_large");
    }

    #[test]
    fn overloaded_is_503_with_retry_after_and_names_the_bound() {
        let r = GatewayError::Overloaded {
            what: "too many requests in flight",
            retry_after_secs: 1,
        }
        .to_response("rid");
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let body: serde_json::Value = serde_json::from_slice(r.body()).unwrap_or_default();
        assert_eq!(body["code"], "overloaded");
        assert_eq!(
            body["detail"],
            "too many requests in flight; retry after 1 s"
        );
    }

    #[test]
    fn invalid_token_response_carries_bearer_challenge_with_error() {
        let r = GatewayError::InvalidToken("expired").to_response("rid");
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let v = r.headers()[header::WWW_AUTHENTICATE]
            .to_str()
            .unwrap_or_default();
        assert!(
            v.starts_with("Bearer ") && v.contains("error=\"invalid_token\""),
            "{v}"
        );
    }

    #[test]
    fn problem_body_has_type_code_status_and_request_id() {
        let r = GatewayError::MethodNotAllowed {
            allow: vec![http::Method::GET, http::Method::POST],
        }
        .to_response("abc");
        assert_eq!(r.headers()[header::ALLOW], "GET, POST");
        let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap_or_default();
        assert_eq!(
            v["type"],
            "urn:greenhouse-gateway:problem:method_not_allowed"
        );
        assert_eq!(v["code"], "method_not_allowed");
        assert_eq!(v["status"], 405);
        assert_eq!(v["request_id"], "abc");
    }
}
