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

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use http::HeaderValue;
use jsonschema::error::{TypeKind, ValidationErrorKind};
use jsonschema::{Draft, ValidationError, Validator};
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use crate::error::FieldProblem;
use crate::spec::{Operation, Spec};

/// At most this many problems are reported for one request or response.
pub const MAX_PROBLEMS: usize = 50;

/// Instances with more values than this get only their first problem reported (see
/// `collect_problems`).
pub const FULL_REPORT_MAX_NODES: usize = 10_000;

/// serde_json refuses nesting beyond 128 levels on its own, whatever `max_depth` says.
const SERDE_JSON_RECURSION_LIMIT: usize = 128;

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

/// What a body needs besides its attachments' base64 (the candidate's other fields): 64 KiB, or
/// an eighth of a smaller body limit.
pub fn attachment_headroom(max_body_bytes: u64) -> u64 {
    (64 * 1024).min(max_body_bytes / 8)
}

/// The base64 length of `n` bytes (padded).
pub fn base64_len(n: u64) -> u64 {
    n.div_ceil(3).saturating_mul(4)
}

/// The largest attachment (decoded bytes) whose base64 fits in a body of `max_body_bytes` with
/// [`attachment_headroom`] to spare.
pub fn largest_attachment_fitting(max_body_bytes: u64) -> u64 {
    max_body_bytes.saturating_sub(attachment_headroom(max_body_bytes)) / 4 * 3
}

/// Why a query string was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryError {
    /// Names of parameters the spec does not declare for the operation, reduced to
    /// `[A-Za-z0-9_.-]` and 64 characters (`(unprintable name)` when nothing is left), each once.
    Undeclared(Vec<String>),
    /// Declared parameters with malformed values; pointers are `/query/<name>[/<index>]`.
    Invalid(Vec<FieldProblem>),
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

/// The fixed reasons carried by [`BodyError::InvalidJson`].
pub mod reason {
    pub const NOT_UTF8: &str = "the body is not valid UTF-8";
    pub const MALFORMED: &str = "the body is not valid JSON";
    pub const TRUNCATED: &str = "the body ends inside a JSON value";
    pub const EMPTY: &str = "the body is empty";
    pub const DUPLICATE_KEY: &str = "an object has the same key twice";
    pub const TOO_DEEP: &str = "the JSON is nested too deeply";
    pub const NUMBER_RANGE: &str =
        "a number does not fit: integers must fit in signed 64 bits and numbers must be finite";
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

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Prop(String),
    Items,
}

struct Compiled {
    validator: Validator,
    /// Every property name the schema declares; other object keys are redacted in pointers.
    names: HashSet<String>,
}

struct QueryParam {
    name: String,
    required: bool,
    shape: QueryShape,
    schema: Compiled,
}

enum QueryShape {
    Scalar(Coerce),
    /// `delimiter` is `None` when exploded (one item per occurrence).
    Array {
        delimiter: Option<char>,
        items: Coerce,
    },
}

