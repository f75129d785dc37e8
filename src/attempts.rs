//! One request's walk over the keys, shared by the tower future and the reqwest-middleware
//! adapter: which key is next, putting its credential on the request, recording what each
//! attempt came to, and giving up with [`Exhausted`].

use http::HeaderMap;

use crate::body::ExhaustedBody;
use crate::classify::Verdict;
use crate::error::{BoxError, Exhausted};
use crate::handle::{CooldownReason, DisableReason};
use crate::layer::Shared;
use crate::pool::{Cursor, Outcome};

/// Why the request will not be replayed after a key fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NoReplay {
    /// The body could not be copied: the answer goes back as it is.
    BodyNotReplayable,
    /// No key is left to try, or the attempt limit is reached.
    NoKeyLeft,
}

/// The keys one request has used and may still use.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Attempts {
    cursor: Cursor,
    key: usize,
    count: u32,
    sent_once: bool,
}

impl Attempts {
    /// Picks the first key, or `None` when no key is usable.
    pub(crate) fn first(shared: &Shared) -> Option<Attempts> {
        let mut cursor = shared.pool.cursor();
        let key = shared.pool.pick(&mut cursor)?;
        Some(Attempts {
            cursor,
            key,
            count: 0,
            sent_once: false,
        })
    }

    /// A copy of the request for the next replay, made by `copy`, when another key could
    /// still serve after the coming attempt; no copy is made otherwise.
    pub(crate) fn keep_copy<T>(
        &mut self,
        shared: &Shared,
        copy: impl FnOnce() -> Option<T>,
    ) -> Option<T> {
        if self.count + 1 >= shared.max_attempts || !shared.pool.has_next(&self.cursor) {
            return None;
        }
        let kept = copy();
        if kept.is_none() && self.count == 0 {
            self.sent_once = true;
            tracing::debug!(
                "request body cannot be replayed: sent once, without fallback to other keys"
            );
        }
        kept
    }

    /// Puts the current key's credential on the request, replacing any the caller set, and
    /// counts the attempt.
    pub(crate) fn prepare(&mut self, shared: &Shared, headers: &mut HeaderMap) {
        let value = shared.pool.begin(self.key);
        // One pass to see whether the caller set any other credential (usually not), rather
        // than a removal per credential header name; most names differ in length alone.
        let lengths = shared.strip_lengths;
        if headers.keys().any(|name| {
            lengths & (1u64 << name.as_str().len().min(63)) != 0 && shared.strip.contains(name)
        }) {
            for name in shared.strip.iter() {
                headers.remove(name);
            }
        }
        if let Some(name) = shared.credential_header() {
            headers.insert(name.clone(), value);
        }
        self.count += 1;
        tracing::debug!(
            key = shared.pool.label(self.key),
            attempt = self.count,
            "sending request"
        );
    }

    /// How many upstream calls were made.
    pub(crate) fn count(&self) -> u32 {
        self.count
    }

    /// Records a response's verdict on the current key.
    pub(crate) fn record(&self, shared: &Shared, status: u16, verdict: Verdict) {
        tracing::debug!(
            key = shared.pool.label(self.key),
            status,
            verdict = ?verdict,
            "upstream answered"
        );
        if let Some(outcome) = outcome(shared, verdict) {
            shared.pool.record(self.key, outcome);
        }
    }

    /// Records a failed call (timeout, connection error) on the current key.
    pub(crate) fn record_error(&self, shared: &Shared, error: &BoxError) {
        tracing::debug!(key = shared.pool.label(self.key), error = %error, "upstream call failed");
        shared.pool.record(self.key, Outcome::Error);
    }

    /// After a key fault: moves to the next usable key, or says why not. `has_copy` tells
    /// whether a copy of the request is at hand to replay.
    pub(crate) fn advance(
        &mut self,
        shared: &Shared,
        has_copy: bool,
        reason: &'static str,
    ) -> Result<(), NoReplay> {
        if !has_copy {
            return Err(if self.sent_once {
                NoReplay::BodyNotReplayable
            } else {
                NoReplay::NoKeyLeft
            });
        }
        if self.count >= shared.max_attempts {
            return Err(NoReplay::NoKeyLeft);
        }
        let next = shared
            .pool
            .pick(&mut self.cursor)
            .ok_or(NoReplay::NoKeyLeft)?;
        tracing::info!(
            from = shared.pool.label(self.key),
            to = shared.pool.label(next),
            reason,
            "switching API key"
        );
        self.key = next;
        Ok(())
    }
}

