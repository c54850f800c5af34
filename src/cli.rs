//! The command line: `serve`, `dev`, `sandbox`, `check`, `audit`, `healthcheck`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::{self, Config, CredentialSettings};
use crate::sandbox::{Sandbox, SandboxOptions};

#[derive(Parser, Debug)]
#[command(
    name = "greenhouse-gateway",
    version,
    about = "Authenticating gateway for the Greenhouse Partner API"
)]
pub struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    pub log_json: bool,
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size of the variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the gateway.
    Serve {
        #[arg(long, default_value = "policies/gateway.toml")]
        config: PathBuf,
    },
    /// The local playground: the sandbox and the gateway wired to it, with a token per team.
    Dev {
        #[arg(long, default_value = "policies/gateway.toml")]
        config: PathBuf,
    },
    /// The Greenhouse sandbox alone (API emulator, token endpoint, dev identity provider).
    Sandbox {
        #[arg(long, default_value = "127.0.0.1:8089")]
        listen: SocketAddr,
        /// Partner API requests per credential per 10 s window; 0 switches the limit off.
        #[arg(long, default_value_t = SandboxOptions::default().rate_limit)]
        rate_limit: u32,
        /// Compress Partner API answers (`br` or `gzip`, as the request accepts), as real servers do.
        #[arg(long)]
        compress: bool,
        /// The status of a successful create: 201 (the seed spec) or 200 (Greenhouse's "200-level").
        #[arg(long, default_value_t = 201, value_parser = clap::value_parser!(u16).range(200..=201))]
        create_status: u16,
    },
    /// Validate config, team policies and spec without touching the network.
    Check {
        #[arg(long, default_value = "policies/gateway.toml")]
        config: PathBuf,
        /// Warnings are errors too: exit 1 when there is any.
        #[arg(long)]
        strict: bool,
        /// `text`, or `json`: one JSON document with the problems, the warnings and the summary.
        #[arg(long, value_enum, default_value_t = CheckFormat::Text)]
        format: CheckFormat,
        #[command(flatten)]
        explain: ExplainArgs,
    },
    /// Verify or query audit trails.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// GET /healthz of the admin listener (container health checks): exit 0 on 200, else 1.
    Healthcheck {
        /// The admin listener, IP:PORT [default: admin.addr of --config, else 127.0.0.1:9090].
        #[arg(long, conflicts_with = "config")]
        addr: Option<SocketAddr>,
        /// Take the address from this config's admin.addr (0.0.0.0 or :: is probed on loopback)
        /// and send its admin.token, when set, as a bearer token.
        #[arg(long)]
        config: Option<PathBuf>,
        /// GET /readyz instead (a readiness check: 503 until ready and while draining).
        #[arg(long)]
        ready: bool,
        /// Longest wait for the answer, connecting included.
        #[arg(long, default_value = "2s", value_parser = crate::values::parse_duration)]
        timeout: Duration,
    },
}

/// How `check` prints its findings.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckFormat {
    Text,
    Json,
}

/// `check --explain`: what the gateway would do with one request, without sending it.
#[derive(clap::Args, Debug, Default)]
pub struct ExplainArgs {
    /// Explain the decision for one request instead of printing the summary (exit 0: it would be
    /// forwarded; 3: the gateway would refuse it; 1: the configuration has problems).
    #[arg(long, requires = "path")]
    pub explain: bool,
    /// The request's method.
    #[arg(long, default_value = "GET", requires = "explain")]
    pub method: String,
    /// Path and query as the caller sends them, e.g. `/v1/partner/candidates?per_page=5`.
    #[arg(long, requires = "explain")]
    pub path: Option<String>,
    /// The caller's token claims as JSON (taken as given: no signature is checked).
    #[arg(long, requires = "explain", conflicts_with = "token_file")]
    pub claims: Option<String>,
    /// A real token in a file (`-` reads standard input); its signature is checked against the
    /// configured issuers' keys.
    #[arg(long, requires = "explain")]
    pub token_file: Option<PathBuf>,
    /// A request header, `Name: value` (repeatable), e.g. `On-Behalf-Of: someone@example.com`.
    #[arg(long = "header", requires = "explain")]
    pub headers: Vec<String>,
    /// The request body, from a file.
    #[arg(long, requires = "explain")]
    pub body: Option<PathBuf>,
}

