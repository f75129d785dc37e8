//! [`KeyFallbackOpenAI`]: the key pool beneath async-openai's `Client`, at its tower
//! boundary (`Client::with_http_service`).
//!
//! Every decision is the driver's, and the loop around it is `reqwest_walk`'s, as for the
//! reqwest middleware: here an attempt is a call of the inner service with a factory that
//! yields the prepared request.

use std::fmt;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use ::async_openai::error::OpenAIError;
use ::async_openai::middleware::{HttpRequestFactory, ReqwestService};
use http::Extensions;
use reqwest::{Request, Response};
use tower_layer::Layer;
use tower_service::Service;

use crate::answer::Exhausted;
use crate::driver::Shared;
use crate::error::BoxError;
use crate::handle::KeyHandle;
use crate::layer::KeyFallbackLayer;
use crate::reqwest_walk::{self, Attempt};

/// An async-openai HTTP service (`tower::Service<HttpRequestFactory>`) that runs each API
/// call over a pool of API keys, falling back to the next key when one is rate limited, out
/// of quota, rejected or failing. It wraps the service that does the HTTP, `S`: async-openai's
/// [`ReqwestService`] or a stack over it.
///
/// It is made from a [`KeyFallbackLayer`] and shares that layer's key pool, configuration,
/// classification and [`KeyHandle`], as a tower stack and a reqwest middleware made from the
/// same layer do.
///
/// - The key's credential replaces the one async-openai's config sets (`Authorization:
///   Bearer` by default): the config's own API key never reaches the server. With
///   [`Credential::None`](crate::Credential::None) no key is set at all: async-openai's
///   boundary carries no request extensions to hand a [`KeyInUse`](crate::KeyInUse) on.
/// - The request is built once from async-openai's factory; every attempt sends a copy
///   (`reqwest::Request::try_clone`), each wrapped in a new factory for `S`. A body that
///   cannot be copied (a streaming body, such as a file upload's) is sent once, without
///   fallback to other keys.
/// - Error responses are classified from a bounded prefix of their body, and handed back
///   with every byte; successes, server-sent event streams included, pass through untouched.
/// - Errors of `S` (connection errors, timeouts) count against the key and move the call to
///   the next key, unless
///   [`fallback_on_transport_errors(false)`](crate::KeyFallbackBuilder::fallback_on_transport_errors);
///   when handed back they are `S`'s own, as an [`OpenAIError`].
/// - When no key can serve, the error is [`OpenAIError::Boxed`] holding an [`Exhausted`]
///   ([`KeyFallbackOpenAI::exhausted`] finds it), or, with
///   [`exhausted_response(true)`](crate::KeyFallbackBuilder::exhausted_response), the
///   `429 Too Many Requests` answer with `Retry-After`, which the client reads as an
///   [`OpenAIError::ApiError`].
///
/// Request [`Bucket`](crate::Bucket)s, [`TokenCost`](crate::TokenCost)s and
/// [`Affinity`](crate::Affinity)s do not cross async-openai's boundary: every call is in the
/// default bucket. Put a retry layer (async-openai's `OpenAIRetryLayer`) around this service
/// rather than inside it, so that a retry reuses the key pool rather than the key.
///
/// ```no_run
/// use async_openai::config::OpenAIConfig;
/// use async_openai::middleware::ReqwestService;
/// use async_openai::Client;
/// use tower_key_fallback::{KeyFallbackLayer, KeyFallbackOpenAI, KeySet};
///
/// # fn run() -> Result<(), tower_key_fallback::BoxError> {
/// let layer = KeyFallbackLayer::new(KeySet::from_env("GROQ_API_KEY")?);
/// let config = OpenAIConfig::new().with_api_base("https://api.groq.com/openai/v1");
/// let client = Client::with_config(config)
///     .with_http_service(KeyFallbackOpenAI::new(&layer, ReqwestService::default()));
/// # let _ = client;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct KeyFallbackOpenAI<S = ReqwestService> {
    shared: Arc<Shared>,
    inner: S,
}

impl<S> KeyFallbackOpenAI<S> {
    /// A service sharing `layer`'s key pool and configuration, sending through `inner`.
    pub fn new(layer: &KeyFallbackLayer, inner: S) -> Self {
        KeyFallbackOpenAI {
            shared: layer.shared.clone(),
            inner,
        }
    }

    /// A handle on the key pool, the same as the layer's.
    pub fn handle(&self) -> KeyHandle {
        KeyHandle {
            shared: self.shared.clone(),
        }
    }

    /// The service beneath.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl KeyFallbackOpenAI {
    /// The [`Exhausted`] in a client error, if no key could serve the call.
    ///
    /// ```
    /// use async_openai::error::OpenAIError;
    /// use tower_key_fallback::KeyFallbackOpenAI;
    ///
    /// fn wait_hint(err: &OpenAIError) -> Option<std::time::Duration> {
    ///     KeyFallbackOpenAI::exhausted(err)?.retry_after()
    /// }
    /// ```
    pub fn exhausted(err: &OpenAIError) -> Option<&Exhausted> {
        match err {
            OpenAIError::Boxed(err) => err.downcast_ref::<Exhausted>(),
            _ => None,
        }
    }

