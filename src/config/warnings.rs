//! Warnings: findings that do not stop the gateway but that a reviewer should see (`check`
//! prints them; `check --strict` refuses them). Pure: computed from the files as written and the
//! validated model, each naming its file and key and saying what to do.
//!
//! The bounds used here (documented in the README, "Checking a configuration in CI"):
//! - `issuers[].refresh_interval` between [`MIN_REFRESH`] and [`MAX_REFRESH`] (the range within
//!   which the gateway honours a JWKS `Cache-Control: max-age`); below it only for a `jwks_url`
//!   (re-reading a `jwks_file` costs nobody anything);
//! - `issuers[].refetch_cooldown` at least [`MIN_COOLDOWN`] for a `jwks_url`, and never longer than
//!   the refresh interval.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::file::{GatewayFile, SecretFile, TeamFile};
use super::validate::Problem;
use crate::auth::jwks::{IssuerConfig, KeySource, MAX_MAX_AGE, MIN_MAX_AGE};
use crate::policy::Teams;
use crate::quota::{TeamLimits, UpstreamBudget};
use crate::spec::Spec;
use crate::values::Rate;

/// Shortest background JWKS refresh `check` accepts without a warning.
pub const MIN_REFRESH: Duration = MIN_MAX_AGE;
/// Longest background JWKS refresh `check` accepts without a warning: a key withdrawn from the
/// JWKS stays trusted until the next refresh.
pub const MAX_REFRESH: Duration = MAX_MAX_AGE;
/// Shortest unknown-`kid` refetch cooldown `check` accepts without a warning.
pub const MIN_COOLDOWN: Duration = Duration::from_secs(1);

/// Characters other glob dialects give a meaning that the member matcher takes literally.
const LITERAL_GLOB_CHARS: [char; 4] = ['[', ']', '{', '}'];

/// Everything the warnings are computed from.
pub(super) struct Input<'a> {
    pub gateway_path: &'a Path,
    pub gw: &'a GatewayFile,
    pub listen_addr: SocketAddr,
    pub spec: &'a Spec,
    pub team_files: &'a [(PathBuf, TeamFile)],
    pub teams: &'a Teams,
    pub team_quotas: &'a BTreeMap<String, TeamLimits>,
    pub issuers: &'a [IssuerConfig],
    pub budget: Option<&'a UpstreamBudget>,
}

/// Every warning, gateway.toml's first, then each team's in the order teams are tried.
pub(super) fn collect(input: &Input<'_>) -> Vec<Problem> {
    let mut out = Vec::new();
    let gw_warn = |out: &mut Vec<Problem>, key: String, message: String| {
        out.push(Problem {
            file: input.gateway_path.to_path_buf(),
            key,
            message,
        })
    };
    inline_secrets(input, &mut |k, m| gw_warn(&mut out, k, m));
    empty_scopes(input, &mut |k, m| gw_warn(&mut out, k, m));
    issuer_timing(input, &mut |k, m| gw_warn(&mut out, k, m));
    rates_over_budget(input, &mut |k, m| gw_warn(&mut out, k, m));
    uncallable_operations(input, &mut |k, m| gw_warn(&mut out, k, m));
    for team in input.teams.iter() {
        let Some((path, file)) = input.team_files.iter().find(|(_, f)| f.name == team.name) else {
            continue;
        };
        let mut warn = |key: String, message: String| {
            out.push(Problem {
                file: path.clone(),
                key,
                message,
            })
        };
        overlaps_of(input, &team.name, &mut warn);
        member_rules(input, file, &mut warn);
        on_behalf_of_default(file, &mut warn);
        no_quota(input, &team.name, &mut warn);
    }
    out
}

type Warn<'w> = dyn FnMut(String, String) + 'w;

fn team_path<'a>(input: &'a Input<'_>, name: &str) -> Option<&'a Path> {
    input
        .team_files
        .iter()
        .find(|(_, f)| f.name == name)
        .map(|(p, _)| p.as_path())
}

/// Dev-only `{ value = "..." }` secrets while the gateway listens beyond this machine.
fn inline_secrets(input: &Input<'_>, warn: &mut Warn<'_>) {
    if input.listen_addr.ip().is_loopback() {
        return;
    }
    let gw = input.gw;
    let mut secrets: Vec<(String, &SecretFile)> = Vec::new();
    for (name, c) in &gw.credentials {
        if let Some(s) = &c.client_secret {
            secrets.push((format!("credentials.{name}.client_secret"), s));
        }
        if let Some(s) = &c.api_key {
            secrets.push((format!("credentials.{name}.api_key"), s));
        }
    }
    if let Some(s) = &gw.admin.token {
        secrets.push(("admin.token".into(), s));
    }
    if let Some(s) = &gw.quota.redis_url {
        secrets.push(("quota.redis_url".into(), s));
    }
    if let Some(s) = &gw.audit.hmac_key {
        secrets.push(("audit.hmac_key".into(), s));
    }
    for (key, s) in secrets {
        if s.value.is_some() {
            warn(
                key,
                format!(
                    "is an inline {{ value = \"...\" }} secret, meant for development, but listen.addr ({}) is not a loopback address: \
                     take it from the environment ({{ env = \"NAME\" }}) or a mounted file ({{ file = \"path\" }}) and keep it out of the file",
                    input.listen_addr
                ),
            );
        }
    }
}

