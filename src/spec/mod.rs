//! The OpenAPI document turned, once at load, into a route table: operations with their method,
//! path template, parameters and (`$ref`-resolved) schemas. Nothing else in the gateway names a
//! Greenhouse path.

use std::collections::BTreeMap;

use http::Method;
use serde_json::Value;

/// The seed spec, built into the binary as the default.
pub const BUILTIN_SPEC: &str = include_str!("../../policies/greenhouse-partner.openapi.yml");

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];
const MAX_REF_DEPTH: usize = 32;

/// Where a parameter lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamIn {
    Query,
    Header,
    Path,
    Cookie,
}

#[derive(Debug, Clone)]
pub struct Parameter {
    pub name: String,
    pub location: ParamIn,
    pub required: bool,
    pub style: Option<String>,
    pub explode: Option<bool>,
    pub schema: Value,
}

#[derive(Debug, Clone)]
pub struct RequestBody {
    pub required: bool,
    /// Media type to resolved schema.
    pub content: BTreeMap<String, Value>,
}

#[derive(Debug, Clone)]
pub struct Operation {
    pub id: String,
    pub method: Method,
    /// The template as written in the spec, for example `/candidates`.
    pub path: String,
    segments: Vec<Segment>,
    pub parameters: Vec<Parameter>,
    pub request_body: Option<RequestBody>,
    /// Status (or `default`) to resolved schema of the JSON response, when documented.
    pub responses: BTreeMap<String, Option<Value>>,
}

impl Operation {
    pub fn query_params(&self) -> impl Iterator<Item = &Parameter> {
        self.parameters
            .iter()
            .filter(|p| p.location == ParamIn::Query)
    }

    pub fn declares_query(&self, name: &str) -> bool {
        self.query_params().any(|p| p.name == name)
    }

    /// Whether a path's segments (relative to the prefix, split at `/`) match this template.
    fn fits(&self, parts: &[&str]) -> bool {
        self.segments.len() == parts.len()
            && self.segments.iter().zip(parts).all(|(s, p)| match s {
                Segment::Literal(l) => l == p,
                Segment::Param => !p.is_empty(),
            })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param,
}

/// The result of looking a request up.
#[derive(Debug)]
pub enum RouteMatch<'a> {
    /// The operation and its position in [`Spec::operations`].
    Found {
        index: usize,
        op: &'a Operation,
    },
    MethodNotAllowed(Vec<Method>),
    NotFound,
}

/// The compiled spec.
#[derive(Debug, Clone)]
pub struct Spec {
    pub title: String,
    pub version: String,
    operations: Vec<Operation>,
}

impl Spec {
    /// Parses and compiles an OpenAPI 3.x document (YAML or JSON). Reports every problem found.
    pub fn from_text(text: &str) -> Result<Spec, Vec<String>> {
        let doc: Value = serde_yaml_ng::from_str(text)
            .map_err(|e| vec![format!("not valid YAML or JSON: {e}")])?;
        Spec::from_value(&doc)
    }

    pub fn builtin() -> Result<Spec, Vec<String>> {
        Spec::from_text(BUILTIN_SPEC)
    }

    pub fn from_value(doc: &Value) -> Result<Spec, Vec<String>> {
        let mut problems = Vec::new();
        match doc.get("openapi").and_then(Value::as_str) {
            Some(v) if v.starts_with("3.") => {}
            _ => problems.push("`openapi` must be a 3.x version string".to_string()),
        }
        let title = doc
            .pointer("/info/title")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let version = doc
            .pointer("/info/version")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let Some(paths) = doc.get("paths").and_then(Value::as_object) else {
            problems.push("`paths` is missing or not a mapping".to_string());
            return Err(problems);
        };
        let mut operations = Vec::new();
        for (path, item) in paths {
            let at = format!("paths.{path}");
            if !path.starts_with('/') {
                problems.push(format!("{at}: a path must start with '/'"));
                continue;
            }
            let item = match resolve(doc, item, 0) {
                Ok(v) => v,
                Err(e) => {
                    problems.push(format!("{at}: {e}"));
                    continue;
                }
            };
            let shared = item
                .get("parameters")
                .cloned()
                .unwrap_or(Value::Array(vec![]));
            for m in METHODS {
                let Some(op) = item.get(m) else { continue };
                let at = format!("{at}.{m}");
                match compile_operation(doc, path, m, op, &shared) {
                    Ok(op) => operations.push(op),
                    Err(mut e) => problems.extend(e.drain(..).map(|p| format!("{at}: {p}"))),
                }
            }
        }
        let mut seen = BTreeMap::new();
        for op in &operations {
            if let Some(prev) = seen.insert(op.id.clone(), op.path.clone()) {
                problems.push(format!(
                    "operationId {} is used twice ({} and {})",
                    op.id, prev, op.path
                ));
            }
        }
        if operations.is_empty() && problems.is_empty() {
            problems.push("the spec has no operations".to_string());
        }
        if problems.is_empty() {
            Ok(Spec {
                title,
                version,
                operations,
            })
        } else {
            Err(problems)
        }
    }

    pub fn operations(&self) -> &[Operation] {
        &self.operations
    }

