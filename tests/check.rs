#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `greenhouse-gateway check`: configuration validation run through the real binary (and, where
//! the loaded model is the point, through `greenhouse_gateway::config::load`).
//!
//! Configs are written into temporary folders, except the many-mistakes config, which lives in
//! `tests/fixtures/broken/` so each planted mistake can be read next to its comment.

mod support;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use greenhouse_gateway::config::{self, CredentialSettings};
use tempfile::TempDir;

/// The unset variable the broken fixture names (it must stay unset for `check`).
const FIXTURE_UNSET_VAR: &str = "GHGW_CHECK_BROKEN_FIXTURE_UNSET_9D41";

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// What one `check` run printed and how it exited.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    fn problem_lines(&self) -> Vec<&str> {
        self.stdout
            .lines()
            .filter(|l| l.starts_with("  /"))
            .collect()
    }
}

fn check_with(config: &Path, prepare: impl FnOnce(&mut Command)) -> Run {
    let mut cmd = Command::new(support::binary());
    cmd.arg("check")
        .arg("--config")
        .arg(config)
        .env_remove(FIXTURE_UNSET_VAR);
    prepare(&mut cmd);
    let out = cmd.output().expect("run greenhouse-gateway check");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn check(config: &Path) -> Run {
    check_with(config, |_| {})
}

/// Asserts that one printed problem names `file` (a path suffix), `key` and contains `fragment`.
fn assert_problem(run: &Run, file: &str, key: &str, fragment: &str) {
    let head = if key.is_empty() {
        format!("/{file}: ")
    } else {
        format!("/{file}: {key}: ")
    };
    assert!(
        run.stdout
            .lines()
            .any(|l| l.contains(&head) && l.contains(fragment)),
        "no problem for {file} {key:?} containing {fragment:?} in:\n{}",
        run.all()
    );
}

/// Asserts that one printed `warning:` line names `file` (a path suffix), `key` and contains
/// `fragment`.
fn assert_warning(run: &Run, file: &str, key: &str, fragment: &str) {
    let head = format!("/{file}: {key}: ");
    assert!(
        run.stdout
            .lines()
            .any(|l| l.starts_with("warning: ") && l.contains(&head) && l.contains(fragment)),
        "no warning for {file} {key:?} containing {fragment:?} in:\n{}",
        run.all()
    );
}

/// The `warning:` lines that name `key` (after a file).
fn warnings_on<'a>(run: &'a Run, key: &str) -> Vec<&'a str> {
    let needle = format!(": {key}: ");
    run.stdout
        .lines()
        .filter(|l| l.starts_with("warning: ") && l.contains(&needle))
        .collect()
}

/// A valid gateway.toml whose upstream, token endpoint, issuer and JWKS all live at `origin`.
fn gateway(origin: &str) -> String {
    format!(
        r#"[listen]
addr = "127.0.0.1:18080"

[admin]
addr = "127.0.0.1:19090"

[upstream]
base_url = "{origin}/v1/partner"

[credentials.default]
kind = "oauth2_client_credentials"
token_url = "{origin}/oauth/token"
client_id = "gateway-test"
client_secret = {{ value = "test-client-secret" }}

[credentials.partner_key]
kind = "basic"
api_key = {{ value = "test-partner-key" }}

[[issuers]]
issuer = "{origin}"
audiences = ["greenhouse-gateway"]
jwks_url = "{origin}/.well-known/jwks.json"
algorithms = ["ES256"]
"#
    )
}

const ORIGIN: &str = "http://127.0.0.1:18089";

/// A valid team file (On-Behalf-Of comes from the caller's `email` claim).
fn team(name: &str, operations: &[&str], sub: &str) -> String {
    let ops: Vec<String> = operations.iter().map(|o| format!("{o:?}")).collect();
    format!(
        r#"name = "{name}"
operations = [{}]
credential = "default"

[[members]]
iss = "{ORIGIN}"
sub = "{sub}"

[on_behalf_of]
from_claim = "email"
"#,
        ops.join(", ")
    )
}

/// Writes `gateway.toml`, `teams/NAME.toml` for each team and any extra files into a new folder.
fn scenario(gateway_toml: &str, teams: &[(&str, String)], files: &[(&str, &str)]) -> TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("teams")).expect("teams dir");
    std::fs::write(dir.path().join("gateway.toml"), gateway_toml).expect("write gateway.toml");
    for (name, text) in teams {
        std::fs::write(dir.path().join("teams").join(format!("{name}.toml")), text)
            .expect("write team");
    }
    for (rel, text) in files {
        let path = dir.path().join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(path, text).expect("write file");
    }
    dir
}

fn one_team() -> Vec<(&'static str, String)> {
    vec![(
        "sourcing",
        team("sourcing", &["listPartnerJobs"], "svc-sourcing-*"),
    )]
}

// ---------------------------------------------------------------------------------------------
// 1. The shipped configuration
// ---------------------------------------------------------------------------------------------

#[test]
fn shipped_config_passes_and_summary_lists_every_team_credential_and_operation() {
    let policies = manifest_dir().join("policies");
    let run = check(&policies.join("gateway.toml"));
    assert_eq!(run.code, Some(0), "{}", run.all());
    assert!(
        run.stdout.starts_with("configuration OK: "),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains(", 3 team(s), "), "{}", run.stdout);
    assert!(
        run.stdout
            .contains("credential default: oauth2_client_credentials"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("credential partner_key: basic"),
        "{}",
        run.stdout
    );
    assert!(
        !run.stdout.contains("warning:"),
        "the shipped teams must not overlap:\n{}",
        run.stdout
    );

    // Each team's row: name, credential, ..., its operations (sorted), as its file says.
    let mut names = Vec::new();
    for entry in std::fs::read_dir(policies.join("teams")).expect("teams dir") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("read team");
        let file: toml::Table = toml::from_str(&text).expect("team toml");
        let name = file["name"].as_str().expect("name").to_string();
        let credential = file
            .get("credential")
            .and_then(|c| c.as_str())
            .unwrap_or("default");
        let mut ops: Vec<&str> = file["operations"]
            .as_array()
            .expect("ops")
            .iter()
            .filter_map(|o| o.as_str())
            .collect();
        ops.sort_unstable();
        let row = run
            .stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name.as_str()))
            .unwrap_or_else(|| panic!("no summary row for team {name}:\n{}", run.stdout));
        assert_eq!(row.split_whitespace().nth(1), Some(credential), "{row}");
        // Operations come last, in order, each possibly followed by its quota in parentheses.
        let listed: Vec<&str> = row.split([',', ' ']).filter(|w| ops.contains(w)).collect();
        assert_eq!(listed, ops, "row {row:?} should list {ops:?}");
        names.push(name);
    }
    names.sort();
    assert_eq!(names, ["agency", "reporting", "sourcing"]);
}

// ---------------------------------------------------------------------------------------------
// 2. Every problem at once, each with its file and key
// ---------------------------------------------------------------------------------------------

