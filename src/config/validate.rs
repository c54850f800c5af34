//! Loading and validation. Reading files is the only I/O; everything after parsing is a pure
//! function from the parsed mirrors (plus a secret resolver) to either the model or the full list
//! of problems, each with its file and key path.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::file::{
    CredentialFile, GatewayFile, IssuerFile, SecretFile, TeamFile, TeamQuotaFile, TracingFile,
};
use super::model::*;
use crate::audit::{
    AuditSettings, Fsync, MAX_RESERVE_BYTES, MIN_RESERVE_BYTES, OnError as AuditOnError,
};
use crate::auth::jwks::{IssuerConfig, KeySource};
use crate::policy::ValidationMode;
use crate::policy::{Glob, MemberRule, OboPolicy, Team, Teams, is_valid_email};
use crate::quota::{
    Backend as QuotaBackend, Limit, OnBackendError, OpLimits, QuotaSettings, TeamLimits,
    UpstreamBudget, validate_limit,
};
use crate::spec::Spec;
use crate::telemetry::OtlpSettings;
use crate::validate::{ValidationOptions, Validators};
use crate::values::{Secret, parse_duration, parse_rate};

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// Key path inside the file, for example `credentials.default.token_url` (empty for the
    /// whole file).
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(f, "{}: {}: {}", self.file.display(), self.key, self.message)
        }
    }
}

/// `listen.drain` when the file does not set it: long enough for a readiness probe every few
/// seconds to see the 503.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(5);
/// The longest `listen.drain` accepted.
const MAX_DRAIN: Duration = Duration::from_secs(300);

/// Resolves `{ env }` and `{ file }` secrets. Injected so validation stays pure in tests.
pub trait SecretSource {
    fn env(&self, name: &str) -> Option<String>;
    fn read(&self, path: &Path) -> std::io::Result<String>;
}

/// The process environment and file system.
pub struct RealSecrets;

impl SecretSource for RealSecrets {
    fn env(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
    fn read(&self, path: &Path) -> std::io::Result<String> {
        std::fs::read_to_string(path)
    }
}

/// Reads `gateway.toml`, the spec and every team file, then validates them all.
pub fn load(path: &Path) -> Result<Config, Vec<Problem>> {
    load_with(path, &RealSecrets)
}

/// [`load`] with secrets resolved by `secrets` instead of the process environment and files
/// (tests load a config with the environment its documentation names).
pub fn load_with(path: &Path, secrets: &dyn SecretSource) -> Result<Config, Vec<Problem>> {
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let problem = |file: &Path, message: String| Problem {
        file: file.to_path_buf(),
        key: String::new(),
        message,
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| vec![problem(path, format!("cannot read: {e}"))])?;
    let mut problems = Vec::new();
    let (gw, parse_problems) = parse_toml::<GatewayFile>(path, &text);
    problems.extend(parse_problems);
    let Some(gw) = gw else {
        // Still check the team files where they would be, so one run shows what it can.
        let raw: Option<toml::Table> = toml::from_str(&text).ok();
        let teams = raw
            .as_ref()
            .and_then(|t| t.get("teams"))
            .and_then(toml::Value::as_str)
            .unwrap_or("teams");
        if let Ok(entries) = std::fs::read_dir(base.join(teams)) {
            let mut paths: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect();
            paths.sort();
            for p in paths {
                if let Ok(t) = std::fs::read_to_string(&p) {
                    problems.extend(parse_toml::<TeamFile>(&p, &t).1);
                }
            }
        }
        return Err(problems);
    };
    let (spec_path, spec_text) = match &gw.spec {
        None => (
            PathBuf::from("<built-in seed spec>"),
            Ok(crate::spec::BUILTIN_SPEC.to_string()),
        ),
        Some(s) => {
            let p = base.join(s);
            let t = std::fs::read_to_string(&p);
            (p, t)
        }
    };
    let spec = match spec_text {
        Err(e) => {
            problems.push(Problem {
                file: path.to_path_buf(),
                key: "spec".into(),
                message: format!("cannot read {}: {e}", spec_path.display()),
            });
            None
        }
        Ok(t) => match Spec::from_text(&t) {
            Ok(s) => Some(s),
            Err(list) => {
                problems.extend(list.into_iter().map(|m| problem(&spec_path, m)));
                None
            }
        },
    };

    let teams_dir = base.join(gw.teams.as_deref().unwrap_or("teams"));
    let mut team_files = Vec::new();
    match std::fs::read_dir(&teams_dir) {
        Err(e) => problems.push(Problem {
            file: path.to_path_buf(),
            key: "teams".into(),
            message: format!("cannot read folder {}: {e}", teams_dir.display()),
        }),
        Ok(entries) => {
            let mut paths: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect();
            paths.sort();
            for p in paths {
                match std::fs::read_to_string(&p) {
                    Err(e) => problems.push(problem(&p, format!("cannot read: {e}"))),
                    Ok(t) => {
                        let (tf, list) = parse_toml::<TeamFile>(&p, &t);
                        problems.extend(list);
                        if let Some(tf) = tf {
                            team_files.push((p, tf));
                        }
                    }
                }
            }
        }
    }

    // A broken spec still lets every other file be checked, so one run shows every problem.
    // A key already reported while parsing is not reported again by validation (it was set
    // aside, so validation would only say it is missing).
    match validate(path, &gw, spec, &team_files, secrets) {
        Ok(cfg) if problems.is_empty() => Ok(cfg),
        Ok(_) => Err(problems),
        Err(more) => {
            let reported: BTreeSet<(PathBuf, String)> = problems
                .iter()
                .map(|p| (p.file.clone(), p.key.clone()))
                .collect();
            problems.extend(
                more.into_iter()
                    .filter(|p| !reported.contains(&(p.file.clone(), p.key.clone()))),
            );
            Err(problems)
        }
    }
}

/// Parses a TOML file. A problem does not hide the file's other problems: an unknown key (its
/// line, or for an unknown table its whole table) or a value of the wrong type is reported, set
/// aside, and parsing goes on, so one run names every such key and validation then checks the
/// rest. Line numbers stay those of the original text. `None` when the file cannot be parsed
/// even so (a syntax error, a missing required key).
fn parse_toml<T: serde::de::DeserializeOwned>(
    file: &Path,
    text: &str,
) -> (Option<T>, Vec<Problem>) {
    let mut problems = Vec::new();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let mut current = text.to_string();
    for _ in 0..64 {
        let e = match toml::from_str::<T>(&current) {
            Ok(v) => return (Some(v), problems),
            Err(e) => e,
        };
        problems.push(toml_problem(file, &current, &e));
        let msg = e.message();
        let unknown = msg.starts_with("unknown field");
        let wrong = msg.starts_with("invalid type") || msg.starts_with("invalid value");
        let Some(span) = e.span().filter(|_| unknown || wrong) else {
            return (None, problems);
        };
        let line = current[..span.start.min(current.len())]
            .matches('\n')
            .count();
        let is_table = lines
            .get(line)
            .is_some_and(|l| l.trim_start().starts_with('['));
        if is_table && !unknown {
            return (None, problems);
        }
        let end = if is_table {
            (line + 1..lines.len())
                .find(|&i| lines[i].trim_start().starts_with('['))
                .unwrap_or(lines.len())
        } else {
            line + 1
        };
        for l in lines.iter_mut().take(end).skip(line) {
            l.clear();
        }
        current = lines.join("\n");
    }
    (None, problems)
}

fn toml_problem(file: &Path, text: &str, e: &toml::de::Error) -> Problem {
    let (key, line) = match e.span() {
        Some(span) => key_at(text, span.start),
        None => (String::new(), None),
    };
    let mut message = redact_quoted(e.message());
    if let Some(line) = line {
        message.push_str(&format!(" (line {line})"));
    }
    Problem {
        file: file.to_path_buf(),
        key,
        message,
    }
}

/// The dotted key path and line number of a byte offset in a TOML text: the key on that line,
/// under the last `[table]` or `[[array]]` header above it.
fn key_at(text: &str, offset: usize) -> (String, Option<usize>) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or("");
    let line_no = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("").trim();
    let mut table = String::new();
    for l in before[..line_start].lines().rev() {
        let l = l.trim();
        if let Some(h) = l.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            table = format!("{}[]", h.trim());
            break;
        }
        if let Some(h) = l.strip_prefix('[').and_then(|r| r.split(']').next()) {
            table = h.trim().to_string();
            break;
        }
    }
    let key = if line.starts_with('[') {
        line.trim_matches(|c| c == '[' || c == ']')
            .trim()
            .to_string()
    } else {
        let k = line
            .split('=')
            .next()
            .unwrap_or("")
            .trim()
            .trim_matches('"');
        match (table.is_empty(), k.is_empty()) {
            (_, true) => table,
            (true, false) => k.to_string(),
            (false, false) => format!("{table}.{k}"),
        }
    };
    (key, Some(line_no))
}

