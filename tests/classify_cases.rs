//! The default classifier against real provider responses (tests/fixtures/provider-signals.json,
//! gathered from provider docs and public issue threads).

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde_json::Value;
use tower_key_fallback::{Classify, DefaultClassifier, HeadVerdict, Verdict};

fn classify(c: &DefaultClassifier, status: u16, headers: &HeaderMap, body: &[u8]) -> Verdict {
    let status = StatusCode::from_u16(status).unwrap();
    match c.classify_head(status, headers) {
        HeadVerdict::Done(v) => v,
        HeadVerdict::InspectBody => c.classify_body(status, headers, body),
        _ => unreachable!(),
    }
}

/// The verdict a case's `case` field calls for.
fn expected(case: &Value) -> &'static str {
    match case["case"].as_str().unwrap() {
        "rate_limit" => "rate_limited",
        "quota" | "quota_daily" => "quota",
        "request_too_large" | "blocked_edge" | "region_blocked" => "request_fault",
        "invalid_key" | "revoked_key" | "permission_denied" | "account_restricted" => "invalid_key",
        "overloaded" => "server_error",
        other => panic!("unknown case {other}"),
    }
}

fn kind(v: Verdict) -> &'static str {
    match v {
        Verdict::RateLimited { .. } => "rate_limited",
        Verdict::QuotaExhausted { .. } => "quota",
        Verdict::RequestFault => "request_fault",
        Verdict::InvalidKey => "invalid_key",
        Verdict::ServerError => "server_error",
        Verdict::Success | Verdict::Drained { .. } => "success",
        _ => "other",
    }
}