#[test]
fn broken_config_reports_every_problem_with_file_and_key_in_one_run() {
    let run = check(&manifest_dir().join("tests/fixtures/broken/gateway.toml"));
    assert_eq!(run.code, Some(1), "{}", run.all());

    let gw = "broken/gateway.toml";
    assert_problem(
        &run,
        gw,
        "admin.token",
        "required when admin.addr is not a loopback address",
    );
    assert_problem(&run, gw, "upstream.base_url", "must be https://");
    assert_problem(&run, gw, "upstream.timeout", "\"30\" has no unit");
    assert_problem(
        &run,
        gw,
        "credentials.default.client_secret",
        "exactly one of env, file or value",
    );
    assert_problem(
        &run,
        gw,
        "credentials.default.client_auth",
        "must be \"basic\" or \"post\"",
    );
    assert_problem(
        &run,
        gw,
        "credentials.partner_key.api_key",
        &format!("environment variable {FIXTURE_UNSET_VAR} is not set"),
    );
    assert_problem(
        &run,
        gw,
        "issuers[0].algorithms[0]",
        "HMAC algorithms are refused",
    );
    assert_problem(&run, gw, "issuers[1].algorithms[0]", "unknown algorithm");
    assert_problem(
        &run,
        gw,
        "issuers[1]",
        "needs exactly one of jwks_url or jwks_file",
    );

    let teams = "broken/teams";
    assert_problem(
        &run,
        &format!("{teams}/misnamed.toml"),
        "name",
        "must equal the file name (misnamed)",
    );
    assert_problem(
        &run,
        &format!("{teams}/unknown-op.toml"),
        "operations[1]",
        "unknown operation id \"deletePartnerEverything\"",
    );
    for known in [
        "listPartnerJobs",
        "createPartnerCandidate",
        "listPartnerCandidates",
        "createTrackingLink",
    ] {
        assert_problem(
            &run,
            &format!("{teams}/unknown-op.toml"),
            "operations[1]",
            known,
        );
    }
    assert_problem(
        &run,
        &format!("{teams}/no-credential.toml"),
        "credential",
        "no [credentials.missing]",
    );
    assert_problem(
        &run,
        &format!("{teams}/no-members.toml"),
        "members",
        "no [[members]] table",
    );
    assert_problem(
        &run,
        &format!("{teams}/empty-member.toml"),
        "members[0]",
        "would match every caller",
    );
    assert_problem(
        &run,
        &format!("{teams}/star-member.toml"),
        "members[0].sub",
        "more specific than a bare '*'",
    );
    assert_problem(
        &run,
        &format!("{teams}/bad-email.toml"),
        "on_behalf_of.default",
        "not a valid email address",
    );
    assert_problem(
        &run,
        &format!("{teams}/no-obo.toml"),
        "on_behalf_of",
        "needs a default, allowed users or from_claim",
    );
    // A team file that does not parse is reported alongside every other file's problems.
    assert_problem(
        &run,
        &format!("{teams}/typo.toml"),
        "",
        "unknown field `defualt`",
    );

    // Exactly the planted mistakes: nothing missing, nothing invented.
    assert!(
        run.stdout.starts_with("18 problems found:\n"),
        "{}",
        run.stdout
    );
    assert_eq!(run.problem_lines().len(), 18, "{}", run.stdout);
}

#[test]
fn connection_bounds_are_accepted_by_check() {
    let text = gateway(ORIGIN).replace(
        "addr = \"127.0.0.1:18080\"",
        "addr = \"127.0.0.1:18080\"\nidle_timeout = \"90s\"\nmax_connections = 2000\nmax_requests_in_flight = 500",
    );
    let dir = scenario(&text, &one_team(), &[]);
    let run = check(&dir.path().join("gateway.toml"));
    assert_eq!(run.code, Some(0), "{}", run.all());
}

#[test]
fn zero_connection_bounds_are_refused_naming_each_key() {
    let text = gateway(ORIGIN).replace(
        "addr = \"127.0.0.1:18080\"",
        "addr = \"127.0.0.1:18080\"\nidle_timeout = \"0s\"\nmax_connections = 0\nmax_requests_in_flight = 0",
    );
    let dir = scenario(&text, &one_team(), &[]);
    let run = check(&dir.path().join("gateway.toml"));
    assert_eq!(run.code, Some(1), "{}", run.all());
    assert_problem(
        &run,
        "gateway.toml",
        "listen.idle_timeout",
        "longer than zero",
    );
    assert_problem(
        &run,
        "gateway.toml",
        "listen.max_connections",
        "between 1 and",
    );
    assert_problem(
        &run,
        "gateway.toml",
        "listen.max_requests_in_flight",
        "between 1 and",
    );
}

#[test]
fn unknown_key_in_gateway_toml_is_refused_naming_file_and_key() {
    let text = gateway(ORIGIN).replace(
        "addr = \"127.0.0.1:18080\"",
        "addr = \"127.0.0.1:18080\"\nadress = \"127.0.0.1:8081\"",
    );
    let dir = scenario(&text, &one_team(), &[]);
    let run = check(&dir.path().join("gateway.toml"));
    assert_eq!(run.code, Some(1), "{}", run.all());
    assert_problem(&run, "gateway.toml", "", "unknown field `adress`");
    assert!(
        run.stdout.starts_with("1 problem found:\n"),
        "{}",
        run.stdout
    );
}

#[test]

fn unknown_key_problem_names_its_key_path() {
    let text = gateway(ORIGIN).replace(
        "addr = \"127.0.0.1:18080\"",
        "addr = \"127.0.0.1:18080\"\nadress = \"127.0.0.1:8081\"",
    );
    let dir = scenario(&text, &one_team(), &[]);
    let run = check(&dir.path().join("gateway.toml"));
    assert_eq!(run.code, Some(1), "{}", run.all());
    assert_problem(&run, "gateway.toml", "listen.adress", "unknown field");
}

// ---------------------------------------------------------------------------------------------
// 3. No network
// ---------------------------------------------------------------------------------------------

#[test]
fn check_touches_no_network_even_when_every_url_points_at_a_waiting_listener() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let origin = format!("http://{}", listener.local_addr().expect("addr"));
    // A second issuer on an unresolvable https host: fetching anything would fail the run.
    let text = format!(
        "{}\n[[issuers]]\nissuer = \"https://idp.invalid\"\naudiences = [\"gw\"]\njwks_url = \"https://idp.invalid/jwks.json\"\nalgorithms = [\"RS256\"]\n",
        gateway(&origin)
    );
    let dir = scenario(&text, &one_team(), &[]);

    let run = check(&dir.path().join("gateway.toml"));
    assert_eq!(run.code, Some(0), "{}", run.all());
    assert!(run.stdout.contains("2 issuer(s)"), "{}", run.stdout);
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Ok((_, peer)) => {
            panic!("check connected to the upstream/token/JWKS listener (from {peer})")
        }
        Err(e) => panic!("accept: {e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// 4. A custom spec
// ---------------------------------------------------------------------------------------------

const TINY_SPEC: &str = r##"openapi: 3.0.3
info: {title: Tiny Widgets, version: "0.1"}
paths:
  /widgets:
    get:
      operationId: listWidgets
      responses:
        "200":
          description: ok
          content:
            application/json:
              schema: {$ref: '#/components/schemas/Widgets'}
components:
  schemas:
    Widgets: {type: array, items: {type: string}}
"##;

fn with_spec(spec_file: &str) -> String {
    format!("spec = \"specs/{spec_file}\"\n{}", gateway(ORIGIN))
}

#[test]
fn custom_spec_is_used_instead_of_the_seed_spec() {
    let teams = [("widgets", team("widgets", &["listWidgets"], "svc-widgets"))];
    let dir = scenario(
        &with_spec("tiny.yml"),
        &teams,
        &[("specs/tiny.yml", TINY_SPEC)],
    );
    let run = check(&dir.path().join("gateway.toml"));
    assert_eq!(run.code, Some(0), "{}", run.all());
    assert!(
        run.stdout
            .contains("(1 operations from \"Tiny Widgets\" 0.1)"),
        "{}",
        run.stdout
    );
    let row = run
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("widgets "))
        .expect("widgets row");
    assert!(row.trim_end().ends_with("listWidgets"), "{row}");
}

