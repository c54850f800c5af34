//! Body, query and response validation against the spec's schemas, compiled once at load.
//!
//! The order inside [`Validators::check_body`] follows the pipeline's contract (design 1.3 step
//! 6): media type (415), well-formed strict JSON (400), then the schema and the attachment rules
//! (422). Every [`FieldProblem`] is built from the schema and the instance *location* only, never
//! from a submitted value, because problems end up in error bodies, logs and the audit trail:
//!
//! - messages are fixed texts per keyword (jsonschema's own messages quote the value);
//! - pointer segments that are not array indices and not property names the schema declares are
//!   shown as `*` (an object key is input too);
//! - for `required`, the pointer names the missing property, which comes from the schema.
//!
//! Why a strict parse of our own: `serde_json` keeps the last of duplicate keys and turns an
//! integer that does not fit 64 bits into an `f64`. The upstream may read such a body differently
//! from what we validated, so the gateway refuses it instead (see [`parse_json_strict`]).

mod attachments;
mod json;
mod query;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use http::HeaderValue;
use jsonschema::error::{TypeKind, ValidationErrorKind};
use jsonschema::{Draft, ValidationError, Validator};
use serde_json::{Map, Value};

use crate::error::FieldProblem;
use crate::spec::{Operation, Spec};
use attachments::{Step, find_attachment_sites, is_standard_base64};
use query::{
    QueryParam, UNPRINTABLE, check_query_param, compile_query_param, decode_component, safe_name,
};

pub use attachments::{attachment_headroom, base64_len, largest_attachment_fitting};
pub use json::{parse_json_strict, reason};
pub use query::QueryError;

/// At most this many problems are reported for one request or response.
pub const MAX_PROBLEMS: usize = 50;

/// Instances with more values than this get only their first problem reported (see
/// `collect_problems`).
pub const FULL_REPORT_MAX_NODES: usize = 10_000;

/// Limits applied while validating bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidationOptions {
    /// Deepest nesting of arrays and objects accepted; the top-level container is depth 1.
    /// serde_json caps this at 128 whatever the setting.
    pub max_depth: usize,
    /// Largest decoded size of one attachment's base64 `content`.
    pub max_attachment_bytes: usize,
    /// The body's length (attachments count as their base64) must stay within this.
    pub max_body_bytes: usize,
}

impl Default for ValidationOptions {
    fn default() -> Self {
        ValidationOptions {
            max_depth: 64,
            max_attachment_bytes: 5 * 1024 * 1024,
            max_body_bytes: 10 * 1024 * 1024,
        }
    }
}

/// Why a body was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// 415: not `application/json` (or `application/*+json`) in UTF-8.
    UnsupportedMediaType,
    /// 400: not strict JSON; the reason is one of [`reason`]'s fixed texts.
    InvalidJson(&'static str),
    /// 413: the body exceeds `max_body_bytes`.
    PayloadTooLarge,
    /// 422: schema or attachment rule violations, sorted by pointer then keyword.
    Invalid(Vec<FieldProblem>),
}

/// What the audit trail may record about a valid body: never PII.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BodyFacts {
    /// `external_id` of the top-level object, or of each top-level array element.
    pub external_ids: Vec<String>,
}

/// What [`OpValidators::inspect_query`] found.
#[derive(Debug, Default, PartialEq)]
pub struct QueryFindings {
    /// Undeclared parameter names (printable forms, each once).
    pub undeclared: Vec<String>,
    /// Malformed values of declared parameters (and missing required ones).
    pub invalid: Vec<FieldProblem>,
    /// The declared pairs exactly as received, joined with `&`; `None` when there are none.
    pub declared: Option<String>,
}

/// The validators of every operation of a spec.
pub struct Validators {
    ops: HashMap<String, Arc<OpValidators>>,
    opts: ValidationOptions,
}