#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Check the hash chain; names the first bad record; exit 1 on tampering.
    Verify {
        /// The gateway config whose `[audit] hmac_key` keyed the chain.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Audit files or the current file (rotated files beside it are found).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print the records that match every filter given.
    Query {
        #[arg(long)]
        team: Option<String>,
        #[arg(long)]
        subject: Option<String>,
        #[arg(long)]
        operation: Option<String>,
        #[arg(long)]
        on_behalf_of: Option<String>,
        /// `forwarded` or `denied`.
        #[arg(long)]
        decision: Option<String>,
        #[arg(long)]
        code: Option<String>,
        #[arg(long)]
        status: Option<u16>,
        /// RFC 3339, inclusive.
        #[arg(long)]
        since: Option<String>,
        /// RFC 3339, exclusive.
        #[arg(long)]
        until: Option<String>,
        #[arg(long)]
        external_id: Option<String>,
        #[arg(long)]
        candidate_id: Option<i64>,
        /// `json` (one record per line) or `table`.
        #[arg(long, default_value = "json")]
        format: String,
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

/// Sets up logging: JSON lines with `--log-json` or `GATEWAY_LOG_FORMAT=json`, else text; the
/// level and targets from `RUST_LOG` (default `info`). Both formats print the fields of the
/// spans a line was logged in, so a line logged while handling a request carries its
/// `request_id`. Secrets never reach a log line: they are redacted types or sensitive headers.
/// Info lines are gathered and written every 100 ms, warnings and errors at once
/// ([`crate::telemetry::log_writer`]).
pub fn init_tracing(json: bool) {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let json = json || log_format_is_json(std::env::var("GATEWAY_LOG_FORMAT").ok().as_deref());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt =
        tracing_subscriber::fmt::layer().with_writer(crate::telemetry::log_writer::GatheredStderr);
    // `RUST_LOG` filters the log only; the OpenTelemetry layer has its own filter (the gateway's
    // spans, exported once `[tracing] otlp_endpoint` is installed).
    let registry = tracing_subscriber::registry().with(crate::telemetry::layer());
    if json {
        let fmt = fmt.json().with_current_span(true).with_span_list(true);
        registry.with(fmt.with_filter(filter)).init();
    } else {
        // Colours only on a terminal: a log collector would keep the escape codes.
        let fmt = fmt
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .event_format(crate::telemetry::text_line::PlainEvent::new())
            .fmt_fields(crate::telemetry::text_line::PlainFields::new());
        registry.with(fmt.with_filter(filter)).init();
    }
}

/// Whether `GATEWAY_LOG_FORMAT` asks for JSON lines (`json`, in any case); `text`, unset or
/// anything else is text.
pub fn log_format_is_json(value: Option<&str>) -> bool {
    value.is_some_and(|v| v.trim().eq_ignore_ascii_case("json"))
}

/// Runs a command; the returned code is the process exit code.
pub async fn run(cli: Cli) -> i32 {
    match cli.command {
        Command::Check {
            config, explain, ..
        } if explain.explain => check_explain(&config, explain).await,
        Command::Check {
            config,
            strict,
            format,
            ..
        } => check(&config, strict, format),
        Command::Serve { config } => match load_or_print(&config) {
            None => 1,
            Some(cfg) => serve(cfg).await,
        },
        Command::Dev { config } => match load_or_print(&config) {
            None => 1,
            Some(cfg) => dev(cfg).await,
        },
        Command::Sandbox {
            listen,
            rate_limit,
            compress,
            create_status,
        } => {
            let opts = SandboxOptions {
                rate_limit,
                compress,
                create_status: http::StatusCode::from_u16(create_status)
                    .unwrap_or(http::StatusCode::CREATED),
                ..SandboxOptions::default()
            };
            sandbox(listen, opts).await
        }
        Command::Audit { command } => audit(command),
        Command::Healthcheck {
            addr,
            config,
            ready,
            timeout,
        } => crate::healthcheck::run(addr, config.as_deref(), ready, timeout).await,
    }
}

fn audit(cmd: AuditCommand) -> i32 {
    match cmd {
        AuditCommand::Verify { config, files } => {
            let key = match config {
                None => None,
                Some(path) => match load_or_print(&path) {
                    None => return 2,
                    Some(cfg) => cfg.audit.hmac_key.clone(),
                },
            };
            crate::audit::cli_verify(&files, key.as_ref())
        }
        AuditCommand::Query {
            team,
            subject,
            operation,
            on_behalf_of,
            decision,
            code,
            status,
            since,
            until,
            external_id,
            candidate_id,
            format,
            files,
        } => {
            let time = |name: &str,
                        v: Option<String>|
             -> Result<Option<time::OffsetDateTime>, String> {
                v.map(|s| {
                    time::OffsetDateTime::parse(&s, &time::format_description::well_known::Rfc3339)
                        .map_err(|_| {
                            format!(
                                "--{name} must be an RFC 3339 time such as 2026-11-29T00:00:00Z"
                            )
                        })
                })
                .transpose()
            };
            let parsed = (|| -> Result<crate::audit::QueryFilter, String> {
                Ok(crate::audit::QueryFilter {
                    team,
                    subject,
                    operation,
                    on_behalf_of,
                    decision: decision.map(|d| d.parse()).transpose()?,
                    code,
                    status,
                    since: time("since", since)?,
                    until: time("until", until)?,
                    external_id,
                    candidate_id,
                })
            })();
            let table = match format.as_str() {
                "json" => false,
                "table" => true,
                _ => {
                    eprintln!("--format must be json or table");
                    return 2;
                }
            };
            match parsed {
                Ok(filter) => crate::audit::cli_query(&files, &filter, table),
                Err(e) => {
                    eprintln!("{e}");
                    2
                }
            }
        }
    }
}

fn load_or_print(path: &Path) -> Option<Config> {
    match config::load(path) {
        Ok(cfg) => {
            for w in &cfg.warnings {
                tracing::warn!("{w}");
            }
            Some(cfg)
        }
        Err(problems) => {
            eprintln!(
                "{} problem{} in the configuration:",
                problems.len(),
                if problems.len() == 1 { "" } else { "s" }
            );
            for p in problems {
                eprintln!("  {p}");
            }
            None
        }
    }
}

/// `check`: every problem (exit 1), or a summary table (exit 0) with the warnings, which
/// `strict` turns into problems (exit 1). The same findings as one JSON document with
/// [`CheckFormat::Json`] (see [`check_report`]).
pub fn check(path: &Path, strict: bool, format: CheckFormat) -> i32 {
    let loaded = config::load(path);
    let ok = match &loaded {
        Err(_) => false,
        Ok(cfg) => !strict || cfg.warnings.is_empty(),
    };
    match format {
        CheckFormat::Json => {
            let report = check_report(path, &loaded, strict);
            let mut json = serde_json::to_string_pretty(&report).unwrap_or_else(|_| "{}".into());
            json.push('\n');
            emit(&json);
        }
        CheckFormat::Text => match &loaded {
            Err(problems) => emit(&problems_text(problems, "")),
            Ok(cfg) if !ok => emit(&problems_text(
                &cfg.warnings,
                " (warnings, refused by --strict)",
            )),
            Ok(cfg) => emit(&summary(cfg)),
        },
    }
    if ok { 0 } else { 1 }
}

/// Writes a command's report to standard output. A reader that went away (`| head`) ends it
/// quietly; any other failure (a full disk) is said on stderr. Either way the exit code still
/// says what was found.
fn emit(text: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            eprintln!("the report could not be written to standard output: {e}");
        }
        _ => {}
    }
}

