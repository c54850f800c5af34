//! What `dev` prints: a token's claims for each team and curl lines that work as pasted.

use serde_json::{Map, Value, json};

use crate::policy::Team;
use crate::spec::Spec;

/// Claims that make a token a member of `team`: the first `[[members]]` table with each glob
/// filled in (`*` becomes `dev`, `?` becomes `x`).
pub fn claims_for(team: &Team, audience: &str) -> Value {
    let mut claims = Map::new();
    if let Some(rule) = team.members.first() {
        for (name, glob) in &rule.claims {
            let value = glob.as_str().replace('*', "dev").replace('?', "x");
            claims.insert(name.clone(), Value::String(value));
        }
    }
    claims
        .entry("sub")
        .or_insert_with(|| Value::String(format!("dev-{}", team.name)));
    claims.insert("aud".into(), Value::String(audience.to_string()));
    Value::Object(claims)
}

/// An example request body for operations that take one (keyed by operation id; the example
/// data is fictional).
pub fn example_body(operation_id: &str) -> Option<Value> {
    match operation_id {
        "createPartnerCandidate" => Some(json!({
            "external_id": "dev-candidate-1",
            "first_name": "Ada",
            "last_name": "Example",
            "emails": [{"value": "ada@example.com", "type": "personal"}],
            "application": {"job_id": 7001}
        })),
        "createTrackingLink" => Some(json!({"job_id": 7001, "external_id": "campaign-1"})),
        _ => None,
    }
}

fn example_query(operation_id: &str) -> Option<&'static str> {
    match operation_id {
        "listPartnerCandidates" => Some("external_ids=dev-candidate-1"),
        _ => None,
    }
}

/// One curl line per operation the team may call.
pub fn curl_lines(spec: &Spec, team: &Team, base: &str, token_var: &str) -> Vec<String> {
    let mut lines = Vec::new();
    for op in spec.operations().iter().filter(|o| team.may_call(&o.id)) {
        let mut url = format!("{base}{}", op.path);
        if let Some(q) = example_query(&op.id) {
            url.push('?');
            url.push_str(q);
        }
        let mut line = format!(
            "curl -sS -w '\\n' -X {} '{url}' -H \"Authorization: Bearer ${token_var}\"",
            op.method
        );
        if op.request_body.is_some() {
            let body = example_body(&op.id).unwrap_or_else(|| json!({}));
            line.push_str(&format!(" -H 'Content-Type: application/json' -d '{body}'"));
        }
        lines.push(format!("{line}   # {}", op.id));
    }
    if let Some(other) = team
        .on_behalf_of
        .allowed
        .iter()
        .find(|a| Some(*a) != team.on_behalf_of.default.as_ref())
        && let Some(op) = spec
            .operations()
            .iter()
            .find(|o| team.may_call(&o.id) && o.request_body.is_none())
    {
        lines.push(format!(
            "curl -sS -w '\\n' '{base}{}' -H \"Authorization: Bearer ${token_var}\" -H 'On-Behalf-Of: {other}'   # {} on behalf of an allowed user",
            op.path, op.id
        ));
    }
    lines
}
