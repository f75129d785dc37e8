//! The per-request path, top to bottom: pick a key, keep a copy if another key could serve,
//! set the credential, call; classify the answer (reading a bounded prefix of an error body
//! when the head is not enough); record the verdict on the key; hand back the response, or
//! ready the service again and replay the copy with the next key, or give up with
//! [`Exhausted`](crate::Exhausted).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::attempts::{
    self, proxy_answer, unreachable_answer, verdict_name, AfterError, Attempts, Inspection,
    NoReplay,
};
use crate::body::{
    boxed, try_clone_request, Buffered, ExhaustedBody, KeyFallbackBody, TryCloneBody,
};
use crate::classify::{HeadVerdict, Verdict};
use crate::error::BoxError;
use crate::layer::Shared;

pin_project! {
    /// The future of [`KeyFallback`](crate::KeyFallback).
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S::Future>,
        shared: Arc<Shared>,
        // The keys this request has used; `None` when no key was usable at all.
        attempts: Option<Attempts>,
        // A clone of the inner service for replays; `None` when no replay can happen.
        svc: Option<S>,
        // A copy of the request for the next replay; `None` when no replay can happen.
        backup: Option<Request<B>>,
        // The last key fault, kept in case no key is left to replay with.
        last: Option<Last>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        // An upstream call is in flight.
        Calling { #[pin] fut: F },
        // Reading a bounded prefix of an error body to classify it, for a bounded time.
        // Boxed: the error path pays for it, and the future stays small for the happy path.
        Inspecting { inspect: Option<Box<Inspection>> },
        // Driving the service clone to readiness before replaying with the next key.
        Readying,
        // No key can serve: answer on the next poll.
        Exhausted,
        Done,
    }
}

/// The last key fault of a request.
enum Last {
    Response(Box<Response<Buffered>>),
    Error(BoxError),
}

