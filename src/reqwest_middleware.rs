//! [`KeyFallbackMiddleware`]: the key pool in a `reqwest_middleware` client stack.
//!
//! Every decision is the tower service's own (the driver), and the loop around it is the
//! one `reqwest_walk` holds for every adapter of `reqwest::Request`s: here an attempt is a run
//! of the rest of the middleware stack.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use ::reqwest_middleware::{Error, Middleware, Next, Result};
use http::Extensions;
use reqwest::{Request, Response};

use crate::answer::Exhausted;
use crate::driver::Shared;
use crate::error::BoxError;
use crate::handle::KeyHandle;
use crate::layer::KeyFallbackLayer;
use crate::reqwest_walk::{self, Attempt};

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

/// The rest of the client stack, run once per attempt.
struct Rest<'n>(Next<'n>);

impl Attempt for Rest<'_> {
    type Error = Error;

    fn send<'a>(
        &'a mut self,
        req: Request,
        extensions: &'a mut Extensions,
    ) -> impl Future<Output = Result<Response>> + Send + 'a {
        self.0.clone().run(req, extensions)
    }

    fn from_box(err: BoxError) -> Error {
        Error::Middleware(anyhow::anyhow!(err))
    }

    fn without_url(err: Error) -> Error {
        match err {
            Error::Reqwest(err) => Error::Reqwest(err.without_url()),
            other => other,
        }
    }
}

#[async_trait::async_trait]
impl Middleware for KeyFallbackMiddleware {
    async fn handle(
        &self,
        req: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> Result<Response> {
        let walked = reqwest_walk::run(&self.shared, req, extensions, &mut Rest(next)).await;
        walked.map_err(|failed| {
            failed.into_error(|exhausted| Error::Middleware(anyhow::Error::new(*exhausted)))
        })
    }
}