impl fmt::Debug for Validators {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Validators")
            .field("operations", &self.ops.len())
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

// The lead shares one `Validators` between request tasks.
const _: fn() = || {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Validators>();
};

/// One operation's compiled validators (what a route carries).
#[derive(Default)]
pub struct OpValidators {
    /// `None` when the operation declares no request body.
    body: Option<BodyValidators>,
    query: Vec<QueryParam>,
    /// Status key as written in the spec (`200`, `2XX`, `default`) to its schema, if any.
    responses: Vec<(String, Option<Compiled>)>,
    opts: ValidationOptions,
}

struct BodyValidators {
    required: bool,
    /// JSON media types only, lower-cased essence (`application/json`).
    media: Vec<MediaValidator>,
}

struct MediaValidator {
    essence: String,
    schema: Compiled,
    /// Schema paths to arrays whose items carry both `content` and `url` (attachments).
    attachment_sites: Vec<Vec<Step>>,
}

struct Compiled {
    validator: Validator,
    /// Every property name the schema declares; other object keys are redacted in pointers.
    names: HashSet<String>,
}

impl Validators {
    /// Compiles request-body, query and response validators for every operation. A schema that
    /// cannot compile is an `Err` listing `"operationId: what"` strings.
    pub fn compile(spec: &Spec, opts: ValidationOptions) -> Result<Validators, Vec<String>> {
        let options = jsonschema::options()
            .with_draft(Draft::Draft202012)
            .should_validate_formats(true)
            // OpenAPI's `byte`: base64-encoded characters.
            .with_format("byte", |s: &str| is_standard_base64(s));
        let mut problems = Vec::new();
        let mut ops = HashMap::new();
        for op in spec.operations() {
            let mut fail = |what: String| problems.push(format!("{}: {what}", op.id));
            let body = op.request_body.as_ref().map(|rb| {
                let mut media = Vec::new();
                for (mt, schema) in &rb.content {
                    let essence = essence_of(mt);
                    if !is_json_media(&essence) {
                        continue;
                    }
                    match compile_schema(&options, schema) {
                        Ok((schema, rewritten)) => {
                            let mut sites = Vec::new();
                            find_attachment_sites(&rewritten, &mut Vec::new(), &mut sites, 0);
                            sites.dedup();
                            media.push(MediaValidator {
                                essence,
                                schema,
                                attachment_sites: sites,
                            });
                        }
                        Err(e) => fail(format!("requestBody {mt}: {e}")),
                    }
                }
                BodyValidators {
                    required: rb.required,
                    media,
                }
            });
            let mut query = Vec::new();
            for p in op.query_params() {
                match compile_query_param(&options, p) {
                    Ok(q) => query.push(q),
                    Err(e) => fail(format!("query parameter {}: {e}", p.name)),
                }
            }
            let mut responses = Vec::new();
            for (status, schema) in &op.responses {
                match schema {
                    None => responses.push((status.clone(), None)),
                    Some(s) => match compile_schema(&options, s) {
                        Ok((c, _)) => responses.push((status.clone(), Some(c))),
                        Err(e) => fail(format!("response {status}: {e}")),
                    },
                }
            }
            ops.insert(
                op.id.clone(),
                Arc::new(OpValidators {
                    body,
                    query,
                    responses,
                    opts,
                }),
            );
        }
        if problems.is_empty() {
            Ok(Validators { ops, opts })
        } else {
            Err(problems)
        }
    }

    pub fn options(&self) -> ValidationOptions {
        self.opts
    }

    /// Every operation's validators, by operation id (resolved into routes once, at load).
    pub fn per_operation(&self) -> HashMap<String, Arc<OpValidators>> {
        self.ops.clone()
    }

    /// The validators of `op` (by id; for tools and tests: the gateway resolves them at load).
    pub fn operation(&self, op: &Operation) -> Option<&OpValidators> {
        self.ops.get(&op.id).map(|v| &**v)
    }

    /// [`OpValidators::check_query`] for `op`.
    pub fn check_query(&self, op: &Operation, raw_query: Option<&str>) -> Result<(), QueryError> {
        match self.operation(op) {
            Some(ov) => ov.check_query(raw_query),
            None => Err(QueryError::Invalid(vec![no_validator("/query")])),
        }
    }

    /// [`OpValidators::takes_attachments`] for `op`.
    pub fn takes_attachments(&self, op: &Operation) -> bool {
        self.operation(op)
            .is_some_and(OpValidators::takes_attachments)
    }