fn problems_text(problems: &[config::Problem], why: &str) -> String {
    use std::fmt::Write as _;
    let mut text = format!(
        "{} problem{} found{why}:\n",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for p in problems {
        let _ = writeln!(text, "  {p}");
    }
    text
}

/// The document `check --format json` prints. Field names are part of the contract (README,
/// "Checking a configuration in CI"): `ok` (the exit code is 0), `strict`, `config`, `problems`
/// and `warnings` (each `{file, key, message, severity}`; severity `error` for problems and for
/// warnings under `--strict`, else `warning`), and `summary` (`null` unless the configuration
/// loaded).
pub fn check_report(
    path: &Path,
    loaded: &Result<Config, Vec<config::Problem>>,
    strict: bool,
) -> serde_json::Value {
    use serde_json::{Value, json};
    let finding = |p: &config::Problem, severity: &str| {
        json!({
            "file": p.file.display().to_string(),
            "key": p.key,
            "message": p.message,
            "severity": severity,
        })
    };
    let (problems, warnings, summary) = match loaded {
        Err(problems) => (
            problems.iter().map(|p| finding(p, "error")).collect(),
            Vec::new(),
            Value::Null,
        ),
        Ok(cfg) => {
            let severity = if strict { "error" } else { "warning" };
            (
                Vec::new(),
                cfg.warnings.iter().map(|w| finding(w, severity)).collect(),
                summary_json(cfg),
            )
        }
    };
    let ok = problems.is_empty() && (!strict || warnings.is_empty());
    json!({
        "ok": ok,
        "strict": strict,
        "config": path.display().to_string(),
        "problems": problems,
        "warnings": warnings,
        "summary": summary,
    })
}

/// What the summary table says, as JSON.
fn summary_json(cfg: &Config) -> serde_json::Value {
    use serde_json::json;
    let limit = |l: &crate::quota::Limit| (l.rate.map(|r| r.to_string()), l.burst);
    let teams: Vec<serde_json::Value> = cfg
        .teams
        .iter()
        .map(|t| {
            let limits = cfg.quota.teams.get(&t.name);
            let (rate, burst) = limits.map(|l| limit(&l.limit)).unwrap_or_default();
            let operations: Vec<serde_json::Value> = t
                .operations
                .iter()
                .map(|op| {
                    let ol = limits.and_then(|l| l.operations.get(op));
                    let (rate, burst) = ol.map(|o| limit(&o.limit)).unwrap_or_default();
                    json!({"id": op, "rate": rate, "burst": burst, "daily": ol.and_then(|o| o.daily)})
                })
                .collect();
            json!({
                "name": t.name,
                "description": t.description,
                "credential": t.credential,
                "validation": t.validation.as_str(),
                "on_behalf_of": {
                    "default": t.on_behalf_of.default,
                    "allowed": t.on_behalf_of.allowed,
                    "from_claim": t.on_behalf_of.from_claim,
                },
                "quota": {
                    "rate": rate,
                    "burst": burst,
                    "concurrency": limits.and_then(|l| l.concurrency),
                    "daily": limits.and_then(|l| l.daily),
                },
                "operations": operations,
            })
        })
        .collect();
    let operations: Vec<serde_json::Value> = cfg
        .spec
        .operations()
        .iter()
        .map(|o| {
            let teams: Vec<&str> = cfg
                .teams
                .iter()
                .filter(|t| t.may_call(&o.id))
                .map(|t| t.name.as_str())
                .collect();
            json!({"id": o.id, "method": o.method.as_str(), "path": o.path, "teams": teams})
        })
        .collect();
    let credentials: Vec<serde_json::Value> = cfg
        .credentials
        .iter()
        .map(|(name, c)| json!({"name": name, "kind": c.kind()}))
        .collect();
    let (backend, key_prefix) = match &cfg.quota.backend {
        crate::quota::Backend::Memory => ("memory", None),
        crate::quota::Backend::Redis { key_prefix, .. } => ("redis", Some(key_prefix.clone())),
    };
    json!({
        "spec": {
            "title": cfg.spec.title,
            "version": cfg.spec.version,
        },
        "operations": operations,
        "teams": teams,
        "issuers": cfg.issuers.iter().map(|i| i.issuer.clone()).collect::<Vec<_>>(),
        "credentials": credentials,
        "quota": {
            "backend": backend,
            "key_prefix": key_prefix,
            "upstream_rate": cfg.quota.upstream.as_ref().map(|b| b.rate.to_string()),
            "upstream_max_wait_ms": cfg.quota.upstream.as_ref().map(|b| b.max_wait.as_millis() as u64),
        },
        "audit": {
            "path": cfg.audit.path.display().to_string(),
        },
    })
}

/// `check --explain`: loads the configuration as `check` does, resolves its policy without
/// starting anything, and prints the decision step by step.
async fn check_explain(path: &Path, args: ExplainArgs) -> i32 {
    let usage = |why: String| {
        eprintln!("check --explain: {why}");
        2
    };
    let Some(cfg) = load_or_print(path) else {
        return 1;
    };
    let Ok(method) = http::Method::from_bytes(args.method.to_ascii_uppercase().as_bytes()) else {
        return usage("--method is not an HTTP method".into());
    };
    let identity = match (&args.claims, &args.token_file) {
        (Some(json), None) => match serde_json::from_str::<serde_json::Value>(json) {
            Ok(serde_json::Value::Object(claims)) => crate::pipeline::Identity::Claims(claims),
            _ => return usage("--claims must be a JSON object".into()),
        },
        (None, Some(file)) => {
            let read = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())
            } else {
                std::fs::read_to_string(file)
            };
            match read {
                Ok(token) => crate::pipeline::Identity::Token(token.trim().to_string()),
                Err(e) => return usage(format!("cannot read {}: {e}", file.display())),
            }
        }
        _ => return usage("give the caller's --claims or a --token-file".into()),
    };
    let mut headers = http::HeaderMap::new();
    for h in &args.headers {
        let parsed = h.split_once(':').and_then(|(n, v)| {
            Some((
                http::HeaderName::from_bytes(n.trim().as_bytes()).ok()?,
                http::HeaderValue::from_str(v.trim()).ok()?,
            ))
        });
        match parsed {
            Some((n, v)) => {
                headers.append(n, v);
            }
            None => return usage("--header must be `Name: value`".into()),
        }
    }
    let body = match &args.body {
        None => bytes::Bytes::new(),
        Some(file) => match std::fs::read(file) {
            Ok(b) => {
                if !headers.contains_key(http::header::CONTENT_TYPE) {
                    headers.insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/json"),
                    );
                }
                bytes::Bytes::from(b)
            }
            Err(e) => return usage(format!("cannot read {}: {e}", file.display())),
        },
    };
    let policy = match crate::gateway::Policy::offline(cfg) {
        Ok(p) => p,
        Err(why) => {
            eprintln!("cannot resolve the policy: {why}");
            return 1;
        }
    };
    let explained = crate::pipeline::explain(
        &policy,
        crate::pipeline::Explain {
            method,
            target: args.path.unwrap_or_default(),
            headers,
            body,
            identity,
        },
    )
    .await;
    emit(&explained.render());
    if explained.code == crate::error::FORWARDED {
        0
    } else {
        3
    }
}

