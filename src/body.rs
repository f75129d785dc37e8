//! Bodies: which request bodies can be replayed, the opaque response body, and the bounded
//! peek at error bodies.
//!
//! Success bodies pass through untouched (no buffering, no copy). An error body is read up to
//! the inspection limit to classify it; the body handed back yields what was read and then
//! the rest of the stream, so the caller sees every byte the server sent.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, Request};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::error::BoxError;

/// A request body that may be copied so the request can be replayed with another key.
///
/// Bodies whose bytes are all in memory return a copy (for [`Full<Bytes>`] or [`Bytes`] a
/// reference count); streaming bodies return `None`, and a request with such a body is sent
/// once, with no fallback. Implement it for your own body types.
///
/// [`Full<Bytes>`]: http_body_util::Full
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use tower_key_fallback::TryCloneBody;
///
/// let body = Full::new(Bytes::from_static(b"{}"));
/// assert!(body.try_clone_body().is_some());
/// ```
pub trait TryCloneBody: Sized {
    /// A copy of this body that yields the same bytes, if one can be made.
    fn try_clone_body(&self) -> Option<Self>;
}

macro_rules! clone_body {
    ($($t:ty),*) => {$(
        impl TryCloneBody for $t {
            fn try_clone_body(&self) -> Option<Self> {
                Some(self.clone())
            }
        }
    )*};
}

clone_body!(String, Bytes, Vec<u8>, &'static str, &'static [u8], ());

impl<D: Clone> TryCloneBody for http_body_util::Full<D> {
    fn try_clone_body(&self) -> Option<Self> {
        Some(self.clone())
    }
}

impl<D> TryCloneBody for http_body_util::Empty<D> {
    fn try_clone_body(&self) -> Option<Self> {
        Some(http_body_util::Empty::new())
    }
}

impl<L: TryCloneBody, R: TryCloneBody> TryCloneBody for http_body_util::Either<L, R> {
    fn try_clone_body(&self) -> Option<Self> {
        match self {
            http_body_util::Either::Left(l) => l.try_clone_body().map(http_body_util::Either::Left),
            http_body_util::Either::Right(r) => {
                r.try_clone_body().map(http_body_util::Either::Right)
            }
        }
    }
}

impl<D, E> TryCloneBody for http_body_util::combinators::BoxBody<D, E> {
    fn try_clone_body(&self) -> Option<Self> {
        None
    }
}

impl<D, E> TryCloneBody for http_body_util::combinators::UnsyncBoxBody<D, E> {
    fn try_clone_body(&self) -> Option<Self> {
        None
    }
}

#[cfg(feature = "hyper")]
#[cfg_attr(docsrs, doc(cfg(feature = "hyper")))]
impl TryCloneBody for hyper::body::Incoming {
    fn try_clone_body(&self) -> Option<Self> {
        None
    }
}

/// A copy of the request (method, URI, version, headers, extensions, body), if the body can
/// be copied.
pub(crate) fn try_clone_request<B: TryCloneBody>(req: &Request<B>) -> Option<Request<B>> {
    let body = req.body().try_clone_body()?;
    let mut copy = Request::new(body);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    *copy.extensions_mut() = req.extensions().clone();
    Some(copy)
}

pin_project! {
    /// A request body of a type the crate cannot copy, sent once and never replayed.
    ///
    /// [`KeyFallback`](crate::KeyFallback) needs [`TryCloneBody`] on the request body. For a
    /// body type from another crate that does not implement it (axum's `Body`, a
    /// `StreamBody`), wrap it: the request is sent once with the first usable key, and the
    /// key's state is still updated from the answer. To get fallback instead, buffer the body
    /// into [`Full<Bytes>`](http_body_util::Full) first.
    ///
    /// ```
    /// use http_body_util::StreamBody;
    /// use tower_key_fallback::{SendOnce, TryCloneBody};
    ///
    /// let stream = futures_util::stream::empty::<Result<http_body::Frame<bytes::Bytes>, std::io::Error>>();
    /// let req = http::Request::post("https://api.groq.com/openai/v1/chat/completions")
    ///     .body(SendOnce::new(StreamBody::new(stream)))
    ///     .unwrap();
    /// assert!(req.body().try_clone_body().is_none());
    /// ```
    #[derive(Debug, Default)]
    pub struct SendOnce<B> {
        #[pin]
        inner: B,
    }
}