/// Parse errors may quote the offending value (`invalid type: string "..."`); a misplaced secret
/// must not be printed, so every quoted value is replaced.
fn redact_quoted(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut parts = msg.split('"');
    if let Some(first) = parts.next() {
        out.push_str(first);
    }
    for (i, part) in parts.enumerate() {
        if i % 2 == 0 {
            out.push_str("\"<value>\"");
        } else {
            out.push_str(part);
        }
    }
    out
}

/// One `[credentials.NAME]` table, checked for its `kind`: the keys it needs, and none of the
/// other kind's.
fn credential(
    r: &mut Report<'_>,
    key: &str,
    c: &CredentialFile,
    base: &Path,
    secrets: &dyn SecretSource,
) -> Option<CredentialSettings> {
    const OAUTH2_ONLY: [&str; 8] = [
        "token_url",
        "client_id",
        "client_secret",
        "scope",
        "client_auth",
        "refresh_before",
        "timeout",
        "extra_params",
    ];
    let oauth2_set = [
        c.token_url.is_some(),
        c.client_id.is_some(),
        c.client_secret.is_some(),
        c.scope.is_some(),
        c.client_auth.is_some(),
        c.refresh_before.is_some(),
        c.timeout.is_some(),
        c.extra_params.is_some(),
    ];
    match c.kind.as_str() {
        "basic" => {
            for (name, set) in OAUTH2_ONLY.iter().zip(oauth2_set) {
                if set {
                    r.add(
                        format!("{key}.{name}"),
                        "is only for kind = \"oauth2_client_credentials\"",
                    );
                }
            }
            let Some(api_key) = &c.api_key else {
                r.add(
                    format!("{key}.api_key"),
                    "is required for kind = \"basic\": the partner API key, as a secret such as { env = \"GREENHOUSE_API_KEY\" }",
                );
                return None;
            };
            r.secret(&format!("{key}.api_key"), api_key, base, secrets)
                .map(|api_key| CredentialSettings::Basic { api_key })
        }
        "oauth2_client_credentials" => {
            if c.api_key.is_some() {
                r.add(format!("{key}.api_key"), "is only for kind = \"basic\"");
            }
            let token_url = match &c.token_url {
                Some(u) => secure_url(r, &format!("{key}.token_url"), u),
                None => {
                    r.add(
                        format!("{key}.token_url"),
                        "is required for kind = \"oauth2_client_credentials\"",
                    );
                    None
                }
            };
            let secret = match &c.client_secret {
                Some(s) => r.secret(&format!("{key}.client_secret"), s, base, secrets),
                None => {
                    r.add(
                        format!("{key}.client_secret"),
                        "is required for kind = \"oauth2_client_credentials\": a secret such as { env = \"GREENHOUSE_CLIENT_SECRET\" }",
                    );
                    None
                }
            };
            let client_id = c.client_id.clone().unwrap_or_default();
            if client_id.is_empty() {
                r.add(
                    format!("{key}.client_id"),
                    "is required and must not be empty",
                );
            }
            let client_auth = match c.client_auth.as_deref() {
                None | Some("basic") => ClientAuth::Basic,
                Some("post") => ClientAuth::Post,
                Some(_) => {
                    r.add(
                        format!("{key}.client_auth"),
                        "must be \"basic\" or \"post\"",
                    );
                    ClientAuth::Basic
                }
            };
            let extra_params = c.extra_params.clone().unwrap_or_default();
            for reserved in ["grant_type", "client_id", "client_secret", "scope"] {
                if extra_params.contains_key(reserved) {
                    r.add(
                        format!("{key}.extra_params.{reserved}"),
                        "is set by the gateway and cannot be overridden",
                    );
                }
            }
            let refresh_before = r.duration(
                &format!("{key}.refresh_before"),
                c.refresh_before.as_deref(),
                Duration::from_secs(60),
            );
            let timeout = r.duration(
                &format!("{key}.timeout"),
                c.timeout.as_deref(),
                Duration::from_secs(5),
            );
            match (token_url, secret) {
                (Some(token_url), Some(client_secret)) if !client_id.is_empty() => {
                    Some(CredentialSettings::OAuth2(OAuth2Credential {
                        token_url,
                        client_id,
                        client_secret,
                        scope: c.scope.clone(),
                        client_auth,
                        refresh_before,
                        timeout,
                        extra_params,
                    }))
                }
                _ => None,
            }
        }
        _ => {
            r.add(
                format!("{key}.kind"),
                "must be \"oauth2_client_credentials\" or \"basic\"",
            );
            None
        }
    }
}