    /// [`OpValidators::check_body`] for `op`.
    pub fn check_body(
        &self,
        op: &Operation,
        content_type: Option<&HeaderValue>,
        body: &[u8],
    ) -> Result<BodyFacts, BodyError> {
        match self.operation(op) {
            Some(ov) => ov.check_body(content_type, body),
            None => Err(BodyError::Invalid(vec![no_validator("")])),
        }
    }

    /// [`OpValidators::check_response`] for `op`.
    pub fn check_response(&self, op: &Operation, status: u16, body: &[u8]) -> Vec<FieldProblem> {
        self.operation(op)
            .map(|ov| ov.check_response(status, body))
            .unwrap_or_default()
    }
}

impl OpValidators {
    /// Checks the query string as received (raw, percent-encoded). Undeclared parameters come
    /// first (400); then declared parameters with malformed values (422).
    pub fn check_query(&self, raw_query: Option<&str>) -> Result<(), QueryError> {
        let found = self.inspect_query(raw_query);
        if !found.undeclared.is_empty() {
            Err(QueryError::Undeclared(found.undeclared))
        } else if !found.invalid.is_empty() {
            Err(QueryError::Invalid(found.invalid))
        } else {
            Ok(())
        }
    }

    /// Everything about a query string in one pass: the undeclared parameters, the malformed
    /// values of declared ones, and the declared pairs as received (what report mode forwards).
    ///
    /// Values are percent-decoded (`+` is a space) before they are split on the style's
    /// delimiter, so `candidate_ids=1%2C2` is two ids: that is how the upstream reads it.
    pub fn inspect_query(&self, raw_query: Option<&str>) -> QueryFindings {
        let raw = raw_query.unwrap_or("");
        if raw.is_empty() && !self.query.iter().any(|p| p.required) {
            return QueryFindings::default();
        }
        let mut values: Vec<Vec<&str>> = vec![Vec::new(); self.query.len()];
        let mut undeclared: Vec<String> = Vec::new();
        let mut declared: Vec<&str> = Vec::new();
        for pair in raw.split('&').filter(|p| !p.is_empty()) {
            let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
            let name = decode_component(raw_name);
            let found = match &name {
                Ok(n) => self.query.iter().position(|p| p.name == n.as_ref()),
                Err(()) => None,
            };
            match found {
                Some(i) => {
                    values[i].push(raw_value);
                    declared.push(pair);
                }
                None => {
                    let shown = match &name {
                        Ok(n) => safe_name(n),
                        Err(()) => UNPRINTABLE.to_string(),
                    };
                    if !undeclared.contains(&shown) {
                        undeclared.push(shown);
                    }
                }
            }
        }
        let mut problems = Vec::new();
        for (param, given) in self.query.iter().zip(&values) {
            check_query_param(param, given, &mut problems);
        }
        QueryFindings {
            undeclared,
            invalid: if problems.is_empty() {
                problems
            } else {
                finish(problems)
            },
            declared: (!declared.is_empty()).then(|| declared.join("&")),
        }
    }

    /// Whether an operation's request body can carry attachments (base64 `content`).
    pub fn takes_attachments(&self) -> bool {
        self.body
            .as_ref()
            .is_some_and(|b| b.media.iter().any(|m| !m.attachment_sites.is_empty()))
    }

