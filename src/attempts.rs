//! One request's walk over the keys, shared by the tower future and the reqwest-middleware
//! adapter: which key is next, putting its credential on the request, recording what each
//! attempt came to, and giving up with [`Exhausted`].

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::HeaderMap;

use crate::body::{BoxedBody, Buffered, ExhaustedBody, Peek};
use crate::classify::{ErrorVerdict, Verdict};
use crate::error::{BoxError, Exhausted};
use crate::handle::{CooldownReason, DisableReason};
use crate::keys::KeyInUse;
use crate::layer::Shared;
use crate::pool::{Cursor, Generation, Outcome};

/// Why the request will not be replayed after a key fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NoReplay {
    /// The body could not be copied: the answer goes back as it is.
    BodyNotReplayable,
    /// No key is left to try, or the attempt limit is reached.
    NoKeyLeft,
}

/// What to do after a failed call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterError {
    /// Send the request again, with the key [`Attempts`] moved to.
    Replay,
    /// Give the error to the caller as it is.
    GiveBack,
    /// No key is left: give up with `Exhausted`, carrying the error.
    Exhausted,
}

/// The keys one request has used and may still use.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Attempts {
    cursor: Cursor,
    key: usize,
    /// The generation of the credential the current attempt was sent with.
    generation: Generation,
    count: u32,
    sent_once: bool,
    /// A lost connection was already tried once more.
    lost_once: bool,
}

impl Attempts {
    /// Picks the first key, or `None` when no key is usable.
    pub(crate) fn first(shared: &Shared) -> Option<Attempts> {
        let mut cursor = shared.pool.cursor();
        let key = shared.pool.pick(&mut cursor)?;
        Some(Attempts {
            cursor,
            key,
            generation: Generation::Current,
            count: 0,
            sent_once: false,
            lost_once: false,
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
    /// counts the attempt. With `Credential::None` the key is returned instead, as a
    /// [`KeyInUse`] for the request's extensions, for the inner service to sign with.
    #[must_use]
    pub(crate) fn prepare(&mut self, shared: &Shared, headers: &mut HeaderMap) -> Option<KeyInUse> {
        let cred = shared.pool.begin(self.key);
        self.generation = cred.generation();
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
        self.count += 1;
        tracing::debug!(
            key = shared.pool.label(self.key),
            attempt = self.count,
            "sending request"
        );
        match shared.credential_header() {
            Some(name) => {
                headers.insert(name.clone(), cred.value.clone());
                None
            }
            None => Some(KeyInUse {
                label: shared.pool.label_arc(self.key),
                fingerprint: cred.fingerprint.clone(),
                value: cred.value.clone(),
            }),
        }
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
            shared.pool.record(self.key, self.generation, outcome);
        }
    }

    /// Decides what a failed call (no response) comes to, as the classifier reads the
    /// error: an unreachable upstream blames no key and is given back at once; a lost
    /// connection blames no key and is tried once more; anything else counts against the key
    /// and moves on to the next one.
    pub(crate) fn after_error(
        &mut self,
        shared: &Shared,
        error: &BoxError,
        has_copy: bool,
    ) -> AfterError {
        let key = shared.pool.label(self.key);
        match shared.classifier.classify_error(&**error) {
            ErrorVerdict::Unreachable => {
                tracing::warn!(key, error = %error, "upstream unreachable; no key blamed");
                AfterError::GiveBack
            }
            ErrorVerdict::ConnectionLost if !self.lost_once => {
                tracing::debug!(key, error = %error, "connection lost; trying once more");
                self.lost_once = true;
                match self.advance(shared, has_copy, "connection_lost") {
                    Ok(()) => AfterError::Replay,
                    Err(_) => AfterError::GiveBack,
                }
            }
            ErrorVerdict::ConnectionLost => AfterError::GiveBack,
            _ => {
                tracing::debug!(key, error = %error, "upstream call failed");
                shared
                    .pool
                    .record(self.key, self.generation, Outcome::Error);
                match self.advance(shared, has_copy, "transport_error") {
                    Ok(()) => AfterError::Replay,
                    Err(NoReplay::BodyNotReplayable) => AfterError::GiveBack,
                    Err(NoReplay::NoKeyLeft) => AfterError::Exhausted,
                }
            }
        }
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

/// What a verdict does to the key, with the configured defaults filled in. Every wait the
/// provider gave is capped at `max_cooldown`; the configured ones are the user's own.
fn outcome(shared: &Shared, verdict: Verdict) -> Option<Outcome> {
    let cool = |reason, given: Option<Duration>, default: Duration| match given {
        Some(d) if d > shared.max_cooldown => Outcome::Cool(reason, shared.max_cooldown, true),
        Some(d) => Outcome::Cool(reason, d, false),
        None => Outcome::Cool(reason, default, false),
    };
    Some(match verdict {
        Verdict::Success => Outcome::Success,
        Verdict::Drained { retry_after } => {
            cool(CooldownReason::LimitReached, Some(retry_after), retry_after)
        }
        Verdict::RateLimited { retry_after } => cool(
            CooldownReason::RateLimited,
            retry_after,
            shared.rate_limit_cooldown,
        ),
        Verdict::QuotaExhausted { retry_after } => cool(
            CooldownReason::QuotaExhausted,
            retry_after.filter(|d| *d >= shared.quota_min_cooldown),
            shared.quota_cooldown,
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

/// An error body being read to classify it. If it is dropped before it was classified (the
/// caller gave up on the request mid-read), the key still gets the verdict that the head and
/// the bytes read so far support.
pub(crate) struct Inspection {
    shared: Arc<Shared>,
    attempts: Attempts,
    /// The response head and the read; taken when the inspection is finished.
    reading: Option<(http::response::Parts, Peek)>,
}

impl Inspection {
    pub(crate) fn new(
        shared: &Arc<Shared>,
        attempts: &Attempts,
        parts: http::response::Parts,
        body: BoxedBody,
    ) -> Inspection {
        let peek = Peek::new(body, shared.inspect_limit, shared.inspect_timeout);
        Inspection {
            shared: shared.clone(),
            attempts: *attempts,
            reading: Some((parts, peek)),
        }
    }

    /// Reads until the inspection limit, the end of the body, or the inspection timeout.
    pub(crate) fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match &mut self.reading {
            Some((_, peek)) => peek.poll_peek(cx),
            None => Poll::Ready(()),
        }
    }

    /// The verdict on what was read, and the response with every byte, read or not. The
    /// verdict is not recorded here: the caller does.
    pub(crate) fn finish(mut self) -> (Verdict, http::Response<Buffered>) {
        let (parts, peek) = self.reading.take().expect("an inspection is finished once");
        let verdict = verdict(&self.shared, &parts, &peek);
        (
            verdict,
            http::Response::from_parts(parts, peek.into_buffered()),
        )
    }
}

fn verdict(shared: &Shared, parts: &http::response::Parts, peek: &Peek) -> Verdict {
    shared
        .classifier
        .classify_body(parts.status, &parts.headers, peek.prefix())
}

impl Drop for Inspection {
    fn drop(&mut self) {
        if let Some((parts, peek)) = self.reading.take() {
            let verdict = verdict(&self.shared, &parts, &peek);
            self.attempts
                .record(&self.shared, parts.status.as_u16(), verdict);
        }
    }
}
