//! The layer stacked with `tower::timeout` inside (per attempt) and `tower::retry` with
//! [`RetryExhausted`] outside, on tokio's paused clock: an upstream that answers by key and by
//! (virtual) time.
#![cfg(feature = "retry")]

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tower::retry::RetryLayer;
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_key_fallback::{
    Exhausted, KeyFallbackBody, KeyFallbackLayer, KeyHandle, KeySet, KeyState, RetryExhausted,
};

/// What a key gets from the upstream `at` this long after the test started.
type Script = fn(key: &str, at: Duration) -> Answer;

enum Answer {
    Ok,
    /// 429 with `retry-after` in seconds.
    RateLimited(u64),
    Invalid,
    Hang,
}

/// The upstream calls made: (key, when).
type Log = Arc<Mutex<Vec<(String, Duration)>>>;

const PER_ATTEMPT: Duration = Duration::from_secs(1);

type Req = Request<Full<Bytes>>;
type Res = Response<KeyFallbackBody<Full<Bytes>>>;

/// retry(RetryExhausted) → key fallback → timeout(1 s) → the scripted upstream.
fn stack(
    keys: &[&str],
    policy: RetryExhausted,
    script: Script,
) -> (
    impl tower::Service<Req, Response = Res, Error = BoxError> + Clone,
    KeyHandle,
    Log,
) {
    let layer = KeyFallbackLayer::new(KeySet::new(keys).unwrap());
    let handle = layer.handle();
    let log: Log = Arc::default();
    let start = Instant::now();
    let calls = log.clone();
    let upstream = tower::service_fn(move |req: Req| {
        let key = req.headers()["authorization"]
            .to_str()
            .unwrap()
            .trim_start_matches("Bearer ")
            .to_owned();
        let at = start.elapsed();
        calls.lock().unwrap().push((key.clone(), at));
        async move {
            let res = match script(&key, at) {
                Answer::Ok => Response::new(Full::new(Bytes::from(format!("served by {key}")))),
                Answer::RateLimited(secs) => Response::builder()
                    .status(429)
                    .header("retry-after", secs)
                    .body(Full::new(Bytes::from_static(
                        br#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#,
                    )))
                    .unwrap(),
                Answer::Invalid => Response::builder()
                    .status(401)
                    .body(Full::new(Bytes::from_static(
                        br#"{"error":{"message":"Invalid API Key","code":"invalid_api_key"}}"#,
                    )))
                    .unwrap(),
                Answer::Hang => std::future::pending().await,
            };
            Ok::<_, Infallible>(res)
        }
    });
    let svc = ServiceBuilder::new()
        .layer(RetryLayer::new(policy))
        .layer(layer)
        .timeout(PER_ATTEMPT)
        .service(upstream);
    (svc, handle, log)
}

fn chat() -> Req {
    Request::post("https://api.groq.com/openai/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"llama-3.1-8b-instant","messages":[]}"#,
        )))
        .unwrap()
}

fn calls(log: &Log) -> Vec<(String, u64)> {
    log.lock()
        .unwrap()
        .iter()
        .map(|(k, at)| (k.clone(), at.as_millis() as u64))
        .collect()
}

fn call(key: &str, ms: u64) -> (String, u64) {
    (key.to_owned(), ms)
}