/// What a query string value may be read as before schema validation, from the schema's `type`.
#[derive(Debug, Clone, Copy, Default)]
struct Coerce {
    integer: bool,
    number: bool,
    boolean: bool,
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
    ///
    /// Values are percent-decoded (`+` is a space) before they are split on the style's
    /// delimiter, so `candidate_ids=1%2C2` is two ids: that is how the upstream reads it.
    pub fn check_query(&self, raw_query: Option<&str>) -> Result<(), QueryError> {
        let ov = self;
        let raw = raw_query.unwrap_or("");
        if raw.is_empty() && !ov.query.iter().any(|p| p.required) {
            return Ok(());
        }
        let mut values: Vec<Vec<&str>> = vec![Vec::new(); ov.query.len()];
        let mut undeclared: Vec<String> = Vec::new();
        for pair in raw.split('&').filter(|p| !p.is_empty()) {
            let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
            let name = decode_component(raw_name);
            let found = match &name {
                Ok(n) => ov.query.iter().position(|p| p.name == n.as_ref()),
                Err(()) => None,
            };
            match found {
                Some(i) => values[i].push(raw_value),
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
        if !undeclared.is_empty() {
            return Err(QueryError::Undeclared(undeclared));
        }
        let mut problems = Vec::new();
        for (param, given) in ov.query.iter().zip(&values) {
            check_query_param(param, given, &mut problems);
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(QueryError::Invalid(finish(problems)))
        }
    }

    /// Checks a request body: media type, strict JSON, schema, attachments.
    /// Whether an operation's request body can carry attachments (base64 `content`).
    pub fn takes_attachments(&self) -> bool {
        self.body
            .as_ref()
            .is_some_and(|b| b.media.iter().any(|m| !m.attachment_sites.is_empty()))
    }

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

    /// Follows one attachment site's schema path through the instance and checks each item.
    fn walk_attachments(
        &self,
        value: &Value,
        steps: &[Step],
        pointer: &mut String,
        problems: &mut Vec<FieldProblem>,
    ) {
        let Some((step, rest)) = steps.split_first() else {
            self.check_attachment(value, pointer, problems);
            return;
        };
        let len = pointer.len();
        match step {
            Step::Prop(name) => {
                if let Some(child) = value.as_object().and_then(|o| o.get(name)) {
                    pointer.push('/');
                    push_escaped(pointer, name);
                    self.walk_attachments(child, rest, pointer, problems);
                    pointer.truncate(len);
                }
            }
            Step::Items => {
                if let Some(items) = value.as_array() {
                    for (i, item) in items.iter().enumerate() {
                        pointer.push('/');
                        pointer.push_str(itoa_usize(i).as_str());
                        self.walk_attachments(item, rest, pointer, problems);
                        pointer.truncate(len);
                    }
                }
            }
        }
    }

    fn check_attachment(&self, item: &Value, pointer: &str, problems: &mut Vec<FieldProblem>) {
        // A non-object item is the schema's `type` problem, already reported.
        let Some(obj) = item.as_object() else { return };
        let content = obj.get("content").filter(|v| !v.is_null());
        let url = obj.get("url").filter(|v| !v.is_null());
        if content.is_some() == url.is_some() {
            problems.push(problem(
                pointer.to_string(),
                "oneOf",
                "must carry exactly one of content or url",
            ));
        }
        if let Some(Value::String(c)) = content {
            let decoded = decoded_len(c);
            if decoded > self.opts.max_attachment_bytes {
                problems.push(problem(
                    format!("{pointer}/content"),
                    "maxDecodedBytes",
                    "decodes to more bytes than an attachment may have",
                ));
            } else if !is_standard_base64(c) {
                problems.push(problem(
                    format!("{pointer}/content"),
                    "contentEncoding",
                    "is not valid standard base64",
                ));
            }
        }
        if let Some(Value::String(u)) = url
            && !is_https_url(u)
        {
            problems.push(problem(
                format!("{pointer}/url"),
                "format",
                "must be an https URL",
            ));
        }
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

/// Finds arrays whose item schema declares both `content` and `url`: the attachment lists.
fn find_attachment_sites(
    schema: &Value,
    path: &mut Vec<Step>,
    out: &mut Vec<Vec<Step>>,
    depth: usize,
) {
    if depth > 64 {
        return;
    }
    let Some(m) = schema.as_object() else { return };
    if let Some(Value::Object(props)) = m.get("properties") {
        for (name, sub) in props {
            path.push(Step::Prop(name.clone()));
            find_attachment_sites(sub, path, out, depth + 1);
            path.pop();
        }
    }
    if let Some(items) = m.get("items").filter(|i| i.is_object()) {
        let declares = |k: &str| {
            items
                .get("properties")
                .and_then(Value::as_object)
                .is_some_and(|p| p.contains_key(k))
        };
        path.push(Step::Items);
        if declares("content") && declares("url") && !out.contains(path) {
            out.push(path.clone());
        }
        find_attachment_sites(items, path, out, depth + 1);
        path.pop();
    }
    for k in ["allOf", "anyOf", "oneOf"] {
        if let Some(Value::Array(subs)) = m.get(k) {
            for sub in subs {
                find_attachment_sites(sub, path, out, depth + 1);
            }
        }
    }
}

fn compile_query_param(
    options: &jsonschema::ValidationOptions<'_>,
    p: &crate::spec::Parameter,
) -> Result<QueryParam, String> {
    let (schema, rewritten) = compile_schema(options, &p.schema)?;
    let types = types_of(&rewritten);
    let is_array = types.iter().any(|t| t == "array");
    if types.iter().any(|t| t == "object") {
        return Err("object-valued query parameters are not supported".into());
    }
    let style = p.style.as_deref().unwrap_or("form");
    let shape = if is_array {
        let explode = p.explode.unwrap_or(style == "form");
        let delimiter = match (style, explode) {
            (_, true) => None,
            ("form", false) => Some(','),
            ("spaceDelimited", false) => Some(' '),
            ("pipeDelimited", false) => Some('|'),
            (other, _) => return Err(format!("style {other} is not supported for arrays")),
        };
        let items = rewritten.get("items").map(coerce_for).unwrap_or_default();
        QueryShape::Array { delimiter, items }
    } else {
        if style != "form" {
            return Err(format!("style {style} is not supported for scalar values"));
        }
        QueryShape::Scalar(coerce_for(&rewritten))
    };
    Ok(QueryParam {
        name: p.name.clone(),
        required: p.required,
        shape,
        schema,
    })
}

fn types_of(schema: &Value) -> Vec<String> {
    match schema.get("type") {
        Some(Value::String(t)) => vec![t.clone()],
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    }
}

fn coerce_for(schema: &Value) -> Coerce {
    let types = types_of(schema);
    let has = |t: &str| types.iter().any(|x| x == t);
    Coerce {
        integer: has("integer"),
        number: has("number"),
        boolean: has("boolean"),
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

/// Decoded size of a base64 text (exact when it is well formed).
fn decoded_len(s: &str) -> usize {
    let b = s.as_bytes();
    let n = b.len();
    let full = n / 4 * 3;
    if n.is_multiple_of(4) {
        let pad = b.iter().rev().take(2).take_while(|&&c| c == b'=').count();
        full - pad.min(full)
    } else {
        full + (n % 4) * 3 / 4
    }
}

/// Standard alphabet, canonical padding, no whitespace; decoded in chunks onto the stack so a
/// 5 MiB attachment costs no allocation.
fn is_standard_base64(s: &str) -> bool {
    const CHUNK: usize = 1024;
    let b = s.as_bytes();
    if !b.len().is_multiple_of(4) {
        return false;
    }
    let mut out = [0u8; CHUNK];
    let mut chunks = b.chunks(CHUNK).peekable();
    while let Some(chunk) = chunks.next() {
        // Padding may only end the whole text, not a chunk in the middle.
        if chunks.peek().is_some() && chunk.last() == Some(&b'=') {
            return false;
        }
        if BASE64.decode_slice(chunk, &mut out).is_err() {
            return false;
        }
    }
    true
}

fn is_https_url(u: &str) -> bool {
    u.len() > "https://".len()
        && u.get(..8)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"))
}

// ---------------------------------------------------------------------------------------------
// Strict JSON

/// Parses a body as strict JSON: UTF-8, no duplicate object keys at any depth, nesting within
/// `max_depth` (the top-level container is depth 1), integers within signed 64 bits and finite
/// numbers. A number written with a fraction or an exponent whose magnitude is 2^63 or more is
/// refused too: every such `f64` is an integer to JSON Schema, and one that does not fit.
pub fn parse_json_strict(body: &[u8], max_depth: usize) -> Result<Value, &'static str> {
    let text = std::str::from_utf8(body).map_err(|_| reason::NOT_UTF8)?;
    let failure = Cell::new(None);
    let mut de = serde_json::Deserializer::from_str(text);
    let seed = Strict {
        depth: 0,
        max_depth,
        failure: &failure,
    };
    seed.deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v))
        .map_err(|e| failure.get().unwrap_or_else(|| classify(&e)))
}

fn classify(e: &serde_json::Error) -> &'static str {
    if e.is_eof() {
        return reason::TRUNCATED;
    }
    // serde_json's messages are stable and never quote the input.
    let msg = e.to_string();
    if msg.starts_with("recursion limit exceeded") {
        reason::TOO_DEEP
    } else if msg.starts_with("number out of range") {
        reason::NUMBER_RANGE
    } else {
        reason::MALFORMED
    }
}

#[derive(Clone, Copy)]
struct Strict<'a> {
    depth: usize,
    max_depth: usize,
    /// Our own refusal, so the caller reports it rather than serde's wrapped message.
    failure: &'a Cell<Option<&'static str>>,
}

impl Strict<'_> {
    fn fail<E: de::Error>(&self, why: &'static str) -> E {
        self.failure.set(Some(why));
        E::custom(why)
    }

