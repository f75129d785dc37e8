//! The fuzz targets' harness: each entry point runs crate-private parsers (reached through
//! `tower_key_fallback::__fuzz`, compiled only with `--cfg fuzzing`, which cargo-fuzz sets)
//! on the input and asserts the invariants their callers rely on.

use std::mem::discriminant;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use tower_key_fallback::__fuzz::{self as parse, header_hint, MAX_WAIT};
use tower_key_fallback::{Classify, DefaultClassifier, HeadVerdict, Verdict};

/// Every header-value parser on `data`, then `data` as the value of every header the
/// classifier reads, through `classify_head`.
pub fn header_parsers(data: &[u8]) {
    // 2024-03-26T19:58:30Z, and an hour later.
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_711_483_110);
    let later = now + Duration::from_secs(3600);
    let secs = bounded("seconds", parse::seconds(data));
    let millis = bounded("millis", parse::millis(data));
    assert_eq!(secs.is_some(), millis.is_some(), "same grammar, other unit");
    if let (Some(s), Some(m)) = (secs, millis) {
        assert!(m <= s, "{m:?} ms-scaled > {s:?} s-scaled");
    }
    let ra = bounded("retry_after", parse::retry_after(data, || now));
    if secs.is_some() {
        assert_eq!(ra, secs, "delay-seconds first");
    }
    let ra_later = parse::retry_after(data, || later);
    assert_eq!(ra.is_some(), ra_later.is_some());
    if let (Some(a), Some(b)) = (ra, ra_later) {
        assert!(b <= a, "a later clock made the wait longer");
    }
    let reset = bounded("rfc3339_until", parse::rfc3339_until(data, now));
    let reset_later = parse::rfc3339_until(data, later);
    assert_eq!(reset.is_some(), reset_later.is_some());
    if let (Some(a), Some(b)) = (reset, reset_later) {
        assert!(b <= a, "a later clock made the wait longer");
    }
    let text = String::from_utf8_lossy(data);
    let go = bounded("go_duration", parse::go_duration(&text));
    assert_eq!(go, parse::go_duration(&text), "not deterministic");
    bounded("body_hint", parse::body_hint(data));
    // find_ci against a naive search: the first byte says how long the needle is.
    if let Some((&n, rest)) = data.split_first() {
        let (needle, hay) = rest.split_at((n as usize % 8).min(rest.len()));
        let naive = hay
            .windows(needle.len().max(1))
            .position(|w| w.eq_ignore_ascii_case(needle));
        let want = if needle.is_empty() { Some(0) } else { naive };
        assert_eq!(parse::find_ci(hay, needle), want);
    }

    // The same bytes (less those a header value cannot hold) in every header the
    // classifier reads; once with the remaining counts at zero, once at the input.
    let value: Vec<u8> = data
        .iter()
        .copied()
        .filter(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f))
        .collect();
    let Ok(value) = HeaderValue::from_bytes(&value) else {
        return;
    };
    let zero = HeaderValue::from_static("0");
    for remaining in [&zero, &value] {
        let mut headers = HeaderMap::new();
        for name in [
            "retry-after",
            "retry-after-ms",
            "x-ratelimit-reset-requests",
            "x-ratelimit-reset-tokens",
            "anthropic-ratelimit-requests-reset",
            "anthropic-ratelimit-tokens-reset",
            "anthropic-ratelimit-input-tokens-reset",
            "anthropic-ratelimit-output-tokens-reset",
        ] {
            headers.insert(HeaderName::from_static(name), value.clone());
        }
        for name in [
            "x-ratelimit-remaining-requests",
            "x-ratelimit-remaining-tokens",
            "anthropic-ratelimit-requests-remaining",
            "anthropic-ratelimit-tokens-remaining",
            "anthropic-ratelimit-input-tokens-remaining",
            "anthropic-ratelimit-output-tokens-remaining",
        ] {
            headers.insert(HeaderName::from_static(name), remaining.clone());
        }
        bounded("header_hint", header_hint(&headers));
        let c = default_classifier();
        for code in [
            100, 200, 204, 304, 399, 400, 401, 402, 403, 429, 500, 503, 529,
        ] {
            let status = StatusCode::from_u16(code).unwrap();
            match c.classify_head(status, &headers) {
                HeadVerdict::Done(v) => {
                    assert!(!matches!(code, 400 | 402 | 403 | 429), "{code}: {v:?}");
                    assert!(
                        code >= 400 || matches!(v, Verdict::Success | Verdict::Drained { .. }),
                        "{code}: {v:?}"
                    );
                    check_verdict(v);
                }
                // InspectBody (the enum is non-exhaustive).
                _ => {
                    assert!(matches!(code, 400 | 402 | 403 | 429), "{code}")
                }
            }
        }
    }
}

