//! Attachments: the lists whose items carry a base64 `content` or an https `url`, found in the
//! schema at compile time and checked in every body (exactly one of the two, the decoded size,
//! canonical base64, an https URL), and the size arithmetic that `config` uses to keep an
//! attachment's base64 within the body limit. Kept together so the size rules have one home.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::Value;

use super::{OpValidators, itoa_usize, problem, push_escaped};
use crate::error::FieldProblem;

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

/// One step of a schema path to an attachment list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Step {
    Prop(String),
    Items,
}

/// Finds arrays whose item schema declares both `content` and `url`: the attachment lists.
pub(super) fn find_attachment_sites(
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
pub(super) fn is_standard_base64(s: &str) -> bool {
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

impl OpValidators {
    /// Follows one attachment site's schema path through the instance and checks each item.
    pub(super) fn walk_attachments(
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