/// A response body before it is handed on: untouched, or partly read for inspection.
enum Raw<B> {
    Passthrough(B),
    Read(Buffered),
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
        let Some(mut attempts) = Attempts::first(shared) else {
            return ResponseFuture {
                state: State::Exhausted,
                shared: shared.clone(),
                attempts: None,
                svc: None,
                backup: None,
                last: None,
            };
        };
        // Keep a copy only when another key could serve if this one fails.
        let backup = attempts.keep_copy(shared, || try_clone_request(&req));
        let svc = backup.as_ref().map(|_| inner.clone());
        if let Some(key) = attempts.prepare(shared, req.headers_mut()) {
            req.extensions_mut().insert(key);
        }
        ResponseFuture {
            state: State::Calling {
                fut: inner.call(req),
            },
            shared: shared.clone(),
            attempts: Some(attempts),
            svc,
            backup,
            last: None,
        }
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
            let shared = &**this.shared;
            match this.state.as_mut().project() {
                StateProj::Calling { fut } => {
                    let result = ready!(fut.poll(cx));
                    this.state.set(State::Done);
                    let attempts = this.attempts.as_mut().expect("attempts while calling");
                    let res = match result {
                        Ok(res) => res,
                        Err(err) => {
                            let err = err.into();
                            if !shared.transport_errors {
                                return Poll::Ready(Err(err));
                            }
                            match attempts.after_error(shared, &err, this.backup.is_some()) {
                                AfterError::Replay => {
                                    this.state.set(State::Readying);
                                    continue;
                                }
                                AfterError::GiveBack if shared.exhausted_response => {
                                    let res = unreachable_answer(&*err);
                                    return Poll::Ready(Ok(res.map(KeyFallbackBody::full)));
                                }
                                AfterError::GiveBack => return Poll::Ready(Err(err)),
                                AfterError::Exhausted => {
                                    *this.last = Some(Last::Error(err));
                                    return Poll::Ready(self.exhausted());
                                }
                            }
                        }
                    };
                    let verdict = match shared.classifier.classify_head(res.status(), res.headers())
                    {
                        // The common case, kept short: the key served.
                        HeadVerdict::Done(Verdict::Success) => {
                            attempts.record(shared, res.status().as_u16(), Verdict::Success);
                            return Poll::Ready(Ok(res.map(KeyFallbackBody::passthrough)));
                        }
                        HeadVerdict::Done(verdict) => verdict,
                        HeadVerdict::InspectBody => {
                            let (parts, body) = res.into_parts();
                            let inspect =
                                Inspection::new(this.shared, attempts, parts, boxed(body));
                            this.state.set(State::Inspecting {
                                inspect: Some(Box::new(inspect)),
                            });
                            continue;
                        }
                    };
                    if let Some(done) = self.as_mut().settle(verdict, res.map(Raw::Passthrough)) {
                        return Poll::Ready(done);
                    }
                }
                StateProj::Inspecting { inspect } => {
                    ready!(inspect.as_mut().expect("inspecting").poll_read(cx));
                    let (verdict, res) = inspect.take().expect("inspecting").finish();
                    this.state.set(State::Done);
                    if let Some(done) = self.as_mut().settle(verdict, res.map(Raw::Read)) {
                        return Poll::Ready(done);
                    }
                }
                StateProj::Readying => {
                    let svc = this.svc.as_mut().expect("service kept for replay");
                    if let Err(err) = ready!(svc.poll_ready(cx)) {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(err.into()));
                    }
                    let attempts = this.attempts.as_mut().expect("attempts while replaying");
                    let backup = this.backup.as_ref().expect("backup kept for replay");
                    // Copy again if yet another key could follow; else send the copy itself.
                    let mut req = match attempts.keep_copy(shared, || try_clone_request(backup)) {
                        Some(copy) => copy,
                        None => this.backup.take().expect("backup kept for replay"),
                    };
                    if let Some(key) = attempts.prepare(shared, req.headers_mut()) {
                        req.extensions_mut().insert(key);
                    }
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

impl<S, B, ResB> ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    ResB: Body + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    /// Records a verdict and decides: hand this response back (`Some`), or replay (`None`).
    fn settle(
        mut self: Pin<&mut Self>,
        verdict: Verdict,
        res: Response<Raw<ResB>>,
    ) -> Option<Result<Response<KeyFallbackBody<ResB>>, BoxError>> {
        let mut this = self.as_mut().project();
        let shared = &**this.shared;
        let attempts = this.attempts.as_mut().expect("attempts while settling");
        attempts.record(shared, res.status().as_u16(), verdict);
        let hand_back = |res: Response<Raw<ResB>>| {
            Some(Ok(res.map(|b| match b {
                Raw::Passthrough(b) => KeyFallbackBody::passthrough(b),
                Raw::Read(b) => KeyFallbackBody::buffered(b),
            })))
        };
        if !verdict.is_key_fault() {
            return hand_back(res);
        }
        match attempts.advance(shared, this.backup.is_some(), verdict_name(verdict)) {
            // The response is moot: dropping it frees the connection (or closes it, if the
            // body was not read whole).
            Ok(()) => {
                this.state.set(State::Readying);
                None
            }
            Err(NoReplay::BodyNotReplayable) => hand_back(res),
            Err(NoReplay::NoKeyLeft) => {
                let res = res.map(|b| match b {
                    Raw::Passthrough(b) => Buffered::rest(boxed(b)),
                    Raw::Read(b) => b,
                });
                *this.last = Some(Last::Response(Box::new(res)));
                Some(self.exhausted())
            }
        }
    }

    /// The answer when no key can serve: an `Exhausted` error, or a 429 response.
    fn exhausted(self: Pin<&mut Self>) -> Result<Response<KeyFallbackBody<ResB>>, BoxError> {
        let this = self.project();
        let shared = &**this.shared;
        let (last_response, last_error) = match this.last.take() {
            Some(Last::Response(res)) => (Some(res.map(ExhaustedBody::new)), None),
            Some(Last::Error(err)) => (None, Some(err)),
            None => (None, None),
        };
        let count = this.attempts.as_ref().map_or(0, |a| a.count());
        let exhausted = attempts::exhausted(shared, count, last_response, last_error);
        if shared.exhausted_response {
            return Ok(proxy_answer(&exhausted).map(KeyFallbackBody::full));
        }
        Err(Box::new(exhausted))
    }
}