/// `data` as a response: a status line, `name: value` header lines, a blank line and the
/// body (any part may be missing). Classified as that status and as 400, 402, 403, 429.
pub fn classify_body(data: &[u8]) {
    let (status_line, rest) = split_line(data);
    let status = std::str::from_utf8(status_line)
        .ok()
        .and_then(|s| s.trim().parse::<u16>().ok())
        .and_then(|code| StatusCode::from_u16(code).ok());
    let mut headers = HeaderMap::new();
    let mut rest = rest;
    while !rest.is_empty() {
        let (line, tail) = split_line(rest);
        rest = tail;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        let colon = line.iter().position(|&b| b == b':').unwrap_or(line.len());
        let (name, value) = (&line[..colon], line.get(colon + 1..).unwrap_or(b""));
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.trim_ascii()),
            HeaderValue::from_bytes(value.trim_ascii()),
        ) {
            headers.append(name, value);
        }
    }
    let body = rest;
    let c = default_classifier();
    let codes = [400, 402, 403, 429].map(|code| StatusCode::from_u16(code).unwrap());
    for status in status.into_iter().chain(codes) {
        let head = c.classify_head(status, &headers);
        let v = c.classify_body(status, &headers, body);
        check_verdict(v);
        // The clock may move between two calls (an RFC 3339 reset), so only the kinds
        // are compared.
        let again = c.classify_body(status, &headers, body);
        assert_eq!(discriminant(&v), discriminant(&again), "not deterministic");
        match (status.as_u16(), head) {
            (_, HeadVerdict::Done(h)) => {
                check_verdict(h);
                assert_eq!(
                    discriminant(&v),
                    discriminant(&h),
                    "{status}: {h:?} then {v:?}"
                );
            }
            (402, HeadVerdict::InspectBody) => {
                assert!(matches!(v, Verdict::QuotaExhausted { .. }), "{v:?}")
            }
            (403, HeadVerdict::InspectBody) => {
                assert!(
                    matches!(v, Verdict::RequestFault | Verdict::InvalidKey),
                    "{v:?}"
                )
            }
            (400 | 429, HeadVerdict::InspectBody) => {}
            (code, h) => panic!("{code}: {h:?}"),
        }
    }
}

