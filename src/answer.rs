//! What the caller gets when no key can serve: the [`Exhausted`] error, or, for a proxy,
//! the layer's own answer: `429` with `Retry-After`, or `502` naming the error when the
//! upstream cannot be reached, as OpenAI-style JSON.

use std::fmt;
use std::time::Duration;

use http::{HeaderMap, Response, StatusCode};

use crate::body::InspectedBody;
use crate::error::BoxError;

/// No key could serve the request: every key was tried or is cooling down or disabled.
///
/// The service's error is a [`BoxError`]; downcast it to find this:
///
/// ```
/// # use tower_key_fallback::{BoxError, Exhausted};
/// fn wait_hint(err: &BoxError) -> Option<std::time::Duration> {
///     err.downcast_ref::<Exhausted>().and_then(Exhausted::retry_after)
/// }
/// ```
///
/// It carries the last upstream response, when one was received, with every byte of its
/// body, so nothing the provider said is lost.
pub struct Exhausted {
    pub(crate) retry_after: Option<Duration>,
    pub(crate) attempts: u32,
    pub(crate) keys: usize,
    pub(crate) last_response: Option<Response<InspectedBody>>,
    pub(crate) last_error: Option<BoxError>,
}

impl Exhausted {
    /// How long until a key becomes usable again: `None` when every key is disabled (only a
    /// reset or rotation helps), zero when a key recovered meanwhile.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// How many upstream calls this request made (zero when no key was usable at all).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The status of the last upstream response, if one was received.
    pub fn last_status(&self) -> Option<StatusCode> {
        self.last_response.as_ref().map(Response::status)
    }

    /// The headers of the last upstream response, if one was received.
    pub fn last_headers(&self) -> Option<&HeaderMap> {
        self.last_response.as_ref().map(Response::headers)
    }

    /// The last upstream call's error (a timeout, a connection error), when the last attempt
    /// failed that way rather than with a response.
    pub fn last_error(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        self.last_error.as_deref()
    }

    /// Takes the last upstream response, with its whole body, if one was received.
    pub fn take_last_response(&mut self) -> Option<Response<InspectedBody>> {
        self.last_response.take()
    }
}

impl fmt::Debug for Exhausted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Exhausted")
            .field("retry_after", &self.retry_after)
            .field("attempts", &self.attempts)
            .field("keys", &self.keys)
            .field("last_status", &self.last_status())
            .field("last_error", &self.last_error)
            .finish()
    }
}

impl fmt::Display for Exhausted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no API key could serve the request ({} keys", self.keys)?;
        if self.attempts > 0 {
            write!(f, ", {} attempts", self.attempts)?;
        }
        if let Some(status) = self.last_status() {
            write!(f, ", last status {}", status.as_u16())?;
        }
        if let Some(error) = &self.last_error {
            write!(f, ", last error: {error}")?;
        }
        write!(f, "): ")?;
        match self.retry_after {
            Some(d) if d.is_zero() => write!(f, "a key is usable again now"),
            Some(d) => write!(f, "the next key is usable in {:.1}s", d.as_secs_f64()),
            None => write!(f, "every key is disabled; reset or rotate them"),
        }
    }
}

impl std::error::Error for Exhausted {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.last_error
            .as_ref()
            .map(|e| &**e as &(dyn std::error::Error + 'static))
    }
}

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