    fn child(&self) -> Result<Self, &'static str> {
        let depth = self.depth + 1;
        if depth > self.max_depth || depth > SERDE_JSON_RECURSION_LIMIT {
            return Err(reason::TOO_DEEP);
        }
        Ok(Strict {
            depth,
            max_depth: self.max_depth,
            failure: self.failure,
        })
    }
}

impl<'de> DeserializeSeed<'de> for Strict<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        match i64::try_from(v) {
            Ok(v) => Ok(Value::from(v)),
            Err(_) => Err(self.fail(reason::NUMBER_RANGE)),
        }
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        // serde_json also lands here for integer literals beyond u64/i64.
        const TWO_POW_63: f64 = 9_223_372_036_854_775_808.0;
        match Number::from_f64(v) {
            Some(n) if v.abs() < TWO_POW_63 => Ok(Value::Number(n)),
            _ => Err(self.fail(reason::NUMBER_RANGE)),
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let child = self.child().map_err(|why| self.fail(why))?;
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(child)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let child = self.child().map_err(|why| self.fail(why))?;
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(self.fail(reason::DUPLICATE_KEY));
            }
            let v = map.next_value_seed(child)?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

// ---------------------------------------------------------------------------------------------
// Query

const UNPRINTABLE: &str = "(unprintable name)";

