//! What every benchmark shares: the request, the upstream stand-in, the baseline layers and a
//! synchronous driver. Included by `benches/overhead.rs`, `benches/allocs.rs` and
//! `tests/allocations.rs`; not every includer uses every item.
#![allow(dead_code)]

pub mod contention;
pub mod counting;

use std::convert::Infallible;
use std::fmt::Debug;
use std::future::{ready, Future, Ready};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use pin_project_lite::pin_project;
use tower::retry::{Policy, Retry};
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};
use tower_http::set_header::{SetRequestHeader, SetRequestHeaderLayer};
use tower_key_fallback::{KeyFallback, KeyFallbackLayer, KeySet};

pub type Req = Request<Full<Bytes>>;
pub type Res = Response<Full<Bytes>>;

pub const URI: &str = "https://api.groq.com/openai/v1/chat/completions";

/// A ~200-byte chat completion request.
pub const BODY: &str = concat!(
    r#"{"model":"llama-3.1-8b-instant","messages":["#,
    r#"{"role":"system","content":"You are a terse assistant."},"#,
    r#"{"role":"user","content":"Summarise RFC 9110 section 15.5.20 in one line."}],"#,
    r#""temperature":0.2,"max_tokens":64,"stream":false}"#
);

/// The keys of the three-key pool. Requests are sent with the first usable one.
pub const KEYS: [&str; 3] = [
    "gsk_bench0first0key0aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "gsk_bench0second0key0bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
    "gsk_bench0third0key0ccccccccccccccccccccccccccccccccccccccccc",
];

/// `Authorization` as the layer sends it for `KEYS[0]`.
pub fn bearer_first() -> HeaderValue {
    let mut v = HeaderValue::from_str(&format!("Bearer {}", KEYS[0])).expect("visible ASCII");
    v.set_sensitive(true);
    v
}

/// The same realistic request for every variant: a POST with a JSON body built at run time
/// (so the body is a heap `Bytes`, as a serialised body would be) and a few headers.
pub fn request() -> Req {
    Request::post(URI)
        .header(CONTENT_TYPE, "application/json")
        .header(ACCEPT, "application/json")
        .header(USER_AGENT, "bench-client/0.1 (tower-key-fallback)")
        .header("x-request-id", "req_01j9zq4d5f6g7h8j9k0m1n2p3q")
        .body(Full::new(Bytes::from(BODY.to_owned())))
        .expect("valid request")
}

const OK_BODY: &[u8] = br#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}]}"#;

/// Groq's answer to a per-minute token limit (tests/fixtures/provider-signals.json, case
/// `rate_limit`).
pub const GROQ_429_BODY: &[u8] = br#"{"error":{"message":"Rate limit reached for model `gemma2-9b-it` in organization `...` service tier `on_demand` on tokens per minute (TPM): Limit 15000, Used 11972, Requested 4351. Please try again in 5.289s. Visit https://console.groq.com/docs/rate-limits for more information.","type":"tokens","code":"rate_limit_exceeded"}}"#;

/// A small 200 answer.
pub fn ok_response() -> Res {
    let mut res = Response::new(Full::new(Bytes::from_static(OK_BODY)));
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

/// Groq's 429 with its headers.
///
/// `retry-after` is `0`, not the `2` Groq sends: the key is cooled down for 0 ms, so the
/// next request finds its deadline passed and restores it (`Pool::maybe_recover`). Every
/// iteration of `key_fallback/one_429` therefore pays for the whole cycle: inspect the body,
/// classify, cool key 1, replay with key 2, and (at the next request) restore key 1. The
/// alternative, `handle.reset_all()` per iteration, would add a cost that is not the layer's
/// to the timing and needs its own baseline; with a nonzero wait key 1 would simply stay
/// cooled and later iterations would measure the happy path on key 2.
///
/// It carries no `x-ratelimit-remaining-*`: the same count on every answer would be, as the
/// pool reads it, a budget that every replay spends (each answer counts the requests sent
/// since), so after 14,370 iterations key 1 would be passed over for its budget and the
/// bench would measure the happy path on key 2.
pub fn groq_429() -> Res {
    let mut res = Response::new(Full::new(Bytes::from_static(GROQ_429_BODY)));
    *res.status_mut() = StatusCode::TOO_MANY_REQUESTS;
    let h = res.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(RETRY_AFTER, HeaderValue::from_static("0"));
    for (name, value) in [
        ("x-ratelimit-limit-requests", "14400"),
        ("x-ratelimit-limit-tokens", "18000"),
        ("x-ratelimit-reset-requests", "2m59.56s"),
        ("x-ratelimit-reset-tokens", "7.66s"),
    ] {
        h.insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    res
}

/// The upstream stand-in: a `service_fn` answering at once. With `limited`, a request whose
/// `Authorization` is that value gets Groq's 429; every other request gets a 200.
pub fn upstream(
    limited: Option<HeaderValue>,
) -> impl Service<Req, Response = Res, Error = Infallible, Future = Ready<Result<Res, Infallible>>>
       + Clone
       + Send
       + 'static {
    service_fn(move |req: Req| {
        let res = match &limited {
            Some(l) if req.headers().get(AUTHORIZATION) == Some(l) => groq_429(),
            _ => ok_response(),
        };
        ready(Ok(res))
    })
}

/// A copy of the request, field by field: what any layer that can replay must make.
pub fn clone_request(req: &Req) -> Req {
    let mut copy = Request::new(req.body().clone());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    *copy.extensions_mut() = req.extensions().clone();
    copy
}

/// The `limit` layer: keeps one copy of the request until the response is in, as a layer
/// able to replay must, and does nothing else.
#[derive(Clone, Debug)]
pub struct KeepCopyLayer;

impl<S> Layer<S> for KeepCopyLayer {
    type Service = KeepCopy<S>;
    fn layer(&self, inner: S) -> KeepCopy<S> {
        KeepCopy { inner }
    }
}

#[derive(Clone, Debug)]
pub struct KeepCopy<S> {
    inner: S,
}

impl<S: Service<Req>> Service<Req> for KeepCopy<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = KeepCopyFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let copy = Some(clone_request(&req));
        KeepCopyFuture {
            fut: self.inner.call(req),
            copy,
        }
    }
}

