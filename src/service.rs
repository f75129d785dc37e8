//! The service: [`KeyFallback`] wraps an HTTP client service.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;

use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use crate::body::{KeyFallbackBody, TryCloneBody};
use crate::driver::Shared;
use crate::error::BoxError;
use crate::future::ResponseFuture;
use crate::handle::KeyHandle;

/// Runs each request over a pool of API keys. Made by [`KeyFallbackLayer`].
///
/// The inner service must be `Clone`: a clone is driven to readiness before each replay.
/// Its errors are boxed; when no key can serve a request the error is an
/// [`Exhausted`](crate::Exhausted).
///
/// # Naming the types
///
/// Over a client `C` whose responses have bodies `B`, the service is `KeyFallback<C>` and its
/// responses are [`KeyFallbackResponse<B>`](crate::KeyFallbackResponse)
/// (`http::Response<KeyFallbackBody<B>>`). Name them once with aliases, for an axum state or
/// a struct field; the service is cheap to clone (one `Arc` and the client's own clone):
///
/// ```
/// use axum::{extract::State, routing::post, Router};
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use hyper_util::client::legacy::{connect::HttpConnector, Client};
/// use hyper_util::rt::TokioExecutor;
/// use tower::ServiceExt;
/// use tower_key_fallback::{KeyFallback, KeyFallbackLayer, KeyFallbackResponse, KeyHandle, KeySet};
///
/// type Upstream = Client<HttpConnector, Full<Bytes>>; // an HttpsConnector for real use
/// type Keyed = KeyFallback<Upstream>;
/// type Answer = KeyFallbackResponse<hyper::body::Incoming>;
///
/// #[derive(Clone)]
/// struct AppState {
///     client: Keyed,
///     keys: KeyHandle,
/// }
///
/// async fn ask(State(state): State<AppState>, body: Bytes) -> String {
///     let req = http::Request::post("http://127.0.0.1:9/openai/v1/chat/completions")
///         .body(Full::new(body))
///         .unwrap();
///     let answer: Result<Answer, _> = state.client.oneshot(req).await;
///     match answer {
///         Ok(res) => res.status().to_string(),
///         Err(err) => format!("error: {err}; keys: {:?}", state.keys.status().keys.len()),
///     }
/// }
///
/// let layer = KeyFallbackLayer::new(KeySet::new(["gsk_a", "gsk_b"])?);
/// let state = AppState {
///     keys: layer.handle(),
///     client: tower::Layer::layer(&layer, Client::builder(TokioExecutor::new()).build_http()),
/// };
/// let app: Router = Router::new().route("/ask", post(ask)).with_state(state);
/// # drop(app);
/// # Ok::<(), tower_key_fallback::ConfigError>(())
/// ```
///
/// To hide the client's type as well, box the stack:
/// `tower::util::BoxCloneSyncService<http::Request<Full<Bytes>>, Answer, BoxError>`.
///
/// [`KeyFallbackLayer`]: crate::KeyFallbackLayer
pub struct KeyFallback<S> {
    inner: S,
    shared: Arc<Shared>,
    /// While no key can serve (with `wait_for_key`): the wake-up for `poll_ready`.
    not_ready: Option<Pin<Box<NotReady>>>,
}

pin_project! {
    /// What a service that is not ready waits for: a key's time, or a change in the pool
    /// (counted as a waiter, so that the pool signals changes).
    struct NotReady {
        #[pin]
        sleep: tokio::time::Sleep,
        #[pin]
        changed: tokio::sync::futures::OwnedNotified,
        counted: Counted,
    }
}

/// One waiter in the pool's count while it lives.
struct Counted(Arc<Shared>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.pool.waiting.fetch_sub(1, SeqCst);
    }
}

impl<S> KeyFallback<S> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared>) -> Self {
        KeyFallback {
            inner,
            shared,
            not_ready: None,
        }
    }

    /// Whether a key can serve a request that names no bucket, or none will within
    /// `wait_for_key` (a call then fails at once): tower's backpressure. Pending, with a
    /// wake-up at the soonest key's time or a change in the pool, otherwise.
    fn poll_keys(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(max) = self.shared.config.wait_for_key else {
            return Poll::Ready(());
        };
        let pool = &self.shared.pool;
        loop {
            let Some(at) = pool.blocked_until(max) else {
                self.not_ready = None;
                return Poll::Ready(());
            };
            let shared = &self.shared;
            let not_ready = self.not_ready.get_or_insert_with(|| {
                shared.pool.waiting.fetch_add(1, SeqCst);
                Box::pin(NotReady {
                    sleep: tokio::time::sleep_until(pool.instant(at)),
                    changed: pool.changed.clone().notified_owned(),
                    counted: Counted(shared.clone()),
                })
            });
            let mut this = not_ready.as_mut().project();
            this.sleep.as_mut().reset(pool.instant(at));
            this.changed.as_mut().enable();
            // Listening now: a change between the first look and here would be missed, so
            // look once more.
            if pool.blocked_until(max).is_none() {
                self.not_ready = None;
                return Poll::Ready(());
            }
            if this.sleep.poll(cx).is_pending() && this.changed.poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.not_ready = None;
        }
    }

    /// A handle on this service's key pool.
    pub fn handle(&self) -> KeyHandle {
        KeyHandle {
            shared: self.shared.clone(),
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone> Clone for KeyFallback<S> {
    fn clone(&self) -> Self {
        KeyFallback {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            not_ready: None,
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for KeyFallback<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyFallback")
            .field("inner", &self.inner)
            .field("keys", &self.shared.pool.len())
            .finish()
    }
}

impl<S, B, ResB> Service<Request<B>> for KeyFallback<S>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    B: TryCloneBody,
    ResB: Body + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<KeyFallbackBody<ResB>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        std::task::ready!(self.poll_keys(cx));
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        ResponseFuture::start(&mut self.inner, &self.shared, req)
    }
}