/// Collects problems for one file.
struct Report<'a> {
    file: &'a Path,
    problems: &'a mut Vec<Problem>,
}

impl Report<'_> {
    fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            file: self.file.to_path_buf(),
            key: key.into(),
            message: message.into(),
        });
    }

    fn duration(&mut self, key: &str, value: Option<&str>, default: Duration) -> Duration {
        match value.map(parse_duration) {
            None => default,
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                self.add(key, e);
                default
            }
        }
    }

    fn secret(
        &mut self,
        key: &str,
        s: &SecretFile,
        base: &Path,
        src: &dyn SecretSource,
    ) -> Option<Secret> {
        match resolve_secret(s, base, src) {
            Ok(secret) => Some(secret),
            Err(why) => {
                self.add(key, why);
                None
            }
        }
    }
}

/// A secret as written: exactly one of `env`, `file` (relative to `base`; a trailing newline is
/// not part of it) or `value`, not empty, without control characters. The one rule for every
/// secret, also the admin token `healthcheck --config` sends; the error never holds the value.
pub fn resolve_secret(
    s: &SecretFile,
    base: &Path,
    src: &dyn SecretSource,
) -> Result<Secret, String> {
    let value = match (&s.env, &s.file, &s.value) {
        (Some(name), None, None) => src
            .env(name)
            .ok_or_else(|| format!("environment variable {name} is not set"))?,
        (None, Some(f), None) => src
            .read(&base.join(f))
            .map_err(|e| format!("cannot read secret file {f}: {e}"))?
            .trim_end_matches(['\r', '\n'])
            .to_string(),
        (None, None, Some(v)) => v.clone(),
        _ => return Err("a secret needs exactly one of env, file or value".into()),
    };
    if value.is_empty() {
        return Err("the secret is empty".into());
    }
    if value.bytes().any(|b| b.is_ascii_control()) {
        return Err("the secret contains control characters".into());
    }
    Ok(Secret::new(value))
}