/// The table `check` prints for a clean configuration.
pub fn summary(cfg: &Config) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "configuration OK: {} ({} operations from \"{}\" {}), {} team(s), {} issuer(s), {} credential(s)",
        cfg.source.display(),
        cfg.spec.operations().len(),
        cfg.spec.title,
        cfg.spec.version,
        cfg.teams.len(),
        cfg.issuers.len(),
        cfg.credentials.len()
    );
    let mut rows = vec![[
        "TEAM".to_string(),
        "CREDENTIAL".into(),
        "ON-BEHALF-OF".into(),
        "VALIDATION".into(),
        "QUOTA".into(),
        "OPERATIONS".into(),
    ]];
    for t in cfg.teams.iter() {
        let obo = &t.on_behalf_of;
        let mut parts = Vec::new();
        if let Some(d) = &obo.default {
            parts.push(format!("default {d}"));
        }
        if !obo.allowed.is_empty() {
            parts.push(format!("{} allowed", obo.allowed.len()));
        }
        if let Some(c) = &obo.from_claim {
            parts.push(format!("claim {c}"));
        }
        let limits = cfg.quota.teams.get(&t.name);
        let ops: Vec<String> = t
            .operations
            .iter()
            .map(|op| match limits.and_then(|l| l.operations.get(op)) {
                Some(ol) => {
                    let mut q = Vec::new();
                    if let Some(r) = ol.limit.rate {
                        q.push(r.to_string());
                    }
                    if let Some(b) = ol.limit.burst {
                        q.push(format!("burst {b}"));
                    }
                    if let Some(d) = ol.daily {
                        q.push(format!("{d}/day"));
                    }
                    format!("{op} ({})", q.join(", "))
                }
                None => op.clone(),
            })
            .collect();
        let mut quota = Vec::new();
        if let Some(l) = limits {
            if let Some(r) = l.limit.rate {
                quota.push(r.to_string());
            }
            if let Some(b) = l.limit.burst {
                quota.push(format!("burst {b}"));
            }
            if let Some(c) = l.concurrency {
                quota.push(format!("{c} in flight"));
            }
            if let Some(d) = l.daily {
                quota.push(format!("{d}/day"));
            }
        }
        if quota.is_empty() {
            quota.push("unlimited".into());
        }
        rows.push([
            t.name.clone(),
            t.credential.clone(),
            parts.join(", "),
            t.validation.as_str().to_string(),
            quota.join(", "),
            ops.join(", "),
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    for r in &rows {
        let mut line = String::from(" ");
        for (i, cell) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(&format!(" {cell}"));
            } else {
                line.push_str(&format!(" {cell:w$} ", w = widths[i]));
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    let backend = match &cfg.quota.backend {
        crate::quota::Backend::Memory => "memory (per replica)".to_string(),
        crate::quota::Backend::Redis { key_prefix, .. } => {
            format!("redis (shared; keys {key_prefix}:*)")
        }
    };
    let budget = cfg.quota.upstream.as_ref().map_or("none".to_string(), |b| {
        format!("{} (wait up to {:?})", b.rate, b.max_wait)
    });
    let _ = writeln!(out, "quota backend: {backend}; Greenhouse budget: {budget}");
    let _ = writeln!(
        out,
        "audit: {} (fsync {:?}, on error {:?})",
        cfg.audit.path.display(),
        cfg.audit.fsync,
        cfg.audit.on_error
    );
    for (name, c) in &cfg.credentials {
        let _ = writeln!(out, "credential {name}: {}", c.kind());
    }
    for w in &cfg.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    out
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// SIGHUP would end the process by default; the sandbox has nothing to reload, so it says so.
fn ignore_sighup() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut hup) = signal(SignalKind::hangup()) {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    tracing::warn!("SIGHUP received: the sandbox has no configuration to reload");
                }
            });
        }
    }
}

