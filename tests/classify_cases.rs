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

/// Generated responses (statuses, wait headers, error bodies) never make the classifier
/// panic; every wait it reports is at most 1e9 s (about 31 years); a drained key waits a
/// while and a rate limit less than an hour (longer is a quota); only 400, 402, 403 and 429
/// ask for the body.
#[test]
fn generated_responses_classify_within_bounds() {
    use std::time::Duration;
    const NAMES: &[&str] = &[
        "retry-after",
        "retry-after-ms",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
        "anthropic-ratelimit-requests-remaining",
        "anthropic-ratelimit-requests-reset",
        "anthropic-ratelimit-output-tokens-remaining",
        "anthropic-ratelimit-output-tokens-reset",
        "content-type",
    ];
    const WHOLE: &[&str] = &[
        "0",
        "0",
        "0",
        "-1",
        "2",
        "1500",
        "2m59.56s",
        "7.66s",
        "99999999999h",
        "Sun, 06 Nov 1994 08:49:37 GMT",
        "Fri, 31 Dec 9999 23:59:59 GMT",
        "2024-03-26T20:00:00Z",
        "2999-12-31T23:59:59.999999999+02:00",
    ];
    const PIECES: &[&str] = &[
        "0", "1", "7", ".", "66", "s", "m", "h", "ms", "µs", " ", "-", ":", "T", "Z", "GMT", ",",
    ];
    const BODY: &[&str] = &[
        r#"{"error":{"message":""#,
        "Please try again in ",
        "Please retry in ",
        "retry after ",
        " seconds",
        r#""retryDelay": ""#,
        "\"",
        "9m38.016s",
        "5.289",
        "99999999999h",
        "2",
        "s.",
        " ",
        "insufficient_quota",
        "(TPD)",
        "limit: 0",
        "API_KEY_INVALID",
        "Request too large",
        "high demand",
        "<html",
        "unsupported_country_region_territory",
    ];
    const STATUSES: &[u16] = &[
        200, 204, 400, 401, 402, 403, 408, 413, 429, 498, 500, 501, 529,
    ];
    /// Half the time one whole value, else a few pieces of them run together.
    fn value(next: &mut impl FnMut() -> u64) -> HeaderValue {
        let value: String = if next().is_multiple_of(2) {
            WHOLE[next() as usize % WHOLE.len()].to_owned()
        } else {
            (0..2 + next() % 3)
                .map(|_| PIECES[next() as usize % PIECES.len()])
                .collect()
        };
        HeaderValue::from_bytes(value.as_bytes()).unwrap()
    }
    let c = DefaultClassifier::new();
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let max = Duration::from_secs(1_000_000_000);
    let (mut drained, mut limited, mut quota) = (0, 0, 0);
    for _ in 0..5_000 {
        let r = next();
        let status = if r % 4 == 0 {
            100 + (r >> 8) as u16 % 900
        } else {
            STATUSES[(r >> 8) as usize % STATUSES.len()]
        };
        let status = StatusCode::from_u16(status).unwrap();
        let mut headers = HeaderMap::new();
        for _ in 0..next() % 6 {
            let i = next() as usize % NAMES.len();
            headers.append(NAMES[i], value(&mut next));
            // A remaining count comes with its reset, and is often zero.
            if NAMES[i].contains("remaining") {
                if next() % 2 == 0 {
                    headers.insert(NAMES[i], HeaderValue::from_static("0"));
                }
                headers.append(NAMES[i + 1], value(&mut next));
            }
        }
        let mut body = Vec::new();
        for _ in 0..next() % 8 {
            let r = next();
            if r % 16 == 0 {
                body.push((r >> 8) as u8);
            } else {
                body.extend_from_slice(BODY[(r >> 8) as usize % BODY.len()].as_bytes());
            }
        }
        let inspect = matches!(status.as_u16(), 400 | 402 | 403 | 429);
        let verdict = match c.classify_head(status, &headers) {
            HeadVerdict::Done(v) => {
                assert!(!inspect, "{status} decided from the head");
                v
            }
            HeadVerdict::InspectBody => {
                assert!(inspect, "{status} asked for the body");
                c.classify_body(status, &headers, &body)
            }
            _ => unreachable!(),
        };
        let case = || format!("{status} {headers:?} {:?}", String::from_utf8_lossy(&body));
        match verdict {
            Verdict::Drained { retry_after } => {
                drained += 1;
                assert!(!retry_after.is_zero() && retry_after <= max, "{}", case());
            }
            Verdict::RateLimited {
                retry_after: Some(d),
            } => {
                limited += 1;
                assert!(d < Duration::from_secs(3600), "{}", case());
            }
            Verdict::QuotaExhausted {
                retry_after: Some(d),
            } => {
                quota += 1;
                assert!(d <= max, "{}", case());
            }
            _ => {}
        }
    }
    // The generator reaches every verdict that carries a wait.
    assert!(
        drained > 20 && limited > 20 && quota > 20,
        "{drained} {limited} {quota}"
    );
}
