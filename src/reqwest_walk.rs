//! One request's walk over the keys for the adapters whose requests are `reqwest::Request`s
//! (features `reqwest-middleware` and `async-openai`): the I/O around the [`Driver`].
//!
//! The adapters differ only in how one attempt is sent ([`Attempt`]) and in their error
//! type; the copies of the request (`reqwest::Request::try_clone`), the bounded inspection of
//! error bodies, the waits, the drop guard and the answer when no key can serve are here,
//! once.

use std::future::{poll_fn, Future};
use std::sync::Arc;

use http::{Extensions, StatusCode};
use reqwest::{Request, Response, ResponseBuilderExt, Url};

use crate::answer;
use crate::answer::Exhausted;
use crate::body::{boxed, Buffered, InspectedBody};
use crate::classify::{HeadVerdict, Verdict};
use crate::driver::{Driver, Last, Outgoing, Shared, Started, Step};
use crate::error::BoxError;
use crate::inspect::Inspection;

/// How an adapter sends one attempt: the request, with the key's credential set, to what
/// lies beneath it.
pub(crate) trait Attempt {
    /// What a failed attempt returns; handed back to the caller as it is.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Sends one attempt. `extensions` holds the [`KeyInUse`](crate::KeyInUse) when the
    /// credential is left to the inner service.
    fn send<'a>(
        &'a mut self,
        req: Request,
        extensions: &'a mut Extensions,
    ) -> impl Future<Output = Result<Response, Self::Error>> + Send + 'a;

    /// A boxed error as the adapter's error. Only for an error that is not `Self::Error`,
    /// which the walk never makes (it boxes the attempts' own errors, and unboxes them).
    fn from_box(err: BoxError) -> Self::Error;

    /// The error without the request's URL, which holds the key when it is sent in the
    /// query ([`Credential::Query`](crate::Credential::Query)): reqwest's errors print it.
    fn without_url(err: Self::Error) -> Self::Error;
}

/// Why a walk ended without a response.
pub(crate) enum Failed<E> {
    /// The attempt's own error, handed back.
    Call(E),
    /// No key could serve the request.
    Exhausted(Box<Exhausted>),
}

impl<E> Failed<E> {
    /// The adapter's error, with `exhausted` making one of an [`Exhausted`].
    pub(crate) fn into_error(self, exhausted: impl FnOnce(Box<Exhausted>) -> E) -> E {
        match self {
            Failed::Call(err) => err,
            Failed::Exhausted(x) => exhausted(x),
        }
    }
}

/// Runs `req` over the keys of `shared`, sending each attempt with `attempt`.
pub(crate) async fn run<A: Attempt>(
    shared: &Arc<Shared>,
    req: Request,
    extensions: &mut Extensions,
    attempt: &mut A,
) -> Result<Response, Failed<A::Error>> {
    let arc = shared;
    let shared = &**arc;
    let url = req.url().clone();
    // With the key in the query, the URLs reqwest keeps in errors and responses hold it: both
    // are given the caller's URL back (or none), before anything logs or keeps them.
    let key_in_url = shared.config.credential_query().is_some();
    let (driver, waits) = match Driver::start(shared, extensions) {
        Started::Send(driver) => (driver, false),
        Started::Wait(driver) => (driver, true),
        Started::Unsent(exhausted) => return give_up(shared, *exhausted, url),
    };
    // Gives the attempt's claim on its key's budget back if this future is dropped.
    let mut walk = Walk { shared, driver };
    let (mut req, mut backup) = if waits {
        // The request itself is the copy the first attempt takes after the wait.
        let mut backup = Some(req);
        if walk.wait(arc).await != Step::Replay {
            return give_up(shared, walk.driver.give_up(shared, Last::None), url);
        }
        let req = walk
            .driver
            .next_request(shared, &mut backup, Request::try_clone);
        (req, backup)
    } else {
        // Keep a copy only when another key could serve if this one fails.
        let backup = walk.driver.first_copy(shared, &req, Request::try_clone);
        (req, backup)
    };
    loop {
        let driver = &mut walk.driver;
        if let Some(key) = driver.prepare(shared, &mut req) {
            extensions.insert(key);
        }
        let has_copy = backup.is_some();
        let sent = match attempt.send(req, extensions).await {
            Ok(res) if key_in_url => Ok(with_url_of(res, &url)),
            Err(err) if key_in_url => Err(A::without_url(err)),
            sent => sent,
        };
        let (step, raw) = match sent {
            Ok(res) => {
                let taken = std::mem::replace(driver, Driver::done());
                let (raw, verdict, back) = classify(arc, taken, res).await;
                *driver = back;
                let status = raw.status().as_u16();
                let step = driver.on_answer(shared, status, raw.headers(), verdict, has_copy);
                (step, Some(raw))
            }
            Err(err) => {
                if !shared.config.fallback_on_transport_errors {
                    return Err(Failed::Call(err));
                }
                let err: BoxError = Box::new(err);
                match driver.on_error(shared, &err, has_copy) {
                    Step::Replay => {
                        req = driver.next_request(shared, &mut backup, Request::try_clone);
                        continue;
                    }
                    Step::HandBack if shared.config.exhausted_response => {
                        return Ok(with_url(answer::unreachable_answer(&*err), url));
                    }
                    Step::HandBack => return Err(Failed::Call(unbox::<A>(err))),
                    Step::GiveUp => {
                        return give_up(shared, driver.give_up(shared, Last::Error(err)), url)
                    }
                    Step::Wait => (Step::Wait, None),
                }
            }
        };
        // A moot response is dropped: that frees the connection (or closes it, if the
        // body was not read whole).
        let step = match (step, raw) {
            (Step::HandBack, Some(raw)) => return Ok(raw.into_response(url)),
            (Step::GiveUp, Some(raw)) => {
                return give_up(shared, driver.give_up(shared, raw.into_last()), url)
            }
            (Step::Wait, _) => walk.wait(arc).await,
            (step, _) => step,
        };
        if step != Step::Replay {
            return give_up(shared, walk.driver.give_up(shared, Last::None), url);
        }
        req = walk
            .driver
            .next_request(shared, &mut backup, Request::try_clone);
    }
}