/// SIGHUP reloads the configuration (`serve` and `dev`); the outcome is logged and counted.
fn reload_on_sighup(gateway: &std::sync::Arc<crate::gateway::Gateway>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut hup) = signal(SignalKind::hangup()) {
            let gateway = std::sync::Arc::downgrade(gateway);
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    let Some(gw) = gateway.upgrade() else { break };
                    tracing::info!("SIGHUP received: reloading the configuration");
                    let _ = gw.reload().await;
                }
            });
        }
    }
}

/// Span export, when `[tracing] otlp_endpoint` is set (read at start; a reload keeps it).
fn export_spans(cfg: &Config) -> Result<Option<crate::telemetry::Exporting>, String> {
    cfg.tracing
        .as_ref()
        .map(|t| crate::telemetry::install(t, cfg.upstream.ca_file.as_deref()))
        .transpose()
}

/// Which signal asked `serve` to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// SIGTERM: what orchestrators send; the drain window applies.
    Terminate,
    /// SIGINT (Ctrl-C): someone at a terminal; stops at once.
    Interrupt,
}

async fn stop_signal() -> Stop {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            return tokio::select! {
                _ = term.recv() => Stop::Terminate,
                _ = tokio::signal::ctrl_c() => Stop::Interrupt,
            };
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    Stop::Interrupt
}

