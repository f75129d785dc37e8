//! The per-request path of the tower service, top to bottom: pick a key, keep a copy if
//! another key could serve, set the credential, call; classify the answer (reading a bounded
//! prefix of an error body when the head is not enough); then do what the [`Driver`]
//! decides: hand the response back, ready the service again and replay the copy with the
//! next key, or give up with [`Exhausted`](crate::Exhausted). This file does the I/O; every
//! decision is the driver's.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::answer::Exhausted;
use crate::answer::{proxy_answer, unreachable_answer};
use crate::body::{boxed, try_clone_request, Buffered, KeyFallbackBody, TryCloneBody};
use crate::classify::HeadVerdict;
use crate::driver::Shared;
use crate::driver::{Driver, Held, Last, Started, Step};
use crate::error::BoxError;
use crate::inspect::Inspection;

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
        driver: Option<Driver>,
        // A clone of the inner service for replays; `None` when no replay can happen.
        svc: Option<S>,
        // A copy of the request for the next replay; `None` when no replay can happen.
        backup: Option<Request<B>>,
    }

    impl<S, B> PinnedDrop for ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        // A request dropped while its attempt is out gives back its claim on the key's
        // budget (an inspection in progress records its own verdict instead).
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(driver) = this.driver.as_mut() {
                driver.abandon(this.shared);
            }
        }
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
        // No key can serve now, one can soon: waiting in turn for it (`crate::wait`). The
        // driver is inside; boxed, as only this path pays for it.
        Waiting { wait: Pin<Box<dyn Future<Output = (Driver, Step)> + Send + Sync>> },
        // No key is usable: answer on the first poll.
        Unsent { exhausted: Option<Box<Exhausted>> },
        Done,
    }
}