impl Outgoing for Request {
    fn headers_mut(&mut self) -> &mut http::HeaderMap {
        Request::headers_mut(self)
    }

    fn set_query_param(&mut self, name: &str, value: Option<&str>) {
        if let Some(query) = crate::config::query_with(self.url().query(), name, value) {
            self.url_mut()
                .set_query(Some(query.as_str()).filter(|q| !q.is_empty()));
        }
    }
}

/// A response before it is handed on: untouched, or with a prefix of its body read.
enum Raw {
    Untouched(Response),
    Read(http::Response<Buffered>),
}

impl Raw {
    fn status(&self) -> StatusCode {
        match self {
            Raw::Untouched(res) => res.status(),
            Raw::Read(res) => res.status(),
        }
    }

    fn headers(&self) -> &http::HeaderMap {
        match self {
            Raw::Untouched(res) => res.headers(),
            Raw::Read(res) => res.headers(),
        }
    }

    /// The response as the caller gets it, every byte of the body included.
    fn into_response(self, url: Url) -> Response {
        match self {
            Raw::Untouched(res) => res,
            Raw::Read(res) => {
                let mut res = res.map(|b| reqwest::Body::wrap(InspectedBody::new(b)));
                res.extensions_mut().extend(url_extension(url));
                Response::from(res)
            }
        }
    }

    /// The response as [`Exhausted`] carries it.
    fn into_last(self) -> Last {
        Last::Response(Box::new(match self {
            Raw::Untouched(res) => {
                let res: http::Response<reqwest::Body> = res.into();
                res.map(|b| Buffered::rest(boxed(b)))
            }
            Raw::Read(res) => res,
        }))
    }
}

/// The extension by which a `reqwest::Response` made from an `http::Response` knows its URL.
fn url_extension(url: Url) -> Extensions {
    // A builder with no status or header set cannot fail.
    http::Response::builder()
        .url(url)
        .body(())
        .map(|res| res.into_parts().0.extensions)
        .unwrap_or_default()
}

/// Classifies a response, reading a bounded prefix of its body (for a bounded time) when
/// the head is not enough.
async fn classify(shared: &Arc<Shared>, driver: Driver, res: Response) -> (Raw, Verdict, Driver) {
    match shared.classifier.classify_head(res.status(), res.headers()) {
        HeadVerdict::Done(verdict) => (Raw::Untouched(res), verdict, driver),
        HeadVerdict::InspectBody => {
            let res: http::Response<reqwest::Body> = res.into();
            let (parts, body) = res.into_parts();
            let mut inspection = Inspection::new(shared, driver, parts, boxed(body));
            poll_fn(|cx| inspection.poll_read(cx)).await;
            let (verdict, res, driver) = inspection.finish();
            (Raw::Read(res), verdict, driver)
        }
    }
}

/// The request's driver, which gives its claim back when the request is dropped mid-call.
struct Walk<'a> {
    shared: &'a Shared,
    driver: Driver,
}

impl Walk<'_> {
    /// Waits in turn for a key (`crate::wait`): `Replay` with one, or `GiveUp`.
    async fn wait(&mut self, shared: &Arc<Shared>) -> Step {
        let driver = std::mem::replace(&mut self.driver, Driver::done());
        let (driver, step) = crate::wait::wait(shared.clone(), driver).await;
        self.driver = driver;
        step
    }
}

impl Drop for Walk<'_> {
    fn drop(&mut self) {
        self.driver.abandon(self.shared);
    }
}

/// The answer when no key can serve: the [`Exhausted`] error, or a proxy's 429 or 502.
fn give_up<E>(shared: &Shared, exhausted: Exhausted, url: Url) -> Result<Response, Failed<E>> {
    if shared.config.exhausted_response {
        return Ok(with_url(answer::proxy_answer(&exhausted), url));
    }
    Err(Failed::Exhausted(Box::new(exhausted)))
}

/// `res` as for `url` (`Response::url` is what reqwest sent to, the key in the query included).
fn with_url_of(res: Response, url: &Url) -> Response {
    let mut res: http::Response<reqwest::Body> = res.into();
    res.extensions_mut().extend(url_extension(url.clone()));
    Response::from(res)
}

/// A response the layer made, as a `reqwest::Response` for `url`.
fn with_url(res: http::Response<bytes::Bytes>, url: Url) -> Response {
    let mut res = res.map(reqwest::Body::from);
    res.extensions_mut().extend(url_extension(url));
    Response::from(res)
}

/// The attempt's error boxed for [`Driver::on_error`], given back.
fn unbox<A: Attempt>(err: BoxError) -> A::Error {
    match err.downcast::<A::Error>() {
        Ok(err) => *err,
        Err(err) => A::from_box(err),
    }
}
