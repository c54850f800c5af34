//! The accept loop (HTTP/1.1 and HTTP/2 on one plain-TCP port) and the top-level dispatch.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use super::respond::{Body, gh_error, json, method_not_allowed};
use super::state::{Shared, recorded};
use super::{MAX_BODY_BYTES, hooks, oauth, partner};

/// Returned by the service to make hyper drop the connection without an answer.
#[derive(Debug, thiserror::Error)]
#[error("sandbox dropped the connection (injected fault)")]
pub(crate) struct DropConnection;

/// Serves connections until the task is aborted; aborting it also aborts every connection.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .http2()
        .timer(TokioTimer::new());
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let _ = stream.set_nodelay(true);
                    let builder = builder.clone();
                    let shared = Arc::clone(&shared);
                    connections.spawn(async move {
                        let service = service_fn(move |req| handle(Arc::clone(&shared), req));
                        if let Err(error) = builder.serve_connection(TokioIo::new(stream), service).await {
                            tracing::debug!(%error, "sandbox connection ended with an error");
                        }
                    });
                }
                Err(error) => {
                    // Typically out of file descriptors: back off instead of spinning.
                    tracing::warn!(%error, "sandbox accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

enum BodyError {
    TooLarge,
    Broken,
}

async fn read_body(body: Incoming) -> Result<Bytes, BodyError> {
    match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge),
        Err(_) => Err(BodyError::Broken),
    }
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, DropConnection> {
    let (parts, body) = req.into_parts();
    let body = read_body(body).await;
    if let Err(BodyError::Broken) = body {
        return Err(DropConnection);
    }
    let too_large = body.is_err();
    let body = body.unwrap_or_default();
    let path = parts.uri.path();

    let is_partner = path == partner::BASE_PATH
        || path
            .strip_prefix(partner::BASE_PATH)
            .is_some_and(|rest| rest.starts_with('/'));
    let resp = if is_partner {
        shared.record_partner(recorded(&parts, &body));
        let resp = if too_large {
            payload_too_large()
        } else {
            partner::handle(&shared, &parts, &body).await
        };
        if shared.compress {
            compress(resp, &parts.headers)
        } else {
            resp
        }
    } else if path == "/oauth/token" {
        shared.record_token(recorded(&parts, &body));
        if too_large {
            payload_too_large()
        } else {
            match oauth::token_endpoint(&shared, &parts, &body) {
                Some(resp) => resp,
                None => return Err(DropConnection),
            }
        }
    } else if path == "/.well-known/jwks.json" {
        shared.jwks_hits.fetch_add(1, Ordering::Relaxed);
        jwks(&shared, &parts.method)
    } else if path == "/.well-known/openid-configuration" {
        discovery(&shared, &parts.method)
    } else if path.starts_with("/_sandbox/") {
        if too_large {
            payload_too_large()
        } else {
            hooks::handle(&shared, &parts, &body)
        }
    } else {
        partner::not_found()
    };
    // Never the path itself: in `dev` this log is the gateway's, and a URL can carry a value.
    let surface = if is_partner { "partner" } else { "other" };
    tracing::debug!(method = %parts.method, surface, status = resp.status().as_u16(), "sandbox request");
    Ok(resp)
}

/// Encodes a response body with the first of `br` and `gzip` that the request accepts (any
/// weight above zero), as real servers do; `Vary: Accept-Encoding` either way.
fn compress(mut resp: Response<Body>, request: &http::HeaderMap) -> Response<Body> {
    use std::io::Write;
    resp.headers_mut()
        .insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    let coding = request
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter(|item| !item.replace(' ', "").ends_with(";q=0"))
        .map(|item| {
            item.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .find(|c| c == "br" || c == "gzip");
    let Some(coding) = coding else { return resp };
    let (mut parts, body) = resp.into_parts();
    let plain = futures_util::FutureExt::now_or_never(body.collect())
        .and_then(Result::ok)
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    if plain.is_empty() {
        return Response::from_parts(parts, Full::new(plain));
    }
    let mut out = Vec::new();
    if coding == "br" {
        let mut w = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
        let _ = w.write_all(&plain);
    } else {
        let mut w = flate2::write::GzEncoder::new(&mut out, flate2::Compression::fast());
        let _ = w.write_all(&plain);
        let _ = w.finish();
    }
    parts.headers.remove(header::CONTENT_LENGTH);
    if let Ok(v) = HeaderValue::from_str(&coding) {
        parts.headers.insert(header::CONTENT_ENCODING, v);
    }
    Response::from_parts(parts, Full::new(Bytes::from(out)))
}

fn payload_too_large() -> Response<Body> {
    gh_error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "The request body is too large.",
        None,
    )
}

fn jwks(shared: &Shared, method: &Method) -> Response<Body> {
    if method != Method::GET {
        return method_not_allowed("GET");
    }
    if !shared.faults.jwks_available() {
        let mut resp = json(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({ "error": "JWKS temporarily unavailable" }),
        );
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(1u32));
        return resp;
    }
    let mut resp = json(StatusCode::OK, &shared.keys.jwks());
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("max-age=300"),
    );
    resp
}

/// A minimal OpenID discovery document pointing at the JWKS and token endpoint.
fn discovery(shared: &Shared, method: &Method) -> Response<Body> {
    if method != Method::GET {
        return method_not_allowed("GET");
    }
    json(
        StatusCode::OK,
        &json!({
            "issuer": shared.issuer,
            "jwks_uri": format!("{}/.well-known/jwks.json", shared.public_origin),
            "token_endpoint": format!("{}/oauth/token", shared.public_origin),
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "id_token_signing_alg_values_supported": ["ES256"],
        }),
    )
}