pin_project! {
    pub struct KeepCopyFuture<F> {
        #[pin]
        fut: F,
        copy: Option<Req>,
    }
}

impl<F: Future> Future for KeepCopyFuture<F> {
    type Output = F::Output;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let out = std::task::ready!(this.fut.poll(cx));
        // The response is in: the copy is no longer needed.
        drop(this.copy.take());
        Poll::Ready(out)
    }
}

/// A `tower::retry` policy that keeps a copy of each request and never retries.
#[derive(Clone, Debug)]
pub struct NeverRetry;

impl<Res, E> Policy<Req, Res, E> for NeverRetry {
    type Future = Ready<()>;
    fn retry(&mut self, _req: &mut Req, _result: &mut Result<Res, E>) -> Option<Ready<()>> {
        None
    }
    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        Some(clone_request(req))
    }
}

fn set_header_layer() -> SetRequestHeaderLayer<HeaderValue> {
    SetRequestHeaderLayer::overriding(AUTHORIZATION, bearer_first())
}

/// `bare`: the upstream stand-in alone.
pub fn bare(
) -> impl Service<Req, Response = Res, Error = Infallible, Future: Send> + Clone + Send + 'static {
    upstream(None)
}

/// `set_header`: tower-http's `SetRequestHeader` overriding `Authorization`.
pub fn set_header(
) -> impl Service<Req, Response = Res, Error = Infallible, Future: Send> + Clone + Send + 'static {
    ServiceBuilder::new()
        .layer(set_header_layer())
        .service(upstream(None))
}

/// `limit`: one copy of the request kept for a replay, then `set_header`.
pub fn limit(
) -> impl Service<Req, Response = Res, Error = Infallible, Future: Send> + Clone + Send + 'static {
    ServiceBuilder::new()
        .layer(KeepCopyLayer)
        .layer(set_header_layer())
        .service(upstream(None))
}

/// `tower_retry`: tower's `Retry` (copy kept by the policy, never used) around `set_header`.
pub fn tower_retry() -> Retry<
    NeverRetry,
    SetRequestHeader<
        impl Service<Req, Response = Res, Error = Infallible, Future: Send> + Clone + Send,
        HeaderValue,
    >,
> {
    ServiceBuilder::new()
        .retry(NeverRetry)
        .layer(set_header_layer())
        .service(upstream(None))
}

/// The three-key layer.
pub fn key_fallback_layer() -> KeyFallbackLayer {
    KeyFallbackLayer::new(KeySet::new(KEYS).expect("valid keys"))
}

/// `key_fallback/happy`: our layer, three keys, the first one answers.
pub fn key_fallback(
) -> KeyFallback<impl Service<Req, Response = Res, Error = Infallible, Future: Send> + Clone + Send>
{
    key_fallback_layer().layer(upstream(None))
}

/// `key_fallback/one_429`: the first key gets Groq's 429, the second one answers.
pub fn key_fallback_one_429(
) -> KeyFallback<impl Service<Req, Response = Res, Error = Infallible, Future: Send> + Clone + Send>
{
    key_fallback_layer().layer(upstream(Some(bearer_first())))
}

/// `key_fallback/keys_1000`: priority order over 1,000 keys, the first 999 cooling for an
/// hour, so the only usable key is the last one.
pub fn key_fallback_keys_1000(
) -> KeyFallback<impl Service<Req, Response = Res, Error = Infallible, Future: Send> + Clone + Send>
{
    let keys = KeySet::new((0..1000).map(|i| format!("k{i}"))).expect("valid keys");
    let layer = KeyFallbackLayer::new(keys);
    let handle = layer.handle();
    for i in 1..1000 {
        // Labels are `key-1` … `key-1000`, so this cools keys 0..999 (zero-based).
        handle
            .cool_down(&format!("key-{i}"), Duration::from_secs(3600))
            .expect("known label");
    }
    assert_eq!(handle.status().available(), 1);
    layer.layer(upstream(None))
}

/// One request, driven synchronously: `poll_ready`, `call`, the future polled once (the
/// stand-in answers at once, so it must be ready), the response handed back.
#[inline]
pub fn drive<S, ResB>(svc: &mut S, req: Req) -> Response<ResB>
where
    S: Service<Req, Response = Response<ResB>>,
    S::Error: Debug,
{
    svc.ready()
        .now_or_never()
        .expect("the service is always ready")
        .expect("poll_ready never fails here");
    svc.call(req)
        .now_or_never()
        .expect("the response future is ready at once")
        .expect("the call succeeds")
}