#[test]
fn custom_spec_refuses_a_team_naming_an_operation_only_in_the_seed_spec() {
    let teams = [(
        "widgets",
        team(
            "widgets",
            &["listWidgets", "listPartnerJobs"],
            "svc-widgets",
        ),
    )];
    let dir = scenario(
        &with_spec("tiny.yml"),
        &teams,
        &[("specs/tiny.yml", TINY_SPEC)],
    );
    let run = check(&dir.path().join("gateway.toml"));
    assert_eq!(run.code, Some(1), "{}", run.all());
    assert_problem(
        &run,
        "teams/widgets.toml",
        "operations[1]",
        "unknown operation id \"listPartnerJobs\" (the spec has: listWidgets)",
    );
    assert_eq!(run.problem_lines().len(), 1, "{}", run.stdout);
}

#[test]
fn spec_with_dangling_ref_is_a_problem_naming_the_spec_file() {
    let broken = TINY_SPEC.replace("schemas/Widgets'", "schemas/Nope'");
    let teams = [("widgets", team("widgets", &["listWidgets"], "svc-widgets"))];
    let dir = scenario(
        &with_spec("dangling.yml"),
        &teams,
        &[("specs/dangling.yml", &broken)],
    );
    let run = check(&dir.path().join("gateway.toml"));
    assert_eq!(run.code, Some(1), "{}", run.all());
    assert_problem(
        &run,
        "specs/dangling.yml",
        "",
        "$ref #/components/schemas/Nope does not resolve",
    );
}

#[test]
fn missing_spec_file_is_a_problem_on_the_spec_key() {
    let dir = scenario(&with_spec("absent.yml"), &one_team(), &[]);
    let run = check(&dir.path().join("gateway.toml"));
    assert_eq!(run.code, Some(1), "{}", run.all());
    assert_problem(&run, "gateway.toml", "spec", "absent.yml");
}

/// `check` of the broken fixture in `format` with standard output going to `stdout`: exits 1 (its
/// finding) without a panic, whatever became of the report; its standard error.
fn check_broken_fixture_into(format: &str, stdout: std::process::Stdio) -> String {
    let out = Command::new(support::binary())
        .args(["check", "--format", format, "--config"])
        .arg(manifest_dir().join("tests/fixtures/broken/gateway.toml"))
        .env_remove(FIXTURE_UNSET_VAR)
        .stdout(stdout)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{format}: {stderr}");
    assert!(!stderr.contains("panicked"), "{format}: {stderr}");
    stderr
}

#[test]
fn check_into_a_closed_pipe_exits_with_its_finding_not_a_panic() {
    // `check ... | head -1`: the reader is gone before the report is written.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    for format in ["text", "json"] {
        let stderr = check_broken_fixture_into(format, writer.try_clone().unwrap().into());
        assert!(
            !stderr.contains("could not be written"),
            "{format}: {stderr}"
        );
    }
}

#[test]
fn check_onto_a_full_disk_says_so_on_stderr_and_keeps_its_exit_code() {
    // /dev/full refuses every write with ENOSPC: unlike a closed pipe, the report is lost.
    for format in ["text", "json"] {
        let full = std::fs::File::create("/dev/full").unwrap();
        let stderr = check_broken_fixture_into(format, full.into());
        assert!(
            stderr.contains("the report could not be written to standard output"),
            "{format}: {stderr}"
        );
    }
}

#[test]
fn broken_spec_still_reports_the_other_files_problems() {
    let broken = TINY_SPEC.replace("schemas/Widgets'", "schemas/Nope'");
    let text = with_spec("dangling.yml").replace("[upstream]\n", "[upstream]\ntimeout = \"30\"\n");
    let teams = [("widgets", team("widgets", &["listWidgets"], "*"))];
    let dir = scenario(&text, &teams, &[("specs/dangling.yml", &broken)]);
    let run = check(&dir.path().join("gateway.toml"));
    assert_eq!(run.code, Some(1), "{}", run.all());
    assert_problem(&run, "specs/dangling.yml", "", "does not resolve");
    assert_problem(&run, "gateway.toml", "upstream.timeout", "has no unit");
    assert_problem(&run, "teams/widgets.toml", "members[0].sub", "bare '*'");
}

// ---------------------------------------------------------------------------------------------
// 5. Overlapping teams
// ---------------------------------------------------------------------------------------------

#[test]
fn overlapping_teams_pass_with_a_warning_naming_both_and_the_alphabetical_winner() {
    let teams = [
        ("zeta", team("zeta", &["listPartnerJobs"], "svc-*")),
        ("alpha", team("alpha", &["listPartnerJobs"], "svc-a*")),
        (
            "reporting",
            team("reporting", &["listPartnerJobs"], "job-reporting"),
        ),
    ];
    let dir = scenario(&gateway(ORIGIN), &teams, &[]);
    let run = check(&dir.path().join("gateway.toml"));
    assert_eq!(run.code, Some(0), "{}", run.all());
    let warnings: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| l.starts_with("warning:") && l.contains("could also match"))
        .collect();
    assert_eq!(warnings.len(), 1, "{}", run.stdout);
    // Named at the losing team's file and table, with the winner's.
    assert_warning(
        &run,
        "teams/zeta.toml",
        "members[0]",
        "could also match members[0] of team alpha",
    );
    assert!(warnings[0].contains("teams/alpha.toml"), "{}", warnings[0]);
    assert!(warnings[0].contains("alpha wins"), "{}", warnings[0]);
}

// ---------------------------------------------------------------------------------------------
// 6. Secrets
// ---------------------------------------------------------------------------------------------

const CANARY: &str = "CANARY-5f0c2e-secret";

#[test]
fn secret_file_is_read_relative_to_the_config_folder_and_never_printed() {
    let text = gateway(ORIGIN).replace(
        "{ value = \"test-client-secret\" }",
        "{ file = \"secrets/client-secret.txt\" }",
    );
    let secret = format!("{CANARY}-file\n");
    let dir = scenario(
        &text,
        &one_team(),
        &[("secrets/client-secret.txt", &secret)],
    );
    let config_path = dir.path().join("gateway.toml");

    let cfg = config::load(&config_path).unwrap_or_else(|p| panic!("{p:?}"));
    match cfg.credentials.get("default") {
        Some(CredentialSettings::OAuth2(o)) => {
            assert_eq!(o.client_secret.expose(), format!("{CANARY}-file"))
        }
        other => panic!("unexpected credential {other:?}"),
    }

    // Run from an unrelated working directory: the path resolves against the config's folder.
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let run = check_with(&config_path, |c| {
        c.current_dir(elsewhere.path());
    });
    assert_eq!(run.code, Some(0), "{}", run.all());
    assert!(
        !run.all().contains(CANARY),
        "secret printed:\n{}",
        run.all()
    );
}

#[test]
fn missing_secret_file_is_a_problem_naming_the_key() {
    let text = gateway(ORIGIN).replace(
        "{ value = \"test-partner-key\" }",
        "{ file = \"secrets/absent.txt\" }",
    );
    let dir = scenario(&text, &one_team(), &[]);
    let run = check(&dir.path().join("gateway.toml"));
    assert_eq!(run.code, Some(1), "{}", run.all());
    assert_problem(
        &run,
        "gateway.toml",
        "credentials.partner_key.api_key",
        "cannot read secret file secrets/absent.txt",
    );
}