fn check_query_param(param: &QueryParam, given: &[&str], problems: &mut Vec<FieldProblem>) {
    let at = || format!("/query/{}", escape(&param.name));
    if given.is_empty() {
        if param.required {
            problems.push(problem(at(), "required", "is required"));
        }
        return;
    }
    let mut decoded = Vec::with_capacity(given.len());
    for raw in given {
        match decode_component(raw) {
            Ok(v) => decoded.push(v),
            Err(()) => {
                problems.push(problem(
                    at(),
                    "encoding",
                    "is not valid UTF-8 once percent-decoded",
                ));
                return;
            }
        }
    }
    let instance = match &param.shape {
        QueryShape::Scalar(coerce) => {
            if decoded.len() > 1 {
                problems.push(problem(at(), "style", "must be given once"));
                return;
            }
            coerce_value(&decoded[0], *coerce)
        }
        QueryShape::Array {
            delimiter: None,
            items,
        } => Value::Array(decoded.iter().map(|v| coerce_value(v, *items)).collect()),
        QueryShape::Array {
            delimiter: Some(d),
            items,
        } => {
            if decoded.len() > 1 {
                problems.push(problem(
                    at(),
                    "style",
                    "must be given once, its items separated by the style's delimiter",
                ));
                return;
            }
            let text = &decoded[0];
            if text.is_empty() {
                Value::Array(Vec::new())
            } else {
                Value::Array(text.split(*d).map(|v| coerce_value(v, *items)).collect())
            }
        }
    };
    if !param.schema.validator.is_valid(&instance) {
        collect_problems(&param.schema, &instance, &at(), problems);
    }
}

/// Reads a query value as the schema's type when it parses as one; otherwise leaves it a string
/// so the schema reports `type` at its index.
fn coerce_value(text: &str, c: Coerce) -> Value {
    let integer_like = |s: &str| {
        !s.is_empty()
            && s.strip_prefix('-')
                .unwrap_or(s)
                .bytes()
                .all(|b| b.is_ascii_digit())
    };
    if c.integer
        && integer_like(text)
        && let Ok(i) = text.parse::<i64>()
    {
        return Value::from(i);
    }
    if c.number
        && !text.starts_with('+')
        && let Some(n) = text.parse::<f64>().ok().and_then(Number::from_f64)
    {
        return Value::Number(n);
    }
    if c.boolean {
        match text {
            "true" => return Value::Bool(true),
            "false" => return Value::Bool(false),
            _ => {}
        }
    }
    Value::String(text.to_string())
}

/// `application/x-www-form-urlencoded` decoding of one name or value: `+` is a space, then
/// percent-decoding; `Err` when the result is not UTF-8.
fn decode_component(raw: &str) -> Result<std::borrow::Cow<'_, str>, ()> {
    use std::borrow::Cow;
    let spaced: Cow<'_, str> = if raw.contains('+') {
        Cow::Owned(raw.replace('+', " "))
    } else {
        Cow::Borrowed(raw)
    };
    if !spaced.contains('%') {
        return Ok(spaced);
    }
    let decoded = percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .map_err(|_| ())?;
    Ok(Cow::Owned(decoded.into_owned()))
}

fn safe_name(name: &str) -> String {
    let s: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        .take(64)
        .collect();
    if s.is_empty() {
        UNPRINTABLE.to_string()
    } else {
        s
    }
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
    fn decoded_len_matches_real_decoding() {
        for n in 0..20usize {
            let data = vec![7u8; n];
            let text = BASE64.encode(&data);
            assert_eq!(decoded_len(&text), n);
            assert!(is_standard_base64(&text));
        }
    }

    #[test]
    fn padding_in_the_middle_of_a_long_text_is_refused() {
        let mut text = "A".repeat(1022);
        text.push_str("==");
        text.push_str("AAAA");
        assert!(!is_standard_base64(&text));
    }

    #[test]
    fn index_text_prints_digits() {
        assert_eq!(itoa_usize(0).as_str(), "0");
        assert_eq!(itoa_usize(1234).as_str(), "1234");
        assert_eq!(itoa_usize(usize::MAX).as_str(), usize::MAX.to_string());
    }
}
