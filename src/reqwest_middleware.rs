//! [`KeyFallbackMiddleware`]: the key pool in a `reqwest_middleware` client stack.
//!
//! Every decision is the tower service's own ([`Driver`]); only the plumbing differs: a `reqwest::Request` is copied with `try_clone`, the next middleware is run once
//! per attempt, and an inspected error body is handed back as a `reqwest::Response` that
//! yields the bytes read for inspection and then the rest of the stream.

use std::fmt;
use std::future::poll_fn;
use std::sync::Arc;

use ::reqwest_middleware::{Error, Middleware, Next, Result};
use http::{Extensions, StatusCode};
use reqwest::{Request, Response, ResponseBuilderExt, Url};

use crate::answer;
use crate::answer::Exhausted;
use crate::body::{boxed, Buffered, InspectedBody};
use crate::classify::{HeadVerdict, Verdict};
use crate::driver::Shared;
use crate::driver::{Driver, Last, Started, Step};
use crate::error::BoxError;
use crate::handle::KeyHandle;
use crate::inspect::Inspection;
use crate::layer::KeyFallbackLayer;

/// A [`reqwest_middleware`] [`Middleware`] that runs each request over a pool of API keys,
/// falling back to the next key when one is rate limited, out of quota, rejected or failing.
///
/// It is made from a [`KeyFallbackLayer`] and shares that layer's key pool, configuration,
/// classification and [`KeyHandle`]: a tower stack and a reqwest client built from one layer
/// spend, cool and report the same keys.
///
/// - The key's credential replaces any the caller set (`Authorization: Bearer` by default).
/// - A request whose body can be copied (`reqwest::Request::try_clone`: any body but a
///   stream) is replayed with the next key after a key fault; a streaming body is sent once.
/// - Error responses are classified from a bounded prefix of their body; the response handed
///   back still carries every byte, with its status, headers, version, extensions and URL.
/// - Errors of the rest of the stack (connection errors, timeouts) count against the key and
///   move the request to the next key, unless
///   [`fallback_on_transport_errors(false)`](crate::KeyFallbackBuilder::fallback_on_transport_errors).
/// - When no key can serve, the error is [`Error::Middleware`] holding an [`Exhausted`]
///   ([`KeyFallbackMiddleware::exhausted`] finds it), or, with
///   [`exhausted_response(true)`](crate::KeyFallbackBuilder::exhausted_response), a
///   `429 Too Many Requests` response with `Retry-After`.
///
/// Put it before any middleware that retries ([`ClientBuilder::with`] runs middleware in the
/// order added), so a retry reuses the key pool rather than the key. reqwest's `Client`
/// follows redirects beneath every middleware: it drops `Authorization` on a redirect to
/// another host, but not a key in another header (`x-api-key`, …); with
/// [`Credential::Header`](crate::Credential::Header) build the client with
/// `redirect(reqwest::redirect::Policy::none())`.
///
/// [`ClientBuilder::with`]: reqwest_middleware::ClientBuilder::with
///
/// ```no_run
/// use reqwest_middleware::ClientBuilder;
/// use tower_key_fallback::{KeyFallbackLayer, KeyFallbackMiddleware, KeySet};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// let layer = KeyFallbackLayer::new(KeySet::from_env("GROQ_API_KEY")?);
/// let keys = KeyFallbackMiddleware::new(&layer);
/// let handle = keys.handle();
/// let client = ClientBuilder::new(reqwest::Client::new()).with(keys).build();
///
/// let res = client
///     .post("http://127.0.0.1:8080/openai/v1/chat/completions")
///     .header("content-type", "application/json")
///     .body(r#"{"model":"llama-3.1-8b-instant","messages":[{"role":"user","content":"Hi"}]}"#)
///     .send()
///     .await;
/// match res {
///     Ok(res) => println!("{}: {}", res.status(), res.text().await?),
///     Err(err) => match KeyFallbackMiddleware::exhausted(&err) {
///         Some(exhausted) => println!("every key is busy: {exhausted}"),
///         None => return Err(err.into()),
///     },
/// }
/// for key in handle.status().keys {
///     println!("{} {:?} requests={}", key.label, key.state, key.requests);
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct KeyFallbackMiddleware {
    shared: Arc<Shared>,
}