    /// Checks a request body: media type, strict JSON, schema, attachments.
    pub fn check_body(
        &self,
        content_type: Option<&HeaderValue>,
        body: &[u8],
    ) -> Result<BodyFacts, BodyError> {
        let ov = self;
        let Some(bv) = &ov.body else {
            if body.is_empty() {
                return Ok(BodyFacts::default());
            }
            return Err(BodyError::Invalid(vec![FieldProblem {
                pointer: String::new(),
                keyword: "body".into(),
                message: "this operation takes no body".into(),
            }]));
        };
        if body.len() > self.opts.max_body_bytes {
            return Err(BodyError::PayloadTooLarge);
        }
        if body.is_empty() {
            // Nothing to type-check: an absent optional body is fine whatever the header says.
            return if bv.required {
                Err(BodyError::InvalidJson(reason::EMPTY))
            } else {
                Ok(BodyFacts::default())
            };
        }
        let media = pick_media(bv, content_type).ok_or(BodyError::UnsupportedMediaType)?;
        let value = parse_json_strict(body, self.opts.max_depth).map_err(BodyError::InvalidJson)?;
        let mut problems = Vec::new();
        if !media.schema.validator.is_valid(&value) {
            collect_problems(&media.schema, &value, "", &mut problems);
        }
        let mut pointer = String::new();
        for site in &media.attachment_sites {
            self.walk_attachments(&value, site, &mut pointer, &mut problems);
        }
        if !problems.is_empty() {
            return Err(BodyError::Invalid(finish(problems)));
        }
        Ok(body_facts(&value))
    }

    /// Checks an upstream response against the schema documented for its status (exact, then
    /// `2XX`, then `default`). Report only: an empty list when it matches or nothing is documented,
    /// except that an undocumented success status is itself a problem (keyword `status`).
    pub fn check_response(&self, status: u16, body: &[u8]) -> Vec<FieldProblem> {
        let ov = self;
        let exact = status.to_string();
        let range = format!("{}XX", status / 100);
        let documented = ov
            .responses
            .iter()
            .find(|(s, _)| *s == exact)
            .or_else(|| {
                ov.responses
                    .iter()
                    .find(|(s, _)| s.eq_ignore_ascii_case(&range))
            })
            .or_else(|| ov.responses.iter().find(|(s, _)| s == "default"));
        let schema = match documented {
            Some((_, Some(schema))) => schema,
            // A success the spec does not document is drift; undocumented errors are not (the
            // spec documents almost none of Greenhouse's).
            None if (200..300).contains(&status) => {
                return vec![FieldProblem {
                    pointer: String::new(),
                    keyword: "status".into(),
                    message: "is a success status the spec does not document".into(),
                }];
            }
            _ => return Vec::new(),
        };
        let value: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(_) => {
                return vec![FieldProblem {
                    pointer: String::new(),
                    keyword: "json".into(),
                    message: "is not valid JSON".into(),
                }];
            }
        };
        if schema.validator.is_valid(&value) {
            return Vec::new();
        }
        let mut problems = Vec::new();
        collect_problems(schema, &value, "", &mut problems);
        finish(problems)
    }
}

// ---------------------------------------------------------------------------------------------
// Compilation

fn compile_schema(
    options: &jsonschema::ValidationOptions<'_>,
    schema: &Value,
) -> Result<(Compiled, Value), String> {
    let rewritten = openapi_to_json_schema(schema);
    let validator = options
        .build(&rewritten)
        .map_err(|e| format!("schema does not compile: {e} (at {})", e.instance_path()))?;
    let mut names = HashSet::new();
    collect_names(&rewritten, &mut names);
    Ok((Compiled { validator, names }, rewritten))
}