#[test]
fn secret_values_never_appear_in_check_output_even_beside_errors() {
    let env_var = "GHGW_CHECK_TEST_CANARY_SECRET_41B7";
    let bad_env_var = "GHGW_CHECK_TEST_CANARY_CONTROL_41B7";
    let text = gateway(ORIGIN)
        .replace(
            "addr = \"127.0.0.1:19090\"",
            &format!("addr = \"0.0.0.0:19090\"\ntoken = {{ env = \"{bad_env_var}\" }}"),
        )
        .replace(
            "{ value = \"test-client-secret\" }",
            "{ file = \"client-secret.txt\" }",
        )
        .replace(
            "{ value = \"test-partner-key\" }",
            &format!("{{ env = \"{env_var}\" }}"),
        )
        .replace("[upstream]\n", "[upstream]\ntimeout = \"soon\"\n")
        + &format!(
            "\n[credentials.dev]\nkind = \"basic\"\napi_key = {{ value = \"{CANARY}-value\\u0007\" }}\n\
             \n[credentials.both]\nkind = \"basic\"\napi_key = {{ env = \"{env_var}\", value = \"{CANARY}-both\" }}\n"
        );
    let file_secret = format!("{CANARY}-file\n");
    let dir = scenario(&text, &one_team(), &[("client-secret.txt", &file_secret)]);
    let run = check_with(&dir.path().join("gateway.toml"), |c| {
        c.env(env_var, format!("{CANARY}-env"))
            .env(bad_env_var, format!("{CANARY}-admin\nmore"));
    });
    assert_eq!(run.code, Some(1), "{}", run.all());
    assert_problem(&run, "gateway.toml", "upstream.timeout", "soon");
    assert_problem(&run, "gateway.toml", "admin.token", "control characters");
    assert_problem(
        &run,
        "gateway.toml",
        "credentials.dev.api_key",
        "control characters",
    );
    assert_problem(
        &run,
        "gateway.toml",
        "credentials.both.api_key",
        "exactly one of env, file or value",
    );
    assert!(
        !run.all().contains(CANARY),
        "secret printed:\n{}",
        run.all()
    );
}

#[test]
fn secret_written_as_a_bare_string_is_refused_without_echoing_it() {
    let text = gateway(ORIGIN).replace(
        "{ value = \"test-client-secret\" }",
        &format!("\"{CANARY}-bare\""),
    );
    let dir = scenario(&text, &one_team(), &[]);
    let run = check(&dir.path().join("gateway.toml"));
    assert_eq!(run.code, Some(1), "{}", run.all());
    assert_problem(&run, "gateway.toml", "", "");
    assert!(
        !run.all().contains(CANARY),
        "secret printed:\n{}",
        run.all()
    );
}

#[test]
fn spec_schema_that_cannot_compile_is_a_check_problem_not_a_runtime_error() {
    let broken = TINY_SPEC.replace(
        "items: {type: string}",
        "items: {type: string, pattern: '(unclosed'}",
    );
    let teams = [("widgets", team("widgets", &["listWidgets"], "svc-widgets"))];
    let dir = scenario(
        &with_spec("uncompilable.yml"),
        &teams,
        &[("specs/uncompilable.yml", &broken)],
    );
    let run = check(&dir.path().join("gateway.toml"));
    assert_eq!(run.code, Some(1), "{}", run.all());
    let line = run.problem_lines().into_iter().find(|l| {
        l.contains("uncompilable.yml")
            && l.contains("schema does not compile")
            && l.contains("listWidgets")
    });
    assert!(line.is_some(), "{}", run.stdout);
}

// ---------------------------------------------------------------------------------------------
// Messages that say what to do
// ---------------------------------------------------------------------------------------------

#[test]
fn a_literal_string_where_a_secret_goes_names_the_key_and_shows_what_a_secret_looks_like() {
    let text = gateway(ORIGIN).replace(
        "client_secret = { value = \"test-client-secret\" }",
        &format!("client_secret = \"{CANARY}-literal\""),
    );
    let dir = scenario(&text, &one_team(), &[]);
    let run = check(&dir.path().join("gateway.toml"));
    assert_eq!(run.code, Some(1), "{}", run.all());
    assert_problem(
        &run,
        "gateway.toml",
        "credentials.default.client_secret",
        "{ env = 'NAME' }",
    );
    assert!(!run.all().contains(CANARY), "{}", run.all());
    assert!(!run.all().contains("SecretFile"), "{}", run.all());
}

#[test]
fn unknown_keys_do_not_hide_the_files_other_problems() {
    let text = gateway(ORIGIN)
        .replace(
            "client_id = \"gateway-test\"",
            "client_id = \"gateway-test\"\nclient_sercet = 1",
        )
        .replace("[upstream]\n", "[upstream]\ntimeout = \"soon\"\n")
        + "\n[limits]\nmax_body_bytes = \"ten\"\n\n[bogus]\nx = 1\n";
    let mut teams = one_team();
    teams[0].1.push_str("\nmystery = true\n");
    let dir = scenario(&text, &teams, &[]);
    let run = check(&dir.path().join("gateway.toml"));
    assert_eq!(run.code, Some(1), "{}", run.all());
    assert_problem(
        &run,
        "gateway.toml",
        "credentials.default.client_sercet",
        "unknown field",
    );
    assert_problem(&run, "gateway.toml", "bogus", "unknown field");
    assert_problem(
        &run,
        "gateway.toml",
        "limits.max_body_bytes",
        "invalid type",
    );
    assert_problem(&run, "gateway.toml", "upstream.timeout", "soon");
    assert_problem(&run, "sourcing.toml", "", "mystery");
}

#[test]
fn an_admin_token_shorter_than_32_bytes_is_refused() {
    for (token, refused) in [("short-token", true), (&"x".repeat(32)[..], false)] {
        let text = gateway(ORIGIN).replace(
            "addr = \"127.0.0.1:19090\"",
            &format!("addr = \"127.0.0.1:19090\"\ntoken = {{ value = \"{token}\" }}"),
        );
        let dir = scenario(&text, &one_team(), &[]);
        let run = check(&dir.path().join("gateway.toml"));
        if refused {
            assert_eq!(run.code, Some(1), "{}", run.all());
            assert_problem(&run, "gateway.toml", "admin.token", "at least 32 bytes");
            assert!(!run.all().contains(token));
        } else {
            assert_eq!(run.code, Some(0), "{}", run.all());
        }
    }
}

#[test]
fn an_attachment_limit_whose_base64_cannot_fit_in_the_body_limit_is_refused() {
    let text =
        gateway(ORIGIN) + "\n[limits]\nmax_body_bytes = 1048576\nmax_attachment_bytes = 1048576\n";
    let dir = scenario(&text, &one_team(), &[]);
    let run = check(&dir.path().join("gateway.toml"));
    assert_eq!(run.code, Some(1), "{}", run.all());
    assert_problem(
        &run,
        "gateway.toml",
        "limits.max_attachment_bytes",
        "base64",
    );
}

#[test]
fn response_write_timeout_and_buffered_body_budget_are_accepted_and_bad_values_name_their_keys() {
    let with = |timeout: &str, budget: &str| {
        gateway(ORIGIN).replace(
            "addr = \"127.0.0.1:18080\"",
            &format!("addr = \"127.0.0.1:18080\"\nresponse_write_timeout = \"{timeout}\""),
        ) + &format!("\n[limits]\nmax_body_bytes = 1048576\nmax_buffered_body_bytes = {budget}\n")
    };
    let dir = scenario(&with("90s", "33554432"), &one_team(), &[]);
    let run = check(&dir.path().join("gateway.toml"));
    assert_eq!(run.code, Some(0), "{}", run.all());

    let dir = scenario(&with("0s", "1048575"), &one_team(), &[]);
    let run = check(&dir.path().join("gateway.toml"));
    assert_eq!(run.code, Some(1), "{}", run.all());
    assert_problem(
        &run,
        "gateway.toml",
        "listen.response_write_timeout",
        "longer than zero",
    );
    assert_problem(
        &run,
        "gateway.toml",
        "limits.max_buffered_body_bytes",
        "at least limits.max_body_bytes",
    );
}