/// The error when no key can serve, after `attempts` upstream calls.
pub(crate) fn exhausted(
    shared: &Shared,
    attempts: u32,
    last_response: Option<http::Response<ExhaustedBody>>,
    last_error: Option<BoxError>,
) -> Exhausted {
    let retry_after = shared.pool.earliest();
    if attempts == 0 {
        tracing::warn!(
            keys = shared.pool.len(),
            "no API key is usable; request not sent"
        );
    } else {
        tracing::warn!(
            keys = shared.pool.len(),
            attempts,
            retry_after_ms = retry_after.map(|d| d.as_millis() as u64),
            "no API key could serve the request"
        );
    }
    Exhausted {
        retry_after,
        attempts,
        keys: shared.pool.len(),
        last_response,
        last_error,
    }
}

/// What a verdict does to the key, with the configured defaults filled in.
fn outcome(shared: &Shared, verdict: Verdict) -> Option<Outcome> {
    Some(match verdict {
        Verdict::Success => Outcome::Success,
        Verdict::Drained { retry_after } => {
            Outcome::Cool(CooldownReason::LimitReached, retry_after)
        }
        Verdict::RateLimited { retry_after } => Outcome::Cool(
            CooldownReason::RateLimited,
            retry_after.unwrap_or(shared.rate_limit_cooldown),
        ),
        Verdict::QuotaExhausted { retry_after } => Outcome::Cool(
            CooldownReason::QuotaExhausted,
            retry_after
                .filter(|d| *d >= shared.quota_min_cooldown)
                .unwrap_or(shared.quota_cooldown),
        ),
        Verdict::InvalidKey => Outcome::Disable(DisableReason::InvalidKey),
        Verdict::ServerError => Outcome::Error,
        Verdict::RequestFault => return None,
    })
}

/// A short name for a key-fault verdict, for logs.
pub(crate) fn verdict_name(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::RateLimited { .. } => "rate_limited",
        Verdict::QuotaExhausted { .. } => "quota_exhausted",
        Verdict::InvalidKey => "invalid_key",
        Verdict::ServerError => "server_error",
        _ => "other",
    }
}

/// What a proxy answers when no key can serve (`exhausted_response(true)`): `502 Bad Gateway`
/// when the last attempt could not reach the upstream at all, else `429 Too Many Requests`
/// with `Retry-After` in whole seconds (rounded up; absent when every key is disabled). The
/// body is an OpenAI-style JSON error.
pub(crate) fn proxy_answer(exhausted: &Exhausted) -> http::Response<bytes::Bytes> {
    let json = |message: &str, kind: &str, code: &str| {
        format!(
            "{{\"error\":{{\"message\":\"{message}\",\"type\":\"{kind}\",\"code\":\"{code}\"}}}}"
        )
    };
    let (status, wait, message) = if exhausted.last_error().is_some() {
        let body = json(
            "The upstream API could not be reached.",
            "api_error",
            "upstream_unreachable",
        );
        (http::StatusCode::BAD_GATEWAY, None, body)
    } else {
        let wait = exhausted
            .retry_after()
            .map(|d| d.as_secs() + u64::from(d.subsec_nanos() > 0));
        let message = match wait {
            Some(secs) => {
                format!("All API keys are rate limited or unavailable. Retry after {secs} seconds.")
            }
            None => "All API keys are disabled.".to_owned(),
        };
        let body = json(&message, "rate_limit_error", "keys_exhausted");
        (http::StatusCode::TOO_MANY_REQUESTS, wait, body)
    };
    let mut res = http::Response::new(bytes::Bytes::from(message));
    *res.status_mut() = status;
    let headers = res.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    if let Some(secs) = wait {
        headers.insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
    }
    res
}