type Output<ResB> = Result<Response<KeyFallbackBody<ResB>>, BoxError>;

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
        let driver = match Driver::start(shared, req.extensions()) {
            Started::Send(driver) => driver,
            Started::Wait(driver) => {
                // The request itself is the copy the first attempt takes after the wait, and
                // a clone of the service is driven to readiness for it.
                return ResponseFuture {
                    state: waiting(shared, Some(driver)),
                    shared: shared.clone(),
                    driver: None,
                    svc: Some(inner.clone()),
                    backup: Some(req),
                };
            }
            Started::Unsent(exhausted) => {
                return ResponseFuture {
                    state: State::Unsent {
                        exhausted: Some(exhausted),
                    },
                    shared: shared.clone(),
                    driver: None,
                    svc: None,
                    backup: None,
                };
            }
        };
        // Until the future owns it, a panic (in the body's copy, the service's clone or
        // call) gives the driver's claim and probe back.
        let mut held = Held::new(shared, driver);
        let backup = held.get().first_copy(shared, &req, try_clone_request);
        let svc = backup.as_ref().map(|_| inner.clone());
        if let Some(key) = held.get().prepare(shared, &mut req) {
            req.extensions_mut().insert(key);
        }
        let fut = inner.call(req);
        ResponseFuture {
            state: State::Calling { fut },
            shared: shared.clone(),
            driver: Some(held.release()),
            svc,
            backup,
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
    type Output = Output<ResB>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let shared = &**this.shared;
            let has_copy = this.backup.is_some();
            match this.state.as_mut().project() {
                StateProj::Calling { fut } => {
                    let result = ready!(fut.poll(cx));
                    this.state.set(State::Done);
                    let driver = this.driver.as_mut().expect("a driver while calling");
                    let res = match result {
                        Ok(res) => res,
                        Err(err) => {
                            let err = err.into();
                            if !shared.config.fallback_on_transport_errors {
                                return Poll::Ready(Err(err));
                            }
                            match driver.on_error(shared, &err, has_copy) {
                                Step::Replay => {
                                    this.state.set(State::Readying);
                                    continue;
                                }
                                Step::Wait => {
                                    this.state.set(waiting(this.shared, this.driver.take()));
                                    continue;
                                }
                                Step::HandBack if shared.config.exhausted_response => {
                                    let res = unreachable_answer(&*err);
                                    return Poll::Ready(Ok(res.map(KeyFallbackBody::full)));
                                }
                                Step::HandBack => return Poll::Ready(Err(err)),
                                Step::GiveUp => {
                                    let exhausted = driver.give_up(shared, Last::Error(err));
                                    return Poll::Ready(give_up(shared, exhausted));
                                }
                            }
                        }
                    };
                    let status = res.status().as_u16();
                    let verdict = match shared.classifier.classify_head(res.status(), res.headers())
                    {
                        HeadVerdict::Done(verdict) => verdict,
                        HeadVerdict::InspectBody => {
                            let (parts, body) = res.into_parts();
                            let driver = this.driver.take().expect("a driver while calling");
                            let inspect = Inspection::new(this.shared, driver, parts, boxed(body));
                            this.state.set(State::Inspecting {
                                inspect: Some(Box::new(inspect)),
                            });
                            continue;
                        }
                    };
                    // A success (the common case) is handed back untouched.
                    match driver.on_answer(shared, status, res.headers(), verdict, has_copy) {
                        Step::HandBack => {
                            return Poll::Ready(Ok(res.map(KeyFallbackBody::passthrough)));
                        }
                        // The response is moot: dropping it frees the connection (or
                        // closes it, if the body was not read whole).
                        Step::Replay => this.state.set(State::Readying),
                        Step::Wait => this.state.set(waiting(this.shared, this.driver.take())),
                        Step::GiveUp => {
                            let res = res.map(|b| Buffered::rest(boxed(b)));
                            let exhausted = driver.give_up(shared, Last::Response(Box::new(res)));
                            return Poll::Ready(give_up(shared, exhausted));
                        }
                    }
                }
                StateProj::Inspecting { inspect } => {
                    ready!(inspect.as_mut().expect("inspecting").poll_read(cx));
                    let (verdict, res, driver) = inspect.take().expect("inspecting").finish();
                    this.state.set(State::Done);
                    let driver = this.driver.insert(driver);
                    let status = res.status().as_u16();
                    match driver.on_answer(shared, status, res.headers(), verdict, has_copy) {
                        Step::HandBack => {
                            return Poll::Ready(Ok(res.map(KeyFallbackBody::buffered)));
                        }
                        Step::Replay => this.state.set(State::Readying),
                        Step::Wait => this.state.set(waiting(this.shared, this.driver.take())),
                        Step::GiveUp => {
                            let exhausted = driver.give_up(shared, Last::Response(Box::new(res)));
                            return Poll::Ready(give_up(shared, exhausted));
                        }
                    }
                }
                StateProj::Readying => {
                    let svc = this.svc.as_mut().expect("service kept for replay");
                    if let Err(err) = ready!(svc.poll_ready(cx)) {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(err.into()));
                    }
                    let driver = this.driver.as_mut().expect("a driver while replaying");
                    let mut req = driver.next_request(shared, this.backup, try_clone_request);
                    if let Some(key) = driver.prepare(shared, &mut req) {
                        req.extensions_mut().insert(key);
                    }
                    let fut = svc.call(req);
                    this.state.set(State::Calling { fut });
                }
                StateProj::Waiting { wait } => {
                    let (driver, step) = ready!(wait.as_mut().poll(cx));
                    let driver = this.driver.insert(driver);
                    match step {
                        Step::Replay => this.state.set(State::Readying),
                        _ => {
                            this.state.set(State::Done);
                            // The last answer, if any, was dropped when the wait began, so as
                            // not to hold its connection for the wait.
                            let exhausted = driver.give_up(shared, Last::None);
                            return Poll::Ready(give_up(shared, exhausted));
                        }
                    }
                }
                StateProj::Unsent { exhausted } => {
                    let exhausted = *exhausted.take().expect("polled once");
                    this.state.set(State::Done);
                    return Poll::Ready(give_up(shared, exhausted));
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}

/// The state of a request that waits in turn for a key, with its driver.
fn waiting<F>(shared: &Arc<Shared>, driver: Option<Driver>) -> State<F> {
    let driver = driver.expect("a driver to wait with");
    State::Waiting {
        wait: Box::pin(crate::wait::wait(shared.clone(), driver)),
    }
}

/// The answer when no key can serve: the `Exhausted` error, or a proxy's 429 or 502.
fn give_up<ResB>(shared: &Shared, exhausted: Exhausted) -> Output<ResB> {
    if shared.config.exhausted_response {
        return Ok(proxy_answer(&exhausted).map(KeyFallbackBody::full));
    }
    Err(Box::new(exhausted))
}
