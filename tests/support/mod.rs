//! What the mock-based tests share: the mock service pair, a realistic request, provider-like
//! responses, and one exchange of a request for the answers given in order.
#![allow(dead_code)]

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tower::{Layer, Service, ServiceExt};
use tower_key_fallback::{
    CooldownReason, KeyFallback, KeyFallbackLayer, KeyHandle, KeySet, KeyState,
};
use tower_test::mock;

pub type Req = Request<Full<Bytes>>;
pub type Res = Response<Full<Bytes>>;
pub type Mock = mock::Mock<Req, Res>;
pub type MockHandle = mock::Handle<Req, Res>;

pub fn keys(n: usize) -> KeySet {
    KeySet::new((1..=n).map(|i| format!("gsk_key{i}"))).unwrap()
}

pub fn setup(layer: KeyFallbackLayer) -> (KeyFallback<Mock>, MockHandle, KeyHandle) {
    let (mock, handle) = mock::pair::<Req, Res>();
    let keys = layer.handle();
    (layer.layer(mock), handle, keys)
}

pub fn request() -> Req {
    Request::post("https://api.groq.com/openai/v1/chat/completions")
        .header("content-type", "application/json")
        .header("authorization", "Bearer caller-set")
        .header("x-api-key", "caller-set")
        .header("x-request-tag", "t1")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"m","messages":[]}"#,
        )))
        .unwrap()
}

pub fn response(status: u16, headers: &[(&str, &str)], body: &str) -> Res {
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::from(body.to_owned()))).unwrap()
}

pub const GROQ_429: &str = r#"{"error":{"message":"Rate limit reached for model `llama` in organization `org_x` service tier `on_demand` on requests per minute (RPM): Limit 30, Used 30, Requested 1. Please try again in 2s.","type":"requests","code":"rate_limit_exceeded"}}"#;
pub const QUOTA_429: &str = r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
pub const INVALID_401: &str = r#"{"error":{"message":"Invalid API Key","type":"invalid_request_error","code":"invalid_api_key"}}"#;

/// The next upstream call; fails (rather than hangs) when none comes, e.g. because the
/// spawned request panicked. The paused clock jumps to the timeout only when all is idle.
pub async fn next<B>(
    handle: &mut mock::Handle<Request<B>, Res>,
) -> (Request<B>, mock::SendResponse<Res>) {
    tokio::time::timeout(Duration::from_secs(86_400 * 365), handle.next_request())
        .await
        .expect("an upstream call in time")
        .expect("the mock is alive")
}

pub fn bearer(req: &Req) -> String {
    let all: Vec<_> = req.headers().get_all("authorization").iter().collect();
    assert_eq!(all.len(), 1, "exactly one credential header");
    assert!(all[0].is_sensitive(), "credential marked sensitive");
    all[0].to_str().unwrap().to_owned()
}

/// Sends one request through `svc` and answers upstream calls in order with `answers`,
/// checking each carries the expected key. Returns the outcome.
pub async fn exchange(
    svc: &mut KeyFallback<Mock>,
    handle: &mut MockHandle,
    answers: Vec<(&str, Res)>,
) -> Result<Response<tower_key_fallback::KeyFallbackBody<Full<Bytes>>>, tower_key_fallback::BoxError>
{
    handle.allow(answers.len() as u64 + 1);
    svc.ready().await.unwrap();
    let call = tokio::spawn(svc.call(request()));
    for (key, res) in answers {
        let (req, send) = next(handle).await;
        assert_eq!(bearer(&req), format!("Bearer {key}"));
        send.send_response(res);
    }
    call.await.unwrap()
}

pub fn state(h: &KeyHandle, label: &str) -> KeyState {
    h.status().get(label).unwrap().state.clone()
}

pub fn cooling(h: &KeyHandle, label: &str) -> (Duration, CooldownReason) {
    match state(h, label) {
        KeyState::CoolingDown { remaining, reason } => (remaining, reason),
        other => panic!("{label} is {other:?}, not cooling"),
    }
}

/// An observer that keeps the `SharedLimit` warnings, as `"key+with"`.
#[derive(Clone, Default)]
pub struct Warnings(pub std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl tower_key_fallback::KeyEvents for Warnings {
    fn on_event(&self, event: &tower_key_fallback::KeyEvent<'_>) {
        if let tower_key_fallback::KeyEvent::SharedLimit { key, with } = event {
            self.0.lock().unwrap().push(format!("{key}+{with}"));
        }
    }
}

/// A call spawned on the runtime.
pub type Call = tokio::task::JoinHandle<
    Result<
        http::Response<tower_key_fallback::KeyFallbackBody<Full<Bytes>>>,
        tower_key_fallback::BoxError,
    >,
>;

pub fn ok() -> Res {
    response(200, &[], "{}")
}

pub fn limited(retry_after: &str) -> Res {
    response(429, &[("retry-after", retry_after)], GROQ_429)
}

/// A request tagged `tag` (in `x-request-tag`), to see which one an upstream call is.
pub fn tagged(tag: &str) -> Req {
    let mut req = request();
    req.headers_mut()
        .insert("x-request-tag", tag.parse().unwrap());
    req
}

pub fn tag(req: &Req) -> String {
    req.headers()["x-request-tag"].to_str().unwrap().to_owned()
}

/// A service over the mock that lets any number of calls through.
pub fn service(layer: KeyFallbackLayer) -> (KeyFallback<Mock>, MockHandle, KeyHandle) {
    let (svc, mut handle, keys) = setup(layer);
    handle.allow(u64::MAX);
    (svc, handle, keys)
}

/// Readies `svc` and spawns a call of `req`.
pub async fn spawn(svc: &mut KeyFallback<Mock>, req: Req) -> Call {
    svc.ready().await.unwrap();
    tokio::spawn(svc.call(req))
}

/// The next upstream call: (its key, its tag, the reply).
pub async fn upstream(handle: &mut MockHandle) -> (String, String, mock::SendResponse<Res>) {
    let (req, reply) = next(handle).await;
    (bearer(&req), tag(&req), reply)
}

/// Asserts that no upstream call comes while everything else is idle (the paused clock
/// moves on by a millisecond).
pub async fn no_upstream_call(handle: &mut MockHandle) {
    let call = tokio::time::timeout(Duration::from_millis(1), handle.next_request()).await;
    assert!(
        call.is_err(),
        "an upstream call came: {:?}",
        call.map(|c| c.map(|(r, _)| (bearer(&r), tag(&r))))
    );
}

/// Runs one request to completion with `key` answering `res`: the key is then heard from.
pub async fn serve(svc: &mut KeyFallback<Mock>, handle: &mut MockHandle, key: &str, res: Res) {
    let call = spawn(svc, request()).await;
    let (bearer, _, reply) = upstream(handle).await;
    assert_eq!(bearer, format!("Bearer {key}"));
    reply.send_response(res);
    call.await.unwrap().unwrap();
}