/// Rewrites the OpenAPI 3.0 leftovers that draft 2020-12 reads differently: `nullable: true`
/// becomes a `null` type (or an `anyOf` with `null` when there is no `type`), boolean
/// `exclusiveMinimum`/`exclusiveMaximum` become the numeric form.
fn openapi_to_json_schema(schema: &Value) -> Value {
    let Value::Object(m) = schema else {
        return schema.clone();
    };
    let mut out = Map::new();
    for (k, v) in m {
        let nv = match k.as_str() {
            "nullable" => continue,
            "properties" | "patternProperties" | "$defs" | "definitions" | "dependentSchemas" => {
                match v {
                    Value::Object(props) => Value::Object(
                        props
                            .iter()
                            .map(|(n, s)| (n.clone(), openapi_to_json_schema(s)))
                            .collect(),
                    ),
                    other => other.clone(),
                }
            }
            "items"
            | "additionalProperties"
            | "not"
            | "if"
            | "then"
            | "else"
            | "contains"
            | "propertyNames"
            | "unevaluatedItems"
            | "unevaluatedProperties"
            | "additionalItems"
            | "contentSchema"
            | "allOf"
            | "anyOf"
            | "oneOf"
            | "prefixItems" => match v {
                Value::Array(list) => {
                    Value::Array(list.iter().map(openapi_to_json_schema).collect())
                }
                other => openapi_to_json_schema(other),
            },
            _ => v.clone(),
        };
        out.insert(k.clone(), nv);
    }
    for (bool_kw, bound_kw) in [
        ("exclusiveMinimum", "minimum"),
        ("exclusiveMaximum", "maximum"),
    ] {
        if let Some(Value::Bool(exclusive)) = out.get(bool_kw).cloned() {
            out.remove(bool_kw);
            if exclusive && let Some(bound) = out.remove(bound_kw) {
                out.insert(bool_kw.to_string(), bound);
            }
        }
    }
    if m.get("nullable") == Some(&Value::Bool(true)) {
        let null = Value::String("null".into());
        match out.get_mut("type") {
            Some(Value::String(t)) => {
                if t != "null" {
                    let t = std::mem::take(t);
                    out.insert(
                        "type".into(),
                        Value::Array(vec![Value::String(t), null.clone()]),
                    );
                }
            }
            Some(Value::Array(types)) => {
                if !types.contains(&null) {
                    types.push(null.clone());
                }
            }
            _ => {
                return Value::Object(Map::from_iter([(
                    "anyOf".to_string(),
                    Value::Array(vec![
                        Value::Object(Map::from_iter([("type".to_string(), null)])),
                        Value::Object(out),
                    ]),
                )]));
            }
        }
        if let Some(Value::Array(options)) = out.get_mut("enum")
            && !options.contains(&Value::Null)
        {
            options.push(Value::Null);
        }
    }
    Value::Object(out)
}

fn collect_names(v: &Value, names: &mut HashSet<String>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::Object(props)) = m.get("properties") {
                names.extend(props.keys().cloned());
            }
            if let Some(Value::Array(req)) = m.get("required") {
                names.extend(req.iter().filter_map(Value::as_str).map(str::to_string));
            }
            for child in m.values() {
                collect_names(child, names);
            }
        }
        Value::Array(a) => a.iter().for_each(|c| collect_names(c, names)),
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Bodies

fn pick_media<'a>(
    bv: &'a BodyValidators,
    content_type: Option<&HeaderValue>,
) -> Option<&'a MediaValidator> {
    let ct = content_type?.to_str().ok()?;
    let mut parts = ct.split(';');
    let essence = essence_of(parts.next()?);
    if !is_json_media(&essence) {
        return None;
    }
    for param in parts {
        let param = param.trim();
        if param.is_empty() {
            continue;
        }
        let (name, value) = param.split_once('=')?;
        if name.trim().eq_ignore_ascii_case("charset") {
            let value = value.trim();
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value);
            if !value.eq_ignore_ascii_case("utf-8") {
                return None;
            }
        }
    }
    bv.media
        .iter()
        .find(|m| m.essence == essence)
        .or_else(|| bv.media.iter().find(|m| m.essence == "application/json"))
        .or_else(|| bv.media.first())
}