#[test]
fn a_team_wide_daily_quota_is_accepted_and_zero_is_refused_naming_quota_daily() {
    for (daily, refused) in [("5000", false), ("0", true)] {
        let mut teams = one_team();
        teams[0]
            .1
            .push_str(&format!("\n[quota]\ndaily = {daily}\n"));
        let dir = scenario(&gateway(ORIGIN), &teams, &[]);
        let run = check(&dir.path().join("gateway.toml"));
        if refused {
            assert_eq!(run.code, Some(1), "{}", run.all());
            assert_problem(&run, "sourcing.toml", "quota.daily", "at least 1");
        } else {
            assert_eq!(run.code, Some(0), "daily = {daily}: {}", run.all());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The shipped production example
// ---------------------------------------------------------------------------------------------

/// The production example, relative to the repo root (its header's command names it so).
const PRODUCTION_EXAMPLE: &str = "policies/production/gateway.toml";

/// The command of the example's header comment, and the environment it sets: `NAME=value`
/// words, where `"$(openssl rand -hex N)"` stands for 2N hex digits.
fn header_command(config: &Path) -> (String, Vec<(String, String)>) {
    let text = std::fs::read_to_string(config).expect("read the production example");
    let header: Vec<&str> = text
        .lines()
        .take_while(|l| l.starts_with('#'))
        .map(|l| l.trim_start_matches('#').trim())
        .collect();
    let start = header
        .iter()
        .position(|l| l.split_whitespace().next().is_some_and(|w| w.contains('=')))
        .expect("the header sets environment variables");
    let end = start
        + header[start..]
            .iter()
            .position(|l| !l.ends_with('\\'))
            .expect("the header's command ends");
    let command = header[start..=end]
        .iter()
        .map(|l| l.trim_end_matches('\\').trim())
        .collect::<Vec<_>>()
        .join(" ");
    let mut env = Vec::new();
    let mut rest = command.as_str();
    while let Some(eq) = rest.find('=') {
        let name_start = rest[..eq].rfind(' ').map_or(0, |i| i + 1);
        let name = &rest[name_start..eq];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
            break; // `--config=...` or the like: the assignments are over
        }
        let after = &rest[eq + 1..];
        let (value, used) = match after.strip_prefix('"') {
            Some(quoted) => {
                let close = quoted.find('"').expect("closing quote");
                (&quoted[..close], close + 2)
            }
            None => {
                let end = after.find(' ').unwrap_or(after.len());
                (&after[..end], end)
            }
        };
        let value = match value.strip_prefix("$(openssl rand -hex ") {
            Some(n) => {
                let n: usize = n.trim_end_matches(')').parse().expect("a byte count");
                "5a".repeat(n)
            }
            None => {
                assert!(
                    !value.contains('$'),
                    "the header's {name} runs a command this test does not know: {value}"
                );
                value.to_string()
            }
        };
        env.push((name.to_string(), value));
        rest = &after[used..];
    }
    (command, env)
}

/// Secrets from a fixed environment (the one the example documents), files as they are.
struct DocumentedEnv(Vec<(String, String)>);

impl config::SecretSource for DocumentedEnv {
    fn env(&self, name: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    }
    fn read(&self, path: &Path) -> std::io::Result<String> {
        std::fs::read_to_string(path)
    }
}

#[test]
fn production_example_passes_check_with_exactly_the_env_its_header_documents() {
    let config = manifest_dir().join(PRODUCTION_EXAMPLE);
    let (command, env) = header_command(&config);
    // The header's command, as pasted from the repo root.
    assert!(
        command.ends_with(&format!(
            "cargo run --release -- check --config {PRODUCTION_EXAMPLE}"
        )),
        "{command}"
    );
    let names: Vec<&str> = env.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "GATEWAY_ADMIN_TOKEN",
            "GATEWAY_AUDIT_KEY",
            "GATEWAY_REDIS_URL",
            "GREENHOUSE_CLIENT_SECRET",
            "GREENHOUSE_PARTNER_API_KEY"
        ],
        "{command}"
    );

    // Nothing but the documented environment, from the repo root.
    let out = Command::new(support::binary())
        .current_dir(manifest_dir())
        .args(["check", "--config", PRODUCTION_EXAMPLE])
        .env_clear()
        .envs(env.iter().map(|(n, v)| (n, v)))
        .output()
        .expect("run check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("configuration OK: "), "{stdout}");
    assert!(
        stdout.contains(", 3 team(s), 1 issuer(s), 2 credential(s)"),
        "{stdout}"
    );
    assert!(stdout.contains("quota backend: redis (shared"), "{stdout}");
    assert!(
        stdout.contains("audit: /var/lib/greenhouse-gateway/audit/audit.jsonl "),
        "{stdout}"
    );
    assert!(!stdout.contains("warning:"), "{stdout}");
    for (_, value) in &env {
        assert!(
            !stdout.contains(value.as_str()),
            "check printed a secret:\n{stdout}"
        );
    }

    // Without one of them, check names it.
    let out = Command::new(support::binary())
        .current_dir(manifest_dir())
        .args(["check", "--config", PRODUCTION_EXAMPLE])
        .env_clear()
        .envs(
            env.iter()
                .filter(|(n, _)| n != "GATEWAY_REDIS_URL")
                .map(|(n, v)| (n, v)),
        )
        .output()
        .expect("run check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("quota.redis_url: environment variable GATEWAY_REDIS_URL is not set"),
        "{stdout}"
    );
}

#[test]
fn production_example_loads_its_own_teams_all_members_of_its_issuer_with_redis_and_a_keyed_audit_volume()
 {
    let config_path = manifest_dir().join(PRODUCTION_EXAMPLE);
    let (_, env) = header_command(&config_path);
    let cfg = config::load_with(&config_path, &DocumentedEnv(env))
        .unwrap_or_else(|p| panic!("the production example does not load: {p:#?}"));

    // The teams are the files of policies/production/teams/, nothing else.
    let mut stems: Vec<String> =
        std::fs::read_dir(manifest_dir().join("policies/production/teams"))
            .expect("policies/production/teams")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .map(|p| p.file_stem().expect("stem").to_string_lossy().into_owned())
            .collect();
    stems.sort();
    let names: Vec<String> = cfg.teams.iter().map(|t| t.name.clone()).collect();
    assert_eq!(names, stems);

    // Every member rule of every team names the configured issuer, so a token of that issuer can
    // match it (a rule naming another issuer would make every call unknown_team).
    let issuers: Vec<&str> = cfg.issuers.iter().map(|i| i.issuer.as_str()).collect();
    assert_eq!(issuers, ["https://idp.internal.example"]);
    for team in cfg.teams.iter() {
        assert!(
            !team.members.is_empty(),
            "team {} has no members",
            team.name
        );
        for rule in &team.members {
            let iss = rule
                .claims
                .iter()
                .find(|(claim, _)| claim == "iss")
                .map(|(_, glob)| glob)
                .unwrap_or_else(|| panic!("team {}: a member rule without iss", team.name));
            assert!(
                issuers.iter().any(|i| iss.matches(i)),
                "team {}: member iss {:?} is not the configured issuer {issuers:?}",
                team.name,
                iss.as_str()
            );
            // A token of that issuer whose other claims fit the rule is this team's.
            let mut claims = serde_json::Map::new();
            for (claim, glob) in &rule.claims {
                let value = if claim == "iss" {
                    issuers[0].to_string()
                } else {
                    glob.as_str().replace(['*', '?'], "x")
                };
                claims.insert(claim.clone(), serde_json::Value::String(value));
            }
            assert_eq!(
                cfg.teams.find(&claims).map(|t| t.name.as_str()),
                Some(team.name.as_str()),
                "{claims:?}"
            );
        }
        assert!(
            cfg.credentials.contains_key(&team.credential),
            "{}",
            team.name
        );
    }

    // Shared quotas, a keyed audit chain on the image's volume, a token for the off-loopback admin.
    assert!(
        matches!(
            cfg.quota.backend,
            greenhouse_gateway::quota::Backend::Redis { .. }
        ),
        "{:?}",
        cfg.quota.backend
    );
    assert!(
        cfg.audit
            .path
            .starts_with("/var/lib/greenhouse-gateway/audit"),
        "{}",
        cfg.audit.path.display()
    );
    assert!(cfg.audit.hmac_key.is_some());
    assert!(!cfg.admin.addr.ip().is_loopback());
    assert!(cfg.admin.token.is_some());
}

// ---------------------------------------------------------------------------------------------
// Warnings: each names its file and key and says what to do
// ---------------------------------------------------------------------------------------------

/// [`team`] with a rate and a concurrency cap.
fn limited_team(name: &str, operations: &[&str], sub: &str, rate: &str) -> String {
    format!(
        "{}\n[quota]\nrate = \"{rate}\"\nconcurrency = 2\n",
        team(name, operations, sub)
    )
}

#[test]
fn an_operation_no_team_may_call_is_a_warning_on_gateway_toml_teams_naming_it() {
    let dir = scenario(&gateway(ORIGIN), &one_team(), &[]);
    let run = check(&dir.path().join("gateway.toml"));
    assert_eq!(run.code, Some(0), "{}", run.all());
    assert_warning(
        &run,
        "gateway.toml",
        "teams",
        "operation createTrackingLink (POST /tracking_link) is in no team's `operations`",
    );
    assert_warning(
        &run,
        "gateway.toml",
        "teams",
        "add it to the operations of the team that needs it",
    );
    let uncallable = warnings_on(&run, "teams");
    assert_eq!(uncallable.len(), 5, "{}", run.stdout);
    assert!(
        uncallable
            .iter()
            .all(|w| !w.contains("operation listPartnerJobs ")),
        "{}",
        run.stdout
    );
}

#[test]
fn a_team_without_any_quota_is_a_warning_on_its_quota_key() {
    let teams = [
        ("open", team("open", &["listPartnerJobs"], "svc-open")),
        (
            "limited",
            limited_team("limited", &["listPartnerJobs"], "svc-limited", "2/s"),
        ),
        (
            "daily",
            format!(
                "{}\n[quota]\ndaily = 100\n",
                team("daily", &["listPartnerJobs"], "svc-daily")
            ),
        ),
    ];
    let dir = scenario(&gateway(ORIGIN), &teams, &[]);
    let run = check(&dir.path().join("gateway.toml"));
    assert_eq!(run.code, Some(0), "{}", run.all());
    assert_warning(
        &run,
        "teams/open.toml",
        "quota",
        "set at least quota.rate and quota.concurrency",
    );
    let quota = warnings_on(&run, "quota");
    assert_eq!(quota.len(), 1, "only the team without any limit: {quota:?}");
}

#[test]
fn an_on_behalf_of_default_outside_its_own_allowed_list_is_a_warning() {
    let obo = |name: &str, default: &str, allowed: &[&str]| {
        let allowed: Vec<String> = allowed
            .iter()
            .map(|a| format!("{:?}", support::email(a)))
            .collect();
        format!(
            "name = \"{name}\"\noperations = [\"listPartnerJobs\"]\n\n[[members]]\niss = \"{ORIGIN}\"\nsub = \"svc-{name}\"\n\n[on_behalf_of]\ndefault = {:?}\nallowed = [{}]\n\n[quota]\nrate = \"1/s\"\n",
            support::email(default),
            allowed.join(", ")
        )
    };
    let teams = [
        (
            "outside",
            obo(
                "outside",
                "bot(at)example.com",
                &["recruiter(at)example.com"],
            ),
        ),
        (
            "inside",
            obo(
                "inside",
                "bot(at)example.com",
                &["Bot(at)Example.com", "recruiter(at)example.com"],
            ),
        ),
        ("alone", obo("alone", "bot(at)example.com", &[])),
    ];
    let dir = scenario(&gateway(ORIGIN), &teams, &[]);
    let run = check(&dir.path().join("gateway.toml"));
    assert_eq!(run.code, Some(0), "{}", run.all());
    assert_warning(
        &run,
        "teams/outside.toml",
        "on_behalf_of.default",
        "is not in on_behalf_of.allowed",
    );
    assert_warning(
        &run,
        "teams/outside.toml",
        "on_behalf_of.default",
        "add the default to allowed",
    );
    assert_eq!(
        warnings_on(&run, "on_behalf_of.default").len(),
        1,
        "{}",
        run.stdout
    );
}

#[test]
fn inline_secrets_with_the_listener_off_loopback_are_a_warning_per_secret_key() {
    let public = gateway(ORIGIN).replace("addr = \"127.0.0.1:18080\"", "addr = \"0.0.0.0:18080\"");
    let dir = scenario(&public, &one_team(), &[]);
    let run = check(&dir.path().join("gateway.toml"));
    assert_eq!(run.code, Some(0), "{}", run.all());
    for key in [
        "credentials.default.client_secret",
        "credentials.partner_key.api_key",
    ] {
        assert_warning(
            &run,
            "gateway.toml",
            key,
            "listen.addr (0.0.0.0:18080) is not a loopback address",
        );
        assert_warning(&run, "gateway.toml", key, "{ env = \"NAME\" }");
    }
    assert!(!run.all().contains("test-client-secret"), "{}", run.all());

    // The same secrets on a loopback listener: development, no warning.
    let dir = scenario(&gateway(ORIGIN), &one_team(), &[]);
    let run = check(&dir.path().join("gateway.toml"));
    assert!(
        warnings_on(&run, "credentials.default.client_secret").is_empty(),
        "{}",
        run.stdout
    );
}

#[test]
fn issuer_refresh_interval_and_refetch_cooldown_out_of_bounds_are_warnings() {
    let issuer = |n: usize, refresh: &str, cooldown: &str| {
        format!(
            "\n[[issuers]]\nissuer = \"https://idp{n}.example\"\naudiences = [\"gw\"]\njwks_url = \"https://idp{n}.example/jwks.json\"\nalgorithms = [\"ES256\"]\nrefresh_interval = \"{refresh}\"\nrefetch_cooldown = \"{cooldown}\"\n"
        )
    };
    let text = gateway(ORIGIN)
        + &issuer(1, "5m", "30s") // sane
        + &issuer(2, "10s", "5s") // refresh too short
        + &issuer(3, "2h", "30s") // refresh too long
        + &issuer(4, "5m", "0s") // cooldown too short
        + &issuer(5, "5m", "10m"); // cooldown longer than refresh
    let dir = scenario(&text, &one_team(), &[]);
    let run = check(&dir.path().join("gateway.toml"));
    assert_eq!(run.code, Some(0), "{}", run.all());
    assert_warning(
        &run,
        "gateway.toml",
        "issuers[2].refresh_interval",
        "is 10s: the identity provider's keys would be fetched more often than once a minute",
    );
    assert_warning(
        &run,
        "gateway.toml",
        "issuers[3].refresh_interval",
        "use 1m..1h",
    );
    assert_warning(
        &run,
        "gateway.toml",
        "issuers[4].refetch_cooldown",
        "use at least 1s",
    );
    assert_warning(
        &run,
        "gateway.toml",
        "issuers[5].refetch_cooldown",
        "longer than refresh_interval (5m)",
    );
    for sane in ["issuers[0].", "issuers[1]."] {
        assert!(
            !run.stdout
                .lines()
                .any(|l| l.starts_with("warning:") && l.contains(sane)),
            "{sane}: {}",
            run.stdout
        );
    }
}

#[test]
fn a_credential_with_an_empty_scope_is_a_warning() {
    let text = gateway(ORIGIN).replace(
        "client_id = \"gateway-test\"",
        "client_id = \"gateway-test\"\nscope = \"\"",
    );
    let dir = scenario(&text, &one_team(), &[]);
    let run = check(&dir.path().join("gateway.toml"));
    assert_eq!(run.code, Some(0), "{}", run.all());
    assert_warning(
        &run,
        "gateway.toml",
        "credentials.default.scope",
        "is empty: the token request then asks for no scope",
    );
    assert_warning(
        &run,
        "gateway.toml",
        "credentials.default.scope",
        "or leave the key out",
    );
}

#[test]
fn a_member_iss_that_matches_no_configured_issuer_is_a_warning() {
    let other = team("other", &["listPartnerJobs"], "svc-other").replace(
        &format!("iss = \"{ORIGIN}\""),
        "iss = \"https://idp.elsewhere.example\"",
    );
    let glob = team("glob", &["listPartnerJobs"], "svc-glob").replace(
        &format!("iss = \"{ORIGIN}\""),
        "iss = \"http://127.0.0.1:*\"",
    );
    let dir = scenario(&gateway(ORIGIN), &[("other", other), ("glob", glob)], &[]);
    let run = check(&dir.path().join("gateway.toml"));
    assert_eq!(run.code, Some(0), "{}", run.all());
    assert_warning(
        &run,
        "teams/other.toml",
        "members[0].iss",
        &format!("matches no [[issuers]] issuer of gateway.toml ({ORIGIN})"),
    );
    assert_eq!(
        warnings_on(&run, "members[0].iss").len(),
        1,
        "a glob matching the issuer is fine: {}",
        run.stdout
    );
}

#[test]
fn team_rates_adding_up_to_more_than_the_upstream_budget_are_a_warning_on_upstream_rate() {
    let with_budget = |budget: &str| {
        gateway(ORIGIN).replace(
            "[upstream]\n",
            &format!("[upstream]\nrate = \"{budget}\"\n"),
        )
    };
    let teams = [
        (
            "alpha",
            limited_team("alpha", &["listPartnerJobs"], "svc-alpha", "6/s"),
        ),
        (
            "beta",
            limited_team("beta", &["listPartnerJobs"], "svc-beta", "60/m"),
        ),
    ];
    let dir = scenario(&with_budget("50/10s"), &teams, &[]);
    let run = check(&dir.path().join("gateway.toml"));
    assert_eq!(run.code, Some(0), "{}", run.all());
    assert_warning(
        &run,
        "gateway.toml",
        "upstream.rate",
        "the teams' rates add up to 7/s (alpha 6/s, beta 1/s), more than this shared Greenhouse budget of 50/10s (5/s)",
    );
    assert_warning(
        &run,
        "gateway.toml",
        "upstream.rate",
        "lower the teams' quota.rate",
    );

    // Exactly the budget is fine.
    let dir = scenario(&with_budget("7/s"), &teams, &[]);
    let run = check(&dir.path().join("gateway.toml"));
    assert!(
        warnings_on(&run, "upstream.rate").is_empty(),
        "{}",
        run.stdout
    );
}

#[test]
fn glob_characters_the_member_matcher_takes_literally_are_a_warning_naming_the_member_key() {
    let teams = [
        (
            "brackets",
            team("brackets", &["listPartnerJobs"], "svc-[ab]-*"),
        ),
        ("braces", team("braces", &["listPartnerJobs"], "svc-{x,y}")),
        ("plain", team("plain", &["listPartnerJobs"], "svc-plain-?")),
    ];
    let dir = scenario(&gateway(ORIGIN), &teams, &[]);
    let run = check(&dir.path().join("gateway.toml"));
    assert_eq!(run.code, Some(0), "{}", run.all());
    assert_warning(
        &run,
        "teams/brackets.toml",
        "members[0].sub",
        "contains '[', which the member matcher takes literally",
    );
    assert_warning(
        &run,
        "teams/braces.toml",
        "members[0].sub",
        "write one [[members]] table per value",
    );
    assert_eq!(
        warnings_on(&run, "members[0].sub").len(),
        2,
        "{}",
        run.stdout
    );
}

// ---------------------------------------------------------------------------------------------
// --strict and --format json
// ---------------------------------------------------------------------------------------------

/// A configuration without a single warning: the tiny spec's one operation, called by one team
/// that has a quota.
fn clean_scenario() -> TempDir {
    let teams = [(
        "widgets",
        limited_team("widgets", &["listWidgets"], "svc-widgets", "5/s"),
    )];
    scenario(
        &with_spec("tiny.yml"),
        &teams,
        &[("specs/tiny.yml", TINY_SPEC)],
    )
}

fn check_args(config: &Path, args: &[&str]) -> Run {
    check_with(config, |c| {
        c.args(args);
    })
}

#[test]
fn strict_exits_0_when_clean_1_on_warnings_and_1_on_problems() {
    let clean = clean_scenario();
    let run = check_args(&clean.path().join("gateway.toml"), &["--strict"]);
    assert_eq!(run.code, Some(0), "{}", run.all());
    assert!(
        run.stdout.starts_with("configuration OK: "),
        "{}",
        run.stdout
    );

    let warned = scenario(&gateway(ORIGIN), &one_team(), &[]);
    let config = warned.path().join("gateway.toml");
    assert_eq!(
        check(&config).code,
        Some(0),
        "warnings alone pass without --strict"
    );
    let run = check_args(&config, &["--strict"]);
    assert_eq!(run.code, Some(1), "{}", run.all());
    assert!(
        run.stdout
            .contains("problems found (warnings, refused by --strict):"),
        "{}",
        run.stdout
    );
    assert_problem(&run, "sourcing.toml", "quota", "the team has no quota");
    assert!(!run.stdout.contains("configuration OK"), "{}", run.stdout);

    let broken = scenario(
        &gateway(ORIGIN).replace("[upstream]\n", "[upstream]\ntimeout = \"30\"\n"),
        &one_team(),
        &[],
    );
    for args in [&[][..], &["--strict"][..]] {
        let run = check_args(&broken.path().join("gateway.toml"), args);
        assert_eq!(run.code, Some(1), "{args:?}: {}", run.all());
        assert_problem(&run, "gateway.toml", "upstream.timeout", "has no unit");
    }
}

fn json_of(run: &Run) -> serde_json::Value {
    serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("not one JSON document ({e}):\n{}", run.all()))
}

