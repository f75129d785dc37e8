//! What the layer itself answers a proxy's caller: `429` with `Retry-After` when no key can
//! serve, `502` naming the error when the upstream cannot be reached, as OpenAI-style JSON.

use crate::error::Exhausted;

/// What a proxy answers when no key can serve (`exhausted_response(true)`): `502 Bad Gateway`
/// when the last attempt could not reach the upstream at all, naming the error, else
/// `429 Too Many Requests` with `Retry-After` in whole seconds (rounded up; absent when every
/// key is disabled). The body is an OpenAI-style JSON error.
pub(crate) fn proxy_answer(exhausted: &Exhausted) -> http::Response<bytes::Bytes> {
    if let Some(error) = exhausted.last_error() {
        return unreachable_answer(error);
    }
    let wait = exhausted
        .retry_after()
        .map(|d| d.as_secs() + u64::from(d.subsec_nanos() > 0));
    let message = match wait {
        Some(secs) => {
            format!("All API keys are rate limited or unavailable. Retry after {secs} seconds.")
        }
        None => "All API keys are disabled.".to_owned(),
    };
    let mut res = json_error(
        http::StatusCode::TOO_MANY_REQUESTS,
        &message,
        "rate_limit_error",
        "keys_exhausted",
    );
    if let Some(secs) = wait {
        res.headers_mut()
            .insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
    }
    res
}

/// A proxy's `502 Bad Gateway` for an upstream that could not be reached, naming the error
/// and its causes (an error chain holds addresses and reasons, never a key).
pub(crate) fn unreachable_answer(
    error: &(dyn std::error::Error + 'static),
) -> http::Response<bytes::Bytes> {
    let mut message = String::from("The upstream API could not be reached: ");
    message.push_str(&error.to_string());
    let mut cause = error.source();
    while let Some(e) = cause {
        message.push_str(": ");
        message.push_str(&e.to_string());
        cause = e.source();
    }
    json_error(
        http::StatusCode::BAD_GATEWAY,
        &message,
        "api_error",
        "upstream_unreachable",
    )
}

fn json_error(
    status: http::StatusCode,
    message: &str,
    kind: &str,
    code: &str,
) -> http::Response<bytes::Bytes> {
    let mut escaped = String::with_capacity(message.len());
    for c in message.chars() {
        match c {
            '"' => escaped.push_str("\\\""),
            '\\' => escaped.push_str("\\\\"),
            c if (c as u32) < 0x20 => escaped.push_str(&format!("\\u{:04x}", c as u32)),
            c => escaped.push(c),
        }
    }
    let body = format!(
        "{{\"error\":{{\"message\":\"{escaped}\",\"type\":\"{kind}\",\"code\":\"{code}\"}}}}"
    );
    let mut res = http::Response::new(bytes::Bytes::from(body));
    *res.status_mut() = status;
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    res
}