fn essence_of(media_type: &str) -> String {
    media_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

fn is_json_media(essence: &str) -> bool {
    let Some((ty, sub)) = essence.split_once('/') else {
        return false;
    };
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    ty == "application"
        && token(sub)
        && (sub == "json" || (sub.len() > 5 && sub.ends_with("+json")))
}

fn body_facts(value: &Value) -> BodyFacts {
    let id = |v: &Value| {
        v.get("external_id")
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let external_ids = match value {
        Value::Array(items) => items.iter().filter_map(id).collect(),
        other => id(other).into_iter().collect(),
    };
    BodyFacts { external_ids }
}

// ---------------------------------------------------------------------------------------------
// Problems

fn problem(pointer: String, keyword: &str, message: &str) -> FieldProblem {
    FieldProblem {
        pointer,
        keyword: keyword.to_string(),
        message: message.to_string(),
    }
}

fn no_validator(pointer: &str) -> FieldProblem {
    problem(
        pointer.to_string(),
        "schema",
        "no validator was compiled for this operation",
    )
}

fn collect_problems(
    schema: &Compiled,
    instance: &Value,
    prefix: &str,
    problems: &mut Vec<FieldProblem>,
) {
    // jsonschema gathers every error before handing the first one over; on a huge invalid
    // instance (a 10 MiB array of wrong items) that is millions of allocations, so only the first
    // problem of such an instance is reported.
    let mut budget = FULL_REPORT_MAX_NODES;
    if exceeds_nodes(instance, &mut budget) {
        if let Err(err) = schema.validator.validate(instance) {
            problems.push(to_problem(&err, instance, prefix, &schema.names));
        }
        return;
    }
    for err in schema.validator.iter_errors(instance) {
        problems.push(to_problem(&err, instance, prefix, &schema.names));
    }
}

/// Counts values down from `budget`; true once it runs out.
fn exceeds_nodes(v: &Value, budget: &mut usize) -> bool {
    if *budget == 0 {
        return true;
    }
    *budget -= 1;
    match v {
        Value::Array(items) => items.iter().any(|i| exceeds_nodes(i, budget)),
        Value::Object(m) => m.values().any(|i| exceeds_nodes(i, budget)),
        _ => false,
    }
}

fn to_problem(
    err: &ValidationError<'_>,
    instance: &Value,
    prefix: &str,
    names: &HashSet<String>,
) -> FieldProblem {
    let path = err.instance_path().as_str();
    let mut pointer = String::with_capacity(prefix.len() + path.len());
    pointer.push_str(prefix);
    // Walk the instance along the path: an array step is an index (safe to show), an object
    // step is a key, shown only when the schema declares that name.
    let mut at = Some(instance);
    for segment in path.split('/').skip(1) {
        pointer.push('/');
        let key = unescape(segment);
        at = match at {
            Some(Value::Array(items)) => {
                pointer.push_str(segment);
                segment.parse::<usize>().ok().and_then(|i| items.get(i))
            }
            Some(Value::Object(m)) => {
                if names.contains(key.as_ref()) {
                    pointer.push_str(segment);
                } else {
                    pointer.push('*');
                }
                m.get(key.as_ref())
            }
            _ => {
                pointer.push('*');
                None
            }
        };
    }
    let kind = err.kind();
    if let ValidationErrorKind::Required { property } = kind
        && let Some(name) = property.as_str()
    {
        pointer.push('/');
        push_escaped(&mut pointer, name);
    }
    FieldProblem {
        pointer,
        keyword: kind.keyword().to_string(),
        message: message_for(kind),
    }
}

/// A fixed text per keyword; only schema-side operands (types, formats, limits) appear.
fn message_for(kind: &ValidationErrorKind) -> String {
    use ValidationErrorKind as K;
    let fixed = |s: &str| s.to_string();
    match kind {
        K::Required { .. } => fixed("is required"),
        K::Type { kind } => {
            let expected = match kind {
                TypeKind::Single(t) => t.to_string(),
                TypeKind::Multiple(set) => set
                    .iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join(" or "),
            };
            format!("must be of type {expected}")
        }
        K::Format { format } => match format.as_str() {
            "email" => fixed("is not an email address"),
            "uri" => fixed("is not an absolute URI"),
            "date-time" => fixed("is not an RFC 3339 date-time"),
            "date" => fixed("is not an RFC 3339 full-date"),
            "uuid" => fixed("is not a UUID"),
            "byte" => fixed("is not valid base64"),
            other => format!("does not match the format {other}"),
        },
        K::Enum { .. } => fixed("is not one of the allowed values"),
        K::Constant { .. } => fixed("is not the required value"),
        K::AdditionalProperties { .. } | K::UnevaluatedProperties { .. } => {
            fixed("has properties the schema does not allow")
        }
        K::AdditionalItems { .. } | K::UnevaluatedItems { .. } => {
            fixed("has items the schema does not allow")
        }
        K::MinLength { limit } => format!("is shorter than {limit} characters"),
        K::MaxLength { limit } => format!("is longer than {limit} characters"),
        K::MinItems { limit } => format!("has fewer than {limit} items"),
        K::MaxItems { limit } => format!("has more than {limit} items"),
        K::MinProperties { limit } => format!("has fewer than {limit} properties"),
        K::MaxProperties { limit } => format!("has more than {limit} properties"),
        K::Minimum { limit } => format!("is less than {limit}"),
        K::Maximum { limit } => format!("is greater than {limit}"),
        K::ExclusiveMinimum { limit } => format!("is not greater than {limit}"),
        K::ExclusiveMaximum { limit } => format!("is not less than {limit}"),
        K::MultipleOf { .. } => fixed("is not a multiple of the required step"),
        K::Pattern { .. } => fixed("does not match the required pattern"),
        K::UniqueItems => fixed("has duplicate items"),
        K::AnyOf { .. } | K::OneOfNotValid { .. } => fixed("matches none of the allowed shapes"),
        K::OneOfMultipleValid { .. } => fixed("matches more than one of the allowed shapes"),
        K::Not { .. } => fixed("matches a shape that is not allowed"),
        K::FalseSchema => fixed("is not allowed"),
        K::ContentEncoding { .. } | K::FromUtf8 { .. } => fixed("is not correctly encoded"),
        other => format!("does not satisfy {}", other.keyword()),
    }
}

/// Sorted by pointer then keyword, one per (pointer, keyword), at most [`MAX_PROBLEMS`].
fn finish(mut problems: Vec<FieldProblem>) -> Vec<FieldProblem> {
    problems.sort_by(|a, b| (&a.pointer, &a.keyword).cmp(&(&b.pointer, &b.keyword)));
    problems.dedup_by(|a, b| a.pointer == b.pointer && a.keyword == b.keyword);
    problems.truncate(MAX_PROBLEMS);
    problems
}

fn push_escaped(out: &mut String, segment: &str) {
    for c in segment.chars() {
        match c {
            '~' => out.push_str("~0"),
            '/' => out.push_str("~1"),
            c => out.push(c),
        }
    }
}

fn escape(segment: &str) -> String {
    let mut s = String::with_capacity(segment.len());
    push_escaped(&mut s, segment);
    s
}

fn unescape(segment: &str) -> std::borrow::Cow<'_, str> {
    if segment.contains('~') {
        std::borrow::Cow::Owned(segment.replace("~1", "/").replace("~0", "~"))
    } else {
        std::borrow::Cow::Borrowed(segment)
    }
}

/// Formats an index without going through `fmt` machinery on the hot path.
fn itoa_usize(mut n: usize) -> IndexText {
    let mut buf = [0u8; 20];
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    IndexText { buf, at }
}

struct IndexText {
    buf: [u8; 20],
    at: usize,
}

impl IndexText {
    fn as_str(&self) -> &str {
        // Only ASCII digits are written.
        std::str::from_utf8(&self.buf[self.at..]).unwrap_or("0")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nullable_type_becomes_a_null_union_and_enum_gains_null() {
        let s = serde_json::json!({"type": "string", "nullable": true, "enum": ["a"]});
        assert_eq!(
            openapi_to_json_schema(&s),
            serde_json::json!({"type": ["string", "null"], "enum": ["a", null]})
        );
    }

    #[test]
    fn nullable_without_type_wraps_in_any_of() {
        let s = serde_json::json!({"allOf": [{"type": "object"}], "nullable": true});
        let r = openapi_to_json_schema(&s);
        assert_eq!(r["anyOf"][0], serde_json::json!({"type": "null"}));
    }

    #[test]
    fn boolean_exclusive_minimum_becomes_numeric() {
        let s = serde_json::json!({"type": "integer", "minimum": 3, "exclusiveMinimum": true});
        assert_eq!(
            openapi_to_json_schema(&s),
            serde_json::json!({"type": "integer", "exclusiveMinimum": 3})
        );
    }

    #[test]
    fn index_text_prints_digits() {
        assert_eq!(itoa_usize(0).as_str(), "0");
        assert_eq!(itoa_usize(1234).as_str(), "1234");
        assert_eq!(itoa_usize(usize::MAX).as_str(), usize::MAX.to_string());
    }
}