/// The `.env` parser on `data` (and the merge into a key set on what it parsed).
pub fn dotenv(data: &[u8]) {
    use tower_key_fallback::__fuzz::{merge_dotenv, parse_dotenv as parse};
    use tower_key_fallback::{ConfigError, DotenvError};

    let path = std::path::Path::new("/fuzz/.env");
    let lines = 1 + data.iter().filter(|&&b| b == b'\n').count();
    let file = match (parse(path, data), parse(path, data)) {
        (Ok(file), Ok(again)) => {
            assert_eq!(file, again, "not deterministic");
            file
        }
        (Err(err), Err(again)) => {
            let DotenvError::Syntax { line, problem, .. } = &err else {
                panic!("parse gave {err:?}");
            };
            assert!(
                matches!(&again, DotenvError::Syntax { line: l, problem: p, .. } if l == line && p == problem),
                "not deterministic: {err:?}, then {again:?}"
            );
            assert!((1..=lines).contains(line), "line {line} of {lines}");
            // Path, line number and a fixed text: nothing from the file.
            assert_eq!(
                err.to_string(),
                format!("/fuzz/.env line {line}: {problem}")
            );
            return;
        }
        (a, b) => panic!("not deterministic: {a:?}, then {b:?}"),
    };
    for (name, (value, line)) in &file {
        let mut bytes = name.bytes();
        assert!(matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_'));
        assert!(bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.'));
        assert!((1..=lines).contains(line), "line {line} of {lines}");
        // Written back double-quoted with dotenvy's escapes, the value reads the same
        // (dotenvy has no escape for a carriage return).
        if value.contains('\r') {
            continue;
        }
        let mut quoted = format!("{name}=\"");
        for c in value.chars() {
            match c {
                '"' | '\\' | '$' => quoted.extend(['\\', c]),
                '\n' => quoted.push_str("\\n"),
                c => quoted.push(c),
            }
        }
        quoted.push_str("\"\n");
        let back = parse(path, quoted.as_bytes()).expect("a written-back value parses");
        assert_eq!(
            back.get(name),
            Some(&(value.clone(), 1)),
            "{quoted:?}"
        );
    }
    // The key set from the file, for a prefix that its first name (in order) is under.
    let first = file.keys().min().map(|n| {
        let base = n.trim_end_matches(|c: char| c.is_ascii_digit());
        base.strip_suffix('_')
            .filter(|_| base.len() < n.len())
            .unwrap_or(n)
    });
    for prefix in first.into_iter().chain(["K"]) {
        let Err(err) = merge_dotenv(prefix, path, data) else {
            continue;
        };
        let DotenvError::Keys { error, origin } = &err else {
            panic!("merge gave {err:?}");
        };
        // The message is made of names, never values.
        let known = |n: &str| file.contains_key(n);
        let line_of = |n: &str| file.get(n).map(|(_, line)| (path.to_owned(), *line));
        let name = match error {
            ConfigError::NoKeys { var } => {
                assert_eq!(var.as_deref(), Some(prefix));
                None
            }
            ConfigError::Empty { name }
            | ConfigError::InvalidValue { name }
            | ConfigError::Quoted { name } => Some(name),
            ConfigError::Duplicate { name, first } => {
                assert!(known(first) || first.starts_with("key #"), "{first}");
                Some(name)
            }
            other => panic!("merge gave {other:?}"),
        };
        if let Some(name) = name {
            assert!(known(name), "{name}");
            assert_eq!(origin, &line_of(name));
        }
        let mut want = error.to_string();
        if let Some((path, line)) = origin {
            want += &format!(" (set in {} line {line})", path.display());
        }
        assert_eq!(err.to_string(), want);
    }
}

fn default_classifier() -> &'static DefaultClassifier {
    static C: std::sync::OnceLock<DefaultClassifier> = std::sync::OnceLock::new();
    C.get_or_init(DefaultClassifier::new)
}

fn bounded(what: &str, d: Option<Duration>) -> Option<Duration> {
    if let Some(d) = d {
        assert!(d <= MAX_WAIT, "{what} gave {d:?}");
    }
    d
}

/// Every wait within bounds; a drained key waits a while; a rate limit waits less than
/// what the classifier calls a quota (one hour by default).
fn check_verdict(v: Verdict) {
    match v {
        Verdict::Drained { retry_after } => {
            assert!(retry_after <= MAX_WAIT && !retry_after.is_zero(), "{v:?}");
        }
        Verdict::RateLimited { retry_after } => {
            let d = bounded("RateLimited", retry_after);
            assert!(d.is_none_or(|d| d < Duration::from_secs(3600)), "{v:?}");
        }
        Verdict::QuotaExhausted { retry_after } => {
            bounded("QuotaExhausted", retry_after);
        }
        _ => {}
    }
}

fn split_line(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, b""),
    }
}

/// A message of the shared key state (feature `redis`) as Redis hands it over: anything a
/// hostile or broken Redis publishes. It never panics, and what reads writes back as itself.
pub fn share_message(data: &[u8]) {
    parse::share_message(data);
}