impl<B> SendOnce<B> {
    /// Wraps a body.
    pub fn new(inner: B) -> Self {
        SendOnce { inner }
    }

    /// The body inside.
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B> TryCloneBody for SendOnce<B> {
    fn try_clone_body(&self) -> Option<Self> {
        None
    }
}

impl<B: Body> Body for SendOnce<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A boxed body with `Bytes` data and boxed errors.
pub(crate) type BoxedBody = Pin<Box<dyn Body<Data = Bytes, Error = BoxError> + Send>>;

/// A frame with its data as `Bytes` (free when it already is) and its error boxed.
fn bytes_frame<D: Buf, E: Into<BoxError>>(
    frame: Option<Result<Frame<D>, E>>,
) -> Option<Result<Frame<Bytes>, BoxError>> {
    frame.map(|f| {
        f.map(|f| f.map_data(|mut d| d.copy_to_bytes(d.remaining())))
            .map_err(Into::into)
    })
}

pin_project! {
    /// Maps any body to `Bytes` data and boxed errors.
    struct IntoBytes<B> {
        #[pin]
        inner: B,
    }
}

impl<B> Body for IntoBytes<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(bytes_frame(ready!(self.project().inner.poll_frame(cx))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pub(crate) fn boxed<B>(body: B) -> BoxedBody
where
    B: Body + Send + 'static,
    B::Error: Into<BoxError>,
{
    Box::pin(IntoBytes { inner: body })
}

/// What was read of an error body, and the rest of it.
pub(crate) struct Buffered {
    prefix: Option<Bytes>,
    rest: Option<BoxedBody>,
    trailers: Option<HeaderMap>,
    error: Option<BoxError>,
}

impl Buffered {
    /// A body nothing was read from.
    pub(crate) fn rest(body: BoxedBody) -> Buffered {
        Buffered {
            prefix: None,
            rest: Some(body),
            trailers: None,
            error: None,
        }
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(prefix) = self.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        if let Some(rest) = self.rest.as_mut() {
            match ready!(rest.as_mut().poll_frame(cx)) {
                Some(frame) => return Poll::Ready(Some(frame)),
                None => self.rest = None,
            }
        }
        if let Some(error) = self.error.take() {
            return Poll::Ready(Some(Err(error)));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none()
            && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
            && self.error.is_none()
            && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let have = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        match &self.rest {
            Some(rest) => {
                let r = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(r.lower().saturating_add(have));
                if let Some(upper) = r.upper() {
                    hint.set_upper(upper.saturating_add(have));
                }
                hint
            }
            None => SizeHint::with_exact(have),
        }
    }
}

/// Reads a body up to a limit or for at most a time, keeping every byte read. A body that
/// comes in one frame (the usual error body) is kept as that frame, without a copy.
pub(crate) struct Peek {
    first: Option<Bytes>,
    buf: BytesMut,
    body: Option<BoxedBody>,
    trailers: Option<HeaderMap>,
    error: Option<BoxError>,
    limit: usize,
    timeout: std::time::Duration,
    /// Started on the first poll: a stalled body ends the peek when it fires.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Peek {
    pub(crate) fn new(body: BoxedBody, limit: usize, timeout: std::time::Duration) -> Peek {
        Peek {
            first: None,
            buf: BytesMut::new(),
            body: Some(body),
            trailers: None,
            error: None,
            limit,
            timeout,
            timer: None,
        }
    }

    fn len(&self) -> usize {
        self.first.as_ref().map_or(0, Bytes::len) + self.buf.len()
    }

    /// Reads until the limit, the end, trailers, an error, or the timeout. What was not read
    /// by then stays in the body, for whoever gets the response.
    pub(crate) fn poll_peek(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        while self.len() < self.limit {
            let Some(body) = self.body.as_mut() else {
                break;
            };
            if body.is_end_stream() {
                self.body = None;
                break;
            }
            let frame = match body.as_mut().poll_frame(cx) {
                Poll::Ready(frame) => frame,
                Poll::Pending => {
                    let timeout = self.timeout;
                    let timer = self
                        .timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                    ready!(timer.as_mut().poll(cx));
                    break;
                }
            };
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if self.first.is_none() && self.buf.is_empty() => {
                        self.first = Some(data);
                    }
                    Ok(data) => {
                        if let Some(first) = self.first.take() {
                            self.buf.reserve(first.len() + data.len());
                            self.buf.extend_from_slice(&first);
                        }
                        self.buf.extend_from_slice(&data);
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.trailers = Some(trailers);
                        }
                        self.body = None;
                    }
                },
                Some(Err(e)) => {
                    self.error = Some(e);
                    self.body = None;
                }
                None => self.body = None,
            }
        }
        Poll::Ready(())
    }

    /// The bytes read so far, up to the limit.
    pub(crate) fn prefix(&self) -> &[u8] {
        let all: &[u8] = match &self.first {
            Some(first) => first,
            None => &self.buf,
        };
        &all[..all.len().min(self.limit)]
    }

    /// Whether the whole body was read.
    #[cfg(test)]
    pub(crate) fn complete(&self) -> bool {
        self.body.is_none()
    }

    pub(crate) fn into_buffered(self) -> Buffered {
        let prefix = match self.first {
            Some(first) => Some(first),
            None => (!self.buf.is_empty()).then(|| self.buf.freeze()),
        };
        Buffered {
            prefix,
            rest: self.body,
            trailers: self.trailers,
            error: self.error,
        }
    }
}

pin_project! {
    /// The response body of [`KeyFallback`](crate::KeyFallback).
    ///
    /// A success body is the upstream body itself, passed through frame by frame. An error
    /// body that was inspected yields the bytes read for inspection and then the rest of the
    /// upstream stream. A response made by the layer (the 429 of
    /// [`exhausted_response`](crate::KeyFallbackBuilder::exhausted_response)) is a small JSON
    /// body.
    pub struct KeyFallbackBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Passthrough { #[pin] inner: B },
        Buffered { inner: Buffered },
        Full { data: Option<Bytes> },
    }
}

impl<B> KeyFallbackBody<B> {
    pub(crate) fn passthrough(inner: B) -> Self {
        KeyFallbackBody {
            kind: Kind::Passthrough { inner },
        }
    }
    pub(crate) fn buffered(inner: Buffered) -> Self {
        KeyFallbackBody {
            kind: Kind::Buffered { inner },
        }
    }
    pub(crate) fn full(data: Bytes) -> Self {
        KeyFallbackBody {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }
}

impl<B> fmt::Debug for KeyFallbackBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Passthrough { .. } => "passthrough",
            Kind::Buffered { .. } => "inspected",
            Kind::Full { .. } => "full",
        };
        f.debug_tuple("KeyFallbackBody").field(&kind).finish()
    }
}