/// Every finding has exactly the documented fields.
fn assert_findings(list: &serde_json::Value, severity: &str) {
    for f in list.as_array().expect("an array") {
        let mut keys: Vec<&str> = f
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(keys, ["file", "key", "message", "severity"], "{f}");
        assert_eq!(f["severity"], severity, "{f}");
        assert!(f["file"].is_string() && f["key"].is_string() && f["message"].is_string());
    }
}

#[test]
fn format_json_prints_one_document_with_problems_warnings_and_summary() {
    // Clean: ok, no findings, the summary.
    let clean = clean_scenario();
    let run = check_args(&clean.path().join("gateway.toml"), &["--format", "json"]);
    assert_eq!(run.code, Some(0), "{}", run.all());
    let doc = json_of(&run);
    let mut top: Vec<&str> = doc
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    top.sort_unstable();
    assert_eq!(
        top,
        ["config", "ok", "problems", "strict", "summary", "warnings"]
    );
    assert_eq!(doc["ok"], true);
    assert_eq!(doc["strict"], false);
    assert_eq!(doc["problems"], serde_json::json!([]));
    assert_eq!(doc["warnings"], serde_json::json!([]));
    let summary = &doc["summary"];
    assert_eq!(summary["spec"]["title"], "Tiny Widgets");
    assert_eq!(summary["operations"][0]["id"], "listWidgets");
    assert_eq!(summary["operations"][0]["method"], "GET");
    assert_eq!(summary["operations"][0]["path"], "/widgets");
    assert_eq!(
        summary["operations"][0]["teams"],
        serde_json::json!(["widgets"])
    );
    let team = &summary["teams"][0];
    assert_eq!(team["name"], "widgets");
    assert_eq!(team["credential"], "default");
    assert_eq!(team["validation"], "enforce");
    assert_eq!(team["quota"]["rate"], "5/s");
    assert_eq!(team["quota"]["concurrency"], 2);
    assert_eq!(team["on_behalf_of"]["from_claim"], "email");
    assert_eq!(team["operations"][0]["id"], "listWidgets");
    assert_eq!(summary["issuers"], serde_json::json!([ORIGIN]));
    assert_eq!(summary["credentials"][1]["name"], "partner_key");
    assert_eq!(summary["credentials"][1]["kind"], "basic");
    assert_eq!(summary["quota"]["backend"], "memory");

    // Warnings: severity warning, ok; under --strict, severity error and not ok (exit 1).
    let warned = scenario(&gateway(ORIGIN), &one_team(), &[]);
    let config = warned.path().join("gateway.toml");
    let run = check_args(&config, &["--format", "json"]);
    assert_eq!(run.code, Some(0), "{}", run.all());
    let doc = json_of(&run);
    assert_eq!(doc["ok"], true);
    assert_findings(&doc["warnings"], "warning");
    let quota = doc["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["key"] == "quota")
        .unwrap_or_else(|| panic!("no quota warning: {doc}"));
    assert!(
        quota["file"]
            .as_str()
            .unwrap()
            .ends_with("teams/sourcing.toml"),
        "{quota}"
    );
    let run = check_args(&config, &["--format", "json", "--strict"]);
    assert_eq!(run.code, Some(1), "{}", run.all());
    let doc = json_of(&run);
    assert_eq!(doc["ok"], false);
    assert_eq!(doc["strict"], true);
    assert_findings(&doc["warnings"], "error");
    assert!(doc["summary"].is_object());

    // Problems: not ok, severity error, no summary (exit 1).
    let broken = scenario(
        &gateway(ORIGIN).replace("[upstream]\n", "[upstream]\ntimeout = \"30\"\n"),
        &one_team(),
        &[],
    );
    let run = check_args(&broken.path().join("gateway.toml"), &["--format", "json"]);
    assert_eq!(run.code, Some(1), "{}", run.all());
    let doc = json_of(&run);
    assert_eq!(doc["ok"], false);
    assert!(doc["summary"].is_null(), "{doc}");
    assert_findings(&doc["problems"], "error");
    let timeout = doc["problems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["key"] == "upstream.timeout")
        .unwrap_or_else(|| panic!("no upstream.timeout problem: {doc}"));
    assert!(
        timeout["file"].as_str().unwrap().ends_with("gateway.toml"),
        "{timeout}"
    );
}

// ---------------------------------------------------------------------------------------------
// The admin listener off loopback
// ---------------------------------------------------------------------------------------------

fn public_admin_config() -> TempDir {
    let text = gateway(ORIGIN)
        .replace("addr = \"127.0.0.1:18080\"", "addr = \"127.0.0.1:0\"")
        .replace("addr = \"127.0.0.1:19090\"", "addr = \"0.0.0.0:0\"");
    scenario(&text, &one_team(), &[])
}

#[test]
fn an_admin_listener_off_loopback_without_a_token_is_refused_by_check_naming_both_keys() {
    let dir = public_admin_config();
    let run = check(&dir.path().join("gateway.toml"));
    assert_eq!(run.code, Some(1), "{}", run.all());
    assert_problem(
        &run,
        "gateway.toml",
        "admin.token",
        "required when admin.addr is not a loopback address (it is 0.0.0.0:0)",
    );
    assert_problem(
        &run,
        "gateway.toml",
        "admin.token",
        "set admin.token = { env = \"GATEWAY_ADMIN_TOKEN\" }",
    );
    assert_problem(
        &run,
        "gateway.toml",
        "admin.token",
        "or bind admin.addr to 127.0.0.1",
    );

    // With a token it passes.
    let text = std::fs::read_to_string(dir.path().join("gateway.toml"))
        .unwrap()
        .replace(
            "addr = \"0.0.0.0:0\"",
            &format!(
                "addr = \"0.0.0.0:0\"\ntoken = {{ value = \"{}\" }}",
                "t".repeat(32)
            ),
        );
    std::fs::write(dir.path().join("gateway.toml"), text).unwrap();
    let run = check(&dir.path().join("gateway.toml"));
    assert_eq!(run.code, Some(0), "{}", run.all());
}

#[test]
fn serve_refuses_an_admin_listener_off_loopback_without_a_token_naming_both_keys() {
    let dir = public_admin_config();
    let mut child = Command::new(support::binary())
        .args(["serve", "--config"])
        .arg(dir.path().join("gateway.toml"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run serve");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let out = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let status = status.unwrap_or_else(|| {
        panic!("serve started with a public admin listener and no token:\n{stderr}")
    });
    assert_eq!(status.code(), Some(1), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.contains("admin.token: required when admin.addr is not a loopback address"))
        .unwrap_or_else(|| panic!("serve did not name admin.token and admin.addr:\n{stderr}"));
    assert!(line.contains("gateway.toml: admin.token"), "{line}");
    assert!(
        line.contains("(it is 0.0.0.0:0)") && line.contains("or bind admin.addr to 127.0.0.1"),
        "says what to do: {line}"
    );
}

#[test]
fn a_verified_token_cache_budget_is_accepted_zero_included_and_one_over_1_gib_is_refused() {
    for (value, ok) in [("0", true), ("4096", true), ("1073741825", false)] {
        let text = format!(
            "{}\n[limits]\nverified_token_cache_bytes = {value}\n",
            gateway(ORIGIN)
        );
        let dir = scenario(&text, &one_team(), &[]);
        let run = check(&dir.path().join("gateway.toml"));
        if ok {
            assert_eq!(run.code, Some(0), "{value}: {}", run.all());
        } else {
            assert_eq!(run.code, Some(1), "{value}: {}", run.all());
            assert_problem(
                &run,
                "gateway.toml",
                "limits.verified_token_cache_bytes",
                "at most",
            );
        }
    }
}