async fn body(res: Res) -> String {
    String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_request_waits_out_a_cooldown_then_succeeds() {
    // Both keys are rate limited at first: k1 for 2 s, k2 for 30 s.
    let script: Script = |key, at| match key {
        "k1" if at < Duration::from_secs(2) => Answer::RateLimited(2),
        "k2" if at < Duration::from_secs(30) => Answer::RateLimited(30),
        _ => Answer::Ok,
    };
    let (svc, handle, log) = stack(
        &["k1", "k2"],
        RetryExhausted::new(3, Duration::from_secs(10)),
        script,
    );
    let start = Instant::now();
    let res = svc.oneshot(chat()).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(body(res).await, "served by k1");
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    assert_eq!(
        calls(&log),
        [call("k1", 0), call("k2", 0), call("k1", 2000)]
    );
    let s = handle.status();
    assert_eq!((s.keys[0].requests, s.keys[0].successes), (2, 1));
    assert!(matches!(s.keys[1].state, KeyState::CoolingDown { .. }));
}

#[tokio::test(start_paused = true)]
async fn a_hanging_attempt_times_out_and_the_next_key_serves() {
    let script: Script = |key, _| match key {
        "k1" => Answer::Hang,
        _ => Answer::Ok,
    };
    let (svc, handle, log) = stack(
        &["k1", "k2"],
        RetryExhausted::new(3, Duration::from_secs(10)),
        script,
    );
    let start = Instant::now();
    let res = svc.oneshot(chat()).await.unwrap();
    assert_eq!(body(res).await, "served by k2");
    // The timeout is per attempt: it fired once, on k1, and counted against it.
    assert_eq!(start.elapsed(), PER_ATTEMPT);
    assert_eq!(calls(&log), [call("k1", 0), call("k2", 1000)]);
    let s = handle.status();
    assert_eq!((s.keys[0].errors, s.keys[0].consecutive_errors), (1, 1));
    assert_eq!(s.keys[1].successes, 1);
}

#[tokio::test(start_paused = true)]
async fn a_wait_longer_than_max_wait_is_handed_back_at_once() {
    let script: Script = |_, _| Answer::RateLimited(60);
    let (svc, _, log) = stack(
        &["k1", "k2"],
        RetryExhausted::new(3, Duration::from_secs(10)),
        script,
    );
    let start = Instant::now();
    let err = svc.oneshot(chat()).await.unwrap_err();
    let exhausted = err.downcast::<Exhausted>().unwrap();
    assert_eq!(exhausted.retry_after(), Some(Duration::from_secs(60)));
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(calls(&log).len(), 2);
}

#[tokio::test(start_paused = true)]
async fn retries_are_bounded() {
    let script: Script = |_, _| Answer::RateLimited(1);
    let (svc, _, log) = stack(
        &["k1", "k2"],
        RetryExhausted::new(2, Duration::from_secs(10)),
        script,
    );
    let start = Instant::now();
    let err = svc.oneshot(chat()).await.unwrap_err();
    assert!(err.is::<Exhausted>(), "{err}");
    // The first round and two retries: a second after the first round, as the provider
    // asked; the keys were refused again right out of that cooldown (a failed probe), so the
    // next one is twice as long.
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    let keys: Vec<_> = calls(&log)
        .into_iter()
        .map(|(k, at)| format!("{k}@{at}"))
        .collect();
    assert_eq!(
        keys,
        ["k1@0", "k2@0", "k1@1000", "k2@1000", "k1@3000", "k2@3000"]
    );
}

#[tokio::test(start_paused = true)]
async fn disabled_keys_are_final() {
    let script: Script = |_, _| Answer::Invalid;
    let (svc, handle, log) = stack(&["k1", "k2"], RetryExhausted::new(3, Duration::MAX), script);
    let err = svc.oneshot(chat()).await.unwrap_err();
    let exhausted = err.downcast::<Exhausted>().unwrap();
    assert_eq!(exhausted.retry_after(), None);
    assert_eq!(calls(&log).len(), 2);
    assert_eq!(handle.status().available(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_timeout_outside_the_retry_bounds_the_wait_too() {
    let script: Script = |key, at| match key {
        "k1" if at < Duration::from_secs(5) => Answer::RateLimited(5),
        _ => Answer::RateLimited(30),
    };
    let (svc, _, log) = stack(
        &["k1", "k2"],
        RetryExhausted::new(3, Duration::from_secs(10)),
        script,
    );
    let svc = ServiceBuilder::new()
        .timeout(Duration::from_secs(3))
        .service(svc);
    let start = Instant::now();
    let err = svc.oneshot(chat()).await.unwrap_err();
    assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    assert_eq!(calls(&log).len(), 2);
}
