//! `greenhouse-gateway healthcheck`: one plain HTTP/1.1 `GET /healthz` (or, with `--ready`,
//! `GET /readyz`) of the admin listener, so a container image needs no `curl` for its health
//! check. Exit 0 on 200, 1 otherwise.
//!
//! The address is `--addr`, or `admin.addr` read from `--config`, or the admin listener's default
//! `127.0.0.1:9090`. An unspecified listen address (`0.0.0.0`, `::`) is probed on the loopback
//! address of its family. With `--config`, `admin.token` is read too when it is set (resolved as
//! `check` does: `{ env }`, `{ file }` relative to the config, or `{ value }`) and sent as a
//! bearer token, since every admin path needs it then. Nothing else is read: no other secret,
//! spec or team file, so a probe stays cheap and needs only that one secret's environment.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;

use crate::config::file::{DEFAULT_ADMIN_ADDR, SecretFile};

/// The address to probe for a listener bound to `addr`.
pub fn probe_addr(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

/// What a probe needs from a gateway config: where the admin listener is and its token.
#[derive(Debug)]
pub struct Target {
    pub addr: SocketAddr,
    pub token: Option<String>,
}

/// `admin.addr` of a gateway config (its default when absent), as an address to probe.
pub fn admin_addr_from_config(path: &Path) -> Result<SocketAddr, String> {
    target_from_config(path).map(|t| t.addr)
}

/// `admin.addr` (as an address to probe) and `admin.token` (resolved) of a gateway config.
pub fn target_from_config(path: &Path) -> Result<Target, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| format!("{} is not TOML: {e}", path.display()))?;
    let admin = table.get("admin");
    let addr = match admin.and_then(|a| a.get("addr")) {
        None => DEFAULT_ADMIN_ADDR,
        Some(v) => v
            .as_str()
            .ok_or_else(|| format!("{}: admin.addr must be a string", path.display()))?,
    };
    let addr = addr
        .parse::<SocketAddr>()
        .map(probe_addr)
        .map_err(|_| format!("{}: admin.addr must be IP:PORT", path.display()))?;
    let token = match admin.and_then(|a| a.get("token")) {
        None => None,
        Some(v) => {
            let base = path.parent().unwrap_or(Path::new(""));
            Some(
                resolve_secret(v.clone(), base)
                    .map_err(|e| format!("{}: admin.token: {e}", path.display()))?,
            )
        }
    };
    Ok(Target { addr, token })
}

/// A secret table as `check` reads it ([`crate::config::validate::resolve_secret`]).
fn resolve_secret(v: toml::Value, base: &Path) -> Result<String, String> {
    let s: SecretFile = v
        .try_into()
        .map_err(|e: toml::de::Error| e.message().to_string())?;
    crate::config::validate::resolve_secret(&s, base, &crate::config::validate::RealSecrets)
        .map(|secret| secret.expose().to_string())
}

/// One `GET /healthz` on `addr`, within `timeout` (connect included). `Ok` only for a 200.
pub async fn probe(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    probe_path(addr, "/healthz", None, timeout).await
}

/// One `GET path` on `addr`, with the admin token when given, within `timeout` (connect
/// included). `Ok` only for a 200.
pub async fn probe_path(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    timeout: Duration,
) -> Result<(), String> {
    let url = format!("http://{addr}{path}");
    match tokio::time::timeout(timeout, get_status(addr, path, token)).await {
        Err(_) => Err(format!("{url}: no answer within {timeout:?}")),
        Ok(Err(e)) => Err(format!("{url}: {e}")),
        Ok(Ok(StatusCode::OK)) => Ok(()),
        Ok(Ok(status)) => Err(format!("{url} answered {status}, not 200")),
    }
}

async fn get_status(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> Result<StatusCode, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake failed: {e}"))?;
    let driver = tokio::spawn(conn);
    let mut request = Request::get(path)
        .header(header::HOST, addr.to_string())
        .header(header::CONNECTION, "close")
        .header(header::USER_AGENT, "greenhouse-gateway-healthcheck");
    if let Some(t) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let request = request.body(Empty::<Bytes>::new()).map_err(|_| {
        "cannot build the request (is admin.token a valid header value?)".to_string()
    })?;
    let result = sender
        .send_request(request)
        .await
        .map(|r| r.status())
        .map_err(|e| format!("request failed: {e}"));
    driver.abort();
    result
}

/// The command: prints one line (stdout on success, stderr on failure) and returns the exit code.
/// `ready` probes `/readyz` instead of `/healthz` (a readiness check).
pub async fn run(
    addr: Option<SocketAddr>,
    config: Option<&Path>,
    ready: bool,
    timeout: Duration,
) -> i32 {
    let target = match (addr, config) {
        (Some(a), _) => Ok(Target {
            addr: probe_addr(a),
            token: None,
        }),
        (None, Some(path)) => target_from_config(path),
        (None, None) => DEFAULT_ADMIN_ADDR
            .parse::<SocketAddr>()
            .map(|addr| Target { addr, token: None })
            .map_err(|e| e.to_string()),
    };
    let target = match target {
        Ok(t) => t,
        Err(e) => {
            eprintln!("healthcheck failed: {e}");
            return 1;
        }
    };
    let path = if ready { "/readyz" } else { "/healthz" };
    match probe_path(target.addr, path, target.token.as_deref(), timeout).await {
        Ok(()) => {
            println!("healthy: http://{}{path} answered 200", target.addr);
            0
        }
        Err(e) => {
            eprintln!("healthcheck failed: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target_of(config: &str) -> Result<Target, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, config).map_err(|e| e.to_string())?;
        target_from_config(&path)
    }

    #[test]
    fn admin_token_follows_the_same_secret_rules_as_check_without_echoing_it() {
        let ok = target_of("[admin]\naddr = \"0.0.0.0:9090\"\ntoken = { value = \"s3cret\" }\n");
        let ok = ok.unwrap();
        assert_eq!(ok.token.as_deref(), Some("s3cret"));
        assert_eq!(ok.addr, "127.0.0.1:9090".parse().unwrap());
        for (token, why) in [
            (
                "{ value = \"zq7\\u0007cd\" }",
                "the secret contains control characters",
            ),
            ("{ value = \"\" }", "the secret is empty"),
            (
                "{ value = \"zq7\", env = \"X\" }",
                "a secret needs exactly one of env, file or value",
            ),
        ] {
            let config = format!("[admin]\naddr = \"127.0.0.1:9090\"\ntoken = {token}\n");
            let Err(e) = target_of(&config) else {
                panic!("{token} was accepted");
            };
            assert!(e.ends_with(&format!("admin.token: {why}")), "{e}");
            assert!(!e.contains("zq7"), "{e}");
        }
    }
}
