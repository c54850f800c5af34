//! `POST /oauth/token`: the client-credentials grant of RFC 6749 §4.4, with
//! `client_secret_basic` and `client_secret_post` client authentication.

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use serde_json::json;

use super::respond::{BASIC_CHALLENGE, Body, json, rfc3339_in};
use super::state::Shared;

/// Scopes the token endpoint grants; `partner` is the default.
const KNOWN_SCOPES: &[&str] = &[
    "partner",
    "candidates.create",
    "candidates.view",
    "jobs.view",
    "prospect_pools.view",
];

/// Answers a token request; `None` means the connection is to be dropped (injected fault).
pub(crate) fn token_endpoint(
    shared: &Shared,
    parts: &Parts,
    body: &Bytes,
) -> Option<Response<Body>> {
    if let Some(status) = shared.faults.take_token_failure() {
        return (status != 0).then(|| injected_failure(status));
    }
    if parts.method != Method::POST {
        let mut resp = oauth_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            "the token endpoint accepts POST only",
        );
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return Some(resp);
    }
    Some(issue(shared, parts, body).unwrap_or_else(Refusal::into_response))
}

/// Why a token request is refused: an RFC 6749 §5.2 error code and description.
struct Refusal {
    status: StatusCode,
    error: &'static str,
    description: String,
}

impl Refusal {
    fn into_response(self) -> Response<Body> {
        oauth_error(self.status, self.error, &self.description)
    }
}

fn issue(shared: &Shared, parts: &Parts, body: &Bytes) -> Result<Response<Body>, Refusal> {
    if let Some(content_type) = parts.headers.get(header::CONTENT_TYPE) {
        let essence = content_type
            .to_str()
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim();
        if !essence.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
            return Err(invalid_request(
                "the body must be application/x-www-form-urlencoded",
            ));
        }
    }
    let mut form: HashMap<String, String> = HashMap::new();
    for (name, value) in form_urlencoded::parse(body) {
        let name = name.into_owned();
        if form.contains_key(&name) {
            return Err(invalid_request(&format!("parameter {name} is repeated")));
        }
        form.insert(name, value.into_owned());
    }

    // Client authentication: exactly one of HTTP Basic or the form fields (RFC 6749 §2.3).
    let form_id = form.get("client_id");
    let (client_id, secret) = match (basic_client(&parts.headers)?, form.get("client_secret")) {
        (Some(_), Some(_)) => {
            return Err(invalid_request(
                "use one client authentication method, not both",
            ));
        }
        (Some((id, secret)), None) => {
            if form_id.is_some_and(|f| *f != id) {
                return Err(invalid_request(
                    "client_id does not match the Authorization header",
                ));
            }
            (id, secret)
        }
        (None, Some(secret)) => match form_id {
            Some(id) => (id.clone(), secret.clone()),
            None => return Err(invalid_request("client_secret given without client_id")),
        },
        (None, None) => return Err(invalid_client("client authentication is required")),
    };
    if !shared.client_is_valid(&client_id, &secret) {
        return Err(invalid_client("unknown client or wrong client secret"));
    }

    match form.get("grant_type").map(String::as_str) {
        None | Some("") => return Err(invalid_request("grant_type is required")),
        Some("client_credentials") => {}
        Some(_) => {
            return Err(Refusal {
                status: StatusCode::BAD_REQUEST,
                error: "unsupported_grant_type",
                description: "only client_credentials is supported".to_owned(),
            });
        }
    }

    let requested: Vec<&str> = form
        .get("scope")
        .map(|s| s.split_whitespace().collect())
        .unwrap_or_default();
    if let Some(unknown) = requested.iter().find(|s| !KNOWN_SCOPES.contains(s)) {
        return Err(Refusal {
            status: StatusCode::BAD_REQUEST,
            error: "invalid_scope",
            description: format!("unknown scope {unknown}"),
        });
    }
    let scope = if requested.is_empty() {
        "partner".to_owned()
    } else {
        requested.join(" ")
    };

    let token = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
    shared.store_token(token.clone(), &client_id);
    tracing::debug!(client_id = %client_id, "sandbox issued an access token");
    let mut resp = json(
        StatusCode::OK,
        &json!({
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": shared.token_expires_in,
            "expires_at": rfc3339_in(shared.token_expires_in),
            "scope": scope,
        }),
    );
    no_store(&mut resp);
    Ok(resp)
}

/// The client id and secret from an `Authorization: Basic` header, if one is present.
fn basic_client(headers: &HeaderMap) -> Result<Option<(String, String)>, Refusal> {
    let mut all = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = all.next() else {
        return Ok(None);
    };
    if all.next().is_some() {
        return Err(invalid_request("more than one Authorization header"));
    }
    let malformed = || invalid_client("malformed Basic credentials");
    let value = value.to_str().map_err(|_| malformed())?;
    let (scheme, encoded) = value.split_once(' ').ok_or_else(malformed)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(invalid_client(
            "the token endpoint accepts Basic client credentials only",
        ));
    }
    let decoded = STANDARD.decode(encoded.trim()).map_err(|_| malformed())?;
    let text = String::from_utf8(decoded).map_err(|_| malformed())?;
    let (id, secret) = text.split_once(':').ok_or_else(malformed)?;
    // RFC 6749 §2.3.1: both parts are form-urlencoded before base64.
    Ok(Some((form_decode(id), form_decode(secret))))
}

fn form_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

fn injected_failure(status: u16) -> Response<Body> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let error = match status.as_u16() {
        400 => "invalid_request",
        401 => "invalid_client",
        503 => "temporarily_unavailable",
        _ => "server_error",
    };
    oauth_error(status, error, "injected fault")
}

fn invalid_request(description: &str) -> Refusal {
    Refusal {
        status: StatusCode::BAD_REQUEST,
        error: "invalid_request",
        description: description.to_owned(),
    }
}

fn invalid_client(description: &str) -> Refusal {
    Refusal {
        status: StatusCode::UNAUTHORIZED,
        error: "invalid_client",
        description: description.to_owned(),
    }
}

/// An RFC 6749 §5.2 error response.
fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response<Body> {
    let mut resp = json(
        status,
        &json!({ "error": error, "error_description": description }),
    );
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(BASIC_CHALLENGE),
        );
    }
    no_store(&mut resp);
    resp
}

fn no_store(resp: &mut Response<Body>) {
    let headers = resp.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}
