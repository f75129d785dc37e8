//! The per-request path, top to bottom: pick a key, set the credential, keep a copy if another
//! key could serve, call; classify the answer (reading a bounded prefix of an error body when
//! the head is not enough); record the verdict on the key; hand back the response, or ready
//! the service again and replay the copy with the next key, or give up with [`Exhausted`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::body::{boxed, Buffered, ExhaustedBody, KeyFallbackBody, Peek, TryCloneBody};
use crate::classify::{HeadVerdict, Verdict};
use crate::error::{BoxError, Exhausted};
use crate::handle::{CooldownReason, DisableReason};
use crate::layer::Shared;
use crate::pool::{Cursor, Outcome};

pin_project! {
    /// The future of [`KeyFallback`](crate::KeyFallback).
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S::Future>,
        shared: Arc<Shared>,
        // A clone of the inner service for replays; `None` when no replay can happen.
        svc: Option<S>,
        // A copy of the request for the next replay; `None` when no replay can happen.
        backup: Option<Request<B>>,
        cursor: Cursor,
        key: usize,
        attempts: u32,
        // The body could not be copied, so the request is sent once.
        sent_once: bool,
        // The last key fault, kept in case no key is left to replay with.
        last: Option<Last>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        // An upstream call is in flight with `key`.
        Calling { #[pin] fut: F },
        // Reading a bounded prefix of an error body to classify it.
        Inspecting { parts: Option<http::response::Parts>, peek: Option<Peek> },
        // Driving the service clone to readiness before replaying with `key`.
        Readying,
        // No key can serve: answer with `Exhausted` on the next poll.
        Exhausted,
        Done,
    }
}

/// The last key fault of a request.
// Kept as is for now: boxing the response would shrink every `ResponseFuture`, a change for
// the core's owners to weigh (clippy's large_enum_variant).
#[allow(clippy::large_enum_variant)]
enum Last {
    Response(Response<Buffered>),
    Error(BoxError),
}

/// Why the request will not be replayed after a key fault.
enum NoReplay {
    /// The body could not be copied: the answer goes back as it is.
    BodyNotReplayable,
    /// No key is left to try (or the attempt limit is reached).
    NoKeyLeft,
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    /// Starts the first attempt. `inner` has been driven to readiness by the caller.
    pub(crate) fn start(inner: &mut S, shared: &Arc<Shared>, mut req: Request<B>) -> Self
    where
        S: Clone,
        B: TryCloneBody,
    {
        let pool = &shared.pool;
        let mut cursor = pool.cursor();
        let mut fut = ResponseFuture {
            state: State::Exhausted,
            shared: shared.clone(),
            svc: None,
            backup: None,
            cursor,
            key: 0,
            attempts: 0,
            sent_once: false,
            last: None,
        };
        let Some(key) = pool.pick(&mut cursor) else {
            tracing::warn!(keys = pool.len(), "no API key is usable; request not sent");
            return fut;
        };
        // Keep a copy only when another key could serve if this one fails.
        if shared.max_attempts > 1 && pool.has_next(&cursor) {
            fut.backup = try_clone_request(&req);
            if fut.backup.is_some() {
                fut.svc = Some(inner.clone());
            } else {
                fut.sent_once = true;
                tracing::debug!(
                    "request body cannot be replayed: sent once, without fallback to other keys"
                );
            }
        }
        set_credential(shared, key, &mut req);
        tracing::debug!(key = pool.label(key), attempt = 1, "sending request");
        fut.cursor = cursor;
        fut.key = key;
        fut.attempts = 1;
        fut.state = State::Calling {
            fut: inner.call(req),
        };
        fut
    }
}