    /// Takes the [`Exhausted`] out of a client error (to read the last response's body), or
    /// gives the error back.
    pub fn into_exhausted(err: OpenAIError) -> Result<Exhausted, OpenAIError> {
        match err {
            OpenAIError::Boxed(err) => match err.downcast::<Exhausted>() {
                Ok(exhausted) => Ok(*exhausted),
                Err(err) => Err(OpenAIError::Boxed(err)),
            },
            other => Err(other),
        }
    }
}

impl<S> fmt::Debug for KeyFallbackOpenAI<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyFallbackOpenAI")
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

impl<S> Service<HttpRequestFactory> for KeyFallbackOpenAI<S>
where
    S: Service<HttpRequestFactory, Response = Response> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<OpenAIError>,
{
    type Response = Response;
    type Error = OpenAIError;
    type Future = Pin<Box<dyn Future<Output = Result<Response, OpenAIError>> + Send>>;

    /// Always ready: each attempt waits for its own copy of `S` to be ready.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), OpenAIError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, factory: HttpRequestFactory) -> Self::Future {
        let shared = self.shared.clone();
        let mut inner = Inner(self.inner.clone());
        Box::pin(async move {
            let req = factory.build().await?;
            let mut extensions = Extensions::new();
            let walked = reqwest_walk::run(&shared, req, &mut extensions, &mut inner).await;
            walked.map_err(|failed| failed.into_error(|exhausted| OpenAIError::Boxed(exhausted)))
        })
    }
}

/// The inner service, called once per attempt.
struct Inner<S>(S);

impl<S> Attempt for Inner<S>
where
    S: Service<HttpRequestFactory, Response = Response> + Send,
    S::Future: Send,
    S::Error: Into<OpenAIError>,
{
    type Error = OpenAIError;

    fn send<'a>(
        &'a mut self,
        req: Request,
        _extensions: &'a mut Extensions,
    ) -> impl Future<Output = Result<Response, OpenAIError>> + Send + 'a {
        let factory = prepared(req);
        async move {
            poll_fn(|cx| self.0.poll_ready(cx))
                .await
                .map_err(Into::into)?;
            self.0.call(factory).await.map_err(Into::into)
        }
    }

    fn from_box(err: BoxError) -> OpenAIError {
        OpenAIError::Boxed(err)
    }

    fn without_url(err: OpenAIError) -> OpenAIError {
        match err {
            OpenAIError::Reqwest(err) => OpenAIError::Reqwest(err.without_url()),
            other => other,
        }
    }
}

/// A factory for the prepared request: a copy each time it is built (a retry layer inside
/// `S` may build it again), or the request itself, once, when its body cannot be copied.
fn prepared(req: Request) -> HttpRequestFactory {
    let slot = Arc::new(Mutex::new(Some(req)));
    HttpRequestFactory::new(move || {
        let req = copy_or_take(&slot);
        async move { req }
    })
}

fn copy_or_take(slot: &Mutex<Option<Request>>) -> Result<Request, OpenAIError> {
    let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
    match slot.as_ref().and_then(Request::try_clone) {
        Some(copy) => Ok(copy),
        None => slot.take().ok_or_else(|| {
            OpenAIError::InvalidArgument(
                "the request's body cannot be copied: it was sent once already".into(),
            )
        }),
    }
}

/// A tower [`Layer`] that wraps a service in a [`KeyFallbackOpenAI`] sharing a
/// [`KeyFallbackLayer`]'s key pool, for `tower::ServiceBuilder` stacks.
///
/// ```no_run
/// use async_openai::config::OpenAIConfig;
/// use async_openai::middleware::ReqwestService;
/// use async_openai::Client;
/// use tower::ServiceBuilder;
/// use tower_key_fallback::{KeyFallbackLayer, KeyFallbackOpenAILayer, KeySet};
///
/// # fn run() -> Result<(), tower_key_fallback::BoxError> {
/// let layer = KeyFallbackLayer::new(KeySet::from_env("OPENAI_API_KEY")?);
/// let service = ServiceBuilder::new()
///     .layer(KeyFallbackOpenAILayer::new(&layer))
///     .timeout(std::time::Duration::from_secs(60))
///     .service(ReqwestService::default());
/// let client = Client::with_config(OpenAIConfig::new()).with_http_service(service);
/// # let _ = client;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct KeyFallbackOpenAILayer {
    shared: Arc<Shared>,
}

impl KeyFallbackOpenAILayer {
    /// A layer sharing `layer`'s key pool and configuration.
    pub fn new(layer: &KeyFallbackLayer) -> Self {
        KeyFallbackOpenAILayer {
            shared: layer.shared.clone(),
        }
    }
}

impl From<&KeyFallbackLayer> for KeyFallbackOpenAILayer {
    fn from(layer: &KeyFallbackLayer) -> Self {
        KeyFallbackOpenAILayer::new(layer)
    }
}

impl<S> Layer<S> for KeyFallbackOpenAILayer {
    type Service = KeyFallbackOpenAI<S>;

    fn layer(&self, inner: S) -> KeyFallbackOpenAI<S> {
        KeyFallbackOpenAI {
            shared: self.shared.clone(),
            inner,
        }
    }
}

impl fmt::Debug for KeyFallbackOpenAILayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyFallbackOpenAILayer")
            .field("shared", &self.shared)
            .finish()
    }
}