/// `scope = ""`: the token request asks for no scope at all.
fn empty_scopes(input: &Input<'_>, warn: &mut Warn<'_>) {
    for (name, c) in &input.gw.credentials {
        if c.scope.as_deref().is_some_and(|s| s.trim().is_empty()) {
            warn(
                format!("credentials.{name}.scope"),
                "is empty: the token request then asks for no scope (`scope=`), and the token endpoint may grant one that can do nothing; \
                 name the scopes the teams need, space-separated (for example \"candidates.create candidates.view jobs.view\"), or leave the key out"
                    .into(),
            );
        }
    }
}

/// `refresh_interval` and `refetch_cooldown` outside the bounds in the module documentation.
fn issuer_timing(input: &Input<'_>, warn: &mut Warn<'_>) {
    for (i, iss) in input.issuers.iter().enumerate() {
        let key = format!("issuers[{i}]");
        let url = matches!(iss.keys, KeySource::Url(_));
        let refresh = iss.refresh_interval;
        let cooldown = iss.refetch_cooldown;
        if url && refresh < MIN_REFRESH {
            warn(
                format!("{key}.refresh_interval"),
                format!(
                    "is {}: the identity provider's keys would be fetched more often than once a minute by every replica \
                     (the gateway never honours a Cache-Control max-age below 1m either); use 1m..1h (default 5m)",
                    human(refresh)
                ),
            );
        }
        if refresh > MAX_REFRESH {
            warn(
                format!("{key}.refresh_interval"),
                format!(
                    "is {}: a key withdrawn from the JWKS (a leaked key, say) stays trusted until the next refresh, up to that long; \
                     use 1m..1h (default 5m)",
                    human(refresh)
                ),
            );
        }
        if url && cooldown < MIN_COOLDOWN {
            warn(
                format!("{key}.refetch_cooldown"),
                format!(
                    "is {}: every token naming a made-up key id could make the gateway fetch the identity provider's keys again; \
                     use at least 1s (default 30s)",
                    human(cooldown)
                ),
            );
        }
        if cooldown > refresh {
            warn(
                format!("{key}.refetch_cooldown"),
                format!(
                    "is {}, longer than refresh_interval ({}): a token signed with a newly published key may be refused until the next \
                     background refresh, and the cooldown limits nothing the refresh does not; keep it at most refresh_interval (default 30s)",
                    human(cooldown),
                    human(refresh)
                ),
            );
        }
    }
}

/// Requests per second of a rate.
fn per_second(rate: &Rate) -> f64 {
    f64::from(rate.count) / rate.per.as_secs_f64()
}

/// A team's sustained ceiling: its own rate, else the sum of its operations' rates when every
/// operation it may call has one; `None` when it has no rate ceiling.
fn team_ceiling(input: &Input<'_>, name: &str) -> Option<f64> {
    let limits = input.team_quotas.get(name)?;
    if let Some(rate) = &limits.limit.rate {
        return Some(per_second(rate));
    }
    let team = input.teams.iter().find(|t| t.name == name)?;
    let mut sum = 0.0;
    for op in &team.operations {
        sum += per_second(limits.operations.get(op)?.limit.rate.as_ref()?);
    }
    Some(sum)
}

/// Team rates that together exceed `upstream.rate`.
fn rates_over_budget(input: &Input<'_>, warn: &mut Warn<'_>) {
    let Some(budget) = input.budget else { return };
    let budget_per_s = per_second(&budget.rate);
    let mut parts = Vec::new();
    let mut total = 0.0;
    for team in input.teams.iter() {
        if let Some(r) = team_ceiling(input, &team.name) {
            total += r;
            parts.push(format!("{} {}/s", team.name, number(r)));
        }
    }
    if total > budget_per_s * (1.0 + 1e-9) {
        warn(
            "upstream.rate".into(),
            format!(
                "the teams' rates add up to {}/s ({}), more than this shared Greenhouse budget of {} ({}/s): when they are busy together, \
                 callers wait up to upstream.max_wait and then get 503 upstream_rate_limited instead of their own team's 429; \
                 lower the teams' quota.rate so they add up to at most {}/s, or raise upstream.rate if your Greenhouse account allows more",
                number(total),
                parts.join(", "),
                budget.rate,
                number(budget_per_s),
                number(budget_per_s)
            ),
        );
    }
}