impl<S, B, ResB> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    B: TryCloneBody,
    ResB: Body + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Output = Result<Response<KeyFallbackBody<ResB>>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let mut this = self.as_mut().project();
            match this.state.as_mut().project() {
                StateProj::Calling { fut } => {
                    let result = ready!(fut.poll(cx));
                    this.state.set(State::Done);
                    let res = match result {
                        Ok(res) => res,
                        Err(err) => {
                            let err = err.into();
                            if !this.shared.transport_errors {
                                return Poll::Ready(Err(err));
                            }
                            tracing::debug!(
                                key = this.shared.pool.label(*this.key),
                                error = %err,
                                "upstream call failed"
                            );
                            this.shared.pool.record(*this.key, Outcome::Error);
                            match self.as_mut().next_key("transport_error") {
                                Ok(()) => continue,
                                Err(NoReplay::BodyNotReplayable) => return Poll::Ready(Err(err)),
                                Err(NoReplay::NoKeyLeft) => {
                                    *self.as_mut().project().last = Some(Last::Error(err));
                                    return Poll::Ready(self.exhausted());
                                }
                            }
                        }
                    };
                    let verdict = match this
                        .shared
                        .classifier
                        .classify_head(res.status(), res.headers())
                    {
                        HeadVerdict::Done(verdict) => verdict,
                        HeadVerdict::InspectBody => {
                            let (parts, body) = res.into_parts();
                            let peek = Peek::new(boxed(body), this.shared.inspect_limit);
                            this.state.set(State::Inspecting {
                                parts: Some(parts),
                                peek: Some(peek),
                            });
                            continue;
                        }
                    };
                    if let Some(done) = self.as_mut().settle(verdict, res.map(Raw::Passthrough)) {
                        return Poll::Ready(done);
                    }
                }
                StateProj::Inspecting { parts, peek } => {
                    let p = peek.as_mut().expect("peek present while inspecting");
                    ready!(p.poll_peek(cx));
                    let (parts, peek) = (parts.take(), peek.take());
                    let (parts, peek) = (parts.expect("parts"), peek.expect("peek"));
                    let verdict = this.shared.classifier.classify_body(
                        parts.status,
                        &parts.headers,
                        peek.prefix(),
                    );
                    if peek.complete() {
                        tracing::trace!(bytes = peek.prefix().len(), "error body read whole");
                    }
                    this.state.set(State::Done);
                    let res = Response::from_parts(parts, Raw::Read(peek.into_buffered()));
                    if let Some(done) = self.as_mut().settle(verdict, res) {
                        return Poll::Ready(done);
                    }
                }
                StateProj::Readying => {
                    let svc = this.svc.as_mut().expect("service kept for replay");
                    if let Err(err) = ready!(svc.poll_ready(cx)) {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(err.into()));
                    }
                    let more = *this.attempts + 1 < this.shared.max_attempts
                        && this.shared.pool.has_next(this.cursor);
                    let backup = this.backup.as_ref().expect("backup kept for replay");
                    let mut req = match more.then(|| try_clone_request(backup)).flatten() {
                        Some(copy) => copy,
                        None => this.backup.take().expect("backup kept for replay"),
                    };
                    set_credential(this.shared, *this.key, &mut req);
                    *this.attempts += 1;
                    tracing::debug!(
                        key = this.shared.pool.label(*this.key),
                        attempt = *this.attempts,
                        "replaying request"
                    );
                    let fut = svc.call(req);
                    this.state.set(State::Calling { fut });
                }
                StateProj::Exhausted => {
                    this.state.set(State::Done);
                    return Poll::Ready(self.exhausted());
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}

/// A response body before it is handed on: untouched, or partly read for inspection.
enum Raw<B> {
    Passthrough(B),
    Read(Buffered),
}