/// Whether `http://` may be used for this URL: only for loopback hosts.
pub fn is_loopback_host(uri: &http::Uri) -> bool {
    match uri.host() {
        Some("localhost") => true,
        Some(h) => h
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
}

/// Parses a URL that must be https, or http to a loopback host.
fn secure_url(r: &mut Report<'_>, key: &str, s: &str) -> Option<http::Uri> {
    let uri: http::Uri = match s.parse() {
        Ok(u) => u,
        Err(_) => {
            r.add(key, "not a valid URL");
            return None;
        }
    };
    match uri.scheme_str() {
        Some("https") => {}
        Some("http") if is_loopback_host(&uri) => {}
        Some("http") => {
            r.add(
                key,
                "must be https:// (plain http is accepted only for loopback hosts)",
            );
            return None;
        }
        _ => {
            r.add(key, "must be an absolute https:// URL");
            return None;
        }
    }
    if uri.host().is_none() {
        r.add(key, "has no host");
        return None;
    }
    if uri.query().is_some() {
        r.add(key, "must not have a query string");
        return None;
    }
    Some(uri)
}

fn socket_addr(r: &mut Report<'_>, key: &str, s: &str) -> Option<SocketAddr> {
    match s.parse() {
        Ok(a) => Some(a),
        Err(_) => {
            r.add(key, "must be IP:PORT, for example 127.0.0.1:8080");
            None
        }
    }
}

/// Validates everything. Pure apart from the secret source.
pub fn validate(
    gateway_path: &Path,
    gw: &GatewayFile,
    spec: Option<Spec>,
    team_files: &[(PathBuf, TeamFile)],
    secrets: &dyn SecretSource,
) -> Result<Config, Vec<Problem>> {
    let base = gateway_path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let mut problems = Vec::new();
    let mut r = Report {
        file: gateway_path,
        problems: &mut problems,
    };

    // [listen]
    let listen_addr = socket_addr(&mut r, "listen.addr", &gw.listen.addr);
    let tls = gw.listen.tls.as_ref().map(|t| Tls {
        cert: base.join(&t.cert),
        key: base.join(&t.key),
        client_ca: t.client_ca.as_ref().map(|c| base.join(c)),
    });
    let header_read_timeout = r.duration(
        "listen.header_read_timeout",
        gw.listen.header_read_timeout.as_deref(),
        Duration::from_secs(10),
    );
    if header_read_timeout.is_zero() {
        r.add("listen.header_read_timeout", "must be longer than zero");
    }
    let body_read_timeout = r.duration(
        "listen.body_read_timeout",
        gw.listen.body_read_timeout.as_deref(),
        Duration::from_secs(30),
    );
    if body_read_timeout.is_zero() {
        r.add("listen.body_read_timeout", "must be longer than zero");
    }
    let response_write_timeout = r.duration(
        "listen.response_write_timeout",
        gw.listen.response_write_timeout.as_deref(),
        Duration::from_secs(60),
    );
    if response_write_timeout.is_zero() {
        r.add("listen.response_write_timeout", "must be longer than zero");
    }
    let max_header_bytes = gw.listen.max_header_bytes.unwrap_or(16 * 1024);
    if !(1024..=1024 * 1024).contains(&max_header_bytes) {
        r.add(
            "listen.max_header_bytes",
            "must be between 1024 and 1048576",
        );
    }
    let shutdown_grace = r.duration(
        "listen.shutdown_grace",
        gw.listen.shutdown_grace.as_deref(),
        Duration::from_secs(30),
    );
    let drain = r.duration("listen.drain", gw.listen.drain.as_deref(), DEFAULT_DRAIN);
    if drain > MAX_DRAIN {
        r.add(
            "listen.drain",
            "must be at most 5m (it only needs to outlast the load balancer's readiness checks)",
        );
    }
    let idle_timeout = r.duration(
        "listen.idle_timeout",
        gw.listen.idle_timeout.as_deref(),
        Duration::from_secs(60),
    );
    if idle_timeout.is_zero() {
        r.add("listen.idle_timeout", "must be longer than zero");
    }
    let max_connections = gw.listen.max_connections.unwrap_or(4096);
    if !(1..=1_000_000).contains(&max_connections) {
        r.add("listen.max_connections", "must be between 1 and 1000000");
    }
    let max_requests_in_flight = gw.listen.max_requests_in_flight.unwrap_or(1024);
    if !(1..=1_000_000).contains(&max_requests_in_flight) {
        r.add(
            "listen.max_requests_in_flight",
            "must be between 1 and 1000000",
        );
    }

    // [admin]
    let admin_addr = socket_addr(
        &mut r,
        "admin.addr",
        gw.admin
            .addr
            .as_deref()
            .unwrap_or(super::file::DEFAULT_ADMIN_ADDR),
    );
    let admin_token = gw
        .admin
        .token
        .as_ref()
        .and_then(|t| r.secret("admin.token", t, &base, secrets));
    if let Some(t) = &admin_token
        && t.expose().len() < 32
    {
        r.add(
            "admin.token",
            "must be at least 32 bytes: a guessable token opens /metrics and /admin (make one with `openssl rand -hex 32`)",
        );
    }
    if let Some(a) = admin_addr
        && !a.ip().is_loopback()
        && admin_token.is_none()
        && gw.admin.token.is_none()
    {
        r.add(
            "admin.token",
            format!(
                "required when admin.addr is not a loopback address (it is {a}): anyone who reaches it could read /metrics and /admin/teams \
                 and reload the configuration; set admin.token = {{ env = \"GATEWAY_ADMIN_TOKEN\" }} (at least 32 bytes, `openssl rand -hex 32`), \
                 or bind admin.addr to 127.0.0.1"
            ),
        );
    }
    if let (Some(a), Some(b)) = (listen_addr, admin_addr)
        && a == b
        && a.port() != 0
    {
        r.add("admin.addr", "must differ from listen.addr");
    }

    // [upstream]
    let base_url = secure_url(&mut r, "upstream.base_url", &gw.upstream.base_url);
    let timeout = r.duration(
        "upstream.timeout",
        gw.upstream.timeout.as_deref(),
        Duration::from_secs(30),
    );
    let connect_timeout = r.duration(
        "upstream.connect_timeout",
        gw.upstream.connect_timeout.as_deref(),
        Duration::from_secs(5),
    );
    for (k, d) in [
        ("upstream.timeout", timeout),
        ("upstream.connect_timeout", connect_timeout),
    ] {
        if d.is_zero() {
            r.add(k, "must be longer than zero");
        }
    }
    let ca_file = gw.upstream.ca_file.as_ref().map(|c| base.join(c));
    let upstream_budget = match gw.upstream.rate.as_deref().map(parse_rate) {
        None => None,
        Some(Err(e)) => {
            r.add("upstream.rate", e);
            None
        }
        Some(Ok(rate)) => Some(UpstreamBudget {
            rate,
            max_wait: r.duration(
                "upstream.max_wait",
                gw.upstream.max_wait.as_deref(),
                Duration::from_secs(2),
            ),
        }),
    };
    if gw.upstream.rate.is_none() && gw.upstream.max_wait.is_some() {
        r.add("upstream.max_wait", "has no effect without upstream.rate");
    }
    let mut trusted_proxies = Vec::new();
    for (i, cidr) in gw.listen.trusted_proxies.iter().enumerate() {
        match cidr
            .parse::<ipnet::IpNet>()
            .or_else(|_| cidr.parse::<IpAddr>().map(ipnet::IpNet::from))
        {
            Ok(net) => trusted_proxies.push(net),
            Err(_) => r.add(
                format!("listen.trusted_proxies[{i}]"),
                "must be an IP address or CIDR, for example 10.0.0.0/8",
            ),
        }
    }

    // [credentials.*]
    let mut credentials = BTreeMap::new();
    if gw.credentials.is_empty() {
        r.add(
            "credentials",
            "at least one credential is needed to call Greenhouse",
        );
    }
    for (name, c) in &gw.credentials {
        let key = format!("credentials.{name}");
        let cred = credential(&mut r, &key, c, &base, secrets);
        if let Some(cred) = cred {
            credentials.insert(name.clone(), cred);
        }
    }

    // [[issuers]]
    let mut issuers = Vec::new();
    if gw.issuers.is_empty() {
        r.add(
            "issuers",
            "at least one [[issuers]] entry is needed to authenticate callers",
        );
    }
    let mut seen_issuers = BTreeSet::new();
    for (i, iss) in gw.issuers.iter().enumerate() {
        if !seen_issuers.insert(iss.issuer.as_str()) {
            r.add(format!("issuers[{i}].issuer"), "is listed twice");
        }
        if let Some(cfg) = validate_issuer(&mut r, i, iss, &base) {
            issuers.push(cfg);
        }
    }

    // [limits]
    let max_body_bytes = gw.limits.max_body_bytes.unwrap_or(10 * 1024 * 1024);
    if max_body_bytes == 0 || max_body_bytes > 256 * 1024 * 1024 {
        r.add("limits.max_body_bytes", "must be between 1 and 268435456");
    }
    let max_buffered_body_bytes = gw
        .limits
        .max_buffered_body_bytes
        .unwrap_or(256 * 1024 * 1024);
    if max_buffered_body_bytes < max_body_bytes {
        r.add(
            "limits.max_buffered_body_bytes",
            format!(
                "must be at least limits.max_body_bytes ({max_body_bytes}): one body of the largest size must fit"
            ),
        );
    } else if max_buffered_body_bytes > 1 << 40 {
        r.add(
            "limits.max_buffered_body_bytes",
            "must be at most 1099511627776 (1 TiB)",
        );
    }

    // An attachment travels in base64 inside the body, so the largest one allowed must fit in a
    // body with room for the rest of the candidate; by default 5 MiB, or what fits.
    let fits = crate::validate::largest_attachment_fitting(max_body_bytes);
    let max_attachment_bytes = gw
        .limits
        .max_attachment_bytes
        .unwrap_or((5 * 1024 * 1024).min(fits));
    if max_attachment_bytes == 0 {
        r.add("limits.max_attachment_bytes", "must be at least 1");
    } else if max_attachment_bytes > fits {
        r.add(
            "limits.max_attachment_bytes",
            format!(
                "an attachment of {max_attachment_bytes} bytes is {} bytes in base64, more than a body of limits.max_body_bytes ({max_body_bytes}) can carry with the rest of the candidate: at most {fits}, or raise max_body_bytes",
                crate::validate::base64_len(max_attachment_bytes)
            ),
        );
    }
    let verified_token_cache_bytes = gw
        .limits
        .verified_token_cache_bytes
        .unwrap_or(crate::auth::jwt::DEFAULT_TOKEN_CACHE_BYTES);
    if verified_token_cache_bytes > crate::auth::jwt::MAX_TOKEN_CACHE_BYTES {
        r.add(
            "limits.verified_token_cache_bytes",
            format!(
                "must be at most {} (1 GiB); 0 turns the cache off",
                crate::auth::jwt::MAX_TOKEN_CACHE_BYTES
            ),
        );
    }
    let max_json_depth = gw.limits.max_json_depth.unwrap_or(64);
    if !(2..=128).contains(&max_json_depth) {
        r.add("limits.max_json_depth", "must be between 2 and 128");
    }
    let validation = ValidationOptions {
        max_depth: max_json_depth as usize,
        max_attachment_bytes: usize::try_from(max_attachment_bytes).unwrap_or(usize::MAX),
        max_body_bytes: usize::try_from(max_body_bytes).unwrap_or(usize::MAX),
    };

    // [quota]
    let q = &gw.quota;
    let quota_timeout = r.duration(
        "quota.timeout",
        q.timeout.as_deref(),
        crate::quota::DEFAULT_REDIS_TIMEOUT,
    );
    if quota_timeout.is_zero() || quota_timeout > Duration::from_secs(5) {
        r.add("quota.timeout", "must be between 1ms and 5s");
    }
    let backend = match q.backend.as_deref() {
        None | Some("memory") => {
            if q.redis_url.is_some() {
                r.add("quota.redis_url", "is only used with backend = \"redis\"");
            }
            QuotaBackend::Memory
        }
        Some("redis") => {
            let url = match &q.redis_url {
                None => {
                    r.add("quota.redis_url", "is required with backend = \"redis\"");
                    None
                }
                Some(sf) => r.secret("quota.redis_url", sf, &base, secrets),
            };
            let tls = url
                .as_ref()
                .is_some_and(|u| u.expose().starts_with("rediss://"));
            if let Some(u) = &url
                && !tls
                && !u.expose().starts_with("redis://")
            {
                r.add(
                    "quota.redis_url",
                    "must start with redis:// or rediss:// (TLS)",
                );
            }
            let ca_pem = q.redis_ca_file.as_ref().and_then(|f| {
                if !tls {
                    r.add(
                        "quota.redis_ca_file",
                        "is only used with a rediss:// redis_url",
                    );
                    return None;
                }
                let p = base.join(f);
                match std::fs::read(&p) {
                    Err(e) => {
                        r.add(
                            "quota.redis_ca_file",
                            format!("cannot read {}: {e}", p.display()),
                        );
                        None
                    }
                    Ok(pem) => {
                        use rustls_pki_types::pem::PemObject;
                        let certs = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
                            .filter(Result::is_ok)
                            .count();
                        if certs == 0 {
                            r.add(
                                "quota.redis_ca_file",
                                format!("{} holds no PEM certificate", p.display()),
                            );
                            None
                        } else {
                            Some(pem)
                        }
                    }
                }
            });
            let key_prefix = q
                .key_prefix
                .clone()
                .unwrap_or_else(|| crate::quota::DEFAULT_KEY_PREFIX.to_string());
            if key_prefix.is_empty()
                || !key_prefix
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
            {
                r.add("quota.key_prefix", "use letters, digits and - _ . : only");
            }
            QuotaBackend::Redis {
                url: url.map(|u| u.expose().to_string()).unwrap_or_default(),
                timeout: quota_timeout,
                key_prefix,
                ca_pem,
            }
        }
        Some(_) => {
            r.add("quota.backend", "must be \"memory\" or \"redis\"");
            QuotaBackend::Memory
        }
    };
    let on_backend_error = match q.on_backend_error.as_deref() {
        None | Some("deny") => OnBackendError::Deny,
        Some("allow") => OnBackendError::Allow,
        Some("local") => OnBackendError::Local,
        Some(_) => {
            r.add(
                "quota.on_backend_error",
                "must be \"deny\", \"allow\" or \"local\"",
            );
            OnBackendError::Deny
        }
    };

    // [audit]
    let a = &gw.audit;
    let mut audit = AuditSettings::new(base.join(a.path.as_deref().unwrap_or("audit/audit.jsonl")));
    audit.fsync = match a.fsync.as_deref() {
        None | Some("batch") => Fsync::Batch,
        Some("always") => Fsync::Always,
        Some("never") => Fsync::Never,
        Some(_) => {
            r.add("audit.fsync", "must be \"always\", \"batch\" or \"never\"");
            Fsync::Batch
        }
    };
    audit.on_error = match a.on_error.as_deref() {
        None | Some("reject") => AuditOnError::Reject,
        Some("continue") => AuditOnError::Continue,
        Some(_) => {
            r.add("audit.on_error", "must be \"reject\" or \"continue\"");
            AuditOnError::Reject
        }
    };
    if let Some(n) = a.rotate_bytes {
        if n != 0 && n < 4096 {
            r.add(
                "audit.rotate_bytes",
                "must be 0 (never rotate) or at least 4096",
            );
        }
        audit.rotate_bytes = n;
    }
    audit.hmac_key = a
        .hmac_key
        .as_ref()
        .and_then(|k| r.secret("audit.hmac_key", k, &base, secrets));
    if let Some(k) = &audit.hmac_key
        && k.expose().len() < 16
    {
        r.add("audit.hmac_key", "must be at least 16 bytes");
    }
    if let Some(n) = a.queue_capacity {
        if !(1..=1_000_000).contains(&n) {
            r.add("audit.queue_capacity", "must be between 1 and 1000000");
        }
        audit.queue_capacity = n as usize;
    }
    audit.batch_interval = r.duration(
        "audit.batch_interval",
        a.batch_interval.as_deref(),
        audit.batch_interval,
    );
    if audit.batch_interval.is_zero() || audit.batch_interval > Duration::from_secs(10) {
        r.add("audit.batch_interval", "must be between 1ms and 10s");
    }
    if let Some(n) = a.reserve_bytes {
        if !(MIN_RESERVE_BYTES..=MAX_RESERVE_BYTES).contains(&n) {
            r.add(
                "audit.reserve_bytes",
                format!("must be between {MIN_RESERVE_BYTES} and {MAX_RESERVE_BYTES}"),
            );
        }
        audit.reserve_bytes = n.clamp(MIN_RESERVE_BYTES, MAX_RESERVE_BYTES);
    }

    // [tracing]
    let tracing = validate_tracing(&mut r, &gw.tracing);

    // teams
    let mut teams = Vec::new();
    let mut team_quotas = BTreeMap::new();
    if team_files.is_empty() {
        r.add(
            "teams",
            "no team policies found: no caller could ever be admitted",
        );
    }
    for (path, tf) in team_files {
        let mut tr = Report {
            file: path,
            problems: r.problems,
        };
        if let Some((t, q)) = validate_team(&mut tr, path, tf, spec.as_ref(), &gw.credentials) {
            team_quotas.insert(t.name.clone(), q);
            teams.push(t);
        }
    }
    let mut names = BTreeSet::new();
    for t in &teams {
        if !names.insert(t.name.clone()) {
            r.add("teams", format!("team {} is defined twice", t.name));
        }
    }
    let teams = Teams::new(teams);

    if !problems.is_empty() {
        return Err(problems);
    }
    let validators = match spec.as_ref().map(|s| Validators::compile(s, validation)) {
        Some(Ok(v)) => Some(v),
        Some(Err(list)) => {
            let spec_file = gw
                .spec
                .as_ref()
                .map_or_else(|| PathBuf::from("<built-in seed spec>"), |s| base.join(s));
            for m in list {
                problems.push(Problem {
                    file: spec_file.clone(),
                    key: String::new(),
                    message: format!("schema does not compile: {m}"),
                });
            }
            None
        }
        None => None,
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    let (Some(validators), Some(spec), Some(addr), Some(admin_addr), Some(base_url)) =
        (validators, spec, listen_addr, admin_addr, base_url)
    else {
        // Each missing piece has a problem recorded already (a broken spec in the caller).
        return Err(problems);
    };
    let prefix = base_url.path().trim_end_matches('/').to_string();
    let warnings = super::warnings::collect(&super::warnings::Input {
        gateway_path,
        gw,
        listen_addr: addr,
        spec: &spec,
        team_files,
        teams: &teams,
        team_quotas: &team_quotas,
        issuers: &issuers,
        budget: upstream_budget.as_ref(),
    });
    Ok(Config {
        source: gateway_path.to_path_buf(),
        spec: Arc::new(spec),
        listen: Listen {
            addr,
            tls,
            header_read_timeout,
            body_read_timeout,
            response_write_timeout,
            max_header_bytes: max_header_bytes as usize,
            shutdown_grace,
            drain,
            idle_timeout,
            max_connections: max_connections as usize,
            max_requests_in_flight: max_requests_in_flight as usize,
            trusted_proxies,
        },
        admin: Admin {
            addr: admin_addr,
            token: admin_token,
        },
        upstream: Upstream {
            base_url,
            prefix,
            timeout,
            connect_timeout,
            ca_file,
        },
        credentials,
        issuers,
        limits: Limits {
            max_body_bytes,
            max_buffered_body_bytes,
            verified_token_cache_bytes,
        },
        teams,
        quota: QuotaSettings {
            backend,
            on_backend_error,
            teams: team_quotas,
            upstream: upstream_budget,
        },
        audit,
        tracing,
        validation,
        validators: Arc::new(validators),
        warnings,
    })
}

/// `[tracing]`: `None` when spans are not exported. The other keys need `otlp_endpoint`.
fn validate_tracing(r: &mut Report<'_>, t: &TracingFile) -> Option<OtlpSettings> {
    let Some(url) = &t.otlp_endpoint else {
        for (key, set) in [
            ("tracing.service_name", t.service_name.is_some()),
            ("tracing.sample_ratio", t.sample_ratio.is_some()),
            ("tracing.queue_size", t.queue_size.is_some()),
            ("tracing.export_timeout", t.export_timeout.is_some()),
        ] {
            if set {
                r.add(
                    key,
                    "has no effect without tracing.otlp_endpoint (spans are exported only when it is set)",
                );
            }
        }
        return None;
    };
    let endpoint = secure_url(r, "tracing.otlp_endpoint", url).and_then(|u| {
        // The collector's base URL, as OTEL_EXPORTER_OTLP_ENDPOINT is: traces go to /v1/traces.
        let base = u.to_string();
        let base = base.trim_end_matches('/');
        let full = if base.ends_with("/v1/traces") {
            base.to_string()
        } else {
            format!("{base}/v1/traces")
        };
        full.parse::<http::Uri>().ok()
    });
    let service_name = t
        .service_name
        .clone()
        .unwrap_or_else(|| OtlpSettings::DEFAULT_SERVICE_NAME.to_string());
    if service_name.is_empty()
        || service_name.len() > 255
        || !service_name
            .bytes()
            .all(|b| b.is_ascii_graphic() || b == b' ')
    {
        r.add(
            "tracing.service_name",
            "must be 1 to 255 printable ASCII characters",
        );
    }
    let sample_ratio = t.sample_ratio.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&sample_ratio) {
        r.add(
            "tracing.sample_ratio",
            "must be between 0.0 (record no trace the gateway starts) and 1.0 (record all)",
        );
    }
    let queue_size = t
        .queue_size
        .unwrap_or(OtlpSettings::DEFAULT_QUEUE_SIZE as u64);
    if !(1..=1_000_000).contains(&queue_size) {
        r.add("tracing.queue_size", "must be between 1 and 1000000");
    }
    let export_timeout = r.duration(
        "tracing.export_timeout",
        t.export_timeout.as_deref(),
        OtlpSettings::DEFAULT_EXPORT_TIMEOUT,
    );
    if export_timeout.is_zero() || export_timeout > Duration::from_secs(60) {
        r.add("tracing.export_timeout", "must be between 1ms and 60s");
    }
    Some(OtlpSettings {
        endpoint: endpoint?,
        service_name,
        sample_ratio,
        queue_size: queue_size as usize,
        export_timeout,
    })
}

fn validate_issuer(
    r: &mut Report<'_>,
    i: usize,
    iss: &IssuerFile,
    base: &Path,
) -> Option<IssuerConfig> {
    let key = format!("issuers[{i}]");
    let mut ok = true;
    if iss.issuer.is_empty() {
        r.add(format!("{key}.issuer"), "must not be empty");
        ok = false;
    }
    if iss.audiences.is_empty() || iss.audiences.iter().any(String::is_empty) {
        r.add(
            format!("{key}.audiences"),
            "needs at least one non-empty audience",
        );
        ok = false;
    }
    let keys = match (&iss.jwks_url, &iss.jwks_file) {
        (Some(u), None) => {
            secure_url(r, &format!("{key}.jwks_url"), u).map(|u| KeySource::Url(u.to_string()))
        }
        (None, Some(f)) => Some(KeySource::File(base.join(f))),
        _ => {
            r.add(&key, "needs exactly one of jwks_url or jwks_file");
            None
        }
    };
    let mut algorithms = Vec::new();
    if iss.algorithms.is_empty() {
        r.add(
            format!("{key}.algorithms"),
            "list at least one algorithm, for example [\"RS256\"]",
        );
        ok = false;
    }
    for (j, a) in iss.algorithms.iter().enumerate() {
        let k = format!("{key}.algorithms[{j}]");
        if a.starts_with("HS") {
            r.add(
                k,
                "HMAC algorithms are refused: callers' tokens must be verified with public keys",
            );
            ok = false;
            continue;
        }
        match a.parse::<jsonwebtoken::Algorithm>() {
            Ok(alg) => algorithms.push(alg),
            Err(_) => {
                r.add(
                    k,
                    "unknown algorithm (use RS256/384/512, PS256/384/512, ES256/384 or EdDSA)",
                );
                ok = false;
            }
        }
    }
    let leeway = r.duration(
        &format!("{key}.leeway"),
        iss.leeway.as_deref(),
        Duration::from_secs(30),
    );
    if leeway > Duration::from_secs(300) {
        r.add(format!("{key}.leeway"), "must be at most 5m");
    }
    let refresh_interval = r.duration(
        &format!("{key}.refresh_interval"),
        iss.refresh_interval.as_deref(),
        Duration::from_secs(300),
    );
    if refresh_interval < Duration::from_secs(1) {
        r.add(format!("{key}.refresh_interval"), "must be at least 1s");
    }
    let refetch_cooldown = r.duration(
        &format!("{key}.refetch_cooldown"),
        iss.refetch_cooldown.as_deref(),
        Duration::from_secs(30),
    );
    let keys = keys?;
    ok.then(|| IssuerConfig {
        issuer: iss.issuer.clone(),
        audiences: iss.audiences.clone(),
        keys,
        algorithms,
        leeway,
        refresh_interval,
        refetch_cooldown,
    })
}

fn validate_team(
    r: &mut Report<'_>,
    path: &Path,
    tf: &TeamFile,
    spec: Option<&Spec>,
    credentials: &BTreeMap<String, CredentialFile>,
) -> Option<(Team, TeamLimits)> {
    let before = r.problems.len();
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    if tf.name != stem {
        r.add("name", format!("must equal the file name ({stem})"));
    }
    if tf.name.is_empty()
        || !tf
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        r.add("name", "use letters, digits, '-' and '_' only");
    }
    if tf.operations.is_empty() {
        r.add(
            "operations",
            "lists no operation: the team could call nothing",
        );
    }
    let mut operations = BTreeSet::new();
    for (i, op) in tf.operations.iter().enumerate() {
        // Without a usable spec the operation ids cannot be checked; the spec's own problems
        // are reported instead.
        let Some(spec) = spec else {
            operations.insert(op.clone());
            continue;
        };
        if spec.operation(op).is_none() {
            let known: Vec<&str> = spec.operations().iter().map(|o| o.id.as_str()).collect();
            r.add(
                format!("operations[{i}]"),
                format!(
                    "unknown operation id {op:?} (the spec has: {})",
                    known.join(", ")
                ),
            );
        } else if !operations.insert(op.clone()) {
            r.add(format!("operations[{i}]"), format!("{op} is listed twice"));
        }
    }
    let credential = tf
        .credential
        .clone()
        .unwrap_or_else(|| "default".to_string());
    if !credentials.contains_key(&credential) {
        let known: Vec<&str> = credentials.keys().map(String::as_str).collect();
        r.add(
            "credential",
            format!(
                "no [credentials.{credential}] in gateway.toml (defined: {})",
                known.join(", ")
            ),
        );
    }
    if tf.members.is_empty() {
        r.add(
            "members",
            "has no [[members]] table: no caller could ever match",
        );
    }
    let mut members = Vec::new();
    for (i, m) in tf.members.iter().enumerate() {
        if m.is_empty() {
            r.add(
                format!("members[{i}]"),
                "is empty and would match every caller; name at least one claim",
            );
            continue;
        }
        let mut claims = Vec::new();
        for (claim, pattern) in m {
            if pattern.is_empty() || pattern.chars().all(|c| c == '*') {
                r.add(
                    format!("members[{i}].{claim}"),
                    "must be more specific than a bare '*'",
                );
            }
            claims.push((claim.clone(), Glob::new(pattern.clone())));
        }
        members.push(MemberRule { claims });
    }
    let obo = &tf.on_behalf_of;
    if let Some(d) = &obo.default
        && !is_valid_email(d)
    {
        r.add("on_behalf_of.default", "is not a valid email address");
    }
    for (i, a) in obo.allowed.iter().enumerate() {
        if !is_valid_email(a) {
            r.add(
                format!("on_behalf_of.allowed[{i}]"),
                "is not a valid email address",
            );
        }
    }
    if obo.from_claim.as_deref() == Some("") {
        r.add("on_behalf_of.from_claim", "must name a claim");
    }
    if obo.default.is_none() && obo.from_claim.is_none() && obo.allowed.is_empty() {
        r.add("on_behalf_of", "needs a default, allowed users or from_claim: Greenhouse requires On-Behalf-Of on every call");
    }
    let validation = match tf.validation.mode.as_deref() {
        None | Some("enforce") => ValidationMode::Enforce,
        Some("report") => ValidationMode::Report,
        Some(_) => {
            r.add("validation.mode", "must be \"enforce\" or \"report\"");
            ValidationMode::Enforce
        }
    };
    let quota = team_limits(r, &tf.quota, &operations);
    (r.problems.len() == before).then(|| {
        (
            Team {
                name: tf.name.clone(),
                description: tf.description.clone(),
                operations,
                credential,
                members,
                on_behalf_of: OboPolicy {
                    default: obo.default.clone(),
                    allowed: obo.allowed.clone(),
                    from_claim: obo.from_claim.clone(),
                },
                validation,
            },
            quota,
        )
    })
}