    pub fn operation(&self, id: &str) -> Option<&Operation> {
        self.operations.iter().find(|o| o.id == id)
    }

    /// A form of a path (relative to the prefix) that cannot carry a value, for the audit trail
    /// and logs: the template of the operation it matches (whatever the method), or else each
    /// segment that is literally a segment of some template, with every other segment `*`.
    pub fn redacted_path(&self, path: &str) -> String {
        let parts: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
        if let Some(op) = self.operations.iter().find(|op| op.fits(&parts)) {
            return op.path.clone();
        }
        let known = |p: &str| {
            self.operations.iter().any(|op| {
                op.segments
                    .iter()
                    .any(|s| matches!(s, Segment::Literal(l) if l == p))
            })
        };
        let mut out = String::with_capacity(path.len());
        for p in parts {
            out.push('/');
            out.push_str(if p.is_empty() || known(p) { p } else { "*" });
        }
        out
    }

    /// Finds the operation for a method and a path relative to the prefix (`/candidates`).
    pub fn route(&self, method: &Method, path: &str) -> RouteMatch<'_> {
        let parts: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
        let mut allow = Vec::new();
        for (index, op) in self.operations.iter().enumerate() {
            if !op.fits(&parts) {
                continue;
            }
            if op.method == *method {
                return RouteMatch::Found { index, op };
            }
            allow.push(op.method.clone());
        }
        if allow.is_empty() {
            RouteMatch::NotFound
        } else {
            allow.sort_by(|a, b| a.as_str().cmp(b.as_str()));
            allow.dedup();
            RouteMatch::MethodNotAllowed(allow)
        }
    }
}