/// After SIGTERM: `/readyz` answers 503 for `listen.drain` while both listeners keep serving,
/// so that load balancers take the replica out before its listeners close. A second SIGTERM or
/// SIGINT cuts the window short.
async fn drain(gateway: &crate::gateway::Gateway) {
    let window = gateway.policy().config.listen.drain;
    if window.is_zero() {
        return;
    }
    gateway.start_draining();
    tracing::info!(
        drain_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
        "SIGTERM received: /readyz answers 503 for the drain window; requests are still served"
    );
    tokio::select! {
        _ = tokio::time::sleep(window) => {}
        _ = shutdown_signal() => tracing::info!("second signal: drain window cut short"),
    }
}

async fn serve(cfg: Config) -> i32 {
    let spans = match export_spans(&cfg) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot start: tracing: {e}");
            return 1;
        }
    };
    match crate::server::start(cfg).await {
        Err(e) => {
            eprintln!("cannot start: {e}");
            1
        }
        Ok(running) => {
            reload_on_sighup(&running.gateway);
            if stop_signal().await == Stop::Terminate {
                drain(&running.gateway).await;
            }
            tracing::info!("shutting down: no new connections; waiting for in-flight requests");
            running.shutdown().await;
            if let Some(spans) = spans {
                spans.shutdown().await;
            }
            tracing::info!("stopped");
            0
        }
    }
}