#[test]
fn every_provider_case_gets_its_verdict() {
    let cases: Vec<Value> =
        serde_json::from_str(include_str!("fixtures/provider-signals.json")).unwrap();
    assert_eq!(cases.len(), 40);
    let c = DefaultClassifier::new();
    let mut wrong = Vec::new();
    for case in &cases {
        let mut headers = HeaderMap::new();
        for (name, value) in case["headers"].as_object().unwrap() {
            let name = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).unwrap();
            headers.insert(
                name,
                HeaderValue::from_str(value.as_str().unwrap()).unwrap(),
            );
        }
        let body = case["body"].as_str().unwrap_or("");
        let status = case["status"].as_u64().unwrap() as u16;
        let got = kind(classify(&c, status, &headers, body.as_bytes()));
        if got != expected(case) {
            wrong.push(format!(
                "{} {} {}: got {got}, want {}",
                case["provider"],
                case["case"],
                status,
                expected(case)
            ));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn reset_times_follow_the_documented_order() {
    use std::time::Duration;
    let c = DefaultClassifier::new();
    let body = br#"{"error":{"message":"Please try again in 9.54s.","type":"tokens","code":"rate_limit_exceeded"}}"#;
    let mut h = HeaderMap::new();
    assert_eq!(
        classify(&c, 429, &h, body),
        Verdict::RateLimited {
            retry_after: Some(Duration::from_millis(9_540))
        }
    );
    h.insert(
        "x-ratelimit-remaining-tokens",
        HeaderValue::from_static("0"),
    );
    h.insert(
        "x-ratelimit-reset-tokens",
        HeaderValue::from_static("7.66s"),
    );
    h.insert(
        "x-ratelimit-remaining-requests",
        HeaderValue::from_static("14370"),
    );
    h.insert(
        "x-ratelimit-reset-requests",
        HeaderValue::from_static("2m59.56s"),
    );
    assert_eq!(
        classify(&c, 429, &h, body),
        Verdict::RateLimited {
            retry_after: Some(Duration::from_millis(7_660))
        }
    );
    h.insert("retry-after", HeaderValue::from_static("2"));
    assert_eq!(
        classify(&c, 429, &h, body),
        Verdict::RateLimited {
            retry_after: Some(Duration::from_secs(2))
        }
    );
    h.insert("retry-after-ms", HeaderValue::from_static("1500"));
    assert_eq!(
        classify(&c, 429, &h, body),
        Verdict::RateLimited {
            retry_after: Some(Duration::from_millis(1_500))
        }
    );
    assert_eq!(
        classify(&c, 429, &HeaderMap::new(), b"{}"),
        Verdict::RateLimited { retry_after: None }
    );
}

#[test]
fn drained_successes_and_plain_successes() {
    use std::time::Duration;
    let c = DefaultClassifier::new();
    let mut h = HeaderMap::new();
    h.insert(
        "x-ratelimit-remaining-requests",
        HeaderValue::from_static("14370"),
    );
    h.insert(
        "x-ratelimit-reset-requests",
        HeaderValue::from_static("2m59.56s"),
    );
    h.insert(
        "x-ratelimit-remaining-tokens",
        HeaderValue::from_static("17997"),
    );
    h.insert(
        "x-ratelimit-reset-tokens",
        HeaderValue::from_static("7.66s"),
    );
    assert_eq!(classify(&c, 200, &h, b""), Verdict::Success);
    h.insert(
        "x-ratelimit-remaining-requests",
        HeaderValue::from_static("0"),
    );
    assert_eq!(
        classify(&c, 200, &h, b""),
        Verdict::Drained {
            retry_after: Duration::from_millis(179_560)
        }
    );
    // Azure's Responses API sends -1 for "not applicable": not drained.
    let mut azure = HeaderMap::new();
    azure.insert(
        "x-ratelimit-remaining-tokens",
        HeaderValue::from_static("-1"),
    );
    azure.insert("x-ratelimit-reset-tokens", HeaderValue::from_static("0"));
    assert_eq!(classify(&c, 200, &azure, b""), Verdict::Success);
}

#[test]
fn request_faults_and_server_errors_by_status() {
    let c = DefaultClassifier::new();
    let h = HeaderMap::new();
    for s in [400, 404, 409, 413, 422, 501, 505] {
        assert_eq!(classify(&c, s, &h, b"{}"), Verdict::RequestFault, "{s}");
    }
    for s in [408, 498, 500, 502, 503, 504, 520, 529] {
        assert_eq!(classify(&c, s, &h, b""), Verdict::ServerError, "{s}");
    }
    assert_eq!(classify(&c, 401, &h, b""), Verdict::InvalidKey);
    assert_eq!(classify(&c, 403, &h, b"{}"), Verdict::InvalidKey);
}

#[test]
fn body_patterns_are_configurable() {
    let h = HeaderMap::new();
    let c = DefaultClassifier::new().quota_pattern("monthly allowance gone");
    assert!(matches!(
        classify(&c, 429, &h, b"Your MONTHLY allowance gone"),
        Verdict::QuotaExhausted { .. }
    ));
    let bare = DefaultClassifier::new().without_patterns();
    assert!(matches!(
        classify(&bare, 429, &h, br#"{"type":"insufficient_quota"}"#),
        Verdict::RateLimited { .. }
    ));
}

/// Hostile and broken answers (tests/fixtures/hostile-cases.json): text a client wrote that a
/// provider quotes back, edge pages, cut bodies. None may blame a key beyond what the
/// provider itself asserted.
#[test]
fn hostile_cases_blame_no_key_beyond_what_the_provider_said() {
    let cases: Vec<Value> =
        serde_json::from_str(include_str!("fixtures/hostile-cases.json")).unwrap();
    let c = DefaultClassifier::new();
    let mut wrong = Vec::new();
    for case in &cases {
        let mut headers = HeaderMap::new();
        for (name, value) in case["headers"].as_object().unwrap() {
            headers.insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value.as_str().unwrap()).unwrap(),
            );
        }
        let status = case["status"].as_u64().unwrap() as u16;
        let verdict = classify(
            &c,
            status,
            &headers,
            case["body"].as_str().unwrap().as_bytes(),
        );
        if kind(verdict) != case["expect"].as_str().unwrap() {
            wrong.push(format!("{}: got {verdict:?}", case["name"]));
        }
        if let Some(ms) = case["wait_ms"].as_u64() {
            let want = Some(std::time::Duration::from_millis(ms));
            if verdict != (Verdict::RateLimited { retry_after: want }) {
                wrong.push(format!("{}: got {verdict:?}, want {want:?}", case["name"]));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}