impl<B> Body for KeyFallbackBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            KindProj::Passthrough { inner } => {
                Poll::Ready(bytes_frame(ready!(inner.poll_frame(cx))))
            }
            KindProj::Buffered { inner } => inner.poll_frame(cx),
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Passthrough { inner } => inner.is_end_stream(),
            Kind::Buffered { inner } => inner.is_end_stream(),
            Kind::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Passthrough { inner } => inner.size_hint(),
            Kind::Buffered { inner } => inner.size_hint(),
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

/// The body of a response whose start was read to classify it: the bytes read for
/// inspection, then the rest of the upstream stream. The last response carried by
/// [`Exhausted`](crate::Exhausted) has it, and so does an inspected response handed back by
/// the reqwest middleware.
pub struct InspectedBody {
    inner: Mutex<Buffered>,
}

impl InspectedBody {
    pub(crate) fn new(inner: Buffered) -> Self {
        InspectedBody {
            inner: Mutex::new(inner),
        }
    }

    fn get(&mut self) -> &mut Buffered {
        self.inner.get_mut().unwrap_or_else(|e| e.into_inner())
    }
}

impl fmt::Debug for InspectedBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InspectedBody").finish_non_exhaustive()
    }
}

impl Body for InspectedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.get_mut().get().poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.lock().is_ok_and(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .lock()
            .map_or_else(|_| SizeHint::new(), |b| b.size_hint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use http_body_util::{BodyExt, StreamBody};

    const SECOND: std::time::Duration = std::time::Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_ends_the_peek_at_the_timeout_and_keeps_its_bytes() {
        let frames = futures_util::stream::iter([Ok::<_, BoxError>(Frame::data(
            Bytes::from_static(b"{\"error\":"),
        ))])
        .chain(futures_util::stream::pending());
        let mut peek = Peek::new(boxed(StreamBody::new(frames)), 100, 5 * SECOND);
        let start = tokio::time::Instant::now();
        std::future::poll_fn(|cx| peek.poll_peek(cx)).await;
        assert_eq!(start.elapsed(), 5 * SECOND);
        assert_eq!(peek.prefix(), b"{\"error\":");
        assert!(!peek.complete());
        let mut body = KeyFallbackBody::<String>::buffered(peek.into_buffered());
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(
            first.into_data().unwrap(),
            Bytes::from_static(b"{\"error\":")
        );
    }

    fn chunks(parts: Vec<&'static [u8]>) -> BoxedBody {
        let frames = parts
            .into_iter()
            .map(|p| Ok::<_, BoxError>(Frame::data(Bytes::from_static(p))));
        boxed(StreamBody::new(futures_util::stream::iter(frames)))
    }

    #[tokio::test]
    async fn peek_keeps_every_byte_past_the_limit() {
        let mut peek = Peek::new(chunks(vec![b"abc", b"def", b"ghi", b"jkl"]), 5, SECOND);
        std::future::poll_fn(|cx| peek.poll_peek(cx)).await;
        assert_eq!(peek.prefix(), b"abcde");
        assert!(!peek.complete());
        let body = KeyFallbackBody::<String>::buffered(peek.into_buffered());
        let all = body.collect().await.unwrap().to_bytes();
        assert_eq!(&all[..], b"abcdefghijkl");
    }

    #[tokio::test]
    async fn peek_of_a_short_body_is_complete_and_keeps_trailers() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-t", "1".parse().unwrap());
        let t2 = trailers.clone();
        let frames = vec![
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"hi"))),
            Ok(Frame::trailers(t2)),
        ];
        let mut peek = Peek::new(
            boxed(StreamBody::new(futures_util::stream::iter(frames))),
            100,
            SECOND,
        );
        std::future::poll_fn(|cx| peek.poll_peek(cx)).await;
        assert!(peek.complete());
        assert_eq!(peek.prefix(), b"hi");
        let collected = InspectedBody::new(peek.into_buffered())
            .collect()
            .await
            .unwrap();
        assert_eq!(collected.trailers(), Some(&trailers));
        assert_eq!(&collected.to_bytes()[..], b"hi");
    }

    #[tokio::test]
    async fn a_body_error_during_peek_is_handed_on() {
        let frames = vec![
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"x"))),
            Err("boom".into()),
        ];
        let mut peek = Peek::new(
            boxed(StreamBody::new(futures_util::stream::iter(frames))),
            100,
            SECOND,
        );
        std::future::poll_fn(|cx| peek.poll_peek(cx)).await;
        let mut body = KeyFallbackBody::<String>::buffered(peek.into_buffered());
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), Bytes::from_static(b"x"));
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(err.to_string(), "boom");
    }

    #[test]
    fn replayable_bodies() {
        assert!(String::from("x").try_clone_body().is_some());
        assert!(http_body_util::Empty::<Bytes>::new()
            .try_clone_body()
            .is_some());
        let boxed =
            http_body_util::combinators::BoxBody::new(String::new().map_err(|e| match e {}));
        assert!(boxed.try_clone_body().is_none());
    }
}
