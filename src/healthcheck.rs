//! `greenhouse-gateway healthcheck`: one plain HTTP/1.1 `GET /healthz` of the admin listener, so
//! a container image needs no `curl` for its health check. Exit 0 on 200, 1 otherwise.
//!
//! The address is `--addr`, or `admin.addr` read from `--config` (only that key: no secret, spec
//! or team file is loaded, so a probe stays cheap and works without the secrets' environment), or
//! the admin listener's default `127.0.0.1:9090`. An unspecified listen address (`0.0.0.0`, `::`)
//! is probed on the loopback address of its family.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;

use crate::config::file::DEFAULT_ADMIN_ADDR;

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

/// `admin.addr` of a gateway config (its default when absent), as an address to probe.
pub fn admin_addr_from_config(path: &Path) -> Result<SocketAddr, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| format!("{} is not TOML: {e}", path.display()))?;
    let addr = match table.get("admin").and_then(|a| a.get("addr")) {
        None => DEFAULT_ADMIN_ADDR,
        Some(v) => v
            .as_str()
            .ok_or_else(|| format!("{}: admin.addr must be a string", path.display()))?,
    };
    addr.parse::<SocketAddr>()
        .map(probe_addr)
        .map_err(|_| format!("{}: admin.addr must be IP:PORT", path.display()))
}

/// One `GET /healthz` on `addr`, within `timeout` (connect included). `Ok` only for a 200.
pub async fn probe(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    let url = format!("http://{addr}/healthz");
    match tokio::time::timeout(timeout, get_status(addr)).await {
        Err(_) => Err(format!("{url}: no answer within {timeout:?}")),
        Ok(Err(e)) => Err(format!("{url}: {e}")),
        Ok(Ok(StatusCode::OK)) => Ok(()),
        Ok(Ok(status)) => Err(format!("{url} answered {status}, not 200")),
    }
}

async fn get_status(addr: SocketAddr) -> Result<StatusCode, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake failed: {e}"))?;
    let driver = tokio::spawn(conn);
    let request = Request::get("/healthz")
        .header(header::HOST, addr.to_string())
        .header(header::CONNECTION, "close")
        .header(header::USER_AGENT, "greenhouse-gateway-healthcheck")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("cannot build the request: {e}"))?;
    let result = sender
        .send_request(request)
        .await
        .map(|r| r.status())
        .map_err(|e| format!("request failed: {e}"));
    driver.abort();
    result
}

/// The command: prints one line (stdout on success, stderr on failure) and returns the exit code.
pub async fn run(addr: Option<SocketAddr>, config: Option<&Path>, timeout: Duration) -> i32 {
    let target = match (addr, config) {
        (Some(a), _) => Ok(probe_addr(a)),
        (None, Some(path)) => admin_addr_from_config(path),
        (None, None) => DEFAULT_ADMIN_ADDR
            .parse::<SocketAddr>()
            .map_err(|e| e.to_string()),
    };
    let target = match target {
        Ok(t) => t,
        Err(e) => {
            eprintln!("healthcheck failed: {e}");
            return 1;
        }
    };
    match probe(target, timeout).await {
        Ok(()) => {
            println!("healthy: http://{target}/healthz answered 200");
            0
        }
        Err(e) => {
            eprintln!("healthcheck failed: {e}");
            1
        }
    }
}