impl<S, B, ResB> ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    B: TryCloneBody,
    ResB: Body + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    /// Records a verdict and decides: hand this response back (`Some`), or replay (`None`).
    fn settle(
        mut self: Pin<&mut Self>,
        verdict: Verdict,
        res: Response<Raw<ResB>>,
    ) -> Option<Result<Response<KeyFallbackBody<ResB>>, BoxError>> {
        let this = self.as_mut().project();
        let shared = &**this.shared;
        let key = *this.key;
        tracing::debug!(
            key = shared.pool.label(key),
            status = res.status().as_u16(),
            verdict = ?verdict,
            "upstream answered"
        );
        if let Some(outcome) = outcome(shared, verdict) {
            shared.pool.record(key, outcome);
        }
        let hand_back = |res: Response<Raw<ResB>>| {
            Some(Ok(res.map(|b| match b {
                Raw::Passthrough(b) => KeyFallbackBody::passthrough(b),
                Raw::Read(b) => KeyFallbackBody::buffered(b),
            })))
        };
        if !verdict.is_key_fault() {
            return hand_back(res);
        }
        match self.as_mut().next_key(verdict_name(verdict)) {
            // The response is moot: dropping it frees the connection (or closes it, if the
            // body was not read whole).
            Ok(()) => None,
            Err(NoReplay::BodyNotReplayable) => hand_back(res),
            Err(NoReplay::NoKeyLeft) => {
                let res = res.map(|b| match b {
                    Raw::Passthrough(b) => Buffered::rest(boxed(b)),
                    Raw::Read(b) => b,
                });
                *self.as_mut().project().last = Some(Last::Response(res));
                Some(self.exhausted())
            }
        }
    }

    /// After a key fault: moves to the next usable key and to `Readying`, or says why not.
    fn next_key(self: Pin<&mut Self>, reason: &'static str) -> Result<(), NoReplay> {
        let mut this = self.project();
        let pool = &this.shared.pool;
        if this.backup.is_none() {
            // No copy was kept: either no other key could serve when the request started,
            // or the body cannot be replayed.
            return Err(if *this.sent_once {
                NoReplay::BodyNotReplayable
            } else {
                NoReplay::NoKeyLeft
            });
        }
        if *this.attempts >= this.shared.max_attempts {
            return Err(NoReplay::NoKeyLeft);
        }
        let Some(next) = pool.pick(this.cursor) else {
            return Err(NoReplay::NoKeyLeft);
        };
        tracing::info!(
            from = pool.label(*this.key),
            to = pool.label(next),
            reason,
            "switching API key"
        );
        *this.key = next;
        this.state.set(State::Readying);
        Ok(())
    }

    /// The answer when no key can serve: an `Exhausted` error, or a 429 response.
    fn exhausted(self: Pin<&mut Self>) -> Result<Response<KeyFallbackBody<ResB>>, BoxError> {
        let this = self.project();
        let shared = &**this.shared;
        let retry_after = shared.pool.earliest();
        let (last_response, last_error) = match this.last.take() {
            Some(Last::Response(res)) => (Some(res.map(ExhaustedBody::new)), None),
            Some(Last::Error(err)) => (None, Some(err)),
            None => (None, None),
        };
        tracing::warn!(
            keys = shared.pool.len(),
            attempts = *this.attempts,
            retry_after_ms = retry_after.map(|d| d.as_millis() as u64),
            "no API key could serve the request"
        );
        if shared.exhausted_response {
            return Ok(too_many_requests(retry_after));
        }
        Err(Box::new(Exhausted {
            retry_after,
            attempts: *this.attempts,
            keys: shared.pool.len(),
            last_response,
            last_error,
        }))
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

fn verdict_name(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::RateLimited { .. } => "rate_limited",
        Verdict::QuotaExhausted { .. } => "quota_exhausted",
        Verdict::InvalidKey => "invalid_key",
        Verdict::ServerError => "server_error",
        _ => "other",
    }
}

/// Puts key `key`'s credential on the request, replacing any the caller set.
fn set_credential<B>(shared: &Shared, key: usize, req: &mut Request<B>) {
    let value = shared.pool.begin(key);
    let headers = req.headers_mut();
    for name in shared.strip.iter() {
        headers.remove(name);
    }
    if let Some(name) = shared.credential_header() {
        headers.insert(name.clone(), value);
    }
}

/// A copy of the request (method, URI, version, headers, extensions, body), if the body can
/// be copied.
fn try_clone_request<B: TryCloneBody>(req: &Request<B>) -> Option<Request<B>> {
    let body = req.body().try_clone_body()?;
    let mut copy = Request::new(body);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    *copy.extensions_mut() = req.extensions().clone();
    Some(copy)
}

/// The 429 a proxy answers with when no key can serve.
fn too_many_requests<B>(retry_after: Option<std::time::Duration>) -> Response<KeyFallbackBody<B>> {
    let wait = retry_after.map(|d| d.as_secs() + u64::from(d.subsec_nanos() > 0));
    let message = match wait {
        Some(secs) => format!(
            "{{\"error\":{{\"message\":\"All API keys are rate limited or unavailable. Retry after {secs} seconds.\",\"type\":\"rate_limit_error\",\"code\":\"keys_exhausted\"}}}}"
        ),
        None => "{\"error\":{\"message\":\"All API keys are disabled.\",\"type\":\"rate_limit_error\",\"code\":\"keys_exhausted\"}}".to_owned(),
    };
    let mut res = Response::new(KeyFallbackBody::full(Bytes::from(message)));
    *res.status_mut() = StatusCode::TOO_MANY_REQUESTS;
    let headers = res.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(secs) = wait {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    res
}
