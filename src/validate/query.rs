//! Query strings: how each declared parameter is read (style, explode, delimiter, the types a
//! value may be coerced to), compiled once, and the check of one parameter's values. Undeclared
//! names are reported through [`safe_name`] only, because a name is input too.

use serde_json::{Number, Value};

use super::{Compiled, collect_problems, compile_schema, escape, problem};
use crate::error::FieldProblem;

/// Why a query string was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryError {
    /// Names of parameters the spec does not declare for the operation, reduced to
    /// `[A-Za-z0-9_.-]` and 64 characters (`(unprintable name)` when nothing is left), each once.
    Undeclared(Vec<String>),
    /// Declared parameters with malformed values; pointers are `/query/<name>[/<index>]`.
    Invalid(Vec<FieldProblem>),
}

/// A declared query parameter, compiled.
pub(super) struct QueryParam {
    pub(super) name: String,
    pub(super) required: bool,
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

pub(super) fn compile_query_param(
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

pub(super) const UNPRINTABLE: &str = "(unprintable name)";

pub(super) fn check_query_param(
    param: &QueryParam,
    given: &[&str],
    problems: &mut Vec<FieldProblem>,
) {
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
pub(super) fn decode_component(raw: &str) -> Result<std::borrow::Cow<'_, str>, ()> {
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

pub(super) fn safe_name(name: &str) -> String {
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
