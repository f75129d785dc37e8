//! The service: [`KeyFallback`] wraps an HTTP client service.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

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
/// [`KeyFallbackLayer`]: crate::KeyFallbackLayer
pub struct KeyFallback<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> KeyFallback<S> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared>) -> Self {
        KeyFallback { inner, shared }
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
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        ResponseFuture::start(&mut self.inner, &self.shared, req)
    }
}