fn compile_operation(
    doc: &Value,
    path: &str,
    method: &str,
    op: &Value,
    shared: &Value,
) -> Result<Operation, Vec<String>> {
    let mut problems = Vec::new();
    let id = match op.get("operationId").and_then(Value::as_str) {
        Some(id) if !id.is_empty() => id.to_string(),
        _ => {
            problems.push("operationId is missing".to_string());
            String::new()
        }
    };
    let method_parsed =
        Method::from_bytes(method.to_ascii_uppercase().as_bytes()).unwrap_or(Method::GET);
    let segments = path
        .trim_start_matches('/')
        .split('/')
        .map(|s| {
            if s.starts_with('{') && s.ends_with('}') {
                Segment::Param
            } else {
                Segment::Literal(s.to_string())
            }
        })
        .collect();
    let mut parameters: Vec<Parameter> = Vec::new();
    let own = op
        .get("parameters")
        .cloned()
        .unwrap_or(Value::Array(vec![]));
    for list in [shared, &own] {
        let Some(items) = list.as_array() else {
            problems.push("parameters must be a list".to_string());
            continue;
        };
        for (i, p) in items.iter().enumerate() {
            match compile_parameter(doc, p) {
                // An operation-level parameter overrides a path-level one of the same name and place.
                Ok(param) => {
                    parameters.retain(|q| !(q.name == param.name && q.location == param.location));
                    parameters.push(param);
                }
                Err(e) => problems.push(format!("parameters[{i}]: {e}")),
            }
        }
    }
    let request_body = match op.get("requestBody") {
        None => None,
        Some(rb) => match resolve(doc, rb, 0) {
            Ok(rb) => {
                let mut content = BTreeMap::new();
                if let Some(c) = rb.get("content").and_then(Value::as_object) {
                    for (mt, media) in c {
                        match media.get("schema").map(|s| resolve_deep(doc, s, 0)) {
                            Some(Ok(s)) => {
                                content.insert(mt.clone(), s);
                            }
                            Some(Err(e)) => problems.push(format!("requestBody.content.{mt}: {e}")),
                            None => {
                                content.insert(mt.clone(), Value::Bool(true));
                            }
                        }
                    }
                }
                Some(RequestBody {
                    required: rb.get("required").and_then(Value::as_bool).unwrap_or(false),
                    content,
                })
            }
            Err(e) => {
                problems.push(format!("requestBody: {e}"));
                None
            }
        },
    };
    let mut responses = BTreeMap::new();
    if let Some(rs) = op.get("responses").and_then(Value::as_object) {
        for (status, r) in rs {
            let schema = resolve(doc, r, 0)
                .ok()
                .and_then(|r| r.pointer("/content/application~1json/schema").cloned())
                .map(|s| resolve_deep(doc, &s, 0));
            match schema {
                Some(Err(e)) => problems.push(format!("responses.{status}: {e}")),
                Some(Ok(s)) => {
                    responses.insert(status.clone(), Some(s));
                }
                None => {
                    responses.insert(status.clone(), None);
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(Operation {
            id,
            method: method_parsed,
            path: path.to_string(),
            segments,
            parameters,
            request_body,
            responses,
        })
    } else {
        Err(problems)
    }
}

fn compile_parameter(doc: &Value, p: &Value) -> Result<Parameter, String> {
    let p = resolve(doc, p, 0)?;
    let name = p
        .get("name")
        .and_then(Value::as_str)
        .ok_or("a parameter has no name")?
        .to_string();
    let location = match p.get("in").and_then(Value::as_str) {
        Some("query") => ParamIn::Query,
        Some("header") => ParamIn::Header,
        Some("path") => ParamIn::Path,
        Some("cookie") => ParamIn::Cookie,
        _ => return Err(format!("parameter {name} has no valid `in`")),
    };
    let schema = match p.get("schema") {
        Some(s) => resolve_deep(doc, s, 0)?,
        None => Value::Bool(true),
    };
    Ok(Parameter {
        name,
        location,
        required: p
            .get("required")
            .and_then(Value::as_bool)
            .unwrap_or(location == ParamIn::Path),
        style: p.get("style").and_then(Value::as_str).map(str::to_string),
        explode: p.get("explode").and_then(Value::as_bool),
        schema,
    })
}

/// Follows a local `$ref` at the top of `v` (not inside it).
fn resolve<'a>(doc: &'a Value, v: &'a Value, depth: usize) -> Result<&'a Value, String> {
    match v.get("$ref").and_then(Value::as_str) {
        None => Ok(v),
        Some(_) if depth >= MAX_REF_DEPTH => Err("$ref chain too deep (a cycle?)".to_string()),
        Some(r) => {
            let target = r
                .strip_prefix('#')
                .and_then(|p| doc.pointer(p))
                .ok_or_else(|| {
                    format!(
                        "$ref {r} does not resolve (only local '#/...' references are supported)"
                    )
                })?;
            resolve(doc, target, depth + 1)
        }
    }
}

/// Replaces every local `$ref` inside a schema by its target, recursively.
fn resolve_deep(doc: &Value, v: &Value, depth: usize) -> Result<Value, String> {
    if depth > MAX_REF_DEPTH {
        return Err("$ref nesting too deep (a recursive schema?)".to_string());
    }
    match v {
        Value::Object(m) => {
            if m.contains_key("$ref") {
                let target = resolve(doc, v, 0)?;
                return resolve_deep(doc, target, depth + 1);
            }
            let mut out = serde_json::Map::new();
            for (k, val) in m {
                out.insert(k.clone(), resolve_deep(doc, val, depth + 1)?);
            }
            Ok(Value::Object(out))
        }
        Value::Array(a) => a
            .iter()
            .map(|x| resolve_deep(doc, x, depth + 1))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
        other => Ok(other.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed() -> Spec {
        match Spec::builtin() {
            Ok(s) => s,
            Err(e) => panic!("builtin spec does not compile: {e:?}"),
        }
    }

    #[test]
    fn builtin_seed_spec_has_six_operations_with_ids() {
        let spec = seed();
        let mut ids: Vec<&str> = spec.operations().iter().map(|o| o.id.as_str()).collect();
        ids.sort();
        assert_eq!(
            ids,
            [
                "createPartnerCandidate",
                "createTrackingLink",
                "getCurrentPartnerUser",
                "listPartnerCandidates",
                "listPartnerJobs",
                "listPartnerProspectPools"
            ]
        );
    }

    #[test]
    fn refs_are_resolved_in_parameters_and_bodies() {
        let spec = seed();
        let create = spec.operation("createPartnerCandidate").cloned();
        let Some(create) = create else {
            panic!("missing op")
        };
        let body = create
            .request_body
            .as_ref()
            .and_then(|b| b.content.get("application/json"));
        assert_eq!(
            body.and_then(|s| s.pointer("/required/0"))
                .and_then(Value::as_str),
            Some("external_id")
        );
        assert!(
            create
                .parameters
                .iter()
                .any(|p| p.name == "On-Behalf-Of" && p.location == ParamIn::Header)
        );
    }

    #[test]
    fn route_finds_operation_405_lists_allowed_and_404_for_unknown() {
        let spec = seed();
        assert!(
            matches!(spec.route(&Method::POST, "/candidates"), RouteMatch::Found { op: o, .. } if o.id == "createPartnerCandidate")
        );
        match spec.route(&Method::DELETE, "/candidates") {
            RouteMatch::MethodNotAllowed(allow) => {
                assert_eq!(allow, vec![Method::GET, Method::POST])
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            spec.route(&Method::GET, "/candidates/extra"),
            RouteMatch::NotFound
        ));
        assert!(matches!(
            spec.route(&Method::GET, "/nope"),
            RouteMatch::NotFound
        ));
    }

    #[test]
    fn query_parameters_declared_per_operation() {
        let spec = seed();
        let Some(list) = spec.operation("listPartnerCandidates") else {
            panic!("missing op")
        };
        assert!(list.declares_query("external_ids") && list.declares_query("candidate_ids"));
        assert!(!list.declares_query("page"));
    }

    #[test]
    fn dangling_ref_and_missing_operation_id_are_reported_together() {
        let text = r##"
openapi: 3.1.0
info: {title: t, version: "1"}
paths:
  /a:
    get:
      parameters: [{$ref: '#/components/parameters/Nope'}]
      responses: {}
"##;
        let problems = Spec::from_text(text).err().unwrap_or_default();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("operationId")));
        assert!(problems.iter().any(|p| p.contains("does not resolve")));
    }
}