/// Operations of the spec that no team lists.
fn uncallable_operations(input: &Input<'_>, warn: &mut Warn<'_>) {
    for op in input.spec.operations() {
        if !input.teams.iter().any(|t| t.may_call(&op.id)) {
            warn(
                "teams".into(),
                format!(
                    "operation {} ({} {}) is in no team's `operations`, so every call to it is refused with 403 operation_not_allowed; \
                     add it to the operations of the team that needs it, or point `spec` at a document without it",
                    op.id, op.method, op.path
                ),
            );
        }
    }
}

/// The tables of this team that a token could match together with a table of a team tried
/// before it (which then wins).
fn overlaps_of(input: &Input<'_>, name: &str, warn: &mut Warn<'_>) {
    for o in input.teams.overlapping_rules() {
        if o.second.name != name {
            continue;
        }
        let first_file = team_path(input, &o.first.name)
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        warn(
            format!("members[{}]", o.second_rule),
            format!(
                "a caller matching this table could also match members[{}] of team {} ({first_file}); {} wins (teams are tried \
                 in alphabetical order of name), so such a caller is never {}'s: make the two tables' patterns disjoint",
                o.first_rule, o.first.name, o.first.name, o.second.name
            ),
        );
    }
}

/// `[[members]]` tables naming an unknown issuer, or patterns with characters taken literally.
fn member_rules(input: &Input<'_>, file: &TeamFile, warn: &mut Warn<'_>) {
    for (i, rule) in file.members.iter().enumerate() {
        for (claim, pattern) in rule {
            let key = format!("members[{i}].{claim}");
            if claim == "iss" {
                let glob = crate::policy::Glob::new(pattern.clone());
                if !input.issuers.iter().any(|iss| glob.matches(&iss.issuer)) {
                    let known: Vec<&str> =
                        input.issuers.iter().map(|i| i.issuer.as_str()).collect();
                    warn(
                        key.clone(),
                        format!(
                            "matches no [[issuers]] issuer of gateway.toml ({}): only those issuers' tokens are accepted, so this table \
                             can never match; use one of them, or add the issuer to gateway.toml",
                            known.join(", ")
                        ),
                    );
                }
            }
            if let Some(c) = pattern.chars().find(|c| LITERAL_GLOB_CHARS.contains(c)) {
                warn(
                    key,
                    format!(
                        "contains '{c}', which the member matcher takes literally (its only wildcards are * for any run of characters \
                         and ? for one): for alternatives write one [[members]] table per value; a claim value with a real '{c}' is fine"
                    ),
                );
            }
        }
    }
}

/// A default outside the team's own non-empty `allowed` list.
fn on_behalf_of_default(file: &TeamFile, warn: &mut Warn<'_>) {
    let obo = &file.on_behalf_of;
    let Some(default) = &obo.default else { return };
    if obo.allowed.is_empty() || obo.allowed.iter().any(|a| a.eq_ignore_ascii_case(default)) {
        return;
    }
    warn(
        "on_behalf_of.default".into(),
        "is not in on_behalf_of.allowed: the team still acts on its behalf (whenever a caller names no one, and a caller may name it), \
         so the allowed list does not show everyone the team may act for; add the default to allowed"
            .into(),
    );
}

/// A team with no rate, burst, concurrency or daily limit at all.
fn no_quota(input: &Input<'_>, name: &str, warn: &mut Warn<'_>) {
    let unlimited = input.team_quotas.get(name).is_none_or(|l| {
        l.limit.rate.is_none()
            && l.limit.burst.is_none()
            && l.concurrency.is_none()
            && l.daily.is_none()
            && l.operations.is_empty()
    });
    if unlimited {
        warn(
            "quota".into(),
            "the team has no quota (no rate, concurrency or daily limit): one runaway caller can use up the Greenhouse budget \
             every team shares; set at least quota.rate and quota.concurrency"
                .into(),
        );
    }
}

/// A duration as the config writes it, where it is whole (`"90s"`, `"5m"`), else in ms.
fn human(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0 => "0s".into(),
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1_000 == 0 => format!("{}s", ms / 1_000),
        ms => format!("{ms}ms"),
    }
}

/// A rate per second with at most two decimals and no trailing zeros.
fn number(x: f64) -> String {
    let s = format!("{x:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_durations_print_as_written_in_config() {
        assert_eq!(number(27.0), "27");
        assert_eq!(number(0.5), "0.5");
        assert_eq!(number(5.0 / 3.0), "1.67");
        assert_eq!(human(Duration::from_secs(300)), "5m");
        assert_eq!(human(Duration::from_secs(7200)), "2h");
        assert_eq!(human(Duration::from_millis(1500)), "1500ms");
        assert_eq!(human(Duration::from_secs(30)), "30s");
    }
}
