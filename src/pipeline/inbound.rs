//! What is read from the request before any policy applies: its target and framing, its
//! bearer token, its id, the caller's address, and its body (within the gateway-wide budget).

use super::*;

/// Request body bytes buffered at once by the whole gateway (`limits.max_buffered_body_bytes`).
/// Counted in KiB (rounded up), so that any budget fits the semaphore's permit count.
pub(crate) struct BodyBudget {
    kib: Arc<tokio::sync::Semaphore>,
}

pub(super) fn kib(bytes: u64) -> u64 {
    bytes.div_ceil(1024)
}

impl BodyBudget {
    pub(crate) fn new(bytes: u64) -> Self {
        let permits = usize::try_from(kib(bytes))
            .unwrap_or(usize::MAX)
            .min(tokio::sync::Semaphore::MAX_PERMITS);
        BodyBudget {
            kib: Arc::new(tokio::sync::Semaphore::new(permits)),
        }
    }

    /// Reserves room for a body before a byte of it is read: its declared length, or, when it
    /// declares none (chunked), the largest body allowed. Never waits: without room, 503.
    pub(super) fn reserve(
        &self,
        declared: Option<u64>,
        max_body_bytes: u64,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, GatewayError> {
        let overloaded = GatewayError::Overloaded {
            what: "too many request body bytes buffered at once",
            retry_after_secs: 1,
        };
        let want = u32::try_from(kib(declared.unwrap_or(max_body_bytes).min(max_body_bytes)))
            .map_err(|_| overloaded.clone())?;
        self.kib
            .clone()
            .try_acquire_many_owned(want)
            .map_err(|_| overloaded)
    }

    /// Gives back what a body read with an undeclared length did not use.
    pub(super) fn shrink(permit: &mut tokio::sync::OwnedSemaphorePermit, read: u64) {
        let keep = usize::try_from(kib(read)).unwrap_or(usize::MAX);
        if let Some(excess) = permit.num_permits().checked_sub(keep).filter(|n| *n > 0) {
            drop(permit.split(excess));
        }
    }
}

/// The caller's address: the socket peer, or, when the peer is a trusted proxy, the nearest
/// untrusted address in `X-Forwarded-For` (read right to left).
pub(super) fn client_addr(policy: &Policy, peer: IpAddr, headers: &http::HeaderMap) -> IpAddr {
    let proxies = &policy.config.listen.trusted_proxies;
    let trusted = |ip: &IpAddr| proxies.iter().any(|n| n.contains(ip));
    if !trusted(&peer) {
        return peer;
    }
    let hops: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map_while(|h| h.trim().parse::<IpAddr>().ok())
        .collect();
    hops.iter()
        .rev()
        .find(|ip| !trusted(ip))
        .or(hops.first())
        .copied()
        .unwrap_or(peer)
}

/// A caller's `X-Request-Id` is kept when it is 1 to 128 characters of `A-Z a-z 0-9 . _ -`.
pub fn request_id(headers: &http::HeaderMap) -> String {
    let mut given = headers.get_all("x-request-id").iter();
    if let (Some(v), None) = (given.next(), given.next())
        && let Ok(s) = v.to_str()
        && (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return s.to_string();
    }
    new_request_id()
}

/// A fresh id: milliseconds since the epoch and 64 random bits, in hex (sortable by time).
pub fn new_request_id() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    // 12 hex digits of milliseconds (48 bits: until the year 10889), then 16 random ones.
    let mut raw = [0u8; 14];
    raw[..6].copy_from_slice(&(ms as u64).to_be_bytes()[2..]);
    raw[6..].copy_from_slice(&rand::random::<u64>().to_be_bytes());
    crate::values::lower_hex(&raw)
}

pub(super) fn check_target<B>(req: &Request<B>) -> Result<(), GatewayError> {
    if req.method() == http::Method::CONNECT {
        return Err(GatewayError::BadRequest(
            "authority-form request targets are not accepted",
        ));
    }
    let uri = req.uri();
    if uri.path() == "*" || !uri.path().starts_with('/') {
        return Err(GatewayError::BadRequest(
            "the request target must be a path",
        ));
    }
    // Routed and forwarded byte for byte: a path others could read differently is refused.
    if let Some(why) = target::non_canonical(uri.path()) {
        return Err(GatewayError::BadRequest(why));
    }
    if req.version() <= Version::HTTP_11 {
        if uri.scheme().is_some() || uri.authority().is_some() {
            return Err(GatewayError::BadRequest(
                "absolute-form request targets are not accepted",
            ));
        }
        let hosts = req.headers().get_all(header::HOST).iter().count();
        if req.version() == Version::HTTP_11 && hosts != 1 {
            return Err(GatewayError::BadRequest(
                "exactly one Host header is required",
            ));
        }
        if hosts > 1 {
            return Err(GatewayError::BadRequest(
                "exactly one Host header is required",
            ));
        }
    }
    Ok(())
}

