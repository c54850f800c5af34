//! Strict JSON: the parse every request body goes through before its schema is checked. Why our
//! own: see the module docs of [`super`] (duplicate keys and out-of-range integers would be read
//! differently upstream).

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// The fixed reasons carried by [`BodyError::InvalidJson`](super::BodyError::InvalidJson).
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

/// serde_json refuses nesting beyond 128 levels on its own, whatever `max_depth` says.
const SERDE_JSON_RECURSION_LIMIT: usize = 128;

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
