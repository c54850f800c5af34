#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Body, query and response validation against the real seed spec (`Spec::builtin()`).
//!
//! Submitted values that must never come back in an error are the canary `CANARY-7f3a`; each
//! refusal's whole `Debug` is searched for it.

use std::fmt::Debug;
use std::sync::OnceLock;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use greenhouse_gateway::spec::{Operation, Spec};
use greenhouse_gateway::validate::{
    BodyError, BodyFacts, MAX_PROBLEMS, QueryError, ValidationOptions, Validators,
    parse_json_strict, reason,
};
use http::HeaderValue;
use proptest::prelude::*;
use serde_json::{Value, json};

const CANARY: &str = "CANARY-7f3a";
const TYPICAL_CANDIDATE: &str = include_str!("fixtures/validation/candidate.json");

struct Seed {
    spec: Spec,
    validators: Validators,
}

fn seed() -> &'static Seed {
    static SEED: OnceLock<Seed> = OnceLock::new();
    SEED.get_or_init(|| {
        let spec = Spec::builtin().expect("seed spec compiles");
        let validators =
            Validators::compile(&spec, ValidationOptions::default()).expect("validators compile");
        Seed { spec, validators }
    })
}

fn op(id: &str) -> &'static Operation {
    seed()
        .spec
        .operation(id)
        .unwrap_or_else(|| panic!("no {id}"))
}

fn json_ct() -> HeaderValue {
    HeaderValue::from_static("application/json")
}

fn create(v: &Value) -> Result<BodyFacts, BodyError> {
    create_raw(&serde_json::to_vec(v).unwrap())
}

fn create_raw(body: &[u8]) -> Result<BodyFacts, BodyError> {
    seed()
        .validators
        .check_body(op("createPartnerCandidate"), Some(&json_ct()), body)
}

fn minimal() -> Value {
    json!({"external_id": "e-1", "first_name": "Ada", "last_name": "Lovelace"})
}

fn with(mut base: Value, key: &str, value: Value) -> Value {
    base[key] = value;
    base
}

/// The (pointer, keyword) pairs of an `Invalid` body answer.
fn invalid(r: &Result<BodyFacts, BodyError>) -> Vec<(String, String)> {
    match r {
        Err(BodyError::Invalid(p)) => p
            .iter()
            .map(|p| (p.pointer.clone(), p.keyword.clone()))
            .collect(),
        other => panic!("expected Invalid, got {other:?}"),
    }
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(p, k)| (p.to_string(), k.to_string()))
        .collect()
}

fn assert_no_canary(what: &impl Debug) {
    let text = format!("{what:?}");
    assert!(!text.contains(CANARY), "a submitted value leaked: {text}");
    assert!(!text.contains("CANARY"), "a submitted value leaked: {text}");
}

fn query(op_id: &str, q: &str) -> Result<(), QueryError> {
    seed().validators.check_query(op(op_id), Some(q))
}

fn query_invalid(op_id: &str, q: &str) -> Vec<(String, String)> {
    match query(op_id, q) {
        Err(QueryError::Invalid(p)) => p
            .iter()
            .map(|p| (p.pointer.clone(), p.keyword.clone()))
            .collect(),
        other => panic!("expected Invalid for {q}, got {other:?}"),
    }
}