async fn sandbox(listen: SocketAddr, opts: SandboxOptions) -> i32 {
    ignore_sighup();
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot bind {listen}: {e}");
            return 1;
        }
    };
    match Sandbox::spawn(listener, opts).await {
        Err(e) => {
            eprintln!("cannot start the sandbox: {e}");
            1
        }
        Ok(sb) => {
            println!("sandbox listening on http://{}", sb.addr());
            println!("  partner API   {}", sb.base_url());
            println!("  token URL     {}", sb.token_url());
            println!("  issuer        {}", sb.issuer());
            println!("  JWKS          {}", sb.jwks_url());
            println!(
                "  test hooks    http://{}/_sandbox/requests, /_sandbox/mint, /_sandbox/faults",
                sb.addr()
            );
            shutdown_signal().await;
            sb.shutdown();
            0
        }
    }
}

/// Options that make the sandbox accept exactly the credentials and issuer the config names.
pub fn sandbox_options_for(cfg: &Config) -> SandboxOptions {
    let mut opts = SandboxOptions {
        clients: Vec::new(),
        partner_keys: Vec::new(),
        ..SandboxOptions::default()
    };
    for c in cfg.credentials.values() {
        match c {
            CredentialSettings::OAuth2(o) => opts
                .clients
                .push((o.client_id.clone(), o.client_secret.expose().to_string())),
            CredentialSettings::Basic { api_key } => {
                opts.partner_keys.push(api_key.expose().to_string())
            }
        }
    }
    opts.issuer = cfg.issuers.first().map(|i| i.issuer.clone());
    opts
}

async fn dev(cfg: Config) -> i32 {
    let up = &cfg.upstream.base_url;
    let Some(sandbox_addr) = up
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
        .filter(|a| a.ip().is_loopback() && up.scheme_str() == Some("http"))
    else {
        eprintln!(
            "dev runs the sandbox where upstream.base_url points; it must be http://127.0.0.1:PORT/..."
        );
        return 1;
    };
    let listener = match tokio::net::TcpListener::bind(sandbox_addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot bind the sandbox on {sandbox_addr}: {e}");
            return 1;
        }
    };
    let sb = match Sandbox::spawn(listener, sandbox_options_for(&cfg)).await {
        Ok(sb) => sb,
        Err(e) => {
            eprintln!("cannot start the sandbox: {e}");
            return 1;
        }
    };
    let teams: Vec<crate::policy::Team> = cfg.teams.iter().cloned().collect();
    let audience = cfg
        .issuers
        .first()
        .and_then(|i| i.audiences.first().cloned())
        .unwrap_or_default();
    let spec = cfg.spec.clone();
    let spans = match export_spans(&cfg) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot start the gateway: tracing: {e}");
            return 1;
        }
    };
    let running = match crate::server::start(cfg).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the gateway: {e}");
            return 1;
        }
    };
    reload_on_sighup(&running.gateway);
    if tokio::time::timeout(Duration::from_secs(15), running.wait_ready())
        .await
        .is_err()
    {
        eprintln!(
            "the gateway did not become ready: {:?}",
            crate::admin::not_ready(&running.gateway)
        );
    }
    let config = running.gateway.policy().config.clone();
    let scheme = if config.listen.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let base = format!("{scheme}://{}{}", running.addr, config.upstream.prefix);
    println!("greenhouse-gateway dev playground");
    println!(
        "  gateway  {scheme}://{}   (admin http://{}/metrics)",
        running.addr, running.admin_addr
    );
    println!(
        "  sandbox  http://{}   (requests it received: http://{}/_sandbox/requests)",
        sb.addr(),
        sb.addr()
    );
    println!();
    for t in &teams {
        let claims = crate::dev::claims_for(t, &audience);
        let token = sb.mint_token(claims, Duration::from_secs(12 * 3600));
        let var = format!("{}_TOKEN", t.name.to_ascii_uppercase().replace('-', "_"));
        println!(
            "# team {}{}",
            t.name,
            t.description
                .as_deref()
                .map(|d| format!(": {d}"))
                .unwrap_or_default()
        );
        println!("export {var}='{token}'");
        for line in crate::dev::curl_lines(&spec, t, &base, &var) {
            println!("{line}");
        }
        println!();
    }
    println!("Ctrl-C stops both.");
    shutdown_signal().await;
    running.shutdown().await;
    if let Some(spans) = spans {
        spans.shutdown().await;
    }
    sb.shutdown();
    0
}