/// A team's `[quota]`: rates through the limiter's own pure validator, counts checked here.
fn team_limits(r: &mut Report<'_>, q: &TeamQuotaFile, operations: &BTreeSet<String>) -> TeamLimits {
    let limit_at = |r: &mut Report<'_>, key: &str, rate: Option<&str>, burst: Option<u64>| {
        match validate_limit(rate, burst) {
            Ok(l) => l,
            Err(problems) => {
                for (k, m) in problems {
                    let k = if k.is_empty() {
                        key.to_string()
                    } else {
                        format!("{key}.{k}")
                    };
                    r.add(k, m);
                }
                Limit {
                    rate: None,
                    burst: None,
                }
            }
        }
    };
    let limit = limit_at(r, "quota", q.rate.as_deref(), q.burst);
    let concurrency = match q.concurrency {
        Some(0) => {
            r.add("quota.concurrency", "must be at least 1");
            None
        }
        Some(n) => Some(u32::try_from(n).unwrap_or(u32::MAX)),
        None => None,
    };
    if q.daily == Some(0) {
        r.add(
            "quota.daily",
            "must be at least 1 (leave it out for no daily limit)",
        );
    }
    let mut ops = BTreeMap::new();
    for (op, oq) in &q.operations {
        let key = format!("quota.operations.{op}");
        if !operations.contains(op) {
            r.add(
                &key,
                "the team may not call this operation (it is not in `operations`)",
            );
        }
        if oq.daily == Some(0) {
            r.add(
                format!("{key}.daily"),
                "must be at least 1 (remove the operation from `operations` to forbid it)",
            );
        }
        let limit = limit_at(r, &key, oq.rate.as_deref(), oq.burst);
        ops.insert(
            op.clone(),
            OpLimits {
                limit,
                daily: oq.daily,
            },
        );
    }
    TeamLimits {
        limit,
        concurrency,
        daily: q.daily.filter(|d| *d > 0),
        operations: ops,
    }
}