impl KeyFallbackMiddleware {
    /// A middleware sharing `layer`'s key pool and configuration.
    pub fn new(layer: &KeyFallbackLayer) -> Self {
        KeyFallbackMiddleware {
            shared: layer.shared.clone(),
        }
    }

    /// A handle on the key pool, the same as the layer's.
    pub fn handle(&self) -> KeyHandle {
        KeyHandle {
            shared: self.shared.clone(),
        }
    }

    /// The [`Exhausted`] in a client error, if no key could serve the request.
    ///
    /// ```
    /// use tower_key_fallback::KeyFallbackMiddleware;
    ///
    /// fn wait_hint(err: &reqwest_middleware::Error) -> Option<std::time::Duration> {
    ///     KeyFallbackMiddleware::exhausted(err)?.retry_after()
    /// }
    /// ```
    pub fn exhausted(err: &Error) -> Option<&Exhausted> {
        match err {
            Error::Middleware(err) => err.downcast_ref::<Exhausted>(),
            _ => None,
        }
    }

    /// Takes the [`Exhausted`] out of a client error (to read the last response's body), or
    /// gives the error back.
    pub fn into_exhausted(err: Error) -> std::result::Result<Exhausted, Error> {
        match err {
            Error::Middleware(err) => err.downcast::<Exhausted>().map_err(Error::Middleware),
            other => Err(other),
        }
    }
}

impl From<&KeyFallbackLayer> for KeyFallbackMiddleware {
    fn from(layer: &KeyFallbackLayer) -> Self {
        KeyFallbackMiddleware::new(layer)
    }
}

impl fmt::Debug for KeyFallbackMiddleware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyFallbackMiddleware")
            .field("shared", &self.shared)
            .finish()
    }
}

impl crate::driver::Outgoing for Request {
    fn headers_mut(&mut self) -> &mut http::HeaderMap {
        Request::headers_mut(self)
    }

    fn set_query_param(&mut self, name: &str, value: &str) {
        let query = crate::config::query_with(self.url().query(), name, value);
        self.url_mut().set_query(Some(&query));
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

#[async_trait::async_trait]
impl Middleware for KeyFallbackMiddleware {
    async fn handle(
        &self,
        req: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> Result<Response> {
        let shared = &*self.shared;
        let url = req.url().clone();
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
            if walk.wait(&self.shared).await != Step::Replay {
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
            let (step, raw) = match next.clone().run(req, extensions).await {
                Ok(res) => {
                    let taken = std::mem::replace(driver, Driver::done());
                    let (raw, verdict, back) = classify(&self.shared, taken, res).await;
                    *driver = back;
                    let status = raw.status().as_u16();
                    let step = driver.on_answer(shared, status, raw.headers(), verdict, has_copy);
                    (step, Some(raw))
                }
                Err(err) => {
                    if !shared.config.fallback_on_transport_errors {
                        return Err(err);
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
                        Step::HandBack => return Err(unbox(err)),
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
                (Step::Wait, _) => walk.wait(&self.shared).await,
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
fn give_up(shared: &Shared, exhausted: Exhausted, url: Url) -> Result<Response> {
    if shared.config.exhausted_response {
        return Ok(with_url(answer::proxy_answer(&exhausted), url));
    }
    Err(Error::Middleware(anyhow::Error::new(exhausted)))
}

/// A response the layer made, as a `reqwest::Response` for `url`.
fn with_url(res: http::Response<bytes::Bytes>, url: Url) -> Response {
    let mut res = res.map(reqwest::Body::from);
    res.extensions_mut().extend(url_extension(url));
    Response::from(res)
}

/// The client error boxed for [`Driver::on_error`], given back.
fn unbox(err: BoxError) -> Error {
    match err.downcast::<Error>() {
        Ok(err) => *err,
        Err(err) => Error::Middleware(anyhow::anyhow!(err)),
    }
}