pub(super) fn declared_length<B>(req: &Request<B>) -> Result<Option<u64>, GatewayError> {
    let mut values = req.headers().get_all(header::CONTENT_LENGTH).iter();
    match (values.next(), values.next()) {
        (None, _) => Ok(None),
        (Some(v), None) => v
            .to_str()
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .map(Some)
            .ok_or(GatewayError::BadRequest("Content-Length is not a number")),
        _ => Err(GatewayError::BadRequest(
            "more than one Content-Length header",
        )),
    }
}

pub(super) async fn authenticate(
    gw: &Gateway,
    policy: &Policy,
    headers: &http::HeaderMap,
    request_id: &str,
) -> Result<Arc<VerifiedToken>, GatewayError> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = match (values.next(), values.next()) {
        (None, _) => return Err(GatewayError::MissingToken),
        (Some(v), None) => v,
        _ => {
            return Err(GatewayError::InvalidToken(
                "more than one Authorization header",
            ));
        }
    };
    let token = bearer_token(value)?;
    let verified = policy.verifier.verify_detailed(token).await;
    verified.map_err(|r| {
        if let AuthError::Invalid(reason) = r.error {
            gw.runtime.metrics.jwt_rejection(reason.as_str());
            // `alg` is a known name or a short alphanumeric value, `issuer` a configured one.
            tracing::info!(
                request_id,
                reason = reason.as_str(),
                alg = r.alg.as_deref().unwrap_or("-"),
                issuer = r.issuer.as_deref().unwrap_or("-"),
                "caller token refused"
            );
        }
        auth_error(r.error)
    })
}

/// The answer to a token the verifier did not accept.
pub(super) fn auth_error(e: AuthError) -> GatewayError {
    match e {
        AuthError::JwksUnavailable => GatewayError::JwksUnavailable,
        AuthError::Invalid(reason) => GatewayError::InvalidToken(reason_text(reason)),
    }
}

/// `Bearer <token>`, the scheme matched case-insensitively (RFC 6750 section 2.1). Another
/// scheme, or none, means the request carries no bearer token at all: RFC 6750 section 3.1 asks
/// for the bare challenge then, without an error code. A Bearer header with a malformed token is
/// an invalid token.
pub(super) fn bearer_token(v: &HeaderValue) -> Result<&str, GatewayError> {
    let malformed = GatewayError::InvalidToken("the Authorization header must be `Bearer <token>`");
    let s = v.to_str().map_err(|_| malformed.clone())?;
    let (scheme, rest) = s.split_once(' ').unwrap_or((s, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(GatewayError::MissingToken);
    }
    let token = rest.trim_matches(' ');
    if token.is_empty() || token.contains(' ') {
        return Err(malformed);
    }
    Ok(token)
}

pub(super) fn reason_text(r: crate::auth::jwt::RejectReason) -> &'static str {
    use crate::auth::jwt::RejectReason::*;
    match r {
        TooLarge => "the token is too large",
        Malformed => "the token is malformed",
        Algorithm => "the token's algorithm is not accepted",
        UnknownIssuer => "the token's issuer is not trusted",
        UnknownKey => "the token's signing key is not known",
        KidRequired => "the token names no key (kid) and its issuer publishes several",
        Signature => "the token's signature is invalid",
        Expired => "the token has expired",
        NotYetValid => "the token is not valid yet",
        IssuedInFuture => "the token is issued in the future",
        MissingClaim => "the token lacks a required claim (exp, iss, aud)",
        Audience => "the token is not meant for this gateway",
        Crit => "the token requires an unsupported extension",
        EmbeddedKey => "tokens carrying their own keys are refused",
    }
}

pub(super) async fn read_body<B>(body: B, limit: u64) -> Result<Bytes, GatewayError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(GatewayError::PayloadTooLarge {
                limit: limit as u64,
                attachments: false,
            })
        }
        Err(_) => Err(GatewayError::BadRequest(
            "the request body could not be read",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive_and_other_schemes_carry_no_token() {
        for (v, want) in [
            ("Bearer abc", Ok("abc")),
            ("bearer abc", Ok("abc")),
            ("BEARER abc", Ok("abc")),
            ("Basic abc", Err("missing_token")),
            ("abc", Err("missing_token")),
            ("Bearer:abc", Err("missing_token")),
            ("Bearer", Err("invalid_token")),
            ("Bearer ", Err("invalid_token")),
            ("Bearer a b", Err("invalid_token")),
        ] {
            let hv = HeaderValue::from_static(v);
            let got = bearer_token(&hv).map_err(|e| e.code());
            assert_eq!(got, want, "{v}");
        }
    }

    #[test]
    fn well_formed_request_id_is_kept_and_others_replaced() {
        let mut h = http::HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("abc-123_x.y"));
        assert_eq!(request_id(&h), "abc-123_x.y");
        h.insert("x-request-id", HeaderValue::from_static("bad id"));
        assert_ne!(request_id(&h), "bad id");
        let long = "a".repeat(129);
        h.insert(
            "x-request-id",
            HeaderValue::from_str(&long).unwrap_or(HeaderValue::from_static("x")),
        );
        assert_eq!(request_id(&h).len(), 28);
    }
}