fn nested_arrays(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

// ------------------------------------------------------------------------------------------
// Compilation

#[test]
fn validators_are_send_and_sync_and_compile_for_every_seed_operation() {
    fn assert_send_sync<T: Send + Sync>(_: &T) {}
    assert_send_sync(&seed().validators);
    assert_eq!(seed().spec.operations().len(), 6);
    for op in seed().spec.operations() {
        // A compiled operation never answers "no validator".
        let r = seed().validators.check_query(op, None);
        assert!(r.is_ok(), "{}: {r:?}", op.id);
    }
}

#[test]
fn schema_that_cannot_compile_is_reported_with_its_operation_id() {
    let text = r#"
openapi: 3.1.0
info: {title: t, version: "1"}
paths:
  /a:
    post:
      operationId: brokenBody
      requestBody:
        content:
          application/json:
            schema: {type: 12}
      responses: {}
  /b:
    get:
      operationId: deepObjectQuery
      parameters:
        - {name: filter, in: query, style: deepObject, schema: {type: object}}
      responses: {}
"#;
    let spec = Spec::from_text(text).unwrap();
    let errors = Validators::compile(&spec, ValidationOptions::default()).unwrap_err();
    assert!(
        errors.iter().any(|e| e.starts_with("brokenBody: ")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.starts_with("deepObjectQuery: ")),
        "{errors:?}"
    );
}

#[test]
fn openapi_30_leftovers_nullable_and_boolean_exclusive_minimum_compile_and_apply() {
    let text = r#"
openapi: 3.1.0
info: {title: t, version: "1"}
paths:
  /a:
    post:
      operationId: legacy
      requestBody:
        required: true
        content:
          application/json:
            schema:
              type: object
              properties:
                n: {type: integer, minimum: 0, exclusiveMinimum: true}
                s: {type: string, nullable: true, enum: [x, y]}
      responses: {}
"#;
    let spec = Spec::from_text(text).unwrap();
    let v = Validators::compile(&spec, ValidationOptions::default()).unwrap();
    let op = spec.operation("legacy").unwrap();
    let check = |b: &str| v.check_body(op, Some(&json_ct()), b.as_bytes());
    assert!(check(r#"{"n": 1, "s": null}"#).is_ok());
    assert!(check(r#"{"s": "x"}"#).is_ok());
    assert_eq!(
        invalid(&check(r#"{"n": 0, "s": "z"}"#)),
        pairs(&[("/n", "exclusiveMinimum"), ("/s", "enum")])
    );
}

// ------------------------------------------------------------------------------------------
// Valid requests for every operation

#[test]
fn every_seed_operation_accepts_a_valid_request() {
    let v = &seed().validators;
    for op in seed().spec.operations() {
        assert!(v.check_query(op, None).is_ok(), "{}", op.id);
        assert!(v.check_query(op, Some("")).is_ok(), "{}", op.id);
        let body: &[u8] = match op.id.as_str() {
            "createPartnerCandidate" => TYPICAL_CANDIDATE.as_bytes(),
            "createTrackingLink" => br#"{"job_id": 4012, "source_id": 12, "external_id": "t-1"}"#,
            _ => b"",
        };
        let r = v.check_body(op, Some(&json_ct()), body);
        assert!(r.is_ok(), "{}: {r:?}", op.id);
    }
    assert!(
        query(
            "listPartnerCandidates",
            "candidate_ids=1,2,3&external_ids=a,b"
        )
        .is_ok()
    );
}

#[test]
fn typical_candidate_passes_and_yields_only_its_external_id() {
    let facts = create_raw(TYPICAL_CANDIDATE.as_bytes()).unwrap();
    assert_eq!(facts.external_ids, vec!["ext-10452".to_string()]);
}

#[test]
fn tracking_link_body_yields_its_external_id_and_checks_types() {
    let v = &seed().validators;
    let link = op("createTrackingLink");
    let facts = v
        .check_body(link, Some(&json_ct()), br#"{"external_id": "t-9"}"#)
        .unwrap();
    assert_eq!(facts.external_ids, vec!["t-9".to_string()]);
    let r = v.check_body(
        link,
        Some(&json_ct()),
        format!(r#"{{"job_id": "{CANARY}"}}"#).as_bytes(),
    );
    assert_eq!(invalid(&r), pairs(&[("/job_id", "type")]));
    assert_no_canary(&r);
}

#[test]
fn body_on_an_operation_without_request_body_is_refused_and_empty_is_fine() {
    let v = &seed().validators;
    let jobs = op("listPartnerJobs");
    assert!(v.check_body(jobs, None, b"").is_ok());
    match v.check_body(jobs, Some(&json_ct()), b"{}") {
        Err(BodyError::Invalid(p)) => {
            assert_eq!(p.len(), 1);
            assert_eq!((p[0].pointer.as_str(), p[0].keyword.as_str()), ("", "body"));
            assert_eq!(p[0].message, "this operation takes no body");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn empty_body_on_required_request_body_is_invalid_json() {
    assert_eq!(create_raw(b""), Err(BodyError::InvalidJson(reason::EMPTY)));
}

// ------------------------------------------------------------------------------------------
// Schema violations: exact pointers

#[test]
fn each_missing_required_field_is_named_in_the_pointer() {
    for field in ["external_id", "first_name", "last_name"] {
        let mut body = minimal();
        body.as_object_mut().unwrap().remove(field);
        let r = create(&body);
        assert_eq!(
            invalid(&r),
            pairs(&[(&format!("/{field}"), "required")]),
            "{field}"
        );
    }
    assert_eq!(
        invalid(&create(&json!({}))),
        pairs(&[
            ("/external_id", "required"),
            ("/first_name", "required"),
            ("/last_name", "required")
        ])
    );
}

#[test]
fn wrong_types_point_at_the_field() {
    let body = with(minimal(), "first_name", json!(12));
    let body = with(body, "company", json!([CANARY]));
    let body = with(
        body,
        "application",
        json!({"job_id": CANARY, "referrer": "x"}),
    );
    let r = create(&body);
    assert_eq!(
        invalid(&r),
        pairs(&[
            ("/application/job_id", "type"),
            ("/application/referrer", "type"),
            ("/company", "type"),
            ("/first_name", "type"),
        ])
    );
    match &r {
        Err(BodyError::Invalid(p)) => assert_eq!(p[3].message, "must be of type string"),
        other => panic!("{other:?}"),
    }
    assert_no_canary(&r);
    let r = create(&json!([minimal()]));
    assert_eq!(invalid(&r), pairs(&[("", "type")]));
}

#[test]
fn bad_email_format_points_at_the_email_value() {
    let body = with(
        minimal(),
        "emails",
        json!([{"value": "ada@example.com"}, {"value": CANARY, "type": "work"}]),
    );
    let r = create(&body);
    assert_eq!(invalid(&r), pairs(&[("/emails/1/value", "format")]));
    match &r {
        Err(BodyError::Invalid(p)) => assert_eq!(p[0].message, "is not an email address"),
        other => panic!("{other:?}"),
    }
    assert_no_canary(&r);
}

#[test]
fn wrong_nested_shapes_application_as_array_and_email_item_as_string() {
    let body = with(minimal(), "application", json!([{"job_id": 1}]));
    let body = with(body, "emails", json!([CANARY]));
    let r = create(&body);
    assert_eq!(
        invalid(&r),
        pairs(&[("/application", "type"), ("/emails/0", "type")])
    );
    assert_no_canary(&r);
}

#[test]
fn attachment_type_outside_the_enum_is_refused() {
    let body = with(
        minimal(),
        "attachments",
        json!([{"type": CANARY, "url": "https://files.example.com/a.pdf"}]),
    );
    let r = create(&body);
    assert_eq!(invalid(&r), pairs(&[("/attachments/0/type", "enum")]));
    assert_no_canary(&r);
}

#[test]
fn attachment_with_both_or_neither_content_and_url_is_one_of() {
    let content = BASE64.encode(b"%PDF-1.4");
    let body = with(
        minimal(),
        "attachments",
        json!([
            {"type": "resume", "content": content, "url": "https://files.example.com/a.pdf"},
            {"type": "resume", "content": content},
            {"type": "resume", "filename": "x.pdf"},
            {"type": "resume", "content": null, "url": null},
        ]),
    );
    assert_eq!(
        invalid(&create(&body)),
        pairs(&[
            ("/attachments/0", "oneOf"),
            ("/attachments/2", "oneOf"),
            ("/attachments/3", "oneOf"),
            ("/attachments/3/content", "type"),
            ("/attachments/3/url", "type"),
        ])
    );
}

#[test]
fn attachment_url_must_be_https_and_a_uri() {
    let body = with(
        minimal(),
        "attachments",
        json!([
            {"type": "resume", "url": format!("http://{CANARY}.example.com/cv.pdf")},
            {"type": "resume", "url": format!("not a uri {CANARY}")},
            {"type": "resume", "url": "HTTPS://files.example.com/ok.pdf"},
        ]),
    );
    let r = create(&body);
    assert_eq!(
        invalid(&r),
        pairs(&[
            ("/attachments/0/url", "format"),
            ("/attachments/1/url", "format")
        ])
    );
    assert_no_canary(&r);
}

#[test]
fn attachment_content_must_be_standard_base64() {
    for bad in [
        format!("{CANARY}!"),    // not the alphabet
        "SGVsbG8".to_string(),   // padding missing
        "SGVs bG8=".to_string(), // whitespace
        "SGVsbG8_".to_string(),  // URL-safe alphabet
        "SGVsbG9=".to_string(),  // non-canonical trailing bits
        "SGVs=G8=".to_string(),  // padding in the middle
    ] {
        let body = with(
            minimal(),
            "attachments",
            json!([{"type": "resume", "content": bad}]),
        );
        let r = create(&body);
        assert_eq!(
            invalid(&r),
            pairs(&[("/attachments/0/content", "contentEncoding")]),
            "{bad}"
        );
        assert_no_canary(&r);
    }
}

#[test]
fn oversized_decoded_attachment_is_refused_and_only_the_body_itself_is_payload_too_large() {
    let opts = ValidationOptions {
        max_attachment_bytes: 16,
        max_body_bytes: 4096,
        ..ValidationOptions::default()
    };
    let v = Validators::compile(&seed().spec, opts).unwrap();
    let cand = op("createPartnerCandidate");
    let att = |n: usize| json!({"type": "resume", "content": BASE64.encode(vec![1u8; n])});
    let check = |b: &Value| v.check_body(cand, Some(&json_ct()), &serde_json::to_vec(b).unwrap());
    assert!(check(&with(minimal(), "attachments", json!([att(16)]))).is_ok());
    assert_eq!(
        invalid(&check(&with(minimal(), "attachments", json!([att(17)])))),
        pairs(&[("/attachments/0/content", "maxDecodedBytes")])
    );
    // Attachments count once, as the base64 the body carries: three that each fit, in a body
    // within the limit, pass (their decoded bytes are not counted a second time).
    let roomy = Validators::compile(
        &seed().spec,
        ValidationOptions {
            max_attachment_bytes: 1000,
            ..opts
        },
    )
    .unwrap();
    let three = with(
        minimal(),
        "attachments",
        json!([att(900), att(900), att(900)]),
    );
    let body = serde_json::to_vec(&three).unwrap();
    assert!(body.len() < 4096);
    assert!(roomy.check_body(cand, Some(&json_ct()), &body).is_ok());
    let huge = vec![b' '; 4097];
    assert_eq!(
        v.check_body(cand, Some(&json_ct()), &huge),
        Err(BodyError::PayloadTooLarge)
    );
}

#[test]
fn problems_are_sorted_deduplicated_and_capped() {
    let emails: Vec<Value> = (0..120).map(|_| json!({"value": CANARY})).collect();
    let body = with(json!({}), "emails", json!(emails));
    let r = create(&body);
    let p = invalid(&r);
    assert_eq!(p.len(), MAX_PROBLEMS);
    let mut sorted = p.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(p, sorted);
    assert_eq!(p[0], ("/emails/0/value".to_string(), "format".to_string()));
    assert_no_canary(&r);
}

#[test]
fn huge_invalid_instance_reports_only_its_first_problem() {
    let emails = vec![json!(1); 20_000];
    let r = create(&with(minimal(), "emails", json!(emails)));
    assert_eq!(invalid(&r), pairs(&[("/emails/0", "type")]));
}

#[test]
fn error_messages_never_contain_any_submitted_value() {
    let body = json!({
        "external_id": 7,
        "first_name": [CANARY],
        "emails": [{"value": CANARY}, CANARY, {"value": 5, "type": [CANARY]}],
        "application": {"job_id": CANARY, "referrer": {"type": 1, "value": [CANARY]}},
        "prospect": CANARY,
        "attachments": [
            {"type": CANARY, "content": format!("{CANARY}=="), "url": format!("http://{CANARY}")},
            {"type": "resume", "url": format!("{CANARY}://x y")},
            CANARY
        ],
        CANARY: CANARY,
    });
    let r = create(&body);
    assert!(matches!(r, Err(BodyError::Invalid(_))));
    assert_no_canary(&r);
    let r = query(
        "listPartnerCandidates",
        &format!("candidate_ids=1,{CANARY}"),
    );
    assert!(matches!(r, Err(QueryError::Invalid(_))));
    assert_no_canary(&r);
    let drift = json!([{"id": CANARY, "name": [CANARY], "requisition_id": 5}]);
    let problems = seed().validators.check_response(
        op("listPartnerJobs"),
        200,
        &serde_json::to_vec(&drift).unwrap(),
    );
    assert!(!problems.is_empty());
    assert_no_canary(&problems);
    for bad in [
        format!(r#"{{"a": "{CANARY}""#),
        format!(r#"{{"a": "{CANARY}", "a": 1}}"#),
        format!(r#"{{"{CANARY}": 1e400}}"#),
        format!(r#"{{"{CANARY}": nope}}"#),
    ] {
        let r = create_raw(bad.as_bytes());
        assert!(matches!(r, Err(BodyError::InvalidJson(_))), "{bad}");
        assert_no_canary(&r);
    }
}

#[test]
fn object_keys_the_schema_does_not_declare_are_redacted_in_pointers() {
    let text = r#"
openapi: 3.1.0
info: {title: t, version: "1"}
paths:
  /a:
    post:
      operationId: tags
      requestBody:
        required: true
        content:
          application/json:
            schema:
              type: object
              properties:
                tags: {type: object, additionalProperties: {type: integer}}
      responses: {}
"#;
    let spec = Spec::from_text(text).unwrap();
    let v = Validators::compile(&spec, ValidationOptions::default()).unwrap();
    let body = format!(r#"{{"tags": {{"{CANARY}": "x", "ok": 1, "5551234567": "y"}}}}"#);
    let r = v.check_body(
        spec.operation("tags").unwrap(),
        Some(&json_ct()),
        body.as_bytes(),
    );
    assert_eq!(invalid(&r), pairs(&[("/tags/*", "type")]));
    assert_no_canary(&r);
}

// ------------------------------------------------------------------------------------------
// Content types

#[test]
fn content_type_must_be_json_in_utf8() {
    let body = serde_json::to_vec(&minimal()).unwrap();
    let v = &seed().validators;
    let cand = op("createPartnerCandidate");
    for refused in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/json; charset=latin1",
        "application/json; charset=iso-8859-1",
        "application/jsonx",
        "application/+json",
        "text/json",
        "application/json; charset",
    ] {
        let ct = HeaderValue::from_str(refused).unwrap();
        assert_eq!(
            v.check_body(cand, Some(&ct), &body),
            Err(BodyError::UnsupportedMediaType),
            "{refused}"
        );
    }
    assert_eq!(
        v.check_body(cand, None, &body),
        Err(BodyError::UnsupportedMediaType)
    );
    let opaque = HeaderValue::from_bytes(b"application/json; x=\xff").unwrap();
    assert_eq!(
        v.check_body(cand, Some(&opaque), &body),
        Err(BodyError::UnsupportedMediaType)
    );
    for accepted in [
        "application/json",
        "Application/JSON",
        "application/json; charset=UTF-8",
        "application/json;charset=\"utf-8\"",
        "application/json; foo=bar",
        "application/vnd.greenhouse+json",
        "application/merge-patch+json; charset=utf-8",
    ] {
        let ct = HeaderValue::from_str(accepted).unwrap();
        let r = v.check_body(cand, Some(&ct), &body);
        assert!(r.is_ok(), "{accepted}: {r:?}");
    }
}

// ------------------------------------------------------------------------------------------
// Strict JSON

#[test]
fn malformed_json_is_invalid_json() {
    for (bad, why) in [
        (&b"{"[..], reason::TRUNCATED),
        (b"{\"external_id\": }", reason::MALFORMED),
        (b"{\"a\": 1} {}", reason::MALFORMED),
        (b"{'a': 1}", reason::MALFORMED),
        (b"{\"a\": 01}", reason::MALFORMED),
        (b"{\"a\": NaN}", reason::MALFORMED),
        (b"{\"a\": \"\\ud800\"}", reason::MALFORMED),
        (b"{\"a\": \"tab\tinside\"}", reason::MALFORMED),
        (b"\xEF\xBB\xBF{}", reason::MALFORMED),
        (b"   ", reason::TRUNCATED),
    ] {
        assert_eq!(
            create_raw(bad),
            Err(BodyError::InvalidJson(why)),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
}

#[test]
fn invalid_utf8_is_invalid_json() {
    assert_eq!(
        create_raw(b"{\"external_id\": \"\xff\xfe\", \"first_name\": \"a\", \"last_name\": \"b\"}"),
        Err(BodyError::InvalidJson(reason::NOT_UTF8))
    );
    assert_eq!(
        create_raw(b"{\"a\": \"\xC3\x28\"}"),
        Err(BodyError::InvalidJson(reason::NOT_UTF8))
    );
}

#[test]
fn nesting_deeper_than_max_depth_is_invalid_json() {
    assert!(parse_json_strict(nested_arrays(64).as_bytes(), 64).is_ok());
    assert_eq!(
        parse_json_strict(nested_arrays(65).as_bytes(), 64),
        Err(reason::TOO_DEEP)
    );
    assert_eq!(
        parse_json_strict(nested_arrays(500).as_bytes(), 64),
        Err(reason::TOO_DEEP)
    );
    // serde_json's own limit (128) holds whatever the setting says.
    assert_eq!(
        parse_json_strict(nested_arrays(129).as_bytes(), 10_000),
        Err(reason::TOO_DEEP)
    );
    // The candidate object is depth 1, so 63 more levels fit and 64 do not.
    let ok = format!(
        r#"{{"external_id": "e", "first_name": "a", "last_name": "b", "x": {}}}"#,
        nested_arrays(63)
    );
    assert!(create_raw(ok.as_bytes()).is_ok());
    let deep = format!(
        r#"{{"external_id": "e", "first_name": "a", "last_name": "b", "x": {}}}"#,
        nested_arrays(64)
    );
    assert_eq!(
        create_raw(deep.as_bytes()),
        Err(BodyError::InvalidJson(reason::TOO_DEEP))
    );
    let objects = format!("{}1{}", r#"{"a":"#.repeat(65), "}".repeat(65));
    assert_eq!(
        create_raw(objects.as_bytes()),
        Err(BodyError::InvalidJson(reason::TOO_DEEP))
    );
}

#[test]
fn duplicate_keys_at_any_depth_are_invalid_json() {
    for dup in [
        r#"{"external_id": "a", "first_name": "b", "last_name": "c", "external_id": "d"}"#,
        r#"{"external_id": "a", "first_name": "b", "last_name": "c", "emails": [{"value": "a@example.com", "value": "b@example.com"}]}"#,
        r#"{"application": {"referrer": {"type": "x", "type": "y"}}}"#,
        r#"{"a": 1, "\u0061": 2}"#,
    ] {
        assert_eq!(
            create_raw(dup.as_bytes()),
            Err(BodyError::InvalidJson(reason::DUPLICATE_KEY)),
            "{dup}"
        );
    }
    // The same key in sibling objects, or as text inside a value, is fine.
    assert!(
        create_raw(
            br#"{"external_id": "\"external_id\": 1", "first_name": "b", "last_name": "c", "emails": [{"value": "a@example.com"}, {"value": "a@example.com"}]}"#
        )
        .is_ok()
    );
}

#[test]
fn numbers_that_do_not_fit_are_invalid_json() {
    for huge in [
        "9223372036854775808",
        "-9223372036854775809",
        "18446744073709551616",
        "123456789012345678901234567890",
        "1e400",
        "-1e400",
        "1e19",
        "9.3e18",
    ] {
        let body = format!(
            r#"{{"external_id": "e", "first_name": "a", "last_name": "b", "application": {{"job_id": {huge}}}}}"#
        );
        assert_eq!(
            create_raw(body.as_bytes()),
            Err(BodyError::InvalidJson(reason::NUMBER_RANGE)),
            "{huge}"
        );
    }
    for fits in ["9223372036854775807", "-9223372036854775808", "0", "-0"] {
        let body = format!(
            r#"{{"external_id": "e", "first_name": "a", "last_name": "b", "application": {{"job_id": {fits}}}}}"#
        );
        assert!(create_raw(body.as_bytes()).is_ok(), "{fits}");
    }
    assert_eq!(
        parse_json_strict(b"[1.5, 1e-400, 2.5e10]", 64).unwrap(),
        json!([1.5, 0.0, 2.5e10])
    );
}

// ------------------------------------------------------------------------------------------
// Query strings

#[test]
fn form_style_non_exploded_lists_are_split_on_commas() {
    assert!(query("listPartnerCandidates", "candidate_ids=1,2,3").is_ok());
    assert!(query("listPartnerCandidates", "candidate_ids=-4").is_ok());
    assert!(query("listPartnerCandidates", "external_ids=a,b,c&candidate_ids=").is_ok());
    assert!(query("listPartnerCandidates", "external_ids=with+space,x%20y").is_ok());
    assert!(query("listPartnerCandidates", "&&candidate_ids=7&").is_ok());
}

#[test]
fn non_integer_candidate_id_points_at_its_index() {
    assert_eq!(
        query_invalid("listPartnerCandidates", "candidate_ids=1,x"),
        pairs(&[("/query/candidate_ids/1", "type")])
    );
    assert_eq!(
        query_invalid(
            "listPartnerCandidates",
            "candidate_ids=9223372036854775808,2,1.5,,+3"
        ),
        pairs(&[
            ("/query/candidate_ids/0", "type"),
            ("/query/candidate_ids/2", "type"),
            ("/query/candidate_ids/3", "type"),
            ("/query/candidate_ids/4", "type"),
        ])
    );
}

#[test]
fn percent_encoded_commas_separate_items_like_the_upstream_reads_them() {
    assert!(query("listPartnerCandidates", "candidate_ids=1%2C2%2c3").is_ok());
    assert!(query("listPartnerCandidates", "candidate%5Fids=1").is_ok());
    assert_eq!(
        query_invalid("listPartnerCandidates", "candidate_ids=1%2Cx"),
        pairs(&[("/query/candidate_ids/1", "type")])
    );
    assert_eq!(
        query_invalid("listPartnerCandidates", "external_ids=%FF"),
        pairs(&[("/query/external_ids", "encoding")])
    );
}

#[test]
fn repeated_non_exploded_parameter_is_invalid_naming_it() {
    assert_eq!(
        query_invalid("listPartnerCandidates", "candidate_ids=1&candidate_ids=2"),
        pairs(&[("/query/candidate_ids", "style")])
    );
    assert_eq!(
        query_invalid(
            "listPartnerCandidates",
            "external_ids=a&candidate_ids=1&external_ids=b"
        ),
        pairs(&[("/query/external_ids", "style")])
    );
}

#[test]
fn undeclared_query_parameters_are_listed_by_safe_name() {
    assert_eq!(
        query(
            "listPartnerCandidates",
            "page=2&candidate_ids=1&per_page=5&page=3"
        ),
        Err(QueryError::Undeclared(vec![
            "page".to_string(),
            "per_page".to_string()
        ]))
    );
    assert_eq!(
        query("listPartnerJobs", "na%20me%3Cscript%3E=1&%FF%FE=2&%3C%3E=3"),
        Err(QueryError::Undeclared(vec![
            "namescript".to_string(),
            "(unprintable name)".to_string()
        ]))
    );
    let long = "a".repeat(100);
    match query("listPartnerJobs", &format!("{long}=1")) {
        Err(QueryError::Undeclared(names)) => assert_eq!(names, vec!["a".repeat(64)]),
        other => panic!("{other:?}"),
    }
    // Undeclared comes first, even with invalid declared values alongside.
    assert!(matches!(
        query("listPartnerCandidates", "candidate_ids=x&On-Behalf-Of=a"),
        Err(QueryError::Undeclared(names)) if names == ["On-Behalf-Of"]
    ));
}

#[test]
fn query_parameter_styles_required_scalar_and_exploded() {
    let text = r#"
openapi: 3.1.0
info: {title: t, version: "1"}
paths:
  /a:
    get:
      operationId: styles
      parameters:
        - {name: limit, in: query, required: true, schema: {type: integer, maximum: 100}}
        - {name: tag, in: query, schema: {type: array, items: {type: string, enum: [a, b]}}}
        - {name: ids, in: query, style: pipeDelimited, explode: false, schema: {type: array, items: {type: integer}}}
        - {name: on, in: query, schema: {type: boolean}}
      responses: {}
"#;
    let spec = Spec::from_text(text).unwrap();
    let v = Validators::compile(&spec, ValidationOptions::default()).unwrap();
    let op = spec.operation("styles").unwrap();
    let check = |q: &str| v.check_query(op, Some(q));
    let problems = |q: &str| match check(q) {
        Err(QueryError::Invalid(p)) => p
            .into_iter()
            .map(|p| (p.pointer, p.keyword))
            .collect::<Vec<_>>(),
        other => panic!("{q}: {other:?}"),
    };
    assert!(check("limit=5&tag=a&tag=b&ids=1|2&on=true").is_ok());
    assert_eq!(
        v.check_query(op, None),
        Err(QueryError::Invalid(vec![
            greenhouse_gateway::error::FieldProblem {
                pointer: "/query/limit".into(),
                keyword: "required".into(),
                message: "is required".into(),
            }
        ]))
    );
    assert_eq!(
        problems("limit=500&tag=c&ids=1|x&on=yes"),
        pairs(&[
            ("/query/ids/1", "type"),
            ("/query/limit", "maximum"),
            ("/query/on", "type"),
            ("/query/tag/0", "enum"),
        ])
    );
    assert_eq!(
        problems("limit=1&limit=2"),
        pairs(&[("/query/limit", "style")])
    );
}

// ------------------------------------------------------------------------------------------
// Responses (report only)

#[test]
fn response_drifting_from_the_spec_yields_problems() {
    let v = &seed().validators;
    let jobs = op("listPartnerJobs");
    let ok = br#"[{"id": 1, "name": "Engineer", "requisition_id": null, "departments": [], "offices": [{}]}]"#;
    assert!(v.check_response(jobs, 200, ok).is_empty());
    let drift = br#"[{"id": 1}, {"id": "12", "name": 3, "requisition_id": 7}]"#;
    let p: Vec<_> = v
        .check_response(jobs, 200, drift)
        .into_iter()
        .map(|p| (p.pointer, p.keyword))
        .collect();
    assert_eq!(
        p,
        pairs(&[
            ("/1/id", "type"),
            ("/1/name", "type"),
            ("/1/requisition_id", "type")
        ])
    );
    // Undocumented statuses are not judged.
    assert!(v.check_response(jobs, 500, b"<html>").is_empty());
}

#[test]
fn response_formats_uri_date_time_and_email_are_asserted() {
    let v = &seed().validators;
    let link = op("createTrackingLink");
    assert!(
        v.check_response(
            link,
            201,
            br#"{"url": "https://grnh.se/abc", "expires_at": "2030-01-01T00:00:00Z"}"#
        )
        .is_empty()
    );
    let p: Vec<_> = v
        .check_response(
            link,
            201,
            br#"{"url": "not a uri", "expires_at": "tomorrow"}"#,
        )
        .into_iter()
        .map(|p| (p.pointer, p.keyword))
        .collect();
    assert_eq!(p, pairs(&[("/expires_at", "format"), ("/url", "format")]));
    let me = op("getCurrentPartnerUser");
    let p = v.check_response(me, 200, br#"{"id": 1, "email": "nobody"}"#);
    assert_eq!(p.len(), 1);
    assert_eq!(
        (p[0].pointer.as_str(), p[0].keyword.as_str()),
        ("/email", "format")
    );
    let created = v.check_response(op("createPartnerCandidate"), 201, br#"{"external_id": 5}"#);
    assert_eq!(
        created
            .into_iter()
            .map(|p| (p.pointer, p.keyword))
            .collect::<Vec<_>>(),
        pairs(&[
            ("/external_id", "type"),
            ("/first_name", "required"),
            ("/last_name", "required")
        ])
    );
}

#[test]
fn response_that_is_not_json_is_one_json_problem() {
    let p = seed()
        .validators
        .check_response(op("listPartnerJobs"), 200, b"{not json");
    assert_eq!(p.len(), 1);
    assert_eq!((p[0].pointer.as_str(), p[0].keyword.as_str()), ("", "json"));
}

// ------------------------------------------------------------------------------------------
// Properties

/// One generated field value, with what the schema must say about it.
#[derive(Debug, Clone)]
enum Scalar {
    Absent,
    Text(String),
    Int(i64),
    Flag(bool),
    Null,
    List,
}

impl Scalar {
    fn value(&self) -> Option<Value> {
        match self {
            Scalar::Absent => None,
            Scalar::Text(s) => Some(json!(s)),
            Scalar::Int(i) => Some(json!(i)),
            Scalar::Flag(b) => Some(json!(b)),
            Scalar::Null => Some(Value::Null),
            Scalar::List => Some(json!([CANARY])),
        }
    }
}

#[derive(Debug, Clone)]
enum Email {
    Valid(String),
    BadFormat(String),
    NotObject,
    ValueNotString(i64),
}

#[derive(Debug, Clone)]
enum Application {
    Absent,
    Job(i64),
    JobAsText,
    AsArray,
}

#[derive(Debug, Clone)]
enum Carrier {
    Content(Vec<u8>),
    HttpsUrl,
    HttpUrl,
    Both,
    Neither,
    BadBase64,
}

#[derive(Debug, Clone)]
struct Attachment {
    carrier: Carrier,
    known_type: bool,
}

#[derive(Debug, Clone)]
struct Candidate {
    required: [Scalar; 3],
    company: Scalar,
    emails: Option<Vec<Email>>,
    application: Application,
    attachments: Option<Vec<Attachment>>,
}

const REQUIRED: [&str; 3] = ["external_id", "first_name", "last_name"];

fn canary_text() -> impl Strategy<Value = String> {
    "[a-z0-9]{0,8}".prop_map(|s| format!("{CANARY}-{s}"))
}

fn scalar() -> impl Strategy<Value = Scalar> {
    prop_oneof![
        1 => Just(Scalar::Absent),
        6 => canary_text().prop_map(Scalar::Text),
        1 => any::<i64>().prop_map(Scalar::Int),
        1 => any::<bool>().prop_map(Scalar::Flag),
        1 => Just(Scalar::Null),
        1 => Just(Scalar::List),
    ]
}

fn candidate() -> impl Strategy<Value = Candidate> {
    let email = prop_oneof![
        4 => "[a-z]{1,8}".prop_map(|s| Email::Valid(format!("{s}@example.com"))),
        1 => canary_text().prop_map(Email::BadFormat),
        1 => Just(Email::NotObject),
        1 => any::<i64>().prop_map(Email::ValueNotString),
    ];
    let application = prop_oneof![
        Just(Application::Absent),
        any::<i64>().prop_map(Application::Job),
        Just(Application::JobAsText),
        Just(Application::AsArray),
    ];
    let carrier = prop_oneof![
        3 => prop::collection::vec(any::<u8>(), 0..48).prop_map(Carrier::Content),
        2 => Just(Carrier::HttpsUrl),
        1 => Just(Carrier::HttpUrl),
        1 => Just(Carrier::Both),
        1 => Just(Carrier::Neither),
        1 => Just(Carrier::BadBase64),
    ];
    let attachment =
        (carrier, prop::bool::weighted(0.8)).prop_map(|(carrier, known_type)| Attachment {
            carrier,
            known_type,
        });
    (
        [scalar(), scalar(), scalar()],
        scalar(),
        prop::option::of(prop::collection::vec(email, 0..4)),
        application,
        prop::option::of(prop::collection::vec(attachment, 0..4)),
    )
        .prop_map(
            |(required, company, emails, application, attachments)| Candidate {
                required,
                company,
                emails,
                application,
                attachments,
            },
        )
}

impl Candidate {
    fn to_json(&self) -> Value {
        let mut m = serde_json::Map::new();
        for (name, s) in REQUIRED.iter().zip(&self.required) {
            if let Some(v) = s.value() {
                m.insert(name.to_string(), v);
            }
        }
        if let Some(v) = self.company.value() {
            m.insert("company".into(), v);
        }
        if let Some(emails) = &self.emails {
            let list = emails
                .iter()
                .map(|e| match e {
                    Email::Valid(s) | Email::BadFormat(s) => json!({"value": s, "type": "work"}),
                    Email::NotObject => json!(CANARY),
                    Email::ValueNotString(i) => json!({"value": i}),
                })
                .collect();
            m.insert("emails".into(), Value::Array(list));
        }
        match self.application {
            Application::Absent => {}
            Application::Job(id) => {
                m.insert("application".into(), json!({"job_id": id}));
            }
            Application::JobAsText => {
                m.insert("application".into(), json!({"job_id": CANARY}));
            }
            Application::AsArray => {
                m.insert("application".into(), json!([{"job_id": 1}]));
            }
        }
        if let Some(atts) = &self.attachments {
            let list = atts
                .iter()
                .map(|a| {
                    let mut o = serde_json::Map::new();
                    o.insert(
                        "type".into(),
                        json!(if a.known_type { "resume" } else { CANARY }),
                    );
                    let content = json!(BASE64.encode(b"hello"));
                    let url = json!("https://files.example.com/cv.pdf");
                    match &a.carrier {
                        Carrier::Content(bytes) => {
                            o.insert("content".into(), json!(BASE64.encode(bytes)));
                        }
                        Carrier::HttpsUrl => {
                            o.insert("url".into(), url);
                        }
                        Carrier::HttpUrl => {
                            o.insert("url".into(), json!(format!("http://{CANARY}.example.com/")));
                        }
                        Carrier::Both => {
                            o.insert("content".into(), content);
                            o.insert("url".into(), url);
                        }
                        Carrier::Neither => {}
                        Carrier::BadBase64 => {
                            o.insert("content".into(), json!(format!("{CANARY}!")));
                        }
                    }
                    Value::Object(o)
                })
                .collect();
            m.insert("attachments".into(), Value::Array(list));
        }
        Value::Object(m)
    }

    /// The oracle: the (pointer, keyword) pairs the schema and attachment rules must report,
    /// written from the seed spec by hand.
    fn expected(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut push = |p: String, k: &str| out.push((p, k.to_string()));
        for (name, s) in REQUIRED.iter().zip(&self.required) {
            match s {
                Scalar::Absent => push(format!("/{name}"), "required"),
                Scalar::Text(_) => {}
                _ => push(format!("/{name}"), "type"),
            }
        }
        match self.company {
            Scalar::Absent | Scalar::Text(_) => {}
            _ => push("/company".into(), "type"),
        }
        for (i, e) in self.emails.iter().flatten().enumerate() {
            match e {
                Email::Valid(_) => {}
                Email::BadFormat(_) => push(format!("/emails/{i}/value"), "format"),
                Email::NotObject => push(format!("/emails/{i}"), "type"),
                Email::ValueNotString(_) => push(format!("/emails/{i}/value"), "type"),
            }
        }
        match self.application {
            Application::Absent | Application::Job(_) => {}
            Application::JobAsText => push("/application/job_id".into(), "type"),
            Application::AsArray => push("/application".into(), "type"),
        }
        for (i, a) in self.attachments.iter().flatten().enumerate() {
            if !a.known_type {
                push(format!("/attachments/{i}/type"), "enum");
            }
            match a.carrier {
                Carrier::Content(_) | Carrier::HttpsUrl => {}
                Carrier::HttpUrl => push(format!("/attachments/{i}/url"), "format"),
                Carrier::Both | Carrier::Neither => push(format!("/attachments/{i}"), "oneOf"),
                Carrier::BadBase64 => push(format!("/attachments/{i}/content"), "contentEncoding"),
            }
        }
        out.sort();
        out
    }
}

fn arbitrary_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| json!(i)),
        (-1.0e15f64..1.0e15).prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(6, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,6}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn generated_candidates_match_the_hand_written_oracle(c in candidate()) {
        let body = c.to_json();
        let r = create(&body);
        let expected = c.expected();
        if expected.is_empty() {
            let facts = r.unwrap();
            let id = match &c.required[0] { Scalar::Text(s) => s.clone(), _ => unreachable!() };
            prop_assert_eq!(facts.external_ids, vec![id]);
        } else {
            prop_assert_eq!(invalid(&r), expected);
            let text = format!("{r:?}");
            prop_assert!(!text.contains("CANARY"), "leak: {}", text);
        }
    }

    #[test]
    fn strict_parse_agrees_with_serde_json_on_well_formed_json(v in arbitrary_json()) {
        let text = serde_json::to_vec(&v).unwrap();
        let strict = parse_json_strict(&text, 64);
        let lenient: Value = serde_json::from_slice(&text).unwrap();
        prop_assert_eq!(strict, Ok(lenient));
        let pretty = serde_json::to_vec_pretty(&v).unwrap();
        prop_assert!(parse_json_strict(&pretty, 64).is_ok());
        // Any JSON at all: the verdict is a value, never a panic.
        let _ = create_raw(&text);
        let _ = seed().validators.check_response(op("listPartnerJobs"), 200, &text);
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_strict_acceptance_implies_serde_acceptance(
        bytes in prop::collection::vec(any::<u8>(), 0..256)
    ) {
        if let Ok(v) = parse_json_strict(&bytes, 64) {
            let lenient: Value = serde_json::from_slice(&bytes).unwrap();
            prop_assert_eq!(v, lenient);
        }
        let _ = create_raw(&bytes);
        for id in ["createTrackingLink", "listPartnerJobs"] {
            let _ = seed().validators.check_body(op(id), Some(&json_ct()), &bytes);
        }
        let _ = seed().validators.check_response(op("createPartnerCandidate"), 201, &bytes);
    }

    #[test]
    fn json_shaped_noise_never_panics(
        text in r#"[\[\]{}",:0-9eE.+\-a-z\\ ]{0,64}"#
    ) {
        let _ = create_raw(text.as_bytes());
        if let Ok(v) = parse_json_strict(text.as_bytes(), 64) {
            let lenient: Value = serde_json::from_slice(text.as_bytes()).unwrap();
            prop_assert_eq!(v, lenient);
        }
    }

    #[test]
    fn arbitrary_query_strings_never_panic(q in r#"[a-z_&=,%0-9A-F+.]{0,64}"#) {
        for o in seed().spec.operations() {
            let _ = seed().validators.check_query(o, Some(&q));
        }
    }
}

#[test]
fn one_query_pass_finds_undeclared_names_malformed_values_and_the_declared_pairs_as_received() {
    let v = seed()
        .validators
        .operation(op("listPartnerCandidates"))
        .expect("compiled");
    let found = v.inspect_query(Some("candidate_ids=abc&secret=CANARY&candidate_ids=2"));
    assert_eq!(found.undeclared, vec!["secret".to_string()]);
    assert!(!found.invalid.is_empty(), "abc is not an id");
    assert!(
        found
            .invalid
            .iter()
            .all(|p| p.pointer.starts_with("/query/candidate_ids"))
    );
    assert_eq!(
        found.declared.as_deref(),
        Some("candidate_ids=abc&candidate_ids=2"),
        "declared pairs byte for byte, undeclared ones left out"
    );
    assert_no_canary(&found);
    // The same findings as the two-step check gives.
    assert!(matches!(
        v.check_query(Some("candidate_ids=abc&secret=1")),
        Err(QueryError::Undeclared(_))
    ));
    assert_eq!(
        v.inspect_query(Some("candidate_ids=1,2")),
        greenhouse_gateway::validate::QueryFindings {
            declared: Some("candidate_ids=1,2".into()),
            ..Default::default()
        }
    );
}
